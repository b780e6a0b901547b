//! The leader's scheduling of periodic and one-shot runs, pure: from the log view, the live
//! members and the time, the records to write (launch intents, `sched/` positions, stop
//! requests, verdicts on runs whose node is gone, history trimming).
//!
//! Invariants (see `docs/architecture.md`, "Periodic and one-shot runs"):
//! * a run id is derived from task, trigger and attempt, and an intent is written only when
//!   no record of that run exists: no slot and attempt is launched twice, whichever leader
//!   plans it;
//! * `sched/<task>` is written after the task's intents (same topic, same producer) when a
//!   step changes more than its launches imply, and a task is not planned again until its
//!   `sched/` and intent writes are read back;
//! * a run whose node is gone gets a verdict: `lost` when its runner wrote a start record
//!   (it may have run), `missed` when not (it never ran, so it may be launched again).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shiva_proto::records::{Body, DesiredState, ExitInfo, Member, Placement};
use shiva_proto::runs::{Due, Outcome, RunIntent, RunPhase, Sched, Trigger, jitter_ms, run_id};
use shiva_proto::schedule::Schedule;
use shiva_proto::spec::{CatchUp, OnDisconnect, Overlap, TaskKind};
use shiva_proto::topics::key;
use shiva_proto::view::{RunRef, SpecEntry};
use shiva_proto::{LogView, NodeId, TaskId, TopicKind};
use uuid::Uuid;

use crate::firing::{OnceNext, OverlapAction, RunEnd, Timing, before, on_due, once_next, plan_slots};
use crate::leader::Write;
use crate::placement::Candidate;
use overlay::Runs;

/// Finished runs kept per task; older ones are tombstoned.
pub const HISTORY: usize = 100;

/// While every node reads `trim` records (see `Context::batched_trim`), a task's finished runs
/// beyond [`HISTORY`] leave a handful at a time: once [`trim_every`] of them wait, from
/// `TRIM_EVERY` to `2 * TRIM_EVERY - 1` (`Context::trim_every`), in one step. One at a time, a lone
/// task's run would leave alone in its step, with a `deleted` marker and a tombstone on each
/// topic (seven records a run, against five and `4 / n` for `n` runs leaving together). The
/// attempts of one trigger still leave one a step (see `TaskPlan::trim_history`).
pub const TRIM_EVERY: usize = 8;

/// Launch intents of deleted tasks trimmed in one plan (see `TaskPlan::trim_history`): tasks
/// deleted with their histories (up to 115 runs each) trim no more than a full `trim`
/// record's worth a step in all; the rest leave at the next steps. A defined task's runs are
/// never held back by it.
pub const TRIMS_PER_PLAN: usize = shiva_proto::records::MAX_TRIM_KEYS;

/// How many of `task`'s runs past its history wait before they leave it together: from
/// `least` to `2 * least - 1`, by the task's id, so that tasks submitted together do not all
/// trim at the same launch (`least`: [`TRIM_EVERY`], or 1 in tests for trimming at every run).
pub fn trim_every(task: &TaskId, least: usize) -> usize {
    let least = least.max(1);
    let spread = Uuid::new_v5(&Uuid::NAMESPACE_OID, task.as_str().as_bytes()).as_bytes()[0];
    least + usize::from(spread) % least
}

/// Slots launched past a periodic task's stored position before the position is written again
/// (see `TaskPlan::write_position`): half the history, so that a reader that does not imply the
/// position from the launch intents still finds an intent for every slot after it.
pub const CHECKPOINT_LAUNCHES: usize = HISTORY / 2;

/// Seats a task's intents take at most (see [`Context::run_seats`]): its history and a margin
/// for runs in flight; more runs at once (a burst of requests, a catch-up beside long runs) are
/// keyed by run id, and leave as without seats.
pub const SEATS_PER_TASK: usize = HISTORY + 4 * TRIM_EVERY;

/// Runs on seats a step lets wait for the step's new intents to take their seats; a task
/// further past its history (after a burst) has the others leave as without seats, so its
/// history comes back to [`HISTORY`].
const LEAVING_PER_STEP: usize = 4;

/// A run starting this much after its slot is late (backlog).
const LATE_MS: i64 = 500;

/// What the scheduler needs besides the view.
pub struct Context<'a> {
    /// The log view.
    pub view: &'a LogView,
    /// Live members (runners and others).
    pub live: &'a [Member],
    /// The leader's epoch.
    pub epoch: u64,
    /// The leader's clock.
    pub now: DateTime<Utc>,
    /// Look-ahead and tolerance.
    pub timing: Timing,
    /// Keys with a write in flight: left alone until read back.
    pub busy: &'a dyn Fn(TopicKind, &str) -> bool,
    /// Whether a launch intent of this task (a `run/<task>/<uuid>` key of `assignments`, not
    /// one of a longer task id that shares the prefix) has a write in flight or not read back.
    pub runs_busy: &'a dyn Fn(&TaskId) -> bool,
    /// Every live leader-capable node has `lean_runs` (see `shiva_proto::records::feature`): a
    /// launch leaves the task's position unwritten (implied by its intents).
    pub lean: bool,
    /// Every live node has `batched_trim` (see `shiva_proto::records::feature`): the runs a
    /// step trims share a `trim` record per topic (see [`crate::leader::batch_trims`]).
    pub batched_trim: bool,
    /// The fewest runs past its history a task trims together while batched (see
    /// [`trim_every`]): [`TRIM_EVERY`]; 1 trims one at every run, as unbatched (tests).
    pub trim_every: usize,
    /// See [`TRIMS_PER_PLAN`] (smaller in tests).
    pub trims_per_plan: usize,
    /// Every live node, and the newest heartbeat of every node not retired, has `run_seats`
    /// and `batched_trim` (see `shiva_proto::records::feature::run_seats`): a new run's intent
    /// takes the seat of a run leaving its task's history (`run/<task>/@<seat>`), which leaves
    /// by being overwritten (see [`TaskPlan::take_seat`]).
    pub run_seats: bool,
    /// Parsed schedules, kept between plans.
    pub schedules: &'a Schedules,
    /// Whether a node that is not live may still run an exclusive run of a task (it has not
    /// fenced itself yet): its runs are judged only once that has passed.
    pub may_still_run: &'a dyn Fn(&NodeId, Duration) -> bool,
    /// Tasks this leader cannot handle (see [`crate::leader::Inputs::failed`]).
    pub failed: &'a BTreeMap<TaskId, (i64, String)>,
    /// Run reports at `status` offsets below this were read before a read of every topic to
    /// its end that completed since: the intent of such a report (written before the report)
    /// has been read too, so if the view has none it is gone. A report above it may be one whose
    /// intent is not read yet (topics are read apart, and a write reported failed may have
    /// landed), so it is not deleted as an orphan yet (see [`wants_read_to_end`]).
    pub reports_synced_below: i64,
    /// Launch intents at `assignments` offsets below this were read before a read of every
    /// topic to its end that completed since: a start record its runner wrote before the
    /// intent landed has been read too. A `missed` verdict below it is confirmed: no start
    /// record crossed it (see [`wants_read_to_end`]).
    pub intents_synced_below: i64,
}

/// Whether the leader wants a read of every topic to its end, in one pass over the runs (see
/// [`Context::reports_synced_below`] and [`Context::intents_synced_below`]): a run report whose
/// intent the view does not hold was read after the last one (it can be deleted once one
/// confirms the intent gone), or a run judged `missed` was (its next attempt waits for one,
/// which would show a start record its runner wrote as the verdict was under way).
pub fn wants_read_to_end(view: &LogView, reports_synced_below: i64, intents_synced_below: i64) -> bool {
    view.all_runs().any(|run| {
        let orphan =
            !run.has_intent() && run.report_offset().is_some_and(|offset| offset >= reports_synced_below);
        let missed = run.phase() == RunPhase::Missed
            && run.intent_offset().is_some_and(|offset| offset >= intents_synced_below);
        orphan || missed
    })
}

