//! Hand-off, pure: a service's copy may still run on the node its assignment named, and nobody
//! else starts the task until that copy is gone.
//!
//! Invariants:
//! * the copy a node may run is read off the task's assignment: its `holder`, else the node
//!   and spec of an `assigned` placement (the revision that node was given, not the newest);
//! * a copy is released by the node's word, read from its status for a generation at or past
//!   the holder's `since` (written after the node read the record that took the task away):
//!   `stopped` or `failed`; or, when the node is silent, once it must have fenced itself (its
//!   fence timeout + the copy's stop grace + margin); a copy that rides out disconnections
//!   (`keep`) is released at once only for a revision that does too, and otherwise waits for
//!   the node's word or its departure;
//! * while a copy is held, the task's placement names that node or nobody.

use std::time::Duration;

use shiva_proto::records::{Assignment, Holder, Member, Placement, RunState};
use shiva_proto::spec::{OnDisconnect, TaskKind};
use shiva_proto::{LogView, NodeId, TaskSpec};

/// The copies `assignment` says may run: its `holders`, and the copy of the node an `assigned`
/// placement names (of the revision that node was given) unless a holder already covers it.
pub fn copies_of(assignment: &Assignment) -> Vec<Holder> {
    let mut copies = assignment.holders.clone();
    if let Placement::Assigned { node } = &assignment.placement
        && assignment.spec.kind() == TaskKind::Service
        && !copies.iter().any(|holder| holder.node == *node)
    {
        copies.push(holder_for(node, assignment.generation, &assignment.spec));
    }
    copies
}

/// The copies `assignment` of `task` says may run that are not gone (see [`gone`]).
pub fn left(
    view: &LogView,
    task: &shiva_proto::TaskId,
    assignment: &Assignment,
    live: &[Member],
    may_still_run: &dyn Fn(&NodeId, Duration) -> bool,
) -> Vec<Holder> {
    let copies = copies_of(assignment).into_iter();
    copies.filter(|holder| !gone(view, task, holder, live, may_still_run)).collect()
}

/// The holder of a copy of `spec` on `node`, from generation `since`.
pub fn holder_for(node: &NodeId, since: u64, spec: &TaskSpec) -> Holder {
    Holder {
        node: node.clone(),
        since,
        stop_grace_ms: u64::try_from(spec.stop_grace.as_millis()).unwrap_or(u64::MAX),
        keep: spec.on_disconnect == OnDisconnect::Keep,
        exclusive: spec.on_disconnect == OnDisconnect::Stop,
    }
}

/// Two copies' worst case: the longer stop grace, and `keep` if either rides out a disconnection.
pub fn merge(a: &Holder, b: &Holder) -> Holder {
    Holder {
        node: a.node.clone(),
        since: a.since.max(b.since),
        stop_grace_ms: a.stop_grace_ms.max(b.stop_grace_ms),
        keep: a.keep || b.keep,
        exclusive: a.exclusive || b.exclusive,
    }
}

/// The node's word about `task`'s copy.
pub fn word_for(view: &LogView, task: &shiva_proto::TaskId, holder: &Holder) -> Option<RunState> {
    let status = view.statuses.get(task)?;
    (status.node == holder.node && status.status.generation >= holder.since).then_some(status.status.state)
}

/// Whether the copy is gone for good (its node said so).
pub fn said_gone(state: Option<RunState>) -> bool {
    matches!(state, Some(RunState::Stopped | RunState::Failed))
}

/// Whether the copy is gone: its node said so, or it must have fenced itself (silent past its
/// fence timeout + the copy's stop grace + margin), or it left; a copy that rides out
/// disconnections is gone only by the node's word or departure.
pub fn gone(
    view: &LogView,
    task: &shiva_proto::TaskId,
    holder: &Holder,
    live: &[Member],
    may_still_run: &dyn Fn(&NodeId, Duration) -> bool,
) -> bool {
    if said_gone(word_for(view, task, holder)) {
        return true;
    }
    if live.iter().any(|member| member.id == holder.node) {
        return false;
    }
    let exclusive_gone = !holder.exclusive || !may_still_run(&holder.node, grace(holder));
    let keep_gone = !holder.keep || !may_still_run(&holder.node, Duration::MAX);
    exclusive_gone && keep_gone
}

fn grace(holder: &Holder) -> Duration {
    Duration::from_millis(holder.stop_grace_ms)
}

/// Whether a copy not gone keeps the task from starting on another node: always while its node
/// is live or may still run an exclusive copy; a silent node's copy that rides out
/// disconnections only when the revision to start is exclusive (`next_keep`: duplicates are
/// what `keep` accepts).
pub fn blocks(
    holder: &Holder,
    live: &[Member],
    may_still_run: &dyn Fn(&NodeId, Duration) -> bool,
    next_keep: bool,
) -> bool {
    live.iter().any(|member| member.id == holder.node)
        || (holder.exclusive && may_still_run(&holder.node, grace(holder)))
        || (holder.keep && !next_keep)
}

/// The pending reason of a task handed off from `holder`'s node.
pub fn waiting_reason(holder: &Holder, live: &[Member]) -> String {
    let node = &holder.node;
    if live.iter().any(|member| member.id == *node) {
        format!("handing off: waiting for {node} to stop its copy")
    } else if holder.keep {
        format!(
            "handing off: waiting for {node} (silent) to report its copy stopped; it rides out disconnections"
        )
    } else {
        format!("handing off: waiting for {node} (silent) to fence itself")
    }
}
