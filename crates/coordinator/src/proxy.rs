//! The coordinator's own `DataService`: every call goes through the tower
//! stack described in the crate documentation.

use std::sync::Arc;
use std::time::Duration;

use securemesh::v1::data_service_server::DataService;
use securemesh::v1::{SubmitReply, SubmitRequest};
use tonic::{Request, Response, Status};
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::retry::Retry;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt as _};

use crate::fail_fast::FailFast;
use crate::pool::{BackendOptions, BackendPool};
use crate::retry::RetryPolicy;

/// How calls are retried and bounded.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Retries per call after the first attempt.
    pub max_retries: usize,
    /// A call that has found no answer after this long fails.
    pub request_timeout: Duration,
    /// Calls that may wait for the balancer at once.
    pub queue_capacity: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            max_retries: 2,
            request_timeout: Duration::from_secs(10),
            queue_capacity: 1024,
        }
    }
}

type Stack = BoxCloneSyncService<SubmitRequest, SubmitReply, BoxError>;

/// The proxying `DataService`.
#[derive(Clone)]
pub struct Coordinator {
    stack: Stack,
    pool: Arc<BackendPool>,
    request_timeout: Duration,
}

impl Coordinator {
    /// Builds the stack over an empty pool; add backends through
    /// [`Coordinator::pool`]. Must run inside a tokio runtime (the buffer
    /// spawns its worker).
    pub fn new(backends: BackendOptions, options: ProxyOptions) -> Self {
        let (pool, discovery) = BackendPool::new(backends);
        let balance = Balance::new(discovery);
        let buffer = Buffer::new(balance, options.queue_capacity);
        let fail_fast = FailFast::new(buffer, pool.clone());
        let retry = Retry::new(RetryPolicy::new(options.max_retries, 10, 0.2), fail_fast);
        Self {
            stack: BoxCloneSyncService::new(retry),
            pool,
            request_timeout: options.request_timeout,
        }
    }

    /// The backends behind this coordinator.
    pub fn pool(&self) -> &Arc<BackendPool> {
        &self.pool
    }
}

#[tonic::async_trait]
impl DataService for Coordinator {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        let caller = securemesh_tls::request_identity(&request);
        let call = self.stack.clone().oneshot(request.into_inner());
        let reply = match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                let status = into_status(error);
                tracing::info!(%caller, code = ?status.code(), message = status.message(), "Submit failed");
                return Err(status);
            }
            Err(_) => {
                tracing::warn!(%caller, "Submit found no answer in time");
                return Err(Status::deadline_exceeded(format!(
                    "no backend answered within {} ms",
                    self.request_timeout.as_millis()
                )));
            }
        };
        tracing::info!(%caller, server = %reply.server_id, "Submit relayed");
        Ok(Response::new(reply))
    }
}

/// Answers of backends pass through unchanged; failures to reach any
/// backend become `UNAVAILABLE`.
fn into_status(error: BoxError) -> Status {
    match error.downcast::<Status>() {
        Ok(status) if crate::backend::is_backend_failure(&status) => Status::unavailable(format!(
            "no backend could serve the call: {}",
            crate::backend::describe(&status)
        )),
        Ok(status) => *status,
        Err(other) => Status::unavailable(format!("no backend could serve the call: {other}")),
    }
}
