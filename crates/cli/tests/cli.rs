//! Tests of the real `securemesh` binary: the PKI and key commands, a mesh
//! of separate processes, and interop with the clients users will bring:
//! grpcurl with client certificates, and Python grpcio with
//! `cryptography.fernet`.
//!
//! grpcurl and the Python packages are installed by `.ci/run`; a missing
//! tool fails these tests with a message saying so rather than skipping.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod common;

use common::{free_port, mode_of, securemesh, text, tool};

#[test]
fn pki_init_writes_verifiable_private_material_and_never_overwrites() {
    let work = tempfile::tempdir().unwrap();
    let init = securemesh(
        &["pki", "init", "--client", "alice", "--san", "mesh.test"],
        work.path(),
    );
    assert!(init.status.success(), "{}", text(&init));
    let certs = work.path().join("certs");
    for name in ["server", "coordinator", "client", "client2", "alice"] {
        let cert = certs.join(format!("{name}_cert.pem"));
        let verify = tool("openssl")
            .args(["verify", "-CAfile"])
            .arg(certs.join("ca_cert.pem"))
            .arg(&cert)
            .output()
            .unwrap();
        assert!(verify.status.success(), "{name}: {}", text(&verify));
        assert_eq!(
            mode_of(&certs.join(format!("{name}_key.pem"))),
            0o600,
            "{name}"
        );
    }
    assert_eq!(mode_of(&certs.join("ca_key.pem")), 0o600);

    let again = securemesh(&["pki", "init"], work.path());
    assert!(!again.status.success());
    assert!(
        text(&again).contains("ca_cert.pem already exists"),
        "{}",
        text(&again)
    );

    let forced = securemesh(&["pki", "init", "--force"], work.path());
    assert!(forced.status.success(), "{}", text(&forced));

    let issued = securemesh(
        &[
            "pki", "issue", "server3", "--role", "server", "--san", "10.1.2.3",
        ],
        work.path(),
    );
    assert!(issued.status.success(), "{}", text(&issued));
    let shown = tool("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(certs.join("server3_cert.pem"))
        .output()
        .unwrap();
    let shown = text(&shown);
    assert!(shown.contains("IP Address:10.1.2.3"), "{shown}");
    assert!(shown.contains("DNS:localhost"), "{shown}");
    assert!(shown.contains("TLS Web Server Authentication"), "{shown}");
    assert!(!shown.contains("Client Authentication"), "{shown}");

    let duplicate = securemesh(
        &["pki", "issue", "server3", "--role", "server"],
        work.path(),
    );
    assert!(!duplicate.status.success());
    assert!(text(&duplicate).contains("server3_cert.pem already exists"));
}

#[test]
fn the_old_shared_listen_variable_is_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["server", "coordinator"] {
        let run = common::command()
            .arg(command)
            .env("SECUREMESH_LISTEN", "0.0.0.0:5001")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(1), "{command}: {}", text(&run));
        assert!(
            text(&run).contains("SECUREMESH_LISTEN is not read any more"),
            "{}",
            text(&run)
        );
    }
}

/// A server that cannot start (its admin port is taken) says so before
/// it announces itself: with `--register` it would otherwise have
/// registered in etcd and left its key behind until the lease expired.
#[test]
fn a_server_that_cannot_start_fails_before_it_announces_itself() {
    let dir = tempfile::tempdir().unwrap();
    assert!(securemesh(&["pki", "init"], dir.path()).status.success());
    assert!(securemesh(&["keygen"], dir.path()).status.success());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let port = free_port().to_string();
    let run = securemesh(&["server", &port, "--metrics-listen", &taken], dir.path());
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(text(&run).contains("for metrics"), "{}", text(&run));
    assert!(!text(&run).contains("Server listening"), "{}", text(&run));
}

