//! `trim` records (issue 21, batched trimming): one record of the leader deletes the entries of
//! the run keys it lists on its topic, the bare tombstones that follow are taken, and nothing
//! else deletes a run.

use std::sync::Arc;

use shiva_proto::records::{Body, Claim, Trim};
use shiva_proto::runs::{RunPhase, RunReport};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::{TopicKind, key};
use shiva_proto::view::{LogView, Outcome};
use uuid::Uuid;

mod common;
use common::{LEADER, Log, RUNNER, slot_intent};

fn spec() -> Arc<TaskSpec> {
    let spec = serde_json::json!({"id": "cron/t", "command": "true", "schedule": "* * * * *"});
    Arc::new(serde_json::from_value(spec).unwrap())
}

/// A log with the leader's claim and `n` runs over (intent and end).
fn with_runs(n: i64) -> (Log, Vec<String>) {
    let mut log = Log::default();
    let leader = shiva_proto::NodeId::new("leader-001").unwrap();
    log.leader(
        TopicKind::Assignments,
        &key::claim(1, &leader, Uuid::from_u128(3)),
        Some(Body::Claim(Claim { epoch: 1 })),
    );
    let spec = spec();
    let mut keys = Vec::new();
    for slot in 0..n {
        let intent = slot_intent(&spec, slot * 60_000);
        let run = key::run(&spec.id, intent.run_id);
        let report = RunReport::of(&intent, RunPhase::Succeeded);
        log.leader(TopicKind::Assignments, &run, Some(Body::RunIntent(intent)));
        log.write(TopicKind::Status, &run, ("runner-007", RUNNER), Some(Body::RunReport(report)));
        keys.push(run);
    }
    (log, keys)
}

fn trim(epoch: u64, keys: &[String]) -> (String, Option<Body>) {
    let key = key::trim(epoch, Uuid::new_v4());
    (key, Some(Body::Trim(Trim { epoch, keys: keys.to_vec() })))
}

fn runs(view: &LogView) -> usize {
    view.all_runs().count()
}

#[test]
fn a_trim_of_the_leader_deletes_what_it_lists_then_takes_their_tombstones_and_is_spent() {
    let (mut log, keys) = with_runs(5);
    let (trimmed, kept) = keys.split_at(3);
    for topic in [TopicKind::Assignments, TopicKind::Status] {
        let (key, body) = trim(1, trimmed);
        assert_eq!(log.leader(topic, &key, body), Outcome::Applied("trim"));
        // Deleted at once, as a `deleted` record on each would.
        assert_eq!(log.view.trimmed_keys().filter(|(of, _)| *of == topic).count(), 3);
        assert_eq!(log.view.spent_trims().count(), 0);
        for listed in trimmed {
            assert_eq!(log.write(topic, listed, ("anyone", RUNNER), None), Outcome::Applied("tombstone"));
        }
        assert_eq!(log.view.trimmed_keys().count(), 0);
        assert_eq!(log.view.spent_trims().collect::<Vec<_>>(), vec![(topic, key.as_str())]);
        assert_eq!(log.write(topic, &key, ("anyone", RUNNER), None), Outcome::Applied("tombstone"));
        assert_eq!(log.view.trims_held(), 0);
    }
    assert_eq!(runs(&log.view), 2);
    for key in kept {
        let (task, run) = key::task_and_uuid(key, "run").unwrap();
        assert_eq!(log.view.run(&task, &run).unwrap().phase(), RunPhase::Succeeded);
    }
    assert_eq!(log.compacted().runs, log.view.runs);
}

#[test]
fn a_trim_not_of_the_leader_or_not_well_formed_deletes_nothing_and_a_bare_tombstone_neither() {
    let (mut log, keys) = with_runs(3);
    let before = log.view.runs.clone();
    // Another sender, an epoch never claimed, a key naming another epoch.
    let (key, body) = trim(1, &keys);
    assert!(matches!(
        log.write(TopicKind::Assignments, &key, ("intruder", RUNNER), body),
        Outcome::Skipped(_)
    ));
    let (key, body) = trim(2, &keys);
    assert!(matches!(log.leader(TopicKind::Assignments, &key, body), Outcome::Skipped(_)));
    let (_, body) = trim(1, &keys);
    let outcome = log.leader(TopicKind::Assignments, &key::trim(2, Uuid::new_v4()), body);
    assert!(matches!(&outcome, Outcome::Skipped(reason) if reason.contains("trim/1/")), "{outcome:?}");
    // A key that is not a run's, a key twice, too many keys: refused, naming what is wrong.
    for (listed, why) in [
        (vec![key::sched(&spec().id)], "is not a run key"),
        (vec![keys[0].clone(), keys[0].clone()], "twice"),
        (vec![keys[0].clone(); shiva_proto::records::MAX_TRIM_KEYS + 1], "at most 256"),
    ] {
        let (key, body) = trim(1, &listed);
        let outcome = log.leader(TopicKind::Assignments, &key, body);
        assert!(matches!(&outcome, Outcome::Skipped(reason) if reason.contains(why)), "{why}: {outcome:?}");
    }
    assert_eq!(log.view.runs, before);
    // A bare tombstone on a run key is still refused, on either topic.
    for topic in [TopicKind::Assignments, TopicKind::Status] {
        assert!(matches!(log.write(topic, &keys[0], ("anyone", RUNNER), None), Outcome::Skipped(_)));
    }
    assert_eq!(log.view.runs, before);
    assert_eq!(log.view.trims_held(), 0);
}

