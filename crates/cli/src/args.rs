//! Command-line arguments. Every flag has a `SECUREMESH_*` environment
//! fallback where it makes sense, and defaults reproduce the lab with no
//! flags at all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use securemesh_pki::Role;
use securemesh_tls::TlsFiles;

/// Secure, fault-tolerant gRPC data service: mutual TLS, Fernet payloads,
/// and a load-balancing coordinator.
#[derive(Debug, Parser)]
#[command(name = "securemesh", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
    /// Worker threads of the async runtime [default: one per CPU core]. A
    /// coordinator sharing a small machine with its servers answers single
    /// calls faster with one: each call then stays on one thread.
    #[arg(long, global = true, env = "SECUREMESH_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

/// Where and how logs are written; valid for every command.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Also write logs to this file (e.g. server-log.txt).
    #[arg(long, global = true, env = "SECUREMESH_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Start a new log file every day (FILE.YYYY-MM-DD).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SECUREMESH_LOG_ROTATION",
        default_value = "never"
    )]
    pub log_rotation: LogRotation,
    /// Text for people, or one JSON object a line for machines.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SECUREMESH_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// How many log lines may wait for a slow standard error; lines beyond
    /// that are dropped (and counted on the way out), so that a standard
    /// error nobody reads cannot stop the service.
    #[arg(
        long,
        global = true,
        env = "SECUREMESH_STDERR_BACKLOG",
        default_value_t = 16_384,
        value_parser = clap::value_parser!(u32).range(1..=1_048_576),
        value_name = "LINES"
    )]
    pub stderr_backlog: u32,
}

/// How log files rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogRotation {
    /// One file.
    Never,
    /// A file a day.
    Daily,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make and extend the project's certificate authority.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Write a new Fernet key (as `Fernet.generate_key()` makes).
    Keygen(KeygenArgs),
    /// Run a DataService server (mutual TLS).
    Server(ServerArgs),
    /// Run the coordinator: balances and fails over between servers.
    Coordinator(CoordinatorArgs),
    /// Encrypt, submit and verify; once, or as a load generator.
    Client(ClientArgs),
    /// Print the Fernet token of a message (for grpcurl and other clients).
    Encrypt(EncryptArgs),
    /// Manage the credentials file (passwords and Bearer tokens).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// Print the plaintext of a Fernet token.
    Decrypt(DecryptArgs),
    /// Run the whole lab: certificates, two servers, coordinator, clients,
    /// a failover and a recovery.
    Demo(DemoArgs),
    /// Print a running coordinator's (or server's) status: its backends,
    /// their health, load and latency, from its admin listener.
    Status(StatusArgs),
    /// Measure the coordinator side by side with direct calls and nginx;
    /// write BENCHMARKS.md and print the ratios against the targets.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A short smoke run that checks every step works (not how fast).
    #[arg(long)]
    pub quick: bool,
    /// The report to write [default: BENCHMARKS.md; with --quick, none,
    /// so that a smoke run does not replace the last full run's report].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The failover picture to write, embedded by the report (a path
    /// relative to the report's directory).
    #[arg(long, default_value = "docs/bench-failover.svg")]
    pub picture: PathBuf,
    /// Notes on where the coordinator's CPU goes (from a profile), quoted
    /// in the report when the file exists.
    #[arg(long, default_value = "docs/coordinator-profile.md")]
    pub profile_notes: PathBuf,
    /// Also write every measurement as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the lab's directory (certificates, logs, nginx.conf) here
    /// instead of a temporary one.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The admin listener (the process's --metrics-listen): PORT, :PORT or
    /// IP:PORT.
    #[arg(long, env = "SECUREMESH_ADMIN", default_value = "127.0.0.1:9000")]
    pub admin: String,
    /// Print the status document as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Command {
    /// Whether the command runs a server or a coordinator, whose log files
    /// may hold plaintext and are kept private.
    pub fn serves(&self) -> bool {
        matches!(self, Command::Server(_) | Command::Coordinator(_))
    }

    /// Whether the command only prints, for a person or a pipe, and opens
    /// no socket and starts no process: it may end, as Unix tools do, when
    /// what reads its output goes away (`securemesh pki init | head -1`).
    /// (A command with sockets must not: TLS writes vectors, with
    /// `writev`, which raises SIGPIPE on a connection the peer reset.)
    pub fn ends_with_its_reader(&self) -> bool {
        matches!(
            self,
            Command::Pki(_)
                | Command::Keygen(_)
                | Command::Encrypt(_)
                | Command::Credentials(_)
                | Command::Decrypt(_)
        )
    }

    /// The default log level: long-running roles log `info`; one-shot
    /// commands only warnings; the benchmark only errors (it counts what
    /// fails itself, and its own clients' transient warnings are noise).
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Server(_) | Command::Coordinator(_) | Command::Demo(_) => "info",
            Command::Bench(_) => "error",
            _ => "warn",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Add a user with an argon2id hash of a password (from --password,
    /// SECUREMESH_NEW_PASSWORD, a prompt on a terminal, or the first line of
    /// standard input).
    AddUser(CredentialsUserArgs),
    /// Add a named random Bearer token and print it (only its digest is
    /// kept).
    AddToken(CredentialsTokenArgs),
}

#[derive(Debug, Args)]
pub struct CredentialsUserArgs {
    /// User name.
    pub name: String,
    /// The password (not `SECUREMESH_PASSWORD`, which is the client's;
    /// prefer the variable or the prompt: a command line is visible to
    /// every local user).
    #[arg(long, env = "SECUREMESH_NEW_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    #[command(flatten)]
    pub file: CredentialsFileArgs,
}

/// Where the credentials file is.
#[derive(Debug, Args)]
pub struct CredentialsFileArgs {
    /// The credentials file, created with mode 0600 [default:
    /// <certs>/credentials.txt].
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Directory of the default file.
    #[arg(long, env = "SECUREMESH_CERTS", default_value = "certs")]
    pub certs: PathBuf,
}

impl CredentialsFileArgs {
    /// `--file`, or `<certs>/credentials.txt`.
    pub fn path(&self) -> PathBuf {
        self.file
            .clone()
            .unwrap_or_else(|| self.certs.join("credentials.txt"))
    }
}

#[derive(Debug, Args)]
pub struct CredentialsTokenArgs {
    /// Token name.
    pub name: String,
    #[command(flatten)]
    pub file: CredentialsFileArgs,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the CA and the server, coordinator, client and client2
    /// certificates.
    Init(PkiInitArgs),
    /// Issue one more certificate from the existing CA.
    Issue(PkiIssueArgs),
    /// Revoke a certificate (a NAME, or a PEM file such as one `renew` kept
    /// under retired/): add it to the CA's CRL (ca_crl.pem). Running servers
    /// and coordinators refuse it after SIGHUP.
    Revoke(PkiNameArgs),
    /// Issue a certificate again (same role and names, new key and serial;
    /// the old one is kept under retired/ to be revoked if need be).
    /// Running servers and coordinators serve it after SIGHUP.
    Renew(PkiRenewArgs),
    /// Sign the CA's CRL (ca_crl.pem) again, with the same entries and a
    /// fresh 30-day validity. Servers warn when they load a CRL past its
    /// next update; running ones take the new one after SIGHUP.
    RefreshCrl(PkiDirArgs),
    /// Show what a certificate says (subject, names, usages, issuer,
    /// validity, fingerprint), or what a CRL lists and until when.
    Show(PkiShowArgs),
}

