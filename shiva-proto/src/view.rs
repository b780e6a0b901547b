//! The log view: folds the four control topics, record by record in log order, into the cluster
//! state that nodes and the CLI both read. Pure: no I/O, no clock.
//!
//! Rules (see `docs/protocol.md`):
//! * a record whose key, kind and sender disagree is skipped;
//! * claims: the first claim for `newest + 1` wins that epoch; a claim for any other epoch loses
//!   (older) or is refused (a jump);
//! * leader writes (`members`, assignments) are accepted only from the winner (node and
//!   incarnation) of the newest epoch, and not after it resigned;
//! * everything else is last-write-wins per key, so a compacted log replays to the same state
//!   as long as the last record of each leader key is an accepted one (the leader rewrites a key
//!   whenever something else lands on it after its own write).

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use crate::ids::{NodeId, TaskId};
use crate::records::{
    Assignment, Body, DecodeError, DesiredState, Envelope, ExitInfo, Heartbeat, Members, Mode, MoveRequest,
    NodeMode, Placement, TaskStatus,
};
use crate::runs::{RunIntent, RunPhase, RunReport, Sched, Trigger};
use crate::spec::TaskSpec;
use crate::topics::{TopicKind, key};

/// The node that won an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Winner {
    /// Its id.
    pub node: NodeId,
    /// Its incarnation when it claimed.
    pub incarnation: Uuid,
    /// Offset of the winning claim.
    pub offset: i64,
}

/// Epochs and their winners, in log order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Epochs {
    /// The newest epoch claimed (0: none yet).
    pub newest: u64,
    /// Winner of each epoch.
    pub winners: BTreeMap<u64, Winner>,
    /// Epochs whose leader resigned.
    pub resigned: BTreeSet<u64>,
    /// Epochs whose winner made at least one accepted leader write.
    pub active: BTreeSet<u64>,
    /// The first epoch this reader saw won: 1 on a log read from its first claim, later on a
    /// log whose earlier claims were trimmed (see [`MAX_EPOCH`] and `docs/protocol.md`,
    /// "Claims"). 0: no claim won yet.
    pub floor: u64,
    /// Every claim key in the log (won, lost, refused) and the offset of its record, so the
    /// leader can trim them; a key goes on its tombstone.
    pub claims: BTreeMap<String, i64>,
}

/// The highest epoch a claim may name (2^53): far more elections than a cluster holds, and far
/// from overflow however many claims follow. A claim above it is refused.
pub const MAX_EPOCH: u64 = 1 << 53;

/// The highest epoch a reader's first claim may name: 2^32 below [`MAX_EPOCH`], so a forged
/// first claim in an empty log cannot leave the cluster without an epoch to claim.
pub const MAX_FIRST_EPOCH: u64 = MAX_EPOCH - (1 << 32);

impl Epochs {
    /// The newest epoch's winner, unless it resigned.
    pub fn leader(&self) -> Option<(u64, &Winner)> {
        let winner = self.winners.get(&self.newest)?;
        (!self.resigned.contains(&self.newest)).then_some((self.newest, winner))
    }

    /// Whether a leader write of `epoch` from `sender`/`incarnation` is accepted now.
    pub fn accepts(&self, epoch: u64, sender: &str, incarnation: Option<Uuid>) -> Result<(), String> {
        if epoch < self.newest {
            return Err(format!("epoch {epoch} is older than the newest epoch {}", self.newest));
        }
        if epoch > self.newest {
            return Err(format!("epoch {epoch} was never claimed (newest is {})", self.newest));
        }
        let Some(winner) = self.winners.get(&epoch) else {
            return Err(format!("epoch {epoch} has no winner"));
        };
        if winner.node.as_str() != sender {
            return Err(format!("{sender} did not win epoch {epoch} ({} did)", winner.node));
        }
        if Some(winner.incarnation) != incarnation {
            return Err(format!(
                "{sender} won epoch {epoch} in incarnation {}, not {}",
                winner.incarnation,
                incarnation.map_or("(none)".to_owned(), |inc| inc.to_string())
            ));
        }
        if self.resigned.contains(&epoch) {
            return Err(format!("the leader of epoch {epoch} resigned"));
        }
        Ok(())
    }
}

/// A task definition and its revision (the offset of its record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecEntry {
    /// The spec.
    pub spec: TaskSpec,
    /// Offset of the `task/<id>` record in `commands`.
    pub revision: i64,
    /// The submitter's clock when it sent the spec (ms; 0 when unknown). Another machine's
    /// clock: the leader trusts it only within a bound (see `shiva-node`'s scheduler, origins).
    pub submitted_ms: i64,
}

/// A task whose newest `task/<id>` record is not a spec this build accepts (malformed, out of
/// range, too large, from a newer version): the task is `failed` with the reason until a valid
/// revision or a tombstone follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec {
    /// Offset of the record.
    pub revision: i64,
    /// Why it was refused (names the field).
    pub reason: String,
}

/// A node's newest heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatEntry {
    /// Its incarnation.
    pub incarnation: Uuid,
    /// Offset in `control`.
    pub offset: i64,
    /// Sender's clock at send time (display only).
    pub sent_at_ms: u64,
    /// The heartbeat.
    pub heartbeat: Heartbeat,
}

/// An accepted assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentEntry {
    /// The assignment.
    pub assignment: Assignment,
    /// Offset in `assignments`.
    pub offset: i64,
}

/// A runner's newest status for a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEntry {
    /// The runner.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: Uuid,
    /// Offset in `status`.
    pub offset: i64,
    /// The status.
    pub status: TaskStatus,
}

/// An accepted `sched/<task>` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedEntry {
    /// The record.
    pub sched: Sched,
    /// Offset in `assignments`.
    pub offset: i64,
}

/// A runner's record of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportEntry {
    /// The runner.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: Uuid,
    /// Offset in `status`.
    pub offset: i64,
    /// The record.
    pub report: RunReport,
}

/// The offsets the view keeps of one key of `assignments` or `status` (see `LogView::offsets`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KeyOffsets {
    /// The newest record's.
    last: i64,
    /// The newest accepted record's.
    accepted: Option<i64>,
}

impl KeyOffsets {
    /// The newest record is the newest accepted one.
    fn settled(&self) -> bool {
        self.accepted == Some(self.last)
    }
}

/// A `trim` record read (see [`crate::records::Trim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TrimEntry {
    /// Its leader's epoch.
    epoch: u64,
    /// The keys it deleted whose tombstone has not been read.
    pending: BTreeSet<String>,
}

/// What the log holds about one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunEntry {
    /// The leader's intent and its offset.
    pub intent: Option<(RunIntent, i64)>,
    /// The runner's record.
    pub report: Option<ReportEntry>,
    /// On a seat: the newest record of the seat's `status` key is not the run's own, and lies
    /// past the intent's `status_seen` (a late record of an earlier run, anything else): the
    /// run's own records are gone from a compacted log, so it may have started (see
    /// [`RunIntent::status_seen`]). Never with a report.
    pub overwritten: bool,
}

impl RunEntry {
    /// The run's state: the runner's final word, else the leader's verdict, else the runner's
    /// progress, else scheduled. A run whose records were overwritten on its seat reads as
    /// started by its runner (`starting`): never `missed`.
    pub fn phase(&self) -> RunPhase {
        let intent = self.intent.as_ref().map(|(intent, _)| intent);
        let report = self.report.as_ref();
        let by_runner = report
            .is_some_and(|entry| intent.is_some_and(|intent| intent.node.as_ref() == Some(&entry.node)));
        let reported = report.map(|entry| entry.report.state);
        phase_of(reported, intent.and_then(|intent| intent.verdict), by_runner, self.overwritten)
    }

    /// Whether the run is over.
    pub fn is_final(&self) -> bool {
        self.phase().is_final()
    }

    /// The node of a run not over whose intent names one (launched or about to be).
    pub fn in_flight_on(&self) -> Option<&NodeId> {
        let (intent, _) = self.intent.as_ref()?;
        intent.node.as_ref().filter(|_| !self.is_final())
    }
}

/// A run's state from its runner's newest word and the leader's verdict (see [`RunEntry::phase`]).
///
/// A `missed` verdict says the run never started: its node was gone and no start record of
/// the run had been read. A start record of its runner with it crossed the verdict (the
/// leader's write was under way, or failed and was written again, while the node came back and
/// confirmed its run by a read to the end that did not hold the verdict yet): the run may have
/// started, so the runner's word stands until it ends the run (a runner stops a launched run
/// whose intent has a verdict, and cancels one it has not launched, saying so), or until the
/// leader judges it `lost`. Read as `missed`, its next attempt would run the slot a second time.
/// Only the word of the node the intent names (`by_runner`) reopens it so.
///
/// A run `overwritten` on its seat (no report of its own) reads as started by its runner: its
/// start record may be among the records compacted away (see [`RunEntry::overwritten`]).
fn phase_of(
    reported: Option<RunPhase>,
    verdict: Option<RunPhase>,
    by_runner: bool,
    overwritten: bool,
) -> RunPhase {
    let (reported, by_runner) = match reported {
        None if overwritten => (Some(RunPhase::Starting), true),
        reported => (reported, by_runner),
    };
    match (reported, verdict) {
        (Some(state), _) if state.is_final() => state,
        (Some(state), Some(RunPhase::Missed)) if by_runner => state,
        (_, Some(verdict)) => verdict,
        (Some(state), None) => state,
        (None, None) => RunPhase::Scheduled,
    }
}

/// A run as the view keeps it (issue 21, memory per retained run, 176 bytes against 400 for
/// the two records): its intent and report, or its report alone, without the report's second
/// copy of the task, run id, attempt and trigger, and with optional numbers packed (a presence
/// bit each) and rare parts boxed (the texts; a report's sender other than the intent's node
/// and incarnation). Lossless:
/// [`CompactRun::entry`] gives back the two records exactly as read, so a view replayed from a
/// compacted log equals the live one, and a record landing later (a restamp, a `deleted`
/// marker that leaves the report an orphan) folds into the run as it did in full. A run whose
/// report disagrees with its intent on the attempt or the trigger (forged) is kept in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactRun {
    intent_offset: i64,
    /// Meaningful when a report is held (`reported`).
    report_offset: i64,
    epoch: u64,
    launch_at_ms: i64,
    spec_revision: i64,
    /// `None` without an intent.
    spec: Option<std::sync::Arc<TaskSpec>>,
    trigger: Trigger,
    node: Option<NodeId>,
    /// Meaningful with [`Present::INCARNATION`].
    incarnation: Uuid,
    attempt: u32,
    /// The seat, with [`Present::SEAT`].
    seat: u16,
    /// The intent's `status_seen`, with [`Present::STATUS_SEEN`].
    status_seen: i64,
    /// The report's pid, with [`Present::PID`].
    pid: u32,
    /// The report's exit code and signal, with [`Present::EXIT`], [`Present::CODE`] and
    /// [`Present::SIGNAL`].
    exit: [i32; 2],
    /// The intent's `written_at_ms`, the report's `started_ms`, `late_ms` and `ended_ms`, each
    /// with its presence bit ([`Present::TIMES`]).
    times: [i64; 4],
    present: Present,
    verdict: Option<RunPhase>,
    /// The report's state; `None`: no report.
    reported: Option<RunPhase>,
    /// The report's sender, when it is not the intent's node and incarnation.
    reporter: Option<Box<(NodeId, Uuid)>>,
    /// The intent's `stop` and `note` and the report's `message`, when any is given.
    texts: Option<Box<[Option<String>; 3]>>,
}

