//! Supervision end to end (real broker, real node processes): no process of a task survives
//! `kill`, a killed node, a killed shim or a node restart; a frozen node's exclusive task is
//! killed by its shim before its copy starts elsewhere, and never overlaps with it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use shiva_e2e::{
    Broker, Cluster, Ctl, Cut, Node, Partition, SETTLE, pid_alive, scratch, task_processes, wait_until,
};

/// Test timings plus a short fence timeout.
const FENCE: &[&str] = &["--fence-timeout", "1s"];

fn submit(cluster: &Cluster, spec: serde_json::Value) {
    let dir = scratch("specs");
    let id = spec["id"].as_str().unwrap().replace('/', "-");
    let path = dir.join(format!("{id}.json"));
    std::fs::write(&path, spec.to_string()).unwrap();
    cluster.ctl.ok(&["submit", path.to_str().unwrap()]);
}

/// A task whose shell starts a `setsid` daemon and a grandchild: three processes.
fn escaping(cluster: &Cluster, id: &str) -> serde_json::Value {
    json!({
        "id": id,
        "command": "sh",
        "args": ["-c", "setsid sh -c 'exec sleep 1000' & sh -c 'exec sleep 1000' & wait"],
        "env": {"E2E": cluster.name},
        "stop_grace": "1s",
    })
}

fn three_processes(cluster: &Cluster, task: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    wait_until(SETTLE, &format!("{task} runs its three processes"), || {
        pids = task_processes(&cluster.name, task).into_iter().map(|(pid, _)| pid).collect();
        pids.len() == 3
    });
    pids
}

fn all_gone(pids: &[i32], what: &str) {
    wait_until(Duration::from_secs(10), &format!("no process of the task remains {what}"), || {
        pids.iter().all(|pid| !pid_alive(*pid))
    });
}

/// The run shims among the children of `node` (of any of its threads).
fn shims_of(node: i32) -> Vec<i32> {
    let mut children = String::new();
    for thread in std::fs::read_dir(format!("/proc/{node}/task")).unwrap().flatten() {
        children += &std::fs::read_to_string(thread.path().join("children")).unwrap_or_default();
        children.push(' ');
    }
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).nth(1) == Some(b"__shim".as_slice())
        })
        .collect()
}

