//! The set of backends (servers, or coordinators for a client), published
//! to the balancer as a `tower::discover`
//! stream.
//!
//! Static `--backend` URLs are added at start; a dynamic source (etcd) adds
//! and removes through the same [`BackendPool::add`] and
//! [`BackendPool::remove`] calls, and the balancer follows without a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use securemesh_tls::ClientTls;
use tokio::task::JoinHandle;
use tower::discover::Change;

use crate::backend::{Backend, BackendState, Rotation};
use crate::changes::ChangeSender;
pub use crate::changes::Discovery;
use crate::channel::{ChannelError, ChannelOptions, Http2Channel};
use crate::lock;
use crate::outlier::EjectionPolicy;

/// A backend as the balancer holds it: its service, weighed by its
/// attempts in flight (see [`BackendState::load`]).
pub type BalancedBackend = Backend;

/// How the coordinator connects to and watches its backends.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// TLS toward backends (the coordinator's own certificate).
    pub tls: ClientTls,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on one attempt of a call on one backend.
    pub attempt_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings, so a hung backend is noticed.
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long closes the connection.
    pub keepalive_timeout: Duration,
    /// Whether to check backends' health actively (a load generator
    /// measuring one target turns this off, so that it never takes the
    /// target out of rotation itself).
    pub health_checks: bool,
    /// Interval of active health checks.
    pub health_interval: Duration,
    /// Bound on one health check.
    pub health_timeout: Duration,
    /// When failed calls eject a backend, and for how long.
    pub ejection: EjectionPolicy,
}

impl BackendOptions {
    /// Defaults for everything but TLS.
    pub fn new(tls: ClientTls) -> Self {
        Self {
            tls,
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(2),
            health_checks: true,
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            ejection: EjectionPolicy::default(),
        }
    }
}

/// Why a backend could not be added.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The URL is not a valid endpoint.
    #[error("backend: {0}")]
    Endpoint(#[from] ChannelError),
    /// The balancer has stopped (the coordinator is shutting down).
    #[error("the balancer is gone")]
    BalancerGone,
}

/// One backend's state as reported by [`BackendPool::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSnapshot {
    /// The backend URL.
    pub url: String,
    /// Whether the balancer may pick it.
    pub in_rotation: bool,
    /// Whether its last health check answered `SERVING`.
    pub healthy: bool,
    /// Whether it is ejected for failed calls.
    pub ejected: bool,
    /// The most recent failure reason.
    pub last_failure: Option<String>,
    /// Attempts in flight on it now.
    pub in_flight: u64,
    /// Its recent attempts.
    pub recent: securemesh_telemetry::WindowSnapshot,
}

struct Member {
    state: Arc<BackendState>,
    /// Its health checks, or (with checks off) the task that ends its
    /// ejections.
    prober: JoinHandle<()>,
    /// Its current connection, let go when it leaves.
    channel: Http2Channel,
    /// How many sources (the static list, discovery keys) named this URL;
    /// the backend leaves when the last of them removes it.
    sources: usize,
}

/// The backends of one coordinator.
pub struct BackendPool {
    options: BackendOptions,
    /// TLS for new backend connections; replaced on reload.
    tls: Mutex<ClientTls>,
    rotation: Arc<Rotation>,
    changes: ChangeSender,
    members: Mutex<BTreeMap<String, Member>>,
}

impl BackendPool {
    /// A pool with no backends, and the discovery stream for its balancer.
    pub fn new(options: BackendOptions) -> (Arc<Self>, Discovery) {
        let (changes, discovery) = crate::changes::channel();
        let pool = Arc::new(Self {
            tls: Mutex::new(options.tls.clone()),
            options,
            rotation: Arc::default(),
            changes,
            members: Mutex::default(),
        });
        (pool, discovery)
    }

    /// Adds a backend and starts probing its health. A URL added again (by
    /// another source: the static list and a discovery key may name the
    /// same server) is counted, not connected twice.
    pub fn add(&self, url: &str) -> Result<(), PoolError> {
        let mut members = self.members();
        if let Some(member) = members.get_mut(url) {
            member.sources += 1;
            return Ok(());
        }
        let member = self.connect(url)?;
        tracing::info!(backend = %url, "backend added");
        members.insert(url.to_owned(), member);
        Ok(())
    }

