//! Node flags (with `SHIVA_*` environment equivalents), the configuration file that gives
//! them values (a flag or a variable given overrides it), and their validation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser};
use shiva_bus::BusConfig;
use shiva_proto::NodeId;
use uuid::Uuid;

/// Runs a Shiva node: heartbeats, elects a leader, places and supervises tasks.
#[derive(Debug, Parser)]
#[command(name = "shiva-node", version, about)]
pub struct NodeArgs {
    /// A TOML file of flags, one key per flag without its dashes (`heartbeat-interval = "200ms"`,
    /// `tags = ["a", "b"]`, `kafka = ["security.protocol=SSL"]` for -X); a flag or a `SHIVA_*`
    /// variable given overrides it. Default: /etc/shiva/node.toml when it exists.
    #[arg(long, env = "SHIVA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Checks the flags, the variables and the configuration file as a start would, then exits:
    /// 0 when the node would accept them, 2 and what it would refuse otherwise.
    #[arg(long)]
    pub check_config: bool,
    /// The bus: kafka://HOST:PORT[,HOST:PORT], or file:///DIR (one host, no Kafka).
    #[arg(long, env = "SHIVA_BUS", default_value = "kafka://127.0.0.1:9092")]
    pub bus: String,
    /// Cluster name; topics are shiva.<cluster>.*.
    #[arg(long, env = "SHIVA_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// This node's id (default: the host name).
    #[arg(long, env = "SHIVA_NODE_ID")]
    pub node_id: Option<String>,
    /// Tags this node carries, comma separated (its host name is always one).
    #[arg(long, env = "SHIVA_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Workspace directory: task working directories and output files.
    #[arg(long, env = "SHIVA_WORKSPACE")]
    pub workspace: Option<PathBuf>,
    /// Never become leader.
    #[arg(long, env = "SHIVA_NO_LEADER")]
    pub no_leader: bool,
    /// Never run tasks.
    #[arg(long, env = "SHIVA_NO_RUNNER")]
    pub no_runner: bool,
    /// librdkafka setting (TLS, SASL…), repeatable: -X security.protocol=SSL; on the file bus,
    /// its settings: segment.bytes, clean.interval.ms, delete.retention.ms.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub kafka: Vec<String>,
    /// How often the node heartbeats.
    #[arg(long, env = "SHIVA_HEARTBEAT_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// A leader silent this long (in this node's own heartbeats) is replaced.
    #[arg(long, env = "SHIVA_LEADER_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub leader_timeout: Duration,
    /// A node silent this long (in the leader's own heartbeats) is gone; its tasks move.
    #[arg(long, env = "SHIVA_NODE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub node_timeout: Duration,
    /// A node that has not read back one of its own heartbeats sent within this long is cut off:
    /// it stops its exclusive tasks (on_disconnect: stop) until it reads itself again.
    #[arg(long, env = "SHIVA_FENCE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub fence_timeout: Duration,
    /// Task output shipped to the logs topic per task and second (bytes; e.g. 1MiB); more
    /// waits on the node's disk.
    #[arg(long, env = "SHIVA_LOG_RATE", default_value = "1MiB")]
    pub log_rate: String,
    /// Retention of the logs topic when this node creates it.
    #[arg(long, env = "SHIVA_LOG_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub log_retention: Duration,
    /// How long the broker may hold a fetch with no new record (latency vs idle load).
    #[arg(long, env = "SHIVA_FETCH_WAIT", default_value = "12ms", value_parser = humantime::parse_duration)]
    pub fetch_wait: Duration,
    /// Accept only commands signed by a key of this file (OpenSSH authorized_keys format;
    /// `shiva-tasks="PREFIX,…"` restricts a key to task ids under those prefixes). Without it
    /// the cluster is open: anyone who can write to its commands topic commands it.
    #[arg(long, env = "SHIVA_AUTHORIZED_KEYS", value_name = "FILE")]
    pub authorized_keys: Option<PathBuf>,
    /// Tasks that name no `user` run as this user (the node must run as root). Without it they
    /// run as the node's user.
    #[arg(long, env = "SHIVA_TASK_USER", value_name = "NAME")]
    pub task_user: Option<String>,
    /// Lets tasks run as root when they ask for it (`user: root`, or `--task-user root`).
    /// Without it, such a task fails to start, saying why. (A node running as root without
    /// --task-user runs tasks that name no user as root, and warns at start.)
    #[arg(long, env = "SHIVA_ALLOW_ROOT_TASKS")]
    pub allow_root_tasks: bool,
    /// The HTTP API, `/metrics` and the dashboard: ADDRESS:PORT (port 0: any free port), or
    /// `off`. The bound address is written to <workspace>/http.addr.
    #[arg(long, env = "SHIVA_HTTP", value_name = "ADDR|off", default_value = "127.0.0.1:7878")]
    pub http: String,
    /// Bearer tokens of the HTTP API, one `SCOPE NAME TOKEN` per line (SCOPE: read or write).
    /// With it every API request needs a token; without it reads are open and writes refused.
    #[arg(long, env = "SHIVA_API_TOKENS", value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    /// The node's own log on stderr: `text`, or `json` (one object per line, for log shippers).
    #[arg(long, env = "SHIVA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Tests only: panic whenever this node plans (`plan:TASK`) or runs (`run:TASK`) a task, to
    /// prove that an internal error fails that task and not the node.
    #[arg(long, env = "SHIVA_FAULT_PANIC", hide = true)]
    pub fault_panic: Option<String>,
}

