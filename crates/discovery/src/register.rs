//! A server's registration: one key under a lease that the server keeps
//! alive while it runs, and revokes when it stops. The key is claimed,
//! never taken from another registration (one `server_id`, one live
//! server), and written again if it disappears while the lease lives.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, Event, EventType, PutOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions,
};
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
    // Leases of ours that may still hold the key (a session ended on a
    // member that stopped answering, or a claim went unanswered): the next
    // registration takes the key over, then revokes them; so does a stop.
    let mut left_behind = Vec::new();
    loop {
        let session = tokio::time::Instant::now();
        match hold(&config, &key, &value, ttl, &mut stop, &mut left_behind).await {
            Ok(()) => return,
            Err(error) => {
                backoff.session_ended(session.elapsed());
                let delay = backoff.delay();
                tracing::warn!(
                    %key,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "not registered in etcd; serving on and registering again"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {
                        if !left_behind.is_empty() {
                            revoke_left_behind(&config, &key, &left_behind).await;
                        }
                        return;
                    }
                }
            }
        }
    }
}

/// Revokes `leases`, left behind by sessions that ended, through any
/// member that answers: the key one of them may still hold goes at once.
async fn revoke_left_behind(config: &EtcdConfig, key: &str, leases: &[i64]) {
    let revoked = async {
        let mut client = config.connect().await?;
        revoke_all(&mut client, leases).await
    };
    report_deregistration(key, revoked.await);
}

/// Revokes each of `leases` through `client`; the last failure, if any.
/// (One that expired already is "not found": nothing is lost.)
async fn revoke_all(client: &mut Client, leases: &[i64]) -> Result<(), DiscoveryError> {
    let mut outcome = Ok(());
    for &lease in leases {
        if let Err(error) = within(client.lease_revoke(lease)).await {
            outcome = Err(error);
        }
    }
    outcome
}

/// How many leases left behind a registration remembers. Each expires on
/// its own within its TTL (nothing keeps it alive); remembering one only
/// lets a stop or the next session delete its key at once.
const MOST_LEASES_LEFT_BEHIND: usize = 8;

/// Remembers `lease` as left behind. Beyond [`MOST_LEASES_LEFT_BEHIND`],
/// the oldest is kept (the lease of the last session that held the key,
/// the likeliest to hold it still) and the next oldest forgotten.
fn leave_behind(left_behind: &mut Vec<i64>, lease: i64) {
    left_behind.push(lease);
    if left_behind.len() > MOST_LEASES_LEFT_BEHIND {
        left_behind.remove(1);
    }
}

/// Logs how revoking the registration's lease at the stop went.
fn report_deregistration<T>(key: &str, revoked: Result<T, DiscoveryError>) {
    match revoked {
        Ok(_) => tracing::info!(%key, "deregistered from etcd"),
        Err(error) => {
            tracing::warn!(%key, %error, "cannot deregister: the key expires with its lease")
        }
    }
}

