//! Device lists: `GetDevices` serves an account's key and signed list exactly as its primary uploaded
//! them; `PublishDeviceList`, `RemoveSelf` and `ListOwnDevices` change and show the caller's own.

use natter_proto::device_list::DeviceListContent;

use natter_proto::wire::{
    DeviceListPublished, DeviceStatus, Devices, Done, Error, ErrorCode, GetDevices, LinkDone,
    ListOwnDevices, OwnDevices, PublishDeviceList, Push, RemoveSelf, SignedDeviceList, push,
    response,
};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;

use super::register::unknown_account;
use super::{RequestCtx, bad_request, store_error};

use crate::store::{DeviceListUpdate, DeviceRecord, StoreError};

/// Serves an account's signed device list.
pub async fn get_devices(ctx: &RequestCtx, r: GetDevices) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let phone = super::parse_phone(&r.phone)?;
    let account = ctx
        .state
        .store
        .get_account(&phone)
        .await
        .map_err(store_error)?
        .ok_or_else(|| unknown_account(&phone))?;
    ctx.state.watchers.add(&phone, &login.phone);
    let list = SignedDeviceList::decode(account.device_list.as_slice())
        .map_err(|_| store_error(crate::store::StoreError::Corrupt("device list".into())))?;
    Ok(response::Body::Devices(Devices {
        account_key: account.account_key.to_vec(),
        device_list: Some(list),
    }))
}

/// Tells every online device that follows `phone` (and `phone`'s own devices) that its list changed.
/// Watchers are known to the node that served their request, so in a cluster every node is asked to
/// tell the watchers it knows.
pub fn notify_list_changed(state: &crate::ServerState, phone: &PhoneNumber) {
    let mut accounts = state.watchers.of(phone);
    accounts.push(phone.clone());
    crate::bus::inbound::notify_watchers(state, phone, accounts);
    let bus = state.router.bus().clone();
    if bus.clustered() {
        let msg = crate::bus::messages::BusMessage::new(crate::bus::messages::Body::ListChanged(
            crate::bus::messages::Account {
                phone: phone.as_str().to_owned(),
            },
        ));
        tokio::spawn(async move {
            if let Err(e) = bus.broadcast(&msg).await {
                tracing::warn!(error = %e, "device-list change not broadcast");
            }
        });
    }
}

