//! librdkafka's logs, client errors and failed deliveries, as structured `tracing` events.

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, info, warn};

/// Routes librdkafka's logs and errors to `tracing`. End-of-partition is how readers learn they
/// caught up: not an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context;

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => warn!(facility, message, "librdkafka"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => info!(facility, message, "librdkafka"),
            RDKafkaLogLevel::Debug => debug!(facility, message, "librdkafka"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            warn!(%error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for Context {}

/// For producers whose records need no answer (task output): a record the broker did not take
/// is logged.
impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            warn!(%error, topic = message.topic(), "record not delivered");
        }
    }
}
