//! The archiver end to end: the real broker, records produced by an independent client
//! (confluent-kafka), real `shiva-archiver` processes killed with SIGKILL at random moments, and
//! `fsck` and `extract` as the judges: nothing lost, nothing twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use shiva_e2e::{
    Broker, Moto, bin, exit_within, kafka_tool as tool, produced_value as value, python, repo, s3_env,
    scratch, wait_until,
};

const PARTITIONS: usize = 4;

/// Where an archive goes: a directory, or a bucket on a real S3 server (moto).
struct Target {
    url: String,
    dir: Option<PathBuf>,
    moto: Option<Moto>,
}

impl Target {
    fn dir(dir: &Path) -> Target {
        Target { url: format!("file://{}", dir.display()), dir: Some(dir.to_owned()), moto: None }
    }

    fn s3(prefix: &str) -> Target {
        let moto = Moto::start("archive");
        Target { url: format!("s3://{}/{prefix}", moto.bucket), dir: None, moto: Some(moto) }
    }

    /// `shiva-archiver`, with the S3 server's address and credentials in its environment.
    fn command(&self) -> Command {
        let mut command = Command::new(bin("shiva-archiver"));
        if let Some(moto) = &self.moto {
            command.envs(moto.env());
        }
        command
    }
}

fn archiver(broker: &Broker, dest: &Target, topic: &str, extra: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    dest.command()
        .args(["run", "--bootstrap", &format!("127.0.0.1:{}", broker.port), "--topic", topic])
        .args(["--dest", &dest.url])
        .args(extra)
        .env("SHIVA_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start shiva-archiver")
}

/// Waits until `child` blocks SIGTERM (the first thing its `main` does), as the kernel shows it in
/// `/proc/PID/status`. Before that, from the `exec` to its `main`, a signal takes its default
/// action and kills it: no program can close that gap itself.
fn wait_blocks_sigterm(child: &mut Child) {
    let status = format!("/proc/{}/status", child.id());
    let blocked = || {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let mask = text.lines().find_map(|line| line.strip_prefix("SigBlk:")).unwrap_or("0");
        u64::from_str_radix(mask.trim(), 16).unwrap_or(0) & (1 << (Signal::SIGTERM as u64 - 1)) != 0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !blocked() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited on its own, {status}, before it blocked SIGTERM");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("it did not block SIGTERM within 30 s of its start");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// SIGTERM once `child` blocks it, then its exit status; panics if it had already exited on its
/// own (a stop that was no stop) or does not exit within a minute.
fn terminate(mut child: Child) -> std::process::ExitStatus {
    wait_blocks_sigterm(&mut child);
    if let Some(status) = child.try_wait().unwrap() {
        panic!("it had already exited on its own, {status}, before its SIGTERM");
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    exit_within(&mut child, Duration::from_secs(60)).expect("it did not exit within 60 s of its SIGTERM")
}

fn archived_count(dest: &Target, topic: &str) -> u64 {
    let output = dest.command().args(["fsck", "--topic", topic, "--dest", &dest.url]).output().unwrap();
    shiva_e2e::fsck_records(&output.stdout)
}

/// `fsck --deep` passes and `extract` returns exactly records 0..count, each once, in order per
/// partition; `key` opens encrypted files.
fn assert_exactly_once(dest: &Target, topic: &str, count: usize, key: Option<&Path>) {
    let url = &dest.url;
    let identity: Vec<String> =
        key.map(|key| vec!["--identity".to_owned(), key.display().to_string()]).unwrap_or_default();
    let fsck = dest
        .command()
        .args(["fsck", "--deep", "--topic", topic, "--dest", url])
        .args(&identity)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "fsck failed:\n{}", String::from_utf8_lossy(&fsck.stdout));
    let extract = dest
        .command()
        .args(["extract", "--format", "jsonl", "--topic", topic, "--dest", url])
        .args(&identity)
        .output()
        .unwrap();
    assert!(extract.status.success(), "{}", String::from_utf8_lossy(&extract.stderr));
    let mut per_partition: BTreeMap<i64, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&extract.stdout).lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let value = match &record["value"] {
            Value::String(text) => text.as_bytes().to_vec(),
            other => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(other["base64"].as_str().unwrap()).unwrap()
            }
        };
        let partition = record["partition"].as_i64().unwrap();
        per_partition.entry(partition).or_default().push((record["offset"].as_i64().unwrap(), value));
    }
    for p in 0..PARTITIONS {
        let got = per_partition.remove(&(p as i64)).unwrap_or_default();
        let expected: Vec<(i64, Vec<u8>)> =
            (p..count).step_by(PARTITIONS).enumerate().map(|(offset, i)| (offset as i64, value(i))).collect();
        assert_eq!(
            got.len(),
            expected.len(),
            "partition {p}: {} records archived, {} produced",
            got.len(),
            expected.len()
        );
        assert!(got == expected, "partition {p}: the archived records differ from the produced ones");
    }
}