/// Where the node reads its configuration file when neither `--config` nor `SHIVA_CONFIG`
/// names one (only if it exists).
pub const DEFAULT_CONFIG: &str = "/etc/shiva/node.toml";

/// The node's flags from `argv`, the environment and the configuration file (`--config`,
/// `SHIVA_CONFIG`, or `default_file` if it exists), in that order of precedence. An error names
/// the file and the key, or the flag.
pub fn args_from(argv: &[std::ffi::OsString], default_file: &std::path::Path) -> Result<NodeArgs, ArgsError> {
    let mut command = NodeArgs::command();
    // `--help` and `--version` answer whatever the file says.
    let asks =
        |word: &std::ffi::OsString| ["--help", "-h", "--version", "-V"].iter().any(|flag| word == *flag);
    if argv.iter().skip(1).take_while(|word| *word != "--").any(asks) {
        let matches = command.try_get_matches_from(argv).map_err(ArgsError::Flags)?;
        return NodeArgs::from_arg_matches(&matches).map_err(ArgsError::Flags);
    }
    let file = config_named(argv)
        .or_else(|| std::env::var_os("SHIVA_CONFIG").map(PathBuf::from))
        .or_else(|| default_file.is_file().then(|| default_file.to_path_buf()));
    if let Some(file) = &file {
        let text = std::fs::read_to_string(file).map_err(|err| {
            ArgsError::Config(format!("cannot read the configuration file {}: {err}", file.display()))
        })?;
        command = with_file_defaults(command, &text)
            .map_err(|why| ArgsError::Config(format!("configuration file {}: {why}", file.display())))?;
    }
    let matches = command.try_get_matches_from(argv).map_err(ArgsError::Flags)?;
    NodeArgs::from_arg_matches(&matches).map_err(ArgsError::Flags)
}

/// Checks `argv` as a node started with it would (flags, variables, the configuration file, the
/// ranges): the identity it would have, or what it would refuse.
pub fn check(argv: &[std::ffi::OsString]) -> Result<Identity, String> {
    match args_from(argv, std::path::Path::new(DEFAULT_CONFIG)) {
        Ok(args) => {
            NodeConfig::from_args(args).map(|config| Identity::of(&config)).map_err(|err| format!("{err:#}"))
        }
        Err(ArgsError::Config(why)) => Err(why),
        Err(ArgsError::Flags(err)) => Err(clap_message(&err)),
    }
}

/// What makes a node process the same node as another: a reload that changes it is refused
/// (the next process would not take the runs back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The node's id.
    pub node_id: String,
    /// Its cluster.
    pub cluster: String,
    /// Its workspace.
    pub workspace: PathBuf,
}

impl Identity {
    /// `config`'s.
    pub fn of(config: &NodeConfig) -> Identity {
        Identity {
            node_id: config.node_id.to_string(),
            cluster: config.bus.topics.cluster().to_owned(),
            workspace: config.workspace.clone(),
        }
    }

    /// As `--check-config` prints it, one `key: value` line each.
    pub fn lines(&self) -> String {
        format!(
            "node-id: {}\ncluster: {}\nworkspace: {}\n",
            self.node_id,
            self.cluster,
            self.workspace.display()
        )
    }

