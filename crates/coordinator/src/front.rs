//! The coordinator's HTTP/2 front end: it serves its callers' connections
//! on the `h2` crate directly.
//!
//! A proxied `Submit` is the coordinator's whole job, and on the tonic
//! server path most of its CPU went into machinery around the call, not
//! into the call: a task spawned per stream (and woken across threads by
//! the connection's task), hyper's request and response types, tonic's
//! streaming codec. Here each connection is one task that reads its
//! streams and answers them itself. `Submit` is read as one gRPC frame,
//! authorized, relayed by the balancer and answered with one frame and its
//! trailers; everything else (health, reflection, unknown methods) goes to
//! tonic's router unchanged, behind an adapter.
//!
//! Health reports the DataService `NOT_SERVING` while no backend is in
//! rotation, so that clients balancing over several coordinators avoid one
//! that cannot serve.
//!
//! What the tonic path enforced still holds: the same [`Authorization`]
//! check and audit line for refusals, the message size limit
//! (`OUT_OF_RANGE`), the concurrent stream limit, the TLS acceptor with its
//! handshake deadline and connection limit, and the drain on shutdown
//! (health `NOT_SERVING`, then `GOAWAY` and a grace period for calls in
//! flight). Added here: the message limit is applied from the frame header,
//! before the body arrives; the caller's deadline counts from the call's
//! arrival and bounds reading the message too; a connection that sends no
//! HTTP/2 preface within the handshake timeout is closed; a call whose
//! caller resets its stream is abandoned at once; and a caller that leaves
//! a keepalive ping unanswered is disconnected (as tonic's servers do with
//! the same setting).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::future::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use prost::Message as _;
use securemesh::frame::{self, Gathered};
use securemesh::v1::{SubmitReply, SubmitRequest, DATA_SERVICE_NAME, SUBMIT_METHOD};
use securemesh_tls::{
    Authorization, Caller, Connection, ReloadableConfig, ServeError, ServeOptions, TlsIncoming,
    UnservedCall,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::Connected as _;
use tonic::Status;
use tonic_health::ServingStatus;
use tower::ServiceExt as _;

use crate::proxy::Coordinator;

/// Flow-control windows offered to callers (the same as hyper's defaults,
/// which the tonic path used).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Largest header block a caller may send.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// What every connection of one front end shares.
struct Front {
    coordinator: Coordinator,
    authorization: Arc<Authorization>,
    max_message_bytes: usize,
    /// Health, reflection, and the gRPC "unimplemented" answer for
    /// anything else.
    others: Routes,
    max_concurrent_streams: u32,
    /// Bound on the HTTP/2 preface and settings exchange after TLS.
    handshake_timeout: std::time::Duration,
    /// Pings to callers, and how long one may go unanswered.
    keepalive_interval: Option<std::time::Duration>,
    keepalive_timeout: std::time::Duration,
    /// A connection this old is sent `GOAWAY`, and closed `age_grace`
    /// later if its calls have not finished by then.
    max_connection_age: Option<std::time::Duration>,
    age_grace: std::time::Duration,
}

/// Serves `coordinator` (behind `authorization`, messages limited to
/// `max_message_bytes`), health and reflection on `listener` with mutual
/// TLS `tls`, until `shutdown` completes; then drains as
/// [`securemesh_tls::serve_mtls`] does.
pub async fn serve(
    listener: TcpListener,
    tls: impl Into<ReloadableConfig>,
    coordinator: Coordinator,
    authorization: Authorization,
    max_message_bytes: usize,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let health = tonic_health::server::HealthReporter::new();
    // Health watches end when the connections start closing (see below).
    let (closing, closing_seen) = watch::channel(false);
    let mut serving = coordinator.pool().rotation().serving();
    let serving_now = *serving.borrow_and_update();
    health
        .set_service_status(DATA_SERVICE_NAME, serving_status(serving_now))
        .await;
    let mut routes = RoutesBuilder::default();
    securemesh_tls::add_health_and_reflection(&mut routes, health.clone(), &closing_seen)?;
    // Ends with this function, however it ends (dropped included).
    let mut following = AbortOnDrop(tokio::spawn(follow_rotation(health.clone(), serving)));
    let front = Arc::new(Front {
        coordinator,
        authorization: Arc::new(authorization),
        max_message_bytes,
        others: routes.routes(),
        max_concurrent_streams: options.max_concurrent_streams,
        handshake_timeout: options.handshake_timeout,
        keepalive_interval: options.ping_interval(),
        keepalive_timeout: options.keepalive_timeout,
        max_connection_age: options.max_connection_age,
        // A grace of nothing would cut the calls the GOAWAY lets finish,
        // before the GOAWAY itself is out.
        age_grace: options.drain_grace.max(MIN_AGE_GRACE),
    });

    let mut incoming = TlsIncoming::new(listener, tls.into(), &options);
    let mut connections = JoinSet::new();
    let drain = async {
        shutdown.await;
        // Awaited: a report of SERVING under way on another thread must
        // land before NOT_SERVING, not after it.
        following.0.abort();
        let _ = (&mut following.0).await;
        securemesh_tls::report_draining(&health, DATA_SERVICE_NAME).await;
        if !options.drain_delay.is_zero() {
            tracing::info!(
                delay_ms = options.drain_delay.as_millis() as u64,
                "draining: NOT_SERVING"
            );
            tokio::time::sleep(options.drain_delay).await;
        }
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            () = &mut drain => break,
            next = incoming.next() => match next {
                Some(Ok(connection)) => {
                    connections.spawn(front.clone().serve_connection(connection, closing_seen.clone()));
                }
                Some(Err(error)) => tracing::warn!(%error, "accepting a connection failed"),
                None => break,
            },
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                report_panic(ended);
            }
        }
    }
    // New connections are refused from here on (the port is released).
    drop(incoming);
    tracing::info!("shutting down: finishing in-flight calls");
    let _ = closing.send(true);
    let finished = async {
        while let Some(ended) = connections.join_next().await {
            report_panic(ended);
        }
    };
    if tokio::time::timeout(options.drain_grace, finished)
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = options.drain_grace.as_millis() as u64,
            "grace period over: stopping with calls still in flight"
        );
        connections.abort_all();
    }
    Ok(())
}

