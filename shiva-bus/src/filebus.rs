//! The file bus (issue 16): the same topics, keys, records, compaction and tombstone rules as
//! on Kafka, in files on one host's local disk ([`crate::filelog`]), for `--bus file:///DIR`.
//!
//! * `DIR/<topic name>/` holds one topic (the control topics and the logs topic);
//! * [`spawn_reader`]: a thread per reader that follows its topics with inotify (woken by a
//!   write, not by a timer) and answers a read-to-end by reading every file to its end: an
//!   acknowledged record is in its file before its acknowledgement;
//! * [`FilePublisher`]: a thread per publisher that appends what was queued, in queue order,
//!   one `fdatasync` per topic per batch (group commit), and acknowledges each record once it
//!   is durable;
//! * [`Cleaner`]: a node's background thread that compacts the control topics and drops old
//!   segments of the logs topic, taking only the topics' cleaning locks (appenders go on);
//! * [`check_local`]: the file bus is for one host; a network file system is refused.
//!
//! Invariant: what a record's acknowledgement promises on Kafka (`acks=all`) it promises here
//! against `kill -9` of any process: the record is in its file, synced, before its offset is
//! returned.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use shiva_proto::TopicKind;
use tokio::sync::{mpsc, oneshot};

use crate::filelog::{self, Cleanup, Cursor, FileLogError, Frame, TopicLog};
use crate::{BusConfig, BusError, ReaderEvent, Record};

/// How long a tombstone stays in a control topic (Kafka's `delete.retention.ms` default).
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How often a node's cleaner looks at the topics.
pub const CLEAN_EVERY: Duration = Duration::from_secs(10);

/// How long a reader waits for a change before it looks anyway (a missed or overflowed
/// inotify event costs at most this).
const IDLE_LOOK: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

fn file_error(err: FileLogError) -> BusError {
    BusError::File(err.to_string())
}

/// Why a file system of magic `magic` cannot hold the file bus, if it cannot: a network or
/// cluster file system, where `flock` and `fdatasync` do not mean what one host's disk makes
/// them mean, and where several hosts would share what is meant for one.
pub fn network_file_system(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "NFS",
        0x517b => "SMB",
        0xff53_4d42 => "CIFS",
        0xfe53_4d42 => "SMB2",
        0x0102_1997 => "9p",
        0x00c3_6400 => "CephFS",
        0x5346_414f => "AFS",
        0x7375_7245 => "Coda",
        0x0116_1970 => "GFS2",
        0x7461_636f => "OCFS2",
        0x0bd0_0bd0 => "Lustre",
        0x4750_4653 => "GPFS",
        0x1983_0326 => "BeeGFS",
        0x786f_4256 => "vboxsf (a VirtualBox shared folder)",
        0x6573_5546 => "FUSE (sshfs, GlusterFS, s3fs and the like)",
        _ => return None,
    })
}

/// Refuses a bus directory on a network file system (judged by its nearest existing ancestor).
pub fn check_local(dir: &Path) -> Result<(), BusError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent,
            None => break,
        }
    }
    let stats = nix::sys::statfs::statfs(probe).map_err(|err| {
        BusError::Invalid(format!(
            "--bus file://{}: cannot inspect {}: {err}",
            dir.display(),
            probe.display()
        ))
    })?;
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    let magic = stats.filesystem_type().0 as i64;
    match network_file_system(magic) {
        Some(kind) => Err(BusError::Invalid(format!(
            "--bus file://{}: {} is on {kind}, not a local disk file system; the file bus is for \
             one host and needs one (its locks and syncs must mean what this host's kernel makes \
             them mean: a network or FUSE file system may be shared by hosts, or answer a sync \
             before the data is safe): use a local directory, or Kafka (kafka://HOST:PORT) for a \
             cluster of several hosts",
            dir.display(),
            probe.display()
        ))),
        None => Ok(()),
    }
}

