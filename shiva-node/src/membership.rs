//! Membership in log time: a peer is gone when one of this node's own heartbeats, *sent* at
//! least the timeout after this node *read* the peer's newest heartbeat, has landed in `control`
//! and been read back. Only this node's own clock is used (never the peer's, nor the broker's):
//! the own heartbeat was appended after the peer's (it was sent after that was read), so the log
//! holds nothing of the peer over at least the timeout between the two landings. A node that
//! cannot write or read its own heartbeats stops advancing log time, so it never judges others
//! gone.
//!
//! Log time is the send instant of the newest own heartbeat read back, not a count of own
//! heartbeats: heartbeats queued in the producer and landing in a burst, and a retried heartbeat
//! landing twice, advance a count by time that never passed in the log (six queued heartbeats ate
//! the whole margin at the default settings). A send instant advances only with time that passed.
//! See docs/architecture.md, "Log time and its margins", for the worst case.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shiva_proto::NodeId;
use shiva_proto::records::{Heartbeat, Member};
use uuid::Uuid;

use crate::clock::Boot;

/// What this node knows of a peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Incarnation of its newest heartbeat.
    pub incarnation: Uuid,
    /// When this node read the peer's newest heartbeat.
    pub seen_at: Boot,
    /// The newest heartbeat.
    pub heartbeat: Heartbeat,
}

/// The longest fence timeout a heartbeat may announce (`--fence-timeout`'s maximum).
pub const MAX_FENCE: Duration = Duration::from_secs(3600);

/// The largest rate difference between two nodes' clocks that the move rules absorb: 1000 ppm
/// (each clock within 500 ppm, the most the kernel's NTP discipline slews). A peer measures its
/// fence timeout on its own clock; this node waits that long on its clock plus this share of it.
pub const CLOCK_RATE_BOUND_PPM: u32 = 1000;

/// One incarnation of a node id, as heartbeats show it.
#[derive(Debug, Clone)]
struct Seen {
    /// When its first heartbeat was read.
    first: Boot,
    /// When its newest heartbeat was read.
    last: Boot,
    /// Its newest heartbeat.
    heartbeat: Heartbeat,
}

/// Log time after which an incarnation's entry is forgotten: longer than any timeout (node
/// timeout at most an hour) and any move wait (a fence of at most an hour, a stop grace of at
/// most an hour, the margin and the clock rate bound: see [`move_wait`]).
const FORGET_AFTER: Duration = Duration::from_secs(3 * 3600);

/// Heartbeats folded in log order.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    incarnation: Uuid,
    /// Log time: the send instant of the newest own heartbeat read back.
    log_now: Option<Boot>,
    peers: BTreeMap<NodeId, Peer>,
    /// Every incarnation of each id heard from lately: two live at once are a conflict (cloned
    /// machines, a healed partition), of which one runs the id's tasks (see `live_members`).
    incarnations: BTreeMap<NodeId, BTreeMap<Uuid, Seen>>,
    left: BTreeSet<(NodeId, Uuid)>,
}

impl Membership {
    /// Membership as seen by `me` in `incarnation`.
    pub fn new(me: NodeId, incarnation: Uuid) -> Self {
        Membership {
            me,
            incarnation,
            log_now: None,
            peers: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            left: BTreeSet::new(),
        }
    }

    /// Log time: the send instant of the newest own heartbeat read back (none yet: nobody has
    /// been silent for any time).
    pub fn log_now(&self) -> Option<Boot> {
        self.log_now
    }

    /// How much log time passed since `instant` (this node's clock): zero before the first own
    /// heartbeat read back.
    pub fn log_since(&self, instant: Boot) -> Duration {
        self.log_now.map_or(Duration::ZERO, |now| now.saturating_since(instant))
    }

    /// An own heartbeat sent at `sent` was read back: log time moves to it (never back).
    pub fn advance(&mut self, sent: Boot) {
        self.log_now = Some(self.log_now.map_or(sent, |now| now.max(sent)));
    }

