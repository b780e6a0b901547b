//! The file bus's crash safety (issue 16, point 3), with real processes: appenders killed with
//! SIGKILL hundreds of times, mid-write among them, lose no acknowledged record and leave a
//! log every reader reads whole, with dense offsets.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shiva_bus::filelog::{Cursor, TopicLog};
use shiva_e2e::scratch;

fn writer(dir: &std::path::Path, id: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_filelog-writer"))
        .args([dir.to_str().unwrap(), "control", &format!("w{id}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start filelog-writer")
}

/// What a killed writer acknowledged: offset → key.
fn acknowledged(mut child: Child) -> Vec<(i64, String)> {
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.wait().unwrap();
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
    let mut writers: Vec<Child> = (0..3)
        .map(|_| {
            next_id += 1;
            writer(&dir, next_id)
        })
        .collect();
    let mut acked: BTreeMap<i64, String> = BTreeMap::new();
    let kills = 300;
    for kill in 0..kills {
        std::thread::sleep(Duration::from_millis(2 + (kill * 7919 % 13) as u64));
        let victim = kill % writers.len();
        next_id += 1;
        let child = std::mem::replace(&mut writers[victim], writer(&dir, next_id));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        for (offset, key) in acknowledged(child) {
            assert!(acked.insert(offset, key.clone()).is_none(), "offset {offset} acknowledged twice");
        }
    }
    for child in writers.drain(..) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        acked.extend(acknowledged(child));
    }
    // An appender cuts a torn tail the last kill may have left; then the log reads whole.
    let mut log = TopicLog::open(&dir, "control").unwrap();
    let last = log.append(&[(b"last", Some(b"end"))], 0).unwrap()[0];
    let frames = Cursor::open(log.path()).unwrap().read_new().unwrap();
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
