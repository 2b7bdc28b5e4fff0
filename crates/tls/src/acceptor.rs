//! Accepting TLS connections, for a tonic server or the coordinator's
//! HTTP/2 front end.
//!
//! tonic's own TLS cannot take a rustls `ServerConfig` of ours, so we accept
//! TCP connections, run each handshake in its own task with a deadline, and
//! hand finished TLS streams on: to `Server::serve_with_incoming_shutdown`,
//! or to the front end, which serves each connection itself. A
//! refused or stalled handshake is logged (at most a line a second of each
//! kind: see [`crate::throttle`]) and dropped; it never stops the accept
//! loop. At most a set number of connections are open at once;
//! beyond that, new ones are closed at once (and logged), so that many idle
//! or slow connections cannot exhaust the process. One identity (a client
//! certificate's name) may hold only some of them, so that one certificate
//! holder cannot take every place from the others (the coordinator, say);
//! and a quarter of the places can be held for some identities (a
//! server's allowed callers), so that several other certificate holders
//! together cannot take them all either.
//!
//! Handshakes in progress have their own, smaller limit: anyone who can
//! reach the port can start one without a certificate, so they must not take
//! the places of authenticated connections. When that limit is reached, a
//! new connection displaces the handshake that has waited longest, if that
//! one has waited a while ([`displaceable_after`]), instead of being
//! refused: connections opened and left silent (slowloris) are the ones
//! that go, while a genuine client's handshake, done in a few round trips,
//! gets through. A burst of new connections, all young, is refused beyond
//! the limit rather than displacing itself.
//!
//! When the server's configuration is replaced (a new CRL, on SIGHUP), each
//! open connection verifies its client's certificate again with the new
//! one, at its next read; a certificate now revoked (or expired) closes the
//! connection instead of keeping it for as long as the client likes. A
//! connection also ends at its first read after its client's certificate
//! expires.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use securemesh::places::{Place, PlacesByKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;

use securemesh_telemetry::{metrics, Metrics};

use crate::server::Verdicts;
use crate::throttle::CONNECTION_EVENTS;
use crate::{ReloadableConfig, ServeOptions};

/// How many finished handshakes may wait for tonic to pick them up.
const READY_QUEUE: usize = 64;

/// A stream of authenticated TLS connections, for
/// `tonic::transport::Server::serve_with_incoming_shutdown` or any other
/// consumer of a stream of connections.
///
/// Dropping it (tonic does when the server shuts down) stops the accept loop
/// and closes the listening socket, so the port is free again at once.
pub struct TlsIncoming {
    ready: ReceiverStream<Result<Connection, std::io::Error>>,
}

/// An accepted, authenticated connection. It holds one of the listener's
/// connection permits until it closes.
pub struct Connection {
    stream: TlsStream<TcpStream>,
    /// The peer's identity, read from its certificate once, at the
    /// handshake, instead of on every call.
    identity: Option<Arc<str>>,
    /// A new client verifier to judge the peer by, when the configuration
    /// is replaced.
    verdicts: Verdicts,
    /// When the peer's certificate expires, by the wall clock (as
    /// certificates are judged: the monotonic clock stops while a machine
    /// sleeps, and would let a connection outlive its certificate).
    expires: Option<SystemTime>,
    /// Until the peer's HTTP/2 preface has arrived: when it must have, and
    /// how many of its bytes are still to come. A peer that finishes TLS
    /// and then says nothing (or part of the preface) would otherwise hold
    /// its connection slot for good: HTTP/2 pings start only after the
    /// preface.
    preface_by: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    /// Why the peer's certificate is no longer accepted: every read fails.
    refused: Option<String>,
    _slot: Slot,
}

/// One of the listener's connection permits and one of its identity's
/// places (and, for an identity without a reserve, one of the places left
/// to those), counted in the `connections_open` gauge while held.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _place: Place<Option<Arc<str>>>,
    _unreserved: Option<OwnedSemaphorePermit>,
}

/// Why a connection got no slot.
enum NoSlot {
    /// Every connection place is taken.
    Connections,
    /// Its identity holds as many connections as one may.
    Identity,
    /// The places not held for the reserved identities are taken.
    Unreserved,
}

