//! The run shim: `shiva-node __shim`, one process per run, started by the node, which writes
//! the run's configuration (a JSON line: program, arguments, environment…) as the first line of
//! its stdin: nothing of a task's configuration is on a command line, where every local user
//! could read it in `/proc/<pid>/cmdline`, and no size limit of `execve` applies to it.
//!
//! It leaves the node's session and process group (`setsid`): what freezes the node's group
//! does not freeze it. It becomes a subreaper (`PR_SET_CHILD_SUBREAPER`), so no descendant of the task escapes it,
//! not even one that calls `setsid`; starts the task in its own process group (and in the run's
//! cgroup when the node has one), with stdout and stderr on the shim's stderr (the run's log);
//! and holds the node's lease: the node writes `until <boot-time ms>` lines (absolute deadlines;
//! older nodes wrote `renew <ms>`, still read) on the shim's stdin. When the
//! lease runs out (timed with `CLOCK_BOOTTIME`, which keeps counting through suspend, or the wall
//! clock jumped past it: see [`Lease`]), when the
//! node closes the pipe (it died) or when it writes `stop`, the shim stops the whole tree: the
//! task's stop signal (SIGTERM by default), SIGKILL after the grace. A run without a lease
//! (`on_disconnect: keep`) ignores renewals and stops only on `stop` or a closed pipe. When the task itself exits, whatever it left goes too.
//!
//! Events go to the node as JSON lines on stdout (see [`ShimEvent`]).

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, recvmsg, sendmsg,
};
use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create, timerfd_gettime,
    timerfd_settime,
};
use serde::{Deserialize, Serialize};

use crate::runlog::{Capture, RunLog, SegmentWriter, Stream};
use crate::supervisor::spawn::SpawnRequest;
use crate::tree;

/// The argument that selects shim mode.
pub const SHIM_ARG: &str = "__shim";

/// What the node asks the shim to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimConfig {
    /// The task (its output file is already the shim's stderr).
    pub run: SpawnRequest,
    /// Time between the stop signal and SIGKILL.
    pub grace_ms: u64,
    /// The signal that asks the task to stop.
    pub stop_signal: i32,
    /// The lease granted at start, renewed by `renew <ms>` lines; `None`: no lease (the run
    /// stops only when asked or when the node is gone).
    pub lease_ms: Option<u64>,
    /// The same lease as an absolute deadline on the boot-time clock (ms of `CLOCK_BOOTTIME`,
    /// which node and shim share): a shim slow to read its configuration holds no more than
    /// the node. Absent from older nodes: then `lease_ms` from the read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until_ms: Option<i64>,
    /// How long a whole lease is (the node's fence timeout): the measure of a wall-clock jump
    /// and of the longest sleep between looks. Absent from older nodes: `lease_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_length_ms: Option<u64>,
    /// The run's cgroup directory, created by the shim.
    pub cgroup: Option<PathBuf>,
    /// Where the task's stdout and stderr go, line by line (`None`: the shim's stderr).
    #[serde(default)]
    pub log: Option<RunLog>,
    /// Cgroups holding the run's memory and CPU limits (cgroup v1), created by the node: the
    /// task starts in them too.
    #[serde(default)]
    pub limit_cgroups: Vec<PathBuf>,
    /// A staged start: everything is made ready (cgroups entered, limits set), the shim says
    /// `ready` and starts the task only when the node writes `go`; `stop`, a closed pipe or
    /// the lease running out first end the shim with nothing started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// The node's lease file: one line `until <boot-time ms>`, the node's lease deadline,
    /// rewritten (atomically) as it moves on. The shim reads it when its deadline comes, so
    /// renewals cost it a read per lease instead of a line per quarter lease. Absent (older
    /// nodes): renewals come as lines only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_file: Option<PathBuf>,
    /// Where the shim waits for a node that comes back after its own is gone (see [`Attach`]).
    /// Absent (older nodes): the shim stops its task as soon as its node's pipe closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Attach>,
}

/// A shim's life beyond its node: when the node's pipe closes (the node was re-executed for
/// an upgrade, or died), the task goes on while its lease lasts, and the shim listens on
/// `<dir>/<shim pid>.sock` (mode 0600, connections from the shim's own user or root only) for
/// the node that comes back. The node that connects gets a [`ShimEvent::Hello`] and holds the
/// shim from then on exactly as the first one did (the same lines, the same events). No node
/// within the lease (or, for a run without a lease, within `window_ms` of the loss): the shim
/// stops the task as it always did. A task that ends while no node is there leaves its end in
/// `<dir>/<shim pid>.exit` (the `exited` event) for the node that comes back later.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attach {
    /// The node's directory of shim records.
    pub dir: PathBuf,
    /// How long a run without a lease waits for a node to come back, and how long a shim whose
    /// task ended waits to say so (ms).
    pub window_ms: u64,
}

/// The version of the protocol between node and shim (the configuration line, the node's
/// lines, the shim's events), said in [`ShimEvent::Hello`] to a node that attaches. A node
/// adopts shims of every version up to its own and of the one after it; additions are optional
/// fields, read with defaults, and events or lines a side does not know are ignored.
///
/// Version 2: the shim reads its lease's renewals from the node's lease file
/// ([`ShimConfig::lease_file`]) when its deadline comes, instead of a line from the node every
/// quarter lease (50 idle shims woke 100 times a second for it); `started` says the version.
///
/// Version 3: the node passes its [`LeaseTimer`] with a `timer` line; a shim that holds one
/// sleeps until it goes off instead of waking at each deadline to read the lease file (50 idle
/// shims woke 28 times a second for it). Its stdin is a socket, so that the line can carry the
/// timer; a shim that gets none (an older node, a pipe) reads the lease file as before.
pub const PROTOCOL: u32 = 3;

/// The node's lease timer (protocol 3): a `CLOCK_BOOTTIME` timer (a timerfd) that the node sets
/// to its lease deadline at each renewal and passes to every shim it holds, with a `timer` line
/// that carries it (`SCM_RIGHTS` on the node's end of the link: the stdin socket of a shim it
/// starts, the socket of a shim it takes back). It goes off only when the node stops renewing:
/// a shim sleeps until then instead of waking at each deadline to look for a renewal in the
/// lease file. Shims never read it (its count of expirations is every shim's): they ask its
/// setting (`timerfd_gettime`), and take in its deadline capped at one lease from now, as from
/// the file.
#[derive(Debug)]
pub struct LeaseTimer(OwnedFd);

impl LeaseTimer {
    /// A new timer, not set (the node's).
    pub fn new() -> std::io::Result<LeaseTimer> {
        let flags = TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK;
        Ok(LeaseTimer(timerfd_create(TimerfdClockId::Boottime, flags)?))
    }

