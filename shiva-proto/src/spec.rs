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
//! | `stop_grace` | duration (humantime) | `"10s"` | time between `stop_signal` and SIGKILL when stopping |
//! | `backoff` | `{initial, max, multiplier}` | `1s`, `1m`, `2` | delay between restarts (services, with ±10 % jitter) or attempts (once) |
//! | `permanent_exit_codes` | array of 1–255 | `[]` | exit codes that end the task `failed` at once: no restart, no retry |
//! | `count` | 1–1,000 | none | services: run this many instances `<id>@0`…, on distinct nodes |
//! | `every_node` | bool | `false` | services: run one instance `<id>@<node>` on every eligible node |
//!
//! The periodic and one-shot fields are documented in [`crate::schedule`] and the README; the
//! supervision fields (stop signal, fencing, restart policy, user, limits, files) in
//! `spec/supervision.rs`.
//!
//! User input is parsed strictly ([`TaskSpec::from_user_json`]): unknown fields are refused and
//! every error names the field. Records read from the bus are parsed leniently (newer fields are
//! ignored) so an older node can read a newer writer's specs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::TaskId;

pub mod bounds;
mod supervision;

pub use supervision::{Cores, MAX_FILES_BYTES, OnDisconnect, RLIMITS, parse_bytes, signal_number};

/// Longest accepted `stop_grace`.
pub const MAX_STOP_GRACE: Duration = bounds::STOP_GRACE.max;
/// Default `stop_grace`.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A task definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task id.
    pub id: TaskId,
    /// The task's own revision: 1 for its first definition, one more at each `submit` or
    /// `apply` that changes it (set by the command's writer from the definition it replaces;
    /// absent, 0, from earlier builds). For people: the record's offset orders definitions.
    #[serde(default, skip_serializing_if = "is_default")]
    pub revision: u64,
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
    /// Signal that asks a run to stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// What a run does when its node is cut off from the bus.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_disconnect: OnDisconnect,
    /// Services: restarts within `restart_window` before the task fails on its node.
    #[serde(
        default = "supervision::default_max_restarts",
        skip_serializing_if = "supervision::is_default_max_restarts"
    )]
    pub max_restarts: u32,
    /// Services: the window `max_restarts` counts in.
    #[serde(
        default = "supervision::default_restart_window",
        with = "crate::duration",
        skip_serializing_if = "supervision::is_default_restart_window"
    )]
    pub restart_window: Duration,
    /// Services: a run this long resets the restart delay.
    #[serde(
        default = "supervision::default_stable_after",
        with = "crate::duration",
        skip_serializing_if = "supervision::is_default_stable_after"
    )]
    pub stable_after: Duration,
    /// Run as this user (name or uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits by name (`nofile`, `core`…).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rlimits: BTreeMap<String, u64>,
    /// Memory limit (`512MiB`), through cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<String>,
    /// CPU limit in cores, through cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<Cores>,
    /// Files written into the working directory before each start (relative path → text).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// Secrets (`shiva-ctl secret set`) the runner decrypts at launch into the environment or a
    /// file: only their names are in the spec.
    #[serde(default, skip_serializing_if = "SecretRefs::is_empty")]
    pub secrets: SecretRefs,
    /// Services: run this many instances, `<id>@0` to `<id>@<count-1>`, each on a node of its
    /// own (see [`Instances`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Services: run one instance, `<id>@<node>`, on every eligible node.
    #[serde(default, skip_serializing_if = "is_default")]
    pub every_node: bool,
}

/// How many copies of a service run, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// One, under the task's own id (no `count`, no `every_node`).
    Single,
    /// `count` instances, numbered from 0, on distinct nodes.
    Count(u32),
    /// One on every live runner that can run it (its tags) and is not draining.
    EveryNode,
}

/// Where a task gets its secrets: names of secrets, never values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRefs {
    /// Environment variable → secret name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// File of the working directory (relative path) → secret name; written mode 0600.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

