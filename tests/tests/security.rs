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
        let archived = shiva_e2e::fsck_records(&fsck.stdout);
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

/// An ed25519 key pair made by `ssh-keygen` in `dir`: the private key's path.
fn ssh_key(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("{name}@test"), "-f"])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    path.display().to_string()
}

fn public(path: &str) -> String {
    std::fs::read_to_string(format!("{path}.pub")).unwrap().trim().to_owned()
}

#[test]
fn signed_commands_are_accepted_and_unsigned_foreign_out_of_prefix_and_replayed_ones_are_refused() {
    // The broker compacts every second: a replay must stay refused for readers that start
    // after compaction too (the leader writes the accepted command again after a refused one).
    let broker = Broker::start();
    let dir = scratch("keys");
    let (ops, tenant, stranger) = (ssh_key(&dir, "ops"), ssh_key(&dir, "tenant"), ssh_key(&dir, "stranger"));
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{}\nshiva-tasks=\"tenant-a/\" {}\n", public(&ops), public(&tenant)))
        .unwrap();
    let _node =
        Node::start(&broker, "signed", "n1", &["--authorized-keys", &authorized.display().to_string()]);
    let signed = |key: &str| Ctl::with_flags(&broker, "signed", &["--sign-key", key]);
    let ctl = signed(&ops);
    wait_until(Duration::from_secs(30), "a leader", || {
        ctl.try_json(&["nodes"]).is_some_and(|nodes| nodes.to_string().contains("\"leader\":true"))
    });
    let nodes = ctl.json(&["nodes"]);
    assert_eq!(nodes[0]["commands"], "signed", "{nodes}");

    // Accepted: the operator's key, and the tenant's key under its prefix.
    ctl.ok(&["submit", "--id", "ops/app", "--", "sleep", "600"]);
    signed(&tenant).ok(&["submit", "--id", "tenant-a/web", "--", "sleep", "601"]);
    let running = |id: &str| ctl.tasks().get(id).is_some_and(|task| task["state"] == "running");
    wait_until(Duration::from_secs(20), "both signed tasks run", || {
        running("ops/app") && running("tenant-a/web")
    });
    // The first revision of ops/app as it is on the log, for the replay below.
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let dump = kafka_tool_at(&bootstrap, &json!({}), &["consume", "shiva.signed.commands", "1", "0"]);
    let first = String::from_utf8_lossy(&dump.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|record| record["key"] == "task/ops/app")
        .expect("the first revision is in the log");
    use base64::Engine;
    let old = base64::engine::general_purpose::STANDARD.decode(first["value"].as_str().unwrap()).unwrap();

    // Refused, each with its reason in `status`, and nothing runs.
    let refusal = |id: &str, words: &str| {
        wait_until(Duration::from_secs(10), &format!("{id} refused: {words}"), || {
            let output = ctl.run(&["status", id]);
            output.status.success() && String::from_utf8_lossy(&output.stdout).contains(words)
        });
    };
    Ctl::new(&broker, "signed").ok(&["submit", "--id", "ops/unsigned", "--", "sleep", "602"]);
    refusal("ops/unsigned", "unsigned");
    signed(&stranger).ok(&["submit", "--id", "ops/foreign", "--", "sleep", "603"]);
    refusal("ops/foreign", "not in --authorized-keys");
    signed(&tenant).ok(&["submit", "--id", "tenant-b/web", "--", "sleep", "604"]);
    refusal("tenant-b/web", "only tasks under tenant-a/");
    // An unsigned change of a running task changes nothing.
    Ctl::new(&broker, "signed").ok(&["submit", "--id", "ops/app", "--", "sleep", "605"]);
    refusal("ops/app", "unsigned");

    // Replayed: the first revision of ops/app (copied off the log above) written again after a
    // newer signed revision.
    ctl.ok(&["submit", "--id", "ops/app", "--", "sleep", "606"]);
    wait_until(Duration::from_secs(20), "revision 2 runs", || {
        ctl.json(&["status", "ops/app"])["spec"]["args"][0] == "606" && running("ops/app")
    });
    let replay = dir.join("replay.json");
    std::fs::write(&replay, &old).unwrap();
    kafka_tool_at(
        &bootstrap,
        &json!({}),
        &["produce-file", "shiva.signed.commands", "task/ops/app", &replay.display().to_string()],
    );
    refusal("ops/app", "replayed");
    assert_eq!(ctl.json(&["status", "ops/app"])["spec"]["args"][0], "606", "the replay changed nothing");
    // The replay is no longer the newest record of its key, so compaction keeps revision 2: a
    // reader that starts after compaction (each shiva-ctl run reads the log from its start)
    // still sees it.
    wait_until(Duration::from_secs(20), "the accepted command is the newest record again", || {
        let dump = kafka_tool_at(&bootstrap, &json!({}), &["consume", "shiva.signed.commands", "1", "0"]);
        let newest = String::from_utf8_lossy(&dump.stdout)
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .rfind(|record| record["key"] == "task/ops/app");
        newest.is_some_and(|record| record["value"].as_str() != first["value"].as_str())
    });
    std::thread::sleep(Duration::from_secs(4));
    for _ in 0..3 {
        assert_eq!(
            ctl.json(&["status", "ops/app"])["spec"]["args"][0],
            "606",
            "a fresh reader after compaction"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // A key in an ssh-agent, named by its public half.
    let agent = dir.join("agent.sock");
    let mut ssh_agent = Command::new("ssh-agent").args(["-D", "-a"]).arg(&agent).spawn().expect("ssh-agent");
    wait_until(Duration::from_secs(5), "the agent listens", || agent.exists());
    let added = Command::new("ssh-add").arg(&ops).env("SSH_AUTH_SOCK", &agent).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let mut by_agent = signed(&format!("{ops}.pub"));
    by_agent.env.push(("SSH_AUTH_SOCK".into(), agent.display().to_string()));
    by_agent.ok(&["submit", "--id", "ops/agent", "--", "sleep", "607"]);
    wait_until(Duration::from_secs(20), "the agent-signed task runs", || running("ops/agent"));
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();

    // Who did what: the audit trail names the signer of each accepted command.
    let audit = ctl.ok(&["audit", "ops/app"]);
    assert!(audit.contains("ops@test") && audit.contains("accepted"), "{audit}");
    assert!(audit.contains("refused") && audit.contains("replayed"), "{audit}");
    // The kernel's process table: no refused command ever ran.
    let commands: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|line| String::from_utf8_lossy(&line).replace('\0', " "))
        .collect();
    for arg in ["602", "603", "604", "605"] {
        assert!(
            !commands.iter().any(|command| command.trim() == format!("sleep {arg}")),
            "a refused command ran: sleep {arg}"
        );
    }
    assert!(commands.iter().any(|command| command.trim() == "sleep 606"), "the signed revision runs");
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(kind) if kind.is_file() => {
                    found.push((path.clone(), std::fs::read(&path).unwrap_or_default()))
                }
                _ => {}
            }
        }
    }
    found
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
}

