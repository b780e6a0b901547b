//! Total arithmetic, proved by driving accepted specs with values at and next to every bound,
//! and records with extreme numbers, through the leader's reconciliation and scheduling and
//! the runner's decisions, over simulated time with failovers. A panic anywhere fails the test;
//! so does a slot launched twice.

use std::time::Instant;

use shiva_proto::records::{ExitInfo, Heartbeat, Placement, Resources};
use shiva_proto::spec::bounds;

use super::*;
use crate::leader::{Inputs, reconcile};
use crate::membership::Membership;
use crate::supervisor::restart::Restarts;

const CRONS: [&str; 7] = [
    "* * * * * *",
    "*/7 * * * * *",
    "0 * * * * *",
    "@hourly",
    "0 0 12 * * ?",
    "30 2 * * *",
    "0 0 0 1 1 * 2099",
];
const ZONES: [Option<&str>; 3] = [None, Some("Europe/Paris"), Some("America/New_York")];

/// A duration at a bound of `span`, or just inside it.
fn edge(span: bounds::Span) -> impl Strategy<Value = Duration> {
    let ms = Duration::from_millis(1);
    prop_oneof![
        Just(span.min),
        Just(span.min + ms),
        Just(span.max),
        Just(span.max.saturating_sub(ms).max(span.min)),
        (span.min.as_millis() as u64..=span.max.as_millis() as u64).prop_map(Duration::from_millis),
    ]
}

fn count_edge((min, max): (u32, u32)) -> impl Strategy<Value = u32> {
    prop_oneof![Just(min), Just(max), Just(min.saturating_add(1).min(max)), min..=max]
}

/// Accepted specs of every kind, schedule form and policy, with values at their bounds.
fn accepted_spec() -> impl Strategy<Value = TaskSpec> {
    let periodic = (
        proptest::sample::subsequence(CRONS.to_vec(), 1..3),
        proptest::sample::select(ZONES.to_vec()),
        prop_oneof![
            Just(Overlap::Allow),
            Just(Overlap::Forbid),
            Just(Overlap::Replace),
            Just(Overlap::Queue)
        ],
        prop_oneof![Just(CatchUp::None), Just(CatchUp::Latest), Just(CatchUp::All)],
        proptest::option::of(edge(bounds::STARTING_DEADLINE)),
        edge(bounds::JITTER),
        count_edge(bounds::MAX_CATCH_UP),
        proptest::option::of(edge(bounds::MAX_RUNTIME)),
    );
    let once = (
        count_edge(bounds::MAX_ATTEMPTS),
        edge(bounds::BACKOFF),
        edge(bounds::BACKOFF),
        prop_oneof![Just(1.0), Just(100.0), 1.0f64..100.0],
        proptest::option::of(edge(bounds::MAX_RUNTIME)),
    );
    let service =
        (count_edge(bounds::MAX_RESTARTS), edge(bounds::RESTART_WINDOW), edge(bounds::STABLE_AFTER));
    (0u8..3, periodic, once, service, edge(bounds::STOP_GRACE), any::<bool>()).prop_filter_map(
        "accepted specs only",
        |(kind, periodic, once, service, stop_grace, keep)| {
            let mut spec = TaskSpec::new(TaskId::new("edge/task").unwrap(), "true", vec![]);
            spec.stop_grace = stop_grace;
            if keep {
                spec.on_disconnect = OnDisconnect::Keep;
            }
            match kind {
                0 => {
                    let (crons, zone, overlap, catch_up, deadline, jitter, max_catch_up, max_runtime) =
                        periodic;
                    spec.schedule = crons.into_iter().map(str::to_owned).collect();
                    spec.timezone = zone.map(str::to_owned);
                    spec.overlap = overlap;
                    spec.catch_up = catch_up;
                    spec.starting_deadline = deadline;
                    spec.jitter = jitter;
                    spec.max_catch_up = max_catch_up;
                    spec.max_runtime = max_runtime;
                }
                1 => {
                    let (attempts, initial, max, multiplier, max_runtime) = once;
                    spec.once = true;
                    spec.max_attempts = attempts;
                    spec.backoff = shiva_proto::spec::RetryBackoff {
                        initial: initial.min(max),
                        max: initial.max(max),
                        multiplier,
                    };
                    spec.max_runtime = max_runtime;
                    spec.permanent_exit_codes = vec![255];
                }
                _ => {
                    let (max_restarts, window, stable) = service;
                    spec.max_restarts = max_restarts;
                    spec.restart_window = window;
                    spec.stable_after = stable;
                }
            }
            spec.validate_all().ok().map(|()| spec)
        },
    )
}

