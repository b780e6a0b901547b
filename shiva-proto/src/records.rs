//! Records on the bus: a versioned JSON envelope around one typed body.
//!
//! ```json
//! {"v":1,"kind":"heartbeat","sender":"node-a","incarnation":"…","sent_at_ms":1764000000000,"body":{…}}
//! ```
//!
//! `kind` selects the body type. Readers skip (and log) records whose envelope is malformed, whose
//! version is newer than theirs, whose kind they do not know, or that exceed [`MAX_RECORD_BYTES`].
//! Bodies are read leniently: unknown fields are ignored.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{NodeId, TaskId};
use crate::runs::{RunIntent, RunReport, RunRequest, Sched};
use crate::spec::TaskSpec;

/// The envelope version this build writes and the newest it reads.
pub const PROTOCOL_VERSION: u16 = 1;

static WRITTEN_PROTOCOL: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

/// The protocol version this process writes (and the newest it reads): [`PROTOCOL_VERSION`],
/// unless a test made it write the next one (see [`write_next_protocol_for_tests`]).
pub fn protocol() -> u16 {
    WRITTEN_PROTOCOL.get().copied().unwrap_or(PROTOCOL_VERSION)
}

/// Test-only switch (the node's `SHIVA_TEST_NEXT_PROTOCOL`): this process writes envelopes and
/// heartbeats of protocol `PROTOCOL_VERSION + 1` with today's bodies, standing in for a node of the
/// next version in mixed-cluster tests. Set once, before anything is written.
pub fn write_next_protocol_for_tests() {
    let _ = WRITTEN_PROTOCOL.set(PROTOCOL_VERSION + 1);
}
/// Records larger than this are refused by readers (and never written).
pub const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// One record: who sent it, when, and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The sender's id: a node id, or `ctl:<user>` for the CLI.
    pub sender: String,
    /// The sending node's incarnation (a uuid drawn at start-up); absent for the CLI.
    pub incarnation: Option<Uuid>,
    /// Sender's wall clock at send time, for display only (liveness never compares clocks).
    pub sent_at_ms: u64,
    /// The typed body.
    pub body: Body,
}

/// Every record body, tagged by `kind` on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// `commands`, `task/<id>`: a task definition; its offset is its revision.
    Task(TaskSpec),
    /// `commands`, `desired/<id>`.
    Desired(Desired),
    /// `control`, `node/<id>`.
    Heartbeat(Heartbeat),
    /// `control`, `leave/<id>/<incarnation>`.
    Leave(Leave),
    /// `assignments`, `claim/<epoch>/<node>/<claim-id>`.
    Claim(Claim),
    /// `assignments`, `resign/<epoch>`.
    Resign(Resign),
    /// `assignments`, `members`: the leader's view of live nodes.
    Members(Members),
    /// `assignments`, `task/<id>`.
    Assignment(Assignment),
    /// `status`, `task/<id>`.
    Status(TaskStatus),
    /// `commands`, `request/<task>/<request-id>`: run now.
    RunRequest(RunRequest),
    /// `assignments`, `sched/<task>`: a periodic or one-shot task's firing position.
    Sched(Sched),
    /// `assignments`, `run/<task>/<run-id>`: a launch intent.
    RunIntent(RunIntent),
    /// `status`, `run/<task>/<run-id>`: a run's record.
    RunReport(RunReport),
    /// A leader-owned key (`assignments` `task/`, `sched/`, `run/`; `status` `task/`, `run/`;
    /// `commands` `request/`): its entry is deleted. A tombstone follows for compaction; a
    /// tombstone alone changes nothing.
    Deleted(Deleted),
    /// `assignments` and `status`, `trim/<epoch>/<id>`: the leader of `epoch` deletes the
    /// entries of the `run/` keys listed (of the record's own topic), as a `deleted` record on
    /// each would; a bare tombstone on each follows for compaction, then one on the `trim/` key
    /// itself once they are read back (issue 21: one record for the runs a step trims, not one
    /// each).
    Trim(Trim),
    /// `commands` (from `shiva-ctl`) and `assignments` (the leader's re-encrypted copy),
    /// `secret/<name>`: a secret, encrypted to nodes.
    Secret(crate::secret::Secret),
    /// `assignments`, `refusal/<command key>`: the leader's record of a refused command, which
    /// outlasts the command's compaction.
    Refusal(Refusal),
    /// `commands`, `mode/<node>`: cordon, drain or open a node.
    NodeMode(NodeMode),
    /// `commands`, `move/<task>`: move a service to a node (rebalance).
    MoveRequest(MoveRequest),
}

