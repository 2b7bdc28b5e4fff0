//! Credentials on top of mutual TLS: user names with argon2id password
//! hashes (HTTP Basic) and named Bearer tokens, kept in a credentials file.
//!
//! The file holds one credential a line (`#` starts a comment):
//!
//! ```text
//! user alice $argon2id$v=19$m=19456,t=2,p=1$...
//! token ci-bot sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ```
//!
//! Tokens are 32 random bytes, so a SHA-256 digest compared in constant
//! time protects them; passwords are chosen by people, so they get argon2id.
//! A successful password check is remembered for a while (by a SHA-256
//! digest of the stored hash and the password, never the password), so
//! that argon2 does not run on every call.
//!
//! Password checks are bounded, because any holder of a client certificate
//! can send wrong passwords: one argon2 verification runs at a time, in one
//! reused block of memory, and a few more may wait for it; a check beyond
//! those is refused at once ([`Refusal::Busy`]) instead of holding a thread
//! and memory. Calls that bring the same `authorization` while its check
//! runs wait for that check's verdict instead of taking places of their
//! own ([`Credentials::verify_off_thread`]): a burst of a client's first
//! calls costs one argon2 verification, not one each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use securemesh::places::{Place, PlacesByKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

/// The start of every Bearer token this crate makes.
pub const TOKEN_PREFIX: &str = "smt_";

/// How long a verified password is remembered.
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// At most this many verified passwords are remembered.
const CACHE_CAPACITY: usize = 1024;
/// Password checks that may run or wait at once (one runs at a time).
const PASSWORD_CHECKS_AT_ONCE: usize = 4;
/// Of those, the places one caller may take ahead (see
/// [`Credentials::hashing_turn`]): a caller flooding wrong passwords
/// leaves the others one, and a burst of a caller's first calls (the
/// cache cold) still gets most.
const PASSWORD_CHECKS_PER_CALLER: usize = 3;

/// The most memory a stored hash may ask argon2 for, in KiB (the default
/// is 19 MiB): a line with more, edited in by hand, would make every check
/// of that user's password allocate it.
const MOST_ARGON2_MEMORY_KIB: u32 = 64 * 1024;

/// The most kinds of argon2 parameters decoys are made for.
const MOST_DECOY_KINDS: usize = 4;

/// The most passes and lanes a stored hash may ask for.
const MOST_ARGON2_PASSES: u32 = 16;
const MOST_ARGON2_LANES: u32 = 8;

/// Why the credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Reading failed.
    #[error("{path}: {source}")]
    Read {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] securemesh_fs::WriteError),
    /// A line is not a credential. The line is not shown: it may hold a
    /// secret.
    #[error("{path}: line {line} is not `user NAME HASH` or `token NAME sha256:HEX`")]
    Malformed {
        /// The file concerned.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A name with white space, or empty.
    #[error("invalid name {0:?}: use letters, digits, '.', '-', '_' or '@'")]
    InvalidName(String),
    /// The name is taken.
    #[error("{0} already has a credential in this file")]
    Duplicate(String),
    /// argon2 failed to hash.
    #[error("hashing the password failed: {0}")]
    Hash(String),
}

/// Why a call's credentials were refused. Messages name no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `authorization` metadata.
    #[error("credentials required (authorization: Basic or Bearer)")]
    Missing,
    /// Not `Basic base64(user:password)` or `Bearer TOKEN`.
    #[error("malformed authorization metadata")]
    Malformed,
    /// Unknown user or token, or a wrong password.
    #[error("invalid credentials")]
    Invalid,
    /// Too many password checks already running or waiting: try again.
    #[error("too many password checks at once; try again shortly")]
    Busy,
    /// The check ended without a verdict (its thread panicked, or the
    /// runtime is shutting down).
    #[error("the password check did not finish")]
    Unfinished,
}

/// The credentials a process accepts.
#[derive(Default)]
pub struct Credentials {
    users: HashMap<String, String>,
    tokens: Vec<(String, [u8; 32])>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// Hashes of a password nobody knows, one for each set of argon2
    /// parameters among the users' hashes: what an unknown user's password
    /// is checked against, so that it costs what a known user's does.
    decoys: Vec<String>,
    hashing: PasswordHashing,
    /// The checks running off-thread, by a digest of the `authorization`
    /// they check, each with the verdict its joiners wait for.
    under_way: Mutex<HashMap<[u8; 32], PendingVerdict>>,
}