    /// Folds a heartbeat read from the log at `now`. Returns true when it is one of this node's
    /// own (log time then moves with [`Membership::advance`], by its send instant).
    pub fn on_heartbeat(
        &mut self,
        node: &NodeId,
        incarnation: Uuid,
        heartbeat: &Heartbeat,
        now: Boot,
    ) -> bool {
        let own = *node == self.me && incarnation == self.incarnation;
        let peer = Peer { incarnation, seen_at: now, heartbeat: heartbeat.clone() };
        self.peers.insert(node.clone(), peer);
        let log_now = self.log_now;
        let seen = self.incarnations.entry(node.clone()).or_default();
        seen.retain(|inc, seen| {
            *inc == incarnation || log_now.is_none_or(|at| at.saturating_since(seen.last) < FORGET_AFTER)
        });
        let entry =
            seen.entry(incarnation).or_insert(Seen { first: now, last: now, heartbeat: heartbeat.clone() });
        entry.last = now;
        entry.heartbeat = heartbeat.clone();
        own
    }

    /// Folds a departure.
    pub fn on_leave(&mut self, node: &NodeId, incarnation: Uuid) {
        self.left.insert((node.clone(), incarnation));
    }

    /// Whether a heartbeat of `node` in `incarnation` was read (lately).
    pub fn knows(&self, node: &NodeId, incarnation: Uuid) -> bool {
        self.incarnations.get(node).is_some_and(|seen| seen.contains_key(&incarnation))
    }

    /// The newest heartbeat's peer entry.
    pub fn peer(&self, node: &NodeId) -> Option<&Peer> {
        self.peers.get(node)
    }

    /// Whether `node` (in `incarnation`, if given; else in any) is alive: that incarnation did
    /// not leave, and less than `timeout` of log time passed since its newest heartbeat was read.
    pub fn is_alive(&self, node: &NodeId, incarnation: Option<Uuid>, timeout: Duration) -> bool {
        if *node == self.me && incarnation.is_none_or(|inc| inc == self.incarnation) {
            return true;
        }
        self.live_incarnations(node, timeout).any(|(inc, _)| incarnation.is_none_or(|wanted| wanted == inc))
    }

