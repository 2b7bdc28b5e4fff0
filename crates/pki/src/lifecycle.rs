//! After issuing: revoking a certificate (the CA's CRL), renewing one, and
//! showing what a certificate says.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::authority::{validate_name, Authority, Role};
use crate::files::{leaf_paths, read, write_all, CA_CERT_FILE, CA_KEY_FILE};
use crate::PkiError;

/// File name of the CA's certificate revocation list.
pub const CRL_FILE: &str = "ca_crl.pem";

/// How long a CRL is declared valid. Servers do not refuse a CRL past its
/// next update (that would lock every client out) but warn when they load
/// one; `pki refresh-crl` signs it again.
const CRL_VALIDITY_DAYS: i64 = 30;

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The CRL written.
    pub crl: PathBuf,
    /// `false` when the certificate was revoked already (the CRL was
    /// signed again, with a fresh validity).
    pub newly_revoked: bool,
}

/// Adds a certificate of this CA to its CRL (`<dir>/ca_crl.pem`), keeping
/// the certificates revoked before. `certificate` is a name
/// (`<dir>/<name>_cert.pem`; preferred when that file exists) or the path
/// of a PEM file, such as one that `renew` archived under
/// `<dir>/retired/`. Holds the directory's lock (see
/// [`securemesh_fs::lock_dir`]) while it reads and writes the CRL, so that
/// two revocations at once both land.
pub fn revoke(dir: &Path, certificate: &str) -> Result<Revocation, PkiError> {
    let by_name = dir.join(format!("{certificate}_cert.pem"));
    let cert_path = if validate_name(certificate).is_ok() && by_name.exists() {
        by_name
    } else if certificate.ends_with(".pem") {
        PathBuf::from(certificate)
    } else {
        validate_name(certificate)?;
        by_name
    };
    let parsed = parse_certificate(&read(&cert_path)?, &cert_path)?;
    if parsed.is_ca {
        return Err(unreadable(&cert_path, "is a CA certificate, not a leaf"));
    }
    let _lock = securemesh_fs::lock_dir(dir)?;
    let authority = issuing_authority(dir, &parsed, &cert_path)?;
    let serial = parsed.serial;
    let crl_path = dir.join(CRL_FILE);
    let (mut revoked, number) = if crl_path.exists() {
        existing_crl(&read(&crl_path)?, &crl_path)?
    } else {
        (Vec::new(), 0)
    };
    let now = OffsetDateTime::now_utc();
    let newly_revoked = !revoked
        .iter()
        .any(|entry: &RevokedCertParams| entry.serial_number.to_bytes() == serial);
    if newly_revoked {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    sign_crl(&crl_path, &authority, revoked, number, now)?;
    Ok(Revocation {
        crl: crl_path,
        newly_revoked,
    })
}

/// Signs the CA's CRL (`<dir>/ca_crl.pem`) again with the same entries, the
/// next number and a fresh validity, for a CRL nearing or past its next
/// update (servers still check such a list, and warn; other tools may
/// refuse it). Holds the directory's lock, as [`revoke`] does. Returns the
/// path written and when the new list's validity ends.
pub fn refresh_crl(dir: &Path) -> Result<(PathBuf, OffsetDateTime), PkiError> {
    let crl_path = dir.join(CRL_FILE);
    if !crl_path.exists() {
        return Err(unreadable(
            &crl_path,
            "does not exist: nothing has been revoked (`pki revoke` writes it)",
        ));
    }
    let _lock = securemesh_fs::lock_dir(dir)?;
    let authority = this_ca(dir)?;
    let (revoked, number) = existing_crl(&read(&crl_path)?, &crl_path)?;
    let now = OffsetDateTime::now_utc();
    let next_update = sign_crl(&crl_path, &authority, revoked, number, now)?;
    Ok((crl_path, next_update))
}

/// Writes `revoked` to `crl_path` as a CRL signed by `authority`, numbered
/// one past `number` (CRL numbers only grow), valid from `now` for
/// [`CRL_VALIDITY_DAYS`]. Returns its next update.
fn sign_crl(
    crl_path: &Path,
    authority: &Authority,
    revoked: Vec<RevokedCertParams>,
    number: u64,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, PkiError> {
    let number = number
        .checked_add(1)
        .ok_or_else(|| unreadable(crl_path, "has the last CRL number there is"))?;
    let next_update = now + Duration::days(CRL_VALIDITY_DAYS);
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update,
        crl_number: SerialNumber::from(number.to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(authority.issuer())?;
    securemesh_fs::write_file(crl_path, crl.pem()?.as_bytes(), securemesh_fs::PUBLIC, true)?;
    Ok(next_update)
}

/// Issues `<dir>/<name>` again from the CA: same role and names, a new key,
/// a new serial and a fresh validity of `days` (within the CA's). Only a
/// certificate this CA issued is renewed. The old certificate stays valid
/// until it expires or is revoked; it is kept, with its key, as
/// `<dir>/retired/<name>_<serial>_cert.pem` (and `..._key.pem`) so that
/// `revoke` can name it and a crash between writing the new key and the
/// new certificate loses nothing. Returns the paths written, the archived
/// certificate first.
pub fn renew(dir: &Path, name: &str, days: u32) -> Result<Vec<PathBuf>, PkiError> {
    if name == "ca" {
        return Err(unreadable(
            &dir.join(CA_CERT_FILE),
            "is the CA certificate: it is not renewed this way",
        ));
    }
    validate_name(name)?;
    let _lock = securemesh_fs::lock_dir(dir)?;
    let [cert_path, key_path] = leaf_paths(dir, name);
    let current_pem = read(&cert_path)?;
    let current = parse_certificate(&current_pem, &cert_path)?;
    if current.is_ca {
        return Err(unreadable(
            &cert_path,
            "is a CA certificate: it is not renewed this way",
        ));
    }
    let authority = issuing_authority(dir, &current, &cert_path)?;
    let archived = retire(dir, name, &current, &current_pem)?;
    let issued = authority.issue(name, current.role, &current.host_names, days)?;
    write_all(
        vec![
            (key_path.clone(), issued.key_pem),
            (cert_path.clone(), issued.cert_pem),
        ],
        true,
    )?;
    Ok(vec![archived, cert_path, key_path])
}

/// A readable account of a PEM certificate (subject, names, usages,
/// issuer, validity, serial and SHA-256 fingerprint) or of a CRL (issuer,
/// number, validity and the serials it revokes).
pub fn show(path: &Path) -> Result<String, PkiError> {
    let pem = read(path)?;
    if let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) {
        if block.label == "X509 CRL" {
            return show_crl(&block.contents, path);
        }
    }
    let certificate = parse_certificate(&pem, path)?;
    let mut out = String::new();
    let _ = writeln!(out, "Subject:     {}", certificate.subject);
    let _ = writeln!(out, "Issuer:      {}", certificate.issuer);
    let _ = writeln!(out, "Serial:      {}", hex(&certificate.serial));
    let _ = writeln!(out, "Not before:  {}", certificate.not_before);
    let _ = writeln!(out, "Not after:   {}", certificate.not_after);
    let _ = writeln!(out, "CA:          {}", certificate.is_ca);
    let _ = writeln!(out, "Key usage:   {}", certificate.key_usage);
    let _ = writeln!(out, "Ext. usage:  {}", certificate.extended_key_usage);
    let _ = writeln!(out, "Names (SAN): {}", certificate.names.join(", "));
    let _ = writeln!(out, "SHA-256:     {}", hex(&certificate.fingerprint));
    Ok(out)
}

/// `bytes` as colon-separated upper-case hex, as `openssl x509` shows
/// serials and fingerprints.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The account [`show`] gives of a CRL (`der`, read from `path`).
fn show_crl(der: &[u8], path: &Path) -> Result<String, PkiError> {
    let (_, crl) =
        CertificateRevocationList::from_der(der).map_err(|_| unreadable(path, "not a CRL"))?;
    let mut out = String::new();
    let number = crl
        .crl_number()
        .map_or_else(|| "none".to_owned(), |number| number.to_string());
    let _ = writeln!(out, "CRL of:      {}", crl.issuer());
    let _ = writeln!(out, "Number:      {number}");
    let _ = writeln!(out, "This update: {}", crl.last_update());
    match crl.next_update() {
        Some(next) if next.to_datetime() < OffsetDateTime::now_utc() => {
            let _ = writeln!(
                out,
                "Next update: {next} (past: sign it again with `securemesh pki refresh-crl`)"
            );
        }
        Some(next) => {
            let _ = writeln!(out, "Next update: {next}");
        }
        None => {
            let _ = writeln!(out, "Next update: none");
        }
    }
    let revoked: Vec<_> = crl.iter_revoked_certificates().collect();
    let _ = writeln!(out, "Revoked:     {}", revoked.len());
    for entry in revoked {
        let _ = writeln!(
            out,
            "  {}  since {}",
            hex(entry.raw_serial()),
            entry.revocation_date
        );
    }
    Ok(out)
}

/// What a certificate says, as far as securemesh cares.
pub(crate) struct Parsed {
    subject: String,
    issuer: String,
    serial: Vec<u8>,
    not_before: String,
    not_after: String,
    is_ca: bool,
    key_usage: String,
    extended_key_usage: String,
    role: Role,
    names: Vec<String>,
    /// DNS names and IP addresses, beyond the loopback names every server
    /// certificate carries.
    host_names: Vec<String>,
    fingerprint: Vec<u8>,
    /// The certificate itself, DER.
    der: Vec<u8>,
}

/// The CA of `dir`, once it is known to have signed `certificate` (read
/// from `path`).
fn issuing_authority(dir: &Path, certificate: &Parsed, path: &Path) -> Result<Authority, PkiError> {
    let authority = this_ca(dir)?;
    if !authority.signed(&certificate.der) {
        return Err(unreadable(path, "was not issued by this CA"));
    }
    Ok(authority)
}

/// The CA of `dir`, with its key (a warning if others may read the key).
pub(crate) fn this_ca(dir: &Path) -> Result<Authority, PkiError> {
    let key_path = dir.join(CA_KEY_FILE);
    let key = read(&key_path)?;
    securemesh_fs::warn_if_exposed(&key_path, "CA private key");
    Authority::from_pem(&read(&dir.join(CA_CERT_FILE))?, &key)
}

/// Keeps `name`'s certificate `current` (its text `pem`), and its key if
/// there is one, as `<dir>/retired/<name>_<serial>_cert.pem` and
/// `..._key.pem`, before they are replaced: the certificate stays valid
/// until it expires or is revoked, and `revoke` needs it to name it.
/// Returns the archived certificate's path.
pub(crate) fn retire(
    dir: &Path,
    name: &str,
    current: &Parsed,
    pem: &str,
) -> Result<PathBuf, PkiError> {
    let [_, key_path] = leaf_paths(dir, name);
    let serial: String = current
        .serial
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let retired = dir.join("retired");
    let archived = retired.join(format!("{name}_{serial}_cert.pem"));
    let mut kept = vec![(archived.clone(), pem.to_owned())];
    // A key that is not there is not kept; one that cannot be read stops
    // the replacement rather than be written over unkept.
    match std::fs::read_to_string(&key_path) {
        Ok(current_key) => kept.push((
            retired.join(format!("{name}_{serial}_key.pem")),
            current_key,
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Read {
                path: key_path,
                source,
            })
        }
    }
    write_all(kept, true)?;
    Ok(archived)
}

/// The certificate at `path`, if there is one there that `authority`
/// issued: what a forced `issue` replaces, to be kept with [`retire`].
pub(crate) fn issued_by(
    authority: &Authority,
    path: &Path,
) -> Result<Option<(Parsed, String)>, PkiError> {
    let pem = match std::fs::read_to_string(path) {
        Ok(pem) => pem,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PkiError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let Ok(parsed) = parse_certificate(&pem, path) else {
        return Ok(None);
    };
    Ok(authority.signed(&parsed.der).then_some((parsed, pem)))
}

fn unreadable(path: &Path, what: &str) -> PkiError {
    PkiError::Unreadable {
        path: path.to_path_buf(),
        what: what.to_owned(),
    }
}

fn parse_certificate(pem: &str, path: &Path) -> Result<Parsed, PkiError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| unreadable(path, "not a PEM file"))?;
    let (_, certificate) = X509Certificate::from_der(&block.contents)
        .map_err(|_| unreadable(path, "not an X.509 certificate"))?;
    let (server_auth, client_auth) = certificate
        .extended_key_usage()
        .ok()
        .flatten()
        .map(|eku| (eku.value.server_auth, eku.value.client_auth))
        .unwrap_or((false, false));
    let role = match (server_auth, client_auth) {
        (true, true) => Role::Both,
        (true, false) => Role::Server,
        _ => Role::Client,
    };
    let mut names = Vec::new();
    let mut host_names = Vec::new();
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    names.push(format!("DNS:{dns}"));
                    host_names.push(dns.to_string());
                }
                GeneralName::URI(uri) => names.push(format!("URI:{uri}")),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).map(std::net::IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .map(std::net::IpAddr::from)
                            .ok(),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.push(format!("IP:{ip}"));
                        host_names.push(ip.to_string());
                    }
                }
                other => names.push(format!("{other:?}")),
            }
        }
    }
    host_names.retain(|host| !["localhost", "127.0.0.1", "::1"].contains(&host.as_str()));
    let key_usage = certificate
        .key_usage()
        .ok()
        .flatten()
        .map(|usage| usage.value.to_string())
        .unwrap_or_else(|| "none".into());
    let extended_key_usage = match (server_auth, client_auth) {
        (true, true) => "serverAuth, clientAuth",
        (true, false) => "serverAuth",
        (false, true) => "clientAuth",
        (false, false) => "none",
    }
    .to_owned();
    Ok(Parsed {
        subject: certificate.subject().to_string(),
        issuer: certificate.issuer().to_string(),
        serial: certificate.raw_serial().to_vec(),
        not_before: certificate.validity().not_before.to_string(),
        not_after: certificate.validity().not_after.to_string(),
        is_ca: certificate.is_ca(),
        key_usage,
        extended_key_usage,
        role,
        names,
        host_names,
        fingerprint: Sha256::digest(&block.contents).to_vec(),
        der: block.contents.clone(),
    })
}