/// Parsed schedules by task and spec revision: parsing cron expressions at every plan cost
/// the leader most of its time with 100 per-second tasks.
#[derive(Debug, Default)]
pub struct Schedules {
    parsed: std::cell::RefCell<BTreeMap<TaskId, (i64, Parsed)>>,
    /// Tasks whose planning panicked, by spec revision (`None`: the task has no valid spec),
    /// with the reason; forgotten when the revision changes or leadership is taken again.
    panics: std::cell::RefCell<BTreeMap<TaskId, (Option<i64>, String)>>,
}

/// A task's parsed schedule (None: not periodic, or invalid).
type Parsed = Option<std::sync::Arc<Schedule>>;

impl Schedules {
    /// The schedule of `spec` (None: not periodic, or invalid).
    pub fn get(&self, spec: &SpecEntry) -> Parsed {
        let mut parsed = self.parsed.borrow_mut();
        if let Some((revision, schedule)) = parsed.get(&spec.spec.id)
            && *revision == spec.revision
        {
            return schedule.clone();
        }
        let schedule = Schedule::from_spec(&spec.spec).ok().flatten().map(std::sync::Arc::new);
        parsed.insert(spec.spec.id.clone(), (spec.revision, schedule.clone()));
        schedule
    }

    /// Forgets tasks no longer defined.
    pub fn retain(&self, view: &LogView) {
        self.parsed.borrow_mut().retain(|task, _| view.specs.contains_key(task));
        self.panics
            .borrow_mut()
            .retain(|task, (revision, _)| view.specs.get(task).map(|spec| spec.revision) == *revision);
    }

    /// Forgets every panic: a new leadership plans every task afresh.
    pub fn forget_panics(&self) {
        self.panics.borrow_mut().clear();
    }

    /// Why planning `task` at `revision` panicked before, if it did.
    fn panicked(&self, task: &TaskId, revision: Option<i64>) -> Option<String> {
        let panics = self.panics.borrow();
        let (at, reason) = panics.get(task)?;
        (*at == revision).then(|| reason.clone())
    }

    fn note_panic(&self, task: &TaskId, revision: Option<i64>, reason: &str) {
        self.panics.borrow_mut().insert(task.clone(), (revision, reason.to_owned()));
    }
}

/// Computes the scheduler's writes.
pub fn plan(ctx: &Context<'_>) -> Vec<Write> {
    let view = ctx.view;
    let mut load = Load::new(ctx);
    let mut writes = Vec::new();
    let tasks: BTreeSet<&TaskId> = view
        .specs
        .iter()
        .filter(|(_, entry)| entry.spec.kind() != TaskKind::Service)
        .map(|(task, _)| task)
        .chain(view.scheds.keys())
        .chain(view.runs.keys())
        .chain(view.requests.keys())
        .collect();
    for task in tasks {
        // Planned again only once its last writes are read back: its position, and its intents,
        // which imply the position without it being written (see `TaskPlan::position`).
        if (ctx.busy)(TopicKind::Assignments, &key::sched(task)) || (ctx.runs_busy)(task) {
            continue;
        }
        let revision = view.specs.get(task).map(|spec| spec.revision);
        let failed = revision.and_then(|revision| crate::leader::failure(view, ctx.failed, task, revision));
        if failed.is_none()
            && let Some(reason) = ctx.schedules.panicked(task, revision)
        {
            // Its planning panicked in this leadership: not planned again; its failure is
            // written until it lands (then `fail` below takes over).
            if !(ctx.busy)(TopicKind::Assignments, &key::task(task)) {
                writes.extend(crate::leader::fail_write(view, ctx.epoch, task, reason));
            }
            continue;
        }
        // A panic while planning this task fails the task: what it wrote is dropped.
        let before = writes.len();
        let planned = crate::fault::contain(|| {
            let mut plan = TaskPlan::new(ctx, task, &mut load, &mut writes);
            match &failed {
                // Failed for this revision: its runs are stopped and judged, nothing new starts.
                Some(reason) => plan.fail(reason),
                None => {
                    crate::fault::hook(crate::fault::Stage::Plan, task);
                    plan.run();
                }
            }
            plan.restamp_inherited();
        });
        if let Err(reason) = planned {
            writes.truncate(before);
            if failed.is_some() {
                tracing::error!(%task, %reason, "stopping the runs of a failed task panicked");
                continue;
            }
            // Not planned again in this leadership, nor by the next leader once the failure
            // is in the log.
            ctx.schedules.note_panic(task, revision, &reason);
            if !(ctx.busy)(TopicKind::Assignments, &key::task(task)) {
                writes.extend(crate::leader::fail_write(view, ctx.epoch, task, reason));
            }
        }
    }
    match ctx.batched_trim {
        true => crate::leader::batch_trims(writes, ctx.epoch),
        false => writes,
    }
}

/// Restamps of an earlier epoch's records per plan, across tasks (see
/// `TaskPlan::restamp_inherited`): a new leader rewrites its inherited history a little at a
/// time, not all of it in its first step.
pub const RESTAMPS_PER_PLAN: usize = 64;

/// What one plan shares across tasks: runs (and services) per runner, to spread new runs, and
/// the restamps left.
struct Load<'a> {
    /// The live members, by id.
    live: crate::leader::Live<'a>,
    runners: Vec<Candidate>,
    counts: BTreeMap<NodeId, usize>,
    restamps_left: usize,
    /// Intents of deleted tasks this plan may still trim (see [`TRIMS_PER_PLAN`]).
    trims_left: usize,
}

