//! `RequestUpload` and `RequestDownload`: grants for the blob HTTP service (see [`crate::media`]).
//! Upload grants are for the owner only; any account that knows a complete blob's id may download its
//! ciphertext, and asking to download keeps the blob for another retention period (forwarding).

use natter_proto::limits::{BLOB_RETENTION, MAX_BLOB_BYTES};
use natter_proto::wire::{Error, ErrorCode, RequestDownload, RequestUpload, response};

use super::{RequestCtx, bad_request, store_error};
use crate::media::{Direction, new_blob_id, valid_blob_id};
use crate::store::{BlobRecord, StoreError};

fn unknown_blob() -> Error {
    Error::new(
        ErrorCode::UnknownBlob,
        "no such blob: it was never uploaded completely, or it expired",
    )
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "media grant failed");
    Error::new(
        ErrorCode::Unavailable,
        "the server could not complete the request; retry",
    )
}

/// Grants an upload: a new blob of `size` bytes, or the rest of one this account started.
pub async fn request_upload(ctx: &RequestCtx, r: RequestUpload) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let media = &ctx.state.media;
    let store = &ctx.state.store;
    let phone = login.phone.as_str();
    if !r.blob_id.is_empty() {
        if !valid_blob_id(&r.blob_id) {
            return Err(bad_request("a blob id is 32 lowercase hex digits"));
        }
        let blob = store
            .get_blob(&r.blob_id)
            .await
            .map_err(store_error)?
            .filter(|b| b.owner == login.phone)
            .ok_or_else(unknown_blob)?;
        if blob.complete {
            return Err(Error::new(
                ErrorCode::BadRequest,
                "this blob is already complete: nothing left to upload",
            ));
        }
        return Ok(response::Body::BlobGrant(media.grant(
            Direction::Up,
            &blob.id,
            phone,
            blob.size,
            blob.offset,
        )));
    }
    if r.size == 0 || r.size > MAX_BLOB_BYTES {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!(
                "a media file must be between 1 byte and 2 GiB (at most {MAX_BLOB_BYTES} bytes encrypted)"
            ),
        ));
    }
    let now = crate::now_ms();
    let blob = BlobRecord {
        id: new_blob_id().map_err(unavailable)?,
        owner: login.phone.clone(),
        size: r.size,
        offset: 0,
        complete: false,
        created_at_ms: now,
        expires_at_ms: now.saturating_add(BLOB_RETENTION.as_millis() as u64),
    };
    let quota = media.quota_bytes();
    match store.create_blob(&blob, quota, now).await {
        Ok(true) => {}
        Ok(false) => {
            let used = store.blob_usage(&login.phone, now).await.unwrap_or(0);
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "media storage quota exceeded: {} MiB of {} MiB in use, this file needs {} MiB more; \
                     wait until older media expire",
                    used.div_ceil(1 << 20),
                    quota / (1 << 20),
                    r.size.div_ceil(1 << 20)
                ),
            ));
        }
        Err(StoreError::Conflict) => return Err(unavailable("blob id collision")),
        Err(e) => return Err(store_error(e)),
    }
    tracing::debug!(blob = %blob.id, size = blob.size, "upload granted");
    Ok(response::Body::BlobGrant(media.grant(
        Direction::Up,
        &blob.id,
        phone,
        blob.size,
        0,
    )))
}

/// Grants a download of a complete blob and keeps it for another retention period.
pub async fn request_download(
    ctx: &RequestCtx,
    r: RequestDownload,
) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    if !valid_blob_id(&r.blob_id) {
        return Err(unknown_blob());
    }
    let store = &ctx.state.store;
    let blob = store
        .get_blob(&r.blob_id)
        .await
        .map_err(store_error)?
        .filter(|b| b.complete)
        .ok_or_else(unknown_blob)?;
    let expires = crate::now_ms().saturating_add(BLOB_RETENTION.as_millis() as u64);
    match store.extend_blob(&blob.id, expires).await {
        Ok(()) => {}
        Err(StoreError::NoSuchBlob) => return Err(unknown_blob()),
        Err(e) => return Err(store_error(e)),
    }
    Ok(response::Body::BlobGrant(ctx.state.media.grant(
        Direction::Down,
        &blob.id,
        login.phone.as_str(),
        blob.size,
        blob.size,
    )))
}
