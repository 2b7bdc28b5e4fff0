//! Where etcd is and how to reach it: the `etcd://HOST:PORT[,...]/PREFIX`
//! form the command line takes, and TLS toward etcd.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use securemesh_tls::ClientTls;
use tonic::transport::Endpoint;

use crate::DiscoveryError;

/// The prefix servers register under when the URL names none.
pub const DEFAULT_PREFIX: &str = "/securemesh/dataservice";

/// Bound on one request to etcd (a put, a get, a lease grant).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why an `etcd://` URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdUrlError {
    /// It does not start with `etcd://`.
    #[error("an etcd URL starts with etcd:// (etcd://HOST:PORT[,HOST:PORT...][/PREFIX])")]
    Scheme,
    /// No `HOST:PORT` was given, or one is malformed.
    #[error("{0:?} is not HOST:PORT (HOST: a name, an IPv4 address or an [IPv6] address)")]
    Endpoint(String),
    /// A `USER:PASSWORD@` in the URL, which is logged and shown on the
    /// status page. The URL itself is not repeated.
    #[error(
        "the etcd URL holds a user or password (USER:PASSWORD@): it would be logged and shown \
         on /status; give --etcd-user, and the password in SECUREMESH_ETCD_PASSWORD"
    )]
    Credentials,
}

/// TLS toward etcd: the CA that signed etcd's certificate, when etcd
/// requires client certificates ours, and the revocation list of our CA.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA certificate (PEM) that etcd's serving certificate chains to.
    pub ca: PathBuf,
    /// Our certificate and key (PEM), for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Our CA's CRL (PEM), read at every connection once the file exists
    /// (the first revocation writes it): an etcd certificate it revokes is
    /// refused (one from another CA is judged by its own CA alone). Once
    /// seen, a CRL that is gone refuses the connection rather than let it
    /// go unchecked.
    pub crl: Option<PathBuf>,
    /// Whether the CRL file has existed at a connection; shared by clones.
    crl_seen: Arc<AtomicBool>,
}

