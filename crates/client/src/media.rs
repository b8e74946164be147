//! Media transfers: photos, videos, voice notes and files.
//!
//! Sending ([`Client::send_file`]): a fresh media key per file ([`natter_crypto::media`]), the file
//! encrypted chunk by chunk while it streams to the server over HTTP (`PUT {url}?offset=N`) under an
//! upload grant, so memory stays constant whatever the file's size. The upload's state (blob id, media
//! key encrypted with the store cipher, path, size, modification time, peer, kind, caption) is saved
//! before the first byte goes out; sending the same file to the same peer again after an interruption
//! asks the server how far it got and continues from there. Once the blob is complete the
//! [`Media`] message (blob id, key, digests, sizes, MIME type, name, caption, thumbnail, dimensions,
//! duration) goes out through the outbox like a text.
//!
//! Receiving: a media message is stored as [`MessageKind::Media`] with its details ([`MediaRecord`]);
//! the file itself is fetched by [`Client::download`], which resumes into `<dir>/<name>.part`, decrypts
//! and verifies every chunk, checks both digests and the size, and only then renames the file to its
//! final name (never overwriting one: `name (1).ext`, ...). A failed check deletes the partial file.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use natter_crypto::media::{
    CIPHERTEXT_CHUNK, MediaCipher, chunk_plaintext_len, generate_media_key,
};
use natter_proto::MessageId;
use natter_proto::PhoneNumber;
use natter_proto::content::{self, Content, Media, MediaKind, media_ciphertext_size};
use natter_proto::limits::{MAX_MEDIA_BYTES, MAX_TEXT_BYTES, MAX_THUMBNAIL_BYTES, MEDIA_CHUNK};
use natter_proto::wire::{BlobGrant, ErrorCode, RequestDownload, RequestUpload, request, response};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::client::{Client, unexpected};
use crate::error::{ClientError, Result};
use crate::messaging::outbox_entry;
use crate::store::{Changes, MediaRecord, MessageKind, MessageRecord, MessageStatus, UploadRecord};

/// Progress of a transfer: called with (bytes done, bytes in all).
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A progress callback that ignores everything.
pub fn no_progress() -> Progress {
    Arc::new(|_, _| {})
}

/// Files up to this size get a thumbnail (decoding an image needs it in memory).
const MAX_THUMBNAIL_SOURCE: u64 = 32 * 1024 * 1024;
/// Longest side of a thumbnail, in pixels.
const THUMBNAIL_SIDE: u32 = 96;
/// Encrypted chunks queued between the file reader and the HTTP body.
const UPLOAD_QUEUE: usize = 4;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn http_err(e: reqwest::Error) -> ClientError {
    ClientError::Transfer(e.to_string())
}

fn key_aad(blob_id: &str) -> Vec<u8> {
    format!("natter/media-key/{blob_id}").into_bytes()
}

fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the content of a file says about it: MIME type, and the kind it suggests.
fn sniff(path: &Path) -> Result<(String, MediaKind)> {
    let mut head = vec![0u8; 8192];
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut n = 0;
    while n < head.len() {
        let read = f.read(&mut head[n..]).map_err(io_err(path))?;
        if read == 0 {
            break;
        }
        n += read;
    }
    head.truncate(n);
    let mime = infer::get(&head)
        .map(|t| t.mime_type().to_owned())
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let kind = if mime.starts_with("image/") {
        MediaKind::Image
    } else if mime.starts_with("video/") {
        MediaKind::Video
    } else {
        MediaKind::File
    };
    Ok((mime, kind))
}

/// A JPEG thumbnail of at most [`THUMBNAIL_SIDE`] pixels and the image's dimensions; `None` for what does
/// not decode (or a thumbnail that would be too large).
fn thumbnail(path: &Path) -> Option<(Vec<u8>, u32, u32)> {
    let img = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?
        .decode()
        .ok()?;
    let (w, h) = (img.width(), img.height());
    let small = img.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).to_rgb8();
    for quality in [75u8, 50, 30] {
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        if small.write_with_encoder(enc).is_ok() && out.len() <= MAX_THUMBNAIL_BYTES {
            return Some((out, w, h));
        }
    }
    Some((Vec::new(), w, h))
}

