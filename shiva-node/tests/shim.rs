//! The run shim with real processes: a task that daemonizes with `setsid` is stopped with its
//! tree; a shim whose lease is not renewed stops its task; a shim killed with SIGKILL leaves
//! nothing behind (the node, a subreaper, kills the orphans); leftovers of an earlier node are
//! found by their records and stopped.
//!
//! One test at a time in this process: cleaning up after a dead shim kills every descendant of
//! the process that no live shim accounts for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shiva_node::clock::Boot;

use shiva_node::shim::LeaseTimer;
use shiva_node::supervisor::shim::{LaunchOptions, ShimLauncher};
use shiva_node::supervisor::spawn::SpawnRequest;
use shiva_node::tree::Isolation;
use tokio::sync::watch;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shiva-shim-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A launcher that keeps its lease timer and lease file, as a node's does.
fn launcher(dir: &Path, fence_timeout: Duration, lease: watch::Receiver<Option<Boot>>) -> ShimLauncher {
    let launcher = bare_launcher(dir, fence_timeout, lease);
    // The records directory is this process's for every test: no lease of an earlier test.
    let _ = std::fs::remove_file(launcher.lease_file());
    tokio::spawn(launcher.keep_lease());
    launcher
}

/// The same without a lease timer: its shims read the lease file, as from a node of protocol 2.
fn launcher_without_timer(
    dir: &Path,
    fence_timeout: Duration,
    lease: watch::Receiver<Option<Boot>>,
) -> ShimLauncher {
    let launcher = ShimLauncher { timer: None, ..bare_launcher(dir, fence_timeout, lease) };
    let _ = std::fs::remove_file(launcher.lease_file());
    tokio::spawn(launcher.keep_lease());
    launcher
}

fn bare_launcher(dir: &Path, fence_timeout: Duration, lease: watch::Receiver<Option<Boot>>) -> ShimLauncher {
    ShimLauncher {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_shiva-shim")),
        isolation: Isolation::ProcessGroup,
        fence_timeout,
        lease,
        records: records(dir),
        controllers: Default::default(),
        logs_dir: dir.join("logs"),
        shipper: None,
        secrets: None,
        timer: Some(Arc::new(LeaseTimer::new().unwrap())),
        file_readers: Arc::new(watch::Sender::new(0)),
    }
}

