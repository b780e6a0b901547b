//! The claim rules at their edges (issue 15, a bounded log): a reader with no claim yet takes
//! the first one as its epoch, within a range that leaves room to claim on.

use shiva_proto::records::{Body, Claim, Envelope};
use shiva_proto::topics::key;
use shiva_proto::view::{MAX_EPOCH, MAX_FIRST_EPOCH, Outcome};
use shiva_proto::{LogView, NodeId, TopicKind};
use uuid::Uuid;

fn claim(view: &mut LogView, offset: i64, node: &str, epoch: u64) -> Outcome {
    let node = NodeId::new(node).unwrap();
    let value = Envelope {
        sender: node.to_string(),
        incarnation: Some(Uuid::new_v4()),
        sent_at_ms: 0,
        body: Body::Claim(Claim { epoch }),
    }
    .encode();
    view.apply(
        TopicKind::Assignments,
        offset,
        Some(key::claim(epoch, &node, Uuid::new_v4()).as_bytes()),
        Some(&value),
    )
}

#[test]
fn the_first_claim_wins_its_epoch_within_a_range_that_leaves_room_to_claim_on() {
    let mut view = LogView::default();
    for (offset, epoch) in [(0, 0), (1, MAX_EPOCH + 1), (2, u64::MAX), (3, MAX_FIRST_EPOCH + 1)] {
        assert!(matches!(claim(&mut view, offset, "ghost", epoch), Outcome::Skipped(_)), "epoch {epoch}");
    }
    assert_eq!(view.epochs.newest, 0);
    // A compacted log starts at a later epoch: its first claim wins it.
    assert_eq!(claim(&mut view, 4, "n1", 57), Outcome::Applied("claim"));
    assert_eq!((view.epochs.newest, view.epochs.floor), (57, 57));
    assert!(matches!(claim(&mut view, 5, "n2", 57), Outcome::Skipped(reason) if reason.contains("lost")));
    assert!(matches!(claim(&mut view, 6, "n2", 60), Outcome::Skipped(reason) if reason.contains("jumps")));
    assert_eq!(claim(&mut view, 7, "n2", 58), Outcome::Applied("claim"));
    assert_eq!(view.leader().unwrap().1.node.as_str(), "n2");
    // The highest first epoch leaves 2^32 elections.
    let mut view = LogView::default();
    assert_eq!(claim(&mut view, 0, "n1", MAX_FIRST_EPOCH), Outcome::Applied("claim"));
    assert_eq!(claim(&mut view, 1, "n2", MAX_FIRST_EPOCH + 1), Outcome::Applied("claim"));
    // Up to the last epoch; past it, refused, never an overflow.
    let mut view = LogView::default();
    view.epochs.newest = MAX_EPOCH;
    assert!(
        matches!(claim(&mut view, 0, "n1", MAX_EPOCH + 1), Outcome::Skipped(reason) if reason.contains("range"))
    );
}
