//! Reading the control topics: one consumer, assigned (not subscribed: no group, no rebalance)
//! to partition 0 of each topic from the beginning, polled by a dedicated thread.
//!
//! Invariant: each topic's records reach the node once, in log order. A record below the read
//! position is dropped, and the client is sent back up to the position (a broker that serves
//! records again, see [`seek_up`], would otherwise keep it re-reading them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use shiva_proto::TopicKind;
use tokio::sync::mpsc;

use crate::filebus::{self, Waker};
use crate::{BusConfig, BusError, BusKind, Context};

/// One record as read.
#[derive(Debug, Clone)]
pub struct Record {
    /// Which control topic.
    pub topic: TopicKind,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// CreateTime in milliseconds, when set.
    pub timestamp_ms: Option<i64>,
}

/// What the reader thread reports, in order.
#[derive(Debug)]
pub enum ReaderEvent {
    /// A record.
    Record(Record),
    /// Every record up to the topics' ends as of the matching [`Reader::sync`] call has been
    /// sent before this event.
    Synced(u64),
    /// The read-to-end could not learn the topics' ends.
    SyncFailed(u64, String),
    /// A client error (broker down, …); the reader keeps going.
    Error(String),
    /// A topic's end fell below what was already read (the topic was deleted and recreated, or
    /// the broker lost its tail): the records read no longer describe the log, and whatever is
    /// written next would be skipped. The reader stops after this event.
    Regressed {
        /// The topic.
        topic: String,
        /// The next offset this reader expected.
        position: i64,
        /// The topic's end now.
        end: i64,
    },
}

impl ReaderEvent {
    /// The message of a [`ReaderEvent::Regressed`].
    pub fn regressed_message(topic: &str, position: i64, end: i64) -> String {
        format!(
            "topic {topic} went backwards: its end is offset {end}, but records up to offset {} were \
             already read (was it deleted and recreated, or did the broker lose its tail?); stopping \
             rather than skipping every new record: repair or restore the topic, then start again",
            position - 1
        )
    }
}

enum Request {
    Sync(u64),
}

/// Handle to the reader thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Reader {
    requests: Requests,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How requests reach the reader thread of each bus.
#[derive(Debug)]
enum Requests {
    Kafka(std_mpsc::Sender<Request>),
    File(std_mpsc::Sender<filebus::Request>, Arc<Waker>),
}

impl Reader {
    /// Starts reading `topics` from their beginning; events go to `events`.
    pub fn spawn(
        config: &BusConfig,
        topics: &[TopicKind],
        events: mpsc::Sender<ReaderEvent>,
    ) -> Result<Reader, BusError> {
        if let BusKind::File(dir) = &config.kind {
            let (requests, stop, waker, thread) = filebus::spawn_reader(config, dir, topics, events)?;
            return Ok(Reader { requests: Requests::File(requests, waker), stop, thread: Some(thread) });
        }
        let client = config.client_config(&[
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("enable.partition.eof", "true".into()),
            ("auto.offset.reset", "earliest".into()),
            ("fetch.wait.max.ms", config.fetch_wait.as_millis().max(1).to_string()),
            ("fetch.error.backoff.ms", "50".into()),
            ("group.id", "shiva-reader-unused".into()),
        ]);
        let consumer: BaseConsumer<Context> = client
            .create_with_context(Context::default())
            .map_err(|err| BusError::Kafka(format!("failed to create a consumer: {err}")))?;
        let mut assignment = TopicPartitionList::new();
        let mut names = BTreeMap::new();
        for kind in topics {
            let name = config.topics.name(*kind);
            assignment
                .add_partition_offset(&name, 0, Offset::Offset(0))
                .map_err(|err| BusError::Kafka(err.to_string()))?;
            names.insert(name, *kind);
        }
        consumer
            .assign(&assignment)
            .map_err(|err| BusError::Kafka(format!("failed to assign partitions: {err}")))?;
        let (requests, requests_rx) = std_mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("shiva-reader".into())
            .spawn(move || poll_loop(consumer, names, requests_rx, events, thread_stop))
            .map_err(|err| BusError::Kafka(format!("failed to start the reader thread: {err}")))?;
        Ok(Reader { requests: Requests::Kafka(requests), stop, thread: Some(thread) })
    }