    /// Sets it to go off at `deadline_ms` (boot-time ms).
    pub fn set(&self, deadline_ms: i64) -> std::io::Result<()> {
        // 0 would unset it.
        let deadline = deadline_ms.max(1);
        let at = Timespec { tv_sec: deadline / 1000, tv_nsec: (deadline % 1000) * 1_000_000 };
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: at };
        timerfd_settime(&self.0, TimerfdTimerFlags::ABSTIME, &spec)?;
        Ok(())
    }

    /// `fd` as a lease timer, if it is a one-shot timer (anything else passed is dropped:
    /// closed; a periodic timer would stay readable for ever).
    fn take(fd: OwnedFd) -> Option<LeaseTimer> {
        timerfd_gettime(&fd).is_ok_and(|spec| is_zero(&spec.it_interval)).then_some(LeaseTimer(fd))
    }

    /// The deadline it is set to (boot-time ms, never later than the real one) as of `boot`,
    /// or `None` once it went off (or if it was never set).
    fn deadline(&self, boot: i64) -> Option<i64> {
        let spec = timerfd_gettime(&self.0).ok()?;
        let left = spec.it_value;
        let ms = left.tv_sec.saturating_mul(1000).saturating_add(left.tv_nsec / 1_000_000);
        (!is_zero(&left) && is_zero(&spec.it_interval)).then(|| boot.saturating_add(ms.max(0)))
    }
}

fn is_zero(time: &Timespec) -> bool {
    time.tv_sec == 0 && time.tv_nsec == 0
}

impl AsFd for LeaseTimer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Sends `timer` to the shim at the other end of `socket` as a `timer` line (see
/// [`LeaseTimer`]). A shim of protocol 2 reads the line with no room for the descriptor, which
/// the kernel then closes: it never reaches that shim's task.
pub fn send_timer(socket: BorrowedFd<'_>, timer: &LeaseTimer) -> std::io::Result<()> {
    let fds = [timer.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let line = [std::io::IoSlice::new(b"timer\n")];
    let sent = sendmsg(socket, &line, &mut control, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)?;
    if sent < line[0].len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the timer line was cut"));
    }
    Ok(())
}

/// Reads what the node sent on `fd` (a socket; a pipe from an older node), with any timer
/// passed along (close-on-exec: the task never inherits it).
fn receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<(usize, Option<LeaseTimer>)> {
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let received = match recvmsg(fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
        Ok(received) => received,
        Err(rustix::io::Errno::NOTSOCK) => return Ok((rustix::io::read(fd, iov[0].as_mut())?, None)),
        Err(err) => return Err(err.into()),
    };
    let mut timer = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for fd in fds {
                timer = LeaseTimer::take(fd).or(timer);
            }
        }
    }
    Ok((received.bytes, timer))
}

/// Watches the wall clock for a step (a `CLOCK_REALTIME` timer set far ahead with
/// `TFD_TIMER_CANCEL_ON_SET`, which goes off when the clock is set): a shim that sleeps on its
/// node's [`LeaseTimer`] no longer looks every lease, and sees a jump when it happens.
struct ClockWatch(OwnedFd);

impl ClockWatch {
    fn new() -> Option<ClockWatch> {
        let flags = TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK;
        let watch = ClockWatch(timerfd_create(TimerfdClockId::Realtime, flags).ok()?);
        watch.arm().then_some(watch)
    }

    /// (Re-)arms it, ten years ahead.
    fn arm(&self) -> bool {
        let far = wall_ms().saturating_div(1000).saturating_add(10 * 365 * 86_400);
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        let spec = Itimerspec { it_interval: zero, it_value: Timespec { tv_sec: far, tv_nsec: 0 } };
        let flags = TimerfdTimerFlags::ABSTIME | TimerfdTimerFlags::CANCEL_ON_SET;
        timerfd_settime(&self.0, flags, &spec).is_ok()
    }

    /// After it went off: takes the step in (`ECANCELED`) and arms it again.
    fn rearm(&self) {
        let _ = rustix::io::read(&self.0, &mut [0u8; 8]);
        self.arm();
    }
}

/// Replaces `path` whole with `bytes`: written beside, then renamed over it, so a reader (or a
/// process killed mid-write) sees the old content or the new one, never a torn one.
pub fn replace_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let next = next_name(path);
    std::fs::write(&next, bytes)?;
    std::fs::rename(&next, path)
}

/// The file [`replace_file`] writes `path`'s next content to (`<path>.new`); made ahead of time,
/// the write reuses its inode.
pub fn next_name(path: &std::path::Path) -> PathBuf {
    let mut next = path.as_os_str().to_owned();
    next.push(".new");
    PathBuf::from(next)
}

/// The socket of the shim `pid` in `dir`.
pub fn socket_name(pid: u32) -> String {
    format!("{pid}.sock")
}

/// The end a shim `pid` left in `dir`, if its task ended while no node was attached.
pub fn exit_name(pid: u32) -> String {
    format!("{pid}.exit")
}

/// Calls `f` with a path naming `name` in `dir` that fits in a socket address (108 bytes): the
/// path itself, or `/proc/self/fd/<fd>/<name>` through an open descriptor of `dir` when the
/// workspace is deep.
pub fn in_dir<T>(
    dir: &std::path::Path,
    name: &str,
    f: impl FnOnce(&std::path::Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let full = dir.join(name);
    if full.as_os_str().len() < 100 {
        return f(&full);
    }
    let handle = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}/{name}", std::os::fd::AsRawFd::as_raw_fd(&handle)));
    let result = f(&short);
    drop(handle);
    result
}

/// What the shim tells the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ShimEvent {
    /// To a node that attached on the shim's socket: the shim's protocol version and its task
    /// (`None`: nothing was started). An `exited` event follows if the task is over.
    Hello {
        /// [`PROTOCOL`].
        protocol: u32,
        /// Task pid.
        pid: Option<u32>,
    },
    /// A staged start is ready: the task starts at `go`.
    Ready,
    /// The task runs as `pid` (also its process group).
    Started {
        /// Task pid.
        pid: u32,
        /// [`PROTOCOL`] (absent from shims of version 1): from version 2 on, the shim reads
        /// its lease's renewals from the node's lease file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<u32>,
    },
    /// The task could not start.
    Failed {
        /// Why.
        error: String,
    },
    /// The task is over and nothing of it remains.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
        /// Why the shim stopped it, if it did.
        stopped: Option<String>,
    },
}

/// An event as the line it travels as.
fn event_line(event: &ShimEvent) -> Vec<u8> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    line
}

