//! Service discovery against a real etcd: servers register with
//! `--register`, coordinators follow with `--discovery`, under load from
//! the client library. etcd runs on free loopback ports with a temporary
//! data directory (`.ci/run` installs `etcd-server`); the cases run one at
//! a time.
//!
//! `cargo test -p securemesh-cli --test discovery -- --nocapture` prints
//! each case's figures.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{assert_clean, under_load, Cluster};
use common::etcd::{Etcd, EtcdTlsFiles};
use securemesh_client::Client;

const REQUESTS: usize = 1_000;
const PREFIX: &str = "/securemesh/test";
/// Short leases, so that a killed server is forgotten quickly.
const TTL: &str = "2s";

/// One case at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn register_args(etcd: &Etcd, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--register".to_string(),
        etcd.url(PREFIX),
        "--register-ttl".into(),
        TTL.into(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args
}

fn discovery_args(etcd: &Etcd, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--discovery".to_string(), etcd.url(PREFIX)];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args
}

/// Starts `count` servers registered with `extra` arguments.
async fn start_registered(cluster: &mut Cluster, etcd: &Etcd, count: usize, extra: &[&str]) {
    for _ in 0..count {
        let index = cluster.add_server(&register_args(etcd, extra));
        cluster.start_server(index).await;
    }
}

/// Calls through `client` until each of `servers` has answered.
async fn until_answered_by(client: &Client, servers: &[String]) {
    let wanted: BTreeSet<&String> = servers.iter().collect();
    let mut seen = BTreeSet::new();
    let started = Instant::now();
    while !wanted.iter().all(|server| seen.contains(*server)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "only {seen:?} answered, wanted {wanted:?}"
        );
        if let Ok(reply) = client.submit(b"who answers?").await {
            seen.insert(reply.server_id);
        }
    }
}

