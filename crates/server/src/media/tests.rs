//! Media tests against a real server: grants through `handlers::handle`, transfers over real sockets
//! with a minimal HTTP/1.1 client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use natter_proto::limits::{BLOB_RETENTION, MAX_BLOB_BYTES};
use natter_proto::wire::{
    BlobGrant, Error, ErrorCode, Request, RequestDownload, RequestUpload, request, response,
};
use natter_proto::{DeviceId, PhoneNumber};
use object_store::ObjectStoreExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Direction, Media};
use crate::handlers::{Login, RequestCtx, handle};
use crate::store::BlobRecord;
use crate::{Server, ServerConfig};

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";

async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path().join("data"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.sms_gateway = format!("file:{}", dir.path().join("sms.log").display());
    tweak(&mut config);
    let server = Server::start(config).await.unwrap();
    (dir, server)
}

fn ctx(server: &Server, phone: &str) -> RequestCtx {
    RequestCtx {
        state: server.state().clone(),
        login: Some(Login {
            phone: PhoneNumber::from_e164(phone).unwrap(),
            device: DeviceId::PRIMARY,
        }),
        peer_ip: [127, 0, 0, 1].into(),
        remote_static: [0; 32],
        conn: crate::delivery::ConnShared::new(1).0,
    }
}

async fn call(ctx: &RequestCtx, body: request::Body) -> Result<BlobGrant, Error> {
    let resp = handle(
        ctx,
        Request {
            id: 7,
            body: Some(body),
        },
    )
    .await;
    assert_eq!(resp.id, 7);
    match (resp.error, resp.body) {
        (Some(e), _) => Err(e),
        (None, Some(response::Body::BlobGrant(g))) => Ok(g),
        other => panic!("unexpected response {other:?}"),
    }
}

async fn upload_grant(ctx: &RequestCtx, size: u64, blob_id: &str) -> Result<BlobGrant, Error> {
    call(
        ctx,
        request::Body::RequestUpload(RequestUpload {
            size,
            blob_id: blob_id.into(),
        }),
    )
    .await
}

async fn download_grant(ctx: &RequestCtx, blob_id: &str) -> Result<BlobGrant, Error> {
    call(
        ctx,
        request::Body::RequestDownload(RequestDownload {
            blob_id: blob_id.into(),
        }),
    )
    .await
}

fn code(e: &Error) -> ErrorCode {
    ErrorCode::try_from(e.code).unwrap()
}

/// An HTTP answer: status, headers (lowercase names), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How the request body is framed.
enum Framing {
    Length,
    Chunked,
}

/// One request on a fresh connection (`Connection: close`), read to the end.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    framing: Framing,
) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match framing {
        Framing::Length => head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len())),
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n\r\n"),
    }
    s.write_all(head.as_bytes()).await.unwrap();
    match framing {
        Framing::Length => {
            let _ = s.write_all(body).await;
        }
        Framing::Chunked => {
            let _ = s
                .write_all(format!("{:x}\r\n", body.len()).as_bytes())
                .await;
            let _ = s.write_all(body).await;
            let _ = s.write_all(b"\r\n0\r\n\r\n").await;
        }
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn url_path(g: &BlobGrant) -> String {
    let rest = g.url.strip_prefix("http://").unwrap();
    rest[rest.find('/').unwrap()..].to_owned()
}

fn auth<'a>(token: &'a str, phone: &'a str) -> Vec<(&'static str, String)> {
    vec![
        ("Authorization", format!("Natter {token}")),
        ("X-Natter-Account", phone.to_owned()),
    ]
}

async fn put(server: &Server, g: &BlobGrant, phone: &str, offset: u64, body: &[u8]) -> Answer {
    put_framed(server, g, phone, offset, body, Framing::Length).await
}

async fn put_framed(
    server: &Server,
    g: &BlobGrant,
    phone: &str,
    offset: u64,
    body: &[u8],
    framing: Framing,
) -> Answer {
    let h = auth(&g.token, phone);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let path = format!("{}?offset={offset}", url_path(g));
    http(server.http_addr(), "PUT", &path, &h, body, framing).await
}

async fn head(server: &Server, g: &BlobGrant, phone: &str) -> Answer {
    let h = auth(&g.token, phone);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http(
        server.http_addr(),
        "HEAD",
        &url_path(g),
        &h,
        b"",
        Framing::Length,
    )
    .await
}

