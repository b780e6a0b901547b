//! Leader election, pure: decides from the log view and membership whether this node leads,
//! follows, or claims the next epoch. The log decides the outcome (first claim per epoch wins,
//! see `shiva_proto::view`); this module only decides when to ask.

use std::collections::BTreeMap;
use std::time::Duration;

use shiva_proto::view::Winner;
use shiva_proto::{LogView, NodeId};
use uuid::Uuid;

use crate::clock::Boot;
use crate::membership::Membership;

/// What this node should do about leadership now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This node won the newest epoch.
    Leader(u64),
    /// Someone else leads, or this node may not claim now.
    Follower,
    /// The leader is gone: append a claim for this epoch.
    Claim(u64),
    /// This node won `epoch` but a node of a newer protocol is live: step down and write a
    /// resignation, so that the newer node may claim.
    Resign(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimState {
    InFlight,
    Failed,
}

/// Silence thresholds, in log time (see `membership`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Without a heartbeat from the leader.
    pub leader: Duration,
    /// Without a first leader write from a new epoch's winner.
    pub first_write: Duration,
}

/// Election bookkeeping of one node.
#[derive(Debug, Clone)]
pub struct Election {
    me: NodeId,
    incarnation: Uuid,
    leader_capable: bool,
    /// When each epoch's winning claim was read.
    won_at: BTreeMap<u64, Boot>,
    my_claim: Option<(u64, ClaimState)>,
}

impl Election {
    /// Election state of `me`.
    pub fn new(me: NodeId, incarnation: Uuid, leader_capable: bool) -> Self {
        Election { me, incarnation, leader_capable, won_at: BTreeMap::new(), my_claim: None }
    }

    /// Notes that the winning claim of `epoch` was read at `now`.
    pub fn on_winner(&mut self, epoch: u64, now: Boot) {
        self.won_at.entry(epoch).or_insert(now);
    }

    /// Notes that a claim for `epoch` was sent.
    pub fn claim_sent(&mut self, epoch: u64) {
        self.my_claim = Some((epoch, ClaimState::InFlight));
    }

    /// Notes that the claim for `epoch` failed to be delivered; after the log is read to its
    /// end without it, a new claim (with a new key) may be sent.
    pub fn claim_failed(&mut self, epoch: u64) {
        if self.my_claim == Some((epoch, ClaimState::InFlight)) {
            self.my_claim = Some((epoch, ClaimState::Failed));
        }
    }

    /// Decides. `healthy`: this node reads its own heartbeats back. A node neither claims nor
    /// keeps leadership while a leader-capable node of a newer protocol is live. A leader is gone
    /// after `timeouts.leader` of log time without a heartbeat of its own, or
    /// `timeouts.first_write` without a first leader write (claims and heartbeats are on
    /// different topics whose read lags differ, so this one needs the longer threshold).
    pub fn decide(
        &self,
        view: &LogView,
        membership: &Membership,
        healthy: bool,
        timeouts: Timeouts,
    ) -> Verdict {
        let newer = membership.newer_protocol_live(timeouts.leader).is_some();
        if let Some((epoch, winner)) = view.leader() {
            if winner.node == self.me && winner.incarnation == self.incarnation {
                return if newer { Verdict::Resign(epoch) } else { Verdict::Leader(epoch) };
            }
            if self.leader_alive(view, membership, epoch, winner, timeouts) {
                return Verdict::Follower;
            }
        }
        if !self.leader_capable || !healthy || newer {
            return Verdict::Follower;
        }
        let next = view.epochs.newest + 1;
        match self.my_claim {
            Some((epoch, ClaimState::InFlight)) if epoch == next => Verdict::Follower,
            _ => Verdict::Claim(next),
        }
    }