/// Deterministic pseudo-random delays, so a failing run can be told apart by its seed.
fn delays(seed: u64, count: usize, min_ms: u64, max_ms: u64) -> Vec<Duration> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            Duration::from_millis(min_ms + (state >> 33) % (max_ms - min_ms))
        })
        .collect()
}

/// Kills the archiver `kills` times at random moments while `total` records are produced, then
/// lets a last run catch up; `encrypt` passes age recipients.
fn crash_matrix(broker: &Broker, label: &str, dest: &Target, total: usize, kills: usize, encrypt: &[String]) {
    let dir = scratch(label);
    let log = dir.join("archiver.log");
    tool(broker, &["create", "events", &PARTITIONS.to_string()]);
    let step = total / 5;
    tool(broker, &["produce", "events", &PARTITIONS.to_string(), "0", &step.to_string()]);
    let mut produced = step;
    let seed = std::process::id() as u64;
    let mut args: Vec<&str> = vec!["--max-records", "50", "--idle-publish", "300ms"];
    args.extend(encrypt.iter().map(String::as_str));
    let every = (kills / 4).max(1);
    // From just after start (before the first fetch) to well into publishing.
    for (round, delay) in delays(seed, kills, 200, 2500).into_iter().enumerate() {
        // Records keep arriving while the archiver is killed and restarted.
        if round % every == every - 1 && produced < total {
            let (from, to) = (produced.to_string(), (produced + step).to_string());
            tool(broker, &["produce", "events", &PARTITIONS.to_string(), &from, &to]);
            produced += step;
        }
        let mut child = archiver(broker, dest, "events", &args, &log);
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        // The broker still serves the dead archiver's fetches for a moment.
        std::thread::sleep(Duration::from_millis(500));
    }
    while produced < total {
        let (from, to) = (produced.to_string(), (produced + step).to_string());
        tool(broker, &["produce", "events", &PARTITIONS.to_string(), &from, &to]);
        produced += step;
    }
    // A last run catches up, then stops cleanly.
    let child = archiver(broker, dest, "events", &args, &log);
    let started = Instant::now();
    wait_until(Duration::from_secs(180), "the archive catches up", || {
        archived_count(dest, "events") >= total as u64
    });
    let status = terminate(child);
    // What the archiver said, the last run's end included, if its clean stop was not clean.
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the last run ended {status} on SIGTERM (seed {seed}); its log:\n{}", said());
    eprintln!("{kills} kills (seed {seed}), caught up in {:?}", started.elapsed());
    let published = std::fs::read_to_string(&log).unwrap().matches("published").count();
    assert!(published > 0, "no file was ever published");
}

