//! librdkafka's logs, client errors and failed deliveries, as structured `tracing` events; and
//! which of librdkafka's errors no retry can cure.

use std::sync::{Arc, Mutex};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, info, warn};

/// Routes librdkafka's logs and errors to `tracing`, and keeps the newest client error (a TLS
/// handshake or an authentication that failed) so that "cannot reach the bus" can say why.
/// End-of-partition is how readers learn they caught up: not an error.
#[derive(Debug, Clone, Default)]
pub struct Context {
    errors: Arc<Mutex<Errors>>,
}

#[derive(Debug, Clone, Default)]
struct Errors {
    /// The newest client error.
    last: Option<String>,
    /// The newest one no retry can cure, and what it means. It stays: librdkafka follows a
    /// failed handshake with a "disconnected" of its own, which says less.
    permanent: Option<(&'static str, String)>,
}

impl Context {
    /// The newest client error librdkafka reported (not "all brokers down", which only says
    /// that the others happened).
    pub fn last_error(&self) -> Option<String> {
        self.errors().last.clone()
    }

    /// The newest client error no retry can cure: what it means, and librdkafka's text.
    pub fn permanent_error(&self) -> Option<(&'static str, String)> {
        self.errors().permanent.clone()
    }

    /// Forgets a permanent error (the client made progress since: it was not).
    pub fn forget_permanent(&self) {
        self.errors().permanent = None;
    }

    fn errors(&self) -> std::sync::MutexGuard<'_, Errors> {
        self.errors.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

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
        let code = error.rdkafka_error_code();
        if matches!(error, KafkaError::PartitionEOF(_)) || code == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        warn!(%error, reason, "kafka client error");
        if code != Some(RDKafkaErrorCode::AllBrokersDown) {
            let message = if reason.is_empty() { error.to_string() } else { reason.to_owned() };
            let mut errors = self.errors();
            if let Some(why) = permanent(&error).or_else(|| refused_by_tls_alert(&message)) {
                errors.permanent = Some((why, message.clone()));
            }
            errors.last = Some(message);
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

/// What [`permanent`] says of a missing topic or partition: permanent when a client starts,
/// but also seen for a moment while a broker restarts, so a running reader may wait it out.
pub const MISSING: &str = "the topic or partition does not exist";

/// Why an error of librdkafka is one no retry can cure, or `None` when waiting may (a broker
/// down, a leader moving, a timeout). A client that meets one should stop and say so.
pub fn permanent(error: &KafkaError) -> Option<&'static str> {
    use RDKafkaErrorCode as Code;
    let why = match error.rdkafka_error_code()? {
        Code::Authentication | Code::SaslAuthenticationFailed | Code::IllegalSASLState => {
            "authentication failed"
        }
        Code::SSL => "the TLS handshake failed (a certificate the other side does not accept)",
        Code::UnsupportedSASLMechanism => "the broker does not offer this SASL mechanism",
        Code::TopicAuthorizationFailed => "not authorized to use the topic (a Kafka ACL)",
        Code::GroupAuthorizationFailed => "not authorized to use the consumer group (a Kafka ACL)",
        Code::ClusterAuthorizationFailed => "not authorized on the cluster (a Kafka ACL)",
        Code::TransactionalIdAuthorizationFailed => "not authorized (a Kafka ACL)",
        Code::NotImplemented | Code::BadCompression | Code::UnsupportedCompressionType => {
            "a record batch cannot be decompressed by this build (its codec is not built in, or the batch is damaged)"
        }
        Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition => MISSING,
        Code::InvalidArgument | Code::Conflict => "the client's settings are invalid",
        Code::UnsupportedFeature => "the broker does not support a feature this client needs",
        Code::InvalidMessage | Code::InvalidRecord => "a record on the broker is damaged",
        _ => return None,
    };
    Some(why)
}

/// Under TLS 1.3 the server checks the client's certificate after the client's side of the
/// handshake is done: its refusal arrives as an alert on the next read, which librdkafka reports
/// as a transport failure like any disconnection. OpenSSL's alert text is the only thing that
/// tells it apart, so it is matched here, narrowly.
fn refused_by_tls_alert(message: &str) -> Option<&'static str> {
    const ALERTS: [&str; 4] = [
        "alert certificate required",
        "alert bad certificate",
        "alert unknown ca",
        "alert certificate unknown",
    ];
    ALERTS.iter().any(|alert| message.contains(alert)).then_some(
        "the TLS handshake failed: the broker refuses this client's certificate, or needs one \
         (ssl.certificate.location, ssl.key.location)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_told_from_passing_ones() {
        let consume = |code| KafkaError::MessageConsumption(code);
        assert!(permanent(&consume(RDKafkaErrorCode::NotImplemented)).unwrap().contains("decompressed"));
        assert!(permanent(&consume(RDKafkaErrorCode::SaslAuthenticationFailed)).is_some());
        assert!(permanent(&consume(RDKafkaErrorCode::TopicAuthorizationFailed)).is_some());
        assert!(permanent(&consume(RDKafkaErrorCode::UnknownTopicOrPartition)).is_some());
        for passing in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::OperationTimedOut,
        ] {
            assert_eq!(permanent(&consume(passing)), None, "{passing:?}");
        }
        let alert = "ssl://h:1/bootstrap: Receive failed: error:0A00045C:SSL routines::tlsv13 alert \
                     certificate required: SSL alert number 116";
        assert!(refused_by_tls_alert(alert).is_some());
        assert_eq!(refused_by_tls_alert("ssl://h:1/bootstrap: Disconnected (after 2ms in state UP)"), None);
    }
}
