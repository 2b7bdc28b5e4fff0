//! One HTTP/2 connection to one endpoint, for unary gRPC calls, on the
//! `h2` crate directly.
//!
//! The balancer already does what tonic's `Channel` adds around a
//! connection (a request queue in its own task, reconnection), and on a
//! proxied call that machinery cost more CPU than the call: a hand-off to
//! the channel's task, another to hyper's connection task, and a task per
//! request body. Here a call writes its frames into the connection from the
//! caller's own task and reads the answer there; only the connection's I/O
//! runs in a task of its own.
//!
//! The connection is made on first use and again after it fails, with a
//! connect timeout, our mutual TLS (ALPN `h2` required) and HTTP/2
//! keepalive pings, so that a hung endpoint is noticed (a ping unanswered
//! within the keepalive timeout closes the connection). A connection
//! attempt runs in a task of its own and is shared by every call waiting
//! for it, so a call that gives up does not cancel it for the others.
//! Failures of the transport come back as a `Status` that carries the error
//! as its source, which is how [`securemesh::status::is_transport_failure`]
//! tells them from answers of the endpoint.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use h2::client::SendRequest;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use prost::Message;
use rustls::pki_types::ServerName;
use securemesh::frame::{self, Gathered};

use crate::lock;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::{Code, Status};

/// Largest reply accepted (tonic's default decoding limit).
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Flow-control windows (hyper's defaults, which tonic's channel used).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Streams opened on a new connection before the endpoint's settings say
/// how many it allows (h2 would assume no limit): hyper's choice, within
/// our servers' 256. Beyond an endpoint's lower limit, the streams it
/// refuses go again (see [`Http2Channel::unary`]).
const STREAMS_BEFORE_SETTINGS: usize = 100;

/// How a channel connects and notices a dead connection.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// Bound on TCP connect and TLS handshake together.
    pub connect_timeout: Duration,
    /// Interval of keepalive pings (sent while idle too).
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long closes the connection.
    pub keepalive_timeout: Duration,
}

/// Why a channel could not be made for a URL.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Not an `https://host[:port]` URL.
    #[error("{0}: expected https://host[:port]")]
    Url(String),
}

/// A failure of the transport (connecting, TLS, the HTTP/2 connection):
/// the source of the `Status` a failed call gets.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http2(#[from] h2::Error),
    #[error("the endpoint did not negotiate HTTP/2 (ALPN h2)")]
    NoHttp2,
    #[error("timed out after {} ms", .0.as_millis())]
    ConnectTimeout(Duration),
    #[error("connecting failed: {0}")]
    ConnectTask(#[from] tokio::task::JoinError),
}

/// A lazily connected HTTP/2 channel to one endpoint. Cheap to clone;
/// clones share the connection, which closes when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Http2Channel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Http2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Channel")
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

struct Inner {
    authority: Authority,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    options: ChannelOptions,
    /// The open connection's handle, with its generation, if any.
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// The connection attempt in progress, which every caller that needs a
    /// connection meanwhile awaits.
    connecting: Mutex<Option<Attempt>>,
    /// Generations of connections made so far.
    generations: std::sync::atomic::AtomicU64,
    /// How often [`Http2Channel::close`] was called: a connection attempt
    /// under way when it was does not become the channel's.
    closings: std::sync::atomic::AtomicU64,
}

/// A connection attempt, shared by its callers. It runs in a task of its
/// own, so that a caller that stops waiting (its per-try timeout) does not
/// cancel it for the others: a slow handshake still completes, within the
/// connect timeout.
type Attempt = Shared<BoxFuture<'static, Result<SendRequest<Bytes>, Arc<TransportError>>>>;

