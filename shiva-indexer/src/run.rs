//! `run`: reads a topic's partitions from the positions the index holds and adds their records
//! in batches, each batch committed with its positions in one transaction (see [`crate::index`]).
//!
//! Like the archiver it reads without consumer-group membership and never skips records in
//! silence: a position below what the broker still holds, or beyond its end, stops the indexer
//! with [`shiva_archiver::run::EXIT_DATA_GONE`] (3) naming the missing offsets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shiva_archiver::kafka::{Polled, Source};
use shiva_archiver::run::{Kept, check_position, gone, still_held, stop_signals};
use tracing::info;

use crate::index::{Doc, Index};

/// Names the index in the shared messages.
const INDEX: Kept = Kept { noun: "index", done: "indexed" };

/// What `run` needs.
#[derive(Debug)]
pub struct RunConfig {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Topic.
    pub topic: String,
    /// Partitions (empty: all).
    pub partitions: Vec<i32>,
    /// The index file.
    pub index: PathBuf,
    /// Commit after this many records (1 to 1,000,000).
    pub batch_records: usize,
    /// Commit a batch this long after its first record at most (1ms to 1h).
    pub batch_wait: Duration,
    /// Commit once a batch holds this many bytes of keys and values (1KiB to 4GiB).
    pub batch_bytes: u64,
    /// Consumer group offsets are committed to (a hint for tools).
    pub group: String,
    /// Extra librdkafka settings.
    pub settings: Vec<(String, String)>,
}

/// Indexes until SIGTERM or SIGINT (then commits what it read and returns). The process should
/// have blocked them first thing (see `shiva_archiver::run::block_stop_signals`).
pub fn run(config: RunConfig) -> anyhow::Result<()> {
    let stop = stop_signals()?;
    let mut index = Index::open(&config.index, &config.topic)?;
    let source = Source::new(&config.bootstrap, &config.topic, &config.group, &config.settings)?;
    let partitions = if config.partitions.is_empty() {
        source.partitions(Duration::from_secs(30))?
    } else {
        config.partitions.clone()
    };
    let stored = index.positions()?;
    let mut positions = BTreeMap::new();
    for partition in &partitions {
        let start = start_of(&source, &config.topic, *partition, &stored)?;
        positions.insert(*partition, start);
    }
    source.assign(&positions)?;
    let mut looked_for_partitions = Instant::now();
    let mut batch: Vec<Doc> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut first_at = Instant::now();
    let mut report = Instant::now();
    let mut indexed = 0u64;
    loop {
        if stop.read_signal().ok().flatten().is_some() {
            commit(&mut index, &source, &mut batch, &positions)?;
            info!("stopped: every record read is in the index");
            return Ok(());
        }
        match source.poll(Duration::from_millis(100))? {
            Polled::Record(partition, record) => {
                let Some(position) = positions.get_mut(&partition) else { continue };
                if record.offset < *position {
                    continue;
                }
                if record.offset > *position {
                    // A gap: fine while the skipped offsets are still held (compaction,
                    // transaction markers); records deleted before they were read are not.
                    let (low, _) = source.watermarks(partition, Duration::from_secs(10))?;
                    if *position < low && record.offset >= low {
                        return Err(gone(INDEX, &config.topic, partition, *position, low).into());
                    }
                }
                *position = record.offset.saturating_add(1);
                if batch.is_empty() {
                    first_at = Instant::now();
                }
                let size =
                    record.key.as_ref().map_or(0, Vec::len) + record.value.as_ref().map_or(0, Vec::len);
                batch_bytes = batch_bytes.saturating_add(size as u64);
                batch.push(Doc::new(
                    partition,
                    record.offset,
                    record.timestamp,
                    record.key.as_deref(),
                    record.value.as_deref(),
                ));
            }
            Polled::OutOfRange(_) => {
                for (partition, position) in &positions {
                    let (low, high) = source.watermarks(*partition, Duration::from_secs(10))?;
                    check_position(INDEX, &config.topic, *partition, *position, low, high)?;
                }
            }
            Polled::Nothing => {}
        }
        if batch.len() >= config.batch_records
            || batch_bytes >= config.batch_bytes
            || (!batch.is_empty() && first_at.elapsed() >= config.batch_wait)
        {
            indexed += commit(&mut index, &source, &mut batch, &positions)?;
            batch_bytes = 0;
        }
        if config.partitions.is_empty() && looked_for_partitions.elapsed() >= PARTITIONS_EVERY {
            // Partitions added to the topic since: indexed from their first record.
            looked_for_partitions = Instant::now();
            let found = source.partitions(Duration::from_secs(10))?;
            let added: Vec<i32> = found.into_iter().filter(|p| !positions.contains_key(p)).collect();
            if !added.is_empty() {
                indexed += commit(&mut index, &source, &mut batch, &positions)?;
                batch_bytes = 0;
                let stored = index.positions()?;
                for partition in added {
                    let start = start_of(&source, &config.topic, partition, &stored)?;
                    positions.insert(partition, start);
                }
                source.assign(&positions)?;
            }
        }
        if report.elapsed() >= Duration::from_secs(10) {
            for (partition, position) in &positions {
                still_held(INDEX, &source, &config.topic, *partition, *position)?;
            }
            info!(topic = %config.topic, indexed, positions = ?positions, "progress");
            report = Instant::now();
        }
    }
}

/// How often `run` looks for partitions added to the topic (without `--partitions`).
const PARTITIONS_EVERY: Duration = Duration::from_secs(60);

/// Where a partition's reading starts: its stored position; for a partition the index has never
/// seen, its first record still held when the index holds none yet (a new index starts from what
/// the broker holds), else offset 0 (a partition added since: records deleted from it before it
/// was first read are missing, and said so, not skipped).
fn start_of(
    source: &Source,
    topic: &str,
    partition: i32,
    stored: &BTreeMap<i32, i64>,
) -> anyhow::Result<i64> {
    let (low, high) = source.watermarks(partition, Duration::from_secs(30))?;
    let start = match stored.get(&partition) {
        Some(next) => *next,
        None if stored.is_empty() => low,
        None => 0,
    };
    check_position(INDEX, topic, partition, start, low, high)?;
    info!(topic, partition, from = start, end = high, "resuming");
    Ok(start)
}

/// Commits the batch with the positions; returns how many records were new.
fn commit(
    index: &mut Index,
    source: &Source,
    batch: &mut Vec<Doc>,
    positions: &BTreeMap<i32, i64>,
) -> anyhow::Result<u64> {
    if batch.is_empty() {
        return Ok(0);
    }
    let added = index.commit(batch, positions)?;
    if added < batch.len() as u64 {
        // Another indexer on the same file (a second copy) stored some first: each is held once.
        tracing::warn!(read = batch.len(), added, "some records were already in the index");
    }
    batch.clear();
    for (partition, position) in positions {
        source.commit(*partition, *position);
    }
    Ok(added)
}
