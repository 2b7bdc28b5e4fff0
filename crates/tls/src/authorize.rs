//! Who may call the DataService, and on whose behalf.
//!
//! mTLS proves that a peer holds a certificate of our CA; this decides what
//! that identity may do. Servers admit, by default, only the coordinator's
//! identity (so a client certificate alone cannot bypass the coordinator);
//! the coordinator admits every client of the CA unless given a list. A
//! refused identity gets `PERMISSION_DENIED` naming it.
//!
//! The coordinator tells servers who its caller was in the
//! [`CALLER_HEADER`] metadata; a server believes that header only from a
//! trusted forwarder (the coordinator), so a client cannot claim to be
//! someone else by setting it. The identity travels percent-encoded
//! ([`encode_caller`]): a certificate's name may hold any character (a
//! common name with an accent, a control character), which a header value
//! cannot carry as it is, and a server refuses a forwarded call whose
//! caller it cannot read rather than take it for the forwarder's own.
//!
//! Optionally, callers must also present credentials (`authorization`
//! metadata, Basic or Bearer) from a credentials file; missing or wrong
//! ones get `UNAUTHENTICATED`. A trusted forwarder is exempt: the
//! coordinator checks its own callers' credentials.
//!
//! Applied around the DataService alone ([`authorized_data_service`]):
//! health checks and reflection stay open to every certificate of the CA.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, CONTROLS};
use securemesh::v1::data_service_server::{DataService, DataServiceServer};
use securemesh_credentials::{Credentials, Refusal};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Request, Status};

use crate::caller_identity;
use crate::throttle::LogThrottle;

/// How often a warning about refused calls may be logged. Any holder of a
/// certificate of the CA can cause them at will: one a second of each kind
/// (the audit lines and the metrics count every call).
const REFUSAL_WARNINGS_EVERY: Duration = Duration::from_secs(1);

/// The metadata header that carries the original caller's identity.
pub const CALLER_HEADER: &str = "x-securemesh-caller";

/// What [`encode_caller`] writes as `%XX`, beside every byte outside
/// ASCII: control characters, the space and `%` itself.
const ESCAPED_IN_CALLER: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

/// `identity` as the [`CALLER_HEADER`] carries it: percent-encoded, so
/// that it is visible ASCII (a valid header value) whatever its
/// characters, and arrives unchanged ([`decode_caller`]).
pub fn encode_caller(identity: &str) -> Cow<'_, str> {
    percent_encoding::utf8_percent_encode(identity, ESCAPED_IN_CALLER).into()
}

/// The identity a [`CALLER_HEADER`] value names, if it is one
/// [`encode_caller`] could have written: visible ASCII whose `%XX`
/// escapes decode to UTF-8.
pub fn decode_caller(value: &[u8]) -> Option<String> {
    // percent_decode leaves a `%` without two hex digits as it is.
    let mut rest = value;
    while let Some((first, after)) = rest.split_first() {
        rest = match (first, after) {
            (b'%', [high, low, after @ ..])
                if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() =>
            {
                after
            }
            (b'%', _) => return None,
            (byte, after) if byte.is_ascii_graphic() => after,
            _ => return None,
        };
    }
    let identity = percent_encoding::percent_decode(value).decode_utf8().ok()?;
    Some(identity.into_owned())
}

/// The identity of the coordinator certificate made by `pki init`.
pub const COORDINATOR_IDENTITY: &str = "spiffe://securemesh/both/coordinator";

/// Who called, as established by [`Authorization::authorize`]; handlers find it
/// in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity of the TLS peer.
    pub peer: String,
    /// The original caller named by a trusted forwarder, if any.
    pub on_behalf_of: Option<String>,
    /// The user or token name proven by credentials, if they are required.
    pub user: Option<String>,
}

impl Caller {
    /// The original caller: the forwarded identity, else the peer.
    pub fn origin(&self) -> &str {
        self.on_behalf_of.as_deref().unwrap_or(&self.peer)
    }
}