impl Http2Channel {
    /// A channel to `url` (`https://host[:port]`); nothing is connected yet.
    pub fn new(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        options: ChannelOptions,
    ) -> Result<Self, ChannelError> {
        let invalid = || ChannelError::Url(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| invalid())?;
        if uri.scheme() != Some(&Scheme::HTTPS) {
            return Err(invalid());
        }
        let authority = uri.authority().cloned().ok_or_else(invalid)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| invalid())?;
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(443)
        );
        Ok(Self {
            inner: Arc::new(Inner {
                authority,
                address,
                server_name,
                tls: TlsConnector::from(tls),
                options,
                current: Mutex::new(None),
                connecting: Mutex::new(None),
                generations: std::sync::atomic::AtomicU64::new(0),
                closings: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Calls the unary method `path` with `message` and the headers
    /// `metadata` makes; the endpoint is told it has what is left of
    /// `timeout` once connected (`grpc-timeout`: connecting counts).
    /// Beyond the endpoint's limit of concurrent streams, a request waits
    /// inside h2 for one to end, and that wait is not deducted from what
    /// the endpoint is told; the caller bounds the whole call itself.
    ///
    /// An endpoint that tells a connection to go away (`GOAWAY`: a maximum
    /// connection age, a drain) finishes the streams it took and refuses
    /// the others, which it never saw, however the race between its
    /// `GOAWAY` and our requests went: a request refused so, or not sent
    /// for it, goes once more on a new connection (with its headers made
    /// again) instead of failing and counting against the endpoint. So
    /// does a stream the endpoint refused (`REFUSED_STREAM`: beyond its
    /// limit of streams, opened before its settings arrived), on the same
    /// connection if it is still open.
    pub async fn unary<Q: Message, A: Message + Default>(
        &self,
        path: &'static str,
        message: &Q,
        metadata: impl Fn() -> HeaderMap,
        timeout: Duration,
    ) -> Result<A, Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        let frame = frame::encode(message);
        let mut may_go_again = true;
        loop {
            let mut request = self.request(path, metadata())?;
            let mut sender = match self.inner.sender().await?.ready().await {
                Ok(ready) => ready,
                Err(error) if self.goes_again(&error, &mut may_go_again) => continue,
                Err(error) => return Err(self.failed(error)),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Ok(mut value) = HeaderValue::try_from(grpc_timeout(left)) {
                // Different on every call: indexing it in HPACK's dynamic
                // table would only evict entries worth keeping.
                value.set_sensitive(true);
                request.headers_mut().insert("grpc-timeout", value);
            }
            let (response, mut body) = match sender.send_request(request, false) {
                Ok(sent) => sent,
                Err(error) if self.goes_again(&error, &mut may_go_again) => continue,
                Err(error) => return Err(self.failed(error)),
            };
            // A stream that fails here (a GOAWAY that came meanwhile, a
            // reset) says why through its response, read next.
            let _ = body.send_data(frame.clone(), true);
            match response.await {
                Ok(response) => return read_reply(response).await,
                // Refused by a GOAWAY (a stream the endpoint processed
                // and lost with its connection fails as a broken pipe).
                Err(error) if self.goes_again(&error, &mut may_go_again) => {}
                Err(error) => return Err(self.failed(error)),
            }
        }
    }

    /// Whether a request that `error` stopped goes again: once per call
    /// (`may_go_again`), if the endpoint never processed it, as it says
    /// by telling the connection to go away or by refusing the stream
    /// (RFC 9113, section 8.7).
    fn goes_again(&self, error: &h2::Error, may_go_again: &mut bool) -> bool {
        let refused = error.is_reset() && error.reason() == Some(h2::Reason::REFUSED_STREAM);
        let again = *may_go_again && error.is_remote() && (error.is_go_away() || refused);
        if again {
            *may_go_again = false;
            self.inner.forget_if_closed();
        }
        again
    }

    /// A POST of `path` to the endpoint, with `metadata` and gRPC's own
    /// headers.
    fn request(&self, path: &'static str, mut metadata: HeaderMap) -> Result<Request<()>, Status> {
        let uri = Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTPS);
            parts.authority = Some(self.inner.authority.clone());
            parts.path_and_query = Some(PathAndQuery::from_static(path));
            parts
        })
        .map_err(|error| Status::internal(format!("request URI: {error}")))?;
        metadata.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        metadata.insert(http::header::TE, HeaderValue::from_static("trailers"));
        let mut request = Request::post(uri)
            .body(())
            .map_err(|error| Status::internal(format!("request: {error}")))?;
        *request.headers_mut() = metadata;
        Ok(request)
    }

    /// Lets the open connection go: it closes once the calls in flight on
    /// it have ended, instead of staying open (and pinged) for calls that
    /// will not come, as for a backend removed from the pool. A connection
    /// being made meanwhile serves the calls waiting for it, then goes the
    /// same way. A later call would connect again.
    pub fn close(&self) {
        self.inner
            .closings
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        *self.inner.current() = None;
    }

    /// The status of a call that failed in the transport; a connection that
    /// failed is not used again.
    fn failed(&self, error: h2::Error) -> Status {
        if !error.is_reset() {
            self.inner.forget_if_closed();
        }
        transport_status(error)
    }
}

