//! The Shiva archiving pipeline: Kafka partitions to compressed files, exactly once.
//!
//! * [`format`]: the file format (records, zstd, footer), pure;
//! * [`cut`]: where files are cut, pure;
//! * [`dest`]: the archive on a filesystem, create-if-absent publishing;
//! * [`source`]: the Kafka consumer;
//! * [`run`], [`fsck`], [`extract`], [`housekeep`]: the commands.

pub mod cli;
pub mod crypt;
pub mod cut;
pub mod dest;
pub mod extract;
pub mod format;
pub mod fsck;
pub mod housekeep;
pub mod run;
pub mod source;