#[derive(Debug, Args)]
pub struct PkiDirArgs {
    /// Directory of the CA and certificates.
    #[arg(
        long,
        visible_alias = "certs",
        env = "SECUREMESH_CERTS",
        default_value = "certs"
    )]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PkiNameArgs {
    /// Name of the certificate (NAME_cert.pem in the directory).
    pub name: String,
    #[command(flatten)]
    pub pki: PkiDirArgs,
}

#[derive(Debug, Args)]
pub struct PkiRenewArgs {
    #[command(flatten)]
    pub certificate: PkiNameArgs,
    /// Validity of the new certificate, in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

#[derive(Debug, Args)]
pub struct PkiShowArgs {
    /// A PEM certificate or CRL file.
    pub file: PathBuf,
}

/// Where PKI files go and how long certificates last.
#[derive(Debug, Args)]
pub struct PkiOutputArgs {
    #[command(flatten)]
    pub pki: PkiDirArgs,
    /// Validity of each certificate made, in days (a CA made by init lasts
    /// ten years, or twice this if longer; no certificate outlives its CA).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct PkiInitArgs {
    /// Another client certificate, written as NAME_cert.pem / NAME_key.pem.
    #[arg(long = "client", value_name = "NAME")]
    pub clients: Vec<String>,
    /// Another DNS name or IP address for the server and coordinator
    /// certificates (they always carry localhost, 127.0.0.1 and ::1).
    #[arg(long = "san", value_name = "HOST")]
    pub sans: Vec<String>,
    #[command(flatten)]
    pub output: PkiOutputArgs,
}

#[derive(Debug, Args)]
pub struct PkiIssueArgs {
    /// Name of the certificate (files NAME_cert.pem and NAME_key.pem).
    pub name: String,
    /// What it may be used for: server, client or both.
    #[arg(long)]
    pub role: Role,
    /// Another DNS name or IP address.
    #[arg(long = "san", value_name = "HOST")]
    pub sans: Vec<String>,
    #[command(flatten)]
    pub output: PkiOutputArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key [default: <certs>/encryption_key.txt].
    #[arg(long, env = "SECUREMESH_ENCRYPTION_KEY")]
    pub out: Option<PathBuf>,
    /// Directory of the default output file.
    #[arg(long, env = "SECUREMESH_CERTS", default_value = "certs")]
    pub certs: PathBuf,
    /// Overwrite an existing file.
    #[arg(long, group = "edit")]
    pub force: bool,
    /// Put a new key first in the existing file and keep the old ones, so
    /// that tokens made under them still decrypt.
    #[arg(long, group = "edit")]
    pub rotate: bool,
    /// Add a new key second in the existing file: servers accept it once
    /// reloaded, nobody encrypts under it yet (then --promote).
    #[arg(long, group = "edit")]
    pub stage: bool,
    /// Make the second key the first (the one clients encrypt under); the
    /// former first key still decrypts.
    #[arg(long, group = "edit")]
    pub promote: bool,
    /// Keep only the first N keys: tokens under the others stop decrypting
    /// once servers reload.
    #[arg(long, value_name = "N", group = "edit", value_parser = at_least_one)]
    pub keep: Option<usize>,
}

/// Certificate, key and CA of one party; defaults come from `--certs`.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Directory of the default certificate, key and CA files.
    #[arg(long, env = "SECUREMESH_CERTS", default_value = "certs")]
    pub certs: PathBuf,
    /// Our certificate [default: <certs>/NAME_cert.pem, NAME being server,
    /// coordinator, or the client's --identity].
    #[arg(long, env = "SECUREMESH_CERT")]
    pub cert: Option<PathBuf>,
    /// Our private key [default: <certs>/NAME_key.pem, as for --cert].
    #[arg(long, env = "SECUREMESH_KEY")]
    pub key: Option<PathBuf>,
    /// The CA certificate trusted for peers [default: <certs>/ca_cert.pem].
    #[arg(long, env = "SECUREMESH_CA")]
    pub ca: Option<PathBuf>,
    /// Certificate revocation list of our CA, checked for every peer (callers,
    /// the servers dialled, etcd) [default: <certs>/ca_crl.pem when it
    /// exists].
    #[arg(long, env = "SECUREMESH_CRL", conflicts_with = "no_crl")]
    pub crl: Option<PathBuf>,
    /// Do not check a revocation list.
    #[arg(long)]
    pub no_crl: bool,
}

impl TlsArgs {
    /// The files of `identity` (e.g. `server`), with overrides applied.
    pub fn files(&self, identity: &str) -> TlsFiles {
        let defaults = TlsFiles::in_dir(&self.certs, identity);
        TlsFiles {
            cert: self.cert.clone().unwrap_or(defaults.cert),
            key: self.key.clone().unwrap_or(defaults.key),
            ca: self.ca.clone().unwrap_or(defaults.ca),
        }
    }

    /// The CRL to check now: `--crl`, else `<certs>/ca_crl.pem` if it
    /// exists (so one made by `pki revoke` after start is picked up on
    /// reload), none with `--no-crl`.
    pub fn crl(&self) -> Option<PathBuf> {
        if self.no_crl {
            return None;
        }
        self.crl.clone().or_else(|| {
            Some(self.certs.join(securemesh_pki::CRL_FILE)).filter(|path| path.exists())
        })
    }

    /// The CRL to check at a reload, as [`TlsArgs::crl`]; but once the
    /// process has checked one (`checked_before`), a CRL that is gone is an
    /// error, not revocation switched off without a word (`--no-crl` does
    /// that).
    pub fn crl_on_reload(&self, checked_before: bool) -> anyhow::Result<Option<PathBuf>> {
        let crl = self.crl();
        if crl.is_none() && checked_before && !self.no_crl {
            anyhow::bail!(
                "the revocation list {} is gone (restore it, or restart with --no-crl to stop \
                 checking revocation)",
                self.certs.join(securemesh_pki::CRL_FILE).display()
            );
        }
        Ok(crl)
    }

    /// The CRL a connection made later should check if it exists by then:
    /// `--crl`, else `<certs>/ca_crl.pem`; none with `--no-crl`.
    pub fn crl_to_follow(&self) -> Option<PathBuf> {
        if self.no_crl {
            return None;
        }
        Some(
            self.crl
                .clone()
                .unwrap_or_else(|| self.certs.join(securemesh_pki::CRL_FILE)),
        )
    }

