//! One job: a tokio task that keeps one task's run going, restarts it per its restart policy
//! (see [`super::restart`]) when it ends, reports it `failed` when the policy gives up, and stops
//! it (the whole tree, through its shim) on request.

use std::sync::Arc;
use std::time::Duration;

use shiva_proto::records::{ExitInfo, RunState, TaskStatus};
use shiva_proto::{NodeId, TaskId, TaskSpec};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use super::restart::{Decision, Restarts};
use super::shim::{Adopted, LaunchOptions, RunHandle, RunMeta, ServiceRun, ShimLauncher};
use super::spawn::SpawnRequest;
use shiva_proto::spec::OnDisconnect;

/// What every job shares.
#[derive(Debug)]
pub struct JobContext {
    /// This node's id (`SHIVA_NODE_ID`).
    pub node_id: String,
    /// Workspace root.
    pub workspace: std::path::PathBuf,
    /// `PATH` for tasks that set none.
    pub task_path: String,
    /// Starts the run shims.
    pub shims: ShimLauncher,
    /// Where status reports go.
    pub reports: mpsc::UnboundedSender<TaskStatus>,
    /// `--task-user`: who runs tasks that name no user.
    pub task_user: Option<String>,
    /// `--allow-root-tasks`.
    pub allow_root_tasks: bool,
    /// The journal of launched periodic and one-shot runs.
    pub launches: super::launches::Launches,
}

/// Requests to a running job.
#[derive(Debug)]
pub enum JobControl {
    /// Stop the child (SIGTERM to its group, SIGKILL after `stop_grace`) and end the job.
    Stop,
    /// The assignment's generation changed without changing the spec.
    Generation(u64),
    /// A staged job starts its task now, having read these nodes' words (ignored by any other
    /// job).
    Go(Vec<NodeId>),
}

struct Run {
    task: TaskId,
    generation: u64,
    run_id: Option<Uuid>,
    pid: Option<u32>,
    attempt: u32,
    restarts: u32,
    last_exit: Option<ExitInfo>,
    permanent: bool,
    after: Vec<NodeId>,
    /// A go that came while the staged job waited for something else (the lease).
    go: Option<Vec<NodeId>>,
    /// `None` while the job is staged; the words its copy started after once it starts (read
    /// by the watcher that reports a panic: a staged job says nothing).
    started: Arc<std::sync::Mutex<Option<Vec<NodeId>>>>,
}

impl Run {
    /// The copy starts (now, or at the go of a staged job) after these words.
    fn starts_after(&mut self, after: Vec<NodeId>) {
        self.after = after.clone();
        if let Ok(mut started) = self.started.lock() {
            *started = Some(after);
        }
    }

    fn report(&self, context: &JobContext, state: RunState, message: Option<String>) {
        let _ = context.reports.send(TaskStatus {
            task: self.task.clone(),
            generation: self.generation,
            state,
            run_id: self.run_id,
            pid: self.pid,
            attempt: self.attempt,
            restarts: self.restarts,
            last_exit: self.last_exit,
            message,
            permanent: self.permanent,
            after: self.after.clone(),
        });
    }
}

/// What a job starts with.
pub struct Start {
    /// The task.
    pub spec: TaskSpec,
    /// Its revision (kept with each run, for the node's next process).
    pub spec_revision: i64,
    /// The assignment's generation, kept current by the supervisor.
    pub generation: Arc<std::sync::atomic::AtomicU64>,
    /// The nodes whose word its copy starts after.
    pub after: Vec<NodeId>,
    /// Made ready, started at the supervisor's go.
    pub staged: bool,
    /// A run of the task taken back from the node's earlier process: the job goes on with it.
    pub adopted: Option<Adopted>,
}