impl EtcdTls {
    /// TLS toward etcd members whose certificates `ca` signed, with our
    /// certificate and key for etcd's `--client-cert-auth`, and our CA's
    /// CRL.
    pub fn new(ca: PathBuf, identity: Option<(PathBuf, PathBuf)>, crl: Option<PathBuf>) -> Self {
        Self {
            ca,
            identity,
            crl,
            crl_seen: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The rustls verifier and identity for a connection made now.
    fn client_tls(&self) -> Result<ClientTls, DiscoveryError> {
        let identity = self
            .identity
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        let crl = match self.crl.as_deref() {
            Some(crl) if crl.exists() => {
                self.crl_seen.store(true, Ordering::Relaxed);
                Some(crl)
            }
            Some(crl) if self.crl_seen.load(Ordering::Relaxed) => {
                return Err(DiscoveryError::CrlGone(crl.to_path_buf()));
            }
            _ => None,
        };
        Ok(securemesh_tls::foreign_server_tls(&self.ca, identity, crl)?)
    }
}

/// An etcd user (etcd's `auth enable`): its roles decide what it may read
/// and write. Debug output never shows the password.
#[derive(Clone)]
pub struct EtcdAuth {
    /// The user name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An etcd cluster and the prefix under which servers are registered.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `HOST:PORT` of each etcd member.
    pub endpoints: Vec<String>,
    /// The key prefix, without a trailing `/`.
    pub prefix: String,
    /// TLS toward etcd; plain HTTP/2 when `None`.
    pub tls: Option<EtcdTls>,
    /// The etcd user to authenticate as; none when etcd's auth is off.
    pub auth: Option<EtcdAuth>,
}

impl FromStr for EtcdConfig {
    type Err = EtcdUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let rest = url.strip_prefix("etcd://").ok_or(EtcdUrlError::Scheme)?;
        // Anywhere, not only before the path: a password may hold a `/`,
        // and the part before it would be repeated as a bad endpoint.
        if rest.contains('@') {
            return Err(EtcdUrlError::Credentials);
        }
        let (hosts, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        let endpoints = hosts
            .split(',')
            .map(|endpoint| {
                let valid = endpoint
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| valid_host(host) && port.parse::<u16>().is_ok());
                if valid {
                    Ok(endpoint.to_owned())
                } else {
                    Err(EtcdUrlError::Endpoint(endpoint.to_owned()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prefix = path.trim_end_matches('/');
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        Ok(Self {
            endpoints,
            prefix: prefix.to_owned(),
            tls: None,
            auth: None,
        })
    }
}

impl std::fmt::Display for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)?;
        if self.tls.is_some() {
            f.write_str(" (TLS)")?;
        }
        if let Some(auth) = &self.auth {
            write!(f, " (user {})", auth.user)?;
        }
        Ok(())
    }
}

/// How often a connection to etcd is pinged. etcd closes a connection
/// (`too_many_pings`) that pings more often than its
/// `--grpc-keepalive-min-time`, 5 s by default.
const ETCD_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A ping unanswered this long closes the connection to etcd.
const ETCD_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP connection to one member may take.
const MEMBER_TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to one member may take in all, the TLS handshake
/// included: a member whose host is hung, or whose process is stopped,
/// still completes TCP handshakes from its listen backlog, but never says
/// a word of TLS.
const MEMBER_CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

impl EtcdConfig {
    /// The same cluster, reached over TLS.
    pub fn with_tls(mut self, tls: Option<EtcdTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The same cluster, authenticating as an etcd user.
    pub fn with_auth(mut self, auth: Option<EtcdAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// The key a server with this id registers under.
    pub fn key_of(&self, server_id: &str) -> String {
        format!("{}/{server_id}", self.prefix)
    }

    /// The range every registration is in: the prefix and a `/`, so that
    /// `/a/svc` does not also match `/a/svc2/...`.
    pub(crate) fn range(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// Checks that the TLS files can be read, so that a typo is reported at
    /// start-up rather than on every reconnection.
    pub fn check(&self) -> Result<(), DiscoveryError> {
        self.tls.as_ref().map(EtcdTls::client_tls).transpose()?;
        if self.auth.is_some() && self.tls.is_none() {
            if let Some(remote) = self.endpoints.iter().find(|member| !on_this_host(member)) {
                return Err(DiscoveryError::PlaintextPassword(remote.clone()));
            }
        }
        Ok(())
    }

    /// A client of one member of the cluster, connected before it is
    /// returned: each session (a registration, a watch) talks to one member
    /// that answered, and the next session starts with the next member
    /// (the first session, with a member picked at random).
    /// (A channel balanced over every member sent requests to dead members
    /// too, since a lazily connected endpoint counts as ready: one dead
    /// member in the URL broke half of a session's requests.) Connections
    /// use our rustls verifier when TLS is on (so that our CRL applies to
    /// etcd too); a dead connection is noticed within [`ETCD_PING_INTERVAL`]
    /// and [`ETCD_PING_TIMEOUT`] by HTTP/2 keep-alive, while a watch or
    /// lease stream is open (etcd counts pings on a connection without
    /// streams as abuse).
    pub(crate) async fn connect(&self) -> Result<Client, DiscoveryError> {
        // Each process starts at a member of its own, so that processes
        // started together do not all lean on the first member listed.
        static NEXT_MEMBER: std::sync::OnceLock<AtomicUsize> = std::sync::OnceLock::new();
        let tls = self.tls.as_ref().map(EtcdTls::client_tls).transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let first = NEXT_MEMBER
            .get_or_init(|| AtomicUsize::new((securemesh::distinct_number() % 65_536) as usize))
            .fetch_add(1, Ordering::Relaxed);
        let mut failure = None;
        let mut channel = None;
        for offset in 0..self.endpoints.len() {
            let endpoint = &self.endpoints[(first + offset) % self.endpoints.len()];
            let mut member = Endpoint::from_shared(format!("{scheme}://{endpoint}"))?
                .connect_timeout(MEMBER_TCP_CONNECT_TIMEOUT)
                .http2_keep_alive_interval(ETCD_PING_INTERVAL)
                .keep_alive_timeout(ETCD_PING_TIMEOUT)
                .keep_alive_while_idle(false);
            if let Some(tls) = &tls {
                member = tls.apply(member)?;
            }
            let reason = match tokio::time::timeout(MEMBER_CONNECT_TIMEOUT, member.connect()).await
            {
                Ok(Ok(connected)) => {
                    channel = Some(connected);
                    break;
                }
                Ok(Err(error)) => securemesh::error_text::with_causes(&error),
                Err(_) => format!(
                    "no connection within {} s",
                    MEMBER_CONNECT_TIMEOUT.as_secs()
                ),
            };
            let unreachable = DiscoveryError::Unreachable {
                member: endpoint.clone(),
                reason,
            };
            tracing::debug!(error = %unreachable, "trying the next etcd member");
            failure = Some(unreachable);
        }
        let channel = match (channel, failure) {
            (Some(channel), _) => channel,
            (None, Some(unreachable)) => return Err(unreachable),
            (None, None) => return Err(DiscoveryError::NoMembers),
        };
        // A member cut off from the others' quorum still answers pings but
        // no longer learns of changes: with this, its watches are cancelled
        // once it has had no leader for a few election timeouts (and other
        // requests fail), so that discovery moves on to another member
        // instead of following a list that no longer changes.
        let mut options = ConnectOptions::new().with_require_leader(true);
        if let Some(auth) = &self.auth {
            // etcd's tokens expire (5 minutes by default): a request that
            // meets an expired one authenticates again and is repeated.
            options = options
                .with_user(auth.user.as_str(), auth.password.as_str())
                .with_auto_token_refresh(true);
        }
        within(Client::from_channel(
            etcd_client::Channel::Tonic(channel),
            Some(options),
        ))
        .await
    }
}

/// Whether `host` is `[IPV6]`, an IPv4 address or a host name (letters,
/// digits, `-`, `_` and `.`, starting with a letter or digit; `_` is not
/// DNS but container runtimes name hosts with it).
fn valid_host(host: &str) -> bool {
    if let Some(inside) = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return inside.parse::<std::net::Ipv6Addr>().is_ok();
    }
    host.starts_with(|c: char| c.is_ascii_alphanumeric())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `request`, bounded by [`REQUEST_TIMEOUT`].
pub(crate) async fn within<T>(
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| DiscoveryError::Timeout(REQUEST_TIMEOUT))?
        .map_err(DiscoveryError::from)
}

/// Whether the member `HOST:PORT` is reached over loopback: `localhost`,
/// 127.0.0.0/8 or `[::1]`.
fn on_this_host(member: &str) -> bool {
    let host = member
        .rsplit_once(':')
        .map_or(member, |(host, _port)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that accepts TCP (its kernel does, from the listen
    /// backlog) but never answers the TLS handshake is given up within
    /// [`MEMBER_CONNECT_TIMEOUT`], so that the next member gets its turn.
    #[tokio::test]
    async fn a_member_silent_in_the_tls_handshake_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("etcd-ca.pem");
        let authority = rcgen::generate_simple_self_signed(vec!["etcd".to_owned()]).unwrap();
        std::fs::write(&ca, authority.cert.pem()).unwrap();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config: EtcdConfig = format!("etcd://{}/securemesh", silent.local_addr().unwrap())
            .parse()
            .unwrap();
        let config = config.with_tls(Some(EtcdTls::new(ca, None, None)));
        let waited = tokio::time::timeout(MEMBER_CONNECT_TIMEOUT * 3, config.connect()).await;
        match waited {
            Ok(Err(DiscoveryError::Unreachable { reason, .. })) => {
                assert!(reason.contains("no connection within"), "{reason}");
            }
            Ok(other) => panic!("expected the member to be given up: {:?}", other.err()),
            Err(_) => panic!("the TLS handshake with a silent member was waited for"),
        }
        drop(silent);
    }

    #[test]
    fn parses_several_members_and_a_prefix() {
        let config: EtcdConfig = "etcd://10.0.0.1:2379,etcd-2.example:2379/team/api/"
            .parse()
            .unwrap();
        assert_eq!(config.endpoints, ["10.0.0.1:2379", "etcd-2.example:2379"]);
        assert_eq!(config.prefix, "/team/api");
        assert_eq!(config.key_of("server-1"), "/team/api/server-1");
        assert_eq!(config.range(), "/team/api/");
        assert_eq!(
            config.to_string(),
            "etcd://10.0.0.1:2379,etcd-2.example:2379/team/api"
        );
    }

    #[test]
    fn the_prefix_defaults_when_absent() {
        for url in ["etcd://127.0.0.1:2379", "etcd://127.0.0.1:2379/"] {
            let config: EtcdConfig = url.parse().unwrap();
            assert_eq!(config.prefix, DEFAULT_PREFIX, "{url}");
        }
        let ipv6: EtcdConfig = "etcd://[::1]:2379".parse().unwrap();
        assert_eq!(ipv6.endpoints, ["[::1]:2379"]);
        let compose: EtcdConfig = "etcd://mesh_etcd_1:2379".parse().unwrap();
        assert_eq!(compose.endpoints, ["mesh_etcd_1:2379"]);
    }

    #[test]
    fn refuses_credentials_in_the_url_without_repeating_them() {
        for url in [
            "etcd://root:hunter2@10.0.0.1:2379",
            "etcd://10.0.0.2:2379,root:hunter2@10.0.0.1:2379/p",
            // The part before a `/` in the password is not an endpoint.
            "etcd://root:hunter2/more@10.0.0.1:2379",
        ] {
            let refused = url.parse::<EtcdConfig>().unwrap_err();
            assert_eq!(refused, EtcdUrlError::Credentials);
            assert!(!refused.to_string().contains("hunter2"), "{refused}");
        }
    }

    #[test]
    fn refuses_what_is_not_an_etcd_url() {
        assert_eq!(
            "http://127.0.0.1:2379".parse::<EtcdConfig>().unwrap_err(),
            EtcdUrlError::Scheme
        );
        for bad in [
            "etcd://",
            "etcd:///prefix",
            "etcd://127.0.0.1/prefix",
            "etcd://127.0.0.1:99999",
            "etcd://127.0.0.1:2379,/p",
            "etcd://:2379",
            "etcd://::1:2379",
            "etcd://[not-v6]:2379",
            "etcd://10.0.0.1 :2379",
            "etcd://-x:2379",
            "etcd://_x:2379",
        ] {
            assert!(
                matches!(bad.parse::<EtcdConfig>(), Err(EtcdUrlError::Endpoint(_))),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn the_password_is_never_shown() {
        let config = "etcd://127.0.0.1:2379"
            .parse::<EtcdConfig>()
            .unwrap()
            .with_auth(Some(EtcdAuth {
                user: "registrar".into(),
                password: "hunter2-secret".into(),
            }));
        for shown in [format!("{config}"), format!("{config:?}")] {
            assert!(shown.contains("registrar"), "{shown}");
            assert!(!shown.contains("hunter2-secret"), "{shown}");
        }
    }

    #[test]
    fn a_password_goes_in_clear_only_over_loopback() {
        let with_password = |url: &str| {
            url.parse::<EtcdConfig>().unwrap().with_auth(Some(EtcdAuth {
                user: "registrar".into(),
                password: "hunter2-secret".into(),
            }))
        };
        for local in [
            "etcd://127.0.0.1:2379",
            "etcd://127.0.0.2:2379,localhost:22379",
            "etcd://[::1]:2379",
        ] {
            assert!(with_password(local).check().is_ok(), "{local}");
        }
        for remote in [
            "etcd://10.0.0.5:2379",
            "etcd://127.0.0.1:2379,etcd-2.example:2379",
        ] {
            let error = with_password(remote).check().unwrap_err();
            assert!(
                matches!(error, DiscoveryError::PlaintextPassword(_)),
                "{remote}"
            );
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
        // Without a password, plaintext etcd anywhere is the operator's call.
        assert!("etcd://10.0.0.5:2379"
            .parse::<EtcdConfig>()
            .unwrap()
            .check()
            .is_ok());
    }

    #[test]
    fn a_missing_tls_file_is_reported_with_its_path() {
        let config = "etcd://127.0.0.1:2379"
            .parse::<EtcdConfig>()
            .unwrap()
            .with_tls(Some(EtcdTls::new(
                PathBuf::from("/nonexistent/ca_cert.pem"),
                None,
                None,
            )));
        let error = config.check().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca_cert.pem"), "{error}");
    }

    #[test]
    fn a_crl_that_was_there_and_is_gone_refuses_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let crl = dir.path().join("ca_crl.pem");
        // The CA is missing too, which is found after the CRL is judged.
        let tls = EtcdTls::new(dir.path().join("ca_cert.pem"), None, Some(crl.clone()));
        // No CRL yet (nothing revoked so far): not a refusal of its own.
        assert!(matches!(tls.client_tls(), Err(DiscoveryError::Tls(_))));
        std::fs::write(&crl, "a CRL").unwrap();
        assert!(matches!(tls.client_tls(), Err(DiscoveryError::Tls(_))));
        std::fs::remove_file(&crl).unwrap();
        let clone = tls.clone();
        assert!(matches!(clone.client_tls(), Err(DiscoveryError::CrlGone(path)) if path == crl));
    }
}
