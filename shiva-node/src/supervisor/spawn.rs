//! What a run starts: program, arguments, environment, working directory and log file. The run
//! shim (see [`super::shim`]) starts it.

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
}
