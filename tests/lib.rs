//! End-to-end harness: a real tansu broker (installed by `scripts/broker`), real `shiva-node`
//! processes, `shiva-ctl` as an operator runs it, and the kernel's process table as the judge.
//!
//! Nothing here skips: a missing broker is built, a failure to start one fails the test.
//!
//! `SHIVA_E2E_BUS=file` runs a test on the file bus instead (a directory of its own instead of
//! a broker): `scripts/test` runs the core subset both ways. A test that needs Kafka itself
//! (kills the broker, reads it with the independent client) fails loudly there.

mod partition;

pub use partition::{Cut, Partition};

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeMap;

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Where cargo put the binaries of this build.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps, the bench from target/<profile>.
    let mut dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

/// Powers off a container booted by `systemd-nspawn --boot` (nspawn takes SIGTERM as a power-off:
/// systemd stops its units) and waits for it, 30 s at most, then kills it.
pub fn power_off(nspawn: &mut Child) {
    let _ = kill(Pid::from_raw(nspawn.id() as i32), Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if let Ok(Some(_)) = nspawn.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = nspawn.kill();
    let _ = nspawn.wait();
}

/// A fresh scratch directory, `shiva-e2e-<pid>-<label>-<n>` in the temporary directory.
///
/// Brokers and nodes remove theirs when they are dropped by a test that passed. The first call
/// in a test binary also removes what test binaries that are gone left behind (those that
/// failed, or were killed): a run of the suite leaves at most its last binary's failures, not
/// gigabytes of broker files. `SHIVA_E2E_KEEP=1` keeps everything, for a look after a run.
pub fn scratch(label: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_scratch);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("shiva-e2e-{}-{label}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn keep_scratch() -> bool {
    std::env::var_os("SHIVA_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Removes the scratch directories of test processes that no longer run.
fn sweep_scratch() {
    if keep_scratch() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("shiva-e2e-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let gone = pid > 0 && kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes a scratch directory when its owner is dropped, unless the test failed (the files
/// tell why) or `SHIVA_E2E_KEEP` is set.
fn drop_scratch(dir: &Path) {
    if !std::thread::panicking() && !keep_scratch() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The shell script of a periodic test task: each run stamps `start`, a `tick` every 50 ms for
/// 0.4 s and `stop` (also on SIGTERM) into `log`, with its run id, slot and node.
pub fn stamping_run(log: &Path) -> String {
    format!(
        "stamp() {{ echo \"$1 $SHIVA_RUN_ID $SHIVA_SLOT $SHIVA_NODE_ID $(date +%s%N)\" >> {log}; }}; \
         trap 'stamp stop; exit 0' TERM; stamp start; \
         for i in 1 2 3 4 5 6 7 8; do sleep 0.05; stamp tick; done; stamp stop",
        log = log.display()
    )
}

/// Every run in a [`stamping_run`] log, by run id: its slot, node, first and last stamp (ns) and
/// whether it stamped `start`.
pub fn stamped_runs(file: &Path) -> BTreeMap<String, (String, String, u128, u128, bool)> {
    let mut runs: BTreeMap<String, (String, String, u128, u128, bool)> = BTreeMap::new();
    for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [what, run, slot, node, at] = fields[..] else { continue };
        let Ok(at) = at.parse::<u128>() else { continue };
        let entry = runs.entry(run.to_owned()).or_insert((slot.to_owned(), node.to_owned(), at, at, false));
        entry.2 = entry.2.min(at);
        entry.3 = entry.3.max(at);
        entry.4 |= what == "start";
    }
    runs
}

/// The node's binaries (`shiva-node`, `shiva-shim`) built from `commit` of this repository, for
/// the upgrade tests: built once per machine into the cache outside the clone
/// (`$SHIVA_CACHE_DIR`, else `$XDG_CACHE_HOME/shiva` or `~/.cache/shiva`, as `scripts/test`),
/// from `git archive` of the commit. Its intermediate files go to this build's target directory,
/// whose dependencies it shares (only the workspace's own crates are compiled again); its
/// binaries to a directory of their own, so this build's are never replaced. Fails loudly when
/// the commit or the build is missing.
pub fn build_of(commit: &str) -> PathBuf {
    let cache = std::env::var_os("SHIVA_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
        base.join("shiva")
    });
    let out = cache.join("builds").join(commit);
    let binaries = out.join("debug");
    if binaries.join("shiva-node").is_file() && binaries.join("shiva-shim").is_file() {
        return binaries;
    }
    let source = scratch(&format!("source-{commit}"));
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!("git -C '{}' archive {commit} | tar -x -C '{}'", repo().display(), source.display()))
        .status()
        .expect("git archive");
    assert!(archive.success(), "cannot extract commit {commit} of this repository (a shallow clone?)");
    let target = bin("shiva-node").parent().and_then(Path::parent).expect("target directory").to_path_buf();
    let built = Command::new("cargo")
        .args(["build", "-p", "shiva-node", "--bins", "--locked"])
        .current_dir(&source)
        .env("CARGO_INCREMENTAL", "0")
        .env("CARGO_BUILD_BUILD_DIR", &target)
        .env("CARGO_TARGET_DIR", &out)
        .status()
        .expect("cargo build");
    assert!(built.success(), "cannot build shiva-node at commit {commit}");
    drop_scratch(&source);
    binaries
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Which bus the end-to-end tests run on: `SHIVA_E2E_BUS` is `kafka` (the default) or `file`.
pub fn file_bus() -> bool {
    match std::env::var("SHIVA_E2E_BUS").as_deref() {
        Err(_) | Ok("" | "kafka") => false,
        Ok("file") => true,
        Ok(other) => panic!("SHIVA_E2E_BUS={other}: expected kafka or file"),
    }
}

/// A tansu broker with SQLite storage in its own directory, or (with `SHIVA_E2E_BUS=file`) a
/// file bus directory.
pub struct Broker {
    /// Data directory.
    pub dir: PathBuf,
    /// Port.
    pub port: u16,
    /// Compaction interval.
    pub interval: String,
    /// The file bus instead of a broker.
    pub file: bool,
    /// Flags every node of this bus gets (the file bus's test settings).
    pub node_flags: Vec<String>,
    /// The port the broker names in its metadata when not its own (a TLS terminator's).
    pub advertise: Option<u16>,
    /// Clients must log in with SASL.
    pub authentication: bool,
}

impl Broker {
    /// Starts a broker (compaction every second, so tests see a really compacted log).
    pub fn start() -> Broker {
        Broker::start_with_interval("1s")
    }

    /// Starts a broker compacting every `interval`.
    pub fn start_with_interval(interval: &str) -> Broker {
        if file_bus() {
            // Small segments cleaned every second, as the test broker compacts every second:
            // tests see a really compacted log.
            let node_flags =
                ["-X", "segment.bytes=16384", "-X", "clean.interval.ms=1000"].map(String::from).to_vec();
            return Broker::file_bus(node_flags);
        }
        let broker = Broker {
            dir: scratch("broker"),
            port: free_port(),
            interval: interval.to_owned(),
            file: false,
            node_flags: Vec::new(),
            advertise: None,
            authentication: false,
        };
        broker.launch();
        broker
    }

    /// Starts a broker that names `advertise` as its port in metadata (a TLS terminator in
    /// front of it) and, with `authentication`, requires a SASL login (add users first with
    /// [`Broker::add_user`], on a broker started without it).
    pub fn start_behind(advertise: Option<u16>, authentication: bool) -> Broker {
        let broker = Broker {
            dir: scratch("broker"),
            port: free_port(),
            interval: "1s".into(),
            file: false,
            node_flags: Vec::new(),
            advertise,
            authentication,
        };
        broker.launch();
        broker
    }

    /// Adds a SASL/SCRAM-SHA-256 user.
    pub fn add_user(&self, name: &str, password: &str) {
        let output = Command::new(repo().join("scripts/broker"))
            .args(["user", "--port", &self.port.to_string(), name, password])
            .output()
            .expect("run scripts/broker user");
        assert!(output.status.success(), "adding a user failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Stops the broker and starts it again on the same data, requiring SASL logins.
    pub fn restart_with_authentication(&mut self) {
        let output =
            Command::new(repo().join("scripts/broker")).args(["stop", "--dir"]).arg(&self.dir).output();
        assert!(output.is_ok_and(|output| output.status.success()), "stopping the broker failed");
        self.authentication = true;
        self.launch();
    }

    /// A file bus in a directory of its own; its nodes get `node_flags`.
    pub fn file_bus(node_flags: Vec<String>) -> Broker {
        Broker {
            dir: scratch("filebus"),
            port: 0,
            interval: String::new(),
            file: true,
            node_flags,
            advertise: None,
            authentication: false,
        }
    }

    fn launch(&self) {
        assert!(!self.file, "this test needs Kafka: it cannot run with SHIVA_E2E_BUS=file");
        let output = Command::new(repo().join("scripts/broker"))
            .args(["start", "--dir"])
            .arg(&self.dir)
            .args(["--port", &self.port.to_string(), "--maintenance-interval", &self.interval])
            .args(
                self.advertise
                    .map(|port| ["--advertise-port".to_owned(), port.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(self.authentication.then_some("--authentication"))
            .output()
            .expect("run scripts/broker");
        assert!(
            output.status.success(),
            "broker failed to start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `kafka://127.0.0.1:PORT` (the advertised port, when not its own), or `file:///DIR/bus`.
    pub fn url(&self) -> String {
        if self.file {
            return format!("file://{}", self.dir.join("bus").display());
        }
        format!("kafka://127.0.0.1:{}", self.advertise.unwrap_or(self.port))
    }

    /// SIGKILL.
    pub fn kill9(&self) {
        assert!(!self.file, "this test needs Kafka: it cannot run with SHIVA_E2E_BUS=file");
        let status = Command::new(repo().join("scripts/broker"))
            .args(["kill", "--dir"])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Starts again on the same data and port.
    pub fn restart(&self) {
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.file {
            let _ =
                Command::new(repo().join("scripts/broker")).args(["stop", "--dir"]).arg(&self.dir).output();
        }
        drop_scratch(&self.dir);
    }
}

/// The test timings every `Node::start*` gives a node (heartbeat 100ms, leader 600ms, node 1.5s).
const TEST_TIMINGS: [&str; 6] =
    ["--heartbeat-interval", "100ms", "--leader-timeout", "600ms", "--node-timeout", "1500ms"];

/// A running `shiva-node`.
pub struct Node {
    /// Its id.
    pub id: String,
    /// Its stderr log.
    pub log: PathBuf,
    /// Its workspace.
    pub workspace: PathBuf,
    args: Vec<String>,
    /// A command prefix (e.g. `ip netns exec NAME`).
    wrapper: Vec<String>,
    /// Extra environment.
    env: Vec<(String, String)>,
    /// The binary it runs (`shiva-node` of this build, or a copy a test replaces to upgrade it).
    program: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Starts a node with test timings (heartbeat 100ms, leader 600ms, node 1.5s).
    pub fn start(broker: &Broker, cluster: &str, id: &str, extra: &[&str]) -> Node {
        Node::launch(broker, cluster, id, &[&TEST_TIMINGS[..], extra].concat())
    }

    /// Starts a node with test timings and extra environment (e.g. a test-only switch).
    pub fn start_with_env(
        broker: &Broker,
        cluster: &str,
        id: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let args = [&TEST_TIMINGS[..], extra].concat();
        let env = env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        Node::launch_full(broker, cluster, id, &args, Vec::new(), env)
    }

    /// Starts a node with test timings from the binary `program`: a copy in a directory of its
    /// own (with `shiva-shim` beside it), which a test replaces to upgrade the node in place.
    pub fn start_program(broker: &Broker, cluster: &str, id: &str, extra: &[&str], program: &Path) -> Node {
        let mut node =
            Node::prepare(broker, cluster, id, &[&TEST_TIMINGS[..], extra].concat(), Vec::new(), Vec::new());
        node.program = program.to_path_buf();
        node.spawn();
        node
    }

    /// Starts a node with test timings in `partition`'s network namespace.
    pub fn start_in(partition: &Partition, broker: &Broker, cluster: &str, id: &str, extra: &[&str]) -> Node {
        Node::launch_wrapped(broker, cluster, id, &[&TEST_TIMINGS[..], extra].concat(), partition.exec())
    }

    /// Starts a node with the default timings and `extra` flags.
    pub fn launch(broker: &Broker, cluster: &str, id: &str, extra: &[&str]) -> Node {
        Node::launch_wrapped(broker, cluster, id, extra, Vec::new())
    }

    fn launch_wrapped(
        broker: &Broker,
        cluster: &str,
        id: &str,
        extra: &[&str],
        wrapper: Vec<String>,
    ) -> Node {
        Node::launch_full(broker, cluster, id, extra, wrapper, Vec::new())
    }

    fn launch_full(
        broker: &Broker,
        cluster: &str,
        id: &str,
        extra: &[&str],
        wrapper: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Node {
        let mut node = Node::prepare(broker, cluster, id, extra, wrapper, env);
        node.spawn();
        node
    }

    fn prepare(
        broker: &Broker,
        cluster: &str,
        id: &str,
        extra: &[&str],
        wrapper: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Node {
        let workspace = scratch(&format!("ws-{id}"));
        let mut args: Vec<String> = vec![
            "--bus".into(),
            broker.url(),
            "--cluster".into(),
            cluster.into(),
            "--node-id".into(),
            id.into(),
            "--workspace".into(),
            workspace.display().to_string(),
        ];
        args.extend(broker.node_flags.iter().cloned());
        if !extra.contains(&"--http") {
            // Each node its own free port (read back with `http_addr`); none in a namespace,
            // whose loopback may be down.
            let http = if wrapper.is_empty() { "127.0.0.1:0" } else { "off" };
            args.extend(["--http".to_owned(), http.to_owned()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = workspace.join("node.log");
        let program = bin("shiva-node");
        Node { id: id.into(), log, workspace, args, wrapper, env, program, child: None }
    }

    fn spawn(&mut self) {
        // A restarted node binds a new port: `http_url` waits for the new one.
        let _ = std::fs::remove_file(self.workspace.join("http.addr"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut command = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(&self.program);
                command
            }
            None => Command::new(&self.program),
        };
        // A process group of its own, as under a service manager or a shell's job control:
        // `signal_group` reaches the node and whatever stays in its group.
        let child = command
            .process_group(0)
            .args(&self.args)
            .env("SHIVA_LOG", "info,shiva_node=debug")
            // Never a configuration file of the host (/etc/shiva/node.toml): the flags only.
            .env("SHIVA_CONFIG", "/dev/null")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn shiva-node");
        self.child = Some(child);
    }

    /// The node's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Starts the same node again (a new incarnation) after it stopped.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "node {} still runs", self.id);
        self.spawn();
    }

    /// SIGKILL, reaped.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node {} did not exit after SIGTERM", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT…).
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Sends `signal` to the node's whole process group (`kill -STOP -<pgid>`, Ctrl-Z).
    pub fn signal_group(&self, signal: Signal) {
        nix::sys::signal::killpg(Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit by itself; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        exit_within(&mut child, timeout)
            .unwrap_or_else(|| panic!("node {} still runs after {timeout:?}:\n{}", self.id, self.log_text()))
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        }
        self.kill9();
        drop_scratch(&self.workspace);
    }
}

/// `shiva-ctl` against one cluster.
pub struct Ctl {
    bus: String,
    cluster: String,
    /// Flags before the subcommand (`-X` settings, a signing key).
    pub flags: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

impl Ctl {
    /// A ctl for `cluster` on `broker`.
    pub fn new(broker: &Broker, cluster: &str) -> Ctl {
        Ctl { bus: broker.url(), cluster: cluster.into(), flags: Vec::new(), env: Vec::new() }
    }

    /// A ctl for `cluster` on `broker` with `flags` before every subcommand.
    pub fn with_flags(broker: &Broker, cluster: &str, flags: &[&str]) -> Ctl {
        let flags = flags.iter().map(|flag| flag.to_string()).collect();
        Ctl { bus: broker.url(), cluster: cluster.into(), flags, env: Vec::new() }
    }

    /// Runs `shiva-ctl ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin("shiva-ctl"))
            .args(["--bus", &self.bus, "--cluster", &self.cluster, "--timeout", "5s"])
            .args(&self.flags)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .args(args)
            .output()
            .expect("run shiva-ctl")
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "shiva-ctl {args:?} failed ({:?}): {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).expect("--json prints JSON")
    }

    /// Runs with `--json`; `None` when the command fails (for polling loops, where the
    /// cluster may not be up yet).
    pub fn try_json(&self, args: &[&str]) -> Option<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let output = self.run(&args);
        if !output.status.success() {
            eprintln!("(polling) shiva-ctl {args:?}: {}", String::from_utf8_lossy(&output.stderr).trim());
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// `list --json` as (id → row); empty while the cluster is unreachable.
    pub fn tasks(&self) -> std::collections::BTreeMap<String, Value> {
        let Some(rows) = self.try_json(&["list"]) else { return Default::default() };
        rows.as_array()
            .unwrap()
            .iter()
            .map(|row| (row["id"].as_str().unwrap().to_owned(), row.clone()))
            .collect()
    }
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Live (non-zombie) processes whose environment has `SHIVA_TASK_ID=<task>` and
/// `E2E=<marker>`, with their `SHIVA_NODE_ID`.
pub fn task_processes(marker: &str, task: &str) -> Vec<(i32, String)> {
    tasks_processes(marker).remove(task).unwrap_or_default()
}

/// Every live (non-zombie) process whose environment has `E2E=<marker>` and a `SHIVA_TASK_ID`,
/// by task, with its pid and `SHIVA_NODE_ID`: one walk of the process table.
pub fn tasks_processes(marker: &str) -> BTreeMap<String, Vec<(i32, String)>> {
    let marker = format!("E2E={marker}");
    let read = |path: &Path| -> Vec<String> {
        let environ = std::fs::read(path).unwrap_or_default();
        environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
    };
    let task_of =
        |vars: &[String]| vars.iter().find_map(|v| v.strip_prefix("SHIVA_TASK_ID=")).map(str::to_owned);
    let node_of =
        |vars: &[String]| vars.iter().find_map(|v| v.strip_prefix("SHIVA_NODE_ID=")).map(str::to_owned);
    let mut found: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let vars = read(&entry.path().join("environ"));
        let Some(task) = task_of(&vars) else { continue };
        if !vars.contains(&marker) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next().unwrap_or('?')).unwrap_or('?');
        if state == 'Z' || state == 'X' {
            continue;
        }
        let node = match node_of(&vars) {
            Some(node) => node,
            // Every task process carries SHIVA_NODE_ID. A process torn down while its environment
            // is read (a `sleep` of the task exiting) yields a cut-off read: read it again, and
            // count it only if it is still there and still lacks it.
            None => {
                let again = read(&entry.path().join("environ"));
                if task_of(&again).as_ref() != Some(&task) {
                    continue;
                }
                node_of(&again).unwrap_or_default()
            }
        };
        found.entry(task).or_default().push((pid, node));
    }
    found
}

/// Whether a pid is alive (and not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rsplit_once(") ") {
        Some((_, rest)) => !rest.starts_with('Z') && !rest.starts_with('X'),
        None => false,
    }
}

/// The Python with confluent-kafka (the independent Kafka client of the tests): `SHIVA_E2E_PYTHON`
/// as `scripts/test` sets it up, else `python3`; fails loudly without the module.
pub fn python() -> String {
    let python = std::env::var("SHIVA_E2E_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = Command::new(&python).args(["-c", "import confluent_kafka"]).output().expect("run python");
    assert!(
        check.status.success(),
        "{python} cannot import confluent_kafka (scripts/test installs it): {}",
        String::from_utf8_lossy(&check.stderr)
    );
    python
}

/// A unique cluster name for a test.
pub fn cluster(label: &str) -> String {
    format!("{label}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// How long a cluster gets to settle after a change.
pub const SETTLE: Duration = Duration::from_secs(20);

/// A broker, a cluster name, its nodes and a ctl.
pub struct Cluster {
    /// The broker.
    pub broker: Broker,
    /// Cluster name (also the `E2E` marker of its tasks).
    pub name: String,
    /// A ctl for it.
    pub ctl: Ctl,
    /// Its nodes.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// `count` nodes n1..nN; `tags[i]` are extra flags of node i+1.
    pub fn start(label: &str, count: usize, extra: &[&[&str]]) -> Cluster {
        let broker = Broker::start();
        let name = cluster(label);
        let ctl = Ctl::new(&broker, &name);
        let nodes = (1..=count)
            .map(|i| Node::start(&broker, &name, &format!("n{i}"), extra.get(i - 1).copied().unwrap_or(&[])))
            .collect();
        let cluster = Cluster { broker, name, ctl, nodes };
        cluster.wait_nodes(count);
        cluster
    }

    pub fn node(&mut self, id: &str) -> &mut Node {
        self.nodes.iter_mut().find(|node| node.id == id).expect("known node")
    }

    /// Waits until `count` nodes are alive with exactly one leader; returns the leader.
    pub fn wait_nodes(&self, count: usize) -> String {
        let mut leader = String::new();
        wait_until(SETTLE, &format!("{count} nodes alive with one leader"), || {
            let Some(nodes) = self.ctl.try_json(&["nodes"]) else { return false };
            let rows = nodes.as_array().unwrap();
            let alive = rows.iter().filter(|n| n["alive"] == true).count();
            let leaders: Vec<&Value> = rows.iter().filter(|n| n["leader"] == true).collect();
            if alive == count && leaders.len() == 1 {
                leader = leaders[0]["id"].as_str().unwrap().to_owned();
                true
            } else {
                false
            }
        });
        leader
    }

    pub fn submit(&self, id: &str, tags: &[&str]) {
        let mut args = vec!["submit", "--id", id, "--env"];
        let marker = format!("E2E={}", self.name);
        args.push(&marker);
        let tags = tags.join(",");
        if !tags.is_empty() {
            args.extend(["--tags", &tags]);
        }
        args.extend(["--stop-grace", "2s", "--", "sleep", "1000"]);
        self.ctl.ok(&args);
    }

    /// Waits until every task in `tasks` is `running` per `list` and has exactly one live
    /// process, on the node `list` names; returns task → node.
    pub fn wait_running_once(&self, tasks: &[String]) -> BTreeMap<String, String> {
        let mut placement = BTreeMap::new();
        wait_until(SETTLE, &format!("{tasks:?} each running exactly once"), || {
            let rows = self.ctl.tasks();
            placement.clear();
            tasks.iter().all(|task| {
                let Some(row) = rows.get(task) else { return false };
                let node = row["node"].as_str().unwrap_or("").to_owned();
                let processes = task_processes(&self.name, task);
                // Running exactly once, where `list` says, with the pid `list` shows.
                let once = row["state"] == "running"
                    && processes.len() == 1
                    && processes[0].1 == node
                    && row["pid"].as_i64() == Some(processes[0].0 as i64);
                placement.insert(task.clone(), node);
                once
            })
        });
        placement
    }

    /// Submits `count` untagged tasks `<prefix>1…` and waits until each runs exactly once;
    /// returns their ids and placement.
    pub fn run_tasks(&self, prefix: &str, count: usize) -> (Vec<String>, BTreeMap<String, String>) {
        let tasks: Vec<String> = (1..=count).map(|i| format!("{prefix}{i}")).collect();
        for task in &tasks {
            self.submit(task, &[]);
        }
        let placement = self.wait_running_once(&tasks);
        (tasks, placement)
    }

    pub fn assert_never_twice(&self, tasks: &[String], for_how_long: Duration) {
        let deadline = Instant::now() + for_how_long;
        while Instant::now() < deadline {
            for task in tasks {
                let processes = task_processes(&self.name, task);
                assert!(processes.len() <= 1, "{task} runs {} times: {processes:?}", processes.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A real S3 server (moto, in memory; `scripts/test` installs it next to confluent-kafka) with one
/// bucket, killed on drop.
pub struct Moto {
    child: Child,
    /// Its endpoint URL.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
}

impl Moto {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> Moto {
        let python = python();
        let check =
            Command::new(&python).args(["-c", "import moto.server, boto3"]).output().expect("run python");
        assert!(
            check.status.success(),
            "{python} cannot import moto (scripts/test installs moto[server]): {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(scratch("moto").join("moto.log")).unwrap();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start moto");
        let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_owned() };
        wait_until(Duration::from_secs(30), "moto listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let create = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{bucket}')",
            moto.endpoint
        );
        let output = Command::new(&python).args(["-c", &create]).output().unwrap();
        assert!(output.status.success(), "create bucket: {}", String::from_utf8_lossy(&output.stderr));
        moto
    }

    /// The AWS environment variables a client needs to reach it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        s3_env(&self.endpoint)
    }
}

/// The environment that points the archiver's S3 client at `endpoint`, with the test
/// credentials moto takes.
pub fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
    ]
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tests/kafka_tool.py` (the independent Kafka client, confluent-kafka) against `broker`;
/// fails loudly when it fails.
pub fn kafka_tool(broker: &Broker, args: &[&str]) -> Output {
    kafka_tool_at(&format!("127.0.0.1:{}", broker.port), &serde_json::json!({}), args)
}

/// `tests/kafka_tool.py` against `bootstrap`, every client with the librdkafka `settings` (a
/// JSON object: a codec, TLS, SASL).
pub fn kafka_tool_at(bootstrap: &str, settings: &Value, args: &[&str]) -> Output {
    let output = Command::new(python())
        .arg(repo().join("tests/kafka_tool.py"))
        .arg(bootstrap)
        .args(args)
        .env("KAFKA_TOOL_CONFIG", settings.to_string())
        .output()
        .expect("run kafka_tool.py");
    assert!(output.status.success(), "kafka_tool {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// The value of record `i` as `kafka_tool.py produce` writes it (every 97th is binary).
pub fn produced_value(i: usize) -> Vec<u8> {
    if i.is_multiple_of(97) {
        let mut v = b"\xff\x00".to_vec();
        v.extend_from_slice(i.to_string().as_bytes());
        v.push(b'\n');
        v
    } else {
        format!("record {i}").into_bytes()
    }
}

/// Copies of one task as spans (first and last stamp in ns, and a name for the message), in any
/// order: asserts that no two overlap, and returns the gaps between consecutive ones in ms.
pub fn assert_one_at_a_time(mut spans: Vec<(u128, u128, String)>) -> Vec<f64> {
    spans.sort();
    let mut gaps = Vec::new();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 < pair[1].0,
            "two copies overlapped: {} until {} and {} from {}",
            pair[0].2,
            pair[0].1,
            pair[1].2,
            pair[1].0
        );
        gaps.push((pair[1].0 - pair[0].1) as f64 / 1e6);
    }
    gaps
}

/// A test certificate authority made with the `openssl` command line: a CA, a server
/// certificate for 127.0.0.1 and a client certificate it signed, and a second CA that signed
/// nothing (the "wrong CA").
pub struct TestCa {
    /// Where the files are: `ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key`,
    /// `other-ca.pem`.
    pub dir: PathBuf,
}

impl TestCa {
    /// Makes the files (EC P-256 keys, valid two days).
    pub fn make() -> TestCa {
        let dir = scratch("ca");
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl").args(args).current_dir(&dir).output().expect("run openssl");
            assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"];
        for ca in ["ca", "other-ca"] {
            let (keyout, out, subject) =
                (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=shiva test {ca}"));
            openssl(
                &[&["req", "-x509"], &key[..], &["-keyout", &keyout, "-out", &out, "-subj", &subject]]
                    .concat(),
            );
        }
        for (name, extension) in
            [("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")]
        {
            let (keyout, out, subject) =
                (format!("{name}.key"), format!("{name}.pem"), format!("/CN=shiva test {name}"));
            openssl(
                &[
                    &["req", "-x509", "-CA", "ca.pem", "-CAkey", "ca.key"],
                    &key[..],
                    &["-keyout", &keyout, "-out", &out, "-subj", &subject, "-addext", extension],
                ]
                .concat(),
            );
        }
        TestCa { dir }
    }

    /// The path of one of the files, as text.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `-X` flags for a client that trusts `ca` and, with `client_cert`, shows the client
    /// certificate.
    pub fn client_flags(&self, ca: &str, client_cert: bool) -> Vec<String> {
        let mut settings =
            vec!["security.protocol=ssl".to_owned(), format!("ssl.ca.location={}", self.file(ca))];
        if client_cert {
            settings.push(format!("ssl.certificate.location={}", self.file("client.pem")));
            settings.push(format!("ssl.key.location={}", self.file("client.key")));
        }
        settings.into_iter().flat_map(|setting| ["-X".to_owned(), setting]).collect()
    }
}

/// A TLS terminator (Debian's stunnel) on `port` in front of a broker's plain port.
pub struct Terminator {
    /// The port clients connect to.
    pub port: u16,
    child: Child,
}

impl Terminator {
    /// Starts stunnel on `port`, forwarding to `backend`; with `require_client_cert`, only
    /// clients showing a certificate of the test CA get through (mutual TLS).
    pub fn start(ca: &TestCa, port: u16, backend: u16, require_client_cert: bool) -> Terminator {
        let mut config = format!(
            "foreground = yes\npid =\ndebug = 4\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\n\
             cert = {}\nkey = {}\n",
            ca.file("server.pem"),
            ca.file("server.key")
        );
        if require_client_cert {
            config
                .push_str(&format!("CAfile = {}\nverifyChain = yes\nrequireCert = yes\n", ca.file("ca.pem")));
        }
        let path = ca.dir.join(format!("stunnel-{port}.conf"));
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(ca.dir.join(format!("stunnel-{port}.log"))).unwrap();
        let child = Command::new("stunnel")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("stunnel (Debian's stunnel4) must be installed: scripts/test installs it");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "stunnel did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Terminator { port, child }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many records `shiva-archiver fsck` says an archive holds (the sum of its per-partition
/// lines, `… N files, R records …`).
pub fn fsck_records(stdout: &[u8]) -> u64 {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| line.split(" files, ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

impl Node {
    /// The base URL of its HTTP API (`http://127.0.0.1:PORT`), once it has bound it.
    pub fn http_url(&self) -> String {
        let path = self.workspace.join("http.addr");
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && text.ends_with('\n')
            {
                return format!("http://{}", text.trim());
            }
            assert!(Instant::now() < deadline, "node {} wrote no http.addr:\n{}", self.id, self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An HTTP answer: status, content type and body.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: String,
    /// Body.
    pub body: String,
}

impl Answer {
    /// The body as JSON (panics, showing it, when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("not JSON ({err}): {self:?}"))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// `child`'s exit status once it exits within `timeout`; `None` if it did not, and then it is
/// killed and reaped (a failing test leaves no process behind).
pub fn exit_within(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP request (`body`: sent as is), with a bearer `token`.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> Answer {
    let agent = agent();
    let bearer = token.map(|token| format!("Bearer {token}"));
    macro_rules! with_token {
        ($request:expr) => {{
            let request = $request;
            match &bearer {
                Some(bearer) => request.header("Authorization", bearer),
                None => request,
            }
        }};
    }
    let response = match method {
        "GET" => with_token!(agent.get(url)).call(),
        "DELETE" => with_token!(agent.delete(url)).call(),
        "POST" => match body {
            Some(body) => with_token!(agent.post(url)).header("Content-Type", "application/json").send(body),
            None => with_token!(agent.post(url)).send_empty(),
        },
        "PUT" => with_token!(agent.put(url)).send(body.unwrap_or("")),
        other => panic!("no method {other} in this helper"),
    };
    let mut response = response.unwrap_or_else(|err| panic!("{method} {url}: {err}"));
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").and_then(|value| value.to_str().ok()).unwrap_or("").to_owned();
    let body = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
    Answer { status, content_type, body }
}

/// A server-sent event stream being read by a thread: its events arrive on `events`.
pub struct EventStream {
    /// `(event, data)` pairs, in order.
    pub events: std::sync::mpsc::Receiver<(String, String)>,
}

impl EventStream {
    /// Opens `url` (with `token` as a bearer, when given); panics unless it answers 200 with
    /// `text/event-stream`.
    pub fn open(url: &str, token: Option<&str>) -> EventStream {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut request = agent.get(url);
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let response = request.call().unwrap_or_else(|err| panic!("GET {url}: {err}"));
        assert_eq!(response.status().as_u16(), 200, "GET {url}");
        let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(kind.starts_with("text/event-stream"), "GET {url}: {kind}");
        let (sender, events) = std::sync::mpsc::channel();
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        std::thread::spawn(move || {
            use std::io::BufRead;
            let (mut event, mut data) = (String::new(), String::new());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty()
                        && sender.send((std::mem::take(&mut event), std::mem::take(&mut data))).is_err()
                    {
                        return;
                    }
                    event.clear();
                } else if let Some(value) = line.strip_prefix("event:") {
                    event = value.trim_start().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
        });
        EventStream { events }
    }

    /// The first event within `timeout` for which `wanted(event, data as JSON)` holds; panics
    /// with `what` (and the events seen) otherwise.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut wanted: impl FnMut(&str, &Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((event, data)) => {
                    let value: Value = serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                    if wanted(&event, &value) {
                        return value;
                    }
                    seen.push(format!("{event}: {}", data.chars().take(200).collect::<String>()));
                }
                Err(_) => panic!(
                    "no event {what} within {timeout:?}; seen: {:#?}",
                    &seen[seen.len().saturating_sub(20)..]
                ),
            }
        }
    }
}
