//! The core cluster, end to end: real broker, real node processes, real kills.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use shiva_e2e::{Broker, Cluster, Node, SETTLE, pid_alive, scratch, task_processes, wait_until};

fn per_node(placement: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut load = BTreeMap::new();
    for node in placement.values() {
        *load.entry(node.clone()).or_default() += 1;
    }
    load
}

#[test]
fn three_nodes_elect_one_leader_spread_tasks_and_honour_tags() {
    let cluster = Cluster::start("spread", 3, &[&[], &[], &["--tags", "gpu"]]);
    let (tasks, placement) = cluster.run_tasks("app/t", 9);
    let load = per_node(&placement);
    assert_eq!(
        load.values().copied().collect::<Vec<_>>(),
        [3, 3, 3],
        "9 untagged tasks spread 3/3/3: {load:?}"
    );

    cluster.submit("ml/train", &["gpu"]);
    let placement = cluster.wait_running_once(&["ml/train".to_owned()]);
    assert_eq!(placement["ml/train"], "n3", "a gpu task lands only on the gpu node");
    let nodes = cluster.ctl.json(&["nodes"]);
    let n3 = nodes.as_array().unwrap().iter().find(|n| n["id"] == "n3").unwrap();
    assert_eq!(n3["tags"], serde_json::json!(["gpu"]));
    assert_eq!(n3["tasks"], 4);

    // A task nobody can run stays pending, and `status` says why (submitted from a spec file).
    let spec = shiva_e2e::scratch("spec").join("tpu.json");
    std::fs::write(
        &spec,
        r#"{"id":"ml/tpu","command":"sleep","args":["1000"],"tags":["tpu"],"stop_grace":"1s"}"#,
    )
    .unwrap();
    cluster.ctl.ok(&["submit", spec.to_str().unwrap()]);
    wait_until(SETTLE, "the tpu task is pending", || {
        cluster.ctl.tasks().get("ml/tpu").is_some_and(|row| row["state"] == "pending")
    });
    let status = cluster.ctl.json(&["status", "ml/tpu"]);
    assert!(status["reason"].as_str().unwrap().contains("[tpu]"), "{status}");
    assert_eq!(status["node"], serde_json::Value::Null);
    let human = cluster.ctl.ok(&["status", "ml/tpu"]);
    assert!(
        human.contains("pending") && human.contains("no live runner node carries the tags [tpu]"),
        "{human}"
    );
    cluster.assert_never_twice(&tasks, Duration::from_secs(1));
}

#[test]
fn killing_the_leader_moves_its_tasks_to_the_survivors_exactly_once() {
    let mut cluster = Cluster::start("failover", 3, &[]);
    let leader = cluster.wait_nodes(3);
    let (tasks, placement) = cluster.run_tasks("svc/t", 6);
    let orphans: Vec<i32> = placement
        .iter()
        .filter(|(_, node)| **node == leader)
        .map(|(task, _)| task_processes(&cluster.name, task)[0].0)
        .collect();
    assert!(!orphans.is_empty());

    cluster.node(&leader).kill9();
    wait_until(SETTLE, "a new leader", || {
        let Some(nodes) = cluster.ctl.try_json(&["nodes"]) else { return false };
        nodes.as_array().unwrap().iter().any(|n| n["leader"] == true && n["id"] != leader.as_str())
    });
    // Its tasks go on under their shims until its lease ends, then move.
    wait_until(SETTLE, "the dead node's tasks run elsewhere", || {
        let rows = cluster.ctl.tasks();
        tasks.iter().all(|task| rows.get(task).is_some_and(|row| row["node"] != leader.as_str()))
    });
    let placement = cluster.wait_running_once(&tasks);
    assert!(placement.values().all(|node| *node != leader), "nothing runs on the dead node: {placement:?}");
    for pid in orphans {
        assert!(!pid_alive(pid), "process {pid} of the dead node still runs");
    }
    cluster.assert_never_twice(&tasks, Duration::from_secs(1));
}

