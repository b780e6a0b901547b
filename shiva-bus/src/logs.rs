//! The `shiva.<cluster>.logs` topic: task output, one record per line.
//!
//! * key: the task id; value: consecutive whole lines of one stream, bytes exactly as the task
//!   wrote them, newlines included (the last line of a run's output may lack its newline), at most
//!   about 64 KiB: batching lines keeps the record count (and the broker's work) low;
//! * headers: `run` (run id), `stream` (`stdout` or `stderr`), `node`;
//! * one partition, `cleanup.policy=delete`, time retention (`--log-retention` of the node that
//!   creates it).
//!
//! [`LogSink`] is the node's producer for it: a client of its own (its own connection and
//! queue), batching, so a flood of output never queues in front of a heartbeat. A sender learns
//! through [`Acks`] which of its records are done (acknowledged by the broker, or failed for
//! good), so it notes how far it shipped only once that is true. [`LogReader`] reads it back for
//! `shiva-ctl logs`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::filebus::{self, FileLogReader, FileLogSink};
use crate::publisher::spawn_poller;
use crate::{BusConfig, BusError, BusKind, Context};

/// Creates the logs topic when missing (one partition, delete policy, `retention`).
pub async fn ensure_logs_topic(
    config: &BusConfig,
    retention: Duration,
    timeout: Duration,
) -> Result<(), BusError> {
    if let BusKind::File(dir) = &config.kind {
        return filebus::ensure_logs_topic(config, dir);
    }
    let admin: AdminClient<Context> = config
        .client_config(&[])
        .create_with_context(Context::default())
        .map_err(|err| BusError::Kafka(format!("failed to create an admin client: {err}")))?;
    let name = config.topics.logs();
    let retention_ms = retention.as_millis().to_string();
    let topic = NewTopic::new(&name, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", &retention_ms);
    let options = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|err| BusError::Kafka(format!("failed to create topic {name}: {err}")))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created the logs topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(BusError::Kafka(format!("failed to create topic {name}: {code}")));
            }
        }
    }
    Ok(())
}

/// Lines to ship: whole lines of one stream of one run.
#[derive(Debug, Clone, Copy)]
pub struct LogChunk<'a> {
    /// Task id (the key).
    pub task: &'a str,
    /// Run id.
    pub run: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// The bytes, newlines included.
    pub bytes: &'a [u8],
}

/// Which of one sender's records are done: delivered (acknowledged by the broker, or appended
/// to the file bus's topic), or failed for good (logged where it failed). The sender numbers its
/// records 0, 1, 2… in the order it queues them; deliveries may come in any order.
#[derive(Debug, Default)]
pub struct Acks(Mutex<AckState>);

#[derive(Debug, Default)]
struct AckState {
    /// Every record numbered below is done.
    below: u64,
    /// Records done above `below`.
    above: BTreeSet<u64>,
}

impl Acks {
    /// Record `seq` is done.
    pub fn done(&self, seq: u64) {
        let mut state = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seq == state.below {
            state.below += 1;
            loop {
                let next = state.below;
                if !state.above.remove(&next) {
                    break;
                }
                state.below += 1;
            }
        } else if seq > state.below {
            state.above.insert(seq);
        }
    }

    /// Every record numbered below this is done.
    pub fn done_below(&self) -> u64 {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).below
    }
}

/// Record `seq` of the sender that owns `acks`.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The sender's acknowledgements.
    pub acks: Arc<Acks>,
    /// The record's number.
    pub seq: u64,
}

impl Ack {
    /// Tells its sender the record is done.
    pub fn done(self) {
        self.acks.done(self.seq);
    }
}

/// The logs producer's context: [`Context`]'s logging, and each record's [`Ack`].
#[derive(Clone, Default)]
struct LogContext(Context);

impl ClientContext for LogContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.0.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl ProducerContext for LogContext {
    type DeliveryOpaque = Box<Option<Ack>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Option<Ack>>) {
        if let Err((error, message)) = result {
            tracing::warn!(%error, topic = message.topic(), "task output not delivered");
        }
        if let Some(ack) = *ack {
            ack.done();
        }
    }
}

/// The node's producer for task output.
pub struct LogSink {
    inner: SinkInner,
    topic: String,
    node: String,
}

enum SinkInner {
    Kafka { producer: Arc<BaseProducer<LogContext>>, stop: Arc<AtomicBool> },
    File(FileLogSink),
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink").field("topic", &self.topic).finish()
    }
}

