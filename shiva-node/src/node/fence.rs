//! Self-fencing, pure: the node's lease runs from the send instant of the newest own heartbeat
//! it has read back. Past `fence_timeout` the node is cut off: its exclusive runs stop (the
//! shims kill them when the lease they were given runs out; the node stops their jobs too) and
//! none starts. When it reads itself again it first reads the log to its end, so that it learns
//! what the leader decided meanwhile (its task may have moved) before it starts anything.
//!
//! Time is the boot-time clock ([`Boot`]), which counts a suspend. A hypervisor's pause stops
//! even that clock; the wall clock, corrected after the resume, shows it: when the wall clock
//! ran ahead of the boot-time clock by more than the lease between two looks, the lease is over,
//! and only a heartbeat sent after that look renews it (the shims do the same, see
//! `shim::Lease`). A pause shorter than a lease goes unseen here; the others then wait for the
//! lease measured on their own clocks, which is what they do for any silent node.

use std::time::{Duration, SystemTime};

use crate::clock::Boot;

/// Where the node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceState {
    /// No valid lease: exclusive runs stop, none starts.
    Fenced,
    /// The lease is valid again; waiting for read-to-end `token` before opening.
    Syncing(u64),
    /// The lease is valid and the view is current.
    Open,
}

/// What changed in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceChange {
    /// Nothing.
    None,
    /// The lease ran out: just fenced (`wall_jump`: because the wall clock ran that much ahead of
    /// the boot-time clock, a pause the boot-time clock did not count).
    Fenced {
        /// How far the wall clock ran ahead, if that was the cause.
        wall_jump: Option<Duration>,
    },
    /// The lease is valid again: read the log to its end with this token.
    Sync(u64),
    /// The read to the end completed: open.
    Opened,
}

/// The lease and the fence.
#[derive(Debug)]
pub struct Fence {
    timeout: Duration,
    state: FenceState,
    /// How many times it opened.
    opens: u64,
    /// The previous look at both clocks.
    last_look: Option<(Boot, SystemTime)>,
    /// A pause was seen at this instant: leases from heartbeats sent before it are void.
    void_before: Option<Boot>,
}

impl Fence {
    /// A fence that starts closed: nothing exclusive runs before the first own heartbeat is
    /// read back.
    pub fn new(timeout: Duration) -> Fence {
        Fence { timeout, state: FenceState::Fenced, opens: 0, last_look: None, void_before: None }
    }

    /// This incarnation was already back from its fence `returns` times in an earlier process
    /// of the node (one that re-executed itself or died, on the same workspace): this process's
    /// first opening is one more return, so exclusive work starts only once the leader has seen
    /// it live again and listed it (see [`returned_confirmed`]).
    pub fn resume_after(&mut self, returns: u64) {
        self.opens = returns.saturating_add(1);
    }

    /// The state.
    #[cfg(test)]
    pub fn state(&self) -> FenceState {
        self.state
    }

    /// Whether exclusive runs may run (see also [`returned_confirmed`]).
    pub fn is_open(&self) -> bool {
        self.state == FenceState::Open
    }

    /// How many times the node came back from its fence (the first opening, at start, is not a
    /// return): its heartbeats carry it.
    pub fn returns(&self) -> u64 {
        self.opens.saturating_sub(1)
    }

    /// When the lease runs out, given the send instant of the newest heartbeat read back (none
    /// when that heartbeat was sent before a pause was seen).
    pub fn deadline(&self, lease_start: Option<Boot>) -> Option<Boot> {
        lease_start
            .filter(|start| self.void_before.is_none_or(|void| *start > void))
            .map(|start| start.saturating_add(self.timeout))
    }

