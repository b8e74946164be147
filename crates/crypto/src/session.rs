//! Olm sessions (vodozemac's double ratchet) between two devices, and the wire form of their messages.

use std::fmt;

use vodozemac::olm::{OlmMessage, PreKeyMessage, Session, SessionPickle};

use crate::error::CryptoError;

/// Olm message type of a pre-key message (the first messages of a session, until a reply arrives).
pub const OLM_TYPE_PRE_KEY: u32 = 0;
/// Olm message type of a normal message.
pub const OLM_TYPE_NORMAL: u32 = 1;

/// An Olm message as it travels: its type and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OlmCiphertext {
    /// 0: pre-key message, 1: normal message.
    pub olm_type: u32,
    /// The encoded Olm message.
    pub body: Vec<u8>,
}

impl OlmCiphertext {
    /// Whether this is a pre-key message (one that can start a session).
    pub fn is_pre_key(&self) -> bool {
        self.olm_type == OLM_TYPE_PRE_KEY
    }

    pub(crate) fn from_olm(msg: &OlmMessage) -> Self {
        let (olm_type, body) = msg.to_parts();
        Self {
            // to_parts only yields 0 or 1.
            olm_type: if olm_type == 0 {
                OLM_TYPE_PRE_KEY
            } else {
                OLM_TYPE_NORMAL
            },
            body,
        }
    }

    pub(crate) fn to_olm(&self) -> Option<OlmMessage> {
        match self.olm_type {
            OLM_TYPE_PRE_KEY | OLM_TYPE_NORMAL => {
                OlmMessage::from_parts(self.olm_type as usize, &self.body).ok()
            }
            _ => None,
        }
    }

    pub(crate) fn to_pre_key(&self) -> Option<PreKeyMessage> {
        if self.is_pre_key() {
            PreKeyMessage::from_bytes(&self.body).ok()
        } else {
            None
        }
    }
}

/// An Olm session with one device of a peer (or of our own account).
pub struct OlmSession {
    inner: Session,
}

impl OlmSession {
    pub(crate) fn new(inner: Session) -> Self {
        Self { inner }
    }

    /// The session's globally unique id (base64).
    pub fn session_id(&self) -> String {
        self.inner.session_id()
    }

    /// Encrypts a message. It is a pre-key message until this session has decrypted a reply.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<OlmCiphertext, CryptoError> {
        let msg = self
            .inner
            .encrypt(plaintext)
            .map_err(|_| CryptoError::Encrypt)?;
        Ok(OlmCiphertext::from_olm(&msg))
    }

    /// Decrypts a message of this session. Every failure (malformed, tampered, replayed, another
    /// session's message) is [`CryptoError::Decrypt`].
    pub fn decrypt(&mut self, msg: &OlmCiphertext) -> Result<Vec<u8>, CryptoError> {
        let msg = msg.to_olm().ok_or(CryptoError::Decrypt)?;
        self.inner.decrypt(&msg).map_err(|_| CryptoError::Decrypt)
    }

    /// Whether a pre-key message belongs to this session (same session keys). Always false for a
    /// normal message or a malformed one.
    pub fn matches_prekey(&self, msg: &OlmCiphertext) -> bool {
        msg.to_pre_key()
            .is_some_and(|m| m.session_id() == self.inner.session_id())
    }

    /// Whether this session has decrypted a message from the peer (from then on it sends normal
    /// messages).
    pub fn has_received_message(&self) -> bool {
        self.inner.has_received_message()
    }

    /// The session encrypted with `pickle_key` (vodozemac's encrypted pickle), for storing.
    pub fn pickle(&self, pickle_key: &[u8; 32]) -> String {
        self.inner.pickle().encrypt(pickle_key)
    }

    /// Restores a session from [`OlmSession::pickle`]'s output. A wrong key or corrupted data gives
    /// [`CryptoError::Pickle`].
    pub fn from_pickle(pickled: &str, pickle_key: &[u8; 32]) -> Result<Self, CryptoError> {
        let pickle =
            SessionPickle::from_encrypted(pickled, pickle_key).map_err(|_| CryptoError::Pickle)?;
        Ok(Self::new(Session::from_pickle(pickle)))
    }
}