impl Body {
    /// The wire `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Task(_) => "task",
            Body::Desired(_) => "desired",
            Body::Heartbeat(_) => "heartbeat",
            Body::Leave(_) => "leave",
            Body::Claim(_) => "claim",
            Body::Resign(_) => "resign",
            Body::Members(_) => "members",
            Body::Assignment(_) => "assignment",
            Body::Status(_) => "status",
            Body::RunRequest(_) => "run_request",
            Body::Sched(_) => "sched",
            Body::RunIntent(_) => "run_intent",
            Body::RunReport(_) => "run_report",
            Body::Deleted(_) => "deleted",
            Body::Trim(_) => "trim",
            Body::Secret(_) => "secret",
            Body::Refusal(_) => "refusal",
            Body::NodeMode(_) => "node_mode",
            Body::MoveRequest(_) => "move_request",
        }
    }
}

/// A command that was refused (signed clusters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Its offset on `commands`.
    pub offset: i64,
    /// Its key.
    pub key: String,
    /// Why.
    pub reason: String,
    /// The signing time of the command standing on the key when it was refused (none: none
    /// stood): the refusal counts while that command stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standing_at_ms: Option<u64>,
}

/// Desired state of a task, set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Run it (the default for a submitted task).
    Running,
    /// Stop it everywhere, keep the definition.
    Stopped,
    /// Periodic tasks: launch no new runs; a current run continues.
    Suspended,
}

impl DesiredState {
    /// The name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
            DesiredState::Suspended => "suspended",
        }
    }
}

/// `desired/<id>` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The task.
    pub task: TaskId,
    /// What the operator wants.
    pub state: DesiredState,
}

/// `mode/<node>` body: whether the leader places work on a node (`shiva-ctl cordon`, `drain`,
/// `uncordon`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMode {
    /// The node.
    pub node: NodeId,
    /// What the operator wants of it.
    pub mode: Mode,
    /// `draining` only: when (wall clock, ms) the tasks that found no other node stop there
    /// anyway. Without it they stay until another node can take them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

/// `move/<task>` body: move a service from a node to another (`shiva-ctl rebalance`). The leader
/// honours it while the task is on `from` and until `until_ms` (its clock; at most an hour after
/// the record's send time), through the hand-off, when `to` is live, open and eligible; after that
/// the record is inert: a move is a nudge, never a pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The task.
    pub task: TaskId,
    /// Where it ran when the move was asked for: the request holds only while the task is still
    /// there (once moved, or moved elsewhere by a failure or a drain, it never pulls it back).
    pub from: NodeId,
    /// Where to.
    pub to: NodeId,
    /// Honoured until then (wall clock, ms).
    pub until_ms: i64,
}

/// A node's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// New work may be placed there (the default; `uncordon`).
    Open,
    /// No new work is placed there; what runs there stays (`cordon`).
    Cordoned,
    /// No new work, and its services move away through the hand-off (`drain`).
    Draining,
}

impl Mode {
    /// The name `nodes` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Cordoned => "cordoned",
            Mode::Draining => "draining",
        }
    }
}

/// Host resources reported in heartbeats (sysinfo), for display and future placement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Logical CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Total memory in bytes.
    #[serde(default)]
    pub memory_total_bytes: u64,
    /// Available memory in bytes.
    #[serde(default)]
    pub memory_available_bytes: u64,
    /// One-minute load average.
    #[serde(default)]
    pub load1: f64,
}

