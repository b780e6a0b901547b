//! The runner's run lifecycle, pure: `RunBook::on_event(event, now_ms) -> actions`. For each
//! launch intent naming this node: write the start record ahead of the instant, read the log to
//! its end to confirm the intent is still current, then launch at the instant; stop a launched
//! run when its intent asks to or the leader judged it; end the runs it will not launch.
//!
//! Invariants:
//! * a run is launched only after its start record was acknowledged and a read to the end begun
//!   after that confirmed it (see [`super::confirm`]), so a run whose node dies can be judged:
//!   with a start record it may have run (`lost`), without one it never did (`missed`);
//! * an exclusive run starts only while the node may start exclusive work (fence open, return
//!   acknowledged), never beside this node's own service copy of the task;
//! * a run an earlier incarnation of this node started is `lost` (its children died with it).
//!
//! The driver performs the actions (writes, reads to the end, launches, stop signals) and feeds
//! their outcomes back as events; the clock is read once per event, by the driver.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use shiva_proto::runs::{RunIntent, RunPhase, RunReport, Trigger};
use shiva_proto::spec::OnDisconnect;
use shiva_proto::{LogView, NodeId, TaskId};
use uuid::Uuid;

use super::{Confirm, confirm};
use crate::supervisor::oneshot;

/// How long before its instant a run's start record is written and confirmed, at least.
pub const START_LEAD: Duration = Duration::from_millis(150);
/// At most (intents arrive about a second ahead).
pub const MAX_START_LEAD: Duration = Duration::from_millis(800);
/// How late (ms past its instant, on this runner's clock) a run whose start record the node's
/// previous process wrote but never launched may still be launched by the next one: the
/// scheduler's tolerance for a late start (`TIMING.tolerance`).
pub const RELAUNCH_WITHIN_MS: i64 = 2_000;
/// How often held runs that the log no longer holds are forgotten.
const PRUNE_EVERY_MS: i64 = 5_000;
/// How far back the lead remembers the slowest confirmation (about: it is kept by spans of
/// [`LEAD_BUCKET_MS`]): a broker that stalls now and then (a compaction, a checkpoint, a pause)
/// does so again within minutes. The lead once followed the last 32 confirmations instead: about
/// 2 s for a node running 17 runs a second, half an hour at one run a minute.
pub const LEAD_MEMORY_MS: i64 = 300_000;
/// The lead's memory is kept as the slowest confirmation of each span this long.
pub const LEAD_BUCKET_MS: i64 = 10_000;

/// When this runner launches `intent`, on its own clock, having first seen it at `seen_ms`: the
/// leader's `launch_at_ms` read on this runner's clock, held between the moment it saw the intent
/// and the leader's own lead after it (`launch_at_ms - written_at_ms`, both on the leader's
/// clock). So a runner whose clock is behind the leader's does not delay a run by its offset (it
/// did, by the whole offset: an hour behind, an hour late); one in step launches at the instant
/// even when it read the intent late; one ahead starts early by its offset, at most by the lead
/// (about 1 s for a slot). An intent of an older leader (no `written_at_ms`) is launched at
/// `launch_at_ms` as before. Total on any input.
pub fn launch_at(intent: &RunIntent, seen_ms: i64) -> i64 {
    match intent.written_at_ms {
        Some(written) => {
            let lead = intent.launch_at_ms.saturating_sub(written).max(0);
            intent.launch_at_ms.clamp(seen_ms, seen_ms.saturating_add(lead))
        }
        None => intent.launch_at_ms,
    }
}

/// The lead for the next start records: twice the slowest confirmation (write, then read to the
/// end) of the last [`LEAD_MEMORY_MS`], within bounds. A loaded or stalling broker makes
/// confirmations slow; starting earlier keeps launches on time, at the price of a longer window
/// in which a node's death leaves a run `lost` rather than `missed`.
///
/// Invariants: span starts increase by at least [`LEAD_BUCKET_MS`] and lie within the last
/// [`LEAD_MEMORY_MS`] of the newest clock reading, so at most `LEAD_MEMORY_MS / LEAD_BUCKET_MS`
/// spans are kept; a clock set back drops the spans it now places in the future (the lead may
/// then forget a stall early, never keep one for longer); total on any clock and any duration.
#[derive(Debug, Default)]
pub struct Confirms {
    /// (start of the span, slowest confirmation in it, ms), oldest first.
    spans: VecDeque<(i64, u64)>,
}

impl Confirms {
    /// A confirmation that took `took_ms`, at `now_ms`.
    pub fn record(&mut self, now_ms: i64, took_ms: u64) {
        while self.spans.back().is_some_and(|(start, _)| *start > now_ms) {
            self.spans.pop_back();
        }
        match self.spans.back_mut() {
            Some((start, slowest)) if now_ms.saturating_sub(*start) < LEAD_BUCKET_MS => {
                *slowest = (*slowest).max(took_ms);
            }
            _ => self.spans.push_back((now_ms, took_ms)),
        }
        while self.spans.front().is_some_and(|(start, _)| now_ms.saturating_sub(*start) >= LEAD_MEMORY_MS) {
            self.spans.pop_front();
        }
    }

    /// The lead at `now_ms`: spans in its last [`LEAD_MEMORY_MS`] count, none in its future.
    pub fn lead(&self, now_ms: i64) -> Duration {
        let slowest = self
            .spans
            .iter()
            .filter(|(start, _)| (0..LEAD_MEMORY_MS).contains(&now_ms.saturating_sub(*start)))
            .map(|(_, slowest)| *slowest)
            .max()
            .unwrap_or(0);
        Duration::from_millis(slowest.saturating_mul(2)).clamp(START_LEAD, MAX_START_LEAD)
    }

    #[cfg(test)]
    pub fn spans(&self) -> usize {
        self.spans.len()
    }
}