/// To the node's pipe (before the supervision's link exists).
fn emit(event: &ShimEvent) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&event_line(event));
    let _ = out.flush();
}

/// `CLOCK_BOOTTIME` in ms: shared by the node and its shims, counting through suspend.
pub fn boottime_ms() -> i64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map_or(0, |t| t.tv_sec().saturating_mul(1000).saturating_add(t.tv_nsec() / 1_000_000))
}

/// `now + ms`, saturating: a lease or grace of any length never wraps into the past.
fn after_ms(now: i64, ms: u64) -> i64 {
    now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Largest configuration line the shim reads (a spec's environment, arguments and files are a
/// few MiB at most).
const MAX_CONFIG_BYTES: usize = 64 << 20;

/// Reads the configuration line from stdin; returns it and whatever followed it (the node's
/// first control lines, if already written, and the node's lease timer if one came along).
fn read_config() -> Result<(ShimConfig, Vec<u8>, Option<LeaseTimer>), String> {
    let mut input = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let stdin = std::io::stdin();
    let mut timer = None;
    let end = loop {
        if let Some(end) = input.iter().position(|b| *b == b'\n') {
            break end;
        }
        if input.len() > MAX_CONFIG_BYTES {
            return Err(format!("configuration longer than {MAX_CONFIG_BYTES} bytes"));
        }
        match receive(stdin.as_fd(), &mut buf) {
            Ok((0, _)) => return Err("stdin closed before the configuration line".to_owned()),
            Ok((n, passed)) => {
                input.extend_from_slice(&buf[..n]);
                timer = passed.or(timer);
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(format!("cannot read stdin: {err}")),
        }
    };
    let rest = input.split_off(end + 1);
    let config = serde_json::from_slice(&input).map_err(|err| err.to_string())?;
    Ok((config, rest, timer))
}

/// Runs the shim; returns its exit code. `legacy`: the configuration as the previous version's
/// node passed it, on the command line (accepted for one release, for upgrades in place).
pub fn main(legacy: Option<&str>) -> u8 {
    // A session (and process group) of its own, before anything else: a stop signal to the
    // node's group (`kill -STOP -<pgid>`, Ctrl-Z in its terminal) freezes the node, not its
    // shims, whose leases then run out and stop their tasks. Frozen before this line, the shim
    // has started nothing yet, and starts nothing if its lease ran out meanwhile.
    let _ = nix::unistd::setsid();
    let read = match legacy {
        Some(text) => {
            serde_json::from_str(text).map(|config| (config, Vec::new(), None)).map_err(|err| err.to_string())
        }
        None => read_config(),
    };
    let (config, input, timer) = match read {
        Ok(read) => read,
        Err(err) => {
            emit(&ShimEvent::Failed { error: format!("bad shim configuration: {err}") });
            return 2;
        }
    };
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        emit(&ShimEvent::Failed { error: format!("PR_SET_CHILD_SUBREAPER failed: {err}") });
        return 1;
    }
    let mut homes = Vec::new();
    for cgroup in config.cgroup.iter().chain(&config.limit_cgroups) {
        match enter_cgroup(cgroup) {
            Some(home) => homes.push(home),
            None if config.limit_cgroups.contains(cgroup) => {
                emit(&ShimEvent::Failed {
                    error: format!("cannot enter the limit cgroup {}", cgroup.display()),
                });
                clear_cgroups(&config);
                return 1;
            }
            None => {}
        }
    }
    let back_out = |homes: &[PathBuf]| {
        for home in homes {
            // Back out: the task (forked meanwhile) stays in the run's cgroups, the shim does not.
            let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
        }
    };
    let mut link = Link::new(&config, input, timer);
    // One lease from the configuration on: held through a staged start into the supervision.
    let mut lease = Lease::new(&config, boottime_ms(), wall_ms());
    // A staged start makes its output's first segment now: at the instant, when the runs of one
    // instant start together, nothing allocates an inode.
    let mut writer = None;
    if let (true, Some(log)) = (config.hold, &config.log) {
        match SegmentWriter::create(log.clone()) {
            Ok(made) => writer = Some(made),
            Err(err) => {
                back_out(&homes);
                emit(&ShimEvent::Failed { error: err.to_string() });
                clear_cgroups(&config);
                return 0;
            }
        }
    }
    // A start called off before the task was forked: nothing of it is kept.
    let call_off = |writer: Option<SegmentWriter>, reason: String| {
        if let Some(writer) = writer {
            writer.remove_if_empty();
        }
        back_out(&homes);
        clear_cgroups(&config);
        emit(&ShimEvent::Exited { code: None, signal: None, stopped: Some(reason) });
        0
    };
    if config.hold {
        emit(&ShimEvent::Ready);
        if let Err(reason) = hold(&mut lease, &mut link) {
            return call_off(writer.take(), reason);
        }
    }
    // The lease may have run out meanwhile (the shim frozen before its `setsid`, a long wait
    // for its go): then nothing starts.
    link.renew(&mut lease, boottime_ms());
    if let Some(why) = lease.expired(boottime_ms(), wall_ms()) {
        return call_off(writer.take(), why.into());
    }
    let child = apply_limits(&config.run).and_then(|()| spawn(&config, writer));
    let spawned = match child {
        Ok(spawned) => spawned,
        Err(err) => {
            back_out(&homes);
            // The cause only: the node says which task and program failed to start.
            emit(&ShimEvent::Failed { error: err.to_string() });
            clear_cgroups(&config);
            return 0;
        }
    };
    let (pid, mut capture) = (spawned.pid, spawned.capture);
    // Said before the shim backs out of the run's cgroups: a move can wait for the kernel
    // (see `tree::favours_dynmods`), the task runs already.
    emit(&ShimEvent::Started { pid, protocol: Some(PROTOCOL) });
    back_out(&homes);
    // The OOM killer never picks the shim (under systemd it shares its run's memory limit): it
    // would take the run's supervision with it. The task, forked before, keeps its own score.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    link.pid = Some(pid);
    let (status, stopped) = supervise(&config, pid, &mut capture, &mut link, lease);
    // The task is over: nothing it started may outlive it.
    kill_rest(&config, pid);
    // Every writer of its output is gone: read the pipes to their end, so the captured output
    // is complete on disk before the end is reported.
    if let Some(capture) = capture.as_mut() {
        capture.drain(boottime_ms() + 2_000, boottime_ms);
    }
    let (code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (Some(code), None),
        Some(WaitStatus::Signaled(_, signal, _)) => (None, Some(signal as i32)),
        _ => (None, None),
    };
    link.tell_the_end(&ShimEvent::Exited { code, signal, stopped });
    0
}

/// Which end of the link the node holds.
enum End {
    /// The pipes the shim was started with (stdin, stdout).
    Pipe,
    /// A connection on the shim's socket, from a node that came back.
    Socket(UnixStream),
}

/// The shim's link to its node: the pipes it was started with, then, once the node is gone,
/// a connection from the node that comes back (see [`Attach`]).
struct Link {
    node: Option<End>,
    listener: Option<(UnixListener, PathBuf)>,
    /// The file the end is written to, made beside the socket when the shim starts and renamed
    /// `<pid>.exit` once written: at the task's end, usually when many runs of one instant end
    /// together, the shim allocates no inode (issue 21, point 4).
    exit_next: Option<(std::fs::File, PathBuf)>,
    /// What the node wrote, not yet taken in as whole lines.
    input: Vec<u8>,
    /// Since when (boot-time ms) no node is attached.
    gone_at: Option<i64>,
    window_ms: u64,
    /// The task, once started (said to a node that attaches).
    pid: Option<u32>,
    stdin: std::io::Stdin,
    /// The lease timer of the node attached (protocol 3), if it passed one.
    timer: Option<LeaseTimer>,
    /// What the node that held the shim had granted when it went (boot-time ms), not yet taken
    /// in: it holds, nothing that node renews after does.
    granted: Option<i64>,
    /// The node's lease file (protocol 2 on).
    lease_file: Option<PathBuf>,
}

impl Link {
    /// The pipe to the node, and the socket when `attach` asks for one (a socket that cannot be
    /// made leaves the shim without one: it stops its task when the node is gone, as before).
    fn new(config: &ShimConfig, input: Vec<u8>, timer: Option<LeaseTimer>) -> Link {
        let attach = config.attach.as_ref();
        let listener = attach.and_then(|attach| {
            let name = socket_name(std::process::id());
            let bound = in_dir(&attach.dir, &name, |path| {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                Ok(listener)
            });
            bound.ok().map(|listener| (listener, attach.dir.join(name)))
        });
        let exit_next = listener.as_ref().and_then(|(_, socket)| {
            let path = next_name(&socket.with_file_name(exit_name(std::process::id())));
            std::fs::File::create(&path).ok().map(|file| (file, path))
        });
        let window_ms = attach.map_or(0, |attach| attach.window_ms);
        let stdin = std::io::stdin();
        let (node, lease_file) = (Some(End::Pipe), config.lease_file.clone());
        Link {
            node,
            listener,
            exit_next,
            input,
            gone_at: None,
            window_ms,
            pid: None,
            stdin,
            timer,
            granted: None,
            lease_file,
        }
    }

    /// Takes the renewals of the node that holds the shim into `lease` (none without one: a
    /// node that lost track of the shim never keeps it alive): its timer's deadline, then its
    /// lease file once the deadline has come. Returns whether the timer goes off by the lease's
    /// deadline, so that the shim may sleep until it does.
    fn renew(&mut self, lease: &mut Lease, boot: i64) -> bool {
        if let Some(until) = self.granted.take() {
            lease.renew_until(until, boot);
        }
        if self.node.is_none() {
            return false;
        }
        let Some(timer) = &self.timer else {
            lease.refresh(self.lease_file.as_deref(), boot);
            return false;
        };
        // A shim given the timer never reads the file, which the node keeps only for the shims
        // that read it (and may be stale).
        timer.deadline(boot).is_some_and(|until| {
            lease.renew_until(until, boot);
            lease.length_ms.is_some() && until <= lease.deadline
        })
    }

    /// The descriptors to wait on: the node's end, then the socket.
    fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        let mut fds = Vec::with_capacity(2);
        match &self.node {
            Some(End::Pipe) => fds.push(self.stdin.as_fd()),
            Some(End::Socket(stream)) => fds.push(stream.as_fd()),
            None => {}
        }
        if let Some((listener, _)) = &self.listener {
            fds.push(listener.as_fd());
        }
        fds
    }

    /// Takes in what [`Link::fds`] found ready.
    fn take_in(&mut self, ready: &[bool]) {
        let mut ready = ready.iter().copied();
        if self.node.is_some() && ready.next() == Some(true) {
            let mut buf = [0u8; 4096];
            let read = match &self.node {
                Some(End::Pipe) => receive(self.stdin.as_fd(), &mut buf),
                Some(End::Socket(stream)) => receive(stream.as_fd(), &mut buf),
                None => Ok((0, None)),
            };
            match read {
                Ok((0, _)) => self.lose(),
                Ok((n, timer)) => {
                    self.input.extend_from_slice(&buf[..n]);
                    if timer.is_some() {
                        self.let_go();
                        self.timer = timer;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.lose(),
            }
        }
        if self.listener.is_some() && ready.next() == Some(true) {
            self.accept();
        }
    }

    /// Lets the node's renewals go (it went, another node attached, or it passed a new timer),
    /// keeping what they had granted: the timer's deadline, or, for a shim without one, what the
    /// lease file says (a shim that sleeps on the timer, or reads the file only at its
    /// deadline, may not have taken in the last renewal: a shim of protocol 2 stopped its task
    /// across a reload when its deadline came while no node held it, the node's lease still
    /// running).
    fn let_go(&mut self) {
        let now = boottime_ms();
        let granted = match self.timer.take() {
            Some(timer) => timer.deadline(now),
            None if self.node.is_some() => self.lease_file.as_deref().and_then(lease_file_deadline),
            None => None,
        };
        self.granted = self.granted.max(granted);
    }

    fn lose(&mut self) {
        self.let_go();
        self.node = None;
        self.input.clear();
        self.gone_at.get_or_insert_with(boottime_ms);
    }

    /// A node connects: if it is this shim's own user (or root), it holds the shim from now on
    /// (a node still attached is replaced: the one that connects last is the live one).
    fn accept(&mut self) {
        let Some((listener, _)) = &self.listener else { return };
        let Ok((stream, _)) = listener.accept() else { return };
        let me = nix::unistd::geteuid().as_raw();
        let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
        if !peer.is_ok_and(|peer| peer.uid() == me || peer.uid() == 0) {
            return;
        }
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        // A timer is the node's that passed it: this one passes its own, or none.
        self.let_go();
        self.node = Some(End::Socket(stream));
        self.input.clear();
        self.gone_at = None;
        self.send(&ShimEvent::Hello { protocol: PROTOCOL, pid: self.pid });
    }

    /// Sends `event` to the node attached, if any.
    fn send(&mut self, event: &ShimEvent) {
        let line = event_line(event);
        let sent = match &mut self.node {
            Some(End::Pipe) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line).and_then(|()| out.flush())
            }
            Some(End::Socket(stream)) => stream.write_all(&line),
            None => return,
        };
        if sent.is_err() {
            self.lose();
        }
    }

    /// The whole lines the node wrote.
    fn lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(end) = self.input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        lines
    }

    /// Whether a node that is gone may still come back.
    fn may_come_back(&self) -> bool {
        self.listener.is_some()
    }

    /// When a run without a lease stops for want of a node (boot-time ms), if its node is gone.
    fn window_end(&self) -> Option<i64> {
        self.gone_at.map(|gone| after_ms(gone, self.window_ms))
    }

    /// Says how the task ended. With no node attached, the end is left on disk and told to a
    /// node that attaches within the window; a node that is told closes the connection.
    fn tell_the_end(&mut self, end: &ShimEvent) {
        // On disk first, whenever a node may come back: a node that reads the event while it
        // detaches to re-execute itself does not act on it, and its next process finds it
        // here (the node removes the file once it has reported the end).
        if let Some(dir) = self.listener.as_ref().and_then(|(_, path)| path.parent()) {
            let path = dir.join(exit_name(std::process::id()));
            let line = event_line(end);
            let prepared = self.exit_next.take().and_then(|(mut file, next)| {
                use std::io::Write;
                file.write_all(&line).and_then(|()| std::fs::rename(&next, &path)).ok()
            });
            if prepared.is_none() {
                let _ = replace_file(&path, &line);
            }
        }
        if self.node.is_some() {
            self.send(end);
        }
        if self.node.is_some() || !self.may_come_back() {
            return;
        }
        let deadline = after_ms(boottime_ms(), self.window_ms);
        while self.node.is_none() {
            let now = boottime_ms();
            if now >= deadline {
                return;
            }
            let ready = poll_fds(&self.fds(), deadline - now);
            self.take_in(&ready);
        }
        self.send(end);
        // Until the node has read it (it closes), a few seconds at most.
        let deadline = after_ms(boottime_ms(), 5_000);
        while matches!(self.node, Some(End::Socket(_))) {
            let now = boottime_ms();
            if now >= deadline {
                return;
            }
            let ready = poll_fds(&self.fds(), deadline - now);
            // Only the node's end: a second node is not told twice.
            self.take_in(&ready[..1.min(ready.len())]);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
        if let Some((_, next)) = &self.exit_next {
            let _ = std::fs::remove_file(next);
        }
    }
}

/// Polls `fds` for input for at most `wait_ms`; which are ready.
fn poll_fds(fds: &[std::os::fd::BorrowedFd<'_>], wait_ms: i64) -> Vec<bool> {
    let mut polled: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    let wait = wait_ms.clamp(0, 60_000) as i32;
    let _ = poll(&mut polled, PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX));
    polled.iter().map(|fd| fd.revents().is_some_and(|events| !events.is_empty())).collect()
}

/// Moves the shim into `cgroup` (created); returns the cgroup it came from.
fn enter_cgroup(cgroup: &std::path::Path) -> Option<PathBuf> {
    let home = cgroup.parent()?.to_path_buf();
    std::fs::create_dir_all(cgroup).ok()?;
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).ok()?;
    Some(home)
}