impl Inner {
    /// The open connection's handle, connecting first if there is none.
    async fn sender(self: &Arc<Self>) -> Result<SendRequest<Bytes>, Status> {
        if let Some(sender) = self.open() {
            return Ok(sender);
        }
        let attempt = {
            let mut connecting = lock(&self.connecting);
            if let Some(sender) = self.open() {
                return Ok(sender);
            }
            match &*connecting {
                Some(attempt) => attempt.clone(),
                None => {
                    // Counted now, not when the task first runs: a close
                    // in between must not be missed.
                    let closings = self.closings.load(std::sync::atomic::Ordering::Acquire);
                    let task = tokio::spawn(self.clone().establish(closings));
                    let attempt = async move {
                        task.await
                            .unwrap_or_else(|failed| Err(Arc::new(TransportError::from(failed))))
                    }
                    .boxed()
                    .shared();
                    *connecting = Some(attempt.clone());
                    attempt
                }
            }
        };
        attempt
            .await
            .map_err(|error| unavailable("cannot connect", error))
    }

    /// Connects, within the connect timeout, and makes the connection the
    /// channel's; then no attempt is in progress any more.
    /// If the channel was closed since `closings` were counted, the
    /// connection serves the calls waiting for it and is not kept.
    async fn establish(
        self: Arc<Self>,
        closings: u64,
    ) -> Result<SendRequest<Bytes>, Arc<TransportError>> {
        let connected = tokio::time::timeout(self.options.connect_timeout, self.connect()).await;
        let outcome = match connected {
            Ok(Ok((sender, driver))) => {
                let generation = self
                    .generations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                let mut current = self.current();
                // Under the lock `close` takes after counting itself.
                if self.closings.load(std::sync::atomic::Ordering::Acquire) == closings {
                    *current = Some((generation, sender.clone()));
                }
                drop(current);
                tokio::spawn(drive(driver, Arc::downgrade(&self), generation));
                Ok(sender)
            }
            Ok(Err(error)) => Err(Arc::new(error)),
            Err(_) => Err(Arc::new(TransportError::ConnectTimeout(
                self.options.connect_timeout,
            ))),
        };
        *lock(&self.connecting) = None;
        outcome
    }

    /// The handle of the open connection, if any. (A connection that
    /// closed is forgotten by its driver, or by the first call that finds
    /// it closed.)
    fn open(&self) -> Option<SendRequest<Bytes>> {
        self.current().as_ref().map(|(_, sender)| sender.clone())
    }

    fn forget_if_closed(&self) {
        let mut current = self.current();
        let closed = current.as_mut().is_some_and(|(_, sender)| {
            let waker = futures_util::task::noop_waker();
            let mut context = std::task::Context::from_waker(&waker);
            matches!(
                sender.poll_ready(&mut context),
                std::task::Poll::Ready(Err(_))
            )
        });
        if closed {
            *current = None;
        }
    }

