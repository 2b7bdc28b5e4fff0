//! Failure tests: servers and coordinators as real processes, steady load
//! from the client library, and a fault injected in the middle of it.
//!
//! Each case sends at least 2,000 calls at concurrency 16 (and keeps
//! sending until its fault script has finished), prints
//! `sent / ok / failed` with the slowest call and the spread over servers,
//! and asserts what the coordinator promises. The cases run one at a time
//! so that timing is not distorted by each other. Case 7 drops packets with
//! an iptables rule, so it needs root and iptables (`.ci/run` installs it).
//!
//! Reproduce the figures of the README with:
//! `cargo test -p securemesh-cli --test faults -- --nocapture`

mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use securemesh_client::Client;
use securemesh_crypto::KeyRing;
use securemesh_tls::ClientTls;
use securemesh_tls::TlsFiles;
use tempfile::TempDir;

/// The coordinator's per-try timeout (its default).
const PER_TRY: Duration = Duration::from_secs(1);
const REQUESTS: usize = 2_000;
const CONCURRENCY: usize = 16;

/// One case at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server or coordinator process that can be stopped and started again
/// on the same port.
struct Node {
    label: String,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn id(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self, dir: &std::path::Path) {
        self.child = Some(common::spawn_logged(dir, &self.label, &self.args));
    }

    fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            common::signal(child, signal);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            common::signal(&child, Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status once drained.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        common::signal(&child, Signal::SIGTERM);
        common::wait_exit(&mut child)
    }
}

/// A PKI, servers and coordinators, every process killed on drop.
struct Cluster {
    work: TempDir,
    servers: Vec<Node>,
    coordinators: Vec<Node>,
    tls: ClientTls,
    keys: KeyRing,
}

impl Cluster {
    async fn start(servers: usize, coordinators: usize) -> Self {
        let work = tempfile::tempdir().unwrap();
        let certs = work.path().join("certs");
        securemesh_pki::init(&securemesh_pki::InitOptions {
            dir: certs.clone(),
            days: 1,
            extra_clients: vec![],
            sans: vec![],
            force: false,
        })
        .unwrap();
        securemesh_crypto::write_new_key_file(&certs.join("encryption_key.txt"), false).unwrap();
        let tls = securemesh_tls::client_tls_config(&TlsFiles::in_dir(&certs, "client")).unwrap();
        let keys = KeyRing::from_file(&certs.join("encryption_key.txt")).unwrap();
        let mut cluster = Self {
            work,
            servers: Vec::new(),
            coordinators: Vec::new(),
            tls,
            keys,
        };
        for index in 1..=servers {
            let port = common::free_port();
            let node = Node {
                label: format!("server-{index}"),
                port,
                args: vec!["server".into(), port.to_string(), "--hide-plaintext".into()],
                child: None,
            };
            cluster.servers.push(node);
        }
        for index in 0..servers {
            cluster.servers[index].start(cluster.work.path());
        }
        for index in 0..servers {
            cluster.ready(&cluster.servers[index].url()).await;
        }
        let backends: Vec<String> = cluster.servers.iter().map(Node::url).collect();
        for index in 1..=coordinators {
            let port = common::free_port();
            let mut args = vec![
                "coordinator".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ];
            for backend in &backends {
                args.extend(["--backend".into(), backend.clone()]);
            }
            let mut node = Node {
                label: format!("coordinator-{index}"),
                port,
                args,
                child: None,
            };
            node.start(cluster.work.path());
            cluster.ready(&node.url()).await;
            cluster.coordinators.push(node);
        }
        cluster
    }

    async fn ready(&self, url: &str) {
        securemesh_client::wait_until_serving(url, self.tls.clone(), Duration::from_secs(20))
            .await
            .unwrap();
    }

