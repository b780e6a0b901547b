//! The node's journal of the periodic and one-shot runs it launched (`<workspace>/launches`): it
//! tells the next process of the node (a re-execution, a restart after a crash or a reboot) a run
//! its predecessor wrote the start record of but never launched (the run is launched now, its
//! slot not lost) from one it may have launched (taken back from its shim, or else `lost`).
//!
//! A periodic or one-shot run's shim is staged at its confirmation (see `supervisor::oneshot`)
//! and starts nothing until it is told `go` at the run's instant. The journal holds three kinds
//! of line:
//! - `staged <run>`, written and synced before the run's shim is started (at confirmation, ahead
//!   of the instant);
//! - `<run>`, written just before the `go`, and not synced: the instant costs a write to the page
//!   cache, not a sync of the disk (issue 21, point 4). The page cache outlives the process (a
//!   kill, a crash, a re-execution), not the machine;
//! - `boot <id>`: the kernel's boot id (`/proc/sys/kernel/random/boot_id`) when the journal was
//!   written, so a reader knows whether unsynced lines could have been lost.
//!
//! Reading it: in the boot that wrote it, the runs launched are the `<run>` lines (a run only
//! staged was never told `go`: its shim backs out when the node's pipe closes). In another boot
//! (the machine went down) or with no boot line, a staged run counts as launched too: its `go`
//! line may have been lost with the page cache.
//!
//! Invariant: a run neither noted nor (after a reboot) staged in a journal that exists was never
//! launched on this workspace. No journal (a fresh workspace): nothing is known, every such run
//! may have been launched. The journal of older builds (`<workspace>/launched`, every line
//! synced) is read with this one and removed when this one is first rewritten (at the node's
//! start): a node of an older build that comes back then finds no journal and counts every open
//! run as maybe launched, where this journal's unsynced lines, read its way after a reboot, could
//! have it run a slot twice. After a reboot a run only staged, whose shim is gone with the
//! machine, is reported `lost`: a run started in its lead (0.15-0.8 s before its instant) on a
//! machine that then went down is never run again.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

/// The journal.
#[derive(Debug)]
pub struct Launches {
    /// `<workspace>/launches`.
    path: PathBuf,
    /// `<workspace>/launched`, the journal of older builds (one `<run>` per line, each synced):
    /// read with this one, and removed when this one is rewritten. Under its old name a journal
    /// with unsynced lines would mislead an older build after a reboot; gone, that build finds
    /// no journal, and counts every open run as maybe launched.
    older: PathBuf,
    /// This boot's id (`None`: unknown, so every staged run counts as launched).
    boot: Option<String>,
    /// The journal open for appending (opened at the first line), and one writer at a time:
    /// runs stage and note, the driver prunes (which replaces the file, so closes this one).
    file: Mutex<Option<std::fs::File>>,
}

/// A journal's lines, as read.
#[derive(Debug, Default)]
struct Lines {
    boot: Option<String>,
    launched: BTreeSet<Uuid>,
    staged: BTreeSet<Uuid>,
}

impl Lines {
    fn parse(text: &str) -> Lines {
        let mut lines = Lines::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(boot) = line.strip_prefix("boot ") {
                lines.boot = Some(boot.trim().to_owned());
            } else if let Some(run) = line.strip_prefix("staged ") {
                lines.staged.extend(run.trim().parse::<Uuid>().ok());
            } else {
                // A torn last line (a crash mid-write) is not a run.
                lines.launched.extend(line.parse::<Uuid>().ok());
            }
        }
        lines
    }

    /// The runs that may have been launched, read in `boot`.
    fn launched(mut self, boot: Option<&str>) -> (BTreeSet<Uuid>, BTreeSet<Uuid>) {
        let same_boot = boot.is_some() && self.boot.as_deref() == boot;
        if !same_boot {
            self.launched.extend(std::mem::take(&mut self.staged));
        }
        self.staged.retain(|run| !self.launched.contains(run));
        (self.launched, self.staged)
    }
}

/// Makes the entries of `path`'s directory durable (a file's sync does not always cover its
/// name: a rename, a new file).
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// This boot's id, or `None` where the kernel does not say.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && !id.contains(char::is_whitespace)).then(|| id.to_owned())
}

impl Launches {
    /// The journal of the node with this workspace.
    pub fn new(workspace: &Path) -> Launches {
        Launches::in_boot(workspace, boot_id())
    }

    /// The journal, read and written as in boot `boot`.
    fn in_boot(workspace: &Path, boot: Option<String>) -> Launches {
        Launches {
            path: workspace.join("launches"),
            older: workspace.join("launched"),
            boot,
            file: Mutex::new(None),
        }
    }

