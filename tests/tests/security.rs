//! Security end to end: TLS and mutual TLS through a real terminator (Debian's stunnel) in front
//! of the test broker, with a test CA made by `openssl`; SASL/SCRAM logins on the broker itself.
//! A node, `shiva-ctl` and `shiva-archiver` work through them; a wrong CA, a missing client
//! certificate or a wrong password ends each with exit 3 and a message that says why.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;
use shiva_e2e::{Broker, Ctl, Node, Terminator, TestCa, bin, free_port, kafka_tool_at, scratch, wait_until};

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn flags(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

/// `shiva-archiver run` of `topic` at `bootstrap` until it has archived `count` records (then
/// SIGTERM), or until it exits by itself: its exit code and log.
fn archive(
    bootstrap: &str,
    topic: &str,
    settings: &[String],
    dir: &Path,
    count: u64,
) -> (Option<i32>, String) {
    let log_path = dir.join(format!("archiver-{}.log", free_port()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(bin("shiva-archiver"))
        .args(["run", "--bootstrap", bootstrap, "--topic", topic, "--idle-publish", "300ms"])
        .args(["--dest", &format!("file://{}", dir.join("archive").display())])
        .args(settings)
        .env("SHIVA_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), std::fs::read_to_string(&log_path).unwrap());
        }
        let fsck = Command::new(bin("shiva-archiver"))
            .args(["fsck", "--topic", topic, "--dest", &format!("file://{}", dir.join("archive").display())])
            .output()
            .unwrap();
        let archived: u64 = String::from_utf8_lossy(&fsck.stdout)
            .lines()
            .filter_map(|line| line.split(" files, ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        if archived >= count {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let status = child.wait().unwrap();
            return (status.code(), std::fs::read_to_string(&log_path).unwrap());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the archiver archived {archived} of {count} records in 60 s:\n{}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// librdkafka settings as the JSON object `kafka_tool.py` takes.
fn settings_json(flags: &[String]) -> serde_json::Value {
    let pairs = flags.chunks(2).filter_map(|pair| pair[1].split_once('='));
    serde_json::Value::Object(pairs.map(|(key, value)| (key.to_owned(), json!(value))).collect())
}

#[test]
fn node_ctl_and_archiver_work_through_tls_and_mutual_tls_and_a_wrong_ca_or_no_client_certificate_exits_3() {
    let ca = TestCa::make();
    let tls_port = free_port();
    let broker = Broker::start_behind(Some(tls_port), false);
    let mut terminator = Terminator::start(&ca, tls_port, broker.port, true);
    // Clients reach the broker only through the terminator: its metadata names the TLS port.
    let tls_bus = &broker;
    let mtls = ca.client_flags("ca.pem", true);

    // A node and the CLI through mutual TLS: the task runs.
    let node = Node::start(tls_bus, "tls", "n1", &flags(&mtls));
    let ctl = Ctl::with_flags(tls_bus, "tls", &flags(&mtls));
    wait_until(Duration::from_secs(30), "the node leads through TLS", || {
        ctl.try_json(&["nodes"]).is_some_and(|nodes| nodes.to_string().contains("\"leader\":true"))
    });
    ctl.ok(&["submit", "--id", "tls/app", "--", "sleep", "600"]);
    wait_until(Duration::from_secs(20), "the task runs", || {
        ctl.tasks().get("tls/app").is_some_and(|task| task["state"] == "running")
    });
    drop(node);

    // The archiver through mutual TLS, records produced by confluent-kafka through it too.
    let bootstrap = format!("127.0.0.1:{tls_port}");
    kafka_tool_at(&bootstrap, &settings_json(&mtls), &["create", "events", "1"]);
    kafka_tool_at(&bootstrap, &settings_json(&mtls), &["produce", "events", "1", "0", "200"]);
    let dir = scratch("tls-archive");
    let (code, log) = archive(&bootstrap, "events", &mtls, &dir, 200);
    assert_eq!(code, Some(0), "the archiver through mutual TLS:\n{log}");

    // The failures: the CLI, the archiver and a node, each with exit 3 and the reason.
    for (what, client) in [
        ("a wrong CA", ca.client_flags("other-ca.pem", true)),
        ("no client certificate", ca.client_flags("ca.pem", false)),
    ] {
        let output = Ctl::with_flags(tls_bus, "tls", &flags(&client)).run(&["list"]);
        let said = text(&output);
        assert_eq!(output.status.code(), Some(3), "shiva-ctl with {what}: {said}");
        assert!(
            said.contains("refuses this client") && said.contains("TLS"),
            "shiva-ctl with {what} says why: {said}"
        );
        let (code, log) = archive(&bootstrap, "events", &client, &dir, u64::MAX);
        assert_eq!(code, Some(3), "shiva-archiver with {what}:\n{log}");
        assert!(log.contains("TLS handshake failed"), "shiva-archiver with {what} says why:\n{log}");
        let mut node = Node::start(tls_bus, "tls", "n2", &flags(&client));
        let status = node.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(3), "shiva-node with {what}:\n{}", node.log_text());
        assert!(node.log_text().contains("TLS handshake failed"), "shiva-node with {what} says why");
    }
    let wrong = ca.client_flags("other-ca.pem", true);
    let said = text(&Ctl::with_flags(tls_bus, "tls", &flags(&wrong)).run(&["list"]));
    assert!(said.contains("certificate verify failed"), "a wrong CA is named: {said}");

    // TLS with server verification only: the CLI with the CA and no certificate of its own.
    drop(terminator);
    terminator = Terminator::start(&ca, tls_port, broker.port, false);
    let tls = ca.client_flags("ca.pem", false);
    let listed = Ctl::with_flags(tls_bus, "tls", &flags(&tls)).ok(&["list"]);
    assert!(listed.contains("tls/app"), "{listed}");
    let output =
        Ctl::with_flags(tls_bus, "tls", &flags(&ca.client_flags("other-ca.pem", false))).run(&["list"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    drop(terminator);
}

#[test]
fn node_ctl_and_archiver_log_in_with_sasl_scram_and_a_wrong_password_exits_3() {
    let mut broker = Broker::start_behind(None, false);
    broker.add_user("shiva", "node-secret");
    broker.restart_with_authentication();
    let login = |password: &str| -> Vec<String> {
        [
            "security.protocol=sasl_plaintext",
            "sasl.mechanism=SCRAM-SHA-256",
            "sasl.username=shiva",
            &format!("sasl.password={password}"),
        ]
        .iter()
        .flat_map(|setting| ["-X".to_owned(), setting.to_string()])
        .collect()
    };
    let good = login("node-secret");
    let _node = Node::start(&broker, "sasl", "n1", &flags(&good));
    let ctl = Ctl::with_flags(&broker, "sasl", &flags(&good));
    wait_until(Duration::from_secs(30), "the node leads after logging in", || {
        ctl.try_json(&["nodes"]).is_some_and(|nodes| nodes.to_string().contains("\"leader\":true"))
    });
    ctl.ok(&["submit", "--id", "sasl/app", "--", "sleep", "600"]);
    wait_until(Duration::from_secs(20), "the task runs", || {
        ctl.tasks().get("sasl/app").is_some_and(|task| task["state"] == "running")
    });
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    kafka_tool_at(&bootstrap, &settings_json(&good), &["create", "events", "1"]);
    kafka_tool_at(&bootstrap, &settings_json(&good), &["produce", "events", "1", "0", "100"]);
    let dir = scratch("sasl-archive");
    let (code, log) = archive(&bootstrap, "events", &good, &dir, 100);
    assert_eq!(code, Some(0), "the archiver logged in:\n{log}");

    let bad = login("wrong");
    let output = Ctl::with_flags(&broker, "sasl", &flags(&bad)).run(&["list"]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(3), "{said}");
    assert!(said.contains("authentication failed"), "a failed login is named: {said}");
    let (code, log) = archive(&bootstrap, "events", &bad, &dir, u64::MAX);
    assert_eq!(code, Some(3), "{log}");
    assert!(log.contains("authentication failed"), "{log}");
}
