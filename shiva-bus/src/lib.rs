//! The bus boundary of Shiva: the only crate that talks to librdkafka, and the file bus.
//!
//! One interface, two implementations: the same types serve `--bus kafka://…` (librdkafka) and
//! `--bus file:///DIR` (the file bus of one host, [`filebus`] over [`filelog`]); the node, the
//! CLI and the pure view do not know which one they use.
//!
//! * [`BusConfig`]: the `--bus`, `--cluster` and `-X key=value` settings;
//! * [`Reader`]: a thread that reads the control topics from the beginning and forwards every
//!   record, in log order per topic, plus "synced" markers after a read-to-end;
//! * [`Publisher`]: an ordered producer (`acks=all`, one request in flight, bounded delivery
//!   timeout) that reports each record's offset and replaces itself after a fatal error;
//! * [`admin`]: creating and checking the topics.
//!
//! Both `shiva-node` and `shiva-ctl` use it, so that the client settings and the read-to-end
//! logic exist once.

pub mod admin;
mod context;
pub mod filebus;
pub mod filelog;
pub mod logs;
mod publisher;
mod reader;

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use shiva_proto::Topics;

pub use context::{Context, MISSING, permanent};
pub use filebus::Cleaner;
pub use publisher::{Durability, Publisher};
pub use reader::{Reader, ReaderEvent, Record};

/// Errors at the bus boundary. `shiva-ctl` maps them to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A malformed `--bus`, `--cluster` or `-X`.
    #[error("{0}")]
    Invalid(String),
    /// The broker did not answer.
    #[error("cannot reach the bus at {brokers}: {message}")]
    Unreachable {
        /// Bootstrap servers.
        brokers: String,
        /// librdkafka's reason.
        message: String,
    },
    /// The bus answered and refused us, in a way no retry can cure (a TLS certificate it does
    /// not accept, a failed authentication, an ACL).
    #[error("the bus at {brokers} refuses this client: {why}: {message}")]
    Refused {
        /// Bootstrap servers.
        brokers: String,
        /// What it means.
        why: &'static str,
        /// librdkafka's reason.
        message: String,
    },
    /// The cluster's topics do not exist.
    #[error(
        "cluster '{cluster}' does not exist on this bus: topic(s) {} missing (a shiva-node creates them on its first start)",
        missing.join(", ")
    )]
    TopicsMissing {
        /// The cluster name.
        cluster: String,
        /// The missing topics.
        missing: Vec<String>,
    },
    /// A topic exists with settings Shiva cannot work with.
    #[error("topic {topic} is unusable: {reason}")]
    WrongTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// A record the broker or the client refuses for its size: retrying cannot help.
    #[error("failed to write '{key}': the record is too large for the bus ({message})")]
    TooLarge {
        /// The record's key.
        key: String,
        /// librdkafka's reason.
        message: String,
    },
    /// Any other Kafka failure.
    #[error("kafka: {0}")]
    Kafka(String),
    /// A failure of the file bus (a file that cannot be written, read or is damaged).
    #[error("file bus: {0}")]
    File(String),
}

/// Which bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusKind {
    /// Kafka, at [`BusConfig::brokers`].
    Kafka,
    /// The file bus in this directory (one host).
    File(PathBuf),
}

/// The file bus's settings, from `-X key=value` (on Kafka, `-X` sets librdkafka).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSettings {
    /// `segment.bytes` (4096 to 1 GiB, default 1 MiB): a topic's last segment grows to this
    /// before an appender starts a new one; compaction reads the segments before the last.
    pub segment_bytes: u64,
    /// `clean.interval.ms` (100 to 3,600,000, default 10,000): how often a node's cleaner looks.
    pub clean_every: Duration,
    /// `delete.retention.ms` (0 to 2^53, default 86,400,000): how long a tombstone stays in a
    /// control topic.
    pub tombstones: Duration,
}

impl Default for FileSettings {
    fn default() -> Self {
        FileSettings {
            segment_bytes: filelog::SEGMENT_BYTES,
            clean_every: filebus::CLEAN_EVERY,
            tombstones: filebus::TOMBSTONE_RETENTION,
        }
    }
}

