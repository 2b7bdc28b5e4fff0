//! A coordinator following the registrations under a prefix: read them,
//! watch from that revision, apply every change to the backend set.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::task::JoinHandle;

use securemesh::text::field;

use crate::config::within;
use crate::{Backoff, DiscoveryError, EtcdConfig, ServerRecord};

/// The most backends a coordinator takes from etcd at once. Beyond them,
/// registrations wait (logged) for others to leave: whoever may write the
/// prefix cannot make a coordinator open connections without end.
pub const MOST_DISCOVERED_BACKENDS: usize = 1024;

/// Registrations read from etcd per request when the prefix is read.
const REGISTRATIONS_PER_PAGE: i64 = 32;

/// The largest message taken from etcd: a page of values at etcd's largest
/// (1.5 MiB by default, `--max-request-bytes`), whoever wrote them. Far
/// beyond tonic's default of 4 MiB, which three large values under the
/// prefix would pass, leaving every coordinator without the listing.
const MOST_ETCD_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The largest value taken for a registration: a server record is about a
/// hundred bytes.
const MOST_RECORD_BYTES: usize = 4096;

/// The prefix is read again for registrations left out at most this often:
/// with more registrations than room, every departure makes room.
const LEFT_OUT_REREAD_EVERY: Duration = Duration::from_secs(5);

/// Why a backend set refused a URL.
pub type MembershipError = Box<dyn std::error::Error + Send + Sync>;

/// The set of backends discovery feeds. A URL may be inserted by several
/// keys (and by other sources); it should stay until each removed it.
pub trait Membership: Send + Sync + 'static {
    /// Starts sending calls to `url`.
    fn insert(&self, url: &str) -> Result<(), MembershipError>;
    /// Stops sending new calls to `url`.
    fn remove(&self, url: &str);
}

impl Membership for securemesh_balance::BackendPool {
    fn insert(&self, url: &str) -> Result<(), MembershipError> {
        Ok(self.add(url)?)
    }

    fn remove(&self, url: &str) {
        securemesh_balance::BackendPool::remove(self, url);
    }
}

/// Follows `config`'s prefix into `members` until dropped. When etcd is
/// unreachable the last known set stays (health checks still eject dead
/// servers) and the prefix is read again, with backoff, until it answers.
pub fn follow(config: EtcdConfig, members: Arc<dyn Membership>) -> Follower {
    let registrations = Registrations::new(members, MOST_DISCOVERED_BACKENDS, config.range());
    Follower {
        task: tokio::spawn(follow_forever(config, registrations)),
    }
}