    /// A backend for `url`, published to the balancer, with its prober.
    fn connect(&self, url: &str) -> Result<Member, PoolError> {
        let state = BackendState::new(url.to_owned(), self.options.ejection, self.rotation.clone());
        // The new state already counts in the rotation: a backend that
        // cannot be published must leave it, or the pool would count it
        // (and never fail fast, nor eject its last real backend) for good.
        let (prober, channel) = self.publish(url, &state).inspect_err(|_| state.retire())?;
        Ok(Member {
            state,
            prober,
            channel,
            sources: 1,
        })
    }

    /// Publishes to the balancer a backend for `url` over a new channel
    /// with the current TLS (replacing any backend it had for `url`), and
    /// starts its prober.
    fn publish(
        &self,
        url: &str,
        state: &Arc<BackendState>,
    ) -> Result<(tokio::task::JoinHandle<()>, Http2Channel), PoolError> {
        let tls = lock(&self.tls).rustls_config();
        let channel = Http2Channel::new(
            url,
            tls,
            ChannelOptions {
                connect_timeout: self.options.connect_timeout,
                keepalive_interval: self.options.keepalive_interval,
                keepalive_timeout: self.options.keepalive_timeout,
            },
        )?;
        let backend = Backend::new(state.clone(), channel.clone(), self.options.attempt_timeout);
        if !self.changes.send(Change::Insert(url.to_owned(), backend)) {
            channel.close();
            return Err(PoolError::BalancerGone);
        }
        let prober = if self.options.health_checks {
            tokio::spawn(crate::health::probe(
                state.clone(),
                channel.clone(),
                self.options.health_interval,
                self.options.health_timeout,
            ))
        } else {
            tokio::spawn(crate::health::readmit(state.clone()))
        };
        Ok((prober, channel))
    }

    /// Removes a backend once every source that added it has removed it:
    /// the balancer drops it and its prober stops.
    pub fn remove(&self, url: &str) {
        let mut members = self.members();
        let Some(member) = members.get_mut(url) else {
            return;
        };
        member.sources -= 1;
        if member.sources > 0 {
            return;
        }
        if let Some(member) = members.remove(url) {
            self.disconnect(url, &member);
            tracing::info!(backend = %url, "backend removed");
        }
    }

    fn disconnect(&self, url: &str, member: &Member) {
        member.prober.abort();
        member.state.retire();
        // The balancer drops the backend only when it next looks at its
        // changes (at the next call): meanwhile an idle coordinator would
        // keep the connection open and pinged.
        member.channel.close();
        self.changes.send(Change::Remove(url.to_owned()));
    }

    /// Connects to every backend again with `tls` (a renewed certificate,
    /// a new CRL): each backend gets a new connection in the balancer, and
    /// keeps what was learnt about it (health, ejection, failures), so that
    /// a dead or hung backend does not come back into rotation, nor does
    /// the rotation empty meanwhile. Calls in flight finish on the old
    /// connections.
    pub fn replace_tls(&self, tls: ClientTls) -> Result<(), PoolError> {
        *lock(&self.tls) = tls;
        let mut members = self.members();
        for (url, member) in members.iter_mut() {
            // The new service replaces the old one in the balancer once
            // ready, and the old connection goes once its calls in flight
            // end.
            let (prober, channel) = self.publish(url, &member.state)?;
            std::mem::replace(&mut member.prober, prober).abort();
            std::mem::replace(&mut member.channel, channel).close();
            tracing::info!(backend = %url, "backend reconnected with new TLS");
        }
        Ok(())
    }

    /// How many backends the balancer may pick right now.
    pub fn in_rotation(&self) -> usize {
        self.rotation.count()
    }

    /// The pool's rotation count, shared with its backends.
    pub fn rotation(&self) -> Arc<Rotation> {
        self.rotation.clone()
    }

    /// The state of every backend, ordered by URL.
    pub fn snapshot(&self) -> Vec<BackendSnapshot> {
        self.members()
            .values()
            .map(|member| BackendSnapshot {
                url: member.state.url().to_owned(),
                in_rotation: member.state.is_in_rotation(),
                healthy: member.state.is_healthy(),
                ejected: member.state.is_ejected(),
                last_failure: member.state.last_failure(),
                in_flight: member.state.in_flight(),
                recent: member.state.recent(),
            })
            .collect()
    }

