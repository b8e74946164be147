//! `RequestCode` and `VerifyCode`: registering a phone number and creating its account with this
//! connection's device as the primary.

use natter_proto::device_list::DeviceListContent;
use natter_proto::wire::{
    CodeSent, Error, ErrorCode, Registered, RequestCode, Response, VerifyCode, response,
};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;

use super::{Login, RequestCtx, bad_request, error_response, ok_response, store_error};
use crate::store::{AccountRecord, DeviceRecord, NewAccount};

/// Sends a code by SMS.
pub async fn request_code(ctx: &RequestCtx, r: RequestCode) -> Result<response::Body, Error> {
    let phone = super::parse_phone(&r.phone)?;
    let sent: CodeSent = ctx
        .state
        .registration
        .request_code(&*ctx.state.store, &phone, ctx.peer_ip, crate::now_ms())
        .await?;
    Ok(response::Body::CodeSent(sent))
}

/// Checks the code and creates the account. Returns the login the connection switches to on success.
pub async fn verify_code(ctx: &RequestCtx, id: u64, r: VerifyCode) -> (Response, Option<Login>) {
    match verify(ctx, r).await {
        Ok((body, login)) => (ok_response(id, body), Some(login)),
        Err(e) => (error_response(id, e), None),
    }
}

async fn verify(ctx: &RequestCtx, r: VerifyCode) -> Result<(response::Body, Login), Error> {
    let phone = super::parse_phone(&r.phone)?;
    let state = &ctx.state;
    let now = crate::now_ms();
    // The account key and list are checked before the code so that a malformed request does not burn
    // one of the user's attempts.
    let account_key: [u8; 32] = r
        .account_key
        .as_slice()
        .try_into()
        .map_err(|_| bad_request("account key must be 32 bytes"))?;
    let signed = r
        .device_list
        .ok_or_else(|| bad_request("missing device list"))?;
    let content = DeviceListContent::decode(signed.content.as_slice())
        .map_err(|_| bad_request("malformed device list"))?;
    content
        .validate()
        .map_err(|e| bad_request(format!("device list: {e}")))?;
    let primary = content
        .device(DeviceId::PRIMARY)
        .filter(|_| content.devices.len() == 1)
        .ok_or_else(|| bad_request("a new account's device list holds exactly the primary"))?;
    if content.phone != phone.as_str() || content.account_key != account_key || content.version == 0
    {
        return Err(bad_request("device list does not match the account"));
    }
    if primary.noise_key != ctx.remote_static {
        return Err(bad_request(
            "the primary's transport key must be this connection's key",
        ));
    }
    let identity_ed: [u8; 32] = primary
        .identity_ed
        .as_slice()
        .try_into()
        .map_err(|_| bad_request("device key must be 32 bytes"))?;

    state
        .registration
        .check_code(&*state.store, &phone, r.code.trim(), ctx.peer_ip, now)
        .await?;

    let new = NewAccount {
        account: AccountRecord {
            phone: phone.clone(),
            account_key,
            device_list: signed.encode_to_vec(),
            device_list_version: content.version,
            created_at_ms: now,
        },
        primary: DeviceRecord {
            phone: phone.clone(),
            device_id: DeviceId::PRIMARY,
            noise_key: ctx.remote_static,
            identity_ed,
            last_seen_ms: now,
        },
    };
    let removed = state
        .store
        .create_account(&new)
        .await
        .map_err(store_error)?;
    state.device_cache.invalidate(&phone);
    state.block_cache.invalidate(&phone);
    state.registration.consume(&*state.store, &phone).await?;
    for device in &removed {
        state.router.kick(
            &phone,
            *device,
            "this phone number was registered on another device",
        );
    }
    tracing::info!(replaced = !removed.is_empty(), "account registered");
    Ok((
        response::Body::Registered(Registered {
            device_id: DeviceId::PRIMARY.get(),
            replaced_previous: !removed.is_empty(),
        }),
        Login {
            phone,
            device: DeviceId::PRIMARY,
        },
    ))
}

/// The error for an account that does not exist.
pub fn unknown_account(phone: &PhoneNumber) -> Error {
    Error::new(
        ErrorCode::UnknownAccount,
        format!("{phone} is not on Natter"),
    )
}
