//! Validated identifiers. Every id that arrives from the network, a file or the command line goes through
//! one of these constructors; nothing downstream handles a bare `String` id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::limits::MAX_DEVICES_PER_ACCOUNT;

/// Why a string or byte string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The phone number is not a valid international number.
    #[error("invalid phone number {0:?}: use the international format, e.g. +15550000001")]
    InvalidPhoneNumber(String),
    /// The device id is outside the allowed range.
    #[error("invalid device id {0}: device ids run from 1 (the primary) to {max}", max = MAX_DEVICES_PER_ACCOUNT)]
    InvalidDeviceId(u32),
    /// The message id is not 16 bytes (32 hex digits).
    #[error("invalid message id: expected 32 hex digits")]
    InvalidMessageId,
    /// The group id is not 16 bytes (32 hex digits).
    #[error("invalid group id: expected 32 hex digits")]
    InvalidGroupId,
}

/// A phone number in E.164 form (`+` followed by 8 to 15 digits), the name of an account.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parses what a person typed (spaces, dashes and brackets allowed; a leading `+` and country code
    /// required) and validates it with libphonenumber's metadata. Returns the number in E.164 form.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        let invalid = || IdError::InvalidPhoneNumber(input.chars().take(32).collect());
        let trimmed = input.trim();
        let rest = trimmed.strip_prefix('+').ok_or_else(invalid)?;
        let allowed = |c: char| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')');
        if trimmed.len() > 32 || !rest.chars().all(allowed) {
            return Err(invalid());
        }
        let parsed = phonenumber::parse(None, trimmed).map_err(|_| invalid())?;
        // `is_valid` rejects numbers in ranges no carrier assigns (the NANP's fictional 555 range that
        // tests and demos use among them), so registration only asks for a well-formed number that a
        // country plan could hold; the SMS code is what proves the number is real.
        if !phonenumber::is_viable(trimmed) {
            return Err(invalid());
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        Self::from_e164(&e164).map_err(|_| invalid())
    }

    /// Parses a number from an address book: international (`+…`, or `00…` for the `+`) as
    /// [`PhoneNumber::parse`] does, or national (`(555) 000-0001`) with `region`, an ISO 3166 country code
    /// such as `US`. Letters, extensions and over-long input are refused.
    pub fn parse_in(input: &str, region: Option<&str>) -> Result<Self, IdError> {
        let invalid = || IdError::InvalidPhoneNumber(input.chars().take(32).collect());
        let trimmed = input.trim();
        if trimmed.len() > 32 {
            return Err(invalid());
        }
        if trimmed.starts_with('+') {
            return Self::parse(trimmed);
        }
        if let Some(rest) = trimmed.strip_prefix("00") {
            return Self::parse(&format!("+{rest}")).map_err(|_| invalid());
        }
        let allowed = |c: char| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')');
        if trimmed.is_empty() || !trimmed.chars().all(allowed) {
            return Err(invalid());
        }
        let region: phonenumber::country::Id = region
            .ok_or_else(invalid)?
            .to_ascii_uppercase()
            .parse()
            .map_err(|_| invalid())?;
        let parsed = phonenumber::parse(Some(region), trimmed).map_err(|_| invalid())?;
        if !phonenumber::is_viable(trimmed) {
            return Err(invalid());
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        Self::from_e164(&e164).map_err(|_| invalid())
    }

    /// The ISO 3166 code of the number's country (`US` for `+1…`, the main country of a shared code),
    /// if libphonenumber knows it: the default region for national numbers in this account's address
    /// book.
    pub fn region(&self) -> Option<String> {
        let parsed = phonenumber::parse(None, &self.0).ok()?;
        parsed.country().id().map(|id| id.as_ref().to_owned())
    }

    /// Accepts a number already in E.164 form (as it travels on the wire): `+`, then 8 to 15 digits, the
    /// first not zero. Cheap: no metadata lookup.
    pub fn from_e164(s: &str) -> Result<Self, IdError> {
        let digits = s.strip_prefix('+').unwrap_or("");
        let ok = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::InvalidPhoneNumber(s.chars().take(32).collect()))
        }
    }

    /// The E.164 string, e.g. `+15550000001`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.0)
    }
}

impl FromStr for PhoneNumber {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl TryFrom<String> for PhoneNumber {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::from_e164(&s)
    }
}

impl From<PhoneNumber> for String {
    fn from(p: PhoneNumber) -> String {
        p.0
    }
}

/// A device of an account: 1 is the primary (the phone), 2..=5 are companions.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct DeviceId(u32);

impl DeviceId {
    /// The primary device of every account.
    pub const PRIMARY: DeviceId = DeviceId(1);

    /// Validates a device id from the wire.
    pub fn new(id: u32) -> Result<Self, IdError> {
        if (1..=MAX_DEVICES_PER_ACCOUNT as u32).contains(&id) {
            Ok(Self(id))
        } else {
            Err(IdError::InvalidDeviceId(id))
        }
    }

