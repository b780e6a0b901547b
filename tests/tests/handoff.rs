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
    let script = format!(
        "stamp() {{ echo \"$1 $SHIVA_RUN_ID $SHIVA_NODE_ID $(date +%s%N)\" >> {log}; }}; \
         trap 'for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do stamp tick; sleep 0.2; done; stamp stop; exit 0' TERM; \
         stamp start; while :; do stamp tick; sleep 0.05; done",
        log = log.display()
    );
    json!({
        "id": "app/slow",
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
