//! Shipping task output to the `logs` topic: one follower per run tails the run's segments (see
//! [`crate::runlog`]) and sends each line through the node's log producer, which has a client of
//! its own. Each task has a byte budget per second (`--log-rate`, with a burst of two seconds'
//! worth): a flooding task's lines wait on disk, never in front of a heartbeat. Lines that
//! rotate away before they could be shipped are replaced by one line saying so.
//!
//! Invariant: a follower notes how far it shipped (`<run>.shipped`) only up to the end of a batch
//! whose every record is done (acknowledged by the bus, or failed for good and logged), so a node
//! killed at any moment ships on, in its next process, from a point before which nothing is
//! lost; what was delivered after the noted point is shipped again (at most a poll's worth).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shiva_bus::logs::{Ack, Acks, LogChunk, LogSink};
use tokio::sync::oneshot;
use tracing::warn;

use crate::runlog::{Line, RunLog, SegmentReader, Stream};

pub mod watch;

/// How often a follower looks for new output: soon after output, then less and less often while
/// the run is quiet.
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(1);
/// How often a follower woken by the watch (see [`watch`]) looks anyway.
const WATCHED_POLL: Duration = Duration::from_secs(30);
/// How long a detaching follower waits for its records in flight to be done.
const DETACH_WAIT: Duration = Duration::from_millis(400);
/// How long the follower of a run that is over waits for its last records to be done (the
/// producer gives up on a record after 60 s).
const OVER_WAIT: Duration = Duration::from_secs(90);
/// Each record costs its bytes plus this.
const RECORD_COST: u64 = 64;
/// Lines of one stream are shipped together up to about this many bytes per record.
const CHUNK: usize = 64 * 1024;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket { tokens: burst, at: now }
    }

    /// Takes `cost` at `now` with `rate` per second refilled up to `burst`; returns how long to
    /// wait before the cost is covered (zero: at once).
    pub fn take(&mut self, cost: f64, rate: f64, burst: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        self.tokens -= cost;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / rate) }
    }
}

/// The node's log shipping.
pub struct LogShipper {
    sink: LogSink,
    /// Bytes per second per task.
    rate: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    metrics: Option<Arc<crate::api::Metrics>>,
    /// Cancelled when the node detaches from its runs (see [`LogShipper::detach`]).
    detaching: tokio_util::sync::CancellationToken,
    /// Followers alive.
    following: Arc<std::sync::atomic::AtomicUsize>,
    /// Wakes followers when their output grows (`None`: they poll).
    watch: Option<Arc<watch::DirWatch>>,
}

impl std::fmt::Debug for LogShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogShipper").field("rate", &self.rate).finish()
    }
}

impl LogShipper {
    /// Ships through `sink`, `rate` bytes per second per task.
    pub fn new(sink: LogSink, rate: u64) -> LogShipper {
        LogShipper {
            sink,
            rate: rate.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
            metrics: None,
            detaching: Default::default(),
            following: Default::default(),
            watch: None,
        }
    }

    /// Wakes followers through inotify instead of polling, when the machine has it.
    pub fn with_watch(mut self) -> LogShipper {
        self.watch = watch::DirWatch::start();
        self
    }

