//! The PKI on disk: `pki init` and `pki issue` as library calls.
//!
//! All files of one PKI live in one directory. Before anything is written,
//! every target is checked, so a run refused by that check leaves the
//! directory untouched.

use std::path::{Path, PathBuf};

use securemesh_fs::{refuse_existing, write_files, FileToWrite, WriteError, PRIVATE, PUBLIC};

use crate::authority::{validate_name, Authority, Role};
use crate::lifecycle::CRL_FILE;

/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca_cert.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca_key.pem";

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Writing failed, or a target exists and `force` was not given.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A file is not what it should be (PEM certificate, CRL).
    #[error("{path}: {what}")]
    Unreadable {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Read {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// rcgen refused the parameters or the input.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate name outside `[A-Za-z0-9._-]`, or too long.
    #[error("invalid certificate name {0:?}: use letters, digits, '.', '-' or '_' (at most 64)")]
    InvalidName(String),
    /// A SAN that is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// Zero days of validity.
    #[error("validity must be at least one day")]
    InvalidValidity,
    /// The CA's certificate and key are not a CA's pair.
    #[error("the CA certificate and key cannot sign: {0}")]
    InvalidCa(String),
    /// The CA has expired: nothing it signs would be accepted.
    #[error("the CA certificate has expired: make a new PKI with pki init --force")]
    CaExpired,
    /// Removing a file failed.
    #[error("{path}: {source}")]
    Remove {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Options of [`init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Directory to write into (created if missing).
    pub dir: PathBuf,
    /// Validity of every leaf certificate, in days (the CA's: see
    /// [`ca_days`]).
    pub days: u32,
    /// Extra client names, each written as `NAME_cert.pem` / `NAME_key.pem`.
    pub extra_clients: Vec<String>,
    /// Extra SANs for the server and coordinator certificates.
    pub sans: Vec<String>,
    /// Overwrite existing files.
    pub force: bool,
}

impl InitOptions {
    /// A PKI in `dir` valid for a year, with the standard certificates only
    /// and without overwriting anything.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            days: 365,
            extra_clients: Vec::new(),
            sans: Vec::new(),
            force: false,
        }
    }
}

/// Options of [`issue`].
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Directory holding the CA; the new files go there too.
    pub dir: PathBuf,
    /// Name of the new certificate (`NAME_cert.pem`, `NAME_key.pem`).
    pub name: String,
    /// What it may be used for.
    pub role: Role,
    /// Extra SANs (server-capable roles also get the loopback names).
    pub sans: Vec<String>,
    /// Validity in days.
    pub days: u32,
    /// Overwrite existing files.
    pub force: bool,
}

/// Creates a CA and the standard set of leaves: `server`, `coordinator`
/// (server and client), `client`, `client2` and each extra client. Returns
/// the paths written.
pub fn init(options: &InitOptions) -> Result<Vec<PathBuf>, PkiError> {
    let mut leaves: Vec<(String, Role)> = vec![
        ("server".into(), Role::Server),
        ("coordinator".into(), Role::Both),
        ("client".into(), Role::Client),
        ("client2".into(), Role::Client),
    ];
    for name in &options.extra_clients {
        if !leaves.iter().any(|(existing, _)| existing == name) {
            leaves.push((name.clone(), Role::Client));
        }
    }

    // A CRL left from another CA would make peers refuse every
    // certificate of this one (none of them can be checked against it).
    let old_crl = options.dir.join(CRL_FILE);
    let mut targets = vec![
        options.dir.join(CA_CERT_FILE),
        options.dir.join(CA_KEY_FILE),
        old_crl.clone(),
    ];
    for (name, _) in &leaves {
        targets.extend(leaf_paths(&options.dir, name));
    }
    // A revocation under way must not write the old CA's CRL back after
    // it is removed below.
    let _lock = securemesh_fs::lock_dir(&options.dir)?;
    refuse_existing(targets.iter().map(PathBuf::as_path), options.force)?;

    let authority = Authority::generate(ca_days(options.days))?;
    let mut files = vec![
        (options.dir.join(CA_KEY_FILE), authority.key_pem()),
        (
            options.dir.join(CA_CERT_FILE),
            authority.cert_pem().to_owned(),
        ),
    ];
    for (name, role) in &leaves {
        let sans = if role == &Role::Client {
            &[][..]
        } else {
            &options.sans[..]
        };
        let issued = authority.issue(name, *role, sans, options.days)?;
        let [cert_path, key_path] = leaf_paths(&options.dir, name);
        files.push((cert_path, issued.cert_pem));
        files.push((key_path, issued.key_pem));
    }
    let written = write_all(files, options.force)?;
    // Only now: a crash before leaves the old CA with its revocations.
    match std::fs::remove_file(&old_crl) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(PkiError::Remove {
            path: old_crl,
            source: error,
        }),
        _ => Ok(written),
    }
}

/// How long `init` makes the CA last when leaves last `days`: ten years,
/// or twice `days` if longer, so that leaves can be renewed for their full
/// term long before the CA runs out (no leaf outlives its CA).
pub fn ca_days(days: u32) -> u32 {
    days.saturating_mul(2).max(3650)
}

/// Issues one more certificate from the CA in `options.dir`. Returns the
/// paths written.
///
/// A certificate of this CA that a forced issue replaces is kept, with its
/// key, under `<dir>/retired/` as [`crate::renew`] keeps one: it stays
/// valid until it expires, and revoking it needs its file.
pub fn issue(options: &IssueOptions) -> Result<Vec<PathBuf>, PkiError> {
    // The name is checked before a path made of it is looked at.
    validate_name(&options.name)?;
    let targets = leaf_paths(&options.dir, &options.name);
    let _lock = securemesh_fs::lock_dir(&options.dir)?;
    refuse_existing(targets.iter().map(PathBuf::as_path), options.force)?;
    let authority = crate::lifecycle::this_ca(&options.dir)?;
    let issued = authority.issue(&options.name, options.role, &options.sans, options.days)?;
    let [cert_path, key_path] = targets;
    let mut written = Vec::new();
    if let Some((current, pem)) = crate::lifecycle::issued_by(&authority, &cert_path)? {
        written.push(crate::lifecycle::retire(
            &options.dir,
            &options.name,
            &current,
            &pem,
        )?);
    }
    written.extend(write_all(
        vec![(cert_path, issued.cert_pem), (key_path, issued.key_pem)],
        options.force,
    )?);
    Ok(written)
}

/// `<dir>/<name>_cert.pem` and `<dir>/<name>_key.pem`.
pub(crate) fn leaf_paths(dir: &Path, name: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{name}_cert.pem")),
        dir.join(format!("{name}_key.pem")),
    ]
}

pub(crate) fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `files` as one set (see [`write_files`]), keys private and the
/// rest public, and returns their paths.
pub(crate) fn write_all(
    files: Vec<(PathBuf, String)>,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let set: Vec<FileToWrite<'_>> = files
        .iter()
        .map(|(path, contents)| {
            let private = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with("_key.pem"));
            FileToWrite {
                path,
                contents: contents.as_bytes(),
                mode: if private { PRIVATE } else { PUBLIC },
            }
        })
        .collect();
    write_files(&set, force)?;
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;

    fn init_in(dir: &Path) -> Vec<PathBuf> {
        init(&InitOptions {
            dir: dir.to_path_buf(),
            days: 30,
            extra_clients: vec!["alice".into()],
            sans: vec!["mesh.example".into()],
            force: false,
        })
        .unwrap()
    }

    fn parse(path: &Path) -> (Vec<u8>, String) {
        let pem = std::fs::read_to_string(path).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        (der.contents, pem)
    }

    fn sans(der: &[u8]) -> Vec<String> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let ext = cert.subject_alternative_name().unwrap().unwrap();
        ext.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => format!("DNS:{dns}"),
                GeneralName::URI(uri) => format!("URI:{uri}"),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).unwrap())
                    ),
                    _ => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).unwrap())
                    ),
                },
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn ekus(der: &[u8]) -> (bool, bool) {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        (eku.server_auth, eku.client_auth)
    }

    #[test]
    fn init_writes_the_full_set_with_roles_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let written = init_in(dir.path());
        assert_eq!(written.len(), 12);

        let (ca, _) = parse(&dir.path().join(CA_CERT_FILE));
        let (_, ca_cert) = X509Certificate::from_der(&ca).unwrap();
        assert!(ca_cert.is_ca());
        assert!(ca_cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert!(ca_cert.extended_key_usage().unwrap().is_none());

        let (server, _) = parse(&dir.path().join("server_cert.pem"));
        assert_eq!(ekus(&server), (true, false));
        let names = sans(&server);
        assert!(names.contains(&"DNS:localhost".to_string()), "{names:?}");
        assert!(names.contains(&"DNS:mesh.example".to_string()), "{names:?}");
        assert!(names.contains(&"URI:spiffe://securemesh/server/server".to_string()));
        assert!(names.contains(&"IP:127.0.0.1".to_string()), "{names:?}");
        assert!(names.contains(&"IP:::1".to_string()), "{names:?}");

        let (coordinator, _) = parse(&dir.path().join("coordinator_cert.pem"));
        assert_eq!(ekus(&coordinator), (true, true));

        let (alice, _) = parse(&dir.path().join("alice_cert.pem"));
        assert_eq!(ekus(&alice), (false, true));
        assert_eq!(sans(&alice), vec!["URI:spiffe://securemesh/client/alice"]);
    }

    #[test]
    fn a_crl_of_the_old_ca_is_refused_or_removed_never_kept_with_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        crate::revoke(dir.path(), "client2").unwrap();
        let crl = dir.path().join(CRL_FILE);
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let path = file.unwrap().path();
            if path != crl && path.is_file() {
                std::fs::remove_file(path).unwrap();
            }
        }
        let refused = init(&InitOptions::new(dir.path())).unwrap_err();
        assert!(refused.to_string().contains(CRL_FILE), "{refused}");
        init(&InitOptions {
            force: true,
            ..InitOptions::new(dir.path())
        })
        .unwrap();
        assert!(!crl.exists());
    }

    #[test]
    fn the_ca_outlives_its_leaves() {
        assert_eq!(ca_days(365), 3650);
        assert_eq!(ca_days(5000), 10_000);
        assert!(init(&InitOptions {
            days: u32::MAX,
            ..InitOptions::new(tempfile::tempdir().unwrap().path())
        })
        .is_err_and(|error| matches!(error, PkiError::InvalidValidity)));
    }

    #[test]
    fn serials_are_random_and_validity_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        let (client, _) = parse(&dir.path().join("client_cert.pem"));
        let (client2, _) = parse(&dir.path().join("client2_cert.pem"));
        let (_, a) = X509Certificate::from_der(&client).unwrap();
        let (_, b) = X509Certificate::from_der(&client2).unwrap();
        assert_ne!(a.raw_serial(), b.raw_serial());
        assert!(a.raw_serial().len() >= 16);
        let lifetime = a.validity().not_after.timestamp() - a.validity().not_before.timestamp();
        assert_eq!(lifetime, 30 * 86_400 + 3_600);
        assert!(a.subject().to_string().contains("CN=client"));
    }

    #[test]
    fn keys_are_private_and_existing_files_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                std::fs::metadata(dir.path().join(name))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode("ca_key.pem"), 0o600);
            assert_eq!(mode("client_key.pem"), 0o600);
            assert_eq!(mode("ca_cert.pem"), 0o644);
        }
        let before = std::fs::read(dir.path().join("ca_key.pem")).unwrap();
        let refused = init(&InitOptions::new(dir.path())).unwrap_err();
        assert!(refused.to_string().contains("ca_cert.pem"), "{refused}");
        assert_eq!(
            std::fs::read(dir.path().join("ca_key.pem")).unwrap(),
            before
        );
    }

    #[test]
    fn a_forced_issue_keeps_the_certificate_it_replaces_so_it_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        let old_cert = read(&dir.path().join("client_cert.pem")).unwrap();
        let old_key = read(&dir.path().join("client_key.pem")).unwrap();
        let options = IssueOptions {
            dir: dir.path().to_path_buf(),
            name: "client".into(),
            role: Role::Client,
            sans: vec![],
            days: 10,
            force: true,
        };
        let written = issue(&options).unwrap();
        assert_eq!(written.len(), 3, "{written:?}");
        assert!(written[0].starts_with(dir.path().join("retired")));
        assert_eq!(read(&written[0]).unwrap(), old_cert);
        let kept_key = written[0]
            .to_string_lossy()
            .replace("_cert.pem", "_key.pem");
        assert_eq!(read(Path::new(&kept_key)).unwrap(), old_key);
        assert_ne!(read(&dir.path().join("client_cert.pem")).unwrap(), old_cert);
        let revoked = crate::revoke(dir.path(), written[0].to_str().unwrap()).unwrap();
        assert!(revoked.newly_revoked);
        // A file at the name that this CA did not issue is not kept.
        std::fs::write(dir.path().join("client_cert.pem"), "not a certificate").unwrap();
        assert_eq!(issue(&options).unwrap().len(), 2);
    }

    #[test]
    fn issue_signs_with_the_existing_ca_and_refuses_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        let written = issue(&IssueOptions {
            dir: dir.path().to_path_buf(),
            name: "server3".into(),
            role: Role::Server,
            sans: vec!["10.0.0.3".into()],
            days: 10,
            force: false,
        })
        .unwrap();
        assert_eq!(written.len(), 2);
        let (ca, _) = parse(&dir.path().join(CA_CERT_FILE));
        let (_, ca_cert) = X509Certificate::from_der(&ca).unwrap();
        let (leaf, _) = parse(&dir.path().join("server3_cert.pem"));
        let (_, leaf_cert) = X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(leaf_cert.issuer(), ca_cert.subject());
        leaf_cert
            .verify_signature(Some(ca_cert.public_key()))
            .unwrap();
        assert!(sans(&leaf).contains(&"IP:10.0.0.3".to_string()));

        for bad in ["../escape", "", "a b", ".hidden"] {
            let refused = issue(&IssueOptions {
                dir: dir.path().to_path_buf(),
                name: bad.into(),
                role: Role::Client,
                sans: vec![],
                days: 10,
                force: false,
            });
            assert!(matches!(refused, Err(PkiError::InvalidName(_))), "{bad:?}");
        }
    }
}