fn clear_cgroups(config: &ShimConfig) {
    for cgroup in config.cgroup.iter().chain(&config.limit_cgroups) {
        tree::clear_cgroup(cgroup);
    }
}

/// Sets the run's resource limits on the shim, whose task inherits them, and the user's
/// supplementary groups.
fn apply_limits(run: &SpawnRequest) -> std::io::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    for (name, value) in &run.rlimits {
        let resource = match name.as_str() {
            "nofile" => Resource::RLIMIT_NOFILE,
            "core" => Resource::RLIMIT_CORE,
            "nproc" => Resource::RLIMIT_NPROC,
            "fsize" => Resource::RLIMIT_FSIZE,
            "stack" => Resource::RLIMIT_STACK,
            "as" => Resource::RLIMIT_AS,
            "cpu" => Resource::RLIMIT_CPU,
            "memlock" => Resource::RLIMIT_MEMLOCK,
            "data" => Resource::RLIMIT_DATA,
            other => return Err(std::io::Error::other(format!("rlimits.{other}: unknown limit"))),
        };
        setrlimit(resource, *value, *value)
            .map_err(|err| std::io::Error::other(format!("rlimits.{name}: cannot set {value}: {err}")))?;
    }
    if let Some(user) = &run.user {
        let name = std::ffi::CString::new(user.name.clone()).map_err(std::io::Error::other)?;
        nix::unistd::initgroups(&name, nix::unistd::Gid::from_raw(user.gid)).map_err(|err| {
            std::io::Error::other(format!("user: cannot set the groups of '{}': {err}", user.name))
        })?;
    }
    Ok(())
}