    /// The live incarnations of `node`, with their entries: not departed, not replaced, and
    /// heard from within `timeout` of log time.
    fn live_incarnations<'m>(
        &'m self,
        node: &'m NodeId,
        timeout: Duration,
    ) -> impl Iterator<Item = (Uuid, &'m Seen)> + 'm {
        self.incarnations
            .get(node)
            .into_iter()
            .flatten()
            .filter(move |(inc, seen)| !self.gone(node, **inc) && self.log_since(seen.last) < timeout)
            .map(|(inc, seen)| (*inc, seen))
    }

    /// Whether `incarnation` of `node` is known to be over: it left, or a later incarnation
    /// replaced it on its workspace (a restart: see `Heartbeat::replaces`). Nothing else ends an
    /// incarnation but silence: a second machine with the same id (a clone) is a conflict, and
    /// the first keeps the id's tasks while it lives.
    fn gone(&self, node: &NodeId, incarnation: Uuid) -> bool {
        self.left.contains(&(node.clone(), incarnation))
            || self
                .incarnations
                .get(node)
                .is_some_and(|seen| seen.values().any(|other| other.heartbeat.replaces == Some(incarnation)))
    }

    /// Whether `incarnation` of `node` may still hold an exclusive run with `grace` to stop it
    /// (see [`Membership::may_still_run`]): it is not over, and less than the move wait has passed
    /// since its newest heartbeat was read. An incarnation never heard from holds nothing.
    pub fn incarnation_may_still_run(
        &self,
        node: &NodeId,
        incarnation: Uuid,
        grace: Duration,
        margin: Duration,
        default_fence: Duration,
    ) -> bool {
        if *node == self.me && incarnation == self.incarnation {
            return true;
        }
        let Some(seen) = self.incarnations.get(node).and_then(|seen| seen.get(&incarnation)) else {
            return false;
        };
        // A heartbeat's fence timeout is read within the node flag's range (at most 1h).
        let fence =
            seen.heartbeat.fence_timeout_ms.map_or(default_fence, Duration::from_millis).min(MAX_FENCE);
        !self.gone(node, incarnation) && self.log_since(seen.last) < move_wait(fence, grace, margin)
    }

    /// Node ids with more than one live incarnation (cloned machines started together, a
    /// healed partition), each with its live incarnations, oldest first.
    pub fn conflicts(&self, timeout: Duration) -> BTreeMap<NodeId, Vec<Uuid>> {
        self.incarnations
            .keys()
            .filter_map(|node| {
                let mut live: Vec<(Boot, Uuid)> =
                    self.live_incarnations(node, timeout).map(|(inc, seen)| (seen.first, inc)).collect();
                if *node == self.me && !live.iter().any(|(_, inc)| *inc == self.incarnation) {
                    live.push((Boot::default(), self.incarnation));
                }
                live.sort();
                (live.len() > 1).then(|| (node.clone(), live.into_iter().map(|(_, inc)| inc).collect()))
            })
            .collect()
    }

    /// Whether `node` may still hold an exclusive run with `grace` to stop it: it did not leave,
    /// and less log time than its fence timeout plus `grace` plus `margin` (plus the clock rate
    /// bound's share) has passed since its newest heartbeat was read. The node's lease ran from
    /// the send instant of a heartbeat of its that landed no later than that one (one that landed
    /// later would have been read before the own heartbeat that moved log time), so past that it
    /// has stopped the run (its shim kills it at the latest). `default_fence` stands in for a
    /// heartbeat without a fence timeout.
    pub fn may_still_run(
        &self,
        node: &NodeId,
        grace: Duration,
        margin: Duration,
        default_fence: Duration,
    ) -> bool {
        // Any incarnation of it that is not over (two may run at once: a conflict).
        self.incarnations
            .get(node)
            .into_iter()
            .flatten()
            .any(|(inc, _)| self.incarnation_may_still_run(node, *inc, grace, margin, default_fence))
    }

    /// A live, leader-capable node of a newer protocol than this build's, if any: this node
    /// then neither claims nor keeps leadership (see `election`), so that the newest version
    /// leads a mixed cluster and never competes with a leader it cannot fully read.
    pub fn newer_protocol_live(&self, timeout: Duration) -> Option<(&NodeId, u16)> {
        let mine = shiva_proto::protocol();
        self.incarnations
            .keys()
            .flat_map(|id| self.live_incarnations(id, timeout).map(move |(_, seen)| (id, seen)))
            // Heard from over the whole timeout, not just once (a single forged record does not
            // make the leader resign).
            .find(|(_, seen)| {
                seen.heartbeat.protocol > mine
                    && seen.heartbeat.leader_capable
                    && self.log_since(seen.first) >= timeout
            })
            .map(|(id, seen)| (id, seen.heartbeat.protocol))
    }

    /// Live nodes (this one included once its heartbeat was read back), sorted by id, one
    /// incarnation each: of two live incarnations of one id (a conflict), the first live one
    /// `prefer` names (the leader passes those its assignments name, then the one its `members`
    /// record lists, so the choice holds), else the one heard from first. Only the incarnation listed runs the id's tasks.
    pub fn live_members(&self, timeout: Duration, prefer: &dyn Fn(&NodeId) -> Vec<Uuid>) -> Vec<Member> {
        self.incarnations
            .iter()
            .filter_map(|(id, seen)| {
                let incarnation = self.chosen(id, timeout, prefer)?;
                Some(member(id, incarnation, &seen.get(&incarnation)?.heartbeat))
            })
            .collect()
    }

    /// The ids and incarnations [`Membership::live_members`] lists with no preference, without
    /// building the members (a step asks for them, and a thousand members' copies of their
    /// host names, tags and features were a tenth of a busy leader's step).
    pub fn live_ids(&self, timeout: Duration) -> Vec<(NodeId, Uuid)> {
        self.incarnations
            .iter()
            .filter_map(|(id, seen)| {
                let incarnation = self.chosen(id, timeout, &|_| Vec::new())?;
                seen.contains_key(&incarnation).then(|| (id.clone(), incarnation))
            })
            .collect()
    }

    /// The other live incarnations of ids in conflict (those [`Membership::live_members`] does
    /// not list), sorted by id.
    pub fn conflicting_members(
        &self,
        timeout: Duration,
        prefer: &dyn Fn(&NodeId) -> Vec<Uuid>,
    ) -> Vec<Member> {
        self.conflicts(timeout)
            .into_iter()
            .flat_map(|(id, incarnations)| {
                let chosen = self.chosen(&id, timeout, prefer);
                let seen = self.incarnations.get(&id);
                incarnations
                    .into_iter()
                    .filter(move |inc| Some(*inc) != chosen)
                    .filter_map(move |inc| Some(member(&id, inc, &seen?.get(&inc)?.heartbeat)))
            })
            .collect()
    }

    /// The incarnation of `id` that runs its tasks (see [`Membership::live_members`]).
    fn chosen(&self, id: &NodeId, timeout: Duration, prefer: &dyn Fn(&NodeId) -> Vec<Uuid>) -> Option<Uuid> {
        if *id == self.me {
            return self.knows(id, self.incarnation).then_some(self.incarnation);
        }
        let live: Vec<(Uuid, &Seen)> = self.live_incarnations(id, timeout).collect();
        if let [(only, _)] = live[..] {
            // No choice to make: the preference (a walk of every assignment) is not asked for.
            // Asked for every node at every step, it cost a leader of 1,000 nodes and 10,000
            // tasks half its CPU (issue 21).
            return Some(only);
        }
        let preferred = prefer(id).into_iter().find(|inc| live.iter().any(|(live, _)| live == inc));
        preferred.or_else(|| live.iter().min_by_key(|(inc, seen)| (seen.first, *inc)).map(|(inc, _)| *inc))
    }
}

