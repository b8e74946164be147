//! Megolm group sessions (vodozemac's sender keys): a device's outbound session for one group, which
//! encrypts each group message once, and the inbound sessions that decrypt other devices' messages.
//!
//! Keys leave a device only as exported session keys from a given message index on, so a member added
//! later never gets the keys of earlier messages. vodozemac does not detect a replayed Megolm message:
//! callers must remember (session, message index) and refuse a second ciphertext for the same pair.

use std::fmt;

use vodozemac::megolm::{
    ExportedSessionKey, GroupSession, GroupSessionPickle, InboundGroupSession,
    InboundGroupSessionPickle, MegolmMessage, SessionConfig,
};

use crate::error::CryptoError;

/// A device's outbound group session, with an inbound copy of itself so that it can export its key from
/// any index it has not passed yet.
pub struct OutboundGroupSession {
    session: GroupSession,
    own: InboundGroupSession,
}

impl fmt::Debug for OutboundGroupSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundGroupSession")
            .field("session_id", &self.session.session_id())
            .field("index", &self.session.message_index())
            .finish_non_exhaustive()
    }
}

impl Default for OutboundGroupSession {
    fn default() -> Self {
        Self::new()
    }
}

impl OutboundGroupSession {
    /// A fresh session at index 0.
    pub fn new() -> Self {
        let session = GroupSession::new(SessionConfig::version_1());
        let own = InboundGroupSession::new(&session.session_key(), SessionConfig::version_1());
        Self { session, own }
    }

    /// The session id (base64).
    pub fn session_id(&self) -> String {
        self.session.session_id()
    }

    /// The index the next message gets.
    pub fn message_index(&self) -> u32 {
        self.session.message_index()
    }

    /// Encrypts one message; returns the encoded Megolm message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Vec<u8> {
        self.session.encrypt(plaintext).to_bytes()
    }

    /// The session key from `index` on (base64 of vodozemac's exported form), or `None` if `index` is
    /// before the start of the session's own copy.
    pub fn export_from(&mut self, index: u32) -> Option<String> {
        self.own.export_at(index).map(|k| k.to_base64())
    }

    /// The session key from the next message on: what a device that joins now may have.
    pub fn export_current(&mut self) -> Option<String> {
        let index = self.message_index();
        self.export_from(index)
    }

    /// Encrypted pickle (session and its own copy), for the store.
    pub fn pickle(&self, pickle_key: &[u8; 32]) -> String {
        format!(
            "{}|{}",
            self.session.pickle().encrypt(pickle_key),
            self.own.pickle().encrypt(pickle_key)
        )
    }

    /// Restores a session from [`OutboundGroupSession::pickle`].
    pub fn from_pickle(pickled: &str, pickle_key: &[u8; 32]) -> Result<Self, CryptoError> {
        let (s, o) = pickled.split_once('|').ok_or(CryptoError::Pickle)?;
        let session =
            GroupSessionPickle::from_encrypted(s, pickle_key).map_err(|_| CryptoError::Pickle)?;
        let own = InboundGroupSessionPickle::from_encrypted(o, pickle_key)
            .map_err(|_| CryptoError::Pickle)?;
        Ok(Self {
            session: GroupSession::from_pickle(session),
            own: InboundGroupSession::from_pickle(own),
        })
    }
}

/// Another device's group session, as far as we were given its key.
pub struct InboundSession(InboundGroupSession);

impl fmt::Debug for InboundSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundSession")
            .field("session_id", &self.0.session_id())
            .field("first_known_index", &self.0.first_known_index())
            .finish_non_exhaustive()
    }
}

impl InboundSession {
    /// Imports an exported session key (base64).
    pub fn import(key: &str) -> Result<Self, CryptoError> {
        let key = ExportedSessionKey::from_base64(key).map_err(|_| CryptoError::InvalidKey)?;
        Ok(Self(InboundGroupSession::import(
            &key,
            SessionConfig::version_1(),
        )))
    }

    /// The session id (base64).
    pub fn session_id(&self) -> String {
        self.0.session_id()
    }

    /// The first message index this copy can decrypt.
    pub fn first_known_index(&self) -> u32 {
        self.0.first_known_index()
    }

    /// Decrypts an encoded Megolm message; returns the plaintext and the message's index.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<(Vec<u8>, u32), CryptoError> {
        let msg = MegolmMessage::from_bytes(message).map_err(|_| CryptoError::Decrypt)?;
        let d = self.0.decrypt(&msg).map_err(|_| CryptoError::Decrypt)?;
        Ok((d.plaintext, d.message_index))
    }

    /// The index an encoded Megolm message claims (before decrypting it).
    pub fn message_index(message: &[u8]) -> Option<u32> {
        MegolmMessage::from_bytes(message)
            .ok()
            .map(|m| m.message_index())
    }

    /// Encrypted pickle, for the store.
    pub fn pickle(&self, pickle_key: &[u8; 32]) -> String {
        self.0.pickle().encrypt(pickle_key)
    }

    /// Restores a session from [`InboundSession::pickle`].
    pub fn from_pickle(pickled: &str, pickle_key: &[u8; 32]) -> Result<Self, CryptoError> {
        let p = InboundGroupSessionPickle::from_encrypted(pickled, pickle_key)
            .map_err(|_| CryptoError::Pickle)?;
        Ok(Self(InboundGroupSession::from_pickle(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_joiners_read_from_their_index_only() {
        let key = [7u8; 32];
        let mut out = OutboundGroupSession::new();
        let first = out.encrypt(b"before");
        let shared = out.export_current().unwrap();
        let second = out.encrypt(b"after");
        let mut out = OutboundGroupSession::from_pickle(&out.pickle(&key), &key).unwrap();
        let third = out.encrypt(b"later");

        let mut late = InboundSession::import(&shared).unwrap();
        assert_eq!(late.session_id(), out.session_id());
        assert_eq!(late.first_known_index(), 1);
        assert!(late.decrypt(&first).is_err());
        assert_eq!(late.decrypt(&second).unwrap(), (b"after".to_vec(), 1));
        let mut late = InboundSession::from_pickle(&late.pickle(&key), &key).unwrap();
        assert_eq!(late.decrypt(&third).unwrap(), (b"later".to_vec(), 2));
        assert_eq!(InboundSession::message_index(&third), Some(2));

        let mut all = InboundSession::import(&out.export_from(0).unwrap()).unwrap();
        assert_eq!(all.decrypt(&first).unwrap().0, b"before");
        assert!(InboundSession::import("not a key").is_err());
        assert!(OutboundGroupSession::from_pickle("x|y", &key).is_err());
    }
}
