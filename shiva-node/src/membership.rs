//! Membership in log time: a peer is gone when enough of this node's own heartbeats have
//! landed in `control` after the peer's last one. No clocks are compared; a node that cannot
//! write or read its own heartbeats stops counting, so it never judges others gone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shiva_proto::NodeId;
use shiva_proto::records::{Heartbeat, Member};
use uuid::Uuid;

/// What this node knows of a peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Incarnation of its newest heartbeat.
    pub incarnation: Uuid,
    /// This node's own-heartbeat count when the peer's newest heartbeat was read.
    pub seen_at: u64,
    /// The newest heartbeat.
    pub heartbeat: Heartbeat,
}

/// The longest fence timeout a heartbeat may announce (`--fence-timeout`'s maximum).
pub const MAX_FENCE: Duration = Duration::from_secs(3600);

/// Heartbeats folded in log order.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    incarnation: Uuid,
    own_beats: u64,
    peers: BTreeMap<NodeId, Peer>,
    left: BTreeSet<(NodeId, Uuid)>,
}

impl Membership {
    /// Membership as seen by `me` in `incarnation`.
    pub fn new(me: NodeId, incarnation: Uuid) -> Self {
        Membership { me, incarnation, own_beats: 0, peers: BTreeMap::new(), left: BTreeSet::new() }
    }

    /// Own heartbeats read back so far: the log-time clock.
    pub fn own_beats(&self) -> u64 {
        self.own_beats
    }

    /// Folds a heartbeat read from the log. Returns true when it is one of this node's own.
    pub fn on_heartbeat(&mut self, node: &NodeId, incarnation: Uuid, heartbeat: &Heartbeat) -> bool {
        let own = *node == self.me && incarnation == self.incarnation;
        if own {
            self.own_beats += 1;
        }
        let peer = Peer { incarnation, seen_at: self.own_beats, heartbeat: heartbeat.clone() };
        self.peers.insert(node.clone(), peer);
        own
    }

    /// Folds a departure.
    pub fn on_leave(&mut self, node: &NodeId, incarnation: Uuid) {
        self.left.insert((node.clone(), incarnation));
    }

    /// The newest heartbeat's peer entry.
    pub fn peer(&self, node: &NodeId) -> Option<&Peer> {
        self.peers.get(node)
    }

    /// Whether `node` (in `incarnation`, if given) is alive: its newest heartbeat is of that
    /// incarnation, it did not leave, and fewer than `beats` own heartbeats landed after it.
    pub fn is_alive(&self, node: &NodeId, incarnation: Option<Uuid>, beats: u64) -> bool {
        if *node == self.me && incarnation.is_none_or(|inc| inc == self.incarnation) {
            return true;
        }
        let Some(peer) = self.peers.get(node) else { return false };
        if incarnation.is_some_and(|inc| inc != peer.incarnation) {
            return false;
        }
        if self.left.contains(&(node.clone(), peer.incarnation)) {
            return false;
        }
        self.own_beats.saturating_sub(peer.seen_at) < beats
    }

    /// Whether `node` may still hold an exclusive run with `grace` to stop it: it did not
    /// leave, and fewer own heartbeats than its fence timeout plus `grace` plus `margin` (and one
    /// more: a beat sent just before the node's last one may land after it) have landed since its
    /// newest heartbeat. The node's lease ran from a send instant no later than that heartbeat's
    /// landing, so past that count it has stopped the run (its shim kills it at the latest).
    /// `interval` is this node's heartbeat interval; `default_fence` stands in for a heartbeat
    /// without a fence timeout.
    pub fn may_still_run(
        &self,
        node: &NodeId,
        grace: Duration,
        margin: Duration,
        interval: Duration,
        default_fence: Duration,
    ) -> bool {
        let Some(peer) = self.peers.get(node) else { return false };
        if self.left.contains(&(node.clone(), peer.incarnation)) {
            return false;
        }
        // A heartbeat's fence timeout is read within the node flag's range (at most 1h).
        let fence =
            peer.heartbeat.fence_timeout_ms.map_or(default_fence, Duration::from_millis).min(MAX_FENCE);
        let wait = fence.saturating_add(grace).saturating_add(margin);
        let beats = u64::try_from(wait.as_nanos().div_ceil(interval.as_nanos().max(1))).unwrap_or(u64::MAX);
        self.own_beats.saturating_sub(peer.seen_at) < beats.saturating_add(1)
    }

