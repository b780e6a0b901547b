//! Process trees and cgroups: finding every descendant of a process, killing a tree, telling a
//! live process from one whose pid was reused, and the cgroup a run may be put in.
//!
//! Used by the run shim (see [`crate::shim`]) and by the node when it cleans up after a shim
//! that died or a previous incarnation's leftovers.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The kernel's start time of `pid` (clock ticks since boot), `None` when it does not exist.
/// A pid with the same start time is the same process: pids are reused, start times are not.
pub fn start_time(pid: u32) -> Option<u64> {
    // Field 22 (starttime).
    stat_field(pid, 22)
}

/// Field `number` (from 1, as in proc(5)) of `/proc/<pid>/stat`, numeric fields only.
fn stat_field(pid: u32, number: usize) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: field 3 follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(number.checked_sub(3)?)?.parse().ok()
}

/// Parent of every process now alive.
fn parents() -> BTreeMap<u32, u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return BTreeMap::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        // Field 4 (ppid).
        .filter_map(|pid| Some((pid, u32::try_from(stat_field(pid, 4)?).ok()?)))
        .collect()
}

/// The children of `parent`.
pub fn children(parent: u32) -> BTreeSet<u32> {
    match listed_children(parent) {
        Some(children) => children,
        None => parents().into_iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| pid).collect(),
    }
}

/// Whether the kernel lists each thread's children (`/proc/<pid>/task/<tid>/children`,
/// `CONFIG_PROC_CHILDREN`): a tree is then walked from its root, not found by reading every
/// process's `stat` (milliseconds on a busy host, paid by every stop).
fn kernel_lists_children() -> bool {
    static LISTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LISTS.get_or_init(|| {
        let me = std::process::id();
        Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
    })
}

/// The children of `pid` as the kernel lists them (every thread's), `None` where it does not;
/// empty once `pid` is gone.
fn listed_children(pid: u32) -> Option<BTreeSet<u32>> {
    if !kernel_lists_children() {
        return None;
    }
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Some(BTreeSet::new()) };
    let mut children = BTreeSet::new();
    for task in tasks.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("children")) else { continue };
        children.extend(text.split_whitespace().filter_map(|word| word.parse::<u32>().ok()));
    }
    Some(children)
}

/// Every descendant of `root` (not `root` itself).
pub fn descendants(root: u32) -> BTreeSet<u32> {
    if kernel_lists_children() {
        let mut found = BTreeSet::new();
        let mut todo = vec![root];
        while let Some(pid) = todo.pop() {
            for child in listed_children(pid).unwrap_or_default() {
                if found.insert(child) {
                    todo.push(child);
                }
            }
        }
        return found;
    }
    scanned_descendants(root)
}

/// Every descendant of `root`, found by reading every process's parent.
fn scanned_descendants(root: u32) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let parents = parents();
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (pid, ppid) in &parents {
        children.entry(*ppid).or_default().push(*pid);
    }
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if found.insert(*child) {
                todo.push(*child);
            }
        }
    }
    found
}

/// Sends `signal` to every descendant of `root`, to the process group `group` and to every
/// process of `cgroup`. Returns how many processes were signalled by pid.
pub fn signal_tree(root: u32, group: Option<u32>, cgroup: Option<&Path>, signal: Signal) -> usize {
    if let Some(group) = group {
        let _ = nix::sys::signal::killpg(Pid::from_raw(group as i32), signal);
    }
    let mut pids = descendants(root);
    if let Some(cgroup) = cgroup {
        pids.extend(cgroup_procs(cgroup));
    }
    pids.remove(&std::process::id());
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid as i32), signal);
    }
    pids.len()
}

/// The processes in a cgroup (v1 or v2).
pub fn cgroup_procs(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|line| line.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// How runs are kept together on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// A cgroup v2 directory per run under this one.
    CgroupV2(PathBuf),
    /// A cgroup v1 directory per run (in the `pids` hierarchy) under this one.
    CgroupV1(PathBuf),
    /// Only a process group per run, and the shim as subreaper.
    ProcessGroup,
    /// Under systemd: each run is a transient scope unit of its own, `shiva-run-<launch>.scope`
    /// in `shiva.slice`, started by `systemd-run --scope` around its shim, with the spec's limits
    /// as the scope's properties and delegation on, so that the shim may keep its task in the
    /// scope's `task/` sub-cgroup. A scope is a unit apart from the node's: it outlives a node
    /// that crashed or re-executes, and it goes (collected) when its run's processes are gone.
    Systemd(SystemdScopes),
}

/// How runs become systemd scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdScopes {
    /// `systemd-run`.
    pub systemd_run: PathBuf,
    /// The `shiva.slice` cgroup in the hierarchy systemd tracks processes with.
    pub slice: PathBuf,
    /// Whether that hierarchy is cgroup v2 with the memory and cpu controllers (else v1's).
    pub unified: bool,
    /// The node's own unit, which the runs' scopes stop after.
    pub node_unit: Option<String>,
}