async fn get(server: &Server, g: &BlobGrant, phone: &str, range: Option<&str>) -> Answer {
    let mut h = auth(&g.token, phone);
    if let Some(r) = range {
        h.push(("Range", r.to_owned()));
    }
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http(
        server.http_addr(),
        "GET",
        &url_path(g),
        &h,
        b"",
        Framing::Length,
    )
    .await
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

#[tokio::test]
async fn upload_in_pieces_then_download() {
    let (_dir, server) = start(|_| {}).await;
    let alice = ctx(&server, ALICE);
    let bob = ctx(&server, BOB);
    let data = pattern(300, 1);

    let g = upload_grant(&alice, 300, "").await.unwrap();
    assert_eq!(g.size, 300);
    assert_eq!(g.offset, 0);
    assert!(super::valid_blob_id(&g.blob_id));
    assert_eq!(
        g.url,
        format!("http://{}/v1/blobs/{}", server.http_addr(), g.blob_id)
    );
    assert_eq!(g.expires_in_s, 900);

    let a = put(&server, &g, ALICE, 0, &data[..100]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("upload-offset"), Some("100"));
    let h = head(&server, &g, ALICE).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("upload-offset"), Some("100"));
    assert_eq!(h.header("upload-length"), Some("300"));

    // A wrong offset is refused with the right one.
    for wrong in [0, 50, 150] {
        let a = put(&server, &g, ALICE, wrong, &data[wrong as usize..200]).await;
        assert_eq!(a.status, 409, "{a:?}");
        assert_eq!(a.header("upload-offset"), Some("100"));
    }
    // Not downloadable before it is complete.
    assert_eq!(
        code(&download_grant(&bob, &g.blob_id).await.unwrap_err()),
        ErrorCode::UnknownBlob
    );

    // Resuming (same owner) reports the offset; another account cannot resume it.
    let resumed = upload_grant(&alice, 0, &g.blob_id).await.unwrap();
    assert_eq!((resumed.offset, resumed.size), (100, 300));
    assert_eq!(
        code(&upload_grant(&bob, 0, &g.blob_id).await.unwrap_err()),
        ErrorCode::UnknownBlob
    );
    let a = put(&server, &resumed, ALICE, 100, &data[100..200]).await;
    assert_eq!(a.header("upload-offset"), Some("200"));

    // Too many bytes: declared up front, or found while streaming (chunked); nothing is kept.
    let a = put(&server, &g, ALICE, 200, &pattern(101, 9)).await;
    assert_eq!(a.status, 413, "{a:?}");
    let a = put_framed(&server, &g, ALICE, 200, &pattern(101, 9), Framing::Chunked).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(
        head(&server, &g, ALICE).await.header("upload-offset"),
        Some("200")
    );

    let a = put_framed(&server, &g, ALICE, 200, &data[200..], Framing::Chunked).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("upload-offset"), Some("300"));
    let media = &server.state().media;
    assert!(!media.staging_path(&g.blob_id).exists());
    let rec = server
        .state()
        .store
        .get_blob(&g.blob_id)
        .await
        .unwrap()
        .unwrap();
    assert!(rec.complete);
    // Repeating the last request's offset after completion is harmless; anything else conflicts.
    assert_eq!(put(&server, &g, ALICE, 300, b"").await.status, 200);
    assert_eq!(put(&server, &g, ALICE, 0, &data).await.status, 409);
    assert_eq!(
        code(&upload_grant(&alice, 0, &g.blob_id).await.unwrap_err()),
        ErrorCode::BadRequest
    );

    // Anyone who knows the id downloads; that extends the retention.
    let before = rec.expires_at_ms;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let d = download_grant(&bob, &g.blob_id).await.unwrap();
    assert_eq!((d.size, d.offset), (300, 300));
    let after = server
        .state()
        .store
        .get_blob(&g.blob_id)
        .await
        .unwrap()
        .unwrap();
    assert!(after.expires_at_ms > before);

    let a = get(&server, &d, BOB, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-length"), Some("300"));
    assert_eq!(a.body, data);
    let a = get(&server, &d, BOB, Some("bytes=10-19")).await;
    assert_eq!(a.status, 206);
    assert_eq!(a.header("content-range"), Some("bytes 10-19/300"));
    assert_eq!(a.body, &data[10..20]);
    let a = get(&server, &d, BOB, Some("bytes=290-")).await;
    assert_eq!(a.status, 206);
    assert_eq!(a.header("content-range"), Some("bytes 290-299/300"));
    assert_eq!(a.body, &data[290..]);
    let a = get(&server, &d, BOB, Some("bytes=300-")).await;
    assert_eq!(a.status, 416);
    assert_eq!(a.header("content-range"), Some("bytes */300"));

    server.shutdown().await;
}