/// The background task of [`follow`]; stops when dropped.
#[derive(Debug)]
pub struct Follower {
    task: JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow_forever(config: EtcdConfig, mut registrations: Registrations) {
    let mut backoff = Backoff::new();
    loop {
        let session = tokio::time::Instant::now();
        let Err(error) = sync_and_watch(&config, &mut registrations).await;
        backoff.session_ended(session.elapsed());
        let delay = backoff.delay();
        if registrations.read_once {
            tracing::warn!(
                prefix = %config.prefix,
                %error,
                backends = registrations.by_key.len(),
                retry_in_ms = delay.as_millis() as u64,
                "lost etcd: keeping the last known backends"
            );
        } else {
            tracing::warn!(
                prefix = %config.prefix,
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "cannot read the registrations in etcd yet: no backend from it"
            );
        }
        tokio::time::sleep(delay).await;
    }
}

/// Reads the prefix, then applies its changes until the watch fails; reads
/// it again, on the same connection, when registrations left out for want
/// of room could now be taken.
///
/// Keys and records are written by anyone who may register, so their text
/// is logged through [`field`]: neither a newline nor `key=value` text in
/// one can forge a log line or a field, and a plain value (a key, a URL)
/// goes into a JSON log without extra quotes.
async fn sync_and_watch(
    config: &EtcdConfig,
    registrations: &mut Registrations,
) -> Result<Infallible, DiscoveryError> {
    let client = config.connect().await?;
    let range = config.range();
    let mut connected = None;
    loop {
        let (listing, revision) = read_prefix(&client, &range).await?;
        registrations.replace_all(
            listing
                .iter()
                .map(|(key, value)| (key.clone(), value.as_slice())),
        );
        drop(listing);
        tracing::info!(
            prefix = %config.prefix,
            revision,
            backends = registrations.by_key.len(),
            "read the registrations in etcd; watching for changes"
        );
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut watching = client
            .watch_client()
            .max_decoding_message_size(MOST_ETCD_MESSAGE_BYTES);
        let mut watch = within(watching.watch(range.as_str(), Some(options))).await?;
        connected.get_or_insert_with(crate::Connected::now);
        // Counted from the end of the read: a read that takes longer than
        // the interval would otherwise be followed by the next at once,
        // again and again.
        let reread_from = tokio::time::Instant::now() + LEFT_OUT_REREAD_EVERY;
        loop {
            // Waiting for room to matter: once there is some, the next
            // read may come when it is due, event or not.
            let next = if registrations.room_for_the_left_out() {
                match tokio::time::timeout_at(reread_from, watch.message()).await {
                    Ok(next) => next?,
                    Err(_due) => break,
                }
            } else {
                watch.message().await?
            };
            let Some(response) = next else {
                return Err(DiscoveryError::StreamEnded("watch".into()));
            };
            if response.canceled() {
                return Err(DiscoveryError::StreamEnded(format!(
                    "watch cancelled ({}), compacted at revision {}",
                    response.cancel_reason(),
                    response.compact_revision()
                )));
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(key) = registration_key(kv.key()) else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => registrations.put(key, kv.value()),
                    EventType::Delete => registrations.delete(key),
                }
            }
            if registrations.room_for_the_left_out() && tokio::time::Instant::now() >= reread_from {
                break;
            }
        }
        tracing::info!(
            prefix = %config.prefix,
            "room for registrations left out: reading them again"
        );
    }
}

/// Every registration under `range` at one revision, read a page at a time
/// (so that no one answer from etcd is too large), with that revision.
/// Keys that are not UTF-8 are skipped: no server of ours writes one, and
/// read as text two of them could pass for one.
async fn read_prefix(
    client: &etcd_client::Client,
    range: &str,
) -> Result<(Vec<(String, Vec<u8>)>, i64), DiscoveryError> {
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(MOST_ETCD_MESSAGE_BYTES);
    let end = range_end(range.as_bytes());
    let mut from = range.as_bytes().to_vec();
    let mut revision = 0;
    let mut listing = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(REGISTRATIONS_PER_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = within(kv.get(from.clone(), Some(options))).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |header| header.revision());
        }
        for kv in page.kvs() {
            if let Some(key) = registration_key(kv.key()) {
                // No more than a record's worth of a value is kept: one a
                // byte longer is enough to be refused as too large.
                let value = kv.value();
                let kept = &value[..value.len().min(MOST_RECORD_BYTES + 1)];
                listing.push((key.to_owned(), kept.to_vec()));
            }
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((listing, revision)),
        }
    }
}

/// The key just past every key that starts with `prefix` (etcd's "prefix
/// end"): `prefix` with its last byte below 0xff incremented and what
/// follows it dropped.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: every key from the prefix on.
    vec![0]
}

/// The longest key taken for a registration: a prefix and a server id are
/// a few dozen bytes, and etcd takes keys of up to 1.5 MiB, which a
/// coordinator would keep (and log) whole.
const MOST_KEY_BYTES: usize = 1024;

