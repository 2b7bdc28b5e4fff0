//! Accepting TLS connections for a tonic server.
//!
//! tonic's own TLS cannot take a rustls `ServerConfig` of ours, so we accept
//! TCP connections, run each handshake in its own task with a deadline, and
//! hand finished TLS streams to `Server::serve_with_incoming_shutdown`. A
//! refused or stalled handshake is logged and dropped; it never stops the
//! accept loop.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;

use crate::ReloadableConfig;

/// How many finished handshakes may wait for tonic to pick them up.
const READY_QUEUE: usize = 64;

/// A stream of authenticated TLS connections, for
/// `tonic::transport::Server::serve_with_incoming_shutdown`.
///
/// Dropping it (tonic does when the server shuts down) stops the accept loop
/// and closes the listening socket, so the port is free again at once.
pub struct TlsIncoming {
    ready: ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
}

impl TlsIncoming {
    /// Starts accepting on `listener`, each connection with the
    /// configuration current when it arrives. Handshakes that take longer
    /// than `handshake_timeout` are abandoned.
    pub fn new(
        listener: TcpListener,
        config: ReloadableConfig,
        handshake_timeout: Duration,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(listener, config, handshake_timeout, sender));
        Self {
            ready: ReceiverStream::new(receiver),
        }
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.ready).poll_next(cx)
    }
}

type ReadySender = mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>;

async fn accept_loop(
    listener: TcpListener,
    config: ReloadableConfig,
    handshake_timeout: Duration,
    ready: ReadySender,
) {
    loop {
        let accepted = tokio::select! {
            _ = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // gRPC messages are small and latency-sensitive.
                let _ = stream.set_nodelay(true);
                tokio::spawn(handshake(
                    stream,
                    peer,
                    TlsAcceptor::from(config.current()),
                    handshake_timeout,
                    ready.clone(),
                ));
            }
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    timeout: Duration,
    ready: ReadySender,
) {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let _ = ready.send(Ok(tls)).await;
        }
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "TLS handshake refused");
        }
        Err(_) => {
            tracing::info!(%peer, timeout_ms = timeout.as_millis() as u64, "TLS handshake timed out");
        }
    }
}
