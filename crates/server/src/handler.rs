//! The `securemesh.v1.DataService` implementation of a server.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use securemesh::v1::data_service_server::DataService;
use securemesh::v1::{SubmitReply, SubmitRequest, SUBMIT_METHOD};
use securemesh_crypto::{KeyRing, TokenError};
use securemesh_telemetry::{metrics, CallStats, Metrics};
use tonic::{Request, Response, Status};

/// Decrypts each submitted token with the server's key ring.
///
/// A token that fails verification is answered with `INVALID_ARGUMENT` and a
/// reason that names no secret. The plaintext is printed (the lab's
/// `Decrypted data:` line) only when `print_plaintext` is set.
///
/// Clones share the key ring, so [`DataHandler::replace_keys`] on one (after
/// a key rotation) takes effect for all.
#[derive(Debug, Clone)]
pub struct DataHandler {
    keys: Arc<RwLock<KeyRing>>,
    server_id: String,
    print_plaintext: bool,
    token_ttl: Option<Duration>,
    stats: CallStats,
}

impl DataHandler {
    /// A handler answering as `server_id` (e.g. `127.0.0.1:5001`).
    pub fn new(keys: KeyRing, server_id: impl Into<String>, print_plaintext: bool) -> Self {
        Metrics::declare_reasons(&metrics().token_refusals, &TokenError::KINDS);
        Self {
            keys: Arc::new(RwLock::new(keys)),
            server_id: server_id.into(),
            print_plaintext,
            token_ttl: None,
            stats: CallStats::default(),
        }
    }

    /// The calls this handler (and its clones) served: for the status
    /// page.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    /// Decrypts with `keys` from now on (calls in progress finish with the
    /// ring they started with).
    pub fn replace_keys(&self, keys: KeyRing) {
        *self
            .keys
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = keys;
    }

    /// Refuses tokens made more than `ttl` ago ("token expired"); `None`
    /// accepts tokens of any age.
    pub fn with_token_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.token_ttl = ttl;
        self
    }
}

#[tonic::async_trait]
impl DataService for DataHandler {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        let timer = self.stats.start(SUBMIT_METHOD);
        let request_id = securemesh::request_id::of(request.metadata());
        let (caller, via) = match request.extensions().get::<securemesh_tls::Caller>() {
            Some(caller) => (
                caller.origin().to_owned(),
                caller.on_behalf_of.as_ref().map(|_| caller.peer.clone()),
            ),
            None => (securemesh_tls::request_identity(&request), None),
        };
        let via = via.unwrap_or_else(|| "direct".to_owned());
        let token = request.into_inner().token;
        let outcome = self.answer(&token);
        let status = securemesh::status::outcome_name(&outcome);
        let latency = timer.finish(status);
        // Never the token or the plaintext: its size, and how it went.
        tracing::info!(
            %request_id,
            caller = %securemesh::text::field(&caller),
            via = %securemesh::text::field(&via),
            method = SUBMIT_METHOD,
            status,
            latency_ms = latency.as_micros() as f64 / 1000.0,
            bytes = token.len(),
            refused = outcome.as_ref().err().map(Status::message),
            "audit"
        );
        outcome.map(Response::new)
    }
}

impl DataHandler {
    /// Decrypts `token` and makes the reply, or says why it is refused.
    fn answer(&self, token: &[u8]) -> Result<SubmitReply, Status> {
        let decrypted = self
            .keys
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .decrypt_with_ttl(token, self.token_ttl);
        let plaintext = decrypted.map_err(|reason| {
            metrics()
                .token_refusals
                .with_label_values(&[reason.kind()])
                .inc();
            // Any caller can send bad tokens at will: the audit line
            // says why each was refused, this warning once a second.
            if let Some(held_back) =
                securemesh_tls::admit_log_line("submit_refused", tracing::Level::WARN)
            {
                tracing::warn!(token_bytes = token.len(), %reason, held_back, "Submit refused");
            }
            Status::invalid_argument(format!("invalid token: {reason}"))
        })?;
        if self.print_plaintext {
            tracing::info!("Decrypted data: {}", printable(&plaintext));
        }
        Ok(SubmitReply {
            result: "ok".into(),
            server_id: self.server_id.clone(),
            plaintext_sha256: securemesh_crypto::sha256(&plaintext).to_vec(),
        })
    }
}

/// The plaintext as one log line: control characters are escaped so that a
/// payload cannot forge log lines.
fn printable(plaintext: &[u8]) -> String {
    securemesh::text::printable(&String::from_utf8_lossy(plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> (DataHandler, KeyRing) {
        let keys = KeyRing::from_key_strings(&[securemesh_crypto::generate_key()]).unwrap();
        (DataHandler::new(keys.clone(), "test:1", false), keys)
    }

    #[tokio::test]
    async fn answers_ok_with_the_plaintext_digest() {
        let (handler, keys) = handler();
        let token = keys.encrypt(b"hello");
        let reply = handler
            .submit(Request::new(SubmitRequest {
                token: token.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.result, "ok");
        assert_eq!(reply.server_id, "test:1");
        assert_eq!(reply.plaintext_sha256, securemesh_crypto::sha256(b"hello"));
    }

    #[tokio::test]
    async fn refuses_bad_tokens_with_invalid_argument() {
        let (handler, _) = handler();
        let (_, other_keys) = self::handler();
        for token in [
            Vec::new(),
            b"garbage".to_vec(),
            other_keys.encrypt(b"under another key"),
            // Padding inside the header once panicked the handler.
            format!("gAAAAAAAAA=={}", "A".repeat(86)).into_bytes(),
        ] {
            let status = handler
                .submit(Request::new(SubmitRequest {
                    token: token.into(),
                }))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with("invalid token"), "{status:?}");
        }
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }
}