impl Slot {
    /// A slot for a connection of `identity`, if there is a place left:
    /// its identity's own and its share's are judged first, so that a
    /// connection refused for them never holds, even for an instant, one
    /// of the places all connections share.
    fn new(identity: Option<Arc<str>>, limits: &Limits) -> Result<Self, NoSlot> {
        let unreserved = match &limits.unreserved {
            Some((places, reserved_for))
                if !identity
                    .as_deref()
                    .is_some_and(|identity| reserved_for.contains(identity)) =>
            {
                Some(
                    places
                        .clone()
                        .try_acquire_owned()
                        .map_err(|_| NoSlot::Unreserved)?,
                )
            }
            _ => None,
        };
        let place = limits
            .per_identity
            .take(identity, limits.max_per_identity)
            .ok_or(NoSlot::Identity)?;
        let permit = limits
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| NoSlot::Connections)?;
        metrics().connections_open.inc();
        Ok(Self {
            _permit: permit,
            _place: place,
            _unreserved: unreserved,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics().connections_open.dec();
    }
}

/// Connections held by each identity (`None`: a certificate that names
/// none, all counted together).
type PerIdentity = PlacesByKey<Option<Arc<str>>>;

impl TlsIncoming {
    /// Starts accepting on `listener`, each connection with the
    /// configuration current when it arrives, within `options`' limits:
    /// handshakes that take longer than `handshake_timeout` are abandoned,
    /// at most `max_handshakes` run at once (a newcomer displaces the
    /// oldest if it has waited a while, and is refused otherwise), and at
    /// most `max_connections` authenticated connections are kept.
    pub fn new(listener: TcpListener, config: ReloadableConfig, options: &ServeOptions) -> Self {
        Metrics::declare_reasons(&metrics().handshake_failures, &HANDSHAKE_FAILURE_REASONS);
        Metrics::declare_reasons(
            &metrics().connections_refused,
            &["connections", "handshakes", "identity", "reserved"],
        );
        let (sender, receiver) = mpsc::channel(READY_QUEUE);
        let limits = Limits {
            handshake_timeout: options.handshake_timeout,
            connections: Arc::new(Semaphore::new(options.max_connections)),
            max_connections: options.max_connections,
            per_identity: PerIdentity::default(),
            max_per_identity: options.max_connections_per_identity.max(1),
            unreserved: unreserved_places(options),
            handshakes: Arc::new(Mutex::new(BTreeMap::new())),
            max_handshakes: options.max_handshakes.max(1),
        };
        tokio::spawn(accept_loop(listener, config, limits, sender));
        Self {
            ready: ReceiverStream::new(receiver),
        }
    }
}

impl Stream for TlsIncoming {
    type Item = Result<Connection, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.ready).poll_next(cx)
    }
}

type ReadySender = mpsc::Sender<Result<Connection, std::io::Error>>;

#[derive(Clone)]
struct Limits {
    handshake_timeout: Duration,
    connections: Arc<Semaphore>,
    max_connections: usize,
    per_identity: PerIdentity,
    max_per_identity: usize,
    /// The places left to the identities without a reserve, and the
    /// identities with one; `None` when nothing is held.
    unreserved: Option<(Arc<Semaphore>, Arc<BTreeSet<String>>)>,
    handshakes: Handshakes,
    max_handshakes: usize,
}

/// The places the identities without a reserve share (all but a quarter
/// of the connections), and who has the reserve; `None` when no identity
/// has one, or the limit is too small to hold a quarter of it.
fn unreserved_places(options: &ServeOptions) -> Option<(Arc<Semaphore>, Arc<BTreeSet<String>>)> {
    let reserve = options.max_connections / 4;
    if options.reserved_for.is_empty() || reserve == 0 {
        return None;
    }
    Some((
        Arc::new(Semaphore::new(options.max_connections - reserve)),
        Arc::new(options.reserved_for.iter().cloned().collect()),
    ))
}

/// The handshakes in progress, oldest first; dropping one's sender tells
/// it to give up its place.
type Handshakes = Arc<Mutex<BTreeMap<u64, (Instant, oneshot::Sender<()>)>>>;

/// A handshake's place among those in progress, given back when it ends.
struct InProgress {
    number: u64,
    handshakes: Handshakes,
}