/// The directory of `topic` on the bus at `dir`.
fn topic_dir(dir: &Path, topic: &str) -> PathBuf {
    dir.join(topic)
}

/// Creates whatever topic is missing.
pub(crate) fn ensure_topics(config: &BusConfig, dir: &Path) -> Result<Vec<String>, BusError> {
    check_local(dir)?;
    for kind in TopicKind::ALL {
        TopicLog::open(dir, &config.topics.name(kind)).map_err(file_error)?;
    }
    Ok(Vec::new())
}

/// Creates the logs topic when missing.
pub(crate) fn ensure_logs_topic(config: &BusConfig, dir: &Path) -> Result<(), BusError> {
    TopicLog::open(dir, &config.topics.logs()).map_err(file_error)?;
    Ok(())
}

/// Checks that the cluster's control topics exist.
pub(crate) fn require_topics(config: &BusConfig, dir: &Path) -> Result<(), BusError> {
    let missing: Vec<String> = TopicKind::ALL
        .iter()
        .map(|kind| config.topics.name(*kind))
        .filter(|name| !topic_dir(dir, name).is_dir())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BusError::TopicsMissing { cluster: config.topics.cluster().to_owned(), missing })
    }
}

/// Wakes a thread blocked in [`wait`].
#[derive(Debug)]
pub(crate) struct Waker(EventFd);

impl Waker {
    fn new() -> Result<Waker, BusError> {
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map(Waker)
            .map_err(|err| BusError::File(format!("cannot create an eventfd: {err}")))
    }

    pub(crate) fn wake(&self) {
        let _ = self.0.write(1);
    }
}

/// Inotify watches on topic directories: woken by appends, new segments and cleanings.
struct Watch {
    inotify: Inotify,
    /// The watch of each directory, in the order given.
    watches: Vec<nix::sys::inotify::WatchDescriptor>,
}

impl Watch {
    fn new(dirs: &[&Path]) -> Result<Watch, BusError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|err| BusError::File(format!("cannot start inotify: {err}")))?;
        let flags = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE;
        let mut watches = Vec::new();
        for dir in dirs {
            watches.push(
                inotify
                    .add_watch(*dir, flags)
                    .map_err(|err| BusError::File(format!("cannot watch {}: {err}", dir.display())))?,
            );
        }
        Ok(Watch { inotify, watches })
    }

    /// Waits for a change, a wake-up or `timeout`, then drains what woke it; marks in `dirty`
    /// the directories that changed (all of them after a wake-up, a timeout or an overflow).
    fn wait(&self, waker: &Waker, timeout: Duration, dirty: &mut [bool]) {
        let mut fds = [
            PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(waker.0.as_fd(), PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let ready = poll(&mut fds, timeout).unwrap_or(0);
        let mut all = ready == 0 || waker.0.read().is_ok();
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                match self.watches.iter().position(|watch| *watch == event.wd) {
                    Some(index) => dirty[index] = true,
                    None => all = true,
                }
            }
        }
        if all {
            dirty.iter_mut().for_each(|dirty| *dirty = true);
        }
    }
}

/// What the reader of the control topics is asked.
pub(crate) enum Request {
    Sync(u64),
}

/// A file reader thread's handle: the requests' sender, the stop flag, the waker, the thread.
pub(crate) type ReaderHandle =
    (std_mpsc::Sender<Request>, Arc<AtomicBool>, Arc<Waker>, std::thread::JoinHandle<()>);

