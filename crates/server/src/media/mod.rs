//! Media transfers: blob records, short-lived transfer tokens and the HTTP service that moves the
//! (end-to-end encrypted) bytes.
//!
//! - [`token`]: stateless HMAC tokens that allow one account to upload or download one blob.
//! - [`http`]: the HTTP/1.1 service (`PUT`/`HEAD`/`GET /v1/blobs/{id}`).
//! - [`Media`]: what both share: the blob store (an [`ObjectStore`], local files under `data_dir/blobs`
//!   today), the staging directory for partial uploads (`data_dir/blobs-partial/{id}`), the token key
//!   (`data_dir/blob.key`) and the grant URLs.
//!
//! Grants are handed out over the chat connection (`handlers::media`). The server only ever sees
//! ciphertext: media keys and plaintext digests travel inside end-to-end encrypted messages.

pub mod http;
pub mod token;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use natter_proto::limits::BLOB_TOKEN_TTL;
use natter_proto::wire::BlobGrant;
use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::store::{Store, StoreError};
pub use token::{Direction, TokenError, TokenKey};

/// Bytes read from a staging file per write into the blob store.
const COPY_CHUNK: usize = 1024 * 1024;
/// Part size of multipart writes into the blob store (S3's minimum part size is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once while moving a blob into the blob store (bounds memory to ~this × PART_SIZE).
const PARTS_IN_FLIGHT: usize = 2;
/// Expired blobs deleted per store call.
const EXPIRY_PAGE: usize = 1000;

/// Why a media operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which path.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The token key file is damaged.
    #[error("{0}: not a blob token key (expected 32 bytes)")]
    BadKey(String),
    /// The blob store failed.
    #[error("blob store: {0}")]
    Objects(#[from] object_store::Error),
    /// The record store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The system random generator failed.
    #[error("random generator: {0}")]
    Random(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MediaError + '_ {
    move |source| MediaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The media side of the server.
pub struct Media {
    store: Arc<dyn Store>,
    objects: Arc<dyn ObjectStore>,
    staging: PathBuf,
    tokens: TokenKey,
    base_url: String,
    quota_bytes: u64,
    /// Blobs with an upload request running (one at a time per blob).
    uploading: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media")
            .field("objects", &self.objects.to_string())
            .field("staging", &self.staging)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// True for a well-formed blob id: 32 lowercase hex digits.
pub fn valid_blob_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random blob id (16 random bytes as 32 hex digits).
pub fn new_blob_id() -> Result<String, MediaError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| MediaError::Random(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// Marks a blob as being uploaded until dropped.
pub(crate) struct UploadGuard<'a> {
    media: &'a Media,
    id: String,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        let mut set = self
            .media
            .uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        set.remove(&self.id);
    }
}

impl Media {
    /// Opens the media side in `data_dir` (creating `blob.key`, `blobs/` and `blobs-partial/` on first
    /// start), with grant URLs pointing at `http_addr`.
    pub fn open(
        data_dir: &Path,
        http_addr: SocketAddr,
        store: Arc<dyn Store>,
        quota_bytes: u64,
    ) -> Result<Media, MediaError> {
        let blobs = data_dir.join("blobs");
        let staging = data_dir.join("blobs-partial");
        for dir in [&blobs, &staging] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let objects: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&blobs)?);
        Ok(Media {
            store,
            objects,
            staging,
            tokens: load_or_create_key(data_dir)?,
            base_url: format!("http://{http_addr}"),
            quota_bytes,
            uploading: Mutex::new(HashSet::new()),
        })
    }

    /// The record store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The blob store.
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// The token key.
    pub fn tokens(&self) -> &TokenKey {
        &self.tokens
    }

    /// Per-account quota over unexpired blobs, in bytes.
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    /// The staging file of a partial upload.
    pub fn staging_path(&self, id: &str) -> PathBuf {
        self.staging.join(id)
    }

    /// Where a complete blob lives in the blob store.
    pub fn object_path(id: &str) -> object_store::path::Path {
        object_store::path::Path::from(id)
    }

    /// A grant for `phone` to transfer blob `id` (of `size` bytes, `offset` of them there already).
    pub fn grant(
        &self,
        dir: Direction,
        id: &str,
        phone: &str,
        size: u64,
        offset: u64,
    ) -> BlobGrant {
        let expiry_ms = crate::now_ms().saturating_add(BLOB_TOKEN_TTL.as_millis() as u64);
        BlobGrant {
            blob_id: id.to_owned(),
            url: format!("{}/v1/blobs/{id}", self.base_url),
            token: self.tokens.issue(dir, id, phone, expiry_ms),
            expires_in_s: BLOB_TOKEN_TTL.as_secs() as u32,
            size,
            offset,
        }
    }

    /// Claims the right to upload into blob `id`, or `None` while another request is uploading it.
    pub(crate) fn begin_upload(&self, id: &str) -> Option<UploadGuard<'_>> {
        let mut set = self.uploading.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(id.to_owned()) {
            return None;
        }
        Some(UploadGuard {
            media: self,
            id: id.to_owned(),
        })
    }

    /// Moves a fully staged blob into the blob store, streaming (constant memory), then deletes the
    /// staging file. The record is not changed here.
    pub async fn finalize(&self, id: &str) -> Result<(), MediaError> {
        let path = self.staging_path(id);
        let mut file = tokio::fs::File::open(&path).await.map_err(io_err(&path))?;
        let upload = self.objects.put_multipart(&Self::object_path(id)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(io_err(&path)(e));
                }
            };
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        remove_if_exists(&path).await
    }

    /// Deletes a blob's bytes: its object and its staging file (either may be missing).
    pub async fn delete_bytes(&self, id: &str) -> Result<(), MediaError> {
        match self.objects.delete(&Self::object_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        remove_if_exists(&self.staging_path(id)).await
    }

    /// Deletes every blob expired at `now_ms`: its record first (so no new grant can name it), then its
    /// bytes. Returns how many went.
    pub async fn expire(&self, now_ms: u64) -> Result<usize, MediaError> {
        let mut total = 0;
        loop {
            let ids = self.store.delete_expired_blobs(now_ms, EXPIRY_PAGE).await?;
            for id in &ids {
                if let Err(e) = self.delete_bytes(id).await {
                    // The record is gone; the bytes are orphaned but unreachable.
                    tracing::warn!(blob = %id, error = %e, "could not delete an expired blob's bytes");
                }
            }
            total += ids.len();
            if ids.len() < EXPIRY_PAGE {
                return Ok(total);
            }
        }
    }
}

async fn remove_if_exists(path: &Path) -> Result<(), MediaError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Loads the blob token key from `dir/blob.key`, creating it (mode 0600) on first start.
fn load_or_create_key(dir: &Path) -> Result<TokenKey, MediaError> {
    let path = dir.join("blob.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let key: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| MediaError::BadKey(path.display().to_string()))?;
            Ok(TokenKey::new(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = zeroize::Zeroizing::new([0u8; 32]);
            getrandom::fill(key.as_mut_slice()).map_err(|e| MediaError::Random(e.to_string()))?;
            let tmp = dir.join("blob.key.tmp");
            write_private(&tmp, key.as_slice()).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
            Ok(TokenKey::new(*key))
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests;
