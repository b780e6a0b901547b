//! One topic of the file bus (issue 16): a directory of append-only segment files of framed
//! records that several processes of one host share, with the offsets, keys, tombstones and
//! compaction of a Kafka partition.
//!
//! Invariants:
//! * **Acknowledged means durable.** [`TopicLog::append`] returns only once its frames are
//!   written whole and `fdatasync`ed (the directory too, when it created a file): a record
//!   acknowledged to a writer survives `kill -9` of any process, and a power cut as far as the
//!   disk keeps its word. A reader may see a record between its write and its sync (as a
//!   non-idempotent Kafka write reported failed may have landed, a failed append's records may
//!   be there too): a power cut in that window loses what it read, and every process with it.
//! * **Appends never interleave.** An appender holds an exclusive `flock` on the topic's lock
//!   file from reading the tail to the end of its write (it syncs after releasing it), and
//!   writes at the end of the last segment (`O_APPEND`): two processes appending at once write
//!   one after the other.
//! * **Offsets are stable and total.** Each frame carries its offset; they are dense in a
//!   segment appenders write and increasing across segments and in compacted ones, so a reader
//!   resumes at an offset, as on Kafka.
//! * **A torn tail is cut, and said so.** What a writer killed mid-write leaves after the last
//!   whole frame (fewer bytes than a frame's prefix, or a frame whose body runs past the end of
//!   the file), or zeros to the end (a power cut after the file grew, before its pages were
//!   written), was never acknowledged: the next appender cuts it, under the lock, with a
//!   warning. Anything else that does not check (a whole frame with a bad checksum, a length
//!   out of range, an offset out of sequence) is damage (a bad sector, another program): an
//!   error for appenders and readers, never cut, since acknowledged records may follow. Readers
//!   never cut: a torn tail is, for them, a frame not written yet.
//!
//! Frame (little endian): `len u32` (of what follows the checksum), `crc u32` (CRC-32 of what
//! follows it), `offset i64`, `timestamp_ms i64`, `key_len u32`, `value_len i32` (`-1`: a
//! tombstone), key bytes, value bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Bytes before the frame's body: its length and checksum.
const PREFIX: usize = 8;
/// The body's fixed part: offset, timestamp, key length, value length.
const FIXED: usize = 24;
/// The largest frame body accepted (a record is at most 1 MiB in Shiva; a key at most 64 KiB).
pub const MAX_BODY: usize = (1 << 20) + (1 << 16) + FIXED;

/// Whether a record of `key_len` and `value_len` bytes fits in a frame.
pub fn fits(key_len: usize, value_len: usize) -> bool {
    FIXED.saturating_add(key_len).saturating_add(value_len) <= MAX_BODY
}

/// Why the file bus refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum FileLogError {
    /// An I/O error, with what was being done.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A record too large for a frame.
    #[error("a record of {size} bytes is larger than the file bus takes ({MAX_BODY} bytes)")]
    TooLarge {
        /// Its size (key, value and the frame's fixed part).
        size: usize,
    },
    /// The file is damaged before its tail: not cut, since acknowledged records follow.
    #[error("{path} is damaged at byte {at}: {reason}; not cut (records written after it would be lost)")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Where.
        at: u64,
        /// What does not check.
        reason: String,
    },
    /// The segment a reader was reading was removed while it was the topic's last (compaction
    /// never removes the last): the topic was deleted or recreated under the reader, whose
    /// records no longer describe it.
    #[error(
        "{path} was removed while it was the last segment of its topic (offset {next} was next): \
         the topic was deleted or recreated; repair or restore it, then start again"
    )]
    Regressed {
        /// The segment.
        path: PathBuf,
        /// The offset the reader expected next.
        next: i64,
    },
    /// An earlier write or sync of this handle failed: what the kernel did with its pages is
    /// unknown, so this handle appends no more (open the topic again).
    #[error("{path}: an earlier append failed ({reason}); open the topic again")]
    Poisoned {
        /// The file.
        path: PathBuf,
        /// The earlier failure.
        reason: String,
    },
}

fn io_error<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> FileLogError + 'p {
    move |source| FileLogError::Io { what, path: path.to_owned(), source }
}

/// A record read back from a topic file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its offset in the topic.
    pub offset: i64,
    /// The writer's clock when it appended the record (ms since the Unix epoch).
    pub timestamp_ms: i64,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
}

