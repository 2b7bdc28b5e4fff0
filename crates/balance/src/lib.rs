//! Fault-tolerant calls of `securemesh.v1.DataService` over several
//! endpoints: the coordinator uses it toward servers, and the client toward
//! several coordinators.
//!
//! A call goes through a stack of tower layers, each in its own module:
//!
//! 1. [`retry`]: a failed attempt that is safe to repeat (`UNAVAILABLE`,
//!    connection failures, an attempt timeout) is sent again, bounded per
//!    call and by a retry budget shared by all calls;
//! 2. [`hedge`] (when enabled): an attempt that has not answered within a
//!    delay gets a second one on another backend, paid for from the same
//!    budget; the first answer wins;
//! 3. a `tower::buffer::Buffer`, so that many calls share one balancer;
//! 4. [`fail_fast`]: with no endpoint in rotation the call fails at once
//!    with `UNAVAILABLE` instead of waiting in the balancer;
//! 5. `tower::balance::p2c::Balance` over a [`pool::BackendPool`] discovery
//!    stream, comparing endpoints by their calls in flight;
//! 6. [`backend::Backend`]: one endpoint's [`channel::Http2Channel`] (an
//!    HTTP/2 connection of our own, not tonic's `Channel`). It bounds each
//!    attempt by the per-try timeout and the call's deadline, passes the
//!    remaining time on as `grpc-timeout`, and reports itself not ready
//!    while out of rotation: ejected after consecutive failures
//!    ([`outlier`]), or failing its active [`health`] checks.

pub mod backend;
pub mod changes;
pub mod channel;
pub mod fail_fast;
pub mod health;
pub mod hedge;
pub mod outlier;
pub mod pool;
pub mod retry;

use std::sync::Arc;

use securemesh::v1::{SubmitReply, SubmitRequest};
use tokio::time::Instant;
use tonic::Status;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::retry::Retry;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt as _};

pub use outlier::EjectionPolicy;
pub use pool::{BackendOptions, BackendPool, BackendSnapshot, PoolError};

/// One attempt's request: the message and the call's deadline, if any.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The message, relayed as it is.
    pub message: SubmitRequest,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// The original caller's identity, passed to the endpoint in
    /// `x-securemesh-caller` (which servers believe only from a
    /// coordinator).
    pub caller: Option<Arc<str>>,
    /// `authorization` metadata for the endpoint (a client's credentials).
    pub authorization: Option<Arc<str>>,
    /// The call's request id, sent as `x-request-id`.
    pub request_id: Option<Arc<str>>,
    /// Filled in as attempts are made: how many, and the last endpoint.
    pub trace: Arc<CallTrace>,
}

/// What happened to a call inside the balancer, for its audit line and
/// its retries.
#[derive(Debug, Default)]
pub struct CallTrace {
    attempts: std::sync::atomic::AtomicU32,
    last_backend: std::sync::Mutex<Option<Arc<backend::BackendState>>>,
    /// When the last attempt was sent to its backend.
    last_attempted_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Backends this call's attempts failed on since its last retry.
    failed_on: std::sync::Mutex<Vec<Arc<backend::BackendState>>>,
    /// Marks that keep the balancer off those backends while it picks the
    /// retry's backend (see [`CallTrace::avoid_failed`]).
    avoiding: std::sync::Mutex<Vec<backend::SlowAttempt>>,
}

