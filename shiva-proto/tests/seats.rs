//! Run seats (issue 21): a launch intent on `run/<task>/@<seat>` overwrites the run that had
//! the seat before, so that run leaves the view (its report an orphan) as a `deleted` record on
//! its intent would make it leave, and compaction drops its intent for free. A reader of the
//! compacted log holds what a live reader holds.

use std::sync::Arc;

use shiva_proto::records::{Body, Claim, Deleted, Envelope, Trim};
use shiva_proto::runs::{MAX_SEATS, RunIntent, RunPhase, RunReport};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::{TopicKind, key};
use shiva_proto::view::{LogView, Outcome};
use uuid::Uuid;

mod common;
use common::slot_intent;

const LEADER: Uuid = Uuid::from_u128(1);
const RUNNER: Uuid = Uuid::from_u128(2);

#[derive(Default)]
struct Log {
    records: Vec<(TopicKind, i64, String, Option<Vec<u8>>)>,
    view: LogView,
}

impl Log {
    fn write(&mut self, topic: TopicKind, key: &str, sender: (&str, Uuid), body: Option<Body>) -> Outcome {
        let offset = self.records.iter().filter(|(of, ..)| *of == topic).count() as i64;
        let value = body.map(|body| Envelope::now(sender.0, Some(sender.1), body).encode());
        self.records.push((topic, offset, key.to_owned(), value.clone()));
        self.view.apply(topic, offset, Some(key.as_bytes()), value.as_deref())
    }

    fn leader(&mut self, topic: TopicKind, key: &str, body: Option<Body>) -> Outcome {
        self.write(topic, key, ("leader-001", LEADER), body)
    }

    /// The leader's intent on its key, then the runner's end on the run's report key.
    fn run(&mut self, intent: RunIntent) -> Outcome {
        let outcome =
            self.leader(TopicKind::Assignments, &key::intent(&intent), Some(Body::RunIntent(intent.clone())));
        let report = RunReport::of(&intent, RunPhase::Succeeded);
        let at = key::run(&intent.task, intent.run_id);
        self.write(TopicKind::Status, &at, ("runner-007", RUNNER), Some(Body::RunReport(report)));
        outcome
    }

    fn compacted(&self) -> LogView {
        let mut view = LogView::default();
        for (i, (topic, offset, key, value)) in self.records.iter().enumerate() {
            if !self.records[i + 1..].iter().any(|(t, _, k, _)| t == topic && k == key) {
                view.apply(*topic, *offset, Some(key.as_bytes()), value.as_deref());
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
    RunIntent { seat: Some(seat), ..slot_intent(&spec(), slot * 60_000) }
}

#[test]
fn an_intent_on_a_seat_overwrites_the_run_before_it_and_the_compacted_log_agrees() {
    let mut log = Log::claimed();
    let task = spec().id.clone();
    let (first, second) = (on_seat(0, 3), on_seat(1, 3));
    assert_eq!(log.run(first.clone()), Outcome::Applied("run_intent"));
    assert_eq!(log.view.run_on_seat(&task, 3), Some(first.run_id));
    assert_eq!(log.view.run(&task, &first.run_id).unwrap().intent_key(), Some("run/cron/t/@3".to_owned()));
    assert_eq!(log.run(second.clone()), Outcome::Applied("run_intent"));
    // The first run's intent is gone; its report is left, an orphan the leader deletes.
    let before = log.view.run(&task, &first.run_id).unwrap();
    assert!(!before.has_intent() && before.has_report());
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
fn a_seat_is_deleted_only_by_the_leader_and_a_trim_record_may_list_it_on_assignments_only() {
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
    // A `trim` record lists seats on `assignments`; on `status` a seat is no run key.
    let seats = vec!["run/cron/t/@1".to_owned(), "run/cron/t/@2".to_owned()];
    let outcome = log.leader(
        TopicKind::Status,
        &key::trim(1, Uuid::from_u128(9)),
        Some(Body::Trim(Trim { epoch: 1, keys: seats.clone() })),
    );
    assert!(
        matches!(&outcome, Outcome::Skipped(reason) if reason.contains("not a run key of")),
        "{outcome:?}"
    );
    let trim = key::trim(1, Uuid::from_u128(10));
    assert_eq!(
        log.leader(TopicKind::Assignments, &trim, Some(Body::Trim(Trim { epoch: 1, keys: seats.clone() }))),
        Outcome::Applied("trim")
    );
    assert!(log.view.runs_of(&task).all(|run| !run.has_intent()));
    assert!(log.view.trimmed_runs_of(&task));
    for seat in &seats {
        assert_eq!(
            log.write(TopicKind::Assignments, seat, ("anyone", RUNNER), None),
            Outcome::Applied("tombstone")
        );
    }
    assert!(!log.view.trimmed_runs_of(&task));
    assert_eq!(log.compacted().runs, log.view.runs);
}
