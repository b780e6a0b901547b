//! The node's life: create and check the topics, read the log, make sure no live node uses
//! this id, then heartbeat, elect, lead, run tasks; on shutdown resign, stop tasks, leave.

mod api;
mod driver;
mod fence;
mod heartbeat;
mod pace;
mod runs;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shiva_bus::logs::{self, LogSink};
use shiva_bus::{BusError, Cleaner, Durability, Publisher, Reader, ReaderEvent, admin};
use shiva_proto::records::{Body, Leave, Resign, TaskStatus};
use shiva_proto::runs::RunReport;
use shiva_proto::topics::key;
use shiva_proto::{LogView, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::config::NodeConfig;
use crate::election::Election;
use crate::limits::Controllers;
use crate::logship::LogShipper;
use crate::membership::Membership;
use crate::supervisor::Supervisor;
use crate::supervisor::job::JobContext;
use crate::supervisor::shim::ShimLauncher;
use crate::tree::Isolation;
use driver::Node;
use fence::Fence;
pub use fence::returned_confirmed;
use heartbeat::{Gate, Identity, ResourceProbe};

/// How the node's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It left the cluster (its runs stopped).
    Left,
    /// It detached from its runs, which go on under their shims, to re-execute its binary: the
    /// caller does it at once (see [`Reload`]).
    Reexec,
}

/// The node's reload (`kill -HUP`, a unit's `reload`): re-execute the binary at `exe` in place,
/// leaving every run to its shim; the next process takes them back.
#[derive(Debug, Clone)]
pub struct Reload {
    /// Notified for each request.
    pub requested: Arc<tokio::sync::Notify>,
    /// The binary, by the path it was started from (a new binary installed there is the one
    /// that runs next).
    pub exe: std::path::PathBuf,
}

