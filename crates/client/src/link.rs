//! Multi-device: linking a companion by QR code, listing and unlinking devices, safety numbers.
//!
//! Linking, as the architecture describes it: the companion opens an anonymous connection, gets a
//! one-time reference and shows a QR code with the reference, its public keys and a one-time secret.
//! The primary reads the code, offers its account (sealed with the secret), the companion counter-signs
//! the account key (sealed back), and the primary publishes a new signed device list holding the
//! companion. The server relays sealed payloads only, so it can neither read nor forge any step.

use std::collections::HashSet;
use std::time::Duration;

use natter_crypto::device_list::{admit_device, device_binding_signature, sign_device_list};
use natter_crypto::{AccountKey, DeviceKeys, safety_number};
use natter_proto::device_list::{DeviceEntry, DeviceListContent};
use natter_proto::limits::{MAX_DEVICES_PER_ACCOUNT, ONE_TIME_KEYS_TARGET};
use natter_proto::link::{AcceptPayload, LinkQr, OfferPayload};
use natter_proto::noise::StaticKeypair;
use natter_proto::wire::{
    CreateLinkRef, ErrorCode, LinkAccept, LinkAccepted, LinkOffer, ListOwnDevices,
    PublishDeviceList, RemoveSelf, push, request, response,
};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::client::{Client, WhoAmI, unexpected};
use crate::error::{ClientError, Result};
use crate::messaging::key32;
use crate::store::{Changes, IdentityRecord, PeerRecord};

/// How long the primary waits for the companion's acceptance.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// A device of this account, as `natter devices` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Its id (1 = primary).
    pub device_id: u32,
    /// Its name.
    pub name: String,
    /// Fingerprint of its signing key (hex groups).
    pub fingerprint: String,
    /// Last connection (ms since epoch), if the server knows the device.
    pub last_seen_ms: Option<u64>,
    /// Connected now.
    pub online: bool,
    /// This very device.
    pub this_device: bool,
}

/// A companion the primary linked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkedDevice {
    /// Its device id.
    pub device_id: u32,
    /// Its name.
    pub name: String,
}

