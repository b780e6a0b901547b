//! Bad input on every surface: forged and malformed records on the bus (written with an
//! independent client), invalid specs and flags, an unreachable bus, a missing cluster.

use std::process::Command;
use std::time::Duration;

use shiva_e2e::{
    Broker, Cluster, Ctl, Node, SETTLE, bin, free_port, python, repo, scratch, task_processes, wait_until,
};

#[test]
fn forged_malformed_and_oversized_records_are_skipped_and_never_make_a_non_node_leader() {
    let python = python();
    let cluster = Cluster::start("forge", 3, &[]);
    let (tasks, before) = cluster.run_tasks("e2e/t", 3);
    let leader = cluster.wait_nodes(3);
    let nodes = cluster.ctl.json(&["nodes"]);
    assert!(nodes.as_array().unwrap().iter().any(|n| n["id"] == leader.as_str()));

    // The next epoch is one past the newest claim: read it from a node's log.
    let next_epoch = cluster
        .nodes
        .iter()
        .flat_map(|node| {
            let log = node.log_text();
            log.lines()
                .filter(|line| line.contains("new epoch"))
                .filter_map(|line| {
                    line.split(" epoch=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
        + 1;
    let output = Command::new(&python)
        .arg(repo().join("tests/forge.py"))
        .args([
            &format!("127.0.0.1:{}", cluster.broker.port),
            &cluster.name,
            "n1",
            &next_epoch.to_string(),
            &tasks[0],
        ])
        .output()
        .expect("run forge.py");
    assert!(output.status.success(), "forge.py failed: {}", String::from_utf8_lossy(&output.stderr));

    assert!(next_epoch >= 2, "the newest epoch was read from the logs");
    // The ghost wins the next epoch by being first; with no heartbeat and no leader write it
    // counts as gone within the node timeout and a real node claims the one after.
    wait_until(SETTLE, "a real node leads an epoch after the ghost's", || {
        cluster.nodes.iter().any(|node| {
            node.log_text().lines().any(|line| {
                line.contains("new epoch")
                    && !line.contains("leader=ghost")
                    && line
                        .split(" epoch=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                        > Some(next_epoch)
            })
        })
    });
    let leader_after = cluster.wait_nodes(3);
    assert!(["n1", "n2", "n3"].contains(&leader_after.as_str()), "leader is {leader_after}");
    let after = cluster.wait_running_once(&tasks);
    assert_eq!(before, after, "forged records moved no task");
    let nodes = cluster.ctl.json(&["nodes"]);
    assert!(nodes.as_array().unwrap().iter().all(|n| n["id"] != "ghost" || n["leader"] == false));
    for node in &cluster.nodes {
        let log = node.log_text();
        assert!(log.contains("skipped record"), "node {} logged no skipped record", node.id);
        assert!(!log.contains("panicked"), "node {} panicked:\n{log}", node.id);
    }
    // A malformed or oversized definition fails its own task, visibly, and nothing else.
    let list = cluster.ctl.tasks();
    for (task, why) in [("junk", "malformed"), ("big", "big")] {
        let row = &list[task];
        assert_eq!(row["state"], "failed", "{task}: {row}");
        assert!(row["reason"].as_str().unwrap_or("").contains(why), "{task}: {row}");
    }
}

#[test]
fn invalid_specs_and_flags_exit_2_naming_the_field() {
    let broker = Broker::start();
    let ctl = Ctl::new(&broker, "nocluster");
    let dir = scratch("specs");
    let cases = [
        (r#"{"id":"a","command":"x","colour":"red"}"#, "colour"),
        (r#"{"id":"a/../b","command":"x"}"#, "id"),
        (r#"{"id":"a","command":"x","stop_grace":"-5s"}"#, "stop_grace"),
        (r#"{"id":"a","command":""}"#, "command"),
        (r#"{"id":"a","command":"x","env":{"SHIVA_TASK_ID":"1"}}"#, "env.SHIVA_TASK_ID"),
        ("not json", "expected"),
        (r#"{"id":"a","command":"x","files":{"../etc/passwd":"x"}}"#, "files.../etc/passwd"),
        (r#"{"id":"a","command":"x","files":{"/etc/passwd":"x"}}"#, "files./etc/passwd"),
        (r#"{"id":"a","command":"x","stop_signal":"SIGFOO"}"#, "stop_signal"),
        (r#"{"id":"a","command":"x","memory_max":"lots"}"#, "memory_max"),
        (r#"{"id":"a","command":"x","rlimits":{"files":1}}"#, "rlimits.files"),
    ];
    let big = format!(
        r#"{{"id":"a","command":"x","files":{{"a":"{}","b":"{}"}}}}"#,
        "x".repeat(600_000),
        "y".repeat(600_000)
    );
    let cases: Vec<(&str, &str)> = cases.iter().copied().chain([(big.as_str(), "above the cap")]).collect();
    for (index, (spec, field)) in cases.iter().enumerate() {
        let path = dir.join(format!("spec{index}.json"));
        std::fs::write(&path, spec).unwrap();
        let output = ctl.run(&["submit", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(field), "{spec}: message should name '{field}': {stderr}");
    }
    let flag_cases: [(&[&str], &str); 10] = [
        (&["logs", "a", "--run", "not-a-run"], "--run"),
        (&["submit", "--id", "a", "--schedule", "61 * * * *", "--", "x"], "schedule[0]"),
        (&["submit", "--id", "a", "--schedule", "@hourly", "--timezone", "Mars/Base", "--", "x"], "timezone"),
        (&["submit", "--id", "a", "--schedule", "@hourly", "--catch-up", "most", "--", "x"], "--catch-up"),
        (&["submit", "--id", "a", "--schedule", "@hourly", "--overlap", "maybe", "--", "x"], "--overlap"),
        (&["submit", "--id", "a", "--stop-grace", "-5s", "--", "x"], "--stop-grace"),
        (&["submit", "--id", "a b", "--", "x"], "--id"),
        (&["submit", "--id", "a"], "command"),
        (&["submit", "--id", "a", "--env", "NOEQUALS", "--", "x"], "--env"),
        (&["status", "a/b/c/d/e"], "segments"),
    ];
    for (args, needle) in flag_cases {
        let output = ctl.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: message should name '{needle}': {stderr}");
    }
    assert_eq!(ctl.run(&["frobnicate"]).status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn an_unreachable_bus_or_missing_cluster_exits_3_and_a_node_keeps_retrying() {
    let port = free_port();
    let output = Command::new(bin("shiva-ctl"))
        .args(["--bus", &format!("kafka://127.0.0.1:{port}"), "--timeout", "2s", "list"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the bus"));

    let broker = Broker::start();
    let output = Ctl::new(&broker, "never-started").run(&["list"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not exist") && stderr.contains("shiva-node creates them"), "{stderr}");

    let cluster = Cluster::start("unknown", 1, &[]);
    assert_eq!(cluster.ctl.run(&["kill", "no/such"]).status.code(), Some(1), "a missing task fails with 1");

    let silent = Broker {
        dir: scratch("nobroker"),
        port: free_port(),
        interval: "1s".into(),
        file: false,
        node_flags: Vec::new(),
        advertise: None,
        authentication: false,
    };
    let mut node = Node::start(&silent, "lonely", "n1", &[]);
    std::thread::sleep(Duration::from_secs(5));
    assert!(node.is_running(), "a node without a broker keeps retrying");
    let log = node.log_text();
    assert!(log.contains("bus unreachable") && log.contains("retrying"), "{log}");
    // When the broker appears, the node joins by itself.
    silent.restart();
    let ctl = Ctl::new(&silent, "lonely");
    wait_until(SETTLE, "the node joins once the broker is up", || {
        ctl.try_json(&["nodes"])
            .is_some_and(|nodes| nodes.as_array().is_some_and(|n| n.len() == 1 && n[0]["alive"] == true))
    });
    cluster.submit("x", &[]);
    assert_eq!(cluster.wait_running_once(&["x".to_owned()]).len(), 1);
    assert!(task_processes(&cluster.name, "x").len() == 1);
}

#[test]
fn a_node_refuses_topics_with_several_partitions_or_without_compaction() {
    let python = python();
    let broker = Broker::start();
    let create = |cluster: &str, partitions: u32, policy: &str| {
        let script = format!(
            "from confluent_kafka.admin import AdminClient, NewTopic\n\
             admin = AdminClient({{'bootstrap.servers': '127.0.0.1:{port}'}})\n\
             topics = [NewTopic(f'shiva.{cluster}.{{s}}', num_partitions={partitions}, replication_factor=1, config={{'cleanup.policy': '{policy}'}}) for s in ('commands', 'control', 'assignments', 'status')]\n\
             for future in admin.create_topics(topics).values(): future.result()\n",
            port = broker.port
        );
        let output = Command::new(&python).args(["-c", &script]).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    create("wide", 3, "compact");
    create("deleting", 1, "delete");
    for (cluster, needle) in [("wide", "3 partitions"), ("deleting", "cleanup.policy is 'delete'")] {
        let mut node = Node::start(&broker, cluster, "n1", &[]);
        let status = node.wait_exit(Duration::from_secs(20));
        assert!(!status.success());
        let log = node.log_text();
        assert!(log.contains(needle), "{cluster}: the node should say '{needle}':\n{log}");
    }
}
