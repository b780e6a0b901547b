//! Topic names and record keys.
//!
//! | topic | keys |
//! |---|---|
//! | `shiva.<cluster>.commands` | `task/<id>`, `desired/<id>`, `request/<id>/<request-id>` |
//! | `shiva.<cluster>.control` | `node/<id>`, `leave/<id>/<incarnation>` |
//! | `shiva.<cluster>.assignments` | `claim/<epoch>/<node>/<claim-id>`, `resign/<epoch>`, `members`, `task/<id>`, `sched/<id>`, `run/<id>/<run-id>`, `trim/<epoch>/<id>` |
//! | `shiva.<cluster>.status` | `task/<id>`, `run/<id>/<run-id>`, `trim/<epoch>/<id>` |

use std::fmt;

use uuid::Uuid;

use crate::ids::{NodeId, TaskId};

/// The control topics, in the order a reader replays them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TopicKind {
    /// Operator commands: specs and desired states.
    Commands,
    /// Heartbeats and departures.
    Control,
    /// Claims and leader writes.
    Assignments,
    /// Run states reported by runners.
    Status,
}

impl TopicKind {
    /// Every control topic.
    pub const ALL: [TopicKind; 4] =
        [TopicKind::Commands, TopicKind::Control, TopicKind::Assignments, TopicKind::Status];

    /// The suffix after `shiva.<cluster>.`.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Commands => "commands",
            TopicKind::Control => "control",
            TopicKind::Assignments => "assignments",
            TopicKind::Status => "status",
        }
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

/// Why a cluster name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster name '{0}' is invalid: use 1 to 100 letters, digits, '_' or '-'")]
pub struct ClusterNameError(pub String);

/// A cluster's topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    cluster: String,
}

impl Topics {
    /// Topic names for `cluster` (letters, digits, `_`, `-`).
    pub fn new(cluster: &str) -> Result<Self, ClusterNameError> {
        let ok = !cluster.is_empty()
            && cluster.len() <= 100
            && cluster.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(ClusterNameError(cluster.to_owned()));
        }
        Ok(Topics { cluster: cluster.to_owned() })
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// `shiva.<cluster>.<suffix>`.
    pub fn name(&self, kind: TopicKind) -> String {
        format!("shiva.{}.{}", self.cluster, kind.suffix())
    }

    /// `shiva.<cluster>.logs`: task output (not a control topic: delete policy, time retention).
    pub fn logs(&self) -> String {
        format!("shiva.{}.logs", self.cluster)
    }

    /// Which control topic `name` is, if any.
    pub fn kind_of(&self, name: &str) -> Option<TopicKind> {
        TopicKind::ALL.into_iter().find(|kind| self.name(*kind) == name)
    }
}

/// Record keys.
pub mod key {
    use super::*;

    /// `task/<id>` (commands: spec; assignments: assignment; status: run state).
    pub fn task(id: &TaskId) -> String {
        format!("task/{id}")
    }
    /// `desired/<id>`.
    pub fn desired(id: &TaskId) -> String {
        format!("desired/{id}")
    }
    /// `node/<id>`.
    pub fn node(id: &NodeId) -> String {
        format!("node/{id}")
    }
    /// `leave/<id>/<incarnation>`.
    pub fn leave(id: &NodeId, incarnation: Uuid) -> String {
        format!("leave/{id}/{incarnation}")
    }
    /// `claim/<epoch>/<node>/<claim-id>`: unique per attempt, never sent twice.
    pub fn claim(epoch: u64, node: &NodeId, claim_id: Uuid) -> String {
        format!("claim/{epoch}/{node}/{claim_id}")
    }
    /// `resign/<epoch>`.
    pub fn resign(epoch: u64) -> String {
        format!("resign/{epoch}")
    }
    /// `members`.
    pub const MEMBERS: &str = "members";
    /// `request/<id>/<request-id>`.
    pub fn request(id: &TaskId, request: Uuid) -> String {
        format!("request/{id}/{request}")
    }
    /// `refusal/<command key>`.
    pub fn refusal(command_key: &str) -> String {
        format!("refusal/{command_key}")
    }
    /// `mode/<node>`: a node's mode (cordoned, draining, open).
    pub fn mode(node: &NodeId) -> String {
        format!("mode/{node}")
    }
    /// `move/<task>`: a request to move a service (rebalance).
    pub fn move_request(id: &TaskId) -> String {
        format!("move/{id}")
    }
    /// `secret/<name>`.
    pub fn secret(name: &TaskId) -> String {
        format!("secret/{name}")
    }
    /// `sched/<id>`.
    pub fn sched(id: &TaskId) -> String {
        format!("sched/{id}")
    }
    /// `run/<id>/<run-id>`.
    pub fn run(id: &TaskId, run: Uuid) -> String {
        format!("{}{run}", runs_of(id))
    }

    /// `run/<id>/@<seat>`: a launch intent on one of the seats of its task's history (see
    /// [`crate::runs::RunIntent::seat`]).
    pub fn run_seat(id: &TaskId, seat: u16) -> String {
        format!("{}@{seat}", runs_of(id))
    }

    /// The `assignments` key of `intent`: its seat's, else its run id's.
    pub fn intent(intent: &crate::runs::RunIntent) -> String {
        intent_key(&intent.task, intent.run_id, intent.seat)
    }

    /// The `assignments` key of the intent of `run` of `id` on `seat` (`None`: keyed by its
    /// run id).
    pub fn intent_key(id: &TaskId, run: Uuid, seat: Option<u16>) -> String {
        match seat {
            Some(seat) => run_seat(id, seat),
            None => self::run(id, run),
        }
    }