impl<'a> Load<'a> {
    fn new(ctx: &Context<'a>) -> Load<'a> {
        let runners = Candidate::runners(ctx.live, &ctx.view.node_modes, ctx.now.timestamp_millis());
        let mut counts: BTreeMap<NodeId, usize> = runners.iter().map(|node| (node.id.clone(), 0)).collect();
        let services = ctx.view.assignments.values().filter_map(|entry| match &entry.assignment.placement {
            Placement::Assigned { node } => Some(node),
            _ => None,
        });
        let view = ctx.view;
        let runs = view.open_runs.iter().filter_map(|(task, id)| view.run(task, id)?.in_flight_on());
        for node in services.chain(runs) {
            if let Some(count) = counts.get_mut(node) {
                *count += 1;
            }
        }
        Load {
            live: crate::leader::Live::new(ctx.live),
            runners,
            counts,
            restamps_left: RESTAMPS_PER_PLAN,
            trims_left: ctx.trims_per_plan,
        }
    }

    fn is_live(&self, node: &NodeId) -> bool {
        self.counts.contains_key(node)
    }

    /// Whether a live runner that takes new work (not cordoned or draining) carries all of
    /// `tags`.
    fn any_can_run(&self, tags: &[String]) -> bool {
        self.runners.iter().any(|node| node.takes_new() && node.can_run(tags))
    }

    /// The eligible runner with the fewest runs (ties by id), counted as one more.
    fn pick(&mut self, tags: &[String]) -> Option<NodeId> {
        let node = self
            .runners
            .iter()
            .filter(|node| node.takes_new() && node.can_run(tags))
            .min_by_key(|node| (self.counts.get(&node.id).copied().unwrap_or(0), node.id.clone()))
            .map(|node| node.id.clone())?;
        *self.counts.entry(node.clone()).or_default() += 1;
        Some(node)
    }
}

/// The runs of one task, with this step's changes applied on top of the view.
struct TaskPlan<'a, 'c> {
    ctx: &'c Context<'a>,
    task: &'a TaskId,
    spec: Option<&'a SpecEntry>,
    runs: Runs<'a>,
    load: &'c mut Load<'a>,
    writes: &'c mut Vec<Write>,
    /// Where this task's writes start in `writes`.
    first_write: usize,
    /// Runs on seats that leave the history (see [`TaskPlan::trim_history`]), oldest first,
    /// with their seats: the next new intents of this step take those seats, and overwrite them.
    /// (Whether it implies the task's position: then only a later slot's intent takes it.)
    leaving: std::collections::VecDeque<(Uuid, u16, bool)>,
}

fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// How far back from the leader's first plan of a periodic task its slots may count: the
/// submitter's clock (another machine's) is believed back to this bound and no further.
pub const SUBMIT_CLOCK_BOUND_MS: i64 = 2_000;

/// The origin of a periodic task's slots: the leader's clock when it first plans the task
/// (`now_ms`), or the submitter's send instant if that is earlier by at most
/// [`SUBMIT_CLOCK_BOUND_MS`] (a leader that took over just after the submission still runs the
/// slots since). A CLI clock a day behind once made `catch_up: all` launch a day of slots from
/// before the task existed; now it moves the origin by at most the bound, and one ahead not at all.
pub fn origin(submitted_ms: i64, now_ms: i64) -> i64 {
    submitted_ms.clamp(now_ms.saturating_sub(SUBMIT_CLOCK_BOUND_MS), now_ms)
}

/// Latest instant the scheduler works with: the last millisecond of year 9999. Instants read
/// from the log are clamped to [1970, 9999], so arithmetic on them (a slot plus a few hours
/// around a time-zone change, a day of jitter) stays far from chrono's limits.
const LATEST_MS: i64 = 253_402_300_799_999;

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms.clamp(0, LATEST_MS)).unwrap_or_default()
}

impl<'a, 'c> TaskPlan<'a, 'c> {
    fn new(
        ctx: &'c Context<'a>,
        task: &'a TaskId,
        load: &'c mut Load<'a>,
        writes: &'c mut Vec<Write>,
    ) -> Self {
        let spec = ctx.view.specs.get(task).filter(|entry| entry.spec.kind() != TaskKind::Service);
        let runs = Runs::new(task, ctx.view.runs.get(task));
        let first_write = writes.len();
        TaskPlan { ctx, task, spec, runs, load, writes, first_write, leaving: Default::default() }
    }

    fn busy(&self, topic: TopicKind, key: &str) -> bool {
        (self.ctx.busy)(topic, key)
    }

    /// The offset of `run`'s intent as read back, if the view reads the run `missed` (not only
    /// this plan's writes: a verdict written in it, or under way, is not read back; a task whose
    /// run keys have writes in flight is not planned at all).
    fn missed_read_back(&self, run: &RunRef<'_>) -> Option<i64> {
        let seen = self.ctx.view.run(self.task, &run.id())?;
        (seen.phase() == RunPhase::Missed).then(|| seen.intent_offset()).flatten()
    }

    /// Whether `run`, `missed`, is known never to have started: the leader's verdict is read
    /// back, and a read of every topic to its end completed after it, so a start record its
    /// runner wrote while the verdict was under way would be in the view (and the run would not
    /// read `missed`: see `LogView`'s phase of a run). Its next attempt waits until then:
    /// launched at once, it ran the slot a second time beside a run whose node came back and
    /// confirmed it just before the verdict landed.
    fn missed_confirmed(&self, run: &RunRef<'_>) -> bool {
        self.missed_read_back(run).is_some_and(|offset| offset < self.ctx.intents_synced_below)
    }

    fn run(&mut self) {
        self.judge_runs_of_gone_nodes();
        self.restamp_unsettled();
        let Some(spec) = self.spec else {
            match self.ctx.view.invalid.get(self.task) {
                // Its newest definition is invalid: nothing of it runs, its history stays.
                Some(invalid) => {
                    let reason = format!("the task's definition is invalid: {}", invalid.reason);
                    self.stop_all(&reason);
                    self.trim_history();
                    self.suspend_position();
                }
                None => self.forget(),
            }
            return;
        };
        let desired = self.ctx.view.desired_state(self.task);
        if desired == DesiredState::Stopped {
            self.stop_all("the task was killed");
        }
        if spec.spec.kind() == TaskKind::Once {
            self.stop_where(
                |intent| intent.trigger != Trigger::Once { revision: spec.revision },
                "superseded",
            );
        }
        self.trim_history();
        if self.service_copy_blocks(spec) {
            // A service copy of an earlier revision may still run (see `leader::handoff`):
            // nothing new starts until its node lets go of it.
            return;
        }
        match spec.spec.kind() {
            TaskKind::Periodic => self.periodic(spec, desired),
            TaskKind::Once => self.once(spec, desired),
            TaskKind::Service => {}
        }
    }

    /// A task failed for its revision (see [`crate::leader::failure`]): its runs are judged and
    /// stopped, its history trimmed, a one-shot's outcome set; nothing new is launched.
    fn fail(&mut self, reason: &str) {
        self.judge_runs_of_gone_nodes();
        self.restamp_unsettled();
        self.stop_all(reason);
        self.trim_history();
        if self.spec.is_some_and(|spec| spec.spec.kind() == TaskKind::Periodic) {
            self.suspend_position();
        }
        if let Some(spec) = self.spec.filter(|spec| spec.spec.kind() == TaskKind::Once) {
            let before = self.ctx.view.scheds.get(self.task).map(|entry| &entry.sched);
            let mut sched = match before {
                Some(sched) if sched.spec_revision == spec.revision => sched.clone(),
                _ => Sched::fresh(self.ctx.epoch, self.task.clone(), spec.revision),
            };
            if sched.outcome.is_none() {
                sched.outcome = Some(Outcome { state: RunPhase::Failed, reason: Some(reason.to_owned()) });
            }
            self.write_sched(sched, before);
        }
    }

    /// A periodic position is held as suspended while the task cannot run, so the slots of that
    /// time are not caught up once a valid revision comes (as after `resume`).
    fn suspend_position(&mut self) {
        let Some(stored) = self.ctx.view.scheds.get(self.task).map(|entry| &entry.sched) else { return };
        if stored.suspended_at_ms.is_some() || stored.decided_through_ms.is_none() {
            return;
        }
        let before = self.position(stored);
        let sched = Sched { suspended_at_ms: Some(ms(self.ctx.now)), queued: None, ..before };
        self.write_sched(sched, Some(stored));
    }

    /// Whether a copy of a service revision of this task may still run and keeps new runs from
    /// starting: read off the task's assignment as the leader's reconciliation reads it (the
    /// copy of an `assigned` service placement counts, so a switch to a periodic or one-shot
    /// revision waits in the very step that hands the service off).
    /// The instances of an earlier revision run as instances (`<task>@<n>`) count the same.
    fn service_copy_blocks(&self, spec: &SpecEntry) -> bool {
        use crate::leader::handoff;
        let next_keep = spec.spec.on_disconnect == OnDisconnect::Keep;
        let (view, live, may_still_run) = (self.ctx.view, &self.load.live, self.ctx.may_still_run);
        std::iter::once(self.task).chain(view.assigned_instances(self.task)).any(|task| {
            let Some(entry) = view.assignments.get(task) else { return false };
            let left = handoff::left(view, task, &entry.assignment, live, may_still_run);
            left.iter().any(|holder| handoff::blocks(holder, live, may_still_run, next_keep))
        })
    }

