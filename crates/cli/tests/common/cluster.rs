//! A cluster of real `securemesh` processes for the failure and discovery
//! tests, and a load generator that records what every call saw.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use securemesh_client::{BalanceOptions, Client};
use securemesh_crypto::KeyRing;
use securemesh_tls::{ClientTls, TlsFiles};
use tempfile::TempDir;

/// Calls in flight during a load run.
pub const CONCURRENCY: usize = 16;

/// A server or coordinator process that can be stopped and started again
/// on the same port.
pub struct Node {
    pub label: String,
    pub port: u16,
    pub args: Vec<String>,
    pub child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn id(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self, dir: &std::path::Path) {
        self.child = Some(super::spawn_logged(dir, &self.label, &self.args));
    }

    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            super::signal(child, signal);
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::signal(&child, Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status once drained.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        super::terminate(&mut child)
    }
}

/// A PKI, servers and coordinators, every process killed on drop.
pub struct Cluster {
    pub work: TempDir,
    pub servers: Vec<Node>,
    pub coordinators: Vec<Node>,
    pub tls: ClientTls,
    pub keys: KeyRing,
}

impl Cluster {
    /// A PKI and a Fernet key, no processes yet.
    pub fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let certs = work.path().join("certs");
        securemesh_pki::init(&securemesh_pki::InitOptions {
            days: 1,
            ..securemesh_pki::InitOptions::new(certs.clone())
        })
        .unwrap();
        securemesh_crypto::write_new_key_file(&certs.join("encryption_key.txt"), false).unwrap();
        let tls = securemesh_tls::client_tls_config(&TlsFiles::in_dir(&certs, "client")).unwrap();
        let keys = KeyRing::from_file(&certs.join("encryption_key.txt")).unwrap();
        Self {
            work,
            servers: Vec::new(),
            coordinators: Vec::new(),
            tls,
            keys,
        }
    }

    /// `servers` servers, then `coordinators` coordinators listing them
    /// all as static backends; everything serving.
    pub async fn start(servers: usize, coordinators: usize) -> Self {
        let mut cluster = Self::new();
        for _ in 0..servers {
            cluster.add_server(&[]);
        }
        for index in 0..servers {
            cluster.servers[index].start(cluster.work.path());
        }
        for index in 0..servers {
            cluster.ready(&cluster.servers[index].url()).await;
        }
        let mut backends = Vec::new();
        for server in &cluster.servers {
            backends.extend(["--backend".to_string(), server.url()]);
        }
        for _ in 0..coordinators {
            cluster.add_coordinator(&backends).await;
        }
        cluster
    }

    /// Defines server `server-<n>` on a free port with `extra` arguments;
    /// start it with [`Cluster::start_server`]. Returns its index.
    pub fn add_server(&mut self, extra: &[String]) -> usize {
        let port = super::free_port();
        let mut args = vec!["server".into(), port.to_string(), "--hide-plaintext".into()];
        args.extend_from_slice(extra);
        self.servers.push(Node {
            label: format!("server-{}", self.servers.len() + 1),
            port,
            args,
            child: None,
        });
        self.servers.len() - 1
    }

    /// Starts coordinator `coordinator-<n>` on a free port with `extra`
    /// arguments and waits until it answers health checks (`SERVING`, or
    /// `NOT_SERVING` while it has no backend in rotation, as a coordinator
    /// following an unreachable etcd). Returns its index.
    pub async fn add_coordinator(&mut self, extra: &[String]) -> usize {
        let port = super::free_port();
        let mut args = vec![
            "coordinator".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend_from_slice(extra);
        let mut node = Node {
            label: format!("coordinator-{}", self.coordinators.len() + 1),
            port,
            args,
            child: None,
        };
        node.start(self.work.path());
        let url = node.url();
        // Held by the cluster before waiting, so that it is killed even if
        // the wait fails.
        self.coordinators.push(node);
        self.answering(&url).await;
        self.coordinators.len() - 1
    }

    /// The directory holding the PKI.
    pub fn certs(&self) -> std::path::PathBuf {
        self.work.path().join("certs")
    }

    /// Waits until `url` answers its health check, whatever the status.
    pub async fn answering(&self, url: &str) {
        let started = std::time::Instant::now();
        loop {
            let answer = securemesh_client::wait_until_serving(
                url,
                self.tls.clone(),
                Duration::from_millis(300),
            )
            .await;
            match answer {
                Ok(()) => return,
                // NOT_SERVING (grpc.health.v1 status 2): up, but no backend.
                Err(securemesh_client::ClientError::NotReady { last, .. })
                    if last == "status 2" =>
                {
                    return
                }
                Err(error) => assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{url} does not answer: {error}"
                ),
            }
        }
    }

    pub async fn ready(&self, url: &str) {
        securemesh_client::wait_until_serving(url, self.tls.clone(), Duration::from_secs(20))
            .await
            .unwrap();
    }

    pub fn client(&self, targets: &[String]) -> Client {
        self.client_with(targets, BalanceOptions::default())
    }

    /// A client of `targets` with its own balancing options.
    pub fn client_with(&self, targets: &[String], balance: BalanceOptions) -> Client {
        Client::with_balance(
            targets,
            self.tls.clone(),
            self.keys.clone(),
            Duration::from_secs(10),
            balance,
            true,
        )
        .unwrap()
    }

    pub fn coordinator_urls(&self) -> Vec<String> {
        self.coordinators.iter().map(Node::url).collect()
    }

    /// Starts server `index` (again) and waits until it serves.
    pub async fn start_server(&mut self, index: usize) {
        self.servers[index].start(self.work.path());
        let url = self.servers[index].url();
        self.ready(&url).await;
    }

    pub fn log(&self, label: &str) -> String {
        super::log(self.work.path(), label)
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
pub struct Report {
    pub sent: usize,
    pub ok: usize,
    pub failed: usize,
    pub errors: BTreeMap<String, usize>,
    pub servers: BTreeMap<String, usize>,
    pub slowest: Duration,
    /// When each success was answered, with its server.
    pub answers: Vec<(Instant, String)>,
}

impl Report {
    pub fn print(&self, case: &str) {
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
pub struct Progress {
    pub sent: AtomicUsize,
}

impl Progress {
    pub async fn reached(&self, sent: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent.load(Ordering::Relaxed) < sent {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Sends at least `requests` calls at `CONCURRENCY` while `fault` runs, and
/// goes on until both are done.
pub async fn under_load<F, Fut>(client: &Client, requests: usize, fault: F) -> Report
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
                    if sequence >= requests && fault_done.load(Ordering::Relaxed) {
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

pub fn assert_clean(report: &Report, requests: usize) {
    assert!(report.sent >= requests, "{report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(report.ok, report.sent);
}
