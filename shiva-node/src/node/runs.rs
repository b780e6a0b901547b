//! The runner's side of periodic and one-shot runs: for each launch intent naming this node,
//! write the start record ahead of the instant, read the log to its end to confirm the intent
//! is still current, then launch at the instant (see `supervisor::oneshot`).
//!
//! The start record comes before the launch, so a run whose node dies can be judged: with a
//! start record it may have run (`lost`), without one it never did (`missed`, launched again
//! when its policy wants).

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use shiva_proto::runs::{RunIntent, RunPhase, RunReport};
use shiva_proto::spec::OnDisconnect;
use shiva_proto::topics::key;
use shiva_proto::{TaskId, TopicKind};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::driver::{Node, Purpose};
use crate::runner::{Confirm, confirm};
use crate::supervisor::oneshot::{self, RunControl, now_ms};

/// How long before its instant a run's start record is written and confirmed, at least.
pub(crate) const START_LEAD: Duration = Duration::from_millis(150);
/// At most (intents arrive about a second ahead).
pub(crate) const MAX_START_LEAD: Duration = Duration::from_millis(800);
/// How often held runs that the log no longer holds are forgotten.
const HELD_PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How many recent confirmations the lead follows.
pub(crate) const RECENT_CONFIRMS: usize = 32;

/// The lead for the next start records: twice the slowest of the recent confirmations (write,
/// then read to the end), within bounds. A loaded broker makes confirmations slow; starting
/// earlier keeps launches on time, at the price of a longer window in which a node's death
/// leaves a run `lost` rather than `missed`.
pub(crate) fn start_lead(recent_ms: &VecDeque<u64>) -> Duration {
    let slowest = recent_ms.iter().copied().max().unwrap_or(0);
    Duration::from_millis(slowest.saturating_mul(2)).clamp(START_LEAD, MAX_START_LEAD)
}

/// A run this node holds.
pub(crate) struct Held {
    task: TaskId,
    phase: Phase,
}

/// The confirming phases carry when the start record was queued: the start lead follows how
/// long confirmations take.
enum Phase {
    /// Start record written, not acknowledged yet.
    Writing(Instant),
    /// Start record acknowledged; a read-to-end is wanted.
    Acked(Instant),
    /// Waiting for read-to-end `token`.
    Confirming { token: u64, since: Instant },
    /// Launched (or waiting for its instant).
    Launched { control: mpsc::UnboundedSender<RunControl>, stop_sent: bool },
    /// Over, as far as this node is concerned.
    Done,
}

impl Node {
    /// Writes a run record; a start record's acknowledgement moves its run on.
    pub(crate) fn write_run_report(&mut self, report: RunReport) {
        let key = key::run(&report.task, report.run_id);
        let purpose = if report.state == RunPhase::Starting {
            Purpose::RunStart(report.run_id)
        } else {
            Purpose::RunReport(Box::new(report.clone()))
        };
        self.send(TopicKind::Status, key, Some(shiva_proto::Body::RunReport(report)), purpose);
    }

    /// Ends a run this node will not launch (or whose launch an earlier incarnation lost).
    fn finish_unlaunched(&mut self, intent: &RunIntent, state: RunPhase, message: String) {
        self.runs.held.insert(intent.run_id, Held { task: intent.task.clone(), phase: Phase::Done });
        self.write_run_report(oneshot::report(intent, state, Some(message)));
    }

    /// Reports from running runs.
    pub(crate) fn on_run_report(&mut self, report: RunReport) {
        if report.state.is_final()
            && let Some(held) = self.runs.held.get_mut(&report.run_id)
        {
            held.phase = Phase::Done;
        }
        self.write_run_report(report);
    }

    /// The start record of `run` was written (or not).
    pub(crate) fn on_start_written(&mut self, run: Uuid, ok: bool) {
        if let Some(held) = self.runs.held.get_mut(&run)
            && let Phase::Writing(since) = held.phase
        {
            if ok {
                held.phase = Phase::Acked(since);
            } else {
                // Written again at the next step: the same record twice is harmless.
                self.runs.held.remove(&run);
            }
        }
    }

    /// A read-to-end completed: launch the runs it confirms.
    pub(crate) fn on_runs_synced(&mut self, token: u64) {
        let waiting: Vec<(Uuid, Instant)> = self
            .runs
            .held
            .iter()
            .filter_map(|(id, held)| match held.phase {
                Phase::Confirming { token: t, since } if t == token => Some((*id, since)),
                _ => None,
            })
            .collect();
        for (id, since) in waiting {
            let task = self.runs.held[&id].task.clone();
            let entry = self.view.run(&task, &id);
            match confirm(entry, &self.config.node_id, self.config.incarnation) {
                Confirm::Launch(intent) => {
                    let took = since.elapsed().as_millis() as u64;
                    if self.runs.confirm_ms.len() == RECENT_CONFIRMS {
                        self.runs.confirm_ms.pop_front();
                    }
                    self.runs.confirm_ms.push_back(took);
                    self.launch(*intent)
                }
                Confirm::Cancel(reason) => {
                    info!(%task, run = %id, %reason, "run not launched");
                    match entry.and_then(|entry| entry.intent.clone()) {
                        Some((intent, _)) => self.finish_unlaunched(&intent, RunPhase::Stopped, reason),
                        None => {
                            self.runs.held.insert(id, Held { task, phase: Phase::Done });
                        }
                    }
                }
            }
        }
    }

    fn launch(&mut self, intent: RunIntent) {
        let Some(supervisor) = self.supervisor.as_ref() else { return };
        let (control, _handle) =
            oneshot::start(supervisor.context(), intent.clone(), self.runs.run_reports.clone());
        debug!(task = %intent.task, run = %intent.run_id, "run confirmed");
        self.runs.held.insert(
            intent.run_id,
            Held { task: intent.task, phase: Phase::Launched { control, stop_sent: false } },
        );
    }

