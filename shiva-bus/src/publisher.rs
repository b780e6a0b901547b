//! Writing records: an ordered producer (`acks=all`, one request in flight) with a bounded
//! delivery timeout.
//!
//! Not idempotent, on purpose. Every Shiva record is keyed state, so a record written twice by
//! a retry is harmless; what matters is order per key, which one request in flight keeps
//! (records queued meanwhile go out together in the next request). An idempotent producer
//! bumps its producer epoch after a timed-out request (KIP-360), which tansu 0.6.0 does not
//! implement: its storage task panics on the next produce and the broker is lost. Under load
//! (100 runs a second) that happened within a minute. Without idempotence the broker also
//! skips three SQL statements per produce.
//!
//! Built on librdkafka's base producer, polled by a thread of our own with a 10 s deadline:
//! rdkafka's poll loops until its deadline and spins through the last sub-millisecond of each
//! call (the remaining time truncates to a 0 ms wait), so `FutureProducer`'s 100 ms polls cost
//! ~1 % of a core per idle producer, and even 1 s polls cost ~0.1 %.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use shiva_proto::TopicKind;
use tokio::sync::oneshot;
use tracing::warn;

use crate::filebus::FilePublisher;
use crate::{BusConfig, BusError, BusKind, Context};

type Outcome = Result<i64, KafkaError>;

/// Whether `err` refuses a record for its size (no retry can help).
fn too_large(err: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{MessageBatchTooLarge, MessageSizeTooLarge};
    matches!(err.rdkafka_error_code(), Some(MessageSizeTooLarge | MessageBatchTooLarge))
}

/// Logs like [`Context`]; completes each record's oneshot with its offset or error.
#[derive(Default)]
struct Delivery(Context);

impl ClientContext for Delivery {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.0.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = Box<oneshot::Sender<Outcome>>;

    fn delivery(&self, result: &DeliveryResult<'_>, reply: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(message) => Ok(message.offset()),
            Err((err, _)) => Err(err.clone()),
        };
        let _ = reply.send(outcome);
    }
}

/// A producer and the thread that polls it (it stops when the client is replaced or dropped).
struct Client {
    producer: Arc<BaseProducer<Delivery>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Writes records in the order they are queued and reports each one's offset once the bus
/// acknowledged it: on Kafka, [`KafkaPublisher`]; on the file bus, once it is synced to disk.
#[derive(Debug)]
pub struct Publisher(Inner);

#[derive(Debug)]
enum Inner {
    Kafka(Arc<KafkaPublisher>),
    File(FilePublisher, shiva_proto::Topics),
}

/// What an acknowledgement promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The record survives the loss of any process and a power cut: on Kafka, `acks=all`; on
    /// the file bus, written and `fdatasync`ed.
    Synced,
    /// On the file bus, written but not synced: it survives the loss of any process, not a
    /// power cut or a kernel crash (which stop every process of the host too). For records
    /// whose loss in a power cut harms nothing, such as heartbeats. On Kafka, as `Synced`.
    Written,
}

impl Publisher {
    /// Creates a publisher named `name` (for logs), [`Durability::Synced`].
    pub fn new(config: &BusConfig, name: &'static str) -> Result<Arc<Publisher>, BusError> {
        Publisher::with_durability(config, name, Durability::Synced)
    }

    /// Creates a publisher named `name` whose acknowledgements promise `durability`.
    pub fn with_durability(
        config: &BusConfig,
        name: &'static str,
        durability: Durability,
    ) -> Result<Arc<Publisher>, BusError> {
        let inner = match &config.kind {
            BusKind::Kafka => Inner::Kafka(KafkaPublisher::new(config, name)?),
            BusKind::File(dir) => Inner::File(
                FilePublisher::new(config, dir, name, durability == Durability::Synced)?,
                config.topics.clone(),
            ),
        };
        Ok(Arc::new(Publisher(inner)))
    }

    /// Writes `value` (or a tombstone) under `key`; returns the record's offset.
    pub async fn send(&self, topic: TopicKind, key: &str, value: Option<&[u8]>) -> Result<i64, BusError> {
        self.enqueue(topic, key, value).await
    }

    /// Queues the record now (records queued in call order are written in that order) and
    /// returns a future resolving to its offset once the bus acknowledged it.
    pub fn enqueue(
        &self,
        topic: TopicKind,
        key: &str,
        value: Option<&[u8]>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<i64, BusError>> + Send + 'static>> {
        match &self.0 {
            Inner::Kafka(publisher) => Box::pin(publisher.enqueue(topic, key, value)),
            Inner::File(publisher, topics) => {
                let answer = publisher.enqueue(topics.name(topic), key, value);
                let key = key.to_owned();
                Box::pin(async move {
                    answer.await.unwrap_or_else(|_| {
                        Err(BusError::File(format!("failed to write '{key}': the writer thread is gone")))
                    })
                })
            }
        }
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) {
        match &self.0 {
            Inner::Kafka(publisher) => publisher.flush(timeout),
            Inner::File(publisher, _) => publisher.flush(timeout),
        }
    }
}

