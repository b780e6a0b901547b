//! The driver's side of the HTTP API (see `crate::api`): publishes snapshots of the view,
//! answers the server's requests from the view, queues the commands it plans, and keeps the
//! metrics that the cluster's records and this node's own work move.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shiva_proto::runs::{RunPhase, RunReport, Trigger};
use shiva_proto::{Envelope, TaskId, TopicKind};
use tokio::sync::watch;
use tracing::info;

use super::driver::Node;
use crate::api::snapshot::{ClusterInfo, PUBLISH_EVERY, Rebuild, Snapshot};
use crate::api::{Metrics, Planned, Refusal, Request};

/// A snapshot whose only change is heartbeats is published at most this often.
const HEARTBEATS_EVERY: Duration = Duration::from_secs(1);

/// The API's part of a node.
pub(crate) struct Api {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) snapshots: watch::Sender<Arc<Snapshot>>,
    /// When the last snapshot was published, and what it was taken of.
    published: Option<(Instant, Marks)>,
    /// When a snapshot is due (a change came sooner than [`PUBLISH_EVERY`] after the last).
    pub(crate) wake: Option<Duration>,
    /// Per task, the spec revision whose first start was measured (`submit → start`).
    started: BTreeMap<TaskId, i64>,
    /// When this node became ready (wall clock, ms): specs submitted before are not measured.
    pub(crate) ready_at_ms: Option<i64>,
    /// The label values of the per-task series, to drop once their task is gone.
    run_labels: std::collections::BTreeSet<(TaskId, &'static str)>,
    restart_labels: std::collections::BTreeSet<TaskId>,
    /// The `state` labels of `shiva_tasks` set last.
    state_labels: std::collections::BTreeSet<&'static str>,
}

/// What a snapshot is taken of: when none of it moved, the view did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marks {
    /// The positions of the topics the task rows read.
    tasks: [i64; 3],
    /// The positions of the topics the node rows read.
    nodes: [i64; 2],
    ready: bool,
    leading: Option<u64>,
    fenced: bool,
}

impl Api {
    pub(crate) fn new(metrics: Arc<Metrics>, snapshots: watch::Sender<Arc<Snapshot>>) -> Api {
        Api {
            metrics,
            snapshots,
            published: None,
            wake: None,
            started: BTreeMap::new(),
            ready_at_ms: None,
            run_labels: Default::default(),
            restart_labels: Default::default(),
            state_labels: Default::default(),
        }
    }
}

impl Node {
    fn marks(&self) -> Marks {
        let at = |topic| self.view.positions.get(&topic).copied().unwrap_or(0);
        Marks {
            tasks: [at(TopicKind::Commands), at(TopicKind::Assignments), at(TopicKind::Status)],
            nodes: [at(TopicKind::Control), at(TopicKind::Assignments)],
            ready: self.ready,
            leading: self.leadership.leading,
            fenced: !self.fence.is_open(),
        }
    }

