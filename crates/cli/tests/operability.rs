//! Metrics, the status command and the status page, against real
//! processes: the exposition passes `promtool check metrics` and its
//! counters move with calls, refusals and a failover; `securemesh status`
//! and the page (driven in headless Chromium) show both backends up, then
//! one down after it is killed. `.ci/run` installs `prometheus` (for
//! promtool) and `chromium`.
//!
//! `SECUREMESH_SCREENSHOT=$PWD/docs/status-page.png cargo test -p
//! securemesh-cli --test operability` also saves the page as the README
//! shows it.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use securemesh_admin::StatusReport;
use securemesh_tls::TlsFiles;

/// One case at a time: they start several processes each.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SUBMIT: &str = "/securemesh.v1.DataService/Submit";

/// Two servers, each with an admin listener, and a coordinator with one.
struct Observed {
    cluster: Cluster,
    server_admins: Vec<SocketAddr>,
    coordinator_admin: SocketAddr,
}

impl Observed {
    async fn start() -> Self {
        let mut cluster = Cluster::new();
        let mut server_admins = Vec::new();
        for _ in 0..2 {
            let admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
            let index = cluster.add_server(&["--metrics-listen".into(), admin.to_string()]);
            cluster.start_server(index).await;
            server_admins.push(admin);
        }
        let coordinator_admin = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        // No hedging: the tests count each call's attempts exactly, and a
        // reply slower than the hedge delay on a loaded machine would
        // send a second copy.
        let mut args = vec![
            "--metrics-listen".to_string(),
            coordinator_admin.port().to_string(),
            "--hedge-after".to_string(),
            "off".to_string(),
        ];
        for server in &cluster.servers {
            args.extend(["--backend".to_string(), server.url()]);
        }
        cluster.add_coordinator(&args).await;
        Self {
            cluster,
            server_admins,
            coordinator_admin,
        }
    }

    async fn status(&self) -> StatusReport {
        securemesh_admin::fetch_status(self.coordinator_admin)
            .await
            .unwrap()
    }

