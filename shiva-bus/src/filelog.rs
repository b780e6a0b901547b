//! One topic of the file bus (issue 16): an append-only file of framed records that several
//! processes of one host share, with the offsets, keys and tombstones of a Kafka partition.
//!
//! Invariants:
//! * **Acknowledged means durable.** [`TopicLog::append`] returns only once its frames are
//!   written whole and `fdatasync`ed: a record acknowledged to a writer survives `kill -9` of any
//!   process (and a power cut, as far as the disk keeps its word).
//! * **Appends never interleave.** An appender holds an exclusive `flock` on the topic's lock
//!   file from reading the tail to its `fdatasync`, and writes at the end of the file
//!   (`O_APPEND`): two processes appending at once write one after the other.
//! * **Offsets are stable and total.** Each frame carries its offset; they are dense and
//!   increasing in file order (the next one is the last frame's plus one), so a reader resumes
//!   at an offset, as on Kafka.
//! * **A torn tail is cut, and said so.** A frame whose length or checksum does not check at
//!   the end of the file (its writer died mid-write: it was never acknowledged) is cut by the
//!   next appender, under the lock, with a warning. Readers never cut: an incomplete frame at the
//!   tail is, for them, a frame not written yet.
//!
//! Frame (little endian): `len u32` (of what follows the checksum), `crc u32` (CRC-32 of what
//! follows it), `offset i64`, `timestamp_ms i64`, `key_len u32`, `value_len i32` (`-1`: a
//! tombstone), key bytes, value bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Bytes before the frame's body: its length and checksum.
const PREFIX: usize = 8;
/// The body's fixed part: offset, timestamp, key length, value length.
const FIXED: usize = 24;
/// The largest frame body accepted (a record is at most 1 MiB in Shiva; a key at most 64 KiB).
pub const MAX_BODY: usize = (1 << 20) + (1 << 16) + FIXED;

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
        if value_len < -1 || FIXED + key_len + value_bytes != len {
            return Err("frame lengths that do not add up");
        }
        let key = body[FIXED..FIXED + key_len].to_vec();
        let value = (value_len >= 0).then(|| body[FIXED + key_len..].to_vec());
        Ok(Some((Frame { offset, timestamp_ms, key, value }, PREFIX + len)))
    }
}

/// A topic file, opened for appending.
pub struct TopicLog {
    path: PathBuf,
    lock_path: PathBuf,
    /// The topic file, in append mode.
    file: File,
    /// The end of the file and the next offset as of this handle's last look (under the lock);
    /// the frames after it (other processes' appends) are read at the next append.
    end: u64,
    next: i64,
}

impl TopicLog {
    /// Opens (creating) `<dir>/<topic>.log` and its lock file.
    pub fn open(dir: &Path, topic: &str) -> Result<TopicLog, FileLogError> {
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        let path = dir.join(format!("{topic}.log"));
        let lock_path = dir.join(format!("{topic}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        Ok(TopicLog { path, lock_path, file, end: 0, next: 0 })
    }

    /// The topic file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records` (key, value; `None`: a tombstone) stamped `timestamp_ms`, in order, and
    /// returns their offsets once they are durable.
    pub fn append(
        &mut self,
        records: &[(&[u8], Option<&[u8]>)],
        timestamp_ms: i64,
    ) -> Result<Vec<i64>, FileLogError> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(io_error("opening", &self.lock_path))?;
        let _lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error("locking", &self.lock_path)(io::Error::from(errno)))?;
        self.catch_up()?;
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(records.len());
        for (key, value) in records {
            let frame = Frame {
                offset: self.next,
                timestamp_ms,
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            };
            frame.encode(&mut bytes)?;
            offsets.push(self.next);
            self.next += 1;
        }
        let written = self.file.write_all(&bytes).and_then(|()| self.file.sync_data());
        if let Err(err) = written {
            // What was written (part of it, maybe) is a torn tail: the next append cuts it.
            self.next -= i64::try_from(records.len()).unwrap_or(0);
            return Err(io_error("appending to", &self.path)(err));
        }
        self.end += bytes.len() as u64;
        Ok(offsets)
    }

    /// Reads the frames other processes appended since this handle's last look, and cuts a
    /// torn tail. Called with the lock held.
    fn catch_up(&mut self) -> Result<(), FileLogError> {
        let len = self.file.metadata().map_err(io_error("reading the size of", &self.path))?.len();
        if len == self.end {
            return Ok(());
        }
        if len < self.end {
            // Shorter than last seen: cut by another appender (a torn tail after our look
            // cannot be: we looked under the lock) or replaced; read it all again.
            self.end = 0;
            self.next = 0;
        }
        let mut reader = File::open(&self.path).map_err(io_error("opening", &self.path))?;
        reader.seek(SeekFrom::Start(self.end)).map_err(io_error("seeking in", &self.path))?;
        let mut tail = Vec::new();
        reader.read_to_end(&mut tail).map_err(io_error("reading", &self.path))?;
        let mut at = 0;
        let mut problem = None;
        while at < tail.len() {
            match Frame::decode(&tail[at..]) {
                Ok(Some((frame, size))) => {
                    self.next = frame.offset + 1;
                    at += size;
                }
                Ok(None) => {
                    problem = Some("an incomplete frame");
                    break;
                }
                Err(reason) => {
                    problem = Some(reason);
                    break;
                }
            }
        }
        let good = self.end + at as u64;
        if let Some(reason) = problem {
            // Under the lock nobody is writing: what does not check is a torn write of a
            // writer that died before its acknowledgement.
            tracing::warn!(
                file = %self.path.display(),
                at = good,
                cut = len - good,
                reason,
                "cutting a torn write at the end of a file-bus topic (its writer died mid-write; it was never acknowledged)"
            );
            let cut =
                OpenOptions::new().write(true).open(&self.path).map_err(io_error("opening", &self.path))?;
            cut.set_len(good).and_then(|()| cut.sync_all()).map_err(io_error("cutting", &self.path))?;
        }
        self.end = good;
        Ok(())
    }
}

/// A reader of a topic file from a byte position: frames in order, stopping (for now) at the
/// end or at a frame not wholly written yet.
pub struct Cursor {
    path: PathBuf,
    file: File,
    /// Byte position of the next frame.
    position: u64,
}

impl Cursor {
    /// A cursor at the start of `path`.
    pub fn open(path: &Path) -> Result<Cursor, FileLogError> {
        let file = File::open(path).map_err(io_error("opening", path))?;
        Ok(Cursor { path: path.to_owned(), file, position: 0 })
    }

    /// The frames written whole since the last call, in order. A frame not whole yet, or not
    /// checking, ends the batch: its writer is still writing it, or died (then the next
    /// appender cuts it and writes over it), and it is read again from its start next time.
    pub fn read_new(&mut self) -> Result<Vec<Frame>, FileLogError> {
        self.file.seek(SeekFrom::Start(self.position)).map_err(io_error("seeking in", &self.path))?;
        let mut bytes = Vec::new();
        self.file.read_to_end(&mut bytes).map_err(io_error("reading", &self.path))?;
        let mut frames = Vec::new();
        let mut at = 0;
        while let Ok(Some((frame, size))) = Frame::decode(&bytes[at..]) {
            frames.push(frame);
            at += size;
        }
        self.position += at as u64;
        Ok(frames)
    }
}

#[cfg(test)]
mod tests;
