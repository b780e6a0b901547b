use chrono::TimeZone;
use proptest::prelude::*;

use super::*;
use shiva_proto::TaskId;
use shiva_proto::runs::{Trigger, jitter_ms, run_id};

fn slot(at: DateTime<Utc>) -> Trigger {
    Trigger::Slot { slot_ms: at.timestamp_millis() }
}

fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, h, m, s).unwrap()
}

fn periodic(expression: &str, configure: impl FnOnce(&mut TaskSpec)) -> (Schedule, TaskSpec) {
    let mut spec = TaskSpec::new(TaskId::new("jobs/report").unwrap(), "true", vec![]);
    spec.schedule = vec![expression.into()];
    configure(&mut spec);
    spec.validate().unwrap();
    (Schedule::from_spec(&spec).unwrap().unwrap(), spec)
}

const TIMING: Timing = Timing { lookahead: Duration::from_millis(500), tolerance: Duration::from_secs(2) };

#[test]
fn regular_slots_are_planned_ahead_once() {
    let (schedule, spec) = periodic("* * * * * *", |_| {});
    let first = plan_slots(&schedule, &spec, at(0, 0, 10), at(0, 0, 10), TIMING);
    assert!(first.launch.is_empty(), "the next slot is 1 s away, beyond the 500 ms look-ahead");
    let second = plan_slots(
        &schedule,
        &spec,
        first.decided_through,
        at(0, 0, 10) + TimeDelta::milliseconds(600),
        TIMING,
    );
    assert_eq!(second.launch, [at(0, 0, 11)]);
    let again = plan_slots(
        &schedule,
        &spec,
        second.decided_through,
        at(0, 0, 10) + TimeDelta::milliseconds(700),
        TIMING,
    );
    assert!(again.launch.is_empty(), "a decided slot is never planned twice");
    assert_eq!(again.skipped, 0);
}

#[test]
fn decided_through_moves_only_with_slots() {
    // The leader writes `sched/` when it changes: between two slots it must not.
    let (schedule, spec) = periodic("0 * * * * *", |_| {});
    let first = plan_slots(&schedule, &spec, at(0, 0, 0), at(0, 0, 10), TIMING);
    assert!(first.launch.is_empty());
    assert_eq!(first.decided_through, at(0, 0, 0));
    let later = plan_slots(&schedule, &spec, first.decided_through, at(0, 0, 40), TIMING);
    assert_eq!(later.decided_through, at(0, 0, 0));
    let due = plan_slots(
        &schedule,
        &spec,
        later.decided_through,
        at(0, 0, 59) + TimeDelta::milliseconds(600),
        TIMING,
    );
    assert_eq!((due.launch.as_slice(), due.decided_through), ([at(0, 1, 0)].as_slice(), at(0, 1, 0)));
    // A missed slot is counted once, not at every step after it.
    let (schedule, spec) = periodic("0 * * * * *", |_| {});
    let missed = plan_slots(&schedule, &spec, at(0, 0, 0), at(0, 1, 30), TIMING);
    assert_eq!((missed.skipped, missed.decided_through), (1, at(0, 1, 0)));
    let next = plan_slots(&schedule, &spec, missed.decided_through, at(0, 1, 31), TIMING);
    assert_eq!((next.skipped, next.decided_through), (0, at(0, 1, 0)));
}

#[test]
fn catch_up_none_skips_missed_slots() {
    let (schedule, spec) = periodic("*/10 * * * * *", |_| {});
    let plan = plan_slots(&schedule, &spec, at(0, 0, 0), at(0, 1, 0) + TimeDelta::milliseconds(9700), TIMING);
    assert_eq!(plan.launch, [at(0, 1, 10)], "only the slot within the look-ahead");
    assert!(plan.skipped >= 1);
    assert!(plan.decided_through >= at(0, 1, 10));
}

#[test]
fn catch_up_latest_runs_the_newest_missed_slot_within_the_deadline() {
    let (schedule, spec) = periodic("0 * * * *", |spec| spec.catch_up = CatchUp::Latest);
    let plan = plan_slots(&schedule, &spec, at(0, 0, 0), at(5, 20, 0), TIMING);
    assert_eq!(plan.launch, [at(5, 0, 0)]);
    assert_eq!(plan.skipped, 4, "01:00 to 04:00 are dropped");

    let (schedule, spec) = periodic("0 * * * *", |spec| {
        spec.catch_up = CatchUp::Latest;
        spec.starting_deadline = Some(Duration::from_secs(600));
    });
    let plan = plan_slots(&schedule, &spec, at(0, 0, 0), at(5, 20, 0), TIMING);
    assert!(plan.launch.is_empty(), "05:00 is older than the 10 min deadline");
}

#[test]
fn catch_up_all_runs_every_missed_slot_up_to_the_cap_and_deadline() {
    let (schedule, spec) = periodic("* * * * * *", |spec| {
        spec.catch_up = CatchUp::All;
        spec.max_catch_up = 100;
    });
    // Down from 00:00:10 to 00:00:25: slots 11..=23 are missed (24 and 25 are within tolerance).
    let plan = plan_slots(&schedule, &spec, at(0, 0, 10), at(0, 0, 25), TIMING);
    let expected: Vec<_> = (11..=25).map(|s| at(0, 0, s)).collect();
    assert_eq!(plan.launch, expected, "every slot once, in order");
    assert_eq!(plan.skipped, 0);

    let (schedule, capped) = periodic("* * * * * *", |spec| {
        spec.catch_up = CatchUp::All;
        spec.max_catch_up = 5;
    });
    let plan = plan_slots(&schedule, &capped, at(0, 0, 10), at(0, 0, 25), TIMING);
    assert_eq!(
        plan.launch[..5],
        (19..=23).map(|s| at(0, 0, s)).collect::<Vec<_>>()[..],
        "the newest 5 missed"
    );
    assert!(plan.skipped >= 1);

    let (schedule, deadline) = periodic("* * * * * *", |spec| {
        spec.catch_up = CatchUp::All;
        spec.max_catch_up = 100;
        spec.starting_deadline = Some(Duration::from_secs(5));
    });
    let plan = plan_slots(&schedule, &deadline, at(0, 0, 10), at(0, 0, 25), TIMING);
    assert_eq!(plan.launch.first(), Some(&at(0, 0, 21)), "older than 5 s before now are dropped");
}