    /// The `assignments` key of run `id`'s intent (its seat's, else its run id's).
    fn intent_key(&self, id: Uuid) -> String {
        self.runs.get(&id).and_then(|run| run.intent_key()).unwrap_or_else(|| key::run(self.task, id))
    }

    /// A seat for a new run's intent while seats are used (see [`Context::run_seats`]): the
    /// seat of the oldest run leaving the history in this step (that run's intent is overwritten:
    /// it leaves the plan's view as it will leave the log's), else the lowest seat no run of
    /// the task holds and whose key is settled and has no write in flight; `None` when every
    /// seat is taken (keyed by its run id, as without seats).
    fn take_seat(&mut self, slot: Option<i64>) -> Option<u16> {
        if !self.ctx.run_seats {
            return None;
        }
        // A run whose slot implies the position leaves only for a slot at least as new as the
        // newest held: the newest slot of the intents never goes back.
        let newest = self.newest_slot();
        let later = slot.is_some_and(|slot| newest.is_none_or(|newest| slot >= newest));
        if let Some(at) = self.leaving.iter().position(|(_, _, implies)| !implies || later)
            && let Some((leaving, seat, _)) = self.leaving.remove(at)
        {
            self.runs.entry(leaving).intent = None;
            return Some(seat);
        }
        // A seat is free when no run's intent holds it (a report left there, its run gone, is
        // overwritten like any earlier run's) and nothing is under way on it: no write in
        // flight, no record past the leader's accepted one, no deletion waiting for its
        // tombstone (which would land over the new run's records).
        let held = self.seats_held();
        let view = self.ctx.view;
        (0..SEATS_PER_TASK.min(shiva_proto::runs::MAX_SEATS))
            .filter_map(|seat| u16::try_from(seat).ok())
            .find(|seat| {
                let key = key::run_seat(self.task, *seat);
                !held.contains(seat)
                    && [TopicKind::Assignments, TopicKind::Status].into_iter().all(|topic| {
                        !self.busy(topic, &key)
                            && view.is_settled(topic, &key)
                            && !view.is_trimmed(topic, &key)
                            && !view.deleted_markers.get(&topic).is_some_and(|keys| keys.contains(&key))
                    })
            })
    }

    /// The seats the task's runs' intents hold (in the view or written by this step).
    fn seats_held(&self) -> BTreeSet<u16> {
        self.runs.iter().filter_map(|run| run.seat()).collect()
    }

    fn write_intent(&mut self, mut intent: RunIntent) {
        // (A one-shot's attempts stay keyed by run id: a late record over an attempt that
        // succeeded would read it `lost` once its node is gone, and a one-shot tries again.)
        let once = matches!(intent.trigger, Trigger::Once { .. });
        // A run written again keeps its seat (its records are there, not on its run id's keys).
        if intent.seat.is_none()
            && let Some(run) = self.runs.get(&intent.run_id)
            && let Some(seat) = run.seat()
        {
            (intent.seat, intent.status_seen) = (Some(seat), run.status_seen());
        }
        if intent.seat.is_none() && !once && !self.runs.contains_key(&intent.run_id) {
            intent.seat = self.take_seat(intent.trigger.slot_ms());
            // Every record on the seat's `status` key up to here was read: one past it that is
            // not the run's own overwrote it (see `RunIntent::status_seen`).
            let read = self.ctx.view.positions.get(&TopicKind::Status).copied().unwrap_or(0);
            intent.status_seen = intent.seat.map(|_| read.saturating_sub(1));
        }
        let key = key::intent(&intent);
        let entry = self.runs.entry(intent.run_id);
        let offset = entry.intent.as_ref().map_or(-1, |(_, offset)| *offset);
        entry.intent = Some((intent.clone(), offset));
        self.writes.push(Write::assignments(key, Some(Body::RunIntent(intent))));
    }

    /// Runs not over, with an intent naming a node.
    fn in_flight(&self) -> Vec<Uuid> {
        self.runs.iter().filter(|run| run.in_flight_on().is_some()).map(|run| run.id()).collect()
    }

    /// The runs the overlap policy counts as running: those in flight, and those judged
    /// `missed` whose verdict is not read back yet (written in this plan, or under way): a run
    /// whose start record crossed the verdict may be running, and a serial task must not start
    /// beside it. (Not until a read to the end confirms the verdict, as for its next attempt:
    /// a new leader restamps old verdicts, and each would hold its task's slots back again.)
    fn running(&self) -> Vec<Uuid> {
        (self.runs.iter())
            .filter(|run| {
                run.in_flight_on().is_some()
                    || (run.phase() == RunPhase::Missed && self.missed_read_back(run).is_none())
            })
            .map(|run| run.id())
            .collect()
    }

    /// The revision a run runs (its intent's spec) governs how long its silent node may still
    /// run it, not the task's newest spec.
    fn judge_runs_of_gone_nodes(&mut self) {
        let gone: Vec<(RunIntent, bool)> = self
            .runs
            .iter()
            .filter(|run| !run.is_final())
            .filter_map(|run| {
                let (node, spec) = (run.node()?, run.spec()?);
                let exclusive = spec.on_disconnect == OnDisconnect::Stop;
                let held = exclusive && (self.ctx.may_still_run)(node, spec.stop_grace);
                if self.load.is_live(node) || held {
                    return None;
                }
                Some((run.intent()?.into_owned(), run.has_report() || run.overwritten()))
            })
            .collect();
        for (mut intent, started) in gone {
            if self.busy(TopicKind::Assignments, &key::intent(&intent)) {
                continue;
            }
            let node = intent.node.clone().map(|node| node.to_string()).unwrap_or_default();
            let (verdict, note) = if started {
                (RunPhase::Lost, format!("node {node} is gone; the run may have started"))
            } else {
                (RunPhase::Missed, format!("node {node} is gone; the run never started"))
            };
            intent.epoch = self.ctx.epoch;
            intent.verdict = Some(verdict);
            intent.note = Some(note);
            self.write_intent(intent);
        }
    }

    /// The task's run intents and position written under an earlier epoch are written again
    /// under this one, within the plan's budget (issue 15, a bounded log): once no accepted
    /// record of an epoch is left, the leader trims its claim (see `leader::trim_claims`). A
    /// key this step already writes (or deletes) is left to that write.
    fn restamp_inherited(&mut self) {
        let epoch = self.ctx.epoch;
        let written: BTreeSet<&str> =
            self.writes[self.first_write..].iter().map(|write| write.key.as_str()).collect();
        // A run its runner reported over is restamped with that end as the leader's verdict:
        // were this write reported failed and yet land late, after the run was trimmed, the
        // intent it brings back is itself over (not an open run a runner would launch again).
        let mut intents: Vec<RunIntent> = self
            .runs
            .iter()
            .filter(|run| run.epoch().is_some_and(|older| older < epoch))
            .filter(|run| run.intent_offset().is_some_and(|offset| offset >= 0))
            .filter(|run| {
                let key = key::intent_key(self.task, run.id(), run.seat());
                !written.contains(key.as_str()) && !(self.ctx.busy)(TopicKind::Assignments, &key)
            })
            .take(self.load.restamps_left)
            .filter_map(|run| {
                let intent = run.intent()?;
                let ended = run.reported().map(|(state, _)| state).filter(|state| state.is_final());
                Some(RunIntent { epoch, verdict: intent.verdict.or(ended), ..intent.into_owned() })
            })
            .collect();
        let sched_key = key::sched(self.task);
        let sched = self
            .ctx
            .view
            .scheds
            .get(self.task)
            .filter(|entry| entry.sched.epoch < epoch)
            .filter(|_| {
                !written.contains(sched_key.as_str()) && !self.busy(TopicKind::Assignments, &sched_key)
            })
            .map(|entry| Sched { epoch, ..entry.sched.clone() });
        if let Some(sched) = sched.filter(|_| intents.len() < self.load.restamps_left) {
            self.load.restamps_left -= 1;
            self.writes.push(Write::assignments(sched_key, Some(Body::Sched(sched))));
        }
        self.load.restamps_left = self.load.restamps_left.saturating_sub(intents.len());
        for intent in intents.drain(..) {
            self.write_intent(intent);
        }
    }

