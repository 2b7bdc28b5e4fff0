//! `securemesh demo`: the lab's five terminals in one command.
//!
//! It makes certificates and a key when missing, starts two servers and the
//! coordinator as child processes of this same binary (their output shown
//! with a prefix), sends from two clients, kills server 1 and shows the
//! failover, restarts it and shows it serving again, then stops everything
//! with SIGTERM. Every step is checked; the first that misbehaves ends the
//! demo with an error (children are killed on the way out).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use securemesh_client::Client;
use securemesh_crypto::KeyRing;
use securemesh_tls::TlsFiles;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::args::DemoArgs;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long clients keep sending after server 1 is killed: twice the
/// coordinator's default health interval.
const FAILOVER_WINDOW: Duration = Duration::from_secs(2);

/// Runs the demo; exits 0 only if every step behaved.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let certs = args.certs.clone();
    let [port1, port2] = match args.server_ports[..] {
        [first, second] => [first, second],
        _ => bail!("--server-ports takes exactly two ports"),
    };
    let server1_id = format!("127.0.0.1:{port1}");
    let server2_id = format!("127.0.0.1:{port2}");
    let coordinator_url = format!("https://127.0.0.1:{}", args.coordinator_port);

    let ports = [port1, port2, args.coordinator_port];
    ensure!(
        !ports.contains(&0),
        "the demo's ports must be given (0 picks none the demo could call)"
    );
    ensure!(
        port1 != port2 && !ports[..2].contains(&args.coordinator_port),
        "--server-ports and --coordinator-port must be three different ports"
    );
    for port in ports {
        ensure_free(port)?;
    }

    step("1. Certificates (CA, server, coordinator, clients) and the Fernet key");
    prepare_material(&certs)?;

    step("2. Two servers and the coordinator");
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut mesh = Mesh {
        exe,
        certs: certs.clone(),
        children: Vec::new(),
    };
    let server_args = |port: u16| vec!["server".to_owned(), port.to_string()];
    mesh.start("server-1", server_args(port1))?;
    mesh.start("server-2", server_args(port2))?;
    let readiness_tls = securemesh_tls::client_tls_config(&TlsFiles::in_dir(&certs, "client"))?;
    // Servers first, so that the coordinator's first health checks find
    // them serving.
    for (label, server) in [("server-1", &server1_id), ("server-2", &server2_id)] {
        let target = format!("https://{server}");
        mesh.wait_serving(label, &target, &readiness_tls).await?;
        crate::output::line(format_args!("{target} is SERVING"));
    }
    mesh.start(
        "coordinator",
        vec![
            "coordinator".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", args.coordinator_port),
            "--backend".into(),
            format!("https://{server1_id}"),
            "--backend".into(),
            format!("https://{server2_id}"),
        ],
    )?;
    mesh.wait_serving("coordinator", &coordinator_url, &readiness_tls)
        .await?;
    crate::output::line(format_args!("{coordinator_url} is SERVING"));

    let keys = KeyRing::from_file(&certs.join("encryption_key.txt"))?;
    let client1 = DemoClient::new("Client1", "client", &certs, &coordinator_url, &keys)?;
    let client2 = DemoClient::new("Client2", "client2", &certs, &coordinator_url, &keys)?;

    step("3. Two clients send encrypted data through the coordinator");
    let mut served_by = Vec::new();
    for round in 1..=2 {
        served_by.push(
            client1
                .send(&format!("Sensitive data from Client1, part {round}"))
                .await?,
        );
        served_by.push(
            client2
                .send(&format!("Sensitive data from Client2, part {round}"))
                .await?,
        );
    }
    crate::output::line(format_args!("served by: {}", served_by.join(", ")));

    step(&format!("4. Server 1 ({server1_id}) is killed (SIGKILL)"));
    mesh.kill("server-1").await?;
    // Keep both clients sending for longer than the coordinator's health
    // interval: whichever notices first, a failed call or a failed probe,
    // the coordinator reports the failure while the clients see none.
    let window = tokio::time::Instant::now() + FAILOVER_WINDOW;
    let mut round = 0;
    while tokio::time::Instant::now() < window {
        round += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        for client in [&client1, &client2] {
            let server = client
                .send(&format!(
                    "Data from {} after the failure, part {round}",
                    client.name
                ))
                .await?;
            ensure!(
                server == server2_id,
                "after server 1 was killed a reply came from {server}"
            );
        }
    }
    crate::output::line(format_args!(
        "failover: every request was served by {server2_id}, none failed"
    ));

    step(&format!("5. Server 1 ({server1_id}) is started again"));
    mesh.start("server-1", server_args(port1))?;
    mesh.wait_serving("server-1", &format!("https://{server1_id}"), &readiness_tls)
        .await?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let server = client1
            .send(&format!(
                "Data from Client1 after the recovery, part {attempts}"
            ))
            .await?;
        if server == server1_id {
            break;
        }
        ensure!(
            attempts < 60,
            "server 1 got no traffic after {attempts} requests"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::output::line(format_args!("recovery: server 1 serves again (after {attempts} request(s)), no restart of the coordinator"));

    step("6. Shutting down (SIGTERM)");
    mesh.stop_all().await?;
    crate::output::line("\nDemo complete: every step behaved.");
    Ok(ExitCode::SUCCESS)
}

