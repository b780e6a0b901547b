//! Replay equivalence: a log full of stale, duplicated, forged and tombstoned records, healed
//! by the leader's reconciliation, replays after compaction to the state read live.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shiva_proto::records::{Body, Claim, Envelope};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::key;
use shiva_proto::{NodeId, TaskId, TopicKind};
use uuid::Uuid;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Submit(u8),
    Delete(u8),
    Stop(u8),
    /// Node `n` claims the next epoch.
    Claim(u8),
    /// The current leader reconciles with live nodes given by the mask's bits 0–2; of the other
    /// nodes, bits 3–5 tell which may still run their exclusive tasks (not fenced yet).
    Lead(u8),
    /// An old winner writes an assignment for a task at its (stale) epoch.
    Stale(u8, u8),
    /// Junk bytes on an assignment key.
    Junk(u8),
    /// A tombstone on an assignment key.
    Tombstone(u8),
    /// A claim for a huge epoch from a non-node.
    Forged,
    /// A new revision of task `t`: bits 0–1 pick its tags (none, `a`, `b`), bit 2 a long stop
    /// grace, bit 3 `on_disconnect: keep`, bit 4 `count: 2`, else bit 5 `every_node`.
    Resubmit(u8, u8),
    /// The nodes whose bits are set (0–2) act as runners on the log: stop, start, answer
    /// hand-offs.
    Runners(u8),
    /// A copy of an earlier record lands again, as a producer retry may write it (claims
    /// excepted: a retried claim lands only after its original, when its epoch is taken and
    /// it loses; a forged copy of a claim is a known limit, see docs/protocol.md).
    Duplicate(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..6).prop_map(Op::Submit),
        1 => (0u8..6).prop_map(Op::Delete),
        1 => (0u8..6).prop_map(Op::Stop),
        2 => (0u8..3).prop_map(Op::Claim),
        4 => any::<u8>().prop_map(Op::Lead),
        2 => ((0u8..3), (0u8..6)).prop_map(|(n, t)| Op::Stale(n, t)),
        1 => (0u8..6).prop_map(Op::Junk),
        1 => (0u8..6).prop_map(Op::Tombstone),
        1 => Just(Op::Forged),
        2 => any::<u16>().prop_map(Op::Duplicate),
        3 => ((0u8..6), any::<u8>()).prop_map(|(t, v)| Op::Resubmit(t, v)),
        4 => any::<u8>().prop_map(Op::Runners),
    ]
}

type Entry = (TopicKind, i64, String, Option<Vec<u8>>);

/// A copy of a service a simulated runner holds.
#[derive(Debug, Clone)]
struct Copy {
    generation: u64,
    revision: i64,
    keep: bool,
    /// Asked to stop: gone at the node's next step.
    stopping: bool,
    /// The nodes whose word it started after (carried on its statuses).
    after: Vec<NodeId>,
}

/// Node `i`'s tags: n0 `a`, n1 `b`, n2 both.
fn node_tags(i: usize) -> Vec<String> {
    match i {
        0 => vec!["a".into()],
        1 => vec!["b".into()],
        _ => vec!["a".into(), "b".into()],
    }
}

struct Sim {
    log: Vec<Entry>,
    offsets: BTreeMap<TopicKind, i64>,
    view: LogView,
    nodes: Vec<(NodeId, Uuid)>,
    /// Exclusive tasks moved away from a node that may still run them, or started beside
    /// another copy.
    doubled: Vec<String>,
    /// Copies held by the simulated runners, by node index and task.
    copies: BTreeMap<(usize, TaskId), Copy>,
    /// Each runner's newest own status per task (generation, state).
    own: BTreeMap<(usize, TaskId), (u64, shiva_proto::records::RunState)>,
    /// The leader's clock.
    now_ms: i64,
    /// When set, how long the nodes that are not live have been silent: they may still run a
    /// copy while that is below a 3 s fence timeout + the copy's stop grace + 1 s (the mask's
    /// bits 3–5 are then ignored).
    silent_for: Option<std::time::Duration>,
    /// Whether the nodes' heartbeats list `start_after` (hand-offs in one hop).
    start_after: bool,
}

impl Sim {
    fn new() -> Self {
        let nodes = (0..3).map(|i| (NodeId::new(format!("n{i}")).unwrap(), Uuid::new_v4())).collect();
        Sim {
            log: Vec::new(),
            offsets: BTreeMap::new(),
            view: LogView::default(),
            nodes,
            doubled: Vec::new(),
            copies: BTreeMap::new(),
            own: BTreeMap::new(),
            now_ms: 0,
            silent_for: None,
            start_after: true,
        }
    }

    fn append(&mut self, topic: TopicKind, key: String, value: Option<Vec<u8>>) {
        let offset = self.offsets.entry(topic).or_insert(0);
        self.view.apply(topic, *offset, Some(key.as_bytes()), value.as_deref());
        self.log.push((topic, *offset, key, value));
        *offset += 1;
    }

    fn env(&self, node: usize, body: Body) -> Vec<u8> {
        let (id, inc) = &self.nodes[node];
        Envelope { sender: id.to_string(), incarnation: Some(*inc), sent_at_ms: 0, body }.encode()
    }

    fn task(t: u8) -> TaskId {
        TaskId::new(format!("t{t}")).unwrap()
    }

    fn leader_index(&self) -> Option<(u64, usize)> {
        let (epoch, winner) = self.view.leader()?;
        let index =
            self.nodes.iter().position(|(id, inc)| *id == winner.node && *inc == winner.incarnation)?;
        Some((epoch, index))
    }