/// Starts a reader thread of `topics`.
pub(crate) fn spawn_reader(
    config: &BusConfig,
    dir: &Path,
    topics: &[TopicKind],
    events: mpsc::Sender<ReaderEvent>,
) -> Result<ReaderHandle, BusError> {
    let topics: Vec<(TopicKind, PathBuf)> =
        topics.iter().map(|kind| (*kind, topic_dir(dir, &config.topics.name(*kind)))).collect();
    let mut cursors = Vec::new();
    for (kind, path) in &topics {
        let cursor = Cursor::open(path).map_err(|_| BusError::TopicsMissing {
            cluster: config.topics.cluster().to_owned(),
            missing: vec![config.topics.name(*kind)],
        })?;
        cursors.push((*kind, config.topics.name(*kind), cursor));
    }
    let dirs: Vec<&Path> = topics.iter().map(|(_, path)| path.as_path()).collect();
    let watch = Watch::new(&dirs)?;
    let waker = Arc::new(Waker::new()?);
    let (requests, requests_rx) = std_mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_stop, thread_waker) = (stop.clone(), waker.clone());
    let thread = std::thread::Builder::new()
        .name("shiva-reader".into())
        .spawn(move || follow(cursors, watch, &thread_waker, &requests_rx, &events, &thread_stop))
        .map_err(|err| BusError::File(format!("failed to start the reader thread: {err}")))?;
    Ok((requests, stop, waker, thread))
}

