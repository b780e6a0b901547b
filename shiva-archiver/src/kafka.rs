//! The archiver's Kafka side (the only module that talks to Kafka).
//!
//! * [`Source`] (`run`): one consumer, assigned to the partitions it archives at the positions
//!   the archive says, no consumer-group membership. Offsets are committed to the group `--group`
//!   after each publish, as a hint for tools only: resuming reads the archive.
//! * [`Sink`] (`extract --to-topic`): one producer writing records back, at least once (acks from
//!   all replicas, retries; the test broker has no transactions, so a crash may write some twice).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use std::sync::Mutex;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Message, Offset, TopicPartitionList};

use shiva_bus::{Context as Logging, MISSING, permanent};

use crate::format::Record;

/// The bus refuses the archiver in a way no retry can cure (a codec it cannot read, a failed
/// TLS handshake or authentication, an ACL, a missing topic): `run` stops with exit 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A consumer of one topic.
pub struct Source {
    consumer: BaseConsumer<Logging>,
    topic: String,
}

/// What a poll brought.
pub enum Polled {
    /// A record of a partition.
    Record(i32, Record),
    /// Nothing within the timeout.
    Nothing,
    /// The position of a partition is below what the broker still holds.
    OutOfRange(i32),
}

impl Source {
    /// Connects to `bootstrap` for `topic`; `settings` are extra librdkafka settings (`-X`).
    pub fn new(
        bootstrap: &str,
        topic: &str,
        group: &str,
        settings: &[(String, String)],
    ) -> anyhow::Result<Source> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A position the broker no longer holds is an error, never a silent jump.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            // The test broker's fetch costs a scan of the partition's remaining records whatever
            // its size: fewer, larger fetches read a backlog faster (2 MiB per partition measured
            // 3 % faster than 512 KiB on 1 M records) while bounding what a killed archiver
            // leaves the broker serving.
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", "2097152")
            .set("queued.max.messages.kbytes", "65536")
            .set("log_level", "4");
        for (key, value) in settings {
            config.set(key, value);
        }
        let consumer: BaseConsumer<Logging> = config
            .create_with_context(Logging::default())
            .with_context(|| format!("cannot create a Kafka consumer for {bootstrap}"))?;
        Ok(Source { consumer, topic: topic.to_owned() })
    }

    /// The topic's partitions.
    pub fn partitions(&self, timeout: Duration) -> anyhow::Result<Vec<i32>> {
        // In attempts of 2 s, so that a refusal (TLS, a login) ends it at once.
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let attempt =
                deadline.saturating_duration_since(std::time::Instant::now()).min(Duration::from_secs(2));
            match partitions(self.consumer.client(), &self.topic, attempt).map_err(|err| self.refused_or(err))
            {
                Err(err)
                    if err.downcast_ref::<Refused>().is_none() && std::time::Instant::now() < deadline =>
                {
                    tracing::debug!(error = format!("{err:#}"), "reading the topic's partitions; retrying");
                }
                result => return result,
            }
        }
    }

    /// `err`, or [`Refused`] when the client's newest error is one no retry can cure (a failed
    /// TLS handshake shows as a timeout of whatever request waited for it).
    fn refused_or(&self, err: anyhow::Error) -> anyhow::Error {
        // Client errors arrive through the consumer's queue: serve it, while no partition is
        // assigned (a poll then can only bring errors and logs, never a record).
        if self.consumer.assignment().is_ok_and(|assigned| assigned.count() == 0) {
            let deadline = std::time::Instant::now() + Duration::from_millis(100);
            while std::time::Instant::now() < deadline {
                let _ = self.consumer.poll(Duration::from_millis(10));
            }
        }
        match self.consumer.context().permanent_error() {
            Some((why, message)) => Refused(format!("{err:#}: {why}: {message}")).into(),
            None => err,
        }
    }

    /// The earliest offset still held and the end of a partition.
    pub fn watermarks(&self, partition: i32, timeout: Duration) -> anyhow::Result<(i64, i64)> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, timeout)
            .with_context(|| format!("cannot read the offsets of {}/{partition}", self.topic))
            .map_err(|err| self.refused_or(err))
    }

    /// Reads each partition from its position.
    pub fn assign(&self, positions: &BTreeMap<i32, i64>) -> anyhow::Result<()> {
        let mut list = TopicPartitionList::new();
        for (partition, offset) in positions {
            list.add_partition_offset(&self.topic, *partition, Offset::Offset(*offset))?;
        }
        self.consumer.assign(&list).context("cannot assign the partitions")?;
        Ok(())
    }

    /// Moves a partition's position.
    pub fn seek(&self, partition: i32, offset: i64) -> anyhow::Result<()> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))?;
        self.consumer.seek_partitions(list, Duration::from_secs(10)).context("cannot seek")?;
        Ok(())
    }

    /// The next record, waiting at most `timeout`.
    pub fn poll(&self, timeout: Duration) -> anyhow::Result<Polled> {
        match self.consumer.poll(timeout) {
            // A missing topic, seen while running, may be a broker restarting: waited out.
            None => match self.consumer.context().permanent_error().filter(|(why, _)| *why != MISSING) {
                Some((why, message)) => {
                    Err(Refused(format!("reading '{}': {why}: {message}", self.topic)).into())
                }
                None => Ok(Polled::Nothing),
            },
            Some(Ok(message)) => {
                // Progress: an error met before was not permanent after all.
                self.consumer.context().forget_permanent();
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers.iter().map(|h| (h.key.to_owned(), h.value.map(|v| v.to_vec()))).collect()
                    })
                    .unwrap_or_default();
                let record = Record {
                    offset: message.offset(),
                    timestamp: message.timestamp().to_millis(),
                    key: message.key().map(|k| k.to_vec()),
                    headers,
                    value: message.payload().map(|v| v.to_vec()),
                };
                Ok(Polled::Record(message.partition(), record))
            }
            // With `auto.offset.reset=error`, librdkafka reports a position out of range as
            // `AutoOffsetReset` (and stops fetching the partition), not as the broker's code.
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
            ))) => {
                // librdkafka does not say which partition; the caller checks them all.
                Ok(Polled::OutOfRange(-1))
            }
            Some(Err(err)) => {
                if let Some(why) = permanent(&err).filter(|why| *why != MISSING) {
                    return Err(Refused(format!("reading '{}': {why}: {err}", self.topic)).into());
                }
                tracing::warn!(error = %err, "Kafka error while reading; retrying");
                Ok(Polled::Nothing)
            }
        }
    }

    /// Commits `offset` of `partition` to the group (a hint).
    pub fn commit(&self, partition: i32, offset: i64) {
        let mut list = TopicPartitionList::new();
        if list.add_partition_offset(&self.topic, partition, Offset::Offset(offset)).is_ok()
            && let Err(err) = self.consumer.commit(&list, CommitMode::Async)
        {
            tracing::debug!(error = %err, partition, offset, "offset commit (a hint) failed");
        }
    }
}