/// A node's lease of `fence` that keeps being renewed (as heartbeats are read back) until the
/// returned flag is cleared.
fn renewed_lease(fence: Duration) -> (watch::Receiver<Option<Boot>>, Arc<AtomicBool>) {
    let (tx, rx) = watch::channel(Some(Boot::now() + fence));
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    tokio::spawn(async move {
        while flag.load(Ordering::SeqCst) {
            tx.send_replace(Some(Boot::now() + fence));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Dropping the sender keeps the last deadline, which then passes.
        std::mem::forget(tx);
    });
    (rx, healthy)
}

fn options(run: &str, grace_ms: u64) -> LaunchOptions {
    LaunchOptions {
        task: "t".into(),
        run: run.into(),
        grace: Duration::from_millis(grace_ms),
        stop_signal: 15,
        exclusive: true,
        user: None,
        allow_root: true,
        secrets: Default::default(),
        memory_max: None,
        cpu_max: None,
        files: Default::default(),
        meta: None,
    }
}

/// Like a node's, one records directory for every run of this process: cleaning up after a
/// dead shim spares the shims recorded there.
fn records(dir: &Path) -> PathBuf {
    dir.parent().unwrap().join(format!("shiva-shim-{}-records", std::process::id()))
}

/// The shims' records (`<shim pid>.json`) in the node's directory of shims.
fn shim_records(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(records(dir)).unwrap();
    entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect()
}

/// A task that starts a `setsid` daemon and a grandchild, writing their pids to `pids`.
fn escaping_task(dir: &Path) -> SpawnRequest {
    let pids = dir.join("pids");
    let script = format!(
        "setsid sh -c 'echo $$ >> {p}; exec sleep 100' & sh -c 'echo $$ >> {p}; exec sleep 100' & echo $$ >> {p}; wait",
        p = pids.display()
    );
    SpawnRequest {
        program: "sh".into(),
        args: vec!["-c".into(), script],
        env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
        cwd: dir.join("cwd"),
        output: dir.join("out.log"),
        user: None,
        rlimits: vec![],
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

async fn three_pids(dir: &Path) -> Vec<i32> {
    for _ in 0..250 {
        let text = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
        if text.lines().count() == 3 {
            let pids: Vec<i32> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
            assert!(pids.iter().all(|pid| alive(*pid)), "all started");
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the task did not start its processes");
}

async fn all_gone(pids: &[i32]) {
    for _ in 0..100 {
        if pids.iter().all(|pid| !alive(*pid)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<_> = pids.iter().filter(|pid| alive(**pid)).collect();
    panic!("processes of the run survived: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_takes_a_setsid_daemon_with_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("stop");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(3));
    let shims = launcher(&dir, Duration::from_secs(3), lease);
    let mut run = shims.launch(escaping_task(&dir), &options("r1", 500), None).await.unwrap();
    let pids = three_pids(&dir).await;
    run.stop("test");
    let ended = run.wait().await;
    assert_eq!(ended.stopped.as_deref(), Some("test"));
    all_gone(&pids).await;
    assert_eq!(std::fs::read_dir(records(&dir)).unwrap().count(), 0, "record removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_start_starts_nothing_before_its_go() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("staged");
    // A lease shorter than the wait: renewals keep the staged shim too.
    let (lease, _healthy) = renewed_lease(Duration::from_millis(600));
    let shims = Arc::new(launcher(&dir, Duration::from_millis(600), lease));
    let (go, went) = tokio::sync::oneshot::channel();
    let launching = {
        let shims = shims.clone();
        let request = escaping_task(&dir);
        // A run (with its meta): its shim listens for a node that comes back, and leaves its end.
        let meta = shiva_node::supervisor::shim::RunMeta {
            task: "s1".into(),
            run: uuid::Uuid::new_v4(),
            service: None,
        };
        let options = LaunchOptions { meta: Some(meta), ..options("s1", 500) };
        tokio::spawn(async move { shims.launch(request, &options, Some(went)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!dir.join("pids").exists(), "nothing started before the go");
    assert!(!launching.is_finished(), "the launch waits for its go");
    assert_eq!(shim_records(&dir).len(), 1, "the staged shim is recorded");
    // The files its start and its end are written to are made while it is staged (no inode
    // allocated at the instant, when many runs start and end together).
    let shim = shim_records(&dir)[0].file_stem().unwrap().to_str().unwrap().to_owned();
    for prepared in [format!("{shim}.json.new"), format!("{shim}.exit.new")] {
        assert!(records(&dir).join(&prepared).exists(), "{prepared} made ahead");
    }
    assert_eq!(segments(&dir, "t").len(), 1, "the output's first segment made ahead");
    let went_at = Instant::now();
    go.send(()).unwrap();
    let mut run = launching.await.unwrap().expect("started at the go");
    let pids = three_pids(&dir).await;
    assert!(went_at.elapsed() < Duration::from_secs(2));
    run.stop("test");
    run.wait().await;
    all_gone(&pids).await;
    assert_eq!(std::fs::read_dir(records(&dir)).unwrap().count(), 0, "record removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_start_called_off_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("called-off");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(3));
    let shims = Arc::new(launcher(&dir, Duration::from_secs(3), lease));
    let (go, went) = tokio::sync::oneshot::channel::<()>();
    let launching = {
        let shims = shims.clone();
        let request = escaping_task(&dir);
        tokio::spawn(async move { shims.launch(request, &options("s2", 500), Some(went)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shim_pids: Vec<u32> = shiva_node::tree::children(std::process::id()).into_iter().collect();
    assert!(!shim_pids.is_empty(), "the staged shim runs");
    drop(go);
    let err = launching.await.unwrap().expect_err("called off");
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "{err}");
    assert!(!dir.join("pids").exists(), "nothing started");
    assert_eq!(std::fs::read_dir(records(&dir)).unwrap().count(), 0, "record removed");
    all_gone(&shim_pids.iter().map(|pid| *pid as i32).collect::<Vec<_>>()).await;
    assert_eq!(segments(&dir, "t"), Vec::<PathBuf>::new(), "the empty segment made ahead removed");
}

/// The output segments of `task`'s runs.
fn segments(dir: &Path, task: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join("logs").join(task)) else { return Vec::new() };
    entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_renewed_stops_the_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("lease");
    let (lease, healthy) = renewed_lease(Duration::from_millis(600));
    let shims = launcher(&dir, Duration::from_millis(600), lease);
    // No shim reads the lease file: it is not written.
    lease_not_renewed_stops_the_run(&dir, &shims, &healthy, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_renewed_stops_the_run_also_without_the_timer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("lease-file");
    let (lease, healthy) = renewed_lease(Duration::from_millis(600));
    let shims = launcher_without_timer(&dir, Duration::from_millis(600), lease);
    // The lease file is kept for the shim that reads it, and gone with it.
    lease_not_renewed_stops_the_run(&dir, &shims, &healthy, true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shims.lease_file().exists(), "the lease file outlived its last reader");
}

/// A run renewed while `healthy`, and stopped by its shim one lease after it is not; `file`:
/// whether the lease file is kept meanwhile.
async fn lease_not_renewed_stops_the_run(dir: &Path, shims: &ShimLauncher, healthy: &AtomicBool, file: bool) {
    let dir = dir.to_path_buf();
    let mut run = shims.launch(escaping_task(&dir), &options("r2", 200), None).await.unwrap();
    let pids = three_pids(&dir).await;
    // Renewed while healthy: still running well past one lease.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pids.iter().all(|pid| alive(*pid)), "renewals keep the run");
    assert_eq!(shims.lease_file().exists(), file, "the lease file is kept only for a shim that reads it");
    healthy.store(false, Ordering::SeqCst);
    let ended = tokio::time::timeout(Duration::from_secs(5), run.wait()).await.expect("stopped by the shim");
    assert_eq!(ended.stopped.as_deref(), Some("the node's lease ran out"));
    all_gone(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shim_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().await;
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let dir = workspace("kill9");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(3));
    let shims = launcher(&dir, Duration::from_secs(3), lease);
    let mut run = shims.launch(escaping_task(&dir), &options("r3", 500), None).await.unwrap();
    let pids = three_pids(&dir).await;
    let shim: i32 = shim_records(&dir)[0].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), run.wait()).await.expect("the node notices");
    assert_eq!(ended.exit, None);
    all_gone(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_an_earlier_node_are_stopped_by_their_records() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("leftovers");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(30));
    let shims = launcher(&dir, Duration::from_secs(30), lease);
    let run = shims.launch(escaping_task(&dir), &options("r4", 500), None).await.unwrap();
    let pids = three_pids(&dir).await;
    // The "earlier node" forgets its run without stopping it; a record whose pid is reused by
    // another process (a different start time) must not be killed.
    std::mem::forget(run);
    // This very process plays the bystander: killed by mistake, the test fails loudly.
    let me = std::process::id();
    let forged =
        serde_json::json!({"shim": me, "shim_start": 1, "task": me, "task_start": 1, "cgroup": null});
    std::fs::write(records(&dir).join(format!("{me}.json")), forged.to_string()).unwrap();
    let next = launcher(&dir, Duration::from_secs(30), watch::channel(None).1);
    assert_eq!(next.stop_leftovers(), 1, "the live run is stopped, the forged record only removed");
    all_gone(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_run_outlives_the_lease_and_a_fenced_node_starts_no_exclusive_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("keep");
    let (lease, healthy) = renewed_lease(Duration::from_millis(400));
    let shims = launcher(&dir, Duration::from_millis(400), lease);
    let keep = LaunchOptions { exclusive: false, ..options("r5", 200) };
    let mut run = shims.launch(escaping_task(&dir), &keep, None).await.unwrap();
    let pids = three_pids(&dir).await;
    healthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(pids.iter().all(|pid| alive(*pid)), "a keep run rides out the lost lease");
    let refused = shims.launch(escaping_task(&dir), &options("r6", 200), None).await.unwrap_err();
    assert!(refused.to_string().contains("fenced"), "{refused}");
    run.stop("test");
    run.wait().await;
    all_gone(&pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_signal_is_the_tasks() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("signal");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(3));
    let shims = launcher(&dir, Duration::from_secs(3), lease);
    let marker = dir.join("got");
    let script = format!(
        "trap 'echo INT > {m}; exit 0' INT; trap '' TERM; echo up > {m}; while :; do sleep 0.05; done",
        m = marker.display()
    );
    let task = SpawnRequest { args: vec!["-c".into(), script], ..escaping_task(&dir) };
    let mut run =
        shims.launch(task, &LaunchOptions { stop_signal: 2, ..options("r7", 3000) }, None).await.unwrap();
    for _ in 0..100 {
        if std::fs::read_to_string(&marker).is_ok_and(|text| text.starts_with("up")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    run.stop("test");
    let ended = run.wait().await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "INT");
    assert_eq!(ended.exit.and_then(|exit| exit.code), Some(0), "it stopped on SIGINT, not SIGKILL");
    assert!(asked.elapsed() < Duration::from_secs(2), "well before the grace ran out");
}

/// Every process's command line, NUL-separated arguments joined.
fn all_command_lines() -> Vec<(i32, Vec<u8>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)))
        .collect()
}

/// A task whose environment totals 1 MiB (16 variables of 64 KiB, each under the kernel's
/// 128 KiB cap on one string) starts, sees all of it, and no value of it appears in any
/// process's command line: the shim gets its configuration on stdin, not on argv.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_environment_runs_and_never_shows_on_a_command_line() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("bigenv");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(3));
    let shims = launcher(&dir, Duration::from_secs(3), lease);
    let mut env = vec![("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned())];
    for index in 0..16 {
        // A marker no command line holds otherwise, then filler to 64 KiB.
        let value = format!("secret-{index}-{}", "s".repeat(64 * 1024 - 16));
        env.push((format!("BIG_{index}"), value));
    }
    let total: usize = env.iter().map(|(name, value)| name.len() + value.len() + 2).sum();
    assert!(total >= 1 << 20, "{total} bytes of environment");
    let out = dir.join("env-size");
    let script = format!("env | wc -c > {out}.tmp; mv {out}.tmp {out}; exec sleep 30", out = out.display());
    let request = SpawnRequest {
        program: "sh".into(),
        args: vec!["-c".into(), script],
        env,
        cwd: dir.join("cwd"),
        output: dir.join("out.log"),
        user: None,
        rlimits: vec![],
    };
    let mut run = shims.launch(request, &options("big", 500), None).await.expect("the run starts (no E2BIG)");
    let mut seen = String::new();
    for _ in 0..250 {
        seen = std::fs::read_to_string(&out).unwrap_or_default();
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bytes: usize = seen.trim().parse().expect("the task wrote the size of its environment");
    assert!(bytes >= 1 << 20, "the task sees its whole environment: {bytes} bytes");
    for (pid, cmdline) in all_command_lines() {
        assert!(
            !cmdline.windows(9).any(|window| window == b"secret-0-"),
            "process {pid} shows the task's environment on its command line"
        );
    }
    run.stop("test");
    run.wait().await;
}

/// A shim of an older build: it knows nothing of `hold` and starts the task at once.
fn old_shim(dir: &Path) -> PathBuf {
    let path = dir.join("old-shim");
    let script = r#"#!/bin/sh
read config
/bin/sleep 100 &
task=$!
echo "$task" > "${0%/*}/old-task"
echo "{\"event\":\"started\",\"pid\":$task}"
while read line; do
  case "$line" in stop*) kill "$task"; wait "$task"; echo '{"event":"exited","code":null,"signal":15,"stopped":"stopped"}'; exit 0;; esac
done
kill "$task"
"#;
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_start_on_a_shim_that_starts_at_once_is_stopped_and_fails() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("old-shim");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(3));
    let mut shims = launcher(&dir, Duration::from_secs(3), lease);
    shims.exe = old_shim(&dir);
    let (_go, went) = tokio::sync::oneshot::channel::<()>();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        shims.launch(escaping_task(&dir), &options("o1", 500), Some(went)),
    )
    .await
    .expect("the launch ends")
    .expect_err("a task started before its go fails the staged start");
    assert!(err.to_string().contains("does not know staged starts"), "{err}");
    let task: i32 = std::fs::read_to_string(dir.join("old-task")).unwrap().trim().parse().unwrap();
    all_gone(&[task]).await;
    assert_eq!(std::fs::read_dir(records(&dir)).unwrap().count(), 0, "record removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_lives_in_a_session_of_its_own_so_freezing_the_nodes_group_stops_the_task() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("session");
    let (lease, healthy) = renewed_lease(Duration::from_millis(600));
    let shims = launcher(&dir, Duration::from_millis(600), lease);
    let mut run = shims.launch(escaping_task(&dir), &options("f1", 200), None).await.unwrap();
    let pids = three_pids(&dir).await;
    let record = shim_records(&dir).remove(0);
    let shim: i32 = record.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let sid = |pid: i32| nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap().as_raw();
    assert_eq!(sid(shim), shim, "the shim leads a session of its own");
    assert_ne!(sid(shim), sid(std::process::id() as i32), "not the node's");
    // What `kill -STOP -<the node's group>` reaches: every process of that group. The shim is
    // not among them, so the node's silence (no renewals) ends the lease and the task.
    let group = nix::unistd::getpgrp().as_raw();
    let in_group = |pid: i32| nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).map(|g| g.as_raw());
    assert_ne!(in_group(shim).unwrap(), group);
    assert!(pids.iter().all(|pid| in_group(*pid).unwrap() != group));
    healthy.store(false, Ordering::SeqCst);
    let ended = tokio::time::timeout(Duration::from_secs(5), run.wait()).await.expect("stopped by the shim");
    assert_eq!(ended.stopped.as_deref(), Some("the node's lease ran out"));
    all_gone(&pids).await;
}

/// A node takes back the shims of its own protocol version and of the versions one above and
/// below (an upgrade or a rollback of one step), and stops a shim further away as a leftover: a
/// stand-in shim (a `sleep`, its socket answered by this test) says each version in its `hello`.
#[tokio::test(flavor = "multi_thread")]
async fn a_shim_one_protocol_version_away_is_taken_back_and_one_further_is_stopped() {
    use std::io::{BufRead, Write};
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = workspace("protocol");
    let (lease, _healthy) = renewed_lease(Duration::from_secs(5));
    let shims = launcher(&dir, Duration::from_secs(5), lease);
    std::fs::create_dir_all(records(&dir)).unwrap();
    let protocol = shiva_node::shim::PROTOCOL;
    for (version, taken) in
        [(protocol - 1, true), (protocol, true), (protocol + 1, true), (protocol + 2, false)]
    {
        let mut shim = std::process::Command::new("sleep").arg("100").spawn().unwrap();
        let mut task = std::process::Command::new("sleep").arg("100").spawn().unwrap();
        let (shim_pid, task_pid) = (shim.id(), task.id());
        let run = uuid::Uuid::new_v4();
        let record = serde_json::json!({
            "shim": shim_pid, "shim_start": shiva_node::tree::start_time(shim_pid),
            "task": task_pid, "task_start": shiva_node::tree::start_time(task_pid),
            "cgroup": null, "limits": [], "run": {"task": "t", "run": run}, "started_ms": 1,
        });
        std::fs::write(records(&dir).join(format!("{shim_pid}.json")), record.to_string()).unwrap();
        let listener =
            std::os::unix::net::UnixListener::bind(records(&dir).join(format!("{shim_pid}.sock"))).unwrap();
        let answering = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            writeln!(out, r#"{{"event":"hello","protocol":{version},"pid":{task_pid}}}"#).unwrap();
            for line in std::io::BufReader::new(stream).lines() {
                if line.is_ok_and(|line| line.starts_with("stop")) {
                    let _ =
                        writeln!(out, r#"{{"event":"exited","code":null,"signal":15,"stopped":"asked"}}"#);
                    return true;
                }
            }
            false
        });
        let adopted = shims.adopt().await;
        if taken {
            assert_eq!(adopted.len(), 1, "protocol {version} is taken back");
            assert_eq!((adopted[0].meta.run, adopted[0].handle.pid), (run, task_pid));
            let mut handle = adopted.into_iter().next().unwrap().handle;
            handle.stop("asked");
            assert_eq!(handle.wait().await.stopped.as_deref(), Some("asked"), "stop reaches the shim");
            assert!(answering.join().unwrap(), "the stand-in was told to stop");
            assert!(alive(task_pid as i32), "the shim, not the node, stops its task");
        } else {
            assert!(adopted.is_empty(), "protocol {version} is not taken back");
            all_gone(&[shim_pid as i32, task_pid as i32]).await;
        }
        let _ = shim.kill();
        let _ = task.kill();
        let _ = (shim.wait(), task.wait());
        let _ = std::fs::remove_file(records(&dir).join(format!("{shim_pid}.sock")));
    }
}
