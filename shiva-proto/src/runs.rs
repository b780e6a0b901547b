//! Records of periodic and one-shot runs, and how a run's state follows from them.
//!
//! * `commands` `request/<task>/<request-id>` ([`RunRequest`]): an operator's "run now";
//! * `assignments` `sched/<task>` ([`Sched`]): the leader's firing position for the task, the
//!   source of truth for what has fired;
//! * `assignments` `run/<task>/<run-id>` ([`RunIntent`]): the leader's launch intent, written
//!   ahead of the run's instant; later rewritten to ask for a stop or to record a verdict
//!   (`lost`, `missed`, `skipped`) for a run nobody will report on;
//! * `status` `run/<task>/<run-id>` ([`RunReport`]): the runner's account of the run.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{NodeId, TaskId};
use crate::records::ExitInfo;
use crate::spec::TaskSpec;

/// What a run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "trigger", rename_all = "snake_case")]
pub enum Trigger {
    /// A periodic task's slot (UTC, ms since the Unix epoch).
    Slot {
        /// The slot instant.
        slot_ms: i64,
    },
    /// An operator's `run` request.
    Request {
        /// The request id.
        request: Uuid,
    },
    /// A one-shot task at a spec revision.
    Once {
        /// The spec revision it runs.
        revision: i64,
    },
}

impl Trigger {
    /// The slot, for periodic runs.
    pub fn slot_ms(&self) -> Option<i64> {
        match self {
            Trigger::Slot { slot_ms } => Some(*slot_ms),
            _ => None,
        }
    }
}

/// A run that is due but waits (overlap `queue` or `replace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Due {
    /// Why it runs.
    #[serde(flatten)]
    pub trigger: Trigger,
    /// Its attempt number.
    pub attempt: u32,
}

/// The state of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    /// Intent written; not started yet.
    Scheduled,
    /// The runner wrote its start record and is about to launch (or launching).
    Starting,
    /// The child runs.
    Running,
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, killed by a signal, or could not be started.
    Failed,
    /// Stopped for exceeding `max_runtime`.
    TimedOut,
    /// Stopped on request (kill, replace, delete, suspend of a queued run, node shutdown).
    Stopped,
    /// Its node died (or restarted) after the start record: nobody knows how it ended.
    Lost,
    /// Its node died before the start record: it never ran.
    Missed,
    /// Not launched: the overlap policy dropped it.
    Skipped,
}

impl RunPhase {
    /// The name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Scheduled => "scheduled",
            RunPhase::Starting => "starting",
            RunPhase::Running => "running",
            RunPhase::Succeeded => "succeeded",
            RunPhase::Failed => "failed",
            RunPhase::TimedOut => "timed_out",
            RunPhase::Stopped => "stopped",
            RunPhase::Lost => "lost",
            RunPhase::Missed => "missed",
            RunPhase::Skipped => "skipped",
        }
    }

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        !matches!(self, RunPhase::Scheduled | RunPhase::Starting | RunPhase::Running)
    }
}

/// `commands` `request/<task>/<request-id>` body: run the task now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// The task.
    pub task: TaskId,
    /// A fresh id per request.
    pub request: Uuid,
}

