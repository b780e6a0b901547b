//! Run seats (issue 21): a launch intent on `run/<task>/@<seat>` overwrites the run that had
//! the seat before, so that run leaves the view (its report an orphan) as a `deleted` record on
//! its intent would make it leave, and compaction drops its intent for free. A reader of the
//! compacted log holds what a live reader holds.

use std::sync::Arc;

use shiva_proto::records::{Body, Claim, Deleted, Trim};
use shiva_proto::runs::{MAX_SEATS, RunIntent, RunPhase, RunReport};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::{TopicKind, key};
use shiva_proto::view::{LogView, Outcome};
use uuid::Uuid;

mod common;
use common::{Log, RUNNER, slot_intent};

impl Log {
    /// The leader's intent on its key, then the runner's end on the run's report key.
    fn run(&mut self, intent: RunIntent) -> Outcome {
        let outcome =
            self.leader(TopicKind::Assignments, &key::intent(&intent), Some(Body::RunIntent(intent.clone())));
        self.report(&intent, RunPhase::Succeeded);
        outcome
    }

    /// The runner's record of `intent`'s run in `state`, on its key (its seat's with one).
    fn report(&mut self, intent: &RunIntent, state: RunPhase) -> Outcome {
        let report = RunReport::of(intent, state);
        self.write(
            TopicKind::Status,
            &key::report(&report),
            ("runner-007", RUNNER),
            Some(Body::RunReport(report)),
        )
    }

    /// The status offset the next record would take, less one: what a leader read so far.
    fn status_seen(&self) -> i64 {
        self.records.iter().filter(|(topic, ..)| *topic == TopicKind::Status).count() as i64 - 1
    }

    /// A reader of the compacted log that reads `first` to its end before the other topics.
    fn compacted_apart(&self, first: TopicKind) -> LogView {
        let mut view = LogView::default();
        for pass in [true, false] {
            for (i, (topic, offset, key, value)) in self.records.iter().enumerate() {
                let newest = !self.records[i + 1..].iter().any(|(t, _, k, _)| t == topic && k == key);
                if (*topic == first) == pass && newest {
                    view.apply(*topic, *offset, Some(key.as_bytes()), value.as_deref());
                }
            }
        }
        view
    }

    fn claimed() -> Log {
        let mut log = Log::default();
        let leader = shiva_proto::NodeId::new("leader-001").unwrap();
        let claim = key::claim(1, &leader, Uuid::from_u128(3));
        log.leader(TopicKind::Assignments, &claim, Some(Body::Claim(Claim { epoch: 1 })));
        log
    }
}

fn spec() -> Arc<TaskSpec> {
    let spec = serde_json::json!({"id": "cron/t", "command": "true", "schedule": "* * * * *"});
    Arc::new(serde_json::from_value(spec).unwrap())
}

fn on_seat(slot: i64, seat: u16) -> RunIntent {
    RunIntent { seat: Some(seat), status_seen: Some(-1), ..slot_intent(&spec(), slot * 60_000) }
}

#[test]
fn an_intent_on_a_seat_overwrites_the_run_before_it_and_the_compacted_log_agrees() {
    let mut log = Log::claimed();
    let task = spec().id.clone();
    let first = on_seat(0, 3);
    assert_eq!(log.run(first.clone()), Outcome::Applied("run_intent"));
    let second = RunIntent { status_seen: Some(log.status_seen()), ..on_seat(1, 3) };
    assert_eq!(log.view.run_on_seat(&task, 3), Some(first.run_id));
    assert_eq!(log.view.run(&task, &first.run_id).unwrap().intent_key(), Some("run/cron/t/@3".to_owned()));
    assert_eq!(log.run(second.clone()), Outcome::Applied("run_intent"));
    // The first run is gone: its intent overwritten on `assignments`, its report on `status`.
    assert!(log.view.run(&task, &first.run_id).is_none());
    assert_eq!(log.view.run_on_seat(&task, 3), Some(second.run_id));
    assert_eq!(log.view.run(&task, &second.run_id).unwrap().phase(), RunPhase::Succeeded);
    assert_eq!(log.compacted().runs, log.view.runs);
    // A restamp of the run on the seat (same run, new content) overwrites nothing else.
    let restamp = RunIntent { verdict: Some(RunPhase::Succeeded), ..second.clone() };
    log.leader(TopicKind::Assignments, "run/cron/t/@3", Some(Body::RunIntent(restamp)));
    assert!(log.view.run(&task, &second.run_id).unwrap().has_intent());
    assert_eq!(log.compacted().runs, log.view.runs);
}

