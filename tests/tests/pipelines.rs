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
    // 200 records from 40 days ago, 200 from 20 days ago, then 200 of today: the archiver's
    // hourly cut (--max-age 1h) puts them in different files, and the housekeeping
    // (--older-than 30d) deletes the oldest only.
    tool(&cluster.broker, &["produce-dated", "events", "2", "0", "200", &(40 * DAY_MS).to_string()]);
    tool(&cluster.broker, &["produce-dated", "events", "2", "200", "400", &(20 * DAY_MS).to_string()]);
    tool(&cluster.broker, &["produce-dated", "events", "2", "400", "600", "0"]);

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
    let archive_replacements = common(vec![
        ("file:///var/lib/shiva-archive", dest.clone()),
        // The partial file of a quiet topic after 2 s, not a minute.
        ("- 1m", "- 2s".to_owned()),
    ]);
    // First with the shipped nightly slot (no housekeeping during the archive's check).
    let archive_spec = shipped("pipelines/archive/events.yaml", &archive_replacements);
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

    // The archive: every record once. Then the housekeeping, every 5 s (the spec applied again
    // with that slot: a changed spec), deletes the 40-day-old files only: the 20-day-old ones
    // are within the retention, today's are the newest.
    wait_until(Duration::from_secs(90), "the archive holds all 600 records", || archived(&dest).1 >= 600);
    let (all_archived, count) = archived(&dest);
    assert_eq!((all_archived.len(), count), (600, 600), "every record archived exactly once");
    let mut every_5s = archive_replacements.clone();
    every_5s.push(("\"10 3 * * *\"", "\"*/5 * * * * *\"".to_owned()));
    std::fs::write(dir.join("archive.yaml"), shipped("pipelines/archive/events.yaml", &every_5s)).unwrap();
    let changed = cluster.ctl.ok(&["apply", "-f", dir.join("archive.yaml").to_str().unwrap()]);
    assert!(changed.contains("archive/events-housekeep"), "{changed}");
    wait_until(Duration::from_secs(90), "the housekeeping deleted the old files", || {
        archived(&dest).1 == 400
    });
    std::thread::sleep(Duration::from_secs(6));
    let (set, count) = archived(&dest);
    assert_eq!(count, 400, "a later housekeeping run deletes nothing more");
    let young: BTreeSet<(i64, i64)> = (200..600).map(|i: i64| (i % 2, i / 2)).collect();
    assert_eq!(set, young, "the 20-day-old and today's records stay, once each");
    let history = cluster.ctl.json(&["history", "archive/events-housekeep", "--limit", "5"]);
    let runs = history.as_array().cloned().unwrap_or_default();
    assert!(runs.iter().any(|run| run["state"] == "succeeded"), "a housekeeping run succeeded: {history}");

    // The index: every record once, searchable by a word of its own.
    wait_until(Duration::from_secs(60), "the index holds all 600 records", || indexed(&index) >= 600);
    let found = indexer(&["search", "--index", index.to_str().unwrap(), "--json", "token123"]);
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(found["hits"][0]["offset"], 123 / 2, "record 123 is offset 61 of partition 1: {found}");
    assert_eq!(found["hits"][0]["partition"], 1, "{found}");
    assert!(found["hits"][0]["snippet"].as_str().unwrap().contains("[token123]"), "{found}");
    let all = indexer(&["search", "--index", index.to_str().unwrap(), "--json", "--limit", "1", "record"]);
    assert_eq!(all["total"], 600, "{all}");

    // SIGKILL of the indexer while records stream in: Shiva restarts it, and it resumes from
    // what its index committed: nothing lost, nothing indexed twice.
    let producer = {
        let broker_port = cluster.broker.port;
        std::thread::spawn(move || {
            for chunk in 0..8 {
                let (from, to) = (600 + chunk * 100, 700 + chunk * 100);
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
    wait_until(Duration::from_secs(60), "the indexer took some of the new records", || indexed(&index) > 650);
    let pid = cluster.ctl.tasks()["index/events"]["pid"].as_i64().expect("the indexer's pid") as i32;
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL the indexer");
    producer.join().expect("producer");
    wait_until(Duration::from_secs(90), "the restarted indexer holds all 1400 records", || {
        indexed(&index) >= 1400
    });
    std::thread::sleep(Duration::from_secs(2));
    let stats = indexer(&["stats", "--index", index.to_str().unwrap(), "--json"]);
    assert_eq!(stats["records"], 1400, "every record once: {stats}");
    assert_eq!(stats["positions"]["0"], 700, "{stats}");
    assert_eq!(stats["positions"]["1"], 700, "{stats}");
    let all = indexer(&["search", "--index", index.to_str().unwrap(), "--json", "--limit", "1", "record"]);
    assert_eq!(all["total"], 1400, "the full-text rows match the records one for one: {all}");
    // Resumed from what the index committed: nothing was read and offered to the index twice
    // (the unique key would hide a resume from the start; the indexer says when it drops one).
    let logs = cluster.ctl.ok(&["logs", "index/events"]);
    assert!(logs.contains("resuming"), "the restart's log: {logs}");
    assert!(!logs.contains("already in the index"), "a resume from the committed positions: {logs}");
    let restarted = cluster.ctl.tasks()["index/events"].clone();
    assert_ne!(restarted["pid"].as_i64(), Some(pid as i64), "a new process: {restarted}");
    assert_eq!(restarted["state"], "running", "{restarted}");

    // A stop (SIGTERM) commits what was read and exits 0; the task stays stopped.
    cluster.ctl.ok(&["kill", "index/events"]);
    wait_until(Duration::from_secs(30), "the indexer stopped", || {
        cluster.ctl.tasks()["index/events"]["state"] == "stopped"
    });
    assert_eq!(indexed(&index), 1400);
    let logs = cluster.ctl.ok(&["logs", "index/events"]);
    assert!(
        logs.contains("stopped: every record read is in the index"),
        "SIGTERM: committed, then exit 0: {logs}"
    );
}

/// Bad input to `shiva-indexer` gets exit 2 naming what is wrong; records deleted from Kafka
/// while the indexer runs (frozen meanwhile, so that it cannot read them first) stop it with
/// exit 3 naming them, instead of leaving a partition that silently stops moving.
#[test]
fn the_indexer_refuses_bad_input_by_name_and_stops_with_exit_3_when_records_it_needs_are_deleted() {
    let broker = shiva_e2e::Broker::start();
    let dir = scratch("indexer-input");
    let index = dir.join("t.db");
    let index_arg = index.to_str().unwrap().to_owned();
    // Records older than 3 s are deleted by the broker (the test broker has no DeleteRecords).
    tool(&broker, &["create", "gone", "1", "3000"]);
    tool(&broker, &["produce-dated", "gone", "1", "0", "100", "0"]);
    let log = std::fs::File::create(dir.join("indexer.log")).unwrap();
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let mut child = Command::new(bin("shiva-indexer"))
        .args(["run", "--bootstrap", &bootstrap, "--topic", "gone", "--index", &index_arg])
        .stderr(log)
        .spawn()
        .expect("start shiva-indexer");
    wait_until(Duration::from_secs(60), "100 records indexed", || indexed(&index) == 100);

    let refused = |args: &[&str], says: &str| {
        let output = Command::new(bin("shiva-indexer")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} names the problem ({says}): {stderr}");
    };
    refused(&["search", "--index", &index_arg, "\"unclosed"], "invalid query");
    refused(&["search", "--index", &index_arg, "nosuchcolumn:word"], "invalid query");
    refused(&["search", "--index", "/etc/passwd", "word"], "/etc/passwd is not a Shiva index");
    refused(&["search", "--index", &index_arg, "--limit", "0", "word"], "--limit");
    refused(
        &["run", "--bootstrap", &bootstrap, "--topic", "other", "--index", &index_arg],
        "indexes topic 'gone', not 'other'",
    );
    let other = dir.join("other.db").to_str().unwrap().to_owned();
    refused(
        &["run", "--bootstrap", &bootstrap, "--topic", "gone", "--index", &other, "--batch-bytes", "10"],
        "--batch-bytes",
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP).unwrap();
    tool(&broker, &["produce-dated", "gone", "1", "100", "200", "0"]);
    std::thread::sleep(Duration::from_secs(8));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the indexer went on after records it needed were deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(dir.join("indexer.log")).unwrap();
    assert_eq!(status.code(), Some(3), "{text}");
    // Records deleted below the position, or (the test broker, once retention took every
    // record) a log that ends below it: either way the message names the partition and offset.
    assert!(
        text.contains("gone/0: records 100..") || text.contains("gone/0: the index ends at offset 100"),
        "the message names the first offset missing: {text}"
    );
    assert!(text.contains("before they were indexed; stopping instead of skipping them"), "{text}");
    assert_eq!(indexed(&index), 100, "nothing past the gap was indexed");
}