impl FileSettings {
    /// The settings `overrides` make; any other key is refused.
    pub fn parse(overrides: &[(String, String)]) -> Result<FileSettings, BusError> {
        let mut settings = FileSettings::default();
        for (key, value) in overrides {
            let number = |low: u64, high: u64| {
                value.trim().parse::<u64>().ok().filter(|number| (low..=high).contains(number)).ok_or_else(
                    || {
                        BusError::Invalid(format!(
                            "-X {key}={value}: expected a whole number from {low} to {high}"
                        ))
                    },
                )
            };
            match key.as_str() {
                "segment.bytes" => settings.segment_bytes = number(4096, 1 << 30)?,
                "clean.interval.ms" => settings.clean_every = Duration::from_millis(number(100, 3_600_000)?),
                "delete.retention.ms" => settings.tombstones = Duration::from_millis(number(0, 1 << 53)?),
                _ => {
                    return Err(BusError::Invalid(format!(
                        "-X {key}: not a setting of the file bus (it takes segment.bytes, \
                         clean.interval.ms and delete.retention.ms; librdkafka settings are for kafka://)"
                    )));
                }
            }
        }
        Ok(settings)
    }
}

/// Where the bus is and how to talk to it.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Which bus.
    pub kind: BusKind,
    /// `host:port[,host:port]` (Kafka), the directory (the file bus): where the bus is, for logs.
    pub brokers: String,
    /// The cluster's topic names.
    pub topics: Topics,
    /// `-X key=value` settings, applied last (they win).
    pub overrides: Vec<(String, String)>,
    /// The file bus's settings (from the `-X` settings on the file bus).
    pub file: FileSettings,
    /// `fetch.wait.max.ms` of readers: how long the broker may hold a fetch when there is no
    /// new record. Short waits deliver commands in milliseconds at the cost of more idle fetches.
    pub fetch_wait: Duration,
    /// Producer `delivery.timeout.ms`: a record not acknowledged within it is reported failed.
    pub delivery_timeout: Duration,
}

impl BusConfig {
    /// Builds a config from the CLI's `--bus`, `--cluster` and `-X` values.
    pub fn new(bus_url: &str, cluster: &str, overrides: &[String]) -> Result<BusConfig, BusError> {
        let (kind, brokers) = match bus_url.strip_prefix("file://") {
            Some(path) => {
                let dir = parse_file_url(bus_url, path)?;
                filebus::check_local(&dir)?;
                (BusKind::File(dir.clone()), dir.display().to_string())
            }
            None => (BusKind::Kafka, parse_bus_url(bus_url)?),
        };
        let topics = Topics::new(cluster).map_err(|err| BusError::Invalid(format!("--cluster: {err}")))?;
        let overrides: Vec<(String, String)> =
            overrides.iter().map(|text| parse_override(text)).collect::<Result<_, _>>()?;
        let file = match kind {
            BusKind::File(_) => FileSettings::parse(&overrides)?,
            BusKind::Kafka => FileSettings::default(),
        };
        Ok(BusConfig {
            kind,
            brokers,
            topics,
            overrides,
            file,
            fetch_wait: Duration::from_millis(12),
            delivery_timeout: Duration::from_secs(5),
        })
    }

    /// librdkafka settings for a client of this bus: the base ones, then the client's own
    /// `settings`, then the `-X` overrides, which always win.
    pub(crate) fn client_config(&self, settings: &[(&str, String)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "shiva")
            // Reconnect quickly after a broker restart; the control plane depends on it.
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000")
            .set("socket.keepalive.enable", "true")
            .set("log_level", "4");
        for (key, value) in settings {
            config.set(*key, value);
        }
        for (key, value) in &self.overrides {
            config.set(key, value);
        }
        config
    }
}

