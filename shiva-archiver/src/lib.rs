//! The Shiva archiving pipeline: Kafka partitions to compressed files, exactly once.
//!
//! * [`format`]: the file format (records, zstd, footer), pure;
//! * [`cut`]: where files are cut, pure;
//! * [`dest`]: the archive on a filesystem or S3, create-if-absent publishing;
//! * [`kafka`]: the Kafka consumer (`run`) and producer (`extract --to-topic`);
//! * [`run`], [`fsck`], [`extract`], [`housekeep`]: the commands ([`progress`]: their bars).

pub mod cli;
pub mod crypt;
pub mod cut;
pub mod dest;
pub mod extract;
pub mod format;
pub mod fsck;
pub mod housekeep;
pub mod kafka;
pub mod progress;
pub mod run;
