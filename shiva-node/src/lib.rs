//! The Shiva node daemon.
//!
//! # Layout
//! * [`config`]: flags and their validation; [`clock`]: the boot-time clock of leases and log time;
//! * pure decisions: [`membership`] (liveness in log time), [`election`], [`placement`],
//!   [`leader`] (reconciliation);
//! * I/O: [`api`] (the HTTP server: API, metrics, dashboard), [`supervisor`] (child processes), [`node`] (the driver: reads the bus, feeds the
//!   decisions, writes their records).
pub mod api;
pub mod clock;
pub mod config;
pub mod election;
pub mod fault;
pub mod firing;
pub mod leader;
pub mod limits;
pub mod logship;
pub mod membership;
pub mod node;
pub mod placement;
pub mod runlog;
pub mod runner;
pub mod scheduler;
pub mod secrets;
pub mod shim;
pub mod supervisor;
pub mod tree;

pub use config::{NodeArgs, NodeConfig};
pub use node::run;
