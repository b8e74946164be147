//! Sealing for companion linking: the QR code's one-time secret is expanded with HKDF-SHA256 into a
//! key for XChaCha20-Poly1305 ([`crate::StoreCipher`]'s construction), and every sealed payload is bound
//! to the link reference. The server relays sealed payloads but cannot read or forge them.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::CryptoError;
use crate::store_cipher::StoreCipher;

const LINK_KEY_INFO: &[u8] = b"natter/link-key/v1";

fn cipher(secret: &[u8; 32]) -> Result<StoreCipher, CryptoError> {
    let hk = Hkdf::<Sha256>::new(None, secret);
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand(LINK_KEY_INFO, key.as_mut())
        .map_err(|_| CryptoError::InvalidKey)?;
    Ok(StoreCipher::from_key(*key))
}

/// Seals `plaintext` for the other side of the link session `reference`.
pub fn seal(secret: &[u8; 32], reference: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    Ok(cipher(secret)?.encrypt(reference, plaintext))
}

/// Opens a payload sealed with [`seal`]; fails if the secret, the reference or a byte differs.
pub fn open(
    secret: &[u8; 32],
    reference: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    cipher(secret)?.decrypt(reference, sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_payloads_open_only_with_the_secret_and_reference() {
        let secret = [7u8; 32];
        let sealed = seal(&secret, b"ref-1", b"offer").unwrap();
        assert_eq!(
            open(&secret, b"ref-1", &sealed).unwrap().as_slice(),
            b"offer"
        );
        assert!(open(&[8u8; 32], b"ref-1", &sealed).is_err());
        assert!(open(&secret, b"ref-2", &sealed).is_err());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(open(&secret, b"ref-1", &flipped).is_err());
        assert!(!sealed.windows(5).any(|w| w == b"offer"));
    }
}