/// The revoked entries and number of an existing CRL.
fn existing_crl(pem: &str, path: &Path) -> Result<(Vec<RevokedCertParams>, u64), PkiError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| unreadable(path, "not a PEM file"))?;
    let (_, crl) = CertificateRevocationList::from_der(&block.contents)
        .map_err(|_| unreadable(path, "not a CRL"))?;
    let number = match crl.crl_number() {
        None => 0,
        Some(number) => u64::try_from(number)
            .map_err(|_| unreadable(path, "has a CRL number beyond what this tool counts"))?,
    };
    let revoked = crl
        .iter_revoked_certificates()
        .map(|entry| RevokedCertParams {
            serial_number: SerialNumber::from_slice(entry.raw_serial()),
            revocation_time: entry.revocation_date.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    Ok((revoked, number))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::init(&crate::InitOptions {
            dir: dir.path().to_path_buf(),
            days: 30,
            extra_clients: vec![],
            sans: vec!["mesh.test".into()],
            force: false,
        })
        .unwrap();
        dir
    }

    fn revoked_serials(dir: &Path) -> (Vec<Vec<u8>>, u64) {
        let (entries, number) = existing_crl(&read(&dir.join(CRL_FILE)).unwrap(), dir).unwrap();
        (
            entries.iter().map(|e| e.serial_number.to_bytes()).collect(),
            number,
        )
    }

    #[test]
    fn revocations_accumulate_in_a_numbered_crl() {
        let dir = pki();
        let serial = |name: &str| {
            let path = dir.path().join(format!("{name}_cert.pem"));
            parse_certificate(&read(&path).unwrap(), &path)
                .unwrap()
                .serial
        };
        revoke(dir.path(), "client2").unwrap();
        assert_eq!(revoked_serials(dir.path()), (vec![serial("client2")], 1));
        assert!(revoke(dir.path(), "client").unwrap().newly_revoked);
        assert!(!revoke(dir.path(), "client").unwrap().newly_revoked);
        let (serials, number) = revoked_serials(dir.path());
        assert_eq!(number, 3);
        assert_eq!(serials.len(), 2);
        assert!(serials.contains(&serial("client")));
        assert!(revoke(dir.path(), "nobody").is_err());
    }

    #[test]
    fn renewal_keeps_role_and_names_with_a_new_key_and_serial() {
        let dir = pki();
        let path = dir.path().join("server_cert.pem");
        let before = parse_certificate(&read(&path).unwrap(), &path).unwrap();
        let old_key = read(&dir.path().join("server_key.pem")).unwrap();
        renew(dir.path(), "server", 10).unwrap();
        let after = parse_certificate(&read(&path).unwrap(), &path).unwrap();
        assert_ne!(after.serial, before.serial);
        assert_ne!(read(&dir.path().join("server_key.pem")).unwrap(), old_key);
        assert_eq!(after.role, Role::Server);
        // The old certificate was archived with its key, and can still be
        // revoked.
        let mut retired: Vec<_> = std::fs::read_dir(dir.path().join("retired"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        retired.sort();
        assert_eq!(retired.len(), 2, "{retired:?}");
        assert!(retired[0].to_string_lossy().ends_with("_cert.pem"));
        assert_eq!(read(&retired[1]).unwrap(), old_key);
        assert_eq!(securemesh_fs_mode(&retired[1]), 0o600);
        revoke(dir.path(), retired[0].to_str().unwrap()).unwrap();
        assert_eq!(revoked_serials(dir.path()).0, vec![before.serial.clone()]);
        assert_eq!(after.names, before.names);
        assert!(after.names.contains(&"DNS:mesh.test".to_string()));
    }

    #[test]
    fn a_crl_at_the_last_number_is_refused_not_wrapped() {
        let dir = pki();
        let path = dir.path().join("ca_cert.pem");
        let ca = parse_certificate(&read(&path).unwrap(), &path).unwrap();
        let authority = issuing_authority(dir.path(), &ca, &path).unwrap();
        let now = OffsetDateTime::now_utc();
        let last = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(u64::MAX.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(authority.issuer())
        .unwrap();
        std::fs::write(dir.path().join(CRL_FILE), last.pem().unwrap()).unwrap();
        let refused = revoke(dir.path(), "client2").unwrap_err();
        assert!(matches!(refused, PkiError::Unreadable { .. }), "{refused}");
    }

    #[test]
    fn a_stale_crl_is_shown_as_such_and_signed_again_with_its_entries() {
        let dir = pki();
        let refused = refresh_crl(dir.path()).unwrap_err();
        assert!(
            refused.to_string().contains("nothing has been revoked"),
            "{refused}"
        );
        assert!(!dir.path().join(CRL_FILE).exists());

        revoke(dir.path(), "client2").unwrap();
        let (entries, number) =
            existing_crl(&read(&dir.path().join(CRL_FILE)).unwrap(), dir.path()).unwrap();
        // The same list, as if signed 40 days ago: past its next update.
        let path = dir.path().join("ca_cert.pem");
        let ca = parse_certificate(&read(&path).unwrap(), &path).unwrap();
        let authority = issuing_authority(dir.path(), &ca, &path).unwrap();
        let signed_at = OffsetDateTime::now_utc() - Duration::days(40);
        sign_crl(
            &dir.path().join(CRL_FILE),
            &authority,
            entries,
            number,
            signed_at,
        )
        .unwrap();
        let stale = show(&dir.path().join(CRL_FILE)).unwrap();
        assert!(stale.contains("past: sign it again"), "{stale}");
        assert!(stale.contains("Number:      2"), "{stale}");
        assert!(stale.contains("Revoked:     1"), "{stale}");

        let (written, next_update) = refresh_crl(dir.path()).unwrap();
        assert_eq!(written, dir.path().join(CRL_FILE));
        assert!(next_update > OffsetDateTime::now_utc() + Duration::days(29));
        let client2 = dir.path().join("client2_cert.pem");
        let serial = parse_certificate(&read(&client2).unwrap(), &client2)
            .unwrap()
            .serial;
        assert_eq!(revoked_serials(dir.path()), (vec![serial.clone()], 3));
        let fresh = show(&written).unwrap();
        assert!(!fresh.contains("past"), "{fresh}");
        assert!(fresh.contains(&hex(&serial)), "{fresh}");
        assert!(fresh.contains("CN=securemesh CA"), "{fresh}");
    }

    #[test]
    fn a_key_that_cannot_be_read_stops_its_renewal() {
        let dir = pki();
        let key = dir.path().join("server_key.pem");
        let cert = dir.path().join("server_cert.pem");
        let before = read(&cert).unwrap();
        std::fs::remove_file(&key).unwrap();
        std::fs::create_dir(&key).unwrap();
        assert!(matches!(
            renew(dir.path(), "server", 10),
            Err(PkiError::Read { .. })
        ));
        assert_eq!(read(&cert).unwrap(), before);
        assert!(key.is_dir());
    }

    fn securemesh_fs_mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn only_certificates_of_this_ca_are_revoked_or_renewed() {
        let dir = pki();
        let other = pki();
        let foreign = other.path().join("client_cert.pem");
        let refused = revoke(dir.path(), foreign.to_str().unwrap()).unwrap_err();
        assert!(
            refused.to_string().contains("not issued by this CA"),
            "{refused}"
        );
        assert!(!dir.path().join(CRL_FILE).exists());
        // A foreign certificate dropped in under a name of ours is not
        // signed again with its names.
        std::fs::copy(&foreign, dir.path().join("planted_cert.pem")).unwrap();
        let refused = renew(dir.path(), "planted", 30).unwrap_err();
        assert!(
            refused.to_string().contains("not issued by this CA"),
            "{refused}"
        );
        // Names that leave the directory are refused before anything is
        // read or written.
        for name in ["../client", "a/b"] {
            assert!(matches!(
                renew(dir.path(), name, 30),
                Err(PkiError::InvalidName(_))
            ));
        }
        assert!(!dir.path().join("retired").exists());
    }

    #[test]
    fn a_name_in_the_directory_wins_over_a_file_of_the_same_name() {
        let dir = pki();
        std::fs::copy(
            dir.path().join("client_cert.pem"),
            dir.path().join("x.pem_cert.pem"),
        )
        .unwrap();
        // "x.pem" names x.pem_cert.pem here, not ./x.pem.
        assert!(revoke(dir.path(), "x.pem").unwrap().newly_revoked);
    }

    #[test]
    fn revocations_at_the_same_time_all_land() {
        let dir = pki();
        let names = ["client", "client2", "server", "coordinator"];
        std::thread::scope(|scope| {
            for name in names {
                let dir = dir.path();
                scope.spawn(move || revoke(dir, name).unwrap());
            }
        });
        let (serials, number) = revoked_serials(dir.path());
        assert_eq!((serials.len(), number), (names.len(), names.len() as u64));
    }

    #[test]
    fn the_ca_is_never_renewed_revoked_or_overwritten_as_a_leaf() {
        let dir = pki();
        let ca_key = read(&dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(renew(dir.path(), "ca", 30).is_err());
        assert!(revoke(dir.path(), "ca").is_err());
        let forced = crate::issue(&crate::IssueOptions {
            dir: dir.path().to_path_buf(),
            name: "ca".into(),
            role: Role::Client,
            sans: vec![],
            days: 30,
            force: true,
        });
        assert!(forced.is_err());
        assert_eq!(read(&dir.path().join(CA_KEY_FILE)).unwrap(), ca_key);
        // Nor by its path, nor copied under a leaf's name.
        let ca_path = dir.path().join(CA_CERT_FILE);
        let refused = revoke(dir.path(), ca_path.to_str().unwrap()).unwrap_err();
        assert!(
            refused.to_string().contains("is a CA certificate"),
            "{refused}"
        );
        std::fs::copy(&ca_path, dir.path().join("copied_cert.pem")).unwrap();
        let refused = renew(dir.path(), "copied", 30).unwrap_err();
        assert!(
            refused.to_string().contains("is a CA certificate"),
            "{refused}"
        );
        assert!(!dir.path().join(CRL_FILE).exists());
        assert_eq!(read(&dir.path().join(CA_KEY_FILE)).unwrap(), ca_key);
    }

    #[test]
    fn show_tells_what_matters() {
        let dir = pki();
        let shown = show(&dir.path().join("coordinator_cert.pem")).unwrap();
        for expected in [
            "CN=coordinator",
            "serverAuth, clientAuth",
            "URI:spiffe://securemesh/both/coordinator",
            "IP:127.0.0.1",
            "CA:          false",
            "SHA-256:",
        ] {
            assert!(shown.contains(expected), "{expected:?} not in\n{shown}");
        }
        assert!(show(&dir.path().join("missing.pem")).is_err());
    }
}
