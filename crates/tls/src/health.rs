//! The services a server or coordinator offers beside its own: health
//! (tonic-health's) and reflection (v1 and v1alpha), whose open streams end
//! when the process starts shutting down.
//!
//! A health `Watch` never ends by itself, nor does a reflection stream its
//! client keeps open (as reflection-based tools do), and a graceful
//! shutdown waits for every open stream: one client watching health (as
//! gRPC clients with client-side health checking do all the time) held
//! every shutdown for the whole drain grace period, and the calls still in
//! flight when it ran out were cut. When the drain delay is over, each such
//! stream that waits for its next message ends with `UNAVAILABLE`, which
//! tells its client to look elsewhere (a watcher has seen `NOT_SERVING`
//! already). An answer that is ready is still sent whole. Once an answer
//! is over, its request ends too: tonic-reflection reads requests in a
//! task of its own, which would otherwise hold the stream (and with it the
//! connection and the shutdown) open until the client ends its side.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::{http, Body as HttpBody, BoxFuture, Bytes, Service, StdError};
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::Status;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// Why the reflection services could not be built.
pub use tonic_reflection::server::Error as ReflectionError;

/// Reports `service` and the process as a whole (the empty service name,
/// which probes that name no service ask about) `NOT_SERVING`: the process
/// is draining, and whoever probes it should send its calls elsewhere.
pub async fn report_draining(reporter: &HealthReporter, service: &str) {
    for name in [service, ""] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Adds to `routes` the health service reporting `reporter`'s statuses and
/// both reflection services (v1 and v1alpha) for securemesh's descriptor
/// set and health's; their open streams end once `ending` turns `true`.
///
/// grpcurl 1.8.6 speaks only v1alpha while newer clients try v1 first, so
/// every securemesh process offers both. Each accepts requests of at most
/// [`securemesh::MAX_SMALL_REQUEST_BYTES`].
pub fn add_health_and_reflection(
    routes: &mut RoutesBuilder,
    reporter: HealthReporter,
    ending: &watch::Receiver<bool>,
) -> Result<(), ReflectionError> {
    let small = securemesh::MAX_SMALL_REQUEST_BYTES;
    routes.add_service(EndingStreams::new(
        HealthServer::new(HealthService::from_health_reporter(reporter))
            .max_decoding_message_size(small),
        ending.clone(),
    ));
    let configure = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(securemesh::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    routes.add_service(EndingStreams::new(
        configure().build_v1()?.max_decoding_message_size(small),
        ending.clone(),
    ));
    routes.add_service(EndingStreams::new(
        configure()
            .build_v1alpha()?
            .max_decoding_message_size(small),
        ending.clone(),
    ));
    Ok(())
}

/// A gRPC service whose answers end with `UNAVAILABLE` where they would
/// wait for their next message once `ending` has turned `true`, and whose
/// requests end with their answers.
#[derive(Clone)]
pub struct EndingStreams<S> {
    inner: S,
    ending: watch::Receiver<bool>,
}

impl<S> EndingStreams<S> {
    /// `inner`, whose waiting streams end once `ending` turns `true`.
    pub fn new(inner: S, ending: watch::Receiver<bool>) -> Self {
        Self { inner, ending }
    }
}

impl<S: NamedService> NamedService for EndingStreams<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<Body>> for EndingStreams<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let over = Arc::new(AnswerOver::default());
        let request = request.map(|body| {
            Body::new(UntilAnswered {
                inner: Some(body),
                over: over.clone(),
            })
        });
        let answer = self.inner.call(request);
        let mut ending = self.ending.clone();
        let answered = over.clone();
        Box::pin(async move {
            // tonic reads a unary or server-streaming call's request to its
            // end before it answers: a caller that never ends it gets no
            // answer to end, and is answered here instead.
            let response = tokio::select! {
                biased;
                response = answer => response?,
                _ = ending.wait_for(|ending| *ending) => {
                    // A request the service handed on ends too.
                    answered.declare();
                    return Ok(shutting_down_status().into_http());
                }
            };
            // A closed sender ends the streams too: the process is going.
            let ended = Box::pin(async move {
                let _ = ending.wait_for(|ending| *ending).await;
            });
            Ok(response.map(|body| {
                Body::new(EndingBody {
                    inner: Box::pin(body),
                    ended,
                    finished: false,
                    over,
                })
            }))
        })
    }
}

/// Whether an answer is over (sent to its end, or dropped), shared with
/// its request's body.
#[derive(Default)]
struct AnswerOver {
    over: AtomicBool,
    request_reader: AtomicWaker,
}

impl AnswerOver {
    fn declare(&self) {
        self.over.store(true, Ordering::Release);
        self.request_reader.wake();
    }

    fn is_over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }
}

/// A request's body, which ends (and lets go of the stream) once its
/// answer is over.
struct UntilAnswered {
    inner: Option<Body>,
    over: Arc<AnswerOver>,
}

