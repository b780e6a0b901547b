//! The wall clock: every record's `sent_at_ms` and every wall-clock reading of the node (cron
//! slots, launch instants, back-offs) go through [`now_ms`]. Only the leader's wall clock decides
//! anything across machines (docs/architecture.md, "Clock rules"); others' readings are for
//! display, or bounded where they are used.
//!
//! A test-only switch shifts it for one process (`shift_for_tests`, the node's
//! `SHIVA_TEST_CLOCK_OFFSET_MS`), standing in for a machine whose clock is off: libfaketime shifts
//! a whole process's clock, but librdkafka's waits then time out.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static OFFSET_MS: OnceLock<i64> = OnceLock::new();

/// Milliseconds since the Unix epoch (0 before it), shifted by the test offset if one is set.
pub fn now_ms() -> i64 {
    let system = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis());
    i64::try_from(system).unwrap_or(i64::MAX).saturating_add(OFFSET_MS.get().copied().unwrap_or(0))
}

/// Test-only: this process's wall clock reads `offset_ms` off from now on. Set once, first thing.
pub fn shift_for_tests(offset_ms: i64) {
    let _ = OFFSET_MS.set(offset_ms);
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_system_clock() {
        let system =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!((super::now_ms() - system).abs() < 1000);
    }
}
