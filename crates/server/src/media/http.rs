//! The blob HTTP service (HTTP/1.1, axum). Every request carries `Authorization: Natter {token}` and
//! `X-Natter-Account: {phone}`; errors answer with a short plain-text body.
//!
//! - `PUT /v1/blobs/{id}?offset=N`: appends the body at byte N, which must equal the bytes received so
//!   far (else 409 with `Upload-Offset`). The body streams to the staging file; bytes past the declared
//!   size are refused with 413 (and nothing of that request is kept). Answers 200 with `Upload-Offset`;
//!   when the last byte arrives the blob moves into the blob store and becomes downloadable.
//! - `HEAD /v1/blobs/{id}` (upload token): 200 with `Upload-Offset` and `Upload-Length`.
//! - `GET /v1/blobs/{id}` (download token): the blob, streamed, with `Content-Length`; `Range: bytes=N-`
//!   or `bytes=N-M` gives 206 with `Content-Range`, an unsatisfiable range 416.
//!
//! Token failures: missing or malformed credentials and expired tokens 401; a token for another account,
//! blob or direction 403. An unknown (or, for `GET`, incomplete) blob is 404.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Direction, Media, TokenError, valid_blob_id};
use crate::store::StoreError;

/// Name of the header with the upload offset.
pub const UPLOAD_OFFSET: &str = "upload-offset";
/// Name of the header with the blob's declared size (on `HEAD`).
pub const UPLOAD_LENGTH: &str = "upload-length";
/// Name of the header naming the requesting account.
pub const ACCOUNT_HEADER: &str = "x-natter-account";
/// Write buffer between the request body and the staging file.
const WRITE_BUFFER: usize = 256 * 1024;

/// The service's routes.
pub fn router(media: Arc<Media>) -> Router {
    Router::new()
        .route(
            "/v1/blobs/{id}",
            put(put_blob).head(head_blob).get(get_blob),
        )
        .layer(DefaultBodyLimit::disable())
        .with_state(media)
}

/// Serves `listener` until `shutdown` turns true (then finishes the requests in flight).
pub async fn serve(listener: TcpListener, media: Arc<Media>, mut shutdown: watch::Receiver<bool>) {
    let app = router(media);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "blob HTTP service stopped");
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

fn with_offset(mut resp: Response, offset: u64) -> Response {
    resp.headers_mut()
        .insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    resp
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "blob request failed");
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server could not complete the request; retry\n",
    )
}

fn unknown_blob() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "unknown blob (never uploaded, or expired)\n",
    )
}

/// Checks the request's credentials for `dir` on blob `id`: `None` if allowed, else the refusal.
fn authorize(media: &Media, headers: &HeaderMap, dir: Direction, id: &str) -> Option<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Natter "));
    let account = headers.get(ACCOUNT_HEADER).and_then(|v| v.to_str().ok());
    let (Some(token), Some(account)) = (token, account) else {
        return Some(text(
            StatusCode::UNAUTHORIZED,
            "missing credentials: send Authorization: Natter <token> and X-Natter-Account: <phone>\n",
        ));
    };
    match media
        .tokens()
        .verify(token, dir, id, account.trim(), crate::now_ms())
    {
        Ok(()) => None,
        Err(e @ (TokenError::Malformed | TokenError::Expired)) => {
            Some(text(StatusCode::UNAUTHORIZED, format!("{e}\n")))
        }
        Err(e @ (TokenError::WrongDirection | TokenError::Mismatch)) => {
            Some(text(StatusCode::FORBIDDEN, format!("{e}\n")))
        }
    }
}

fn parse_offset(uri: &Uri) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("offset="))
        .and_then(|v| v.parse().ok())
}