/// The directory of `file:///DIR` (`path` is what follows `file://`): absolute, no `..`.
fn parse_file_url(url: &str, path: &str) -> Result<PathBuf, BusError> {
    let invalid =
        |why: &str| BusError::Invalid(format!("--bus '{url}': {why}; expected file:///ABSOLUTE/DIR"));
    let dir = PathBuf::from(path);
    if !dir.is_absolute() {
        return Err(invalid("the directory must be an absolute path"));
    }
    if dir.components().any(|part| matches!(part, std::path::Component::ParentDir)) {
        return Err(invalid("the directory must not contain '..'"));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(invalid("it exists and is not a directory"));
    }
    Ok(dir)
}

/// Parses `kafka://HOST:PORT[,HOST:PORT]` into librdkafka's `bootstrap.servers`.
pub fn parse_bus_url(url: &str) -> Result<String, BusError> {
    let invalid = |why: &str| {
        BusError::Invalid(format!(
            "--bus '{url}': {why}; expected kafka://HOST:PORT[,HOST:PORT] or file:///ABSOLUTE/DIR"
        ))
    };
    let rest =
        url.strip_prefix("kafka://").ok_or_else(|| invalid("the scheme must be kafka:// or file://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(invalid("no broker given"));
    }
    for server in rest.split(',') {
        let (host, port) =
            server.rsplit_once(':').ok_or_else(|| invalid(&format!("'{server}' has no port")))?;
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(invalid(&format!("'{server}' has an invalid host")));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => {}
            _ => return Err(invalid(&format!("'{port}' is not a port number"))),
        }
    }
    Ok(rest.to_owned())
}

/// Parses one `-X key=value`.
pub fn parse_override(text: &str) -> Result<(String, String), BusError> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(BusError::Invalid(format!("-X '{text}': expected key=value (a librdkafka setting)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_urls() {
        assert_eq!(parse_bus_url("kafka://127.0.0.1:9092").unwrap(), "127.0.0.1:9092");
        assert_eq!(parse_bus_url("kafka://a:1,b:2/").unwrap(), "a:1,b:2");
        for bad in ["127.0.0.1:9092", "kafka://", "kafka://host", "kafka://h:0", "kafka://h:x", "http://h:1"]
        {
            assert!(parse_bus_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_urls() {
        let config = BusConfig::new("file:///var/lib/shiva/bus", "c", &[]).unwrap();
        assert_eq!(config.kind, BusKind::File(PathBuf::from("/var/lib/shiva/bus")));
        for bad in ["file://relative/dir", "file://", "file:///a/../b", "file:///etc/hostname"] {
            let err = BusConfig::new(bad, "c", &[]).unwrap_err();
            assert!(matches!(err, BusError::Invalid(_)), "{bad}: {err}");
        }
        let config =
            BusConfig::new("file:///b", "c", &["segment.bytes=4096".into(), "clean.interval.ms=100".into()])
                .unwrap();
        assert_eq!(config.file.segment_bytes, 4096);
        assert_eq!(config.file.clean_every, Duration::from_millis(100));
        for bad in ["segment.bytes=12", "clean.interval.ms=-1", "delete.retention.ms=x", "acks=all"] {
            let err = BusConfig::new("file:///b", "c", &[bad.into()]).unwrap_err();
            assert!(
                matches!(err, BusError::Invalid(_))
                    && err.to_string().contains(bad.split('=').next().unwrap()),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn overrides_win_over_a_clients_own_settings() {
        let config = BusConfig::new("kafka://h:1", "c", &["acks=1".into()]).unwrap();
        let client = config.client_config(&[("acks", "all".into()), ("linger.ms", "0".into())]);
        assert_eq!(client.get("acks"), Some("1"));
        assert_eq!(client.get("linger.ms"), Some("0"));
        assert_eq!(client.get("bootstrap.servers"), Some("h:1"));
    }

    #[test]
    fn overrides() {
        assert_eq!(
            parse_override("security.protocol=SSL").unwrap(),
            ("security.protocol".into(), "SSL".into())
        );
        assert_eq!(parse_override("sasl.password=a=b").unwrap().1, "a=b");
        assert!(parse_override("nokey").is_err());
        assert!(parse_override("=x").is_err());
    }
}