/// Which of a [`CompactRun`]'s packed optional fields are present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Present(u16);

impl Present {
    const INCARNATION: u16 = 1;
    const PID: u16 = 1 << 1;
    const EXIT: u16 = 1 << 2;
    const CODE: u16 = 1 << 3;
    const SIGNAL: u16 = 1 << 4;
    /// `written_at_ms`, `started_ms`, `late_ms`, `ended_ms`.
    const TIMES: [u16; 4] = [1 << 5, 1 << 6, 1 << 7, 1 << 8];
    /// The seat (the intent's, or the report's without an intent: the same when both are held).
    const SEAT: u16 = 1 << 9;
    /// The intent's `status_seen`.
    const STATUS_SEEN: u16 = 1 << 10;
    /// [`RunEntry::overwritten`].
    const OVERWRITTEN: u16 = 1 << 11;

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
}

/// Packs an optional number: its value (or zero) and whether it is present.
fn pack<T: Default>(value: Option<T>, bit: u16, present: &mut u16) -> T {
    match value {
        Some(value) => {
            *present |= bit;
            value
        }
        None => T::default(),
    }
}

impl CompactRun {
    /// The compact form of `entry`; `None` when it holds neither record, or when its report
    /// disagrees with its intent on the attempt or the trigger (then kept in full).
    fn new(entry: &RunEntry) -> Option<CompactRun> {
        let intent = entry.intent.as_ref().map(|(intent, _)| intent);
        let report = entry.report.as_ref();
        let facts = report.map(|entry| &entry.report);
        // What the run is and who runs it: the intent's word, else the report's and its sender.
        let (trigger, attempt, node, incarnation) = match (intent, report) {
            (Some(intent), _) => {
                if facts.is_some_and(|report| {
                    report.attempt != intent.attempt
                        || report.trigger != intent.trigger
                        || report.seat != intent.seat
                }) {
                    return None;
                }
                (intent.trigger, intent.attempt, intent.node.clone(), intent.incarnation)
            }
            (None, Some(entry)) => (
                entry.report.trigger,
                entry.report.attempt,
                Some(entry.node.clone()),
                Some(entry.incarnation),
            ),
            (None, None) => return None,
        };
        let reporter = report
            .filter(|entry| node.as_ref() != Some(&entry.node) || incarnation != Some(entry.incarnation))
            .map(|entry| Box::new((entry.node.clone(), entry.incarnation)));
        let mut present = 0u16;
        let incarnation = pack(incarnation, Present::INCARNATION, &mut present);
        let seat = intent.map_or(facts.and_then(|report| report.seat), |intent| intent.seat);
        let seat = pack(seat, Present::SEAT, &mut present);
        let status_seen =
            pack(intent.and_then(|intent| intent.status_seen), Present::STATUS_SEEN, &mut present);
        if entry.overwritten {
            present |= Present::OVERWRITTEN;
        }
        let pid = pack(facts.and_then(|report| report.pid), Present::PID, &mut present);
        let exit = facts.and_then(|report| report.exit);
        if exit.is_some() {
            present |= Present::EXIT;
        }
        let exit = [
            pack(exit.and_then(|exit| exit.code), Present::CODE, &mut present),
            pack(exit.and_then(|exit| exit.signal), Present::SIGNAL, &mut present),
        ];
        let times = [
            intent.and_then(|intent| intent.written_at_ms),
            facts.and_then(|report| report.started_ms),
            facts.and_then(|report| report.late_ms),
            facts.and_then(|report| report.ended_ms),
        ];
        let times = std::array::from_fn(|i| pack(times[i], Present::TIMES[i], &mut present));
        let texts = [
            intent.and_then(|intent| intent.stop.clone()),
            intent.and_then(|intent| intent.note.clone()),
            facts.and_then(|report| report.message.clone()),
        ];
        Some(CompactRun {
            intent_offset: entry.intent.as_ref().map_or(-1, |(_, offset)| *offset),
            report_offset: report.map_or(-1, |entry| entry.offset),
            epoch: intent.map_or(0, |intent| intent.epoch),
            launch_at_ms: intent.map_or(0, |intent| intent.launch_at_ms),
            spec_revision: intent.map_or(0, |intent| intent.spec_revision),
            spec: intent.map(|intent| intent.spec.clone()),
            trigger,
            node,
            incarnation,
            attempt,
            seat,
            status_seen,
            pid,
            exit,
            times,
            present: Present(present),
            verdict: intent.and_then(|intent| intent.verdict),
            reported: facts.map(|report| report.state),
            reporter,
            texts: texts.iter().any(Option::is_some).then(|| Box::new(texts)),
        })
    }

    /// Whether the intent is held (its spec is; without one, the intent's other fields are
    /// zero, and the node, incarnation, trigger and attempt are the report's).
    fn has_intent(&self) -> bool {
        self.spec.is_some()
    }

    fn phase(&self) -> RunPhase {
        let by_runner = self.reporter.as_ref().is_none_or(|reporter| self.node.as_ref() == Some(&reporter.0));
        phase_of(self.reported, self.verdict, by_runner, self.present.has(Present::OVERWRITTEN))
    }

    /// An optional number packed with `bit`.
    fn get<T: Copy>(&self, value: T, bit: u16) -> Option<T> {
        self.present.has(bit).then_some(value)
    }

    /// A packed time: 0 `written_at_ms`, 1 `started_ms`, 2 `late_ms`, 3 `ended_ms`.
    fn time(&self, i: usize) -> Option<i64> {
        self.get(self.times[i], Present::TIMES[i])
    }

    fn text(&self, i: usize) -> Option<String> {
        self.texts.as_ref().and_then(|texts| texts[i].clone())
    }

    /// The intent, as its record said.
    fn intent(&self, task: &TaskId, run_id: Uuid) -> Option<RunIntent> {
        let spec = self.spec.clone()?;
        Some(RunIntent {
            epoch: self.epoch,
            task: task.clone(),
            run_id,
            attempt: self.attempt,
            trigger: self.trigger,
            node: self.node.clone(),
            incarnation: self.get(self.incarnation, Present::INCARNATION),
            launch_at_ms: self.launch_at_ms,
            written_at_ms: self.time(0),
            spec_revision: self.spec_revision,
            spec,
            stop: self.text(0),
            verdict: self.verdict,
            note: self.text(1),
            seat: self.get(self.seat, Present::SEAT),
            status_seen: self.get(self.status_seen, Present::STATUS_SEEN),
        })
    }

    /// The report, if any, as its record said.
    fn report(&self, task: &TaskId, run_id: Uuid) -> Option<ReportEntry> {
        let state = self.reported?;
        let (node, incarnation) = match (&self.reporter, &self.node) {
            (Some(reporter), _) => (reporter.0.clone(), reporter.1),
            // Not boxed: the intent names both.
            (None, node) => (node.clone()?, self.incarnation),
        };
        let exit = self.present.has(Present::EXIT).then(|| ExitInfo {
            code: self.get(self.exit[0], Present::CODE),
            signal: self.get(self.exit[1], Present::SIGNAL),
        });
        Some(ReportEntry {
            node,
            incarnation,
            offset: self.report_offset,
            report: RunReport {
                task: task.clone(),
                run_id,
                attempt: self.attempt,
                trigger: self.trigger,
                state,
                pid: self.get(self.pid, Present::PID),
                started_ms: self.time(1),
                late_ms: self.time(2),
                ended_ms: self.time(3),
                exit,
                message: self.text(2),
                seat: self.get(self.seat, Present::SEAT),
            },
        })
    }

    /// The run in full, as its records said.
    pub fn entry(&self, task: &TaskId, run_id: Uuid) -> RunEntry {
        RunEntry {
            intent: self.intent(task, run_id).map(|intent| (intent, self.intent_offset)),
            report: self.report(task, run_id),
            overwritten: self.present.has(Present::OVERWRITTEN),
        }
    }
}

/// A run as the view keeps it: compact from its first record on (one allocation of one size
/// for its whole life, so reading a long history leaves no holes behind), in full only when its
/// report disagrees with its intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// With a report of another attempt or trigger than its intent's.
    Full(Box<RunEntry>),
    /// Any other.
    Compact(Box<CompactRun>),
}

impl Run {
    /// How `entry` is kept.
    pub fn keep(entry: RunEntry) -> Run {
        match CompactRun::new(&entry) {
            Some(compact) => Run::Compact(Box::new(compact)),
            None => Run::Full(Box::new(entry)),
        }
    }

    /// The run in full.
    pub fn into_entry(self, task: &TaskId, run_id: Uuid) -> RunEntry {
        match self {
            Run::Full(entry) => *entry,
            Run::Compact(done) => done.entry(task, run_id),
        }
    }