    /// The Fernet key file: `explicit`, or `<certs>/encryption_key.txt`.
    pub fn encryption_key(&self, explicit: &Option<PathBuf>) -> PathBuf {
        key_file(explicit, &self.certs)
    }
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Port to listen on (host 127.0.0.1) [default: 5001].
    pub port: Option<u16>,
    /// Full listen address, instead of PORT.
    #[arg(long, env = "SECUREMESH_SERVER_LISTEN", conflicts_with = "port")]
    pub listen: Option<SocketAddr>,
    /// Name reported in replies and registered in etcd; two servers on
    /// one prefix need two names [default: the host:port of --advertise,
    /// else the listen address]. At most 256 bytes, no control
    /// characters.
    #[arg(long, env = "SECUREMESH_SERVER_ID", value_parser = server_id)]
    pub server_id: Option<String>,
    /// Fernet key file [default: <certs>/encryption_key.txt].
    #[arg(long, env = "SECUREMESH_ENCRYPTION_KEY")]
    pub encryption_key: Option<PathBuf>,
    /// Do not print the lab's `Decrypted data:` line.
    #[arg(
        long,
        env = "SECUREMESH_HIDE_PLAINTEXT",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub hide_plaintext: bool,
    /// Another identity allowed to call (besides the coordinator's), e.g.
    /// spiffe://securemesh/client/client to be called directly.
    #[arg(long = "allow", value_name = "ID", value_parser = caller_id)]
    pub allow: Vec<String>,
    /// Largest message accepted, in bytes (larger ones get OUT_OF_RANGE).
    #[arg(long, default_value_t = 65_536, value_parser = count_up_to::<MOST_MESSAGE_BYTES>)]
    pub max_message_size: usize,
    /// Register in etcd while running, so that coordinators following the
    /// prefix find this server: etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
    /// (prefix default /securemesh/dataservice).
    #[arg(long, value_name = "ETCD_URL", env = "SECUREMESH_REGISTER")]
    pub register: Option<securemesh_discovery::EtcdConfig>,
    /// The URL coordinators dial, as registered [default:
    /// https://<listen address>]; its host must be in the server certificate.
    #[arg(long, value_name = "URL", env = "SECUREMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Lifetime of the registration's etcd lease (whole seconds, at least
    /// 1s): a server that dies without deregistering is forgotten this long
    /// after.
    #[arg(long, value_parser = lease_ttl, default_value = "10s")]
    pub register_ttl: Duration,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Refuse tokens older than this ("token expired"), in whole seconds
    /// (Fernet timestamps are seconds); 0s accepts any age.
    #[arg(long, env = "SECUREMESH_TOKEN_TTL", value_parser = token_ttl, default_value = "5m")]
    pub token_ttl: Duration,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS toward etcd, for `--register` and `--discovery`.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// Reach etcd over TLS, trusting this CA (e.g. certs/ca_cert.pem when
    /// etcd serves a certificate from `securemesh pki issue etcd`).
    #[arg(long, env = "SECUREMESH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Certificate to present to etcd (for its --client-cert-auth).
    #[arg(long, env = "SECUREMESH_ETCD_CERT", requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// Key of --etcd-cert.
    #[arg(long, env = "SECUREMESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user to authenticate as, when etcd runs with `auth enable`
    /// (a server needs read and write on the prefix, a coordinator read).
    #[arg(long, env = "SECUREMESH_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    /// Password of --etcd-user (prefer the environment variable: a command
    /// line is visible to every local user).
    #[arg(
        long,
        env = "SECUREMESH_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    pub etcd_password: Option<String>,
}

impl EtcdArgs {
    /// The flags (or their variables) given: they matter only beside
    /// `--register` or `--discovery`.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("--etcd-ca", self.etcd_ca.is_some()),
            ("--etcd-cert", self.etcd_cert.is_some()),
            ("--etcd-key", self.etcd_key.is_some()),
            ("--etcd-user", self.etcd_user.is_some()),
            ("--etcd-password", self.etcd_password.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }

    /// Warns that the etcd flags given do nothing without `needed` (a
    /// setting left in the environment, or a forgotten flag).
    pub fn warn_if_unused(&self, needed: &str) {
        let given = self.given();
        if !given.is_empty() {
            tracing::warn!(
                flags = %given.join(","),
                "{} given without {needed}: etcd is not used",
                given.join(", ")
            );
        }
    }

    /// `config` with the TLS and user these flags ask for, checked; `crl`
    /// (our CA's) is checked against etcd's certificate at every connection
    /// if it exists by then.
    pub fn apply(
        &self,
        config: securemesh_discovery::EtcdConfig,
        crl: Option<PathBuf>,
    ) -> anyhow::Result<securemesh_discovery::EtcdConfig> {
        let tls = self.etcd_ca.clone().map(|ca| {
            let identity = self.etcd_cert.clone().zip(self.etcd_key.clone());
            securemesh_discovery::EtcdTls::new(ca, identity, crl)
        });
        let auth = self
            .etcd_user
            .clone()
            .zip(self.etcd_password.clone())
            .map(|(user, password)| securemesh_discovery::EtcdAuth { user, password });
        let config = config.with_tls(tls).with_auth(auth);
        config.check()?;
        Ok(config)
    }
}

/// How a long-running process accepts connections and drains on SIGTERM.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Abandon TLS handshakes that take longer.
    #[arg(long, value_parser = positive_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// On SIGTERM/Ctrl-C, keep serving this long while health reports
    /// NOT_SERVING, so that callers move their traffic away first.
    #[arg(long, value_parser = duration, default_value = "0s")]
    pub drain_delay: Duration,
    /// Then give in-flight calls this long to finish.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub drain_grace: Duration,
    /// Calls in flight allowed per connection.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Authenticated connections allowed at once; more are closed on
    /// arrival.
    #[arg(long, default_value_t = 4096, value_parser = count_up_to::<MOST_CONNECTIONS>)]
    pub max_connections: usize,
    /// Of those, connections allowed at once to one client identity (one
    /// certificate's name), so that no one certificate holder can take
    /// every place; more are closed after their handshake [default: half
    /// of --max-connections].
    #[arg(long, value_parser = count_up_to::<MOST_CONNECTIONS>)]
    pub max_connections_per_identity: Option<usize>,
    /// TLS handshakes in progress allowed at once; beyond them, a new
    /// connection displaces the one that has waited longest once that one
    /// has waited a tenth of --handshake-timeout (at most 1s), and is
    /// refused before (so silent connections cannot keep certificate
    /// holders out, and a burst does not displace itself).
    #[arg(long, default_value_t = 256, value_parser = count_up_to::<MOST_HANDSHAKES>)]
    pub max_handshakes: usize,
    /// Ping each caller's HTTP/2 connection this often (`0s`: never), so
    /// that one whose peer vanished without closing it is noticed.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub caller_keepalive_interval: Duration,
    /// A caller that leaves a ping unanswered this long is disconnected.
    #[arg(long, value_parser = positive_duration, default_value = "10s")]
    pub caller_keepalive_timeout: Duration,
    /// Tell a caller's connection to go away (HTTP/2 GOAWAY) once it is
    /// this old, so that callers connect again and spread over servers or
    /// coordinators started since; its calls finish first (on the
    /// coordinator, within --drain-grace, at least 1 s) [default: no
    /// limit].
    #[arg(long, value_parser = positive_duration)]
    pub max_connection_age: Option<Duration>,
    /// Serve Prometheus metrics (/metrics), a status document (/status) and
    /// a status page (/) over plain HTTP on this address: PORT or :PORT for
    /// loopback, IP:PORT otherwise [default: off].
    #[arg(long, value_name = "ADDR", env = "SECUREMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Also require credentials (Basic or Bearer) from this file on every
    /// call; health and reflection stay open. A server exempts the calls
    /// the coordinator relays (it checks its own callers): give the
    /// coordinator the file too.
    #[arg(long, env = "SECUREMESH_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
}

