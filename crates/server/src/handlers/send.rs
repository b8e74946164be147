//! `SendMessage`: a 1:1 message, one ciphertext per device. The device set must match the recipient's
//! devices plus the sender's other devices exactly (those on the accounts' signed lists), so no device is
//! ever skipped silently; the message is durable for every device before the sender hears "sent".

use std::collections::BTreeSet;

use natter_proto::device_list::DeviceListContent;
use natter_proto::limits::MAX_DECRYPT_RETRIES;
use natter_proto::wire::{
    DeviceMessage, Error, ErrorCode, MismatchedDevices, SendMessage, Sent, SignedDeviceList,
    response,
};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use prost::Message;

use super::register::unknown_account;
use super::{Login, RequestCtx, bad_request, store_error};
use crate::store::{
    EnqueueOutcome, NewEnvelope, NewMessage, QueuedEnvelope, RetryInfo, Store, StoreError,
};

/// Validates, stores and routes one message.
pub async fn send_message(ctx: &RequestCtx, r: SendMessage) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let recipient = super::parse_phone(&r.recipient)?;
    let message_id =
        MessageId::from_slice(&r.message_id).map_err(|e| bad_request(e.to_string()))?;
    let store = &ctx.state.store;
    let retry = if r.retry_of.is_empty() {
        None
    } else {
        let of = MessageId::from_slice(&r.retry_of).map_err(|e| bad_request(e.to_string()))?;
        if r.retry_attempt == 0 || r.retry_attempt > MAX_DECRYPT_RETRIES {
            return Err(bad_request(format!(
                "retry attempts run from 1 to {MAX_DECRYPT_RETRIES}"
            )));
        }
        Some(RetryInfo {
            of,
            attempt: r.retry_attempt,
        })
    };

    let peer_devices: BTreeSet<DeviceId> = ctx
        .state
        .device_ids(&recipient)
        .await
        .map_err(store_error)?
        .iter()
        .copied()
        .collect();
    if peer_devices.is_empty() {
        return Err(unknown_account(&recipient));
    }
    super::social::check_not_blocked(ctx, &recipient, &login.phone).await?;
    let own_devices: BTreeSet<DeviceId> = if recipient == login.phone {
        BTreeSet::new()
    } else {
        ctx.state
            .device_ids(&login.phone)
            .await
            .map_err(store_error)?
            .iter()
            .copied()
            .filter(|d| *d != login.device)
            .collect()
    };
    // A note to self goes to the sender's other devices only.
    let peer_devices: BTreeSet<DeviceId> = if recipient == login.phone {
        peer_devices
            .into_iter()
            .filter(|d| *d != login.device)
            .collect()
    } else {
        peer_devices
    };

    let mut to_peer = BTreeSet::new();
    let mut to_own = BTreeSet::new();
    let mut envelopes = Vec::with_capacity(r.messages.len());
    for m in r.messages {
        let (phone, device) = check_device_message(&m)?;
        let set = if phone == recipient {
            &mut to_peer
        } else if phone == login.phone {
            &mut to_own
        } else {
            return Err(bad_request(
                "a message may only go to the recipient's and the sender's devices",
            ));
        };
        if !set.insert(device) {
            return Err(bad_request("a device is addressed twice"));
        }
        envelopes.push(NewEnvelope {
            phone,
            device_id: device,
            olm_type: m.olm_type,
            ciphertext: m.ciphertext,
        });
    }
    // A device record that the account's signed list does not hold (a database altered behind
    // natterd's back) must neither receive the message nor block it: only listed devices are required.
    let peer_devices = listed_only(&**store, &recipient, peer_devices, &to_peer).await?;
    let own_devices = listed_only(&**store, &login.phone, own_devices, &to_own).await?;
    let mut mismatched = Vec::new();
    // A resend goes to the one device that asked for it, and a message to the sender's own account
    // (history, app-state keys, requests between its devices) to those of its devices it chooses:
    // they must exist, nothing more.
    let partial = retry.is_some() || recipient == login.phone;
    for (phone, wanted, got) in [
        (&recipient, &peer_devices, &to_peer),
        (&login.phone, &own_devices, &to_own),
    ] {
        let matches = if partial {
            got.is_subset(wanted) && !(to_peer.is_empty() && to_own.is_empty())
        } else {
            wanted == got
        };
        if !matches {
            mismatched.push(MismatchedDevices {
                phone: phone.as_str().to_owned(),
                missing: if partial {
                    Vec::new()
                } else {
                    wanted.difference(got).map(|d| d.get()).collect()
                },
                extra: got.difference(wanted).map(|d| d.get()).collect(),
            });
        }
    }
    if !mismatched.is_empty() {
        let mut e = Error::new(
            ErrorCode::MismatchedDevices,
            "the device lists changed: refresh them and encrypt again",
        );
        e.mismatched = mismatched;
        return Err(e);
    }

    store_and_route(ctx, login, message_id, envelopes, retry, store_error).await
}

