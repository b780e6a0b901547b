//! The leader's reconciliation, pure: from the log view and the live members, the records the
//! leader of `epoch` must write to `assignments` so that they say what it decided.
//!
//! A key is (re)written when its decision changed (new generation), when its accepted record
//! is from an older epoch (a new leader restamps everything it inherits), or when any other
//! record landed on it after the accepted one (a stale or forged write): compaction keeps the
//! last record of a key, so the last record must always be the leader's.

use std::collections::BTreeSet;

use shiva_proto::records::{Assignment, Body, DesiredState, Member, Members, Placement};
use shiva_proto::spec::{OnDisconnect, TaskKind};
use shiva_proto::topics::key;
use shiva_proto::{LogView, NodeId, TaskId, TaskSpec, TopicKind};

use crate::placement::{Candidate, Demand, plan};

/// A record the leader must write (`None`: tombstone).
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Its topic: `assignments`, but for tombstones of trimmed history and handled requests.
    pub topic: TopicKind,
    /// Its key.
    pub key: String,
    /// Its body.
    pub body: Option<Body>,
}

impl Write {
    /// A write on `assignments`.
    pub fn assignments(key: String, body: Option<Body>) -> Write {
        Write { topic: TopicKind::Assignments, key, body }
    }
}

/// Computes the leader's writes. `busy(key)` tells keys with a write still in flight, which
/// are left alone until it is read back. `may_still_run(node, spec)` tells whether a node that
/// is not live may still run an exclusive task (it has not fenced itself yet): such a task stays
/// where it is until that has passed.
pub fn reconcile(
    view: &LogView,
    live: &[Member],
    epoch: u64,
    busy: &dyn Fn(&str) -> bool,
    may_still_run: &dyn Fn(&NodeId, &TaskSpec) -> bool,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let members = Members { epoch, nodes: live.to_vec() };
    let members_current =
        view.members.as_ref() == Some(&members) && view.is_settled(TopicKind::Assignments, key::MEMBERS);
    if !members_current && !busy(key::MEMBERS) {
        writes.push(Write::assignments(key::MEMBERS.to_owned(), Some(Body::Members(members))));
    }

    let candidates = Candidate::runners(live);
    let demands: Vec<Demand> = view
        .specs
        .iter()
        .filter(|(task, entry)| {
            view.desired_state(task) == DesiredState::Running && entry.spec.kind() == TaskKind::Service
        })
        .map(|(task, entry)| {
            let current = view.assigned_node(task).cloned();
            let hold = current.as_ref().is_some_and(|node| {
                entry.spec.on_disconnect == OnDisconnect::Stop
                    && !live.iter().any(|member| member.id == *node)
                    && may_still_run(node, &entry.spec)
            });
            Demand { task: task.clone(), tags: entry.spec.tags.clone(), current, hold }
        })
        .collect();
    let mut placements = plan(&candidates, &demands);

    let tasks: BTreeSet<&TaskId> = view.specs.keys().chain(view.assignments.keys()).collect();
    for task in tasks {
        let record_key = key::task(task);
        if busy(&record_key) {
            continue;
        }
        let current = view.assignments.get(task);
        let Some(spec) = view.specs.get(task) else {
            if current.is_some() {
                writes.push(Write::assignments(record_key, None));
            }
            continue;
        };
        let placement = match placements.remove(task) {
            Some(Ok(node)) => Placement::Assigned { node },
            Some(Err(reason)) => Placement::Pending { reason },
            None if view.desired_state(task) == DesiredState::Stopped => Placement::Stopped,
            // Periodic and one-shot tasks: the scheduler launches each run.
            None => match candidates.iter().any(|node| node.can_run(&spec.spec.tags)) {
                true => Placement::Scheduled,
                false => Placement::Pending { reason: no_runner(&spec.spec.tags) },
            },
        };
        let unchanged = current.is_some_and(|current| {
            current.assignment.placement == placement && current.assignment.spec_revision == spec.revision
        });
        let generation = match current {
            Some(current) if unchanged => {
                let settled = view.is_settled(TopicKind::Assignments, &record_key);
                if current.assignment.epoch == epoch && settled {
                    continue;
                }
                current.assignment.generation
            }
            _ => {
                let assigned = current.map_or(0, |current| current.assignment.generation);
                let reported = view.statuses.get(task).map_or(0, |status| status.status.generation);
                assigned.max(reported) + 1
            }
        };
        let assignment = Assignment {
            epoch,
            task: task.clone(),
            generation,
            spec_revision: spec.revision,
            placement,
            spec: spec.spec.clone(),
        };
        writes.push(Write::assignments(record_key, Some(Body::Assignment(assignment))));
    }
    writes
}

fn no_runner(tags: &[String]) -> String {
    if tags.is_empty() {
        "no live runner node".to_owned()
    } else {
        format!("no live runner node has all of the tags {}", tags.join(", "))
    }
}

#[cfg(test)]
mod tests;