impl LogSink {
    /// A producer of its own for `node`'s task output.
    pub fn new(config: &BusConfig, node: &str) -> Result<LogSink, BusError> {
        if let BusKind::File(dir) = &config.kind {
            let inner = SinkInner::File(FileLogSink::new(config, dir)?);
            return Ok(LogSink { inner, topic: config.topics.logs(), node: node.to_owned() });
        }
        let producer: BaseProducer<LogContext> = config
            .client_config(&[
                ("client.id", "shiva-logs".into()),
                ("enable.idempotence", "false".into()),
                ("acks", "1".into()),
                ("linger.ms", "25".into()),
                ("batch.num.messages", "2000".into()),
                ("queue.buffering.max.messages", "20000".into()),
                ("queue.buffering.max.kbytes", "32768".into()),
                ("message.timeout.ms", "60000".into()),
                ("message.max.bytes", "2000000".into()),
            ])
            .create_with_context(LogContext::default())
            .map_err(|err| BusError::Kafka(format!("failed to create the logs producer: {err}")))?;
        let producer = Arc::new(producer);
        let stop = spawn_poller("shiva-logs", producer.clone())?;
        Ok(LogSink {
            inner: SinkInner::Kafka { producer, stop },
            topic: config.topics.logs(),
            node: node.to_owned(),
        })
    }

