//! `UploadKeys` and `ClaimKeys`: one-time and fallback prekeys. The server stores what a device uploads and
//! hands out one key per claim; it cannot forge a key because every key carries the device's signature,
//! which the claimer checks.

use natter_proto::limits::{MAX_ONE_TIME_KEYS_STORED, ONE_TIME_KEYS_LOW};
use natter_proto::wire::{
    ClaimKeys, ClaimedKey, ClaimedKeys, Error, ErrorCode, KeysLow, KeysUploaded, Push,
    SignedPreKey, UploadKeys, push, response,
};
use natter_proto::{DeviceId, PhoneNumber};

use super::register::unknown_account;
use super::{RequestCtx, bad_request, store_error};
use crate::delivery::ConnEvent;
use crate::store::{PreKeyRecord, Store};

fn to_record(k: &SignedPreKey) -> Result<PreKeyRecord, Error> {
    let key: [u8; 32] = k
        .key
        .as_slice()
        .try_into()
        .map_err(|_| bad_request("prekey must be 32 bytes"))?;
    if k.key_id.is_empty() || k.key_id.len() > 64 || k.signature.len() != 64 {
        return Err(bad_request("malformed prekey"));
    }
    Ok(PreKeyRecord {
        key_id: k.key_id.clone(),
        key,
        signature: k.signature.clone(),
    })
}

fn to_wire(r: PreKeyRecord) -> SignedPreKey {
    SignedPreKey {
        key_id: r.key_id,
        key: r.key.to_vec(),
        signature: r.signature,
    }
}

/// Stores the logged-in device's new prekeys.
pub async fn upload_keys(ctx: &RequestCtx, r: UploadKeys) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let store = &ctx.state.store;
    let otks = r
        .one_time_keys
        .iter()
        .map(to_record)
        .collect::<Result<Vec<_>, _>>()?;
    let fallback = r.fallback_key.as_ref().map(to_record).transpose()?;
    let have = store
        .count_one_time_keys(&login.phone, login.device)
        .await
        .map_err(store_error)?;
    if have as usize + otks.len() > MAX_ONE_TIME_KEYS_STORED {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("the server keeps at most {MAX_ONE_TIME_KEYS_STORED} one-time keys per device"),
        ));
    }
    if let Some(fb) = &fallback {
        store
            .set_fallback_key(&login.phone, login.device, fb)
            .await
            .map_err(store_error)?;
    }
    let count = if otks.is_empty() {
        have
    } else {
        store
            .add_one_time_keys(&login.phone, login.device, &otks)
            .await
            .map_err(store_error)?
    };
    Ok(response::Body::KeysUploaded(KeysUploaded {
        one_time_key_count: count,
    }))
}

/// Claims one prekey for each requested device of an account.
pub async fn claim_keys(ctx: &RequestCtx, r: ClaimKeys) -> Result<response::Body, Error> {
    ctx.require_login()?;
    let phone = super::parse_phone(&r.phone)?;
    let store = &ctx.state.store;
    let devices: Vec<DeviceId> = if r.device_ids.is_empty() {
        let all = store.list_devices(&phone).await.map_err(store_error)?;
        if all.is_empty() {
            return Err(unknown_account(&phone));
        }
        all.into_iter().map(|d| d.device_id).collect()
    } else {
        r.device_ids
            .iter()
            .map(|&d| DeviceId::new(d).map_err(|e| bad_request(e.to_string())))
            .collect::<Result<_, _>>()?
    };
    let mut keys = Vec::with_capacity(devices.len());
    for device in devices {
        if let Some(k) = claim_one(ctx, &**store, &phone, device).await? {
            keys.push(k);
        }
    }
    Ok(response::Body::ClaimedKeys(ClaimedKeys { keys }))
}

async fn claim_one(
    ctx: &RequestCtx,
    store: &dyn Store,
    phone: &PhoneNumber,
    device: DeviceId,
) -> Result<Option<ClaimedKey>, Error> {
    let Some(claimed) = store
        .claim_prekey(phone, device)
        .await
        .map_err(store_error)?
    else {
        return Ok(None);
    };
    if (claimed.remaining as usize) < ONE_TIME_KEYS_LOW {
        ctx.state.router.notify(
            phone,
            device,
            ConnEvent::push(Push {
                body: Some(push::Body::KeysLow(KeysLow {
                    remaining: claimed.remaining,
                })),
            }),
        );
    }
    Ok(Some(ClaimedKey {
        device_id: device.get(),
        prekey: Some(to_wire(claimed.prekey)),
        fallback: claimed.fallback,
    }))
}