impl Frame {
    /// The frame's bytes.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), FileLogError> {
        let value_len = self.value.as_ref().map_or(0, Vec::len);
        let size = FIXED + self.key.len() + value_len;
        if size > MAX_BODY {
            return Err(FileLogError::TooLarge { size });
        }
        let start = out.len();
        out.extend_from_slice(&[0; PREFIX]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        // Within `MAX_BODY`: the conversions cannot fail.
        out.extend_from_slice(&u32::try_from(self.key.len()).unwrap_or(u32::MAX).to_le_bytes());
        let value_len = match &self.value {
            Some(value) => i32::try_from(value.len()).unwrap_or(i32::MAX),
            None => -1,
        };
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(&self.key);
        if let Some(value) = &self.value {
            out.extend_from_slice(value);
        }
        let body = &out[start + PREFIX..];
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes();
        let crc = crc32fast::hash(body).to_le_bytes();
        out[start..start + 4].copy_from_slice(&len);
        out[start + 4..start + 8].copy_from_slice(&crc);
        Ok(())
    }

    /// The frame at the start of `bytes` and its length, `Ok(None)` when `bytes` holds only part
    /// of one, `Err` when what is there is not a frame (a torn or damaged write).
    fn decode(bytes: &[u8]) -> Result<Option<(Frame, usize)>, &'static str> {
        let Some(prefix) = bytes.get(..PREFIX) else { return Ok(None) };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let crc = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        if !(FIXED..=MAX_BODY).contains(&len) {
            return Err("a frame length out of range");
        }
        let Some(body) = bytes.get(PREFIX..PREFIX + len) else { return Ok(None) };
        if crc32fast::hash(body) != crc {
            return Err("a checksum mismatch");
        }
        let word = |at: usize| {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&body[at..at + 8]);
            i64::from_le_bytes(eight)
        };
        let four = |at: usize| [body[at], body[at + 1], body[at + 2], body[at + 3]];
        let (offset, timestamp_ms) = (word(0), word(8));
        let key_len = u32::from_le_bytes(four(16)) as usize;
        let value_len = i32::from_le_bytes(four(20));
        let value_bytes = usize::try_from(value_len).unwrap_or(0);
        let total = FIXED.checked_add(key_len).and_then(|sum| sum.checked_add(value_bytes));
        if value_len < -1 || total != Some(len) {
            return Err("frame lengths that do not add up");
        }
        let key = body[FIXED..FIXED + key_len].to_vec();
        let value = (value_len >= 0).then(|| body[FIXED + key_len..].to_vec());
        Ok(Some((Frame { offset, timestamp_ms, key, value }, PREFIX + len)))
    }
}

/// How large the last segment of a topic grows before an appender starts a new one.
pub const SEGMENT_BYTES: u64 = 1 << 20;

/// Bytes a torn write can leave after the last whole frame: less than one frame.
const MAX_TORN: u64 = (PREFIX + MAX_BODY) as u64;

/// How much a reader reads at once (at least one frame).
const CHUNK: usize = 4 << 20;

/// The file name of the segment whose first offset is `base`.
fn segment_name(base: i64) -> String {
    format!("{base:020}.log")
}

/// The segments of a topic directory, by first offset. Other files (locks, a compaction's
/// output being written) are not segments.
fn segments(dir: &Path) -> Result<Vec<(i64, PathBuf)>, FileLogError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|name| name.strip_suffix(".log")) else { continue };
        if stem.len() == 20
            && stem.bytes().all(|byte| byte.is_ascii_digit())
            && let Ok(base) = stem.parse::<i64>()
        {
            found.push((base, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `bytes` to a file at `path` (replacing what it held) and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), FileLogError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_error("creating", path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_error("writing", path))
}

/// The device and inode of `dir`, `None` when it is gone.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|meta| (meta.dev(), meta.ino()))
}

/// Syncs `dir`, so that files created, renamed or removed in it stay so after a power cut.
fn sync_dir(dir: &Path) -> Result<(), FileLogError> {
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_error("syncing", dir))
}

/// What stopped a read before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// What follows the last whole frame is what a writer killed mid-write leaves (fewer bytes
    /// than a frame's prefix, or a frame whose body runs past the end), or zeros to the end (a
    /// power cut after the file grew but before its pages were written): a frame not whole yet
    /// for a reader, a torn tail for an appender under the lock.
    Torn,
    /// Anything else: a whole frame that does not check, a length out of range, an offset out
    /// of sequence. Damage (a bad sector, another program): an error, never cut.
    Damage(String),
}

impl Stop {
    /// Classifies `rest`, the bytes from a frame that did not decode to the end of what was
    /// read (the whole rest of the file, or more than a frame of it).
    fn classify(rest: &[u8], reason: &str) -> Stop {
        let incomplete = match rest.get(..PREFIX) {
            None => true,
            Some(prefix) => {
                let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                (FIXED..=MAX_BODY).contains(&len) && rest.len() < PREFIX + len
            }
        };
        if incomplete || rest.iter().all(|byte| *byte == 0) {
            Stop::Torn
        } else {
            Stop::Damage(reason.to_owned())
        }
    }
}