    /// A run intent on which something else landed after the leader's write is written again,
    /// so compaction keeps the leader's.
    fn restamp_unsettled(&mut self) {
        let prefix = key::runs_of(self.task);
        let unsettled: Vec<RunIntent> = self
            .ctx
            .view
            .unsettled(TopicKind::Assignments, &prefix)
            .filter(|key| !self.busy(TopicKind::Assignments, key))
            .filter_map(|key| key::run_key(key).filter(|(task, _)| task == self.task))
            .filter_map(|(_, named)| match named {
                key::RunKey::Id(id) => self.runs.get(&id).filter(|run| run.seat().is_none()),
                key::RunKey::Seat(seat) => self.runs.iter().find(|run| run.seat() == Some(seat)),
            })
            .filter(|run| run.intent_offset().is_some_and(|offset| offset >= 0))
            .filter_map(|run| run.intent())
            .map(|intent| RunIntent { epoch: self.ctx.epoch, ..intent.into_owned() })
            .collect();
        for intent in unsettled {
            self.write_intent(intent);
        }
    }

    fn stop_where(&mut self, pick: impl Fn(&RunIntent) -> bool, reason: &str) {
        let targets: Vec<RunIntent> = self
            .in_flight()
            .into_iter()
            .filter_map(|id| self.runs.get(&id)?.intent().map(|intent| intent.into_owned()))
            .filter(|intent| intent.stop.is_none() && pick(intent))
            .filter(|intent| !self.busy(TopicKind::Assignments, &key::intent(intent)))
            .collect();
        for mut intent in targets {
            intent.epoch = self.ctx.epoch;
            intent.stop = Some(reason.to_owned());
            self.write_intent(intent);
        }
    }

    fn stop_all(&mut self, reason: &str) {
        self.stop_where(|_| true, reason);
    }

