//! The leader's reconciliation, pure: from the log view and the live members, the records the
//! leader of `epoch` must write to `assignments` so that they say what it decided.
//!
//! A key is (re)written when its decision changed (new generation), when its accepted record
//! is from an older epoch (a new leader restamps everything it inherits), or when any other
//! record landed on it after the accepted one (a stale or forged write): compaction keeps the
//! last record of a key, so the last record must always be the leader's.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use shiva_proto::TaskSpec;
use shiva_proto::records::{
    Assignment, Body, Deleted, DesiredState, Holder, Member, Members, Placement, RunState, feature,
};
use shiva_proto::spec::{Instances, OnDisconnect, TaskKind};
use shiva_proto::topics::key;
use shiva_proto::{LogView, NodeId, TaskId, TopicKind};
use uuid::Uuid;

use crate::fault::contain;
use crate::placement::{Availability, Candidate, Demand, Takers, plan};

pub mod handoff;

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

    /// Deletes a leader-owned key: a `deleted` record of the leader's epoch (what deletes its
    /// entry), then a tombstone (so compaction drops the key).
    pub fn delete(topic: TopicKind, key: String, epoch: u64) -> [Write; 2] {
        let marker = Write { topic, key: key.clone(), body: Some(Body::Deleted(Deleted { epoch })) };
        [marker, Write { topic, key, body: None }]
    }

    /// Whether this is a `deleted` record of a run key (what [`batch_trims`] gathers).
    fn deletes_run(&self) -> bool {
        matches!(self.body, Some(Body::Deleted(_))) && key::run_key(&self.key).is_some()
    }
}

/// The fewest run deletions of one topic in a step that [`batch_trims`] turns into a `trim`
/// record: below three, a `deleted` record each costs no more than a `trim` record and its own
/// tombstone.
pub const MIN_TRIM_BATCH: usize = 3;

/// Batched trimming (issue 21, while every live node has [`feature::BATCHED_TRIM`]): the
/// `deleted` records of `run/` keys among a step's writes become one `trim` record per topic
/// (per [`shiva_proto::records::MAX_TRIM_KEYS`] keys), written before the tombstones that
/// follow them, when a topic has at least [`MIN_TRIM_BATCH`]. Every other write is kept, in
/// order. The `trim` key's id is derived from the epoch and the keys it lists.
pub fn batch_trims(writes: Vec<Write>, epoch: u64) -> Vec<Write> {
    // Every plan passes here, most with no deletion at all: each write is looked at once.
    let deletes: Vec<bool> = writes.iter().map(Write::deletes_run).collect();
    if deletes.iter().filter(|deletes| **deletes).count() < MIN_TRIM_BATCH {
        return writes;
    }
    // A key the step also writes otherwise (an intent restamped, then trimmed) keeps its own
    // `deleted` record, in its place: a `trim` record ahead of that write would delete the
    // entry the write then brings back, and the tombstone would be refused.
    let batchable: Vec<bool> = {
        let other: BTreeSet<(TopicKind, &str)> = writes
            .iter()
            .zip(&deletes)
            .filter(|(write, deletes)| write.body.is_some() && !**deletes)
            .map(|(write, _)| (write.topic, write.key.as_str()))
            .collect();
        let mut batchable = Vec::with_capacity(writes.len());
        for (write, deletes) in writes.iter().zip(&deletes) {
            batchable.push(*deletes && !other.contains(&(write.topic, write.key.as_str())));
        }
        batchable
    };
    let mut batches: BTreeMap<TopicKind, Vec<String>> = BTreeMap::new();
    // A key listed twice would have the record refused (none is deleted twice today).
    let mut listed = BTreeSet::new();
    for (write, _) in writes.iter().zip(&batchable).filter(|(_, batchable)| **batchable) {
        if listed.insert((write.topic, write.key.as_str())) {
            batches.entry(write.topic).or_default().push(write.key.clone());
        }
    }
    batches.retain(|_, keys| keys.len() >= MIN_TRIM_BATCH);
    if batches.is_empty() {
        return writes;
    }
    // Each topic's `trim` records go where its first batched `deleted` record was: before every
    // tombstone they are written for.
    let mut records: BTreeMap<TopicKind, Vec<Write>> = BTreeMap::new();
    for (topic, keys) in &batches {
        for chunk in keys.chunks(shiva_proto::records::MAX_TRIM_KEYS) {
            let name = format!("{epoch}\n{}", chunk.join("\n"));
            let id = Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes());
            let body = Body::Trim(shiva_proto::records::Trim { epoch, keys: chunk.to_vec() });
            let record = Write { topic: *topic, key: key::trim(epoch, id), body: Some(body) };
            records.entry(*topic).or_default().push(record);
        }
    }
    let mut batched = Vec::with_capacity(writes.len());
    for (write, batchable) in writes.into_iter().zip(batchable) {
        match batchable && batches.contains_key(&write.topic) {
            true => batched.extend(records.remove(&write.topic).unwrap_or_default()),
            false => batched.push(write),
        }
    }
    batched
}

