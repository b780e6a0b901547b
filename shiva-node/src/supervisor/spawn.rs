//! Spawning children from one dedicated thread.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process. A
//! tokio worker or blocking-pool thread may exit while the node lives, which would kill healthy
//! tasks; so every child is forked by this thread, which lives as long as the node. When the
//! node dies (even by SIGKILL), the kernel sends SIGKILL to each child it spawned.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;

/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    /// Program.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// File receiving stdout and stderr (appended).
    pub output: PathBuf,
}

type Reply = oneshot::Sender<io::Result<Child>>;

/// Handle to the spawner thread.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std_mpsc::Sender<(SpawnRequest, Reply)>,
}

impl Spawner {
    /// Starts the spawner thread. It lives until the process exits.
    pub fn start() -> io::Result<Spawner> {
        let (requests, receiver) = std_mpsc::channel::<(SpawnRequest, Reply)>();
        std::thread::Builder::new().name("shiva-spawner".into()).spawn(move || {
            while let Ok((request, reply)) = receiver.recv() {
                let _ = reply.send(spawn(request));
            }
            // The node is shutting down; park so children are not signalled before it exits.
            loop {
                std::thread::park();
            }
        })?;
        Ok(Spawner { requests })
    }

    /// Spawns a child in its own process group, bound to the node's life.
    pub async fn spawn(&self, request: SpawnRequest) -> io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((request, reply)).map_err(|_| io::Error::other("the spawner thread is gone"))?;
        answer.await.map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}

fn spawn(request: SpawnRequest) -> io::Result<Child> {
    if let Some(parent) = request.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::create_dir_all(&request.cwd)?;
    let output = OpenOptions::new().create(true).append(true).open(&request.output)?;
    let node_pid = nix::unistd::getpid();
    let mut command = Command::new(&request.program);
    command
        .args(&request.args)
        .env_clear()
        .envs(request.env.iter().map(|(key, value)| (key, value)))
        .current_dir(&request.cwd)
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .process_group(0);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (prctl, getppid); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The node may have died between fork and prctl: then nobody would signal us.
            if nix::unistd::getppid() != node_pid {
                return Err(io::Error::other("the node exited while starting the task"));
            }
            Ok(())
        });
    }
    command.spawn()
}