impl CallTrace {
    /// Attempts made (0 if the call never reached an endpoint).
    pub fn attempts(&self) -> u32 {
        self.attempts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the last attempt was sent to its backend.
    pub(crate) fn last_attempted_at(&self) -> Option<tokio::time::Instant> {
        *lock(&self.last_attempted_at)
    }

    /// The endpoint of the last attempt.
    pub fn last_endpoint(&self) -> Option<String> {
        self.last_backend().map(|backend| backend.url().to_owned())
    }

    /// The backend of the last attempt.
    pub(crate) fn last_backend(&self) -> Option<Arc<backend::BackendState>> {
        lock(&self.last_backend).clone()
    }

    /// An attempt of this call was sent to `backend`: the balancer has
    /// picked, so the backends avoided for the pick are avoided no more.
    pub(crate) fn attempted(&self, backend: &Arc<backend::BackendState>) {
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *lock(&self.last_attempted_at) = Some(tokio::time::Instant::now());
        *lock(&self.last_backend) = Some(backend.clone());
        let picked = std::mem::take(&mut *lock(&self.avoiding));
        drop(picked);
    }

    /// An attempt of this call failed on `backend` (it could not serve).
    pub(crate) fn failed(&self, backend: &Arc<backend::BackendState>) {
        lock(&self.failed_on).push(backend.clone());
    }

    /// Before a retry: marks every backend an attempt failed on since the
    /// last retry as slow until the retry's attempt has a backend, so that
    /// the balancer picks one of them only when every backend it compares
    /// is marked. Other calls meanwhile avoid them too, for that moment.
    pub(crate) fn avoid_failed(&self) {
        let failed = std::mem::take(&mut *lock(&self.failed_on));
        let marks = failed.iter().map(|backend| backend.slow_attempt());
        lock(&self.avoiding).extend(marks);
    }
}

/// How calls are retried and queued.
#[derive(Debug, Clone)]
pub struct BalanceOptions {
    /// Retries per call after the first attempt.
    pub max_retries: usize,
    /// Retries always allowed per second, whatever the traffic (below
    /// `i32::MAX`; more counts as that).
    pub min_retries_per_sec: u32,
    /// Beyond that floor, retries as a share of calls (over ten seconds),
    /// from 0 to 1000; outside that, the nearest end (NaN counts as 0).
    pub retry_ratio: f32,
    /// Calls that may wait for the balancer at once.
    pub queue_capacity: usize,
    /// Hedge an attempt that has not answered within this long (see
    /// [`hedge`]); `None` never hedges.
    pub hedge_after: Option<std::time::Duration>,
    /// Say in a fail-fast `UNAVAILABLE` which backend failed last and why
    /// (a client, about its own targets); off where the caller is someone
    /// else (a proxy's callers need not learn its backends' addresses).
    pub explain_failures: bool,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            max_retries: 2,
            min_retries_per_sec: 10,
            retry_ratio: 0.2,
            queue_capacity: 1024,
            hedge_after: None,
            explain_failures: false,
        }
    }
}

type Stack = BoxCloneSyncService<Attempt, SubmitReply, BoxError>;

/// Calls `Submit` on the best endpoint of a pool, retrying elsewhere.
/// Cloning is cheap and shares the pool, balancer and retry budget.
#[derive(Clone)]
pub struct Balancer {
    stack: Stack,
    pool: Arc<BackendPool>,
    explain_failures: bool,
}

impl Balancer {
    /// Builds the stack over an empty pool; add endpoints through
    /// [`Balancer::pool`]. Must run inside a tokio runtime (the buffer
    /// spawns its worker).
    pub fn new(backends: BackendOptions, options: BalanceOptions) -> Self {
        let (pool, discovery) = BackendPool::new(backends);
        let balance = Balance::new(discovery);
        let fail_fast =
            fail_fast::FailFast::new(balance, pool.rotation(), options.explain_failures);
        let buffer = Buffer::new(fail_fast, options.queue_capacity);
        let budget = retry::budget(options.min_retries_per_sec, options.retry_ratio);
        let attempts: Stack = match options.hedge_after {
            Some(delay) => BoxCloneSyncService::new(hedge::Hedge::new(
                buffer,
                delay,
                budget.clone(),
                pool.rotation(),
                retry::max_attempts(options.max_retries),
            )),
            None => BoxCloneSyncService::new(buffer),
        };
        let retry = Retry::new(
            retry::RetryPolicy::new(options.max_retries, budget),
            attempts,
        );
        Self {
            stack: BoxCloneSyncService::new(retry),
            pool,
            explain_failures: options.explain_failures,
        }
    }

    /// The endpoints behind this balancer.
    pub fn pool(&self) -> &Arc<BackendPool> {
        &self.pool
    }