    /// Counts its delays and drops in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::api::Metrics>) -> LogShipper {
        self.metrics = Some(metrics);
        self
    }

    fn wait_for(&self, task: &str, cost: u64) -> Duration {
        let now = Instant::now();
        let burst = self.rate * 2.0;
        let mut buckets = self.buckets.lock().expect("buckets");
        let bucket = buckets.entry(task.to_owned()).or_insert_with(|| Bucket::full(burst, now));
        bucket.take(cost as f64, self.rate, burst, now)
    }

    /// Queues `line`, numbered `ack.seq` for its follower (told once it is done: delivered, or
    /// given up). `false`: not queued, the node detaches (`ack` is never told).
    async fn send(&self, line: LogChunk<'_>, ack: Ack) -> bool {
        let began = Instant::now();
        let wait = self.wait_for(line.task, line.bytes.len() as u64 + RECORD_COST);
        if !wait.is_zero() && !self.pause(wait).await {
            return false;
        }
        for _ in 0..500 {
            match self.sink.send(line, Some(ack.clone())) {
                sent @ (Ok(()) | Err(false)) => {
                    // Refused (too large…): it will never be delivered, so it is done now.
                    if sent.is_err() {
                        ack.done();
                    }
                    if let Some(metrics) = &self.metrics {
                        crate::api::Metrics::observe(&metrics.log_shipping_delay, began.elapsed());
                    }
                    return true;
                }
                Err(true) => {
                    if !self.pause(Duration::from_millis(20)).await {
                        return false;
                    }
                }
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.log_dropped.inc();
        }
        ack.done();
        warn!(task = line.task, run = line.run, "the logs producer stayed full for 10s; output was dropped");
        true
    }

    /// Sleeps `how_long`; `false` when the node detaches meanwhile.
    async fn pause(&self, how_long: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(how_long) => true,
            _ = self.detaching.cancelled() => false,
        }
    }

    /// Follows run `log` of `task`, from where an earlier process of the node left it (see
    /// [`shipped_path`]), until the returned sender fires (the run is over) and everything
    /// written is shipped, or until the node detaches (see [`LogShipper::detach`]).
    pub fn follow(self: &Arc<Self>, task: String, log: RunLog) -> oneshot::Sender<()> {
        let (ended_tx, mut ended) = oneshot::channel();
        let this = self.clone();
        let following = Following::start(&self.following);
        tokio::spawn(async move {
            let _following = following;
            let run = log.run.clone();
            let shipped = shipped_path(&log);
            let from = std::fs::read_to_string(&shipped).ok().and_then(|text| {
                let mut words = text.split_whitespace().map(|word| word.parse::<u64>().ok());
                Some((words.next()??, words.next()??))
            });
            // Registered before the first read: no write after it goes unnoticed.
            let woken = this.watch.as_ref().and_then(|watch| watch.follow(&log.dir));
            let mut reader = match from {
                Some(position) => SegmentReader::at(log, position),
                None => SegmentReader::new(log),
            };
            let mut over: Option<Instant> = None;
            // A record not queued because the node detaches: its batch is never confirmed.
            let mut abandoned = false;
            let mut poll = POLL_MIN;
            // Records are numbered in the order they are queued; each batch's end position waits
            // here until every record up to it is done.
            let acks = Arc::new(Acks::default());
            let mut queued = 0u64;
            let mut unconfirmed: std::collections::VecDeque<(u64, (u64, u64))> = Default::default();
            let note = |unconfirmed: &mut std::collections::VecDeque<(u64, (u64, u64))>| {
                let done = acks.done_below();
                let mut newest = None;
                while unconfirmed.front().is_some_and(|(end, _)| *end <= done) {
                    newest = unconfirmed.pop_front().map(|(_, position)| position);
                }
                if let Some((segment, offset)) = newest {
                    // Replaced whole (a node killed mid-write leaves the previous position).
                    let _ = crate::shim::replace_file(&shipped, format!("{segment} {offset}\n").as_bytes());
                }
            };
            loop {
                note(&mut unconfirmed);
                if this.detaching.is_cancelled() {
                    // The next process ships on from the last batch known delivered: wait (a
                    // bounded time) for the ones in flight, so it sends nothing twice.
                    let deadline = Instant::now() + DETACH_WAIT;
                    while !abandoned && acks.done_below() < queued && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    note(&mut unconfirmed);
                    return;
                }
                let batch = reader.read(256 * 1024);
                let mut next = || {
                    queued += 1;
                    Ack { acks: acks.clone(), seq: queued - 1 }
                };
                if batch.skipped_segments > 0 {
                    let note = format!(
                        "[shiva: {} segment(s) of this run's output rotated away on the node before they could be shipped]",
                        batch.skipped_segments
                    );
                    let note = format!("{note}\n");
                    let line = LogChunk { task: &task, run: &run, stream: "stderr", bytes: note.as_bytes() };
                    abandoned |= !this.send(line, next()).await;
                }
                let idle = batch.lines.is_empty();
                for (stream, bytes) in chunks(&batch.lines) {
                    let line = LogChunk { task: &task, run: &run, stream: stream.as_str(), bytes: &bytes };
                    abandoned |= !this.send(line, next()).await;
                }
                if !idle || batch.skipped_segments > 0 {
                    unconfirmed.push_back((queued, reader.position()));
                }
                if idle {
                    // A run that is over waits for its last records to be done (the producer
                    // gives up on one within its timeout), but not for ever.
                    if let Some(since) = over
                        && (unconfirmed.is_empty() || since.elapsed() > OVER_WAIT)
                    {
                        if !unconfirmed.is_empty() {
                            warn!(%task, %run, "the run's last output was not acknowledged in time");
                        }
                        return;
                    }
                    let pause = match (&woken, unconfirmed.is_empty()) {
                        (_, false) => POLL_MIN,
                        (Some(woken), true) if woken.alive() => WATCHED_POLL,
                        _ => poll,
                    };
                    let grown = async {
                        match &woken {
                            Some(woken) => woken.notify.notified().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = &mut ended, if over.is_none() => over = Some(Instant::now()),
                        _ = tokio::time::sleep(pause) => {}
                        // Output grew: a moment for more of it, so lines travel together (the
                        // shim writes line by line).
                        _ = grown => {
                            this.pause(POLL_MIN).await;
                        }
                        _ = this.detaching.cancelled() => {}
                    }
                    poll = (poll * 2).min(POLL_MAX);
                } else {
                    poll = POLL_MIN;
                }
            }
        });
        ended_tx
    }

    /// Waits up to `timeout` for queued lines to be delivered.
    pub fn flush(&self, timeout: Duration) {
        self.sink.flush(timeout);
    }

    /// Stops every follower between two records; each waits (up to 400 ms) for its records in
    /// flight to be acknowledged and notes how far they go; then waits up to `timeout` for what
    /// is still queued to be delivered. The node's next process ships on from the positions
    /// noted: nothing left out, and nothing twice unless an acknowledgement came later than that.
    pub async fn detach(self: &Arc<Self>, timeout: Duration) {
        self.detaching.cancel();
        let deadline = Instant::now() + timeout;
        while self.following.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let this = self.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::task::spawn_blocking(move || this.flush(left.max(Duration::from_millis(100)))).await;
    }
}