    fn forget(&self, generation: u64) {
        let mut current = self.current();
        if current
            .as_ref()
            .is_some_and(|(open, _)| *open == generation)
        {
            *current = None;
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<(u64, SendRequest<Bytes>)>> {
        lock(&self.current)
    }

    async fn connect(&self) -> Result<(SendRequest<Bytes>, Driver), TransportError> {
        let tcp = TcpStream::connect(&self.address).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(TransportError::NoHttp2);
        }
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_max_send_streams(STREAMS_BEFORE_SETTINGS)
            .handshake::<_, Bytes>(tls)
            .await?;
        let pings = connection.ping_pong();
        Ok((
            sender,
            Driver {
                connection,
                pings,
                interval: self.options.keepalive_interval,
                timeout: self.options.keepalive_timeout,
                address: self.address.clone(),
            },
        ))
    }
}

/// What runs a connection: its I/O, and the keepalive pings.
struct Driver {
    connection: h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
    pings: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
    address: String,
}

/// Runs the connection until it closes (the last handle dropped, the peer
/// went away, or a ping went unanswered), then lets the channel connect
/// again.
async fn drive(driver: Driver, channel: Weak<Inner>, generation: u64) {
    let Driver {
        connection,
        pings,
        interval,
        timeout,
        address,
    } = driver;
    let keepalive = async {
        let Some(mut pings) = pings else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(interval).await;
            match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return error.to_string(),
                Err(_) => return format!("no keepalive answer within {} ms", timeout.as_millis()),
            }
        }
    };
    tokio::select! {
        closed = WritesAfterWakers::new(connection) => {
            if let Err(error) = closed {
                tracing::debug!(%address, %error, "connection closed");
            }
        }
        reason = keepalive => tracing::debug!(%address, %reason, "closing the connection"),
    }
    if let Some(channel) = channel.upgrade() {
        channel.forget(generation);
    }
}

/// Polls a connection only after the tasks that were ready when it was
/// woken have run: a connection woken by one call's frames would otherwise
/// run next (tokio runs the task a task wakes first) and write that call
/// alone, then again for each other call woken by the same batch of
/// answers. Yielding once lets them queue their frames, which then leave in
/// one write.
struct WritesAfterWakers<F> {
    inner: F,
    yielded: bool,
}

impl<F> WritesAfterWakers<F> {
    fn new(inner: F) -> Self {
        Self {
            inner,
            yielded: false,
        }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for WritesAfterWakers<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.yielded = false;
        self.inner.poll_unpin(cx)
    }
}

/// Reads a unary answer: one message and an OK status, or the status the
/// endpoint sent.
async fn read_reply<A: Message + Default>(
    response: http::Response<h2::RecvStream>,
) -> Result<A, Status> {
    let (parts, mut body) = response.into_parts();
    if parts.status != StatusCode::OK {
        return Err(from_http_status(parts.status));
    }
    // A trailers-only answer: the status is in the headers.
    if let Some(status) = status_in(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(status);
        }
    }
    let mut gathered = Gathered::default();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(transport_status)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        gathered.push(chunk);
        if gathered.len() > frame::HEADER_BYTES + MAX_REPLY_BYTES {
            return Err(Status::resource_exhausted(format!(
                "reply over {MAX_REPLY_BYTES} bytes"
            )));
        }
    }
    let trailers = body.trailers().await.map_err(transport_status)?;
    match trailers.as_ref().and_then(status_in) {
        Some(status) if status.code() == Code::Ok => {}
        Some(status) => return Err(status),
        None => return Err(Status::unknown("the answer ended without a grpc-status")),
    }
    let message = gathered
        .into_message()
        .map_err(|error| Status::internal(format!("reply: {error}")))?;
    A::decode(message).map_err(|error| Status::internal(format!("malformed reply: {error}")))
}

