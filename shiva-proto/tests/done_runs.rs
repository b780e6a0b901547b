//! Runs kept compact (issue 21, memory per retained run): what a reader reads back
//! of them. Apart from `run_memory`, whose allocation count would see this test's.

use std::sync::Arc;

use shiva_proto::records::{Body, Envelope, ExitInfo};
use shiva_proto::runs::{RunIntent, RunPhase, RunReport};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::{TopicKind, key};
use shiva_proto::view::LogView;
use uuid::Uuid;

mod common;
use common::slot_intent;

/// The leader's incarnation, and its claim of epoch 1.
const LEADER: Uuid = Uuid::from_u128(1);

fn claim() -> (String, Envelope) {
    let leader = shiva_proto::NodeId::new("leader-001").unwrap();
    let claim = Body::Claim(shiva_proto::records::Claim { epoch: 1 });
    (key::claim(1, &leader, Uuid::from_u128(3)), Envelope::now("leader-001", Some(LEADER), claim))
}

/// A periodic task's spec.
fn spec(id: &str) -> Arc<TaskSpec> {
    let spec = serde_json::json!({"id": id, "command": "true", "schedule": "* * * * *"});
    Arc::new(serde_json::from_value(spec).unwrap())
}

/// A run kept compact reads back exactly as its two records said; records landing on
/// it later fold in as on a run kept in full, and a `deleted` marker of its intent leaves the
/// report, exactly as it was read.
#[test]
fn a_run_over_reads_back_as_its_records_said_and_takes_later_records() {
    use shiva_proto::records::Deleted;
    use shiva_proto::view::{Run, RunEntry};
    let runner = Uuid::from_u128(2);
    let runner_id = shiva_proto::NodeId::new("runner-007").unwrap();
    let mut view = LogView::default();
    let mut offset = 0;
    let mut apply = |view: &mut LogView, topic: TopicKind, key: &str, envelope: Option<Envelope>| {
        offset += 1;
        let value = envelope.map(|envelope| envelope.encode());
        view.apply(topic, offset, Some(key.as_bytes()), value.as_deref())
    };
    let (claim_key, claim) = claim();
    apply(&mut view, TopicKind::Assignments, &claim_key, Some(claim));
    let spec = spec("hist/t");
    let task = spec.id.clone();
    let intent = RunIntent {
        launch_at_ms: 1_795_315_680_040,
        written_at_ms: Some(1_795_315_679_000),
        spec_revision: 7,
        stop: Some("asked to".into()),
        note: Some("a note".into()),
        incarnation: Some(runner),
        ..slot_intent(&spec, 1_795_315_680_000)
    };
    let (trigger, run) = (intent.trigger, intent.run_id);
    let key = key::run(&task, run);
    let report = RunReport {
        pid: Some(4242),
        started_ms: Some(1_795_315_680_043),
        late_ms: Some(3),
        ended_ms: Some(1_795_315_680_900),
        exit: Some(ExitInfo { code: None, signal: Some(15) }),
        message: Some("stopped: asked to".into()),
        ..RunReport::of(&intent, RunPhase::Stopped)
    };
    let leader_says = |body| Some(Envelope::now("leader-001", Some(LEADER), body));
    apply(&mut view, TopicKind::Assignments, &key, leader_says(Body::RunIntent(intent.clone())));
    assert!(matches!(view.runs[&task][&run], Run::Compact(_)), "compact from its intent on");
    let read = view.run(&task, &run).unwrap();
    assert_eq!(read.in_flight_on(), Some(&runner_id));
    assert_eq!(
        *read.entry(),
        RunEntry { intent: Some((intent.clone(), 2)), report: None, overwritten: false }
    );
    assert!(!view.open_runs.is_empty());
    let report_offset = 3;
    apply(
        &mut view,
        TopicKind::Status,
        &key,
        Some(Envelope::now("runner-007", Some(runner), Body::RunReport(report.clone()))),
    );
    assert!(matches!(view.runs[&task][&run], Run::Compact(_)), "over, compact still");
    assert!(view.open_runs.is_empty());
    let expected = RunEntry {
        intent: Some((intent.clone(), 2)),
        report: Some(shiva_proto::view::ReportEntry {
            node: runner_id.clone(),
            incarnation: runner,
            offset: report_offset,
            report: report.clone(),
        }),
        overwritten: false,
    };
    let read = view.run(&task, &run).unwrap();
    assert_eq!(*read.entry(), expected);
    assert_eq!(
        (read.phase(), read.intent_offset(), read.report_offset()),
        (RunPhase::Stopped, Some(2), Some(report_offset))
    );
    assert_eq!((read.epoch(), read.slot_ms(), read.attempt()), (Some(1), trigger.slot_ms(), Some(1)));
    assert!(read.stop_requested() && read.has_intent() && read.has_report() && read.in_flight_on().is_none());
    // A restamp with the end as its verdict, then a late copy of the start record: over still,
    // by the verdict, and the start record is the report now.
    let restamp = RunIntent { verdict: Some(RunPhase::Stopped), ..intent.clone() };
    apply(&mut view, TopicKind::Assignments, &key, leader_says(Body::RunIntent(restamp)));
    let start =
        RunReport { state: RunPhase::Starting, ended_ms: None, exit: None, message: None, ..report.clone() };
    apply(
        &mut view,
        TopicKind::Status,
        &key,
        Some(Envelope::now("runner-007", Some(runner), Body::RunReport(start.clone()))),
    );
    let read = view.run(&task, &run).unwrap();
    assert!(matches!(view.runs[&task][&run], Run::Compact(_)));
    assert_eq!(read.phase(), RunPhase::Stopped);
    assert_eq!(read.reported(), Some((RunPhase::Starting, report.started_ms)));
    assert_eq!(read.intent().unwrap().verdict, Some(RunPhase::Stopped));
    // The intent deleted: the report is an orphan, compact too.
    apply(&mut view, TopicKind::Assignments, &key, leader_says(Body::Deleted(Deleted { epoch: 1 })));
    let read = view.run(&task, &run).unwrap();
    assert!(!read.has_intent() && read.has_report());
    assert!(matches!(view.runs[&task][&run], Run::Compact(_)));
    let orphan =
        shiva_proto::view::ReportEntry { node: runner_id, incarnation: runner, offset: 5, report: start };
    assert_eq!(*read.entry(), RunEntry { intent: None, report: Some(orphan), overwritten: false });
}