/// Logs a connection task that panicked: its caller was cut off, and
/// nothing else would say why.
fn report_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended {
        if error.is_panic() {
            tracing::error!(%error, "a connection's task panicked: its calls were cut off");
        }
    }
}

/// A task that ends with its owner: aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reports the DataService `SERVING` while at least one backend is in
/// rotation and `NOT_SERVING` while none is, so that a client balancing
/// over several coordinators moves away from one that cannot serve. (The
/// overall status, the empty service name, stays `SERVING`: the process
/// itself is fine. It turns `NOT_SERVING` only when the process drains.)
async fn follow_rotation(
    health: tonic_health::server::HealthReporter,
    mut serving: watch::Receiver<bool>,
) {
    while serving.changed().await.is_ok() {
        let now = *serving.borrow_and_update();
        if now {
            tracing::info!("a backend is in rotation again: reporting SERVING");
        } else {
            tracing::warn!("no backend in rotation: reporting NOT_SERVING");
        }
        health
            .set_service_status(DATA_SERVICE_NAME, serving_status(now))
            .await;
    }
}

/// Pings the caller every `interval`, and returns once a ping has gone
/// unanswered for `timeout`: the caller is gone, though its TCP connection
/// may never say so (a crashed host, a cut network). The pings need the
/// connection to be driven, which the connection's own task does.
async fn caller_gone(
    mut ping_pong: h2::PingPong,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection failed: accepting streams reports it.
            Ok(Err(_)) => std::future::pending::<()>().await,
            Err(_) => return,
        }
    }
}

/// The least time a connection past its maximum age has for its calls.
const MIN_AGE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// `age` give or take a tenth, at random, so that connections opened
/// together (a client's several, every client's after a restart) do not
/// all go away, and come back, at once (as gRPC's own servers do).
fn jittered(age: std::time::Duration) -> std::time::Duration {
    // A factor in [0.9, 1.1), in thousandths.
    let thousandths = 900 + (securemesh::distinct_number() % 200);
    std::time::Duration::try_from_secs_f64(age.as_secs_f64() * thousandths as f64 / 1000.0)
        .unwrap_or(age)
}

/// What happens next to a connection with a maximum age, and when.
enum RetirementStage {
    /// At its age: it is told to go away.
    GoAway { at: Pin<Box<tokio::time::Sleep>> },
    /// At the end of the grace after that: it is closed.
    Close { at: Pin<Box<tokio::time::Sleep>> },
}

