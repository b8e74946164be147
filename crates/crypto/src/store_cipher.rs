//! Encryption at rest for the client store (in the spirit of matrix-rust-sdk's `StoreCipher`):
//! XChaCha20-Poly1305 with a random nonce per value, associated data binding each ciphertext to its row
//! or purpose, and a separate HKDF-derived key for vodozemac pickles.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::CryptoError;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const PICKLE_KEY_INFO: &[u8] = b"natter/pickle-key/v1";

/// Fills `buf` from the operating system's random number generator.
///
/// # Panics
///
/// If the OS generator fails, which on supported systems does not happen once the process runs:
/// without randomness no key or nonce can be made safely, so there is nothing better to do.
pub(crate) fn fill_random(buf: &mut [u8]) {
    #[allow(
        clippy::expect_used,
        reason = "an unavailable OS RNG is unrecoverable; continuing would be unsafe"
    )]
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

/// The key that encrypts the client store. Never shown by `Debug`; zeroized on drop.
pub struct StoreCipher {
    key: Zeroizing<[u8; 32]>,
}

impl StoreCipher {
    /// A new random key.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        fill_random(key.as_mut());
        Self { key }
    }

    /// Uses an existing key (from the OS keyring, or derived from a passphrase).
    pub fn from_key(key: [u8; 32]) -> Self {
        let mut key = key;
        let out = Self {
            key: Zeroizing::new(key),
        };
        zeroize::Zeroize::zeroize(&mut key);
        out
    }

    /// The key, for keeping in the OS keyring.
    pub fn key_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.key.clone()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.as_ref().into())
    }

    /// Encrypts `plaintext` with XChaCha20-Poly1305 under a random 24-byte nonce, which is prepended.
    /// `aad` binds the ciphertext to its row or purpose: decrypting with other `aad` fails.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn encrypt(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        #[allow(
            clippy::expect_used,
            reason = "XChaCha20-Poly1305 only fails for plaintexts over 256 GiB, which no store value is"
        )]
        let ciphertext = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("plaintext within XChaCha20-Poly1305 limits");
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Decrypts what [`StoreCipher::encrypt`] produced with the same `aad`. Any failure (wrong key,
    /// wrong `aad`, modified or truncated data) is [`CryptoError::Decrypt`].
    pub fn decrypt(&self, aad: &[u8], data: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if data.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ciphertext) = data.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }

    /// A separate key for vodozemac pickles, derived with HKDF-SHA256 (info `natter/pickle-key/v1`).
    pub fn pickle_key(&self) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(None, self.key.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        #[allow(
            clippy::expect_used,
            reason = "HKDF-SHA256 can output up to 8160 bytes; 32 always fits"
        )]
        hk.expand(PICKLE_KEY_INFO, out.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

impl fmt::Debug for StoreCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreCipher").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = StoreCipher::generate();
        let ct = c.encrypt(b"messages/42", b"secret text");
        assert_eq!(ct.len(), NONCE_LEN + 11 + TAG_LEN);
        assert_eq!(&c.decrypt(b"messages/42", &ct).unwrap()[..], b"secret text");
        assert_ne!(ct, c.encrypt(b"messages/42", b"secret text"), "fresh nonce");
        let empty = c.encrypt(b"", b"");
        assert!(c.decrypt(b"", &empty).unwrap().is_empty());

        let same = StoreCipher::from_key(*c.key_bytes());
        assert_eq!(
            &same.decrypt(b"messages/42", &ct).unwrap()[..],
            b"secret text"
        );
    }

    #[test]
    fn tampering_is_refused() {
        let c = StoreCipher::generate();
        let ct = c.encrypt(b"row/1", b"value");
        assert_eq!(c.decrypt(b"row/2", &ct), Err(CryptoError::Decrypt));
        for i in [0, NONCE_LEN, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            assert_eq!(c.decrypt(b"row/1", &bad), Err(CryptoError::Decrypt));
        }
        for len in [0, NONCE_LEN, NONCE_LEN + TAG_LEN, ct.len() - 1] {
            assert_eq!(c.decrypt(b"row/1", &ct[..len]), Err(CryptoError::Decrypt));
        }
        let other = StoreCipher::generate();
        assert_eq!(other.decrypt(b"row/1", &ct), Err(CryptoError::Decrypt));
    }

    #[test]
    fn pickle_key_is_separate_and_stable() {
        let c = StoreCipher::from_key([5u8; 32]);
        let pk = c.pickle_key();
        assert_ne!(*pk, *c.key_bytes());
        assert_eq!(*pk, *StoreCipher::from_key([5u8; 32]).pickle_key());
        assert_ne!(*pk, *StoreCipher::from_key([6u8; 32]).pickle_key());
    }

    #[test]
    fn debug_shows_no_secret() {
        let c = StoreCipher::from_key([0xab; 32]);
        let dbg = format!("{c:?}");
        assert_eq!(dbg, "StoreCipher { .. }");
        assert!(!dbg.contains("171") && !dbg.contains("ab"));
    }
}