/// A stop signal at any moment of start-up, from the first line of `main` on (connecting,
/// reading the partitions and their positions), stops the archiver and the indexer cleanly:
/// exit 0, once their start-up is done.
#[test]
fn sigterm_at_any_moment_of_start_up_stops_the_archiver_and_the_indexer_with_exit_0() {
    let broker = Broker::start_with_interval("10m");
    tool(&broker, &["create", "events", &PARTITIONS.to_string()]);
    tool(&broker, &["produce", "events", &PARTITIONS.to_string(), "0", "100"]);
    let dir = scratch("early-stop");
    let dest = Target::dir(&dir.join("out"));
    let log = dir.join("archiver.log");
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let index = dir.join("events.db");
    let delays_us = [0, 0, 0, 100, 300, 1_000, 2_000, 5_000, 10_000, 30_000, 100_000];
    for delay_us in delays_us {
        let mut child = archiver(&broker, &dest, "events", &[], &log);
        wait_blocks_sigterm(&mut child);
        std::thread::sleep(Duration::from_micros(delay_us));
        let status = terminate(child);
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            status.success(),
            "the archiver, SIGTERM {delay_us} µs after it blocked it: {status}; its log:\n{said}"
        );
    }
    for delay_us in delays_us {
        let mut child = Command::new(bin("shiva-indexer"))
            .args(["run", "--bootstrap", &bootstrap, "--topic", "events"])
            .arg("--index")
            .arg(&index)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shiva-indexer");
        wait_blocks_sigterm(&mut child);
        std::thread::sleep(Duration::from_micros(delay_us));
        let status = terminate(child);
        assert!(status.success(), "the indexer, SIGTERM {delay_us} µs after it blocked it: {status}");
    }
    // The other commands die of it as any program: `fsck` of a bucket whose server never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut fsck = Command::new(bin("shiva-archiver"))
        .args(["fsck", "--topic", "events", "--dest", "s3://silent/archive"])
        .envs(s3_env(&format!("http://{}", silent.local_addr().unwrap())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once it asks the server, it is well past its `main`.
    let (_connection, _) = silent.accept().unwrap();
    kill(Pid::from_raw(fsck.id() as i32), Signal::SIGTERM).unwrap();
    let status = fsck.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "fsck, SIGTERM while it waits: {status}");
}

#[test]
fn killed_at_random_moments_while_producing_the_archive_holds_every_record_exactly_once() {
    let total = 20_000;
    let broker = Broker::start_with_interval("10m");
    let dest = Target::dir(&scratch("archive").join("out"));
    crash_matrix(&broker, "archive", &dest, total, 50, &[]);
    assert_exactly_once(&dest, "events", total, None);
}

#[test]
fn killed_at_random_moments_archiving_to_s3_nothing_is_lost_or_doubled_and_extract_restores_a_topic() {
    let total = 8_000;
    let broker = Broker::start_with_interval("10m");
    let dest = Target::s3("kafka/archive");
    crash_matrix(&broker, "archive-s3", &dest, total, 25, &[]);
    assert_exactly_once(&dest, "events", total, None);
    // Back into Kafka: each record to its own partition number, with key, value, headers and time,
    // and where it came from in three more headers.
    tool(&broker, &["create", "restored", &PARTITIONS.to_string()]);
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let restore = dest
        .command()
        .args(["extract", "--topic", "events", "--dest", &dest.url, "--to-topic", "restored"])
        .args(["--bootstrap", &bootstrap])
        .output()
        .unwrap();
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    let consumed = Command::new(python())
        .arg(repo().join("tests/kafka_tool.py"))
        .args([&bootstrap, "consume", "restored", &PARTITIONS.to_string(), &total.to_string()])
        .output()
        .unwrap();
    assert!(consumed.status.success(), "{}", String::from_utf8_lossy(&consumed.stderr));
    let mut seen = 0;
    for line in String::from_utf8_lossy(&consumed.stdout).lines() {
        use base64::Engine;
        let record: Value = serde_json::from_str(line).unwrap();
        let header = |name: &str| {
            let headers = record["headers"].as_array().unwrap();
            headers.iter().find(|h| h[0] == name).map(|h| h[1].as_str().unwrap().to_owned())
        };
        let partition = record["partition"].as_i64().unwrap();
        let offset: usize = header("shiva.offset").expect("shiva.offset").parse().unwrap();
        let i = offset * PARTITIONS + partition as usize;
        assert_eq!(header("shiva.topic").as_deref(), Some("events"));
        assert_eq!(header("shiva.partition"), Some(partition.to_string()));
        assert_eq!(header("n"), Some(i.to_string()), "the original headers come first");
        assert_eq!(record["key"].as_str(), Some(format!("k{i}").as_str()));
        let value =
            base64::engine::general_purpose::STANDARD.decode(record["value"].as_str().unwrap()).unwrap();
        assert_eq!(value, self::value(i), "record {i}");
        seen += 1;
    }
    assert_eq!(seen, total, "every archived record was restored once");
    // Housekeeping on S3: every file but the newest of each partition is past a 1 s retention.
    let swept = dest
        .command()
        .args(["housekeep", "--topic", "events", "--dest", &dest.url, "--older-than", "1s"])
        .output()
        .unwrap();
    assert!(swept.status.success(), "{}", String::from_utf8_lossy(&swept.stderr));
    assert!(String::from_utf8_lossy(&swept.stdout).contains("deleted s3://archive/kafka/archive/events/0/"));
    let fsck = dest.command().args(["fsck", "--topic", "events", "--dest", &dest.url]).output().unwrap();
    let text = String::from_utf8_lossy(&fsck.stdout);
    assert!(fsck.status.success(), "{text}");
    assert_eq!(
        text.matches(": 1 files, ").count(),
        PARTITIONS,
        "the newest file of each partition stays: {text}"
    );
}

