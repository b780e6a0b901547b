//! The runner's side of periodic and one-shot runs: the driver of the pure
//! [`RunBook`](crate::runner::runs::RunBook). It feeds the book what happened (steps over the
//! log, start records acknowledged, reads to the end completed, reports of launched runs, the
//! shutdown), reading the clock once per event, and performs what the book decides: writes,
//! reads to the end, launches (see `supervisor::oneshot`) and stop signals.

use std::time::Duration;

use shiva_proto::TopicKind;
use shiva_proto::runs::{RunPhase, RunReport};
use shiva_proto::topics::key;
use tracing::{debug, info};
use uuid::Uuid;

use super::driver::{Node, Purpose};
use crate::runner::runs::{Action, Event};
use crate::supervisor::oneshot::{self, RunControl, now_ms};

impl Node {
    /// Whether `report` is of a run on a seat whose intent no longer holds it (the run left the
    /// history): written there, it would land over the records of the run now on the seat.
    pub(crate) fn left_its_seat(&self, report: &RunReport) -> bool {
        report.seat.is_some_and(|seat| {
            self.view.run(&report.task, &report.run_id).and_then(|run| run.seat()) != Some(seat)
        })
    }

    /// Writes a run record; a start record's acknowledgement moves its run on.
    pub(crate) fn write_run_report(&mut self, report: RunReport) {
        // On a seat only while the run's intent holds it: a run that outlived its intent (judged
        // `lost` while it rode out a disconnection, then trimmed) would land over the records
        // of the run now on the seat.
        if self.left_its_seat(&report) {
            info!(task = %report.task, run = %report.run_id, state = report.state.as_str(), "run record not written: the run left the history, and its seat is another run's");
            return;
        }
        let key = key::report(&report);
        self.own.report_written(&report);
        let purpose = if report.state == RunPhase::Starting {
            Purpose::RunStart(report.run_id)
        } else {
            Purpose::RunReport(Box::new(report.clone()))
        };
        self.send(TopicKind::Status, key, Some(shiva_proto::Body::RunReport(report)), purpose);
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Write(report) => {
                    // Every final record of a run of this node passes here once (a failed write
                    // is written again by `write_run_report`, not here).
                    if report.state.is_final() {
                        self.count_run(&report);
                    }
                    if matches!(report.state, RunPhase::Lost | RunPhase::Stopped)
                        && report.started_ms.is_none()
                    {
                        info!(task = %report.task, run = %report.run_id, state = report.state.as_str(), message = report.message.as_deref().unwrap_or(""), "run not launched");
                    }
                    self.write_run_report(report)
                }
                Action::Sync(token) => self.reader.sync(token),
                Action::Launch(intent) => {
                    let Some(supervisor) = self.supervisor.as_ref() else { continue };
                    debug!(task = %intent.task, run = %intent.run_id, "run confirmed");
                    let run = intent.run_id;
                    let (control, _handle) =
                        oneshot::start(supervisor.context(), *intent, None, self.runs.run_reports.clone());
                    self.runs.controls.insert(run, control);
                }
                Action::Adopt(intent) => {
                    let Some(supervisor) = self.supervisor.as_ref() else { continue };
                    let run = intent.run_id;
                    let adopted = self.runs.adopted.remove(&run);
                    let (control, _handle) =
                        oneshot::start(supervisor.context(), *intent, adopted, self.runs.run_reports.clone());
                    self.runs.controls.insert(run, control);
                }
                Action::Stop { run, reason } => {
                    if let Some(control) = self.runs.controls.get(&run) {
                        let _ = control.send(RunControl::Stop(reason));
                    }
                }
            }
        }
    }

    /// Reports from launched runs.
    pub(crate) fn on_run_report(&mut self, report: RunReport) {
        self.pace.touch();
        self.observe_run(&report);
        if report.state.is_final() {
            self.runs.controls.remove(&report.run_id);
        }
        let actions = self.runs.book.on_event(Event::Reported(report), now_ms());
        self.perform(actions);
    }

    /// The start record of `run` was written (or not).
    pub(crate) fn on_start_written(&mut self, run: Uuid, ok: bool) {
        let actions = self.runs.book.on_event(Event::StartWritten { run, ok }, now_ms());
        self.perform(actions);
    }

    /// A read-to-end failed: the runs waiting for it wait for the next one.
    pub(crate) fn on_runs_sync_failed(&mut self, token: u64) {
        let actions = self.runs.book.on_event(Event::SyncFailed { token }, now_ms());
        self.perform(actions);
    }

    /// A read-to-end completed: launch the runs it confirms.
    pub(crate) fn on_runs_synced(&mut self, token: u64) {
        let event = Event::Synced {
            token,
            view: &self.view,
            me: &self.config.node_id,
            incarnation: self.config.incarnation,
            listed: self.listed_here(),
        };
        let actions = self.runs.book.on_event(event, now_ms());
        self.perform(actions);
    }

    /// Walks the intents naming this node; returns how long until the next start record is due.
    pub(crate) fn step_runs(&mut self) -> Option<Duration> {
        let supervisor = self.supervisor.as_ref()?;
        let context = supervisor.context();
        let now = now_ms();
        let token = self.next_token + 1;
        let may_start_exclusive = self.may_start_exclusive();
        let beside = |task: &shiva_proto::TaskId| supervisor.holds(task);
        let adopted = |run: &Uuid| self.runs.adopted.contains_key(run);
        let before = &self.runs.launched_before;
        let launched_before = |run: &Uuid| before.as_ref().is_none_or(|launched| launched.contains(run));
        let event = Event::Step {
            view: &self.view,
            me: &self.config.node_id,
            incarnation: self.config.incarnation,
            listed: self.listed_here(),
            may_start_exclusive,
            beside: &beside,
            adopted: &adopted,
            launched_before: &launched_before,
            token,
        };
        let decided = context.shims.lease_left().is_some();
        let lean = shiva_proto::records::feature::lean_runs(&self.live_members());
        let mut actions = self.runs.book.set_lean(lean);
        actions.extend(self.runs.book.on_event(event, now));
        if actions.iter().any(|action| matches!(action, Action::Sync(_))) {
            self.next_token = token;
        }
        self.perform(actions);
        // The journal keeps the runs still open (pruned every ten minutes).
        let prune = self.runs.journal_pruned.is_none_or(|at| at.elapsed() >= Duration::from_secs(600));
        if prune {
            self.runs.journal_pruned = Some(std::time::Instant::now());
            let open: std::collections::BTreeSet<Uuid> =
                self.view.open_runs.iter().map(|(_, run)| *run).collect();
            if let Err(err) = context.launches.retain(|run| open.contains(run)) {
                tracing::warn!(error = %err, "cannot prune the journal of launched runs");
            }
        }
        // Runs taken back that no intent of this node holds any more stop, once the node holds
        // its lease (until then their own lease decides).
        if decided && !self.runs.adopted.is_empty() {
            for (run, adopted) in std::mem::take(&mut self.runs.adopted) {
                info!(task = %adopted.meta.task, %run, pid = adopted.handle.pid, "stopping a run taken back that this node no longer holds");
                // Dropping the handle stops the run.
                drop(adopted);
            }
        }
        self.runs.book.next_due(&self.view, &self.config.node_id, now)
    }

    /// Graceful shutdown: stop launched runs, cancel the ones not launched yet.
    pub(crate) fn stop_runs(&mut self) {
        let actions = self.runs.book.on_event(Event::Shutdown { view: &self.view }, now_ms());
        self.perform(actions);
    }

    /// Runs still launched (not reported over).
    pub(crate) fn launched_runs(&self) -> usize {
        self.runs.book.launched()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::runs::{Confirms, LEAD_BUCKET_MS, LEAD_MEMORY_MS, MAX_START_LEAD, START_LEAD};

    #[test]
    fn the_start_lead_follows_slow_confirmations_within_bounds() {
        let lead = |took: &[u64]| {
            let mut confirms = Confirms::default();
            for (i, ms) in took.iter().enumerate() {
                confirms.record(i as i64 * 20, *ms);
            }
            confirms.lead(took.len() as i64 * 20)
        };
        assert_eq!(lead(&[]), START_LEAD);
        assert_eq!(lead(&[10, 40, 20]), START_LEAD, "fast confirmations keep the minimum");
        assert_eq!(lead(&[10, 200, 20]), Duration::from_millis(400));
        assert_eq!(lead(&[3000]), MAX_START_LEAD);
    }

    /// The test broker stalls everyone's writes for a quarter of a second or more when its
    /// maintenance runs (docs/benchmarks.md, point 4): the lead must still cover the next stall
    /// after thousands of fast confirmations (the 32 the lead once followed were about 2 s).
    #[test]
    fn the_start_lead_remembers_a_stall_for_minutes_not_for_a_count() {
        let mut confirms = Confirms::default();
        let start = 1_700_000_000_000_i64;
        confirms.record(start, 260);
        // 50 fast confirmations a second for the next minute.
        for i in 1..=3_000 {
            confirms.record(start + i * 20, 30);
        }
        assert_eq!(confirms.lead(start + 60_000), Duration::from_millis(520));
        // Forgotten once the memory has passed, with fast confirmations since.
        for i in 1..=LEAD_MEMORY_MS / 1_000 {
            confirms.record(start + 60_000 + i * 1_000, 30);
        }
        assert_eq!(confirms.lead(start + 60_000 + LEAD_MEMORY_MS), START_LEAD);
    }

    #[test]
    fn the_lead_memory_stays_bounded_while_the_clock_moves_on() {
        let mut confirms = Confirms::default();
        let spans = usize::try_from(LEAD_MEMORY_MS / LEAD_BUCKET_MS).unwrap();
        // An hour of ten confirmations a second, each slower than the last.
        for i in 0..36_000_i64 {
            confirms.record(1_700_000_000_000 + i * 100, u64::try_from(i).unwrap());
            assert!(confirms.spans() <= spans, "{} spans kept after {i} confirmations", confirms.spans());
        }
        assert_eq!(confirms.lead(1_700_000_000_000 + 36_000 * 100), MAX_START_LEAD);
    }

    /// A clock set far ahead (to the end of time, even) and back does not leave the lead stuck
    /// on what was recorded in the future: a stall is remembered for at most five minutes of the
    /// clock as it now reads.
    #[test]
    fn a_clock_set_back_forgets_the_spans_it_places_in_the_future() {
        let now = 1_700_000_000_000_i64;
        for ahead in [now + 3_600_000, i64::MAX] {
            let mut confirms = Confirms::default();
            confirms.record(now, 30);
            confirms.record(ahead, 400);
            assert_eq!(confirms.lead(ahead), MAX_START_LEAD);
            assert_eq!(confirms.lead(now), START_LEAD, "a span in the future does not count");
            confirms.record(now + 1, 30);
            assert_eq!(confirms.spans(), 1);
            assert_eq!(confirms.lead(now + 2), START_LEAD);
        }
        // And the extremes of the clock and of a duration in any order are total.
        let mut confirms = Confirms::default();
        for (at, took) in
            [(i64::MIN, u64::MAX), (i64::MAX, 0), (0, u64::MAX), (i64::MIN, 1), (i64::MAX, u64::MAX)]
        {
            confirms.record(at, took);
            assert!(confirms.spans() <= 2);
            assert!(confirms.lead(at) <= MAX_START_LEAD && confirms.lead(at) >= START_LEAD);
        }
    }
}