    fn lead(&mut self, mask: u8) {
        let Some((epoch, index)) = self.leader_index() else { return };
        let features = match self.start_after {
            true => shiva_proto::records::feature::ALL.iter().map(|f| (*f).to_owned()).collect(),
            false => Vec::new(),
        };
        let live: Vec<Member> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0 || *i == index)
            .map(|(_, (id, inc))| Member {
                id: id.clone(),
                incarnation: *inc,
                hostname: id.to_string(),
                tags: node_tags(self.nodes.iter().position(|(n, _)| n == id).unwrap()),
                runner: true,
                leader_capable: true,
                returns: 0,
                features: features.clone(),
            })
            .collect();
        let fencing: Vec<NodeId> = (0..self.nodes.len())
            .filter(|i| mask & (1 << i) == 0 && mask & (8 << i) != 0)
            .map(|i| self.nodes[i].0.clone())
            .collect();
        // A node silent past its fence stopped its exclusive copies.
        for i in (0..self.nodes.len()).filter(|i| mask & (1 << i) == 0 && mask & (8 << i) == 0 && *i != index)
        {
            self.copies.retain(|(node, _), copy| *node != i || copy.keep);
        }
        // A copy that rides out disconnections (asked with the longest grace) may run until its
        // node leaves; none of the simulated nodes leaves.
        let silent_for = self.silent_for;
        let may_still_run = |node: &NodeId, grace: std::time::Duration| match silent_for {
            Some(silent) => silent < std::time::Duration::from_secs(4).saturating_add(grace),
            None => grace == std::time::Duration::MAX || fencing.contains(node),
        };
        let inputs = Inputs {
            live: &live,
            conflicts: &[],
            epoch,
            now_ms: self.now_ms,
            busy: &|_, _| false,
            may_still_run: &may_still_run,
            incarnation_may_still_run: &|_, _, _| false,
            failed: &Default::default(),
        };
        for write in reconcile(&self.view, &inputs) {
            let keep = |spec: &TaskSpec| spec.on_disconnect == shiva_proto::spec::OnDisconnect::Keep;
            if let Some(Body::Assignment(assignment)) = &write.body
                && let Some(from) = self.view.assigned_node(&assignment.task)
                && fencing.contains(from)
                && matches!(&assignment.placement, Placement::Assigned { node } if node != from)
                // Told to wait for that node's word, the new node does not start meanwhile.
                && !assignment.after.contains(from)
                // Copies that both ride out disconnections may run side by side.
                && !(keep(&assignment.spec) && keep(&self.view.assignments[&assignment.task].assignment.spec))
                // Nor is it early once that node said its copy of this generation stopped.
                && !self.view.current_status(&assignment.task).is_some_and(|status| {
                    status.node == *from && status.status.state == shiva_proto::records::RunState::Stopped
                })
            {
                self.doubled.push(format!("{} moved off {from} before it fenced", assignment.task));
            }
            let value = write.body.map(|body| self.env(index, body));
            self.append(write.topic, write.key, value);
        }
    }

    /// The runners among `mask` act on the log as the node's driver does: the pure
    /// `runner::wanted` and `runner::releases` decide; a stop takes one step.
    fn runners(&mut self, mask: u8) {
        use shiva_proto::records::{RunState, TaskStatus};
        for i in (0..self.nodes.len()).filter(|i| mask & (1 << i) != 0) {
            let (me, incarnation) = self.nodes[i].clone();
            let standing = crate::runner::Standing {
                fenced: false,
                may_start_exclusive: crate::node::returned_confirmed(
                    self.view.members.as_ref(),
                    &me,
                    incarnation,
                    0,
                ),
            };
            let copies = self.copies.clone();
            // As the driver's `Supervisor::runs`: a job being stopped does not count.
            let holds = |task: &TaskId| copies.get(&(i, task.clone())).is_some_and(|copy| !copy.stopping);
            let wanted = crate::runner::wanted(&self.view, (&me, incarnation), standing, &holds);
            let mut statuses = Vec::new();
            let status = |task: &TaskId, generation: u64, state: RunState, after: &[NodeId]| TaskStatus {
                task: task.clone(),
                generation,
                state,
                run_id: None,
                pid: None,
                attempt: 1,
                restarts: 0,
                last_exit: None,
                message: None,
                permanent: false,
                after: after.to_vec(),
            };
            for ((node, task), copy) in copies.iter().filter(|((node, _), _)| *node == i) {
                let want = wanted.get(task);
                if copy.stopping {
                    self.copies.remove(&(*node, task.clone()));
                    statuses.push(status(task, copy.generation, RunState::Stopped, &copy.after));
                } else if want.is_none_or(|want| want.spec_revision != copy.revision) {
                    self.copies.get_mut(&(*node, task.clone())).unwrap().stopping = true;
                } else if let Some(want) = want.filter(|want| want.generation != copy.generation) {
                    self.copies.get_mut(&(*node, task.clone())).unwrap().generation = want.generation;
                    statuses.push(status(task, want.generation, RunState::Running, &copy.after));
                }
            }
            // A staged start (a hand-off still waiting for another node's word) starts nothing.
            for (task, want) in wanted.iter().filter(|(_, want)| want.start) {
                if self.copies.contains_key(&(i, task.clone())) {
                    continue;
                }
                let keep = want.spec.on_disconnect == shiva_proto::spec::OnDisconnect::Keep;
                // Another copy of the task, or of the task under another name (its own copy
                // beside one of its instances: a switch to or from instances).
                let relative = |t: &TaskId| {
                    t.base() == task.base() && t.instance().is_some() != task.instance().is_some()
                };
                for ((other, _), copy) in
                    self.copies.iter().filter(|((n, t), _)| (*n != i && t == task) || relative(t))
                {
                    if !(keep && copy.keep) {
                        self.doubled
                            .push(format!("{task} started on n{i} while n{other} holds a copy {copy:?}"));
                    }
                }
                let copy = Copy {
                    generation: want.generation,
                    revision: want.spec_revision,
                    keep,
                    stopping: false,
                    after: want.after.clone(),
                };
                self.copies.insert((i, task.clone()), copy);
                statuses.push(status(task, want.generation, RunState::Running, &want.after));
            }
            let copies = self.copies.clone();
            let holds = |task: &TaskId| copies.contains_key(&(i, task.clone()));
            let own = |task: &TaskId| self.own.get(&(i, task.clone())).copied();
            statuses.extend(crate::runner::releases(&self.view, &me, &holds, &own));
            for status in statuses {
                self.own.insert((i, status.task.clone()), (status.generation, status.state));
                let task = status.task.clone();
                let value = self.env(i, Body::Status(status));
                self.append(TopicKind::Status, key::task(&task), Some(value));
            }
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Submit(t) => {
                let spec = TaskSpec::new(Self::task(*t), "sleep", vec!["1".into()]);
                let value = Envelope {
                    sender: "ctl".into(),
                    incarnation: None,
                    sent_at_ms: 0,
                    body: Body::Task(spec),
                };
                self.append(TopicKind::Commands, key::task(&Self::task(*t)), Some(value.encode()));
            }
            Op::Delete(t) => self.append(TopicKind::Commands, key::task(&Self::task(*t)), None),
            Op::Stop(t) => {
                let body = Body::Desired(shiva_proto::records::Desired {
                    task: Self::task(*t),
                    state: DesiredState::Stopped,
                });
                let value = Envelope { sender: "ctl".into(), incarnation: None, sent_at_ms: 0, body };
                self.append(TopicKind::Commands, key::desired(&Self::task(*t)), Some(value.encode()));
            }
            Op::Claim(n) => {
                let epoch = self.view.epochs.newest + 1;
                let value = self.env(*n as usize, Body::Claim(Claim { epoch }));
                let claim_key = key::claim(epoch, &self.nodes[*n as usize].0, Uuid::new_v4());
                self.append(TopicKind::Assignments, claim_key, Some(value));
            }
            Op::Lead(mask) => self.lead(*mask),
            Op::Runners(mask) => self.runners(*mask),
            Op::Resubmit(t, variant) => {
                let mut spec = TaskSpec::new(Self::task(*t), "sleep", vec!["1".into()]);
                spec.tags = match variant & 3 {
                    1 => vec!["a".into()],
                    2 => vec!["b".into()],
                    _ => vec![],
                };
                spec.stop_grace = std::time::Duration::from_secs(if variant & 4 != 0 { 600 } else { 1 });
                if variant & 8 != 0 {
                    spec.on_disconnect = shiva_proto::spec::OnDisconnect::Keep;
                }
                if variant & 16 != 0 {
                    spec.count = Some(2);
                } else if variant & 32 != 0 {
                    spec.every_node = true;
                }
                let value = Envelope {
                    sender: "ctl".into(),
                    incarnation: None,
                    sent_at_ms: 0,
                    body: Body::Task(spec),
                };
                self.append(TopicKind::Commands, key::task(&Self::task(*t)), Some(value.encode()));
            }
            Op::Stale(n, t) => {
                let node = *n as usize;
                let (id, inc) = self.nodes[node].clone();
                let Some((&epoch, _)) =
                    self.view.epochs.winners.iter().find(|(_, w)| w.node == id && w.incarnation == inc)
                else {
                    return;
                };
                // The current leader's own writes land in the order it made them (one producer):
                // an earlier decision of its never lands after a later one.
                if self.view.leader().is_some_and(|(current, _)| current == epoch) {
                    return;
                }
                let assignment = Assignment {
                    epoch,
                    task: Self::task(*t),
                    generation: 99,
                    spec_revision: 0,
                    placement: Placement::Assigned { node: id },
                    spec: TaskSpec::new(Self::task(*t), "stale", vec![]),
                    failed_on: vec![],
                    retry_at_ms: None,
                    holders: vec![],
                    after: Vec::new(),
                    incarnation: None,
                };
                let value = self.env(node, Body::Assignment(assignment));
                self.append(TopicKind::Assignments, key::task(&Self::task(*t)), Some(value));
            }
            Op::Junk(t) => {
                self.append(TopicKind::Assignments, key::task(&Self::task(*t)), Some(b"\x00junk".to_vec()))
            }
            Op::Tombstone(t) => self.append(TopicKind::Assignments, key::task(&Self::task(*t)), None),
            Op::Forged => {
                let ghost = NodeId::new("ghost").unwrap();
                let body = Body::Claim(Claim { epoch: 1 << 40 });
                let value = Envelope {
                    sender: "ghost".into(),
                    incarnation: Some(Uuid::new_v4()),
                    sent_at_ms: 0,
                    body,
                };
                self.append(
                    TopicKind::Assignments,
                    key::claim(1 << 40, &ghost, Uuid::new_v4()),
                    Some(value.encode()),
                );
            }
            Op::Duplicate(index) => {
                if !self.log.is_empty() {
                    let (topic, _, key, value) = self.log[*index as usize % self.log.len()].clone();
                    // The current leader's own writes land in order (one producer, one request
                    // in flight): a retry lands right after its original, never after a later
                    // write, so an arbitrary old copy of one is not a retry.
                    let current_leader = self.leader_index().map(|(_, index)| self.nodes[index].clone());
                    let from_leader =
                        value.as_deref().and_then(|value| Envelope::decode(value).ok()).is_some_and(|env| {
                            current_leader.as_ref().is_some_and(|(id, inc)| {
                                env.sender == id.as_str() && env.incarnation == Some(*inc)
                            })
                        });
                    if !(key.starts_with("claim/") || (topic == TopicKind::Assignments && from_leader)) {
                        self.append(topic, key, value);
                    }
                }
            }
        }
    }

    /// What a cleaner that stopped part way leaves (it works up to a cut offset, and drops
    /// tombstones only later): of the records before `cut` (a fraction of each topic), only the
    /// last of each key among them, and of those tombstones only the ones at or after
    /// `tombstones_cut` (a fraction of `cut`); every record from `cut` on.
    fn compacted_up_to(&self, cut: f64, tombstones_cut: f64) -> Vec<Entry> {
        let at = |topic: &TopicKind, fraction: f64| {
            let end = self.offsets.get(topic).copied().unwrap_or(0);
            (end as f64 * fraction).floor() as i64
        };
        let mut last: BTreeMap<(TopicKind, String), i64> = BTreeMap::new();
        for (topic, offset, key, _) in &self.log {
            if *offset < at(topic, cut) {
                last.insert((*topic, key.clone()), *offset);
            }
        }
        self.log
            .iter()
            .filter(|(topic, offset, key, value)| {
                let newest = || last[&(*topic, key.clone())] == *offset;
                *offset >= at(topic, cut)
                    || (newest() && (value.is_some() || *offset >= at(topic, cut * tombstones_cut)))
            })
            .cloned()
            .collect()
    }

    /// Keeps the last record of every key, as compaction does.
    fn compacted(&self) -> Vec<Entry> {
        let mut last: BTreeMap<(TopicKind, String), i64> = BTreeMap::new();
        for (topic, offset, key, _) in &self.log {
            last.insert((*topic, key.clone()), *offset);
        }
        self.log
            .iter()
            .filter(|(topic, offset, key, _)| last[&(*topic, key.clone())] == *offset)
            .cloned()
            .collect()
    }
}