/// A run a node holds, as older builds listed it in their heartbeats (read, never written: see
/// [`Heartbeat::runs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The task.
    pub task: TaskId,
    /// The assignment generation the run belongs to.
    pub generation: u64,
    /// The child's pid while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// `node/<id>` body. The node id and incarnation are the envelope's sender and incarnation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Highest protocol version the node speaks.
    pub protocol: u16,
    /// The node's build version (absent from older nodes, and from heartbeats of a newer
    /// protocol, whose bodies are not read: see [`Heartbeat::of_newer_protocol`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Increments with every heartbeat of this incarnation.
    pub seq: u64,
    /// The node's host name (also one of its tags for placement).
    pub hostname: String,
    /// Tags given to the node.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Whether the node may become leader.
    pub leader_capable: bool,
    /// Whether the node runs tasks.
    pub runner: bool,
    /// The node's heartbeat interval in milliseconds.
    pub interval_ms: u64,
    /// How long after the send instant of its newest heartbeat it has read back the node stops
    /// its exclusive runs (absent from older nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_timeout_ms: Option<u64>,
    /// How many times this incarnation came back from its fence (0: never fenced since its
    /// first read-back): after a return the node starts exclusive work only once a `members`
    /// record lists it with this count (see docs/protocol.md, "A fenced node's return").
    #[serde(default, skip_serializing_if = "is_zero")]
    pub returns: u64,
    /// What the node's build does beyond protocol version 1 (see [`feature`]): the leader asks
    /// a node for nothing its build would misread.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The age recipient (`age1…`) of the node's identity: secrets are encrypted to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// The node's `--authorized-keys` file (OpenSSH format), when it accepts signed commands
    /// only; absent: an open node. `shiva-ctl` checks commands by the same keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_keys: Option<String>,
    /// Resources, for display.
    #[serde(default)]
    pub resources: Resources,
    /// Runs the node holds, as older builds listed them (empty, and absent on the wire, from
    /// newer ones). No decision or display reads it: which node runs what is in
    /// the assignments and the status topic. Repeating the list in every heartbeat cost every
    /// node a decode of every peer's runs five times a second (docs/architecture.md, deviation 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunSummary>,
    /// Clock samples, for display (absent from older nodes): for each live peer, the largest
    /// `peer's sent_at_ms - this node's wall clock when it read that heartbeat` over the peer's
    /// recent heartbeats (ms). Two nodes' samples of each other give their clock offset (see
    /// [`clock_offset_ms`]); no decision uses them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub clock_ms: std::collections::BTreeMap<NodeId, i64>,
    /// The incarnation of this node id that ran on this node's workspace before it, and has
    /// exited (this one took the workspace's lock, which the kernel releases only with the
    /// process) and whose leftover runs this one stopped before its first heartbeat (absent
    /// otherwise, and from older nodes). A restart, not a second machine: the leader moves the
    /// id's tasks to this incarnation at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<Uuid>,
}

/// The offset of `node`'s clock from `reference`'s (ms, positive: `node` is ahead), from their
/// heartbeats' samples of each other: `b = off_node - off_ref - delay`, `a = off_ref - off_node -
/// delay'`, so `(b - a) / 2` errs by half the difference of the two delays. `None` unless both
/// sampled the other. Total on any input.
pub fn clock_offset_ms(
    node: &NodeId,
    node_beat: &Heartbeat,
    reference: &NodeId,
    reference_beat: &Heartbeat,
) -> Option<i64> {
    let a = i128::from(*node_beat.clock_ms.get(reference)?);
    let b = i128::from(*reference_beat.clock_ms.get(node)?);
    let offset = (b - a) / 2;
    Some(i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX }))
}

impl Heartbeat {
    /// What a reader keeps of a heartbeat of a protocol newer than its own, read by key and
    /// header only: the node is alive and speaks `protocol`; it is given nothing to run (a
    /// leader never places a task on a node whose records it cannot read).
    pub fn of_newer_protocol(protocol: u16) -> Heartbeat {
        Heartbeat {
            protocol,
            version: None,
            seq: 0,
            hostname: String::new(),
            tags: Vec::new(),
            leader_capable: true,
            runner: false,
            interval_ms: 0,
            fence_timeout_ms: None,
            returns: 0,
            authorized_keys: None,
            recipient: None,
            features: Vec::new(),
            resources: Resources::default(),
            runs: Vec::new(),
            clock_ms: Default::default(),
            replaces: None,
        }
    }
}

/// `leave/<id>/<incarnation>` body: the node stopped gracefully; its tasks may move at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    /// Why (e.g. "shutdown").
    #[serde(default)]
    pub reason: String,
}

/// `deleted` body: the leader of `epoch` deletes the entry of the record's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The writing leader's epoch.
    pub epoch: u64,
}

/// The most `run/` keys one `trim` record lists.
pub const MAX_TRIM_KEYS: usize = 256;