/// The segment appends go to (the topic's last), as of this handle's last look under the lock.
struct Active {
    base: i64,
    path: PathBuf,
    /// The segment file, in append mode.
    file: File,
    /// Its end and the next offset; the frames after it (other processes' appends) are read at
    /// the next append.
    end: u64,
    next: i64,
}

impl Active {
    /// Opens segment `base` at `path` and reads its frames (no lock needed: what a concurrent
    /// append adds is read at the next append, under the lock).
    fn open(base: i64, path: PathBuf) -> Result<Active, FileLogError> {
        let file =
            OpenOptions::new().read(true).append(true).open(&path).map_err(io_error("opening", &path))?;
        let mut active = Active { base, path, file, end: 0, next: base };
        let mut cursor = SegmentCursor::at_start(
            &active.path,
            active.file.try_clone().map_err(io_error("opening", &active.path))?,
            base,
            true,
        );
        loop {
            let frames = cursor.read_new()?;
            let Some(last) = frames.last() else { break };
            active.next = last.offset + 1;
            active.end = cursor.position;
        }
        Ok(active)
    }

    /// Reads the frames other processes appended since this handle's last look, and cuts a
    /// torn tail. Called with the lock held.
    fn catch_up(&mut self) -> Result<(), FileLogError> {
        let len = self.file.metadata().map_err(io_error("reading the size of", &self.path))?.len();
        if len == self.end {
            return Ok(());
        }
        if len < self.end {
            // Shorter than last seen: a torn tail past our look cannot be (we look under the
            // lock, and cuts only remove bytes after whole frames); another program cut it.
            return Err(FileLogError::Damaged {
                path: self.path.clone(),
                at: len,
                reason: format!("the file shrank below {} bytes, read before", self.end),
            });
        }
        let mut cursor = SegmentCursor {
            path: self.path.clone(),
            file: self.file.try_clone().map_err(io_error("opening", &self.path))?,
            position: self.end,
            next: Some(self.next),
            dense: true,
        };
        let problem = loop {
            match cursor.read_chunk() {
                Ok((frames, None)) if frames.is_empty() => break None,
                Ok((frames, problem)) => {
                    if let Some(last) = frames.last() {
                        self.next = last.offset + 1;
                    }
                    self.end = cursor.position;
                    if problem.is_some() {
                        break problem;
                    }
                }
                Err(err) => return Err(err),
            }
        };
        let cut = len.saturating_sub(self.end);
        if cut == 0 {
            return Ok(());
        }
        if let Some(Stop::Damage(reason)) = problem {
            return Err(FileLogError::Damaged { path: self.path.clone(), at: self.end, reason });
        }
        let reason = "a torn write";
        // Under the lock nobody is writing: what does not check is a torn write of a writer
        // that died before its acknowledgement.
        tracing::warn!(
            file = %self.path.display(),
            at = self.end,
            cut,
            reason,
            "cutting a torn write at the end of a file-bus topic (its writer died mid-write; it was never acknowledged)"
        );
        let file =
            OpenOptions::new().write(true).open(&self.path).map_err(io_error("opening", &self.path))?;
        file.set_len(self.end).and_then(|()| file.sync_all()).map_err(io_error("cutting", &self.path))?;
        Ok(())
    }
}

/// One topic of the file bus, opened for appending: a directory of segment files named by
/// their first offset; appends go to the last one.
pub struct TopicLog {
    dir: PathBuf,
    /// The topic directory's device and inode when opened.
    dir_id: (u64, u64),
    lock_path: PathBuf,
    /// The lock file, open between appends (`None` after a failed unlock: opened again).
    lock_file: Option<File>,
    segment_bytes: u64,
    active: Active,
    /// Why an earlier append failed, if one did (see [`FileLogError::Poisoned`]).
    poisoned: Option<String>,
}

impl TopicLog {
    /// Opens (creating) the topic `topic` in the bus directory `bus`: the directory
    /// `<bus>/<topic>`.
    pub fn open(bus: &Path, topic: &str) -> Result<TopicLog, FileLogError> {
        TopicLog::open_with(bus, topic, SEGMENT_BYTES)
    }

