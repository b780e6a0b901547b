//! Golden fixtures: each file in `tests/data/` is one record exactly as it travels (the same
//! examples as `docs/protocol.md`). Each must decode to the expected value, and that value must
//! encode back to the same JSON. A change that breaks either breaks the wire contract.

use std::collections::BTreeMap;
use std::time::Duration;

use shiva_proto::records::*;
use shiva_proto::runs::{Due, RunIntent, RunPhase, RunReport, RunRequest, Sched, Trigger};
use shiva_proto::{Envelope, NodeId, TaskId, TaskSpec};
use uuid::Uuid;

fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

fn task(id: &str) -> TaskId {
    TaskId::new(id).unwrap()
}

const N1: &str = "7e78f23a-f517-49c5-9580-0f25c94e687a";
const N2: &str = "5c1e0d4a-0000-4000-8000-000000000002";

fn from(sender: &str, incarnation: Option<&str>, sent_at_ms: u64, body: Body) -> Envelope {
    Envelope {
        sender: sender.into(),
        incarnation: incarnation.map(|inc| inc.parse().unwrap()),
        sent_at_ms,
        body,
    }
}

fn app_spec(full: bool) -> TaskSpec {
    let mut spec =
        TaskSpec::new(task("tenant/channel/app"), "/usr/bin/app", vec!["--port".into(), "8080".into()]);
    spec.stop_grace = Duration::from_secs(30);
    if full {
        spec.env = BTreeMap::from([("APP_MODE".into(), "prod".into())]);
        spec.tags = vec!["ssd".into()];
        spec.workdir = Some("/srv/app".into());
    }
    spec
}

fn report_spec() -> TaskSpec {
    let mut spec = TaskSpec::new(task("jobs/report"), "/usr/bin/report", vec![]);
    spec.schedule = vec!["* * * * * *".into()];
    spec
}

const RUN: &str = "9f60d567-229a-5679-bed5-309a5105eb52";
const SLOT: Trigger = Trigger::Slot { slot_ms: 1795315714000 };

