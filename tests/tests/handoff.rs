//! Hand-off end to end (real broker, real node processes): a service whose copy takes 3 s to
//! exit on SIGTERM is moved between two live nodes by a retag, by `delete` then `submit`, and by
//! `kill`, a retag and `start`; from the start and stop stamps its copies write, no two copies
//! ever overlap, and each move hands off within a bound.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use std::time::Duration;

use shiva_e2e::{Cluster, SETTLE, scratch, wait_until};

/// Stamps `start`, `tick` (every 50 ms) and `stop` lines; on SIGTERM it ticks on for 3 s more
/// before it exits, as a pipeline flushing its output would.
fn slow_to_stop(cluster: &Cluster, tags: &[&str], log: &Path) -> serde_json::Value {
    slow_service("app/slow", cluster, tags, log)
}

/// [`slow_to_stop`] as task `id`.
fn slow_service(id: &str, cluster: &Cluster, tags: &[&str], log: &Path) -> serde_json::Value {
    let script = format!(
        "stamp() {{ echo \"$1 $SHIVA_RUN_ID $SHIVA_NODE_ID $(date +%s%N)\" >> {log}; }}; \
         trap 'for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do stamp tick; sleep 0.2; done; stamp stop; exit 0' TERM; \
         stamp start; while :; do stamp tick; sleep 0.05; done",
        log = log.display()
    );
    json!({
        "id": id,
        "command": "sh",
        "args": ["-c", script],
        "env": {"E2E": cluster.name},
        "tags": tags,
        "stop_grace": "8s",
    })
}

fn submit(cluster: &Cluster, spec: serde_json::Value) {
    let path = scratch("specs").join("slow.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    cluster.ctl.ok(&["submit", path.to_str().unwrap()]);
}

/// Each copy's node, first and last stamp (ns), and whether it wrote its `stop`, by run id.
fn copies(log: &Path) -> BTreeMap<String, (String, u128, u128, bool)> {
    let mut runs: BTreeMap<String, (String, u128, u128, bool)> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [what, run, node, at] = fields[..] else { continue };
        let Ok(at) = at.parse::<u128>() else { continue };
        let entry = runs.entry(run.to_owned()).or_insert((node.to_owned(), at, at, false));
        entry.1 = entry.1.min(at);
        entry.2 = entry.2.max(at);
        entry.3 |= what == "stop";
    }
    runs
}

/// No two copies overlap; returns the hand-off gaps (a copy's last stamp → the next one's
/// first), in ms.
fn assert_one_at_a_time(log: &Path) -> Vec<f64> {
    let spans = copies(log)
        .into_iter()
        .map(|(run, (node, from, to, _))| (from, to, format!("{run} on {node}")))
        .collect();
    shiva_e2e::assert_one_at_a_time(spans)
}

/// Waits until a copy on `node` runs (its first stamp is written) and `count` copies were seen.
fn wait_copy_on(log: &Path, node: &str, count: usize) {
    wait_until(SETTLE, &format!("copy number {count} runs on {node}"), || {
        let copies = copies(log);
        copies.len() == count && copies.values().any(|(on, _, _, stopped)| on == node && !stopped)
    });
}

#[test]
fn planned_moves_between_live_nodes_hand_off_one_copy_at_a_time() {
    let cluster = Cluster::start("handoff", 2, &[&["--tags", "a"], &["--tags", "b"]]);
    let log = scratch("handoff").join("stamps.log");
    submit(&cluster, slow_to_stop(&cluster, &["a"], &log));
    wait_copy_on(&log, "n1", 1);

    // A retag: n2 may start only once n1's copy wrote its `stop`, 3 s after SIGTERM.
    submit(&cluster, slow_to_stop(&cluster, &["b"], &log));
    wait_copy_on(&log, "n2", 2);

    // Delete, then submit again at once (tags `a`: back to n1).
    cluster.ctl.ok(&["delete", "app/slow"]);
    submit(&cluster, slow_to_stop(&cluster, &["a"], &log));
    wait_copy_on(&log, "n1", 3);

    // Kill, retag and start at once.
    cluster.ctl.ok(&["kill", "app/slow"]);
    submit(&cluster, slow_to_stop(&cluster, &["b"], &log));
    cluster.ctl.ok(&["start", "app/slow"]);
    wait_copy_on(&log, "n2", 4);

    let gaps = assert_one_at_a_time(&log);
    assert_eq!(gaps.len(), 3);
    for (run, (node, _, _, stopped)) in copies(&log).iter().filter(|(_, (node, ..))| node != "n2") {
        assert!(*stopped, "copy {run} on {node} exited on SIGTERM after its 3 s");
    }
    // Old copy's last stamp → new copy's first: the status, the leader's decision and the
    // node's start (a shell) in between; far below the 8 s stop grace a blind wait would take.
    eprintln!("hand-off gaps (ms): {gaps:?}");
    for gap in &gaps {
        assert!(*gap < 5000.0, "a hand-off took {gap} ms: {gaps:?}");
    }
}

