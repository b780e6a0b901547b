//! A run's captured output, on disk: the shim splits the task's stdout and stderr into lines
//! and appends them to numbered segment files `<dir>/<run>.<n>.log`, starting a new segment past
//! `segment_bytes` and deleting the oldest beyond `keep`. The node tails the segments and ships
//! each line to the `logs` topic (see [`crate::logship`]).
//!
//! One record per line of the file: a stream byte (`o` stdout, `e` stderr), a flag byte (` `
//! the line ended with a newline, `~` it did not: the output ended first), the line's bytes as
//! written (any bytes but `\n`), then `\n`. A line longer than `max_line` keeps its first
//! `max_line` bytes followed by ` [shiva: line truncated, N bytes dropped]`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where and how a run's output is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLog {
    /// Directory of the task's segments.
    pub dir: PathBuf,
    /// The run (segment names start with it).
    pub run: String,
    /// A segment past this size is closed and a new one started.
    pub segment_bytes: u64,
    /// Segments kept per run (the oldest go first).
    pub keep: u32,
    /// Longest line kept whole.
    pub max_line: usize,
}

impl RunLog {
    /// The path of segment `n`.
    pub fn segment(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{}.{n}.log", self.run))
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl Stream {
    /// The name in record headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One captured line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Its stream.
    pub stream: Stream,
    /// Whether it ended with a newline.
    pub eol: bool,
    /// Its bytes (without the newline).
    pub bytes: Vec<u8>,
}

/// Appends lines to a run's segments (the shim's side).
#[derive(Debug)]
pub struct SegmentWriter {
    log: RunLog,
    current: u64,
    file: File,
    size: u64,
}

impl SegmentWriter {
    /// Starts segment 0.
    pub fn create(log: RunLog) -> io::Result<SegmentWriter> {
        fs::create_dir_all(&log.dir)?;
        let file = OpenOptions::new().create(true).append(true).open(log.segment(0))?;
        Ok(SegmentWriter { log, current: 0, file, size: 0 })
    }

    /// Removes the segment made for a run that never started (a staged start called off), if
    /// nothing was written to it.
    pub fn remove_if_empty(self) {
        let segment = self.log.segment(self.current);
        if self.file.metadata().is_ok_and(|meta| meta.len() == 0) {
            let _ = fs::remove_file(segment);
        }
    }

    /// Appends one line (one `write`, so a reader never sees half of it... nearly: it checks).
    pub fn append(&mut self, line: &Line) -> io::Result<()> {
        let mut record = Vec::with_capacity(line.bytes.len() + 3);
        record.push(match line.stream {
            Stream::Stdout => b'o',
            Stream::Stderr => b'e',
        });
        record.push(if line.eol { b' ' } else { b'~' });
        record.extend_from_slice(&line.bytes);
        record.push(b'\n');
        if self.size > 0 && self.size + record.len() as u64 > self.log.segment_bytes {
            self.rotate()?;
        }
        self.file.write_all(&record)?;
        self.size += record.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.current += 1;
        self.file = OpenOptions::new().create(true).append(true).open(self.log.segment(self.current))?;
        self.size = 0;
        if let Some(old) = self.current.checked_sub(self.log.keep as u64) {
            let _ = fs::remove_file(self.log.segment(old));
        }
        Ok(())
    }
}

/// Splits a byte stream into lines, truncating long ones.
#[derive(Debug)]
pub struct Splitter {
    stream: Stream,
    max_line: usize,
    line: Vec<u8>,
    dropped: u64,
}

impl Splitter {
    /// A splitter for `stream`.
    pub fn new(stream: Stream, max_line: usize) -> Splitter {
        Splitter { stream, max_line, line: Vec::new(), dropped: 0 }
    }

    /// Takes in `bytes`; returns the lines they complete.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !bytes.is_empty() {
            let end = bytes.iter().position(|b| *b == b'\n');
            let chunk = &bytes[..end.unwrap_or(bytes.len())];
            let room = self.max_line.saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.dropped += chunk.len().saturating_sub(room) as u64;
            match end {
                Some(end) => {
                    lines.push(self.take(true));
                    bytes = &bytes[end + 1..];
                }
                None => bytes = &[],
            }
        }
        lines
    }

    /// The stream ended: the last line without a newline, if any.
    pub fn finish(&mut self) -> Option<Line> {
        (!self.line.is_empty() || self.dropped > 0).then(|| self.take(false))
    }

    fn take(&mut self, eol: bool) -> Line {
        let mut bytes = std::mem::take(&mut self.line);
        if self.dropped > 0 {
            bytes.extend_from_slice(
                format!(" [shiva: line truncated, {} bytes dropped]", self.dropped).as_bytes(),
            );
            self.dropped = 0;
        }
        Line { stream: self.stream, eol, bytes }
    }
}

/// The task's output pipes, read by the shim's one thread (non-blocking) into its segments.
#[derive(Debug)]
pub struct Capture {
    pipes: Vec<(File, Splitter, bool)>,
    writer: SegmentWriter,
}

