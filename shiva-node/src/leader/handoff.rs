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
//! * while a copy is held, the task's placement names that node, nobody, or a node told to
//!   wait for that node's word (`after`) before it starts: the word then reaches it in one
//!   hop; a node carries on the words it started after (its status's `after`), since its own
//!   status overwrites them (one status key per task).

use std::time::Duration;

use shiva_proto::records::{Assignment, Holder, Placement, RunState};
use shiva_proto::spec::{OnDisconnect, TaskKind};
use shiva_proto::{LogView, NodeId, TaskSpec};

use super::Live;

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
    live: &Live<'_>,
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

/// The node's word about `task`'s copy: its own status for a generation at or past the
/// holder's `since`, or the word the node the task is assigned to carries on (its copy
/// started, for such a generation, after it read that this one was gone: the status's `after`).
pub fn word_for(view: &LogView, task: &shiva_proto::TaskId, holder: &Holder) -> Option<RunState> {
    let status = view.statuses.get(task)?;
    if status.status.generation < holder.since {
        return None;
    }
    if status.node == holder.node {
        return Some(status.status.state);
    }
    // Carried only by the node the task is assigned to now: a late status of another node (a
    // retry from an earlier life of the task) releases nobody.
    let carrier = view.assigned_node(task) == Some(&status.node);
    (carrier && status.status.after.contains(&holder.node)).then_some(RunState::Stopped)
}

/// The first node `assignment` tells `me` to wait for (its `after`) whose copy of `task` is not
/// said gone yet.
pub fn waiting_for<'a>(
    view: &LogView,
    task: &shiva_proto::TaskId,
    assignment: &'a Assignment,
    me: &NodeId,
) -> Option<&'a NodeId> {
    assignment.after.iter().filter(|node| *node != me).find(|node| {
        // A node named without a holder (never written by a leader): its word counts from the
        // record's own generation.
        let listed = assignment.holders.iter().find(|holder| holder.node == **node);
        let holder = listed.cloned().unwrap_or_else(|| Holder {
            node: (*node).clone(),
            since: assignment.generation,
            stop_grace_ms: 0,
            keep: false,
            exclusive: true,
        });
        !said_gone(word_for(view, task, &holder))
    })
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
    live: &Live<'_>,
    may_still_run: &dyn Fn(&NodeId, Duration) -> bool,
) -> bool {
    if said_gone(word_for(view, task, holder)) {
        return true;
    }
    if live.contains(&holder.node) {
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
    live: &Live<'_>,
    may_still_run: &dyn Fn(&NodeId, Duration) -> bool,
    next_keep: bool,
) -> bool {
    live.contains(&holder.node)
        || (holder.exclusive && may_still_run(&holder.node, grace(holder)))
        || (holder.keep && !next_keep)
}

/// The pending reason of a task handed off from `holder`'s node.
pub fn waiting_reason(holder: &Holder, live: &Live<'_>) -> String {
    let node = &holder.node;
    if live.contains(node) {
        format!("handing off: waiting for {node} to stop its copy")
    } else if holder.keep {
        format!(
            "handing off: waiting for {node} (silent) to report its copy stopped; it rides out disconnections"
        )
    } else {
        format!("handing off: waiting for {node} (silent) to fence itself")
    }
}

#[cfg(test)]
mod tests {
    use shiva_proto::TaskId;
    use shiva_proto::records::TaskStatus;
    use shiva_proto::view::{AssignmentEntry, StatusEntry};
    use uuid::Uuid;

    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    /// A view where `t` is assigned to n2 at generation 5, told to wait for n0 (copy since 4).
    fn handing_off() -> (LogView, TaskId) {
        let task = TaskId::new("t").unwrap();
        let spec = TaskSpec::new(task.clone(), "sleep", vec!["9".into()]);
        let mut holder = holder_for(&node("n0"), 4, &spec);
        holder.stop_grace_ms = 8_000;
        let assignment = Assignment {
            epoch: 1,
            task: task.clone(),
            generation: 5,
            spec_revision: 3,
            placement: Placement::Assigned { node: node("n2") },
            spec,
            failed_on: Vec::new(),
            retry_at_ms: None,
            holders: vec![holder],
            after: vec![node("n0")],
            incarnation: None,
        };
        let mut view = LogView::default();
        view.assignments.insert(task.clone(), AssignmentEntry { assignment, offset: 7 });
        (view, task)
    }

    fn status(
        view: &mut LogView,
        task: &TaskId,
        from: &str,
        generation: u64,
        state: RunState,
        after: &[&str],
    ) {
        let status = TaskStatus {
            task: task.clone(),
            generation,
            state,
            run_id: None,
            pid: None,
            attempt: 0,
            restarts: 0,
            last_exit: None,
            message: None,
            permanent: false,
            after: after.iter().map(|name| node(name)).collect(),
        };
        let entry = StatusEntry { node: node(from), incarnation: Uuid::nil(), offset: 1, status };
        view.statuses.insert(task.clone(), entry);
    }

    #[test]
    fn the_new_node_waits_for_the_old_nodes_word_for_the_hand_off() {
        let (mut view, task) = handing_off();
        let assignment = view.assignments[&task].assignment.clone();
        let me = node("n2");
        assert_eq!(waiting_for(&view, &task, &assignment, &me), Some(&node("n0")), "no word yet");
        // Running, or stopped for an earlier hand-off (generation 3 < since 4): still waiting.
        status(&mut view, &task, "n0", 4, RunState::Running, &[]);
        assert!(waiting_for(&view, &task, &assignment, &me).is_some());
        status(&mut view, &task, "n0", 3, RunState::Stopped, &[]);
        assert!(waiting_for(&view, &task, &assignment, &me).is_some());
        // Another node's status that does not carry n0's word: still waiting.
        status(&mut view, &task, "n1", 9, RunState::Running, &[]);
        assert!(waiting_for(&view, &task, &assignment, &me).is_some());
        // n0's word for the hand-off.
        status(&mut view, &task, "n0", 5, RunState::Stopped, &[]);
        assert_eq!(waiting_for(&view, &task, &assignment, &me), None);
        status(&mut view, &task, "n0", 4, RunState::Failed, &[]);
        assert_eq!(waiting_for(&view, &task, &assignment, &me), None);
    }

    #[test]
    fn a_status_that_started_after_the_word_carries_it_on() {
        let (mut view, task) = handing_off();
        let assignment = view.assignments[&task].assignment.clone();
        let n0 = &assignment.holders[0];
        // n2 started after n0's word; its status overwrote that word.
        status(&mut view, &task, "n2", 5, RunState::Running, &["n0"]);
        assert_eq!(word_for(&view, &task, n0), Some(RunState::Stopped));
        assert!(gone(&view, &task, n0, &Live::new(&[]), &|_, _| true));
        assert_eq!(waiting_for(&view, &task, &assignment, &node("n2")), None, "a restarted n2 starts again");
        // Carried for an earlier hand-off (before n0's copy of `since`): not this word.
        status(&mut view, &task, "n2", 3, RunState::Running, &["n0"]);
        assert_eq!(word_for(&view, &task, n0), None);
        // Carried by a node the task is not assigned to (a late status of an earlier life).
        status(&mut view, &task, "n5", 9, RunState::Running, &["n0"]);
        assert_eq!(word_for(&view, &task, n0), None);
        assert!(!gone(&view, &task, n0, &Live::new(&[]), &|_, _| true));
    }
}