#[test]
fn on_s3_publishing_is_create_if_absent_and_the_second_writer_adopts_the_first_ones_file() {
    use shiva_archiver::dest::{Dest, Published, S3Options};
    use shiva_archiver::format::{Codec, Record, encode_file};
    let moto = Moto::start("race");
    let env: BTreeMap<_, _> = moto.env().into_iter().collect();
    let options = S3Options {
        endpoint: Some(env["AWS_ENDPOINT_URL"].clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    };
    let dest = Dest::from_url("s3://race/deep/prefix", &options).unwrap();
    let records = |from: i64, to: i64| -> Vec<Record> {
        (from..to)
            .map(|offset| Record {
                offset,
                timestamp: Some(offset),
                key: None,
                headers: vec![],
                value: Some(format!("v{offset}").into_bytes()),
            })
            .collect()
    };
    dest.prepare("t", &[0]).unwrap();
    let first = encode_file("t", 0, 0, &records(0, 10), 10, Codec::Zstd(1), &[]);
    let zombie = encode_file("t", 0, 0, &records(0, 4), 4, Codec::Zstd(1), &[]);
    assert_eq!(dest.publish(&first).unwrap(), Published::Written(first.footer.clone()));
    // The second writer's conditional PutObject gets 412: it adopts the first one's range.
    assert_eq!(dest.publish(&zombie).unwrap(), Published::Adopted(first.footer.clone()));
    let key = age::x25519::Identity::generate();
    let sealed = encode_file("t", 0, 10, &records(10, 20), 20, Codec::Zstd(1), &[key.to_public()]);
    dest.publish(&sealed).unwrap();
    // Footers come from the object metadata: known for the encrypted file without its key.
    let listed = dest.list("t", 0).unwrap();
    assert_eq!(
        listed.iter().map(|e| e.footer.clone()).collect::<Vec<_>>(),
        [first.footer.clone(), sealed.footer.public()]
    );
    assert_eq!(listed[0].name, "s3://race/deep/prefix/t/0/00000000000000000000.zst");
    assert_eq!(dest.newest("t", 0).unwrap().unwrap().next_offset, 20);
    assert_eq!(dest.read(&listed[0]).unwrap(), first.bytes, "the first writer's bytes, untouched");
    assert_eq!(dest.partitions("t").unwrap(), [0]);
    assert_eq!(dest.compressions("t", 0).unwrap(), ["zstd"]);
    dest.remove(&listed[0]).unwrap();
    assert_eq!(dest.list("t", 0).unwrap().len(), 1);
    // A bucket that does not exist: a clear error naming it.
    let missing = Dest::from_url("s3://nowhere/x", &options).unwrap();
    let err = format!("{:#}", missing.prepare("t", &[0]).unwrap_err());
    assert!(err.contains("s3://nowhere/x/t"), "{err}");
}

#[test]
fn a_million_records_over_four_partitions_archive_to_files_and_to_s3_byte_for_byte() {
    let broker = Broker::start_with_interval("10m");
    let total = 1_000_000;
    tool(&broker, &["create", "events", &PARTITIONS.to_string()]);
    let dir = scratch("million");
    let log = dir.join("archiver.log");
    let files = Target::dir(&dir.join("out"));
    let s3 = Target::s3("million");
    let args = ["--max-records", "50000", "--idle-publish", "1s"];
    let started = Instant::now();
    let to_files = archiver(&broker, &files, "events", &args, &log);
    let to_s3 = archiver(&broker, &s3, "events", &args, &log);
    for chunk in 0..4 {
        let (from, to) = (chunk * total / 4, (chunk + 1) * total / 4);
        tool(&broker, &["produce", "events", &PARTITIONS.to_string(), &from.to_string(), &to.to_string()]);
    }
    let produced = started.elapsed();
    wait_until(Duration::from_secs(900), "both archives catch up", || {
        archived_count(&files, "events") >= total as u64 && archived_count(&s3, "events") >= total as u64
    });
    eprintln!("produced in {produced:?}, both archived in {:?}", started.elapsed());
    assert!(terminate(to_files).success());
    assert!(terminate(to_s3).success());
    assert_exactly_once(&files, "events", total, None);
    assert_exactly_once(&s3, "events", total, None);
}

#[test]
fn encrypted_files_survive_kills_open_with_the_stock_age_command_and_check_without_the_key() {
    let dir = scratch("keys");
    let key = dir.join("key.txt");
    let keygen = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (scripts/test installs age)");
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
    let text = std::fs::read_to_string(&key).unwrap();
    let public = text.lines().find_map(|l| l.strip_prefix("# public key: ")).unwrap().to_owned();
    let total = 8_000;
    let broker = Broker::start_with_interval("10m");
    let dest = Target::dir(&scratch("archive-age").join("out"));
    crash_matrix(&broker, "archive-age", &dest, total, 25, &["--recipient".to_owned(), public]);
    // Structure without the key; content with it.
    let url = &dest.url;
    let fsck = dest.command().args(["fsck", "--topic", "events", "--dest", url]).output().unwrap();
    assert!(fsck.status.success(), "fsck without the key:\n{}", String::from_utf8_lossy(&fsck.stdout));
    let deep = dest.command().args(["fsck", "--deep", "--topic", "events", "--dest", url]).output().unwrap();
    assert!(!deep.status.success(), "--deep without the key cannot open the files");
    assert_exactly_once(&dest, "events", total, Some(&key));
    // The stock command lines read a file: age -d -i key.txt FILE | zstd -dc.
    let file = dest.dir.as_ref().unwrap().join("events/0").join(format!("{:020}.zst", 0));
    let raw = std::fs::read(&file).unwrap();
    assert!(raw.starts_with(b"age-encryption.org/v1"), "the file is an age file");
    let shell = format!("age -d -i {} {} | zstd -dc", key.display(), file.display());
    let plain = Command::new("sh").args(["-c", &shell]).output().unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    assert!(String::from_utf8_lossy(&plain.stdout).contains("\"offset\":0,"), "the records, readable");
}

#[test]
fn two_archivers_with_different_cuts_on_the_same_partitions_never_overlap() {
    let broker = Broker::start_with_interval("10m");
    let dir = scratch("zombie");
    let dest = Target::dir(&dir.join("out"));
    let log = dir.join("archiver.log");
    tool(&broker, &["create", "events", &PARTITIONS.to_string()]);
    let total = 20_000;
    let first = archiver(&broker, &dest, "events", &["--max-records", "30", "--idle-publish", "200ms"], &log);
    let second =
        archiver(&broker, &dest, "events", &["--max-records", "70", "--idle-publish", "500ms"], &log);
    for chunk in 0..4 {
        let (from, to) = (chunk * total / 4, (chunk + 1) * total / 4);
        tool(&broker, &["produce", "events", &PARTITIONS.to_string(), &from.to_string(), &to.to_string()]);
    }
    wait_until(Duration::from_secs(180), "the archive catches up", || {
        archived_count(&dest, "events") >= total as u64
    });
    assert!(terminate(first).success());
    assert!(terminate(second).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("another writer archived this range first"), "the two writers never met");
    assert_exactly_once(&dest, "events", total, None);
}

#[test]
fn records_lost_before_they_were_archived_stop_the_archiver_with_the_permanent_failure_code() {
    let broker = Broker::start();
    let dir = scratch("gone");
    let dest = Target::dir(&dir.join("out"));
    let log = dir.join("archiver.log");
    // Records older than 3 s are deleted by the broker.
    tool(&broker, &["create", "short", "1", "3000"]);
    tool(&broker, &["produce", "short", "1", "0", "100"]);
    let child = archiver(&broker, &dest, "short", &["--idle-publish", "200ms"], &log);
    wait_until(Duration::from_secs(30), "the first records are archived", || {
        archived_count(&dest, "short") >= 100
    });
    assert!(terminate(child).success());
    // While no archiver runs, more records arrive and are deleted before anyone archives them.
    tool(&broker, &["produce", "short", "1", "100", "200"]);
    std::thread::sleep(Duration::from_secs(8));
    let child = archiver(&broker, &dest, "short", &["--idle-publish", "200ms"], &log);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(3), "the permanent-failure exit code");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("short/0: the archive ends at offset 100"),
        "the message says which offsets: {text}"
    );
    assert_eq!(archived_count(&dest, "short"), 100, "nothing was skipped or rewritten");
}

