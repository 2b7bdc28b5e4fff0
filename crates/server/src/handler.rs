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
    /// The ring in use; each call takes the ring out of the lock and
    /// decrypts without holding it, so that a reload waits for no call.
    keys: Arc<RwLock<Arc<KeyRing>>>,
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
            keys: Arc::new(RwLock::new(Arc::new(keys))),
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
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(keys);
    }

    /// Refuses tokens made more than `ttl` ago ("token expired") and, as
    /// Python's `Fernet.decrypt(token, ttl)` does, tokens stamped more
    /// than 60 s ahead of this host's clock; `None` accepts tokens of any
    /// age and any stamp. Fernet stamps whole seconds, so `ttl` counts in
    /// whole seconds too.
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
        let handler_audit = request
            .extensions()
            .get::<securemesh_tls::HandlerAudit>()
            .cloned();
        let token = request.into_inner().token;
        let outcome = self.answer(&token, &request_id);
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
        if let Some(audit) = handler_audit {
            audit.done();
        }
        outcome.map(Response::new)
    }
}

impl DataHandler {
    /// Decrypts `token` and makes the reply, or says why it is refused.
    fn answer(&self, token: &[u8], request_id: &str) -> Result<SubmitReply, Status> {
        let keys = Arc::clone(
            &self
                .keys
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        let decrypted = keys.decrypt_with_ttl(token, self.token_ttl);
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
            tracing::info!(%request_id, "Decrypted data: {}", shown_plaintext(&plaintext));
        }
        Ok(SubmitReply {
            result: "ok".into(),
            server_id: self.server_id.clone(),
            plaintext_sha256: securemesh_crypto::sha256(&plaintext).to_vec(),
        })
    }
}

/// How many characters of a plaintext the `Decrypted data:` line shows.
const SHOWN_CHARACTERS: usize = 200;

/// The plaintext as the lab's log line shows it: at most
/// [`SHOWN_CHARACTERS`] (then its size), control characters escaped so
/// that it cannot start a forged line, and in quotes when it holds a `=`,
/// `"` or `\`, so that it cannot pose as fields of the line (an `audit`
/// line's, say). A caller chooses the plaintext: without the cap, a
/// message of NUL bytes would log five times its size.
fn shown_plaintext(plaintext: &[u8]) -> String {
    let text = String::from_utf8_lossy(plaintext);
    let (head, cut) = match text.char_indices().nth(SHOWN_CHARACTERS) {
        Some((end, _)) => (&text[..end], true),
        None => (&text[..], false),
    };
    let shown = if head.contains(['=', '"', '\\']) {
        securemesh::text::field(head)
    } else {
        securemesh::text::printable(head)
    };
    if cut {
        format!("{shown}... ({} bytes in all)", plaintext.len())
    } else {
        shown
    }
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

    /// A rotated ring takes effect in every clone of the handler, and any
    /// key of a ring decrypts.
    #[tokio::test]
    async fn replaced_keys_take_effect_in_every_clone() {
        let (old_key, new_key) = (
            securemesh_crypto::generate_key(),
            securemesh_crypto::generate_key(),
        );
        let old = KeyRing::from_key_strings(&[&old_key]).unwrap();
        let new = KeyRing::from_key_strings(&[&new_key]).unwrap();
        let handler = DataHandler::new(old.clone(), "test:1", false);
        let serving = handler.clone();
        let submit = |handler: &DataHandler, token: Vec<u8>| {
            let handler = handler.clone();
            async move {
                handler
                    .submit(Request::new(SubmitRequest {
                        token: token.into(),
                    }))
                    .await
                    .map(|_| ())
                    .map_err(|status| status.code())
            }
        };
        assert_eq!(
            submit(&serving, new.encrypt(b"too early")).await,
            Err(tonic::Code::InvalidArgument)
        );
        handler.replace_keys(KeyRing::from_key_strings(&[new_key, old_key]).unwrap());
        assert_eq!(submit(&serving, new.encrypt(b"new")).await, Ok(()));
        assert_eq!(submit(&serving, old.encrypt(b"old")).await, Ok(()));
        handler.replace_keys(new.clone());
        assert_eq!(
            submit(&serving, old.encrypt(b"retired")).await,
            Err(tonic::Code::InvalidArgument)
        );
    }

    #[test]
    fn the_shown_plaintext_can_forge_neither_lines_nor_fields() {
        assert_eq!(shown_plaintext(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(
            shown_plaintext(b"Sensitive data from Client1"),
            "Sensitive data from Client1"
        );
        assert_eq!(
            shown_plaintext(b"x audit caller=spiffe://securemesh/client/admin"),
            "\"x audit caller=spiffe://securemesh/client/admin\""
        );
        assert_eq!(shown_plaintext(b"say \"hi\""), "\"say \\\"hi\\\"\"");
    }

    #[test]
    fn a_long_plaintext_is_cut_and_its_size_given() {
        let shown = shown_plaintext(&[0; 100_000]);
        assert!(
            shown.ends_with("... (100000 bytes in all)"),
            "{}",
            &shown[shown.len() - 40..]
        );
        assert_eq!(shown.matches("\\u{0}").count(), SHOWN_CHARACTERS);
        // Cut between characters, never inside one.
        let shown = shown_plaintext("é".repeat(300).as_bytes());
        assert!(shown.starts_with(&"é".repeat(SHOWN_CHARACTERS)));
        assert!(shown.ends_with("... (600 bytes in all)"), "{shown}");
        let whole = "é".repeat(SHOWN_CHARACTERS);
        assert_eq!(shown_plaintext(whole.as_bytes()), whole);
    }
}
