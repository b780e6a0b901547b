//! Round trips: every record kind, with arbitrary contents, decodes to what was encoded; and
//! no byte string, however malformed, makes decoding panic.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use shiva_proto::records::*;
use shiva_proto::spec::{CatchUp, Overlap};
use shiva_proto::{Envelope, NodeId, TaskId, TaskSpec};
use uuid::Uuid;

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-][A-Za-z0-9_.-]{0,11}"
}

fn task_id() -> impl Strategy<Value = TaskId> {
    prop::collection::vec(segment(), 1..=4).prop_map(|segments| TaskId::new(segments.join("/")).unwrap())
}

fn node_id() -> impl Strategy<Value = NodeId> {
    segment().prop_map(|id| NodeId::new(id).unwrap())
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,16}"
}

fn spec() -> impl Strategy<Value = TaskSpec> {
    (
        task_id(),
        "[a-z/]{1,12}",
        prop::collection::vec(text(), 0..3),
        prop::collection::btree_map("[A-Z][A-Z_]{0,6}", text(), 0..3),
        prop::collection::vec("[a-z]{1,6}", 0..3),
        prop::option::of("/[a-z]{1,8}"),
        0u64..3_600_000,
    )
        .prop_map(|(id, command, args, env, tags, workdir, grace_ms)| {
            let mut spec = TaskSpec::new(id, command, args);
            spec.env = env.into_iter().collect::<BTreeMap<_, _>>();
            spec.tags = tags;
            spec.workdir = workdir;
            spec.stop_grace = Duration::from_millis(grace_ms);
            spec
        })
        .prop_flat_map(|spec| {
            (Just(spec), 0u8..3, any::<u32>(), 1u32..10, prop::collection::vec(1i32..256, 0..3))
        })
        .prop_map(|(mut spec, kind, seed, count, codes)| {
            match kind {
                1 => {
                    spec.schedule = vec!["*/5 * * * *".into(), "0 0 12 ? * MON-FRI".into()];
                    spec.timezone = Some("Europe/Paris".into());
                    spec.catch_up = [CatchUp::None, CatchUp::Latest, CatchUp::All][seed as usize % 3];
                    spec.overlap = [Overlap::Allow, Overlap::Forbid, Overlap::Replace, Overlap::Queue]
                        [seed as usize % 4];
                    spec.max_catch_up = count;
                    spec.jitter = Duration::from_millis(u64::from(seed % 5000));
                    spec.starting_deadline = Some(Duration::from_secs(u64::from(count) * 60));
                    spec.max_runtime = Some(Duration::from_secs(u64::from(count)));
                }
                2 => {
                    spec.once = true;
                    spec.max_attempts = count;
                    spec.backoff.multiplier = 1.0 + f64::from(seed % 4);
                    spec.permanent_exit_codes = codes;
                    spec.after = vec![TaskId::new(format!("dep{seed}")).unwrap()];
                }
                _ => {}
            }
            spec
        })
}

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        node_id().prop_map(|node| Placement::Assigned { node }),
        text().prop_map(|reason| Placement::Pending { reason }),
        Just(Placement::Stopped),
    ]
}

fn run_state() -> impl Strategy<Value = RunState> {
    prop::sample::select(vec![
        RunState::Starting,
        RunState::Running,
        RunState::Backoff,
        RunState::Stopping,
        RunState::Stopped,
        RunState::Failed,
    ])
}

