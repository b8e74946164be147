//! Media encryption: every file gets a fresh random 32-byte media key, expanded with HKDF-SHA256 (info
//! `natter/media/v1`) into an XChaCha20-Poly1305 key and a 19-byte nonce prefix. The file is cut into
//! [`MEDIA_CHUNK`]-byte chunks, each sealed with the RustCrypto STREAM construction
//! ([`StreamBE32`]: the nonce is the prefix, the chunk's index as a 32-bit big-endian counter and a
//! "last chunk" flag), so a reordered, dropped, truncated or altered chunk fails to decrypt. An empty
//! file is one empty last chunk, so the sizes match [`natter_proto::content::media_ciphertext_size`].
//!
//! Chunks are sealed and opened by index, so a transfer can resume at any chunk. Hashing the plaintext
//! and the ciphertext is the caller's job.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use hkdf::Hkdf;
use natter_proto::limits::{MEDIA_CHUNK, MEDIA_CHUNK_TAG};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::store_cipher::fill_random;

/// Length of a media key.
pub const MEDIA_KEY_LEN: usize = 32;
const MEDIA_INFO: &[u8] = b"natter/media/v1";
/// XChaCha20's 24-byte nonce less STREAM's 5 bytes (counter and flag).
const NONCE_PREFIX_LEN: usize = 19;

/// A fresh random media key.
///
/// # Panics
///
/// If the operating system's random number generator fails.
pub fn generate_media_key() -> Zeroizing<[u8; MEDIA_KEY_LEN]> {
    let mut key = Zeroizing::new([0u8; MEDIA_KEY_LEN]);
    fill_random(key.as_mut());
    key
}

/// Number of chunks a file of `size` plaintext bytes is cut into (at least one).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(MEDIA_CHUNK as u64).max(1)
}

/// Plaintext length of chunk `index` of a file of `size` bytes (0 for the empty file's only chunk).
pub fn chunk_plaintext_len(size: u64, index: u64) -> usize {
    let start = index.saturating_mul(MEDIA_CHUNK as u64);
    usize::try_from(size.saturating_sub(start).min(MEDIA_CHUNK as u64)).unwrap_or(MEDIA_CHUNK)
}

/// Size of one full encrypted chunk in the blob.
pub const CIPHERTEXT_CHUNK: usize = MEDIA_CHUNK + MEDIA_CHUNK_TAG;

/// Seals and opens the chunks of one media file. Holds derived key material; not `Debug`.
pub struct MediaCipher {
    stream: StreamBE32<XChaCha20Poly1305>,
    chunks: u64,
}

impl MediaCipher {
    /// A cipher for a file of `size` plaintext bytes under `key` (a 32-byte media key).
    pub fn new(key: &[u8], size: u64) -> Result<Self, CryptoError> {
        if key.len() != MEDIA_KEY_LEN {
            return Err(CryptoError::InvalidKey);
        }
        let hk = Hkdf::<Sha256>::new(None, key);
        let mut okm = Zeroizing::new([0u8; 32 + NONCE_PREFIX_LEN]);
        hk.expand(MEDIA_INFO, okm.as_mut())
            .map_err(|_| CryptoError::InvalidKey)?;
        let (k, prefix) = okm.split_at(32);
        let aead = XChaCha20Poly1305::new_from_slice(k).map_err(|_| CryptoError::InvalidKey)?;
        let stream = StreamBE32::from_aead(aead, prefix.into());
        let chunks = chunk_count(size);
        if chunks > u64::from(u32::MAX) {
            return Err(CryptoError::Encrypt);
        }
        Ok(Self { stream, chunks })
    }

