//! `shiva-ctl`: reads and writes the cluster's bus directly.
//!
//! # Layout
//! * [`cli`]: flags and subcommands;
//! * [`history`]: run history rows and the run-related commands;
//! * this module: the commands and the error → exit code mapping.

pub mod apply;
pub mod cli;
pub mod history;
pub mod logs;
pub mod sign;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shiva_bus::{BusConfig, BusError, Publisher, Reader, ReaderEvent, admin};
use shiva_proto::commands::{self, Command as Commanded};
use shiva_proto::records::Body;
use shiva_proto::records::Mode;
use shiva_proto::spec::DEFAULT_STOP_GRACE;
use shiva_proto::topics::key;
use shiva_proto::{LogView, NodeId, TaskId, TaskSpec, TopicKind};
use tokio::sync::mpsc;

use cli::{Cli, Command, SubmitArgs};
use shiva_proto::rows::{self as show, exit_text, node_rows, task_row};

/// A failure, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Exit 1.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// Exit 2.
    #[error("{0}")]
    Invalid(String),
    /// Exit 3.
    #[error("{0}")]
    Unreachable(String),
}

impl CtlError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Failed(_) => 1,
            CtlError::Invalid(_) => 2,
            CtlError::Unreachable(_) => 3,
        }
    }
}

impl From<BusError> for CtlError {
    fn from(err: BusError) -> Self {
        match err {
            BusError::Invalid(message) => CtlError::Invalid(message),
            err @ BusError::TooLarge { .. } => CtlError::Invalid(err.to_string()),
            err @ (BusError::Unreachable { .. }
            | BusError::Refused { .. }
            | BusError::TopicsMissing { .. }) => CtlError::Unreachable(err.to_string()),
            err => CtlError::Failed(err.into()),
        }
    }
}

impl From<anyhow::Error> for CtlError {
    fn from(err: anyhow::Error) -> Self {
        CtlError::Failed(err)
    }
}