    /// Submits `attempt.message`, giving up at `attempt.deadline`.
    ///
    /// Answers of endpoints (such as `INVALID_ARGUMENT`) come back
    /// unchanged; when no endpoint could serve the call the status is
    /// `UNAVAILABLE`, and `DEADLINE_EXCEEDED` when the deadline passed.
    pub async fn submit(&self, attempt: Attempt) -> Result<SubmitReply, Status> {
        let deadline = attempt.deadline;
        let trace = attempt.trace.clone();
        let call = self.stack.clone().oneshot(attempt);
        let outcome = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                Ok(outcome) => outcome,
                Err(_) => return Err(Status::deadline_exceeded("deadline exceeded")),
            },
            None => call.await,
        };
        outcome.map_err(|error| into_status(error, trace.attempts() > 0, self.explain_failures))
    }
}

/// Answers of endpoints pass through unchanged; failures to reach any
/// endpoint become `UNAVAILABLE`. When the call did reach endpoints, an
/// `UNAVAILABLE` tells the caller not to retry it again: what retries
/// there were to make against those backends were made here (as many as
/// the policy and the retry budget allowed, none if they allow none), and
/// a client retrying through another coordinator would reach the same
/// backends, multiplying the load on them. When no endpoint was in
/// rotation it does not, so that a client can still try another
/// coordinator. Why the last endpoint could not be
/// reached (an address, a certificate's names) is said only if `explain`.
fn into_status(error: BoxError, reached_endpoints: bool, explain: bool) -> Status {
    const UNSERVED: &str = "no backend could serve the call";
    let status = match error.downcast::<fail_fast::NoBackendInRotation>() {
        Ok(refused) => refused.into_status(),
        Err(error) => match error.downcast::<Status>() {
            Ok(status) if securemesh::status::is_transport_failure(&status) => {
                if explain {
                    Status::unavailable(format!("{UNSERVED}: {}", backend::describe(&status)))
                } else {
                    Status::unavailable(UNSERVED)
                }
            }
            Ok(status) => *status,
            Err(other) if explain => Status::unavailable(format!("{UNSERVED}: {other}")),
            Err(_) => Status::unavailable(UNSERVED),
        },
    };
    if reached_endpoints && status.code() == tonic::Code::Unavailable {
        securemesh::status::with_no_retry(status)
    } else {
        status
    }
}