impl Capture {
    /// Captures `pipes` (made non-blocking) into `writer`.
    pub fn new(
        writer: SegmentWriter,
        pipes: Vec<(std::os::fd::OwnedFd, Stream)>,
        max_line: usize,
    ) -> io::Result<Capture> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let mut open = Vec::new();
        for (fd, stream) in pipes {
            fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
            open.push((File::from(fd), Splitter::new(stream, max_line), true));
        }
        Ok(Capture { pipes: open, writer })
    }

    /// The pipes still open, for `poll`.
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.pipes.iter().filter(|(_, _, open)| *open).map(|(file, _, _)| file.as_fd()).collect()
    }

    /// Whether every pipe reached its end.
    pub fn done(&self) -> bool {
        self.pipes.iter().all(|(_, _, open)| !open)
    }

    /// Reads whatever is waiting in the pipes, without blocking.
    pub fn pump(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        for (file, splitter, open) in &mut self.pipes {
            while *open {
                match file.read(&mut buf) {
                    Ok(0) => {
                        *open = false;
                        if let Some(line) = splitter.finish() {
                            let _ = self.writer.append(&line);
                        }
                    }
                    Ok(n) => {
                        for line in splitter.push(&buf[..n]) {
                            let _ = self.writer.append(&line);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => *open = false,
                }
            }
        }
    }

    /// Reads until every pipe reached its end (all writers are gone), at most until `deadline`
    /// (boot-time ms, per `now`).
    pub fn drain(&mut self, deadline: i64, now: impl Fn() -> i64) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            self.pump();
            let left = deadline - now();
            if self.done() || left <= 0 {
                return;
            }
            let fds = self.fds();
            let mut polled: Vec<PollFd<'_>> =
                fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
            let _ = poll(&mut polled, PollTimeout::from(left.clamp(1, 100) as u16));
        }
    }
}

/// Follows a run's segments (the node's side): returns whole records as they appear.
#[derive(Debug)]
pub struct SegmentReader {
    log: RunLog,
    current: u64,
    file: Option<File>,
    pending: Vec<u8>,
    /// Bytes of the current segment read so far.
    offset: u64,
}

/// What a read found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Whole lines, in order.
    pub lines: Vec<Line>,
    /// Segments that were deleted before they were read (lines lost to the rotation).
    pub skipped_segments: u64,
}

impl SegmentReader {
    /// Starts at segment 0.
    pub fn new(log: RunLog) -> SegmentReader {
        SegmentReader { log, current: 0, file: None, pending: Vec::new(), offset: 0 }
    }

    /// Starts at `position` (from [`SegmentReader::position`]): the record that begins there.
    pub fn at(log: RunLog, (segment, offset): (u64, u64)) -> SegmentReader {
        use std::io::Seek;
        let mut reader = SegmentReader { current: segment, ..SegmentReader::new(log) };
        if let Ok(mut file) = File::open(reader.log.segment(segment))
            && file.seek(std::io::SeekFrom::Start(offset)).is_ok()
        {
            reader.file = Some(file);
            reader.offset = offset;
        }
        reader
    }

    /// Where the next whole record begins: its segment and its offset in it.
    pub fn position(&self) -> (u64, u64) {
        (self.current, self.offset.saturating_sub(self.pending.len() as u64))
    }

    /// Reads what is new, at most about `budget` bytes.
    pub fn read(&mut self, budget: usize) -> Batch {
        let mut batch = Batch::default();
        let mut read = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.file.is_none() {
                match File::open(self.log.segment(self.current)) {
                    Ok(file) => self.file = Some(file),
                    Err(_) => {
                        // Rotated away unread? Go on with the oldest later segment still there.
                        let Some(next) = self.next_existing() else { return batch };
                        batch.skipped_segments += next.saturating_sub(self.current);
                        self.current = next;
                        self.offset = 0;
                        self.pending.clear();
                        continue;
                    }
                }
            }
            let file = self.file.as_mut().expect("opened above");
            let n = file.read(&mut buf).unwrap_or(0);
            self.offset += n as u64;
            if n > 0 {
                read += n;
                self.take_in(&buf[..n], &mut batch.lines);
                if read >= budget {
                    return batch;
                }
                continue;
            }
            // At the end of this segment: move on only once a later one exists (the writer
            // has finished this one: it writes whole records before it rotates); segments in
            // between were rotated away unread. While this segment is still linked and the
            // next one does not exist, the writer is still on this one: nothing to look for.
            let next = if self.log.segment(self.current.saturating_add(1)).exists() {
                Some(self.current.saturating_add(1))
            } else if file.metadata().is_ok_and(|meta| std::os::unix::fs::MetadataExt::nlink(&meta) == 0) {
                self.next_existing()
            } else {
                None
            };
            let Some(next) = next else { return batch };
            let file = self.file.as_mut().expect("opened above");
            let n = file.read(&mut buf).unwrap_or(0);
            self.offset += n as u64;
            if n > 0 {
                self.take_in(&buf[..n], &mut batch.lines);
                continue;
            }
            batch.skipped_segments += next.saturating_sub(self.current).saturating_sub(1);
            self.current = next;
            self.file = None;
            self.offset = 0;
            self.pending.clear();
        }
    }

    fn take_in(&mut self, bytes: &[u8], lines: &mut Vec<Line>) {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let record: Vec<u8> = self.pending.drain(..=end).collect();
            if let Some(line) = decode(&record[..record.len() - 1]) {
                lines.push(line);
            }
        }
    }

    /// The first segment after the current one that still exists.
    fn next_existing(&self) -> Option<u64> {
        let first = self.current.saturating_add(1);
        (first..=first.saturating_add(u64::from(self.log.keep)).saturating_add(64))
            .find(|n| self.log.segment(*n).exists())
    }
}