    /// Publishes a snapshot when the view changed and the last one is old enough; else says
    /// when to come back.
    pub(crate) fn publish(&mut self) {
        self.api.wake = None;
        // Without the server nothing reads snapshots (nor the series they set).
        if !self.ready || self.config.http.is_none() {
            return;
        }
        let marks = self.marks();
        let now = Instant::now();
        if let Some((at, published)) = &self.api.published {
            if *published == marks {
                return;
            }
            // Heartbeats alone (the control topic moved, nothing else) change only the nodes'
            // load and memory: those are published every second, the rest at once.
            let heartbeats_only =
                Marks { nodes: [marks.nodes[0], published.nodes[1]], ..published.clone() } == marks;
            let every = if heartbeats_only { HEARTBEATS_EVERY } else { PUBLISH_EVERY };
            let since = now.saturating_duration_since(*at);
            if since < every {
                self.api.wake = Some(every - since);
                return;
            }
        }
        let rebuild = match &self.api.published {
            Some((_, published)) => {
                Rebuild { tasks: published.tasks != marks.tasks, nodes: published.nodes != marks.nodes }
            }
            None => Rebuild { tasks: true, nodes: true },
        };
        let cluster = ClusterInfo {
            cluster: self.config.bus.topics.cluster().to_owned(),
            node: self.config.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: shiva_proto::protocol(),
            ready: self.ready,
            leading: self.leadership.leading.is_some(),
            fenced: marks.fenced,
            stopping: false,
            epoch: self.view.epochs.newest,
            leader: self.view.leader().map(|(_, winner)| winner.node.clone()),
            commands: if self.signed_cluster() { "signed" } else { "open" },
        };
        tracing::trace!(tasks = rebuild.tasks, nodes = rebuild.nodes, "snapshot");
        let previous = self.api.snapshots.borrow().clone();
        let snapshot = Snapshot::build(&previous, cluster, &self.view, rebuild);
        let metrics = &self.api.metrics;
        let tasks_changed = !Arc::ptr_eq(&snapshot.tasks, &previous.tasks);
        if tasks_changed {
            // Set in place (a scrape never sees the series missing), the states gone removed.
            let mut states: BTreeMap<&'static str, i64> = BTreeMap::new();
            for row in snapshot.tasks.rows.values() {
                *states.entry(row.state).or_default() += 1;
            }
            for gone in self.api.state_labels.iter().filter(|state| !states.contains_key(*state)) {
                let _ = metrics.tasks.remove_label_values(&[gone]);
            }
            for (state, count) in &states {
                metrics.tasks.with_label_values(&[state]).set(*count);
            }
            self.api.state_labels = states.into_keys().collect();
        }
        let alive = snapshot.nodes.rows.values().filter(|row| row.alive).count();
        metrics.nodes.with_label_values(&["true"]).set(i64::try_from(alive).unwrap_or(i64::MAX));
        let gone = snapshot.nodes.rows.len() - alive;
        metrics.nodes.with_label_values(&["false"]).set(i64::try_from(gone).unwrap_or(i64::MAX));
        metrics.ready.set(1);
        metrics.leader.set(i64::from(self.leadership.leading.is_some()));
        metrics.epoch.set(i64::try_from(self.view.epochs.newest).unwrap_or(i64::MAX));
        metrics.fenced.set(i64::from(marks.fenced));
        let shims = self.supervisor.as_ref().map_or(0, |supervisor| supervisor.active().count())
            + self.runs.controls.len();
        metrics.shims.set(i64::try_from(shims).unwrap_or(i64::MAX));
        self.api.snapshots.send_replace(Arc::new(snapshot));
        self.api.published = Some((now, marks));
        if tasks_changed {
            self.forget_gone_tasks();
        }
    }

    /// The node is leaving: `/readyz` says so from now on (a load balancer stops sending), the
    /// rest is served as last published.
    pub(crate) fn publish_stopping(&mut self) {
        let previous = self.api.snapshots.borrow().clone();
        let Some(mut cluster) = previous.cluster.clone() else { return };
        cluster.stopping = true;
        self.api.metrics.ready.set(0);
        self.api.snapshots.send_replace(Arc::new(Snapshot {
            seq: previous.seq + 1,
            cluster: Some(cluster),
            tasks: previous.tasks.clone(),
            nodes: previous.nodes.clone(),
            commands_read: previous.commands_read,
        }));
    }

    /// Answers a request of the HTTP server from the view.
    pub(crate) fn on_api_request(&mut self, request: Request) {
        match request {
            Request::Task { task, reply } => {
                let _ = reply.send(self.task_detail(&task));
            }
            Request::Runs { task, limit, reply } => {
                let known = self.view.is_defined(&task) || self.view.runs.contains_key(&task);
                let rows = known.then(|| shiva_proto::rows::history_rows(&self.view, &task, limit));
                let _ = reply.send(rows);
            }
            Request::Command { command, by, reply } => {
                self.pace.touch();
                // The caller gave up (it was answered 503): a command it was told failed is
                // not written later.
                if reply.is_closed() {
                    return;
                }
                // This node's keys, or the leader's (a node started without them in a signed
                // cluster): records the nodes would refuse are not written.
                if self.signed_cluster() {
                    let _ = reply.send(Err(Refusal::Signed));
                    return;
                }
                let existed = self.view.specs.contains_key(command.task());
                let planned = shiva_proto::commands::plan(&self.view, &command)
                    .map_err(Refusal::Command)
                    .map(|writes| {
                        let revision = writes.iter().find_map(|write| match &write.body {
                            Some(shiva_proto::Body::Task(spec)) => Some(spec.revision),
                            _ => None,
                        });
                        let sender = format!("api:{by}@{}", self.config.node_id);
                        let writes = writes
                            .into_iter()
                            .map(|write| {
                                let value =
                                    write.body.map(|body| Envelope::now(sender.clone(), None, body).encode());
                                let delivery = self.outbox.writes.enqueue(
                                    TopicKind::Commands,
                                    &write.key,
                                    value.as_deref(),
                                );
                                (write.key, delivery)
                            })
                            .collect();
                        Planned { existed, revision, writes }
                    });
                if planned.is_ok() {
                    info!(command = command.verb(), task = %command.task(), %by, "command from the HTTP API");
                }
                let _ = reply.send(planned);
            }
        }
    }