pub(crate) fn invalid(err: impl std::fmt::Display) -> CtlError {
    CtlError::Invalid(err.to_string())
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    // Generated from the flags' definition: no bus needed.
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "shiva-ctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => return man(dir.as_deref()),
        _ => {}
    }
    let config = BusConfig::new(&cli.bus, &cli.cluster, &cli.kafka)?;
    sign::CommandSigner::install(&cli.cluster, cli.sign_key.as_deref())?;
    let timeout = cli.timeout;
    match cli.command {
        Command::Submit(args) => {
            let (dry_run, json) = (args.dry_run, args.json.json);
            let spec = spec_from(args)?;
            if dry_run {
                let schedule = show::schedule_detail(&spec, chrono::Utc::now(), show::NEXT_SLOTS);
                if json {
                    print_json(&serde_json::json!({"dry_run": true, "spec": spec, "schedule": schedule}));
                } else {
                    println!("dry run: {} is valid; nothing was written", spec.id);
                    println!("kind:        {}", spec.kind().as_str());
                    println!("command:     {} {}", spec.command, spec.args.join(" "));
                    println!(
                        "tags:        {}",
                        if spec.tags.is_empty() { "-".into() } else { spec.tags.join(",") }
                    );
                    if let Some(schedule) = &schedule {
                        print_schedule(schedule);
                    }
                }
                return Ok(());
            }
            let view = snapshot(&config, timeout, &TASK_TOPICS).await?;
            let verb = if view.specs.contains_key(&spec.id) { "updated" } else { "submitted" };
            let id = spec.id.clone();
            let revision = commands::next_revision(&view, &id);
            let offsets = execute(&config, &view, &Commanded::Submit(Box::new(spec))).await?;
            if json {
                print_json(
                    &serde_json::json!({"id": id, "result": verb, "revision": revision, "offset": offsets[0].1}),
                );
            } else {
                println!("{verb} {id} (revision {revision})");
            }
        }
        Command::Apply { files, dry_run, json } => {
            let (specs, view, changes) = declared(&config, timeout, &files).await?;
            if !dry_run && changes.iter().any(|change| change.action != "keep") {
                let writes = apply::writes(&view, &specs, &changes)?;
                send_writes(&Publisher::new(&config, "ctl")?, writes).await?;
            }
            if json.json {
                print_json(&serde_json::json!({"dry_run": dry_run, "changes": changes}));
            } else {
                apply::print_changes(&changes);
                if dry_run && !changes.is_empty() {
                    println!("dry run: nothing was written");
                }
            }
        }
        Command::Diff { files, json } => {
            let (_, _, changes) = declared(&config, timeout, &files).await?;
            if json.json {
                print_json(&changes);
            } else {
                apply::print_changes(&changes);
            }
        }
        Command::Export { prefix, format } => {
            if let Some(prefix) = &prefix {
                TaskId::new(prefix.trim_end_matches('/'))
                    .map_err(|err| invalid(format!("prefix '{prefix}': {err}")))?;
            }
            let view = snapshot(&config, timeout, &TASK_TOPICS).await?;
            print!("{}", apply::export(&view, prefix.as_deref(), format)?);
            for task in apply::unexported(&view, prefix.as_deref()) {
                eprintln!(
                    "warning: {task} is not exported: its definition is unreadable to this shiva-ctl (`status {task}`)"
                );
            }
        }
        Command::List(json) => {
            let view = snapshot(&config, timeout, &TASK_TOPICS).await?;
            let rows: Vec<_> =
                show::listed_tasks(&view).iter().filter_map(|task| task_row(&view, task)).collect();
            if json.json {
                print_json(&rows);
            } else {
                println!(
                    "{:<32} {:<8} {:<8} {:<10} {:<16} {:>8}  REASON",
                    "ID", "KIND", "DESIRED", "STATE", "NODE", "PID"
                );
                for row in rows {
                    println!(
                        "{:<32} {:<8} {:<8} {:<10} {:<16} {:>8}  {}",
                        row.id.as_str(),
                        row.kind,
                        row.desired,
                        row.state,
                        row.node.as_ref().map_or("-", |n| n.as_str()),
                        row.pid.map_or("-".into(), |p| p.to_string()),
                        row.reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Status { id, json } => {
            let task = TaskId::new(id).map_err(invalid)?;
            let view = snapshot(&config, timeout, &TASK_TOPICS).await?;
            if json.json {
                print_json(
                    &show::task_detail(&view, &task, chrono::Utc::now())
                        .ok_or_else(|| no_such_task(&task))?,
                );
                return Ok(());
            }
            let refused = view.refusal(&task);
            let Some(row) = task_row(&view, &task) else {
                // Never accepted: only its refusal to show.
                let refusal = refused.ok_or_else(|| no_such_task(&task))?;
                println!("id:          {task}");
                println!("state:       refused");
                println!("refused:     {}", refusal.reason);
                return Ok(());
            };
            if let Some(refusal) = refused {
                println!("refused:     {}", refusal.reason);
            }
            let Some(spec) = view.spec_of(&task).map(|entry| &entry.spec) else {
                // An invalid definition: its row says why.
                println!("id:          {}", row.id);
                println!("state:       {}", row.state);
                println!("reason:      {}", row.reason.as_deref().unwrap_or(""));
                return Ok(());
            };
            println!("id:          {}", row.id);
            if let Some(entry) = view.spec_of(&task) {
                println!("revision:    {} (record at offset {})", entry.spec.revision, entry.revision);
            }
            println!("kind:        {}", row.kind);
            println!("command:     {} {}", spec.command, spec.args.join(" "));
            println!("tags:        {}", if spec.tags.is_empty() { "-".into() } else { spec.tags.join(",") });
            if let Some(schedule) = show::schedule_detail(spec, chrono::Utc::now(), show::NEXT_SLOTS) {
                print_schedule(&schedule);
            }
            println!("desired:     {}", row.desired);
            println!("state:       {}", row.state);
            println!("node:        {}", row.node.as_ref().map_or("-", |n| n.as_str()));
            println!("pid:         {}", row.pid.map_or("-".into(), |p| p.to_string()));
            println!("generation:  {}", row.generation.map_or("-".into(), |g| g.to_string()));
            println!("restarts:    {}", row.restarts.map_or("-".into(), |r| r.to_string()));
            println!("last exit:   {}", exit_text(row.last_exit));
            if let Some(reason) = &row.reason {
                println!("reason:      {reason}");
            }
        }
        Command::Audit { id, json } => {
            let task = id.map(TaskId::new).transpose().map_err(invalid)?;
            let view = read_view(&config, timeout, &TASK_TOPICS, true).await?;
            let mut entries = view.audit.clone().unwrap_or_default();
            // Refused commands compaction dropped are still known by the leader's records.
            for refusal in view.refused.values() {
                if !entries.iter().any(|entry| entry.offset == refusal.offset) {
                    entries.push(shiva_proto::view::AuditEntry {
                        offset: refusal.offset,
                        key: refusal.key.clone(),
                        kind: "(compacted)".into(),
                        sender: None,
                        signer: None,
                        sent_at_ms: None,
                        outcome: format!("refused: {}", refusal.reason),
                    });
                }
            }
            entries.sort_by_key(|entry| entry.offset);
            let entries: Vec<_> = entries
                .into_iter()
                .filter(|entry| {
                    task.as_ref()
                        .is_none_or(|task| shiva_proto::view::command_task(&entry.key).as_ref() == Some(task))
                })
                .collect();
            if json.json {
                print_json(&entries);
            } else {
                println!(
                    "{:>8}  {:<24} {:<12} {:<40} {:<20} OUTCOME",
                    "OFFSET", "WHEN", "KIND", "KEY", "SIGNED BY"
                );
                for entry in entries {
                    let when = entry
                        .signer
                        .as_ref()
                        .map(|signer| signer.at_ms)
                        .or(entry.sent_at_ms)
                        .and_then(|ms| i64::try_from(ms).ok())
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .map_or("-".to_owned(), |at| at.format("%Y-%m-%d %H:%M:%S%.3f").to_string());
                    let by = match &entry.signer {
                        Some(signer) if signer.comment.is_empty() => signer.fingerprint.clone(),
                        Some(signer) => format!("{} ({})", signer.comment, signer.fingerprint),
                        None => format!("unsigned, {}", entry.sender.as_deref().unwrap_or("?")),
                    };
                    println!(
                        "{:>8}  {:<24} {:<12} {:<40} {:<20} {}",
                        entry.offset, when, entry.kind, entry.key, by, entry.outcome
                    );
                }
            }
        }
        Command::Nodes(json) => {
            let view = snapshot(&config, timeout, &TopicKind::ALL).await?;
            let rows = node_rows(&view);
            if json.json {
                print_json(&rows);
            } else {
                println!(
                    "{:<24} {:<6} {:<7} {:<9} {:>5} {:>6} {:>13}  {:<14} {:>9}  TAGS",
                    "ID", "ALIVE", "LEADER", "MODE", "TASKS", "LOAD", "MEM FREE", "VERSION", "CLOCK"
                );
                let mine = shiva_proto::protocol();
                for row in &rows {
                    let leader = if row.leader { "*" } else { "" };
                    let version = format!("{}/p{}", row.version.as_deref().unwrap_or("?"), row.protocol);
                    let clock = row.clock_offset_ms.map_or("?".to_owned(), show::offset_text);
                    let memory = if row.memory_total_bytes == 0 {
                        "?".to_owned()
                    } else {
                        let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
                        format!("{:.1}/{:.1}G", gib(row.memory_available_bytes), gib(row.memory_total_bytes))
                    };
                    println!(
                        "{:<24} {:<6} {:<7} {:<9} {:>5} {:>6.2} {:>13}  {:<14} {:>9}  {}",
                        row.id.as_str(),
                        row.alive,
                        leader,
                        row.mode,
                        row.tasks,
                        row.load1,
                        memory,
                        version,
                        clock,
                        row.tags.join(",")
                    );
                }
                let open: Vec<&str> = rows
                    .iter()
                    .filter(|row| row.alive && row.commands == "open")
                    .map(|row| row.id.as_str())
                    .collect();
                if !open.is_empty() {
                    println!(
                        "warning: open cluster: node(s) {} accept unsigned commands from anyone who can write to {} \
                         (start nodes with --authorized-keys)",
                        open.join(", "),
                        config.topics.name(TopicKind::Commands)
                    );
                }
                for row in rows.iter().filter(|row| !row.conflicting_incarnations.is_empty()) {
                    println!(
                        "warning: node id {} is used by {} live incarnations (another machine with the same --node-id: \
                         a clone, a healed partition); only {} runs its tasks, the others run nothing: stop them \
                         or give them another --node-id (others: {})",
                        row.id.as_str(),
                        row.conflicting_incarnations.len() + 1,
                        row.incarnation,
                        row.conflicting_incarnations.join(", ")
                    );
                }
                let leader = rows.iter().find(|row| row.leader).map(|row| row.id.to_string());
                for row in rows.iter().filter(|row| row.alive) {
                    if let Some(offset) =
                        row.clock_offset_ms.filter(|offset| offset.abs() > show::CLOCK_WARN_MS)
                    {
                        println!(
                            "warning: {}'s clock is {} {} the leader's ({}): above {} ms; keep every node's \
                             clock synchronised (NTP, docs/operations.md \"Clocks\")",
                            row.id.as_str(),
                            show::offset_text(offset).trim_start_matches(['+', '-']),
                            if offset > 0 { "ahead of" } else { "behind" },
                            leader.as_deref().unwrap_or("?"),
                            show::CLOCK_WARN_MS
                        );
                    }
                }
                for row in rows.iter().filter(|row| row.protocol > mine) {
                    println!(
                        "note: {} speaks protocol {}, newer than this shiva-ctl's ({mine}): it leads while it is live, \
                         and its records are read here only by key; upgrade shiva-ctl to see them",
                        row.id.as_str(),
                        row.protocol
                    );
                }
                let protocols: std::collections::BTreeSet<u16> =
                    rows.iter().filter(|row| row.alive).map(|row| row.protocol).collect();
                if protocols.len() > 1 {
                    println!(
                        "note: live nodes speak protocols {protocols:?}: a rolling upgrade is under way (docs/operations.md, \"Upgrades\")"
                    );
                }
            }
        }
        Command::Cordon { node, json } => {
            node_mode(&config, timeout, &node, Mode::Cordoned, None, Output::of(json.json)).await?;
        }
        Command::Uncordon { node, json } => {
            node_mode(&config, timeout, &node, Mode::Open, None, Output::of(json.json)).await?;
        }
        Command::Drain { node, deadline, detach, wait, json } => {
            let deadline_ms = deadline.map(|deadline| {
                shiva_proto::wall::now_ms()
                    .saturating_add(i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX))
            });
            // Waiting, it prints the node's row at the end (one JSON document in all).
            let output = if !json.json {
                Output::Text
            } else if detach {
                Output::Json
            } else {
                Output::Quiet
            };
            node_mode(&config, timeout, &node, Mode::Draining, deadline_ms, output).await?;
            if !detach {
                drain_wait(&config, timeout, &node, wait, json.json).await?;
            }
        }
        Command::Rebalance { dry_run, max_moves, wait, json } => {
            rebalance(&config, timeout, dry_run, usize::from(max_moves), wait, json.json).await?
        }
        Command::Run { id, json } => {
            command(&config, timeout, Commanded::Run(task_id(&id)?), json.json).await?
        }
        Command::Suspend { id, json } => {
            command(&config, timeout, Commanded::Suspend(task_id(&id)?), json.json).await?
        }
        Command::Resume { id, json } => {
            command(&config, timeout, Commanded::Resume(task_id(&id)?), json.json).await?
        }
        Command::History { id, limit, json } => {
            history::history(&config, timeout, &id, usize::from(limit), json.json).await?
        }
        Command::Logs { id, follow, run, since, json, tail } => {
            let tail = tail.map(|lines| lines as usize);
            logs::print(&config, timeout, logs::Request { id, follow, run, since, json, tail }).await?
        }
        Command::Kill { id, json } => {
            command(&config, timeout, Commanded::Kill(task_id(&id)?), json.json).await?
        }
        Command::Start { id, json } => {
            command(&config, timeout, Commanded::Start(task_id(&id)?), json.json).await?
        }
        Command::Secret(command) => secret(&config, timeout, command).await?,
        Command::Delete { id, json } => {
            command(&config, timeout, Commanded::Delete(task_id(&id)?), json.json).await?
        }
        // Answered above, before the bus.
        Command::Completions { .. } | Command::Man { .. } => {}
    }
    Ok(())
}

/// The files' specs, the cluster's view and what `apply` would change.
async fn declared(
    config: &BusConfig,
    timeout: Duration,
    files: &cli::FilesArgs,
) -> Result<(Vec<apply::FileSpec>, LogView, Vec<apply::Change>), CtlError> {
    if let Some(prefix) = &files.prune {
        TaskId::new(prefix.trim_end_matches('/'))
            .map_err(|err| invalid(format!("--prune '{prefix}': {err}")))?;
    }
    let specs = apply::read_specs(&files.paths)?;
    let view = snapshot(config, timeout, &TASK_TOPICS).await?;
    let changes = apply::plan(&view, &specs, files.prune.as_deref());
    apply::check_batch(&view, &specs, &changes)?;
    Ok((specs, view, changes))
}

/// `man`: the pages of `shiva-ctl` and each subcommand into `dir`, or `shiva-ctl.1` on stdout.
fn man(dir: Option<&std::path::Path>) -> Result<(), CtlError> {
    let command = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        return match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
            // `man | head`: a closed pipe ends it quietly.
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => {
                result.map_err(|err| CtlError::Failed(anyhow::anyhow!("cannot write the man page: {err}")))
            }
        };
    };
    std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir)).map_err(|err| {
        CtlError::Failed(anyhow::anyhow!("cannot write man pages into {}: {err}", dir.display()))
    })?;
    println!("man pages written into {}", dir.display());
    Ok(())
}