/// Numbers a forged or corrupted record may carry.
fn extreme_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(-1i64),
        Just(0i64),
        Just(253_402_300_800_000i64),
        any::<i64>()
    ]
}

impl Sim {
    /// One step of a leader that reconciles and schedules, then the runners.
    fn lead_and_reconcile(&mut self) {
        let Some(leader) = self.leader.filter(|l| self.live.contains(l)) else { return };
        let live = self.members();
        let epoch = self.view.epochs.newest;
        let inputs = Inputs {
            live: &live,
            conflicts: &[],
            epoch,
            now_ms: self.now,
            busy: &|_, _| false,
            may_still_run: &|_, _| false,
            incarnation_may_still_run: &|_, _, _| false,
            failed: &Default::default(),
        };
        let mut writes = reconcile(&self.view, &inputs);
        let context = Context {
            view: &self.view,
            live: &live,
            epoch,
            now: at(self.now),
            timing: TIMING,
            busy: &|_, _| false,
            runs_busy: &|_| false,
            lean: true,
            batched_trim: true,
            run_seats: true,
            trim_every: crate::scheduler::TRIM_EVERY,
            trims_per_plan: crate::scheduler::TRIMS_PER_PLAN,
            schedules: &self.schedules,
            may_still_run: &|_, _| false,
            failed: &Default::default(),
            reports_synced_below: i64::MAX,
            intents_synced_below: i64::MAX,
        };
        writes.extend(plan(&context));
        for write in writes {
            let value = write.body.map(|body| self.env(leader, body));
            self.append(write.topic, write.key, value);
        }
    }