/// A registration's key as text; `None` (logged, cut short) for one that
/// is not UTF-8 or far longer than a registration's.
fn registration_key(key: &[u8]) -> Option<&str> {
    if key.len() > MOST_KEY_BYTES {
        let start = String::from_utf8_lossy(&key[..64]);
        tracing::warn!(
            key_start = %field(&start),
            bytes = key.len(),
            "ignoring a registration whose key is far longer than a registration's"
        );
        return None;
    }
    match std::str::from_utf8(key) {
        Ok(key) => Some(key),
        Err(_) => {
            tracing::warn!(
                key = %field(&String::from_utf8_lossy(key)),
                "ignoring a registration whose key is not UTF-8"
            );
            None
        }
    }
}

/// The registrations seen so far, by key, and the backend set they feed.
struct Registrations {
    /// The registrations whose backend is in the set: key → URL.
    by_key: BTreeMap<String, String>,
    /// Registrations beyond `limit`, waiting for room (at most `limit`).
    waiting: BTreeMap<String, ServerRecord>,
    /// Whether a registration was left out for want of room to wait.
    left_out: bool,
    /// The most registrations in the set at once.
    limit: usize,
    members: Arc<dyn Membership>,
    /// Whether the prefix was read at least once.
    read_once: bool,
    /// The followed prefix and its `/`: a registration's key is this and
    /// its record's `server_id`.
    range: String,
}

impl Registrations {
    fn new(members: Arc<dyn Membership>, limit: usize, range: String) -> Self {
        Self {
            by_key: BTreeMap::new(),
            waiting: BTreeMap::new(),
            left_out: false,
            limit,
            members,
            read_once: false,
            range,
        }
    }

    /// Whether registrations were left out (the waiting list full) and
    /// there is room for some now: only a new read of the prefix can find
    /// them.
    fn room_for_the_left_out(&self) -> bool {
        self.left_out && self.waiting.len() < self.limit
    }

    /// A key was written: its backend joins (replacing the one it named
    /// before, if any), or waits if the set is full. A value that is not a
    /// [`ServerRecord`] (or is far larger than one) is ignored and logged.
    fn put(&mut self, key: &str, value: &[u8]) {
        if value.len() > MOST_RECORD_BYTES {
            tracing::warn!(key = %field(key), bytes = value.len(), "ignoring a registration far larger than a server record");
            self.delete(key);
            return;
        }
        match serde_json::from_slice::<ServerRecord>(value) {
            Ok(record) => self.admit(key, record),
            Err(error) => {
                tracing::warn!(key = %field(key), error = %field(&error.to_string()), "ignoring a registration that is not a server record");
                self.delete(key);
            }
        }
    }

    fn admit(&mut self, key: &str, record: ServerRecord) {
        // A server registers as the prefix and its id. Any other key is
        // no registration of this prefix: one of a longer prefix (servers
        // of `/team/staging` seen by a coordinator of `/team`), or a
        // record copied under another name.
        if key.strip_prefix(self.range.as_str()) != Some(record.server_id.as_str()) {
            tracing::warn!(
                key = %field(key),
                server_id = %field(&record.server_id),
                "ignoring a registration whose key is not the prefix and its server id (a longer prefix's?)"
            );
            self.delete(key);
            return;
        }
        match self.by_key.get(key) {
            Some(url) if *url == record.url => return,
            Some(_) => {
                self.forget(key);
            }
            None => {}
        }
        self.place(key, record);
        self.fill();
    }

    /// `key`'s backend joins the set if there is room; else it waits.
    fn place(&mut self, key: &str, record: ServerRecord) {
        if self.by_key.len() >= self.limit {
            self.wait(key, record);
            return;
        }
        self.waiting.remove(key);
        match self.members.insert(&record.url) {
            Ok(()) => {
                tracing::info!(key = %field(key), url = %field(&record.url), server_id = %field(&record.server_id), "backend registered in etcd");
                self.by_key.insert(key.to_owned(), record.url);
            }
            Err(error) => {
                tracing::warn!(key = %field(key), url = %field(&record.url), error = %field(&error.to_string()), "cannot use a registered backend")
            }
        }
    }

