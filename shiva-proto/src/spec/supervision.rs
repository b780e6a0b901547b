//! The supervision fields of a task spec: how a run is stopped, restarted, fenced, limited,
//! and what files it finds in its working directory.
//!
//! | field | type | default | meaning |
//! |---|---|---|---|
//! | `stop_signal` | signal name | `"SIGTERM"` | asks a run to stop; SIGKILL follows after `stop_grace` |
//! | `on_disconnect` | `stop` \| `keep` | `stop` | `stop`: a node cut off from the bus stops the run, and the leader moves the task only once that must have happened; `keep`: the run rides the cut out and the task moves at once (copies may overlap) |
//! | `max_restarts` | integer | `5` | services: restarts within `restart_window` before the node reports the task `failed` and the leader moves it |
//! | `restart_window` | duration | `"2m"` | see `max_restarts` |
//! | `stable_after` | duration | `"10s"` | a run this long resets the restart delay |
//! | `user` | name or uid | the node's | run as this user (the node must run as root) |
//! | `rlimits` | object name → number | `{}` | `nofile`, `core`, `nproc`, `fsize`, `stack`, `as`, `cpu`, `memlock`, `data` |
//! | `memory_max` | byte size (`"512MiB"`) | none | memory limit (cgroup); refused on a node without cgroups |
//! | `cpu_max` | cores (`1.5`) | none | CPU limit (cgroup); refused on a node without cgroups |
//! | `files` | object relative path → text | `{}` | written into the run's working directory before each start; at most 1 MiB in all |

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SpecError, TaskSpec};

/// Default `max_restarts`.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// Default `restart_window`.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(120);
/// Default `stable_after`.
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(10);
/// Largest total size of `files`.
pub const MAX_FILES_BYTES: usize = 1 << 20;

/// The resource limits a spec may set, by name, with their `setrlimit` resource.
pub const RLIMITS: [&str; 9] = ["nofile", "core", "nproc", "fsize", "stack", "as", "cpu", "memlock", "data"];

/// What a run does when its node is cut off from the bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// The node stops the run; the task moves once that must have happened.
    #[default]
    Stop,
    /// The run goes on; the task moves at once (copies may overlap).
    Keep,
}

impl OnDisconnect {
    /// The name in specs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            OnDisconnect::Stop => "stop",
            OnDisconnect::Keep => "keep",
        }
    }
}

/// A number of CPU cores (`cpu_max`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cores(pub f64);

impl Eq for Cores {}

pub(super) fn default_max_restarts() -> u32 {
    DEFAULT_MAX_RESTARTS
}

pub(super) fn is_default_max_restarts(value: &u32) -> bool {
    *value == DEFAULT_MAX_RESTARTS
}

pub(super) fn default_restart_window() -> Duration {
    DEFAULT_RESTART_WINDOW
}

pub(super) fn is_default_restart_window(value: &Duration) -> bool {
    *value == DEFAULT_RESTART_WINDOW
}

pub(super) fn default_stable_after() -> Duration {
    DEFAULT_STABLE_AFTER
}

pub(super) fn is_default_stable_after(value: &Duration) -> bool {
    *value == DEFAULT_STABLE_AFTER
}

/// A signal number from its name: `SIGTERM`, `TERM`, `sigterm` (Linux numbering).
pub fn signal_number(name: &str) -> Option<i32> {
    const SIGNALS: [(&str, i32); 12] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("WINCH", 28),
    ];
    let upper = name.trim().to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(known, _)| *known == short).map(|(_, number)| *number)
}

/// Parses a byte size: `512MiB`, `1.5 GB`, `1048576`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|err| format!("'{text}' is not a byte size like 512MiB ({err})"))
}

impl TaskSpec {
    /// The stop signal's number (SIGTERM when none is set).
    pub fn stop_signal_number(&self) -> i32 {
        self.stop_signal.as_deref().and_then(signal_number).unwrap_or(15)
    }