/// The end of every send (1:1 and group): refuses it if a recipient device's queue is full (a device
/// that does not take its mail, offline for long or flooded, stops receiving more), stores the message
/// durably (all envelopes or none), then hands the stored envelopes to the router. `on_store_error` turns
/// a store failure into the client's error.
pub(crate) async fn store_and_route(
    ctx: &RequestCtx,
    login: &Login,
    message_id: MessageId,
    envelopes: Vec<NewEnvelope>,
    retry: Option<RetryInfo>,
    on_store_error: impl FnOnce(StoreError) -> Error,
) -> Result<response::Body, Error> {
    let limits = &ctx.state.limits;
    let store = &ctx.state.store;
    for env in &envelopes {
        limits
            .check_queue(
                &**store,
                &env.phone,
                env.device_id,
                env.ciphertext.len() as u64,
            )
            .await
            .map_err(store_error)??;
    }
    let now = crate::now_ms();
    let outcome = store
        .enqueue(NewMessage {
            sender: login.phone.clone(),
            sender_device: login.device,
            message_id,
            server_ts_ms: now,
            expires_at_ms: now + ctx.state.config.envelope_retention.as_millis() as u64,
            envelopes,
            retry,
        })
        .await
        .map_err(on_store_error)?;
    match outcome {
        EnqueueOutcome::Stored(queued) => {
            route(ctx, queued);
            Ok(response::Body::Sent(Sent {
                server_ts_ms: now,
                duplicate: false,
            }))
        }
        EnqueueOutcome::Duplicate { server_ts_ms } => Ok(response::Body::Sent(Sent {
            server_ts_ms,
            duplicate: true,
        })),
    }
}

/// Hands stored envelopes to the router (it wakes the online devices; the others load them later).
pub(crate) fn route(ctx: &RequestCtx, queued: Vec<QueuedEnvelope>) {
    for env in queued {
        ctx.state
            .limits
            .queued(&env.phone, env.device_id, env.ciphertext.len() as u64);
        ctx.state.router.deliver(env);
    }
}

/// `wanted` without the devices that are not on `phone`'s signed device list. The list is only read
/// when the sender left out a device of `wanted`, so the usual send costs nothing more.
async fn listed_only(
    store: &dyn Store,
    phone: &PhoneNumber,
    wanted: BTreeSet<DeviceId>,
    got: &BTreeSet<DeviceId>,
) -> Result<BTreeSet<DeviceId>, Error> {
    if wanted.is_subset(got) {
        return Ok(wanted);
    }
    let Some(account) = store.get_account(phone).await.map_err(store_error)? else {
        return Ok(wanted);
    };
    let listed: BTreeSet<u32> = SignedDeviceList::decode(account.device_list.as_slice())
        .ok()
        .and_then(|l| DeviceListContent::decode(l.content.as_slice()).ok())
        .map(|c| c.devices.iter().map(|d| d.device_id).collect())
        .ok_or_else(|| store_error(StoreError::Corrupt("device list".into())))?;
    Ok(wanted
        .into_iter()
        .filter(|d| listed.contains(&d.get()))
        .collect())
}

fn check_device_message(m: &DeviceMessage) -> Result<(PhoneNumber, DeviceId), Error> {
    let phone = super::parse_phone(&m.phone)?;
    let device = DeviceId::new(m.device_id).map_err(|e| bad_request(e.to_string()))?;
    if m.olm_type > 1 {
        return Err(bad_request("unknown Olm message type"));
    }
    if m.ciphertext.is_empty() {
        return Err(Error::new(ErrorCode::BadRequest, "empty ciphertext"));
    }
    Ok((phone, device))
}