fn replay(log: &[Entry]) -> LogView {
    let mut view = LogView::default();
    for (topic, offset, key, value) in log {
        view.apply(*topic, *offset, Some(key.as_bytes()), value.as_deref());
    }
    view
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn compacted_log_replays_to_the_live_state(
        ops in prop::collection::vec(op(), 1..60),
        cuts in prop::collection::vec((0.0..=1.0f64, 0.0..=1.0f64), 4),
    ) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.run(op);
        }
        // The leader heals what landed after its writes; hand-offs settle once every node acts.
        prop_assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
        for _ in 0..4 {
            sim.lead(0xff);
            sim.runners(0xff);
        }
        prop_assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
        // Winning claims are trimmed one per step (each once the one before is read back).
        for _ in 0..64 {
            let before = sim.log.len();
            sim.lead(0xff);
            if sim.log.len() == before {
                break;
            }
        }
        sim.lead(0xff);
        let healed = sim.log.len();
        sim.runners(0xff);
        sim.lead(0xff);
        prop_assert_eq!(sim.log.len(), healed, "a second pass over a healed log writes nothing");
        let replayed = replay(&sim.compacted());
        let live = &sim.view;
        prop_assert_eq!(&replayed.specs, &live.specs);
        prop_assert_eq!(&replayed.desired, &live.desired);
        // Claims of epochs no kept record needs are trimmed: the compacted log starts at a later
        // winner, and knows the winners from there on.
        let kept = |view: &LogView| view.epochs.winners.range(replayed.epochs.floor..).map(|(e, w)| (*e, w.clone())).collect::<Vec<_>>();
        prop_assert_eq!(kept(&replayed), kept(live));
        prop_assert_eq!(replayed.epochs.leader(), live.epochs.leader());
        if sim.leader_index().is_some() {
            let strip = |view: &LogView| -> BTreeMap<TaskId, Assignment> {
                view.assignments.iter().map(|(t, e)| (t.clone(), e.assignment.clone())).collect()
            };
            prop_assert_eq!(strip(&replayed), strip(live));
            prop_assert_eq!(&replayed.members, &live.members);
            // A cleaner that stopped part way leaves a log that replays the same: whatever
            // prefix of the claims' tombstones it applied, the first claim left is a winner and
            // every later winner follows.
            for (cut, tombstones_cut) in &cuts {
                let partial = replay(&sim.compacted_up_to(*cut, *tombstones_cut));
                prop_assert_eq!(partial.leader(), live.leader(), "cut {} {}", cut, tombstones_cut);
                prop_assert_eq!(strip(&partial), strip(live));
                prop_assert_eq!(&partial.members, &live.members);
            }
            // Every task with a spec has an assignment (each instance of one run as instances,
            // all nodes being live), and no assignment outlives its spec.
            let mut placed: Vec<TaskId> = Vec::new();
            for (task, entry) in &live.specs {
                match entry.spec.instances() {
                    shiva_proto::spec::Instances::Single => placed.push(task.clone()),
                    shiva_proto::spec::Instances::Count(count) => {
                        placed.extend((0..count).map(|n| task.with_instance(&n.to_string()).unwrap()));
                    }
                    shiva_proto::spec::Instances::EveryNode => placed.extend(
                        (0..3)
                            .filter(|i| entry.spec.tags.iter().all(|tag| node_tags(*i).contains(tag)))
                            .map(|i| task.with_instance(&format!("n{i}")).unwrap()),
                    ),
                }
            }
            placed.sort();
            prop_assert_eq!(live.assignments.keys().cloned().collect::<Vec<_>>(), placed);
            // Instances of a task run on distinct nodes.
            let mut seen = std::collections::BTreeSet::new();
            for (task, entry) in &live.assignments {
                if let (Some(_), Placement::Assigned { node }) = (task.instance(), &entry.assignment.placement) {
                    prop_assert!(seen.insert((task.base(), node.clone())), "two instances of {} on {}", task.base(), node);
                }
            }
        }
    }
}

