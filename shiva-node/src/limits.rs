//! Memory and CPU limits of runs, through cgroups where the node may use them: the cgroup v2
//! `memory` and `cpu` controllers when the unified hierarchy offers them, else the v1 `memory`
//! and `cpu` hierarchies. A spec asking for a limit the node cannot enforce is refused at start,
//! with a message that says so: a limit is never silently dropped.
//!
//! The node creates each run's limit cgroups and writes the limits before starting the shim;
//! the shim enters them (with the tracking cgroup, see [`crate::tree::Isolation`]) before it
//! forks the task, and removes them when the run is over.

use std::fs;
use std::path::{Path, PathBuf};

/// Where one controller's run cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Controller {
    /// cgroup v1: `<hierarchy>/shiva-<node>/<run>`.
    V1(PathBuf),
    /// cgroup v2: the run's tracking cgroup itself.
    V2,
    /// systemd sets it on the run's scope (a property of `systemd-run`); `true`: cgroup v2.
    Systemd(bool),
}

/// The controllers this node may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controllers {
    memory: Option<Controller>,
    cpu: Option<Controller>,
    /// The v2 node cgroup, when v2 controllers are used.
    v2: Option<PathBuf>,
}

/// A run's limits, ready for the shim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Cgroups (besides the tracking one) the shim enters before forking the task.
    pub cgroups: Vec<PathBuf>,
    /// Properties of the run's systemd scope (`MemoryMax=…`), under systemd.
    pub properties: Vec<String>,
}

impl Controllers {
    /// Finds the controllers; `v2_node` is the node's v2 tracking cgroup, if it uses one.
    pub fn detect(node: &str, v2_node: Option<&Path>) -> Controllers {
        let mut found = Controllers::default();
        if let Some(dir) = v2_node
            && let Some(root) = dir.parent()
        {
            let offered = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            for (name, slot) in [("memory", &mut found.memory), ("cpu", &mut found.cpu)] {
                let enabled = offered.split_whitespace().any(|c| c == name)
                    && fs::write(root.join("cgroup.subtree_control"), format!("+{name}")).is_ok()
                    && fs::write(dir.join("cgroup.subtree_control"), format!("+{name}")).is_ok();
                if enabled {
                    *slot = Some(Controller::V2);
                    found.v2 = Some(dir.to_path_buf());
                }
            }
        }
        let v1 = |hierarchy: &str, probe: &str| {
            let root = Path::new("/sys/fs/cgroup").join(hierarchy);
            let dir = root.join(format!("shiva-{node}"));
            (root.join(probe).exists() && fs::create_dir_all(&dir).is_ok() && dir.join(probe).exists())
                .then_some(Controller::V1(dir))
        };
        if found.memory.is_none() {
            found.memory = v1("memory", "memory.limit_in_bytes");
        }
        if found.cpu.is_none() {
            found.cpu = v1("cpu", "cpu.cfs_quota_us");
        }
        found
    }

    /// Under systemd: the limits become properties of each run's scope, where the hierarchy
    /// systemd uses offers the controller (cgroup v2 when `unified`, else v1's hierarchies).
    pub fn systemd(unified: bool) -> Controllers {
        // Offered and writable by systemd (a container may see a hierarchy read-only: systemd
        // then takes the property and enforces nothing).
        let writable = |path: &Path| nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok();
        let offered = |name: &str, v1_probe: &str| {
            if unified {
                fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|c| c == name)
                    && writable(Path::new("/sys/fs/cgroup/cgroup.subtree_control"))
            } else {
                let hierarchy = Path::new("/sys/fs/cgroup").join(name);
                hierarchy.join(v1_probe).exists() && writable(&hierarchy)
            }
        };
        let controller = |available: bool| available.then_some(Controller::Systemd(unified));
        Controllers {
            memory: controller(offered("memory", "memory.limit_in_bytes")),
            cpu: controller(offered("cpu", "cpu.cfs_quota_us")),
            v2: None,
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        let name = |controller: &Option<Controller>| match controller {
            Some(Controller::V1(_)) => "cgroup v1",
            Some(Controller::V2) => "cgroup v2",
            Some(Controller::Systemd(true)) => "the run's systemd scope, cgroup v2",
            Some(Controller::Systemd(false)) => "the run's systemd scope, cgroup v1",
            None => "unavailable",
        };
        format!("memory: {}, cpu: {}", name(&self.memory), name(&self.cpu))
    }

