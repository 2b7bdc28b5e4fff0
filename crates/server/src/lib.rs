//! The DataService server: verifies and decrypts Fernet tokens from
//! mutually authenticated callers and answers with the plaintext's digest.
//!
//! [`DataHandler`] is the service alone, free of transport concerns;
//! [`serve`] runs it behind our TLS acceptor with health and reflection.

mod handler;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use handler::DataHandler;
use securemesh::v1::data_service_server::DataServiceServer;
pub use securemesh_tls::ServeError;
use tokio::net::TcpListener;

/// Serves `handler` on `listener` with mutual TLS until `shutdown`
/// completes, then drains gracefully (see [`securemesh_tls::serve_mtls`]).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: DataHandler,
    handshake_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    securemesh_tls::serve_mtls(
        listener,
        tls,
        DataServiceServer::new(handler),
        handshake_timeout,
        shutdown,
    )
    .await
}
