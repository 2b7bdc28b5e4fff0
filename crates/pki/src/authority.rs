//! Certificate generation: the CA and the leaves it signs.

use std::net::IpAddr;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::SecureRandom;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::PkiError;

/// Names every server and coordinator certificate carries, so that local
/// connections verify whichever way the address is written.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts TLS connections (extended key usage serverAuth).
    Server,
    /// Authenticates to servers (clientAuth).
    Client,
    /// Both: the coordinator accepts clients and connects to servers.
    Both,
}

impl Role {
    /// The role's name in identities and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
            Role::Both => "both",
        }
    }

    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Role::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        }
    }

    fn serves(self) -> bool {
        matches!(self, Role::Server | Role::Both)
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "server" => Ok(Role::Server),
            "client" => Ok(Role::Client),
            "both" => Ok(Role::Both),
            other => Err(format!(
                "unknown role {other:?} (expected server, client or both)"
            )),
        }
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// Shows the certificate, never the private key.
impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<hidden>")
            .finish()
    }
}

/// A certificate authority able to sign leaves.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// The CA certificate, DER.
    cert_der: Vec<u8>,
    /// The end of the CA's validity: no leaf outlives it.
    not_after: OffsetDateTime,
}

impl Authority {
    /// Creates a new self-signed CA valid for `days` days.
    pub fn generate(days: u32) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        // A unique name per CA: two projects' CAs must not be confused when
        // a peer looks up the issuer of a certificate by name.
        params.distinguished_name = subject(&format!("securemesh CA {}", random_hex(4)?));
        // It signs leaves only: no intermediate CA it signed would be valid.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity_and_serial(&mut params, days)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA from its PEM certificate and PEM key, refusing
    /// a certificate that is not a CA's and a key that is not its key
    /// (what a crash between writing the two, or a file copied from
    /// elsewhere, would leave): everything signed with them would be
    /// refused by every peer.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|error| PkiError::InvalidCa(format!("not a PEM certificate: {error}")))?;
        let certificate = pem
            .parse_x509()
            .map_err(|error| PkiError::InvalidCa(format!("not a certificate: {error}")))?;
        if !certificate.is_ca() {
            return Err(PkiError::InvalidCa(
                "the certificate is not a CA's".to_owned(),
            ));
        }
        if certificate.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::InvalidCa(
                "the key is not the certificate's".to_owned(),
            ));
        }
        let not_after = certificate.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der: pem.contents.clone(),
            not_after,
        })
    }

    /// Whether the certificate `der` was signed by this CA.
    pub fn signed(&self, der: &[u8]) -> bool {
        let Ok((_, ca)) = X509Certificate::from_der(&self.cert_der) else {
            return false;
        };
        X509Certificate::from_der(der).is_ok_and(|(_, certificate)| {
            certificate.verify_signature(Some(ca.public_key())).is_ok()
        })
    }

    /// The CA as an rcgen issuer (for CRLs).
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate for `name` in `role`, valid for `days` days
    /// or until the CA expires, whichever comes first.
    ///
    /// Server-capable certificates carry the loopback names plus `extra_sans`
    /// (DNS names or IP addresses); every certificate carries the URI SAN
    /// `spiffe://securemesh/<role>/<name>`.
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        extra_sans: &[String],
        days: u32,
    ) -> Result<IssuedCertificate, PkiError> {
        if days == 0 {
            return Err(PkiError::InvalidValidity);
        }
        let now = OffsetDateTime::now_utc();
        let not_after = days_after(now, days)?.min(self.not_after);
        if not_after <= now {
            return Err(PkiError::CaExpired);
        }
        self.issue_valid_between(name, role, extra_sans, now - Duration::hours(1), not_after)
    }

    /// Like [`Authority::issue`] with an explicit validity period, which
    /// may lie in the past or the future (to test that peers refuse
    /// expired and not yet valid certificates); it ends with the CA's at
    /// the latest, as every leaf's does.
    pub fn issue_valid_between(
        &self,
        name: &str,
        role: Role,
        extra_sans: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        validate_name(name)?;
        let not_after = not_after.min(self.not_after);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = role.extended_key_usages();
        params.use_authority_key_identifier_extension = true;

        let mut sans = vec![SanType::URI(
            identity_uri(role, name)
                .try_into()
                .map_err(PkiError::from)?,
        )];
        let mut host_names: Vec<&str> = Vec::new();
        if role.serves() {
            host_names.extend(LOOPBACK_NAMES);
        }
        host_names.extend(extra_sans.iter().map(String::as_str));
        for host in host_names {
            let san = match IpAddr::from_str(host) {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(host) => SanType::DnsName(
                    host.try_into()
                        .map_err(|_| PkiError::InvalidSan(host.to_owned()))?,
                ),
                Err(_) => return Err(PkiError::InvalidSan(host.to_owned())),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        params.subject_alt_names = sans;
        if not_after <= not_before {
            return Err(PkiError::InvalidValidity);
        }
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);

        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The identity URI a certificate of `role` for `name` carries.
pub fn identity_uri(role: Role, name: &str) -> String {
    format!("spiffe://securemesh/{}/{}", role.as_str(), name)
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "securemesh");
    name.push(DnType::CommonName, common_name);
    name
}

/// Whether `host` is a DNS name a TLS client can match: labels of letters,
/// digits, `_` (as in container service names, which rustls accepts) and
/// inner hyphens, each 1 to 63 long, at most 253 in all, no
/// trailing dot; a leading `*.` (a wildcard for one label) is allowed
/// before at least two labels. Anything else (a URL, a name with a space,
/// an empty one) would make a certificate that never matches, silently.
fn is_dns_name(host: &str) -> bool {
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |label: &&str| {
        (1..=63).contains(&label.len())
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    host.len() <= 253 && labels.iter().all(label_ok) && (!wildcard || labels.len() >= 2)
}

/// Names become file names and identity URIs: keep them to a safe alphabet.
pub(crate) fn validate_name(name: &str) -> Result<(), PkiError> {
    // `ca` would write over ca_cert.pem and ca_key.pem (in any case, on a
    // file system that ignores case).
    let ok = !name.eq_ignore_ascii_case("ca")
        && !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName(name.to_owned()))
    }
}

