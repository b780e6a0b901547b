//! Runs of periodic and one-shot tasks: `run`, `suspend`/`resume` and `history`.

use std::time::Duration;

use chrono::DateTime;
use serde::Serialize;
use shiva_bus::{BusConfig, Publisher};
use shiva_proto::records::{Body, DesiredState, ExitInfo};
use shiva_proto::runs::{RunRequest, Trigger};
use shiva_proto::spec::TaskKind;
use shiva_proto::topics::key;
use shiva_proto::{LogView, NodeId, TaskId, TopicKind};
use uuid::Uuid;

use crate::show::exit_text;
use crate::{CtlError, TASK_TOPICS, envelope, invalid, no_such_task, print_json, snapshot, write_desired};

/// One run as `history` shows it.
#[derive(Debug, Serialize)]
pub struct HistoryRow {
    /// Run id (`SHIVA_RUN_ID`).
    pub run_id: Uuid,
    /// `slot`, `manual` or `once`.
    pub trigger: &'static str,
    /// The slot (RFC 3339, UTC), for scheduled runs.
    pub slot: Option<String>,
    /// Attempt (`SHIVA_ATTEMPT`).
    pub attempt: u32,
    /// The node it was given to.
    pub node: Option<NodeId>,
    /// `scheduled`, `starting`, `running`, `succeeded`, `failed`, `timed_out`, `stopped`,
    /// `lost`, `missed` or `skipped`.
    pub state: &'static str,
    /// How it ended.
    pub exit: Option<ExitInfo>,
    /// When the child started (RFC 3339).
    pub start: Option<String>,
    /// When it ended (RFC 3339).
    pub end: Option<String>,
    /// Detail: a stop reason, the leader's note, a spawn error.
    pub message: Option<String>,
}

fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// The task's runs, newest first.
pub fn history_rows(view: &LogView, task: &TaskId, limit: usize) -> Vec<HistoryRow> {
    let Some(runs) = view.runs.get(task) else { return Vec::new() };
    let mut rows: Vec<(i64, HistoryRow)> = runs
        .iter()
        .map(|(id, entry)| {
            let intent = entry.intent.as_ref().map(|(intent, _)| intent);
            let report = entry.report.as_ref().map(|entry| &entry.report);
            let trigger = intent.map(|i| i.trigger).or(report.map(|r| r.trigger));
            let order = intent
                .map(|intent| intent.launch_at_ms)
                .or(report.and_then(|report| report.started_ms))
                .unwrap_or(0);
            let row = HistoryRow {
                run_id: *id,
                trigger: match trigger {
                    Some(Trigger::Slot { .. }) => "slot",
                    Some(Trigger::Request { .. }) => "manual",
                    Some(Trigger::Once { .. }) | None => "once",
                },
                slot: trigger.and_then(|trigger| trigger.slot_ms()).map(time),
                attempt: intent.map_or_else(|| report.map_or(0, |r| r.attempt), |i| i.attempt),
                node: intent
                    .and_then(|intent| intent.node.clone())
                    .or(entry.report.as_ref().map(|entry| entry.node.clone())),
                state: entry.phase().as_str(),
                exit: report.and_then(|report| report.exit),
                start: report.and_then(|report| report.started_ms).map(time),
                end: report.and_then(|report| report.ended_ms).map(time),
                message: report
                    .and_then(|report| report.message.clone())
                    .or(intent.and_then(|intent| intent.note.clone().or(intent.stop.clone()))),
            };
            (order, row)
        })
        .collect();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.attempt.cmp(&a.1.attempt)));
    rows.into_iter().take(limit).map(|(_, row)| row).collect()
}

fn scheduled_task(view: &LogView, task: &TaskId, verb: &str) -> Result<TaskKind, CtlError> {
    if let Some(invalid) = view.invalid.get(task) {
        return Err(CtlError::Failed(anyhow::anyhow!(
            "{task} is failed: its definition (revision {}) is invalid: {}; submit a valid one",
            invalid.revision,
            invalid.reason
        )));
    }
    let spec = view.specs.get(task).ok_or_else(|| no_such_task(task))?;
    match spec.spec.kind() {
        TaskKind::Service => Err(CtlError::Failed(anyhow::anyhow!(
            "{task} is a long-running service: `{verb}` applies to periodic and one-shot tasks \
             (use kill/start for services)"
        ))),
        kind => Ok(kind),
    }
}

/// `run ID`: a request record the leader turns into a run under the overlap policy.
pub async fn run_now(config: &BusConfig, timeout: Duration, id: &str) -> Result<(), CtlError> {
    let task = TaskId::new(id).map_err(invalid)?;
    let view = snapshot(config, timeout, &TASK_TOPICS).await?;
    if scheduled_task(&view, &task, "run")? == TaskKind::Once {
        return Err(CtlError::Failed(anyhow::anyhow!(
            "{task} is a one-shot task: submit it again to run it again"
        )));
    }
    match view.desired_state(&task) {
        DesiredState::Running => {}
        state => {
            return Err(CtlError::Failed(anyhow::anyhow!(
                "{task} is {}: `resume` (or `start`) it first",
                state.as_str()
            )));
        }
    }
    let request = Uuid::new_v4();
    let body = Body::RunRequest(RunRequest { task: task.clone(), request });
    let publisher = Publisher::new(config, "ctl")?;
    let request_key = key::request(&task, request);
    publisher.send(TopicKind::Commands, &request_key, Some(&envelope(&request_key, body)?)).await?;
    println!("{task}: run requested (request {request}); see `shiva-ctl history {task}`");
    Ok(())
}

/// `suspend ID` / `resume ID`.
pub async fn suspend(
    config: &BusConfig,
    timeout: Duration,
    id: &str,
    state: DesiredState,
) -> Result<(), CtlError> {
    let task = TaskId::new(id).map_err(invalid)?;
    let view = snapshot(config, timeout, &TASK_TOPICS).await?;
    let verb = if state == DesiredState::Suspended { "suspend" } else { "resume" };
    scheduled_task(&view, &task, verb)?;
    write_desired(config, &view, &task, state).await
}

/// `history ID`.
pub async fn history(
    config: &BusConfig,
    timeout: Duration,
    id: &str,
    limit: usize,
    json: bool,
) -> Result<(), CtlError> {
    let task = TaskId::new(id).map_err(invalid)?;
    let view = snapshot(config, timeout, &TASK_TOPICS).await?;
    if !view.is_defined(&task) && !view.runs.contains_key(&task) {
        return Err(no_such_task(&task));
    }
    let rows = history_rows(&view, &task, limit);
    if json {
        print_json(&rows);
        return Ok(());
    }
    println!(
        "{:<36} {:<24} {:>3} {:<12} {:<10} {:<9} {:<24} {:<24}  MESSAGE",
        "RUN", "SLOT", "TRY", "NODE", "STATE", "EXIT", "START", "END"
    );
    for row in rows {
        println!(
            "{:<36} {:<24} {:>3} {:<12} {:<10} {:<9} {:<24} {:<24}  {}",
            row.run_id,
            row.slot.as_deref().unwrap_or(row.trigger),
            row.attempt,
            row.node.as_ref().map_or("-", |n| n.as_str()),
            row.state,
            exit_text(row.exit),
            row.start.as_deref().unwrap_or("-"),
            row.end.as_deref().unwrap_or("-"),
            row.message.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