    fn client(&self, targets: &[String]) -> Client {
        Client::new(
            targets,
            self.tls.clone(),
            self.keys.clone(),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    fn coordinator_urls(&self) -> Vec<String> {
        self.coordinators.iter().map(Node::url).collect()
    }

    async fn restart_server(&mut self, index: usize) {
        self.servers[index].start(self.work.path());
        let url = self.servers[index].url();
        self.ready(&url).await;
    }

    fn log(&self, label: &str) -> String {
        common::log(self.work.path(), label)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.servers.iter_mut().chain(self.coordinators.iter_mut()) {
            node.kill();
        }
    }
}

/// What a load run saw.
#[derive(Debug, Default)]
struct Report {
    sent: usize,
    ok: usize,
    failed: usize,
    errors: BTreeMap<String, usize>,
    servers: BTreeMap<String, usize>,
    slowest: Duration,
    /// When each success was answered, with its server.
    answers: Vec<(Instant, String)>,
}

impl Report {
    fn print(&self, case: &str) {
        println!(
            "{case}: sent {} ok {} failed {} slowest {} ms servers {:?} errors {:?}",
            self.sent,
            self.ok,
            self.failed,
            self.slowest.as_millis(),
            self.servers,
            self.errors
        );
    }
}

/// Progress of a load run, for a fault script to act on.
#[derive(Default)]
struct Progress {
    sent: AtomicUsize,
}

impl Progress {
    async fn reached(&self, sent: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent.load(Ordering::Relaxed) < sent {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Sends at least `REQUESTS` calls at `CONCURRENCY` while `fault` runs, and
/// goes on until both are done.
async fn under_load<F, Fut>(client: &Client, fault: F) -> Report
where
    F: FnOnce(Arc<Progress>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let progress = Arc::new(Progress::default());
    let fault_done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let client = client.clone();
            let progress = progress.clone();
            let fault_done = fault_done.clone();
            tokio::spawn(async move {
                let mut report = Report::default();
                loop {
                    let sequence = progress.sent.fetch_add(1, Ordering::Relaxed);
                    if sequence >= REQUESTS && fault_done.load(Ordering::Relaxed) {
                        break report;
                    }
                    let started = Instant::now();
                    let outcome = client
                        .submit(format!("load {worker}/{sequence}").as_bytes())
                        .await;
                    report.slowest = report.slowest.max(started.elapsed());
                    report.sent += 1;
                    match outcome {
                        Ok(reply) => {
                            report.ok += 1;
                            report.answers.push((Instant::now(), reply.server_id));
                        }
                        Err(error) => {
                            report.failed += 1;
                            *report.errors.entry(error.to_string()).or_default() += 1;
                        }
                    }
                }
            })
        })
        .collect();
    fault(progress).await;
    fault_done.store(true, Ordering::Relaxed);
    let mut total = Report::default();
    for worker in workers {
        let report = worker.await.unwrap();
        total.sent += report.sent;
        total.ok += report.ok;
        total.failed += report.failed;
        total.slowest = total.slowest.max(report.slowest);
        for (error, count) in report.errors {
            *total.errors.entry(error).or_default() += count;
        }
        total.answers.extend(report.answers);
    }
    total.answers.sort();
    for (_, server) in &total.answers {
        *total.servers.entry(server.clone()).or_default() += 1;
    }
    total
}

fn assert_clean(report: &Report) {
    assert!(report.sent >= REQUESTS, "{report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(report.ok, report.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_server_killed_mid_run_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let killed = cluster.servers[0].id();
    let report = under_load(&client, |progress| {
        let server = &mut cluster.servers[0];
        async move {
            progress.reached(REQUESTS / 4).await;
            server.kill();
            progress.reached(REQUESTS / 2).await;
        }
    })
    .await;
    report.print("case 1, SIGKILL of one server");
    assert_clean(&report);
    let last = &report.answers[report.answers.len() - 100..];
    assert!(last.iter().all(|(_, server)| *server != killed));
    assert!(cluster
        .log("coordinator-1")
        .contains(&format!("Server https://{killed} failed: ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_2_a_hung_server_delays_calls_by_one_per_try_timeout_at_most() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let report = under_load(&client, |progress| {
        let server = &cluster.servers[0];
        async move {
            progress.reached(REQUESTS / 4).await;
            server.signal(Signal::SIGSTOP);
            // Long enough for stuck calls to time out and be retried, and
            // for the health checks to take the server out.
            tokio::time::sleep(PER_TRY * 3).await;
            server.signal(Signal::SIGCONT);
        }
    })
    .await;
    report.print("case 2, SIGSTOP of one server for 3 s");
    assert_clean(&report);
    let margin = Duration::from_millis(750);
    assert!(
        report.slowest <= PER_TRY + margin,
        "slowest call {:?} exceeds the per-try timeout {PER_TRY:?} + {margin:?}",
        report.slowest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_3_a_rolling_restart_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let cluster_ref = &mut cluster;
    let report = under_load(&client, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        for index in 0..2 {
            let status = cluster_ref.servers[index].terminate();
            assert!(status.success(), "server {index} exited with {status}");
            cluster_ref.restart_server(index).await;
            // Let the coordinator's health checks see it back.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    })
    .await;
    report.print("case 3, rolling restart (SIGTERM, restart on the same port)");
    assert_clean(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_4_a_restarted_server_gets_traffic_within_two_seconds() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let restarted = cluster.servers[0].id();
    let back = Arc::new(Mutex::new(None));
    let back_at = back.clone();
    let cluster_ref = &mut cluster;
    let report = under_load(&client, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        cluster_ref.servers[0].kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster_ref.restart_server(0).await;
        *back_at.lock().unwrap() = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(2500)).await;
    })
    .await;
    let back = back.lock().unwrap().expect("restarted");
    let first = report
        .answers
        .iter()
        .find(|(at, server)| *at > back && *server == restarted)
        .map(|(at, _)| at.duration_since(back));
    report.print(&format!(
        "case 4, restarted server: traffic again after {} ms",
        first.map_or(-1, |d| d.as_millis() as i64)
    ));
    assert_clean(&report);
    let first = first.expect("the restarted server never got traffic");
    assert!(
        first <= Duration::from_secs(2),
        "traffic came back after {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_5_with_every_server_down_calls_fail_fast_then_recover() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    client.submit(b"warm up").await.unwrap();
    for server in &mut cluster.servers {
        server.kill();
    }
    let report = under_load(&client, |_| async {}).await;
    report.print("case 5, every server down");
    assert_eq!(report.ok, 0);
    assert_eq!(report.failed, report.sent);
    assert!(
        report
            .errors
            .keys()
            .all(|error| error.starts_with("UNAVAILABLE")),
        "{:?}",
        report.errors
    );
    assert!(
        report.slowest < Duration::from_secs(1),
        "a call took {:?} to fail",
        report.slowest
    );
    // No retry storm: every failed attempt logs one line; retries stay
    // within the budget (20% of calls plus a reserve of 100).
    let attempts = cluster.log("coordinator-1").matches(" failed: ").count();
    println!(
        "case 5: {attempts} attempts reached a server for {} calls",
        report.sent
    );
    assert!(attempts <= report.sent * 6 / 5 + 120, "{attempts} attempts");

    cluster.restart_server(1).await;
    let started = Instant::now();
    loop {
        match client.submit(b"after").await {
            Ok(reply) => {
                assert_eq!(reply.server_id, cluster.servers[1].id());
                break;
            }
            Err(error) => assert!(
                started.elapsed() < Duration::from_secs(3),
                "no recovery: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "case 5: served again {} ms after the restart",
        started.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_6_a_coordinator_killed_mid_run_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 2).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let report = under_load(&client, |progress| {
        let coordinator = &mut cluster.coordinators[0];
        async move {
            progress.reached(REQUESTS / 4).await;
            coordinator.kill();
            progress.reached(REQUESTS / 2).await;
        }
    })
    .await;
    report.print("case 6, SIGKILL of one of two coordinators");
    assert_clean(&report);
}

/// Drops every packet to a port while it lives.
struct PacketDrop {
    port: u16,
}

impl PacketDrop {
    fn rule(&self, action: &str) -> std::process::Output {
        common::tool("iptables")
            .args([action, "INPUT", "-p", "tcp", "--dport"])
            .arg(self.port.to_string())
            .args(["-j", "DROP"])
            .output()
            .unwrap()
    }

    fn new(port: u16) -> Self {
        let drop = Self { port };
        let added = drop.rule("-I");
        assert!(added.status.success(), "iptables: {}", common::text(&added));
        drop
    }
}

impl Drop for PacketDrop {
    fn drop(&mut self) {
        let _ = self.rule("-D");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_7_a_server_cut_off_by_the_network_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let port = cluster.servers[0].port;
    let report = under_load(&client, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        let cut = PacketDrop::new(port);
        tokio::time::sleep(PER_TRY * 3).await;
        drop(cut);
    })
    .await;
    report.print("case 7, packets to one server dropped for 3 s");
    assert_clean(&report);
    assert!(
        report.slowest <= PER_TRY + Duration::from_millis(750),
        "{:?}",
        report.slowest
    );
}