impl HttpBody for UntilAnswered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut().filter(|_| !this.over.is_over()) else {
            this.inner = None;
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(frame) => Poll::Ready(frame),
            Poll::Pending => {
                this.over.request_reader.register(cx.waker());
                if this.over.is_over() {
                    this.inner = None;
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}

/// An answer's body that ends (with `UNAVAILABLE` trailers) instead of
/// waiting once `ended` is ready.
struct EndingBody<B> {
    inner: Pin<Box<B>>,
    ended: Pin<Box<dyn Future<Output = ()> + Send>>,
    finished: bool,
    over: Arc<AnswerOver>,
}

impl<B> Drop for EndingBody<B> {
    fn drop(&mut self) {
        self.over.declare();
    }
}

impl<B: HttpBody> HttpBody for EndingBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                let last = match &frame {
                    None | Some(Err(_)) => true,
                    Some(Ok(frame)) => frame.is_trailers(),
                };
                if last {
                    this.finished = true;
                    this.over.declare();
                }
                Poll::Ready(frame)
            }
            Poll::Pending => match this.ended.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    this.finished = true;
                    this.over.declare();
                    Poll::Ready(Some(Ok(http_body::Frame::trailers(shutting_down()))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }
}

fn shutting_down_status() -> Status {
    Status::unavailable("the server is shutting down")
}

/// The trailers of a stream ended by the shutdown.
fn shutting_down() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::with_capacity(2);
    // A status built from constants always encodes.
    let _ = shutting_down_status().add_header(&mut trailers);
    trailers
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures_util::FutureExt as _;

    use super::*;

    /// A body that yields its frames, then waits for good.
    struct ThenWaits(VecDeque<Bytes>);

    impl HttpBody for ThenWaits {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            match self.0.pop_front() {
                Some(data) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                None => Poll::Pending,
            }
        }
    }

    fn ending_body(frames: &[&'static str]) -> (EndingBody<ThenWaits>, watch::Sender<bool>) {
        let (end, mut ending) = watch::channel(false);
        let body = EndingBody {
            inner: Box::pin(ThenWaits(
                frames
                    .iter()
                    .map(|frame| Bytes::from_static(frame.as_bytes()))
                    .collect(),
            )),
            ended: Box::pin(async move {
                let _ = ending.wait_for(|ending| *ending).await;
            }),
            finished: false,
            over: Arc::default(),
        };
        (body, end)
    }

    /// The next frame if one is ready: `None` while the body waits.
    fn ready_frame(body: &mut EndingBody<ThenWaits>) -> Option<Option<http_body::Frame<Bytes>>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .now_or_never()
            .map(|frame| frame.map(|frame| frame.unwrap_or_else(|never| match never {})))
    }

    #[tokio::test]
    async fn a_waiting_stream_ends_with_unavailable_once_ending() {
        let (mut body, end) = ending_body(&["first"]);
        let first = ready_frame(&mut body)
            .flatten()
            .map(|frame| frame.into_data().ok());
        assert_eq!(first, Some(Some(Bytes::from_static(b"first"))));
        // Waiting, and stays so until the end comes.
        assert!(ready_frame(&mut body).is_none());
        assert!(!body.is_end_stream());
        end.send(true).unwrap();
        let last = ready_frame(&mut body).flatten().expect("no trailers");
        let trailers = last.into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "14");
        assert!(body.is_end_stream());
        assert!(matches!(ready_frame(&mut body), Some(None)));
    }

    #[tokio::test]
    async fn what_is_ready_is_sent_before_the_stream_ends() {
        let (mut body, end) = ending_body(&["first", "second"]);
        end.send(true).unwrap();
        for expected in ["first", "second"] {
            let frame = ready_frame(&mut body).flatten().expect("a frame");
            assert_eq!(
                frame.into_data().ok(),
                Some(Bytes::from_static(expected.as_bytes()))
            );
        }
        let trailers = ready_frame(&mut body).flatten().expect("trailers");
        assert_eq!(
            trailers
                .into_trailers()
                .ok()
                .and_then(|t| t.get("grpc-status").cloned()),
            Some(http::HeaderValue::from_static("14"))
        );
    }

    #[tokio::test]
    async fn a_request_ends_once_its_answer_is_over() {
        let over = Arc::new(AnswerOver::default());
        let mut request = UntilAnswered {
            inner: Some(Body::new(ThenWaits(VecDeque::from([Bytes::from_static(
                b"first",
            )])))),
            over: over.clone(),
        };
        let mut next = || {
            std::future::poll_fn(|cx| Pin::new(&mut request).poll_frame(cx))
                .now_or_never()
                .map(|frame| frame.map(|frame| frame.map(|frame| frame.is_data())))
        };
        assert!(matches!(next(), Some(Some(Ok(true)))));
        assert!(next().is_none(), "the client's next request is awaited");
        let (mut answer, _end) = ending_body(&[]);
        answer.over = over;
        drop(answer);
        assert!(matches!(next(), Some(None)), "the request did not end");
    }

    #[tokio::test]
    async fn a_closed_sender_ends_waiting_streams_too() {
        let (mut body, end) = ending_body(&[]);
        assert!(ready_frame(&mut body).is_none());
        drop(end);
        assert!(ready_frame(&mut body)
            .flatten()
            .is_some_and(|frame| frame.is_trailers()));
    }
}
