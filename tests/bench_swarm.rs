//! Issue 21, point 3: a swarm of simulated runner nodes speaking the real protocol, beside real
//! leader-capable `shiva-node` processes (`--no-runner`), against the real bus. The swarm lives in
//! this process: it writes each simulated node's heartbeat every interval (every feature, no
//! tags), reads `assignments`, and for every service placed on one of its nodes writes the
//! `running` status a runner would (its sender and incarnation that node's). Measured, for a
//! number of tasks submitted at once: placements per second end to end (the first spec written →
//! the last task's `running` status written by the node it was placed on), the leader's CPU while
//! placing and while idle, the records written per node and second, and a failover (the leader
//! killed → the next leader's first assignment of a task).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shiva_bus::{BusConfig, Publisher, Reader, ReaderEvent, admin};
use shiva_e2e::{Broker, Ctl, Node, cluster};
use shiva_proto::records::{Body, Envelope, Heartbeat, Placement, Resources, RunState, TaskStatus, feature};
use shiva_proto::topics::key;
use shiva_proto::{NodeId, TaskId, TaskSpec, TopicKind};
use tokio::sync::mpsc;
use uuid::Uuid;

/// The heartbeat interval of the swarm and of the real nodes (the real default is 200 ms: a
/// thousand nodes at that pace would be 5,000 heartbeats a second, each read by every real node).
const INTERVAL: Duration = Duration::from_secs(1);

/// What one run measured.
pub struct Figures {
    pub bus: &'static str,
    pub nodes: usize,
    pub tasks: usize,
    /// First spec written → last `running` status written.
    pub placed: Duration,
    /// The leader's CPU while placing, and per second while idle afterwards (ms).
    pub leader_cpu_placing_ms: f64,
    pub leader_cpu_idle_ms_per_s: f64,
    /// Records written per second on every topic while idle, and per node.
    pub records_per_s_idle: f64,
    /// The leader killed → the next leader's first assignment (ms).
    pub failover_ms: f64,
}

fn node_flags() -> Vec<String> {
    [
        "--no-runner",
        "--heartbeat-interval",
        "1s",
        "--leader-timeout",
        "3s",
        "--fence-timeout",
        "6s",
        "--node-timeout",
        "10s",
        "--http",
        "off",
    ]
    .iter()
    .map(|flag| (*flag).to_owned())
    .collect()
}

struct Swarm {
    ids: Vec<(NodeId, Uuid)>,
    publisher: Arc<Publisher>,
}

impl Swarm {
    fn heartbeat(&self, seq: u64) {
        for (id, incarnation) in &self.ids {
            let body = Body::Heartbeat(Heartbeat {
                protocol: shiva_proto::PROTOCOL_VERSION,
                version: Some("swarm".into()),
                seq,
                hostname: id.to_string(),
                tags: Vec::new(),
                leader_capable: false,
                runner: true,
                interval_ms: u64::try_from(INTERVAL.as_millis()).unwrap(),
                fence_timeout_ms: Some(6_000),
                returns: 0,
                features: feature::ALL.iter().map(|f| (*f).to_owned()).collect(),
                recipient: None,
                authorized_keys: None,
                resources: Resources::default(),
                runs: Vec::new(),
                clock_ms: BTreeMap::new(),
                replaces: None,
            });
            let value = Envelope::now(id.to_string(), Some(*incarnation), body).encode();
            // Queued now, in order; the acknowledgement is not awaited.
            drop(self.publisher.enqueue(TopicKind::Control, &key::node(id), Some(&value)));
        }
    }

