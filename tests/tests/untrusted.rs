//! No input takes the cluster down: specs out of range refused at the door (exit 2) and, written
//! straight to the log by an independent client, failing only their own task; internal errors
//! contained at their task; oversized specs; a 1 MiB environment off every command line; a
//! second node on a live node's workspace; a topic that goes backwards.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shiva_e2e::{Cluster, Node, SETTLE, bin, pid_alive, python, repo, scratch, task_processes, wait_until};

/// Runs `tests/raw_record.py` (confluent-kafka) against the cluster's broker.
fn raw(cluster: &Cluster, args: &[&str]) {
    let output = Command::new(python())
        .arg(repo().join("tests/raw_record.py"))
        .arg(format!("127.0.0.1:{}", cluster.broker.port))
        .args(args)
        .output()
        .expect("run raw_record.py");
    assert!(output.status.success(), "raw_record {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Writes `spec` (JSON text) as `task/<id>` on the commands topic, as another client could.
fn write_spec_raw(cluster: &Cluster, id: &str, spec: &str) {
    let envelope = format!(r#"{{"v":1,"kind":"task","sender":"ctl:other","sent_at_ms":0,"body":{spec}}}"#);
    let file = scratch("raw").join("value.json");
    std::fs::write(&file, envelope).unwrap();
    let topic = format!("shiva.{}.commands", cluster.name);
    raw(cluster, &["produce", &topic, &format!("task/{id}"), file.to_str().unwrap()]);
}

/// Submits `spec` with `shiva-ctl submit FILE`.
fn submit_file(cluster: &Cluster, spec: &str) -> std::process::Output {
    let file = scratch("spec").join("spec.json");
    std::fs::write(&file, spec).unwrap();
    cluster.ctl.run(&["submit", file.to_str().unwrap()])
}

fn assert_nodes_up(cluster: &mut Cluster) {
    for node in &mut cluster.nodes {
        let id = node.id.clone();
        assert!(node.is_running(), "node {id} exited:\n{}", node.log_text());
    }
}

/// Waits until `task` runs exactly once (per the kernel's process table), within `timeout`.
fn wait_running(cluster: &Cluster, task: &str, timeout: Duration) {
    wait_until(timeout, &format!("{task} running"), || {
        cluster.ctl.tasks().get(task).is_some_and(|row| row["state"] == "running")
            && task_processes(&cluster.name, task).len() == 1
    });
}

/// (extra spec fields, the field the error must name): huge and zero durations, huge back-off,
/// huge counts, every duration field.
const EXTREMES: [(&str, &str); 14] = [
    (r#""schedule":["* * * * * *"],"catch_up":"latest","starting_deadline":"1000000y""#, "starting_deadline"),
    (r#""stop_grace":"100000h""#, "stop_grace"),
    (r#""schedule":["* * * * * *"],"jitter":"1000y""#, "jitter"),
    (r#""schedule":["* * * * * *"],"max_runtime":"0s""#, "max_runtime"),
    (r#""once":true,"max_runtime":"1000000y""#, "max_runtime"),
    (r#""once":true,"backoff":{"initial":"1s","max":"1000000y"}"#, "backoff.max"),
    (r#""once":true,"backoff":{"multiplier":1e300}"#, "backoff.multiplier"),
    (r#""schedule":["* * * * * *"],"catch_up":"all","max_catch_up":4294967295"#, "max_catch_up"),
    (r#""schedule":["* * * * * *"],"max_catch_up":18446744073709551615"#, "max_catch_up"),
    (r#""once":true,"max_attempts":4000000000"#, "max_attempts"),
    (r#""max_restarts":4294967295"#, "max_restarts"),
    (r#""restart_window":"0s""#, "restart_window"),
    (r#""restart_window":"100000y""#, "restart_window"),
    (r#""stable_after":"100000y""#, "stable_after"),
];

#[test]
fn extreme_specs_are_refused_at_the_door_and_fail_only_their_task_when_written_to_the_log() {
    let faults = ["--fault-panic", "plan:fault/plan,run:fault/run,run:fault/once"];
    let mut cluster = Cluster::start("untrusted", 3, &[&faults, &faults, &faults]);
    let leader = cluster.wait_nodes(3);

    // The issue's command, `echo '…' | shiva-ctl submit -`: refused, naming the field, the value
    // and the range.
    let issue = r#"{"id":"x","command":"sleep","args":["1"],"schedule":["* * * * * *"],"catch_up":"latest","starting_deadline":"1000000y"}"#;
    let mut child = Command::new(bin("shiva-ctl"))
        .args(["--bus", &cluster.broker.url(), "--cluster", &cluster.name, "submit", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), issue.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'starting_deadline': 1000000years is out of range: from 0s to 5years"),
        "{stderr}"
    );
    // The same spec, straight to the log.
    write_spec_raw(&cluster, "x", &issue.replace(r#""args":["1"]"#, r#""args":["1000"]"#));

    for (index, (fields, field)) in EXTREMES.iter().enumerate() {
        let spec = format!(r#"{{"id":"bad/{index}","command":"sleep","args":["1000"],{fields}}}"#);
        let output = submit_file(&cluster, &spec);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(field), "{spec}: the error should name {field}: {stderr}");
        write_spec_raw(&cluster, &format!("bad/{index}"), &spec);
    }

    // Oversized: 11 variables of control characters, 6 bytes each in JSON: a record under the
    // 4 MiB limit, but not its assignment.
    let value = "\\u0001".repeat(63_030);
    let vars: Vec<String> = (0..11).map(|i| format!(r#""V{i}":"{value}""#)).collect();
    let big = format!(r#"{{"id":"big","command":"sleep","args":["1000"],"env":{{{}}}}}"#, vars.join(","));
    assert!((4_130_000..4_190_000).contains(&big.len()), "{} bytes", big.len());
    let output = submit_file(&cluster, &big);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("too large") && stderr.contains("bytes, above the limit of"), "{stderr}");
    write_spec_raw(&cluster, "big", &big);

    // Every node stays up; each task is failed with a reason naming its field.
    let expected: Vec<(String, &str)> = std::iter::once(("x".to_owned(), "starting_deadline"))
        .chain(EXTREMES.iter().enumerate().map(|(index, (_, field))| (format!("bad/{index}"), *field)))
        .chain(std::iter::once(("big".to_owned(), "too large")))
        .collect();
    wait_until(SETTLE, "every extreme spec's task failed with its reason", || {
        let rows = cluster.ctl.tasks();
        expected.iter().all(|(task, field)| {
            rows.get(task).is_some_and(|row| {
                row["state"] == "failed"
                    && row["reason"].as_str().is_some_and(|reason| reason.contains(field))
            })
        })
    });
    let status = cluster.ctl.json(&["status", "bad/0"]);
    assert_eq!(status["state"], "failed", "{status}");
    assert_nodes_up(&mut cluster);

    // A new task is placed within 5 s.
    let started = Instant::now();
    cluster.submit("after/ok", &[]);
    wait_running(&cluster, "after/ok", Duration::from_secs(5));
    eprintln!("a new task ran {:?} after submit", started.elapsed());
    // An invalid task can be deleted like any other.
    cluster.ctl.ok(&["delete", "bad/1"]);
    // An invalid revision of a running task: the running copy stops, the task shows failed.
    write_spec_raw(&cluster, "after/ok", r#"{"id":"after/ok","command":"sleep","stop_grace":"100000h"}"#);
    wait_until(SETTLE, "the running revision stopped and the task failed", || {
        task_processes(&cluster.name, "after/ok").is_empty()
            && cluster.ctl.tasks().get("after/ok").is_some_and(|row| {
                row["state"] == "failed" && row["reason"].as_str().is_some_and(|r| r.contains("stop_grace"))
            })
    });

    // Internal errors: a panic while planning one task, and one while running another, fail
    // those tasks (visible in status), the leader keeps its role, the other tasks run.
    let service = |id: &str| {
        format!(r#"{{"id":"{id}","command":"sleep","args":["1000"],"env":{{"E2E":"{}"}}}}"#, cluster.name)
    };
    for id in ["fault/plan", "fault/run", "fault/fine"] {
        let output = submit_file(&cluster, &service(id));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    wait_until(SETTLE, "both fault victims failed with an internal error", || {
        let rows = cluster.ctl.tasks();
        ["fault/plan", "fault/run"].iter().all(|task| {
            rows.get(*task).is_some_and(|row| {
                row["state"] == "failed"
                    && row["reason"]
                        .as_str()
                        .is_some_and(|reason| reason.starts_with("internal error: fault hook"))
            })
        })
    });
    wait_running(&cluster, "fault/fine", SETTLE);
    // A panic in a one-shot's run fails that run, visibly in its history; the node stays.
    let once = r#"{"id":"fault/once","command":"true","once":true,"max_attempts":1}"#;
    let output = submit_file(&cluster, once);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_until(SETTLE, "the one-shot's run failed with an internal error", || {
        cluster.ctl.try_json(&["history", "fault/once"]).is_some_and(|runs| {
            runs.as_array().is_some_and(|runs| {
                runs.iter().any(|run| {
                    run["state"] == "failed"
                        && run["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("internal error: fault hook"))
                })
            })
        })
    });
    let status = cluster.ctl.ok(&["status", "fault/plan"]);
    assert!(status.contains("internal error: fault hook"), "{status}");
    assert_eq!(cluster.wait_nodes(3), leader, "the leader kept its role");
    assert_nodes_up(&mut cluster);
    assert!(task_processes(&cluster.name, "fault/run").is_empty(), "the failed task does not run");
    // No crash loop on the log: a node started now reads every record above and stays up.
    let mut late = Node::start(&cluster.broker, &cluster.name, "n4", &faults);
    cluster.wait_nodes(4);
    std::thread::sleep(Duration::from_secs(2));
    assert!(late.is_running(), "a new node reading the log stays up:\n{}", late.log_text());
    let rows = cluster.ctl.tasks();
    assert_eq!(rows["fault/plan"]["state"], "failed", "still failed, not planned again");
}

/// A task whose environment totals 1 MiB runs, sees all of it, and no process shows a value of
/// it on its command line; a single variable over the kernel's 128 KiB cap is refused.
#[test]
fn a_one_mib_environment_runs_and_is_on_no_command_line() {
    let cluster = Cluster::start("bigenv", 1, &[]);
    let dir = scratch("bigenv");
    let out = dir.join("env-size");
    let mut env = serde_json::Map::new();
    env.insert("E2E".into(), Value::String(cluster.name.clone()));
    for index in 0..16 {
        env.insert(
            format!("BIG_{index}"),
            Value::String(format!("hush-{index}-{}", "h".repeat(64 * 1024 - 16))),
        );
    }
    let script = format!("env | wc -c > {out}.tmp; mv {out}.tmp {out}; exec sleep 1000", out = out.display());
    let spec = serde_json::json!({"id": "big/env", "command": "sh", "args": ["-c", script], "env": env});
    let text = spec.to_string();
    assert!(text.len() > 1 << 20);
    let output = submit_file(&cluster, &text);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_running(&cluster, "big/env", SETTLE);
    wait_until(SETTLE, "the task wrote its environment's size", || out.exists());
    let bytes: usize = std::fs::read_to_string(&out).unwrap().trim().parse().unwrap();
    assert!(bytes >= 1 << 20, "the task sees its whole environment: {bytes} bytes");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        assert!(
            !cmdline.windows(7).any(|window| window == b"hush-0-"),
            "process {:?} shows the task's environment on its command line",
            entry.file_name()
        );
    }
    // One variable over the kernel's cap on one string: refused, naming it.
    let long =
        serde_json::json!({"id": "big/one", "command": "true", "env": {"HUGE": "h".repeat(128 * 1024)}});
    let output = submit_file(&cluster, &long.to_string());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("env.HUGE"), "{stderr}");
}

/// A second node started on a live node's workspace refuses before it touches any process: the
/// live node's task keeps its pid.
#[test]
fn a_second_node_on_a_live_workspace_refuses_and_touches_nothing() {
    let mut cluster = Cluster::start("twin", 1, &[]);
    cluster.submit("twin/task", &[]);
    wait_running(&cluster, "twin/task", SETTLE);
    let before = task_processes(&cluster.name, "twin/task");
    // The same id and workspace, as a mistaken second unit or a copy-pasted command line.
    let workspace = cluster.nodes[0].workspace.display().to_string();
    let output = Command::new(bin("shiva-node"))
        .args(["--bus", &cluster.broker.url(), "--cluster", &cluster.name, "--node-id", "n1"])
        .args(["--workspace", &workspace])
        .output()
        .expect("run a second shiva-node");
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "the twin refuses: {log}");
    assert!(log.contains("is in use by another running node"), "{log}");
    assert!(!log.contains("stopped runs left"), "{log}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(task_processes(&cluster.name, "twin/task"), before, "the live node's run is untouched");
    assert!(pid_alive(before[0].0));
    assert_nodes_up(&mut cluster);
}

/// A topic whose end falls below a running node's read position (the broker lost its tail): the
/// node stops with an error naming the topic and the offsets, instead of skipping every new
/// record.
#[test]
fn a_topic_that_goes_backwards_stops_the_node_with_an_error_naming_it() {
    let mut cluster = Cluster::start("backwards", 1, &[]);
    for index in 0..3 {
        cluster.submit(&format!("back/{index}"), &[]);
    }
    wait_running(&cluster, "back/2", SETTLE);
    // The broker loses the tail of the commands topic (a restore from an older backup): only
    // its first record remains.
    let topic = format!("shiva.{}.commands", cluster.name);
    cluster.broker.kill9();
    let script = "import sqlite3, sys\n\
        db = sqlite3.connect(sys.argv[1])\n\
        (tp,) = db.execute('select topition.id from topition join topic on topic.id = topition.topic where topic.name = ?', (sys.argv[2],)).fetchone()\n\
        db.execute('delete from header where topition = ? and offset_id >= 1', (tp,))\n\
        db.execute('delete from record where topition = ? and offset_id >= 1', (tp,))\n\
        db.execute('update watermark set high = 1 where topition = ?', (tp,))\n\
        db.commit()\n";
    let db = cluster.broker.dir.join("tansu.db");
    let output = Command::new("python3").args(["-c", script, db.to_str().unwrap(), &topic]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    cluster.broker.restart();
    let status = cluster.nodes[0].wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the node stops");
    let log = cluster.nodes[0].log_text();
    assert!(log.contains(&format!("topic {topic} went backwards")), "{log}");
    assert!(log.contains("its end is offset 1, but records up to offset"), "{log}");
    wait_until(Duration::from_secs(10), "the node's runs stopped with it", || {
        task_processes(&cluster.name, "back/0").is_empty()
    });
}
