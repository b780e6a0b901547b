//! What operators watch, checked by real tools: Debian's Prometheus scrapes a three-node
//! cluster (and `promtool` checks the exposition), and Debian's headless Chromium shows the
//! dashboard live while a node is killed.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use shiva_e2e::{Cluster, SETTLE, free_port, http, repo, scratch, wait_until};

const READER: &str = "r-0123456789abcdef0123";

fn tokens_file() -> String {
    let path = scratch("obs-tokens").join("tokens");
    std::fs::write(&path, format!("read prometheus {READER}\n")).unwrap();
    path.display().to_string()
}

/// A child killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is missing: scripts/test installs it (scripts/build-deps prometheus chromium)");
}

fn submit(cluster: &Cluster, id: &str, args: &[&str]) {
    let marker = format!("E2E={}", cluster.name);
    let mut all = vec!["submit", "--id", id, "--env", &marker];
    all.extend_from_slice(args);
    cluster.ctl.ok(&all);
}

/// A query of Prometheus's HTTP API: the result vector (empty on any error).
fn query(prometheus: &str, expression: &str) -> Vec<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let Ok(mut response) = agent.get(format!("{prometheus}/api/v1/query")).query("query", expression).call()
    else {
        return Vec::new();
    };
    let body = response.body_mut().read_to_string().unwrap_or_default();
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    value["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn prometheus_scrapes_every_series_of_a_three_node_cluster_and_promtool_accepts_the_exposition() {
    let tokens = tokens_file();
    let flags: &[&str] = &["--api-tokens", &tokens];
    let mut cluster = Cluster::start("obs-prom", 3, &[flags, flags, flags]);
    let targets: Vec<String> =
        cluster.nodes.iter().map(|node| node.http_url().trim_start_matches("http://").to_owned()).collect();

    // Work that moves every series: a service that keeps failing (restarts), a cron job every
    // second (runs, lateness), output (log shipping).
    submit(&cluster, "obs/crash", &["--", "sh", "-c", "echo crashing; sleep 0.5; exit 3"]);
    submit(&cluster, "obs/tick", &["--schedule", "* * * * * *", "--", "sh", "-c", "echo tick"]);
    submit(&cluster, "obs/svc", &["--", "sleep", "1000"]);

    let dir = scratch("prometheus");
    let port = free_port();
    let config = dir.join("prometheus.yml");
    let targets_yaml: Vec<String> = targets.iter().map(|target| format!("'{target}'")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: shiva\n    \
             scrape_interval: 1s\n    authorization:\n      credentials: {READER}\n    static_configs:\n      \
             - targets: [{}]\n",
            targets_yaml.join(", ")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = Killed(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prometheus = format!("http://127.0.0.1:{port}");
    wait_until(SETTLE, "Prometheus scrapes the three nodes", || {
        let up = query(&prometheus, "up{job=\"shiva\"} == 1");
        up.len() == 3
    });

    // A failover (the leader killed) and a fence (a node frozen past its lease).
    let leader = cluster.wait_nodes(3);
    let before = query(&prometheus, "max(shiva_failovers_total)");
    let before: f64 =
        before.first().and_then(|series| series["value"][1].as_str()?.parse().ok()).unwrap_or(0.0);
    cluster.node(&leader).kill9();
    let survivors: Vec<String> =
        ["n1", "n2", "n3"].iter().filter(|id| **id != leader).map(|id| id.to_string()).collect();
    let frozen = survivors[1].clone();
    cluster.node(&frozen).signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    cluster.node(&frozen).signal(Signal::SIGCONT);

    let failed_over = format!("shiva_failovers_total > {before}");
    let wanted = [
        "shiva_node_up == 1",
        "shiva_node_info",
        "shiva_node_ready == 1",
        "shiva_leader == 1",
        "shiva_epoch >= 2",
        failed_over.as_str(),
        "shiva_tasks{state=\"running\"} >= 1",
        "shiva_nodes{alive=\"true\"} >= 1",
        "shiva_task_restarts_total{task=\"obs/crash\"} >= 1",
        "shiva_runs_total{task=\"obs/tick\",outcome=\"succeeded\"} >= 1",
        "shiva_cron_launch_lateness_seconds_count >= 1",
        "shiva_submit_to_start_seconds_count >= 1",
        "shiva_bus_produce_latency_seconds_count >= 1",
        "shiva_bus_fetch_latency_seconds_count >= 1",
        "shiva_fences_total >= 1",
        "shiva_log_shipping_delay_seconds_count >= 1",
        "shiva_shims >= 1",
        "process_cpu_seconds_total > 0",
        "process_resident_memory_bytes > 0",
        "shiva_http_requests_total{route=\"/metrics\",code=\"200\"} >= 1",
    ];
    let mut missing: Vec<&str> = wanted.to_vec();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing.is_empty() && Instant::now() < deadline {
        missing.retain(|expression| query(&prometheus, expression).is_empty());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(missing.is_empty(), "Prometheus has no sample for {missing:?}");
    // The fence was the frozen node's own.
    let frozen_target = &targets[["n1", "n2", "n3"].iter().position(|id| *id == frozen).unwrap()];
    let fences = query(&prometheus, "shiva_fences_total >= 1");
    assert!(
        fences.iter().all(|series| series["metric"]["instance"].as_str() == Some(frozen_target.as_str())),
        "{fences:?}"
    );

    // promtool checks each live node's exposition.
    for id in &survivors {
        let node = cluster.nodes.iter().find(|node| node.id == *id).unwrap();
        let exposition = http("GET", &format!("{}/metrics", node.http_url()), Some(READER), None);
        assert_eq!(exposition.status, 200);
        let mut check = Command::new(tool("promtool"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check.stdin.take().unwrap().write_all(exposition.body.as_bytes()).unwrap();
        let output = check.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A headless Chromium, driven through the DevTools protocol.
struct Browser {
    _child: Killed,
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Browser {
    fn start(url: &str) -> Browser {
        let profile = scratch("chromium");
        let log = std::fs::File::create(profile.join("chromium.log")).unwrap();
        let child = Command::new(tool("chromium"))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromium");
        let child = Killed(child);
        let port_file = profile.join("DevToolsActivePort");
        let mut port = String::new();
        wait_until(SETTLE, "Chromium's DevTools port", || {
            port = std::fs::read_to_string(&port_file)
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            !port.is_empty()
        });
        let mut target = Value::Null;
        wait_until(SETTLE, "a page target", || {
            let list = http("GET", &format!("http://127.0.0.1:{port}/json/list"), None, None);
            target = serde_json::from_str::<Value>(&list.body)
                .ok()
                .and_then(|list| list.as_array()?.iter().find(|t| t["type"] == "page").cloned())
                .unwrap_or(Value::Null);
            !target.is_null()
        });
        let ws = target["webSocketDebuggerUrl"].as_str().unwrap().to_owned();
        let (socket, _) = tungstenite::connect(ws.as_str()).expect("DevTools websocket");
        let mut browser = Browser { _child: child, socket, next: 0 };
        browser.call("Page.enable", json!({}));
        browser.call("Page.navigate", json!({ "url": url }));
        browser
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(tungstenite::Message::text(message)).expect("send to Chromium");
        loop {
            let message = self.socket.read().expect("read from Chromium");
            let Ok(text) = message.to_text() else { continue };
            let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if value["id"] == id {
                assert!(value["error"].is_null(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page; its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result =
            self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        result["result"]["value"].clone()
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let shot =
            self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// Screenshots go to the scratch directory, and to docs/ with `SHIVA_SCREENSHOTS=1`.
fn screenshot_path(name: &str) -> PathBuf {
    if std::env::var_os("SHIVA_SCREENSHOTS").is_some_and(|value| value == "1") {
        repo().join("docs").join(name)
    } else {
        scratch("screenshots").join(name)
    }
}

#[test]
fn chromium_shows_nodes_and_tasks_live_and_a_killed_node_gone_within_the_node_timeout_plus_a_second() {
    let mut cluster =
        Cluster::start("obs-ui", 3, &[&["--tags", "ssd"], &["--tags", "gpu"], &["--tags", "tpu"]]);
    // The node killed below: neither the leader (its death would need an election too) nor n1,
    // which serves the page; the training task needs its tag, so it has nowhere else to go.
    let leader = cluster.wait_nodes(3);
    let (victim, tag) = if leader == "n2" { ("n3", "tpu") } else { ("n2", "gpu") };
    submit(
        &cluster,
        "web/frontend",
        &["--", "sh", "-c", "while true; do echo \"GET / 200 $(date +%T)\"; sleep 0.5; done"],
    );
    submit(&cluster, "web/api", &["--", "sleep", "1000"]);
    submit(&cluster, "ml/train", &["--tags", tag, "--", "sleep", "1000"]);
    submit(&cluster, "ops/backup", &["--schedule", "*/2 * * * * *", "--", "sh", "-c", "echo backed up"]);
    let url = cluster.nodes[0].http_url();
    let mut browser = Browser::start(&format!("{url}/"));
    let rows = |browser: &mut Browser, kind: &str| -> Value {
        browser.eval(&format!(
            "JSON.stringify(Object.fromEntries([...document.querySelectorAll('tr[data-{kind}]')].map(r => [r.dataset.{kind}, r.dataset.state])))"
        ))
    };
    let parse = |value: Value| -> Value {
        serde_json::from_str(value.as_str().unwrap_or("{}")).unwrap_or(Value::Null)
    };
    wait_until(SETTLE, "the page shows three live nodes and the tasks running", || {
        let nodes = parse(rows(&mut browser, "node"));
        let tasks = parse(rows(&mut browser, "task"));
        ["n1", "n2", "n3"].iter().all(|id| nodes[id] == "alive")
            && ["web/frontend", "web/api", "ml/train"].iter().all(|id| tasks[id] == "running")
            && tasks["ops/backup"].is_string()
    });
    assert_eq!(
        browser.eval("document.getElementById('leader').textContent").as_str().map(|s| s.starts_with('n')),
        Some(true)
    );
    browser.screenshot(&screenshot_path("dashboard.png"));
    // Set once: still there at the end, so the page was never reloaded.
    browser.eval("window.shivaMarker = 42");

    // A task's runs and live output.
    browser.eval("document.querySelector('tr[data-task=\"web/frontend\"]').click()");
    wait_until(SETTLE, "the live tail shows the task's output", || {
        browser
            .eval("document.getElementById('tail').textContent")
            .as_str()
            .unwrap_or("")
            .matches("GET / 200")
            .count()
            >= 3
    });
    browser.eval("document.querySelector('tr[data-task=\"ops/backup\"]').click()");
    wait_until(SETTLE, "the periodic task's runs", || {
        browser.eval("document.querySelectorAll('#runs td.state.succeeded').length").as_u64() >= Some(1)
    });
    wait_until(SETTLE, "its output", || {
        browser
            .eval("document.getElementById('tail').textContent")
            .as_str()
            .unwrap_or("")
            .contains("backed up")
    });
    browser.screenshot(&screenshot_path("dashboard-task.png"));

    // kill -9 of a node the page is not served by: the page shows it gone within the node
    // timeout (1.5 s here) plus one second, without a reload.
    cluster.node(victim).kill9();
    let killed = Instant::now();
    let mut gone_after = None;
    while killed.elapsed() < Duration::from_secs(10) {
        if parse(rows(&mut browser, "node"))[victim] == "gone" {
            gone_after = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone_after = gone_after.expect("the page never showed the killed node gone");
    eprintln!("the page showed {victim} gone {gone_after:?} after kill -9");
    assert!(gone_after <= Duration::from_millis(2500), "shown gone after {gone_after:?}");
    // And its task: ml/train needs the victim's tag, which no other node has: pending on the page.
    wait_until(SETTLE, "ml/train pending", || parse(rows(&mut browser, "task"))["ml/train"] == "pending");
    browser.screenshot(&screenshot_path("dashboard-node-gone.png"));
    assert_eq!(browser.eval("window.shivaMarker"), json!(42), "the page was never reloaded");
}