    /// Waits until the coordinator reports `up` backends in rotation.
    async fn until_up(&self, up: usize) -> StatusReport {
        let started = Instant::now();
        loop {
            let status = self.status().await;
            if status.up() == up {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still {} up: {status:?}",
                status.up()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn scrape(admin: SocketAddr) -> String {
    let body = securemesh_admin::fetch(admin, "/metrics").await.unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of `series` (name and labels exactly as exposed), 0 if absent.
fn value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// The value of `series`, which must be exported.
fn exported(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("{series} is not exported:\n{exposition}"))
}

fn promtool_accepts(exposition: &str) {
    let mut check = common::tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}\n{exposition}",
        common::text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_follow_calls_refusals_and_a_failover() {
    let _serial = SERIAL.lock().await;
    let mut observed = Observed::start().await;
    let cluster = &observed.cluster;
    let client = cluster.client(&cluster.coordinator_urls());
    for index in 0..100 {
        client
            .submit(format!("call {index}").as_bytes())
            .await
            .unwrap();
    }
    let metrics = scrape(observed.coordinator_admin).await;
    promtool_accepts(&metrics);
    let ok = format!("securemesh_requests_total{{method=\"{SUBMIT}\",status=\"OK\"}}");
    assert_eq!(value(&metrics, &ok), 100.0, "{metrics}");
    assert_eq!(
        value(
            &metrics,
            &format!("securemesh_request_duration_seconds_count{{method=\"{SUBMIT}\"}}")
        ),
        100.0
    );
    let backend = |name: &str, url: &str| format!("{name}{{backend=\"{url}\"}}");
    let urls: Vec<String> = cluster.servers.iter().map(|server| server.url()).collect();
    let attempts: f64 = urls
        .iter()
        .map(|url| value(&metrics, &backend("securemesh_backend_requests_total", url)))
        .sum();
    assert_eq!(attempts, 100.0);
    for url in &urls {
        assert_eq!(value(&metrics, &backend("securemesh_backend_up", url)), 1.0);
        // Series that count trouble exist at 0 before any trouble, so
        // that rate() and alerts see them from the start.
        for name in [
            "securemesh_backend_failures_total",
            "securemesh_backend_retries_total",
            "securemesh_backend_ejections_total",
        ] {
            assert_eq!(exported(&metrics, &backend(name, url)), 0.0);
        }
    }
    assert_eq!(
        exported(
            &metrics,
            "securemesh_tls_handshake_failures_total{reason=\"unknown_ca\"}"
        ),
        0.0
    );
    for limit in ["connections", "handshakes"] {
        let refused = format!("securemesh_connections_refused_total{{limit=\"{limit}\"}}");
        assert_eq!(exported(&metrics, &refused), 0.0);
    }
    assert!(exported(&metrics, "securemesh_connections_open") >= 1.0);
    // Connections that never start their handshake count as handshakes in
    // progress, not as open connections, until they go.
    let coordinator = cluster.coordinator_urls()[0].replace("https://", "");
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&coordinator).await.unwrap());
    }
    let handshaking = |wanted: f64| async move {
        let started = Instant::now();
        loop {
            let metrics = scrape(observed.coordinator_admin).await;
            if exported(&metrics, "securemesh_tls_handshakes_in_progress") == wanted {
                return metrics;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "{metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    handshaking(3.0).await;
    drop(silent);
    handshaking(0.0).await;

    let mut served = 0.0;
    for admin in &observed.server_admins {
        let metrics = scrape(*admin).await;
        promtool_accepts(&metrics);
        served += value(&metrics, &ok);
        assert_eq!(
            exported(
                &metrics,
                "securemesh_token_refusals_total{reason=\"malformed\"}"
            ),
            0.0
        );
    }
    assert_eq!(served, 100.0, "every call reached a server once");

    // A refused token: counted by reason at the server that refused it,
    // and by status at the coordinator.
    let refused = client.submit_token(b"not a fernet token".to_vec()).await;
    let refused = refused.unwrap_err();
    assert_eq!(
        securemesh::status::code_name(refused.code()),
        "INVALID_ARGUMENT"
    );
    let mut malformed = 0.0;
    for admin in &observed.server_admins {
        malformed += value(
            &scrape(*admin).await,
            "securemesh_token_refusals_total{reason=\"malformed\"}",
        );
    }
    assert_eq!(malformed, 1.0);
    let metrics = scrape(observed.coordinator_admin).await;
    assert_eq!(
        value(
            &metrics,
            &format!(
                "securemesh_requests_total{{method=\"{SUBMIT}\",status=\"INVALID_ARGUMENT\"}}"
            )
        ),
        1.0
    );

    // A refused handshake: a client certificate of another CA.
    let other = tempfile::tempdir().unwrap();
    securemesh_pki::init(&securemesh_pki::InitOptions {
        days: 1,
        ..securemesh_pki::InitOptions::new(other.path().to_owned())
    })
    .unwrap();
    let stranger = securemesh_tls::client_tls_config(&TlsFiles {
        cert: other.path().join("client_cert.pem"),
        key: other.path().join("client_key.pem"),
        ca: cluster.certs().join("ca_cert.pem"),
    })
    .unwrap();
    let strange_client = securemesh_client::Client::new(
        &cluster.coordinator_urls(),
        stranger,
        securemesh_crypto::KeyRing::from_file(&cluster.certs().join("encryption_key.txt")).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(strange_client.submit(b"let me in").await.is_err());
    let metrics = scrape(observed.coordinator_admin).await;
    assert!(
        value(
            &metrics,
            "securemesh_tls_handshake_failures_total{reason=\"unknown_ca\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // A failover: calls right after a SIGKILL meet the dead server, are
    // retried on the other, and the dead one leaves rotation.
    let killed = urls[1].clone();
    observed.cluster.servers[1].kill();
    let calls: Vec<_> = (0..50)
        .map(|index| {
            let client = client.clone();
            tokio::spawn(async move { client.submit(format!("after {index}").as_bytes()).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    observed.until_up(1).await;
    let metrics = scrape(observed.coordinator_admin).await;
    promtool_accepts(&metrics);
    assert_eq!(value(&metrics, &ok), 150.0, "no call failed");
    assert_eq!(
        value(&metrics, &backend("securemesh_backend_up", &killed)),
        0.0
    );
    for name in [
        "securemesh_backend_failures_total",
        "securemesh_backend_retries_total",
        "securemesh_backend_ejections_total",
    ] {
        assert!(
            value(&metrics, &backend(name, &killed)) >= 1.0,
            "{name}: {metrics}"
        );
    }
    assert_eq!(
        value(&metrics, &backend("securemesh_backend_up", &urls[0])),
        1.0
    );
}

/// Runs headless Chromium with `args` and the page at `url`; returns its
/// standard output.
fn chromium(profile: &std::path::Path, args: &[&str], url: &str) -> String {
    let mut browser = common::tool("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while browser.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = browser.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = browser.wait_with_output().unwrap();
    assert!(output.status.success(), "chromium failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `data-state` of each backend row of a rendered page.
fn states(dom: &str, urls: &[String]) -> Vec<String> {
    urls.iter()
        .map(|url| {
            let row = format!("data-backend=\"{url}\" data-state=\"");
            let at = dom
                .find(&row)
                .unwrap_or_else(|| panic!("no row for {url}: {dom}"));
            let rest = &dom[at + row.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_command_and_page_show_a_killed_backend_down() {
    let _serial = SERIAL.lock().await;
    let mut observed = Observed::start().await;
    let work = observed.cluster.work.path().to_owned();
    let client = observed
        .cluster
        .client(&observed.cluster.coordinator_urls());
    for _ in 0..20 {
        client.submit(b"warm up").await.unwrap();
    }
    let urls: Vec<String> = observed.cluster.servers.iter().map(|s| s.url()).collect();
    let admin = observed.coordinator_admin.to_string();
    let page = format!("http://{admin}/");
    let profile = tempfile::tempdir().unwrap();

    let table = common::securemesh(&["status", "--admin", &admin], &work);
    assert!(table.status.success(), "{}", common::text(&table));
    let table = common::text(&table);
    assert!(table.contains("backends: 2 of 2 up"), "{table}");
    let json = common::securemesh(&["status", "--admin", &admin, "--json"], &work);
    let report: StatusReport = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report.role, "coordinator");
    assert_eq!(report.recent.calls, 20);
    assert!(report.backends.iter().all(|backend| backend.state == "up"));

    let dom = chromium(profile.path(), &["--dump-dom"], &page);
    assert_eq!(states(&dom, &urls), ["up", "up"]);
    assert!(dom.contains("2 of 2"), "{dom}");

    observed.cluster.servers[1].kill();
    // Health checks (every second) take it out even without traffic.
    observed.until_up(1).await;
    let table = common::text(&common::securemesh(&["status", "--admin", &admin], &work));
    assert!(table.contains("backends: 1 of 2 up"), "{table}");
    let killed_row = table
        .lines()
        .find(|line| line.starts_with(&urls[1]))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        killed_row.contains("down") || killed_row.contains("ejected"),
        "{table}"
    );

    let dom = chromium(profile.path(), &["--dump-dom"], &page);
    let now = states(&dom, &urls);
    assert_eq!(now[0], "up");
    assert_ne!(now[1], "up", "{dom}");
    assert!(dom.contains("1 of 2"), "{dom}");

    let screenshot = std::env::var_os("SECUREMESH_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| work.join("status-page.png"));
    let target = format!("--screenshot={}", screenshot.display());
    chromium(profile.path(), &[&target, "--window-size=1000,380"], &page);
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    // Nothing listening: a clear error, not a hang.
    let port = common::free_port().to_string();
    let refused = common::securemesh(&["status", "--admin", &port], &work);
    assert!(!refused.status.success());
    assert!(
        common::text(&refused).contains("cannot reach the admin listener"),
        "{}",
        common::text(&refused)
    );
}
