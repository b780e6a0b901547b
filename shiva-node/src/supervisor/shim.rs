//! The node's side of the run shim (see [`crate::shim`]): starting a shim per run, renewing its
//! lease while the node is healthy, asking it to stop, learning how the run ended, cleaning up
//! after a shim that died, and stopping what a previous incarnation left.
//!
//! Each live shim has a record in `<workspace>/shims/<shim-pid>.json` with the start times of the
//! shim and its task, so leftovers are found after a restart and a reused pid is never killed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Boot;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use shiva_proto::records::ExitInfo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::spawn::{RunUser, SpawnRequest};
use crate::limits::Controllers;
use crate::logship::LogShipper;
use crate::runlog::{self, RunLog};
use crate::shim::{Attach, LeaseTimer, SHIM_ARG, ShimConfig, ShimEvent};
use crate::tree::{self, Isolation};

/// Runs whose output is kept on disk, per task.
const KEEP_RUNS: usize = 20;
/// Size of one output segment.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Segments kept per run.
const SEGMENTS: u32 = 4;
/// Longest line kept whole.
const MAX_LINE: usize = 64 * 1024;
/// Longest a shim may take to read its configuration and start the task.
const HANDSHAKE: Duration = Duration::from_secs(60);

/// Starts shims; shared by every run of the node.
#[derive(Debug)]
pub struct ShimLauncher {
    /// The shim's program (run as `<exe> __shim`, its configuration on stdin: see
    /// [`shim_program`]).
    pub exe: PathBuf,
    /// How runs are kept together.
    pub isolation: Isolation,
    /// The node's fence timeout: renewals go out four times per fence timeout (at most every
    /// second).
    pub fence_timeout: Duration,
    /// When the node's lease runs out (`None`: the node is cut off). Each renewal grants a shim
    /// the time left, so a shim's lease never outlasts the node's.
    pub lease: watch::Receiver<Option<Boot>>,
    /// Where shim records live.
    pub records: PathBuf,
    /// Memory and CPU limit controllers.
    pub controllers: Controllers,
    /// Where runs' output segments go (`<dir>/<task>/<run>.<n>.log`).
    pub logs_dir: PathBuf,
    /// Ships output to the logs topic (none in tests without a bus).
    pub shipper: Option<Arc<LogShipper>>,
    /// This node's identity and known secrets (`None`: a launcher that runs no secrets).
    pub secrets: Option<Arc<crate::secrets::SecretStore>>,
    /// The node's lease timer, passed to every shim that holds the lease (protocol 3; `None`:
    /// the kernel gave none, and the shims read the lease file).
    pub timer: Option<Arc<LeaseTimer>>,
    /// How many shims held read their renewals from the lease file (protocol 2, or no timer):
    /// the file is kept only while there is one.
    pub file_readers: Arc<watch::Sender<usize>>,
}