    /// Read back from [`Identity::lines`] in `text`.
    pub fn parse(text: &str) -> Option<Identity> {
        let value = |key: &str| text.lines().find_map(|line| line.strip_prefix(key)).map(str::to_owned);
        Some(Identity {
            node_id: value("node-id: ")?,
            cluster: value("cluster: ")?,
            workspace: PathBuf::from(value("workspace: ")?),
        })
    }

    /// Why a process of `next` is not the same node as this one, if it is not.
    pub fn differs(&self, next: &Identity) -> Option<String> {
        let changed =
            |what: &str, from: &str, to: &str| format!("its {what} would change from {from} to {to}");
        if self.node_id != next.node_id {
            return Some(changed("node id", &self.node_id, &next.node_id));
        }
        if self.cluster != next.cluster {
            return Some(changed("cluster", &self.cluster, &next.cluster));
        }
        if self.workspace != next.workspace {
            let (from, to) = (self.workspace.display().to_string(), next.workspace.display().to_string());
            return Some(changed("workspace", &from, &to));
        }
        None
    }
}

/// Why the node's flags were refused.
#[derive(Debug)]
pub enum ArgsError {
    /// A flag (clap's own error: printed as clap prints it, `--help` and `--version` too).
    Flags(clap::Error),
    /// The configuration file.
    Config(String),
}

/// The file named by `--config FILE` or `--config=FILE` in `argv`, if any.
fn config_named(argv: &[std::ffi::OsString]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut words = argv.iter().skip(1);
    while let Some(word) = words.next() {
        let bytes = word.as_bytes();
        if bytes == b"--" {
            return None;
        }
        if bytes == b"--config" {
            return words.next().map(PathBuf::from);
        }
        if let Some(file) = bytes.strip_prefix(b"--config=") {
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(file)));
        }
    }
    None
}

/// `command` with the values of the TOML `text` as its flags' defaults, each checked as the
/// flag would be. Keys are flags without their dashes (`_` may stand for `-`; `kafka` for
/// -X).
fn with_file_defaults(mut command: clap::Command, text: &str) -> Result<clap::Command, String> {
    let table: toml::Table =
        text.parse().map_err(|err: toml::de::Error| err.to_string().trim().to_owned())?;
    let mut seen = std::collections::BTreeMap::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        if let Some(first) = seen.insert(name.clone(), key.clone()) {
            return Err(format!("keys '{first}' and '{key}' are the same flag"));
        }
        let usable = |arg: &&clap::Arg| {
            !matches!(arg.get_id().as_str(), "config" | "check_config" | "help" | "version")
                && !arg.is_hide_set()
        };
        let found = command
            .get_arguments()
            .filter(usable)
            .find(|arg| arg.get_long() == Some(name.as_str()) || arg.get_id().as_str() == name)
            .cloned();
        let Some(arg) = found else {
            let keys: Vec<&str> = command
                .get_arguments()
                .filter(usable)
                .map(|arg| arg.get_long().unwrap_or(arg.get_id().as_str()))
                .collect();
            return Err(format!("unknown key '{key}' (the keys are the node's flags: {})", keys.join(", ")));
        };
        let many = arg.get_num_args().is_some_and(|range| range.max_values() > 1)
            || matches!(arg.get_action(), clap::ArgAction::Append);
        let mut values: Vec<String> = match value {
            toml::Value::Array(items) if many => items.into_iter().map(scalar).collect::<Result<_, _>>(),
            toml::Value::Array(_) => Err("one value expected, not a list".to_owned()),
            other => scalar(other).map(|value| vec![value]),
        }
        .map_err(|why| format!("key '{key}': {why}"))?;
        if let Some(delimiter) = arg.get_value_delimiter() {
            values = values.iter().flat_map(|value| value.split(delimiter)).map(str::to_owned).collect();
        }
        // Checked as the flag would be, alone (no variable, no other flag): an error names the
        // key and the flag.
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(long), _) => format!("--{long}="),
            (None, Some(short)) => format!("-{short}"),
            (None, None) => format!("--{name}="),
        };
        let trial = clap::Command::new("shiva-node")
            .no_binary_name(true)
            .arg(arg.clone().env(None).required(false).default_values(Vec::<String>::new()));
        for value in &values {
            // Joined to its flag (`--flag=value`, `-Xvalue`): a value may start with `-`.
            let joined = format!("{flag}{value}");
            let words: Vec<&str> = match (arg.get_action().takes_values(), value.as_str()) {
                (true, _) => vec![&joined],
                (false, "true") => vec![flag.trim_end_matches('=')],
                (false, "false") => Vec::new(),
                (false, other) => return Err(format!("key '{key}': true or false expected, not '{other}'")),
            };
            trial
                .clone()
                .try_get_matches_from(words)
                .map_err(|err| format!("key '{key}': {}", clap_message(&err)))?;
        }
        let id = arg.get_id().clone();
        command = command.mut_arg(id, |arg| arg.default_values(values));
    }
    Ok(command)
}