/// Which peer identities may call, and which may speak for others.
#[derive(Debug, Clone)]
pub struct Authorization {
    allowed: Option<BTreeSet<String>>,
    forwarders: BTreeSet<String>,
    credentials: Option<Arc<RwLock<Arc<Credentials>>>>,
    /// The warnings about refused calls, shared by every clone.
    refusal_warnings: LogThrottle,
}

impl Authorization {
    /// Any certificate of the CA may call; nobody may speak for others.
    pub fn any_identity() -> Self {
        Self {
            allowed: None,
            forwarders: BTreeSet::new(),
            credentials: None,
            refusal_warnings: LogThrottle::new(REFUSAL_WARNINGS_EVERY),
        }
    }

    /// Only `allowed` identities may call.
    pub fn only(allowed: impl IntoIterator<Item = String>) -> Self {
        Self {
            allowed: Some(allowed.into_iter().collect()),
            forwarders: BTreeSet::new(),
            credentials: None,
            refusal_warnings: LogThrottle::new(REFUSAL_WARNINGS_EVERY),
        }
    }

    /// What a server does by default: admit the coordinator and `extra`,
    /// and believe the coordinator about its callers.
    pub fn server_default(extra: impl IntoIterator<Item = String>) -> Self {
        let mut allowed: BTreeSet<String> = extra.into_iter().collect();
        allowed.insert(COORDINATOR_IDENTITY.to_owned());
        Self {
            allowed: Some(allowed),
            forwarders: [COORDINATOR_IDENTITY.to_owned()].into(),
            credentials: None,
            refusal_warnings: LogThrottle::new(REFUSAL_WARNINGS_EVERY),
        }
    }

    /// Also requires credentials from `credentials` on every call.
    pub fn with_credentials(mut self, credentials: Arc<Credentials>) -> Self {
        self.credentials = Some(Arc::new(RwLock::new(credentials)));
        self
    }

    /// Checks credentials against `credentials` from now on, in every clone
    /// of this authorization (a reloaded file); `false` if none are
    /// required here.
    pub fn replace_credentials(&self, credentials: Arc<Credentials>) -> bool {
        match &self.credentials {
            Some(shared) => {
                *shared.write().unwrap_or_else(|poison| poison.into_inner()) = credentials;
                true
            }
            None => false,
        }
    }

    /// Refuses a peer that may not call; otherwise records the [`Caller`]
    /// in the request's extensions. A password's argon2 verification runs
    /// on tokio's blocking pool, so the task awaiting it (a connection's,
    /// with other calls on it) goes on meanwhile; a call bringing the same
    /// credentials as a check under way waits for that check's verdict.
    pub async fn authorize(&self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.first_pass(&request)? {
            FirstPass::Admitted(caller) => Ok(with_caller(request, caller)),
            FirstPass::PasswordToHash(pending) => {
                let caller = pending.on_behalf_of.as_deref().unwrap_or(&pending.peer);
                let verdict = pending
                    .credentials
                    .verify_off_thread(pending.header(), caller)
                    .await;
                let caller = pending.conclude(&request, verdict, &self.refusal_warnings)?;
                Ok(with_caller(request, caller))
            }
        }
    }

