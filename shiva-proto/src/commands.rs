//! What an operator's command writes: the records of `submit`, `kill`, `start`, `delete`,
//! `run`, `suspend` and `resume`, checked against a view of the log. The same for `shiva-ctl`
//! and a node's HTTP API, so that both write exactly the same records.
//!
//! Pure: [`plan`] decides; the caller wraps each body in an envelope (signed or not) and writes
//! it to the `commands` topic in order.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::records::{Body, Desired, DesiredState, Mode, MoveRequest, NodeMode};
use crate::runs::RunRequest;
use crate::spec::TaskKind;
use crate::topics::key;
use crate::{LogView, NodeId, TaskId, TaskSpec};

/// An operator's command on a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Define (or redefine) a task and set it running.
    Submit(Box<TaskSpec>),
    /// Desired `stopped`.
    Kill(TaskId),
    /// Desired `running`.
    Start(TaskId),
    /// Tombstones for the task's definition and desired state.
    Delete(TaskId),
    /// A run now of a periodic task, under its overlap policy.
    Run(TaskId),
    /// Desired `suspended` (periodic and one-shot tasks).
    Suspend(TaskId),
    /// Desired `running` again (periodic and one-shot tasks).
    Resume(TaskId),
}

impl Command {
    /// The task it is about.
    pub fn task(&self) -> &TaskId {
        match self {
            Command::Submit(spec) => &spec.id,
            Command::Kill(task)
            | Command::Start(task)
            | Command::Delete(task)
            | Command::Run(task)
            | Command::Suspend(task)
            | Command::Resume(task) => task,
        }
    }

    /// Its verb, as the CLI names it.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Submit(_) => "submit",
            Command::Kill(_) => "kill",
            Command::Start(_) => "start",
            Command::Delete(_) => "delete",
            Command::Run(_) => "run",
            Command::Suspend(_) => "suspend",
            Command::Resume(_) => "resume",
        }
    }
}

/// Why a command is not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No such task (CLI exit 1, HTTP 404).
    #[error("no task '{0}' in this cluster")]
    NotFound(TaskId),
    /// The command itself is wrong (CLI exit 2, HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The task's state does not allow it (CLI exit 1, HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// No such node (CLI exit 1, HTTP 404).
    #[error("no node '{0}' in this cluster (`shiva-ctl nodes` lists them)")]
    NoSuchNode(NodeId),
}

/// One record to write on `commands`: `None` is a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Its key.
    pub key: String,
    /// Its body.
    pub body: Option<Body>,
}

/// The record of `cordon` (`Mode::Cordoned`), `drain` (`Mode::Draining`, with an optional
/// deadline) or `uncordon` (`Mode::Open`) of `node`, a node the log knows (a heartbeat of it).
pub fn node_mode(
    view: &LogView,
    node: &NodeId,
    mode: Mode,
    deadline_ms: Option<i64>,
) -> Result<Write, CommandError> {
    if !view.heartbeats.contains_key(node) {
        return Err(CommandError::NoSuchNode(node.clone()));
    }
    if deadline_ms.is_some() && mode != Mode::Draining {
        return Err(CommandError::Invalid("only a drain has a deadline".into()));
    }
    let body = NodeMode { node: node.clone(), mode, deadline_ms };
    Ok(Write { key: key::mode(node), body: Some(Body::NodeMode(body)) })
}

/// How long after it is sent a move request may hold (`until_ms`), at most: an hour.
pub const MOVE_WINDOW_MS: i64 = 3_600_000;

/// The record asking the leader to move service `task` from `from` to `to` (`rebalance`), honoured until
/// `until_ms`: the task must be a defined service and `to` a node the log knows.
pub fn move_task(
    view: &LogView,
    task: &TaskId,
    from: &NodeId,
    to: &NodeId,
    until_ms: i64,
) -> Result<Write, CommandError> {
    let spec = view.specs.get(task).ok_or_else(|| CommandError::NotFound(task.clone()))?;
    if spec.spec.kind() != TaskKind::Service {
        return Err(CommandError::Invalid(format!("'{task}' is not a service: only services move")));
    }
    if !view.heartbeats.contains_key(to) {
        return Err(CommandError::NoSuchNode(to.clone()));
    }
    let body = MoveRequest { task: task.clone(), from: from.clone(), to: to.clone(), until_ms };
    Ok(Write { key: key::move_request(task), body: Some(Body::MoveRequest(body)) })
}

/// The own revision a new definition of `task` gets: one more than the one it replaces (1 for
/// a new task).
pub fn next_revision(view: &LogView, task: &TaskId) -> u64 {
    view.specs.get(task).map_or(0, |entry| entry.spec.revision).saturating_add(1)
}

