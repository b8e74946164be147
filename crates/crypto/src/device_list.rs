//! The signature chain of the device list (ARCHITECTURE.md, "Identities and keys"): the account key
//! signs each device's keys ([`device_signing_input`]), each device counter-signs the account key
//! ([`account_binding_input`]), and the account key signs the whole list ([`list_signing_input`] over the
//! encoded [`DeviceListContent`]). Verification checks every link; one broken link rejects the list.

use natter_proto::device_list::{
    DeviceEntry, DeviceListContent, account_binding_input, device_signing_input, list_signing_input,
};
use natter_proto::ids::{DeviceId, PhoneNumber};
use natter_proto::wire::SignedDeviceList;
use prost::Message;
use subtle::ConstantTimeEq;

use crate::account::{AccountKey, verify_signature};
use crate::device::DeviceKeys;
use crate::error::CryptoError;

/// The device's signature accepting `account_key` as the account it belongs to (over
/// [`account_binding_input`]).
pub fn device_binding_signature(
    device: &DeviceKeys,
    phone: &PhoneNumber,
    account_key: &[u8; 32],
) -> [u8; 64] {
    device.sign(&account_binding_input(phone.as_str(), account_key))
}

/// Builds the [`DeviceEntry`] of a device: keys, Noise key, name and `device_signature`. It needs the
/// [`DeviceKeys`], so it runs on the device itself; `account_signature` is left empty for the primary to
/// fill in with [`admit_device`].
pub fn new_device_entry(
    device: &DeviceKeys,
    phone: &PhoneNumber,
    device_id: DeviceId,
    account_key: &[u8; 32],
    noise_key: [u8; 32],
    name: &str,
) -> DeviceEntry {
    DeviceEntry {
        device_id: device_id.get(),
        identity_curve: device.identity_curve().to_vec(),
        identity_ed: device.identity_ed().to_vec(),
        noise_key: noise_key.to_vec(),
        name: name.to_owned(),
        account_signature: Vec::new(),
        device_signature: device_binding_signature(device, phone, account_key).to_vec(),
    }
}

fn check_entry_keys(entry: &DeviceEntry) -> Result<(), CryptoError> {
    let ok = entry.identity_curve.len() == 32
        && entry.identity_ed.len() == 32
        && entry.noise_key.len() == 32;
    if ok {
        Ok(())
    } else {
        Err(CryptoError::InvalidKey)
    }
}

/// Primary side: verifies the entry's `device_signature` (the device accepts this account key), then
/// sets `account_signature` (the account admits the device's keys).
pub fn admit_device(
    account: &AccountKey,
    phone: &PhoneNumber,
    entry: &mut DeviceEntry,
) -> Result<(), CryptoError> {
    check_entry_keys(entry)?;
    verify_signature(
        &entry.identity_ed,
        &account_binding_input(phone.as_str(), &account.public_key()),
        &entry.device_signature,
    )?;
    entry.account_signature = account
        .sign(&device_signing_input(phone.as_str(), entry))
        .to_vec();
    Ok(())
}

/// Verifies both signatures of one entry against the account key: the account's over the device's keys
/// and the device's over the account key. Errors: [`CryptoError::InvalidKey`] for wrong key sizes,
/// [`CryptoError::BadSignature`] for a missing or wrong signature.
pub fn verify_device_entry(
    account_key: &[u8; 32],
    phone: &PhoneNumber,
    entry: &DeviceEntry,
) -> Result<(), CryptoError> {
    check_entry_keys(entry)?;
    verify_signature(
        account_key,
        &device_signing_input(phone.as_str(), entry),
        &entry.account_signature,
    )?;
    verify_signature(
        &entry.identity_ed,
        &account_binding_input(phone.as_str(), account_key),
        &entry.device_signature,
    )
}

/// Encodes `content` and signs it with the account key.
pub fn sign_device_list(account: &AccountKey, content: &DeviceListContent) -> SignedDeviceList {
    let encoded = content.encode_to_vec();
    let signature = account.sign(&list_signing_input(&encoded)).to_vec();
    SignedDeviceList {
        content: encoded,
        signature,
    }
}

/// A device list whose whole signature chain verified against the trusted account key.
#[derive(Clone, Debug)]
pub struct VerifiedDeviceList {
    /// The verified content.
    pub content: DeviceListContent,
}

impl VerifiedDeviceList {
    /// The list's version.
    pub fn version(&self) -> u64 {
        self.content.version
    }