    /// Number of chunks of the file.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    fn position(&self, index: u64) -> Result<(u32, bool), CryptoError> {
        if index >= self.chunks {
            return Err(CryptoError::Decrypt);
        }
        let pos = u32::try_from(index).map_err(|_| CryptoError::Decrypt)?;
        Ok((pos, index + 1 == self.chunks))
    }

    /// Encrypts chunk `index` in place: `buf` holds its plaintext (exactly
    /// [`chunk_plaintext_len`] bytes) and afterwards its ciphertext (16 bytes longer).
    pub fn encrypt_chunk(&self, index: u64, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        let (pos, last) = self.position(index).map_err(|_| CryptoError::Encrypt)?;
        if buf.len() > MEDIA_CHUNK || (!last && buf.len() != MEDIA_CHUNK) {
            return Err(CryptoError::Encrypt);
        }
        self.stream
            .encrypt_in_place(pos, last, &[], buf)
            .map_err(|_| CryptoError::Encrypt)
    }

    /// Decrypts chunk `index` in place, verifying it: its position, whether it is the last chunk, and
    /// every byte. Any failure is [`CryptoError::Decrypt`] and leaves `buf` unspecified.
    pub fn decrypt_chunk(&self, index: u64, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        let (pos, last) = self.position(index)?;
        if buf.len() < MEDIA_CHUNK_TAG || buf.len() > CIPHERTEXT_CHUNK {
            return Err(CryptoError::Decrypt);
        }
        self.stream
            .decrypt_in_place(pos, last, &[], buf)
            .map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_proto::content::media_ciphertext_size;

    fn encrypt_all(key: &[u8], data: &[u8]) -> Vec<Vec<u8>> {
        let c = MediaCipher::new(key, data.len() as u64).unwrap();
        let mut out = Vec::new();
        for i in 0..c.chunks() {
            let start = (i as usize) * MEDIA_CHUNK;
            let len = chunk_plaintext_len(data.len() as u64, i);
            let mut buf = data[start..start + len].to_vec();
            c.encrypt_chunk(i, &mut buf).unwrap();
            out.push(buf);
        }
        out
    }

    fn decrypt_all(key: &[u8], size: u64, chunks: &[Vec<u8>]) -> Result<Vec<u8>, CryptoError> {
        let c = MediaCipher::new(key, size)?;
        // A reader expecting `c.chunks()` chunks finds one missing.
        if chunks.len() as u64 != c.chunks() {
            return Err(CryptoError::Decrypt);
        }
        let mut out = Vec::new();
        for (i, ch) in chunks.iter().enumerate() {
            let mut buf = ch.clone();
            c.decrypt_chunk(i as u64, &mut buf)?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_and_sizes() {
        let key = generate_media_key();
        for len in [
            0,
            1,
            MEDIA_CHUNK - 1,
            MEDIA_CHUNK,
            MEDIA_CHUNK + 1,
            3 * MEDIA_CHUNK + 5,
        ] {
            let d = data(len);
            let chunks = encrypt_all(key.as_ref(), &d);
            let total: usize = chunks.iter().map(Vec::len).sum();
            assert_eq!(total as u64, media_ciphertext_size(len as u64), "len {len}");
            assert_eq!(chunks.len() as u64, chunk_count(len as u64));
            assert_eq!(decrypt_all(key.as_ref(), len as u64, &chunks).unwrap(), d);
        }
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let key = generate_media_key();
        let d = data(2 * MEDIA_CHUNK + 10);
        let chunks = encrypt_all(key.as_ref(), &d);
        for (c, i) in [(0, 0), (0, 100), (1, MEDIA_CHUNK + 15), (2, 3)] {
            let mut bad = chunks.clone();
            bad[c][i] ^= 1;
            assert_eq!(
                decrypt_all(key.as_ref(), d.len() as u64, &bad),
                Err(CryptoError::Decrypt)
            );
        }
    }

    #[test]
    fn truncation_and_reordering_are_detected() {
        let key = generate_media_key();
        let d = data(3 * MEDIA_CHUNK);
        let chunks = encrypt_all(key.as_ref(), &d);
        // Missing last chunk, with the size claimed by the message.
        assert!(decrypt_all(key.as_ref(), d.len() as u64, &chunks[..2]).is_err());
        // Missing last chunk, with a size that would make the shorter blob complete.
        assert!(decrypt_all(key.as_ref(), 2 * MEDIA_CHUNK as u64, &chunks[..2]).is_err());
        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        assert!(decrypt_all(key.as_ref(), d.len() as u64, &swapped).is_err());
        // A chunk out of range is refused.
        let c = MediaCipher::new(key.as_ref(), d.len() as u64).unwrap();
        let mut buf = chunks[0].clone();
        assert!(c.decrypt_chunk(3, &mut buf).is_err());
    }

    #[test]
    fn wrong_key_is_refused_and_plaintext_does_not_show() {
        let key = generate_media_key();
        let d = b"PLAINTEXT-MARKER".repeat(10_000);
        let chunks = encrypt_all(key.as_ref(), &d);
        let other = generate_media_key();
        assert!(decrypt_all(other.as_ref(), d.len() as u64, &chunks).is_err());
        assert!(MediaCipher::new(&[0u8; 31], 1).is_err());
        assert!(
            !chunks
                .concat()
                .windows(16)
                .any(|w| w == b"PLAINTEXT-MARKER")
        );
        // Random access: chunk 1 alone decrypts.
        let c = MediaCipher::new(key.as_ref(), d.len() as u64).unwrap();
        let mut buf = chunks[1].clone();
        c.decrypt_chunk(1, &mut buf).unwrap();
        assert_eq!(buf, d[MEDIA_CHUNK..2 * MEDIA_CHUNK]);
    }
}
