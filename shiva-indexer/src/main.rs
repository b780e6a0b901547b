//! `shiva-indexer`: see the library crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shiva_archiver::kafka::Refused;
use shiva_archiver::run::{DataGone, EXIT_DATA_GONE, block_stop_signals, default_stop_signals};
use shiva_indexer::index::{Index, IndexError};
use shiva_indexer::run::{RunConfig, run};

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok (run: stopped by SIGTERM/SIGINT after committing what it read)
  1  failure (unreachable broker, unwritable index…)
  2  invalid input or usage (a flag, a query, another topic's index file)
  3  run: records the index needs are no longer in Kafka, or the bus refuses the indexer (permanent: do not restart)";

/// Indexes a Kafka topic into a full-text index (SQLite FTS5), exactly once.
#[derive(Debug, Parser)]
#[command(name = "shiva-indexer", version, about, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Index a topic's partitions until stopped.
    Run {
        /// Kafka bootstrap servers (HOST:PORT[,HOST:PORT]).
        #[arg(long)]
        bootstrap: String,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Partitions, comma separated (default: all).
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<i32>,
        /// The index file (created if missing; one per topic).
        #[arg(long)]
        index: PathBuf,
        /// Commit after this many records (1 to 1000000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch_records: u32,
        /// Commit a batch at most this long after its first record (1ms to 1h).
        #[arg(long, default_value = "1s", value_parser = batch_wait)]
        batch_wait: Duration,
        /// Commit once a batch holds this many bytes of keys and values (1KiB to 4GiB): what a
        /// batch holds in memory, whatever its records' sizes.
        #[arg(long, default_value = "64MiB", value_parser = batch_bytes)]
        batch_bytes: u64,
        /// Consumer group offsets are committed to, as a hint (resuming reads the index).
        #[arg(long)]
        group: Option<String>,
        /// librdkafka setting, repeatable: -X security.protocol=SSL.
        #[arg(short = 'X', value_name = "KEY=VALUE")]
        kafka: Vec<String>,
    },
    /// Search the index: FTS5 syntax (words, "a phrase", AND, OR, NOT, prefix*, key:word).
    Search {
        /// The index file.
        #[arg(long)]
        index: PathBuf,
        /// Hits shown, best first (1 to 10000).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// One JSON object: {"total", "hits": [{partition, offset, timestamp_ms, key, snippet, rank}]}.
        #[arg(long)]
        json: bool,
        /// The query.
        query: String,
    },
    /// What the index holds: its topic, record count and each partition's next offset.
    Stats {
        /// The index file.
        #[arg(long)]
        index: PathBuf,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

fn batch_wait(text: &str) -> Result<Duration, String> {
    shiva_archiver::cli::bounded(text, Duration::from_millis(1), Duration::from_secs(3600))
}

fn batch_bytes(text: &str) -> Result<u64, String> {
    let value: bytesize::ByteSize =
        text.trim().parse().map_err(|err| format!("{err} (expected e.g. 64MiB)"))?;
    if value.as_u64() < 1024 || value.as_u64() > 4 << 30 {
        return Err(format!("{text} is out of range: from 1KiB to 4GiB"));
    }
    Ok(value.as_u64())
}

fn main() -> ExitCode {
    // First, before anything starts a thread: a stop signal during start-up must stop `run`
    // cleanly, not kill it (see `block_stop_signals`).
    if let Err(err) = block_stop_signals() {
        eprintln!("shiva-indexer: cannot block SIGTERM and SIGINT: {err:#}");
        return ExitCode::from(1);
    }
    shiva_archiver::cli::init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
    };
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shiva-indexer: {err:#}");
            if err.downcast_ref::<DataGone>().is_some() || err.downcast_ref::<Refused>().is_some() {
                tracing::error!("{err:#}");
                ExitCode::from(EXIT_DATA_GONE)
            } else if matches!(
                err.downcast_ref::<IndexError>(),
                Some(
                    IndexError::Query { .. }
                        | IndexError::OtherTopic { .. }
                        | IndexError::NotAnIndex { .. }
                        | IndexError::Format { .. }
                        | IndexError::NoWal { .. }
                )
            ) || err.downcast_ref::<Usage>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Record text on one line of a terminal: control characters (tabs, newlines, escape
/// sequences of a forged record) are shown escaped, never sent as they are.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

/// Invalid input (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn execute(cli: Cli) -> anyhow::Result<()> {
    // Only `run` watches for stop signals; the other commands die of them as any program.
    if !matches!(cli.command, Command::Run { .. }) {
        default_stop_signals()?;
    }
    match cli.command {
        Command::Run {
            bootstrap,
            topic,
            partitions,
            index,
            batch_records,
            batch_wait,
            batch_bytes,
            group,
            kafka,
        } => {
            let settings = shiva_archiver::cli::kafka_settings(&kafka).map_err(Usage)?;
            let group = group.unwrap_or_else(|| format!("shiva-indexer.{topic}"));
            run(RunConfig {
                bootstrap,
                topic,
                partitions,
                index,
                batch_records: batch_records as usize,
                batch_wait,
                batch_bytes,
                group,
                settings,
            })
        }
        Command::Search { index, limit, json, query } => {
            if !index.exists() {
                return Err(Usage(format!("{}: no such index file", index.display())).into());
            }
            let (total, hits) = Index::open_read(&index)?.search(&query, limit)?;
            if json {
                println!("{}", serde_json::json!({"total": total, "hits": hits}));
            } else {
                for hit in &hits {
                    let key = hit.key.as_deref().map_or_else(|| "-".to_owned(), printable);
                    println!("{}/{}\t{key}\t{}", hit.partition, hit.offset, printable(&hit.snippet));
                }
                eprintln!("{} of {total} matching record(s)", hits.len());
            }
            Ok(())
        }
        Command::Stats { index, json } => {
            if !index.exists() {
                return Err(Usage(format!("{}: no such index file", index.display())).into());
            }
            let stats = Index::open_read(&index)?.stats()?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!("topic {}: {} record(s)", stats.topic, stats.records);
                for (partition, next) in &stats.positions {
                    println!("  partition {partition}: next offset {next}");
                }
            }
            Ok(())
        }
    }
}