impl ServeArgs {
    /// Reads the credentials file, if one is configured (at start and on
    /// every reload).
    pub fn load_credentials(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<securemesh_credentials::Credentials>>> {
        self.credentials
            .as_deref()
            .map(|path| {
                Ok(std::sync::Arc::new(
                    securemesh_credentials::Credentials::from_file(path)?,
                ))
            })
            .transpose()
    }

    /// `authorization`, requiring credentials too when a file is given.
    pub fn with_credentials(
        &self,
        authorization: securemesh_tls::Authorization,
    ) -> anyhow::Result<securemesh_tls::Authorization> {
        Ok(match self.load_credentials()? {
            Some(credentials) => authorization.with_credentials(credentials),
            None => authorization,
        })
    }

    pub fn options(&self) -> securemesh_tls::ServeOptions {
        securemesh_tls::ServeOptions {
            handshake_timeout: self.handshake_timeout,
            drain_delay: self.drain_delay,
            drain_grace: self.drain_grace,
            max_concurrent_streams: self.max_concurrent_streams,
            max_connections: self.max_connections,
            max_connections_per_identity: self
                .max_connections_per_identity
                .unwrap_or((self.max_connections / 2).max(1)),
            max_handshakes: self.max_handshakes,
            // Zero is read as no pings (ServeOptions::ping_interval).
            keepalive_interval: Some(self.caller_keepalive_interval),
            keepalive_timeout: self.caller_keepalive_timeout,
            max_connection_age: self.max_connection_age,
            // Each command says whose places are held.
            reserved_for: Vec::new(),
        }
    }
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Listen address.
    #[arg(
        long,
        env = "SECUREMESH_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:8000"
    )]
    pub listen: SocketAddr,
    /// A backend server URL; repeat for each [default, without --discovery:
    /// https://127.0.0.1:5001 and https://127.0.0.1:5002].
    #[arg(
        long = "backend",
        value_name = "URL",
        env = "SECUREMESH_BACKENDS",
        value_delimiter = ','
    )]
    pub backends: Vec<String>,
    /// Also follow the servers registered in etcd under a prefix:
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (prefix default
    /// /securemesh/dataservice).
    #[arg(long, value_name = "ETCD_URL", env = "SECUREMESH_DISCOVERY")]
    pub discovery: Option<securemesh_discovery::EtcdConfig>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Interval of health checks on each backend.
    #[arg(long, value_parser = positive_duration, default_value = "1s")]
    pub health_interval: Duration,
    /// Bound on one health check.
    #[arg(long, value_parser = positive_duration, default_value = "1s")]
    pub health_timeout: Duration,
    /// Bound on connecting to a backend.
    #[arg(long, value_parser = positive_duration, default_value = "2s")]
    pub connect_timeout: Duration,
    /// Bound on one attempt on one backend (the per-try timeout).
    #[arg(long, value_parser = positive_duration, default_value = "1s")]
    pub attempt_timeout: Duration,
    /// Bound on a whole call, retries included.
    #[arg(long, value_parser = positive_duration, default_value = "10s")]
    pub request_timeout: Duration,
    /// Retries of a call after its first attempt; a hedge spends one too
    /// (also bounded by a retry budget of 20% of calls).
    #[arg(long, default_value_t = 2)]
    pub max_retries: usize,
    /// An attempt that has not answered within this long gets a second one
    /// on another backend, from the same budget; the first answer wins
    /// (`off`: never).
    #[arg(long, value_name = "DURATION|off", value_parser = hedging_delay, default_value = "50ms")]
    pub hedge_after: HedgingDelay,
    /// Interval of HTTP/2 keepalive pings to backends.
    #[arg(long, value_parser = positive_duration, default_value = "5s")]
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long closes the connection.
    #[arg(long, value_parser = positive_duration, default_value = "2s")]
    pub keepalive_timeout: Duration,
    /// A client identity allowed to call; repeat for each [default: every
    /// client of the CA].
    #[arg(long = "allow", value_name = "ID", value_parser = caller_id)]
    pub allow: Vec<String>,
    /// Largest message accepted, in bytes (larger ones get OUT_OF_RANGE).
    #[arg(long, default_value_t = 65_536, value_parser = count_up_to::<MOST_MESSAGE_BYTES>)]
    pub max_message_size: usize,
    /// Failed calls in a row that eject a backend (at least 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub eject_after: u32,
    /// Length of a first ejection; the n-th in a row lasts n times as long.
    #[arg(long, value_parser = positive_duration, default_value = "1s")]
    pub ejection_time: Duration,
    /// Longest ejection.
    #[arg(long, value_parser = positive_duration, default_value = "30s")]
    pub max_ejection_time: Duration,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("load").args(["requests", "duration"]).multiple(true)))]
