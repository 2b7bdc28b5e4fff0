//! The health service of a server or coordinator: tonic-health's, except
//! that its `Watch` streams end when the process starts shutting down.
//!
//! A `Watch` stream never ends by itself, and a graceful shutdown waits for
//! every open stream: one client watching health (as gRPC clients with
//! client-side health checking do all the time) held every shutdown for
//! the whole drain grace period, and the calls still in flight when it ran
//! out were cut. When the drain delay is over, each watch ends with
//! `UNAVAILABLE`, which tells the watcher to look elsewhere (it has seen
//! `NOT_SERVING` already).

use std::pin::Pin;

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// Reports `service` and the process as a whole (the empty service name,
/// which probes that name no service ask about) `NOT_SERVING`: the process
/// is draining, and whoever probes it should send its calls elsewhere.
pub async fn report_draining(reporter: &HealthReporter, service: &str) {
    for name in [service, ""] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// The health service reporting `reporter`'s statuses, whose watches end
/// once `ending` turns `true`.
pub fn ending_health(
    reporter: HealthReporter,
    ending: watch::Receiver<bool>,
) -> HealthServer<EndingHealth> {
    HealthServer::new(EndingHealth {
        inner: HealthService::from_health_reporter(reporter),
        ending,
    })
    .max_decoding_message_size(securemesh::MAX_SMALL_REQUEST_BYTES)
}

/// See the module documentation.
pub struct EndingHealth {
    inner: HealthService,
    ending: watch::Receiver<bool>,
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EndingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = Statuses;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut ending = self.ending.clone();
        let ended = async move {
            let _ = ending.wait_for(|ending| *ending).await;
        };
        let last = futures_util::stream::once(async {
            Err(Status::unavailable("the server is shutting down"))
        });
        let statuses: Statuses = Box::pin(statuses.take_until(ended).chain(last));
        Ok(Response::new(statuses))
    }
}