/// The started task and the capture of its output.
struct Spawned {
    pid: u32,
    capture: Option<Capture>,
}

fn spawn(config: &ShimConfig, made: Option<SegmentWriter>) -> std::io::Result<Spawned> {
    let run = &config.run;
    std::fs::create_dir_all(&run.cwd)?;
    let writer = match (made, &config.log) {
        (Some(made), _) => Some(made),
        (None, Some(log)) => Some(SegmentWriter::create(log.clone())?),
        (None, None) => None,
    };
    let (stdout, stderr) = if writer.is_some() {
        (Stdio::piped(), Stdio::piped())
    } else {
        let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
        (Stdio::from(stderr.try_clone()?), Stdio::from(stderr))
    };
    let mut command = Command::new(&run.program);
    if let Some(user) = &run.user {
        command.uid(user.uid).gid(user.gid);
    }
    let mut child = command
        .args(&run.args)
        .env_clear()
        .envs(run.env.iter().map(|(key, value)| (key, value)))
        .current_dir(&run.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    let capture = match (writer, &config.log) {
        (Some(writer), Some(log)) => {
            let mut pipes = Vec::new();
            if let Some(pipe) = child.stdout.take() {
                pipes.push((std::os::fd::OwnedFd::from(pipe), Stream::Stdout));
            }
            if let Some(pipe) = child.stderr.take() {
                pipes.push((std::os::fd::OwnedFd::from(pipe), Stream::Stderr));
            }
            Some(Capture::new(writer, pipes, log.max_line)?)
        }
        _ => None,
    };
    // Reaped below with waitpid, like every other descendant.
    std::mem::forget(child);
    Ok(Spawned { pid, capture })
}

/// The wall clock, ms since the Unix epoch.
fn wall_ms() -> i64 {
    clock_gettime(ClockId::CLOCK_REALTIME)
        .map_or(0, |t| t.tv_sec().saturating_mul(1000).saturating_add(t.tv_nsec() / 1_000_000))
}

/// The first 64 bytes of a small file (an open and one read: no size probe).
fn read_small(file: &std::path::Path) -> Option<String> {
    let mut buf = [0u8; 64];
    let n = std::fs::File::open(file).ok()?.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The deadline the node's lease file says (`until <boot-time ms>`), if it says one.
fn lease_file_deadline(file: &std::path::Path) -> Option<i64> {
    read_small(file)?.lines().next()?.strip_prefix("until ")?.trim().parse().ok()
}

/// A control line from the node, as far as the lease is not concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// Start the staged task.
    Go,
    /// Stop, for this reason.
    Stop(String),
    /// A renewal (taken in) or anything else (ignored).
    Other,
}

/// The node's lease as the shim holds it, pure (the clocks are passed in, boot-time and wall
/// ms). It runs out at its deadline on the boot-time clock, which counts through suspend; and
/// when the wall clock moved further than the boot-time clock by more than a whole lease since
/// the last look, which is what a pause the boot-time clock does not count (a hypervisor's)
/// looks like: the node may have been cut off meanwhile without the shim knowing. A run
/// without a lease (`on_disconnect: keep`) never runs out.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The lease's length (`None`: no lease).
    length_ms: Option<u64>,
    /// Boot-time ms at which it runs out.
    deadline: i64,
    /// The clocks at the last look (boot-time, wall).
    seen: (i64, i64),
    /// Why it ran out, for good.
    out: Option<&'static str>,
}