impl RetirementStage {
    /// Completes when the next stage is due (never without one).
    async fn due(stage: &mut Option<Self>) {
        match stage {
            Some(Self::GoAway { at } | Self::Close { at }) => at.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

fn serving_status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

impl Front {
    /// Serves one caller's connection: its streams are answered within
    /// this task. When `closing` turns true, the connection is told to go
    /// away (`GOAWAY`) and ends once its calls are answered.
    async fn serve_connection(
        self: Arc<Self>,
        connection: Connection,
        mut closing: watch::Receiver<bool>,
    ) {
        let peer = connection.connect_info();
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(self.max_concurrent_streams)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(connection);
        // A peer that finishes TLS and then says nothing gives its
        // connection slot back (the acceptor's own deadline for the
        // preface, counted from the end of TLS, usually ends it first).
        let mut http2 = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(http2)) => http2,
            Ok(Err(error)) => {
                tracing::debug!(%error, "HTTP/2 connection preface failed");
                return;
            }
            Err(_) => {
                tracing::debug!("no HTTP/2 connection preface within the handshake timeout");
                return;
            }
        };
        let keepalive = match (self.keepalive_interval, http2.ping_pong()) {
            (Some(interval), Some(ping_pong)) => {
                Either::Left(caller_gone(ping_pong, interval, self.keepalive_timeout))
            }
            _ => Either::Right(std::future::pending()),
        };
        tokio::pin!(keepalive);
        // At its maximum age the connection is told to go away; at the end
        // of the grace after that, it is closed.
        let mut retirement = self.max_connection_age.map(|age| RetirementStage::GoAway {
            at: Box::pin(tokio::time::sleep(jittered(age))),
        });
        let mut calls = FuturesUnordered::new();
        let mut going_away = *closing.borrow();
        if going_away {
            http2.graceful_shutdown();
        }
        loop {
            tokio::select! {
                accepted = http2.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        calls.push(self.answer(request, respond, peer.clone()));
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, "HTTP/2 connection failed");
                        break;
                    }
                    None => break,
                },
                Some(()) = calls.next(), if !calls.is_empty() => {
                    // Every other call that is ready finishes too before
                    // the connection is polled again: their answers then
                    // leave in one write instead of one write each. (These
                    // polls carry no waker; the loop polls `calls` with
                    // the task's own before the task sleeps.)
                    while let Some(Some(())) = calls.next().now_or_never() {}
                }
                () = &mut keepalive => {
                    tracing::debug!(
                        peer = ?peer.remote_addr(),
                        "a caller left a keepalive ping unanswered: closing its connection"
                    );
                    break;
                }
                () = RetirementStage::due(&mut retirement), if retirement.is_some() => {
                    match retirement.take() {
                        Some(RetirementStage::GoAway { .. }) => {
                            tracing::debug!(
                                peer = ?peer.remote_addr(),
                                "a connection reached its maximum age: GOAWAY"
                            );
                            if !going_away {
                                going_away = true;
                                http2.graceful_shutdown();
                            }
                            retirement = Some(RetirementStage::Close {
                                at: Box::pin(tokio::time::sleep(self.age_grace)),
                            });
                        }
                        Some(RetirementStage::Close { .. }) | None => {
                            tracing::debug!(
                                peer = ?peer.remote_addr(),
                                "a connection past its maximum age still had calls after the grace: closing"
                            );
                            break;
                        }
                    }
                }
                changed = closing.changed(), if !going_away => {
                    if changed.is_err() || *closing.borrow() {
                        going_away = true;
                        http2.graceful_shutdown();
                    }
                }
            }
        }
        // The connection is gone: what is left of its calls cannot be
        // answered. Dropping it closes every stream, which each call
        // watches: a relay is abandoned, a health watch ends (it would
        // otherwise wait for the next change of status and keep this task,
        // its socket and its connection slot alive until then). They still
        // finish here, and are accounted for.
        drop(http2);
        while calls.next().await.is_some() {}
    }

    /// Answers one stream.
    async fn answer(
        &self,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: securemesh_tls::PeerInfo,
    ) {
        if request.uri().path() == SUBMIT_METHOD {
            self.submit(request, respond, peer).await;
        } else {
            self.delegate(request, respond, peer).await;
        }
    }

    /// `Submit`: authorize, read the one message, relay it, answer.
    async fn submit(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: securemesh_tls::PeerInfo,
    ) {
        // The caller's deadline counts from here, a password check
        // included.
        let arrived = tokio::time::Instant::now();
        if let Some(refusal) = refuse_as_http(request.method(), request.headers()) {
            let _ = respond.send_response(refusal, true);
            return;
        }
        let (parts, body) = request.into_parts();
        let deadline = self.coordinator.deadline(&parts.headers, arrived);
        // Until the relay takes over its accounting, a call that ends here
        // is counted and audited by this.
        let mut unrelayed =
            UnservedCall::new(arrived.into_std(), &parts.headers, peer.identity().cloned());
        let mut extensions = http::Extensions::new();
        extensions.insert(peer);
        let work = async {
            // A password's argon2 check runs off this connection's task, so
            // its other calls and its pings go on meanwhile; the caller's
            // deadline bounds the wait for it.
            let mut late = || {
                unrelayed.end("DEADLINE_EXCEEDED");
                Status::deadline_exceeded("the deadline passed while the credentials were checked")
            };
            let authorization = Arc::clone(&self.authorization);
            let request = tonic::Request::from_parts(
                tonic::metadata::MetadataMap::from_headers(parts.headers),
                extensions,
                (),
            );
            let mut checking = Box::pin(async move { authorization.authorize(request).await });
            let checked = if tokio::time::Instant::now() >= deadline {
                // Nobody waits for a verdict: no check is started.
                Err(late())
            } else {
                match tokio::time::timeout_at(deadline, checking.as_mut()).await {
                    Ok(checked) => checked,
                    // The password check goes on without us to its verdict
                    // (a right password is remembered); the call is
                    // accounted for once, with the status its caller got.
                    Err(_) => Err(late()),
                }
            };
            // A refusal was counted and audited by the authorization, an
            // admitted call is by the relay.
            unrelayed.handed_over();
            match checked {
                Err(status) => Err(status),
                Ok(request) => {
                    let (metadata, extensions, ()) = request.into_parts();
                    let context =
                        self.coordinator
                            .context(&metadata, extensions.get::<Caller>(), deadline);
                    let reading = read_message(body, self.max_message_bytes);
                    self.coordinator.relay(reading, context).await
                }
            }
        };
        // A caller that resets its stream (it gave up) stops the relay too:
        // no more attempts are spent on an answer nobody will read.
        let outcome = tokio::select! {
            outcome = work => outcome,
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                tracing::debug!("the caller reset its call: relay abandoned");
                return;
            }
        };
        let _ = send_outcome(&mut respond, outcome);
    }

    /// Anything but `Submit`: tonic's router answers it. The answer is
    /// written no faster than the caller's flow-control window opens, and
    /// abandoned when the caller resets the stream or its connection ends.
    async fn delegate(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: securemesh_tls::PeerInfo,
    ) {
        let (parts, body) = request.into_parts();
        let mut request = Request::from_parts(parts, tonic::body::Body::new(IncomingBody(body)));
        request.extensions_mut().insert(peer);
        let response = tokio::select! {
            response = self.others.clone().oneshot(request) => response,
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
        };
        let Ok(response) = response;
        let (parts, mut body) = response.into_parts();
        let end = http_body::Body::is_end_stream(&body);
        let Ok(mut sending) = respond.send_response(Response::from_parts(parts, ()), end) else {
            return;
        };
        if end {
            return;
        }
        loop {
            // A streaming answer (a health watch, reflection) may wait long
            // for its next message: a reset ends the wait.
            let frame = tokio::select! {
                frame = http_body_util::BodyExt::frame(&mut body) => frame,
                _ = std::future::poll_fn(|cx| sending.poll_reset(cx)) => return,
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    tracing::debug!(%error, "response body failed");
                    sending.send_reset(h2::Reason::INTERNAL_ERROR);
                    return;
                }
                None => break,
            };
            match frame.into_data() {
                Ok(data) => {
                    if send_within_window(&mut sending, data).await.is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = sending.send_trailers(trailers);
                        return;
                    }
                }
            }
        }
        let _ = sending.send_data(Bytes::new(), true);
    }
}

