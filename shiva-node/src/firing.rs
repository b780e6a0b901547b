//! Firing decisions for periodic and one-shot tasks, pure: which slots to launch (with catch-up
//! after an outage), what to do when a run is due while
//! another runs, and what follows a one-shot's end. Time is passed in: tests use a fake clock.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use shiva_proto::records::ExitInfo;
use shiva_proto::schedule::Schedule;
use shiva_proto::spec::{CatchUp, Overlap, TaskSpec};
use uuid::Uuid;

/// Regular slots one plan takes at most (a schedule every second with a long look-ahead).
const MAX_SLOTS_PER_PLAN: usize = 1000;

/// Skipped slots counted at most, beyond the caught-up ones.
const MAX_COUNTED_SKIPS: usize = 1000;

/// Which slots of a periodic task to launch now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slots to write launch intents for, ascending: caught-up ones first, then the regular
    /// ones due within the look-ahead.
    pub launch: Vec<DateTime<Utc>>,
    /// Missed slots not launched (by policy, deadline or cap), counted up to 1000.
    pub skipped: usize,
    /// Every slot up to here is decided (launched or skipped): the new `sched/` position.
    pub decided_through: DateTime<Utc>,
}

/// Timing of the firing loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Intents are written this long before their slot, so the runner can start on time.
    pub lookahead: Duration,
    /// A slot less late than this is launched as usual, not treated as missed.
    pub tolerance: Duration,
}

/// A std duration as a chrono one (saturating).
pub(crate) fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

/// `at - duration`, saturating at the earliest instant chrono holds (never panics).
pub(crate) fn before(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_sub_signed(delta(duration)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `at + duration`, saturating at the latest instant chrono holds (never panics).
pub(crate) fn after(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_add_signed(delta(duration)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Plans the slots after `decided_through` (the newest slot already decided) as of `now`.
pub fn plan_slots(
    schedule: &Schedule,
    spec: &TaskSpec,
    decided_through: DateTime<Utc>,
    now: DateTime<Utc>,
    timing: Timing,
) -> SlotPlan {
    let missed_until = before(now, timing.tolerance);
    let mut launch = Vec::new();
    let mut skipped = 0;
    let newest_missed = schedule.latest_slots(decided_through, missed_until, 1).pop();
    if newest_missed.is_some() {
        let cap = spec.max_catch_up as usize;
        let oldest_allowed = spec.starting_deadline.map(|deadline| before(now, deadline));
        let window_start = oldest_allowed.map_or(decided_through, |oldest| oldest.max(decided_through));
        let wanted = match spec.catch_up {
            CatchUp::None => 0,
            CatchUp::Latest => 1,
            CatchUp::All => cap,
        };
        let caught =
            if wanted == 0 { Vec::new() } else { schedule.latest_slots(window_start, missed_until, wanted) };
        // Count what is dropped (up to a bound: a long outage of a per-second schedule).
        let missed =
            schedule.latest_slots(decided_through, missed_until, caught.len() + MAX_COUNTED_SKIPS).len();
        skipped = missed - caught.len();
        launch.extend(caught);
    }
    let regular_from = decided_through.max(missed_until);
    let horizon = after(now, timing.lookahead);
    let regular = schedule.slots(regular_from, horizon, MAX_SLOTS_PER_PLAN);
    // Decided through the newest slot seen, missed or planned: no slot lies between it and the
    // horizon. Not through the horizon itself, which would change the task's `sched/` record
    // at every step and make the leader write it again and again between two slots.
    let through = regular.last().copied().or(newest_missed).unwrap_or(decided_through);
    launch.extend(regular);
    SlotPlan { launch, skipped, decided_through: through.max(decided_through) }
}

/// What to do with a run that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlapAction {
    /// Launch it.
    Launch,
    /// Drop it: the previous run still runs.
    Skip,
    /// Stop these runs, then launch it.
    Replace(Vec<Uuid>),
    /// Launch it when the previous run ends.
    Queue,
}

/// Applies the overlap policy: `running` are the task's runs in flight, `queued` whether a
/// run already waits.
pub fn on_due(policy: Overlap, running: &[Uuid], queued: bool) -> OverlapAction {
    if running.is_empty() {
        return OverlapAction::Launch;
    }
    match policy {
        Overlap::Allow => OverlapAction::Launch,
        Overlap::Forbid => OverlapAction::Skip,
        Overlap::Replace => OverlapAction::Replace(running.to_vec()),
        Overlap::Queue if queued => OverlapAction::Skip,
        Overlap::Queue => OverlapAction::Queue,
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The child exited or was killed by a signal.
    Exited(ExitInfo),
    /// Stopped for exceeding `max_runtime`.
    TimedOut,
    /// Its node died; nobody knows how it ended.
    Lost,
}

/// What follows the end of a one-shot's attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnceNext {
    /// Done: exit code 0.
    Succeeded,
    /// Done, unsuccessfully, with the reason.
    Failed(String),
    /// Start `attempt` after `delay` (at once, on another node, after a lost run).
    Retry {
        /// The next attempt's number.
        attempt: u32,
        /// Wait before it.
        delay: Duration,
    },
}

/// Decides what follows attempt `attempt` of a one-shot that ended with `end`.
pub fn once_next(spec: &TaskSpec, attempt: u32, end: RunEnd) -> OnceNext {
    let what = match end {
        RunEnd::Exited(ExitInfo { code: Some(0), .. }) => return OnceNext::Succeeded,
        RunEnd::Exited(ExitInfo { code: Some(code), .. }) if spec.permanent_exit_codes.contains(&code) => {
            return OnceNext::Failed(format!("exit code {code} is permanent: not retried"));
        }
        RunEnd::Exited(ExitInfo { code: Some(code), .. }) => format!("exit code {code}"),
        RunEnd::Exited(ExitInfo { signal: Some(signal), .. }) => format!("killed by signal {signal}"),
        RunEnd::Exited(_) => "ended".to_owned(),
        RunEnd::TimedOut => "timed out".to_owned(),
        RunEnd::Lost => "lost with its node".to_owned(),
    };
    if attempt >= spec.max_attempts {
        return OnceNext::Failed(format!("{what} on attempt {attempt} of {}", spec.max_attempts));
    }
    let delay = if end == RunEnd::Lost { Duration::ZERO } else { spec.backoff.delay_before(attempt + 1) };
    OnceNext::Retry { attempt: attempt + 1, delay }
}

#[cfg(test)]
mod tests;
