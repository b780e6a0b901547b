//! Runs kept compact once over (issue 21, memory per retained run): what a reader reads back
//! of them. Apart from `run_memory`, whose allocation count would see this test's.

use std::sync::Arc;

use shiva_proto::records::{Body, Envelope, ExitInfo};
use shiva_proto::runs::{RunIntent, RunPhase, RunReport, Trigger, run_id};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::{TopicKind, key};
use shiva_proto::view::LogView;
use uuid::Uuid;

/// A run kept compact once over reads back as its two records said, but for what the compact
/// form documents it leaves out (`written_at_ms`, the report's `pid`, `late_ms` and sender);
/// records landing on it later fold in as on a run kept in full, and a `deleted` marker of its
/// intent leaves the report, in full.
#[test]
fn a_run_over_reads_back_as_its_records_said_and_takes_later_records() {
    use shiva_proto::records::Deleted;
    use shiva_proto::view::{Run, RunEntry};
    let (leader, runner) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let leader_id = shiva_proto::NodeId::new("leader-001").unwrap();
    let runner_id = shiva_proto::NodeId::new("runner-007").unwrap();
    let mut view = LogView::default();
    let mut offset = 0;
    let mut apply = |view: &mut LogView, topic: TopicKind, key: &str, envelope: Option<Envelope>| {
        offset += 1;
        let value = envelope.map(|envelope| envelope.encode());
        view.apply(topic, offset, Some(key.as_bytes()), value.as_deref())
    };
    let claim = Body::Claim(shiva_proto::records::Claim { epoch: 1 });
    let claim_key = key::claim(1, &leader_id, Uuid::from_u128(3));
    apply(
        &mut view,
        TopicKind::Assignments,
        &claim_key,
        Some(Envelope::now("leader-001", Some(leader), claim)),
    );
    let spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "id": "hist/t", "command": "true", "schedule": "* * * * *",
    }))
    .unwrap();
    let task = spec.id.clone();
    let trigger = Trigger::Slot { slot_ms: 1_795_315_680_000 };
    let run = run_id(&task, trigger, 1);
    let key = key::run(&task, run);
    let intent = RunIntent {
        epoch: 1,
        task: task.clone(),
        run_id: run,
        attempt: 1,
        trigger,
        node: Some(runner_id.clone()),
        launch_at_ms: 1_795_315_680_040,
        written_at_ms: Some(1_795_315_679_000),
        spec_revision: 7,
        spec: Arc::new(spec),
        stop: Some("asked to".into()),
        verdict: None,
        note: Some("a note".into()),
        incarnation: Some(runner),
    };
    let report = RunReport {
        task: task.clone(),
        run_id: run,
        attempt: 1,
        trigger,
        state: RunPhase::Stopped,
        pid: Some(4242),
        started_ms: Some(1_795_315_680_043),
        late_ms: Some(3),
        ended_ms: Some(1_795_315_680_900),
        exit: Some(ExitInfo { code: None, signal: Some(15) }),
        message: Some("stopped: asked to".into()),
    };
    let leader_says = |body| Some(Envelope::now("leader-001", Some(leader), body));
    apply(&mut view, TopicKind::Assignments, &key, leader_says(Body::RunIntent(intent.clone())));
    assert!(matches!(view.runs[&task][&run], Run::Full(_)), "in flight, in full");
    let report_offset = 3;
    apply(
        &mut view,
        TopicKind::Status,
        &key,
        Some(Envelope::now("runner-007", Some(runner), Body::RunReport(report.clone()))),
    );
    assert!(matches!(view.runs[&task][&run], Run::Done(_)), "over, compact");
    assert!(view.open_runs.is_empty());
    let expected = RunEntry {
        intent: Some((RunIntent { written_at_ms: None, ..intent.clone() }, 2)),
        report: Some(shiva_proto::view::ReportEntry {
            node: runner_id.clone(),
            incarnation: runner,
            offset: report_offset,
            report: RunReport { pid: None, late_ms: None, ..report.clone() },
        }),
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
        Some(Envelope::now("runner-007", Some(runner), Body::RunReport(start))),
    );
    let read = view.run(&task, &run).unwrap();
    assert!(matches!(view.runs[&task][&run], Run::Done(_)));
    assert_eq!(read.phase(), RunPhase::Stopped);
    assert_eq!(read.reported(), Some((RunPhase::Starting, report.started_ms)));
    assert_eq!(read.intent().unwrap().verdict, Some(RunPhase::Stopped));
    // The intent deleted: the report is an orphan, kept in full, not open.
    apply(&mut view, TopicKind::Assignments, &key, leader_says(Body::Deleted(Deleted { epoch: 1 })));
    let read = view.run(&task, &run).unwrap();
    assert!(!read.has_intent() && read.has_report());
    assert!(matches!(view.runs[&task][&run], Run::Full(_)));
}