/// The records `command` writes, in order, or why it is refused, judged on `view`.
pub fn plan(view: &LogView, command: &Command) -> Result<Vec<Write>, CommandError> {
    let task = command.task();
    if task.instance().is_some() && !matches!(command, Command::Submit(_)) {
        return Err(CommandError::Invalid(format!(
            "'{task}' is an instance of '{}': commands name the task, and act on all its instances",
            task.base()
        )));
    }
    let desired = |state| Write {
        key: key::desired(task),
        body: Some(Body::Desired(Desired { task: task.clone(), state })),
    };
    match command {
        Command::Submit(spec) => {
            spec.validate_new().map_err(|err| CommandError::Invalid(err.to_string()))?;
            check_after(spec, view)?;
            check_instances(spec, view)?;
            // Its own revision: one more than the definition it replaces.
            let mut spec = spec.as_ref().clone();
            spec.revision = next_revision(view, task);
            Ok(vec![
                Write { key: key::task(task), body: Some(Body::Task(spec)) },
                desired(DesiredState::Running),
            ])
        }
        Command::Kill(_) | Command::Start(_) => {
            defined(view, task)?;
            let state = if matches!(command, Command::Kill(_)) {
                DesiredState::Stopped
            } else {
                DesiredState::Running
            };
            Ok(vec![desired(state)])
        }
        Command::Delete(_) => {
            defined(view, task)?;
            Ok(vec![
                Write { key: key::task(task), body: None },
                Write { key: key::desired(task), body: None },
            ])
        }
        Command::Run(_) => {
            if scheduled_task(view, task, "run")? == TaskKind::Once {
                return Err(CommandError::Conflict(format!(
                    "{task} is a one-shot task: submit it again to run it again"
                )));
            }
            match view.desired_state(task) {
                DesiredState::Running => {}
                state => {
                    return Err(CommandError::Conflict(format!(
                        "{task} is {}: `resume` (or `start`) it first",
                        state.as_str()
                    )));
                }
            }
            let request = Uuid::new_v4();
            Ok(vec![Write {
                key: key::request(task, request),
                body: Some(Body::RunRequest(RunRequest { task: task.clone(), request })),
            }])
        }
        Command::Suspend(_) => {
            scheduled_task(view, task, "suspend")?;
            Ok(vec![desired(DesiredState::Suspended)])
        }
        Command::Resume(_) => {
            scheduled_task(view, task, "resume")?;
            Ok(vec![desired(DesiredState::Running)])
        }
    }
}

fn defined(view: &LogView, task: &TaskId) -> Result<(), CommandError> {
    if view.is_defined(task) { Ok(()) } else { Err(CommandError::NotFound(task.clone())) }
}

fn scheduled_task(view: &LogView, task: &TaskId, verb: &str) -> Result<TaskKind, CommandError> {
    if let Some(invalid) = view.invalid.get(task) {
        return Err(CommandError::Conflict(format!(
            "{task} is failed: its definition (revision {}) is invalid: {}; submit a valid one",
            invalid.revision, invalid.reason
        )));
    }
    let spec = view.specs.get(task).ok_or_else(|| CommandError::NotFound(task.clone()))?;
    match spec.spec.kind() {
        TaskKind::Service => Err(CommandError::Conflict(format!(
            "{task} is a long-running service: `{verb}` applies to periodic and one-shot tasks \
             (use kill/start for services)"
        ))),
        kind => Ok(kind),
    }
}

/// Refuses a one-shot whose `after` list would close a cycle with the cluster's tasks.
/// A task run as instances needs every node that may lead to run a build that places them:
/// a leader of an older build would run the task once, under its own id, beside its instances.
fn check_instances(spec: &TaskSpec, view: &LogView) -> Result<(), CommandError> {
    if spec.instances() == crate::spec::Instances::Single {
        return Ok(());
    }
    let members = view.members.iter().flat_map(|members| members.nodes.iter());
    let older: Vec<&str> = members
        .filter(|member| member.leader_capable && !member.has(crate::records::feature::INSTANCES))
        .map(|member| member.id.as_str())
        .collect();
    if older.is_empty() {
        return Ok(());
    }
    Err(CommandError::Conflict(format!(
        "'{}' asks for instances (count, every_node), but these nodes may lead and run an older build that would run it once instead: {}; upgrade them first",
        spec.id,
        older.join(", ")
    )))
}

