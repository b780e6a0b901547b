//! Placement, pure: which live runner runs each task.
//!
//! Rules:
//! * a node is eligible for a task when it is a live runner carrying every tag of the task
//!   (its host name counts as a tag);
//! * a task already on an eligible node stays there (nodes joining never move work), unless an
//!   operator asked it to move to another eligible node that takes new work (`rebalance`);
//! * every other task goes, in task-id order, to the eligible node with the fewest tasks, ties
//!   broken by node id;
//! * a task held on a node that is gone but may still run it (not yet fenced) stays there;
//! * a task avoids the nodes it failed on while another eligible node exists;
//! * a cordoned node keeps its tasks and gets no new one; a draining node gets no new task and
//!   keeps a task only while no other eligible node takes new work, and not past the drain's
//!   deadline (`shiva-ctl cordon`, `drain`);
//! * instances of one task (`count`) go to distinct nodes: an instance keeps its node unless
//!   a sibling placed before it (in id order) holds that node, and a new one goes to the least
//!   loaded eligible node no sibling holds; with fewer such nodes than instances, the rest are
//!   pending;
//! * an instance of an `every_node` task goes to its own node only;
//! * instances go only to nodes whose build runs them (the `instances` feature);
//! * a task with no eligible node is pending, with the reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use shiva_proto::records::{Member, Mode, NodeMode, feature};
use shiva_proto::{NodeId, TaskId};

/// Whether a runner takes new work and keeps what it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Availability {
    /// Takes new tasks.
    #[default]
    Open,
    /// Keeps its tasks, takes no new one.
    Cordoned,
    /// Takes no new task; its tasks go to other eligible nodes, and stay while none takes new
    /// work, until `expired` (the drain's deadline passed).
    Draining {
        /// The deadline passed.
        expired: bool,
    },
}

/// A live runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: NodeId,
    /// Its tags, host name included.
    pub tags: BTreeSet<String>,
    /// Cordoned or draining.
    pub availability: Availability,
    /// Its build runs instances (`<task>@<instance>` ids).
    pub instances: bool,
}

impl Candidate {
    /// The runners among `live` members, with their modes (`mode/<node>` records) at `now_ms`.
    pub fn runners(live: &[Member], modes: &BTreeMap<NodeId, NodeMode>, now_ms: i64) -> Vec<Candidate> {
        live.iter()
            .filter(|member| member.runner)
            .map(|member| Candidate {
                id: member.id.clone(),
                tags: member.tags.iter().cloned().chain([member.hostname.clone()]).collect(),
                availability: match modes.get(&member.id) {
                    None => Availability::Open,
                    Some(mode) => match mode.mode {
                        Mode::Open => Availability::Open,
                        Mode::Cordoned => Availability::Cordoned,
                        Mode::Draining => Availability::Draining {
                            expired: mode.deadline_ms.is_some_and(|deadline| now_ms >= deadline),
                        },
                    },
                },
                instances: member.has(feature::INSTANCES),
            })
            .collect()
    }

    /// Whether it carries every one of `tags`.
    pub fn can_run(&self, tags: &[String]) -> bool {
        tags.iter().all(|tag| self.tags.contains(tag))
    }

    /// Whether new work may be placed there.
    pub fn takes_new(&self) -> bool {
        self.availability == Availability::Open
    }
}

/// Why no node takes a task needing `tags` among `nodes`.
pub fn no_node_reason(nodes: &[Candidate], tags: &[String]) -> String {
    let closed: Vec<&str> = nodes
        .iter()
        .filter(|node| node.can_run(tags) && !node.takes_new())
        .map(|node| node.id.as_str())
        .collect();
    if !closed.is_empty() {
        format!("every live runner node that could run it is cordoned or draining ({})", closed.join(", "))
    } else if nodes.is_empty() {
        "no live runner node".to_owned()
    } else {
        format!("no live runner node carries the tags [{}]", tags.join(", "))
    }
}

/// A task to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The task.
    pub task: TaskId,
    /// Tags it needs.
    pub tags: Vec<String>,
    /// Where it runs now, if anywhere.
    pub current: Option<NodeId>,
    /// Keep it on `current` even though that node is not live: it may still run it (it has not
    /// fenced itself yet), and an exclusive task never runs twice.
    pub hold: bool,
    /// Nodes it failed on: avoided while another eligible node exists.
    pub avoid: Vec<NodeId>,
    /// A node an operator asked it to move to (`rebalance`): taken when it is a candidate that
    /// takes new work and can run the task.
    pub prefer: Option<NodeId>,
    /// An instance: the task it belongs to. Instances of one task go to distinct nodes, and
    /// only to nodes that run instances.
    pub apart: Option<TaskId>,
    /// The only node it may run on (an instance of an `every_node` task).
    pub only: Option<NodeId>,
}