    /// Every check that needs no password hashing.
    fn first_pass(&self, request: &Request<()>) -> Result<FirstPass, Status> {
        let Some(peer) = caller_identity(request).map(|identity| identity.to_string()) else {
            audit_refusal(request, "unknown", "UNAUTHENTICATED");
            return Err(Status::unauthenticated("no client certificate identity"));
        };
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&peer) {
                audit_refusal(request, &peer, "PERMISSION_DENIED");
                if let Some(held_back) = self
                    .refusal_warnings
                    .admit("identity_not_allowed", tracing::Level::WARN)
                {
                    tracing::warn!(peer = %securemesh::text::field(&peer), held_back, "call refused: identity not allowed");
                }
                return Err(Status::permission_denied(format!(
                    "identity {peer} is not allowed to call this service"
                )));
            }
        }
        let claimed = request.metadata().get(CALLER_HEADER);
        let on_behalf_of = match claimed {
            Some(claimed) if self.forwarders.contains(&peer) => {
                let Some(caller) = decode_caller(claimed.as_bytes()) else {
                    audit_refusal(request, &peer, "INVALID_ARGUMENT");
                    tracing::warn!(peer = %securemesh::text::field(&peer), value = ?claimed, "call refused: a forwarder named its caller unreadably");
                    return Err(Status::invalid_argument(format!(
                        "the {CALLER_HEADER} header is no percent-encoded UTF-8 identity"
                    )));
                };
                Some(caller)
            }
            Some(claimed) => {
                let claimed = String::from_utf8_lossy(claimed.as_bytes());
                // Debug-quoted: the value is the caller's, and must not
                // pass for fields of the log line.
                if let Some(held_back) = self
                    .refusal_warnings
                    .admit("caller_header_ignored", tracing::Level::WARN)
                {
                    tracing::warn!(peer = %securemesh::text::field(&peer), ?claimed, held_back, "ignoring a caller header from a peer that is not a forwarder");
                }
                None
            }
            None => None,
        };
        // A trusted forwarder (the coordinator) has checked its caller's
        // credentials already and does not pass them on.
        let forwarded = on_behalf_of.is_some() || self.forwarders.contains(&peer);
        let credentials = match &self.credentials {
            Some(shared) if !forwarded => shared
                .read()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone(),
            _ => {
                return Ok(FirstPass::Admitted(Caller {
                    peer,
                    on_behalf_of,
                    user: None,
                }))
            }
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let pending = PendingPassword {
            peer,
            on_behalf_of,
            credentials,
            header,
        };
        match pending.credentials.verify_without_hashing(pending.header()) {
            Some(verdict) => Ok(FirstPass::Admitted(pending.conclude(
                request,
                verdict,
                &self.refusal_warnings,
            )?)),
            None => Ok(FirstPass::PasswordToHash(pending)),
        }
    }
}

/// What [`Authorization::first_pass`] found.
enum FirstPass {
    /// The caller may call.
    Admitted(Caller),
    /// Only an argon2 verification of a password can tell.
    PasswordToHash(PendingPassword),
}

/// A call whose credentials are still to be checked.
struct PendingPassword {
    peer: String,
    on_behalf_of: Option<String>,
    credentials: Arc<Credentials>,
    header: Option<String>,
}

impl PendingPassword {
    fn header(&self) -> Option<&str> {
        self.header.as_deref()
    }

    /// The caller, or the refusal, once `verdict` on its credentials is in.
    fn conclude(
        self,
        request: &Request<()>,
        verdict: Result<String, Refusal>,
        warnings: &LogThrottle,
    ) -> Result<Caller, Status> {
        let peer = self.peer;
        match verdict {
            Ok(user) => Ok(Caller {
                peer,
                on_behalf_of: self.on_behalf_of,
                user: Some(user),
            }),
            // Too many password checks at once is no verdict on these
            // credentials: the caller may try again.
            Err(refusal @ Refusal::Busy) => {
                audit_refusal(request, &peer, "RESOURCE_EXHAUSTED");
                if let Some(held_back) = warnings.admit("credentials_busy", tracing::Level::WARN) {
                    tracing::warn!(peer = %securemesh::text::field(&peer), %refusal, held_back, "call refused: credentials");
                }
                Err(Status::resource_exhausted(refusal.to_string()))
            }
            Err(refusal @ Refusal::Unfinished) => {
                audit_refusal(request, &peer, "INTERNAL");
                tracing::error!(peer = %securemesh::text::field(&peer), %refusal, "call refused: credentials");
                Err(Status::internal(refusal.to_string()))
            }
            Err(refusal) => {
                audit_refusal(request, &peer, "UNAUTHENTICATED");
                if let Some(held_back) = warnings.admit("credentials_refused", tracing::Level::WARN)
                {
                    tracing::warn!(peer = %securemesh::text::field(&peer), %refusal, held_back, "call refused: credentials");
                }
                Err(Status::unauthenticated(refusal.to_string()))
            }
        }
    }
}