/// The offset of the record of another run that overwrote `run` on its seat (the newest report
/// on the seat's `status` key), when `run` reads overwritten.
fn overwritten_by(view: &LogView, task: &TaskId, run: &shiva_proto::view::RunRef<'_>) -> Option<i64> {
    if !run.overwritten() {
        return None;
    }
    let holder = view.report_on_seat(task, run.seat()?)?;
    view.run(task, &holder)?.report_offset()
}

/// Whether a run's `running` record is written, `lean` when every live leader-capable node has
/// the `lean_runs` feature. A periodic run's is not then (issue 21: three records per run, its
/// intent, start record and end): its end record carries its pid, start and lateness, and its
/// start record already tells a new leader it may have run. A one-shot's always is (a batch job
/// may run for hours; its pid is worth seeing meanwhile), and every run's is while an older
/// leader may lead (it takes a run without one for late).
pub fn writes_running(report: &RunReport, lean: bool) -> bool {
    report.state != RunPhase::Running || !lean || matches!(report.trigger, Trigger::Once { .. })
}

/// What happened.
pub enum Event<'a> {
    /// A step over the log (`token`: for a read to the end, should one be needed).
    Step {
        /// The log view.
        view: &'a LogView,
        /// This node.
        me: &'a NodeId,
        /// This node's incarnation: an intent naming another incarnation of its id is not its,
        /// unless `listed` (see [`crate::runner::names_me`]).
        incarnation: Uuid,
        /// The leader's `members` record lists this incarnation for its id.
        listed: bool,
        /// Exclusive runs may start (fence open, latest return acknowledged).
        may_start_exclusive: bool,
        /// Whether this node holds a service copy of the task.
        beside: &'a dyn Fn(&TaskId) -> bool,
        /// Whether this node's earlier process left this run running (taken back, not lost).
        adopted: &'a dyn Fn(&Uuid) -> bool,
        /// Whether this node's earlier process may have launched this run (by its journal).
        launched_before: &'a dyn Fn(&Uuid) -> bool,
        /// A fresh read-to-end token.
        token: u64,
    },
    /// The start record of `run` was acknowledged (`ok`) or not.
    StartWritten {
        /// The run.
        run: Uuid,
        /// Acknowledged.
        ok: bool,
    },
    /// A read to the end completed.
    Synced {
        /// Its token.
        token: u64,
        /// The log view.
        view: &'a LogView,
        /// This node.
        me: &'a NodeId,
        /// This node's incarnation.
        incarnation: Uuid,
        /// The leader's `members` record lists this incarnation for its id.
        listed: bool,
    },
    /// A read to the end failed: the runs waiting for it wait for the next one.
    SyncFailed {
        /// Its token.
        token: u64,
    },
    /// A launched run reported.
    Reported(RunReport),
    /// The node is shutting down.
    Shutdown {
        /// The log view.
        view: &'a LogView,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this run record (a `starting` one: report its acknowledgement as `StartWritten`).
    Write(RunReport),
    /// Read the log to its end with this token (report it as `Synced`).
    Sync(u64),
    /// Launch this run (its reports come back as `Reported`).
    Launch(Box<RunIntent>),
    /// Go on with this run, taken back from the node's earlier process (its reports come back
    /// as `Reported`).
    Adopt(Box<RunIntent>),
    /// Ask this launched run to stop.
    Stop {
        /// The run.
        run: Uuid,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Start record written at this instant, not acknowledged yet.
    Writing(i64),
    /// Start record acknowledged; a read to the end is wanted.
    Acked(i64),
    /// Waiting for read-to-end `token`.
    Confirming { token: u64, since: i64 },
    /// Launched (or waiting for its instant).
    Launched { stop_sent: bool },
    /// Over, as far as this node is concerned.
    Done,
}

#[derive(Debug, Clone)]
struct Held {
    task: TaskId,
    phase: Phase,
}

/// What a step may do besides following the log.
struct Gates<'a> {
    may_start_exclusive: bool,
    beside: &'a dyn Fn(&TaskId) -> bool,
    adopted: &'a dyn Fn(&Uuid) -> bool,
    launched_before: &'a dyn Fn(&Uuid) -> bool,
}

/// The runs this node holds.
#[derive(Debug, Default)]
pub struct RunBook {
    held: BTreeMap<Uuid, Held>,
    /// When this node first saw each intent of its own not held yet (its clock, ms).
    seen: BTreeMap<Uuid, i64>,
    /// How long recent runs took from start record to confirmation.
    confirms: Confirms,
    pruned_at: i64,
    /// Every live leader-capable node has the `lean_runs` feature (see [`RunBook::set_lean`]).
    lean: bool,
    /// The `running` records left out while lean, of runs not over.
    unwritten: BTreeMap<Uuid, RunReport>,
    /// Runs over here whose records on their seat were overwritten (see
    /// `shiva_proto::view::RunEntry::overwritten`), with the offset of the overwriting record,
    /// whose end (or `lost`) this node wrote again: once per overwriting record.
    repaired: BTreeMap<Uuid, i64>,
    /// Runs this node sees overwritten on their seat, by the record at an offset: confirmed by a
    /// read to the end asked for after it was seen (`None`), or waiting for that read (its
    /// token). A view read one topic ahead of the other sees a run leaving its seat as
    /// overwritten by the next run's records, whose intent it has not read yet: it acts only on
    /// what a read to the end confirms (see `overwrite_confirmed`).
    overwrites: BTreeMap<Uuid, (i64, Option<u64>)>,
    /// The final record this node wrote of each run on a seat still in the view: written again
    /// should a late record of another run overwrite it there (see `repaired`).
    ends: BTreeMap<Uuid, RunReport>,
}

