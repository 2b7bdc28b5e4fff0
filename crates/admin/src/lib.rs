//! The admin listener of servers and coordinators, off unless
//! `--metrics-listen` is given, on loopback unless told otherwise:
//!
//! - `/metrics`: Prometheus text exposition of every series the process
//!   records (`securemesh_telemetry::metrics()`);
//! - `/status`: a [`StatusReport`] as JSON;
//! - `/`: the same as a small HTML page that refreshes itself and needs
//!   nothing from the network.
//!
//! [`fetch_status`] is the client side, for `securemesh status`.

mod client;
mod page;
mod report;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use securemesh::places::PlacesByKey;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub use client::{fetch, fetch_status, FetchError};
pub use report::{BackendStatus, StatusReport};

/// Why the admin listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is not `PORT`, `:PORT`, `IP:PORT` or `localhost:PORT`.
    #[error("{0:?} is not PORT, :PORT, IP:PORT or localhost:PORT (an http:// in front is fine)")]
    Address(String),
}

/// Produces the process's status on demand.
pub type StatusSource = Arc<dyn Fn() -> StatusReport + Send + Sync>;

/// `9100`, `:9100` and `localhost:9100` mean `127.0.0.1:9100`;
/// `0.0.0.0:9100` or any `IP:PORT` is taken as written. The URL a process
/// logs for its admin listener (`http://127.0.0.1:9100/`) is accepted too.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, AdminError> {
    let address = text.strip_prefix("http://").unwrap_or(text);
    let address = address.strip_suffix('/').unwrap_or(address);
    let port_only = address
        .strip_prefix(':')
        .or_else(|| address.strip_prefix("localhost:"))
        .unwrap_or(address);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    address
        .parse()
        .map_err(|_| AdminError::Address(text.to_owned()))
}

#[derive(Clone)]
struct Admin {
    status: StatusSource,
}

/// Admin connections served at once; more wait in the kernel's backlog.
/// Scrapers and a few people need a handful: a crowd of idle connections
/// must not take the file descriptors the service itself needs.
const MOST_CONNECTIONS: usize = 64;

/// Of those, connections one remote address may hold, so that one client
/// cannot take every place. (Not on loopback, where every local client,
/// scrapers and operators included, shares one address.)
const MOST_CONNECTIONS_PER_PEER: usize = MOST_CONNECTIONS / 4;

/// A request's headers must have arrived this long after its connection
/// opened (or its last answer), or the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection is closed this long after it opened, whatever it is doing:
/// a client that sends requests and never reads the answers stalls the
/// server's writes, which no header timeout notices, and would otherwise
/// keep its place for good. Scrapers and the status page reconnect.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Then the answer under way, if any, has this long to be written before
/// the connection is dropped.
const CLOSING_GRACE: Duration = Duration::from_secs(5);

/// How many admin connections are served at once and how long each may
/// take over what.
#[derive(Debug, Clone, Copy)]
struct Limits {
    most_connections: usize,
    most_connections_per_peer: usize,
    /// Whether loopback peers count against `most_connections_per_peer`
    /// too (for tests, which only have loopback addresses).
    per_peer_on_loopback: bool,
    header_read_timeout: Duration,
    connection_lifetime: Duration,
    closing_grace: Duration,
}

/// Serves `/metrics`, `/status` and `/` on `listener` until `shutdown`;
/// then each open connection finishes the answer under way (within
/// [`CLOSING_GRACE`]) and is closed, and this returns when all are.
///
/// At most [`MOST_CONNECTIONS`] at once ([`MOST_CONNECTIONS_PER_PEER`] from
/// one remote address; more are closed on arrival), each closed if a
/// request's headers take longer than [`HEADER_READ_TIMEOUT`], and in any
/// case after [`CONNECTION_LIFETIME`] (and [`CLOSING_GRACE`] for an answer
/// under way). A request from this host (over loopback, or to one of its
/// own addresses, whatever address the listener has: `0.0.0.0` takes them
/// all) must name this host (`Host: localhost:PORT`, a loopback address,
/// the host's name, or the address it was sent to), else it gets `421
/// Misdirected Request`: a web page the local browser loads from a name
/// of its own that resolves to this host (DNS rebinding) cannot read the
/// status.
pub async fn serve(
    listener: TcpListener,
    status: StatusSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits {
        most_connections: MOST_CONNECTIONS,
        most_connections_per_peer: MOST_CONNECTIONS_PER_PEER,
        per_peer_on_loopback: false,
        header_read_timeout: HEADER_READ_TIMEOUT,
        connection_lifetime: CONNECTION_LIFETIME,
        closing_grace: CLOSING_GRACE,
    };
    serve_within(listener, status, shutdown, limits).await
}

