//! The archiver's figures:
//!
//! * the pipeline alone, on one thread: records already in memory → cut → encode → zstd →
//!   publish (write, fsync, link, fsync) to a local directory, no Kafka;
//! * end to end on the broker, next to the naive pipeline a user would write by hand;
//! * the crash matrix: SIGKILLs at random moments, then every record looked up.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shiva_archiver::cut::{Batch, Limits};
use shiva_archiver::dest::FileDest;
use shiva_archiver::format::{Codec, Record, encode_file};
use shiva_e2e::{Broker, bin, kafka_tool, produced_value, python, repo, scratch};

/// Synthetic access-log lines, about 135 bytes each, varied enough not to compress trivially.
fn records(count: usize) -> Vec<Record> {
    let paths =
        ["/api/v1/orders", "/api/v1/users/42/profile", "/static/app.js", "/health", "/api/v2/search?q=shiva"];
    let agents = [
        "curl/8.5.0",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "okhttp/4.12.0",
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    (0..count)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let line = format!(
                "10.{}.{}.{} - - [01/Dec/2026:15:{:02}:{:02} +0000] \"GET {} HTTP/1.1\" {} {} \"-\" \"{}\" rt={}.{:03}",
                state % 256,
                (state >> 8) % 256,
                (state >> 16) % 256,
                (i / 60) % 60,
                i % 60,
                paths[(state >> 24) as usize % paths.len()],
                [200, 200, 200, 304, 404, 500][(state >> 32) as usize % 6],
                (state >> 40) % 100_000,
                agents[(state >> 48) as usize % agents.len()],
                (state >> 52) % 3,
                (state >> 20) % 1000
            );
            Record {
                offset: i as i64,
                timestamp: Some(1_796_000_000_000 + i as i64),
                key: None,
                headers: vec![],
                value: Some(line.into_bytes()),
            }
        })
        .collect()
}

/// (raw MB/s, records/s, compression ratio) for `count` records with `codec`, encrypted to one
/// fresh age recipient when `encrypt`.
pub fn pipeline(dir: &std::path::Path, count: usize, codec: Codec, encrypt: bool) -> (f64, f64, f64) {
    let recipients: Vec<age::x25519::Recipient> =
        if encrypt { vec![age::x25519::Identity::generate().to_public()] } else { Vec::new() };
    let input = records(count);
    let dest = FileDest::from_url(&format!("file://{}", dir.display())).unwrap();
    dest.prepare("bench", &[0]).unwrap();
    let limits = Limits { max_bytes: 64 << 20, max_records: u64::MAX, max_age_ms: None };
    let started = Instant::now();
    let (mut raw, mut written) = (0u64, 0u64);
    let mut batch = Batch::default();
    let mut start = 0;
    let mut publish = |records: Vec<Record>, next: i64, start: &mut i64| {
        let encoded = encode_file("bench", 0, *start, &records, next, codec, &recipients);
        written += encoded.bytes.len() as u64;
        dest.publish(&encoded).unwrap();
        *start = next;
    };
    for record in input {
        raw += record.raw_len() as u64;
        if !batch.fits(&record, &limits) {
            publish(batch.take(), record.offset, &mut start);
        }
        batch.push(record);
    }
    let next = count as i64;
    publish(batch.take(), next, &mut start);
    let seconds = started.elapsed().as_secs_f64();
    (raw as f64 / seconds / 1e6, count as f64 / seconds, raw as f64 / written as f64)
}

