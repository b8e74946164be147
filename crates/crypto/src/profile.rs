//! Profile encryption: an account's name, about line and avatar are encrypted with its profile key
//! (XChaCha20-Poly1305 through [`StoreCipher`], bound to the owner's number), which the owner shares with
//! its contacts over Olm, so the server stores only ciphertext. A new key (after a block or a removed
//! contact) makes every earlier key useless for the profile uploaded with it.

use natter_proto::PhoneNumber;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::store_cipher::StoreCipher;

/// An account's profile key. Never shown by `Debug`; zeroized on drop.
pub struct ProfileKey {
    cipher: StoreCipher,
}

impl std::fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProfileKey(..)")
    }
}

fn aad(owner: &PhoneNumber) -> Vec<u8> {
    format!("natter/profile/v1/{}", owner.as_str()).into_bytes()
}

impl ProfileKey {
    /// A new random key.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn generate() -> Self {
        Self {
            cipher: StoreCipher::generate(),
        }
    }

    /// A key received from its owner (32 bytes).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::InvalidKey)?;
        Ok(Self {
            cipher: StoreCipher::from_key(key),
        })
    }

    /// The key's bytes, to share.
    pub fn bytes(&self) -> Zeroizing<[u8; 32]> {
        self.cipher.key_bytes()
    }

    /// Encrypts the owner's encoded profile.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn seal(&self, owner: &PhoneNumber, profile: &[u8]) -> Vec<u8> {
        self.cipher.encrypt(&aad(owner), profile)
    }

    /// Decrypts a profile of `owner`; fails if it was sealed with another key or for another number,
    /// or was altered.
    pub fn open(&self, owner: &PhoneNumber, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.cipher
            .decrypt(&aad(owner), ciphertext)
            .map(|p| p.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &str) -> PhoneNumber {
        PhoneNumber::from_e164(s).unwrap()
    }

    #[test]
    fn seals_and_opens_only_with_the_key_and_owner() {
        let (alice, bob) = (num("+15550000001"), num("+15550000002"));
        let key = ProfileKey::generate();
        let sealed = key.seal(&alice, b"Alice");
        assert_eq!(key.open(&alice, &sealed).unwrap(), b"Alice");
        let shared = ProfileKey::from_slice(key.bytes().as_ref()).unwrap();
        assert_eq!(shared.open(&alice, &sealed).unwrap(), b"Alice");
        assert!(key.open(&bob, &sealed).is_err(), "bound to the owner");
        assert!(ProfileKey::generate().open(&alice, &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(key.open(&alice, &altered).is_err());
        assert!(ProfileKey::from_slice(&[0; 31]).is_err());
        assert_eq!(format!("{key:?}"), "ProfileKey(..)");
    }
}