/// Runs the node until `shutdown` is cancelled (then leaves the cluster in order), a reload is
/// asked for and the new binary answers (then detaches: [`Ending::Reexec`]) or a fatal error
/// occurs.
pub async fn run(
    mut config: NodeConfig,
    shutdown: CancellationToken,
    reload: Reload,
) -> anyhow::Result<Ending> {
    if config.runner && config.task_user.is_none() && nix::unistd::geteuid().is_root() {
        warn!("this node runs as root without --task-user: tasks that name no user run as root");
    }
    if config.authorized_keys.is_none() {
        warn!(
            "no --authorized-keys: the cluster is open, anyone who can write to its commands topic commands it"
        );
    }
    std::fs::create_dir_all(&config.workspace)
        .with_context(|| format!("failed to create the workspace {}", config.workspace.display()))?;
    // Before anything touches a process: a second node on this workspace refuses here.
    let (mut workspace_lock, previous) = lock_workspace(&config.workspace, config.incarnation)?;
    // A previous process that did not leave (it re-executed itself, or died) may have left runs
    // to their shims: this one is the same incarnation, back, and takes them back. One that
    // left is replaced by a new incarnation.
    let (replaces, resumes) = match previous {
        Some(Previous { incarnation, left: false }) => {
            config.incarnation = incarnation;
            (None, true)
        }
        Some(Previous { incarnation, left: true }) => (Some(incarnation), false),
        None => (None, false),
    };
    write_lock(&mut workspace_lock, config.incarnation, false)?;
    info!(
        node = %config.node_id,
        incarnation = %config.incarnation,
        resumes,
        cluster = config.bus.topics.cluster(),
        bus = %config.bus.brokers,
        leader_capable = config.leader_capable,
        runner = config.runner,
        "starting"
    );
    let secrets = std::sync::Arc::new(crate::secrets::SecretStore::open(&config.workspace)?);
    if let Some(previous) = replaces {
        info!(%previous, "this workspace's previous node has exited: its incarnation is replaced by this one");
    }
    let metrics = Arc::new(crate::api::Metrics::new(
        config.node_id.as_str(),
        config.bus.topics.cluster(),
        env!("CARGO_PKG_VERSION"),
    ));
    let (snapshots, snapshot_rx) = tokio::sync::watch::channel(Arc::new(crate::api::Snapshot::default()));
    let (api_requests, mut api_rx) = mpsc::channel(64);
    // The HTTP server answers from the start (`/healthz`; `/readyz` says when the node is ready)
    // and stops with the node.
    let server_stop = shutdown.child_token();
    let _server_stop = server_stop.clone().drop_guard();
    if let Some(addr) = config.http {
        let listener = crate::api::bind(addr, &config.workspace.join("http.addr")).await?;
        if !addr.ip().is_loopback() && config.api_tokens.is_none() {
            warn!(%addr, "the HTTP API listens beyond this host without --api-tokens: anyone who reaches it reads the cluster (writes stay off)");
        }
        let server = crate::api::Server {
            listener,
            snapshot: snapshot_rx,
            requests: api_requests,
            metrics: metrics.clone(),
            tokens: config.api_tokens.clone(),
            bus: config.bus.clone(),
        };
        tokio::spawn(server.serve(server_stop));
    }
    if !ensure_topics(&config, &shutdown).await? {
        return Ok(Ending::Left);
    }
    // The file bus is cleaned by its nodes (Kafka's broker cleans its own topics).
    let _cleaner = Cleaner::start(&config.bus, config.log_retention)?;
    let (events_tx, mut events) = mpsc::channel(8192);
    let reader = Reader::spawn(&config.bus, &TopicKind::ALL, events_tx)?;
    let (results, mut results_rx) = mpsc::unbounded_channel();
    let (reports, mut reports_rx) = mpsc::unbounded_channel::<TaskStatus>();
    let (run_reports, mut run_reports_rx) = mpsc::unbounded_channel::<RunReport>();
    let (lease, lease_rx) = tokio::sync::watch::channel(None);
    let sink = LogSink::new(&config.bus, config.node_id.as_str())?;
    let shipper = Arc::new(LogShipper::new(sink, config.log_rate).with_metrics(metrics.clone()).with_watch());
    let supervisor = if config.runner {
        // Orphans of a run whose shim died come to the node, which kills them.
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER failed")?;
        let node_id = config.node_id.as_str().to_owned();
        // Off the runtime's workers: the systemd probe waits for systemd.
        let isolation = tokio::task::spawn_blocking(move || Isolation::detect(&node_id))
            .await
            .context("detecting how runs are isolated")?;
        info!(isolation = %isolation.describe(), "runs are isolated by");
        if let Isolation::CgroupV2(dir) = &isolation {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            if crate::tree::favours_dynmods(&mountinfo, dir) == Some(false) {
                info!(
                    cgroup = %dir.display(),
                    "cgroup v2 is mounted without favordynmods: a run start that is not staged waits for \
                     an RCU grace period while its shim moves into the run's cgroup (8 to 25 ms \
                     measured); see docs/operations.md"
                );
            }
        }
        let v2 = match &isolation {
            Isolation::CgroupV2(dir) => Some(dir.clone()),
            _ => None,
        };
        let controllers = match &isolation {
            Isolation::Systemd(scopes) => Controllers::systemd(scopes.unified),
            _ => Controllers::detect(config.node_id.as_str(), v2.as_deref()),
        };
        info!(limits = %controllers.describe(), "memory and CPU limits are enforced by");
        let shims = ShimLauncher {
            exe: crate::supervisor::shim::shim_program(
                &std::env::current_exe().context("cannot find the node's own executable for the run shim")?,
            ),
            isolation,
            fence_timeout: config.fence_timeout,
            lease: lease_rx,
            records: config.workspace.join("shims"),
            controllers,
            logs_dir: config.workspace.join("logs"),
            shipper: Some(shipper.clone()),
            secrets: Some(secrets.clone()),
            timer: match crate::shim::LeaseTimer::new() {
                Ok(timer) => Some(Arc::new(timer)),
                Err(err) => {
                    warn!(error = %err, "no lease timer for the run shims: they read the lease file");
                    None
                }
            },
            file_readers: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let supervisor = Supervisor::new(JobContext {
            node_id: config.node_id.to_string(),
            workspace: config.workspace.clone(),
            task_path: config.task_path.clone(),
            shims,
            reports,
            task_user: config.task_user.clone(),
            allow_root_tasks: config.allow_root_tasks,
            launches: crate::supervisor::launches::Launches::new(&config.workspace),
        });
        tokio::spawn(supervisor.context().shims.keep_lease());
        Some(supervisor)
    } else {
        None
    };
    let identity = Identity {
        hostname: config.hostname.clone(),
        tags: config.tags.clone(),
        leader_capable: config.leader_capable,
        runner: config.runner,
        interval: config.heartbeat_interval,
        fence_timeout: config.fence_timeout,
        replaces,
        authorized_keys: config.authorized_keys.as_ref().map(|(text, _)| text.clone()),
        recipient: Some(secrets.recipient().to_owned()),
    };
    let outbox = driver::Outbox::new(
        Publisher::new(&config.bus, "writes")?,
        // A heartbeat lost in a power cut harms nothing: the cut stops this host's nodes too.
        Publisher::with_durability(&config.bus, "heartbeats", Durability::Written)?,
        results,
    );
    let mut node = Node {
        identity,
        view: LogView::with_policy(config.authorized_keys.as_ref().map(|(_, policy)| policy.clone())),
        membership: Membership::new(config.node_id.clone(), config.incarnation),
        election: Election::new(config.node_id.clone(), config.incarnation, config.leader_capable),
        supervisor,
        reader,
        outbox,
        own: driver::OwnStatus::default(),
        leadership: driver::Leadership::default(),
        runs: driver::Runs::new(run_reports),
        gate: Gate::default(),
        clock_samples: Default::default(),
        resources: ResourceProbe::new(),
        next_token: 0,
        ready: false,
        probing: false,
        impostor: None,
        last_reader_error: None,
        lease,
        fence: Fence::new(config.fence_timeout),
        shipper: Some(shipper),
        secrets: secrets.clone(),
        stuck_secrets: Default::default(),
        api: api::Api::new(metrics, snapshots),
        pace: pace::Pace::default(),
        config,
    };

    if !read_to_end(&mut node, &mut events, &shutdown).await? {
        return Ok(Ending::Left);
    }
    info!(
        tasks = node.view.specs.len(),
        nodes = node.view.heartbeats.len(),
        epoch = node.view.epochs.newest,
        "read the log to its end"
    );
    if !check_node_id(&mut node, &mut events, &shutdown).await? {
        return Ok(Ending::Left);
    }
    if resumes {
        // The same incarnation back after a silence: one more return from its fence (so no
        // exclusive work starts before the leader has seen it again).
        let me = &node.config.node_id;
        let own = node.view.heartbeats.get(me).filter(|entry| entry.incarnation == node.config.incarnation);
        node.fence.resume_after(own.map_or(0, |entry| entry.heartbeat.returns));
    }
    // Only now, with the workspace locked and no live node using this id, may what an earlier
    // process left be taken back or stopped.
    if let Some(supervisor) = &mut node.supervisor {
        let context = supervisor.context();
        // What the previous process launched (the rest of its start records it never acted
        // on); the journal then keeps only runs still open.
        node.runs.launched_before = if resumes { context.launches.read() } else { None };
        let open: std::collections::BTreeSet<Uuid> =
            node.view.open_runs.iter().map(|(_, run)| *run).collect();
        if let Err(err) = context.launches.retain(|run| open.contains(run)) {
            warn!(error = %err, "cannot write the journal of launched runs");
        }
        node.runs.journal_pruned = Some(std::time::Instant::now());
        if resumes {
            let (services, runs): (Vec<_>, Vec<_>) =
                context.shims.adopt().await.into_iter().partition(|run| run.meta.service.is_some());
            if !services.is_empty() || !runs.is_empty() {
                info!(
                    services = services.len(),
                    runs = runs.len(),
                    "took back the runs of this node's earlier process"
                );
            }
            supervisor.adopt(services);
            node.runs.adopted = runs.into_iter().map(|run| (run.meta.run, run)).collect();
        } else {
            let left = tokio::task::block_in_place(|| context.shims.stop_leftovers());
            if left > 0 {
                warn!(runs = left, "stopped runs left by an earlier incarnation of this node");
            }
        }
    }
    node.ready = true;
    node.api.ready_at_ms = Some(shiva_proto::wall::now_ms());

    let mut ticker = tokio::time::interval(node.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reexec = false;
    // The new binary's check runs beside the loop: the node heartbeats meanwhile.
    let mut checking: Option<tokio::task::JoinHandle<bool>> = None;
    // An own heartbeat was read back (and stepped on) since the last tick.
    let mut read_own = false;
    loop {
        let woke = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = reload.requested.notified(), if checking.is_none() => {
                let exe = reload.exe.clone();
                let identity = crate::config::Identity::of(&node.config);
                checking = Some(tokio::spawn(async move { answers(&exe, &identity).await }));
                continue;
            }
            answered = async { checking.as_mut().expect("checked").await }, if checking.is_some() => {
                checking = None;
                if answered.unwrap_or(false) {
                    reexec = true;
                    break;
                }
                continue;
            }
            event = events.recv() => {
                let Some(event) = event else { bail!("the bus reader stopped") };
                Wake::Read(event)
            }
            Some(result) = results_rx.recv() => Wake::Written(result),
            Some(status) = reports_rx.recv() => Wake::JobStatus(status),
            Some(report) = run_reports_rx.recv() => Wake::RunReport(report),
            Some(request) = api_rx.recv() => Wake::Api(request),
            _ = ticker.tick() => Wake::Heartbeat,
            _ = tokio::time::sleep(node.runs.run_wake.unwrap_or(Duration::from_secs(3600))) => Wake::Runs,
            _ = tokio::time::sleep(node.api.wake.unwrap_or(Duration::from_secs(3600))) => Wake::Snapshot,
        };
        // The lease first, before anything read or sent on this wake: a node frozen past its
        // lease would otherwise send a heartbeat on the thaw, read it back at once (the file bus
        // answers in a millisecond) and renew the lease without ever seeing it had ended, nor
        // reading the log to its end before it acts again.
        node.look_at_fence();
        // A wake for a due snapshot or an API request alone steps nothing: the decisions' inputs
        // did not change.
        let step = match woke {
            Wake::Read(event) => {
                read_own |= node.is_own_heartbeat(&event);
                node.on_reader_event(event)?;
                true
            }
            Wake::Written(result) => {
                let quiet = result.is_quiet();
                node.on_write_result(result);
                !quiet
            }
            Wake::JobStatus(status) => {
                node.on_job_status(status);
                true
            }
            Wake::RunReport(report) => {
                node.on_run_report(report);
                true
            }
            Wake::Api(request) => {
                node.on_api_request(request);
                false
            }
            Wake::Heartbeat => {
                node.heartbeat();
                // The read-back of the previous heartbeat stepped already, with the newest log
                // time; this one's read-back, in a moment, steps next. Without one since the
                // last tick (the bus down, a slow read), the tick steps: the clock of the
                // time-based decisions.
                !std::mem::take(&mut read_own)
            }
            Wake::Runs => true,
            Wake::Snapshot => false,
        };
        if step {
            // Take in everything already waiting, then decide once: a step walks every task.
            loop {
                if let Ok(event) = events.try_recv() {
                    read_own |= node.is_own_heartbeat(&event);
                    node.on_reader_event(event)?;
                } else if let Ok(result) = results_rx.try_recv() {
                    node.on_write_result(result);
                } else if let Ok(status) = reports_rx.try_recv() {
                    node.on_job_status(status);
                } else if let Ok(report) = run_reports_rx.try_recv() {
                    node.on_run_report(report);
                } else {
                    break;
                }
            }
            node.step();
        }
        node.publish();
    }
    node.publish_stopping();
    if reexec {
        detach(&mut node, &mut reports_rx, &mut run_reports_rx).await;
        return Ok(Ending::Reexec);
    }
    // The next process on this workspace is a new incarnation, whenever this one is stopped
    // from here on: it is leaving (its runs stop; an incarnation that left never comes back).
    write_lock(&mut workspace_lock, node.config.incarnation, true)?;
    leave(&mut node, &mut reports_rx, &mut run_reports_rx).await;
    Ok(Ending::Left)
}

/// Whether the reload may go on: the binary at `exe` runs (`--version` within 10 s) and, with
/// this process's flags and environment (what the next process gets), accepts them and the
/// configuration file (`--check-config`: its own parser, as an upgrade changes it) as the same
/// node (`identity`: another id, cluster or workspace would not take the runs back). A binary
/// too old for `--check-config` is checked with this one's parser. Otherwise the reload is
/// refused, and this process goes on: a file edited into one the next process refuses would
/// stop it (exit 2, which the unit does not restart), its runs orphaned.
async fn answers(exe: &std::path::Path, identity: &crate::config::Identity) -> bool {
    let version = match probe(exe, ["--version"]).await {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Ok(output) => {
            error!(exe = %exe.display(), status = %output.status, stderr = %String::from_utf8_lossy(&output.stderr).trim(), "reload refused: the binary does not run; this process goes on");
            return false;
        }
        Err(why) => {
            error!(exe = %exe.display(), error = %why, "reload refused: the binary does not answer --version; this process goes on");
            return false;
        }
    };
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let checked = argv
        .iter()
        .skip(1)
        .map(std::ffi::OsString::as_os_str)
        .chain([std::ffi::OsStr::new("--check-config")]);
    let next = match probe(exe, checked).await {
        Ok(output) if output.status.success() => {
            crate::config::Identity::parse(&String::from_utf8_lossy(&output.stdout))
                .ok_or_else(|| "the new binary's --check-config did not say the node's identity".to_owned())
        }
        Ok(output) => {
            let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            if said.contains("--check-config") {
                // Older than --check-config: this binary's parser.
                crate::config::check(&argv)
            } else {
                Err(said)
            }
        }
        Err(why) => Err(format!("the new binary's --check-config: {why}")),
    };
    match next.map(|next| identity.differs(&next)) {
        Ok(None) => {
            info!(exe = %exe.display(), %version, "reloading: the node re-executes itself; its runs stay with their shims");
            true
        }
        Ok(Some(why)) => {
            error!(reason = %why, "reload refused: the next process would be another node (restart it instead); this process goes on");
            false
        }
        Err(why) => {
            error!(error = %why, "reload refused: the next process would refuse its flags or configuration; this process goes on");
            false
        }
    }
}

/// Runs the binary at `exe` with `args` (this process's environment, no input) for at most
/// 10 s: what it printed and how it ended, or why it did not.
async fn probe<A: AsRef<std::ffi::OsStr>>(
    exe: &std::path::Path,
    args: impl IntoIterator<Item = A>,
) -> Result<std::process::Output, String> {
    let run = tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(err)) => Err(format!("it cannot be started: {err}")),
        Err(_) => Err("it did not answer within 10 s".to_owned()),
    }
}

