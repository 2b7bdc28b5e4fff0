//! Encrypting payloads into Fernet tokens and verifying tokens back into
//! plaintext.
//!
//! Encryption is the `fernet` crate's. Verification is ours, on the same
//! RustCrypto primitives the crate uses (HMAC-SHA256 compared in constant
//! time, AES-128-CBC, PKCS#7): the token's frame is checked first (the
//! crate adds a TTL to the token's timestamp without checking for overflow),
//! then it is decoded once with a SIMD base64 decoder and verified and
//! decrypted in place. The crate's own path decodes with a scalar decoder
//! and copies the token four times; on a 16 KiB payload base64 alone cost as
//! much as the HMAC.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut as _, KeyIvInit as _};
use base64::Engine as _;
use hmac::Mac as _;
use sha2::{Digest, Sha256};

use crate::key_file::{read_key_lines, KeyFileError};

/// base64url with or without padding.
const LENIENT_URL_SAFE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The HMAC-SHA256 tag at the end of a token.
const TAG_BYTES: usize = 32;
/// Version (1) and timestamp (8): where the IV starts.
const IV_AT: usize = 1 + 8;
/// Where the ciphertext starts.
const CIPHERTEXT_AT: usize = IV_AT + 16;

/// Fernet format version byte.
const VERSION: u8 = 0x80;
/// version (1) + timestamp (8) + IV (16) + one AES block (16) + HMAC (32).
const MIN_TOKEN_BYTES: usize = 1 + 8 + 16 + 16 + 32;
/// How far in the future a token's timestamp may lie, as in Python's
/// `cryptography` and the `fernet` crate.
const MAX_CLOCK_SKEW_SECS: u64 = 60;

/// Why a token was refused. Messages never contain the token or any key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token at all.
    #[error("empty token")]
    Empty,
    /// Not base64url text, or not the Fernet frame.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The timestamp lies further in the future than the allowed clock skew.
    #[error("token timestamp is in the future")]
    FromTheFuture,
    /// The HMAC does not verify under any key (tampered, or another key), or
    /// the ciphertext does not decrypt.
    #[error("token verification failed (tampered, or encrypted under another key)")]
    Invalid,
    /// The token verified, but it is older than the time-to-live allowed.
    #[error("token expired")]
    Expired,
}

impl TokenError {
    /// Every [`kind`](Self::kind) there is.
    pub const KINDS: [&'static str; 5] = [
        "empty",
        "malformed",
        "from_the_future",
        "invalid",
        "expired",
    ];

    /// A short name for the refusal, for metrics: `empty`, `malformed`,
    /// `from_the_future`, `invalid` or `expired`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Malformed(_) => "malformed",
            Self::FromTheFuture => "from_the_future",
            Self::Invalid => "invalid",
            Self::Expired => "expired",
        }
    }
}

/// The Fernet keys of one party: the first encrypts, any of them decrypts.
#[derive(Clone)]
pub struct KeyRing {
    encrypting: fernet::Fernet,
    all: Vec<RingKey>,
}

/// One key of a ring, split as the Fernet specification says: the first
/// 16 bytes sign, the last 16 encrypt.
#[derive(Clone)]
struct RingKey {
    signing: [u8; 16],
    encryption: [u8; 16],
}

impl RingKey {
    /// The halves of a base64url key the `fernet` crate accepted.
    fn of(key: &str) -> Option<Self> {
        let bytes = LENIENT_URL_SAFE.decode(key.trim()).ok()?;
        let (signing, encryption) = bytes.split_at_checked(16)?;
        Some(Self {
            signing: signing.try_into().ok()?,
            encryption: encryption.try_into().ok()?,
        })
    }

