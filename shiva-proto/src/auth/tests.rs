use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::{HashAlg, PrivateKey};

use super::*;

fn key(seed: u8, comment: &str) -> PrivateKey {
    PrivateKey::new(KeypairData::Ed25519(Ed25519Keypair::from_seed(&[seed; 32])), comment).unwrap()
}

fn line(key: &PrivateKey, options: &str) -> String {
    let text = key.public_key().to_openssh().unwrap();
    if options.is_empty() { text } else { format!("{options} {text}") }
}

/// What a reader decodes of a command record.
fn parts(kind: &str, body: &serde_json::Value, sig: Option<&Signature>) -> SignedParts {
    SignedParts {
        v: 1,
        kind: kind.into(),
        incarnation: None,
        sender: "ctl:ops".into(),
        sent_at_ms: 0,
        body: body.clone(),
        sig: sig.cloned(),
    }
}

fn sign(key: &PrivateKey, cluster: &str, record: &str, body: &serde_json::Value, at_ms: u64) -> Signature {
    let message = message(cluster, record, &parts("task", body, None), at_ms);
    let sshsig = key.sign(NAMESPACE, HashAlg::Sha512, &message).unwrap();
    signature(key.public_key(), at_ms, &sshsig).unwrap()
}

#[test]
fn a_listed_key_is_accepted_and_everything_else_is_refused_with_its_reason() {
    let (ops, tenant, stranger) = (key(1, "ops@host"), key(2, "tenant-a"), key(3, "mallory"));
    let text = format!("# operators\n{}\n{}\n", line(&ops, ""), line(&tenant, "shiva-tasks=\"tenant-a/\""));
    let policy = Policy::parse("prod", &text).unwrap();
    assert_eq!(policy.len(), 2);
    let body = serde_json::json!({"id": "tenant-a/app", "command": "/bin/true"});
    let check = |record: &str, task: &str, sig: Option<&Signature>, newest| {
        policy.check(record, task, &parts("task", &body, sig), newest)
    };

    let signer = check(
        "task/tenant-a/app",
        "tenant-a/app",
        Some(&sign(&ops, "prod", "task/tenant-a/app", &body, 5)),
        None,
    )
    .unwrap();
    assert_eq!(signer.comment, "ops@host");
    assert!(signer.fingerprint.starts_with("SHA256:"));
    let by_tenant = sign(&tenant, "prod", "task/tenant-a/app", &body, 5);
    assert!(check("task/tenant-a/app", "tenant-a/app", Some(&by_tenant), None).is_ok());

    let refused = |result: Result<Signer, String>, words: &str| {
        let err = result.unwrap_err();
        assert!(err.contains(words), "{err}");
    };
    refused(check("task/tenant-a/app", "tenant-a/app", None, None), "unsigned");
    refused(
        check(
            "task/tenant-a/app",
            "tenant-a/app",
            Some(&sign(&stranger, "prod", "task/tenant-a/app", &body, 5)),
            None,
        ),
        "not in --authorized-keys",
    );
    let other = sign(&tenant, "prod", "task/tenant-b/app", &body, 5);
    refused(check("task/tenant-b/app", "tenant-b/app", Some(&other), None), "only tasks under tenant-a/");
    let prefix_trap = sign(&tenant, "prod", "task/tenant-ab/app", &body, 5);
    refused(check("task/tenant-ab/app", "tenant-ab/app", Some(&prefix_trap), None), "only tasks under");
    refused(check("task/tenant-a/app", "tenant-a/app", Some(&by_tenant), Some((6, None))), "replayed");
    refused(check("task/tenant-a/app", "tenant-a/app", Some(&by_tenant), Some((5, None))), "replayed");
    let other_sig = sign(&ops, "prod", "task/tenant-a/app", &body, 5).sshsig;
    refused(
        check("task/tenant-a/app", "tenant-a/app", Some(&by_tenant), Some((5, Some(&other_sig)))),
        "replayed",
    );
    // The accepted command itself, written again while it stands (the leader's repair).
    assert!(
        check("task/tenant-a/app", "tenant-a/app", Some(&by_tenant), Some((5, Some(&by_tenant.sshsig))))
            .is_ok()
    );
    refused(
        check(
            "task/tenant-a/app",
            "tenant-a/app",
            Some(&sign(&ops, "staging", "task/tenant-a/app", &body, 5)),
            None,
        ),
        "bad signature",
    );
    refused(check("task/tenant-a/other", "tenant-a/other", Some(&by_tenant), None), "bad signature");
    let mut altered = by_tenant.clone();
    altered.at_ms = 6;
    refused(check("task/tenant-a/app", "tenant-a/app", Some(&altered), None), "bad signature");
    let mut swapped = sign(&stranger, "prod", "task/tenant-a/app", &body, 5);
    swapped.key = PublicKey::new(ops.public_key().key_data().clone(), "").to_openssh().unwrap();
    refused(check("task/tenant-a/app", "tenant-a/app", Some(&swapped), None), "another key");
    let changed = serde_json::json!({"id": "tenant-a/app", "command": "/bin/sh"});
    assert!(
        policy
            .check("task/tenant-a/app", "tenant-a/app", &parts("task", &changed, Some(&by_tenant)), None)
            .is_err()
    );
}

