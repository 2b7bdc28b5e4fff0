//! Active health checking: `grpc.health.v1.Health/Check` on each backend at
//! an interval. `SERVING` puts a backend in rotation; anything else (an
//! error, a timeout, `NOT_SERVING`) takes it out.

use std::sync::Arc;
use std::time::Duration;

use securemesh::v1::DATA_SERVICE_NAME;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::backend::{describe, BackendState, Observer};

/// Probes one backend until the task is aborted.
pub(crate) async fn probe(
    state: Arc<BackendState>,
    channel: Channel,
    interval: Duration,
    timeout: Duration,
) {
    let mut client = HealthClient::new(channel);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let request = HealthCheckRequest {
            service: DATA_SERVICE_NAME.to_owned(),
        };
        match tokio::time::timeout(timeout, client.check(request)).await {
            Ok(Ok(reply)) if reply.get_ref().status == ServingStatus::Serving as i32 => {
                state.restore();
            }
            Ok(Ok(reply)) => {
                let status = ServingStatus::try_from(reply.get_ref().status)
                    .map(|status| status.as_str_name())
                    .unwrap_or("UNKNOWN");
                state.eject(Observer::Active, &format!("health check answered {status}"));
            }
            Ok(Err(status)) => {
                state.eject(
                    Observer::Active,
                    &format!("health check failed: {}", describe(&status)),
                );
            }
            Err(_) => {
                state.eject(
                    Observer::Active,
                    &format!("health check timed out after {} ms", timeout.as_millis()),
                );
            }
        }
    }
}
