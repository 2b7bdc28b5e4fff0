//! The benchmark's lab: a fresh PKI and Fernet key, two servers, the
//! coordinator in front of both, and nginx in front of the same two; every
//! process on 127.0.0.1, killed when the lab is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use securemesh::v1::data_service_client::DataServiceClient;
use securemesh::v1::SubmitRequest;
use securemesh_client::{BalanceOptions, Client};
use securemesh_crypto::KeyRing;
use securemesh_tls::{ClientTls, TlsFiles};
use tonic::transport::{Channel, Endpoint};

use crate::nginx::{self, NginxSetup};
use crate::process::Process;
use crate::BenchError;

/// A way to reach the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Route {
    /// Straight to one server.
    Direct,
    /// Through the coordinator, over both servers.
    Coordinator,
    /// Through nginx, over both servers.
    Nginx,
}

impl Route {
    /// Every route, in the order runs alternate.
    pub const ALL: [Route; 3] = [Route::Direct, Route::Coordinator, Route::Nginx];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Coordinator => "coordinator",
            Route::Nginx => "nginx",
        }
    }
}

/// The running lab.
pub struct Lab {
    /// Its directory: certificates, logs, nginx's files.
    pub dir: PathBuf,
    /// The servers, by port.
    pub servers: Vec<(u16, Process)>,
    /// The coordinator and its port.
    pub coordinator: (u16, Process),
    /// nginx and its port.
    pub nginx: (u16, Process),
    /// `nginx -v`.
    pub nginx_version: String,
    tls: ClientTls,
    keys: KeyRing,
}

/// How long a call of the load generator may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A free port on 127.0.0.1 for a process the lab starts.
fn free_port() -> Result<u16, BenchError> {
    securemesh::ports::free_loopback_port().map_err(|source| BenchError::Io {
        what: "finding a free port".into(),
        source,
    })
}

fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

impl Lab {
    /// Makes the PKI and key in `dir` and starts every process; `binary`
    /// is the `securemesh` executable.
    pub async fn start(binary: &Path, dir: &Path) -> Result<Self, BenchError> {
        let certs = dir.join("certs");
        securemesh_pki::init(&securemesh_pki::InitOptions {
            days: 1,
            force: true,
            ..securemesh_pki::InitOptions::new(certs.clone())
        })
        .map_err(|error| BenchError::Setup(format!("PKI: {error}")))?;
        let key_file = certs.join("encryption_key.txt");
        securemesh_crypto::write_new_key_file(&key_file, true)
            .map_err(|error| BenchError::Setup(format!("Fernet key: {error}")))?;
        let keys = KeyRing::from_file(&key_file)
            .map_err(|error| BenchError::Setup(format!("Fernet key: {error}")))?;
        let tls = securemesh_tls::client_tls_config(&TlsFiles {
            cert: certs.join("client_cert.pem"),
            key: certs.join("client_key.pem"),
            ca: certs.join("ca_cert.pem"),
        })
        .map_err(|error| BenchError::Setup(format!("client TLS: {error}")))?;
        let certs_arg = certs.display().to_string();

        let mut servers = Vec::new();
        for index in 1..=2 {
            let port = free_port()?;
            let process = Process::start(
                dir,
                &format!("server{index}"),
                binary,
                vec![
                    "server".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--certs".into(),
                    certs_arg.clone(),
                    "--hide-plaintext".into(),
                    // The direct route: the load generator calls a server.
                    "--allow".into(),
                    securemesh_pki::identity_uri(securemesh_pki::Role::Client, "client"),
                ],
            )?;
            servers.push((port, process));
        }
        let coordinator_port = free_port()?;
        let mut coordinator_args = vec![
            "--threads".into(),
            crate::PROXY_WORKERS.to_string(),
            "coordinator".into(),
            "--listen".into(),
            format!("127.0.0.1:{coordinator_port}"),
            "--certs".into(),
            certs_arg.clone(),
        ];
        for (port, _) in &servers {
            coordinator_args.push("--backend".into());
            coordinator_args.push(url(*port));
        }
        let coordinator = Process::start(dir, "coordinator", binary, coordinator_args)?;
        let nginx_binary = nginx::binary()?;
        let nginx_port = free_port()?;
        let upstreams: Vec<u16> = servers.iter().map(|(port, _)| *port).collect();
        let nginx = nginx::start(
            &nginx_binary,
            &NginxSetup {
                dir: &dir.join("nginx"),
                certs: &certs,
                port: nginx_port,
                upstreams: &upstreams,
            },
        )?;
        let lab = Self {
            dir: dir.to_owned(),
            servers,
            coordinator: (coordinator_port, coordinator),
            nginx: (nginx_port, nginx),
            nginx_version: nginx::version(&nginx_binary),
            tls,
            keys,
        };
        for index in 0..lab.servers.len() {
            lab.server_ready(index).await?;
        }
        for route in [Route::Coordinator, Route::Nginx] {
            lab.answering(route).await?;
        }
        Ok(lab)
    }