/// The verdict of a password check running off-thread, once it is in.
type PendingVerdict = watch::Receiver<Option<Result<String, Refusal>>>;

/// Names users and tokens, never their password hashes or token digests.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut users: Vec<&str> = self.users.keys().map(String::as_str).collect();
        users.sort_unstable();
        let tokens: Vec<&str> = self.tokens.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("Credentials")
            .field("users", &users)
            .field("tokens", &tokens)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads a credentials file.
    pub fn from_file(path: &Path) -> Result<Self, CredentialsError> {
        securemesh_fs::warn_if_exposed(path, "credentials file");
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let malformed = |line| CredentialsError::Malformed {
            path: path.to_path_buf(),
            line,
        };
        let mut credentials = Self::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                ["user", name, hash] if usable_hash(hash) => {
                    if credentials.users.contains_key(name) {
                        return Err(CredentialsError::Duplicate(name.to_owned()));
                    }
                    credentials.users.insert(name.to_owned(), hash.to_owned());
                }
                ["token", name, digest] => {
                    let digest = digest
                        .strip_prefix("sha256:")
                        .and_then(decode_hex)
                        .ok_or_else(|| malformed(index + 1))?;
                    if credentials.tokens.iter().any(|(known, _)| known == name) {
                        return Err(CredentialsError::Duplicate(name.to_owned()));
                    }
                    credentials.tokens.push((name.to_owned(), digest));
                }
                _ => return Err(malformed(index + 1)),
            }
        }
        credentials.decoys = decoys_like(credentials.users.values())?;
        Ok(credentials)
    }

    /// The hash an unknown `user`'s password is checked against: one of
    /// the decoys, the same for the same name every time, so that neither
    /// its cost nor its variation tells that the name is unknown.
    fn decoy_for(&self, user: &str) -> &str {
        if self.decoys.is_empty() {
            return dummy_hash();
        }
        let pick = usize::from(Sha256::digest(user.as_bytes())[0]) % self.decoys.len();
        &self.decoys[pick]
    }

    /// The verdict on `authorization` when it needs no password hashing
    /// (missing, malformed, a Bearer token, or a password verified
    /// recently); `None` when only [`Credentials::verify`] can tell, at the
    /// cost of an argon2 verification. Lets an async caller keep argon2 off
    /// its event loop.
    pub fn verify_without_hashing(
        &self,
        authorization: Option<&str>,
    ) -> Option<Result<String, Refusal>> {
        let Some(header) = authorization else {
            return Some(Err(Refusal::Missing));
        };
        let Some((scheme, value)) = header.trim().split_once(' ') else {
            return Some(Err(Refusal::Malformed));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" => Some(self.verify_bearer(value.trim())),
            "basic" => {
                let (user, password) = match decode_basic(value.trim()) {
                    Ok(pair) => pair,
                    Err(refusal) => return Some(Err(refusal)),
                };
                let hash = self.users.get(&user)?;
                self.recently_verified(&remembered_key(hash, &password))
                    .then_some(Ok(user))
            }
            _ => Some(Err(Refusal::Malformed)),
        }
    }

    /// Checks the `authorization` metadata of a call and returns the name
    /// of the user or token it proves. A password costs one argon2
    /// verification unless verified recently; verifications run one at a
    /// time, so that a flood of wrong passwords takes at most one core, and
    /// when a few are waiting already, a password is refused as
    /// [`Refusal::Busy`] without hashing.
    pub fn verify(&self, authorization: Option<&str>) -> Result<String, Refusal> {
        self.verify_with(authorization, None)
    }

    /// A place among the password checks allowed at once, taken ahead of
    /// [`Credentials::verify_in_turn`] for `caller` (a client identity): an
    /// async caller takes it before it hands the check to another thread,
    /// so that a flood is refused as [`Refusal::Busy`] on the spot instead
    /// of queueing threads. `None` when the places are taken, or when
    /// `caller` holds its share of them already.
    pub fn hashing_turn(&self, caller: &str) -> Option<HashingTurn> {
        let share = self
            .hashing
            .per_caller
            .take(caller.to_owned(), PASSWORD_CHECKS_PER_CALLER)?;
        let place = CheckInProgress::enter(&self.hashing.checks)?;
        Some(HashingTurn(place, share))
    }

    /// [`Credentials::verify`] for async callers: the argon2 verification
    /// runs on tokio's blocking pool, so the awaiting task (a connection's,
    /// with other calls on it) goes on meanwhile. A call whose
    /// `authorization` is being checked already waits for that verdict and
    /// takes no place; otherwise `caller` (a client identity) takes a place
    /// with [`Credentials::hashing_turn`], and none left means
    /// [`Refusal::Busy`] at once. Dropping the future leaves the check
    /// running to its verdict, so a right password is remembered all the
    /// same.
    pub async fn verify_off_thread(
        self: &Arc<Self>,
        authorization: Option<&str>,
        caller: &str,
    ) -> Result<String, Refusal> {
        if let Some(verdict) = self.verify_without_hashing(authorization) {
            return verdict;
        }
        let mut pending = self.join_or_start(authorization, caller)?;
        let verdict = pending
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Refusal::Unfinished)?;
        verdict.clone().unwrap_or(Err(Refusal::Unfinished))
    }

    /// The verdict to wait for on `authorization`: that of the check under
    /// way for it, or of one started here in a place taken for `caller`.
    fn join_or_start(
        self: &Arc<Self>,
        authorization: Option<&str>,
        caller: &str,
    ) -> Result<PendingVerdict, Refusal> {
        let key: [u8; 32] = Sha256::digest(authorization.unwrap_or_default().as_bytes()).into();
        let mut under_way = self
            .under_way
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(pending) = under_way.get(&key) {
            return Ok(pending.clone());
        }
        let turn = self.hashing_turn(caller).ok_or(Refusal::Busy)?;
        let (verdict, pending) = watch::channel(None);
        under_way.insert(key, pending.clone());
        drop(under_way);
        // Unlisted when the check ends, with a verdict or a panic, or when
        // it never starts (the runtime shutting down).
        let listed = UnderWay {
            credentials: Arc::clone(self),
            key,
        };
        let authorization = authorization.map(str::to_owned);
        // Detached: the check runs to its verdict even when nobody waits.
        drop(tokio::task::spawn_blocking(move || {
            let outcome = listed
                .credentials
                .verify_in_turn(authorization.as_deref(), turn);
            // Unlisted first: whoever has the verdict finds the check over.
            drop(listed);
            verdict.send_replace(Some(outcome));
        }));
        Ok(pending)
    }

    /// [`Credentials::verify`] with a place taken by
    /// [`Credentials::hashing_turn`].
    pub fn verify_in_turn(
        &self,
        authorization: Option<&str>,
        turn: HashingTurn,
    ) -> Result<String, Refusal> {
        let HashingTurn(place, share) = turn;
        let verdict = self.verify_with(authorization, Some(place));
        drop(share);
        verdict
    }

    fn verify_with(
        &self,
        authorization: Option<&str>,
        turn: Option<CheckInProgress>,
    ) -> Result<String, Refusal> {
        let header = authorization.ok_or(Refusal::Missing)?.trim();
        let (scheme, value) = header.split_once(' ').ok_or(Refusal::Malformed)?;
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => self.verify_basic(value.trim(), turn),
            "bearer" => self.verify_bearer(value.trim()),
            _ => Err(Refusal::Malformed),
        }
    }

    fn verify_basic(
        &self,
        encoded: &str,
        turn: Option<CheckInProgress>,
    ) -> Result<String, Refusal> {
        let (user, password) = decode_basic(encoded)?;
        let Some(hash) = self.users.get(&user) else {
            // Spend the same argon2 work as for a real user, so that timing
            // does not tell which user names exist.
            self.hashing
                .verify(self.decoy_for(&user), &password, turn)?;
            return Err(Refusal::Invalid);
        };
        let remembered = remembered_key(hash, &password);
        if self.recently_verified(&remembered) {
            return Ok(user);
        }
        if !self.hashing.verify(hash, &password, turn)? {
            return Err(Refusal::Invalid);
        }
        self.remember(remembered);
        Ok(user)
    }

    fn verify_bearer(&self, token: &str) -> Result<String, Refusal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare with every token, in constant time each, so that timing
        // reveals neither which token nor how much of it matched.
        let mut found = None;
        for (name, stored) in &self.tokens {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(name.clone());
            }
        }
        found.ok_or(Refusal::Invalid)
    }

    fn recently_verified(&self, key: &[u8; 32]) -> bool {
        let cache = self
            .verified
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        cache.get(key).is_some_and(|at| at.elapsed() < VERIFIED_FOR)
    }

    fn remember(&self, key: [u8; 32]) {
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, at| at.elapsed() < VERIFIED_FOR);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, Instant::now());
    }
}