    /// Takes in the lease at `now` (`wall`: the wall clock at the same look); `token` gives a
    /// fresh read-to-end token when one is needed.
    pub fn update(
        &mut self,
        lease_start: Option<Boot>,
        now: Boot,
        wall: SystemTime,
        token: &mut dyn FnMut() -> u64,
    ) -> FenceChange {
        let mut wall_jump = None;
        if let Some((boot_then, wall_then)) = self.last_look {
            let ahead = wall
                .duration_since(wall_then)
                .unwrap_or(Duration::ZERO)
                .saturating_sub(now.saturating_since(boot_then));
            if ahead > self.timeout {
                self.void_before = Some(now);
                wall_jump = Some(ahead);
            }
        }
        self.last_look = Some((now, wall));
        let valid = self.deadline(lease_start).is_some_and(|deadline| now < deadline);
        match (self.state, valid) {
            (FenceState::Open | FenceState::Syncing(_), false) => {
                let was_open = self.state == FenceState::Open;
                self.state = FenceState::Fenced;
                if was_open { FenceChange::Fenced { wall_jump } } else { FenceChange::None }
            }
            (FenceState::Fenced, true) => {
                let token = token();
                self.state = FenceState::Syncing(token);
                FenceChange::Sync(token)
            }
            _ => FenceChange::None,
        }
    }

    /// A read to the end completed.
    pub fn on_synced(&mut self, token: u64) -> FenceChange {
        if self.state == FenceState::Syncing(token) {
            self.state = FenceState::Open;
            self.opens = self.opens.saturating_add(1);
            FenceChange::Opened
        } else {
            FenceChange::None
        }
    }

    /// A read to the end failed: try again with a new token if it was this one's.
    pub fn on_sync_failed(&mut self, token: u64) {
        if self.state == FenceState::Syncing(token) {
            self.state = FenceState::Fenced;
        }
    }
}

