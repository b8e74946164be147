//! A device's Olm account (vodozemac `olm::Account`): its Curve25519 and Ed25519 identity keys, its
//! signed one-time and fallback keys, and the creation of Olm sessions.

use std::collections::HashMap;
use std::fmt;

use natter_proto::device_list::prekey_signing_input;
use natter_proto::wire::SignedPreKey;
use vodozemac::olm::{Account, AccountPickle, SessionConfig};
use vodozemac::{Curve25519PublicKey, KeyId};

use crate::account::verify_signature;
use crate::error::CryptoError;
use crate::session::{OlmCiphertext, OlmSession};

/// A device's identity keys and prekeys. The secrets are zeroized on drop and never shown by `Debug`.
pub struct DeviceKeys {
    account: Account,
}

impl DeviceKeys {
    /// Creates a new device account with random identity keys and no prekeys.
    pub fn generate() -> Self {
        Self {
            account: Account::new(),
        }
    }

    /// The Olm identity key (Curve25519).
    pub fn identity_curve(&self) -> [u8; 32] {
        self.account.curve25519_key().to_bytes()
    }

    /// The device signing key (Ed25519).
    pub fn identity_ed(&self) -> [u8; 32] {
        *self.account.ed25519_key().as_bytes()
    }

    /// Signs `msg` with the device's Ed25519 key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.account.sign(msg).to_bytes()
    }

    fn signed(&self, key_id: KeyId, key: &Curve25519PublicKey) -> SignedPreKey {
        let key_id = key_id.to_base64();
        let key = key.to_vec();
        let signature = self.sign(&prekey_signing_input(&key_id, &key)).to_vec();
        SignedPreKey {
            key_id,
            key,
            signature,
        }
    }

    fn sign_all(&self, keys: HashMap<KeyId, Curve25519PublicKey>) -> Vec<SignedPreKey> {
        let mut keys: Vec<_> = keys.into_iter().collect();
        keys.sort_by_key(|(id, _)| *id);
        keys.iter().map(|(id, key)| self.signed(*id, key)).collect()
    }

    /// Generates `n` one-time keys and returns all currently unpublished ones (oldest first), each
    /// signed over [`prekey_signing_input`]`(key_id, key)` with the device's Ed25519 key. `key_id` is
    /// vodozemac's `KeyId` in base64.
    pub fn generate_one_time_keys(&mut self, n: usize) -> Vec<SignedPreKey> {
        self.account.generate_one_time_keys(n);
        self.sign_all(self.account.one_time_keys())
    }

    /// Generates a new fallback key (the previous one stays usable until the next rotation) and returns
    /// it signed.
    pub fn generate_fallback_key(&mut self) -> SignedPreKey {
        self.account.generate_fallback_key();
        #[allow(
            clippy::expect_used,
            reason = "vodozemac always holds an unpublished fallback key right after generating one"
        )]
        self.sign_all(self.account.fallback_key())
            .pop()
            .expect("a freshly generated fallback key is unpublished")
    }

    /// The unpublished one-time keys and the unpublished fallback key, signed (to send them again after
    /// a failed upload).
    pub fn unpublished_keys(&self) -> (Vec<SignedPreKey>, Option<SignedPreKey>) {
        let one_time = self.sign_all(self.account.one_time_keys());
        let fallback = self.sign_all(self.account.fallback_key()).pop();
        (one_time, fallback)
    }

    /// Marks every unpublished one-time and fallback key as published (call after the server accepted
    /// the upload).
    pub fn mark_keys_as_published(&mut self) {
        self.account.mark_keys_as_published();
    }

    /// How many one-time keys the server should hold for this device.
    pub fn max_one_time_keys(&self) -> usize {
        self.account.max_number_of_one_time_keys()
    }

    /// Verifies the prekey's signature against `their_identity_ed` first ([`CryptoError::BadSignature`]
    /// if it does not verify: a server cannot slip in a key of its own), then creates an outbound Olm
    /// session with that device.
    pub fn create_outbound_session(
        &self,
        their_identity_curve: &[u8; 32],
        their_identity_ed: &[u8; 32],
        prekey: &SignedPreKey,
    ) -> Result<OlmSession, CryptoError> {
        verify_signature(
            their_identity_ed,
            &prekey_signing_input(&prekey.key_id, &prekey.key),
            &prekey.signature,
        )?;
        let one_time_key =
            Curve25519PublicKey::from_slice(&prekey.key).map_err(|_| CryptoError::InvalidKey)?;
        let identity_key = Curve25519PublicKey::from_bytes(*their_identity_curve);
        let session = self
            .account
            .create_outbound_session(SessionConfig::version_1(), identity_key, one_time_key)
            .map_err(|_| CryptoError::Session)?;
        Ok(OlmSession::new(session))
    }

    /// Creates the inbound session from a pre-key message (`olm_type` 0) sent by the device whose
    /// identity key is `their_identity_curve`, and returns it with the message's plaintext. The
    /// one-time key it used is consumed. Try the existing sessions first
    /// ([`OlmSession::matches_prekey`], [`OlmSession::decrypt`]).
    pub fn create_inbound_session(
        &mut self,
        their_identity_curve: &[u8; 32],
        msg: &OlmCiphertext,
    ) -> Result<(OlmSession, Vec<u8>), CryptoError> {
        let pre_key = msg.to_pre_key().ok_or(CryptoError::Session)?;
        let identity_key = Curve25519PublicKey::from_bytes(*their_identity_curve);
        let result = self
            .account
            .create_inbound_session(SessionConfig::version_1(), identity_key, &pre_key)
            .map_err(|_| CryptoError::Session)?;
        Ok((OlmSession::new(result.session), result.plaintext))
    }

    /// The account encrypted with `pickle_key` (vodozemac's encrypted pickle), for storing.
    pub fn pickle(&self, pickle_key: &[u8; 32]) -> String {
        self.account.pickle().encrypt(pickle_key)
    }

    /// Restores an account from [`DeviceKeys::pickle`]'s output. A wrong key or corrupted data gives
    /// [`CryptoError::Pickle`].
    pub fn from_pickle(pickled: &str, pickle_key: &[u8; 32]) -> Result<Self, CryptoError> {
        let pickle =
            AccountPickle::from_encrypted(pickled, pickle_key).map_err(|_| CryptoError::Pickle)?;
        Ok(Self {
            account: Account::from_pickle(pickle),
        })
    }
}