    /// [`TopicLog::open`], starting a new segment once the last one holds `segment_bytes`.
    pub fn open_with(bus: &Path, topic: &str, segment_bytes: u64) -> Result<TopicLog, FileLogError> {
        let dir = bus.join(topic);
        create_topic_dir(&dir)?;
        let lock_path = dir.join("append.lock");
        let (base, path) = match segments(&dir)?.pop() {
            Some(last) => last,
            None => {
                // The first segment, under the lock (two processes may open a new topic).
                let _lock = lock(&lock_path, FlockArg::LockExclusive)?;
                match segments(&dir)?.pop() {
                    Some(last) => last,
                    None => {
                        let path = dir.join(segment_name(0));
                        create_segment(&dir, &path)?;
                        (0, path)
                    }
                }
            }
        };
        let mut active = Active::open(base, path)?;
        let len = active.file.metadata().map_err(io_error("reading", &active.path))?.len();
        if len > active.end {
            // Bytes after the last whole frame: a write in progress, or a torn one, cut now
            // under the lock (with a warning) rather than at the next append.
            let _lock = lock(&lock_path, FlockArg::LockExclusive)?;
            active.catch_up()?;
        }
        let lock_file = open_lock(&lock_path)?;
        let dir_id = dir_identity(&dir)
            .ok_or_else(|| io_error("opening", &dir)(io::Error::from(io::ErrorKind::NotFound)))?;
        Ok(TopicLog {
            dir,
            dir_id,
            lock_path,
            lock_file: Some(lock_file),
            segment_bytes: segment_bytes.max(1),
            active,
            poisoned: None,
        })
    }

    /// The topic's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment file appends go to, as of this handle's last append.
    pub fn segment_path(&self) -> &Path {
        &self.active.path
    }

    /// Appends `records` (key, value; `None`: a tombstone) stamped `timestamp_ms`, in order, and
    /// returns their offsets once they are durable (written and `fdatasync`ed).
    pub fn append(
        &mut self,
        records: &[(&[u8], Option<&[u8]>)],
        timestamp_ms: i64,
    ) -> Result<Vec<i64>, FileLogError> {
        self.append_with(records, timestamp_ms, true)
    }

    /// [`TopicLog::append`], `sync`ed or only written: a record written but not synced survives
    /// the death of any process (it is in the kernel's page cache), not a power cut or a kernel
    /// crash, which lose the last records not synced by this or a later synced append.
    pub fn append_with(
        &mut self,
        records: &[(&[u8], Option<&[u8]>)],
        timestamp_ms: i64,
        sync: bool,
    ) -> Result<Vec<i64>, FileLogError> {
        if let Some(reason) = &self.poisoned {
            return Err(FileLogError::Poisoned { path: self.dir.clone(), reason: reason.clone() });
        }
        // Encoded before anything changes: a record refused leaves the handle as it was.
        let mut frames = Vec::with_capacity(records.len());
        for (key, value) in records {
            let frame =
                Frame { offset: 0, timestamp_ms, key: key.to_vec(), value: value.map(<[u8]>::to_vec) };
            frame.encode(&mut Vec::new())?;
            frames.push(frame);
        }
        let lock_file = match self.lock_file.take() {
            Some(file) => file,
            None => open_lock(&self.lock_path)?,
        };
        let lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error("locking", &self.lock_path)(io::Error::from(errno)))?;
        let appended = self.append_locked(frames);
        // Unlocked (or closed, which unlocks) before the sync: a process stopped in a slow
        // sync holds up no other appender. The next appender needs only whole frames, which
        // the write left; a later sync of the file covers these frames too.
        self.lock_file = lock.unlock().ok();
        let offsets = appended?;
        if sync && let Err(err) = self.active.file.sync_data() {
            // After a failed sync the kernel may have dropped the pages: this handle stops here.
            self.poisoned = Some(err.to_string());
            return Err(io_error("syncing", &self.active.path)(err));
        }
        Ok(offsets)
    }

    /// The rest of an append, under the lock.
    fn append_locked(&mut self, frames: Vec<Frame>) -> Result<Vec<i64>, FileLogError> {
        // Another process may have started a new segment since our last look: then ours was
        // complete, and either is gone (compacted: no longer linked) or is followed by one
        // from its next offset.
        let linked = self.active.file.metadata().map_err(io_error("reading", &self.active.path))?.nlink() > 0;
        if linked {
            self.active.catch_up()?;
        }
        if !linked || self.dir.join(segment_name(self.active.next)).exists() {
            if dir_identity(&self.dir) != Some(self.dir_id) {
                return Err(FileLogError::Damaged {
                    path: self.dir.clone(),
                    at: 0,
                    reason: "the topic directory was deleted or recreated since it was opened".to_owned(),
                });
            }
            match segments(&self.dir)?.pop() {
                Some((base, _)) if base == self.active.base && linked => {}
                // Not linked: compacted away, so no longer the last (compaction never touches
                // the last segment): the last starts above it, or the topic was recreated.
                Some((base, path)) if base > self.active.base => {
                    self.active = Active::open(base, path)?;
                    self.active.catch_up()?;
                }
                _ => {
                    return Err(FileLogError::Damaged {
                        path: self.dir.clone(),
                        at: 0,
                        reason: format!(
                            "the segment appended to (from offset {}) is gone and no later one \
                             follows it: was the topic deleted or recreated?",
                            self.active.base
                        ),
                    });
                }
            }
        }
        if self.active.end >= self.segment_bytes {
            // A new segment, from the next offset: the last one ends with whole frames (a torn
            // tail was just cut) and is never written again, so compaction may rewrite it. It is
            // synced first (records appended unsynced may end it): a segment before the last
            // is whole even after a power cut.
            if let Err(err) = self.active.file.sync_data() {
                // A writeback error is reported once: this handle stops rather than roll on.
                self.poisoned = Some(err.to_string());
                return Err(io_error("syncing", &self.active.path)(err));
            }
            let base = self.active.next;
            let path = self.dir.join(segment_name(base));
            create_segment(&self.dir, &path)?;
            self.active = Active::open(base, path)?;
        }
        let count = i64::try_from(frames.len()).unwrap_or(i64::MAX);
        if self.active.next.checked_add(count).is_none() {
            return Err(FileLogError::Damaged {
                path: self.active.path.clone(),
                at: self.active.end,
                reason: format!("offsets from {} would overflow", self.active.next),
            });
        }
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(frames.len());
        for (next, mut frame) in (self.active.next..).zip(frames) {
            frame.offset = next;
            frame.encode(&mut bytes)?;
            offsets.push(next);
        }
        if let Err(err) = self.active.file.write_all(&bytes) {
            // Part of the batch may be in the file (whole frames stay, as a Kafka write reported
            // failed may have landed; a torn last one is cut by the next appender).
            self.poisoned = Some(err.to_string());
            return Err(io_error("appending to", &self.active.path)(err));
        }
        self.active.next += count;
        self.active.end += bytes.len() as u64;
        Ok(offsets)
    }
}