    /// Whether the cluster takes signed commands only: this node's `--authorized-keys`, or the
    /// keys the leader publishes.
    fn signed_cluster(&self) -> bool {
        self.config.authorized_keys.is_some()
            || self.view.members.as_ref().is_some_and(|members| members.authorized_keys.is_some())
    }

    /// A task as `status --json` shows it, with its spec's revision.
    fn task_detail(&self, task: &TaskId) -> Option<serde_json::Value> {
        let mut value = shiva_proto::rows::task_detail(&self.view, task, chrono::Utc::now())?;
        if let Some(entry) = self.view.spec_of(task) {
            value["revision"] = entry.spec.revision.into();
            value["offset"] = entry.revision.into();
        }
        Some(value)
    }

    /// A task of this node started (a service's job or a run): the first start here of its
    /// spec revision is measured from the spec's submission, for a spec submitted while this node
    /// was up (a node started later would measure its own start-up) and still the task's newest.
    pub(crate) fn observe_start(&mut self, task: &TaskId) {
        let Some(entry) = self.view.spec_of(task) else { return };
        let current =
            self.view.assignments.get(task).is_some_and(|a| a.assignment.spec_revision == entry.revision);
        let submitted_while_up = self.api.ready_at_ms.is_some_and(|ready| entry.submitted_ms >= ready);
        if !current || !submitted_while_up || self.api.started.get(task) == Some(&entry.revision) {
            return;
        }
        self.api.started.insert(task.clone(), entry.revision);
        let waited = shiva_proto::wall::now_ms().saturating_sub(entry.submitted_ms);
        Metrics::observe_ms(&self.api.metrics.submit_to_start, waited);
    }

    /// A run of this node started: a slot's first attempt measures the slot's lateness, a
    /// one-shot's start its submission's wait.
    pub(crate) fn observe_run(&mut self, report: &RunReport) {
        if report.state != RunPhase::Running {
            return;
        }
        if let (Trigger::Slot { slot_ms }, Some(started), 1) =
            (report.trigger, report.started_ms, report.attempt)
        {
            Metrics::observe_ms(&self.api.metrics.cron_lateness, started.saturating_sub(slot_ms));
        }
        if matches!(report.trigger, Trigger::Once { .. }) {
            self.observe_start(&report.task);
        }
    }

    /// A run of this node ended, or was written ended without a launch (lost, stopped,
    /// missed, skipped).
    pub(crate) fn count_run(&mut self, report: &RunReport) {
        let outcome = report.state.as_str();
        self.api.metrics.runs.with_label_values(&[report.task.as_str(), outcome]).inc();
        self.api.run_labels.insert((report.task.clone(), outcome));
    }

    /// Drops the per-task series (and memory) of tasks no longer defined: a cluster whose
    /// task ids come and go does not grow them for ever.
    fn forget_gone_tasks(&mut self) {
        let view = &self.view;
        let metrics = &self.api.metrics;
        self.api.run_labels.retain(|(task, outcome)| {
            let keep = view.is_defined(task);
            if !keep {
                let _ = metrics.runs.remove_label_values(&[task.as_str(), outcome]);
            }
            keep
        });
        self.api.restart_labels.retain(|task| {
            let keep = view.is_defined(task);
            if !keep {
                let _ = metrics.restarts.remove_label_values(&[task.as_str()]);
            }
            keep
        });
        self.api.started.retain(|task, _| view.is_defined(task));
    }

    /// A status of this node's service: counts its restarts and its first start.
    pub(crate) fn observe_status(&mut self, status: &shiva_proto::records::TaskStatus) {
        let previous = self.own.latest.get(&status.task);
        if let Some(previous) = previous
            && previous.generation == status.generation
            && status.restarts > previous.restarts
        {
            let more = u64::from(status.restarts - previous.restarts);
            self.api.metrics.restarts.with_label_values(&[status.task.as_str()]).inc_by(more);
            self.api.restart_labels.insert(status.task.clone());
        }
        if status.state == shiva_proto::records::RunState::Running {
            self.observe_start(&status.task);
        }
    }
}