#[test]
fn a_secret_is_in_clear_only_in_its_tasks_environment_and_file_also_on_a_node_that_joined_later() {
    let broker = Broker::start();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let value = format!("s3cret-{}-{stamp}", std::process::id());
    let mut n1 = Node::start(&broker, "sec", "n1", &[]);
    let ctl = Ctl::new(&broker, "sec");
    wait_until(Duration::from_secs(30), "a leader", || {
        ctl.try_json(&["nodes"]).is_some_and(|nodes| nodes.to_string().contains("\"leader\":true"))
    });
    // No --authorized-keys: the cluster is open, and `nodes` says so.
    assert_eq!(ctl.json(&["nodes"])[0]["commands"], "open");
    assert!(ctl.ok(&["nodes"]).contains("warning: open cluster"), "nodes warns of an open cluster");
    let mut set = Command::new(bin("shiva-ctl"))
        .args(["--bus", &broker.url(), "--cluster", "sec", "secret", "set", "app/db"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    writeln!(set.stdin.take().unwrap(), "{value}").unwrap();
    let set = set.wait_with_output().unwrap();
    assert!(set.status.success(), "{}", text(&set));
    assert!(text(&set).contains("encrypted to n1"), "{}", text(&set));

    let spec = json!({
        "id": "app/db-user",
        "command": "sh",
        "args": ["-c", "if [ \"$DB_PASSWORD\" = \"$(cat db.pass)\" ] && [ -n \"$DB_PASSWORD\" ]; then echo same on $SHIVA_NODE_ID; else echo differ; fi; exec sleep 600"],
        "secrets": {"env": {"DB_PASSWORD": "app/db"}, "files": {"db.pass": "app/db"}},
        "stop_grace": "1s"
    });
    let spec_path = scratch("secret-spec").join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    ctl.ok(&["submit", &spec_path.display().to_string()]);
    let logged =
        |line: &str| String::from_utf8_lossy(&ctl.run(&["logs", "app/db-user"]).stdout).contains(line);
    wait_until(Duration::from_secs(20), "the task sees the secret on n1", || logged("same on n1"));

    // A node that joins later: the leader re-encrypts the secret to it, and the task moves there
    // when n1 dies.
    let mut n2 = Node::start(&broker, "sec", "n2", &[]);
    wait_until(Duration::from_secs(20), "the secret reaches n2", || {
        ctl.json(&["secret", "list"]).to_string().contains("\"nodes\":2")
    });
    n1.kill9();
    wait_until(Duration::from_secs(30), "the task sees the secret on n2", || logged("same on n2"));

    // Where the value is, in clear: only in the task's environment and its file.
    let task_file = |node: &Node| node.workspace.join("tasks/app/db-user/db.pass");
    assert_eq!(std::fs::read_to_string(task_file(&n2)).unwrap(), value);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(task_file(&n2)).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the secret file is its owner's only");
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    for (path, bytes) in files_under(&broker.dir) {
        places.push((format!("broker data {}", path.display()), bytes));
    }
    for node in [&n1, &n2] {
        for (path, bytes) in files_under(&node.workspace) {
            if path != task_file(node) {
                places.push((format!("workspace {}", path.display()), bytes));
            }
        }
    }
    for args in [
        &["list", "--json"][..],
        &["status", "app/db-user", "--json"],
        &["nodes", "--json"],
        &["secret", "list", "--json"],
        &["audit", "--json"],
        &["logs", "app/db-user"],
        &["history", "app/db-user"],
    ] {
        let output = ctl.run(args);
        places.push((format!("shiva-ctl {args:?}"), [output.stdout, output.stderr].concat()));
    }
    let ps = Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
    places.push(("ps -eo pid,args".into(), ps.stdout));
    for (place, bytes) in &places {
        assert!(!holds(bytes, &value), "the secret's value is in clear in {place}");
    }
    // Every process whose environment holds it is the task's own.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        if holds(&environ, &value) {
            assert!(
                holds(&environ, "SHIVA_TASK_ID=app/db-user"),
                "process {:?} holds the secret in its environment and is not the task",
                entry.file_name()
            );
        }
    }
    n2.kill9();
}

