//! Service discovery through etcd.
//!
//! A server [`register`]s itself: one key `<prefix>/<server_id>` whose
//! value is a [`ServerRecord`], bound to a lease it keeps alive while it
//! runs and revokes when it stops. A coordinator [`follow`]s the prefix:
//! it reads it, watches it from that revision, and turns every put and
//! delete into a change of its backend set. Either side rides out an etcd
//! outage: the server keeps serving and registers again, the coordinator
//! keeps the last known set and reads the prefix again.
//!
//! etcd is one source of backends among possible others: anything that
//! can list a service and notify changes (a Consul catalog's blocking
//! queries, Kubernetes endpoints) would drive the same [`Membership`].

mod config;
mod follow;
mod register;

pub use config::{EtcdAuth, EtcdConfig, EtcdTls, EtcdUrlError, DEFAULT_PREFIX};
pub use follow::{follow, Membership, MembershipError, MOST_DISCOVERED_BACKENDS};
pub use register::{register, Registration, ServerRecord};

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The etcd client reported an error.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// TLS toward etcd could not be set up (a file missing or unusable).
    #[error("TLS toward etcd: {0}")]
    Tls(#[from] securemesh_tls::TlsError),
    /// Our CA's CRL was there at an earlier connection and is gone now:
    /// etcd's certificate is not trusted unchecked.
    #[error(
        "{0}: our CA's revocation list is gone since the last connection to etcd; restore it \
         (refusing to trust etcd's certificate without it)"
    )]
    CrlGone(std::path::PathBuf),
    /// A channel to etcd could not be set up (a member's address that is
    /// not a URL, or TLS the transport refused).
    #[error("channel to etcd: {0}")]
    Channel(#[from] tonic::transport::Error),
    /// The lease was lost (etcd expired it, or stopped answering).
    #[error("the registration's lease was lost: {0}")]
    LeaseLost(&'static str),
    /// Another registration holds the key (two servers with one
    /// `server_id`): it is not taken from it.
    #[error(
        "{key} is held by another registration ({holder}): give each server its own --server-id"
    )]
    Taken {
        /// The key.
        key: String,
        /// Its value, the other registration's record.
        holder: String,
    },
    /// The key was deleted or rewritten while the registration held it.
    #[error("the registration was displaced: {0}")]
    Displaced(String),
    /// A password would cross the network in clear: etcd users need TLS
    /// toward members that are not on this host.
    #[error(
        "the etcd password would be sent in clear to {0}: give --etcd-ca (TLS), or reach etcd on \
         this host"
    )]
    PlaintextPassword(String),
    /// No connection could be made to a member (the last one tried).
    #[error("cannot reach etcd member {member}: {reason}")]
    Unreachable {
        /// `HOST:PORT` of the member.
        member: String,
        /// Why, with its causes.
        reason: String,
    },
    /// The etcd URL names no member.
    #[error("no etcd member to connect to")]
    NoMembers,
    /// A watch or keep-alive stream ended or was cancelled by etcd.
    #[error("etcd ended the stream: {0}")]
    StreamEnded(String),
}

/// Marks the process as following or holding its registrations (the
/// `securemesh_discovery_connected` gauge) while it lives.
struct Connected;

impl Connected {
    fn now() -> Self {
        securemesh_telemetry::metrics().discovery_connected.set(1);
        Self
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        securemesh_telemetry::metrics().discovery_connected.set(0);
    }
}

/// Delays between attempts to reach etcd again: doubling from 100 ms up to
/// 5 s, reset after a success, with jitter so that many processes do not
/// return in step.
#[derive(Debug)]
struct Backoff {
    next: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// How long a session must have lasted for its end to start the
    /// backoff over: one that etcd ends as soon as it has begun (a watch
    /// cancelled at once, a member that keeps losing its leader) counts as
    /// one more failure, so that a flapping cluster is not asked again
    /// ten times a second.
    const STABLE_SESSION: std::time::Duration = std::time::Duration::from_secs(10);

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// A session that lasted `lived` ended: a long one starts the
    /// backoff over.
    fn session_ended(&mut self, lived: std::time::Duration) {
        if lived >= Self::STABLE_SESSION {
            self.reset();
        }
    }

    /// The delay to wait now; the following one doubles.
    fn delay(&mut self) -> std::time::Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Up to a quarter less, at random: processes that lost etcd
        // together do not come back in step.
        let jitter = (securemesh::distinct_number() % 1000) as f64 / 4000.0;
        delay - delay.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100) && delays[0] >= Duration::from_millis(75));
        assert!(delays[1] >= Duration::from_millis(150));
        assert!(delays.iter().all(|delay| *delay <= Backoff::MAX));
        assert!(delays[9] >= Backoff::MAX.mul_f64(0.75));
        backoff.reset();
        assert!(backoff.delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_a_session_that_lasted_starts_the_backoff_over() {
        let mut backoff = Backoff::new();
        for _ in 0..3 {
            backoff.delay();
        }
        // Ended as soon as it began: one more failure.
        backoff.session_ended(Duration::from_millis(300));
        assert!(backoff.delay() >= Duration::from_millis(600));
        backoff.session_ended(Backoff::STABLE_SESSION);
        assert!(backoff.delay() <= Duration::from_millis(100));
    }

    #[test]
    fn distinct_numbers_differ() {
        let drawn: std::collections::HashSet<u64> =
            (0..100).map(|_| securemesh::distinct_number()).collect();
        assert!(drawn.len() > 90, "{drawn:?}");
    }
}
