//! The node's Prometheus metrics (`/metrics`, text exposition format 0.0.4).
//!
//! Two kinds of series, documented in docs/api.md:
//! * **this node's own** (its bus latencies, fences, shims, its runs and restarts, its CPU and
//!   memory): sum them over the cluster's nodes;
//! * **the cluster as this node reads it** (tasks by state, nodes, the epoch, failovers): every node serves
//!   the same values from its own view of the log; take one node's, or `max without(instance)`.
//!
//! Task ids are labels only on this node's own run and restart counters, so a series exists only
//! for a task this node ran.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every series the node serves.
pub struct Metrics {
    registry: Registry,
    /// 1 once the node read the log to its end and checked its id.
    pub ready: IntGauge,
    /// 1 while this node leads.
    pub leader: IntGauge,
    /// The newest epoch this node has read.
    pub epoch: IntGauge,
    /// New epochs above the first (a leader replaced) read while this node was up (cluster).
    pub failovers: IntCounter,
    /// Tasks by state (cluster).
    pub tasks: IntGaugeVec,
    /// Nodes by liveness (cluster).
    pub nodes: IntGaugeVec,
    /// Restarts of services this node ran, per task.
    pub restarts: IntCounterVec,
    /// Runs of periodic and one-shot tasks this node ran, per task and outcome.
    pub runs: IntCounterVec,
    /// From a cron slot to its run's start, for the runs this node started.
    pub cron_lateness: Histogram,
    /// From a spec's submission to its first start (services and one-shots), on this node.
    pub submit_to_start: Histogram,
    /// From queueing a record to the broker's acknowledgement.
    pub produce_latency: Histogram,
    /// From a record's creation (its producer's timestamp) to this node reading it.
    pub fetch_latency: Histogram,
    /// Times this node was cut off (its lease ran out: exclusive runs stopped).
    pub fences: IntCounter,
    /// 1 while cut off.
    pub fenced: IntGauge,
    /// How long a chunk of task output waited (rate limit, full producer) before it was queued.
    pub log_shipping_delay: Histogram,
    /// Chunks of task output dropped because the producer stayed full.
    pub log_dropped: IntCounter,
    /// Run shims alive (services and runs).
    pub shims: IntGauge,
    /// HTTP requests served, by route and status code.
    pub http_requests: IntCounterVec,
    cpu_seconds: Counter,
    resident_memory: IntGauge,
    /// The process probe, and the CPU seconds counted so far.
    process: Mutex<(sysinfo::System, f64)>,
}

fn seconds(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram")
}