#[test]
fn periodic_and_once_tasks_are_scheduled_not_placed_as_services() {
    let mut sim = Sim::new();
    for (t, periodic) in [(1u8, true), (2, false)] {
        let mut spec = TaskSpec::new(Sim::task(t), "sleep", vec!["1".into()]);
        if periodic {
            spec.schedule = vec!["* * * * *".into()];
        } else {
            spec.once = true;
        }
        let value =
            Envelope { sender: "ctl".into(), incarnation: None, sent_at_ms: 0, body: Body::Task(spec) };
        sim.append(TopicKind::Commands, key::task(&Sim::task(t)), Some(value.encode()));
    }
    sim.run(&Op::Claim(0));
    sim.lead(0b111);
    for t in [1, 2] {
        let placement = &sim.view.assignments[&Sim::task(t)].assignment.placement;
        assert_eq!(placement, &Placement::Scheduled, "the scheduler launches their runs");
    }
    let mut tagged = TaskSpec::new(Sim::task(3), "true", vec![]);
    tagged.once = true;
    tagged.tags = vec!["gpu".into()];
    let value = Envelope { sender: "ctl".into(), incarnation: None, sent_at_ms: 0, body: Body::Task(tagged) };
    sim.append(TopicKind::Commands, key::task(&Sim::task(3)), Some(value.encode()));
    sim.lead(0b111);
    let placement = &sim.view.assignments[&Sim::task(3)].assignment.placement;
    assert!(matches!(placement, Placement::Pending { reason } if reason.contains("gpu")), "{placement:?}");
}

#[test]
fn a_stale_write_after_the_leaders_is_rewritten() {
    let mut sim = Sim::new();
    sim.run(&Op::Submit(1));
    sim.run(&Op::Claim(0));
    sim.lead(0b111);
    sim.run(&Op::Claim(1));
    sim.lead(0b111);
    let before = sim.view.assignments[&Sim::task(1)].clone();
    assert_eq!(before.assignment.epoch, 2, "the new leader restamps what it inherits");
    sim.run(&Op::Stale(0, 1));
    assert_eq!(sim.view.assignments[&Sim::task(1)], before, "a stale write is not accepted");
    assert!(!sim.view.is_settled(TopicKind::Assignments, "task/t1"));
    sim.lead(0b111);
    assert!(sim.view.is_settled(TopicKind::Assignments, "task/t1"));
    assert_eq!(sim.view.assignments[&Sim::task(1)].assignment.generation, before.assignment.generation);
}

#[test]
fn a_service_that_failed_on_its_node_moves_after_a_back_off_unless_the_failure_is_permanent() {
    let mut sim = Sim::new();
    sim.run(&Op::Submit(1));
    sim.run(&Op::Claim(0));
    sim.lead(0b111);
    let task = Sim::task(1);
    let assigned = |sim: &Sim| sim.view.assignments[&task].assignment.clone();
    let report = |sim: &mut Sim, permanent: bool| {
        let current = assigned(sim);
        let Placement::Assigned { node } = &current.placement else { panic!("{current:?}") };
        let index = sim.nodes.iter().position(|(id, _)| id == node).unwrap();
        let status = shiva_proto::records::TaskStatus {
            task: task.clone(),
            generation: current.generation,
            state: shiva_proto::records::RunState::Failed,
            run_id: None,
            pid: None,
            attempt: 6,
            restarts: 5,
            last_exit: None,
            message: Some("restarted 5 times within 2m".into()),
            permanent,
            after: Vec::new(),
        };
        let value = sim.env(index, Body::Status(status));
        sim.append(TopicKind::Status, key::task(&task), Some(value));
        node.clone()
    };
    let first = report(&mut sim, false);
    sim.now_ms = 10_000;
    sim.lead(0b111);
    let pending = assigned(&sim);
    assert_eq!(pending.failed_on, vec![first.clone()]);
    assert_eq!(pending.retry_at_ms, Some(12_000), "2 s before the first move");
    assert!(
        matches!(&pending.placement, Placement::Pending { reason } if reason.contains(&format!("failed on {first}"))),
        "{pending:?}"
    );
    sim.now_ms = 11_000;
    let before = sim.log.len();
    sim.lead(0b111);
    assert_eq!(sim.log.len(), before, "waits out the back-off");
    sim.now_ms = 12_000;
    sim.lead(0b111);
    let moved = assigned(&sim);
    let Placement::Assigned { node: second } = &moved.placement else { panic!("{moved:?}") };
    assert_ne!(*second, first, "placed on another node");
    assert_eq!((moved.failed_on.len(), moved.retry_at_ms), (1, None));

    // A second failure doubles the delay; a permanent one leaves the task where it failed.
    report(&mut sim, false);
    sim.now_ms = 20_000;
    sim.lead(0b111);
    assert_eq!(assigned(&sim).retry_at_ms, Some(24_000));
    sim.now_ms = 24_000;
    sim.lead(0b111);
    let third = assigned(&sim);
    report(&mut sim, true);
    sim.now_ms = 30_000;
    let before = sim.log.len();
    sim.lead(0b111);
    assert_eq!(sim.log.len(), before, "a permanent failure is not moved");
    assert_eq!(assigned(&sim), third);
}