    fn leader_alive(
        &self,
        view: &LogView,
        membership: &Membership,
        epoch: u64,
        winner: &Winner,
        timeouts: Timeouts,
    ) -> bool {
        if view.left.contains(&(winner.node.clone(), winner.incarnation)) {
            return false;
        }
        // A claim not noted as read (none is: `on_winner` runs for each) counts from boot.
        let since_win = membership.log_since(self.won_at.get(&epoch).copied().unwrap_or_default());
        // A winner that never makes a leader write within the timeout counts as gone.
        if !view.epochs.active.contains(&epoch) && since_win >= timeouts.first_write {
            return false;
        }
        match membership.peer(&winner.node) {
            // (Another incarnation of its id may heartbeat too: a conflict; the winner's counts.)
            Some(_) if membership.knows(&winner.node, winner.incarnation) => {
                membership.is_alive(&winner.node, Some(winner.incarnation), timeouts.leader)
            }
            // The node restarted since it claimed: that incarnation is gone.
            Some(_) => false,
            // Never heard of it (a claim from a non-node): give it the timeout, no more.
            None => since_win < timeouts.leader,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shiva_proto::records::{Body, Claim, Envelope, Heartbeat};
    use shiva_proto::topics::key;
    use shiva_proto::{TopicKind, view::Outcome};

    const B3: Timeouts =
        Timeouts { leader: Duration::from_millis(300), first_write: Duration::from_millis(300) };
    const B2: Timeouts =
        Timeouts { leader: Duration::from_millis(200), first_write: Duration::from_millis(200) };

    fn at(ms: u64) -> Boot {
        Boot::from_since_boot(Duration::from_millis(ms))
    }

    fn hb() -> Heartbeat {
        crate::membership::test_heartbeat()
    }

    fn claim(view: &mut LogView, offset: i64, node: &NodeId, inc: Uuid, epoch: u64) -> Outcome {
        let env = Envelope {
            sender: node.to_string(),
            incarnation: Some(inc),
            sent_at_ms: 0,
            body: Body::Claim(Claim { epoch }),
        };
        let key = key::claim(epoch, node, Uuid::new_v4());
        view.apply(TopicKind::Assignments, offset, Some(key.as_bytes()), Some(&env.encode()))
    }

    #[test]
    fn claims_when_leader_silent_and_leads_when_won() {
        let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        let (inc_a, inc_b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut view = LogView::default();
        let mut membership = Membership::new(a.clone(), inc_a);
        let mut election = Election::new(a.clone(), inc_a, true);
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Claim(1));
        assert_eq!(
            election.decide(&view, &membership, false, B3),
            Verdict::Follower,
            "unhealthy nodes never claim"
        );

        membership.on_heartbeat(&b, inc_b, &hb(), at(1000));
        assert!(matches!(claim(&mut view, 0, &b, inc_b, 1), Outcome::Applied(_)));
        election.on_winner(1, at(1000));
        view.epochs.active.insert(1);
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Follower);
        membership.advance(at(1299));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Follower);
        membership.advance(at(1300));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Claim(2));
        election.claim_sent(2);
        assert_eq!(
            election.decide(&view, &membership, true, B3),
            Verdict::Follower,
            "no second claim in flight"
        );
        assert!(matches!(claim(&mut view, 1, &a, inc_a, 2), Outcome::Applied(_)));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Leader(2));
    }

    #[test]
    fn a_claim_from_a_non_node_expires() {
        let a = NodeId::new("a").unwrap();
        let inc_a = Uuid::new_v4();
        let mut view = LogView::default();
        let mut membership = Membership::new(a.clone(), inc_a);
        let mut election = Election::new(a.clone(), inc_a, true);
        let ghost = NodeId::new("ghost").unwrap();
        assert!(matches!(claim(&mut view, 0, &ghost, Uuid::new_v4(), 1), Outcome::Applied(_)));
        election.on_winner(1, at(1000));
        assert_eq!(election.decide(&view, &membership, true, B2), Verdict::Follower);
        membership.advance(at(1100));
        assert_eq!(election.decide(&view, &membership, true, B2), Verdict::Follower);
        membership.advance(at(1200));
        assert_eq!(election.decide(&view, &membership, true, B2), Verdict::Claim(2));
        // A claim that jumps epochs is refused by the view.
        assert!(matches!(claim(&mut view, 1, &ghost, Uuid::new_v4(), 1_000_000), Outcome::Skipped(_)));
    }

    #[test]
    fn a_node_neither_claims_nor_keeps_leadership_while_a_newer_protocol_node_is_live() {
        let (a, new) = (NodeId::new("a").unwrap(), NodeId::new("new").unwrap());
        let (inc_a, inc_new) = (Uuid::new_v4(), Uuid::new_v4());
        let mut view = LogView::default();
        let mut membership = Membership::new(a.clone(), inc_a);
        let election = Election::new(a.clone(), inc_a, true);
        assert!(matches!(claim(&mut view, 0, &a, inc_a, 1), Outcome::Applied(_)));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Leader(1));
        let newer = Heartbeat::of_newer_protocol(shiva_proto::protocol() + 1);
        membership.on_heartbeat(&new, inc_new, &newer, at(1000));
        membership.advance(at(1000));
        // One heartbeat is not enough (a single forged record makes nobody resign): it must be
        // heard from over the leader timeout.
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Leader(1));
        membership.on_heartbeat(&new, inc_new, &newer, at(1300));
        membership.advance(at(1300));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Resign(1));
        view.epochs.resigned.insert(1);
        assert_eq!(
            election.decide(&view, &membership, true, B3),
            Verdict::Follower,
            "no claim while it is live"
        );
        // A newer node that may not lead does not stop this one.
        let mut runner_only = newer.clone();
        runner_only.leader_capable = false;
        membership.on_heartbeat(&new, inc_new, &runner_only, at(1300));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Claim(2));
        // Once the newer node is gone, this one claims again.
        membership.on_heartbeat(&new, inc_new, &newer, at(1300));
        membership.advance(at(1600));
        assert_eq!(election.decide(&view, &membership, true, B3), Verdict::Claim(2));
    }
}
