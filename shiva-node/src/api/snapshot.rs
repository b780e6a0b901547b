//! What the HTTP API serves from: a snapshot of this node's view of the log (task and node
//! rows, the same as `shiva-ctl`'s, see `shiva_proto::rows`), published by the node's driver
//! after a step that changed the view (at most every [`PUBLISH_EVERY`]; every second when only
//! heartbeats moved), and the changes between two snapshots, which the event stream sends.
//!
//! Pure: built from a view and the node's own state; no I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde::Serialize;
use shiva_proto::rows::{NodeRow, TaskRow, node_rows, task_row};
use shiva_proto::{LogView, NodeId, TaskId};

/// Snapshots are published at most this often (a change shows within this plus a step).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// The cluster as this node sees it, and this node's part in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterInfo {
    /// The cluster's name.
    pub cluster: String,
    /// The node answering.
    pub node: NodeId,
    /// Its build.
    pub version: String,
    /// The protocol version it writes.
    pub protocol: u16,
    /// It has read the log to its end and checked its id.
    pub ready: bool,
    /// It leads.
    pub leading: bool,
    /// It is cut off from the bus (its exclusive runs are stopped).
    pub fenced: bool,
    /// It is shutting down (resigning, stopping its tasks, leaving).
    pub stopping: bool,
    /// The newest epoch.
    pub epoch: u64,
    /// The node leading it, if any.
    pub leader: Option<NodeId>,
    /// `signed` (commands must be signed) or `open`.
    pub commands: &'static str,
}

/// Rows by id, and the JSON array the API serves of them (shared by every answer).
#[derive(Debug)]
pub struct Table<K, R> {
    /// The rows.
    pub rows: BTreeMap<K, R>,
    /// The rows as a JSON array.
    pub json: Bytes,
}

impl<K, R> Default for Table<K, R> {
    fn default() -> Self {
        Table { rows: BTreeMap::new(), json: Bytes::from_static(b"[]") }
    }
}

impl<K: Ord, R: Serialize> Table<K, R> {
    fn new(rows: BTreeMap<K, R>) -> Table<K, R> {
        let json =
            Bytes::from(serde_json::to_vec(&rows.values().collect::<Vec<_>>()).expect("rows serialise"));
        Table { rows, json }
    }
}

/// Which parts of a snapshot to derive again: the rest is the previous snapshot's (an idle
/// cluster moves only the heartbeats, which the task rows do not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuild {
    /// Commands, assignments or statuses moved.
    pub tasks: bool,
    /// Heartbeats, departures or assignments moved.
    pub nodes: bool,
}

/// One published snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per snapshot.
    pub seq: u64,
    /// The cluster (absent before the first snapshot).
    pub cluster: Option<ClusterInfo>,
    /// Every defined task.
    pub tasks: Arc<Table<TaskId, TaskRow>>,
    /// Every node that heartbeated.
    pub nodes: Arc<Table<NodeId, NodeRow>>,
    /// How far the view has read the `commands` topic (the next offset): a command's answer
    /// waits for this to pass its records, so that what it wrote shows in the next read.
    pub commands_read: i64,
}

/// One change, as an event of the stream: its name and its JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// `cluster`, `task`, `task-removed`, `node` or `node-removed`.
    pub event: &'static str,
    /// JSON.
    pub data: String,
}

impl Snapshot {
    /// Builds the snapshot after `previous` of `view`, deriving again what `rebuild` names.
    pub fn build(previous: &Snapshot, cluster: ClusterInfo, view: &LogView, rebuild: Rebuild) -> Snapshot {
        let tasks = if rebuild.tasks || previous.cluster.is_none() {
            Arc::new(Table::new(
                shiva_proto::rows::listed_tasks(view)
                    .iter()
                    .filter_map(|task| task_row(view, task))
                    .map(|row| (row.id.clone(), row))
                    .collect(),
            ))
        } else {
            previous.tasks.clone()
        };
        let nodes = if rebuild.nodes || previous.cluster.is_none() {
            Arc::new(Table::new(node_rows(view).into_iter().map(|row| (row.id.clone(), row)).collect()))
        } else {
            previous.nodes.clone()
        };
        let commands_read = view.positions.get(&shiva_proto::TopicKind::Commands).copied().unwrap_or(0);
        Snapshot { seq: previous.seq + 1, cluster: Some(cluster), tasks, nodes, commands_read }
    }