#[test]
fn kill_stops_the_process_group_within_a_second_and_start_brings_it_back() {
    let cluster = Cluster::start("kill", 2, &[]);
    let task = "web/api".to_owned();
    cluster.submit(&task, &[]);
    cluster.wait_running_once(std::slice::from_ref(&task));
    let pid = task_processes(&cluster.name, &task)[0].0;

    let started = Instant::now();
    cluster.ctl.ok(&["kill", &task]);
    wait_until(Duration::from_secs(5), "the process is gone", || {
        task_processes(&cluster.name, &task).is_empty()
    });
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "kill took {took:?}");
    assert!(!pid_alive(pid));
    wait_until(SETTLE, "list shows stopped", || {
        let rows = cluster.ctl.tasks();
        rows.get(&task).is_some_and(|row| row["state"] == "stopped" && row["desired"] == "stopped")
    });

    cluster.ctl.ok(&["start", &task]);
    cluster.wait_running_once(std::slice::from_ref(&task));
    let status = cluster.ctl.json(&["status", &task]);
    assert_eq!(status["desired"], "running");
    assert_eq!(status["spec"]["command"], "sleep");

    cluster.ctl.ok(&["delete", &task]);
    wait_until(SETTLE, "a deleted task stops", || task_processes(&cluster.name, &task).is_empty());
    assert!(cluster.ctl.tasks().is_empty());
    assert_eq!(cluster.ctl.run(&["status", &task]).status.code(), Some(1));
}