#[tokio::test]
async fn token_refusals() {
    let (_dir, server) = start(|_| {}).await;
    let alice = ctx(&server, ALICE);
    let g = upload_grant(&alice, 10, "").await.unwrap();
    let other = upload_grant(&alice, 10, "").await.unwrap();
    assert_eq!(put(&server, &g, ALICE, 0, &[1; 10]).await.status, 200);
    let d = download_grant(&alice, &g.blob_id).await.unwrap();
    let addr = server.http_addr();
    let path = url_path(&g);

    // No credentials.
    let a = http(addr, "GET", &path, &[], b"", Framing::Length).await;
    assert_eq!(a.status, 401);
    assert!(String::from_utf8_lossy(&a.body).contains("Authorization"));
    // Another account's header.
    assert_eq!(get(&server, &d, BOB, None).await.status, 403);
    // Upload token used to download, download token used to upload.
    assert_eq!(get(&server, &g, ALICE, None).await.status, 403);
    let mut as_up = d.clone();
    as_up.blob_id = g.blob_id.clone();
    assert_eq!(put(&server, &as_up, ALICE, 10, b"").await.status, 403);
    // A token for another blob.
    let mut wrong_blob = d.clone();
    wrong_blob.token = other.token.clone();
    assert_eq!(get(&server, &wrong_blob, ALICE, None).await.status, 403);
    // Expired.
    let media = &server.state().media;
    let mut expired = d.clone();
    expired.token = media
        .tokens()
        .issue(Direction::Down, &g.blob_id, ALICE, crate::now_ms() - 1);
    let a = get(&server, &expired, ALICE, None).await;
    assert_eq!(a.status, 401);
    assert!(String::from_utf8_lossy(&a.body).contains("expired"));
    // Tampered (one character changed) or garbage.
    let mut tampered = d.clone();
    let mut chars: Vec<char> = tampered.token.chars().collect();
    chars[20] = if chars[20] == 'A' { 'B' } else { 'A' };
    tampered.token = chars.into_iter().collect();
    assert_eq!(get(&server, &tampered, ALICE, None).await.status, 403);
    let mut garbage = d.clone();
    garbage.token = "x".into();
    assert_eq!(get(&server, &garbage, ALICE, None).await.status, 401);
    // The right one works.
    assert_eq!(get(&server, &d, ALICE, None).await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn size_limit_and_quota() {
    let (_dir, server) = start(|c| c.media_quota_bytes = 1_000).await;
    let alice = ctx(&server, ALICE);
    for size in [0, MAX_BLOB_BYTES + 1] {
        let e = upload_grant(&alice, size, "").await.unwrap_err();
        assert_eq!(code(&e), ErrorCode::LimitExceeded);
        assert!(e.message.contains("2 GiB"), "{}", e.message);
    }
    upload_grant(&alice, 600, "").await.unwrap();
    let e = upload_grant(&alice, 401, "").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::QuotaExceeded);
    assert!(e.message.contains("quota"), "{}", e.message);
    upload_grant(&alice, 400, "").await.unwrap();
    // Quotas are per account.
    upload_grant(&ctx(&server, BOB), 1_000, "").await.unwrap();
    // Not logged in.
    let mut anon = alice.clone();
    anon.login = None;
    assert_eq!(
        code(&upload_grant(&anon, 10, "").await.unwrap_err()),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code(&download_grant(&alice, "nope").await.unwrap_err()),
        ErrorCode::UnknownBlob
    );
    server.shutdown().await;
}

#[tokio::test]
async fn twenty_mib_round_trip() {
    let (_dir, server) = start(|_| {}).await;
    let alice = ctx(&server, ALICE);
    let size = 20 * 1024 * 1024;
    let data = pattern(size, 3);
    let g = upload_grant(&alice, size as u64, "").await.unwrap();
    let half = size / 2 + 12_345;
    assert_eq!(put(&server, &g, ALICE, 0, &data[..half]).await.status, 200);
    let a = put(&server, &g, ALICE, half as u64, &data[half..]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("upload-offset"), Some(size.to_string().as_str()));
    let d = download_grant(&ctx(&server, BOB), &g.blob_id)
        .await
        .unwrap();
    let a = get(&server, &d, BOB, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), size);
    assert!(a.body == data, "downloaded bytes differ");
    let a = get(&server, &d, BOB, Some(&format!("bytes={half}-"))).await;
    assert_eq!(a.status, 206);
    assert!(a.body == data[half..]);
    server.shutdown().await;
}