/// `trim` body: the leader of `epoch` deletes the entries of `keys` (`run/` keys of the record's
/// own topic, at most [`MAX_TRIM_KEYS`], each once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trim {
    /// The writing leader's epoch.
    pub epoch: u64,
    /// The keys whose entries it deletes.
    pub keys: Vec<String>,
}

/// `claim/<epoch>/<node>/<claim-id>` body: the sender asks to lead `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The epoch claimed: always the newest seen plus one.
    pub epoch: u64,
}

/// `resign/<epoch>` body: the epoch's leader gives up leadership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resign {
    /// The epoch resigned.
    pub epoch: u64,
}

/// One node in the leader's `members` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node id.
    pub id: NodeId,
    /// Its live incarnation.
    pub incarnation: Uuid,
    /// Its host name.
    pub hostname: String,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Whether it runs tasks.
    pub runner: bool,
    /// Whether it may lead.
    pub leader_capable: bool,
    /// Its heartbeat's `returns` when the leader wrote this view: the node starts exclusive
    /// work only once it reads itself here with its own count.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub returns: u64,
    /// The [`feature`]s of its heartbeat this build knows (unknown ones are not copied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Features a node's heartbeat may list.
pub mod feature {
    /// The node honours an assignment's `after`: it starts the task only once each node named
    /// there reported its copy gone. A node without it would start at once.
    pub const START_AFTER: &str = "start_after";

    /// The node's log view takes the first claim it reads as winning its epoch (a log whose
    /// early claims were trimmed starts at a later one). The leader trims the winning claims of
    /// settled epochs only while every live node has it: an older build would refuse a later
    /// first claim as a jump, see no leader, and claim epoch 1 for itself.
    pub const TRIMMED_CLAIMS: &str = "trimmed_claims";

    /// The node, as leader, honours `mode/<node>` records (cordon, drain) and `move/<task>`
    /// requests (rebalance).
    pub const NODE_MODES: &str = "node_modes";

    /// The node runs instances (`<task>@<instance>` task ids, `SHIVA_INSTANCE`): the leader
    /// places instances of `count` and `every_node` tasks only on such nodes. An older build
    /// refuses those ids.
    pub const INSTANCES: &str = "instances";

    /// Lean periodic runs (issue 21): as leader, the node reads a periodic task's position as
    /// implied by its launch intents (a launch does not rewrite `sched/`) and takes a run with
    /// a start record alone as started at its launch instant. Only while every live
    /// leader-capable node has it does a leader leave positions unwritten at launches and a
    /// runner leave out a periodic run's `running` record: an older leader would read a stale
    /// position, and every run without a `running` record as late.
    pub const LEAN_RUNS: &str = "lean_runs";

    /// Batched trimming (issue 21): the node's log view reads `trim` records, and takes the bare
    /// tombstones that follow one on the keys it lists. Only while every live node has it does
    /// the leader trim the runs of a step with one `trim` record per topic instead of a
    /// `deleted` record on each run key: an older build would skip both the record and the
    /// tombstones, and keep every trimmed run in its view until it restarts.
    pub const BATCHED_TRIM: &str = "batched_trim";

    /// Run seats (issue 21): the node's log view reads launch intents keyed by a seat of their
    /// task's history (`run/<task>/@<seat>`, [`crate::runs::RunIntent::seat`]), where a later
    /// intent overwrites the run that left. Only while every live node, and the newest heartbeat
    /// of every node not retired, has it (and [`BATCHED_TRIM`]) does the leader write intents on
    /// seats: an older build would skip them, and not launch them.
    pub const RUN_SEATS: &str = "run_seats";

    /// Every feature this build has, for its heartbeat.
    pub const ALL: &[&str] =
        &[START_AFTER, TRIMMED_CLAIMS, NODE_MODES, INSTANCES, LEAN_RUNS, BATCHED_TRIM, RUN_SEATS];