impl fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("identity_curve", &self.account.curve25519_key().to_base64())
            .field("identity_ed", &self.account.ed25519_key().to_base64())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prekeys_are_signed_and_published_once() {
        let mut dev = DeviceKeys::generate();
        let otks = dev.generate_one_time_keys(3);
        assert_eq!(otks.len(), 3);
        for k in &otks {
            assert_eq!(k.key.len(), 32);
            verify_signature(
                &dev.identity_ed(),
                &prekey_signing_input(&k.key_id, &k.key),
                &k.signature,
            )
            .unwrap();
        }
        let fb = dev.generate_fallback_key();
        verify_signature(
            &dev.identity_ed(),
            &prekey_signing_input(&fb.key_id, &fb.key),
            &fb.signature,
        )
        .unwrap();
        let (again, fb_again) = dev.unpublished_keys();
        assert_eq!(again, otks);
        assert_eq!(fb_again, Some(fb));
        dev.mark_keys_as_published();
        assert_eq!(dev.unpublished_keys(), (vec![], None));
        assert_eq!(dev.generate_one_time_keys(2).len(), 2);
        assert_eq!(dev.max_one_time_keys(), 50);
    }

    #[test]
    fn pickle_round_trip_and_wrong_key() {
        let mut dev = DeviceKeys::generate();
        dev.generate_one_time_keys(1);
        let key = [7u8; 32];
        let pickled = dev.pickle(&key);
        let back = DeviceKeys::from_pickle(&pickled, &key).unwrap();
        assert_eq!(back.identity_curve(), dev.identity_curve());
        assert_eq!(back.identity_ed(), dev.identity_ed());
        assert_eq!(back.unpublished_keys().0.len(), 1);
        assert_eq!(
            DeviceKeys::from_pickle(&pickled, &[8u8; 32]).unwrap_err(),
            CryptoError::Pickle
        );
        assert!(!pickled.contains(&vodozemac::base64_encode(dev.identity_ed())));
    }

    #[test]
    fn debug_shows_only_public_keys() {
        let dev = DeviceKeys::generate();
        let expected = format!(
            "DeviceKeys {{ identity_curve: {:?}, identity_ed: {:?}, .. }}",
            vodozemac::base64_encode(dev.identity_curve()),
            vodozemac::base64_encode(dev.identity_ed()),
        );
        assert_eq!(format!("{dev:?}"), expected);
    }
}
