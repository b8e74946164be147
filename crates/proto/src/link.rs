//! Companion linking: what the companion's QR code holds ([`LinkQr`]) and the payloads that primary and
//! companion exchange through the server, sealed with the QR code's one-time secret (which the server
//! never sees). Sealing itself is natter-crypto's job.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message;

use crate::error::ProtoError;
use crate::limits::MAX_SHORT_TEXT;

/// Prefix of the QR code's text form.
pub const QR_PREFIX: &str = "natter-link:";
/// Largest text form accepted (a QR code holds at most ~2.9 KB anyway).
pub const MAX_QR_TEXT: usize = 1024;
/// How long a link reference lives before a new QR code must be shown.
pub const LINK_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// What a companion shows in its QR code.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkQr {
    /// The server's one-time reference (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub reference: Vec<u8>,
    /// The companion's Olm identity key (Curve25519).
    #[prost(bytes = "vec", tag = "2")]
    pub identity_curve: Vec<u8>,
    /// The companion's signing key (Ed25519).
    #[prost(bytes = "vec", tag = "3")]
    pub identity_ed: Vec<u8>,
    /// The companion's Noise static key: its future login credential.
    #[prost(bytes = "vec", tag = "4")]
    pub noise_key: Vec<u8>,
    /// A one-time 32-byte secret that seals the exchange; never sent to the server.
    #[prost(bytes = "vec", tag = "5")]
    pub secret: Vec<u8>,
    /// The companion's name ("laptop", "Linux desktop").
    #[prost(string, tag = "6")]
    pub name: String,
}

impl Drop for LinkQr {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl LinkQr {
    /// The text carried by the QR code (`natter-link:` and base64url).
    pub fn to_text(&self) -> String {
        format!(
            "{QR_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.encode_to_vec())
        )
    }

    /// Parses and validates the QR code's text.
    pub fn from_text(text: &str) -> Result<Self, ProtoError> {
        let text = text.trim();
        if text.len() > MAX_QR_TEXT {
            return Err(ProtoError::LimitExceeded {
                what: "QR code text",
                len: text.len(),
                max: MAX_QR_TEXT,
            });
        }
        let b64 = text.strip_prefix(QR_PREFIX).ok_or(ProtoError::Invalid {
            what: "QR code (not a Natter link code)",
        })?;
        let bytes = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| ProtoError::Invalid {
                what: "QR code encoding",
            })?;
        let qr = LinkQr::decode(bytes.as_slice())?;
        let sizes_ok = qr.reference.len() == 16
            && qr.identity_curve.len() == 32
            && qr.identity_ed.len() == 32
            && qr.noise_key.len() == 32
            && qr.secret.len() == 32;
        if !sizes_ok {
            return Err(ProtoError::Invalid {
                what: "QR code keys",
            });
        }
        if qr.name.len() > MAX_SHORT_TEXT {
            return Err(ProtoError::LimitExceeded {
                what: "device name",
                len: qr.name.len(),
                max: MAX_SHORT_TEXT,
            });
        }
        Ok(qr)
    }
}

impl std::fmt::Debug for LinkQrView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkQr")
            .field("name", &self.0.name)
            .finish_non_exhaustive()
    }
}

/// A `Debug` view of a [`LinkQr`] that hides its secret.
pub struct LinkQrView<'a>(pub &'a LinkQr);

/// What the primary tells the companion (sealed).
#[derive(Clone, PartialEq, prost::Message)]
pub struct OfferPayload {
    /// The account.
    #[prost(string, tag = "1")]
    pub phone: String,
    /// The account key.
    #[prost(bytes = "vec", tag = "2")]
    pub account_key: Vec<u8>,
    /// The device id the companion will have.
    #[prost(uint32, tag = "3")]
    pub device_id: u32,
}

impl OfferPayload {
    /// The checks a companion makes on an opened offer: the account's number, the companion device id it
    /// is given (never the primary's), and the 32-byte account key.
    pub fn parse(&self) -> Result<(crate::PhoneNumber, crate::DeviceId, [u8; 32]), ProtoError> {
        let phone = crate::PhoneNumber::from_e164(&self.phone)?;
        let device = crate::DeviceId::new(self.device_id)?;
        if device == crate::DeviceId::PRIMARY {
            return Err(ProtoError::Invalid {
                what: "companion device id",
            });
        }
        let key =
            <[u8; 32]>::try_from(self.account_key.as_slice()).map_err(|_| ProtoError::Invalid {
                what: "account key",
            })?;
        Ok((phone, device, key))
    }
}

/// What the companion answers (sealed): its signature binding it to the account key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AcceptPayload {
    /// Device signature over [`crate::device_list::account_binding_input`].
    #[prost(bytes = "vec", tag = "1")]
    pub device_signature: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qr() -> LinkQr {
        LinkQr {
            reference: vec![1; 16],
            identity_curve: vec![2; 32],
            identity_ed: vec![3; 32],
            noise_key: vec![4; 32],
            secret: vec![5; 32],
            name: "laptop".into(),
        }
    }

    #[test]
    fn text_round_trip() {
        let q = qr();
        let text = q.to_text();
        assert!(text.starts_with(QR_PREFIX));
        assert_eq!(LinkQr::from_text(&text).unwrap(), q);
    }

    #[test]
    fn bad_codes_are_refused() {
        assert!(LinkQr::from_text("hello").is_err());
        assert!(LinkQr::from_text("natter-link:!!!").is_err());
        let mut short = qr();
        short.secret.pop();
        assert!(LinkQr::from_text(&short.to_text()).is_err());
        assert!(LinkQr::from_text(&"x".repeat(MAX_QR_TEXT + 1)).is_err());
    }

    #[test]
    fn debug_view_hides_the_secret() {
        let q = qr();
        let shown = format!("{:?}", LinkQrView(&q));
        assert!(shown.contains("laptop") && !shown.contains('5'));
    }
}
