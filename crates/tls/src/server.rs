//! The rustls server configuration: our certificate, and client
//! certificates required, verified against our CA and checked against its
//! revocation list; and a holder that lets a running server switch to a
//! new configuration (renewed certificate, new CRL) for new connections.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::material::{TlsError, TlsFiles};

/// Builds a server configuration that presents `files.cert` and requires
/// every client to present a certificate chaining to `files.ca` with the
/// clientAuth extended key usage and not revoked by the CRL at `crl`, if
/// given. ALPN offers only `h2`: gRPC needs HTTP/2 and newer gRPC clients
/// refuse a server that does not negotiate it.
///
/// With a CRL, a client whose revocation status is unknown is refused; an
/// expired CRL is still used (refusing everyone would be worse).
pub fn server_config(files: &TlsFiles, crl: Option<&Path>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(TlsFiles::roots(&files.ca)?, provider.clone());
    if let Some(crl) = crl {
        verifier = verifier.with_crls(TlsFiles::crls(crl)?);
    }
    let verifier = verifier.build()?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            TlsFiles::certificates(&files.cert)?,
            TlsFiles::private_key(&files.key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server configuration used for new connections, replaceable while
/// serving. Connections already open keep the configuration they started
/// with.
#[derive(Clone, Debug)]
pub struct ReloadableConfig {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadableConfig {
    /// Starts with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Uses `config` for every connection from now on.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = config;
    }
}

impl From<Arc<ServerConfig>> for ReloadableConfig {
    fn from(config: Arc<ServerConfig>) -> Self {
        Self::new(config)
    }
}