fn with_caller(mut request: Request<()>, caller: Caller) -> Request<()> {
    request.extensions_mut().insert(caller);
    request
}

/// The audit line of a call refused before it reached the service.
fn audit_refusal(request: &Request<()>, peer: &str, status: &'static str) {
    audit_unserved_call(
        &securemesh::request_id::of(request.metadata()),
        peer,
        status,
        std::time::Duration::ZERO,
    );
}

/// Counts a `Submit` that ended before it reached the service (refused,
/// or given up while its caller was authorized), with the status its
/// caller got, and writes its audit line with how long it took, so that
/// every call has both.
pub fn audit_unserved_call(
    request_id: &str,
    peer: &str,
    status: &'static str,
    latency: std::time::Duration,
) {
    securemesh_telemetry::metrics()
        .requests
        .with_label_values(&[securemesh::v1::SUBMIT_METHOD, status])
        .inc();
    tracing::info!(
        request_id = %securemesh::text::field(request_id),
        caller = %securemesh::text::field(peer),
        method = securemesh::v1::SUBMIT_METHOD,
        status,
        latency_ms = latency.as_micros() as f64 / 1000.0,
        bytes = 0,
        "audit"
    );
}

/// A DataService as securemesh serves it: `handler` behind `authorization`,
/// with decoded messages limited to `max_message_bytes` (larger ones get
/// `OUT_OF_RANGE`). tonic's router runs each call in its own task, so a
/// password being hashed holds up that call alone.
pub fn authorized_data_service<H: DataService>(
    handler: H,
    authorization: Authorization,
    max_message_bytes: usize,
) -> Authorized<DataServiceServer<H>> {
    Authorized {
        inner: DataServiceServer::new(handler).max_decoding_message_size(max_message_bytes),
        authorization: Arc::new(authorization),
    }
}

/// A service behind [`Authorization::authorize`]: what a tonic interceptor
/// does, but awaiting the check, so that a password's argon2 verification
/// neither blocks a runtime thread nor escapes the limits on checks at once.
#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    /// Shared by every call (each call's future holds it).
    authorization: Arc<Authorization>,
}