    fn members(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Member>> {
        lock(&self.members)
    }
}

impl Drop for BackendPool {
    fn drop(&mut self) {
        for member in self.members().values() {
            member.prober.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::HealthCheck;

    fn pool() -> (tempfile::TempDir, Arc<BackendPool>, Discovery) {
        let (dir, tls) = crate::testing::coordinator_tls();
        let (pool, discovery) = BackendPool::new(BackendOptions::new(tls));
        (dir, pool, discovery)
    }

    fn urls(pool: &BackendPool) -> Vec<String> {
        pool.snapshot()
            .into_iter()
            .map(|backend| backend.url)
            .collect()
    }

    #[tokio::test]
    async fn a_backend_that_cannot_be_added_leaves_no_count_behind() {
        let (_dir, pool, discovery) = pool();
        pool.add("https://127.0.0.1:9").unwrap();
        let counted = pool.in_rotation();
        for bad in ["http://10.0.0.5:5001", "not a url"] {
            assert!(pool.add(bad).is_err(), "{bad}");
        }
        assert_eq!(pool.in_rotation(), counted);
        drop(discovery);
        assert!(matches!(
            pool.add("https://127.0.0.1:10"),
            Err(PoolError::BalancerGone)
        ));
        assert_eq!(pool.in_rotation(), counted);
        assert_eq!(urls(&pool), ["https://127.0.0.1:9"]);
    }

    #[tokio::test]
    async fn a_backend_named_by_two_sources_leaves_when_both_removed_it() {
        let (_dir, pool, _discovery) = pool();
        let url = "https://127.0.0.1:9";
        pool.add(url).unwrap();
        pool.add(url).unwrap();
        assert_eq!(urls(&pool), [url]);
        pool.remove(url);
        assert_eq!(urls(&pool), [url], "one source still names it");
        pool.remove(url);
        assert!(urls(&pool).is_empty());
        pool.remove(url);
        assert!(urls(&pool).is_empty(), "removing an unknown URL is a no-op");
    }

    #[tokio::test]
    async fn an_idle_balancer_is_owed_one_change_per_backend_it_has_or_will_have() {
        use futures_util::FutureExt as _;
        use futures_util::StreamExt as _;
        let (_dir, tls) = crate::testing::coordinator_tls();
        let mut options = BackendOptions::new(tls);
        options.health_checks = false;
        let (pool, mut discovery) = BackendPool::new(options);
        let (restarting, gone, staying) = (
            "https://127.0.0.1:9",
            "https://127.0.0.1:10",
            "https://127.0.0.1:11",
        );
        let (handed, removed) = ("https://127.0.0.1:12", "https://127.0.0.1:13");
        pool.add(handed).unwrap();
        pool.add(removed).unwrap();
        let mut handed_out = Vec::new();
        while let Some(Some(Ok(change))) = discovery.next().now_or_never() {
            handed_out.push(change);
        }
        assert_eq!(handed_out.len(), 2);
        pool.add(gone).unwrap();
        pool.add(staying).unwrap();
        for _ in 0..1000 {
            pool.add(restarting).unwrap();
            pool.remove(restarting);
        }
        // Servers restarting on new ports: none of them is owed at all.
        for port in 2000..3000 {
            let url = format!("https://127.0.0.1:{port}");
            pool.add(&url).unwrap();
            pool.remove(&url);
        }
        pool.add(restarting).unwrap();
        pool.remove(gone);
        // One the balancer has must go, though: it is owed the removal.
        pool.remove(removed);
        let mut owed = Vec::new();
        while let Some(Some(Ok(change))) = discovery.next().now_or_never() {
            owed.push(match change {
                Change::Insert(url, _) => format!("+{url}"),
                Change::Remove(url) => format!("-{url}"),
            });
        }
        owed.sort();
        assert_eq!(
            owed,
            [
                format!("+{staying}"),
                format!("+{restarting}"),
                format!("-{removed}")
            ]
        );
        // Read now, a change is read at once; once the pool is gone, the
        // stream ends.
        pool.remove(staying);
        let next = discovery.next().now_or_never().flatten();
        assert!(matches!(next, Some(Ok(Change::Remove(url))) if url == staying));
        drop(pool);
        assert!(discovery.next().now_or_never().unwrap().is_none());
    }

    #[tokio::test]
    async fn reconnecting_keeps_how_many_sources_named_a_backend() {
        let (dir, pool, _discovery) = pool();
        let url = "https://127.0.0.1:9";
        pool.add(url).unwrap();
        pool.add(url).unwrap();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "coordinator");
        pool.replace_tls(securemesh_tls::client_tls_config(&files).unwrap())
            .unwrap();
        pool.remove(url);
        assert_eq!(urls(&pool), [url]);
        pool.remove(url);
        assert!(urls(&pool).is_empty());
    }

    #[tokio::test]
    async fn reconnecting_keeps_what_was_learnt_about_each_backend() {
        let (dir, tls) = crate::testing::coordinator_tls();
        let mut options = BackendOptions::new(tls);
        // No probes: only what the test does moves the verdicts.
        options.health_checks = false;
        let (pool, _discovery) = BackendPool::new(options);
        let (dead, alive) = ("https://127.0.0.1:9", "https://127.0.0.1:10");
        pool.add(dead).unwrap();
        pool.add(alive).unwrap();
        let state = pool.members()[dead].state.clone();
        state.call_failed("connection refused");
        assert!(!state.is_in_rotation(), "not ejected");
        let mut serving = pool.rotation().serving();
        serving.mark_unchanged();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "coordinator");
        pool.replace_tls(securemesh_tls::client_tls_config(&files).unwrap())
            .unwrap();
        let after = &pool.members()[dead].state;
        assert!(
            Arc::ptr_eq(after, &state),
            "a new state forgot the ejection"
        );
        assert!(!after.is_in_rotation());
        assert_eq!(after.last_failure().as_deref(), Some("connection refused"));
        assert_eq!(pool.in_rotation(), 1);
        assert!(!serving.has_changed().unwrap(), "the rotation emptied");
    }

