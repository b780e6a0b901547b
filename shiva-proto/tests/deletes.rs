//! Deletes of leader-owned keys: a tombstone alone changes nothing; a `deleted` record of the
//! leader's epoch deletes the entry (issue 14, "fenced deletes").

use shiva_proto::records::{Assignment, Body, Claim, Deleted, Envelope, Placement, RunState, TaskStatus};
use shiva_proto::runs::{RunRequest, Sched};
use shiva_proto::topics::key;
use shiva_proto::view::Outcome;
use shiva_proto::{LogView, NodeId, TaskId, TaskSpec, TopicKind};
use uuid::Uuid;

struct Log {
    view: LogView,
    offset: i64,
    leader: (String, Uuid),
}

impl Log {
    fn apply(&mut self, topic: TopicKind, key: &str, body: Option<(String, Option<Uuid>, Body)>) -> Outcome {
        self.offset += 1;
        let value = body.map(|(sender, incarnation, body)| {
            Envelope { sender, incarnation, sent_at_ms: 0, body }.encode()
        });
        self.view.apply(topic, self.offset, Some(key.as_bytes()), value.as_deref())
    }

    fn leader(&self, body: Body) -> Option<(String, Option<Uuid>, Body)> {
        Some((self.leader.0.clone(), Some(self.leader.1), body))
    }
}

#[test]
fn only_a_deleted_record_of_the_leader_deletes_a_leader_owned_key() {
    let task = TaskId::new("app/t").unwrap();
    let n1 = NodeId::new("n1").unwrap();
    let mut log = Log { view: LogView::default(), offset: 0, leader: ("n1".into(), Uuid::new_v4()) };
    let claim = log.leader(Body::Claim(Claim { epoch: 1 }));
    log.apply(TopicKind::Assignments, &key::claim(1, &n1, Uuid::new_v4()), claim);
    let assignment = Assignment {
        epoch: 1,
        task: task.clone(),
        generation: 1,
        spec_revision: 0,
        placement: Placement::Assigned { node: n1.clone() },
        spec: TaskSpec::new(task.clone(), "true", vec![]),
        failed_on: vec![],
        retry_at_ms: None,
        holders: vec![],
        after: Vec::new(),
        incarnation: None,
    };
    let status = TaskStatus {
        task: task.clone(),
        generation: 1,
        state: RunState::Running,
        run_id: None,
        pid: Some(4),
        attempt: 1,
        restarts: 0,
        last_exit: None,
        message: None,
        permanent: false,
        after: Vec::new(),
    };
    let request = Uuid::new_v4();
    let records = [
        (TopicKind::Assignments, key::task(&task), Body::Assignment(assignment)),
        (TopicKind::Assignments, key::sched(&task), Body::Sched(Sched::fresh(1, task.clone(), 0))),
        (TopicKind::Status, key::task(&task), Body::Status(status)),
        (
            TopicKind::Commands,
            key::request(&task, request),
            Body::RunRequest(RunRequest { task: task.clone(), request }),
        ),
    ];
    for (topic, key, body) in &records {
        let outcome = log.apply(*topic, key, log.leader(body.clone()));
        assert!(matches!(outcome, Outcome::Applied(_)), "{key}: {outcome:?}");
    }
    let before = log.view.clone();
    let intruder = Some(("n2".to_owned(), Some(Uuid::new_v4()), Body::Deleted(Deleted { epoch: 1 })));
    for (topic, key, _) in &records {
        // A stray tombstone and a forged marker change nothing.
        assert!(matches!(log.apply(*topic, key, None), Outcome::Skipped(_)), "{key}: stray tombstone");
        assert!(
            matches!(log.apply(*topic, key, intruder.clone()), Outcome::Skipped(_)),
            "{key}: forged marker"
        );
    }
    assert_eq!(log.view.assignments, before.assignments);
    assert_eq!(log.view.scheds, before.scheds);
    assert_eq!(log.view.statuses, before.statuses);
    assert_eq!(log.view.requests, before.requests);
    // The leader's marker deletes; the tombstone after it is accepted and settles the key.
    for (topic, key, _) in &records {
        let marker = log.leader(Body::Deleted(Deleted { epoch: 1 }));
        assert!(matches!(log.apply(*topic, key, marker), Outcome::Applied("deleted")), "{key}");
        assert_eq!(log.apply(*topic, key, None), Outcome::Applied("tombstone"), "{key}");
    }
    assert!(log.view.assignments.is_empty() && log.view.scheds.is_empty());
    assert!(log.view.statuses.is_empty() && log.view.requests.is_empty());
    assert!(log.view.is_settled(TopicKind::Assignments, &key::task(&task)));
}