fn check_after(spec: &TaskSpec, view: &LogView) -> Result<(), CommandError> {
    if let Some(instance) = spec.after.iter().find(|task| task.instance().is_some()) {
        return Err(CommandError::Invalid(format!(
            "invalid task spec: field 'after': '{instance}' is an instance; a one-shot waits for tasks"
        )));
    }
    if spec.after.is_empty() {
        return Ok(());
    }
    let mut edges: BTreeMap<TaskId, Vec<TaskId>> =
        view.specs.iter().map(|(id, entry)| (id.clone(), entry.spec.after.clone())).collect();
    edges.insert(spec.id.clone(), spec.after.clone());
    match crate::dag::find_cycle(&edges) {
        Some(cycle) if cycle.contains(&spec.id) => {
            let path: Vec<&str> = cycle.iter().map(TaskId::as_str).collect();
            Err(CommandError::Invalid(format!(
                "invalid task spec: field 'after': it would form a cycle {}",
                path.join(" → ")
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TopicKind;

    fn view_with(specs: &[TaskSpec]) -> LogView {
        let mut view = LogView::default();
        for (offset, spec) in specs.iter().enumerate() {
            let value = crate::Envelope::now("t", None, Body::Task(spec.clone())).encode();
            let key = key::task(&spec.id);
            view.apply_guarded(TopicKind::Commands, offset as i64, Some(key.as_bytes()), Some(&value));
        }
        view
    }

    fn id(text: &str) -> TaskId {
        TaskId::new(text).unwrap()
    }

    #[test]
    fn commands_on_unknown_tasks_are_not_found_and_verbs_that_do_not_apply_conflict() {
        let service = TaskSpec::new(id("svc"), "sleep", vec!["9".into()]);
        let mut cron = TaskSpec::new(id("cron"), "true", vec![]);
        cron.schedule = vec!["* * * * *".into()];
        let view = view_with(&[service.clone(), cron]);
        assert_eq!(plan(&view, &Command::Kill(id("nope"))), Err(CommandError::NotFound(id("nope"))));
        assert!(matches!(plan(&view, &Command::Run(id("svc"))), Err(CommandError::Conflict(_))));
        assert!(matches!(plan(&view, &Command::Suspend(id("svc"))), Err(CommandError::Conflict(_))));
        let writes = plan(&view, &Command::Run(id("cron"))).unwrap();
        assert!(writes[0].key.starts_with("request/cron/"), "{writes:?}");
        let writes = plan(&view, &Command::Delete(id("svc"))).unwrap();
        assert_eq!(writes.iter().map(|w| w.body.is_none()).collect::<Vec<_>>(), [true, true]);
        let writes = plan(&view, &Command::Submit(Box::new(service))).unwrap();
        assert_eq!(writes.len(), 2);
        assert!(matches!(writes[1].body, Some(Body::Desired(Desired { state: DesiredState::Running, .. }))));
    }

    #[test]
    fn instances_are_refused_while_a_node_that_may_lead_runs_an_older_build_and_never_named() {
        let mut web = TaskSpec::new(id("web"), "sleep", vec!["9".into()]);
        web.count = Some(2);
        let member = |name: &str, features: &[&str]| crate::records::Member {
            id: crate::NodeId::new(name).unwrap(),
            incarnation: uuid::Uuid::nil(),
            hostname: name.into(),
            tags: vec![],
            runner: true,
            leader_capable: true,
            returns: 0,
            features: features.iter().map(|f| (*f).to_owned()).collect(),
        };
        let mut view = view_with(&[]);
        view.members = Some(crate::records::Members {
            epoch: 1,
            nodes: vec![member("new", crate::records::feature::ALL), member("old", &[])],
            conflicts: vec![],
            authorized_keys: None,
        });
        let refused = plan(&view, &Command::Submit(Box::new(web.clone()))).unwrap_err();
        assert!(matches!(&refused, CommandError::Conflict(why) if why.contains("old")), "{refused:?}");
        view.members.as_mut().unwrap().nodes[1].leader_capable = false;
        plan(&view, &Command::Submit(Box::new(web.clone()))).unwrap();
        // A command names the task; a one-shot waits for tasks, not instances.
        let refused = plan(&view, &Command::Kill(id("web@1"))).unwrap_err();
        assert!(matches!(&refused, CommandError::Invalid(why) if why.contains("instance of 'web'")));
        let mut once = TaskSpec::new(id("job"), "true", vec![]);
        once.once = true;
        once.after = vec![id("web@0")];
        assert!(matches!(plan(&view, &Command::Submit(Box::new(once))), Err(CommandError::Invalid(_))));
    }

    #[test]
    fn a_submit_closing_a_cycle_is_invalid() {
        let mut a = TaskSpec::new(id("a"), "true", vec![]);
        a.once = true;
        a.after = vec![id("b")];
        let mut b = TaskSpec::new(id("b"), "true", vec![]);
        b.once = true;
        b.after = vec![id("a")];
        let view = view_with(&[a]);
        let refused = plan(&view, &Command::Submit(Box::new(b)));
        assert!(
            matches!(&refused, Err(CommandError::Invalid(message)) if message.contains("cycle")),
            "{refused:?}"
        );
    }
}
