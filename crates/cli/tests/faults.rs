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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{assert_clean, under_load, Cluster};
use nix::sys::signal::Signal;
use securemesh_client::BalanceOptions;

/// The coordinator's per-try timeout (its default).
const PER_TRY: Duration = Duration::from_secs(1);
/// How long a call may take when one server hangs: the coordinator hedges
/// after 50 ms (its default), so the slowest call stays below the per-try
/// timeout it would otherwise wait for; the rest is slack for a busy test
/// machine (the slowest of thousands of calls is a tail that load alone
/// stretches).
const HUNG_SERVER_SLOWEST: Duration = Duration::from_millis(900);
const REQUESTS: usize = 2_000;

/// One case at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_server_killed_mid_run_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let killed = cluster.servers[0].id();
    let report = under_load(&client, REQUESTS, |progress| {
        let server = &mut cluster.servers[0];
        async move {
            progress.reached(REQUESTS / 4).await;
            server.kill();
            progress.reached(REQUESTS / 2).await;
        }
    })
    .await;
    report.print("case 1, SIGKILL of one server");
    assert_clean(&report, REQUESTS);
    let last = &report.answers[report.answers.len() - 100..];
    assert!(last.iter().all(|(_, server)| *server != killed));
    assert!(cluster
        .log("coordinator-1")
        .contains(&format!("Server https://{killed} failed: ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_2_a_hung_server_delays_calls_by_a_hedging_delay_not_a_per_try_timeout() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let report = under_load(&client, REQUESTS, |progress| {
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
    assert_clean(&report, REQUESTS);
    assert!(
        report.slowest <= HUNG_SERVER_SLOWEST,
        "slowest call {:?} exceeds {HUNG_SERVER_SLOWEST:?}",
        report.slowest
    );
    let log = cluster.log("coordinator-1");
    assert!(
        log.contains("no reply within the per-try timeout"),
        "the stuck attempts ran on to their per-try timeout:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_3_a_rolling_restart_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(2, 1).await;
    let client = cluster.client(&cluster.coordinator_urls());
    let cluster_ref = &mut cluster;
    let client_ref = &client;
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        for index in 0..2 {
            let status = cluster_ref.servers[index].terminate();
            assert!(status.success(), "server {index} exited with {status}");
            cluster_ref.start_server(index).await;
            // Before the next one stops, the coordinator's health checks
            // must have taken this one back: it answers again.
            let restarted = cluster_ref.servers[index].id();
            let started = Instant::now();
            loop {
                if let Ok(reply) = client_ref.submit(b"who answers?").await {
                    if reply.server_id == restarted {
                        break;
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{restarted} is not answering again"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    report.print("case 3, rolling restart (SIGTERM, restart on the same port)");
    assert_clean(&report, REQUESTS);
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
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        cluster_ref.servers[0].kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster_ref.start_server(0).await;
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
    assert_clean(&report, REQUESTS);
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
    let report = under_load(&client, REQUESTS, |_| async {}).await;
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
    // Failing fast, not at the client's 10 s deadline.
    assert!(
        report.slowest < Duration::from_secs(3),
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

    cluster.start_server(1).await;
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
    let report = under_load(&client, REQUESTS, |progress| {
        let coordinator = &mut cluster.coordinators[0];
        async move {
            progress.reached(REQUESTS / 4).await;
            coordinator.kill();
            progress.reached(REQUESTS / 2).await;
        }
    })
    .await;
    report.print("case 6, SIGKILL of one of two coordinators");
    assert_clean(&report, REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_8_a_hung_coordinator_costs_the_clients_hedging_delay() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(2, 2).await;
    // As `securemesh client` does by default with several targets.
    let client = cluster.client_with(
        &cluster.coordinator_urls(),
        BalanceOptions {
            hedge_after: Some(Duration::from_millis(250)),
            ..BalanceOptions::default()
        },
    );
    let report = under_load(&client, REQUESTS, |progress| {
        let coordinator = &cluster.coordinators[0];
        async move {
            progress.reached(REQUESTS / 4).await;
            coordinator.signal(Signal::SIGSTOP);
            tokio::time::sleep(PER_TRY * 3).await;
            coordinator.signal(Signal::SIGCONT);
        }
    })
    .await;
    report.print("case 8, SIGSTOP of one of two coordinators for 3 s");
    assert_clean(&report, REQUESTS);
    // Without hedging, the calls on the stopped coordinator wait for it to
    // go on (3 s here) or for keepalive to give its connection up.
    let slowest = Duration::from_secs(2);
    assert!(
        report.slowest <= slowest,
        "slowest call {:?} exceeds {slowest:?}",
        report.slowest
    );
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
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        let cut = PacketDrop::new(port);
        tokio::time::sleep(PER_TRY * 3).await;
        drop(cut);
    })
    .await;
    report.print("case 7, packets to one server dropped for 3 s");
    assert_clean(&report, REQUESTS);
    assert!(
        report.slowest <= HUNG_SERVER_SLOWEST,
        "slowest call {:?} exceeds {HUNG_SERVER_SLOWEST:?}",
        report.slowest
    );
}
