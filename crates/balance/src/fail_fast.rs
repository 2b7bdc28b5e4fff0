//! Failing fast when no backend is in rotation.
//!
//! A balancer with no ready endpoint waits for one forever; a caller is
//! better served by an immediate `UNAVAILABLE` it can act on. This layer
//! wraps the balancer itself (inside the buffer), so that a call already
//! queued when the last backend leaves rotation fails at once too.
//!
//! The refusal is its own error, not a backend's `UNAVAILABLE`: no backend
//! was tried, so the retry layer does not repeat the call (which would only
//! spend the retry budget that the first failures after a recovery need);
//! the balancer answers it as `UNAVAILABLE`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Service};

use crate::backend::Rotation;

/// Why a call was refused without trying a backend.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoBackendInRotation(String);

impl NoBackendInRotation {
    /// A refusal saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// The gRPC status a caller gets.
    pub fn into_status(self) -> tonic::Status {
        tonic::Status::unavailable(self.0)
    }
}

/// Refuses calls ([`NoBackendInRotation`]) while no backend is in rotation
/// and the inner service is not ready.
pub struct FailFast<S> {
    inner: S,
    rotation: Arc<Rotation>,
    open: bool,
    explain: bool,
}

impl<S> FailFast<S> {
    /// Guards `inner` with the rotation state of its pool; with `explain`,
    /// the refusal names the last backend that failed and why.
    pub fn new(inner: S, rotation: Arc<Rotation>, explain: bool) -> Self {
        Self {
            inner,
            rotation,
            open: false,
            explain,
        }
    }
}

impl<S, Request> Service<Request> for FailFast<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Poll::Ready(ready) = self.inner.poll_ready(cx) {
            self.open = false;
            return Poll::Ready(ready.map_err(Into::into));
        }
        // Register before looking, so that a rotation emptied in between
        // still wakes this task.
        self.rotation.wake_when_empty(cx.waker());
        self.open = self.rotation.count() == 0;
        if self.open {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if self.open {
            let last_failure = self.explain.then(|| self.rotation.last_failure()).flatten();
            let message = match last_failure {
                Some(failure) => format!(
                    "no backend in rotation (all failing health checks or ejected); last \
                     failure: {failure}"
                ),
                None => "no backend in rotation (all failing health checks or ejected)".to_owned(),
            };
            return Box::pin(std::future::ready(Err(
                NoBackendInRotation::new(message).into()
            )));
        }
        let call = self.inner.call(request);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}