    /// Keeps `key` waiting for room, as long as the waiting list itself
    /// has room (as many as the set); the first to wait, and the first left
    /// out, are logged.
    fn wait(&mut self, key: &str, record: ServerRecord) {
        if self.waiting.len() >= self.limit && !self.waiting.contains_key(key) {
            if !self.left_out {
                self.left_out = true;
                tracing::warn!(
                    key = %field(key),
                    limit = self.limit,
                    "too many registrations in etcd: ignoring more until a resync"
                );
            }
            return;
        }
        if self.waiting.is_empty() {
            tracing::warn!(
                key = %field(key),
                url = %field(&record.url),
                limit = self.limit,
                "too many backends registered in etcd: more wait until others leave"
            );
        }
        self.waiting.insert(key.to_owned(), record);
    }

    /// Lets waiting registrations in while there is room.
    fn fill(&mut self) {
        while self.by_key.len() < self.limit {
            let Some((key, record)) = self.waiting.pop_first() else {
                break;
            };
            self.place(&key, record);
        }
    }

    /// A key was deleted (by its server, or when its lease expired): its
    /// backend leaves, and a waiting registration may take its place.
    fn delete(&mut self, key: &str) {
        self.waiting.remove(key);
        if self.forget(key) {
            self.fill();
        }
    }

    /// Takes `key`'s backend out of the set; whether it was in.
    fn forget(&mut self, key: &str) -> bool {
        let Some(url) = self.by_key.remove(key) else {
            return false;
        };
        tracing::info!(key = %field(key), url = %field(&url), "backend deregistered from etcd");
        self.members.remove(&url);
        true
    }