/// One registration, from lease grant to loss or withdrawal. `Ok` means
/// it was withdrawn. A session that ends with its lease perhaps alive (the
/// member stopped answering, a stream broke, or its claim went
/// unanswered) leaves it in `left_behind`; once a new session holds the
/// key, it revokes those.
async fn hold(
    config: &EtcdConfig,
    key: &str,
    value: &str,
    ttl: Duration,
    stop: &mut watch::Receiver<bool>,
    left_behind: &mut Vec<i64>,
) -> Result<(), DiscoveryError> {
    let set_up = async {
        let mut client = config.connect().await?;
        // etcd leases last whole seconds, at least one, and etcd may grant
        // more than asked (it raises a TTL below its minimum); everything
        // below (renewal, loss) follows the lease as granted.
        let asked = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = within(client.lease_grant(asked, None)).await?;
        let lease = granted.id();
        let ttl_seconds = granted.ttl().max(1);
        // Until its claim is answered, the new lease may hold the key (the
        // write may go through unanswered): left behind until then, so
        // that a stop meanwhile revokes it too.
        leave_behind(left_behind, lease);
        let revision = match claim(&mut client, key, value, lease).await {
            Ok(revision) => revision,
            Err(error @ DiscoveryError::Taken { .. }) => {
                // Someone else's key: the new lease holds nothing.
                left_behind.retain(|&left| left != lease);
                let _ = within(client.lease_revoke(lease)).await;
                return Err(error);
            }
            // Unanswered: revoking the lease could delete a live
            // registration. It stays left behind.
            Err(error) => return Err(error),
        };
        let earlier: Vec<i64> = std::mem::replace(left_behind, vec![lease])
            .into_iter()
            .filter(|&left| left != lease)
            .collect();
        if !earlier.is_empty() {
            // The key is bound to the new lease now: the earlier ones hold
            // nothing, and would only expire. Revoked aside, so that the
            // new lease's keep-alives do not wait for them.
            let mut revoking = client.clone();
            tokio::spawn(async move {
                let _ = revoke_all(&mut revoking, &earlier).await;
            });
        }
        // From here the new lease holds the key: a failure leaves it behind
        // for the next session to take the key over from, instead of
        // revoking it and deleting the key of a live server.
        // Watching the key from just after our write tells us if it is
        // deleted (by hand) or taken over while the lease lives on.
        let changes = WatchOptions::new().with_start_revision(revision + 1);
        let changes = within(client.watch(key, Some(changes))).await?;
        let (keeper, acknowledgements) = within(client.lease_keep_alive(lease)).await?;
        Ok::<_, DiscoveryError>((
            client,
            lease,
            ttl_seconds,
            changes,
            keeper,
            acknowledgements,
        ))
    };
    // A stop while the session is being set up (a member slow to answer
    // can take seconds) is not kept waiting: whatever lease may hold the
    // key is revoked through any member.
    let set_up = tokio::select! {
        set_up = set_up => Some(set_up),
        _ = stop.changed() => None,
    };
    let Some(set_up) = set_up else {
        if !left_behind.is_empty() {
            revoke_left_behind(config, key, left_behind).await;
        }
        return Ok(());
    };
    let (mut client, lease, ttl_seconds, mut changes, mut keeper, mut acknowledgements) = set_up?;
    let ttl = Duration::from_secs(u64::try_from(ttl_seconds).unwrap_or(1));
    tracing::info!(%key, lease, ttl_s = ttl_seconds, "registered in etcd");
    let _connected = Connected::now();

    // Renewed four times a lease; a member that leaves keep-alives
    // unanswered for half a lease is left for another, which takes the key
    // over (the same record, a new lease) before the old lease expires:
    // coordinators see no departure.
    let mut renew = tokio::time::interval(ttl / 4);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let unanswered_for = ttl / 2;
    let given_up = tokio::time::sleep(unanswered_for);
    tokio::pin!(given_up);
    let outcome = loop {
        tokio::select! {
            _ = stop.changed() => {
                // Revoking deletes every key bound to the lease, atomically,
                // and only ours: a key another process took over since is
                // bound to its own lease and stays.
                report_deregistration(key, within(client.lease_revoke(lease)).await);
                return Ok(());
            }
            () = &mut given_up => {
                break Err(DiscoveryError::LeaseLost("etcd stopped answering keep-alives"));
            }
            _ = renew.tick() => {
                if let Err(error) = keeper.keep_alive().await {
                    break Err(error.into());
                }
            }
            acknowledgement = acknowledgements.message() => match acknowledgement {
                Ok(Some(acknowledgement)) if acknowledgement.ttl() > 0 => {
                    given_up.as_mut().reset(Instant::now() + unanswered_for);
                }
                Ok(Some(_)) => return Err(DiscoveryError::LeaseLost("etcd expired it")),
                Ok(None) => break Err(DiscoveryError::StreamEnded("lease keep-alive".into())),
                Err(error) => break Err(error.into()),
            },
            change = changes.message() => match change {
                Ok(Some(response)) if response.canceled() => {
                    break Err(DiscoveryError::StreamEnded(format!("watch of {key} cancelled")));
                }
                Ok(Some(response)) => {
                    if let Some(lost) = response.events().iter().find_map(|event| displaced(event, lease, value)) {
                        // The key is gone or someone else's: our lease
                        // holds nothing useful.
                        if within(client.lease_revoke(lease)).await.is_ok() {
                            left_behind.clear();
                        }
                        return Err(lost);
                    }
                }
                Ok(None) => break Err(DiscoveryError::StreamEnded("watch".into())),
                Err(error) => break Err(error.into()),
            },
        }
    };
    // The session ended while the lease may live on, holding the key: not
    // revoked here (a member that stopped answering would hold this up
    // until the request timeout, and the key would go), but by the next
    // session once it has taken the key over, or at the stop (it is in
    // `left_behind` since the claim).
    outcome
}