    /// Queues one chunk; `ack` is told once it is done (delivered, or failed for good).
    /// `Err(true)`: the local queue is full, try again shortly (`ack` is not told); `Err(false)`:
    /// the chunk cannot be sent (too large…): the caller counts it done.
    pub fn send(&self, line: LogChunk<'_>, ack: Option<Ack>) -> Result<(), bool> {
        let producer = match &self.inner {
            SinkInner::Kafka { producer, .. } => producer,
            SinkInner::File(sink) => {
                let value = filebus::encode_log_value(line.run, line.stream, &self.node, line.bytes);
                return sink.send(line.task, value, ack);
            }
        };
        let headers = OwnedHeaders::new()
            .insert(Header { key: "run", value: Some(line.run) })
            .insert(Header { key: "stream", value: Some(line.stream) })
            .insert(Header { key: "node", value: Some(self.node.as_str()) });
        let record = BaseRecord::<str, [u8], Box<Option<Ack>>>::with_opaque_to(&self.topic, Box::new(ack))
            .key(line.task)
            .payload(line.bytes)
            .headers(headers)
            .partition(0);
        match producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(true),
            Err((err, _)) => {
                tracing::warn!(task = line.task, run = line.run, error = %err, "task output not shipped");
                Err(false)
            }
        }
    }

    /// Waits up to `timeout` for queued lines to be delivered.
    pub fn flush(&self, timeout: Duration) {
        match &self.inner {
            SinkInner::Kafka { producer, .. } => {
                let _ = producer.flush(timeout);
            }
            SinkInner::File(sink) => sink.flush(timeout),
        }
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        if let SinkInner::Kafka { stop, .. } = &self.inner {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// A chunk read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChunk {
    /// Offset in the logs topic.
    pub offset: i64,
    /// Broker timestamp (ms since the Unix epoch), when known.
    pub timestamp_ms: Option<i64>,
    /// Task id.
    pub task: String,
    /// Run id.
    pub run: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Node that ran it.
    pub node: String,
    /// The bytes, newlines included.
    pub bytes: Vec<u8>,
}

/// Reads the logs topic from its beginning.
pub struct LogReader(ReaderInner);

enum ReaderInner {
    Kafka(KafkaLogReader),
    File(FileLogReader),
}

impl LogReader {
    /// A reader of `config`'s cluster's logs topic, from offset 0.
    pub fn new(config: &BusConfig) -> Result<LogReader, BusError> {
        Ok(LogReader(match &config.kind {
            BusKind::Kafka => ReaderInner::Kafka(KafkaLogReader::new(config)?),
            BusKind::File(dir) => ReaderInner::File(FileLogReader::new(config, dir)?),
        }))
    }

    /// The topic's current end (next offset).
    pub fn end(&self, timeout: Duration) -> Result<i64, BusError> {
        match &self.0 {
            ReaderInner::Kafka(reader) => reader.end(timeout),
            ReaderInner::File(reader) => reader.end(),
        }
    }

    /// Where the next record will come from.
    pub fn position(&self) -> i64 {
        match &self.0 {
            ReaderInner::Kafka(reader) => reader.position,
            ReaderInner::File(reader) => reader.position(),
        }
    }

    /// The topic's first offset still held (retention moves it).
    pub fn start(&self, timeout: Duration) -> Result<i64, BusError> {
        match &self.0 {
            ReaderInner::Kafka(reader) => reader.start(timeout),
            // The file bus keeps task output from offset 0 (its segments are never trimmed).
            ReaderInner::File(_) => Ok(0),
        }
    }

    /// Reads from `offset` on (the topic's first record if that is gone).
    pub fn seek(&mut self, offset: i64) -> Result<(), BusError> {
        match &mut self.0 {
            ReaderInner::Kafka(reader) => reader.seek(offset),
            ReaderInner::File(reader) => reader.seek(offset),
        }
    }

    /// The next chunk, waiting at most `timeout` (`Ok(None)`: none yet).
    pub fn next(&mut self, timeout: Duration) -> Result<Option<LoggedChunk>, BusError> {
        match &mut self.0 {
            ReaderInner::Kafka(reader) => reader.next(timeout),
            ReaderInner::File(reader) => reader.next(timeout),
        }
    }
}

/// [`LogReader`] on Kafka.
struct KafkaLogReader {
    consumer: BaseConsumer<Context>,
    topic: String,
    position: i64,
}

impl KafkaLogReader {
    fn new(config: &BusConfig) -> Result<KafkaLogReader, BusError> {
        let consumer: BaseConsumer<Context> = config
            .client_config(&[
                ("enable.auto.commit", "false".into()),
                ("enable.partition.eof", "false".into()),
                ("auto.offset.reset", "earliest".into()),
                ("fetch.wait.max.ms", "100".into()),
                ("group.id", "shiva-logs-unused".into()),
                // A reader per `logs` command or API request: its prefetch stays small (the
                // default is 64 MiB per consumer).
                ("queued.max.messages.kbytes", "4096".into()),
            ])
            .create_with_context(Context::default())
            .map_err(|err| BusError::Kafka(format!("failed to create a consumer: {err}")))?;
        let topic = config.topics.logs();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|err| BusError::Kafka(err.to_string()))?;
        consumer
            .assign(&assignment)
            .map_err(|err| BusError::Kafka(format!("failed to assign {topic}: {err}")))?;
        Ok(KafkaLogReader { consumer, topic, position: 0 })
    }

    fn seek(&mut self, offset: i64) -> Result<(), BusError> {
        let offset = offset.max(0);
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, 0, Offset::Offset(offset))
            .map_err(|err| BusError::Kafka(err.to_string()))?;
        self.consumer
            .assign(&assignment)
            .map_err(|err| BusError::Kafka(format!("failed to assign {}: {err}", self.topic)))?;
        self.position = offset;
        Ok(())
    }

    fn start(&self, timeout: Duration) -> Result<i64, BusError> {
        let (low, _) = self
            .consumer
            .fetch_watermarks(&self.topic, 0, timeout)
            .map_err(|err| BusError::Kafka(format!("cannot read the start of {}: {err}", self.topic)))?;
        Ok(low)
    }

    fn end(&self, timeout: Duration) -> Result<i64, BusError> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(&self.topic, 0, timeout)
            .map_err(|err| BusError::Kafka(format!("cannot read the end of {}: {err}", self.topic)))?;
        Ok(high)
    }

    fn next(&mut self, timeout: Duration) -> Result<Option<LoggedChunk>, BusError> {
        let message = match self.consumer.poll(timeout) {
            None => return Ok(None),
            Some(Err(err)) => return Err(BusError::Kafka(format!("failed to read {}: {err}", self.topic))),
            Some(Ok(message)) => message,
        };
        if message.offset() < self.position {
            // Served again (see the control reader): already delivered.
            return Ok(None);
        }
        self.position = message.offset() + 1;
        let mut line = LoggedChunk {
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            task: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            run: String::new(),
            stream: String::new(),
            node: String::new(),
            bytes: message.payload().unwrap_or_default().to_vec(),
        };
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
                match header.key {
                    "run" => line.run = value,
                    "stream" => line.stream = value,
                    "node" => line.node = value,
                    _ => {}
                }
            }
        }
        Ok(Some(line))
    }
}

/// A read of the logs topic that got nothing for a whole timeout before `end`.
fn stopped_answering(config: &BusConfig, reader: &LogReader, end: i64) -> BusError {
    BusError::Unreachable {
        brokers: config.brokers.clone(),
        message: format!("the logs topic stopped answering at offset {} of {end}", reader.position()),
    }
}