#[test]
fn restarting_every_node_restores_assignments_also_after_compaction() {
    let mut cluster = Cluster::start("restart", 3, &[]);
    let (tasks, _) = cluster.run_tasks("batch/t", 6);

    // Crash every node, let the broker compact (1 s maintenance), restart them all. On the file
    // bus the nodes clean it (every second in tests): it is compacted before they die.
    let compacted = |cluster: &Cluster| {
        let (records, end) =
            shiva_e2e_reader::count(&cluster.broker, &cluster.name, shiva_proto::TopicKind::Control);
        eprintln!("control log: {records} records up to offset {end}");
        records < end
    };
    if cluster.broker.file {
        wait_until(Duration::from_secs(30), "the nodes compact the control log", || compacted(&cluster));
    }
    for node in &mut cluster.nodes {
        node.kill9();
    }
    wait_until(Duration::from_secs(5), "tasks die with their nodes", || {
        tasks.iter().all(|task| task_processes(&cluster.name, task).is_empty())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(compacted(&cluster), "the control log was compacted");
    for node in &mut cluster.nodes {
        node.restart();
    }
    cluster.wait_nodes(3);
    cluster.wait_running_once(&tasks);
    cluster.assert_never_twice(&tasks, Duration::from_secs(1));

    // Graceful restart of every node, one after the other. A node that leaves says so, so
    // its tasks move at once, well before the 1.5 s node timeout would move them.
    for index in 0..cluster.nodes.len() {
        let status = cluster.nodes[index].terminate();
        let stopped = Instant::now();
        assert!(status.success(), "graceful stop exits 0: {status:?}");
        let placement = cluster.wait_running_once(&tasks);
        let took = stopped.elapsed();
        assert!(placement.values().all(|node| *node != cluster.nodes[index].id));
        assert!(took < Duration::from_millis(1500), "tasks of a departed node moved after {took:?}");
        cluster.nodes[index].restart();
        cluster.wait_nodes(3);
    }
    cluster.wait_nodes(3);
    let placement = cluster.wait_running_once(&tasks);
    assert_eq!(placement.len(), 6, "nothing lost");
    cluster.assert_never_twice(&tasks, Duration::from_secs(1));
}

#[test]
fn a_paused_leader_steps_down_and_its_late_writes_change_nothing() {
    let mut cluster = Cluster::start("stale", 3, &[]);
    let leader = cluster.wait_nodes(3);
    let (tasks, _) = cluster.run_tasks("etl/t", 6);

    cluster.node(&leader).signal(Signal::SIGSTOP);
    let mut new_leader = String::new();
    wait_until(SETTLE, "a new leader while the old one is frozen", || {
        let Some(nodes) = cluster.ctl.try_json(&["nodes"]) else { return false };
        match nodes.as_array().unwrap().iter().find(|n| n["leader"] == true) {
            Some(n) if n["id"] != leader.as_str() => {
                new_leader = n["id"].as_str().unwrap().to_owned();
                true
            }
            _ => false,
        }
    });
    wait_until(SETTLE, "the frozen node's tasks are reassigned", || {
        let rows = cluster.ctl.tasks();
        tasks.iter().all(|task| {
            rows.get(task).is_some_and(|row| row["node"] != leader.as_str() && row["state"] == "running")
        })
    });
    let before: BTreeMap<String, (Value, Value)> = cluster
        .ctl
        .tasks()
        .into_iter()
        .map(|(id, row)| (id, (row["node"].clone(), row["generation"].clone())))
        .collect();

    cluster.node(&leader).signal(Signal::SIGCONT);
    cluster.wait_nodes(3);
    let placement = cluster.wait_running_once(&tasks);
    cluster.assert_never_twice(&tasks, Duration::from_secs(2));
    let after: BTreeMap<String, (Value, Value)> = cluster
        .ctl
        .tasks()
        .into_iter()
        .map(|(id, row)| (id, (row["node"].clone(), row["generation"].clone())))
        .collect();
    assert_eq!(before, after, "the old leader's late writes changed no assignment");
    assert!(placement.values().all(|node| *node != leader));
    let nodes = cluster.ctl.json(&["nodes"]);
    let current = nodes.as_array().unwrap().iter().find(|n| n["leader"] == true).unwrap();
    assert_eq!(current["id"], new_leader.as_str(), "the resumed node does not take leadership back");
}

#[test]
fn the_cluster_recovers_by_itself_after_the_broker_is_killed_and_restarted() {
    let cluster = Cluster::start("broker", 3, &[]);
    let (tasks, _) = cluster.run_tasks("db/t", 3);
    cluster.broker.kill9();
    std::thread::sleep(Duration::from_secs(2));
    cluster.broker.restart();
    cluster.wait_nodes(3);
    cluster.submit("db/after", &[]);
    let mut all = tasks.clone();
    all.push("db/after".into());
    cluster.wait_running_once(&all);
    cluster.assert_never_twice(&all, Duration::from_secs(1));
}

#[test]
fn a_second_node_with_a_live_nodes_id_refuses_to_start() {
    let cluster = Cluster::start("dupid", 1, &[]);
    let mut impostor = Node::start(&cluster.broker, &cluster.name, "n1", &[]);
    let status = impostor.wait_exit(Duration::from_secs(15));
    assert!(!status.success());
    assert!(impostor.log_text().contains("already used by a live node"), "{}", impostor.log_text());
    assert_eq!(cluster.wait_nodes(1), "n1");
}

/// Each epoch's leader as every node's log names it ("new epoch" lines): epoch → {leader}.
/// The keys of `topic` whose newest record is not a tombstone, read by the independent client
/// (confluent-kafka), with the number of records read.
fn live_keys(cluster: &Cluster, topic: &str) -> (std::collections::BTreeSet<String>, usize) {
    let topic = format!("shiva.{}.{topic}", cluster.name);
    let output = shiva_e2e::kafka_tool(&cluster.broker, &["consume", &topic, "1", "0"]);
    let mut newest: BTreeMap<String, bool> = BTreeMap::new();
    let mut records = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let Some(key) = record["key"].as_str() else { continue };
        records += 1;
        newest.insert(key.to_owned(), record["value"].as_str().is_some_and(|value| !value.is_empty()));
    }
    (newest.into_iter().filter(|(_, live)| *live).map(|(key, _)| key).collect(), records)
}

/// Issue 15, a bounded log, on real processes: failovers (graceful, with a resignation and a
/// departure, and kill -9) leave one claim, no resignation of an earlier epoch and no departure
/// of an incarnation that came back; and a cluster restarted on the trimmed, compacted log
/// (whose first claim is no longer epoch 1) elects a leader and runs every task once.
#[test]
fn failovers_leave_one_claim_and_a_cluster_restarts_on_the_trimmed_log() {
    let mut cluster = Cluster::start("trim", 3, &[]);
    let (tasks, _) = cluster.run_tasks("svc/t", 3);
    // Every node reads a trimmed log, and says so (what lets the leader trim winning claims).
    let nodes = cluster.ctl.json(&["nodes"]);
    for row in nodes.as_array().unwrap() {
        assert!(row["features"].as_array().unwrap().iter().any(|f| f == "trimmed_claims"), "{row}");
    }
    // The leader's id and incarnation (a node killed and restarted at once may win again).
    let leader_of = |cluster: &Cluster| {
        let nodes = cluster.ctl.try_json(&["nodes"])?;
        let row = nodes.as_array()?.iter().find(|n| n["leader"] == true)?.clone();
        let alive = nodes.as_array()?.iter().filter(|n| n["alive"] == true).count();
        Some((row["id"].as_str()?.to_owned(), row["incarnation"].as_str()?.to_owned(), alive))
    };
    for round in 0..6 {
        cluster.wait_nodes(3);
        let (leader, incarnation, _) = leader_of(&cluster).unwrap();
        let node = cluster.node(&leader);
        if round % 2 == 0 {
            assert!(node.terminate().success());
        } else {
            // A node killed and started again at once comes back as the same incarnation and may
            // go on leading its epoch (a pause, not a failover): it stays down past the leader
            // timeout, so that another node claims.
            node.kill9();
            std::thread::sleep(Duration::from_millis(1500));
        }
        node.restart();
        wait_until(SETTLE, "a new leader", || {
            leader_of(&cluster).is_some_and(|(_, now, alive)| now != incarnation && alive == 3)
        });
    }
    cluster.wait_running_once(&tasks);
    let mut last = Default::default();
    wait_until(SETTLE, "claims, resignations and departures trimmed", || {
        let (assignments, _) = live_keys(&cluster, "assignments");
        let (control, _) = live_keys(&cluster, "control");
        let claims = assignments.iter().filter(|key| key.starts_with("claim/")).count();
        let resigns = assignments.iter().filter(|key| key.starts_with("resign/")).count();
        let leaves = control.iter().filter(|key| key.starts_with("leave/")).count();
        last = (claims, resigns, leaves, assignments, control);
        claims == 1 && resigns == 0 && leaves == 0
    });
    let (_, _, _, assignments, _) = last;
    let claim = assignments.iter().find(|key| key.starts_with("claim/")).unwrap();
    let epoch: u64 = claim.split('/').nth(1).unwrap().parse().unwrap();
    assert!(epoch >= 7, "six failovers after the first election: {claim}");
    // Every node dies; the broker compacts (1 s maintenance): the claims of epochs 1 to 6 are
    // tombstones or gone, and the nodes read a log that starts at a later epoch.
    for node in &mut cluster.nodes {
        node.kill9();
    }
    std::thread::sleep(Duration::from_secs(3));
    for node in &mut cluster.nodes {
        node.restart();
    }
    cluster.wait_nodes(3);
    cluster.wait_running_once(&tasks);
    cluster.assert_never_twice(&tasks, Duration::from_secs(1));
    // Every node read the trimmed log from its start and skipped nothing in it.
    for node in &cluster.nodes {
        let log = node.log_text();
        let skipped: Vec<&str> = log.lines().filter(|line| line.contains("skipped record")).collect();
        assert!(skipped.is_empty(), "{}: {skipped:#?}", node.id);
    }
}

fn epochs_in_logs(nodes: &[&Node]) -> BTreeMap<u64, std::collections::BTreeSet<String>> {
    let field = |line: &str, name: &str| {
        line.split_whitespace().find_map(|word| word.strip_prefix(name).map(|value| value.to_owned()))
    };
    let mut epochs: BTreeMap<u64, std::collections::BTreeSet<String>> = BTreeMap::new();
    for node in nodes {
        for line in node.log_text().lines().filter(|line| line.contains("new epoch")) {
            let epoch = field(line, "epoch=").and_then(|epoch| epoch.parse().ok()).expect("an epoch");
            epochs.entry(epoch).or_default().insert(field(line, "leader=").expect("a leader"));
        }
    }
    epochs
}

#[test]
fn a_node_of_the_next_protocol_leads_a_mixed_cluster_and_no_epoch_has_two_winners() {
    let cluster = Cluster::start("mixed", 2, &[]);
    let env = [("SHIVA_TEST_NEXT_PROTOCOL", "1")];
    let mut next = Node::start_with_env(&cluster.broker, &cluster.name, "n3", &[], &env);
    // The older nodes resign and do not claim while it is live: it leads.
    wait_until(SETTLE, "the newer node leads", || next.log_text().contains("won the election"));
    assert!(
        cluster
            .nodes
            .iter()
            .any(|node| node.log_text().contains("resigning: a node of a newer protocol is live")),
        "the older leader resigned for it"
    );
    let claims = |node: &Node| node.log_text().matches("claiming the next epoch").count();
    let before: Vec<usize> = cluster.nodes.iter().map(claims).collect();
    std::thread::sleep(Duration::from_secs(5));
    let after: Vec<usize> = cluster.nodes.iter().map(claims).collect();
    assert_eq!(before, after, "no older node claims while the newer one is live");
    assert!(next.log_text().matches("won the election").count() == 1, "it kept its leadership");

    // `nodes` shows each node's protocol and version, and says that an upgrade is under way.
    let rows = cluster.ctl.json(&["nodes"]);
    let row = |id: &str| rows.as_array().unwrap().iter().find(|row| row["id"] == id).unwrap().clone();
    assert_eq!(row("n3")["protocol"], shiva_proto::PROTOCOL_VERSION + 1, "{rows}");
    assert_eq!(row("n1")["protocol"], shiva_proto::PROTOCOL_VERSION, "{rows}");
    assert_eq!(row("n1")["version"], env!("CARGO_PKG_VERSION"), "{rows}");
    let human = cluster.ctl.ok(&["nodes"]);
    assert!(human.contains("note: n3 speaks protocol 2, newer than this shiva-ctl's (1)"), "{human}");

    // Once the newer node is gone, an older one leads again.
    next.kill9();
    let leader = cluster.wait_nodes(2);
    assert!(["n1", "n2"].contains(&leader.as_str()));
    // Every node saw every epoch won by the same node.
    let logs: Vec<&Node> = cluster.nodes.iter().chain([&next]).collect();
    let epochs = epochs_in_logs(&logs);
    assert!(epochs.len() >= 3, "epochs of n1/n2, of n3, and after it: {epochs:?}");
    for (epoch, leaders) in &epochs {
        assert_eq!(leaders.len(), 1, "epoch {epoch} has one winner on every node: {epochs:?}");
    }
    assert!(epochs.values().any(|leaders| leaders.contains("n3")), "{epochs:?}");
}

/// Two incarnations of one node id at once (issue 15, point 4): a node frozen past the probe
/// window of a second machine started with its id, then thawed, heartbeats again beside it (as
/// after a healed partition, or cloned machines started together). Only the incarnation the
/// leader lists runs the id's tasks, and `nodes` shows the conflict.
#[test]
fn two_incarnations_of_one_node_id_never_both_run_its_tasks_and_nodes_shows_the_conflict() {
    two_incarnations(false);
}

/// The same, the first thawing while its task is still held for it (before the second may run
/// it): the task stays with the first, which alone starts it again; never two copies.
#[test]
fn an_incarnation_that_comes_back_while_its_task_is_held_for_it_runs_it_alone() {
    two_incarnations(true);
}

fn two_incarnations(thaw_early: bool) {
    let mut cluster = Cluster::start("clones", 2, &[&[], &["--tags", "x"]]);
    cluster.submit("app/x", &["x"]);
    cluster.wait_running_once(&["app/x".to_owned()]);
    // n2 frozen whole (node and its group): its lease runs out and its task stops.
    cluster.node("n2").signal_group(Signal::SIGSTOP);
    wait_until(SETTLE, "the frozen n2's task stops", || {
        shiva_e2e::task_processes(&cluster.name, "app/x").is_empty()
    });
    // A second machine with the same id starts (the first is silent: it passes the id check).
    let clone = Node::start(&cluster.broker, &cluster.name, "n2", &["--tags", "x"]);
    let clone_pid = clone.pid();
    if thaw_early {
        wait_until(SETTLE, "the clone heartbeats", || clone.log_text().contains("reads its own heartbeats"));
        assert!(shiva_e2e::task_processes(&cluster.name, "app/x").is_empty(), "held: nobody runs it yet");
    } else {
        wait_until(SETTLE, "the clone runs the task", || {
            let processes = shiva_e2e::task_processes(&cluster.name, "app/x");
            processes.len() == 1 && parent_node_pid(processes[0].0) == Some(clone_pid)
        });
    }
    // The first thaws: two live incarnations of n2.
    cluster.node("n2").signal_group(Signal::SIGCONT);
    // Twelve seconds of samples with no two copies, and as long as it takes (within 40 s, on a
    // machine loaded by the rest of the suite) for `nodes` to show the conflict.
    let thawed = Instant::now();
    let mut conflict_seen = false;
    while thawed.elapsed() < Duration::from_secs(12)
        || !conflict_seen && thawed.elapsed() < Duration::from_secs(40)
    {
        let processes = shiva_e2e::task_processes(&cluster.name, "app/x");
        assert!(processes.len() <= 1, "two copies of app/x run: {processes:?}");
        if !conflict_seen {
            let rows = cluster.ctl.json(&["nodes"]);
            conflict_seen = rows.as_array().unwrap().iter().any(|row| {
                row["id"] == "n2"
                    && row["conflicting_incarnations"].as_array().is_some_and(|others| others.len() == 1)
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(conflict_seen, "nodes shows the conflict within 40 s: {}", cluster.ctl.ok(&["nodes"]));
    if thaw_early {
        wait_until(SETTLE, "the task runs again, once", || {
            shiva_e2e::task_processes(&cluster.name, "app/x").len() == 1
        });
    }
    let human = cluster.ctl.ok(&["nodes"]);
    assert!(human.contains("warning: node id n2 is used by 2 live incarnations"), "{human}");
    let processes = shiva_e2e::task_processes(&cluster.name, "app/x");
    assert_eq!(processes.len(), 1, "the task runs, once: {processes:?}");
    assert!(cluster.node("n2").log_text().contains("another live node heartbeats with this node's id"));
    drop(clone);
}

/// The shiva-node process `pid` descends from, if any.
fn parent_node_pid(pid: i32) -> Option<i32> {
    let mut current = pid;
    for _ in 0..16 {
        let stat = std::fs::read_to_string(format!("/proc/{current}/stat")).ok()?;
        let ppid: i32 = stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
        if comm.trim() == "shiva-node" {
            // The shim is a shiva-node process too (`shiva-node __shim`): skip it.
            let cmdline = std::fs::read_to_string(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
            if !cmdline.contains("__shim") && !cmdline.contains("--shim") {
                return Some(ppid);
            }
        }
        current = ppid;
    }
    None
}

/// Reading a topic from outside the nodes, to prove the broker really compacted it.
mod shiva_e2e_reader {
    use super::*;
    use shiva_bus::{BusConfig, Reader, ReaderEvent};
    use shiva_proto::TopicKind;

    /// Records present in `topic` and the offset one past the last.
    pub fn count(broker: &Broker, cluster: &str, topic: TopicKind) -> (i64, i64) {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let config = BusConfig::new(&broker.url(), cluster, &[]).unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let reader = Reader::spawn(&config, &[topic], tx).unwrap();
            reader.sync(1);
            let (mut records, mut end) = (0, 0);
            while let Some(event) = rx.recv().await {
                match event {
                    ReaderEvent::Record(record) => {
                        records += 1;
                        end = end.max(record.offset + 1);
                    }
                    ReaderEvent::Synced(_) => break,
                    ReaderEvent::SyncFailed(_, message) => panic!("{message}"),
                    ReaderEvent::Regressed { topic, .. } => panic!("{topic} went backwards"),
                    ReaderEvent::Error(_) => {}
                }
            }
            (records, end)
        })
    }
}

/// The CLI a person expects (issue 19, point 7): `--json` on every command that acts or shows,
/// `logs --json` as JSON Lines, shell completions that a shell loads, man pages for every
/// subcommand.
#[test]
fn every_command_answers_json_and_completions_and_man_pages_are_generated() {
    let cluster = Cluster::start("json", 1, &[]);
    cluster.wait_nodes(1);
    let ctl = &cluster.ctl;
    let submitted: serde_json::Value = serde_json::from_str(&ctl.ok(&[
        "submit",
        "--json",
        "--id",
        "app/echo",
        "--",
        "sh",
        "-c",
        "echo one; echo two; sleep 600",
    ]))
    .unwrap();
    assert_eq!(submitted["result"], "submitted", "{submitted}");
    assert_eq!(submitted["revision"], 1, "a new task's own revision is 1, not an offset: {submitted}");
    wait_until(SETTLE, "app/echo runs", || {
        ctl.tasks().get("app/echo").is_some_and(|row| row["state"] == "running")
    });
    for verb in ["kill", "start"] {
        let answer = ctl.json(&[verb, "app/echo"]);
        assert_eq!(answer["command"], verb, "{answer}");
        assert_eq!(answer["records"][0]["key"], "desired/app/echo", "{answer}");
    }
    let mut lines = Vec::new();
    wait_until(SETTLE, "its output is shipped", || {
        lines = ctl.ok(&["logs", "app/echo", "--json"]).lines().map(str::to_owned).collect();
        lines.len() >= 2
    });
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        (first["line"].as_str(), first["stream"].as_str(), first["newline"].as_bool()),
        (Some("one"), Some("stdout"), Some(true))
    );
    assert_eq!(first["node"], "n1");
    ctl.ok(&["submit", "--id", "cron/x", "--schedule", "0 0 1 1 *", "--", "true"]);
    let second = ctl.ok(&["submit", "--id", "cron/x", "--schedule", "0 0 2 1 *", "--", "true"]);
    assert_eq!(second.trim(), "updated cron/x (revision 2)");
    assert!(ctl.ok(&["status", "cron/x"]).contains("revision:    2 (record at offset"));
    for verb in ["run", "suspend", "resume"] {
        assert_eq!(ctl.json(&[verb, "cron/x"])["command"], verb);
    }
    assert_eq!(ctl.json(&["delete", "app/echo"])["records"].as_array().unwrap().len(), 2);
    assert_eq!(ctl.json(&["cordon", "n1"])["mode"], "cordoned");
    assert_eq!(ctl.json(&["uncordon", "n1"])["mode"], "open");
    let nodes = ctl.json(&["nodes"]);
    assert_eq!(nodes[0]["mode"], "open", "{nodes}");
    assert!(nodes[0]["cpus"].as_u64().unwrap() >= 1, "{nodes}");

    // Completions load into bash and know the subcommands; man pages exist for each.
    let script = scratch("completions").join("shiva-ctl.bash");
    std::fs::write(&script, ctl.ok(&["completions", "bash"])).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p shiva-ctl", script.display()))
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    assert!(std::fs::read_to_string(&script).unwrap().contains("drain"));
    let pages = scratch("man");
    ctl.ok(&["man", "--dir", pages.to_str().unwrap()]);
    for page in ["shiva-ctl.1", "shiva-ctl-drain.1", "shiva-ctl-submit.1", "shiva-ctl-logs.1"] {
        let text = std::fs::read_to_string(pages.join(page)).unwrap_or_else(|err| panic!("{page}: {err}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is a man page");
    }
    assert_eq!(ctl.run(&["completions", "tcsh"]).status.code(), Some(2), "an unknown shell is a usage error");
}

/// Declarative specs (issue 19, point 6): `apply -f DIR` of YAML and TOML files starts their
/// tasks; applying again changes nothing (no record, no restart); `diff` names the one changed
/// field and `apply` restarts only that task; `--prune` deletes what the files no longer name,
/// under its prefix only; `export` writes files that `apply` takes back with no change.
#[test]
fn apply_diff_prune_and_export_round_trip_on_a_real_cluster() {
    let cluster = Cluster::start("apply", 1, &[]);
    cluster.wait_nodes(1);
    let ctl = &cluster.ctl;
    let dir = scratch("apply");
    std::fs::write(
        dir.join("web.yaml"),
        "id: site/web\ncommand: sleep\nargs: ['600']\nenv: {COLOUR: blue}\n---\nid: site/api\ncommand: sleep\nargs: ['600']\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("jobs.toml"),
        "[[tasks]]\nid = \"site/cron\"\ncommand = \"true\"\nschedule = \"0 3 * * *\"\n",
    )
    .unwrap();
    ctl.ok(&["submit", "--id", "other/keep", "--", "sleep", "600"]);
    let d = dir.to_str().unwrap();
    let applied = ctl.ok(&["apply", "-f", d]);
    assert_eq!(applied.matches("+ site/").count(), 3, "{applied}");
    let running = |ids: &[&str]| {
        let tasks = ctl.tasks();
        ids.iter()
            .all(|id| tasks.get(*id).is_some_and(|row| row["state"] == "running" && row["pid"].is_number()))
    };
    wait_until(SETTLE, "the applied services run", || running(&["site/web", "site/api"]));
    let pids = |cluster: &Cluster| -> BTreeMap<String, Value> {
        cluster.ctl.tasks().into_iter().map(|(id, row)| (id, row["pid"].clone())).collect()
    };
    let before = pids(&cluster);
    let offsets = ctl.json(&["audit"]).as_array().unwrap().len();
    assert_eq!(ctl.ok(&["apply", "-f", d]).trim(), "no change");
    assert_eq!(
        ctl.json(&["audit"]).as_array().unwrap().len(),
        offsets,
        "an apply without change writes nothing"
    );

    // One field changes: diff names it, apply restarts that task only.
    std::fs::write(
        dir.join("web.yaml"),
        "id: site/web\ncommand: sleep\nargs: ['600']\nenv: {COLOUR: green}\n---\nid: site/api\ncommand: sleep\nargs: ['600']\n",
    )
    .unwrap();
    let diff = ctl.json(&["diff", "-f", d]);
    assert_eq!(diff.as_array().unwrap().len(), 1, "{diff}");
    assert_eq!(diff[0]["id"], "site/web");
    assert_eq!(diff[0]["fields"][0]["field"], "env");
    assert_eq!(diff[0]["fields"][0]["to"]["COLOUR"], "green");
    ctl.ok(&["apply", "-f", d]);
    wait_until(SETTLE, "site/web restarts with its new spec", || {
        let now = pids(&cluster);
        now["site/web"].is_number() && now["site/web"] != before["site/web"]
    });
    assert_eq!(pids(&cluster)["site/api"], before["site/api"], "site/api was not restarted");

    // Prune under site/: the removed file's task goes, other/keep stays.
    std::fs::remove_file(dir.join("jobs.toml")).unwrap();
    let pruned = ctl.ok(&["apply", "-f", d, "--prune", "site"]);
    assert!(pruned.contains("- site/cron"), "{pruned}");
    let tasks = ctl.tasks();
    assert!(!tasks.contains_key("site/cron") && tasks.contains_key("other/keep"), "{tasks:?}");

    // Export, then apply the export: no change.
    let exported = scratch("export").join("all.yaml");
    std::fs::write(&exported, ctl.ok(&["export"])).unwrap();
    assert_eq!(ctl.ok(&["apply", "-f", exported.to_str().unwrap()]).trim(), "no change");
    let toml = scratch("export").join("site.toml");
    std::fs::write(&toml, ctl.ok(&["export", "site", "--format", "toml"])).unwrap();
    assert_eq!(ctl.ok(&["diff", "-f", toml.to_str().unwrap(), "--prune", "site"]).trim(), "no change");

    // A bad file: exit 2, naming the file, the task and the field; nothing written.
    std::fs::write(dir.join("bad.yaml"), "id: site/bad\ncommand: 'true'\nrestart: sometimes\n").unwrap();
    let refused = ctl.run(&["apply", "-f", d]);
    assert_eq!(refused.status.code(), Some(2));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("bad.yaml") && message.contains("restart"), "{message}");
    assert!(!ctl.tasks().contains_key("site/bad"));
}
