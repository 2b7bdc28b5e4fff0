//! Hedged calls: when an attempt has not answered within a delay, a second
//! attempt of the same call goes through the balancer, and the first answer
//! wins.
//!
//! A hung backend (stopped, or cut off by the network) holds every call
//! already sent to it until the per-try timeout; retries only start then.
//! A hedge starts after `delay` instead, as in gRPC's hedging policy
//! (gRFC A6, `hedgingDelay`), with these rules:
//!
//! - the second attempt lands elsewhere: until the slow attempt ends, its
//!   backend counts as loaded beyond any other (see
//!   [`BackendState::load`](crate::backend::BackendState::load)), so the
//!   balancer picks it only when it compares nothing better;
//! - a hedge is made only for an attempt that reached a backend (not one
//!   still waiting for the balancer), at most one per attempt, only when
//!   the retry budget shared with retries allows it, and only while the
//!   call has attempts left: a hedge spends one of its retries (gRPC's
//!   `maxAttempts` counts both);
//! - the first success wins, and so does an answer of the application
//!   (such as `INVALID_ARGUMENT`); a failure that another backend might not
//!   have (`UNAVAILABLE`, a reset, a timeout) waits for the other attempt;
//! - a slow attempt that lost is not cancelled: it runs on in its own task
//!   until it answers or its per-try timeout ends it, so that a hung
//!   backend stays the balancer's last choice meanwhile and its timeout
//!   still ejects it. Its answer is dropped. A hedge that lost is
//!   cancelled (its backend was not the slow one), as gRPC cancels the
//!   attempts it does not commit to.
//!
//! `DataService.Submit` may be sent twice: a server only decrypts the token
//! and answers its digest.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{self, Either};
use securemesh::v1::SubmitReply;
use securemesh_telemetry::metrics;
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::{BoxError, Service, ServiceExt as _};

use crate::backend::Rotation;
use crate::retry::is_retryable;
use crate::Attempt;

type Outcome = Result<SubmitReply, BoxError>;

/// Sends a second attempt of a call whose first has not answered within
/// `delay`. Wraps the balancer (a `tower::buffer::Buffer`, cheap to clone).
#[derive(Clone)]
pub struct Hedge<S> {
    inner: S,
    delay: Duration,
    budget: Arc<TpsBudget>,
    rotation: Arc<Rotation>,
    max_attempts: u32,
}

impl<S> Hedge<S> {
    /// Hedges after `delay`, paying for each hedge from `budget`, while
    /// `rotation` counts more than one backend (a hedge on the backend that
    /// is already slow would only add to its load) and the call has made
    /// fewer than `max_attempts` attempts.
    pub fn new(
        inner: S,
        delay: Duration,
        budget: Arc<TpsBudget>,
        rotation: Arc<Rotation>,
        max_attempts: u32,
    ) -> Self {
        Self {
            inner,
            delay,
            budget,
            rotation,
            max_attempts,
        }
    }
}

impl<S> Service<Attempt> for Hedge<S>
where
    S: Service<Attempt, Response = SubmitReply, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = SubmitReply;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        // The service made ready takes the first attempt, and a hedge after
        // it has been made ready again; a clone stays for the next call.
        let spare = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, spare);
        let reached_before = attempt.trace.attempts();
        let first = Box::pin(ready.call(attempt.clone()));
        let delay = self.delay;
        let budget = self.budget.clone();
        let rotation = self.rotation.clone();
        let max_attempts = self.max_attempts;
        Box::pin(async move {
            let mut first = first;
            let mut look_at = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    biased;
                    outcome = &mut first => return outcome,
                    () = tokio::time::sleep_until(look_at) => {}
                }
                // Waiting for the balancer is not slowness of a backend: the
                // delay counts from the moment the attempt reached one.
                let reached = attempt
                    .trace
                    .last_attempted_at()
                    .filter(|_| attempt.trace.attempts() > reached_before);
                let now = tokio::time::Instant::now();
                look_at = match reached {
                    Some(reached) if reached + delay <= now => break,
                    Some(reached) => reached + delay,
                    None => now + delay,
                };
            }
            if rotation.count() < 2 || attempt.trace.attempts() >= max_attempts {
                return first.await;
            }
            if !budget.withdraw() {
                metrics().retry_budget_refusals.inc();
                metrics().retry_budget_exhausted.set(1);
                return first.await;
            }
            metrics().retry_budget_exhausted.set(0);
            metrics().hedges.inc();
            // Until the slow attempt ends, its backend is the last choice of
            // the balancer, for the hedge and for every other call.
            let slow = attempt
                .trace
                .last_backend()
                .map(|backend| backend.slow_attempt());
            let first = Box::pin(async move {
                let _slow = slow;
                first.await
            });
            let second = Box::pin(ready.oneshot(attempt));
            match future::select(first, second).await {
                // A failure another backend might not have waits for the
                // other attempt; an answer stands.
                Either::Left((outcome, hedge)) if is_failure(&outcome) => {
                    let outcome = hedge.await;
                    if outcome.is_ok() {
                        metrics().hedges_won.inc();
                    }
                    outcome
                }
                // The hedge is cancelled (its backend was never the slow one).
                Either::Left((outcome, _hedge)) => outcome,
                Either::Right((outcome, first)) if is_failure(&outcome) => first.await,
                // The slow attempt runs on, unheard (see the module docs).
                Either::Right((outcome, first)) => {
                    if outcome.is_ok() {
                        metrics().hedges_won.inc();
                    }
                    tokio::spawn(first);
                    outcome
                }
            }
        })
    }
}

