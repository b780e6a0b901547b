//! The restart policy of a long-running task, pure: what to do when its run ends.
//!
//! * An exit code listed in `permanent_exit_codes` ends the task `failed` at once (no restart
//!   here, no move elsewhere: it would fail the same way).
//! * Otherwise the run is restarted after `backoff.initial × backoff.multiplier^(n-1)` (capped
//!   at `backoff.max`, ±10 % jitter), where `n` counts the restarts since the last run that
//!   lasted `stable_after`.
//! * More than `max_restarts` restarts within `restart_window`: the node gives up and reports
//!   the task `failed`; the leader moves it to another eligible node.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shiva_proto::TaskSpec;
use shiva_proto::records::ExitInfo;

/// What follows a run's end.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start again after this delay.
    Restart(Duration),
    /// Too many restarts in the window: report `failed`, let the leader move the task.
    GiveUp(String),
    /// A permanent exit code: report `failed`, do not move the task.
    Permanent(String),
}

/// The restart history of one task on this node.
#[derive(Debug)]
pub struct Restarts {
    spec: TaskSpec,
    recent: VecDeque<Instant>,
    unstable: u32,
}

impl Restarts {
    /// No restarts yet.
    pub fn new(spec: &TaskSpec) -> Restarts {
        Restarts { spec: spec.clone(), recent: VecDeque::new(), unstable: 0 }
    }

    /// A run ended at `now` after `ran_for` with `exit` (`None`: it never started, or its exit
    /// is unknown). `jitter` is drawn from -1..=1 by the caller.
    pub fn on_end(
        &mut self,
        now: Instant,
        ran_for: Duration,
        exit: Option<ExitInfo>,
        jitter: f64,
    ) -> Decision {
        if let Some(code) = exit.and_then(|exit| exit.code)
            && self.spec.permanent_exit_codes.contains(&code)
        {
            return Decision::Permanent(format!("exited with {code}, a permanent exit code: not restarted"));
        }
        if ran_for >= self.spec.stable_after {
            self.unstable = 0;
        }
        let window = self.spec.restart_window;
        while self.recent.front().is_some_and(|at| now.duration_since(*at) >= window) {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.spec.max_restarts as usize {
            return Decision::GiveUp(format!(
                "restarted {} times within {}: giving up on this node",
                self.recent.len(),
                humantime::format_duration(window)
            ));
        }
        self.recent.push_back(now);
        self.unstable = self.unstable.saturating_add(1);
        let delay = self.spec.backoff.delay_before(self.unstable.saturating_add(1));
        let jittered = delay.as_secs_f64() * (1.0 + 0.1 * jitter.clamp(-1.0, 1.0));
        Decision::Restart(Duration::try_from_secs_f64(jittered.max(0.0)).unwrap_or(delay))
    }

    /// Restarts counted in the window.
    pub fn in_window(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shiva_proto::TaskId;

    fn spec() -> TaskSpec {
        let mut spec = TaskSpec::new(TaskId::new("t").unwrap(), "x", vec![]);
        spec.max_restarts = 3;
        spec.restart_window = Duration::from_secs(60);
        spec.stable_after = Duration::from_secs(10);
        spec.permanent_exit_codes = vec![78];
        spec
    }

    fn exit(code: i32) -> Option<ExitInfo> {
        Some(ExitInfo { code: Some(code), signal: None })
    }

    #[test]
    fn delays_grow_then_the_node_gives_up() {
        let mut restarts = Restarts::new(&spec());
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(restarts.on_end(t0, s(0), exit(1), 0.0), Decision::Restart(s(1)));
        assert_eq!(restarts.on_end(t0 + s(1), s(0), exit(1), 0.0), Decision::Restart(s(2)));
        assert_eq!(restarts.on_end(t0 + s(3), s(0), exit(1), 0.0), Decision::Restart(s(4)));
        let Decision::GiveUp(reason) = restarts.on_end(t0 + s(7), s(0), exit(1), 0.0) else { panic!() };
        assert!(reason.contains("3 times within 1m"), "{reason}");
    }

    #[test]
    fn a_stable_run_resets_the_delay_and_old_restarts_leave_the_window() {
        let mut restarts = Restarts::new(&spec());
        let t0 = Instant::now();
        let s = Duration::from_secs;
        restarts.on_end(t0, s(0), exit(1), 0.0);
        restarts.on_end(t0 + s(1), s(0), exit(1), 0.0);
        assert_eq!(restarts.on_end(t0 + s(20), s(15), exit(1), 0.0), Decision::Restart(s(1)), "reset");
        assert_eq!(restarts.in_window(), 3);
        // A minute later the first two left the window.
        assert_eq!(restarts.on_end(t0 + s(61), s(0), exit(1), 0.0), Decision::Restart(s(2)));
        assert_eq!(restarts.in_window(), 2);
    }

    #[test]
    fn a_permanent_exit_code_is_never_restarted_and_jitter_stays_within_ten_percent() {
        let mut restarts = Restarts::new(&spec());
        let t0 = Instant::now();
        assert!(matches!(restarts.on_end(t0, Duration::ZERO, exit(78), 0.0), Decision::Permanent(_)));
        let Decision::Restart(high) = restarts.on_end(t0, Duration::ZERO, exit(1), 1.0) else { panic!() };
        assert_eq!(high, Duration::from_millis(1100));
        let mut zero = spec();
        zero.backoff.initial = Duration::ZERO;
        let Decision::Restart(none) = Restarts::new(&zero).on_end(t0, Duration::ZERO, exit(1), -1.0) else {
            panic!()
        };
        assert_eq!(none, Duration::ZERO, "an initial back-off of 0 restarts at once");
    }
}