impl<S> tower_service::Service<http::Request<Body>> for Authorized<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service made ready is the one that serves; a fresh clone
        // stays for the next call.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let authorization = Arc::clone(&self.authorization);
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
            let mut extensions = std::mem::take(&mut parts.extensions);
            let is_submit = parts.uri.path() == securemesh::v1::SUBMIT_METHOD;
            let handler_audit = HandlerAudit::default();
            if is_submit {
                extensions.insert(handler_audit.clone());
            }
            let checking = Request::from_parts(metadata, extensions, ());
            let mut unserved = is_submit.then(|| {
                UnservedCall::new(
                    Instant::now(),
                    checking.metadata().as_ref(),
                    caller_identity(&checking),
                )
            });
            match authorization.authorize(checking).await {
                Ok(checked) => {
                    if let (Some(unserved), Some(caller)) =
                        (&mut unserved, checked.extensions().get::<Caller>())
                    {
                        if caller.on_behalf_of.is_some() {
                            unserved.caller = Some(Arc::from(caller.origin()));
                        }
                    }
                    let (metadata, extensions, ()) = checked.into_parts();
                    parts.headers = metadata.into_headers();
                    parts.extensions = extensions;
                    let answer = inner.call(http::Request::from_parts(parts, body)).await;
                    if let Some(unserved) = &mut unserved {
                        match &answer {
                            _ if handler_audit.is_done() => unserved.handed_over(),
                            Ok(response) => unserved.end(status_in_headers(response.headers())),
                            Err(never) => match *never {},
                        }
                    }
                    answer
                }
                Err(status) => {
                    // Refusals are audited where they are decided.
                    if let Some(unserved) = &mut unserved {
                        unserved.handed_over();
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Put in the extensions of every `Submit` that [`Authorized`] passes on:
/// the handler calls [`HandlerAudit::done`] once it has written the call's
/// audit line and counted it, and [`Authorized`] accounts for the calls
/// that end any other way.
#[derive(Debug, Clone, Default)]
pub struct HandlerAudit(Arc<AtomicBool>);

impl HandlerAudit {
    /// The handler has audited and counted the call.
    pub fn done(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_done(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A `Submit` from its arrival until whoever serves it accounts for it (a
/// server's handler, the coordinator's relay, or the authorization that
/// refused it): a call that ends before is counted and audited here once,
/// with the status its caller got ([`UnservedCall::end`]), or as
/// `CANCELLED` when it is dropped (its caller reset it, or its deadline
/// passed in tonic's hands, during a password check). On a server, a
/// message tonic refuses before the handler runs (larger than the limit,
/// compressed, not a `SubmitRequest`) ends so. What the audit line needs
/// is kept as it came (a header value, the peer's identity) and turned
/// into text only for a call that ends here.
#[derive(Debug)]
pub struct UnservedCall {
    arrived: Instant,
    request_id: Option<http::HeaderValue>,
    caller: Option<Arc<str>>,
    accounted: bool,
}

impl UnservedCall {
    /// A call that arrived at `arrived` with `headers`, from `caller`.
    pub fn new(arrived: Instant, headers: &http::HeaderMap, caller: Option<Arc<str>>) -> Self {
        Self {
            arrived,
            request_id: headers.get(securemesh::request_id::HEADER).cloned(),
            caller,
            accounted: false,
        }
    }

    /// The call ended here with `status`: counted and audited, once.
    pub fn end(&mut self, status: &'static str) {
        if std::mem::replace(&mut self.accounted, true) {
            return;
        }
        let request_id = securemesh::request_id::given_or_new(
            self.request_id
                .as_ref()
                .and_then(|value| value.to_str().ok()),
        );
        audit_unserved_call(
            &request_id,
            self.caller.as_deref().unwrap_or("unknown"),
            status,
            self.arrived.elapsed(),
        );
    }

    /// Whoever serves the call accounts for it (or the refusal did).
    pub fn handed_over(&mut self) {
        self.accounted = true;
    }
}

impl Drop for UnservedCall {
    fn drop(&mut self) {
        self.end("CANCELLED");
    }
}

/// The gRPC status of an answer whose headers carry it (an answer of
/// headers only, as tonic gives every refusal); `UNKNOWN` otherwise.
fn status_in_headers(headers: &http::HeaderMap) -> &'static str {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or("UNKNOWN", |code| {
            securemesh::status::code_name(tonic::Code::from(code))
        })
}

impl<S: NamedService> NamedService for Authorized<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_encoded_as_visible_ascii_and_decoded_as_it_was() {
        for identity in [
            "spiffe://securemesh/client/client",
            "spiffe://securemesh/client/a%20b",
            "Zoë",
            "tab\tnew\nline\u{7f} space",
            "",
        ] {
            let encoded = encode_caller(identity);
            assert!(
                encoded.bytes().all(|byte| byte.is_ascii_graphic()),
                "{encoded}"
            );
            assert_eq!(decode_caller(encoded.as_bytes()).as_deref(), Some(identity));
        }
        // What needs no escape is sent as it is.
        assert_eq!(
            encode_caller("spiffe://securemesh/client/client"),
            "spiffe://securemesh/client/client"
        );
    }

    #[test]
    fn a_caller_header_that_no_encoding_wrote_is_unreadable() {
        for value in [
            "Zoë".as_bytes(),
            b"%FF",
            b"%C3",
            b"a%2",
            b"%G1",
            b"%",
            b"two words",
            b"tab\there",
        ] {
            assert_eq!(
                decode_caller(value),
                None,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }
}
