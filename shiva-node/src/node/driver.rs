//! The driver: folds bus records into the view and membership, runs the pure decisions after
//! every batch of events, and writes what they decide. All state lives in [`Node`], owned by
//! one task, so no lock is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shiva_bus::{BusError, Publisher, Reader, ReaderEvent, Record};
use shiva_proto::records::{Body, Claim, Envelope, Placement, RunState, TaskStatus};
use shiva_proto::runs::RunReport;
use shiva_proto::topics::key;
use shiva_proto::view::Outcome;
use shiva_proto::{LogView, NodeId, TaskId, TopicKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::fence::FenceChange;
use super::heartbeat::{Gate, GateDecision, Identity, ResourceProbe, build};
use crate::clock::Boot;
use crate::config::NodeConfig;
use crate::election::{Election, Timeouts, Verdict};
use crate::firing::Timing;
use crate::leader::{Inputs, reconcile};
use crate::membership::Membership;
use crate::scheduler;
use crate::supervisor::Supervisor;

/// Why a record was written, so its delivery result can be acted on.
#[derive(Debug, Clone)]
pub(crate) enum Purpose {
    Heartbeat(u64),
    Claim(u64),
    Leader,
    Status(TaskId),
    /// A run's start record, written before it is confirmed and launched.
    RunStart(Uuid),
    /// A run's record (written again if its delivery fails).
    RunReport(Box<RunReport>),
}

/// The outcome of one write.
#[derive(Debug)]
pub(crate) struct WriteResult {
    topic: TopicKind,
    key: String,
    purpose: Purpose,
    result: Result<i64, BusError>,
    /// When it was queued.
    queued: Instant,
}

impl WriteResult {
    /// A heartbeat delivered: it changes no decision's input (the leader writes no heartbeat key,
    /// and the read-back is what renews the lease).
    pub(crate) fn is_quiet(&self) -> bool {
        matches!(self.purpose, Purpose::Heartbeat(_)) && self.result.is_ok()
    }
}

/// A node: the parts below, each with one job, driven by one task (no lock needed).
pub(crate) struct Node {
    pub(crate) config: NodeConfig,
    pub(crate) identity: Identity,
    pub(crate) view: LogView,
    pub(crate) membership: Membership,
    pub(crate) election: Election,
    pub(crate) supervisor: Option<Supervisor>,
    pub(crate) reader: Reader,
    /// What this node writes, and which of it is not read back yet.
    pub(crate) outbox: Outbox,
    /// This node's own status records.
    pub(crate) own: OwnStatus,
    /// The leader's part.
    pub(crate) leadership: Leadership,
    /// The runner's runs of periodic and one-shot tasks.
    pub(crate) runs: Runs,
    pub(crate) gate: Gate,
    /// Peers' clocks as seen through their heartbeats (display only).
    pub(crate) clock_samples: super::heartbeat::ClockSamples,
    pub(crate) resources: ResourceProbe,
    pub(crate) next_token: u64,
    /// Initial read done and node id checked: heartbeats, claims and runs may start.
    pub(crate) ready: bool,
    /// The initial read is done and this node's id is being checked.
    pub(crate) probing: bool,
    /// Another incarnation heartbeating with this node's id, seen after the initial read.
    pub(crate) impostor: Option<Uuid>,
    pub(crate) last_reader_error: Option<(String, Instant)>,
    /// When the node's lease runs out while it is open (`None`: fenced); the run shims' leases
    /// are renewed up to it.
    pub(crate) lease: tokio::sync::watch::Sender<Option<Boot>>,
    /// Self-fencing.
    pub(crate) fence: super::fence::Fence,
    /// Task output shipping (flushed on the way out).
    pub(crate) shipper: Option<std::sync::Arc<crate::logship::LogShipper>>,
    /// This node's age identity and the secrets it knows.
    pub(crate) secrets: std::sync::Arc<crate::secrets::SecretStore>,
    /// Secrets the leader could not re-encrypt, already logged.
    pub(crate) stuck_secrets: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The HTTP API's snapshots, requests and metrics.
    pub(crate) api: super::api::Api,
    /// When a step walks every task (see `pace`).
    pub(crate) pace: super::pace::Pace,
}

/// What this node writes: two ordered producers (heartbeats apart, so a burst of other writes
/// never delays them), where each outcome is reported, and per key the writes not yet
/// acknowledged or not yet read back (a key with either is *busy*: left alone until then).
pub(crate) struct Outbox {
    pub(crate) writes: Arc<Publisher>,
    pub(crate) heartbeats: Arc<Publisher>,
    pub(crate) results: mpsc::UnboundedSender<WriteResult>,
    /// Writes not yet acknowledged, per key.
    pub(crate) unacked: BTreeMap<(TopicKind, String), u32>,
    /// Acknowledged offsets not yet read back, per key.
    pub(crate) unread: BTreeMap<(TopicKind, String), i64>,
}

impl Outbox {
    pub(crate) fn new(
        writes: Arc<Publisher>,
        heartbeats: Arc<Publisher>,
        results: mpsc::UnboundedSender<WriteResult>,
    ) -> Outbox {
        Outbox { writes, heartbeats, results, unacked: BTreeMap::new(), unread: BTreeMap::new() }
    }

    /// Whether a write of `key` is in flight or not read back yet.
    pub(crate) fn busy(&self, topic: TopicKind, key: &str) -> bool {
        let entry = (topic, key.to_owned());
        self.unacked.contains_key(&entry) || self.unread.contains_key(&entry)
    }

    /// Whether a write of a launch intent of `task` is in flight or not read back yet.
    pub(crate) fn runs_busy(&self, task: &TaskId) -> bool {
        any_run_of(&self.unacked, task) || any_run_of(&self.unread, task)
    }

    /// Whether a write of `key` is in flight (not acknowledged yet).
    pub(crate) fn in_flight(&self, topic: TopicKind, key: &str) -> bool {
        self.unacked.contains_key(&(topic, key.to_owned()))
    }
}

/// Whether `map` has a launch intent key of `task` (`run/<task>/<uuid>` on `assignments`; a
/// longer task id `<task>/…` shares the prefix and does not count).
fn any_run_of<V>(map: &BTreeMap<(TopicKind, String), V>, task: &TaskId) -> bool {
    key::has_run_of(map, TopicKind::Assignments, task)
}

#[cfg(test)]
#[test]
fn a_task_has_a_run_busy_only_with_an_intent_key_of_its_own() {
    let run = |task: &str| key::run(&TaskId::new(task).unwrap(), uuid::Uuid::from_u128(1));
    let map: BTreeMap<(TopicKind, String), ()> = [
        ((TopicKind::Assignments, run("a")), ()),
        ((TopicKind::Status, run("b")), ()),
        ((TopicKind::Assignments, run("etl/x")), ()),
        ((TopicKind::Assignments, key::sched(&TaskId::new("c").unwrap())), ()),
    ]
    .into();
    let busy = |task: &str| any_run_of(&map, &TaskId::new(task).unwrap());
    assert!(busy("a"));
    assert!(!busy("b"), "a run record of another topic");
    assert!(!busy("etl"), "a longer task id's intent");
    assert!(busy("etl/x"));
    assert!(!busy("c"), "its position is not one of its intents");
}

/// This node's own status of each task: the newest one written (what a failed write is
/// retried with) and the offset of its newest acknowledged write (to tell when another record
/// landed after it).
#[derive(Debug, Default)]
pub(crate) struct OwnStatus {
    pub(crate) latest: BTreeMap<TaskId, TaskStatus>,
    pub(crate) offsets: BTreeMap<TaskId, i64>,
    /// The newest report written of each run of this node, until a final one landed.
    pub(crate) reports: BTreeMap<uuid::Uuid, shiva_proto::runs::RunReport>,
}

impl OwnStatus {
    /// `report` is being written: it is now its run's newest.
    pub(crate) fn report_written(&mut self, report: &shiva_proto::runs::RunReport) {
        self.reports.insert(report.run_id, report.clone());
    }

    /// A write of `report` failed: whether to write it again. Only while it is still its run's
    /// newest report: an older one written again could land after a newer one (a `running`
    /// after the run's `succeeded`) and reopen the run for every reader.
    pub(crate) fn retry_report(&self, report: &shiva_proto::runs::RunReport) -> bool {
        self.reports.get(&report.run_id) == Some(report)
    }

    /// `report` landed: a final one that is still its run's newest ends the run's entry.
    pub(crate) fn report_landed(&mut self, report: &shiva_proto::runs::RunReport) {
        if report.state.is_final() && self.reports.get(&report.run_id) == Some(report) {
            self.reports.remove(&report.run_id);
        }
    }

    /// A write of `task`'s status failed: the status to write again, the newest one, unless a
    /// newer write of it is still in flight (its outcome decides). A status must land: the
    /// leader moves and hands off tasks on it.
    pub(crate) fn retry_after_failure(&self, task: &TaskId, newer_in_flight: bool) -> Option<TaskStatus> {
        (!newer_in_flight).then(|| self.latest.get(task).cloned()).flatten()
    }
}

/// The leader's part: the epoch it leads (once it read the log to its end), the reads to the
/// end it waits for (to lead, to learn a claim's outcome), its parsed schedules and the tasks
/// it failed because the bus refused a record about them.
#[derive(Default)]
pub(crate) struct Leadership {
    pub(crate) leading: Option<u64>,
    pub(crate) leader_sync: Option<(u64, u64)>,
    pub(crate) claim_check: Option<(u64, u64)>,
    /// The leader's parsed schedules.
    pub(crate) schedules: scheduler::Schedules,
    /// Tasks a record of which the bus refused for good (too large), by spec revision, with the
    /// reason: the leader fails them instead of writing the record again and again.
    pub(crate) unwritable: BTreeMap<TaskId, (i64, String)>,
    /// Run reports at `status` offsets below this were read before a read of every topic to its
    /// end that has completed since (see `scheduler::Context::reports_synced_below`).
    pub(crate) reports_synced_below: i64,
    /// Launch intents at `assignments` offsets below this were read before a read of every
    /// topic to its end that has completed since (see
    /// `scheduler::Context::intents_synced_below`).
    pub(crate) intents_synced_below: i64,
    /// A read to the end asked for either: its token and the `status` and `assignments`
    /// positions when asked.
    pub(crate) report_sync: Option<(u64, i64, i64)>,
    /// Whether the last plan batched trimming (said in the log when it changes; a cell: plans
    /// read the node).
    pub(crate) batched_trim: std::cell::Cell<Option<bool>>,
    /// Whether the last plan wrote intents on seats (as `batched_trim`).
    pub(crate) run_seats: std::cell::Cell<Option<bool>>,
    /// Tasks a write of whose launch intents was reported failed, with the read to the end
    /// asked for after it: not planned until it completes. The write may have landed, on a
    /// seat a plan made without it would give another run (see `scheduler::Context::runs_busy`).
    /// (`None`: every task, after a `trim` record.)
    pub(crate) unsure_runs: BTreeMap<Option<TaskId>, u64>,
}

/// The runner's runs of periodic and one-shot tasks (see `runs.rs`): the pure book, and the
/// stop channels of the launched ones.
pub(crate) struct Runs {
    pub(crate) book: crate::runner::runs::RunBook,
    pub(crate) controls: BTreeMap<Uuid, mpsc::UnboundedSender<crate::supervisor::oneshot::RunControl>>,
    /// Where launched runs report.
    pub(crate) run_reports: mpsc::UnboundedSender<RunReport>,
    /// When the next start record is due.
    pub(crate) run_wake: Option<Duration>,
    /// Periodic and one-shot runs taken back from this node's earlier process, until the book
    /// takes each on (its intent still names this node) or it is stopped.
    pub(crate) adopted: BTreeMap<Uuid, crate::supervisor::shim::Adopted>,
    /// The runs this node's previous process launched, by its journal (`None`: unknown, so
    /// any of its start records may have been launched).
    pub(crate) launched_before: Option<std::collections::BTreeSet<Uuid>>,
    /// When the journal was last pruned.
    pub(crate) journal_pruned: Option<std::time::Instant>,
}

impl Runs {
    pub(crate) fn new(run_reports: mpsc::UnboundedSender<RunReport>) -> Runs {
        Runs {
            book: Default::default(),
            controls: BTreeMap::new(),
            run_reports,
            run_wake: None,
            adopted: BTreeMap::new(),
            launched_before: None,
            journal_pruned: None,
        }
    }
}

/// The scheduler's timing: intents are written a second ahead of their slot; a slot more than
/// 2 s late counts as missed (its catch-up policy applies).
/// Added to a silent node's fence timeout and a task's stop grace before an exclusive task of
/// that node moves: covers clock rates and the time the node takes to act.
pub(crate) const FENCE_MARGIN: Duration = Duration::from_secs(1);

pub(crate) const TIMING: Timing =
    Timing { lookahead: Duration::from_secs(1), tolerance: Duration::from_secs(2) };

impl Node {
    /// Whether the leader may batch trimming (see `feature::batched_trim`), and write intents on
    /// seats (see `feature::run_seats`); says in the log when either changes as it leads (see
    /// [`Node::gate`]).
    fn trim_features(&self, live: &[shiva_proto::records::Member]) -> (bool, bool) {
        use shiva_proto::records::feature;
        let heartbeats = || self.view.heartbeats.values().map(|entry| &entry.heartbeat);
        let batched = feature::batched_trim(live, heartbeats());
        let seats = feature::run_seats(live, heartbeats());
        let batched = self.gate(&self.leadership.batched_trim, feature::BATCHED_TRIM, batched, live);
        let seats = self.gate(&self.leadership.run_seats, feature::RUN_SEATS, seats, live);
        (batched, seats)
    }

    /// `on`, for a feature every node must have (`feature`, and `batched_trim`, which the others
    /// build on); says in the log when it changes as the node leads (`cell`), with the nodes
    /// that keep it off: live, or with a heartbeat in the log (not retired yet), without it (a
    /// node left on an older build).
    fn gate(
        &self,
        cell: &std::cell::Cell<Option<bool>>,
        feature: &str,
        on: bool,
        live: &[shiva_proto::records::Member],
    ) -> bool {
        use shiva_proto::records::feature::BATCHED_TRIM;
        if cell.replace(Some(on)) == Some(on) {
            return on;
        }
        if on {
            info!(feature, "feature on: every node has it");
            return on;
        }
        let lacks = |features: &mut dyn Iterator<Item = &str>| {
            let listed: Vec<&str> = features.collect();
            !listed.contains(&feature) || !listed.contains(&BATCHED_TRIM)
        };
        let lacking: BTreeSet<&str> = (self.view.heartbeats.iter())
            .filter(|(_, entry)| lacks(&mut entry.heartbeat.features.iter().map(String::as_str)))
            .map(|(node, _)| node.as_str())
            .chain(
                live.iter()
                    .filter(|member| lacks(&mut member.features.iter().map(String::as_str)))
                    .map(|member| member.id.as_str()),
            )
            .collect();
        if lacking.is_empty() {
            info!(feature, "feature off: no live node");
        } else {
            let nodes = Vec::from_iter(lacking).join(",");
            info!(feature, %nodes, "feature off: these nodes do not list it");
        }
        on
    }

    pub(crate) fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    pub(crate) fn envelope(&self, body: Body) -> Vec<u8> {
        Envelope::now(self.config.node_id.to_string(), Some(self.config.incarnation), body).encode()
    }

    /// Queues a write (in call order) and reports its outcome on the results channel.
    pub(crate) fn send(&mut self, topic: TopicKind, key: String, body: Option<Body>, purpose: Purpose) {
        let value = body.map(|body| self.envelope(body));
        self.send_value(topic, key, value, purpose);
    }

    /// Writes `value` as it is (a tombstone when `None`).
    fn send_value(&mut self, topic: TopicKind, key: String, value: Option<Vec<u8>>, purpose: Purpose) {
        let publisher = if matches!(purpose, Purpose::Heartbeat(_)) {
            &self.outbox.heartbeats
        } else {
            &self.outbox.writes
        };
        let delivery = publisher.enqueue(topic, &key, value.as_deref());
        *self.outbox.unacked.entry((topic, key.clone())).or_default() += 1;
        let results = self.outbox.results.clone();
        let queued = Instant::now();
        tokio::spawn(async move {
            let result = delivery.await;
            let _ = results.send(WriteResult { topic, key, purpose, result, queued });
        });
    }

    fn busy(&self, topic: TopicKind, key: &str) -> bool {
        self.outbox.busy(topic, key)
    }

    /// Handles a reader event; returns the token of a completed read-to-end. An error is fatal:
    /// the log went backwards.
    pub(crate) fn on_reader_event(&mut self, event: ReaderEvent) -> anyhow::Result<Option<u64>> {
        if !matches!(event, ReaderEvent::Record(_)) {
            self.pace.touch();
        }
        match event {
            ReaderEvent::Record(record) => self.on_record(record),
            ReaderEvent::Synced(token) => {
                if let Some((_, status, assignments)) =
                    self.leadership.report_sync.filter(|(t, _, _)| *t == token)
                {
                    self.leadership.reports_synced_below = self.leadership.reports_synced_below.max(status);
                    self.leadership.intents_synced_below =
                        self.leadership.intents_synced_below.max(assignments);
                    self.leadership.report_sync = None;
                }
                self.leadership.unsure_runs.retain(|_, t| *t != token);
                if let Some((epoch, _)) = self.leadership.leader_sync.filter(|(_, t)| *t == token) {
                    info!(epoch, "read the log to its end; leading");
                    self.leadership.schedules.forget_panics();
                    self.leadership.leading = Some(epoch);
                    self.leadership.batched_trim.set(None);
                    self.leadership.run_seats.set(None);
                    self.leadership.leader_sync = None;
                }
                if let Some((epoch, _)) = self.leadership.claim_check.filter(|(_, t)| *t == token) {
                    self.election.claim_failed(epoch);
                    self.leadership.claim_check = None;
                }
                if self.fence.on_synced(token) == FenceChange::Opened {
                    info!(
                        "this node reads itself on the bus again and has read the log to its end; running tasks"
                    );
                }
                self.on_runs_synced(token);
                return Ok(Some(token));
            }
            ReaderEvent::Regressed { topic, position, end } => {
                let message = ReaderEvent::regressed_message(&topic, position, end);
                error!(%topic, position, end, "{message}");
                anyhow::bail!(message);
            }
            ReaderEvent::SyncFailed(token, message) => {
                warn!(token, %message, "failed to read the log to its end");
                self.fence.on_sync_failed(token);
                self.on_runs_sync_failed(token);
                if self.leadership.leader_sync.is_some_and(|(_, t)| t == token) {
                    self.leadership.leader_sync = None;
                }
                if self.leadership.report_sync.is_some_and(|(t, _, _)| t == token) {
                    self.leadership.report_sync = None;
                }
                if self.leadership.unsure_runs.values().any(|t| *t == token) {
                    let retry = self.token();
                    self.leadership
                        .unsure_runs
                        .values_mut()
                        .filter(|t| **t == token)
                        .for_each(|t| *t = retry);
                    self.reader.sync(retry);
                }
                if let Some((epoch, _)) = self.leadership.claim_check.filter(|(_, t)| *t == token) {
                    let retry = self.token();
                    self.leadership.claim_check = Some((epoch, retry));
                    self.reader.sync(retry);
                }
            }
            ReaderEvent::Error(message) => {
                let repeat = self
                    .last_reader_error
                    .as_ref()
                    .is_some_and(|(last, at)| *last == message && at.elapsed() < Duration::from_secs(10));
                if !repeat {
                    warn!(%message, bus = %self.config.bus.brokers, "bus client error");
                    self.last_reader_error = Some((message, Instant::now()));
                }
            }
        }
        Ok(None)
    }

    fn on_record(&mut self, record: Record) {
        let Record { topic, offset, key, value, timestamp_ms } = record;
        if self.ready
            && let Some(created) = timestamp_ms
        {
            let delay = shiva_proto::wall::now_ms().saturating_sub(created);
            crate::api::Metrics::observe_ms(&self.api.metrics.fetch_latency, delay);
        }
        // A heartbeat that changes nothing but its counters leaves the walks as they were
        // (see `pace`); any other record may change what they decide.
        let heartbeat_node = (topic == TopicKind::Control)
            .then(|| key.as_deref().and_then(|key| std::str::from_utf8(key).ok()?.strip_prefix("node/")))
            .flatten()
            .and_then(|node| NodeId::new(node).ok());
        let before = heartbeat_node
            .as_ref()
            .and_then(|node| self.view.heartbeats.get(node))
            .map(|entry| (entry.incarnation, entry.heartbeat.clone()));
        // No record may take the node down: a panic while folding one skips it.
        let outcome = self.view.apply_guarded(topic, offset, key.as_deref(), value.as_deref());
        let after = heartbeat_node
            .as_ref()
            .and_then(|node| self.view.heartbeats.get(node))
            .map(|entry| (entry.incarnation, &entry.heartbeat));
        if !super::pace::routine(before, after) {
            self.pace.touch();
        }
        if let Outcome::Skipped(reason) = &outcome
            && reason.starts_with("internal error")
        {
            error!(%topic, offset, %reason, "record could not be read; skipped");
        }
        let key = key.map(|key| String::from_utf8_lossy(&key).into_owned()).unwrap_or_default();
        if let Some(name) = key.strip_prefix("secret/").and_then(|name| TaskId::new(name).ok()) {
            self.secrets.update(&self.view, &name);
        }
        if self.outbox.unread.get(&(topic, key.clone())).is_some_and(|sent| *sent <= offset) {
            self.outbox.unread.remove(&(topic, key.clone()));
        }
        match outcome {
            Outcome::Skipped(reason) if reason.contains(": lost: ") => {
                debug!(%topic, offset, %reason, "claim lost")
            }
            Outcome::Skipped(reason) => warn!(%topic, offset, %reason, "skipped record"),
            Outcome::Applied(_) => match topic {
                TopicKind::Control => self.on_control(&key, offset),
                TopicKind::Assignments if key.starts_with("claim/") => {
                    let newest = self.view.epochs.newest;
                    if self.view.epochs.winners.get(&newest).is_some_and(|winner| winner.offset == offset) {
                        let winner = &self.view.epochs.winners[&newest];
                        info!(epoch = newest, leader = %winner.node, "new epoch");
                        // A new leader replacing one (the first epoch replaces none).
                        if self.ready && newest > 1 {
                            self.api.metrics.failovers.inc();
                        }
                        self.election.on_winner(newest, Boot::now());
                    }
                }
                _ => {}
            },
        }
    }

    fn on_control(&mut self, key: &str, offset: i64) {
        if let Some(node) = key.strip_prefix("node/") {
            let Some((id, entry)) = self.view.heartbeats.iter().find(|(id, _)| id.as_str() == node) else {
                return;
            };
            if entry.offset != offset {
                return;
            }
            if *id != self.config.node_id {
                let now_ms = crate::supervisor::oneshot::now_ms();
                self.clock_samples.on_heartbeat(id, entry.incarnation, entry.sent_at_ms, now_ms);
            }
            if self.membership.on_heartbeat(id, entry.incarnation, &entry.heartbeat, Boot::now()) {
                self.gate.read_back(entry.heartbeat.seq);
                // Log time moves to the send instant of the newest own heartbeat read back.
                if let Some(sent) = self.gate.lease_start() {
                    self.membership.advance(sent);
                }
            } else if *id == self.config.node_id && (self.ready || self.probing) {
                if self.impostor != Some(entry.incarnation) {
                    error!(
                        node = %id, incarnation = %entry.incarnation,
                        "another live node heartbeats with this node's id: only the incarnation the leader lists runs its tasks"
                    );
                }
                self.impostor = Some(entry.incarnation);
            }
        } else if key.starts_with("leave/") {
            let left: Vec<_> = self.view.left.iter().cloned().collect();
            for (node, incarnation) in left {
                self.membership.on_leave(&node, incarnation);
            }
        }
    }

    pub(crate) fn on_write_result(&mut self, result: WriteResult) {
        if !result.is_quiet() {
            self.pace.touch();
        }
        let WriteResult { topic, key, purpose, result, queued } = result;
        crate::api::Metrics::observe(&self.api.metrics.produce_latency, queued.elapsed());
        let entry = (topic, key.clone());
        if let Some(count) = self.outbox.unacked.get_mut(&entry) {
            *count -= 1;
            if *count == 0 {
                self.outbox.unacked.remove(&entry);
            }
        }
        match (result, purpose) {
            (Ok(offset), purpose) => {
                if self.view.positions.get(&topic).copied().unwrap_or(0) <= offset {
                    self.outbox.unread.insert(entry, offset);
                }
                if let Purpose::Status(task) = purpose {
                    let known = self.own.offsets.entry(task).or_insert(offset);
                    *known = (*known).max(offset);
                } else if let Purpose::RunStart(run) = purpose {
                    self.on_start_written(run, true);
                } else if let Purpose::RunReport(report) = purpose {
                    self.own.report_landed(&report);
                }
            }
            (Err(message), Purpose::Heartbeat(seq)) => {
                warn!(seq, %message, "heartbeat not delivered");
                self.gate.failed(seq);
            }
            (Err(message), Purpose::RunStart(run)) => {
                warn!(%run, %message, "start record not written; writing it again");
                self.on_start_written(run, false);
            }
            (Err(message), Purpose::RunReport(report)) => {
                // On a seat: written again only while the run's intent still holds it (see
                // `left_its_seat`).
                if self.left_its_seat(&report) {
                    warn!(run = %report.run_id, %message, "run record not written; its run left the history, so not written again");
                } else if self.own.retry_report(&report) {
                    warn!(run = %report.run_id, %message, "run record not written; writing it again");
                    self.write_run_report(*report);
                } else {
                    warn!(run = %report.run_id, %message, "run record not written; a newer one of the run was written since");
                }
            }
            (Err(message), Purpose::Claim(epoch)) => {
                warn!(epoch, %message, "claim not delivered; reading the log to learn the outcome");
                let token = self.token();
                self.leadership.claim_check = Some((epoch, token));
                self.reader.sync(token);
            }
            (Err(BusError::TooLarge { message, .. }), Purpose::Leader) => self.unwritable(&key, message),
            (Err(message), Purpose::Status(task)) => {
                // A status must land (the leader moves or hands off tasks on it): the newest one
                // is written again, unless a newer write of it is still in flight.
                warn!(%task, %message, "status not written; writing it again");
                let newer_in_flight = self.outbox.in_flight(topic, &key);
                if let Some(status) = self.own.retry_after_failure(&task, newer_in_flight) {
                    self.on_status(status);
                }
            }
            (Err(message), Purpose::Leader)
                if topic != TopicKind::Commands
                    && (key::run_key(&key).is_some() || key.starts_with("trim/")) =>
            {
                // It may have landed: its task (every task, for a `trim` record) is planned again
                // only once a read to the end shows what the log holds (with seats, a plan
                // without it could give its seat to another run, or this run another seat, and
                // a deletion landing late could take a later run's records).
                warn!(%key, %message, "run record of the leader not written; its task waits for a read of the log to its end");
                let token = self.token();
                let task = key::run_key(&key).map(|(task, _)| task);
                self.leadership.unsure_runs.insert(task, token);
                self.reader.sync(token);
            }
            (Err(message), _) => warn!(%key, %message, "write failed; will retry"),
        }
    }

    /// A status from a job: a final one ends a stopping job at once (see `Supervisor::on_final`).
    /// A final status of a task handed off from this node is not written: the hand-off's
    /// answer (written in this very step, see `release_handed_off`) says more, and writing both
    /// would queue the answer behind it.
    pub(crate) fn on_job_status(&mut self, status: TaskStatus) {
        self.pace.touch();
        let final_state = matches!(status.state, RunState::Stopped | RunState::Failed);
        if final_state && let Some(supervisor) = self.supervisor.as_mut() {
            supervisor.on_final(&status.task);
        }
        let handed_off = self.view.assignments.get(&status.task).is_some_and(|entry| {
            crate::runner::handed_off(&entry.assignment, &self.config.node_id).is_some()
                && entry.assignment.generation > status.generation
        });
        // Only once the job is gone: a job that gave up but still runs in `jobs` (its stop not
        // asked yet) writes its failure, and the answer follows when it is stopped.
        let gone = self.supervisor.as_ref().is_none_or(|supervisor| !supervisor.runs(&status.task));
        if final_state && handed_off && gone && !status.permanent {
            return;
        }
        self.observe_status(&status);
        self.on_status(status);
    }

    /// Writes this node's status of a task (deleting it is the leader's: see
    /// `leader::undefined`).
    pub(crate) fn on_status(&mut self, status: TaskStatus) {
        let task = status.task.clone();
        let body = Some(Body::Status(status.clone()));
        self.own.latest.insert(task.clone(), status);
        self.send(TopicKind::Status, key::task(&task), body, Purpose::Status(task));
    }

    pub(crate) fn heartbeat(&mut self) {
        let seq = match self.gate.next(Boot::now(), self.config.leader_timeout) {
            GateDecision::Send(seq) => seq,
            GateDecision::Pause => {
                warn!("cannot read this node's own heartbeats back; heartbeats paused until it can");
                return;
            }
            GateDecision::Paused => return,
        };
        // Only the live ids matter here: no incarnation preference (which walks the assignments).
        let live = self.membership.live_members(self.config.node_timeout, &|_| Vec::new());
        let clock_ms =
            self.clock_samples.best(super::heartbeat::sampled(self.identity.leader_capable, &live));
        let heartbeat =
            build(&self.identity, seq, self.fence.returns(), self.resources.resources(), clock_ms);
        let key = key::node(&self.config.node_id);
        self.send(TopicKind::Control, key, Some(Body::Heartbeat(heartbeat)), Purpose::Heartbeat(seq));
    }

    fn step_down(&mut self, reason: &str) {
        if let Some(epoch) = self.leadership.leading.take() {
            warn!(epoch, reason, "stepped down");
        }
        self.leadership.leader_sync = None;
    }

    /// Looks at the lease now, as a step does first (see the driver loop).
    pub(crate) fn look_at_fence(&mut self) {
        if self.ready {
            self.update_fence(Boot::now(), std::time::SystemTime::now());
        }
    }

    /// Whether `event` is a record on this node's own heartbeat key (its read-back): a node
    /// steps on it with the newest log time, and so need not step again on the next tick (a node
    /// alone stepped three times per heartbeat: on the tick, the delivery and the read-back,
    /// walking every task each time).
    pub(crate) fn is_own_heartbeat(&self, event: &ReaderEvent) -> bool {
        match event {
            ReaderEvent::Record(record) => {
                record.topic == TopicKind::Control
                    && record.key.as_deref() == Some(key::node(&self.config.node_id).as_bytes())
            }
            _ => false,
        }
    }

    /// Runs the decisions on the current state.
    pub(crate) fn step(&mut self) {
        let open = self.gate.is_open();
        if !self.ready {
            return;
        }
        let now = Boot::now();
        self.update_fence(now, std::time::SystemTime::now());
        let healthy = open && self.membership.log_now().is_some();
        let timeouts = Timeouts { leader: self.config.leader_timeout, first_write: self.config.node_timeout };
        match self.election.decide(&self.view, &self.membership, healthy, timeouts) {
            Verdict::Leader(epoch) => {
                if self.leadership.leading != Some(epoch)
                    && self.leadership.leader_sync.is_none_or(|(e, _)| e != epoch)
                {
                    let token = self.token();
                    self.reader.sync(token);
                    self.leadership.leader_sync = Some((epoch, token));
                    info!(epoch, "won the election; reading the log to its end before acting");
                }
            }
            Verdict::Follower => self.step_down("another node leads"),
            Verdict::Resign(epoch) => {
                if let Some((node, protocol)) = self.membership.newer_protocol_live(timeouts.leader) {
                    let (node, protocol) = (node.clone(), protocol);
                    self.step_down("a node of a newer protocol is live");
                    let key = key::resign(epoch);
                    if !self.busy(TopicKind::Assignments, &key) {
                        warn!(epoch, %node, protocol, "resigning: a node of a newer protocol is live and leads instead");
                        let body = Some(Body::Resign(shiva_proto::records::Resign { epoch }));
                        self.send(TopicKind::Assignments, key, body, Purpose::Leader);
                    }
                }
            }
            Verdict::Claim(epoch) => {
                self.step_down("the leader is gone");
                if self.leadership.claim_check.is_none() {
                    info!(epoch, "no live leader; claiming the next epoch");
                    self.election.claim_sent(epoch);
                    let key = key::claim(epoch, &self.config.node_id, Uuid::new_v4());
                    self.send(
                        TopicKind::Assignments,
                        key,
                        Some(Body::Claim(Claim { epoch })),
                        Purpose::Claim(epoch),
                    );
                }
            }
        }
        // Whether this step walks every task (the leader's reconciliation, the runner's step)
        // or, nothing but the clock having changed since the last walk, leaves them out.
        let standing = super::pace::Standing {
            live: self.membership.live_ids(self.config.node_timeout),
            leading: self.leadership.leading,
            open: self.fence.is_open(),
            may_start_exclusive: self.may_start_exclusive(),
        };
        // The step's one reading of the wall clock, for the pace, reconciliation and the
        // scheduler alike.
        let now_ms = crate::supervisor::oneshot::now_ms();
        let (view, supervisor) = (&self.view, &self.supervisor);
        let steady = |standing: &super::pace::Standing| {
            super::pace::steady(view, &standing.live, now_ms)
                && !supervisor.as_ref().is_some_and(|supervisor| supervisor.stopping_any())
        };
        let walks = self.pace.walks(now, standing, steady);
        if let Some(epoch) = self.leadership.leading {
            // Task by task, decisions contain their own panics; this is the last resort for a
            // bug outside any one task: the step is skipped, the node and its role stay.
            let planned = crate::fault::contain(|| self.leader_writes(epoch, walks, now_ms));
            match planned {
                Ok(writes) => {
                    if !writes.is_empty() {
                        self.pace.touch();
                    }
                    for write in writes {
                        self.send(write.topic, write.key, write.body, Purpose::Leader);
                    }
                }
                Err(reason) => error!(epoch, %reason, "the leader's step failed; skipped"),
            }
            // Signed clusters: a refused command (a replay, a forgery) must not stay the newest
            // record of its key, or compaction would keep it in place of the accepted one.
            let repairs: Vec<String> = self
                .view
                .command_repairs
                .iter()
                .filter(|key| !self.busy(TopicKind::Commands, key))
                .cloned()
                .collect();
            for key in repairs {
                // The reason outlasts the refused record, which compaction drops.
                let refusal = self.view.refused.values().find(|refusal| refusal.key == key).cloned();
                if let Some(refusal) = refusal {
                    let record = key::refusal(&key);
                    if !self.busy(TopicKind::Assignments, &record) {
                        self.send(
                            TopicKind::Assignments,
                            record,
                            Some(Body::Refusal(refusal)),
                            Purpose::Leader,
                        );
                    }
                }
                let value = self.view.accepted_commands.get(&key).map(|bytes| bytes.to_vec());
                info!(%key, accepted = value.is_some(), "a refused command is the newest record of its key: writing the accepted one again");
                if value.is_none() && key.starts_with("request/") {
                    // A handled request's key: deleted as the leader deletes any, so that a
                    // reader that took the replay (its history compacted away) drops it too.
                    for write in crate::leader::Write::delete(TopicKind::Commands, key, epoch) {
                        self.send(write.topic, write.key, write.body, Purpose::Leader);
                    }
                    continue;
                }
                self.send_value(TopicKind::Commands, key, value, Purpose::Leader);
            }
            // Refusals of commands on ids that name nothing (a forgery's made-up ids): the newest
            // few are kept, so the leader's records stay bounded whatever is written.
            let gone: Vec<String> = stale_refusals(&self.view)
                .into_iter()
                .map(|command| key::refusal(&command))
                .filter(|record| !self.busy(TopicKind::Assignments, record))
                .collect();
            for record in gone {
                self.send(TopicKind::Assignments, record, None, Purpose::Leader);
            }
            // A run report whose intent is not in the view is deleted only once a read to the
            // end, asked for after the report was read, still finds no intent; and a run judged
            // `missed` is launched again only once one, asked for after the verdict was read,
            // finds no start record.
            let (reports, intents) =
                (self.leadership.reports_synced_below, self.leadership.intents_synced_below);
            if self.leadership.report_sync.is_none()
                && scheduler::wants_read_to_end(&self.view, reports, intents)
            {
                let token = self.token();
                let position = |topic| self.view.positions.get(&topic).copied().unwrap_or(0);
                let (status, assignments) = (position(TopicKind::Status), position(TopicKind::Assignments));
                self.reader.sync(token);
                self.leadership.report_sync = Some((token, status, assignments));
            }
        }
        if walks && let Err(reason) = crate::fault::contain(|| self.step_runner()) {
            error!(%reason, "the runner's step failed; skipped");
        }
        match crate::fault::contain(|| self.step_runs()) {
            Ok(wake) => self.runs.run_wake = wake,
            Err(reason) => error!(%reason, "the runs' step failed; skipped"),
        }
    }

    /// Live nodes, one incarnation per id: of two incarnations of one id, the one the newest
    /// `members` record lists keeps its place while it is live.
    pub(crate) fn live_members(&self) -> Vec<shiva_proto::records::Member> {
        self.membership.live_members(self.config.node_timeout, &|id| self.preferred(id))
    }

    /// Whether the newest `members` record lists this node with this incarnation.
    pub(crate) fn listed_here(&self) -> bool {
        self.listed(&self.config.node_id) == Some(self.config.incarnation)
    }

    /// The incarnations of `id` to keep, first first: the one the newest `members` record lists
    /// if an assignment names it (or none names any), then those assignments name (a task held
    /// for an incarnation that came back stays with it: it alone may start it), then the listed
    /// one.
    fn preferred(&self, id: &NodeId) -> Vec<Uuid> {
        let mut named: Vec<Uuid> = Vec::new();
        for entry in self.view.assignments.values() {
            if let (Placement::Assigned { node }, Some(incarnation)) =
                (&entry.assignment.placement, entry.assignment.incarnation)
                && node == id
                && !named.contains(&incarnation)
            {
                named.push(incarnation);
            }
        }
        let listed = self.listed(id);
        match listed {
            Some(listed) if named.is_empty() || named.contains(&listed) => {
                named.retain(|incarnation| *incarnation != listed);
                named.insert(0, listed);
            }
            Some(listed) => named.push(listed),
            None => {}
        }
        named
    }

    /// The incarnation of `id` the newest `members` record lists.
    fn listed(&self, id: &NodeId) -> Option<Uuid> {
        let members = self.view.members.as_ref()?;
        members.nodes.iter().find(|member| member.id == *id).map(|member| member.incarnation)
    }

    /// The leader's writes for this step: reconciliation (when the step `walks`, see `pace`),
    /// then the scheduler's.
    fn leader_writes(&self, epoch: u64, walks: bool, now_ms: i64) -> Vec<crate::leader::Write> {
        let live = self.live_members();
        let may_still_run = |node: &NodeId, grace: Duration| {
            self.membership.may_still_run(node, grace, FENCE_MARGIN, self.config.node_timeout)
        };
        let busy = |topic: TopicKind, key: &str| self.busy(topic, key);
        let conflicts =
            self.membership.conflicting_members(self.config.node_timeout, &|id| self.preferred(id));
        let incarnation_may_still_run = |node: &NodeId, incarnation: Uuid, grace: Duration| {
            self.membership.incarnation_may_still_run(
                node,
                incarnation,
                grace,
                FENCE_MARGIN,
                self.config.node_timeout,
            )
        };
        let inputs = Inputs {
            live: &live,
            conflicts: &conflicts,
            epoch,
            now_ms,
            busy: &busy,
            may_still_run: &may_still_run,
            incarnation_may_still_run: &incarnation_may_still_run,
            failed: &self.leadership.unwritable,
        };
        let mut writes = if walks { reconcile(&self.view, &inputs) } else { Vec::new() };
        let (batched_trim, run_seats) = self.trim_features(&live);
        let context = scheduler::Context {
            view: &self.view,
            live: &live,
            epoch,
            now: chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default(),
            timing: TIMING,
            busy: &|topic, key| self.busy(topic, key),
            runs_busy: &|task| {
                let unsure = &self.leadership.unsure_runs;
                self.outbox.runs_busy(task)
                    || unsure.contains_key(&None)
                    || unsure.contains_key(&Some(task.clone()))
            },
            lean: shiva_proto::records::feature::lean_runs(&live),
            batched_trim,
            run_seats,
            trim_every: scheduler::TRIM_EVERY,
            trims_per_plan: scheduler::TRIMS_PER_PLAN,
            schedules: &self.leadership.schedules,
            may_still_run: &may_still_run,
            failed: &self.leadership.unwritable,
            reports_synced_below: self.leadership.reports_synced_below,
            intents_synced_below: self.leadership.intents_synced_below,
        };
        writes.extend(scheduler::plan(&context));
        self.leadership.schedules.retain(&self.view);
        // Secrets some live node cannot open yet: re-encrypted to every live node.
        let recipients = shiva_proto::secret::valid_recipients(
            live.iter()
                .filter_map(|member| self.view.heartbeats.get(&member.id)?.heartbeat.recipient.as_deref()),
        );
        let mut stuck = Vec::new();
        let copies = crate::secrets::reencrypt(&self.view, &recipients, &self.secrets, &mut stuck);
        let rewritten: std::collections::BTreeSet<TaskId> =
            copies.iter().map(|copy| copy.name.clone()).collect();
        for copy in copies {
            let key = key::secret(&copy.name);
            if !self.busy(TopicKind::Assignments, &key) {
                writes.push(crate::leader::Write::assignments(key, Some(Body::Secret(copy))));
            }
        }
        // A copy of a deleted secret, or of an earlier value: dropped.
        for (name, copy) in &self.view.secret_copies {
            let current = self.view.secrets.get(name).map(|(revision, _)| *revision);
            let key = key::secret(name);
            if current != copy.source && !rewritten.contains(name) && !self.busy(TopicKind::Assignments, &key)
            {
                writes.push(crate::leader::Write::assignments(key, None));
            }
        }
        for reason in stuck {
            if self
                .stuck_secrets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(reason.clone())
            {
                warn!(%reason, "cannot re-encrypt a secret for the live nodes");
            }
        }
        writes
    }

    /// The bus refused a leader record for its size: the task it is about is failed (for its
    /// current revision) instead of being written again in a loop.
    fn unwritable(&mut self, key: &str, message: String) {
        let task = ["task", "sched"]
            .iter()
            .find_map(|kind| key::task_of(key, kind).and_then(|id| TaskId::new(id).ok()))
            .or_else(|| key::run_key(key).map(|(task, _)| task));
        let Some(task) = task else {
            error!(%key, %message, "the bus refused a leader record for its size");
            return;
        };
        let Some(revision) = self.view.spec_of(&task).map(|entry| entry.revision) else { return };
        let reason = format!("a record about this task is too large for the bus: {message}");
        error!(%task, %key, %reason, "failing the task");
        // Entries of earlier revisions no longer count (`leader::failure` compares revisions):
        // they go when the map grows, not at every write's result.
        let view = &self.view;
        self.leadership
            .unwritable
            .retain(|task, (at, _)| view.spec_of(task).is_some_and(|spec| spec.revision == *at));
        self.leadership.unwritable.insert(task, (revision, reason));
    }

    /// Takes in the lease: fences or (after a read to the end) opens, and tells the shims how
    /// long the lease lasts.
    fn update_fence(&mut self, now: Boot, wall: std::time::SystemTime) {
        let lease_start = self.gate.lease_start();
        let mut next_token = self.next_token;
        let change = self.fence.update(lease_start, now, wall, &mut || {
            next_token += 1;
            next_token
        });
        self.next_token = next_token;
        if matches!(change, FenceChange::Fenced { .. }) {
            self.api.metrics.fences.inc();
        }
        match change {
            FenceChange::Fenced { wall_jump: None } => warn!(
                fence_timeout = ?self.config.fence_timeout,
                "cut off from the bus: no own heartbeat read back within the fence timeout; stopping exclusive runs"
            ),
            FenceChange::Fenced { wall_jump: Some(jump) } => warn!(
                fence_timeout = ?self.config.fence_timeout,
                wall_clock_ahead = ?jump,
                "the wall clock ran ahead of the boot-time clock by more than the lease (the machine was paused): \
                 the lease is over; stopping exclusive runs"
            ),
            FenceChange::Sync(token) => {
                info!(
                    "this node reads its own heartbeats; reading the log to its end before running anything"
                );
                self.reader.sync(token);
            }
            FenceChange::None | FenceChange::Opened => {}
        }
        let deadline = if self.fence.is_open() { self.fence.deadline(lease_start) } else { None };
        self.lease.send_if_modified(|lease| std::mem::replace(lease, deadline) != deadline);
    }

    /// Whether this node may start exclusive work: its fence is open and the leader listed its
    /// latest return (see [`super::fence::returned_confirmed`]).
    pub(crate) fn may_start_exclusive(&self) -> bool {
        self.fence.is_open()
            && super::fence::returned_confirmed(
                self.view.members.as_ref(),
                &self.config.node_id,
                self.config.incarnation,
                self.fence.returns(),
            )
    }

    fn step_runner(&mut self) {
        let standing = crate::runner::Standing {
            fenced: !self.fence.is_open(),
            may_start_exclusive: self.may_start_exclusive(),
        };
        let Some(supervisor) = self.supervisor.as_mut() else {
            self.release_handed_off(&|_| false);
            return;
        };
        let wanted =
            // What runs goes on while the gate is closed; a stopped job (even one whose stop
            // just completed) starts again only through the gate.
            crate::runner::wanted(&self.view, (&self.config.node_id, self.config.incarnation), standing, &|task| supervisor.runs(task));
        supervisor.reconcile(&wanted);
        // A status that landed after this node's own (an old runner's last words) would
        // survive compaction: write the current one again.
        let active: Vec<TaskId> = supervisor.active().cloned().collect();
        let stale: Vec<TaskStatus> = active
            .iter()
            .filter_map(|task| {
                let status = self.own.latest.get(task)?;
                // Only a status of the job now running: not an answer to an earlier hand-off
                // (the job's own first status follows).
                let current = self.view.assignments.get(task).map(|entry| entry.assignment.generation);
                if current != Some(status.generation) {
                    return None;
                }
                let last = self.view.last_offset(TopicKind::Status, &key::task(task))?;
                let mine = self.own.offsets.get(task)?;
                (last > *mine && !self.busy(TopicKind::Status, &key::task(task))).then(|| status.clone())
            })
            .collect();
        for status in stale {
            debug!(task = %status.task, "rewriting status overwritten by another writer");
            self.on_status(status);
        }
        let holds: BTreeSet<TaskId> = self
            .supervisor
            .as_ref()
            .map(|supervisor| {
                let view = &self.view;
                view.assignments.keys().filter(|task| supervisor.holds(task)).cloned().collect()
            })
            .unwrap_or_default();
        // Another incarnation of this id runs its tasks (a conflict): this one answers no
        // hand-off of them (it holds no copy; the listed one does).
        if self.listed(&self.config.node_id).is_none_or(|listed| listed == self.config.incarnation) {
            self.release_handed_off(&|task| holds.contains(task));
        }
    }

    /// Tells the leader, for every task handed off from this node whose copy is gone here, that
    /// it is gone: a `stopped` status for the hand-off's generation (see `leader::handoff`).
    /// Written once this node read the record that took the task away, so it never starts the
    /// task again from an earlier one.
    fn release_handed_off(&mut self, holds: &dyn Fn(&TaskId) -> bool) {
        let own = |task: &TaskId| self.own.latest.get(task).map(|status| (status.generation, status.state));
        // Written at once, even behind the job's own last status still in flight on the key (one
        // producer keeps their order); written again (overwritten by a stale status) only once
        // the previous one is no longer in flight.
        let releases: Vec<TaskStatus> =
            crate::runner::releases(&self.view, &self.config.node_id, holds, &own)
                .into_iter()
                .filter(|status| {
                    let sent = self.own.latest.get(&status.task).is_some_and(|own| own == status);
                    !(sent && self.busy(TopicKind::Status, &key::task(&status.task)))
                })
                .collect();
        for status in releases {
            info!(task = %status.task, generation = status.generation, "handed off: this node's copy is gone");
            self.on_status(status);
        }
    }
}

/// Refusal records the leader keeps for commands on undefined tasks and secrets: the newest.
const LOOSE_REFUSALS: usize = 256;

/// The command keys whose `refusal/` record should go: those of undefined tasks and secrets
/// beyond the newest [`LOOSE_REFUSALS`].
fn stale_refusals(view: &LogView) -> Vec<String> {
    // One record per key of a defined task or secret at most; requests are keyed by a fresh id
    // each, so theirs count as loose.
    let defined = |command: &str| {
        !command.starts_with("request/")
            && shiva_proto::view::command_task(command)
                .is_some_and(|task| view.is_defined(&task) || view.secrets.contains_key(&task))
    };
    let mut loose: Vec<(i64, &String)> = view
        .refusal_records
        .iter()
        .filter(|command| !defined(command))
        .map(|command| {
            let offset = shiva_proto::view::command_task(command)
                .and_then(|task| view.refused.get(&task))
                .filter(|refusal| refusal.key == **command)
                .map_or(i64::MIN, |refusal| refusal.offset);
            (offset, command)
        })
        .collect();
    loose.sort();
    let excess = loose.len().saturating_sub(LOOSE_REFUSALS);
    loose.into_iter().take(excess).map(|(_, command)| command.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_report_is_written_again_only_while_it_is_its_runs_newest() {
        use shiva_proto::runs::{RunPhase, RunReport, Trigger};
        let report = |state| RunReport {
            task: TaskId::new("cron/t").unwrap(),
            run_id: uuid::Uuid::from_u128(7),
            attempt: 1,
            trigger: Trigger::Slot { slot_ms: 1_000 },
            state,
            pid: Some(42),
            started_ms: Some(1_000),
            late_ms: None,
            ended_ms: None,
            exit: None,
            message: None,
            seat: None,
        };
        let mut own = OwnStatus::default();
        let (running, succeeded) = (report(RunPhase::Running), report(RunPhase::Succeeded));
        own.report_written(&running);
        assert!(own.retry_report(&running), "the newest report is written again");
        own.report_written(&succeeded);
        // `running` failed after `succeeded` was written: written again it could land last and
        // reopen the run.
        assert!(!own.retry_report(&running));
        assert!(own.retry_report(&succeeded));
        own.report_landed(&running);
        assert!(own.reports.contains_key(&running.run_id), "a non-final landing keeps the entry");
        own.report_landed(&succeeded);
        assert!(own.reports.is_empty(), "a final report landed: the run is forgotten");
    }

    #[test]
    fn a_failed_status_write_is_retried_with_the_newest_status_unless_a_newer_one_is_in_flight() {
        let task = TaskId::new("app/t").unwrap();
        let status = |state| TaskStatus {
            task: task.clone(),
            generation: 3,
            state,
            run_id: None,
            pid: None,
            attempt: 1,
            restarts: 1,
            last_exit: None,
            message: None,
            permanent: false,
            after: Vec::new(),
        };
        let mut own = OwnStatus::default();
        assert_eq!(own.retry_after_failure(&task, false), None, "nothing of this task was written");
        own.latest.insert(task.clone(), status(RunState::Running));
        own.latest.insert(task.clone(), status(RunState::Failed));
        assert_eq!(
            own.retry_after_failure(&task, false),
            Some(status(RunState::Failed)),
            "the newest, again"
        );
        assert_eq!(own.retry_after_failure(&task, true), None, "a newer write is still in flight");
    }
}