/// Whether the leader acknowledged this incarnation's latest return: its `members` record lists
/// the node with this incarnation and at least `returns`. The leader writes that record only
/// after it saw the node live again, so every move it decided while the node was silent (and
/// every verdict on its runs) is earlier in the same log, and read before: a node that starts
/// exclusive work only then never starts a task that was moved away meanwhile.
pub fn returned_confirmed(
    members: Option<&shiva_proto::records::Members>,
    me: &shiva_proto::NodeId,
    incarnation: uuid::Uuid,
    returns: u64,
) -> bool {
    members.is_some_and(|members| {
        members
            .nodes
            .iter()
            .any(|member| member.id == *me && member.incarnation == incarnation && member.returns >= returns)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_off_then_back_after_a_read_to_the_end() {
        let mut fence = Fence::new(Duration::from_secs(3));
        let mut next = 0;
        let mut token = || {
            next += 1;
            next
        };
        let t0 = Boot::now();
        let s = Duration::from_secs;
        let wall0 = SystemTime::now();
        // The wall clock runs with the boot-time clock here.
        let mut update = |fence: &mut Fence, lease: Option<Boot>, now: Boot| {
            Fence::update(fence, lease, now, wall0 + now.saturating_since(t0), &mut token)
        };
        assert_eq!(update(&mut fence, None, t0), FenceChange::None);
        assert!(!fence.is_open(), "closed until the first heartbeat is read back");
        assert_eq!(update(&mut fence, Some(t0), t0 + s(1)), FenceChange::Sync(1));
        assert_eq!(fence.on_synced(7), FenceChange::None, "another read's end");
        assert_eq!(fence.on_synced(1), FenceChange::Opened);
        assert!(fence.is_open());
        assert_eq!(fence.returns(), 0, "the first opening is not a return");
        assert_eq!(update(&mut fence, Some(t0 + s(2)), t0 + s(4)), FenceChange::None);
        // Frozen or cut off: the newest heartbeat read back was sent at t0 + 2 s.
        assert_eq!(update(&mut fence, Some(t0 + s(2)), t0 + s(5)), FenceChange::Fenced { wall_jump: None });
        assert!(!fence.is_open());
        assert_eq!(update(&mut fence, Some(t0 + s(2)), t0 + s(9)), FenceChange::None);
        // Back: a fresh heartbeat read back; the view must be read to its end first.
        assert_eq!(update(&mut fence, Some(t0 + s(9)), t0 + s(9)), FenceChange::Sync(2));
        assert!(!fence.is_open());
        // The lease runs out again before the read completes: the read no longer opens it.
        assert_eq!(update(&mut fence, Some(t0 + s(9)), t0 + s(13)), FenceChange::None);
        assert_eq!(fence.on_synced(2), FenceChange::None);
        assert_eq!(fence.state(), FenceState::Fenced);
        assert_eq!(update(&mut fence, Some(t0 + s(14)), t0 + s(14)), FenceChange::Sync(3));
        fence.on_sync_failed(3);
        assert_eq!(update(&mut fence, Some(t0 + s(14)), t0 + s(15)), FenceChange::Sync(4));
        assert_eq!(fence.returns(), 0);
        assert_eq!(fence.on_synced(4), FenceChange::Opened);
        assert_eq!(fence.returns(), 1, "back from the fence once");
    }

    #[test]
    fn a_wall_clock_jump_longer_than_the_lease_ends_it_until_a_heartbeat_sent_after_it() {
        let mut fence = Fence::new(Duration::from_secs(3));
        let mut token = || 1;
        let (t0, wall0) = (Boot::now(), SystemTime::now());
        let s = Duration::from_secs;
        assert_eq!(fence.update(Some(t0), t0, wall0, &mut token), FenceChange::Sync(1));
        assert_eq!(fence.on_synced(1), FenceChange::Opened);
        // Wall clock and boot-time clock both moved by 1 s: nothing.
        assert_eq!(fence.update(Some(t0 + s(1)), t0 + s(1), wall0 + s(1), &mut token), FenceChange::None);
        // A jump shorter than the lease goes unseen.
        assert_eq!(fence.update(Some(t0 + s(1)), t0 + s(2), wall0 + s(4), &mut token), FenceChange::None);
        assert!(fence.is_open());
        // A hypervisor paused the machine for a minute: the boot-time clock moved 100 ms, the wall
        // clock 60 s. The lease from a heartbeat sent before is over.
        let now = t0 + Duration::from_millis(2100);
        let change = fence.update(Some(t0 + s(2)), now, wall0 + s(64), &mut token);
        assert!(
            matches!(change, FenceChange::Fenced { wall_jump: Some(jump) } if jump > s(59)),
            "{change:?}"
        );
        assert!(!fence.is_open());
        assert_eq!(fence.deadline(Some(now)), None, "a heartbeat sent at the look itself is from before");
        // Its heartbeats read back later do not renew it either; one sent after the look does.
        let later = now + Duration::from_millis(10);
        assert_eq!(fence.update(Some(now), later, wall0 + s(64), &mut token), FenceChange::None);
        assert_eq!(fence.update(Some(later), later, wall0 + s(64), &mut token), FenceChange::Sync(1));
        assert_eq!(fence.deadline(Some(later)), Some(later + s(3)));
        // A wall clock set back is no pause.
        let mut other = Fence::new(s(3));
        other.update(Some(t0), t0, wall0, &mut token);
        other.on_synced(1);
        assert_eq!(other.update(Some(t0), t0 + s(1), wall0 - s(3600), &mut token), FenceChange::None);
        assert!(other.is_open());
    }

    #[test]
    fn a_return_counts_once_the_leader_lists_it() {
        use shiva_proto::records::{Member, Members};
        let me = shiva_proto::NodeId::new("n1").unwrap();
        let incarnation = uuid::Uuid::new_v4();
        let member = |incarnation, returns| Member {
            id: me.clone(),
            incarnation,
            hostname: "h".into(),
            tags: vec![],
            runner: true,
            leader_capable: true,
            returns,
            features: Vec::new(),
        };
        let members = |nodes| Members { epoch: 3, nodes, conflicts: Vec::new(), authorized_keys: None };
        assert!(!returned_confirmed(None, &me, incarnation, 0), "no leader view yet");
        assert!(!returned_confirmed(Some(&members(vec![])), &me, incarnation, 0), "not listed");
        let old = members(vec![member(uuid::Uuid::new_v4(), 5)]);
        assert!(!returned_confirmed(Some(&old), &me, incarnation, 0), "an earlier incarnation is listed");
        let before = members(vec![member(incarnation, 1)]);
        assert!(returned_confirmed(Some(&before), &me, incarnation, 1));
        assert!(!returned_confirmed(Some(&before), &me, incarnation, 2), "listed before its latest return");
    }
}