fn decode(record: &[u8]) -> Option<Line> {
    let stream = match record.first()? {
        b'o' => Stream::Stdout,
        b'e' => Stream::Stderr,
        _ => return None,
    };
    let eol = *record.get(1)? != b'~';
    Some(Line { stream, eol, bytes: record[2..].to_vec() })
}

/// Deletes the segments of runs other than the newest `keep_runs` in `dir` (by modification
/// time), so finished runs do not fill the disk.
pub fn prune(dir: &Path, keep_runs: usize) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut runs: std::collections::BTreeMap<String, std::time::SystemTime> = Default::default();
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(run) = name.split('.').next().map(str::to_owned) else { continue };
        let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        let newest = runs.entry(run.clone()).or_insert(modified);
        *newest = (*newest).max(modified);
        files.push((run, entry.path()));
    }
    let mut order: Vec<(std::time::SystemTime, String)> =
        runs.into_iter().map(|(run, at)| (at, run)).collect();
    order.sort();
    let old: std::collections::BTreeSet<String> =
        order.iter().rev().skip(keep_runs).map(|(_, run)| run.clone()).collect();
    for (run, path) in files {
        if old.contains(&run) {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path, segment_bytes: u64) -> RunLog {
        RunLog { dir: dir.to_path_buf(), run: "r1".into(), segment_bytes, keep: 3, max_line: 16 }
    }

    #[test]
    fn lines_split_truncate_and_keep_a_last_partial_line() {
        let mut splitter = Splitter::new(Stream::Stdout, 8);
        let lines = splitter.push(b"ab\ncd\xff\xfe\nthis line is long\npart");
        let text: Vec<&[u8]> = lines.iter().map(|l| l.bytes.as_slice()).collect();
        assert_eq!(text[0], b"ab");
        assert_eq!(text[1], b"cd\xff\xfe", "bytes are kept as they are");
        assert_eq!(text[2], b"this lin [shiva: line truncated, 9 bytes dropped]");
        assert!(lines.iter().all(|l| l.eol));
        assert_eq!(splitter.push(b"ial"), vec![]);
        let last = splitter.finish().unwrap();
        assert_eq!((last.bytes.as_slice(), last.eol), (&b"partial"[..], false));
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn a_reader_started_at_another_readers_position_reads_on_from_there_exactly() {
        let dir = std::env::temp_dir().join(format!("shiva-runlog-at-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut writer = SegmentWriter::create(log(&dir, 40)).unwrap();
        let line =
            |i: usize| Line { stream: Stream::Stdout, eol: true, bytes: format!("line {i}").into_bytes() };
        for i in 0..5 {
            writer.append(&line(i)).unwrap();
        }
        let mut first = SegmentReader::new(log(&dir, 40));
        assert_eq!(first.read(usize::MAX).lines, (0..5).map(line).collect::<Vec<_>>());
        let position = first.position();
        // More is written (across a rotation) before the next process reads on.
        for i in 5..9 {
            writer.append(&line(i)).unwrap();
        }
        let mut next = SegmentReader::at(log(&dir, 40), position);
        assert_eq!(
            next.read(usize::MAX).lines,
            (5..9).map(line).collect::<Vec<_>>(),
            "nothing twice, nothing lost"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_reader_follows_rotations_in_order_and_reports_segments_it_lost() {
        let dir = std::env::temp_dir().join(format!("shiva-runlog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut writer = SegmentWriter::create(log(&dir, 40)).unwrap();
        let mut reader = SegmentReader::new(log(&dir, 40));
        let line = |i: usize| Line {
            stream: Stream::Stderr,
            eol: i.is_multiple_of(2),
            bytes: format!("line {i}").into_bytes(),
        };
        for i in 0..10 {
            writer.append(&line(i)).unwrap();
        }
        let batch = reader.read(usize::MAX);
        assert_eq!(batch.lines, (0..10).map(line).collect::<Vec<_>>());
        assert_eq!(batch.skipped_segments, 0);
        // The reader falls far behind: older segments are deleted before it reads them.
        for i in 10..40 {
            writer.append(&line(i)).unwrap();
        }
        let batch = reader.read(usize::MAX);
        assert!(batch.skipped_segments > 0);
        assert_eq!(batch.lines.last(), Some(&line(39)));
        let _ = fs::remove_dir_all(&dir);
    }
}