    /// Run records with extreme numbers, as a buggy or forged runner could write: one for each
    /// of the task's runs (the leader's decisions read their numbers), and one for a new run.
    fn forge_reports(&mut self, node: usize, numbers: [i64; 3], attempt: u32) {
        let task = TaskId::new("edge/task").unwrap();
        let mut targets: Vec<(Trigger, u32)> =
            self.view.runs_of(&task).filter_map(|run| Some((run.trigger()?, run.attempt()?))).collect();
        targets.push((Trigger::Slot { slot_ms: numbers[0] }, attempt));
        for (trigger, attempt) in targets {
            let report = RunReport {
                task: task.clone(),
                run_id: run_id(&task, trigger, attempt),
                attempt,
                trigger,
                state: RunPhase::Failed,
                pid: Some(u32::MAX),
                started_ms: Some(numbers[1]),
                late_ms: Some(numbers[1]),
                ended_ms: Some(numbers[2]),
                exit: Some(ExitInfo { code: Some(i32::MIN), signal: Some(i32::MAX) }),
                message: None,
                seat: None,
            };
            self.report(node, report);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any accepted spec, any failovers, any extreme numbers in runners' records: the leader
    /// and the runners never panic, and no slot launches twice.
    #[test]
    fn accepted_specs_at_their_bounds_never_panic_and_never_launch_a_slot_twice(
        spec in accepted_spec(),
        events in proptest::collection::vec((0u8..6, 1u8..30, [extreme_i64(), extreme_i64(), extreme_i64()], any::<u32>()), 1..10),
        exit_code in prop_oneof![Just(0), Just(1), Just(255)],
        run_ms in prop_oneof![Just(50i64), Just(3_000i64)],
    ) {
        let mut sim = Sim::new();
        sim.exit_code = exit_code;
        // Long runs are in flight when forged records land.
        sim.run_ms = run_ms;
        sim.submit(spec.clone());
        for (what, ticks, numbers, attempt) in events {
            match what {
                0 => { let next = (sim.leader.unwrap() + 1) % 3; sim.revive(next); sim.elect(next); }
                1 => { let leader = sim.leader.unwrap(); sim.kill(leader); }
                2 => sim.live = (0..3).collect(),
                3 | 4 => sim.forge_reports(usize::from(ticks) % 3, numbers, attempt),
                _ => {}
            }
            let until = sim.now + i64::from(ticks) * TICK;
            while sim.now < until {
                sim.lead_and_reconcile();
                sim.run();
                sim.now += TICK;
            }
        }
        let counts = sim.slot_launches();
        prop_assert!(counts.values().all(|count| *count == 1), "a slot launched twice");
        // Containment would hide a panic: none may have happened.
        assert_no_internal_error(&sim);

        // The runner's restart policy and the one-shot's next step, on the same spec.
        let mut restarts = Restarts::new(&spec);
        let t0 = Instant::now();
        for step in 0..20u64 {
            let now = t0 + Duration::from_millis(step * 37);
            let _ = restarts.on_end(now, spec.stable_after.saturating_sub(Duration::from_millis(1)), None, 1.0);
        }
        for attempt in [0, 1, spec.max_attempts, u32::MAX] {
            let _ = once_next(&spec, attempt, RunEnd::Exited(ExitInfo { code: Some(1), signal: None }));
            let _ = spec.backoff.delay_before(attempt);
        }
    }

    /// Heartbeats with any numbers: membership and the move rules stay total.
    #[test]
    fn heartbeats_with_extreme_numbers_never_panic(
        interval_ms in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
        fence_ms in proptest::option::of(prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]),
        grace in edge(bounds::STOP_GRACE),
        seq in any::<u64>(),
    ) {
        let me = NodeId::new("me").unwrap();
        let other = NodeId::new("other").unwrap();
        let mut membership = Membership::new(me.clone(), Uuid::new_v4());
        let heartbeat = Heartbeat {
            protocol: u16::MAX,
            version: None,
            seq,
            hostname: "h".into(),
            tags: vec![],
            leader_capable: true,
            runner: true,
            interval_ms,
            fence_timeout_ms: fence_ms,
            returns: u64::MAX,
            authorized_keys: Some("x".repeat(1 << 20)),
            recipient: None,
            resources: Resources::default(),
            runs: vec![],
            features: Vec::new(),
            clock_ms: Default::default(),
            replaces: Some(Uuid::nil()),
        };
        let now = crate::clock::Boot::now();
        membership.on_heartbeat(&other, Uuid::new_v4(), &heartbeat, now);
        membership.advance(now);
        let held = membership.may_still_run(&other, grace, Duration::from_secs(1), Duration::from_secs(3));
        prop_assert!(held, "a node just heard from may still run its tasks");
        membership.advance(crate::clock::Boot::from_since_boot(Duration::MAX));
        let _ = membership.may_still_run(&other, grace, Duration::MAX, Duration::MAX);
        let _ = membership.live_members(Duration::MAX, &|_| Vec::new());
        let _ = membership.live_members(Duration::ZERO, &|_| Vec::new());
    }
}

/// No internal error was contained on the way: the arithmetic itself is total.
fn assert_no_internal_error(sim: &Sim) {
    for (task, entry) in &sim.view.assignments {
        if let Placement::Failed { reason } = &entry.assignment.placement {
            panic!("{task} failed: {reason}");
        }
    }
}

/// A one-shot attempt whose (forged) record ends at the last representable instant: its retry
/// is scheduled without overflow, on the leader's clock (the record's times are the runner's and
/// move no retry).
#[test]
fn a_run_record_ending_at_the_end_of_time_moves_no_retry_and_overflows_nothing() {
    let mut sim = Sim::new();
    sim.exit_code = 1;
    sim.run_ms = 3_000;
    let mut spec = TaskSpec::new(TaskId::new("edge/task").unwrap(), "true", vec![]);
    spec.once = true;
    sim.submit(spec);
    let steps = |sim: &mut Sim| {
        for _ in 0..5 {
            sim.lead_and_reconcile();
            sim.run();
            sim.now += TICK;
        }
    };
    steps(&mut sim);
    sim.forge_reports(1, [0, i64::MIN, i64::MAX], 1);
    steps(&mut sim);
    assert_no_internal_error(&sim);
    let sched = &sim.view.scheds[&TaskId::new("edge/task").unwrap()].sched;
    let next = sched.next_at_ms.expect("a retry is scheduled");
    assert!(
        next <= sim.now + 60_000,
        "the retry waits its back-off from the leader's clock, not the record's: {next}"
    );
}

/// The fault hook panics while the leader plans one task: that task is failed with the panic's
/// message, stays failed across a failover (no leader plans it again), and the others run.
#[test]
fn a_panic_planning_one_task_fails_that_task_and_no_other() {
    crate::fault::install(Some("plan:fault/victim")).unwrap();
    let mut sim = Sim::new();
    let mut victim = every_second(CatchUp::None);
    victim.id = TaskId::new("fault/victim").unwrap();
    let mut service = TaskSpec::new(TaskId::new("fault/victim").unwrap(), "sleep", vec!["9".into()]);
    service.id = TaskId::new("fault/other-service").unwrap();
    sim.submit(victim.clone());
    sim.submit(every_second(CatchUp::None));
    sim.submit(service);
    let steps = |sim: &mut Sim, count: usize| {
        for _ in 0..count {
            sim.lead_and_reconcile();
            sim.run();
            sim.now += TICK;
        }
    };
    steps(&mut sim, 30);
    let failed =
        |sim: &Sim, task: &str| match &sim.view.assignments[&TaskId::new(task).unwrap()].assignment.placement
        {
            Placement::Failed { reason } => Some(reason.clone()),
            _ => None,
        };
    let reason = failed(&sim, "fault/victim").expect("the victim is failed");
    assert!(reason.starts_with("internal error: fault hook"), "{reason}");
    assert!(failed(&sim, "cron/tick").is_none() && failed(&sim, "fault/other-service").is_none());
    assert!(matches!(
        sim.view.assignments[&TaskId::new("fault/other-service").unwrap()].assignment.placement,
        Placement::Assigned { .. }
    ));
    let ticks = sim.slot_launches().len();
    assert!(ticks >= 2, "the other periodic task runs: {ticks} slots");
    assert!(!sim.view.runs.contains_key(&victim.id), "the victim never launched");
    // A new leader reads the failure from the log and does not plan the task again.
    let log_len = sim.log.len();
    sim.elect(1);
    steps(&mut sim, 10);
    let rewrites = sim.log[log_len..]
        .iter()
        .filter(|(_, _, key, _)| key == "task/fault/victim")
        .filter_map(|(_, _, _, value)| value.as_ref())
        .filter_map(|value| Envelope::decode(value).ok())
        .filter(|envelope| !matches!(&envelope.body, Body::Assignment(a) if matches!(a.placement, Placement::Failed { .. })))
        .count();
    assert_eq!(rewrites, 0, "the new leader keeps the victim failed");
    assert!(failed(&sim, "fault/victim").is_some());
}

/// Replaces every number in `value` for which `pick` says so with an extreme one.
fn mutate_numbers(value: &mut serde_json::Value, pick: &mut impl FnMut() -> Option<serde_json::Value>) {
    match value {
        serde_json::Value::Number(_) => {
            if let Some(extreme) = pick() {
                *value = extreme;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|item| mutate_numbers(item, pick)),
        // The epoch only decides whether a leader write is accepted at all.
        serde_json::Value::Object(fields) => fields
            .iter_mut()
            .filter(|(name, _)| *name != "epoch")
            .for_each(|(_, item)| mutate_numbers(item, pick)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The never-panics fuzzing taken past `Envelope::decode`: a real cluster's log, with the
    /// numbers of its records replaced by extreme ones, is read by a fresh view and driven
    /// through reconciliation, scheduling and the runners; nothing panics (not even contained).
    #[test]
    fn records_with_extreme_numbers_never_panic_the_state_machines(
        spec in accepted_spec(),
        choices in proptest::collection::vec(0u8..24, 64),
        run_ms in prop_oneof![Just(50i64), Just(3_000i64)],
    ) {
        let mut sim = Sim::new();
        sim.exit_code = 1;
        sim.run_ms = run_ms;
        sim.submit(spec);
        for _ in 0..25 {
            sim.lead_and_reconcile();
            sim.run();
            sim.now += TICK;
        }
        let extremes = [
            serde_json::json!(i64::MAX),
            serde_json::json!(i64::MIN),
            serde_json::json!(u64::MAX),
            serde_json::json!(-1),
            serde_json::json!(0),
            serde_json::json!(253_402_300_800_000i64),
        ];
        let mut index = 0usize;
        let mut pick = || {
            index += 1;
            let choice = usize::from(choices[index % choices.len()]);
            extremes.get(choice).cloned()
        };
        let log = std::mem::take(&mut sim.log);
        sim.view = LogView::default();
        sim.offsets.clear();
        for (topic, _, key, value) in log {
            let value = value.map(|bytes| match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(mut json) => {
                    mutate_numbers(&mut json["body"], &mut pick);
                    serde_json::to_vec(&json).unwrap()
                }
                Err(_) => bytes,
            });
            sim.append(topic, key, value);
        }
        for _ in 0..25 {
            sim.lead_and_reconcile();
            sim.run();
            sim.now += TICK;
        }
        assert_no_internal_error(&sim);
    }
}

/// A periodic task whose definition turns invalid stops launching, keeps its history, and once a
/// valid revision comes does not catch up the slots of its invalid time (as after `resume`).
#[test]
fn an_invalid_revision_stops_a_periodic_task_and_its_invalid_time_is_not_caught_up() {
    let mut sim = Sim::new();
    let mut spec = every_second(CatchUp::All);
    spec.overlap = Overlap::Allow;
    sim.submit(spec.clone());
    let steps = |sim: &mut Sim, ms: i64| {
        let until = sim.now + ms;
        while sim.now < until {
            sim.lead_and_reconcile();
            sim.run();
            sim.now += TICK;
        }
    };
    steps(&mut sim, 5_000);
    let before = sim.slot_launches().len();
    assert!(before >= 3, "{before} slots before");
    let bad = br#"{"v":1,"kind":"task","sender":"ctl:x","sent_at_ms":0,"body":{"id":"cron/tick","command":"true","schedule":"* * * * * *","jitter":"1000y"}}"#;
    sim.append(TopicKind::Commands, key::task(&spec.id), Some(bad.to_vec()));
    let invalid_from = sim.now;
    steps(&mut sim, 10_000);
    assert!(sim.view.invalid.contains_key(&spec.id));
    assert!(sim.view.runs.contains_key(&spec.id), "history kept");
    let during = sim.slot_launches().keys().filter(|slot| **slot > invalid_from + 1_000).count();
    assert_eq!(during, 0, "no slot launched while invalid");
    let valid_from = sim.now;
    sim.submit(spec);
    steps(&mut sim, 4_000);
    let gap = sim
        .slot_launches()
        .keys()
        .filter(|slot| **slot > invalid_from + 1_000 && **slot < valid_from - 1_000)
        .count();
    assert_eq!(gap, 0, "the invalid time is not caught up");
    assert!(sim.slot_launches().keys().any(|slot| *slot > valid_from), "it runs again");
    assert_no_internal_error(&sim);
}