#[test]
fn a_record_landing_on_a_trimmed_key_before_its_tombstone_ends_its_wait() {
    let (mut log, keys) = with_runs(2);
    let (key, body) = trim(1, &keys);
    log.leader(TopicKind::Status, &key, body);
    // A runner's late copy of its report lands on the first key: that key waits no more (its
    // newest record is the report again, as any record after a `deleted` marker); the trim
    // is spent once the second key's tombstone is read.
    let (task, run) = key::task_and_uuid(&keys[0], "run").unwrap();
    for view in [&log.view, &log.compacted()] {
        assert!(
            !view.run(&task, &run).unwrap().has_report(),
            "the trimmed report is gone, live and compacted"
        );
    }
    let mut report = RunReport::of(&slot_intent(&spec(), 0), RunPhase::Succeeded);
    assert_eq!(report.run_id, run);
    report.message = Some("late".into());
    log.write(TopicKind::Status, &keys[0], ("runner-007", RUNNER), Some(Body::RunReport(report)));
    assert_eq!(log.view.trimmed_keys().collect::<Vec<_>>(), vec![(TopicKind::Status, keys[1].as_str())]);
    log.write(TopicKind::Status, &keys[1], ("anyone", RUNNER), None);
    assert_eq!(log.view.spent_trims().count(), 1);
    assert_eq!(log.compacted().runs, log.view.runs);
}

/// The same deletions planned again before the first record was read back (a tombstone's write
/// failed): the copy, under the same key, still waits for every tombstone the first one did, so
/// the leader does not take it for spent and tombstone it early.
#[test]
fn a_copy_of_a_trim_record_still_waits_for_the_tombstones_of_the_first() {
    let (mut log, keys) = with_runs(3);
    let (key, body) = trim(1, &keys);
    log.leader(TopicKind::Assignments, &key, body.clone());
    log.write(TopicKind::Assignments, &keys[0], ("anyone", RUNNER), None);
    assert_eq!(log.leader(TopicKind::Assignments, &key, body), Outcome::Applied("trim"));
    assert_eq!(log.view.spent_trims().count(), 0, "spent before its tombstones");
    assert_eq!(log.view.trimmed_keys().count(), 2);
    for listed in &keys[1..] {
        log.write(TopicKind::Assignments, listed, ("anyone", RUNNER), None);
    }
    assert_eq!(log.view.spent_trims().count(), 1);
}

/// A stray tombstone on a `trim` record while a key it deleted still waits for its tombstone:
/// refused live (the key is unsettled), while compaction drops the record all the same. A reader
/// that replays the compacted log then holds the deleted entry again; the leader's repair, a
/// `deleted` record on the key itself and a tombstone, deletes it for that reader too, and both
/// views end the same (a review found the reader otherwise kept the run, its tombstone refused,
/// and lost its report to the leader's orphan rule: an open run).
#[test]
fn a_stray_tombstone_on_a_waiting_trim_record_is_refused_and_the_repair_reaches_a_replaying_reader() {
    use shiva_proto::records::Deleted;
    let (mut log, keys) = with_runs(3);
    let (key, body) = trim(1, &keys);
    log.leader(TopicKind::Assignments, &key, body);
    for listed in &keys[1..] {
        log.write(TopicKind::Assignments, listed, ("leader-001", LEADER), None);
    }
    // The tombstone of the first key failed; a stray one lands on the `trim/` key.
    let outcome = log.write(TopicKind::Assignments, &key, ("anyone", RUNNER), None);
    assert!(matches!(&outcome, Outcome::Skipped(reason) if reason.contains("still wait")), "{outcome:?}");
    assert!(!log.view.is_settled(TopicKind::Assignments, &key));
    assert_eq!(log.view.unsettled_trims().map(|(_, pending)| pending.len()).collect::<Vec<_>>(), vec![1]);
    // A reader restarts on the compacted log: no `trim` record, and the first intent is back.
    let mut replaying = log.compacted();
    let (task, run) = key::task_and_uuid(&keys[0], "run").unwrap();
    assert!(replaying.run(&task, &run).is_some_and(|run| run.has_intent()));
    // The leader's repair, then every reader reads it.
    let deleted = Some(Body::Deleted(Deleted { epoch: 1 }));
    let before = log.records.len();
    log.leader(TopicKind::Assignments, &keys[0], deleted);
    log.leader(TopicKind::Assignments, &keys[0], None);
    for (topic, offset, key, value) in &log.records[before..] {
        replaying.apply(*topic, *offset, Some(key.as_bytes()), value.as_deref());
    }
    assert_eq!(replaying.runs, log.view.runs);
    assert_eq!(log.compacted().runs, log.view.runs);
    assert!(log.view.run(&task, &run).is_none_or(|run| !run.has_intent()));
    // The `trim` record is spent now: the leader's tombstone is taken.
    assert_eq!(log.view.unsettled_trims().count(), 0);
    assert_eq!(log.leader(TopicKind::Assignments, &key, None), Outcome::Applied("tombstone"));
}
