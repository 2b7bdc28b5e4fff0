//! Active health checking: `grpc.health.v1.Health/Check` on each backend at
//! an interval. Anything but `SERVING` (an error, a timeout, `NOT_SERVING`,
//! as a draining server answers) takes a backend out of rotation; `SERVING`
//! lets it back once no ejection holds it out. A backend that answers
//! `NOT_SERVING` is still used while no other is in rotation (a draining
//! process serves during its drain delay), and so is one ejected for
//! failed calls whose checks pass. Without checks, ejections still end
//! when their time runs out, or when no other backend is left.

use std::sync::Arc;
use std::time::Duration;

use securemesh::v1::DATA_SERVICE_NAME;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::backend::{describe, BackendState, HealthCheck};
use crate::channel::Http2Channel;

/// The gRPC path of `grpc.health.v1.Health/Check`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Probes one backend until the task is aborted.
pub(crate) async fn probe(
    state: Arc<BackendState>,
    channel: Http2Channel,
    interval: Duration,
    timeout: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rotation_serving = state.rotation_serving();
    // An empty rotation before this task first ran counts too.
    rotation_serving.mark_changed();
    loop {
        // Wake at the next check, or when an ejection runs out, so that a
        // healthy backend returns as soon as its ejection ends.
        let ejection_ends = state.ejection_ends();
        tokio::select! {
            _ = ticker.tick() => {}
            () = sleep_until_some(ejection_ends) => {
                state.settle();
                continue;
            }
            // A new ejection: wait for its end instead of the next tick.
            () = state.ejected.notified() => continue,
            // The last other backend left: a backend that only asked for
            // no calls (draining), or an ejected one that passes its
            // checks, comes back now, as the last resort, rather than at
            // its next check or at the end of its ejection. The rotation lives as long as
            // the state, so this never ends in an error.
            Ok(()) = rotation_serving.changed() => {
                if !*rotation_serving.borrow_and_update() {
                    state.settle();
                }
                continue;
            }
        }
        let request = HealthCheckRequest {
            service: DATA_SERVICE_NAME.to_owned(),
        };
        let check = channel.unary::<_, HealthCheckResponse>(
            HEALTH_CHECK,
            &request,
            http::HeaderMap::new,
            timeout,
        );
        let outcome = match tokio::time::timeout(timeout, check).await {
            Ok(Ok(reply)) if reply.status == ServingStatus::Serving as i32 => HealthCheck::Serving,
            Ok(Ok(reply)) => {
                let status = ServingStatus::try_from(reply.status)
                    .map(|status| status.as_str_name())
                    .unwrap_or("UNKNOWN");
                HealthCheck::AsksForNoCalls(format!("health check answered {status}"))
            }
            Ok(Err(status)) => {
                HealthCheck::Failed(format!("health check failed: {}", describe(&status)))
            }
            Err(_) => HealthCheck::Failed(format!(
                "health check timed out after {} ms",
                timeout.as_millis()
            )),
        };
        // Also ends an ejection that has run out.
        state.checked(outcome);
    }
}

/// Ends a backend's ejections as they run out, for a pool without health
/// checks ([`probe`] does it as well as checking). Without it an ejected
/// backend would stay out until the process ends. An ejected backend also
/// comes back at once when no other is left in rotation.
pub(crate) async fn readmit(state: Arc<BackendState>) {
    let mut rotation_serving = state.rotation_serving();
    // An empty rotation before this task first ran counts too.
    rotation_serving.mark_changed();
    loop {
        let ejection_ends = state.ejection_ends();
        tokio::select! {
            () = sleep_until_some(ejection_ends) => state.settle(),
            () = state.ejected.notified() => {}
            Ok(()) = rotation_serving.changed() => {
                if !*rotation_serving.borrow_and_update() {
                    state.settle();
                }
            }
        }
    }
}

async fn sleep_until_some(instant: Option<tokio::time::Instant>) {
    match instant {
        Some(instant) => tokio::time::sleep_until(instant).await,
        None => std::future::pending().await,
    }
}
