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
        kind: kind.into(),
        sender: "ctl:ops".into(),
        sent_at_ms: 0,
        body: body.clone(),
        sig: sig.cloned(),
    }
}

fn sign(key: &PrivateKey, cluster: &str, record: &str, body: &serde_json::Value, at_ms: u64) -> Signature {
    let message = message(cluster, record, "task", "ctl:ops", at_ms, &canonical(body));
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
    let message = message("c", record, "desired", "ctl:ops", 1, &canonical(&body));
    let sig =
        signature(ops.public_key(), 1, &ops.sign(NAMESPACE, HashAlg::Sha512, &message).unwrap()).unwrap();
    assert!(policy.check(record, "b/x", &parts("desired", &body, Some(&sig)), None).is_ok());
}
