//! Device lists of peers (and of our own account): fetched from the server, verified against the
//! account key we trust, cached. The first key seen for an account is trusted; a later change (the
//! number was registered again) is accepted with a visible notice in the conversation, and the old
//! sessions are dropped. Our own account's key never changes under us.

use std::time::Duration;

use natter_crypto::CryptoError;
use natter_crypto::device_list::{VerifiedDeviceList, verify_device_list};
use natter_proto::wire::{GetDevices, SignedDeviceList, request, response};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;

use crate::client::{Client, unexpected};
use crate::error::{ClientError, Result};
use crate::events::Event;
use crate::store::{Changes, MessageKind, MessageRecord, MessageStatus, PeerRecord};

/// A verified view of an account's devices.
#[derive(Clone, Debug)]
pub struct PeerDevices {
    /// The account key the list is verified against.
    pub account_key: [u8; 32],
    /// The verified list.
    pub list: VerifiedDeviceList,
}

impl Client {
    /// The verified device list of `phone`, from the cache unless `refresh` or unknown.
    pub(crate) async fn peer_devices(
        &self,
        phone: &PhoneNumber,
        refresh: bool,
    ) -> Result<PeerDevices> {
        let cached = self.inner.store.peer(phone).await?;
        if let Some(c) = &cached
            && !refresh
        {
            let signed = SignedDeviceList::decode(c.device_list.as_slice()).map_err(|e| {
                ClientError::Store(crate::store::StoreError::Corrupt(e.to_string()))
            })?;
            let list = verify_device_list(&c.account_key, phone, &signed, 0)?;
            return Ok(PeerDevices {
                account_key: c.account_key,
                list,
            });
        }
        let conn = self.connection(Duration::from_secs(10)).await?;
        self.inner
            .device_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let devices = match conn
            .request(request::Body::GetDevices(GetDevices {
                phone: phone.as_str().to_owned(),
            }))
            .await?
        {
            response::Body::Devices(d) => d,
            _ => return Err(unexpected()),
        };
        let untrusted = |reason: String| ClientError::Untrusted {
            peer: phone.to_string(),
            reason,
        };
        let key: [u8; 32] = devices
            .account_key
            .as_slice()
            .try_into()
            .map_err(|_| untrusted("malformed account key".into()))?;
        let signed = devices
            .device_list
            .ok_or_else(|| untrusted("no device list".into()))?;
        let me = self.registered_identity().await?;
        if *phone == me.phone && key != me.account_key {
            return Err(untrusted(
                "the server offers another key for our own account".into(),
            ));
        }
        let (min_version, changed) = match &cached {
            Some(c) if c.account_key == key => (c.device_list_version, false),
            Some(_) => (0, true),
            None => (0, false),
        };
        let list = verify_device_list(&key, phone, &signed, min_version).map_err(|e| match e {
            CryptoError::Rollback { known, offered } => untrusted(format!(
                "the server offered device list version {offered}, older than the {known} we know"
            )),
            other => untrusted(other.to_string()),
        })?;
        let now = crate::now_ms();
        let mut changes = Changes::default();
        changes.peers.push(PeerRecord {
            phone: phone.clone(),
            account_key: key,
            device_list: signed.encode_to_vec(),
            device_list_version: list.version(),
            key_changed_at_ms: if changed {
                Some(now)
            } else {
                cached.as_ref().and_then(|c| c.key_changed_at_ms)
            },
        });
        let mut notice = None;
        if changed {
            let signed_at = list.content.timestamp_ms;
            let changed_at = if signed_at > 0 {
                signed_at.min(now)
            } else {
                now
            };
            for d in 1..=natter_proto::limits::MAX_DEVICES_PER_ACCOUNT as u32 {
                if let Ok(d) = DeviceId::new(d) {
                    changes.sessions_removed.push((phone.clone(), d));
                }
            }
            let record = MessageRecord {
                chat: phone.clone(),
                id: crate::random_message_id()?,
                from_me: false,
                sender_device: DeviceId::PRIMARY,
                kind: MessageKind::Notice,
                text: format!(
                    "The safety number with {phone} changed: the number was registered again, on a new phone. \
                     Compare it in person before sharing anything sensitive."
                ),
                // Placed in the conversation when the new key's list was signed (the number's
                // registration), so before anything the new phone sent.
                sent_at_ms: changed_at,
                server_ts_ms: changed_at,
                status: MessageStatus::Received,
                shown: false,
                seq: 0,
                media: None,
            };
            changes.messages.push(record.clone());
            notice = Some(record);
        }
        self.inner.store.save_changes(changes).await?;
        if let Some(n) = notice {
            tracing::info!("a peer's account key changed");
            self.emit(Event::Message(n));
        }
        Ok(PeerDevices {
            account_key: key,
            list,
        })
    }
}
