//! Whether a backend may take calls: its active health and its passive
//! outlier ejection, as in Envoy's outlier detection.
//!
//! Consecutive failed calls (connection failures, `UNAVAILABLE`, attempt
//! timeouts) eject a backend for a time that grows with each ejection in a
//! row (base × ejections, capped), so a backend that keeps failing is tried
//! less and less often; an ejection count is forgotten once the backend has
//! stayed in rotation for the longest ejection time. A failed health check
//! takes the backend out until a check answers `SERVING`. Passive
//! observations never eject the last backend in rotation, nor keep one out
//! while no other is in: an ejected backend that answers its checks then
//! serves as the last resort, still ejected, and leaves once another is
//! back (at its next check).
//!
//! This module decides; [`crate::backend`] applies the decisions.

use std::time::Duration;

use tokio::time::Instant;

/// How eagerly failing backends are ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Failed calls in a row that eject a backend. 1 ejects at the first
    /// failure. (A call's retries avoid the backends it failed on either
    /// way.)
    pub consecutive_failures: u32,
    /// The first ejection lasts this long; the n-th in a row n times as long.
    pub base_time: Duration,
    /// No ejection lasts longer.
    pub max_time: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 1,
            base_time: Duration::from_secs(1),
            max_time: Duration::from_secs(30),
        }
    }
}

/// The verdicts on one backend.
#[derive(Debug)]
pub(crate) struct Verdicts {
    healthy: bool,
    /// The last health check was answered, but not `SERVING` (a draining
    /// process): the backend is reachable and asks for no new calls.
    asks_for_no_calls: bool,
    ejected_until: Option<Instant>,
    ejections: u32,
    returned_at: Option<Instant>,
}

impl Verdicts {
    /// A new backend is presumed healthy: it is tried at once, and its first
    /// failed call or check takes it out.
    pub(crate) fn new() -> Self {
        Self {
            healthy: true,
            asks_for_no_calls: false,
            ejected_until: None,
            ejections: 0,
            returned_at: None,
        }
    }

    /// Ejects the backend at `now` and returns for how long.
    pub(crate) fn eject(&mut self, policy: &EjectionPolicy, now: Instant) -> Duration {
        let forgiven = self
            .returned_at
            .is_some_and(|returned| now.saturating_duration_since(returned) >= policy.max_time);
        if forgiven {
            self.ejections = 0;
        }
        self.ejections = self.ejections.saturating_add(1);
        let time = policy
            .base_time
            .saturating_mul(self.ejections)
            .min(policy.max_time);
        self.ejected_until = Some(now + time);
        time
    }

    /// Records the answer of a health check.
    pub(crate) fn set_healthy(&mut self, healthy: bool) {
        self.healthy = healthy;
        self.asks_for_no_calls = false;
    }

    /// Records a health check answered with another status than `SERVING`.
    pub(crate) fn set_asks_for_no_calls(&mut self) {
        self.healthy = false;
        self.asks_for_no_calls = true;
    }

    /// Whether the backend may take calls when no other can: it answers
    /// its health checks, `SERVING` (while ejected for failed calls) or
    /// not (as a draining process does while it still serves). Passive
    /// observations never take the last backend out of rotation, nor keep
    /// one out while no other is in.
    pub(crate) fn may_serve_as_last_resort(&self) -> bool {
        self.healthy || self.asks_for_no_calls
    }

    /// Whether the backend may take calls at `now`.
    pub(crate) fn may_serve(&self, now: Instant) -> bool {
        self.healthy && self.ejected_until.is_none_or(|until| now >= until)
    }

    /// Records that the backend went back into rotation at `now`.
    pub(crate) fn returned(&mut self, now: Instant) {
        self.ejected_until = None;
        self.returned_at = Some(now);
    }

    /// Whether the backend is ejected (as opposed to failing health checks).
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// When the current ejection ends, if any.
    pub(crate) fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// Whether the last health check answered `SERVING`.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectionPolicy = EjectionPolicy {
        consecutive_failures: 1,
        base_time: Duration::from_secs(1),
        max_time: Duration::from_secs(5),
    };

    #[test]
    fn ejection_time_grows_with_repeated_ejections_up_to_the_cap() {
        let start = Instant::now();
        let mut verdicts = Verdicts::new();
        let mut now = start;
        let mut times = Vec::new();
        for _ in 0..7 {
            let time = verdicts.eject(&POLICY, now);
            assert!(!verdicts.may_serve(now));
            now += time;
            assert!(verdicts.may_serve(now));
            verdicts.returned(now);
            times.push(time.as_secs());
        }
        assert_eq!(times, vec![1, 2, 3, 4, 5, 5, 5]);
    }

    #[test]
    fn a_backend_that_stays_well_is_forgiven() {
        let mut now = Instant::now();
        let mut verdicts = Verdicts::new();
        now += verdicts.eject(&POLICY, now);
        verdicts.returned(now);
        now += verdicts.eject(&POLICY, now);
        verdicts.returned(now);
        now += POLICY.max_time;
        assert_eq!(verdicts.eject(&POLICY, now), POLICY.base_time);
    }

    #[test]
    fn health_checks_and_ejection_both_have_to_agree() {
        let now = Instant::now();
        let mut verdicts = Verdicts::new();
        assert!(verdicts.may_serve(now));
        verdicts.set_healthy(false);
        assert!(!verdicts.may_serve(now));
        verdicts.set_healthy(true);
        let time = verdicts.eject(&POLICY, now);
        assert!(verdicts.is_ejected(now));
        assert!(!verdicts.may_serve(now + time / 2));
        assert!(verdicts.may_serve(now + time));
    }
}