    /// The plaintext of `token` (decoded, frame already checked) if its
    /// HMAC verifies under this key and its ciphertext decrypts.
    fn open(&self, token: &[u8]) -> Option<Vec<u8>> {
        if token.len() < MIN_TOKEN_BYTES {
            return None;
        }
        let (signed, tag) = token.split_at(token.len() - TAG_BYTES);
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.signing).ok()?;
        mac.update(signed);
        // Constant time: a forger learns nothing from how long it took.
        mac.verify_slice(tag).ok()?;
        let iv = &signed[IV_AT..CIPHERTEXT_AT];
        let mut text = signed[CIPHERTEXT_AT..].to_vec();
        let length = cbc::Decryptor::<aes::Aes128>::new_from_slices(&self.encryption, iv)
            .ok()?
            .decrypt_padded_mut::<Pkcs7>(&mut text)
            .ok()?
            .len();
        text.truncate(length);
        Some(text)
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.all.len())
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Loads a key file (one base64url key per line, first one primary).
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        let mut keys = Vec::new();
        for (line, text) in read_key_lines(path)? {
            let key = Self::key(&text).ok_or_else(|| KeyFileError::InvalidKey {
                path: path.to_path_buf(),
                line,
            })?;
            keys.push(key);
        }
        Self::from_keys(keys).ok_or_else(|| KeyFileError::Empty(path.to_path_buf()))
    }

    /// Builds a ring from base64url key strings; `None` if any is invalid or
    /// there are none.
    pub fn from_key_strings<S: AsRef<str>>(keys: &[S]) -> Option<Self> {
        let keys = keys
            .iter()
            .map(|key| Self::key(key.as_ref()))
            .collect::<Option<Vec<_>>>()?;
        Self::from_keys(keys)
    }

    /// A key as the `fernet` crate reads it (to encrypt) and its halves
    /// (to verify and decrypt); `None` if it is not a Fernet key.
    fn key(text: &str) -> Option<(fernet::Fernet, RingKey)> {
        Some((fernet::Fernet::new(text)?, RingKey::of(text)?))
    }

    fn from_keys(keys: Vec<(fernet::Fernet, RingKey)>) -> Option<Self> {
        let encrypting = keys.first()?.0.clone();
        Some(Self {
            encrypting,
            all: keys.into_iter().map(|(_, key)| key).collect(),
        })
    }

    /// Encrypts `plaintext` under the primary key. The token is ASCII
    /// base64url, exactly what `Fernet.encrypt()` returns in Python.
    pub fn encrypt(&self, plaintext: &[u8]) -> Vec<u8> {
        self.encrypting.encrypt(plaintext).into_bytes()
    }

    /// Encrypts as if at `unix_time` (seconds), like Python's
    /// `Fernet.encrypt_at_time`: for tests and tools that need tokens of a
    /// given age. Everyday encryption uses [`KeyRing::encrypt`].
    pub fn encrypt_at_time(&self, plaintext: &[u8], unix_time: u64) -> Vec<u8> {
        self.encrypting
            .encrypt_at_time(plaintext, unix_time)
            .into_bytes()
    }

    /// Verifies `token` under any key of the ring and returns the plaintext.
    /// Tokens of any age are accepted, made in the past or (a clock ahead
    /// of ours) in the future, as by Python's `Fernet.decrypt(token)`.
    pub fn decrypt(&self, token: &[u8]) -> Result<Vec<u8>, TokenError> {
        self.decrypt_with_ttl(token, None)
    }

    /// Verifies `token` under any key of the ring and returns the plaintext,
    /// refusing a token made more than `ttl` ago (as Python's
    /// `Fernet.decrypt(token, ttl)`) or more than 60 s in the future.
    ///
    /// The frame (length, alphabet, version) and, with a `ttl`, a
    /// timestamp from the future are judged from the token's own text
    /// before its HMAC (without one, Python accepts any timestamp, and so
    /// do we):
    /// nothing of them is secret. Whether it is too old is judged only once
    /// it has verified: a forged token is "invalid", whatever its age.
    pub fn decrypt_with_ttl(
        &self,
        token: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Vec<u8>, TokenError> {
        let now = unix_now();
        let (text, made_at) = check_frame(token)?;
        if ttl.is_some() && made_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(TokenError::FromTheFuture);
        }
        let decoded = base64_simd::URL_SAFE_NO_PAD
            .decode_to_vec(text.as_bytes())
            .map_err(|_| TokenError::Malformed("not base64url"))?;
        let plaintext = self
            .all
            .iter()
            .find_map(|key| key.open(&decoded))
            .ok_or(TokenError::Invalid)?;
        match ttl {
            Some(ttl) if made_at.saturating_add(ttl.as_secs()) < now => Err(TokenError::Expired),
            _ => Ok(plaintext),
        }
    }
}

