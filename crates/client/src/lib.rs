//! The securemesh client: connects with mutual TLS, encrypts a payload with
//! Fernet, submits it and checks the server's digest of what it decrypted.
//!
//! A client may name several targets (coordinators): it balances over them
//! and fails over between them with the same [`securemesh_balance`] stack
//! that the coordinator uses toward servers, so no coordinator is a single
//! point of failure. [`Client::submit`] sends one payload; [`load::run`]
//! drives many at a fixed concurrency and summarises latency, errors and
//! spread over servers.

pub mod load;

use std::time::Duration;

pub use securemesh::status::code_name;
use securemesh::v1::{SubmitReply, SubmitRequest, DATA_SERVICE_NAME};
pub use securemesh_balance::BalanceOptions;
use securemesh_balance::{Attempt, BackendOptions, Balancer};
use securemesh_crypto::KeyRing;
use securemesh_tls::ClientTls;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A target is not a valid URL (or the balancer has stopped).
    #[error(transparent)]
    Target(#[from] securemesh_balance::PoolError),
    /// A readiness check's target is not a valid URL.
    #[error("target {target}: {source}")]
    Endpoint {
        /// The URL given.
        target: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// A target that is not `https://`: securemesh speaks mutual TLS only.
    #[error("target {0}: not an https:// URL (securemesh speaks mutual TLS only)")]
    NotHttps(String),
    /// The call failed with a gRPC status.
    #[error("{} {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// The server decrypted something other than what was sent.
    #[error("the server's SHA-256 does not match the plaintext sent")]
    DigestMismatch,
    /// The reply's `result` is not `"ok"`.
    #[error("unexpected result {0:?}")]
    UnexpectedResult(String),
    /// A readiness wait ran out of time.
    #[error("{target} not SERVING after {waited:?}: {last}")]
    NotReady {
        /// The URL waited for.
        target: String,
        /// How long it waited.
        waited: Duration,
        /// The last answer or error.
        last: String,
    },
}

impl ClientError {
    /// A short name for counting failures by kind: the gRPC status name, or
    /// `DIGEST_MISMATCH` / `UNEXPECTED_RESULT` / `INVALID_TARGET` /
    /// `NOT_READY`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Status(status) => code_name(status.code()),
            ClientError::DigestMismatch => "DIGEST_MISMATCH",
            ClientError::UnexpectedResult(_) => "UNEXPECTED_RESULT",
            ClientError::Target(_) | ClientError::Endpoint { .. } | ClientError::NotHttps(_) => {
                "INVALID_TARGET"
            }
            ClientError::NotReady { .. } => "NOT_READY",
        }
    }
}

/// A client of one or more targets (coordinators or servers) with the
/// Fernet keys to encrypt for them. Cloning shares connections, balancer and
/// retry budget.
#[derive(Clone)]
pub struct Client {
    balancer: Balancer,
    keys: KeyRing,
    call_timeout: Duration,
    authorization: Option<std::sync::Arc<str>>,
}

impl Client {
    /// A client of `targets` (e.g. `https://127.0.0.1:8000`), which it
    /// health-checks from the start (connecting to each). Each call may take `call_timeout`,
    /// retries included; the time left travels as `grpc-timeout`.
    pub fn new(
        targets: &[String],
        tls: ClientTls,
        keys: KeyRing,
        call_timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::with_balance(
            targets,
            tls,
            keys,
            call_timeout,
            BalanceOptions::default(),
            true,
        )
    }

    /// [`Client::new`] with its own retry and queue settings, and with or
    /// without active health checks of its targets. A benchmark gives
    /// `max_retries: 0` and no health checks, so that it neither hides the
    /// failures of what it measures nor takes it out of rotation.
    pub fn with_balance(
        targets: &[String],
        tls: ClientTls,
        keys: KeyRing,
        call_timeout: Duration,
        balance: BalanceOptions,
        health_checks: bool,
    ) -> Result<Self, ClientError> {
        // A coordinator may need a per-try timeout and a retry of its own:
        // one attempt of ours may take the whole call.
        let mut options = BackendOptions::new(tls);
        options.attempt_timeout = call_timeout;
        options.health_checks = health_checks;
        // The targets are the client's own: say which failed and why.
        let balance = BalanceOptions {
            explain_failures: true,
            ..balance
        };
        let balancer = Balancer::new(options, balance);
        for target in targets {
            balancer.pool().add(target)?;
        }
        Ok(Self {
            balancer,
            keys,
            call_timeout,
            authorization: None,
        })
    }