#[test]
fn a_compacted_topic_archives_across_its_gaps_with_no_false_alarm_and_the_files_tile() {
    let broker = Broker::start();
    let dir = scratch("compacted");
    let dest = Target::dir(&dir.join("out"));
    let log = dir.join("archiver.log");
    tool(&broker, &["create", "table", "1", "compact"]);
    // 100 records with keys of their own (compaction keeps them), archived.
    tool(&broker, &["produce-keys", "table", "0", "100", "1000000"]);
    let child = archiver(&broker, &dest, "table", &["--max-records", "30", "--idle-publish", "300ms"], &log);
    wait_until(Duration::from_secs(60), "the first records are archived", || {
        archived_count(&dest, "table") >= 100
    });
    assert!(terminate(child).success());
    // While no archiver runs, 1,900 records over 20 keys: compaction leaves the newest of each,
    // so offsets 100..1979 are gone from the log (a gap, not a loss).
    tool(&broker, &["produce-keys", "table", "100", "2000", "20"]);
    let compacted = || {
        let consumed = tool(&broker, &["consume", "table", "1", "0"]);
        String::from_utf8_lossy(&consumed.stdout).lines().count()
    };
    wait_until(Duration::from_secs(60), "the broker compacts", || compacted() <= 120);
    tool(&broker, &["produce-keys", "table", "2000", "2050", "1000000"]);
    let child = archiver(&broker, &dest, "table", &["--max-records", "30", "--idle-publish", "300ms"], &log);
    let expected = 100 + 20 + 50;
    wait_until(Duration::from_secs(60), "the archive catches up", || {
        archived_count(&dest, "table") >= expected as u64
    });
    assert!(terminate(child).success());
    // The judge is the independent client: the archive holds exactly what the log holds.
    let consumed = tool(&broker, &["consume", "table", "1", "0"]);
    let in_log: Vec<(i64, String)> = String::from_utf8_lossy(&consumed.stdout)
        .lines()
        .map(|line| {
            use base64::Engine;
            let record: Value = serde_json::from_str(line).unwrap();
            let value =
                base64::engine::general_purpose::STANDARD.decode(record["value"].as_str().unwrap()).unwrap();
            (record["offset"].as_i64().unwrap(), String::from_utf8(value).unwrap())
        })
        .collect();
    let extract = dest
        .command()
        .args(["extract", "--format", "jsonl", "--topic", "table", "--dest", &dest.url])
        .output()
        .unwrap();
    assert!(extract.status.success(), "{}", String::from_utf8_lossy(&extract.stderr));
    let archived: Vec<(i64, String)> = String::from_utf8_lossy(&extract.stdout)
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap();
            (record["offset"].as_i64().unwrap(), record["value"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(archived.len(), expected, "{archived:?}");
    assert!(archived == in_log, "the archive differs from the log");
    assert!(archived.iter().any(|(offset, _)| *offset == 1980), "the newest of each key, after the gap");
    let fsck =
        dest.command().args(["fsck", "--deep", "--topic", "table", "--dest", &dest.url]).output().unwrap();
    assert!(
        fsck.status.success(),
        "the files tile across the gap:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert!(!std::fs::read_to_string(&log).unwrap().contains("deleted from Kafka"), "no false alarm");
}

#[test]
fn gzip_files_hold_every_record_and_read_with_the_stock_gzip_command() {
    let broker = Broker::start_with_interval("10m");
    let dir = scratch("gzip");
    let dest = Target::dir(&dir.join("out"));
    let log = dir.join("archiver.log");
    tool(&broker, &["create", "events", &PARTITIONS.to_string()]);
    let total = 4_000;
    tool(&broker, &["produce", "events", &PARTITIONS.to_string(), "0", &total.to_string()]);
    let args = ["--compression", "gzip", "--max-records", "300", "--idle-publish", "300ms"];
    let child = archiver(&broker, &dest, "events", &args, &log);
    wait_until(Duration::from_secs(120), "the archive catches up", || {
        archived_count(&dest, "events") >= total as u64
    });
    assert!(terminate(child).success());
    assert_exactly_once(&dest, "events", total, None);
    let file = dest.dir.as_ref().unwrap().join("events/1").join(format!("{:020}.gz", 0));
    let shell = format!("gzip -dc {}", file.display());
    let plain = Command::new("sh").args(["-c", &shell]).output().unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(text.contains("{\"offset\":0,"), "the records: {}", text.chars().take(80).collect::<String>());
    assert!(text.contains("\"compression\":\"gzip\""), "then the footer member");
    // On a terminal (a pseudo-terminal from util-linux's `script`), extract draws a progress bar
    // on stderr; in a pipe it draws nothing.
    let extract = format!(
        "{} extract --topic events --dest {} --output {}",
        bin("shiva-archiver").display(),
        dest.url,
        dir.join("extracted").display()
    );
    let tty =
        Command::new("script").args(["-qec", &extract, "/dev/null"]).output().expect("script (util-linux)");
    assert!(tty.status.success(), "{}", String::from_utf8_lossy(&tty.stdout));
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(screen.contains("/4,000 records"), "a progress bar: {screen}");
    let piped = dest.command().args(["extract", "--topic", "events", "--dest", &dest.url]).output().unwrap();
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("records partition"), "no bar in a pipe");
    // One line per record (binary values carry a newline of their own: one more line each).
    let lines = std::fs::read(dir.join("extracted")).unwrap().iter().filter(|b| **b == b'\n').count();
    assert_eq!(lines, total + (0..total).filter(|i| i.is_multiple_of(97)).count());
    // A reader that stops early (`| head`) is not an error (JSON lines: more than a pipe buffer).
    let pipeline = format!(
        "{} extract --format jsonl --topic events --dest {} | head -1 >/dev/null; echo \"${{PIPESTATUS[0]}}\"",
        bin("shiva-archiver").display(),
        dest.url
    );
    let head = Command::new("bash").args(["-c", &pipeline]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), "0", "extract | head exits 0");
    assert!(
        !String::from_utf8_lossy(&head.stderr).contains("Broken pipe"),
        "{}",
        String::from_utf8_lossy(&head.stderr)
    );
    // One archive, one compression: zstd on top of gzip files is refused.
    let mixed =
        archiver(&broker, &dest, "events", &["--idle-publish", "300ms"], &log).wait_with_output().unwrap();
    assert_eq!(mixed.status.code(), Some(1));
    assert!(std::fs::read_to_string(&log).unwrap().contains("an archive keeps one compression"));
}

#[test]
fn bad_flags_and_damaged_files_get_clear_errors_and_nothing_is_overwritten() {
    let dir = scratch("archiver-bad");
    let run = |args: &[&str]| Command::new(bin("shiva-archiver")).args(args).output().unwrap();
    let cases: [(&[&str], &str); 10] = [
        (
            &["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "file:///tmp/x", "--compression", "lz4"],
            "--compression",
        ),
        (
            &[
                "run",
                "--bootstrap",
                "x:1",
                "--topic",
                "t",
                "--dest",
                "file:///tmp/x",
                "--compression",
                "gzip",
                "--level",
                "12",
            ],
            "--level",
        ),
        (&["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "s3://"], "--dest"),
        (&["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "ftp://host/x"], "--dest"),
        (
            &["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "s3://b/p", "--s3-endpoint", "ftp://x"],
            "--s3-endpoint",
        ),
        (
            &["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "s3://b/p", "--max-bytes", "5GiB"],
            "--max-bytes",
        ),
        (&["extract", "--topic", "t", "--dest", "file:///tmp/x", "--to-topic", "r"], "--bootstrap"),
        (
            &["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "file:///tmp/x", "--max-bytes", "lots"],
            "--max-bytes",
        ),
        (
            &["run", "--bootstrap", "x:1", "--topic", "t", "--dest", "file:///tmp/x", "--level", "99"],
            "--level",
        ),
        (&["extract", "--topic", "t", "--dest", "file:///tmp/x", "--from-time", "yesterday"], "--from-time"),
    ];
    for (args, needle) in cases {
        let output = run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?} should name {needle}: {stderr}");
    }
    // An unreadable key: the message says why, not only which flag.
    let garbage = dir.join("not-a-key.txt");
    std::fs::write(&garbage, "garbage\n").unwrap();
    let output = run(&[
        "fsck",
        "--deep",
        "--topic",
        "t",
        "--dest",
        "file:///tmp/x",
        "--identity",
        garbage.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--identity") && stderr.contains("non-identity data"), "{stderr}");
    // A damaged file: fsck --deep names it; extract refuses it; the file is left as it was.
    let partition = dir.join("out/t/0");
    std::fs::create_dir_all(&partition).unwrap();
    let damaged = partition.join(format!("{:020}.zst", 0));
    std::fs::write(&damaged, b"\x28\xb5\x2f\xfd garbage").unwrap();
    let url = format!("file://{}", dir.join("out").display());
    let fsck = run(&["fsck", "--deep", "--topic", "t", "--dest", &url]);
    assert_eq!(fsck.status.code(), Some(1));
    let text = format!("{}{}", String::from_utf8_lossy(&fsck.stdout), String::from_utf8_lossy(&fsck.stderr));
    assert!(text.contains("00000000000000000000.zst"), "{text}");
    let extract = run(&["extract", "--topic", "t", "--dest", &url]);
    assert_eq!(extract.status.code(), Some(1));
    assert_eq!(std::fs::read(&damaged).unwrap(), b"\x28\xb5\x2f\xfd garbage", "never rewritten");
}

#[test]
fn batches_compressed_with_zstd_lz4_and_gzip_by_their_producer_are_archived_exactly_once() {
    let broker = Broker::start();
    let dest = Target::dir(&scratch("codecs").join("archive"));
    let log = scratch("codecs-log").join("archiver.log");
    tool(&broker, &["create", "mixed", &PARTITIONS.to_string()]);
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    // Not snappy: the test broker cannot serve snappy batches (it fails the fetch).
    for (step, codec) in ["zstd", "lz4", "gzip"].iter().enumerate() {
        let (from, to) = ((step * 1000).to_string(), ((step + 1) * 1000).to_string());
        let settings = serde_json::json!({ "compression.type": codec });
        shiva_e2e::kafka_tool_at(
            &bootstrap,
            &settings,
            &["produce", "mixed", &PARTITIONS.to_string(), &from, &to],
        );
    }
    let child = archiver(&broker, &dest, "mixed", &["--idle-publish", "300ms"], &log);
    wait_until(Duration::from_secs(60), "3000 compressed records archived", || {
        archived_count(&dest, "mixed") >= 3000
    });
    assert!(terminate(child).success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert_exactly_once(&dest, "mixed", 3000, None);
}