/// A service that fails on its node while the broker is down (its `failed` status cannot be
/// delivered then) still moves: the status is written again until it lands.
#[test]
fn a_failed_status_written_while_the_broker_is_down_lands_and_the_task_moves() {
    let mut cluster = Cluster::start("status-lands", 2, &[]);
    let dir = scratch("status-lands");
    let flag = dir.join("fail-on");
    // Fails at once, and again at every restart, on the node named in the flag file.
    let script = format!(
        "while :; do test \"$(cat {flag} 2>/dev/null)\" = \"$SHIVA_NODE_ID\" && exit 1; sleep 0.05; done",
        flag = flag.display()
    );
    let spec = json!({
        "id": "app/flaky",
        "command": "sh",
        "args": ["-c", script],
        "env": {"E2E": cluster.name},
        "max_restarts": 1,
        "backoff": {"initial": "100ms", "max": "100ms", "multiplier": 1},
        "stop_grace": "1s",
    });
    let path = dir.join("flaky.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    cluster.ctl.ok(&["submit", path.to_str().unwrap()]);
    let mut first = String::new();
    wait_until(SETTLE, "app/flaky runs", || {
        let row = cluster.ctl.tasks().get("app/flaky").cloned().unwrap_or_default();
        first = row["node"].as_str().unwrap_or_default().to_owned();
        row["state"] == "running" && !first.is_empty()
    });

    // The broker goes; the task fails on its node meanwhile (its status cannot be delivered
    // within the 2 s delivery timeout); the broker comes back 8 s later.
    cluster.broker.kill9();
    std::fs::write(&flag, &first).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    cluster.broker.restart();

    let other = if first == "n1" { "n2" } else { "n1" };
    wait_until(SETTLE * 2, &format!("app/flaky moves from {first} to {other}"), || {
        let row = cluster.ctl.tasks().get("app/flaky").cloned().unwrap_or_default();
        row["node"] == other && row["state"] == "running"
    });
    let log = cluster.node(&first).log_text();
    assert!(log.contains("status not written; writing it again"), "the failed write was retried: {log}");
}

/// Drain and cordon (issue 19, point 3): a cordoned node keeps its tasks and gets no new one; a
/// drained node's services move away one copy at a time (no two copies of any of them overlap,
/// by their stamps), through a kill -9 of another node mid-drain, while an every-second periodic
/// task runs each slot once and starts none there; a task only the drained node can run stays
/// until the drain's deadline, then waits, naming why; `uncordon` takes it back.
#[test]
fn drain_moves_every_service_away_one_copy_at_a_time_and_cordon_places_nothing_new() {
    let mut cluster = Cluster::start("drain", 3, &[&["--tags", "a,gpu"], &["--tags", "a"], &["--tags", "a"]]);
    let dir = scratch("drain");
    let services: Vec<String> = (0..6).map(|i| format!("app/s{i}")).collect();
    let log_of = |task: &str| dir.join(task.replace('/', "-"));
    for task in &services {
        submit(&cluster, slow_service(task, &cluster, &["a"], &log_of(task)));
    }
    // The chaos test's periodic task: every second, stamping its runs.
    let ticks = dir.join("ticks");
    let script = shiva_e2e::stamping_run(&ticks);
    let tick = json!({"id": "cron/tick", "command": "sh", "args": ["-c", script], "env": {"E2E": cluster.name},
        "schedule": "* * * * * *", "stop_grace": "1s"});
    submit(&cluster, tick);
    let on = |cluster: &Cluster, task: &str| -> Option<String> {
        cluster.ctl.tasks().get(task).and_then(|row| row["node"].as_str().map(str::to_owned))
    };
    wait_until(SETTLE, "every service runs", || {
        let tasks = cluster.ctl.tasks();
        services.iter().all(|task| tasks.get(task).is_some_and(|row| row["state"] == "running"))
    });
    let mode = |cluster: &Cluster, node: &str| -> String {
        let rows = cluster.ctl.json(&["nodes"]);
        let row = rows.as_array().unwrap().iter().find(|row| row["id"] == node).cloned().unwrap();
        row["mode"].as_str().unwrap().to_owned()
    };

    // Cordon n2: its services stay (same copies), a new service goes elsewhere.
    let before: BTreeMap<String, Option<String>> =
        services.iter().map(|t| (t.clone(), on(&cluster, t))).collect();
    let kept: Vec<&String> = services.iter().filter(|t| before[*t].as_deref() == Some("n2")).collect();
    assert!(!kept.is_empty(), "n2 runs some of the services: {before:?}");
    cluster.ctl.ok(&["cordon", "n2"]);
    assert_eq!(mode(&cluster, "n2"), "cordoned");
    for i in 0..3 {
        let task = format!("app/new{i}");
        submit(&cluster, slow_service(&task, &cluster, &["a"], &log_of(&task)));
        wait_until(SETTLE, "the new service runs", || {
            cluster.ctl.tasks().get(&task).is_some_and(|row| row["state"] == "running")
        });
        assert_ne!(on(&cluster, &task).as_deref(), Some("n2"), "{task} was placed on cordoned n2");
    }
    for task in &kept {
        assert_eq!(copies(&log_of(task)).len(), 1, "{task} stayed on cordoned n2, in its first copy");
    }
    cluster.ctl.ok(&["uncordon", "n2"]);
    assert_eq!(mode(&cluster, "n2"), "open");

    // A gpu task only n1 can run.
    let gpu_log = log_of("app/gpu");
    submit(&cluster, slow_service("app/gpu", &cluster, &["gpu"], &gpu_log));
    wait_copy_on(&gpu_log, "n1", 1);

    // Drain n1 with a deadline of 12 s; kill -9 another node mid-drain and bring it back.
    let on_n1: Vec<String> =
        cluster.ctl.tasks().into_iter().filter(|(_, row)| row["node"] == "n1").map(|(t, _)| t).collect();
    assert!(on_n1.len() >= 2, "n1 runs services to drain: {on_n1:?}");
    let drained_at = std::time::Instant::now();
    let drain = std::process::Command::new(shiva_e2e::bin("shiva-ctl"))
        .args([
            "--bus",
            &cluster.broker.url(),
            "--cluster",
            &cluster.name,
            "drain",
            "n1",
            "--deadline",
            "12s",
            "--wait",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let leader = cluster.wait_nodes(3);
    let victim = if leader == "n1" { "n3".to_owned() } else { leader };
    eprintln!("kill -9 {victim} mid-drain");
    cluster.node(&victim).kill9();
    std::thread::sleep(Duration::from_secs(2));
    cluster.node(&victim).restart();
    // The gpu task stays on n1 until the deadline.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        on(&cluster, "app/gpu").as_deref(),
        Some("n1"),
        "the gpu task stays on n1 before the deadline"
    );
    let output = drain.wait_with_output().unwrap();
    let printed =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "drain: {printed}");
    assert!(printed.contains("n1: drained"), "{printed}");
    assert!(
        drained_at.elapsed() >= Duration::from_secs(12),
        "drained only after the deadline (the gpu task)"
    );
    let now_mode = mode(&cluster, "n1");
    assert_eq!(
        now_mode,
        "drained",
        "{}\n{}\n{}",
        cluster.ctl.ok(&["nodes"]),
        cluster.ctl.ok(&["list"]),
        std::fs::read_to_string(&ticks)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let tasks = cluster.ctl.tasks();
    for (task, row) in &tasks {
        assert_ne!(row["node"], "n1", "{task} is still on drained n1: {row}");
    }
    let gpu = &tasks["app/gpu"];
    assert!(
        gpu["state"] == "pending"
            && gpu["reason"].as_str().unwrap_or("").contains("cordoned or draining (n1)"),
        "the gpu task waits, naming the drained node: {gpu}"
    );
    let mut waiting = Vec::new();
    wait_until(SETTLE, "the drained services run elsewhere", || {
        let tasks = cluster.ctl.tasks();
        waiting = on_n1
            .iter()
            .filter(|t| *t != "app/gpu" && tasks[*t]["state"] != "running")
            .map(|t| tasks[t].clone())
            .collect();
        if !waiting.is_empty() {
            eprintln!("not running yet: {waiting:?}");
        }
        waiting.is_empty()
    });
    // No two copies of any service overlapped, and every copy on n1 ended by its own stop.
    for task in services.iter().chain(on_n1.iter()) {
        assert_one_at_a_time(&log_of(task));
    }
    // The periodic task: no slot twice, no two runs at once, and none started on n1 after the
    // drain ended.
    let drained_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::thread::sleep(Duration::from_secs(4));
    let runs = shiva_e2e::stamped_runs(&ticks);
    let mut per_slot: BTreeMap<&str, usize> = BTreeMap::new();
    for (run, (slot, node, from, _, started)) in &runs {
        if *started {
            *per_slot.entry(slot.as_str()).or_default() += 1;
            assert!(!(node == "n1" && *from > drained_ns), "run {run} started on drained n1");
        }
    }
    assert!(per_slot.len() >= 15, "the periodic task ran throughout: {} slots", per_slot.len());
    let twice: Vec<_> = per_slot.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "slots run twice: {twice:?}");
    shiva_e2e::assert_one_at_a_time(
        runs.iter().map(|(run, (_, node, from, to, _))| (*from, *to, format!("{run} on {node}"))).collect(),
    );

    // Uncordon: the gpu task comes back to n1.
    cluster.ctl.ok(&["uncordon", "n1"]);
    wait_copy_on(&gpu_log, "n1", 2);
    assert_eq!(mode(&cluster, "n1"), "open");
    // An unknown node is refused (exit 1), a bad deadline too (exit 2).
    let unknown = cluster.ctl.run(&["drain", "nope"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", String::from_utf8_lossy(&unknown.stderr));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no node 'nope'"));
    assert_eq!(cluster.ctl.run(&["drain", "n2", "--deadline", "100d"]).status.code(), Some(2));
}

/// Rebalance (issue 19, point 4): services stay on n1 when n2 and n3 join; `rebalance
/// --dry-run` lists the moves and writes nothing; `rebalance --max-moves 1` evens the loads out
/// (2, 2, 2) one service at a time (no two hand-offs overlap), and no two copies of any service
/// overlap.
#[test]
fn rebalance_evens_out_services_after_nodes_join_one_move_at_a_time() {
    let mut cluster = Cluster::start("rebalance", 1, &[]);
    let dir = scratch("rebalance");
    let services: Vec<String> = (0..6).map(|i| format!("app/r{i}")).collect();
    let log_of = |task: &str| dir.join(task.replace('/', "-"));
    for task in &services {
        submit(&cluster, slow_service(task, &cluster, &[], &log_of(task)));
    }
    for task in &services {
        wait_copy_on(&log_of(task), "n1", 1);
    }
    for id in ["n2", "n3"] {
        let node = shiva_e2e::Node::start(&cluster.broker, &cluster.name, id, &[]);
        cluster.nodes.push(node);
    }
    cluster.wait_nodes(3);
    std::thread::sleep(Duration::from_secs(2));
    let per_node = |cluster: &Cluster| -> BTreeMap<String, usize> {
        let mut load = BTreeMap::new();
        for (_, row) in cluster.ctl.tasks() {
            *load.entry(row["node"].as_str().unwrap_or("-").to_owned()).or_default() += 1;
        }
        load
    };
    assert_eq!(per_node(&cluster), BTreeMap::from([("n1".to_owned(), 6)]), "joining nodes move nothing");

    let planned = cluster.ctl.json(&["rebalance", "--dry-run"]);
    assert_eq!(planned.as_array().unwrap().len(), 4, "{planned}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(per_node(&cluster)["n1"], 6, "a dry run moves nothing");

    let output = cluster.ctl.ok(&["rebalance", "--max-moves", "1"]);
    assert!(output.contains("balanced (4 move(s))"), "{output}");
    assert_eq!(
        per_node(&cluster),
        BTreeMap::from([("n1".to_owned(), 2), ("n2".to_owned(), 2), ("n3".to_owned(), 2)])
    );
    // No two copies of one service at once; hand-offs one at a time: a moved service's window
    // (its old copy's last stamp → its new copy's first) overlaps no other's.
    let mut windows = Vec::new();
    for task in &services {
        assert_one_at_a_time(&log_of(task));
        let copies = copies(&log_of(task));
        if copies.len() == 2 {
            let mut spans: Vec<(u128, u128)> = copies.values().map(|(_, from, to, _)| (*from, *to)).collect();
            spans.sort();
            windows.push((spans[0].1, spans[1].0, task.clone()));
        }
    }
    assert_eq!(windows.len(), 4, "four services moved once each: {windows:?}");
    windows.sort();
    for pair in windows.windows(2) {
        assert!(pair[0].1 < pair[1].0, "two hand-offs at once with --max-moves 1: {pair:?}");
    }
    assert!(cluster.ctl.ok(&["rebalance"]).contains("balanced (0 move(s))"));
}

/// The value of `name` in the environment of process `pid`.
fn env_of(pid: i32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .find_map(|v| v.strip_prefix(&prefix).map(str::to_owned))
}

/// The node of each instance of `task` running exactly once (per the kernel's process table),
/// with its pid; panics on an instance running twice.
fn instance_processes(cluster: &Cluster, instances: &[String]) -> BTreeMap<String, (String, i32)> {
    let mut found = BTreeMap::new();
    for instance in instances {
        let processes = shiva_e2e::task_processes(&cluster.name, instance);
        assert!(processes.len() <= 1, "{instance} runs {} times: {processes:?}", processes.len());
        if let Some((pid, node)) = processes.first() {
            found.insert(instance.clone(), (node.clone(), *pid));
        }
    }
    found
}

/// Instances (issue 19, point 5), with real processes: `count: 2` runs `web@0` and `web@1` on two
/// distinct nodes with `SHIVA_INSTANCE`; `count: 3` adds one on the third node and restarts
/// neither of the two; a fourth waits, saying why; the node of an instance is killed (-9) and
/// only that instance moves, never running twice, never beside a sibling; `every_node` runs one
/// instance on each node carrying its tag, one more on a node that joins, and none left behind
/// by a node that leaves; `delete` stops every instance.
#[test]
fn instances_spread_over_distinct_nodes_and_every_node_follows_joins_and_leaves() {
    let mut cluster = Cluster::start("instances", 3, &[&["--tags", "edge"], &["--tags", "edge"], &[]]);
    let dir = scratch("instances");
    let spec = |count: u32| {
        json!({"id": "web", "command": "sleep", "args": ["1000"], "env": {"E2E": cluster.name},
            "stop_grace": "2s", "count": count})
    };
    let write = |name: &str, spec: serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, spec.to_string()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ids = |count: usize| (0..count).map(|n| format!("web@{n}")).collect::<Vec<_>>();
    // A task of one copy that takes 3 s to stop becomes two instances: no instance starts
    // before the single copy is gone.
    let (single, instanced) = (dir.join("single"), dir.join("instanced"));
    submit(&cluster, slow_service("web", &cluster, &[], &single));
    wait_until(SETTLE, "web runs once", || copies(&single).len() == 1);
    let mut two = slow_service("web", &cluster, &[], &instanced);
    two["count"] = json!(2);
    submit(&cluster, two);
    wait_until(SETTLE, "both instances run", || copies(&instanced).len() == 2);
    let last_single = copies(&single).values().map(|(_, _, to, _)| *to).max().unwrap();
    let first_instance = copies(&instanced).values().map(|(_, from, _, _)| *from).min().unwrap();
    assert!(copies(&single).values().all(|(_, _, _, stopped)| *stopped), "web stopped on SIGTERM");
    assert!(last_single < first_instance, "an instance started while the single copy ran");
    cluster.ctl.ok(&["submit", &write("web2.json", spec(2))]);
    let two = cluster.wait_running_once(&ids(2));
    assert_ne!(two["web@0"], two["web@1"], "two instances on one node: {two:?}");
    let running = instance_processes(&cluster, &ids(2));
    for (instance, (_, pid)) in &running {
        let number = instance.strip_prefix("web@").unwrap();
        assert_eq!(env_of(*pid, "SHIVA_INSTANCE").as_deref(), Some(number), "{instance}");
    }
    let row = cluster.ctl.tasks()["web"].clone();
    assert_eq!(row["state"], "running", "{row}");
    assert!(row["reason"].as_str().unwrap().contains("2 of 2 instances running"), "{row}");

    // Three: the third node gets the new one; the first two keep their processes.
    cluster.ctl.ok(&["submit", &write("web3.json", spec(3))]);
    let three = cluster.wait_running_once(&ids(3));
    let nodes: std::collections::BTreeSet<&String> = three.values().collect();
    assert_eq!(nodes.len(), 3, "{three:?}");
    let after = instance_processes(&cluster, &ids(3));
    for instance in ids(2) {
        assert_eq!(after[&instance].1, running[&instance].1, "{instance} restarted when the count grew");
    }
    // Four on three nodes: one waits, naming the rule.
    cluster.ctl.ok(&["submit", &write("web4.json", spec(4))]);
    wait_until(SETTLE, "web@3 waits for a node of its own", || {
        let row = cluster.ctl.tasks().get("web@3").cloned().unwrap_or_default();
        row["state"] == "pending" && row["reason"].as_str().unwrap_or("").contains("distinct nodes")
    });
    let row = cluster.ctl.tasks()["web"].clone();
    assert_eq!(row["state"], "degraded", "{row}");
    // Back to two, then kill -9 the node of web@0: it moves to the free node, and only it.
    cluster.ctl.ok(&["submit", &write("web2.json", spec(2))]);
    wait_until(SETTLE, "web@2 and web@3 are gone", || {
        instance_processes(&cluster, &["web@2".into()]).is_empty()
            && !cluster.ctl.tasks().contains_key("web@3")
    });
    let placed = cluster.wait_running_once(&ids(2));
    let victim = placed["web@0"].clone();
    let sibling_pid = instance_processes(&cluster, &ids(2))["web@1"].1;
    cluster.node(&victim).kill9();
    let deadline = std::time::Instant::now() + SETTLE * 2;
    loop {
        let now = instance_processes(&cluster, &ids(2));
        if let (Some((a, _)), Some((b, _))) = (now.get("web@0"), now.get("web@1")) {
            assert_ne!(a, b, "two instances on one node: {now:?}");
            if *a != victim {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "web@0 never moved off {victim}: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(instance_processes(&cluster, &ids(2))["web@1"].1, sibling_pid, "web@1 was restarted");
    cluster.node(&victim).restart();
    cluster.wait_nodes(3);

    // One agent on each `edge` node: n1 and n2.
    let agent = json!({"id": "agent", "command": "sleep", "args": ["1000"], "env": {"E2E": cluster.name},
        "stop_grace": "1s", "tags": ["edge"], "every_node": true});
    cluster.ctl.ok(&["submit", &write("agent.json", agent)]);
    let agents = cluster.wait_running_once(&["agent@n1".to_owned(), "agent@n2".to_owned()]);
    assert_eq!(agents["agent@n1"], "n1");
    assert_eq!(agents["agent@n2"], "n2");
    let pid = instance_processes(&cluster, &["agent@n1".into()])["agent@n1"].1;
    assert_eq!(env_of(pid, "SHIVA_INSTANCE").as_deref(), Some("n1"));
    assert!(shiva_e2e::task_processes(&cluster.name, "agent@n3").is_empty(), "n3 has no edge tag");
    // A node that joins with the tag gets one; one that leaves takes its own away, and no
    // other node runs it.
    let joiner = shiva_e2e::Node::start(&cluster.broker, &cluster.name, "n4", &["--tags", "edge"]);
    cluster.nodes.push(joiner);
    let agents = cluster.wait_running_once(&["agent@n4".to_owned()]);
    assert_eq!(agents["agent@n4"], "n4");
    let status = cluster.node("n2").terminate();
    assert!(status.success(), "n2 stopped cleanly: {status:?}");
    wait_until(SETTLE, "agent@n2 is gone", || {
        shiva_e2e::task_processes(&cluster.name, "agent@n2").is_empty()
            && !cluster.ctl.tasks().contains_key("agent@n2")
    });
    let row = cluster.ctl.tasks()["agent"].clone();
    assert_eq!(row["state"], "running", "{row}");
    assert!(row["reason"].as_str().unwrap().contains("2 of 2"), "{row}");

    // A command names the task, not an instance (exit 2); delete stops every instance.
    let refused = cluster.ctl.run(&["kill", "web@1"]);
    assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("instance of 'web'"));
    cluster.ctl.ok(&["delete", "web"]);
    cluster.ctl.ok(&["delete", "agent"]);
    wait_until(SETTLE, "every instance stopped", || {
        ["web@0", "web@1", "agent@n1", "agent@n4"]
            .iter()
            .all(|task| shiva_e2e::task_processes(&cluster.name, task).is_empty())
    });
}
