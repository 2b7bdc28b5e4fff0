//! The rustls server configuration: our certificate, and client
//! certificates required, verified against our CA and checked against its
//! revocation list; and a holder that lets a running server switch to a
//! new configuration (renewed certificate, new CRL): new connections use
//! it, and open ones are judged again by its client verifier, so that a
//! certificate revoked since a connection's handshake does not keep that
//! connection.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::material::{TlsError, TlsFiles};

/// Builds a server configuration that presents `files.cert` and requires
/// every client to present a certificate chaining to `files.ca`, not
/// revoked by the CRL at `crl` if given, and with the clientAuth extended
/// key usage if it names its usages at all (webpki's rule: a leaf without
/// the extension is not limited; every certificate `securemesh pki` issues
/// names them, so a server certificate cannot pose as a client). ALPN offers only `h2`: gRPC needs HTTP/2 and newer gRPC clients
/// refuse a server that does not negotiate it.
///
/// With a CRL, a client whose revocation status is unknown is refused; an
/// expired CRL is still used (refusing everyone would be worse).
pub fn server_config(files: &TlsFiles, crl: Option<&Path>) -> Result<Arc<ServerConfig>, TlsError> {
    server_tls(files, crl).map(|tls| tls.config)
}

/// A server configuration and the verifier of its client certificates,
/// which a [`ReloadableConfig`] uses to judge open connections again.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The configuration (see [`server_config`]).
    pub config: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// [`server_config`], with its client verifier.
pub fn server_tls(files: &TlsFiles, crl: Option<&Path>) -> Result<ServerTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(TlsFiles::roots(&files.ca)?, provider.clone());
    if let Some(crl) = crl {
        verifier = verifier.with_crls(TlsFiles::crls(crl)?);
    }
    let verifier = verifier.build()?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(
            TlsFiles::certificates(&files.cert)?,
            TlsFiles::private_key(&files.key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
    })
}

/// The client verifier open connections are judged by: `None` until a
/// [`ReloadableConfig::replace`] publishes one.
pub(crate) type Verdicts = watch::Receiver<Option<Arc<dyn ClientCertVerifier>>>;

/// The server configuration used for new connections, replaceable while
/// serving. When it is replaced, connections already open keep their
/// session but have their client's certificate verified again by the new
/// configuration (its CA and CRL, the time now); one that fails is closed
/// at its next read (see `acceptor::Connection`).
#[derive(Clone, Debug)]
pub struct ReloadableConfig {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    verifier: Arc<watch::Sender<Option<Arc<dyn ClientCertVerifier>>>>,
}

impl ReloadableConfig {
    /// Starts with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            current: Arc::new(RwLock::new(config)),
            verifier: Arc::new(watch::Sender::new(None)),
        }
    }

    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Uses `tls` for every connection from now on, and has every open
    /// connection's client judged by it again.
    pub fn replace(&self, tls: ServerTls) {
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = tls.config;
        self.verifier.send_replace(Some(tls.verifier));
    }

    /// What a connection accepted from now on watches for a new verifier.
    /// (Taken before [`ReloadableConfig::current`], so that a replacement
    /// in between is seen.)
    pub(crate) fn verdicts(&self) -> Verdicts {
        self.verifier.subscribe()
    }
}

impl From<Arc<ServerConfig>> for ReloadableConfig {
    fn from(config: Arc<ServerConfig>) -> Self {
        Self::new(config)
    }
}

impl From<ServerTls> for ReloadableConfig {
    fn from(tls: ServerTls) -> Self {
        Self::new(tls.config)
    }
}
