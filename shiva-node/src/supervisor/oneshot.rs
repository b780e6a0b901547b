//! One run of a periodic or one-shot task: wait for its instant, start the child, report, stop
//! it on request or when it exceeds `max_runtime`. Never restarted: what follows a run's end
//! is the leader's decision.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use shiva_proto::records::ExitInfo;
use shiva_proto::runs::{RunIntent, RunPhase, RunReport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use uuid::Uuid;

use super::job::{JobContext, launch_options, request, stop_run};
use super::launches::Launches;
use super::shim::{Adopted, RunHandle, RunMeta};

/// Requests to a run.
#[derive(Debug)]
pub enum RunControl {
    /// Stop it (or do not start it), with the reason.
    Stop(String),
}

/// Wall clock in ms since the Unix epoch (see `shiva_proto::wall`).
pub fn now_ms() -> i64 {
    shiva_proto::wall::now_ms()
}

/// Starts the run of `intent` (or goes on with it, `adopted` from the node's earlier
/// process); reports go to `reports`.
pub fn start(
    context: Arc<JobContext>,
    intent: RunIntent,
    adopted: Option<Adopted>,
    reports: mpsc::UnboundedSender<RunReport>,
) -> (mpsc::UnboundedSender<RunControl>, JoinHandle<()>) {
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let failed = report(&intent, RunPhase::Failed, None);
    let run = tokio::spawn(execute(context, intent, adopted, control_rx, reports.clone()));
    // A panic in the run fails this run ("internal error: …"), never the node.
    let handle = tokio::spawn(async move {
        if let Err(err) = run.await
            && err.is_panic()
        {
            let reason = crate::fault::internal_error(err.into_panic().as_ref());
            tracing::error!(task = %failed.task, run = %failed.run_id, %reason, "the run failed");
            let _ = reports.send(RunReport { message: Some(reason), ended_ms: Some(now_ms()), ..failed });
        }
    });
    (control_tx, handle)
}

/// A report of `intent`'s run in `state`.
pub fn report(intent: &RunIntent, state: RunPhase, message: Option<String>) -> RunReport {
    RunReport { ended_ms: state.is_final().then(now_ms), message, ..RunReport::of(intent, state) }
}

async fn execute(
    context: Arc<JobContext>,
    intent: RunIntent,
    adopted: Option<Adopted>,
    mut control: mpsc::UnboundedReceiver<RunControl>,
    reports: mpsc::UnboundedSender<RunReport>,
) {
    let send = |report: RunReport| {
        let _ = reports.send(report);
    };
    if let Some(adopted) = adopted {
        // Taken back from the node's earlier process, which wrote its start record (and, for a
        // one-shot or in a cluster with an older leader, its `running` record). Its lateness is
        // not known here: the end record leaves `late_ms` out.
        let started_ms = adopted.started_ms.unwrap_or_else(now_ms);
        info!(task = %intent.task, run = %intent.run_id, pid = adopted.handle.pid, "run taken back from the node's earlier process");
        let running = RunReport {
            pid: Some(adopted.handle.pid),
            started_ms: Some(started_ms),
            ..report(&intent, RunPhase::Running, None)
        };
        supervise(&intent, adopted.handle, running, control, send).await;
        return;
    }
    // Staged (issue 21, point 4): the shim is started now, at the run's confirmation, and
    // makes everything ready (its own exec, cgroups, working directory, output); at the instant
    // it is told `go` and forks the task. The instant's cost is a line on a socket and a fork,
    // not a process start through the node: at 50 runs a second, started at their instant, the
    // median run started 121 ms late (the floor: 25 ms).
    crate::fault::hook(crate::fault::Stage::Run, &intent.task);
    let spec = &intent.spec;
    let slot = intent.trigger.slot_ms().and_then(chrono::DateTime::from_timestamp_millis);
    let extra: Vec<(&str, String)> = slot
        .map(|slot| ("SHIVA_SLOT", slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        .into_iter()
        .collect();
    // Durable before the shim exists: a node whose machine goes down from here on leaves a
    // journal that counts the run as maybe launched (its `go` line is not synced).
    let launched = 'launch: {
        if let Err(err) = journal(&context, Launches::stage, intent.run_id).await {
            break 'launch Err(err);
        }
        let spawn = request(&context, spec, Some(intent.run_id), intent.attempt, &extra);
        let mut options = launch_options(&context, spec, &intent.run_id.to_string());
        options.meta = Some(RunMeta { task: intent.task.to_string(), run: intent.run_id, service: None });
        let (go, staged) = tokio::sync::oneshot::channel();
        let mut go = Some(go);
        let launch = context.shims.launch(spawn, &options, Some(staged));
        tokio::pin!(launch);
        let wait = Duration::from_millis(intent.launch_at_ms.saturating_sub(now_ms()).max(0) as u64);
        let instant = tokio::time::sleep(wait);
        tokio::pin!(instant);
        loop {
            tokio::select! {
                // A stop already asked for wins over the instant.
                biased;
                Some(RunControl::Stop(reason)) = control.recv(), if go.is_some() => {
                    // Nothing started: the staged shim backs out (the launch ends `Interrupted`).
                    drop(go.take());
                    let _ = launch.await;
                    send(report(&intent, RunPhase::Stopped, Some(format!("stopped before it started: {reason}"))));
                    return;
                }
                _ = &mut instant, if go.is_some() => {
                    // The node re-executes itself: the run is left unnoted, and its staged shim backs
                    // out when the node's end of its pipe closes (the launch dropped here, or the
                    // process replaced), so the next process launches it. Nothing to report: the
                    // node writes no more records.
                    if super::shim::detached() {
                        info!(task = %intent.task, run = %intent.run_id, "left to the node's next process: it re-executes itself");
                        return;
                    }
                    // Written before the task can start (the staged shim starts nothing without its
                    // `go`), in the page cache, not synced: the node's next process in this boot knows
                    // the run may have started, and one after a reboot counts every staged run so. A
                    // node that dies before this line leaves the run unnoted, and its shim backs out.
                    // On this worker when that cannot block (almost always): a hop to the
                    // blocking pool at the instant costs more than the write.
                    let noted = match context.launches.try_note(intent.run_id) {
                        Some(noted) => noted.map_err(journal_error),
                        None => journal(&context, Launches::note, intent.run_id).await,
                    };
                    if let Err(err) = noted {
                        // Nothing started: the staged shim backs out; the run fails as a launch does.
                        drop(go.take());
                        let _ = launch.as_mut().await;
                        break Err(err);
                    }
                    if let Some(go) = go.take() {
                        let _ = go.send(());
                    }
                }
                launched = &mut launch => break launched,
            }
        }
    };
    let handle = match launched {
        Ok(handle) => handle,
        Err(err) => {
            warn!(task = %spec.id, run = %intent.run_id, error = %err, "run failed to start");
            let message = format!("failed to start '{}': {err}", spec.command);
            send(report(&intent, RunPhase::Failed, Some(message)));
            return;
        }
    };
    let pid = handle.pid;
    let started_ms = now_ms();
    // `launch_at_ms` is this runner's instant for the run (see `runner::runs::launch_at`).
    let late_ms = started_ms.saturating_sub(intent.launch_at_ms);
    info!(task = %spec.id, run = %intent.run_id, attempt = intent.attempt, pid, late_ms, "run started");
    let running = RunReport {
        pid: Some(pid),
        started_ms: Some(started_ms),
        late_ms: Some(late_ms),
        ended_ms: None,
        ..report(&intent, RunPhase::Running, None)
    };
    send(running.clone());
    supervise(&intent, handle, running, control, send).await;
}

/// Writes `run` to the node's launch journal with `write`, off the async workers.
async fn journal(
    context: &Arc<JobContext>,
    write: fn(&Launches, Uuid) -> io::Result<()>,
    run: Uuid,
) -> io::Result<()> {
    let context = Arc::clone(context);
    tokio::task::spawn_blocking(move || write(&context.launches, run))
        .await
        .unwrap_or_else(|err| Err(io::Error::other(err.to_string())))
        .map_err(journal_error)
}

fn journal_error(err: io::Error) -> io::Error {
    io::Error::other(format!("cannot note the run in the node's journal: {err}"))
}

/// Holds a started run until it ends, is stopped or exceeds `max_runtime` (counted from its
/// start); reports its end.
async fn supervise(
    intent: &RunIntent,
    mut handle: RunHandle,
    running: RunReport,
    mut control: mpsc::UnboundedReceiver<RunControl>,
    send: impl Fn(RunReport),
) {
    let spec = &intent.spec;
    let limit = spec.max_runtime.unwrap_or(Duration::from_secs(100 * 365 * 24 * 3600));
    let ran = u64::try_from(now_ms().saturating_sub(running.started_ms.unwrap_or_else(now_ms))).unwrap_or(0);
    let deadline = tokio::time::sleep(limit.saturating_sub(Duration::from_millis(ran)));
    tokio::pin!(deadline);
    let (state, exit, message) = tokio::select! {
        ended = handle.wait() => {
            // The shim has killed whatever the run left.
            let exit = ended.exit;
            let state = if exit.is_some_and(|exit| exit.code == Some(0)) { RunPhase::Succeeded } else { RunPhase::Failed };
            (state, exit, ended.stopped)
        }
        _ = &mut deadline => {
            warn!(task = %spec.id, run = %intent.run_id, ?limit, "run exceeded max_runtime; stopping it");
            let exit = stop_run(&mut handle, "exceeded max_runtime").await;
            (RunPhase::TimedOut, exit, Some(format!("exceeded max_runtime {}", humantime::format_duration(limit))))
        }
        Some(RunControl::Stop(reason)) = control.recv() => {
            let exit = stop_run(&mut handle, &reason).await;
            (RunPhase::Stopped, exit, Some(reason))
        }
    };
    info!(task = %spec.id, run = %intent.run_id, state = state.as_str(), ?exit, "run ended");
    send(RunReport {
        state,
        ended_ms: Some(now_ms()),
        exit: exit.or(Some(ExitInfo { code: None, signal: None })),
        message,
        ..running
    });
}
