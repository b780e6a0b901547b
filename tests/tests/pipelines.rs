//! The shipped pipelines (`pipelines/`), applied with `shiva-ctl apply` to a real two-node
//! cluster on the real broker: the archiver service, its housekeeping (a periodic task) and the
//! indexing service. The spec files are taken as shipped; only what names this host is rewritten
//! (the bootstrap address, the archive and index paths, the binaries' directory) and the nightly
//! housekeeping slot becomes every 5 seconds.
//!
//! Judged by the archive's own files (`shiva-archiver extract`), the index's own file
//! (`shiva-indexer stats` and `search`) and the kernel's process table (the indexer killed with
//! SIGKILL mid-stream).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use shiva_e2e::{Cluster, bin, kafka_tool as tool, repo, scratch, wait_until};

const DAY_MS: u64 = 86_400_000;

/// A shipped spec file with `replacements` made (each must be found: a changed file fails here).
fn shipped(path: &str, replacements: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(repo().join(path)).expect("shipped spec");
    for (from, to) in replacements {
        assert!(text.contains(from), "{path} no longer holds {from:?}");
        text = text.replace(from, to);
    }
    text
}

/// Every archived record's (partition, offset), and the archive's record count.
fn archived(dest: &str) -> (BTreeSet<(i64, i64)>, usize) {
    let output = Command::new(bin("shiva-archiver"))
        .args(["extract", "--dest", dest, "--topic", "events", "--format", "jsonl"])
        .output()
        .expect("run shiva-archiver extract");
    if !output.status.success() {
        return (BTreeSet::new(), 0);
    }
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    let set =
        lines.iter().map(|l| (l["partition"].as_i64().unwrap(), l["offset"].as_i64().unwrap())).collect();
    (set, lines.len())
}