    /// A live, leader-capable node of a newer protocol than this build's, if any: this node
    /// then neither claims nor keeps leadership (see `election`), so that the newest version
    /// leads a mixed cluster and never competes with a leader it cannot fully read.
    pub fn newer_protocol_live(&self, beats: u64) -> Option<(&NodeId, u16)> {
        let mine = shiva_proto::protocol();
        self.peers
            .iter()
            .filter(|(id, peer)| {
                peer.heartbeat.protocol > mine
                    && peer.heartbeat.leader_capable
                    && self.is_alive(id, Some(peer.incarnation), beats)
            })
            .map(|(id, peer)| (id, peer.heartbeat.protocol))
            .next()
    }

    /// Live nodes (this one included once its heartbeat was read back), sorted by id.
    pub fn live_members(&self, beats: u64) -> Vec<Member> {
        self.peers
            .iter()
            .filter(|(id, peer)| {
                if **id == self.me {
                    peer.incarnation == self.incarnation
                } else {
                    self.is_alive(id, Some(peer.incarnation), beats)
                }
            })
            .map(|(id, peer)| Member {
                id: id.clone(),
                incarnation: peer.incarnation,
                hostname: peer.heartbeat.hostname.clone(),
                tags: peer.heartbeat.tags.clone(),
                runner: peer.heartbeat.runner,
                leader_capable: peer.heartbeat.leader_capable,
                returns: peer.heartbeat.returns,
                features: shiva_proto::records::feature::known(&peer.heartbeat.features),
            })
            .collect()
    }
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
        resources: Default::default(),
        runs: vec![],
        features: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Heartbeat {
        test_heartbeat()
    }

    #[test]
    fn peers_expire_in_own_heartbeats_only() {
        let me = NodeId::new("a").unwrap();
        let other = NodeId::new("b").unwrap();
        let (inc_a, inc_b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut membership = Membership::new(me.clone(), inc_a);
        membership.on_heartbeat(&other, inc_b, &hb());
        assert!(membership.is_alive(&other, Some(inc_b), 3));
        // Time does not pass while this node's own heartbeats are not read back.
        assert!(membership.is_alive(&other, None, 3));
        for _ in 0..2 {
            membership.on_heartbeat(&me, inc_a, &hb());
        }
        assert!(membership.is_alive(&other, None, 3));
        membership.on_heartbeat(&me, inc_a, &hb());
        assert!(!membership.is_alive(&other, None, 3));
        membership.on_heartbeat(&other, inc_b, &hb());
        assert!(membership.is_alive(&other, None, 3));
        assert!(!membership.is_alive(&other, Some(Uuid::new_v4()), 3), "another incarnation is not alive");
        membership.on_leave(&other, inc_b);
        assert!(!membership.is_alive(&other, None, 3));
        assert_eq!(membership.live_members(3).len(), 1);
    }

    #[test]
    fn an_exclusive_run_moves_only_after_fence_grace_and_margin() {
        let me = NodeId::new("a").unwrap();
        let other = NodeId::new("b").unwrap();
        let (inc_a, inc_b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut membership = Membership::new(me.clone(), inc_a);
        membership.on_heartbeat(&other, inc_b, &hb());
        let ms = Duration::from_millis;
        let still = |m: &Membership| m.may_still_run(&other, ms(500), ms(200), ms(100), ms(5000));
        // fence 300 + grace 500 + margin 200 = 10 beats of 100 ms, plus one.
        for _ in 0..10 {
            membership.on_heartbeat(&me, inc_a, &hb());
            assert!(still(&membership));
        }
        membership.on_heartbeat(&me, inc_a, &hb());
        assert!(!still(&membership));
        // Without a fence timeout in its heartbeat, the default (5 s) applies.
        let mut old = hb();
        old.fence_timeout_ms = None;
        membership.on_heartbeat(&other, inc_b, &old);
        for _ in 0..20 {
            membership.on_heartbeat(&me, inc_a, &hb());
        }
        assert!(still(&membership));
        // A node that left stopped its runs itself.
        membership.on_leave(&other, inc_b);
        assert!(!still(&membership));
        assert!(!membership.may_still_run(&NodeId::new("c").unwrap(), ms(1), ms(1), ms(100), ms(1)));
    }
}