#[tokio::test]
async fn expiry_deletes_records_and_bytes() {
    let (_dir, server) = start(|c| c.expiry_interval = Duration::from_millis(50)).await;
    let alice = ctx(&server, ALICE);
    let state = server.state();
    let media: &Arc<Media> = &state.media;
    // A complete blob and a partial one.
    let full = upload_grant(&alice, 10, "").await.unwrap();
    assert_eq!(put(&server, &full, ALICE, 0, &[5; 10]).await.status, 200);
    let part = upload_grant(&alice, 10, "").await.unwrap();
    assert_eq!(put(&server, &part, ALICE, 0, &[5; 4]).await.status, 200);
    let object = Media::object_path(&full.blob_id);
    media.objects().head(&object).await.unwrap();
    assert!(media.staging_path(&part.blob_id).exists());

    let d = download_grant(&alice, &full.blob_id).await.unwrap();
    assert_eq!(media.expire(crate::now_ms()).await.unwrap(), 0);
    let later = crate::now_ms() + BLOB_RETENTION.as_millis() as u64 + 1;
    assert_eq!(media.expire(later).await.unwrap(), 2);
    assert!(state.store.get_blob(&full.blob_id).await.unwrap().is_none());
    assert!(state.store.get_blob(&part.blob_id).await.unwrap().is_none());
    assert!(media.objects().head(&object).await.is_err());
    assert!(!media.staging_path(&part.blob_id).exists());
    assert_eq!(get(&server, &d, ALICE, None).await.status, 404);
    assert_eq!(
        code(&download_grant(&alice, &full.blob_id).await.unwrap_err()),
        ErrorCode::UnknownBlob
    );

    // The periodic task does the same for a blob that is already past its expiry.
    let id = super::new_blob_id().unwrap();
    let rec = BlobRecord {
        id: id.clone(),
        owner: PhoneNumber::from_e164(ALICE).unwrap(),
        size: 3,
        offset: 0,
        complete: false,
        created_at_ms: 1,
        expires_at_ms: 2,
    };
    assert!(
        state
            .store
            .create_blob(&rec, u64::MAX >> 2, 0)
            .await
            .unwrap()
    );
    std::fs::write(media.staging_path(&id), b"abc").unwrap();
    for _ in 0..100 {
        if state.store.get_blob(&id).await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.store.get_blob(&id).await.unwrap().is_none());
    assert!(!media.staging_path(&id).exists());
    server.shutdown().await;
}

#[cfg(unix)]
#[tokio::test]
async fn token_key_file_is_private_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = ServerConfig::new(&data);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = Server::start(config.clone()).await.unwrap();
    let token = server
        .state()
        .media
        .tokens()
        .issue(Direction::Up, "00", ALICE, u64::MAX);
    server.shutdown().await;
    let meta = std::fs::metadata(data.join("blob.key")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let server = Server::start(config).await.unwrap();
    assert_eq!(
        server
            .state()
            .media
            .tokens()
            .verify(&token, Direction::Up, "00", ALICE, 0),
        Ok(())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn interrupted_upload_keeps_what_arrived() {
    let (_dir, server) = start(|_| {}).await;
    let alice = ctx(&server, ALICE);
    let data = pattern(1_000, 4);
    let g = upload_grant(&alice, 1_000, "").await.unwrap();
    // Announce 1_000 bytes, send 400, then drop the connection.
    let mut s = TcpStream::connect(server.http_addr()).await.unwrap();
    let head_text = format!(
        "PUT {}?offset=0 HTTP/1.1\r\nHost: test\r\nAuthorization: Natter {}\r\n\
         X-Natter-Account: {ALICE}\r\nContent-Length: 1000\r\n\r\n",
        url_path(&g),
        g.token
    );
    s.write_all(head_text.as_bytes()).await.unwrap();
    s.write_all(&data[..400]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let mut offset = None;
    for _ in 0..100 {
        offset = head(&server, &g, ALICE)
            .await
            .header("upload-offset")
            .map(str::to_owned);
        if offset.as_deref() == Some("400") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(offset.as_deref(), Some("400"));
    let resumed = upload_grant(&alice, 0, &g.blob_id).await.unwrap();
    assert_eq!(resumed.offset, 400);
    assert_eq!(
        put(&server, &resumed, ALICE, 400, &data[400..])
            .await
            .status,
        200
    );
    let d = download_grant(&alice, &g.blob_id).await.unwrap();
    assert_eq!(get(&server, &d, ALICE, None).await.body, data);
    server.shutdown().await;
}