/// Writes `data` on `sending` as the peer's flow-control window allows.
/// `h2` buffers whatever it is handed without bound, so a caller that
/// opens no window (and keeps asking, on a reflection stream) would
/// otherwise make the coordinator hold every answer in memory; waiting here
/// instead stops reading the answers, and through tonic the requests.
async fn send_within_window(
    sending: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), StreamClosed> {
    while !data.is_empty() {
        sending.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| sending.poll_capacity(cx)).await {
            Some(Ok(granted)) => granted,
            Some(Err(_)) | None => return Err(StreamClosed),
        };
        let chunk = data.split_to(granted.min(data.len()));
        if !chunk.is_empty() {
            sending.send_data(chunk, false).map_err(|_| StreamClosed)?;
        }
    }
    Ok(())
}

/// The stream was reset or its connection ended: nothing more can be sent.
#[derive(Debug)]
struct StreamClosed;

/// An HTTP-level refusal of a request that is not a gRPC call at all
/// (the gRPC specification answers a wrong content type with 415).
fn refuse_as_http(method: &http::Method, headers: &HeaderMap) -> Option<Response<()>> {
    let is_grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(is_grpc_content_type);
    let status = if method != http::Method::POST {
        StatusCode::METHOD_NOT_ALLOWED
    } else if !is_grpc {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    } else {
        return None;
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    Some(response)
}

/// Whether a `content-type` names gRPC: `application/grpc`, alone or
/// followed by `+` (a message format) or `;` (parameters). gRPC-Web's
/// `application/grpc-web` is another protocol, whose trailers travel in
/// the body.
fn is_grpc_content_type(value: &str) -> bool {
    value
        .strip_prefix("application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// Reads a unary call's one message: at most `limit` bytes, not
/// compressed (we announce no compression), exactly one frame.
async fn read_message(mut body: RecvStream, limit: usize) -> Result<SubmitRequest, Status> {
    let mut gathered = Gathered::default();
    let mut expected: Option<usize> = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|error| Status::cancelled(format!("request stream: {error}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        gathered.push(chunk);
        if expected.is_none() {
            if let Some((compressed, length)) = gathered.header() {
                if compressed {
                    // The header tells the caller what to send instead.
                    let mut refusal = Status::unimplemented(
                        "compressed messages are not accepted (grpc-accept-encoding: identity)",
                    );
                    refusal.metadata_mut().insert(
                        "grpc-accept-encoding",
                        tonic::metadata::MetadataValue::from_static("identity"),
                    );
                    return Err(refusal);
                }
                if length > limit {
                    return Err(Status::out_of_range(format!(
                        "message of {length} bytes is over the limit of {limit} bytes"
                    )));
                }
                expected = Some(length);
            }
        }
        if let Some(length) = expected {
            if gathered.len() > frame::HEADER_BYTES + length {
                return Err(Status::unimplemented(
                    "Submit is unary: a second message was sent",
                ));
            }
        }
    }
    let message = gathered
        .into_message()
        .map_err(|_| Status::internal("the request ended before its message did"))?;
    SubmitRequest::decode(message)
        .map_err(|error| Status::internal(format!("malformed SubmitRequest: {error}")))
}

/// Sends a call's answer: a reply as one message and an OK status in the
/// trailers; a failure as a trailers-only response.
fn send_outcome(
    respond: &mut SendResponse<Bytes>,
    outcome: Result<SubmitReply, Status>,
) -> Result<(), h2::Error> {
    let headers = || {
        let mut response = Response::new(());
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    };
    match outcome {
        Ok(reply) => {
            let mut sending = respond.send_response(headers(), false)?;
            sending.send_data(frame::encode(&reply), false)?;
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            sending.send_trailers(trailers)
        }
        Err(status) => {
            let mut response = headers();
            if let Err(unencodable) = status.add_header(response.headers_mut()) {
                tracing::warn!(status = ?unencodable, "a status could not be encoded");
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("13"));
            }
            respond.send_response(response, true).map(drop)
        }
    }
}

/// A caller's request body as tonic's router reads it.
struct IncomingBody(RecvStream);

impl http_body::Body for IncomingBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        let stream = &mut self.0;
        match stream.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = stream.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => match stream.poll_trailers(cx) {
                Poll::Ready(Ok(Some(trailers))) => {
                    Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
                Poll::Ready(Ok(None)) => Poll::Ready(None),
                Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ages_vary_by_up_to_a_tenth() {
        let age = std::time::Duration::from_secs(100);
        let ages: Vec<_> = (0..200).map(|_| jittered(age)).collect();
        for jittered in &ages {
            assert!(
                (90_000..110_000).contains(&jittered.as_millis()),
                "{jittered:?}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = ages.iter().collect();
        assert!(distinct.len() > 50, "{} distinct ages", distinct.len());
    }
}
