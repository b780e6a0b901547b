//! Command-line definition.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit codes, shown in `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  the operation failed (e.g. no such task)
  2  invalid input or usage
  3  cluster unreachable, or its topics do not exist yet";

/// Drives a Shiva cluster through its bus (Kafka, or the file bus of one host).
#[derive(Debug, Parser)]
#[command(name = "shiva-ctl", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// The bus: kafka://HOST:PORT[,HOST:PORT], or file:///DIR (one host, no Kafka).
    #[arg(long, global = true, env = "SHIVA_BUS", default_value = "kafka://127.0.0.1:9092")]
    pub bus: String,
    /// Cluster name.
    #[arg(long, global = true, env = "SHIVA_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// librdkafka setting (TLS, SASL…), repeatable (on the file bus: segment.bytes).
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE")]
    pub kafka: Vec<String>,
    /// Sign every command with this SSH key (ed25519): a private key file, or a public key
    /// (.pub) whose private half the ssh-agent at SSH_AUTH_SOCK holds.
    #[arg(long, global = true, env = "SHIVA_SIGN_KEY", value_name = "FILE")]
    pub sign_key: Option<std::path::PathBuf>,
    /// How long to wait for the bus (100ms to 1h).
    #[arg(long, global = true, default_value = "10s", value_parser = timeout)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Define a task (from a JSON spec file, or from flags and a command line) and start it.
    Submit(Box<SubmitArgs>),
    /// Make the cluster's tasks match spec files (YAML, TOML or JSON; several tasks per file):
    /// new tasks are submitted, changed ones get their new spec (their desired state stays),
    /// equal ones are left alone; with --prune, tasks under PREFIX no file names are deleted.
    Apply {
        #[command(flatten)]
        files: FilesArgs,
        /// Show the changes without writing them.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show what `apply` would change, field by field.
    Diff {
        #[command(flatten)]
        files: FilesArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print the specs of the tasks under PREFIX (all without it) as files `apply` takes back
    /// with no change.
    Export {
        /// Task id prefix (`a/b` covers `a/b` and `a/b/...`).
        prefix: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "yaml")]
        format: crate::apply::Format,
    },
    /// List tasks.
    List(JsonArg),
    /// Who did what and when: every command the log still holds (a compacted log keeps the
    /// newest per key), its signer and whether the nodes accept it.
    Audit {
        /// Only this task's commands.
        id: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Secrets, encrypted to the cluster's nodes: set, list, delete.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Show one task.
    Status {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List nodes, as the leader sees them.
    Nodes(JsonArg),
    /// Place no new task on a node; what runs there stays.
    Cordon {
        /// Node id.
        node: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Place tasks on a cordoned or drained node again (moves nothing back: see `rebalance`).
    Uncordon {
        /// Node id.
        node: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Move a node's services away, one copy at a time (the new copy starts once the old one
    /// is gone), and place nothing new there; runs in flight finish there. Waits until nothing
    /// runs there.
    Drain {
        /// Node id.
        node: String,
        /// Stop at this deadline (e.g. 10m; 0s to 30d) the tasks no other node can take;
        /// without it they stay until another node can.
        #[arg(long, value_parser = drain_deadline)]
        deadline: Option<Duration>,
        /// Return once the drain is recorded, without waiting.
        #[arg(long)]
        detach: bool,
        /// How long to wait for the node to be drained (1s to 24h).
        #[arg(long, default_value = "10m", value_parser = drain_wait)]
        wait: Duration,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Even out services over the live, open runner nodes (after nodes joined), by moving them
    /// through the hand-off (each new copy starts once the old one is gone), at most N at once.
    Rebalance {
        /// Show the moves without making them.
        #[arg(long)]
        dry_run: bool,
        /// At most this many services moving at once (1 to 1000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
        max_moves: u16,
        /// How long a batch of moves may take before the rebalance gives up (1s to 1h).
        #[arg(long, default_value = "2m", value_parser = timeout)]
        wait: Duration,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Stop a task everywhere, keeping its definition.
    Kill {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Start a stopped task again.
    Start {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Stop a task and delete its definition.
    Delete {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Run a periodic task now (a run of its own, under the task's overlap policy).
    Run {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Launch no new runs of a periodic or one-shot task; a current run continues.
    Suspend {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Launch runs of a suspended task again (slots missed meanwhile are not caught up).
    Resume {
        /// Task id.
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print a task's output (stdout and stderr, in the order the node read them), from the
    /// logs topic: works from any machine and after the node that ran it is gone.
    Logs {
        /// Task id.
        id: String,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this run (its id, or a prefix of it, as `history` or `status` show it).
        #[arg(long)]
        run: Option<String>,
        /// Only output from the last D (e.g. 10m; at most 3650d).
        #[arg(long, value_parser = since)]
        since: Option<Duration>,
        /// Only the last N lines (1 to 100000), read from the topic's end, not all of it.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        tail: Option<u32>,
        /// One JSON object per line (offset, at_ms, run, stream, node, line; invalid UTF-8
        /// replaced) instead of the bytes as written.
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `shiva-ctl completions bash > /etc/bash_completion.d/shiva-ctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (shiva-ctl.1 and one per subcommand) into DIR, or print shiva-ctl.1.
    Man {
        /// Where to write them (created if missing).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show the runs of a periodic or one-shot task, newest first.
    History {
        /// Task id.
        id: String,
        /// At most this many runs (1 to 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        #[command(flatten)]
        json: JsonArg,
    },
}

/// A duration within `[min, max]`; the error names the value and the range (clap adds the flag).
fn bounded(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let value = humantime::parse_duration(text.trim()).map_err(|err| format!("{err} (expected e.g. 10s)"))?;
    if value < min || value > max {
        return Err(format!(
            "{text} is out of range: from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(value)
}

fn timeout(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_millis(100), Duration::from_secs(3600))
}

fn drain_deadline(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::ZERO, Duration::from_secs(30 * 86_400))
}

fn drain_wait(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_secs(1), Duration::from_secs(86_400))
}

fn since(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::ZERO, Duration::from_secs(3650 * 86_400))
}

/// `secret` subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set NAME to the value on stdin (one trailing newline is dropped; at most 64 KiB),
    /// encrypted to every live node. Specs use it by name: `"secrets": {"env": {"VAR": "NAME"}}`
    /// or `{"files": {"path": "NAME"}}`.
    Set {
        /// Its name (like a task id; `a/b/name` serves only the tasks under `a/b/`).
        name: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List secrets: names, revisions and how many nodes can open them (never values).
    List(JsonArg),
    /// Delete a secret (runs that use it fail to start afterwards).
    Delete {
        /// Its name.
        name: String,
        #[command(flatten)]
        json: JsonArg,
    },
}

/// The spec files of `apply` and `diff`.
#[derive(Debug, Args)]
pub struct FilesArgs {
    /// A spec file, or a directory of them (.yaml, .yml, .toml, .json; read recursively);
    /// repeatable.
    #[arg(short = 'f', long = "file", required = true, value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
    /// Also delete the defined tasks under this id prefix that no file names.
    #[arg(long, value_name = "PREFIX")]
    pub prune: Option<String>,
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `submit` arguments.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// JSON task spec (see docs/protocol.md); `-` reads stdin.
    #[arg(conflicts_with_all = ["id", "tags", "env", "stop_grace", "workdir", "command", "schedule", "once", "count", "every_node"])]
    pub file: Option<PathBuf>,
    /// Task id (1 to 4 segments separated by '/').
    #[arg(long)]
    pub id: Option<String>,
    /// Tags a node must carry, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Environment variable, repeatable: --env K=V.
    #[arg(long, value_name = "K=V")]
    pub env: Vec<String>,
    /// Time between SIGTERM and SIGKILL when stopping (e.g. 10s).
    #[arg(long, allow_hyphen_values = true)]
    pub stop_grace: Option<String>,
    /// Working directory (absolute).
    #[arg(long)]
    pub workdir: Option<String>,
    /// Cron expression (5 fields, 6 with seconds, Quartz, or @hourly…), repeatable: the task
    /// becomes periodic. With 7 fields or a `?` it is read the Quartz way (weekdays 1 = Sunday
    /// to 7 = Saturday), else the POSIX way (0 or 7 = Sunday, 1 = Monday).
    #[arg(long)]
    pub schedule: Vec<String>,
    /// IANA time zone of the schedule (default UTC).
    #[arg(long, requires = "schedule")]
    pub timezone: Option<String>,
    /// Missed slots: none, latest or all.
    #[arg(long, requires = "schedule")]
    pub catch_up: Option<String>,
    /// A run due while the previous one runs: allow, forbid, replace or queue.
    #[arg(long, requires = "schedule")]
    pub overlap: Option<String>,
    /// Run to completion once, retried per policy.
    #[arg(long, conflicts_with = "schedule")]
    pub once: bool,
    /// Services: run N instances (ID@0 … ID@N-1, 1 to 1000), each on a node of its own, with
    /// SHIVA_INSTANCE set.
    #[arg(long, value_name = "N", conflicts_with_all = ["schedule", "once"])]
    pub count: Option<u32>,
    /// Services: run one instance (ID@NODE) on every node that carries the tags.
    #[arg(long, conflicts_with_all = ["schedule", "once", "count"])]
    pub every_node: bool,
    /// Check the spec and show it (a schedule in words, with its next slots in the task's
    /// zone) without writing anything; needs no cluster.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub json: JsonArg,
    /// Command and arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_submit_forms() {
        let cli =
            Cli::try_parse_from(["shiva-ctl", "submit", "--id", "a/b", "--tags", "x,y", "--", "sleep", "10"])
                .unwrap();
        let Command::Submit(args) = cli.command else { panic!() };
        assert_eq!(args.id.as_deref(), Some("a/b"));
        assert_eq!(args.tags, ["x", "y"]);
        assert_eq!(args.command, ["sleep", "10"]);
        let cli = Cli::try_parse_from(["shiva-ctl", "--cluster", "c", "submit", "spec.json"]).unwrap();
        assert_eq!(cli.cluster, "c");
        assert!(Cli::try_parse_from(["shiva-ctl", "submit", "spec.json", "--id", "x"]).is_err());
    }

    #[test]
    fn flags_outside_their_range_are_refused_naming_value_and_range() {
        let refused = |args: &[&str]| Cli::try_parse_from(args).unwrap_err().to_string();
        let message = refused(&["shiva-ctl", "--timeout", "1000000y", "list"]);
        assert!(
            message.contains("--timeout") && message.contains("1000000y is out of range: from 100ms to 1h"),
            "{message}"
        );
        assert!(refused(&["shiva-ctl", "--timeout", "1ms", "list"]).contains("out of range"));
        assert!(refused(&["shiva-ctl", "logs", "a", "--since", "100000d"]).contains("out of range"));
        assert!(refused(&["shiva-ctl", "history", "a", "--limit", "0"]).contains("--limit"));
        assert!(refused(&["shiva-ctl", "history", "a", "--limit", "1001"]).contains("--limit"));
        assert!(
            Cli::try_parse_from(["shiva-ctl", "--timeout", "1h", "history", "a", "--limit", "1000"]).is_ok()
        );
    }
}