/// How a command prints what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Text,
    Json,
    /// Nothing: a later step prints.
    Quiet,
}

impl Output {
    fn of(json: bool) -> Output {
        if json { Output::Json } else { Output::Text }
    }
}

/// `cordon`, `uncordon`, `drain`: writes the node's mode; in a signed cluster, reads it back to
/// tell whether the nodes accept it.
async fn node_mode(
    config: &BusConfig,
    timeout: Duration,
    node: &str,
    mode: Mode,
    deadline_ms: Option<i64>,
    output: Output,
) -> Result<(), CtlError> {
    let node = NodeId::new(node).map_err(|err| invalid(format!("node id '{node}': {err}")))?;
    let view = snapshot(config, timeout, &TopicKind::ALL).await?;
    let write = commands::node_mode(&view, &node, mode, deadline_ms)?;
    let offsets = send_writes(&Publisher::new(config, "ctl")?, vec![write]).await?;
    let leader_knows =
        view.leader().and_then(|(_, winner)| view.heartbeats.get(&winner.node)).is_none_or(|entry| {
            entry.heartbeat.features.iter().any(|f| f == shiva_proto::records::feature::NODE_MODES)
        });
    if view.auth.0.is_some() {
        let now = snapshot(config, timeout, &TopicKind::ALL).await?;
        let accepted = now
            .node_modes
            .get(&node)
            .is_some_and(|known| known.mode == mode && known.deadline_ms == deadline_ms);
        if !accepted {
            return Err(CtlError::Failed(anyhow::anyhow!(
                "the nodes refused this command (a signed cluster: sign with a key without a task restriction; `shiva-ctl audit` says why)"
            )));
        }
    }
    if output == Output::Json {
        print_json(
            &serde_json::json!({"node": node, "mode": mode.as_str(), "deadline_ms": deadline_ms, "revision": offsets[0].1}),
        );
    } else if output == Output::Text {
        match mode {
            Mode::Open => println!("{node}: open (new tasks may be placed there)"),
            Mode::Cordoned => println!("{node}: cordoned (no new task is placed there; its tasks stay)"),
            Mode::Draining => println!("{node}: draining (its services move away one copy at a time)"),
        }
    }
    if !leader_knows {
        eprintln!(
            "warning: the leader runs a version without node modes: it ignores this until a node of this version leads"
        );
    }
    Ok(())
}