pub struct ClientArgs {
    /// Coordinator (or server) URL; repeat to balance and fail over between
    /// several coordinators.
    #[arg(
        long = "target",
        value_name = "URL",
        env = "SECUREMESH_TARGET",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:8000"
    )]
    pub targets: Vec<String>,
    /// User name for Basic credentials. Without any credentials on the
    /// command line, SECUREMESH_USER and SECUREMESH_PASSWORD, or
    /// SECUREMESH_TOKEN, are read instead (an exported variable never
    /// overrides a flag nor conflicts with one).
    #[arg(long, requires = "password")]
    pub user: Option<String>,
    /// Password for Basic credentials (prefer SECUREMESH_PASSWORD: a
    /// command line is visible to every local user).
    #[arg(long, requires = "user")]
    pub password: Option<String>,
    /// Bearer token (prefer SECUREMESH_TOKEN, as for --password).
    #[arg(long, conflicts_with = "user")]
    pub token: Option<String>,
    /// Time a call may take, retries included (sent as its deadline).
    #[arg(long, value_parser = positive_duration, default_value = "10s")]
    pub timeout: Duration,
    /// With several targets: a call one target has not answered within
    /// this long is sent to another too, and the first answer wins (`off`:
    /// never).
    #[arg(long, value_name = "DURATION|off", value_parser = hedging_delay, default_value = "250ms")]
    pub hedge_after: HedgingDelay,
    /// Name shown in output.
    #[arg(long, default_value = "Client1")]
    pub name: String,
    /// Certificate name in <certs> to authenticate with (client, client2,
    /// ...), instead of --cert and --key.
    #[arg(long, default_value = "client", conflicts_with_all = ["cert", "key"])]
    pub identity: String,
    /// Payload [default: "Sensitive data from <name>"].
    #[arg(long)]
    pub message: Option<String>,
    /// Fernet key file [default: <certs>/encryption_key.txt].
    #[arg(long, env = "SECUREMESH_ENCRYPTION_KEY")]
    pub encryption_key: Option<PathBuf>,
    /// Load mode: number of submissions [default with --duration: no
    /// limit].
    #[arg(long, value_parser = at_least_one)]
    pub requests: Option<usize>,
    /// Load mode: stop after this long (e.g. 10s).
    #[arg(long, value_parser = positive_duration)]
    pub duration: Option<Duration>,
    /// Load mode: submissions in flight at once [default: 8]; with
    /// --rate, the most allowed in flight [default: 1024], beyond which
    /// the schedule waits (and the wait counts in the latencies).
    #[arg(long, requires = "load", value_parser = count_up_to::<MOST_CONCURRENCY>)]
    pub concurrency: Option<usize>,
    /// Load mode: spread the submissions over this many connections (one
    /// client, HTTP/2 connection and balancer each), as ghz does.
    #[arg(long, requires = "load", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub connections: u16,
    /// Load mode, open loop: start this many submissions a second on a
    /// fixed schedule; latency counts from when each was due, so stalls
    /// are not hidden (coordinated omission).
    #[arg(long, requires = "load", value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Load mode: also count answers per time bucket of this width (e.g.
    /// 100ms, at least 1ms; the first 10,000 buckets), to watch a
    /// failover; printed as `timeline` with --json.
    #[arg(long, requires = "load", value_parser = timeline_bucket)]
    pub timeline: Option<Duration>,
    /// Print the outcome (the load summary, or the one call's answer) as
    /// one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// The credentials a client sends with every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCredentials {
    /// `authorization: Basic`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `authorization: Bearer`.
    Bearer(String),
}

impl ClientArgs {
    /// The credentials to send: those of the command line when any is
    /// given there (clap has checked that they go together); else those
    /// of `SECUREMESH_USER` with `SECUREMESH_PASSWORD`, or of
    /// `SECUREMESH_TOKEN`. A shell that exports one kind of credentials
    /// does not stand in the way of the other given as flags.
    pub fn credentials(&self) -> anyhow::Result<Option<ClientCredentials>> {
        self.credentials_with(|name| std::env::var_os(name))
    }

    fn credentials_with(
        &self,
        variable: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> anyhow::Result<Option<ClientCredentials>> {
        let from_flags = (self.user.clone(), self.password.clone(), self.token.clone());
        let (user, password, token) = if from_flags == (None, None, None) {
            let read = |name: &str| -> anyhow::Result<Option<String>> {
                match variable(name) {
                    None => Ok(None),
                    Some(value) if value.is_empty() => Ok(None),
                    Some(value) => value
                        .into_string()
                        .map(Some)
                        .map_err(|_| anyhow::anyhow!("{name} is not UTF-8")),
                }
            };
            let read = (
                read("SECUREMESH_USER")?,
                read("SECUREMESH_PASSWORD")?,
                read("SECUREMESH_TOKEN")?,
            );
            match &read {
                (Some(_), Some(_), Some(_)) => anyhow::bail!(
                    "SECUREMESH_USER and SECUREMESH_TOKEN are both set: unset one, or give \
                     credentials on the command line"
                ),
                (Some(_), None, _) => {
                    anyhow::bail!("SECUREMESH_USER is set without SECUREMESH_PASSWORD")
                }
                (None, Some(_), _) => {
                    anyhow::bail!("SECUREMESH_PASSWORD is set without SECUREMESH_USER")
                }
                _ => read,
            }
        } else {
            from_flags
        };
        Ok(match (user, password, token) {
            (Some(user), Some(password), _) => Some(ClientCredentials::Basic { user, password }),
            (_, _, Some(token)) => Some(ClientCredentials::Bearer(token)),
            _ => None,
        })
    }

    /// Submissions in flight at once in load mode: as given, or 8 for a
    /// closed loop and 1024 for an open one (`--rate`). An open loop
    /// capped low would measure its own cap: at 8 in flight, a route
    /// answering in 2 ms could not be asked for more than 4,000 calls a
    /// second.
    pub fn load_concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or(if self.rate.is_some() { 1024 } else { 8 })
    }
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// The plaintext; `-` reads it from standard input, exactly as sent
    /// (out of `ps` and the shell's history; `printf %s` sends no newline).
    pub message: String,
    /// Print the token as standard base64, as protobuf JSON (grpcurl -d)
    /// writes a `bytes` field.
    #[arg(long)]
    pub json_bytes: bool,
    /// Fernet key file [default: <certs>/encryption_key.txt].
    #[arg(long, env = "SECUREMESH_ENCRYPTION_KEY")]
    pub encryption_key: Option<PathBuf>,
    /// Directory of the default key file.
    #[arg(long, env = "SECUREMESH_CERTS", default_value = "certs")]
    pub certs: PathBuf,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// The Fernet token; `-` reads it from standard input.
    pub token: String,
    /// Fernet key file [default: <certs>/encryption_key.txt].
    #[arg(long, env = "SECUREMESH_ENCRYPTION_KEY")]
    pub encryption_key: Option<PathBuf>,
    /// Directory of the default key file.
    #[arg(long, env = "SECUREMESH_CERTS", default_value = "certs")]
    pub certs: PathBuf,
}

/// The Fernet key file: `explicit`, or `<certs>/encryption_key.txt`.
pub fn key_file(explicit: &Option<PathBuf>, certs: &std::path::Path) -> PathBuf {
    explicit
        .clone()
        .unwrap_or_else(|| certs.join("encryption_key.txt"))
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory of the certificates and key (created when missing).
    #[arg(long, env = "SECUREMESH_CERTS", default_value = "certs")]
    pub certs: PathBuf,
    /// Ports of the two servers.
    #[arg(long, value_delimiter = ',', default_value = "5001,5002")]
    pub server_ports: Vec<u16>,
    /// Port of the coordinator.
    #[arg(long, default_value_t = 8000)]
    pub coordinator_port: u16,
}

/// How long an attempt may take before it is hedged; `None`: never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgingDelay(pub Option<Duration>);

/// `off`, or a duration above zero (zero would send every call twice).
fn hedging_delay(text: &str) -> Result<HedgingDelay, String> {
    if text == "off" {
        return Ok(HedgingDelay(None));
    }
    match duration(text) {
        Ok(delay) if !delay.is_zero() => Ok(HedgingDelay(Some(delay))),
        Ok(_) => Err("a zero delay would send every call twice; say `off` to never hedge".into()),
        Err(error) => Err(format!("{error} (a duration such as 50ms, or `off`)")),
    }
}