fn random_hex(bytes: usize) -> Result<String, PkiError> {
    let mut random = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| PkiError::Random)?;
    Ok(random.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Validity starts an hour back (tolerating clock skew between machines) and
/// lasts `days`.
fn set_validity_and_serial(params: &mut CertificateParams, days: u32) -> Result<(), PkiError> {
    if days == 0 {
        return Err(PkiError::InvalidValidity);
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = days_after(now, days)?;
    params.serial_number = Some(random_serial()?);
    Ok(())
}

/// `days` days after `now`, if X.509 can say it (up to the year 9999).
fn days_after(now: OffsetDateTime, days: u32) -> Result<OffsetDateTime, PkiError> {
    now.checked_add(Duration::days(i64::from(days)))
        .filter(|end| end.year() <= 9999)
        .ok_or(PkiError::InvalidValidity)
}

/// 16 random bytes, so that re-issuing never repeats a serial (revocation
/// is by serial).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| PkiError::Random)?;
    // A positive INTEGER: clear the top bit, and keep it non-zero.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_loaded_only_with_its_own_key() {
        let ca = Authority::generate(1).unwrap();
        let other = Authority::generate(1).unwrap();
        assert!(Authority::from_pem(ca.cert_pem(), &ca.key_pem()).is_ok());
        let mismatched = Authority::from_pem(ca.cert_pem(), &other.key_pem());
        assert!(matches!(mismatched, Err(PkiError::InvalidCa(_))));
        // A leaf with its own key is no CA either.
        let leaf = ca.issue("server", Role::Server, &[], 1).unwrap();
        let not_a_ca = Authority::from_pem(&leaf.cert_pem, &leaf.key_pem);
        assert!(matches!(not_a_ca, Err(PkiError::InvalidCa(_))));
    }

    #[test]
    fn a_ca_tells_its_own_leaves_from_others() {
        let ca = Authority::generate(1).unwrap();
        let other = Authority::generate(1).unwrap();
        let der = |pem: &str| {
            x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .unwrap()
                .1
                .contents
        };
        let own = ca.issue("a", Role::Client, &[], 1).unwrap();
        let foreign = other.issue("a", Role::Client, &[], 1).unwrap();
        assert!(ca.signed(&der(&own.cert_pem)));
        assert!(!ca.signed(&der(&foreign.cert_pem)));
        assert!(!ca.signed(b"not a certificate"));
    }

    #[test]
    fn no_leaf_outlives_its_ca_and_the_ca_signs_no_other_ca() {
        let ca = Authority::generate(2).unwrap();
        let leaf = ca.issue("a", Role::Client, &[], 365).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
        let leaf = pem.parse_x509().unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let ca_cert = pem.parse_x509().unwrap();
        assert!(leaf.validity().not_after <= ca_cert.validity().not_after);
        // Nor does one with its validity given explicitly.
        let now = OffsetDateTime::now_utc();
        let explicit = ca
            .issue_valid_between("b", Role::Client, &[], now, now + Duration::days(9000))
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(explicit.cert_pem.as_bytes()).unwrap();
        let explicit = pem.parse_x509().unwrap();
        assert!(explicit.validity().not_after <= ca_cert.validity().not_after);
        let constraints = ca_cert.basic_constraints().unwrap().unwrap().value;
        assert_eq!(constraints.path_len_constraint, Some(0));
    }

    #[test]
    fn a_validity_past_the_year_9999_is_refused_not_a_panic() {
        assert!(matches!(
            Authority::generate(u32::MAX),
            Err(PkiError::InvalidValidity)
        ));
        let ca = Authority::generate(1).unwrap();
        assert!(matches!(
            ca.issue("a", Role::Client, &[], u32::MAX),
            Err(PkiError::InvalidValidity)
        ));
    }

    #[test]
    fn only_ip_addresses_and_dns_names_become_sans() {
        let ca = Authority::generate(30).unwrap();
        for good in [
            "mesh.example",
            "a-b.example",
            "my_service",
            "localhost",
            "*.mesh.example",
            "::1",
        ] {
            assert!(
                ca.issue("web", Role::Server, &[good.to_owned()], 1).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "mesh.example.",
            "https://host:5001",
            "a b",
            "",
            "-bad.example",
            "*.example",
            "a..b",
            "*",
            &"x".repeat(64),
        ] {
            match ca.issue("web", Role::Server, &[bad.to_owned()], 1) {
                Err(PkiError::InvalidSan(refused)) => assert_eq!(refused, bad),
                other => panic!("{bad:?}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn ca_in_any_case_is_no_leaf_name() {
        for name in ["ca", "CA", "Ca"] {
            assert!(matches!(validate_name(name), Err(PkiError::InvalidName(_))));
        }
        assert!(validate_name("cab").is_ok());
    }

    #[test]
    fn debug_output_shows_the_certificate_but_never_the_key() {
        let issued = Authority::generate(1)
            .unwrap()
            .issue("alice", Role::Client, &[], 1)
            .unwrap();
        let shown = format!("{issued:?}");
        assert!(shown.contains("BEGIN CERTIFICATE"), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(!shown.contains(&issued.key_pem[40..80]), "{shown}");
    }
}
