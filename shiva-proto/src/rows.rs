//! What operators see: task, node and run rows derived from a log view, the same for the CLI
//! (`shiva-ctl list`, `status`, `nodes`, `history`) and a node's HTTP API and dashboard.
//!
//! Pure functions of the view: any reader of the log derives the same rows from the same records.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::records::{DesiredState, ExitInfo, Mode, Placement, RunState};
use crate::runs::{RunPhase, Trigger};
use crate::schedule::Schedule;
use crate::spec::{Instances, TaskKind, TaskSpec};
use crate::view::SpecEntry;
use crate::{LogView, NodeId, TaskId};

/// One task as `list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRow {
    /// Task id.
    pub id: TaskId,
    /// `service`.
    pub kind: &'static str,
    /// `running` or `stopped`.
    pub desired: &'static str,
    /// Services: `unassigned`, `pending`, `assigned`, `starting`, `running`, `backoff`,
    /// `failed`, `stopping` or `stopped`. Periodic: `scheduled`, `suspended` or the current
    /// run's state. One-shot: `waiting`, the current run's state, `succeeded` or `failed`.
    pub state: &'static str,
    /// Runner node.
    pub node: Option<NodeId>,
    /// Child pid while running.
    pub pid: Option<u32>,
    /// Assignment generation.
    pub generation: Option<u64>,
    /// Start attempts within the generation.
    pub attempt: Option<u32>,
    /// Restarts within the generation.
    pub restarts: Option<u32>,
    /// How the previous child ended.
    pub last_exit: Option<ExitInfo>,
    /// Why it is pending, or a runner's message.
    pub reason: Option<String>,
}

impl TaskRow {
    /// A row that says only what a task is and how it stands: no node, run or exit.
    pub fn summary(id: TaskId, kind: &'static str, desired: &'static str, state: &'static str) -> TaskRow {
        TaskRow {
            id,
            kind,
            desired,
            state,
            node: None,
            pid: None,
            generation: None,
            attempt: None,
            restarts: None,
            last_exit: None,
            reason: None,
        }
    }
}

/// Derives a task's row.
pub fn task_row(view: &LogView, task: &TaskId) -> Option<TaskRow> {
    if let Some(invalid) = view.invalid.get(task) {
        // Its newest definition is unusable: failed, whatever ran before.
        let desired = view.desired_state(task).as_str();
        return Some(TaskRow {
            reason: Some(format!("revision {}: {}", invalid.revision, invalid.reason)),
            ..TaskRow::summary(task.clone(), "invalid", desired, "failed")
        });
    }
    if let Some(entry) = view.specs.get(task)
        && entry.spec.instances() != Instances::Single
    {
        return Some(instances_row(view, task, entry));
    }
    // An instance: its task's definition, also while one no longer wanted stops.
    let spec = view.spec_of(task).or_else(|| {
        let leaving = task.instance().is_some() && view.assignments.contains_key(task);
        leaving.then(|| view.specs.get(&task.base())).flatten()
    })?;
    let assignment = view.assignments.get(task).map(|entry| &entry.assignment);
    let status = view.current_status(task).map(|entry| &entry.status);
    let mut row = TaskRow {
        id: task.clone(),
        kind: spec.spec.kind().as_str(),
        desired: view.desired_state(task).as_str(),
        state: "unassigned",
        node: None,
        pid: None,
        generation: assignment.map(|a| a.generation),
        attempt: status.map(|s| s.attempt),
        restarts: status.map(|s| s.restarts),
        last_exit: status.and_then(|s| s.last_exit),
        reason: status.and_then(|s| s.message.clone()),
    };
    match assignment.map(|a| &a.placement) {
        None => row.reason = Some("not placed yet (is a leader running?)".into()),
        Some(Placement::Pending { reason }) => {
            row.state = "pending";
            row.reason = Some(reason.clone());
        }
        Some(Placement::Stopped) => {
            let previous = view.statuses.get(task);
            let still_running =
                previous.is_some_and(|entry| !matches!(entry.status.state, RunState::Stopped));
            row.state = if still_running { "stopping" } else { "stopped" };
            row.node = previous.filter(|_| still_running).map(|entry| entry.node.clone());
        }
        Some(Placement::Scheduled) => scheduled_state(view, task, &mut row),
        Some(Placement::Failed { reason })
            if view.assignments[task].assignment.spec_revision == spec.revision =>
        {
            row.state = "failed";
            row.reason = Some(reason.clone());
        }
        Some(Placement::Failed { .. }) => row.reason = Some("not placed yet (is a leader running?)".into()),
        Some(Placement::Assigned { node }) => {
            row.node = Some(node.clone());
            let assignment = &view.assignments[task].assignment;
            let from_runner = view.current_status(task).filter(|entry| entry.node == *node);
            row.state = from_runner.map_or("assigned", |entry| entry.status.state.as_str());
            let started = from_runner.is_some_and(|entry| entry.status.generation >= assignment.generation);
            if !started && !assignment.after.is_empty() {
                // A hand-off: the node starts it once the named nodes said their copy is gone.
                let names: Vec<&str> = assignment.after.iter().map(NodeId::as_str).collect();
                row.state = "handing off";
                row.reason = Some(format!("{node} starts it once {} stopped its copy", names.join(", ")));
            }
            row.pid = from_runner
                .filter(|entry| entry.status.state == RunState::Running)
                .and_then(|entry| entry.status.pid);
        }
    }
    Some(row)
}

