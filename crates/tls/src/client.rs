//! The client side of mutual TLS, as tonic's channel takes it.

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::material::{TlsError, TlsFiles};

/// A tonic client TLS configuration that trusts only `files.ca` and presents
/// `files.cert` as our identity. The server name is taken from each
/// endpoint's URL (a DNS name or an IP address in the server's SANs).
pub fn client_tls_config(files: &TlsFiles) -> Result<ClientTlsConfig, TlsError> {
    // Parse now so that a bad file is reported at start-up with its path,
    // not at the first connection attempt.
    TlsFiles::certificates(&files.ca)?;
    TlsFiles::certificates(&files.cert)?;
    TlsFiles::private_key(&files.key)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(TlsFiles::read(&files.ca)?))
        .identity(Identity::from_pem(
            TlsFiles::read(&files.cert)?,
            TlsFiles::read(&files.key)?,
        )))
}
