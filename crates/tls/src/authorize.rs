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
//! someone else by setting it.
//!
//! Optionally, callers must also present credentials (`authorization`
//! metadata, Basic or Bearer) from a credentials file; missing or wrong
//! ones get `UNAUTHENTICATED`. A trusted forwarder is exempt: the
//! coordinator checks its own callers' credentials.
//!
//! Applied as a tonic interceptor on the DataService alone: health checks
//! and reflection stay open to every certificate of the CA.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use securemesh::v1::data_service_server::{DataService, DataServiceServer};
use securemesh_credentials::{Credentials, Refusal};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use crate::caller_identity;

/// The metadata header that carries the original caller's identity.
pub const CALLER_HEADER: &str = "x-securemesh-caller";

/// The identity of the coordinator certificate made by `pki init`.
pub const COORDINATOR_IDENTITY: &str = "spiffe://securemesh/both/coordinator";

/// Who called, as established by [`Authorization::check`]; handlers find it
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
}

impl Authorization {
    /// Any certificate of the CA may call; nobody may speak for others.
    pub fn any_identity() -> Self {
        Self {
            allowed: None,
            forwarders: BTreeSet::new(),
            credentials: None,
        }
    }

    /// Only `allowed` identities may call.
    pub fn only(allowed: impl IntoIterator<Item = String>) -> Self {
        Self {
            allowed: Some(allowed.into_iter().collect()),
            forwarders: BTreeSet::new(),
            credentials: None,
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
    /// in the request's extensions.
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let peer = caller_identity(&request)
            .map(|identity| identity.to_string())
            .ok_or_else(|| Status::unauthenticated("no client certificate identity"))?;
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&peer) {
                audit_refusal(&request, &peer, "PERMISSION_DENIED");
                tracing::warn!(%peer, "call refused: identity not allowed");
                return Err(Status::permission_denied(format!(
                    "identity {peer} is not allowed to call this service"
                )));
            }
        }
        let claimed = request
            .metadata()
            .get(CALLER_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let on_behalf_of = match claimed {
            Some(claimed) if self.forwarders.contains(&peer) => Some(claimed),
            Some(claimed) => {
                // Debug-quoted: the value is the caller's, and must not
                // pass for fields of the log line.
                tracing::warn!(%peer, ?claimed, "ignoring a caller header from a peer that is not a forwarder");
                None
            }
            None => None,
        };
        // A trusted forwarder (the coordinator) has checked its caller's
        // credentials already and does not pass them on.
        let forwarded = on_behalf_of.is_some() || self.forwarders.contains(&peer);
        let user = match &self.credentials {
            None => None,
            Some(_) if forwarded => None,
            Some(shared) => {
                let credentials = shared
                    .read()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .clone();
                let header = request
                    .metadata()
                    .get("authorization")
                    .and_then(|value| value.to_str().ok());
                let verdict = credentials
                    .verify_without_hashing(header)
                    .unwrap_or_else(|| hashing_allowed_to_block(|| credentials.verify(header)));
                match verdict {
                    Ok(user) => Some(user),
                    // Too many password checks at once is no verdict on
                    // these credentials: the caller may try again.
                    Err(refusal @ Refusal::Busy) => {
                        audit_refusal(&request, &peer, "RESOURCE_EXHAUSTED");
                        tracing::warn!(%peer, %refusal, "call refused: credentials");
                        return Err(Status::resource_exhausted(refusal.to_string()));
                    }
                    Err(refusal) => {
                        audit_refusal(&request, &peer, "UNAUTHENTICATED");
                        tracing::warn!(%peer, %refusal, "call refused: credentials");
                        return Err(Status::unauthenticated(refusal.to_string()));
                    }
                }
            }
        };
        request.extensions_mut().insert(Caller {
            peer,
            on_behalf_of,
            user,
        });
        Ok(request)
    }
}

/// Runs `verify` (argon2) telling tokio that this thread blocks, so that
/// other tasks (health checks, other calls) move to another thread
/// meanwhile. Outside a multi-threaded runtime it simply runs.
fn hashing_allowed_to_block<T>(verify: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(verify)
        }
        _ => verify(),
    }
}

/// The audit line of a call refused before it reached the service.
fn audit_refusal(request: &Request<()>, peer: &str, status: &'static str) {
    securemesh_telemetry::metrics()
        .requests
        .with_label_values(&[securemesh::v1::SUBMIT_METHOD, status])
        .inc();
    tracing::info!(
        request_id = %securemesh::request_id::of(request.metadata()),
        caller = %peer,
        method = securemesh::v1::SUBMIT_METHOD,
        status,
        latency_ms = 0.0,
        bytes = 0,
        "audit"
    );
}

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
    }
}

/// A DataService as securemesh serves it: `handler` behind `authorization`,
/// with decoded messages limited to `max_message_bytes` (larger ones get
/// `OUT_OF_RANGE`).
pub fn authorized_data_service<H: DataService>(
    handler: H,
    authorization: Authorization,
    max_message_bytes: usize,
) -> InterceptedService<DataServiceServer<H>, Authorization> {
    InterceptedService::new(
        DataServiceServer::new(handler).max_decoding_message_size(max_message_bytes),
        authorization,
    )
}
