//! The task spec: what an operator submits.
//!
//! | field | type | default | meaning |
//! |---|---|---|---|
//! | `id` | task id | required | 1 to 4 `/`-separated segments of `[A-Za-z0-9_.-]` |
//! | `command` | string | required | program to run (looked up in `PATH` when it has no `/`) |
//! | `args` | array of strings | `[]` | its arguments |
//! | `env` | object string → string | `{}` | environment; the child gets only this plus `PATH` and the `SHIVA_*` run variables |
//! | `tags` | array of strings | `[]` | a node must carry every one (its host name counts as a tag) |
//! | `workdir` | absolute path | `<workspace>/tasks/<id>` | working directory, created when missing |
//! | `stop_grace` | duration (humantime) | `"10s"` | time between SIGTERM and SIGKILL when stopping |
//!
//! User input is parsed strictly ([`TaskSpec::from_user_json`]): unknown fields are refused and
//! every error names the field. Records read from the bus are parsed leniently (newer fields are
//! ignored) so an older node can read a newer writer's specs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::TaskId;

/// Longest accepted `stop_grace`.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);
/// Default `stop_grace`.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A task definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task id.
    pub id: TaskId,
    /// Program to run.
    pub command: String,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment given to the child (besides `PATH` and `SHIVA_*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Tags a node must carry to run this task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Working directory (absolute); default `<workspace>/tasks/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Time between SIGTERM and SIGKILL.
    #[serde(default = "default_stop_grace", with = "crate::duration")]
    pub stop_grace: Duration,
    /// Cron expressions; a task with any is periodic.
    #[serde(default, deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<String>,
    /// IANA time zone of the schedule (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What to do when a run is due while the previous one still runs.
    #[serde(default, skip_serializing_if = "is_default")]
    pub overlap: Overlap,
    /// What to do with slots missed while no leader was alive.
    #[serde(default, skip_serializing_if = "is_default")]
    pub catch_up: CatchUp,
    /// Missed slots older than this are never caught up.
    #[serde(default, with = "crate::duration::option", skip_serializing_if = "Option::is_none")]
    pub starting_deadline: Option<Duration>,
    /// At most this many missed slots are caught up (the newest ones).
    #[serde(default = "default_max_catch_up", skip_serializing_if = "is_default_max_catch_up")]
    pub max_catch_up: u32,
    /// Each run of this task starts this much after its slot at most (a fixed, per-task offset).
    #[serde(default, with = "crate::duration", skip_serializing_if = "Duration::is_zero")]
    pub jitter: Duration,
    /// A run still going after this long is stopped and marked `timed_out`.
    #[serde(default, with = "crate::duration::option", skip_serializing_if = "Option::is_none")]
    pub max_runtime: Option<Duration>,
    /// Run to completion once (a one-shot), instead of keeping it running.
    #[serde(default, skip_serializing_if = "is_default")]
    pub once: bool,
    /// One-shots: attempts before the run is `failed`.
    #[serde(default = "default_max_attempts", skip_serializing_if = "is_default_max_attempts")]
    pub max_attempts: u32,
    /// One-shots: delay between attempts.
    #[serde(default, skip_serializing_if = "is_default")]
    pub backoff: RetryBackoff,
    /// Exit codes that mean "do not retry".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permanent_exit_codes: Vec<i32>,
    /// One-shots this one waits for (each must have succeeded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<TaskId>,
}

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

fn default_max_catch_up() -> u32 {
    DEFAULT_MAX_CATCH_UP
}

fn is_default_max_catch_up(value: &u32) -> bool {
    *value == DEFAULT_MAX_CATCH_UP
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

fn is_default_max_attempts(value: &u32) -> bool {
    *value == DEFAULT_MAX_ATTEMPTS
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Default cap on caught-up slots.
pub const DEFAULT_MAX_CATCH_UP: u32 = 10;
/// Default attempts of a one-shot.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Accepts `"expr"` or `["expr", …]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// Overlap policy, for scheduled and manual runs alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Start the new run beside the old one.
    Allow,
    /// Skip the new run.
    #[default]
    Forbid,
    /// Stop the old run, then start the new one.
    Replace,
    /// Start the new run when the old one ends; at most one waits.
    Queue,
}

impl Overlap {
    /// The name in specs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Forbid => "forbid",
            Overlap::Replace => "replace",
            Overlap::Queue => "queue",
        }
    }
}

/// Catch-up policy for slots missed while no leader was alive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Skip missed slots.
    #[default]
    None,
    /// Run the newest missed slot only.
    Latest,
    /// Run every missed slot (within `starting_deadline`, at most `max_catch_up`).
    All,
}

