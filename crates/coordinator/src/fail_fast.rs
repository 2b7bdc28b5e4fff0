//! Failing fast when no backend is in rotation.
//!
//! A balancer with no ready endpoint waits for one forever; a caller is
//! better served by an immediate `UNAVAILABLE` it can act on. This layer
//! checks the pool before a call is queued for the balancer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Service};

use crate::pool::BackendPool;

/// Answers `UNAVAILABLE` at once while the pool has no backend in rotation.
#[derive(Clone)]
pub struct FailFast<S> {
    inner: S,
    pool: Arc<BackendPool>,
    open: bool,
}

impl<S> FailFast<S> {
    /// Guards `inner` with the state of `pool`.
    pub fn new(inner: S, pool: Arc<BackendPool>) -> Self {
        Self {
            inner,
            pool,
            open: false,
        }
    }
}

impl<S, Request> Service<Request> for FailFast<S>
where
    S: Service<Request, Error = BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.open = self.pool.in_rotation() == 0;
        if self.open {
            Poll::Ready(Ok(()))
        } else {
            self.inner.poll_ready(cx)
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if self.open {
            return Box::pin(std::future::ready(Err(tonic::Status::unavailable(
                "no backend available",
            )
            .into())));
        }
        Box::pin(self.inner.call(request))
    }
}