    /// A reader's handle on it.
    pub fn at<'a>(&'a self, task: &'a TaskId, id: Uuid) -> RunRef<'a> {
        match self {
            Run::Full(entry) => RunRef::full(task, id, entry),
            Run::Compact(done) => RunRef { task, id, kind: RunKind::Compact(done) },
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum RunKind<'a> {
    Full(&'a RunEntry),
    Compact(&'a CompactRun),
}

/// A reader's handle on one run of the view (or of a plan's copy): cheap questions answered
/// in place, the records in full on demand ([`RunRef::entry`], [`RunRef::intent`],
/// [`RunRef::report`]).
#[derive(Debug, Clone, Copy)]
pub struct RunRef<'a> {
    task: &'a TaskId,
    id: Uuid,
    kind: RunKind<'a>,
}

impl<'a> RunRef<'a> {
    /// A handle on a run held in full.
    pub fn full(task: &'a TaskId, id: Uuid, entry: &'a RunEntry) -> RunRef<'a> {
        RunRef { task, id, kind: RunKind::Full(entry) }
    }

    /// The run id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The run's state (see [`RunEntry::phase`]).
    pub fn phase(&self) -> RunPhase {
        match self.kind {
            RunKind::Full(entry) => entry.phase(),
            RunKind::Compact(done) => done.phase(),
        }
    }

    /// Whether the run is over.
    pub fn is_final(&self) -> bool {
        self.phase().is_final()
    }

    /// The node of a run not over whose intent names one.
    pub fn in_flight_on(&self) -> Option<&'a NodeId> {
        match self.kind {
            RunKind::Full(entry) => entry.in_flight_on(),
            RunKind::Compact(done) => {
                done.node.as_ref().filter(|_| done.has_intent() && !done.phase().is_final())
            }
        }
    }

    /// Whether the view holds the leader's intent.
    pub fn has_intent(&self) -> bool {
        match self.kind {
            RunKind::Full(entry) => entry.intent.is_some(),
            RunKind::Compact(done) => done.has_intent(),
        }
    }

    /// Whether the view holds the runner's report.
    pub fn has_report(&self) -> bool {
        match self.kind {
            RunKind::Full(entry) => entry.report.is_some(),
            RunKind::Compact(done) => done.reported.is_some(),
        }
    }

    /// The report's offset.
    pub fn report_offset(&self) -> Option<i64> {
        match self.kind {
            RunKind::Full(entry) => entry.report.as_ref().map(|entry| entry.offset),
            RunKind::Compact(done) => done.reported.map(|_| done.report_offset),
        }
    }

    /// The intent's seat (see [`RunIntent::seat`]).
    pub fn seat(&self) -> Option<u16> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().and_then(|(intent, _)| intent.seat),
            RunKind::Compact(done) => done.has_intent().then(|| done.get(done.seat, Present::SEAT)).flatten(),
        }
    }

    /// The seat its report is on (see [`RunReport::seat`]), when it has one there.
    pub fn report_seat(&self) -> Option<u16> {
        match self.kind {
            RunKind::Full(entry) => entry.report.as_ref().and_then(|entry| entry.report.seat),
            RunKind::Compact(done) => done.reported.and(done.get(done.seat, Present::SEAT)),
        }
    }

    /// The intent's `status_seen` (see [`RunIntent::status_seen`]).
    pub fn status_seen(&self) -> Option<i64> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().and_then(|(intent, _)| intent.status_seen),
            RunKind::Compact(done) => {
                done.has_intent().then(|| done.get(done.status_seen, Present::STATUS_SEEN)).flatten()
            }
        }
    }

    /// See [`RunEntry::overwritten`].
    pub fn overwritten(&self) -> bool {
        match self.kind {
            RunKind::Full(entry) => entry.overwritten,
            RunKind::Compact(done) => done.present.has(Present::OVERWRITTEN),
        }
    }

    /// The `assignments` key of its intent (its seat's, else its run id's), when it has one.
    pub fn intent_key(&self) -> Option<String> {
        self.has_intent().then(|| key::intent_key(self.task, self.id, self.seat()))
    }

    /// The intent's offset (-1: written by a plan, not read back yet).
    pub fn intent_offset(&self) -> Option<i64> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().map(|(_, offset)| *offset),
            RunKind::Compact(done) => done.has_intent().then_some(done.intent_offset),
        }
    }

    /// The intent's epoch.
    pub fn epoch(&self) -> Option<u64> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().map(|(intent, _)| intent.epoch),
            RunKind::Compact(done) => done.has_intent().then_some(done.epoch),
        }
    }

    /// The intent's trigger.
    pub fn trigger(&self) -> Option<Trigger> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().map(|(intent, _)| intent.trigger),
            RunKind::Compact(done) => done.has_intent().then_some(done.trigger),
        }
    }

    /// The node the intent names.
    pub fn node(&self) -> Option<&'a NodeId> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().and_then(|(intent, _)| intent.node.as_ref()),
            RunKind::Compact(done) => done.node.as_ref().filter(|_| done.has_intent()),
        }
    }

    /// The spec the intent runs.
    pub fn spec(&self) -> Option<&'a TaskSpec> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().map(|(intent, _)| &*intent.spec),
            RunKind::Compact(done) => done.spec.as_deref(),
        }
    }

    /// The intent's attempt.
    pub fn attempt(&self) -> Option<u32> {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().map(|(intent, _)| intent.attempt),
            RunKind::Compact(done) => done.has_intent().then_some(done.attempt),
        }
    }

    /// The intent's slot, for a periodic run.
    pub fn slot_ms(&self) -> Option<i64> {
        self.trigger().and_then(|trigger| trigger.slot_ms())
    }

    /// Whether the intent asks the runner to stop the run.
    pub fn stop_requested(&self) -> bool {
        match self.kind {
            RunKind::Full(entry) => entry.intent.as_ref().is_some_and(|(intent, _)| intent.stop.is_some()),
            RunKind::Compact(done) => done.texts.as_ref().is_some_and(|texts| texts[0].is_some()),
        }
    }

    /// The report's state and start (`None`: no report).
    pub fn reported(&self) -> Option<(RunPhase, Option<i64>)> {
        match self.kind {
            RunKind::Full(entry) => {
                entry.report.as_ref().map(|entry| (entry.report.state, entry.report.started_ms))
            }
            RunKind::Compact(done) => done.reported.map(|state| (state, done.time(1))),
        }
    }

    /// The intent in full.
    pub fn intent(&self) -> Option<std::borrow::Cow<'a, RunIntent>> {
        match self.kind {
            RunKind::Full(entry) => {
                entry.intent.as_ref().map(|(intent, _)| std::borrow::Cow::Borrowed(intent))
            }
            RunKind::Compact(done) => done.intent(self.task, self.id).map(std::borrow::Cow::Owned),
        }
    }

    /// The report in full.
    pub fn report(&self) -> Option<std::borrow::Cow<'a, ReportEntry>> {
        match self.kind {
            RunKind::Full(entry) => entry.report.as_ref().map(std::borrow::Cow::Borrowed),
            RunKind::Compact(done) => done.report(self.task, self.id).map(std::borrow::Cow::Owned),
        }
    }

    /// The run in full.
    pub fn entry(&self) -> std::borrow::Cow<'a, RunEntry> {
        match self.kind {
            RunKind::Full(entry) => std::borrow::Cow::Borrowed(entry),
            RunKind::Compact(done) => std::borrow::Cow::Owned(done.entry(self.task, self.id)),
        }
    }
}

/// What applying one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted (the record's kind, or "tombstone").
    Applied(&'static str),
    /// Not accepted, with the reason (logged by callers).
    Skipped(String),
}

/// The cluster state folded from the control topics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogView {
    /// Task definitions.
    pub specs: BTreeMap<TaskId, SpecEntry>,
    /// Tasks whose newest definition is invalid (never also in `specs`).
    pub invalid: BTreeMap<TaskId, InvalidSpec>,
    /// Desired states (absent: running).
    pub desired: BTreeMap<TaskId, DesiredState>,
    /// Nodes' modes (`cordon`, `drain`; absent: open).
    pub node_modes: BTreeMap<NodeId, NodeMode>,
    /// Requests to move services (`rebalance`), by task.
    pub moves: BTreeMap<TaskId, MoveRequest>,
    /// Newest heartbeat per node.
    pub heartbeats: BTreeMap<NodeId, HeartbeatEntry>,
    /// Incarnations that announced their departure.
    pub left: BTreeSet<(NodeId, Uuid)>,
    /// Claims and winners.
    pub epochs: Epochs,
    /// The newest accepted `members` record.
    pub members: Option<Members>,
    /// Accepted assignments.
    pub assignments: BTreeMap<TaskId, AssignmentEntry>,
    /// Newest status per task.
    pub statuses: BTreeMap<TaskId, StatusEntry>,
    /// Firing positions of periodic and one-shot tasks.
    pub scheds: BTreeMap<TaskId, SchedEntry>,
    /// Runs of periodic and one-shot tasks, per task and run id.
    pub runs: BTreeMap<TaskId, BTreeMap<Uuid, Run>>,
    /// Pending `run` requests per task: request id → offset.
    pub requests: BTreeMap<TaskId, BTreeMap<Uuid, i64>>,
    /// Per key of `assignments` and `status`: the offset of its newest record (of any sender),
    /// so a writer can tell that something landed after its own write, and of its newest
    /// accepted record (tombstones included). A key is settled when the two are the same (see
    /// [`LogView::is_settled`]). A settled run key (`run/…`) is not kept: its offsets are in its
    /// [`RunEntry`], and a retained run's two keys would otherwise cost a node more memory than
    /// the run itself (issue 21). Read with [`LogView::last_offset`]. Forgetting a settled key
    /// is the same as keeping it only because offsets on a key never repeat: the Kafka reader
    /// drops records it has read, and the file log only moves forward; a record read twice at
    /// an old offset would otherwise unsettle a forgotten key.
    offsets: BTreeMap<(TopicKind, String), KeyOffsets>,
    /// Offset of the next record to read, per topic.
    pub positions: BTreeMap<TopicKind, i64>,
    /// Keys of `assignments` and `status` whose newest record is not an accepted one: what
    /// [`LogView::is_settled`] denies, kept so writers need not scan every key.
    unsettled: BTreeSet<(TopicKind, String)>,
    /// Runs not over (see [`RunEntry::is_final`]), so runners and the leader need not scan the
    /// retained history.
    pub open_runs: BTreeSet<(TaskId, Uuid)>,
    /// The spec of each task's newest intent: the intents of a revision share one copy.
    intent_specs: Interned,
    /// Keys whose newest record is an accepted `deleted` marker, per topic: the tombstone that
    /// follows each marker has not been read (yet, or ever: its write failed), and the leader
    /// writes it again, so the key does not stay in the log for good.
    pub deleted_markers: BTreeMap<TopicKind, BTreeSet<String>>,
    /// `trim` records read, per topic and key, until their own tombstone.
    trims: BTreeMap<(TopicKind, String), TrimEntry>,
    /// Keys an accepted `trim` record deleted whose tombstone has not been read (nor any other
    /// record on them since): key → the `trim` key.
    trimmed: BTreeMap<(TopicKind, String), String>,
    /// Who may command the cluster (`--authorized-keys`): none, an open cluster.
    pub auth: AuthPolicy,
    /// Signing time of the newest accepted command per `commands` key, kept after the key is
    /// deleted, so that a replay of an older command on it is refused (signed clusters only).
    pub newest_signed: BTreeMap<String, (u64, Option<String>)>,
    /// The newest refused command per task, with its reason, as read on `commands` or as the
    /// leader recorded it (`refusal/<key>` on `assignments`, which outlasts compaction): see
    /// [`LogView::refusal`].
    pub refused: BTreeMap<TaskId, Refusal>,
    /// The command keys of the leader's `refusal/<key>` records in the log.
    pub refusal_records: BTreeSet<String>,
    /// Signed clusters: the bytes of the command accepted on each `commands` key, and the keys
    /// whose newest record is a refused one. The leader writes the accepted bytes again on those
    /// keys (a tombstone where none is accepted), so that compaction, which keeps the newest
    /// record of a key, never leaves a refused command (a replay) in place of the accepted one.
    pub accepted_commands: BTreeMap<String, std::sync::Arc<[u8]>>,
    /// See `accepted_commands`.
    pub command_repairs: BTreeSet<String>,
    /// Every command record read, in log order, when the reader asked for it (`shiva-ctl
    /// audit`; nodes keep none).
    pub audit: Option<Vec<AuditEntry>>,
    /// Secrets set by operators (`secret/<name>` on `commands`): name → revision and record.
    pub secrets: BTreeMap<TaskId, (i64, crate::secret::Secret)>,
    /// The leader's re-encrypted copies (`secret/<name>` on `assignments`).
    pub secret_copies: BTreeMap<TaskId, crate::secret::Secret>,
}

