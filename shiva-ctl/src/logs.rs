//! `logs`: a task's output, read back from the logs topic.
//!
//! Output is printed as the task wrote it: bytes untouched (invalid UTF-8 included), whole lines,
//! the last one without a newline when the task's output ended without one.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shiva_bus::BusConfig;
use shiva_bus::admin;
use shiva_bus::logs::{self, LogFilter, Scanned};
use shiva_proto::TaskId;

use crate::{CtlError, TASK_TOPICS, invalid, no_such_task, snapshot};

/// What `logs` prints: one task's output, with the flags of the command.
#[derive(Debug, Clone)]
pub struct Request {
    /// Task id.
    pub id: String,
    /// Keep printing new output.
    pub follow: bool,
    /// Only this run (or runs starting so).
    pub run: Option<String>,
    /// Only output from the last D.
    pub since: Option<Duration>,
    /// JSON Lines.
    pub json: bool,
    /// Only the last N lines.
    pub tail: Option<usize>,
}

/// Prints the output `request` asks for; with `follow`, keeps going until interrupted.
pub async fn print(config: &BusConfig, timeout: Duration, request: Request) -> Result<(), CtlError> {
    let task = TaskId::new(&request.id).map_err(invalid)?;
    if let Some(run) = &request.run
        && (run.is_empty() || !run.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
    {
        return Err(invalid(format!("--run '{run}' is not a run id (or the start of one)")));
    }
    admin::require_topics(config, timeout).await?;
    let read_config = config.clone();
    let follow = request.follow;
    let printed = tokio::task::spawn_blocking(move || read(&read_config, timeout, &request))
        .await
        .map_err(|err| CtlError::Failed(anyhow::anyhow!("the log reader failed: {err}")))??;
    if printed == 0 && !follow {
        // Nothing printed: say so when the task does not exist at all.
        let view = snapshot(config, timeout, &TASK_TOPICS).await?;
        if !view.is_defined(&task) {
            return Err(no_such_task(&task));
        }
        let instances = shiva_proto::rows::instances_of(&view, &task);
        if let Some(first) = instances.first() {
            return Err(CtlError::Failed(anyhow::anyhow!(
                "'{task}' runs as {} instance(s), each with its own output: shiva-ctl logs {first}",
                instances.len()
            )));
        }
    }
    Ok(())
}

fn read(config: &BusConfig, timeout: Duration, request: &Request) -> Result<u64, CtlError> {
    let Request { id: task, follow, run, since, json, tail } = request.clone();
    let from_ms = since.map(|since| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.saturating_sub(since).as_millis() as i64
    });
    let mut filter = LogFilter { task, run, from_ms, from_offset: None };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let write = |out: &mut std::io::BufWriter<_>, chunk: &shiva_bus::logs::LoggedChunk| {
        if json { write_json_lines(out, chunk) } else { out.write_all(&chunk.bytes) }
    };
    let mut failed = None;
    let mut printed = 0;
    if let Some(lines) = tail {
        // The end only: read backwards from the topic's end, then follow from there.
        let logs::Tail { chunks, end, .. } = logs::tail(config, timeout, &filter, lines)?;
        printed = chunks.len() as u64;
        failed = chunks.iter().try_for_each(|chunk| write(&mut out, chunk)).and_then(|()| out.flush()).err();
        if !follow || failed.is_some() {
            return finish(out, failed, printed);
        }
        filter.from_offset = Some(end);
    }
    printed += logs::scan(config, timeout, &filter, follow, |seen| {
        let written = match seen {
            Scanned::Idle => out.flush(),
            Scanned::Passed => Ok(()),
            Scanned::Chunk(chunk) => {
                let written = write(&mut out, chunk);
                if follow { written.and_then(|()| out.flush()) } else { written }
            }
        };
        match written {
            Ok(()) => ControlFlow::Continue(()),
            Err(err) => {
                failed = Some(err);
                ControlFlow::Break(())
            }
        }
    })?;
    finish(out, failed, printed)
}

/// Flushes `out`; a closed pipe (`logs … | head`) ends the command quietly.
fn finish(mut out: impl Write, failed: Option<std::io::Error>, printed: u64) -> Result<u64, CtlError> {
    match failed {
        // A closed pipe (`logs … | head`) ends the command quietly.
        Some(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(printed),
        Some(err) => return Err(CtlError::Failed(err.into())),
        None => {}
    }
    out.flush().map_err(|err| CtlError::Failed(err.into()))?;
    Ok(printed)
}

/// A chunk as JSON Lines: one object per line of output.
fn write_json_lines(out: &mut impl Write, chunk: &shiva_bus::logs::LoggedChunk) -> std::io::Result<()> {
    for line in chunk.bytes.split_inclusive(|byte| *byte == b'\n') {
        let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line));
        let object = serde_json::json!({
            "offset": chunk.offset,
            "at_ms": chunk.timestamp_ms,
            "run": chunk.run,
            "stream": chunk.stream,
            "node": chunk.node,
            "line": text,
            "newline": line.ends_with(b"\n"),
        });
        writeln!(out, "{object}")?;
    }
    Ok(())
}