#[test]
fn a_seat_intent_on_the_wrong_key_or_past_the_last_seat_or_not_the_leaders_changes_nothing() {
    let mut log = Log::claimed();
    let kept = on_seat(0, 1);
    log.run(kept.clone());
    let before = log.view.runs.clone();
    let wrong = on_seat(1, 1);
    for (key, intent, why) in [
        ("run/cron/t/@2", wrong.clone(), "key does not match"),
        (&*key::run(&wrong.task, wrong.run_id), wrong.clone(), "key does not match"),
        ("run/cron/t/@1", RunIntent { seat: None, ..wrong.clone() }, "key does not match"),
        (
            &*format!("run/cron/t/@{MAX_SEATS}"),
            RunIntent { seat: Some(MAX_SEATS as u16), ..wrong.clone() },
            "past the last",
        ),
    ] {
        let outcome = log.leader(TopicKind::Assignments, key, Some(Body::RunIntent(intent)));
        assert!(matches!(&outcome, Outcome::Skipped(reason) if reason.contains(why)), "{key}: {outcome:?}");
    }
    let outcome = log.write(
        TopicKind::Assignments,
        "run/cron/t/@1",
        ("intruder", RUNNER),
        Some(Body::RunIntent(wrong)),
    );
    assert!(matches!(outcome, Outcome::Skipped(_)));
    assert_eq!(log.view.runs, before, "the run on the seat stays");
    assert!(!log.view.is_settled(TopicKind::Assignments, "run/cron/t/@1"), "the leader writes it again");
}

#[test]
fn a_seat_is_deleted_only_by_the_leader_and_a_trim_record_may_list_it() {
    let mut log = Log::claimed();
    let task = spec().id.clone();
    let runs: Vec<RunIntent> = (0..3).map(|slot| on_seat(slot, slot as u16)).collect();
    for intent in &runs {
        log.run(intent.clone());
    }
    // A bare tombstone on a held seat is refused.
    assert!(matches!(
        log.write(TopicKind::Assignments, "run/cron/t/@0", ("anyone", RUNNER), None),
        Outcome::Skipped(_)
    ));
    assert!(log.view.run(&task, &runs[0].run_id).unwrap().has_intent());
    // The leader's `deleted` record deletes the seat's run; its tombstone is then taken.
    let deleted = Some(Body::Deleted(Deleted { epoch: 1 }));
    assert_eq!(log.leader(TopicKind::Assignments, "run/cron/t/@0", deleted), Outcome::Applied("deleted"));
    assert!(!log.view.run(&task, &runs[0].run_id).unwrap().has_intent());
    assert_eq!(
        log.write(TopicKind::Assignments, "run/cron/t/@0", ("anyone", RUNNER), None),
        Outcome::Applied("tombstone")
    );
    // A `trim` record lists seats, on either topic.
    let seats = vec!["run/cron/t/@1".to_owned(), "run/cron/t/@2".to_owned()];
    for (topic, id) in [(TopicKind::Status, 9), (TopicKind::Assignments, 10)] {
        let trim = key::trim(1, Uuid::from_u128(id));
        let body = Some(Body::Trim(Trim { epoch: 1, keys: seats.clone() }));
        assert_eq!(log.leader(topic, &trim, body), Outcome::Applied("trim"));
    }
    assert!(
        log.view
            .runs_of(&task)
            .all(|run| !run.has_intent() && (!run.has_report() || run.id() == runs[0].run_id))
    );
    assert!(log.view.trimmed_runs_of(&task));
    for seat in &seats {
        for topic in [TopicKind::Assignments, TopicKind::Status] {
            assert_eq!(log.write(topic, seat, ("anyone", RUNNER), None), Outcome::Applied("tombstone"));
        }
    }
    assert!(!log.view.trimmed_runs_of(&task));
    assert_eq!(log.compacted().runs, log.view.runs);
}

