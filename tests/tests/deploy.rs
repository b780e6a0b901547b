//! Deployment on real hosts: three Debian 12 containers with systemd as PID 1 (the root file
//! system `scripts/rootfs` builds once into the cache, booted read-only by `systemd-nspawn
//! --boot --volatile=overlay`, each with its own layer in memory), sharing this machine's network:
//! they reach the broker on 127.0.0.1 and ansible reaches each over SSH on a port of its own.
//! `ansible/site.yml` installs the package `scripts/package` builds and forms the cluster; a task
//! runs; `ansible/upgrade.yml` installs a package with another `shiva-node` binary one host at a
//! time and no task restarts (the kernel's process table, in this machine's pid namespace, sees
//! the same process throughout, and never two); `systemctl stop shiva-node` stops the node's task
//! within its grace and the task moves.
//!
//! Needs root, debootstrap and systemd-nspawn (Debian's systemd-container), ssh and ansible
//! (`scripts/test` installs ansible-core into its venv: `SHIVA_E2E_ANSIBLE`, or the
//! `ansible-playbook` beside `SHIVA_E2E_PYTHON`): a missing one fails the test, naming it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shiva_e2e::{
    Broker, Ctl, Terminator, TestCa, cluster, free_port, repo, scratch, task_processes, wait_until,
};

/// A container booted as a host.
struct Host {
    name: String,
    port: u16,
    nspawn: Child,
}

