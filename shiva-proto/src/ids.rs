//! Identifiers: validated newtypes for node and task ids.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("{what} is empty")]
    Empty {
        /// "task id" or "node id".
        what: &'static str,
    },
    /// The identifier is longer than allowed.
    #[error("{what} '{id}' is longer than {max} bytes")]
    TooLong {
        /// "task id" or "node id".
        what: &'static str,
        /// The refused value.
        id: String,
        /// The limit.
        max: usize,
    },
    /// The identifier has the wrong number of `/`-separated segments.
    #[error("{what} '{id}' has {found} segments; 1 to {max} separated by '/' are allowed")]
    Segments {
        /// "task id" or "node id".
        what: &'static str,
        /// The refused value.
        id: String,
        /// Segments found.
        found: usize,
        /// Segments allowed.
        max: usize,
    },
    /// A segment is empty, `.`, `..`, or holds a character outside `[A-Za-z0-9_.-]`.
    #[error(
        "{what} '{id}' has an invalid segment '{segment}': use letters, digits, '_', '.', '-', and never '.' or '..'"
    )]
    Segment {
        /// "task id" or "node id".
        what: &'static str,
        /// The refused value.
        id: String,
        /// The offending segment.
        segment: String,
    },
}

fn check(what: &'static str, id: &str, max_segments: usize, max_len: usize) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { what });
    }
    if id.len() > max_len {
        return Err(IdError::TooLong { what, id: id.to_owned(), max: max_len });
    }
    let segments: Vec<&str> = id.split('/').collect();
    if segments.len() > max_segments {
        return Err(IdError::Segments { what, id: id.to_owned(), found: segments.len(), max: max_segments });
    }
    for segment in segments {
        let valid_chars =
            segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if segment.is_empty() || segment == "." || segment == ".." || !valid_chars {
            return Err(IdError::Segment { what, id: id.to_owned(), segment: segment.to_owned() });
        }
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $segments:expr, $max_len:expr) => {
        id_type!($(#[$doc])* $name, $what, $segments, $max_len, check);
    };
    ($(#[$doc:meta])* $name:ident, $what:literal, $segments:expr, $max_len:expr, $check:ident) => {
        $(#[$doc])*
        ///
        /// Shared text: a clone costs no allocation, so the log view keeps one copy of an id
        /// however many records name it.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps an identifier.
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                $check($what, &id, $segments, $max_len)?;
                Ok(Self(id.into()))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(id: String) -> Result<Self, IdError> {
                Self::new(id)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(id: &str) -> Result<Self, IdError> {
                Self::new(id)
            }
        }
    };
}

id_type!(
    /// A task id: 1 to 4 segments separated by `/` (e.g. `tenant/channel/app`), each made of
    /// letters, digits, `_`, `.`, `-`, never `.` or `..` (at most 255 bytes); or the id of one
    /// instance of such a task: `<task>@<instance>`, the instance being a number or a node id
    /// (see [`TaskId::instance`]).
    TaskId,
    "task id",
    4,
    MAX_TASK_ID_BYTES,
    check_task
);

/// Longest task id (an instance's adds `@` and at most a node id's length).
pub const MAX_TASK_ID_BYTES: usize = 255;

/// Longest node id.
pub const MAX_NODE_ID_BYTES: usize = 128;

/// Checks a task id: a definition's, or an instance's (`<task>@<instance>`).
fn check_task(what: &'static str, id: &str, max_segments: usize, max_len: usize) -> Result<(), IdError> {
    match id.split_once('@') {
        None => check(what, id, max_segments, max_len),
        Some((base, instance)) => {
            check(what, base, max_segments, max_len)?;
            check("instance", instance, 1, MAX_NODE_ID_BYTES).map_err(|_| IdError::Segment {
                what,
                id: id.to_owned(),
                segment: instance.to_owned(),
            })
        }
    }
}

impl TaskId {
    /// The instance this id names (`web@2` → `2`, `web@node-a` → `node-a`), if it names one:
    /// a task with `count` or `every_node` runs as instances, each a task of its own on the
    /// bus (assignment, status, runs, logs), defined by its task's spec.
    pub fn instance(&self) -> Option<&str> {
        self.0.split_once('@').map(|(_, instance)| instance)
    }

    /// The task an instance belongs to (itself when it is no instance).
    pub fn base(&self) -> TaskId {
        match self.0.split_once('@') {
            Some((base, _)) => TaskId(base.into()),
            None => self.clone(),
        }
    }

    /// The id of `instance` (a number or a node id) of this task; `None` when this id names an
    /// instance already, or `instance` is no valid one.
    pub fn with_instance(&self, instance: &str) -> Option<TaskId> {
        if self.instance().is_some() {
            return None;
        }
        TaskId::new(format!("{}@{instance}", self.0)).ok()
    }
}

impl std::borrow::Borrow<str> for TaskId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

id_type!(
    /// A node id: one segment of letters, digits, `_`, `.`, `-` (a host name fits).
    NodeId,
    "node id",
    1,
    MAX_NODE_ID_BYTES
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids() {
        for ok in ["a", "tenant/channel/app", "a/b/c/d", "x_1.2-3", "a/.b"] {
            assert!(TaskId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b/c/d/e", "a//b", "/a", "a/", ".", "a/..", "a b", "a:b", "é", "a/./b"] {
            assert!(TaskId::new(bad).is_err(), "{bad}");
        }
        assert!(TaskId::new("x".repeat(256)).is_err());
    }

    #[test]
    fn instance_ids() {
        let web = TaskId::new("a/web").unwrap();
        let two = web.with_instance("2").unwrap();
        assert_eq!(two.as_str(), "a/web@2");
        assert_eq!(two.instance(), Some("2"));
        assert_eq!(two.base(), web);
        assert_eq!(web.instance(), None);
        assert_eq!(web.base(), web);
        assert!(two.with_instance("3").is_none(), "an instance has no instances");
        assert!(web.with_instance(&"n".repeat(MAX_NODE_ID_BYTES)).is_some());
        for bad in ["@1", "web@", "web@1@2", "web@a/b", "web@..", "a/b/c/d/e@1", "web@é"] {
            assert!(TaskId::new(bad).is_err(), "{bad}");
        }
        assert!(web.with_instance(&"n".repeat(MAX_NODE_ID_BYTES + 1)).is_none());
    }

    #[test]
    fn node_ids() {
        assert!(NodeId::new("host-1.example").is_ok());
        assert!(NodeId::new("a/b").is_err());
        assert!(NodeId::new("..").is_err());
    }

    #[test]
    fn errors_name_the_segment() {
        let err = TaskId::new("a/../b").unwrap_err().to_string();
        assert!(err.contains("'..'"), "{err}");
    }
}
