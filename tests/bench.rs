//! `bench`: measures the core cluster's figures with real processes on the real broker, with
//! the node's default settings, and prints a Markdown report for `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release --workspace && target/release/bench [--quick] [--fetch-wait 12ms] [--compaction 10s] [--only handoff,floor,cron,records,peers,resume] [--parts tansu,file,systemd,cron] [--window S (peers: 60, records: 100)] [--tasks 10] [--kills 1000]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shiva_bus::{BusConfig, Publisher, Reader, ReaderEvent, admin};
use shiva_e2e::{Broker, Ctl, Node, cluster, scratch, wait_until};
use shiva_proto::{LogView, TaskId, TaskSpec, TopicKind};
use tokio::sync::mpsc;

#[path = "bench_archive.rs"]
mod archive;
#[path = "bench_peers.rs"]
mod peers;
#[path = "bench_supervise.rs"]
mod supervise;
#[path = "bench_swarm.rs"]
mod swarm;

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn summary(samples: &mut [f64]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        percentile(samples, 1.0),
        samples.len()
    )
}

/// Broker produce → consume round trip through Shiva's own client settings, to a reader of
/// `topics` (the record goes to the first).
async fn round_trip(broker: &Broker, samples: usize, fetch_wait: Duration, topics: &[TopicKind]) -> Vec<f64> {
    let mut config = BusConfig::new(&broker.url(), &cluster("rt"), &[]).unwrap();
    config.fetch_wait = fetch_wait;
    admin::ensure_topics(&config, Duration::from_secs(5)).await.unwrap();
    let publisher = Publisher::new(&config, "bench").unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    let reader = Reader::spawn(&config, topics, tx).unwrap();
    reader.sync(0);
    while !matches!(rx.recv().await, Some(ReaderEvent::Synced(0))) {}
    let mut out = Vec::new();
    // The first sends include the producer's set-up: warm up, then measure.
    for i in 0..samples + 5 {
        let key = format!("rt/{i}");
        let started = Instant::now();
        publisher.send(topics[0], &key, Some(b"x")).await.unwrap();
        loop {
            if let Some(ReaderEvent::Record(record)) = rx.recv().await
                && record.key.as_deref() == Some(key.as_bytes())
            {
                break;
            }
        }
        if i >= 5 {
            out.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// A task that appends its start instant (ns since the epoch) to `file`, then sleeps.
fn stamping_spec(id: &str, file: &Path) -> TaskSpec {
    let script = format!("date +%s%N >> {}; exec sleep 100000", file.display());
    let mut spec = TaskSpec::new(TaskId::new(id).unwrap(), "sh", vec!["-c".into(), script]);
    spec.stop_grace = Duration::from_secs(1);
    spec
}

fn starts(file: &Path) -> Vec<i128> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Submit (spec record written) → child started.
async fn submit_to_start(broker: &Broker, cluster: &str, dir: &Path, samples: usize) -> Vec<f64> {
    let config = BusConfig::new(&broker.url(), cluster, &[]).unwrap();
    let publisher = Publisher::new(&config, "bench").unwrap();
    let mut out = Vec::new();
    for i in 0..samples {
        let file = dir.join(format!("s{i}"));
        let spec = stamping_spec(&format!("bench/s{i}"), &file);
        let sent = now_ns();
        shiva_ctl::write_spec(&publisher, &spec).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let started = loop {
            if let Some(start) = starts(&file).first() {
                break *start;
            }
            assert!(Instant::now() < deadline, "task {i} did not start");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        out.push((started - sent) as f64 / 1e6);
    }
    out
}

fn leader(ctl: &Ctl) -> Option<String> {
    let nodes = ctl.try_json(&["nodes"])?;
    nodes.as_array()?.iter().find(|n| n["leader"] == true).map(|n| n["id"].as_str().unwrap().to_owned())
}

/// A reader of `topics` from their start, having passed every record up to their ends to
/// `each`; it goes on reading into the receiver.
async fn read_to_end(
    config: &BusConfig,
    topics: &[TopicKind],
    mut each: impl FnMut(shiva_bus::Record),
) -> (Reader, mpsc::Receiver<ReaderEvent>) {
    let (tx, mut rx) = mpsc::channel(1 << 16);
    let reader = Reader::spawn(config, topics, tx).unwrap();
    reader.sync(0);
    loop {
        match rx.recv().await.unwrap() {
            ReaderEvent::Record(record) => each(record),
            ReaderEvent::Synced(0) => break,
            _ => {}
        }
    }
    (reader, rx)
}

/// A reader of `assignments`, positioned at its end, and the view of what it read.
async fn read_assignments(config: &BusConfig) -> (Reader, mpsc::Receiver<ReaderEvent>, LogView) {
    let mut view = LogView::default();
    let (reader, rx) = read_to_end(config, &[TopicKind::Assignments], |r| {
        view.apply(r.topic, r.offset, r.key.as_deref(), r.value.as_deref());
    })
    .await;
    (reader, rx, view)
}

/// Hand-off between live nodes: a service on h1 (tag `a`) is retagged to h2 (tag `b`) and back,
/// `moves` times; its copies stamp `start <ns>` and, on SIGTERM, `stop <ns>` before they exit.
/// Returns, per move, the old copy's stop → the new copy's start, in ms; panics on an overlap.
async fn handoff(broker: &Broker, dir: &Path, moves: usize, node_args: &[&str]) -> Vec<f64> {
    let name = cluster("handoff");
    let nodes: Vec<Node> = [("h1", "a"), ("h2", "b")]
        .iter()
        .map(|(id, tag)| {
            let mut args = node_args.to_vec();
            args.extend(["--tags", tag]);
            Node::launch(broker, &name, id, &args)
        })
        .collect();
    let ctl = Ctl::new(broker, &name);
    wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
    let config = BusConfig::new(&broker.url(), &name, &[]).unwrap();
    let publisher = Publisher::new(&config, "bench").unwrap();
    let file = dir.join("handoff");
    let script = format!(
        "trap 'trap \"\" TERM; echo stop $(date +%s%N) >> {f}; exit 0' TERM; echo start $(date +%s%N) >> {f}; while :; do sleep 0.05; done",
        f = file.display()
    );
    let stamps = |kind: &str| -> Vec<i128> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.strip_prefix(kind)?.trim().parse().ok())
            .collect()
    };
    let mut gaps = Vec::new();
    for i in 0..=moves {
        let mut spec =
            TaskSpec::new(TaskId::new("bench/handoff").unwrap(), "sh", vec!["-c".into(), script.clone()]);
        spec.tags = vec![if i % 2 == 0 { "a" } else { "b" }.to_owned()];
        spec.stop_grace = Duration::from_secs(5);
        shiva_ctl::write_spec(&publisher, &spec).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while stamps("start").len() < i + 1 {
            assert!(Instant::now() < deadline, "move {i} did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if i > 0 {
            // The previous copy's last stop stamp before this copy's start.
            let start = stamps("start")[i];
            let previous = stamps("start")[i - 1];
            let stop = stamps("stop").into_iter().filter(|stop| *stop > previous).min();
            let stop = stop
                .unwrap_or_else(|| panic!("move {i}: the old copy did not stop before the new one started"));
            assert!(start > stop, "move {i}: the new copy started before the old one stopped");
            gaps.push((start - stop) as f64 / 1e6);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(nodes);
    gaps
}

/// kill -9 of the leader → first accepted write of the next epoch's winner.
async fn failover(broker: &Broker, cluster: &str, nodes: &mut [Node], ctl: &Ctl) -> f64 {
    let config = BusConfig::new(&broker.url(), cluster, &[]).unwrap();
    let (_reader, mut rx, mut view) = read_assignments(&config).await;
    let old_epoch = view.epochs.newest;
    let old_leader = leader(ctl).expect("a leader");
    let node = nodes.iter_mut().find(|n| n.id == old_leader).unwrap();
    let killed = Instant::now();
    node.kill9();
    loop {
        if let Some(ReaderEvent::Record(r)) = rx.recv().await {
            view.apply(r.topic, r.offset, r.key.as_deref(), r.value.as_deref());
            if view.epochs.active.iter().any(|epoch| *epoch > old_epoch) {
                break;
            }
        }
    }
    let took = killed.elapsed().as_secs_f64() * 1000.0;
    node.restart();
    took
}

/// kill -9 of a runner (not the leader) → every task it held started elsewhere.
fn node_death(nodes: &mut [Node], ctl: &Ctl, files: &[(String, PathBuf)]) -> f64 {
    let leader = leader(ctl).expect("a leader");
    let rows = ctl.tasks();
    let holds = |id: &str| {
        files.iter().filter(|(task, _)| rows.get(task).is_some_and(|row| row["node"] == id)).count()
    };
    let victim =
        nodes.iter().map(|n| n.id.clone()).filter(|id| *id != leader).max_by_key(|id| holds(id)).unwrap();
    let held: Vec<&PathBuf> = files
        .iter()
        .filter(|(task, _)| rows.get(task).is_some_and(|row| row["node"] == victim.as_str()))
        .map(|(_, file)| file)
        .collect();
    assert!(!held.is_empty(), "{victim} holds no task");
    let node = nodes.iter_mut().find(|n| n.id == victim).unwrap();
    let killed = now_ns();
    node.kill9();
    let mut latest = 0;
    wait_until(Duration::from_secs(30), "the dead node's tasks restart elsewhere", || {
        held.iter().all(|file| {
            let after: Vec<i128> = starts(file).into_iter().filter(|start| *start > killed).collect();
            if let Some(first) = after.first() {
                latest = latest.max(*first);
            }
            !after.is_empty()
        })
    });
    node.restart();
    (latest - killed) as f64 / 1e6
}

/// Launch lateness: `count` tasks firing every second for `window`, from `settle` after they
/// were submitted; each run stamps the instant its command started (bash's `EPOCHREALTIME`, no
/// fork) next to its `SHIVA_SLOT`. Returns the lateness of every run whose slot lies in the
/// window, the slots that never ran, those that ran twice, and the records written meanwhile.
async fn cron_lateness(
    broker: &Broker,
    cluster: &str,
    dir: &Path,
    count: usize,
    (settle, window): (Duration, Duration),
) -> (Vec<f64>, usize, usize, BTreeMap<String, usize>) {
    let config = BusConfig::new(&broker.url(), cluster, &[]).unwrap();
    let publisher = Publisher::new(&config, "bench").unwrap();
    let file = dir.join("cron");
    for i in 0..count {
        let script = format!("echo $EPOCHREALTIME $SHIVA_SLOT $SHIVA_TASK_ID >> {}", file.display());
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "id": format!("cron/t{i:03}"),
            "command": "bash",
            "args": ["-c", script],
            "schedule": "* * * * * *",
            "catch_up": "none",
        }))
        .unwrap();
        shiva_ctl::write_spec(&publisher, &spec).await.unwrap();
    }
    tokio::time::sleep(settle).await;
    let from = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 + 1;
    let to = from + window.as_secs() as i64;
    tokio::time::sleep(window + Duration::from_secs(3)).await;
    let mut lateness = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut twice = 0;
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let mut fields = line.split_whitespace();
        let (Some(started), Some(slot), Some(task)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let started: f64 = started.parse().unwrap();
        let slot = chrono::DateTime::parse_from_rfc3339(slot).unwrap();
        if (from..to).contains(&slot.timestamp()) {
            let slot_s = slot.timestamp() as f64 + slot.timestamp_subsec_nanos() as f64 / 1e9;
            lateness.push((started - slot_s) * 1000.0);
            if !seen.insert((slot.timestamp(), task.to_owned())) {
                twice += 1;
            }
        }
    }
    let expected = count * window.as_secs() as usize;
    let records = records_written(&config, from * 1000, to * 1000).await;
    (lateness, expected - seen.len(), twice, records)
}

/// Before measuring, every task fires a few times.
const SETTLE: Duration = Duration::from_secs(5);

/// [`cron_lateness`] on a fresh 3-node cluster of `broker`.
fn shiva_cron(
    runtime: &tokio::runtime::Runtime,
    broker: &Broker,
    node_args: &[&str],
    count: usize,
    times: (Duration, Duration),
) -> (Vec<f64>, usize, usize, BTreeMap<String, usize>) {
    let name = cluster("cron");
    let nodes: Vec<Node> =
        (1..=3).map(|i| Node::launch(broker, &name, &format!("c{i}"), node_args)).collect();
    let ctl = Ctl::new(broker, &name);
    wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
    let measured = runtime.block_on(cron_lateness(broker, &name, &scratch("cron"), count, times));
    drop(nodes);
    measured
}

/// Issue 21, point 4: at 50 runs a second, Shiva's launch lateness (on the test broker and on
/// the file bus) beside the floor (the same children started with no scheduler) and beside
/// systemd timers and Debian's cron, each at the same number of jobs per slot; ratios of each.
fn peers_section(
    runtime: &tokio::runtime::Runtime,
    broker: &Broker,
    node_args: &[&str],
    (quick, parts, window): (bool, Option<&str>, Option<u64>),
    report: &mut Vec<String>,
) {
    const COUNT: usize = 50;
    // `--parts tansu,file,systemd,cron`: some of the measures beside the floor (all by default).
    const PARTS: [&str; 4] = ["tansu", "file", "systemd", "cron"];
    if let Some(unknown) = parts.into_iter().flat_map(|list| list.split(',')).find(|p| !PARTS.contains(p)) {
        panic!("--parts: unknown part {unknown:?} (known: {})", PARTS.join(", "));
    }
    let part = |name: &str| parts.is_none_or(|list| list.split(',').any(|p| p == name));
    let window = Duration::from_secs(window.unwrap_or(if quick { 20 } else { 60 }));
    assert!(window >= Duration::from_secs(1), "--window: at least 1 (seconds)");
    let minutes = if quick { 2 } else { 5 };
    // Built (or found) before anything is measured, so that a failure does not come after it.
    let rootfs = (part("systemd") || part("cron")).then(peers::rootfs);
    let mut floor = spawn_floor(&scratch("floor"), COUNT, window);
    let floor_p99 = percentile(&mut floor, 0.99);
    report.push(format!(
        "| floor: {COUNT} children at the same instant every second, 3 threads, no scheduler, {}s | {} |",
        window.as_secs(),
        summary(&mut floor)
    ));
    let files = Broker::file_bus(Vec::new());
    let mut shiva = Vec::new();
    let buses = [("tansu", "test broker (tansu)", broker, node_args), ("file", "file bus", &files, &[][..])];
    for (_, label, bus, args) in buses.into_iter().filter(|(name, ..)| part(name)) {
        let (mut late, missing, twice, _) = shiva_cron(runtime, bus, args, COUNT, (SETTLE, window));
        let p99 = percentile(&mut late, 0.99);
        let verdict =
            if p99 <= floor_p99 + 20.0 && missing == 0 && twice == 0 { "met" } else { "**not met**" };
        report.push(format!(
            "| Shiva, {COUNT} tasks every second, 3 nodes, {label}, {}s | {}; {missing} slots skipped, {twice} run twice; p99 {:+.1} ms from the floor's (goal ≤ +20 ms: {verdict}) |",
            window.as_secs(),
            summary(&mut late),
            p99 - floor_p99
        ));
        shiva.push((label, late));
    }
    let rootfs = rootfs.as_deref();
    let mut systemd = rootfs
        .filter(|_| part("systemd"))
        .map(|rootfs| peers::systemd_timers(rootfs, &scratch("peers-systemd"), COUNT, window));
    let mut cron = rootfs
        .filter(|_| part("cron"))
        .map(|rootfs| peers::debian_cron(rootfs, &scratch("peers-cron"), COUNT, minutes));
    for (label, peer, span) in [
        ("systemd timers (`AccuracySec=1us`), every second", &mut systemd, format!("{}s", window.as_secs())),
        ("Debian cron, every minute", &mut cron, format!("{minutes} min")),
    ] {
        let Some(peer) = peer else { continue };
        report.push(format!(
            "| {label}, {COUNT} jobs, in a Debian 12 host under systemd-nspawn, {span} | {}; {} of {} slots skipped, {} run twice |",
            summary(&mut peer.lateness),
            peer.missing,
            peer.expected,
            peer.twice
        ));
    }
    let (Some(systemd), Some(cron)) = (&mut systemd, &mut cron) else { return };
    for (label, late) in &mut shiva {
        let (p50, p99) = (percentile(late, 0.5), percentile(late, 0.99));
        let ratio = |peer: &mut peers::Peer| {
            format!(
                "p50 {:.2} ×, p99 {:.2} ×",
                p50 / percentile(&mut peer.lateness, 0.5),
                p99 / percentile(&mut peer.lateness, 0.99)
            )
        };
        report.push(format!(
            "| Shiva's lateness ({label}) as a ratio to systemd timers' / to cron's | {} / {} |",
            ratio(systemd),
            ratio(cron)
        ));
    }
}

/// Records written on `assignments` and `status` between two instants: per topic, the span of
/// offsets between the first and the last record sent in that time (compaction may have removed
/// records since, not their offsets), and the kinds of the records still there.
async fn records_written(config: &BusConfig, from_ms: i64, to_ms: i64) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut spans: BTreeMap<TopicKind, (i64, i64)> = BTreeMap::new();
    read_to_end(config, &[TopicKind::Assignments, TopicKind::Status], |record| {
        // When it was written: its envelope's send instant (the broker's timestamps are per
        // batch), or the record's own timestamp for a tombstone.
        let sent = record.value.as_deref().and_then(|value| {
            let envelope = shiva_proto::records::Envelope::decode(value).ok()?;
            i64::try_from(envelope.sent_at_ms).ok()
        });
        if !sent.or(record.timestamp_ms).is_some_and(|at| (from_ms..to_ms).contains(&at)) {
            return;
        }
        let span = spans.entry(record.topic).or_insert((record.offset, record.offset));
        *span = (span.0.min(record.offset), span.1.max(record.offset));
        let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
        let prefix = key.split('/').next().unwrap_or("").to_owned();
        let what = if record.value.is_none() { "tombstone" } else { "record" };
        *counts.entry(format!("left: {:?} {prefix}/ {what}", record.topic)).or_default() += 1;
    })
    .await;
    for (topic, (first, last)) in spans {
        counts.insert(format!("written: {topic:?}"), usize::try_from(last - first + 1).unwrap_or(0));
    }
    counts
}

/// Records written per run, from [`records_written`]'s counts and the runs, and those counts
/// as a list.
fn per_run(records: &BTreeMap<String, usize>, runs: usize) -> (f64, String) {
    let written: usize = records.iter().filter(|(kind, _)| kind.starts_with("written")).map(|(_, n)| n).sum();
    let kinds: Vec<String> = records.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
    (written as f64 / runs.max(1) as f64, kinds.join(", "))
}

/// The floor under launch lateness on this machine, without Shiva or a broker: three threads
/// (like three nodes) each start their share of `count` children at the same instant every
/// second, running the command `cron_lateness` gives its tasks. Returns each child's lateness.
fn spawn_floor(dir: &Path, count: usize, window: Duration) -> Vec<f64> {
    let file = dir.join("floor");
    let first = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 1;
    let threads: Vec<_> = (0..3)
        .map(|k| {
            let file = file.clone();
            let share = count / 3 + usize::from(k < count % 3);
            std::thread::spawn(move || {
                let mut children = Vec::new();
                for slot in first..first + window.as_secs() {
                    let at = UNIX_EPOCH + Duration::from_secs(slot);
                    if let Ok(wait) = at.duration_since(SystemTime::now()) {
                        std::thread::sleep(wait);
                    }
                    for _ in 0..share {
                        let script = format!("echo $EPOCHREALTIME {slot} >> {}", file.display());
                        children
                            .push(std::process::Command::new("bash").args(["-c", &script]).spawn().unwrap());
                    }
                }
                for mut child in children {
                    child.wait().unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let lateness: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let (started, slot) = line.split_once(' ')?;
            Some((started.parse::<f64>().ok()? - slot.parse::<f64>().ok()?) * 1000.0)
        })
        .collect();
    assert_eq!(lateness.len(), count * window.as_secs() as usize, "every child stamped once");
    lateness
}

/// Writes, as an earlier leader (epoch 1, which left no heartbeat) and its runner would have,
/// `tasks` periodic tasks that fire once a year, each with `runs` finished runs (a launch
/// intent on `assignments`, a final run record on `status`) and its `sched/` record, then a
/// probe task firing every second. Returns how many records were written.
async fn forge_history(broker: &Broker, cluster: &str, tasks: usize, runs: usize) -> usize {
    use shiva_proto::NodeId;
    use shiva_proto::records::{Body, Claim, Desired, DesiredState, Envelope, ExitInfo};
    use shiva_proto::runs::{RunIntent, RunPhase, RunReport, Sched, Trigger, run_id};
    use shiva_proto::topics::key;
    use uuid::Uuid;

    let bulk =
        ["linger.ms=50".to_owned(), "batch.num.messages=10000".to_owned(), "batch.size=4000000".to_owned()];
    let config = BusConfig::new(&broker.url(), cluster, &bulk).unwrap();
    admin::ensure_topics(&config, Duration::from_secs(5)).await.unwrap();
    let publisher = Publisher::new(&config, "forge").unwrap();
    let (leader, runner) = (NodeId::new("forged-leader").unwrap(), NodeId::new("forged-runner").unwrap());
    let (leader_inc, runner_inc) = (Uuid::new_v4(), Uuid::new_v4());
    let as_leader = |body| Envelope::now(leader.to_string(), Some(leader_inc), body).encode();
    let as_runner = |body| Envelope::now(runner.to_string(), Some(runner_inc), body).encode();
    let claim = as_leader(Body::Claim(Claim { epoch: 1 }));
    publisher
        .send(TopicKind::Assignments, &key::claim(1, &leader, Uuid::new_v4()), Some(&claim))
        .await
        .unwrap();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut written = 1;
    // Every spec first, all in flight at once (their offsets are the revisions runs name).
    let specs: Vec<TaskSpec> = (0..tasks)
        .map(|t| {
            serde_json::from_value(serde_json::json!({
                "id": format!("hist/t{t:05}"),
                "command": "true",
                "schedule": "0 0 1 1 *",
            }))
            .unwrap()
        })
        .collect();
    let mut revisions = Vec::new();
    let mut pending = Vec::new();
    for spec in &specs {
        let task = Body::Task(spec.clone());
        revisions.push(publisher.enqueue(TopicKind::Commands, &key::task(&spec.id), Some(&as_leader(task))));
        let desired = Body::Desired(Desired { task: spec.id.clone(), state: DesiredState::Running });
        pending.push(publisher.enqueue(
            TopicKind::Commands,
            &key::desired(&spec.id),
            Some(&as_leader(desired)),
        ));
    }
    let mut revised = Vec::new();
    for (spec, revision) in specs.into_iter().zip(revisions) {
        revised.push((spec, revision.await.unwrap()));
    }
    for (spec, revision) in revised {
        let shared = std::sync::Arc::new(spec.clone());
        for r in 0..runs {
            let slot_ms = now_ms - ((runs - r) as i64) * 365 * 86_400_000;
            let trigger = Trigger::Slot { slot_ms };
            let run = run_id(&spec.id, trigger, 1);
            let intent = RunIntent {
                epoch: 1,
                task: spec.id.clone(),
                run_id: run,
                attempt: 1,
                trigger,
                node: Some(runner.clone()),
                launch_at_ms: slot_ms,
                written_at_ms: None,
                spec_revision: revision,
                spec: shared.clone(),
                stop: None,
                verdict: None,
                note: None,
                incarnation: None,
                seat: None,
                status_seen: None,
            };
            let report = RunReport {
                task: spec.id.clone(),
                run_id: run,
                attempt: 1,
                trigger,
                state: RunPhase::Succeeded,
                pid: Some(1000 + r as u32),
                started_ms: Some(slot_ms + 3),
                late_ms: Some(3),
                ended_ms: Some(slot_ms + 50),
                exit: Some(ExitInfo { code: Some(0), signal: None }),
                message: None,
                seat: None,
            };
            let run_key = key::run(&spec.id, run);
            pending.push(publisher.enqueue(
                TopicKind::Assignments,
                &run_key,
                Some(&as_leader(Body::RunIntent(intent))),
            ));
            pending.push(publisher.enqueue(
                TopicKind::Status,
                &run_key,
                Some(&as_runner(Body::RunReport(report))),
            ));
        }
        let sched = Sched { decided_through_ms: Some(now_ms), ..Sched::fresh(1, spec.id.clone(), revision) };
        pending.push(publisher.enqueue(
            TopicKind::Assignments,
            &key::sched(&spec.id),
            Some(&as_leader(Body::Sched(sched))),
        ));
        written += 3 + 2 * runs;
        if pending.len() > 50_000 {
            for delivery in pending.drain(..) {
                delivery.await.unwrap();
            }
        }
    }
    for delivery in pending {
        delivery.await.unwrap();
    }
    let probe: TaskSpec = serde_json::from_value(serde_json::json!({
        "id": "bench/probe",
        "command": "true",
        "schedule": "* * * * * *",
        "overlap": "allow",
        "catch_up": "none",
    }))
    .unwrap();
    shiva_ctl::write_spec(&publisher, &probe).await.unwrap();
    written + 2
}

/// A node started on a forged history (`tasks` × `runs` finished runs): how long from its
/// start to its winning claim, and from that claim to its first launch intent (the probe's).
async fn resume(broker: &Broker, tasks: usize, runs: usize) -> (usize, f64, f64, f64, u64) {
    let name = cluster("resume");
    let forging = Instant::now();
    let written = forge_history(broker, &name, tasks, runs).await;
    let forge_s = forging.elapsed().as_secs_f64();
    let config = BusConfig::new(&broker.url(), &name, &[]).unwrap();
    let (_reader, mut rx, view) = read_assignments(&config).await;
    drop(view);
    let started = now_ns();
    let node = Node::launch(broker, &name, "r1", &[]);
    let (mut claim_ms, mut intent_ms) = (None, None);
    let mut rss = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    while intent_ms.is_none() {
        assert!(Instant::now() < deadline, "no launch intent from the resumed leader within 15 min");
        let Ok(Some(ReaderEvent::Record(r))) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
        else {
            rss = rss.max(rss_kb(node.pid()));
            continue;
        };
        let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
        if key.starts_with("claim/2/") && claim_ms.is_none() {
            claim_ms = Some(r.timestamp_ms.unwrap());
        }
        if key.starts_with("run/bench/probe/") {
            intent_ms = Some(r.timestamp_ms.unwrap());
        }
    }
    rss = rss.max(rss_kb(node.pid()));
    let (claim_ms, intent_ms) = (claim_ms.expect("epoch 2 claimed"), intent_ms.unwrap());
    let to_claim = claim_ms as f64 - started as f64 / 1e6;
    drop(node);
    (written, forge_s, to_claim, (intent_ms - claim_ms) as f64, rss)
}

/// CPU time (ns) of every thread of `pid`.
/// An idle cluster's worst node, after 3 s to settle: its RSS (KiB) and its CPU (% of a core)
/// over a window of 30 s (10 s with `--quick`), and the window.
fn idle(nodes: &[Node], quick: bool) -> (u64, f64, Duration) {
    std::thread::sleep(Duration::from_secs(3));
    let window = Duration::from_secs(if quick { 10 } else { 30 });
    let before: Vec<u64> = nodes.iter().map(|node| cpu_ns(node.pid())).collect();
    std::thread::sleep(window);
    let cpu = nodes
        .iter()
        .zip(before)
        .map(|(node, before)| (cpu_ns(node.pid()) - before) as f64 / window.as_nanos() as f64 * 100.0)
        .fold(0.0, f64::max);
    let rss = nodes.iter().map(|node| rss_kb(node.pid())).max().unwrap();
    (rss, cpu, window)
}

fn cpu_ns(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident set size of `pid` in kB.
fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|arg| arg == "--quick");
    // The value after `flag`, if the flag is given.
    let value = |flag: &str| {
        let at = args.iter().position(|arg| arg == flag)?;
        Some(args.get(at + 1).unwrap_or_else(|| panic!("{flag} needs a value")).as_str())
    };
    let fetch_wait = value("--fetch-wait").unwrap_or("12ms");
    let node_args = ["--fetch-wait", fetch_wait];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // tansu compacts by a query over every record that blocks writes while it runs; a Kafka
    // broker's log cleaner does not block producers. `--compaction 10m` is tansu's default.
    let compaction = value("--compaction").unwrap_or("10s");
    let broker = Broker::start_with_interval(compaction);
    let mut report = Vec::new();

    // `--only a,b` runs some sections: rtt, handoff, idle, floor, cron, records, peers, resume, swarm,
    // swarm-files, pipeline, archive-e2e, crash, supervise, cluster, filebus, api.
    let only = value("--only");
    let wants = |section: &str| only.is_none_or(|list| list.split(',').any(|s| s == section));
    for wait in [10, 12, 20].into_iter().filter(|_| wants("rtt")) {
        let samples = if quick { 50 } else { 200 };
        let mut rtt =
            runtime.block_on(round_trip(&broker, samples, Duration::from_millis(wait), &[TopicKind::Status]));
        report.push(format!(
            "| broker produce → consume round trip (fetch wait {wait} ms) | {} |",
            summary(&mut rtt)
        ));
    }

    for fetch in ["12ms", "10ms", "20ms", "100ms"].into_iter().filter(|_| wants("idle")) {
        let name = cluster("idle");
        let extra = ["--fetch-wait", fetch];
        let nodes: Vec<Node> =
            (1..=3).map(|i| Node::launch(&broker, &name, &format!("i{i}"), &extra)).collect();
        let ctl = Ctl::new(&broker, &name);
        wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
        let (rss, cpu, window) = idle(&nodes, quick);
        let label = if fetch == "12ms" {
            "--fetch-wait 12ms (default)".to_owned()
        } else {
            format!("--fetch-wait {fetch}")
        };
        report.push(format!(
            "| idle node in a 3-node cluster, {label} | RSS {:.1} MB, CPU {cpu:.2} % of a core (worst of 3 nodes, {}s) |",
            rss as f64 / 1024.0,
            window.as_secs()
        ));
    }

    if wants("handoff") {
        let samples = if quick { 50 } else { 200 };
        let wait = Duration::from_millis(12);
        let mut rtt = runtime.block_on(round_trip(&broker, samples, wait, &[TopicKind::Status]));
        // What a node's reader sees: it follows the four control topics in one consumer.
        let node_topics =
            [TopicKind::Status, TopicKind::Commands, TopicKind::Control, TopicKind::Assignments];
        let mut node_rtt = runtime.block_on(round_trip(&broker, samples, wait, &node_topics));
        let moves = if quick { 10 } else { 40 };
        let mut gaps = runtime.block_on(handoff(&broker, &scratch("handoff"), moves, &node_args));
        let p50 = percentile(&mut gaps, 0.5);
        report.push(format!(
            "| hand-off between live nodes (retag; old copy's stop → new copy's start), fetch wait 12 ms | {}; p50 = {:.1} × the round trip's p50 ({:.1} ms, one topic), {:.1} × a node reader's ({:.1} ms, four topics), same run |",
            summary(&mut gaps),
            p50 / percentile(&mut rtt, 0.5),
            percentile(&mut rtt, 0.5),
            p50 / percentile(&mut node_rtt, 0.5),
            percentile(&mut node_rtt, 0.5),
        ));
    }

    // What launching costs here at best: the same commands, same loads, no Shiva, no broker.
    for count in [10, 25, 50, 100].into_iter().filter(|_| wants("floor")) {
        let window = Duration::from_secs(if quick { 10 } else { 30 });
        let mut late = spawn_floor(&scratch("floor"), count, window);
        report.push(format!(
            "| launch floor without Shiva or broker ({count} children at the same instant every second, from 3 threads), {}s | {} |",
            window.as_secs(),
            summary(&mut late)
        ));
    }

    // Launch lateness at growing load: each count on a fresh 3-node cluster.
    for count in [10, 25, 50, 100].into_iter().filter(|_| wants("cron")) {
        let window = Duration::from_secs(if quick { 20 } else { 60 });
        let (mut late, missing, twice, records) =
            shiva_cron(&runtime, &broker, &node_args, count, (SETTLE, window));
        let (per_run, kinds) = per_run(&records, late.len());
        report.push(format!(
            "| cron launch lateness (slot → command started), {count} tasks every second, {}s | {}; {missing} slots skipped, {twice} run twice; {per_run:.2} records per run on `assignments` and `status` ({kinds}) |",
            window.as_secs(),
            summary(&mut late),
        ));
    }

    // Issue 21, point 1: records per periodic run once histories are full. A task's history
    // is full at its 100th finished run; from then on, runs leave it as later ones finish (one
    // a run, or with `batched_trim` 8 to 15 at a time; before 60da256, trimming started about
    // the 150th run, 50 runs at each position written). The window (two positions' worth by
    // default) starts past all of these. `--tasks N` (default 10) tasks every second,
    // `--window S` seconds counted (default 100).
    if wants("records") {
        let count: usize = value("--tasks")
            .map_or(10, |s| s.parse().unwrap_or_else(|_| panic!("--tasks: a count, not {s:?}")));
        let window = value("--window")
            .map_or(100, |s| s.parse().unwrap_or_else(|_| panic!("--window: seconds, not {s:?}")));
        let (settle, window) = (Duration::from_secs(170), Duration::from_secs(window));
        let (late, missing, twice, records) =
            shiva_cron(&runtime, &broker, &node_args, count, (settle, window));
        let (per_run, kinds) = per_run(&records, late.len());
        report.push(format!(
            "| records per periodic run with full histories ({count} tasks every second, runs {} to {} of each), compaction every {compaction} | {per_run:.2} per run on `assignments` and `status` ({kinds}); {} runs, {missing} slots skipped, {twice} run twice |",
            settle.as_secs(),
            (settle + window).as_secs(),
            late.len(),
        ));
    }

    // Lateness at 50 runs a second beside the floor and the peers a user would pick, in one run.
    if wants("peers") {
        let parts = value("--parts");
        // `--window 180`: seconds measured (default 60, 20 with `--quick`).
        let window =
            value("--window").map(|s| s.parse().unwrap_or_else(|_| panic!("--window: seconds, not {s:?}")));
        peers_section(&runtime, &broker, &node_args, (quick, parts, window), &mut report);
    }

    if wants("resume") {
        let (tasks, runs) = if quick { (1_000, 100) } else { (10_000, 100) };
        let (written, forge_s, to_claim, to_intent, rss) = runtime.block_on(resume(&broker, tasks, runs));
        report.push(format!(
            "| new leader resuming on a log of {} launch intents ({tasks} tasks × {runs} finished runs; {written} records, written in {forge_s:.0}s) | start → winning claim {:.1} s (reads the whole log); claim → first launch intent {:.0} ms; RSS {:.0} MB |",
            tasks * runs,
            to_claim / 1000.0,
            to_intent,
            rss as f64 / 1024.0
        ));
    }

    if wants("pipeline") {
        let count = if quick { 300_000 } else { 1_000_000 };
        use shiva_archiver::format::Codec;
        let runs = [
            (Codec::Zstd(1), false),
            (Codec::Zstd(3), false),
            (Codec::Gzip(6), false),
            (Codec::Zstd(1), true),
        ];
        for (codec, encrypt) in runs {
            let (mb, records, ratio) = archive::pipeline(&scratch("pipeline"), count, codec, encrypt);
            let age = if encrypt { " + age encryption" } else { "" };
            let (name, level) = match codec {
                Codec::Zstd(level) => ("zstd", level),
                Codec::Gzip(level) => ("gzip", level as i32),
            };
            report.push(format!(
                "| archiving pipeline alone, one thread, {name}-{level}{age} ({count} access-log records of ~135 B in memory → cut → encode → compress → publish to disk) | {mb:.0} MB/s raw, {records:.0} records/s, ratio {ratio:.1} |"
            ));
        }
    }

    if wants("archive-e2e") {
        let count = if quick { 200_000 } else { 1_000_000 };
        let rows = archive::end_to_end(&broker, count, 2);
        for (who, seconds) in rows {
            report.push(format!(
                "| archive end to end on the test broker, {count} access-log records (~135 B) over 4 partitions, read from the start: {who} | {seconds:.1} s, {:.0} records/s, {:.1} MB/s |",
                count as f64 / seconds,
                count as f64 * 135.0 / seconds / 1e6
            ));
        }
    }

    if wants("crash") {
        let kills =
            value("--kills").map_or(if quick { 100 } else { 1000 }, |n| n.parse().expect("--kills N"));
        let crashes = archive::crash_matrix(&broker, kills);
        report.push(format!(
            "| archiver crash matrix: SIGKILL at random moments (50–1500 ms after start, --max-records 50) while producing | {} kills, {} records produced, {} lost, {} archived twice ({} files, {:.0} s) |",
            crashes.kills, crashes.produced, crashes.lost, crashes.twice, crashes.files, crashes.seconds
        ));
    }

    if wants("supervise") {
        let window = Duration::from_secs(if quick { 10 } else { 30 });
        let restarts = if quick { 20 } else { 100 };
        let mut shiva = supervise::shiva(&broker, window, restarts);
        let standalone = supervise::shiva(&Broker::file_bus(Vec::new()), window, 0);
        let mut supervisord = supervise::supervisord(window, restarts);
        report.extend(supervise::rows(&mut shiva, &standalone, &mut supervisord, window));
    }

    // `swarm` runs the harness on the test broker and on the file bus; `swarm-files` on the
    // file bus only (Shiva's own limit, without the broker's).
    if wants("swarm") || wants("swarm-files") {
        let (nodes, tasks) = if quick { (200, 2_000) } else { (1_000, 10_000) };
        let mut figures = Vec::new();
        if wants("swarm") {
            let on_kafka = swarm::run(&runtime, &broker, "test broker (tansu)", nodes, tasks);
            eprintln!("{}", swarm::rows(std::slice::from_ref(&on_kafka))[0]);
            figures.push(on_kafka);
        }
        figures.push(swarm::run(&runtime, &Broker::file_bus(Vec::new()), "file bus", nodes, tasks));
        report.extend(swarm::rows(&figures));
    }

    if wants("cluster") {
        cluster_figures(&runtime, &broker, &mut report, quick, &node_args, fetch_wait);
    }

    if wants("filebus") {
        filebus_figures(&runtime, &broker, &mut report, quick);
    }

    if wants("api") {
        api_figures(&runtime, &broker, &mut report, quick);
    }

    println!("| measure | result |\n|---|---|");
    for line in report {
        println!("{line}");
    }
}

/// The file bus (issue 16): what an acknowledged append costs next to a bare write + sync;
/// submit → start, failover and an idle node on the file bus and on Kafka in the same run; the
/// size of a control topic after a day of an idle cluster's heartbeats.
fn filebus_figures(runtime: &tokio::runtime::Runtime, kafka: &Broker, report: &mut Vec<String>, quick: bool) {
    use shiva_bus::filelog::{Cleanup, TopicLog, clean};
    use std::io::Write;

    // An append: one heartbeat-sized record, written and fdatasync'd before it is acknowledged.
    let dir = scratch("append");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    let value = vec![b'v'; 500];
    let count = if quick { 200 } else { 1000 };
    let mut appends = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        log.append(&[(b"node/n1", Some(&value))], 0).unwrap();
        appends.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut floor_file =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join("floor")).unwrap();
    let mut floor = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        floor_file.write_all(&[0u8; 539]).unwrap();
        floor_file.sync_data().unwrap();
        floor.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let ratio = percentile(&mut appends, 0.5) / percentile(&mut floor, 0.5);
    report.push(format!(
        "| file bus: append of one 500 B record, acknowledged (lock, write, fdatasync) | {}; {ratio:.2} × the floor, a bare write + fdatasync of the same bytes on the same disk: {} |",
        summary(&mut appends),
        summary(&mut floor)
    ));

    let file = Broker::file_bus(Vec::new());
    for (label, broker) in [("file bus", &file), ("Kafka (tansu)", kafka)] {
        let name = cluster("fb");
        let mut nodes: Vec<Node> =
            (1..=3).map(|i| Node::launch(broker, &name, &format!("f{i}"), &[])).collect();
        let ctl = Ctl::new(broker, &name);
        wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
        let (rss, cpu, window) = idle(&nodes, quick);
        report.push(format!(
            "| {label}: idle node in a 3-node cluster, default settings | RSS {:.1} MB, CPU {cpu:.2} % of a core (worst of 3 nodes, {}s) |",
            rss as f64 / 1024.0,
            window.as_secs()
        ));
        let dir = scratch("fb-latency");
        let mut latency =
            runtime.block_on(submit_to_start(broker, &name, &dir, if quick { 20 } else { 100 }));
        report.push(format!(
            "| {label}: submit (spec record written) → child started | {} |",
            summary(&mut latency)
        ));
        let mut failovers = Vec::new();
        for _ in 0..(if quick { 2 } else { 5 }) {
            wait_until(Duration::from_secs(30), "3 nodes and a leader", || {
                leader(&ctl).is_some()
                    && ctl.try_json(&["nodes"]).is_some_and(|n| {
                        n.as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3
                    })
            });
            failovers.push(runtime.block_on(failover(broker, &name, &mut nodes, &ctl)));
        }
        report.push(format!(
            "| {label}: leader failover, kill -9 leader → new leader's first write | {} |",
            summary(&mut failovers)
        ));
    }

    // A day (a quarter in --quick) of an idle 3-node cluster's heartbeats (5 a second each,
    // 520 B, as measured), appended 10 s of them at a time, the cleaner after each 10 s as in a
    // node: the control topic's size.
    let dir = scratch("day");
    let mut log = TopicLog::open(&dir, "control").unwrap();
    let value = vec![b'h'; 520];
    let seconds = if quick { 6 * 3600 } else { 24 * 3600 };
    let size = |dir: &Path| -> u64 {
        std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().metadata().unwrap().len()).sum()
    };
    let (started, mut largest, mut written) = (Instant::now(), 0, 0u64);
    let day = 24 * 3600 * 1000;
    for tick in 0..seconds / 10 {
        let now_ms = 1_800_000_000_000 + tick as i64 * 10_000;
        let keys: Vec<String> = (0..150).map(|i| format!("node/n{}", i % 3 + 1)).collect();
        let batch: Vec<(&[u8], Option<&[u8]>)> =
            keys.iter().map(|key| (key.as_bytes(), Some(&value[..]))).collect();
        log.append(&batch, now_ms).unwrap();
        written += 150;
        clean(log.dir(), Cleanup::Compact { tombstones_ms: day }, now_ms).unwrap();
        largest = largest.max(size(log.dir()));
    }
    report.push(format!(
        "| file bus: a control topic after {} h of an idle 3-node cluster's heartbeats ({written} records of 520 B, 10 s at a time, the cleaner every 10 s, 1 MiB segments) | {:.2} MB at the end, {:.2} MB at most ({:.0} MB written; replayed in {:.0} s) |",
        seconds / 3600,
        size(log.dir()) as f64 / 1e6,
        largest as f64 / 1e6,
        written as f64 * 552.0 / 1e6,
        started.elapsed().as_secs_f64()
    ));
}

/// Submit → start, failover and node death on one 3-node cluster.
fn cluster_figures(
    runtime: &tokio::runtime::Runtime,
    broker: &Broker,
    report: &mut Vec<String>,
    quick: bool,
    node_args: &[&str],
    fetch_wait: &str,
) {
    let name = cluster("bench");
    let mut nodes: Vec<Node> =
        (1..=3).map(|i| Node::launch(broker, &name, &format!("n{i}"), node_args)).collect();
    let ctl = Ctl::new(broker, &name);
    wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
    let dir = scratch("bench");
    let mut latency = runtime.block_on(submit_to_start(broker, &name, &dir, if quick { 20 } else { 100 }));
    report.push(format!(
        "| submit (spec record written) → child started, --fetch-wait {fetch_wait} | {} |",
        summary(&mut latency)
    ));

    let rounds = if quick { 2 } else { 5 };
    let mut failovers = Vec::new();
    for _ in 0..rounds {
        wait_until(Duration::from_secs(30), "3 nodes and a leader", || {
            leader(&ctl).is_some()
                && ctl
                    .try_json(&["nodes"])
                    .is_some_and(|n| n.as_array().unwrap().iter().filter(|n| n["alive"] == true).count() == 3)
        });
        failovers.push(runtime.block_on(failover(broker, &name, &mut nodes, &ctl)));
    }
    report.push(format!(
        "| leader failover: kill -9 leader → new leader's first write | {} |",
        summary(&mut failovers)
    ));

    let files: Vec<(String, PathBuf)> = (0..6)
        .map(|i| (format!("bench/s{i}"), dir.join(format!("s{i}"))))
        .take(if quick { 3 } else { 6 })
        .collect();
    let mut deaths = Vec::new();
    for _ in 0..rounds {
        wait_until(Duration::from_secs(30), "3 nodes, a leader, tasks running", || {
            let rows = ctl.tasks();
            leader(&ctl).is_some() && rows.values().all(|row| row["state"] == "running")
        });
        deaths.push(node_death(&mut nodes, &ctl, &files));
    }
    report.push(format!(
        "| node death (kill -9) → all its tasks started elsewhere | {} |",
        summary(&mut deaths)
    ));
}

/// The HTTP API (issue 18): the task list's latency with 1,000 tasks, next to `/healthz` (the
/// floor: the same server, no data) and to `shiva-ctl list` (the CLI reads the log itself); the
/// node's extra memory and idle CPU with the API on, against the same cluster with `--http off`.
fn api_figures(runtime: &tokio::runtime::Runtime, broker: &Broker, report: &mut Vec<String>, quick: bool) {
    // Idle, API off then on: same broker, same settings, one after the other.
    let idle_of = |http: &str| {
        let name = cluster("api-idle");
        let nodes: Vec<Node> =
            (1..=3).map(|i| Node::launch(broker, &name, &format!("a{i}"), &["--http", http])).collect();
        let ctl = Ctl::new(broker, &name);
        wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
        idle(&nodes, quick)
    };
    // Two rounds, alternating: this shared machine varies by a few tenths of a percent.
    for round in 1..=2 {
        let (rss_off, cpu_off, window) = idle_of("off");
        let (rss_on, cpu_on, _) = idle_of("127.0.0.1:0");
        report.push(format!(
            "| idle node in a 3-node cluster, round {round}: --http off / API on (default) | RSS {:.1} / {:.1} MB, CPU {cpu_off:.2} / {cpu_on:.2} % of a core (worst of 3 nodes, {}s each) |",
            rss_off as f64 / 1024.0,
            rss_on as f64 / 1024.0,
            window.as_secs()
        ));
    }

    // 1,000 tasks (pending: their tag is on no node, so nothing runs), one node serving.
    let name = cluster("api-list");
    // The leader (which walks every task each step) serves nothing; two followers read the same
    // log, one with the API: the difference is what the API costs with 1,000 tasks.
    let _leader = Node::launch(broker, &name, "l0", &["--http", "off"]);
    let ctl = Ctl::new(broker, &name);
    wait_until(Duration::from_secs(30), "a leader", || leader(&ctl).is_some());
    let node = Node::launch(broker, &name, "l1", &["--no-leader"]);
    let without = Node::launch(broker, &name, "l2", &["--no-leader", "--http", "off"]);
    let tasks = 1000;
    runtime.block_on(async {
        let config = BusConfig::new(&broker.url(), &name, &[]).unwrap();
        let publisher = Publisher::new(&config, "bench").unwrap();
        for i in 0..tasks {
            let mut spec =
                TaskSpec::new(TaskId::new(format!("list/t{i:04}")).unwrap(), "sleep", vec!["1000".into()]);
            spec.tags = vec!["nowhere".into()];
            shiva_ctl::write_spec(&publisher, &spec).await.unwrap();
        }
    });
    let url = node.http_url();
    let list = format!("{url}/v1/tasks");
    wait_until(Duration::from_secs(60), "1,000 tasks listed", || {
        let answer = shiva_e2e::http("GET", &list, None, None);
        answer.status == 200 && answer.json().as_array().is_some_and(|rows| rows.len() == tasks)
    });
    let samples = if quick { 200 } else { 1000 };
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let time = |target: &str| -> Vec<f64> {
        (0..samples)
            .map(|_| {
                let started = Instant::now();
                let mut response = agent.get(target).call().unwrap();
                let body = response.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap();
                assert!(!body.is_empty());
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect()
    };
    let mut listed = time(&list);
    let mut floor = time(&format!("{url}/healthz"));
    let bytes = shiva_e2e::http("GET", &list, None, None).body.len();
    let mut cli: Vec<f64> = (0..if quick { 5 } else { 20 })
        .map(|_| {
            let started = Instant::now();
            ctl.ok(&["list", "--json"]);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let ratio = percentile(&mut listed, 0.5) / percentile(&mut floor, 0.5);
    let micros = |samples: &mut Vec<f64>| {
        format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs (n={})",
            percentile(samples, 0.5) * 1000.0,
            percentile(samples, 0.99) * 1000.0,
            percentile(samples, 1.0) * 1000.0,
            samples.len()
        )
    };
    report.push(format!(
        "| GET /v1/tasks, 1,000 tasks ({} kB), one client, keep-alive | {} ({ratio:.1} × the floor's p50) |",
        bytes / 1024,
        micros(&mut listed)
    ));
    report.push(format!("| floor: GET /healthz, same server | {} |", micros(&mut floor)));
    report.push(format!(
        "| peer: shiva-ctl list --json (reads the log itself), same cluster | {} |",
        summary(&mut cli)
    ));
    // Both nodes read the same log; one serves the API (and answered the requests above).
    let pair = [node, without];
    let (_, _, window) = idle(&pair[..1], true);
    let cpu: Vec<f64> = {
        let before: Vec<u64> = pair.iter().map(|node| cpu_ns(node.pid())).collect();
        std::thread::sleep(window);
        pair.iter()
            .zip(before)
            .map(|(node, before)| (cpu_ns(node.pid()) - before) as f64 / window.as_nanos() as f64 * 100.0)
            .collect()
    };
    report.push(format!(
        "| idle, 1,000 tasks: node with the API / node with --http off, same cluster ({}s) | RSS {:.1} / {:.1} MB, CPU {:.2} / {:.2} % of a core |",
        window.as_secs(),
        rss_kb(pair[0].pid()) as f64 / 1024.0,
        rss_kb(pair[1].pid()) as f64 / 1024.0,
        cpu[0],
        cpu[1]
    ));
}