/// [`serve`] within `limits`.
async fn serve_within(
    listener: TcpListener,
    status: StatusSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    let routes = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .route("/", get(status_page))
        .with_state(Admin { status });
    let safety_headers = axum::middleware::map_response(with_safety_headers);
    // Outermost, so that a misdirected answer carries them too.
    let for_loopback_peers = routes
        .clone()
        .layer(axum::middleware::from_fn(only_loopback_hosts))
        .layer(safety_headers.clone());
    let app = routes.layer(safety_headers);
    let permits = Arc::new(Semaphore::new(limits.most_connections));
    let per_peer: PlacesByKey<IpAddr> = PlacesByKey::default();
    let (closing, closed) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap the connections that ended.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::debug!(%error, "admin listener: accepting failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let peer = peer.ip().to_canonical();
        let place = if peer.is_loopback() && !limits.per_peer_on_loopback {
            None
        } else {
            match per_peer.take(peer, limits.most_connections_per_peer) {
                Some(place) => Some(place),
                None => {
                    tracing::debug!(%peer, "admin connection refused: too many from this address");
                    continue;
                }
            }
        };
        let reached_at = stream
            .local_addr()
            .ok()
            .map(|local| local.ip().to_canonical());
        let from_this_host = peer.is_loopback() || reached_at == Some(peer);
        let app = if from_this_host {
            for_loopback_peers.clone()
        } else {
            app.clone()
        };
        let app = hyper_util::service::TowerToHyperService::new(app);
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                if let Some(address) = reached_at {
                    request.extensions_mut().insert(ReachedAt(address));
                }
                hyper::service::Service::call(&app, request)
            },
        );
        let mut closed = closed.clone();
        connections.spawn(async move {
            let _places = (permit, place);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = http.serve_connection(io, service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => Some(served),
                () = tokio::time::sleep(limits.connection_lifetime) => None,
                _ = closed.wait_for(|closing| *closing) => None,
            };
            let served = match served {
                Some(served) => Some(served),
                None => {
                    // No new request; the answer under way gets a moment.
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(limits.closing_grace, connection)
                        .await
                        .ok()
                }
            };
            match served {
                Some(Ok(())) => {}
                Some(Err(error)) => tracing::debug!(%error, "admin connection ended"),
                None => tracing::debug!("admin connection dropped: open too long"),
            }
        });
    }
    closing.send_replace(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The address of this host a connection was made to.
#[derive(Debug, Clone, Copy)]
struct ReachedAt(IpAddr);

/// Answers `421 Misdirected Request` to a request whose `Host` does not
/// name this host: a loopback name or address, the host's name, or the
/// address the request was sent to.
async fn only_loopback_hosts(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or_default();
    let reached_at = request.extensions().get::<ReachedAt>().map(|at| at.0);
    if is_loopback_host(host) || names_this_host(host, reached_at) {
        next.run(request).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "the admin listener answers requests for localhost, a loopback address, this \
             host's name or the address it was reached at only\n",
        )
            .into_response()
    }
}

/// Whether `host` (a `Host` header) is this machine's name, or the
/// address `reached_at` the request was sent to.
fn names_this_host(host: &str, reached_at: Option<IpAddr>) -> bool {
    let name = match host_of(host) {
        Some(HostPart::Ipv6(address)) => {
            return Some(IpAddr::V6(address).to_canonical()) == reached_at
        }
        Some(HostPart::Name(name)) => name,
        None => return false,
    };
    if let Ok(address) = name.parse::<IpAddr>() {
        return Some(address.to_canonical()) == reached_at;
    }
    static HOSTNAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOSTNAME
        .get_or_init(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|name| name.into_string().ok())
        })
        .as_deref()
        .is_some_and(|own| !own.is_empty() && own.eq_ignore_ascii_case(name))
}

/// What a `Host` header names, without its port.
enum HostPart<'a> {
    /// An IPv6 address, in brackets.
    Ipv6(std::net::Ipv6Addr),
    /// A name or an IPv4 address.
    Name(&'a str),
}

/// The host of `host` (a `Host` header: a name or address, and maybe a
/// port); `None` for brackets around no IPv6 address, or followed by
/// anything but a port.
fn host_of(host: &str) -> Option<HostPart<'_>> {
    match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, port)) if port.is_empty() || port.starts_with(':') => {
                inside.parse().ok().map(HostPart::Ipv6)
            }
            _ => None,
        },
        None => Some(HostPart::Name(
            host.rsplit_once(':').map_or(host, |(name, _port)| name),
        )),
    }
}

/// Whether `host` (a `Host` header: a name or address, and maybe a port)
/// is `localhost`, an address in 127.0.0.0/8, or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    match host_of(host) {
        Some(HostPart::Ipv6(address)) => address.is_loopback(),
        Some(HostPart::Name(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|address| address.is_loopback())
        }
        None => false,
    }
}