/// How a one-shot task ended for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `succeeded` or `failed`.
    pub state: RunPhase,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `assignments` `sched/<task>` body: a leader write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sched {
    /// The writing leader's epoch.
    pub epoch: u64,
    /// The task.
    pub task: TaskId,
    /// The spec revision this position belongs to.
    pub spec_revision: i64,
    /// Periodic: where its slots count from (ms, the leader's clock; see `shiva-node`'s
    /// `scheduler::origin`), written once by the first leader to plan the task (absent from
    /// older leaders' records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_ms: Option<i64>,
    /// Periodic: every slot up to this instant (ms) is decided: launched or dropped.
    #[serde(default)]
    pub decided_through_ms: Option<i64>,
    /// Periodic: slots dropped so far (catch-up policy, deadline, cap, overlap).
    #[serde(default)]
    pub skipped: u64,
    /// A due run waiting for the current one to end (overlap `queue` or `replace`).
    #[serde(default)]
    pub queued: Option<Due>,
    /// Periodic: suspended since this instant (ms); slots meanwhile are not caught up.
    #[serde(default)]
    pub suspended_at_ms: Option<i64>,
    /// One-shot: the newest attempt launched (0: none yet).
    #[serde(default)]
    pub attempt: u32,
    /// One-shot: the next attempt may start at this instant (ms); `None` while one runs.
    #[serde(default)]
    pub next_at_ms: Option<i64>,
    /// One-shot: the final outcome.
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

impl Sched {
    /// A task's position before anything was decided.
    pub fn fresh(epoch: u64, task: TaskId, spec_revision: i64) -> Sched {
        Sched {
            epoch,
            task,
            spec_revision,
            origin_ms: None,
            decided_through_ms: None,
            skipped: 0,
            queued: None,
            suspended_at_ms: None,
            attempt: 0,
            next_at_ms: None,
            outcome: None,
        }
    }
}

/// Seats a task's launch intents may take in its history (`run/<task>/@<seat>`, see
/// [`RunIntent::seat`]): at most this many, 0 to 4095.
pub const MAX_SEATS: usize = 4096;

/// `assignments` `run/<task>/<run-id>` (or `run/<task>/@<seat>`) body: a leader write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIntent {
    /// The writing leader's epoch.
    pub epoch: u64,
    /// The task.
    pub task: TaskId,
    /// Derived from the task, the trigger and the attempt: the same on every leader.
    pub run_id: Uuid,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Why it runs.
    #[serde(flatten)]
    pub trigger: Trigger,
    /// The runner; `None` when the run is not launched (`skipped`).
    #[serde(default)]
    pub node: Option<NodeId>,
    /// The incarnation of `node` that runs it (absent from older leaders): another incarnation
    /// of the same id does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<Uuid>,
    /// When the runner launches it (ms, the leader's clock): the slot plus the task's jitter,
    /// or at once.
    pub launch_at_ms: i64,
    /// The leader's clock when it first wrote the intent (absent from older leaders): with
    /// `launch_at_ms` it tells the runner how long to wait, on the runner's own clock, from when
    /// it reads the intent (see `shiva-node`'s `runner::runs::launch_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_at_ms: Option<i64>,
    /// Offset of the spec record it runs.
    pub spec_revision: i64,
    /// The spec to run (shared: the view keeps one copy per task for all its runs).
    pub spec: std::sync::Arc<TaskSpec>,
    /// The leader asks the runner to stop it (or not to start it), with the reason.
    #[serde(default)]
    pub stop: Option<String>,
    /// The leader's verdict on a run nobody reports on: `lost`, `missed` or `skipped`; on an
    /// intent a later leader restamped (wrote again under its epoch) after the runner reported
    /// the run over, that end, so a copy of the record landing late is itself over.
    #[serde(default)]
    pub verdict: Option<RunPhase>,
    /// Detail for the verdict.
    #[serde(default)]
    pub note: Option<String>,
    /// The seat of the task's history the intent is written on (`run/<task>/@<seat>`, 0 to
    /// [`MAX_SEATS`] - 1), taken by a later run once this one leaves the history: the later
    /// intent overwrites this one, and compaction drops this one for free (issue 21). Absent:
    /// keyed by its run id, and deleted with a `deleted` or `trim` record and a tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seat: Option<u16>,
    /// With a seat: the newest `status` offset the leader had read when it first wrote the
    /// intent. The run's reports go on the seat's key of `status` too, over those of the run
    /// before; a record on that key past this offset that is not the run's own (a late copy of
    /// an earlier run's report, anything else) leaves the run's own unreadable in a compacted
    /// log, so a reader takes the run as maybe started: never `missed`, never launched again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_seen: Option<i64>,
}

/// `status` `run/<task>/<run-id>` body, written by the runner (the envelope's sender).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// The task.
    pub task: TaskId,
    /// The run.
    pub run_id: Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// Why it runs.
    #[serde(flatten)]
    pub trigger: Trigger,
    /// Its state.
    pub state: RunPhase,
    /// The child's pid once started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// When the child started (ms, the runner's clock: for display).
    #[serde(default)]
    pub started_ms: Option<i64>,
    /// How long after its launch instant the child started (ms, measured on the runner's clock
    /// alone; absent from older runners): what the leader reads of a start, never `started_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_ms: Option<i64>,
    /// When it ended (ms).
    #[serde(default)]
    pub ended_ms: Option<i64>,
    /// How it ended.
    #[serde(default)]
    pub exit: Option<ExitInfo>,
    /// Detail (spawn error, stop reason…).
    #[serde(default)]
    pub message: Option<String>,
    /// The seat its intent is on (`run/<task>/@<seat>` on `status` too); absent: keyed by run
    /// id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seat: Option<u16>,
}

impl RunReport {
    /// A record of `intent`'s run in `state`: its task, run, attempt and trigger, nothing else.
    pub fn of(intent: &RunIntent, state: RunPhase) -> RunReport {
        RunReport {
            task: intent.task.clone(),
            run_id: intent.run_id,
            attempt: intent.attempt,
            trigger: intent.trigger,
            state,
            pid: None,
            started_ms: None,
            late_ms: None,
            ended_ms: None,
            exit: None,
            message: None,
            seat: intent.seat,
        }
    }
}

/// The uuid namespace of run ids.
const RUN_NAMESPACE: Uuid = Uuid::from_u128(0x5b1f_4a2e_8c3d_4e6f_9a7b_1c2d_3e4f_5a6b);

/// The run id of `task`'s `trigger` and `attempt`: the same on every leader, so a run
/// re-planned after a failover maps to the same record.
pub fn run_id(task: &TaskId, trigger: Trigger, attempt: u32) -> Uuid {
    let what = match trigger {
        Trigger::Slot { slot_ms } => {
            let slot = chrono::DateTime::from_timestamp_millis(slot_ms).unwrap_or_default();
            slot.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        }
        Trigger::Request { request } => format!("request {request}"),
        Trigger::Once { revision } => format!("revision {revision}"),
    };
    Uuid::new_v5(&RUN_NAMESPACE, format!("{task}|{what}|{attempt}").as_bytes())
}

/// A task's fixed launch delay in `[0, jitter_ms)`, derived from its id.
pub fn jitter_ms(task: &TaskId, jitter_ms: u64) -> u64 {
    if jitter_ms == 0 {
        return 0;
    }
    Uuid::new_v5(&RUN_NAMESPACE, task.as_str().as_bytes()).as_u64_pair().0 % jitter_ms
}