    /// After a (re)read of the whole prefix: keys that vanished meanwhile
    /// leave, new and changed ones join, unchanged ones are left alone.
    fn replace_all<'a>(&mut self, listing: impl Iterator<Item = (String, &'a [u8])>) {
        let listing: BTreeMap<String, &[u8]> = listing.collect();
        self.read_once = true;
        self.left_out = false;
        // What waits is what the listing says, before room is made below.
        self.waiting = std::mem::take(&mut self.waiting)
            .into_keys()
            .filter_map(|key| {
                let listed = serde_json::from_slice::<ServerRecord>(listing.get(&key)?).ok()?;
                Some((key, listed))
            })
            .collect();
        let gone: Vec<String> = self
            .by_key
            .keys()
            .filter(|key| !listing.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            self.delete(&key);
        }
        for (key, value) in listing {
            self.put(&key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn keys_far_longer_than_a_registrations_are_ignored() {
        assert_eq!(
            registration_key(b"/securemesh/servers/a"),
            Some("/securemesh/servers/a")
        );
        let long = vec![b'k'; MOST_KEY_BYTES + 1];
        assert_eq!(registration_key(&long), None);
        assert_eq!(registration_key(b"/securemesh/\xff"), None);
    }

    /// Records what discovery asked of the backend set.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);

    impl Membership for Recorded {
        fn insert(&self, url: &str) -> Result<(), MembershipError> {
            if url.starts_with("bad") {
                return Err("not a URL".into());
            }
            self.0.lock().unwrap().push(format!("+{url}"));
            Ok(())
        }

        fn remove(&self, url: &str) {
            self.0.lock().unwrap().push(format!("-{url}"));
        }
    }

    fn record_as(server_id: &str, url: &str) -> Vec<u8> {
        serde_json::to_vec(&ServerRecord {
            server_id: server_id.into(),
            url: url.into(),
        })
        .unwrap()
    }

    /// The record of server `a` at `https://a:1`, as registered under
    /// `/p/a`.
    fn record(url: &str) -> Vec<u8> {
        let host = url.trim_start_matches("https://").split(':').next();
        record_as(host.unwrap_or_default(), url)
    }

    fn registrations() -> (Arc<Recorded>, Registrations) {
        let recorded = Arc::new(Recorded::default());
        (
            recorded.clone(),
            Registrations::new(recorded, 3, "/p/".to_owned()),
        )
    }

    fn taken(recorded: &Recorded) -> Vec<String> {
        std::mem::take(&mut *recorded.0.lock().unwrap())
    }

    #[test]
    fn what_registrants_wrote_cannot_forge_log_lines() {
        let written = tempfile::NamedTempFile::new().unwrap();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(Mutex::new(written.reopen().unwrap()))
                .with_ansi(false)
                .finish(),
        );
        // Other tests, on other threads, may have had tracing cache that
        // nobody listens to these lines.
        tracing::callsite::rebuild_interest_cache();
        let (_, mut registrations) = registrations();
        let forged = "\n2026-11-29T00:00:00Z  INFO audit status=OK";
        let key = format!("/p/x{forged}");
        let value = record_as(
            &format!("x{forged}"),
            &format!("https://10.0.0.1:5001{forged}"),
        );
        registrations.put(&key, &value);
        registrations.put(
            &key,
            &record_as(&format!("x{forged}"), &format!("bad{forged}")),
        );
        registrations.put(&key, b"not json");
        registrations.delete(&key);
        let log = std::fs::read_to_string(written.path()).unwrap();
        assert_eq!(log.lines().count(), 4, "{log}");
        // Escaped, and quoted since it holds spaces: no field of its own.
        assert_eq!(
            log.matches(r#"key="/p/x\\n2026-11-29T00:00:00Z  INFO"#)
                .count(),
            4,
            "{log}"
        );
        assert!(
            !log.lines()
                .any(|line| line.starts_with("2026-11-29T00:00:00Z")),
            "{log}"
        );
    }

    #[test]
    fn puts_and_deletes_become_inserts_and_removals() {
        let (recorded, mut registrations) = registrations();
        registrations.put("/p/a", &record("https://a:1"));
        registrations.put("/p/a", &record("https://a:1"));
        registrations.put("/p/a", &record("https://a:2"));
        registrations.delete("/p/a");
        registrations.delete("/p/a");
        assert_eq!(
            taken(&recorded),
            [
                "+https://a:1",
                "-https://a:1",
                "+https://a:2",
                "-https://a:2"
            ]
        );
    }

    #[test]
    fn a_resync_changes_only_what_changed_meanwhile() {
        let (recorded, mut registrations) = registrations();
        registrations.put("/p/a", &record("https://a:1"));
        registrations.put("/p/b", &record("https://b:1"));
        taken(&recorded);
        let (b, c) = (record("https://b:1"), record("https://c:1"));
        registrations.replace_all(
            [
                ("/p/b".to_owned(), b.as_slice()),
                ("/p/c".to_owned(), c.as_slice()),
            ]
            .into_iter(),
        );
        assert_eq!(taken(&recorded), ["-https://a:1", "+https://c:1"]);
    }

    #[test]
    fn beyond_the_limit_registrations_wait_for_room() {
        let (recorded, mut registrations) = registrations();
        for server in ["a", "b", "c", "d", "e"] {
            registrations.put(
                &format!("/p/{server}"),
                &record(&format!("https://{server}:1")),
            );
        }
        assert_eq!(
            taken(&recorded),
            ["+https://a:1", "+https://b:1", "+https://c:1"]
        );
        // A waiting registration that changes or leaves is followed too.
        registrations.put("/p/d", &record("https://d:2"));
        registrations.delete("/p/e");
        registrations.delete("/p/b");
        assert_eq!(taken(&recorded), ["-https://b:1", "+https://d:2"]);
        registrations.delete("/p/a");
        assert_eq!(taken(&recorded), ["-https://a:1"]);
        // A resync finds room for what waits, and forgets what is gone.
        registrations.put("/p/e", &record("https://e:1"));
        registrations.put("/p/f", &record("https://f:1"));
        assert_eq!(taken(&recorded), ["+https://e:1"]);
        let (c, f) = (record("https://c:1"), record("https://f:1"));
        registrations.replace_all(
            [
                ("/p/c".to_owned(), c.as_slice()),
                ("/p/f".to_owned(), f.as_slice()),
            ]
            .into_iter(),
        );
        assert_eq!(
            taken(&recorded),
            ["-https://d:2", "+https://f:1", "-https://e:1"]
        );
        assert!(registrations.waiting.is_empty());
    }

    #[test]
    fn a_resync_lets_in_what_waits_as_listed_and_the_waiting_list_is_bounded() {
        let (recorded, mut registrations) = registrations();
        for server in ["a", "b", "c", "d"] {
            registrations.put(
                &format!("/p/{server}"),
                &record(&format!("https://{server}:1")),
            );
        }
        taken(&recorded);
        let (a, b, d) = (
            record("https://a:1"),
            record("https://b:1"),
            record("https://d:2"),
        );
        registrations.replace_all(
            [
                ("/p/a".to_owned(), a.as_slice()),
                ("/p/b".to_owned(), b.as_slice()),
                ("/p/d".to_owned(), d.as_slice()),
            ]
            .into_iter(),
        );
        // The waiting d takes c's place with its listed URL, never its old.
        assert_eq!(taken(&recorded), ["-https://c:1", "+https://d:2"]);
        // Three may wait (as many as the set holds); more are left out.
        for server in ["e", "f", "g", "h"] {
            registrations.put(
                &format!("/p/{server}"),
                &record(&format!("https://{server}:1")),
            );
        }
        assert_eq!(registrations.waiting.len(), 3);
        assert!(!registrations.waiting.contains_key("/p/h"));
        assert!(taken(&recorded).is_empty());
    }

    #[test]
    fn left_out_registrations_are_read_again_once_there_is_room() {
        let (_recorded, mut registrations) = registrations();
        for server in ["a", "b", "c", "d", "e", "f", "g"] {
            registrations.put(
                &format!("/p/{server}"),
                &record(&format!("https://{server}:1")),
            );
        }
        // Three in, three waiting, g left out.
        assert!(!registrations.room_for_the_left_out());
        registrations.delete("/p/d");
        assert!(registrations.room_for_the_left_out());
    }

    #[test]
    fn only_the_prefix_and_the_server_id_name_a_registration() {
        let (recorded, mut registrations) = registrations();
        // A server id may hold a `/`.
        registrations.put("/p/eu/s7", &record_as("eu/s7", "https://s7:1"));
        // A server of the prefix `/p/staging`, and a record under a name
        // that is not its own: neither is ours.
        registrations.put("/p/staging/s1", &record_as("s1", "https://s1:1"));
        registrations.put("/p/a", &record_as("b", "https://b:1"));
        assert_eq!(taken(&recorded), ["+https://s7:1"]);
        // Rewritten under another name, a registration leaves.
        registrations.put("/p/eu/s7", &record_as("s7", "https://s7:1"));
        assert_eq!(taken(&recorded), ["-https://s7:1"]);
        assert!(registrations.by_key.is_empty());
    }

    #[test]
    fn the_prefix_end_is_just_past_every_key_under_it() {
        assert_eq!(range_end(b"/securemesh/"), b"/securemesh0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn a_value_that_is_not_a_record_is_ignored_and_unnames_its_key() {
        let (recorded, mut registrations) = registrations();
        registrations.put("/p/a", &record("https://a:1"));
        let mut padded = record("https://a:1");
        padded.resize(MOST_RECORD_BYTES + 1, b' ');
        registrations.put("/p/a", &padded);
        assert_eq!(taken(&recorded), ["+https://a:1", "-https://a:1"]);
        registrations.put("/p/a", &record("https://a:1"));
        taken(&recorded);
        registrations.put("/p/a", b"https://a:1");
        registrations.put("/p/b", &record_as("b", "bad url"));
        assert_eq!(taken(&recorded), ["-https://a:1"]);
        assert!(registrations.by_key.is_empty());
    }
}