/// Adds a user with an argon2id hash of `password` to the credentials file
/// at `path` (created with mode 0600 if missing).
pub fn add_user(path: &Path, name: &str, password: &str) -> Result<(), CredentialsError> {
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|error| CredentialsError::Hash(error.to_string()))?;
    append(path, "user", name, &hash.to_string())
}

/// Adds a new random Bearer token named `name` to the credentials file and
/// returns it: only its digest is stored, so this is the one chance to see
/// it.
pub fn add_token(path: &Path, name: &str) -> Result<String, CredentialsError> {
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    // A fixed prefix: a token never starts with '-' (which a command line
    // would take for a flag), and secret scanners can recognise it.
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let digest: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    append(path, "token", name, &format!("sha256:{digest}"))?;
    Ok(token)
}

fn append(path: &Path, kind: &str, name: &str, secret: &str) -> Result<(), CredentialsError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
    if !valid {
        return Err(CredentialsError::InvalidName(name.to_owned()));
    }
    // Two additions at once must not lose one.
    let _lock = securemesh_fs::lock_dir_of(path)?;
    securemesh_fs::refuse_symbolic_link(path)?;
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            "# securemesh credentials: user NAME ARGON2-HASH | token NAME sha256:HEX\n".to_owned()
        }
        Err(source) => {
            return Err(CredentialsError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let taken = text.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() == 3 && fields[0] == kind && fields[1] == name
    });
    if taken {
        return Err(CredentialsError::Duplicate(name.to_owned()));
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{kind} {name} {secret}\n"));
    securemesh_fs::write_file(path, text.as_bytes(), securemesh_fs::PRIVATE, true)?;
    Ok(())
}