/// Headers on every answer: not to be cached (its numbers are of the
/// moment, and a shared cache would keep them for others), its content
/// type taken as given, and, for the page, nothing to load or run beyond
/// its own inline style (it has no script) and no framing by other sites.
async fn with_safety_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

async fn metrics_text() -> Response {
    match securemesh_telemetry::metrics().try_render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
                .into_response()
        }
    }
}

async fn status_json(State(admin): State<Admin>) -> Json<StatusReport> {
    Json((admin.status)())
}

async fn status_page(State(admin): State<Admin>) -> Html<String> {
    Html(page::render(&(admin.status)()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// `most_connections` (as many from one address), a header timeout of
    /// 300 ms and connections that live 1 s at most.
    fn limits(most_connections: usize) -> Limits {
        Limits {
            most_connections,
            most_connections_per_peer: most_connections,
            per_peer_on_loopback: false,
            header_read_timeout: Duration::from_millis(300),
            connection_lifetime: Duration::from_secs(1),
            closing_grace: Duration::from_millis(300),
        }
    }

    /// An admin listener on a free loopback port within
    /// [`limits`]`(most_connections)`.
    async fn admin(most_connections: usize) -> SocketAddr {
        admin_on(
            "127.0.0.1:0",
            limits(most_connections),
            std::future::pending(),
        )
        .await
        .0
    }

    /// An admin listener on `bind` within `limits`, until `shutdown`.
    async fn admin_on(
        bind: &str,
        limits: Limits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = TcpListener::bind(bind).await.unwrap();
        let address = listener.local_addr().unwrap();
        let status: StatusSource = Arc::new(report::tests::report);
        let serving = tokio::spawn(serve_within(listener, status, shutdown, limits));
        (address, serving)
    }

    /// A connection to `address` from the loopback address `from`.
    async fn connect_from(from: [u8; 4], address: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(address).await.unwrap()
    }

    /// Whether the server closes `connection` within `within`.
    async fn closed_within(connection: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(within, connection.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }

    /// The status line of the answer to `GET /status` with `host`.
    async fn status_line(address: SocketAddr, host: &str) -> String {
        let answer = answer_to(address, "/status", host).await;
        answer.lines().next().unwrap_or_default().to_owned()
    }

    /// The whole answer to `GET path` with `host`.
    async fn answer_to(address: SocketAddr, path: &str, host: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn answers_are_not_cached_sniffed_framed_or_given_scripts() {
        let address = admin(8).await;
        for (path, host, status) in [
            ("/", "localhost", "200 ok"),
            ("/status", "localhost", "200 ok"),
            ("/metrics", "localhost", "200 ok"),
            ("/nowhere", "localhost", "404 not found"),
            ("/", "attacker.example", "421 misdirected request"),
        ] {
            let answer = answer_to(address, path, host).await.to_ascii_lowercase();
            let (head, _) = answer.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("http/1.1 {status}")),
                "{path}: {head}"
            );
            for expected in [
                "cache-control: no-store",
                "x-content-type-options: nosniff",
                "content-security-policy: default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                "referrer-policy: no-referrer",
            ] {
                assert!(head.contains(expected), "{path}: {expected} missing in {head}");
            }
        }
    }

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for host in [
            "localhost",
            "LOCALHOST:9100",
            "127.0.0.1:9100",
            "127.1.2.3",
            "[::1]:9100",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example:9100",
            "localhost.evil.example",
            "10.0.0.1:9100",
            "[::2]:9100",
            "[::1]x",
            "[::1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn this_hosts_name_and_the_address_reached_are_this_host() {
        let own = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert!(names_this_host(&format!("{own}:9000"), None));
        let reached = Some(IpAddr::from([10, 1, 2, 3]));
        assert!(names_this_host("10.1.2.3:9000", reached));
        assert!(!names_this_host("10.1.2.4:9000", reached));
        assert!(names_this_host("[::ffff:10.1.2.3]:9000", reached));
        assert!(!names_this_host("evil.example:9000", reached));
    }

    #[tokio::test]
    async fn on_loopback_a_request_for_another_host_is_misdirected() {
        let address = admin(8).await;
        let port = address.port();
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            assert_eq!(status_line(address, &host).await, "HTTP/1.1 200 OK");
        }
        let rebound = status_line(address, &format!("attacker.example:{port}")).await;
        assert_eq!(rebound, "HTTP/1.1 421 Misdirected Request");
        // What securemesh status sends.
        fetch_status(address).await.unwrap();
    }

    /// A listener on every address takes loopback connections too: a
    /// request over loopback names a loopback host there as well.
    #[tokio::test]
    async fn on_every_address_a_loopback_request_for_another_host_is_misdirected() {
        let (bound, _serving) = admin_on("0.0.0.0:0", limits(8), std::future::pending()).await;
        let address = SocketAddr::from(([127, 0, 0, 1], bound.port()));
        let rebound = status_line(address, "attacker.example").await;
        assert_eq!(rebound, "HTTP/1.1 421 Misdirected Request");
        assert_eq!(status_line(address, "localhost").await, "HTTP/1.1 200 OK");
        // securemesh status, given the address the listener was given.
        fetch_status(bound).await.unwrap();
    }

    /// One remote address cannot take every place: its connections beyond
    /// its share are closed on arrival, and another address is still
    /// served. (Loopback addresses are one host and share no limit, so the
    /// test tells the listener that loopback is remote.)
    #[tokio::test]
    async fn one_address_holds_its_share_of_places_only() {
        let mut limits = limits(4);
        limits.most_connections_per_peer = 2;
        limits.per_peer_on_loopback = true;
        limits.header_read_timeout = Duration::from_secs(30);
        limits.connection_lifetime = Duration::from_secs(30);
        let (address, _serving) = admin_on("127.0.0.1:0", limits, std::future::pending()).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(connect_from([127, 0, 0, 2], address).await);
        }
        let mut third = connect_from([127, 0, 0, 2], address).await;
        assert!(closed_within(&mut third, Duration::from_secs(2)).await);
        let mut other = connect_from([127, 0, 0, 3], address).await;
        let request = "GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        other.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        other.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        // A place given back is taken again.
        drop(held.pop());
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut again = connect_from([127, 0, 0, 2], address).await;
                again.write_all(request.as_bytes()).await.unwrap();
                let mut answer = String::new();
                let _ = again.read_to_string(&mut answer).await;
                if answer.starts_with("HTTP/1.1 200 OK") {
                    break;
                }
            }
        })
        .await;
        assert!(answered.is_ok());
    }

    /// At shutdown, open connections are closed (an answer under way gets
    /// its grace) and serving ends only when they are.
    #[tokio::test]
    async fn shutdown_closes_open_connections_and_waits_for_them() {
        let mut limits = limits(4);
        limits.header_read_timeout = Duration::from_secs(30);
        limits.connection_lifetime = Duration::from_secs(30);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (address, serving) = admin_on("127.0.0.1:0", limits, async {
            let _ = stopped.await;
        })
        .await;
        let mut open = tokio::net::TcpStream::connect(address).await.unwrap();
        // Served once, then kept open.
        let request = "GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n";
        open.write_all(request.as_bytes()).await.unwrap();
        let mut first = [0u8; 15];
        open.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200 OK");
        drop(stop);
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        assert!(closed_within(&mut open, Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn silent_connections_are_closed_and_cannot_crowd_out_a_request() {
        let address = admin(2).await;
        let started = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        // Both places are taken: the request waits until the header timeout
        // closes the silent connections, then is answered.
        let answered =
            tokio::time::timeout(Duration::from_secs(5), status_line(address, "localhost")).await;
        assert_eq!(answered.as_deref(), Ok("HTTP/1.1 200 OK"));
        assert!(started.elapsed() >= Duration::from_millis(250));
        for mut connection in silent {
            let mut rest = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), connection.read_to_end(&mut rest))
                    .await;
            assert!(matches!(read, Ok(Ok(_))), "still open: {read:?}");
        }
    }

    #[tokio::test]
    async fn a_client_that_never_reads_its_answers_loses_its_place() {
        let address = admin(1).await;
        let mut greedy = tokio::net::TcpStream::connect(address).await.unwrap();
        // Far more answers than the socket buffers hold: the server's
        // writes stall while the header timeout sees requests arrive.
        let requests = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(20_000);
        let writer = tokio::spawn(async move {
            let _ = greedy.write_all(requests.as_bytes()).await;
            greedy
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answered =
            tokio::time::timeout(Duration::from_secs(5), status_line(address, "localhost")).await;
        assert_eq!(answered.as_deref(), Ok("HTTP/1.1 200 OK"));
        drop(writer.await);
    }

    #[test]
    fn a_port_alone_means_loopback() {
        for text in ["9100", ":9100"] {
            assert_eq!(
                parse_listen_address(text).unwrap(),
                SocketAddr::from(([127, 0, 0, 1], 9100))
            );
        }
        assert_eq!(
            parse_listen_address("0.0.0.0:9100").unwrap(),
            SocketAddr::from(([0, 0, 0, 0], 9100))
        );
        for logged in [
            "http://127.0.0.1:9100",
            "http://127.0.0.1:9100/",
            "localhost:9100",
        ] {
            assert_eq!(
                parse_listen_address(logged).unwrap(),
                SocketAddr::from(([127, 0, 0, 1], 9100)),
                "{logged}"
            );
        }
        for bad in [
            "",
            "example.org:9100",
            "99999",
            "127.0.0.1",
            "https://127.0.0.1:9100",
        ] {
            assert!(parse_listen_address(bad).is_err(), "{bad} was accepted");
        }
    }
}
