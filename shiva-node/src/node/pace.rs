//! When a step walks every task, and when it may leave that walk out.
//!
//! A node steps on every heartbeat it reads back (five times a second by default), and the
//! leader's reconciliation and the runner's step walk every task each time: with fifty idle
//! services that walk was most of an idle node's CPU (docs/benchmarks.md). Both decide from
//! the log view, the live members, the node's standing (fence, leadership), the clock and the
//! runner's jobs (whose changes are reported, but for a run taken back and stopped: while one
//! stops, every step walks).
//!
//! Invariants:
//! - A step leaves the walk out only when none of its inputs but the clock changed since the
//!   last walk (no record but a routine heartbeat was read, no write, job or run reported, the
//!   same members live, the same standing), and no decision waits on the clock ([`steady`]:
//!   every task placed on a live incarnation or at rest, no silent node, no drain deadline
//!   ahead, no move request standing, no run in flight, no job stopping);
//! - and never for longer than [`REFRESH`] in a row: a decision waits at most that plus the
//!   gap to the next step (a heartbeat interval).
//!
//! Leaving a walk out only delays a decision, never makes one: whatever a walk would decide
//! is decided by the next one. The scheduler (a run's slot comes by the clock) and the
//! election are not paced: they run on every step.

use std::time::Duration;

use shiva_proto::ids::NodeId;
use shiva_proto::records::{Heartbeat, Placement};
use shiva_proto::view::LogView;
use uuid::Uuid;

use crate::clock::Boot;

/// The longest a node goes without walking every task.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);

/// What a walk depends on besides the view and the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Standing {
    /// The live members, by id and incarnation.
    pub live: Vec<(NodeId, Uuid)>,
    /// The epoch this node leads.
    pub leading: Option<u64>,
    /// The fence is open.
    pub open: bool,
    /// The runner may start exclusive tasks.
    pub may_start_exclusive: bool,
}

/// The pace of the walks.
#[derive(Debug)]
pub(crate) struct Pace {
    /// Something but the clock changed since the last walk.
    dirty: bool,
    /// The last walk: when, and on what standing.
    last: Option<(Boot, Standing)>,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace { dirty: true, last: None }
    }
}

impl Pace {
    /// Something the walks read changed: the next step walks.
    pub(crate) fn touch(&mut self) {
        self.dirty = true;
    }

    /// Whether the step at `now` walks every task; `steady`: see [`steady`], asked only when
    /// nothing else decides (it reads every assignment: with ten thousand tasks, asking it at
    /// every step of a busy node cost as much as the walk it spares).
    pub(crate) fn walks(
        &mut self,
        now: Boot,
        standing: Standing,
        steady: impl FnOnce(&Standing) -> bool,
    ) -> bool {
        let same = self.last.as_ref().is_some_and(|(at, before)| {
            *before == standing && now >= *at && now.saturating_since(*at) < REFRESH
        });
        if !self.dirty && same && steady(&standing) {
            return false;
        }
        self.dirty = false;
        self.last = Some((now, standing));
        true
    }
}

/// Whether a heartbeat read changes nothing a walk reads: the same node's next heartbeat
/// differs only by its sequence number, its resources (display) and its clock samples
/// (display). Any other field, today's or one added later, counts.
/// `before` is the caller's own copy of the earlier heartbeat: its counters are overwritten
/// with `after`'s before the two are compared.
pub(crate) fn routine(before: Option<(Uuid, Heartbeat)>, after: Option<(Uuid, &Heartbeat)>) -> bool {
    let (Some((was, mut before)), Some((is, after))) = (before, after) else { return false };
    if was != is {
        return false;
    }
    before.seq = after.seq;
    before.resources = after.resources.clone();
    before.clock_ms = after.clock_ms.clone();
    before == *after
}