    /// Appends `line` to the journal held by `held` (a new journal starts with this boot's line);
    /// the file written to.
    fn append<'a>(&self, held: &'a mut Option<std::fs::File>, line: &str) -> io::Result<&'a std::fs::File> {
        let mut text = String::new();
        let mut file = match held.take() {
            Some(file) => file,
            None => {
                let file =
                    std::fs::OpenOptions::new().create(true).read(true).append(true).open(&self.path)?;
                let len = file.metadata()?.len();
                if len == 0 {
                    // A new journal: its name made durable, and its boot said first.
                    sync_dir(&self.path)?;
                    if let Some(boot) = &self.boot {
                        text.push_str(&format!("boot {boot}\n"));
                    }
                } else {
                    // A line torn by a crash or a failed write is ended first, so that this one
                    // is not glued to it.
                    let mut last = [0u8];
                    std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, len - 1)?;
                    if last[0] != b'\n' {
                        text.push('\n');
                    }
                }
                file
            }
        };
        text.push_str(line);
        text.push('\n');
        // Not held after a failed write: opened again for the next line, which then looks at
        // how this one ended.
        file.write_all(text.as_bytes())?;
        Ok(held.insert(file))
    }

    /// Both journals' text, the older build's first (`None`: neither exists).
    fn text(&self) -> io::Result<Option<String>> {
        let mut text = None;
        for path in [&self.older, &self.path] {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let text = text.get_or_insert_with(String::new);
                    text.push_str(&String::from_utf8_lossy(&bytes));
                    text.push('\n');
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok(text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::fs::File>> {
        self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes, durably, that `run`'s shim is about to be staged. Blocking (a sync of the file).
    pub fn stage(&self, run: Uuid) -> io::Result<()> {
        // Synced outside the lock: runs staged at once write their lines in turn and share the
        // file system's commits instead of queuing one sync each. A `retain` meanwhile reads the
        // line (written under the lock) and syncs its own file before it takes the place.
        let file = self.append(&mut self.lock(), &format!("staged {run}"))?.try_clone()?;
        file.sync_data()
    }

    /// Notes that `run` is about to be told `go`: a write, not synced (see the module's header).
    /// Blocking while a prune holds the journal (it syncs).
    pub fn note(&self, run: Uuid) -> io::Result<()> {
        self.append(&mut self.lock(), &run.to_string()).map(drop)
    }

    /// [`Launches::note`], unless that could block: the journal held (by a prune, or a stage
    /// writing its line) or not open yet. `None`, then, and nothing written. Otherwise a write
    /// to the page cache through a file already open, which an async worker may make.
    pub fn try_note(&self, run: Uuid) -> Option<io::Result<()>> {
        let mut held = match self.file.try_lock() {
            Ok(held) => held,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        held.is_some().then(|| self.append(&mut held, &run.to_string()).map(drop))
    }

    /// The runs that may have been launched (`None`: there is no journal, so nothing is known).
    pub fn read(&self) -> Option<BTreeSet<Uuid>> {
        let _held = self.lock();
        let text = self.text().ok()??;
        Some(Lines::parse(&text).launched(self.boot.as_deref()).0)
    }

    /// Keeps the runs `keep` says to (those still open); creates the journal if there is none,
    /// so that the next process knows. The journal written says this boot: what an earlier boot
    /// only staged is written as launched.
    pub fn retain(&self, keep: impl Fn(&Uuid) -> bool) -> io::Result<()> {
        let mut held = self.lock();
        // Unreadable (not missing): kept as it is, never rewritten with less than it says.
        let text = self.text()?.unwrap_or_default();
        let (launched, staged) = Lines::parse(&text).launched(self.boot.as_deref());
        let mut out = String::new();
        if let Some(boot) = &self.boot {
            out.push_str(&format!("boot {boot}\n"));
        }
        for run in launched.iter().filter(|run| keep(run)) {
            out.push_str(&format!("{run}\n"));
        }
        for run in staged.iter().filter(|run| keep(run)) {
            out.push_str(&format!("staged {run}\n"));
        }
        let next = self.path.with_extension("new");
        let mut file = std::fs::File::create(&next)?;
        file.write_all(out.as_bytes())?;
        file.sync_data()?;
        // The older build's journal first, and with it this one (a build that came back after a
        // rollback left both): a crash in between leaves no journal (nothing known, every open
        // run counts as maybe launched), never one that says less than both did.
        match std::fs::remove_file(&self.older) {
            Ok(()) => {
                match std::fs::remove_file(&self.path) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                    _ => {}
                }
                sync_dir(&self.older)?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        std::fs::rename(&next, &self.path)?;
        sync_dir(&self.path)?;
        // The next line goes to the new file, opened then.
        *held = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shiva-launches-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_journal_knows_what_was_noted_and_keeps_what_it_is_told_to() {
        let dir = dir("keeps");
        let journal = Launches::in_boot(&dir, Some("b1".into()));
        assert_eq!(journal.read(), None, "no journal: nothing known");
        journal.retain(|_| true).unwrap();
        assert_eq!(journal.read(), Some(BTreeSet::new()), "an empty journal: nothing launched");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        journal.stage(a).unwrap();
        journal.note(a).unwrap();
        journal.stage(b).unwrap();
        journal.note(b).unwrap();
        assert_eq!(journal.read(), Some([a, b].into_iter().collect()));
        journal.retain(|run| *run == b).unwrap();
        assert_eq!(journal.read(), Some([b].into_iter().collect()));
        // A torn last line (a crash mid-write) is not a run.
        std::fs::write(dir.join("launches"), format!("boot b1\n{b}\n{}", &a.to_string()[..10])).unwrap();
        assert_eq!(journal.read(), Some([b].into_iter().collect()));
        // The next line is not glued to it.
        let c = Uuid::new_v4();
        Launches::in_boot(&dir, Some("b1".into())).note(c).unwrap();
        assert_eq!(journal.read(), Some([b, c].into_iter().collect()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_run_only_staged_was_launched_only_if_the_machine_went_down_since() {
        let dir = dir("boots");
        let journal = Launches::in_boot(&dir, Some("b1".into()));
        let (staged, told) = (Uuid::new_v4(), Uuid::new_v4());
        journal.stage(staged).unwrap();
        journal.stage(told).unwrap();
        journal.note(told).unwrap();
        // The same boot: the page cache holds every line, and a staged shim starts nothing
        // without its `go`.
        assert_eq!(journal.read(), Some([told].into_iter().collect()));
        // Kept as it is through a prune in the same boot.
        journal.retain(|_| true).unwrap();
        assert_eq!(journal.read(), Some([told].into_iter().collect()));
        // Another boot: a `go` line may have been lost with the page cache (here it was), so a
        // staged run may have been launched.
        std::fs::write(dir.join("launches"), format!("boot b1\nstaged {staged}\nstaged {told}\n")).unwrap();
        let next = Launches::in_boot(&dir, Some("b2".into()));
        assert_eq!(next.read(), Some([staged, told].into_iter().collect()));
        // Its prune writes them as launched, under its own boot.
        next.retain(|_| true).unwrap();
        assert_eq!(next.read(), Some([staged, told].into_iter().collect()));
        let text = std::fs::read_to_string(dir.join("launches")).unwrap();
        assert!(text.starts_with("boot b2\n") && !text.contains("staged"), "{text}");
        // An unknown boot: the same caution.
        let unknown = Launches::in_boot(&dir, None);
        std::fs::write(dir.join("launches"), format!("boot b1\nstaged {staged}\n")).unwrap();
        assert_eq!(unknown.read(), Some([staged].into_iter().collect()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_journal_of_an_older_build_reads_as_it_did() {
        let dir = dir("older");
        let run = Uuid::new_v4();
        std::fs::write(dir.join("launched"), format!("{run}\n")).unwrap();
        let journal = Launches::in_boot(&dir, Some("b1".into()));
        assert_eq!(journal.read(), Some([run].into_iter().collect()));
        // Read beside this build's journal.
        let staged = Uuid::new_v4();
        journal.stage(staged).unwrap();
        assert_eq!(journal.read(), Some([run].into_iter().collect()));
        // Rewritten into this build's journal and removed: an older build that comes back finds
        // no journal (its reading of one with unsynced lines could run a slot twice after a
        // reboot), and counts every open run as maybe launched.
        journal.retain(|_| true).unwrap();
        assert!(!dir.join("launched").exists());
        assert_eq!(journal.read(), Some([run].into_iter().collect()));
        assert_eq!(
            Launches::in_boot(&dir, Some("b2".into())).read(),
            Some([run, staged].into_iter().collect())
        );
        // Back after a rollback: the older build wrote its own journal beside this one's.
        let older_run = Uuid::new_v4();
        std::fs::write(dir.join("launched"), format!("{older_run}\n")).unwrap();
        journal.retain(|_| true).unwrap();
        assert!(!dir.join("launched").exists());
        assert_eq!(journal.read(), Some([run, older_run].into_iter().collect()), "both, in one journal");
        // A new journal starts with its boot, so a staged run is not taken for launched.
        std::fs::remove_file(dir.join("launches")).unwrap();
        let fresh = Launches::in_boot(&dir, Some("b1".into()));
        fresh.stage(run).unwrap();
        assert_eq!(fresh.read(), Some(BTreeSet::new()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_note_on_an_async_worker_never_waits() {
        let dir = dir("try");
        let journal = Launches::in_boot(&dir, Some("b1".into()));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(journal.try_note(a).is_none(), "not open yet: opening may wait for the disk");
        journal.stage(a).unwrap();
        assert!(journal.try_note(a).is_some_and(|noted| noted.is_ok()), "open, not held");
        {
            let _prune = journal.lock();
            assert!(journal.try_note(b).is_none(), "held by a prune (which syncs)");
        }
        assert_eq!(journal.read(), Some([a].into_iter().collect()), "nothing written for b");
        journal.retain(|_| true).unwrap();
        assert!(journal.try_note(b).is_none(), "the prune replaced the file: not open");
        journal.note(b).unwrap();
        assert_eq!(journal.read(), Some([a, b].into_iter().collect()), "the note went to the new file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_machine_has_a_boot_id() {
        assert!(boot_id().is_some_and(|id| id.len() >= 32), "{:?}", boot_id());
    }
}