impl InProgress {
    fn new(number: u64, handshakes: Handshakes) -> Self {
        metrics().handshakes_in_progress.inc();
        Self { number, handshakes }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        lock(&self.handshakes).remove(&self.number);
        metrics().handshakes_in_progress.dec();
    }
}

fn lock(
    handshakes: &Handshakes,
) -> std::sync::MutexGuard<'_, BTreeMap<u64, (Instant, oneshot::Sender<()>)>> {
    handshakes
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
}

/// How long a handshake must have waited before a newcomer may displace
/// it: a tenth of the handshake timeout, at most a second (a genuine
/// handshake takes a few round trips).
fn displaceable_after(handshake_timeout: Duration) -> Duration {
    (handshake_timeout / 10).min(Duration::from_secs(1))
}

/// Whether no connection may be added now.
fn full(connections: &Semaphore) -> bool {
    connections.available_permits() == 0
}

fn refuse_over_limit(peer: SocketAddr, limit: usize) {
    metrics()
        .connections_refused
        .with_label_values(&["connections"])
        .inc();
    if let Some(held_back) = CONNECTION_EVENTS.admit("over_connection_limit", tracing::Level::WARN)
    {
        tracing::warn!(
            %peer,
            limit,
            held_back,
            "connection refused: too many connections"
        );
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: ReloadableConfig,
    limits: Limits,
    ready: ReadySender,
) {
    let mut arrivals: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Full now: refused before any handshake work.
                if full(&limits.connections) {
                    refuse_over_limit(peer, limits.max_connections);
                    drop(stream);
                    continue;
                }
                // gRPC messages are small and latency-sensitive.
                let _ = stream.set_nodelay(true);
                arrivals += 1;
                let (place, displaced) = oneshot::channel();
                let now = Instant::now();
                let taken = {
                    let mut handshakes = lock(&limits.handshakes);
                    let oldest_has_waited =
                        handshakes.first_key_value().is_some_and(|(_, (since, _))| {
                            now.duration_since(*since)
                                >= displaceable_after(limits.handshake_timeout)
                        });
                    if handshakes.len() >= limits.max_handshakes && oldest_has_waited {
                        // Dropping the oldest's sender ends its handshake.
                        handshakes.pop_first();
                    }
                    let room = handshakes.len() < limits.max_handshakes;
                    if room {
                        handshakes.insert(arrivals, (now, place));
                    }
                    room
                };
                if !taken {
                    metrics()
                        .connections_refused
                        .with_label_values(&["handshakes"])
                        .inc();
                    if let Some(held_back) =
                        CONNECTION_EVENTS.admit("over_handshake_limit", tracing::Level::WARN)
                    {
                        tracing::warn!(
                            %peer,
                            limit = limits.max_handshakes,
                            held_back,
                            "connection refused: too many TLS handshakes in progress"
                        );
                    }
                    drop(stream);
                    continue;
                }
                let in_progress = InProgress::new(arrivals, limits.handshakes.clone());
                tokio::spawn(handshake(
                    stream,
                    peer,
                    config.verdicts(),
                    TlsAcceptor::from(config.current()),
                    limits.clone(),
                    (in_progress, displaced),
                    ready.clone(),
                ));
            }
            Err(error) if of_one_connection(&error) => {
                // Gone before it was accepted: nothing to wait for.
                tracing::debug!(%error, "a connection ended before it was accepted");
            }
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                if let Some(held_back) =
                    CONNECTION_EVENTS.admit("accept_failed", tracing::Level::WARN)
                {
                    tracing::warn!(%error, held_back, "accepting a connection failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether an `accept` failure concerns only the connection it would have
/// given (reset or aborted by its peer before it was taken, refused by a
/// firewall rule, a protocol error on it), as opposed to the process or
/// the system running short (descriptors, memory), which is worth a pause.
fn of_one_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    // What Linux's accept(2) says to retry at once, as for EAGAIN:
    // EPROTO, ENONET, ENOPROTOOPT, EOPNOTSUPP, ENETDOWN, ENETUNREACH,
    // EHOSTDOWN, EHOSTUNREACH.
    const RETRY_AT_ONCE: [i32; 8] = [71, 64, 92, 95, 100, 101, 112, 113];
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::PermissionDenied
    ) || (cfg!(target_os = "linux")
        && error
            .raw_os_error()
            .is_some_and(|errno| RETRY_AT_ONCE.contains(&errno)))
}

async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    verdicts: Verdicts,
    acceptor: TlsAcceptor,
    limits: Limits,
    (in_progress, displaced): (InProgress, oneshot::Receiver<()>),
    ready: ReadySender,
) {
    let timeout = limits.handshake_timeout;
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(timeout, acceptor.accept(stream)) => outcome,
        _ = displaced => {
            metrics()
                .handshake_failures
                .with_label_values(&["displaced"])
                .inc();
            if let Some(held_back) = CONNECTION_EVENTS.admit("displaced", tracing::Level::INFO) {
                tracing::info!(
                    %peer,
                    limit = limits.max_handshakes,
                    held_back,
                    "TLS handshake abandoned: the oldest of too many in progress"
                );
            }
            return;
        }
    };
    drop(in_progress);
    match outcome {
        Ok(Ok(stream)) => {
            let chain = stream.get_ref().1.peer_certificates();
            let identity: Option<Arc<str>> = chain.and_then(crate::peer_identity).map(Arc::from);
            let slot = match Slot::new(identity.clone(), &limits) {
                Ok(slot) => slot,
                Err(NoSlot::Connections) => {
                    refuse_over_limit(peer, limits.max_connections);
                    return;
                }
                Err(NoSlot::Identity) => {
                    metrics()
                        .connections_refused
                        .with_label_values(&["identity"])
                        .inc();
                    if let Some(held_back) =
                        CONNECTION_EVENTS.admit("over_identity_limit", tracing::Level::WARN)
                    {
                        tracing::warn!(
                            %peer,
                            identity = %securemesh::text::field(identity.as_deref().unwrap_or("none")),
                            limit = limits.max_per_identity,
                            held_back,
                            "connection refused: too many connections of one identity"
                        );
                    }
                    return;
                }
                Err(NoSlot::Unreserved) => {
                    metrics()
                        .connections_refused
                        .with_label_values(&["reserved"])
                        .inc();
                    if let Some(held_back) =
                        CONNECTION_EVENTS.admit("over_unreserved_limit", tracing::Level::WARN)
                    {
                        tracing::warn!(
                            %peer,
                            identity = %securemesh::text::field(identity.as_deref().unwrap_or("none")),
                            held_back,
                            "connection refused: the places left are held for the allowed callers"
                        );
                    }
                    return;
                }
            };
            let expires = chain.and_then(crate::identity::valid_until).map(expires_at);
            let _ = ready
                .send(Ok(Connection {
                    stream,
                    identity,
                    verdicts,
                    expires,
                    preface_by: Some((Box::pin(tokio::time::sleep(timeout)), PREFACE_BYTES)),
                    refused: None,
                    _slot: slot,
                }))
                .await;
        }
        Ok(Err(error)) => {
            let reason = failure_reason(&error);
            metrics()
                .handshake_failures
                .with_label_values(&[reason])
                .inc();
            if let Some(held_back) = CONNECTION_EVENTS.admit(reason, tracing::Level::INFO) {
                tracing::info!(%peer, %error, reason, held_back, "TLS handshake refused");
            }
        }
        Err(_) => {
            metrics()
                .handshake_failures
                .with_label_values(&["timeout"])
                .inc();
            if let Some(held_back) = CONNECTION_EVENTS.admit("timeout", tracing::Level::INFO) {
                tracing::info!(
                    %peer,
                    timeout_ms = timeout.as_millis() as u64,
                    held_back,
                    "TLS handshake timed out"
                );
            }
        }
    }
}

