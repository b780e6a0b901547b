//! Creating and checking the control topics.
//!
//! Each control topic must have exactly one partition (one total order) and a cleanup policy
//! that includes `compact` (it is a key/value store). Durability below the production settings
//! (replication factor 3, `min.insync.replicas` 2, no unclean leader election) is reported as
//! warnings: a single test broker is fine, a production cluster is not.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use shiva_proto::TopicKind;

use crate::{BusConfig, BusError, BusKind, Context, filebus};

/// Production durability settings the check compares against.
pub const PRODUCTION_REPLICATION: usize = 3;
/// Production `min.insync.replicas`.
pub const PRODUCTION_MIN_INSYNC: u32 = 2;

fn admin_client(config: &BusConfig) -> Result<AdminClient<Context>, BusError> {
    config
        .client_config(&[])
        .create_with_context(Context::default())
        .map_err(|err| BusError::Kafka(format!("failed to create an admin client: {err}")))
}

/// Creates whatever control topic is missing (1 partition, compacted), then checks them all.
/// Returns durability warnings.
pub async fn ensure_topics(config: &BusConfig, timeout: Duration) -> Result<Vec<String>, BusError> {
    if let BusKind::File(dir) = &config.kind {
        return filebus::ensure_topics(config, dir);
    }
    let admin = admin_client(config)?;
    let names: Vec<String> = TopicKind::ALL.iter().map(|kind| config.topics.name(*kind)).collect();
    // Fail fast, with a clear message, when the broker does not answer at all.
    probe(config, timeout.min(Duration::from_secs(2)))?;
    // Shiva's largest record (a spec with a large environment) plus the batch's framing: a
    // broker's default (1 MB) would refuse it.
    let max_message = (shiva_proto::records::MAX_RECORD_BYTES + 64 * 1024).to_string();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(name, 1, TopicReplication::Fixed(-1))
                .set("cleanup.policy", "compact")
                .set("max.message.bytes", &max_message)
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|err| unreachable(config, admin.inner().context(), err))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created control topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(BusError::Kafka(format!("failed to create topic {name}: {code}")));
            }
        }
    }
    check_topics_with(&admin, config, timeout).await
}

/// Checks, with one metadata request, that the cluster's topics exist with one partition
/// each (for clients that never create them; the node makes the full check).
pub async fn require_topics(config: &BusConfig, timeout: Duration) -> Result<(), BusError> {
    if let BusKind::File(dir) = &config.kind {
        return filebus::require_topics(config, dir);
    }
    let metadata = probe(config, timeout)?;
    let mut missing = Vec::new();
    for kind in TopicKind::ALL {
        let name = config.topics.name(kind);
        match metadata.topics().iter().find(|topic| topic.name() == name) {
            Some(topic) if topic.error().is_none() && topic.partitions().len() == 1 => {}
            Some(topic) if topic.error().is_none() && !topic.partitions().is_empty() => {
                let reason =
                    format!("it has {} partitions; control topics need exactly 1", topic.partitions().len());
                return Err(BusError::WrongTopic { topic: name, reason });
            }
            _ => missing.push(name),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BusError::TopicsMissing { cluster: config.topics.cluster().to_owned(), missing })
    }
}

