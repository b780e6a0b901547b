//! The Shiva indexing pipeline: a Kafka topic into a full-text index that can be queried, with
//! no record lost or indexed twice across restarts.
//!
//! * [`index`]: the index file (SQLite with FTS5), its batches and its searches;
//! * [`run`]: the Kafka side (the archiver's consumer, [`shiva_archiver::kafka::Source`]).

pub mod index;
pub mod run;
