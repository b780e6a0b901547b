//! Rebalance, pure: which services to move so that the live, open runner nodes carry even
//! loads (`shiva-ctl rebalance`). Placement never moves a task that runs where it may (nodes
//! joining get only new work); a rebalance asks the leader to move some, through the hand-off.
//!
//! Rules: the nodes are the runners the leader lists as live whose mode is open (not cordoned or
//! draining); a node's load is the services assigned to it; only a service that runs (its
//! newest status: running, on its node) moves, to a node that carries its tags and that it did
//! not fail on; each move goes
//! from the most loaded node to the least loaded one that can take the task, and only when that
//! leaves them closer (`to + 1 < from`). Ties go by id, so two readers of one view agree.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::records::{Mode, Placement, RunState};
use crate::spec::TaskKind;
use crate::{LogView, NodeId, TaskId};

/// One move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    /// The service.
    pub task: TaskId,
    /// Where it runs.
    pub from: NodeId,
    /// Where it goes.
    pub to: NodeId,
}

/// At most `max_moves` moves that even out the loads of `view`, in order.
pub fn plan(view: &LogView, max_moves: usize) -> Vec<Move> {
    let Some(members) = &view.members else { return Vec::new() };
    let open = |node: &NodeId| view.node_modes.get(node).is_none_or(|mode| mode.mode == Mode::Open);
    let nodes: BTreeMap<&NodeId, BTreeSet<&str>> = members
        .nodes
        .iter()
        .filter(|member| member.runner && open(&member.id))
        .map(|member| {
            let tags = member.tags.iter().map(String::as_str).chain([member.hostname.as_str()]).collect();
            (&member.id, tags)
        })
        .collect();
    let mut load: BTreeMap<&NodeId, usize> = nodes.keys().map(|node| (*node, 0)).collect();
    // Services that may move, by node, in id order.
    let mut movable: BTreeMap<&NodeId, Vec<&TaskId>> = BTreeMap::new();
    for (task, entry) in &view.assignments {
        let Placement::Assigned { node } = &entry.assignment.placement else { continue };
        let Some(count) = load.get_mut(node) else { continue };
        *count += 1;
        let service = view.specs.get(task).is_some_and(|spec| spec.spec.kind() == TaskKind::Service);
        let running = view
            .statuses
            .get(task)
            .is_some_and(|status| status.node == *node && status.status.state == RunState::Running);
        if service && running && entry.assignment.holders.is_empty() {
            movable.entry(node).or_default().push(task);
        }
    }
    let mut moves = Vec::new();
    while moves.len() < max_moves {
        let mut by_load: Vec<(&NodeId, usize)> = load.iter().map(|(node, count)| (*node, *count)).collect();
        by_load.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let chosen = by_load.iter().find_map(|(from, from_load)| {
            movable.get(from)?.iter().enumerate().find_map(|(index, task)| {
                let tags = &view.specs.get(*task)?.spec.tags;
                // The leader keeps a task off the nodes it failed on.
                let failed_on = &view.assignments.get(*task)?.assignment.failed_on;
                let to = by_load
                    .iter()
                    .rev()
                    .filter(|(to, to_load)| {
                        to != from
                            && !failed_on.contains(to)
                            && to_load + 1 < *from_load
                            && tags.iter().all(|tag| nodes[to].contains(tag.as_str()))
                    })
                    .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)))?;
                Some((*from, index, to.0))
            })
        });
        let Some((from, index, to)) = chosen else { break };
        let task = movable.get_mut(from).expect("chosen from it").remove(index);
        *load.get_mut(from).expect("a node") -= 1;
        *load.get_mut(to).expect("a node") += 1;
        moves.push(Move { task: task.clone(), from: from.clone(), to: to.clone() });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TaskSpec;
    use crate::records::{Assignment, Member, Members, NodeMode, TaskStatus};
    use crate::view::{AssignmentEntry, SpecEntry, StatusEntry};
    use uuid::Uuid;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    /// A view of `nodes` (id, tags) and running services (id, tags, node).
    fn view(nodes: &[(&str, &[&str])], services: &[(&str, &[&str], &str)]) -> LogView {
        let mut view = LogView::default();
        let member = |(id, tags): &(&str, &[&str])| Member {
            id: node(id),
            incarnation: Uuid::nil(),
            hostname: format!("host-{id}"),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            runner: true,
            leader_capable: true,
            returns: 0,
            features: Vec::new(),
        };
        view.members = Some(Members {
            epoch: 1,
            nodes: nodes.iter().map(member).collect(),
            conflicts: Vec::new(),
            authorized_keys: None,
        });
        for (index, (id, tags, on)) in services.iter().enumerate() {
            let task = TaskId::new(*id).unwrap();
            let mut spec = TaskSpec::new(task.clone(), "true", vec![]);
            spec.tags = tags.iter().map(|t| t.to_string()).collect();
            view.specs.insert(
                task.clone(),
                SpecEntry { spec: spec.clone(), revision: index as i64, submitted_ms: 0 },
            );
            let assignment = Assignment {
                epoch: 1,
                task: task.clone(),
                generation: 1,
                spec_revision: index as i64,
                placement: Placement::Assigned { node: node(on) },
                spec,
                failed_on: Vec::new(),
                retry_at_ms: None,
                holders: Vec::new(),
                after: Vec::new(),
                incarnation: None,
            };
            view.assignments.insert(task.clone(), AssignmentEntry { assignment, offset: 0 });
            let status = TaskStatus {
                task: task.clone(),
                generation: 1,
                state: RunState::Running,
                run_id: None,
                pid: Some(1),
                attempt: 1,
                restarts: 0,
                last_exit: None,
                message: None,
                permanent: false,
                after: Vec::new(),
            };
            view.statuses
                .insert(task, StatusEntry { node: node(on), incarnation: Uuid::nil(), offset: 0, status });
        }
        view
    }

    fn summary(moves: &[Move]) -> Vec<(String, String, String)> {
        moves.iter().map(|m| (m.task.to_string(), m.from.to_string(), m.to.to_string())).collect()
    }

    #[test]
    fn joined_nodes_get_an_even_share_within_the_move_limit_and_tags() {
        let services: Vec<(String, &[&str], &str)> =
            (0..6).map(|i| (format!("s{i}"), &[][..], "n1")).collect();
        let services: Vec<(&str, &[&str], &str)> =
            services.iter().map(|(id, tags, on)| (id.as_str(), *tags, *on)).collect();
        let v = view(&[("n1", &[]), ("n2", &[]), ("n3", &[])], &services);
        let moves = plan(&v, 100);
        assert_eq!(
            summary(&moves),
            [("s0", "n1", "n2"), ("s1", "n1", "n3"), ("s2", "n1", "n2"), ("s3", "n1", "n3")]
                .map(|(t, f, to)| (t.to_owned(), f.to_owned(), to.to_owned()))
        );
        assert_eq!(plan(&v, 1).len(), 1, "--max-moves bounds them");
        // Tags: a gpu task only moves to a gpu node; balanced already: nothing.
        let v = view(
            &[("n1", &["gpu"]), ("n2", &[])],
            &[("a", &["gpu"], "n1"), ("b", &["gpu"], "n1"), ("c", &[], "n1")],
        );
        assert_eq!(summary(&plan(&v, 100)), [("c".to_owned(), "n1".to_owned(), "n2".to_owned())]);
        let v = view(&[("n1", &[]), ("n2", &[])], &[("a", &[], "n1"), ("b", &[], "n2"), ("c", &[], "n1")]);
        assert!(plan(&v, 100).is_empty(), "2 and 1 are as even as it gets");
    }

    #[test]
    fn cordoned_nodes_take_nothing_and_tasks_not_running_stay() {
        let mut v = view(
            &[("n1", &[]), ("n2", &[]), ("n3", &[])],
            &[("a", &[], "n1"), ("b", &[], "n1"), ("c", &[], "n1")],
        );
        v.node_modes
            .insert(node("n2"), NodeMode { node: node("n2"), mode: Mode::Cordoned, deadline_ms: None });
        assert_eq!(summary(&plan(&v, 100)), [("a".to_owned(), "n1".to_owned(), "n3".to_owned())]);
        v.statuses.get_mut(&TaskId::new("a").unwrap()).unwrap().status.state = RunState::Starting;
        assert_eq!(summary(&plan(&v, 100)), [("b".to_owned(), "n1".to_owned(), "n3".to_owned())]);
        // A node the task failed on is no target.
        let b = TaskId::new("b").unwrap();
        v.assignments.get_mut(&b).unwrap().assignment.failed_on = vec![node("n3")];
        assert_eq!(summary(&plan(&v, 100)), [("c".to_owned(), "n1".to_owned(), "n3".to_owned())]);
    }
}