/// The authorization policy a view applies. Configuration, not state: views compare equal
/// whatever their policies.
#[derive(Debug, Clone, Default)]
pub struct AuthPolicy(pub Option<std::sync::Arc<crate::auth::Policy>>);

impl PartialEq for AuthPolicy {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

pub use crate::records::Refusal;

/// One command record, for `shiva-ctl audit`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Offset on `commands`.
    pub offset: i64,
    /// Key.
    pub key: String,
    /// Kind (`task`, `desired`, `run_request`, `deleted`, `tombstone`, or `unreadable`).
    pub kind: String,
    /// The envelope's sender (`ctl:<user>`: what the writer says, not proof).
    pub sender: Option<String>,
    /// The signing key's fingerprint and its comment in `authorized_keys`, and the signing time.
    pub signer: Option<crate::auth::Signer>,
    /// When the writer says it sent it.
    pub sent_at_ms: Option<u64>,
    /// `accepted`, or `refused: <reason>`.
    pub outcome: String,
}

/// Specs shared by launch intents. Memory only: never part of the view's value (a replay may
/// share differently), so it always compares equal.
#[derive(Debug, Clone, Default)]
struct Interned(BTreeMap<TaskId, std::sync::Arc<TaskSpec>>);

impl PartialEq for Interned {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl LogView {
    /// An empty view that accepts only commands `policy` allows (`None`: an open cluster).
    pub fn with_policy(policy: Option<std::sync::Arc<crate::auth::Policy>>) -> LogView {
        LogView { auth: AuthPolicy(policy), ..LogView::default() }
    }

    /// Desired state of a task (running unless stopped); an instance's is its task's.
    pub fn desired_state(&self, task: &TaskId) -> DesiredState {
        let desired = match task.instance() {
            Some(_) => self.desired.get(&task.base()),
            None => self.desired.get(task),
        };
        desired.copied().unwrap_or(DesiredState::Running)
    }

    /// The definition of `task`: its own, or, for an instance, its task's when the spec has
    /// that instance (a number below `count`, any node with `every_node`).
    pub fn spec_of(&self, task: &TaskId) -> Option<&SpecEntry> {
        match task.instance() {
            None => self.specs.get(task),
            Some(_) => self.specs.get(&task.base()).filter(|entry| entry.spec.has_instance(task)),
        }
    }

    /// The instances of `task` that have an assignment, in id order.
    pub fn assigned_instances<'v>(&'v self, task: &TaskId) -> impl Iterator<Item = &'v TaskId> + 'v {
        let prefix = format!("{task}@");
        self.assignments
            .range::<str, _>((std::ops::Bound::Included(prefix.as_str()), std::ops::Bound::Unbounded))
            .map(|(id, _)| id)
            .take_while(move |id| id.as_str().starts_with(&prefix))
    }

    /// Whether `task` is defined: by a valid spec, or by an invalid one (a failed task that can
    /// still be killed, started, deleted); an instance, by its task's spec (see
    /// [`LogView::spec_of`]).
    pub fn is_defined(&self, task: &TaskId) -> bool {
        self.spec_of(task).is_some() || self.invalid.contains_key(task)
    }

