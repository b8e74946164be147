//! App-state sync: `PushAppState` appends an opaque patch (and optionally a snapshot) to one of the
//! caller's own collections if it is still at the patch's base version, and tells the account's other
//! online devices (`AppStateChanged`); `FetchAppState` serves a collection after a version. The server
//! cannot read or verify the contents: devices check the MACs.

use natter_proto::DeviceId;
use natter_proto::limits::{MAX_APP_STATE_PATCHES_PER_FETCH, MAX_DEVICES_PER_ACCOUNT};
use natter_proto::wire::{
    AppState, AppStateChanged, AppStatePatch, AppStatePushed, AppStateSnapshot, Error, ErrorCode,
    FetchAppState, Push, PushAppState, push, response,
};
use prost::Message;

use super::{RequestCtx, bad_request, store_error};
use crate::delivery::ConnEvent;
use crate::store::StoreError;

/// The collections a device may use.
pub use natter_proto::wire::APP_STATE_COLLECTIONS as COLLECTIONS;

fn check_collection(name: &str) -> Result<(), Error> {
    if COLLECTIONS.contains(&name) {
        Ok(())
    } else {
        Err(bad_request(format!(
            "unknown app-state collection {name:?} (expected one of {})",
            COLLECTIONS.join(", ")
        )))
    }
}

fn check_patch(p: &AppStatePatch, version: u64) -> Result<(), Error> {
    if p.version != version {
        return Err(bad_request(
            "app-state patch version must be base_version + 1",
        ));
    }
    p.validate()
        .map_err(|e| bad_request(format!("app-state patch: {e}")))
}

fn check_snapshot(s: &AppStateSnapshot, version: u64) -> Result<(), Error> {
    if s.version != version {
        return Err(bad_request(
            "app-state snapshot version must be the patch's version",
        ));
    }
    s.validate()
        .map_err(|e| bad_request(format!("app-state snapshot: {e}")))
}

/// Appends a patch to one of the caller's collections.
pub async fn push_app_state(ctx: &RequestCtx, r: PushAppState) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    check_collection(&r.collection)?;
    let version = r
        .base_version
        .checked_add(1)
        .ok_or_else(|| bad_request("app-state base version out of range"))?;
    let patch = r
        .patch
        .ok_or_else(|| bad_request("missing app-state patch"))?;
    check_patch(&patch, version)?;
    if let Some(s) = &r.snapshot {
        check_snapshot(s, version)?;
    }
    let snapshot = r.snapshot.map(|s| s.encode_to_vec());
    let stored = ctx
        .state
        .store
        .push_app_state(
            &login.phone,
            &r.collection,
            r.base_version,
            &patch.encode_to_vec(),
            snapshot.as_deref(),
        )
        .await;
    let version = match stored {
        Ok(v) => v,
        Err(StoreError::AppStateConflict { current }) => {
            return Err(Error::new(
                ErrorCode::AppStateConflict,
                format!(
                    "the collection {} is at version {current}, not {}: fetch, re-apply and push again",
                    r.collection, r.base_version
                ),
            ));
        }
        Err(e) => return Err(store_error(e)),
    };
    for id in 1..=MAX_DEVICES_PER_ACCOUNT as u32 {
        if let Ok(device) = DeviceId::new(id)
            && device != login.device
        {
            ctx.state.router.notify(
                &login.phone,
                device,
                ConnEvent::push(Push {
                    body: Some(push::Body::AppStateChanged(AppStateChanged {
                        collection: r.collection.clone(),
                        version,
                    })),
                }),
            );
        }
    }
    Ok(response::Body::AppStatePushed(AppStatePushed { version }))
}

/// Serves one of the caller's collections after a version.
pub async fn fetch_app_state(ctx: &RequestCtx, r: FetchAppState) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    check_collection(&r.collection)?;
    let fetched = ctx
        .state
        .store
        .fetch_app_state(
            &login.phone,
            &r.collection,
            r.after_version,
            MAX_APP_STATE_PATCHES_PER_FETCH,
        )
        .await
        .map_err(store_error)?;
    let corrupt = |_| store_error(StoreError::Corrupt("app-state record".into()));
    let snapshot = fetched
        .snapshot
        .map(|(v, bytes)| {
            AppStateSnapshot::decode(bytes.as_slice())
                .map(|mut s| {
                    s.version = v;
                    s
                })
                .map_err(corrupt)
        })
        .transpose()?;
    let patches = fetched
        .patches
        .into_iter()
        .map(|(v, bytes)| {
            AppStatePatch::decode(bytes.as_slice())
                .map(|mut p| {
                    p.version = v;
                    p
                })
                .map_err(corrupt)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(response::Body::AppState(AppState {
        collection: r.collection,
        snapshot,
        patches,
        version: fetched.version,
    }))
}
