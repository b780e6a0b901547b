//! Heartbeat bookkeeping: what goes into a heartbeat, and the read-back gate (a node that
//! cannot read its own heartbeats back stops sending them until it can).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::clock::Boot;

use shiva_proto::NodeId;
use shiva_proto::records::{Heartbeat, Resources};
use sysinfo::System;
use uuid::Uuid;

/// Heartbeats sent and not yet read back.
#[derive(Debug, Default)]
pub struct Gate {
    seq: u64,
    outstanding: VecDeque<(u64, Boot)>,
    paused: bool,
    newest_read_back: Option<Boot>,
}

/// What the gate says about the next heartbeat.
#[derive(Debug, PartialEq, Eq)]
pub enum GateDecision {
    /// Send heartbeat number `seq`.
    Send(u64),
    /// Just paused: the oldest unread heartbeat is older than the limit.
    Pause,
    /// Still paused.
    Paused,
}

impl Gate {
    /// Decides about the next heartbeat; `limit` is how long a heartbeat may stay unread.
    pub fn next(&mut self, now: Boot, limit: Duration) -> GateDecision {
        if self.outstanding.front().is_some_and(|(_, sent)| now.saturating_since(*sent) > limit) {
            return if std::mem::replace(&mut self.paused, true) {
                GateDecision::Paused
            } else {
                GateDecision::Pause
            };
        }
        self.paused = false;
        self.seq += 1;
        self.outstanding.push_back((self.seq, now));
        GateDecision::Send(self.seq)
    }

    /// Own heartbeat `seq` was read back.
    pub fn read_back(&mut self, seq: u64) {
        while let Some((sent, at)) = self.outstanding.front().copied()
            && sent <= seq
        {
            if sent == seq {
                self.newest_read_back = Some(self.newest_read_back.map_or(at, |newest| newest.max(at)));
            }
            self.outstanding.pop_front();
        }
    }

    /// The send instant of the newest own heartbeat read back: the lease runs from there.
    pub fn lease_start(&self) -> Option<Boot> {
        self.newest_read_back
    }

    /// Heartbeat `seq` was not delivered: it will never be read back.
    pub fn failed(&mut self, seq: u64) {
        self.outstanding.retain(|(sent, _)| *sent != seq);
    }

    /// Whether heartbeats flow: not paused.
    pub fn is_open(&self) -> bool {
        !self.paused
    }
}

/// Clock samples of peers (for `nodes`' clock offsets, display only): for each peer incarnation,
/// `its sent_at_ms - this node's wall clock when it read the heartbeat` over its last
/// [`CLOCK_WINDOW`] heartbeats. The largest is the one read with the least delay, so the best.
#[derive(Debug, Default)]
pub struct ClockSamples {
    peers: BTreeMap<NodeId, (Uuid, VecDeque<i64>)>,
}

/// Heartbeats a clock sample is the best of.
pub const CLOCK_WINDOW: usize = 16;

impl ClockSamples {
    /// A peer's heartbeat sent at `sent_at_ms` (its clock) was read at `now_ms` (this node's).
    pub fn on_heartbeat(&mut self, node: &NodeId, incarnation: Uuid, sent_at_ms: u64, now_ms: i64) {
        let sample = i64::try_from(sent_at_ms).unwrap_or(i64::MAX).saturating_sub(now_ms);
        let entry = self.peers.entry(node.clone()).or_insert_with(|| (incarnation, VecDeque::new()));
        if entry.0 != incarnation {
            *entry = (incarnation, VecDeque::new());
        }
        if entry.1.len() == CLOCK_WINDOW {
            entry.1.pop_front();
        }
        entry.1.push_back(sample);
    }

    /// The best sample of each of `peers` (those sampled).
    ///
    /// `nodes` shows each node's offset from the leader's clock, from the leader's sample of the
    /// node and the node's sample of the leader: a node that may lead samples every live peer, a
    /// node that may not samples only those that may. So a heartbeat carries a bounded number of
    /// samples, not one per node of the cluster (with every node reading every heartbeat, that
    /// grew as the square of the cluster: 2,500 samples a second decoded by each of 50 nodes).
    pub fn best<'a>(&self, peers: impl Iterator<Item = &'a NodeId>) -> BTreeMap<NodeId, i64> {
        peers
            .filter_map(|peer| {
                let best = self.peers.get(peer)?.1.iter().copied().max()?;
                Some((peer.clone(), best))
            })
            .collect()
    }
}

