//! Supervision: one job per assigned task (see [`job`]), each run held by a run shim (see
//! [`shim`]). [`Supervisor::reconcile`] turns the set of wanted runs into starts
//! and stops; a task is never started while its previous job is still stopping.

pub mod job;
pub mod launches;
pub mod oneshot;
pub mod restart;
pub mod shim;
pub mod spawn;

use std::collections::BTreeMap;
use std::sync::Arc;

use shiva_proto::{NodeId, TaskId, TaskSpec};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use job::{JobContext, JobControl};
use shim::Adopted;

/// A run this node should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Assignment generation.
    pub generation: u64,
    /// Spec revision: a new revision restarts the child.
    pub spec_revision: i64,
    /// The spec.
    pub spec: TaskSpec,
    /// The nodes whose word that their copy is gone was read before a start (the assignment's
    /// `after`): the job's statuses carry them.
    pub after: Vec<NodeId>,
    /// Whether the task may start now. `false`: a hand-off still waits for another node's word;
    /// the start is staged (its shim made ready, nothing started, nothing reported) so that the
    /// word, when it comes, starts the task at once.
    pub start: bool,
}

struct Job {
    /// Made ready, not started: it waits for `JobControl::Go`.
    staged: bool,
    generation: u64,
    /// The same, shared with the job's watcher (it reports a panic under the current one).
    shared_generation: Arc<std::sync::atomic::AtomicU64>,
    spec_revision: i64,
    control: mpsc::UnboundedSender<JobControl>,
    handle: JoinHandle<()>,
}

/// The node's jobs.
pub struct Supervisor {
    context: Arc<JobContext>,
    jobs: BTreeMap<TaskId, Job>,
    stopping: BTreeMap<TaskId, JoinHandle<()>>,
    /// Service runs taken back from this node's earlier process, each until a job takes it on
    /// (the task is still wanted here, at the same spec revision) or it is stopped.
    adopted: BTreeMap<TaskId, Adopted>,
}

impl Supervisor {
    /// A supervisor with no jobs.
    pub fn new(context: JobContext) -> Self {
        Supervisor {
            context: Arc::new(context),
            jobs: BTreeMap::new(),
            stopping: BTreeMap::new(),
            adopted: BTreeMap::new(),
        }
    }

    /// Takes on the service runs this node's earlier process left (see
    /// [`shim::ShimLauncher::adopt`]): the task counts as running here, and its job, when the
    /// task is wanted, goes on with the run instead of starting one.
    pub fn adopt(&mut self, runs: impl IntoIterator<Item = Adopted>) {
        for run in runs {
            if let Ok(task) = TaskId::new(&run.meta.task) {
                // Two runs of one task (never written so): the later one is held, the other stops.
                self.adopted.insert(task, run);
            }
        }
    }

    /// What every job shares (runs of periodic and one-shot tasks use it too).
    pub fn context(&self) -> Arc<JobContext> {
        self.context.clone()
    }

    /// Tasks with a job (running, backing off or starting; not staged).
    pub fn active(&self) -> impl Iterator<Item = &TaskId> {
        self.jobs.iter().filter(|(_, job)| !job.staged).map(|(task, _)| task)
    }

    /// Whether `task` has a job (running, backing off or starting), not one stopping nor one
    /// only staged.
    pub fn runs(&self, task: &TaskId) -> bool {
        self.jobs.get(task).is_some_and(|job| !job.staged) || self.adopted.contains_key(task)
    }

    /// A job of `task` reported its final state (`stopped`, `failed`): the job is over (its run's
    /// process tree is gone, but for a job that panicked, whose run is asked to stop as it was
    /// before: see `job::start`; its task ends right after), so a job stopping no longer holds
    /// the task. Without this, a hand-off would wait for the next event after the job's task
    /// ended.
    pub fn on_final(&mut self, task: &TaskId) {
        self.stopping.remove(task);
    }

    /// Whether a job is still stopping (one taken back and stopped here reports nothing when it
    /// is gone: only a reconciliation sees it go).
    pub fn stopping_any(&self) -> bool {
        !self.stopping.is_empty()
    }

    /// Whether `task` has a job (not only staged) or one still stopping.
    pub fn holds(&self, task: &TaskId) -> bool {
        self.runs(task) || self.stopping.contains_key(task)
    }