/// The status in an answer's headers or trailers, as tonic reads it. A
/// `grpc-status-details-bin` that is not base64 is left out first: tonic's
/// reader panics on one, and an endpoint's answer must not end our task.
fn status_in(headers: &HeaderMap) -> Option<Status> {
    use base64::Engine as _;
    const DETAILS: &str = "grpc-status-details-bin";
    /// Standard base64, padded or not, as tonic decodes the details.
    const DETAILS_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    match headers.get(DETAILS) {
        Some(details) if DETAILS_BASE64.decode(details.as_bytes()).is_err() => {
            let mut headers = headers.clone();
            headers.remove(DETAILS);
            Status::from_header_map(&headers)
        }
        _ => Status::from_header_map(headers),
    }
}

/// The gRPC code of an HTTP status other than 200, as the gRPC
/// specification maps it.
fn from_http_status(status: StatusCode) -> Status {
    let code = match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {status}"))
}

/// The status of a transport failure, with the error as its source. A
/// stream the endpoint reset keeps the code the gRPC specification gives
/// its reason; anything else is `UNAVAILABLE`.
fn transport_status(error: h2::Error) -> Status {
    let code = match error.reason() {
        Some(h2::Reason::CANCEL) if error.is_reset() => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) if error.is_reset() => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Unavailable,
    };
    let mut status = Status::new(code, format!("HTTP/2: {error}"));
    status.set_source(Arc::new(TransportError::Http2(error)));
    status
}

fn unavailable(what: &str, error: impl Into<Arc<TransportError>>) -> Status {
    let error = error.into();
    let mut status = Status::unavailable(format!("{what}: {error}"));
    status.set_source(error);
    status
}

