//! Node upgrades that restart no task (issue 19, point 1), with real processes on the test
//! broker: a node running ten services, three every-second periodic tasks and a one-shot, from a
//! binary built from an earlier commit, is upgraded in place (the new binary installed over its
//! own, then `kill -HUP`), then killed with SIGKILL and started again on its workspace. Through
//! both, by the kernel's process table, every task keeps its one process (same pid, never a
//! second one), the runs keep their ids and attempts, no slot of the periodic tasks is missed or
//! run twice, and the services' output reaches the logs topic whole (each line once, in
//! order). A node that does not come back has its tasks stopped by their shims when its lease
//! ends, and they move, never running twice.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use shiva_e2e::{
    Broker, Cluster, Ctl, Node, SETTLE, bin, build_of, cluster, scratch, task_processes, wait_until,
};

/// The binary the upgrade starts from: the first commit whose node leaves its runs to their
/// shims and journals its launches (protocol version 1 between node and shim: renewals by lines;
/// this build speaks version 3, its shims sleeping on the node's lease timer, and takes back
/// shims of every version up to its own). Version 2's shims stopped their task when their
/// deadline came during a reload (see docs/protocol.md): not a version to upgrade from.
const FROM: &str = "960fc6ea63cb815e893a60432a22d19e357f85c8";

/// Installs `shiva-node` and `shiva-shim` from `from` into `dir` as a package manager does: each
/// written beside, then renamed over the old file (which running processes keep).
fn install(dir: &Path, from: &Path) {
    for name in ["shiva-node", "shiva-shim"] {
        let next = dir.join(format!(".{name}.new"));
        std::fs::copy(from.join(name), &next).unwrap();
        std::fs::rename(&next, dir.join(name)).unwrap();
    }
}

/// Each listed task's one process: task → pid (panics if one runs twice).
fn pids(cluster: &Cluster, tasks: &[String]) -> BTreeMap<String, Option<i32>> {
    tasks
        .iter()
        .map(|task| {
            let processes = task_processes(&cluster.name, task);
            assert!(processes.len() <= 1, "{task} runs {} times: {processes:?}", processes.len());
            (task.clone(), processes.first().map(|(pid, _)| *pid))
        })
        .collect()
}