    /// Whether `live` has a node and every one has [`BATCHED_TRIM`], and so does the newest
    /// heartbeat of every node known (`known`: those not retired, live or not): a node down
    /// during an upgrade may come back on its older build, and would keep every run trimmed
    /// meanwhile in its view, as open keys its own leadership would write again.
    pub fn batched_trim<'h>(
        live: &[super::Member],
        known: impl Iterator<Item = &'h super::Heartbeat>,
    ) -> bool {
        everyone_has(&[BATCHED_TRIM], live, known)
    }

    /// Whether `live` has a node and every one has [`RUN_SEATS`] and [`BATCHED_TRIM`], and so
    /// does the newest heartbeat of every node known (as for [`batched_trim`]).
    pub fn run_seats<'h>(live: &[super::Member], known: impl Iterator<Item = &'h super::Heartbeat>) -> bool {
        everyone_has(&[BATCHED_TRIM, RUN_SEATS], live, known)
    }

    /// Whether `live` has a node, and every one and the newest heartbeat of every node `known`
    /// has each of `features`.
    fn everyone_has<'h>(
        features: &[&str],
        live: &[super::Member],
        mut known: impl Iterator<Item = &'h super::Heartbeat>,
    ) -> bool {
        !live.is_empty()
            && live.iter().all(|member| features.iter().all(|feature| member.has(feature)))
            && known.all(|heartbeat| {
                features.iter().all(|feature| heartbeat.features.iter().any(|f| f == feature))
            })
    }

    /// Whether `live` has a leader-capable node and every one has [`LEAN_RUNS`] (a node that has
    /// read no heartbeat yet knows of none: not lean).
    pub fn lean_runs(live: &[super::Member]) -> bool {
        let mut capable = live.iter().filter(|member| member.leader_capable).peekable();
        capable.peek().is_some() && capable.all(|member| member.has(LEAN_RUNS))
    }

    /// The features of `listed` this build knows, each once, in [`ALL`]'s order.
    pub fn known(listed: &[String]) -> Vec<String> {
        ALL.iter()
            .filter(|name| listed.iter().any(|item| item == *name))
            .map(|name| (*name).to_owned())
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn only_known_features_are_kept_once() {
            let listed =
                ["x".repeat(10_000), super::START_AFTER.into(), "later".into(), super::START_AFTER.into()];
            assert_eq!(super::known(&listed), vec![super::START_AFTER.to_owned()]);
            assert!(super::known(&[]).is_empty());
        }

        #[test]
        fn runs_are_lean_only_when_every_known_leader_capable_node_reads_them() {
            let member = |leader_capable: bool, lean: bool| crate::records::Member {
                id: crate::NodeId::new("n").unwrap(),
                incarnation: uuid::Uuid::nil(),
                hostname: "h".into(),
                tags: Vec::new(),
                runner: true,
                leader_capable,
                returns: 0,
                features: if lean { vec![super::LEAN_RUNS.to_owned()] } else { Vec::new() },
            };
            assert!(!super::lean_runs(&[]), "none known yet");
            assert!(!super::lean_runs(&[member(false, true)]), "no leader-capable node known");
            assert!(super::lean_runs(&[member(true, true), member(false, false)]));
            assert!(!super::lean_runs(&[member(true, true), member(true, false)]));
        }

        #[test]
        fn trims_are_batched_only_when_every_live_and_every_known_node_reads_them() {
            let member = |batched: bool| crate::records::Member {
                id: crate::NodeId::new("n").unwrap(),
                incarnation: uuid::Uuid::nil(),
                hostname: "h".into(),
                tags: Vec::new(),
                runner: true,
                leader_capable: false,
                returns: 0,
                features: if batched { vec![super::BATCHED_TRIM.to_owned()] } else { Vec::new() },
            };
            let heartbeat = |batched: bool| {
                let value = serde_json::json!({"protocol": 1, "seq": 1, "hostname": "h", "leader_capable": true,
                    "runner": true, "interval_ms": 200, "features": if batched { vec![super::BATCHED_TRIM] } else { vec![] }});
                serde_json::from_value::<crate::records::Heartbeat>(value).unwrap()
            };
            let (new, old) = (heartbeat(true), heartbeat(false));
            assert!(!super::batched_trim(&[], [&new].into_iter()), "none live yet");
            assert!(super::batched_trim(&[member(true), member(true)], [&new, &new].into_iter()));
            assert!(
                !super::batched_trim(&[member(true), member(false)], [&new].into_iter()),
                "a live older node"
            );
            assert!(
                !super::batched_trim(&[member(true)], [&new, &old].into_iter()),
                "an older node down, not retired"
            );
        }

        #[test]
        fn run_seats_are_used_only_when_every_node_reads_them_and_batched_trims() {
            let member = |features: &[&str]| crate::records::Member {
                id: crate::NodeId::new("n").unwrap(),
                incarnation: uuid::Uuid::nil(),
                hostname: "h".into(),
                tags: Vec::new(),
                runner: true,
                leader_capable: true,
                returns: 0,
                features: features.iter().map(|f| (*f).to_owned()).collect(),
            };
            let heartbeat = |features: &[&str]| {
                let value = serde_json::json!({"protocol": 1, "seq": 1, "hostname": "h", "leader_capable": true,
                    "runner": true, "interval_ms": 200, "features": features});
                serde_json::from_value::<crate::records::Heartbeat>(value).unwrap()
            };
            let both = [super::BATCHED_TRIM, super::RUN_SEATS];
            let (new, old) = (heartbeat(&both), heartbeat(&[super::BATCHED_TRIM]));
            assert!(super::run_seats(&[member(&both), member(&both)], [&new, &new].into_iter()));
            assert!(!super::run_seats(&[], [&new].into_iter()), "none live yet");
            assert!(!super::run_seats(&[member(&both), member(&[super::BATCHED_TRIM])], [&new].into_iter()));
            assert!(!super::run_seats(&[member(&both), member(&[super::RUN_SEATS])], [&new].into_iter()));
            assert!(!super::run_seats(&[member(&both)], [&new, &old].into_iter()), "an older node down");
        }
    }
}

