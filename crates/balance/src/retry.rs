//! Which failed calls are sent again, and how many.
//!
//! Only failures where the backend could not serve are retried
//! (`UNAVAILABLE`, connection refused or reset, attempt timeout); answers of
//! the application such as `INVALID_ARGUMENT` go back to the caller as they
//! are. Retries are bounded per call and by a [`TpsBudget`] shared by all
//! calls, so that a full outage does not multiply load. The retry goes back
//! through the balancer, which avoids the backends that failed this call:
//! until the retry's attempt has a backend, each is marked slow (see
//! [`BackendState::load`](crate::backend::BackendState::load) and
//! [`CallTrace::avoid_failed`](crate::CallTrace::avoid_failed)), so the
//! balancer picks one only when every other it compares is marked too.
//! With the default ejection policy the failure also ejects the backend,
//! unless it is the last one.

use std::sync::Arc;
use std::time::Duration;

use securemesh::v1::SubmitReply;
use securemesh_telemetry::metrics;
use tower::retry::budget::{Budget, TpsBudget};
use tower::BoxError;

use crate::backend::is_backend_failure;
use crate::Attempt;

/// A retry policy for `Submit`, cloned for every call.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    budget: Arc<TpsBudget>,
    retries_left: usize,
    max_attempts: u32,
    deposited: bool,
}

impl RetryPolicy {
    /// At most `max_retries` retries per call, each paid for from
    /// `budget` (see [`budget`]), and no retry once the call has made
    /// [`max_attempts`]`(max_retries)` attempts, hedges included.
    pub fn new(max_retries: usize, budget: Arc<TpsBudget>) -> Self {
        Self {
            budget,
            retries_left: max_retries,
            max_attempts: max_attempts(max_retries),
            deposited: false,
        }
    }
}

/// The most attempts a call makes with `max_retries`, counting the first,
/// its retries and its hedges alike (gRPC's `maxAttempts`): a hedge spends
/// a retry.
pub fn max_attempts(max_retries: usize) -> u32 {
    u32::try_from(max_retries)
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

/// A budget that allows `retry_ratio` of calls over ten seconds to be
/// repeated (retried or hedged), beyond a floor of `min_retries_per_sec`.
/// Every call pays into it once. What tower's budget cannot take is
/// clamped rather than panicking: a ratio to 0..=1000 (NaN counts as 0),
/// the floor to below `i32::MAX`.
pub fn budget(min_retries_per_sec: u32, retry_ratio: f32) -> Arc<TpsBudget> {
    const MOST_RETRIES_PER_SEC: u32 = i32::MAX as u32 - 1;
    let retry_ratio = if retry_ratio.is_nan() {
        0.0
    } else {
        retry_ratio.clamp(0.0, 1000.0)
    };
    Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        min_retries_per_sec.min(MOST_RETRIES_PER_SEC),
        retry_ratio,
    ))
}

impl tower::retry::Policy<Attempt, SubmitReply, BoxError> for RetryPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        request: &mut Attempt,
        result: &mut Result<SubmitReply, BoxError>,
    ) -> Option<Self::Future> {
        let Err(error) = result else {
            return None;
        };
        if !is_retryable(error.as_ref())
            || self.retries_left == 0
            || request.trace.attempts() >= self.max_attempts
        {
            return None;
        }
        if !self.budget.withdraw() {
            metrics().retry_budget_refusals.inc();
            metrics().retry_budget_exhausted.set(1);
            tracing::warn!("retry budget exhausted: not retrying");
            return None;
        }
        metrics().retry_budget_exhausted.set(0);
        match request.trace.last_backend() {
            Some(backend) => backend.count_retry(),
            None => metrics().backend_retries.with_label_values(&["none"]).inc(),
        }
        request.trace.avoid_failed();
        self.retries_left -= 1;
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, request: &Attempt) -> Option<Attempt> {
        // Runs before every attempt; the first one pays into the budget.
        if !self.deposited {
            self.budget.deposit();
            self.deposited = true;
        }
        Some(request.clone())
    }
}