/// Exponential back-off between attempts of a one-shot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBackoff {
    /// First delay.
    #[serde(default = "default_initial", with = "crate::duration")]
    pub initial: Duration,
    /// Cap.
    #[serde(default = "default_max_delay", with = "crate::duration")]
    pub max: Duration,
    /// Growth factor, at least 1.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

impl Eq for RetryBackoff {}

fn default_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_max_delay() -> Duration {
    Duration::from_secs(60)
}

fn default_multiplier() -> f64 {
    2.0
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff {
            initial: default_initial(),
            max: default_max_delay(),
            multiplier: default_multiplier(),
        }
    }
}

impl RetryBackoff {
    /// Delay before attempt `next` (2 for the first retry).
    pub fn delay_before(&self, next: u32) -> Duration {
        let exponent = next.saturating_sub(2).min(64) as i32;
        let delay = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        Duration::from_secs_f64(delay.min(self.max.as_secs_f64()))
    }
}

/// The kind of a task, derived from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Kept running, restarted, moved when its node dies.
    Service,
    /// One run per schedule slot, cluster-wide.
    Periodic,
    /// Runs to completion once, retried per its policy.
    Once,
}

impl TaskKind {
    /// The name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Service => "service",
            TaskKind::Periodic => "periodic",
            TaskKind::Once => "once",
        }
    }
}

/// Why a spec was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task spec: {0}")]
pub struct SpecError(pub String);

impl SpecError {
    fn field(field: &str, message: impl std::fmt::Display) -> Self {
        SpecError(format!("field '{field}': {message}"))
    }
}

impl TaskSpec {
    /// A minimal spec running `command` with `args`.
    pub fn new(id: TaskId, command: impl Into<String>, args: Vec<String>) -> Self {
        TaskSpec {
            id,
            command: command.into(),
            args,
            env: BTreeMap::new(),
            tags: Vec::new(),
            workdir: None,
            stop_grace: DEFAULT_STOP_GRACE,
            schedule: Vec::new(),
            timezone: None,
            overlap: Overlap::default(),
            catch_up: CatchUp::default(),
            starting_deadline: None,
            max_catch_up: DEFAULT_MAX_CATCH_UP,
            jitter: Duration::ZERO,
            max_runtime: None,
            once: false,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: RetryBackoff::default(),
            permanent_exit_codes: Vec::new(),
            after: Vec::new(),
        }
    }

    /// The task's kind.
    pub fn kind(&self) -> TaskKind {
        if !self.schedule.is_empty() {
            TaskKind::Periodic
        } else if self.once {
            TaskKind::Once
        } else {
            TaskKind::Service
        }
    }

