//! The runner's confirmation of a launch intent, pure: after its start record is written and
//! the log read to its end, a run is launched only if its intent still names this node and
//! nobody asked to stop it or judged it.

use shiva_proto::NodeId;
use shiva_proto::runs::{RunIntent, RunPhase};
use shiva_proto::view::RunEntry;
use uuid::Uuid;

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// Launch it at its instant.
    Launch(Box<RunIntent>),
    /// Do not launch it, with the reason.
    Cancel(String),
}

/// Confirms (or not) the run `entry` for node `me` in `incarnation`.
pub fn confirm(entry: Option<&RunEntry>, me: &NodeId, incarnation: Uuid) -> Confirm {
    let Some((intent, _)) = entry.and_then(|entry| entry.intent.as_ref()) else {
        return Confirm::Cancel("its launch intent is gone".into());
    };
    match &intent.node {
        Some(node) if node == me => {}
        Some(node) => return Confirm::Cancel(format!("it is assigned to {node}")),
        None => return Confirm::Cancel("it is not assigned to any node".into()),
    }
    if let Some(reason) = &intent.stop {
        return Confirm::Cancel(reason.clone());
    }
    if let Some(verdict) = intent.verdict {
        return Confirm::Cancel(format!("the leader judged it {}", verdict.as_str()));
    }
    if let Some(report) = entry.and_then(|entry| entry.report.as_ref()) {
        if report.incarnation != incarnation {
            return Confirm::Cancel("another incarnation of this node started it".into());
        }
        if report.report.state != RunPhase::Starting {
            return Confirm::Cancel(format!("it is already {}", report.report.state.as_str()));
        }
    }
    Confirm::Launch(Box::new(intent.clone()))
}

#[cfg(test)]
mod tests {
    use shiva_proto::runs::{RunReport, Trigger, run_id};
    use shiva_proto::view::ReportEntry;
    use shiva_proto::{TaskId, TaskSpec};

    use super::*;

    fn entry(node: Option<&str>, report: Option<(Uuid, RunPhase)>) -> RunEntry {
        let task = TaskId::new("t").unwrap();
        let trigger = Trigger::Slot { slot_ms: 1000 };
        let intent = RunIntent {
            epoch: 1,
            task: task.clone(),
            run_id: run_id(&task, trigger, 1),
            attempt: 1,
            trigger,
            node: node.map(|node| NodeId::new(node).unwrap()),
            launch_at_ms: 1000,
            spec_revision: 0,
            spec: std::sync::Arc::new(TaskSpec::new(task.clone(), "true", vec![])),
            stop: None,
            verdict: None,
            note: None,
        };
        let report = report.map(|(incarnation, state)| ReportEntry {
            node: NodeId::new("a").unwrap(),
            incarnation,
            offset: 3,
            report: RunReport {
                task: task.clone(),
                run_id: intent.run_id,
                attempt: 1,
                trigger,
                state,
                pid: None,
                started_ms: None,
                ended_ms: None,
                exit: None,
                message: None,
            },
        });
        RunEntry { intent: Some((intent, 2)), report }
    }

    #[test]
    fn launches_only_a_current_intent_of_its_own() {
        let me = NodeId::new("a").unwrap();
        let mine = Uuid::from_u128(1);
        let current = entry(Some("a"), Some((mine, RunPhase::Starting)));
        assert!(matches!(confirm(Some(&current), &me, mine), Confirm::Launch(_)));
        assert!(matches!(confirm(Some(&entry(Some("a"), None)), &me, mine), Confirm::Launch(_)));

        assert!(matches!(confirm(None, &me, mine), Confirm::Cancel(_)));
        assert!(
            matches!(confirm(Some(&entry(Some("b"), None)), &me, mine), Confirm::Cancel(r) if r.contains("b"))
        );
        assert!(matches!(confirm(Some(&entry(None, None)), &me, mine), Confirm::Cancel(_)));
        let other = entry(Some("a"), Some((Uuid::from_u128(2), RunPhase::Starting)));
        assert!(matches!(confirm(Some(&other), &me, mine), Confirm::Cancel(r) if r.contains("incarnation")));
        let ran = entry(Some("a"), Some((mine, RunPhase::Running)));
        assert!(matches!(confirm(Some(&ran), &me, mine), Confirm::Cancel(_)));

        let mut stopped = current.clone();
        stopped.intent.as_mut().unwrap().0.stop = Some("the task was killed".into());
        assert_eq!(confirm(Some(&stopped), &me, mine), Confirm::Cancel("the task was killed".into()));
        let mut judged = current;
        judged.intent.as_mut().unwrap().0.verdict = Some(RunPhase::Missed);
        assert!(matches!(confirm(Some(&judged), &me, mine), Confirm::Cancel(r) if r.contains("missed")));
    }
}