/// Fails early, with the flag to use, when a port of the demo is taken.
fn ensure_free(port: u16) -> anyhow::Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .with_context(|| {
            format!(
                "port {port} on 127.0.0.1 is in use; choose others with \
                 --server-ports A,B and --coordinator-port C"
            )
        })
}

fn step(title: &str) {
    crate::output::line(format_args!("\n=== {title} ==="));
}

/// Creates the PKI and the key in `certs` unless they are there already.
fn prepare_material(certs: &Path) -> anyhow::Result<()> {
    if certs.join(securemesh_pki::CA_CERT_FILE).exists() {
        crate::output::line(format_args!(
            "using the certificates in {}",
            certs.display()
        ));
    } else {
        let written = securemesh_pki::init(&securemesh_pki::InitOptions::new(certs))?;
        crate::output::line(format_args!(
            "created {} files in {}",
            written.len(),
            certs.display()
        ));
    }
    let key = certs.join("encryption_key.txt");
    if key.exists() {
        crate::output::line(format_args!("using the Fernet key {}", key.display()));
    } else {
        securemesh_crypto::write_new_key_file(&key, false)?;
        crate::output::line(format_args!("created the Fernet key {}", key.display()));
    }
    Ok(())
}

struct DemoClient {
    name: &'static str,
    client: Client,
}

impl DemoClient {
    fn new(
        name: &'static str,
        identity: &str,
        certs: &Path,
        target: &str,
        keys: &KeyRing,
    ) -> anyhow::Result<Self> {
        let tls = securemesh_tls::client_tls_config(&TlsFiles::in_dir(certs, identity))?;
        Ok(Self {
            name,
            client: Client::new(&[target.to_owned()], tls, keys.clone(), CALL_TIMEOUT)?,
        })
    }

    /// Sends `message` and returns the id of the server that handled it.
    async fn send(&self, message: &str) -> anyhow::Result<String> {
        match self.client.submit(message.as_bytes()).await {
            Ok(reply) => {
                crate::output::line(format_args!(
                    "[{}] Success: result={} server={}",
                    self.name, reply.result, reply.server_id
                ));
                Ok(reply.server_id)
            }
            Err(error) => bail!("[{}] Failed: {error}", self.name),
        }
    }
}

/// The child processes of the demo. Dropping it kills them all.
struct Mesh {
    exe: PathBuf,
    certs: PathBuf,
    children: Vec<(&'static str, Child)>,
}

impl Mesh {
    fn start(&mut self, label: &'static str, mut args: Vec<String>) -> anyhow::Result<()> {
        args.extend(["--certs".to_owned(), self.certs.display().to_string()]);
        crate::output::line(format_args!("$ securemesh {}", args.join(" ")));
        let mut command = Command::new(&self.exe);
        command.args(&args).env("RUST_LOG", "info");
        securemesh::children::for_lab(command.as_std_mut());
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {label}"))?;
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(relay(label, stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(relay(label, stderr));
        }
        self.children.retain(|(existing, _)| *existing != label);
        self.children.push((label, child));
        Ok(())
    }

    /// Waits until `target`, served by the child `label`, is SERVING;
    /// fails as soon as that child exits (a bad certificate, a port taken)
    /// rather than when the wait times out.
    async fn wait_serving(
        &mut self,
        label: &str,
        target: &str,
        tls: &securemesh_tls::ClientTls,
    ) -> anyhow::Result<()> {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(existing, _)| *existing == label)
            .with_context(|| format!("{label} is not running"))?;
        tokio::select! {
            ready = securemesh_client::wait_until_serving(target, tls.clone(), READY_TIMEOUT) => {
                Ok(ready?)
            }
            exited = child.wait() => {
                bail!("{label} exited ({}) before it was serving", exited?)
            }
        }
    }

    async fn kill(&mut self, label: &str) -> anyhow::Result<()> {
        let position = self
            .children
            .iter()
            .position(|(existing, _)| *existing == label)
            .with_context(|| format!("{label} is not running"))?;
        let (_, mut child) = self.children.remove(position);
        child.kill().await?;
        Ok(())
    }

    /// SIGTERM to each child, coordinator first; each must exit 0 in time.
    async fn stop_all(&mut self) -> anyhow::Result<()> {
        let mut children = std::mem::take(&mut self.children);
        children.sort_by_key(|(label, _)| *label != "coordinator");
        for (label, mut child) in children {
            if let Some(pid) = child.id() {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                )
                .with_context(|| format!("cannot signal {label}"))?;
            }
            let status = tokio::time::timeout(STOP_TIMEOUT, child.wait())
                .await
                .with_context(|| format!("{label} did not stop within {STOP_TIMEOUT:?}"))??;
            ensure!(status.success(), "{label} exited with {status}");
            crate::output::line(format_args!("{label} stopped cleanly"));
        }
        Ok(())
    }
}

async fn relay(label: &'static str, output: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        crate::output::line(format_args!("  [{label}] {line}"));
    }
}