    /// Parses user input strictly: unknown fields are refused, errors name the field.
    pub fn from_user_json(text: &str) -> Result<TaskSpec, SpecError> {
        let mut unknown = Vec::new();
        let mut json = serde_json::Deserializer::from_str(text);
        let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let ignored = serde_ignored::Deserializer::new(&mut json, &mut on_unknown);
        let spec: TaskSpec = match serde_path_to_error::deserialize(ignored) {
            Ok(spec) => spec,
            Err(err) => {
                let path = err.path().to_string();
                let inner = err.into_inner();
                return Err(if path == "." || path.is_empty() {
                    SpecError(inner.to_string())
                } else {
                    SpecError::field(&path, inner)
                });
            }
        };
        json.end().map_err(|err| SpecError(format!("trailing characters after the spec: {err}")))?;
        if let Some(field) = unknown.first() {
            return Err(SpecError::field(field, "unknown field"));
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.command.trim().is_empty() {
            return Err(SpecError::field("command", "must not be empty"));
        }
        if self.command.contains('\0') {
            return Err(SpecError::field("command", "must not contain a NUL byte"));
        }
        if let Some(index) = self.args.iter().position(|arg| arg.contains('\0')) {
            return Err(SpecError::field(&format!("args[{index}]"), "must not contain a NUL byte"));
        }
        for (name, value) in &self.env {
            let name_ok = !name.is_empty()
                && !name.contains(['=', '\0'])
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !name_ok {
                return Err(SpecError::field(
                    &format!("env.{name}"),
                    "a variable name must be non-empty, not start with a digit, and hold no '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(SpecError::field(&format!("env.{name}"), "value must not contain a NUL byte"));
            }
            if name.starts_with("SHIVA_") {
                return Err(SpecError::field(
                    &format!("env.{name}"),
                    "SHIVA_* variables are set by the node",
                ));
            }
        }
        for (index, tag) in self.tags.iter().enumerate() {
            let ok =
                !tag.is_empty() && !tag.contains(|c: char| c == ',' || c.is_whitespace() || c.is_control());
            if !ok {
                return Err(SpecError::field(
                    &format!("tags[{index}]"),
                    format!("'{tag}' is not a tag: tags are non-empty, without commas or spaces"),
                ));
            }
        }
        if let Some(workdir) = &self.workdir
            && (!workdir.starts_with('/') || workdir.contains('\0'))
        {
            return Err(SpecError::field("workdir", format!("'{workdir}' must be an absolute path")));
        }
        if self.stop_grace > MAX_STOP_GRACE {
            return Err(SpecError::field(
                "stop_grace",
                format!("{} is longer than the maximum of 1h", humantime::format_duration(self.stop_grace)),
            ));
        }
        self.validate_runs()
    }

    /// Rules of the periodic and one-shot fields.
    fn validate_runs(&self) -> Result<(), SpecError> {
        let periodic = !self.schedule.is_empty();
        crate::schedule::Schedule::from_spec(self)?;
        if periodic && self.once {
            return Err(SpecError::field(
                "once",
                "a task is either scheduled (schedule) or run once (once), not both",
            ));
        }
        let scheduled_only: [(&str, bool); 6] = [
            ("timezone", self.timezone.is_some()),
            ("catch_up", self.catch_up != CatchUp::default()),
            ("starting_deadline", self.starting_deadline.is_some()),
            ("max_catch_up", self.max_catch_up != DEFAULT_MAX_CATCH_UP),
            ("jitter", !self.jitter.is_zero()),
            ("overlap", self.overlap != Overlap::default()),
        ];
        if let Some((field, _)) = scheduled_only.iter().find(|(_, set)| *set && !periodic) {
            return Err(SpecError::field(field, "only applies to scheduled tasks (set schedule)"));
        }
        let run_only: [(&str, bool); 2] = [
            ("max_runtime", self.max_runtime.is_some()),
            ("permanent_exit_codes", !self.permanent_exit_codes.is_empty()),
        ];
        if let Some((field, _)) = run_only.iter().find(|(_, set)| *set && !periodic && !self.once) {
            return Err(SpecError::field(field, "only applies to scheduled or once tasks"));
        }
        let once_only: [(&str, bool); 3] = [
            ("max_attempts", self.max_attempts != DEFAULT_MAX_ATTEMPTS),
            ("backoff", self.backoff != RetryBackoff::default()),
            ("after", !self.after.is_empty()),
        ];
        if let Some((field, _)) = once_only.iter().find(|(_, set)| *set && !self.once) {
            return Err(SpecError::field(field, "only applies to once tasks (set once: true)"));
        }
        if self.max_catch_up == 0 {
            return Err(SpecError::field(
                "max_catch_up",
                "must be at least 1 (use catch_up: none to skip missed slots)",
            ));
        }
        if self.max_attempts == 0 {
            return Err(SpecError::field("max_attempts", "must be at least 1"));
        }
        if !self.backoff.multiplier.is_finite() || self.backoff.multiplier < 1.0 {
            return Err(SpecError::field("backoff.multiplier", "must be a number of at least 1"));
        }
        if self.backoff.initial > self.backoff.max {
            return Err(SpecError::field("backoff.initial", "must not exceed backoff.max"));
        }
        if self.max_runtime.is_some_and(|max| max.is_zero()) {
            return Err(SpecError::field("max_runtime", "must be longer than 0s"));
        }
        if let Some(code) = self.permanent_exit_codes.iter().find(|code| !(1..=255).contains(*code)) {
            return Err(SpecError::field(
                "permanent_exit_codes",
                format!("{code} is not an exit code from 1 to 255"),
            ));
        }
        if self.after.contains(&self.id) {
            return Err(SpecError::field("after", format!("'{}' cannot wait for itself", self.id)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        TaskSpec::from_user_json(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply() {
        let spec = TaskSpec::from_user_json(r#"{"id":"a/b","command":"sleep","args":["10"]}"#).unwrap();
        assert_eq!(spec.stop_grace, DEFAULT_STOP_GRACE);
        assert!(spec.tags.is_empty() && spec.env.is_empty() && spec.workdir.is_none());
        assert_eq!(spec.kind(), TaskKind::Service);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(r#"{"id":"a","command":"x","colour":1}"#).contains("'colour': unknown field"));
        assert!(err(r#"{"id":"a/../b","command":"x"}"#).contains("'id'"));
        assert!(err(r#"{"id":"a","command":""}"#).contains("'command'"));
        assert!(err(r#"{"id":"a","command":"x","stop_grace":"-5s"}"#).contains("'stop_grace'"));
        assert!(err(r#"{"id":"a","command":"x","stop_grace":"2h"}"#).contains("'stop_grace'"));
        assert!(err(r#"{"id":"a","command":"x","tags":["a b"]}"#).contains("'tags[0]'"));
        assert!(err(r#"{"id":"a","command":"x","env":{"A=B":"1"}}"#).contains("'env.A=B'"));
        assert!(err(r#"{"id":"a","command":"x","workdir":"rel"}"#).contains("'workdir'"));
        assert!(err(r#"{"id":"a","command":"x","args":[1]}"#).contains("'args[0]'"));
        assert!(err(r#"{"command":"x"}"#).contains("missing field `id`"));
        assert!(err(r#"{"id":"a","command":"x"} junk"#).contains("trailing"));
    }

    #[test]
    fn periodic_and_once_fields() {
        let periodic = TaskSpec::from_user_json(
            r#"{"id":"p","command":"x","schedule":"*/5 * * * *","timezone":"Europe/Paris","catch_up":"all",
                "starting_deadline":"10m","max_catch_up":20,"jitter":"3s","overlap":"queue","max_runtime":"1m"}"#,
        )
        .unwrap();
        assert_eq!(periodic.kind(), TaskKind::Periodic);
        assert_eq!(periodic.schedule, ["*/5 * * * *"]);
        assert_eq!(periodic.catch_up, CatchUp::All);
        let once = TaskSpec::from_user_json(
            r#"{"id":"o","command":"x","once":true,"max_attempts":5,"backoff":{"initial":"2s","multiplier":3},
                "permanent_exit_codes":[64,78],"after":["a/b"]}"#,
        )
        .unwrap();
        assert_eq!(once.kind(), TaskKind::Once);
        assert_eq!(once.backoff.delay_before(2), Duration::from_secs(2));
        assert_eq!(once.backoff.delay_before(3), Duration::from_secs(6));
        assert_eq!(once.backoff.delay_before(10), Duration::from_secs(60), "capped at backoff.max");
        let round_trip: TaskSpec = serde_json::from_str(&serde_json::to_string(&once).unwrap()).unwrap();
        assert_eq!(round_trip, once);
    }

    #[test]
    fn periodic_and_once_errors_name_the_field() {
        assert!(err(r#"{"id":"a","command":"x","schedule":"* * * * * * * *"}"#).contains("'schedule[0]'"));
        assert!(err(r#"{"id":"a","command":"x","schedule":["@hourly","nope"]}"#).contains("'schedule[1]'"));
        assert!(
            err(r#"{"id":"a","command":"x","schedule":"@hourly","timezone":"Nowhere/City"}"#)
                .contains("'timezone'")
        );
        assert!(err(r#"{"id":"a","command":"x","schedule":"@hourly","jitter":"-1s"}"#).contains("'jitter'"));
        assert!(
            err(r#"{"id":"a","command":"x","schedule":"@hourly","catch_up":"some"}"#).contains("'catch_up'")
        );
        assert!(err(r#"{"id":"a","command":"x","schedule":"@hourly","once":true}"#).contains("'once'"));
        assert!(
            err(r#"{"id":"a","command":"x","catch_up":"all"}"#)
                .contains("'catch_up': only applies to scheduled")
        );
        assert!(err(r#"{"id":"a","command":"x","after":["b"]}"#).contains("'after': only applies to once"));
        assert!(
            err(r#"{"id":"a","command":"x","once":true,"after":["a"]}"#).contains("cannot wait for itself")
        );
        assert!(err(r#"{"id":"a","command":"x","once":true,"max_attempts":0}"#).contains("'max_attempts'"));
        assert!(
            err(r#"{"id":"a","command":"x","once":true,"backoff":{"multiplier":0.5}}"#)
                .contains("'backoff.multiplier'")
        );
        assert!(err(r#"{"id":"a","command":"x","once":true,"backoff":{"speed":1}}"#).contains("backoff"));
        assert!(
            err(r#"{"id":"a","command":"x","once":true,"permanent_exit_codes":[0]}"#)
                .contains("'permanent_exit_codes'")
        );
        assert!(err(r#"{"id":"a","command":"x","once":true,"max_runtime":"0s"}"#).contains("'max_runtime'"));
    }

    #[test]
    fn wire_reading_is_lenient() {
        let spec: TaskSpec = serde_json::from_str(r#"{"id":"a","command":"x","future":true}"#).unwrap();
        assert_eq!(spec.command, "x");
    }
}