/// A `grpc-timeout` value for `timeout`: at most eight digits, in the
/// finest unit that fits.
fn grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let micros = timeout.as_micros();
    if micros <= MAX {
        format!("{micros}u")
    } else if timeout.as_millis() <= MAX {
        format!("{}m", timeout.as_millis())
    } else {
        format!("{}S", timeout.as_secs().min(MAX as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_use_the_finest_unit_that_fits_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(980)), "980000u");
        assert_eq!(grpc_timeout(Duration::from_secs(99)), "99000000u");
        assert_eq!(grpc_timeout(Duration::from_secs(100)), "100000m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn malformed_status_details_from_an_endpoint_are_dropped_not_a_panic() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        headers.insert("grpc-message", HeaderValue::from_static("going%20away"));
        headers.insert(
            "grpc-status-details-bin",
            HeaderValue::from_static("not base64!"),
        );
        let status = status_in(&headers).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "going away");
        assert!(status.details().is_empty());
        // Well-formed details, padded or not, are kept.
        for details in ["AQID", "AQI=", "AQI"] {
            headers.insert("grpc-status-details-bin", HeaderValue::from_static(details));
            assert!(
                !status_in(&headers).unwrap().details().is_empty(),
                "{details}"
            );
        }
    }

    /// A waker that counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_woken_connection_yields_once_before_it_is_polled() {
        use std::future::Future as _;
        let counting = Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(counting.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut polls = 0;
        let inner = std::future::poll_fn(|_| {
            polls += 1;
            if polls < 2 {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(polls)
            }
        });
        let mut wrapped = std::pin::pin!(WritesAfterWakers::new(inner));
        let wakes = || counting.0.load(std::sync::atomic::Ordering::SeqCst);

        // Each wake-up first yields (waking itself, to run again after the
        // tasks already queued), and only the next poll reaches the inner future.
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes(), 1);
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes(), 1);
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes(), 2);
        assert_eq!(wrapped.as_mut().poll(&mut cx), std::task::Poll::Ready(2));
    }

    /// A PKI in a temporary directory and the coordinator's client TLS.
    fn pki() -> (tempfile::TempDir, Arc<rustls::ClientConfig>) {
        let (dir, tls) = crate::testing::coordinator_tls();
        (dir, tls.rustls_config())
    }

    fn quick() -> ChannelOptions {
        ChannelOptions {
            connect_timeout: Duration::from_millis(500),
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(200),
        }
    }

    async fn health_check(
        channel: &Http2Channel,
    ) -> Result<tonic_health::pb::HealthCheckResponse, Status> {
        channel
            .unary(
                "/grpc.health.v1.Health/Check",
                &tonic_health::pb::HealthCheckRequest::default(),
                HeaderMap::new,
                Duration::from_secs(1),
            )
            .await
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_transport_failure() {
        let (_dir, tls) = pki();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let channel =
            Http2Channel::new(&format!("https://127.0.0.1:{port}"), tls, quick()).unwrap();
        let status = health_check(&channel).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(securemesh::status::is_transport_failure(&status));
        assert!(securemesh::status::is_unavailable(&status));
    }

    #[tokio::test]
    async fn endpoints_that_are_not_http2_over_our_tls_are_refused() {
        let (dir, tls) = pki();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "server");
        let server = securemesh_tls::server_config(&files, None).unwrap();
        // The same certificate, but no ALPN: HTTP/2 is not negotiated.
        let mut without_alpn = (*server).clone();
        without_alpn.alpn_protocols.clear();
        for (config, name, expected) in [
            (without_alpn, "127.0.0.1", "ALPN"),
            // Our server, dialled by a name its certificate does not have.
            (
                (*server).clone(),
                "not-this-server.example",
                "not valid for name",
            ),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let serving = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let _ = acceptor.accept(tcp).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            });
            let url = format!("https://{name}:{port}");
            let channel = Http2Channel::new(&url, tls.clone(), quick()).unwrap();
            // The name is only a name: connect to loopback whatever it says.
            let channel = Http2Channel {
                inner: Arc::new(Inner {
                    address: format!("127.0.0.1:{port}"),
                    ..Arc::into_inner(channel.inner).unwrap()
                }),
            };
            let status = health_check(&channel).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{url}: {status:?}");
            assert!(securemesh::status::is_transport_failure(&status));
            assert!(status.message().contains(expected), "{url}: {status:?}");
            serving.abort();
        }
    }

    #[tokio::test]
    async fn a_silent_endpoint_is_dropped_by_keepalive() {
        let (dir, tls) = pki();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "server");
        let server = securemesh_tls::server_config(&files, None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, stall) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .unwrap();
            let mut connection = h2::server::handshake(tls).await.unwrap();
            // Answers nothing from now on, as a stopped process would.
            let _ = connection.accept().await;
            let _ = stalled.send(());
            std::future::pending::<()>().await;
        });
        let channel =
            Http2Channel::new(&format!("https://127.0.0.1:{port}"), tls, quick()).unwrap();
        let call = tokio::spawn({
            let channel = channel.clone();
            async move { health_check(&channel).await }
        });
        stall.await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .expect("a hung connection was kept")
            .unwrap()
            .unwrap_err();
        assert!(
            securemesh::status::is_transport_failure(&status),
            "{status:?}"
        );
        assert!(
            channel.inner.open().is_none(),
            "the dead connection is still offered"
        );
    }

    #[tokio::test]
    async fn a_connection_made_while_the_channel_closes_serves_its_call_then_goes() {
        let (dir, tls) = pki();
        let endpoint = crate::testing::slow_endpoint(dir.path(), Duration::from_millis(400)).await;
        let options = ChannelOptions {
            connect_timeout: Duration::from_secs(2),
            ..quick()
        };
        let url = format!("https://127.0.0.1:{}", endpoint.port);
        let channel = Http2Channel::new(&url, tls, options).unwrap();
        let call = tokio::spawn({
            let channel = channel.clone();
            async move { health_check(&channel).await }
        });
        // Mid-handshake.
        tokio::time::sleep(Duration::from_millis(100)).await;
        channel.close();
        assert_eq!(call.await.unwrap().unwrap().status, 1);
        assert!(channel.inner.open().is_none(), "kept after close");
    }

    #[tokio::test]
    async fn the_endpoint_is_told_the_time_left_after_connecting() {
        let (dir, tls) = pki();
        let endpoint = crate::testing::slow_endpoint(dir.path(), Duration::from_millis(400)).await;
        let options = ChannelOptions {
            connect_timeout: Duration::from_secs(2),
            ..quick()
        };
        let channel = Http2Channel::new(
            &format!("https://127.0.0.1:{}", endpoint.port),
            tls,
            options,
        )
        .unwrap();
        let answer = health_check(&channel).await.unwrap();
        assert_eq!(answer.status, 1);
        let told = lock(&endpoint.told).clone();
        let [timeout] = told.as_slice() else {
            panic!("told {told:?}");
        };
        let micros: u64 = timeout.trim_end_matches('u').parse().unwrap();
        assert!(timeout.ends_with('u'), "{timeout}");
        assert!(micros <= 600_000, "told {timeout} after a 400 ms handshake");
    }

    #[tokio::test]
    async fn streams_refused_beyond_the_endpoint_limit_go_again() {
        let (dir, tls) = pki();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "server");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(securemesh_tls::server_config(&files, None).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Two streams at a time, each answered 50 ms after it came: a
        // burst sent before the settings arrive is refused beyond two.
        let endpoint = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let mut connection = h2::server::Builder::new()
                .max_concurrent_streams(2)
                .handshake::<_, Bytes>(tls)
                .await
                .unwrap();
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let reply = tonic_health::pb::HealthCheckResponse { status: 1 };
                    let mut sending = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    sending.send_data(frame::encode(&reply), false).unwrap();
                    sending.send_trailers(trailers).unwrap();
                });
            }
        });
        let channel =
            Http2Channel::new(&format!("https://127.0.0.1:{port}"), tls, quick()).unwrap();
        let calls = futures_util::future::join_all((0..8).map(|_| health_check(&channel))).await;
        for call in calls {
            assert_eq!(call.unwrap().status, 1);
        }
        endpoint.abort();
    }

    #[tokio::test]
    async fn a_closed_channel_lets_its_idle_connection_go() {
        let (dir, tls) = pki();
        let crate::testing::SlowEndpoint {
            port,
            accepted,
            closed,
            ..
        } = crate::testing::slow_endpoint(dir.path(), Duration::ZERO).await;
        let channel =
            Http2Channel::new(&format!("https://127.0.0.1:{port}"), tls, quick()).unwrap();
        health_check(&channel).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            closed.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "closed while in use"
        );
        channel.close();
        let started = std::time::Instant::now();
        while closed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the idle connection of a closed channel was kept"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_attempt_outlives_callers_that_give_up() {
        let (dir, tls) = pki();
        let crate::testing::SlowEndpoint { port, accepted, .. } =
            crate::testing::slow_endpoint(dir.path(), Duration::from_millis(600)).await;
        let options = ChannelOptions {
            connect_timeout: Duration::from_secs(2),
            ..quick()
        };
        let channel =
            Http2Channel::new(&format!("https://127.0.0.1:{port}"), tls, options).unwrap();
        // Callers more impatient than the handshake: each gives up...
        for _ in 0..3 {
            let impatient =
                tokio::time::timeout(Duration::from_millis(100), health_check(&channel)).await;
            assert!(impatient.is_err());
        }
        // ...but the attempt they started goes on, and is the only one.
        let answer = tokio::time::timeout(Duration::from_secs(2), health_check(&channel))
            .await
            .expect("the connection was never made")
            .unwrap();
        assert_eq!(answer.status, 1);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn only_https_urls_with_a_host_make_a_channel() {
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        let options = ChannelOptions {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
        };
        for (url, valid) in [
            ("https://127.0.0.1:5001", true),
            ("https://localhost", true),
            ("https://[::1]:7", true),
            ("http://127.0.0.1:5001", false),
            ("127.0.0.1:5001", false),
            ("https://", false),
            ("not a url", false),
        ] {
            assert_eq!(
                Http2Channel::new(url, tls.clone(), options.clone()).is_ok(),
                valid,
                "{url}"
            );
        }
    }
}
