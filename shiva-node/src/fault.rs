//! Containment of internal errors: a panic while planning or running one task fails that task
//! (`internal error: <message>`), never the node. And the test-only fault hook that proves it.
//!
//! Invariant: the node's decisions walk tasks one at a time; each walk runs inside
//! [`contain`], and what it wrote before panicking is discarded by the caller, so a task whose
//! planning panics leaves no half-made decision behind. The task is then failed for its spec
//! revision (a `failed` placement in the log), so no node plans it again and none crash-loops
//! on it; a new revision clears it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use shiva_proto::TaskId;

/// Where the fault hook fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The leader's planning of the task (placement, reconciliation, scheduling).
    Plan,
    /// The runner's job or run of the task.
    Run,
}

static FAULT: OnceLock<Vec<(Stage, TaskId)>> = OnceLock::new();

/// Parses and installs the fault hook (`plan:<task>` or `run:<task>`, comma separated), once, at
/// start. For tests only: a node started with it panics whenever it plans or runs that task.
pub fn install(spec: Option<&str>) -> Result<(), String> {
    if spec.is_none() {
        return Ok(());
    }
    let mut targets = Vec::new();
    for text in spec.into_iter().flat_map(|spec| spec.split(',')) {
        let (stage, task) = text.split_once(':').ok_or_else(|| format!("'{text}': expected STAGE:TASK"))?;
        let stage = match stage {
            "plan" => Stage::Plan,
            "run" => Stage::Run,
            other => return Err(format!("'{other}': the stage is plan or run")),
        };
        targets.push((stage, TaskId::new(task).map_err(|err| err.to_string())?));
    }
    let _ = FAULT.set(targets);
    Ok(())
}

/// Panics when the fault hook targets `task` at `stage`.
pub fn hook(stage: Stage, task: &TaskId) {
    if FAULT.get().is_some_and(|targets| targets.iter().any(|(at, target)| *at == stage && target == task)) {
        panic!("fault hook: {task} at {stage:?}");
    }
}

/// Runs `work`; a panic comes back as `Err("internal error: <message>")`.
pub fn contain<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|payload| internal_error(payload.as_ref()))
}

/// The reason shown for a panic payload.
pub fn internal_error(payload: &(dyn std::any::Any + Send)) -> String {
    format!("internal error: {}", shiva_proto::view::panic_message(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        assert_eq!(contain(|| 3), Ok(3));
        let err = contain(|| -> u8 { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(err, "internal error: boom 7");
        assert!(install(Some("later:x")).is_err());
    }
}