/// The run on a seat reports on the seat's `status` key, over the report of the run before: that
/// report leaves the view with it. A late record of the run before (a copy its runner wrote
/// again, landing after the new run's) leaves the new run's own records unreadable in a compacted
/// log: every reader then takes the new run as maybe started (`starting`, never `missed`), in
/// whatever order it reads the topics, until the new run's runner writes again.
#[test]
fn a_late_report_of_the_run_before_on_a_seat_leaves_the_run_on_it_maybe_started_never_missed() {
    let mut log = Log::claimed();
    let task = spec().id.clone();
    let before = on_seat(0, 5);
    log.run(before.clone());
    let intent = RunIntent { status_seen: Some(log.status_seen()), ..on_seat(1, 5) };
    log.leader(TopicKind::Assignments, &key::intent(&intent), Some(Body::RunIntent(intent.clone())));
    // Before its own start record, the report of the run before on its seat is no word of it.
    assert_eq!(log.view.run(&task, &intent.run_id).unwrap().phase(), RunPhase::Scheduled);
    log.report(&intent, RunPhase::Starting);
    assert_eq!(log.view.run(&task, &intent.run_id).unwrap().phase(), RunPhase::Starting);
    assert!(log.view.run(&task, &before.run_id).is_none());
    // The run ends, then the old run's end lands again, late.
    log.report(&intent, RunPhase::Succeeded);
    log.report(&before, RunPhase::Succeeded);
    let views = [
        log.view.clone(),
        log.compacted(),
        log.compacted_apart(TopicKind::Status),
        log.compacted_apart(TopicKind::Assignments),
    ];
    for view in &views {
        let run = view.run(&task, &intent.run_id).unwrap();
        assert!(run.overwritten() && !run.has_report());
        assert_eq!(run.phase(), RunPhase::Starting, "maybe started, not over and never missed");
        let judged = RunIntent { verdict: Some(RunPhase::Missed), ..intent.clone() };
        let entry =
            shiva_proto::view::RunEntry { intent: Some((judged, 0)), report: None, overwritten: true };
        assert_eq!(entry.phase(), RunPhase::Starting, "a missed verdict does not stand over it");
        assert_eq!(view.runs, views[0].runs);
    }
    // Its runner writes again: the run reads as it says.
    log.report(&intent, RunPhase::Succeeded);
    for view in [&log.view, &log.compacted(), &log.compacted_apart(TopicKind::Status)] {
        let run = view.run(&task, &intent.run_id).unwrap();
        assert!(!run.overwritten());
        assert_eq!(run.phase(), RunPhase::Succeeded);
    }
    // A record of the run before at or below what the leader had read is no overwrite: a
    // reader that reads `status` late folds it after the new intent.
    let mut late_reader = LogView::default();
    for (topic, offset, key, value) in
        log.records.iter().filter(|(topic, ..)| *topic == TopicKind::Assignments)
    {
        late_reader.apply(*topic, *offset, Some(key.as_bytes()), value.as_deref());
    }
    let first_status = log.records.iter().find(|(topic, ..)| *topic == TopicKind::Status).unwrap();
    late_reader.apply(
        TopicKind::Status,
        first_status.1,
        Some(first_status.2.as_bytes()),
        first_status.3.as_deref(),
    );
    assert!(!late_reader.run(&task, &intent.run_id).unwrap().overwritten());
}

#[test]
fn a_report_on_a_seat_must_match_its_key_and_its_intent() {
    let mut log = Log::claimed();
    let task = spec().id.clone();
    let intent = on_seat(0, 2);
    log.leader(TopicKind::Assignments, &key::intent(&intent), Some(Body::RunIntent(intent.clone())));
    let report = RunReport::of(&intent, RunPhase::Starting);
    for key in ["run/cron/t/@3".to_owned(), key::run(&task, intent.run_id)] {
        let outcome =
            log.write(TopicKind::Status, &key, ("runner-007", RUNNER), Some(Body::RunReport(report.clone())));
        assert!(
            matches!(&outcome, Outcome::Skipped(reason) if reason.contains("key does not match")),
            "{key}: {outcome:?}"
        );
    }
    assert!(!log.view.run(&task, &intent.run_id).unwrap().has_report());
    // An intent on a seat without the status offset its leader read is refused.
    let bare = RunIntent { status_seen: None, ..on_seat(1, 4) };
    let outcome =
        log.leader(TopicKind::Assignments, &key::intent(&bare), Some(Body::RunIntent(bare.clone())));
    assert!(matches!(&outcome, Outcome::Skipped(reason) if reason.contains("status_seen")), "{outcome:?}");
}
