//! The systemd unit shipped in `packaging/systemd/`: `systemd-analyze verify` accepts it (with
//! its `ExecStart` pointed at this build's binary), and `systemd-analyze security` rates it
//! offline (the figure is printed, and docs/operations.md reports it). Needs systemd's
//! `systemd-analyze`: missing, the test fails naming it.

use std::process::Command;

use shiva_e2e::{bin, repo, scratch};

#[test]
fn the_shipped_node_unit_passes_systemd_analyze_verify_and_is_rated() {
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/shiva-node.service")).unwrap();
    // What keeps the tasks across a reload and a crash, and lets the node stop them in order.
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=process",
        "Delegate=yes",
        "Restart=always",
        "RestartPreventExitStatus=2 3",
        "TimeoutStopSec=62min",
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