/// The primary publishes a new signed device list: it may add the companion of a link session and drop
/// devices; it may not change the keys of a device that stays.
pub async fn publish_device_list(
    ctx: &RequestCtx,
    r: PublishDeviceList,
) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    if login.device != DeviceId::PRIMARY {
        return Err(Error::new(
            ErrorCode::NotPrimary,
            "only the primary device can change the device list",
        ));
    }
    let state = &ctx.state;
    let signed = r
        .device_list
        .ok_or_else(|| bad_request("missing device list"))?;
    let content = DeviceListContent::decode(signed.content.as_slice())
        .map_err(|_| bad_request("malformed device list"))?;
    content
        .validate()
        .map_err(|e| bad_request(format!("device list: {e}")))?;
    let account = state
        .store
        .get_account(&login.phone)
        .await
        .map_err(store_error)?
        .ok_or_else(|| unknown_account(&login.phone))?;
    let stale = |why: String| Error::new(ErrorCode::StaleDeviceList, why);
    if content.phone != login.phone.as_str() || content.account_key != account.account_key {
        return Err(bad_request("the device list belongs to another account"));
    }
    if content.version <= account.device_list_version {
        return Err(stale(format!(
            "device list version {} is not newer than the stored {}",
            content.version, account.device_list_version
        )));
    }
    let stored = state
        .store
        .list_devices(&login.phone)
        .await
        .map_err(store_error)?;
    let mut removed = Vec::new();
    for d in &stored {
        match content.device(d.device_id) {
            Some(e) if e.noise_key == d.noise_key && e.identity_ed == d.identity_ed => {}
            Some(_) => {
                return Err(stale(format!(
                    "the list changes the keys of device {}",
                    d.device_id
                )));
            }
            None if d.device_id == DeviceId::PRIMARY => {
                return Err(bad_request("the primary cannot remove itself"));
            }
            None => removed.push(d.device_id),
        }
    }
    let mut added = Vec::new();
    let mut link = None;
    for e in &content.devices {
        let id = DeviceId::new(e.device_id).map_err(|e| bad_request(e.to_string()))?;
        if stored.iter().any(|d| d.device_id == id) {
            continue;
        }
        let reference: [u8; 16] =
            r.link_reference.as_slice().try_into().map_err(|_| {
                bad_request("a new device needs the link reference that introduced it")
            })?;
        let session = state.links.get(&reference).await.ok_or_else(|| {
            Error::new(
                ErrorCode::LinkExpired,
                "the link code expired before the list was published: link again",
            )
        })?;
        let offered_by_us = session.offered_by.as_ref() == Some(&login.phone);
        if !offered_by_us || e.noise_key != session.companion_noise || link.is_some() {
            return Err(bad_request(
                "a new device must be the companion this primary linked",
            ));
        }
        let (Ok(noise_key), Ok(identity_ed)) = (
            <[u8; 32]>::try_from(e.noise_key.as_slice()),
            <[u8; 32]>::try_from(e.identity_ed.as_slice()),
        ) else {
            return Err(bad_request("device keys must be 32 bytes"));
        };
        added.push(DeviceRecord {
            phone: login.phone.clone(),
            device_id: id,
            noise_key,
            identity_ed,
            last_seen_ms: crate::now_ms(),
        });
        link = Some((reference, session, id));
    }
    let update = DeviceListUpdate {
        device_list: signed.encode_to_vec(),
        version: content.version,
        added,
        removed: removed.clone(),
    };
    let updated = state.store.update_devices(&login.phone, &update).await;
    state.device_cache.invalidate(&login.phone);
    match updated {
        Ok(()) => {}
        Err(StoreError::Conflict) => {
            return Err(stale("another device list was published meanwhile".into()));
        }
        Err(e) => return Err(store_error(e)),
    }
    for device in removed {
        state.router.kick(
            &login.phone,
            device,
            "this device was unlinked from its account",
        );
    }
    if let Some((reference, session, id)) = link {
        let push = Push {
            body: Some(push::Body::LinkDone(LinkDone {
                phone: login.phone.as_str().to_owned(),
                device_id: id.get(),
            })),
        };
        state
            .links
            .push_to_companion(&reference, &session, push)
            .await;
        state.links.close(&reference).await;
    }
    notify_list_changed(state, &login.phone);
    tracing::info!(version = content.version, "device list published");
    Ok(response::Body::DeviceListPublished(DeviceListPublished {
        version: content.version,
    }))
}

/// A companion leaves its account. The primary is told, and republishes the list without it.
pub async fn remove_self(ctx: &RequestCtx, _r: RemoveSelf) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    if login.device == DeviceId::PRIMARY {
        return Err(bad_request(
            "the primary cannot unlink itself: register the number again instead",
        ));
    }
    ctx.state
        .store
        .remove_device(&login.phone, login.device)
        .await
        .map_err(store_error)?;
    ctx.state.device_cache.invalidate(&login.phone);
    notify_list_changed(&ctx.state, &login.phone);
    Ok(response::Body::Done(Done {}))
}

/// The account's devices with last-seen times and whether they are online.
pub async fn list_own_devices(
    ctx: &RequestCtx,
    _r: ListOwnDevices,
) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let records = ctx
        .state
        .store
        .list_devices(&login.phone)
        .await
        .map_err(store_error)?;
    let mut devices = Vec::with_capacity(records.len());
    for d in records {
        devices.push(DeviceStatus {
            device_id: d.device_id.get(),
            last_seen_ms: d.last_seen_ms,
            online: ctx.state.router.is_online(&login.phone, d.device_id).await,
        });
    }
    Ok(response::Body::OwnDevices(OwnDevices { devices }))
}