/// An ordered producer (`acks=all`) that reports each record's offset. After a failed
/// delivery it replaces its client (see `replace_after_failure`), so a node never ends up with
/// a dead producer.
pub struct KafkaPublisher {
    config: BusConfig,
    name: &'static str,
    client: RwLock<Arc<Client>>,
    replaced_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher").field("name", &self.name).finish()
    }
}

impl KafkaPublisher {
    /// Creates a producer named `name` (for logs).
    pub fn new(config: &BusConfig, name: &'static str) -> Result<Arc<KafkaPublisher>, BusError> {
        let client = create(config, name)?;
        Ok(Arc::new(KafkaPublisher {
            config: config.clone(),
            name,
            client: RwLock::new(client),
            replaced_at: Mutex::new(None),
        }))
    }

    /// Queues the record now (records queued in call order are written in that order) and
    /// returns a future resolving to its offset once the broker acknowledged it.
    pub fn enqueue(
        self: &Arc<Self>,
        topic: TopicKind,
        key: &str,
        value: Option<&[u8]>,
    ) -> impl Future<Output = Result<i64, BusError>> + Send + 'static {
        let client = self.client.read().expect("producer lock").clone();
        let name = self.config.topics.name(topic);
        let (reply, answer) = oneshot::channel();
        let mut record =
            BaseRecord::<str, [u8], _>::with_opaque_to(&name, Box::new(reply)).key(key).partition(0);
        if let Some(value) = value {
            record = record.payload(value);
        }
        let queued = client.producer.send(record).map_err(|(err, _)| err);
        let this = self.clone();
        let key = key.to_owned();
        async move {
            let outcome = match queued {
                Ok(()) => answer.await.map_err(|_| None).and_then(|outcome| outcome.map_err(Some)),
                Err(err) => Err(Some(err)),
            };
            outcome.map_err(|err| match err {
                Some(err) if too_large(&err) => BusError::TooLarge { key, message: err.to_string() },
                err => {
                    this.replace_after_failure(&client);
                    let reason = err.map_or("the producer was dropped".to_owned(), |err| err.to_string());
                    BusError::Kafka(format!("failed to write '{key}' to {name}: {reason}"))
                }
            })
        }
    }

    /// Replaces the client after a failed delivery: a fresh client starts from a clean
    /// connection state. Replacements are at most one per second.
    fn replace_after_failure(&self, failed: &Arc<Client>) {
        let mut current = self.client.write().expect("producer lock");
        let mut last = self.replaced_at.lock().expect("replace lock");
        if !Arc::ptr_eq(&current, failed) || last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        if let Some((code, reason)) = failed.producer.client().fatal_error() {
            warn!(producer = self.name, ?code, %reason, "producer hit a fatal error");
        }
        match create(&self.config, self.name) {
            Ok(fresh) => {
                warn!(producer = self.name, "replacing the producer after a failed delivery");
                *current = fresh;
                *last = Some(Instant::now());
            }
            Err(err) => warn!(producer = self.name, error = %err, "failed to replace the producer"),
        }
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) {
        let client = self.client.read().expect("producer lock").clone();
        let _ = client.producer.flush(timeout);
    }
}

fn create(config: &BusConfig, name: &'static str) -> Result<Arc<Client>, BusError> {
    let delivery_ms = config.delivery_timeout.as_millis().max(1000);
    let client = config.client_config(&[
        ("enable.idempotence", "false".into()),
        // One request at a time: retries cannot reorder records of a key.
        ("max.in.flight.requests.per.connection", "1".into()),
        ("acks", "all".into()),
        // Control records are few and latency matters: send at once.
        ("linger.ms", "0".into()),
        ("delivery.timeout.ms", delivery_ms.to_string()),
        ("request.timeout.ms", delivery_ms.min(5000).to_string()),
        // A record of Shiva's largest size, plus the request's framing.
        ("message.max.bytes", (shiva_proto::records::MAX_RECORD_BYTES + 64 * 1024).to_string()),
    ]);
    let producer: Arc<BaseProducer<Delivery>> = Arc::new(
        client
            .create_with_context(Delivery::default())
            .map_err(|err| BusError::Kafka(format!("failed to create a producer: {err}")))?,
    );
    let stop = spawn_poller(&format!("shiva-{name}"), producer.clone())?;
    Ok(Arc::new(Client { producer, stop }))
}

/// Polls `producer` on a thread of its own named `name` until the returned flag is set (then
/// within 10 s). Delivery reports wake the poll at once, so the long deadline costs nothing;
/// short ones do (rdkafka spins through the last sub-millisecond of every deadline).
pub(crate) fn spawn_poller<C: ProducerContext + 'static>(
    name: &str,
    producer: Arc<BaseProducer<C>>,
) -> Result<Arc<AtomicBool>, BusError> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                producer.poll(Duration::from_secs(10));
            }
        })
        .map_err(|err| BusError::Kafka(format!("failed to start the producer thread {name}: {err}")))?;
    Ok(stop)
}