impl Demand {
    /// A task needing `tags`, now on `current` (nothing else asked).
    pub fn new(task: TaskId, tags: Vec<String>, current: Option<NodeId>) -> Demand {
        Demand { task, tags, current, hold: false, avoid: Vec::new(), prefer: None, apart: None, only: None }
    }
}

/// Why no node takes an instance of `task` needing `tags`: every node that could run it holds
/// a sibling, or none runs instances, or the usual reasons.
fn no_node_for_instance(nodes: &[Candidate], task: &Demand) -> String {
    if let Some(only) = &task.only {
        return match nodes.iter().find(|node| node.id == *only) {
            None => format!("its node {only} is not a live runner"),
            Some(node) if !node.instances => format!("its node {only} runs an older build without instances"),
            Some(node) if !node.can_run(&task.tags) => {
                format!("its node {only} does not carry the tags [{}]", task.tags.join(", "))
            }
            Some(_) => format!("its node {only} is cordoned or draining"),
        };
    }
    let open: Vec<&Candidate> =
        nodes.iter().filter(|node| node.takes_new() && node.can_run(&task.tags)).collect();
    if !open.is_empty() && open.iter().all(|node| !node.instances) {
        return "no live runner node that could run it runs instances (older builds)".to_owned();
    }
    if !open.is_empty() {
        let group = task.apart.as_ref().map_or("", TaskId::as_str);
        return format!(
            "every node that could run it already runs an instance of {group} ({} open eligible node(s)): instances run on distinct nodes",
            open.len()
        );
    }
    no_node_reason(nodes, &task.tags)
}

/// Whether some candidate that takes new work carries a tag set, else why none, answered once
/// per tag set. A task that is no instance and avoids no node is open to exactly those nodes,
/// whatever their loads, so the answer holds for a whole step: thousands of tasks whose tags no
/// node carries would otherwise each walk every node at every step (and a pending task keeps
/// every step walking).
pub struct Takers<'n> {
    nodes: &'n [Candidate],
    known: HashMap<Vec<String>, Result<(), String>>,
}

impl<'n> Takers<'n> {
    /// For `nodes`.
    pub fn new(nodes: &'n [Candidate]) -> Takers<'n> {
        Takers { nodes, known: HashMap::new() }
    }

    /// `Ok` when a node that takes new work carries every one of `tags`, else why none does.
    pub fn check(&mut self, tags: &[String]) -> Result<(), String> {
        if let Some(known) = self.known.get(tags) {
            return known.clone();
        }
        let answer = match self.nodes.iter().any(|node| node.takes_new() && node.can_run(tags)) {
            true => Ok(()),
            false => Err(no_node_reason(self.nodes, tags)),
        };
        self.known.insert(tags.to_vec(), answer.clone());
        answer
    }
}

/// The candidates with their loads (tasks placed on them so far), found by id and walked
/// fewest-loaded first: with a thousand nodes and ten thousand tasks, a walk of the nodes for
/// each task's node, and a scan of them all with an ordered look-up of each one's load for each
/// new task, were most of a leader's step (issue 21, point 3).
///
/// An id's load is its first candidate's (ids are unique among live members; were one not, its
/// candidates would share the load, and a look-up by id finds the first, as a walk would).
struct Loads<'n> {
    nodes: &'n [Candidate],
    /// Each id's candidates, by position (the first holds the load).
    ids: HashMap<&'n NodeId, Vec<usize>>,
    load: Vec<usize>,
    /// (load, id, position): the order in which a new task takes nodes.
    order: BTreeSet<(usize, &'n NodeId, usize)>,
}

impl<'n> Loads<'n> {
    fn new(nodes: &'n [Candidate]) -> Loads<'n> {
        let mut ids: HashMap<&NodeId, Vec<usize>> = HashMap::with_capacity(nodes.len());
        for (position, node) in nodes.iter().enumerate() {
            ids.entry(&node.id).or_default().push(position);
        }
        let order = nodes.iter().enumerate().map(|(position, node)| (0, &node.id, position)).collect();
        Loads { nodes, ids, load: vec![0; nodes.len()], order }
    }

    /// The candidate `id` (its first).
    fn find(&self, id: &NodeId) -> Option<&'n Candidate> {
        self.ids.get(id).map(|positions| &self.nodes[positions[0]])
    }