#[test]
fn an_exclusive_task_waits_for_its_silent_node_to_fence_and_a_keep_task_does_not() {
    for keep in [false, true] {
        let mut sim = Sim::new();
        let mut spec = TaskSpec::new(Sim::task(1), "sleep", vec!["1".into()]);
        if keep {
            spec.on_disconnect = shiva_proto::spec::OnDisconnect::Keep;
        }
        let value =
            Envelope { sender: "ctl".into(), incarnation: None, sent_at_ms: 0, body: Body::Task(spec) };
        sim.append(TopicKind::Commands, key::task(&Sim::task(1)), Some(value.encode()));
        sim.run(&Op::Claim(2));
        // n0 and the leader n2 are live: the task lands on n0 (ties go by id).
        sim.lead(0b001);
        let node = |sim: &Sim| match &sim.view.assignments[&Sim::task(1)].assignment.placement {
            Placement::Assigned { node } => node.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(node(&sim), "n0");
        // n0 falls silent but may still run its task (not fenced yet).
        sim.lead(0b1000);
        if keep {
            assert_eq!(node(&sim), "n2", "a keep task moves at once");
        } else {
            assert_eq!(node(&sim), "n0", "held until n0 must have fenced itself");
            assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
            // Fenced by now: it moves.
            sim.lead(0b000);
            assert_eq!(node(&sim), "n2");
        }
    }
}

// Hand-off (issue 14): one copy at a time through every planned move.

fn spec_of(t: u8, tags: &[&str], grace_s: u64, keep: bool) -> TaskSpec {
    let mut spec = TaskSpec::new(Sim::task(t), "sleep", vec!["1".into()]);
    spec.tags = tags.iter().map(|tag| tag.to_string()).collect();
    spec.stop_grace = std::time::Duration::from_secs(grace_s);
    if keep {
        spec.on_disconnect = shiva_proto::spec::OnDisconnect::Keep;
    }
    spec
}

impl Sim {
    fn submit(&mut self, spec: TaskSpec) {
        let task = spec.id.clone();
        let value =
            Envelope { sender: "ctl".into(), incarnation: None, sent_at_ms: 0, body: Body::Task(spec) };
        self.append(TopicKind::Commands, key::task(&task), Some(value.encode()));
    }

    fn desired(&mut self, t: u8, state: DesiredState) {
        let body = Body::Desired(shiva_proto::records::Desired { task: Self::task(t), state });
        let value = Envelope { sender: "ctl".into(), incarnation: None, sent_at_ms: 0, body };
        self.append(TopicKind::Commands, key::desired(&Self::task(t)), Some(value.encode()));
    }

    fn placement(&self, t: u8) -> Placement {
        self.view.assignments[&Self::task(t)].assignment.placement.clone()
    }

    /// The nodes holding a copy of task `t`.
    fn holders_of(&self, t: u8) -> Vec<usize> {
        self.copies.keys().filter(|(_, task)| *task == Self::task(t)).map(|(node, _)| *node).collect()
    }

    /// Leader and runners, `rounds` times, all live (the leader is n2).
    fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.lead(0b111);
            self.runners(0b111);
            assert!(self.doubled.is_empty(), "{:?}", self.doubled);
        }
    }
}

/// A cluster led by n2 with task t1 (tags `a`, exclusive) running on n0.
fn running_on_n0(grace_s: u64, keep: bool) -> Sim {
    let mut sim = Sim::new();
    sim.run(&Op::Claim(2));
    sim.submit(spec_of(1, &["a"], grace_s, keep));
    // Only n0 carries `a` alone; n2 carries both but the placement spreads by load: pin it by
    // letting n2 run another task first.
    sim.submit(spec_of(0, &["b"], 1, false));
    sim.lead(0b011);
    sim.runners(0b011);
    assert_eq!(sim.holders_of(1), vec![0]);
    sim
}

fn after_of(sim: &Sim, t: u8) -> Vec<String> {
    sim.view.assignments[&Sim::task(t)].assignment.after.iter().map(ToString::to_string).collect()
}

fn holders_in_record(sim: &Sim, t: u8) -> Vec<String> {
    let assignment = &sim.view.assignments[&Sim::task(t)].assignment;
    assignment.holders.iter().map(|holder| holder.node.to_string()).collect()
}

#[test]
fn a_retag_hands_off_only_once_the_old_copy_is_gone() {
    for one_hop in [true, false] {
        let mut sim = running_on_n0(8, false);
        sim.start_after = one_hop;
        sim.submit(spec_of(1, &["b"], 8, false));
        sim.lead(0b111);
        if one_hop {
            // Assigned at once, told to wait for n0's word.
            assert!(matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() != "n0"));
            assert_eq!(after_of(&sim, 1), vec!["n0"]);
        } else {
            assert!(
                matches!(sim.placement(1), Placement::Pending { reason } if reason.contains("waiting for n0")),
                "{:?}",
                sim.placement(1)
            );
        }
        // n0 is asked to stop (a stop takes a step); nobody starts it meanwhile.
        sim.runners(0b111);
        sim.lead(0b111);
        assert_eq!(sim.holders_of(1), vec![0], "one_hop={one_hop}: still stopping on n0");
        // n0's copy goes: with one hop its word alone starts the new copy, no leader step between.
        sim.runners(0b111);
        assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
        if one_hop {
            assert_eq!(sim.holders_of(1), vec![2], "started on n2 right after n0's word");
            // n2's status overwrote n0's word; it carries it on, so the leader lets n0 go.
            let status = &sim.view.statuses[&Sim::task(1)];
            assert_eq!(status.node.as_str(), "n2");
            sim.lead(0b111);
            assert_eq!(after_of(&sim, 1), Vec::<String>::new());
            assert_eq!(holders_in_record(&sim, 1), Vec::<String>::new());
        } else {
            assert_eq!(sim.holders_of(1), Vec::<usize>::new(), "two hops: the leader places it next");
        }
        sim.settle(3);
        assert!(matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() != "n0"));
        assert_eq!(sim.holders_of(1).len(), 1);
        assert!(sim.holders_of(1) != vec![0]);
        assert_eq!(after_of(&sim, 1), Vec::<String>::new());
    }
}

#[test]
fn kill_then_start_and_delete_then_submit_wait_for_the_old_copy() {
    for (delete, one_hop) in [(false, true), (true, true), (false, false), (true, false)] {
        let mut sim = running_on_n0(8, false);
        sim.start_after = one_hop;
        if delete {
            sim.append(TopicKind::Commands, key::task(&Sim::task(1)), None);
        } else {
            sim.desired(1, DesiredState::Stopped);
        }
        sim.lead(0b111);
        assert_eq!(sim.placement(1), Placement::Stopped, "the assignment stays, naming n0's copy");
        // Started again (on n1 only: n0 is taken out) before n0 stopped its copy.
        if delete {
            sim.submit(spec_of(1, &["b"], 8, false));
        } else {
            sim.desired(1, DesiredState::Running);
            sim.submit(spec_of(1, &["b"], 8, false));
        }
        sim.lead(0b111);
        if one_hop {
            assert_eq!(after_of(&sim, 1), vec!["n0"], "delete={delete}: {:?}", sim.placement(1));
        } else {
            assert!(
                matches!(sim.placement(1), Placement::Pending { .. }),
                "delete={delete}: {:?}",
                sim.placement(1)
            );
        }
        sim.settle(4);
        assert!(matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() != "n0"));
        assert_eq!(after_of(&sim, 1), Vec::<String>::new());
    }
}

