//! nginx as the reference gRPC proxy: mutual TLS toward clients and toward
//! the same servers as the coordinator, configured to be as comparable as
//! nginx allows (upstream keepalive, 1 s timeouts like the coordinator's
//! per-try timeout, the next upstream on error or timeout).

use std::path::{Path, PathBuf};

use crate::process::Process;
use crate::BenchError;

/// Where nginx is looked for, in order.
const CANDIDATES: [&str; 3] = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"];

/// The nginx binary; installs Debian's `nginx` package when it is missing
/// and we may (root, with apt-get).
pub fn binary() -> Result<PathBuf, BenchError> {
    let find = || {
        CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    let root = nix::unistd::Uid::effective().is_root();
    if root && Path::new("/usr/bin/apt-get").is_file() {
        eprintln!("nginx is missing: installing Debian's nginx package");
        let apt_get = |args: &[&str]| {
            std::process::Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map_err(|source| BenchError::Spawn {
                    what: format!("apt-get {}", args.join(" ")),
                    source,
                })
        };
        // A fresh machine (a container) has no package lists yet.
        let updated = apt_get(&["update", "-qq"])?;
        let installed = updated.success() && apt_get(&["install", "-y", "-qq", "nginx"])?.success();
        if installed {
            if let Some(found) = find() {
                return Ok(found);
            }
        }
    }
    Err(BenchError::Missing(
        "nginx (install it with `apt-get install nginx`)".into(),
    ))
}

/// `nginx -v`, for the report.
pub fn version(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("-v")
        .output()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stderr);
            let text = text.trim();
            text.strip_prefix("nginx version: ")
                .unwrap_or(text)
                .to_owned()
        })
        .unwrap_or_else(|_| "nginx (version unknown)".into())
}

/// What nginx listens on and proxies to.
pub struct NginxSetup<'a> {
    /// Its own directory (configuration, logs, temporary files).
    pub dir: &'a Path,
    /// The project's certificates.
    pub certs: &'a Path,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// The servers' ports on 127.0.0.1.
    pub upstreams: &'a [u16],
}

/// The configuration: nginx presents the coordinator's certificate both
/// ways, requires a client certificate of our CA and verifies the servers.
pub fn config(setup: &NginxSetup<'_>) -> String {
    let dir = setup.dir.display();
    let certs = setup.certs.display();
    let upstreams: String = setup
        .upstreams
        .iter()
        .map(|port| format!("        server 127.0.0.1:{port} max_fails=1 fail_timeout=1s;\n"))
        .collect();
    format!(
        "# Written by `securemesh bench`.
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream dataservice {{
{upstreams}        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certs}/coordinator_cert.pem;
        ssl_certificate_key {certs}/coordinator_key.pem;
        ssl_client_certificate {certs}/ca_cert.pem;
        ssl_verify_client on;
        http2_max_concurrent_streams 256;
        keepalive_requests 1000000;
        location / {{
            grpc_pass grpcs://dataservice;
            grpc_ssl_certificate {certs}/coordinator_cert.pem;
            grpc_ssl_certificate_key {certs}/coordinator_key.pem;
            grpc_ssl_trusted_certificate {certs}/ca_cert.pem;
            grpc_ssl_verify on;
            grpc_ssl_name localhost;
            grpc_ssl_session_reuse on;
            grpc_connect_timeout 1s;
            grpc_send_timeout 1s;
            grpc_read_timeout 1s;
            grpc_next_upstream error timeout;
        }}
    }}
}}
",
        port = setup.port,
        workers = crate::PROXY_WORKERS,
    )
}

/// Writes the configuration and starts nginx in the foreground (its master
/// is our child; its workers are the master's children).
pub fn start(binary: &Path, setup: &NginxSetup<'_>) -> Result<Process, BenchError> {
    let io = |what: &str, source| BenchError::Io {
        what: format!("{what} in {}", setup.dir.display()),
        source,
    };
    std::fs::create_dir_all(setup.dir).map_err(|error| io("creating nginx's directory", error))?;
    let path = setup.dir.join("nginx.conf");
    std::fs::write(&path, config(setup)).map_err(|error| io("writing nginx.conf", error))?;
    Process::start(
        setup.dir,
        "nginx",
        binary,
        vec![
            "-p".into(),
            setup.dir.display().to_string(),
            "-c".into(),
            path.display().to_string(),
            "-g".into(),
            "daemon off;".into(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_verifies_both_ways_and_retries_on_error() {
        let text = config(&NginxSetup {
            dir: Path::new("/tmp/n"),
            certs: Path::new("/tmp/c"),
            port: 9443,
            upstreams: &[5001, 5002],
        });
        for line in [
            "listen 127.0.0.1:9443 ssl http2;",
            "ssl_verify_client on;",
            "grpc_pass grpcs://dataservice;",
            "grpc_ssl_verify on;",
            "grpc_next_upstream error timeout;",
            "server 127.0.0.1:5001",
            "server 127.0.0.1:5002",
            "keepalive 512;",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