#[test]
fn authorized_keys_files_are_read_strictly() {
    let ops = key(1, "ops");
    assert!(Policy::parse("c", "").unwrap_err().contains("no key"));
    assert!(Policy::parse("c", "ssh-ed25519 garbage").unwrap_err().contains("line 1"));
    let unknown = format!("\n{}", line(&ops, "command=\"/bin/sh\""));
    assert!(Policy::parse("c", &unknown).unwrap_err().contains("line 2: unknown option 'command'"));
    let many = line(&ops, "shiva-tasks=\"a/,b\"");
    let policy = Policy::parse("c", &many).unwrap();
    let body = serde_json::json!({});
    let record = "desired/b/x";
    let message = message("c", record, &parts("desired", &body, None), 1);
    let sig =
        signature(ops.public_key(), 1, &ops.sign(NAMESPACE, HashAlg::Sha512, &message).unwrap()).unwrap();
    assert!(policy.check(record, "b/x", &parts("desired", &body, Some(&sig)), None).is_ok());
}

/// A command record as `shiva-ctl --sign-key` writes it.
fn record(private: &PrivateKey, cluster: &str, key: &str, body: crate::records::Body, at_ms: u64) -> Vec<u8> {
    let bytes = crate::Envelope { sender: "ctl:ops".into(), incarnation: None, sent_at_ms: 1, body }.encode();
    let parts = SignedParts::decode(&bytes).unwrap();
    let sshsig = private.sign(NAMESPACE, HashAlg::Sha512, &message(cluster, key, &parts, at_ms)).unwrap();
    attach(&bytes, &signature(private.public_key(), at_ms, &sshsig).unwrap())
}

