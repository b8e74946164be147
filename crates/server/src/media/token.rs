//! Blob tokens: stateless, short-lived permissions to upload or download one blob as one account.
//!
//! A token is `base64url(expiry_ms as 8 bytes big-endian || HMAC-SHA256(key, input))` where `input` is
//! `"natter/blob-token/v1"` followed by the direction (`up`/`down`), the blob id, the account's E.164 number
//! and the expiry, each field preceded by its length as a 4-byte big-endian integer (so no two field
//! lists give the same input). The key is the server's 32-byte blob secret (`data_dir/blob.key`). The
//! HTTP service recomputes the MAC for the request's blob, account and direction and compares it in
//! constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"natter/blob-token/v1";
/// Bytes of a decoded token: expiry (8) and MAC (32).
const TOKEN_BYTES: usize = 8 + 32;

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `PUT` and `HEAD`: upload the blob.
    Up,
    /// `GET`: download the blob.
    Down,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::Up => b"up",
            Direction::Down => b"down",
        }
    }

    fn other(self) -> Direction {
        match self {
            Direction::Up => Direction::Down,
            Direction::Down => Direction::Up,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all (bad encoding or length).
    #[error("malformed token")]
    Malformed,
    /// The token's time is up; ask for a new grant.
    #[error("token expired; request a new grant")]
    Expired,
    /// The token is for the other direction (an upload token used to download, or the reverse).
    #[error("token not valid for this operation (upload vs download)")]
    WrongDirection,
    /// The token was made for another account or another blob, or was altered.
    #[error("token not valid for this account and blob")]
    Mismatch,
}

/// The server's blob-token secret.
pub struct TokenKey {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from its 32 bytes.
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key: Zeroizing::new(key),
        }
    }

    fn mac(&self, dir: Direction, blob_id: &str, phone: &str, expiry_ms: u64) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
        let mut mac = match HmacSha256::new_from_slice(self.key.as_slice()) {
            Ok(mac) => mac,
            Err(_) => return [0; 32],
        };
        mac.update(DOMAIN);
        for field in [dir.label(), blob_id.as_bytes(), phone.as_bytes()] {
            mac.update(&(field.len() as u32).to_be_bytes());
            mac.update(field);
        }
        mac.update(&8u32.to_be_bytes());
        mac.update(&expiry_ms.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A token for `phone` to transfer `blob_id` in direction `dir` until `expiry_ms` (ms since epoch).
    pub fn issue(&self, dir: Direction, blob_id: &str, phone: &str, expiry_ms: u64) -> String {
        let mut raw = [0u8; TOKEN_BYTES];
        raw[..8].copy_from_slice(&expiry_ms.to_be_bytes());
        raw[8..].copy_from_slice(&self.mac(dir, blob_id, phone, expiry_ms));
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a token for a request by `phone` in direction `dir` on `blob_id` at `now_ms`.
    pub fn verify(
        &self,
        token: &str,
        dir: Direction,
        blob_id: &str,
        phone: &str,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        let raw = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() != TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&raw[..8]);
        let expiry_ms = u64::from_be_bytes(expiry);
        let given = &raw[8..];
        if bool::from(
            self.mac(dir, blob_id, phone, expiry_ms)
                .as_slice()
                .ct_eq(given),
        ) {
            return if expiry_ms <= now_ms {
                Err(TokenError::Expired)
            } else {
                Ok(())
            };
        }
        if bool::from(
            self.mac(dir.other(), blob_id, phone, expiry_ms)
                .as_slice()
                .ct_eq(given),
        ) {
            return Err(TokenError::WrongDirection);
        }
        Err(TokenError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &str = "00112233445566778899aabbccddeeff";
    const ME: &str = "+15550001111";

    #[test]
    fn valid_and_refused() {
        let k = TokenKey::new([7; 32]);
        let t = k.issue(Direction::Up, BLOB, ME, 10_000);
        assert_eq!(k.verify(&t, Direction::Up, BLOB, ME, 9_999), Ok(()));
        assert_eq!(
            k.verify(&t, Direction::Up, BLOB, ME, 10_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            k.verify(&t, Direction::Up, BLOB, "+15550002222", 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify(&t, Direction::Up, "ffeeddccbbaa99887766554433221100", ME, 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify(&t, Direction::Down, BLOB, ME, 0),
            Err(TokenError::WrongDirection)
        );
        let d = k.issue(Direction::Down, BLOB, ME, 10_000);
        assert_eq!(k.verify(&d, Direction::Down, BLOB, ME, 0), Ok(()));
        assert_ne!(d, t);
        // Another server's key.
        assert_eq!(
            TokenKey::new([8; 32]).verify(&t, Direction::Up, BLOB, ME, 0),
            Err(TokenError::Mismatch)
        );
    }

    #[test]
    fn tampered_and_malformed() {
        let k = TokenKey::new([7; 32]);
        let t = k.issue(Direction::Down, BLOB, ME, 10_000);
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        // A later expiry invalidates the MAC.
        raw[7] ^= 1;
        let longer = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            k.verify(&longer, Direction::Down, BLOB, ME, 0),
            Err(TokenError::Mismatch)
        );
        raw[7] ^= 1;
        raw[20] ^= 0x80;
        let flipped = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            k.verify(&flipped, Direction::Down, BLOB, ME, 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify("not a token!", Direction::Down, BLOB, ME, 0),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            k.verify(&t[..20], Direction::Down, BLOB, ME, 0),
            Err(TokenError::Malformed)
        );
    }
}
