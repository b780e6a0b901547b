//! What a run starts: program, arguments, environment, working directory, log file, user and
//! resource limits. The run shim (see [`super::shim`]) starts it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// Program.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// File receiving stdout and stderr (appended; the node opens it as the shim's stderr).
    pub output: PathBuf,
    /// Run as this user (resolved by the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<RunUser>,
    /// Resource limits by name (`nofile`, `core`…), soft and hard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<(String, u64)>,
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunUser {
    /// Name (for its supplementary groups).
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
}

impl RunUser {
    /// Looks `user` (a name or a uid) up. The node must run as root to start tasks as another
    /// user.
    pub fn resolve(user: &str) -> Result<RunUser, String> {
        use nix::unistd::{Uid, User};
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        };
        let found = found
            .map_err(|err| format!("user: cannot look up '{user}': {err}"))?
            .ok_or_else(|| format!("user: no user '{user}' on this node"))?;
        let me = nix::unistd::geteuid();
        if !me.is_root() && found.uid != me {
            return Err(format!(
                "user: the node runs as uid {me}, not root, so it cannot start tasks as '{user}'"
            ));
        }
        Ok(RunUser { name: found.name, uid: found.uid.as_raw(), gid: found.gid.as_raw() })
    }
}
