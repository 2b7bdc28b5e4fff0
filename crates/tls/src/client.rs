//! The client side of mutual TLS: our certificate for the server, and the
//! server's certificate verified against our CA and, when given, its
//! revocation list.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use tonic::transport::{ClientTlsConfig, Endpoint, Identity};

use crate::material::{TlsError, TlsFiles};

/// How a client connects: the identity it presents and how it verifies
/// servers. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    identity: ClientTlsConfig,
    verifier: Arc<dyn ServerCertVerifier>,
    /// The same identity and verifier for a connection made without tonic
    /// (the balancer's own HTTP/2 channel); ALPN offers `h2`.
    rustls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// `endpoint` with this TLS. The server name is taken from the
    /// endpoint's URL (a DNS name or an IP address in the server's SANs).
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, tonic::transport::Error> {
        endpoint.tls_config_with_verifier(self.identity.clone(), self.verifier.clone())
    }

    /// The rustls configuration of this TLS, for connections made without
    /// tonic.
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.rustls.clone()
    }
}

/// Presents `files.cert` and trusts servers whose certificate chains to
/// `files.ca` (with serverAuth, valid for the dialled name).
pub fn client_tls_config(files: &TlsFiles) -> Result<ClientTls, TlsError> {
    client_tls(files, None)
}

/// [`client_tls_config`], also refusing servers whose certificate is
/// revoked by the CRL at `crl`.
pub fn client_tls(files: &TlsFiles, crl: Option<&Path>) -> Result<ClientTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut verifier =
        WebPkiServerVerifier::builder_with_provider(TlsFiles::roots(&files.ca)?, provider.clone());
    if let Some(crl) = crl {
        verifier = verifier.with_crls(TlsFiles::crls(crl)?);
    }
    let verifier = verifier.build().map_err(|error| TlsError::Pem {
        path: files.ca.clone(),
        what: format!("cannot verify servers with it: {error}"),
    })?;
    let mut rustls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(
            TlsFiles::certificates(&files.cert)?,
            TlsFiles::private_key(&files.key)?,
        )?;
    rustls.alpn_protocols = vec![b"h2".to_vec()];
    let identity = ClientTlsConfig::new().identity(Identity::from_pem(
        TlsFiles::read(&files.cert)?,
        TlsFiles::read(&files.key)?,
    ));
    Ok(ClientTls {
        identity,
        verifier,
        rustls: Arc::new(rustls),
    })
}