/// Starts a job.
pub fn start(context: Arc<JobContext>, start: Start) -> (mpsc::UnboundedSender<JobControl>, JoinHandle<()>) {
    let Start { spec, spec_revision, generation, after, staged, adopted } = start;
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let task = spec.id.clone();
    let current = generation.clone();
    let generation = generation.load(std::sync::atomic::Ordering::Relaxed);
    let reports = context.reports.clone();
    let started = Arc::new(std::sync::Mutex::new((!staged).then(|| after.clone())));
    let first = First { staged, adopted, spec_revision };
    let job = tokio::spawn(run(context, spec, generation, started.clone(), first, control_rx));
    // A panic in the job fails this task on this node for good ("internal error: …",
    // permanent, so the leader leaves it there), never the node.
    let handle = tokio::spawn(async move {
        if let Err(err) = job.await
            && err.is_panic()
        {
            let reason = crate::fault::internal_error(err.into_panic().as_ref());
            tracing::error!(%task, %reason, "the task's job failed");
            // A staged job never started: its status would overwrite the words it waited for.
            let Some(after) = started.lock().ok().and_then(|started| started.clone()) else { return };
            let _ = reports.send(TaskStatus {
                task,
                // The generation the supervisor holds now (it may have changed since the start).
                generation: current.load(std::sync::atomic::Ordering::Relaxed),
                state: RunState::Failed,
                run_id: None,
                pid: None,
                attempt: 0,
                restarts: 0,
                last_exit: None,
                message: Some(reason),
                permanent: true,
                after,
            });
        }
    });
    (control_tx, handle)
}

/// What to spawn for a run of `spec`: its command in a clean environment with the `SHIVA_*`
/// variables (and `extra` ones), in its working directory, output appended to the task's log.
pub(crate) fn request(
    context: &JobContext,
    spec: &TaskSpec,
    run_id: Option<Uuid>,
    attempt: u32,
    extra: &[(&str, String)],
) -> SpawnRequest {
    let mut env: Vec<(String, String)> = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if !spec.env.contains_key("PATH") {
        env.push(("PATH".into(), context.task_path.clone()));
    }
    env.push(("SHIVA_TASK_ID".into(), spec.id.to_string()));
    if let Some(instance) = spec.id.instance() {
        env.push(("SHIVA_INSTANCE".into(), instance.to_owned()));
    }
    env.push(("SHIVA_RUN_ID".into(), run_id.map(|id| id.to_string()).unwrap_or_default()));
    env.push(("SHIVA_NODE_ID".into(), context.node_id.clone()));
    env.push(("SHIVA_ATTEMPT".into(), attempt.to_string()));
    env.extend(extra.iter().map(|(key, value)| ((*key).to_owned(), value.clone())));
    let cwd = match &spec.workdir {
        Some(dir) => dir.into(),
        None => context.workspace.join("tasks").join(spec.id.as_str()),
    };
    let output =
        context.workspace.join("output").join(format!("{}.log", spec.id.as_str().replace('/', "%2F")));
    SpawnRequest {
        program: spec.command.clone(),
        args: spec.args.clone(),
        env,
        cwd,
        output,
        user: None,
        rlimits: spec.rlimits.iter().map(|(name, value)| (name.clone(), *value)).collect(),
    }
}

/// How to launch a run of `spec` named `run`.
pub(crate) fn launch_options(context: &JobContext, spec: &TaskSpec, run: &str) -> LaunchOptions {
    LaunchOptions {
        task: spec.id.to_string(),
        run: run.to_owned(),
        grace: spec.stop_grace,
        stop_signal: spec.stop_signal_number(),
        exclusive: spec.on_disconnect == OnDisconnect::Stop,
        user: spec.user.clone().or_else(|| context.task_user.clone()),
        allow_root: context.allow_root_tasks,
        secrets: spec.secrets.clone(),
        memory_max: spec.memory_max_bytes(),
        cpu_max: spec.cpu_max.map(|cores| cores.0),
        files: spec.files.clone(),
        meta: None,
    }
}

/// Waits until the node holds a lease, unless a stop arrives first (true).
async fn wait_lease_or_stop(
    context: &JobContext,
    control: &mut mpsc::UnboundedReceiver<JobControl>,
    run: &mut Run,
) -> bool {
    if context.shims.lease_left().is_some() {
        return false;
    }
    info!(task = %run.task, "waiting for this node to read itself on the bus before starting");
    until_or_stop(control, run, context.shims.wait_for_lease()).await
}

/// How a job's first run comes.
struct First {
    staged: bool,
    adopted: Option<Adopted>,
    spec_revision: i64,
}