impl Member {
    /// Whether the node's build has `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|item| item == feature)
    }
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// `members` body: the live nodes as the leader of `epoch` sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The leader's epoch.
    pub epoch: u64,
    /// Live nodes, sorted by id: one incarnation per id, the one that runs its tasks.
    pub nodes: Vec<Member>,
    /// Other live incarnations of ids in `nodes` (cloned machines started together, a healed
    /// partition): they run nothing (absent when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Member>,
    /// The leader's `--authorized-keys` file (absent: an open cluster): `shiva-ctl` reads
    /// commands by the same keys the leader does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_keys: Option<String>,
}

/// Where a task stands, as decided by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Placement {
    /// Run on `node`.
    Assigned {
        /// The runner.
        node: NodeId,
    },
    /// Nobody can run it now.
    Pending {
        /// Why, for `shiva-ctl status`.
        reason: String,
    },
    /// Desired stopped: nobody runs it.
    Stopped,
    /// A periodic or one-shot task: the leader launches each run (see `run/` records).
    Scheduled,
    /// Failed for this spec revision, for a reason no retry can cure (an internal error while
    /// planning it, a record about it that cannot be written): nobody runs it until a new
    /// revision is submitted.
    Failed {
        /// Why, for `shiva-ctl status` (`internal error: …`).
        reason: String,
    },
}

/// `assignments` `task/<id>` body: a leader write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The writing leader's epoch.
    pub epoch: u64,
    /// The task.
    pub task: TaskId,
    /// Increments whenever the placement or the spec changes.
    pub generation: u64,
    /// Offset of the spec record this assignment runs.
    pub spec_revision: i64,
    /// The decision.
    #[serde(flatten)]
    pub placement: Placement,
    /// The spec to run (so a runner needs nothing else).
    pub spec: TaskSpec,
    /// Nodes this spec revision failed on (restarted too often), oldest first: the task moves
    /// away from them while another eligible node exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_on: Vec<NodeId>,
    /// With `pending` after a failure: the task is placed again from this instant (ms since
    /// the Unix epoch, the leader's clock): back-off between moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<i64>,
    /// Copies that may still run on other nodes than the placement names (a hand-off): nobody
    /// starts the task elsewhere until each node reports its copy gone or must have fenced
    /// itself (a copy that rides out disconnections is waited for only by an exclusive
    /// revision). One naming the placement's own node: an older revision it may still run,
    /// whose stop grace and `on_disconnect` govern if it falls silent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
    /// With `assigned`: the nodes among `holders` whose word the assigned node waits for
    /// before it starts the task (a hand-off in one hop: the old node's `stopped` status goes
    /// straight to the new node). The leader names only a node whose heartbeat lists the
    /// `start_after` feature. A node leaves the list once the leader reads its word, or reads
    /// the assigned node's status for this generation or a later one (it started, so it read
    /// every word), or once the node must have fenced itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<NodeId>,
    /// With `assigned`: the incarnation of the node that runs it (absent from older leaders):
    /// another incarnation of the same id (a clone) does not run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<Uuid>,
}

