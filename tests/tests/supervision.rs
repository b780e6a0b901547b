//! Supervision end to end (real broker, real node processes): no process of a task survives
//! `kill`, a killed node, a killed shim or a node restart; a frozen node's exclusive task is
//! killed by its shim before its copy starts elsewhere, and never overlaps with it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use shiva_e2e::{Cluster, SETTLE, pid_alive, scratch, task_processes, wait_until};

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

/// The run shims among the children of `node`.
fn shims_of(node: i32) -> Vec<i32> {
    let children = std::fs::read_to_string(format!("/proc/{node}/task/{node}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).nth(1) == Some(b"__shim".as_slice())
        })
        .collect()
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

    // The service comes back (a new run); then its node dies.
    let pids = three_processes(&cluster, "app/escape");
    cluster.nodes[0].kill9();
    all_gone(&pids, "after kill -9 of its node");

    // Back again; this time the shim cannot act (stopped) when its node dies, so the run is a
    // leftover that the restarted node must find and stop.
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
    assert!(!pid_alive(shims[0]), "the leftover shim is gone too");
    let log = cluster.nodes[0].log_text();
    assert!(log.contains("stopped runs left by an earlier incarnation"), "{log}");
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
    let mut spans: Vec<(u128, u128, String)> = intervals(log)
        .into_iter()
        .map(|(run, (node, from, to))| (from, to, format!("{run} on {node}")))
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 < pair[1].0,
            "two copies overlapped: {} until {} and {} from {}",
            pair[0].2,
            pair[0].1,
            pair[1].2,
            pair[1].0
        );
    }
}

#[test]
fn a_frozen_node_fences_itself_before_its_task_starts_elsewhere() {
    let tagged: &[&str] = &["--fence-timeout", "1s", "--tags", "x"];
    let mut cluster = Cluster::start("fence", 3, &[FENCE, tagged, tagged]);
    let log = scratch("fence").join("ticks.log");
    submit(&cluster, ticking(&cluster, "app/tick", &log));
    let mut holder = String::new();
    wait_until(SETTLE, "the task runs", || {
        let processes = task_processes(&cluster.name, "app/tick");
        holder = processes.first().map(|(_, node)| node.clone()).unwrap_or_default();
        processes.len() == 1
    });
    let other = if holder == "n2" { "n3" } else { "n2" }.to_owned();
    cluster.node(&holder).signal(Signal::SIGSTOP);
    wait_until(SETTLE, "the task runs on the other node", || {
        task_processes(&cluster.name, "app/tick").iter().any(|(_, node)| *node == other)
    });
    cluster.assert_never_twice(&["app/tick".to_owned()], Duration::from_secs(2));
    cluster.node(&holder).signal(Signal::SIGCONT);
    // Back on the bus, the node learns the task moved and does not start it again.
    cluster.assert_never_twice(&["app/tick".to_owned()], Duration::from_secs(5));
    let processes = task_processes(&cluster.name, "app/tick");
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert_eq!(processes[0].1, other, "the copy stays where it moved");
    let runs = intervals(&log);
    assert_eq!(runs.len(), 2, "one run on each node: {runs:?}");
    assert_no_overlap(&log);
    let fenced = cluster.node(&holder).log_text();
    assert!(fenced.contains("cut off from the bus"), "{fenced}");
}
