//! What a retained run costs in a node's memory (issue 21, point 2): the log view's heap,
//! counted by the allocator (the bytes asked for: the allocator's own rounding and headers come
//! on top), after folding a history of finished periodic runs as a node reads it: the leader's
//! claim, the nodes' heartbeats, the specs, then each run's intent on `assignments` and its end
//! on `status`.

use std::alloc::System;
use std::sync::Arc;

use shiva_proto::TaskId;
use shiva_proto::records::{Body, Envelope, ExitInfo};
use shiva_proto::runs::{RunIntent, RunPhase, RunReport, Trigger, run_id};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::{TopicKind, key};
use shiva_proto::view::LogView;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use uuid::Uuid;

/// The system allocator, counting what it hands out and takes back.
#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes the view holds per run, with `tasks` × `runs` finished runs folded.
fn bytes_per_run(tasks: usize, runs: usize) -> f64 {
    let (leader, runner) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let mut view = LogView::default();
    let mut offsets = [0i64; 4];
    let mut apply = |view: &mut LogView, topic: TopicKind, key: &str, envelope: Envelope| {
        let slot = match topic {
            TopicKind::Commands => 0,
            TopicKind::Control => 1,
            TopicKind::Assignments => 2,
            TopicKind::Status => 3,
        };
        let offset = offsets[slot];
        offsets[slot] += 1;
        let value = envelope.encode();
        view.apply(topic, offset, Some(key.as_bytes()), Some(&value));
    };
    // The nodes' heartbeats and the specs first: as in a node, the runs name nodes and tasks
    // the view knows.
    for (node, incarnation) in [("leader-001", leader), ("runner-007", runner)] {
        let id = shiva_proto::NodeId::new(node).unwrap();
        let heartbeat = Body::Heartbeat(shiva_proto::records::Heartbeat::of_newer_protocol(1));
        apply(
            &mut view,
            TopicKind::Control,
            &key::node(&id),
            Envelope::now(node, Some(incarnation), heartbeat),
        );
    }
    // The leader's claim of its epoch.
    let claim = Body::Claim(shiva_proto::records::Claim { epoch: 1 });
    let leader_id = shiva_proto::NodeId::new("leader-001").unwrap();
    apply(
        &mut view,
        TopicKind::Assignments,
        &key::claim(1, &leader_id, Uuid::from_u128(3)),
        Envelope::now("leader-001", Some(leader), claim),
    );
    let mut specs = Vec::new();
    for t in 0..tasks {
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "id": format!("hist/t{t:05}"), "command": "true", "schedule": "0 0 1 1 *",
        }))
        .unwrap();
        let key = key::task(&spec.id);
        apply(
            &mut view,
            TopicKind::Commands,
            &key,
            Envelope::now("ctl:bench", None, Body::Task(spec.clone())),
        );
        specs.push(Arc::new(spec));
    }
    let region = Region::new(ALLOCATOR);
    let now_ms = 1_795_315_713_425i64;
    for spec in &specs {
        let task: &TaskId = &spec.id;
        for r in 0..runs {
            let slot_ms = now_ms - ((runs - r) as i64) * 86_400_000;
            let trigger = Trigger::Slot { slot_ms };
            let run = run_id(task, trigger, 1);
            let intent = RunIntent {
                epoch: 1,
                task: task.clone(),
                run_id: run,
                attempt: 1,
                trigger,
                node: Some(shiva_proto::NodeId::new("runner-007").unwrap()),
                launch_at_ms: slot_ms,
                written_at_ms: Some(slot_ms - 150),
                spec_revision: 0,
                spec: spec.clone(),
                stop: None,
                verdict: None,
                note: None,
                incarnation: Some(runner),
                seat: None,
                status_seen: None,
            };
            let report = RunReport {
                task: task.clone(),
                run_id: run,
                attempt: 1,
                trigger,
                state: RunPhase::Succeeded,
                pid: Some(1000 + r as u32),
                started_ms: Some(slot_ms + 3),
                late_ms: Some(3),
                ended_ms: Some(slot_ms + 50),
                exit: Some(ExitInfo { code: Some(0), signal: None }),
                message: None,
                seat: None,
            };
            let key = key::run(task, run);
            apply(
                &mut view,
                TopicKind::Assignments,
                &key,
                Envelope::now("leader-001", Some(leader), Body::RunIntent(intent)),
            );
            apply(
                &mut view,
                TopicKind::Status,
                &key,
                Envelope::now("runner-007", Some(runner), Body::RunReport(report)),
            );
        }
    }
    let change = region.change();
    // (A reallocation counts in both already: `bytes_reallocated` is their net, not more.)
    let held = change.bytes_allocated as isize - change.bytes_deallocated as isize;
    let retained: usize = view.runs.values().map(|runs| runs.len()).sum();
    assert_eq!(retained, tasks * runs, "every run is retained");
    assert!(view.open_runs.is_empty(), "every run is over");
    assert!(
        view.all_runs().all(|run| run.has_intent() && run.has_report()),
        "every run has its intent and its end"
    );
    held as f64 / retained as f64
}

/// Issue 21's goal: at most 300 bytes per retained run. A run over is kept compact (234 bytes
/// a run here, was 447 with both records kept in full, 1,174 before the earlier changes).
#[test]
fn a_retained_run_holds_at_most_300_bytes_of_the_log_views_heap() {
    let per_run = bytes_per_run(200, 100);
    println!("a retained run: {per_run:.0} bytes of the log view's heap");
    assert!(per_run <= 300.0, "a retained run holds {per_run:.0} bytes");
}