impl fmt::Debug for OlmSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OlmSession")
            .field("session_id", &self.session_id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use natter_proto::wire::SignedPreKey;

    use super::*;
    use crate::device::DeviceKeys;

    fn otk(dev: &mut DeviceKeys) -> SignedPreKey {
        let key = dev.generate_one_time_keys(1).pop().unwrap();
        dev.mark_keys_as_published();
        key
    }

    fn outbound(alice: &DeviceKeys, bob: &DeviceKeys, prekey: &SignedPreKey) -> OlmSession {
        alice
            .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), prekey)
            .unwrap()
    }

    #[test]
    fn round_trip_both_directions_with_pickle_mid_conversation() {
        let alice = DeviceKeys::generate();
        let mut bob = DeviceKeys::generate();
        let prekey = otk(&mut bob);
        let mut a = outbound(&alice, &bob, &prekey);

        let m1 = a.encrypt(b"hello bob").unwrap();
        assert_eq!(m1.olm_type, OLM_TYPE_PRE_KEY);
        let m2 = a.encrypt(b"still there?").unwrap();
        assert_eq!(m2.olm_type, OLM_TYPE_PRE_KEY);

        let (mut b, pt) = bob
            .create_inbound_session(&alice.identity_curve(), &m1)
            .unwrap();
        assert_eq!(pt, b"hello bob");
        assert_eq!(b.session_id(), a.session_id());
        assert!(b.matches_prekey(&m2));
        assert_eq!(b.decrypt(&m2).unwrap(), b"still there?");

        // Bob replies: a normal message; once Alice decrypts it, she sends normal messages too.
        let r1 = b.encrypt(b"hi alice").unwrap();
        assert_eq!(r1.olm_type, OLM_TYPE_NORMAL);
        assert!(!a.has_received_message());
        assert_eq!(a.decrypt(&r1).unwrap(), b"hi alice");
        assert!(a.has_received_message());
        let m3 = a.encrypt(b"normal now").unwrap();
        assert_eq!(m3.olm_type, OLM_TYPE_NORMAL);
        assert!(!b.matches_prekey(&m3));

        // Both sides are stored and restored mid-conversation.
        let key = [3u8; 32];
        let mut a = OlmSession::from_pickle(&a.pickle(&key), &key).unwrap();
        let mut b = OlmSession::from_pickle(&b.pickle(&key), &key).unwrap();
        assert_eq!(b.decrypt(&m3).unwrap(), b"normal now");
        let r2 = b.encrypt(b"after restore").unwrap();
        assert_eq!(a.decrypt(&r2).unwrap(), b"after restore");
        let m4 = a.encrypt(b"and back").unwrap();
        assert_eq!(b.decrypt(&m4).unwrap(), b"and back");

        // Replay and tampering are refused with the coarse error.
        assert_eq!(b.decrypt(&m4), Err(CryptoError::Decrypt));
        let mut bad = a.encrypt(b"x").unwrap();
        let last = bad.body.len() - 1;
        bad.body[last] ^= 1;
        assert_eq!(b.decrypt(&bad), Err(CryptoError::Decrypt));
        let odd = OlmCiphertext {
            olm_type: 7,
            body: vec![1, 2, 3],
        };
        assert_eq!(b.decrypt(&odd), Err(CryptoError::Decrypt));
        assert!(!b.matches_prekey(&odd));
    }

    #[test]
    fn wrong_pickle_key_is_an_error() {
        let alice = DeviceKeys::generate();
        let mut bob = DeviceKeys::generate();
        let prekey = otk(&mut bob);
        let a = outbound(&alice, &bob, &prekey);
        let pickled = a.pickle(&[1u8; 32]);
        assert_eq!(
            OlmSession::from_pickle(&pickled, &[2u8; 32]).unwrap_err(),
            CryptoError::Pickle
        );
        assert_eq!(
            OlmSession::from_pickle("garbage", &[1u8; 32]).unwrap_err(),
            CryptoError::Pickle
        );
    }

    #[test]
    fn outbound_session_refuses_badly_signed_prekeys() {
        let alice = DeviceKeys::generate();
        let mut bob = DeviceKeys::generate();
        let mallory = DeviceKeys::generate();
        let good = otk(&mut bob);

        let mut flipped = good.clone();
        flipped.signature[0] ^= 1;
        let err = alice
            .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), &flipped)
            .unwrap_err();
        assert_eq!(err, CryptoError::BadSignature);

        // A key the server made up, signed by another device.
        let mut other = DeviceKeys::generate();
        let forged = other.generate_one_time_keys(1).pop().unwrap();
        let mut resigned = forged.clone();
        resigned.signature = mallory
            .sign(&natter_proto::device_list::prekey_signing_input(
                &forged.key_id,
                &forged.key,
            ))
            .to_vec();
        for prekey in [forged, resigned] {
            let err = alice
                .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), &prekey)
                .unwrap_err();
            assert_eq!(err, CryptoError::BadSignature);
        }

        // Bob's key, but a different key id than the one he signed.
        let mut renamed = good.clone();
        renamed.key_id = "AAAAAAAAAAE".into();
        assert_eq!(
            alice
                .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), &renamed)
                .unwrap_err(),
            CryptoError::BadSignature
        );
        assert!(
            alice
                .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), &good)
                .is_ok()
        );
    }

    #[test]
    fn one_time_key_works_once_fallback_key_again() {
        let alice = DeviceKeys::generate();
        let mut bob = DeviceKeys::generate();
        let prekey = otk(&mut bob);
        let mut a = outbound(&alice, &bob, &prekey);
        let m1 = a.encrypt(b"first").unwrap();
        let (_, pt) = bob
            .create_inbound_session(&alice.identity_curve(), &m1)
            .unwrap();
        assert_eq!(pt, b"first");
        assert_eq!(
            bob.create_inbound_session(&alice.identity_curve(), &m1)
                .unwrap_err(),
            CryptoError::Session
        );

        // A second session on the same (already used) one-time key fails as well.
        let mut a2 = outbound(&alice, &bob, &prekey);
        let m2 = a2.encrypt(b"second").unwrap();
        assert_eq!(
            bob.create_inbound_session(&alice.identity_curve(), &m2)
                .unwrap_err(),
            CryptoError::Session
        );

        // Wrong sender identity or a normal message cannot start a session.
        let fallback = bob.generate_fallback_key();
        bob.mark_keys_as_published();
        let mut a3 = outbound(&alice, &bob, &fallback);
        let m3 = a3.encrypt(b"third").unwrap();
        assert_eq!(
            bob.create_inbound_session(&bob.identity_curve(), &m3)
                .unwrap_err(),
            CryptoError::Session
        );
        let normal = OlmCiphertext {
            olm_type: OLM_TYPE_NORMAL,
            body: m3.body.clone(),
        };
        assert_eq!(
            bob.create_inbound_session(&alice.identity_curve(), &normal)
                .unwrap_err(),
            CryptoError::Session
        );
        let (_, pt) = bob
            .create_inbound_session(&alice.identity_curve(), &m3)
            .unwrap();
        assert_eq!(pt, b"third");
    }
}
