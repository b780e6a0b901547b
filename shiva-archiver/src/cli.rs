//! Command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dest::{Dest, S3Options};

/// Exit codes, shown in `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok (run: stopped by SIGTERM/SIGINT after publishing its partial files)
  1  failure (unreachable broker, unwritable destination, fsck found problems…)
  2  invalid input or usage
  3  run: records the archive needs are no longer in Kafka (permanent: do not restart)";

/// Archives Kafka topics to compressed files, exactly once.
#[derive(Debug, Parser)]
#[command(name = "shiva-archiver", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive a topic's partitions until stopped.
    Run(Box<RunArgs>),
    /// Check that each partition's files tile with no gap or overlap.
    Fsck {
        #[command(flatten)]
        archive: ArchiveArgs,
        /// Also decode every file and check it against its footer.
        #[arg(long)]
        deep: bool,
        /// age identity file to open encrypted files with (`--deep`), repeatable.
        #[arg(long)]
        identity: Vec<PathBuf>,
    },
    /// Print the archived records of an offset or time range.
    Extract(Box<ExtractArgs>),
    /// Delete whole files older than a retention; the newest file of each partition always stays.
    Housekeep {
        #[command(flatten)]
        archive: ArchiveArgs,
        /// Delete files whose newest record is older than this (e.g. 30d; at most 100y).
        #[arg(long, value_parser = older_than)]
        older_than: Duration,
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Where an archive is.
#[derive(Debug, Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub dest: DestArgs,
    /// Topic.
    #[arg(long)]
    pub topic: String,
}

/// A destination and, for S3, how to reach it.
#[derive(Debug, Args)]
pub struct DestArgs {
    /// Destination: file:///dir or s3://bucket/prefix.
    #[arg(long)]
    pub dest: String,
    /// S3 endpoint URL, for any S3-compatible store (default: AWS).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default us-east-1).
    #[arg(long, env = "AWS_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key (prefer the environment variable: flags show in `ps`).
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
}

impl DestArgs {
    /// Opens the destination.
    pub fn open(&self) -> anyhow::Result<Dest> {
        let options = S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
        };
        Dest::from_url(&self.dest, &options)
    }
}

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kafka bootstrap servers (HOST:PORT[,HOST:PORT]).
    #[arg(long)]
    pub bootstrap: String,
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// Partitions, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub partitions: Vec<i32>,
    #[command(flatten)]
    pub dest: DestArgs,
    /// Raw bytes (keys, values, headers) per file.
    #[arg(long, default_value = "64MiB")]
    pub max_bytes: String,
    /// Records per file.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_records: u64,
    /// Record-time window per file (e.g. 10m; 1ms to 10y).
    #[arg(long, value_parser = max_age)]
    pub max_age: Option<Duration>,
    /// Publish a partial file after this long without new records (1ms to 1d).
    #[arg(long, default_value = "30s", value_parser = idle_publish)]
    pub idle_publish: Duration,
    /// Compression: zstd (readable with zstdcat) or gzip (readable with zcat).
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compression: Compression,
    /// Compression level (zstd 1–22, default 1; gzip 0–9, default 6).
    #[arg(long)]
    pub level: Option<i32>,
    /// Consumer group the archived offsets are committed to (a hint; resuming reads the archive).
    #[arg(long)]
    pub group: Option<String>,
    /// librdkafka setting, repeatable: -X security.protocol=SSL.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub kafka: Vec<String>,
    /// Encrypt every file to this age recipient (age1…), repeatable.
    #[arg(long)]
    pub recipient: Vec<String>,
    /// Encrypt to the recipients listed in this file (one per line), repeatable.
    #[arg(long)]
    pub recipients_file: Vec<PathBuf>,
}

/// `extract` flags.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Partitions, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub partitions: Vec<i32>,
    /// From this offset (inclusive).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Up to this offset (exclusive).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// From this time (RFC 3339, inclusive).
    #[arg(long)]
    pub from_time: Option<String>,
    /// Up to this time (RFC 3339, exclusive).
    #[arg(long)]
    pub to_time: Option<String>,
    /// Output: one raw value per line, or one JSON envelope per line.
    #[arg(long, value_enum, default_value_t = Format::Values)]
    pub format: Format,
    /// Write here instead of stdout.
    #[arg(long, conflicts_with = "to_topic")]
    pub output: Option<PathBuf>,
    /// Produce the records to this Kafka topic instead (same partition numbers; the original
    /// topic, partition and offset in the headers shiva.topic, shiva.partition, shiva.offset).
    #[arg(long, requires = "bootstrap")]
    pub to_topic: Option<String>,
    /// Kafka bootstrap servers for --to-topic.
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// librdkafka setting for --to-topic, repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub kafka: Vec<String>,
    /// age identity file to open encrypted files with, repeatable.
    #[arg(long)]
    pub identity: Vec<PathBuf>,
}

/// `run --compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// zstd.
    Zstd,
    /// gzip.
    Gzip,
}

/// `extract --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Raw values.
    Values,
    /// JSON envelopes.
    Jsonl,
}

/// `-X KEY=VALUE` flags as librdkafka settings; the error names the flag that has no `=`.
pub fn kafka_settings(flags: &[String]) -> Result<Vec<(String, String)>, String> {
    flags
        .iter()
        .map(|setting| {
            setting
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("-X '{setting}': expected KEY=VALUE"))
        })
        .collect()
}

/// Logs (`SHIVA_LOG`, default `info`) to stderr, in colour on a terminal: the pipelines'
/// binaries (archiver, indexer) log alike.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHIVA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A duration within `[min, max]`; the error names the value and the range (clap adds the flag).
pub fn bounded(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let value = humantime::parse_duration(text.trim()).map_err(|err| format!("{err} (expected e.g. 10m)"))?;
    if value < min || value > max {
        return Err(format!(
            "{text} is out of range: from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(value)
}

const DAY: u64 = 86_400;
/// humantime's year (365.25 days).
const YEAR: u64 = 31_557_600;

fn older_than(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::ZERO, Duration::from_secs(100 * YEAR))
}

fn max_age(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_millis(1), Duration::from_secs(10 * YEAR))
}

fn idle_publish(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_millis(1), Duration::from_secs(DAY))
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn durations_outside_their_range_are_refused_naming_the_range() {
        assert!(max_age("100000000y").unwrap_err().contains("out of range: from 1ms to 10years"));
        assert!(idle_publish("2d").unwrap_err().contains("out of range"));
        assert!(older_than("1000000y").unwrap_err().contains("out of range"));
        assert_eq!(idle_publish("30s"), Ok(Duration::from_secs(30)));
    }
}