async fn run(
    context: Arc<JobContext>,
    spec: TaskSpec,
    generation: u64,
    started: Arc<std::sync::Mutex<Option<Vec<NodeId>>>>,
    first: First,
    mut control: mpsc::UnboundedReceiver<JobControl>,
) {
    let First { mut staged, mut adopted, spec_revision } = first;
    crate::fault::hook(crate::fault::Stage::Run, &spec.id);
    let mut run = Run {
        task: spec.id.clone(),
        generation,
        run_id: None,
        pid: None,
        attempt: 0,
        restarts: 0,
        last_exit: None,
        permanent: false,
        after: started.lock().ok().and_then(|started| started.clone()).unwrap_or_default(),
        go: None,
        started,
    };
    let mut restarts = Restarts::new(&spec);
    loop {
        let mut started = Instant::now();
        let launched = if let Some(adopted) = adopted.take() {
            // Taken back from the node's earlier process: the same run goes on.
            if let Some(service) = adopted.meta.service {
                run.attempt = service.attempt;
                run.restarts = service.restarts;
            }
            run.run_id = Some(adopted.meta.run);
            info!(task = %spec.id, pid = adopted.handle.pid, attempt = run.attempt, "task taken back from the node's earlier process");
            Ok(adopted.handle)
        } else {
            if spec.on_disconnect == OnDisconnect::Stop
                && wait_lease_or_stop(&context, &mut control, &mut run).await
            {
                // A staged job says nothing: its status would overwrite the words it waits for.
                if !staged {
                    run.report(&context, RunState::Stopped, None);
                }
                return;
            }
            run.attempt += 1;
            run.run_id = Some(Uuid::new_v4());
            if !staged {
                run.report(&context, RunState::Starting, None);
            }
            let spawn = request(&context, &spec, run.run_id, run.attempt, &[]);
            let name = run.run_id.map(|id| id.to_string()).unwrap_or_default();
            let mut options = launch_options(&context, &spec, &name);
            options.meta = run.run_id.map(|id| RunMeta {
                task: spec.id.to_string(),
                run: id,
                service: Some(ServiceRun { attempt: run.attempt, restarts: run.restarts, spec_revision }),
            });
            if std::mem::take(&mut staged) {
                match staged_launch(&context, spawn, &options, &mut control, &mut run).await {
                    Some((launched, went)) => {
                        started = went;
                        launched
                    }
                    None => return,
                }
            } else {
                context.shims.launch(spawn, &options, None).await
            }
        };
        let (ended, note) = match launched {
            Ok(mut handle) => {
                let pid = handle.pid;
                run.pid = Some(pid);
                // How long the shim took to start it (cgroup moves, exec): part of every start.
                let launch_ms = started.elapsed().as_secs_f64() * 1e3;
                info!(task = %spec.id, pid, attempt = run.attempt, generation = run.generation, launch_ms, "task started");
                run.report(&context, RunState::Running, None);
                let ended = loop {
                    tokio::select! {
                        ended = handle.wait() => break ended,
                        message = control.recv() => match message {
                            Some(JobControl::Generation(generation)) => {
                                run.generation = generation;
                                run.report(&context, RunState::Running, None);
                            }
                            Some(JobControl::Go(_)) => {}
                            Some(JobControl::Stop) | None => {
                                run.report(&context, RunState::Stopping, None);
                                run.last_exit = stop_run(&mut handle, "the task is stopping").await;
                                run.pid = None;
                                info!(task = %spec.id, pid, exit = ?run.last_exit, "task stopped");
                                run.report(&context, RunState::Stopped, None);
                                return;
                            }
                        },
                    }
                };
                // The shim has killed whatever the task left, so a restart never runs beside it.
                run.last_exit = ended.exit;
                run.pid = None;
                (ended.exit, ended.stopped)
            }
            Err(err) => {
                warn!(task = %spec.id, error = %err, "task failed to start");
                (None, Some(format!("failed to start '{}': {err}", spec.command)))
            }
        };
        let jitter = fastrand::f64() * 2.0 - 1.0;
        match restarts.on_end(Instant::now().into_std(), started.elapsed(), ended, jitter) {
            Decision::Restart(delay) => {
                info!(task = %spec.id, exit = ?ended, retry_in = ?delay, "task ended, restarting after back-off");
                run.report(&context, RunState::Backoff, note.clone());
                if wait_or_stop(&mut control, &mut run, delay).await {
                    run.report(&context, RunState::Stopped, note);
                    return;
                }
                run.restarts += 1;
            }
            Decision::GiveUp(reason) | Decision::Permanent(reason) => {
                run.permanent = ended
                    .and_then(|exit| exit.code)
                    .is_some_and(|code| spec.permanent_exit_codes.contains(&code));
                let message = match note {
                    Some(note) => format!("{reason} (last: {note})"),
                    None => reason,
                };
                warn!(task = %spec.id, exit = ?ended, %message, "task failed on this node");
                run.report(&context, RunState::Failed, Some(message.clone()));
                // Failed for good here: wait for the leader to move or stop it.
                loop {
                    match control.recv().await {
                        Some(JobControl::Generation(generation)) => {
                            run.generation = generation;
                            run.report(&context, RunState::Failed, Some(message.clone()));
                        }
                        Some(JobControl::Go(_)) => {}
                        Some(JobControl::Stop) | None => return,
                    }
                }
            }
        }
    }
}

