//! Natter's end-to-end cryptography: the account identity key ([`account`]), each device's Olm account
//! and prekeys ([`device`]), Olm sessions ([`session`]), the signed device list ([`device_list`]),
//! Megolm group sessions ([`megolm`]), safety numbers ([`safety`]), media file encryption ([`media`]), sealing for companion linking ([`link`]) and encryption at rest for the
//! client store ([`store_cipher`]), and app-state sync MACs, LTHash and value encryption ([`appstate`]).
//!
//! Olm and Ed25519 come from vodozemac; symmetric encryption from RustCrypto. Keys cross this crate's
//! boundary only as byte arrays. The crate is synchronous, does no I/O and does no logging.

pub mod account;
pub mod appstate;
pub mod device;
pub mod device_list;
pub mod error;
pub mod link;
pub mod media;
pub mod megolm;
pub mod profile;
pub mod safety;
pub mod session;
pub mod store_cipher;

pub use account::{AccountKey, verify_signature};
pub use device::DeviceKeys;
pub use device_list::{
    VerifiedDeviceList, admit_device, device_binding_signature, new_device_entry, sign_device_list,
    verify_device_entry, verify_device_list,
};
pub use error::CryptoError;
pub use safety::safety_number;
pub use session::{OlmCiphertext, OlmSession};
pub use store_cipher::StoreCipher;