/// How many times `pid` was switched in so far (each one a wake).
fn wakes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|line| line.contains("ctxt_switches:"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The parent of `pid`.
fn parent(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_idle_shim_sleeps_through_its_leases_renewals_and_still_stops_its_task_when_the_node_freezes() {
    // Leases of 4 s: a shim that looked for each renewal woke about every 3.8 s.
    let mut cluster = Cluster::start("sleepy-shim", 1, &[&["--fence-timeout", "4s"]]);
    submit(
        &cluster,
        json!({"id": "app/idle", "command": "sleep", "args": ["1000"], "env": {"E2E": cluster.name}}),
    );
    let mut task = 0;
    wait_until(SETTLE, "the task runs", || {
        task = task_processes(&cluster.name, "app/idle").first().map_or(0, |(pid, _)| *pid);
        task != 0
    });
    let shim = parent(task);
    let sleeps = |what: &str| {
        std::thread::sleep(Duration::from_secs(1));
        let before = wakes(shim);
        std::thread::sleep(Duration::from_secs(12));
        let woke = wakes(shim) - before;
        assert!(woke <= 1, "the shim woke {woke} times in 12 s {what}, with leases of 4 s");
    };
    sleeps("held by the node that started it");
    // Taken back by the node's next process, the shim sleeps on that process's timer.
    cluster.node("n1").kill9();
    cluster.node("n1").restart();
    wait_until(SETTLE, "the node takes the run back", || {
        cluster.node("n1").log_text().contains("took back a run")
    });
    let now: Vec<i32> = task_processes(&cluster.name, "app/idle").into_iter().map(|(pid, _)| pid).collect();
    assert_eq!(now, vec![task], "the same task, taken back");
    sleeps("after it was taken back");
    // The node frozen, its timer goes off: the task stops at the lease's end.
    let frozen = std::time::Instant::now();
    cluster.node("n1").signal(Signal::SIGSTOP);
    all_gone(&[task, shim], "once the frozen node's lease ran out");
    let took = frozen.elapsed();
    cluster.node("n1").signal(Signal::SIGCONT);
    assert!(took >= Duration::from_secs(3), "stopped after {took:?}, before the lease's end");
}

#[test]
fn no_process_of_a_task_survives_kill_a_killed_node_a_killed_shim_or_a_restart() {
    let mut cluster = Cluster::start("orphans", 1, &[FENCE]);
    submit(&cluster, escaping(&cluster, "app/escape"));

    let pids = three_processes(&cluster, "app/escape");
    cluster.ctl.ok(&["kill", "app/escape"]);
    all_gone(&pids, "after `kill`");

    cluster.ctl.ok(&["start", "app/escape"]);
    let pids = three_processes(&cluster, "app/escape");
    let shims = shims_of(cluster.nodes[0].pid());
    assert_eq!(shims.len(), 1, "one shim per run: {shims:?}");
    kill(Pid::from_raw(shims[0]), Signal::SIGKILL).unwrap();
    all_gone(&pids, "after kill -9 of its shim");

    // The service comes back (a new run); then its node dies and is not started again: its
    // shim stops the run when the node's lease runs out.
    let pids = three_processes(&cluster, "app/escape");
    cluster.nodes[0].kill9();
    all_gone(&pids, "after kill -9 of its node, at the end of its lease");

    // Back again; this time the shim cannot act (stopped) when its node dies, so the run is a
    // leftover that the restarted node must find and stop: a shim that does not answer on its
    // socket is not taken back.
    cluster.nodes[0].restart();
    let pids = three_processes(&cluster, "app/escape");
    let shims = shims_of(cluster.nodes[0].pid());
    assert_eq!(shims.len(), 1, "one shim per run: {shims:?}");
    kill(Pid::from_raw(shims[0]), Signal::SIGSTOP).unwrap();
    cluster.nodes[0].kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert!(pids.iter().all(|pid| pid_alive(*pid)), "a frozen shim cannot stop its run");
    cluster.nodes[0].restart();
    all_gone(&pids, "after a node restart");
    // Killed with its run; a process stopped with SIGSTOP takes a moment to be scheduled and
    // exit, on a busy machine longer than its run's processes (which were running).
    wait_until(Duration::from_secs(5), "the leftover shim is gone too", || !pid_alive(shims[0]));
    let log = cluster.nodes[0].log_text();
    assert!(log.contains("stopping a run left by an earlier process of this node"), "{log}");
    three_processes(&cluster, "app/escape");
}

/// `start <node> <ns>` once, then `tick <node> <ns>` every 20 ms while alive.
fn ticking(cluster: &Cluster, id: &str, log: &Path) -> serde_json::Value {
    let script = format!(
        "echo \"start $SHIVA_RUN_ID $SHIVA_NODE_ID $(date +%s%N)\" >> {log}; \
         while :; do echo \"tick $SHIVA_RUN_ID $SHIVA_NODE_ID $(date +%s%N)\" >> {log}; sleep 0.02; done",
        log = log.display()
    );
    json!({
        "id": id,
        "command": "sh",
        "args": ["-c", script],
        "env": {"E2E": cluster.name},
        "tags": ["x"],
        "stop_grace": "1s",
    })
}

/// Each run's first and last line (ns), by run id, with its node.
fn intervals(log: &Path) -> BTreeMap<String, (String, u128, u128)> {
    let mut runs: BTreeMap<String, (String, u128, u128)> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, run, node, at] = fields[..] else { continue };
        let Ok(at) = at.parse::<u128>() else { continue };
        let entry = runs.entry(run.to_owned()).or_insert((node.to_owned(), at, at));
        entry.1 = entry.1.min(at);
        entry.2 = entry.2.max(at);
    }
    runs
}

fn assert_no_overlap(log: &Path) {
    let spans = intervals(log)
        .into_iter()
        .map(|(run, (node, from, to))| (from, to, format!("{run} on {node}")))
        .collect();
    shiva_e2e::assert_one_at_a_time(spans);
}