/// A staged start: the shim is made ready at once and the task starts at the supervisor's
/// `Go`. Returns the launch and the instant of the go; `None` when a stop came first (nothing
/// started, nothing to report). A stop after the go stays queued for the run's loop.
async fn staged_launch(
    context: &JobContext,
    spawn: SpawnRequest,
    options: &LaunchOptions,
    control: &mut mpsc::UnboundedReceiver<JobControl>,
    run: &mut Run,
) -> Option<(std::io::Result<RunHandle>, Instant)> {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let mut go_tx = Some(go_tx);
    let mut went: Option<Instant> = None;
    // A go that came while the job waited for the lease.
    if let Some(after) = run.go.take() {
        run.starts_after(after);
        let _ = go_tx.take().map(|go| go.send(()));
        went = Some(Instant::now());
    }
    let launch = context.shims.launch(spawn, options, Some(go_rx));
    tokio::pin!(launch);
    let launched = loop {
        tokio::select! {
            launched = &mut launch => break launched,
            message = control.recv(), if went.is_none() && go_tx.is_some() => match message {
                Some(JobControl::Go(after)) => {
                    run.starts_after(after);
                    let _ = go_tx.take().map(|go| go.send(()));
                    went = Some(Instant::now());
                }
                Some(JobControl::Generation(generation)) => run.generation = generation,
                // Dropping the sender calls the start off.
                Some(JobControl::Stop) | None => go_tx = None,
            },
        }
    };
    if let Some(went) = went {
        return Some((launched, went));
    }
    match launched {
        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => None,
        // Never without a go; were it so, the run is stopped, not left without a job.
        Ok(mut handle) => {
            stop_run(&mut handle, "started without its go").await;
            None
        }
        // Staging failed before the go (the shim died, a cgroup could not be made): reported,
        // and retried, only once the task may start.
        other => loop {
            match control.recv().await {
                Some(JobControl::Go(after)) => {
                    run.starts_after(after);
                    return Some((other, Instant::now()));
                }
                Some(JobControl::Generation(generation)) => run.generation = generation,
                Some(JobControl::Stop) | None => return None,
            }
        },
    }
}

/// Sleeps `delay` unless a stop arrives first (true).
async fn wait_or_stop(
    control: &mut mpsc::UnboundedReceiver<JobControl>,
    run: &mut Run,
    delay: Duration,
) -> bool {
    until_or_stop(control, run, tokio::time::sleep(delay)).await
}

/// Waits for `done` unless a stop arrives first (true); follows generation changes meanwhile.
async fn until_or_stop(
    control: &mut mpsc::UnboundedReceiver<JobControl>,
    run: &mut Run,
    done: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = &mut done => return false,
            message = control.recv() => match message {
                Some(JobControl::Generation(generation)) => run.generation = generation,
                // Kept for a staged job's launch, which follows.
                Some(JobControl::Go(after)) => run.go = Some(after),
                Some(JobControl::Stop) | None => return true,
            },
        }
    }
}

/// Stops a run through its shim (SIGTERM to the tree, SIGKILL after the grace); its exit.
pub(crate) async fn stop_run(handle: &mut RunHandle, reason: &str) -> Option<ExitInfo> {
    handle.stop(reason);
    handle.wait().await.exit
}