impl Lease {
    /// The lease granted by `config`, at boot-time `boot` and wall time `wall`.
    pub fn new(config: &ShimConfig, boot: i64, wall: i64) -> Lease {
        let deadline = match (config.lease_ms, config.lease_until_ms) {
            (None, _) => i64::MAX,
            (Some(_), Some(until)) => until,
            (Some(lease), None) => after_ms(boot, lease),
        };
        // A whole lease, not what was left of it at the start (which may be a few ms).
        let length_ms = config.lease_ms.map(|left| config.lease_length_ms.unwrap_or(left).max(left).max(1));
        Lease { length_ms, deadline, seen: (boot, wall), out: None }
    }

    /// Takes in a line from the node: `until <boot-ms>` (an absolute deadline, as this
    /// build's node writes), `renew <ms>` (from the read, as older nodes wrote), `go`,
    /// `stop [reason]`. A renewal never moves the deadline back.
    pub fn on_line(&mut self, line: &str, boot: i64) -> Line {
        let line = line.trim();
        let mut words = line.split_whitespace();
        let (word, number) = (words.next(), words.next());
        match word {
            Some("go") => Line::Go,
            Some("stop") => {
                let reason = line.strip_prefix("stop").unwrap_or("").trim();
                Line::Stop(if reason.is_empty() { "stopped by the node".into() } else { reason.into() })
            }
            Some("until") => {
                if let Some(until) = number.and_then(|ms| ms.parse::<i64>().ok()) {
                    self.renew_until(until, boot);
                }
                Line::Other
            }
            Some("renew") if self.length_ms.is_some() => {
                if let Some(ms) = number.and_then(|ms| ms.parse::<u64>().ok()) {
                    self.deadline = self.deadline.max(after_ms(boot, ms));
                }
                Line::Other
            }
            _ => Line::Other,
        }
    }

    /// Moves the deadline on to `until` (boot-time ms), never back, and never more than a lease
    /// from `boot`: a garbage or stale deadline (a lease file of an earlier boot) grants no more
    /// than one lease. Without a lease, nothing.
    pub fn renew_until(&mut self, until: i64, boot: i64) {
        if let Some(length) = self.length_ms {
            let most = after_ms(boot, length);
            self.deadline = self.deadline.max(until.min(most));
        }
    }

    /// Takes in the node's lease file when the deadline has come (`boot`): a renewal the node
    /// wrote there moves it on. Nothing else is read from the file.
    pub fn refresh(&mut self, file: Option<&std::path::Path>, boot: i64) {
        if let Some(file) = file
            && self.length_ms.is_some()
            && self.out.is_none()
            && boot >= self.deadline
            && let Some(until) = lease_file_deadline(file)
        {
            self.renew_until(until, boot);
        }
    }

    /// Whether the lease ran out by `boot` / `wall`, and why (for good once it did).
    pub fn expired(&mut self, boot: i64, wall: i64) -> Option<&'static str> {
        let length = self.length_ms?;
        let (seen_boot, seen_wall) = self.seen;
        self.seen = (boot, wall);
        let unseen = wall.saturating_sub(seen_wall).saturating_sub(boot.saturating_sub(seen_boot));
        if self.out.is_none() && unseen > i64::try_from(length).unwrap_or(i64::MAX) {
            self.out =
                Some("the wall clock jumped past the node's lease (a pause the boot clock did not count)");
        }
        if self.out.is_none() && boot >= self.deadline {
            self.out = Some("the node's lease ran out");
        }
        self.out
    }

    /// How long to sleep at most before looking again (ms).
    pub fn wait_ms(&self, boot: i64) -> i64 {
        let to_deadline = self.deadline.saturating_sub(boot);
        // A jump of the wall clock is seen within a lease.
        match self.length_ms {
            Some(length) => to_deadline.min(i64::try_from(length).unwrap_or(i64::MAX)),
            None => to_deadline,
        }
    }
}

/// A staged start waits for the node's `go` (`Ok`), keeping its lease; `Err` says why it ends
/// without starting anything: `stop`, the node gone, or the lease run out. Lines after `go`
/// stay in the link's input for the supervision that follows.
fn hold(lease: &mut Lease, link: &mut Link) -> Result<(), String> {
    loop {
        while let Some(end) = link.input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = link.input.drain(..=end).collect();
            match lease.on_line(&String::from_utf8_lossy(&line), boottime_ms()) {
                Line::Go => return Ok(()),
                Line::Stop(reason) => return Err(reason),
                Line::Other => {}
            }
        }
        // Nothing started: a node that is gone is not waited for.
        if link.gone_at.is_some() {
            return Err("the node is gone".into());
        }
        let now = boottime_ms();
        link.renew(lease, now);
        if let Some(why) = lease.expired(now, wall_ms()) {
            return Err(why.into());
        }
        // The node's pipe only: a staged shim is not adopted.
        let fds = link.fds();
        let ready = poll_fds(&fds[..1.min(fds.len())], lease.wait_ms(now).clamp(1, 60_000));
        drop(fds);
        link.take_in(&ready);
    }
}

/// Child exits as a file descriptor: SIGCHLD is blocked (after the task was forked, so the task
/// does not inherit the mask) and read from a signalfd, so the shim sleeps until something
/// happens instead of polling.
fn child_events() -> Option<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().ok()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).ok()
}