/// The task's processes (its shell and the shell's `sleep`) are on one node at a time.
fn on_one_node(cluster: &Cluster, how_long: Duration) {
    let deadline = std::time::Instant::now() + how_long;
    while std::time::Instant::now() < deadline {
        let nodes: std::collections::BTreeSet<String> =
            task_processes(&cluster.name, "app/tick").into_iter().map(|(_, node)| node).collect();
        assert!(nodes.len() <= 1, "the task runs on two nodes at once: {nodes:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster whose ticking task is frozen on its node (the node alone, or its whole process
/// group: `kill -STOP -<pgid>`, Ctrl-Z) until it runs on another node, then thawed; never on two
/// nodes at once, and it stays where it moved. Returns the cluster, the frozen node and the log.
fn freeze_the_holder(label: &str, whole_group: bool) -> (Cluster, String, std::path::PathBuf) {
    let tagged: &[&str] = &["--fence-timeout", "1s", "--tags", "x"];
    let mut cluster = Cluster::start(label, 3, &[FENCE, tagged, tagged]);
    let log = scratch(label).join("ticks.log");
    submit(&cluster, ticking(&cluster, "app/tick", &log));
    let mut holder = String::new();
    wait_until(SETTLE, "the task runs", || {
        let processes = task_processes(&cluster.name, "app/tick");
        holder = processes.first().map(|(_, node)| node.clone()).unwrap_or_default();
        !holder.is_empty()
    });
    let other = if holder == "n2" { "n3" } else { "n2" }.to_owned();
    let signal = |cluster: &mut Cluster, signal| match whole_group {
        true => cluster.node(&holder).signal_group(signal),
        false => cluster.node(&holder).signal(signal),
    };
    signal(&mut cluster, Signal::SIGSTOP);
    wait_until(SETTLE, "the task runs on the other node", || {
        task_processes(&cluster.name, "app/tick").iter().any(|(_, node)| *node == other)
    });
    on_one_node(&cluster, Duration::from_secs(2));
    signal(&mut cluster, Signal::SIGCONT);
    // Back on the bus, the node learns the task moved and does not start it again.
    on_one_node(&cluster, Duration::from_secs(5));
    let processes = task_processes(&cluster.name, "app/tick");
    assert!(processes.iter().all(|(_, node)| *node == other), "the copy stays where it moved: {processes:?}");
    assert_no_overlap(&log);
    (cluster, holder, log)
}

#[test]
fn a_frozen_node_fences_itself_before_its_task_starts_elsewhere() {
    let (mut cluster, holder, log) = freeze_the_holder("fence", false);
    let runs = intervals(&log);
    assert_eq!(runs.len(), 2, "one run on each node: {runs:?}");
    let fenced = cluster.node(&holder).log_text();
    assert!(fenced.contains("cut off from the bus"), "{fenced}");
}

#[test]
fn freezing_a_nodes_whole_process_group_stops_its_task_before_it_starts_elsewhere() {
    // `kill -STOP -<pgid>` (or Ctrl-Z) freezes the node and everything in its group. The shims
    // are not in it: their leases run out and the task stops, as for a frozen node alone.
    freeze_the_holder("freeze-group", true);
}

#[test]
fn a_crashing_task_fails_after_its_restarts_and_moves_and_a_permanent_exit_code_stops_it_at_once() {
    let cluster = Cluster::start("restarts", 2, &[FENCE, FENCE]);
    submit(
        &cluster,
        json!({
            "id": "app/crash", "command": "sh", "args": ["-c", "exit 3"], "env": {"E2E": cluster.name},
            "max_restarts": 2, "restart_window": "1m", "backoff": {"initial": "100ms"},
        }),
    );
    let mut first = String::new();
    wait_until(SETTLE, "the crashing task runs somewhere", || {
        let Some(status) = cluster.ctl.try_json(&["status", "app/crash"]) else { return false };
        first = status["node"].as_str().unwrap_or("").to_owned();
        !first.is_empty()
    });
    wait_until(SETTLE, "its node gives up on it after 2 restarts", || {
        let Some(status) = cluster.ctl.try_json(&["status", "app/crash"]) else { return false };
        status["reason"].as_str().is_some_and(|reason| reason.contains("restarted 2 times within 1m"))
    });
    wait_until(SETTLE, "the crashing task is moved to the other node and restarts there", || {
        let Some(status) = cluster.ctl.try_json(&["status", "app/crash"]) else { return false };
        let node = status["node"].as_str().unwrap_or("");
        !node.is_empty() && node != first && status["last_exit"]["code"] == 3
    });
    let human = cluster.ctl.ok(&["status", "app/crash"]);
    assert!(human.contains("restarts") && human.contains("last exit"), "{human}");

    submit(
        &cluster,
        json!({
            "id": "app/config-error", "command": "sh", "args": ["-c", "exit 78"], "env": {"E2E": cluster.name},
            "permanent_exit_codes": [78], "backoff": {"initial": "100ms"},
        }),
    );
    wait_until(SETTLE, "a permanent exit code fails the task at once", || {
        cluster.ctl.try_json(&["status", "app/config-error"]).is_some_and(|s| s["state"] == "failed")
    });
    let status = cluster.ctl.json(&["status", "app/config-error"]);
    assert_eq!(status["restarts"], 0, "{status}");
    let node = status["node"].clone();
    std::thread::sleep(Duration::from_secs(3));
    let later = cluster.ctl.json(&["status", "app/config-error"]);
    assert_eq!(
        (later["state"].clone(), later["node"].clone()),
        (json!("failed"), node),
        "not moved: {later}"
    );
}

/// What the 10,000-line task prints: some lines hold invalid UTF-8, the last has no newline.
fn ten_thousand_lines() -> Vec<u8> {
    let mut expected = Vec::new();
    for i in 1..=10_000 {
        if i % 1000 == 0 {
            expected.extend_from_slice(format!("line {i} ").as_bytes());
            expected.extend_from_slice(b"\xff\xfe\n");
        } else {
            expected.extend_from_slice(format!("line {i}\n").as_bytes());
        }
    }
    expected.extend_from_slice(b"last line without newline");
    expected
}

#[test]
fn logs_return_every_line_in_order_follow_a_live_task_and_outlive_the_node() {
    let tagged: &[&str] = &["--fence-timeout", "1s", "--log-rate", "64KiB"];
    let mut cluster = Cluster::start("logs", 1, &[tagged]);
    let script = "seq 1 10000 | awk '{ if ($1 % 1000 == 0) printf \"line %d \\377\\376\\n\", $1; else print \"line \" $1 }'; \
                  printf 'last line without newline'";
    submit(&cluster, json!({"id": "app/print", "command": "sh", "args": ["-c", script], "once": true}));
    let expected = ten_thousand_lines();
    let mut got = Vec::new();
    wait_until(SETTLE * 3, "`logs` returns all 10,000 lines", || {
        let output = cluster.ctl.run(&["logs", "app/print"]);
        got = output.stdout;
        got.len() >= expected.len()
    });
    assert!(got == expected, "logs differ: {} bytes, expected {}", got.len(), expected.len());

    // Files travel in the spec and arrive byte for byte in the run's working directory.
    let yaml = "name: app\nlist: [1, 2, 3]\nquote: \"it's\"\nutf8: é€😀\ntabs:\t\t|\n";
    submit(
        &cluster,
        json!({"id": "app/files", "command": "cat", "args": ["conf/app.yaml"], "once": true,
               "files": {"conf/app.yaml": yaml}}),
    );
    wait_until(SETTLE, "the file's content comes back through `logs`", || {
        cluster.ctl.run(&["logs", "app/files"]).stdout == yaml.as_bytes()
    });

    // A task flooding its output: the node keeps its lease (its heartbeats are not delayed).
    submit(
        &cluster,
        json!({"id": "app/flood", "command": "sh", "args": ["-c", "yes flood-flood-flood-flood"], "env": {"E2E": cluster.name}}),
    );
    // A live task, followed.
    let script = "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.1; done";
    submit(
        &cluster,
        json!({"id": "app/live", "command": "sh", "args": ["-c", script], "env": {"E2E": cluster.name}}),
    );
    let mut follow = std::process::Command::new(shiva_e2e::bin("shiva-ctl"))
        .args(["--bus", &cluster.broker.url(), "--cluster", &cluster.name, "logs", "-f", "app/live"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    for n in 1..=20 {
        let line = lines.next().expect("logs -f keeps printing").unwrap();
        assert_eq!(line, format!("tick {n}"));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    std::thread::sleep(Duration::from_secs(3));
    let log = cluster.nodes[0].log_text();
    assert!(!log.contains("cut off from the bus"), "a log flood made the node fence itself:\n{log}");

    // The node is gone; its tasks' output is not.
    cluster.nodes[0].kill9();
    let output = cluster.ctl.run(&["logs", "app/print"]);
    assert!(output.stdout == expected, "logs after the node died");
    // The last lines only, read from the topic's end (behind the flood's records): byte for
    // byte the end of the whole output.
    let tail = cluster.ctl.run(&["logs", "app/print", "--tail", "3"]);
    let last3 = b"line 9999\nline 10000 \xff\xfe\nlast line without newline";
    assert!(
        tail.stdout == last3,
        "{:?} {}",
        String::from_utf8_lossy(&tail.stdout),
        String::from_utf8_lossy(&tail.stderr)
    );
    let live = cluster.ctl.ok(&["logs", "app/live", "--tail", "2"]);
    assert_eq!(live.lines().count(), 2, "{live}");
    let flood = cluster.ctl.run(&["logs", "app/flood", "--since", "1h"]);
    assert!(
        flood.stdout.starts_with(b"flood-flood-flood-flood\n"),
        "{}",
        String::from_utf8_lossy(&flood.stderr)
    );
}

/// A leader among the alive nodes, per `nodes` (None while there is none).
fn leader(cluster: &Cluster) -> Option<String> {
    let nodes = cluster.ctl.try_json(&["nodes"])?;
    let leader = nodes.as_array()?.iter().find(|n| n["leader"] == true && n["alive"] == true)?;
    Some(leader["id"].as_str()?.to_owned())
}

/// Watches for `how_long`: the task never on two nodes, and never more than `gap` without a
/// leader.
fn watch(cluster: &Cluster, how_long: Duration, gap: Duration) {
    let deadline = std::time::Instant::now() + how_long;
    let mut last_leader = std::time::Instant::now();
    while std::time::Instant::now() < deadline {
        on_one_node(cluster, Duration::from_millis(200));
        if leader(cluster).is_some() {
            last_leader = std::time::Instant::now();
        }
        assert!(last_leader.elapsed() < gap, "no leader for {:?}", last_leader.elapsed());
    }
}

#[test]
fn a_node_cut_from_the_broker_both_ways_or_only_for_reads_never_doubles_its_task() {
    let broker = Broker::start();
    let name = shiva_e2e::cluster("partition");
    let ctl = Ctl::new(&broker, &name);
    let partition = Partition::new("p3", broker.port);
    let tagged: &[&str] = &["--fence-timeout", "1s", "--tags", "x"];
    // The task starts on the node behind the proxy, before the other tagged node exists.
    let n1 = Node::start(&broker, &name, "n1", FENCE);
    let n3 = Node::start_in(&partition, &broker, &name, "n3", tagged);
    let mut cluster = Cluster { broker, name, ctl, nodes: vec![n1, n3] };
    cluster.wait_nodes(2);
    let log = scratch("partition").join("ticks.log");
    submit(&cluster, ticking(&cluster, "app/tick", &log));
    let runs_on = |cluster: &Cluster, node: &str| {
        let processes = task_processes(&cluster.name, "app/tick");
        !processes.is_empty() && processes.iter().all(|(_, on)| on == node)
    };
    wait_until(SETTLE, "the task runs on n3", || runs_on(&cluster, "n3"));
    let n2 = Node::start(&cluster.broker, &cluster.name, "n2", tagged);
    cluster.nodes.push(n2);
    cluster.wait_nodes(3);

    for cut in [Cut::Both, Cut::Reads] {
        partition.set(cut);
        watch(&cluster, Duration::from_secs(3), Duration::from_secs(6));
        wait_until(SETTLE, &format!("the task runs on n2 once n3 is cut ({cut:?})"), || {
            on_one_node(&cluster, Duration::from_millis(100));
            runs_on(&cluster, "n2")
        });
        watch(&cluster, Duration::from_secs(3), Duration::from_secs(6));
        partition.set(Cut::Open);
        // Back, n3 finds its task elsewhere and leaves it there.
        watch(&cluster, Duration::from_secs(4), Duration::from_secs(6));
        assert!(runs_on(&cluster, "n2"), "the task stays on n2 after n3 is back ({cut:?})");
        cluster.wait_nodes(3);
        assert_no_overlap(&log);
        if cut == Cut::Both {
            // Put the task back on n3 for the next round: n2 leaves, then comes back.
            cluster.node("n2").terminate();
            wait_until(SETTLE, "the task is back on n3", || runs_on(&cluster, "n3"));
            cluster.node("n2").restart();
            cluster.wait_nodes(3);
        }
    }
    assert_no_overlap(&log);
    let cut_off = cluster.node("n3").log_text();
    assert!(cut_off.contains("cut off from the bus"), "{cut_off}");
}

/// A task whose program does not exist says so once, naming the program and the cause: not
/// "failed to start 'x': failed to start 'x': …" (issue 19, point 7).
#[test]
fn a_missing_program_is_reported_once_with_its_cause() {
    let cluster = Cluster::start("missing", 1, &[]);
    submit(
        &cluster,
        json!({"id": "job/missing", "command": "/no/such/program", "once": true, "max_attempts": 1}),
    );
    submit(&cluster, json!({"id": "app/missing", "command": "/no/such/program"}));
    let mut reasons = Vec::new();
    wait_until(SETTLE, "both report why they did not start", || {
        let history = cluster.ctl.try_json(&["history", "job/missing"]).unwrap_or_default();
        let run = history.as_array().and_then(|runs| runs.first()).cloned().unwrap_or_default();
        let task = cluster.ctl.tasks().get("app/missing").cloned().unwrap_or_default();
        reasons =
            [run["message"].as_str(), task["reason"].as_str()].map(|r| r.unwrap_or("").to_owned()).to_vec();
        reasons.iter().all(|reason| reason.contains("No such file"))
    });
    for reason in &reasons {
        assert_eq!(reason.matches("failed to start").count(), 1, "{reason}");
        assert!(reason.contains("'/no/such/program'"), "{reason}");
    }
}
