//! Shiva's wire contract, shared by `shiva-node` and `shiva-ctl`. No I/O.
//!
//! # Layout
//! * [`ids`]: validated task and node ids;
//! * [`spec`]: the task spec operators submit (strict parsing of user input);
//! * [`records`]: the versioned JSON envelope and every record body;
//! * [`runs`]: records of periodic and one-shot runs, and run ids;
//! * [`topics`]: topic names and record keys;
//! * [`view`]: the pure fold of the control topics into cluster state, with the election's
//!   acceptance rules, so that every reader (node or CLI) sees the same state.
//!
//! Every record on the wire is documented with an example in `docs/protocol.md`.
#![deny(missing_docs)]

pub mod auth;
pub mod commands;
pub mod dag;
pub mod duration;
pub mod ids;
pub mod rebalance;
pub mod records;
pub mod rows;
pub mod runs;
pub mod schedule;
pub mod secret;
pub mod spec;
pub mod topics;
pub mod view;
pub mod wall;

pub use ids::{IdError, NodeId, TaskId};
pub use records::{Body, DecodeError, Envelope, Header, PROTOCOL_VERSION, protocol};
pub use spec::{SpecError, TaskSpec};
pub use topics::{TopicKind, Topics};
pub use view::{LogView, Outcome};
