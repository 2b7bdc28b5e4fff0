//! End-to-end tests of the mesh, in process: real tonic servers and a real
//! coordinator on 127.0.0.1 with mutual TLS, certificates from our PKI.
//!
//! Each server runs in its own tokio runtime so that a test can kill it the
//! way a crash would: shutting the runtime down drops the listener and every
//! open connection at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use securemesh::v1::data_service_server::DataService;
use securemesh::v1::{SubmitReply, SubmitRequest};
use securemesh_client::Client;
use securemesh_coordinator::{BackendOptions, BalanceOptions, Coordinator};
use securemesh_crypto::KeyRing;
use securemesh_server::DataHandler;
use securemesh_tls::{Authorization, ReloadableConfig, ServeOptions, TlsFiles};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus as HealthStatus;

/// A PKI and a Fernet key in a temporary directory.
struct Material {
    dir: TempDir,
    keys: KeyRing,
}

impl Material {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        securemesh_pki::init(&securemesh_pki::InitOptions {
            days: 1,
            ..securemesh_pki::InitOptions::new(dir.path().to_path_buf())
        })
        .unwrap();
        let keys = KeyRing::from_key_strings(&[securemesh_crypto::generate_key()]).unwrap();
        Self { dir, keys }
    }

    fn files(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(self.dir.path(), name)
    }

    fn client(&self, target: &str, identity: &str) -> Client {
        let tls = securemesh_tls::client_tls_config(&self.files(identity)).unwrap();
        Client::new(
            &[target.to_owned()],
            tls,
            self.keys.clone(),
            Duration::from_secs(10),
        )
        .unwrap()
    }
}

/// A server in its own runtime.
struct TestServer {
    runtime: Option<tokio::runtime::Runtime>,
    address: SocketAddr,
}

impl TestServer {
    fn start(material: &Material, address: SocketAddr) -> Self {
        Self::start_with(material, address, |address| {
            DataHandler::new(material.keys.clone(), address.to_string(), false)
                .with_token_ttl(Some(Duration::from_secs(60)))
        })
    }