async fn put_blob(
    State(media): State<Arc<Media>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(resp) = authorize(&media, &headers, Direction::Up, &id) {
        return resp;
    }
    if !valid_blob_id(&id) {
        return unknown_blob();
    }
    let Some(offset) = parse_offset(&uri) else {
        return text(StatusCode::BAD_REQUEST, "missing ?offset=N\n");
    };
    let Some(_guard) = media.begin_upload(&id) else {
        let current = match media.store().get_blob(&id).await {
            Ok(Some(b)) => b.offset,
            Ok(None) => return unknown_blob(),
            Err(e) => return unavailable(e),
        };
        return with_offset(
            text(
                StatusCode::CONFLICT,
                "another upload of this blob is in progress\n",
            ),
            current,
        );
    };
    // Read after taking the upload slot, so the offset cannot move under this request.
    let blob = match media.store().get_blob(&id).await {
        Ok(Some(b)) => b,
        Ok(None) => return unknown_blob(),
        Err(e) => return unavailable(e),
    };
    if blob.complete {
        return if offset == blob.size {
            with_offset(text(StatusCode::OK, "complete\n"), blob.size)
        } else {
            with_offset(
                text(StatusCode::CONFLICT, "the blob is already complete\n"),
                blob.size,
            )
        };
    }
    if offset != blob.offset {
        return with_offset(
            text(
                StatusCode::CONFLICT,
                format!("wrong offset: the server has {} bytes\n", blob.offset),
            ),
            blob.offset,
        );
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| offset.saturating_add(n) > blob.size) {
        return with_offset(too_large(blob.size), blob.offset);
    }

    let written = match media.staging() {
        super::Staging::Files(_) => {
            write_body(&media.staging_path(&id), offset, blob.size, body).await
        }
        super::Staging::Objects => write_part(&media, &id, offset, blob.size, body).await,
    };
    let received = match written {
        Ok(Written::Complete(n)) | Ok(Written::Interrupted(n)) => n,
        Ok(Written::TooLarge) => return with_offset(too_large(blob.size), blob.offset),
        Err(e) => return unavailable(e),
    };
    if let Err(e) = media.store().set_blob_offset(&id, received).await {
        return match e {
            StoreError::NoSuchBlob => unknown_blob(),
            e => unavailable(e),
        };
    }
    if received == blob.size {
        if let Err(e) = media.finalize(&id).await {
            return unavailable(e);
        }
        if let Err(e) = media.store().complete_blob(&id).await {
            return unavailable(e);
        }
        tracing::debug!(blob = %id, size = blob.size, "blob upload complete");
    }
    with_offset(text(StatusCode::OK, "ok\n"), received)
}

fn too_large(size: u64) -> Response {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body goes past the blob's declared size of {size} bytes\n"),
    )
}

/// What [`write_body`] did.
enum Written {
    /// The whole body was written; the staged length is now this.
    Complete(u64),
    /// The body broke off (client gone); what arrived is kept, the staged length is this.
    Interrupted(u64),
    /// The body went past the declared size; the file is back at its starting length.
    TooLarge,
}

/// Streams `body` into the staging file at `offset` (dropping anything staged beyond it), never past
/// `size`, and makes it durable.
async fn write_body(
    path: &std::path::Path,
    offset: u64,
    size: u64,
    body: Body,
) -> std::io::Result<Written> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .await?;
    // A crash after writing but before the offset was stored leaves extra bytes: drop them.
    file.set_len(offset).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut at = offset;
    let mut stream = body.into_data_stream();
    let mut interrupted = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::debug!(error = %e, "blob upload body interrupted");
                interrupted = true;
                break;
            }
        };
        if at.saturating_add(chunk.len() as u64) > size {
            let file = out.into_inner();
            file.set_len(offset).await?;
            file.sync_data().await?;
            return Ok(Written::TooLarge);
        }
        out.write_all(&chunk).await?;
        at += chunk.len() as u64;
    }
    out.flush().await?;
    out.into_inner().sync_data().await?;
    Ok(if interrupted {
        Written::Interrupted(at)
    } else {
        Written::Complete(at)
    })
}

/// Streams `body` into a staged part object at `offset` (object staging), never past `size`. A body that
/// breaks off keeps what arrived (the part is completed with it); one that goes too far keeps nothing.
async fn write_part(
    media: &Media,
    id: &str,
    offset: u64,
    size: u64,
    body: Body,
) -> std::io::Result<Written> {
    let objects = media.objects();
    let part = Media::part_path(id, offset);
    let upload = objects
        .put_multipart(&part)
        .await
        .map_err(std::io::Error::other)?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, 8 * 1024 * 1024);
    let mut at = offset;
    let mut stream = body.into_data_stream();
    let mut interrupted = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::debug!(error = %e, "blob upload body interrupted");
                interrupted = true;
                break;
            }
        };
        if at.saturating_add(chunk.len() as u64) > size {
            let _ = writer.abort().await;
            return Ok(Written::TooLarge);
        }
        if let Err(e) = writer.wait_for_capacity(2).await {
            let _ = writer.abort().await;
            return Err(std::io::Error::other(e));
        }
        writer.write(&chunk);
        at += chunk.len() as u64;
    }
    if at == offset {
        let _ = writer.abort().await;
    } else {
        writer.finish().await.map_err(std::io::Error::other)?;
    }
    Ok(if interrupted {
        Written::Interrupted(at)
    } else {
        Written::Complete(at)
    })
}

