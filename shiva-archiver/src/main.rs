//! `shiva-archiver`: see the library crate.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use shiva_archiver::cli::{Cli, Command, Compression, ExtractArgs, Format, RunArgs};
use shiva_archiver::crypt;
use shiva_archiver::cut::Limits;
use shiva_archiver::extract::{Range, extract, select, write_jsonl, write_value};
use shiva_archiver::format::Codec;
use shiva_archiver::fsck::fsck;
use shiva_archiver::housekeep::housekeep;
use shiva_archiver::kafka::{Refused, Sink};
use shiva_archiver::run::{
    DataGone, EXIT_DATA_GONE, RunConfig, block_stop_signals, default_stop_signals, run,
};

fn main() -> ExitCode {
    // First, before anything starts a thread: a stop signal during start-up must stop `run`
    // cleanly, not kill it (see `block_stop_signals`).
    if let Err(err) = block_stop_signals() {
        eprintln!("shiva-archiver: cannot block SIGTERM and SIGINT: {err:#}");
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
        Ok(code) => code,
        Err(err) if err.downcast_ref::<DataGone>().is_some() || err.downcast_ref::<Refused>().is_some() => {
            tracing::error!("{err:#}");
            eprintln!("shiva-archiver: {err:#}");
            ExitCode::from(EXIT_DATA_GONE)
        }
        // The reader of our output went away (`extract … | head`): nothing is wrong.
        Err(err)
            if err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
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
    // `{:#}`: an anyhow error's causes too (its plain text is only the outermost context).
    Usage(format!("{err:#}")).into()
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    // Only `run` watches for stop signals; the other commands die of them as any program.
    if !matches!(cli.command, Command::Run(_)) {
        default_stop_signals()?;
    }
    match cli.command {
        Command::Run(args) => {
            run(run_config(*args)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck { archive, deep, identity } => {
            let dest = archive.dest.open().map_err(usage)?;
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
            let dest = archive.dest.open().map_err(usage)?;
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
    let dest = args.dest.open().map_err(usage)?;
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
    // Compressed (and encrypted) files can outgrow their records a little: keep a margin.
    if let Some(limit) = dest.max_file_bytes()
        && max_bytes > limit / 5 * 4
    {
        return Err(usage(format!(
            "--max-bytes {}: {} takes files of at most {} in one piece; use at most {}",
            args.max_bytes,
            args.dest.dest,
            bytesize::ByteSize(limit),
            bytesize::ByteSize(limit / 5 * 4)
        )));
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
    let settings = settings(&args.kafka)?;
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

/// `-X KEY=VALUE` settings.
fn settings(flags: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    shiva_archiver::cli::kafka_settings(flags).map_err(usage)
}

fn extract_command(args: ExtractArgs) -> anyhow::Result<ExitCode> {
    let dest = args.archive.dest.open().map_err(usage)?;
    let topic = &args.archive.topic;
    let range = Range {
        partitions: args.partitions,
        from_offset: args.from_offset,
        to_offset: args.to_offset,
        from_time: time("--from-time", &args.from_time)?,
        to_time: time("--to-time", &args.to_time)?,
    };
    let identities = crypt::identities(&args.identity).map_err(usage)?;
    let selected = select(&dest, topic, &range)?;
    let written = if let Some(to_topic) = &args.to_topic {
        let bootstrap = args.bootstrap.as_deref().context("--to-topic needs --bootstrap")?;
        let sink = Sink::new(bootstrap, to_topic, &settings(&args.kafka)?)?;
        // Every partition the records come from must exist in the target, checked before any
        // record is sent.
        let missing: Vec<i32> = selected
            .iter()
            .filter(|(partition, entries)| !entries.is_empty() && *partition >= sink.partitions())
            .map(|(partition, _)| *partition)
            .collect();
        if !missing.is_empty() {
            return Err(usage(format!(
                "--to-topic '{to_topic}' has {} partition(s); records of partition(s) {missing:?} would have \
                 nowhere to go (records keep their partition): give it more partitions or extract fewer with --partitions",
                sink.partitions()
            )));
        }
        let written = extract(&dest, selected, &range, &identities, &mut |partition, record| {
            sink.send(topic, partition, record)
        })?;
        sink.finish()?;
        written
    } else {
        let mut out: Box<dyn std::io::Write> = match &args.output {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("--output {}", path.display()))?,
            )),
            None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        };
        let written = extract(&dest, selected, &range, &identities, &mut |partition, record| {
            match args.format {
                Format::Values => write_value(&mut out, record)?,
                Format::Jsonl => write_jsonl(&mut out, topic, partition, record)?,
            }
            Ok(())
        })?;
        out.flush().context("cannot write the output")?;
        written
    };
    tracing::info!(records = written, "extracted");
    Ok(ExitCode::SUCCESS)
}
