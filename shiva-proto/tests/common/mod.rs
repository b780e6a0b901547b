//! Helpers shared by the integration tests of run records.

use std::sync::Arc;

use shiva_proto::records::{Body, Envelope};
use shiva_proto::runs::{RunIntent, Trigger, run_id};
use shiva_proto::spec::TaskSpec;
use shiva_proto::topics::TopicKind;
use shiva_proto::view::{LogView, Outcome};
use uuid::Uuid;

/// The leader's incarnation in these logs.
#[allow(dead_code)]
pub const LEADER: Uuid = Uuid::from_u128(1);
/// A runner's incarnation.
#[allow(dead_code)]
pub const RUNNER: Uuid = Uuid::from_u128(2);

/// The log as written, and a view that read it all. (Each test crate uses a part of it.)
#[derive(Default)]
#[allow(dead_code)]
pub struct Log {
    pub records: Vec<(TopicKind, i64, String, Option<Vec<u8>>)>,
    pub view: LogView,
}

#[allow(dead_code)]
impl Log {
    /// Appends a record of `sender` (a node id and incarnation) on `topic`, and reads it.
    pub fn write(
        &mut self,
        topic: TopicKind,
        key: &str,
        sender: (&str, Uuid),
        body: Option<Body>,
    ) -> Outcome {
        let offset = self.records.iter().filter(|(of, ..)| *of == topic).count() as i64;
        let value = body.map(|body| Envelope::now(sender.0, Some(sender.1), body).encode());
        self.records.push((topic, offset, key.to_owned(), value.clone()));
        self.view.apply(topic, offset, Some(key.as_bytes()), value.as_deref())
    }

    /// A record of the leader (`leader-001`).
    pub fn leader(&mut self, topic: TopicKind, key: &str, body: Option<Body>) -> Outcome {
        self.write(topic, key, ("leader-001", LEADER), body)
    }

    /// What a reader of the compacted log (the newest record of each key) holds.
    pub fn compacted(&self) -> LogView {
        let mut view = LogView::default();
        for (i, (topic, offset, key, value)) in self.records.iter().enumerate() {
            if !self.records[i + 1..].iter().any(|(t, _, k, _)| t == topic && k == key) {
                view.apply(*topic, *offset, Some(key.as_bytes()), value.as_deref());
            }
        }
        view
    }
}

/// The first attempt of `spec`'s slot `slot_ms` on `runner-007`, launched at its slot; the
/// optional fields left out.
pub fn slot_intent(spec: &Arc<TaskSpec>, slot_ms: i64) -> RunIntent {
    let trigger = Trigger::Slot { slot_ms };
    RunIntent {
        epoch: 1,
        task: spec.id.clone(),
        run_id: run_id(&spec.id, trigger, 1),
        attempt: 1,
        trigger,
        node: Some(shiva_proto::NodeId::new("runner-007").unwrap()),
        launch_at_ms: slot_ms,
        written_at_ms: None,
        spec_revision: 0,
        spec: spec.clone(),
        stop: None,
        verdict: None,
        note: None,
        incarnation: None,
        seat: None,
        status_seen: None,
    }
}
