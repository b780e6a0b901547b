//! The range of every number, duration, count and size in a task spec.
//!
//! Invariant: a spec that passes [`TaskSpec::validate`] keeps every value inside these ranges,
//! and the scheduler, the runner and the shim can do their arithmetic on any such value (and on
//! any instant between 1970 and 9999) without overflow. `docs/protocol.md` lists the same
//! ranges; `shiva-proto/tests/documented_ranges.rs` keeps them in step.
//!
//! Specs read from the log are checked with the same rules: one outside its range is an invalid
//! spec (the task is `failed` with the reason), never a panic.

use std::time::Duration;

use super::{SpecError, TaskSpec};
use crate::records::{Assignment, Body, Envelope, MAX_RECORD_BYTES, Placement};
use crate::runs::{RunIntent, Trigger};

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
/// humantime's year: 365.25 days (`"5y"` is exactly five of them).
const YEAR: u64 = 31_557_600;

/// An inclusive range of durations.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// Shortest accepted.
    pub min: Duration,
    /// Longest accepted.
    pub max: Duration,
}

impl Span {
    const fn new(min: Duration, max: Duration) -> Span {
        Span { min, max }
    }

    /// The range as documented: `0s to 1h`.
    pub fn describe(&self) -> String {
        format!("{} to {}", show(self.min), show(self.max))
    }

    /// Refuses `value` outside the range, naming `field`, the value and the range.
    pub fn check(&self, field: &str, value: Duration) -> Result<(), SpecError> {
        if value < self.min || value > self.max {
            return Err(SpecError::field(
                field,
                format!("{} is out of range: from {} to {}", show(value), show(self.min), show(self.max)),
            ));
        }
        Ok(())
    }
}

/// A duration as humantime writes (and reads) it: `0s`, `1ms`, `1h`, `1day`, `5years`.
fn show(duration: Duration) -> String {
    if duration.is_zero() { "0s".to_owned() } else { humantime::format_duration(duration).to_string() }
}

/// `stop_grace`: 0s to 1h.
pub const STOP_GRACE: Span = Span::new(Duration::ZERO, Duration::from_secs(HOUR));
/// `starting_deadline`: 0s to 5 years.
pub const STARTING_DEADLINE: Span = Span::new(Duration::ZERO, Duration::from_secs(5 * YEAR));
/// `jitter`: 0s to 1 day.
pub const JITTER: Span = Span::new(Duration::ZERO, Duration::from_secs(DAY));
/// `max_runtime`: 1ms to 5 years.
pub const MAX_RUNTIME: Span = Span::new(Duration::from_millis(1), Duration::from_secs(5 * YEAR));
/// `backoff.initial` and `backoff.max`: 0s to 1 day.
pub const BACKOFF: Span = Span::new(Duration::ZERO, Duration::from_secs(DAY));
/// `backoff.multiplier`: 1 to 100.
pub const MULTIPLIER: (f64, f64) = (1.0, 100.0);
/// `restart_window`: 1ms to 7 days.
pub const RESTART_WINDOW: Span = Span::new(Duration::from_millis(1), Duration::from_secs(7 * DAY));
/// `stable_after`: 0s to 7 days.
pub const STABLE_AFTER: Span = Span::new(Duration::ZERO, Duration::from_secs(7 * DAY));

/// `max_restarts`: 0 to 10,000.
pub const MAX_RESTARTS: (u32, u32) = (0, 10_000);
/// `max_catch_up`: 1 to 1,000.
pub const MAX_CATCH_UP: (u32, u32) = (1, 1_000);
/// `max_attempts`: 1 to 1,000.
pub const MAX_ATTEMPTS: (u32, u32) = (1, 1_000);
/// `count` (instances of a service): 1 to 1,000.
pub const COUNT: (u32, u32) = (1, 1_000);
/// Largest spec (as JSON) run as instances (`count`, `every_node`): each instance's assignment
/// carries it, so 1,000 instances take at most 64 MiB in every node's view.
pub const MAX_INSTANCES_SPEC_BYTES: usize = 64 * 1024;
/// `memory_max`: 1 MiB to 1 PiB.
pub const MEMORY_MAX: (u64, u64) = (1 << 20, 1 << 50);