/// The last `lines` lines of the chunks `filter` wants, read backwards from the topic's end in
/// growing windows (4,096 records, then twice as many each time), so that a task that wrote
/// recently costs a read of the topic's end, not of all of it. Returns the chunks (the first
/// one cut to the lines asked for), the offset a follower goes on from and how many records it
/// read.
pub fn tail(
    config: &BusConfig,
    timeout: Duration,
    filter: &LogFilter,
    lines: usize,
) -> Result<Tail, BusError> {
    const POLL: Duration = Duration::from_millis(200);
    let mut reader = LogReader::new(config)?;
    let end = reader.end(timeout)?;
    let mut found: Vec<LoggedChunk> = Vec::new();
    let mut counted = 0usize;
    let start = reader.start(timeout)?;
    let (mut to, mut window, mut records_read) = (end, 4096i64, 0u64);
    while counted < lines && to > start {
        let from = to.saturating_sub(window).max(start);
        reader.seek(from)?;
        let mut batch = Vec::new();
        let mut idle_since = std::time::Instant::now();
        while reader.position() < to {
            let Some(chunk) = reader.next(POLL)? else {
                if idle_since.elapsed() > timeout {
                    return Err(stopped_answering(config, &reader, end));
                }
                continue;
            };
            idle_since = std::time::Instant::now();
            if chunk.offset >= to {
                break;
            }
            records_read += 1;
            if filter.wants(&chunk) {
                batch.push(chunk);
            }
        }
        counted += batch.iter().map(|chunk| line_count(&chunk.bytes)).sum::<usize>();
        batch.append(&mut found);
        found = batch;
        to = from;
        window = window.saturating_mul(2);
    }
    // Keep the last `lines` lines: drop whole chunks (in one go), then the first one's extra lines.
    let mut extra = counted.saturating_sub(lines);
    let mut whole = 0;
    while whole < found.len() && line_count(&found[whole].bytes) <= extra {
        extra -= line_count(&found[whole].bytes);
        whole += 1;
    }
    found.drain(..whole);
    if extra > 0
        && let Some(first) = found.first_mut()
        && let Some((at, _)) =
            first.bytes.iter().enumerate().filter(|(_, byte)| **byte == b'\n').nth(extra - 1)
    {
        first.bytes.drain(..=at);
    }
    Ok(Tail { chunks: found, end, records_read })
}

/// What [`tail`] found.
#[derive(Debug)]
pub struct Tail {
    /// The chunks of the last lines, oldest first.
    pub chunks: Vec<LoggedChunk>,
    /// The topic's end when the tail began: a follower reads on from there.
    pub end: i64,
    /// Records read to find them.
    pub records_read: u64,
}

/// Lines in `bytes`: newlines, plus a last line without one.
fn line_count(bytes: &[u8]) -> usize {
    let newlines = bytes.iter().filter(|byte| **byte == b'\n').count();
    newlines + usize::from(!bytes.is_empty() && !bytes.ends_with(b"\n"))
}

/// Which chunks [`scan`] passes on: one task's, of runs whose id starts with `run`, written
/// since `from_ms`.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// The task id.
    pub task: String,
    /// A run id or its start.
    pub run: Option<String>,
    /// Only chunks the broker timestamped at or after this (ms since the Unix epoch).
    pub from_ms: Option<i64>,
    /// Start reading at this offset (a follower after [`tail`]), not at the topic's start.
    pub from_offset: Option<i64>,
}

impl LogFilter {
    /// Whether `chunk` passes.
    pub fn wants(&self, chunk: &LoggedChunk) -> bool {
        chunk.task == self.task
            && self.run.as_deref().is_none_or(|run| chunk.run.starts_with(run))
            && self.from_ms.is_none_or(|from| chunk.timestamp_ms.is_none_or(|at| at >= from))
    }
}

/// What [`scan`] hands its caller.
#[derive(Debug)]
pub enum Scanned<'a> {
    /// A chunk that passed the filter.
    Chunk(&'a LoggedChunk),
    /// A poll found nothing new (a moment to flush, or to notice the reader went away).
    Idle,
    /// A chunk that did not pass the filter (a moment to notice the reader went away).
    Passed,
}