/// Locks `mutex`; one poisoned by a panic while it was held is used as it
/// is, as every lock of this crate always did.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// What the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use http::{HeaderMap, HeaderValue};
    use securemesh::frame;

    use crate::lock;

    /// An attempt of an empty message, without deadline or metadata.
    pub(crate) fn attempt() -> super::Attempt {
        super::Attempt {
            message: securemesh::v1::SubmitRequest::default(),
            deadline: None,
            caller: None,
            authorization: None,
            request_id: None,
            trace: Default::default(),
        }
    }

    /// A backend of its own rotation, for traces.
    pub(crate) fn backend_state() -> std::sync::Arc<crate::backend::BackendState> {
        crate::backend::BackendState::new(
            "https://backend.test".into(),
            crate::EjectionPolicy::default(),
            std::sync::Arc::default(),
        )
    }

    /// A fresh PKI in a temporary directory (kept alive by the returned
    /// handle) and the coordinator's client TLS from it.
    pub(crate) fn coordinator_tls() -> (tempfile::TempDir, securemesh_tls::ClientTls) {
        let dir = tempfile::tempdir().unwrap();
        securemesh_pki::init(&securemesh_pki::InitOptions {
            days: 1,
            ..securemesh_pki::InitOptions::new(dir.path().to_owned())
        })
        .unwrap();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "coordinator");
        let tls = securemesh_tls::client_tls_config(&files).unwrap();
        (dir, tls)
    }

    /// A health endpoint on h2 that answers `SERVING` to everything, after
    /// holding each new connection for `handshake_delay` before its TLS
    /// handshake; returns its port and how many connections it accepted.
    pub(crate) async fn slow_endpoint(
        dir: &std::path::Path,
        handshake_delay: Duration,
    ) -> SlowEndpoint {
        let files = securemesh_tls::TlsFiles::in_dir(dir, "server");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(securemesh_tls::server_config(&files, None).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed_count = closed.clone();
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let told_all = told.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let closed_count = closed_count.clone();
                let told = told_all.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(handshake_delay).await;
                    let tls = acceptor.accept(tcp).await.unwrap();
                    let mut connection = h2::server::handshake(tls).await.unwrap();
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        if let Some(timeout) = request.headers().get("grpc-timeout") {
                            let timeout = timeout.to_str().unwrap_or_default().to_owned();
                            lock(&told).push(timeout);
                        }
                        let reply = tonic_health::pb::HealthCheckResponse { status: 1 };
                        // A caller that gave up has reset its stream.
                        let Ok(mut sending) = respond.send_response(http::Response::new(()), false)
                        else {
                            continue;
                        };
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let _ = sending.send_data(frame::encode(&reply), false);
                        let _ = sending.send_trailers(trailers);
                    }
                    closed_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        SlowEndpoint {
            port,
            accepted,
            closed,
            told,
        }
    }

    /// What [`slow_endpoint`] gives: its port, how many connections it
    /// accepted and saw closed, and every `grpc-timeout` it was told.
    pub(crate) struct SlowEndpoint {
        pub(crate) port: u16,
        pub(crate) accepted: Arc<std::sync::atomic::AtomicUsize>,
        pub(crate) closed: Arc<std::sync::atomic::AtomicUsize>,
        pub(crate) told: Arc<std::sync::Mutex<Vec<String>>>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_refused_for_want_of_a_backend_is_not_retried() {
        let (_dir, tls) = testing::coordinator_tls();
        let balancer = Balancer::new(
            BackendOptions::new(tls),
            BalanceOptions {
                hedge_after: Some(std::time::Duration::from_millis(1)),
                ..BalanceOptions::default()
            },
        );
        let retries_without_backend = || {
            securemesh_telemetry::metrics()
                .backend_retries
                .with_label_values(&["none"])
                .get()
        };
        let before = retries_without_backend();
        for _ in 0..30 {
            let status = balancer.submit(testing::attempt()).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.message().starts_with("no backend in rotation"),
                "{status:?}"
            );
        }
        assert_eq!(retries_without_backend(), before);
    }

    #[test]
    fn failed_backends_are_avoided_only_while_the_retry_picks() {
        let trace = CallTrace::default();
        let (failed, other) = (testing::backend_state(), testing::backend_state());
        trace.attempted(&failed);
        trace.failed(&failed);
        trace.avoid_failed();
        assert!(failed.load() >= 1 << 32, "not marked");
        trace.attempted(&other);
        assert_eq!(failed.load(), 0, "still marked after the pick");
        // Each failure is avoided once: a later retry marks only newer ones.
        trace.avoid_failed();
        assert_eq!(failed.load(), 0);
    }

    #[test]
    fn only_a_call_that_reached_endpoints_forbids_retrying_it() {
        let failed = || -> BoxError {
            Box::new(fail_fast::NoBackendInRotation::new(
                "no backend in rotation",
            ))
        };
        let tried = into_status(failed(), true, false);
        assert!(securemesh::status::forbids_retry(&tried));
        let never_tried = into_status(failed(), false, false);
        assert!(!securemesh::status::forbids_retry(&never_tried));
        let answer = into_status(Box::new(Status::invalid_argument("bad token")), true, false);
        assert_eq!(answer.code(), tonic::Code::InvalidArgument);
        assert!(!securemesh::status::forbids_retry(&answer));
    }

    #[test]
    fn why_a_backend_was_unreachable_is_said_only_when_asked() {
        let unreachable = || -> BoxError {
            let cause = std::io::Error::other("connection refused by 10.0.0.5:5001");
            Box::new(Status::from_error(Box::new(cause)))
        };
        let explained = into_status(unreachable(), true, true);
        assert_eq!(explained.code(), tonic::Code::Unavailable);
        assert!(
            explained.message().contains("10.0.0.5:5001"),
            "{explained:?}"
        );
        let kept = into_status(unreachable(), true, false);
        assert_eq!(kept.code(), tonic::Code::Unavailable);
        assert_eq!(kept.message(), "no backend could serve the call");
    }
}