/// The live members, indexed by id. Their ids are unique (membership lists one incarnation per
/// id, the others are `conflicts`); were one not, its first member would stand for it.
/// Reconciliation asks after a node for every task and every copy: a walk of a thousand
/// members for each of ten thousand tasks was most of a leader's step (issue 21, point 3).
pub struct Live<'a> {
    by_id: HashMap<&'a NodeId, &'a Member>,
}

impl<'a> Live<'a> {
    /// Indexes `members`.
    pub fn new(members: &'a [Member]) -> Live<'a> {
        let mut by_id = HashMap::with_capacity(members.len());
        for member in members {
            by_id.entry(&member.id).or_insert(member);
        }
        Live { by_id }
    }

    /// The live member `node`, if it is one.
    pub fn get(&self, node: &NodeId) -> Option<&'a Member> {
        self.by_id.get(node).copied()
    }

    /// Whether `node` is live.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.by_id.contains_key(node)
    }
}

/// What reconciliation needs besides the view.
pub struct Inputs<'a> {
    /// Live members.
    pub live: &'a [Member],
    /// Other live incarnations of their ids (see [`Members::conflicts`]).
    pub conflicts: &'a [Member],
    /// The leader's epoch.
    pub epoch: u64,
    /// The leader's clock, ms since the Unix epoch.
    pub now_ms: i64,
    /// Keys with a write still in flight: left alone until it is read back.
    pub busy: &'a dyn Fn(TopicKind, &str) -> bool,
    /// Whether a node that is not live may still run an exclusive task with this stop grace (it
    /// has not fenced itself yet): such a task stays where it is until that has passed.
    pub may_still_run: &'a dyn Fn(&NodeId, Duration) -> bool,
    /// The same for one incarnation of a node id: a task passes from one incarnation of an id to
    /// another (a second machine with the id) only once the first may no longer run it.
    pub incarnation_may_still_run: &'a dyn Fn(&NodeId, Uuid, Duration) -> bool,
    /// Tasks this leader found it cannot handle, by spec revision, with the reason (a record
    /// about them could not be written): they are failed, not planned again.
    pub failed: &'a BTreeMap<TaskId, (i64, String)>,
}

/// Why `task` (at spec `revision`) is failed for good, if it is: its assignment in the log says
/// so for this revision, or this leader found a record about it unwritable.
pub fn failure(
    view: &LogView,
    failed: &BTreeMap<TaskId, (i64, String)>,
    task: &TaskId,
    revision: i64,
) -> Option<String> {
    // At a later revision than the one planned: an instance that kept its revision when its
    // task was scaled (the failure is noted at the task's).
    if let Some((at, reason)) = failed.get(task)
        && *at >= revision
    {
        return Some(reason.clone());
    }
    let assignment = &view.assignments.get(task)?.assignment;
    match &assignment.placement {
        Placement::Failed { reason } if assignment.spec_revision == revision => Some(reason.clone()),
        _ => None,
    }
}

/// Nodes a failing service remembers having failed on (the oldest are forgotten).
pub const MAX_FAILED_ON: usize = 64;

/// First delay between two moves of a task that failed on its node; doubles with each move.
pub const MOVE_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between two moves.
pub const MAX_MOVE_BACKOFF: Duration = Duration::from_secs(300);

/// Where a failing service stands: the nodes it failed on, and whether it waits before its
/// next move (with the pending reason).
struct Moves {
    failed_on: Vec<NodeId>,
    wait: Option<(i64, String)>,
}

fn move_delay(moves: usize) -> Duration {
    let doubled = MOVE_BACKOFF.saturating_mul(1 << moves.saturating_sub(1).min(16));
    doubled.min(MAX_MOVE_BACKOFF)
}

/// Reads a service's moves off its assignment and status: a `failed` status (not permanent)
/// from its node for its generation means the node gave up on it.
fn moves(view: &LogView, task: &TaskId, revision: i64, now_ms: i64) -> Moves {
    let Some(current) = view.assignments.get(task).map(|entry| &entry.assignment) else {
        return Moves { failed_on: Vec::new(), wait: None };
    };
    if current.spec_revision != revision {
        return Moves { failed_on: Vec::new(), wait: None };
    }
    let mut failed_on = current.failed_on.clone();
    if let Placement::Assigned { node } = &current.placement
        && let Some(status) = view.statuses.get(task)
        && status.node == *node
        && status.status.generation == current.generation
        && status.status.state == RunState::Failed
        && !status.status.permanent
    {
        failed_on.retain(|failed| failed != node);
        failed_on.push(node.clone());
        // Bounded, so the assignment that carries it stays within a record.
        let excess = failed_on.len().saturating_sub(MAX_FAILED_ON);
        failed_on.drain(..excess);
        let delay = move_delay(failed_on.len());
        let message = status.status.message.as_deref().unwrap_or("restarted too often");
        let reason = format!(
            "failed on {node} ({message}); placing it on another node in {}",
            humantime::format_duration(delay)
        );
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        return Moves { failed_on, wait: Some((now_ms.saturating_add(delay_ms), reason)) };
    }
    let wait = match (&current.placement, current.retry_at_ms) {
        (Placement::Pending { reason }, Some(at)) if now_ms < at => Some((at, reason.clone())),
        _ => None,
    };
    Moves { failed_on, wait }
}