/// A TOML scalar as the text a flag takes.
fn scalar(value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        other => Err(format!("a string, number or boolean expected, not {}", other.type_str())),
    }
}

/// Clap's error up to its usage lines, without its `error: ` prefix.
fn clap_message(err: &clap::Error) -> String {
    let text = err.to_string();
    let message: Vec<&str> = text.lines().take_while(|line| !line.starts_with("Usage:")).collect();
    let message = message.join(" ");
    let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
    message.strip_prefix("error: ").unwrap_or(&message).to_owned()
}

/// The node's own log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The bus.
    pub bus: BusConfig,
    /// This node.
    pub node_id: NodeId,
    /// Drawn at start: tells this run of the node from earlier ones.
    pub incarnation: Uuid,
    /// The host name (a tag).
    pub hostname: String,
    /// Tags given with `--tags`.
    pub tags: Vec<String>,
    /// Workspace directory.
    pub workspace: PathBuf,
    /// May lead.
    pub leader_capable: bool,
    /// Runs tasks.
    pub runner: bool,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Leader silence threshold.
    pub leader_timeout: Duration,
    /// Node silence threshold.
    pub node_timeout: Duration,
    /// Lease length: past it, exclusive runs stop.
    pub fence_timeout: Duration,
    /// Output bytes shipped per task and second.
    pub log_rate: u64,
    /// Retention of the logs topic.
    pub log_retention: Duration,
    /// `PATH` given to tasks that set none.
    pub task_path: String,
    /// `--authorized-keys`: the file's text and the policy it makes (a signed cluster).
    pub authorized_keys: Option<(String, std::sync::Arc<shiva_proto::auth::Policy>)>,
    /// `--task-user`.
    pub task_user: Option<String>,
    /// `--allow-root-tasks`.
    pub allow_root_tasks: bool,
    /// `--http`: where the HTTP API listens (`None`: off).
    pub http: Option<std::net::SocketAddr>,
    /// `--api-tokens`.
    pub api_tokens: Option<std::sync::Arc<crate::api::Tokens>>,
}