/// Duration of an Ogg Opus file from the granule position of its last page (48 kHz, less the pre-skip
/// of the `OpusHead` header); 0 if it is not one. Reads only the file's first and last bytes.
fn ogg_opus_duration_ms(path: &Path) -> u32 {
    fn inner(path: &Path) -> std::io::Result<u32> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let mut head = vec![0u8; 512.min(len as usize)];
        f.read_exact(&mut head)?;
        let Some(at) = head.windows(8).position(|w| w == b"OpusHead") else {
            return Ok(0);
        };
        let pre_skip = head
            .get(at + 10..at + 12)
            .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
            .unwrap_or(0);
        let tail_len = len.min(64 * 1024);
        f.seek(SeekFrom::Start(len - tail_len))?;
        let mut tail = vec![0u8; tail_len as usize];
        f.read_exact(&mut tail)?;
        let Some(page) = tail.windows(4).rposition(|w| w == b"OggS") else {
            return Ok(0);
        };
        let Some(g) = tail.get(page + 6..page + 14) else {
            return Ok(0);
        };
        let mut granule = [0u8; 8];
        granule.copy_from_slice(g);
        let samples = u64::from_le_bytes(granule).saturating_sub(pre_skip);
        Ok(u32::try_from(samples / 48).unwrap_or(u32::MAX))
    }
    inner(path).unwrap_or(0)
}

/// The digests a finished transfer checks or announces.
struct Digests {
    plaintext: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// What an upload encrypts: a file (streamed) or bytes already in memory (a history bundle).
#[derive(Clone)]
pub(crate) enum UploadSource {
    /// A file on disk.
    File(PathBuf),
    /// Bytes in memory.
    Memory(Bytes),
}

impl UploadSource {
    fn path(&self) -> &Path {
        match self {
            UploadSource::File(p) => p,
            UploadSource::Memory(_) => Path::new("<memory>"),
        }
    }

    fn reader(&self) -> Result<Box<dyn Read + Send>> {
        Ok(match self {
            UploadSource::File(p) => Box::new(std::io::BufReader::with_capacity(
                MEDIA_CHUNK,
                std::fs::File::open(p).map_err(io_err(p))?,
            )),
            UploadSource::Memory(b) => Box::new(std::io::Cursor::new(b.clone())),
        })
    }
}

/// Reads, encrypts and hashes the whole source; sends the ciphertext from `offset` on into `tx` (if any).
fn produce_upload(
    source: &UploadSource,
    size: u64,
    key: &[u8],
    offset: u64,
    tx: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    progress: &Progress,
) -> Result<Digests> {
    let total = media_ciphertext_size(size);
    let cipher = MediaCipher::new(key, size)?;
    let path = source.path();
    let mut f = source.reader()?;
    let (mut pt_hash, mut ct_hash) = (Sha256::new(), Sha256::new());
    let mut pos = 0u64;
    for i in 0..cipher.chunks() {
        let len = chunk_plaintext_len(size, i);
        let mut buf = Vec::with_capacity(CIPHERTEXT_CHUNK);
        buf.resize(len, 0);
        f.read_exact(&mut buf).map_err(io_err(path))?;
        pt_hash.update(&buf);
        cipher.encrypt_chunk(i, &mut buf)?;
        ct_hash.update(&buf);
        let start = pos;
        pos += buf.len() as u64;
        if let Some(tx) = &tx
            && pos > offset
        {
            let skip = usize::try_from(offset.saturating_sub(start)).unwrap_or(0);
            let bytes = Bytes::from(buf).slice(skip..);
            if tx.blocking_send(Ok(bytes)).is_err() {
                return Err(ClientError::Transfer("the upload was interrupted".into()));
            }
            progress(pos, total);
        }
    }
    // The file must not have grown either.
    let mut extra = [0u8; 1];
    if f.read(&mut extra).map_err(io_err(path))? != 0 {
        return Err(ClientError::InvalidInput(format!(
            "{} changed while it was being sent",
            path.display()
        )));
    }
    Ok(Digests {
        plaintext: pt_hash.finalize().to_vec(),
        ciphertext: ct_hash.finalize().to_vec(),
    })
}

/// Re-reads the first `chunks` chunks of a partial download to resume the digests (encryption is
/// deterministic under the media key, so the ciphertext digest is recomputed from the plaintext).
fn rehash_partial(part: &Path, size: u64, key: &[u8], chunks: u64) -> Result<(Sha256, Sha256)> {
    let cipher = MediaCipher::new(key, size)?;
    let mut f = std::io::BufReader::with_capacity(
        MEDIA_CHUNK,
        std::fs::File::open(part).map_err(io_err(part))?,
    );
    let (mut pt_hash, mut ct_hash) = (Sha256::new(), Sha256::new());
    for i in 0..chunks {
        let mut buf = Vec::with_capacity(CIPHERTEXT_CHUNK);
        buf.resize(chunk_plaintext_len(size, i), 0);
        f.read_exact(&mut buf).map_err(io_err(part))?;
        pt_hash.update(&buf);
        cipher.encrypt_chunk(i, &mut buf)?;
        ct_hash.update(&buf);
    }
    Ok((pt_hash, ct_hash))
}

/// Decrypts and checks a blob as it streams in: every chunk's tag, the length, both digests.
struct BlobVerifier {
    cipher: MediaCipher,
    size: u64,
    chunks: u64,
    index: u64,
    buf: Vec<u8>,
    pt_hash: Sha256,
    ct_hash: Sha256,
}

impl BlobVerifier {
    /// Starts at chunk `from` (with the hashes of the chunks before it, for a resumed download).
    fn new(key: &[u8], size: u64, from: u64, hashes: Option<(Sha256, Sha256)>) -> Result<Self> {
        let cipher = MediaCipher::new(key, size)?;
        let chunks = cipher.chunks();
        let (pt_hash, ct_hash) = hashes.unwrap_or_else(|| (Sha256::new(), Sha256::new()));
        Ok(BlobVerifier {
            cipher,
            size,
            chunks,
            index: from,
            buf: Vec::with_capacity(CIPHERTEXT_CHUNK),
            pt_hash,
            ct_hash,
        })
    }