    /// Every defined task, valid or not, in id order.
    pub fn defined_tasks(&self) -> impl Iterator<Item = &TaskId> + '_ {
        let all: BTreeSet<&TaskId> = self.specs.keys().chain(self.invalid.keys()).collect();
        all.into_iter()
    }

    /// The current leader: the newest epoch's winner, unless it resigned.
    pub fn leader(&self) -> Option<(u64, &Winner)> {
        self.epochs.leader()
    }

    /// The node a task is assigned to, if any.
    pub fn assigned_node(&self, task: &TaskId) -> Option<&NodeId> {
        match &self.assignments.get(task)?.assignment.placement {
            Placement::Assigned { node } => Some(node),
            _ => None,
        }
    }

    /// The status of a task that belongs to its current assignment.
    pub fn current_status(&self, task: &TaskId) -> Option<&StatusEntry> {
        let assignment = &self.assignments.get(task)?.assignment;
        let status = self.statuses.get(task)?;
        (status.status.generation == assignment.generation).then_some(status)
    }

    /// Whether the newest record on `key` is an accepted one (nothing stale or forged landed
    /// after it), so a compacted log replays to the same value.
    pub fn is_settled(&self, topic: TopicKind, key: &str) -> bool {
        self.offsets.get(&(topic, key.to_owned())).is_none_or(KeyOffsets::settled)
    }

    /// The offset of the newest record on `key` of `assignments` or `status`, of any sender;
    /// `None` for a key never written, deleted, or a settled run key (see `offsets`).
    pub fn last_offset(&self, topic: TopicKind, key: &str) -> Option<i64> {
        self.offsets.get(&(topic, key.to_owned())).map(|offsets| offsets.last)
    }

    /// The keys of `topic` whose offsets the view keeps (see `offsets`), for tests of its
    /// indexes.
    pub fn offset_keys(&self, topic: TopicKind) -> impl Iterator<Item = &str> + '_ {
        self.offsets.keys().filter(move |(t, _)| *t == topic).map(|(_, key)| key.as_str())
    }

    /// Unsettled keys of `topic` that start with `prefix`.
    pub fn unsettled<'v>(&'v self, topic: TopicKind, prefix: &'v str) -> impl Iterator<Item = &'v str> + 'v {
        self.unsettled
            .range((topic, prefix.to_owned())..)
            .take_while(move |(t, key)| *t == topic && key.starts_with(prefix))
            .map(|(_, key)| key.as_str())
    }

    /// The run `run` of `task`.
    pub fn run<'v>(&'v self, task: &TaskId, run: &Uuid) -> Option<RunRef<'v>> {
        let (task, runs) = self.runs.get_key_value(task)?;
        Some(runs.get(run)?.at(task, *run))
    }

    /// The runs of `task`, by run id.
    pub fn runs_of<'v>(&'v self, task: &TaskId) -> impl Iterator<Item = RunRef<'v>> + 'v {
        self.runs
            .get_key_value(task)
            .into_iter()
            .flat_map(|(task, runs)| runs.iter().map(move |(id, run)| run.at(task, *id)))
    }

    /// The runs of `task` in full, by run id (for tests and tools: a run over is copied out
    /// of its compact form).
    pub fn run_entries(&self, task: &TaskId) -> BTreeMap<Uuid, RunEntry> {
        self.runs_of(task).map(|run| (run.id(), run.entry().into_owned())).collect()
    }

    /// Every run in full (see [`LogView::run_entries`]).
    pub fn all_run_entries(&self) -> Vec<RunEntry> {
        self.all_runs().map(|run| run.entry().into_owned()).collect()
    }

    /// Every run, by task and run id.
    pub fn all_runs(&self) -> impl Iterator<Item = RunRef<'_>> + '_ {
        self.runs.iter().flat_map(|(task, runs)| runs.iter().map(move |(id, run)| run.at(task, *id)))
    }

    /// Changes the run `run` of `task` (a new one if absent) in full, then keeps it as
    /// [`Run::keep`] does, or drops it once it holds neither record.
    fn change_run(&mut self, task: &TaskId, run: Uuid, change: impl FnOnce(&mut RunEntry)) {
        let runs = self.runs.entry(task.clone()).or_default();
        let mut entry = runs.remove(&run).map(|kept| kept.into_entry(task, run)).unwrap_or_default();
        change(&mut entry);
        if entry.intent.is_some() || entry.report.is_some() {
            runs.insert(run, Run::keep(entry));
        }
        if runs.is_empty() {
            self.runs.remove(task);
            self.intent_specs.0.remove(task);
        }
        self.note_run(task, run);
    }

    /// [`LogView::apply`], and a panic while folding the record (a bug) skips it instead of
    /// unwinding: a definition that panics makes its task invalid, as an unreadable one does.
    pub fn apply_guarded(
        &mut self,
        topic: TopicKind,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Outcome {
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(topic, offset, key, value)));
        applied.unwrap_or_else(|payload| {
            let reason =
                format!("internal error while reading the record: {}", panic_message(payload.as_ref()));
            if let Some(key) = key.and_then(|key| std::str::from_utf8(key).ok()) {
                self.mark_invalid(topic, offset, key, value.is_some(), &reason);
            }
            Outcome::Skipped(reason)
        })
    }

    /// A definition record on `key` that could not be used: its task is invalid (failed, for
    /// every reader) until a valid revision or a tombstone.
    /// A key naming an instance defines nothing (only a task's spec defines its instances): its
    /// record is skipped, never an invalid definition no command could delete.
    fn mark_invalid(&mut self, topic: TopicKind, offset: i64, key: &str, has_value: bool, reason: &str) {
        let task = key::task_of(key, "task")
            .and_then(|id| TaskId::new(id).ok())
            .filter(|task| task.instance().is_none());
        if let (TopicKind::Commands, true, Some(task)) = (topic, has_value, task) {
            self.specs.remove(&task);
            self.invalid.insert(task, InvalidSpec { revision: offset, reason: reason.to_owned() });
        }
    }

    /// Folds one record in. `value: None` is a tombstone.
    pub fn apply(
        &mut self,
        topic: TopicKind,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Outcome {
        let position = self.positions.entry(topic).or_insert(0);
        *position = (*position).max(offset + 1);
        let Some(key) = key.and_then(|key| std::str::from_utf8(key).ok()) else {
            return Outcome::Skipped("record without a UTF-8 key".into());
        };
        if matches!(topic, TopicKind::Assignments | TopicKind::Status) {
            self.offsets.entry((topic, key.to_owned())).or_default().last = offset;
        }
        if topic == TopicKind::Assignments && key.starts_with("claim/") && value.is_some() {
            // The first record of the key: a copy landing later (a retry) is not the claim.
            self.epochs.claims.entry(key.to_owned()).or_insert(offset);
        }
        let signer = match self.authorize(topic, offset, key, value) {
            Ok(Authorized::Unchecked) => None,
            Ok(Authorized::New(signer)) => Some(signer),
            Ok(Authorized::Same(signer)) => {
                // The accepted command written again (the leader's repair): nothing changes, not
                // even its revision.
                self.command_repairs.remove(key);
                let outcome = Outcome::Applied("same command");
                self.note_audit(offset, key, value, Some(signer), &outcome);
                return outcome;
            }
            Err(reason) => return Outcome::Skipped(reason),
        };
        let outcome = match value {
            None => self.tombstone(topic, key),
            Some(value) => match Envelope::decode(value) {
                Err(err) if topic == TopicKind::Commands && key.starts_with("task/") => Outcome::Skipped(
                    format!("record '{key}': {}", explain_spec(value).unwrap_or(err.to_string())),
                ),
                Err(DecodeError::UnsupportedVersion { found }) if found > crate::protocol() => {
                    match self.apply_newer(topic, offset, key, value) {
                        Ok(kind) => Outcome::Applied(kind),
                        Err(reason) => Outcome::Skipped(format!(
                            "record '{key}' of protocol {found} (this build reads up to {}): {reason}",
                            crate::protocol()
                        )),
                    }
                }
                Err(err) => Outcome::Skipped(format!("record '{key}': {err}")),
                Ok(envelope) => {
                    let kind = envelope.body.kind();
                    match self.apply_envelope(topic, offset, key, envelope) {
                        Ok(()) => Outcome::Applied(kind),
                        Err(reason) => Outcome::Skipped(format!("{kind} record '{key}': {reason}")),
                    }
                }
            },
        };
        if let Some(keys) = self.deleted_markers.get_mut(&topic) {
            keys.remove(key);
        }
        self.settle_trimmed(topic, key);
        if outcome == Outcome::Applied("deleted") {
            self.deleted_markers.entry(topic).or_default().insert(key.to_owned());
        }
        if let Outcome::Skipped(reason) = &outcome {
            // The newest definition of the task is unusable: the task fails, visibly.
            self.mark_invalid(topic, offset, key, value.is_some(), reason);
        }
        if matches!(topic, TopicKind::Assignments | TopicKind::Status) {
            if matches!(outcome, Outcome::Applied(_))
                && let Some(offsets) = self.offsets.get_mut(&(topic, key.to_owned()))
            {
                offsets.accepted = Some(offset);
            }
            self.note_settlement(topic, key, value.is_none());
        }
        if let (Some(signer), Outcome::Applied(_)) = (&signer, &outcome) {
            self.newest_signed.insert(key.to_owned(), (signer.at_ms, Some(signer.sshsig.clone())));
            if let Some(value) = value {
                self.accepted_commands.insert(key.to_owned(), value.into());
            }
            self.command_repairs.remove(key);
        }
        if topic == TopicKind::Commands
            && value.is_none()
            && self.auth.0.is_some()
            && matches!(outcome, Outcome::Applied(_))
        {
            self.accepted_commands.remove(key);
            self.command_repairs.remove(key);
            // Deleted: no copy of the deleted command counts as "the same command" any more.
            if let Some((_, standing)) = self.newest_signed.get_mut(key) {
                *standing = None;
            }
        }
        if topic == TopicKind::Commands {
            self.note_audit(offset, key, value, signer, &outcome);
        }
        outcome
    }

    /// Signed clusters (a policy is set): a command record (`task/`, `desired/`, `request/` on
    /// `commands`, with a value) is folded in only when its signature verifies with an authorized
    /// key allowed for its task and it is newer than the command accepted on its key; otherwise
    /// it is refused, changes nothing, and its task shows why. `Ok(None)`: no check applies.
    /// Tombstones are not signed (they carry no value): see docs/operations.md, "Security".
    fn authorize(
        &mut self,
        topic: TopicKind,
        offset: i64,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<Authorized, String> {
        // A node's mode (`mode/<node>`) is a command too, on no task: only a key without a
        // task restriction may give it.
        let target = command_task(key).map(Some).or_else(|| mode_node(key).map(|_| None));
        let (Some(policy), TopicKind::Commands, Some(value), Some(task)) =
            (self.auth.0.clone(), topic, value, target)
        else {
            return Ok(Authorized::Unchecked);
        };
        let signed = crate::auth::SignedParts::decode(value);
        if key.starts_with("request/") && signed.as_ref().is_ok_and(|parts| parts.kind == "deleted") {
            // The leader's deletion of a handled request: a node's record, read by its own rules.
            return Ok(Authorized::Unchecked);
        }
        let standing_entry = self.newest_signed.get(key).cloned();
        let standing = standing_entry.as_ref().map(|(at, sig)| (*at, sig.as_deref()));
        let checked = signed.and_then(|parts| {
            if let Some(reason) = restricted_field(&policy, &parts) {
                return Err(reason);
            }
            policy.check(key, task.as_ref().map_or("", TaskId::as_str), &parts, standing)
        });
        if let Ok(signer) = &checked
            && standing == Some((signer.at_ms, Some(signer.sshsig.as_str())))
        {
            return Ok(Authorized::Same(checked.expect("checked")));
        }
        checked.map(Authorized::New).map_err(|reason| {
            // The leader restores the key when it has something to restore: the accepted command,
            // or its deletion under this policy (never what an earlier policy let in).
            if self.accepted_commands.contains_key(key) || standing.is_some_and(|(_, sig)| sig.is_none()) {
                self.command_repairs.insert(key.to_owned());
            }
            let reason = format!("command '{key}' at offset {offset} refused: {reason}");
            let standing_at_ms = standing.map(|(at_ms, _)| at_ms);
            if let Some(task) = task {
                self.note_refusal(
                    task,
                    Refusal { offset, key: key.to_owned(), reason: reason.clone(), standing_at_ms },
                );
            }
            if self.audit.is_some() {
                self.note_audit(offset, key, Some(value), None, &Outcome::Skipped(reason.clone()));
            }
            reason
        })
    }

    /// Keeps the newest refusal of a task (by its offset on `commands`).
    fn note_refusal(&mut self, task: TaskId, refusal: Refusal) {
        if self.refused.get(&task).is_none_or(|known| known.offset < refusal.offset) {
            self.refused.insert(task, refusal);
        }
    }

    /// The refusal `status` shows for `task`: its newest refused command, while the command it
    /// was refused against still stands (no newer one was accepted on its key since). Judged by
    /// signing times, not offsets: after compaction the leader's copy of the standing command
    /// is all a reader finds of it, at an offset past the refusal.
    pub fn refusal(&self, task: &TaskId) -> Option<&Refusal> {
        self.refused.get(task).filter(|refusal| {
            self.newest_signed.get(&refusal.key).map(|(at_ms, _)| *at_ms) == refusal.standing_at_ms
        })
    }

    /// One line of `shiva-ctl audit`, when the reader keeps them.
    fn note_audit(
        &mut self,
        offset: i64,
        key: &str,
        value: Option<&[u8]>,
        signer: Option<crate::auth::Signer>,
        outcome: &Outcome,
    ) {
        let Some(audit) = self.audit.as_mut() else { return };
        let parts = value.map(crate::auth::SignedParts::decode);
        let (kind, sender, sent_at_ms) = match &parts {
            None => ("tombstone".to_owned(), None, None),
            Some(Ok(parts)) => (parts.kind.clone(), Some(parts.sender.clone()), Some(parts.sent_at_ms)),
            Some(Err(_)) => ("unreadable".to_owned(), None, None),
        };
        let outcome = match outcome {
            Outcome::Applied(_) => "accepted".to_owned(),
            Outcome::Skipped(reason) => format!("refused: {reason}"),
        };
        let signer = signer.or_else(|| match parts {
            // An open cluster checks no signature: show whose key it names, unverified.
            Some(Ok(crate::auth::SignedParts { sig: Some(sig), .. })) if self.auth.0.is_none() => {
                Some(crate::auth::Signer::unverified(&sig))
            }
            _ => None,
        });
        audit.push(AuditEntry { offset, key: key.to_owned(), kind, sender, signer, sent_at_ms, outcome });
    }

    /// Keeps `unsettled` in step with the offsets of `key`. A key whose accepted tombstone is
    /// its newest record is forgotten: the log no longer holds it (after compaction) and it is
    /// settled either way, so history trimmed away costs no memory. A settled run key is
    /// forgotten too (see `offsets`): absent, a key is settled, as it was.
    fn note_settlement(&mut self, topic: TopicKind, key: &str, tombstone: bool) {
        let id = (topic, key.to_owned());
        if self.offsets.get(&id).is_none_or(KeyOffsets::settled) {
            if tombstone || key.starts_with("run/") {
                self.offsets.remove(&id);
            }
            self.unsettled.remove(&id);
        } else {
            self.unsettled.insert(id);
        }
    }

    /// `task`, sharing the text of the view's copy when it holds one: a retained run does not
    /// keep its own copy of its task's id (issue 21, memory per run).
    fn shared_task(&self, task: TaskId) -> TaskId {
        self.runs.get_key_value(&task).map_or(task, |(shared, _)| shared.clone())
    }

    /// `node`, sharing the text of the id of its newest heartbeat when one was read (the ids
    /// of nodes never heard from are not kept apart: forged records could name any number).
    fn shared_node(&self, node: NodeId) -> NodeId {
        self.heartbeats.get_key_value(&node).map_or(node, |(shared, _)| shared.clone())
    }

    /// Keeps `open_runs` in step with one run's entry.
    fn note_run(&mut self, task: &TaskId, run: Uuid) {
        let open = self.run(task, &run).is_some_and(|entry| !entry.is_final());
        let id = (task.clone(), run);
        if open {
            self.open_runs.insert(id);
        } else {
            self.open_runs.remove(&id);
        }
    }

    /// A tombstone. On a leader-owned key (see [`is_leader_owned`]) it changes nothing: the
    /// leader deletes with a `deleted` record of its epoch first, and the tombstone that follows
    /// only lets compaction drop the key. A stray one (a deposed leader's, any client's) is
    /// skipped, so the key is unsettled and the leader writes its record again.
    fn tombstone(&mut self, topic: TopicKind, key: &str) -> Outcome {
        // A `trim` record's tombstone (the leader's, once the tombstones it was written for are
        // read back, or on a key whose newest record it does not hold) forgets it. One landing
        // while a key it deleted still waits for its tombstone is skipped: the `trim/` key is
        // unsettled, and the leader deletes each waiting key again with a `deleted` record on
        // the key itself (a compacted log without the `trim` record would hold the entry again).
        if matches!(topic, TopicKind::Assignments | TopicKind::Status) && key.starts_with("trim/") {
            if let Some(entry) = self.trims.get(&(topic, key.to_owned()))
                && !entry.pending.is_empty()
            {
                return Outcome::Skipped(format!(
                    "tombstone for '{key}' on {topic} ignored: {} key(s) it deleted still wait for their tombstone",
                    entry.pending.len()
                ));
            }
            self.forget_trim(topic, key);
            return Outcome::Applied("tombstone");
        }
        if is_leader_owned(topic, key) {
            return match self.holds_entry(topic, key) {
                true => Outcome::Skipped(format!(
                    "tombstone for '{key}' on {topic} ignored: its entry is deleted only by a `deleted` record of the leader's epoch"
                )),
                false => Outcome::Applied("tombstone"),
            };
        }
        // A claim's tombstone (the leader's, trimming settled epochs) forgets its key; what the
        // claim decided stays (the winners, the newest epoch): it was decided in log order.
        if topic == TopicKind::Assignments && key.starts_with("claim/") {
            self.epochs.claims.remove(key);
            return Outcome::Applied("tombstone");
        }
        // A node's heartbeat tombstone (the leader's, retiring a node long gone) forgets it
        // until its next heartbeat. Liveness is not read from here (nodes judge it from the
        // heartbeats they read), so a stray one only hides a node from `nodes` until then.
        if topic == TopicKind::Control
            && let Some(node) = key.strip_prefix("node/").and_then(|id| NodeId::new(id.to_owned()).ok())
        {
            self.heartbeats.remove(&node);
            return Outcome::Applied("tombstone");
        }
        // The resignation of an epoch before the newest is settled history: its tombstone (the
        // leader's, trimming the log) forgets it. The newest epoch's stays (a forged tombstone
        // cannot undo a resignation that matters).
        if topic == TopicKind::Assignments
            && let Some(epoch) = key.strip_prefix("resign/").and_then(|epoch| epoch.parse::<u64>().ok())
        {
            // (On a compacted log, the tombstone of a trimmed epoch's resignation may come
            // before any claim: there is nothing to forget.)
            if epoch >= self.epochs.newest && self.epochs.resigned.contains(&epoch) {
                return Outcome::Skipped(format!(
                    "tombstone for '{key}' ignored: epoch {epoch} is the newest"
                ));
            }
            self.epochs.resigned.remove(&epoch);
            return Outcome::Applied("tombstone");
        }
        // A departure of an incarnation its id's newest heartbeat no longer names (the node came
        // back as another, or was retired) is settled: its tombstone (the leader's) forgets it.
        // One of the newest incarnation stays (a forged tombstone cannot make a departed node
        // look alive).
        if topic == TopicKind::Control
            && let Some((node, incarnation)) =
                key.strip_prefix("leave/").and_then(|rest| rest.rsplit_once('/'))
            && let (Ok(node), Ok(incarnation)) = (NodeId::new(node.to_owned()), incarnation.parse::<Uuid>())
        {
            if self.heartbeats.get(&node).is_some_and(|entry| entry.incarnation == incarnation) {
                return Outcome::Skipped(format!(
                    "tombstone for '{key}' ignored: it is the node's newest incarnation"
                ));
            }
            self.left.remove(&(node, incarnation));
            return Outcome::Applied("tombstone");
        }
        if topic == TopicKind::Assignments
            && let Some(command) = key.strip_prefix("refusal/")
        {
            self.refusal_records.remove(command);
            if let Some(task) = command_task(command)
                && self.refused.get(&task).is_some_and(|refusal| refusal.key == command)
            {
                self.refused.remove(&task);
            }
            return Outcome::Applied("tombstone");
        }
        if let Some(name) = key::task_of(key, "secret").and_then(|name| TaskId::new(name).ok()) {
            match topic {
                TopicKind::Commands => {
                    self.secrets.remove(&name);
                }
                TopicKind::Assignments => {
                    self.secret_copies.remove(&name);
                }
                _ => return Outcome::Skipped(format!("tombstone for '{key}' on {topic} ignored")),
            }
            return Outcome::Applied("tombstone");
        }
        let task = key::task_of(key, "task").and_then(|id| TaskId::new(id).ok());
        let desired = key::task_of(key, "desired").and_then(|id| TaskId::new(id).ok());
        match (topic, task, desired) {
            (TopicKind::Commands, Some(task), _) => {
                self.specs.remove(&task);
                self.invalid.remove(&task);
            }
            (TopicKind::Commands, None, Some(_)) if self.auth.0.is_some() => {
                self.repair_after_tombstone(key);
                return Outcome::Skipped(format!(
                    "tombstone for '{key}' ignored: in a signed cluster a desired state changes only by a signed command"
                ));
            }
            (TopicKind::Commands, None, Some(task)) => {
                self.desired.remove(&task);
            }
            (TopicKind::Commands, None, None) if let Some(node) = mode_node(key) => {
                if self.auth.0.is_some() {
                    self.repair_after_tombstone(key);
                    return Outcome::Skipped(format!(
                        "tombstone for '{key}' ignored: in a signed cluster a node's mode changes only by a signed command"
                    ));
                }
                self.node_modes.remove(&node);
            }
            _ => return Outcome::Skipped(format!("tombstone for '{key}' on {topic} ignored")),
        }
        Outcome::Applied("tombstone")
    }

    /// Signed clusters: an unsigned tombstone on a command key changes nothing here, but
    /// compaction would keep it (and then drop it) in place of the accepted command, and a reader
    /// started later would not know the command: the leader writes the accepted one again.
    fn repair_after_tombstone(&mut self, key: &str) {
        if self.accepted_commands.contains_key(key) {
            self.command_repairs.insert(key.to_owned());
        }
    }

    /// The run of `task` whose intent is on `seat`.
    pub fn run_on_seat(&self, task: &TaskId, seat: u16) -> Option<Uuid> {
        self.runs_of(task).find(|run| run.seat() == Some(seat)).map(|run| run.id())
    }

    /// The run whose report is on `status` at `task`'s seat `seat` (the newest report read there).
    pub fn report_on_seat(&self, task: &TaskId, seat: u16) -> Option<Uuid> {
        self.runs_of(task).find(|run| run.report_seat() == Some(seat)).map(|run| run.id())
    }

    /// A report of run `by` landed on the `status` key of `task`'s seat `seat` at `offset`. Only
    /// the newest report of the key counts, as compaction keeps only it: the one it replaces
    /// leaves the view, and the run whose intent holds the seat, unless it is `by`, is
    /// overwritten when the report lies past the offset its leader had read (its own records
    /// may be among those compacted away, see [`RunEntry::overwritten`]).
    fn land_on_status_seat(&mut self, task: &TaskId, seat: u16, offset: i64, by: Uuid) {
        if let Some(holder) = self.report_on_seat(task, seat).filter(|holder| *holder != by) {
            self.change_run(task, holder, |entry| entry.report = None);
        }
        let Some(seated) = self.run_on_seat(task, seat).filter(|seated| *seated != by) else { return };
        let newly = self
            .run(task, &seated)
            .is_some_and(|run| !run.overwritten() && offset > run.status_seen().unwrap_or(i64::MAX));
        if newly {
            self.change_run(task, seated, |entry| entry.overwritten = true);
        }
    }

    /// The run whose record is the entry of run key `named` of `task` on `topic`: the run whose
    /// intent (on `assignments`) or report (on `status`) is on that key, by its run id with no
    /// seat, or on that seat.
    pub fn run_on_key(&self, topic: TopicKind, task: &TaskId, named: key::RunKey) -> Option<Uuid> {
        match (topic, named) {
            (TopicKind::Assignments, key::RunKey::Id(id)) => {
                self.run(task, &id).filter(|run| run.has_intent() && run.seat().is_none()).map(|_| id)
            }
            (TopicKind::Assignments, key::RunKey::Seat(seat)) => self.run_on_seat(task, seat),
            (_, key::RunKey::Id(id)) => {
                self.run(task, &id).filter(|run| run.has_report() && run.report_seat().is_none()).map(|_| id)
            }
            (_, key::RunKey::Seat(seat)) => self.report_on_seat(task, seat),
        }
    }

    /// Whether the view holds an entry for a leader-owned key.
    fn holds_entry(&self, topic: TopicKind, key: &str) -> bool {
        let task = |kind| key::task_of(key, kind).and_then(|id| TaskId::new(id).ok());
        if let Some((task, run)) = key::run_key(key) {
            return self.run_on_key(topic, &task, run).is_some();
        }
        if let Some((task, request)) = key::task_and_uuid(key, "request") {
            return self.requests.get(&task).is_some_and(|requests| requests.contains_key(&request));
        }
        match (topic, task("task"), task("sched")) {
            (TopicKind::Assignments, Some(task), _) => self.assignments.contains_key(&task),
            (TopicKind::Status, Some(task), _) => self.statuses.contains_key(&task),
            (TopicKind::Assignments, None, Some(task)) => self.scheds.contains_key(&task),
            _ => false,
        }
    }

    /// Deletes the entry of a leader-owned key (a `deleted` record of the leader's epoch).
    fn delete_entry(&mut self, topic: TopicKind, key: &str) {
        let task = |kind| key::task_of(key, kind).and_then(|id| TaskId::new(id).ok());
        if let Some((task, run)) = key::run_key(key) {
            let Some(run) = self.run_on_key(topic, &task, run) else { return };
            self.change_run(&task, run, |entry| match topic {
                TopicKind::Assignments => entry.intent = None,
                _ => entry.report = None,
            });
            return;
        }
        if let Some((task, request)) = key::task_and_uuid(key, "request") {
            if let Some(requests) = self.requests.get_mut(&task) {
                requests.remove(&request);
                if requests.is_empty() {
                    self.requests.remove(&task);
                }
            }
            return;
        }
        match (topic, task("task"), task("sched")) {
            (TopicKind::Assignments, Some(task), _) => {
                self.assignments.remove(&task);
            }
            (TopicKind::Status, Some(task), _) => {
                self.statuses.remove(&task);
            }
            (TopicKind::Assignments, None, Some(task)) => {
                self.scheds.remove(&task);
            }
            _ => {}
        }
    }

    /// Whether a `deleted` or `trim` record of `epoch` from the sender of `env` deletes on
    /// `topic`: on `assignments`, from the leader of the newest epoch. Other topics are read apart
    /// from `assignments`, behind or ahead of its claims: there, from the winner of its epoch,
    /// whether that epoch is still the newest, or (claim not read yet) ahead of it. An epoch
    /// before the floor was trimmed: its leader's writes had all settled, so its record is
    /// history.
    fn accepts_deletion(
        &self,
        topic: TopicKind,
        epoch: u64,
        sender: &str,
        incarnation: Option<Uuid>,
    ) -> Result<(), String> {
        match topic {
            TopicKind::Assignments => self.epochs.accepts(epoch, sender, incarnation),
            _ => self.epochs.winners.get(&epoch).map_or_else(
                || match epoch > self.epochs.newest || (1..self.epochs.floor).contains(&epoch) {
                    true => Ok(()),
                    false => Err(format!("epoch {epoch} has no winner")),
                },
                |winner| match winner.node.as_str() == sender && Some(winner.incarnation) == incarnation {
                    true => Ok(()),
                    false => Err(format!("{sender} did not win epoch {epoch}")),
                },
            ),
        }
    }

    /// Forgets the `trim` record on `key` of `topic` (a tombstone, or a new record on its key):
    /// the keys it listed that still wait for their tombstone keep waiting (see `trimmed`).
    fn forget_trim(&mut self, topic: TopicKind, key: &str) {
        self.trims.remove(&(topic, key.to_owned()));
    }

    /// A record (of any sender, tombstones included) landed on `key` of `topic`: a key a `trim`
    /// listed no longer waits for its tombstone.
    fn settle_trimmed(&mut self, topic: TopicKind, key: &str) {
        // Every record read passes here; almost always nothing waits (and the lookup would
        // copy the key).
        if self.trimmed.is_empty() {
            return;
        }
        let Some(trim) = self.trimmed.remove(&(topic, key.to_owned())) else { return };
        if let Some(entry) = self.trims.get_mut(&(topic, trim)) {
            entry.pending.remove(key);
        }
    }

    /// Keys a `trim` record deleted whose tombstone has not been read (yet, or ever: its write
    /// failed): the leader writes it again, so the key does not stay in the log for good.
    pub fn trimmed_keys(&self) -> impl Iterator<Item = (TopicKind, &str)> + '_ {
        self.trimmed.keys().map(|(topic, key)| (*topic, key.as_str()))
    }

    /// Whether `key` of `topic` was deleted by a `trim` record and waits for its tombstone: until
    /// then the key's last record in the log is still the entry (a reader of the compacted log
    /// would hold it, should the `trim` record itself be gone), so what depends on its being
    /// gone waits (a run's report, see the scheduler's orphans).
    pub fn is_trimmed(&self, topic: TopicKind, key: &str) -> bool {
        self.trimmed.contains_key(&(topic, key.to_owned()))
    }

    /// Whether an intent of `task` (a `run/<task>/<uuid>` key of `assignments`, not one of a
    /// longer task id that shares the prefix) was deleted by a `trim` record and waits for its
    /// tombstone (see [`LogView::is_trimmed`]).
    pub fn trimmed_runs_of(&self, task: &TaskId) -> bool {
        key::has_run_of(&self.trimmed, TopicKind::Assignments, task)
    }

    /// Whether the view holds a `trim` record on `key` of `topic`.
    pub fn holds_trim(&self, topic: TopicKind, key: &str) -> bool {
        self.trims.contains_key(&(topic, key.to_owned()))
    }

    /// `trim` records on whose key something landed after them (a stray tombstone, garbage),
    /// with the keys they deleted that still wait for their tombstone: the leader writes the
    /// deletion of those again, so a compacted log keeps it.
    pub fn unsettled_trims(&self) -> impl Iterator<Item = (TopicKind, &BTreeSet<String>)> + '_ {
        self.trims
            .iter()
            .filter(|((topic, key), entry)| !entry.pending.is_empty() && !self.is_settled(*topic, key))
            .map(|((topic, _), entry)| (*topic, &entry.pending))
    }

    /// `trim` records all of whose keys' tombstones were read: the leader tombstones them.
    pub fn spent_trims(&self) -> impl Iterator<Item = (TopicKind, &str)> + '_ {
        self.trims
            .iter()
            .filter(|(_, entry)| entry.pending.is_empty())
            .map(|((topic, key), _)| (*topic, key.as_str()))
    }

    /// The epochs of the `trim` records in the log (the leader keeps their claims).
    pub fn trim_epochs(&self) -> impl Iterator<Item = u64> + '_ {
        self.trims.values().map(|entry| entry.epoch)
    }

    /// How many `trim` records the view holds (spent or not).
    pub fn trims_held(&self) -> usize {
        self.trims.len()
    }

    /// The first claim for `newest + 1` wins it; on a log with no claim won yet, the first claim
    /// wins its epoch, whichever it is: the leader trims the claims of settled epochs (see
    /// `docs/protocol.md`, "Claims"), so a compacted log starts at a later one.
    fn claim(&mut self, epoch: u64, node: NodeId, incarnation: Uuid, offset: i64) -> Result<(), String> {
        if epoch == 0 || epoch > MAX_EPOCH {
            return Err(format!("epoch {epoch} is out of range (1 to {MAX_EPOCH})"));
        }
        if self.epochs.newest == 0 {
            if epoch > MAX_FIRST_EPOCH {
                return Err(format!("a first claim may name at most epoch {MAX_FIRST_EPOCH}, not {epoch}"));
            }
            self.epochs.floor = epoch;
        } else if epoch <= self.epochs.newest {
            return Err(format!("lost: epoch {epoch} is already taken"));
        } else if epoch != self.epochs.newest + 1 {
            return Err(format!("epoch {epoch} jumps past the newest epoch {}", self.epochs.newest));
        }
        self.epochs.newest = epoch;
        self.epochs.winners.insert(epoch, Winner { node, incarnation, offset });
        Ok(())
    }

    /// A record of a newer protocol than this build reads. Its body is not read, but claims,
    /// heartbeats and departures count by key and header (which every version keeps): a newer
    /// node's claim takes its epoch here as everywhere, so one epoch never has two winners, and
    /// a newer node is seen alive (a node refuses to lead while one is, see `shiva-node`'s
    /// election). Everything else is skipped.
    fn apply_newer(
        &mut self,
        topic: TopicKind,
        offset: i64,
        key: &str,
        value: &[u8],
    ) -> Result<&'static str, String> {
        let header = crate::Header::decode(value).ok_or("no readable envelope header")?;
        let node = NodeId::new(header.sender.clone()).map_err(|_| "sender is not a node")?;
        let incarnation = header.incarnation.ok_or("sender has no incarnation")?;
        match (topic, header.kind.as_str()) {
            (TopicKind::Assignments, "claim") => {
                let mut parts = key.strip_prefix("claim/").ok_or("not a claim key")?.splitn(3, '/');
                let epoch =
                    parts.next().and_then(|epoch| epoch.parse::<u64>().ok()).ok_or("no epoch in its key")?;
                if parts.next() != Some(node.as_str()) || parts.next().is_none_or(str::is_empty) {
                    return Err(format!("key does not match 'claim/{epoch}/{node}/<claim-id>'"));
                }
                self.claim(epoch, node, incarnation, offset)?;
                Ok("claim")
            }
            (TopicKind::Control, "heartbeat") => {
                expect_key(key, &key::node(&node))?;
                // Not leader-capable unless its body says so (a record with no readable body
                // does not stop anyone from leading).
                let mut heartbeat = Heartbeat::of_newer_protocol(header.v);
                heartbeat.leader_capable = false;
                // Fields every version keeps in its heartbeat body (docs/protocol.md, "Versions").
                #[derive(serde::Deserialize)]
                struct Kept {
                    #[serde(default)]
                    leader_capable: Option<bool>,
                    #[serde(default)]
                    hostname: Option<String>,
                    #[serde(default)]
                    version: Option<String>,
                }
                #[derive(serde::Deserialize)]
                struct Outer {
                    body: Kept,
                }
                if let Ok(Outer { body }) = serde_json::from_slice::<Outer>(value) {
                    heartbeat.leader_capable = body.leader_capable.unwrap_or(false);
                    heartbeat.hostname = body.hostname.unwrap_or_default().chars().take(253).collect();
                    heartbeat.version = body.version.map(|version| version.chars().take(64).collect());
                }
                let entry = HeartbeatEntry { incarnation, offset, sent_at_ms: header.sent_at_ms, heartbeat };
                self.heartbeats.insert(node, entry);
                Ok("heartbeat")
            }
            (TopicKind::Control, "leave") => {
                expect_key(key, &key::leave(&node, incarnation))?;
                self.left.insert((node, incarnation));
                Ok("leave")
            }
            (_, kind) => Err(format!("a '{kind}' record is read only by its protocol's readers")),
        }
    }

    fn apply_envelope(
        &mut self,
        topic: TopicKind,
        offset: i64,
        key: &str,
        env: Envelope,
    ) -> Result<(), String> {
        let node_sender = || NodeId::new(env.sender.clone()).ok().zip(env.incarnation);
        match (topic, env.body) {
            (TopicKind::Commands, Body::Task(spec)) => {
                expect_key(key, &key::task(&spec.id))?;
                spec.validate_all().map_err(|err| err.to_string())?;
                let submitted_ms = i64::try_from(env.sent_at_ms).unwrap_or(i64::MAX);
                self.invalid.remove(&spec.id);
                self.specs.insert(spec.id.clone(), SpecEntry { spec, revision: offset, submitted_ms });
            }
            (TopicKind::Commands, Body::Secret(secret)) => {
                expect_key(key, &key::secret(&secret.name))?;
                if secret.source.is_some() {
                    return Err("an operator's secret names no source".into());
                }
                self.secrets.insert(secret.name.clone(), (offset, secret));
            }
            (TopicKind::Assignments, Body::Secret(secret)) => {
                node_sender().ok_or("a secret's copy comes from a node")?;
                expect_key(key, &key::secret(&secret.name))?;
                if secret.source.is_none() {
                    return Err("a copy names the revision it re-encrypts (source)".into());
                }
                self.secret_copies.insert(secret.name.clone(), secret);
            }
            (TopicKind::Assignments, Body::Refusal(refusal)) => {
                node_sender().ok_or("a refusal comes from the leader, a node")?;
                expect_key(key, &key::refusal(&refusal.key))?;
                let task = command_task(&refusal.key).ok_or("a refusal names a command key")?;
                self.refusal_records.insert(refusal.key.clone());
                self.note_refusal(task, refusal);
            }
            (TopicKind::Commands, Body::Desired(desired)) => {
                expect_key(key, &key::desired(&desired.task))?;
                self.desired.insert(desired.task, desired.state);
            }
            (TopicKind::Commands, Body::MoveRequest(request)) => {
                expect_key(key, &key::move_request(&request.task))?;
                let sent_ms = i64::try_from(env.sent_at_ms).unwrap_or(i64::MAX);
                if request.until_ms.saturating_sub(sent_ms) > crate::commands::MOVE_WINDOW_MS {
                    return Err(format!(
                        "a move holds at most {} s after it is sent",
                        crate::commands::MOVE_WINDOW_MS / 1000
                    ));
                }
                self.moves.insert(request.task.clone(), request);
            }
            (TopicKind::Commands, Body::NodeMode(mode)) => {
                expect_key(key, &key::mode(&mode.node))?;
                if mode.deadline_ms.is_some() && mode.mode != Mode::Draining {
                    return Err("only a drain has a deadline".into());
                }
                self.node_modes.insert(mode.node.clone(), mode);
            }
            (TopicKind::Control, Body::Heartbeat(heartbeat)) => {
                let (node, incarnation) = node_sender().ok_or("sender is not a node with an incarnation")?;
                expect_key(key, &key::node(&node))?;
                let entry = HeartbeatEntry { incarnation, offset, sent_at_ms: env.sent_at_ms, heartbeat };
                self.heartbeats.insert(node, entry);
            }
            (TopicKind::Control, Body::Leave(_)) => {
                let (node, incarnation) = node_sender().ok_or("sender is not a node with an incarnation")?;
                expect_key(key, &key::leave(&node, incarnation))?;
                self.left.insert((node, incarnation));
            }
            (TopicKind::Assignments, Body::Claim(claim)) => {
                let (node, incarnation) = node_sender().ok_or("sender is not a node with an incarnation")?;
                let prefix = format!("claim/{}/{}/", claim.epoch, node);
                if !key.starts_with(&prefix) {
                    return Err(format!("key does not match '{prefix}<claim-id>'"));
                }
                self.claim(claim.epoch, node, incarnation, offset)?;
            }
            (TopicKind::Assignments, Body::Resign(resign)) => {
                expect_key(key, &key::resign(resign.epoch))?;
                self.epochs.accepts(resign.epoch, &env.sender, env.incarnation)?;
                self.epochs.resigned.insert(resign.epoch);
            }
            (TopicKind::Assignments, Body::Members(members)) => {
                expect_key(key, key::MEMBERS)?;
                self.epochs.accepts(members.epoch, &env.sender, env.incarnation)?;
                self.epochs.active.insert(members.epoch);
                self.members = Some(members);
            }
            (TopicKind::Assignments, Body::Assignment(assignment)) => {
                expect_key(key, &key::task(&assignment.task))?;
                self.epochs.accepts(assignment.epoch, &env.sender, env.incarnation)?;
                if assignment.spec.id != assignment.task {
                    return Err("its spec is for another task".into());
                }
                assignment.spec.validate().map_err(|err| format!("its spec is invalid: {err}"))?;
                self.epochs.active.insert(assignment.epoch);
                let task = assignment.task.clone();
                self.assignments.insert(task, AssignmentEntry { assignment, offset });
            }
            (TopicKind::Status, Body::Status(status)) => {
                let (node, incarnation) = node_sender().ok_or("sender is not a node with an incarnation")?;
                expect_key(key, &key::task(&status.task))?;
                let task = status.task.clone();
                self.statuses.insert(task, StatusEntry { node, incarnation, offset, status });
            }
            (TopicKind::Commands, Body::RunRequest(request)) => {
                expect_key(key, &key::request(&request.task, request.request))?;
                self.requests.entry(request.task).or_default().insert(request.request, offset);
            }
            (TopicKind::Assignments, Body::Sched(sched)) => {
                expect_key(key, &key::sched(&sched.task))?;
                self.epochs.accepts(sched.epoch, &env.sender, env.incarnation)?;
                self.epochs.active.insert(sched.epoch);
                self.scheds.insert(sched.task.clone(), SchedEntry { sched, offset });
            }
            (TopicKind::Assignments, Body::RunIntent(mut intent)) => {
                check_seat(intent.seat)?;
                if intent.seat.is_some() && intent.status_seen.is_none() {
                    return Err(
                        "an intent on a seat names the status offset its leader had read (status_seen)"
                            .into(),
                    );
                }
                expect_key(key, &key::intent(&intent))?;
                self.epochs.accepts(intent.epoch, &env.sender, env.incarnation)?;
                if intent.spec.id != intent.task {
                    return Err("its spec is for another task".into());
                }
                match self.intent_specs.0.get(&intent.task) {
                    Some(shared) if *shared == intent.spec => intent.spec = shared.clone(),
                    _ => {
                        intent.spec.validate().map_err(|err| format!("its spec is invalid: {err}"))?;
                        self.intent_specs.0.insert(intent.task.clone(), intent.spec.clone());
                    }
                }
                self.epochs.active.insert(intent.epoch);
                intent.task = self.shared_task(intent.task);
                intent.node = intent.node.map(|node| self.shared_node(node));
                let (task, run) = (intent.task.clone(), intent.run_id);
                // The run on its seat before leaves the view: its intent is overwritten (as a
                // `deleted` record would delete it); its report, if any, stays until this run's
                // own replaces it on the seat's `status` key (keyed by its run id: an orphan).
                if let Some(seat) = intent.seat
                    && let Some(before) = self.run_on_seat(&task, seat).filter(|before| *before != run)
                {
                    self.change_run(&task, before, |entry| entry.intent = None);
                }
                // The report on the seat's `status` key, if it is another run's and past what the
                // leader had read, overwrote this run's own (see `RunEntry::overwritten`).
                let overwritten =
                    intent.seat.and_then(|seat| self.report_on_seat(&task, seat)).is_some_and(|holder| {
                        let offset = self.run(&task, &holder).and_then(|held| held.report_offset());
                        holder != run && offset > intent.status_seen
                    });
                self.change_run(&task, run, |entry| {
                    entry.intent = Some((intent, offset));
                    entry.overwritten = overwritten;
                });
            }
            (TopicKind::Status, Body::RunReport(mut report)) => {
                let (node, incarnation) = node_sender().ok_or("sender is not a node with an incarnation")?;
                check_seat(report.seat)?;
                expect_key(key, &key::report(&report))?;
                report.task = self.shared_task(report.task);
                let node = self.shared_node(node);
                let (task, run, seat) = (report.task.clone(), report.run_id, report.seat);
                let entry = ReportEntry { node, incarnation, offset, report };
                if let Some(seat) = seat {
                    self.land_on_status_seat(&task, seat, offset, run);
                }
                self.change_run(&task, run, |run| {
                    run.report = Some(entry);
                    run.overwritten = false;
                });
            }
            (topic, Body::Deleted(deleted)) if is_leader_owned(topic, key) => {
                self.accepts_deletion(topic, deleted.epoch, &env.sender, env.incarnation)?;
                self.epochs.active.insert(deleted.epoch);
                self.delete_entry(topic, key);
            }
            (topic @ (TopicKind::Assignments | TopicKind::Status), Body::Trim(trim)) => {
                if key::trim_epoch(key) != Some(trim.epoch) {
                    return Err(format!("key does not match 'trim/{}/<id>'", trim.epoch));
                }
                if trim.keys.len() > crate::records::MAX_TRIM_KEYS {
                    return Err(format!(
                        "it lists {} keys (at most {})",
                        trim.keys.len(),
                        crate::records::MAX_TRIM_KEYS
                    ));
                }
                let listed: BTreeSet<&str> = trim.keys.iter().map(String::as_str).collect();
                if listed.len() != trim.keys.len() {
                    return Err("it lists a key twice".into());
                }
                if let Some(other) = listed.iter().find(|listed| key::run_key(listed).is_none()) {
                    return Err(format!("'{other}' is not a run key"));
                }
                self.accepts_deletion(topic, trim.epoch, &env.sender, env.incarnation)?;
                self.epochs.active.insert(trim.epoch);
                self.forget_trim(topic, key);
                // A key an earlier `trim` record deleted and that still waits for its tombstone
                // (a copy of that record planned again, or the leader's repair of one whose key
                // something else landed on) now waits under this one.
                let mut pending = BTreeSet::new();
                for listed in trim.keys {
                    let waiting = self.trimmed.get(&(topic, listed.clone())).cloned();
                    if self.holds_entry(topic, &listed) {
                        self.delete_entry(topic, &listed);
                    } else if let Some(earlier) = waiting {
                        if let Some(entry) = self.trims.get_mut(&(topic, earlier)) {
                            entry.pending.remove(&listed);
                        }
                    } else {
                        continue;
                    }
                    self.trimmed.insert((topic, listed.clone()), key.to_owned());
                    pending.insert(listed);
                }
                self.trims.insert((topic, key.to_owned()), TrimEntry { epoch: trim.epoch, pending });
            }
            (topic, body) => return Err(format!("a {} record does not belong on {topic}", body.kind())),
        }
        Ok(())
    }
}