async fn head_blob(
    State(media): State<Arc<Media>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = authorize(&media, &headers, Direction::Up, &id) {
        return resp;
    }
    let blob = match media.store().get_blob(&id).await {
        Ok(Some(b)) => b,
        Ok(None) => return unknown_blob(),
        Err(e) => return unavailable(e),
    };
    let mut resp = with_offset(StatusCode::OK.into_response(), blob.offset);
    resp.headers_mut()
        .insert(UPLOAD_LENGTH, HeaderValue::from(blob.size));
    resp
}

/// A parsed `Range` header against a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeReq {
    /// No (usable) range: the whole blob.
    Whole,
    /// Bytes `start..end`.
    Part(u64, u64),
    /// Cannot be satisfied.
    Unsatisfiable,
}

/// Parses `bytes=N-` or `bytes=N-M`; other forms (suffix, several ranges) are ignored (whole blob), as
/// RFC 9110 allows.
fn parse_range(value: Option<&HeaderValue>, size: u64) -> RangeReq {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeReq::Whole;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeReq::Whole;
    };
    let Ok(first) = first.trim().parse::<u64>() else {
        return RangeReq::Whole;
    };
    let last = last.trim();
    let end = if last.is_empty() {
        size
    } else {
        match last.parse::<u64>() {
            Ok(last) if last >= first => last.saturating_add(1).min(size),
            Ok(_) => return RangeReq::Unsatisfiable,
            Err(_) => return RangeReq::Whole,
        }
    };
    if first >= size {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Part(first, end)
}

async fn get_blob(
    State(media): State<Arc<Media>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = authorize(&media, &headers, Direction::Down, &id) {
        return resp;
    }
    let blob = match media.store().get_blob(&id).await {
        Ok(Some(b)) if b.complete => b,
        Ok(_) => return unknown_blob(),
        Err(e) => return unavailable(e),
    };
    let (status, start, end) = match parse_range(headers.get(header::RANGE), blob.size) {
        RangeReq::Whole => (StatusCode::OK, 0, blob.size),
        RangeReq::Part(start, end) => (StatusCode::PARTIAL_CONTENT, start, end),
        RangeReq::Unsatisfiable => {
            let mut resp = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the blob has {} bytes\n", blob.size),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", blob.size)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
    };
    let opts = GetOptions {
        range: Some(GetRange::Bounded(start..end)),
        ..Default::default()
    };
    let got = match media
        .objects()
        .get_opts(&Media::object_path(&id), opts)
        .await
    {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            tracing::warn!(blob = %id, "complete blob missing from the blob store");
            return unknown_blob();
        }
        Err(e) => return unavailable(e),
    };
    let mut resp = Response::new(Body::from_stream(got.into_stream()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, blob.size))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeReq::Whole);
        assert_eq!(
            parse_range(Some(&hv("bytes=3-")), 10),
            RangeReq::Part(3, 10)
        );
        assert_eq!(
            parse_range(Some(&hv("bytes=3-4")), 10),
            RangeReq::Part(3, 5)
        );
        assert_eq!(
            parse_range(Some(&hv("bytes=3-99")), 10),
            RangeReq::Part(3, 10)
        );
        assert_eq!(
            parse_range(Some(&hv("bytes=9-9")), 10),
            RangeReq::Part(9, 10)
        );
        assert_eq!(
            parse_range(Some(&hv("bytes=10-")), 10),
            RangeReq::Unsatisfiable
        );
        assert_eq!(
            parse_range(Some(&hv("bytes=5-4")), 10),
            RangeReq::Unsatisfiable
        );
        assert_eq!(parse_range(Some(&hv("bytes=-4")), 10), RangeReq::Whole);
        assert_eq!(parse_range(Some(&hv("items=1-2")), 10), RangeReq::Whole);
    }
}