/// User name and password of a Basic credential.
fn decode_basic(encoded: &str) -> Result<(String, String), Refusal> {
    let decoded = STANDARD.decode(encoded).map_err(|_| Refusal::Malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| Refusal::Malformed)?;
    let (user, password) = decoded.split_once(':').ok_or(Refusal::Malformed)?;
    Ok((user.to_owned(), password.to_owned()))
}

/// What a verified password is remembered by: a digest of its hash and the
/// password, never the password itself.
fn remembered_key(hash: &str, password: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(hash.as_bytes())
        .chain_update([0])
        .chain_update(password.as_bytes())
        .finalize()
        .into()
}

/// Runs argon2 verifications one at a time in one reused block of memory
/// (19 MiB with the default parameters), and lets only a few more wait.
#[derive(Default)]
struct PasswordHashing {
    memory: Mutex<Vec<Block>>,
    checks: Arc<AtomicUsize>,
    /// Places taken ahead, by caller.
    per_caller: PlacesByKey<String>,
}

impl PasswordHashing {
    /// Whether `password` matches the argon2 `hash`, in `turn` if one was
    /// taken ahead; `Busy` when [`PASSWORD_CHECKS_AT_ONCE`] checks are
    /// running or waiting already.
    fn verify(
        &self,
        hash: &str,
        password: &str,
        turn: Option<CheckInProgress>,
    ) -> Result<bool, Refusal> {
        let _turn = match turn {
            Some(turn) => turn,
            None => CheckInProgress::enter(&self.checks).ok_or(Refusal::Busy)?,
        };
        let mut memory = self
            .memory
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Ok(argon2_matches(hash, password, &mut memory))
    }
}

/// A check listed as under way in [`Credentials::verify_off_thread`];
/// unlisted when dropped.
struct UnderWay {
    credentials: Arc<Credentials>,
    key: [u8; 32],
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.credentials
            .under_way
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&self.key);
    }
}

/// A place among the password checks allowed at once, taken by
/// [`Credentials::hashing_turn`]; given back when dropped.
#[derive(Debug)]
pub struct HashingTurn(CheckInProgress, Place<String>);

/// One password check counted in; counted out when dropped.
#[derive(Debug)]
struct CheckInProgress(Arc<AtomicUsize>);

impl CheckInProgress {
    fn enter(checks: &Arc<AtomicUsize>) -> Option<Self> {
        // Counted in only below the limit: a refused check never holds a
        // place, not even for a moment.
        checks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < PASSWORD_CHECKS_AT_ONCE).then_some(running + 1)
            })
            .ok()
            .map(|_| CheckInProgress(Arc::clone(checks)))
    }
}

