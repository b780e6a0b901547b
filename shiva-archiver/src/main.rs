//! `shiva-archiver`: see the library crate.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use shiva_archiver::cli::{Cli, Command, Compression, ExtractArgs, Format, RunArgs};
use shiva_archiver::crypt;
use shiva_archiver::cut::Limits;
use shiva_archiver::dest::FileDest;
use shiva_archiver::extract::{Output, Range, extract};
use shiva_archiver::format::Codec;
use shiva_archiver::fsck::fsck;
use shiva_archiver::housekeep::housekeep;
use shiva_archiver::run::{DataGone, EXIT_DATA_GONE, RunConfig, run};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHIVA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
    };
    match execute(cli) {
        Ok(code) => code,
        Err(err) if err.downcast_ref::<DataGone>().is_some() => {
            tracing::error!("{err:#}");
            eprintln!("shiva-archiver: {err:#}");
            ExitCode::from(EXIT_DATA_GONE)
        }
        Err(err) if err.downcast_ref::<Usage>().is_some() => {
            eprintln!("shiva-archiver: {err:#}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("shiva-archiver: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Bad input: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn usage(err: impl std::fmt::Display) -> anyhow::Error {
    Usage(err.to_string()).into()
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            run(run_config(*args)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck { archive, deep, identity } => {
            let dest = FileDest::from_url(&archive.dest).map_err(usage)?;
            let identities = crypt::identities(&identity).map_err(usage)?;
            let (summaries, problems) = fsck(&dest, &archive.topic, deep, &identities)?;
            for summary in &summaries {
                let range =
                    summary.range.map_or("empty".to_owned(), |(from, to)| format!("offsets {from}..{to}"));
                println!(
                    "partition {}: {} files, {} records, {range}",
                    summary.partition, summary.files, summary.records
                );
            }
            for problem in &problems {
                println!("partition {}: PROBLEM: {}", problem.partition, problem.what);
            }
            if problems.is_empty() {
                println!("ok: every partition's files tile with no gap and no overlap");
                Ok(ExitCode::SUCCESS)
            } else {
                bail!("{} problem(s) found", problems.len())
            }
        }
        Command::Extract(args) => extract_command(*args),
        Command::Housekeep { archive, older_than, dry_run } => {
            let dest = FileDest::from_url(&archive.dest).map_err(usage)?;
            let swept = housekeep(&dest, &archive.topic, older_than, std::time::SystemTime::now(), dry_run)?;
            for path in &swept.paths {
                println!("{} {path}", if dry_run { "would delete" } else { "deleted" });
            }
            println!(
                "{} file(s), {} record(s){}",
                swept.files,
                swept.records,
                if dry_run { " (dry run)" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_config(args: RunArgs) -> anyhow::Result<RunConfig> {
    let dest = FileDest::from_url(&args.dest).map_err(usage)?;
    let max_bytes = args
        .max_bytes
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|err| {
            usage(format!("--max-bytes '{}': not a byte size like 64MiB ({err})", args.max_bytes))
        })?
        .as_u64();
    if max_bytes == 0 || args.max_records == 0 {
        return Err(usage("--max-bytes and --max-records must be above 0"));
    }
    let codec = match (args.compression, args.level) {
        (Compression::Zstd, level) => {
            let level = level.unwrap_or(1);
            if !(1..=22).contains(&level) {
                return Err(usage(format!("--level {level}: zstd levels go from 1 to 22")));
            }
            Codec::Zstd(level)
        }
        (Compression::Gzip, level) => {
            let level = level.unwrap_or(6);
            if !(0..=9).contains(&level) {
                return Err(usage(format!("--level {level}: gzip levels go from 0 to 9")));
            }
            Codec::Gzip(level as u32)
        }
    };
    let settings = args
        .kafka
        .iter()
        .map(|setting| {
            setting
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| usage(format!("-X '{setting}': expected KEY=VALUE")))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let group = args.group.unwrap_or_else(|| format!("shiva-archiver.{}", args.topic));
    let recipients = crypt::recipients(&args.recipient, &args.recipients_file).map_err(usage)?;
    Ok(RunConfig {
        bootstrap: args.bootstrap,
        topic: args.topic,
        partitions: args.partitions,
        dest,
        limits: Limits {
            max_bytes,
            max_records: args.max_records,
            max_age_ms: args.max_age.map(|age| age.as_millis() as i64),
        },
        idle_publish: args.idle_publish,
        codec,
        group,
        settings,
        recipients,
    })
}

fn time(flag: &str, text: &Option<String>) -> anyhow::Result<Option<i64>> {
    text.as_deref()
        .map(|text| {
            humantime::parse_rfc3339_weak(text)
                .map(|at| at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64)
                .map_err(|err| usage(format!("{flag} '{text}': not an RFC 3339 time ({err})")))
        })
        .transpose()
}

fn extract_command(args: ExtractArgs) -> anyhow::Result<ExitCode> {
    let dest = FileDest::from_url(&args.archive.dest).map_err(usage)?;
    let range = Range {
        partitions: args.partitions,
        from_offset: args.from_offset,
        to_offset: args.to_offset,
        from_time: time("--from-time", &args.from_time)?,
        to_time: time("--to-time", &args.to_time)?,
    };
    let identities = crypt::identities(&args.identity).map_err(usage)?;
    let output = match args.format {
        Format::Values => Output::Values,
        Format::Jsonl => Output::Jsonl,
    };
    let written = match &args.output {
        Some(path) => {
            let file = std::fs::File::create(path).with_context(|| format!("--output {}", path.display()))?;
            extract(
                &dest,
                &args.archive.topic,
                &range,
                output,
                &identities,
                &mut std::io::BufWriter::new(file),
            )?
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            extract(&dest, &args.archive.topic, &range, output, &identities, &mut out)?
        }
    };
    tracing::info!(records = written, "extracted");
    Ok(ExitCode::SUCCESS)
}
