//! The systemd unit shipped in `packaging/systemd/`: `systemd-analyze verify` accepts it (with
//! its `ExecStart` pointed at this build's binary), and `systemd-analyze security` rates it
//! offline (the figure is printed, and docs/operations.md reports it). The Debian package built
//! by `scripts/package` holds the binaries, the unit and a configuration file the node reads.
//! Needs systemd's `systemd-analyze` and dpkg's `dpkg-deb`: missing, a test fails naming it.

use std::process::Command;

use shiva_e2e::{bin, repo, scratch};

#[test]
fn the_shipped_node_unit_passes_systemd_analyze_verify_and_is_rated() {
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/shiva-node.service")).unwrap();
    // What keeps the tasks across a reload and a crash, and lets the node stop them in order.
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=process",
        "Restart=always",
        "RestartPreventExitStatus=2 3",
        "TimeoutStopSec=70min",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    let dir = scratch("unit");
    let path = dir.join("shiva-node.service");
    let node = bin("shiva-node");
    std::fs::write(&path, unit.replace("/usr/bin/shiva-node", node.to_str().unwrap())).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package) is needed: apt-get install -y systemd");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let security =
        Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&path).output().unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let overall = report.lines().find(|line| line.contains("Overall exposure level")).unwrap_or_default();
    println!("systemd-analyze security: {overall}");
    assert!(overall.contains("exposure level for shiva-node.service"), "{report}");
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program} is needed (Debian's dpkg and systemd packages): {err}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{program} {args:?}: {}{text}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn the_package_holds_the_binaries_the_unit_and_a_configuration_the_node_reads() {
    let out = scratch("deb");
    let built =
        run(repo().join("scripts/package").to_str().unwrap(), &["--debug", "--out", out.to_str().unwrap()]);
    let deb = built.lines().last().expect("the package's path").to_owned();
    let info = run("dpkg-deb", &["--info", &deb]);
    // The libraries the binaries link, with their minimum versions (dpkg-shlibdeps).
    for field in
        ["Package: shiva", "Version: ", "Architecture: ", "libc6 (>= ", "libssl3", "libsasl2-2", "libzstd1"]
    {
        assert!(info.contains(field), "{field} in {info}");
    }
    let contents = run("dpkg-deb", &["--contents", &deb]);
    for path in [
        "./usr/bin/shiva-node",
        "./usr/bin/shiva-shim",
        "./usr/bin/shiva-ctl",
        "./usr/bin/shiva-archiver",
        "./usr/bin/shiva-indexer",
        "./usr/share/shiva/pipelines/archive/events.yaml",
        "./usr/share/shiva/pipelines/index/events.yaml",
        "./usr/share/shiva/pipelines/README.md",
        "./lib/systemd/system/shiva-node.service",
        "./etc/shiva/node.toml",
    ] {
        assert!(contents.lines().any(|line| line.ends_with(path)), "{path} in {contents}");
    }
    let root = out.join("root");
    run("dpkg-deb", &["--extract", &deb, root.to_str().unwrap()]);
    let control = out.join("control");
    run("dpkg-deb", &["--control", &deb, control.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(control.join("conffiles")).unwrap().trim(), "/etc/shiva/node.toml");
    for script in ["postinst", "prerm", "postrm"] {
        run("sh", &["-n", control.join(script).to_str().unwrap()]);
    }
    // The node reads the packaged configuration (a bad key would stop it with exit 2), and the
    // packaged shim speaks this build's protocol.
    let node = root.join("usr/bin/shiva-node");
    let config = root.join("etc/shiva/node.toml");
    let checked = run(node.to_str().unwrap(), &["--config", config.to_str().unwrap(), "--check-config"]);
    assert!(checked.contains("the flags and the configuration are valid"), "{checked}");
    let shim = run(root.join("usr/bin/shiva-shim").to_str().unwrap(), &["--version"]);
    assert_eq!(shim, run(bin("shiva-shim").to_str().unwrap(), &["--version"]), "this build's shim");
    assert!(shim.contains("protocol "), "{shim}");
    // The packaged unit, pointed at the packaged binary.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/shiva-node.service")).unwrap();
    let path = out.join("shiva-node.service");
    std::fs::write(&path, unit.replace("/usr/bin/shiva-node", node.to_str().unwrap())).unwrap();
    run("systemd-analyze", &["verify", path.to_str().unwrap()]);
}