/// A copy of a task a node may still run (see [`Assignment::holders`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node.
    pub node: NodeId,
    /// The node's word counts from this generation: its status for this generation or a later
    /// one says whether the copy is gone (`stopped`, `failed`) or current.
    pub since: u64,
    /// The longest stop grace of the revisions the node may run, in ms.
    pub stop_grace_ms: u64,
    /// Whether one of them rides out a disconnection (`on_disconnect: keep`): such a copy is
    /// not fenced, so an exclusive revision waits for the node's word.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// Whether one of them is exclusive (`on_disconnect: stop`, the default): fenced after the
    /// stop grace, and until then no other copy starts, whatever the revision to start.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub exclusive: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// What a runner reports about its run of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Being started.
    Starting,
    /// The child runs.
    Running,
    /// The child exited; waiting before the next start.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// Failed on this node for good: restarted too often within the restart window (the
    /// leader moves the task) or ended with a permanent exit code (it stays failed).
    Failed,
}

impl RunState {
    /// The name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Backoff => "backoff",
            RunState::Stopping => "stopping",
            RunState::Stopped => "stopped",
            RunState::Failed => "failed",
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    #[serde(default)]
    pub code: Option<i32>,
    /// Signal number, when killed by a signal.
    #[serde(default)]
    pub signal: Option<i32>,
}

/// `status` `task/<id>` body, written by the runner (the envelope's sender).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The task.
    pub task: TaskId,
    /// The assignment generation this run belongs to.
    pub generation: u64,
    /// Run state.
    pub state: RunState,
    /// The current run's id (a fresh uuid per start).
    #[serde(default)]
    pub run_id: Option<Uuid>,
    /// The child's pid while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Start attempt within this generation (1 for the first start).
    #[serde(default)]
    pub attempt: u32,
    /// Restarts so far within this generation.
    #[serde(default)]
    pub restarts: u32,
    /// How the previous child ended.
    #[serde(default)]
    pub last_exit: Option<ExitInfo>,
    /// Human-readable detail (e.g. a spawn error).
    #[serde(default)]
    pub message: Option<String>,
    /// With `failed`: the failure is permanent (a permanent exit code), so the task is not
    /// moved to another node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
    /// The nodes whose word this node read before it started this copy: the `after` of the
    /// assignment it started under. Its status overwrites theirs (one status key per task), so
    /// it carries their word on: each of those copies was gone before this one started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<NodeId>,
}

/// Why a record was skipped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not a JSON envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A newer protocol version.
    #[error("unsupported envelope version {found} (this build reads up to {})", protocol())]
    UnsupportedVersion {
        /// Version found.
        found: u16,
    },
    /// A kind this build does not know.
    #[error("unknown record kind '{0}'")]
    UnknownKind(String),
    /// The body does not match its kind.
    #[error("malformed {kind} body: {message}")]
    Body {
        /// The kind.
        kind: String,
        /// Why.
        message: String,
    },
}

#[derive(Serialize)]
struct WireOut<'a, B: Serialize> {
    v: u16,
    kind: &'a str,
    sender: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    incarnation: Option<Uuid>,
    sent_at_ms: u64,
    body: &'a B,
}

/// The envelope as read: the body stays raw JSON (checked for syntax, not parsed into a tree)
/// until its kind says what to parse it into, once.
#[derive(Deserialize)]
struct WireIn<'a> {
    v: u16,
    kind: String,
    sender: String,
    #[serde(default)]
    incarnation: Option<Uuid>,
    #[serde(default)]
    sent_at_ms: u64,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

/// The envelope's header, read whatever its version: the fields that every protocol version
/// keeps (see docs/protocol.md, "Versions"), so that a reader counts a newer node's claims and
/// heartbeats by key and header even where it cannot read their bodies.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Header {
    /// Envelope version.
    pub v: u16,
    /// Record kind.
    pub kind: String,
    /// Sender.
    pub sender: String,
    /// Sender's incarnation.
    #[serde(default)]
    pub incarnation: Option<Uuid>,
    /// Sender's wall clock at send time.
    #[serde(default)]
    pub sent_at_ms: u64,
}