impl NodeConfig {
    /// Validates flags. Every error names its flag.
    pub fn from_args(args: NodeArgs) -> anyhow::Result<NodeConfig> {
        let mut bus = BusConfig::new(&args.bus, &args.cluster, &args.kafka)?;
        bus.fetch_wait = args.fetch_wait;
        let hostname = nix::unistd::gethostname()
            .context("failed to read the host name")?
            .to_string_lossy()
            .into_owned();
        let node_id = match args.node_id {
            Some(id) => NodeId::new(id).context("--node-id")?,
            None => NodeId::new(hostname.clone()).with_context(|| {
                format!("the host name '{hostname}' is not a valid node id: pass --node-id")
            })?,
        };
        for tag in &args.tags {
            if tag.is_empty() || tag.contains(char::is_whitespace) {
                bail!("--tags: '{tag}' is not a tag (non-empty, no spaces)");
            }
            if tag.len() > 255 {
                bail!("--tags: a tag of {} bytes is above the limit of 255", tag.len());
            }
        }
        if args.tags.len() > 64 {
            bail!("--tags: {} tags, above the limit of 64", args.tags.len());
        }
        if args.heartbeat_interval < Duration::from_millis(10)
            || args.heartbeat_interval > Duration::from_secs(10)
        {
            bail!("--heartbeat-interval {}: must be from 10ms to 10s", show(args.heartbeat_interval));
        }
        if args.leader_timeout > Duration::from_secs(600) {
            bail!("--leader-timeout {}: must be at most 10m", show(args.leader_timeout));
        }
        if args.node_timeout > Duration::from_secs(3600) {
            bail!("--node-timeout {}: must be at most 1h", show(args.node_timeout));
        }
        if args.leader_timeout < args.heartbeat_interval * 3 {
            bail!(
                "--leader-timeout {}: must be at least 3 heartbeat intervals ({})",
                show(args.leader_timeout),
                show(args.heartbeat_interval * 3)
            );
        }
        if args.node_timeout < args.leader_timeout {
            bail!(
                "--node-timeout {}: must not be shorter than --leader-timeout ({})",
                show(args.node_timeout),
                show(args.leader_timeout)
            );
        }
        if args.fence_timeout < args.heartbeat_interval * 3 {
            bail!(
                "--fence-timeout {}: must be at least 3 heartbeat intervals ({})",
                show(args.fence_timeout),
                show(args.heartbeat_interval * 3)
            );
        }
        if args.fence_timeout > Duration::from_secs(3600) {
            bail!("--fence-timeout {}: must be at most 1h", show(args.fence_timeout));
        }
        let log_rate = shiva_proto::spec::parse_bytes(&args.log_rate)
            .map_err(|err| anyhow::anyhow!("--log-rate: {err}"))?;
        if log_rate < 1024 {
            bail!("--log-rate {log_rate} bytes: must be at least 1KiB");
        }
        if log_rate > 1 << 30 {
            bail!("--log-rate {log_rate} bytes: must be at most 1GiB");
        }
        if args.log_retention < Duration::from_secs(60)
            || args.log_retention > Duration::from_secs(3650 * 86_400)
        {
            bail!("--log-retention {}: must be from 1m to 3650d", show(args.log_retention));
        }
        if args.fetch_wait > Duration::from_secs(1) {
            bail!("--fetch-wait {}: must be at most 1s", show(args.fetch_wait));
        }
        crate::fault::install(args.fault_panic.as_deref())
            .map_err(|err| anyhow::anyhow!("--fault-panic {err}"))?;
        bus.delivery_timeout = args.leader_timeout.max(Duration::from_secs(2));
        let workspace = match args.workspace {
            Some(dir) => dir,
            None => default_workspace(&args.cluster, &node_id),
        };
        let authorized_keys = match &args.authorized_keys {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|err| anyhow::anyhow!("--authorized-keys {}: {err}", path.display()))?;
                let policy = shiva_proto::auth::Policy::parse(&args.cluster, &text)
                    .map_err(|err| anyhow::anyhow!("--authorized-keys {}: {err}", path.display()))?;
                Some((text, std::sync::Arc::new(policy)))
            }
        };
        if let Some(user) = &args.task_user {
            shiva_proto::spec::check_user(user)
                .map_err(|err| anyhow::anyhow!("--task-user {user}: {err}"))?;
        }
        let http = match args.http.as_str() {
            "off" => None,
            text => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "--http '{text}': expected ADDRESS:PORT (e.g. 127.0.0.1:7878, [::]:7878) or off"
                )
            })?),
        };
        let api_tokens = match &args.api_tokens {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|err| anyhow::anyhow!("--api-tokens {}: {err}", path.display()))?;
                let tokens = crate::api::Tokens::parse(&text)
                    .map_err(|err| anyhow::anyhow!("--api-tokens {}: {err}", path.display()))?;
                use std::os::unix::fs::PermissionsExt;
                if std::fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o077 != 0) {
                    tracing::warn!(
                        file = %path.display(),
                        "--api-tokens: the file is readable by others than its owner (chmod 600 it)"
                    );
                }
                Some(std::sync::Arc::new(tokens))
            }
        };
        Ok(NodeConfig {
            http,
            api_tokens,
            authorized_keys,
            task_user: args.task_user,
            allow_root_tasks: args.allow_root_tasks,
            bus,
            node_id,
            incarnation: Uuid::new_v4(),
            hostname,
            tags: args.tags,
            workspace,
            leader_capable: !args.no_leader,
            runner: !args.no_runner,
            heartbeat_interval: args.heartbeat_interval,
            leader_timeout: args.leader_timeout,
            node_timeout: args.node_timeout,
            fence_timeout: args.fence_timeout,
            log_rate,
            log_retention: args.log_retention,
            task_path: std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
            }),
        })
    }
}

fn default_workspace(cluster: &str, node: &NodeId) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("shiva").join(cluster).join(node.as_str())
}