async fn check_topics_with(
    admin: &AdminClient<Context>,
    config: &BusConfig,
    timeout: Duration,
) -> Result<Vec<String>, BusError> {
    let mut warnings = Vec::new();
    let mut missing = Vec::new();
    for kind in TopicKind::ALL {
        let name = config.topics.name(kind);
        let Some((partitions, replicas)) = metadata(admin, config, Some(&name), timeout).await? else {
            missing.push(name);
            continue;
        };
        if partitions != 1 {
            return Err(BusError::WrongTopic {
                topic: name,
                reason: format!("it has {partitions} partitions; control topics need exactly 1"),
            });
        }
        if replicas < PRODUCTION_REPLICATION {
            warnings.push(format!(
                "topic {name} has replication factor {replicas}, below the production {PRODUCTION_REPLICATION}"
            ));
        }
    }
    if !missing.is_empty() {
        return Err(BusError::TopicsMissing { cluster: config.topics.cluster().to_owned(), missing });
    }
    let names: Vec<String> = TopicKind::ALL.iter().map(|kind| config.topics.name(*kind)).collect();
    let specifiers: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|name| ResourceSpecifier::Topic(name)).collect();
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let results = admin
        .describe_configs(&specifiers, &options)
        .await
        .map_err(|err| unreachable(config, admin.inner().context(), err))?;
    for (name, result) in names.iter().zip(results) {
        let resource = result.map_err(|code| {
            BusError::Kafka(format!("failed to describe the configuration of {name}: {code}"))
        })?;
        let value = |key: &str| resource.get(key).and_then(|entry| entry.value.clone());
        // Kafka's default policy is `delete`; a broker that omits unset values means the default.
        let policy = value("cleanup.policy").unwrap_or_else(|| "delete".to_owned());
        if !policy.split(',').any(|part| part.trim() == "compact") {
            return Err(BusError::WrongTopic {
                topic: name.clone(),
                reason: format!("its cleanup.policy is '{policy}'; control topics need 'compact'"),
            });
        }
        match value("min.insync.replicas").and_then(|text| text.parse::<u32>().ok()) {
            Some(min) if min >= PRODUCTION_MIN_INSYNC => {}
            found => warnings.push(format!(
                "topic {name} has min.insync.replicas {}, below the production {PRODUCTION_MIN_INSYNC}",
                found.map_or("unset".to_owned(), |min| min.to_string())
            )),
        }
        if value("unclean.leader.election.enable").as_deref() == Some("true") {
            warnings
                .push(format!("topic {name} allows unclean leader election, which can lose control records"));
        }
    }
    Ok(warnings)
}

/// Partition and replica counts of `topic` (`None`: missing); with no topic, only reachability.
async fn metadata(
    admin: &AdminClient<Context>,
    config: &BusConfig,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Option<(usize, usize)>, BusError> {
    let metadata = tokio::task::block_in_place(|| admin.inner().fetch_metadata(topic, timeout))
        .map_err(|err| unreachable(config, admin.inner().context(), err))?;
    let Some(topic) = topic else { return Ok(Some((0, 0))) };
    let Some(found) = metadata.topics().iter().find(|found| found.name() == topic) else { return Ok(None) };
    if found.error().is_some() || found.partitions().is_empty() {
        return Ok(None);
    }
    let replicas = found.partitions().iter().map(|partition| partition.replicas().len()).min().unwrap_or(0);
    Ok(Some((found.partitions().len(), replicas)))
}

/// The broker's metadata of every topic, fetched by a short-lived producer: unlike the admin
/// client's, its main queue is served, so a failed TLS handshake or login reaches its
/// [`Context`] and the error says why ([`BusError::Refused`]).
fn probe(config: &BusConfig, timeout: Duration) -> Result<Metadata, BusError> {
    let producer: BaseProducer<Context> =
        config
            .client_config(&[])
            .create_with_context(Context::default())
            .map_err(|err| BusError::Kafka(format!("failed to create a client: {err}")))?;
    tokio::task::block_in_place(|| producer.client().fetch_metadata(None, timeout)).map_err(|err| {
        // Serves the queue of client errors and logs, into the context (a poll serves events
        // until its deadline).
        producer.poll(Duration::from_millis(100));
        unreachable(config, producer.context(), err)
    })
}

/// "Cannot reach the bus" ([`BusError::Refused`] when the client error says no retry can
/// help), with the client error that says why (a TLS handshake, an
/// authentication) when librdkafka reported one.
fn unreachable(config: &BusConfig, context: &Context, err: impl std::fmt::Display) -> BusError {
    if let Some((why, message)) = context.permanent_error() {
        return BusError::Refused { brokers: config.brokers.clone(), why, message };
    }
    let mut message = err.to_string();
    if let Some(last) = context.last_error() {
        message = format!("{message}; the client's last error: {last}");
    }
    BusError::Unreachable { brokers: config.brokers.clone(), message }
}