/// SHA-256 of `data`: what a server returns so the client can check that
/// the plaintext arrived intact.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Seconds since the Unix epoch, as Fernet timestamps count.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Checks the token's outer frame (text, version, length, block alignment)
/// and returns its text without padding, with the time it claims to have
/// been made.
///
/// Only the first 12 characters (version and timestamp, 9 bytes) are
/// decoded here; the length follows from the text's. The rest of the
/// alphabet is checked when the whole token is decoded.
fn check_frame(token: &[u8]) -> Result<(&str, u64), TokenError> {
    /// Characters that encode the 9 bytes of version and timestamp.
    const HEADER_CHARS: usize = 12;
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    // Base64url is ASCII; checked first, so that the text below is cut at
    // character boundaries only.
    if !token.is_ascii() {
        return Err(TokenError::Malformed("not ASCII text"));
    }
    let text = std::str::from_utf8(token).map_err(|_| TokenError::Malformed("not ASCII text"))?;
    // A trailing newline is a common copy-paste artefact, and padding is
    // optional (the `fernet` crate trims it); anything else is not
    // base64url.
    let text = text.trim_end_matches(['\n', '\r']);
    let unpadded = text.trim_end_matches('=');
    let padding = text.len() - unpadded.len();
    // Padding inside the text would end a base64 quantum early: the
    // header below would decode to fewer than its 9 bytes.
    if padding > 2 || (padding > 0 && text.len() % 4 != 0) || unpadded.contains('=') {
        return Err(TokenError::Malformed("not base64url"));
    }
    let bytes = match unpadded.len() % 4 {
        0 => unpadded.len() / 4 * 3,
        2 => unpadded.len() / 4 * 3 + 1,
        3 => unpadded.len() / 4 * 3 + 2,
        _ => return Err(TokenError::Malformed("not base64url")),
    };
    if bytes < MIN_TOKEN_BYTES || (bytes - 1 - 8 - 16 - 32) % 16 != 0 {
        return Err(TokenError::Malformed("wrong length"));
    }
    let header = LENIENT_URL_SAFE
        .decode(&unpadded[..HEADER_CHARS])
        .map_err(|_| TokenError::Malformed("not base64url"))?;
    let Ok::<[u8; 9], _>([version, timestamp @ ..]) = header.try_into() else {
        return Err(TokenError::Malformed("not base64url"));
    };
    if version != VERSION {
        return Err(TokenError::Malformed("unknown version"));
    }
    Ok((unpadded, u64::from_be_bytes(timestamp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE;

    #[test]
    fn every_refusal_kind_is_listed() {
        let every = [
            TokenError::Empty,
            TokenError::Malformed(""),
            TokenError::FromTheFuture,
            TokenError::Invalid,
            TokenError::Expired,
        ];
        let kinds: Vec<&str> = every.iter().map(TokenError::kind).collect();
        assert_eq!(kinds, TokenError::KINDS);
    }

    fn ring() -> KeyRing {
        KeyRing::from_key_strings(&[crate::generate_key()]).unwrap()
    }

    #[test]
    fn round_trip_and_digest() {
        let ring = ring();
        let token = ring.encrypt(b"hello mesh");
        assert!(token.iter().all(u8::is_ascii));
        assert_eq!(ring.decrypt(&token).unwrap(), b"hello mesh");
        assert_eq!(
            sha256(b"abc").to_vec(),
            URL_SAFE
                .decode("ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0=")
                .unwrap()
        );
    }

    /// Vector from the Fernet specification (`verify.json`): a token made at a
    /// known time under a known key decrypts to the known message (no TTL is
    /// applied, so its 1985 timestamp is fine).
    #[test]
    fn specification_vector_verifies() {
        let key = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
        let token = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
        let ring = KeyRing::from_key_strings(&[key]).unwrap();
        assert_eq!(ring.decrypt(token.as_bytes()).unwrap(), b"hello");
        assert_eq!(
            check_frame(token.as_bytes()),
            Ok((token.trim_end_matches('='), 499162800))
        );
    }

    /// A token signed with the right key whose plaintext is not PKCS#7
    /// padded: the HMAC verifies, the decryption must still refuse it.
    #[test]
    fn refuses_a_signed_token_with_bad_padding() {
        use aes::cipher::block_padding::NoPadding;
        use aes::cipher::BlockEncryptMut as _;

        let key = crate::generate_key();
        let halves = RingKey::of(&key).unwrap();
        let ring = KeyRing::from_key_strings(&[&key]).unwrap();
        let iv = [7u8; 16];
        for last_block in [[0u8; 16], [17u8; 16], {
            let mut block = [3u8; 16];
            block[14] = 9;
            block
        }] {
            let mut ciphertext = last_block.to_vec();
            cbc::Encryptor::<aes::Aes128>::new_from_slices(&halves.encryption, &iv)
                .unwrap()
                .encrypt_padded_mut::<NoPadding>(&mut ciphertext, 16)
                .unwrap();
            let mut raw = vec![VERSION];
            raw.extend_from_slice(&unix_now().to_be_bytes());
            raw.extend_from_slice(&iv);
            raw.extend_from_slice(&ciphertext);
            let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&halves.signing).unwrap();
            mac.update(&raw);
            raw.extend_from_slice(&mac.finalize().into_bytes());
            let token = URL_SAFE.encode(raw);
            assert_eq!(
                ring.decrypt(token.as_bytes()),
                Err(TokenError::Invalid),
                "{last_block:?}"
            );
        }
    }

    #[test]
    fn accepts_a_trailing_newline_and_missing_padding() {
        let ring = ring();
        let token = String::from_utf8(ring.encrypt(b"pasted")).unwrap();
        for variant in [
            format!("{token}\n"),
            format!("{token}\r\n"),
            token.trim_end_matches('=').to_owned(),
        ] {
            assert_eq!(
                ring.decrypt(variant.as_bytes()).unwrap(),
                b"pasted",
                "{variant:?}"
            );
        }
    }

    #[test]
    fn refuses_empty_non_text_and_non_base64() {
        let ring = ring();
        assert_eq!(ring.decrypt(b""), Err(TokenError::Empty));
        assert!(matches!(
            ring.decrypt(&[0xff, 0xfe]),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            ring.decrypt(b"not a token!"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn padding_inside_the_header_is_malformed_not_a_panic() {
        // 98 characters, a valid length; the header's `==` would decode to
        // 7 bytes of its 9.
        let token = format!("gAAAAAAAAA=={}", "A".repeat(86));
        assert_eq!(
            ring().decrypt(token.as_bytes()),
            Err(TokenError::Malformed("not base64url"))
        );
    }

    #[test]
    fn refuses_a_bad_character_or_bad_padding_anywhere_as_malformed() {
        let ring = ring();
        let token = String::from_utf8(ring.encrypt(&[7u8; 300])).unwrap();
        for position in [0, 5, 10, 11, 12, 200, token.len() - 2] {
            for bad in ['+', '/', '.', ' ', '=', '\u{e9}'] {
                if bad == '=' && position + 2 >= token.len() {
                    // Padding where padding may be: the cases below.
                    continue;
                }
                let mut chars: Vec<char> = token.chars().collect();
                chars[position] = bad;
                let tampered: String = chars.into_iter().collect();
                assert!(
                    matches!(
                        ring.decrypt(tampered.as_bytes()),
                        Err(TokenError::Malformed(_))
                    ),
                    "{bad:?} at {position}"
                );
            }
        }
        let unpadded = token.trim_end_matches('=');
        for padding in ["===", "=", "=="] {
            let candidate = format!("{unpadded}{padding}");
            let canonical = candidate.len() % 4 == 0 && padding.len() <= 2;
            assert_eq!(
                ring.decrypt(candidate.as_bytes()).is_ok(),
                canonical,
                "{padding:?} after {} characters",
                unpadded.len()
            );
        }
        // A length no base64 text has (4n + 1 characters).
        let odd = format!("{}A", &unpadded[..unpadded.len() / 4 * 4]);
        assert!(matches!(
            ring.decrypt(odd.as_bytes()),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_a_non_ascii_character_of_the_right_byte_length_anywhere() {
        // Two bytes of a genuine token replaced by one two-byte character:
        // the length still looks right. Across the end of the header (bytes
        // 11 and 12) this once cut the text inside the character, a panic
        // any caller could trigger.
        let ring = ring();
        let token = ring.encrypt(b"short");
        for position in (0..16).chain([40, token.len() - 2]) {
            let mut tampered = token.clone();
            tampered.splice(position..position + 2, "\u{e9}".bytes());
            assert_eq!(tampered.len(), token.len());
            assert_eq!(
                ring.decrypt(&tampered),
                Err(TokenError::Malformed("not ASCII text")),
                "at byte {position}"
            );
        }
    }

    #[test]
    fn refuses_tampered_tokens_at_every_region() {
        let ring = ring();
        let token = ring.encrypt(b"payload that matters");
        let raw = URL_SAFE.decode(&token).unwrap();
        // version, timestamp, IV, ciphertext, HMAC
        for position in [0, 4, 12, 30, raw.len() - 40, raw.len() - 1] {
            let mut forged = raw.clone();
            forged[position] ^= 0x01;
            let forged = URL_SAFE.encode(forged);
            assert!(
                ring.decrypt(forged.as_bytes()).is_err(),
                "flipped byte {position} was accepted"
            );
        }
    }

    #[test]
    fn refuses_truncated_tokens() {
        let ring = ring();
        let token = ring.encrypt(b"payload");
        for cut in [1, 5, token.len() / 2, token.len() - 4] {
            assert!(
                ring.decrypt(&token[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
    }

    #[test]
    fn refuses_token_under_another_key() {
        let token = ring().encrypt(b"secret");
        assert_eq!(ring().decrypt(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn accepts_any_key_of_the_ring_and_encrypts_with_the_first() {
        let old = crate::generate_key();
        let new = crate::generate_key();
        let old_token = KeyRing::from_key_strings(&[&old]).unwrap().encrypt(b"x");
        let rotated = KeyRing::from_key_strings(&[&new, &old]).unwrap();
        assert_eq!(rotated.decrypt(&old_token).unwrap(), b"x");
        let new_token = rotated.encrypt(b"y");
        assert!(KeyRing::from_key_strings(&[&new])
            .unwrap()
            .decrypt(&new_token)
            .is_ok());
    }

    /// A forged timestamp near `u64::MAX` is refused without overflow:
    /// from the future with a TTL, forged (its HMAC) without one.
    #[test]
    fn refuses_timestamps_far_in_the_future_without_overflow() {
        let ring = ring();
        let token = ring.encrypt(b"x");
        let mut raw = URL_SAFE.decode(&token).unwrap();
        raw[1..9].copy_from_slice(&u64::MAX.to_be_bytes());
        let forged = URL_SAFE.encode(raw);
        assert_eq!(
            ring.decrypt_with_ttl(forged.as_bytes(), Some(Duration::from_secs(60))),
            Err(TokenError::FromTheFuture)
        );
        assert_eq!(ring.decrypt(forged.as_bytes()), Err(TokenError::Invalid));
        let key = crate::generate_key();
        let signed = token_made_at(&key, b"x", u64::MAX);
        let ring = KeyRing::from_key_strings(&[&key]).unwrap();
        assert_eq!(ring.decrypt(&signed).unwrap(), b"x");
        assert_eq!(
            ring.decrypt_with_ttl(&signed, Some(Duration::from_secs(u64::MAX))),
            Err(TokenError::FromTheFuture)
        );
    }

    fn token_made_at(key: &str, plaintext: &[u8], made_at: u64) -> Vec<u8> {
        KeyRing::from_key_strings(&[key])
            .unwrap()
            .encrypt_at_time(plaintext, made_at)
    }

    #[test]
    fn ttl_refuses_old_tokens_only_after_they_verify() {
        let key = crate::generate_key();
        let ring = KeyRing::from_key_strings(&[&key]).unwrap();
        let now = unix_now();
        let old = token_made_at(&key, b"old", now - 120);
        assert_eq!(ring.decrypt(&old).unwrap(), b"old");
        assert_eq!(
            ring.decrypt_with_ttl(&old, Some(Duration::from_secs(60))),
            Err(TokenError::Expired)
        );
        assert!(ring
            .decrypt_with_ttl(&old, Some(Duration::from_secs(300)))
            .is_ok());
        // A forged old token is "invalid", not "expired".
        let mut forged = old.clone();
        let last = forged.len() - 5;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert!(!matches!(
            ring.decrypt_with_ttl(&forged, Some(Duration::from_secs(60))),
            Ok(_) | Err(TokenError::Expired)
        ));
    }

    /// As Python: with a TTL, a token made more than 60 s ahead of our
    /// clock is refused; without one, any time is accepted.
    #[test]
    fn refuses_tokens_from_beyond_the_clock_skew_when_given_a_ttl() {
        let key = crate::generate_key();
        let ring = KeyRing::from_key_strings(&[&key]).unwrap();
        let ttl = Some(Duration::from_secs(300));
        let now = unix_now();
        assert!(ring
            .decrypt_with_ttl(&token_made_at(&key, b"soon", now + 30), ttl)
            .is_ok());
        let later = token_made_at(&key, b"later", now + 600);
        assert_eq!(
            ring.decrypt_with_ttl(&later, ttl),
            Err(TokenError::FromTheFuture)
        );
        assert_eq!(ring.decrypt(&later).unwrap(), b"later");
    }

    #[test]
    fn key_file_with_several_keys_loads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        let (first, second) = (crate::generate_key(), crate::generate_key());
        std::fs::write(&path, format!("# rotated\n{first}\n\n{second}\n")).unwrap();
        let ring = KeyRing::from_file(&path).unwrap();
        let token = ring.encrypt(b"z");
        assert!(KeyRing::from_key_strings(&[&first])
            .unwrap()
            .decrypt(&token)
            .is_ok());
        assert!(KeyRing::from_key_strings(&[&second])
            .unwrap()
            .decrypt(&token)
            .is_err());
    }

    #[test]
    fn invalid_key_file_names_the_line_but_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        std::fs::write(&path, "c2VjcmV0LXR5cG8\n").unwrap();
        let message = KeyRing::from_file(&path).unwrap_err().to_string();
        assert!(message.contains("line 1"), "{message}");
        assert!(!message.contains("c2VjcmV0"), "{message}");
    }
}