/// Before a re-execution: what the node learnt is written (reports of runs that ended), each
/// run left to its shim (nothing stops it from here on), the output queued so far delivered and
/// its position noted, the leadership kept (the next process is the same incarnation).
async fn detach(
    node: &mut Node,
    reports: &mut mpsc::UnboundedReceiver<TaskStatus>,
    run_reports: &mut mpsc::UnboundedReceiver<RunReport>,
) {
    crate::supervisor::shim::detach_all();
    while let Ok(status) = reports.try_recv() {
        node.on_status(status);
    }
    while let Ok(report) = run_reports.try_recv() {
        node.on_run_report(report);
    }
    // Bounded well within a lease: the runs' leases keep going meanwhile.
    if let Some(shipper) = node.shipper.take() {
        shipper.detach(Duration::from_millis(500)).await;
    }
    let writes = node.outbox.writes.clone();
    let heartbeats = node.outbox.heartbeats.clone();
    tokio::task::spawn_blocking(move || {
        writes.flush(Duration::from_millis(500));
        heartbeats.flush(Duration::from_millis(200));
    })
    .await
    .ok();
}

/// The previous holder of a workspace's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Previous {
    incarnation: Uuid,
    /// It left the cluster in order (its runs stopped).
    left: bool,
}

/// Takes the workspace's lock (`<workspace>/node.lock`, held until the node exits, released by
/// the kernel even on `kill -9` or a re-execution; not inherited by the run shims): two nodes on
/// one workspace would take each other's runs. The lock file holds the holder's pid and
/// incarnation, and `running` or `left` (once it left the cluster); returns the previous holder, if it wrote
/// one: that process has exited (the kernel released its lock). One that left is replaced by a
/// new incarnation (its heartbeats say so, and the leader need not wait for it to fence itself:
/// see `membership`); one that did not comes back as the same incarnation.
fn lock_workspace(
    workspace: &std::path::Path,
    incarnation: Uuid,
) -> anyhow::Result<(nix::fcntl::Flock<std::fs::File>, Option<Previous>)> {
    use std::io::Read;
    let path = workspace.join("node.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::io::read_to_string(&file).unwrap_or_default();
            bail!(
                "the workspace {} is in use by another running node (pid {}); refusing to start: give \
                 this node another --workspace or stop the other one",
                workspace.display(),
                holder.trim()
            );
        }
        Err((_, errno)) => return Err(errno).with_context(|| format!("failed to lock {}", path.display())),
    };
    let mut previous = String::new();
    let _ = lock.read_to_string(&mut previous);
    let mut words = previous.split_whitespace().skip(1);
    let previous = words
        .next()
        .and_then(|word| word.parse::<Uuid>().ok())
        .filter(|previous| *previous != incarnation)
        // Written by an older build (no state): it came back as a new incarnation.
        .map(|previous| Previous { incarnation: previous, left: words.next() != Some("running") });
    Ok((lock, previous))
}

