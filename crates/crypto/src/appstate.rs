//! App-state sync cryptography: per sync key, HKDF-SHA256 derives an index MAC key, a value encryption
//! key, a value MAC key, a snapshot MAC key and a patch MAC key. A mutation's index is HMAC'd (the server
//! cannot read it), its index and value are encrypted with XChaCha20-Poly1305 and its value MAC covers
//! op, key id and ciphertext. The state of a collection is summarised by an [`LtHash`] (WhatsApp's
//! construction: 128 bytes = 64 little-endian `u16` lanes; each live value MAC is HKDF-expanded to 128
//! bytes and added lane-wise, wrapping; removing subtracts), so the order of mutations does not matter.
//! A snapshot MAC binds the LTHash to a version and a collection; a patch MAC binds a snapshot MAC to the
//! patch's value MACs. A server that drops, reorders, replays or forges mutations cannot produce them.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use natter_proto::wire::AppStateMutation;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::store_cipher::fill_random;

type HmacSha256 = Hmac<Sha256>;

const NONCE_LEN: usize = 24;
/// Bytes of an [`LtHash`].
pub const LTHASH_LEN: usize = 128;
/// Bytes of a sync key id.
pub const KEY_ID_LEN: usize = 8;

/// Why an app-state mutation, patch or snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppStateError {
    /// A field has the wrong length or an unknown op.
    #[error("malformed mutation")]
    Malformed,
    /// The mutation was made with another sync key than the one given.
    #[error("mutation made with another sync key")]
    WrongKey,
    /// The value MAC does not match op, key id and ciphertext.
    #[error("value MAC does not verify")]
    ValueMac,
    /// The value does not decrypt.
    #[error("value does not decrypt")]
    Decrypt,
    /// The index MAC does not match the decrypted index.
    #[error("index MAC does not verify")]
    IndexMac,
    /// The state after applying does not match the snapshot MAC.
    #[error("snapshot MAC does not verify")]
    SnapshotMac,
    /// The patch MAC does not match the patch.
    #[error("patch MAC does not verify")]
    PatchMac,
}

/// Set or remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set the index to a value.
    Set,
    /// Remove the index.
    Remove,
}

impl Op {
    /// Wire value (0 set, 1 remove).
    pub fn code(self) -> u32 {
        match self {
            Op::Set => 0,
            Op::Remove => 1,
        }
    }

    /// From the wire value.
    pub fn from_code(code: u32) -> Result<Self, AppStateError> {
        match code {
            0 => Ok(Op::Set),
            1 => Ok(Op::Remove),
            _ => Err(AppStateError::Malformed),
        }
    }
}

