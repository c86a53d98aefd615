//! The one source of "now" for every TTL: references, CVCs, idempotency
//! records and browser sessions read the time through a [`Clock`], so a test
//! moves time by hand instead of sleeping past a deadline.
//!
//! Production uses [`SystemClock`] (wall time, UTC: expiries are shared with
//! other replicas through PostgreSQL and Redis, so they must be wall time,
//! not a process-local monotonic instant). [`ManualClock`] stands still
//! until told to move; it is the seam the TTL tests drive.

use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// How stores and handlers hold their clock.
pub type SharedClock = Arc<dyn Clock>;

/// Wall time, UTC.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

impl SystemClock {
    /// The system clock as a [`SharedClock`].
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

/// A clock that moves only when [`advance`](ManualClock::advance)d: TTL
/// tests without sleeps, deterministic on a loaded machine.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    /// A clock standing at the current wall time (so expiries it produces
    /// look like real ones), wrapped for sharing.
    pub fn starting_now() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: Mutex::new(OffsetDateTime::now_utc()),
        })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::starting_now();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::milliseconds(1_500));
        assert_eq!(clock.now() - t0, Duration::milliseconds(1_500));
    }

    #[test]
    fn the_system_clock_is_utc_wall_time() {
        let before = OffsetDateTime::now_utc();
        let now = SystemClock.now();
        assert!(now >= before && now.offset().is_utc());
    }
}