/// Writes the lock file: this process, its incarnation, and whether it left the cluster.
fn write_lock(
    lock: &mut nix::fcntl::Flock<std::fs::File>,
    incarnation: Uuid,
    left: bool,
) -> anyhow::Result<()> {
    use std::io::{Seek, Write};
    lock.set_len(0).context("failed to write the workspace lock")?;
    lock.rewind().context("failed to write the workspace lock")?;
    let state = if left { "left" } else { "running" };
    write!(lock, "{} {incarnation} {state}", std::process::id())
        .context("failed to write the workspace lock")?;
    lock.sync_data().context("failed to write the workspace lock")
}

/// Creates or checks the topics, retrying while the bus is unreachable. False: shut down.
async fn ensure_topics(config: &NodeConfig, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    loop {
        match admin::ensure_topics(&config.bus, Duration::from_secs(5)).await {
            Ok(warnings) => {
                for warning in warnings {
                    warn!(%warning, "control topic below production durability");
                }
                match logs::ensure_logs_topic(&config.bus, config.log_retention, Duration::from_secs(5)).await
                {
                    Ok(()) => return Ok(true),
                    Err(err) => error!(error = %err, "cannot create the logs topic; retrying in 2s"),
                }
            }
            Err(err @ BusError::Unreachable { .. }) => {
                error!(error = %err, "bus unreachable; retrying in 2s");
            }
            Err(err) => return Err(err).context("the control topics cannot be used"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Reads every topic to its current end. False: shut down.
async fn read_to_end(
    node: &mut Node,
    events: &mut mpsc::Receiver<ReaderEvent>,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut token = node.token();
    node.reader.sync(token);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            event = events.recv() => event.context("the bus reader stopped")?,
        };
        match event {
            ReaderEvent::SyncFailed(failed, message) if failed == token => {
                error!(%message, "cannot read the log to its end; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                token = node.token();
                node.reader.sync(token);
            }
            event => {
                if node.on_reader_event(event)? == Some(token) {
                    return Ok(true);
                }
            }
        }
    }
}

/// Refuses to start when another live incarnation heartbeats with this node's id: waits three
/// of its heartbeat intervals for a new heartbeat from it. False: shut down.
async fn check_node_id(
    node: &mut Node,
    events: &mut mpsc::Receiver<ReaderEvent>,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    node.probing = true;
    let me = node.config.node_id.clone();
    let Some(previous) = node.view.heartbeats.get(&me).cloned() else { return Ok(true) };
    if previous.incarnation == node.config.incarnation
        || node.view.left.contains(&(me.clone(), previous.incarnation))
    {
        return Ok(true);
    }
    let window = Duration::from_millis(previous.heartbeat.interval_ms.saturating_mul(3))
        .clamp(Duration::from_millis(300), Duration::from_secs(10))
        + node.config.bus.fetch_wait * 2;
    info!(previous = %previous.incarnation, ?window, "an earlier incarnation of this node id exists; checking it is gone");
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = &mut deadline => return Ok(true),
            event = events.recv() => {
                node.on_reader_event(event.context("the bus reader stopped")?)?;
                if let Some(incarnation) = node.impostor {
                    bail!(
                        "node id '{me}' is already used by a live node (incarnation {incarnation}); \
                         refusing to start: give this node another --node-id or stop the other one"
                    );
                }
            }
        }
    }
}

/// Graceful departure: resign leadership, stop the tasks, announce the departure.
async fn leave(
    node: &mut Node,
    reports: &mut mpsc::UnboundedReceiver<TaskStatus>,
    run_reports: &mut mpsc::UnboundedReceiver<RunReport>,
) {
    info!("shutting down: resigning, stopping tasks, leaving");
    crate::supervisor::shim::leave_all();
    let timeout = Duration::from_secs(3);
    if let Some(epoch) = node.leadership.leading.take() {
        let value = node.envelope(Body::Resign(Resign { epoch }));
        match tokio::time::timeout(
            timeout,
            node.outbox.writes.send(TopicKind::Assignments, &key::resign(epoch), Some(&value)),
        )
        .await
        {
            Ok(Ok(_)) => info!(epoch, "resigned leadership"),
            _ => warn!(epoch, "could not write the resignation; the others will notice the departure"),
        }
    }
    node.stop_runs();
    // Runs taken back from the previous process that the book had not taken on yet.
    let adopted = std::mem::take(&mut node.runs.adopted);
    let stops = adopted.into_values().map(|mut run| async move {
        crate::supervisor::job::stop_run(&mut run.handle, "the node is shutting down").await;
    });
    let _ = tokio::time::timeout(Duration::from_secs(60), futures_util::future::join_all(stops)).await;
    while node.launched_runs() > 0 {
        match tokio::time::timeout(Duration::from_secs(60), run_reports.recv()).await {
            Ok(Some(report)) => node.on_run_report(report),
            _ => break,
        }
    }
    if let Some(mut supervisor) = node.supervisor.take() {
        let stop = supervisor.stop_all();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(status) = reports.recv() => node.on_status(status),
            }
        }
        while let Ok(status) = reports.try_recv() {
            node.on_status(status);
        }
    }
    let value = node.envelope(Body::Leave(Leave { reason: "shutdown".into() }));
    let leave_key = key::leave(&node.config.node_id, node.config.incarnation);
    match tokio::time::timeout(timeout, node.outbox.writes.send(TopicKind::Control, &leave_key, Some(&value)))
        .await
    {
        Ok(Ok(_)) => info!("left the cluster"),
        _ => warn!("could not announce the departure; the others will time this node out"),
    }
    let writes = node.outbox.writes.clone();
    tokio::task::spawn_blocking(move || writes.flush(Duration::from_secs(2))).await.ok();
    if let Some(shipper) = node.shipper.take() {
        tokio::task::spawn_blocking(move || shipper.flush(Duration::from_secs(2))).await.ok();
    }
}

/// What woke the driver.
enum Wake {
    Read(ReaderEvent),
    Written(driver::WriteResult),
    JobStatus(TaskStatus),
    RunReport(RunReport),
    Api(crate::api::Request),
    Heartbeat,
    Runs,
    Snapshot,
}