impl RunBook {
    /// Takes in `event` at `now_ms` (the driver's clock, read once).
    pub fn on_event(&mut self, event: Event<'_>, now_ms: i64) -> Vec<Action> {
        let actions = self.on_event_inner(event, now_ms);
        for action in &actions {
            if let Action::Write(report) = action
                && report.state.is_final()
                && report.seat.is_some()
            {
                self.ends.insert(report.run_id, report.clone());
            }
        }
        actions
    }

    fn on_event_inner(&mut self, event: Event<'_>, now_ms: i64) -> Vec<Action> {
        match event {
            Event::Step {
                view,
                me,
                incarnation,
                listed,
                may_start_exclusive,
                beside,
                adopted,
                launched_before,
                token,
            } => {
                let gates = Gates { may_start_exclusive, beside, adopted, launched_before };
                self.step(view, (me, incarnation, listed), gates, token, now_ms)
            }
            Event::StartWritten { run, ok } => {
                if let Some(held) = self.held.get_mut(&run)
                    && let Phase::Writing(since) = held.phase
                {
                    if ok {
                        held.phase = Phase::Acked(since);
                    } else {
                        // Written again at the next step: the same record twice is harmless.
                        self.held.remove(&run);
                    }
                }
                Vec::new()
            }
            Event::Synced { token, view, me, incarnation, listed } => {
                self.synced(token, view, (me, incarnation, listed), now_ms)
            }
            Event::SyncFailed { token } => {
                self.overwrites.retain(|_, (_, waiting)| *waiting != Some(token));
                for held in self.held.values_mut() {
                    if let Phase::Confirming { token: t, since } = held.phase
                        && t == token
                    {
                        held.phase = Phase::Acked(since);
                    }
                }
                Vec::new()
            }
            Event::Reported(report) => {
                if report.state.is_final()
                    && let Some(held) = self.held.get_mut(&report.run_id)
                {
                    held.phase = Phase::Done;
                }
                if report.state.is_final() {
                    self.unwritten.remove(&report.run_id);
                }
                if !writes_running(&report, self.lean) {
                    self.unwritten.insert(report.run_id, report);
                    return Vec::new();
                }
                vec![Action::Write(report)]
            }
            Event::Shutdown { view } => self.shutdown(view),
        }
    }

