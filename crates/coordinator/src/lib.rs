//! The coordinator: a DataService proxy that spreads calls over backend
//! servers and hides their failures from clients.
//!
//! A call goes through a stack of tower layers, each in its own module:
//!
//! 1. [`retry`]: a failed attempt that is safe to repeat (`UNAVAILABLE`,
//!    connection failures) is sent again, bounded by attempts and by a retry
//!    budget shared by all calls;
//! 2. [`fail_fast`]: with no healthy backend, the call fails at once with
//!    `UNAVAILABLE` instead of queueing;
//! 3. a `tower::buffer::Buffer`, so that many calls share one balancer;
//! 4. `tower::balance::p2c::Balance` over a [`pool::BackendPool`] discovery
//!    stream, comparing backends by PeakEWMA latency;
//! 5. [`backend::Backend`]: one backend's channel, which reports itself not
//!    ready while ejected; [`health`] probes it and brings it back.
//!
//! The coordinator relays tokens as opaque bytes: it never holds a Fernet key.

pub mod backend;
pub mod fail_fast;
pub mod health;
pub mod pool;
pub mod proxy;
pub mod retry;

pub use pool::{BackendOptions, BackendPool, BackendSnapshot};
pub use proxy::{Coordinator, ProxyOptions};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use securemesh::v1::data_service_server::DataServiceServer;
pub use securemesh_tls::ServeError;
use tokio::net::TcpListener;

/// Serves `coordinator` on `listener` with mutual TLS until `shutdown`
/// completes, then drains gracefully (see [`securemesh_tls::serve_mtls`]).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    coordinator: Coordinator,
    handshake_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    securemesh_tls::serve_mtls(
        listener,
        tls,
        DataServiceServer::new(coordinator),
        handshake_timeout,
        shutdown,
    )
    .await
}