/// Where a run's follower notes how far it shipped: `<segment> <offset>`, beside its segments.
pub fn shipped_path(log: &RunLog) -> std::path::PathBuf {
    log.dir.join(format!("{}.shipped", log.run))
}

/// Counts a live follower while it lives.
struct Following(Arc<std::sync::atomic::AtomicUsize>);

impl Following {
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> Following {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Following(count.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Groups consecutive lines of one stream into records of about [`CHUNK`] bytes, newlines put
/// back (but after a last line that had none).
fn chunks(lines: &[Line]) -> Vec<(Stream, Vec<u8>)> {
    let mut chunks: Vec<(Stream, Vec<u8>)> = Vec::new();
    for line in lines {
        match chunks.last_mut() {
            Some((stream, bytes)) if *stream == line.stream && bytes.len() + line.bytes.len() < CHUNK => {
                bytes.extend_from_slice(&line.bytes);
            }
            _ => chunks.push((line.stream, line.bytes.clone())),
        }
        if line.eol {
            chunks.last_mut().expect("pushed above").1.push(b'\n');
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_one_stream_travel_together_with_their_newlines() {
        let line = |stream, eol, text: &str| Line { stream, eol, bytes: text.as_bytes().to_vec() };
        let lines = [
            line(Stream::Stdout, true, "a"),
            line(Stream::Stdout, true, "b"),
            line(Stream::Stderr, true, "oops"),
            line(Stream::Stdout, false, "end"),
        ];
        let got = chunks(&lines);
        assert_eq!(
            got,
            vec![
                (Stream::Stdout, b"a\nb\n".to_vec()),
                (Stream::Stderr, b"oops\n".to_vec()),
                (Stream::Stdout, b"end".to_vec())
            ]
        );
        let long: Vec<Line> = (0..3).map(|_| line(Stream::Stdout, true, &"x".repeat(40_000))).collect();
        assert_eq!(chunks(&long).len(), 3, "a record stays near 64 KiB");
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::full(2000.0, t0);
        assert_eq!(bucket.take(1500.0, 1000.0, 2000.0, t0), Duration::ZERO);
        assert_eq!(bucket.take(1500.0, 1000.0, 2000.0, t0), Duration::from_secs(1), "1000 short at 1000/s");
        // Two seconds later the debt is paid and 1000 more have come in.
        assert_eq!(bucket.take(1000.0, 1000.0, 2000.0, t0 + Duration::from_secs(2)), Duration::ZERO);
    }
}