    /// Walks the intents naming this node; returns how long until the next start record is due.
    pub(crate) fn step_runs(&mut self) -> Option<Duration> {
        self.supervisor.as_ref()?;
        let me = self.config.node_id.clone();
        let now = now_ms();
        let lead = start_lead(&self.runs.confirm_ms).as_millis() as i64;
        let mut next: Option<i64> = None;
        let mut start = Vec::new();
        let mut finish = Vec::new();
        // The runs not over, and the launched ones (whose leader may have given up on them).
        let launched = self.runs.held.iter().filter(|(_, held)| matches!(held.phase, Phase::Launched { .. }));
        let candidates: BTreeSet<(TaskId, Uuid)> = (self.view.open_runs.iter().cloned())
            .chain(launched.map(|(id, held)| (held.task.clone(), *id)))
            .collect();
        for (task, id) in &candidates {
            let Some(entry) = self.view.run(task, id) else { continue };
            let Some((intent, _)) = entry.intent.as_ref() else { continue };
            if intent.node.as_ref() != Some(&me) {
                continue;
            }
            if let Some(held) = self.runs.held.get_mut(id) {
                if let Phase::Launched { control, stop_sent } = &mut held.phase
                    && !*stop_sent
                    && let Some(reason) =
                        intent.stop.clone().or_else(|| intent.verdict.map(|v| v.as_str().to_owned()))
                {
                    let _ = control.send(RunControl::Stop(reason));
                    *stop_sent = true;
                }
                continue;
            }
            if entry.is_final() {
                continue;
            }
            let start_at = intent.launch_at_ms.saturating_sub(lead);
            if entry.report.is_some() {
                // Started by an earlier incarnation of this node, whose children died with it.
                warn!(task = %intent.task, run = %id, "run was started by an earlier incarnation of this node: lost");
                let message = "the node restarted during the run".to_owned();
                finish.push((intent.clone(), RunPhase::Lost, message));
            } else if let Some(reason) = &intent.stop {
                let message = format!("stopped before it started: {reason}");
                finish.push((intent.clone(), RunPhase::Stopped, message));
            } else if now >= start_at {
                // Cut off from the bus: an exclusive run starts only once the node reads
                // itself again (the steps go on with every heartbeat tick).
                // Back from the fence, only once the leader acknowledged the return.
                // Never beside this node's own service copy of the task (a kind change).
                let beside =
                    self.supervisor.as_ref().is_some_and(|supervisor| supervisor.holds(&intent.task));
                if !beside && (self.may_start_exclusive() || intent.spec.on_disconnect == OnDisconnect::Keep)
                {
                    start.push(intent.clone());
                }
            } else {
                next = Some(next.map_or(start_at, |n: i64| n.min(start_at)));
            }
        }
        for (intent, state, message) in finish {
            self.finish_unlaunched(&intent, state, message);
        }
        for intent in start {
            let report = oneshot::report(&intent, RunPhase::Starting, None);
            let held = Held { task: intent.task.clone(), phase: Phase::Writing(Instant::now()) };
            self.runs.held.insert(intent.run_id, held);
            self.write_run_report(report);
        }
        if self.runs.held.values().any(|held| matches!(held.phase, Phase::Acked(_))) {
            let token = self.token();
            self.reader.sync(token);
            for held in self.runs.held.values_mut() {
                if let Phase::Acked(since) = held.phase {
                    held.phase = Phase::Confirming { token, since };
                }
            }
        }
        // Forget runs the log no longer holds (trimmed history), now and then: memory only.
        if self.runs.held_pruned.elapsed() >= HELD_PRUNE_EVERY {
            self.runs.held_pruned = Instant::now();
            let view = &self.view;
            self.runs
                .held
                .retain(|id, held| !matches!(held.phase, Phase::Done) || view.run(&held.task, id).is_some());
        }
        next.map(|at| Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64))
    }

    /// Graceful shutdown: stop launched runs, cancel the ones not launched yet.
    pub(crate) fn stop_runs(&mut self) {
        let mut cancel = Vec::new();
        for (id, held) in &mut self.runs.held {
            match &mut held.phase {
                Phase::Launched { control, .. } => {
                    let _ = control.send(RunControl::Stop("the node is shutting down".into()));
                }
                Phase::Writing(_) | Phase::Acked(_) | Phase::Confirming { .. } => {
                    cancel.push((*id, held.task.clone()))
                }
                Phase::Done => {}
            }
        }
        for (id, task) in cancel {
            let entry = self.view.run(&task, &id);
            match entry.and_then(|entry| entry.intent.clone()) {
                Some((intent, _)) => {
                    let message = "stopped before it started: the node is shutting down".to_owned();
                    self.finish_unlaunched(&intent, RunPhase::Stopped, message);
                }
                None => {
                    self.runs.held.insert(id, Held { task, phase: Phase::Done });
                }
            }
        }
    }

    /// Runs still launched (not reported over).
    pub(crate) fn launched_runs(&self) -> usize {
        self.runs.held.values().filter(|held| matches!(held.phase, Phase::Launched { .. })).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_lead_follows_slow_confirmations_within_bounds() {
        let lead = |recent: &[u64]| start_lead(&recent.iter().copied().collect());
        assert_eq!(lead(&[]), START_LEAD);
        assert_eq!(lead(&[10, 40, 20]), START_LEAD, "fast confirmations keep the minimum");
        assert_eq!(lead(&[10, 200, 20]), Duration::from_millis(400));
        assert_eq!(lead(&[3000]), MAX_START_LEAD);
    }
}