/// Creates a topic directory (and makes its entry durable).
fn create_topic_dir(dir: &Path) -> Result<(), FileLogError> {
    if dir.is_dir() {
        return Ok(());
    }
    let created: Vec<&Path> = dir.ancestors().take_while(|ancestor| !ancestor.exists()).collect();
    std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    // Each new directory's entry is durable: its parent is synced, from the top down.
    for new in created.iter().rev() {
        if let Some(parent) = new.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Creates an empty segment file (it must not exist) and syncs the directory.
fn create_segment(dir: &Path, path: &Path) -> Result<(), FileLogError> {
    OpenOptions::new().write(true).create_new(true).open(path).map_err(io_error("creating", path))?;
    sync_dir(dir)
}

/// Opens (creating) the lock file at `path`.
fn open_lock(path: &Path) -> Result<File, FileLogError> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_error("opening", path))
}

/// Takes the lock at `path` (creating the file).
fn lock(path: &Path, how: FlockArg) -> Result<Flock<File>, FileLogError> {
    let file = open_lock(path)?;
    Flock::lock(file, how).map_err(|(_, errno)| io_error("locking", path)(io::Error::from(errno)))
}

/// A reader of one segment file from a byte position.
struct SegmentCursor {
    path: PathBuf,
    file: File,
    /// Byte position of the next frame.
    position: u64,
    /// The offset the next frame must carry (`dense`) or at least carry.
    next: Option<i64>,
    /// Whether offsets follow each other without gaps (a segment appenders wrote) or only
    /// increase (any segment, compacted ones included).
    dense: bool,
}

impl SegmentCursor {
    fn at_start(path: &Path, file: File, base: i64, dense: bool) -> SegmentCursor {
        SegmentCursor { path: path.to_owned(), file, position: 0, next: Some(base), dense }
    }

    /// The frames written whole since the last call, in order, up to about 4 MiB of them (call
    /// again until it returns none). A frame not whole yet, or not checking, at the end of the
    /// file ends the batch: its writer is still writing it, or died (then the next appender
    /// cuts it and writes over it), and it is read again from its start next time. Anything
    /// else that does not check is damage, an error.
    fn read_new(&mut self) -> Result<Vec<Frame>, FileLogError> {
        let (frames, problem) = self.read_chunk()?;
        match problem {
            // The frames before it first; the next call meets it at once.
            Some(Stop::Damage(_)) if frames.is_empty() => {
                // Read again once: bytes read while an appender cut a torn tail and wrote in
                // its place can look damaged in one read; real damage stays.
                match self.read_chunk()? {
                    (frames, Some(Stop::Damage(reason))) if frames.is_empty() => {
                        Err(FileLogError::Damaged { path: self.path.clone(), at: self.position, reason })
                    }
                    (frames, _) => Ok(frames),
                }
            }
            _ => Ok(frames),
        }
    }