    /// Answers every assignment naming one of its nodes with a `running` status of its
    /// generation; returns when `tasks` tasks have one, with the instant of the last.
    async fn answer(&self, rx: &mut mpsc::Receiver<ReaderEvent>, tasks: usize, prefix: &str) -> Instant {
        let incarnations: BTreeMap<&NodeId, Uuid> = self.ids.iter().map(|(id, inc)| (id, *inc)).collect();
        let mut answered: BTreeMap<TaskId, u64> = BTreeMap::new();
        let mut last = Instant::now();
        while answered.len() < tasks {
            let Some(event) = rx.recv().await else { panic!("the swarm's reader stopped") };
            let ReaderEvent::Record(record) = event else { continue };
            let Some(Ok(envelope)) = record.value.as_deref().map(Envelope::decode) else { continue };
            let Body::Assignment(assignment) = envelope.body else { continue };
            let Placement::Assigned { node } = &assignment.placement else { continue };
            let Some(incarnation) = incarnations.get(node) else { continue };
            if !assignment.task.as_str().starts_with(prefix)
                || answered
                    .get(&assignment.task)
                    .is_some_and(|generation| *generation >= assignment.generation)
            {
                continue;
            }
            let status = TaskStatus {
                task: assignment.task.clone(),
                generation: assignment.generation,
                state: RunState::Running,
                run_id: Some(Uuid::new_v4()),
                pid: Some(1),
                attempt: 1,
                restarts: 0,
                last_exit: None,
                message: None,
                permanent: false,
                after: Vec::new(),
            };
            let value = Envelope::now(node.to_string(), Some(*incarnation), Body::Status(status)).encode();
            drop(self.publisher.enqueue(TopicKind::Status, &key::task(&assignment.task), Some(&value)));
            answered.insert(assignment.task, assignment.generation);
            last = Instant::now();
        }
        last
    }
}

/// The live nodes and the leader, as `shiva-ctl nodes` shows them.
fn alive_and_leader(ctl: &Ctl) -> (usize, Option<String>) {
    let Some(nodes) = ctl.try_json(&["nodes"]) else { return (0, None) };
    let rows = nodes.as_array().cloned().unwrap_or_default();
    let alive = rows.iter().filter(|n| n["alive"] == true).count();
    let leader = rows.iter().find(|n| n["leader"] == true).and_then(|n| n["id"].as_str()).map(str::to_owned);
    (alive, leader)
}

/// Records written per second on every topic, over about `window` (the ends of the topics read
/// twice, divided by the time between the two reads' ends).
async fn records_per_s(config: &BusConfig, window: Duration) -> f64 {
    let ends = |config: BusConfig| async move {
        let topics = [TopicKind::Commands, TopicKind::Control, TopicKind::Assignments, TopicKind::Status];
        let mut highest: BTreeMap<TopicKind, i64> = BTreeMap::new();
        super::read_to_end(&config, &topics, |record| {
            let top = highest.entry(record.topic).or_insert(record.offset);
            *top = (*top).max(record.offset);
        })
        .await;
        (highest.values().map(|offset| u64::try_from(offset + 1).unwrap_or(0)).sum::<u64>(), Instant::now())
    };
    let (before, from) = ends(config.clone()).await;
    tokio::time::sleep(window).await;
    let (after, to) = ends(config.clone()).await;
    after.saturating_sub(before) as f64 / to.duration_since(from).as_secs_f64()
}