#[test]
fn a_node_without_start_after_is_never_told_to_wait() {
    // A node whose build does not list `start_after` would start at once: it is assigned only
    // once the old copy is gone.
    let mut sim = running_on_n0(8, false);
    sim.start_after = false;
    sim.submit(spec_of(1, &["b"], 8, false));
    for _ in 0..6 {
        sim.lead(0b111);
        assert_eq!(after_of(&sim, 1), Vec::<String>::new());
        sim.runners(0b111);
        assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
    }
    assert!(matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() != "n0"));
}

#[test]
fn the_revision_a_silent_node_runs_governs_its_hold() {
    // 10 min of stop grace on n0; n0 falls silent; a revision shortening it to 1 s (and
    // retagging) comes: after 6 s of silence the newest spec would let it move.
    let mut sim = running_on_n0(600, false);
    sim.silent_for = Some(std::time::Duration::from_secs(6));
    sim.submit(spec_of(1, &["b"], 1, false));
    sim.lead(0b110);
    sim.runners(0b110);
    sim.lead(0b110);
    assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
    assert!(
        !matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() != "n0"),
        "moved while n0 may still run its 10 min copy: {:?}",
        sim.placement(1)
    );
    // Past 3 s + 10 min + 1 s it may move.
    sim.silent_for = Some(std::time::Duration::from_secs(700));
    sim.copies.retain(|(node, _), _| *node != 0);
    sim.lead(0b110);
    assert!(matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() != "n0"));
}

#[test]
fn an_exclusive_revision_waits_for_a_silent_keep_copy() {
    let mut sim = running_on_n0(1, true);
    sim.silent_for = Some(std::time::Duration::from_secs(3600));
    sim.submit(spec_of(1, &[], 1, false));
    for _ in 0..3 {
        sim.lead(0b110);
        sim.runners(0b110);
    }
    assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
    assert!(
        matches!(sim.placement(1), Placement::Assigned { node } if node.as_str() == "n0"),
        "held where its lease-less copy may run: {:?}",
        sim.placement(1)
    );
    // n0 comes back, stops its copy, says so: the task moves on.
    sim.silent_for = None;
    sim.settle(4);
    assert_eq!(sim.holders_of(1).len(), 1);
}

#[test]
fn a_stray_tombstone_changes_nothing_and_the_leader_rewrites_its_record() {
    let mut sim = running_on_n0(8, false);
    let before = sim.view.assignments[&Sim::task(1)].assignment.clone();
    sim.append(TopicKind::Assignments, key::task(&Sim::task(1)), None);
    assert_eq!(sim.view.assignments[&Sim::task(1)].assignment, before, "a tombstone alone deletes nothing");
    assert!(!sim.view.is_settled(TopicKind::Assignments, "task/t1"));
    sim.append(TopicKind::Status, key::task(&Sim::task(1)), None);
    assert!(sim.view.statuses.contains_key(&Sim::task(1)));
    // A `deleted` marker from anyone but the leader of the newest epoch changes nothing either.
    let forged = sim.env(0, Body::Deleted(shiva_proto::records::Deleted { epoch: 1 }));
    sim.append(TopicKind::Assignments, key::task(&Sim::task(1)), Some(forged));
    assert_eq!(sim.view.assignments[&Sim::task(1)].assignment, before);
    sim.settle(2);
    assert_eq!(sim.holders_of(1), vec![0], "the copy runs on, untouched");
    assert!(sim.view.is_settled(TopicKind::Assignments, "task/t1"));
}

/// Resignations of earlier epochs are trimmed by the next leader (issue 15, a bounded log): a
/// tombstone the view honours for an epoch before the newest, never for the newest.
#[test]
fn the_next_leader_tombstones_earlier_resignations_and_the_newest_stays() {
    let mut sim = running_on_n0(2, false);
    let (epoch, leader) = sim.leader_index().unwrap();
    let resign = sim.env(leader, Body::Resign(shiva_proto::records::Resign { epoch }));
    sim.append(TopicKind::Assignments, key::resign(epoch), Some(resign));
    assert!(sim.view.epochs.resigned.contains(&epoch));
    // A tombstone of the newest epoch's resignation changes nothing.
    sim.append(TopicKind::Assignments, key::resign(epoch), None);
    assert!(sim.view.epochs.resigned.contains(&epoch), "the newest resignation stays");
    sim.run(&Op::Claim(1));
    let resign_writes = |sim: &Sim| {
        sim.log.iter().filter(|(_, _, key, value)| key == &key::resign(epoch) && value.is_none()).count()
    };
    let before = resign_writes(&sim);
    sim.settle(2);
    assert_eq!(resign_writes(&sim), before + 1, "the new leader tombstones it, once");
    assert!(!sim.view.epochs.resigned.contains(&epoch));
    assert_eq!(replay(&sim.log).epochs.leader(), sim.view.epochs.leader());
}

/// Departures of incarnations their node came back from are trimmed by the leader; the
/// departure of a node's newest incarnation stays (it is what says the node left).
#[test]
fn the_leader_tombstones_departures_of_incarnations_that_came_back() {
    use shiva_proto::records::{Heartbeat, Leave, Resources};
    let mut sim = running_on_n0(2, false);
    let (node, current) = sim.nodes[0].clone();
    let earlier = Uuid::new_v4();
    let left = Envelope {
        sender: node.to_string(),
        incarnation: Some(earlier),
        sent_at_ms: 0,
        body: Body::Leave(Leave { reason: "shutdown".into() }),
    };
    sim.append(TopicKind::Control, key::leave(&node, earlier), Some(left.encode()));
    let heartbeat = |incarnation| Envelope {
        sender: node.to_string(),
        incarnation: Some(incarnation),
        sent_at_ms: 0,
        body: Body::Heartbeat(Heartbeat {
            protocol: 1,
            version: None,
            seq: 1,
            hostname: "h".into(),
            tags: vec![],
            leader_capable: true,
            runner: true,
            interval_ms: 100,
            fence_timeout_ms: None,
            returns: 0,
            authorized_keys: None,
            recipient: None,
            features: vec![],
            resources: Resources::default(),
            runs: vec![],
            clock_ms: Default::default(),
            replaces: None,
        }),
    };
    sim.append(TopicKind::Control, key::node(&node), Some(heartbeat(earlier).encode()));
    // The departure of the newest incarnation stays, whoever tombstones it.
    sim.append(TopicKind::Control, key::leave(&node, earlier), None);
    assert!(sim.view.left.contains(&(node.clone(), earlier)));
    sim.settle(1);
    assert!(sim.view.left.contains(&(node.clone(), earlier)), "not trimmed while it is the newest");
    // The node came back as another incarnation: the leader trims the old departure, once.
    sim.append(TopicKind::Control, key::node(&node), Some(heartbeat(current).encode()));
    let tombstones = |sim: &Sim| {
        sim.log
            .iter()
            .filter(|(_, _, key, value)| *key == key::leave(&node, earlier) && value.is_none())
            .count()
    };
    let before = tombstones(&sim);
    sim.settle(2);
    assert_eq!(tombstones(&sim), before + 1);
    assert!(!sim.view.left.contains(&(node.clone(), earlier)));
}