    /// Whole frames from `position`, up to about [`CHUNK`] bytes of them, and what stopped the
    /// read before the end of the file, if anything did.
    fn read_chunk(&mut self) -> Result<(Vec<Frame>, Option<Stop>), FileLogError> {
        self.file.seek(SeekFrom::Start(self.position)).map_err(io_error("seeking in", &self.path))?;
        let mut bytes = Vec::new();
        // A frame that starts within the chunk is read whole, and what follows a frame that
        // does not decode is read to the end of the file or past a frame's length.
        let limit = (CHUNK as u64) + MAX_TORN + 1;
        (&mut self.file).take(limit).read_to_end(&mut bytes).map_err(io_error("reading", &self.path))?;
        let mut frames = Vec::new();
        let mut at = 0;
        let problem = loop {
            if at >= CHUNK || at == bytes.len() {
                break None;
            }
            match Frame::decode(&bytes[at..]) {
                Ok(Some((frame, size))) => {
                    let found = frame.offset;
                    match self.next {
                        Some(expected) if self.dense && found != expected => {
                            break Some(Stop::Damage(format!(
                                "a frame of offset {found} where offset {expected} comes next"
                            )));
                        }
                        Some(expected) if found < expected => {
                            break Some(Stop::Damage(format!(
                                "a frame of offset {found} where offsets from {expected} come next"
                            )));
                        }
                        _ => {}
                    }
                    let Some(next) = found.checked_add(1) else {
                        break Some(Stop::Damage("an offset at the end of the range".to_owned()));
                    };
                    self.next = Some(next);
                    frames.push(frame);
                    at += size;
                }
                Ok(None) => break Some(Stop::classify(&bytes[at..], "an incomplete frame")),
                Err(reason) => break Some(Stop::classify(&bytes[at..], reason)),
            }
        };
        self.position += at as u64;
        Ok((frames, problem))
    }
}

/// A reader of one topic of the file bus: its records in offset order from an offset, across
/// segments, following compaction.
///
/// Invariant: every record of offset at least [`Cursor::next_offset`] that is in the topic, or
/// was when a compaction started, is read in order, once. To go on at offset `n`, a cursor
/// opens the segment with the greatest first offset at most `n` (which holds `n` and what
/// survived of it after a compaction, since a compaction writes its output under the name of
/// its first input) and skips what lies below `n`. It leaves a segment only once it saw a later
/// segment before reading it to its end: appenders start a segment only after the previous one
/// ends with whole frames, and never write to it again.
pub struct Cursor {
    dir: PathBuf,
    /// The topic directory's device and inode when the cursor opened: another one under its
    /// name is a topic deleted and recreated.
    dir_id: (u64, u64),
    current: Option<(i64, u64, SegmentCursor)>,
    next: i64,
}

impl Cursor {
    /// A cursor at the start of the topic directory `dir` (see [`TopicLog::dir`]).
    pub fn open(dir: &Path) -> Result<Cursor, FileLogError> {
        Cursor::at(dir, 0)
    }

    /// A cursor from `offset`.
    pub fn at(dir: &Path, offset: i64) -> Result<Cursor, FileLogError> {
        if !dir.is_dir() {
            return Err(io_error("opening", dir)(io::Error::from(io::ErrorKind::NotFound)));
        }
        let dir_id = dir_identity(dir)
            .ok_or_else(|| io_error("opening", dir)(io::Error::from(io::ErrorKind::NotFound)))?;
        Ok(Cursor { dir: dir.to_owned(), dir_id, current: None, next: offset.max(0) })
    }

    /// The topic directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The offset of the next record this cursor returns, or higher.
    pub fn next_offset(&self) -> i64 {
        self.next
    }

    /// The topic's segments; a topic directory gone is a topic deleted under the reader.
    fn list(&self) -> Result<Vec<(i64, PathBuf)>, FileLogError> {
        if dir_identity(&self.dir) != Some(self.dir_id) {
            return Err(FileLogError::Regressed { path: self.dir.clone(), next: self.next });
        }
        segments(&self.dir)
    }