    /// The numeric id.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Whether this is the account's primary device.
    pub fn is_primary(self) -> bool {
        self == Self::PRIMARY
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<u32> for DeviceId {
    type Error = IdError;
    fn try_from(v: u32) -> Result<Self, IdError> {
        Self::new(v)
    }
}

impl From<DeviceId> for u32 {
    fn from(d: DeviceId) -> u32 {
        d.0
    }
}

/// A message id chosen by the sender (16 random bytes). It makes retried sends idempotent and ties
/// receipts and retry requests to the message they are about.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// Wraps 16 bytes (the caller provides randomness: this crate has no RNG).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Validates a message id from the wire.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        <[u8; 16]>::try_from(bytes)
            .map(Self)
            .map_err(|_| IdError::InvalidMessageId)
    }

    /// Parses the 32-hex-digit form users see.
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| IdError::InvalidMessageId)?;
        Ok(Self(out))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 32-hex-digit form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::from_hex(s)
    }
}

impl TryFrom<String> for MessageId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::from_hex(&s)
    }
}

impl From<MessageId> for String {
    fn from(m: MessageId) -> String {
        m.to_hex()
    }
}

/// A group's id, chosen by its creator (16 random bytes) and fixed for the group's life.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GroupId([u8; 16]);

impl GroupId {
    /// Wraps 16 bytes (the caller provides randomness: this crate has no RNG).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Validates a group id from the wire.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        <[u8; 16]>::try_from(bytes)
            .map(Self)
            .map_err(|_| IdError::InvalidGroupId)
    }

    /// Parses the 32-hex-digit form users see.
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| IdError::InvalidGroupId)?;
        Ok(Self(out))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 32-hex-digit form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({})", self.to_hex())
    }
}

impl FromStr for GroupId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::from_hex(s)
    }
}

impl TryFrom<String> for GroupId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::from_hex(&s)
    }
}

impl From<GroupId> for String {
    fn from(g: GroupId) -> String {
        g.to_hex()
    }
}

#[cfg(test)]
mod address_book_tests {
    use super::*;

    #[test]
    fn national_and_international_forms() {
        let us = Some("US");
        let want = "+12025550123";
        for input in [
            "+1 202-555-0123",
            "001 202 555 0123",
            "(202) 555-0123",
            "202.555.0123",
            " 2025550123 ",
        ] {
            assert_eq!(
                PhoneNumber::parse_in(input, us).unwrap().as_str(),
                want,
                "{input}"
            );
        }
        assert_eq!(
            PhoneNumber::parse_in("030 1234567", Some("de"))
                .unwrap()
                .as_str(),
            "+49301234567"
        );
        for bad in ["", "call me", "555-CALL", "202 555 0123 ext 4", "12", "+"] {
            assert!(PhoneNumber::parse_in(bad, us).is_err(), "{bad}");
        }
        assert!(
            PhoneNumber::parse_in("(202) 555-0123", None).is_err(),
            "national needs a region"
        );
        assert!(PhoneNumber::parse_in("(202) 555-0123", Some("XX")).is_err());
        let n = PhoneNumber::from_e164(want).unwrap();
        assert_eq!(n.region().as_deref(), Some("US"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_normalise_to_e164() {
        assert_eq!(
            PhoneNumber::parse("+1 (555) 000-0001").unwrap().as_str(),
            "+15550000001"
        );
        assert_eq!(
            PhoneNumber::parse("+44 20 7946 0958").unwrap().as_str(),
            "+442079460958"
        );
        assert_eq!(
            PhoneNumber::parse("+33 6 12 34 56 78").unwrap().as_str(),
            "+33612345678"
        );
    }

    #[test]
    fn bad_phone_numbers_are_refused() {
        for bad in [
            "",
            "5550000001",
            "+",
            "+1",
            "+12",
            "hello",
            "+1555000000100000000000",
            "+0123456789",
            "++15550000001",
        ] {
            assert!(PhoneNumber::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(PhoneNumber::from_e164("+1555abc0001").is_err());
        assert!(PhoneNumber::from_e164("15550000001").is_err());
        assert!(PhoneNumber::from_e164("+1234567").is_err());
        assert!(PhoneNumber::from_e164("+1234567890123456").is_err());
    }

    #[test]
    fn device_ids_are_bounded() {
        assert!(DeviceId::new(0).is_err());
        assert!(DeviceId::new(1).unwrap().is_primary());
        assert!(DeviceId::new(5).is_ok());
        assert!(DeviceId::new(6).is_err());
    }

    #[test]
    fn message_ids_round_trip_hex() {
        let id = MessageId::from_bytes([7; 16]);
        assert_eq!(MessageId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(MessageId::from_hex("zz").is_err());
        assert!(MessageId::from_slice(&[1; 15]).is_err());
    }
}