/// The partitions of `topic`, sorted; an error when it does not exist.
fn partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read the metadata of topic '{topic}'"))?;
    let found = metadata.topics().first().context("no metadata for the topic")?;
    if let Some(err) = found.error() {
        let code = RDKafkaErrorCode::from(err);
        if let Some(why) = permanent(&KafkaError::MetadataFetch(code)) {
            return Err(Refused(format!("topic '{topic}': {why} ({code:?})")).into());
        }
        bail!("topic '{topic}': {code:?}");
    }
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort();
    if partitions.is_empty() {
        return Err(Refused(format!("topic '{topic}' does not exist or has no partitions")).into());
    }
    Ok(partitions)
}

/// Headers `extract --to-topic` adds to every record: where it was archived from.
pub const ORIGIN_HEADERS: [&str; 3] = ["shiva.topic", "shiva.partition", "shiva.offset"];

/// A producer writing archived records to a topic, each to the partition it came from.
pub struct Sink {
    producer: BaseProducer<Deliveries>,
    topic: String,
    partitions: i32,
}

/// Counts records the broker did not take (and keeps the first error).
#[derive(Default)]
struct Deliveries {
    failed: Mutex<(u64, Option<String>)>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((err, _)) = result {
            let mut failed = self.failed.lock().expect("delivery counter");
            failed.0 += 1;
            failed.1.get_or_insert_with(|| err.to_string());
        }
    }
}

impl Sink {
    /// Connects to `bootstrap` for `topic`, which must exist.
    pub fn new(bootstrap: &str, topic: &str, settings: &[(String, String)]) -> anyhow::Result<Sink> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("linger.ms", "20")
            .set("message.timeout.ms", "120000")
            .set("log_level", "4");
        for (key, value) in settings {
            config.set(key, value);
        }
        let producer: BaseProducer<Deliveries> = config
            .create_with_context(Deliveries::default())
            .with_context(|| format!("cannot create a Kafka producer for {bootstrap}"))?;
        let partitions = partitions(producer.client(), topic, Duration::from_secs(30))
            .with_context(|| format!("--to-topic '{topic}' (create it first)"))?
            .len() as i32;
        Ok(Sink { producer, topic: topic.to_owned(), partitions })
    }

    /// The partitions of the target topic.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Sends one record to `partition`, with its origin in headers.
    pub fn send(&self, origin: &str, partition: i32, record: &Record) -> anyhow::Result<()> {
        let (partition_text, offset_text) = (partition.to_string(), record.offset.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 3);
        for (key, value) in &record.headers {
            headers = headers.insert(Header { key, value: value.as_deref() });
        }
        for (key, value) in ORIGIN_HEADERS.iter().zip([origin, &partition_text, &offset_text]) {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        let mut message: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.topic).partition(partition).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            message = message.payload(value.as_slice());
        }
        if let Some(timestamp) = record.timestamp {
            message = message.timestamp(timestamp);
        }
        loop {
            match self.producer.send(message) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    message = back;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((err, _)) => return Err(err).context(format!("cannot produce to '{}'", self.topic)),
            }
        }
        self.producer.poll(Duration::ZERO);
        Ok(())
    }

    /// Waits until every record sent is acknowledged; fails if any was refused.
    pub fn finish(&self) -> anyhow::Result<()> {
        self.producer.flush(Duration::from_secs(120)).context("records still unsent after 120 s")?;
        let failed = self.producer.context().failed.lock().expect("delivery counter");
        if failed.0 > 0 {
            bail!(
                "{} record(s) were not written to '{}': {}",
                failed.0,
                self.topic,
                failed.1.as_deref().unwrap_or("unknown error")
            );
        }
        Ok(())
    }
}