impl SystemdScopes {
    /// The scope unit of a launch.
    pub fn unit(launch: &str) -> String {
        format!("shiva-run-{launch}.scope")
    }

    /// `systemd-run` and its arguments, up to the program it then executes in place.
    pub fn command(&self, launch: &str, properties: &[String]) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            self.systemd_run.clone().into(),
            "--scope".into(),
            "--quiet".into(),
            "--collect".into(),
            format!("--unit={}", SystemdScopes::unit(launch)).into(),
            "--slice=shiva.slice".into(),
            "--property=Delegate=yes".into(),
            // Limits are the spec's alone: not systemd's default cap on a unit's tasks.
            "--property=TasksMax=infinity".into(),
        ];
        if let Some(unit) = &self.node_unit {
            // At shutdown the node stops first, stopping each run with its signal and grace.
            args.push(format!("--property=Before={unit}").into());
        }
        args.extend(properties.iter().map(|property| format!("--property={property}").into()));
        args.push("--".into());
        args
    }

    /// Finds systemd as this machine's service manager, able to start scopes for this process:
    /// root, `/run/systemd/system`, `systemd-run`, and a probe scope that lands where this node
    /// will look for its runs' scopes (systemd's cgroup root is the mount's: not so in a
    /// container that reaches the host's systemd). `Ok(None)`: no systemd here; `Err`: systemd
    /// here but unusable, and why. Blocks up to about 3 s (the probe): call it off the runtime.
    pub fn detect() -> Result<Option<SystemdScopes>, String> {
        if !Path::new("/run/systemd/system").is_dir() || !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        match std::env::var("SHIVA_CGROUPS").as_deref() {
            Ok("direct") => return Ok(None),
            Ok("systemd") | Ok("") | Err(_) => {}
            Ok(other) => return Err(format!("SHIVA_CGROUPS={other}: expected systemd or direct")),
        }
        let systemd_run = ["/usr/bin/systemd-run", "/bin/systemd-run"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("systemd-run was not found")?;
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (root, line) = if unified {
            ("/sys/fs/cgroup", "0::")
        } else if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
            ("/sys/fs/cgroup/unified", "0::")
        } else {
            ("/sys/fs/cgroup/systemd", ":name=systemd:")
        };
        // The node's own unit: runs' scopes stop after it at shutdown (it stops them first,
        // each with its stop signal and grace).
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let node_unit = own
            .lines()
            .find(|l| l.contains(line))
            .and_then(|l| l.rsplit('/').next())
            .filter(|unit| unit.ends_with(".service"))
            .map(str::to_owned);
        let scopes =
            SystemdScopes { systemd_run, slice: Path::new(root).join("shiva.slice"), unified, node_unit };
        // A node re-executing itself (a reload) probed already: its runs' leases wait on this.
        if std::env::var_os(PROBED_ENV).is_some_and(|value| value == "1") {
            SCOPES_PROBED.store(true, std::sync::atomic::Ordering::SeqCst);
            return Ok(Some(scopes));
        }
        let probe = format!("probe-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let mut command = scopes.command(&probe, &[]);
        command.extend(["/bin/cat".into(), "/proc/self/cgroup".into()]);
        let mut child = std::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|err| format!("cannot run systemd-run: {err}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while child.try_wait().map_err(|err| err.to_string())?.is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("systemd-run did not answer within 3 s".to_owned());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let output = child.wait_with_output().map_err(|err| err.to_string())?;
        if !output.status.success() {
            return Err(format!(
                "systemd-run --scope failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let expected = format!("/shiva.slice/{}", SystemdScopes::unit(&probe));
        let found = String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|l| l.contains(line))
            .and_then(|l| l.split_once(line).map(|(_, path)| path.to_owned()))
            .unwrap_or_default();
        if found != expected {
            return Err(format!(
                "a probe scope landed in the cgroup '{found}', not '{expected}' under {root} (systemd's cgroup root is not this mount's)"
            ));
        }
        SCOPES_PROBED.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(scopes))
    }
}

/// Set in the environment of a node re-executing itself whose probe succeeded: the next
/// process does not probe again (a reload's start stays quick: the runs' leases wait on it).
pub const PROBED_ENV: &str = "SHIVA_SCOPES_PROBED";

/// Whether this process found systemd scopes usable.
pub static SCOPES_PROBED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Isolation {
    /// What this machine offers to `node`: a writable cgroup v2 hierarchy, else a v1 `pids` (or
    /// `freezer`) hierarchy, else process groups. Creates the node's cgroup directory.
    pub fn detect(node: &str) -> Isolation {
        match SystemdScopes::detect() {
            Ok(Some(scopes)) => return Isolation::Systemd(scopes),
            Ok(None) => {}
            Err(why) => tracing::warn!(
                reason = %why,
                "systemd runs this machine, but runs cannot be scopes of their own: they get cgroups the node makes"
            ),
        }
        let name = format!("shiva-{node}");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|root| root.join("cgroup.procs").exists() && root.join("cgroup.subtree_control").exists());
        if let Some(root) = v2 {
            let dir = root.join(&name);
            if fs::create_dir_all(&dir).is_ok() && dir.join("cgroup.procs").exists() {
                return Isolation::CgroupV2(dir);
            }
        }
        for controller in ["pids", "freezer"] {
            let root = Path::new("/sys/fs/cgroup").join(controller);
            if root.join("cgroup.procs").exists() {
                let dir = root.join(&name);
                if fs::create_dir_all(&dir).is_ok() && dir.join("cgroup.procs").exists() {
                    return Isolation::CgroupV1(dir);
                }
            }
        }
        Isolation::ProcessGroup
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Isolation::CgroupV2(dir) => format!("cgroup v2 ({})", dir.display()),
            Isolation::CgroupV1(dir) => format!("cgroup v1 ({})", dir.display()),
            Isolation::ProcessGroup => "process group + subreaper (no writable cgroup)".to_owned(),
            Isolation::Systemd(scopes) => format!("a systemd scope per run ({})", scopes.slice.display()),
        }
    }

    /// The cgroup directory of one run, if cgroups are used.
    pub fn run_cgroup(&self, run: &str) -> Option<PathBuf> {
        match self {
            Isolation::CgroupV2(dir) | Isolation::CgroupV1(dir) => Some(dir.join(run)),
            Isolation::ProcessGroup => None,
            // The shim keeps its task in `task/` and itself in the scope's own cgroup.
            Isolation::Systemd(scopes) => Some(scopes.slice.join(SystemdScopes::unit(run)).join("task")),
        }
    }
}