    /// Starts, stops and updates jobs so that exactly `wanted` run.
    pub fn reconcile(&mut self, wanted: &BTreeMap<TaskId, Wanted>) {
        self.stopping.retain(|_, handle| !handle.is_finished());
        // Adopted runs not wanted here (or at another revision) stop, once the node holds its
        // lease and so knows what it runs; until then their own lease decides.
        let decided = self.context.shims.lease_left().is_some();
        let unwanted: Vec<TaskId> = self
            .adopted
            .iter()
            .filter(|(task, run)| {
                let revision = run.meta.service.map(|service| service.spec_revision);
                decided && wanted.get(*task).is_none_or(|want| Some(want.spec_revision) != revision)
            })
            .map(|(task, _)| task.clone())
            .collect();
        for task in unwanted {
            let mut run = self.adopted.remove(&task).expect("listed above");
            info!(%task, pid = run.handle.pid, "stopping a run taken back that is not wanted here");
            let handle = tokio::spawn(async move {
                job::stop_run(&mut run.handle, "it is not wanted on this node any more").await;
            });
            self.stopping.insert(task, handle);
        }
        // A staged job that ended before its go (it panicked) started nothing: staged again.
        self.jobs.retain(|_, job| !(job.staged && job.handle.is_finished()));
        let obsolete: Vec<TaskId> = self
            .jobs
            .iter()
            .filter(|(task, job)| {
                wanted.get(*task).is_none_or(|want| want.spec_revision != job.spec_revision)
            })
            .map(|(task, _)| task.clone())
            .collect();
        for task in obsolete {
            let job = self.jobs.remove(&task).expect("listed above");
            info!(%task, "stopping task");
            let _ = job.control.send(JobControl::Stop);
            self.stopping.insert(task, job.handle);
        }
        for (task, want) in wanted {
            match self.jobs.get_mut(task) {
                Some(job) => {
                    if job.staged && want.start {
                        job.staged = false;
                        let _ = job.control.send(JobControl::Go(want.after.clone()));
                    }
                    if job.generation != want.generation {
                        job.generation = want.generation;
                        job.shared_generation.store(want.generation, std::sync::atomic::Ordering::Relaxed);
                        let _ = job.control.send(JobControl::Generation(want.generation));
                    }
                }
                None if self.stopping.contains_key(task) => {}
                None => {
                    let shared_generation = Arc::new(std::sync::atomic::AtomicU64::new(want.generation));
                    // A run taken back goes on (it runs already: no staging, no start), if it
                    // runs the wanted revision; one of another revision stops first.
                    let mut adopted = self.adopted.remove(task);
                    let revision =
                        adopted.as_ref().and_then(|run| run.meta.service).map(|run| run.spec_revision);
                    if adopted.is_some() && revision != Some(want.spec_revision) {
                        let mut stale = adopted.take().expect("checked");
                        info!(%task, pid = stale.handle.pid, "stopping a run taken back: its spec changed");
                        let handle = tokio::spawn(async move {
                            job::stop_run(&mut stale.handle, "its spec changed").await;
                        });
                        self.stopping.insert(task.clone(), handle);
                        continue;
                    }
                    let start = want.start || adopted.is_some();
                    let (control, handle) = job::start(
                        self.context.clone(),
                        job::Start {
                            spec: want.spec.clone(),
                            spec_revision: want.spec_revision,
                            generation: shared_generation.clone(),
                            // A staged job learns the words it starts after at its go.
                            after: if start { want.after.clone() } else { Vec::new() },
                            staged: !start,
                            adopted,
                        },
                    );
                    let job = Job {
                        staged: !start,
                        generation: want.generation,
                        shared_generation,
                        spec_revision: want.spec_revision,
                        control,
                        handle,
                    };
                    self.jobs.insert(task.clone(), job);
                }
            }
        }
    }

    /// Stops every job and waits for all of them.
    pub async fn stop_all(&mut self) {
        for (task, mut run) in std::mem::take(&mut self.adopted) {
            let handle = tokio::spawn(async move {
                job::stop_run(&mut run.handle, "the node is shutting down").await;
            });
            self.stopping.insert(task, handle);
        }
        self.reconcile(&BTreeMap::new());
        for (_, handle) in std::mem::take(&mut self.stopping) {
            let _ = handle.await;
        }
    }
}