/// Computes the leader's writes.
pub fn reconcile(view: &LogView, inputs: &Inputs<'_>) -> Vec<Write> {
    let Inputs { live, conflicts, epoch, now_ms, busy, may_still_run, incarnation_may_still_run, failed } =
        *inputs;
    let live_index = Live::new(live);
    let mut writes = Vec::new();
    let authorized_keys = view.auth.0.as_ref().map(|policy| policy.text().to_owned());
    let members = Members { epoch, nodes: live.to_vec(), conflicts: conflicts.to_vec(), authorized_keys };
    let members_current =
        view.members.as_ref() == Some(&members) && view.is_settled(TopicKind::Assignments, key::MEMBERS);
    if !members_current && !busy(TopicKind::Assignments, key::MEMBERS) {
        writes.push(Write::assignments(key::MEMBERS.to_owned(), Some(Body::Members(members))));
    }
    writes.extend(trim_claims(view, epoch, live, busy));
    // A `deleted` marker whose tombstone was not read back (its write failed) gets it again,
    // and so does a key a `trim` record deleted; a `trim` record whose tombstones were all read
    // back is spent: tombstoned.
    for (topic, keys) in &view.deleted_markers {
        for key in keys.iter().filter(|key| !busy(*topic, key)) {
            writes.push(Write { topic: *topic, key: key.clone(), body: None });
        }
    }
    // A `trim` record something landed on after it (a stray tombstone), with keys still
    // waiting for their tombstone: each is deleted again by a `deleted` record of this epoch,
    // on the key itself, so a compacted log without the `trim` record deletes it too.
    let mut repaired = BTreeSet::new();
    for (topic, pending) in view.unsettled_trims() {
        for key in pending.iter().filter(|key| !busy(topic, key)) {
            repaired.insert((topic, key.as_str()));
            writes.extend(Write::delete(topic, key.clone(), epoch));
        }
    }
    for (topic, key) in view.trimmed_keys().chain(view.spent_trims()) {
        if !busy(topic, key) && !repaired.contains(&(topic, key)) {
            writes.push(Write { topic, key: key.to_owned(), body: None });
        }
    }
    // A `trim/` key whose newest record is not a `trim` record the view holds (a deposed
    // leader's, refused; garbage) is tombstoned, so it does not stay in the log for good.
    for topic in [TopicKind::Assignments, TopicKind::Status] {
        for key in view.unsettled(topic, "trim/").filter(|key| !view.holds_trim(topic, key)) {
            if !busy(topic, key) {
                writes.push(Write { topic, key: key.to_owned(), body: None });
            }
        }
    }
    writes.extend(retire_nodes(view, &live_index, now_ms, busy));
    // Departures of incarnations their id's newest heartbeat no longer names (the node came
    // back, or was retired) are settled too: one per graceful stop otherwise.
    for (node, incarnation) in &view.left {
        let superseded = view.heartbeats.get(node).is_none_or(|entry| entry.incarnation != *incarnation);
        let key = key::leave(node, *incarnation);
        if superseded && !busy(TopicKind::Control, &key) {
            writes.push(Write { topic: TopicKind::Control, key, body: None });
        }
    }
    // Resignations of earlier epochs are settled: tombstoned, so the log does not keep one per
    // graceful leader stop (issue 15, a bounded log).
    for resigned in view.epochs.resigned.iter().filter(|resigned| **resigned < epoch) {
        let key = key::resign(*resigned);
        if !busy(TopicKind::Assignments, &key) {
            writes.push(Write::assignments(key, None));
        }
    }

    let candidates = Candidate::runners(live, &view.node_modes, now_ms);
    let defined = defined(view, &candidates);
    let is_live = |node: &NodeId| live_index.contains(node);
    let may_start_after =
        |node: &NodeId| live_index.get(node).is_some_and(|member| member.has(feature::START_AFTER));
    // Copies that may still run, by task (what the records carry), and those of them that keep
    // the task from starting on another node.
    let carried: BTreeMap<&TaskId, Vec<Holder>> = view
        .assignments
        .iter()
        .map(|(task, entry)| (task, handoff::left(view, task, &entry.assignment, &live_index, may_still_run)))
        .filter(|(_, copies)| !copies.is_empty())
        .collect();
    // The same task under another name: its own copy for an instance, its instances for it.
    let relatives = |task: &TaskId| -> Vec<&TaskId> {
        match task.instance() {
            Some(_) => {
                view.assignments.get_key_value(&task.base()).map(|(base, _)| base).into_iter().collect()
            }
            None => view.assigned_instances(task).collect(),
        }
    };
    let blocking = |task: &TaskId| -> Vec<&Holder> {
        let next_keep = defined.get(task).is_some_and(|spec| spec.spec.on_disconnect == OnDisconnect::Keep);
        let copies = carried.get(task).map(Vec::as_slice).unwrap_or_default();
        copies
            .iter()
            .filter(|holder| handoff::blocks(holder, &live_index, may_still_run, next_keep))
            .collect()
    };
    let services: BTreeMap<&TaskId, Result<Moves, String>> = defined
        .iter()
        .map(|(task, entry)| (task.as_ref(), entry))
        .filter(|(task, entry)| {
            view.desired_state(task) == DesiredState::Running
                && entry.spec.kind() == TaskKind::Service
                && failure(view, failed, task, entry.revision).is_none()
        })
        .map(|(task, entry)| (task, contain(|| moves(view, task, entry.revision, now_ms))))
        .collect();
    // Every step below runs task by task inside `contain`: a panic fails that task only.
    let total_services = services.len();
    let mut panicked: BTreeMap<TaskId, String> = BTreeMap::new();
    let services: BTreeMap<&TaskId, Moves> = services
        .into_iter()
        .filter_map(|(task, moves)| {
            moves.map_err(|reason| panicked.insert(task.clone(), reason)).ok().map(|moves| (task, moves))
        })
        .collect();
    let mut demands: Vec<Demand> = Vec::new();
    for (task, moves) in services.iter().filter(|(_, moves)| moves.wait.is_none()) {
        let demand = contain(|| {
            crate::fault::hook(crate::fault::Stage::Plan, task);
            let spec = &defined[*task].spec;
            let current = view
                .assigned_node(task)
                .cloned()
                .filter(|node| moves.failed_on.last().is_none_or(|last| last != node));
            // A silent node that may still run its copy keeps the task (the revision it runs
            // governs how long: see `handoff`).
            let hold = current.as_ref().is_some_and(|node| {
                !is_live(node) && blocking(task).iter().any(|holder| holder.node == *node)
            });
            let avoid = moves.failed_on.clone();
            // An operator's move (rebalance), while it stands.
            let prefer = view
                .moves
                .get(*task)
                .filter(|request| now_ms < request.until_ms && current.as_ref() == Some(&request.from))
                .map(|request| request.to.clone());
            // An instance: apart from its siblings; on its own node with `every_node` (its spec
            // is its task's, that field included).
            let (apart, only) = match task.instance() {
                None => (None, None),
                Some(instance) => {
                    (Some(task.base()), spec.every_node.then(|| NodeId::new(instance).ok()).flatten())
                }
            };
            Demand {
                task: (*task).clone(),
                tags: spec.tags.clone(),
                current,
                hold,
                avoid,
                prefer,
                apart,
                only,
            }
        });
        match demand {
            Ok(demand) => demands.push(demand),
            Err(reason) => {
                panicked.insert((*task).clone(), reason);
            }
        }
    }
    let mut placements = contain(|| plan(&candidates, &demands)).unwrap_or_else(|reason| {
        // Which task made placement panic? Add the demands one at a time (load still counts).
        let mut accepted: Vec<Demand> = Vec::new();
        let mut placements = BTreeMap::new();
        for demand in &demands {
            accepted.push(demand.clone());
            match contain(|| plan(&candidates, &accepted)) {
                Ok(placed) => placements = placed,
                Err(reason) => {
                    accepted.pop();
                    panicked.insert(demand.task.clone(), reason);
                }
            }
        }
        // Nothing places at all: the cause is shared (the members, a bug), not one task's.
        // Failing every task would outlive the cause; the step is skipped instead.
        if accepted.is_empty() && demands.len() > 1 {
            panic!("placement panicked for every task: {reason}");
        }
        placements
    });
    // The same for the per-task steps above: when every one of several tasks panicked, blame
    // none of them.
    if panicked.len() > 1 && panicked.len() == total_services {
        panic!(
            "every service's planning panicked: {}",
            panicked.values().next().cloned().unwrap_or_default()
        );
    }

    // Statuses outlive nothing: a status of a task not placed (undefined, or run as instances)
    // without an assignment goes. An invalid definition's stays (its task shows as failed).
    let keeps_status = |task: &TaskId| defined.contains_key(task) || view.invalid.contains_key(task);
    let orphans =
        view.statuses.keys().filter(|task| !keeps_status(task) && !view.assignments.contains_key(*task));
    let mut takers = Takers::new(&candidates);
    let tasks: BTreeSet<&TaskId> =
        defined.keys().map(|task| task.as_ref()).chain(view.assignments.keys()).chain(orphans).collect();
    for task in tasks {
        let record_key = key::task(task);
        if busy(TopicKind::Assignments, &record_key) {
            continue;
        }
        let current = view.assignments.get(task);
        let copies = carried.get(task).map(Vec::as_slice).unwrap_or_default();
        let Some(spec) = defined.get(task) else {
            let current = current.map(|entry| &entry.assignment);
            writes.extend(undefined(view, epoch, task, current, copies, keeps_status(task), busy));
            continue;
        };
        let moves = services.get(task);
        let failed_on = moves.map(|moves| moves.failed_on.clone()).unwrap_or_default();
        let retry_at_ms = moves.and_then(|moves| moves.wait.as_ref().map(|(at, _)| *at));
        let decided = match failure(view, failed, task, spec.revision).or_else(|| panicked.remove(task)) {
            Some(reason) => Err(reason),
            // A panic while deciding for this task fails the task, not the leader.
            None => contain(|| {
                crate::fault::hook(crate::fault::Stage::Plan, task);
                match placements.remove(task) {
                    Some(Ok(node)) => Placement::Assigned { node },
                    Some(Err(reason)) => Placement::Pending { reason },
                    None if let Some((_, reason)) = moves.and_then(|moves| moves.wait.as_ref()) => {
                        Placement::Pending { reason: reason.clone() }
                    }
                    None if view.desired_state(task) == DesiredState::Stopped => Placement::Stopped,
                    // Periodic and one-shot tasks: the scheduler launches each run.
                    None => match takers.check(&spec.spec.tags) {
                        Ok(()) => Placement::Scheduled,
                        Err(reason) => Placement::Pending { reason },
                    },
                }
            }),
        };
        let mut placement = decided.unwrap_or_else(|reason| Placement::Failed { reason });
        // A copy still running elsewhere: the task waits for it (a planned move hands off). A
        // node that can wait for the copies' word itself is assigned at once, naming them in
        // `after`: the old node's word then reaches it in one hop, not two.
        let elsewhere =
            |holder: &&Holder| !matches!(&placement, Placement::Assigned { node } if *node == holder.node);
        let waits: Vec<&Holder> = blocking(task).into_iter().filter(elsewhere).collect();
        let mut after: Vec<NodeId> = Vec::new();
        if let Some(holder) = waits.first() {
            match &placement {
                Placement::Assigned { node } if may_start_after(node) => {
                    after = waits.iter().map(|holder| holder.node.clone()).collect();
                }
                Placement::Assigned { .. } | Placement::Scheduled | Placement::Pending { .. } => {
                    placement = Placement::Pending { reason: handoff::waiting_reason(holder, &live_index) };
                }
                Placement::Stopped | Placement::Failed { .. } => {}
            }
        }
        // A service whose periodic or one-shot runs (of an earlier revision) still run waits;
        // an instance waits for those of its task.
        if let Placement::Assigned { .. } = placement
            && let Some(run) = [task.clone(), task.base()]
                .iter()
                .find_map(|task| view.runs_of(task).find_map(|run| run.in_flight_on()))
        {
            placement = Placement::Pending { reason: format!("waiting for its run on {run} to end") };
            after.clear();
        }
        // A switch between one copy and instances: the task waits until no copy under the other
        // name may still run (an instance for its task's own copy, the task for its instances).
        if let Placement::Assigned { .. } = placement
            && let Some((other, holder)) = relatives(task).into_iter().find_map(|other| {
                carried.get(other).and_then(|copies| copies.first()).map(|copy| (other, copy))
            })
        {
            placement =
                Placement::Pending { reason: format!("waiting for {other} to stop on {}", holder.node) };
            after.clear();
        }
        // A failed task is not moved again: no nodes to avoid, no retry time.
        let (failed_on, retry_at_ms) = match placement {
            Placement::Failed { .. } => (Vec::new(), None),
            _ => (failed_on, retry_at_ms),
        };
        let unchanged = current.is_some_and(|current| {
            current.assignment.placement == placement
                && current.assignment.spec_revision == spec.revision
                && current.assignment.failed_on == failed_on
                && current.assignment.retry_at_ms == retry_at_ms
        });
        let generation = match current {
            Some(current) if unchanged => current.assignment.generation,
            _ => {
                let assigned = current.map_or(0, |current| current.assignment.generation);
                let reported = view.statuses.get(task).map_or(0, |status| status.status.generation);
                // Saturating: a forged status with the largest generation must not panic.
                assigned.max(reported).saturating_add(1)
            }
        };
        let current_record = current.map(|entry| &entry.assignment);
        let given = (spec.spec.as_ref(), spec.revision);
        let holders = holders_after(view, task, current_record, copies, &placement, given, generation);
        // The incarnation that runs it: the one `members` lists (another of its id runs nothing).
        // Passing from one incarnation of the id to another is a move: an exclusive task stays
        // with the first until it may no longer run it (unless the second replaced it on its
        // workspace: a restart), like a task leaving a silent node.
        let incarnation = match &placement {
            Placement::Assigned { node } => {
                let chosen = live_index.get(node).map(|member| member.incarnation);
                let held = current.map(|entry| &entry.assignment).and_then(|current| {
                    let before = current.incarnation?;
                    let same_node =
                        matches!(&current.placement, Placement::Assigned { node: was } if was == node);
                    let exclusive = current.spec.on_disconnect == OnDisconnect::Stop;
                    (same_node
                        && exclusive
                        && Some(before) != chosen
                        && incarnation_may_still_run(node, before, current.spec.stop_grace))
                    .then_some(before)
                });
                held.or(chosen)
            }
            _ => None,
        };
        if let Some(current) = current
            && unchanged
            && current.assignment.holders == holders
            && current.assignment.after == after
            && current.assignment.incarnation == incarnation
            && current.assignment.epoch == epoch
            && view.is_settled(TopicKind::Assignments, &record_key)
        {
            continue;
        }
        let record = AssignmentRecord { placement, failed_on, retry_at_ms, holders, after, incarnation };
        writes.push(assignment_write(epoch, task, generation, (&spec.spec, spec.revision), record));
    }
    writes
}