/// The uid a running task's process has (from the kernel's process table).
fn uid_of_task(command: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        if String::from_utf8_lossy(&cmdline).replace('\0', " ").trim() != command {
            return None;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        status.lines().find_map(|line| line.strip_prefix("Uid:")?.split_whitespace().next()?.parse().ok())
    })
}

#[test]
fn tasks_run_as_the_task_user_and_root_only_with_the_nodes_permission() {
    assert!(nix::unistd::geteuid().is_root(), "this test starts nodes as root");
    let broker = Broker::start();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a user 'nobody'");
    let mut node = Node::start(&broker, "users", "n1", &["--task-user", "nobody"]);
    let ctl = Ctl::new(&broker, "users");
    wait_until(Duration::from_secs(30), "a leader", || {
        ctl.try_json(&["nodes"]).is_some_and(|nodes| nodes.to_string().contains("\"leader\":true"))
    });
    assert!(!node.log_text().contains("tasks that name no user run as root"), "no warning with --task-user");
    ctl.ok(&["submit", "--id", "u/plain", "--", "sleep", "701"]);
    wait_until(Duration::from_secs(20), "the task runs as nobody", || {
        uid_of_task("sleep 701") == Some(nobody.uid.as_raw())
    });
    let spec = json!({"id": "u/root", "command": "sleep", "args": ["702"], "user": "root"});
    let path = scratch("root-spec").join("spec.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    ctl.ok(&["submit", &path.display().to_string()]);
    wait_until(Duration::from_secs(20), "a root task is refused with the reason", || {
        ctl.tasks().get("u/root").is_some_and(|task| task.to_string().contains("--allow-root-tasks"))
    });
    assert_eq!(uid_of_task("sleep 702"), None, "no root task ran");
    node.kill9();

    let mut allowing = Node::start(&broker, "users", "n2", &["--task-user", "nobody", "--allow-root-tasks"]);
    wait_until(Duration::from_secs(30), "the root task runs on a node that allows it", || {
        uid_of_task("sleep 702") == Some(0)
    });
    allowing.kill9();
}