/// Writes `value` at `key` under `lease`, if no one holds the key, or if
/// its holder wrote the very same record: this server's own registration
/// from before a restart, whose lease has not expired yet. Another server
/// that claims the same `server_id` is refused, instead of silently taking
/// its key (and, with it, its place in every coordinator). Returns the
/// revision of the write.
async fn claim(
    client: &mut Client,
    key: &str,
    value: &str,
    lease: i64,
) -> Result<i64, DiscoveryError> {
    let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
    let mut holder = Vec::new();
    // Twice: our own earlier registration may expire between the two
    // steps, leaving the key free, not someone else's.
    for _ in 0..2 {
        let if_free = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::get(key, None)]);
        let response = within(client.txn(if_free)).await?;
        if response.succeeded() {
            return Ok(revision_of(&response));
        }
        holder = response
            .op_responses()
            .into_iter()
            .find_map(|operation| match operation {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        if holder != value.as_bytes() {
            break;
        }
        let if_ours = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, value)])
            .and_then([put.clone()]);
        let response = within(client.txn(if_ours)).await?;
        if response.succeeded() {
            return Ok(revision_of(&response));
        }
    }
    Err(DiscoveryError::Taken {
        key: key.to_owned(),
        holder: shown_record(&holder),
    })
}

fn revision_of(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |header| header.revision())
}

/// Whether `event` on our key means the registration is lost: the key was
/// deleted (by hand: our lease still lives), or written by another
/// registration with another record. The same record written under
/// another lease (a restart of this very server that took over) is not a
/// loss: when that one leaves, the key's deletion is.
fn displaced(event: &Event, lease: i64, value: &str) -> Option<DiscoveryError> {
    let kv = event.kv()?;
    match event.event_type() {
        EventType::Delete => Some(DiscoveryError::Displaced(
            "the key was deleted while its lease lived".into(),
        )),
        EventType::Put if kv.lease() == lease || kv.value() == value.as_bytes() => None,
        EventType::Put => Some(DiscoveryError::Displaced(format!(
            "another registration wrote the key: {}",
            shown_record(kv.value())
        ))),
    }
}

/// The most of another registration's record a message shows.
const MOST_SHOWN_RECORD_CHARS: usize = 256;

/// Another registration's record (anyone who may write the prefix wrote
/// it) as a message may show it: cut short, its control characters
/// escaped, so that it cannot forge log lines.
fn shown_record(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut shown: String = text.chars().take(MOST_SHOWN_RECORD_CHARS).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    securemesh::text::printable(&shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that accepts connections and never answers holds a
    /// session's set-up for seconds; a stop meanwhile ends it at once.
    #[tokio::test]
    async fn a_stop_while_registering_is_not_kept_waiting() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config: EtcdConfig = format!("etcd://{}/securemesh", silent.local_addr().unwrap())
            .parse()
            .unwrap();
        let record = ServerRecord {
            server_id: "one".into(),
            url: "https://127.0.0.1:1".into(),
        };
        let registration = register(config, record, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stopping = std::time::Instant::now();
        registration.withdraw(Duration::from_secs(10)).await;
        let took = stopping.elapsed();
        assert!(took < Duration::from_secs(1), "the stop waited {took:?}");
        drop(silent);
    }

    #[test]
    fn leases_left_behind_are_bounded_and_the_first_is_kept() {
        let mut left_behind = Vec::new();
        for lease in 1..=20 {
            leave_behind(&mut left_behind, lease);
        }
        assert_eq!(left_behind, [1, 14, 15, 16, 17, 18, 19, 20]);
    }

    #[test]
    fn another_registrations_record_is_shown_on_one_line_and_cut_short() {
        let forged =
            "{\"url\":\"https://x\"}\n2026-11-29T00:00:00Z  INFO registered in etcd\u{1b}[2J";
        let shown = shown_record(forged.as_bytes());
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(shown.contains("\\n"), "{shown}");
        let long = "x".repeat(10_000);
        let shown = shown_record(long.as_bytes());
        assert_eq!(shown.chars().count(), MOST_SHOWN_RECORD_CHARS + 1);
        assert!(shown.ends_with('…'));
        assert_eq!(shown_record(b"\xff\xfe"), "\u{fffd}\u{fffd}");
    }
}