/// Waits until `label`'s log has a line with every one of `needles`;
/// returns how long that took.
async fn until_logged(
    cluster: &Cluster,
    label: &str,
    needles: &[&str],
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let log = cluster.log(label);
        if common::has_line_with(&log, needles) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{label} did not log {needles:?} within {limit:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `label`'s log holds at least `at_least` copies of
/// `needle`; returns the log.
async fn until_counted(
    cluster: &Cluster,
    label: &str,
    needle: &str,
    at_least: usize,
    limit: Duration,
) -> String {
    let started = Instant::now();
    loop {
        let log = cluster.log(label);
        if log.matches(needle).count() >= at_least {
            return log;
        }
        assert!(
            started.elapsed() < limit,
            "{label} logged {needle:?} fewer than {at_least} times within {limit:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Server flags to reach [`etcd_with_our_certificates`] as `registrar`.
const REGISTRAR: [&str; 6] = [
    "--etcd-ca",
    "certs/ca_cert.pem",
    "--etcd-cert",
    "certs/registrar_cert.pem",
    "--etcd-key",
    "certs/registrar_key.pem",
];

/// etcd serving a certificate of the cluster's CA (`etcd`) and requiring
/// client certificates of it; `registrar` is issued for the servers.
fn etcd_with_our_certificates(cluster: &Cluster) -> Etcd {
    let certs = cluster.certs();
    for (name, role) in [("etcd", "both"), ("registrar", "client")] {
        let issued =
            common::securemesh(&["pki", "issue", name, "--role", role], cluster.work.path());
        assert!(issued.status.success(), "{}", common::text(&issued));
    }
    Etcd::launch(
        cluster.work.path(),
        Some(EtcdTlsFiles {
            cert: certs.join("etcd_cert.pem"),
            key: certs.join("etcd_key.pem"),
            ca: certs.join("ca_cert.pem"),
        }),
    )
}

/// etcd, two servers registered in it and a coordinator following it, and
/// a client of the coordinator once both servers have answered it.
async fn two_registered_servers_and_a_coordinator(cluster: &mut Cluster) -> (Etcd, Client) {
    let etcd = Etcd::launch(cluster.work.path(), None);
    start_registered(cluster, &etcd, 2, &[]).await;
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(cluster)).await;
    (etcd, client)
}

/// Turns etcd's authentication on, with two users besides root:
/// `registrar` (password `registrar-secret`) may read and write the
/// prefix, `observer` (`observer-secret`) only read it.
async fn enable_auth(etcd: &Etcd) {
    let mut admin = etcd_client::Client::connect([format!("127.0.0.1:{}", etcd.client_port)], None)
        .await
        .unwrap();
    let range = format!("{PREFIX}/");
    admin.role_add("root").await.unwrap();
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    for (user, permission) in [
        (
            "registrar",
            etcd_client::Permission::read_write(range.as_str()),
        ),
        ("observer", etcd_client::Permission::read(range.as_str())),
    ] {
        admin.role_add(user).await.unwrap();
        admin
            .role_grant_permission(user, permission.with_prefix())
            .await
            .unwrap();
        admin
            .user_add(user, format!("{user}-secret"), None)
            .await
            .unwrap();
        admin.user_grant_role(user, user).await.unwrap();
    }
    admin.auth_enable().await.unwrap();
}

fn server_ids(cluster: &Cluster) -> Vec<String> {
    cluster.servers.iter().map(|server| server.id()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_server_registered_later_gets_traffic_within_two_seconds() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let (etcd, client) = two_registered_servers_and_a_coordinator(&mut cluster).await;

    let third = cluster.add_server(&register_args(&etcd, &[]));
    let third_id = cluster.servers[third].id();
    let serving = Arc::new(Mutex::new(None));
    let serving_at = serving.clone();
    let cluster_ref = &mut cluster;
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        cluster_ref.start_server(third).await;
        *serving_at.lock().unwrap() = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(2500)).await;
    })
    .await;
    let serving = serving.lock().unwrap().expect("started");
    let first = report
        .answers
        .iter()
        .find(|(at, server)| *at > serving && *server == third_id)
        .map(|(at, _)| at.duration_since(serving));
    report.print(&format!(
        "discovery 1, a third server registered: traffic after {} ms",
        first.map_or(-1, |wait| wait.as_millis() as i64)
    ));
    assert_clean(&report, REQUESTS);
    let first = first.expect("the registered server never got traffic");
    assert!(first <= Duration::from_secs(2), "traffic after {first:?}");
    assert!(cluster
        .log("coordinator-1")
        .lines()
        .any(|line| line.contains("backend registered in etcd") && line.contains(&third_id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_2_a_server_stopped_with_sigterm_leaves_at_once() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let (_etcd, client) = two_registered_servers_and_a_coordinator(&mut cluster).await;

    let stopped_url = cluster.servers[0].url();
    let stopped_id = cluster.servers[0].id();
    let exited = Arc::new(Mutex::new(None));
    let exited_at = exited.clone();
    let cluster_ref = &mut cluster;
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        let status = cluster_ref.servers[0].terminate();
        assert!(status.success(), "the server exited with {status}");
        *exited_at.lock().unwrap() = Some(Instant::now());
        // The server deregistered before draining: by the time it has
        // exited, the coordinator has already dropped it (the calls'
        // report below shows none failed); its log line may come a
        // little later on a loaded machine.
        until_logged(
            cluster_ref,
            "coordinator-1",
            &["backend deregistered from etcd", &stopped_url],
            Duration::from_secs(3),
        )
        .await;
        progress.reached(REQUESTS / 2).await;
    })
    .await;
    report.print("discovery 2, SIGTERM of a registered server");
    assert_clean(&report, REQUESTS);
    let exited = exited.lock().unwrap().expect("stopped");
    assert!(!report
        .answers
        .iter()
        .any(|(at, server)| *at > exited && *server == stopped_id));
    assert!(cluster.log("server-1").contains("deregistered from etcd"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_3_a_killed_server_is_ejected_then_forgotten_when_its_lease_expires() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let (_etcd, client) = two_registered_servers_and_a_coordinator(&mut cluster).await;

    let killed_url = cluster.servers[0].url();
    let killed_needle = killed_url.clone();
    let forgotten = Arc::new(Mutex::new(Duration::ZERO));
    let forgotten_after = forgotten.clone();
    let cluster_ref = &mut cluster;
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        cluster_ref.servers[0].kill();
        // A 2 s lease; etcd checks expiry twice a second.
        *forgotten_after.lock().unwrap() = until_logged(
            cluster_ref,
            "coordinator-1",
            &["backend deregistered from etcd", &killed_needle],
            Duration::from_secs(6),
        )
        .await;
    })
    .await;
    let forgotten = *forgotten.lock().unwrap();
    report.print(&format!(
        "discovery 3, SIGKILL of a registered server: key expired after {} ms",
        forgotten.as_millis()
    ));
    assert_clean(&report, REQUESTS);
    // Renewed every third of its 2 s, the lease had at least 1.3 s left
    // when the server died: forgotten any sooner, it was not the lease.
    assert!(forgotten >= Duration::from_secs(1), "{forgotten:?}");
    // Ejected first, by the failed calls, long before etcd forgot it.
    let log = cluster.log("coordinator-1");
    let line_of = |needles: &[&str]| {
        log.lines()
            .position(|line| needles.iter().all(|needle| line.contains(needle)))
    };
    let ejected = line_of(&[&format!("Server {killed_url} failed: ")]);
    let deregistered = line_of(&["backend deregistered from etcd", &killed_url]);
    assert!(
        matches!((ejected, deregistered), (Some(ejected), Some(deregistered)) if ejected < deregistered),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_4_etcd_killed_under_load_costs_nothing_and_everyone_catches_up() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let mut etcd = Etcd::launch(cluster.work.path(), None);
    start_registered(&mut cluster, &etcd, 2, &[]).await;
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(&cluster)).await;

    let third = cluster.add_server(&register_args(&etcd, &[]));
    let third_id = cluster.servers[third].id();
    let (cluster_ref, etcd_ref) = (&mut cluster, &mut etcd);
    let third_needle = third_id.clone();
    let report = under_load(&client, REQUESTS, |progress| async move {
        progress.reached(REQUESTS / 4).await;
        etcd_ref.kill();
        until_logged(
            cluster_ref,
            "coordinator-1",
            &["lost etcd: keeping the last known backends"],
            Duration::from_secs(5),
        )
        .await;
        // A server and a coordinator that start while etcd is away come
        // up (the coordinator NOT_SERVING: no backends yet) and catch up
        // later.
        cluster_ref.start_server(third).await;
        cluster_ref
            .add_coordinator(&discovery_args(etcd_ref, &[]))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        etcd_ref.start();
        until_logged(
            cluster_ref,
            "coordinator-1",
            &["backend registered in etcd", &third_needle],
            Duration::from_secs(8),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    report.print("discovery 4, etcd killed under load, then back");
    assert_clean(&report, REQUESTS);
    assert!(
        report.servers.contains_key(&third_id),
        "{:?}",
        report.servers
    );
    for server in ["server-1", "server-2"] {
        // Each registers again after its own backoff (up to 5 s), which
        // may end after the third server's registration.
        let log = until_counted(
            &cluster,
            server,
            "registered in etcd key=",
            2,
            Duration::from_secs(10),
        )
        .await;
        assert!(log.contains("not registered in etcd"), "{log}");
    }
    let late = cluster.client(&cluster.coordinator_urls()[1..]);
    until_answered_by(&late, &server_ids(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_5_two_coordinators_on_one_prefix_converge() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = Etcd::launch(cluster.work.path(), None);
    start_registered(&mut cluster, &etcd, 3, &[]).await;
    for _ in 0..2 {
        cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    }
    let clients: Vec<Client> = cluster
        .coordinator_urls()
        .iter()
        .map(|url| cluster.client(std::slice::from_ref(url)))
        .collect();
    for client in &clients {
        until_answered_by(client, &server_ids(&cluster)).await;
    }

    let stopped_url = cluster.servers[1].url();
    let stopped_id = cluster.servers[1].id();
    assert!(cluster.servers[1].terminate().success());
    for coordinator in ["coordinator-1", "coordinator-2"] {
        until_logged(
            &cluster,
            coordinator,
            &["backend deregistered from etcd", &stopped_url],
            Duration::from_secs(3),
        )
        .await;
    }
    for client in &clients {
        for _ in 0..50 {
            let reply = client.submit(b"after the stop").await.unwrap();
            assert_ne!(reply.server_id, stopped_id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_6_etcd_over_mutual_tls_with_the_projects_certificates() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = etcd_with_our_certificates(&cluster);
    let ca = "certs/ca_cert.pem";
    start_registered(&mut cluster, &etcd, 2, &REGISTRAR).await;
    let coordinator_identity = [
        "--etcd-ca",
        ca,
        "--etcd-cert",
        "certs/coordinator_cert.pem",
        "--etcd-key",
        "certs/coordinator_key.pem",
    ];
    cluster
        .add_coordinator(&discovery_args(&etcd, &coordinator_identity))
        .await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(&cluster)).await;

    // Refused by etcd: no client certificate, and one from another CA.
    let other = tempfile::tempdir().unwrap();
    let made = common::securemesh(
        &["pki", "init", "--dir", other.path().to_str().unwrap()],
        cluster.work.path(),
    );
    assert!(made.status.success(), "{}", common::text(&made));
    let other_cert = other.path().join("client_cert.pem");
    let other_key = other.path().join("client_key.pem");
    let refused = [
        vec!["--etcd-ca", ca],
        vec![
            "--etcd-ca",
            ca,
            "--etcd-cert",
            other_cert.to_str().unwrap(),
            "--etcd-key",
            other_key.to_str().unwrap(),
        ],
    ];
    for extra in &refused {
        start_registered(&mut cluster, &etcd, 1, extra).await;
    }
    // Nor does a coordinator that talks to etcd without TLS learn anything.
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    for refused_server in ["server-3", "server-4"] {
        let limit = Duration::from_secs(10);
        until_logged(&cluster, refused_server, &["not registered in etcd"], limit).await;
        let log = cluster.log(refused_server);
        assert!(!log.contains("registered in etcd key="), "{log}");
    }
    let limit = Duration::from_secs(10);
    until_logged(
        &cluster,
        "coordinator-2",
        &["cannot read the registrations in etcd yet"],
        limit,
    )
    .await;
    let log = cluster.log("coordinator-2");
    assert!(!log.contains("backend registered in etcd"), "{log}");
    // The first coordinator still has only the two registered servers.
    let log = cluster.log("coordinator-1");
    for server in &cluster.servers[2..] {
        assert!(!log.contains(&server.url()), "{log}");
    }
    let registered: BTreeSet<String> = server_ids(&cluster)[..2].iter().cloned().collect();
    for _ in 0..20 {
        let reply = client.submit(b"who answers now?").await.unwrap();
        assert!(registered.contains(&reply.server_id), "{reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_7_one_server_id_is_held_by_one_live_server_at_a_time() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = Etcd::launch(cluster.work.path(), None);
    let same_id = ["--server-id", "data-1"];
    let first = cluster.add_server(&register_args(&etcd, &same_id));
    cluster.start_server(first).await;
    until_logged(
        &cluster,
        "server-1",
        &["registered in etcd key="],
        Duration::from_secs(5),
    )
    .await;
    let second = cluster.add_server(&register_args(&etcd, &same_id));
    cluster.start_server(second).await;
    let (first_url, second_url) = (cluster.servers[first].url(), cluster.servers[second].url());

    // The second claim is refused, with the holder named; the first keeps
    // its key and its place in the coordinator.
    until_logged(
        &cluster,
        "server-2",
        &[
            "not registered in etcd",
            "held by another registration",
            &first_url,
        ],
        Duration::from_secs(5),
    )
    .await;
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &["data-1".to_owned()]).await;
    until_logged(
        &cluster,
        "coordinator-1",
        &["backend registered in etcd", &first_url],
        Duration::from_secs(5),
    )
    .await;
    let log = cluster.log("coordinator-1");
    assert!(!log.contains(&second_url), "{log}");

    // Killed and started again at once, the first server takes its own
    // record back without waiting for its old lease to expire.
    cluster.servers[first].kill();
    cluster.start_server(first).await;
    until_logged(
        &cluster,
        "server-1",
        &["registered in etcd key="],
        Duration::from_secs(1),
    )
    .await;
    let log = cluster.log("server-1");
    assert!(!log.contains("held by another registration"), "{log}");

    // Once the first leaves, the second takes the name over (on its next
    // try: at most 5 s of backoff) and gets the traffic.
    let status = cluster.servers[first].terminate();
    assert!(status.success(), "the server exited with {status}");
    until_logged(
        &cluster,
        "coordinator-1",
        &["backend registered in etcd", &second_url],
        Duration::from_secs(8),
    )
    .await;
    for _ in 0..20 {
        let reply = client.submit(b"who answers?").await.unwrap();
        assert_eq!(reply.server_id, "data-1");
    }
    let log = cluster.log("coordinator-1");
    assert!(
        common::has_line_with(&log, &["backend deregistered from etcd", &first_url]),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_8_a_registration_deleted_by_hand_is_written_again() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let (etcd, client) = two_registered_servers_and_a_coordinator(&mut cluster).await;

    let url = cluster.servers[0].url();
    let mut operator =
        etcd_client::Client::connect([format!("127.0.0.1:{}", etcd.client_port)], None)
            .await
            .unwrap();
    let deleted = operator
        .delete(format!("{PREFIX}/{}", cluster.servers[0].id()), None)
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 1);
    until_logged(
        &cluster,
        "server-1",
        &["registration was displaced", "deleted"],
        Duration::from_secs(5),
    )
    .await;
    let registered_again = Instant::now();
    loop {
        let log = cluster.log("coordinator-1");
        let registered = log
            .lines()
            .filter(|line| line.contains("backend registered in etcd") && line.contains(&url))
            .count();
        if registered == 2 {
            break;
        }
        assert!(
            registered_again.elapsed() < Duration::from_secs(5),
            "the deleted registration was not written again:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(common::has_line_with(
        &cluster.log("coordinator-1"),
        &["backend deregistered from etcd", &url]
    ));
    until_answered_by(&client, &server_ids(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_9_etcd_with_users_and_roles() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = Etcd::launch(cluster.work.path(), None);

    enable_auth(&etcd).await;

    let as_user = |user: &'static str, password: &'static str| {
        ["--etcd-user", user, "--etcd-password", password]
    };
    start_registered(
        &mut cluster,
        &etcd,
        2,
        &as_user("registrar", "registrar-secret"),
    )
    .await;
    cluster
        .add_coordinator(&discovery_args(
            &etcd,
            &as_user("observer", "observer-secret"),
        ))
        .await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(&cluster)).await;

    // Refused by etcd: a wrong password, and a user that may only read.
    start_registered(&mut cluster, &etcd, 1, &as_user("registrar", "wrong")).await;
    start_registered(
        &mut cluster,
        &etcd,
        1,
        &as_user("observer", "observer-secret"),
    )
    .await;
    // Nor does a coordinator without a user learn anything.
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    for (refused_server, reason) in [
        ("server-3", "authentication failed"),
        ("server-4", "permission denied"),
    ] {
        until_logged(
            &cluster,
            refused_server,
            &["not registered in etcd", reason],
            Duration::from_secs(5),
        )
        .await;
        let log = cluster.log(refused_server);
        assert!(!log.contains("registered in etcd key="), "{log}");
    }
    until_logged(
        &cluster,
        "coordinator-2",
        &["cannot read the registrations in etcd yet"],
        Duration::from_secs(5),
    )
    .await;
    let log = cluster.log("coordinator-2");
    assert!(!log.contains("backend registered in etcd"), "{log}");
    let log = cluster.log("coordinator-1");
    for server in &cluster.servers[2..] {
        assert!(!log.contains(&server.url()), "{log}");
    }
    for label in ["server-1", "server-3", "server-4", "coordinator-1"] {
        let log = cluster.log(label);
        assert!(
            !log.contains("-secret"),
            "{label} logged a password:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_10_an_etcd_certificate_our_ca_revoked_is_refused() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = etcd_with_our_certificates(&cluster);
    start_registered(&mut cluster, &etcd, 1, &REGISTRAR).await;
    until_logged(
        &cluster,
        "server-1",
        &["registered in etcd key="],
        Duration::from_secs(5),
    )
    .await;

    // etcd still serves the certificate our CA has now revoked.
    let revoked = common::securemesh(&["pki", "revoke", "etcd"], cluster.work.path());
    assert!(revoked.status.success(), "{}", common::text(&revoked));
    start_registered(&mut cluster, &etcd, 1, &REGISTRAR).await;
    until_logged(
        &cluster,
        "server-2",
        &["not registered in etcd", "Revoked"],
        Duration::from_secs(5),
    )
    .await;
    let log = cluster.log("server-2");
    assert!(!log.contains("registered in etcd key="), "{log}");

    // With --no-crl the same server registers: the refusal was the CRL's.
    start_registered(
        &mut cluster,
        &etcd,
        1,
        &[&REGISTRAR[..], &["--no-crl"]].concat(),
    )
    .await;
    until_logged(
        &cluster,
        "server-3",
        &["registered in etcd key="],
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_11_an_expired_etcd_token_is_renewed() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    // Tokens expire after a second without use.
    let etcd = Etcd::launch_with(cluster.work.path(), None, &["--auth-token-ttl", "1"]);
    enable_auth(&etcd).await;
    let registrar = [
        "--etcd-user",
        "registrar",
        "--etcd-password",
        "registrar-secret",
    ];
    start_registered(&mut cluster, &etcd, 1, &registrar).await;
    until_logged(
        &cluster,
        "server-1",
        &["registered in etcd key="],
        Duration::from_secs(5),
    )
    .await;
    // Long after the token expired, leaving needs a request of its own
    // (the lease's revocation): it authenticates again and succeeds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = cluster.servers[0].terminate();
    assert!(status.success(), "the server exited with {status}");
    let log = cluster.log("server-1");
    assert!(log.contains("deregistered from etcd"), "{log}");
    assert!(!log.contains("cannot deregister"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_12_a_quiet_watch_on_a_default_etcd_is_kept() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    // etcd as installed: it closes connections that ping more often than
    // every 5 s, at the third such ping.
    let (_etcd, client) = two_registered_servers_and_a_coordinator(&mut cluster).await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let log = cluster.log("coordinator-1");
    assert!(!log.contains("lost etcd"), "{log}");
    assert!(!log.contains("cannot read the registrations"), "{log}");
    for server in ["server-1", "server-2"] {
        let log = cluster.log(server);
        assert!(!log.contains("not registered in etcd"), "{log}");
    }
    client.submit(b"still following").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_13_a_dead_member_in_the_url_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = Etcd::launch(cluster.work.path(), None);
    // A second member that is not there, as in a cluster with one member
    // down; each process is told about both.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let live = etcd.url("");
    let live = live.trim_start_matches("etcd://");
    let url = format!("etcd://127.0.0.1:{dead_port},{live}{PREFIX}");
    for _ in 0..2 {
        let args = ["--register", &url, "--register-ttl", TTL].map(String::from);
        let index = cluster.add_server(&args);
        cluster.start_server(index).await;
    }
    cluster
        .add_coordinator(&["--discovery".to_owned(), url.clone()])
        .await;
    let client = cluster.client(&cluster.coordinator_urls());
    let started = Instant::now();
    until_answered_by(&client, &server_ids(&cluster)).await;
    println!(
        "discovery 13, one dead member: both servers answered after {} ms",
        started.elapsed().as_millis()
    );
    let report = under_load(&client, REQUESTS, |_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;
    report.print("discovery 13, one dead member");
    assert_clean(&report, REQUESTS);
    let log = cluster.log("coordinator-1");
    assert!(!log.contains("backend deregistered from etcd"), "{log}");
    assert!(!log.contains("lost etcd"), "{log}");
    assert!(!log.contains("cannot read the registrations"), "{log}");
    for server in ["server-1", "server-2"] {
        let log = cluster.log(server);
        assert_eq!(log.matches("registered in etcd key=").count(), 1, "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_14_a_member_without_a_leader_is_left_for_one_with_a_leader() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    // Fast elections, so that a member notices within a second that it has
    // no leader.
    let [first, mut second] = Etcd::launch_pair(
        cluster.work.path(),
        &["--heartbeat-interval", "50", "--election-timeout", "250"],
    );
    start_registered(&mut cluster, &second, 2, &[]).await;
    // The coordinator follows through the first member only.
    cluster.add_coordinator(&discovery_args(&first, &[])).await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(&cluster)).await;

    // The second member goes, and the first, alone, has no leader: it
    // still answers, but learns of no change any more. The coordinator's
    // watch is cancelled instead of waiting for events that cannot come.
    second.kill();
    let noticed = until_logged(
        &cluster,
        "coordinator-1",
        &["lost etcd: keeping the last known backends"],
        Duration::from_secs(10),
    )
    .await;
    println!(
        "discovery 14: the leaderless member left after {} ms",
        noticed.as_millis()
    );
    client.submit(b"still served").await.unwrap();

    // Once the cluster has a leader again, the coordinator reads the
    // registrations afresh.
    second.start();
    let started = Instant::now();
    loop {
        let log = cluster.log("coordinator-1");
        if log.matches("read the registrations in etcd").count() >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not following again:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whoever may write the prefix cannot blind a coordinator with large
/// values (three of them once made the listing larger than any answer
/// tonic takes) or hide registrations behind many keys: the listing is
/// read a page at a time, and oversized values are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_15_large_values_and_many_keys_under_the_prefix_hide_no_server() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = Etcd::launch(cluster.work.path(), None);
    let mut writer =
        etcd_client::Client::connect([format!("127.0.0.1:{}", etcd.client_port)], None)
            .await
            .unwrap();
    // Keys that sort before the servers' own: the servers' registrations
    // come on a later page.
    let large = vec![b'x'; 1_400_000];
    for index in 0..3 {
        writer
            .put(format!("{PREFIX}/0-large-{index}"), large.clone(), None)
            .await
            .unwrap();
    }
    for index in 0..40 {
        writer
            .put(format!("{PREFIX}/0-junk-{index:02}"), "not a record", None)
            .await
            .unwrap();
    }
    start_registered(&mut cluster, &etcd, 2, &[]).await;
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(&cluster)).await;
    // Logged after the records it ignored, by the same task.
    until_logged(
        &cluster,
        "coordinator-1",
        &["read the registrations in etcd"],
        Duration::from_secs(5),
    )
    .await;
    let log = cluster.log("coordinator-1");
    // At least once each (a reconnection reads them again).
    assert!(
        log.matches("ignoring a registration far larger than a server record")
            .count()
            >= 3,
        "{log}"
    );
    assert!(!log.contains("cannot read the registrations"), "{log}");
}

/// A TCP relay to etcd that can freeze: it then holds what it reads
/// without passing it on, as a member whose host hangs does.
struct FreezableRelay {
    port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Connections being relayed.
    open: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableRelay {
    async fn to(target_port: u16) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let (frozen_in, open_in) = (frozen.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let (frozen, open) = (frozen_in.clone(), open_in.clone());
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::select! {
                        () = relay(in_read, out_write, frozen.clone()) => {}
                        () = relay(out_read, in_write, frozen) => {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            port,
            frozen,
            open,
            task,
        }
    }

    fn is_relaying(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Passes what `from` reads on to `to`, holding it while `frozen`.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0u8; 16 * 1024];
    while let Ok(read) = from.read(&mut buffer).await {
        if read == 0 {
            return;
        }
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A member that hangs under a server's registration (its host stops
/// answering, TCP connections stay open) costs the server nothing: after
/// half a lease without an answer it moves to another member and takes
/// its key over with a new lease before the old one expires, so the
/// coordinator never sees it leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_16_a_member_that_hangs_under_a_registration_is_left_in_time() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::new();
    let etcd = Etcd::launch(cluster.work.path(), None);
    // Two ways to the one member: the server may take either, and the
    // one it takes hangs.
    let relays = [
        FreezableRelay::to(etcd.client_port).await,
        FreezableRelay::to(etcd.client_port).await,
    ];
    let through_relays = format!(
        "etcd://127.0.0.1:{},127.0.0.1:{}{PREFIX}",
        relays[0].port, relays[1].port
    );
    // A lease long enough that the takeover (a connection, a grant, two
    // transactions) fits in its second half on a slow machine.
    let index = cluster.add_server(&[
        "--register".to_owned(),
        through_relays,
        "--register-ttl".to_owned(),
        "4s".to_owned(),
    ]);
    cluster.start_server(index).await;
    cluster.add_coordinator(&discovery_args(&etcd, &[])).await;
    let client = cluster.client(&cluster.coordinator_urls());
    until_answered_by(&client, &server_ids(&cluster)).await;

    let started = Instant::now();
    let in_use = loop {
        if let Some(relay) = relays.iter().find(|relay| relay.is_relaying()) {
            break relay;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no relayed session"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    in_use.freeze();
    until_logged(
        &cluster,
        "server-1",
        &["etcd stopped answering keep-alives"],
        Duration::from_secs(5),
    )
    .await;
    // The old lease's time: it has expired by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let server = until_counted(
        &cluster,
        "server-1",
        "registered in etcd key=",
        2,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        server.matches("registered in etcd key=").count(),
        2,
        "{server}"
    );
    let coordinator = cluster.log("coordinator-1");
    assert!(
        !coordinator.contains("backend deregistered from etcd"),
        "{coordinator}"
    );
    client.submit(b"still registered").await.unwrap();
}
