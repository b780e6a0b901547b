//! Wakes log followers when their run's output grows, instead of having each poll: one inotify
//! instance watches the directories of the runs followed (the shims append to segment files
//! there), and a thread blocked on it tells each follower of a changed directory.
//!
//! Invariant: a follower registered for a directory is told of every change there after its
//! registration (a `Notify` keeps one permit, so a change while it reads is not lost); after an
//! overflow of the event queue every follower is told. Without inotify (none left, or refused),
//! followers poll as before.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::Notify;
use tracing::warn;

/// The watched directories and who follows each.
#[derive(Default)]
struct Watched {
    dirs: HashMap<PathBuf, WatchDescriptor>,
    followers: HashMap<WatchDescriptor, Vec<(u64, Arc<Notify>)>>,
    next: u64,
}

/// The node's watch on the directories of the runs it follows.
pub struct DirWatch {
    inotify: Arc<Inotify>,
    watched: Arc<Mutex<Watched>>,
    /// Its thread reads events (once it stopped, followers poll again).
    alive: Arc<AtomicBool>,
}

/// A follower's registration: told through `notify`; removed when dropped.
pub struct Following {
    /// Fires after a change in the directory.
    pub notify: Arc<Notify>,
    id: u64,
    wd: WatchDescriptor,
    watch: Arc<DirWatch>,
}

impl DirWatch {
    /// Starts the watch and its thread; `None` (followers poll) when inotify is unavailable.
    pub fn start() -> Option<Arc<DirWatch>> {
        let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(inotify) => Arc::new(inotify),
            Err(err) => {
                warn!(error = %err, "no inotify for task output: followers poll");
                return None;
            }
        };
        let watched: Arc<Mutex<Watched>> = Default::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (reader, told, running) = (inotify.clone(), watched.clone(), alive.clone());
        let spawned = std::thread::Builder::new().name("shiva-logwatch".into()).spawn(move || {
            loop {
                let events = match reader.read_events() {
                    Ok(events) => events,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(err) => {
                        warn!(error = %err, "the task output watch stopped: followers poll");
                        running.store(false, Ordering::SeqCst);
                        let watched = told.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        watched.followers.values().flatten().for_each(|(_, notify)| notify.notify_one());
                        return;
                    }
                };
                let mut watched = told.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let overflow = events.iter().any(|event| event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW));
                // The follower's own notes (`<run>.shipped`, written beside and renamed) are no
                // output.
                let output = |event: &nix::sys::inotify::InotifyEvent| {
                    event.name.as_ref().is_none_or(|name| {
                        let name = name.as_bytes();
                        !(name.ends_with(b".shipped") || name.ends_with(b".shipped.new"))
                    })
                };
                let mut woken: Vec<Arc<Notify>> = Vec::new();
                if overflow {
                    woken.extend(watched.followers.values().flatten().map(|(_, notify)| notify.clone()));
                } else {
                    for event in events.iter().filter(|event| output(event)) {
                        let followers = watched.followers.get(&event.wd).into_iter().flatten();
                        woken.extend(followers.map(|(_, notify)| notify.clone()));
                    }
                }
                // A directory removed: its watch is gone; a follower made later watches it anew.
                for event in events.iter().filter(|event| event.mask.contains(AddWatchFlags::IN_IGNORED)) {
                    watched.dirs.retain(|_, wd| *wd != event.wd);
                }
                drop(watched);
                for notify in woken {
                    notify.notify_one();
                }
            }
        });
        if let Err(err) = spawned {
            warn!(error = %err, "cannot start the task output watch: followers poll");
            return None;
        }
        Some(Arc::new(DirWatch { inotify, watched, alive }))
    }

    /// Registers a follower of `dir`; `None` (it polls) when the directory cannot be watched.
    pub fn follow(self: &Arc<Self>, dir: &Path) -> Option<Following> {
        let mut watched = self.watched.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let wd = match watched.dirs.get(dir) {
            Some(wd) => *wd,
            None => {
                let flags = AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
                match self.inotify.add_watch(dir, flags) {
                    Ok(wd) => {
                        watched.dirs.insert(dir.to_owned(), wd);
                        wd
                    }
                    Err(err) => {
                        warn!(dir = %dir.display(), error = %err, "cannot watch task output: its follower polls");
                        return None;
                    }
                }
            }
        };
        watched.next += 1;
        let id = watched.next;
        let notify = Arc::new(Notify::new());
        watched.followers.entry(wd).or_default().push((id, notify.clone()));
        Some(Following { notify, id, wd, watch: self.clone() })
    }
}

impl Following {
    /// Whether the watch still tells it (else it polls).
    pub fn alive(&self) -> bool {
        self.watch.alive.load(Ordering::SeqCst)
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut watched = self.watch.watched.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(followers) = watched.followers.get_mut(&self.wd) else { return };
        followers.retain(|(id, _)| *id != self.id);
        if followers.is_empty() {
            watched.followers.remove(&self.wd);
            watched.dirs.retain(|_, wd| *wd != self.wd);
            let _ = self.watch.inotify.rm_watch(self.wd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[tokio::test]
    async fn a_follower_is_told_of_writes_in_its_directory_only() {
        let root = std::env::temp_dir().join(format!("shiva-logwatch-{}", std::process::id()));
        let (mine, other) = (root.join("mine"), root.join("other"));
        for dir in [&mine, &other] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let watch = DirWatch::start().expect("inotify on this machine");
        let following = watch.follow(&mine).unwrap();
        let second = watch.follow(&mine).unwrap();
        let told = |following: &Following| {
            let notify = following.notify.clone();
            async move { tokio::time::timeout(Duration::from_millis(500), notify.notified()).await.is_ok() }
        };
        std::fs::write(other.join("x"), b"x").unwrap();
        assert!(!told(&following).await, "a write elsewhere does not wake it");
        crate::shim::replace_file(&mine.join("r1.shipped"), b"0 0\n").unwrap();
        assert!(!told(&following).await, "nor does the follower's own note");
        let mut file = std::fs::File::create(mine.join("r1.0")).unwrap();
        file.write_all(b"line\n").unwrap();
        assert!(told(&following).await && told(&second).await, "both followers of the directory");
        // A write while it was not waiting is kept for its next wait.
        file.write_all(b"more\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(told(&following).await);
        drop(second);
        drop(following);
        assert!(watch.watched.lock().unwrap().dirs.is_empty(), "the last follower's drop unwatches");
        let _ = std::fs::remove_dir_all(&root);
    }
}
