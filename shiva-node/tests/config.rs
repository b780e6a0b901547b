//! The node's configuration file, through the real binary: a `SHIVA_*` variable overrides a key
//! of the file, and a bad file stops the node with exit code 2, naming the file and the key.

use std::process::Command;

/// `shiva-node --config FILE ARGS…` with only `env` (and `PATH`) in its environment.
fn node_with(file: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shiva-node"));
    command.arg("--config").arg(file).args(args).env_clear().env("PATH", "/usr/bin:/bin");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run shiva-node")
}

/// The node started with `--config FILE` and `env`.
fn node(file: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    node_with(file, &[], env)
}

#[test]
fn a_variable_overrides_the_file_and_a_bad_file_exits_2_naming_its_key() {
    let dir = std::env::temp_dir().join(format!("shiva-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    // The file's value is good; the variable's is out of range: the variable is the one read.
    std::fs::write(
        &file,
        "node-id = \"a\"\nheartbeat-interval = \"300ms\"\nbus = \"file:///nonexistent/bus\"\n",
    )
    .unwrap();
    let out = node(&file, &[("SHIVA_HEARTBEAT_INTERVAL", "100000000y")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--heartbeat-interval 100000000years: must be from 10ms to 10s"), "{stderr}");
    // The other way round: the file's value out of range, the variable's good, and a flag that
    // wins over both.
    std::fs::write(&file, "node-id = \"a\"\nheartbeat-interval = \"1h\"\nbus = \"ftp://nowhere\"\n").unwrap();
    let out = node(&file, &[("SHIVA_HEARTBEAT_INTERVAL", "300ms")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("--heartbeat-interval"), "the variable won: {stderr}");
    assert!(stderr.contains("--bus"), "the file's bus was read: {stderr}");
    // A key the node does not know: exit 2, the file and the key named.
    std::fs::write(&file, "heartbit = \"1s\"\n").unwrap();
    let out = node(&file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("unknown key 'heartbit'"),
        "{stderr}"
    );
    // --check-config says so without starting; --help answers whatever the file says.
    std::fs::write(&file, "node-id = \"a\"\nheartbeat-interval = \"1h\"\n").unwrap();
    let out = node(&file, &[]);
    assert!(!out.status.success());
    let out = node_with(&file, &["--check-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heartbeat-interval 1h"));
    std::fs::write(&file, "node-id = \"a\"\n").unwrap();
    let out = node_with(&file, &["--check-config"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&file, "garbage =").unwrap();
    let out = node_with(&file, &["--help"], &[]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--config"));
    let _ = std::fs::remove_dir_all(&dir);
}