/// The peers whose clock samples a heartbeat carries (see [`ClockSamples::best`]): every live
/// one for a node that may lead, those that may lead for a node that may not.
pub fn sampled<'a>(
    leader_capable: bool,
    live: &'a [shiva_proto::records::Member],
) -> impl Iterator<Item = &'a NodeId> + 'a {
    live.iter().filter(move |member| leader_capable || member.leader_capable).map(|member| &member.id)
}

/// Host resources, refreshed at most every few seconds.
pub struct ResourceProbe {
    system: System,
    last: Option<(Instant, Resources)>,
}

impl ResourceProbe {
    /// A probe.
    pub fn new() -> Self {
        ResourceProbe { system: System::new(), last: None }
    }

    /// Current resources (cached for 5 s: heartbeats are frequent, /proc reads are not free).
    pub fn resources(&mut self) -> Resources {
        if let Some((at, resources)) = &self.last
            && at.elapsed() < Duration::from_secs(5)
        {
            return resources.clone();
        }
        self.system.refresh_memory();
        let resources = Resources {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_total_bytes: self.system.total_memory(),
            memory_available_bytes: self.system.available_memory(),
            load1: System::load_average().one,
        };
        self.last = Some((Instant::now(), resources.clone()));
        resources
    }
}

/// Fields of a heartbeat that do not change between beats.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Host name.
    pub hostname: String,
    /// Tags.
    pub tags: Vec<String>,
    /// May lead.
    pub leader_capable: bool,
    /// Runs tasks.
    pub runner: bool,
    /// Heartbeat interval.
    pub interval: Duration,
    /// Fence timeout.
    pub fence_timeout: Duration,
    /// The incarnation this one replaces on its workspace (see `Heartbeat::replaces`).
    pub replaces: Option<Uuid>,
    /// The `--authorized-keys` file's text (a signed cluster), published for `shiva-ctl`.
    pub authorized_keys: Option<String>,
    /// The age recipient of this node's identity (secrets are encrypted to it).
    pub recipient: Option<String>,
}