/// A task the leader places: the spec it runs, and that spec's revision.
struct Defined<'v> {
    spec: Cow<'v, TaskSpec>,
    revision: i64,
}

/// The tasks the leader places, with the spec each runs: every defined task, but that a task
/// with instances is replaced by its instances (see [`Instances`]): `count` numbers them from 0;
/// `every_node` names one after each live runner that carries the task's tags and is not
/// draining (a node that leaves, or drains, loses its instance; one that joins gets one).
///
/// An instance already assigned the spec its task has now, but for `count` (the task was scaled),
/// keeps the revision it has: scaling restarts no instance. Any other change (a resubmission
/// too, as for a task of one copy) gives it the task's revision. In the steady state nothing is
/// copied: an instance runs its assignment's spec.
fn defined<'v>(view: &'v LogView, candidates: &[Candidate]) -> BTreeMap<Cow<'v, TaskId>, Defined<'v>> {
    let mut defined = BTreeMap::new();
    for (task, entry) in &view.specs {
        let instance = |id: TaskId| {
            let current = view.assignments.get(&id).map(|current| &current.assignment).filter(|current| {
                current.spec_revision <= entry.revision
                    && !matches!(current.placement, Placement::Failed { .. })
                    && current.spec.runs_like(&entry.spec)
                    && current.spec.every_node == entry.spec.every_node
            });
            let runs = match current {
                Some(current) if current.spec.count != entry.spec.count => {
                    Defined { spec: Cow::Borrowed(&current.spec), revision: current.spec_revision }
                }
                Some(current) if current.spec_revision == entry.revision => {
                    Defined { spec: Cow::Borrowed(&current.spec), revision: entry.revision }
                }
                _ => Defined {
                    spec: Cow::Owned(entry.spec.instance_spec(id.clone())),
                    revision: entry.revision,
                },
            };
            (Cow::Owned(id), runs)
        };
        match entry.spec.instances() {
            Instances::Single => {
                defined.insert(
                    Cow::Borrowed(task),
                    Defined { spec: Cow::Borrowed(&entry.spec), revision: entry.revision },
                );
            }
            Instances::Count(count) => {
                defined.extend((0..count).filter_map(|n| task.with_instance(&n.to_string())).map(instance));
            }
            Instances::EveryNode => {
                let nodes = candidates.iter().filter(|node| {
                    node.can_run(&entry.spec.tags)
                        && !matches!(node.availability, Availability::Draining { .. })
                });
                defined.extend(nodes.filter_map(|node| task.with_instance(node.id.as_str())).map(instance));
            }
        }
    }
    defined
}

