//! The file bus's crash safety (issue 16, point 3), with real processes: appenders killed with
//! SIGKILL hundreds of times, mid-write among them, lose no acknowledged record and leave a
//! log every reader reads whole, with dense offsets.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shiva_bus::filelog::{Cursor, Frame, TopicLog};
use shiva_e2e::scratch;

/// A writer process, killed when dropped (a failed assertion leaves none behind).
struct Writer(Option<Child>);

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn writer(dir: &std::path::Path, id: usize) -> Writer {
    let child = Command::new(env!("CARGO_BIN_EXE_filelog-writer"))
        .args([dir.to_str().unwrap(), "control", &format!("w{id}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start filelog-writer");
    Writer(Some(child))
}

/// Kills a writer with SIGKILL; returns what it acknowledged: offset, key.
fn kill_and_collect(mut writer: Writer) -> Vec<(i64, String)> {
    let mut child = writer.0.take().unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    // It ran until the kill: a writer that failed (a damaged log, say) exits on its own.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "the writer exited by itself: {status:?}");
    out.lines()
        .filter_map(|line| {
            let (offset, key) = line.split_once(' ')?;
            Some((offset.parse().ok()?, key.to_owned()))
        })
        .collect()
}

#[test]
fn appenders_killed_hundreds_of_times_lose_no_acknowledged_record_and_leave_a_readable_log() {
    let dir = scratch("filebus-kills");
    let mut next_id = 0;
    let mut writers: Vec<Writer> = (0..3)
        .map(|_| {
            next_id += 1;
            writer(&dir, next_id)
        })
        .collect();
    let mut acked: BTreeMap<i64, String> = BTreeMap::new();
    let collect = |acked: &mut BTreeMap<i64, String>, killed: Writer| {
        for (offset, key) in kill_and_collect(killed) {
            assert!(acked.insert(offset, key.clone()).is_none(), "offset {offset} acknowledged twice");
        }
    };
    let kills = 300;
    for round in 0..kills {
        std::thread::sleep(Duration::from_millis(2 + (round * 7919 % 13) as u64));
        let victim = round % writers.len();
        next_id += 1;
        let killed = std::mem::replace(&mut writers[victim], writer(&dir, next_id));
        collect(&mut acked, killed);
    }
    for killed in writers.drain(..) {
        collect(&mut acked, killed);
    }
    // An appender cuts a torn tail the last kill may have left; then the log reads whole.
    let mut log = TopicLog::open(&dir, "control").unwrap();
    let last = log.append(&[(b"last", Some(b"end"))], 0).unwrap()[0];
    let mut cursor = Cursor::open(log.dir()).unwrap();
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        let batch = cursor.read_new().unwrap();
        if batch.is_empty() {
            break;
        }
        frames.extend(batch);
    }
    assert_eq!(frames.len() as i64, last + 1, "every offset up to the last append is read");
    for (index, frame) in frames.iter().enumerate() {
        assert_eq!(frame.offset, index as i64, "offsets are dense");
    }
    for (offset, key) in &acked {
        let frame = &frames[*offset as usize];
        assert_eq!(String::from_utf8_lossy(&frame.key), *key, "acknowledged record at offset {offset}");
    }
    assert!(acked.len() >= kills, "the writers got on: {} acknowledged", acked.len());
    eprintln!("{kills} kills, {} acknowledged records, {} in the log", acked.len(), frames.len());
}

/// A FUSE mount of a scratch directory (bindfs), unmounted when dropped.
struct FuseMount(std::path::PathBuf);

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount").arg("-u").arg(&self.0).status();
    }
}

#[test]
fn the_file_bus_is_refused_on_a_fuse_file_system_with_exit_2_saying_why() {
    // A network file system cannot be mounted here; FUSE, refused for the same reason (sshfs,
    // GlusterFS and s3fs are FUSE), can: bindfs over a local directory.
    let source = scratch("fuse-source");
    let mount = scratch("fuse-mount");
    let status = Command::new("bindfs")
        .arg(&source)
        .arg(&mount)
        .status()
        .expect("bindfs is missing: scripts/test installs it (apt-get install bindfs)");
    assert!(status.success(), "bindfs failed: {status:?}");
    let _mounted = FuseMount(mount.clone());
    let bus = format!("file://{}/bus", mount.display());
    let workspace = scratch("fuse-node");
    let runs = [
        Command::new(shiva_e2e::bin("shiva-node"))
            .args(["--bus", &bus, "--node-id", "n1", "--workspace"])
            .arg(&workspace)
            .output()
            .unwrap(),
        Command::new(shiva_e2e::bin("shiva-ctl")).args(["--bus", &bus, "list"]).output().unwrap(),
    ];
    for output in runs {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("is on FUSE") && stderr.contains("Kafka"), "{stderr}");
    }
    assert!(!mount.join("bus").exists() && !source.join("bus").exists(), "nothing written there");
    // The same directory, not through FUSE, is accepted.
    let output = Command::new(shiva_e2e::bin("shiva-ctl"))
        .args(["--bus", &format!("file://{}/bus", source.display()), "list"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "a bus without a cluster yet: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