/// Groups of 4 hex digits of the first 16 bytes of a key.
pub fn fingerprint(key: &[u8]) -> String {
    key.iter()
        .take(16)
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Client {
    /// Companion side: shows QR codes (`show` is called with each; a new one every 60 s, as the
    /// reference expires) until a primary links this device or `timeout` passes. Returns who it became.
    pub async fn link_as_companion(
        &self,
        name: &str,
        timeout: Duration,
        mut show: impl FnMut(&LinkQr),
    ) -> Result<WhoAmI> {
        if let Some(i) = self.inner.store.identity().await?
            && i.registered
        {
            return Err(ClientError::InvalidInput(format!(
                "this home is already device {} of {}: use another --home",
                i.device_id, i.phone
            )));
        }
        let name = name.trim();
        if name.is_empty() || name.len() > natter_proto::limits::MAX_SHORT_TEXT {
            return Err(ClientError::InvalidInput(
                "give the device a short name".into(),
            ));
        }
        let device = DeviceKeys::generate();
        let noise = StaticKeypair::generate()?;
        let deadline = tokio::time::Instant::now() + timeout;
        let (conn, mut pushes) = self.open_connection(&noise, None).await?;
        let (reference, secret, offer) = loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
            let link_ref = match conn
                .request(request::Body::CreateLinkRef(CreateLinkRef {}))
                .await?
            {
                response::Body::LinkRef(r) => r,
                _ => return Err(unexpected()),
            };
            let mut secret = Zeroizing::new([0u8; 32]);
            getrandom::fill(secret.as_mut()).map_err(|e| ClientError::Io {
                path: "random".into(),
                source: std::io::Error::other(e),
            })?;
            let qr = LinkQr {
                reference: link_ref.reference.clone(),
                identity_curve: device.identity_curve().to_vec(),
                identity_ed: device.identity_ed().to_vec(),
                noise_key: noise.public().to_vec(),
                secret: secret.to_vec(),
                name: name.to_owned(),
            };
            show(&qr);
            drop(qr);
            let ttl = Duration::from_secs(u64::from(link_ref.expires_in_s.max(1)));
            let until = (tokio::time::Instant::now() + ttl).min(deadline);
            let offered = tokio::time::timeout_at(until, async {
                while let Some(p) = pushes.recv().await {
                    if let Some(push::Body::LinkOffered(o)) = p.body
                        && o.reference == link_ref.reference
                    {
                        return Some(o);
                    }
                }
                None
            })
            .await;
            match offered {
                Ok(Some(o)) => break (link_ref.reference, secret, o),
                Ok(None) => return Err(ClientError::Disconnected),
                Err(_) => continue,
            }
        };
        let opened = natter_crypto::link::open(&secret, &reference, &offer.sealed)?;
        let payload = OfferPayload::decode(opened.as_slice())
            .map_err(|e| ClientError::InvalidInput(format!("malformed link offer: {e}")))?;
        let (phone, device_id, account_key) = payload
            .parse()
            .map_err(|e| ClientError::InvalidInput(format!("link offer: {e}")))?;
        let signature = device_binding_signature(&device, &phone, &account_key);
        let sealed = natter_crypto::link::seal(
            &secret,
            &reference,
            &AcceptPayload {
                device_signature: signature.to_vec(),
            }
            .encode_to_vec(),
        )?;
        conn.request(request::Body::LinkAccept(LinkAccept {
            reference: reference.clone(),
            sealed,
        }))
        .await?;
        let done = tokio::time::timeout(ACCEPT_TIMEOUT, async {
            while let Some(p) = pushes.recv().await {
                if let Some(push::Body::LinkDone(d)) = p.body {
                    return Some(d);
                }
            }
            None
        })
        .await
        .map_err(|_| ClientError::Timeout)?
        .ok_or(ClientError::Disconnected)?;
        if done.phone != phone.as_str() || done.device_id != device_id.get() {
            return Err(ClientError::Untrusted {
                peer: phone.to_string(),
                reason: "the server reported another account or device than the primary offered"
                    .into(),
            });
        }
        drop(conn);
        let identity = IdentityRecord {
            phone: phone.clone(),
            device_id,
            registered: true,
            account_key,
            account_secret: None,
            device_pickle: self.pickle_device(&device),
            noise_secret: self.inner.cipher.encrypt(b"noise-key", noise.private()),
            device_name: name.to_owned(),
        };
        self.inner
            .store
            .save_changes(Changes {
                wipe: true,
                identity: Some(identity),
                ..Changes::default()
            })
            .await?;
        self.connect().await?;
        // Our own list must now hold us with exactly our keys, signed by the account key we were offered.
        let own = self.peer_devices(&phone, true).await?;
        let entry = own
            .list
            .device(device_id)
            .ok_or_else(|| ClientError::Untrusted {
                peer: phone.to_string(),
                reason: "the published device list does not hold this device".into(),
            })?;
        if entry.identity_ed != device.identity_ed() || entry.noise_key != noise.public() {
            return Err(ClientError::Untrusted {
                peer: phone.to_string(),
                reason: "the published device list holds other keys for this device".into(),
            });
        }
        let conn = self.connection(Duration::from_secs(10)).await?;
        let _crypto = self.inner.crypto.lock().await;
        // The connection may have topped up our prekeys already (the server asks a device that has none
        // as it logs in): continue from the saved account, never from the copy made before connecting,
        // whose one-time key ids would repeat the published ones (the server keeps the first key of an
        // id, and every message built on it would be undecryptable).
        let identity = self.registered_identity().await?;
        let mut device = self.device_keys(&identity)?;
        self.upload_keys(&conn, &mut device, ONE_TIME_KEYS_TARGET, true)
            .await?;
        drop(_crypto);
        self.whoami().await?.ok_or(ClientError::NotRegistered)
    }

    /// Primary side: links the companion that shows `qr`. Needs a connection ([`Client::connect`]).
    pub async fn link_device(&self, qr: &LinkQr) -> Result<LinkedDevice> {
        let me = self.registered_identity().await?;
        let account = self.account_key(&me)?;
        let own = self.peer_devices(&me.phone, true).await?;
        let used: HashSet<u32> = own.list.devices().iter().map(|d| d.device_id).collect();
        if used.len() >= MAX_DEVICES_PER_ACCOUNT {
            return Err(ClientError::Server {
                code: ErrorCode::TooManyDevices,
                message: format!(
                    "an account has at most {} companions: unlink one first (natter devices, natter unlink <id>)",
                    MAX_DEVICES_PER_ACCOUNT - 1
                ),
                retry_after_ms: 0,
                mismatched: Vec::new(),
            });
        }
        let device_id = (2..=MAX_DEVICES_PER_ACCOUNT as u32)
            .find(|id| !used.contains(id))
            .ok_or(ClientError::InvalidInput("no free device id".into()))?;
        let secret = Zeroizing::new(key32(&qr.secret)?);
        let offer = OfferPayload {
            phone: me.phone.as_str().to_owned(),
            account_key: me.account_key.to_vec(),
            device_id,
        };
        let sealed = natter_crypto::link::seal(&secret, &qr.reference, &offer.encode_to_vec())?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .link_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(qr.reference.clone(), tx);
        let conn = self.connection(Duration::from_secs(10)).await?;
        let offered = conn
            .request(request::Body::LinkOffer(LinkOffer {
                reference: qr.reference.clone(),
                sealed,
            }))
            .await;
        let accepted = match offered {
            Ok(_) => tokio::time::timeout(ACCEPT_TIMEOUT, rx).await,
            Err(e) => {
                self.forget_link_waiter(&qr.reference);
                return Err(e);
            }
        };
        self.forget_link_waiter(&qr.reference);
        let accepted: LinkAccepted = accepted
            .map_err(|_| ClientError::Timeout)?
            .map_err(|_| ClientError::Disconnected)?;
        let opened = natter_crypto::link::open(&secret, &qr.reference, &accepted.sealed)?;
        let accept = AcceptPayload::decode(opened.as_slice())
            .map_err(|e| ClientError::InvalidInput(format!("malformed link acceptance: {e}")))?;
        let mut entry = DeviceEntry {
            device_id,
            identity_curve: qr.identity_curve.clone(),
            identity_ed: qr.identity_ed.clone(),
            noise_key: qr.noise_key.clone(),
            name: qr.name.clone(),
            account_signature: Vec::new(),
            device_signature: accept.device_signature,
        };
        // Checks the companion's counter-signature, then signs the companion in.
        admit_device(&account, &me.phone, &mut entry)?;
        let mut content: DeviceListContent = own.list.content.clone();
        content.devices.push(entry);
        self.publish_own_list(&me, &account, content, qr.reference.clone())
            .await?;
        if let Err(e) = self.share_app_state_keys().await {
            tracing::warn!(error = %e, "could not share app-state keys with the new device");
        }
        Ok(LinkedDevice {
            device_id,
            name: qr.name.clone(),
        })
    }

    fn forget_link_waiter(&self, reference: &[u8]) {
        self.inner
            .link_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(reference);
    }

    /// Routes a companion's acceptance to the [`Client::link_device`] waiting for it.
    pub(crate) fn link_accepted(&self, accepted: LinkAccepted) {
        let waiter = self
            .inner
            .link_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&accepted.reference);
        if let Some(tx) = waiter {
            let _ = tx.send(accepted);
        }
    }

    fn account_key(&self, me: &IdentityRecord) -> Result<AccountKey> {
        let Some(secret) = &me.account_secret else {
            return Err(ClientError::Server {
                code: ErrorCode::NotPrimary,
                message: "only the primary device (the phone) can do this".into(),
                retry_after_ms: 0,
                mismatched: Vec::new(),
            });
        };
        let secret = self.inner.cipher.decrypt(b"account-key", secret)?;
        let secret = Zeroizing::new(key32(&secret)?);
        Ok(AccountKey::from_secret_bytes(&secret)?)
    }

    /// Signs `content` as the next version of our list and publishes it.
    async fn publish_own_list(
        &self,
        me: &IdentityRecord,
        account: &AccountKey,
        mut content: DeviceListContent,
        link_reference: Vec<u8>,
    ) -> Result<u64> {
        content.version += 1;
        content.timestamp_ms = crate::now_ms();
        let signed = sign_device_list(account, &content);
        let conn = self.connection(Duration::from_secs(10)).await?;
        let version = match conn
            .request(request::Body::PublishDeviceList(PublishDeviceList {
                device_list: Some(signed.clone()),
                link_reference,
            }))
            .await?
        {
            response::Body::DeviceListPublished(p) => p.version,
            _ => return Err(unexpected()),
        };
        self.inner
            .store
            .save_changes(Changes {
                peers: vec![PeerRecord {
                    phone: me.phone.clone(),
                    account_key: me.account_key,
                    device_list: signed.encode_to_vec(),
                    device_list_version: content.version,
                    key_changed_at_ms: None,
                }],
                ..Changes::default()
            })
            .await?;
        Ok(version)
    }

    /// The devices of this account (from the verified signed list), with the server's view of them.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let me = self.registered_identity().await?;
        let own = self.peer_devices(&me.phone, true).await?;
        let conn = self.connection(Duration::from_secs(10)).await?;
        let statuses = match conn
            .request(request::Body::ListOwnDevices(ListOwnDevices {}))
            .await?
        {
            response::Body::OwnDevices(d) => d.devices,
            _ => return Err(unexpected()),
        };
        Ok(own
            .list
            .devices()
            .iter()
            .map(|d| {
                let status = statuses.iter().find(|s| s.device_id == d.device_id);
                DeviceInfo {
                    device_id: d.device_id,
                    name: d.name.clone(),
                    fingerprint: fingerprint(&d.identity_ed),
                    last_seen_ms: status.map(|s| s.last_seen_ms),
                    online: status.is_some_and(|s| s.online),
                    this_device: d.device_id == me.device_id.get(),
                }
            })
            .collect())
    }

    /// Removes a device from this account. On the primary any companion can go; on a companion only the
    /// companion itself, which then forgets everything it knew.
    pub async fn unlink(&self, device_id: DeviceId) -> Result<()> {
        let me = self.registered_identity().await?;
        if me.device_id != DeviceId::PRIMARY {
            if device_id != me.device_id {
                return Err(ClientError::Server {
                    code: ErrorCode::NotPrimary,
                    message: "a companion can only unlink itself; unlink others from the phone"
                        .into(),
                    retry_after_ms: 0,
                    mismatched: Vec::new(),
                });
            }
            let conn = self.connection(Duration::from_secs(10)).await?;
            conn.request(request::Body::RemoveSelf(RemoveSelf {}))
                .await?;
            self.disconnect().await;
            self.forget_everything().await?;
            return Ok(());
        }
        if device_id == DeviceId::PRIMARY {
            return Err(ClientError::InvalidInput(
                "the primary cannot be unlinked: register the number on a new phone instead".into(),
            ));
        }
        let account = self.account_key(&me)?;
        let own = self.peer_devices(&me.phone, true).await?;
        if own.list.device(device_id).is_none() {
            return Err(ClientError::InvalidInput(format!(
                "there is no device {device_id} on this account (see natter devices)"
            )));
        }
        let mut content = own.list.content.clone();
        content.devices.retain(|d| d.device_id != device_id.get());
        self.publish_own_list(&me, &account, content, Vec::new())
            .await?;
        self.rotate_app_state_key().await?;
        Ok(())
    }

    /// Wipes the identity, sessions and messages of a device that left its account.
    pub(crate) async fn forget_everything(&self) -> Result<()> {
        self.inner
            .store
            .save_changes(Changes {
                wipe: true,
                ..Changes::default()
            })
            .await?;
        Ok(())
    }

    /// The primary republishes its list without devices the server no longer has (a companion that
    /// removed itself).
    pub(crate) async fn reconcile_own_list(&self) -> Result<()> {
        let me = self.registered_identity().await?;
        if me.device_id != DeviceId::PRIMARY {
            return Ok(());
        }
        let own = self.peer_devices(&me.phone, true).await?;
        let conn = self.connection(Duration::from_secs(10)).await?;
        let present: HashSet<u32> = match conn
            .request(request::Body::ListOwnDevices(ListOwnDevices {}))
            .await?
        {
            response::Body::OwnDevices(d) => d.devices.iter().map(|s| s.device_id).collect(),
            _ => return Err(unexpected()),
        };
        let mut content = own.list.content.clone();
        let before = content.devices.len();
        content.devices.retain(|d| present.contains(&d.device_id));
        if content.devices.len() == before {
            return Ok(());
        }
        let account = self.account_key(&me)?;
        self.publish_own_list(&me, &account, content, Vec::new())
            .await?;
        self.rotate_app_state_key().await?;
        Ok(())
    }

    /// The safety number with `peer`: 60 digits from the two account keys only, so linking or removing
    /// devices never changes it; re-registering does.
    pub async fn safety_number(&self, peer: &PhoneNumber) -> Result<String> {
        let me = self.registered_identity().await?;
        let theirs = self.peer_devices(peer, false).await?;
        Ok(safety_number(
            &me.phone,
            &me.account_key,
            peer,
            &theirs.account_key,
        ))
    }
}