/// Longest `command`, `workdir` (bytes): Linux's `PATH_MAX`.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest single argument or `NAME=value` environment string (bytes, with its NUL): Linux's
/// `MAX_ARG_STRLEN` (32 pages); the kernel refuses a longer one with E2BIG.
pub const MAX_ARG_STRING_BYTES: usize = 128 * 1024;
/// Largest `command`, `args` and `env` together (bytes of the strings the kernel copies, each
/// with its NUL): below the kernel's limit of a quarter of the default 8 MiB stack, with room
/// for the `SHIVA_*` variables and `PATH`.
pub const MAX_EXEC_BYTES: usize = 3 * 512 * 1024;
/// Most entries in `args` and in `env`.
pub const MAX_ARGS: usize = 65_536;
/// Most `tags`, `schedule` expressions and `after` dependencies.
pub const MAX_LIST: usize = 64;
/// Longest tag (bytes).
pub const MAX_TAG_BYTES: usize = 255;
/// Longest cron expression (bytes).
pub const MAX_CRON_BYTES: usize = 1024;
/// Most `files`.
pub const MAX_FILES: usize = 1024;

/// Room left in a record beyond the worst-case assignment and launch intent of a spec, for
/// what they carry besides it (`failed_on` node ids, a note).
const RECORD_RESERVE: usize = 64 * 1024;

pub(super) fn check_count(field: &str, value: u32, (min, max): (u32, u32)) -> Result<(), SpecError> {
    if !(min..=max).contains(&value) {
        return Err(SpecError::field(field, format!("{value} is out of range: from {min} to {max}")));
    }
    Ok(())
}

fn at_most(field: &str, what: &str, value: usize, max: usize) -> Result<(), SpecError> {
    if value > max {
        return Err(SpecError::field(field, format!("{value} {what}, above the limit of {max}")));
    }
    Ok(())
}

impl TaskSpec {
    /// The ranges of the durations and counts (see the module's table).
    pub(super) fn validate_bounds(&self) -> Result<(), SpecError> {
        STOP_GRACE.check("stop_grace", self.stop_grace)?;
        if let Some(deadline) = self.starting_deadline {
            STARTING_DEADLINE.check("starting_deadline", deadline)?;
        }
        JITTER.check("jitter", self.jitter)?;
        if let Some(max_runtime) = self.max_runtime {
            MAX_RUNTIME.check("max_runtime", max_runtime)?;
        }
        BACKOFF.check("backoff.initial", self.backoff.initial)?;
        BACKOFF.check("backoff.max", self.backoff.max)?;
        let multiplier = self.backoff.multiplier;
        if !multiplier.is_finite() || !(MULTIPLIER.0..=MULTIPLIER.1).contains(&multiplier) {
            return Err(SpecError::field(
                "backoff.multiplier",
                format!("{multiplier} is out of range: from {} to {}", MULTIPLIER.0, MULTIPLIER.1),
            ));
        }
        RESTART_WINDOW.check("restart_window", self.restart_window)?;
        STABLE_AFTER.check("stable_after", self.stable_after)?;
        check_count("max_restarts", self.max_restarts, MAX_RESTARTS)?;
        check_count("max_catch_up", self.max_catch_up, MAX_CATCH_UP)?;
        check_count("max_attempts", self.max_attempts, MAX_ATTEMPTS)?;
        Ok(())
    }

