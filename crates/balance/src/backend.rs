//! One backend as a tower service, and its shared rotation state.
//!
//! A backend is in rotation or out of it. While out, its `poll_ready` stays
//! pending, so the balancer never picks it; when it may serve again its
//! state wakes the balancer. Keeping backends pending (instead of failing
//! `poll_ready`) keeps them in the balancer, so a return needs no
//! re-discovery.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
pub use securemesh::status::{describe, is_unavailable as is_backend_failure};
use securemesh::v1::{SubmitReply, SUBMIT_METHOD};
use securemesh_telemetry::{metrics, BackendSeries, Window, WindowSnapshot};
use tokio::time::Instant;
use tonic::Status;

use securemesh_tls::CALLER_HEADER;

use crate::channel::Http2Channel;
use crate::outlier::{EjectionPolicy, Verdicts};

use crate::{lock, Attempt};

/// How many backends of a pool are in rotation, shared by its backends so
/// that passive ejection never takes out the last one. Transitions lock it
/// first, then the backend's verdicts.
#[derive(Debug)]
pub struct Rotation {
    in_rotation: Mutex<usize>,
    emptied: AtomicWaker,
    /// Whether any backend is in rotation, for whoever follows that.
    serving: tokio::sync::watch::Sender<bool>,
    /// The most recent failure of any backend: `<url>: <reason>`.
    last_failure: Mutex<Option<String>>,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            in_rotation: Mutex::new(0),
            emptied: AtomicWaker::new(),
            serving: tokio::sync::watch::Sender::new(false),
            last_failure: Mutex::new(None),
        }
    }
}

impl Rotation {
    /// Backends in rotation now.
    pub fn count(&self) -> usize {
        *lock(&self.in_rotation)
    }

    /// The most recent failure of any backend, as `<url>: <reason>`: what
    /// a caller refused for want of a backend should be told.
    pub fn last_failure(&self) -> Option<String> {
        lock(&self.last_failure).clone()
    }

    fn failed(&self, url: &str, reason: &str) {
        *lock(&self.last_failure) = Some(format!("{url}: {reason}"));
    }

    /// Wakes `waker`'s task when the last backend leaves rotation.
    pub fn wake_when_empty(&self, waker: &std::task::Waker) {
        self.emptied.register(waker);
    }

    /// Follows whether any backend is in rotation: `true` from the first
    /// one in, `false` once the last one has left.
    pub fn serving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.serving.subscribe()
    }

    fn enter(&self, count: &mut usize) {
        *count += 1;
        self.serving
            .send_if_modified(|serving| !std::mem::replace(serving, true));
    }

    fn leave(&self, count: &mut usize) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.emptied.wake();
            self.serving
                .send_if_modified(|serving| std::mem::replace(serving, false));
        }
    }
}

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthCheck {
    /// `SERVING`.
    Serving,
    /// Answered, but not `SERVING` (`NOT_SERVING` while draining, ...):
    /// the reason.
    AsksForNoCalls(String),
    /// No answer (cannot connect, TLS refused, timed out, an error): the
    /// reason.
    Failed(String),
}

/// Rotation state of one backend, shared by its service, its prober and
/// the pool.
#[derive(Debug)]
pub struct BackendState {
    url: String,
    policy: EjectionPolicy,
    in_rotation: AtomicBool,
    consecutive_failures: AtomicU32,
    verdicts: Mutex<Verdicts>,
    last_failure: Mutex<Option<String>>,
    /// Each of this backend's services waiting for it to come back: after
    /// a TLS reload an old service and its replacement may both wait, in
    /// tasks of their own, and each must be woken (one slot shared by
    /// both woke only the last to register, and the other, the one the
    /// balancer kept, was never polled again).
    waiting_services: Mutex<Vec<Weak<AtomicWaker>>>,
    rotation: Arc<Rotation>,
    /// Set once the backend has left the pool; nothing may count it again.
    retired: AtomicBool,
    /// In rotation only because no other backend is (see `settle`).
    last_resort: AtomicBool,
    /// Wakes the prober when an ejection starts, so that it can end it on
    /// time.
    pub(crate) ejected: tokio::sync::Notify,
    /// Attempts in flight on this backend.
    in_flight: AtomicU64,
    /// Of those, attempts that were hedged because they were slow.
    slow_attempts: AtomicU64,
    /// Recent attempts: rate and latency, for the status page.
    recent: Window,
    /// The exported series each attempt moves.
    series: BackendSeries,
}