/// The longest duration a flag takes: beyond any use, and short enough
/// that adding it to a clock reading cannot overflow (which panics).
const LONGEST_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A duration such as `100ms` or `5m`, up to a hundred years.
fn duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration <= LONGEST_DURATION => Ok(duration),
        Ok(_) => Err("must be at most 100 years".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// A token's greatest age: whole seconds, as Fernet timestamps are (a
/// fraction would be dropped, and `500ms` would refuse every token stamped
/// in an earlier second).
fn token_ttl(text: &str) -> Result<Duration, String> {
    let ttl = duration(text)?;
    if ttl.subsec_nanos() != 0 {
        return Err("Fernet timestamps are whole seconds: give whole seconds (0s: any age)".into());
    }
    Ok(ttl)
}

/// A duration above zero (e.g. `100ms`).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err("must be more than zero".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// A timeline bucket width: at least the shortest the load generator
/// keeps apart.
fn timeline_bucket(text: &str) -> Result<Duration, String> {
    let shortest = securemesh_client::load::SHORTEST_TIMELINE_BUCKET;
    match duration(text) {
        Ok(width) if width >= shortest => Ok(width),
        Ok(_) => Err(format!(
            "must be at least {}",
            humantime::format_duration(shortest)
        )),
        Err(error) => Err(error.to_string()),
    }
}

/// A count of at least one.
fn at_least_one(text: &str) -> Result<usize, String> {
    count_up_to::<{ usize::MAX }>(text)
}

/// The largest `--max-message-size`: 1 GiB (gRPC's default is 4 MiB).
const MOST_MESSAGE_BYTES: usize = 1 << 30;
/// The largest `--max-connections` (and per identity).
const MOST_CONNECTIONS: usize = 1_000_000;
/// The largest `--max-handshakes`.
const MOST_HANDSHAKES: usize = 65_536;
/// The largest load `--concurrency` (one task each).
const MOST_CONCURRENCY: usize = 100_000;

/// A count from 1 to `MOST`: a limit far beyond what any machine holds is
/// a typo, and some (a semaphore's permits) would end the process later.
fn count_up_to<const MOST: usize>(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(count) if count > MOST => Err(format!("must be at most {MOST}")),
        Ok(count) => Ok(count),
        Err(error) => Err(error.to_string()),
    }
}

/// A caller's identity for `--allow`: a SPIFFE ID as our certificates
/// carry it (`pki show` prints it), e.g. spiffe://securemesh/client/client2;
/// or, for a certificate without a URI SAN, its DNS name or common name (a
/// warning at start says so: a bare name is usually a mistake).
fn caller_id(text: &str) -> Result<String, String> {
    if let Some(rest) = text.strip_prefix("spiffe://") {
        if rest.contains('/') && !rest.ends_with('/') {
            return Ok(text.to_owned());
        }
        return Err("a SPIFFE ID has a trust domain and a path, such as \
             spiffe://securemesh/client/client2 (`securemesh pki show CERT` prints a \
             certificate's)"
            .to_owned());
    }
    if text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err("an identity is a SPIFFE ID such as spiffe://securemesh/client/client2".into());
    }
    Ok(text.to_owned())
}

/// A server's name for `--server-id`: short and printable, as it goes
/// into every reply and into its etcd key (coordinators ignore keys far
/// longer than a registration's).
fn server_id(text: &str) -> Result<String, String> {
    const MOST_BYTES: usize = 256;
    if text.is_empty() || text.len() > MOST_BYTES || text.chars().any(char::is_control) {
        return Err(format!(
            "a server id is 1 to {MOST_BYTES} bytes without control characters"
        ));
    }
    Ok(text.to_owned())
}

/// Warns about `--allow` values that are not SPIFFE IDs: they admit only a
/// certificate without a URI SAN, whose DNS name or common name they are.
pub fn warn_about_bare_identities(allowed: &[String]) {
    for id in allowed.iter().filter(|id| !id.starts_with("spiffe://")) {
        tracing::warn!(
            id,
            "--allow {id} is not a SPIFFE ID: it admits only a certificate without a URI SAN whose \
             DNS name or common name is {id}; certificates of `securemesh pki` are known as \
             spiffe://securemesh/client/NAME"
        );
    }
}

/// A rate of submissions a second: a finite number above zero.
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a positive number of submissions a second"
        )),
    }
}

