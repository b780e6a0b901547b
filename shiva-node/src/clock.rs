//! The node's one clock for leases and log time: `CLOCK_BOOTTIME`, which keeps counting while the
//! machine is suspended (`CLOCK_MONOTONIC`, behind `std::time::Instant`, stops). A lease measured
//! on the monotonic clock survives a suspend untouched: after the resume the node would renew its
//! shims' leases as if no time had passed, while the rest of the cluster moved its tasks. The
//! shims measure their leases on the same clock (`shim::boottime_ms`), so the node hands them its
//! deadline as is.
//!
//! Invariant: a [`Boot`] only ever comes from [`Boot::now`] or from arithmetic on one, and the
//! arithmetic saturates: no input makes it wrap.

use std::time::Duration;

/// An instant on the boot-time clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Boot(Duration);

impl Boot {
    /// Now.
    pub fn now() -> Boot {
        use nix::time::{ClockId, clock_gettime};
        let now = clock_gettime(ClockId::CLOCK_BOOTTIME)
            .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
            .map_or(Duration::ZERO, Duration::from);
        Boot(now)
    }

    /// The instant `since_boot` after boot (tests, and the shim's millisecond lines).
    pub const fn from_since_boot(since_boot: Duration) -> Boot {
        Boot(since_boot)
    }

    /// Milliseconds since boot, as the shim's `until` line carries them.
    pub fn as_millis(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }

    /// `self + duration`, saturating.
    pub fn saturating_add(self, duration: Duration) -> Boot {
        Boot(self.0.saturating_add(duration))
    }

    /// How long after `earlier` this is (zero if it is not after).
    pub fn saturating_since(self, earlier: Boot) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Boot {
    type Output = Boot;

    /// Saturating, like [`Boot::saturating_add`].
    fn add(self, duration: Duration) -> Boot {
        self.saturating_add(duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_forward_and_saturates() {
        let a = Boot::now();
        let b = Boot::now();
        assert!(b >= a);
        assert_eq!(a.saturating_since(b.saturating_add(Duration::from_secs(1))), Duration::ZERO);
        let far = Boot::from_since_boot(Duration::MAX).saturating_add(Duration::from_secs(1));
        assert_eq!(far, Boot::from_since_boot(Duration::MAX));
        assert_eq!(far.as_millis(), i64::MAX);
        // The shim reads the same clock.
        let shim = crate::shim::boottime_ms();
        assert!((shim - Boot::now().as_millis()).abs() < 1000);
    }
}