    /// One more task on `id`.
    fn bump(&mut self, id: &NodeId) {
        let Some(positions) = self.ids.get(id) else { return };
        let load = &mut self.load[positions[0]];
        for position in positions {
            self.order.remove(&(*load, &self.nodes[*position].id, *position));
        }
        *load += 1;
        for position in positions {
            self.order.insert((*load, &self.nodes[*position].id, *position));
        }
    }

    /// The candidates, fewest tasks first, ties by id (then position).
    fn by_load(&self) -> impl Iterator<Item = &'n Candidate> + '_ {
        self.order.iter().map(|(_, _, position)| &self.nodes[*position])
    }
}

/// Places every task: `Ok(node)` or `Err(reason)`.
pub fn plan(nodes: &[Candidate], tasks: &[Demand]) -> BTreeMap<TaskId, Result<NodeId, String>> {
    let eligible = |node: &Candidate, task: &Demand| {
        node.can_run(&task.tags)
            && (task.apart.is_none() || node.instances)
            && task.only.as_ref().is_none_or(|only| *only == node.id)
    };
    let mut loads = Loads::new(nodes);
    // Nodes holding an instance of each task with instances.
    let mut siblings: BTreeMap<&TaskId, BTreeSet<NodeId>> = BTreeMap::new();
    // Where each instance runs now, by task: a node another instance runs on takes none.
    let mut currents: BTreeMap<&TaskId, Vec<(&TaskId, &NodeId)>> = BTreeMap::new();
    for task in tasks {
        if let (Some(group), Some(current)) = (&task.apart, &task.current) {
            currents.entry(group).or_default().push((&task.task, current));
        }
    }
    let sibling_runs_on = |task: &Demand, node: &NodeId| {
        task.apart
            .as_ref()
            .and_then(|group| currents.get(group))
            .is_some_and(|runs| runs.iter().any(|(other, on)| *other != &task.task && *on == node))
    };
    let mut placed = BTreeMap::new();
    let mut to_place = Vec::new();
    for task in tasks {
        if let (true, Some(current)) = (task.hold, &task.current) {
            if let Some(group) = &task.apart {
                siblings.entry(group).or_default().insert(current.clone());
            }
            placed.insert(task.task.clone(), Ok(current.clone()));
            continue;
        }
        let free = |node: &Candidate, siblings: &BTreeMap<&TaskId, BTreeSet<NodeId>>| {
            task.apart
                .as_ref()
                .is_none_or(|group| siblings.get(group).is_none_or(|held| !held.contains(&node.id)))
        };
        let preferred = task
            .prefer
            .as_ref()
            .filter(|prefer| task.current.as_ref() != Some(*prefer))
            .and_then(|prefer| loads.find(prefer))
            .filter(|node| node.takes_new() && eligible(node, task) && !task.avoid.contains(&node.id))
            .filter(|node| free(node, &siblings));
        if let Some(node) = preferred {
            loads.bump(&node.id);
            if let Some(group) = &task.apart {
                siblings.entry(group).or_default().insert(node.id.clone());
            }
            placed.insert(task.task.clone(), Ok(node.id.clone()));
            continue;
        }
        let keep = task
            .current
            .as_ref()
            .and_then(|current| loads.find(current))
            .filter(|node| eligible(node, task) && free(node, &siblings))
            .filter(|node| match node.availability {
                Availability::Open | Availability::Cordoned => true,
                // Another node that takes new work, can run it and did not fail it.
                Availability::Draining { expired } => {
                    !expired
                        && !nodes.iter().any(|other| {
                            other.takes_new()
                                && eligible(other, task)
                                && !task.avoid.contains(&other.id)
                                && !sibling_runs_on(task, &other.id)
                        })
                }
            });
        match keep {
            Some(node) => {
                loads.bump(&node.id);
                if let Some(group) = &task.apart {
                    siblings.entry(group).or_default().insert(node.id.clone());
                }
                placed.insert(task.task.clone(), Ok(node.id.clone()));
            }
            None => to_place.push(task),
        }
    }
    to_place.sort_by(|a, b| a.task.cmp(&b.task));
    let mut takers = Takers::new(nodes);
    for task in to_place {
        // A plain task (no instance, nothing avoided) no node is open to: its reason, known
        // once per tag set.
        let plain = task.apart.is_none() && task.only.is_none() && task.avoid.is_empty();
        if plain && let Err(reason) = takers.check(&task.tags) {
            placed.insert(task.task.clone(), Err(reason));
            continue;
        }
        let fresh = |node: &&Candidate| !task.avoid.contains(&node.id);
        let held = siblings.get(task.apart.as_ref().unwrap_or(&task.task));
        let open = |node: &&Candidate| {
            node.takes_new()
                && eligible(node, task)
                && (task.apart.is_none() || held.is_none_or(|held| !held.contains(&node.id)))
        };
        // Nodes it failed on only when no other open node is left (with none, every node is
        // fresh: no walk).
        let any_fresh = task.avoid.is_empty() || nodes.iter().filter(fresh).any(|node| open(&node));
        let best = loads.by_load().find(|node| open(node) && (!any_fresh || fresh(node)));
        let decision = match best {
            Some(node) => {
                loads.bump(&node.id);
                if let Some(group) = &task.apart {
                    siblings.entry(group).or_default().insert(node.id.clone());
                }
                Ok(node.id.clone())
            }
            None if task.apart.is_some() => Err(no_node_for_instance(nodes, task)),
            None => Err(no_node_reason(nodes, &task.tags)),
        };
        placed.insert(task.task.clone(), decision);
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TAGS: [&str; 3] = ["gpu", "ssd", "eu"];

    fn nodes_strategy() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::btree_map(
            0u8..8,
            prop::collection::btree_set(prop::sample::select(&TAGS[..]), 0..3),
            0..6,
        )
        .prop_map(|nodes| {
            nodes
                .into_iter()
                .map(|(id, tags)| Candidate {
                    id: NodeId::new(format!("n{id}")).unwrap(),
                    tags: tags.into_iter().map(str::to_owned).collect(),
                    availability: Availability::Open,
                    instances: true,
                })
                .collect()
        })
    }

    fn tasks_strategy() -> impl Strategy<Value = Vec<Demand>> {
        prop::collection::btree_map(
            0u16..40,
            (prop::collection::vec(prop::sample::select(&TAGS[..]), 0..2), prop::option::of(0u8..8)),
            0..30,
        )
        .prop_map(|tasks| {
            tasks
                .into_iter()
                .map(|(id, (tags, current))| {
                    Demand::new(
                        TaskId::new(format!("t{id}")).unwrap(),
                        tags.into_iter().map(str::to_owned).collect(),
                        current.map(|n| NodeId::new(format!("n{n}")).unwrap()),
                    )
                })
                .collect()
        })
    }

    /// Runners with every availability, some without instances, ids possibly repeated.
    fn mixed_nodes_strategy() -> impl Strategy<Value = Vec<Candidate>> {
        let availability = prop_oneof![
            Just(Availability::Open),
            Just(Availability::Cordoned),
            any::<bool>().prop_map(|expired| Availability::Draining { expired }),
        ];
        prop::collection::vec(
            (
                0u8..8,
                prop::collection::btree_set(prop::sample::select(&TAGS[..]), 0..3),
                availability,
                any::<bool>(),
            ),
            0..8,
        )
        .prop_map(|nodes| {
            nodes
                .into_iter()
                .map(|(id, tags, availability, instances)| Candidate {
                    id: NodeId::new(format!("n{id}")).unwrap(),
                    tags: tags.into_iter().map(str::to_owned).collect(),
                    availability,
                    instances,
                })
                .collect()
        })
    }

    /// Tasks with every kind of ask: held, avoiding, preferring, instances apart or pinned.
    fn mixed_tasks_strategy() -> impl Strategy<Value = Vec<Demand>> {
        let node = || prop::option::of((0u8..9).prop_map(|n| NodeId::new(format!("n{n}")).unwrap()));
        prop::collection::btree_map(
            0u16..40,
            (
                prop::collection::vec(prop::sample::select(&TAGS[..]), 0..2),
                node(),
                any::<bool>(),
                prop::collection::vec((0u8..9).prop_map(|n| NodeId::new(format!("n{n}")).unwrap()), 0..3),
                node(),
                prop::option::of(0u8..3),
                node(),
            ),
            0..30,
        )
        .prop_map(|tasks| {
            tasks
                .into_iter()
                .map(|(id, (tags, current, hold, avoid, prefer, group, only))| Demand {
                    task: TaskId::new(format!("t{id}")).unwrap(),
                    tags: tags.into_iter().map(str::to_owned).collect(),
                    current,
                    hold,
                    avoid,
                    prefer,
                    apart: group.map(|g| TaskId::new(format!("g{g}")).unwrap()),
                    only: only.filter(|_| group.is_some()),
                })
                .collect()
        })
    }

    /// `plan` as it was before its nodes were indexed (a walk of the nodes per question): the
    /// oracle the indexed one must agree with.
    fn plan_by_walking(nodes: &[Candidate], tasks: &[Demand]) -> BTreeMap<TaskId, Result<NodeId, String>> {
        let eligible = |node: &Candidate, task: &Demand| {
            node.can_run(&task.tags)
                && (task.apart.is_none() || node.instances)
                && task.only.as_ref().is_none_or(|only| *only == node.id)
        };
        let mut load: BTreeMap<&NodeId, usize> = nodes.iter().map(|node| (&node.id, 0)).collect();
        // Nodes holding an instance of each task with instances.
        let mut siblings: BTreeMap<&TaskId, BTreeSet<NodeId>> = BTreeMap::new();
        // Where each instance runs now, by task: a node another instance runs on takes none.
        let mut currents: BTreeMap<&TaskId, Vec<(&TaskId, &NodeId)>> = BTreeMap::new();
        for task in tasks {
            if let (Some(group), Some(current)) = (&task.apart, &task.current) {
                currents.entry(group).or_default().push((&task.task, current));
            }
        }
        let sibling_runs_on = |task: &Demand, node: &NodeId| {
            task.apart
                .as_ref()
                .and_then(|group| currents.get(group))
                .is_some_and(|runs| runs.iter().any(|(other, on)| *other != &task.task && *on == node))
        };
        let mut placed = BTreeMap::new();
        let mut to_place = Vec::new();
        for task in tasks {
            if let (true, Some(current)) = (task.hold, &task.current) {
                if let Some(group) = &task.apart {
                    siblings.entry(group).or_default().insert(current.clone());
                }
                placed.insert(task.task.clone(), Ok(current.clone()));
                continue;
            }
            let free = |node: &Candidate, siblings: &BTreeMap<&TaskId, BTreeSet<NodeId>>| {
                task.apart
                    .as_ref()
                    .is_none_or(|group| siblings.get(group).is_none_or(|held| !held.contains(&node.id)))
            };
            let preferred = task
                .prefer
                .as_ref()
                .filter(|prefer| task.current.as_ref() != Some(*prefer))
                .and_then(|prefer| nodes.iter().find(|node| node.id == *prefer))
                .filter(|node| node.takes_new() && eligible(node, task) && !task.avoid.contains(&node.id))
                .filter(|node| free(node, &siblings));
            if let Some(node) = preferred {
                *load.get_mut(&node.id).expect("every candidate has a load") += 1;
                if let Some(group) = &task.apart {
                    siblings.entry(group).or_default().insert(node.id.clone());
                }
                placed.insert(task.task.clone(), Ok(node.id.clone()));
                continue;
            }
            let keep = task
                .current
                .as_ref()
                .and_then(|current| nodes.iter().find(|node| node.id == *current))
                .filter(|node| eligible(node, task) && free(node, &siblings))
                .filter(|node| match node.availability {
                    Availability::Open | Availability::Cordoned => true,
                    // Another node that takes new work, can run it and did not fail it.
                    Availability::Draining { expired } => {
                        !expired
                            && !nodes.iter().any(|other| {
                                other.takes_new()
                                    && eligible(other, task)
                                    && !task.avoid.contains(&other.id)
                                    && !sibling_runs_on(task, &other.id)
                            })
                    }
                });
            match keep {
                Some(node) => {
                    *load.get_mut(&node.id).expect("every candidate has a load") += 1;
                    if let Some(group) = &task.apart {
                        siblings.entry(group).or_default().insert(node.id.clone());
                    }
                    placed.insert(task.task.clone(), Ok(node.id.clone()));
                }
                None => to_place.push(task),
            }
        }
        to_place.sort_by(|a, b| a.task.cmp(&b.task));
        for task in to_place {
            let fresh = |node: &&Candidate| !task.avoid.contains(&node.id);
            let held = siblings.get(task.apart.as_ref().unwrap_or(&task.task));
            let open = |node: &&Candidate| {
                node.takes_new()
                    && eligible(node, task)
                    && (task.apart.is_none() || held.is_none_or(|held| !held.contains(&node.id)))
            };
            let any_fresh = nodes.iter().filter(fresh).any(|node| open(&node));
            let best = nodes
                .iter()
                .filter(|node| open(node) && (!any_fresh || fresh(node)))
                .min_by(|a, b| load[&a.id].cmp(&load[&b.id]).then_with(|| a.id.cmp(&b.id)));
            let decision = match best {
                Some(node) => {
                    *load.get_mut(&node.id).expect("every candidate has a load") += 1;
                    if let Some(group) = &task.apart {
                        siblings.entry(group).or_default().insert(node.id.clone());
                    }
                    Ok(node.id.clone())
                }
                None if task.apart.is_some() => Err(no_node_for_instance(nodes, task)),
                None => Err(no_node_reason(nodes, &task.tags)),
            };
            placed.insert(task.task.clone(), decision);
        }
        placed
    }

    fn with_result(tasks: &[Demand], result: &BTreeMap<TaskId, Result<NodeId, String>>) -> Vec<Demand> {
        tasks.iter().map(|task| Demand { current: result[&task.task].clone().ok(), ..task.clone() }).collect()
    }

    proptest! {
        #[test]
        fn every_placement_is_eligible(nodes in nodes_strategy(), tasks in tasks_strategy()) {
            let result = plan(&nodes, &tasks);
            prop_assert_eq!(result.len(), tasks.len());
            for task in &tasks {
                let any_eligible = nodes.iter().any(|n| task.tags.iter().all(|t| n.tags.contains(t)));
                match &result[&task.task] {
                    Ok(node) => {
                        let node = nodes.iter().find(|n| n.id == *node).unwrap();
                        prop_assert!(task.tags.iter().all(|t| node.tags.contains(t)));
                    }
                    Err(_) => prop_assert!(!any_eligible),
                }
            }
        }

        #[test]
        fn indexed_plan_agrees_with_walking_the_nodes(
            nodes in mixed_nodes_strategy(),
            tasks in mixed_tasks_strategy(),
        ) {
            prop_assert_eq!(plan(&nodes, &tasks), plan_by_walking(&nodes, &tasks));
        }

        #[test]
        fn plan_is_stable(nodes in nodes_strategy(), tasks in tasks_strategy()) {
            let once = plan(&nodes, &tasks);
            let twice = plan(&nodes, &with_result(&tasks, &once));
            prop_assert_eq!(once, twice);
        }

        #[test]
        fn running_tasks_do_not_move_when_a_node_joins(nodes in nodes_strategy(), tasks in tasks_strategy()) {
            let once = plan(&nodes, &tasks);
            let mut more = nodes.clone();
            more.push(Candidate {
                id: NodeId::new("joiner").unwrap(),
                tags: TAGS.iter().map(|t| t.to_string()).collect(),
                availability: Availability::Open,
                instances: true,
            });
            let after = plan(&more, &with_result(&tasks, &once));
            for (task, decision) in &once {
                if let Ok(node) = decision {
                    prop_assert_eq!(after[task].as_ref().ok(), Some(node));
                }
            }
        }

        #[test]
        fn fresh_untagged_work_spreads_within_one(node_count in 1usize..7, task_count in 0usize..40) {
            let nodes: Vec<Candidate> = (0..node_count)
                .map(|i| Candidate {
                    id: NodeId::new(format!("n{i}")).unwrap(),
                    tags: BTreeSet::new(),
                    availability: Availability::Open,
                    instances: true,
                })
                .collect();
            let tasks: Vec<Demand> =
                (0..task_count).map(|i| Demand::new(TaskId::new(format!("t{i}")).unwrap(), vec![], None)).collect();
            let result = plan(&nodes, &tasks);
            let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (n.id.clone(), 0)).collect();
            for node in result.values() {
                *load.get_mut(node.as_ref().unwrap()).unwrap() += 1;
            }
            let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
            prop_assert!(max - min <= 1, "load {:?}", load);
        }
    }

