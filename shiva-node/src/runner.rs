//! The runner's decisions, pure:
//! * which services this node runs ([`wanted`]): those assigned to it (and to its incarnation,
//!   when the assignment names one), of a defined task, started
//!   once every node its assignment says to wait for (`after`) reported its copy gone (staged
//!   until then); while
//!   cut off only those that ride out a disconnection; back from its fence, nothing exclusive
//!   starts before the leader acknowledged the return (what still runs goes on);
//! * which hand-offs it answers ([`releases`]): for a task taken away from it whose copy is
//!   gone here, a `stopped` status for the hand-off's generation, so the leader places it
//!   elsewhere;
//! * whether a launch intent is confirmed ([`confirm`]): after its start record is written and
//!   the log read to its end, a run is launched only if its intent still names this node and
//!   nobody asked to stop it or judged it.

use std::collections::BTreeMap;

use shiva_proto::records::{Assignment, Holder, Placement, RunState, TaskStatus};
use shiva_proto::runs::{RunIntent, RunPhase};
use shiva_proto::spec::OnDisconnect;
use shiva_proto::view::RunEntry;
use shiva_proto::{LogView, NodeId, TaskId};
use uuid::Uuid;

use crate::leader::handoff;
use crate::supervisor::Wanted;

pub mod runs;

/// Where the node stands towards the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Cut off (no own heartbeat read back within the fence timeout).
    pub fenced: bool,
    /// Exclusive work may start: the fence is open and the leader listed the latest return.
    pub may_start_exclusive: bool,
}

/// The services `me` runs. `holds`: whether the node runs a job of the task (not one stopping):
/// it goes on while exclusive starts wait.
pub fn wanted(
    view: &LogView,
    (me, incarnation): (&NodeId, Uuid),
    standing: Standing,
    holds: &dyn Fn(&TaskId) -> bool,
) -> BTreeMap<TaskId, Wanted> {
    view.assignments
        .iter()
        .filter(
            |(_, entry)| matches!(&entry.assignment.placement, Placement::Assigned { node } if node == me),
        )
        // Not one for another incarnation of this node id (a clone): that one runs it.
        .filter(|(_, entry)| entry.assignment.incarnation.is_none_or(|inc| inc == incarnation))
        // A deleted task is not started again, whatever its assignment says meanwhile.
        .filter(|(task, _)| view.is_defined(task))
        .filter(|(task, entry)| {
            let keep = entry.assignment.spec.on_disconnect == OnDisconnect::Keep;
            keep || (!standing.fenced && (standing.may_start_exclusive || holds(task)))
        })
        .map(|(task, entry)| {
            let assignment = &entry.assignment;
            // Handed off to this node: it starts once each node named in `after` said its copy
            // is gone (what already runs here goes on); meanwhile the start is staged.
            let start = holds(task) || handoff::waiting_for(view, task, assignment, me).is_none();
            let wanted = Wanted {
                generation: assignment.generation,
                spec_revision: assignment.spec_revision,
                spec: assignment.spec.clone(),
                after: assignment.after.iter().filter(|node| *node != me).cloned().collect(),
                start,
            };
            (task.clone(), wanted)
        })
        .collect()
}

/// The copy `me` may still run of a task `assignment` takes away from it (a hand-off), if any.
pub fn handed_off<'a>(assignment: &'a Assignment, me: &NodeId) -> Option<&'a Holder> {
    let here = matches!(&assignment.placement, Placement::Assigned { node } if node == me);
    assignment.holders.iter().find(|holder| holder.node == *me).filter(|_| !here)
}

/// The statuses that answer hand-offs from `me`: for each task whose assignment names `me` as
/// the holder of a copy and runs it elsewhere (or nowhere), once the node holds no job of it,
/// unless its newest status (`own`) already says so and it was not overwritten by a stale one.
pub fn releases(
    view: &LogView,
    me: &NodeId,
    holds: &dyn Fn(&TaskId) -> bool,
    own: &dyn Fn(&TaskId) -> Option<(u64, RunState)>,
) -> Vec<TaskStatus> {
    view.assignments
        .iter()
        .filter_map(|(task, entry)| {
            let assignment = &entry.assignment;
            let holder = handed_off(assignment, me)?;
            if holds(task) {
                return None;
            }
            let said = own(task).is_some_and(|(generation, state)| {
                generation >= assignment.generation && handoff::said_gone(Some(state))
            });
            let landed = handoff::said_gone(handoff::word_for(view, task, holder));
            // Overwritten by a stale status, it is written again; not when the newest status is
            // the current runner's (a `keep` copy started beside this one): no write loop.
            let runner_says = view
                .current_status(task)
                .is_some_and(|status| view.assigned_node(task) == Some(&status.node));
            let overwritten = !landed && !runner_says;
            (!said || overwritten).then(|| TaskStatus {
                task: task.clone(),
                generation: assignment.generation,
                state: RunState::Stopped,
                run_id: None,
                pid: None,
                attempt: 0,
                restarts: 0,
                last_exit: None,
                message: Some("handed off: the copy on this node is gone".into()),
                permanent: false,
                after: Vec::new(),
            })
        })
        .collect()
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// Launch it at its instant.
    Launch(Box<RunIntent>),
    /// Do not launch it, with the reason.
    Cancel(String),
}