    /// Opens a listed segment; `None` when it is gone meanwhile (a cleaner removed it).
    fn open_segment(
        &self,
        base: i64,
        path: &Path,
    ) -> Result<Option<(i64, u64, SegmentCursor)>, FileLogError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_error("opening", path)(err)),
        };
        let inode = file.metadata().map_err(io_error("reading", path))?.ino();
        Ok(Some((base, inode, SegmentCursor::at_start(path, file, base, false))))
    }

    /// The records appended whole since the last call, in order, up to about 4 MiB of them
    /// (call again until it returns none).
    pub fn read_new(&mut self) -> Result<Vec<Frame>, FileLogError> {
        // A segment listed and removed before it is opened (a cleaner at work) is listed again:
        // a few times at most, unless cleaners keep removing what is listed.
        let mut gone = 0;
        let mut retry = |path: &Path| {
            gone += 1;
            if gone > 100 {
                return Err(io_error("opening", path)(io::Error::from(io::ErrorKind::NotFound)));
            }
            Ok(())
        };
        loop {
            if self.current.is_none() {
                let listed = self.list()?;
                let Some((base, path)) = holding(&listed, self.next) else { return Ok(Vec::new()) };
                match self.open_segment(base, &path)? {
                    Some(opened) => self.current = Some(opened),
                    None => {
                        retry(&path)?;
                        continue;
                    }
                }
            }
            if let Some(frames) = self.read_current()? {
                return Ok(frames);
            }
            // At the end of the segment as read: listed after that read, a later segment means
            // the current one was complete before it was created, so one more read to its end
            // (after the listing) finds all that is left.
            let Some((base, inode, cursor)) = &self.current else { continue };
            let (base, inode) = (*base, *inode);
            // Looked at before the listing: a segment removed while it was the last means the
            // topic was deleted or recreated (compaction removes only segments before the last,
            // and the later one it needs is then listed).
            let unlinked = cursor.file.metadata().map_err(io_error("reading", &cursor.path))?.nlink() == 0;
            let path = cursor.path.clone();
            let listed = self.list()?;
            if !listed.iter().any(|(other, _)| *other > base) {
                if unlinked {
                    return Err(FileLogError::Regressed { path, next: self.next });
                }
                return Ok(Vec::new());
            }
            if let Some(frames) = self.read_current()? {
                return Ok(frames);
            }
            // Done with this segment: on with the one holding the next offset, unless that is
            // the file just read (a compaction's output read whole): then the next one.
            let Some((base_next, path)) = holding(&listed, self.next) else { return Ok(Vec::new()) };
            let Some(mut opened) = self.open_segment(base_next, &path)? else {
                retry(&path)?;
                continue;
            };
            if (opened.0, opened.1) == (base, inode) {
                let Some((after, path)) = listed.iter().find(|(other, _)| *other > base) else {
                    return Ok(Vec::new());
                };
                let Some(after) = self.open_segment(*after, path)? else {
                    retry(path)?;
                    continue;
                };
                opened = after;
            }
            self.current = Some(opened);
        }
    }

    /// The frames of the current segment from the next offset on (`Some`), or `None` at its
    /// end as read now.
    fn read_current(&mut self) -> Result<Option<Vec<Frame>>, FileLogError> {
        let Some((_, _, cursor)) = &mut self.current else { return Ok(None) };
        loop {
            let frames = cursor.read_new()?;
            if frames.is_empty() {
                return Ok(None);
            }
            let next = self.next;
            let frames: Vec<Frame> = frames.into_iter().filter(|frame| frame.offset >= next).collect();
            if let Some(last) = frames.last() {
                self.next = last.offset + 1;
                return Ok(Some(frames));
            }
        }
    }
}

/// The segment holding offset `next` (the greatest first offset at most `next`), else the first.
fn holding(listed: &[(i64, PathBuf)], next: i64) -> Option<(i64, PathBuf)> {
    listed.iter().rev().find(|(base, _)| *base <= next).or_else(|| listed.first()).cloned()
}

/// When each tombstone of a compacted segment was first compacted: lines `<offset> <ms>`, from
/// the file at `path` (none when it is missing; lines that do not parse are skipped: the worst a
/// damaged file does is restart a tombstone's retention).
fn read_cleaned(path: &Path) -> std::collections::HashMap<i64, i64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (offset, since) = line.split_once(' ')?;
            Some((offset.parse().ok()?, since.parse().ok()?))
        })
        .collect()
}

/// What a topic's cleaner keeps.
#[derive(Debug, Clone, Copy)]
pub enum Cleanup {
    /// The newest record of each key; a tombstone for `tombstones_ms` after its first
    /// compaction, like Kafka's `cleanup.policy=compact` with `delete.retention.ms`.
    Compact {
        /// How long a tombstone stays.
        tombstones_ms: i64,
    },
    /// Whole segments whose newest record is younger than `retention_ms`, like Kafka's
    /// `cleanup.policy=delete` with `retention.ms`.
    Delete {
        /// How long a record stays.
        retention_ms: i64,
    },
}

/// What a cleaning did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Segments read.
    pub segments: usize,
    /// Records read.
    pub read: usize,
    /// Records kept.
    pub kept: usize,
}