impl Metrics {
    /// The series, registered; `node`, `cluster` and `version` label `shiva_node_info`.
    pub fn new(node: &str, cluster: &str, version: &str) -> Metrics {
        let registry = Registry::new();
        let latency = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let slow = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
        let metrics = Metrics {
            ready: IntGauge::new("shiva_node_ready", "1 once this node has read the log to its end").unwrap(),
            leader: IntGauge::new("shiva_leader", "1 while this node leads the cluster").unwrap(),
            epoch: IntGauge::new("shiva_epoch", "The newest leader epoch this node has read").unwrap(),
            failovers: IntCounter::new(
                "shiva_failovers_total",
                "Leader elections after the first (new epochs above 1) read while this node was up",
            )
            .unwrap(),
            tasks: IntGaugeVec::new(
                Opts::new("shiva_tasks", "Tasks by state, as this node reads the log"),
                &["state"],
            )
            .unwrap(),
            nodes: IntGaugeVec::new(
                Opts::new("shiva_nodes", "Nodes by liveness, as this node reads the log"),
                &["alive"],
            )
            .unwrap(),
            restarts: IntCounterVec::new(
                Opts::new("shiva_task_restarts_total", "Restarts of a service this node ran"),
                &["task"],
            )
            .unwrap(),
            runs: IntCounterVec::new(
                Opts::new(
                    "shiva_runs_total",
                    "Runs of periodic and one-shot tasks this node ran, by outcome",
                ),
                &["task", "outcome"],
            )
            .unwrap(),
            cron_lateness: seconds(
                "shiva_cron_launch_lateness_seconds",
                "From a cron slot to its run's start on this node",
                slow.clone(),
            ),
            submit_to_start: seconds(
                "shiva_submit_to_start_seconds",
                "From a spec's submission to its first start on this node (submitter's clock)",
                slow,
            ),
            produce_latency: seconds(
                "shiva_bus_produce_latency_seconds",
                "From queueing a record to the bus acknowledging it",
                latency.clone(),
            ),
            fetch_latency: seconds(
                "shiva_bus_fetch_latency_seconds",
                "From a record's creation to this node reading it",
                latency.clone(),
            ),
            fences: IntCounter::new(
                "shiva_fences_total",
                "Times this node was cut off and stopped exclusive runs",
            )
            .unwrap(),
            fenced: IntGauge::new("shiva_fenced", "1 while this node is cut off from the bus").unwrap(),
            log_shipping_delay: seconds(
                "shiva_log_shipping_delay_seconds",
                "How long a chunk of task output waited before it was queued to the logs topic",
                latency,
            ),
            log_dropped: IntCounter::new(
                "shiva_log_dropped_chunks_total",
                "Chunks of task output dropped because the logs producer stayed full",
            )
            .unwrap(),
            shims: IntGauge::new("shiva_shims", "Run shims alive on this node").unwrap(),
            http_requests: IntCounterVec::new(
                Opts::new("shiva_http_requests_total", "HTTP requests served, by route and status"),
                &["route", "code"],
            )
            .unwrap(),
            cpu_seconds: Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds",
            )
            .unwrap(),
            resident_memory: IntGauge::new("process_resident_memory_bytes", "Resident memory size in bytes")
                .unwrap(),
            process: Mutex::new((sysinfo::System::new(), 0.0)),
            registry: registry.clone(),
        };
        let info = IntGaugeVec::new(
            Opts::new("shiva_node_info", "This node: 1, labelled"),
            &["node", "cluster", "version", "protocol"],
        )
        .unwrap();
        info.with_label_values(&[node, cluster, version, &shiva_proto::protocol().to_string()]).set(1);
        let up = IntGauge::new("shiva_node_up", "1 while this node serves").unwrap();
        up.set(1);
        let start =
            Gauge::new("process_start_time_seconds", "Start time of the process since unix epoch in seconds")
                .unwrap();
        start.set(shiva_proto::wall::now_ms() as f64 / 1000.0);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(info),
            Box::new(up),
            Box::new(start),
            Box::new(metrics.ready.clone()),
            Box::new(metrics.leader.clone()),
            Box::new(metrics.epoch.clone()),
            Box::new(metrics.failovers.clone()),
            Box::new(metrics.tasks.clone()),
            Box::new(metrics.nodes.clone()),
            Box::new(metrics.restarts.clone()),
            Box::new(metrics.runs.clone()),
            Box::new(metrics.cron_lateness.clone()),
            Box::new(metrics.submit_to_start.clone()),
            Box::new(metrics.produce_latency.clone()),
            Box::new(metrics.fetch_latency.clone()),
            Box::new(metrics.fences.clone()),
            Box::new(metrics.fenced.clone()),
            Box::new(metrics.log_shipping_delay.clone()),
            Box::new(metrics.log_dropped.clone()),
            Box::new(metrics.shims.clone()),
            Box::new(metrics.http_requests.clone()),
            Box::new(metrics.cpu_seconds.clone()),
            Box::new(metrics.resident_memory.clone()),
        ];
        for collector in collectors {
            registry.register(collector).expect("each series is registered once");
        }
        metrics
    }

    /// Observes a duration in seconds (a negative one, from another machine's clock, as 0).
    pub fn observe_ms(histogram: &Histogram, ms: i64) {
        histogram.observe(ms.max(0) as f64 / 1000.0);
    }

    /// Observes a duration.
    pub fn observe(histogram: &Histogram, duration: Duration) {
        histogram.observe(duration.as_secs_f64());
    }

    /// The exposition, with this process's CPU and memory read now. Blocking (reads /proc).
    pub fn render(&self) -> String {
        self.sample_process();
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }

    fn sample_process(&self) {
        use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate};
        let pid = Pid::from_u32(std::process::id());
        let mut guard = self.process.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (system, counted) = &mut *guard;
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        if let Some(process) = system.process(pid) {
            let total = process.accumulated_cpu_time() as f64 / 1000.0;
            if total > *counted {
                self.cpu_seconds.inc_by(total - *counted);
                *counted = total;
            }
            self.resident_memory.set(i64::try_from(process.memory()).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_series_by_prometheus_conventions() {
        let metrics = Metrics::new("n1", "c", "0.1.0");
        metrics.runs.with_label_values(&["a/b", "succeeded"]).inc();
        Metrics::observe_ms(&metrics.cron_lateness, -5);
        let text = metrics.render();
        for line in text.lines().filter(|line| line.starts_with("# TYPE")) {
            let mut words = line.split_whitespace().skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            assert!(name.starts_with("shiva_") || name.starts_with("process_"), "{line}");
        }
        assert!(text.contains("shiva_runs_total{outcome=\"succeeded\",task=\"a/b\"} 1"), "{text}");
        assert!(text.contains("shiva_cron_launch_lateness_seconds_bucket{le=\"0.01\"} 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }
}