fn expand(ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    #[allow(
        clippy::expect_used,
        reason = "HKDF-SHA256 can output up to 8160 bytes; 32 always fits"
    )]
    hk.expand(info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    #[allow(clippy::expect_used, reason = "HMAC accepts keys of any length")]
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// One sync key with its derived keys. Never shown by `Debug`; zeroized on drop.
pub struct SyncKey {
    id: [u8; KEY_ID_LEN],
    key: Zeroizing<[u8; 32]>,
    index: Zeroizing<[u8; 32]>,
    value_enc: Zeroizing<[u8; 32]>,
    value_mac: Zeroizing<[u8; 32]>,
    snapshot_mac: Zeroizing<[u8; 32]>,
    patch_mac: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SyncKey {
    /// A new random key with a random id.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn generate() -> Self {
        let mut id = [0u8; KEY_ID_LEN];
        fill_random(&mut id);
        let mut key = [0u8; 32];
        fill_random(&mut key);
        Self::from_parts(id, key)
    }

    /// From a stored or shared id and key.
    pub fn from_parts(id: [u8; KEY_ID_LEN], key: [u8; 32]) -> Self {
        let key = Zeroizing::new(key);
        Self {
            id,
            index: expand(key.as_ref(), b"natter/appstate/v1/index-mac"),
            value_enc: expand(key.as_ref(), b"natter/appstate/v1/value-enc"),
            value_mac: expand(key.as_ref(), b"natter/appstate/v1/value-mac"),
            snapshot_mac: expand(key.as_ref(), b"natter/appstate/v1/snapshot-mac"),
            patch_mac: expand(key.as_ref(), b"natter/appstate/v1/patch-mac"),
            key,
        }
    }

    /// From wire bytes (8-byte id, 32-byte key).
    pub fn from_slices(id: &[u8], key: &[u8]) -> Result<Self, AppStateError> {
        let id: [u8; KEY_ID_LEN] = id.try_into().map_err(|_| AppStateError::Malformed)?;
        let key: [u8; 32] = key.try_into().map_err(|_| AppStateError::Malformed)?;
        Ok(Self::from_parts(id, key))
    }

    /// The key id.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    /// The raw key, for sharing over Olm and storing encrypted.
    pub fn key_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.key.clone()
    }

    /// HMAC of an index under this key.
    pub fn index_mac(&self, index: &[u8]) -> [u8; 32] {
        hmac(&self.index, &[index])
    }

    fn value_mac_of(&self, op: u32, blob: &[u8]) -> [u8; 32] {
        hmac(&self.value_mac, &[&op.to_be_bytes(), &self.id, blob])
    }

    /// Encrypts one mutation: `value` is ignored (may be empty) for [`Op::Remove`].
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn encrypt_mutation(&self, op: Op, index: &[u8], value: &[u8]) -> AppStateMutation {
        let index_mac = self.index_mac(index);
        let mut plain = Zeroizing::new(Vec::with_capacity(4 + index.len() + value.len()));
        plain.extend_from_slice(&(index.len() as u32).to_be_bytes());
        plain.extend_from_slice(index);
        plain.extend_from_slice(value);
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let aad = [&op.code().to_be_bytes()[..], &self.id, &index_mac].concat();
        #[allow(
            clippy::expect_used,
            reason = "XChaCha20-Poly1305 only fails for plaintexts over 256 GiB"
        )]
        let ct = XChaCha20Poly1305::new(self.value_enc.as_ref().into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .expect("plaintext within XChaCha20-Poly1305 limits");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        let value_mac = self.value_mac_of(op.code(), &blob);
        AppStateMutation {
            op: op.code(),
            index_mac: index_mac.to_vec(),
            value_blob: blob,
            value_mac: value_mac.to_vec(),
            key_id: self.id.to_vec(),
        }
    }

    /// Verifies and decrypts one mutation made with this key.
    pub fn decrypt_mutation(&self, m: &AppStateMutation) -> Result<Mutation, AppStateError> {
        let op = Op::from_code(m.op)?;
        if m.key_id.as_slice() != self.id {
            return Err(AppStateError::WrongKey);
        }
        if m.value_mac.len() != 32 || m.index_mac.len() != 32 || m.value_blob.len() < NONCE_LEN {
            return Err(AppStateError::Malformed);
        }
        if !ct_eq(&self.value_mac_of(m.op, &m.value_blob), &m.value_mac) {
            return Err(AppStateError::ValueMac);
        }
        let (nonce, ct) = m.value_blob.split_at(NONCE_LEN);
        let aad = [&m.op.to_be_bytes()[..], &self.id, &m.index_mac].concat();
        let plain = XChaCha20Poly1305::new(self.value_enc.as_ref().into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| AppStateError::Decrypt)?;
        let (len, rest) = plain.split_at_checked(4).ok_or(AppStateError::Malformed)?;
        let len =
            u32::from_be_bytes(len.try_into().map_err(|_| AppStateError::Malformed)?) as usize;
        let (index, value) = rest.split_at_checked(len).ok_or(AppStateError::Malformed)?;
        if !ct_eq(&self.index_mac(index), &m.index_mac) {
            return Err(AppStateError::IndexMac);
        }
        Ok(Mutation {
            op,
            index: index.to_vec(),
            value: value.to_vec(),
        })
    }

    /// MAC over an LTHash, a version and a collection name.
    pub fn snapshot_mac(&self, lthash: &LtHash, version: u64, collection: &str) -> [u8; 32] {
        hmac(
            &self.snapshot_mac,
            &[&lthash.0, &version.to_be_bytes(), collection.as_bytes()],
        )
    }

    /// MAC over a snapshot MAC, a patch's value MACs, its version and the collection name.
    pub fn patch_mac(
        &self,
        snapshot_mac: &[u8],
        value_macs: &[&[u8]],
        version: u64,
        collection: &str,
    ) -> [u8; 32] {
        #[allow(clippy::expect_used, reason = "HMAC accepts keys of any length")]
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.patch_mac.as_ref())
            .expect("HMAC takes any key length");
        mac.update(&(snapshot_mac.len() as u32).to_be_bytes());
        mac.update(snapshot_mac);
        mac.update(&(value_macs.len() as u32).to_be_bytes());
        for v in value_macs {
            mac.update(&(v.len() as u32).to_be_bytes());
            mac.update(v);
        }
        mac.update(&version.to_be_bytes());
        mac.update(collection.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Checks a snapshot MAC.
    pub fn verify_snapshot_mac(
        &self,
        lthash: &LtHash,
        version: u64,
        collection: &str,
        mac: &[u8],
    ) -> Result<(), AppStateError> {
        if ct_eq(&self.snapshot_mac(lthash, version, collection), mac) {
            Ok(())
        } else {
            Err(AppStateError::SnapshotMac)
        }
    }

    /// Checks a patch MAC.
    pub fn verify_patch_mac(
        &self,
        snapshot_mac: &[u8],
        value_macs: &[&[u8]],
        version: u64,
        collection: &str,
        mac: &[u8],
    ) -> Result<(), AppStateError> {
        if ct_eq(
            &self.patch_mac(snapshot_mac, value_macs, version, collection),
            mac,
        ) {
            Ok(())
        } else {
            Err(AppStateError::PatchMac)
        }
    }
}

