//! Helpers shared by the integration tests of run records.

use std::sync::Arc;

use shiva_proto::runs::{RunIntent, Trigger, run_id};
use shiva_proto::spec::TaskSpec;

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
