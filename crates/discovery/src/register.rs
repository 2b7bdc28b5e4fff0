//! A server's registration: one key under a lease that the server keeps
//! alive while it runs, and revokes when it stops.

use std::time::Duration;

use etcd_client::PutOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::within;
use crate::{Backoff, Connected, DiscoveryError, EtcdConfig};

/// What a server publishes about itself: the value of its key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerRecord {
    /// The name the server reports in its replies.
    pub server_id: String,
    /// Where coordinators reach it, e.g. `https://10.0.0.5:5001`; the host
    /// must be in the server certificate's SANs.
    pub url: String,
}

/// A running registration. [`Registration::withdraw`] ends it cleanly;
/// dropping it stops keeping the lease alive, so the key expires.
#[derive(Debug)]
pub struct Registration {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Registers `record` under `config`'s prefix with a lease of `ttl`, and
/// keeps it registered in the background: if etcd is unreachable now or
/// later, or the lease is lost, it registers again when etcd answers.
pub fn register(config: EtcdConfig, record: ServerRecord, ttl: Duration) -> Registration {
    let (stop, stopped) = watch::channel(false);
    let key = config.key_of(&record.server_id);
    let task = tokio::spawn(keep_registered(config, key, record, ttl, stopped));
    Registration {
        stop,
        task: Some(task),
    }
}

impl Registration {
    /// Revokes the lease, which deletes the key at once (coordinators stop
    /// sending new calls here), waiting at most `limit` for etcd.
    pub async fn withdraw(mut self, limit: Duration) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(limit, task).await.is_err() {
                abort.abort();
                tracing::warn!("etcd did not confirm the deregistration in time: the key expires with its lease");
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn keep_registered(
    config: EtcdConfig,
    key: String,
    record: ServerRecord,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let value = match serde_json::to_string(&record) {
        Ok(value) => value,
        Err(error) => {
            tracing::error!(%error, "cannot encode the registration");
            return;
        }
    };
    let mut backoff = Backoff::new();
    loop {
        match hold(&config, &key, &value, ttl, &mut stop, &mut backoff).await {
            Ok(()) => return,
            Err(error) => {
                let delay = backoff.delay();
                tracing::warn!(
                    %key,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "not registered in etcd; serving on and registering again"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// One registration, from lease grant to loss or withdrawal. `Ok` means
/// it was withdrawn.
async fn hold(
    config: &EtcdConfig,
    key: &str,
    value: &str,
    ttl: Duration,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), DiscoveryError> {
    let mut client = config.connect().await?;
    let ttl_seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let lease = within(client.lease_grant(ttl_seconds, None)).await?.id();
    let registered = async {
        let put = PutOptions::new().with_lease(lease);
        within(client.put(key, value, Some(put))).await?;
        within(client.lease_keep_alive(lease)).await
    };
    let (mut keeper, mut acknowledgements) = match registered.await {
        Ok(streams) => streams,
        Err(error) => {
            let _ = within(client.lease_revoke(lease)).await;
            return Err(error);
        }
    };
    tracing::info!(%key, lease, ttl_s = ttl_seconds, "registered in etcd");
    backoff.reset();
    let _connected = Connected::now();

    let mut renew = tokio::time::interval(ttl / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_acknowledged = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // Revoking deletes every key bound to the lease, atomically,
                // and only ours: a key another process took over since is
                // bound to its own lease and stays.
                match within(client.lease_revoke(lease)).await {
                    Ok(_) => tracing::info!(%key, "deregistered from etcd"),
                    Err(error) => tracing::warn!(%key, %error, "cannot deregister: the key expires with its lease"),
                }
                return Ok(());
            }
            _ = renew.tick() => {
                if last_acknowledged.elapsed() > ttl {
                    return Err(DiscoveryError::LeaseLost("etcd stopped answering keep-alives"));
                }
                keeper.keep_alive().await?;
            }
            acknowledgement = acknowledgements.message() => match acknowledgement? {
                Some(acknowledgement) if acknowledgement.ttl() > 0 => {
                    last_acknowledged = Instant::now();
                }
                Some(_) => return Err(DiscoveryError::LeaseLost("etcd expired it")),
                None => return Err(DiscoveryError::StreamEnded("lease keep-alive".into())),
            },
        }
    }
}