proptest! {
    /// However the leader's planning is chopped up in time (steps, outages shorter than the
    /// deadline), with `catch_up: all` every slot is launched exactly once.
    #[test]
    fn catch_up_all_launches_every_slot_exactly_once(steps in prop::collection::vec(1u32..20_000, 1..60)) {
        let (schedule, spec) = periodic("* * * * * *", |spec| {
            spec.catch_up = CatchUp::All;
            spec.max_catch_up = 1000;
        });
        let start = at(0, 0, 0);
        let mut decided = start;
        let mut now = start;
        let mut launched = Vec::new();
        for step in steps {
            now += TimeDelta::milliseconds(i64::from(step));
            let plan = plan_slots(&schedule, &spec, decided, now, TIMING);
            prop_assert!(plan.decided_through >= decided);
            launched.extend(plan.launch);
            decided = plan.decided_through;
        }
        let expected: Vec<_> = schedule.slots(start, decided, 100_000);
        prop_assert_eq!(launched, expected);
    }

    #[test]
    fn jitter_is_within_bounds_and_stable(id in "[a-z]{1,8}(/[a-z]{1,8}){0,3}", jitter in 1u64..100_000) {
        let task = TaskId::new(id).unwrap();
        let offset = jitter_ms(&task, jitter);
        prop_assert!(offset < jitter);
        prop_assert_eq!(offset, jitter_ms(&task, jitter));
    }
}

#[test]
fn run_ids_are_deterministic_per_task_slot_and_attempt() {
    let task = TaskId::new("a/b").unwrap();
    assert_eq!(run_id(&task, slot(at(1, 0, 0)), 1), run_id(&task, slot(at(1, 0, 0)), 1));
    assert_ne!(run_id(&task, slot(at(1, 0, 0)), 1), run_id(&task, slot(at(1, 0, 0)), 2));
    assert_ne!(run_id(&task, slot(at(1, 0, 0)), 1), run_id(&task, slot(at(1, 0, 1)), 1));
    assert_ne!(
        run_id(&task, slot(at(1, 0, 0)), 1),
        run_id(&TaskId::new("a/c").unwrap(), slot(at(1, 0, 0)), 1)
    );
    assert_eq!(jitter_ms(&task, 0), 0);
}

#[test]
fn overlap_policies() {
    let running = [Uuid::from_u128(1)];
    for policy in [Overlap::Allow, Overlap::Forbid, Overlap::Replace, Overlap::Queue] {
        assert_eq!(on_due(policy, &[], false), OverlapAction::Launch, "{policy:?} with nothing running");
    }
    assert_eq!(on_due(Overlap::Allow, &running, false), OverlapAction::Launch);
    assert_eq!(on_due(Overlap::Forbid, &running, false), OverlapAction::Skip);
    assert_eq!(on_due(Overlap::Replace, &running, false), OverlapAction::Replace(running.to_vec()));
    assert_eq!(on_due(Overlap::Queue, &running, false), OverlapAction::Queue);
    assert_eq!(on_due(Overlap::Queue, &running, true), OverlapAction::Skip, "at most one queued");
}

#[test]
fn one_shot_outcomes() {
    let mut spec = TaskSpec::new(TaskId::new("once").unwrap(), "true", vec![]);
    spec.once = true;
    spec.max_attempts = 3;
    spec.permanent_exit_codes = vec![78];
    let exit = |code| RunEnd::Exited(ExitInfo { code: Some(code), signal: None });
    assert_eq!(once_next(&spec, 1, exit(0)), OnceNext::Succeeded);
    assert_eq!(once_next(&spec, 1, exit(1)), OnceNext::Retry { attempt: 2, delay: Duration::from_secs(1) });
    assert_eq!(once_next(&spec, 2, exit(1)), OnceNext::Retry { attempt: 3, delay: Duration::from_secs(2) });
    assert!(
        matches!(once_next(&spec, 3, exit(1)), OnceNext::Failed(reason) if reason.contains("attempt 3 of 3"))
    );
    assert!(
        matches!(once_next(&spec, 1, exit(78)), OnceNext::Failed(reason) if reason.contains("permanent"))
    );
    assert_eq!(
        once_next(&spec, 1, RunEnd::Lost),
        OnceNext::Retry { attempt: 2, delay: Duration::ZERO },
        "at once, elsewhere"
    );
    assert!(matches!(once_next(&spec, 3, RunEnd::Lost), OnceNext::Failed(_)));
    assert!(matches!(once_next(&spec, 1, RunEnd::TimedOut), OnceNext::Retry { attempt: 2, .. }));
    let killed = RunEnd::Exited(ExitInfo { code: None, signal: Some(9) });
    assert!(matches!(once_next(&spec, 3, killed), OnceNext::Failed(reason) if reason.contains("signal 9")));
}
