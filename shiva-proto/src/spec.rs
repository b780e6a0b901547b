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
}

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

/// The kind of a task, derived from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Kept running, restarted, moved when its node dies.
    Service,
}

impl TaskKind {
    /// The name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Service => "service",
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
        }
    }

    /// The task's kind.
    pub fn kind(&self) -> TaskKind {
        TaskKind::Service
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
    fn wire_reading_is_lenient() {
        let spec: TaskSpec = serde_json::from_str(r#"{"id":"a","command":"x","future":true}"#).unwrap();
        assert_eq!(spec.command, "x");
    }
}