/// `rebalance`: plans moves on the cluster's view, asks the leader for a batch of at most
/// `max_moves`, waits until each moved service runs on its new node, and plans again, until no
/// move evens the loads out further.
async fn rebalance(
    config: &BusConfig,
    timeout: Duration,
    dry_run: bool,
    max_moves: usize,
    wait: Duration,
    json: bool,
) -> Result<(), CtlError> {
    use shiva_proto::rebalance;
    let mut done: Vec<rebalance::Move> = Vec::new();
    loop {
        let view = snapshot(config, timeout, &TopicKind::ALL).await?;
        if dry_run {
            let moves = rebalance::plan(&view, usize::MAX);
            if json {
                print_json(&moves);
            } else if moves.is_empty() {
                println!("balanced: no move would even the loads out");
            } else {
                for step in &moves {
                    println!("{}: {} -> {}", step.task, step.from, step.to);
                }
                println!("dry run: {} move(s), {max_moves} at a time; nothing was written", moves.len());
            }
            return Ok(());
        }
        let batch = rebalance::plan(&view, max_moves);
        if batch.is_empty() {
            if json {
                print_json(&done);
            } else {
                println!("balanced ({} move(s))", done.len());
            }
            return Ok(());
        }
        // A request outlives the batch's wait a little: the leader honours it only meanwhile.
        let until_ms = shiva_proto::wall::now_ms()
            .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
            .saturating_add(5_000)
            .min(shiva_proto::wall::now_ms().saturating_add(commands::MOVE_WINDOW_MS));
        let mut writes = Vec::new();
        for step in &batch {
            writes.push(commands::move_task(&view, &step.task, &step.from, &step.to, until_ms)?);
            if !json {
                println!("moving {} from {} to {}", step.task, step.from, step.to);
            }
        }
        send_writes(&Publisher::new(config, "ctl")?, writes).await?;
        let started = std::time::Instant::now();
        loop {
            let now = snapshot(config, timeout, &TASK_TOPICS).await?;
            let pending: Vec<&rebalance::Move> = batch
                .iter()
                .filter(|step| {
                    task_row(&now, &step.task)
                        .is_none_or(|row| !(row.state == "running" && row.node.as_ref() == Some(&step.to)))
                })
                .collect();
            if pending.is_empty() {
                break;
            }
            if started.elapsed() >= wait {
                let names: Vec<String> =
                    pending.iter().map(|step| format!("{} (to {})", step.task, step.to)).collect();
                return Err(CtlError::Failed(anyhow::anyhow!(
                    "not moved within {}: {}; `shiva-ctl status` says why",
                    humantime::format_duration(wait),
                    names.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        done.extend(batch);
    }
}

/// Waits until `node` is drained, saying what still runs there now and then.
async fn drain_wait(
    config: &BusConfig,
    timeout: Duration,
    node: &str,
    wait: Duration,
    json: bool,
) -> Result<(), CtlError> {
    let node = NodeId::new(node).map_err(invalid)?;
    let started = std::time::Instant::now();
    let mut said = String::new();
    loop {
        let view = snapshot(config, timeout, &TopicKind::ALL).await?;
        let row = node_rows(&view)
            .into_iter()
            .find(|row| row.id == node)
            .ok_or_else(|| CtlError::Failed(anyhow::anyhow!("node '{node}' is no longer in this cluster")))?;
        if row.mode == "drained" {
            if json {
                print_json(&row);
            } else {
                println!("{node}: drained in {:.1} s", started.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        if row.mode != "draining" {
            return Err(CtlError::Failed(anyhow::anyhow!(
                "{node} is {} now: its drain is not in force (replaced by another command, or refused: `shiva-ctl audit`)",
                row.mode
            )));
        }
        let remaining: Vec<String> = view
            .assignments
            .keys()
            .filter(|task| view.assigned_node(task) == Some(&node))
            .map(|task| match task_row(&view, task) {
                Some(row) if row.reason.is_some() => format!("{task} ({})", row.reason.unwrap_or_default()),
                _ => task.to_string(),
            })
            .collect();
        let now = if remaining.is_empty() {
            "copies and runs still ending there".to_owned()
        } else {
            format!("{} task(s) still there: {}", remaining.len(), remaining.join(", "))
        };
        if now != said && !json {
            println!("{node}: {now}");
            said = now;
        }
        if started.elapsed() >= wait {
            return Err(CtlError::Failed(anyhow::anyhow!(
                "{node} is not drained after {}: {said}; the drain goes on (`shiva-ctl nodes` shows it)",
                humantime::format_duration(wait)
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A schedule's lines of `status` and `submit --dry-run`.
fn print_schedule(schedule: &show::ScheduleDetail) {
    for (index, words) in schedule.words.iter().enumerate() {
        println!("{:<13}{words}", if index == 0 { "schedule:" } else { "" });
    }
    println!("timezone:    {}", schedule.timezone);
    for (index, slot) in schedule.next.iter().enumerate() {
        let shown = chrono::DateTime::parse_from_rfc3339(slot)
            .map_or_else(|_| slot.clone(), |at| at.format("%a %Y-%m-%d %H:%M:%S %:z").to_string());
        println!("{:<13}{shown}", if index == 0 { "next:" } else { "" });
    }
}

pub(crate) fn no_such_task(task: &TaskId) -> CtlError {
    CtlError::Failed(anyhow::anyhow!("no task '{task}' in this cluster"))
}

/// `secret set | list | delete`.
async fn secret(config: &BusConfig, timeout: Duration, command: cli::SecretCommand) -> Result<(), CtlError> {
    use shiva_proto::secret::{MAX_VALUE_BYTES, seal};
    let name_of =
        |name: &str| TaskId::new(name).map_err(|err| invalid(format!("secret name '{name}': {err}")));
    match command {
        cli::SecretCommand::Set { name, json } => {
            let name = name_of(&name)?;
            let mut value = Vec::new();
            std::io::stdin().take(MAX_VALUE_BYTES as u64 + 2).read_to_end(&mut value).map_err(|err| {
                CtlError::Failed(anyhow::anyhow!("cannot read the value from stdin: {err}"))
            })?;
            if value.ends_with(b"\n") {
                value.pop();
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(invalid(format!("the value on stdin is above {MAX_VALUE_BYTES} bytes")));
            }
            if std::str::from_utf8(&value).is_err() {
                return Err(invalid(
                    "the value on stdin is not UTF-8 text (secrets go into environments and text files)",
                ));
            }
            let view = snapshot(config, timeout, &TopicKind::ALL).await?;
            let live: Vec<(String, String)> = node_rows(&view)
                .into_iter()
                .filter(|row| row.alive)
                .filter_map(|row| {
                    let recipient = view.heartbeats.get(&row.id)?.heartbeat.recipient.clone()?;
                    let valid = !shiva_proto::secret::valid_recipients([recipient.as_str()]).is_empty();
                    valid.then(|| (row.id.to_string(), recipient))
                })
                .collect();
            if live.is_empty() {
                return Err(CtlError::Failed(anyhow::anyhow!(
                    "no live node publishes a recipient to encrypt to (nodes of this version do; start one first)"
                )));
            }
            let recipients: Vec<String> = live.iter().map(|(_, recipient)| recipient.clone()).collect();
            let sealed = seal(&name, &value, &recipients, None)
                .map_err(|err| CtlError::Failed(anyhow::anyhow!(err)))?;
            drop(value);
            let record_key = key::secret(&name);
            let record = envelope(&record_key, Body::Secret(sealed))?;
            let revision =
                Publisher::new(config, "ctl")?.send(TopicKind::Commands, &record_key, Some(&record)).await?;
            let nodes: Vec<&str> = live.iter().map(|(node, _)| node.as_str()).collect();
            if json.json {
                print_json(&serde_json::json!({"name": name, "revision": revision, "nodes": nodes}));
            } else {
                println!("secret {name} set (revision {revision}), encrypted to {}", nodes.join(", "));
            }
        }
        cli::SecretCommand::List(json) => {
            let view = snapshot(config, timeout, &TopicKind::ALL).await?;
            let rows: Vec<serde_json::Value> = view
                .secrets
                .iter()
                .map(|(name, (revision, secret))| {
                    let copy = view.secret_copies.get(name).filter(|copy| copy.source == Some(*revision));
                    let nodes = copy.map_or(secret.recipients.len(), |copy| copy.recipients.len());
                    serde_json::json!({"name": name, "revision": revision, "nodes": nodes})
                })
                .collect();
            if json.json {
                print_json(&rows);
            } else {
                println!("{:<40} {:>9} {:>6}", "NAME", "REVISION", "NODES");
                for row in rows {
                    println!(
                        "{:<40} {:>9} {:>6}",
                        row["name"].as_str().unwrap_or(""),
                        row["revision"],
                        row["nodes"]
                    );
                }
            }
        }
        cli::SecretCommand::Delete { name, json } => {
            let name = name_of(&name)?;
            let view = snapshot(config, timeout, &TASK_TOPICS).await?;
            if !view.secrets.contains_key(&name) {
                return Err(CtlError::Failed(anyhow::anyhow!("no secret '{name}'")));
            }
            Publisher::new(config, "ctl")?.send(TopicKind::Commands, &key::secret(&name), None).await?;
            if json.json {
                print_json(&serde_json::json!({"name": name, "deleted": true}));
            } else {
                println!("deleted secret {name}");
            }
        }
    }
    Ok(())
}

pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("output serialises"));
}

/// A command's record on `key` (signed with `--sign-key`).
pub(crate) fn envelope(key: &str, body: Body) -> Result<Vec<u8>, CtlError> {
    sign::CommandSigner::record(key, body)
}

/// Builds the spec from a file or from flags, strictly validated.
fn spec_from(args: Box<SubmitArgs>) -> Result<TaskSpec, CtlError> {
    if let Some(path) = args.file {
        let text = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|err| invalid(format!("failed to read stdin: {err}")))?;
            text
        } else {
            std::fs::read_to_string(&path)
                .map_err(|err| invalid(format!("failed to read {}: {err}", path.display())))?
        };
        return TaskSpec::from_user_json(&text).map_err(|err| invalid(format!("{}: {err}", path.display())));
    }
    let id = args.id.ok_or_else(|| invalid("submit needs a spec FILE, or --id ID -- CMD [ARGS…]"))?;
    let id = TaskId::new(id).map_err(|err| invalid(format!("--id: {err}")))?;
    let mut command = args.command.into_iter();
    let program = command.next().ok_or_else(|| invalid("submit --id needs a command after `--`"))?;
    let mut spec = TaskSpec::new(id, program, command.collect());
    spec.tags = args.tags;
    spec.workdir = args.workdir;
    let mut env = BTreeMap::new();
    for pair in args.env {
        let (name, value) =
            pair.split_once('=').ok_or_else(|| invalid(format!("--env '{pair}': expected K=V")))?;
        env.insert(name.to_owned(), value.to_owned());
    }
    spec.env = env;
    spec.stop_grace = match args.stop_grace {
        Some(text) => humantime::parse_duration(&text)
            .map_err(|err| invalid(format!("--stop-grace '{text}': {err} (expected e.g. 10s)")))?,
        None => DEFAULT_STOP_GRACE,
    };
    spec.schedule = args.schedule;
    spec.timezone = args.timezone;
    spec.once = args.once;
    spec.count = args.count;
    spec.every_node = args.every_node;
    if let Some(text) = args.catch_up {
        spec.catch_up = choice(&text, "--catch-up", "none, latest or all")?;
    }
    if let Some(text) = args.overlap {
        spec.overlap = choice(&text, "--overlap", "allow, forbid, replace or queue")?;
    }
    spec.validate_new().map_err(invalid)?;
    Ok(spec)
}

/// Parses a snake_case policy name with the spec's own serde names.
fn choice<T: serde::de::DeserializeOwned>(text: &str, flag: &str, expected: &str) -> Result<T, CtlError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| invalid(format!("{flag} '{text}': expected {expected}")))
}

/// Writes what `submit` writes: the spec, then desired `running`. Returns the spec's revision.
pub async fn write_spec(publisher: &Arc<Publisher>, spec: &TaskSpec) -> Result<i64, CtlError> {
    let writes = commands::plan(&LogView::default(), &Commanded::Submit(Box::new(spec.clone())))?;
    Ok(send_writes(publisher, writes).await?[0].1)
}

fn task_id(id: &str) -> Result<TaskId, CtlError> {
    TaskId::new(id).map_err(invalid)
}

/// A command on one task: read the log, plan the records, write them, say what was done.
async fn command(
    config: &BusConfig,
    timeout: Duration,
    command: Commanded,
    json: bool,
) -> Result<(), CtlError> {
    let view = snapshot(config, timeout, &TASK_TOPICS).await?;
    let offsets = execute(config, &view, &command).await?;
    let task = command.task();
    if json {
        let records: Vec<_> =
            offsets.iter().map(|(key, offset)| serde_json::json!({"key": key, "offset": offset})).collect();
        print_json(&serde_json::json!({"task": task, "command": command.verb(), "records": records}));
        return Ok(());
    }
    match &command {
        Commanded::Delete(_) => println!("deleted {task}"),
        Commanded::Run(_) => {
            let request = offsets[0].0.rsplit('/').next().unwrap_or_default();
            println!("{task}: run requested (request {request}); see `shiva-ctl history {task}`")
        }
        Commanded::Kill(_) => println!("{task}: desired stopped"),
        Commanded::Suspend(_) => println!("{task}: desired suspended"),
        Commanded::Start(_) | Commanded::Resume(_) => println!("{task}: desired running"),
        Commanded::Submit(_) => {}
    }
    Ok(())
}

/// Writes what `command` writes, judged on `view` (see `shiva_proto::commands`); returns the
/// keys and offsets of its records.
pub async fn execute(
    config: &BusConfig,
    view: &LogView,
    command: &Commanded,
) -> Result<Vec<(String, i64)>, CtlError> {
    let writes = commands::plan(view, command)?;
    send_writes(&Publisher::new(config, "ctl")?, writes).await
}

async fn send_writes(
    publisher: &Arc<Publisher>,
    writes: Vec<commands::Write>,
) -> Result<Vec<(String, i64)>, CtlError> {
    let mut offsets = Vec::with_capacity(writes.len());
    for write in writes {
        let value = write.body.map(|body| envelope(&write.key, body)).transpose()?;
        let offset = publisher.send(TopicKind::Commands, &write.key, value.as_deref()).await?;
        offsets.push((write.key, offset));
    }
    Ok(offsets)
}

impl From<commands::CommandError> for CtlError {
    fn from(err: commands::CommandError) -> Self {
        match err {
            commands::CommandError::Invalid(message) => CtlError::Invalid(message),
            err => CtlError::Failed(anyhow::anyhow!(err)),
        }
    }
}

/// Topics that task commands read: the heartbeats on `control` are only needed by `nodes`
/// (and on a broker that compacts rarely they are most of the log).
pub(crate) const TASK_TOPICS: [TopicKind; 3] =
    [TopicKind::Commands, TopicKind::Assignments, TopicKind::Status];

/// Reads `topics` to their end into a view. A signed cluster (its leader's `members` record
/// names authorized keys) is read twice: the second time by the leader's keys, so that the CLI
/// shows what the nodes accept, and refusals.
pub async fn snapshot(
    config: &BusConfig,
    timeout: Duration,
    topics: &[TopicKind],
) -> Result<LogView, CtlError> {
    read_view(config, timeout, topics, false).await
}

/// [`snapshot`], keeping every command record for `audit` when `audit`.
pub async fn read_view(
    config: &BusConfig,
    timeout: Duration,
    topics: &[TopicKind],
    audit: bool,
) -> Result<LogView, CtlError> {
    let first = read_once(config, timeout, topics, LogView::default()).await?;
    let keys = first.members.as_ref().and_then(|members| members.authorized_keys.as_deref());
    let policy = match keys {
        None if !audit => return Ok(first),
        None => None,
        Some(text) => Some(Arc::new(
            shiva_proto::auth::Policy::parse(config.topics.cluster(), text)
                .map_err(|err| CtlError::Failed(anyhow::anyhow!("the leader's authorized keys: {err}")))?,
        )),
    };
    let mut view = LogView::with_policy(policy);
    if audit {
        view.audit = Some(Vec::new());
    }
    read_once(config, timeout, topics, view).await
}

async fn read_once(
    config: &BusConfig,
    timeout: Duration,
    topics: &[TopicKind],
    mut view: LogView,
) -> Result<LogView, CtlError> {
    let started = std::time::Instant::now();
    admin::require_topics(config, timeout).await?;
    tracing::debug!(elapsed = ?started.elapsed(), "topics checked");
    let (events_tx, mut events) = mpsc::channel(8192);
    let reader = Reader::spawn(config, topics, events_tx)?;
    reader.sync(1);
    let read = async {
        while let Some(event) = events.recv().await {
            match event {
                ReaderEvent::Record(record) => {
                    // No record may stop the CLI from reading (and deleting) what is in the log.
                    view.apply_guarded(
                        record.topic,
                        record.offset,
                        record.key.as_deref(),
                        record.value.as_deref(),
                    );
                }
                ReaderEvent::Synced(_) => {
                    tracing::debug!(elapsed = ?started.elapsed(), "log read to its end");
                    return Ok(());
                }
                ReaderEvent::SyncFailed(_, message) => return Err(CtlError::Unreachable(message)),
                ReaderEvent::Error(_) => {}
                ReaderEvent::Regressed { topic, position, end } => {
                    return Err(CtlError::Failed(anyhow::anyhow!(ReaderEvent::regressed_message(
                        &topic, position, end
                    ))));
                }
            }
        }
        Err(CtlError::Failed(anyhow::anyhow!("the bus reader stopped")))
    };
    tokio::time::timeout(timeout.saturating_mul(3), read)
        .await
        .context("timed out reading the cluster state")
        .map_err(|err| CtlError::Unreachable(format!("{err:#}")))??;
    Ok(view)
}