    /// What the client knows of each target now: in rotation, healthy,
    /// ejected, its last failure.
    pub fn targets(&self) -> Vec<securemesh_balance::BackendSnapshot> {
        self.balancer.pool().snapshot()
    }

    /// Sends `authorization` metadata (see `securemesh_credentials::
    /// basic_header` and `bearer_header`) with every call.
    pub fn with_authorization(mut self, authorization: Option<String>) -> Self {
        self.authorization = authorization.map(std::sync::Arc::from);
        self
    }

    /// Encrypts `plaintext`, submits it and verifies the reply.
    pub async fn submit(&self, plaintext: &[u8]) -> Result<SubmitReply, ClientError> {
        self.submit_as(plaintext, &securemesh::request_id::new())
            .await
    }

    /// [`Client::submit`] under the request id `request_id`, which the
    /// coordinator and server log with the call.
    pub async fn submit_as(
        &self,
        plaintext: &[u8],
        request_id: &str,
    ) -> Result<SubmitReply, ClientError> {
        let token = self.keys.encrypt(plaintext);
        let reply = self.send(token, request_id).await?;
        if reply.result != "ok" {
            return Err(ClientError::UnexpectedResult(reply.result));
        }
        if reply.plaintext_sha256 != securemesh_crypto::sha256(plaintext) {
            return Err(ClientError::DigestMismatch);
        }
        Ok(reply)
    }

    /// Submits an already made token as it is, without any check.
    pub async fn submit_token(&self, token: Vec<u8>) -> Result<SubmitReply, tonic::Status> {
        self.send(token, &securemesh::request_id::new()).await
    }

    async fn send(&self, token: Vec<u8>, request_id: &str) -> Result<SubmitReply, tonic::Status> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        self.balancer
            .submit(Attempt {
                message: SubmitRequest {
                    token: token.into(),
                },
                deadline: Some(deadline),
                caller: None,
                authorization: self.authorization.clone(),
                request_id: Some(std::sync::Arc::from(request_id)),
                trace: Default::default(),
            })
            .await
    }
}

/// Whether `target` is an `https://` URL, the scheme in any case (as
/// tonic reads it).
fn is_https(target: &str) -> bool {
    use tonic::codegen::http::uri::{Scheme, Uri};
    target
        .parse::<Uri>()
        .is_ok_and(|uri| uri.scheme() == Some(&Scheme::HTTPS))
}

fn endpoint(target: &str, tls: ClientTls) -> Result<Endpoint, ClientError> {
    // tonic would speak plaintext to an http:// URL, TLS configuration or
    // not; the balancer refuses one too.
    if !is_https(target) {
        return Err(ClientError::NotHttps(target.to_owned()));
    }
    let invalid = |source| ClientError::Endpoint {
        target: target.to_owned(),
        source,
    };
    Ok(tls
        .apply(Endpoint::from_shared(target.to_owned()).map_err(invalid)?)
        .map_err(invalid)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

/// Waits until `target` answers its health check for the data service with
/// `SERVING`, polling every 100 ms for at most `timeout`.
pub async fn wait_until_serving(
    target: &str,
    tls: ClientTls,
    timeout: Duration,
) -> Result<(), ClientError> {
    let channel = endpoint(target, tls)?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    let mut health = HealthClient::new(channel);
    let started = tokio::time::Instant::now();
    loop {
        let request = HealthCheckRequest {
            service: DATA_SERVICE_NAME.to_owned(),
        };
        let last = match tokio::time::timeout(Duration::from_secs(1), health.check(request)).await {
            Ok(Ok(reply)) if reply.get_ref().status == ServingStatus::Serving as i32 => {
                return Ok(());
            }
            Ok(Ok(reply)) => format!("status {}", reply.get_ref().status),
            Ok(Err(status)) => status.to_string(),
            Err(_) => "health check timed out".to_owned(),
        };
        if started.elapsed() >= timeout {
            return Err(ClientError::NotReady {
                target: target.to_owned(),
                waited: timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_are_targets_whatever_the_case_of_their_scheme() {
        for target in [
            "https://127.0.0.1:8000",
            "HTTPS://localhost:8000",
            "Https://[::1]:1",
        ] {
            assert!(is_https(target), "{target}");
        }
        for target in [
            "http://127.0.0.1:8000",
            "HTTP://127.0.0.1:8000",
            "127.0.0.1:8000",
            "https//127.0.0.1:8000",
            "",
        ] {
            assert!(!is_https(target), "{target}");
        }
    }
}
