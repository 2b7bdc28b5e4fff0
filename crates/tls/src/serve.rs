//! Serving one gRPC service behind our TLS acceptor, together with the
//! standard `grpc.health.v1.Health` service and server reflection.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;

use crate::TlsIncoming;

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from our descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] securemesh::ReflectionError),
    /// tonic's transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service`, health (reporting `service` as `SERVING`) and
/// reflection on `listener` with mutual TLS `tls`, until `shutdown`
/// completes. Then health turns `NOT_SERVING`, new connections are refused
/// and in-flight calls finish before this returns.
pub async fn serve_mtls<S>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: S,
    handshake_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<S>().await;

    let mut routes = RoutesBuilder::default();
    routes.add_service(health_service);
    securemesh::add_reflection(&mut routes)?;
    routes.add_service(service);

    let incoming = TlsIncoming::new(listener, tls, handshake_timeout);
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<S>().await;
        tracing::info!("shutting down: finishing in-flight calls");
    };
    Server::builder()
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
