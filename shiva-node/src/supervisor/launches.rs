//! The node's journal of the periodic and one-shot runs it launched (`<workspace>/launched`): a
//! run's id is written, and synced, before its task can start (before its staged shim's `go`). The next process of the node (a
//! re-execution, a restart after a crash) reads it to tell a run its predecessor wrote the start
//! record of but never launched (it did not reach the launch: the run is launched now, its slot
//! not lost) from one it may have launched (taken back from its shim, or else `lost`).
//!
//! A periodic or one-shot run's shim is staged at its confirmation (see `supervisor::oneshot`)
//! and starts nothing until it is told `go` at the run's instant: the run is noted just before
//! the `go`, so a node that dies while the shim is staged (the shim then backs out) leaves the
//! run unnoted, and its next process launches it.
//!
//! Invariant: a run absent from a journal that exists was never launched on this workspace
//! (the id is durable before anything starts). No journal (a fresh workspace, or one of an
//! older build): nothing is known, every such run may have been launched.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

/// The journal.
#[derive(Debug)]
pub struct Launches {
    path: PathBuf,
    /// One writer at a time: runs note, the driver prunes.
    lock: Mutex<()>,
}

impl Launches {
    /// The journal of the node with this workspace.
    pub fn new(workspace: &Path) -> Launches {
        Launches { path: workspace.join("launched"), lock: Mutex::new(()) }
    }

    /// Notes, durably, that `run` is about to be launched. Blocking (a sync of the file).
    pub fn note(&self, run: Uuid) -> io::Result<()> {
        let file = {
            let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            writeln!(file, "{run}")?;
            file
        };
        // Synced outside the lock: runs due at one instant write their lines in turn and share
        // the file system's commits instead of queuing one sync each. A `retain` meanwhile reads
        // the line (written under the lock) and syncs its own file before it takes the place.
        file.sync_data()
    }

    /// The runs noted (`None`: there is no journal, so nothing is known).
    pub fn read(&self) -> Option<BTreeSet<Uuid>> {
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let bytes = std::fs::read(&self.path).ok()?;
        Some(String::from_utf8_lossy(&bytes).lines().filter_map(|line| line.trim().parse().ok()).collect())
    }

    /// Keeps the runs `keep` says to (those still open); creates the journal if there is none,
    /// so that the next process knows.
    pub fn retain(&self, keep: impl Fn(&Uuid) -> bool) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Unreadable (not missing): kept as it is, never rewritten with less than it says.
        let text = match std::fs::read(&self.path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err),
        };
        let kept: BTreeSet<Uuid> =
            text.lines().filter_map(|line| line.trim().parse().ok()).filter(|run| keep(run)).collect();
        let next = self.path.with_extension("new");
        let mut file = std::fs::File::create(&next)?;
        for run in &kept {
            writeln!(file, "{run}")?;
        }
        file.sync_data()?;
        std::fs::rename(&next, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_knows_what_was_noted_and_keeps_what_it_is_told_to() {
        let dir = std::env::temp_dir().join(format!("shiva-launches-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let journal = Launches::new(&dir);
        assert_eq!(journal.read(), None, "no journal: nothing known");
        journal.retain(|_| true).unwrap();
        assert_eq!(journal.read(), Some(BTreeSet::new()), "an empty journal: nothing launched");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        journal.note(a).unwrap();
        journal.note(b).unwrap();
        assert_eq!(journal.read(), Some([a, b].into_iter().collect()));
        journal.retain(|run| *run == b).unwrap();
        assert_eq!(journal.read(), Some([b].into_iter().collect()));
        // A torn last line (a crash mid-write) is not a run.
        std::fs::write(dir.join("launched"), format!("{b}\n{}", &a.to_string()[..10])).unwrap();
        assert_eq!(journal.read(), Some([b].into_iter().collect()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