/// Whether `outcome` is a failure the other attempt might not have: a
/// backend's, or a refusal for want of a backend (while the first attempt
/// may still be answered).
fn is_failure(outcome: &Outcome) -> bool {
    matches!(outcome, Err(error) if is_retryable(error.as_ref())
        || error.is::<crate::fail_fast::NoBackendInRotation>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tonic::Status;

    use crate::backend::{BackendState, Rotation};
    use crate::testing::attempt;
    use crate::EjectionPolicy;

    /// How each attempt of a scripted service behaves, in call order.
    #[derive(Clone, Copy)]
    enum Script {
        /// Answers after this long with a reply naming the attempt.
        Answer(Duration),
        /// Fails after this long with this status.
        Fail(Duration, tonic::Code),
        /// Waits this long for the balancer before it reaches its backend,
        /// then answers after the second duration.
        Queued(Duration, Duration),
        /// Refused after this long for want of a backend in rotation,
        /// without reaching one.
        Refused(Duration),
    }

    /// A service whose attempts follow a script, recording which were
    /// started and which ran to their end.
    #[derive(Clone)]
    struct Scripted {
        script: Arc<Vec<Script>>,
        /// The backend of each attempt.
        backends: Arc<Vec<Arc<BackendState>>>,
        /// Counts them all in rotation.
        rotation: Arc<Rotation>,
        started: Arc<AtomicUsize>,
        finished: Arc<Mutex<Vec<usize>>>,
    }

    impl Scripted {
        fn new(script: Vec<Script>) -> Self {
            let rotation = Arc::new(Rotation::default());
            let backends = (0..script.len())
                .map(|index| {
                    BackendState::new(
                        format!("https://backend-{index}.test"),
                        EjectionPolicy::default(),
                        rotation.clone(),
                    )
                })
                .collect();
            Self {
                script: Arc::new(script),
                backends: Arc::new(backends),
                rotation,
                started: Arc::default(),
                finished: Arc::default(),
            }
        }
    }

    impl Service<Attempt> for Scripted {
        type Response = SubmitReply;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, attempt: Attempt) -> Self::Future {
            let index = self.started.fetch_add(1, Ordering::SeqCst);
            let step = self.script[index];
            let finished = self.finished.clone();
            let backend = self.backends[index].clone();
            if !matches!(step, Script::Queued(..) | Script::Refused(..)) {
                attempt.trace.attempted(&backend);
            }
            Box::pin(async move {
                let outcome = match step {
                    Script::Queued(queued, after) => {
                        tokio::time::sleep(queued).await;
                        attempt.trace.attempted(&backend);
                        tokio::time::sleep(after).await;
                        Ok(SubmitReply {
                            server_id: format!("backend-{index}"),
                            ..SubmitReply::default()
                        })
                    }
                    Script::Answer(after) => {
                        tokio::time::sleep(after).await;
                        Ok(SubmitReply {
                            server_id: format!("backend-{index}"),
                            ..SubmitReply::default()
                        })
                    }
                    Script::Fail(after, code) => {
                        tokio::time::sleep(after).await;
                        Err(Box::new(Status::new(code, "scripted")) as BoxError)
                    }
                    Script::Refused(after) => {
                        tokio::time::sleep(after).await;
                        Err(crate::fail_fast::NoBackendInRotation::new("no backend").into())
                    }
                };
                finished.lock().unwrap().push(index);
                outcome
            })
        }
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    const DELAY: Duration = Duration::from_millis(50);

    fn budget() -> Arc<TpsBudget> {
        Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))
    }

    /// Two retries' worth, as the coordinator's default.
    const MAX_ATTEMPTS: u32 = 3;

    async fn run(service: &Scripted, budget: Arc<TpsBudget>) -> Outcome {
        run_attempt(service, budget, attempt()).await
    }

    async fn run_attempt(service: &Scripted, budget: Arc<TpsBudget>, attempt: Attempt) -> Outcome {
        let rotation = service.rotation.clone();
        Hedge::new(service.clone(), DELAY, budget, rotation, MAX_ATTEMPTS)
            .oneshot(attempt)
            .await
    }

    fn answered_by(outcome: &Outcome) -> &str {
        &outcome.as_ref().expect("an answer").server_id
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_answer_is_never_hedged() {
        let service = Scripted::new(vec![Script::Answer(ms(40))]);
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-0");
        assert_eq!(service.started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_hedged_and_the_first_answer_wins() {
        let service = Scripted::new(vec![Script::Answer(ms(1_000)), Script::Answer(ms(5))]);
        let started = tokio::time::Instant::now();
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-1");
        assert_eq!(started.elapsed(), DELAY + ms(5));
        // The slow attempt was not cancelled: it runs on to its end, and
        // its backend is the balancer's last choice until then.
        assert_eq!(*service.finished.lock().unwrap(), vec![1]);
        let slow = &service.backends[0];
        let other = &service.backends[1];
        assert!(slow.load() > other.load() + 1_000_000);
        tokio::time::sleep(ms(1_000)).await;
        assert_eq!(*service.finished.lock().unwrap(), vec![1, 0]);
        assert_eq!(slow.load(), other.load());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_answer_still_wins_over_a_slower_hedge() {
        let service = Scripted::new(vec![Script::Answer(ms(60)), Script::Answer(ms(500))]);
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-0");
        assert_eq!(service.started.load(Ordering::SeqCst), 2);
        // The hedge was cancelled: it never ran to its end.
        tokio::time::sleep(ms(1_000)).await;
        assert_eq!(*service.finished.lock().unwrap(), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_another_backend_might_not_have_waits_for_the_other_attempt() {
        let service = Scripted::new(vec![
            Script::Answer(ms(300)),
            Script::Fail(ms(1), tonic::Code::Unavailable),
        ]);
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-0");

        let service = Scripted::new(vec![
            Script::Fail(ms(80), tonic::Code::Unavailable),
            Script::Answer(ms(200)),
        ]);
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_refused_for_want_of_a_backend_waits_for_the_first_attempt() {
        let service = Scripted::new(vec![Script::Answer(ms(300)), Script::Refused(ms(1))]);
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-0");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_of_the_application_is_final() {
        let service = Scripted::new(vec![
            Script::Answer(ms(300)),
            Script::Fail(ms(1), tonic::Code::InvalidArgument),
        ]);
        let outcome = run(&service, budget()).await;
        let status = outcome.unwrap_err().downcast::<Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test(start_paused = true)]
    async fn when_both_attempts_fail_the_call_fails_for_the_retry_layer_to_judge() {
        let service = Scripted::new(vec![
            Script::Fail(ms(100), tonic::Code::Unavailable),
            Script::Fail(ms(100), tonic::Code::Unavailable),
        ]);
        let outcome = run(&service, budget()).await;
        let error = outcome.unwrap_err();
        assert!(is_retryable(error.as_ref()));
        assert_eq!(service.started.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_without_budget() {
        let empty = Arc::new(TpsBudget::new(Duration::from_secs(1), 1, 0.0));
        while empty.withdraw() {}
        let service = Scripted::new(vec![Script::Answer(ms(300)), Script::Answer(ms(1))]);
        let outcome = run(&service, empty).await;
        assert_eq!(answered_by(&outcome), "backend-0");
        assert_eq!(service.started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_attempt_a_call_may_make_is_not_hedged() {
        let service = Scripted::new(vec![Script::Answer(ms(300)), Script::Answer(ms(1))]);
        // Two attempts before this one (a first try and its hedge, which
        // both failed): this retry is the third and last.
        let last = attempt();
        let earlier = crate::testing::backend_state();
        last.trace.attempted(&earlier);
        last.trace.attempted(&earlier);
        let outcome = run_attempt(&service, budget(), last).await;
        assert_eq!(answered_by(&outcome), "backend-0");
        assert_eq!(service.started.load(Ordering::SeqCst), 1);

        let service = Scripted::new(vec![Script::Answer(ms(300)), Script::Answer(ms(1))]);
        let second = attempt();
        second.trace.attempted(&earlier);
        let outcome = run_attempt(&service, budget(), second).await;
        assert_eq!(
            answered_by(&outcome),
            "backend-1",
            "a retry with one attempt left is hedged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_one_backend_in_rotation_there_is_nowhere_else_to_go() {
        let service = Scripted::new(vec![Script::Answer(ms(300)), Script::Answer(ms(1))]);
        service.backends[1].retire();
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-0");
        assert_eq!(service.started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_waiting_for_the_balancer_does_not_count() {
        // Reached after 120 ms or 45 ms of the 50 ms delay, answered 30 ms
        // later: no hedge, since the delay counts from reaching a backend.
        for queued in [ms(120), ms(45)] {
            let service =
                Scripted::new(vec![Script::Queued(queued, ms(30)), Script::Answer(ms(1))]);
            let outcome = run(&service, budget()).await;
            assert_eq!(answered_by(&outcome), "backend-0");
            assert_eq!(service.started.load(Ordering::SeqCst), 1, "{queued:?}");
        }
        // Still slow a delay after reaching its backend: hedged then.
        let service = Scripted::new(vec![Script::Queued(ms(45), ms(500)), Script::Answer(ms(1))]);
        let started = tokio::time::Instant::now();
        let outcome = run(&service, budget()).await;
        assert_eq!(answered_by(&outcome), "backend-1");
        assert_eq!(started.elapsed(), ms(45) + DELAY + ms(1));
    }
}
