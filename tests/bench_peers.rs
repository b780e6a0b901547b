//! The peers a user would pick on one machine for periodic jobs, measured at the load of the
//! cron bench (issue 21, point 4): systemd timers with `AccuracySec=1us` and Debian's `cron`
//! (minute slots), each in a Debian 12 host with systemd as PID 1, booted by `systemd-nspawn`
//! from the root file system `scripts/rootfs` builds once (as the deployment test boots them).
//! Every job runs the very command Shiva's bench tasks run, `bash -c 'echo $EPOCHREALTIME … >>
//! file'` (bash's clock, no fork), into a directory of this machine bound into the host: the
//! container shares this machine's kernel and so its clock.
//!
//! A peer's job is not told its slot: a stamp's slot is the whole second (systemd) or minute
//! (cron) it falls in, which is right while the lateness stays under a slot; a run later than
//! that would count as its next slot's, and show as a slot missed and one run twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a peer did over its window.
pub struct Peer {
    /// Lateness of each run in the window (ms from its slot to the command's start).
    pub lateness: Vec<f64>,
    /// Runs expected in the window.
    pub expected: usize,
    /// Slots of the window that no run stamped.
    pub missing: usize,
    /// Runs beyond the first of a slot.
    pub twice: usize,
}

/// The root file system (`scripts/rootfs` builds it into the cache once; a failure stops the
/// bench, naming it).
pub fn rootfs() -> PathBuf {
    let output = Command::new(shiva_e2e::repo().join("scripts/rootfs"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/rootfs runs");
    assert!(output.status.success(), "scripts/rootfs failed: the peers need its Debian 12 root file system");
    let text = String::from_utf8(output.stdout).unwrap();
    PathBuf::from(text.lines().last().expect("scripts/rootfs prints its directory").trim())
}

/// A Debian host booted with systemd as PID 1, powered off when dropped.
struct Host(Child);

impl Host {
    /// Boots `rootfs` (read-only, a writable layer in memory) with `out` bound at `/peers` and
    /// each `(file or directory, path inside)` of `binds` bound read-only.
    fn boot(rootfs: &Path, name: &str, out: &Path, binds: &[(PathBuf, &str)]) -> Host {
        let console = std::fs::File::create(out.join(format!("{name}.console"))).unwrap();
        let mut command = Command::new("systemd-nspawn");
        command
            .args(["--boot", "--register=no", "--keep-unit", "--volatile=overlay", "--quiet"])
            .arg(format!("--directory={}", rootfs.display()))
            .arg(format!("--machine={name}"))
            .arg(format!("--hostname={name}"))
            .arg(format!("--bind={}:/peers", out.display()));
        for (from, to) in binds {
            command.arg(format!("--bind-ro={}:{to}", from.display()));
        }
        let child =
            command.stdin(Stdio::null()).stdout(console.try_clone().unwrap()).stderr(console).spawn().expect(
                "systemd-nspawn (Debian's systemd-container) is needed: apt-get install -y systemd-container",
            );
        Host(child)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        shiva_e2e::power_off(&mut self.0);
    }
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Waits until `file` has a line (the peer runs), at most `limit`.
fn first_run(file: &Path, console: &Path, limit: Duration) {
    let until = now_s() + limit.as_secs_f64();
    while now_s() < until {
        if std::fs::read_to_string(file).is_ok_and(|text| text.lines().next().is_some()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = std::fs::read_to_string(console).unwrap_or_default();
    let tail: Vec<&str> = console.lines().rev().take(30).collect();
    panic!("no run within {limit:?} in {}; the host's console ends:\n{}", file.display(), tail.join("\n"));
}

/// The runs of `file` (`<stamp> <job>` lines) whose slot (`slot_s` long) lies in `[from, to)`.
fn judge(file: &Path, slot_s: u64, from: u64, to: u64, count: usize) -> Peer {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lateness = Vec::new();
    let mut seen = BTreeSet::new();
    let mut twice = 0;
    for line in text.lines() {
        let Some((stamp, job)) = line.split_once(' ') else { continue };
        let Ok(stamp) = stamp.parse::<f64>() else { continue };
        let slot = (stamp as u64) / slot_s * slot_s;
        if (from..to).contains(&slot) {
            lateness.push((stamp - slot as f64) * 1000.0);
            if !seen.insert((slot, job.to_owned())) {
                twice += 1;
            }
        }
    }
    let expected = count * usize::try_from((to - from) / slot_s).unwrap();
    Peer { missing: expected - seen.len(), expected, lateness, twice }
}

/// `count` systemd timers firing every second (`OnCalendar=*-*-* *:*:*`, `AccuracySec=1us`),
/// each starting a oneshot service, measured over `window`.
pub fn systemd_timers(rootfs: &Path, dir: &Path, count: usize, window: Duration) -> Peer {
    let units = dir.join("units");
    let wants = units.join("timers.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    for i in 0..count {
        let name = format!("peer{i:03}");
        // A service started every second would hit systemd's default start limit (5 in 10 s):
        // lifted, as a user running a job every second must.
        std::fs::write(
            units.join(format!("{name}.service")),
            format!(
                "[Unit]\nDescription=bench peer {name}\nStartLimitIntervalSec=0\n\n[Service]\nType=oneshot\n\
                 ExecStart=/bin/bash -c 'echo $$EPOCHREALTIME {name} >> /peers/systemd'\n"
            ),
        )
        .unwrap();
        std::fs::write(
            units.join(format!("{name}.timer")),
            "[Timer]\nOnCalendar=*-*-* *:*:*\nAccuracySec=1us\n\n[Install]\nWantedBy=timers.target\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(format!("../{name}.timer"), wants.join(format!("{name}.timer"))).unwrap();
    }
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let host = Host::boot(rootfs, "peers-systemd", &out, &[(units, "/usr/local/lib/systemd/system")]);
    let file = out.join("systemd");
    first_run(&file, &out.join("peers-systemd.console"), Duration::from_secs(60));
    // Every timer fires a few times before the window.
    std::thread::sleep(Duration::from_secs(5));
    let from = now_s() as u64 + 1;
    let to = from + window.as_secs();
    std::thread::sleep(Duration::from_secs_f64(to as f64 + 3.0 - now_s()));
    drop(host);
    judge(&file, 1, from, to, count)
}

/// `count` jobs of Debian's cron (`* * * * *` in `/etc/cron.d`), measured over `minutes` whole
/// minutes.
pub fn debian_cron(rootfs: &Path, dir: &Path, count: usize, minutes: u64) -> Peer {
    let crontab = dir.join("crontab");
    let lines: String = (0..count)
        .map(|i| format!("* * * * * root /bin/bash -c 'echo $EPOCHREALTIME peer{i:03} >> /peers/cron'\n"))
        .collect();
    std::fs::write(&crontab, lines).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let host = Host::boot(rootfs, "peers-cron", &out, &[(crontab, "/etc/cron.d/peers")]);
    let file = out.join("cron");
    first_run(&file, &out.join("peers-cron.console"), Duration::from_secs(150));
    let from = (now_s() as u64 / 60 + 1) * 60;
    let to = from + 60 * minutes;
    std::thread::sleep(Duration::from_secs_f64(to as f64 + 5.0 - now_s()));
    drop(host);
    judge(&file, 60, from, to, count)
}