    /// A runner with `tags`.
    fn candidate(id: &str, tags: &[&str], availability: Availability) -> Candidate {
        Candidate {
            id: NodeId::new(id).unwrap(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            availability,
            instances: true,
        }
    }

    /// A task needing `tags`, on `current`.
    fn demand(id: &str, tags: &[&str], current: Option<&str>) -> Demand {
        Demand::new(
            TaskId::new(id).unwrap(),
            tags.iter().map(|t| t.to_string()).collect(),
            current.map(|c| NodeId::new(c).unwrap()),
        )
    }

    #[test]
    fn tasks_of_a_gone_node_move_and_ties_go_by_id() {
        let node = |id: &str, tags: &[&str]| candidate(id, tags, Availability::Open);
        let task = demand;
        let nodes = [node("b", &[]), node("a", &["gpu"])];
        let result = plan(
            &nodes,
            &[task("x", &[], Some("gone")), task("y", &["gpu"], None), task("z", &["tpu"], None)],
        );
        assert_eq!(result[&TaskId::new("x").unwrap()], Ok(NodeId::new("a").unwrap()));
        assert_eq!(result[&TaskId::new("y").unwrap()], Ok(NodeId::new("a").unwrap()));
        assert!(result[&TaskId::new("z").unwrap()].as_ref().unwrap_err().contains("[tpu]"));
        assert_eq!(
            plan(&[], &[task("x", &[], None)])[&TaskId::new("x").unwrap()],
            Err("no live runner node".into())
        );
        let held = Demand { hold: true, ..task("x", &[], Some("gone")) };
        assert_eq!(plan(&nodes, &[held])[&TaskId::new("x").unwrap()], Ok(NodeId::new("gone").unwrap()));
        // Failed on a (the least loaded): goes to b; failed on both: back to the least loaded.
        let failed = |on: &[&str]| Demand {
            avoid: on.iter().map(|n| NodeId::new(*n).unwrap()).collect(),
            ..task("x", &[], None)
        };
        let x = TaskId::new("x").unwrap();
        assert_eq!(plan(&nodes, &[failed(&["a"])])[&x], Ok(NodeId::new("b").unwrap()));
        assert_eq!(plan(&nodes, &[failed(&["b", "a"])])[&x], Ok(NodeId::new("a").unwrap()));
    }

    #[test]
    fn cordoned_nodes_keep_their_tasks_and_draining_ones_hand_them_over_while_another_can_take_them() {
        let (node, task) = (candidate, demand);
        let id = |id: &str| NodeId::new(id).unwrap();
        let on = |result: &BTreeMap<TaskId, Result<NodeId, String>>, t: &str| {
            result[&TaskId::new(t).unwrap()].clone()
        };
        let tasks = [task("kept", &[], Some("a")), task("new1", &[], None), task("new2", &[], None)];

        // Cordoned: keeps "kept", takes neither new task although it is the least loaded.
        let nodes = [node("a", &[], Availability::Cordoned), node("b", &[], Availability::Open)];
        let result = plan(&nodes, &tasks);
        assert_eq!(on(&result, "kept"), Ok(id("a")));
        assert_eq!(on(&result, "new1"), Ok(id("b")));
        assert_eq!(on(&result, "new2"), Ok(id("b")));

        // Draining: "kept" moves to b; nothing new lands on a.
        let draining = Availability::Draining { expired: false };
        let nodes = [node("a", &[], draining), node("b", &[], Availability::Open)];
        let result = plan(&nodes, &tasks);
        assert!(result.values().all(|placed| placed == &Ok(id("b"))), "{result:?}");

        // A task only the draining node can run stays there until the deadline, then waits.
        let gpu = [task("gpu", &["gpu"], Some("a"))];
        let nodes = [node("a", &["gpu"], draining), node("b", &[], Availability::Open)];
        assert_eq!(on(&plan(&nodes, &gpu), "gpu"), Ok(id("a")));
        let nodes = [
            node("a", &["gpu"], Availability::Draining { expired: true }),
            node("b", &[], Availability::Open),
        ];
        let reason = on(&plan(&nodes, &gpu), "gpu").unwrap_err();
        assert!(reason.contains("cordoned or draining (a)"), "{reason}");
        // The only open node failed it: it stays on the draining node until the deadline.
        let failed_on_b = [Demand { avoid: vec![id("b")], ..gpu[0].clone() }];
        let nodes = [node("a", &["gpu"], draining), node("b", &["gpu"], Availability::Open)];
        assert_eq!(on(&plan(&nodes, &failed_on_b), "gpu"), Ok(id("a")));
        // Another gpu node cordoned does not take it either.
        let nodes = [node("a", &["gpu"], draining), node("c", &["gpu"], Availability::Cordoned)];
        assert_eq!(on(&plan(&nodes, &gpu), "gpu"), Ok(id("a")));
        // A new task no open node can run is pending, naming the closed ones.
        let nodes = [node("a", &[], Availability::Cordoned)];
        let reason = on(&plan(&nodes, &[task("new", &[], None)]), "new").unwrap_err();
        assert!(reason.contains("cordoned or draining (a)"), "{reason}");
    }

    #[test]
    fn instances_keep_apart_and_one_with_nowhere_else_to_go_stays_on_a_draining_node() {
        let id = |id: &str| NodeId::new(id).unwrap();
        let instance = |n: &str, current: Option<&str>| Demand {
            apart: Some(TaskId::new("web").unwrap()),
            ..demand(&format!("web@{n}"), &[], current)
        };
        let on = |result: &BTreeMap<TaskId, Result<NodeId, String>>, t: &str| {
            result[&TaskId::new(t).unwrap()].clone()
        };
        let open = |name: &str| candidate(name, &[], Availability::Open);
        // Two on one node (a forged or stale state): the second moves to the free node.
        let nodes = [open("a"), open("b")];
        let result = plan(&nodes, &[instance("0", Some("a")), instance("1", Some("a"))]);
        assert_eq!((on(&result, "web@0"), on(&result, "web@1")), (Ok(id("a")), Ok(id("b"))));
        // A draining node keeps its instance while every other node runs a sibling, until the
        // deadline.
        let draining = |expired| candidate("a", &[], Availability::Draining { expired });
        let all = [instance("0", Some("a")), instance("1", Some("b")), instance("2", Some("c"))];
        let result = plan(&[draining(false), open("b"), open("c")], &all);
        assert_eq!(on(&result, "web@0"), Ok(id("a")));
        let result = plan(&[draining(true), open("b"), open("c")], &all);
        assert!(on(&result, "web@0").unwrap_err().contains("distinct nodes"), "{result:?}");
        // A free node: it moves there.
        let result = plan(&[draining(false), open("b"), open("c"), open("d")], &all);
        assert_eq!(on(&result, "web@0"), Ok(id("d")));
        // Nodes of an older build take no instance; an `every_node` one goes to its node only.
        let old = Candidate { instances: false, ..open("a") };
        let result = plan(&[old], &[instance("0", None)]);
        assert!(on(&result, "web@0").unwrap_err().contains("older builds"), "{result:?}");
        let pinned = Demand { only: Some(id("b")), ..instance("b", None) };
        assert_eq!(on(&plan(&[open("a"), open("b")], std::slice::from_ref(&pinned)), "web@b"), Ok(id("b")));
        let reason = on(&plan(&[open("a")], &[pinned]), "web@b").unwrap_err();
        assert!(reason.contains("not a live runner"), "{reason}");
    }

    #[test]
    fn a_move_request_takes_the_task_to_an_open_eligible_node_and_nowhere_else() {
        let node = candidate;
        let moved = |prefer: &str, tags: &[&str]| Demand {
            prefer: Some(NodeId::new(prefer).unwrap()),
            ..demand("t", tags, Some("a"))
        };
        let on =
            |nodes: &[Candidate], demand: Demand| plan(nodes, &[demand])[&TaskId::new("t").unwrap()].clone();
        let id = |id: &str| Ok(NodeId::new(id).unwrap());
        let nodes = [node("a", &[], Availability::Open), node("b", &["gpu"], Availability::Open)];
        assert_eq!(on(&nodes, moved("b", &[])), id("b"), "moved although a could keep it");
        assert_eq!(on(&nodes, moved("a", &[])), id("a"), "already there");
        assert_eq!(on(&nodes, moved("gone", &[])), id("a"), "an unknown node: it stays");
        let nodes = [node("a", &[], Availability::Open), node("b", &[], Availability::Cordoned)];
        assert_eq!(on(&nodes, moved("b", &[])), id("a"), "a cordoned node takes no move");
        let nodes = [node("a", &["x"], Availability::Open), node("b", &[], Availability::Open)];
        assert_eq!(on(&nodes, moved("b", &["x"])), id("a"), "b cannot run it");
    }
}