#[test]
fn in_a_signed_view_only_signed_commands_change_anything_and_a_repair_changes_nothing() {
    use crate::records::{Body, Desired, DesiredState};
    use crate::view::{LogView, Outcome};
    use crate::{TaskId, TaskSpec, TopicKind};
    let ops = key(1, "ops");
    let policy = std::sync::Arc::new(Policy::parse("c", &line(&ops, "")).unwrap());
    let mut view = LogView::with_policy(Some(policy));
    let id = TaskId::new("a/x").unwrap();
    let spec = TaskSpec::new(id.clone(), "/bin/true", Vec::new());
    let task = record(&ops, "c", "task/a/x", Body::Task(spec), 10);
    let stopped = Body::Desired(Desired { task: id.clone(), state: DesiredState::Stopped });
    let stop = record(&ops, "c", "desired/a/x", stopped, 11);
    let mut apply = |offset: i64, key: &str, value: Option<&[u8]>| {
        view.apply(TopicKind::Commands, offset, Some(key.as_bytes()), value)
    };
    assert_eq!(apply(0, "task/a/x", Some(&task)), Outcome::Applied("task"));
    assert_eq!(apply(1, "desired/a/x", Some(&stop)), Outcome::Applied("desired"));
    // An unsigned tombstone cannot set a stopped task running again.
    assert!(matches!(apply(2, "desired/a/x", None), Outcome::Skipped(_)));
    // The leader's repair (the accepted bytes again) changes nothing, not even the revision.
    assert_eq!(apply(3, "task/a/x", Some(&task)), Outcome::Applied("same command"));
    // A copy with a field changed outside the body, or a node's kind on a command key: refused,
    // and the task stays valid.
    let mut altered: serde_json::Value = serde_json::from_slice(&task).unwrap();
    altered["sent_at_ms"] = serde_json::json!(2);
    assert!(matches!(
        apply(4, "task/a/x", Some(&serde_json::to_vec(&altered).unwrap())),
        Outcome::Skipped(_)
    ));
    let deleted = br#"{"v":1,"kind":"deleted","sender":"n1","incarnation":"0b8d2c1e-0000-4000-8000-000000000000","sent_at_ms":1,"body":{"epoch":9}}"#;
    assert!(matches!(apply(5, "task/a/x", Some(deleted)), Outcome::Skipped(_)));
    assert_eq!(view.desired_state(&id), DesiredState::Stopped);
    assert_eq!(view.specs[&id].revision, 0);
    assert!(view.invalid.is_empty(), "{:?}", view.invalid);
    assert!(view.command_repairs.contains("task/a/x"), "the leader puts the accepted command back on top");
    assert!(view.refusal(&id).is_some_and(|refusal| refusal.offset == 5), "status shows the newest refusal");
    // The leader's copy of the standing command keeps the refusal shown (same signing time).
    assert_eq!(
        view.apply(TopicKind::Commands, 6, Some(b"task/a/x"), Some(&task)),
        Outcome::Applied("same command")
    );
    assert!(view.refusal(&id).is_some());

    // Under a new policy (signing turned on, a key removed), what the old one let in is refused
    // and left alone: the leader erases nothing.
    let other = key(2, "new");
    let mut strict =
        LogView::with_policy(Some(std::sync::Arc::new(Policy::parse("c", &line(&other, "")).unwrap())));
    assert!(matches!(
        strict.apply(TopicKind::Commands, 0, Some(b"task/a/x"), Some(&task)),
        Outcome::Skipped(_)
    ));
    assert!(strict.command_repairs.is_empty());
}

#[test]
fn a_tenants_key_may_not_choose_the_user_or_the_working_directory() {
    use crate::records::Body;
    use crate::view::{LogView, Outcome};
    use crate::{TaskId, TaskSpec, TopicKind};
    let tenant = key(2, "tenant");
    let policy = Policy::parse("c", &line(&tenant, "shiva-tasks=\"t/\"")).unwrap();
    let mut view = LogView::with_policy(Some(std::sync::Arc::new(policy)));
    let mut spec = TaskSpec::new(TaskId::new("t/x").unwrap(), "/bin/true", Vec::new());
    assert_eq!(
        view.apply(
            TopicKind::Commands,
            0,
            Some(b"task/t/x"),
            Some(&record(&tenant, "c", "task/t/x", Body::Task(spec.clone()), 1))
        ),
        Outcome::Applied("task")
    );
    spec.user = Some("root".into());
    let as_root = record(&tenant, "c", "task/t/x", Body::Task(spec.clone()), 2);
    let outcome = view.apply(TopicKind::Commands, 1, Some(b"task/t/x"), Some(&as_root));
    assert!(
        matches!(&outcome, Outcome::Skipped(reason) if reason.contains("may not set 'user'")),
        "{outcome:?}"
    );
    spec.user = None;
    spec.workdir = Some("/etc".into());
    let elsewhere = record(&tenant, "c", "task/t/x", Body::Task(spec), 3);
    let outcome = view.apply(TopicKind::Commands, 2, Some(b"task/t/x"), Some(&elsewhere));
    assert!(
        matches!(&outcome, Outcome::Skipped(reason) if reason.contains("may not set 'workdir'")),
        "{outcome:?}"
    );
}