    /// The sizes and counts of the strings and lists.
    pub(super) fn validate_sizes(&self) -> Result<(), SpecError> {
        at_most("command", "bytes", self.command.len(), MAX_PATH_BYTES)?;
        if let Some(workdir) = &self.workdir {
            at_most("workdir", "bytes", workdir.len(), MAX_PATH_BYTES)?;
        }
        at_most("args", "arguments", self.args.len(), MAX_ARGS)?;
        at_most("env", "variables", self.env.len(), MAX_ARGS)?;
        let mut exec = self.command.len() + 1;
        for (index, arg) in self.args.iter().enumerate() {
            at_most(&format!("args[{index}]"), "bytes", arg.len() + 1, MAX_ARG_STRING_BYTES)?;
            exec += arg.len() + 1;
        }
        for (name, value) in &self.env {
            let bytes = name.len() + value.len() + 2;
            at_most(&format!("env.{name}"), "bytes as NAME=value", bytes, MAX_ARG_STRING_BYTES)?;
            exec += bytes;
        }
        at_most("args and env", "bytes in all", exec, MAX_EXEC_BYTES)?;
        at_most("tags", "tags", self.tags.len(), MAX_LIST)?;
        if let Some(index) = self.tags.iter().position(|tag| tag.len() > MAX_TAG_BYTES) {
            at_most(&format!("tags[{index}]"), "bytes", self.tags[index].len(), MAX_TAG_BYTES)?;
        }
        at_most("schedule", "expressions", self.schedule.len(), MAX_LIST)?;
        if let Some(index) = self.schedule.iter().position(|cron| cron.len() > MAX_CRON_BYTES) {
            at_most(&format!("schedule[{index}]"), "bytes", self.schedule[index].len(), MAX_CRON_BYTES)?;
        }
        at_most("after", "tasks", self.after.len(), MAX_LIST)?;
        at_most("permanent_exit_codes", "codes", self.permanent_exit_codes.len(), 255)?;
        at_most("files", "files", self.files.len(), MAX_FILES)?;
        at_most("secrets.env", "variables", self.secrets.env.len(), MAX_FILES)?;
        at_most("secrets.files", "files", self.secrets.files.len(), MAX_FILES)?;
        Ok(())
    }

    /// Checks that the records that carry this spec (its assignment, its launch intents) fit in
    /// [`MAX_RECORD_BYTES`], with their largest numbers and room for what else they carry.
    pub fn check_record_size(&self) -> Result<(), SpecError> {
        let spec = std::sync::Arc::new(self.clone());
        let assignment = Body::Assignment(Assignment {
            epoch: u64::MAX,
            task: self.id.clone(),
            generation: u64::MAX,
            spec_revision: i64::MAX,
            placement: Placement::Pending { reason: String::new() },
            spec: self.clone(),
            failed_on: Vec::new(),
            retry_at_ms: Some(i64::MAX),
            // A hand-off names the node that may still run a copy (a node id is short).
            holders: vec![
                crate::records::Holder {
                    node: crate::NodeId::new("n".repeat(128)).expect("a valid node id"),
                    since: u64::MAX,
                    stop_grace_ms: u64::MAX,
                    keep: true,
                    exclusive: false,
                };
                2
            ],
            after: Vec::new(),
            incarnation: None,
        });
        let intent = Body::RunIntent(RunIntent {
            epoch: u64::MAX,
            task: self.id.clone(),
            run_id: uuid::Uuid::nil(),
            attempt: u32::MAX,
            trigger: Trigger::Slot { slot_ms: i64::MAX },
            node: None,
            launch_at_ms: i64::MAX,
            written_at_ms: Some(i64::MIN),
            spec_revision: i64::MAX,
            spec,
            stop: None,
            verdict: None,
            note: None,
            incarnation: None,
            seat: None,
            status_seen: None,
        });
        let largest = [assignment, intent]
            .into_iter()
            .map(|body| Envelope::now(format!("ctl:{}", "u".repeat(64)), None, body).encode().len())
            .max()
            .unwrap_or(0);
        let limit = MAX_RECORD_BYTES - RECORD_RESERVE;
        if largest > limit {
            return Err(SpecError(format!(
                "the spec is too large: the records that carry it would take {largest} bytes, above the \
                 limit of {limit} bytes (records are at most {MAX_RECORD_BYTES} bytes); make env, args or \
                 files smaller"
            )));
        }
        Ok(())
    }
}