/// Claims are trimmed (issue 15, a bounded log): those that lost at once; winning ones only
/// while every live node reads a log whose first claim is a later epoch (an older build would
/// refuse it as a jump, see no leader and claim epoch 1 itself), lowest first, one at a time.
/// Whatever prefix of the tombstones a cleaner applied (it stops at a cut offset), the log
/// replays to the same leader and records: trimmed at once, in key order (`claim/10/…` before
/// `claim/9/…`), a cut between two tombstones left a gap in the epochs, and a reader that
/// refused the next winner as a jump.
#[test]
fn claims_are_trimmed_so_that_every_cut_of_the_cleaner_replays_the_same() {
    let mut sim = running_on_n0(2, false);
    sim.start_after = false;
    for round in 0..12u8 {
        let n = round % 3;
        sim.run(&Op::Claim(n));
        // Another node claims the same epoch, just after: it loses.
        let epoch = sim.view.epochs.newest;
        let other = usize::from((n + 1) % 3);
        let value = sim.env(other, Body::Claim(Claim { epoch }));
        sim.append(
            TopicKind::Assignments,
            key::claim(epoch, &sim.nodes[other].0, Uuid::new_v4()),
            Some(value),
        );
        sim.settle(3);
    }
    let winners: Vec<i64> = sim.view.epochs.winners.values().map(|winner| winner.offset).collect();
    let claims: Vec<i64> =
        sim.view.epochs.claims.values().copied().collect::<BTreeSet<_>>().into_iter().collect();
    assert_eq!(winners.len(), 13);
    assert_eq!(claims, winners, "every claim that lost is trimmed, every winner kept");
    // Every live node now reads a trimmed log: the winners of epochs no record needs go, one
    // per step, lowest first.
    sim.start_after = true;
    sim.settle(1);
    assert_eq!(sim.view.epochs.claims.len(), 12, "one winner at a time");
    sim.settle(16);
    let newest = sim.view.epochs.newest;
    assert_eq!(
        sim.view.epochs.claims.values().copied().collect::<Vec<_>>(),
        vec![sim.view.epochs.winners[&newest].offset]
    );
    let replayed = replay(&sim.compacted());
    assert_eq!(replayed.epochs.floor, newest);
    assert_eq!(replayed.leader(), sim.view.leader());
    assert_eq!(replayed.members, sim.view.members);
    let end = sim.offsets[&TopicKind::Assignments];
    for cut in 0..=end {
        for tombstones in [0.0, 1.0] {
            let partial = replay(&sim.compacted_up_to(cut as f64 / end as f64, tombstones));
            assert_eq!(partial.leader(), sim.view.leader(), "cut at {cut} of {end}");
            assert_eq!(partial.members, sim.view.members, "cut at {cut} of {end}");
        }
    }
}