/// Whether no decision of a walk waits on the clock at `now_ms` (the leader's wall clock, as
/// reconciliation reads it): every task placed on a live incarnation (and waiting for no other
/// copy), desired stopped, scheduled run by run, or failed; no run in flight; no silent node (its
/// retirement and its copies' grace go by the clock); no drain deadline ahead; no move request
/// still standing. Each keeps every step walking while it lasts (a task that stays pending, a
/// node silent until it is retired): the cost of a walk, never a decision left out.
pub(crate) fn steady(view: &LogView, live: &[(NodeId, Uuid)], now_ms: i64) -> bool {
    // By id: one look-up per task, not a walk of the members per task (hashed: a thousand
    // members made the ordered look-ups' string comparisons the bulk of a step).
    let live: std::collections::HashMap<&NodeId, &Uuid> = live.iter().map(|(id, inc)| (id, inc)).collect();
    let is_live = |node: &NodeId| live.contains_key(node);
    let placed = view.assignments.values().all(|entry| match &entry.assignment.placement {
        Placement::Assigned { node } => {
            let held_for = entry.assignment.incarnation;
            live.get(node).is_some_and(|incarnation| held_for.is_none_or(|held| held == **incarnation))
                && entry.assignment.after.is_empty()
        }
        Placement::Stopped | Placement::Scheduled | Placement::Failed { .. } => true,
        Placement::Pending { .. } => false,
    });
    placed
        && view.heartbeats.keys().all(is_live)
        && view.node_modes.values().all(|mode| mode.deadline_ms.is_none_or(|deadline| now_ms >= deadline))
        && view.moves.values().all(|request| now_ms >= request.until_ms)
        // The runs not over only (a finished run is in flight nowhere): a step must not cost
        // more as the retained history grows.
        && view.open_runs.iter().all(|(task, id)| view.run(task, id).is_none_or(|run| run.in_flight_on().is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(live: &[&str]) -> Standing {
        Standing {
            live: live.iter().map(|id| (NodeId::new(*id).unwrap(), Uuid::nil())).collect(),
            leading: Some(1),
            open: true,
            may_start_exclusive: true,
        }
    }

    fn at(ms: u64) -> Boot {
        Boot::default().saturating_add(Duration::from_millis(ms))
    }

    #[test]
    fn a_quiet_steady_node_walks_once_per_refresh() {
        let mut pace = Pace::default();
        assert!(pace.walks(at(0), standing(&["a"]), |_| true), "the first step walks");
        assert!(!pace.walks(at(200), standing(&["a"]), |_| true));
        assert!(!pace.walks(at(999), standing(&["a"]), |_| true));
        assert!(pace.walks(at(1000), standing(&["a"]), |_| true), "never longer than REFRESH");
        assert!(!pace.walks(at(1200), standing(&["a"]), |_| true));
    }

    #[test]
    fn any_change_or_a_decision_on_the_clock_walks_at_once() {
        let mut pace = Pace::default();
        assert!(pace.walks(at(0), standing(&["a", "b"]), |_| true));
        pace.touch();
        assert!(pace.walks(at(200), standing(&["a", "b"]), |_| true), "a record, a write, a report");
        assert!(pace.walks(at(400), standing(&["a"]), |_| true), "a member gone");
        let mut fenced = standing(&["a"]);
        fenced.open = false;
        assert!(pace.walks(at(600), fenced.clone(), |_| true), "the fence");
        assert!(!pace.walks(at(800), fenced.clone(), |_| true));
        let mut follower = fenced.clone();
        follower.leading = None;
        assert!(pace.walks(at(900), follower.clone(), |_| true), "the leadership");
        assert!(pace.walks(at(1000), follower.clone(), |_| false), "a decision waits on the clock");
        assert!(pace.walks(at(1100), follower, |_| false));
    }

    #[test]
    fn a_clock_gone_backwards_walks() {
        let mut pace = Pace::default();
        assert!(pace.walks(at(5000), standing(&["a"]), |_| true));
        assert!(pace.walks(at(100), standing(&["a"]), |_| true));
    }

    fn heartbeat(seq: u64) -> Heartbeat {
        serde_json::from_value(serde_json::json!({
            "protocol": 1, "seq": seq, "hostname": "h", "leader_capable": true, "runner": true,
            "interval_ms": 200, "runs": [{"task": "t", "generation": 1, "pid": 7}],
        }))
        .unwrap()
    }

    #[test]
    fn a_heartbeat_is_routine_when_only_its_counters_and_display_fields_change() {
        let one = Uuid::from_u128(1);
        let (a, mut b) = (heartbeat(1), heartbeat(2));
        b.resources.load1 = 3.5;
        b.clock_ms.insert(NodeId::new("x").unwrap(), 12);
        assert!(routine(Some((one, a.clone())), Some((one, &b))));
        assert!(!routine(Some((Uuid::from_u128(2), a.clone())), Some((one, &b))), "another incarnation");
        assert!(!routine(None, Some((one, &b))), "a first heartbeat");
        b.runs.clear();
        assert!(!routine(Some((one, a.clone())), Some((one, &b))), "its runs changed");
        let mut c = heartbeat(3);
        c.tags.push("gpu".into());
        assert!(!routine(Some((one, a)), Some((one, &c))), "its tags changed");
    }
}
