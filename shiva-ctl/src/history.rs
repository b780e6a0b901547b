//! `history`: the runs of periodic and one-shot tasks.

use std::time::Duration;

use shiva_bus::BusConfig;
use shiva_proto::TaskId;
use shiva_proto::rows::{exit_text, history_rows};

use crate::{CtlError, TASK_TOPICS, invalid, no_such_task, print_json, snapshot};

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