/// The oldest epoch of an accepted leader record in the view (`members`, `task/`, `sched/`,
/// `run/` on `assignments`), or `epoch` when there is none older.
fn oldest_record_epoch(view: &LogView, epoch: u64) -> u64 {
    let members = view.members.iter().map(|members| members.epoch);
    let assignments = view.assignments.values().map(|entry| entry.assignment.epoch);
    let scheds = view.scheds.values().map(|entry| entry.sched.epoch);
    let intents = view.all_runs().filter_map(|run| run.epoch());
    let trims = view.trim_epochs();
    members.chain(assignments).chain(scheds).chain(intents).chain(trims).fold(epoch, u64::min)
}

/// Tombstones for the claims no replay needs (issue 15, a bounded log). A compacted log starts
/// at its first surviving claim, which a reader with no claim yet takes as its first epoch (see
/// `LogView`'s claim rule), so whatever prefix of these tombstones compaction has applied (a
/// cleaner stops at a cut offset), the first surviving claim must be a winner, followed by every
/// later winner. Hence, one phase at a time, each only once the tombstones before it were read
/// back (so they lie at lower offsets):
/// 1. every claim that lost or was refused, at once: it decided nothing, and none lies before
///    the first winner but claims every reader refuses wherever they lie (out of range, a key
///    or body of the wrong shape): a reader with no claim takes the first one, and new claims
///    land at the end;
/// 2. then the winning claims of epochs older than every accepted leader record (the leader and
///    the scheduler restamp what earlier epochs wrote, so that epoch comes soon), one at a time,
///    lowest first: each surviving suffix of winners is then unbroken. Only while every live
///    node reads a log that starts later ([`feature::TRIMMED_CLAIMS`]).
pub fn trim_claims(
    view: &LogView,
    epoch: u64,
    live: &[Member],
    busy: &dyn Fn(TopicKind, &str) -> bool,
) -> Vec<Write> {
    let claims = &view.epochs.claims;
    // The usual case, and the cheap one: only this epoch's claim is in the log.
    if claims.len() <= 1 || claims.keys().any(|key| busy(TopicKind::Assignments, key)) {
        return Vec::new();
    }
    let winners: BTreeMap<i64, u64> =
        view.epochs.winners.iter().map(|(epoch, winner)| (winner.offset, *epoch)).collect();
    let lost: Vec<Write> = claims
        .iter()
        .filter(|(_, offset)| !winners.contains_key(offset))
        .map(|(key, _)| Write::assignments(key.clone(), None))
        .collect();
    if !lost.is_empty() || !live.iter().all(|member| member.has(feature::TRIMMED_CLAIMS)) {
        return lost;
    }
    let oldest = oldest_record_epoch(view, epoch);
    let first = claims.iter().min_by_key(|(_, offset)| **offset);
    match first {
        Some((key, offset)) if winners.get(offset).is_some_and(|won| *won < oldest) => {
            vec![Write::assignments(key.clone(), None)]
        }
        _ => Vec::new(),
    }
}