/// Waits for the task, keeping the lease, obeying the node and capturing its output. Returns
/// the task's status and, if the shim stopped it, why.
fn supervise(
    config: &ShimConfig,
    pid: u32,
    out: &mut Option<Capture>,
    link: &mut Link,
    mut lease: Lease,
) -> (Option<WaitStatus>, Option<String>) {
    let children = child_events();
    let clock = ClockWatch::new();
    // Reaped first (an exit before SIGCHLD was blocked went unsignalled), then at each SIGCHLD
    // (every wake without a signalfd): an idle shim's wakes cost as few calls as can be.
    let mut exits = true;
    loop {
        if (exits || children.is_none())
            && let Some(status) = reap(pid)
        {
            return (Some(status), None);
        }
        let now = boottime_ms();
        // With the node's timer (and a watch on the wall clock), the shim sleeps until the
        // timer goes off; otherwise it wakes at its deadline.
        let timed = link.renew(&mut lease, now) && clock.is_some();
        if let Some(why) = lease.expired(now, wall_ms()) {
            return stop(config, pid, why, out, children.as_ref());
        }
        let mut wait = if timed { i64::MAX } else { lease.wait_ms(now) };
        if let Some(gone) = link.gone_at {
            if !link.may_come_back() {
                return stop(config, pid, "the node is gone", out, children.as_ref());
            }
            // A run without a lease waits for its node a while; one with a lease, its lease.
            if config.lease_ms.is_none() {
                let end = link.window_end().unwrap_or(gone);
                if now >= end {
                    let why = "the node is gone and none came back in time";
                    return stop(config, pid, why, out, children.as_ref());
                }
                wait = wait.min(end - now);
            }
        }
        let (ready, exited, linked) = {
            let mut fds = link.fds();
            let linked = fds.len();
            if timed && let (Some(timer), Some(clock)) = (&link.timer, &clock) {
                fds.extend([timer.as_fd(), clock.0.as_fd()]);
            }
            let (ready, exited) = wait_for_events(children.as_ref(), out, &fds, wait);
            (ready, exited, linked)
        };
        exits = exited;
        if ready.get(linked + 1) == Some(&true)
            && let Some(clock) = &clock
        {
            clock.rearm();
        }
        link.take_in(&ready[..linked]);
        for line in link.lines() {
            match lease.on_line(&line, boottime_ms()) {
                Line::Stop(reason) => return stop(config, pid, &reason, out, children.as_ref()),
                // A `go` after the start means nothing.
                Line::Go | Line::Other => {}
            }
        }
    }
}

/// Sleeps until a child exits, the task writes output (read into the run's log), one of
/// `control` is readable (returned, in order) or `wait_ms` passes; also returns whether a child
/// exited. Without a signalfd, exits are looked for every 10 ms.
fn wait_for_events(
    children: Option<&SignalFd>,
    out: &mut Option<Capture>,
    control: &[std::os::fd::BorrowedFd<'_>],
    wait_ms: i64,
) -> (Vec<bool>, bool) {
    let most = if children.is_some() { 60_000 } else { 10 };
    let wait = wait_ms.clamp(1, most) as i32;
    let (ready, exits, output) = {
        let pipes = out.as_ref().map(|capture| capture.fds()).unwrap_or_default();
        let mut fds = Vec::with_capacity(pipes.len() + control.len() + 1);
        fds.extend(control.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
        if let Some(children) = children {
            fds.push(PollFd::new(children.as_fd(), PollFlags::POLLIN));
        }
        fds.extend(pipes.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
        let _ = poll(&mut fds, PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX));
        let is_ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|events| !events.is_empty());
        let ready: Vec<bool> = fds[..control.len()].iter().map(is_ready).collect();
        let exits = children.is_some() && is_ready(&fds[control.len()]);
        let first_pipe = control.len() + usize::from(children.is_some());
        let output = fds[first_pipe..].iter().any(is_ready);
        (ready, exits, output)
    };
    if exits && let Some(children) = children {
        while let Ok(Some(_)) = children.read_signal() {}
    }
    // The pipes only when they have something (or closed): a task that exited leaves what it
    // wrote, read at its exit.
    if (output || exits || children.is_none())
        && let Some(capture) = out.as_mut()
    {
        capture.pump();
    }
    (ready, exits || children.is_none())
}

/// Reaps every exited descendant (the shim adopts orphans); returns the task's status once it
/// has exited.
fn reap(task: u32) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(status) => {
                if status.pid() == Some(Pid::from_raw(task as i32)) {
                    found = Some(status);
                }
            }
        }
    }
}

/// The stop signal to the tree, SIGKILL after the grace.
fn stop(
    config: &ShimConfig,
    pid: u32,
    reason: &str,
    out: &mut Option<Capture>,
    children: Option<&SignalFd>,
) -> (Option<WaitStatus>, Option<String>) {
    let me = std::process::id();
    let signal = Signal::try_from(config.stop_signal).unwrap_or(Signal::SIGTERM);
    tree::signal_tree(me, Some(pid), config.cgroup.as_deref(), signal);
    let mut status = reap_until(pid, after_ms(boottime_ms(), config.grace_ms), out, children);
    if status.is_none() {
        tree::signal_tree(me, Some(pid), config.cgroup.as_deref(), Signal::SIGKILL);
        status = reap_until(pid, boottime_ms() + 5_000, out, children);
    }
    (status, Some(reason.to_owned()))
}

/// Reaps until the task has exited (its status) or `deadline` (boot-time ms) passes, reading
/// its output meanwhile (a task that writes while it stops must not block on a full pipe).
/// Its exit is seen at once (the signalfd), not at the next look.
fn reap_until(
    pid: u32,
    deadline: i64,
    out: &mut Option<Capture>,
    children: Option<&SignalFd>,
) -> Option<WaitStatus> {
    loop {
        if let Some(status) = reap(pid) {
            return Some(status);
        }
        let now = boottime_ms();
        if now >= deadline {
            return None;
        }
        wait_for_events(children, out, &[], deadline - now);
    }
}