/// The row of a task run as instances: `running` when every instance it should have runs,
/// `pending` when none does, `degraded` in between; the reason counts them.
fn instances_row(view: &LogView, task: &TaskId, entry: &SpecEntry) -> TaskRow {
    let instances = instances_of(view, task);
    let wanted: Vec<&TaskId> = instances.iter().filter(|id| view.spec_of(id).is_some()).collect();
    let running = wanted
        .iter()
        .filter(|id| task_row(view, id).is_some_and(|row| row.state == RunState::Running.as_str()))
        .count();
    let state = match running {
        0 => "pending",
        n if n == wanted.len() => "running",
        _ => "degraded",
    };
    let how = match entry.spec.instances() {
        Instances::Count(count) => format!("count {count}"),
        _ => "one on every eligible node".to_owned(),
    };
    let desired = view.desired_state(task).as_str();
    TaskRow {
        reason: Some(format!("{running} of {} instances running ({how})", wanted.len())),
        ..TaskRow::summary(task.clone(), entry.spec.kind().as_str(), desired, state)
    }
}

/// The instances of `task` to show: those its spec asks (`count`) and those with an
/// assignment (an `every_node` task's, one no longer wanted that is stopping), numbers in
/// numeric order.
pub fn instances_of(view: &LogView, task: &TaskId) -> Vec<TaskId> {
    let mut ids: Vec<TaskId> = match view.specs.get(task).map(|entry| entry.spec.instances()) {
        Some(Instances::Count(count)) => {
            (0..count).filter_map(|n| task.with_instance(&n.to_string())).collect()
        }
        _ => Vec::new(),
    };
    for id in view.assigned_instances(task) {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    let number = |id: &TaskId| id.instance().and_then(crate::spec::instance_number);
    ids.sort_by(|a, b| match (number(a), number(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    ids
}

/// Every task `list` shows, in id order: each defined task, followed by its instances.
pub fn listed_tasks(view: &LogView) -> Vec<TaskId> {
    let mut listed = Vec::new();
    for task in view.defined_tasks() {
        listed.push(task.clone());
        if view.specs.get(task).is_some_and(|entry| entry.spec.instances() != Instances::Single)
            || view.assigned_instances(task).next().is_some()
        {
            listed.extend(instances_of(view, task));
        }
    }
    listed
}

/// A task as `shiva-ctl status --json` and `GET /v1/tasks/{id}` show it: its row, its spec (when
/// its definition is valid) and, in a signed cluster, the refusal of a command on it; a task
/// never accepted shows as `refused` (`None`: no such task, and no refusal).
///
/// A periodic task's detail also has its `schedule` in words and its next five slots after `now`
/// ([`schedule_detail`]).
pub fn task_detail(view: &LogView, task: &TaskId, now: DateTime<Utc>) -> Option<serde_json::Value> {
    let refusal = view.refusal(task);
    let Some(row) = task_row(view, task) else {
        return refusal
            .map(|refusal| serde_json::json!({ "id": task, "state": "refused", "refused": refusal }));
    };
    let mut value = serde_json::to_value(&row).expect("rows serialise");
    if let Some(entry) = view.spec_of(task) {
        value["spec"] = serde_json::to_value(&entry.spec).expect("specs serialise");
        if let Some(schedule) = schedule_detail(&entry.spec, now, NEXT_SLOTS) {
            value["schedule"] = serde_json::to_value(schedule).expect("schedules serialise");
        }
    }
    if let Some(refusal) = refusal {
        value["refused"] = serde_json::to_value(refusal).expect("refusals serialise");
    }
    Some(value)
}

/// How many upcoming slots `status` and `submit --dry-run` show.
pub const NEXT_SLOTS: usize = 5;

/// A periodic task's schedule as people read it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleDetail {
    /// The zone the expressions are read in (IANA name).
    pub timezone: String,
    /// Each expression in words, marked when it is read the Quartz way.
    pub words: Vec<String>,
    /// The next slots, in the zone (RFC 3339, with the zone's offset then).
    pub next: Vec<String>,
}

/// `spec`'s schedule in words and its next `count` slots after `now`; `None` for a task without
/// a schedule (or, never for an accepted spec, one that does not parse).
pub fn schedule_detail(spec: &TaskSpec, now: DateTime<Utc>, count: usize) -> Option<ScheduleDetail> {
    let schedule = Schedule::from_spec(spec).ok().flatten()?;
    Some(ScheduleDetail {
        timezone: schedule.timezone().name().to_owned(),
        words: schedule.describe(),
        next: schedule.upcoming(now, count).iter().map(|slot| slot.to_rfc3339()).collect(),
    })
}

/// The state of a periodic or one-shot task: its current run's, else its own.
fn scheduled_state(view: &LogView, task: &TaskId, row: &mut TaskRow) {
    let current = view.runs_of(task).find(|entry| entry.in_flight_on().is_some()).map(|run| run.entry());
    let sched = view.scheds.get(task).map(|entry| &entry.sched);
    if let Some(entry) = current {
        let (intent, _) = entry.intent.as_ref().expect("filtered above");
        row.state = match entry.phase() {
            // A lean periodic run writes no `running` record: from its start record on (written
            // at most 800 ms before its launch, after which its runner launches it or ends it
            // `stopped`), it shows as running.
            RunPhase::Starting
                if !matches!(intent.trigger, Trigger::Once { .. })
                    && entry
                        .report
                        .as_ref()
                        .is_some_and(|report| report.report.state == RunPhase::Starting) =>
            {
                RunPhase::Running.as_str()
            }
            phase => phase.as_str(),
        };
        row.node = intent.node.clone();
        row.attempt = Some(intent.attempt);
        row.pid = entry.report.as_ref().and_then(|report| report.report.pid);
    } else if let Some(outcome) = sched.and_then(|sched| sched.outcome.as_ref()) {
        row.state = outcome.state.as_str();
        row.reason = outcome.reason.clone();
        row.attempt = sched.map(|sched| sched.attempt);
    } else if view.desired_state(task) == DesiredState::Suspended {
        row.state = "suspended";
    } else if view.specs.get(task).is_some_and(|spec| spec.spec.kind() == TaskKind::Once) {
        row.state = "waiting";
        let after = &view.specs[task].spec.after;
        if !after.is_empty() {
            let names: Vec<&str> = after.iter().map(TaskId::as_str).collect();
            row.reason = Some(format!("runs after {}", names.join(", ")));
        }
    } else {
        row.state = "scheduled";
    }
}

/// One node as `nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    /// Node id.
    pub id: NodeId,
    /// Tags given with `--tags`.
    pub tags: Vec<String>,
    /// Host name.
    pub hostname: String,
    /// In the leader's `members` view.
    pub alive: bool,
    /// Leads the current epoch.
    pub leader: bool,
    /// Tasks assigned to it.
    pub tasks: usize,
    /// Runs tasks.
    pub runner: bool,
    /// May lead.
    pub leader_capable: bool,
    /// Its newest incarnation.
    pub incarnation: String,
    /// Sender clock of its newest heartbeat (milliseconds since the epoch).
    pub last_heartbeat_ms: u64,
    /// The protocol version its newest heartbeat was written in.
    pub protocol: u16,
    /// Its build version (absent from older nodes and nodes of a newer protocol).
    pub version: Option<String>,
    /// What its build does beyond protocol version 1 (docs/protocol.md, `features`), as its
    /// newest heartbeat lists them (at most 16, of at most 64 characters, shown).
    pub features: Vec<String>,
    /// Other live incarnations of its id, per the leader (a conflict: cloned machines, a
    /// healed partition); only `incarnation` runs its tasks.
    pub conflicting_incarnations: Vec<String>,
    /// Its clock's offset from the leader's (ms, positive: ahead), estimated from their
    /// heartbeats' samples of each other (absent until both sampled the other; 0 for the leader).
    pub clock_offset_ms: Option<i64>,
    /// How many times its incarnation came back from its fence, as its newest heartbeat says:
    /// after being cut off from the bus (it could not read its own heartbeats back within its
    /// fence timeout, and its exclusive runs stopped), and after each restart of its process
    /// that kept the incarnation (a reload, an upgrade, a crash). After a return, its exclusive
    /// work waits for the leader to list it again. A node cut off now has not come back yet.
    pub returns: u64,
    /// `signed` (the node accepts only commands signed by its authorized keys) or `open`.
    pub commands: &'static str,
    /// Its one-minute load average, as its newest heartbeat says.
    pub load1: f64,
    /// Its logical CPUs.
    pub cpus: u32,
    /// Its total memory (bytes).
    pub memory_total_bytes: u64,
    /// Its available memory (bytes).
    pub memory_available_bytes: u64,
    /// `open`, `cordoned` (no new task placed there), `draining` (its tasks move away) or
    /// `drained` (draining, and nothing runs there any more: no task assigned, no copy
    /// reported or held for it by the leader, no run in flight).
    pub mode: &'static str,
    /// A drain's deadline (wall clock, ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_deadline_ms: Option<i64>,
}

/// Above this clock offset from the leader, `nodes` warns.
pub const CLOCK_WARN_MS: i64 = 250;

/// Every node that ever heartbeated, sorted by id.
pub fn node_rows(view: &LogView) -> Vec<NodeRow> {
    let reference = view.leader().and_then(|(_, winner)| {
        let entry = view.heartbeats.get(&winner.node)?;
        (entry.incarnation == winner.incarnation).then_some((&winner.node, &entry.heartbeat))
    });
    // Tasks per node, in one pass over the assignments.
    let mut assigned: std::collections::BTreeMap<&NodeId, usize> = std::collections::BTreeMap::new();
    for task in view.assignments.keys() {
        if let Some(node) = view.assigned_node(task) {
            *assigned.entry(node).or_default() += 1;
        }
    }
    // Nodes where something still runs: a copy reported live (a moved task's old copy is still
    // stopping) or a run in flight.
    let mut busy: std::collections::BTreeSet<&NodeId> = std::collections::BTreeSet::new();
    for entry in view.statuses.values() {
        if matches!(
            entry.status.state,
            RunState::Starting | RunState::Running | RunState::Backoff | RunState::Stopping
        ) {
            busy.insert(&entry.node);
        }
    }
    // A copy the leader still counts (an assignment's holders and `after`: the hand-off waits
    // for its word), whatever the task's newest status says.
    for entry in view.assignments.values() {
        busy.extend(entry.assignment.holders.iter().map(|holder| &holder.node));
        busy.extend(entry.assignment.after.iter());
    }
    for (task, run) in &view.open_runs {
        if let Some(node) = view.run(task, run).and_then(|run| run.in_flight_on()) {
            busy.insert(node);
        }
    }
    view.heartbeats
        .iter()
        .map(|(id, entry)| {
            // The incarnation the leader lists (the newest heartbeat may be another one's).
            let listed = view
                .members
                .as_ref()
                .and_then(|members| members.nodes.iter().find(|member| member.id == *id))
                .map(|member| member.incarnation);
            let alive = listed.is_some_and(|listed| !view.left.contains(&(id.clone(), listed)))
                && (listed == Some(entry.incarnation)
                    || view
                        .members
                        .iter()
                        .any(|members| members.conflicts.iter().any(|member| member.id == *id)));
            let leader = alive
                && view.leader().is_some_and(|(_, winner)| {
                    winner.node == *id && listed.unwrap_or(entry.incarnation) == winner.incarnation
                });
            let tasks = assigned.get(id).copied().unwrap_or(0);
            let node_mode = view.node_modes.get(id);
            let mode = match node_mode.map_or(Mode::Open, |mode| mode.mode) {
                Mode::Draining if tasks == 0 && !busy.contains(id) => "drained",
                mode => mode.as_str(),
            };
            NodeRow {
                mode,
                drain_deadline_ms: node_mode.and_then(|mode| mode.deadline_ms),
                id: id.clone(),
                tags: entry.heartbeat.tags.clone(),
                hostname: entry.heartbeat.hostname.clone(),
                alive,
                leader,
                tasks,
                runner: entry.heartbeat.runner,
                leader_capable: entry.heartbeat.leader_capable,
                incarnation: listed.unwrap_or(entry.incarnation).to_string(),
                last_heartbeat_ms: entry.sent_at_ms,
                commands: if entry.heartbeat.authorized_keys.is_some() { "signed" } else { "open" },
                load1: if entry.heartbeat.resources.load1.is_finite() {
                    entry.heartbeat.resources.load1
                } else {
                    0.0
                },
                cpus: entry.heartbeat.resources.cpus,
                memory_total_bytes: entry.heartbeat.resources.memory_total_bytes,
                memory_available_bytes: entry.heartbeat.resources.memory_available_bytes,
                conflicting_incarnations: view
                    .members
                    .iter()
                    .flat_map(|members| members.conflicts.iter())
                    .filter(|member| member.id == *id)
                    .map(|member| member.incarnation.to_string())
                    .collect(),
                returns: entry.heartbeat.returns,
                protocol: entry.heartbeat.protocol,
                version: entry.heartbeat.version.clone(),
                features: entry
                    .heartbeat
                    .features
                    .iter()
                    .take(16)
                    .map(|feature| feature.chars().take(64).collect())
                    .collect(),
                clock_offset_ms: reference.and_then(|(leader, beat)| {
                    if leader == id {
                        return Some(0);
                    }
                    crate::records::clock_offset_ms(id, &entry.heartbeat, leader, beat)
                }),
            }
        })
        .collect()
}

/// A clock offset: `+12ms`, `-1.2s`, `+3h`.
pub fn offset_text(offset_ms: i64) -> String {
    let sign = if offset_ms < 0 { "-" } else { "+" };
    let abs = offset_ms.unsigned_abs();
    match abs {
        0..1_000 => format!("{sign}{abs}ms"),
        1_000..60_000 => format!("{sign}{:.1}s", abs as f64 / 1000.0),
        _ => format!("{sign}{}", humantime::format_duration(std::time::Duration::from_secs(abs / 1000))),
    }
}

/// `exit 3`, `signal 9`.
pub fn exit_text(exit: Option<ExitInfo>) -> String {
    match exit {
        Some(ExitInfo { code: Some(code), .. }) => format!("exit {code}"),
        Some(ExitInfo { signal: Some(signal), .. }) => format!("signal {signal}"),
        _ => "-".into(),
    }
}

/// One run as `history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryRow {
    /// Run id (`SHIVA_RUN_ID`).
    pub run_id: Uuid,
    /// `slot`, `manual` or `once`.
    pub trigger: &'static str,
    /// The slot (RFC 3339, UTC), for scheduled runs.
    pub slot: Option<String>,
    /// Attempt (`SHIVA_ATTEMPT`).
    pub attempt: u32,
    /// The node it was given to.
    pub node: Option<NodeId>,
    /// `scheduled`, `starting`, `running`, `succeeded`, `failed`, `timed_out`, `stopped`,
    /// `lost`, `missed` or `skipped`.
    pub state: &'static str,
    /// How it ended.
    pub exit: Option<ExitInfo>,
    /// When the child started (RFC 3339).
    pub start: Option<String>,
    /// When it ended (RFC 3339).
    pub end: Option<String>,
    /// Detail: a stop reason, the leader's note, a spawn error.
    pub message: Option<String>,
}

fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// The task's runs, newest first.
pub fn history_rows(view: &LogView, task: &TaskId, limit: usize) -> Vec<HistoryRow> {
    let mut rows: Vec<(i64, HistoryRow)> = view
        .runs_of(task)
        .map(|run| {
            let (id, entry) = (&run.id(), run.entry());
            let intent = entry.intent.as_ref().map(|(intent, _)| intent);
            let report = entry.report.as_ref().map(|entry| &entry.report);
            let trigger = intent.map(|i| i.trigger).or(report.map(|r| r.trigger));
            let order = intent
                .map(|intent| intent.launch_at_ms)
                .or(report.and_then(|report| report.started_ms))
                .unwrap_or(0);
            let row = HistoryRow {
                run_id: *id,
                trigger: match trigger {
                    Some(Trigger::Slot { .. }) => "slot",
                    Some(Trigger::Request { .. }) => "manual",
                    Some(Trigger::Once { .. }) | None => "once",
                },
                slot: trigger.and_then(|trigger| trigger.slot_ms()).map(time),
                attempt: intent.map_or_else(|| report.map_or(0, |r| r.attempt), |i| i.attempt),
                node: intent
                    .and_then(|intent| intent.node.clone())
                    .or(entry.report.as_ref().map(|entry| entry.node.clone())),
                state: entry.phase().as_str(),
                exit: report.and_then(|report| report.exit),
                start: report.and_then(|report| report.started_ms).map(time),
                end: report.and_then(|report| report.ended_ms).map(time),
                message: report
                    .and_then(|report| report.message.clone())
                    .or(intent.and_then(|intent| intent.note.clone().or(intent.stop.clone()))),
            };
            (order, row)
        })
        .collect();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.attempt.cmp(&a.1.attempt)));
    rows.into_iter().take(limit).map(|(_, row)| row).collect()
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::records::{Body, Envelope, Heartbeat};
    use crate::topics::{TopicKind, key};

    #[test]
    fn a_node_row_says_how_many_times_the_node_came_back_from_a_cut_off() {
        let mut view = LogView::default();
        for (offset, (node, returns)) in [("n1", 0), ("n2", 3)].into_iter().enumerate() {
            let id = NodeId::new(node).unwrap();
            let heartbeat = Heartbeat { returns, ..Heartbeat::of_newer_protocol(1) };
            let value =
                Envelope::now(node, Some(Uuid::from_u128(offset as u128 + 1)), Body::Heartbeat(heartbeat))
                    .encode();
            view.apply(TopicKind::Control, offset as i64, Some(key::node(&id).as_bytes()), Some(&value));
        }
        let rows = node_rows(&view);
        let returns: Vec<(&str, u64)> = rows.iter().map(|row| (row.id.as_str(), row.returns)).collect();
        assert_eq!(returns, [("n1", 0), ("n2", 3)]);
    }
}