impl Header {
    /// Reads the header of a record of any version (`None`: not an envelope, or too large).
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        if bytes.len() > MAX_RECORD_BYTES {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }
}

impl Envelope {
    /// An envelope from `sender`, stamped with its wall clock now.
    pub fn now(sender: impl Into<String>, incarnation: Option<Uuid>, body: Body) -> Envelope {
        let sent_at_ms = u64::try_from(crate::wall::now_ms()).unwrap_or(0);
        Envelope { sender: sender.into(), incarnation, sent_at_ms, body }
    }

    /// Encodes the envelope as JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        fn out<B: Serialize>(env: &Envelope, body: &B) -> Vec<u8> {
            let wire = WireOut {
                v: protocol(),
                kind: env.body.kind(),
                sender: &env.sender,
                incarnation: env.incarnation,
                sent_at_ms: env.sent_at_ms,
                body,
            };
            serde_json::to_vec(&wire).expect("records always serialise")
        }
        match &self.body {
            Body::Task(body) => out(self, body),
            Body::Desired(body) => out(self, body),
            Body::Heartbeat(body) => out(self, body),
            Body::Leave(body) => out(self, body),
            Body::Claim(body) => out(self, body),
            Body::Resign(body) => out(self, body),
            Body::Members(body) => out(self, body),
            Body::Assignment(body) => out(self, body),
            Body::Status(body) => out(self, body),
            Body::RunRequest(body) => out(self, body),
            Body::Secret(body) => out(self, body),
            Body::Refusal(body) => out(self, body),
            Body::Sched(body) => out(self, body),
            Body::RunIntent(body) => out(self, body),
            Body::RunReport(body) => out(self, body),
            Body::Deleted(body) => out(self, body),
            Body::Trim(body) => out(self, body),
            Body::NodeMode(body) => out(self, body),
            Body::MoveRequest(body) => out(self, body),
        }
    }

    /// Decodes a record value, refusing oversized, malformed, newer or unknown records.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let wire: WireIn<'_> =
            serde_json::from_slice(bytes).map_err(|err| DecodeError::Malformed(err.to_string()))?;
        if wire.v == 0 || wire.v > protocol() {
            return Err(DecodeError::UnsupportedVersion { found: wire.v });
        }
        fn body<T: for<'de> Deserialize<'de>>(
            kind: &str,
            value: &serde_json::value::RawValue,
        ) -> Result<T, DecodeError> {
            serde_json::from_str(value.get())
                .map_err(|err| DecodeError::Body { kind: kind.to_owned(), message: err.to_string() })
        }
        let kind = wire.kind.as_str();
        let decoded = match kind {
            "task" => Body::Task(body(kind, wire.body)?),
            "desired" => Body::Desired(body(kind, wire.body)?),
            "heartbeat" => Body::Heartbeat(body(kind, wire.body)?),
            "leave" => Body::Leave(body(kind, wire.body)?),
            "claim" => Body::Claim(body(kind, wire.body)?),
            "resign" => Body::Resign(body(kind, wire.body)?),
            "members" => Body::Members(body(kind, wire.body)?),
            "assignment" => Body::Assignment(body(kind, wire.body)?),
            "status" => Body::Status(body(kind, wire.body)?),
            "run_request" => Body::RunRequest(body(kind, wire.body)?),
            "secret" => Body::Secret(body(kind, wire.body)?),
            "refusal" => Body::Refusal(body(kind, wire.body)?),
            "sched" => Body::Sched(body(kind, wire.body)?),
            "run_intent" => Body::RunIntent(body(kind, wire.body)?),
            "run_report" => Body::RunReport(body(kind, wire.body)?),
            "deleted" => Body::Deleted(body(kind, wire.body)?),
            "trim" => Body::Trim(body(kind, wire.body)?),
            "node_mode" => Body::NodeMode(body(kind, wire.body)?),
            "move_request" => Body::MoveRequest(body(kind, wire.body)?),
            _ => return Err(DecodeError::UnknownKind(wire.kind)),
        };
        Ok(Envelope {
            sender: wire.sender,
            incarnation: wire.incarnation,
            sent_at_ms: wire.sent_at_ms,
            body: decoded,
        })
    }
}