fn indexer(args: &[&str]) -> Value {
    let output = Command::new(bin("shiva-indexer")).args(args).output().expect("run shiva-indexer");
    assert!(output.status.success(), "shiva-indexer {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn indexed(index: &Path) -> u64 {
    if !index.exists() {
        return 0;
    }
    indexer(&["stats", "--index", index.to_str().unwrap(), "--json"])["records"].as_u64().unwrap_or(0)
}

#[test]
fn the_shipped_archive_housekeeping_and_index_pipelines_run_on_a_cluster_and_survive_a_kill() {
    let cluster = Cluster::start("pipes", 2, &[&["--tags", "archive-disk,index-disk"], &[]]);
    let bootstrap = format!("127.0.0.1:{}", cluster.broker.port);
    tool(&cluster.broker, &["create", "events", "2"]);
    // 200 records from 40 days ago, then 200 of today: the archiver's hourly cut (--max-age 1h)
    // puts them in different files, and the housekeeping deletes the old ones.
    tool(&cluster.broker, &["produce-dated", "events", "2", "0", "200", &(40 * DAY_MS).to_string()]);
    tool(&cluster.broker, &["produce-dated", "events", "2", "200", "400", "0"]);

    let dir = scratch("pipelines");
    let archive = dir.join("archive");
    let index = dir.join("index/events.db");
    let dest = format!("file://{}", archive.display());
    let bin_dir = format!("{}/", bin("shiva-archiver").parent().unwrap().display());
    let common = |extra: Vec<(&'static str, String)>| {
        let mut all = vec![("kafka-1:9092", bootstrap.clone()), ("/usr/bin/", bin_dir.clone())];
        all.extend(extra);
        all
    };
    let archive_spec = shipped(
        "pipelines/archive/events.yaml",
        &common(vec![
            ("file:///var/lib/shiva-archive", dest.clone()),
            // The partial file of a quiet topic after 2 s, not a minute.
            ("- 1m", "- 2s".to_owned()),
            ("\"10 3 * * *\"", "\"*/5 * * * * *\"".to_owned()),
        ]),
    );
    let index_spec = shipped(
        "pipelines/index/events.yaml",
        &common(vec![("/var/lib/shiva-index/events.db", index.display().to_string())]),
    );
    std::fs::write(dir.join("archive.yaml"), &archive_spec).unwrap();
    std::fs::write(dir.join("index.yaml"), &index_spec).unwrap();
    let applied = cluster.ctl.ok(&[
        "apply",
        "-f",
        dir.join("archive.yaml").to_str().unwrap(),
        "-f",
        dir.join("index.yaml").to_str().unwrap(),
    ]);
    for task in ["archive/events", "archive/events-housekeep", "index/events"] {
        assert!(applied.contains(task), "apply named {task}: {applied}");
    }
    // Tags place every pipeline task on n1.
    wait_until(Duration::from_secs(60), "the archiver and the indexer run on n1", || {
        let tasks = cluster.ctl.tasks();
        ["archive/events", "index/events"]
            .iter()
            .all(|t| tasks.get(*t).is_some_and(|row| row["state"] == "running" && row["node"] == "n1"))
    });

    // The archive: every record once; then the housekeeping deletes the 40-day-old files (the
    // newest file of each partition stays, and holds today's records).
    wait_until(Duration::from_secs(90), "the archive holds all 400 records", || archived(&dest).1 >= 400);
    let (set, count) = archived(&dest);
    assert_eq!((set.len(), count), (400, 400), "every record archived exactly once");
    wait_until(Duration::from_secs(90), "the housekeeping deleted the old files", || {
        archived(&dest).1 == 200
    });
    let (set, count) = archived(&dest);
    assert_eq!((set.len(), count), (200, 200), "today's records stay, once each");
    let history = cluster.ctl.json(&["history", "archive/events-housekeep", "--limit", "5"]);
    let runs = history.as_array().cloned().unwrap_or_default();
    assert!(runs.iter().any(|run| run["state"] == "succeeded"), "a housekeeping run succeeded: {history}");

    // The index: every record once, searchable by a word of its own.
    wait_until(Duration::from_secs(60), "the index holds all 400 records", || indexed(&index) >= 400);
    let found = indexer(&["search", "--index", index.to_str().unwrap(), "--json", "token123"]);
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(found["hits"][0]["offset"], 123 / 2, "record 123 is offset 61 of partition 1: {found}");
    assert_eq!(found["hits"][0]["partition"], 1, "{found}");
    assert!(found["hits"][0]["snippet"].as_str().unwrap().contains("[token123]"), "{found}");
    let all = indexer(&["search", "--index", index.to_str().unwrap(), "--json", "--limit", "1", "record"]);
    assert_eq!(all["total"], 400, "{all}");

    // SIGKILL of the indexer while records stream in: Shiva restarts it, and it resumes from
    // what its index committed: nothing lost, nothing indexed twice.
    let producer = {
        let broker_port = cluster.broker.port;
        std::thread::spawn(move || {
            for chunk in 0..8 {
                let (from, to) = (400 + chunk * 100, 500 + chunk * 100);
                let output = Command::new(shiva_e2e::python())
                    .arg(repo().join("tests/kafka_tool.py"))
                    .arg(format!("127.0.0.1:{broker_port}"))
                    .args(["produce-dated", "events", "2", &from.to_string(), &to.to_string(), "0"])
                    .output()
                    .expect("kafka_tool");
                assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    wait_until(Duration::from_secs(60), "the indexer took some of the new records", || indexed(&index) > 450);
    let pid = cluster.ctl.tasks()["index/events"]["pid"].as_i64().expect("the indexer's pid") as i32;
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL the indexer");
    producer.join().expect("producer");
    wait_until(Duration::from_secs(90), "the restarted indexer holds all 1200 records", || {
        indexed(&index) >= 1200
    });
    std::thread::sleep(Duration::from_secs(2));
    let stats = indexer(&["stats", "--index", index.to_str().unwrap(), "--json"]);
    assert_eq!(stats["records"], 1200, "every record once: {stats}");
    assert_eq!(stats["positions"]["0"], 600, "{stats}");
    assert_eq!(stats["positions"]["1"], 600, "{stats}");
    let all = indexer(&["search", "--index", index.to_str().unwrap(), "--json", "--limit", "1", "record"]);
    assert_eq!(all["total"], 1200, "the full-text rows match the records one for one: {all}");
    let restarted = cluster.ctl.tasks()["index/events"].clone();
    assert_ne!(restarted["pid"].as_i64(), Some(pid as i64), "a new process: {restarted}");
    assert_eq!(restarted["state"], "running", "{restarted}");

    // A stop (SIGTERM) commits what was read and exits 0; the task stays stopped.
    cluster.ctl.ok(&["kill", "index/events"]);
    wait_until(Duration::from_secs(30), "the indexer stopped", || {
        cluster.ctl.tasks()["index/events"]["state"] == "stopped"
    });
    assert_eq!(indexed(&index), 1200);
}