    /// A server running `make_service(its address)`.
    fn start_with<S: DataService>(
        material: &Material,
        address: SocketAddr,
        make_service: impl FnOnce(SocketAddr) -> S,
    ) -> Self {
        let listener = std::net::TcpListener::bind(address).unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let tls = securemesh_tls::server_config(&material.files("server"), None).unwrap();
        let handler = make_service(address);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            securemesh_tls::serve_mtls(
                listener,
                tls,
                securemesh_tls::authorized_data_service(
                    handler,
                    Authorization::server_default([]),
                    64 * 1024,
                ),
                ServeOptions::default(),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
        Self {
            runtime: Some(runtime),
            address,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    fn id(&self) -> String {
        self.address.to_string()
    }

    /// Stops the server as a crash would.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator in the test's runtime, stopped when dropped.
struct TestCoordinator {
    url: String,
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), securemesh_tls::ServeError>>>,
}

impl TestCoordinator {
    async fn start(material: &Material, backends: &[String]) -> Self {
        Self::start_with(material, backends, Authorization::any_identity()).await
    }

    async fn start_with(
        material: &Material,
        backends: &[String],
        authorization: Authorization,
    ) -> Self {
        let client_tls = securemesh_tls::client_tls_config(&material.files("coordinator")).unwrap();
        let mut options = BackendOptions::new(client_tls);
        options.health_interval = Duration::from_millis(200);
        options.health_timeout = Duration::from_millis(500);
        options.attempt_timeout = Duration::from_secs(2);
        let coordinator =
            Coordinator::new(options, BalanceOptions::default(), Duration::from_secs(10));
        for url in backends {
            coordinator.pool().add(url).unwrap();
        }
        Self::serve(
            material,
            coordinator,
            authorization,
            ServeOptions::default(),
        )
        .await
    }

    /// A coordinator with default settings over `backends`, served with
    /// `options`, admitting any client of the CA.
    async fn serve_over(material: &Material, backends: &[String], options: ServeOptions) -> Self {
        let coordinator = bare_coordinator(material);
        for url in backends {
            coordinator.pool().add(url).unwrap();
        }
        Self::serve(
            material,
            coordinator,
            Authorization::any_identity(),
            options,
        )
        .await
    }

    /// Serves `coordinator` on a free port of 127.0.0.1 with default
    /// options, admitting any client of the CA.
    async fn serve_open(material: &Material, coordinator: Coordinator) -> Self {
        Self::serve(
            material,
            coordinator,
            Authorization::any_identity(),
            ServeOptions::default(),
        )
        .await
    }

    /// Serves `coordinator` on a free port of 127.0.0.1 with `options`.
    async fn serve(
        material: &Material,
        coordinator: Coordinator,
        authorization: Authorization,
        options: ServeOptions,
    ) -> Self {
        let tls = securemesh_tls::server_tls(&material.files("coordinator"), None).unwrap();
        Self::serve_with_tls(tls.into(), coordinator, authorization, options).await
    }

    /// A coordinator without backends ([`bare_coordinator`]), admitting
    /// any client of the CA, served with `options`.
    async fn bare(material: &Material, options: ServeOptions) -> Self {
        Self::serve(
            material,
            bare_coordinator(material),
            Authorization::any_identity(),
            options,
        )
        .await
    }

    /// [`TestCoordinator::serve`] with `tls`.
    async fn serve_with_tls(
        tls: ReloadableConfig,
        coordinator: Coordinator,
        authorization: Authorization,
        options: ServeOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(securemesh_coordinator::serve(
            listener,
            tls,
            coordinator,
            authorization,
            64 * 1024,
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            url: format!("https://{address}"),
            address,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Sends the shutdown signal: the coordinator starts draining.
    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until serving has ended, at most `limit`.
    async fn stopped(&mut self, limit: Duration) -> Result<(), securemesh_tls::ServeError> {
        let served = self.served.take().expect("waited for twice");
        tokio::time::timeout(limit, served)
            .await
            .expect("the coordinator did not stop")
            .unwrap()
    }
}

/// A coordinator with default options and no backend yet.
fn bare_coordinator(material: &Material) -> Coordinator {
    let client_tls = securemesh_tls::client_tls_config(&material.files("coordinator")).unwrap();
    Coordinator::new(
        BackendOptions::new(client_tls),
        BalanceOptions::default(),
        Duration::from_secs(10),
    )
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn ready(material: &Material, url: &str) {
    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    securemesh_client::wait_until_serving(url, tls, Duration::from_secs(10))
        .await
        .unwrap();
}

/// A PKI, `N` servers and a coordinator in front of them, all serving, and
/// a client of the coordinator.
struct Mesh<const N: usize> {
    material: Material,
    servers: [TestServer; N],
    coordinator: TestCoordinator,
    client: Client,
}

impl<const N: usize> Mesh<N> {
    async fn start() -> Self {
        let material = Material::new();
        let servers = std::array::from_fn(|_| TestServer::start(&material, any_port()));
        let urls: Vec<String> = servers.iter().map(TestServer::url).collect();
        let coordinator = TestCoordinator::start(&material, &urls).await;
        ready(&material, &coordinator.url).await;
        let client = material.client(&coordinator.url, "client");
        Self {
            material,
            servers,
            coordinator,
            client,
        }
    }
}

/// Sends until a reply comes from `server_id`, within `limit`.
async fn until_served_by(client: &Client, server_id: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let reply = client.submit(b"probe").await.unwrap();
        if reply.server_id == server_id {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{server_id} got no traffic within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_the_coordinator_reach_both_servers() {
    let Mesh {
        material: _material,
        servers: [a, b],
        coordinator: _coordinator,
        client,
    } = Mesh::<2>::start().await;
    let reply = client.submit(b"hello through the mesh").await.unwrap();
    assert_eq!(reply.result, "ok");
    assert_eq!(
        reply.plaintext_sha256,
        securemesh_crypto::sha256(b"hello through the mesh")
    );

    // Concurrent load is spread over both.
    let options = securemesh_client::load::LoadOptions::closed(400, 16);
    let (summary, first_error) =
        securemesh_client::load::run(std::slice::from_ref(&client), &options).await;
    assert_eq!(summary.failed, 0, "{first_error:?}");
    assert_eq!(summary.ok, 400);
    let servers: Vec<_> = summary.servers.keys().cloned().collect();
    assert_eq!(
        servers,
        vec![a.id().min(b.id()), a.id().max(b.id())],
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_stream_costs_the_client_nothing() {
    let Mesh {
        material: _material,
        servers: [mut a, b],
        coordinator: _coordinator,
        client,
    } = Mesh::<2>::start().await;
    let completed = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let client = client.clone();
            let completed = completed.clone();
            tokio::spawn(async move {
                let mut served_by = Vec::new();
                for sequence in 0..60 {
                    let message = format!("worker {worker} message {sequence}");
                    let reply = client.submit(message.as_bytes()).await;
                    completed.fetch_add(1, Ordering::Relaxed);
                    served_by.push(
                        reply
                            .map(|reply| reply.server_id)
                            .map_err(|e| e.to_string()),
                    );
                }
                served_by
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(20);
    while completed.load(Ordering::Relaxed) < 120 {
        assert!(Instant::now() < deadline, "the load did not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill();
    let killed_at = completed.load(Ordering::Relaxed);

    let mut outcomes = Vec::new();
    let mut last_of_each_worker = Vec::new();
    for worker in workers {
        let served_by = worker.await.unwrap();
        last_of_each_worker.extend(served_by.last().cloned());
        outcomes.extend(served_by);
    }
    let failures: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures
    );
    assert_eq!(outcomes.len(), 480);
    assert!(killed_at < 480, "the kill came after the load had finished");
    assert_eq!(last_of_each_worker.len(), 8);
    assert!(
        last_of_each_worker
            .iter()
            .all(|o| o.as_ref().ok() == Some(&b.id())),
        "the last request of each worker did not go to the survivor: {last_of_each_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_that_comes_back_gets_traffic_again() {
    let Mesh {
        material,
        servers: [mut a, b],
        coordinator: _coordinator,
        client,
    } = Mesh::<2>::start().await;
    until_served_by(&client, &a.id(), Duration::from_secs(5)).await;

    let address = a.address;
    a.kill();
    for _ in 0..20 {
        assert_eq!(
            client.submit(b"while a is down").await.unwrap().server_id,
            b.id()
        );
    }

    let a = TestServer::start(&material, address);
    let waited = until_served_by(&client, &a.id(), Duration::from_secs(5)).await;
    assert!(
        waited < Duration::from_secs(2),
        "came back only after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_calls_fail_fast_and_recover() {
    let Mesh {
        material,
        servers: [mut a, mut b],
        coordinator: _coordinator,
        client,
    } = Mesh::<2>::start().await;
    client.submit(b"before").await.unwrap();

    let address = a.address;
    a.kill();
    b.kill();
    for _ in 0..10 {
        let started = Instant::now();
        let error = client.submit(b"nobody home").await.unwrap_err();
        match error {
            securemesh_client::ClientError::Status(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}")
            }
            other => panic!("unexpected {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "failing took {:?}",
            started.elapsed()
        );
    }

    let a = TestServer::start(&material, address);
    let started = Instant::now();
    loop {
        match client.submit(b"after").await {
            Ok(reply) => {
                assert_eq!(reply.server_id, a.id());
                break;
            }
            Err(error) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "no recovery: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_invalid_argument_through_the_coordinator() {
    let Mesh {
        material,
        servers: [a],
        coordinator: _coordinator,
        client,
    } = Mesh::<1>::start().await;

    let good = material.keys.encrypt(b"genuine");
    let mut tampered = good.clone();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let other_key = KeyRing::from_key_strings(&[securemesh_crypto::generate_key()])
        .unwrap()
        .encrypt(b"under another key");

    // The right length, but a two-byte character across the end of the
    // header (bytes 11 and 12).
    let mut not_ascii = good.clone();
    not_ascii.splice(11..13, "\u{e9}".bytes());

    let now = securemesh_crypto::unix_now();
    for (case, token) in [
        (
            "expired by the TTL",
            material.keys.encrypt_at_time(b"stale", now - 120),
        ),
        (
            "from the future",
            material.keys.encrypt_at_time(b"early", now + 600),
        ),
        ("tampered", tampered),
        ("another key", other_key),
        ("empty", Vec::new()),
        ("garbage", b"\x00\xffnot a token".to_vec()),
        ("not ASCII", not_ascii),
    ] {
        let status = client.submit_token(token).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().starts_with("invalid token"),
            "{case}: {status:?}"
        );
        assert!(
            !status.message().contains("genuine"),
            "{case}: plaintext leaked"
        );
    }
    // The refusals did not take the backend out of rotation.
    assert_eq!(
        client.submit(b"still fine").await.unwrap().server_id,
        a.id()
    );
}

/// Connects with rustls directly and reports how the server ended the
/// handshake: `Ok` if it accepted us, else the error text (e.g. the alert).
async fn raw_handshake(
    address: SocketAddr,
    ca: &Path,
    identity: Option<&TlsFiles>,
) -> Result<(), String> {
    raw_handshake_to(address, "localhost", ca, identity).await
}

/// [`raw_handshake`] expecting the server to be `server_name`.
async fn raw_handshake_to(
    address: SocketAddr,
    server_name: &str,
    ca: &Path,
    identity: Option<&TlsFiles>,
) -> Result<(), String> {
    open_tls(address, server_name, ca, identity).await.map(drop)
}

/// A TLS connection the server has accepted (it answered the HTTP/2
/// preface), or how it refused.
async fn open_tls(
    address: SocketAddr,
    server_name: &str,
    ca: &Path,
    identity: Option<&TlsFiles>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(files) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&files.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&files.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 servers judge the client certificate after the client's
    // Finished: the verdict arrives with the first read.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buffer = [0u8; 64];
    match tls.read(&mut buffer).await {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(tls),
        Err(error) => Err(error.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_without_a_valid_client_certificate_are_refused() {
    let Mesh {
        material,
        servers: [a],
        coordinator,
        client,
    } = Mesh::<1>::start().await;
    let stranger = Material::new(); // another CA, unknown to the mesh
    let coordinator_address = coordinator.address;
    let ca = material.dir.path().join("ca_cert.pem");

    for address in [a.address, coordinator_address] {
        let accepted = raw_handshake(address, &ca, Some(&material.files("client"))).await;
        assert_eq!(accepted, Ok(()), "a good client was refused by {address}");

        let no_certificate = raw_handshake(address, &ca, None).await.unwrap_err();
        assert!(
            no_certificate.contains("CertificateRequired"),
            "{address}: {no_certificate}"
        );

        let foreign = raw_handshake(address, &ca, Some(&stranger.files("client")))
            .await
            .unwrap_err();
        assert!(foreign.contains("UnknownCA"), "{address}: {foreign}");

        // A server certificate lacks clientAuth: not an identity for a client.
        let wrong_usage = raw_handshake(address, &ca, Some(&material.files("server")))
            .await
            .unwrap_err();
        assert!(wrong_usage.contains("alert"), "{address}: {wrong_usage}");
    }

    // Through gRPC, the refused handshake is a failed call, and a good
    // client is still served afterwards.
    let foreign_client = {
        let tls = securemesh_tls::client_tls_config(&TlsFiles {
            ca: material.files("client").ca,
            ..stranger.files("client")
        })
        .unwrap();
        Client::new(
            std::slice::from_ref(&coordinator.url),
            tls,
            material.keys.clone(),
            Duration::from_secs(10),
        )
        .unwrap()
    };
    match foreign_client.submit(b"let me in").await.unwrap_err() {
        securemesh_client::ClientError::Status(status) => {
            // The cause in the message depends on a race: the alert, or the
            // connection closing under the request.
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(client.submit(b"welcome").await.unwrap().result, "ok");
}

/// A backend whose every call fails with `code` (its health checks pass).
#[derive(Clone, Copy)]
struct AlwaysFailing(Code);

#[tonic::async_trait]
impl DataService for AlwaysFailing {
    async fn submit(
        &self,
        _request: tonic::Request<SubmitRequest>,
    ) -> Result<tonic::Response<SubmitReply>, tonic::Status> {
        Err(tonic::Status::new(self.0, "always failing"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_avoids_the_backend_its_call_failed_on_even_when_it_is_not_ejected() {
    every_call_is_retried_away_from(AlwaysFailing(Code::Unavailable)).await;
}

/// A tonic server answers CANCELLED when the grpc-timeout it was sent (the
/// per-try timeout) runs out, often just before the coordinator's own
/// timer: that is a failed attempt, retried, not the call's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_gives_up_on_a_call_before_the_callers_deadline_is_retried_away_from() {
    for code in [Code::Cancelled, Code::DeadlineExceeded] {
        every_call_is_retried_away_from(AlwaysFailing(code)).await;
    }
}

/// Through a coordinator over a good backend and `failing` (never
/// ejected), every call is answered by the good one.
async fn every_call_is_retried_away_from(failing: AlwaysFailing) {
    let material = Material::new();
    let good = TestServer::start(&material, any_port());
    let failing = TestServer::start_with(&material, any_port(), |_| failing);
    let client_tls = securemesh_tls::client_tls_config(&material.files("coordinator")).unwrap();
    let mut backends = BackendOptions::new(client_tls);
    // Failures never eject the failing backend: only avoiding it keeps a
    // call's one retry from going back to it.
    backends.ejection.consecutive_failures = u32::MAX;
    let balance = BalanceOptions {
        max_retries: 1,
        ..BalanceOptions::default()
    };
    let coordinator = Coordinator::new(backends, balance, Duration::from_secs(10));
    for url in [good.url(), failing.url()] {
        coordinator.pool().add(&url).unwrap();
    }
    let coordinator = TestCoordinator::serve_open(&material, coordinator).await;
    ready(&material, &coordinator.url).await;
    let client = material.client(&coordinator.url, "client");
    // About half the calls try the failing backend first: were a retry as
    // likely to go back to it, one in four calls would fail.
    for call in 0..40 {
        let reply = client.submit(b"retried").await;
        assert_eq!(reply.unwrap().server_id, good.id(), "call {call}");
    }
}

/// A backend that answers only after `delay`, and records the
/// `grpc-timeout` of every call it receives.
#[derive(Clone)]
struct SlowBackend {
    delay: Duration,
    seen_timeouts: Arc<std::sync::Mutex<Vec<String>>>,
    /// Calls being answered now (a call the coordinator gives up is
    /// dropped here when its stream is reset).
    answering: Arc<AtomicUsize>,
}

/// Counts a call in [`SlowBackend::answering`] while it lives.
struct Answering(Arc<AtomicUsize>);

impl Answering {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl DataService for SlowBackend {
    async fn submit(
        &self,
        request: tonic::Request<SubmitRequest>,
    ) -> Result<tonic::Response<SubmitReply>, tonic::Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        self.seen_timeouts.lock().unwrap().push(timeout);
        let _answering = Answering::new(&self.answering);
        tokio::time::sleep(self.delay).await;
        Ok(tonic::Response::new(SubmitReply::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_bounds_the_call_and_reaches_the_backend() {
    let material = Material::new();
    let seen_timeouts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let slow = SlowBackend {
        delay: Duration::from_secs(5),
        seen_timeouts: seen_timeouts.clone(),
        answering: Arc::default(),
    };
    let backend = TestServer::start_with(&material, any_port(), |_| slow);
    let coordinator = TestCoordinator::start(&material, &[backend.url()]).await;
    ready(&material, &coordinator.url).await;

    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    let deadline = Duration::from_millis(400);
    let client = Client::new(
        std::slice::from_ref(&coordinator.url),
        tls,
        material.keys.clone(),
        deadline,
    )
    .unwrap();
    let started = Instant::now();
    let status = client
        .submit_token(material.keys.encrypt(b"late"))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        waited >= Duration::from_millis(350),
        "gave up early: {waited:?}"
    );
    // Slack for a loaded machine; the per-try timeout (2 s) would be
    // well past it.
    assert!(
        waited < Duration::from_millis(1500),
        "waited {waited:?} past a {deadline:?} deadline"
    );

    // The backend was told the time that remained: under the client's
    // 400 ms, not the coordinator's 2 s per-try timeout (less what the
    // connections and handshakes took). (A timeout the coordinator sends
    // is in milliseconds or finer.)
    let seen = seen_timeouts.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "retried after a deadline: {seen:?}");
    let millis = seen[0]
        .strip_suffix('m')
        .and_then(|millis| millis.parse::<u64>().ok())
        .or_else(|| {
            seen[0]
                .strip_suffix('u')
                .and_then(|micros| micros.parse::<u64>().ok())
                .map(|micros| micros / 1000)
        })
        .unwrap_or_else(|| panic!("unexpected grpc-timeout {seen:?}"));
    assert!(
        (100..400).contains(&millis),
        "backend was given {millis} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_admit_only_the_coordinator_and_health_stays_open() {
    let Mesh {
        material,
        servers: [a],
        coordinator: _coordinator,
        client,
    } = Mesh::<1>::start().await;
    assert_eq!(
        client
            .submit(b"through the coordinator")
            .await
            .unwrap()
            .server_id,
        a.id()
    );

    // A client certificate alone does not get past a server...
    let direct = material.client(&a.url(), "client");
    match direct
        .submit(b"bypassing the coordinator")
        .await
        .unwrap_err()
    {
        securemesh_client::ClientError::Status(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains(CLIENT_IDENTITY), "{status:?}");
        }
        other => panic!("unexpected {other}"),
    }
    // ...but its health checks answer any certificate of the CA.
    ready(&material, &a.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_allow_list_refuses_other_clients() {
    let material = Material::new();
    let a = TestServer::start(&material, any_port());
    let coordinator = TestCoordinator::start_with(
        &material,
        &[a.url()],
        Authorization::only([CLIENT_IDENTITY.to_owned()]),
    )
    .await;
    ready(&material, &coordinator.url).await;
    assert!(material
        .client(&coordinator.url, "client")
        .submit(b"ok")
        .await
        .is_ok());
    match material
        .client(&coordinator.url, "client2")
        .submit(b"not me")
        .await
        .unwrap_err()
    {
        securemesh_client::ClientError::Status(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("client/client2"), "{status:?}");
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_and_the_mesh_keeps_serving() {
    let Mesh {
        material,
        servers: [a],
        coordinator: _coordinator,
        client,
    } = Mesh::<1>::start().await;
    let huge = material.keys.encrypt(&vec![b'x'; 100 * 1024]);
    let status = client.submit_token(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(client.submit(b"small").await.unwrap().server_id, a.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_when_configured() {
    let material = Material::new();
    let file = material.dir.path().join("credentials.txt");
    securemesh_credentials::add_user(&file, "alice", "correct horse").unwrap();
    let token = securemesh_credentials::add_token(&file, "ci-bot").unwrap();
    let credentials = Arc::new(securemesh_credentials::Credentials::from_file(&file).unwrap());
    let a = TestServer::start(&material, any_port());
    let coordinator = TestCoordinator::start_with(
        &material,
        &[a.url()],
        Authorization::any_identity().with_credentials(credentials),
    )
    .await;
    // Health needs no credentials.
    ready(&material, &coordinator.url).await;
    let client = |authorization: Option<String>| {
        material
            .client(&coordinator.url, "client")
            .with_authorization(authorization)
    };
    for (case, authorization) in [
        ("missing", None),
        (
            "wrong password",
            Some(securemesh_credentials::basic_header("alice", "wrong horse")),
        ),
        (
            "unknown user",
            Some(securemesh_credentials::basic_header(
                "mallory",
                "correct horse",
            )),
        ),
        (
            "forged token",
            Some(securemesh_credentials::bearer_header("forged")),
        ),
        ("malformed", Some("Basic !!!".to_owned())),
    ] {
        let status = client(authorization)
            .submit_token(material.keys.encrypt(b"x"))
            .await;
        let status = status.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert!(!status.message().contains("horse"), "{case}: {status:?}");
    }
    for authorization in [
        securemesh_credentials::basic_header("alice", "correct horse"),
        securemesh_credentials::bearer_header(&token),
    ] {
        let reply = client(Some(authorization))
            .submit(b"with credentials")
            .await;
        assert_eq!(reply.unwrap().server_id, a.id());
    }
}

/// A password check (argon2, tens of milliseconds) that outlasts the
/// caller's deadline answers DEADLINE_EXCEEDED when the deadline passes,
/// not the check's verdict afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_bounds_its_password_check() {
    let material = Material::new();
    let (_server, coordinator) = coordinator_admitting_alice(&material).await;
    let session = h2_session(&material, coordinator.address).await;
    let message = SubmitRequest {
        token: material.keys.encrypt(b"late").into(),
    }
    .encode_to_vec();
    let wrong = securemesh_credentials::basic_header("alice", "wrong horse");
    let call = frame(false, message.len() as u32, &message);
    // Raw HTTP/2: a gRPC client would give up by itself at its deadline.
    let (_, code, _) = raw_h2_exchange(
        &session,
        &[("authorization", &wrong), ("grpc-timeout", "3m")],
        &call,
    )
    .await;
    assert_eq!(code, Some(Code::DeadlineExceeded));
    // With time for the check, its verdict stands.
    let (_, code, _) = raw_h2_exchange(
        &session,
        &[("authorization", &wrong), ("grpc-timeout", "5S")],
        &call,
    )
    .await;
    assert_eq!(code, Some(Code::Unauthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_is_refused_fast_and_the_right_one_still_passes() {
    let material = Material::new();
    let (a, coordinator) = coordinator_admitting_alice(&material).await;
    let alice = flood_with_wrong_passwords(&material, &coordinator.url).await;
    assert_eq!(
        alice.submit(b"after the flood").await.unwrap().server_id,
        a.id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_too_checks_the_passwords_of_one_connection_at_once() {
    let material = Material::new();
    let (address, _stop) = echo_server_admitting_alice(&material).await;
    let alice = flood_with_wrong_passwords(&material, &format!("https://{address}")).await;
    let reply = alice
        .submit_token(material.keys.encrypt(b"after the flood"))
        .await;
    assert_eq!(reply.unwrap().result, CLIENT_IDENTITY);
}

/// A client's first calls all at once, with a password the coordinator or
/// server has not verified yet, all pass: they share one password check
/// instead of each wanting a place among the few checks allowed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_calls_with_a_password_all_pass() {
    let (through_coordinator, direct) = (Material::new(), Material::new());
    let (_server, coordinator) = coordinator_admitting_alice(&through_coordinator).await;
    let (address, _stop) = echo_server_admitting_alice(&direct).await;
    for (material, url) in [
        (&through_coordinator, coordinator.url.clone()),
        (&direct, format!("https://{address}")),
    ] {
        let alice = material.client(&url, "client").with_authorization(Some(
            securemesh_credentials::basic_header("alice", "correct horse"),
        ));
        let calls = (0..16).map(|_| {
            let (alice, token) = (alice.clone(), material.keys.encrypt(b"first"));
            async move { alice.submit_token(token).await.map(|_| ()) }
        });
        let outcomes = futures_util::future::join_all(calls).await;
        assert!(outcomes.iter().all(Result::is_ok), "{url}: {outcomes:?}");
    }
}

/// The identity of the client certificate.
const CLIENT_IDENTITY: &str = "spiffe://securemesh/client/client";

/// A [`CallerEcho`] server that also admits the client directly, given
/// alice's credentials; it stops when the returned sender is dropped.
async fn echo_server_admitting_alice(material: &Material) -> (SocketAddr, oneshot::Sender<()>) {
    let authorization = Authorization::server_default([CLIENT_IDENTITY.to_owned()])
        .with_credentials(alice_credentials(material));
    serve_authorized(
        server_tls(material),
        CallerEcho,
        authorization,
        64 * 1024,
        ServeOptions::default(),
    )
    .await
}

/// A credentials file with the user alice, password "correct horse".
/// A server and, ready in front of it, a coordinator that requires
/// alice's password ("correct horse").
async fn coordinator_admitting_alice(material: &Material) -> (TestServer, TestCoordinator) {
    let server = TestServer::start(material, any_port());
    let coordinator = TestCoordinator::start_with(
        material,
        &[server.url()],
        Authorization::any_identity().with_credentials(alice_credentials(material)),
    )
    .await;
    ready(material, &coordinator.url).await;
    (server, coordinator)
}

fn alice_credentials(material: &Material) -> Arc<securemesh_credentials::Credentials> {
    let file = material.dir.path().join("credentials.txt");
    securemesh_credentials::add_user(&file, "alice", "correct horse").unwrap();
    Arc::new(securemesh_credentials::Credentials::from_file(&file).unwrap())
}

/// Sends 32 wrong passwords for alice at once on one connection to `url`
/// and checks that most are refused as busy: they are hashed off that
/// connection's task, so they wait for the hashing together instead of
/// being checked one after another (with nobody ever waiting). Returns a
/// client on the same connection with alice's right password.
async fn flood_with_wrong_passwords(material: &Material, url: &str) -> Client {
    let connection = material.client(url, "client");
    let opened = connection.submit_token(material.keys.encrypt(b"x")).await;
    assert_eq!(opened.unwrap_err().code(), Code::Unauthenticated);
    let guesses = (0..32).map(|attempt| {
        let client =
            connection
                .clone()
                .with_authorization(Some(securemesh_credentials::basic_header(
                    "alice",
                    &format!("guess {attempt}"),
                )));
        let token = material.keys.encrypt(b"x");
        async move { client.submit_token(token).await.unwrap_err().code() }
    });
    let codes = futures_util::future::join_all(guesses).await;
    let busy = codes
        .iter()
        .filter(|code| **code == Code::ResourceExhausted)
        .count();
    let wrong = codes
        .iter()
        .filter(|code| **code == Code::Unauthenticated)
        .count();
    assert_eq!(busy + wrong, codes.len(), "{codes:?}");
    assert!(busy >= 8 && wrong >= 1, "{codes:?}");
    connection.with_authorization(Some(securemesh_credentials::basic_header(
        "alice",
        "correct horse",
    )))
}

/// A gRPC codec that sends and receives raw bytes, to send what a
/// well-behaved stub never would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `path` on `url` with `body` as the raw message.
async fn raw_call(
    material: &Material,
    url: &str,
    path: &'static str,
    body: Vec<u8>,
) -> tonic::Status {
    let tls = securemesh_tls::client_tls_config(&material.files("coordinator")).unwrap();
    let channel = tls
        .apply(tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .unwrap_err()
}

/// Sends `bytes` on a plain TCP connection and reports whether the server
/// closed it within two seconds (rather than leaving it hanging).
async fn closes_on(address: SocketAddr, bytes: &[u8]) -> bool {
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut buffer = [0u8; 256];
    let read = async {
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_matrix_holds_at_server_and_coordinator() {
    use time::{Duration as Span, OffsetDateTime};

    let Mesh {
        material,
        servers: [a],
        coordinator,
        client,
    } = Mesh::<1>::start().await;
    let coordinator_address = coordinator.address;
    let ca = material.dir.path().join("ca_cert.pem");

    // Client certificates outside their validity, from our own CA.
    let authority = securemesh_pki::Authority::from_pem(
        &std::fs::read_to_string(&ca).unwrap(),
        &std::fs::read_to_string(material.dir.path().join("ca_key.pem")).unwrap(),
    )
    .unwrap();
    let now = OffsetDateTime::now_utc();
    for (name, from, until) in [
        ("expired", now - Span::days(10), now - Span::days(1)),
        ("future", now + Span::days(1), now + Span::days(10)),
    ] {
        let issued = authority
            .issue_valid_between(name, securemesh_pki::Role::Client, &[], from, until)
            .unwrap();
        let files = material.files(name);
        std::fs::write(&files.cert, issued.cert_pem).unwrap();
        std::fs::write(&files.key, issued.key_pem).unwrap();
    }

    for (address, url) in [
        (a.address, a.url()),
        (coordinator_address, coordinator.url.clone()),
    ] {
        let expired = raw_handshake(address, &ca, Some(&material.files("expired"))).await;
        assert!(
            expired.clone().unwrap_err().contains("Expired"),
            "{address}: {expired:?}"
        );
        let future = raw_handshake(address, &ca, Some(&material.files("future"))).await;
        // TLS has no "not yet valid" alert: rustls sends CertificateExpired.
        assert!(
            future.clone().unwrap_err().contains("CertificateExpired"),
            "{address}: {future:?}"
        );

        // The client refuses a server whose certificate is not for the
        // name it dialled.
        let misnamed = raw_handshake_to(
            address,
            "not-this-server.example",
            &ca,
            Some(&material.files("coordinator")),
        )
        .await;
        assert!(
            misnamed.clone().unwrap_err().contains("not valid for name"),
            "{misnamed:?}"
        );

        // Not TLS at all: the connection is closed, nothing hangs.
        assert!(
            closes_on(address, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await,
            "{address}"
        );
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        assert!(closes_on(address, &noise).await, "{address}");

        // Well-formed gRPC, bad content.
        let malformed = raw_call(
            &material,
            &url,
            "/securemesh.v1.DataService/Submit",
            vec![
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        )
        .await;
        assert_eq!(malformed.code(), Code::Internal, "{url}: {malformed:?}");
        let unknown = raw_call(&material, &url, "/securemesh.v1.DataService/Delete", vec![]).await;
        assert_eq!(unknown.code(), Code::Unimplemented, "{url}: {unknown:?}");
        let unknown = raw_call(&material, &url, "/nope.v1.Nothing/Here", vec![]).await;
        assert_eq!(unknown.code(), Code::Unimplemented, "{url}: {unknown:?}");
    }

    // Nothing of that disturbed the mesh.
    assert_eq!(
        client.submit(b"still serving").await.unwrap().server_id,
        a.id()
    );
}

/// A server answering as `server_id` (messages up to `max_message_bytes`,
/// any identity allowed) with `options`, in this runtime, on a free port;
/// it stops when the returned sender is dropped.
async fn serve_with_options(
    material: &Material,
    server_id: &str,
    max_message_bytes: usize,
    options: ServeOptions,
) -> (SocketAddr, oneshot::Sender<()>) {
    let handler = DataHandler::new(material.keys.clone(), server_id, false);
    serve_authorized(
        server_tls(material),
        handler,
        Authorization::any_identity(),
        max_message_bytes,
        options,
    )
    .await
}

/// The server certificate's configuration, without a CRL.
fn server_tls(material: &Material) -> ReloadableConfig {
    securemesh_tls::server_tls(&material.files("server"), None)
        .unwrap()
        .into()
}

/// `service` behind `authorization` with `tls`, served in this runtime on
/// a free port; it stops when the returned sender is dropped.
async fn serve_authorized<S: DataService>(
    tls: ReloadableConfig,
    service: S,
    authorization: Authorization,
    max_message_bytes: usize,
    options: ServeOptions,
) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service =
        securemesh_tls::authorized_data_service(service, authorization, max_message_bytes);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(securemesh_tls::serve_mtls(
        listener,
        tls,
        service,
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    (address, stop)
}

/// Answers every call with the caller it was given (`Caller::origin`) as
/// its `result`.
struct CallerEcho;

#[tonic::async_trait]
impl DataService for CallerEcho {
    async fn submit(
        &self,
        request: tonic::Request<SubmitRequest>,
    ) -> Result<tonic::Response<SubmitReply>, tonic::Status> {
        let caller = request
            .extensions()
            .get::<securemesh_tls::Caller>()
            .map(|caller| caller.origin().to_owned())
            .unwrap_or_default();
        Ok(tonic::Response::new(SubmitReply {
            result: caller,
            ..SubmitReply::default()
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_speak_for_another_or_skip_credentials_by_claiming_a_caller() {
    let material = Material::new();
    let (address, _stop) = echo_server_admitting_alice(&material).await;
    let session = h2_session(&material, address).await;
    let message = SubmitRequest {
        token: material.keys.encrypt(b"who am I").into(),
    }
    .encode_to_vec();
    let call = frame(false, message.len() as u32, &message);
    let alice = securemesh_credentials::basic_header("alice", "correct horse");

    let warnings = capture_warnings();
    // The last claim dresses up as more fields of the log line.
    let dressed_up = "spiffe://securemesh/client/mallory\" status=OK";
    // The warning about an ignored claim is let through once a second (per
    // server), so the claim to look for in the log comes first.
    for claimed in [
        dressed_up,
        "spiffe://securemesh/client/mallory",
        securemesh_tls::COORDINATOR_IDENTITY,
    ] {
        // The claim does not make the client a forwarder, so it does not
        // spare the client its credentials...
        let (_, code, _) =
            raw_h2_exchange(&session, &[(securemesh_tls::CALLER_HEADER, claimed)], &call).await;
        assert_eq!(code, Some(Code::Unauthenticated), "claiming {claimed}");
        // ...and with them, the server still sees the client itself.
        let (_, code, reply) = raw_h2_exchange(
            &session,
            &[
                (securemesh_tls::CALLER_HEADER, claimed),
                ("authorization", &alice),
            ],
            &call,
        )
        .await;
        assert_eq!(code, Some(Code::Ok), "claiming {claimed}");
        let reply = SubmitReply::decode(&reply[5..]).unwrap();
        assert_eq!(reply.result, CLIENT_IDENTITY, "claiming {claimed}");
    }
    // The claim is logged quoted, its quote escaped: it cannot pass for
    // a field of the line.
    let logged = warnings.text();
    assert!(
        logged.contains(r#"claimed="spiffe://securemesh/client/mallory\" status=OK""#),
        "{logged}"
    );
}

/// A server reads the caller its forwarder names back as it was, whatever
/// its characters (the coordinator percent-encodes it), and refuses a call
/// whose caller it cannot read instead of taking it for the forwarder's
/// own. A client's claim to the coordinator stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_caller_arrives_as_it_was_or_the_call_is_refused() {
    let material = Material::new();
    let (address, _stop) = echo_server_admitting_alice(&material).await;
    let message = SubmitRequest {
        token: material.keys.encrypt(b"who am I").into(),
    }
    .encode_to_vec();
    let call = frame(false, message.len() as u32, &message);

    let tls = try_tls_as(&material, address, "coordinator").await.unwrap();
    let (as_coordinator, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    for identity in [
        "Zoë",
        "spiffe://securemesh/client/a%20b",
        "line\nbreak\u{7f} and space",
        CLIENT_IDENTITY,
    ] {
        let encoded = securemesh_tls::encode_caller(identity);
        let (_, code, reply) = raw_h2_exchange(
            &as_coordinator,
            &[(securemesh_tls::CALLER_HEADER, &encoded)],
            &call,
        )
        .await;
        assert_eq!(code, Some(Code::Ok), "{identity:?} as {encoded}");
        let reply = SubmitReply::decode(&reply[5..]).unwrap();
        assert_eq!(reply.result, identity);
    }
    for unreadable in ["Zoë", "%FF", "a%2", "two words"] {
        let (_, code, _) = raw_h2_exchange(
            &as_coordinator,
            &[(securemesh_tls::CALLER_HEADER, unreadable)],
            &call,
        )
        .await;
        assert_eq!(code, Some(Code::InvalidArgument), "{unreadable:?}");
    }

    // Through a coordinator, a client that claims to be the coordinator
    // (or anyone) is still itself at the server.
    let coordinator = TestCoordinator::start_with(
        &material,
        &[format!("https://{address}")],
        Authorization::any_identity(),
    )
    .await;
    ready(&material, &coordinator.url).await;
    let session = h2_session(&material, coordinator.address).await;
    for claimed in [securemesh_tls::COORDINATOR_IDENTITY, "Zo%C3%AB"] {
        let (_, code, reply) =
            raw_h2_exchange(&session, &[(securemesh_tls::CALLER_HEADER, claimed)], &call).await;
        assert_eq!(code, Some(Code::Ok), "claiming {claimed}");
        let reply = SubmitReply::decode(&reply[5..]).unwrap();
        assert_eq!(reply.result, CLIENT_IDENTITY, "claiming {claimed}");
    }
}

/// What the tracing events of this test binary at WARN and above said, as
/// plain text (installed once, for the whole binary).
struct CapturedWarnings(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedWarnings {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn capture_warnings() -> CapturedWarnings {
    static BUFFER: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    let buffer = BUFFER
        .get_or_init(|| {
            let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
            let writer = buffer.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || CaptureWriter(writer.clone()))
                .init();
            buffer
        })
        .clone();
    CapturedWarnings(buffer)
}

struct CaptureWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holder_cannot_take_every_connection() {
    let material = Material::new();
    let (address, _stop) = serve_with_options(
        &material,
        "shared",
        1024,
        ServeOptions {
            max_connections: 8,
            max_connections_per_identity: 2,
            ..ServeOptions::default()
        },
    )
    .await;
    let ca = material.dir.path().join("ca_cert.pem");
    let (client, client2) = (material.files("client"), material.files("client2"));
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            open_tls(address, "localhost", &ca, Some(&client))
                .await
                .unwrap(),
        );
    }
    let third = open_tls(address, "localhost", &ca, Some(&client)).await;
    assert!(
        third.is_err(),
        "a third connection of one identity was kept"
    );
    // Another identity still gets in, and the first gets a place back when
    // one of its connections closes.
    held.push(
        open_tls(address, "localhost", &ca, Some(&client2))
            .await
            .unwrap(),
    );
    held.remove(0);
    until_tls_as(&material, address, &client).await;
}

/// A quarter of a server's connections is held for its allowed callers:
/// other certificate holders together take at most the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_certificate_holders_cannot_take_the_places_held_for_allowed_callers() {
    let material = Material::new();
    let (address, _stop) = serve_with_options(
        &material,
        "reserved",
        1024,
        ServeOptions {
            max_connections: 8,
            max_connections_per_identity: 8,
            reserved_for: vec![securemesh_tls::COORDINATOR_IDENTITY.to_owned()],
            ..ServeOptions::default()
        },
    )
    .await;
    let ca = material.dir.path().join("ca_cert.pem");
    let (client, client2) = (material.files("client"), material.files("client2"));
    let coordinator = material.files("coordinator");
    let mut held = Vec::new();
    // Two other identities take the six places that are not held...
    for files in [&client, &client2].repeat(3) {
        held.push(
            open_tls(address, "localhost", &ca, Some(files))
                .await
                .unwrap(),
        );
    }
    for files in [&client, &client2] {
        let refused = open_tls(address, "localhost", &ca, Some(files)).await;
        assert!(refused.is_err(), "a held place went to another identity");
    }
    // ...and the coordinator still gets both held ones.
    for _ in 0..2 {
        held.push(
            open_tls(address, "localhost", &ca, Some(&coordinator))
                .await
                .unwrap(),
        );
    }
    let ninth = open_tls(address, "localhost", &ca, Some(&coordinator)).await;
    assert!(ninth.is_err(), "a ninth connection was kept");
    // A place another identity gives back is for the others again.
    held.remove(0);
    until_tls_as(&material, address, &client2).await;
}

/// Opens a connection as the holder of `files` to `address`, retrying for
/// up to three seconds while it is refused.
async fn until_tls_as(material: &Material, address: SocketAddr, files: &TlsFiles) {
    let ca = material.dir.path().join("ca_cert.pem");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match open_tls(address, "localhost", &ca, Some(files)).await {
            Ok(_) => return,
            Err(error) => assert!(Instant::now() < deadline, "not accepted: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_time_out_and_connections_are_limited() {
    let material = Material::new();
    let (address, _stop) = serve_with_options(
        &material,
        "limited",
        1024,
        ServeOptions {
            handshake_timeout: Duration::from_millis(300),
            max_connections: 2,
            ..ServeOptions::default()
        },
    )
    .await;
    let ca = material.dir.path().join("ca_cert.pem");
    let client = material.files("client");

    // Slowloris: a connection that never starts its handshake is closed.
    let started = Instant::now();
    assert!(closes_on(address, b"").await, "an idle connection was kept");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );

    // Two connections are open; a third is closed on arrival...
    let first = open_tls(address, "localhost", &ca, Some(&client))
        .await
        .unwrap();
    let _second = open_tls(address, "localhost", &ca, Some(&client))
        .await
        .unwrap();
    let third = open_tls(address, "localhost", &ca, Some(&client)).await;
    assert!(third.is_err(), "a third connection was accepted");
    // ...until one of them closes.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_tls(address, "localhost", &ca, Some(&client))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the closed connection's place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_says_why_its_target_is_out_of_rotation_and_a_coordinator_does_not() {
    let material = Material::new();
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let client = material.client(&url, "client");
    let started = Instant::now();
    let explained = loop {
        let status = client
            .submit_token(material.keys.encrypt(b"x"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        if status.message().contains("no backend in rotation") {
            break status.message().to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        explained.contains(&format!("last failure: {url}: ")),
        "{explained}"
    );

    // A coordinator whose only server is gone fails fast too, without
    // telling its callers where its servers are.
    let server = TestServer::start(&material, any_port());
    let server_url = server.url();
    let coordinator = TestCoordinator::start(&material, std::slice::from_ref(&server_url)).await;
    let through = material.client(&coordinator.url, "client");
    through.submit(b"warm up").await.unwrap();
    drop(server);
    let started = Instant::now();
    let refused = loop {
        let status = through
            .submit_token(material.keys.encrypt(b"x"))
            .await
            .unwrap_err();
        if status.message().contains("no backend in rotation") {
            break status.message().to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!refused.contains(&server_url), "{refused}");
    assert!(!refused.contains("last failure"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_calling_its_only_coordinator_while_it_drains() {
    let material = Material::new();
    let server = TestServer::start(&material, any_port());
    let mut coordinator = TestCoordinator::serve_over(
        &material,
        &[server.url()],
        ServeOptions {
            drain_delay: Duration::from_secs(5),
            ..ServeOptions::default()
        },
    )
    .await;
    let client = material.client(&coordinator.url, "client");
    client.submit(b"before the drain").await.unwrap();
    coordinator.shut_down();
    // The client's health checks (every second) find NOT_SERVING; with
    // nowhere else to go, it goes on calling the coordinator, which still
    // serves during its drain delay.
    let started = Instant::now();
    loop {
        let targets = client.targets();
        let [target] = targets.as_slice() else {
            panic!("{} targets", targets.len());
        };
        if !target.healthy {
            assert!(target.in_rotation, "the only target left rotation");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the client never saw the drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        let reply = client.submit(b"while it drains").await;
        assert_eq!(reply.unwrap().server_id, server.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_keep_certificate_holders_out() {
    let material = Material::new();
    let (address, _stop) = serve_with_options(
        &material,
        "crowded",
        1024,
        ServeOptions {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 8,
            max_handshakes: 4,
            ..ServeOptions::default()
        },
    )
    .await;
    let ca = material.dir.path().join("ca_cert.pem");
    let client = material.files("client");
    // As many silent connections as the connection limit, twice the
    // handshake limit: none of them ever sends a byte.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    // A handshake may be displaced once it has waited a while (a tenth of
    // the handshake timeout, at most a second): these now have.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A certificate holder still gets in, more than once, at once.
    for _ in 0..3 {
        let started = Instant::now();
        let connected = open_tls(address, "localhost", &ca, Some(&client)).await;
        assert!(connected.is_ok(), "{connected:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Silent connections were closed long before the handshake timeout:
    // the four beyond the limit on arrival, and the oldest for the first
    // newcomer (the others found the place it left when it was done).
    let mut closed = 0;
    for mut connection in silent {
        if closed_within(&mut connection, Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 5,
        "only {closed} of 8 silent connections were closed"
    );

    // A burst of new connections does not displace itself: beyond the
    // limit, the newest is refused while the young ones keep their places.
    let mut young = Vec::new();
    for _ in 0..4 {
        young.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    let mut newest = tokio::net::TcpStream::connect(address).await.unwrap();
    assert!(closed_within(&mut newest, Duration::from_millis(500)).await);
    for connection in &mut young {
        assert!(!closed_within(connection, Duration::from_millis(100)).await);
    }
}

/// A TLS connection to `address` (name `localhost`) as `client`, before
/// any HTTP/2.
async fn tls_as_client(
    material: &Material,
    address: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tls_as_client(material, address).await.unwrap()
}

/// [`tls_as_client`], or how the handshake failed.
async fn try_tls_as_client(
    material: &Material,
    address: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    try_tls_as(material, address, "client").await
}

/// A TLS connection to `address` with the certificate of `identity`, or
/// how the handshake failed.
async fn try_tls_as(
    material: &Material,
    address: SocketAddr,
    identity: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = securemesh_tls::client_tls_config(&material.files(identity))
        .unwrap()
        .rustls_config();
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// [`tls_as_client`], retried for up to 3 s while the coordinator turns
/// connections away (its connection limit reached).
async fn until_tls_as_client(
    material: &Material,
    address: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match try_tls_as_client(material, address).await {
            Ok(tls) => return tls,
            Err(error) => assert!(Instant::now() < deadline, "not accepted: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/2 connection to the coordinator at `address` as `client`, made
/// with the `h2` crate, so that a test can send what no gRPC library
/// would.
async fn h2_session(material: &Material, address: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tls = tls_as_client(material, address).await;
    let (session, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    session
}

/// What the coordinator answered to one raw request: the HTTP status and
/// the gRPC status (from the headers of a trailers-only answer, or the
/// trailers).
async fn raw_h2_call(
    session: &h2::client::SendRequest<Bytes>,
    method: http::Method,
    content_type: &str,
    body: &[u8],
    end_stream: bool,
) -> (http::StatusCode, Option<Code>) {
    raw_h2_call_with(session, method, content_type, &[], body, end_stream).await
}

/// [`raw_h2_call`] with more headers.
async fn raw_h2_call_with(
    session: &h2::client::SendRequest<Bytes>,
    method: http::Method,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    end_stream: bool,
) -> (http::StatusCode, Option<Code>) {
    let (status, code, _) =
        raw_h2_request(session, method, content_type, headers, body, end_stream).await;
    (status, code)
}

/// A whole gRPC call: the HTTP status, the gRPC status and the answer's
/// body (its gRPC frames).
async fn raw_h2_exchange(
    session: &h2::client::SendRequest<Bytes>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (http::StatusCode, Option<Code>, Vec<u8>) {
    raw_h2_request(
        session,
        http::Method::POST,
        "application/grpc",
        headers,
        body,
        true,
    )
    .await
}

/// [`raw_h2_call_with`], also returning the answer's body.
async fn raw_h2_request(
    session: &h2::client::SendRequest<Bytes>,
    method: http::Method,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    end_stream: bool,
) -> (http::StatusCode, Option<Code>, Vec<u8>) {
    let submit = "/securemesh.v1.DataService/Submit";
    raw_h2_request_to(
        session,
        submit,
        method,
        content_type,
        headers,
        body,
        end_stream,
    )
    .await
}

/// [`raw_h2_request`] to the method at `path`.
async fn raw_h2_request_to(
    session: &h2::client::SendRequest<Bytes>,
    path: &str,
    method: http::Method,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    end_stream: bool,
) -> (http::StatusCode, Option<Code>, Vec<u8>) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("content-type", content_type)
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).unwrap();
    let mut session = session.clone().ready().await.unwrap();
    let (response, mut stream) = session.send_request(request, false).unwrap();
    // A refusal on the headers alone may close the stream (the connection
    // runs on another thread) before the body goes out: its answer is
    // read all the same.
    let _ = stream.send_data(Bytes::copy_from_slice(body), end_stream);
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("no answer within 5 s")
        .unwrap();
    let status = response.status();
    let headers_status = tonic::Status::from_header_map(response.headers());
    let mut body = response.into_body();
    let mut answer = Vec::new();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        answer.extend_from_slice(&data);
    }
    let trailers_status = body
        .trailers()
        .await
        .ok()
        .flatten()
        .and_then(|trailers| tonic::Status::from_header_map(&trailers));
    (
        status,
        headers_status
            .or(trailers_status)
            .map(|status| status.code()),
        answer,
    )
}

/// A gRPC frame: compression flag, declared length, then `message`.
fn frame(compressed: bool, declared: u32, message: &[u8]) -> Vec<u8> {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&declared.to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// Health checks and reflection are open to every certificate of the CA:
/// a request declaring a large message is refused at once, before any
/// room is set aside for it, by servers and the coordinator alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_refuse_large_requests_before_reading_them() {
    let Mesh {
        material,
        servers: [server],
        coordinator,
        ..
    } = Mesh::<1>::start().await;
    for address in [server.address, coordinator.address] {
        let session = h2_session(&material, address).await;
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            // 4 MiB declared, 1 byte sent, the stream left open: a
            // process that waited for the rest would never answer.
            let body = frame(false, 4 << 20, b"x");
            let exchange = raw_h2_request_to(
                &session,
                path,
                http::Method::POST,
                "application/grpc",
                &[],
                &body,
                false,
            );
            let (_, code, _) = tokio::time::timeout(Duration::from_secs(5), exchange)
                .await
                .unwrap_or_else(|_| panic!("{address} {path}: still waiting for the message"));
            // Reflection, a stream, ends its answer when its requests fail.
            if path.contains("Health") {
                assert_eq!(code, Some(Code::OutOfRange), "{address} {path}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_refuses_what_is_not_exactly_one_grpc_message() {
    let Mesh {
        material,
        servers: [a],
        coordinator,
        client,
    } = Mesh::<1>::start().await;
    let address = coordinator.address;
    let session = h2_session(&material, address).await;
    let grpc = "application/grpc";
    let token = material.keys.encrypt(b"raw");
    let message = SubmitRequest {
        token: token.clone().into(),
    }
    .encode_to_vec();
    let whole = frame(false, message.len() as u32, &message);

    // What works, so that the refusals below are not an accident.
    let accepted = raw_h2_call(&session, http::Method::POST, grpc, &whole, true).await;
    assert_eq!(accepted, (http::StatusCode::OK, Some(Code::Ok)));

    // Not gRPC at all: refused at the HTTP level.
    let get = raw_h2_call(&session, http::Method::GET, grpc, &whole, true).await;
    assert_eq!(get.0, http::StatusCode::METHOD_NOT_ALLOWED);
    for other in ["text/plain", "application/grpc-web", "application/grpcx"] {
        let answer = raw_h2_call(&session, http::Method::POST, other, &whole, true).await;
        assert_eq!(
            answer.0,
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{other}"
        );
    }
    for also_grpc in ["application/grpc+proto", "application/grpc;charset=utf-8"] {
        let answer = raw_h2_call(&session, http::Method::POST, also_grpc, &whole, true).await;
        assert_eq!(
            answer,
            (http::StatusCode::OK, Some(Code::Ok)),
            "{also_grpc}"
        );
    }

    // A compressed message is refused with what to send instead.
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("https://localhost/securemesh.v1.DataService/Submit")
        .header("content-type", grpc)
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut stream) = session
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    stream
        .send_data(
            Bytes::from(frame(true, message.len() as u32, &message)),
            true,
        )
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        response.headers().get("grpc-accept-encoding").unwrap(),
        "identity"
    );

    for (what, body, expected) in [
        (
            "compressed",
            frame(true, message.len() as u32, &message),
            Code::Unimplemented,
        ),
        ("empty", vec![], Code::Internal),
        ("a partial header", vec![0, 0], Code::Internal),
        (
            "a short message",
            frame(false, message.len() as u32 + 10, &message),
            Code::Internal,
        ),
        (
            "two messages",
            [whole.clone(), whole.clone()].concat(),
            Code::Unimplemented,
        ),
        (
            "garbage",
            frame(false, 3, &[0x0a, 0xff, 0xff]),
            Code::Internal,
        ),
    ] {
        let answer = raw_h2_call(&session, http::Method::POST, grpc, &body, true).await;
        assert_eq!(
            answer,
            (http::StatusCode::OK, Some(expected)),
            "{what}: {answer:?}"
        );
    }

    // A message declared over the limit is refused from its header alone,
    // while the caller is still sending.
    let huge = raw_h2_call(
        &session,
        http::Method::POST,
        grpc,
        &frame(false, 1 << 20, b""),
        false,
    )
    .await;
    assert_eq!(huge, (http::StatusCode::OK, Some(Code::OutOfRange)));

    // A message that never finishes arriving is given up at the caller's
    // deadline.
    let started = Instant::now();
    let stalled = raw_h2_call_with(
        &session,
        http::Method::POST,
        grpc,
        &[("grpc-timeout", "300m")],
        &whole[..whole.len() - 1],
        false,
    )
    .await;
    assert_eq!(
        stalled,
        (http::StatusCode::OK, Some(Code::DeadlineExceeded))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The same connection, and the mesh, still serve.
    let again = raw_h2_call(&session, http::Method::POST, grpc, &whole, true).await;
    assert_eq!(again, (http::StatusCode::OK, Some(Code::Ok)));
    assert_eq!(client.submit(b"after").await.unwrap().server_id, a.id());
}

/// The health status of the process as a whole (the empty service name)
/// at `url`.
async fn overall_health(material: &Material, url: &str) -> HealthStatus {
    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    let endpoint = tls
        .apply(tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap())
        .unwrap();
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(endpoint.connect().await.unwrap());
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let status = health.check(request).await.unwrap().into_inner().status;
    HealthStatus::try_from(status).unwrap()
}

#[tokio::test]
async fn a_readiness_check_refuses_a_plaintext_url() {
    let material = Material::new();
    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    let refused =
        securemesh_client::wait_until_serving("http://127.0.0.1:1", tls, Duration::from_secs(1))
            .await;
    assert!(
        matches!(refused, Err(securemesh_client::ClientError::NotHttps(_))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_coordinator_reports_not_serving_then_goes_away() {
    let material = Material::new();
    let server = TestServer::start(&material, any_port());
    let mut coordinator = TestCoordinator::serve_over(
        &material,
        &[server.url()],
        ServeOptions {
            // Long enough for the checks below on a loaded machine.
            drain_delay: Duration::from_secs(3),
            drain_grace: Duration::from_secs(2),
            ..ServeOptions::default()
        },
    )
    .await;
    let (url, address) = (coordinator.url.clone(), coordinator.address);
    ready(&material, &url).await;
    let client = material.client(&url, "client");
    client.submit(b"before").await.unwrap();

    coordinator.shut_down();
    // Health turns NOT_SERVING at once, and calls are still answered.
    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    let not_ready =
        securemesh_client::wait_until_serving(&url, tls, Duration::from_millis(300)).await;
    assert!(not_ready.is_err(), "still SERVING while draining");
    // So does the process as a whole, which probes without a service name
    // (a Kubernetes readiness probe, grpc_health_probe) ask about.
    assert_eq!(
        overall_health(&material, &url).await,
        HealthStatus::NotServing
    );
    client.submit(b"during the drain").await.unwrap();

    // After the delay the coordinator stops, and the port is closed.
    coordinator.stopped(Duration::from_secs(8)).await.unwrap();
    assert!(tokio::net::TcpStream::connect(address).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_speaks_http2_is_closed() {
    let material = Material::new();
    let coordinator = TestCoordinator::bare(
        &material,
        ServeOptions {
            handshake_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        },
    )
    .await;
    let address = coordinator.address;
    // TLS completes, then nothing: no HTTP/2 preface.
    let mut silent = tls_as_client(&material, address).await;
    let started = Instant::now();
    let closed = closed_within(&mut silent, Duration::from_secs(3)).await;
    assert!(closed, "a silent connection was kept");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "closed after {:?}",
        started.elapsed()
    );
}

/// Whether the peer closes `stream` within `limit`; what it sends is read
/// and ignored.
async fn closed_within(stream: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// A caller that completes TLS and the HTTP/2 preface (with empty
/// SETTINGS) at `address`, then answers nothing, not even a ping, as a
/// peer whose host vanished: whether it is disconnected within `limit`.
async fn silent_caller_is_dropped(
    material: &Material,
    address: SocketAddr,
    limit: Duration,
) -> bool {
    let mut silent = tls_as_client(material, address).await;
    let preface_and_settings = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    silent.write_all(preface_and_settings).await.unwrap();
    closed_within(&mut silent, limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_answer_no_ping_are_disconnected_and_the_others_kept() {
    let material = Material::new();
    let keepalive = ServeOptions {
        keepalive_interval: Some(Duration::from_millis(200)),
        keepalive_timeout: Duration::from_millis(200),
        ..ServeOptions::default()
    };
    let (server_address, _stop_server) =
        serve_with_options(&material, "pinging", 64 * 1024, keepalive.clone()).await;
    let coordinator = bare_coordinator(&material);
    coordinator
        .pool()
        .add(&format!("https://{server_address}"))
        .unwrap();
    let coordinator = TestCoordinator::serve(
        &material,
        coordinator,
        Authorization::any_identity(),
        keepalive,
    )
    .await;
    ready(&material, &coordinator.url).await;
    let message = SubmitRequest {
        token: material.keys.encrypt(b"after a quiet while").into(),
    }
    .encode_to_vec();
    let call = frame(false, message.len() as u32, &message);

    for (what, address) in [
        ("the server", server_address),
        ("the coordinator", coordinator.address),
    ] {
        // This caller's connection is driven: it answers every ping.
        let live = h2_session(&material, address).await;
        let started = Instant::now();
        assert!(
            silent_caller_is_dropped(&material, address, Duration::from_secs(3)).await,
            "{what} kept a caller that answers no ping"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(350),
            "{what} dropped the silent caller after {waited:?}, before a ping could time out"
        );
        // Idle as long, the caller that answered is still connected.
        let answered =
            raw_h2_call(&live, http::Method::POST, "application/grpc", &call, true).await;
        assert_eq!(answered, (http::StatusCode::OK, Some(Code::Ok)), "{what}");
    }
}

/// The coordinator's DataService health as a client sees it within 300 ms:
/// `None` while `SERVING`, else the last answer.
async fn not_serving_reason(material: &Material, url: &str) -> Option<String> {
    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    match securemesh_client::wait_until_serving(url, tls, Duration::from_millis(300)).await {
        Ok(()) => None,
        Err(securemesh_client::ClientError::NotReady { last, .. }) => Some(last),
        Err(other) => Some(other.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_reports_not_serving_while_no_backend_can_serve() {
    let Mesh {
        material,
        servers: [mut a],
        coordinator,
        client: _client,
    } = Mesh::<1>::start().await;
    assert_eq!(not_serving_reason(&material, &coordinator.url).await, None);

    let address = a.address;
    a.kill();
    // Health checks every 200 ms take the backend out; the coordinator
    // follows within 100 ms.
    let started = Instant::now();
    loop {
        // NOT_SERVING is status 2 in grpc.health.v1.
        if not_serving_reason(&material, &coordinator.url)
            .await
            .as_deref()
            == Some("status 2")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still SERVING with no backend"
        );
    }

    let _a = TestServer::start(&material, address);
    let tls = securemesh_tls::client_tls_config(&material.files("client")).unwrap();
    securemesh_client::wait_until_serving(&coordinator.url, tls, Duration::from_secs(5))
        .await
        .expect("SERVING again once the backend is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_caller_resets_is_abandoned_by_the_coordinator() {
    let material = Material::new();
    let answering = Arc::new(AtomicUsize::new(0));
    let slow = SlowBackend {
        delay: Duration::from_secs(5),
        seen_timeouts: Arc::default(),
        answering: answering.clone(),
    };
    let backend = TestServer::start_with(&material, any_port(), |_| slow);
    let coordinator = bare_coordinator(&material);
    coordinator.pool().add(&backend.url()).unwrap();
    let stats = coordinator.stats().clone();
    let coordinator = TestCoordinator::serve_open(&material, coordinator).await;
    let address = coordinator.address;

    let session = h2_session(&material, address).await;
    let message = SubmitRequest {
        token: material.keys.encrypt(b"never mind").into(),
    }
    .encode_to_vec();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("https://localhost/securemesh.v1.DataService/Submit")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let mut session = session.ready().await.unwrap();
    let (_response, mut stream) = session.send_request(request, false).unwrap();
    stream
        .send_data(
            Bytes::from(frame(false, message.len() as u32, &message)),
            true,
        )
        .unwrap();
    let started = Instant::now();
    while answering.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the call never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stream.send_reset(h2::Reason::CANCEL);
    // Long before the backend would have answered, the call is over, at
    // the coordinator and at the backend (its stream reset in turn).
    let reset = Instant::now();
    while stats.in_flight() != 0 || answering.load(Ordering::SeqCst) != 0 {
        assert!(
            reset.elapsed() < Duration::from_secs(1),
            "the coordinator kept relaying a call nobody waits for"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An HTTP/2 client connection a test can stop driving: once `paused`, it
/// answers nothing, pings included, but keeps its socket open (a caller
/// whose host vanished).
struct Pausable<F> {
    connection: F,
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl<F: std::future::Future + Unpin> std::future::Future for Pausable<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.paused.load(Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.connection)
            .poll(cx)
            .map(|_| ())
    }
}

/// Waits (at most 3 s) until the coordinator at `address` accepts a
/// connection, which a limit of one connection allows only while no other
/// holds it.
async fn until_a_connection_is_accepted(material: &Material, address: SocketAddr, what: &str) {
    let ca = material.dir.path().join("ca_cert.pem");
    let client = material.files("client");
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_tls(address, "localhost", &ca, Some(&client))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gRPC request on `session` whose request stream stays open for the
/// test to write.
async fn open_grpc_stream(
    session: &h2::client::SendRequest<Bytes>,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut session = session.clone().ready().await.unwrap();
    session.send_request(request, false).unwrap()
}

/// A health watch of the DataService on `address`, once its first status
/// has arrived; the returned session keeps the connection's handle.
async fn open_health_watch(
    material: &Material,
    address: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, h2::RecvStream) {
    let session = h2_session(material, address).await;
    let watch = watch_on(&session).await;
    (session, watch)
}

/// A health watch of the DataService on `session`, once its first status
/// has arrived.
async fn watch_on(session: &h2::client::SendRequest<Bytes>) -> h2::RecvStream {
    let watch_request = tonic_health::pb::HealthCheckRequest {
        service: securemesh::v1::DATA_SERVICE_NAME.to_owned(),
    }
    .encode_to_vec();
    let (watch, _ended) = first_answered(
        session,
        "/grpc.health.v1.Health/Watch",
        &watch_request,
        true,
    )
    .await;
    watch
}

/// A reflection stream (v1alpha, as grpcurl 1.8.6 speaks) on `session`
/// that lists the services once and stays open, as reflection-based tools
/// keep it: the answer to read, and the request stream to hold.
async fn open_reflection_stream(
    session: &h2::client::SendRequest<Bytes>,
) -> (h2::RecvStream, h2::SendStream<Bytes>) {
    // ServerReflectionRequest { list_services: "" }: field 7, length 0.
    let list_services = [0x3a, 0x00];
    first_answered(
        session,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        &list_services,
        false,
    )
    .await
}

/// A call to `path` on `session` that sends `message` (and ends its
/// request with it if `end`), once its first answer has arrived: the
/// answer's stream, and the request's.
async fn first_answered(
    session: &h2::client::SendRequest<Bytes>,
    path: &str,
    message: &[u8],
    end: bool,
) -> (h2::RecvStream, h2::SendStream<Bytes>) {
    let (response, mut request) = open_grpc_stream(session, path).await;
    request
        .send_data(
            Bytes::from(frame(false, message.len() as u32, message)),
            end,
        )
        .unwrap();
    let mut answers = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .unwrap_or_else(|_| panic!("no answer on {path}"))
        .unwrap()
        .into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), answers.data()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "{path}: {first:?}");
    (answers, request)
}

/// Reads `stream` to its end, at most `limit`: its gRPC status.
async fn stream_ends(mut stream: h2::RecvStream, limit: Duration) -> Option<Code> {
    tokio::time::timeout(limit, async {
        while let Some(data) = stream.data().await {
            if data.is_err() {
                return None;
            }
        }
        let trailers = stream.trailers().await.ok().flatten()?;
        let code = trailers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .parse::<i32>()
            .ok()?;
        Some(Code::from(code))
    })
    .await
    .expect("the stream outlived the shutdown")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_health_and_reflection_streams_do_not_hold_a_shutdown_for_the_grace_period() {
    let material = Material::new();
    let options = ServeOptions {
        drain_grace: Duration::from_secs(10),
        ..ServeOptions::default()
    };
    // A server: the streams end, and so does serving...
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(securemesh_tls::serve_mtls(
        listener,
        server_tls(&material),
        securemesh_tls::authorized_data_service(
            DataHandler::new(material.keys.clone(), "watched", false),
            Authorization::any_identity(),
            1024,
        ),
        options.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let held = hold_streams_open(&material, address).await;
    let _ = stop.send(());
    held.all_end_unavailable().await;
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    // ...and a coordinator: the watch ends, and so does serving.
    let mut coordinator = TestCoordinator::bare(&material, options).await;
    let held = hold_streams_open(&material, coordinator.address).await;
    coordinator.shut_down();
    held.all_end_unavailable().await;
    coordinator.stopped(Duration::from_secs(3)).await.unwrap();
}

/// Streams a client keeps open: a health watch, a reflection stream, and a
/// health check whose request never ends (tonic waits for its end before
/// answering).
struct HeldOpen {
    _session: h2::client::SendRequest<Bytes>,
    watch: h2::RecvStream,
    reflection: h2::RecvStream,
    _reflection_requests: h2::SendStream<Bytes>,
    check: h2::client::ResponseFuture,
    _check_request: h2::SendStream<Bytes>,
}

async fn hold_streams_open(material: &Material, address: SocketAddr) -> HeldOpen {
    let (session, watch) = open_health_watch(material, address).await;
    let (check, check_request) = open_grpc_stream(&session, "/grpc.health.v1.Health/Check").await;
    // Opened after the check: once it is answered, the check has arrived
    // too (a stream the server had not seen when it went away would be
    // refused instead).
    let (reflection, reflection_requests) = open_reflection_stream(&session).await;
    HeldOpen {
        _session: session,
        watch,
        reflection,
        _reflection_requests: reflection_requests,
        check,
        _check_request: check_request,
    }
}

impl HeldOpen {
    /// Each stream ends with `UNAVAILABLE` within 3 s.
    async fn all_end_unavailable(self) {
        for stream in [self.watch, self.reflection] {
            assert_eq!(
                stream_ends(stream, Duration::from_secs(3)).await,
                Some(Code::Unavailable)
            );
        }
        let answer = tokio::time::timeout(Duration::from_secs(3), self.check)
            .await
            .expect("the unended check outlived the shutdown")
            .unwrap();
        let status = tonic::Status::from_header_map(answer.headers());
        assert_eq!(status.map(|status| status.code()), Some(Code::Unavailable));
    }
}

/// A peer that finishes TLS with a server and then sends nothing, or a
/// byte of the HTTP/2 preface, gives its connection slot back after the
/// handshake timeout: HTTP/2 pings, which find a silent peer later on,
/// start only after the preface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_after_tls_gives_its_slot_on_a_server_back() {
    let material = Material::new();
    let options = ServeOptions {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(1500),
        ..ServeOptions::default()
    };
    let (address, _stop) = serve_with_options(&material, "silent", 1024, options).await;
    let ca = material.dir.path().join("ca_cert.pem");
    for first_bytes in [&b""[..], b"P"] {
        // (The probe that showed the slot free may still hold it briefly.)
        let mut silent = until_tls_as_client(&material, address).await;
        silent.write_all(first_bytes).await.unwrap();
        silent.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let probe = open_tls(address, "localhost", &ca, Some(&material.files("client"))).await;
        assert!(
            probe.is_err(),
            "the silent peer does not hold the only slot"
        );
        until_a_connection_is_accepted(&material, address, "the silent peer kept the only slot")
            .await;
    }
}

/// Calls refused on arrival once authorized (a message too large,
/// compressed or malformed), calls whose deadline has passed, and calls
/// their callers abandon are counted (and audited) as relayed ones are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_on_arrival_or_abandoned_are_counted() {
    let material = Material::new();
    let coordinator = bare_coordinator(&material);
    let stats = coordinator.stats().clone();
    let served = TestCoordinator::serve(
        &material,
        coordinator,
        Authorization::any_identity(),
        ServeOptions::default(),
    )
    .await;
    let session = h2_session(&material, served.address).await;
    let grpc = "application/grpc";
    for (body, expected) in [
        (frame(false, 1 << 20, b""), Code::OutOfRange),
        (frame(true, 3, &[0x0a, 0x01, 0x00]), Code::Unimplemented),
        (frame(false, 3, &[0x0a, 0xff, 0xff]), Code::Internal),
    ] {
        let answer = raw_h2_call(&session, http::Method::POST, grpc, &body, true).await;
        assert_eq!(answer.1, Some(expected));
    }
    assert_eq!((stats.recent().calls, stats.recent().failures), (3, 3));
    // A call whose deadline has passed on arrival is answered before it
    // is authorized, and counted all the same.
    let expired = || {
        securemesh_telemetry::metrics()
            .requests
            .with_label_values(&["/securemesh.v1.DataService/Submit", "DEADLINE_EXCEEDED"])
            .get()
    };
    let before = expired();
    let answer = raw_h2_call_with(
        &session,
        http::Method::POST,
        grpc,
        &[("grpc-timeout", "1n")],
        &frame(false, 3, &[0x0a, 0x01, 0x00]),
        true,
    )
    .await;
    assert_eq!(answer.1, Some(Code::DeadlineExceeded));
    assert!(expired() > before, "the expired call was not counted");
    // A caller that gives up halfway through its message.
    let (_answer, mut request) =
        open_grpc_stream(&session, "/securemesh.v1.DataService/Submit").await;
    request
        .send_data(Bytes::from(frame(false, 100, b"part")), false)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats.in_flight() == 0 {
        assert!(Instant::now() < deadline, "the call never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    request.send_reset(h2::Reason::CANCEL);
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats.recent().calls < 4 {
        assert!(
            Instant::now() < deadline,
            "the abandoned call was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.in_flight(), 0);
}

/// A keepalive interval of zero (the library's callers may give one)
/// means no pings, as for tonic's servers: every connection used to panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_keepalive_interval_means_no_pings() {
    let material = Material::new();
    let coordinator = TestCoordinator::bare(
        &material,
        ServeOptions {
            keepalive_interval: Some(Duration::ZERO),
            ..ServeOptions::default()
        },
    )
    .await;
    let session = h2_session(&material, coordinator.address).await;
    let _watch = watch_on(&session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_does_not_outlive_its_callers_connection() {
    let material = Material::new();
    let coordinator = TestCoordinator::bare(
        &material,
        ServeOptions {
            max_connections: 1,
            keepalive_interval: Some(Duration::from_millis(200)),
            keepalive_timeout: Duration::from_millis(200),
            ..ServeOptions::default()
        },
    )
    .await;
    let address = coordinator.address;

    for falls_silent in [false, true] {
        let what = if falls_silent {
            "a caller that stopped answering pings"
        } else {
            "a caller that disconnected"
        };
        // (The probe that showed the slot free may still hold it briefly.)
        let tls = until_tls_as_client(&material, address).await;
        let (session, connection) = h2::client::handshake(tls).await.unwrap();
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let driver = tokio::spawn(Pausable {
            connection,
            paused: paused.clone(),
        });
        let _watch = watch_on(&session).await;
        // The watch waits for the next change of status, which does not
        // come; the caller goes away meanwhile.
        if falls_silent {
            paused.store(true, Ordering::SeqCst);
        } else {
            driver.abort();
        }
        until_a_connection_is_accepted(
            &material,
            address,
            &format!("{what} kept its connection slot through its open health watch"),
        )
        .await;
        driver.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_reads_no_answers_cannot_make_the_coordinator_buffer_them() {
    /// The coordinator's flow-control window for one stream of a caller.
    const STREAM_WINDOW: usize = 2 * 1024 * 1024;
    let material = Material::new();
    let coordinator = TestCoordinator::bare(&material, ServeOptions::default()).await;
    let tls = tls_as_client(&material, coordinator.address).await;
    // The caller offers 1 KiB for answers and never reads them, so never
    // opens its window further.
    let (session, connection) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let (_response, mut requests) = open_grpc_stream(
        &session,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    )
    .await;
    // ServerReflectionRequest { host (field 1): 1,000 characters,
    // file_containing_symbol (field 4): the DataService }: each answer
    // echoes the request and adds the service's file descriptor.
    let mut message = vec![0x0a, 0xe8, 0x07];
    message.extend_from_slice("h".repeat(1000).as_bytes());
    let symbol = securemesh::v1::DATA_SERVICE_NAME.as_bytes();
    message.extend_from_slice(&[0x22, symbol.len() as u8]);
    message.extend_from_slice(symbol);
    let message = Bytes::from(frame(false, message.len() as u32, &message));

    // The caller keeps asking for as long as the coordinator takes its
    // requests. Once it holds one window of unanswerable requests, it
    // should take no more.
    let mut sent = 0usize;
    let mut pending = message.clone();
    loop {
        if pending.is_empty() {
            pending = message.clone();
        }
        requests.reserve_capacity(pending.len());
        let granted = tokio::time::timeout(
            Duration::from_secs(1),
            std::future::poll_fn(|cx| requests.poll_capacity(cx)),
        )
        .await;
        let granted = match granted {
            Err(_) => break,
            Ok(Some(Ok(granted))) => granted,
            Ok(other) => panic!("the request stream ended: {other:?}"),
        };
        let chunk = pending.split_to(granted.min(pending.len()));
        sent += chunk.len();
        requests.send_data(chunk, false).unwrap();
        assert!(
            sent <= 3 * STREAM_WINDOW,
            "the coordinator kept taking requests whose answers nobody reads ({sent} bytes)"
        );
    }
    assert!(
        sent >= STREAM_WINDOW / 2,
        "the coordinator stopped taking requests after {sent} bytes"
    );
    driver.abort();
}

/// A server admitting any certificate of the CA and a coordinator in front
/// of it, each with a configuration the test can replace.
struct Reloadable {
    server_tls: ReloadableConfig,
    server_url: String,
    _stop_server: oneshot::Sender<()>,
    coordinator_tls: ReloadableConfig,
    coordinator: TestCoordinator,
}

impl Reloadable {
    async fn start(material: &Material) -> Self {
        let server_tls = server_tls(material);
        let (server_address, stop_server) = serve_authorized(
            server_tls.clone(),
            DataHandler::new(material.keys.clone(), "judged", false),
            Authorization::any_identity(),
            64 * 1024,
            ServeOptions::default(),
        )
        .await;
        let server_url = format!("https://{server_address}");
        let coordinator_tls: ReloadableConfig =
            securemesh_tls::server_tls(&material.files("coordinator"), None)
                .unwrap()
                .into();
        let coordinator = bare_coordinator(material);
        coordinator.pool().add(&server_url).unwrap();
        let coordinator = TestCoordinator::serve_with_tls(
            coordinator_tls.clone(),
            coordinator,
            Authorization::any_identity(),
            ServeOptions::default(),
        )
        .await;
        ready(material, &coordinator.url).await;
        Self {
            server_tls,
            server_url,
            _stop_server: stop_server,
            coordinator_tls,
            coordinator,
        }
    }

    /// For the server and the coordinator: what it is, and a client of it
    /// as each of `identities`, each of which has made one call.
    async fn connected_clients<const N: usize>(
        &self,
        material: &Material,
        identities: [&str; N],
    ) -> Vec<(&'static str, [Client; N])> {
        let mut connected = Vec::new();
        for (what, url) in [
            ("the server", &self.server_url),
            ("the coordinator", &self.coordinator.url),
        ] {
            let clients = identities.map(|identity| material.client(url, identity));
            for client in &clients {
                client.submit(b"while valid").await.unwrap();
            }
            connected.push((what, clients));
        }
        connected
    }
}

/// Asserts that, for the server and the coordinator, the call of the first
/// client fails (its connection is gone and a new one is refused) and that
/// of the second is still answered.
async fn first_refused_second_answered(connected: &[(&'static str, [Client; 2])]) {
    for (what, [refused, kept]) in connected {
        let refused = tokio::time::timeout(Duration::from_secs(5), refused.submit(b"after"))
            .await
            .expect("no answer within 5 s");
        assert!(
            refused.is_err(),
            "{what} kept serving the open connection of a certificate no longer valid"
        );
        kept.submit(b"after")
            .await
            .unwrap_or_else(|status| panic!("{what} refused a certificate still good: {status:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_connected_loses_its_open_connection() {
    let material = Material::new();
    let mesh = Reloadable::start(&material).await;
    let connected = mesh
        .connected_clients(&material, ["client", "client2"])
        .await;

    // `client` is revoked, and both reload their configuration (SIGHUP).
    let crl = securemesh_pki::revoke(material.dir.path(), "client")
        .unwrap()
        .crl;
    for (tls, name) in [
        (&mesh.server_tls, "server"),
        (&mesh.coordinator_tls, "coordinator"),
    ] {
        tls.replace(securemesh_tls::server_tls(&material.files(name), Some(&crl)).unwrap());
    }
    first_refused_second_answered(&connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_while_connected_loses_its_open_connection() {
    use time::{Duration as Span, OffsetDateTime};

    let material = Material::new();
    let mesh = Reloadable::start(&material).await;
    // Issued once everything runs, so that its three seconds are spent on
    // connecting and waiting only.
    let authority = securemesh_pki::Authority::from_pem(
        &std::fs::read_to_string(material.dir.path().join("ca_cert.pem")).unwrap(),
        &std::fs::read_to_string(material.dir.path().join("ca_key.pem")).unwrap(),
    )
    .unwrap();
    let now = OffsetDateTime::now_utc();
    let brief = authority
        .issue_valid_between(
            "brief",
            securemesh_pki::Role::Client,
            &[],
            now - Span::hours(1),
            now + Span::seconds(3),
        )
        .unwrap();
    let files = material.files("brief");
    std::fs::write(&files.cert, brief.cert_pem).unwrap();
    std::fs::write(&files.key, brief.key_pem).unwrap();

    let connected = mesh
        .connected_clients(&material, ["brief", "client2"])
        .await;
    // No reload: the certificate simply runs out (its notAfter is a whole
    // second, so it is expired from at most 4 s on).
    let expired = now + Span::milliseconds(4300);
    let wait = Duration::try_from(expired - OffsetDateTime::now_utc()).unwrap_or_default();
    tokio::time::sleep(wait).await;
    first_refused_second_answered(&connected).await;
}

/// Connections past their maximum age are told to go away, on servers and
/// on the coordinator, and callers connect again without a call failing; a
/// coordinator connection that a stream keeps open is closed once the
/// grace after its age is over too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_their_maximum_age_are_retired_without_failing_a_call() {
    let material = Material::new();
    let aging = ServeOptions {
        max_connection_age: Some(Duration::from_millis(300)),
        drain_grace: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    let (server, _stop) = serve_with_options(&material, "aging", 64 * 1024, aging.clone()).await;
    let proxy = bare_coordinator(&material);
    proxy.pool().add(&format!("https://{server}")).unwrap();
    let backends = proxy.pool().clone();
    let coordinator =
        TestCoordinator::serve(&material, proxy, Authorization::any_identity(), aging).await;
    ready(&material, &coordinator.url).await;

    // Each side closes an idle connection soon after its age.
    for address in [server, coordinator.address] {
        let tls = tls_as_client(&material, address).await;
        let (_session, connection) = h2::client::handshake(tls).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(3), connection).await;
        assert!(closed.is_ok(), "{address}: a connection outlived its age");
    }

    // Calls four at a time through several retirements of both legs: none
    // fails.
    let client = material.client(&coordinator.url, "client");
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let batch = (0..4).map(|_| client.submit(b"through aging connections"));
        for reply in futures_util::future::join_all(batch).await {
            assert_eq!(reply.unwrap().server_id, "aging");
            answered += 1;
        }
    }
    assert!(answered >= 20, "{answered} calls");
    // Not even an attempt failed: a connection told to go away is left
    // for a new one, not counted against its endpoint (which, ejected,
    // would lose its share of the load).
    for (side, targets) in [
        ("client", client.targets()),
        ("coordinator", backends.snapshot()),
    ] {
        for target in targets {
            assert_eq!(target.last_failure, None, "{side} saw {} fail", target.url);
        }
    }

    // A health watch never ends by itself: its connection goes at age +
    // grace.
    let (_session, mut watch) = open_health_watch(&material, coordinator.address).await;
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = watch.data().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "a watch kept its connection past age and grace"
    );
}