fn show(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<NodeConfig> {
        NodeConfig::from_args(NodeArgs::try_parse_from(
            std::iter::once("shiva-node").chain(args.iter().copied()),
        )?)
    }

    /// The flags given by a configuration file holding `toml`, then `args`.
    fn from_file(toml: &str, args: &[&str]) -> Result<NodeArgs, String> {
        let file = std::env::temp_dir().join(format!(
            "shiva-config-{}-{}.toml",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&file, toml).unwrap();
        let argv: Vec<std::ffi::OsString> = ["shiva-node", "--config", file.to_str().unwrap()]
            .into_iter()
            .chain(args.iter().copied())
            .map(Into::into)
            .collect();
        let parsed = args_from(&argv, std::path::Path::new("/nonexistent/node.toml"));
        let _ = std::fs::remove_file(&file);
        parsed.map_err(|err| match err {
            ArgsError::Flags(err) => err.to_string(),
            ArgsError::Config(why) => why,
        })
    }

    #[test]
    fn the_configuration_file_gives_the_flags_values_that_flags_given_override() {
        let toml = r#"
            bus = "file:///var/lib/shiva/bus"
            node_id = "a"
            heartbeat-interval = "300ms"
            tags = ["x", "y"]
            kafka = ["segment.bytes=1000000"]
            no-leader = true
            log-rate = 2048
        "#;
        let args = from_file(toml, &[]).unwrap();
        assert_eq!(args.bus, "file:///var/lib/shiva/bus");
        assert_eq!(args.node_id.as_deref(), Some("a"));
        assert_eq!(args.heartbeat_interval, Duration::from_millis(300));
        assert_eq!(args.tags, ["x", "y"]);
        assert_eq!(args.kafka, ["segment.bytes=1000000"]);
        assert!(args.no_leader && !args.no_runner);
        assert_eq!(args.log_rate, "2048");
        let config = NodeConfig::from_args(args).unwrap();
        assert!(!config.leader_capable);
        // A flag given wins; a comma-separated string is a list too.
        let args =
            from_file("heartbeat-interval = \"300ms\"\ntags = \"x,y\"", &["--heartbeat-interval", "1s"])
                .unwrap();
        assert_eq!(args.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(args.tags, ["x", "y"]);
        let args = from_file("tags = [\"x\"]", &["--tags", "z"]).unwrap();
        assert_eq!(args.tags, ["z"]);
        // A value may start with a dash.
        let args = from_file("task-user = \"-odd\"", &[]).unwrap();
        assert_eq!(args.task_user.as_deref(), Some("-odd"));
        // No file at the default place: the defaults.
        let argv: Vec<std::ffi::OsString> = vec!["shiva-node".into()];
        let args = args_from(&argv, std::path::Path::new("/nonexistent/node.toml")).ok().unwrap();
        assert_eq!(args.heartbeat_interval, Duration::from_millis(200));
    }

    #[test]
    fn a_bad_configuration_file_is_refused_naming_the_file_and_the_key() {
        let err = |toml: &str| from_file(toml, &[]).unwrap_err();
        let unknown = err("heartbeat = \"1s\"");
        assert!(
            unknown.contains("configuration file") && unknown.contains("unknown key 'heartbeat'"),
            "{unknown}"
        );
        assert!(unknown.contains("heartbeat-interval"), "the keys are listed: {unknown}");
        let value = err("heartbeat-interval = \"soon\"");
        assert!(value.contains("key 'heartbeat-interval'") && value.contains("soon"), "{value}");
        assert!(err("cluster = [\"a\", \"b\"]").contains("key 'cluster': one value expected"));
        assert!(err("bus = { host = \"a\" }").contains("key 'bus': a string, number or boolean expected"));
        assert!(err("no-runner = \"maybe\"").contains("key 'no-runner': true or false expected"));
        assert!(err("log-format = \"xml\"").contains("key 'log-format'"));
        assert!(
            err("fault-panic = \"run:x\"").contains("unknown key 'fault-panic'"),
            "hidden flags are not keys"
        );
        assert!(err("config = \"/etc/other.toml\"").contains("unknown key 'config'"));
        assert!(err("check-config = true").contains("unknown key 'check-config'"));
        assert!(err("node_id = \"a\"\nnode-id = \"b\"").contains("are the same flag"));
        assert!(err("bus = ").contains("configuration file"), "a TOML error names the file");
        let missing = args_from(
            &["shiva-node".into(), "--config=/nonexistent/shiva.toml".into()],
            std::path::Path::new("/nonexistent/node.toml"),
        );
        assert!(
            matches!(missing, Err(ArgsError::Config(why)) if why.contains("cannot read the configuration file /nonexistent/shiva.toml"))
        );
        // A value in range for the flag but not for the node: the flag's own check names it.
        let args = from_file("node-id = \"a\"\nheartbeat-interval = \"1h\"", &[]).unwrap();
        let range = format!("{:#}", NodeConfig::from_args(args).unwrap_err());
        assert!(range.contains("--heartbeat-interval"), "{range}");
    }

    #[test]
    fn a_reload_checks_the_configuration_its_next_process_would_read() {
        let file = std::env::temp_dir().join(format!("shiva-check-{}.toml", std::process::id()));
        let argv: Vec<std::ffi::OsString> =
            vec!["shiva-node".into(), "--config".into(), file.clone().into(), "--node-id".into(), "a".into()];
        std::fs::write(&file, "heartbeat-interval = \"300ms\"\n").unwrap();
        let identity = check(&argv).unwrap();
        assert_eq!(Identity::parse(&identity.lines()), Some(identity.clone()));
        // Another cluster in the file: the same node no more.
        std::fs::write(&file, "cluster = \"other\"\n").unwrap();
        let why = identity.differs(&check(&argv).unwrap()).unwrap();
        assert!(why.contains("cluster would change from default to other"), "{why}");
        // Edited into a value out of range, or a key the node does not know: the reload is
        // refused, saying why.
        std::fs::write(&file, "heartbeat-interval = \"1h\"\n").unwrap();
        assert!(check(&argv).unwrap_err().contains("--heartbeat-interval 1h"));
        std::fs::write(&file, "heartbeat = \"1s\"\n").unwrap();
        assert!(check(&argv).unwrap_err().contains("unknown key 'heartbeat'"));
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn defaults_are_consistent() {
        let config = parse(&["--node-id", "a"]).unwrap();
        assert_eq!(config.leader_timeout, config.heartbeat_interval * 5);
        assert_eq!(config.node_timeout, config.heartbeat_interval * 15);
        assert!(config.leader_capable && config.runner);
    }

    #[test]
    fn errors_name_the_flag() {
        let err = |args: &[&str]| format!("{:#}", parse(args).unwrap_err());
        assert!(err(&["--node-id", "a/b"]).contains("--node-id"));
        assert!(err(&["--node-id", "a", "--leader-timeout", "100ms"]).contains("--leader-timeout"));
        assert!(err(&["--node-id", "a", "--node-timeout", "500ms"]).contains("--node-timeout"));
        assert!(err(&["--node-id", "a", "--fence-timeout", "100ms"]).contains("--fence-timeout"));
        assert!(err(&["--node-id", "a", "--log-rate", "lots"]).contains("--log-rate"));
        assert!(err(&["--node-id", "a", "--bus", "localhost:9092"]).contains("--bus"));
        assert!(err(&["--node-id", "a", "--cluster", "a.b"]).contains("--cluster"));
        // Upper bounds: a huge value is refused before any arithmetic on it.
        let huge = err(&["--node-id", "a", "--heartbeat-interval", "100000000y"]);
        assert!(huge.contains("--heartbeat-interval 100000000years: must be from 10ms to 10s"), "{huge}");
        assert!(err(&["--node-id", "a", "--node-timeout", "2h"]).contains("at most 1h"));
        assert!(err(&["--node-id", "a", "--leader-timeout", "11m"]).contains("at most 10m"));
        assert!(err(&["--node-id", "a", "--log-retention", "100000d"]).contains("1m to 3650d"));
        assert!(err(&["--node-id", "a", "--log-rate", "2GiB"]).contains("at most 1GiB"));
        assert!(err(&["--node-id", "a", "--fetch-wait", "2s"]).contains("--fetch-wait 2s"));
        assert!(err(&["--node-id", "a", "-X", "oops"]).contains("-X"));
        assert!(err(&["--node-id", "a", "--http", "7878"]).contains("--http '7878'"));
        assert!(
            err(&["--node-id", "a", "--api-tokens", "/nonexistent"]).contains("--api-tokens /nonexistent")
        );
        assert_eq!(parse(&["--node-id", "a", "--http", "off"]).unwrap().http, None);
    }

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        NodeArgs::command().debug_assert();
    }
}