/// Builds heartbeat `seq`. It lists none of the node's runs (see `Heartbeat::runs`): its size
/// and cost do not grow with them.
pub fn build(
    identity: &Identity,
    seq: u64,
    returns: u64,
    resources: Resources,
    clock_ms: BTreeMap<NodeId, i64>,
) -> Heartbeat {
    Heartbeat {
        protocol: shiva_proto::protocol(),
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        seq,
        hostname: identity.hostname.clone(),
        tags: identity.tags.clone(),
        leader_capable: identity.leader_capable,
        runner: identity.runner,
        interval_ms: identity.interval.as_millis() as u64,
        fence_timeout_ms: Some(identity.fence_timeout.as_millis() as u64),
        returns,
        authorized_keys: identity.authorized_keys.clone(),
        recipient: identity.recipient.clone(),
        resources,
        runs: Vec::new(),
        features: shiva_proto::records::feature::ALL.iter().map(|name| (*name).to_owned()).collect(),
        clock_ms,
        replaces: identity.replaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_pauses_until_read_back() {
        let mut gate = Gate::default();
        let start = Boot::now();
        let limit = Duration::from_secs(1);
        assert_eq!(gate.next(start, limit), GateDecision::Send(1));
        assert_eq!(gate.next(start + Duration::from_millis(500), limit), GateDecision::Send(2));
        assert_eq!(gate.next(start + Duration::from_millis(1500), limit), GateDecision::Pause);
        assert_eq!(gate.next(start + Duration::from_millis(1700), limit), GateDecision::Paused);
        assert!(!gate.is_open());
        assert_eq!(gate.lease_start(), None);
        gate.read_back(1);
        assert_eq!(gate.lease_start(), Some(start), "the lease runs from the send instant");
        assert_eq!(
            gate.next(start + Duration::from_millis(1800), limit),
            GateDecision::Paused,
            "2 is still unread"
        );
        gate.read_back(2);
        assert_eq!(gate.next(start + Duration::from_millis(1800), limit), GateDecision::Send(3));
        assert!(gate.is_open());
        gate.failed(3);
        assert_eq!(gate.next(start + Duration::from_secs(60), limit), GateDecision::Send(4));
    }

    #[test]
    fn a_clock_sample_is_the_best_of_the_recent_heartbeats_of_one_incarnation() {
        let mut samples = ClockSamples::default();
        let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        let inc = Uuid::new_v4();
        // a's clock is 500 ms ahead; heartbeats read 3 to 40 ms after they were sent.
        for (i, delay) in [40, 3, 25, 17].into_iter().enumerate() {
            let sent = 1_000_000 + 200 * i as i64;
            samples.on_heartbeat(&a, inc, (sent + 500) as u64, sent + delay);
        }
        assert_eq!(samples.best([&a, &b].into_iter()), BTreeMap::from([(a.clone(), 497)]));
        // Old samples leave the window; a new incarnation starts afresh.
        for i in 0..CLOCK_WINDOW as i64 {
            samples.on_heartbeat(&a, inc, (2_000_000 + 500) as u64, 2_000_000 + 10 + i);
        }
        assert_eq!(samples.best([&a].into_iter())[&a], 490);
        samples.on_heartbeat(&a, Uuid::new_v4(), 0, i64::MAX);
        assert_eq!(samples.best([&a].into_iter())[&a], -i64::MAX);
        samples.on_heartbeat(&b, inc, u64::MAX, i64::MIN);
        assert_eq!(samples.best([&b].into_iter())[&b], i64::MAX);
    }

    #[test]
    fn a_node_that_may_not_lead_samples_only_the_nodes_that_may_and_the_offset_from_the_leader_holds() {
        use shiva_proto::records::{Body, Envelope, Heartbeat, Member, clock_offset_ms};
        let member = |id: &str, leader_capable: bool| Member {
            id: NodeId::new(id).unwrap(),
            incarnation: Uuid::new_v4(),
            hostname: id.into(),
            tags: Vec::new(),
            runner: true,
            leader_capable,
            returns: 0,
            features: Vec::new(),
        };
        // Three that may lead among a thousand.
        let live: Vec<Member> = (0..1000).map(|i| member(&format!("n{i:04}"), i < 3)).collect();
        let ids =
            |leader_capable| sampled(leader_capable, &live).map(|id| id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(false), ["n0000", "n0001", "n0002"]);
        assert_eq!(ids(true).len(), 1000);
        // The leader n0000 runs 300 ms ahead of runner n0500; each read the other 10 ms late.
        let (leader, runner) = (&live[0].id, &live[500].id);
        let mut at_leader = ClockSamples::default();
        let mut at_runner = ClockSamples::default();
        at_leader.on_heartbeat(runner, live[500].incarnation, 1_000_000, 1_000_000 + 300 + 10);
        at_runner.on_heartbeat(leader, live[0].incarnation, 2_000_000 + 300, 2_000_000 + 10);
        let beat = |samples: &ClockSamples, leader_capable| {
            let mut beat = Heartbeat::of_newer_protocol(1);
            beat.clock_ms = samples.best(sampled(leader_capable, &live));
            beat
        };
        let (leader_beat, runner_beat) = (beat(&at_leader, true), beat(&at_runner, false));
        assert_eq!(runner_beat.clock_ms.len(), 1, "the runner sampled the leader only");
        assert_eq!(clock_offset_ms(runner, &runner_beat, leader, &leader_beat), Some(-300));
        // And a runner's heartbeat stays small: one sample per node that may lead.
        let size = Envelope::now("n0500", None, Body::Heartbeat(runner_beat)).encode().len();
        assert!(size < 600, "a runner's heartbeat is {size} bytes");
    }
}