/// A node whose newest incarnation departed (a graceful stop) is retired this long after its
/// last heartbeat (its send time against the leader's clock): 1 hour, so `nodes` still shows
/// a node stopped for maintenance as `left` meanwhile.
pub const RETIRE_DEPARTED_MS: i64 = 3600 * 1000;

/// A node silent this long, without a departure, is retired: 24 hours.
pub const RETIRE_SILENT_MS: i64 = 24 * 3600 * 1000;

/// Tombstones for the heartbeats of retired nodes (issue 15, a bounded log): a node that is
/// not live, silent for [`RETIRE_DEPARTED_MS`] after a departure of its newest incarnation or
/// for [`RETIRE_SILENT_MS`] without one, and that no assignment or run not over names.
/// Retiring only forgets: the node heartbeats again if it comes back, and nothing was running
/// on it, so the two machines' clocks compared for silence decide nothing about any run. Its
/// departures go at the next step (a departure of a node with no heartbeat is settled).
fn retire_nodes(
    view: &LogView,
    live: &Live<'_>,
    now_ms: i64,
    busy: &dyn Fn(TopicKind, &str) -> bool,
) -> Vec<Write> {
    let named = |node: &NodeId| {
        let assigned = view.assignments.values().any(|entry| {
            matches!(&entry.assignment.placement, Placement::Assigned { node: on } if on == node)
                || entry.assignment.holders.iter().any(|holder| holder.node == *node)
        });
        let running = view
            .open_runs
            .iter()
            .any(|(task, run)| view.run(task, run).and_then(|entry| entry.in_flight_on()) == Some(node));
        assigned || running
    };
    let mut writes = Vec::new();
    for (node, entry) in &view.heartbeats {
        if live.contains(node) {
            continue;
        }
        let departed = view.left.contains(&(node.clone(), entry.incarnation));
        let sent_ms = i64::try_from(entry.sent_at_ms).unwrap_or(i64::MAX);
        let after = if departed { RETIRE_DEPARTED_MS } else { RETIRE_SILENT_MS };
        let key = key::node(node);
        if now_ms.saturating_sub(sent_ms) > after && !named(node) && !busy(TopicKind::Control, &key) {
            writes.push(Write { topic: TopicKind::Control, key, body: None });
        }
    }
    writes
}