/// Kills and reaps whatever remains of the tree.
fn kill_rest(config: &ShimConfig, pid: u32) {
    let me = std::process::id();
    for _ in 0..200 {
        let left = tree::signal_tree(me, Some(pid), config.cgroup.as_deref(), Signal::SIGKILL);
        reap(pid);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    clear_cgroups(config);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease_ms: Option<u64>, until: Option<i64>) -> ShimConfig {
        let run = SpawnRequest {
            program: "true".into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: "/".into(),
            output: "/dev/null".into(),
            user: None,
            rlimits: Vec::new(),
        };
        ShimConfig {
            run,
            grace_ms: 1000,
            stop_signal: 15,
            lease_ms,
            lease_until_ms: until,
            lease_length_ms: None,
            cgroup: None,
            log: None,
            limit_cgroups: Vec::new(),
            hold: false,
            lease_file: None,
            attach: None,
        }
    }

    #[test]
    fn an_absolute_deadline_does_not_stretch_with_a_late_read() {
        // Granted at boot-time 10 000 for 3 s; the shim reads it (and a renewal) 2 s late.
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 12_000, 0);
        assert_eq!(lease.expired(12_999, 999), None);
        assert_eq!(lease.expired(13_000, 1000), Some("the node's lease ran out"));
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 12_000, 0);
        assert_eq!(lease.on_line("until 14000\n", 13_900), Line::Other);
        assert_eq!(lease.expired(13_999, 1999), None);
        assert!(lease.expired(14_000, 2000).is_some(), "not 13 900 + 3 000");
        // An older node's relative renewal counts from the read.
        let mut old = Lease::new(&config(Some(3000), None), 12_000, 0);
        assert_eq!(old.expired(14_999, 2999), None);
        assert!(old.expired(15_000, 3000).is_some());
        old.on_line("renew 3000", 14_000);
        assert_eq!(old.wait_ms(14_000), 3000);
        // A late, smaller deadline does not take the lease back.
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 10_000, 0);
        lease.on_line("until 11000", 10_500);
        assert_eq!(lease.expired(12_000, 2000), None);
    }

    #[test]
    fn a_wall_clock_jump_past_the_lease_ends_it() {
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 10_000, 1_000_000);
        // Half a second on both clocks: fine.
        assert_eq!(lease.expired(10_500, 1_000_500), None);
        // The boot-time clock moved 100 ms, the wall clock 10 s: a pause it did not count.
        let why = lease.expired(10_600, 1_010_600).expect("expired");
        assert!(why.contains("wall clock"), "{why}");
        // For good, whatever a renewal says.
        lease.on_line("until 99999999", 10_700);
        assert!(lease.expired(10_700, 1_010_700).is_some());
        // A jump shorter than the lease, or backwards (an NTP step back), is not one.
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 10_000, 1_000_000);
        assert_eq!(lease.expired(10_100, 1_002_900), None);
        assert_eq!(lease.expired(10_200, 900_000), None);
        // Without a lease (`keep`), nothing ends it.
        let mut keep = Lease::new(&config(None, None), 10_000, 0);
        assert_eq!(keep.expired(i64::MAX, i64::MIN), None);
        assert_eq!(keep.on_line("until 5", 0), Line::Other);
        assert_eq!(keep.on_line("stop now", 0), Line::Stop("now".into()));
        assert_eq!(keep.on_line("stop", 0), Line::Stop("stopped by the node".into()));
        assert_eq!(keep.on_line("go", 0), Line::Go);
    }

    #[test]
    fn a_lease_started_with_little_left_is_measured_by_its_whole_length() {
        // 5 ms were left of a 3 s fence timeout at the launch: a jump of 100 ms is no pause.
        let mut config = config(Some(5), Some(10_005));
        config.lease_length_ms = Some(3000);
        let mut lease = Lease::new(&config, 10_000, 0);
        lease.on_line("until 13000", 10_001);
        assert_eq!(lease.expired(10_002, 102), None);
        assert_eq!(lease.wait_ms(10_002), 2998);
    }

    #[test]
    fn the_lease_file_is_read_when_the_deadline_comes_and_only_moves_it_on() {
        let file = std::env::temp_dir().join(format!("shiva-lease-{}", std::process::id()));
        std::fs::write(&file, "until 20000\n").unwrap();
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 10_000, 0);
        lease.refresh(Some(&file), 12_000);
        assert_eq!(lease.wait_ms(12_000), 1000, "not read before the deadline");
        lease.refresh(Some(&file), 13_000);
        assert_eq!(lease.expired(13_000, 3000), None, "renewed by the file");
        assert_eq!(lease.wait_ms(13_000), 3000, "looks again within a lease");
        std::fs::write(&file, "until 1000\n").unwrap();
        lease.refresh(Some(&file), 20_000);
        assert!(lease.expired(20_000, 10_000).is_some(), "an older deadline does not renew");
        std::fs::write(&file, "garbage").unwrap();
        let mut lease = Lease::new(&config(Some(3000), Some(13_000)), 10_000, 0);
        lease.refresh(Some(&file), 13_000);
        assert!(lease.expired(13_000, 3000).is_some());
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn the_lease_timer_says_its_deadline_until_it_goes_off_and_travels_on_a_socket_only() {
        let timer = LeaseTimer::new().unwrap();
        let now = boottime_ms();
        assert_eq!(timer.deadline(now), None, "not set yet");
        timer.set(now + 5_000).unwrap();
        let until = timer.deadline(boottime_ms()).expect("set");
        assert!((now + 4_900..=now + 5_000).contains(&until), "{until}: never later than {}", now + 5_000);
        // Passed on a socket, it is the node's own timer: its renewals are seen.
        let (node, shim) = std::os::unix::net::UnixStream::pair().unwrap();
        send_timer(node.as_fd(), &timer).unwrap();
        let mut buf = [0u8; 64];
        let (n, passed) = receive(shim.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"timer\n");
        let passed = passed.expect("the timer came with its line");
        timer.set(now + 7_000).unwrap();
        assert!(passed.deadline(boottime_ms()).unwrap() > now + 6_000, "the renewal is seen");
        // Gone off: no deadline any more.
        timer.set(boottime_ms()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(passed.deadline(boottime_ms()), None);
        // On a pipe (an older node's stdin), lines only.
        let (read, write) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&write, b"until 5\n").unwrap();
        let (n, passed) = receive(read.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"until 5\n");
        assert!(passed.is_none());
        // Anything else passed as a timer is none.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(LeaseTimer::take(file.into()).is_none());
    }

    #[test]
    fn extreme_lines_and_clocks_do_not_overflow() {
        let mut lease = Lease::new(&config(Some(u64::MAX), Some(i64::MAX)), i64::MAX, i64::MIN);
        lease.on_line("renew 18446744073709551615", i64::MAX);
        lease.on_line("until -9223372036854775808", i64::MIN);
        lease.on_line("until 99999999999999999999999", 0);
        assert_eq!(lease.expired(i64::MIN, i64::MAX), None);
        let _ = lease.wait_ms(i64::MIN);
        let mut short = Lease::new(&config(Some(1), None), i64::MIN, i64::MAX);
        assert!(short.expired(i64::MAX, i64::MIN).is_some());
    }
}