fn archiver(broker: &Broker, dest: &Path, topic: &str, extra: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(bin("shiva-archiver"))
        .args(["run", "--bootstrap", &format!("127.0.0.1:{}", broker.port), "--topic", topic])
        .arg("--dest")
        .arg(format!("file://{}", dest.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start shiva-archiver")
}

/// Files published under `dest` (their sidecars, written last).
fn published(dest: &Path) -> usize {
    let Ok(topics) = std::fs::read_dir(dest) else { return 0 };
    topics
        .flatten()
        .filter(|t| t.file_name() != ".staging")
        .flat_map(|t| std::fs::read_dir(t.path()).into_iter().flatten().flatten())
        .flat_map(|p| std::fs::read_dir(p.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".meta.json"))
        .count()
}

/// End to end on the broker, `count` access-log records over 4 partitions, read from the start:
/// the naive pipeline (a plain consume loop on librdkafka printing values, piped through
/// `zstd -1`) against `shiva-archiver run`, alternated `rounds` times. Rows of (who, seconds),
/// each from its start until its last byte is written (the archiver's last file published).
pub fn end_to_end(broker: &Broker, count: usize, rounds: usize) -> Vec<(String, f64)> {
    const PER_FILE: usize = 25_000;
    assert!(count.is_multiple_of(4 * PER_FILE), "whole files per partition");
    kafka_tool(broker, &["create", "lines", "4"]);
    kafka_tool(broker, &["produce-lines", "lines", "4", &count.to_string()]);
    let mut rows = Vec::new();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_secs(2));
        let out = scratch("naive").join("lines.zst");
        let shell = format!(
            "{} {} 127.0.0.1:{} dump lines 4 {count} | zstd -1 -q -o {}",
            python(),
            repo().join("tests/kafka_tool.py").display(),
            broker.port,
            out.display()
        );
        let started = Instant::now();
        let status = Command::new("sh").args(["-c", &shell]).status().unwrap();
        assert!(status.success(), "the naive pipeline failed");
        rows.push((
            format!("naive: consume loop piped to zstd -1 (round {})", round + 1),
            started.elapsed().as_secs_f64(),
        ));
        std::thread::sleep(Duration::from_secs(2));
        let dir = scratch("e2e-archive");
        let dest = dir.join("out");
        // Files of 25,000 records (3.4 MB raw): the last one is published with the last record.
        let files = count.div_ceil(PER_FILE);
        let started = Instant::now();
        let extra = ["--max-records", &PER_FILE.to_string(), "--idle-publish", "60s"];
        let mut child = archiver(broker, &dest, "lines", &extra, &dir.join("log"));
        while published(&dest) < files {
            std::thread::sleep(Duration::from_millis(20));
        }
        let seconds = started.elapsed().as_secs_f64();
        child.kill().unwrap();
        child.wait().unwrap();
        rows.push((format!("shiva-archiver run, zstd-1, exactly once (round {})", round + 1), seconds));
    }
    rows
}

/// What a crash matrix found.
pub struct Crashes {
    pub kills: usize,
    pub produced: usize,
    pub lost: usize,
    pub twice: usize,
    pub files: usize,
    pub seconds: f64,
}

/// `kills` SIGKILLs of the archiver at random moments (50 ms to 1.5 s after its start, with
/// `--max-records 50`, so many land mid-publish) while records are produced; then a last run
/// catches up and every record is looked up: lost, or archived more than once.
pub fn crash_matrix(broker: &Broker, kills: usize) -> Crashes {
    const PARTITIONS: usize = 4;
    let started = Instant::now();
    kafka_tool(broker, &["create", "crash", &PARTITIONS.to_string()]);
    let dir = scratch("crash");
    let dest = dir.join("out");
    let log = dir.join("archiver.log");
    let step = 500;
    let mut produced = 0;
    let mut state = std::process::id() as u64;
    let args = ["--max-records", "50", "--idle-publish", "300ms"];
    for round in 0..kills {
        if round % 10 == 0 {
            let (from, to) = (produced.to_string(), (produced + step).to_string());
            kafka_tool(broker, &["produce", "crash", &PARTITIONS.to_string(), &from, &to]);
            produced += step;
        }
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(50 + (state >> 33) % 1450);
        let mut child = archiver(broker, &dest, "crash", &args, &log);
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        // The broker still serves the dead archiver's fetches for a moment.
        std::thread::sleep(Duration::from_millis(300));
        if (round + 1) % 100 == 0 {
            eprintln!("crash matrix: {} kills, {produced} records produced", round + 1);
        }
    }
    let mut child = archiver(broker, &dest, "crash", &args, &log);
    let extract = || {
        Command::new(bin("shiva-archiver"))
            .args(["extract", "--format", "jsonl", "--topic", "crash"])
            .arg("--dest")
            .arg(format!("file://{}", dest.display()))
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut lines;
    loop {
        let output = extract();
        lines = String::from_utf8_lossy(&output.stdout).into_owned();
        if lines.lines().count() >= produced || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    child.wait().unwrap();
    let mut seen = std::collections::HashMap::<(i64, i64), usize>::new();
    let mut wrong = 0;
    for line in lines.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let (partition, offset) = (record["partition"].as_i64().unwrap(), record["offset"].as_i64().unwrap());
        let i = offset as usize * PARTITIONS + partition as usize;
        let value = match &record["value"] {
            serde_json::Value::String(text) => text.as_bytes().to_vec(),
            other => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(other["base64"].as_str().unwrap()).unwrap()
            }
        };
        if value != produced_value(i) {
            wrong += 1;
        }
        *seen.entry((partition, offset)).or_default() += 1;
    }
    assert_eq!(wrong, 0, "archived values differ from the produced ones");
    let lost = (0..produced)
        .filter(|i| !seen.contains_key(&((i % PARTITIONS) as i64, (i / PARTITIONS) as i64)))
        .count();
    let twice = seen.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    Crashes {
        kills,
        produced,
        lost,
        twice,
        files: published(&dest),
        seconds: started.elapsed().as_secs_f64(),
    }
}
