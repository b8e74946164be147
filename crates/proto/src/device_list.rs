//! The signed device list: which devices belong to an account, with their keys, in a form the account key
//! signs. Also the exact byte strings every signature in the key hierarchy covers, so that signer and
//! verifier cannot disagree. Signing and verifying live in natter-crypto; this module only says *what*
//! is signed.

use std::collections::BTreeSet;

use crate::error::ProtoError;
use crate::ids::{DeviceId, PhoneNumber};
use crate::limits::{MAX_DEVICES_PER_ACCOUNT, MAX_SHORT_TEXT};

/// The list an account key signs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceListContent {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// Grows with every change; a list whose version goes backwards is refused.
    #[prost(uint64, tag = "2")]
    pub version: u64,
    /// When the primary signed it, ms since the Unix epoch.
    #[prost(uint64, tag = "3")]
    pub timestamp_ms: u64,
    /// The account's Ed25519 identity key (32 bytes), repeated so the list stands on its own.
    #[prost(bytes = "vec", tag = "4")]
    pub account_key: Vec<u8>,
    /// The devices, primary first.
    #[prost(message, repeated, tag = "5")]
    pub devices: Vec<DeviceEntry>,
}

/// One device on the list, with the signatures binding it to the account both ways.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceEntry {
    /// Device id (1 = primary).
    #[prost(uint32, tag = "1")]
    pub device_id: u32,
    /// Olm identity key, Curve25519 (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub identity_curve: Vec<u8>,
    /// Device signing key, Ed25519 (32 bytes).
    #[prost(bytes = "vec", tag = "3")]
    pub identity_ed: Vec<u8>,
    /// Noise static public key: the device's login credential (32 bytes).
    #[prost(bytes = "vec", tag = "4")]
    pub noise_key: Vec<u8>,
    /// Name the user knows the device by ("phone", "laptop").
    #[prost(string, tag = "5")]
    pub name: String,
    /// Account key's signature over [`device_signing_input`].
    #[prost(bytes = "vec", tag = "6")]
    pub account_signature: Vec<u8>,
    /// Device key's signature over [`account_binding_input`].
    #[prost(bytes = "vec", tag = "7")]
    pub device_signature: Vec<u8>,
}

const KEY_LEN: usize = 32;
const SIG_LEN: usize = 64;

impl DeviceListContent {
    /// Checks the structure (sizes, ids, counts); signatures are natter-crypto's job.
    pub fn validate(&self) -> Result<(), ProtoError> {
        PhoneNumber::from_e164(&self.phone)?;
        if self.account_key.len() != KEY_LEN {
            return Err(ProtoError::Invalid {
                what: "account key",
            });
        }
        if self.devices.len() > MAX_DEVICES_PER_ACCOUNT {
            return Err(ProtoError::LimitExceeded {
                what: "devices per account",
                len: self.devices.len(),
                max: MAX_DEVICES_PER_ACCOUNT,
            });
        }
        let mut seen = BTreeSet::new();
        for d in &self.devices {
            let id = DeviceId::new(d.device_id)?;
            if !seen.insert(id) {
                return Err(ProtoError::Invalid {
                    what: "duplicate device id",
                });
            }
            let sizes_ok = d.identity_curve.len() == KEY_LEN
                && d.identity_ed.len() == KEY_LEN
                && d.noise_key.len() == KEY_LEN
                && d.account_signature.len() == SIG_LEN
                && d.device_signature.len() == SIG_LEN;
            if !sizes_ok {
                return Err(ProtoError::Invalid {
                    what: "device keys",
                });
            }
            if d.name.len() > MAX_SHORT_TEXT {
                return Err(ProtoError::LimitExceeded {
                    what: "device name",
                    len: d.name.len(),
                    max: MAX_SHORT_TEXT,
                });
            }
        }
        if !seen.contains(&DeviceId::PRIMARY) {
            return Err(ProtoError::Missing("primary device"));
        }
        Ok(())
    }

    /// The entry of one device.
    pub fn device(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| d.device_id == id.get())
    }
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    // Length-prefixed so that no two different field sequences give the same bytes.
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

/// What the account key signs to publish a device list: a domain tag and the encoded content.
pub fn list_signing_input(content: &[u8]) -> Vec<u8> {
    let mut out = b"natter/device-list/v1\0".to_vec();
    push_field(&mut out, content);
    out
}

/// What the account key signs to admit one device.
pub fn device_signing_input(phone: &str, entry: &DeviceEntry) -> Vec<u8> {
    let mut out = b"natter/device/v1\0".to_vec();
    push_field(&mut out, phone.as_bytes());
    push_field(&mut out, &entry.device_id.to_be_bytes());
    push_field(&mut out, &entry.identity_curve);
    push_field(&mut out, &entry.identity_ed);
    push_field(&mut out, &entry.noise_key);
    out
}

/// What a device signs to accept the account key it belongs to.
pub fn account_binding_input(phone: &str, account_key: &[u8]) -> Vec<u8> {
    let mut out = b"natter/account-binding/v1\0".to_vec();
    push_field(&mut out, phone.as_bytes());
    push_field(&mut out, account_key);
    out
}

/// What a device signs to publish a one-time or fallback key.
pub fn prekey_signing_input(key_id: &str, key: &[u8]) -> Vec<u8> {
    let mut out = b"natter/prekey/v1\0".to_vec();
    push_field(&mut out, key_id.as_bytes());
    push_field(&mut out, key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32) -> DeviceEntry {
        DeviceEntry {
            device_id: id,
            identity_curve: vec![1; 32],
            identity_ed: vec![2; 32],
            noise_key: vec![3; 32],
            name: "phone".into(),
            account_signature: vec![4; 64],
            device_signature: vec![5; 64],
        }
    }

    fn list(devices: Vec<DeviceEntry>) -> DeviceListContent {
        DeviceListContent {
            phone: "+15550000001".into(),
            version: 1,
            timestamp_ms: 0,
            account_key: vec![9; 32],
            devices,
        }
    }

    #[test]
    fn structure_is_checked() {
        assert!(list(vec![entry(1)]).validate().is_ok());
        assert!(list(vec![entry(2)]).validate().is_err(), "no primary");
        assert!(list(vec![entry(1), entry(1)]).validate().is_err());
        assert!(list((1..=6).map(entry).collect()).validate().is_err());
        let mut short = entry(1);
        short.identity_ed.pop();
        assert!(list(vec![short]).validate().is_err());
    }

    #[test]
    fn signing_inputs_are_unambiguous() {
        assert_ne!(
            prekey_signing_input("ab", b"c"),
            prekey_signing_input("a", b"bc")
        );
    }
}