/// The run shim's program: `shiva-shim` beside the node's binary (a small program: each run
/// costs little memory, and it is not the file an upgrade replaces), or the node's binary
/// itself, whose `__shim` mode is the same shim.
pub fn shim_program(node: &Path) -> PathBuf {
    let beside = node.with_file_name("shiva-shim");
    if beside.is_file() { beside } else { node.to_path_buf() }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunExit {
    /// Exit code or signal (`None` when unknown: the shim died).
    pub exit: Option<ExitInfo>,
    /// Why the shim stopped it, if it did.
    pub stopped: Option<String>,
}

/// A run held by a shim.
#[derive(Debug)]
pub struct RunHandle {
    /// The task's pid (and process group).
    pub pid: u32,
    control: mpsc::UnboundedSender<String>,
    exit: oneshot::Receiver<RunExit>,
    ended: Option<RunExit>,
}

impl RunHandle {
    /// Asks the shim to stop the run (SIGTERM to the tree, SIGKILL after the grace).
    pub fn stop(&self, reason: &str) {
        if !detached() {
            let _ = self.control.send(reason.replace('\n', " "));
        }
    }

    /// A run whose end is already known.
    fn over(pid: u32, ended: RunExit) -> RunHandle {
        let (control, _) = mpsc::unbounded_channel();
        let (tx, exit) = oneshot::channel();
        let _ = tx.send(ended.clone());
        RunHandle { pid, control, exit, ended: Some(ended) }
    }

    /// Whether the run's end is known.
    fn is_over(&mut self) -> bool {
        self.ended.is_some() || !matches!(self.exit.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }

    /// Waits for the end of the run. Cancel-safe: a dropped wait loses nothing.
    pub async fn wait(&mut self) -> RunExit {
        if self.ended.is_none() {
            let lost = RunExit { exit: None, stopped: Some("the shim vanished".into()) };
            self.ended = Some((&mut self.exit).await.unwrap_or(lost));
        }
        self.ended.clone().expect("set above")
    }
}

impl Drop for RunHandle {
    /// A run nobody supervises any more (its job ended or failed) is stopped, never left alone.
    fn drop(&mut self) {
        if !self.is_over() {
            self.stop("its job on the node ended");
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    shim: u32,
    shim_start: u64,
    task: u32,
    task_start: Option<u64>,
    cgroup: Option<PathBuf>,
    #[serde(default)]
    limits: Vec<PathBuf>,
    /// What the run is, for a later process of this node that adopts it (absent: written by
    /// an older node, or a shim that cannot be adopted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<RunMeta>,
    /// When the task started (wall ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_ms: Option<i64>,
    /// Where the run's output is kept (its shipping goes on from where it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log: Option<RunLog>,
    /// Whether the task holds the node's lease.
    #[serde(default)]
    exclusive: bool,
}

/// What a run is, kept in its shim's record so that the node's next process (re-executed for
/// an upgrade, or restarted after a crash) takes it back as it was: same run, same attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    /// The task.
    pub task: String,
    /// The run's id.
    pub run: uuid::Uuid,
    /// A service's job run (its attempt, restarts and spec revision), or a periodic or
    /// one-shot run (none: the run's intent says the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRun>,
}

/// A service's run, as its job counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRun {
    /// The attempt (1 for the first start).
    pub attempt: u32,
    /// Restarts before this attempt.
    pub restarts: u32,
    /// The spec revision the run was started from.
    pub spec_revision: i64,
}

/// A run taken back from an earlier process of this node.
#[derive(Debug)]
pub struct Adopted {
    /// What it is.
    pub meta: RunMeta,
    /// When its task started (wall ms), if known.
    pub started_ms: Option<i64>,
    /// The run, held as if this process had launched it (its end may be known already).
    pub handle: RunHandle,
}

/// Set when the node detaches from its shims to re-execute itself: from then on nothing stops
/// a run or writes to a shim, whatever is dropped, so the tasks go on under their shims.
static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Leaves every run to its shim (see [`DETACHED`]): called once, before the node re-executes.
pub fn detach_all() {
    DETACHED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether the node is re-executing itself (see [`detach_all`]).
pub fn detached() -> bool {
    DETACHED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Set once the node is leaving: a launch still waiting for its shim gives up at once. Under
/// systemd a run's scope is ordered before the node's unit, so systemd holds a scope's start
/// while the node's unit is stopping: the launch would wait out its handshake for nothing.
static LEAVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The node is leaving (see [`LEAVING`]).
pub fn leave_all() {
    LEAVING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Resolves once the node is leaving.
async fn leaving() {
    while !LEAVING.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a launch needs besides the command.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The task (its output is filed and keyed by it).
    pub task: String,
    /// Names the run's cgroup and its output.
    pub run: String,
    /// Time between the stop signal and SIGKILL.
    pub grace: Duration,
    /// The stop signal's number.
    pub stop_signal: i32,
    /// Whether the run holds the node's lease (`on_disconnect: stop`); a run that does not
    /// rides out a cut from the bus, and stops only when the node stops it or dies.
    pub exclusive: bool,
    /// Run as this user (name or uid).
    pub user: Option<String>,
    /// Whether `user` may be root (`--allow-root-tasks`).
    pub allow_root: bool,
    /// Secrets decrypted into the environment and files at launch.
    pub secrets: shiva_proto::spec::SecretRefs,
    /// Memory limit in bytes.
    pub memory_max: Option<u64>,
    /// CPU limit in cores.
    pub cpu_max: Option<f64>,
    /// Files written into the working directory before the start (relative path → content).
    pub files: BTreeMap<String, String>,
    /// What the run is, for a later process of this node that adopts it (`None`: not
    /// adoptable: the shim stops its task when the node is gone).
    pub meta: Option<RunMeta>,
}

impl ShimLauncher {
    /// The time left on the node's lease (`None`: cut off).
    pub fn lease_left(&self) -> Option<Duration> {
        time_left(&self.lease)
    }

    /// Waits until the node holds a lease.
    pub async fn wait_for_lease(&self) {
        let mut lease = self.lease.clone();
        while self.lease_left().is_none() {
            // A change, or a look again now and then (the deadline may pass with no change).
            let _ = tokio::time::timeout(Duration::from_millis(100), lease.changed()).await;
        }
    }

    /// Holds a staged shim until `go` fires (`Ok`: the shim was told `go`), renewing its lease;
    /// `go` dropped, the shim gone or its pipe broken: the shim is told to stop (`Err`).
    async fn hold(
        &self,
        mut go: oneshot::Receiver<()>,
        stdin: &mut tokio::net::UnixStream,
        lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
        exclusive: bool,
    ) -> io::Result<()> {
        let every = (self.fence_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut renew = tokio::time::interval(every);
        loop {
            tokio::select! {
                fired = &mut go => {
                    if fired.is_ok() {
                        return stdin.write_all(b"go\n").await;
                    }
                    let _ = stdin.write_all(b"stop the staged start was called off\n").await;
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "the staged start was called off"));
                }
                _ = renew.tick(), if exclusive => {
                    if let Some((_, deadline)) = lease_now(&self.lease) {
                        let _ = stdin.write_all(renewal(deadline).as_bytes()).await;
                    }
                }
                event = read_event(lines) => {
                    let _ = stdin.write_all(b"stop\n").await;
                    return Err(io::Error::other(format!("the staged run shim ended before its start ({event:?})")));
                }
            }
        }
    }

    /// Starts `request` under a new shim. With `go`, a staged start: the shim makes everything
    /// ready, then the task starts when `go` fires; dropped first, nothing starts and the launch
    /// fails with [`io::ErrorKind::Interrupted`].
    pub async fn launch(
        &self,
        mut request: SpawnRequest,
        options: &LaunchOptions,
        go: Option<oneshot::Receiver<()>>,
    ) -> io::Result<RunHandle> {
        if detached() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the node is re-executing itself"));
        }
        if let Some(user) = &options.user {
            let user = RunUser::resolve(user).map_err(io::Error::other)?;
            if user.uid == 0 && !options.allow_root {
                return Err(io::Error::other(format!(
                    "user: '{}' is root, and this node runs tasks as root only with --allow-root-tasks",
                    user.name
                )));
            }
            request.user = Some(user);
        }
        let lease_ms = match (options.exclusive, lease_now(&self.lease)) {
            (false, _) => None,
            (true, Some((left, deadline))) => Some((left.as_millis() as u64, deadline.as_millis())),
            (true, None) => {
                return Err(io::Error::other(
                    "this node is cut off from the bus (fenced): exclusive runs cannot start",
                ));
            }
        };
        if let Some(parent) = request.output.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::create_dir_all(&self.records)?;
        let output = OpenOptions::new().create(true).append(true).open(&request.output)?;
        let output_path = request.output.clone();
        let secret_files = self.add_secrets(&mut request, options)?;
        self.prepare_workdir(&request, &options.files, &secret_files)?;
        // The run's cgroups are this launch's alone: a run id can come again (a periodic or
        // one-shot run's id is derived from its task and trigger), and an earlier shim of the
        // same run, stopping at the end of its lease, clears its own cgroups only.
        let launch = format!("{}.{:08x}", options.run, fastrand::u32(..));
        let cgroup = self.isolation.run_cgroup(&launch);
        let tracking = cgroup.as_deref().filter(|_| matches!(self.isolation, Isolation::CgroupV2(_)));
        let limits = self
            .controllers
            .prepare(&launch, tracking, options.memory_max, options.cpu_max)
            .map_err(io::Error::other)?;
        let config = ShimConfig {
            run: request,
            grace_ms: options.grace.as_millis() as u64,
            stop_signal: options.stop_signal,
            lease_ms: lease_ms.map(|(ms, _)| ms),
            lease_until_ms: lease_ms.map(|(_, until)| until),
            lease_length_ms: lease_ms
                .map(|_| u64::try_from(self.fence_timeout.as_millis()).unwrap_or(u64::MAX)),
            cgroup: cgroup.clone(),
            limit_cgroups: limits.cgroups.clone(),
            log: Some(self.run_log(&options.task, &options.run)),
            hold: go.is_some(),
            lease_file: lease_ms.map(|_| self.lease_file()),
            attach: options.meta.as_ref().map(|_| Attach {
                dir: self.records.clone(),
                window_ms: u64::try_from(self.fence_timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        let json = serde_json::to_string(&config).map_err(io::Error::other)?;
        let run_log = config.log.clone();
        // The configuration goes on the shim's stdin, never on its command line: a socket, on
        // which the lease timer can follow it (see `LeaseTimer`).
        // The shim puts itself in a session of its own first thing (see `shim::main`).
        let (node_end, shim_end) = std::os::unix::net::UnixStream::pair()?;
        node_end.set_nonblocking(true)?;
        let mut stdin = tokio::net::UnixStream::from_std(node_end)?;
        // Under systemd the shim starts inside a scope of its own: `systemd-run --scope` makes
        // the scope (with the limits), then executes the shim in place (same pid).
        let program: Vec<std::ffi::OsString> = match &self.isolation {
            Isolation::Systemd(scopes) => scopes.command(&launch, &limits.properties),
            _ => Vec::new(),
        };
        let mut command = match program.split_first() {
            Some((first, rest)) => {
                let mut command = tokio::process::Command::new(first);
                command.args(rest).arg(&self.exe);
                command
            }
            None => tokio::process::Command::new(&self.exe),
        };
        let mut child = command
            .arg(SHIM_ARG)
            .env_clear()
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(shim_end)))
            .stdout(Stdio::piped())
            .stderr(output)
            .spawn()?;
        let shim = child.id().unwrap_or(0);
        let shim_start = tree::start_time(shim).unwrap_or(0);
        // Recorded at once, so a cleanup meanwhile counts this shim as live.
        let record_path = self.records.join(format!("{shim}.json"));
        let record = Record {
            shim,
            shim_start,
            task: 0,
            task_start: None,
            cgroup,
            limits: limits.cgroups,
            run: options.meta.clone(),
            started_ms: None,
            log: run_log.clone(),
            exclusive: options.exclusive,
        };
        if let Err(err) = write_record(&record_path, &record) {
            // No record, no shim: a shim nobody can find again is not left running.
            let _ = child.kill().await;
            return Err(err);
        }
        // The file of the record's next version, made now: the record written at the task's
        // start (for a periodic run, when many runs of one instant start) allocates no inode.
        let _ = std::fs::File::create(crate::shim::next_name(&record_path));
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut line = json.into_bytes();
        line.push(b'\n');
        let timer = self.timer.as_deref().filter(|_| lease_ms.is_some());
        // Bounded: a shim that never reads or never answers fails the launch instead of holding
        // the job (which cannot be stopped meanwhile) for ever.
        let mut timed = false;
        let handshake = async {
            let mut written = stdin.write_all(&line).await;
            if let (Ok(()), Some(timer)) = (&written, timer) {
                written = pass_timer(&stdin, timer).await;
                timed = written.is_ok();
            }
            (written, read_event(&mut lines).await)
        };
        let (written, mut first) = tokio::select! {
            answered = tokio::time::timeout(HANDSHAKE, handshake) => answered
                .unwrap_or_else(|_| (Err(io::Error::other(format!("no answer within {HANDSHAKE:?}"))), None)),
            () = leaving() => (Err(io::Error::other("the node is leaving")), None),
        };
        let staged = go.is_some();
        if let (Some(go), Some(ShimEvent::Ready)) = (go, &first) {
            first = match self.hold(go, &mut stdin, &mut lines, options.exclusive).await {
                Ok(()) => tokio::time::timeout(HANDSHAKE, read_event(&mut lines)).await.unwrap_or(None),
                Err(err) => {
                    // Nothing was started: the shim backs out and ends; so does its record.
                    let _ = tokio::time::timeout(HANDSHAKE, child.wait()).await;
                    clean_after(&record);
                    remove_record(&record_path, record.shim);
                    return Err(err);
                }
            };
        } else if staged && let Some(ShimEvent::Started { pid, .. }) = first {
            // A shim of an older build on disk ignores `hold` and starts at once: stopped at
            // once (the whole tree, as any stop), and the staged start fails.
            let task_start = tree::start_time(pid);
            let _ = stdin.write_all(b"stop the run shim does not know staged starts\n").await;
            let ended = async {
                while !matches!(read_event(&mut lines).await, Some(ShimEvent::Exited { .. }) | None) {}
            };
            let _ = tokio::time::timeout(options.grace + Duration::from_secs(5), ended).await;
            let started = Record { task: pid, task_start, ..record.clone() };
            clean_after(&started);
            let _ = child.kill().await;
            remove_record(&record_path, record.shim);
            return Err(io::Error::other(
                "the run shim started the task before its go: it does not know staged starts (an older node binary on disk?)",
            ));
        }
        let (pid, protocol) = match first {
            Some(ShimEvent::Started { pid, protocol }) => (pid, protocol.unwrap_or(1)),
            Some(ShimEvent::Failed { error }) => {
                let _ = child.wait().await;
                remove_record(&record_path, record.shim);
                return Err(io::Error::other(error));
            }
            other => {
                // The record's tree first, while the shim still lives (its task may have been
                // forked), then the shim, then whatever was left to the node.
                clean_after(&record);
                let _ = child.kill().await;
                clean_after(&record);
                remove_record(&record_path, record.shim);
                let configuration =
                    written.err().map(|err| format!("; writing its configuration failed: {err}"));
                let configuration = match &self.isolation {
                    // systemd-run's own refusal (a scope systemd would not make) is on stderr.
                    Isolation::Systemd(_) => Some(format!(
                        "{}; the shim starts through systemd-run --scope, whose error, if any, ends {}",
                        configuration.unwrap_or_default(),
                        output_path.display()
                    )),
                    _ => configuration,
                };
                return Err(io::Error::other(format!(
                    "the run shim did not start the task ({other:?}){}",
                    configuration.unwrap_or_default()
                )));
            }
        };
        let record = Record {
            task: pid,
            task_start: tree::start_time(pid),
            started_ms: Some(shiva_proto::wall::now_ms()),
            ..record
        };
        if let Err(err) = write_record(&record_path, &record) {
            // The first record names the shim: stopped with its task.
            let _ = stdin.write_all(b"stop the node cannot record the run\n").await;
            let _ = tokio::time::timeout(options.grace + Duration::from_secs(5), child.wait()).await;
            clean_after(&record);
            let _ = child.kill().await;
            remove_record(&record_path, record.shim);
            return Err(err);
        }
        let ended = self.follow(&options.task, run_log);
        let renewals = Renewals::of(protocol, timed);
        let shim = Held { record, path: record_path, child: Some(child), ended, renewals };
        Ok(self.hold_run(shim, stdin, lines))
    }

    /// Holds a started run through its shim's lines (`writer`) and events (`lines`): renews its
    /// lease while the run is exclusive, passes the handle's stop on, learns how it ended, then
    /// cleans after it. The node's own shims (pipes) and adopted ones (their socket) alike.
    fn hold_run<W, R>(
        &self,
        shim: Held,
        mut writer: W,
        mut lines: tokio::io::Lines<BufReader<R>>,
    ) -> RunHandle
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let pid = shim.record.task;
        let (control, mut control_rx) = mpsc::unbounded_channel::<String>();
        let (exit_tx, exit) = oneshot::channel();
        let lease = self.lease.clone();
        let every = (self.fence_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        // A shim that reads the lease file or holds the timer needs no renewal lines.
        let exclusive = shim.record.exclusive && shim.renewals == Renewals::Lines;
        let reading = (shim.record.exclusive && shim.renewals == Renewals::File)
            .then(|| FileReader::new(self.file_readers.clone()));
        let Held { record, path: record_path, child, ended: ended_tx, .. } = shim;
        tokio::spawn(async move {
            let _reading = reading;
            let mut renew = tokio::time::interval(every);
            // Listening for a stop until one came or the handle is gone (a closed channel
            // would answer at once, forever).
            let mut listening = true;
            let mut stopping = false;
            let shim = record.shim;
            let ended = loop {
                tokio::select! {
                    _ = renew.tick(), if exclusive && !stopping && !detached() => {
                        if let Some((_, deadline)) = lease_now(&lease) {
                            let _ = writer.write_all(renewal(deadline).as_bytes()).await;
                        }
                    }
                    reason = control_rx.recv(), if listening => {
                        listening = false;
                        if let Some(reason) = reason.filter(|_| !detached()) {
                            stopping = true;
                            let _ = writer.write_all(format!("stop {reason}\n").as_bytes()).await;
                        }
                    }
                    event = read_event(&mut lines) => match event {
                        // Detached to re-execute: the next process learns the end from the
                        // shim's exit file; nothing is reported or cleaned here.
                        Some(ShimEvent::Exited { .. }) | None if detached() => std::future::pending().await,
                        Some(ShimEvent::Exited { code, signal, stopped }) => {
                            break RunExit { exit: Some(ExitInfo { code, signal }), stopped };
                        }
                        Some(_) => {}
                        None => {
                            warn!(shim, task = pid, "run shim died; killing what is left of its run");
                            clean_after(&record);
                            break RunExit { exit: None, stopped: Some("the run shim died".into()) };
                        }
                    },
                }
            };
            drop(writer);
            match child {
                Some(mut child) => {
                    let _ = child.wait().await;
                }
                // An adopted shim: this process's child only after a re-execution.
                None => reap_adopted(record.shim).await,
            }
            remove_record(&record_path, record.shim);
            // The shim reports the end only once the output is complete on disk.
            if let Some(ended) = ended_tx {
                let _ = ended.send(());
            }
            let _ = exit_tx.send(ended);
        });
        RunHandle { pid, control, exit, ended: None }
    }

    /// Where run `run` of `task` keeps its output; older runs of the task are pruned.
    fn run_log(&self, task: &str, run: &str) -> RunLog {
        let dir = self.logs_dir.join(task.replace('/', "%2F"));
        runlog::prune(&dir, KEEP_RUNS);
        RunLog { dir, run: run.to_owned(), segment_bytes: SEGMENT_BYTES, keep: SEGMENTS, max_line: MAX_LINE }
    }

    /// Decrypts the secrets a run names: environment variables go into `request`; files are
    /// returned for [`ShimLauncher::prepare_workdir`]. A secret that cannot be opened fails the
    /// launch, naming it (never its value).
    fn add_secrets(
        &self,
        request: &mut SpawnRequest,
        options: &LaunchOptions,
    ) -> io::Result<Vec<(String, String)>> {
        if options.secrets.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.secrets.as_ref().ok_or_else(|| io::Error::other("this node holds no secrets"))?;
        let (env, files) = store.resolve(&options.secrets).map_err(io::Error::other)?;
        request.env.extend(env);
        Ok(files)
    }

    /// Creates the working directory and writes the spec's files into it, and the secret files
    /// (mode 0600); a directory inside the node's workspace is handed to the run's user.
    fn prepare_workdir(
        &self,
        request: &SpawnRequest,
        files: &BTreeMap<String, String>,
        secret_files: &[(String, String)],
    ) -> io::Result<()> {
        let cwd = &request.cwd;
        std::fs::create_dir_all(cwd).map_err(|err| {
            io::Error::other(format!("cannot create the working directory {}: {err}", cwd.display()))
        })?;
        let owner = request.user.as_ref().map(|user| (user.uid, user.gid));
        let workspace = self.records.parent().unwrap_or(&self.records);
        let ours = cwd.starts_with(workspace);
        if let (Some((uid, gid)), true) = (owner, ours) {
            std::os::unix::fs::chown(cwd, Some(uid), Some(gid))?;
        }
        for (relative, content) in files {
            write_beneath(cwd, relative, content.as_bytes(), 0o644, owner).map_err(|err| {
                io::Error::other(format!("files.{relative}: cannot write it in {}: {err}", cwd.display()))
            })?;
        }
        for (relative, content) in secret_files {
            write_beneath(cwd, relative, content.as_bytes(), 0o600, owner).map_err(|err| {
                io::Error::other(format!(
                    "secrets.files.{relative}: cannot write it in {}: {err}",
                    cwd.display()
                ))
            })?;
        }
        Ok(())
    }

    /// The node's lease file (see [`ShimConfig::lease_file`]), beside the records directory
    /// (`<workspace>/shims.lease`).
    pub fn lease_file(&self) -> PathBuf {
        self.records.with_extension("lease")
    }

    /// Keeps the shims' renewals at the node's lease deadline while the node holds its lease:
    /// the lease timer set to it at each renewal, and, while a shim held reads the lease file,
    /// the file written (atomically) when the deadline moved a quarter lease past what it says,
    /// so that a shim that reads it at its deadline always finds the renewal there. Neither
    /// moves while the node is cut off: the shims' leases then run out.
    pub fn keep_lease(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut lease = self.lease.clone();
        let mut readers = self.file_readers.subscribe();
        let timer = self.timer.clone();
        let path = self.lease_file();
        let records = self.records.clone();
        let step = self.fence_timeout / 4;
        async move {
            let mut written: Option<Boot> = None;
            let mut timer_failed = false;
            // A file of an earlier boot says a deadline of that boot's clock: gone.
            if std::fs::metadata(&path).and_then(|meta| meta.modified()).is_ok_and(before_this_boot) {
                let _ = std::fs::remove_file(&path);
            }
            loop {
                let deadline = lease_now(&lease).map(|(_, deadline)| deadline);
                if let (Some(deadline), Some(timer)) = (deadline, &timer)
                    && let Err(err) = timer.set(deadline.as_millis())
                    && !std::mem::replace(&mut timer_failed, true)
                {
                    warn!(error = %err, "cannot set the lease timer; the shims' leases run out without it");
                }
                if *readers.borrow_and_update() == 0 {
                    // No reader left: gone (a stale deadline is no one's), written again at
                    // once when a reader comes.
                    if written.take().is_some() {
                        let _ = std::fs::remove_file(&path);
                    }
                } else if let Some(deadline) = deadline
                    && written.is_none_or(|at| deadline.saturating_since(at) >= step)
                {
                    let wrote = std::fs::create_dir_all(records.parent().unwrap_or(&records))
                        .and_then(|()| crate::shim::replace_file(&path, renewal(deadline).as_bytes()));
                    match wrote {
                        Ok(()) => written = Some(deadline),
                        Err(err) => {
                            warn!(error = %err, file = %path.display(), "cannot write the lease file; the shims' leases run out without it")
                        }
                    }
                }
                tokio::select! {
                    changed = lease.changed() => if changed.is_err() { return },
                    changed = readers.changed() => if changed.is_err() { return },
                }
            }
        }
    }

    /// Ships the output of a run of `task` kept in `log` (from where an earlier process of the
    /// node left it); the sender says the run is over.
    fn follow(&self, task: &str, log: Option<RunLog>) -> Option<oneshot::Sender<()>> {
        Some(self.shipper.as_ref()?.follow(task.to_owned(), log?))
    }

    /// Takes back the runs an earlier process of this node left to their shims (it re-executed
    /// itself for an upgrade, or died and was started again on this workspace): each live shim
    /// answers on its socket with its protocol version and task, and is held from now on as if
    /// this process had started it, its output shipped on from where it was; a run whose task
    /// ended while no node was there is returned over, with the end its shim left. What cannot
    /// be taken back (written by an older node, a protocol more than one above the node's, a
    /// task without its shim) is stopped as a leftover.
    pub async fn adopt(&self) -> Vec<Adopted> {
        let Ok(entries) = std::fs::read_dir(&self.records) else { return Vec::new() };
        let all: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        let paths: Vec<PathBuf> =
            all.iter().filter(|path| path.extension().is_some_and(|ext| ext == "json")).cloned().collect();
        // Files made ahead for a record's or an end's next version, whose shim has no record
        // (a process killed between the two, or a shim of this build under an older node).
        let recorded: BTreeSet<&str> =
            paths.iter().filter_map(|record| record.file_stem().and_then(|stem| stem.to_str())).collect();
        for path in &all {
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else { continue };
            let shim = name.strip_suffix(".json.new").or_else(|| name.strip_suffix(".exit.new"));
            if shim.is_some_and(|shim| !recorded.contains(shim)) {
                let _ = std::fs::remove_file(path);
            }
        }
        let mut adopted = Vec::new();
        for path in paths {
            let record: Option<Record> =
                std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let Some(record) = record else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            match self.take_back(&record, &path).await {
                Ok(run) => {
                    info!(task = %run.meta.task, run = %run.meta.run, shim = record.shim, pid = run.handle.pid, "took back a run left by this node's earlier process");
                    adopted.push(run);
                }
                Err(why) => {
                    info!(shim = record.shim, task = record.task, %why, "stopping a run left by an earlier process of this node");
                    kill_record(&record);
                    remove_record(&path, record.shim);
                    // This process's child after a re-execution: not left a zombie.
                    reap_adopted(record.shim).await;
                }
            }
        }
        adopted
    }

    async fn take_back(&self, record: &Record, path: &Path) -> Result<Adopted, String> {
        let meta =
            record.run.clone().ok_or("its record is of a node that did not leave runs to their shims")?;
        if record.task_start.is_none() {
            return Err("its task had not started".into());
        }
        // A shim that exited after a re-execution is this process's zombie: reaped, it is gone.
        if is_zombie(record.shim) {
            reap_adopted(record.shim).await;
        }
        if tree::start_time(record.shim) != Some(record.shim_start) {
            // The shim is gone: its task ended while no node was there, if it left the end.
            let end: Option<ShimEvent> =
                std::fs::read(self.records.join(crate::shim::exit_name(record.shim)))
                    .ok()
                    .and_then(|bytes| serde_json::from_slice(bytes.trim_ascii()).ok());
            let Some(ShimEvent::Exited { code, signal, stopped }) = end else {
                return Err("its shim is gone and left no end".into());
            };
            kill_record(record);
            remove_record(path, record.shim);
            if let Some(ended) = self.follow(&meta.task, record.log.clone()) {
                let _ = ended.send(());
            }
            let exit = RunExit { exit: Some(ExitInfo { code, signal }), stopped };
            return Ok(Adopted {
                meta,
                started_ms: record.started_ms,
                handle: RunHandle::over(record.task, exit),
            });
        }
        let name = crate::shim::socket_name(record.shim);
        let stream = crate::shim::in_dir(&self.records, &name, |path| {
            let stream = std::os::unix::net::UnixStream::connect(path)?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })
        .and_then(tokio::net::UnixStream::from_std)
        .map_err(|err| format!("its shim cannot be reached: {err}"))?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let hello = tokio::time::timeout(Duration::from_secs(2), read_event(&mut lines)).await.ok().flatten();
        let protocol = match hello {
            Some(ShimEvent::Hello { protocol, pid })
                if (1..=crate::shim::PROTOCOL + 1).contains(&protocol)
                    && pid.is_none_or(|pid| pid == record.task) =>
            {
                protocol
            }
            other => {
                return Err(format!(
                    "its shim did not answer as a shim of protocol 1 to {} of this task: {other:?}",
                    crate::shim::PROTOCOL + 1
                ));
            }
        };
        // A shim of protocol 3 gets this process's timer (the earlier one's went with it); one
        // that cannot be given it reads the lease file.
        let mut timed = false;
        if let Some(timer) = self.timer.as_deref().filter(|_| record.exclusive && protocol >= 3) {
            match pass_timer(write.as_ref(), timer).await {
                Ok(()) => timed = true,
                Err(err) => {
                    warn!(shim = record.shim, error = %err, "cannot pass the lease timer to a shim taken back; it reads the lease file")
                }
            }
        }
        let ended = self.follow(&meta.task, record.log.clone());
        let renewals = Renewals::of(protocol, timed);
        let held = Held { record: record.clone(), path: path.to_path_buf(), child: None, ended, renewals };
        let handle = self.hold_run(held, write, lines);
        Ok(Adopted { meta, started_ms: record.started_ms, handle })
    }

    /// Stops what an earlier incarnation of this node left: every recorded shim still alive
    /// (same pid and start time) with its task tree and cgroup. Returns how many runs it stopped.
    pub fn stop_leftovers(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.records) else { return 0 };
        let mut stopped = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let record: Option<Record> =
                std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
            if let Some(record) = record {
                let shim_alive = tree::start_time(record.shim) == Some(record.shim_start);
                let task_alive =
                    record.task_start.is_some() && tree::start_time(record.task) == record.task_start;
                let in_cgroups = record.cgroup.iter().chain(&record.limits).any(|cgroup| has_procs(cgroup));
                if shim_alive || task_alive || in_cgroups {
                    info!(
                        shim = record.shim,
                        task = record.task,
                        "stopping a run left by an earlier incarnation"
                    );
                    kill_record(&record);
                    stopped += 1;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        stopped
    }
}

/// A shim being held.
struct Held {
    record: Record,
    path: PathBuf,
    /// The shim process, when this process started it.
    child: Option<tokio::process::Child>,
    /// Tells the run's log follower the run is over.
    ended: Option<oneshot::Sender<()>>,
    /// How the shim learns of the lease's renewals.
    renewals: Renewals,
}

/// How a shim learns of the node's lease renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewals {
    /// `renew` lines from the node (protocol 1).
    Lines,
    /// The lease file, read at its deadline (protocol 2, or a later one given no timer).
    File,
    /// The node's lease timer (protocol 3).
    Timer,
}

impl Renewals {
    /// A shim of `protocol`, given the node's timer or not.
    fn of(protocol: u32, timed: bool) -> Renewals {
        match protocol {
            0 | 1 => Renewals::Lines,
            _ if timed && protocol >= 3 => Renewals::Timer,
            _ => Renewals::File,
        }
    }
}

/// Counts a held shim that reads the lease file, while it is held (see
/// [`ShimLauncher::keep_lease`]).
struct FileReader(Arc<watch::Sender<usize>>);

impl FileReader {
    fn new(readers: Arc<watch::Sender<usize>>) -> FileReader {
        readers.send_modify(|count| *count = count.saturating_add(1));
        FileReader(readers)
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// Whether the wall-clock time `at` is before this boot of the machine.
fn before_this_boot(at: std::time::SystemTime) -> bool {
    let since_boot = Duration::from_millis(u64::try_from(crate::shim::boottime_ms()).unwrap_or(0));
    std::time::SystemTime::now().checked_sub(since_boot).is_some_and(|boot| at < boot)
}

/// Passes `timer` to the shim at the other end of `socket` (waiting for room to write).
async fn pass_timer(socket: &tokio::net::UnixStream, timer: &LeaseTimer) -> io::Result<()> {
    use std::os::fd::AsFd;
    socket.async_io(tokio::io::Interest::WRITABLE, || crate::shim::send_timer(socket.as_fd(), timer)).await
}

/// Writes a shim record whole (beside, then renamed over): a node killed mid-write leaves the
/// previous one, never a torn one.
fn write_record(path: &Path, record: &Record) -> io::Result<()> {
    crate::shim::replace_file(path, &serde_json::to_vec(record).map_err(io::Error::other)?)
}

/// Whether `pid` is a zombie.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Removes the record of `shim` and what the shim may have left beside it.
fn remove_record(path: &Path, shim: u32) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(crate::shim::next_name(path));
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_file(dir.join(crate::shim::socket_name(shim)));
        let exit = dir.join(crate::shim::exit_name(shim));
        let _ = std::fs::remove_file(crate::shim::next_name(&exit));
        let _ = std::fs::remove_file(exit);
    }
}

/// Reaps an adopted shim if it is this process's child (after a re-execution it is: same pid);
/// otherwise its parent reaps it.
async fn reap_adopted(shim: u32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    for _ in 0..50 {
        match waitpid(nix::unistd::Pid::from_raw(shim as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => return,
        }
    }
}

/// The node's lease deadline as the shim holds it: `until <boot-time ms>`, the very deadline the
/// node's fence computed on the same clock (relative renewals were stretched by however late the
/// shim read them).
fn renewal(deadline: Boot) -> String {
    format!("until {}\n", deadline.as_millis())
}

/// The time left before `lease` runs out and its deadline (`None`: no lease, or it ran out).
fn lease_now(lease: &watch::Receiver<Option<Boot>>) -> Option<(Duration, Boot)> {
    let deadline = (*lease.borrow())?;
    let left = deadline.saturating_since(Boot::now());
    (!left.is_zero()).then_some((left, deadline))
}

/// The time left before `lease` runs out (`None`: no lease, or it ran out).
fn time_left(lease: &watch::Receiver<Option<Boot>>) -> Option<Duration> {
    lease_now(lease).map(|(left, _)| left)
}

fn has_procs(cgroup: &Path) -> bool {
    !tree::cgroup_procs(cgroup).is_empty()
}

/// SIGKILL to a recorded run: the shim's tree (if the shim is the recorded one), the task's
/// tree and group (if the task is the recorded one), its cgroup.
fn kill_record(record: &Record) {
    if tree::start_time(record.shim) == Some(record.shim_start) {
        tree::signal_tree(record.shim, None, None, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(record.shim as i32), Signal::SIGKILL);
    }
    if record.task_start.is_some() && tree::start_time(record.task) == record.task_start {
        tree::signal_tree(record.task, Some(record.task), None, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(record.task as i32), Signal::SIGKILL);
    }
    for cgroup in record.cgroup.iter().chain(&record.limits) {
        tree::clear_cgroup(cgroup);
    }
}

/// After a shim died: its task and whatever the task started are orphans. The task comes to
/// the node (a subreaper) as a child that is not a shim: kill the task's group and cgroup, then
/// every such child with its descendants. A task of a live shim is the shim's child, never the
/// node's, so it is never mistaken for one.
fn clean_after(record: &Record) {
    kill_record(record);
    // A child with no command line is in the middle of an `execve` (a shim being started, whose
    // new image has no arguments yet): not judged until a second look finds it without one.
    let mut blank = BTreeSet::new();
    for _ in 0..3 {
        let (mut strays, undecided) = orphans();
        strays.extend(undecided.intersection(&blank).copied());
        for pid in &strays {
            tree::signal_tree(*pid, None, None, Signal::SIGKILL);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        for pid in &strays {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(*pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        if strays.is_empty() && undecided.is_empty() {
            break;
        }
        blank = undecided;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children of this process that are not run shims, and those with no command line (in the
/// middle of an `execve`, or gone), which cannot be told yet.
/// A child being started as a shim has, until it execs, this process's own command line (or,
/// under systemd, `systemd-run`'s, naming the shim): it is not an orphan either.
fn orphans() -> (BTreeSet<u32>, BTreeSet<u32>) {
    let me = std::process::id();
    let own = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let (mut strays, mut undecided) = (BTreeSet::new(), BTreeSet::new());
    for pid in tree::children(me) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.is_empty() {
            undecided.insert(pid);
            continue;
        }
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let shim = args.get(1) == Some(&SHIM_ARG.as_bytes());
        // `systemd-run --scope … -- <shim> <SHIM_ARG>` until it executes the shim.
        let scoped = args.first().is_some_and(|first| first.ends_with(b"systemd-run"))
            && args.contains(&SHIM_ARG.as_bytes());
        if !shim && !scoped && cmdline != own {
            strays.insert(pid);
        }
    }
    (strays, undecided)
}

async fn read_event<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<BufReader<R>>,
) -> Option<ShimEvent> {
    loop {
        let line = lines.next_line().await.ok()??;
        if let Ok(event) = serde_json::from_str(&line) {
            return Some(event);
        }
    }
}

/// Writes `content` to `relative` (a path of normal components) inside `dir`, as `mode`, owned
/// by `owner`. The node writes as root into a directory the task owns, where the task may have
/// planted links: no symbolic link is followed and nothing outside `dir` is reached (each parent
/// is made, then opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and a file with other
/// hard links, or not a regular file, is refused before anything is truncated.
fn write_beneath(
    dir: &Path,
    relative: &str,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::fd::OwnedFd;

    use nix::errno::Errno;
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};

    let how = |flags: OFlag, mode: u32| {
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
    };
    let mut parent: OwnedFd = std::fs::File::open(dir)?.into();
    let mut parts: Vec<&str> = relative.split('/').filter(|part| !part.is_empty()).collect();
    let name = parts.pop().ok_or_else(|| io::Error::other("an empty path"))?;
    for part in parts {
        match mkdirat(&parent, part, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(err) => return Err(err.into()),
        }
        parent =
            openat2(&parent, part, how(OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)).map_err(io::Error::from)?;
    }
    let fd = openat2(&parent, name, how(OFlag::O_WRONLY | OFlag::O_CREAT, mode)).map_err(io::Error::from)?;
    let stat = fstat(&fd).map_err(io::Error::from)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG || stat.st_nlink > 1 {
        return Err(io::Error::other(
            "it is not a plain file of its own (a link, or a special file): refused",
        ));
    }
    let mut file = std::fs::File::from(fd);
    file.set_len(0)?;
    nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode)).map_err(io::Error::from)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    file.write_all(content)
}

#[cfg(test)]
mod write_tests {
    use super::write_beneath;

    #[test]
    fn files_are_written_inside_the_directory_never_through_a_link_a_task_planted() {
        let root = std::env::temp_dir().join(format!("shiva-write-beneath-{}", std::process::id()));
        let (dir, outside) = (root.join("work"), root.join("outside"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("shadow"), "keep").unwrap();

        write_beneath(&dir, "conf/db.pass", b"v1", 0o600, None).unwrap();
        write_beneath(&dir, "conf/db.pass", b"v2", 0o600, None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("conf/db.pass")).unwrap(), "v2");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("conf/db.pass")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        std::os::unix::fs::symlink(outside.join("shadow"), dir.join("file-link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("dir-link")).unwrap();
        std::fs::hard_link(outside.join("shadow"), dir.join("hard-link")).unwrap();
        for planted in ["file-link", "dir-link/shadow", "hard-link"] {
            assert!(write_beneath(&dir, planted, b"pwned", 0o600, None).is_err(), "{planted}");
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("shadow")).unwrap(),
            "keep",
            "nothing outside changed"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