impl BackendState {
    pub(crate) fn new(url: String, policy: EjectionPolicy, rotation: Arc<Rotation>) -> Arc<Self> {
        rotation.enter(&mut lock(&rotation.in_rotation));
        let series = metrics().track_backend(&url);
        Arc::new(Self {
            series,
            url,
            policy,
            in_rotation: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            verdicts: Mutex::new(Verdicts::new()),
            last_failure: Mutex::new(None),
            waiting_services: Mutex::new(Vec::new()),
            rotation,
            retired: AtomicBool::new(false),
            last_resort: AtomicBool::new(false),
            ejected: tokio::sync::Notify::new(),
            in_flight: AtomicU64::new(0),
            slow_attempts: AtomicU64::new(0),
            recent: Window::default(),
        })
        .published()
    }

    /// Publishes the rotation gauges as they are now.
    fn published(self: Arc<Self>) -> Arc<Self> {
        self.publish_gauges();
        self
    }

    fn publish_gauges(&self) {
        let series = &self.series;
        series.up.set(i64::from(self.is_in_rotation()));
        series.healthy.set(i64::from(self.is_healthy()));
        series.ejected.set(i64::from(self.is_ejected()));
    }

    /// Attempts in flight on this backend now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the balancer compares (lower is better): attempts in flight,
    /// and far above any count of those, attempts hedged for being slow.
    ///
    /// Not PeakEWMA: with two backends p2c always compares both, so one
    /// slow reply (a connection set-up, a busy CPU) made a backend look
    /// expensive for seconds and it got no traffic at all. Calls in flight
    /// carry no such memory: idle backends tie and are picked at random,
    /// and a slow backend is avoided as its calls pile up. A hedged attempt
    /// marks its backend slow until it ends, so that the hedge (and every
    /// call meanwhile) goes to a backend without one whenever p2c sees one;
    /// so does an attempt that failed, while its call's retry picks a
    /// backend.
    pub fn load(&self) -> u64 {
        const SLOW_WEIGHT: u64 = 1 << 32;
        self.in_flight().saturating_add(
            self.slow_attempts
                .load(Ordering::Relaxed)
                .saturating_mul(SLOW_WEIGHT),
        )
    }

    /// Counts a retry of an attempt that failed here.
    pub(crate) fn count_retry(&self) {
        self.series.retries.inc();
    }

    /// Marks an attempt in flight here as slow until the mark is dropped.
    pub(crate) fn slow_attempt(self: &Arc<Self>) -> SlowAttempt {
        self.slow_attempts.fetch_add(1, Ordering::Relaxed);
        SlowAttempt {
            state: self.clone(),
        }
    }

    /// Rate and latency of its recent attempts.
    pub fn recent(&self) -> WindowSnapshot {
        self.recent.snapshot()
    }

