//! Supervision side by side with supervisord (Debian's `supervisor` package), in the same run:
//! idle RSS and CPU with 50 sleeping tasks, and restart latency (exit → restarted) with no
//! back-off. Shiva's figures count the node and every run shim; the broker is not counted (it
//! serves the whole cluster, and supervisord has none).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use shiva_e2e::{Broker, Ctl, Node, cluster, scratch, wait_until};

use crate::{cpu_ns, rss_kb, summary};

/// What one supervisor costs.
pub struct Figures {
    /// RSS in kB (supervisor and its helpers, not the tasks).
    pub rss_kb: u64,
    /// PSS in kB: shared pages (the shims share the node's binary) counted once in all.
    pub pss_kb: u64,
    /// CPU in % of a core over the window.
    pub cpu: f64,
    /// Of which the main process (the node).
    pub main_cpu: f64,
    /// PSS of the helpers alone (Shiva's 50 run shims), kB.
    pub helpers_pss_kb: u64,
    /// Exit → restarted, ms.
    pub restart_ms: Vec<f64>,
    /// The main process alone before its tasks, CPU in % of a core over the same window (the
    /// floor: what the node costs with nothing to supervise).
    pub bare_cpu: f64,
}

const TASKS: usize = 50;

fn children(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return found };
    for thread in threads.flatten() {
        let text = std::fs::read_to_string(thread.path().join("children")).unwrap_or_default();
        found.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    found
}

fn shims(node: i32) -> Vec<i32> {
    children(node)
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).nth(1) == Some(b"__shim".as_slice())
        })
        .collect()
}