/// An etcd lease's lifetime: whole seconds, at least one (etcd's unit).
fn lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = duration(text)?;
    if ttl.as_secs() == 0 || ttl.subsec_nanos() != 0 {
        return Err("etcd leases last whole seconds: give at least 1s".into());
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_global_option_has_an_environment_fallback() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let globals: Vec<_> = cli
            .get_arguments()
            .filter(|argument| argument.is_global_set() && argument.get_long().is_some())
            .collect();
        assert!(globals.len() >= 4);
        for argument in globals {
            let name = argument.get_long().unwrap_or_default();
            let env = argument.get_env().and_then(|env| env.to_str());
            let expected = format!("SECUREMESH_{}", name.to_uppercase().replace('-', "_"));
            assert_eq!(env, Some(expected.as_str()), "--{name}");
        }
    }

    #[test]
    fn server_ids_are_short_and_printable() {
        assert!(server_id("eu-west-1a/server-7").is_ok());
        for refused in [String::new(), "a\nb".to_owned(), "x".repeat(257)] {
            assert!(server_id(&refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn durations_past_a_hundred_years_and_token_ttls_in_fractions_are_refused() {
        assert!(duration("99years").is_ok());
        assert!(duration("101years").is_err());
        let client = |flag: &str, value: &str| {
            Cli::try_parse_from(["securemesh", "client", "--requests", "1", flag, value])
        };
        assert!(client("--timeout", "500000000000y").is_err());
        assert!(client("--duration", "500000000000y").is_err());
        assert!(client("--timeout", "1h").is_ok());
        assert_eq!(token_ttl("0s"), Ok(Duration::ZERO));
        assert_eq!(token_ttl("2m"), Ok(Duration::from_secs(120)));
        for refused in ["500ms", "1500ms", "1000000000000y"] {
            assert!(token_ttl(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn load_settings_come_with_a_load() {
        let client = |args: &[&str]| {
            let mut all = vec!["securemesh", "client"];
            all.extend(args);
            Cli::try_parse_from(all)
        };
        for setting in [
            ["--concurrency", "4"],
            ["--connections", "2"],
            ["--rate", "100"],
            ["--timeline", "100ms"],
        ] {
            assert!(client(&setting).is_err(), "{setting:?} alone");
            assert!(client(&[&setting[..], &["--requests", "9"]].concat()).is_ok());
            assert!(client(&[&setting[..], &["--duration", "1s"]].concat()).is_ok());
        }
        assert!(client(&["--json"]).is_ok());
    }

    #[test]
    fn a_lease_ttl_is_whole_seconds_and_at_least_one() {
        assert_eq!(lease_ttl("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(lease_ttl("1m"), Ok(Duration::from_secs(60)));
        for refused in ["0s", "500ms", "1500ms", "soon"] {
            assert!(lease_ttl(refused).is_err(), "{refused}");
        }
        let server = |ttl: &str| {
            Cli::try_parse_from([
                "securemesh",
                "server",
                "--register",
                "etcd://127.0.0.1:2379",
                "--register-ttl",
                ttl,
            ])
        };
        assert!(server("3s").is_ok());
        assert!(server("0s").is_err());
    }

    #[test]
    fn zero_timeouts_limits_and_counts_and_bare_names_are_refused() {
        let parse = |args: &[&str]| Cli::try_parse_from(["securemesh"].iter().chain(args));
        for refused in [
            &["coordinator", "--health-interval", "0s"][..],
            &["coordinator", "--health-timeout", "0s"],
            &["coordinator", "--attempt-timeout", "0s"],
            &["coordinator", "--request-timeout", "0s"],
            &["coordinator", "--keepalive-interval", "0s"],
            &["coordinator", "--handshake-timeout", "0s"],
            &["coordinator", "--max-concurrent-streams", "0"],
            &["coordinator", "--max-connections", "0"],
            &["coordinator", "--max-message-size", "0"],
            &["coordinator", "--allow", "spiffe://securemesh/"],
            &["coordinator", "--allow", ""],
            &["server", "--allow", "two words"],
            &["server", "--caller-keepalive-timeout", "0s"],
            &["client", "--timeout", "0s"],
            &["client", "--concurrency", "0"],
            &["client", "--requests", "0"],
            &["client", "--duration", "0s"],
        ] {
            assert!(parse(refused).is_err(), "{refused:?}");
        }
        for accepted in [
            &["coordinator", "--health-interval", "250ms"][..],
            &[
                "coordinator",
                "--allow",
                "spiffe://securemesh/client/client2",
            ],
            // A DNS name or common name (warned about at start).
            &["server", "--allow", "client.partner.example"],
            &["server", "--caller-keepalive-interval", "0s"],
            &["server", "--drain-delay", "0s", "--drain-grace", "0s"],
            &["client", "--requests", "1", "--concurrency", "1"],
        ] {
            assert!(parse(accepted).is_ok(), "{accepted:?}");
        }
    }

    /// `securemesh client ARGS`, parsed.
    fn client(args: &[&str]) -> ClientArgs {
        let Ok(Cli {
            command: Command::Client(client),
            ..
        }) = Cli::try_parse_from(["securemesh", "client"].iter().chain(args))
        else {
            panic!("{args:?} not parsed");
        };
        client
    }

    #[test]
    fn credentials_on_the_command_line_win_over_exported_ones() {
        fn exported<'a>(
            pairs: &'a [(&'a str, &'a str)],
        ) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |name| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| std::ffi::OsString::from(value))
            }
        }
        let basic = ClientCredentials::Basic {
            user: "alice".into(),
            password: "horse".into(),
        };
        let alice: &[(&str, &str)] = &[
            ("SECUREMESH_USER", "alice"),
            ("SECUREMESH_PASSWORD", "horse"),
        ];
        // Exported Basic credentials: used without flags, set aside by a
        // token given as a flag (clap refused that before).
        let plain = client(&[]);
        assert_eq!(
            plain.credentials_with(exported(alice)).unwrap(),
            Some(basic.clone())
        );
        let with_token = client(&["--token", "t0k"]);
        assert_eq!(
            with_token.credentials_with(exported(alice)).unwrap(),
            Some(ClientCredentials::Bearer("t0k".into()))
        );
        // An exported token gives way to a user and password as flags.
        let with_user = client(&["--user", "alice", "--password", "horse"]);
        assert_eq!(
            with_user
                .credentials_with(exported(&[("SECUREMESH_TOKEN", "t0k")]))
                .unwrap(),
            Some(basic)
        );
        assert_eq!(plain.credentials_with(exported(&[])).unwrap(), None);
        // Half-set or doubly set variables are refused, by name.
        for (pairs, named) in [
            (
                &[("SECUREMESH_PASSWORD", "horse")][..],
                "SECUREMESH_PASSWORD is set without",
            ),
            (
                &[("SECUREMESH_USER", "alice")][..],
                "SECUREMESH_USER is set without",
            ),
            (
                &[
                    ("SECUREMESH_USER", "alice"),
                    ("SECUREMESH_PASSWORD", "horse"),
                    ("SECUREMESH_TOKEN", "t0k"),
                ][..],
                "both set",
            ),
        ] {
            let refused = plain.credentials_with(exported(pairs)).unwrap_err();
            assert!(refused.to_string().contains(named), "{refused}");
        }
        // On the command line, clap still refuses what does not go
        // together.
        for refused in [
            &["--token", "t", "--user", "u", "--password", "p"][..],
            &["--password", "p"],
            &["--user", "u"],
        ] {
            assert!(
                Cli::try_parse_from(["securemesh", "client"].iter().chain(refused)).is_err(),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn an_open_loop_is_not_capped_at_a_closed_loops_concurrency() {
        let concurrency = |args: &[&str]| client(args).load_concurrency();
        assert_eq!(concurrency(&["--requests", "5"]), 8);
        assert_eq!(concurrency(&["--duration", "1s", "--rate", "100"]), 1024);
        assert_eq!(
            concurrency(&["--duration", "1s", "--rate", "100", "--concurrency", "3"]),
            3
        );
    }

    #[test]
    fn two_answers_to_one_question_are_refused_not_ranked() {
        let parse = |args: &[&str]| Cli::try_parse_from(["securemesh"].iter().chain(args));
        assert!(parse(&["server", "5003", "--listen", "127.0.0.1:5004"]).is_err());
        assert!(parse(&["server", "5003"]).is_ok());
        assert!(parse(&["server", "--listen", "127.0.0.1:5004"]).is_ok());
        assert!(parse(&["client", "--identity", "client2", "--cert", "a.pem"]).is_err());
        assert!(parse(&["client", "--cert", "a.pem", "--key", "a_key.pem"]).is_ok());
        // Each command has its own listen variable.
        let cli = <Cli as clap::CommandFactory>::command();
        let listen_env = |command: &str| {
            cli.find_subcommand(command)
                .and_then(|command| command.get_arguments().find(|a| a.get_id() == "listen"))
                .and_then(|listen| listen.get_env())
                .and_then(|env| env.to_str())
                .map(str::to_owned)
        };
        assert_eq!(
            listen_env("server").as_deref(),
            Some("SECUREMESH_SERVER_LISTEN")
        );
        assert_eq!(
            listen_env("coordinator").as_deref(),
            Some("SECUREMESH_COORDINATOR_LISTEN")
        );
    }

    #[test]
    fn a_backend_is_ejected_after_at_least_one_failure() {
        let coordinator =
            |extra: &[&str]| Cli::try_parse_from(["securemesh", "coordinator"].iter().chain(extra));
        assert!(coordinator(&["--eject-after", "3"]).is_ok());
        assert!(coordinator(&["--eject-after", "0"]).is_err());
    }

    #[test]
    fn limits_far_beyond_any_machine_are_refused_at_parse_time() {
        let parse = |args: &[&str]| Cli::try_parse_from(["securemesh"].iter().chain(args));
        for (command, flag, most) in [
            ("server", "--max-connections", MOST_CONNECTIONS),
            ("coordinator", "--max-connections", MOST_CONNECTIONS),
            (
                "coordinator",
                "--max-connections-per-identity",
                MOST_CONNECTIONS,
            ),
            ("server", "--max-handshakes", MOST_HANDSHAKES),
            ("server", "--max-message-size", MOST_MESSAGE_BYTES),
            ("coordinator", "--max-message-size", MOST_MESSAGE_BYTES),
        ] {
            let most = most.to_string();
            assert!(parse(&[command, flag, &most]).is_ok(), "{command} {flag}");
            let error = parse(&[command, flag, "3000000000000000000"]).unwrap_err();
            assert!(error.to_string().contains("must be at most"), "{error}");
        }
        let load = ["client", "--requests", "1", "--concurrency"];
        assert!(parse(&[&load[..], &["100000"]].concat()).is_ok());
        assert!(parse(&[&load[..], &["1000000000"]].concat()).is_err());
        assert!(parse(&["--stderr-backlog", "4000000000", "status"]).is_err());
        assert!(parse(&["--stderr-backlog", "1048576", "status"]).is_ok());
        assert!(parse(&["--threads", "65535", "status"]).is_err());
        assert!(parse(&["--threads", "1024", "status"]).is_ok());
    }

    #[test]
    fn threads_are_a_global_option_of_at_least_one() {
        let cli = Cli::try_parse_from(["securemesh", "coordinator", "--threads", "1"]).unwrap();
        assert_eq!(cli.threads, Some(1));
        let cli = Cli::try_parse_from(["securemesh", "--threads", "3", "status"]).unwrap();
        assert_eq!(cli.threads, Some(3));
        assert!(Cli::try_parse_from(["securemesh", "--threads", "0", "status"]).is_err());
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn a_maximum_connection_age_reaches_the_serve_options_and_is_off_by_default() {
        let serve = |extra: &[&str]| {
            let argv = ["securemesh", "coordinator"]
                .into_iter()
                .chain(extra.iter().copied());
            let Command::Coordinator(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not a coordinator");
            };
            args.serve.options()
        };
        assert_eq!(serve(&[]).max_connection_age, None);
        assert_eq!(
            serve(&["--max-connection-age", "5m"]).max_connection_age,
            Some(Duration::from_secs(300))
        );
        assert!(
            Cli::try_parse_from(["securemesh", "server", "--max-connection-age", "0s"]).is_err()
        );
    }

    #[test]
    fn etcd_flags_given_are_named() {
        let Command::Coordinator(args) = Cli::try_parse_from([
            "securemesh",
            "coordinator",
            "--etcd-ca",
            "certs/ca_cert.pem",
            "--etcd-user",
            "observer",
            "--etcd-password",
            "secret",
        ])
        .unwrap()
        .command
        else {
            panic!("not a coordinator");
        };
        assert_eq!(
            args.etcd.given(),
            ["--etcd-ca", "--etcd-user", "--etcd-password"]
        );
    }

    #[test]
    fn an_etcd_user_comes_with_a_password_and_the_password_is_not_shown() {
        let register = [
            "securemesh",
            "server",
            "--register",
            "etcd://127.0.0.1:2379",
        ];
        let with = |extra: &[&str]| Cli::try_parse_from(register.iter().chain(extra));
        assert!(with(&["--etcd-user", "registrar"]).is_err());
        assert!(with(&["--etcd-password", "secret"]).is_err());
        let cli = with(&[
            "--etcd-user",
            "registrar",
            "--etcd-password",
            "hunter2-secret",
        ])
        .unwrap();
        let Command::Server(args) = cli.command else {
            unreachable!("parsed another command")
        };
        let etcd = args
            .etcd
            .apply(args.register.clone().unwrap(), None)
            .unwrap();
        assert_eq!(
            etcd.auth.as_ref().map(|auth| auth.user.as_str()),
            Some("registrar")
        );
        assert!(!format!("{etcd:?} {etcd}").contains("hunter2-secret"));
    }

    #[test]
    fn the_timeline_bucket_is_a_duration_of_at_least_a_millisecond() {
        let timeline = |value: &str| {
            let argv = [
                "securemesh",
                "client",
                "--duration",
                "1s",
                "--timeline",
                value,
            ];
            match Cli::try_parse_from(argv).map(|cli| cli.command) {
                Ok(Command::Client(args)) => Ok(args.timeline),
                Ok(_) => unreachable!("parsed another command"),
                Err(error) => Err(error.to_string()),
            }
        };
        assert_eq!(timeline("100ms"), Ok(Some(Duration::from_millis(100))));
        assert!(timeline("0s").is_err_and(|error| error.contains("at least 1ms")));
        assert!(timeline("1ns").is_err_and(|error| error.contains("at least 1ms")));
        assert_eq!(timeline("1ms"), Ok(Some(Duration::from_millis(1))));
        assert!(timeline("soon").is_err());
    }

    #[test]
    fn the_hedging_delay_is_a_duration_above_zero_or_off() {
        let delay = |args: &[&str]| {
            let mut argv = vec!["securemesh", "coordinator"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).map(|cli| cli.command) {
                Ok(Command::Coordinator(args)) => Ok(args.hedge_after.0),
                Ok(_) => unreachable!("parsed another command"),
                Err(error) => Err(error.to_string()),
            }
        };
        assert_eq!(delay(&[]), Ok(Some(Duration::from_millis(50))));
        assert_eq!(
            delay(&["--hedge-after", "20ms"]),
            Ok(Some(Duration::from_millis(20)))
        );
        assert_eq!(delay(&["--hedge-after", "off"]), Ok(None));
        for refused in ["0s", "0ms", "soon", "-5ms"] {
            assert!(delay(&["--hedge-after", refused]).is_err(), "{refused}");
        }
        let client = Cli::try_parse_from(["securemesh", "client"]).map(|cli| cli.command);
        assert!(matches!(
            client,
            Ok(Command::Client(ClientArgs {
                hedge_after: HedgingDelay(Some(delay)),
                ..
            })) if delay == Duration::from_millis(250)
        ));
    }

    #[test]
    fn a_rate_must_be_a_positive_finite_number() {
        assert_eq!(positive_rate("2500"), Ok(2500.0));
        assert_eq!(positive_rate("0.5"), Ok(0.5));
        for refused in ["0", "-3", "inf", "NaN", "fast", ""] {
            assert!(positive_rate(refused).is_err(), "{refused} was accepted");
        }
        let refused =
            Cli::try_parse_from(["securemesh", "client", "--duration", "1s", "--rate", "0"]);
        assert!(refused.is_err());
    }
}