    /// Finished runs beyond [`HISTORY`] (or all of them, once the task is deleted) are
    /// tombstoned on both topics.
    fn trim_history(&mut self) {
        // A report whose intent is gone is an orphan, whatever state it says (a run judged
        // `lost` while its report said `running` kept that report for ever once its intent was
        // trimmed; a leader that died between the two deletions; a runner's late word): it goes
        // once a read to the end after it confirms the intent is gone (not merely unread:
        // `Context::reports_synced_below`). (An intent this leader wrote and has not read back
        // is busy, not gone.)
        let synced_below = self.ctx.reports_synced_below;
        // A report on a seat is deleted only once the task is gone, and no run's intent holds
        // the seat: while it is defined, the next run on the seat overwrites it. (A deletion of
        // a seat's `status` key would land over a later run's records there, its tombstone
        // written again at any step, a deposed leader's late: that run would lose its start
        // record.)
        let defined = self.spec.is_some() || self.ctx.view.invalid.contains_key(self.task);
        let seated = self.seats_held();
        let orphans: Vec<Uuid> = self
            .runs
            .iter()
            .filter(|run| {
                !run.has_intent() && run.report_offset().is_some_and(|offset| offset < synced_below)
            })
            .filter(|run| run.report_seat().is_none_or(|seat| !defined && !seated.contains(&seat)))
            .map(|run| run.id())
            // An intent a `trim` record deleted is gone from the log only once its tombstone is
            // in: were the `trim` record itself lost before (a stray tombstone on its key), a
            // reader of the compacted log would find the intent again, and without its report,
            // a run that never started.
            .filter(|id| !self.ctx.view.is_trimmed(TopicKind::Assignments, &key::run(self.task, *id)))
            .collect();
        // An intent on a seat that a `trim` record deleted waits for its tombstone under its
        // seat's key, not its run's: no orphan of the task goes meanwhile (seats on or not:
        // they may have been turned off since).
        let waiting = self.ctx.view.trimmed_runs_of(self.task);
        for id in orphans.into_iter().filter(|_| !waiting) {
            let seat = self.runs.get(&id).and_then(|run| run.report_seat());
            let key = key::intent_key(self.task, id, seat);
            if !self.busy(TopicKind::Assignments, &key) && !self.busy(TopicKind::Status, &key) {
                self.writes.extend(Write::delete(TopicKind::Status, key, self.ctx.epoch));
            }
        }
        // While an intent a `trim` record deleted waits for its tombstone (its write failed),
        // nothing more of the task is trimmed: the intent is out of the view but not out of the
        // log, and were the `trim` record lost, a reader of the compacted log would find it,
        // without a later attempt of its trigger trimmed meanwhile (see the attempts, below).
        // The leader writes the tombstone again at each step.
        if self.ctx.view.trimmed_runs_of(self.task) {
            return;
        }
        let keep = if defined { HISTORY } else { 0 };
        // The intents of slots past the stored position imply the position (see `position`):
        // they stay until it is written past them (at most `CHECKPOINT_LAUNCHES` of them), so
        // neither this leader nor an older one reads the position back to before a slot that ran.
        // Up to `CHECKPOINT_LAUNCHES` of them count toward the history kept all the same (in
        // steady state they are its newest runs): each launch past a full history trims one
        // run, not fifty at each position written (200 records a task in one step, and 150 runs
        // kept in between). No more than that: the slot runs of an earlier periodic revision
        // imply for ever under a one-shot's fresh position, and must not crowd out the
        // one-shot's own attempts.
        let sched = self.ctx.view.scheds.get(self.task).map(|entry| &entry.sched);
        let stored = sched.and_then(|sched| sched.decided_through_ms);
        let implying = |run: &RunRef<'_>| {
            defined && run.slot_ms().is_some_and(|slot| stored.is_none_or(|stored| slot > stored))
        };
        // A one-shot's current attempt whose end is not recorded in its position yet (the task
        // was killed meanwhile, say) stays too, whatever its offset: gone, it would be launched
        // again (see `once_step`). Offsets are no measure of age once a new leader restamped.
        let current = sched.and_then(|sched| {
            let waiting =
                defined && sched.attempt > 0 && sched.outcome.is_none() && sched.next_at_ms.is_none();
            let trigger = Trigger::Once { revision: sched.spec_revision };
            waiting.then(|| run_id(self.task, trigger, sched.attempt))
        });
        // The attempts of one trigger leave lowest first, and none above an attempt still open:
        // a run that never started is launched again as its next attempt when that attempt is
        // not in the view (see `relaunch_missed`), so a later attempt trimmed before it (a new
        // leader's restamps give it the lower offset) would run its slot twice.
        let mut open_from: BTreeMap<Trigger, u32> = BTreeMap::new();
        for run in self.runs.iter().filter(|run| !run.is_final()) {
            if let (Some(trigger), Some(attempt)) = (run.trigger(), run.attempt()) {
                let lowest = open_from.entry(trigger).or_insert(attempt);
                *lowest = (*lowest).min(attempt);
            }
        }
        // With seats, a run past the stored position leaves too, but only with its seat taken
        // by a later slot's intent (see `take_seat`): the position the intents imply never
        // goes back, and it is not written every `CHECKPOINT_LAUNCHES` launches.
        let seats = self.ctx.run_seats && defined;
        let mut implies_position = BTreeSet::new();
        // (Only the newest slot's run keeps a position the stored one is behind: the runs of
        // older slots may leave for any run, its intent taking their seat.)
        let newest = self.newest_slot();
        let (mut finished, mut implied) = (Vec::new(), 0);
        for run in self.runs.iter().filter(|run| run.is_final() && Some(run.id()) != current) {
            if seats && implying(&run) && run.slot_ms() == newest {
                implies_position.insert(run.id());
            }
            match (implying(&run) && !seats, run.intent_offset()) {
                (true, _) => implied += 1,
                (false, Some(offset)) => {
                    let (trigger, attempt) = (run.trigger(), run.attempt().unwrap_or(0));
                    if trigger.and_then(|trigger| open_from.get(&trigger)).is_some_and(|open| *open < attempt)
                    {
                        continue;
                    }
                    finished.push((trigger, attempt, offset, run.id()));
                }
                (false, None) => {}
            }
        }
        let keep = keep.saturating_sub(implied.min(CHECKPOINT_LAUNCHES));
        if finished.len() <= keep {
            return;
        }
        // A handful at a time, in one `trim` record (see `TRIM_EVERY`); without waiting once
        // the task is gone. A defined task's runs are never held back by the plan's budget:
        // however many tasks and however seldom the leader plans, no history grows. A deleted
        // task's whole history leaves within what the plan has left (see `TRIMS_PER_PLAN`).
        let excess = finished.len() - keep;
        // (With seats, a defined task's runs leave one at a launch, by being overwritten: no
        // record of their own to share.)
        if self.ctx.batched_trim && defined && !seats && excess < trim_every(self.task, self.ctx.trim_every) {
            return;
        }
        let excess = if defined { excess } else { excess.min(self.load.trims_left) };
        // Oldest first by offset, each trigger's attempts together from the lowest, taking the
        // trigger's lowest offset as its place.
        let mut first_offset: BTreeMap<Trigger, i64> = BTreeMap::new();
        for (trigger, _, offset, _) in &finished {
            if let Some(trigger) = trigger {
                let first = first_offset.entry(*trigger).or_insert(*offset);
                *first = (*first).min(*offset);
            }
        }
        let mut finished: Vec<(i64, Option<Trigger>, u32, Uuid)> = finished
            .into_iter()
            .map(|(trigger, attempt, offset, id)| {
                (trigger.map_or(offset, |trigger| first_offset[&trigger]), trigger, attempt, id)
            })
            .collect();
        finished.sort();
        // One attempt of a trigger per step: two deletions are two writes, and were the lower
        // one's to fail while the higher one's landed, the higher attempt would be launched
        // again (the same reason as above). The next step trims the next.
        let mut triggers = BTreeSet::new();
        let finished =
            finished.into_iter().filter(|(_, trigger, _, _)| trigger.is_none_or(|t| triggers.insert(t)));
        for (_, _, _, id) in finished.take(excess) {
            if !defined {
                self.load.trims_left -= 1;
            }
            // A run on a seat leaves when the step's next new run takes its seat (see
            // `take_seat`); until then it stays, and is picked again at the next step. (Its
            // runner's word may still come, a late end: it would overwrite the next run's
            // records, and that run's runner writes its own again, see `RunIntent::status_seen`.)
            let implies = implies_position.contains(&id);
            if let Some(seat) = self.runs.get(&id).and_then(|run| run.seat()).filter(|_| seats)
                && (implies || self.leaving.len() < LEAVING_PER_STEP)
            {
                self.leaving.push_back((id, seat, implies));
                continue;
            }
            // (One keyed by its run id that implies the position stays until the position is
            // written past it, see `write_position`.)
            if implies {
                continue;
            }
            let key = self.intent_key(id);
            if self.runs.get(&id).and_then(|run| run.intent_offset()).is_some_and(|offset| offset >= 0)
                && !self.busy(TopicKind::Assignments, &key)
            {
                self.writes.extend(Write::delete(TopicKind::Assignments, key.clone(), self.ctx.epoch));
            }
            // The report goes only once the intent is gone (an orphan, above, at a later step):
            // were the intent's deletion refused (a deposed leader's, read after the next
            // claim) while the report's, on another topic, is accepted, an intent with no
            // report would be an open run again, and its runner would launch an old slot a
            // second time (seen in the chaos test).
        }
    }

    /// The task was deleted: stop its runs, then forget its history, position and requests.
    fn forget(&mut self) {
        self.stop_all("the task was deleted");
        // The position its intents imply is written before they go: should the task be
        // submitted again before its position is deleted, its slots count on from there, not
        // from a stored position as old as the task (with seats, never checkpointed).
        if let Some(stored) = self.ctx.view.scheds.get(self.task).map(|entry| &entry.sched) {
            let implied = self.position(stored);
            if implied.decided_through_ms != stored.decided_through_ms {
                self.write_sched(implied, Some(stored));
                return;
            }
        }
        self.trim_history();
        if !self.in_flight().is_empty() {
            return;
        }
        let sched = key::sched(self.task);
        if self.ctx.view.scheds.contains_key(self.task) {
            self.writes.extend(Write::delete(TopicKind::Assignments, sched, self.ctx.epoch));
        }
        for request in self.ctx.view.requests.get(self.task).into_iter().flat_map(|r| r.keys()) {
            let key = key::request(self.task, *request);
            if !self.busy(TopicKind::Commands, &key) {
                self.writes.extend(Write::delete(TopicKind::Commands, key, self.ctx.epoch));
            }
        }
    }

    fn new_intent(&self, spec: &SpecEntry, due: Due, node: Option<NodeId>, launch_at: i64) -> RunIntent {
        RunIntent {
            epoch: self.ctx.epoch,
            task: self.task.clone(),
            run_id: run_id(self.task, due.trigger, due.attempt),
            attempt: due.attempt,
            trigger: due.trigger,
            incarnation: node
                .as_ref()
                .and_then(|node| self.load.live.get(node))
                .map(|member| member.incarnation),
            node,
            launch_at_ms: launch_at,
            written_at_ms: Some(ms(self.ctx.now)),
            spec_revision: spec.revision,
            spec: std::sync::Arc::new(spec.spec.clone()),
            stop: None,
            verdict: None,
            note: None,
            seat: None,
            status_seen: None,
        }
    }

    fn exists(&self, due: Due) -> bool {
        let id = run_id(self.task, due.trigger, due.attempt);
        self.runs.contains_key(&id) || self.busy(TopicKind::Assignments, &key::run(self.task, id))
    }

    /// Launches `due` on an eligible node. False: no eligible runner.
    fn launch(&mut self, spec: &SpecEntry, due: Due, launch_at: i64) -> bool {
        let Some(node) = self.load.pick(&spec.spec.tags) else { return false };
        let intent = self.new_intent(spec, due, Some(node), launch_at);
        self.write_intent(intent);
        true
    }

    /// Applies the overlap policy to a due run. Returns whether it was launched.
    fn on_due(&mut self, spec: &SpecEntry, sched: &mut Sched, due: Due, launch_at: i64) -> bool {
        let in_flight = self.running();
        match on_due(spec.spec.overlap, &in_flight, sched.queued.is_some()) {
            OverlapAction::Launch => self.launch(spec, due, launch_at),
            OverlapAction::Skip => {
                let mut intent = self.new_intent(spec, due, None, launch_at);
                intent.verdict = Some(RunPhase::Skipped);
                intent.note = Some(format!(
                    "a previous run was still running (overlap: {})",
                    spec.spec.overlap.as_str()
                ));
                self.write_intent(intent);
                sched.skipped = sched.skipped.saturating_add(1);
                false
            }
            OverlapAction::Replace(_) => {
                self.stop_all("replaced by a newer run (overlap: replace)");
                sched.queued = Some(due);
                false
            }
            OverlapAction::Queue => {
                sched.queued = Some(due);
                false
            }
        }
    }

    fn write_sched(&mut self, sched: Sched, before: Option<&Sched>) {
        let key = key::sched(self.task);
        let settled = self.ctx.view.is_settled(TopicKind::Assignments, &key);
        if before == Some(&sched) && settled {
            return;
        }
        let sched = Sched { epoch: self.ctx.epoch, ..sched };
        self.writes.push(Write::assignments(key, Some(Body::Sched(sched))));
    }

    /// The slots this task has a launch intent of (in the view or written by this step).
    fn intent_slots(&self) -> impl Iterator<Item = i64> + '_ {
        self.runs.iter().filter_map(|run| run.slot_ms())
    }

    /// The newest of [`TaskPlan::intent_slots`].
    fn newest_slot(&self) -> Option<i64> {
        self.intent_slots().max()
    }

    /// A periodic task's position: its `sched/` record, whose `decided_through_ms` moves on to
    /// the newest slot launched since (issue 21: a launch does not rewrite the position, the
    /// launch intent implies it; a slot is launched only once decided).
    fn position(&self, stored: &Sched) -> Sched {
        let newest = self.newest_slot();
        let decided_through_ms = match (stored.decided_through_ms, newest) {
            (Some(stored), Some(newest)) => Some(stored.max(newest)),
            (stored, newest) => stored.or(newest),
        };
        Sched { decided_through_ms, ..stored.clone() }
    }

    /// Writes a periodic task's position unless this step's launch intents imply it (see
    /// [`TaskPlan::position`]); it is written anyway once [`CHECKPOINT_LAUNCHES`] slots were
    /// launched past the stored one, so a reader that does not imply positions (a leader of an
    /// older version) finds every slot since still held by an intent (the history keeps
    /// [`HISTORY`]).
    fn write_position(&mut self, sched: Sched, stored: Option<&Sched>) {
        if let Some(stored) = stored.filter(|_| self.ctx.lean) {
            let settled = self.ctx.view.is_settled(TopicKind::Assignments, &key::sched(self.task));
            let through = stored.decided_through_ms.unwrap_or(i64::MIN);
            // Counted only when nothing else asks for the write (a walk of the task's runs).
            let launched_past = || self.intent_slots().filter(|slot| *slot > through).count();
            // (With seats no checkpoint: every reader implies the position, and the runs on
            // seats past it leave only for later slots, see `trim_history`; one keyed by its
            // run id past it, from before seats, leaves only once the position is written.)
            let unseated_past = || {
                self.runs
                    .iter()
                    .any(|run| run.seat().is_none() && run.slot_ms().is_some_and(|slot| slot > through))
            };
            if settled
                && sched == self.position(stored)
                && ((self.ctx.run_seats && !unseated_past()) || launched_past() < CHECKPOINT_LAUNCHES)
            {
                return;
            }
        }
        self.write_sched(sched, stored);
    }

    fn periodic(&mut self, spec: &'a SpecEntry, desired: DesiredState) {
        let Some(schedule) = self.ctx.schedules.get(spec) else { return };
        let now = self.ctx.now;
        let stored = self.ctx.view.scheds.get(self.task).map(|entry| &entry.sched);
        let implied = stored.map(|stored| self.position(stored));
        let before = implied.as_ref();
        let mut sched = before.cloned().unwrap_or_else(|| Sched {
            // The origin of its slots, recorded in this first sched record (see `origin`).
            origin_ms: Some(origin(spec.submitted_ms, ms(now))),
            decided_through_ms: Some(origin(spec.submitted_ms, ms(now))),
            ..Sched::fresh(self.ctx.epoch, self.task.clone(), spec.revision)
        });
        sched.spec_revision = spec.revision;
        if desired != DesiredState::Running {
            // Suspended or killed: nothing new, and slots meanwhile are not caught up later.
            if sched.suspended_at_ms.is_none() {
                sched.suspended_at_ms = Some(ms(now));
                sched.queued = None;
            }
            self.write_position(sched, stored);
            return;
        }
        let decided = sched.decided_through_ms.map_or(now, at);
        if sched.suspended_at_ms.take().is_some() {
            sched.decided_through_ms = Some(ms(decided.max(now)));
        }
        self.relaunch_missed(spec);
        // (A queued run launched already, its position not written after it, a leader dying
        // in between: not launched again.)
        if sched.queued.is_some_and(|due| self.exists(due)) {
            sched.queued = None;
        }
        if let Some(due) = sched.queued
            && self.running().is_empty()
            && self.launch(spec, due, ms(now))
        {
            sched.queued = None;
        }
        self.requests(spec, &mut sched);
        self.slots(spec, &schedule, &mut sched);
        self.write_position(sched, stored);
    }

    /// A periodic run that never started (its node died or shut down first, and nobody asked
    /// to stop it) runs again as the next attempt of its slot, when the catch-up policy wants
    /// missed slots.
    fn relaunch_missed(&mut self, spec: &SpecEntry) {
        if spec.spec.catch_up == CatchUp::None {
            return;
        }
        let deadline = spec.spec.starting_deadline.map(|deadline| before(self.ctx.now, deadline));
        let missed: Vec<Due> = self
            .runs
            .iter()
            .filter(never_ran)
            .filter(|run| run.phase() != RunPhase::Missed || self.missed_confirmed(run))
            .filter_map(|run| Some((run.trigger()?, run.attempt()?)))
            .filter(|(trigger, _)| match *trigger {
                Trigger::Slot { slot_ms } => deadline.is_none_or(|oldest| at(slot_ms) >= oldest),
                Trigger::Request { .. } => true,
                Trigger::Once { .. } => false,
            })
            .map(|(trigger, attempt)| Due { trigger, attempt: attempt.saturating_add(1) })
            .collect();
        let serial = spec.spec.overlap != Overlap::Allow;
        for due in missed {
            if self.exists(due) {
                continue;
            }
            // Like missed slots caught up: with a serial policy, one at a time, after the
            // current run (the overlap policy would drop it, and it must run once).
            if serial && !self.running().is_empty() {
                return;
            }
            self.launch(spec, due, ms(self.ctx.now));
        }
    }

    fn requests(&mut self, spec: &SpecEntry, sched: &mut Sched) {
        let requests: Vec<Uuid> =
            self.ctx.view.requests.get(self.task).map(|r| r.keys().copied().collect()).unwrap_or_default();
        for request in requests {
            let due = Due { trigger: Trigger::Request { request }, attempt: 1 };
            let key = key::request(self.task, request);
            if self.exists(due) || sched.queued == Some(due) {
                // Decided. The request goes only once what decided it is in the log (its run's
                // intent, or the position that queues it), read back: a write that fails must
                // not leave the request dropped and its run never launched.
                let id = run_id(self.task, due.trigger, due.attempt);
                let landed = self.ctx.view.run(self.task, &id).is_some_and(|run| run.has_intent())
                    || self
                        .ctx
                        .view
                        .scheds
                        .get(self.task)
                        .is_some_and(|entry| entry.sched.queued == Some(due));
                if landed && !self.busy(TopicKind::Commands, &key) {
                    self.writes.extend(Write::delete(TopicKind::Commands, key, self.ctx.epoch));
                }
                continue;
            }
            self.on_due(spec, sched, due, ms(self.ctx.now));
        }
    }

    fn slots(&mut self, spec: &SpecEntry, schedule: &Schedule, sched: &mut Sched) {
        let now = self.ctx.now;
        let jitter_max = u64::try_from(spec.spec.jitter.as_millis()).unwrap_or(u64::MAX);
        let jitter = i64::try_from(jitter_ms(self.task, jitter_max)).unwrap_or(i64::MAX);
        let in_flight = self.running();
        let busy = !in_flight.is_empty() || sched.queued.is_some();
        let serial = spec.spec.overlap != Overlap::Allow;
        // A run launched (or started) well after its instant is backlog: a catch-up, a slot
        // decided late, a runner that came back. With a serial policy the slots after it wait
        // until it ends, and then run one at a time.
        let backlog = in_flight.iter().any(|id| {
            let Some(entry) = self.runs.get(id).map(|run| run.entry()) else { return false };
            let report = entry.report.as_ref().map(|report| &report.report);
            entry.intent.as_ref().is_some_and(|(intent, _)| {
                intent.trigger.slot_ms().is_some_and(|slot| {
                    // When it began, on this leader's clock: its launch instant plus how late the
                    // runner says it started (a duration on the runner's clock alone). An older
                    // runner gives only `started_ms`, its own clock, read as before.
                    // A periodic run's start record alone (no `running` record is written for
                    // it, issue 21) counts as started at its launch instant: its runner launches
                    // it then, having confirmed it ahead.
                    let began = match report {
                        Some(shiva_proto::runs::RunReport { late_ms: Some(late), .. }) => {
                            intent.launch_at_ms.saturating_add((*late).max(0))
                        }
                        Some(report) if report.state == RunPhase::Starting => intent.launch_at_ms,
                        Some(report) => report.started_ms.unwrap_or(ms(now)),
                        None => ms(now),
                    }
                    .max(intent.launch_at_ms);
                    let late = began.saturating_sub(slot.saturating_add(jitter));
                    late > LATE_MS
                })
            })
        });
        if busy && serial && backlog {
            return;
        }
        // While a run is in flight, a slot is decided at its instant, not ahead of it.
        let timing = if busy && serial {
            Timing { lookahead: Duration::ZERO, ..self.ctx.timing }
        } else {
            self.ctx.timing
        };
        let decided = sched.decided_through_ms.map_or(now, at);
        let plan = plan_slots(schedule, &spec.spec, decided, now, timing);
        let missed_until = before(now, self.ctx.timing.tolerance);
        if busy && serial && plan.launch.first().is_some_and(|slot| *slot < missed_until) {
            // Missed slots to catch up: one at a time, after the current run.
            return;
        }
        if !self.load.any_can_run(&spec.spec.tags) {
            // Nobody can run it: the slots stay undecided and follow the catch-up policy.
            return;
        }
        let mut through = plan.decided_through;
        for slot in plan.launch {
            let due = Due { trigger: Trigger::Slot { slot_ms: ms(slot) }, attempt: 1 };
            if self.exists(due) {
                continue;
            }
            let launch_at = ms(slot).saturating_add(jitter).max(ms(now));
            // With a serial policy one slot is decided per run: the next one when this run
            // ends, or at its own instant (and then by the policy).
            if self.on_due(spec, sched, due, launch_at) && serial {
                through = slot;
                break;
            }
        }
        sched.skipped = sched.skipped.saturating_add(plan.skipped as u64);
        sched.decided_through_ms = Some(ms(through.max(decided)));
    }

    fn once(&mut self, spec: &'a SpecEntry, desired: DesiredState) {
        let now = self.ctx.now;
        let before = self.ctx.view.scheds.get(self.task).map(|entry| &entry.sched);
        let fresh = Sched {
            next_at_ms: Some(ms(now)),
            ..Sched::fresh(self.ctx.epoch, self.task.clone(), spec.revision)
        };
        let mut sched = match before {
            Some(sched) if sched.spec_revision == spec.revision => sched.clone(),
            _ => fresh,
        };
        if sched.outcome.is_none() && desired == DesiredState::Running {
            self.once_step(spec, &mut sched);
        }
        self.write_sched(sched, before);
    }

    fn once_step(&mut self, spec: &SpecEntry, sched: &mut Sched) {
        let now = self.ctx.now;
        let trigger = Trigger::Once { revision: spec.revision };
        let Some(next_at) = sched.next_at_ms else {
            let current = run_id(self.task, trigger, sched.attempt);
            let Some(entry) = self.runs.get(&current) else {
                sched.next_at_ms = Some(ms(now));
                return;
            };
            if !entry.is_final() || (entry.phase() == RunPhase::Missed && !self.missed_confirmed(&entry)) {
                return;
            }
            let report = entry.report();
            let report = report.as_ref().map(|entry| &entry.report);
            let end = match entry.phase() {
                RunPhase::TimedOut => RunEnd::TimedOut,
                RunPhase::Lost | RunPhase::Missed | RunPhase::Stopped | RunPhase::Skipped => RunEnd::Lost,
                _ => RunEnd::Exited(
                    report.and_then(|report| report.exit).unwrap_or(ExitInfo { code: None, signal: None }),
                ),
            };
            // The back-off runs from when this leader saw the end, on its own clock: the
            // runner's `ended_ms` is another machine's clock (an hour ahead, it put the retry an
            // hour off). Recorded in `next_at_ms`, so later leaders keep it.
            let ended = ms(now);
            match once_next(&spec.spec, sched.attempt, end) {
                OnceNext::Succeeded => {
                    sched.outcome = Some(Outcome { state: RunPhase::Succeeded, reason: None })
                }
                OnceNext::Failed(reason) => {
                    sched.outcome = Some(Outcome { state: RunPhase::Failed, reason: Some(reason) })
                }
                OnceNext::Retry { delay, .. } => {
                    let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                    sched.next_at_ms = Some(ended.saturating_add(delay_ms));
                }
            }
            return;
        };
        if ms(now) < next_at {
            return;
        }
        for dependency in &spec.spec.after {
            let outcome = self.ctx.view.scheds.get(dependency).and_then(|entry| entry.sched.outcome.as_ref());
            match outcome.map(|outcome| outcome.state) {
                Some(RunPhase::Succeeded) => {}
                Some(_) => {
                    let reason = format!("dependency {dependency} failed");
                    sched.outcome = Some(Outcome { state: RunPhase::Failed, reason: Some(reason) });
                    return;
                }
                None => return,
            }
        }
        let due = Due { trigger, attempt: sched.attempt.saturating_add(1) };
        if self.exists(due) || self.launch(spec, due, ms(now)) {
            sched.attempt = due.attempt;
            sched.next_at_ms = None;
        }
    }
}

/// Whether a run certainly never ran, and not because the leader stopped it: `missed` (its node
/// was gone before the start record), or `stopped` by its runner before starting (the node was
/// shutting down, or found the leader's `missed` verdict when confirming).
fn never_ran(run: &RunRef<'_>) -> bool {
    match run.phase() {
        RunPhase::Missed => true,
        RunPhase::Stopped => {
            !run.stop_requested() && run.reported().is_some_and(|(_, started_ms)| started_ms.is_none())
        }
        _ => false,
    }
}

mod overlay;
#[cfg(test)]
mod tests;
