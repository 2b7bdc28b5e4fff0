//! Serving one gRPC service behind our TLS acceptor, together with the
//! standard `grpc.health.v1.Health` service and server reflection.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::{http, Body as HttpBody, Bytes};
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;

use crate::{ReloadableConfig, TlsIncoming};

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from our descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] crate::ReflectionError),
    /// tonic's transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Transport and drain settings of a server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A TLS handshake that takes longer is abandoned.
    pub handshake_timeout: Duration,
    /// After the shutdown signal, how long to keep serving while reporting
    /// `NOT_SERVING`, so that health-checking callers move their traffic
    /// away before connections close.
    pub drain_delay: Duration,
    /// Then, how long in-flight calls may take to finish before serving
    /// returns anyway. The coordinator's front end then cuts the calls
    /// left; on a tonic server they go on in tonic's connection tasks
    /// until the runtime ends (in `securemesh`, the process exits).
    pub drain_grace: Duration,
    /// Concurrent HTTP/2 streams (calls) allowed per connection.
    pub max_concurrent_streams: u32,
    /// Authenticated connections allowed at once; more are closed on
    /// arrival.
    pub max_connections: usize,
    /// Of those, connections allowed at once to one identity (one client
    /// certificate's name), so that no single certificate holder can take
    /// every place; more are closed once their handshake shows who they
    /// are. By default half of `max_connections`.
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress allowed at once; a new connection beyond
    /// them displaces the one that has waited longest if that one has waited
    /// a while (see [`crate::TlsIncoming`]), and is refused otherwise, so
    /// that silent connections cannot keep certificate holders out.
    pub max_handshakes: usize,
    /// HTTP/2 pings to each caller at this interval (`None` or zero:
    /// never); a caller that does not answer one within `keepalive_timeout`
    /// is gone (a crashed host, a cut network leave the TCP connection half
    /// open) and its connection is closed, giving its slot back.
    pub keepalive_interval: Option<Duration>,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// A connection this old is told to go away (HTTP/2 `GOAWAY`): its
    /// caller connects again, possibly elsewhere, so that load spreads
    /// over a server or coordinator started since. Its calls in flight
    /// finish: on a server, however long they take; on the coordinator,
    /// within `drain_grace` (at least a second), after which the
    /// connection is closed (a health watch would otherwise keep it for
    /// good). The coordinator varies each connection's age by up to a
    /// tenth, so that connections opened together do not all go at once.
    /// `None`: no limit.
    pub max_connection_age: Option<Duration>,
    /// Identities (as callers are authorized: a SPIFFE ID, else a name)
    /// for which a quarter of `max_connections` is held: the connections
    /// of all other identities together take at most the rest. On a
    /// server, its allowed callers (the coordinator first): the TLS
    /// handshake admits every certificate of the CA, and health checks
    /// are open to all, so without it a few other certificate holders
    /// could fill the server. Empty: nothing held.
    pub reserved_for: Vec<String>,
}

impl ServeOptions {
    /// How often callers are pinged, if at all: `keepalive_interval`, with
    /// zero read as never (a zero interval would ping without pause, and
    /// tokio's interval refuses it).
    pub fn ping_interval(&self) -> Option<Duration> {
        self.keepalive_interval
            .filter(|interval| !interval.is_zero())
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            drain_grace: Duration::from_secs(10),
            max_concurrent_streams: 256,
            max_connections: 4096,
            max_connections_per_identity: 2048,
            max_handshakes: 256,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: None,
            reserved_for: Vec::new(),
        }
    }
}

/// Serves `service`, health (reporting `service` as `SERVING`) and
/// reflection on `listener` with mutual TLS `tls`, until `shutdown`
/// completes. Then it drains: health turns `NOT_SERVING`, calls are still
/// served for `drain_delay`, then new connections are refused and in-flight
/// calls have `drain_grace` to finish before this returns (calls still
/// in flight then are not stopped: they end with the runtime).
pub async fn serve_mtls<S, B>(
    listener: TcpListener,
    tls: impl Into<ReloadableConfig>,
    service: S,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<B>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    let health = tonic_health::server::HealthReporter::new();
    health.set_serving::<S>().await;
    let (end_watches, ending) = tokio::sync::watch::channel(false);

    let mut routes = RoutesBuilder::default();
    crate::add_health_and_reflection(&mut routes, health.clone(), &ending)?;
    routes.add_service(service);

    let incoming = TlsIncoming::new(listener, tls.into(), &options);
    let closing = Arc::new(tokio::sync::Notify::new());
    let drain = {
        let closing = closing.clone();
        let delay = options.drain_delay;
        async move {
            shutdown.await;
            crate::report_draining(&health, S::NAME).await;
            if !delay.is_zero() {
                tracing::info!(delay_ms = delay.as_millis() as u64, "draining: NOT_SERVING");
                tokio::time::sleep(delay).await;
            }
            tracing::info!("shutting down: finishing in-flight calls");
            let _ = end_watches.send(true);
            closing.notify_one();
        }
    };
    let mut builder = Server::builder()
        .max_concurrent_streams(Some(options.max_concurrent_streams))
        .http2_keepalive_interval(options.ping_interval())
        .http2_keepalive_timeout(Some(options.keepalive_timeout));
    if let Some(age) = options.max_connection_age {
        // Not with tonic's `max_connection_age_grace`: given one, tonic
        // 0.14 sends no GOAWAY at the age and cuts the connection, calls
        // and all, once the grace has run out as well.
        builder = builder.max_connection_age(age);
    }
    let server = builder
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, drain);
    let grace_over = async {
        closing.notified().await;
        tokio::time::sleep(options.drain_grace).await;
    };
    tokio::select! {
        served = server => served?,
        () = grace_over => {
            tracing::warn!(
                grace_ms = options.drain_grace.as_millis() as u64,
                "grace period over: returning with calls still in flight"
            );
        }
    }
    Ok(())
}