    /// The backend's URL, e.g. `https://127.0.0.1:5001`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Follows whether any backend of this one's pool is in rotation.
    pub(crate) fn rotation_serving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.rotation.serving()
    }

    /// Whether the balancer may pick this backend.
    pub fn is_in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Acquire)
    }

    /// Whether the last health check answered `SERVING`.
    pub fn is_healthy(&self) -> bool {
        lock(&self.verdicts).is_healthy()
    }

    /// Whether the backend is ejected for failed calls right now.
    pub fn is_ejected(&self) -> bool {
        lock(&self.verdicts).is_ejected(Instant::now())
    }

    /// When the current ejection ends, if one holds the backend out now.
    pub(crate) fn ejection_ends(&self) -> Option<Instant> {
        let now = Instant::now();
        lock(&self.verdicts)
            .ejected_until()
            .filter(|until| *until > now)
    }

    /// The reason of the most recent failure seen, if any.
    pub fn last_failure(&self) -> Option<String> {
        lock(&self.last_failure).clone()
    }

    /// Keeps `reason` as this backend's last failure, and its pool's.
    fn remember_failure(&self, reason: &str) {
        *lock(&self.last_failure) = Some(reason.to_owned());
        self.rotation.failed(&self.url, reason);
    }

    /// A call was answered: the backend is reachable.
    pub(crate) fn call_answered(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A call failed because the backend could not serve it. Logs the lab's
    /// line `Server <url> failed: <reason>`, and ejects the backend after
    /// enough failures in a row unless it is the last one in rotation.
    pub(crate) fn call_failed(&self, reason: &str) {
        tracing::warn!(backend = %self.url, %reason, "Server {} failed: {}", self.url, reason);
        self.remember_failure(reason);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.policy.consecutive_failures {
            return;
        }
        let mut count = lock(&self.rotation.in_rotation);
        if self.retired.load(Ordering::Acquire) || !self.is_in_rotation() || *count <= 1 {
            return;
        }
        let now = Instant::now();
        let time = lock(&self.verdicts).eject(&self.policy, now);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.in_rotation.store(false, Ordering::Release);
        self.rotation.leave(&mut count);
        drop(count);
        self.series.ejections.inc();
        self.publish_gauges();
        tracing::warn!(
            backend = %self.url,
            ejection_ms = time.as_millis() as u64,
            "Server {} ejected for {} ms after {} failed call(s)",
            self.url,
            time.as_millis(),
            failures
        );
        self.ejected.notify_one();
    }

    /// Records a health check.
    pub(crate) fn checked(&self, check: HealthCheck) {
        let reason = match &check {
            HealthCheck::Serving => None,
            HealthCheck::AsksForNoCalls(reason) | HealthCheck::Failed(reason) => Some(reason),
        };
        if let Some(reason) = reason {
            self.remember_failure(reason);
            if self.is_in_rotation() {
                tracing::warn!(backend = %self.url, %reason, "Server {} failed: {}", self.url, reason);
            }
        }
        {
            let mut verdicts = lock(&self.verdicts);
            match check {
                HealthCheck::Serving => verdicts.set_healthy(true),
                HealthCheck::AsksForNoCalls(_) => verdicts.set_asks_for_no_calls(),
                HealthCheck::Failed(_) => verdicts.set_healthy(false),
            }
        }
        self.settle();
    }

    /// Puts the backend in or out of rotation as its verdicts say now:
    /// applies health check results and ends ejections that have run out.
    /// The gauges show the outcome, whatever changed (an ejection that ran
    /// out leaves a last resort in rotation, but no longer ejected).
    pub(crate) fn settle(&self) {
        self.settle_verdicts();
        self.publish_gauges();
    }

    fn settle_verdicts(&self) {
        let mut count = lock(&self.rotation.in_rotation);
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let mut verdicts = lock(&self.verdicts);
        let in_rotation = self.is_in_rotation();
        // A backend that answers its health checks but may not serve by
        // right (it only asks for no calls, as a draining process that
        // still serves does, or it is ejected for failed calls) stays, or
        // comes back, while no other is in rotation: better than refusing
        // every call. It stays ejected meanwhile, and leaves once another
        // is back, at its next check (without checks, when its ejection
        // ends).
        let by_right = verdicts.may_serve(now);
        let last_resort =
            !by_right && verdicts.may_serve_as_last_resort() && *count <= usize::from(in_rotation);
        let may_serve = by_right || last_resort;
        let was_last_resort = self.last_resort.swap(last_resort, Ordering::Relaxed);
        let why = if verdicts.is_ejected(now) {
            "was ejected"
        } else {
            "asks for no new calls"
        };
        if may_serve == in_rotation {
            if in_rotation && was_last_resort && by_right {
                // Its ejection ran out, or it answers SERVING again: a
                // member by right from now on.
                verdicts.returned(now);
                tracing::info!(backend = %self.url, "Server {} is back in rotation", self.url);
            } else if last_resort && in_rotation && !was_last_resort {
                tracing::warn!(
                    backend = %self.url,
                    "Server {} {} but is the last backend in rotation: still used",
                    self.url,
                    why
                );
            }
            return;
        }
        if may_serve {
            // A last resort stays ejected (see above).
            if !last_resort {
                verdicts.returned(now);
            }
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.in_rotation.store(true, Ordering::Release);
            self.rotation.enter(&mut count);
            if last_resort {
                tracing::warn!(
                    backend = %self.url,
                    "Server {} {} but no other backend is in rotation: used again",
                    self.url,
                    why
                );
            } else {
                tracing::info!(backend = %self.url, "Server {} is back in rotation", self.url);
            }
            self.wake_services();
        } else {
            self.in_rotation.store(false, Ordering::Release);
            self.rotation.leave(&mut count);
            tracing::warn!(backend = %self.url, "Server {} is out of rotation", self.url);
        }
    }

    /// A wake-up slot for a new service of this backend, woken when the
    /// backend comes back into rotation.
    fn slot_for_a_service(&self) -> Arc<AtomicWaker> {
        let slot = Arc::new(AtomicWaker::new());
        let mut slots = lock(&self.waiting_services);
        slots.retain(|slot| slot.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Wakes every live service of this backend.
    fn wake_services(&self) {
        lock(&self.waiting_services).retain(|slot| match slot.upgrade() {
            Some(slot) => {
                slot.wake();
                true
            }
            None => false,
        });
    }

    /// Called when the backend leaves the pool for good.
    pub(crate) fn retire(&self) {
        let mut count = lock(&self.rotation.in_rotation);
        // Under the count lock: a prober still finishing a check (an abort
        // does not interrupt it) sees the flag and leaves the count alone.
        self.retired.store(true, Ordering::Release);
        if self.in_rotation.swap(false, Ordering::AcqRel) {
            self.rotation.leave(&mut count);
        }
        drop(count);
        // A series for a backend that left would otherwise claim it is up.
        metrics().forget_backend(&self.url);
    }
}

impl tower::load::Load for Backend {
    type Metric = u64;

    fn load(&self) -> u64 {
        self.state.load()
    }
}

/// An attempt marked slow (see [`BackendState::load`]), unmarked on drop.
#[derive(Debug)]
pub(crate) struct SlowAttempt {
    state: Arc<BackendState>,
}

impl Drop for SlowAttempt {
    fn drop(&mut self) {
        self.state.slow_attempts.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The data path to one backend: its HTTP/2 channel and its state.
pub struct Backend {
    state: Arc<BackendState>,
    channel: Http2Channel,
    attempt_timeout: Duration,
    /// Woken when the backend comes back into rotation.
    back_in_rotation: Arc<AtomicWaker>,
}

impl Backend {
    pub(crate) fn new(
        state: Arc<BackendState>,
        channel: Http2Channel,
        attempt_timeout: Duration,
    ) -> Self {
        Self {
            back_in_rotation: state.slot_for_a_service(),
            state,
            channel,
            attempt_timeout,
        }
    }
}

/// The metadata an attempt carries to its backend: the caller (encoded,
/// always a valid header value), its credentials and its request id.
fn attempt_metadata(attempt: &Attempt) -> http::HeaderMap {
    let mut metadata = http::HeaderMap::with_capacity(8);
    let caller = attempt.caller.as_deref().map(securemesh_tls::encode_caller);
    for (name, value) in [
        (CALLER_HEADER, caller.as_deref()),
        ("authorization", attempt.authorization.as_deref()),
        (
            securemesh::request_id::HEADER,
            attempt.request_id.as_deref(),
        ),
    ] {
        if let Some(mut value) = value.and_then(|value| http::HeaderValue::try_from(value).ok()) {
            // Credentials are never indexed in HPACK's dynamic table, which
            // callers share on a coordinator's backend connection (RFC 7541,
            // 7.1.3). A request id is new on every call: indexing it would
            // only evict entries worth keeping, at a cost on both ends.
            value.set_sensitive(name != CALLER_HEADER);
            metadata.insert(name, value);
        }
    }
    metadata
}

impl tower::Service<Attempt> for Backend {
    type Response = SubmitReply;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<SubmitReply, Status>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.state.is_in_rotation() {
            return Poll::Ready(Ok(()));
        }
        self.back_in_rotation.register(cx.waker());
        // Re-check: a return between the load and the registration would
        // otherwise be missed.
        if self.state.is_in_rotation() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let per_try = self.attempt_timeout;
        // The attempt ends at the per-try timeout or the call's deadline,
        // whichever comes first; the backend learns the time it has.
        let remaining = attempt
            .deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let limited_by_deadline = remaining.is_some_and(|remaining| remaining <= per_try);
        let limit = remaining.map_or(per_try, |remaining| remaining.min(per_try));
        if limit.is_zero() {
            return Box::pin(std::future::ready(Err(Status::deadline_exceeded(
                "deadline exceeded",
            ))));
        }
        // Counted from now, not from the first poll: the balancer may hand
        // out several attempts before any of them runs, and weighs backends
        // by these counts.
        let channel = self.channel.clone();
        let state = self.state.clone();
        attempt.trace.attempted(&state);
        let in_flight = InFlight::start(&state);
        Box::pin(async move {
            let metadata = || attempt_metadata(&attempt);
            let call = channel.unary(SUBMIT_METHOD, &attempt.message, metadata, limit);
            let result = match tokio::time::timeout(limit, call).await {
                // A tonic backend answers CANCELLED when the grpc-timeout we
                // sent expires: that is the caller's deadline passing. (A
                // CANCELLED raised by our own transport is a failed
                // connection, and is retried.)
                Ok(Err(status))
                    if limited_by_deadline
                        && !securemesh::status::is_transport_failure(&status)
                        && matches!(
                            status.code(),
                            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                        ) =>
                {
                    return Err(Status::deadline_exceeded("deadline exceeded"));
                }
                // With time left to the caller, a backend that gave up on
                // the call (CANCELLED when the per-try grpc-timeout ran out,
                // often a moment before our own timer) failed this attempt:
                // retried elsewhere, and counted against the backend.
                Ok(Err(status))
                    if !securemesh::status::is_transport_failure(&status)
                        && matches!(
                            status.code(),
                            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                        ) =>
                {
                    Err(Status::unavailable(format!(
                        "the backend gave up on the call ({}) with time left to the caller",
                        securemesh::status::code_name(status.code())
                    )))
                }
                Ok(result) => result,
                Err(_) if limited_by_deadline => {
                    return Err(Status::deadline_exceeded("deadline exceeded"));
                }
                Err(_) => Err(Status::unavailable(format!(
                    "no reply within the per-try timeout of {} ms",
                    per_try.as_millis()
                ))),
            };
            let failed = matches!(&result, Err(status) if is_backend_failure(status));
            in_flight.finish(failed);
            match &result {
                Err(status) if is_backend_failure(status) => {
                    attempt.trace.failed(&state);
                    state.call_failed(&describe(status));
                }
                Err(status) if status.code() == tonic::Code::DeadlineExceeded => {}
                _ => state.call_answered(),
            }
            result
        })
    }
}

/// One attempt on a backend, counted while it runs. An attempt dropped
/// before it finished (its caller gave up, or it was a hedge that lost)
/// still leaves the count, but is not an outcome of the backend: the
/// recent window records answers and failures only.
struct InFlight {
    state: Arc<BackendState>,
    started: std::time::Instant,
    finished: bool,
}

impl InFlight {
    fn start(state: &Arc<BackendState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.series.in_flight.inc();
        state.series.requests.inc();
        Self {
            state: state.clone(),
            started: std::time::Instant::now(),
            finished: false,
        }
    }

    fn finish(mut self, failed: bool) {
        self.leave();
        if failed {
            self.state.series.failures.inc();
        }
        self.state.recent.record(self.started.elapsed(), !failed);
    }

    fn leave(&mut self) {
        self.finished = true;
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.series.in_flight.dec();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_request_ids_are_never_indexed_and_the_caller_is() {
        let attempt = Attempt {
            caller: Some("spiffe://securemesh/client/Zoë".into()),
            authorization: Some("Bearer abc".into()),
            request_id: Some("r-1".into()),
            ..crate::testing::attempt()
        };
        let metadata = attempt_metadata(&attempt);
        assert_eq!(metadata.len(), 3);
        let caller = &metadata[CALLER_HEADER];
        assert_eq!(caller, "spiffe://securemesh/client/Zo%C3%AB");
        assert!(!caller.is_sensitive());
        assert!(metadata["authorization"].is_sensitive());
        assert!(metadata[securemesh::request_id::HEADER].is_sensitive());
        // No header for what the attempt lacks.
        assert!(attempt_metadata(&crate::testing::attempt()).is_empty());
    }

    #[test]
    fn the_serving_signal_follows_the_first_backend_in_and_the_last_out() {
        let rotation = Arc::new(Rotation::default());
        let mut serving = rotation.serving();
        assert!(!*serving.borrow_and_update());
        let backend = |port: u16| {
            BackendState::new(
                format!("https://127.0.0.1:{port}"),
                EjectionPolicy::default(),
                rotation.clone(),
            )
        };
        let first = backend(2);
        assert!(serving.has_changed().unwrap() && *serving.borrow_and_update());
        let second = backend(3);
        assert!(!serving.has_changed().unwrap(), "still serving: no news");
        first.retire();
        assert!(!serving.has_changed().unwrap(), "one backend is left");
        second.retire();
        assert!(serving.has_changed().unwrap() && !*serving.borrow_and_update());
    }

    #[test]
    fn an_abandoned_attempt_leaves_the_count_but_is_no_outcome() {
        let state = crate::testing::backend_state();
        let abandoned = InFlight::start(&state);
        assert_eq!(state.in_flight.load(Ordering::Relaxed), 1);
        drop(abandoned);
        assert_eq!(state.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(
            state.recent().calls,
            0,
            "a cancelled attempt is not a success"
        );

        InFlight::start(&state).finish(false);
        InFlight::start(&state).finish(true);
        assert_eq!(state.in_flight.load(Ordering::Relaxed), 0);
        let recent = state.recent();
        assert_eq!((recent.calls, recent.failures), (2, 1));
    }

    /// A waker that counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// After a TLS reload the balancer holds an old and a new service of
    /// one backend, each waiting in a task of its own: both are woken when
    /// the backend comes back, whichever registered last.
    #[tokio::test]
    async fn every_service_of_a_backend_is_woken_when_it_comes_back() {
        let (_pki, tls) = crate::testing::coordinator_tls();
        let state = crate::testing::backend_state();
        let service = || {
            let options = crate::channel::ChannelOptions {
                connect_timeout: Duration::from_secs(1),
                keepalive_interval: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(1),
            };
            let channel =
                Http2Channel::new("https://backend.test", tls.rustls_config(), options).unwrap();
            Backend::new(state.clone(), channel, Duration::from_secs(1))
        };
        let (mut old, mut new) = (service(), service());
        state.checked(HealthCheck::Failed("health check timed out".into()));
        assert!(!state.is_in_rotation());
        let counters: Vec<_> = (0..2)
            .map(|_| Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0))))
            .collect();
        for (service, counter) in [&mut new, &mut old].into_iter().zip(&counters) {
            let waker = std::task::Waker::from(counter.clone());
            let mut cx = Context::from_waker(&waker);
            assert!(tower::Service::poll_ready(service, &mut cx).is_pending());
        }
        state.checked(HealthCheck::Serving);
        assert!(state.is_in_rotation());
        for (which, counter) in ["new", "old"].into_iter().zip(&counters) {
            assert_eq!(counter.0.load(Ordering::SeqCst), 1, "the {which} service");
        }
        // A service gone frees its slot at the next one's coming.
        drop(old);
        let _third = service();
        assert_eq!(lock(&state.waiting_services).len(), 2);
    }

    #[test]
    fn a_backend_that_only_asks_for_no_calls_is_the_last_resort() {
        let rotation = Arc::new(Rotation::default());
        let backend = |port: u16| {
            BackendState::new(
                format!("https://127.0.0.1:{port}"),
                EjectionPolicy::default(),
                rotation.clone(),
            )
        };
        let (a, b) = (backend(1), backend(2));
        let draining = || HealthCheck::AsksForNoCalls("health check answered NOT_SERVING".into());
        // One of two drains: it leaves; the other one too, but it is the
        // last: it stays.
        a.checked(draining());
        assert!(!a.is_in_rotation());
        b.checked(draining());
        assert!(b.is_in_rotation());
        assert_eq!(rotation.count(), 1);
        // The last one becomes unreachable: it leaves, and the draining one,
        // at its next check, comes back.
        b.checked(HealthCheck::Failed(
            "health check failed: cannot connect".into(),
        ));
        assert_eq!(rotation.count(), 0);
        a.checked(draining());
        assert!(a.is_in_rotation());
        // A serving backend returns: the draining one leaves at its next
        // check, and the serving one is not a last resort.
        b.checked(HealthCheck::Serving);
        a.checked(draining());
        assert!(!a.is_in_rotation());
        assert!(b.is_in_rotation());
        assert_eq!(rotation.count(), 1);
        // An unreachable backend is never a last resort.
        b.checked(HealthCheck::Failed("health check timed out".into()));
        assert_eq!(rotation.count(), 0);
        b.checked(HealthCheck::Failed("health check timed out".into()));
        assert!(!b.is_in_rotation());
    }

    #[test]
    fn a_retired_backend_is_never_counted_again() {
        let rotation = Arc::new(Rotation::default());
        let state = BackendState::new(
            "https://127.0.0.1:1".into(),
            EjectionPolicy::default(),
            rotation.clone(),
        );
        assert_eq!(rotation.count(), 1);
        state.retire();
        assert_eq!(rotation.count(), 0);
        // A prober that was still finishing a check when it was aborted.
        state.checked(HealthCheck::Serving);
        state.settle();
        assert_eq!(rotation.count(), 0);
        assert!(!state.is_in_rotation());
        // Nor exported again: its series left with it.
        state.call_failed("late failure");
        let exposition = metrics().render();
        assert!(
            !exposition.contains("backend_up{backend=\"https://127.0.0.1:1\"}"),
            "{exposition}"
        );
        assert!(!exposition.contains("backend_in_flight{backend=\"https://127.0.0.1:1\"}"));
    }

    #[test]
    fn passive_failures_eject_but_never_the_last_backend() {
        let rotation = Arc::new(Rotation::default());
        let policy = EjectionPolicy::default();
        let a = BackendState::new("https://a".into(), policy, rotation.clone());
        let b = BackendState::new("https://b".into(), policy, rotation.clone());
        a.call_failed("connection refused");
        assert!(!a.is_in_rotation() && a.is_ejected());
        b.call_failed("connection refused");
        assert!(b.is_in_rotation(), "the last backend was ejected");
        assert_eq!(rotation.count(), 1);
    }

    #[test]
    fn an_ejected_backend_that_passes_its_checks_is_the_last_resort() {
        let rotation = Arc::new(Rotation::default());
        // Ejections that outlast the test, however slow the machine.
        let policy = EjectionPolicy {
            base_time: Duration::from_secs(60),
            max_time: Duration::from_secs(60),
            ..EjectionPolicy::default()
        };
        let a = BackendState::new("https://a".into(), policy, rotation.clone());
        let b = BackendState::new("https://b".into(), policy, rotation.clone());
        a.call_failed("per-try timeout");
        assert!(a.is_ejected());
        // The other backend fails its health check: the rotation empties,
        // and the ejected one (its checks pass) comes back at once.
        b.checked(HealthCheck::Failed("health check timed out".into()));
        assert_eq!(rotation.count(), 0);
        a.settle();
        assert!(a.is_in_rotation() && a.is_ejected());
        assert_eq!(rotation.count(), 1);
        // Draining now, it is still better than no backend at all.
        a.checked(HealthCheck::AsksForNoCalls(
            "health check answered NOT_SERVING".into(),
        ));
        assert!(a.is_in_rotation());
        a.checked(HealthCheck::Serving);
        // Once the other is back, the one still ejected leaves again (at
        // its next check).
        b.checked(HealthCheck::Serving);
        a.checked(HealthCheck::Serving);
        assert!(!a.is_in_rotation());
        assert_eq!(rotation.count(), 1);
        // An ejected one that fails its checks is no last resort.
        a.checked(HealthCheck::Failed("health check timed out".into()));
        b.checked(HealthCheck::Failed("health check timed out".into()));
        a.settle();
        assert!(!a.is_in_rotation());
        assert_eq!(rotation.count(), 0);
    }

    /// A last resort whose ejection runs out is a member like any other:
    /// it stays when another backend is back, and its ejection is over.
    #[tokio::test(start_paused = true)]
    async fn a_last_resort_whose_ejection_runs_out_is_a_member_again() {
        let rotation = Arc::new(Rotation::default());
        let policy = EjectionPolicy {
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(60),
            ..EjectionPolicy::default()
        };
        // Its own name: the gauges are the process's, shared by every test.
        let a = BackendState::new("https://ejection-runs-out".into(), policy, rotation.clone());
        let b = BackendState::new("https://b".into(), policy, rotation.clone());
        a.call_failed("per-try timeout");
        b.checked(HealthCheck::Failed("health check timed out".into()));
        a.settle();
        assert!(a.is_in_rotation() && a.is_ejected());
        tokio::time::advance(Duration::from_secs(11)).await;
        a.settle();
        assert!(a.is_in_rotation() && !a.is_ejected());
        // The gauges say so too, without a health check to publish them.
        assert_eq!((a.series.up.get(), a.series.ejected.get()), (1, 0));
        b.checked(HealthCheck::Serving);
        a.checked(HealthCheck::Serving);
        assert!(a.is_in_rotation());
        assert_eq!(rotation.count(), 2);
        // Back for good from then on: well for the longest ejection time,
        // its ejections are forgiven, and the next lasts the base time.
        tokio::time::advance(Duration::from_secs(61)).await;
        a.call_failed("per-try timeout");
        let ends = a.ejection_ends().expect("not ejected");
        assert_eq!(ends - tokio::time::Instant::now(), Duration::from_secs(10));
    }

    /// Without health checks, the task that ends ejections also brings an
    /// ejected backend back when the rotation empties.
    #[tokio::test]
    async fn without_health_checks_an_ejected_backend_returns_when_the_rotation_empties() {
        let rotation = Arc::new(Rotation::default());
        let policy = EjectionPolicy {
            base_time: Duration::from_secs(60),
            ..EjectionPolicy::default()
        };
        let a = BackendState::new("https://a".into(), policy, rotation.clone());
        let b = BackendState::new("https://b".into(), policy, rotation.clone());
        let readmitting = tokio::spawn(crate::health::readmit(a.clone()));
        a.call_failed("per-try timeout");
        assert!(a.is_ejected());
        b.retire();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !a.is_in_rotation() {
            assert!(Instant::now() < deadline, "the ejected backend stayed out");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rotation.count(), 1);
        readmitting.abort();
    }
}