/// The copies a new assignment record names (see [`Assignment::holders`]), given the copies
/// not gone (`copies`), the decided placement and its generation.
fn holders_after(
    view: &LogView,
    task: &TaskId,
    current: Option<&Assignment>,
    copies: &[Holder],
    placement: &Placement,
    (spec, revision): (&TaskSpec, i64),
    generation: u64,
) -> Vec<Holder> {
    let Some(current) = current else { return Vec::new() };
    let placed_on = match placement {
        Placement::Assigned { node } => Some(node),
        _ => None,
    };
    let was_on = match &current.placement {
        Placement::Assigned { node } => Some(node),
        _ => None,
    };
    copies
        .iter()
        .filter_map(|copy| {
            if placed_on == Some(&copy.node) {
                let given = handoff::holder_for(&copy.node, generation, spec);
                let explicit = current.holders.iter().find(|holder| holder.node == copy.node);
                if was_on == Some(&copy.node) && current.spec_revision == revision {
                    // The node confirmed the revision it was given: its own spec governs again.
                    let confirmed =
                        explicit.is_some_and(|holder| handoff::word_for(view, task, holder).is_some());
                    return explicit.filter(|_| !confirmed).cloned();
                }
                // A new revision (or the task comes back): until the node confirms it, the copy
                // may be the older one, so the worst of both governs.
                let merged = handoff::merge(&given, copy);
                let covered = merged == Holder { since: merged.since, ..given.clone() };
                return (!covered).then_some(merged);
            }
            // Handed off (or nobody runs it): the node's word counts from the first record that
            // took the task away from it.
            let handed =
                current.holders.iter().find(|holder| holder.node == copy.node && was_on != Some(&copy.node));
            Some(handed.cloned().unwrap_or_else(|| Holder { since: generation, ..copy.clone() }))
        })
        .collect()
}