/// The length of the HTTP/2 connection preface
/// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_BYTES: usize = 24;

/// The moment a certificate valid until `not_after` (Unix seconds, the
/// last valid second) expires.
fn expires_at(not_after: i64) -> SystemTime {
    let end = u64::try_from(not_after)
        .unwrap_or(0)
        .saturating_add(1)
        .min(u64::from(u32::MAX));
    SystemTime::UNIX_EPOCH + Duration::from_secs(end)
}

/// Every label [`failure_reason`] gives, `timeout` and `displaced`.
const HANDSHAKE_FAILURE_REASONS: [&str; 13] = [
    "no_client_certificate",
    "unknown_ca",
    "revoked",
    "expired",
    "not_yet_valid",
    "bad_certificate",
    "alert_from_client",
    "incompatible_client",
    "protocol_error",
    "closed_by_client",
    "io_error",
    "timeout",
    "displaced",
];

/// A short, bounded label for why a handshake failed (the metric's
/// `reason`; the log line keeps the full error).
fn failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let tls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>());
    match tls_error {
        Some(Error::NoCertificatesPresented) => "no_client_certificate",
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_ca",
        Some(Error::InvalidCertificate(CertificateError::Revoked)) => "revoked",
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "expired",
        Some(Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => "not_yet_valid",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        Some(Error::AlertReceived(_)) => "alert_from_client",
        Some(Error::PeerIncompatible(_)) => "incompatible_client",
        Some(_) => "protocol_error",
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => "closed_by_client",
        None => "io_error",
    }
}