/// A decrypted mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation {
    /// Set or remove.
    pub op: Op,
    /// The plaintext index.
    pub index: Vec<u8>,
    /// The plaintext value (empty for a remove).
    pub value: Vec<u8>,
}

/// A lattice (homomorphic) hash over a set of value MACs: 64 little-endian `u16` lanes.
#[derive(Clone, PartialEq, Eq)]
pub struct LtHash(pub [u8; LTHASH_LEN]);

impl Default for LtHash {
    fn default() -> Self {
        Self([0u8; LTHASH_LEN])
    }
}

impl std::fmt::Debug for LtHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LtHash(..)")
    }
}

impl LtHash {
    /// From stored bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, AppStateError> {
        Ok(Self(
            bytes.try_into().map_err(|_| AppStateError::Malformed)?,
        ))
    }

    fn lanes(value_mac: &[u8]) -> [u8; LTHASH_LEN] {
        let hk = Hkdf::<Sha256>::new(None, value_mac);
        let mut out = [0u8; LTHASH_LEN];
        #[allow(
            clippy::expect_used,
            reason = "HKDF-SHA256 can output up to 8160 bytes; 128 always fits"
        )]
        hk.expand(b"natter/appstate/v1/lthash", &mut out)
            .expect("128 bytes is a valid HKDF-SHA256 output length");
        out
    }

    fn apply(&mut self, value_mac: &[u8], add: bool) {
        let d = Self::lanes(value_mac);
        for (lane, delta) in self.0.chunks_exact_mut(2).zip(d.chunks_exact(2)) {
            let a = u16::from_le_bytes([lane[0], lane[1]]);
            let b = u16::from_le_bytes([delta[0], delta[1]]);
            let r = if add {
                a.wrapping_add(b)
            } else {
                a.wrapping_sub(b)
            };
            lane.copy_from_slice(&r.to_le_bytes());
        }
    }

    /// Adds a live value MAC.
    pub fn add(&mut self, value_mac: &[u8]) {
        self.apply(value_mac, true);
    }

    /// Removes a value MAC that was added.
    pub fn subtract(&mut self, value_mac: &[u8]) {
        self.apply(value_mac, false);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let k = SyncKey::generate();
        let m = k.encrypt_mutation(Op::Set, b"idx", b"value");
        let d = k.decrypt_mutation(&m).unwrap();
        assert_eq!(d.index, b"idx");
        assert_eq!(d.value, b"value");
        assert_eq!(d.op, Op::Set);
        let other = SyncKey::generate();
        assert_eq!(other.decrypt_mutation(&m), Err(AppStateError::WrongKey));
        let same_id = SyncKey::from_parts(k.id(), [7u8; 32]);
        assert_eq!(same_id.decrypt_mutation(&m), Err(AppStateError::ValueMac));
    }

    #[test]
    fn every_field_flip_is_caught() {
        let k = SyncKey::generate();
        let m = k.encrypt_mutation(Op::Set, b"idx", b"value");
        for i in 0..m.value_blob.len() {
            let mut t = m.clone();
            t.value_blob[i] ^= 1;
            assert!(k.decrypt_mutation(&t).is_err());
        }
        for i in 0..32 {
            let mut t = m.clone();
            t.value_mac[i] ^= 1;
            assert_eq!(k.decrypt_mutation(&t), Err(AppStateError::ValueMac));
            let mut t = m.clone();
            t.index_mac[i] ^= 1;
            assert!(k.decrypt_mutation(&t).is_err());
        }
        let mut t = m.clone();
        t.op = 1;
        assert_eq!(k.decrypt_mutation(&t), Err(AppStateError::ValueMac));
    }

    #[test]
    fn lthash_is_order_independent_and_subtracts() {
        let macs: Vec<[u8; 32]> = (0u8..10).map(|i| [i; 32]).collect();
        let mut a = LtHash::default();
        for m in &macs {
            a.add(m);
        }
        let mut b = LtHash::default();
        for m in macs.iter().rev() {
            b.add(m);
        }
        assert_eq!(a, b);
        for m in &macs {
            b.subtract(m);
        }
        assert_eq!(b, LtHash::default());
        let mut c = a.clone();
        c.add(&[99u8; 32]);
        assert_ne!(a, c);
        c.subtract(&[99u8; 32]);
        assert_eq!(a, c);
    }

    #[test]
    fn snapshot_and_patch_macs_catch_flips() {
        let k = SyncKey::generate();
        let mut h = LtHash::default();
        h.add(&[1u8; 32]);
        let s = k.snapshot_mac(&h, 3, "contacts");
        k.verify_snapshot_mac(&h, 3, "contacts", &s).unwrap();
        assert!(k.verify_snapshot_mac(&h, 4, "contacts", &s).is_err());
        assert!(k.verify_snapshot_mac(&h, 3, "chat_settings", &s).is_err());
        for i in 0..LTHASH_LEN {
            let mut t = h.clone();
            t.0[i] ^= 1;
            assert_eq!(
                k.verify_snapshot_mac(&t, 3, "contacts", &s),
                Err(AppStateError::SnapshotMac)
            );
        }
        for i in 0..32 {
            let mut t = s;
            t[i] ^= 1;
            assert!(k.verify_snapshot_mac(&h, 3, "contacts", &t).is_err());
        }
        let v1 = [5u8; 32];
        let v2 = [6u8; 32];
        let p = k.patch_mac(&s, &[&v1, &v2], 3, "contacts");
        k.verify_patch_mac(&s, &[&v1, &v2], 3, "contacts", &p)
            .unwrap();
        assert!(
            k.verify_patch_mac(&s, &[&v2, &v1], 3, "contacts", &p)
                .is_err()
        );
        assert!(k.verify_patch_mac(&s, &[&v1], 3, "contacts", &p).is_err());
        assert!(
            k.verify_patch_mac(&s, &[&v1, &v2], 2, "contacts", &p)
                .is_err()
        );
        for i in 0..32 {
            let mut t = p;
            t[i] ^= 1;
            assert_eq!(
                k.verify_patch_mac(&s, &[&v1, &v2], 3, "contacts", &t),
                Err(AppStateError::PatchMac)
            );
            let mut sv = s;
            sv[i] ^= 1;
            assert!(
                k.verify_patch_mac(&sv, &[&v1, &v2], 3, "contacts", &p)
                    .is_err()
            );
        }
    }
}