fn member(id: &NodeId, incarnation: Uuid, heartbeat: &Heartbeat) -> Member {
    Member {
        id: id.clone(),
        incarnation,
        hostname: heartbeat.hostname.clone(),
        tags: heartbeat.tags.clone(),
        runner: heartbeat.runner,
        leader_capable: heartbeat.leader_capable,
        returns: heartbeat.returns,
        features: shiva_proto::records::feature::known(&heartbeat.features),
    }
}

/// How much log time must pass after a silent node's newest heartbeat before its exclusive run
/// may start elsewhere: its fence timeout, the run's stop grace and the margin, stretched by the
/// clock rate bound (the node measures its fence on its own clock). Saturating.
pub fn move_wait(fence: Duration, grace: Duration, margin: Duration) -> Duration {
    let wait = fence.saturating_add(grace);
    let drift = wait.as_nanos().saturating_mul(u128::from(CLOCK_RATE_BOUND_PPM)) / 1_000_000;
    wait.saturating_add(Duration::from_nanos(u64::try_from(drift).unwrap_or(u64::MAX))).saturating_add(margin)
}

/// A heartbeat for unit tests.
#[cfg(test)]
pub(crate) fn test_heartbeat() -> Heartbeat {
    Heartbeat {
        protocol: 1,
        version: None,
        seq: 0,
        hostname: "h".into(),
        tags: vec![],
        leader_capable: true,
        runner: true,
        interval_ms: 100,
        fence_timeout_ms: Some(300),
        returns: 0,
        authorized_keys: None,
        recipient: None,
        resources: Default::default(),
        runs: vec![],
        features: Vec::new(),
        clock_ms: Default::default(),
        replaces: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Heartbeat {
        test_heartbeat()
    }

    fn at(ms: u64) -> Boot {
        Boot::from_since_boot(Duration::from_millis(ms))
    }

    #[test]
    fn peers_expire_in_log_time_only() {
        let me = NodeId::new("a").unwrap();
        let other = NodeId::new("b").unwrap();
        let (inc_a, inc_b) = (Uuid::new_v4(), Uuid::new_v4());
        let timeout = Duration::from_millis(300);
        let mut membership = Membership::new(me.clone(), inc_a);
        membership.on_heartbeat(&other, inc_b, &hb(), at(1000));
        assert!(membership.is_alive(&other, Some(inc_b), timeout));
        // Time does not pass while this node's own heartbeats are not read back.
        assert!(membership.is_alive(&other, None, timeout));
        // Own heartbeats sent before the peer's was read, landing after it in a burst: no time.
        for sent in [700, 800, 900, 1000] {
            membership.on_heartbeat(&me, inc_a, &hb(), at(1001));
            membership.advance(at(sent));
        }
        assert!(membership.is_alive(&other, None, timeout));
        membership.advance(at(1299));
        assert!(membership.is_alive(&other, None, timeout));
        // A duplicate of an own heartbeat moves nothing; log time never goes back.
        membership.advance(at(1299));
        membership.advance(at(900));
        assert_eq!(membership.log_now(), Some(at(1299)));
        assert!(membership.is_alive(&other, None, timeout));
        membership.advance(at(1300));
        assert!(!membership.is_alive(&other, None, timeout));
        membership.on_heartbeat(&other, inc_b, &hb(), at(1400));
        assert!(membership.is_alive(&other, None, timeout));
        assert!(
            !membership.is_alive(&other, Some(Uuid::new_v4()), timeout),
            "another incarnation is not alive"
        );
        membership.on_leave(&other, inc_b);
        assert!(!membership.is_alive(&other, None, timeout));
        assert_eq!(membership.live_members(timeout, &|_| Vec::new()).len(), 1);
    }

    #[test]
    fn the_preference_is_asked_for_only_where_an_id_has_two_live_incarnations() {
        let me = NodeId::new("a").unwrap();
        let inc_a = Uuid::new_v4();
        let timeout = Duration::from_millis(300);
        let mut membership = Membership::new(me.clone(), inc_a);
        membership.on_heartbeat(&me, inc_a, &hb(), at(0));
        for i in 0..50 {
            membership.on_heartbeat(&NodeId::new(format!("n{i}")).unwrap(), Uuid::new_v4(), &hb(), at(10));
        }
        let twice = NodeId::new("twice").unwrap();
        membership.on_heartbeat(&twice, Uuid::new_v4(), &hb(), at(10));
        membership.on_heartbeat(&twice, Uuid::new_v4(), &hb(), at(20));
        membership.advance(at(30));
        let asked = std::cell::RefCell::new(Vec::new());
        let members = membership.live_members(timeout, &|id| {
            asked.borrow_mut().push(id.clone());
            Vec::new()
        });
        assert_eq!(members.len(), 52);
        assert_eq!(asked.into_inner(), vec![twice]);
    }

    #[test]
    fn two_live_incarnations_of_one_id_are_a_conflict_and_the_listed_one_keeps_its_place() {
        let me = NodeId::new("a").unwrap();
        let clone = NodeId::new("b").unwrap();
        let (inc_a, first, second) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let timeout = Duration::from_millis(300);
        let mut membership = Membership::new(me.clone(), inc_a);
        membership.on_heartbeat(&me, inc_a, &hb(), at(0));
        membership.advance(at(0));
        // Cloned machines started together: both incarnations of b heartbeat, alternately.
        for t in (10..200).step_by(20) {
            membership.on_heartbeat(&clone, if t % 40 == 10 { first } else { second }, &hb(), at(t));
        }
        membership.advance(at(200));
        assert_eq!(membership.conflicts(timeout), BTreeMap::from([(clone.clone(), vec![first, second])]));
        let members = |m: &Membership, listed: Option<Uuid>| -> Vec<(NodeId, Uuid)> {
            m.live_members(timeout, &|_| listed.into_iter().collect())
                .into_iter()
                .map(|member| (member.id, member.incarnation))
                .collect()
        };
        // The one heard from first, whichever heartbeat is newest; the listed one while it lives.
        assert_eq!(members(&membership, None), vec![(me.clone(), inc_a), (clone.clone(), first)]);
        assert_eq!(membership.live_ids(timeout), members(&membership, None), "the ids, without the members");
        assert_eq!(members(&membership, Some(second)), vec![(me.clone(), inc_a), (clone.clone(), second)]);
        membership.on_heartbeat(&clone, second, &hb(), at(210));
        assert_eq!(
            members(&membership, None)[1],
            (clone.clone(), first),
            "a newer heartbeat changes nothing"
        );
        assert!(
            membership.is_alive(&clone, Some(first), timeout)
                && membership.is_alive(&clone, Some(second), timeout)
        );
        // The first goes silent: the second alone, no conflict.
        for t in (230..600).step_by(20) {
            membership.on_heartbeat(&clone, second, &hb(), at(t));
        }
        membership.advance(at(600));
        assert!(membership.conflicts(timeout).is_empty());
        assert_eq!(members(&membership, Some(first)), vec![(me.clone(), inc_a), (clone.clone(), second)]);

        // A restart on the same workspace is no conflict: the new incarnation says it replaced
        // the old one (it took the workspace's lock), which is over at once, not after the timeout.
        let grace = Duration::from_secs(10);
        let still = |m: &Membership, inc| {
            m.incarnation_may_still_run(&clone, inc, grace, Duration::from_secs(1), timeout)
        };
        assert!(still(&membership, second));
        let restarted = Uuid::new_v4();
        let replacing = Heartbeat { replaces: Some(second), ..hb() };
        membership.on_heartbeat(&clone, restarted, &replacing, at(610));
        assert!(membership.conflicts(timeout).is_empty());
        assert!(!membership.is_alive(&clone, Some(second), timeout));
        assert!(!still(&membership, second), "a replaced incarnation holds nothing");
        assert_eq!(members(&membership, Some(second))[1], (clone.clone(), restarted));
        // Another machine with the id (no such word): a conflict while both live; the first keeps
        // the id, and may still run its tasks until its move wait has passed.
        let other_machine = Uuid::new_v4();
        membership.on_heartbeat(&clone, other_machine, &hb(), at(620));
        assert_eq!(membership.conflicts(timeout)[&clone], vec![restarted, other_machine]);
        assert_eq!(members(&membership, None)[1], (clone.clone(), restarted));
        for t in (640..1100).step_by(20) {
            membership.on_heartbeat(&clone, other_machine, &hb(), at(t));
        }
        membership.advance(at(1100));
        assert_eq!(
            members(&membership, Some(restarted))[1],
            (clone.clone(), other_machine),
            "the first went silent"
        );
        assert!(still(&membership, restarted), "but may still run its tasks: fence, grace and margin");
        membership.advance(at(620 + 14_000));
        assert!(!still(&membership, restarted));
        // Another incarnation of this node's own id is a conflict too.
        let impostor = Uuid::new_v4();
        membership.on_heartbeat(&me, impostor, &hb(), at(14_620));
        assert_eq!(membership.conflicts(timeout)[&me], vec![inc_a, impostor]);
    }

    #[test]
    fn an_exclusive_run_moves_only_after_fence_grace_margin_and_the_clock_rate_bound() {
        let me = NodeId::new("a").unwrap();
        let other = NodeId::new("b").unwrap();
        let (inc_a, inc_b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut membership = Membership::new(me.clone(), inc_a);
        membership.on_heartbeat(&other, inc_b, &hb(), at(0));
        let ms = Duration::from_millis;
        let still = |m: &Membership| m.may_still_run(&other, ms(500), ms(200), ms(5000));
        // fence 300 + grace 500 (+ 0.8 ms at 1000 ppm) + margin 200 = 1000.8 ms.
        membership.advance(at(1000));
        assert!(still(&membership));
        membership.advance(Boot::from_since_boot(Duration::from_micros(1_000_799)));
        assert!(still(&membership));
        membership.advance(Boot::from_since_boot(Duration::from_micros(1_000_800)));
        assert!(!still(&membership));
        // Without a fence timeout in its heartbeat, the default (5 s) applies.
        let mut old = hb();
        old.fence_timeout_ms = None;
        membership.on_heartbeat(&other, inc_b, &old, at(2000));
        membership.advance(at(4000));
        assert!(still(&membership));
        // A node that left stopped its runs itself.
        membership.on_leave(&other, inc_b);
        assert!(!still(&membership));
        assert!(!membership.may_still_run(&NodeId::new("c").unwrap(), ms(1), ms(1), ms(1)));
        assert_eq!(move_wait(Duration::MAX, Duration::MAX, Duration::MAX), Duration::MAX);
        assert_eq!(move_wait(MAX_FENCE, ms(0), ms(1000)), MAX_FENCE + ms(3600 + 1000), "1000 ppm of an hour");
    }
}

#[cfg(test)]
mod log_time {
    //! Bursty and duplicated delivery: log time never runs ahead of the log.
    use super::*;
    use proptest::prelude::*;

    const INTERVAL: u64 = 100;
    const TIMEOUT: u64 = 500;

    /// One landing of a heartbeat in the log.
    #[derive(Debug, Clone, Copy)]
    struct Landing {
        at: u64,
        mine: bool,
        sent: u64,
    }

    /// Beats every `INTERVAL` from `phase`; a beat sent during a stall lands when it ends (a
    /// burst); `dups` land twice; one producer keeps its beats in order.
    fn landings(
        mine: bool,
        phase: u64,
        stalls: &[(u64, u64)],
        dups: &[u64],
        jitter: &[u64],
        count: u64,
    ) -> Vec<Landing> {
        let mut out = Vec::new();
        let mut last = 0;
        for i in 0..count {
            let sent = phase + i * INTERVAL;
            let mut at = sent + jitter[(i as usize) % jitter.len()];
            for (start, len) in stalls {
                if sent >= *start && sent < start + len {
                    at = at.max(start + len);
                }
            }
            at = at.max(last);
            last = at;
            out.push(Landing { at, mine, sent });
            if dups.contains(&i) {
                out.push(Landing { at: at + 1 + jitter[(i as usize + 1) % jitter.len()], mine, sent });
            }
        }
        out
    }

    /// Folds `log` in landing order, each record read some time after it landed; returns, for
    /// each own landing at which the peer was judged gone, that landing and the peer's newest.
    fn judgements(mut log: Vec<Landing>, read_lag: &[u64]) -> Vec<(u64, u64)> {
        log.sort_by_key(|landing| (landing.at, landing.mine));
        let me = NodeId::new("me").unwrap();
        let peer = NodeId::new("peer").unwrap();
        let (inc_me, inc_peer) = (Uuid::new_v4(), Uuid::new_v4());
        let mut membership = Membership::new(me.clone(), inc_me);
        let mut read = 0;
        let mut peer_landed = None;
        let mut judged = Vec::new();
        for (i, landing) in log.iter().enumerate() {
            read = (landing.at + read_lag[i % read_lag.len()]).max(read);
            let now = Boot::from_since_boot(Duration::from_millis(read));
            if landing.mine {
                membership.on_heartbeat(&me, inc_me, &test_heartbeat(), now);
                membership.advance(Boot::from_since_boot(Duration::from_millis(landing.sent)));
            } else {
                membership.on_heartbeat(&peer, inc_peer, &test_heartbeat(), now);
                peer_landed = Some(landing.at);
            }
            if let Some(peer_at) = peer_landed
                && !membership.is_alive(&peer, None, Duration::from_millis(TIMEOUT))
            {
                judged.push((landing.at, peer_at));
            }
        }
        judged
    }

    /// A peer that really went silent is judged gone soon after the timeout: at most a heartbeat
    /// interval, a read lag and a delivery later.
    #[test]
    fn a_silent_peer_is_judged_gone_soon_after_the_timeout() {
        let jitter = [5, 17, 29];
        let mut log = landings(true, 0, &[], &[], &jitter, 80);
        // The peer's heartbeats from 2 s to 3.5 s are lost (its producer gave up).
        log.extend(
            landings(false, 50, &[], &[], &jitter, 80)
                .into_iter()
                .filter(|l| l.sent < 2000 || l.sent >= 3500),
        );
        let judged = judgements(log, &[10, 39]);
        let (first, peer_at) = *judged.first().expect("judged gone");
        assert!(first >= peer_at + TIMEOUT);
        assert!(first <= peer_at + TIMEOUT + INTERVAL + 40 + 30, "judged {} ms after", first - peer_at);
        assert!(judged.iter().all(|(at, _)| *at < 3600), "alive again once it is heard: {judged:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// A peer is judged gone only once the log really was silent of it for the timeout: the
        /// own heartbeat that tipped the judgement landed at least the timeout after the peer's
        /// newest heartbeat before it. Bursts of queued heartbeats and duplicates included.
        #[test]
        fn bursty_and_duplicated_heartbeats_never_judge_a_live_node_gone(
            my_stalls in proptest::collection::vec((0u64..6000, 0u64..1500), 0..4),
            peer_stalls in proptest::collection::vec((0u64..6000, 0u64..1500), 0..4),
            my_dups in proptest::collection::vec(0u64..80, 0..10),
            peer_dups in proptest::collection::vec(0u64..80, 0..10),
            jitter in proptest::collection::vec(0u64..30, 1..20),
            phase in 0u64..INTERVAL,
            read_lag in proptest::collection::vec(0u64..40, 1..20),
        ) {
            let mut log = landings(true, 0, &my_stalls, &my_dups, &jitter, 80);
            log.extend(landings(false, phase, &peer_stalls, &peer_dups, &jitter, 80));
            for (judged, peer_at) in judgements(log, &read_lag) {
                prop_assert!(
                    judged >= peer_at + TIMEOUT,
                    "judged gone at a landing {} ms after the peer's newest heartbeat (timeout {TIMEOUT} ms)",
                    judged - peer_at
                );
            }
        }
    }
}