    /// Ciphertext bytes verified so far.
    fn position(&self) -> u64 {
        self.index * CIPHERTEXT_CHUNK as u64
    }

    /// Takes more ciphertext; returns the plaintext of every chunk it completed.
    fn feed(&mut self, mut data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.index >= self.chunks {
                return Err(ClientError::MediaCorrupt(
                    "the blob is longer than announced".into(),
                ));
            }
            let want =
                chunk_plaintext_len(self.size, self.index) + natter_proto::limits::MEDIA_CHUNK_TAG;
            let n = (want - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == want {
                self.ct_hash.update(&self.buf);
                let mut chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(want));
                if self.cipher.decrypt_chunk(self.index, &mut chunk).is_err() {
                    return Err(ClientError::MediaCorrupt("a chunk did not decrypt".into()));
                }
                self.pt_hash.update(&chunk);
                self.index += 1;
                out.push(chunk);
            }
        }
        Ok(out)
    }

    /// Every chunk arrived, nothing more.
    fn check_complete(&self) -> Result<()> {
        if self.index != self.chunks || !self.buf.is_empty() {
            return Err(ClientError::MediaCorrupt(
                "the blob is shorter than announced".into(),
            ));
        }
        Ok(())
    }

    /// Checks completeness and both digests against the pointer.
    fn finish(self, media: &Media) -> Result<()> {
        self.check_complete()?;
        if self.pt_hash.finalize().as_slice() != media.plaintext_sha256.as_slice()
            || self.ct_hash.finalize().as_slice() != media.ciphertext_sha256.as_slice()
        {
            return Err(ClientError::MediaCorrupt(
                "the digest does not match".into(),
            ));
        }
        Ok(())
    }
}