/// Whether `key` on `topic` is owned by the leader, so that only a `deleted` record of the
/// leader's epoch deletes its entry: `task/`, `sched/` and `run/` on `assignments`, `task/` and
/// `run/` on `status`, `request/` on `commands`.
pub fn is_leader_owned(topic: TopicKind, key: &str) -> bool {
    match topic {
        TopicKind::Assignments => ["task/", "sched/", "run/"].iter().any(|prefix| key.starts_with(prefix)),
        TopicKind::Status => ["task/", "run/"].iter().any(|prefix| key.starts_with(prefix)),
        TopicKind::Commands => key.starts_with("request/"),
        _ => false,
    }
}

/// Why the body of a task record that failed to decode is not a spec, naming the field
/// (`field 'max_catch_up': invalid value…`), when it is a version-1 envelope of kind `task`.
fn explain_spec(value: &[u8]) -> Option<String> {
    if value.len() > crate::records::MAX_RECORD_BYTES {
        return None;
    }
    let envelope: serde_json::Value = serde_json::from_slice(value).ok()?;
    if envelope.get("kind")?.as_str()? != "task" || envelope.get("v")?.as_u64()? != 1 {
        return None;
    }
    let body = envelope.get("body")?;
    match serde_path_to_error::deserialize::<_, TaskSpec>(body) {
        Ok(_) => None,
        Err(err) => Some(format!("invalid task spec: field '{}': {}", err.path(), err.inner())),
    }
}

