//! A task whose newest definition in the log is not an acceptable spec (out of range, malformed,
//! too large, from a newer version) is an invalid task with the reason, never a crash and never
//! a silently kept older revision.

use shiva_proto::records::{Body, Envelope};
use shiva_proto::view::Outcome;
use shiva_proto::{LogView, TaskId, TaskSpec, TopicKind};

fn spec_record(json: &str) -> Vec<u8> {
    format!(r#"{{"v":1,"kind":"task","sender":"ctl:x","sent_at_ms":1,"body":{json}}}"#).into_bytes()
}

#[test]
fn an_out_of_range_spec_in_the_log_makes_its_task_invalid_with_the_reason() {
    let mut view = LogView::default();
    let task = TaskId::new("x").unwrap();
    let good =
        Envelope::now("ctl:x", None, Body::Task(TaskSpec::new(task.clone(), "sleep", vec![]))).encode();
    assert!(matches!(view.apply(TopicKind::Commands, 0, Some(b"task/x"), Some(&good)), Outcome::Applied(_)));
    assert!(view.specs.contains_key(&task));

    let bad = spec_record(
        r#"{"id":"x","command":"sleep","schedule":["* * * * * *"],"catch_up":"latest","starting_deadline":"1000000y"}"#,
    );
    let outcome = view.apply(TopicKind::Commands, 1, Some(b"task/x"), Some(&bad));
    assert!(matches!(outcome, Outcome::Skipped(_)), "{outcome:?}");
    assert!(!view.specs.contains_key(&task), "the older revision no longer governs");
    let invalid = &view.invalid[&task];
    assert_eq!(invalid.revision, 1);
    assert!(invalid.reason.contains("starting_deadline"), "{}", invalid.reason);
    assert!(view.is_defined(&task));
    assert_eq!(view.defined_tasks().collect::<Vec<_>>(), [&task]);

    // Garbage and a newer envelope version under the key fail the task too, naming why.
    view.apply(TopicKind::Commands, 2, Some(b"task/x"), Some(b"\x00 not json"));
    assert!(view.invalid[&task].reason.contains("malformed"), "{}", view.invalid[&task].reason);
    let newer = br#"{"v":9,"kind":"task","sender":"ctl:x","sent_at_ms":1,"body":{}}"#;
    view.apply(TopicKind::Commands, 3, Some(b"task/x"), Some(newer));
    assert_eq!(view.invalid[&task].revision, 3);

    // A valid revision heals it; a tombstone deletes it either way.
    view.apply(TopicKind::Commands, 4, Some(b"task/x"), Some(&good));
    assert!(view.specs.contains_key(&task) && !view.invalid.contains_key(&task));
    view.apply(TopicKind::Commands, 5, Some(b"task/x"), Some(&bad));
    view.apply(TopicKind::Commands, 6, Some(b"task/x"), None);
    assert!(!view.is_defined(&task));
}

#[test]
fn assignments_and_intents_carrying_invalid_specs_are_skipped() {
    let mut view = LogView::default();
    let incarnation = "7e78f23a-f517-49c5-9580-0f25c94e687a";
    let claim = format!(
        r#"{{"v":1,"kind":"claim","sender":"n1","incarnation":"{incarnation}","sent_at_ms":1,"body":{{"epoch":1}}}}"#
    );
    let applied = view.apply(TopicKind::Assignments, 0, Some(b"claim/1/n1/c1"), Some(claim.as_bytes()));
    assert!(matches!(applied, Outcome::Applied(_)), "{applied:?}");
    let record = format!(
        r#"{{"v":1,"kind":"assignment","sender":"n1","incarnation":"{incarnation}","sent_at_ms":1,
        "body":{{"epoch":1,"task":"x","generation":1,"spec_revision":0,"state":"assigned","node":"n1",
                "spec":{{"id":"x","command":"sleep","stop_grace":"100000h"}}}}}}"#
    );
    let outcome = view.apply(TopicKind::Assignments, 1, Some(b"task/x"), Some(record.as_bytes()));
    match outcome {
        Outcome::Skipped(reason) => assert!(reason.contains("stop_grace"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(view.assignments.is_empty());
}

/// A definition record keyed by an instance id (`task/web@1`: no writer of ours makes one)
/// defines nothing: it is skipped, and never hides the instance its task defines as an invalid
/// task that no command could delete.
#[test]
fn a_definition_keyed_by_an_instance_is_skipped_not_an_invalid_task() {
    let mut view = LogView::default();
    let mut web = TaskSpec::new(TaskId::new("web").unwrap(), "sleep", vec![]);
    web.count = Some(2);
    let good = Envelope::now("ctl:x", None, Body::Task(web)).encode();
    view.apply(TopicKind::Commands, 0, Some(b"task/web"), Some(&good));
    let instance = TaskId::new("web@1").unwrap();
    assert!(view.is_defined(&instance));
    for (offset, value) in
        [spec_record(r#"{"id":"web@1","command":"evil"}"#), b"\x00 not json".to_vec()].iter().enumerate()
    {
        let outcome = view.apply(TopicKind::Commands, 1 + offset as i64, Some(b"task/web@1"), Some(value));
        assert!(matches!(outcome, Outcome::Skipped(_)), "{outcome:?}");
    }
    assert!(view.invalid.is_empty(), "{:?}", view.invalid);
    assert!(!view.specs.contains_key(&instance));
    assert_eq!(view.spec_of(&instance).map(|entry| entry.spec.command.as_str()), Some("sleep"));
}
