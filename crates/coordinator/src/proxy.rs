//! The coordinator's own `DataService`: every call goes to the balancer,
//! within the caller's deadline.

use std::time::Duration;

use securemesh::v1::data_service_server::DataService;
use securemesh::v1::{SubmitReply, SubmitRequest, SUBMIT_METHOD};
use std::sync::Arc;

use securemesh_balance::{Attempt, BackendOptions, BalanceOptions, Balancer, CallTrace};
use securemesh_telemetry::CallStats;
use tonic::{Request, Response, Status};

use crate::deadline::call_deadline;

/// The proxying `DataService`.
#[derive(Clone)]
pub struct Coordinator {
    balancer: Balancer,
    request_timeout: Duration,
    stats: CallStats,
}

impl Coordinator {
    /// A coordinator over an empty pool; add backends through
    /// [`Coordinator::pool`]. A call without a `grpc-timeout` of its own gets
    /// `request_timeout`. Must run inside a tokio runtime.
    pub fn new(
        backends: BackendOptions,
        options: BalanceOptions,
        request_timeout: Duration,
    ) -> Self {
        Self {
            balancer: Balancer::new(backends, options),
            request_timeout,
            stats: CallStats::default(),
        }
    }

    /// The backends behind this coordinator.
    pub fn pool(&self) -> &std::sync::Arc<securemesh_balance::BackendPool> {
        self.balancer.pool()
    }

    /// The calls this coordinator (and its clones) answered: for the status
    /// page.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }
}

#[tonic::async_trait]
impl DataService for Coordinator {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        let timer = self.stats.start(SUBMIT_METHOD);
        let started = tokio::time::Instant::now();
        let deadline = call_deadline(
            request
                .metadata()
                .get("grpc-timeout")
                .and_then(|value| value.to_str().ok()),
            self.request_timeout,
            started,
        );
        let request_id = securemesh::request_id::of(request.metadata());
        let caller = request
            .extensions()
            .get::<securemesh_tls::Caller>()
            .map(|caller| caller.origin().to_owned())
            .unwrap_or_else(|| securemesh_tls::request_identity(&request));
        let message = request.into_inner();
        let bytes = message.token.len();
        let trace = Arc::new(CallTrace::default());
        // The caller's own credentials stay here: servers trust the
        // coordinator's identity, and learn the caller from the header.
        let outcome = self
            .balancer
            .submit(Attempt {
                message,
                deadline: Some(deadline),
                caller: Some(Arc::from(caller.as_str())),
                authorization: None,
                request_id: Some(Arc::from(request_id.as_str())),
                trace: trace.clone(),
            })
            .await;
        let status = securemesh::status::outcome_name(&outcome);
        let latency = timer.finish(status);
        tracing::info!(
            %request_id,
            %caller,
            method = SUBMIT_METHOD,
            status,
            latency_ms = latency.as_micros() as f64 / 1000.0,
            bytes,
            backend = trace.last_endpoint().as_deref().unwrap_or("none"),
            attempts = trace.attempts(),
            "audit"
        );
        outcome.map(Response::new)
    }
}
