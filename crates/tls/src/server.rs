//! The rustls server configuration: our certificate, and client
//! certificates required and verified against our CA.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::material::{TlsError, TlsFiles};

/// Builds a server configuration that presents `files.cert` and requires
/// every client to present a certificate chaining to `files.ca` with the
/// clientAuth extended key usage. ALPN offers only `h2`: gRPC needs HTTP/2
/// and newer gRPC clients refuse a server that does not negotiate it.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut roots = RootCertStore::empty();
    for ca in TlsFiles::certificates(&files.ca)? {
        roots.add(ca)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;

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