    /// The first event of a stream: everything.
    pub fn full(&self) -> Change {
        Change {
            event: "snapshot",
            data: format!(
                r#"{{"cluster":{},"tasks":{},"nodes":{}}}"#,
                json(&self.cluster),
                String::from_utf8_lossy(&self.tasks.json),
                String::from_utf8_lossy(&self.nodes.json)
            ),
        }
    }

    /// What changed from `self` to `newer`. A node row whose only change is its heartbeat's
    /// time is not a change (it would be one per node and heartbeat).
    pub fn changes(&self, newer: &Snapshot) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.cluster != newer.cluster {
            changes.push(Change { event: "cluster", data: json(&newer.cluster) });
        }
        if !Arc::ptr_eq(&self.tasks, &newer.tasks) {
            for (id, row) in &newer.tasks.rows {
                if self.tasks.rows.get(id) != Some(row) {
                    changes.push(Change { event: "task", data: json(row) });
                }
            }
            for id in self.tasks.rows.keys().filter(|id| !newer.tasks.rows.contains_key(*id)) {
                changes.push(Change { event: "task-removed", data: json(&serde_json::json!({ "id": id })) });
            }
        }
        if Arc::ptr_eq(&self.nodes, &newer.nodes) {
            return changes;
        }
        for (id, row) in &newer.nodes.rows {
            let same = self.nodes.rows.get(id).is_some_and(|old| {
                let mut old = old.clone();
                old.last_heartbeat_ms = row.last_heartbeat_ms;
                old == *row
            });
            if !same {
                changes.push(Change { event: "node", data: json(row) });
            }
        }
        for id in self.nodes.rows.keys().filter(|id| !newer.nodes.rows.contains_key(*id)) {
            changes.push(Change { event: "node-removed", data: json(&serde_json::json!({ "id": id })) });
        }
        changes
    }
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("rows serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, state: &'static str) -> TaskRow {
        TaskRow::summary(TaskId::new(id).unwrap(), "service", "running", state)
    }

    fn snapshot(tasks: &[TaskRow]) -> Snapshot {
        Snapshot {
            tasks: Arc::new(Table::new(tasks.iter().map(|row| (row.id.clone(), row.clone())).collect())),
            ..Default::default()
        }
    }

    #[test]
    fn changes_name_changed_new_and_removed_tasks_only() {
        let old = snapshot(&[task("a", "running"), task("b", "running"), task("c", "pending")]);
        let new = snapshot(&[task("a", "running"), task("b", "backoff"), task("d", "assigned")]);
        let changes = old.changes(&new);
        let events: Vec<(&str, String)> = changes
            .iter()
            .map(|change| {
                let value: serde_json::Value = serde_json::from_str(&change.data).unwrap();
                (change.event, value["id"].as_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(events, [("task", "b".into()), ("task", "d".into()), ("task-removed", "c".into())]);
        assert!(new.changes(&new).is_empty());
        // A snapshot that kept the previous rows compares nothing.
        let kept = Snapshot { tasks: new.tasks.clone(), ..Default::default() };
        assert!(new.changes(&kept).is_empty());
    }

    #[test]
    fn the_full_event_is_valid_json_even_before_the_first_build() {
        let value: serde_json::Value = serde_json::from_str(&Snapshot::default().full().data).unwrap();
        assert_eq!(value["tasks"], serde_json::json!([]));
    }
}