    /// When the next start record is due, after a step at `now_ms` (`None`: none waits).
    pub fn next_due(&self, view: &LogView, me: &NodeId, now_ms: i64) -> Option<Duration> {
        let lead = i64::try_from(self.confirms.lead(now_ms).as_millis()).unwrap_or(i64::MAX);
        view.open_runs
            .iter()
            .filter(|(_, id)| !self.held.contains_key(id))
            .filter_map(|(task, id)| view.run(task, id))
            .filter(|run| run.node() == Some(me) && !run.stop_requested())
            .filter_map(|run| run.intent())
            .map(|intent| {
                let seen = self.seen.get(&intent.run_id).copied().unwrap_or(now_ms);
                launch_at(&intent, seen).saturating_sub(lead)
            })
            .filter(|at| *at > now_ms)
            .min()
            .map(|at| Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0)))
    }

    /// Sets whether every live leader-capable node has the `lean_runs` feature (the driver, at
    /// each step). Going from lean to not: the `running` records left out of the runs still
    /// going are written now, since a leader of an older version may lead next and takes a run
    /// without one for late.
    pub fn set_lean(&mut self, lean: bool) -> Vec<Action> {
        let was = std::mem::replace(&mut self.lean, lean);
        if !was || lean {
            return Vec::new();
        }
        std::mem::take(&mut self.unwritten).into_values().map(Action::Write).collect()
    }

    /// Runs launched and not reported over.
    pub fn launched(&self) -> usize {
        self.held.values().filter(|held| matches!(held.phase, Phase::Launched { .. })).count()
    }

    /// Whether this node may act on `run` being overwritten by the record at offset `by`: a read
    /// to the end asked for after it saw so has confirmed it. Otherwise asks for one (`token`,
    /// `sync`), once per overwriting record.
    /// (The check asked for goes into `checks`, applied after the walk: a panic in the walk
    /// leaves the book unchanged.)
    fn overwrite_confirmed(
        &self,
        run: Uuid,
        by: i64,
        token: u64,
        checks: &mut Vec<(Uuid, i64, u64)>,
    ) -> bool {
        match self.overwrites.get(&run) {
            Some((seen, None)) if *seen == by => true,
            Some((seen, Some(_))) if *seen == by => false,
            _ => {
                checks.push((run, by, token));
                false
            }
        }
    }

    fn finish(&mut self, intent: &RunIntent, state: RunPhase, message: String) -> Action {
        self.held.insert(intent.run_id, Held { task: intent.task.clone(), phase: Phase::Done });
        Action::Write(oneshot::report(intent, state, Some(message)))
    }

    fn step(
        &mut self,
        view: &LogView,
        (me, incarnation, listed): (&NodeId, Uuid, bool),
        Gates { may_start_exclusive, beside, adopted, launched_before }: Gates<'_>,
        token: u64,
        now: i64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let lead = i64::try_from(self.confirms.lead(now).as_millis()).unwrap_or(i64::MAX);
        // The runs not over, and the launched ones (whose leader may have given up on them).
        let launched = self.held.iter().filter(|(_, held)| matches!(held.phase, Phase::Launched { .. }));
        let candidates: BTreeSet<(TaskId, Uuid)> = view
            .open_runs
            .iter()
            .cloned()
            .chain(launched.map(|(id, held)| (held.task.clone(), *id)))
            .collect();
        // Decided over the whole walk, then applied: a panic in the walk (contained by the
        // driver) leaves the book unchanged rather than changed without its actions.
        let mut changes: Vec<(Uuid, Held)> = Vec::new();
        let mut first_seen: Vec<Uuid> = Vec::new();
        let mut repairs: Vec<(Uuid, i64)> = Vec::new();
        let mut checks: Vec<(Uuid, i64, u64)> = Vec::new();
        for (task, id) in &candidates {
            let Some(run) = view.run(task, id) else { continue };
            // Only the runs whose intent names this node (see `names_me`) are read in full.
            if run.node() != Some(me) {
                continue;
            }
            let entry = run.entry();
            let Some((intent, _)) = entry.intent.as_ref() else { continue };
            if !crate::runner::names_me(intent, me, incarnation, listed) {
                continue;
            }
            if let Some(held) = self.held.get(id) {
                if let Phase::Launched { stop_sent: false } = held.phase
                    && let Some(reason) =
                        intent.stop.clone().or_else(|| intent.verdict.map(|v| v.as_str().to_owned()))
                {
                    changes
                        .push((*id, Held { task: task.clone(), phase: Phase::Launched { stop_sent: true } }));
                    actions.push(Action::Stop { run: *id, reason });
                }
                // Over here, but its records on its seat were overwritten by a late record of
                // another run: it reads as maybe started (open) for every reader, and would hold
                // a serial task's later slots back for good. Its end is written again, once (or,
                // not kept, `lost`: it ran, how it ended is gone).
                if matches!(held.phase, Phase::Done)
                    && let Some(by) = overwritten_by(view, task, &run)
                    && self.repaired.get(id) != Some(&by)
                    && self.overwrite_confirmed(*id, by, token, &mut checks)
                {
                    repairs.push((*id, by));
                    let end = self.ends.get(id).cloned().unwrap_or_else(|| {
                        let message = "its records were overwritten by a late record of another run on its seat; it is over on this node";
                        oneshot::report(intent, RunPhase::Lost, Some(message.into()))
                    });
                    actions.push(Action::Write(end));
                }
                continue;
            }
            if entry.is_final() {
                continue;
            }
            if !self.seen.contains_key(id) {
                first_seen.push(*id);
            }
            let finished = |state, message: String| {
                let done = Held { task: task.clone(), phase: Phase::Done };
                ((*id, done), Action::Write(oneshot::report(intent, state, Some(message))))
            };
            // Only the start record of this incarnation, of a run its earlier process never
            // launched (it died or re-executed before): the run is launched as if it were new.
            // Only while it is still on time (the scheduler's tolerance): later, it is `lost` as
            // before, never started long after its slot beside the runs that followed.
            // (A run whose records on its seat were overwritten may have started: as with a
            // record of its start, whatever this book knows. It holds no run its own process
            // launched (its book would), but an incarnation outlives a process that
            // re-executes, and the journal of launches keeps only runs still open: a run over,
            // then overwritten, is not in it. So it is never started: at worst a run overwritten
            // before it started here is dropped, `lost`.)
            let overwritten = match overwritten_by(view, task, &run) {
                Some(by) if !self.overwrite_confirmed(*id, by, token, &mut checks) => continue,
                by => by.is_some(),
            };
            let reported = entry.report.is_some() || overwritten;
            let never_launched = entry.report.as_ref().is_some_and(|report| {
                report.incarnation == incarnation
                    && report.report.state == RunPhase::Starting
                    && !launched_before(id)
                    && now.saturating_sub(intent.launch_at_ms) <= RELAUNCH_WITHIN_MS
            });
            if reported && adopted(id) {
                // Left running by this node's earlier process: it goes on, held again.
                changes.push((*id, Held { task: task.clone(), phase: Phase::Launched { stop_sent: false } }));
                actions.push(Action::Adopt(Box::new(intent.clone())));
            } else if reported && !never_launched {
                // Started by an earlier process of this node, whose run did not outlive it.
                let message = match overwritten {
                    true => {
                        "its records on its seat were overwritten by a late record of another run; it may have started"
                    }
                    false => "the node restarted during the run",
                };
                let (change, action) = finished(RunPhase::Lost, message.into());
                changes.push(change);
                actions.push(action);
            } else if let Some(reason) = &intent.stop {
                let (change, action) =
                    finished(RunPhase::Stopped, format!("stopped before it started: {reason}"));
                changes.push(change);
                actions.push(action);
            } else if now >= launch_at(intent, self.seen.get(id).copied().unwrap_or(now)).saturating_sub(lead)
            {
                let exclusive = intent.spec.on_disconnect == OnDisconnect::Stop;
                if !beside(task) && (may_start_exclusive || !exclusive) {
                    changes.push((*id, Held { task: task.clone(), phase: Phase::Writing(now) }));
                    actions.push(Action::Write(oneshot::report(intent, RunPhase::Starting, None)));
                }
            }
        }
        self.seen.extend(first_seen.into_iter().map(|id| (id, now)));
        self.held.extend(changes);
        self.repaired.extend(repairs);
        let still = |id: &Uuid| {
            candidates
                .iter()
                .any(|(task, run)| run == id && view.run(task, run).is_some_and(|run| run.overwritten()))
        };
        self.repaired.retain(|id, _| still(id));
        self.overwrites.retain(|id, _| still(id));
        let checking = !checks.is_empty();
        for (run, by, token) in checks {
            self.overwrites.insert(run, (by, Some(token)));
        }
        let acked = self.held.values().any(|held| matches!(held.phase, Phase::Acked(_)));
        if checking || acked {
            actions.push(Action::Sync(token));
        }
        for held in self.held.values_mut() {
            if let Phase::Acked(since) = held.phase {
                held.phase = Phase::Confirming { token, since };
            }
        }
        // Forget runs the log no longer holds (trimmed history), now and then: memory only.
        if now.saturating_sub(self.pruned_at) >= PRUNE_EVERY_MS {
            self.pruned_at = now;
            self.held
                .retain(|id, held| !matches!(held.phase, Phase::Done) || view.run(&held.task, id).is_some());
            self.ends.retain(|id, end| view.run(&end.task, id).is_some());
            let open: BTreeSet<&Uuid> = view.open_runs.iter().map(|(_, id)| id).collect();
            self.seen.retain(|id, _| open.contains(id));
        }
        actions
    }

    fn synced(
        &mut self,
        token: u64,
        view: &LogView,
        (me, incarnation, listed): (&NodeId, Uuid, bool),
        now: i64,
    ) -> Vec<Action> {
        // Overwrites seen before this read to the end are confirmed; the next step acts on
        // those still overwritten by the same record (a later one asks for a read of its own).
        for (_, waiting) in self.overwrites.values_mut() {
            if *waiting == Some(token) {
                *waiting = None;
            }
        }
        let waiting: Vec<(Uuid, i64)> = self
            .held
            .iter()
            .filter_map(|(id, held)| match held.phase {
                Phase::Confirming { token: t, since } if t == token => Some((*id, since)),
                _ => None,
            })
            .collect();
        let mut actions = Vec::new();
        for (id, since) in waiting {
            let task = self.held[&id].task.clone();
            let entry = view.run(&task, &id).map(|run| run.entry());
            let entry = entry.as_deref();
            match confirm(entry, me, incarnation, listed) {
                Confirm::Launch(mut intent) => {
                    // Launched at this runner's instant for it (see `launch_at`).
                    let seen = self.seen.remove(&id).unwrap_or(now);
                    intent.launch_at_ms = launch_at(&intent, seen);
                    self.confirms.record(now, u64::try_from(now.saturating_sub(since)).unwrap_or(0));
                    self.held.insert(id, Held { task, phase: Phase::Launched { stop_sent: false } });
                    actions.push(Action::Launch(intent));
                }
                Confirm::Cancel(reason) => match entry.and_then(|entry| entry.intent.clone()) {
                    Some((intent, _)) => actions.push(self.finish(&intent, RunPhase::Stopped, reason)),
                    None => {
                        self.held.insert(id, Held { task, phase: Phase::Done });
                    }
                },
            }
        }
        actions
    }

    fn shutdown(&mut self, view: &LogView) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut cancel = Vec::new();
        for (id, held) in &self.held {
            match held.phase {
                Phase::Launched { .. } => {
                    actions.push(Action::Stop { run: *id, reason: "the node is shutting down".into() })
                }
                Phase::Writing(_) | Phase::Acked(_) | Phase::Confirming { .. } => {
                    cancel.push((*id, held.task.clone()))
                }
                Phase::Done => {}
            }
        }
        for (id, task) in cancel {
            match view.run(&task, &id).and_then(|entry| entry.intent()) {
                Some(intent) => {
                    let message = "stopped before it started: the node is shutting down".to_owned();
                    actions.push(self.finish(&intent, RunPhase::Stopped, message));
                }
                None => {
                    self.held.insert(id, Held { task, phase: Phase::Done });
                }
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use shiva_proto::records::{Body, Claim, Envelope};
    use shiva_proto::runs::{Trigger, run_id};
    use shiva_proto::topics::key;
    use shiva_proto::{TaskSpec, TopicKind};

    use super::*;

    struct Log {
        view: LogView,
        offset: i64,
        leader: Uuid,
    }

    impl Log {
        fn new() -> Log {
            let mut log = Log { view: LogView::default(), offset: 0, leader: Uuid::new_v4() };
            let claim = Body::Claim(Claim { epoch: 1 });
            log.write(
                TopicKind::Assignments,
                key::claim(1, &NodeId::new("l").unwrap(), Uuid::new_v4()),
                claim,
            );
            log
        }

        fn write(&mut self, topic: TopicKind, key: String, body: Body) {
            let value =
                Envelope { sender: "l".into(), incarnation: Some(self.leader), sent_at_ms: 0, body }.encode();
            self.offset += 1;
            self.view.apply(topic, self.offset, Some(key.as_bytes()), Some(&value));
        }

        fn intent(&mut self, keep: bool, change: impl FnOnce(&mut RunIntent)) -> RunIntent {
            let task = TaskId::new("cron/t").unwrap();
            let trigger = Trigger::Slot { slot_ms: 10_000 };
            let mut spec = TaskSpec::new(task.clone(), "true", vec![]);
            if keep {
                spec.on_disconnect = OnDisconnect::Keep;
            }
            let mut intent = RunIntent {
                epoch: 1,
                task: task.clone(),
                run_id: run_id(&task, trigger, 1),
                attempt: 1,
                trigger,
                node: Some(NodeId::new("me").unwrap()),
                launch_at_ms: 10_000,
                written_at_ms: None,
                spec_revision: 0,
                spec: std::sync::Arc::new(spec),
                stop: None,
                verdict: None,
                note: None,
                incarnation: None,
                seat: None,
                status_seen: None,
            };
            change(&mut intent);
            self.write(TopicKind::Assignments, key::intent(&intent), Body::RunIntent(intent.clone()));
            intent
        }
    }

    /// A step of node `me` (incarnation `incarnation`) after a restart: which runs its previous
    /// process left to their shims, and which its journal says it launched.
    fn restarted_step(
        book: &mut RunBook,
        log: &Log,
        incarnation: Uuid,
        adopted: &dyn Fn(&Uuid) -> bool,
        launched_before: &dyn Fn(&Uuid) -> bool,
        now: i64,
    ) -> Vec<Action> {
        let me = NodeId::new("me").unwrap();
        let event = Event::Step {
            view: &log.view,
            me: &me,
            incarnation,
            listed: true,
            may_start_exclusive: true,
            beside: &|_| false,
            adopted,
            launched_before,
            token: 7,
        };
        book.on_event(event, now)
    }

    #[test]
    fn after_a_restart_a_run_is_taken_back_launched_anew_or_lost_as_the_shims_and_the_journal_say() {
        let incarnation = Uuid::new_v4();
        let with_report = |state: RunPhase, by: Uuid| {
            let mut log = Log::new();
            let intent = log.intent(false, |_| {});
            let report = oneshot::report(&intent, state, None);
            let value = Envelope {
                sender: "me".into(),
                incarnation: Some(by),
                sent_at_ms: 0,
                body: Body::RunReport(report),
            }
            .encode();
            log.offset += 1;
            let key = key::run(&intent.task, intent.run_id);
            log.view.apply(TopicKind::Status, log.offset, Some(key.as_bytes()), Some(&value));
            (log, intent)
        };
        let kind = |actions: &[Action]| match actions {
            [Action::Adopt(_)] => "adopt",
            [Action::Write(report)] if report.state == RunPhase::Starting => "start",
            [Action::Write(report)] if report.state == RunPhase::Lost => "lost",
            other => panic!("{other:?}"),
        };
        // Running under a shim the new process found: taken back.
        let (log, intent) = with_report(RunPhase::Running, incarnation);
        let run = intent.run_id;
        let actions =
            restarted_step(&mut RunBook::default(), &log, incarnation, &|id| *id == run, &|_| true, 9_900);
        assert_eq!(kind(&actions), "adopt");
        // Only its start record written, never launched by the journal: launched now, while on
        // time; past the tolerance, lost.
        let (log, _) = with_report(RunPhase::Starting, incarnation);
        let actions =
            restarted_step(&mut RunBook::default(), &log, incarnation, &|_| false, &|_| false, 9_900);
        assert_eq!(kind(&actions), "start");
        let (log, _) = with_report(RunPhase::Starting, incarnation);
        let late = 10_000 + RELAUNCH_WITHIN_MS + 1;
        let actions =
            restarted_step(&mut RunBook::default(), &log, incarnation, &|_| false, &|_| false, late);
        assert_eq!(kind(&actions), "lost");
        // The journal says it may have been launched, or another incarnation wrote the record,
        // or the run was reported running: lost, never run twice.
        let (log, _) = with_report(RunPhase::Starting, incarnation);
        let actions =
            restarted_step(&mut RunBook::default(), &log, incarnation, &|_| false, &|_| true, 9_900);
        assert_eq!(kind(&actions), "lost");
        let (log, _) = with_report(RunPhase::Starting, Uuid::new_v4());
        let actions =
            restarted_step(&mut RunBook::default(), &log, incarnation, &|_| false, &|_| false, 9_900);
        assert_eq!(kind(&actions), "lost");
        let (log, _) = with_report(RunPhase::Running, incarnation);
        let actions =
            restarted_step(&mut RunBook::default(), &log, incarnation, &|_| false, &|_| false, 9_900);
        assert_eq!(kind(&actions), "lost");
    }

    /// A run on a seat whose records there were overwritten by a late record of another run
    /// may have started: a restarted node takes it as its earlier process's (taken back if its
    /// shim lives, else `lost`), never launches it anew.
    #[test]
    fn an_overwritten_run_on_a_seat_is_never_launched_anew_by_a_restarted_node() {
        let incarnation = Uuid::new_v4();
        for adopted in [false, true] {
            let mut log = Log::new();
            let intent = log.intent(false, |intent| {
                intent.seat = Some(4);
                intent.status_seen = Some(1);
            });
            let other = RunIntent { run_id: Uuid::from_u128(77), ..intent.clone() };
            let report = RunReport::of(&other, RunPhase::Succeeded);
            let value = Envelope {
                sender: "x".into(),
                incarnation: Some(Uuid::new_v4()),
                sent_at_ms: 0,
                body: Body::RunReport(report.clone()),
            }
            .encode();
            log.offset += 1;
            log.view.apply(
                TopicKind::Status,
                log.offset,
                Some(key::report(&report).as_bytes()),
                Some(&value),
            );
            assert!(log.view.run(&intent.task, &intent.run_id).unwrap().overwritten());
            let run = intent.run_id;
            let mut book = RunBook::default();
            let adopted_here = |id: &Uuid| adopted && *id == run;
            // First a read to the end, to tell a late record from the next run's on a view read
            // one topic ahead; then it acts.
            let actions = restarted_step(&mut book, &log, incarnation, &adopted_here, &|_| false, 9_900);
            assert!(matches!(actions.as_slice(), [Action::Sync(7)]), "{actions:?}");
            let me = NodeId::new("me").unwrap();
            let synced = Event::Synced { token: 7, view: &log.view, me: &me, incarnation, listed: true };
            assert!(book.on_event(synced, 9_950).is_empty());
            let actions = restarted_step(&mut book, &log, incarnation, &adopted_here, &|_| false, 9_960);
            match actions.as_slice() {
                [Action::Adopt(_)] => assert!(adopted),
                [Action::Write(report)] => assert_eq!((report.state, adopted), (RunPhase::Lost, false)),
                other => panic!("{other:?}"),
            }
        }
    }

    fn step(book: &mut RunBook, log: &Log, may_start: bool, beside: bool, now: i64) -> Vec<Action> {
        let me = NodeId::new("me").unwrap();
        let event = Event::Step {
            view: &log.view,
            me: &me,
            incarnation: Uuid::nil(),
            listed: true,
            may_start_exclusive: may_start,
            beside: &|_| beside,
            adopted: &|_| false,
            launched_before: &|_| true,
            token: 7,
        };
        book.on_event(event, now)
    }

    #[test]
    fn a_runner_clock_an_hour_behind_or_ahead_starts_a_run_neither_late_nor_more_than_its_lead_early() {
        let hour = 3_600_000;
        let me = NodeId::new("me").unwrap();
        // The leader wrote the intent at 9 000 for 10 000 (its clock): a lead of 1 s.
        for offset in [-hour, hour, 0] {
            let mut log = Log::new();
            let intent = log.intent(false, |intent| intent.written_at_ms = Some(9_000));
            let mut book = RunBook::default();
            // The runner reads it at 9 005 on the leader's clock, 9 005 + offset on its own.
            let seen = 9_005 + offset;
            let mut actions = step(&mut book, &log, true, false, seen);
            let mut when = seen;
            if actions.is_empty() {
                let wait = book.next_due(&log.view, &me, seen).expect("a start record is due");
                assert!(
                    wait <= Duration::from_millis(1_000),
                    "the start record waits {wait:?} with the runner's clock {offset} ms off"
                );
                when = seen + i64::try_from(wait.as_millis()).unwrap();
                actions = step(&mut book, &log, true, false, when);
            }
            assert!(
                matches!(&actions[..], [Action::Write(report)] if report.state == RunPhase::Starting),
                "{actions:?}"
            );
            book.on_event(Event::StartWritten { run: intent.run_id, ok: true }, when + 5);
            assert_eq!(step(&mut book, &log, true, false, when + 6), vec![Action::Sync(7)]);
            let synced = Event::Synced {
                token: 7,
                view: &log.view,
                me: &me,
                incarnation: Uuid::new_v4(),
                listed: true,
            };
            let actions = book.on_event(synced, when + 10);
            let [Action::Launch(launched)] = &actions[..] else { panic!("{actions:?}") };
            // It launches at the leader's instant read on its own clock, held between when it
            // saw the intent and a lead after: never an hour late (behind: 5 ms after the
            // leader's instant), early by at most the lead (ahead: at once).
            assert_eq!(launched.launch_at_ms, 10_000.clamp(seen, seen + 1_000), "offset {offset}");
            let on_leaders_clock = launched.launch_at_ms - offset;
            assert!((9_005..=10_005).contains(&on_leaders_clock), "{on_leaders_clock}");
        }
        // An intent of an older leader (no write time) launches at its instant, as before.
        let intent = RunIntent { written_at_ms: None, ..Log::new().intent(false, |_| {}) };
        assert_eq!(launch_at(&intent, -hour), 10_000);
        // Extremes stay total.
        let extreme = RunIntent { written_at_ms: Some(i64::MIN), launch_at_ms: i64::MAX, ..intent.clone() };
        assert_eq!(launch_at(&extreme, i64::MAX), i64::MAX);
        let back = RunIntent { written_at_ms: Some(i64::MAX), launch_at_ms: i64::MIN, ..intent };
        assert_eq!(launch_at(&back, 0), 0, "written after its launch: at once");
    }

    #[test]
    fn a_run_is_written_confirmed_then_launched_and_stopped_when_its_intent_says_so() {
        let mut log = Log::new();
        let intent = log.intent(false, |_| {});
        let mut book = RunBook::default();
        let me = NodeId::new("me").unwrap();
        assert!(step(&mut book, &log, true, false, 9_000).is_empty(), "not due before its lead");
        assert_eq!(book.next_due(&log.view, &me, 9_000), Some(Duration::from_millis(850)));
        let actions = step(&mut book, &log, true, false, 9_900);
        assert!(
            matches!(&actions[..], [Action::Write(report)] if report.state == RunPhase::Starting),
            "{actions:?}"
        );
        assert!(step(&mut book, &log, true, false, 9_910).is_empty(), "one start record");
        book.on_event(Event::StartWritten { run: intent.run_id, ok: true }, 9_920);
        assert_eq!(step(&mut book, &log, true, false, 9_925), vec![Action::Sync(7)]);
        let incarnation = Uuid::new_v4();
        let synced = Event::Synced { token: 7, view: &log.view, me: &me, incarnation, listed: true };
        let actions = book.on_event(synced, 9_960);
        assert!(
            matches!(&actions[..], [Action::Launch(launched)] if launched.run_id == intent.run_id),
            "{actions:?}"
        );
        assert_eq!(book.launched(), 1);
        // The leader asks it to stop: one stop signal.
        log.intent(false, |intent| intent.stop = Some("the task was killed".into()));
        let actions = step(&mut book, &log, true, false, 10_500);
        assert_eq!(actions, vec![Action::Stop { run: intent.run_id, reason: "the task was killed".into() }]);
        assert!(step(&mut book, &log, true, false, 10_600).is_empty());
        let mut end = oneshot::report(&intent, RunPhase::Stopped, None);
        end.ended_ms = Some(10_700);
        assert_eq!(book.on_event(Event::Reported(end.clone()), 10_700), vec![Action::Write(end)]);
        assert_eq!(book.launched(), 0);
    }

    /// A runner that ran B on a seat reads the next run's start record there before that run's
    /// intent (its view reads `status` ahead of `assignments`): B reads overwritten for a while.
    /// It writes B's end again only once a read to the end confirms it, and here it does not:
    /// the next run's intent took the seat (a late copy of another run's end, confirmed so,
    /// gets B's own end written again: `a_late_report_over_a_seat_never_runs_its_run_again…`).
    #[test]
    fn a_runner_writes_its_end_again_only_over_a_late_record_a_read_to_the_end_confirms() {
        let mut log = Log::new();
        let on_seat = |intent: &mut RunIntent| {
            intent.seat = Some(4);
            intent.status_seen = Some(1);
        };
        let intent = log.intent(false, on_seat);
        let (mut book, me, incarnation) = (RunBook::default(), NodeId::new("me").unwrap(), Uuid::nil());
        step(&mut book, &log, true, false, 9_900);
        book.on_event(Event::StartWritten { run: intent.run_id, ok: true }, 9_920);
        step(&mut book, &log, true, false, 9_925);
        book.on_event(Event::Synced { token: 7, view: &log.view, me: &me, incarnation, listed: true }, 9_960);
        let mut end = oneshot::report(&intent, RunPhase::Succeeded, None);
        end.ended_ms = Some(10_100);
        assert_eq!(book.on_event(Event::Reported(end.clone()), 10_100), vec![Action::Write(end.clone())]);
        let report = |log: &mut Log, report: &RunReport| {
            let body = Body::RunReport(report.clone());
            let value = Envelope { sender: "me".into(), incarnation: Some(incarnation), sent_at_ms: 0, body }
                .encode();
            log.offset += 1;
            log.view.apply(TopicKind::Status, log.offset, Some(key::report(report).as_bytes()), Some(&value));
        };
        report(&mut log, &end);
        assert!(step(&mut book, &log, true, false, 10_200).is_empty());
        // The next run's start record on the seat, its intent not read yet.
        let next = RunIntent {
            run_id: Uuid::from_u128(99),
            trigger: Trigger::Slot { slot_ms: 11_000 },
            ..intent.clone()
        };
        report(&mut log, &RunReport::of(&next, RunPhase::Starting));
        assert!(log.view.run(&intent.task, &intent.run_id).unwrap().overwritten());
        assert_eq!(
            step(&mut book, &log, true, false, 10_300),
            vec![Action::Sync(7)],
            "a read to the end first"
        );
        // Read to the end: the next run's intent is there, on the seat; B is gone.
        log.offset += 1;
        let status_seen = Some(log.offset);
        log.write(
            TopicKind::Assignments,
            key::intent(&next),
            Body::RunIntent(RunIntent { status_seen, ..next.clone() }),
        );
        book.on_event(
            Event::Synced { token: 7, view: &log.view, me: &me, incarnation, listed: true },
            10_350,
        );
        assert!(log.view.run(&intent.task, &intent.run_id).is_none());
        let actions = step(&mut book, &log, true, false, 10_400);
        let of_b = |actions: &[Action]| {
            actions
                .iter()
                .any(|action| matches!(action, Action::Write(report) if report.run_id == intent.run_id))
        };
        assert!(!of_b(&actions), "{actions:?}");
    }

    #[test]
    fn a_periodic_run_writes_no_running_record_and_a_one_shot_does() {
        let mut log = Log::new();
        let slot = log.intent(false, |_| {});
        let mut book = RunBook::default();
        assert!(book.set_lean(true).is_empty());
        let running = |intent: &RunIntent| RunReport {
            pid: Some(42),
            started_ms: Some(10_001),
            late_ms: Some(1),
            ..oneshot::report(intent, RunPhase::Running, None)
        };
        assert!(book.on_event(Event::Reported(running(&slot)), 10_001).is_empty());
        let request = RunIntent { trigger: Trigger::Request { request: Uuid::from_u128(1) }, ..slot.clone() };
        assert!(book.on_event(Event::Reported(running(&request)), 10_001).is_empty());
        let once = RunIntent { trigger: Trigger::Once { revision: 3 }, ..slot.clone() };
        assert_eq!(
            book.on_event(Event::Reported(running(&once)), 10_001),
            vec![Action::Write(running(&once))]
        );
        let end = RunReport { state: RunPhase::Succeeded, ended_ms: Some(10_050), ..running(&slot) };
        assert_eq!(book.on_event(Event::Reported(end.clone()), 10_050), vec![Action::Write(end)]);
        // A run still going when an older leader-capable node comes live: its `running` record
        // is written then; one over is not.
        let going = RunIntent { run_id: Uuid::from_u128(9), ..slot.clone() };
        assert!(book.on_event(Event::Reported(running(&going)), 10_100).is_empty());
        assert_eq!(book.set_lean(false), vec![Action::Write(running(&going))]);
        assert!(book.set_lean(false).is_empty(), "once");
        // While an older leader may lead (a leader-capable node without `lean_runs`): written.
        assert_eq!(
            book.on_event(Event::Reported(running(&slot)), 10_001),
            vec![Action::Write(running(&slot))]
        );
    }

    #[test]
    fn exclusive_runs_wait_for_the_gate_and_never_start_beside_a_service_copy() {
        for (keep, may_start, beside, starts) in [
            (false, false, false, false),
            (true, false, false, true),
            (false, true, true, false),
            (true, true, true, false),
            (false, true, false, true),
        ] {
            let mut log = Log::new();
            log.intent(keep, |_| {});
            let mut book = RunBook::default();
            let actions = step(&mut book, &log, may_start, beside, 9_900);
            assert_eq!(
                !actions.is_empty(),
                starts,
                "keep {keep}, gate open {may_start}, beside a copy {beside}"
            );
        }
    }

    #[test]
    fn a_cancelled_or_judged_run_is_not_launched_and_a_failed_start_record_is_written_again() {
        let mut log = Log::new();
        let intent = log.intent(false, |_| {});
        let mut book = RunBook::default();
        let me = NodeId::new("me").unwrap();
        step(&mut book, &log, true, false, 9_900);
        book.on_event(Event::StartWritten { run: intent.run_id, ok: false }, 9_910);
        let again = step(&mut book, &log, true, false, 9_920);
        assert!(
            matches!(&again[..], [Action::Write(report)] if report.state == RunPhase::Starting),
            "{again:?}"
        );
        book.on_event(Event::StartWritten { run: intent.run_id, ok: true }, 9_930);
        step(&mut book, &log, true, false, 9_935);
        // The leader judged it missed meanwhile (this node's start record not seen in time).
        log.intent(false, |intent| intent.verdict = Some(RunPhase::Missed));
        let synced =
            Event::Synced { token: 7, view: &log.view, me: &me, incarnation: Uuid::new_v4(), listed: true };
        let actions = book.on_event(synced, 9_990);
        assert!(
            matches!(&actions[..], [Action::Write(report)] if report.state == RunPhase::Stopped),
            "{actions:?}"
        );
        assert_eq!(book.launched(), 0);
    }
}