/// Cleans the topic directory `dir` by `cleanup` as of `now_ms`: compacts, or deletes old
/// segments, among all segments but the last (appenders write only to the last). Returns
/// `None` when another process is cleaning it, or there was nothing to do.
///
/// Never blocks appenders: it takes only the topic's cleaning lock. A compaction writes the
/// kept records of all its segments (offsets and timestamps unchanged) to a new file, syncs it
/// and renames it over the first of them, then removes the others: a crash in between leaves
/// records a reader skips as already read, never a gap.
pub fn clean(dir: &Path, cleanup: Cleanup, now_ms: i64) -> Result<Option<Cleaned>, FileLogError> {
    let lock_path = dir.join("clean.lock");
    let _lock = match lock(&lock_path, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err(FileLogError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    let mut listed = segments(dir)?;
    listed.pop();
    match cleanup {
        Cleanup::Delete { retention_ms } => {
            let mut removed = Cleaned::default();
            for (base, path) in &listed {
                let file = File::open(path).map_err(io_error("opening", path))?;
                let mut cursor = SegmentCursor::at_start(path, file, *base, false);
                let mut newest = i64::MIN;
                let mut read = 0;
                loop {
                    let frames = cursor.read_new()?;
                    if frames.is_empty() {
                        break;
                    }
                    read += frames.len();
                    newest = frames.iter().map(|frame| frame.timestamp_ms).fold(newest, i64::max);
                }
                if now_ms.saturating_sub(newest) <= retention_ms {
                    break;
                }
                std::fs::remove_file(path).map_err(io_error("removing", path))?;
                removed.segments += 1;
                removed.read += read;
            }
            if removed.segments == 0 {
                return Ok(None);
            }
            sync_dir(dir)?;
            Ok(Some(removed))
        }
        Cleanup::Compact { tombstones_ms } => {
            if listed.len() < 2 {
                return Ok(None);
            }
            let mut frames = Vec::new();
            for (base, path) in &listed {
                let file = File::open(path).map_err(io_error("opening", path))?;
                let mut cursor = SegmentCursor::at_start(path, file, *base, false);
                loop {
                    let (chunk, problem) = cursor.read_chunk()?;
                    if let Some(problem) = problem {
                        // Segments before the last end with whole frames.
                        let reason = match problem {
                            Stop::Torn => "a frame cut short in a segment before the last".to_owned(),
                            Stop::Damage(reason) => reason,
                        };
                        return Err(FileLogError::Damaged {
                            path: path.clone(),
                            at: cursor.position,
                            reason,
                        });
                    }
                    if chunk.is_empty() {
                        break;
                    }
                    frames.extend(chunk);
                }
            }
            let mut newest = std::collections::HashMap::new();
            for (index, frame) in frames.iter().enumerate() {
                newest.insert(frame.key.as_slice(), index);
            }
            // A tombstone's retention runs from its first compaction, as Kafka's
            // `delete.retention.ms` runs from its first cleaning: a reader that began before it
            // (and may have read the record it deletes from a file compacted since) meets it
            // if it reaches it within the retention. When each kept tombstone was first
            // compacted is in `<first>.cleaned` beside the output.
            let (first_base, first) = &listed[0];
            let cleaned_path = dir.join(format!("{first_base:020}.cleaned"));
            let first_cleaned = read_cleaned(&cleaned_path);
            let mut bytes = Vec::new();
            let mut cleaned = String::new();
            let mut kept = 0;
            for (index, frame) in frames.iter().enumerate() {
                if newest.get(frame.key.as_slice()) != Some(&index) {
                    continue;
                }
                if frame.value.is_none() {
                    let since = first_cleaned.get(&frame.offset).copied().unwrap_or(now_ms);
                    if now_ms.saturating_sub(since) > tombstones_ms {
                        continue;
                    }
                    cleaned.push_str(&format!("{} {since}\n", frame.offset));
                }
                frame.encode(&mut bytes)?;
                kept += 1;
            }
            // Put in place after the output, before the inputs go: a compaction that fails
            // before its output is in place records nothing; a crash between the two renames
            // leaves the old times (looked up by offset, still true) and none for the new
            // tombstones, whose retention then starts later (the safe side).
            let pending = dir.join(format!("{first_base:020}.cleaned.new"));
            write_synced(&pending, cleaned.as_bytes())?;
            let output = dir.join(format!("{first_base:020}.compacting"));
            write_synced(&output, &bytes)?;
            std::fs::rename(&output, first).map_err(io_error("renaming", &output))?;
            std::fs::rename(&pending, &cleaned_path).map_err(io_error("renaming", &pending))?;
            sync_dir(dir)?;
            for (_, path) in &listed[1..] {
                std::fs::remove_file(path).map_err(io_error("removing", path))?;
            }
            sync_dir(dir)?;
            Ok(Some(Cleaned { segments: listed.len(), read: frames.len(), kept }))
        }
    }
}

#[cfg(test)]
mod tests;
