//! The project's own PKI: an X.509 certificate authority and the leaf
//! certificates of servers, coordinators and clients, made with rcgen.
//!
//! Every certificate gets an explicit subject, a random serial number, a
//! bounded validity, explicit key and extended key usages, and a SPIFFE-style
//! URI SAN (`spiffe://securemesh/<role>/<name>`) naming its identity. Keys
//! are ECDSA P-256. Files are written next to each other in one directory,
//! private keys with mode 0600. `init` and `issue` overwrite nothing unless
//! asked; `renew` replaces a certificate and its key (keeping both under
//! `retired/`) and `revoke` the CRL, each holding the directory's lock. The
//! CA signs leaves only (path length 0), and no leaf outlives it.

mod authority;
mod files;
mod lifecycle;

pub use authority::{identity_uri, Authority, IssuedCertificate, Role};
pub use files::{
    ca_days, init, issue, InitOptions, IssueOptions, PkiError, CA_CERT_FILE, CA_KEY_FILE,
};
pub use lifecycle::{refresh_crl, renew, revoke, show, Revocation, CRL_FILE};