impl Drop for CheckInProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether `hash` is an argon2 hash this file may hold: a variant and
/// version argon2 knows, a salt and a hash, parameters within bounds. (A
/// line without its hash part would be refused without any hashing: no
/// password could match, and its quick refusals would tell that the user
/// exists.)
fn usable_hash(hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        parsed.salt.is_some()
            && parsed.hash.is_some()
            && argon2_of(&parsed).is_some_and(|(_, _, params)| {
                params.m_cost() <= MOST_ARGON2_MEMORY_KIB
                    && params.t_cost() <= MOST_ARGON2_PASSES
                    && params.p_cost() <= MOST_ARGON2_LANES
            })
    })
}

/// The argon2 variant, version (the default when the hash names none) and
/// parameters of `parsed`, if argon2 knows them all.
fn argon2_of(parsed: &PasswordHash<'_>) -> Option<(Algorithm, Version, Params)> {
    let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
    let version = parsed
        .version
        .map_or(Ok(Version::default()), Version::try_from)
        .ok()?;
    let params = Params::try_from(parsed).ok()?;
    Some((algorithm, version, params))
}

/// Whether `password` matches the argon2 PHC string `hash`, hashing into
/// `memory` (grown to what the hash's parameters need, then kept).
fn argon2_matches(hash: &str, password: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Some((algorithm, version, params)) = argon2_of(&parsed) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), Block::default());
    }
    let mut computed = vec![0u8; expected.len()];
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt,
        &mut computed,
        &mut memory[..],
    );
    hashed.is_ok() && bool::from(computed.as_slice().ct_eq(expected.as_bytes()))
}

/// One hash of a random password for each set of argon2 parameters (the
/// variant, version, memory, passes, lanes and output length) among
/// `hashes`, all of them usable.
fn decoys_like<'a>(
    hashes: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<String>, CredentialsError> {
    let mut kinds = std::collections::BTreeSet::new();
    for hash in hashes {
        let Ok(parsed) = PasswordHash::new(hash) else {
            continue;
        };
        let (Some((algorithm, version, params)), Some(output)) = (argon2_of(&parsed), parsed.hash)
        else {
            continue;
        };
        kinds.insert((
            algorithm.as_str(),
            u32::from(version),
            params.m_cost(),
            params.t_cost(),
            params.p_cost(),
            output.len(),
        ));
    }
    // Each costs an argon2 hash at load: a file of hand-edited hashes
    // with many kinds gets decoys for a few of them.
    kinds
        .into_iter()
        .take(MOST_DECOY_KINDS)
        .map(|(algorithm, version, memory, passes, lanes, output)| {
            let failed = |error: &dyn std::fmt::Display| CredentialsError::Hash(error.to_string());
            let algorithm = Algorithm::new(algorithm).map_err(|e| failed(&e))?;
            let version = Version::try_from(version).map_err(|e| failed(&e))?;
            let params =
                Params::new(memory, passes, lanes, Some(output)).map_err(|e| failed(&e))?;
            let mut password = [0u8; 32];
            OsRng.fill_bytes(&mut password);
            Argon2::new(algorithm, version, params)
                .hash_password(&password, &SaltString::generate(&mut OsRng))
                .map(|hash| hash.to_string())
                .map_err(|e| failed(&e))
        })
        .collect()
}

/// An argon2id hash of a random password nobody knows, made once: the
/// decoy of credentials with no user.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut password = [0u8; 32];
        OsRng.fill_bytes(&mut password);
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(&password, &salt)
            .map(|hash| hash.to_string())
            .unwrap_or_default()
    })
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(bytes)
}