/// Reads the logs topic from its beginning, handing `on` the chunks `filter` passes, up to the
/// end the topic had when called, or for ever when `follow` (until `on` breaks). Blocking.
/// Returns how many chunks were handed on. A topic silent for `timeout` before its end is an
/// error.
pub fn scan(
    config: &BusConfig,
    timeout: Duration,
    filter: &LogFilter,
    follow: bool,
    mut on: impl FnMut(Scanned<'_>) -> std::ops::ControlFlow<()>,
) -> Result<u64, BusError> {
    const POLL: Duration = Duration::from_millis(200);
    let mut reader = LogReader::new(config)?;
    if let Some(offset) = filter.from_offset {
        reader.seek(offset)?;
    }
    let end = reader.end(timeout)?;
    let mut handed = 0u64;
    let mut idle_since = std::time::Instant::now();
    loop {
        if !follow && reader.position() >= end {
            return Ok(handed);
        }
        let Some(chunk) = reader.next(POLL)? else {
            if on(Scanned::Idle).is_break() {
                return Ok(handed);
            }
            if !follow && idle_since.elapsed() > timeout {
                return Err(stopped_answering(config, &reader, end));
            }
            continue;
        };
        idle_since = std::time::Instant::now();
        let seen = if filter.wants(&chunk) {
            handed += 1;
            Scanned::Chunk(&chunk)
        } else {
            Scanned::Passed
        };
        if on(seen).is_break() {
            return Ok(handed);
        }
    }
}

#[cfg(test)]
mod ack_tests {
    use super::*;

    #[test]
    fn done_below_moves_only_over_an_unbroken_run_of_done_records() {
        let acks = Acks::default();
        assert_eq!(acks.done_below(), 0);
        acks.done(1);
        acks.done(2);
        assert_eq!(acks.done_below(), 0, "record 0 is still in flight");
        acks.done(0);
        assert_eq!(acks.done_below(), 3);
        acks.done(0);
        acks.done(4);
        assert_eq!(acks.done_below(), 3);
        acks.done(3);
        assert_eq!(acks.done_below(), 5);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file bus with 20,000 chunks of another task after ten of ours, and a last line of ours
    /// without a newline: `tail` finds our last lines reading a fraction of the topic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tail_reads_backwards_from_the_end_and_cuts_to_the_lines_asked_for() {
        let dir = std::env::temp_dir().join(format!("shiva-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = BusConfig::new(&format!("file://{}", dir.display()), "t", &[]).unwrap();
        crate::admin::ensure_topics(&config, Duration::from_secs(5)).await.unwrap();
        let sink = LogSink::new(&config, "n1").unwrap();
        // Every record is numbered for `acks`: each is told once written.
        let acks = Arc::new(Acks::default());
        let queued = std::cell::Cell::new(0u64);
        let send = |task: &str, bytes: &[u8]| {
            let ack = || Some(Ack { acks: acks.clone(), seq: queued.get() });
            while let Err(true) = sink.send(LogChunk { task, run: "r1", stream: "stdout", bytes }, ack()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            queued.set(queued.get() + 1);
        };
        send("mine", b"early\n");
        for i in 0..20_000 {
            send("other", format!("noise {i}\n").as_bytes());
        }
        for i in 0..9 {
            send("mine", format!("line {i}a\nline {i}b\n").as_bytes());
        }
        send("mine", b"last");
        sink.flush(Duration::from_secs(10));
        assert_eq!(acks.done_below(), 20_011, "every record written is done");
        let filter = LogFilter { task: "mine".into(), ..LogFilter::default() };
        let found = tail(&config, Duration::from_secs(5), &filter, 3).unwrap();
        let text: Vec<u8> = found.chunks.iter().flat_map(|chunk| chunk.bytes.clone()).collect();
        assert_eq!(String::from_utf8(text).unwrap(), "line 8a\nline 8b\nlast");
        assert!(found.records_read <= 4096, "read {} records of 20,011", found.records_read);
        assert_eq!(found.end, 20_011);
        // More lines than the end holds: the walk goes back to the start and finds them all.
        let all = tail(&config, Duration::from_secs(5), &filter, 1000).unwrap();
        let lines: usize = all.chunks.iter().map(|chunk| line_count(&chunk.bytes)).sum();
        assert_eq!(lines, 1 + 18 + 1);
        assert_eq!(all.chunks[0].bytes, b"early\n");
        // A follower from `end` sees only what comes next.
        send("mine", b"\nafter\n");
        sink.flush(Duration::from_secs(10));
        let mut seen = Vec::new();
        let follow = LogFilter { from_offset: Some(found.end), ..filter };
        scan(&config, Duration::from_secs(5), &follow, false, |scanned| {
            if let Scanned::Chunk(chunk) = scanned {
                seen.extend_from_slice(&chunk.bytes);
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, b"\nafter\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