/// Proportional set size of `pid` in kB.
fn pss_kb(pid: i32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What [`measure`] found.
struct Measured {
    rss_kb: u64,
    pss_kb: u64,
    /// PSS of all but the first pid (the shims, beside the node).
    rest_pss_kb: u64,
    cpu: f64,
    /// CPU of the first pid alone.
    first_cpu: f64,
}

/// RSS, PSS and CPU of `pids()` (re-listed at the end of the window) over `window`.
/// The first pid's CPU is also reported alone (the node, beside its shims).
fn measure(pids: impl Fn() -> Vec<i32>, window: Duration) -> Measured {
    let before: Vec<(i32, u64)> = pids().into_iter().map(|pid| (pid, cpu_ns(pid))).collect();
    std::thread::sleep(window);
    let used: Vec<u64> = before.iter().map(|(pid, at)| cpu_ns(*pid).saturating_sub(*at)).collect();
    let rss = pids().into_iter().map(rss_kb).sum();
    let pss: Vec<u64> = pids().into_iter().map(pss_kb).collect();
    let percent = |ns: u64| ns as f64 / window.as_nanos() as f64 * 100.0;
    Measured {
        rss_kb: rss,
        pss_kb: pss.iter().sum(),
        rest_pss_kb: pss.iter().skip(1).sum(),
        cpu: percent(used.iter().sum()),
        first_cpu: percent(used.first().copied().unwrap_or(0)),
    }
}

/// A script that stamps its start and its exit into `file`, then exits 1 after 200 ms.
fn flapping(file: &Path) -> String {
    format!(
        "echo \"s $(date +%s%N)\" >> {f}; sleep 0.2; echo \"e $(date +%s%N)\" >> {f}; exit 1",
        f = file.display()
    )
}

/// Exit → next start, in ms, from a stamp file.
fn restart_gaps(file: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut gaps = Vec::new();
    let mut exited: Option<i128> = None;
    for line in text.lines() {
        let Some((kind, at)) = line.split_once(' ') else { continue };
        let Ok(at) = at.parse::<i128>() else { continue };
        match (kind, exited) {
            ("e", _) => exited = Some(at),
            ("s", Some(exit)) => {
                gaps.push((at - exit) as f64 / 1e6);
                exited = None;
            }
            _ => {}
        }
    }
    gaps
}

fn count_lines(file: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(file).unwrap_or_default().lines().filter(|l| l.starts_with(prefix)).count()
}

/// Shiva: one node, 50 sleeping tasks, then (unless `restarts` is 0) a flapping task with no
/// back-off.
pub fn shiva(broker: &Broker, window: Duration, restarts: usize) -> Figures {
    let name = cluster("sup");
    let node = Node::launch(broker, &name, "s1", &[]);
    let ctl = Ctl::new(broker, &name);
    let dir = scratch("sup-shiva");
    wait_until(Duration::from_secs(30), "the node is up", || {
        ctl.try_json(&["nodes"]).is_some_and(|nodes| nodes.as_array().is_some_and(|n| !n.is_empty()))
    });
    std::thread::sleep(Duration::from_secs(5));
    let bare = measure(|| vec![node.pid()], window);
    for i in 0..TASKS {
        let spec =
            json!({"id": format!("sleep/t{i}"), "command": "sleep", "args": ["100000"], "stop_grace": "1s"});
        let path = dir.join(format!("t{i}.json"));
        std::fs::write(&path, spec.to_string()).unwrap();
        ctl.ok(&["submit", path.to_str().unwrap()]);
    }
    let pid = node.pid();
    wait_until(Duration::from_secs(60), "50 shims running", || shims(pid).len() == TASKS);
    std::thread::sleep(Duration::from_secs(5));
    let idle = measure(|| std::iter::once(pid).chain(shims(pid)).collect(), window);
    let mut figures = Figures {
        rss_kb: idle.rss_kb,
        pss_kb: idle.pss_kb,
        cpu: idle.cpu,
        main_cpu: idle.first_cpu,
        helpers_pss_kb: idle.rest_pss_kb,
        restart_ms: Vec::new(),
        bare_cpu: bare.cpu,
    };
    if restarts == 0 {
        return figures;
    }

    let stamps = dir.join("flap");
    let spec = json!({
        "id": "flap", "command": "sh", "args": ["-c", flapping(&stamps)], "stop_grace": "1s",
        "backoff": {"initial": "0s"}, "max_restarts": 10000, "restart_window": "1s",
    });
    let path = dir.join("flap.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    ctl.ok(&["submit", path.to_str().unwrap()]);
    wait_until(Duration::from_secs(120), "the flapping task restarted enough", || {
        count_lines(&stamps, "s") > restarts
    });
    drop(node);
    figures.restart_ms = restart_gaps(&stamps);
    figures
}

/// supervisord with the same 50 tasks and the same flapping task.
pub fn supervisord(window: Duration, restarts: usize) -> Figures {
    let binary = ["/usr/bin/supervisord", "/usr/local/bin/supervisord"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("supervisord is missing: install Debian's package first (apt-get install -y supervisor)");
    let dir = scratch("sup-supervisord");
    let stamps = dir.join("flap");
    let mut conf = format!(
        "[supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nchildlogdir={d}\n",
        d = dir.display()
    );
    for i in 0..TASKS {
        conf += &format!(
            "\n[program:t{i}]\ncommand=sleep 100000\nautostart=true\nautorestart=true\nstopwaitsecs=1\n"
        );
    }
    let run = |conf: &str| -> Child {
        let path = dir.join("supervisord.conf");
        std::fs::write(&path, conf).unwrap();
        let _ = std::fs::remove_file(dir.join("supervisord.pid"));
        Command::new(binary)
            .args(["-c", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("supervisord.stderr")).unwrap())
            .spawn()
            .expect("start supervisord")
    };
    let mut child = run(&conf);
    let pid = child.id() as i32;
    wait_until(Duration::from_secs(60), "50 programs running", || children(pid).len() == TASKS);
    std::thread::sleep(Duration::from_secs(5));
    let idle = measure(|| vec![pid], window);
    stop(&mut child);
    // The flapping program on its own: restarts at once (autorestart, startsecs=0).
    let flap = format!(
        "[supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nchildlogdir={d}\n\n\
         [program:flap]\ncommand=sh -c '{script}'\nautostart=true\nautorestart=true\nstartsecs=0\nstartretries=100000\n",
        d = dir.display(),
        // supervisord expands %(name)s in its values: a literal % is written %%.
        script = flapping(&stamps).replace('%', "%%")
    );
    let mut child = run(&flap);
    wait_until(Duration::from_secs(120), "the flapping program restarted enough", || {
        count_lines(&stamps, "s") > restarts
    });
    stop(&mut child);
    Figures {
        rss_kb: idle.rss_kb,
        pss_kb: idle.pss_kb,
        cpu: idle.cpu,
        main_cpu: idle.cpu,
        helpers_pss_kb: 0,
        restart_ms: restart_gaps(&stamps),
        bare_cpu: idle.cpu,
    }
}

/// SIGTERM (supervisord stops its programs), then waits.
fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

/// The report rows. `standalone`: the same 50 idle tasks on the file bus (no broker polling).
pub fn rows(
    shiva: &mut Figures,
    standalone: &Figures,
    supervisord: &mut Figures,
    window: Duration,
) -> Vec<String> {
    let per_task = |figures: &Figures| figures.helpers_pss_kb as f64 / 1024.0 / TASKS as f64;
    vec![
        format!(
            "| per supervised task (its run shim), PSS: goal ≤ 0.3 MB | Kafka {:.3} MB, file bus {:.3} MB (supervisord: {:.3} MB per program, its whole PSS / 50) |",
            per_task(shiva),
            per_task(standalone),
            supervisord.pss_kb as f64 / 1024.0 / TASKS as f64
        ),
        format!(
            "| the 50 idle shims together, CPU: goal ≤ 0.05 % of a core | Kafka {:.3} %, file bus {:.3} % |",
            shiva.cpu - shiva.main_cpu,
            standalone.cpu - standalone.main_cpu
        ),
        format!(
            "| node + 50 idle tasks on the file bus, CPU: goal ≤ 0.5 % of a core | {:.2} % (node {:.2} %, shims {:.3} %; the same node before its tasks {:.2} %, so {:.4} % per task); RSS {:.1} MB, PSS {:.1} MB |",
            standalone.cpu,
            standalone.main_cpu,
            standalone.cpu - standalone.main_cpu,
            standalone.bare_cpu,
            (standalone.cpu - standalone.bare_cpu) / TASKS as f64,
            standalone.rss_kb as f64 / 1024.0,
            standalone.pss_kb as f64 / 1024.0
        ),
        format!(
            "| 50 sleeping tasks, idle ({}s): Shiva node + 50 run shims | RSS {:.1} MB, PSS {:.1} MB, CPU {:.2} % of a core (node {:.2} %, shims {:.2} %) |",
            window.as_secs(),
            shiva.rss_kb as f64 / 1024.0,
            shiva.pss_kb as f64 / 1024.0,
            shiva.cpu,
            shiva.main_cpu,
            shiva.cpu - shiva.main_cpu
        ),
        format!(
            "| 50 sleeping tasks, idle ({}s): supervisord | RSS {:.1} MB, PSS {:.1} MB, CPU {:.2} % of a core |",
            window.as_secs(),
            supervisord.rss_kb as f64 / 1024.0,
            supervisord.pss_kb as f64 / 1024.0,
            supervisord.cpu
        ),
        format!(
            "| restart latency (exit → restarted, no back-off), Shiva | {} |",
            summary(&mut shiva.restart_ms)
        ),
        format!(
            "| restart latency (exit → restarted, no back-off), supervisord | {} |",
            summary(&mut supervisord.restart_ms)
        ),
    ]
}