#[test]
fn a_flag_from_the_environment_takes_1_yes_and_true() {
    let dir = tempfile::tempdir().unwrap();
    assert!(securemesh(&["pki", "init"], dir.path()).status.success());
    assert!(securemesh(&["keygen"], dir.path()).status.success());
    for (value, hidden) in [
        ("1", true),
        ("yes", true),
        ("true", true),
        ("on", true),
        ("off", false),
    ] {
        let port = free_port();
        let log = dir.path().join(format!("server-{value}.log"));
        std::fs::File::create(&log).unwrap();
        let appending = || std::fs::File::options().append(true).open(&log).unwrap();
        let mut server = common::command()
            .args([
                "server",
                &port.to_string(),
                "--allow",
                "spiffe://securemesh/client/client",
            ])
            .env("SECUREMESH_HIDE_PLAINTEXT", value)
            .env("RUST_LOG", "info")
            .current_dir(dir.path())
            .stdout(appending())
            .stderr(appending())
            .spawn()
            .unwrap();
        let target = format!("https://127.0.0.1:{port}");
        let started = Instant::now();
        let message = format!("told by {value}");
        while !securemesh(
            &["client", "--target", &target, "--message", &message],
            dir.path(),
        )
        .status
        .success()
        {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = server.kill();
                panic!("{value}: the server never answered");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The audit line comes after the plaintext's (if any): once it is
        // written, so is the other.
        let audited = Instant::now();
        let log = loop {
            let log = std::fs::read_to_string(&log).unwrap();
            if common::has_line_with(&log, &["audit", r#"status="OK""#]) {
                break log;
            }
            if audited.elapsed() > Duration::from_secs(10) {
                let _ = server.kill();
                panic!("{value}: no audit line in {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(
            log.contains(&format!("Decrypted data: {message}")),
            !hidden,
            "{value}: {log}"
        );
    }
}

#[test]
fn keygen_writes_a_private_fernet_key_once() {
    let work = tempfile::tempdir().unwrap();
    let first = securemesh(&["keygen"], work.path());
    assert!(first.status.success(), "{}", text(&first));
    let path = work.path().join("certs/encryption_key.txt");
    assert_eq!(mode_of(&path), 0o600);
    let key = std::fs::read_to_string(&path).unwrap();
    assert_eq!(key.trim().len(), 44, "{key:?}");

    let again = securemesh(&["keygen"], work.path());
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), key);

    let forced = securemesh(&["keygen", "--force"], work.path());
    assert!(forced.status.success());
    assert_ne!(std::fs::read_to_string(&path).unwrap(), key);
}

/// `encrypt -` and `decrypt -` read standard input, so that a secret
/// stays out of `ps` and the shell's history; the message as sent, its
/// last newline included.
#[test]
fn encrypt_and_decrypt_read_standard_input_for_a_dash() {
    use std::io::Write as _;
    let work = tempfile::tempdir().unwrap();
    assert!(securemesh(&["keygen"], work.path()).status.success());
    let through_stdin = |args: &[&str], input: &[u8]| {
        let mut child = common::command()
            .args(args)
            .current_dir(work.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let encrypted = through_stdin(&["encrypt", "-"], b"not in ps\n");
    assert!(encrypted.status.success(), "{}", text(&encrypted));
    let token = String::from_utf8(encrypted.stdout).unwrap();
    let decrypted = through_stdin(&["decrypt", "-"], token.as_bytes());
    assert!(decrypted.status.success(), "{}", text(&decrypted));
    // Into a pipe, the plaintext exactly as sent: binary too.
    assert_eq!(decrypted.stdout, b"not in ps\n");
    let binary = [0, 0xff, 0x1b, b'[', b'2', b'J', b'\n', 0x80];
    let encrypted = through_stdin(&["encrypt", "-"], &binary);
    assert!(encrypted.status.success(), "{}", text(&encrypted));
    let decrypted = through_stdin(&["decrypt", "-"], &encrypted.stdout);
    assert!(decrypted.status.success(), "{}", text(&decrypted));
    assert_eq!(decrypted.stdout, binary);
}

/// A command whose output cannot be written fails with a message, never
/// a panic; a Bearer token nobody could see is said to be one.
#[test]
fn a_one_shot_command_says_its_output_was_lost() {
    let work = tempfile::tempdir().unwrap();
    let into_full = |args: &[&str]| {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        common::command()
            .args(args)
            .current_dir(work.path())
            .stdout(Stdio::from(full))
            .output()
            .unwrap()
    };
    let keygen = into_full(&["keygen"]);
    let stderr = String::from_utf8_lossy(&keygen.stderr);
    assert_eq!(keygen.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write to standard output"),
        "{stderr}"
    );
    let token = into_full(&["credentials", "add-token", "unseen"]);
    let stderr = String::from_utf8_lossy(&token.stderr);
    assert_eq!(token.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the token unseen is in") && stderr.contains("could not be shown"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Two servers and a coordinator as child processes on free ports, with
/// their output in files. Every process is killed on drop.
struct Mesh {
    work: TempDir,
    servers: Vec<(u16, Child)>,
    coordinator: Option<Child>,
    coordinator_port: u16,
}

impl Mesh {
    fn start() -> Self {
        let work = tempfile::tempdir().unwrap();
        assert!(securemesh(&["pki", "init"], work.path()).status.success());
        assert!(securemesh(&["keygen"], work.path()).status.success());
        let mut mesh = Self {
            work,
            servers: Vec::new(),
            coordinator: None,
            coordinator_port: free_port(),
        };
        let ports = [free_port(), free_port()];
        for port in ports {
            let server = mesh.spawn(&format!("server-{port}"), &["server", &port.to_string()]);
            mesh.servers.push((port, server));
        }
        // As in the lab: servers first, so that the coordinator's first
        // health checks find them serving.
        for port in ports {
            mesh.wait_serving(port);
        }
        let listen = format!("127.0.0.1:{}", mesh.coordinator_port);
        let mut args = vec!["coordinator", "--listen", &listen];
        let backends: Vec<String> = ports
            .iter()
            .map(|p| format!("https://127.0.0.1:{p}"))
            .collect();
        for backend in &backends {
            args.extend(["--backend", backend]);
        }
        mesh.coordinator = Some(mesh.spawn("coordinator", &args));
        mesh.wait_serving(mesh.coordinator_port);
        mesh
    }

    fn spawn(&self, label: &str, args: &[&str]) -> Child {
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        common::spawn_logged(self.work.path(), label, &args)
    }

    fn log(&self, label: &str) -> String {
        common::log(self.work.path(), label)
    }

    /// `label`'s log once it has a line with every one of `needles`. A
    /// refused handshake is logged by the handshake's own task, possibly
    /// after the peer has already given up.
    fn until_logged(&self, label: &str, needles: &[&str]) -> String {
        let started = Instant::now();
        loop {
            let log = self.log(label);
            if common::has_line_with(&log, needles) {
                return log;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no line with {needles:?} in {label}'s log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn certs(&self) -> PathBuf {
        self.work.path().join("certs")
    }

    /// Polls the DataService's health with grpcurl until it is SERVING
    /// (not merely answering: a coordinator without a backend answers
    /// NOT_SERVING).
    fn wait_serving(&self, port: u16) {
        let started = Instant::now();
        let service = r#"{"service":"securemesh.v1.DataService"}"#;
        loop {
            let check = self.grpcurl(port, &["-d", service], &["grpc.health.v1.Health/Check"]);
            if check.status.success() && text(&check).contains(r#""status": "SERVING""#) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "port {port} not SERVING: {}",
                text(&check)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `grpcurl <certificate flags> <flags> 127.0.0.1:<port> <command>`,
    /// as the client `client`.
    fn grpcurl(&self, port: u16, flags: &[&str], command: &[&str]) -> Output {
        let certs = self.certs();
        let identity = (certs.join("client_cert.pem"), certs.join("client_key.pem"));
        self.grpcurl_as(Some(identity), port, flags, command)
    }

    /// grpcurl trusting our CA, with the certificate and key `identity`
    /// (none: no client certificate).
    fn grpcurl_as(
        &self,
        identity: Option<(PathBuf, PathBuf)>,
        port: u16,
        flags: &[&str],
        command: &[&str],
    ) -> Output {
        let mut grpcurl = tool("grpcurl");
        grpcurl.arg("-cacert").arg(self.certs().join("ca_cert.pem"));
        if let Some((cert, key)) = identity {
            grpcurl.arg("-cert").arg(cert).arg("-key").arg(key);
        }
        grpcurl
            .args(["-max-time", "5"])
            .args(flags)
            .arg(format!("127.0.0.1:{port}"))
            .args(command)
            .output()
            .unwrap()
    }

    fn client(&self, args: &[&str]) -> Output {
        let target = format!("https://127.0.0.1:{}", self.coordinator_port);
        let mut all = vec!["client", "--target", &target];
        all.extend(args);
        securemesh(&all, self.work.path())
    }
}

impl Mesh {
    /// Sends SIGHUP to the process `label` and waits until it has reloaded.
    fn reload(&self, label: &str, child: &Child) {
        let done = |log: &str| log.matches("reloaded certificates").count();
        let before = done(&self.log(label));
        common::signal(child, nix::sys::signal::Signal::SIGHUP);
        let started = Instant::now();
        while done(&self.log(label)) == before {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{label} did not reload: {}",
                self.log(label)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGHUP to `child` and waits until it logs a failed reload.
    fn reload_fails(&self, label: &str, child: &Child) {
        let failed = |log: &str| log.matches("reload failed").count();
        let before = failed(&self.log(label));
        common::signal(child, nix::sys::signal::Signal::SIGHUP);
        let started = Instant::now();
        while failed(&self.log(label)) == before {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{label} did not refuse the reload: {}",
                self.log(label)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SHA-256 fingerprint of the certificate a TLS handshake on `port`
    /// presents, or of a PEM file.
    fn fingerprint(&self, source: Result<u16, &Path>) -> String {
        let certs = self.certs();
        let script = match source {
            Ok(port) => format!(
                "openssl s_client -connect 127.0.0.1:{port} -CAfile {ca} -cert {cert} -key {key} \
                 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
                ca = certs.join("ca_cert.pem").display(),
                cert = certs.join("client_cert.pem").display(),
                key = certs.join("client_key.pem").display(),
            ),
            Err(file) => format!(
                "openssl x509 -noout -fingerprint -sha256 -in {}",
                file.display()
            ),
        };
        let output = tool("sh").args(["-c", &script]).output().unwrap();
        let fingerprint = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(fingerprint.contains("Fingerprint="), "{}", text(&output));
        fingerprint
    }
}

impl Mesh {
    /// Stops every server and the coordinator with SIGTERM and waits for
    /// each to exit cleanly, so that their logs are complete.
    fn stop(&mut self) {
        if let Some(coordinator) = &mut self.coordinator {
            assert!(common::terminate(coordinator).success());
        }
        for (_, server) in &mut self.servers {
            assert!(common::terminate(server).success());
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for (_, child) in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(child) = &mut self.coordinator {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn separate_processes_serve_fail_over_and_stop_cleanly() {
    let mut mesh = Mesh::start();
    let (port1, port2) = (mesh.servers[0].0, mesh.servers[1].0);

    let one = mesh.client(&["--name", "Client1"]);
    assert!(one.status.success(), "{}", text(&one));
    assert!(
        String::from_utf8_lossy(&one.stdout)
            .starts_with("[Client1] Success: result=ok server=127.0.0.1:"),
        "{}",
        text(&one)
    );
    let two = mesh.client(&[
        "--name",
        "Client2",
        "--identity",
        "client2",
        "--message",
        "from two",
    ]);
    assert!(two.status.success(), "{}", text(&two));
    let one_in_json = mesh.client(&["--json"]);
    assert!(one_in_json.status.success(), "{}", text(&one_in_json));
    let answer: serde_json::Value = serde_json::from_slice(&one_in_json.stdout).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"], "ok", "{answer}");
    assert!(answer["server"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(answer["request_id"].is_string(), "{answer}");

    let load = mesh.client(&[
        "--requests",
        "200",
        "--concurrency",
        "8",
        "--timeline",
        "50ms",
        "--json",
    ]);
    assert!(load.status.success(), "{}", text(&load));
    let summary: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
    for key in [
        "requests",
        "ok",
        "failed",
        "elapsed_s",
        "rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "errors",
        "servers",
    ] {
        assert!(summary.get(key).is_some(), "no {key} in {summary}");
    }
    assert_eq!(summary["ok"], 200);
    assert_eq!(summary["failed"], 0);
    let servers = summary["servers"].as_object().unwrap();
    assert_eq!(servers.len(), 2, "{summary}");
    let answered_per_bucket: u64 = summary["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|bucket| bucket["ok"].as_u64().unwrap() + bucket["failed"].as_u64().unwrap())
        .sum();
    assert_eq!(answered_per_bucket, 200, "{summary}");

    // An open loop end to end: calls on a schedule over two
    // connections, each one due before the end sent and answered.
    let open = mesh.client(&[
        "--duration",
        "1s",
        "--rate",
        "200",
        "--connections",
        "2",
        "--json",
    ]);
    assert!(open.status.success(), "{}", text(&open));
    let summary: serde_json::Value = serde_json::from_slice(&open.stdout).unwrap();
    assert_eq!(
        (&summary["ok"], &summary["failed"]),
        (&200.into(), &0.into()),
        "{summary}"
    );

    let server_logs = format!(
        "{}{}",
        mesh.log(&format!("server-{port1}")),
        mesh.log(&format!("server-{port2}"))
    );
    assert!(
        server_logs.contains("Decrypted data: Sensitive data from Client1"),
        "{server_logs}"
    );
    assert!(server_logs.contains("Decrypted data: from two"));
    // Servers log the original caller, as the coordinator forwarded it.
    assert!(
        server_logs.contains(
            "caller=spiffe://securemesh/client/client2 via=spiffe://securemesh/both/coordinator"
        ),
        "{server_logs}"
    );
    mesh.until_logged(
        "coordinator",
        &["caller=spiffe://securemesh/client/client2"],
    );

    // Kill server 1: clients notice nothing, the coordinator says so.
    let (_, mut first) = mesh.servers.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    let after = mesh.client(&["--requests", "50", "--concurrency", "4", "--json"]);
    assert!(after.status.success(), "{}", text(&after));
    let summary: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(
        summary["servers"][format!("127.0.0.1:{port2}")],
        50,
        "{summary}"
    );
    mesh.until_logged(
        "coordinator",
        &[&format!("Server https://127.0.0.1:{port1} failed: ")],
    );

    // SIGTERM: graceful stops, exit status 0.
    let mut coordinator = mesh.coordinator.take().unwrap();
    common::signal(&coordinator, nix::sys::signal::Signal::SIGTERM);
    assert!(common::wait_exit(&mut coordinator).success());
    let (_, mut second) = mesh.servers.remove(0);
    common::signal(&second, nix::sys::signal::Signal::SIGTERM);
    assert!(common::wait_exit(&mut second).success());
}

#[test]
fn grpcurl_with_client_certificates_lists_and_calls() {
    let mesh = Mesh::start();
    let port = mesh.coordinator_port;

    let list = mesh.grpcurl(port, &[], &["list"]);
    let listed = text(&list);
    assert!(list.status.success(), "{listed}");
    for service in [
        "securemesh.v1.DataService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(listed.contains(service), "{service} not in {listed}");
    }
    let described = mesh.grpcurl(port, &[], &["describe", "securemesh.v1.SubmitReply"]);
    assert!(
        text(&described).contains("plaintext_sha256"),
        "{}",
        text(&described)
    );

    let token = securemesh(
        &["encrypt", "--json-bytes", "hello from grpcurl"],
        mesh.work.path(),
    );
    assert!(token.status.success(), "{}", text(&token));
    let token = String::from_utf8(token.stdout).unwrap();
    let body = format!("{{\"token\":\"{}\"}}", token.trim());
    let call = mesh.grpcurl(port, &["-d", &body], &["securemesh.v1.DataService/Submit"]);
    assert!(call.status.success(), "{}", text(&call));
    let reply: serde_json::Value = serde_json::from_slice(&call.stdout).unwrap();
    assert_eq!(reply["result"], "ok");
    assert!(reply["serverId"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    // protobuf JSON writes bytes as standard base64: SHA-256 of the text.
    use base64::Engine as _;
    let digest = base64::engine::general_purpose::STANDARD
        .decode(reply["plaintextSha256"].as_str().unwrap())
        .unwrap();
    assert_eq!(digest, securemesh_crypto::sha256(b"hello from grpcurl"));

    // The README's example of a refusal, answer included.
    let forged = mesh.grpcurl(
        port,
        &["-d", "{\"token\": \"bm90IGEgdG9rZW4=\"}"],
        &["securemesh.v1.DataService/Submit"],
    );
    assert!(!forged.status.success());
    assert!(
        text(&forged).contains("Code: InvalidArgument")
            && text(&forged).contains("Message: invalid token: malformed token: wrong length"),
        "{}",
        text(&forged)
    );

    // Without a client certificate the handshake is refused.
    let anonymous = mesh.grpcurl_as(None, port, &[], &["list"]);
    assert!(!anonymous.status.success(), "{}", text(&anonymous));
    assert!(
        text(&anonymous).contains("Failed to dial"),
        "{}",
        text(&anonymous)
    );
    // grpcurl may exit before the coordinator's log line is written.
    mesh.until_logged(
        "coordinator",
        &["TLS handshake refused", "peer sent no certificates"],
    );
}

#[test]
fn python_grpcio_client_interoperates_both_ways() {
    let mesh = Mesh::start();
    let stubs = mesh.work.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let generated = tool("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto.join("securemesh/v1/data.proto"))
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "grpcio-tools: {}",
        text(&generated)
    );

    let rust_token = securemesh(&["encrypt", "made in Rust"], mesh.work.path());
    assert!(rust_token.status.success());
    let rust_token = String::from_utf8(rust_token.stdout).unwrap();

    let certs = mesh.certs();
    // A key file with a comment, as people annotate them: not a key.
    let key_file = certs.join("encryption_key.txt");
    let keys = std::fs::read_to_string(&key_file).unwrap();
    std::fs::write(&key_file, format!("# made by keygen\n\n{keys}")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/python_client.py");
    let run = tool("python3")
        .arg(script)
        .arg("--stubs")
        .arg(&stubs)
        .arg("--target")
        .arg(format!("127.0.0.1:{}", mesh.coordinator_port))
        .arg("--ca")
        .arg(certs.join("ca_cert.pem"))
        .arg("--cert")
        .arg(certs.join("client_cert.pem"))
        .arg("--key")
        .arg(certs.join("client_key.pem"))
        .arg("--fernet-key")
        .arg(certs.join("encryption_key.txt"))
        .arg("--rust-token")
        .arg(rust_token.trim())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(run.status.success(), "python client: {}", text(&run));
    let result: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(result["result"], "ok", "{result}");
    assert_eq!(result["sha256_matches"], true, "{result}");
    assert_eq!(result["foreign_token"], "INVALID_ARGUMENT", "{result}");
    assert_eq!(result["rust_token_plaintext"], "made in Rust", "{result}");

    let python_token = result["python_token"].as_str().unwrap();
    let decrypted = securemesh(&["decrypt", python_token], mesh.work.path());
    assert!(decrypted.status.success(), "{}", text(&decrypted));
    assert_eq!(
        String::from_utf8_lossy(&decrypted.stdout).trim(),
        "Sensitive data from Python"
    );
}

#[test]
fn the_demo_runs_the_whole_lab_and_exits_zero() {
    let work = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let demo = common::command()
        .args(["demo", "--server-ports"])
        .arg(format!("{},{}", ports[0], ports[1]))
        .arg("--coordinator-port")
        .arg(ports[2].to_string())
        // Settings of the caller's that the lab's processes must not
        // inherit: every server would take one id, and every process one
        // metrics port.
        .env("SECUREMESH_SERVER_ID", "one-for-all")
        .env(
            "SECUREMESH_METRICS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .current_dir(work.path())
        .output()
        .unwrap();
    let transcript = text(&demo);
    assert!(demo.status.success(), "{transcript}");
    for line in [
        "[Client1] Success: result=ok server=127.0.0.1:".to_string(),
        "[Client2] Success: result=ok server=127.0.0.1:".to_string(),
        "Decrypted data: Sensitive data from Client1".to_string(),
        format!("Server https://127.0.0.1:{} failed: ", ports[0]),
        "recovery: server 1 serves again".to_string(),
        "coordinator stopped cleanly".to_string(),
        "Demo complete: every step behaved.".to_string(),
    ] {
        assert!(
            transcript.contains(&line),
            "missing {line:?} in\n{transcript}"
        );
    }
    assert_eq!(
        mode_of(&work.path().join("certs/encryption_key.txt")),
        0o600
    );
}

/// Ctrl-C or SIGTERM ends the demo with its servers and coordinator,
/// saying so, instead of leaving them to the system.
#[cfg(unix)]
#[test]
fn an_interrupted_demo_stops_its_processes_and_says_so() {
    use std::io::BufRead as _;
    let work = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut demo = common::command()
        .args(["demo", "--server-ports"])
        .arg(format!("{},{}", ports[0], ports[1]))
        .arg("--coordinator-port")
        .arg(ports[2].to_string())
        .current_dir(work.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let serving = format!("https://127.0.0.1:{} is SERVING", ports[2]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read.recv_timeout(left) {
            Ok(line) if line.contains(&serving) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = demo.kill();
                panic!("the demo's coordinator never served");
            }
        }
    }
    common::signal(&demo, nix::sys::signal::Signal::SIGTERM);
    let status = common::wait_exit(&mut demo);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut demo.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{status}: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    // Its processes are gone: each port can be bound again.
    for port in ports {
        let started = Instant::now();
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "port {port} still taken"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The demo refuses ports it could not tell apart (a readiness check
/// would pass against the wrong process), and a child that exits at start
/// ends it at once, not after its readiness wait times out.
#[test]
fn the_demo_refuses_a_port_twice_and_stops_when_a_child_dies_at_start() {
    let work = tempfile::tempdir().unwrap();
    let (port, other) = (free_port(), free_port());
    let demo = |ports: String, coordinator: u16| {
        common::command()
            .args(["demo", "--server-ports", &ports, "--coordinator-port"])
            .arg(coordinator.to_string())
            .current_dir(work.path())
            .output()
            .unwrap()
    };
    let twice = demo(format!("{port},{port}"), other);
    assert!(!twice.status.success());
    assert!(
        text(&twice).contains("three different ports"),
        "{}",
        text(&twice)
    );
    let shared = demo(format!("{port},{other}"), other);
    assert!(
        text(&shared).contains("three different ports"),
        "{}",
        text(&shared)
    );

    // A server key that is not a key: server 1 exits as it starts.
    assert!(securemesh(&["pki", "init"], work.path()).status.success());
    std::fs::write(work.path().join("certs/server_key.pem"), "not a key\n").unwrap();
    let started = Instant::now();
    let broken = demo(format!("{port},{other}"), free_port());
    let transcript = text(&broken);
    assert!(!broken.status.success(), "{transcript}");
    assert!(
        transcript.contains("server-1 exited") && transcript.contains("before it was serving"),
        "{transcript}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "{transcript}");
}

#[test]
fn a_draining_server_reports_not_serving_still_serves_then_exits_zero() {
    let mesh = Mesh::start();
    let port = free_port();
    let mut server = mesh.spawn(
        "drainer",
        &[
            "server",
            &port.to_string(),
            // Long enough for the grpcurl calls below (each starts a
            // Python shim first) on a loaded machine.
            "--drain-delay",
            "6s",
            // Called directly below, not through a coordinator.
            "--allow",
            "spiffe://securemesh/client/client",
        ],
    );
    mesh.wait_serving(port);
    let token = securemesh(
        &["encrypt", "--json-bytes", "during the drain"],
        mesh.work.path(),
    );
    let body = format!(
        "{{\"token\":\"{}\"}}",
        String::from_utf8_lossy(&token.stdout).trim()
    );

    let stopping = Instant::now();
    common::signal(&server, nix::sys::signal::Signal::SIGTERM);
    loop {
        let check = mesh.grpcurl(
            port,
            &["-d", "{\"service\":\"securemesh.v1.DataService\"}"],
            &["grpc.health.v1.Health/Check"],
        );
        if text(&check).contains("NOT_SERVING") {
            break;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "still SERVING after SIGTERM: {}",
            text(&check)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The process as a whole too: what probes without a service name see.
    let overall = mesh.grpcurl(port, &["-d", "{}"], &["grpc.health.v1.Health/Check"]);
    assert!(text(&overall).contains("NOT_SERVING"), "{}", text(&overall));
    let call = mesh.grpcurl(port, &["-d", &body], &["securemesh.v1.DataService/Submit"]);
    assert!(
        call.status.success(),
        "refused during the drain delay: {}",
        text(&call)
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(6),
        "the call came after the drain delay: it proves nothing"
    );

    assert!(common::wait_exit(&mut server).success());
    let log = mesh.log("drainer");
    assert!(log.contains("draining: NOT_SERVING"), "{log}");
    assert!(log.contains("server stopped"), "{log}");
}

/// Calls that tonic refuses before the handler runs (here a message over
/// the size limit) are audited and counted once, like every other call.
#[test]
fn a_server_audits_each_call_once_even_one_refused_before_its_handler() {
    let mesh = Mesh::start();
    let port = free_port();
    let mut server = mesh.spawn(
        "small",
        &[
            "server",
            &port.to_string(),
            "--max-message-size",
            "300",
            "--allow",
            "spiffe://securemesh/client/client",
        ],
    );
    mesh.wait_serving(port);
    let call = |request_id: &str, plaintext: &str| {
        let token = securemesh(&["encrypt", "--json-bytes", plaintext], mesh.work.path());
        let body = format!(
            "{{\"token\":\"{}\"}}",
            String::from_utf8_lossy(&token.stdout).trim()
        );
        let header = format!("x-request-id: {request_id}");
        mesh.grpcurl(
            port,
            &["-H", &header, "-d", &body],
            &["securemesh.v1.DataService/Submit"],
        )
    };
    let large = call("too-large-1", &"x".repeat(400));
    assert!(
        text(&large).contains("Code: OutOfRange"),
        "{}",
        text(&large)
    );
    let fits = call("fits-1", "small enough");
    assert!(fits.status.success(), "{}", text(&fits));

    assert!(common::terminate(&mut server).success());
    let log = mesh.log("small");
    let audited = |request_id: &str, status: &str| {
        log.lines()
            .filter(|line| {
                line.contains(" audit ") && line.contains(&format!("request_id={request_id} "))
            })
            .map(|line| line.contains(&format!("status=\"{status}\"")))
            .collect::<Vec<_>>()
    };
    assert_eq!(audited("too-large-1", "OUT_OF_RANGE"), [true], "{log}");
    assert_eq!(audited("fits-1", "OK"), [true], "{log}");
}

/// Ctrl-C ends a load run early with its summary, and the exit status
/// says so.
#[test]
fn an_interrupted_load_run_prints_what_it_counted() {
    let mesh = Mesh::start();
    let target = format!("https://127.0.0.1:{}", mesh.coordinator_port);
    let mut client = common::command()
        .args([
            "client",
            "--target",
            &target,
            "--duration",
            "60s",
            "--concurrency",
            "2",
            "--json",
        ])
        .current_dir(mesh.work.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let stopping = Instant::now();
    common::signal(&client, nix::sys::signal::Signal::SIGINT);
    let status = common::wait_exit(&mut client);
    assert!(stopping.elapsed() < Duration::from_secs(10));
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut client.stdout.take().unwrap(), &mut stdout).unwrap();
    assert_eq!(status.code(), Some(130), "{status} {stdout}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(summary["ok"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
}

#[test]
fn a_second_stop_signal_ends_a_drain_at_once() {
    let mesh = Mesh::start();
    let port = free_port();
    let log_file = mesh.work.path().join("impatient-file.log");
    let mut server = mesh.spawn(
        "impatient",
        &[
            "--log-file",
            log_file.to_str().unwrap(),
            "server",
            &port.to_string(),
            "--drain-delay",
            "30s",
        ],
    );
    mesh.wait_serving(port);
    common::signal(&server, nix::sys::signal::Signal::SIGTERM);
    mesh.until_logged("impatient", &["draining: NOT_SERVING"]);
    let stopping = Instant::now();
    common::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let status = common::wait_exit(&mut server);
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(143), "{status}");
    assert!(mesh.log("impatient").contains("second shutdown signal"));
    // The exit flushes the log file: its last line is there too.
    let file = std::fs::read_to_string(&log_file).unwrap();
    assert!(file.contains("second shutdown signal"), "{file}");
}

#[test]
fn revocation_renewal_and_key_rotation_take_effect_on_sighup() {
    let mesh = Mesh::start();
    let work = mesh.work.path();
    let coordinator = mesh.coordinator.as_ref().unwrap();
    let as_client2 = ["--identity", "client2", "--name", "Client2"];
    assert!(mesh.client(&as_client2).status.success());

    // Revoked: refused at the handshake once the coordinator reloads; the
    // other client is still served.
    let revoked = securemesh(&["pki", "revoke", "client2"], work);
    assert!(revoked.status.success(), "{}", text(&revoked));
    assert!(
        text(&revoked).starts_with("revoked client2"),
        "{}",
        text(&revoked)
    );
    let again = securemesh(&["pki", "revoke", "client2"], work);
    assert!(
        text(&again).starts_with("already revoked client2"),
        "{}",
        text(&again)
    );
    // Signed again, the list keeps its entry (the reload below still
    // refuses client2).
    let refreshed = securemesh(&["pki", "refresh-crl"], work);
    assert!(
        text(&refreshed).starts_with("signed "),
        "{}",
        text(&refreshed)
    );
    let shown = securemesh(&["pki", "show", "certs/ca_crl.pem"], work);
    for expected in ["Number:      3", "Revoked:     1"] {
        assert!(text(&shown).contains(expected), "{}", text(&shown));
    }
    mesh.reload("coordinator", coordinator);
    let refused = mesh.client(&as_client2);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("UNAVAILABLE"), "{}", text(&refused));
    mesh.until_logged("coordinator", &["TLS handshake refused", "Revoked"]);
    assert!(mesh.client(&["--name", "Client1"]).status.success());
    // A server refuses the revoked certificate at the handshake too (before
    // the reload it got as far as PERMISSION_DENIED: it may not call
    // servers directly).
    let (server_port, server) = &mesh.servers[0];
    let direct = || {
        let certs = mesh.certs();
        let client2 = (
            certs.join("client2_cert.pem"),
            certs.join("client2_key.pem"),
        );
        mesh.grpcurl_as(
            Some(client2),
            *server_port,
            &["-d", "{}"],
            &["securemesh.v1.DataService/Submit"],
        )
    };
    let before = direct();
    assert!(
        text(&before).contains("PermissionDenied"),
        "{}",
        text(&before)
    );
    mesh.reload(&format!("server-{server_port}"), server);
    let refused = direct();
    assert!(!refused.status.success());
    assert!(
        !text(&refused).contains("PermissionDenied"),
        "{}",
        text(&refused)
    );
    mesh.until_logged(
        &format!("server-{server_port}"),
        &["TLS handshake refused", "Revoked"],
    );
    // A CRL that disappears does not switch revocation off at the next
    // reload: the reload fails and the server keeps what it had.
    let crl = mesh.certs().join("ca_crl.pem");
    let aside = mesh.certs().join("ca_crl.pem.aside");
    std::fs::rename(&crl, &aside).unwrap();
    mesh.reload_fails(&format!("server-{server_port}"), server);
    let still_refused = direct();
    assert!(!still_refused.status.success());
    assert!(
        !text(&still_refused).contains("PermissionDenied"),
        "{}",
        text(&still_refused)
    );
    std::fs::rename(&aside, &crl).unwrap();
    mesh.until_logged(
        &format!("server-{server_port}"),
        &["reload failed", "revocation list", "is gone"],
    );

    // Renewed: new handshakes present the new certificate.
    let cert = mesh.certs().join("coordinator_cert.pem");
    let before = mesh.fingerprint(Err(&cert));
    assert_eq!(mesh.fingerprint(Ok(mesh.coordinator_port)), before);
    let renewed = securemesh(&["pki", "renew", "coordinator"], work);
    assert!(renewed.status.success(), "{}", text(&renewed));
    let after = mesh.fingerprint(Err(&cert));
    assert_ne!(after, before);
    mesh.reload("coordinator", coordinator);
    assert_eq!(mesh.fingerprint(Ok(mesh.coordinator_port)), after);
    assert!(mesh.client(&["--name", "Client1"]).status.success());

    // The coordinator connects to servers with its renewed certificate:
    // once the old one is revoked and the servers have reloaded, only the
    // new one gets through, and calls still succeed.
    let old_cert = std::fs::read(&cert).unwrap();
    std::fs::write(mesh.certs().join("previous_cert.pem"), &old_cert).unwrap();
    let renewed = securemesh(&["pki", "renew", "coordinator"], work);
    assert!(renewed.status.success(), "{}", text(&renewed));
    let revoked = securemesh(&["pki", "revoke", "previous"], work);
    assert!(revoked.status.success(), "{}", text(&revoked));
    for (port, server) in &mesh.servers {
        mesh.reload(&format!("server-{port}"), server);
    }
    let connected = |log: &str| log.matches("backend reconnected with new TLS").count();
    let before = connected(&mesh.log("coordinator"));
    mesh.reload("coordinator", coordinator);
    // Both backends were replaced: their old connections closed, and the
    // new ones can only have been made with the renewed certificate.
    assert_eq!(connected(&mesh.log("coordinator")), before + 2);
    let through = mesh.client(&["--requests", "20", "--concurrency", "4", "--json"]);
    assert!(through.status.success(), "{}", text(&through));

    // Rotated Fernet key: servers accept tokens under the new key and the
    // old one after they reload.
    let old_token = securemesh(&["encrypt", "--json-bytes", "under the old key"], work);
    let old_token = String::from_utf8_lossy(&old_token.stdout).trim().to_owned();
    let rotated = securemesh(&["keygen", "--rotate"], work);
    assert!(rotated.status.success(), "{}", text(&rotated));
    for (port, server) in &mesh.servers {
        mesh.reload(&format!("server-{port}"), server);
    }
    let new = mesh.client(&["--requests", "20", "--concurrency", "4", "--json"]);
    assert!(new.status.success(), "{}", text(&new));
    let body = format!("{{\"token\":\"{old_token}\"}}");
    let old = mesh.grpcurl(
        mesh.coordinator_port,
        &["-d", &body],
        &["securemesh.v1.DataService/Submit"],
    );
    assert!(old.status.success(), "{}", text(&old));

    // A staged rotation keeps no order between servers and clients: the
    // staged key reaches the servers first, and clients encrypt under it
    // once promoted, without the servers reloading again.
    let staged = securemesh(&["keygen", "--stage"], work);
    assert!(staged.status.success(), "{}", text(&staged));
    for (port, server) in &mesh.servers {
        mesh.reload(&format!("server-{port}"), server);
    }
    let promoted = securemesh(&["keygen", "--promote"], work);
    assert!(promoted.status.success(), "{}", text(&promoted));
    let after = mesh.client(&["--requests", "20", "--concurrency", "4", "--json"]);
    assert!(after.status.success(), "{}", text(&after));
    let kept = securemesh(&["keygen", "--keep", "1"], work);
    assert!(kept.status.success(), "{}", text(&kept));
    let keys = std::fs::read_to_string(work.join("certs/encryption_key.txt")).unwrap();
    assert_eq!(keys.lines().count(), 1);
    let both = securemesh(&["keygen", "--stage", "--promote"], work);
    assert!(!both.status.success(), "{}", text(&both));

    // A revoked server certificate: the coordinator, reloaded with the new
    // CRL, refuses the servers (calls fail) until they present a renewed
    // one; no process restarts.
    let revoked = securemesh(&["pki", "revoke", "server"], work);
    assert!(revoked.status.success(), "{}", text(&revoked));
    mesh.reload("coordinator", coordinator);
    let refused = mesh.client(&["--name", "Client1", "--timeout", "3s"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    mesh.until_logged("coordinator", &["Server https://127.0.0.1:", "Revoked"]);
    let renewed = securemesh(&["pki", "renew", "server"], work);
    assert!(renewed.status.success(), "{}", text(&renewed));
    for (port, server) in &mesh.servers {
        mesh.reload(&format!("server-{port}"), server);
    }
    let started = Instant::now();
    while !mesh.client(&["--name", "Client1"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "servers with a renewed certificate were not used again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let shown = securemesh(&["pki", "show", "certs/coordinator_cert.pem"], work);
    assert!(text(&shown).contains("URI:spiffe://securemesh/both/coordinator"));
}

#[test]
fn logs_never_show_keys_tokens_or_refused_plaintext() {
    let mut mesh = Mesh::start();
    let work = mesh.work.path();
    let ok = mesh.client(&["--message", "an accepted payload"]);
    assert!(ok.status.success(), "{}", text(&ok));

    // A token under another key, carrying a secret: refused, never decrypted.
    let other_key = work.join("other_key.txt");
    assert!(
        securemesh(&["keygen", "--out", other_key.to_str().unwrap()], work)
            .status
            .success()
    );
    let refused_token = securemesh(
        &[
            "encrypt",
            "--json-bytes",
            "--encryption-key",
            other_key.to_str().unwrap(),
            "TOP-SECRET-REFUSED-PAYLOAD",
        ],
        work,
    );
    let refused_token = String::from_utf8_lossy(&refused_token.stdout)
        .trim()
        .to_owned();
    // --json-bytes wraps the token in base64 once more for grpcurl; the
    // token the servers saw is the decoded form.
    use base64::Engine as _;
    let sent_token = base64::engine::general_purpose::STANDARD
        .decode(&refused_token)
        .map(|token| String::from_utf8_lossy(&token).into_owned())
        .unwrap();
    let body = format!("{{\"token\":\"{refused_token}\"}}");
    let refused = mesh.grpcurl(
        mesh.coordinator_port,
        &["-d", &body],
        &["securemesh.v1.DataService/Submit"],
    );
    assert!(
        text(&refused).contains("InvalidArgument"),
        "{}",
        text(&refused)
    );

    let key = std::fs::read_to_string(mesh.certs().join("encryption_key.txt")).unwrap();
    // Stopped, every process has written all it logged.
    mesh.stop();
    let mut logs = mesh.log("coordinator");
    for (port, _) in &mesh.servers {
        logs.push_str(&mesh.log(&format!("server-{port}")));
    }
    assert!(logs.contains("Submit refused"), "{logs}");
    for secret in [
        "TOP-SECRET-REFUSED-PAYLOAD",
        "PRIVATE KEY",
        key.trim(),
        refused_token.as_str(),
        sent_token.as_str(),
        "gAAAAA",
    ] {
        assert!(!logs.contains(secret), "the logs show {secret:?}:\n{logs}");
    }
}

#[test]
fn a_client_certificate_from_a_ca_made_with_openssl_is_refused() {
    let mesh = Mesh::start();
    let foreign = mesh.work.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    // Another CA, and a client certificate that even claims one of our
    // identities: only our CA can vouch for it.
    let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca.key -out ca.pem -days 2 -subj "/CN=foreign CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout client.key -out client.csr -subj "/CN=client" 2>/dev/null
printf 'extendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://securemesh/client/client\n' > ext.cnf
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out client.pem -days 1 -extfile ext.cnf 2>/dev/null
"#;
    let made = tool("sh")
        .args(["-c", script])
        .current_dir(&foreign)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {}", text(&made));

    let ports = [mesh.coordinator_port, mesh.servers[0].0];
    for port in ports {
        let foreign_identity = (foreign.join("client.pem"), foreign.join("client.key"));
        let refused = mesh.grpcurl_as(Some(foreign_identity), port, &[], &["list"]);
        assert!(!refused.status.success(), "{port}: {}", text(&refused));
        // Go's TLS client withholds a certificate the server's CA list does
        // not name; openssl presents it anyway, so the verifier judges it.
        let presented = format!(
            "openssl s_client -connect 127.0.0.1:{port} -alpn h2 -CAfile {ca} \
             -cert foreign/client.pem -key foreign/client.key </dev/null >/dev/null 2>&1; true",
            ca = mesh.certs().join("ca_cert.pem").display()
        );
        let presented = tool("sh")
            .args(["-c", &presented])
            .current_dir(mesh.work.path())
            .output()
            .unwrap();
        assert!(presented.status.success(), "{}", text(&presented));
    }
    for label in [
        "coordinator".to_owned(),
        format!("server-{}", mesh.servers[0].0),
    ] {
        mesh.until_logged(&label, &["TLS handshake refused", "UnknownIssuer"]);
    }
    assert!(mesh.client(&["--name", "Client1"]).status.success());
}

/// A user who gives up at `credentials add-user`'s password prompt with
/// Ctrl-C gets a terminal that echoes again (the prompt switched echo
/// off), and nothing is added.
#[test]
fn ctrl_c_at_the_password_prompt_gives_the_terminal_its_echo_back() {
    use nix::sys::termios::{tcgetattr, LocalFlags};

    let work = tempfile::tempdir().unwrap();
    let terminal = nix::pty::openpty(None, None).unwrap();
    let echoes = || {
        tcgetattr(&terminal.slave)
            .unwrap()
            .local_flags
            .contains(LocalFlags::ECHO)
    };
    assert!(echoes(), "a new terminal echoes");
    let mut adding = common::command()
        .args(["credentials", "add-user", "alice"])
        .current_dir(work.path())
        .stdin(std::fs::File::from(terminal.slave.try_clone().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while echoes() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the prompt never switched echo off"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    common::signal(&adding, nix::sys::signal::Signal::SIGINT);
    let status = common::wait_exit(&mut adding);
    assert!(echoes(), "echo is still off after Ctrl-C");
    // Ended by the signal itself, as a shell expects of Ctrl-C.
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGINT as i32),
        "{status}"
    );
    assert!(!work.path().join("certs/credentials.txt").exists());
}

#[test]
fn credentials_on_top_of_mtls_from_the_command_line() {
    let mesh = Mesh::start();
    let work = mesh.work.path();
    let added = common::command()
        .args(["credentials", "add-user", "alice"])
        .env("SECUREMESH_NEW_PASSWORD", "correct horse")
        // The client's variable, set in the same shell, changes nothing.
        .env("SECUREMESH_PASSWORD", "not this one")
        .current_dir(work)
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", text(&added));
    let token = securemesh(&["credentials", "add-token", "ci-bot"], work);
    assert!(token.status.success(), "{}", text(&token));
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    assert_eq!(mode_of(&mesh.certs().join("credentials.txt")), 0o600);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "coordinator",
        "--listen",
        &listen,
        "--credentials",
        "certs/credentials.txt",
    ];
    let backends: Vec<String> = mesh
        .servers
        .iter()
        .map(|(port, _)| format!("https://127.0.0.1:{port}"))
        .collect();
    for backend in &backends {
        args.extend(["--backend", backend]);
    }
    let guarded = mesh.spawn("guarded", &args);
    mesh.wait_serving(port);
    let target = format!("https://127.0.0.1:{port}");
    let call = |extra: &[&str]| {
        let mut all = vec!["client", "--target", &target];
        all.extend(extra);
        securemesh(&all, work)
    };

    let anonymous = call(&[]);
    assert!(!anonymous.status.success());
    assert!(
        text(&anonymous).contains("UNAUTHENTICATED"),
        "{}",
        text(&anonymous)
    );
    let wrong = call(&["--user", "alice", "--password", "wrong horse"]);
    assert!(text(&wrong).contains("UNAUTHENTICATED"), "{}", text(&wrong));
    assert!(call(&["--user", "alice", "--password", "correct horse"])
        .status
        .success());
    assert!(call(&["--token", &token]).status.success());
    // Exported credentials are sent without flags; a flag of the other
    // kind is sent instead of them, not refused for clashing with them.
    let with_exported = |password: &str, extra: &[&str]| {
        common::command()
            .args(["client", "--target", &target])
            .args(extra)
            .env("SECUREMESH_USER", "alice")
            .env("SECUREMESH_PASSWORD", password)
            .current_dir(work)
            .output()
            .unwrap()
    };
    let exported = with_exported("correct horse", &[]);
    assert!(exported.status.success(), "{}", text(&exported));
    let exported_wrong = with_exported("wrong horse", &[]);
    assert!(
        text(&exported_wrong).contains("UNAUTHENTICATED"),
        "{}",
        text(&exported_wrong)
    );
    let flag_wins = with_exported("wrong horse", &["--token", &token]);
    assert!(flag_wins.status.success(), "{}", text(&flag_wins));
    // With a carriage return (a file saved on Windows), the token is
    // refused before any call, by a message that does not quote it.
    let stray = call(&["--token", &format!("{token}\r")]);
    assert!(!stray.status.success());
    assert!(
        text(&stray).contains("control character"),
        "{}",
        text(&stray)
    );
    assert!(!text(&stray).contains(&token), "{}", text(&stray));

    // A token added later is accepted once the coordinator reloads.
    let later = securemesh(&["credentials", "add-token", "later"], work);
    let later = String::from_utf8_lossy(&later.stdout).trim().to_owned();
    assert!(!call(&["--token", &later]).status.success());
    mesh.reload("guarded", &guarded);
    let accepted = call(&["--token", &later]);
    assert!(accepted.status.success(), "{}", text(&accepted));

    // A server with credentials, called directly by an allowed client.
    let server_port = free_port();
    let server = mesh.spawn(
        "guarded-server",
        &[
            "server",
            &server_port.to_string(),
            "--credentials",
            "certs/credentials.txt",
            "--allow",
            "spiffe://securemesh/client/client",
        ],
    );
    mesh.wait_serving(server_port);
    let direct = format!("https://127.0.0.1:{server_port}");
    let call_server = |extra: &[&str]| {
        let mut all = vec!["client", "--target", &direct];
        all.extend(extra);
        securemesh(&all, work)
    };
    let anonymous = call_server(&[]);
    assert!(
        text(&anonymous).contains("UNAUTHENTICATED"),
        "{}",
        text(&anonymous)
    );
    let wrong = call_server(&["--user", "alice", "--password", "wrong horse"]);
    assert!(text(&wrong).contains("UNAUTHENTICATED"), "{}", text(&wrong));
    assert!(call_server(&["--token", &token]).status.success());
    // Behind a coordinator, the server trusts the coordinator to have
    // checked credentials (this one requires none).
    let front_port = free_port();
    let front_listen = format!("127.0.0.1:{front_port}");
    let front = mesh.spawn(
        "front",
        &[
            "coordinator",
            "--listen",
            &front_listen,
            "--backend",
            &direct,
        ],
    );
    mesh.wait_serving(front_port);
    let through = format!("https://127.0.0.1:{front_port}");
    let relayed = securemesh(&["client", "--target", &through], work);
    assert!(relayed.status.success(), "{}", text(&relayed));
    // Stopped, not killed: a killed process may not have written its
    // last lines, and a check for what is absent would pass on them.
    let mut front = front;
    assert!(common::terminate(&mut front).success());
    let mut server = server;
    assert!(common::terminate(&mut server).success());
    let mut guarded = guarded;
    assert!(common::terminate(&mut guarded).success());
    let log = mesh.log("guarded");
    // Neither the password nor the token, as typed or as sent (Basic
    // sends base64 of user:password), in the coordinator's log or the
    // server's.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("alice:correct horse");
    let logs = log + &mesh.log("guarded-server");
    for secret in ["correct horse", "wrong horse", &token, &later, &basic] {
        assert!(!logs.contains(secret), "the logs show {secret:?}:\n{logs}");
    }
}

/// The JSON log lines of `path` that are audit lines for `request_id`.
fn audit_lines(path: &Path, request_id: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "audit" && line["request_id"] == request_id)
        .collect()
}

#[test]
fn a_standard_error_nobody_reads_neither_stops_a_server_nor_costs_the_log_file_a_line() {
    const CALLS: usize = 300;
    let mesh = Mesh::start();
    let work = mesh.work.path();
    let port = free_port();
    // Standard error is a pipe that this test never reads: it is full
    // after 64 KiB, a few calls' worth of trace lines, and the backlog
    // of 256 lines after it is full well before the last call (the audit
    // lines alone would fill both).
    let mut server = common::command()
        .args([
            "server",
            &port.to_string(),
            "--allow",
            "spiffe://securemesh/client/client",
            "--log-file",
            "logs/unread.txt",
            "--log-format",
            "json",
            "--stderr-backlog",
            "256",
            "--drain-delay",
            "30s",
        ])
        .current_dir(work)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    mesh.wait_serving(port);
    let target = format!("https://127.0.0.1:{port}");
    let calls = securemesh(
        &[
            "client",
            "--target",
            &target,
            "--requests",
            &CALLS.to_string(),
            "--concurrency",
            "4",
        ],
        work,
    );
    assert!(calls.status.success(), "{}", text(&calls));
    // A second signal stops the drain at once, although the message it
    // leaves on standard error cannot be written.
    common::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let log_file = work.join("logs/unread.txt");
    let draining = Instant::now();
    while !std::fs::read_to_string(&log_file)
        .unwrap()
        .contains("draining: NOT_SERVING")
    {
        if draining.elapsed() > Duration::from_secs(10) {
            let _ = server.kill();
            panic!("the server did not start draining");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    common::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let stopping = Instant::now();
    while server.try_wait().unwrap().is_none() && stopping.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status}");
    let log = std::fs::read_to_string(&log_file).unwrap();
    let answered = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "audit" && line["status"] == "OK")
        .count();
    assert_eq!(answered, CALLS);
    assert!(
        common::has_line_with(&log, &["log lines for standard error were dropped"]),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
}

#[test]
fn json_log_files_follow_one_call_across_processes_by_request_id() {
    let mesh = Mesh::start();
    let work = mesh.work.path();
    let server_port = free_port();
    let coordinator_port = free_port();
    let server = mesh.spawn(
        "logged-server",
        &[
            "server",
            &server_port.to_string(),
            "--log-file",
            "logs/server-log.txt",
            "--log-format",
            "json",
        ],
    );
    mesh.wait_serving(server_port);
    let listen = format!("127.0.0.1:{coordinator_port}");
    let backend = format!("https://127.0.0.1:{server_port}");
    let coordinator = mesh.spawn(
        "logged-coordinator",
        &[
            "coordinator",
            "--listen",
            &listen,
            "--backend",
            &backend,
            "--log-file",
            "logs/coordinator-log.txt",
            "--log-rotation",
            "daily",
            "--log-format",
            "json",
        ],
    );
    mesh.wait_serving(coordinator_port);

    // A call with the caller's own request id.
    let token = securemesh(&["encrypt", "--json-bytes", "followed"], work);
    let body = format!(
        "{{\"token\":\"{}\"}}",
        String::from_utf8_lossy(&token.stdout).trim()
    );
    let call = mesh.grpcurl(
        coordinator_port,
        &["-H", "x-request-id: trace-me-42", "-d", &body],
        &["securemesh.v1.DataService/Submit"],
    );
    assert!(call.status.success(), "{}", text(&call));

    // A refused call: the client prints the request id it used.
    let other_key = work.join("other_key.txt");
    assert!(
        securemesh(&["keygen", "--out", other_key.to_str().unwrap()], work)
            .status
            .success()
    );
    let target = format!("https://127.0.0.1:{coordinator_port}");
    let refused = securemesh(
        &[
            "client",
            "--target",
            &target,
            "--encryption-key",
            other_key.to_str().unwrap(),
            "--log-file",
            "logs/client-log.txt",
        ],
        work,
    );
    assert!(!refused.status.success());
    let printed = String::from_utf8_lossy(&refused.stdout).to_string();
    let refused_id = printed
        .split("(request id ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no request id in {printed:?}"))
        .to_owned();

    // Stop both so that their log files are complete.
    for (mut child, label) in [(coordinator, "coordinator"), (server, "server")] {
        common::signal(&child, nix::sys::signal::Signal::SIGTERM);
        assert!(common::wait_exit(&mut child).success(), "{label}");
    }
    let logs = work.join("logs");
    let server_log = logs.join("server-log.txt");
    let coordinator_log = std::fs::read_dir(&logs)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("coordinator-log.txt.")
        })
        .expect("a dated coordinator log file (daily rotation)");
    assert!(logs.join("client-log.txt").exists());
    // Logs may hold plaintext: every file is its owner's alone, the ones a
    // daily rotation creates included.
    for log in [&server_log, &coordinator_log, &logs.join("client-log.txt")] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", log.display());
    }

    let at_coordinator = audit_lines(&coordinator_log, "trace-me-42");
    assert_eq!(at_coordinator.len(), 1, "{at_coordinator:?}");
    let line = &at_coordinator[0];
    assert_eq!(line["caller"], "spiffe://securemesh/client/client");
    assert_eq!(line["method"], "/securemesh.v1.DataService/Submit");
    assert_eq!(line["status"], "OK");
    assert_eq!(line["backend"], backend.as_str());
    assert_eq!(line["attempts"], 1);
    assert!(line["latency_ms"].as_f64().is_some() && line["bytes"].as_u64() > Some(0));
    assert!(line["timestamp"].is_string());

    let at_server = audit_lines(&server_log, "trace-me-42");
    assert_eq!(at_server.len(), 1, "{at_server:?}");
    assert_eq!(at_server[0]["caller"], "spiffe://securemesh/client/client");
    assert_eq!(at_server[0]["via"], "spiffe://securemesh/both/coordinator");
    assert_eq!(at_server[0]["status"], "OK");

    let refused_at_coordinator = audit_lines(&coordinator_log, &refused_id);
    let refused_at_server = audit_lines(&server_log, &refused_id);
    assert_eq!(refused_at_coordinator.len(), 1, "{refused_id}");
    assert_eq!(refused_at_coordinator[0]["status"], "INVALID_ARGUMENT");
    assert_eq!(refused_at_server.len(), 1, "{refused_id}");
    assert_eq!(refused_at_server[0]["status"], "INVALID_ARGUMENT");
}

/// A command whose reader goes away (`securemesh pki init | head -1`)
/// ends as Unix tools do, by SIGPIPE, instead of panicking in a write to
/// standard output.
#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let work = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = common::command()
        .args(["pki", "init"])
        .current_dir(work.path())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        output.status.signal(),
        Some(13),
        "{:?} {stderr}",
        output.status
    );
}

/// `status` (which keeps SIGPIPE ignored, as every command with sockets
/// does) also ends quietly when its reader goes away, instead of
/// panicking in a write to standard output; and fails when its output
/// cannot be written.
#[cfg(unix)]
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    assert!(securemesh(&["pki", "init"], dir.path()).status.success());
    assert!(securemesh(&["keygen"], dir.path()).status.success());
    let (port, admin) = (free_port().to_string(), free_port().to_string());
    let args: Vec<String> = ["server", &port, "--metrics-listen", &admin]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
    let mut server = common::spawn_logged(dir.path(), "watched", &args);
    let started = Instant::now();
    while !securemesh(&["status", "--admin", &admin], dir.path())
        .status
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no admin listener"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status_into = |stdout: Stdio| {
        common::command()
            .args(["status", "--admin", &admin, "--json"])
            .current_dir(dir.path())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = status_into(writer.into());
    // Into a full device, the output is lost: that is an error.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let into_full = status_into(full.into());
    let _ = server.kill();
    let _ = server.wait();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    let stderr = String::from_utf8_lossy(&into_full.stderr);
    assert_eq!(into_full.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write to standard output"),
        "{stderr}"
    );
}