fn expected() -> Vec<(&'static str, Envelope)> {
    let mut train = TaskSpec::new(task("ml/train"), "train", vec![]);
    train.tags = vec!["gpu".into()];
    vec![
        ("task", from("ctl:ops", None, 1795315713425, Body::Task(app_spec(true)))),
        (
            "desired",
            from(
                "ctl:ops",
                None,
                1795315713500,
                Body::Desired(Desired { task: task("tenant/channel/app"), state: DesiredState::Stopped }),
            ),
        ),
        (
            "heartbeat",
            from(
                "n1",
                Some(N1),
                1795315713425,
                Body::Heartbeat(Heartbeat {
                    protocol: 1,
                    version: None,
                    seq: 412,
                    hostname: "host-a".into(),
                    tags: vec!["gpu".into()],
                    leader_capable: true,
                    runner: true,
                    interval_ms: 200,
                    fence_timeout_ms: Some(3000),
                    returns: 0,
                    authorized_keys: None,
                    recipient: None,
                    resources: Resources {
                        cpus: 2,
                        memory_total_bytes: 25_000_000_000,
                        memory_available_bytes: 21_000_000_000,
                        load1: 0.12,
                    },
                    runs: vec![RunSummary {
                        task: task("tenant/channel/app"),
                        generation: 3,
                        pid: Some(20607),
                    }],
                    features: Vec::new(),
                    clock_ms: BTreeMap::new(),
                    replaces: None,
                }),
            ),
        ),
        (
            "heartbeat-clock",
            from(
                "n2",
                Some(N2),
                1795315713425,
                Body::Heartbeat(Heartbeat {
                    protocol: 1,
                    version: Some("0.1.0".into()),
                    seq: 88,
                    hostname: "host-b".into(),
                    tags: vec![],
                    leader_capable: true,
                    runner: true,
                    interval_ms: 200,
                    fence_timeout_ms: Some(2000),
                    returns: 0,
                    authorized_keys: None,
                    recipient: None,
                    resources: Resources {
                        cpus: 2,
                        memory_total_bytes: 25_000_000_000,
                        memory_available_bytes: 21_000_000_000,
                        load1: 0.3,
                    },
                    runs: vec![],
                    features: vec!["start_after".into()],
                    clock_ms: BTreeMap::from([(node("n1"), -1207), (node("n3"), 2)]),
                    replaces: None,
                }),
            ),
        ),
        ("leave", from("n1", Some(N1), 1795315799000, Body::Leave(Leave { reason: "shutdown".into() }))),
        ("claim", from("n2", Some(N2), 1795315713400, Body::Claim(Claim { epoch: 4 }))),
        ("resign", from("n2", Some(N2), 1795315799000, Body::Resign(Resign { epoch: 4 }))),
        (
            "members",
            from(
                "n2",
                Some(N2),
                1795315713600,
                Body::Members(Members {
                    epoch: 4,
                    nodes: vec![
                        Member {
                            id: node("n1"),
                            incarnation: N1.parse().unwrap(),
                            hostname: "host-a".into(),
                            tags: vec!["gpu".into()],
                            runner: true,
                            leader_capable: true,
                            returns: 0,
                            features: Vec::new(),
                        },
                        Member {
                            id: node("n2"),
                            incarnation: N2.parse().unwrap(),
                            hostname: "host-b".into(),
                            tags: vec![],
                            runner: true,
                            leader_capable: true,
                            returns: 0,
                            features: Vec::new(),
                        },
                    ],
                    authorized_keys: None,
                    conflicts: Vec::new(),
                }),
            ),
        ),
        (
            "assignment",
            from(
                "n2",
                Some(N2),
                1795315713700,
                Body::Assignment(Assignment {
                    epoch: 4,
                    task: task("tenant/channel/app"),
                    generation: 3,
                    spec_revision: 118,
                    placement: Placement::Assigned { node: node("n1") },
                    spec: app_spec(false),
                    failed_on: vec![],
                    retry_at_ms: None,
                    holders: vec![],
                    after: Vec::new(),
                    incarnation: None,
                }),
            ),
        ),
        (
            "assignment-pending",
            from(
                "n2",
                Some(N2),
                1795315713700,
                Body::Assignment(Assignment {
                    epoch: 4,
                    task: task("ml/train"),
                    generation: 1,
                    spec_revision: 120,
                    placement: Placement::Pending {
                        reason: "no live runner node carries the tags [gpu]".into(),
                    },
                    spec: train,
                    failed_on: vec![],
                    retry_at_ms: None,
                    holders: vec![],
                    after: Vec::new(),
                    incarnation: None,
                }),
            ),
        ),
        (
            "assignment-handoff",
            from(
                "n2",
                Some(N2),
                1795315713900,
                Body::Assignment(Assignment {
                    epoch: 4,
                    task: task("tenant/channel/app"),
                    generation: 4,
                    spec_revision: 121,
                    placement: Placement::Pending {
                        reason: "handing off: waiting for n1 to stop its copy".into(),
                    },
                    spec: app_spec(false),
                    failed_on: vec![],
                    retry_at_ms: None,
                    holders: vec![Holder {
                        node: node("n1"),
                        since: 4,
                        stop_grace_ms: 30000,
                        keep: false,
                        exclusive: true,
                    }],
                    after: Vec::new(),
                    incarnation: None,
                }),
            ),
        ),
        (
            "assignment-start-after",
            from(
                "n2",
                Some(N2),
                1795315713900,
                Body::Assignment(Assignment {
                    epoch: 4,
                    task: task("tenant/channel/app"),
                    generation: 5,
                    spec_revision: 121,
                    placement: Placement::Assigned { node: node("n3") },
                    spec: app_spec(false),
                    failed_on: vec![],
                    retry_at_ms: None,
                    holders: vec![Holder {
                        node: node("n1"),
                        since: 5,
                        stop_grace_ms: 30000,
                        keep: false,
                        exclusive: true,
                    }],
                    after: vec![node("n1")],
                    incarnation: None,
                }),
            ),
        ),
        (
            "status-after",
            from(
                "n3",
                Some(N1),
                1795315713960,
                Body::Status(TaskStatus {
                    task: task("tenant/channel/app"),
                    generation: 5,
                    state: RunState::Starting,
                    run_id: None,
                    pid: None,
                    attempt: 1,
                    restarts: 0,
                    last_exit: None,
                    message: None,
                    permanent: false,
                    after: vec![node("n1")],
                }),
            ),
        ),
        ("deleted", from("n2", Some(N2), 1795315799500, Body::Deleted(Deleted { epoch: 4 }))),
        (
            "trim",
            from(
                "n2",
                Some(N2),
                1795315799600,
                Body::Trim(Trim {
                    epoch: 4,
                    keys: vec![
                        "run/nightly/report/6f1b2a52-1d4e-5c6b-9a3f-0e2d7c4b8a11".into(),
                        "run/nightly/report/9c0d3e14-7a2b-5f4e-8d1c-2b3a4c5d6e7f".into(),
                    ],
                }),
            ),
        ),
        (
            "status",
            from(
                "n1",
                Some(N1),
                1795315713800,
                Body::Status(TaskStatus {
                    task: task("tenant/channel/app"),
                    generation: 3,
                    state: RunState::Running,
                    run_id: Some(Uuid::parse_str("f68b45ea-e3c3-4715-aebf-58812dd39f84").unwrap()),
                    pid: Some(20607),
                    attempt: 2,
                    restarts: 1,
                    last_exit: Some(ExitInfo { code: Some(1), signal: None }),
                    message: None,
                    permanent: false,
                    after: Vec::new(),
                }),
            ),
        ),
        (
            "run-request",
            from(
                "ctl:ops",
                None,
                1795315713500,
                Body::RunRequest(RunRequest {
                    task: task("jobs/report"),
                    request: "0b6f3c1e-1111-4222-8333-444455556666".parse().unwrap(),
                }),
            ),
        ),
        (
            "sched",
            from(
                "n2",
                Some(N2),
                1795315713700,
                Body::Sched(Sched {
                    epoch: 4,
                    task: task("jobs/report"),
                    spec_revision: 120,
                    origin_ms: Some(1795315600000),
                    decided_through_ms: Some(1795315714000),
                    skipped: 3,
                    queued: Some(Due { trigger: Trigger::Slot { slot_ms: 1795315713000 }, attempt: 1 }),
                    suspended_at_ms: None,
                    attempt: 0,
                    next_at_ms: None,
                    outcome: None,
                }),
            ),
        ),
        (
            "run-intent",
            from(
                "n2",
                Some(N2),
                1795315713000,
                Body::RunIntent(RunIntent {
                    epoch: 4,
                    task: task("jobs/report"),
                    run_id: RUN.parse().unwrap(),
                    attempt: 1,
                    trigger: SLOT,
                    node: Some(node("n1")),
                    launch_at_ms: 1795315714000,
                    written_at_ms: Some(1795315713000),
                    spec_revision: 120,
                    spec: std::sync::Arc::new(report_spec()),
                    stop: None,
                    verdict: None,
                    note: None,
                    incarnation: None,
                    seat: None,
                    status_seen: None,
                }),
            ),
        ),
        (
            "run-report",
            from(
                "n1",
                Some(N1),
                1795315714095,
                Body::RunReport(RunReport {
                    task: task("jobs/report"),
                    run_id: RUN.parse().unwrap(),
                    attempt: 1,
                    trigger: SLOT,
                    state: RunPhase::Succeeded,
                    pid: Some(20611),
                    started_ms: Some(1795315714003),
                    late_ms: Some(3),
                    ended_ms: Some(1795315714090),
                    exit: Some(ExitInfo { code: Some(0), signal: None }),
                    message: None,
                    seat: None,
                }),
            ),
        ),
    ]
}

#[test]
fn fixtures_decode_to_the_expected_records_and_encode_back() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let cases = expected();
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, cases.len(), "every fixture has an expected value");
    for (name, envelope) in cases {
        let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        let decoded = Envelope::decode(text.trim().as_bytes()).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(decoded, envelope, "{name}: decoded value");
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        let encoded: serde_json::Value = serde_json::from_slice(&envelope.encode()).unwrap();
        assert_eq!(encoded, fixture, "{name}: encoding");
    }
}

#[test]
fn the_task_fixture_is_valid_user_input() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let text = std::fs::read_to_string(dir.join("task.json")).unwrap();
    let body = serde_json::from_str::<serde_json::Value>(&text).unwrap()["body"].to_string();
    assert_eq!(TaskSpec::from_user_json(&body).unwrap(), app_spec(true));
}
