//! Identifiers: validated newtypes for node and task ids.

use std::fmt;

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
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier.
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                check($what, &id, $segments, $max_len)?;
                Ok(Self(id))
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
                id.0
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
    /// letters, digits, `_`, `.`, `-`, never `.` or `..`.
    TaskId,
    "task id",
    4,
    255
);

id_type!(
    /// A node id: one segment of letters, digits, `_`, `.`, `-` (a host name fits).
    NodeId,
    "node id",
    1,
    128
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