    /// `memory_max` in bytes.
    pub fn memory_max_bytes(&self) -> Option<u64> {
        self.memory_max.as_deref().and_then(|text| parse_bytes(text).ok())
    }

    /// Rules of the supervision fields.
    pub(super) fn validate_supervision(&self) -> Result<(), SpecError> {
        if let Some(name) = &self.stop_signal {
            match signal_number(name) {
                None => {
                    return Err(SpecError::field(
                        "stop_signal",
                        format!("'{name}' is not a signal name (SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1…)"),
                    ));
                }
                Some(9 | 19) => {
                    return Err(SpecError::field(
                        "stop_signal",
                        format!("'{name}' cannot be caught; SIGKILL already follows after stop_grace"),
                    ));
                }
                Some(_) => {}
            }
        }
        let service = self.kind() == super::TaskKind::Service;
        let service_only: [(&str, bool); 3] = [
            ("max_restarts", self.max_restarts != DEFAULT_MAX_RESTARTS),
            ("restart_window", self.restart_window != DEFAULT_RESTART_WINDOW),
            ("stable_after", self.stable_after != DEFAULT_STABLE_AFTER),
        ];
        if let Some((field, _)) = service_only.iter().find(|(_, set)| *set && !service) {
            return Err(SpecError::field(field, "only applies to long-running tasks (no schedule, no once)"));
        }
        if let Some(user) = &self.user {
            super::check_user(user).map_err(|err| SpecError::field("user", err))?;
        }
        if let Some(name) = self.rlimits.keys().find(|name| !RLIMITS.contains(&name.as_str())) {
            return Err(SpecError::field(
                &format!("rlimits.{name}"),
                format!("unknown limit; known: {}", RLIMITS.join(", ")),
            ));
        }
        if let Some(text) = &self.memory_max {
            let bytes = parse_bytes(text).map_err(|message| SpecError::field("memory_max", message))?;
            let (min, max) = super::bounds::MEMORY_MAX;
            if !(min..=max).contains(&bytes) {
                return Err(SpecError::field(
                    "memory_max",
                    format!("'{text}' ({bytes} bytes) is out of range: from 1MiB to 1PiB"),
                ));
            }
        }
        if let Some(Cores(cores)) = self.cpu_max
            && (!cores.is_finite() || !(0.01..=4096.0).contains(&cores))
        {
            return Err(SpecError::field("cpu_max", format!("{cores} is not a number of cores from 0.01")));
        }
        validate_files(&self.files)?;
        let secret_files: BTreeMap<String, String> =
            self.secrets.files.keys().map(|path| (path.clone(), String::new())).collect();
        validate_files(&secret_files).map_err(|err| SpecError(err.0.replace("'files.", "'secrets.files.")))
    }
}

fn validate_files(files: &BTreeMap<String, String>) -> Result<(), SpecError> {
    let mut total = 0usize;
    for (path, content) in files {
        let field = format!("files.{path}");
        let relative = Path::new(path);
        let normal = !path.is_empty()
            && !path.contains('\0')
            && relative.components().all(|part| matches!(part, Component::Normal(_)));
        if !normal {
            return Err(SpecError::field(
                &field,
                "must be a relative path inside the working directory (no '/' at the start, no '..', no '.')",
            ));
        }
        let component = relative.components().map(|part| part.as_os_str().len()).max().unwrap_or(0);
        if path.len() > super::bounds::MAX_PATH_BYTES || component > 255 {
            return Err(SpecError::field(
                &field,
                "is too long: at most 4096 bytes, and 255 bytes per directory or file name",
            ));
        }
        total += path.len() + content.len();
    }
    if total > MAX_FILES_BYTES {
        return Err(SpecError::field(
            "files",
            format!("{total} bytes in all, above the cap of {MAX_FILES_BYTES} bytes (1 MiB)"),
        ));
    }
    Ok(())
}
