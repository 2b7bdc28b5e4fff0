//! A real single-member etcd on free loopback ports with a temporary data
//! directory, for the discovery tests (`.ci/run` installs `etcd-server`).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The files etcd serves TLS with and checks clients against.
pub struct EtcdTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// An etcd process, killed on drop. Its data directory survives a
/// [`Etcd::kill`], so [`Etcd::start`] again brings the same data back.
pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    tls: Option<EtcdTlsFiles>,
    /// More etcd flags, on every start.
    flags: Vec<String>,
    child: Option<Child>,
    starts: usize,
}

impl Etcd {
    /// Starts etcd in `<work>/etcd` and waits until it serves.
    pub fn launch(work: &Path, tls: Option<EtcdTlsFiles>) -> Self {
        Self::launch_with(work, tls, &[])
    }

    /// [`Etcd::launch`] with more etcd `flags`.
    pub fn launch_with(work: &Path, tls: Option<EtcdTlsFiles>, flags: &[&str]) -> Self {
        let mut etcd = Self {
            client_port: super::free_port(),
            peer_port: super::free_port(),
            dir: work.join("etcd"),
            tls,
            flags: flags.iter().map(|flag| (*flag).to_owned()).collect(),
            child: None,
            starts: 0,
        };
        etcd.start();
        etcd
    }

    /// `etcd://127.0.0.1:<port>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}{prefix}", self.client_port)
    }

    /// Starts (again) on the same ports and data, and waits until it serves.
    pub fn start(&mut self) {
        self.starts += 1;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.with_extension(format!("{}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = super::tool("etcd");
        command
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(command.spawn().unwrap());
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("serving client traffic") {
                return;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "etcd exited: {log}");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "etcd did not start: {log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