/// The `authorization` metadata value for Basic credentials.
pub fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// The `authorization` metadata value for a Bearer token.
pub fn bearer_header(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.txt");
        add_user(&path, "alice", "correct horse").unwrap();
        let token = add_token(&path, "ci-bot").unwrap();
        (dir, path, token)
    }

    /// Adding to a credentials file that is a symbolic link would put a
    /// file of its own in the link's place, unseen by readers of its
    /// target: refused, and the target is left as it was.
    #[cfg(unix)]
    #[test]
    fn a_credentials_file_that_is_a_symbolic_link_is_not_added_to() {
        let (dir, path, _token) = file();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        let refused = add_token(&link, "another").unwrap_err();
        assert!(
            matches!(
                refused,
                CredentialsError::Write(securemesh_fs::WriteError::SymbolicLink(_))
            ),
            "{refused}"
        );
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    }

    #[test]
    fn a_file_with_unusable_hashes_or_a_name_twice_is_refused() {
        let (_dir, path, _token) = file();
        let good = std::fs::read_to_string(&path).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        let greedy = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(MOST_ARGON2_MEMORY_KIB + 1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"x", &salt)
        .unwrap()
        .to_string();
        let no_hash = greedy
            .rsplit_once('$')
            .unwrap()
            .0
            .replace("m=66560", "m=19456");
        for (case, line) in [
            ("too much memory", format!("user bob {greedy}")),
            (
                "no salt or hash",
                "user bob $argon2id$v=19$m=19456,t=2,p=1".to_owned(),
            ),
            ("no hash", format!("user bob {no_hash}")),
            (
                "unknown version",
                greedy.replace("v=19", "v=18").replace("m=66560", "m=19456"),
            ),
            (
                "not argon2",
                "user bob $pbkdf2-sha256$i=1000$c2FsdA$aGFzaA".to_owned(),
            ),
            (
                "too many passes",
                greedy.replace("m=66560,t=1,", "m=19456,t=17,"),
            ),
            (
                "too many lanes",
                greedy.replace("m=66560,t=1,p=1", "m=19456,t=1,p=9"),
            ),
            (
                "a token not sha256",
                format!("token bot md5:{}", "ab".repeat(16)),
            ),
            (
                "a token not hex",
                format!("token bot sha256:{}", "zz".repeat(32)),
            ),
            (
                "a token too short",
                format!("token bot sha256:{}", "ab".repeat(31)),
            ),
        ] {
            std::fs::write(&path, format!("{good}{line}\n")).unwrap();
            let refused = Credentials::from_file(&path).unwrap_err();
            assert!(
                matches!(refused, CredentialsError::Malformed { line: 4, .. }),
                "{case}: {refused}"
            );
        }
        let alice_again = good.lines().nth(1).unwrap();
        let token_again = good.lines().nth(2).unwrap();
        for again in [alice_again, token_again] {
            std::fs::write(&path, format!("{good}{again}\n")).unwrap();
            let refused = Credentials::from_file(&path).unwrap_err();
            assert!(
                matches!(refused, CredentialsError::Duplicate(_)),
                "{refused}"
            );
        }
    }

    #[test]
    fn accepts_the_right_password_and_token() {
        let (_dir, path, token) = file();
        let credentials = Credentials::from_file(&path).unwrap();
        let basic = basic_header("alice", "correct horse");
        assert_eq!(credentials.verify(Some(&basic)), Ok("alice".into()));
        // Remembered: the second check does not need argon2, same answer.
        assert_eq!(credentials.verify(Some(&basic)), Ok("alice".into()));
        assert_eq!(
            credentials.verify_without_hashing(Some(&basic)),
            Some(Ok("alice".into()))
        );
        // A password not seen before needs argon2.
        let other = basic_header("alice", "another guess");
        assert_eq!(credentials.verify_without_hashing(Some(&other)), None);
        let bearer = bearer_header(&token);
        assert_eq!(credentials.verify(Some(&bearer)), Ok("ci-bot".into()));
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 43);
    }

    #[test]
    fn refuses_missing_malformed_and_wrong_credentials() {
        let (_dir, path, token) = file();
        let credentials = Credentials::from_file(&path).unwrap();
        assert_eq!(credentials.verify(None), Err(Refusal::Missing));
        for malformed in ["Basic", "Digest abc", "Basic !!!", "Basic bm9jb2xvbg=="] {
            assert_eq!(
                credentials.verify(Some(malformed)),
                Err(Refusal::Malformed),
                "{malformed}"
            );
        }
        let wrong = basic_header("alice", "wrong horse");
        assert_eq!(credentials.verify(Some(&wrong)), Err(Refusal::Invalid));
        // A remembered good password does not let a wrong one through.
        credentials
            .verify(Some(&basic_header("alice", "correct horse")))
            .unwrap();
        assert_eq!(credentials.verify(Some(&wrong)), Err(Refusal::Invalid));
        let stranger = basic_header("mallory", "correct horse");
        assert_eq!(credentials.verify(Some(&stranger)), Err(Refusal::Invalid));
        // An unknown user costs an argon2 verification too.
        let started = Instant::now();
        let _ = credentials.verify(Some(&basic_header("nobody", "x")));
        let unknown = started.elapsed();
        let started = Instant::now();
        let _ = credentials.verify(Some(&basic_header("alice", "not it")));
        let known = started.elapsed();
        assert!(
            unknown * 10 > known,
            "unknown {unknown:?} vs known {known:?}"
        );
        let mut forged = token.clone();
        forged.pop();
        assert_eq!(
            credentials.verify(Some(&bearer_header(&forged))),
            Err(Refusal::Invalid)
        );
        assert!(!Refusal::Invalid.to_string().contains("horse"));
    }

    /// An unknown user's password is checked against a hash made like the
    /// users' own, whatever their parameters, the same one for a name each
    /// time.
    #[test]
    fn unknown_users_cost_what_known_users_do() {
        let (_dir, path, _token) = file();
        let salt = SaltString::generate(&mut OsRng);
        let costlier = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8192, 4, 1, None).unwrap(),
        )
        .hash_password(b"tr0ub4dor", &salt)
        .unwrap()
        .to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}user bob {costlier}\n")).unwrap();
        let credentials = Credentials::from_file(&path).unwrap();
        let kind = |hash: &str| {
            let parsed = PasswordHash::new(hash).unwrap();
            let params = Params::try_from(&parsed).unwrap();
            (
                parsed.algorithm.to_string(),
                parsed.version,
                params.m_cost(),
                params.t_cost(),
                params.p_cost(),
                parsed.hash.unwrap().len(),
            )
        };
        let mut users: Vec<_> = credentials.users.values().map(|hash| kind(hash)).collect();
        let mut decoys: Vec<_> = credentials.decoys.iter().map(|hash| kind(hash)).collect();
        users.sort();
        decoys.sort();
        assert_eq!(decoys, users);
        let names: Vec<String> = (0..64).map(|n| format!("stranger{n}")).collect();
        let picked: std::collections::HashSet<&str> = names
            .iter()
            .map(|name| credentials.decoy_for(name))
            .collect();
        assert_eq!(picked.len(), 2, "both decoys are in use");
        assert_eq!(
            credentials.decoy_for("mallory"),
            credentials.decoy_for("mallory")
        );
    }

    #[test]
    fn hashes_with_other_parameters_and_variants_are_verified_in_reused_memory() {
        let hashing = PasswordHashing::default();
        let salt = SaltString::generate(&mut OsRng);
        for (algorithm, version, memory_kib) in [
            (Algorithm::Argon2id, Version::V0x13, 8192),
            (Algorithm::Argon2i, Version::V0x13, 1024),
            (Algorithm::Argon2d, Version::V0x10, 64),
            (Algorithm::Argon2id, Version::V0x13, 19456),
        ] {
            let params = Params::new(memory_kib, 1, 1, Some(24)).unwrap();
            let hash = Argon2::new(algorithm, version, params)
                .hash_password(b"tr0ub4dor", &salt)
                .unwrap()
                .to_string();
            assert_eq!(hashing.verify(&hash, "tr0ub4dor", None), Ok(true), "{hash}");
            assert_eq!(
                hashing.verify(&hash, "tr0ub4dor&3", None),
                Ok(false),
                "{hash}"
            );
        }
        // The largest parameters so far set the size of the one block kept.
        let kept = hashing.memory.lock().unwrap().len();
        assert_eq!(kept * std::mem::size_of::<Block>(), 19456 * 1024);
        assert_eq!(
            hashing.verify("$argon2id$v=19$m=64,t=1,p=1$bad", "x", None),
            Ok(false)
        );
    }

    #[test]
    fn places_taken_ahead_count_and_are_given_back() {
        let (_dir, path, _token) = file();
        let credentials = Credentials::from_file(&path).unwrap();
        // One caller gets its share, and the others the rest.
        let one = || credentials.hashing_turn("spiffe://securemesh/client/client");
        let mut turns: Vec<HashingTurn> = std::iter::from_fn(one).take(4).collect();
        assert_eq!(turns.len(), PASSWORD_CHECKS_PER_CALLER);
        for other in ["client2", "client3"] {
            turns.extend(credentials.hashing_turn(&format!("spiffe://securemesh/client/{other}")));
        }
        assert_eq!(turns.len(), PASSWORD_CHECKS_AT_ONCE);
        // client3 found every place taken: it holds no share either.
        assert_eq!(credentials.hashing.per_caller.keys(), 2);
        let guess = basic_header("alice", "a guess");
        assert_eq!(credentials.verify(Some(&guess)), Err(Refusal::Busy));
        let mut turns = turns.into_iter();
        let right = basic_header("alice", "correct horse");
        let turn = turns.next().unwrap();
        assert_eq!(
            credentials.verify_in_turn(Some(&right), turn),
            Ok("alice".into())
        );
        drop(turns);
        assert_eq!(credentials.hashing.checks.load(Ordering::Acquire), 0);
        assert_eq!(credentials.hashing.per_caller.keys(), 0);
    }

    #[test]
    fn a_flood_of_password_checks_is_refused_beyond_a_few_waiting() {
        let (_dir, path, _token) = file();
        let credentials = Credentials::from_file(&path).unwrap();
        let flood = 4 * PASSWORD_CHECKS_AT_ONCE;
        let start = std::sync::Barrier::new(flood);
        let verdicts: Vec<_> = std::thread::scope(|scope| {
            let checks: Vec<_> = (0..flood)
                .map(|attempt| {
                    let (credentials, start) = (&credentials, &start);
                    scope.spawn(move || {
                        start.wait();
                        let guess = basic_header("alice", &format!("guess {attempt}"));
                        credentials.verify(Some(&guess))
                    })
                })
                .collect();
            checks
                .into_iter()
                .map(|check| check.join().unwrap())
                .collect()
        });
        let busy = verdicts
            .iter()
            .filter(|v| **v == Err(Refusal::Busy))
            .count();
        let hashed = verdicts
            .iter()
            .filter(|v| **v == Err(Refusal::Invalid))
            .count();
        assert_eq!(busy + hashed, flood, "{verdicts:?}");
        assert!(hashed >= 1 && busy >= flood / 2, "{verdicts:?}");
        // Nothing stays counted: the right password is checked afterwards.
        assert_eq!(credentials.hashing.checks.load(Ordering::Acquire), 0);
        let right = basic_header("alice", "correct horse");
        assert_eq!(credentials.verify(Some(&right)), Ok("alice".into()));
    }

    /// A client's first calls at once, with a password not yet verified,
    /// share one argon2 check (or find its verdict remembered), so none is
    /// refused as busy; the same goes for one wrong password.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_calls_with_the_same_credentials_shares_one_check() {
        let (_dir, path, _token) = file();
        let credentials = Arc::new(Credentials::from_file(&path).unwrap());
        let burst = 4 * PASSWORD_CHECKS_AT_ONCE;
        for (password, expected) in [
            ("wrong horse", Err(Refusal::Invalid)),
            ("correct horse", Ok("alice".to_owned())),
        ] {
            let header = basic_header("alice", password);
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..burst {
                let (credentials, header) = (Arc::clone(&credentials), header.clone());
                calls.spawn(async move {
                    credentials
                        .verify_off_thread(Some(&header), "spiffe://securemesh/client/client")
                        .await
                });
            }
            let verdicts = calls.join_all().await;
            assert!(verdicts.iter().all(|v| *v == expected), "{verdicts:?}");
        }
        // Nothing stays listed or counted.
        assert!(credentials.under_way.lock().unwrap().is_empty());
        assert_eq!(credentials.hashing.checks.load(Ordering::Acquire), 0);
        assert_eq!(credentials.hashing.per_caller.keys(), 0);
    }

    /// A caller that stops waiting leaves the check running to its verdict:
    /// a right password is remembered all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_nobody_waits_for_still_reaches_its_verdict() {
        let (_dir, path, _token) = file();
        let credentials = Arc::new(Credentials::from_file(&path).unwrap());
        let right = basic_header("alice", "correct horse");
        let impatient = credentials.verify_off_thread(Some(&right), "spiffe://securemesh/client/a");
        let _ = tokio::time::timeout(Duration::from_micros(1), impatient).await;
        let given_up = Instant::now() + Duration::from_secs(10);
        while !credentials.under_way.lock().unwrap().is_empty() {
            assert!(Instant::now() < given_up, "the check never ended");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            credentials.verify_without_hashing(Some(&right)),
            Some(Ok("alice".into()))
        );
    }

    #[test]
    fn the_file_stores_no_secret_in_clear_and_is_private() {
        let (_dir, path, token) = file();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("correct horse"));
        assert!(!text.contains(&token));
        assert!(text.contains("$argon2id$"));
        // Nor does its Debug form show the hashes or digests.
        let shown = format!("{:?}", Credentials::from_file(&path).unwrap());
        assert_eq!(
            shown,
            r#"Credentials { users: ["alice"], tokens: ["ci-bot"], .. }"#
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            add_user(&path, "alice", "again"),
            Err(CredentialsError::Duplicate(_))
        ));
        assert!(matches!(
            add_user(&path, "bad name", "x"),
            Err(CredentialsError::InvalidName(_))
        ));
    }

    #[test]
    fn a_malformed_file_names_the_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.txt");
        std::fs::write(&path, "# ok\nuser bob hunter2\n").unwrap();
        let error = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