/// `name`, or `stem (n).ext` for the first n that does not exist in `dir`.
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let p = Path::new(name);
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_owned());
    let ext = p
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut n = 1u64;
    loop {
        let candidate = dir.join(format!("{stem} ({n}){ext}"));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

impl Client {
    /// The media key of a stored media message (stored encrypted with the store cipher).
    pub fn media_key(&self, media: &MediaRecord) -> Result<Zeroizing<Vec<u8>>> {
        Ok(self
            .inner
            .cipher
            .decrypt(&key_aad(&media.0.blob_id), &media.0.key)?)
    }

    /// The stored form of a media message: its key sealed with the store cipher.
    pub(crate) fn seal_media(&self, mut media: Media) -> MediaRecord {
        media.key = self
            .inner
            .cipher
            .encrypt(&key_aad(&media.blob_id), &media.key);
        MediaRecord(Box::new(media))
    }

    async fn blob_grant(&self, body: request::Body) -> Result<BlobGrant> {
        let conn = self.connection(crate::messaging::CONNECTION_WAIT).await?;
        match conn.request(body).await? {
            response::Body::BlobGrant(g) => Ok(g),
            _ => Err(unexpected()),
        }
    }

    /// Sends a file: encrypts it while uploading it (resuming an interrupted upload of the same file to
    /// the same peer), then sends the media message like a text. `kind` `None` picks image, video or
    /// file from the content's MIME type. Returns once the server has accepted the message.
    pub async fn send_file(
        &self,
        peer: &PhoneNumber,
        path: &Path,
        kind: Option<MediaKind>,
        caption: &str,
        progress: Progress,
    ) -> Result<MessageRecord> {
        if caption.len() > MAX_TEXT_BYTES {
            return Err(ClientError::InvalidInput(format!(
                "the caption is {} bytes; the limit is {MAX_TEXT_BYTES}",
                caption.len()
            )));
        }
        let path = std::fs::canonicalize(path).map_err(io_err(path))?;
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if !meta.is_file() {
            return Err(ClientError::InvalidInput(format!(
                "{} is not a file",
                path.display()
            )));
        }
        let size = meta.len();
        if size > MAX_MEDIA_BYTES {
            return Err(ClientError::InvalidInput(format!(
                "{} is {size} bytes; the limit is {MAX_MEDIA_BYTES}",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".to_owned());
        let mtime = mtime_ms(&meta);
        let path_str = path.display().to_string();
        let me = self.registered_identity().await?;
        let ct_size = media_ciphertext_size(size);

        // Resume an interrupted upload of this very file, or start a new one.
        let mut resumed = None;
        if let Some(up) = self.inner.store.upload(peer, &path_str).await?
            && up.size == size
            && up.mtime_ms == mtime
        {
            let key = self
                .inner
                .cipher
                .decrypt(&key_aad(&up.blob_id), &up.sealed_key)?;
            let req = RequestUpload {
                size: ct_size,
                blob_id: up.blob_id.clone(),
            };
            match self.blob_grant(request::Body::RequestUpload(req)).await {
                Ok(grant) if grant.blob_id == up.blob_id => resumed = Some((up, key, grant)),
                Ok(_) => return Err(unexpected()),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::info!(error = %e, "cannot resume the upload; starting again"),
            }
        }
        let (upload, key, grant) = match resumed {
            Some(r) => r,
            None => {
                let (mime_kind, req_kind) = (sniff(&path)?.1, kind);
                let kind = req_kind.unwrap_or(mime_kind);
                let req = RequestUpload {
                    size: ct_size,
                    blob_id: String::new(),
                };
                let grant = self.blob_grant(request::Body::RequestUpload(req)).await?;
                let key = generate_media_key();
                let upload = UploadRecord {
                    peer: peer.clone(),
                    path: path_str.clone(),
                    size,
                    mtime_ms: mtime,
                    blob_id: grant.blob_id.clone(),
                    sealed_key: self
                        .inner
                        .cipher
                        .encrypt(&key_aad(&grant.blob_id), key.as_ref()),
                    kind: kind as i32,
                    caption: caption.to_owned(),
                    created_ms: crate::now_ms(),
                };
                let changes = Changes {
                    uploads: vec![upload.clone()],
                    ..Changes::default()
                };
                self.inner.store.save_changes(changes).await?;
                (upload, Zeroizing::new(key.to_vec()), grant)
            }
        };

        let digests = self
            .upload_blob(
                &me.phone,
                &UploadSource::File(path.clone()),
                size,
                &key,
                &grant,
                progress,
            )
            .await?;

        // The blob is complete: describe it and send the message.
        let (mime, _) = sniff(&path)?;
        let kind = MediaKind::try_from(upload.kind).unwrap_or(MediaKind::File);
        let (thumb, width, height) = if kind == MediaKind::Image && size <= MAX_THUMBNAIL_SOURCE {
            let p = path.clone();
            tokio::task::spawn_blocking(move || thumbnail(&p))
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Default::default()
        };
        let duration_ms = if kind == MediaKind::Voice {
            ogg_opus_duration_ms(&path)
        } else {
            0
        };
        let media = Media {
            kind: kind as i32,
            blob_id: upload.blob_id.clone(),
            key: key.to_vec(),
            plaintext_sha256: digests.plaintext,
            ciphertext_sha256: digests.ciphertext,
            size,
            ciphertext_size: ct_size,
            mime,
            name,
            caption: upload.caption.clone(),
            thumbnail: thumb,
            duration_ms,
            width,
            height,
        };
        media.validate()?;
        let id = crate::random_message_id()?;
        let now = crate::now_ms();
        let content = Content {
            message_id: id.as_bytes().to_vec(),
            sent_at_ms: now,
            body: Some(content::content::Body::Media(media.clone())),
            conversation: String::new(),
        };
        let mut record = MessageRecord {
            chat: peer.clone(),
            id,
            from_me: true,
            sender_device: me.device_id,
            kind: MessageKind::Media,
            text: upload.caption.clone(),
            sent_at_ms: now,
            server_ts_ms: 0,
            status: MessageStatus::Pending,
            shown: true,
            seq: 0,
            media: Some(self.seal_media(media)),
        };
        let entry = outbox_entry(id, id, peer.clone(), &content, now);
        let changes = Changes {
            messages: vec![record.clone()],
            outbox: vec![entry.clone()],
            uploads_done: vec![(peer.clone(), path_str)],
            ..Changes::default()
        };
        self.inner.store.save_changes(changes).await?;
        let _sending = self.inner.sending.lock().await;
        let ts = self.deliver(&entry).await?;
        record.status = MessageStatus::Sent;
        record.server_ts_ms = ts;
        Ok(record)
    }

    /// Encrypts bytes in memory under a fresh media key and uploads them as a new blob; returns the
    /// pointer (kind `File`, key in the clear) for a content message.
    pub(crate) async fn upload_bytes(
        &self,
        data: Vec<u8>,
        mime: &str,
        name: &str,
    ) -> Result<Media> {
        let me = self.registered_identity().await?;
        let size = data.len() as u64;
        let ct_size = media_ciphertext_size(size);
        let grant = self
            .blob_grant(request::Body::RequestUpload(RequestUpload {
                size: ct_size,
                blob_id: String::new(),
            }))
            .await?;
        let key = generate_media_key();
        let source = UploadSource::Memory(Bytes::from(data));
        let digests = self
            .upload_blob(
                &me.phone,
                &source,
                size,
                key.as_ref(),
                &grant,
                no_progress(),
            )
            .await?;
        Ok(Media {
            kind: MediaKind::File as i32,
            blob_id: grant.blob_id,
            key: key.to_vec(),
            plaintext_sha256: digests.plaintext,
            ciphertext_sha256: digests.ciphertext,
            size,
            ciphertext_size: ct_size,
            mime: mime.to_owned(),
            name: name.to_owned(),
            ..Media::default()
        })
    }

    /// Downloads a blob into memory, verifying every chunk, both digests and the size; refuses a blob
    /// that announces more than `limit` plaintext bytes before fetching anything.
    pub(crate) async fn download_to_memory(&self, media: &Media, limit: usize) -> Result<Vec<u8>> {
        if media.size > limit as u64 || media.ciphertext_size != media_ciphertext_size(media.size) {
            return Err(ClientError::MediaCorrupt(format!(
                "the blob announces {} bytes; at most {limit} are accepted",
                media.size
            )));
        }
        let me = self.registered_identity().await?;
        let mut verifier = BlobVerifier::new(&media.key, media.size, 0, None)?;
        let grant = self
            .blob_grant(request::Body::RequestDownload(RequestDownload {
                blob_id: media.blob_id.clone(),
            }))
            .await?;
        let mut resp = reqwest::Client::new()
            .get(&grant.url)
            .header("Authorization", format!("Natter {}", grant.token))
            .header("X-Natter-Account", me.phone.as_str())
            .send()
            .await
            .map_err(http_err)?;
        if !resp.status().is_success() {
            return Err(ClientError::Transfer(format!(
                "the server refused the download ({})",
                resp.status()
            )));
        }
        let mut out = Vec::with_capacity(usize::try_from(media.size).unwrap_or(0));
        while let Some(data) = resp.chunk().await.map_err(http_err)? {
            for plain in verifier.feed(&data)? {
                out.extend_from_slice(&plain);
            }
        }
        verifier.finish(media)?;
        if out.len() as u64 != media.size {
            return Err(ClientError::MediaCorrupt("the size does not match".into()));
        }
        Ok(out)
    }

    /// Streams the encrypted source to the server from the grant's offset on; returns the digests.
    async fn upload_blob(
        &self,
        account: &PhoneNumber,
        source: &UploadSource,
        size: u64,
        key: &[u8],
        grant: &BlobGrant,
        progress: Progress,
    ) -> Result<Digests> {
        let total = media_ciphertext_size(size);
        let offset = grant.offset.min(total);
        progress(offset, total);
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(UPLOAD_QUEUE);
        let tx = (offset < total).then_some(tx);
        let producer = {
            let (source, key, progress) = (
                source.clone(),
                Zeroizing::new(key.to_vec()),
                progress.clone(),
            );
            tokio::task::spawn_blocking(move || {
                produce_upload(&source, size, &key, offset, tx, &progress)
            })
        };
        if offset < total {
            let body = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let http = reqwest::Client::new();
            let sent = http
                .put(format!("{}?offset={offset}", grant.url))
                .header("Authorization", format!("Natter {}", grant.token))
                .header("X-Natter-Account", account.as_str())
                .header(reqwest::header::CONTENT_LENGTH, total - offset)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    producer.abort();
                    return Err(http_err(e));
                }
            };
            if !resp.status().is_success() {
                producer.abort();
                return Err(ClientError::Transfer(format!(
                    "the server refused the upload ({})",
                    resp.status()
                )));
            }
            let reached = resp
                .headers()
                .get("Upload-Offset")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if reached.is_some_and(|r| r != total) {
                producer.abort();
                return Err(ClientError::Transfer(format!(
                    "the server holds {} of {total} bytes after the upload",
                    reached.unwrap_or(0)
                )));
            }
        }
        let digests = producer
            .await
            .map_err(|e| ClientError::Transfer(format!("upload task failed: {e}")))??;
        progress(total, total);
        Ok(digests)
    }

    /// Forwards a media message to `peer` without uploading or re-encrypting anything: the new message
    /// carries the same blob, key and digests. Asking the server for a download grant re-references the
    /// blob, so it is kept for another retention period.
    pub async fn forward(&self, id: &MessageId, peer: &PhoneNumber) -> Result<MessageRecord> {
        let me = self.registered_identity().await?;
        let original = self
            .find_message(id)
            .await?
            .into_iter()
            .find(|m| m.media.is_some())
            .ok_or_else(|| {
                ClientError::InvalidInput(format!("no media message has the id {id}"))
            })?;
        let stored = original.media.ok_or(ClientError::InvalidInput(
            "only media messages can be forwarded this way".into(),
        ))?;
        let key = self.media_key(&stored)?;
        let mut media = (*stored.0).clone();
        media.key = key.to_vec();
        media.validate()?;
        self.blob_grant(request::Body::RequestDownload(RequestDownload {
            blob_id: media.blob_id.clone(),
        }))
        .await?;
        let new_id = crate::random_message_id()?;
        let now = crate::now_ms();
        let content = Content {
            message_id: new_id.as_bytes().to_vec(),
            sent_at_ms: now,
            body: Some(content::content::Body::Media(media.clone())),
            conversation: String::new(),
        };
        let mut record = MessageRecord {
            chat: peer.clone(),
            id: new_id,
            from_me: true,
            sender_device: me.device_id,
            kind: MessageKind::Media,
            text: media.caption.clone(),
            sent_at_ms: now,
            server_ts_ms: 0,
            status: MessageStatus::Pending,
            shown: true,
            seq: 0,
            media: Some(self.seal_media(media)),
        };
        let entry = outbox_entry(new_id, new_id, peer.clone(), &content, now);
        self.inner
            .store
            .save_changes(Changes {
                messages: vec![record.clone()],
                outbox: vec![entry.clone()],
                ..Changes::default()
            })
            .await?;
        let _sending = self.inner.sending.lock().await;
        let ts = self.deliver(&entry).await?;
        record.status = MessageStatus::Sent;
        record.server_ts_ms = ts;
        Ok(record)
    }

    /// Finds media messages with this id in every conversation.
    pub async fn find_message(&self, id: &MessageId) -> Result<Vec<MessageRecord>> {
        Ok(self.inner.store.messages_with_id(id).await?)
    }

    /// Downloads the file of a media message into `dir`, resuming `<dir>/<name>.part` if an earlier
    /// download was interrupted, verifying every chunk, both digests and the size. Returns the path of
    /// the saved file (never an existing file overwritten). A failed check deletes the partial file.
    pub async fn download(
        &self,
        chat: &PhoneNumber,
        id: &MessageId,
        dir: &Path,
        progress: Progress,
    ) -> Result<PathBuf> {
        let record = self
            .inner
            .store
            .message(chat, id)
            .await?
            .ok_or_else(|| ClientError::InvalidInput(format!("no message {id} with {chat}")))?;
        let Some(stored) = record.media.as_ref() else {
            return Err(ClientError::InvalidInput(format!(
                "message {id} has no file to download"
            )));
        };
        let key = self.media_key(stored)?;
        let media = &stored.0;
        let me = self.registered_identity().await?;
        let name = if media.name.is_empty() {
            media.blob_id.clone()
        } else {
            media.name.clone()
        };
        let part = dir.join(format!("{name}.part"));
        let size = media.size;
        let total = media.ciphertext_size;
        let chunks = MediaCipher::new(&key, size)?.chunks();

        // Resume: keep the whole chunks already written (at least the last one is fetched again).
        let have = match tokio::fs::metadata(&part).await {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        let done_chunks = (have / MEDIA_CHUNK as u64).min(chunks - 1);
        let hashes = if done_chunks > 0 {
            let (p, k) = (part.clone(), key.clone());
            Some(
                tokio::task::spawn_blocking(move || rehash_partial(&p, size, &k, done_chunks))
                    .await
                    .map_err(|e| ClientError::Transfer(format!("download task failed: {e}")))??,
            )
        } else {
            None
        };
        let mut verifier = BlobVerifier::new(&key, size, done_chunks, hashes)?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&part)
            .await
            .map_err(io_err(&part))?;
        file.set_len(done_chunks * MEDIA_CHUNK as u64)
            .await
            .map_err(io_err(&part))?;
        file.seek(SeekFrom::End(0)).await.map_err(io_err(&part))?;
        let start = done_chunks * CIPHERTEXT_CHUNK as u64;

        let grant = self
            .blob_grant(request::Body::RequestDownload(RequestDownload {
                blob_id: media.blob_id.clone(),
            }))
            .await?;
        let mut req = reqwest::Client::new()
            .get(&grant.url)
            .header("Authorization", format!("Natter {}", grant.token))
            .header("X-Natter-Account", me.phone.as_str());
        if start > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={start}-"));
        }
        let mut resp = req.send().await.map_err(http_err)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ClientError::Transfer(format!(
                "the server refused the download ({status})"
            )));
        }
        // A server that ignores the range sends everything: skip what we have.
        let mut skip = if status == reqwest::StatusCode::PARTIAL_CONTENT {
            0
        } else {
            start
        };
        progress(start, total);
        let fail = |part: PathBuf, what: &str| {
            let _ = std::fs::remove_file(&part);
            ClientError::MediaCorrupt(what.to_owned())
        };
        loop {
            let data = match resp.chunk().await {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    // The partial file stays for the next attempt.
                    let _ = file.flush().await;
                    return Err(http_err(e));
                }
            };
            let mut data = &data[..];
            if skip > 0 {
                let n = usize::try_from(skip).unwrap_or(usize::MAX).min(data.len());
                data = &data[n..];
                skip -= n as u64;
            }
            let plains = match verifier.feed(data) {
                Ok(p) => p,
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
            };
            for plain in plains {
                file.write_all(&plain).await.map_err(io_err(&part))?;
                progress(verifier.position().min(total), total);
            }
        }
        if let Err(e) = verifier.check_complete() {
            drop(file);
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        file.sync_all().await.map_err(io_err(&part))?;
        drop(file);
        let written = tokio::fs::metadata(&part)
            .await
            .map_err(io_err(&part))?
            .len();
        if written != size {
            return Err(fail(part, "the size does not match"));
        }
        if let Err(e) = verifier.finish(media) {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let target = free_name(dir, &name);
        tokio::fs::rename(&part, &target)
            .await
            .map_err(io_err(&target))?;
        Ok(target)
    }
}

/// Whether a server error means the server has no blob service (yet).
pub fn is_unsupported(e: &ClientError) -> bool {
    e.server_code() == Some(ErrorCode::UnsupportedFeature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_names_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(free_name(dir.path(), "a.jpg"), dir.path().join("a.jpg"));
        std::fs::write(dir.path().join("a.jpg"), b"x").unwrap();
        assert_eq!(free_name(dir.path(), "a.jpg"), dir.path().join("a (1).jpg"));
        std::fs::write(dir.path().join("a (1).jpg"), b"x").unwrap();
        assert_eq!(free_name(dir.path(), "a.jpg"), dir.path().join("a (2).jpg"));
        std::fs::write(dir.path().join("noext"), b"x").unwrap();
        assert_eq!(free_name(dir.path(), "noext"), dir.path().join("noext (1)"));
    }

    #[test]
    fn upload_stream_matches_the_crypto_and_skips_the_sent_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..(2 * MEDIA_CHUNK + 100)).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let key = [9u8; 32];
        let size = data.len() as u64;
        let whole = |offset: u64| {
            let (tx, mut rx) = mpsc::channel(16);
            let source = UploadSource::File(path.clone());
            let d = produce_upload(&source, size, &key, offset, Some(tx), &no_progress()).unwrap();
            let mut out = Vec::new();
            while let Ok(Ok(b)) = rx.try_recv() {
                out.extend_from_slice(&b);
            }
            (d, out)
        };
        let (d, all) = whole(0);
        assert_eq!(all.len() as u64, media_ciphertext_size(size));
        assert_eq!(d.plaintext, Sha256::digest(&data).to_vec());
        assert_eq!(d.ciphertext, Sha256::digest(&all).to_vec());
        let (d2, rest) = whole(70_000);
        assert_eq!(d2.ciphertext, d.ciphertext);
        assert_eq!(rest, all[70_000..]);
        let (p, c) = rehash_partial(&path, size, &key, 2).unwrap();
        let mut p2 = Sha256::new();
        p2.update(&data[..2 * MEDIA_CHUNK]);
        assert_eq!(p.finalize(), p2.finalize());
        let mut c2 = Sha256::new();
        c2.update(&all[..2 * CIPHERTEXT_CHUNK]);
        assert_eq!(c.finalize(), c2.finalize());
    }

    #[test]
    fn voice_duration_comes_from_the_last_granule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.ogg");
        let mut f = Vec::new();
        // First page with OpusHead (pre-skip 312), then a last page at granule 48_312 (1 s).
        f.extend_from_slice(b"OggS\0\x02");
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&[0; 13]);
        f.extend_from_slice(b"OpusHead\x01\x01");
        f.extend_from_slice(&312u16.to_le_bytes());
        f.extend_from_slice(&[0; 200]);
        f.extend_from_slice(b"OggS\0\x04");
        f.extend_from_slice(&48_312u64.to_le_bytes());
        f.extend_from_slice(&[0; 20]);
        std::fs::write(&path, &f).unwrap();
        assert_eq!(ogg_opus_duration_ms(&path), 1000);
        std::fs::write(&path, b"not ogg").unwrap();
        assert_eq!(ogg_opus_duration_ms(&path), 0);
    }

    #[test]
    fn thumbnails_are_small_jpegs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let img = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 7]));
        img.save(&path).unwrap();
        let (thumb, w, h) = thumbnail(&path).unwrap();
        assert_eq!((w, h), (640, 480));
        assert!(!thumb.is_empty() && thumb.len() <= MAX_THUMBNAIL_BYTES);
        let t = image::load_from_memory(&thumb).unwrap();
        assert!(t.width() <= THUMBNAIL_SIDE && t.height() <= THUMBNAIL_SIDE);
        assert_eq!(
            sniff(&path).unwrap(),
            ("image/png".into(), MediaKind::Image)
        );
    }
}
