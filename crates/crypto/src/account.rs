//! The account identity key (Ed25519): created on the primary device at registration, it signs the
//! account's device list and admits each device. Safety numbers derive from it.

use std::fmt;

use vodozemac::{Ed25519PublicKey, Ed25519SecretKey, Ed25519Signature};
use zeroize::{Zeroize, Zeroizing};

use crate::error::CryptoError;

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The account's Ed25519 identity key pair. The secret half is zeroized on drop and never shown by
/// `Debug`.
pub struct AccountKey {
    secret: Ed25519SecretKey,
    public: Ed25519PublicKey,
}

impl AccountKey {
    /// Creates a new random account key.
    pub fn generate() -> Self {
        let secret = Ed25519SecretKey::new();
        let public = secret.public_key();
        Self { secret, public }
    }

    /// The public key (32 bytes).
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Signs `msg` (Ed25519).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.secret.sign(msg).to_bytes()
    }

    /// The 32-byte secret seed, for storing (encrypted) on the primary device.
    pub fn to_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        let mut boxed = self.secret.to_bytes();
        let out = Zeroizing::new(*boxed);
        boxed.zeroize();
        out
    }

    /// Restores the key from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Result<Self, CryptoError> {
        let secret = Ed25519SecretKey::from_slice(secret);
        let public = secret.public_key();
        Ok(Self { secret, public })
    }
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountKey")
            .field("public_key", &self.public.to_base64())
            .finish_non_exhaustive()
    }
}

/// Verifies an Ed25519 signature (strict verification). Wrong lengths or an invalid public key give
/// [`CryptoError::InvalidKey`] / [`CryptoError::BadSignature`].
pub fn verify_signature(
    public_key: &[u8],
    msg: &[u8],
    signature: &[u8],
) -> Result<(), CryptoError> {
    let key: &[u8; PUBLIC_KEY_LEN] = public_key.try_into().map_err(|_| CryptoError::InvalidKey)?;
    let key = Ed25519PublicKey::from_slice(key).map_err(|_| CryptoError::InvalidKey)?;
    if signature.len() != SIGNATURE_LEN {
        return Err(CryptoError::BadSignature);
    }
    let signature =
        Ed25519Signature::from_slice(signature).map_err(|_| CryptoError::BadSignature)?;
    key.verify(msg, &signature)
        .map_err(|_| CryptoError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_restore() {
        let key = AccountKey::generate();
        let sig = key.sign(b"hello");
        verify_signature(&key.public_key(), b"hello", &sig).unwrap();
        assert_eq!(
            verify_signature(&key.public_key(), b"hellO", &sig),
            Err(CryptoError::BadSignature)
        );
        assert_eq!(
            verify_signature(&key.public_key()[..31], b"hello", &sig),
            Err(CryptoError::InvalidKey)
        );
        assert_eq!(
            verify_signature(&key.public_key(), b"hello", &sig[..63]),
            Err(CryptoError::BadSignature)
        );
        let other = AccountKey::generate();
        assert_eq!(
            verify_signature(&other.public_key(), b"hello", &sig),
            Err(CryptoError::BadSignature)
        );

        let restored = AccountKey::from_secret_bytes(&key.to_secret_bytes()).unwrap();
        assert_eq!(restored.public_key(), key.public_key());
        verify_signature(&key.public_key(), b"x", &restored.sign(b"x")).unwrap();
    }

    #[test]
    fn debug_shows_no_secret() {
        let key = AccountKey::generate();
        let secret = key.to_secret_bytes();
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(&format!("{:?}", &secret[..])));
        assert!(!dbg.contains(&vodozemac::base64_encode(&secret[..])));
        assert!(
            !dbg.contains(
                &secret
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        );
        assert!(dbg.contains(&vodozemac::base64_encode(key.public_key())));
    }
}