/// Issue 15, a bounded log: the status of a task deleted while its runner was down goes once
/// that runner may no longer run the task, and again when the runner, back, writes its late
/// word about it; the compacted log keeps nothing of the task. (Pins the rule "statuses outlive
/// nothing", from the hand-off work, against the issue's case.)
#[test]
fn the_status_of_a_task_deleted_while_its_runner_was_down_does_not_outlive_it() {
    use shiva_proto::records::{RunState, TaskStatus};
    let mut sim = running_on_n0(2, false);
    let task = Sim::task(1);
    assert!(sim.view.statuses.contains_key(&task));
    // n0 goes silent; the task is deleted meanwhile.
    sim.append(TopicKind::Commands, key::task(&task), None);
    sim.silent_for = Some(std::time::Duration::from_secs(1));
    sim.lead(0b110);
    assert!(sim.view.assignments.contains_key(&task), "held while n0 may still run it");
    // n0 has been silent past its fence and the task's stop grace.
    sim.silent_for = Some(std::time::Duration::from_secs(60));
    sim.lead(0b110);
    sim.lead(0b110);
    assert!(!sim.view.assignments.contains_key(&task));
    assert!(!sim.view.statuses.contains_key(&task), "its status goes with it");
    // n0 comes back and reports its copy stopped: a status of a task that no longer exists.
    let status = TaskStatus {
        task: task.clone(),
        generation: 1,
        state: RunState::Stopped,
        run_id: None,
        pid: None,
        attempt: 1,
        restarts: 0,
        last_exit: None,
        message: None,
        permanent: false,
        after: Vec::new(),
    };
    let value = sim.env(0, Body::Status(status));
    sim.append(TopicKind::Status, key::task(&task), Some(value));
    assert!(sim.view.statuses.contains_key(&task));
    sim.silent_for = None;
    sim.lead(0b111);
    assert!(!sim.view.statuses.contains_key(&task), "the late word goes too");
    let compacted = sim.compacted();
    let left: Vec<&String> = compacted
        .iter()
        .filter(|(_, _, key, value)| value.is_some() && key.ends_with("/t1"))
        .map(|(_, _, key, _)| key)
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A `deleted` marker whose tombstone was never read back (its write failed after the marker's
/// landed) gets its tombstone from the leader, so the key does not stay in the log for good
/// (once its epoch's claim is trimmed, every new reader would refuse the marker).
#[test]
fn a_deletion_marker_left_without_its_tombstone_gets_one() {
    let mut sim = running_on_n0(2, false);
    let (epoch, leader) = sim.leader_index().unwrap();
    let key = key::task(&Sim::task(9));
    let marker = sim.env(leader, Body::Deleted(shiva_proto::records::Deleted { epoch }));
    sim.append(TopicKind::Status, key.clone(), Some(marker));
    assert!(sim.view.deleted_markers[&TopicKind::Status].contains(&key));
    sim.settle(1);
    let last =
        sim.log.iter().rev().find(|(topic, _, k, _)| *topic == TopicKind::Status && *k == key).unwrap();
    assert!(last.3.is_none(), "the leader tombstones it");
    assert!(sim.view.deleted_markers.values().all(BTreeSet::is_empty));
    sim.settle(1);
    let tombstones = sim.log.iter().filter(|(_, _, k, value)| *k == key && value.is_none()).count();
    assert_eq!(tombstones, 1, "once");
}

// Instances (issue 19, point 5).

impl Sim {
    /// Where each instance of task `t` is placed, by instance.
    fn instances(&self, t: u8) -> BTreeMap<String, Placement> {
        let base = Self::task(t);
        self.view
            .assigned_instances(&base)
            .map(|id| {
                (id.instance().unwrap().to_owned(), self.view.assignments[id].assignment.placement.clone())
            })
            .collect()
    }
}

fn on(node: &str) -> Placement {
    Placement::Assigned { node: NodeId::new(node).unwrap() }
}

#[test]
fn counted_instances_spread_over_distinct_nodes_and_the_extra_ones_wait() {
    let mut sim = Sim::new();
    sim.run(&Op::Claim(2));
    let mut spec = spec_of(1, &[], 1, false);
    spec.count = Some(4);
    sim.submit(spec.clone());
    sim.settle(3);
    let placed = sim.instances(1);
    assert_eq!(placed.keys().collect::<Vec<_>>(), ["0", "1", "2", "3"]);
    let nodes: std::collections::BTreeSet<_> = placed
        .values()
        .filter_map(|p| if let Placement::Assigned { node } = p { Some(node) } else { None })
        .collect();
    assert_eq!(nodes.len(), 3, "{placed:?}");
    let pending = placed.values().find(|p| matches!(p, Placement::Pending { .. })).expect("one waits");
    assert!(format!("{pending:?}").contains("distinct nodes"), "{pending:?}");
    // Each runner runs one copy of one instance, under the instance's id.
    assert_eq!(sim.copies.len(), 3);
    assert!(sim.copies.keys().all(|(_, task)| task.base() == Sim::task(1)));
    assert!(!sim.view.assignments.contains_key(&Sim::task(1)), "the task itself is not placed");

    // Down to two: the others stop, then their records go; the two left neither move nor
    // restart (their spec did not change: same revision, same generation).
    let before = sim.instances(1);
    let generations = |sim: &Sim| -> Vec<(u64, i64)> {
        ["0", "1"]
            .iter()
            .map(|n| {
                let entry = &sim.view.assignments[&Sim::task(1).with_instance(n).unwrap()].assignment;
                (entry.generation, entry.spec_revision)
            })
            .collect()
    };
    let kept = generations(&sim);
    spec.count = Some(2);
    sim.submit(spec.clone());
    sim.settle(4);
    let after = sim.instances(1);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["0", "1"]);
    assert_eq!(after["0"], before["0"]);
    assert_eq!(after["1"], before["1"]);
    assert_eq!(generations(&sim), kept);
    assert_eq!(sim.copies.len(), 2);
    assert!(!sim.view.statuses.keys().any(|task| task.instance() == Some("2")), "its status went too");

    // A node goes: its instance moves to the one node without a sibling, never beside one.
    let Placement::Assigned { node } = &after["0"] else { panic!("{after:?}") };
    let gone = sim.nodes.iter().position(|(id, _)| id == node).unwrap();
    if gone != 2 {
        let live = 0b111 & !(1 << gone);
        for _ in 0..4 {
            sim.lead(live);
            sim.runners(live);
        }
        assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
        let moved = sim.instances(1);
        assert_ne!(moved["0"], after["0"]);
        assert_ne!(moved["0"], moved["1"]);
    }

    // Stopping the task stops every instance.
    sim.desired(1, DesiredState::Stopped);
    sim.settle(3);
    assert!(sim.instances(1).values().all(|p| *p == Placement::Stopped), "{:?}", sim.instances(1));
    assert!(sim.copies.is_empty());
}

#[test]
fn an_every_node_task_follows_the_eligible_nodes_and_older_builds_wait() {
    let mut sim = Sim::new();
    sim.run(&Op::Claim(2));
    let mut spec = spec_of(1, &["a"], 1, false);
    spec.every_node = true;
    sim.submit(spec);
    sim.settle(3);
    // n0 and n2 carry `a`; n1 does not.
    assert_eq!(sim.instances(1), BTreeMap::from([("n0".to_owned(), on("n0")), ("n2".to_owned(), on("n2"))]));
    let mut held: Vec<_> = sim.copies.keys().map(|(node, task)| (*node, task.to_string())).collect();
    held.sort();
    assert_eq!(held, [(0, "t1@n0".to_owned()), (2, "t1@n2".to_owned())]);

    // n0 leaves: its instance stops there and is not run anywhere else.
    for _ in 0..4 {
        sim.lead(0b110);
        sim.runners(0b110);
    }
    assert!(sim.doubled.is_empty(), "{:?}", sim.doubled);
    assert_eq!(sim.instances(1), BTreeMap::from([("n2".to_owned(), on("n2"))]));
    // It comes back: it gets one again.
    sim.settle(3);
    assert_eq!(sim.instances(1).len(), 2);

    // A node whose build has no instances gets none: pending, saying why.
    sim.start_after = false;
    sim.submit({
        let mut spec = spec_of(3, &[], 1, false);
        spec.count = Some(1);
        spec
    });
    sim.settle(2);
    let reason = format!("{:?}", sim.instances(3)["0"]);
    assert!(reason.contains("older builds"), "{reason}");
}

/// `batch_trims`: the run deletions of a topic become one `trim` record where the first of them
/// was, before their tombstones; a key the step also writes otherwise keeps its own `deleted`
/// record in place; fewer than three deletions of a topic, and every other write, are kept.
#[test]
fn run_deletions_of_a_step_become_one_trim_record_where_the_first_was() {
    let task = TaskId::new("cron/t").unwrap();
    let run = |n: u128| key::run(&task, Uuid::from_u128(n));
    let delete = |topic, n| Write::delete(topic, run(n), 3).to_vec();
    let restamp = Write::assignments(run(1), Some(Body::Claim(Claim { epoch: 3 })));
    let mut writes = vec![Write::assignments(key::sched(&task), None), restamp.clone()];
    for n in 1..=4 {
        writes.extend(delete(TopicKind::Assignments, n));
    }
    writes.extend(delete(TopicKind::Status, 7));
    writes.extend(delete(TopicKind::Status, 8));
    let batched = batch_trims(writes.clone(), 3);
    let tombstone = |topic, n| Write { topic, key: run(n), body: None };
    let trim = match &batched[4].body {
        Some(Body::Trim(trim)) => trim.clone(),
        other => panic!("not a trim record at 4: {other:?}"),
    };
    assert_eq!(trim.keys, vec![run(2), run(3), run(4)]);
    assert_eq!(trim.epoch, 3);
    assert!(batched[4].key.starts_with("trim/3/"));
    // The `sched/` tombstone, the restamp of run 1 and its own deletion, in place.
    let mut expected = writes[..4].to_vec();
    expected.push(batched[4].clone());
    expected.extend([tombstone(TopicKind::Assignments, 2), tombstone(TopicKind::Assignments, 3)]);
    expected.push(tombstone(TopicKind::Assignments, 4));
    expected.extend(writes[writes.len() - 4..].iter().cloned());
    assert_eq!(batched, expected);
    // The same step planned again: the same record, under the same key.
    assert_eq!(batch_trims(writes, 3), batched);
}