    /// The `status` key of `report`: its seat's, else its run id's.
    pub fn report(report: &crate::runs::RunReport) -> String {
        intent_key(&report.task, report.run_id, report.seat)
    }

    /// What a run key names: a run by its id, or a seat of its task's history.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum RunKey {
        /// `run/<task>/<run-id>`.
        Id(Uuid),
        /// `run/<task>/@<seat>` (below [`crate::runs::MAX_SEATS`]).
        Seat(u16),
    }

    /// The task and what a well-formed run key (`run/<task>/<run-id>` or `run/<task>/@<seat>`)
    /// names.
    pub fn run_key(key: &str) -> Option<(TaskId, RunKey)> {
        let rest = key.strip_prefix("run/")?;
        let (task, last) = rest.rsplit_once('/')?;
        let named = match last.strip_prefix('@') {
            Some(digits) => {
                // Digits only, no sign or leading zero: one key per seat.
                if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
                    return None;
                }
                if !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let seat: u16 = digits.parse().ok()?;
                if usize::from(seat) >= crate::runs::MAX_SEATS {
                    return None;
                }
                RunKey::Seat(seat)
            }
            None => RunKey::Id(last.parse().ok()?),
        };
        Some((TaskId::new(task).ok()?, named))
    }

    /// `trim/<epoch>/<id>`: a leader's `trim` record (see [`crate::records::Trim`]).
    pub fn trim(epoch: u64, id: Uuid) -> String {
        format!("trim/{epoch}/{id}")
    }

    /// The epoch of a well-formed `trim/<epoch>/<id>` key.
    pub fn trim_epoch(key: &str) -> Option<u64> {
        let (epoch, id) = key.strip_prefix("trim/")?.split_once('/')?;
        id.parse::<Uuid>().ok()?;
        epoch.parse().ok()
    }

    /// Whether `map` has a run key of `task` on `topic` (`run/<task>/<uuid>` or
    /// `run/<task>/@<seat>`, not one of a longer task id that shares the prefix).
    pub fn has_run_of<V>(
        map: &std::collections::BTreeMap<(super::TopicKind, String), V>,
        topic: super::TopicKind,
        task: &TaskId,
    ) -> bool {
        let prefix = runs_of(task);
        map.range((topic, prefix.clone())..)
            .take_while(|((of, key), _)| *of == topic && key.starts_with(&prefix))
            .any(|((_, key), _)| run_key(key).is_some_and(|(of, _)| of == *task))
    }

    /// `run/<id>/`: the start of every run key of a task (a longer task id may share it).
    pub fn runs_of(id: &TaskId) -> String {
        format!("run/{id}/")
    }

    /// The task id and uuid in a `<prefix>/<id>/<uuid>` key.
    pub fn task_and_uuid(key: &str, prefix: &str) -> Option<(TaskId, Uuid)> {
        let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
        let (task, uuid) = rest.rsplit_once('/')?;
        Some((TaskId::new(task).ok()?, uuid.parse().ok()?))
    }

    /// The task id in a `task/<id>` or `desired/<id>` key.
    pub fn task_of<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
        key.strip_prefix(prefix)?.strip_prefix('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let topics = Topics::new("prod").unwrap();
        assert_eq!(topics.name(TopicKind::Commands), "shiva.prod.commands");
        assert_eq!(topics.kind_of("shiva.prod.status"), Some(TopicKind::Status));
        assert_eq!(topics.kind_of("shiva.other.status"), None);
        assert!(Topics::new("a.b").is_err());
        assert!(Topics::new("").is_err());
    }

    #[test]
    fn keys() {
        let task = TaskId::new("a/b").unwrap();
        assert_eq!(key::task(&task), "task/a/b");
        assert_eq!(key::task_of("task/a/b", "task"), Some("a/b"));
        assert_eq!(key::task_of("desired/a", "task"), None);
        let run = Uuid::from_u128(7);
        assert_eq!(key::task_and_uuid(&key::run(&task, run), "run"), Some((task.clone(), run)));
        assert_eq!(key::task_and_uuid(&key::request(&task, run), "request"), Some((task, run)));
        assert_eq!(key::task_and_uuid("run/a/not-a-uuid", "run"), None);
    }

    #[test]
    fn run_keys_name_a_run_or_a_seat() {
        use key::RunKey;
        let task = TaskId::new("a/b").unwrap();
        let run = Uuid::from_u128(7);
        assert_eq!(key::run_key(&key::run(&task, run)), Some((task.clone(), RunKey::Id(run))));
        assert_eq!(key::run_seat(&task, 12), "run/a/b/@12");
        assert_eq!(key::run_key("run/a/b/@12"), Some((task.clone(), RunKey::Seat(12))));
        assert_eq!(key::run_key("run/a/b/@0"), Some((task, RunKey::Seat(0))));
        let max = crate::runs::MAX_SEATS;
        for bad in [
            "run/a/b/@",
            "run/a/b/@012",
            "run/a/b/@-1",
            "run/a/b/@+1",
            "run/a/b/@1x",
            "run/@1",
            "run/a/b/@99999999",
        ] {
            assert_eq!(key::run_key(bad), None, "{bad}");
        }
        assert_eq!(key::run_key(&format!("run/a/@{max}")), None);
        assert!(key::run_key(&format!("run/a/@{}", max - 1)).is_some());
        assert_eq!(key::run_key("run/a/not-a-uuid"), None);
    }
}
