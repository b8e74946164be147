//! The error type of natter-crypto: typed, coarse where detail would help an attacker (decryption).

/// What went wrong in a cryptographic operation.
///
/// Decryption and session failures are deliberately coarse: they never carry vodozemac's internal
/// details, which would tell a peer (or an attacker) more than "this did not decrypt".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A public or secret key has the wrong length or is not a valid curve point.
    #[error("invalid key")]
    InvalidKey,
    /// A signature is malformed or does not verify with the expected key.
    #[error("bad signature")]
    BadSignature,
    /// A device list is malformed or inconsistent; none of its devices may be used.
    #[error("invalid device list: {0}")]
    InvalidDeviceList(String),
    /// A device list is older than one already seen: the server may be replaying an old list.
    #[error(
        "device list rollback refused: version {offered} is older than the known version {known}"
    )]
    Rollback {
        /// The lowest version still accepted (the newest one seen).
        known: u64,
        /// The version offered.
        offered: u64,
    },
    /// A device list names an account key other than the one trusted for this account.
    #[error(
        "the device list is signed for an account key we do not trust (the account key changed)"
    )]
    UntrustedAccountKey,
    /// An Olm session could not be created (unknown or used-up one-time key, malformed pre-key
    /// message, wrong identity key).
    #[error("could not create an encrypted session")]
    Session,
    /// A message could not be decrypted (malformed, tampered with, replayed or for another session).
    #[error("message could not be decrypted")]
    Decrypt,
    /// A message could not be encrypted.
    #[error("message could not be encrypted")]
    Encrypt,
    /// A pickle could not be restored (wrong pickle key or corrupted data).
    #[error("stored key material could not be restored: wrong key or corrupted data")]
    Pickle,
}