    /// Asks for a read-to-end: [`ReaderEvent::Synced`]`(token)` follows every record up to the
    /// topics' current ends.
    pub fn sync(&self, token: u64) {
        match &self.requests {
            Requests::Kafka(requests) => {
                let _ = requests.send(Request::Sync(token));
            }
            Requests::File(requests, waker) => {
                let _ = requests.send(filebus::Request::Sync(token));
                waker.wake();
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Requests::File(_, waker) = &self.requests {
            waker.wake();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the reader checks that no topic went backwards when nothing else asked for the
/// topics' ends.
const REGRESSION_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The shortest time between two checks forced by records read below the position.
const SOON: Duration = Duration::from_millis(250);

/// The shortest time between two seeks of one topic back up to the read position.
const SEEK_EVERY: Duration = Duration::from_millis(250);

/// The longest: a client sent back up to the same position again and again, with no new record
/// in between, waits twice as long each time, up to this.
const SEEK_AT_MOST_EVERY: Duration = Duration::from_secs(8);

/// The last seek of one topic back up to the read position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeekUp {
    /// When.
    at: std::time::Instant,
    /// To where.
    position: i64,
    /// How long before the next one.
    wait: Duration,
}

/// Whether a record at `offset` read below the `position` sends the consumer back up to the
/// position, and the seek to remember if so. The client's own fetch position went back below
/// what was already delivered: tansu 0.6.0 answers a fetch of a partition that compaction left
/// gaps in with overlapping batches, and librdkafka takes its next fetch offset from the last
/// record of the answer; it then re-read a few records per fetch, for minutes, while the same
/// consumer was seen reading nothing of the other topics. Every record below the position was
/// delivered already, in order, so the seek skips nothing.
///
/// At most one seek per [`SEEK_EVERY`] per topic. Seeking again to the same position means no
/// record came in between; on Kafka that is a client reset below a position past the topic's end
/// (a truncated or recreated topic, which `regressed` reports): each seek then costs a read from
/// the start, so the wait doubles, up to [`SEEK_AT_MOST_EVERY`].
fn seek_up(offset: i64, position: i64, last: Option<SeekUp>, now: std::time::Instant) -> Option<SeekUp> {
    if offset >= position {
        return None;
    }
    let wait = match last {
        None => SEEK_EVERY,
        Some(last) if now.saturating_duration_since(last.at) < last.wait => return None,
        Some(last) if last.position == position => last.wait.saturating_mul(2).min(SEEK_AT_MOST_EVERY),
        Some(_) => SEEK_EVERY,
    };
    Some(SeekUp { at: now, position, wait })
}

/// The first topic whose end lies below the read position: `(topic, position, end)`.
fn regressed(
    names: &BTreeMap<String, TopicKind>,
    positions: &BTreeMap<TopicKind, i64>,
    ends: &BTreeMap<TopicKind, i64>,
) -> Option<(String, i64, i64)> {
    names.iter().find_map(|(name, kind)| {
        let position = positions.get(kind).copied().unwrap_or(0);
        let end = ends.get(kind).copied()?;
        // An end of 0 proves nothing: tansu 0.6.0 answers 0 whenever its topic's last record is
        // gone (its cleaner removed a tombstone at the tail). A recreated topic is caught once
        // its first record lands (its end is then above 0 and below the position).
        (end > 0 && end < position).then(|| (name.clone(), position, end))
    })
}

/// The current end (next offset) of every topic read, in one ListOffsets request.
fn topic_ends(
    consumer: &BaseConsumer<Context>,
    names: &BTreeMap<String, TopicKind>,
) -> Result<BTreeMap<TopicKind, i64>, String> {
    let mut query = TopicPartitionList::new();
    for name in names.keys() {
        // `End` is timestamp -1: the latest offset.
        query
            .add_partition_offset(name, 0, Offset::End)
            .map_err(|err| format!("cannot ask for the end of {name}: {err}"))?;
    }
    let ends = consumer
        .offsets_for_times(query, WATERMARK_TIMEOUT)
        .map_err(|err| format!("cannot read the ends of the topics: {err}"))?;
    let mut targets = BTreeMap::new();
    for element in ends.elements() {
        let name = element.topic();
        if let Some(err) = element.error().err() {
            return Err(format!("cannot read the end of {name}: {err}"));
        }
        match (names.get(name), element.offset()) {
            (Some(kind), Offset::Offset(end)) => {
                targets.insert(*kind, end);
            }
            (_, offset) => return Err(format!("cannot read the end of {name}: got {offset:?}")),
        }
    }
    if targets.len() != names.len() {
        return Err(format!("asked for the ends of {} topics, got {}", names.len(), targets.len()));
    }
    Ok(targets)
}

fn poll_loop(
    consumer: BaseConsumer<Context>,
    names: BTreeMap<String, TopicKind>,
    requests: std_mpsc::Receiver<Request>,
    events: mpsc::Sender<ReaderEvent>,
    stop: Arc<AtomicBool>,
) {
    let mut positions: BTreeMap<TopicKind, i64> = names.values().map(|kind| (*kind, 0)).collect();
    let mut pending: Vec<(u64, BTreeMap<TopicKind, i64>)> = Vec::new();
    let send = |event| events.blocking_send(event).is_ok();
    let mut checked = std::time::Instant::now();
    let mut seeks: BTreeMap<TopicKind, SeekUp> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        // Every read-to-end asked since the last turn shares one end query: one ListOffsets
        // request for all topics (per-topic watermark queries cost two requests each, and
        // the reader consumes nothing while it waits for them).
        let tokens: Vec<u64> = std::iter::from_fn(|| match requests.try_recv() {
            Ok(Request::Sync(token)) => Some(token),
            Err(_) => None,
        })
        .collect();
        let check = checked.elapsed() >= REGRESSION_CHECK_EVERY;
        if !tokens.is_empty() || check {
            let started = std::time::Instant::now();
            checked = started;
            match topic_ends(&consumer, &names) {
                Ok(targets) if let Some((topic, position, end)) = regressed(&names, &positions, &targets) => {
                    let _ = send(ReaderEvent::Regressed { topic, position, end });
                    return;
                }
                Ok(targets) if tokens.is_empty() => {
                    tracing::trace!(?targets, ?positions, "no topic went backwards")
                }
                Err(message) if tokens.is_empty() => {
                    tracing::debug!(%message, "cannot check the topics' ends")
                }
                Ok(targets) => {
                    tracing::debug!(?tokens, elapsed = ?started.elapsed(), ?targets, "topic ends read");
                    pending.extend(tokens.into_iter().map(|token| (token, targets.clone())));
                }
                Err(message) => {
                    for token in tokens {
                        if !send(ReaderEvent::SyncFailed(token, message.clone())) {
                            return;
                        }
                    }
                }
            }
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(message)) => {
                let Some(kind) = names.get(message.topic()).copied() else { continue };
                let position = positions.entry(kind).or_insert(0);
                if message.offset() < *position {
                    // Delivered already, in order: tansu 0.6.0 serves records again from a
                    // partition that compaction left gaps in (see `seek_up`). (A topic whose end
                    // fell below the position is caught by `regressed`.)
                    tracing::trace!(topic = %kind, offset = message.offset(), "record read again; dropped");
                    let now = std::time::Instant::now();
                    if let Some(seek) = seek_up(message.offset(), *position, seeks.get(&kind).copied(), now) {
                        seeks.insert(kind, seek);
                        // Asynchronous: the client drops what it had fetched of the topic and
                        // fetches again from the position. A position past the topic's end
                        // (recreated, or its tail lost) is for `regressed` to judge, as before:
                        // checked soon, below. With no wait, librdkafka reports no error.
                        match consumer.seek(message.topic(), 0, Offset::Offset(*position), Duration::ZERO) {
                            Ok(()) => tracing::debug!(
                                topic = %kind,
                                offset = message.offset(),
                                position = *position,
                                next_in = ?seek.wait,
                                "the client read below the position: asked it to seek up to it"
                            ),
                            Err(err) => {
                                tracing::debug!(topic = %kind, error = %err, "cannot seek up to the position")
                            }
                        }
                    }
                    // It may also be the first record of a topic recreated below the position:
                    // check the ends soon rather than at the next regular check.
                    if checked.elapsed() >= SOON {
                        checked =
                            std::time::Instant::now().checked_sub(REGRESSION_CHECK_EVERY).unwrap_or(checked);
                    }
                    continue;
                }
                *position = message.offset() + 1;
                let record = Record {
                    topic: kind,
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    timestamp_ms: message.timestamp().to_millis(),
                };
                if !send(ReaderEvent::Record(record)) {
                    return;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // Positions past compacted-away tails come from the consumer itself.
                if let Ok(list) = consumer.position() {
                    for element in list.elements() {
                        if let (Some(kind), Offset::Offset(next)) =
                            (names.get(element.topic()), element.offset())
                        {
                            let position = positions.entry(*kind).or_insert(0);
                            *position = (*position).max(next);
                        }
                    }
                }
            }
            Some(Err(err)) if !send(ReaderEvent::Error(err.to_string())) => return,
            Some(Err(_)) | None => {}
        }
        let mut index = 0;
        while index < pending.len() {
            let reached =
                pending[index].1.iter().all(|(kind, end)| positions.get(kind).copied().unwrap_or(0) >= *end);
            if reached {
                let (token, _) = pending.swap_remove(index);
                if !send(ReaderEvent::Synced(token)) {
                    return;
                }
            } else {
                index += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_below_the_position_sends_the_client_back_up_at_most_once_a_quarter_second() {
        let now = std::time::Instant::now();
        let first = seek_up(1353, 1361, None, now).expect("below the position, never sought");
        assert_eq!(first, SeekUp { at: now, position: 1361, wait: SEEK_EVERY });
        assert_eq!(seek_up(1361, 1361, None, now), None, "at the position: a new record");
        assert_eq!(seek_up(1400, 1361, None, now), None, "above the position");
        let soon = now + Duration::from_millis(100);
        assert_eq!(seek_up(1353, 1361, Some(first), soon), None, "sought just now");
        // New records came in since: a new position, the shortest wait again.
        let later = now + SEEK_EVERY;
        let moved = seek_up(1370, 1400, Some(first), later).expect("sought a while ago");
        assert_eq!(moved.wait, SEEK_EVERY);
    }

    #[test]
    fn seeking_again_to_the_same_position_waits_twice_as_long_each_time_up_to_eight_seconds() {
        let mut now = std::time::Instant::now();
        let mut last = seek_up(5, 100, None, now).unwrap();
        let mut waits = vec![last.wait];
        for _ in 0..8 {
            assert_eq!(seek_up(6, 100, Some(last), now + last.wait - Duration::from_millis(1)), None);
            now += last.wait;
            last = seek_up(6, 100, Some(last), now).expect("waited long enough");
            waits.push(last.wait);
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000, 8000]);
    }

    #[test]
    fn a_topic_regressed_when_its_end_is_above_zero_and_below_the_position() {
        let names: BTreeMap<String, TopicKind> =
            [("c".to_owned(), TopicKind::Commands), ("s".to_owned(), TopicKind::Status)].into();
        let positions: BTreeMap<TopicKind, i64> = [(TopicKind::Commands, 7), (TopicKind::Status, 3)].into();
        let ends = |commands, status| -> BTreeMap<TopicKind, i64> {
            [(TopicKind::Commands, commands), (TopicKind::Status, status)].into()
        };
        assert_eq!(regressed(&names, &positions, &ends(7, 3)), None);
        assert_eq!(regressed(&names, &positions, &ends(9, 3)), None, "grew");
        assert_eq!(regressed(&names, &positions, &ends(1, 3)), Some(("c".to_owned(), 7, 1)));
        assert_eq!(regressed(&names, &positions, &ends(0, 3)), None, "0 proves nothing on tansu");
    }
}