    /// Creates the cgroups of run `run` and writes its limits. `tracking` is the run's v2
    /// tracking cgroup, if any. An error names the spec field that cannot be honoured.
    pub fn prepare(
        &self,
        run: &str,
        tracking: Option<&Path>,
        memory_max: Option<u64>,
        cpu_max: Option<f64>,
    ) -> Result<Prepared, String> {
        let mut prepared = Prepared::default();
        if let Some(bytes) = memory_max
            && let Some(Controller::Systemd(unified)) = self.memory
        {
            if unified {
                prepared.properties.push(format!("MemoryMax={bytes}"));
                // No swapping around the limit.
                prepared.properties.push("MemorySwapMax=0".to_owned());
            } else {
                prepared.properties.push(format!("MemoryLimit={bytes}"));
            }
        } else if let Some(bytes) = memory_max {
            let dir = self.run_dir(&self.memory, run, tracking, "memory_max")?;
            let (file, value) = match &self.memory {
                Some(Controller::V2) => ("memory.max", bytes.to_string()),
                _ => ("memory.limit_in_bytes", bytes.to_string()),
            };
            write(&dir, file, &value, "memory_max")?;
            if matches!(self.memory, Some(Controller::V2)) {
                // No swapping around the limit.
                let _ = fs::write(dir.join("memory.swap.max"), "0");
            } else {
                prepared.cgroups.push(dir);
            }
        }
        if let Some(cores) = cpu_max
            && matches!(self.cpu, Some(Controller::Systemd(_)))
        {
            // systemd's percent of one core, to a hundredth (the spec's 0.0001 core).
            prepared.properties.push(format!("CPUQuota={:.2}%", (cores * 100.0).max(0.01)));
        } else if let Some(cores) = cpu_max {
            let dir = self.run_dir(&self.cpu, run, tracking, "cpu_max")?;
            let period = 100_000u64;
            let quota = ((cores * period as f64).round() as u64).max(1000);
            if matches!(self.cpu, Some(Controller::V2)) {
                write(&dir, "cpu.max", &format!("{quota} {period}"), "cpu_max")?;
            } else {
                write(&dir, "cpu.cfs_period_us", &period.to_string(), "cpu_max")?;
                write(&dir, "cpu.cfs_quota_us", &quota.to_string(), "cpu_max")?;
                prepared.cgroups.push(dir);
            }
        }
        Ok(prepared)
    }

    fn run_dir(
        &self,
        controller: &Option<Controller>,
        run: &str,
        tracking: Option<&Path>,
        field: &str,
    ) -> Result<PathBuf, String> {
        let dir = match (controller, tracking) {
            (Some(Controller::V1(node)), _) => node.join(run),
            (Some(Controller::V2), Some(tracking)) => tracking.to_path_buf(),
            _ => {
                return Err(format!(
                    "{field} needs a cgroup controller this node cannot use ({}); \
                     run the task without it or on a node with cgroups",
                    self.describe()
                ));
            }
        };
        fs::create_dir_all(&dir)
            .map_err(|err| format!("{field}: cannot create the cgroup {}: {err}", dir.display()))?;
        Ok(dir)
    }
}

fn write(dir: &Path, file: &str, value: &str, field: &str) -> Result<(), String> {
    fs::write(dir.join(file), value)
        .map_err(|err| format!("{field}: cannot write {value} to {}: {err}", dir.join(file).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_systemd_the_limits_are_the_run_scopes_properties() {
        let v2 = Controllers {
            memory: Some(Controller::Systemd(true)),
            cpu: Some(Controller::Systemd(true)),
            v2: None,
        };
        let prepared = v2.prepare("r", None, Some(64 << 20), Some(0.5)).unwrap();
        assert_eq!(prepared.properties, ["MemoryMax=67108864", "MemorySwapMax=0", "CPUQuota=50.00%"]);
        assert!(prepared.cgroups.is_empty(), "nothing for the shim to enter: systemd set the scope up");
        let v1 = Controllers {
            memory: Some(Controller::Systemd(false)),
            cpu: Some(Controller::Systemd(false)),
            v2: None,
        };
        let prepared = v1.prepare("r", None, Some(1 << 20), Some(0.015)).unwrap();
        assert_eq!(prepared.properties, ["MemoryLimit=1048576", "CPUQuota=1.50%"]);
        let no_cpu = Controllers { memory: Some(Controller::Systemd(true)), cpu: None, v2: None };
        assert!(
            no_cpu
                .prepare("r", None, None, Some(1.0))
                .unwrap_err()
                .starts_with("cpu_max needs a cgroup controller")
        );
        let scopes = crate::tree::SystemdScopes {
            systemd_run: "/usr/bin/systemd-run".into(),
            slice: "/sys/fs/cgroup/shiva.slice".into(),
            unified: true,
            node_unit: Some("shiva-node.service".to_owned()),
        };
        let command = scopes.command("ab.01", &["CPUQuota=50%".to_owned()]);
        assert_eq!(
            command,
            [
                "/usr/bin/systemd-run",
                "--scope",
                "--quiet",
                "--collect",
                "--unit=shiva-run-ab.01.scope",
                "--slice=shiva.slice",
                "--property=Delegate=yes",
                "--property=TasksMax=infinity",
                "--property=Before=shiva-node.service",
                "--property=CPUQuota=50%",
                "--"
            ]
            .map(std::ffi::OsString::from)
        );
        let isolation = crate::tree::Isolation::Systemd(scopes);
        assert_eq!(
            isolation.run_cgroup("ab.01").unwrap(),
            std::path::Path::new("/sys/fs/cgroup/shiva.slice/shiva-run-ab.01.scope/task")
        );
    }

    #[test]
    fn a_limit_without_a_controller_is_refused_naming_the_field() {
        let none = Controllers::default();
        assert_eq!(none.prepare("r", None, None, None), Ok(Prepared::default()));
        let err = none.prepare("r", None, Some(64 << 20), None).unwrap_err();
        assert!(err.starts_with("memory_max needs a cgroup controller"), "{err}");
        let err = none.prepare("r", None, None, Some(0.5)).unwrap_err();
        assert!(err.starts_with("cpu_max"), "{err}");
    }
}
