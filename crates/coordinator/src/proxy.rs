//! What the coordinator does with a `Submit`: relay it through the
//! balancer within the caller's deadline, tell the backend who the caller
//! was, count it and write its audit line.

use std::sync::Arc;
use std::time::Duration;

use securemesh::v1::{SubmitReply, SubmitRequest, SUBMIT_METHOD};

use securemesh_balance::{Attempt, BackendOptions, BalanceOptions, Balancer, CallTrace};
use securemesh_telemetry::CallStats;
use tonic::Status;

use crate::deadline::call_deadline;

/// The proxying `DataService`; [`crate::serve`] serves it.
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

/// What the coordinator needs to know of a call besides its message.
pub(crate) struct CallContext {
    /// When the caller stops waiting (see [`Coordinator::deadline`]).
    deadline: tokio::time::Instant,
    request_id: String,
    caller: String,
}

impl Coordinator {
    /// When the caller of a call that `arrived` with `headers` stops
    /// waiting: its `grpc-timeout` (less a margin), at most the request
    /// timeout.
    pub(crate) fn deadline(
        &self,
        headers: &http::HeaderMap,
        arrived: tokio::time::Instant,
    ) -> tokio::time::Instant {
        call_deadline(
            headers
                .get("grpc-timeout")
                .and_then(|value| value.to_str().ok()),
            self.request_timeout,
            arrived,
        )
    }

    /// The context of a call with `metadata` and `deadline` (see
    /// [`Coordinator::deadline`]); the caller is the one
    /// [`securemesh_tls::Authorization`] established.
    pub(crate) fn context(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        caller: Option<&securemesh_tls::Caller>,
        deadline: tokio::time::Instant,
    ) -> CallContext {
        CallContext {
            deadline,
            request_id: securemesh::request_id::of(metadata),
            caller: caller
                .map_or_else(|| "unknown".to_owned(), |caller| caller.origin().to_owned()),
        }
    }

    /// Reads one `Submit`'s `message` and relays it through the balancer,
    /// both within the caller's deadline, and writes its audit line: for
    /// a message refused on arrival (too large, compressed, malformed, too
    /// slow) and a call its caller abandons too.
    pub(crate) async fn relay(
        &self,
        message: impl std::future::Future<Output = Result<SubmitRequest, Status>>,
        context: CallContext,
    ) -> Result<SubmitReply, Status> {
        let CallContext {
            deadline,
            request_id,
            caller,
        } = context;
        let mut audit = Audit {
            timer: Some(self.stats.start(SUBMIT_METHOD)),
            request_id,
            caller,
            bytes: 0,
            trace: Arc::new(CallTrace::default()),
        };
        // The deadline holds from the call's arrival: a message that never
        // finishes arriving does not hold the stream forever.
        let message = match tokio::time::timeout_at(deadline, message).await {
            Err(_) => Err(Status::deadline_exceeded(
                "the request's message did not arrive within its deadline",
            )),
            Ok(message) => message,
        };
        let outcome = match message {
            Err(status) => Err(status),
            Ok(message) => {
                audit.bytes = message.token.len();
                // The caller's own credentials stay here: servers trust the
                // coordinator's identity, and learn the caller from the
                // header.
                self.balancer
                    .submit(Attempt {
                        message,
                        deadline: Some(deadline),
                        caller: Some(Arc::from(audit.caller.as_str())),
                        authorization: None,
                        request_id: Some(Arc::from(audit.request_id.as_str())),
                        trace: audit.trace.clone(),
                    })
                    .await
            }
        };
        audit.finish(securemesh::status::outcome_name(&outcome));
        outcome
    }
}

/// The accounting of one relayed call: counted and audited once it is
/// answered, or as `CANCELLED` when its caller abandons it (the relay is
/// dropped).
struct Audit {
    timer: Option<securemesh_telemetry::CallTimer>,
    request_id: String,
    caller: String,
    bytes: usize,
    trace: Arc<CallTrace>,
}

impl Audit {
    fn finish(&mut self, status: &'static str) {
        let Some(timer) = self.timer.take() else {
            return;
        };
        let latency = timer.finish(status);
        tracing::info!(
            request_id = %self.request_id,
            caller = %securemesh::text::field(&self.caller),
            method = SUBMIT_METHOD,
            status,
            latency_ms = latency.as_micros() as f64 / 1000.0,
            bytes = self.bytes,
            backend = self.trace.last_endpoint().as_deref().unwrap_or("none"),
            attempts = self.trace.attempts(),
            "audit"
        );
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}