/// The reader thread: every record of every topic, in order per topic; each read-to-end
/// answered after a pass that started after it was asked.
fn follow(
    mut cursors: Vec<(TopicKind, String, Cursor)>,
    watch: Watch,
    waker: &Waker,
    requests: &std_mpsc::Receiver<Request>,
    events: &mpsc::Sender<ReaderEvent>,
    stop: &AtomicBool,
) {
    // Not `blocking_send`: a reader dropped while its events are not read any more must not
    // hang in a full channel (its drop joins this thread).
    let send = |event| {
        let mut event = event;
        loop {
            match events.try_send(event) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    event = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    };
    let mut last_error: Option<String> = None;
    let mut dirty = vec![true; cursors.len()];
    while !stop.load(Ordering::Relaxed) {
        let tokens: Vec<u64> = std::iter::from_fn(|| match requests.try_recv() {
            Ok(Request::Sync(token)) => Some(token),
            Err(_) => None,
        })
        .collect();
        if !tokens.is_empty() {
            // A read-to-end reads every topic, in a pass that starts after it was asked.
            dirty.iter_mut().for_each(|dirty| *dirty = true);
        }
        let mut failure = None;
        for ((kind, name, cursor), dirty) in cursors.iter_mut().zip(dirty.iter_mut()) {
            if !*dirty {
                continue;
            }
            *dirty = false;
            loop {
                match cursor.read_new() {
                    Ok(frames) if frames.is_empty() => break,
                    Ok(frames) => {
                        for frame in frames {
                            if !send(ReaderEvent::Record(record(*kind, frame))) {
                                return;
                            }
                        }
                    }
                    Err(FileLogError::Regressed { next, .. }) => {
                        // As on Kafka: the records read no longer describe the topic; stop.
                        let end = topic_end(cursor.dir(), 0).unwrap_or(0);
                        let _ = send(ReaderEvent::Regressed { topic: name.clone(), position: next, end });
                        return;
                    }
                    Err(err) => {
                        failure = Some(err.to_string());
                        *dirty = true;
                        break;
                    }
                }
            }
        }
        match &failure {
            Some(message) => {
                if last_error.as_ref() != Some(message) && !send(ReaderEvent::Error(message.clone())) {
                    return;
                }
                for token in tokens {
                    if !send(ReaderEvent::SyncFailed(token, message.clone())) {
                        return;
                    }
                }
            }
            None => {
                for token in tokens {
                    if !send(ReaderEvent::Synced(token)) {
                        return;
                    }
                }
            }
        }
        last_error = failure;
        watch.wait(waker, IDLE_LOOK, &mut dirty);
    }
}

/// The end (next offset) of the topic in `dir`, read from offset `from`.
fn topic_end(dir: &Path, from: i64) -> Result<i64, FileLogError> {
    let mut cursor = Cursor::at(dir, from)?;
    while !cursor.read_new()?.is_empty() {}
    Ok(cursor.next_offset())
}

fn record(topic: TopicKind, frame: Frame) -> Record {
    Record {
        topic,
        offset: frame.offset,
        key: Some(frame.key),
        value: frame.value,
        timestamp_ms: Some(frame.timestamp_ms),
    }
}

/// One record to append, and where its outcome goes.
struct Job {
    topic: String,
    key: String,
    value: Option<Vec<u8>>,
    reply: oneshot::Sender<Result<i64, BusError>>,
}

enum Message {
    Append(Job),
    Flush(std_mpsc::Sender<()>),
}

/// A publisher on the file bus: a thread that appends in queue order.
#[derive(Debug)]
pub(crate) struct FilePublisher {
    jobs: std::sync::Mutex<std_mpsc::Sender<Message>>,
}

impl FilePublisher {
    /// `sync`: whether each batch is `fdatasync`ed before its records are acknowledged.
    pub(crate) fn new(
        config: &BusConfig,
        dir: &Path,
        name: &str,
        sync: bool,
    ) -> Result<FilePublisher, BusError> {
        let (jobs, queue) = std_mpsc::channel();
        let dir = dir.to_owned();
        let segment_bytes = config.file.segment_bytes;
        std::thread::Builder::new()
            .name(format!("shiva-{name}"))
            .spawn(move || append_loop(&dir, segment_bytes, sync, &queue))
            .map_err(|err| BusError::File(format!("failed to start the writer thread {name}: {err}")))?;
        Ok(FilePublisher { jobs: std::sync::Mutex::new(jobs) })
    }

    /// Queues a record now; the receiver gets its offset once it is durable.
    pub(crate) fn enqueue(
        &self,
        topic: String,
        key: &str,
        value: Option<&[u8]>,
    ) -> oneshot::Receiver<Result<i64, BusError>> {
        let (reply, answer) = oneshot::channel();
        let job = Job { topic, key: key.to_owned(), value: value.map(<[u8]>::to_vec), reply };
        // A send fails only once the thread is gone: the dropped reply says so.
        let _ = self.jobs.lock().expect("publisher lock").send(Message::Append(job));
        answer
    }

    /// Waits up to `timeout` for what was queued to be written.
    pub(crate) fn flush(&self, timeout: Duration) {
        let (done, wait) = std_mpsc::channel();
        if self.jobs.lock().expect("publisher lock").send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

/// The writer thread: takes everything queued, appends each run of records of one topic with
/// one sync, answers each record.
fn append_loop(dir: &Path, segment_bytes: u64, sync: bool, queue: &std_mpsc::Receiver<Message>) {
    let mut logs: BTreeMap<String, TopicLog> = BTreeMap::new();
    while let Ok(first) = queue.recv() {
        let mut batch: Vec<Job> = Vec::new();
        let mut flushes = Vec::new();
        for message in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match message {
                Message::Append(job) => batch.push(job),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() >= 1000 {
                break;
            }
        }
        let mut jobs = batch.into_iter().peekable();
        while let Some(job) = jobs.next() {
            let mut run = vec![job];
            while let Some(next) = jobs.next_if(|next| next.topic == run[0].topic) {
                run.push(next);
            }
            append_run(dir, segment_bytes, sync, &mut logs, run);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn append_run(
    dir: &Path,
    segment_bytes: u64,
    sync: bool,
    logs: &mut BTreeMap<String, TopicLog>,
    run: Vec<Job>,
) {
    // A record too large fails alone: the others go on.
    let (fit, large): (Vec<Job>, Vec<Job>) =
        run.into_iter().partition(|job| filelog::fits(job.key.len(), job.value.as_ref().map_or(0, Vec::len)));
    for job in large {
        let size = job.key.len() + job.value.as_ref().map_or(0, Vec::len);
        let message = format!("{size} bytes, above the file bus's {} bytes", filelog::MAX_BODY);
        let _ = job.reply.send(Err(BusError::TooLarge { key: job.key, message }));
    }
    let Some(topic) = fit.first().map(|job| job.topic.clone()) else { return };
    let outcome = (|| {
        if !logs.contains_key(&topic) {
            logs.insert(topic.clone(), TopicLog::open_with(dir, &topic, segment_bytes)?);
        }
        let log = logs.get_mut(&topic).expect("just opened");
        let records: Vec<(&[u8], Option<&[u8]>)> =
            fit.iter().map(|job| (job.key.as_bytes(), job.value.as_deref())).collect();
        log.append_with(&records, now_ms(), sync)
    })();
    match outcome {
        Ok(offsets) => {
            for (job, offset) in fit.into_iter().zip(offsets) {
                let _ = job.reply.send(Ok(offset));
            }
        }
        Err(err) => {
            // A failed append poisons its handle: the next one opens the topic again.
            logs.remove(&topic);
            for job in fit {
                let message = format!("failed to write '{}' to {topic}: {err}", job.key);
                let _ = job.reply.send(Err(BusError::File(message)));
            }
        }
    }
}

/// A node's cleaner of the file bus: compacts the control topics and drops old segments of
/// the logs topic every [`CLEAN_EVERY`]. Stops when dropped.
#[derive(Debug)]
pub struct Cleaner {
    stop: Option<std_mpsc::Sender<()>>,
}

impl Cleaner {
    /// Starts the cleaner of `config`'s bus: none on Kafka, where the broker cleans.
    pub fn start(config: &BusConfig, log_retention: Duration) -> Result<Option<Cleaner>, BusError> {
        match &config.kind {
            crate::BusKind::Kafka => Ok(None),
            crate::BusKind::File(dir) => Cleaner::start_in(config, dir, log_retention).map(Some),
        }
    }

    fn start_in(config: &BusConfig, dir: &Path, log_retention: Duration) -> Result<Cleaner, BusError> {
        let tombstones_ms = i64::try_from(config.file.tombstones.as_millis()).unwrap_or(i64::MAX);
        let every = config.file.clean_every;
        let retention_ms = i64::try_from(log_retention.as_millis()).unwrap_or(i64::MAX);
        let mut topics: Vec<(PathBuf, Cleanup)> = TopicKind::ALL
            .iter()
            .map(|kind| (topic_dir(dir, &config.topics.name(*kind)), Cleanup::Compact { tombstones_ms }))
            .collect();
        topics.push((topic_dir(dir, &config.topics.logs()), Cleanup::Delete { retention_ms }));
        let (stop, stopped) = std_mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("shiva-cleaner".into())
            .spawn(move || {
                while let Err(std_mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    for (path, cleanup) in &topics {
                        let started = std::time::Instant::now();
                        match filelog::clean(path, *cleanup, now_ms()) {
                            Ok(Some(cleaned)) => tracing::debug!(
                                topic = %path.display(),
                                segments = cleaned.segments,
                                read = cleaned.read,
                                kept = cleaned.kept,
                                elapsed = ?started.elapsed(),
                                "cleaned a file-bus topic"
                            ),
                            Ok(None) => {}
                            Err(err) => tracing::warn!(topic = %path.display(), error = %err, "cannot clean a file-bus topic"),
                        }
                    }
                }
            })
            .map_err(|err| BusError::File(format!("failed to start the cleaner thread: {err}")))?;
        Ok(Cleaner { stop: Some(stop) })
    }
}

impl Drop for Cleaner {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// Log records on the file bus carry Kafka's headers in their value: `run`, `stream` and
/// `node`, each a `u16` length and its bytes, then the output bytes.
pub(crate) fn encode_log_value(run: &str, stream: &str, node: &str, bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(bytes.len() + run.len() + stream.len() + node.len() + 6);
    for field in [run, stream, node] {
        let field = &field.as_bytes()[..field.len().min(usize::from(u16::MAX))];
        value.extend_from_slice(&u16::try_from(field.len()).unwrap_or(u16::MAX).to_le_bytes());
        value.extend_from_slice(field);
    }
    value.extend_from_slice(bytes);
    value
}

/// The inverse of [`encode_log_value`]: `(run, stream, node, bytes)`, `None` for a value that
/// does not decode.
pub(crate) fn decode_log_value(value: &[u8]) -> Option<(String, String, String, Vec<u8>)> {
    let mut rest = value;
    let mut fields = Vec::with_capacity(3);
    for _ in 0..3 {
        let len = usize::from(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]));
        let field = rest.get(2..2 + len)?;
        fields.push(String::from_utf8_lossy(field).into_owned());
        rest = &rest[2 + len..];
    }
    let node = fields.pop()?;
    let stream = fields.pop()?;
    let run = fields.pop()?;
    Some((run, stream, node, rest.to_vec()))
}

/// The logs topic's reader on the file bus.
pub(crate) struct FileLogReader {
    cursor: Cursor,
    pending: std::collections::VecDeque<Frame>,
    watch: Watch,
    waker: Waker,
    dir: PathBuf,
}

impl FileLogReader {
    pub(crate) fn new(config: &BusConfig, dir: &Path) -> Result<FileLogReader, BusError> {
        let dir = topic_dir(dir, &config.topics.logs());
        let cursor = Cursor::open(&dir).map_err(|_| BusError::TopicsMissing {
            cluster: config.topics.cluster().to_owned(),
            missing: vec![config.topics.logs()],
        })?;
        let watch = Watch::new(&[&dir])?;
        Ok(FileLogReader { cursor, pending: Default::default(), watch, waker: Waker::new()?, dir })
    }

    /// The topic's end (next offset).
    pub(crate) fn end(&self) -> Result<i64, BusError> {
        topic_end(&self.dir, self.cursor.next_offset()).map_err(file_error)
    }

    /// Reads from `offset` on.
    pub(crate) fn seek(&mut self, offset: i64) -> Result<(), BusError> {
        self.cursor = Cursor::at(&self.dir, offset).map_err(file_error)?;
        self.pending.clear();
        Ok(())
    }

    /// Where the next record comes from.
    pub(crate) fn position(&self) -> i64 {
        self.pending.front().map_or(self.cursor.next_offset(), |frame| frame.offset)
    }

    pub(crate) fn next(&mut self, timeout: Duration) -> Result<Option<crate::logs::LoggedChunk>, BusError> {
        if self.pending.is_empty() {
            self.pending.extend(self.cursor.read_new().map_err(file_error)?);
        }
        if self.pending.is_empty() {
            self.watch.wait(&self.waker, timeout, &mut [false]);
            self.pending.extend(self.cursor.read_new().map_err(file_error)?);
        }
        let Some(frame) = self.pending.pop_front() else { return Ok(None) };
        let (run, stream, node, bytes) = frame
            .value
            .as_deref()
            .and_then(decode_log_value)
            .unwrap_or_else(|| (String::new(), String::new(), String::new(), Vec::new()));
        Ok(Some(crate::logs::LoggedChunk {
            offset: frame.offset,
            timestamp_ms: Some(frame.timestamp_ms),
            task: String::from_utf8_lossy(&frame.key).into_owned(),
            run,
            stream,
            node,
            bytes,
        }))
    }
}

/// The node's sink of task output on the file bus: a bounded queue and a writer thread that
/// appends what is queued in batches (one sync per batch).
/// A queued chunk: its key, its value, and who to tell once it is written.
type QueuedChunk = (String, Vec<u8>, Option<crate::logs::Ack>);

pub(crate) struct FileLogSink {
    queue: std_mpsc::SyncSender<Option<QueuedChunk>>,
    flushed: Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
    sent: std::sync::atomic::AtomicU64,
}

impl FileLogSink {
    pub(crate) fn new(config: &BusConfig, dir: &Path) -> Result<FileLogSink, BusError> {
        let topic = config.topics.logs();
        let segment_bytes = config.file.segment_bytes;
        let mut log = TopicLog::open_with(dir, &topic, segment_bytes).map_err(file_error)?;
        let (queue, chunks) = std_mpsc::sync_channel::<Option<QueuedChunk>>(20_000);
        let flushed = Arc::new((std::sync::Mutex::new(0u64), std::sync::Condvar::new()));
        let done = flushed.clone();
        let dir = dir.to_owned();
        std::thread::Builder::new()
            .name("shiva-logs".into())
            .spawn(move || {
                while let Ok(Some(first)) = chunks.recv() {
                    let mut batch = vec![first];
                    let mut stop = false;
                    while batch.len() < 2000 {
                        match chunks.try_recv() {
                            Ok(Some(chunk)) => batch.push(chunk),
                            Ok(None) => {
                                stop = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let records: Vec<(&[u8], Option<&[u8]>)> = batch
                        .iter()
                        .map(|(key, value, _)| (key.as_bytes(), Some(value.as_slice())))
                        .collect();
                    if let Err(err) = log.append(&records, now_ms()) {
                        tracing::warn!(error = %err, lines = batch.len(), "task output not shipped");
                        match TopicLog::open_with(&dir, &topic, segment_bytes) {
                            Ok(fresh) => log = fresh,
                            Err(err) => tracing::warn!(error = %err, "cannot open the logs topic again"),
                        }
                    }
                    // Written, or failed for good (logged above): done either way.
                    for (_, _, ack) in batch.iter_mut() {
                        if let Some(ack) = ack.take() {
                            ack.done();
                        }
                    }
                    let (count, changed) = &*done;
                    *count.lock().expect("flush lock") += batch.len() as u64;
                    changed.notify_all();
                    if stop {
                        break;
                    }
                }
            })
            .map_err(|err| BusError::File(format!("failed to start the logs writer: {err}")))?;
        Ok(FileLogSink { queue, flushed, sent: Default::default() })
    }

    /// Queues a chunk; `Err(true)`: the queue is full.
    pub(crate) fn send(&self, task: &str, value: Vec<u8>, ack: Option<crate::logs::Ack>) -> Result<(), bool> {
        match self.queue.try_send(Some((task.to_owned(), value, ack))) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(std_mpsc::TrySendError::Full(_)) => Err(true),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(false),
        }
    }

    /// Waits up to `timeout` until what was queued is written.
    pub(crate) fn flush(&self, timeout: Duration) {
        let sent = self.sent.load(Ordering::Relaxed);
        let (count, changed) = &*self.flushed;
        let guard = count.lock().expect("flush lock");
        let _ = changed.wait_timeout_while(guard, timeout, |written| *written < sent);
    }
}

impl Drop for FileLogSink {
    fn drop(&mut self) {
        let _ = self.queue.try_send(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_file_systems_are_named_and_local_ones_pass() {
        assert_eq!(network_file_system(0x6969), Some("NFS"));
        assert_eq!(network_file_system(0xff53_4d42), Some("CIFS"));
        assert!(network_file_system(0x6573_5546).unwrap().starts_with("FUSE"));
        for local in [0xef53, 0x9123_683e, 0x5846_5342, 0x0102_1994, 0x794c_7630] {
            assert_eq!(network_file_system(local), None, "{local:#x}: ext4, btrfs, xfs, tmpfs, overlayfs");
        }
        check_local(&std::env::temp_dir().join("shiva-not-yet/bus")).unwrap();
    }

    #[test]
    fn log_values_carry_their_headers() {
        let value = encode_log_value("r1", "stderr", "n2", b"line\n");
        assert_eq!(
            decode_log_value(&value),
            Some(("r1".into(), "stderr".into(), "n2".into(), b"line\n".to_vec()))
        );
        assert_eq!(decode_log_value(&[5, 0, b'a']), None);
    }
}