impl Host {
    fn boot(rootfs: &Path, dir: &Path, name: &str, key: &Path) -> Host {
        let port = free_port();
        let sshd = dir.join(format!("{name}-sshd.conf"));
        std::fs::write(&sshd, format!("Port {port}\nListenAddress 127.0.0.1\n")).unwrap();
        // The root file system's /etc/hostname is the build machine's: each host its own.
        let hostname = dir.join(format!("{name}-hostname"));
        std::fs::write(&hostname, format!("{name}\n")).unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.console"))).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .args(["--boot", "--register=no", "--keep-unit", "--volatile=overlay", "--quiet"])
            .arg(format!("--directory={}", rootfs.display()))
            .arg(format!("--machine={name}"))
            .arg(format!("--hostname={name}"))
            .arg(format!("--bind-ro={}:/root/.ssh/authorized_keys", key.with_extension("pub").display()))
            .arg(format!("--bind-ro={}:/etc/ssh/sshd_config.d/port.conf", sshd.display()))
            .arg(format!("--bind-ro={}:/etc/hostname", hostname.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "systemd-nspawn (Debian's systemd-container) is needed: apt-get install -y systemd-container",
            );
        Host { name: name.to_owned(), port, nspawn }
    }

    /// Runs a shell command on the host as root, over SSH.
    fn ssh(&self, key: &Path, command: &str) -> Output {
        Command::new("ssh")
            .args(["-i", key.to_str().unwrap(), "-p", &self.port.to_string()])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR"])
            .arg("root@127.0.0.1")
            .arg(command)
            .output()
            .expect("ssh (Debian's openssh-client) is needed")
    }

    fn ssh_ok(&self, key: &Path, command: &str) -> String {
        let output = self.ssh(key, command);
        assert!(
            output.status.success(),
            "on {}: `{command}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        shiva_e2e::power_off(&mut self.nspawn);
    }
}

fn run(command: &mut Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(
        output.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ansible_playbook() -> PathBuf {
    let path = match std::env::var("SHIVA_E2E_ANSIBLE") {
        Ok(path) => PathBuf::from(path),
        Err(_) => {
            let python =
                PathBuf::from(std::env::var("SHIVA_E2E_PYTHON").unwrap_or_else(|_| "python3".into()));
            python.parent().map(|dir| dir.join("ansible-playbook")).unwrap_or_default()
        }
    };
    assert!(
        path.is_file(),
        "ansible-playbook not found at {} (scripts/test installs ansible-core into its venv; or set SHIVA_E2E_ANSIBLE)",
        path.display()
    );
    path
}

/// A copy of the package `deb` whose `shiva-node` differs (a section of its own added: another
/// binary, the same code) under a later version: what an upgrade installs.
fn another_build(deb: &Path, dir: &Path) -> (PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let tree = dir.join("tree");
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree), "dpkg-deb -R");
    let note = dir.join("note");
    std::fs::write(&note, "the upgrade test's build\n").unwrap();
    let node = tree.join("usr/bin/shiva-node");
    run(
        Command::new("objcopy")
            .arg("--add-section")
            .arg(format!(".shiva_upgrade_test={}", note.display()))
            .arg(&node),
        "objcopy (binutils)",
    );
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text = text
        .lines()
        .map(|line| match line.strip_prefix("Version: ") {
            Some(version) => format!("Version: {version}+1"),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&control, text + "\n").unwrap();
    let out = dir.join("shiva-upgrade.deb");
    run(
        Command::new("dpkg-deb").args(["--root-owner-group", "-Znone", "--build"]).arg(&tree).arg(&out),
        "dpkg-deb --build",
    );
    let sum = run(Command::new("sha256sum").arg(&node), "sha256sum");
    (out, sum.split_whitespace().next().unwrap().to_owned())
}

#[test]
fn the_role_deploys_a_cluster_on_systemd_hosts_and_the_rolling_upgrade_restarts_no_task() {
    // The hosts reach the broker only through mutual TLS (stunnel in front of it, the broker's
    // metadata naming the TLS port): the role copies the CA and the client certificate and key
    // (shiva_files) and names them in the Kafka settings (shiva_kafka).
    let ca = TestCa::make();
    let tls_port = free_port();
    let broker = Broker::start_behind(Some(tls_port), false);
    let _terminator = Terminator::start(&ca, tls_port, broker.port, true);
    let mtls = ca.client_flags("ca.pem", true);
    let name = cluster("deploy");
    let dir = scratch("deploy");
    let ansible = ansible_playbook();
    let rootfs = run(&mut Command::new(repo().join("scripts/rootfs")), "scripts/rootfs");
    let rootfs = PathBuf::from(rootfs.lines().last().expect("the root file system's path"));
    let built = run(
        Command::new(repo().join("scripts/package")).args(["--debug", "--out", dir.to_str().unwrap()]),
        "scripts/package",
    );
    let first = PathBuf::from(built.lines().last().expect("the package's path"));
    let (second, second_node) = another_build(&first, &dir.join("upgrade"));

    let key = dir.join("id_ed25519");
    run(
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key),
        "ssh-keygen (Debian's openssh-client)",
    );
    let hosts: Vec<Host> =
        (1..=3).map(|i| Host::boot(&rootfs, &dir, &format!("{name}-h{i}"), &key)).collect();
    for host in &hosts {
        wait_until(Duration::from_secs(90), &format!("{} answers over SSH", host.name), || {
            host.ssh(&key, "timeout 30 systemctl is-system-running --wait >/dev/null 2>&1; true")
                .status
                .success()
        });
    }
    let inventory = dir.join("inventory.ini");
    let mut text = String::from("[shiva]\n");
    for host in &hosts {
        text += &format!("{} ansible_host=127.0.0.1 ansible_port={}\n", host.name, host.port);
    }
    text += &format!(
        "\n[shiva:vars]\nansible_user=root\nansible_ssh_private_key_file={key}\nansible_python_interpreter=/usr/bin/python3\n\
         ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n\
         shiva_bus={bus}\nshiva_cluster={name}\nshiva_http=127.0.0.1:0\n",
        key = key.display(),
        bus = broker.url(),
    );
    std::fs::write(&inventory, text).unwrap();
    // The operator's signing key: the role gives its public half to every node, which then
    // accepts only commands it signed.
    let operator = dir.join("operator_ed25519");
    run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "deploy-operator", "-f"])
            .arg(&operator),
        "ssh-keygen (Debian's openssh-client)",
    );
    let operator_pub = std::fs::read_to_string(operator.with_extension("pub")).unwrap();
    // Lists and mappings in YAML, as an operator writes them (an INI value is a string).
    std::fs::create_dir_all(dir.join("group_vars")).unwrap();
    std::fs::write(
        dir.join("group_vars/shiva.yml"),
        format!(
            "shiva_tags: [deploy, ssd]\nshiva_settings:\n  heartbeat-interval: 200ms\n  fence-timeout: 2s\n\
             shiva_authorized_keys: {}\n\
             shiva_files:\n\
             - {{src: {ca}, dest: ca.pem, mode: '0644'}}\n\
             - {{src: {cert}, dest: client.pem, mode: '0644'}}\n\
             - {{src: {key}, dest: client.key}}\n\
             shiva_kafka:\n\
             - security.protocol=ssl\n\
             - ssl.ca.location=/etc/shiva/ca.pem\n\
             - ssl.certificate.location=/etc/shiva/client.pem\n\
             - ssl.key.location=/etc/shiva/client.key\n",
            serde_json::to_string(operator_pub.trim()).unwrap(),
            ca = ca.file("ca.pem"),
            cert = ca.file("client.pem"),
            key = ca.file("client.key"),
        ),
    )
    .unwrap();
    let playbook = |file: &str, package: &Path| -> String {
        let started = Instant::now();
        let output = run(
            Command::new(&ansible)
                .arg("-i")
                .arg(&inventory)
                .arg(repo().join("ansible").join(file))
                .arg("-e")
                .arg(format!("shiva_package={}", package.display()))
                .env("ANSIBLE_HOST_KEY_CHECKING", "False")
                .env("ANSIBLE_PIPELINING", "True")
                .env("ANSIBLE_HOME", dir.join("ansible-home"))
                .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
                .env("ANSIBLE_NOCOLOR", "1"),
            &format!("ansible-playbook {file}"),
        );
        println!("{file}: {:.1}s", started.elapsed().as_secs_f64());
        output
    };
    // The PLAY RECAP's line of every host says `changed=0`.
    let unchanged = |output: &str| {
        hosts.iter().all(|host| {
            output.lines().any(|line| line.starts_with(&host.name) && line.contains(" changed=0 "))
        })
    };

    // The role installs, configures and starts every node, and waits until each is live.
    playbook("site.yml", &first);
    let mut signed: Vec<&str> = mtls.iter().map(String::as_str).collect();
    signed.extend(["--sign-key", operator.to_str().unwrap()]);
    let ctl = Ctl::with_flags(&broker, &name, &signed);
    let nodes = ctl.json(&["nodes"]);
    let alive: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["alive"] == true)
        .filter_map(|node| node["id"].as_str())
        .collect();
    assert_eq!(alive.len(), 3, "three nodes live: {nodes}");
    for node in nodes.as_array().unwrap() {
        assert_eq!(node["tags"], serde_json::json!(["deploy", "ssd"]), "the role's tags: {node}");
    }
    for host in &hosts {
        assert_eq!(host.ssh_ok(&key, "systemctl is-enabled shiva-node"), "enabled");
    }
    // Applied again, the role changes nothing.
    let again = playbook("site.yml", &first);
    assert!(unchanged(&again), "a second run changed something:\n{again}");

    // The nodes took the role's authorized keys: an unsigned command is refused, and says so.
    let plain: Vec<&str> = mtls.iter().map(String::as_str).collect();
    let unsigned = Ctl::with_flags(&broker, &name, &plain);
    for host in &hosts {
        assert_eq!(
            host.ssh_ok(&key, "stat -c %a /etc/shiva/client.key"),
            "600",
            "{}: the key is root's",
            host.name
        );
    }
    unsigned.ok(&["submit", "--id", "deploy/unsigned", "--", "sleep", "100000"]);
    wait_until(Duration::from_secs(30), "the unsigned command is refused", || {
        let output = ctl.run(&["status", "deploy/unsigned"]);
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("unsigned")
    });
    for host in &hosts {
        assert_eq!(host.ssh_ok(&key, "stat -c %a /etc/shiva/authorized_keys"), "644", "{}", host.name);
    }

    // A task runs once.
    let task = "deploy/svc";
    let marker = format!("E2E={name}");
    ctl.ok(&["submit", "--id", task, "--env", &marker, "--stop-grace", "3s", "--", "sleep", "100000"]);
    let mut running: Vec<(i32, String)> = Vec::new();
    wait_until(Duration::from_secs(60), "the task runs once", || {
        running = task_processes(&name, task);
        running.len() == 1
    });
    let (pid, node) = running[0].clone();
    let host_of =
        |node: &str| hosts.iter().find(|host| host.name == node).expect("the task's node is a host");

    // Each run is a systemd scope of its own in shiva.slice (outside the node's unit,
    // delegated, no task cap of systemd's, stopped after the node at shutdown), its task in the
    // scope's task/ sub-cgroup.
    let task_host = host_of(&node);
    let scopes = task_host.ssh_ok(
        &key,
        "systemctl list-units --type=scope --state=running --no-legend --plain 'shiva-run-*' | cut -d' ' -f1",
    );
    assert_eq!(scopes.lines().count(), 1, "one run on {}, one scope: {scopes:?}", task_host.name);
    let scope = scopes.trim();
    let shown =
        task_host.ssh_ok(&key, &format!("systemctl show --property=Slice,Delegate,TasksMax,Before {scope}"));
    for property in ["Slice=shiva.slice", "Delegate=yes", "TasksMax=infinity", "shiva-node.service"] {
        assert!(shown.contains(property), "{scope}: {property} in {shown}");
    }
    let cgroup = task_host.ssh_ok(&key, &format!("systemctl show --property=ControlGroup --value {scope}"));
    assert!(cgroup.starts_with("/shiva.slice/shiva-run-"), "{scope}'s cgroup: {cgroup}");
    let task_pids = task_host.ssh_ok(
        &key,
        &format!(
            "for r in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do \
             [ -f $r{cgroup}/task/cgroup.procs ] && cat $r{cgroup}/task/cgroup.procs; done; true"
        ),
    );
    assert_eq!(task_pids.lines().count(), 1, "the task alone in {cgroup}/task: {task_pids:?}");

    // Limits: the scope's properties where the host's systemd can enforce them (a memory and a
    // CPU controller it may write), else refused by name, never dropped. The hosts here are
    // containers: what their cgroups offer depends on the machine under them.
    let limited = "deploy/limited";
    let spec = serde_json::json!({
        "id": limited, "command": "sleep", "args": ["100000"], "env": {"E2E": name},
        "memory_max": "64MiB", "cpu_max": 0.015, "stop_grace": "3s",
    });
    let spec_file = dir.join("limited.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let offered = task_host.ssh_ok(
        &key,
        "if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null && test -w /sys/fs/cgroup/cgroup.subtree_control \
            || test -w /sys/fs/cgroup/memory -a -w /sys/fs/cgroup/cpu; then echo yes; else echo no; fi",
    ) == "yes";
    println!("the hosts' systemd can enforce memory and CPU limits: {offered}");
    ctl.ok(&["submit", spec_file.to_str().unwrap()]);
    if offered {
        let mut limited_run: Vec<(i32, String)> = Vec::new();
        wait_until(Duration::from_secs(60), "the limited task runs", || {
            limited_run = task_processes(&name, limited);
            limited_run.len() == 1
        });
        let limited_host = host_of(&limited_run[0].1);
        let scopes = limited_host.ssh_ok(
            &key,
            "systemctl list-units --type=scope --state=running --no-legend --plain 'shiva-run-*' | cut -d' ' -f1",
        );
        let scope = scopes
            .lines()
            .find(|unit| {
                limited_host
                    .ssh_ok(&key, &format!("systemctl show --property=CPUQuotaPerSecUSec {unit}"))
                    .contains("CPUQuotaPerSecUSec=15ms")
            })
            .unwrap_or_else(|| panic!("no scope with the task's CPU limit (1.5 %) among {scopes:?}"));
        let cgroup =
            limited_host.ssh_ok(&key, &format!("systemctl show --property=ControlGroup --value {scope}"));
        let memory = limited_host.ssh_ok(
            &key,
            &format!(
                "cat /sys/fs/cgroup{cgroup}/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes"
            ),
        );
        assert_eq!(memory, "67108864", "the kernel holds the scope's memory limit");
    } else {
        wait_until(Duration::from_secs(60), "the limited task is refused by name", || {
            let output = ctl.run(&["status", limited]);
            String::from_utf8_lossy(&output.stdout).contains("memory_max needs a cgroup controller")
        });
        assert!(task_processes(&name, limited).is_empty(), "nothing runs without its limits");
    }
    ctl.ok(&["delete", limited]);

    // The rolling upgrade, watched: the task's one process stays the same throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, name) = (stop.clone(), name.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = task_processes(&name, task);
                if now.len() != 1 || now[0].0 != pid {
                    seen.push(now);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        })
    };
    playbook("upgrade.yml", &second);
    stop.store(true, Ordering::Relaxed);
    let changes = watcher.join().unwrap();
    assert!(changes.is_empty(), "the task's process changed during the upgrade: {changes:?}");
    assert_eq!(task_processes(&name, task), vec![(pid, node.clone())]);
    for host in &hosts {
        let sum =
            host.ssh_ok(&key, "sha256sum /proc/$(systemctl show --property MainPID --value shiva-node)/exe");
        assert_eq!(
            sum.split_whitespace().next(),
            Some(second_node.as_str()),
            "{} runs the new binary",
            host.name
        );
        // Nor did the node itself restart, at the first run or since.
        assert_eq!(host.ssh_ok(&key, "systemctl show --property NRestarts --value shiva-node"), "0");
    }

    // A crash of every node (SIGKILL to the node alone, as a crash kills it): systemd starts
    // each again and it takes its runs back; their scopes were never the node unit's.
    for host in &hosts {
        host.ssh_ok(&key, "systemctl kill --kill-whom=main --signal=SIGKILL shiva-node");
    }
    for host in &hosts {
        wait_until(Duration::from_secs(60), &format!("{} restarted", host.name), || {
            host.ssh_ok(&key, "systemctl show --property NRestarts --value shiva-node") == "1"
        });
    }
    wait_until(Duration::from_secs(60), &format!("{} took {task} back", task_host.name), || {
        task_host
            .ssh_ok(&key, "journalctl _SYSTEMD_INVOCATION_ID=$(systemctl show --property=InvocationID --value shiva-node) -o cat | grep 'task taken back' || true")
            .contains(task)
    });
    assert_eq!(task_processes(&name, task), vec![(pid, node.clone())], "the task kept its process");
    assert_eq!(
        task_host.ssh_ok(&key, "systemctl list-units --type=scope --state=running --no-legend --plain 'shiva-run-*' | cut -d' ' -f1"),
        scope,
        "the run's scope went on"
    );

    let host = host_of(&node);
    // A graceful stop: the node stops its task within its grace, then itself; the task moves.
    let started = Instant::now();
    host.ssh_ok(&key, "systemctl stop shiva-node");
    assert!(!shiva_e2e::pid_alive(pid), "the task stopped with its node");
    assert!(started.elapsed() < Duration::from_secs(30), "stopped in {:?}", started.elapsed());
    assert_eq!(host.ssh_ok(&key, "systemctl show --property Result --value shiva-node"), "success");
    wait_until(Duration::from_secs(60), "the task runs once on another node", || {
        let now = task_processes(&name, task);
        assert!(now.len() <= 1, "two copies: {now:?}");
        now.len() == 1 && now[0].1 != node
    });
}
