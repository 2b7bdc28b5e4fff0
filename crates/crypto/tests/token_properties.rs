//! Property tests of token verification: whatever arrives, verification
//! returns an error instead of panicking, and no single changed byte of a
//! genuine token gets through.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use proptest::prelude::*;
use securemesh_crypto::{generate_key, KeyRing, TokenError};

fn ring() -> KeyRing {
    KeyRing::from_key_strings(&[generate_key()]).expect("a generated key is valid")
}

/// `token` with the byte at `position` of its decoded form XORed with
/// `flip`, encoded again.
fn with_byte_flipped(token: &[u8], position: prop::sample::Index, flip: u8) -> String {
    let mut raw = URL_SAFE
        .decode(token)
        .expect("a genuine token is base64url");
    let index = position.index(raw.len());
    raw[index] ^= flip;
    URL_SAFE.encode(raw)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let ring = ring();
        prop_assert!(ring.decrypt(&bytes).is_err());
        prop_assert!(ring.decrypt_with_ttl(&bytes, Some(std::time::Duration::from_secs(1))).is_err());
    }

    #[test]
    fn well_formed_tokens_under_no_key_of_ours_fail_the_hmac(
        ago in 0u64..1_000_000,
        iv in proptest::array::uniform16(any::<u8>()),
        ciphertext in (1usize..20).prop_flat_map(|blocks| proptest::collection::vec(any::<u8>(), blocks * 16)),
        tag in proptest::array::uniform32(any::<u8>()),
    ) {
        // Version, a timestamp of the past, an IV, whole AES blocks and a
        // tag: every frame check passes, and only the HMAC can refuse it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut raw = vec![0x80];
        raw.extend((now - ago).to_be_bytes());
        raw.extend(iv);
        raw.extend(ciphertext);
        raw.extend(tag);
        let token = URL_SAFE.encode(raw);
        prop_assert!(matches!(ring().decrypt(token.as_bytes()), Err(TokenError::Invalid)));
    }

    /// Our verification against the `fernet` crate's own: the same
    /// plaintext for genuine tokens, a refusal from both for altered ones.
    #[test]
    fn verification_agrees_with_the_fernet_crate(
        plaintext in proptest::collection::vec(any::<u8>(), 0..3000),
        position in any::<prop::sample::Index>(),
        flip in 0u8..=255,
    ) {
        let key = generate_key();
        let ours = KeyRing::from_key_strings(&[&key]).unwrap();
        let theirs = fernet::Fernet::new(&key).unwrap();
        let token = theirs.encrypt(&plaintext);
        prop_assert_eq!(ours.decrypt(token.as_bytes()).unwrap(), theirs.decrypt(&token).unwrap());
        let altered = with_byte_flipped(token.as_bytes(), position, flip);
        prop_assert_eq!(ours.decrypt(altered.as_bytes()).ok(), theirs.decrypt(&altered).ok());
    }

    #[test]
    fn no_single_changed_byte_of_a_genuine_token_is_accepted(
        plaintext in proptest::collection::vec(any::<u8>(), 0..200),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let ring = ring();
        let token = ring.encrypt(&plaintext);
        prop_assert_eq!(ring.decrypt(&token).unwrap(), plaintext);
        let forged = with_byte_flipped(&token, position, flip);
        prop_assert!(ring.decrypt(forged.as_bytes()).is_err());
    }
}