/// Whether a failed attempt may be repeated on another backend.
pub fn is_retryable(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => is_backend_failure(status),
        // Errors of our own layers (balancer, buffer) say nothing about the
        // request: it never reached a backend.
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::retry::Policy as _;

    /// An attempt whose retries are counted under a backend of its own:
    /// under "none" they would change the process-wide count that
    /// `a_call_refused_for_want_of_a_backend_is_not_retried` watches, from
    /// another thread.
    fn attempt() -> Attempt {
        let attempt = crate::testing::attempt();
        *crate::lock(&attempt.trace.last_backend) = Some(crate::testing::backend_state());
        attempt
    }

    fn failed(status: tonic::Status) -> Result<SubmitReply, BoxError> {
        Err(Box::new(status))
    }

    #[test]
    fn retries_unavailable_but_not_application_errors() {
        let mut policy = RetryPolicy::new(2, budget(10, 0.2));
        let mut request = attempt();
        policy.clone_request(&request);
        assert!(policy
            .retry(
                &mut request,
                &mut failed(tonic::Status::unavailable("down"))
            )
            .is_some());
        assert!(policy
            .retry(
                &mut request,
                &mut failed(tonic::Status::invalid_argument("bad"))
            )
            .is_none());
        assert!(policy
            .retry(&mut request, &mut Ok(SubmitReply::default()))
            .is_none());
    }

    #[test]
    fn retries_a_request_cancelled_by_a_closing_connection() {
        // What tonic reports when the connection closed before the request
        // was written: CANCELLED, with the transport error as its source.
        let mut status = tonic::Status::cancelled("operation was canceled");
        status.set_source(std::sync::Arc::new(std::io::Error::other(
            "connection closed",
        )));
        let mut policy = RetryPolicy::new(2, budget(10, 0.2));
        assert!(policy.retry(&mut attempt(), &mut failed(status)).is_some());
        // A cancellation that a peer sent (no local source) is an answer.
        assert!(policy
            .retry(
                &mut attempt(),
                &mut failed(tonic::Status::cancelled("peer gave up"))
            )
            .is_none());
    }

    #[test]
    fn honours_a_peer_that_asks_not_to_be_retried() {
        let mut policy = RetryPolicy::new(2, budget(10, 0.2));
        let exhausted = securemesh::status::with_no_retry(tonic::Status::unavailable(
            "no backend could serve the call",
        ));
        assert!(policy
            .retry(&mut attempt(), &mut failed(exhausted))
            .is_none());
        let mut later = tonic::Status::unavailable("busy");
        later.metadata_mut().insert(
            securemesh::status::RETRY_PUSHBACK,
            tonic::metadata::MetadataValue::from_static("100"),
        );
        assert!(policy.retry(&mut attempt(), &mut failed(later)).is_some());
    }

    #[test]
    fn a_budget_out_of_range_is_clamped_not_a_panic() {
        for ratio in [f32::NAN, -1.0, f32::NEG_INFINITY] {
            let budget = budget(0, ratio);
            budget.deposit();
            assert!(!budget.withdraw(), "{ratio}");
        }
        for ratio in [5000.0, f32::INFINITY] {
            let budget = budget(0, ratio);
            budget.deposit();
            assert!(budget.withdraw(), "{ratio}");
        }
        assert!(budget(u32::MAX, 0.2).withdraw());
    }

    #[test]
    fn attempts_are_bounded_per_call() {
        let mut policy = RetryPolicy::new(2, budget(10, 0.2));
        let mut request = attempt();
        let mut outcome = failed(tonic::Status::unavailable("down"));
        assert!(policy.retry(&mut request, &mut outcome).is_some());
        assert!(policy.retry(&mut request, &mut outcome).is_some());
        assert!(policy.retry(&mut request, &mut outcome).is_none());
    }

    #[test]
    fn hedges_count_against_the_attempts_of_a_call() {
        let mut policy = RetryPolicy::new(2, budget(10, 0.2));
        let mut request = attempt();
        let backend = crate::testing::backend_state();
        let mut outcome = failed(tonic::Status::unavailable("down"));
        // The first attempt and its hedge both failed: one retry is left.
        request.trace.attempted(&backend);
        request.trace.attempted(&backend);
        assert!(policy.retry(&mut request, &mut outcome).is_some());
        request.trace.attempted(&backend);
        assert!(policy.retry(&mut request, &mut outcome).is_none());
    }

    #[test]
    fn the_shared_budget_stops_a_retry_storm() {
        // No floor, 10% of calls: after the initial reserve is spent, calls
        // that all fail cannot each be retried.
        let template = RetryPolicy::new(1, budget(1, 0.1));
        let mut retried = 0;
        for _ in 0..1_000 {
            let mut policy = template.clone();
            let mut request = attempt();
            policy.clone_request(&request);
            if policy
                .retry(
                    &mut request,
                    &mut failed(tonic::Status::unavailable("down")),
                )
                .is_some()
            {
                retried += 1;
            }
        }
        assert!(
            retried < 200,
            "{retried} of 1000 failing calls were retried"
        );
        assert!(retried > 0);
    }
}
