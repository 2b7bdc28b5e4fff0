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
    build(
        &files.ca,
        Some((&files.cert, &files.key)),
        crl,
        Revocation::Required,
    )
}

/// TLS toward a server that is not part of the mesh and may hold a
/// certificate from another CA (etcd): verified against `ca`; refused if
/// the CRL at `crl` (our CA's) revokes its certificate, but not for being
/// absent from that CRL, which only speaks for our CA. `identity`
/// (certificate and key) is presented when the server asks for one.
pub fn foreign_server_tls(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    crl: Option<&Path>,
) -> Result<ClientTls, TlsError> {
    build(ca, identity, crl, Revocation::WhereKnown)
}

/// What a CRL means for a certificate it does not cover.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Revocation {
    /// Refused: the CRL is our CA's and so is every certificate checked.
    Required,
    /// Accepted: the certificate comes from another CA.
    WhereKnown,
}

fn build(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    crl: Option<&Path>,
    revocation: Revocation,
) -> Result<ClientTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut verifier =
        WebPkiServerVerifier::builder_with_provider(TlsFiles::roots(ca)?, provider.clone());
    if let Some(crl) = crl {
        verifier = verifier.with_crls(TlsFiles::crls(crl)?);
        if revocation == Revocation::WhereKnown {
            verifier = verifier.allow_unknown_revocation_status();
        }
    }
    let verifier = verifier.build().map_err(|error| TlsError::Pem {
        path: ca.to_owned(),
        what: format!("cannot verify servers with it: {error}"),
    })?;
    let rustls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let (mut rustls, identity) = match identity {
        Some((cert, key)) => {
            // Read once, for rustls and tonic alike: a renewal between two
            // reads could hand them different, mismatched files.
            let (cert_pem, key_pem) = (TlsFiles::read(cert)?, TlsFiles::read(key)?);
            (
                rustls.with_client_auth_cert(
                    TlsFiles::certificates_in(&cert_pem, cert)?,
                    TlsFiles::private_key_in(&key_pem, key)?,
                )?,
                ClientTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)),
            )
        }
        None => (rustls.with_no_client_auth(), ClientTlsConfig::new()),
    };
    rustls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ClientTls {
        identity,
        verifier,
        rustls: Arc::new(rustls),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    fn pki() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        securemesh_pki::init(&securemesh_pki::InitOptions {
            days: 1,
            ..securemesh_pki::InitOptions::new(dir.path().to_owned())
        })
        .unwrap();
        dir
    }

    fn server_certificate(pki: &tempfile::TempDir) -> CertificateDer<'static> {
        TlsFiles::certificates(&pki.path().join("server_cert.pem"))
            .unwrap()
            .remove(0)
    }

    fn verdict(tls: &ClientTls, certificate: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        tls.verifier
            .verify_server_cert(certificate, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn our_crl_refuses_what_it_revokes_and_says_nothing_of_another_ca() {
        let ours = pki();
        let theirs = pki();
        let crl = securemesh_pki::revoke(ours.path(), "server").unwrap().crl;
        let our_ca = ours.path().join("ca_cert.pem");
        let their_ca = theirs.path().join("ca_cert.pem");

        let toward_ours = foreign_server_tls(&our_ca, None, Some(&crl)).unwrap();
        assert!(
            matches!(
                verdict(&toward_ours, &server_certificate(&ours)),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked
                ))
            ),
            "a server certificate our CA revoked was accepted"
        );
        let without_crl = foreign_server_tls(&our_ca, None, None).unwrap();
        assert!(verdict(&without_crl, &server_certificate(&ours)).is_ok());

        // etcd with a certificate of its own CA: our CRL does not speak for it.
        let toward_theirs = foreign_server_tls(&their_ca, None, Some(&crl)).unwrap();
        assert!(verdict(&toward_theirs, &server_certificate(&theirs)).is_ok());
        // Nor does trusting their CA make our revoked certificate good.
        assert!(matches!(
            verdict(&toward_theirs, &server_certificate(&ours)),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ));

        // Inside the mesh every certificate is our CA's, and one the CRL
        // cannot vouch for is refused.
        let files = TlsFiles::in_dir(theirs.path(), "coordinator");
        let mesh = client_tls(&files, Some(&crl)).unwrap();
        assert_eq!(
            verdict(&mesh, &server_certificate(&theirs)),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownRevocationStatus
            ))
        );
    }

    #[test]
    fn a_crl_file_without_a_crl_is_refused_rather_than_ignored() {
        let ours = pki();
        let files = TlsFiles::in_dir(ours.path(), "coordinator");
        let empty = ours.path().join("empty_crl.pem");
        std::fs::write(&empty, "").unwrap();
        // A certificate named instead of the CRL.
        let not_a_crl = ours.path().join("ca_cert.pem");
        for wrong in [&empty, &not_a_crl] {
            for tls in [
                client_tls(&files, Some(wrong)).map(drop),
                foreign_server_tls(&files.ca, None, Some(wrong)).map(drop),
                crate::server_config(&TlsFiles::in_dir(ours.path(), "server"), Some(wrong))
                    .map(drop),
            ] {
                let error = tls.unwrap_err().to_string();
                assert!(error.contains("no X509 CRL found"), "{wrong:?}: {error}");
            }
        }
    }
}
