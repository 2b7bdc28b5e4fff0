//! Where a party's certificate, key and trusted CA live, and reading them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What was expected or went wrong.
        what: String,
    },
    /// rustls refused the configuration (for example a key that does not
    /// match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The three files of one party: its certificate chain, its private key and
/// the CA certificate it trusts to authenticate the other side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate (chain) presented to the peer.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) trusted for the peer.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The conventional files `<dir>/<name>_cert.pem`, `<dir>/<name>_key.pem`
    /// and `<dir>/ca_cert.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}_cert.pem")),
            key: dir.join(format!("{name}_key.pem")),
            ca: dir.join("ca_cert.pem"),
        }
    }

    /// Whether a client dialling this party by `host` (a DNS name or an
    /// IP address) accepts its certificate for that name, as rustls judges
    /// it (wildcard names included).
    pub fn certificate_covers(&self, host: &str) -> Result<bool, TlsError> {
        let chain = Self::certificates(&self.cert)?;
        let unusable = |what: String| TlsError::Pem {
            path: self.cert.clone(),
            what,
        };
        let leaf = chain
            .first()
            .ok_or_else(|| unusable("no CERTIFICATE found".into()))?;
        let leaf = webpki::EndEntityCert::try_from(leaf)
            .map_err(|error| unusable(format!("unusable certificate: {error}")))?;
        Ok(ServerName::try_from(host)
            .is_ok_and(|name| leaf.verify_is_valid_for_subject_name(&name).is_ok()))
    }

    /// The names clients may dial this party by (see
    /// [`crate::dialling_names`]), read from its certificate.
    pub fn dialling_names(&self) -> Result<Vec<String>, TlsError> {
        Ok(crate::dialling_names(&Self::certificates(&self.cert)?))
    }

    pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        Self::certificates_in(&Self::read(path)?, path)
    }

    /// The certificates of `pem`, read from `path`.
    pub(crate) fn certificates_in(
        pem: &[u8],
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                path: path.to_path_buf(),
                what: error.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                path: path.to_path_buf(),
                what: "no CERTIFICATE found".into(),
            });
        }
        Ok(certs)
    }

    /// The CA certificates of `path` as a root store.
    pub(crate) fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in Self::certificates(path)? {
            roots.add(ca)?;
        }
        Ok(Arc::new(roots))
    }

    /// Every revocation list in the PEM file at `path`.
    pub(crate) fn crls(
        path: &Path,
    ) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
        let pem = Self::read(path)?;
        let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                path: path.to_path_buf(),
                what: error.to_string(),
            })?;
        // rustls checks nothing when given no list: a file that holds none
        // (empty, or a certificate named by mistake) would turn revocation
        // off while the operator believes it on.
        if crls.is_empty() {
            return Err(TlsError::Pem {
                path: path.to_path_buf(),
                what: "no X509 CRL found".into(),
            });
        }
        for crl in &crls {
            warn_if_stale(crl, path, std::time::SystemTime::now());
        }
        Ok(crls)
    }

    pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        Self::private_key_in(&Self::read(path)?, path)
    }

    /// The private key of `pem`, read from `path` (whose mode is checked).
    pub(crate) fn private_key_in(
        pem: &[u8],
        path: &Path,
    ) -> Result<PrivateKeyDer<'static>, TlsError> {
        securemesh_fs::warn_if_exposed(path, "private key");
        // The error of the PEM parser never contains key material.
        PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("no usable private key ({error})"),
        })
    }
}

/// Logs a warning when `crl` (read from `path`) is past its next update
/// at `now`. It is still checked: refusing it would refuse every client,
/// and the certificates it lists stay revoked; but its issuer has promised
/// a newer one by then, and other tools reading it may refuse it.
/// Returns whether it warned.
fn warn_if_stale(
    crl: &CertificateRevocationListDer<'_>,
    path: &Path,
    now: std::time::SystemTime,
) -> bool {
    use x509_parser::prelude::FromDer as _;
    use x509_parser::revocation_list::CertificateRevocationList;
    let Ok((_, parsed)) = CertificateRevocationList::from_der(crl.as_ref()) else {
        // rustls reports a list it cannot read when it builds the verifier.
        return false;
    };
    let Some(next_update) = parsed.next_update() else {
        return false;
    };
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    if next_update.timestamp() >= now {
        return false;
    }
    tracing::warn!(
        path = %path.display(),
        %next_update,
        "the revocation list is past its next update: still checked, but sign it again \
         (`securemesh pki refresh-crl`) and send SIGHUP"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `names` in a new directory, as `TlsFiles`.
    fn certificate_for(names: &[&str]) -> (tempfile::TempDir, TlsFiles) {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        let files = TlsFiles {
            cert,
            key: dir.path().join("key.pem"),
            ca: dir.path().join("ca.pem"),
        };
        (dir, files)
    }

    #[test]
    fn a_crl_past_its_next_update_is_still_read_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        securemesh_pki::init(&securemesh_pki::InitOptions::new(dir.path().to_owned())).unwrap();
        let crl = securemesh_pki::revoke(dir.path(), "client2").unwrap().crl;
        let read = TlsFiles::crls(&crl).unwrap();
        let now = std::time::SystemTime::now();
        assert!(!warn_if_stale(&read[0], &crl, now));
        // `pki revoke` signs for 30 days.
        let later = now + std::time::Duration::from_secs(31 * 24 * 3600);
        assert!(warn_if_stale(&read[0], &crl, later));
    }

    #[test]
    fn a_certificate_covers_its_names_wildcards_included_and_no_other() {
        let (_dir, files) = certificate_for(&["*.mesh.example", "server-1.local", "10.0.0.5"]);
        for covered in [
            "a.mesh.example",
            "B.MESH.EXAMPLE",
            "server-1.local",
            "10.0.0.5",
        ] {
            assert!(files.certificate_covers(covered).unwrap(), "{covered}");
        }
        for refused in [
            "mesh.example",
            "a.b.mesh.example",
            "server-2.local",
            "10.0.0.6",
            "not a name",
            "",
        ] {
            assert!(!files.certificate_covers(refused).unwrap(), "{refused}");
        }
    }
}
