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
    /// The member's name, and `--initial-cluster` (every member's peer URL).
    name: String,
    initial_cluster: String,
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
        let peer_port = super::free_port();
        let mut etcd = Self {
            client_port: super::free_port(),
            peer_port,
            name: "test".into(),
            initial_cluster: format!("test=http://127.0.0.1:{peer_port}"),
            dir: work.join("etcd"),
            tls,
            flags: flags.iter().map(|flag| (*flag).to_owned()).collect(),
            child: None,
            starts: 0,
        };
        etcd.start();
        etcd
    }

    /// A cluster of two members in `<work>/etcd-1` and `<work>/etcd-2`,
    /// with more etcd `flags`, once both serve. Either alone has no
    /// quorum, so killing one leaves the other without a leader.
    pub fn launch_pair(work: &Path, flags: &[&str]) -> [Self; 2] {
        let peer_ports = [super::free_port(), super::free_port()];
        let initial_cluster = format!(
            "m1=http://127.0.0.1:{},m2=http://127.0.0.1:{}",
            peer_ports[0], peer_ports[1]
        );
        let mut pair = [1, 2].map(|number| Self {
            client_port: super::free_port(),
            peer_port: peer_ports[number - 1],
            name: format!("m{number}"),
            initial_cluster: initial_cluster.clone(),
            dir: work.join(format!("etcd-{number}")),
            tls: None,
            flags: flags.iter().map(|flag| (*flag).to_owned()).collect(),
            child: None,
            starts: 0,
        });
        // A member serves once the cluster has a leader: start both first.
        let logs = pair.each_mut().map(Self::spawn);
        for (member, log) in pair.iter_mut().zip(logs) {
            member.wait_serving(&log);
        }
        pair
    }

    /// `etcd://127.0.0.1:<port>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}{prefix}", self.client_port)
    }

    /// Starts (again) on the same ports and data, and waits until it serves.
    pub fn start(&mut self) {
        let log = self.spawn();
        self.wait_serving(&log);
    }

    /// Starts the process; returns the path of its log.
    fn spawn(&mut self) -> PathBuf {
        self.starts += 1;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.with_extension(format!("{}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = super::tool("etcd");
        command
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
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
        log_path
    }

    /// Waits until the process started with its log at `log_path` serves.
    fn wait_serving(&mut self, log_path: &Path) {
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
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
