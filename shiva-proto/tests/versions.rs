//! Mixed versions (issue 15, point 6): a record of a newer protocol is not read, but claims,
//! heartbeats and departures count by key and header, so an older reader never lets a second
//! claim win an epoch a newer node already took.

use serde_json::json;
use shiva_proto::records::{Body, Claim, Envelope};
use shiva_proto::topics::key;
use shiva_proto::view::Outcome;
use shiva_proto::{LogView, NodeId, PROTOCOL_VERSION, TopicKind};
use uuid::Uuid;

const NEXT: u16 = PROTOCOL_VERSION + 1;

/// A record as a node of the next protocol writes it: a header every version keeps, and a body
/// of a shape this build does not know.
fn newer(kind: &str, sender: &str, incarnation: Uuid) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "v": NEXT, "kind": kind, "sender": sender, "incarnation": incarnation,
        "sent_at_ms": 1_795_315_713_425u64, "body": {"shape": "of the next version", "epoch": "?"}
    }))
    .unwrap()
}

fn current_claim(node: &NodeId, incarnation: Uuid, epoch: u64) -> Vec<u8> {
    Envelope {
        sender: node.to_string(),
        incarnation: Some(incarnation),
        sent_at_ms: 0,
        body: Body::Claim(Claim { epoch }),
    }
    .encode()
}

#[test]
fn a_claim_of_a_newer_protocol_takes_its_epoch_so_one_epoch_never_has_two_winners() {
    let (new, old) = (NodeId::new("new").unwrap(), NodeId::new("old").unwrap());
    let (inc_new, inc_old) = (Uuid::new_v4(), Uuid::new_v4());
    let mut view = LogView::default();
    let newer_claim = newer("claim", "new", inc_new);
    let outcome = view.apply(
        TopicKind::Assignments,
        0,
        Some(key::claim(1, &new, Uuid::new_v4()).as_bytes()),
        Some(&newer_claim),
    );
    assert_eq!(outcome, Outcome::Applied("claim"));
    // The older node's claim for the same epoch lands second: it loses, as on every reader.
    let mine = current_claim(&old, inc_old, 1);
    let outcome = view.apply(
        TopicKind::Assignments,
        1,
        Some(key::claim(1, &old, Uuid::new_v4()).as_bytes()),
        Some(&mine),
    );
    assert!(matches!(&outcome, Outcome::Skipped(reason) if reason.contains("lost")), "{outcome:?}");
    let (epoch, winner) = view.leader().expect("a leader");
    assert_eq!((epoch, &winner.node, winner.incarnation), (1, &new, inc_new));
    // The next epoch is open to anyone, by the same rules.
    let mine = current_claim(&old, inc_old, 2);
    assert_eq!(
        view.apply(
            TopicKind::Assignments,
            2,
            Some(key::claim(2, &old, Uuid::new_v4()).as_bytes()),
            Some(&mine)
        ),
        Outcome::Applied("claim")
    );
}

#[test]
fn a_newer_claim_follows_the_claim_rules_by_its_key() {
    let new = NodeId::new("new").unwrap();
    let inc = Uuid::new_v4();
    let mut view = LogView::default();
    let claim = newer("claim", "new", inc);
    let skipped = |outcome: Outcome, needle: &str| {
        assert!(
            matches!(&outcome, Outcome::Skipped(reason) if reason.contains(needle) && reason.contains("protocol")),
            "{outcome:?}"
        );
    };
    skipped(
        view.apply(TopicKind::Assignments, 1, Some(b"claim/1/other/x"), Some(&claim)),
        "key does not match",
    );
    skipped(view.apply(TopicKind::Assignments, 2, Some(b"claim/one/new/x"), Some(&claim)), "no epoch");
    skipped(view.apply(TopicKind::Assignments, 3, Some(b"claim/1/new/"), Some(&claim)), "key does not match");
    skipped(
        view.apply(TopicKind::Assignments, 0, Some(key::claim(1 << 60, &new, inc).as_bytes()), Some(&claim)),
        "out of range",
    );
    let no_incarnation =
        serde_json::to_vec(&json!({"v": NEXT, "kind": "claim", "sender": "new", "body": {}})).unwrap();
    skipped(
        view.apply(
            TopicKind::Assignments,
            4,
            Some(key::claim(1, &new, inc).as_bytes()),
            Some(&no_incarnation),
        ),
        "incarnation",
    );
    assert_eq!(view.epochs.newest, 0, "no refused claim took an epoch");
    // Once an epoch is taken, a newer claim that jumps past the next is refused.
    let first = current_claim(&NodeId::new("old").unwrap(), Uuid::new_v4(), 1);
    view.apply(TopicKind::Assignments, 6, Some(b"claim/1/old/x"), Some(&first));
    skipped(
        view.apply(TopicKind::Assignments, 7, Some(key::claim(5, &new, inc).as_bytes()), Some(&claim)),
        "jumps",
    );
    assert_eq!(view.epochs.newest, 1);
    // Anything else of a newer protocol is skipped, saying so.
    let assignment = newer("assignment", "new", inc);
    skipped(
        view.apply(TopicKind::Assignments, 5, Some(b"task/app/t"), Some(&assignment)),
        "read only by its protocol",
    );
}

#[test]
fn a_newer_heartbeat_shows_the_node_alive_with_its_protocol_and_runs_nothing_there() {
    let new = NodeId::new("new").unwrap();
    let inc = Uuid::new_v4();
    let mut view = LogView::default();
    let heartbeat = newer("heartbeat", "new", inc);
    assert_eq!(
        view.apply(TopicKind::Control, 0, Some(key::node(&new).as_bytes()), Some(&heartbeat)),
        Outcome::Applied("heartbeat")
    );
    let entry = &view.heartbeats[&new];
    assert_eq!((entry.incarnation, entry.heartbeat.protocol, entry.heartbeat.runner), (inc, NEXT, false));
    assert_eq!(entry.sent_at_ms, 1_795_315_713_425);
    let leave = newer("leave", "new", inc);
    assert_eq!(
        view.apply(TopicKind::Control, 1, Some(key::leave(&new, inc).as_bytes()), Some(&leave)),
        Outcome::Applied("leave")
    );
    assert!(view.left.contains(&(new.clone(), inc)));
    // A heartbeat on another node's key is refused.
    let forged = newer("heartbeat", "other", inc);
    assert!(matches!(
        view.apply(TopicKind::Control, 2, Some(key::node(&new).as_bytes()), Some(&forged)),
        Outcome::Skipped(_)
    ));
}