/// What the compact form cannot rebuild from the intent is kept: a report sent by another
/// node or incarnation than the intent names, by an older leader's intent naming none, or a
/// report that disagrees with its intent's attempt (kept in full).
#[test]
fn a_report_from_another_sender_or_of_another_attempt_reads_back_as_it_was() {
    use shiva_proto::view::{Run, RunEntry};
    let spec = spec("hist/u");
    let task = spec.id.clone();
    let cases: [(Option<Uuid>, &str, Uuid, u32, bool); 4] = [
        (Some(Uuid::from_u128(7)), "runner-007", Uuid::from_u128(7), 1, true),
        (Some(Uuid::from_u128(7)), "runner-008", Uuid::from_u128(8), 1, true),
        (None, "runner-007", Uuid::from_u128(7), 1, true),
        (Some(Uuid::from_u128(7)), "runner-007", Uuid::from_u128(7), 2, false),
    ];
    for (i, (named, sender, incarnation, attempt, compact)) in cases.into_iter().enumerate() {
        let mut view = LogView::default();
        let (claim_key, claim) = claim();
        view.apply(TopicKind::Assignments, 0, Some(claim_key.as_bytes()), Some(&claim.encode()));
        let intent =
            RunIntent { launch_at_ms: 60_000, incarnation: named, ..slot_intent(&spec, 60_000 * i as i64) };
        let run = intent.run_id;
        let report = RunReport {
            attempt,
            ended_ms: Some(-5),
            exit: Some(ExitInfo { code: Some(-1), signal: None }),
            ..RunReport::of(&intent, RunPhase::Failed)
        };
        let key = key::run(&task, run);
        let node = shiva_proto::NodeId::new(sender).unwrap();
        // The report first (`status` read ahead of `assignments`): compact, as read.
        let value = Envelope::now(sender, Some(incarnation), Body::RunReport(report.clone())).encode();
        view.apply(TopicKind::Status, 1, Some(key.as_bytes()), Some(&value));
        assert!(matches!(view.runs[&task][&run], Run::Compact(_)), "case {i}");
        let alone = shiva_proto::view::ReportEntry {
            node: node.clone(),
            incarnation,
            offset: 1,
            report: report.clone(),
        };
        assert_eq!(
            *view.run(&task, &run).unwrap().entry(),
            RunEntry { intent: None, report: Some(alone), overwritten: false }
        );
        let value = Envelope::now("leader-001", Some(LEADER), Body::RunIntent(intent.clone())).encode();
        view.apply(TopicKind::Assignments, 1, Some(key.as_bytes()), Some(&value));
        assert_eq!(matches!(view.runs[&task][&run], Run::Compact(_)), compact, "case {i}");
        let expected = RunEntry {
            intent: Some((intent, 1)),
            report: Some(shiva_proto::view::ReportEntry { node, incarnation, offset: 1, report }),
            overwritten: false,
        };
        assert_eq!(*view.run(&task, &run).unwrap().entry(), expected, "case {i}");
    }
}

/// A `missed` verdict crossed by a start record of the node its intent names: the run may have
/// started, and reads as that node says (until it ends the run or the leader judges it `lost`);
/// a start record from any other node leaves it `missed`. The same live and replayed.
#[test]
fn a_missed_verdict_gives_way_only_to_the_start_record_of_the_runs_own_node() {
    let runner = shiva_proto::NodeId::new("runner-007").unwrap();
    for (sender, phase) in [("runner-007", RunPhase::Starting), ("runner-008", RunPhase::Missed)] {
        let mut view = LogView::default();
        let mut offset = 0;
        let mut apply = |view: &mut LogView, topic: TopicKind, key: &str, envelope: Envelope| {
            offset += 1;
            view.apply(topic, offset, Some(key.as_bytes()), Some(&envelope.encode()))
        };
        let (claim_key, claim) = claim();
        apply(&mut view, TopicKind::Assignments, &claim_key, claim);
        let spec = spec("hist/m");
        let intent = RunIntent { node: Some(runner.clone()), ..slot_intent(&spec, 1_795_315_680_000) };
        let key = key::run(&intent.task, intent.run_id);
        let start = RunReport::of(&intent, RunPhase::Starting);
        apply(
            &mut view,
            TopicKind::Status,
            &key,
            Envelope::now(sender, Some(Uuid::from_u128(2)), Body::RunReport(start)),
        );
        let judged = RunIntent { verdict: Some(RunPhase::Missed), ..intent.clone() };
        apply(
            &mut view,
            TopicKind::Assignments,
            &key,
            Envelope::now("leader-001", Some(LEADER), Body::RunIntent(judged)),
        );
        let run = view.run(&intent.task, &intent.run_id).unwrap();
        assert_eq!(run.phase(), phase, "a start record from {sender}");
        assert_eq!(run.entry().phase(), phase, "{sender}: the run in full");
    }
}
