//! `logs`: a task's output, read back from the logs topic.
//!
//! Output is printed as the task wrote it: bytes untouched (invalid UTF-8 included), whole lines,
//! the last one without a newline when the task's output ended without one.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shiva_bus::BusConfig;
use shiva_bus::admin;
use shiva_bus::logs::LogReader;
use shiva_proto::TaskId;

use crate::{CtlError, TASK_TOPICS, invalid, no_such_task, snapshot};

/// How long one poll of the topic waits.
const POLL: Duration = Duration::from_millis(200);

/// Prints `id`'s output; with `follow`, keeps going until interrupted.
pub async fn print(
    config: &BusConfig,
    timeout: Duration,
    id: &str,
    follow: bool,
    run: Option<&str>,
    since: Option<Duration>,
) -> Result<(), CtlError> {
    let task = TaskId::new(id).map_err(invalid)?;
    if let Some(run) = run
        && (run.is_empty() || !run.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
    {
        return Err(invalid(format!("--run '{run}' is not a run id (or the start of one)")));
    }
    admin::require_topics(config, timeout).await?;
    let read_config = config.clone();
    let run = run.map(str::to_owned);
    let task_name = task.to_string();
    let printed = tokio::task::spawn_blocking(move || {
        read(&read_config, timeout, &task_name, follow, run.as_deref(), since)
    })
    .await
    .map_err(|err| CtlError::Failed(anyhow::anyhow!("the log reader failed: {err}")))??;
    if printed == 0 && !follow {
        // Nothing printed: say so when the task does not exist at all.
        let view = snapshot(config, timeout, &TASK_TOPICS).await?;
        if !view.is_defined(&task) {
            return Err(no_such_task(&task));
        }
    }
    Ok(())
}

fn read(
    config: &BusConfig,
    timeout: Duration,
    task: &str,
    follow: bool,
    run: Option<&str>,
    since: Option<Duration>,
) -> Result<u64, CtlError> {
    let mut reader = LogReader::new(config)?;
    let end = reader.end(timeout)?;
    let from_ms = since.map(|since| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.saturating_sub(since).as_millis() as i64
    });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut idle_since = std::time::Instant::now();
    loop {
        if !follow && reader.position() >= end {
            break;
        }
        let Some(line) = reader.next(POLL)? else {
            out.flush().map_err(|err| CtlError::Failed(err.into()))?;
            if !follow && idle_since.elapsed() > timeout {
                return Err(CtlError::Unreachable(format!(
                    "the logs topic stopped answering at offset {} of {end}",
                    reader.position()
                )));
            }
            continue;
        };
        idle_since = std::time::Instant::now();
        let wanted = line.task == task
            && run.is_none_or(|run| line.run.starts_with(run))
            && from_ms.is_none_or(|from| line.timestamp_ms.is_none_or(|at| at >= from));
        if !wanted {
            continue;
        }
        let written = out.write_all(&line.bytes);
        if let Err(err) = written {
            // A closed pipe (`logs … | head`) ends the command quietly.
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(printed);
            }
            return Err(CtlError::Failed(err.into()));
        }
        printed += 1;
        if follow {
            out.flush().map_err(|err| CtlError::Failed(err.into()))?;
        }
    }
    out.flush().map_err(|err| CtlError::Failed(err.into()))?;
    Ok(printed)
}