impl Connection {
    /// Judges the peer again if the configuration was replaced since the
    /// last look; an error once its certificate is no longer accepted.
    fn peer_still_accepted(&mut self) -> std::io::Result<()> {
        if self.refused.is_none() && self.expires.is_some_and(|at| SystemTime::now() >= at) {
            tracing::warn!(
                peer = ?self.stream.get_ref().0.peer_addr().ok(),
                identity = self.identity.as_deref().unwrap_or("unknown"),
                "closing a connection: its peer's certificate has expired"
            );
            self.refused = Some("its certificate has expired".to_owned());
        }
        if self.refused.is_none() && self.verdicts.has_changed().unwrap_or(false) {
            let verifier = self.verdicts.borrow_and_update().clone();
            let chain = self.stream.get_ref().1.peer_certificates();
            if let (Some(verifier), Some((leaf, intermediates))) =
                (verifier, chain.and_then(<[_]>::split_first))
            {
                let now = rustls::pki_types::UnixTime::now();
                if let Err(error) = verifier.verify_client_cert(leaf, intermediates, now) {
                    tracing::warn!(
                        peer = ?self.stream.get_ref().0.peer_addr().ok(),
                        identity = self.identity.as_deref().unwrap_or("unknown"),
                        %error,
                        "closing a connection: the new configuration refuses its peer's certificate"
                    );
                    self.refused = Some(error.to_string());
                }
            }
        }
        match &self.refused {
            None => Ok(()),
            Some(reason) => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("peer certificate no longer accepted: {reason}"),
            )),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.peer_still_accepted()?;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some((deadline, left)) = &mut this.preface_by {
            *left = left.saturating_sub(buf.filled().len() - before);
            if *left == 0 {
                this.preface_by = None;
            } else if read.is_pending()
                && std::future::Future::poll(deadline.as_mut(), cx).is_ready()
            {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the peer sent no HTTP/2 preface within the handshake timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What every request's extensions hold for its [`Connection`] (tonic puts
/// it there; the coordinator's front end does the same): the peer's
/// address, certificates and identity.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    tls: <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo,
    identity: Option<Arc<str>>,
}

impl PeerInfo {
    /// The identity of the peer's certificate (see [`crate::peer_identity`]).
    pub fn identity(&self) -> Option<&Arc<str>> {
        self.identity.as_ref()
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tls.get_ref().remote_addr()
    }

    /// The peer's certificate chain, leaf first.
    pub fn certificates(&self) -> Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
        self.tls.peer_certs()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            tls: self.stream.connect_info(),
            identity: self.identity.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_shortage_pauses_the_accept_loop() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionAborted,
            ErrorKind::ConnectionReset,
            ErrorKind::PermissionDenied,
        ] {
            assert!(of_one_connection(&Error::from(kind)), "{kind:?}");
        }
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or the system.
        for errno in [24, 23, 105, 12] {
            assert!(
                !of_one_connection(&Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // ENETUNREACH, EPROTO: of one connection, on Linux.
        if cfg!(target_os = "linux") {
            for errno in [101, 71] {
                assert!(
                    of_one_connection(&Error::from_raw_os_error(errno)),
                    "{errno}"
                );
            }
        }
    }
}