/// One run: `leaders` real nodes, `nodes` simulated runners, `tasks` services.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    broker: &Broker,
    bus: &'static str,
    nodes: usize,
    tasks: usize,
) -> Figures {
    let name = cluster("swarm");
    // On Kafka, batches of the swarm's many small writes.
    let batching =
        if broker.url().starts_with("kafka://") { vec!["linger.ms=5".to_owned()] } else { Vec::new() };
    let config = BusConfig::new(&broker.url(), &name, &batching).unwrap();
    runtime.block_on(admin::ensure_topics(&config, Duration::from_secs(10))).unwrap();
    let flags = node_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut real: Vec<Node> =
        (1..=3).map(|i| Node::launch(broker, &name, &format!("l{i}"), &flags)).collect();
    let ctl = Ctl::new(broker, &name);
    let publisher = Publisher::new(&config, "swarm").unwrap();
    let swarm = Arc::new(Swarm {
        ids: (0..nodes).map(|i| (NodeId::new(format!("s{i:04}")).unwrap(), Uuid::new_v4())).collect(),
        publisher: publisher.clone(),
    });
    let beating = Arc::new(AtomicBool::new(true));
    let beats = {
        let (swarm, beating) = (swarm.clone(), beating.clone());
        runtime.spawn(async move {
            let mut seq = 0;
            while beating.load(Ordering::Relaxed) {
                seq += 1;
                swarm.heartbeat(seq);
                tokio::time::sleep(INTERVAL).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let leader = loop {
        assert!(Instant::now() < deadline, "the swarm's {nodes} nodes were not all seen alive with a leader");
        if let (alive, Some(leader)) = alive_and_leader(&ctl)
            && alive >= nodes + 3
        {
            break leader;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let pid = |id: &str| real.iter().find(|node| node.id == id).unwrap().pid();
    let (tx, mut rx) = mpsc::channel(1 << 16);
    let _reader = Reader::spawn(&config, &[TopicKind::Assignments], tx).unwrap();

    // Every spec at once, as `apply` of one file would write them.
    let cpu_before = super::cpu_ns(pid(&leader));
    let started = Instant::now();
    let last = runtime.block_on(async {
        let mut acks = Vec::with_capacity(tasks);
        for i in 0..tasks {
            let spec =
                TaskSpec::new(TaskId::new(format!("swarm/t{i:05}")).unwrap(), "sleep", vec!["1000".into()]);
            let publisher = publisher.clone();
            acks.push(tokio::spawn(async move { shiva_ctl::write_spec(&publisher, &spec).await }));
        }
        let answering = swarm.answer(&mut rx, tasks, "swarm/");
        let (last, written) = tokio::join!(answering, async {
            let mut written = 0;
            for ack in acks {
                ack.await.unwrap().unwrap();
                written += 1;
            }
            written
        });
        assert_eq!(written, tasks);
        last
    });
    let placed = last.duration_since(started);
    let leader_cpu_placing_ms = (super::cpu_ns(pid(&leader)) - cpu_before) as f64 / 1e6;

    // Idle: the swarm's heartbeats go on, nothing else changes (after 10 s for the leader to
    // fold the last statuses).
    std::thread::sleep(Duration::from_secs(10));
    let idle = Duration::from_secs(10);
    let cpu_before = super::cpu_ns(pid(&leader));
    let records_per_s_idle = runtime.block_on(records_per_s(&config, idle));
    let leader_cpu_idle_ms_per_s =
        (super::cpu_ns(pid(&leader)) - cpu_before) as f64 / 1e6 / idle.as_secs_f64();

    // Failover: the leader killed; a new one assigns a task submitted meanwhile.
    let killed = Instant::now();
    real.iter_mut().find(|node| node.id == leader).unwrap().kill9();
    let failover = runtime.block_on(async {
        let spec = TaskSpec::new(TaskId::new("after/failover").unwrap(), "sleep", vec!["1000".into()]);
        shiva_ctl::write_spec(&publisher, &spec).await.unwrap();
        swarm.answer(&mut rx, 1, "after/").await
    });
    let failover_ms = failover.duration_since(killed).as_secs_f64() * 1000.0;
    beating.store(false, Ordering::Relaxed);
    runtime.block_on(beats).unwrap();
    Figures {
        bus,
        nodes,
        tasks,
        placed,
        leader_cpu_placing_ms,
        leader_cpu_idle_ms_per_s,
        records_per_s_idle,
        failover_ms,
    }
}

/// The report's rows.
pub fn rows(figures: &[Figures]) -> Vec<String> {
    figures
        .iter()
        .map(|f| {
            format!(
                "| swarm on the {}: {} simulated runners + 3 real leader-capable nodes, {} services submitted at once | placed and reported running in {:.1} s: **{:.0} placements/s** end to end; leader CPU {:.1} s while placing; idle: leader {:.0} ms of CPU per s, {:.0} records/s on the bus ({:.2} per node per s); failover (leader SIGKILLed → a new task assigned by the next leader) {:.1} s |",
                f.bus,
                f.nodes,
                f.tasks,
                f.placed.as_secs_f64(),
                f.tasks as f64 / f.placed.as_secs_f64(),
                f.leader_cpu_placing_ms / 1000.0,
                f.leader_cpu_idle_ms_per_s,
                f.records_per_s_idle,
                f.records_per_s_idle / (f.nodes + 3) as f64,
                f.failover_ms / 1000.0
            )
        })
        .collect()
}
