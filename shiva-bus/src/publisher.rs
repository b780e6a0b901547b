//! Writing records: an idempotent producer with a bounded delivery timeout.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use shiva_proto::TopicKind;
use tracing::warn;

use crate::{BusConfig, BusError, Context};

/// An idempotent producer (`acks=all`) that reports each record's offset. After a failed
/// delivery it replaces its client (see [`Publisher::replace_after_failure`]), so a node never
/// ends up with a dead producer, nor kills the test broker.
pub struct Publisher {
    config: BusConfig,
    name: &'static str,
    producer: RwLock<FutureProducer<Context>>,
    replaced_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("name", &self.name).finish()
    }
}

impl Publisher {
    /// Creates a producer named `name` (for logs).
    pub fn new(config: &BusConfig, name: &'static str) -> Result<Arc<Publisher>, BusError> {
        Self::with_idempotence(config, name, true)
    }

    /// A producer for one-off writes (the CLI): `acks=all` without idempotence, which saves
    /// the producer-id round trip; a single record has no sequence to protect.
    pub fn one_off(config: &BusConfig, name: &'static str) -> Result<Arc<Publisher>, BusError> {
        Self::with_idempotence(config, name, false)
    }

    fn with_idempotence(
        config: &BusConfig,
        name: &'static str,
        idempotent: bool,
    ) -> Result<Arc<Publisher>, BusError> {
        let mut config = config.clone();
        config.idempotent = idempotent;
        let config = &config;
        let producer = create(config)?;
        Ok(Arc::new(Publisher {
            config: config.clone(),
            name,
            producer: RwLock::new(producer),
            replaced_at: Mutex::new(None),
        }))
    }

    /// Writes `value` (or a tombstone) under `key`; returns the record's offset.
    pub async fn send(
        self: &Arc<Self>,
        topic: TopicKind,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<i64, BusError> {
        self.enqueue(topic, key, value).await
    }

    /// Queues the record now (records queued in call order are written in that order) and
    /// returns a future resolving to its offset once the broker acknowledged it.
    pub fn enqueue(
        self: &Arc<Self>,
        topic: TopicKind,
        key: &str,
        value: Option<&[u8]>,
    ) -> impl Future<Output = Result<i64, BusError>> + Send + 'static {
        let producer = self.producer.read().expect("producer lock").clone();
        let name = self.config.topics.name(topic);
        let mut record = FutureRecord::<str, [u8]>::to(&name).key(key).partition(0);
        if let Some(value) = value {
            record = record.payload(value);
        }
        let queued = producer.send_result(record).map_err(|(err, _)| err);
        let this = self.clone();
        let key = key.to_owned();
        async move {
            let outcome = match queued {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(delivery)) => return Ok(delivery.offset),
                    Ok(Err((err, _))) => err.to_string(),
                    Err(_) => "the producer was dropped".to_owned(),
                },
                Err(err) => err.to_string(),
            };
            this.replace_after_failure(&producer);
            Err(BusError::Kafka(format!("failed to write '{key}' to {name}: {outcome}")))
        }
    }

    /// Replaces the client after a failed delivery. librdkafka would otherwise keep its
    /// producer id and bump the producer epoch (KIP-360) to resynchronise sequences, which
    /// tansu 0.6.0 does not implement (its InitProducerId handles only fresh producers, and a
    /// produce under an unknown epoch panics its storage task, leaving the broker unusable).
    /// A fresh producer id is always safe for Shiva: no record relies on cross-record
    /// producer state. Replacements are at most one per second.
    fn replace_after_failure(&self, failed: &FutureProducer<Context>) {
        let mut current = self.producer.write().expect("producer lock");
        let same_client = std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr());
        let mut last = self.replaced_at.lock().expect("replace lock");
        if !same_client || last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        if let Some((code, reason)) = failed.client().fatal_error() {
            warn!(producer = self.name, ?code, %reason, "producer hit a fatal error");
        }
        match create(&self.config) {
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
        let producer = self.producer.read().expect("producer lock").clone();
        let _ = producer.flush(timeout);
    }
}

fn create(config: &BusConfig) -> Result<FutureProducer<Context>, BusError> {
    let delivery_ms = config.delivery_timeout.as_millis().max(1000);
    let mut client = config.client_config();
    client
        .set("enable.idempotence", config.idempotent.to_string())
        .set("acks", "all")
        // Control records are few and latency matters: send at once.
        .set("linger.ms", "0")
        .set("delivery.timeout.ms", delivery_ms.to_string())
        .set("request.timeout.ms", delivery_ms.min(5000).to_string())
        .set("message.max.bytes", "2000000");
    for (key, value) in &config.overrides {
        client.set(key, value);
    }
    client
        .create_with_context(Context)
        .map_err(|err| BusError::Kafka(format!("failed to create a producer: {err}")))
}