    /// The devices, primary first.
    pub fn devices(&self) -> &[DeviceEntry] {
        &self.content.devices
    }

    /// The entry of one device.
    pub fn device(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.content.device(id)
    }

    /// The ids of all devices on the list.
    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.content
            .devices
            .iter()
            .filter_map(|d| DeviceId::new(d.device_id).ok())
            .collect()
    }
}

/// Verifies a signed device list: decodes it, validates its structure
/// ([`DeviceListContent::validate`]), checks that it is for `phone` and for `trusted_account_key`
/// (constant-time comparison, else [`CryptoError::UntrustedAccountKey`]), checks the list signature and
/// both signatures of every device, and finally refuses a version below `min_version` with
/// [`CryptoError::Rollback`]. Any failure means no device of the list is usable.
pub fn verify_device_list(
    trusted_account_key: &[u8; 32],
    phone: &PhoneNumber,
    signed: &SignedDeviceList,
    min_version: u64,
) -> Result<VerifiedDeviceList, CryptoError> {
    let content = DeviceListContent::decode(signed.content.as_slice())
        .map_err(|e| CryptoError::InvalidDeviceList(e.to_string()))?;
    content
        .validate()
        .map_err(|e| CryptoError::InvalidDeviceList(e.to_string()))?;
    if content.phone != phone.as_str() {
        return Err(CryptoError::InvalidDeviceList(
            "the list is for another phone number".into(),
        ));
    }
    if !bool::from(content.account_key.as_slice().ct_eq(trusted_account_key)) {
        return Err(CryptoError::UntrustedAccountKey);
    }
    verify_signature(
        trusted_account_key,
        &list_signing_input(&signed.content),
        &signed.signature,
    )?;
    for entry in &content.devices {
        verify_device_entry(trusted_account_key, phone, entry)?;
    }
    if content.version < min_version {
        return Err(CryptoError::Rollback {
            known: min_version,
            offered: content.version,
        });
    }
    Ok(VerifiedDeviceList { content })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        account: AccountKey,
        phone: PhoneNumber,
        content: DeviceListContent,
    }

    fn phone() -> PhoneNumber {
        PhoneNumber::from_e164("+15550000001").unwrap()
    }

    fn entry(account: &AccountKey, phone: &PhoneNumber, id: u32, name: &str) -> DeviceEntry {
        let dev = DeviceKeys::generate();
        let mut e = new_device_entry(
            &dev,
            phone,
            DeviceId::new(id).unwrap(),
            &account.public_key(),
            [id as u8; 32],
            name,
        );
        assert!(e.account_signature.is_empty());
        admit_device(account, phone, &mut e).unwrap();
        e
    }

    fn fixture() -> Fixture {
        let account = AccountKey::generate();
        let phone = phone();
        let devices = vec![
            entry(&account, &phone, 1, "phone"),
            entry(&account, &phone, 2, "laptop"),
        ];
        let content = DeviceListContent {
            phone: phone.as_str().into(),
            version: 3,
            timestamp_ms: 1_700_000_000_000,
            account_key: account.public_key().to_vec(),
            devices,
        };
        Fixture {
            account,
            phone,
            content,
        }
    }

    impl Fixture {
        fn verify(&self, content: &DeviceListContent) -> Result<VerifiedDeviceList, CryptoError> {
            let signed = sign_device_list(&self.account, content);
            verify_device_list(&self.account.public_key(), &self.phone, &signed, 0)
        }
    }

    #[test]
    fn valid_list_verifies() {
        let f = fixture();
        let signed = sign_device_list(&f.account, &f.content);
        let v = verify_device_list(&f.account.public_key(), &f.phone, &signed, 3).unwrap();
        assert_eq!(v.version(), 3);
        assert_eq!(v.devices().len(), 2);
        assert_eq!(v.device(DeviceId::new(2).unwrap()).unwrap().name, "laptop");
        assert!(v.device(DeviceId::new(3).unwrap()).is_none());
        assert_eq!(
            v.device_ids(),
            vec![DeviceId::PRIMARY, DeviceId::new(2).unwrap()]
        );
    }

    #[test]
    fn tampered_content_is_refused() {
        let f = fixture();
        let mut signed = sign_device_list(&f.account, &f.content);
        let mut changed = f.content.clone();
        changed.version = 4;
        signed.content = changed.encode_to_vec();
        assert_eq!(
            verify_device_list(&f.account.public_key(), &f.phone, &signed, 0).unwrap_err(),
            CryptoError::BadSignature
        );
        let mut signed = sign_device_list(&f.account, &f.content);
        signed.signature[10] ^= 1;
        assert_eq!(
            verify_device_list(&f.account.public_key(), &f.phone, &signed, 0).unwrap_err(),
            CryptoError::BadSignature
        );
        let mut signed = sign_device_list(&f.account, &f.content);
        signed.content.push(0xff);
        assert!(matches!(
            verify_device_list(&f.account.public_key(), &f.phone, &signed, 0),
            Err(CryptoError::InvalidDeviceList(_) | CryptoError::BadSignature)
        ));
    }

    #[test]
    fn wrong_account_key_is_refused() {
        let f = fixture();
        let other = AccountKey::generate();
        // A list that names the trusted key but is signed by another key.
        let signed = sign_device_list(&other, &f.content);
        assert_eq!(
            verify_device_list(&f.account.public_key(), &f.phone, &signed, 0).unwrap_err(),
            CryptoError::BadSignature
        );
        // A list of another account key altogether.
        let mut content = f.content.clone();
        content.account_key = other.public_key().to_vec();
        let signed = sign_device_list(&other, &content);
        assert_eq!(
            verify_device_list(&f.account.public_key(), &f.phone, &signed, 0).unwrap_err(),
            CryptoError::UntrustedAccountKey
        );
    }

    #[test]
    fn device_without_account_signature_is_refused() {
        let f = fixture();
        let mut content = f.content.clone();
        content.devices[1].account_signature.clear();
        assert!(matches!(
            f.verify(&content),
            Err(CryptoError::InvalidDeviceList(_))
        ));
        // Right length, but by another key: the server admitting a device of its own.
        let mut content = f.content.clone();
        let other = AccountKey::generate();
        content.devices[1].account_signature = other
            .sign(&device_signing_input(f.phone.as_str(), &content.devices[1]))
            .to_vec();
        assert_eq!(f.verify(&content).unwrap_err(), CryptoError::BadSignature);
        // Signed, but the keys were swapped afterwards.
        let mut content = f.content.clone();
        content.devices[1].identity_curve = vec![9; 32];
        assert_eq!(f.verify(&content).unwrap_err(), CryptoError::BadSignature);
    }

    #[test]
    fn bad_device_signature_is_refused() {
        let f = fixture();
        let mut content = f.content.clone();
        content.devices[0].device_signature[0] ^= 1;
        assert_eq!(f.verify(&content).unwrap_err(), CryptoError::BadSignature);

        // The primary refuses to admit a device that did not accept this account key.
        let dev = DeviceKeys::generate();
        let other = AccountKey::generate();
        let mut e = new_device_entry(
            &dev,
            &f.phone,
            DeviceId::new(3).unwrap(),
            &other.public_key(),
            [0; 32],
            "tablet",
        );
        assert_eq!(
            admit_device(&f.account, &f.phone, &mut e).unwrap_err(),
            CryptoError::BadSignature
        );
        assert!(e.account_signature.is_empty());
    }

    #[test]
    fn phone_mismatch_is_refused() {
        let f = fixture();
        let signed = sign_device_list(&f.account, &f.content);
        let elsewhere = PhoneNumber::from_e164("+15550000002").unwrap();
        assert!(matches!(
            verify_device_list(&f.account.public_key(), &elsewhere, &signed, 0),
            Err(CryptoError::InvalidDeviceList(_))
        ));
    }

    #[test]
    fn rollback_is_refused() {
        let f = fixture();
        let signed = sign_device_list(&f.account, &f.content);
        assert_eq!(
            verify_device_list(&f.account.public_key(), &f.phone, &signed, 4).unwrap_err(),
            CryptoError::Rollback {
                known: 4,
                offered: 3
            }
        );
    }

    #[test]
    fn structure_errors_are_refused() {
        let f = fixture();
        let mut content = f.content.clone();
        content.devices.remove(0);
        assert!(matches!(
            f.verify(&content),
            Err(CryptoError::InvalidDeviceList(_))
        ));
        let garbage = SignedDeviceList {
            content: vec![0xff, 0xff, 0xff],
            signature: vec![0; 64],
        };
        assert!(matches!(
            verify_device_list(&f.account.public_key(), &f.phone, &garbage, 0),
            Err(CryptoError::InvalidDeviceList(_))
        ));
    }
}
