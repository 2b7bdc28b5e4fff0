//! Who is on the other end of a connection, as its certificate says.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The identity of a verified peer certificate: its first URI SAN (our
/// `spiffe://securemesh/<role>/<name>`), else its first DNS SAN, else its
/// subject common name. `None` when there is no certificate or it does not
/// parse.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = chain.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    let sans = subject_alt_names(&cert);
    let uri = sans.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some(uri.to_string()),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
    };
    let common_name = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    };
    uri.or_else(dns).or_else(common_name)
}

/// The names a client dialling the leaf of `chain` may use: its DNS and IP
/// address SANs (as `10.0.0.5` or `::1`). Empty when it does not parse.
pub fn dialling_names(chain: &[CertificateDer<'_>]) -> Vec<String> {
    let Some((_, cert)) = chain
        .first()
        .and_then(|leaf| X509Certificate::from_der(leaf.as_ref()).ok())
    else {
        return Vec::new();
    };
    subject_alt_names(&cert)
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|octets| std::net::IpAddr::from(octets).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|octets| std::net::IpAddr::from(octets).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The subject alternative names of `cert` (none when it has none or the
/// extension does not parse).
fn subject_alt_names<'a>(cert: &X509Certificate<'a>) -> Vec<GeneralName<'a>> {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default()
}

/// When the leaf of `chain` stops being valid (its notAfter), in seconds
/// since the Unix epoch; `None` when it does not parse.
pub(crate) fn valid_until(chain: &[CertificateDer<'_>]) -> Option<i64> {
    let (_, cert) = X509Certificate::from_der(chain.first()?.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The identity of the peer of a tonic request: as [`crate::TlsIncoming`]
/// read it at the handshake, else parsed from the request's certificates
/// (tonic's own TLS).
pub fn caller_identity<T>(request: &tonic::Request<T>) -> Option<Arc<str>> {
    if let Some(peer) = request.extensions().get::<crate::PeerInfo>() {
        return peer.identity().cloned();
    }
    request
        .peer_certs()
        .and_then(|certs| peer_identity(&certs))
        .map(Arc::from)
}

/// [`caller_identity`], or `"unknown"`.
pub fn request_identity<T>(request: &tonic::Request<T>) -> String {
    caller_identity(request).map_or_else(|| "unknown".to_owned(), |identity| identity.to_string())
}