/// The message of a panic's payload (`panic!("…")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// What the check of a command found.
enum Authorized {
    /// No check applies (an open cluster, not a command, a tombstone).
    Unchecked,
    /// A new command, signed by this key.
    New(crate::auth::Signer),
    /// The accepted command itself, written again.
    Same(crate::auth::Signer),
}

/// A task spec that a key restricted to task prefixes may not give: `user` and `workdir` would
/// let a tenant act as another user, or write where that tenant has no business.
fn restricted_field(policy: &crate::auth::Policy, parts: &crate::auth::SignedParts) -> Option<String> {
    if parts.kind != "task" {
        return None;
    }
    let key = parts.sig.as_ref()?;
    if !policy.is_restricted(&key.key) {
        return None;
    }
    ["user", "workdir"]
        .into_iter()
        .find(|field| parts.body.get(*field).is_some_and(|value| !value.is_null()))
        .map(|field| format!("a key restricted to task prefixes may not set '{field}'"))
}

/// The task a command key names: `task/<id>`, `desired/<id>`, `request/<id>/<request-id>`;
/// for `secret/<name>`, the name (an authorized key's prefixes apply to it as to a task id).
/// The node a `mode/<node>` key names.
pub fn mode_node(key: &str) -> Option<NodeId> {
    NodeId::new(key.strip_prefix("mode/")?).ok()
}

/// The task a command key names (`task/`, `desired/`, `secret/`, `move/`, `request/`).
pub fn command_task(key: &str) -> Option<TaskId> {
    let id = key::task_of(key, "task")
        .or_else(|| key::task_of(key, "desired"))
        .or_else(|| key::task_of(key, "secret"))
        .or_else(|| key::task_of(key, "move"))
        .or_else(|| key::task_of(key, "request").and_then(|rest| rest.rsplit_once('/')).map(|(id, _)| id))?;
    TaskId::new(id).ok()
}

/// A seat within the range (see [`crate::runs::MAX_SEATS`]).
fn check_seat(seat: Option<u16>) -> Result<(), String> {
    match seat.is_some_and(|seat| usize::from(seat) >= crate::runs::MAX_SEATS) {
        true => Err(format!("its seat is past the last ({})", crate::runs::MAX_SEATS - 1)),
        false => Ok(()),
    }
}

fn expect_key(found: &str, expected: &str) -> Result<(), String> {
    if found == expected {
        Ok(())
    } else {
        Err(format!("key does not match its body (expected '{expected}')"))
    }
}
