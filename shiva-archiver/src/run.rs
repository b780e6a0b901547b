//! `run`: archive partitions until stopped.
//!
//! Per partition: resume where the newest archived file's range ends (or, for an empty archive,
//! at the earliest offset the broker holds); fill a file until a cut rule says the next record
//! starts a new one; publish create-if-absent; commit the offset to Kafka (a hint) only after.
//! An idle partition (nothing new for `--idle-publish`) and a SIGTERM publish the partial file.
//!
//! Every record is checked against the position: one below it was already read (dropped); one
//! above it is a gap, accepted only while the skipped offsets are still held by the broker
//! (compaction, transaction markers). When records the archive needs are gone, the archiver
//! exits with [`EXIT_DATA_GONE`] and says which offsets are missing, instead of skipping them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{info, warn};

use crate::cut::{Batch, Limits};
use crate::dest::{Dest, Published};
use crate::format::{Codec, Record, encode_file};
use crate::kafka::{Polled, Source};

/// Exit code of a permanent failure, one no restart can cure: records the archive needs are no
/// longer in Kafka, or the bus refuses the archiver (a codec it cannot read, TLS, authentication,
/// an ACL, a missing topic: [`crate::kafka::Refused`]). The Shiva task should list it in
/// `permanent_exit_codes`.
pub const EXIT_DATA_GONE: u8 = 3;

/// What `run` needs.
pub struct RunConfig {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// Topic.
    pub topic: String,
    /// Partitions (all when empty).
    pub partitions: Vec<i32>,
    /// Where files go.
    pub dest: Dest,
    /// Cut rules.
    pub limits: Limits,
    /// A partial file is published after this long without new records.
    pub idle_publish: Duration,
    /// Compression and level.
    pub codec: Codec,
    /// Consumer group for the offset hints.
    pub group: String,
    /// Extra librdkafka settings.
    pub settings: Vec<(String, String)>,
    /// Encrypt every file to these age recipients (none: plain files).
    pub recipients: Vec<age::x25519::Recipient>,
}

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DataGone(pub String);

struct Partition {
    /// Where the file being filled starts (the previous file's `next_offset`).
    start: i64,
    /// The next offset expected from Kafka.
    position: i64,
    batch: Batch,
    last_record: Instant,
    records: u64,
    bytes: u64,
}

/// Runs until SIGTERM/SIGINT (then publishes partial files) or a failure. The process should
/// have blocked them first thing (see [`block_stop_signals`]).
pub fn run(config: RunConfig) -> anyhow::Result<()> {
    let stop = stop_signals()?;
    let source = Source::new(&config.bootstrap, &config.topic, &config.group, &config.settings)?;
    let partitions = if config.partitions.is_empty() {
        source.partitions(Duration::from_secs(30))?
    } else {
        config.partitions.clone()
    };
    config.dest.prepare(&config.topic, &partitions)?;
    for partition in &partitions {
        let found = config.dest.compressions(&config.topic, *partition)?;
        if found.iter().any(|c| c != config.codec.name()) {
            bail!(
                "{}/{partition} is archived with {} but --compression is {}: an archive keeps one compression",
                config.topic,
                found.join(", "),
                config.codec.name()
            );
        }
    }
    let mut parts = BTreeMap::new();
    for partition in &partitions {
        let (low, high) = source.watermarks(*partition, Duration::from_secs(30))?;
        let start = match config.dest.newest(&config.topic, *partition)? {
            Some(footer) => footer.next_offset,
            None => low,
        };
        check_position(ARCHIVE, &config.topic, *partition, start, low, high)?;
        info!(topic = %config.topic, partition, from = start, end = high, "resuming");
        let part = Partition {
            start,
            position: start,
            batch: Batch::default(),
            last_record: Instant::now(),
            records: 0,
            bytes: 0,
        };
        parts.insert(*partition, part);
    }
    source.assign(&parts.iter().map(|(p, part)| (*p, part.position)).collect())?;
    let mut report = Instant::now();
    loop {
        if stop.read_signal().ok().flatten().is_some() {
            info!("stopping: publishing partial files");
            for (partition, part) in parts.iter_mut() {
                publish(&config, &source, *partition, part, None)?;
            }
            return Ok(());
        }
        match source.poll(Duration::from_millis(100))? {
            Polled::Record(partition, record) => {
                let Some(part) = parts.get_mut(&partition) else { continue };
                take(&config, &source, partition, part, record)?;
            }
            Polled::OutOfRange(_) => {
                for (partition, part) in &parts {
                    let (low, high) = source.watermarks(*partition, Duration::from_secs(10))?;
                    check_position(ARCHIVE, &config.topic, *partition, part.position, low, high)?;
                }
            }
            Polled::Nothing => {}
        }
        for (partition, part) in parts.iter_mut() {
            if !part.batch.records.is_empty() && part.last_record.elapsed() >= config.idle_publish {
                publish(&config, &source, *partition, part, None)?;
            }
        }
        if report.elapsed() >= Duration::from_secs(10) {
            for (partition, part) in &parts {
                still_held(ARCHIVE, &source, &config.topic, *partition, part.position)?;
            }
            let seconds = report.elapsed().as_secs_f64();
            for (partition, part) in parts.iter_mut() {
                info!(
                    topic = %config.topic,
                    partition,
                    position = part.position,
                    records_per_s = (part.records as f64 / seconds).round(),
                    mb_per_s = format!("{:.2}", part.bytes as f64 / seconds / 1e6),
                    "throughput"
                );
                part.records = 0;
                part.bytes = 0;
            }
            report = Instant::now();
        }
    }
}

/// What a reader of a topic keeps, named in its messages: the archive or the index.
#[derive(Debug, Clone, Copy)]
pub struct Kept {
    /// "archive".
    pub noun: &'static str,
    /// "archived".
    pub done: &'static str,
}