#[test]
fn in_a_signed_view_a_nodes_mode_changes_only_by_a_signed_command_of_an_unrestricted_key() {
    use crate::records::{Body, Mode, NodeMode};
    use crate::view::{LogView, Outcome};
    use crate::{NodeId, TopicKind};
    let ops = key(1, "ops");
    let tenant = key(3, "tenant");
    let text = format!("{}\n{}\n", line(&ops, ""), line(&tenant, "shiva-tasks=\"tenant-a/\""));
    let mut view = LogView::with_policy(Some(std::sync::Arc::new(Policy::parse("c", &text).unwrap())));
    let n1 = NodeId::new("n1").unwrap();
    let drain = |mode| Body::NodeMode(NodeMode { node: n1.clone(), mode, deadline_ms: None });
    let mut apply =
        |offset: i64, value: Option<&[u8]>| view.apply(TopicKind::Commands, offset, Some(b"mode/n1"), value);
    // Unsigned: refused.
    let unsigned = crate::Envelope {
        sender: "ctl:x".into(),
        incarnation: None,
        sent_at_ms: 1,
        body: drain(Mode::Draining),
    }
    .encode();
    assert!(matches!(apply(0, Some(&unsigned)), Outcome::Skipped(reason) if reason.contains("unsigned")));
    // A tenant's key, restricted to its tasks: refused.
    let by_tenant = record(&tenant, "c", "mode/n1", drain(Mode::Draining), 10);
    assert!(
        matches!(apply(1, Some(&by_tenant)), Outcome::Skipped(reason) if reason.contains("may command only tasks"))
    );
    // An operator's key: accepted. An unsigned tombstone does not undo it.
    let by_ops = record(&ops, "c", "mode/n1", drain(Mode::Cordoned), 11);
    assert_eq!(apply(2, Some(&by_ops)), Outcome::Applied("node_mode"));
    assert!(matches!(apply(3, None), Outcome::Skipped(_)));
    assert_eq!(view.node_modes[&n1].mode, Mode::Cordoned);
    // Compaction would keep that tombstone in place of the command: the leader writes it again.
    assert!(view.command_repairs.contains("mode/n1"));
    assert_eq!(
        view.apply(TopicKind::Commands, 4, Some(b"mode/n1"), Some(&by_ops)),
        Outcome::Applied("same command")
    );
    assert!(view.command_repairs.is_empty());
    // A record whose key names another node, or a deadline on a cordon: refused.
    let mut open = LogView::default();
    let other = crate::Envelope {
        sender: "ctl:x".into(),
        incarnation: None,
        sent_at_ms: 1,
        body: drain(Mode::Draining),
    }
    .encode();
    assert!(matches!(
        open.apply(TopicKind::Commands, 0, Some(b"mode/n2"), Some(&other)),
        Outcome::Skipped(_)
    ));
    let deadline = Body::NodeMode(NodeMode { node: n1.clone(), mode: Mode::Cordoned, deadline_ms: Some(5) });
    let deadline =
        crate::Envelope { sender: "ctl:x".into(), incarnation: None, sent_at_ms: 1, body: deadline }.encode();
    assert!(matches!(
        open.apply(TopicKind::Commands, 1, Some(b"mode/n1"), Some(&deadline)),
        Outcome::Skipped(_)
    ));
    assert!(open.node_modes.is_empty());
    // In an open cluster a tombstone opens the node again.
    assert_eq!(
        open.apply(TopicKind::Commands, 2, Some(b"mode/n1"), Some(&unsigned)),
        Outcome::Applied("node_mode")
    );
    assert_eq!(open.apply(TopicKind::Commands, 3, Some(b"mode/n1"), None), Outcome::Applied("tombstone"));
    assert!(open.node_modes.is_empty());
}

#[test]
fn a_move_request_holds_at_most_an_hour_after_it_is_sent() {
    use crate::records::{Body, MoveRequest};
    use crate::view::{LogView, Outcome};
    use crate::{NodeId, TaskId, TopicKind};
    let request = |until_ms| {
        let body = Body::MoveRequest(MoveRequest {
            task: TaskId::new("a/x").unwrap(),
            from: NodeId::new("n1").unwrap(),
            to: NodeId::new("n2").unwrap(),
            until_ms,
        });
        crate::Envelope { sender: "ctl:x".into(), incarnation: None, sent_at_ms: 1_000, body }.encode()
    };
    let mut view = LogView::default();
    assert!(matches!(
        view.apply(TopicKind::Commands, 0, Some(b"move/a/x"), Some(&request(i64::MAX))),
        Outcome::Skipped(reason) if reason.contains("at most 3600 s")
    ));
    assert!(view.moves.is_empty());
    assert_eq!(
        view.apply(TopicKind::Commands, 1, Some(b"move/a/x"), Some(&request(61_000))),
        Outcome::Applied("move_request")
    );
}
