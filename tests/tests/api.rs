//! The HTTP API, end to end: real nodes on a real broker, judged by the kernel's process table
//! and by what the CLI reads from the log.

use std::time::{Duration, Instant};

use serde_json::Value;
use shiva_e2e::{Cluster, EventStream, SETTLE, http, scratch, task_processes, wait_until};

const WRITER: &str = "w-0123456789abcdef0123";
const READER: &str = "r-0123456789abcdef0123";

fn tokens_file() -> String {
    let path = scratch("api-tokens").join("tokens");
    std::fs::write(&path, format!("# test tokens\nwrite alice {WRITER}\nread grafana {READER}\n")).unwrap();
    path.display().to_string()
}

fn enc(id: &str) -> String {
    id.replace('/', "%2F")
}

/// A GET by hand on a connection of its own, left open: its status line and the connection
/// (dropping it closes the connection, as a browser tab closed).
fn raw_get(url: &str, path: &str, headers: &[(&str, &str)]) -> (u16, std::net::TcpStream) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the connection closed in the headers");
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head).split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, stream)
}

#[test]
fn every_endpoint_answers_on_every_node_writes_as_the_cli_does_and_refuses_bad_input() {
    let tokens = tokens_file();
    let flags: &[&str] = &["--api-tokens", &tokens];
    let json_logs: &[&str] = &["--api-tokens", &tokens, "--log-format", "json"];
    let cluster = Cluster::start("api", 3, &[flags, flags, json_logs]);
    let urls: Vec<String> = cluster.nodes.iter().map(|node| node.http_url()).collect();
    for url in &urls {
        wait_until(SETTLE, "ready", || http("GET", &format!("{url}/readyz"), None, None).status == 200);
        assert_eq!(http("GET", &format!("{url}/healthz"), None, None).status, 200);
    }
    // Any node answers from its own view: the same leader everywhere, itself as the server.
    let leaders: Vec<Value> = urls
        .iter()
        .zip(["n1", "n2", "n3"])
        .map(|(url, id)| {
            let cluster = http("GET", &format!("{url}/v1/cluster"), Some(READER), None).json();
            assert_eq!(cluster["node"], id);
            assert_eq!(cluster["commands"], "open");
            cluster["leader"].clone()
        })
        .collect();
    assert!(leaders.iter().all(|leader| *leader == leaders[0] && leader.is_string()), "{leaders:?}");

    // A stream opened on n3 sees a task submitted through n1 start on some node.
    let stream = EventStream::open(&format!("{}/v1/events", urls[2]), Some(READER));
    let first = stream.wait_for(SETTLE, "snapshot", |event, _| event == "snapshot");
    assert_eq!(first["nodes"].as_array().unwrap().len(), 3, "{first}");
    let spec = format!(
        r#"{{"id":"api/svc","command":"sh","args":["-c","echo started; while true; do echo tick; sleep 0.3; done"],"env":{{"E2E":"{}"}},"stop_grace":"1s"}}"#,
        cluster.name
    );
    let answer = http("POST", &format!("{}/v1/tasks", urls[0]), Some(WRITER), Some(&spec));
    assert_eq!(answer.status, 201, "{answer:?}");
    let created = answer.json();
    assert_eq!((created["id"].as_str(), created["updated"].as_bool()), (Some("api/svc"), Some(false)));
    let running = stream.wait_for(SETTLE, "api/svc running", |event, row| {
        event == "task" && row["id"] == "api/svc" && row["state"] == "running"
    });
    // One copy (its shell and the shell's `sleep`), on the node the stream names, with its pid.
    let processes = task_processes(&cluster.name, "api/svc");
    assert!(
        processes.iter().all(|(_, node)| running["node"].as_str() == Some(node.as_str())),
        "{processes:?}"
    );
    assert!(
        processes.iter().any(|(pid, _)| running["pid"].as_i64() == Some(i64::from(*pid))),
        "{processes:?}"
    );
    // The same records the CLI writes: the CLI reads the task back as the API shows it, and the
    // log holds the same kinds on the same keys for a submit of each.
    let listed = cluster.ctl.tasks();
    assert_eq!(listed["api/svc"]["node"], running["node"]);
    let log = cluster.ctl.json(&["audit", "api/svc"]);
    assert!(log.to_string().contains("api:alice@n1"), "the command names its token's holder: {log}");
    cluster.ctl.ok(&["submit", "--id", "cli/svc", "--stop-grace", "1s", "--", "sleep", "1000"]);
    let shape = |task: &str| -> Vec<(String, String)> {
        let entries = cluster.ctl.json(&["audit", task]);
        entries
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                let key = entry["key"].as_str().unwrap().replace(task, "ID");
                (entry["kind"].as_str().unwrap().to_owned(), key)
            })
            .collect()
    };
    assert_eq!(shape("api/svc"), shape("cli/svc"));
    assert_eq!(shape("api/svc").len(), 2, "{:?}", shape("api/svc"));
    wait_until(SETTLE, "every node lists it running", || {
        urls.iter().all(|url| {
            let tasks = http("GET", &format!("{url}/v1/tasks"), Some(READER), None).json();
            tasks.as_array().unwrap().iter().any(|row| row["id"] == "api/svc" && row["state"] == "running")
        })
    });
    let detail = http("GET", &format!("{}/v1/tasks/{}", urls[1], enc("api/svc")), Some(READER), None).json();
    assert_eq!(detail["spec"]["command"], "sh");
    assert_eq!(detail["revision"], created["revision"]);
    assert_eq!(created["revision"], 1, "a new task's own revision: {created}");
    assert_eq!(detail["offset"], created["offset"]);
    let nodes = http("GET", &format!("{}/v1/nodes", urls[1]), Some(READER), None).json();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|node| node["alive"] == true && node["cpus"].as_u64() > Some(0)), "{nodes:?}");
    assert!(nodes.iter().all(|node| node["memory_total_bytes"].as_u64() > Some(0)), "{nodes:?}");

    // Its output, whole and followed.
    wait_until(SETTLE, "output shipped", || {
        http("GET", &format!("{}/v1/tasks/{}/logs", urls[1], enc("api/svc")), Some(READER), None)
            .body
            .contains("started\n")
    });
    let tail =
        EventStream::open(&format!("{}/v1/tasks/{}/logs?follow=true", urls[1], enc("api/svc")), Some(READER));
    let mut ticks = 0;
    tail.wait_for(SETTLE, "three ticks followed", |event, chunk| {
        ticks +=
            chunk["text"].as_str().unwrap_or("").matches("tick").count() * usize::from(event == "output");
        ticks >= 3
    });
    // Closed (its reader thread ends at the next event): its place is free again well before
    // the limit is tested below.
    drop(tail);

    // Kill, start, delete: the kernel's table follows, and so does the stream.
    let url = &urls[1];
    let kill = http("POST", &format!("{url}/v1/tasks/{}/kill", enc("api/svc")), Some(WRITER), None);
    assert_eq!(kill.status, 202, "{kill:?}");
    // Read-your-writes: the very next read on the same node sees the command.
    let row = http("GET", &format!("{url}/v1/tasks/{}", enc("api/svc")), Some(READER), None).json();
    assert_eq!(row["desired"], "stopped", "{row}");
    stream.wait_for(SETTLE, "api/svc stopped", |event, row| {
        event == "task" && row["id"] == "api/svc" && row["state"] == "stopped"
    });
    wait_until(SETTLE, "no process", || task_processes(&cluster.name, "api/svc").is_empty());
    assert_eq!(
        http("POST", &format!("{url}/v1/tasks/{}/start", enc("api/svc")), Some(WRITER), None).status,
        202
    );
    stream.wait_for(SETTLE, "api/svc running again", |event, row| {
        event == "task" && row["id"] == "api/svc" && row["state"] == "running"
    });

    // A periodic task: its runs, a run now, suspend and resume.
    let cron = format!(
        r#"{{"id":"api/cron","command":"true","schedule":"* * * * * *","env":{{"E2E":"{}"}}}}"#,
        cluster.name
    );
    assert_eq!(http("POST", &format!("{url}/v1/tasks"), Some(WRITER), Some(&cron)).status, 201);
    let rows = http("GET", &format!("{url}/v1/tasks"), Some(READER), None).json();
    assert!(rows.as_array().unwrap().iter().any(|row| row["id"] == "api/cron"), "read-your-writes: {rows}");
    wait_until(SETTLE, "two runs succeeded", || {
        let runs =
            http("GET", &format!("{url}/v1/tasks/{}/runs?limit=50", enc("api/cron")), Some(READER), None);
        let runs = runs.json();
        assert!(runs.is_array(), "{runs}");
        runs.as_array().unwrap().iter().filter(|run| run["state"] == "succeeded").count() >= 2
    });
    assert_eq!(
        http("POST", &format!("{url}/v1/tasks/{}/run", enc("api/cron")), Some(WRITER), None).status,
        202
    );
    assert_eq!(
        http("POST", &format!("{url}/v1/tasks/{}/suspend", enc("api/cron")), Some(WRITER), None).status,
        202
    );
    stream.wait_for(SETTLE, "api/cron suspended", |event, row| {
        event == "task" && row["id"] == "api/cron" && row["desired"] == "suspended"
    });
    assert_eq!(
        http("POST", &format!("{url}/v1/tasks/{}/resume", enc("api/cron")), Some(WRITER), None).status,
        202
    );
    let removed = http("DELETE", &format!("{url}/v1/tasks/{}", enc("api/cron")), Some(WRITER), None);
    assert_eq!(removed.status, 200, "{removed:?}");
    stream.wait_for(SETTLE, "api/cron removed", |event, row| {
        event == "task-removed" && row["id"] == "api/cron"
    });

    // Refusals: no token, a wrong one, a reader writing.
    let tasks_url = format!("{url}/v1/tasks");
    for (token, status, says) in [
        (None, 401, "needs a token"),
        (Some("not-a-token-at-all-000"), 401, "unknown token"),
        (Some(READER), 403, "may only read"),
    ] {
        let refused = http("POST", &tasks_url, token, Some(&spec));
        assert_eq!(refused.status, status, "{refused:?}");
        assert!(refused.json()["error"].as_str().unwrap().contains(says), "{refused:?}");
    }
    assert_eq!(http("GET", &tasks_url, None, None).status, 401);
    assert_eq!(http("GET", &format!("{url}/metrics"), None, None).status, 401);
    assert_eq!(http("GET", &format!("{tasks_url}?access_token={READER}"), None, None).status, 200);

    // Bad input: each a JSON error that names what is wrong, with its status.
    let long = format!(r#"{{"id":"big","command":"true","args":["{}"]}}"#, "x".repeat(5 << 20));
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        ("POST", tasks_url.clone(), Some("{not json"), 400, "invalid"),
        ("POST", tasks_url.clone(), Some(r#"{"id":"x","command":"true","colour":"red"}"#), 400, "colour"),
        (
            "POST",
            tasks_url.clone(),
            Some(r#"{"id":"x","command":"true","stop_grace":"100000y"}"#),
            400,
            "stop_grace",
        ),
        ("POST", tasks_url.clone(), Some(&long), 413, "body"),
        ("GET", format!("{url}/v1/tasks/no%2Fsuch"), None, 404, "no task 'no/such'"),
        ("GET", format!("{url}/v1/tasks/a%20b"), None, 400, "task id 'a b'"),
        ("POST", format!("{url}/v1/tasks/no%2Fsuch/kill"), None, 404, "no task"),
        ("POST", format!("{url}/v1/tasks/{}/explode", enc("api/svc")), None, 404, "no command 'explode'"),
        ("POST", format!("{url}/v1/tasks/{}/run", enc("api/svc")), None, 409, "long-running service"),
        ("GET", format!("{url}/v1/tasks/{}/runs?limit=0", enc("api/svc")), None, 400, "limit '0'"),
        ("GET", format!("{url}/v1/tasks/{}/runs?colour=1", enc("api/svc")), None, 400, "colour"),
        (
            "GET",
            format!("{url}/v1/tasks/{}/logs?since=yesterday", enc("api/svc")),
            None,
            400,
            "since 'yesterday'",
        ),
        ("GET", format!("{url}/v1/tasks/{}/logs?run=zz", enc("api/svc")), None, 400, "run 'zz'"),
        ("GET", format!("{url}/v1/tasks/api/svc"), None, 405, "%2F"),
        ("GET", format!("{url}/v2/anything"), None, 404, "no endpoint"),
        ("GET", format!("{url}/v1/tasks/%FF"), None, 400, "the path"),
        ("PUT", tasks_url.clone(), Some("{}"), 405, "PUT is not allowed"),
    ];
    for (method, target, body, status, says) in cases {
        let token = if method == "GET" { READER } else { WRITER };
        let answer = http(method, &target, Some(token), body);
        assert_eq!(answer.status, status, "{method} {target}: {answer:?}");
        assert!(answer.content_type.starts_with("application/json"), "{method} {target}: {answer:?}");
        let error = answer.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(says), "{method} {target}: '{error}' names '{says}'");
    }
    // On loopback only IP addresses and localhost are answered (DNS rebinding).
    let (status, _) = raw_get(
        url,
        "/v1/tasks",
        &[("Host", "rebind.example:80"), ("Authorization", &format!("Bearer {READER}"))],
    );
    assert_eq!(status, 421);
    let (status, _) = raw_get(url, "/healthz", &[("Host", "localhost")]);
    assert_eq!(status, 200);

    // Reads of output are bounded (16 at a time), and a reader that leaves frees its place, even
    // while other tasks keep writing: closed here without a word, as a browser tab.
    let bearer = format!("Bearer {READER}");
    let follow = format!("/v1/tasks/{}/logs?follow=true", enc("cli/svc"));
    let streams: Vec<std::net::TcpStream> = (0..16)
        .map(|_| {
            let (status, stream) = raw_get(url, &follow, &[("Authorization", &bearer)]);
            assert_eq!(status, 200);
            stream
        })
        .collect();
    let busy = http("GET", &format!("{url}{follow}"), Some(READER), None);
    assert_eq!(busy.status, 503, "{busy:?}");
    assert!(busy.json()["error"].as_str().unwrap().contains("16 log reads at a time"), "{busy:?}");
    drop(streams);
    wait_until(Duration::from_secs(10), "the readers' places freed", || {
        let (status, _) = raw_get(url, &follow, &[("Authorization", &bearer)]);
        status == 200
    });

    // None of it hurt a node, and the one logging JSON logs nothing else.
    for node in &cluster.nodes {
        assert!(!node.log_text().contains("panic"), "{}", node.log_text());
    }
    let n3 = cluster.nodes[2].log_text();
    let lines: Vec<&str> = n3.lines().filter(|line| !line.trim().is_empty()).collect();
    assert!(lines.len() > 10);
    for line in lines {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        assert!(
            event["level"].is_string() && event["timestamp"].is_string() && event["message"].is_string(),
            "{line}"
        );
    }
    let metrics = http("GET", &format!("{url}/metrics"), Some(READER), None);
    assert_eq!(metrics.status, 200);
    assert!(metrics.content_type.starts_with("text/plain; version=0.0.4"), "{}", metrics.content_type);
    assert!(metrics.body.contains("shiva_http_requests_total{code=\"401\""), "{}", metrics.body);
}

#[test]
fn without_a_tokens_file_reads_are_open_writes_refused_and_the_dashboard_is_one_page() {
    let cluster = Cluster::start("api-open", 1, &[]);
    let url = cluster.nodes[0].http_url();
    wait_until(SETTLE, "ready", || http("GET", &format!("{url}/readyz"), None, None).status == 200);
    assert_eq!(http("GET", &format!("{url}/v1/tasks"), None, None).status, 200);
    let refused = http("POST", &format!("{url}/v1/tasks"), None, Some(r#"{"id":"x","command":"true"}"#));
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body.contains("--api-tokens"), "{refused:?}");
    assert!(cluster.ctl.tasks().is_empty(), "nothing was written");
    // The dashboard is one self-contained page.
    let page = http("GET", &format!("{url}/"), None, None);
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "nothing is fetched from elsewhere"
    );
    let started = Instant::now();
    let stream = EventStream::open(&format!("{url}/v1/events"), None);
    stream.wait_for(Duration::from_secs(5), "snapshot", |event, _| event == "snapshot");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_signed_cluster_refuses_api_writes_instead_of_writing_them_unsigned() {
    let dir = scratch("api-signed");
    let key = dir.join("id");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client) is missing");
    assert!(made.success());
    let keys = dir.join("id.pub").display().to_string();
    let tokens = tokens_file();
    let cluster = Cluster::start("api-signed", 1, &[&["--authorized-keys", &keys, "--api-tokens", &tokens]]);
    let url = cluster.nodes[0].http_url();
    wait_until(SETTLE, "ready", || http("GET", &format!("{url}/readyz"), None, None).status == 200);
    let refused =
        http("POST", &format!("{url}/v1/tasks"), Some(WRITER), Some(r#"{"id":"x","command":"true"}"#));
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body.contains("signed commands only"), "{refused:?}");
    assert_eq!(http("GET", &format!("{url}/v1/cluster"), Some(READER), None).json()["commands"], "signed");
    assert!(cluster.ctl.tasks().is_empty(), "nothing was written");
}