/// The archiver's.
pub const ARCHIVE: Kept = Kept { noun: "archive", done: "archived" };

/// A position the broker can serve: not below what it still holds (deleted records) and not
/// beyond its end (a truncated or recreated log).
pub fn check_position(
    kept: Kept,
    topic: &str,
    partition: i32,
    position: i64,
    low: i64,
    high: i64,
) -> Result<(), DataGone> {
    if position < low {
        return Err(gone(kept, topic, partition, position, low));
    }
    if position > high {
        return Err(DataGone(format!(
            "{topic}/{partition}: the {} ends at offset {position} but the broker's log ends at {high} \
             (it holds {low}..{high}): records from {position} on were lost (deleted, truncated or the topic \
             recreated) before they were {}; stopping instead of skipping them",
            kept.noun, kept.done
        )));
    }
    Ok(())
}

/// Checks, while reading, that a partition's position is still one the broker serves. A broker
/// may answer a fetch below what it still holds with no record and no error (the test broker
/// does): without this look the partition would stop moving in silence. A failed look (the
/// broker unreachable) proves nothing and is not an error.
pub fn still_held(
    kept: Kept,
    source: &Source,
    topic: &str,
    partition: i32,
    position: i64,
) -> Result<(), DataGone> {
    match source.watermarks(partition, Duration::from_secs(5)) {
        Ok((low, high)) => check_position(kept, topic, partition, position, low, high),
        Err(err) => {
            tracing::debug!(error = format!("{err:#}"), partition, "cannot read the partition's offsets now");
            Ok(())
        }
    }
}

/// Records from `position` were deleted before they were read.
pub fn gone(kept: Kept, topic: &str, partition: i32, position: i64, low: i64) -> DataGone {
    DataGone(format!(
        "{topic}/{partition}: records {position}..{} were deleted from Kafka before they were {} \
         (the broker holds offsets from {low} on); stopping instead of skipping them",
        low.saturating_sub(1),
        kept.done
    ))
}

/// Takes one record of `partition`.
fn take(
    config: &RunConfig,
    source: &Source,
    partition: i32,
    part: &mut Partition,
    record: Record,
) -> anyhow::Result<()> {
    if record.offset < part.position {
        return Ok(());
    }
    if record.offset > part.position {
        // A gap: fine while the skipped offsets are still held (compaction, transaction
        // markers); records deleted before they were read are not.
        let (low, _) = source.watermarks(partition, Duration::from_secs(10))?;
        if part.position < low && record.offset >= low {
            return Err(gone(ARCHIVE, &config.topic, partition, part.position, low).into());
        }
    }
    if !part.batch.fits(&record, &config.limits) {
        publish(config, source, partition, part, Some(record.offset))?;
        if part.start != record.offset {
            // Another writer's file ended elsewhere: reading goes on from there (sought).
            return Ok(());
        }
    }
    part.position = record.offset + 1;
    part.last_record = Instant::now();
    part.records += 1;
    part.bytes += record.raw_len() as u64;
    part.batch.push(record);
    if part.batch.full(&config.limits) {
        // Nothing more fits: publish now instead of when the next record comes.
        publish(config, source, partition, part, None)?;
    }
    Ok(())
}

/// Publishes the partition's file; `next` is where the next file starts (the position after
/// the batch when `None`).
fn publish(
    config: &RunConfig,
    source: &Source,
    partition: i32,
    part: &mut Partition,
    next: Option<i64>,
) -> anyhow::Result<()> {
    if part.batch.records.is_empty() {
        return Ok(());
    }
    let next = next.unwrap_or(part.position);
    let records = part.batch.take();
    let encoded =
        encode_file(&config.topic, partition, part.start, &records, next, config.codec, &config.recipients);
    match config.dest.publish(&encoded)? {
        Published::Written(footer) => {
            info!(
                topic = %config.topic,
                partition,
                first = footer.first_offset,
                next = footer.next_offset,
                records = footer.count,
                bytes = encoded.bytes.len(),
                "published"
            );
            part.start = footer.next_offset;
        }
        Published::Adopted(footer) => {
            warn!(
                topic = %config.topic,
                partition,
                first = footer.first_offset,
                next = footer.next_offset,
                "another writer archived this range first; continuing after it"
            );
            if footer.next_offset <= footer.first_offset {
                bail!("the archived file at offset {} has a broken footer", footer.first_offset);
            }
            part.start = footer.next_offset;
            part.position = footer.next_offset;
            source.seek(partition, footer.next_offset)?;
        }
    }
    source.commit(partition, part.start);
    Ok(())
}

/// Blocks SIGTERM and SIGINT: the first line of `main`, before any thread exists. A thread
/// takes its mask from the thread that starts it, and a stop signal that finds a thread (or the
/// process, before this call) not blocking it takes its default action, which kills the process
/// instead of stopping it cleanly. A signal that arrives meanwhile stays pending, for
/// [`stop_signals`] to read, or for [`default_stop_signals`] to deliver.
pub fn block_stop_signals() -> anyhow::Result<()> {
    stop_mask().thread_block()?;
    Ok(())
}

/// For a command that does not watch for stop signals: undoes [`block_stop_signals`], so that a
/// stop signal, one pending meanwhile included, kills it as it would any program.
pub fn default_stop_signals() -> anyhow::Result<()> {
    stop_mask().thread_unblock()?;
    Ok(())
}

/// SIGTERM and SIGINT as a file descriptor (blocked, read without waiting), pending ones
/// included.
pub fn stop_signals() -> anyhow::Result<SignalFd> {
    stop_mask().thread_block()?;
    Ok(SignalFd::with_flags(&stop_mask(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?)
}

fn stop_mask() -> SigSet {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask
}