/// Kills everything in a run's cgroup and removes it (a cgroup can only be removed empty).
pub fn clear_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    for _ in 0..50 {
        // cgroup v2 kills the whole cgroup at once where the kernel has cgroup.kill.
        let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        let procs = cgroup_procs(cgroup);
        if procs.is_empty() {
            break;
        }
        for pid in procs {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = fs::remove_dir(cgroup);
}

/// Whether the cgroup v2 mount holding `dir` favours dynamic changes (`favordynmods`), read
/// off `/proc/self/mountinfo`; `None` when `dir` is on no cgroup v2 mount listed there.
///
/// Every run's shim moves itself into the run's cgroup. Without `favordynmods`, such a move
/// takes a global lock whose write side waits for an RCU grace period when no other move
/// happened just before: 8 to 25 ms measured here, on the path of every start and hand-off.
pub fn favours_dynmods(mountinfo: &str, dir: &Path) -> Option<bool> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent major:minor root mount-point options [optional…] - type source super`
            let (left, right) = line.split_once(" - ")?;
            let mount = Path::new(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let options = right.nth(1).unwrap_or("");
            (fstype == "cgroup2" && dir.starts_with(mount))
                .then(|| (mount.as_os_str().len(), options.split(',').any(|option| option == "favordynmods")))
        })
        .max_by_key(|(length, _)| *length)
        .map(|(_, favours)| favours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_of_a_directory_says_whether_it_favours_dynamic_changes() {
        let info = "25 1 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755\n\
                    41 25 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n\
                    42 25 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let dir = Path::new("/sys/fs/cgroup/unified/shiva-n1");
        assert_eq!(favours_dynmods(info, dir), Some(true));
        let plain = info.replace(",favordynmods", "");
        assert_eq!(favours_dynmods(&plain, dir), Some(false));
        assert_eq!(favours_dynmods(info, Path::new("/sys/fs/cgroup/memory/x")), None, "a v1 mount");
        assert_eq!(favours_dynmods("garbage\n - \n", dir), None);
    }

    #[test]
    fn start_time_tells_processes_apart() {
        let me = std::process::id();
        let first = start_time(me).expect("own start time");
        assert_eq!(start_time(me), Some(first));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn descendants_include_grandchildren() {
        let mut child =
            std::process::Command::new("sh").args(["-c", "sleep 5 & sleep 0.5; kill $!"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let found = descendants(std::process::id());
        assert!(found.contains(&child.id()));
        assert!(found.len() >= 2, "the grandchild is found too: {found:?}");
        child.wait().unwrap();
    }

    #[test]
    fn the_walk_from_the_root_finds_what_a_full_scan_finds() {
        use std::os::unix::process::CommandExt;
        assert!(kernel_lists_children(), "this kernel lists children: the walk is what runs here");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "(sleep 5 & sleep 5 & wait) & sleep 5 & sleep 0.6; kill 0"])
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Other tests of this binary spawn too: compare the tree under the child only.
        let walked = descendants(child.id());
        let scanned = scanned_descendants(child.id());
        assert_eq!(walked, scanned);
        assert!(walked.len() >= 4, "subshell, its two sleeps and the sleep: {walked:?}");
        assert_eq!(children(child.id()).len(), 3, "subshell, sleep 5, sleep 0.6");
        child.wait().unwrap();
    }
}