/// Watches for `how_long`: every task keeps exactly the process it had.
fn keep_their_processes(cluster: &Cluster, before: &BTreeMap<String, Option<i32>>, how_long: Duration) {
    let tasks: Vec<String> = before.keys().cloned().collect();
    let deadline = Instant::now() + how_long;
    while Instant::now() < deadline {
        let now = pids(cluster, &tasks);
        for (task, pid) in &now {
            assert_eq!(pid, &before[task], "{task}'s process changed (restarted or gone)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many times the node said it took back its earlier process's runs.
fn take_backs(node: &Node) -> usize {
    node.log_text().matches("took back the runs of this node's earlier process").count()
}

/// Each service's (attempt, restarts, generation), as `list` shows them.
fn runs(ctl: &Ctl, tasks: &[String]) -> BTreeMap<String, (Value, Value, Value)> {
    let rows = ctl.tasks();
    tasks
        .iter()
        .map(|task| {
            let row = &rows[task];
            (task.clone(), (row["attempt"].clone(), row["restarts"].clone(), row["generation"].clone()))
        })
        .collect()
}

/// The numbers a counting service printed, as the logs topic has them, and the runs they came
/// from.
fn counted(ctl: &Ctl, task: &str) -> (Vec<u64>, std::collections::BTreeSet<String>) {
    let out = ctl.ok(&["logs", task, "--json"]);
    let mut numbers = Vec::new();
    let mut runs = std::collections::BTreeSet::new();
    for line in out.lines() {
        let chunk: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("{task}: {line}"));
        runs.insert(chunk["run"].as_str().unwrap_or_default().to_owned());
        numbers.extend(
            chunk["line"].as_str().unwrap_or_default().lines().filter_map(|n| n.trim().parse::<u64>().ok()),
        );
    }
    (numbers, runs)
}

#[test]
fn upgrading_a_node_by_reload_and_restarting_it_after_a_kill_restart_none_of_its_tasks() {
    let old = build_of(FROM);
    let dir = scratch("upgrade-bin");
    install(&dir, &old);
    let broker = Broker::start();
    let name = cluster("upgrade");
    let ctl = Ctl::new(&broker, &name);
    // n2 first (it leads), then n1, which alone can run the tasks. n1's lease is long enough
    // for a restart on the test broker (reading the log, a first heartbeat read back).
    let n2 = Node::start(&broker, &name, "n2", &[]);
    let mut cluster = Cluster { broker, name, ctl, nodes: vec![n2] };
    cluster.wait_nodes(1);
    let program = dir.join("shiva-node");
    let n1 = Node::start_program(
        &cluster.broker,
        &cluster.name,
        "n1",
        &["--tags", "up", "--fence-timeout", "6s"],
        &program,
    );
    cluster.nodes.push(n1);
    cluster.wait_nodes(2);

    let marker = format!("E2E={}", cluster.name);
    let services: Vec<String> = (0..10).map(|i| format!("app/s{i}")).collect();
    for task in &services {
        // One process (a shell would fork a `sleep` per line, a second process of the task).
        let count = "import itertools, time\nfor i in itertools.count(1):\n    print(i, flush=True)\n    time.sleep(0.1)";
        cluster
            .ctl
            .ok(&["submit", "--id", task, "--tags", "up", "--env", &marker, "--", "python3", "-c", count]);
    }
    let stamps = scratch("upgrade-stamps");
    let crons: Vec<String> = (0..3).map(|i| format!("cron/c{i}")).collect();
    for task in &crons {
        let script = shiva_e2e::stamping_run(&stamps.join(task.replace('/', "-")));
        // A run started late by the reload (a few hundred ms) may still run at the next slot:
        // `allow`, so each slot's run is judged on its own (with `forbid` the late run's
        // overlap, not the reload, would skip the next one).
        let args = [
            "submit",
            "--id",
            task,
            "--tags",
            "up",
            "--env",
            &marker,
            "--schedule",
            "* * * * * *",
            "--overlap",
            "allow",
        ];
        cluster.ctl.ok(&[&args[..], &["--", "sh", "-c", &script]].concat());
    }
    let once = "once/o".to_owned();
    cluster
        .ctl
        .ok(&["submit", "--id", &once, "--tags", "up", "--env", &marker, "--once", "--", "sleep", "40"]);
    cluster.wait_running_once(&services);
    wait_until(SETTLE, "the one-shot runs", || task_processes(&cluster.name, &once).len() == 1);
    std::thread::sleep(Duration::from_secs(3));
    let mut watched = services.clone();
    watched.push(once.clone());
    let before = pids(&cluster, &watched);
    assert!(before.values().all(Option::is_some), "every task runs: {before:?}");
    let runs_before = runs(&cluster.ctl, &services);
    let start_ns = now_ns();

    // The upgrade: this build's binaries over the old ones, then a reload.
    install(&dir, bin("shiva-node").parent().unwrap());
    let node_pid = cluster.node("n1").pid();
    cluster.node("n1").signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(SETTLE, "n1 takes its runs back after the reload", || take_backs(cluster.node("n1")) == 1);
    // Same process, new binary.
    assert_eq!(cluster.node("n1").pid(), node_pid);
    let running = std::fs::metadata(format!("/proc/{node_pid}/exe")).unwrap().ino();
    assert_eq!(running, std::fs::metadata(&program).unwrap().ino(), "n1 runs the binary installed");
    keep_their_processes(&cluster, &before, Duration::from_secs(6));
    // Across the reload, each service's output on the topic: every line once, in order.
    for task in &services {
        let (numbers, runs) = counted(&cluster.ctl, task);
        assert_eq!(runs.len(), 1, "{task}: one run throughout: {runs:?}");
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert!(numbers.len() > 50, "{task} printed throughout: {} lines", numbers.len());
        assert_eq!(numbers, expected, "{task}: its output is whole, each line once");
    }

    // A crash, and the unit starting it again at once.
    cluster.node("n1").kill9();
    cluster.node("n1").restart();
    wait_until(SETTLE, "n1 takes its runs back after the restart", || take_backs(cluster.node("n1")) == 2);
    keep_their_processes(&cluster, &before, Duration::from_secs(6));
    let end_ns = now_ns();
    assert_eq!(runs(&cluster.ctl, &services), runs_before, "the same runs, attempts and restarts");
    let log = cluster.node("n1").log_text();
    assert!(!log.contains("run shim died"), "{log}");

    // The one-shot ends by itself, as its first attempt.
    wait_until(Duration::from_secs(60), "the one-shot succeeds", || {
        cluster.ctl.tasks().get(&once).is_some_and(|row| row["state"] == "succeeded")
    });
    let history = cluster.ctl.json(&["history", &once]);
    let attempts: Vec<&Value> = history.as_array().unwrap().iter().map(|run| &run["attempt"]).collect();
    assert_eq!(attempts, vec![&Value::from(1)], "one run, attempt 1: {history}");

    // Every slot of the periodic tasks ran once, none missed, across both.
    for task in &crons {
        let stamped = shiva_e2e::stamped_runs(&stamps.join(task.replace('/', "-")));
        let mut per_slot: BTreeMap<String, usize> = BTreeMap::new();
        for (slot, _, from, _, started) in stamped.values() {
            if *started && *from > start_ns && *from < end_ns {
                *per_slot.entry(slot.clone()).or_default() += 1;
            }
        }
        let twice: Vec<_> = per_slot.iter().filter(|(_, count)| **count > 1).collect();
        assert!(twice.is_empty(), "{task}: slots run twice: {twice:?}");
        let seconds: Vec<i64> = per_slot.keys().map(|slot| slot_second(slot)).collect();
        let missed: Vec<i64> =
            seconds.windows(2).filter(|pair| pair[1] - pair[0] != 1).map(|pair| pair[0] + 1).collect();
        assert!(missed.is_empty(), "{task}: slots missed after {missed:?} (ran {seconds:?})");
        assert!(seconds.len() >= 10, "{task} ran throughout: {seconds:?}");
    }

    // Across the crash too, nothing is lost; what the killed process shipped after the last
    // position it noted comes again (at most a batch, documented), in order.
    for task in &services {
        let (numbers, runs) = counted(&cluster.ctl, task);
        assert_eq!(runs.len(), 1, "{task}: one run throughout: {runs:?}");
        let mut seen = std::collections::BTreeSet::new();
        let firsts: Vec<u64> = numbers.iter().copied().filter(|n| seen.insert(*n)).collect();
        let expected: Vec<u64> = (1..=firsts.len() as u64).collect();
        assert!(firsts.len() > 100, "{task} printed throughout: {} lines", firsts.len());
        assert_eq!(firsts, expected, "{task}: its output is whole and in order");
        let again = numbers.len() - firsts.len();
        assert!(again <= 20, "{task}: {again} lines shipped twice (more than a batch)");
    }
}

/// A node killed for good: its shims stop their tasks when its lease ends (never later), and the
/// tasks move to the other node, never running twice.
#[test]
fn a_node_that_does_not_come_back_has_its_tasks_stopped_at_its_lease_end_and_moved() {
    let mut cluster = Cluster::start("upgrade-gone", 2, &[&["--tags", "a"], &["--tags", "a"]]);
    let marker = format!("E2E={}", cluster.name);
    let tasks: Vec<String> = (0..6).map(|i| format!("app/g{i}")).collect();
    for task in &tasks {
        cluster.ctl.ok(&[
            "submit",
            "--id",
            task,
            "--tags",
            "a",
            "--env",
            &marker,
            "--stop-grace",
            "1s",
            "--",
            "sleep",
            "1000",
        ]);
    }
    let placed = cluster.wait_running_once(&tasks);
    let victim = placed.values().next().unwrap().clone();
    let on_victim: Vec<String> =
        placed.iter().filter(|(_, node)| **node == victim).map(|(task, _)| task.clone()).collect();
    let pids = pids(&cluster, &on_victim);
    cluster.node(&victim).kill9();
    let killed = Instant::now();
    // Its tasks go on under their shims while the lease lasts, then stop; never two copies.
    let mut stopped_after = BTreeMap::new();
    while stopped_after.len() < on_victim.len() {
        for task in &on_victim {
            let processes = task_processes(&cluster.name, task);
            assert!(processes.len() <= 1, "{task} runs twice: {processes:?}");
            let old = pids[task].unwrap();
            if !shiva_e2e::pid_alive(old) {
                stopped_after.entry(task.clone()).or_insert(killed.elapsed());
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the shims outlived the lease: {stopped_after:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The node's lease: 2 s (the default fence timeout) from its last heartbeat read back.
    for (task, after) in &stopped_after {
        assert!(*after <= Duration::from_millis(2_600), "{task} stopped {after:?} after the kill");
    }
    let moved = cluster.wait_running_once(&tasks);
    assert!(moved.values().all(|node| *node != victim), "{moved:?}");
    cluster.assert_never_twice(&tasks, Duration::from_secs(2));
}

fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// An RFC 3339 slot (`2026-12-03T18:30:04Z`) in seconds since the epoch.
fn slot_second(slot: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(slot)
        .map(|at| at.timestamp())
        .unwrap_or_else(|_| panic!("slot {slot}"))
}

#[test]
fn a_reload_the_configuration_would_stop_is_refused_and_the_node_goes_on() {
    let broker = Broker::start();
    let name = cluster("reload-check");
    let ctl = Ctl::new(&broker, &name);
    let file = scratch("reload-check").join("node.toml");
    std::fs::write(&file, "tags = [\"a\"]\n").unwrap();
    let node = Node::start(&broker, &name, "n1", &["--config", file.to_str().unwrap()]);
    let mut cluster = Cluster { broker, name, ctl, nodes: vec![node] };
    cluster.wait_nodes(1);
    let pid = cluster.node("n1").pid();
    let reloads = |node: &Node| node.log_text().matches("reloading: the node re-executes itself").count();
    // Edited into a value the next process would refuse (exit 2, which the unit does not
    // restart): refused, and the node goes on as it is.
    // (A key the harness sets no flag for: a flag given would override the file.)
    std::fs::write(&file, "tags = [\"a\"]\nlog-retention = \"100000d\"\n").unwrap();
    cluster.node("n1").signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(SETTLE, "the reload is refused", || {
        cluster
            .node("n1")
            .log_text()
            .contains("reload refused: the next process would refuse its flags or configuration")
    });
    assert!(cluster.node("n1").log_text().contains("--log-retention 273years"));
    assert_eq!(reloads(cluster.node("n1")), 0);
    assert!(shiva_e2e::pid_alive(pid));
    cluster.wait_nodes(1);
    // Mended: the reload goes on, same process.
    std::fs::write(&file, "tags = [\"b\"]\n").unwrap();
    cluster.node("n1").signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(SETTLE, "the reload goes on", || reloads(cluster.node("n1")) == 1);
    assert_eq!(cluster.node("n1").pid(), pid);
    wait_until(SETTLE, "the node carries its new tag", || {
        cluster.ctl.json(&["nodes"]).to_string().contains("\"b\"")
    });
}