/// The writes for a task not placed (deleted, invalid, an instance no longer wanted, a task
/// now run as instances): its copies are waited for (the assignment says `stopped` and names
/// them), then its assignment is deleted, and its status unless `keep_status` (an invalid
/// definition's: the task shows as failed).
fn undefined(
    view: &LogView,
    epoch: u64,
    task: &TaskId,
    current: Option<&Assignment>,
    copies: &[Holder],
    keep_status: bool,
    busy: &dyn Fn(TopicKind, &str) -> bool,
) -> Vec<Write> {
    let record_key = key::task(task);
    if let Some(current) = current
        && !copies.is_empty()
    {
        let generation = match current.placement {
            Placement::Stopped => current.generation,
            _ => current.generation.saturating_add(1),
        };
        // Nobody runs it: the spec given to the copies' nodes is the record's own.
        let given = (&current.spec, current.spec_revision);
        let holders =
            holders_after(view, task, Some(current), copies, &Placement::Stopped, given, generation);
        if current.placement == Placement::Stopped
            && current.holders == holders
            && current.epoch == epoch
            && view.is_settled(TopicKind::Assignments, &record_key)
        {
            return Vec::new();
        }
        let assignment = Assignment {
            epoch,
            generation,
            placement: Placement::Stopped,
            failed_on: Vec::new(),
            retry_at_ms: None,
            holders,
            after: Vec::new(),
            incarnation: None,
            ..current.clone()
        };
        return vec![Write::assignments(record_key, Some(Body::Assignment(assignment)))];
    }
    let mut writes = Vec::new();
    if current.is_some() {
        writes.extend(Write::delete(TopicKind::Assignments, record_key.clone(), epoch));
    }
    if !keep_status && view.statuses.contains_key(task) && !busy(TopicKind::Status, &record_key) {
        writes.extend(Write::delete(TopicKind::Status, record_key, epoch));
    }
    writes
}

/// What an assignment record says besides its task, generation and spec.
struct AssignmentRecord {
    placement: Placement,
    failed_on: Vec<NodeId>,
    retry_at_ms: Option<i64>,
    holders: Vec<Holder>,
    after: Vec<NodeId>,
    incarnation: Option<uuid::Uuid>,
}

/// The assignment record. A failed task's carries a minimal spec (its id and command): nobody
/// runs it, and its full spec may be what could not be written.
fn assignment_write(
    epoch: u64,
    task: &TaskId,
    generation: u64,
    (spec, revision): (&TaskSpec, i64),
    record: AssignmentRecord,
) -> Write {
    let AssignmentRecord { placement, failed_on, retry_at_ms, holders, after, incarnation } = record;
    let carried = match placement {
        Placement::Failed { .. } => TaskSpec::new(task.clone(), spec.command.clone(), Vec::new()),
        _ => spec.clone(),
    };
    let assignment = Assignment {
        epoch,
        task: task.clone(),
        generation,
        spec_revision: revision,
        placement,
        spec: carried,
        failed_on,
        retry_at_ms,
        holders,
        after,
        incarnation,
    };
    Write::assignments(key::task(task), Some(Body::Assignment(assignment)))
}

/// The write that fails `task` (at its current revision) with `reason`, from the scheduler,
/// whose own planning of the task panicked.
pub fn fail_write(view: &LogView, epoch: u64, task: &TaskId, reason: String) -> Option<Write> {
    let spec = view.specs.get(task)?;
    let assigned = view.assignments.get(task).map_or(0, |entry| entry.assignment.generation);
    let reported = view.statuses.get(task).map_or(0, |status| status.status.generation);
    // Past what reconciliation may have written in the same step.
    let generation = assigned.max(reported).saturating_add(2);
    // The copies its nodes may run are still waited for before the task runs anywhere else.
    let holders = match view.assignments.get(task) {
        Some(current) => {
            let copies = handoff::copies_of(&current.assignment);
            let failed = Placement::Failed { reason: String::new() };
            let given = (&spec.spec, spec.revision);
            holders_after(view, task, Some(&current.assignment), &copies, &failed, given, generation)
        }
        None => Vec::new(),
    };
    let record = AssignmentRecord {
        placement: Placement::Failed { reason },
        failed_on: Vec::new(),
        retry_at_ms: None,
        holders,
        after: Vec::new(),
        incarnation: None,
    };
    Some(assignment_write(epoch, task, generation, (&spec.spec, spec.revision), record))
}

#[cfg(test)]
mod tests;