fn member() -> impl Strategy<Value = Member> {
    (node_id(), uuid(), text(), prop::collection::vec("[a-z]{1,6}", 0..3), any::<bool>(), any::<bool>())
        .prop_map(|(id, incarnation, hostname, tags, runner, leader_capable)| Member {
            id,
            incarnation,
            hostname,
            tags,
            runner,
            leader_capable,
            returns: incarnation.as_u128() as u64 % 3,
            features: Vec::new(),
        })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        spec().prop_map(Body::Task),
        (task_id(), any::<bool>()).prop_map(|(task, stop)| Body::Desired(Desired {
            task,
            state: if stop { DesiredState::Stopped } else { DesiredState::Running }
        })),
        (
            any::<u64>(),
            text(),
            any::<bool>(),
            any::<bool>(),
            1u64..10_000,
            any::<u32>(),
            task_id(),
            any::<u64>()
        )
            .prop_map(
                |(seq, hostname, leader_capable, runner, interval_ms, cpus, task, generation)| {
                    Body::Heartbeat(Heartbeat {
                        protocol: 1,
                        version: Some("0.1.0".into()),
                        seq,
                        hostname,
                        tags: vec!["gpu".into()],
                        leader_capable,
                        runner,
                        interval_ms,
                        fence_timeout_ms: Some(interval_ms.saturating_mul(15)),
                        returns: seq % 4,
                        authorized_keys: None,
                        recipient: None,
                        resources: Resources {
                            cpus,
                            memory_total_bytes: 1 << 34,
                            memory_available_bytes: 1 << 33,
                            load1: 0.5,
                        },
                        runs: vec![RunSummary { task, generation, pid: Some(42) }],
                        features: Vec::new(),
                        clock_ms: [(NodeId::new("n1").unwrap(), seq as i64)].into(),
                        replaces: None,
                    })
                }
            ),
        text().prop_map(|reason| Body::Leave(Leave { reason })),
        any::<u64>().prop_map(|epoch| Body::Claim(Claim { epoch })),
        any::<u64>().prop_map(|epoch| Body::Resign(Resign { epoch })),
        any::<u64>().prop_map(|epoch| Body::Deleted(shiva_proto::records::Deleted { epoch })),
        (any::<u64>(), prop::collection::vec(member(), 0..4)).prop_map(|(epoch, nodes)| Body::Members(
            Members { epoch, nodes, conflicts: Vec::new(), authorized_keys: None }
        )),
        (any::<u64>(), task_id(), any::<u64>(), any::<i64>(), placement(), spec()).prop_map(
            |(epoch, task, generation, spec_revision, placement, spec)| Body::Assignment(Assignment {
                epoch,
                task,
                generation,
                spec_revision,
                placement,
                spec,
                failed_on: if generation % 2 == 0 { vec![] } else { vec![NodeId::new("n1").unwrap()] },
                retry_at_ms: (generation % 3 == 0).then_some(spec_revision),
                holders: (generation % 5 == 0)
                    .then(|| shiva_proto::records::Holder {
                        node: NodeId::new("n2").unwrap(),
                        since: generation,
                        stop_grace_ms: epoch,
                        keep: epoch % 2 == 0,
                        exclusive: epoch % 3 != 0,
                    })
                    .into_iter()
                    .collect(),
                after: Vec::new(),
                incarnation: Some(uuid::Uuid::from_u128(u128::from(generation))),
            })
        ),
        (
            task_id(),
            any::<u64>(),
            run_state(),
            prop::option::of(uuid()),
            prop::option::of(any::<u32>()),
            any::<u32>(),
            prop::option::of(any::<i32>()),
            prop::option::of(text())
        )
            .prop_map(|(task, generation, state, run_id, pid, attempt, code, message)| Body::Status(
                TaskStatus {
                    task,
                    generation,
                    state,
                    run_id,
                    pid,
                    attempt,
                    restarts: attempt / 2,
                    last_exit: code.map(|code| ExitInfo { code: Some(code), signal: None }),
                    message,
                    permanent: state == RunState::Failed && attempt % 2 == 1,
                    after: Vec::new(),
                }
            )),
    ]
}

proptest! {
    #[test]
    fn every_record_round_trips(sender in "[a-z0-9:-]{1,12}", incarnation in prop::option::of(uuid()), sent_at_ms in any::<u64>(), body in body()) {
        let envelope = Envelope { sender, incarnation, sent_at_ms, body };
        let decoded = Envelope::decode(&envelope.encode()).unwrap();
        prop_assert_eq!(decoded, envelope);
    }

    #[test]
    fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&bytes);
    }

    #[test]
    fn decoding_junk_json_never_panics(kind in "[a-z]{1,10}", body in "\\PC{0,64}") {
        let text = format!(r#"{{"v":1,"kind":"{kind}","sender":"x","body":{body}}}"#);
        let _ = Envelope::decode(text.as_bytes());
    }
}
