//! The supervisor with real processes: environment, working directory, restarts with back-off,
//! stopping a whole process group, SIGKILL after the grace period.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shiva_node::limits::Controllers;
use shiva_node::supervisor::job::JobContext;
use shiva_node::supervisor::shim::ShimLauncher;
use shiva_node::supervisor::{Supervisor, Wanted};
use shiva_node::tree::Isolation;
use shiva_proto::records::{RunState, TaskStatus};
use shiva_proto::{TaskId, TaskSpec};
use tokio::sync::mpsc;

fn workspace(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shiva-supervisor-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn supervisor(dir: &Path) -> (Supervisor, mpsc::UnboundedReceiver<TaskStatus>) {
    // A lease that lasts the whole test.
    let lease =
        tokio::sync::watch::channel(Some(shiva_node::clock::Boot::now() + Duration::from_secs(3600))).1;
    supervisor_with(dir, lease)
}

fn supervisor_with(
    dir: &Path,
    lease: tokio::sync::watch::Receiver<Option<shiva_node::clock::Boot>>,
) -> (Supervisor, mpsc::UnboundedReceiver<TaskStatus>) {
    let (reports, reports_rx) = mpsc::unbounded_channel();
    let context = JobContext {
        node_id: "n1".into(),
        workspace: dir.to_path_buf(),
        task_path: "/usr/local/bin:/usr/bin:/bin".into(),
        task_user: None,
        allow_root_tasks: true,
        launches: shiva_node::supervisor::launches::Launches::new(dir),
        shims: ShimLauncher {
            exe: PathBuf::from(env!("CARGO_BIN_EXE_shiva-node")),
            isolation: Isolation::ProcessGroup,
            fence_timeout: Duration::from_secs(3),
            lease,
            records: dir.join("shims"),
            controllers: Controllers::detect("supervisor-test", None),
            secrets: None,
            logs_dir: dir.join("logs"),
            shipper: None,
            timer: None,
            file_readers: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        },
        reports,
    };
    (Supervisor::new(context), reports_rx)
}

fn spec(id: &str, script: &str) -> TaskSpec {
    let mut spec = TaskSpec::new(TaskId::new(id).unwrap(), "sh", vec!["-c".into(), script.into()]);
    spec.env.insert("GREETING".into(), "hello".into());
    spec.backoff.initial = Duration::from_millis(100);
    spec.backoff.max = Duration::from_millis(400);
    spec
}

fn wanted(spec: &TaskSpec) -> BTreeMap<TaskId, Wanted> {
    BTreeMap::from([(
        spec.id.clone(),
        Wanted { generation: 1, spec_revision: 7, spec: spec.clone(), after: Vec::new(), start: true },
    )])
}

async fn next_state(reports: &mut mpsc::UnboundedReceiver<TaskStatus>, state: RunState) -> TaskStatus {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let status = reports.recv().await.expect("reports open");
            if status.state == state {
                return status;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {state:?} report"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

async fn wait_for_file(path: &Path) -> String {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_a_clean_environment_in_its_working_directory() {
    let dir = workspace("env");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let out = dir.join("env.txt");
    // Written whole, then renamed: a reader never sees the environment without the directory.
    let task = spec(
        "t/env",
        &format!("{{ env | sort; pwd; }} > {o}.tmp; mv {o}.tmp {o}; exec sleep 100", o = out.display()),
    );
    supervisor.reconcile(&wanted(&task));
    let running = next_state(&mut reports, RunState::Running).await;
    assert_eq!(running.attempt, 1);
    let text = wait_for_file(&out).await;
    let vars: Vec<&str> = text.lines().filter(|l| l.contains('=')).collect();
    let names: Vec<&str> = vars.iter().map(|l| l.split('=').next().unwrap()).collect();
    for expected in ["GREETING", "PATH", "SHIVA_ATTEMPT", "SHIVA_NODE_ID", "SHIVA_RUN_ID", "SHIVA_TASK_ID"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    assert!(
        vars.contains(&"SHIVA_TASK_ID=t/env")
            && vars.contains(&"SHIVA_ATTEMPT=1")
            && vars.contains(&"SHIVA_NODE_ID=n1")
    );
    assert!(!names.contains(&"HOME") && !names.contains(&"CARGO"), "the node's environment leaks: {names:?}");
    assert!(text.lines().any(|l| l == dir.join("tasks/t/env").display().to_string()), "{text}");
    supervisor.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_the_whole_group_and_sigkills_after_the_grace() {
    let dir = workspace("stop");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let pids = dir.join("pids");
    // Ignores SIGTERM, and leaves a grandchild that also ignores it.
    let script = format!(
        "trap '' TERM; sh -c 'trap \"\" TERM; echo $$ >> {p}; exec sleep 100' & echo $$ >> {p}; wait",
        p = pids.display()
    );
    let mut task = spec("t/stubborn", &script);
    task.stop_grace = Duration::from_millis(700);
    supervisor.reconcile(&wanted(&task));
    next_state(&mut reports, RunState::Running).await;
    let text = loop {
        let text = std::fs::read_to_string(&pids).unwrap_or_default();
        if text.lines().count() == 2 {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pids: Vec<i32> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(pids.iter().all(|pid| alive(*pid)));
    let started = Instant::now();
    supervisor.reconcile(&BTreeMap::new());
    let stopped = next_state(&mut reports, RunState::Stopped).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(650), "SIGKILL came before the grace: {took:?}");
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    assert_eq!(stopped.last_exit.and_then(|e| e.signal), Some(9));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for pid in pids {
        assert!(!alive(pid), "process {pid} of the group survived");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_task_restarts_with_growing_delays() {
    let dir = workspace("crash");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let task = spec("t/crash", "exit 3");
    supervisor.reconcile(&wanted(&task));
    let mut starts = Vec::new();
    while starts.len() < 4 {
        let status = next_state(&mut reports, RunState::Running).await;
        starts.push((Instant::now(), status.attempt));
        if starts.len() > 1 {
            let backoff = next_state(&mut reports, RunState::Backoff).await;
            assert_eq!(backoff.last_exit.and_then(|e| e.code), Some(3));
        }
    }
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert_eq!(starts.iter().map(|s| s.1).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Delays double (±10 % jitter).
    assert!(gaps[0] >= Duration::from_millis(90) && gaps[1] >= Duration::from_millis(180), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(360), "delays double up to the cap: {gaps:?}");
    supervisor.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_restarts_fail_the_task_and_a_permanent_exit_code_fails_it_at_once() {
    let dir = workspace("giveup");
    let (mut first, mut reports) = supervisor(&dir);
    let mut task = spec("t/giveup", "exit 3");
    task.max_restarts = 2;
    first.reconcile(&wanted(&task));
    let failed = next_state(&mut reports, RunState::Failed).await;
    assert_eq!(failed.restarts, 2, "{failed:?}");
    assert!(!failed.permanent);
    assert!(failed.message.as_deref().unwrap().contains("restarted 2 times within 2m"), "{failed:?}");
    first.stop_all().await;

    let (mut second, mut reports) = supervisor(&dir);
    let mut task = spec("t/permanent", "exit 78");
    task.permanent_exit_codes = vec![78];
    second.reconcile(&wanted(&task));
    let failed = next_state(&mut reports, RunState::Failed).await;
    assert_eq!((failed.restarts, failed.permanent), (0, true), "{failed:?}");
    assert_eq!(failed.last_exit.and_then(|e| e.code), Some(78));
    second.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_is_reported_with_a_message_and_retried() {
    let dir = workspace("missing");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let task = TaskSpec::new(TaskId::new("t/missing").unwrap(), "/no/such/program", vec![]);
    supervisor.reconcile(&wanted(&task));
    let failed = next_state(&mut reports, RunState::Backoff).await;
    assert!(failed.message.unwrap().contains("/no/such/program"));
    supervisor.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_user_rlimits_and_memory_limit_reach_the_run() {
    let dir = workspace("environment");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let mut task = spec(
        "t/env",
        "id -u > uid; ulimit -n > nofile; cat conf/app.yaml > seen.yaml; \
         m=$(grep -E ':memory:' /proc/self/cgroup | cut -d: -f3); \
         cat /sys/fs/cgroup/memory$m/memory.limit_in_bytes > memory 2>/dev/null; sleep 100",
    );
    let yaml = "name: app\nitems: [1, 2]\nutf8: é€\n";
    task.files.insert("conf/app.yaml".into(), yaml.into());
    task.rlimits.insert("nofile".into(), 321);
    task.memory_max = Some("64MiB".into());
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        task.user = Some("nobody".into());
    }
    let controllers = Controllers::detect("supervisor-test", None);
    supervisor.reconcile(&wanted(&task));
    if controllers.describe().contains("memory: unavailable") {
        // Where the limit cannot be enforced, the run is refused, saying why.
        let refused = next_state(&mut reports, RunState::Backoff).await;
        assert!(refused.message.unwrap().contains("memory_max needs a cgroup controller"));
        supervisor.stop_all().await;
        return;
    }
    next_state(&mut reports, RunState::Running).await;
    let cwd = dir.join("tasks/t/env");
    let read = |name: &str| std::fs::read_to_string(cwd.join(name)).unwrap_or_default();
    for _ in 0..100 {
        if !read("memory").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read("seen.yaml"), yaml, "files arrive byte for byte");
    assert_eq!(read("nofile").trim(), "321");
    assert_eq!(read("memory").trim(), (64u64 << 20).to_string());
    if as_root {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert_eq!(read("uid").trim(), nobody.uid.to_string());
    }
    supervisor.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_job_says_nothing_and_starts_at_once_when_it_may() {
    let dir = workspace("staged");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let out = dir.join("started");
    let task = spec("t/staged", &format!("date +%s%N > {}; exec sleep 100", out.display()));
    let mut want = wanted(&task);
    want.get_mut(&task.id).unwrap().start = false;
    want.get_mut(&task.id).unwrap().after = vec![shiva_proto::NodeId::new("n0").unwrap()];
    supervisor.reconcile(&want);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!out.exists(), "a staged job starts nothing");
    assert!(reports.try_recv().is_err(), "and reports nothing: its status would overwrite n0's word");
    assert!(!supervisor.runs(&task.id) && !supervisor.holds(&task.id), "it holds no copy");
    assert_eq!(supervisor.active().count(), 0);
    // The word came.
    want.get_mut(&task.id).unwrap().start = true;
    let go = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    supervisor.reconcile(&want);
    let starting = next_state(&mut reports, RunState::Running).await;
    assert_eq!(starting.after, want[&task.id].after, "its statuses carry the word it started after");
    let started: u128 = wait_for_file(&out).await.trim().parse().unwrap();
    let took_ms = (started.saturating_sub(go)) as f64 / 1e6;
    assert!(took_ms < 500.0, "started {took_ms} ms after the go");
    assert!(supervisor.runs(&task.id));
    // Staged again, then called off: nothing starts, nothing is said.
    let other = spec("t/called-off", &format!("touch {}; exec sleep 100", dir.join("never").display()));
    let mut staged = wanted(&other);
    staged.get_mut(&other.id).unwrap().start = false;
    supervisor.reconcile(&staged);
    tokio::time::sleep(Duration::from_millis(300)).await;
    supervisor.reconcile(&BTreeMap::new());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!dir.join("never").exists());
    while let Ok(status) = reports.try_recv() {
        assert_ne!(status.task, other.id, "the called-off job said {status:?}");
    }
    supervisor.stop_all().await;
}

fn staged(spec: &TaskSpec, after: &[&str]) -> BTreeMap<TaskId, Wanted> {
    let mut want = wanted(spec);
    let entry = want.get_mut(&spec.id).unwrap();
    entry.start = false;
    entry.after = after.iter().map(|node| shiva_proto::NodeId::new(*node).unwrap()).collect();
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_job_carries_the_words_it_started_after_not_those_it_was_staged_with() {
    // Staged waiting for n0; the leader then dropped n0 from `after` without its word (a silent
    // node whose copy rides out disconnections): the copy did not start after n0's word.
    let dir = workspace("staged-words");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let task = spec("t/words", "exec sleep 100");
    supervisor.reconcile(&staged(&task, &["n0"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut want = staged(&task, &[]);
    want.get_mut(&task.id).unwrap().start = true;
    supervisor.reconcile(&want);
    let running = next_state(&mut reports, RunState::Running).await;
    assert_eq!(running.after, Vec::new(), "n0's word was never read");
    supervisor.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_job_that_panics_says_nothing() {
    shiva_node::fault::install(Some("run:t/panicky")).unwrap();
    let dir = workspace("staged-panic");
    let (mut supervisor, mut reports) = supervisor(&dir);
    let task = spec("t/panicky", "exec sleep 100");
    supervisor.reconcile(&staged(&task, &["n0"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(reports.try_recv().is_err(), "a staged job's panic would overwrite n0's word");
    supervisor.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_that_comes_while_the_staged_job_waits_for_the_lease_is_kept() {
    let dir = workspace("staged-lease");
    let (lease_tx, lease) = tokio::sync::watch::channel(None);
    let (mut supervisor, mut reports_rx) = supervisor_with(&dir, lease);
    let task = spec("t/lease", "exec sleep 100");
    supervisor.reconcile(&staged(&task, &["n0"]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The word comes while the node still waits to read itself on the bus.
    let mut want = staged(&task, &["n0"]);
    want.get_mut(&task.id).unwrap().start = true;
    supervisor.reconcile(&want);
    tokio::time::sleep(Duration::from_millis(200)).await;
    lease_tx.send_replace(Some(shiva_node::clock::Boot::now() + Duration::from_secs(3600)));
    let running = next_state(&mut reports_rx, RunState::Running).await;
    assert_eq!(running.after.len(), 1);
    supervisor.stop_all().await;
}