    /// The URL of `route`.
    pub fn url(&self, route: Route) -> String {
        url(match route {
            Route::Direct => self.servers[0].0,
            Route::Coordinator => self.coordinator.0,
            Route::Nginx => self.nginx.0,
        })
    }

    /// The servers' memory and CPU, summed.
    pub fn servers_usage(&self) -> crate::process::Usage {
        self.servers.iter().map(|(_, server)| server.usage()).sum()
    }

    /// The proxy process of `route` (none for the direct route).
    pub fn proxy(&self, route: Route) -> Option<&Process> {
        match route {
            Route::Direct => None,
            Route::Coordinator => Some(&self.coordinator.1),
            Route::Nginx => Some(&self.nginx.1),
        }
    }

    /// `connections` clients of `route` (one HTTP/2 connection each) that
    /// never retry: what a route fails, the benchmark sees.
    pub fn clients(&self, route: Route, connections: usize) -> Result<Vec<Client>, BenchError> {
        let balance = BalanceOptions {
            max_retries: 0,
            ..BalanceOptions::default()
        };
        (0..connections.max(1))
            .map(|_| {
                Client::with_balance(
                    &[self.url(route)],
                    self.tls.clone(),
                    self.keys.clone(),
                    CALL_TIMEOUT,
                    balance.clone(),
                    false,
                )
                .map_err(|error| BenchError::Setup(format!("client of {}: {error}", route.name())))
            })
            .collect()
    }

    /// Waits until server `index` answers its health check.
    pub async fn server_ready(&self, index: usize) -> Result<(), BenchError> {
        let (port, process) = &self.servers[index];
        securemesh_client::wait_until_serving(
            &url(*port),
            self.tls.clone(),
            Duration::from_secs(20),
        )
        .await
        .map_err(|error| {
            BenchError::Setup(format!(
                "server {index} did not start: {error}\n{}",
                process.log_tail()
            ))
        })
    }

    /// Waits until a call through `route` succeeds.
    pub async fn answering(&self, route: Route) -> Result<(), BenchError> {
        let clients = self.clients(route, 1)?;
        let started = tokio::time::Instant::now();
        loop {
            match clients[0].submit(b"ready?").await {
                Ok(_) => return Ok(()),
                Err(error) if started.elapsed() > Duration::from_secs(20) => {
                    let log = self.proxy(route).map(Process::log_tail).unwrap_or_default();
                    return Err(BenchError::Setup(format!(
                        "{} does not answer: {error}\n{log}",
                        route.name()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Opens `count` TLS connections to `route`, each carrying one call so
    /// that the proxy holds a whole HTTP/2 session for it; returns them, to
    /// be held.
    pub async fn hold_connections(
        &self,
        route: Route,
        count: usize,
    ) -> Result<Vec<Channel>, BenchError> {
        let endpoint = self
            .tls
            .apply(
                Endpoint::from_shared(self.url(route))
                    .map_err(|error| BenchError::Setup(error.to_string()))?
                    .connect_timeout(Duration::from_secs(10)),
            )
            .map_err(|error| BenchError::Setup(error.to_string()))?;
        let token = self.keys.encrypt(b"held");
        let mut held = Vec::with_capacity(count);
        // In batches, so that handshakes do not pile up past timeouts.
        for batch in (0..count).collect::<Vec<_>>().chunks(50) {
            let opened = batch.iter().map(|_| {
                let endpoint = endpoint.clone();
                let token = token.clone();
                async move {
                    let channel = endpoint.connect().await?;
                    // A proxy may refuse a call for a moment (nginx marks
                    // an upstream down for `fail_timeout` after one
                    // failure): the connection is what is measured.
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        let answered = DataServiceClient::new(channel.clone())
                            .submit(SubmitRequest {
                                token: token.clone().into(),
                            })
                            .await;
                        match answered {
                            Ok(_) => break,
                            Err(status) if tries >= 3 => {
                                return Err(BenchError::Setup(status.to_string()));
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                    }
                    Ok::<_, BenchError>(channel)
                }
            });
            for channel in futures_join_all(opened).await {
                held.push(channel?);
            }
        }
        Ok(held)
    }
}

/// Runs the futures concurrently, in order of results.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(output) = handle.await {
            outputs.push(output);
        }
    }
    outputs
}