    #[tokio::test]
    async fn a_draining_backend_returns_as_soon_as_the_last_other_one_leaves() {
        let (_dir, tls) = crate::testing::coordinator_tls();
        let mut options = BackendOptions::new(tls);
        // One check each at the start (both fail: nothing listens), then
        // none during the test.
        options.health_interval = Duration::from_secs(3600);
        let (pool, _discovery) = BackendPool::new(options);
        let (a, b) = ("https://127.0.0.1:9", "https://127.0.0.1:10");
        pool.add(a).unwrap();
        pool.add(b).unwrap();
        let draining = pool.members()[a].state.clone();
        let other = pool.members()[b].state.clone();
        until("no first check", || {
            draining.last_failure().is_some() && other.last_failure().is_some()
        })
        .await;
        let asks_for_no_calls =
            || HealthCheck::AsksForNoCalls("health check answered NOT_SERVING".into());
        other.checked(HealthCheck::Serving);
        draining.checked(asks_for_no_calls());
        assert!(!draining.is_in_rotation());
        assert_eq!(pool.in_rotation(), 1);

        other.checked(HealthCheck::Failed("health check failed: refused".into()));
        until("the draining backend waited for its next check", || {
            draining.is_in_rotation()
        })
        .await;
        assert_eq!(pool.in_rotation(), 1);
    }

    /// Waits at most 3 s for `done`; fails saying `what` otherwise.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(3), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn reconnecting_lets_the_old_connections_go() {
        let (dir, tls) = crate::testing::coordinator_tls();
        let endpoint = crate::testing::slow_endpoint(dir.path(), Duration::ZERO).await;
        let mut options = BackendOptions::new(tls);
        options.health_interval = Duration::from_millis(100);
        let (pool, _discovery) = BackendPool::new(options);
        pool.add(&format!("https://127.0.0.1:{}", endpoint.port))
            .unwrap();
        let count = |counter: &std::sync::atomic::AtomicUsize| {
            counter.load(std::sync::atomic::Ordering::SeqCst)
        };
        until("no health check connected", || {
            count(&endpoint.accepted) == 1
        })
        .await;

        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "coordinator");
        pool.replace_tls(securemesh_tls::client_tls_config(&files).unwrap())
            .unwrap();
        until("the new connection was not made", || {
            count(&endpoint.accepted) == 2
        })
        .await;
        until("the old connection was kept", || {
            count(&endpoint.closed) == 1
        })
        .await;
        // The new one stays.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(count(&endpoint.closed), 1);
        assert_eq!(count(&endpoint.accepted), 2);
    }

    #[tokio::test]
    async fn without_health_checks_an_ejection_still_ends() {
        let (_dir, tls) = crate::testing::coordinator_tls();
        let mut options = BackendOptions::new(tls);
        options.health_checks = false;
        options.ejection.base_time = Duration::from_millis(100);
        let (pool, _discovery) = BackendPool::new(options);
        let (a, b) = ("https://127.0.0.1:9", "https://127.0.0.1:10");
        pool.add(a).unwrap();
        pool.add(b).unwrap();
        let state = pool.members()[a].state.clone();
        state.call_failed("connection refused");
        assert!(!state.is_in_rotation(), "not ejected");
        let ejected = std::time::Instant::now();
        while !state.is_in_rotation() {
            assert!(
                ejected.elapsed() < Duration::from_secs(2),
                "an ejection of 100 ms never ended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ejected.elapsed() >= Duration::from_millis(90));
    }
}
