//! One backend server as a tower service, and its shared health state.
//!
//! A backend is either in rotation or ejected. While ejected its
//! `poll_ready` stays pending, so the balancer never picks it; the active
//! health prober or a passive observation flips the state and wakes the
//! balancer. Keeping ejected backends pending (instead of failing
//! `poll_ready`) keeps them in the balancer, so a return needs no
//! re-discovery.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use securemesh::v1::data_service_client::DataServiceClient;
use securemesh::v1::{SubmitReply, SubmitRequest};
use tonic::transport::Channel;
use tonic::Status;

/// Who noticed a backend failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observer {
    /// A data call failed at the transport level.
    Passive,
    /// The health prober got no `SERVING` answer.
    Active,
}

/// Counts of the backends in rotation, shared by a pool's backends so that
/// the last backend standing is never ejected by passive observation.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    in_rotation: Mutex<usize>,
}

impl Rotation {
    pub(crate) fn count(&self) -> usize {
        *self
            .in_rotation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Health of one backend, shared by its service, its prober and the pool.
#[derive(Debug)]
pub struct BackendState {
    url: String,
    in_rotation: AtomicBool,
    last_failure: Mutex<Option<String>>,
    waker: AtomicWaker,
    rotation: Arc<Rotation>,
}

impl BackendState {
    pub(crate) fn new(url: String, rotation: Arc<Rotation>) -> Arc<Self> {
        // Optimistic start: a new backend is tried at once; a dead one is
        // ejected by its first failed call or probe.
        *rotation
            .in_rotation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) += 1;
        Arc::new(Self {
            url,
            in_rotation: AtomicBool::new(true),
            last_failure: Mutex::new(None),
            waker: AtomicWaker::new(),
            rotation,
        })
    }

    /// The backend's URL, e.g. `https://127.0.0.1:5001`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the balancer may pick this backend.
    pub fn is_in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Acquire)
    }

    /// The reason of the most recent failure seen, if any.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Puts the backend back in rotation (it answered `SERVING`).
    pub(crate) fn restore(&self) {
        let mut count = self
            .rotation
            .in_rotation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if !self.in_rotation.swap(true, Ordering::AcqRel) {
            *count += 1;
            tracing::info!(backend = %self.url, "Server {} is back in rotation", self.url);
            self.waker.wake();
        }
    }

    /// Records a failure and takes the backend out of rotation, except that
    /// a passive observation never ejects the last backend in rotation: its
    /// calls then fail fast on their own, and the prober decides.
    ///
    /// Logs the lab's line `Server <url> failed: <reason>` for every failed
    /// call, and for a failed probe when it takes the backend out; the
    /// ejection itself is logged once.
    pub(crate) fn eject(&self, observer: Observer, reason: &str) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(reason.to_owned());
        let mut count = self
            .rotation
            .in_rotation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let ejecting = self.is_in_rotation() && (observer == Observer::Active || *count > 1);
        if observer == Observer::Passive || ejecting {
            tracing::warn!(backend = %self.url, %reason, "Server {} failed: {}", self.url, reason);
        }
        if ejecting {
            self.in_rotation.store(false, Ordering::Release);
            *count -= 1;
            tracing::warn!(backend = %self.url, ?observer, "Server {} ejected from rotation", self.url);
        }
    }

    /// Called when the backend leaves the pool for good.
    pub(crate) fn retire(&self) {
        let mut count = self
            .rotation
            .in_rotation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if self.in_rotation.swap(false, Ordering::AcqRel) {
            *count -= 1;
        }
    }
}

/// The data path to one backend: a tonic channel and the backend's health.
pub struct Backend {
    state: Arc<BackendState>,
    client: DataServiceClient<Channel>,
    attempt_timeout: Duration,
}

impl Backend {
    pub(crate) fn new(
        state: Arc<BackendState>,
        channel: Channel,
        attempt_timeout: Duration,
    ) -> Self {
        Self {
            state,
            client: DataServiceClient::new(channel),
            attempt_timeout,
        }
    }
}

impl tower::Service<SubmitRequest> for Backend {
    type Response = SubmitReply;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<SubmitReply, Status>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.state.is_in_rotation() {
            return Poll::Ready(Ok(()));
        }
        self.state.waker.register(cx.waker());
        // Re-check: a restore between the load and the registration would
        // otherwise be missed.
        if self.state.is_in_rotation() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, request: SubmitRequest) -> Self::Future {
        let mut client = self.client.clone();
        let state = self.state.clone();
        let attempt_timeout = self.attempt_timeout;
        Box::pin(async move {
            let result = match tokio::time::timeout(attempt_timeout, client.submit(request)).await {
                Ok(result) => result.map(tonic::Response::into_inner),
                Err(_) => Err(Status::unavailable(format!(
                    "no reply within {} ms",
                    attempt_timeout.as_millis()
                ))),
            };
            if let Err(status) = &result {
                if is_backend_failure(status) {
                    state.eject(Observer::Passive, &describe(status));
                }
            }
            result
        })
    }
}

pub use securemesh::status::{describe, is_unavailable as is_backend_failure};
