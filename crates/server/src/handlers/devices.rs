//! `GetDevices`: an account's key and signed device list, exactly as the account's primary uploaded them.

use natter_proto::wire::{Devices, Error, GetDevices, SignedDeviceList, response};
use prost::Message;

use super::register::unknown_account;
use super::{RequestCtx, store_error};

/// Serves an account's signed device list.
pub async fn get_devices(ctx: &RequestCtx, r: GetDevices) -> Result<response::Body, Error> {
    ctx.require_login()?;
    let phone = super::parse_phone(&r.phone)?;
    let account = ctx
        .state
        .store
        .get_account(&phone)
        .await
        .map_err(store_error)?
        .ok_or_else(|| unknown_account(&phone))?;
    let list = SignedDeviceList::decode(account.device_list.as_slice())
        .map_err(|_| store_error(crate::store::StoreError::Corrupt("device list".into())))?;
    Ok(response::Body::Devices(Devices {
        account_key: account.account_key.to_vec(),
        device_list: Some(list),
    }))
}