/// Whether `intent` is for this node in `incarnation`: it names the node, and names no
/// incarnation, or this one, or another while `listed` (the leader lists this incarnation for
/// its id: the one named was replaced or went silent, and this one takes its runs over as a
/// restarted node does: a run it had started is `lost`, one it had not is launched here).
pub fn names_me(intent: &RunIntent, me: &NodeId, incarnation: Uuid, listed: bool) -> bool {
    intent.node.as_ref() == Some(me) && (listed || intent.incarnation.is_none_or(|inc| inc == incarnation))
}

/// Confirms (or not) the run `entry` for node `me` in `incarnation` (`listed`: see [`names_me`]).
pub fn confirm(entry: Option<&RunEntry>, me: &NodeId, incarnation: Uuid, listed: bool) -> Confirm {
    let Some((intent, _)) = entry.and_then(|entry| entry.intent.as_ref()) else {
        return Confirm::Cancel("its launch intent is gone".into());
    };
    match &intent.node {
        Some(node) if node == me => {}
        Some(node) => return Confirm::Cancel(format!("it is assigned to {node}")),
        None => return Confirm::Cancel("it is not assigned to any node".into()),
    }
    if !names_me(intent, me, incarnation, listed) {
        return Confirm::Cancel("it is assigned to another incarnation of this node id".into());
    }
    if let Some(reason) = &intent.stop {
        return Confirm::Cancel(reason.clone());
    }
    if let Some(verdict) = intent.verdict {
        return Confirm::Cancel(format!("the leader judged it {}", verdict.as_str()));
    }
    if let Some(report) = entry.and_then(|entry| entry.report.as_ref()) {
        if report.incarnation != incarnation {
            return Confirm::Cancel("another incarnation of this node started it".into());
        }
        if report.report.state != RunPhase::Starting {
            return Confirm::Cancel(format!("it is already {}", report.report.state.as_str()));
        }
    }
    Confirm::Launch(Box::new(intent.clone()))
}

#[cfg(test)]
mod tests {
    use shiva_proto::runs::{RunReport, Trigger, run_id};
    use shiva_proto::view::ReportEntry;
    use shiva_proto::{TaskId, TaskSpec};

    use super::*;

    fn entry(node: Option<&str>, report: Option<(Uuid, RunPhase)>) -> RunEntry {
        let task = TaskId::new("t").unwrap();
        let trigger = Trigger::Slot { slot_ms: 1000 };
        let intent = RunIntent {
            epoch: 1,
            task: task.clone(),
            run_id: run_id(&task, trigger, 1),
            attempt: 1,
            trigger,
            node: node.map(|node| NodeId::new(node).unwrap()),
            launch_at_ms: 1000,
            written_at_ms: None,
            spec_revision: 0,
            spec: std::sync::Arc::new(TaskSpec::new(task.clone(), "true", vec![])),
            stop: None,
            verdict: None,
            note: None,
            incarnation: None,
            seat: None,
            status_seen: None,
        };
        let report = report.map(|(incarnation, state)| ReportEntry {
            node: NodeId::new("a").unwrap(),
            incarnation,
            offset: 3,
            report: RunReport::of(&intent, state),
        });
        RunEntry { intent: Some((intent, 2)), report, overwritten: false }
    }

    #[test]
    fn launches_only_a_current_intent_of_its_own() {
        let me = NodeId::new("a").unwrap();
        let mine = Uuid::from_u128(1);
        let current = entry(Some("a"), Some((mine, RunPhase::Starting)));
        assert!(matches!(confirm(Some(&current), &me, mine, true), Confirm::Launch(_)));
        assert!(matches!(confirm(Some(&entry(Some("a"), None)), &me, mine, true), Confirm::Launch(_)));

        assert!(matches!(confirm(None, &me, mine, true), Confirm::Cancel(_)));
        assert!(
            matches!(confirm(Some(&entry(Some("b"), None)), &me, mine, true), Confirm::Cancel(r) if r.contains("b"))
        );
        assert!(matches!(confirm(Some(&entry(None, None)), &me, mine, true), Confirm::Cancel(_)));
        let other = entry(Some("a"), Some((Uuid::from_u128(2), RunPhase::Starting)));
        assert!(
            matches!(confirm(Some(&other), &me, mine, true), Confirm::Cancel(r) if r.contains("incarnation"))
        );
        let ran = entry(Some("a"), Some((mine, RunPhase::Running)));
        assert!(matches!(confirm(Some(&ran), &me, mine, true), Confirm::Cancel(_)));

        let mut stopped = current.clone();
        stopped.intent.as_mut().unwrap().0.stop = Some("the task was killed".into());
        assert_eq!(confirm(Some(&stopped), &me, mine, true), Confirm::Cancel("the task was killed".into()));
        let mut judged = current;
        judged.intent.as_mut().unwrap().0.verdict = Some(RunPhase::Missed);
        assert!(
            matches!(confirm(Some(&judged), &me, mine, true), Confirm::Cancel(r) if r.contains("missed"))
        );
    }
}