impl SecretRefs {
    /// Whether it names no secret.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.files.is_empty()
    }

    /// Every secret named, with the field that names it.
    pub fn names(&self) -> impl Iterator<Item = (String, &str)> + '_ {
        let env = self.env.iter().map(|(var, name)| (format!("secrets.env.{var}"), name.as_str()));
        env.chain(self.files.iter().map(|(path, name)| (format!("secrets.files.{path}"), name.as_str())))
    }
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
        // Total on any input: NaN, infinite or out of range saturates at the cap.
        Duration::try_from_secs_f64(delay).map_or(self.max, |delay| delay.min(self.max))
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
            revision: 0,
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
            stop_signal: None,
            on_disconnect: OnDisconnect::default(),
            max_restarts: supervision::DEFAULT_MAX_RESTARTS,
            restart_window: supervision::DEFAULT_RESTART_WINDOW,
            stable_after: supervision::DEFAULT_STABLE_AFTER,
            user: None,
            rlimits: BTreeMap::new(),
            memory_max: None,
            cpu_max: None,
            files: BTreeMap::new(),
            secrets: SecretRefs::default(),
            count: None,
            every_node: false,
        }
    }

    /// How many copies of it run (see [`Instances`]).
    pub fn instances(&self) -> Instances {
        match (self.count, self.every_node) {
            (Some(count), false) => Instances::Count(count),
            (None, true) => Instances::EveryNode,
            // A spec with both is refused; a lenient reader treats it as neither.
            _ => Instances::Single,
        }
    }

    /// The spec instance `id` runs (an id [`TaskId::with_instance`] made of this spec's): this
    /// one under that id. The runner gives the child the instance in `SHIVA_INSTANCE`.
    pub fn instance_spec(&self, id: TaskId) -> TaskSpec {
        TaskSpec { id, ..self.clone() }
    }

    /// Whether `other` runs the same as this spec, all but its id, its own revision number and
    /// how many instances run (`count`, `every_node`): what an instance of either runs.
    pub fn runs_like(&self, other: &TaskSpec) -> bool {
        // Every field named: a field added later must be placed on one side or the other.
        let TaskSpec {
            id: _,
            revision: _,
            count: _,
            every_node: _,
            command,
            args,
            env,
            tags,
            workdir,
            stop_grace,
            schedule,
            timezone,
            overlap,
            catch_up,
            starting_deadline,
            max_catch_up,
            jitter,
            max_runtime,
            once,
            max_attempts,
            backoff,
            permanent_exit_codes,
            after,
            stop_signal,
            on_disconnect,
            max_restarts,
            restart_window,
            stable_after,
            user,
            rlimits,
            memory_max,
            cpu_max,
            files,
            secrets,
        } = self;
        *command == other.command
            && *args == other.args
            && *env == other.env
            && *tags == other.tags
            && *workdir == other.workdir
            && *stop_grace == other.stop_grace
            && *schedule == other.schedule
            && *timezone == other.timezone
            && *overlap == other.overlap
            && *catch_up == other.catch_up
            && *starting_deadline == other.starting_deadline
            && *max_catch_up == other.max_catch_up
            && *jitter == other.jitter
            && *max_runtime == other.max_runtime
            && *once == other.once
            && *max_attempts == other.max_attempts
            && *backoff == other.backoff
            && *permanent_exit_codes == other.permanent_exit_codes
            && *after == other.after
            && *stop_signal == other.stop_signal
            && *on_disconnect == other.on_disconnect
            && *max_restarts == other.max_restarts
            && *restart_window == other.restart_window
            && *stable_after == other.stable_after
            && *user == other.user
            && *rlimits == other.rlimits
            && *memory_max == other.memory_max
            && *cpu_max == other.cpu_max
            && *files == other.files
            && *secrets == other.secrets
    }

    /// Whether `task` names one of this spec's instances: a number below `count`, or any node
    /// id with `every_node` (which nodes get one is the leader's decision).
    pub fn has_instance(&self, task: &TaskId) -> bool {
        let Some(instance) = task.instance() else { return false };
        if task.base() != self.id {
            return false;
        }
        match self.instances() {
            Instances::Single => false,
            Instances::Count(count) => instance_number(instance).is_some_and(|number| number < count),
            Instances::EveryNode => crate::NodeId::new(instance).is_ok(),
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
        spec.validate_new()?;
        Ok(spec)
    }

    /// [`TaskSpec::validate_all`] and what only a new spec must meet (`submit`, `apply`, the
    /// API): readers of the log take what earlier builds accepted.
    pub fn validate_new(&self) -> Result<(), SpecError> {
        self.validate_all()?;
        crate::schedule::Schedule::check_new(self)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_instances()?;
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
            check_env_name(&format!("env.{name}"), name)?;
            if value.contains('\0') {
                return Err(SpecError::field(&format!("env.{name}"), "value must not contain a NUL byte"));
            }
        }
        for name in self.secrets.env.keys() {
            let field = format!("secrets.env.{name}");
            check_env_name(&field, name)?;
            if self.env.contains_key(name) {
                return Err(SpecError::field(&field, "is also in env: a variable comes from one place"));
            }
        }
        if let Some(path) = self.secrets.files.keys().find(|path| self.files.contains_key(*path)) {
            return Err(SpecError::field(&format!("secrets.files.{path}"), "is also in files"));
        }
        for (field, name) in self.secrets.names() {
            TaskId::new(name)
                .map_err(|err| SpecError::field(&field, format!("'{name}' is not a secret name: {err}")))?;
            if !crate::secret::may_use(&self.id, &TaskId::new(name).expect("checked")) {
                return Err(SpecError::field(
                    &field,
                    format!(
                        "secret '{name}' serves only the tasks under its directory, and this task is not one"
                    ),
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
        self.validate_sizes()?;
        self.validate_bounds()?;
        self.validate_runs()?;
        self.validate_supervision()
    }

    /// [`TaskSpec::validate`], and the size of the records that carry the spec
    /// ([`TaskSpec::check_record_size`]): what `submit` checks, and what a reader checks of a
    /// spec in the log.
    pub fn validate_all(&self) -> Result<(), SpecError> {
        if self.id.instance().is_some() {
            return Err(SpecError::field(
                "id",
                format!(
                    "'{}' names an instance ('@'): define the task '{}' with count or every_node",
                    self.id,
                    self.id.base()
                ),
            ));
        }
        self.validate()?;
        self.check_record_size()
    }

    /// Rules of `count` and `every_node`.
    fn validate_instances(&self) -> Result<(), SpecError> {
        let longest_instance = match (self.count, self.every_node) {
            (Some(count), _) => count.saturating_sub(1).to_string().len(),
            (None, true) => crate::ids::MAX_NODE_ID_BYTES,
            (None, false) => return Ok(()),
        };
        let field = if self.count.is_some() { "count" } else { "every_node" };
        // An instance's id names its directories (`tasks/<id>`, its output): one file name.
        let base = self.id.base();
        let last = base.as_str().rsplit('/').next().unwrap_or_default();
        let name = last.len() + 1 + longest_instance;
        if name > MAX_FILE_NAME_BYTES {
            return Err(SpecError::field(
                field,
                format!(
                    "the id's last segment '{last}' is too long for instances: with '@' and the longest instance id ({longest_instance} bytes) it takes {name} bytes, above {MAX_FILE_NAME_BYTES}"
                ),
            ));
        }
        // Every instance's assignment carries the spec, and every node keeps each one.
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |json| json.len());
        if bytes > bounds::MAX_INSTANCES_SPEC_BYTES {
            return Err(SpecError::field(
                field,
                format!(
                    "a spec run as instances takes at most {} bytes as JSON; this one takes {bytes}",
                    bounds::MAX_INSTANCES_SPEC_BYTES
                ),
            ));
        }
        if let Some(count) = self.count {
            bounds::check_count("count", count, bounds::COUNT)?;
            if self.every_node {
                return Err(SpecError::field(
                    "every_node",
                    "a task runs either count instances or one on every node, not both",
                ));
            }
        }
        if self.kind() != TaskKind::Service {
            return Err(SpecError::field(field, "only applies to services (no schedule, no once)"));
        }
        Ok(())
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
        if self.max_runtime.is_some() && !periodic && !self.once {
            return Err(SpecError::field("max_runtime", "only applies to scheduled or once tasks"));
        }
        if periodic && self.backoff != RetryBackoff::default() {
            return Err(SpecError::field(
                "backoff",
                "does not apply to scheduled tasks (each slot runs once)",
            ));
        }
        let once_only: [(&str, bool); 2] =
            [("max_attempts", self.max_attempts != DEFAULT_MAX_ATTEMPTS), ("after", !self.after.is_empty())];
        if let Some((field, _)) = once_only.iter().find(|(_, set)| *set && !self.once) {
            return Err(SpecError::field(field, "only applies to once tasks (set once: true)"));
        }
        if self.backoff.initial > self.backoff.max {
            return Err(SpecError::field("backoff.initial", "must not exceed backoff.max"));
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
mod tests;

/// Longest file name (Linux's `NAME_MAX`).
const MAX_FILE_NAME_BYTES: usize = 255;

/// The number of a counted instance (`0`, `12`: decimal, no sign, no leading zero).
pub fn instance_number(instance: &str) -> Option<u32> {
    let canonical =
        instance == "0" || (!instance.starts_with('0') && instance.bytes().all(|b| b.is_ascii_digit()));
    canonical.then(|| instance.parse().ok()).flatten()
}

/// A user name or uid as a spec's `user` (and a node's `--task-user`) takes: 1 to 64 bytes of
/// `[A-Za-z0-9._-]`.
pub fn check_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user.len() <= 64
        && user.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok { Ok(()) } else { Err(format!("'{user}' is not a user name or uid")) }
}

/// An environment variable name: non-empty, no leading digit, no `=` or NUL, not `SHIVA_*`.
fn check_env_name(field: &str, name: &str) -> Result<(), SpecError> {
    let name_ok =
        !name.is_empty() && !name.contains(['=', '\0']) && !name.starts_with(|c: char| c.is_ascii_digit());
    if !name_ok {
        return Err(SpecError::field(
            field,
            "a variable name must be non-empty, not start with a digit, and hold no '=' or NUL",
        ));
    }
    if name.starts_with("SHIVA_") {
        return Err(SpecError::field(field, "SHIVA_* variables are set by the node"));
    }
    Ok(())
}
