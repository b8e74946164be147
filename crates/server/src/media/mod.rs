//! Media transfers: blob records, short-lived transfer tokens and the HTTP service that moves the
//! (end-to-end encrypted) bytes.
//!
//! - [`token`]: stateless HMAC tokens that allow one account to upload or download one blob.
//! - [`http`]: the HTTP/1.1 service (`PUT`/`HEAD`/`GET /v1/blobs/{id}`).
//! - [`Media`]: what both share: the blob store (an [`ObjectStore`]: local files under `data_dir/blobs`
//!   by default, or S3 with the `s3` feature), where partial uploads are staged, the token key
//!   (`blob.key` in the key directory, shared by the nodes of a cluster) and the grant URLs.
//!
//! Staging: on local files, a partial upload is one file (`data_dir/blobs-partial/{id}`). On S3 the
//! nodes share no disk, so each upload request's bytes become an object of their own
//! (`partial/{id}/{offset}`): an upload begun through one node resumes through any other, and the
//! last byte joins the parts into the blob.
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

/// Where partial uploads wait for their last byte.
#[derive(Debug)]
pub enum Staging {
    /// One file per blob in this directory (single node).
    Files(PathBuf),
    /// One object per upload request under `partial/{id}/` in the blob store (shared by all nodes).
    Objects,
}

/// The media side of the server.
pub struct Media {
    store: Arc<dyn Store>,
    objects: Arc<dyn ObjectStore>,
    staging: Staging,
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
    /// Opens the media side: blobs in `blobs` (`None`: `data_dir/blobs`, staged in
    /// `data_dir/blobs-partial`; or an `s3://` URL, see [`crate::ServerConfig::blobs`]), the token key
    /// in `key_dir` (created on first start), grant URLs pointing at `http_addr`.
    pub async fn open(
        data_dir: &Path,
        key_dir: &Path,
        blobs: Option<&str>,
        http_addr: SocketAddr,
        store: Arc<dyn Store>,
        quota_bytes: u64,
    ) -> Result<Media, MediaError> {
        let (objects, staging): (Arc<dyn ObjectStore>, Staging) = match blobs {
            None => {
                let blobs = data_dir.join("blobs");
                let staging = data_dir.join("blobs-partial");
                for dir in [&blobs, &staging] {
                    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
                (
                    Arc::new(LocalFileSystem::new_with_prefix(&blobs)?),
                    Staging::Files(staging),
                )
            }
            Some(url) => (s3::open(url)?, Staging::Objects),
        };
        Ok(Media {
            store,
            objects,
            staging,
            tokens: load_or_create_key(key_dir)?,
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

    /// The staging file of a partial upload (local staging; with object staging, a path that is never
    /// used).
    pub fn staging_path(&self, id: &str) -> PathBuf {
        match &self.staging {
            Staging::Files(dir) => dir.join(id),
            Staging::Objects => PathBuf::from(id),
        }
    }

    /// How partial uploads are staged.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    /// The object holding the bytes of one upload request that began at `offset` (object staging).
    pub fn part_path(id: &str, offset: u64) -> object_store::path::Path {
        object_store::path::Path::from(format!("partial/{id}/{offset:020}"))
    }

    fn parts_prefix(id: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("partial/{id}"))
    }

    /// The staged parts of a blob that chain from byte 0 to `size`, in order (object staging). Parts
    /// left by a request whose offset was never recorded are skipped or were overwritten by its retry.
    async fn chained_parts(
        &self,
        id: &str,
        size: u64,
    ) -> Result<Vec<object_store::path::Path>, MediaError> {
        use futures::TryStreamExt;
        let mut parts: Vec<(u64, object_store::ObjectMeta)> = self
            .objects
            .list(Some(&Self::parts_prefix(id)))
            .try_filter_map(|m| async move {
                let offset = m.location.filename().and_then(|f| f.parse::<u64>().ok());
                Ok(offset.map(|o| (o, m)))
            })
            .try_collect()
            .await?;
        parts.sort_by_key(|(o, _)| *o);
        let mut chain = Vec::new();
        let mut at = 0u64;
        for (offset, meta) in parts {
            if offset == at && meta.size > 0 {
                at += meta.size;
                chain.push(meta.location);
            }
        }
        if at != size {
            return Err(MediaError::Io {
                path: format!("partial/{id}"),
                source: std::io::Error::other(format!("staged parts hold {at} bytes of {size}")),
            });
        }
        Ok(chain)
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
        let Staging::Files(dir) = &self.staging else {
            return self.finalize_parts(id).await;
        };
        let path = dir.join(id);
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

    /// Joins a blob's staged parts into the blob (object staging), streaming, then deletes them.
    async fn finalize_parts(&self, id: &str) -> Result<(), MediaError> {
        let size = self
            .store
            .get_blob(id)
            .await?
            .ok_or(StoreError::NoSuchBlob)?
            .size;
        let parts = self.chained_parts(id, size).await?;
        let upload = self.objects.put_multipart(&Self::object_path(id)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        for part in &parts {
            let got = match self.objects.get(part).await {
                Ok(got) => got,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e.into());
                }
            };
            let mut stream = got.into_stream();
            while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = writer.abort().await;
                        return Err(e.into());
                    }
                };
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.write(&chunk);
            }
        }
        writer.finish().await?;
        self.delete_parts(id).await
    }

    async fn delete_parts(&self, id: &str) -> Result<(), MediaError> {
        use futures::TryStreamExt;
        let parts: Vec<object_store::ObjectMeta> = self
            .objects
            .list(Some(&Self::parts_prefix(id)))
            .try_collect()
            .await?;
        for p in parts {
            match self.objects.delete(&p.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Deletes a blob's bytes: its object and its staged bytes (either may be missing).
    pub async fn delete_bytes(&self, id: &str) -> Result<(), MediaError> {
        match self.objects.delete(&Self::object_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match &self.staging {
            Staging::Files(dir) => remove_if_exists(&dir.join(id)).await,
            Staging::Objects => self.delete_parts(id).await,
        }
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

/// Loads the blob token key from `dir/blob.key`, creating it (mode 0600) on first start. Every node of a
/// cluster must have the same one (a grant issued by one node is honoured by all).
fn load_or_create_key(dir: &Path) -> Result<TokenKey, MediaError> {
    let path = dir.join("blob.key");
    let mut fresh = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(fresh.as_mut_slice()).map_err(|e| MediaError::Random(e.to_string()))?;
    let bytes =
        crate::server::read_or_create_secret(&path, fresh.as_slice()).map_err(io_err(&path))?;
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| MediaError::BadKey(path.display().to_string()))?;
    Ok(TokenKey::new(key))
}

/// The S3 blob store (cargo feature `s3`).
mod s3 {
    use std::sync::Arc;

    use object_store::ObjectStore;

    use super::MediaError;

    fn bad(msg: String) -> MediaError {
        MediaError::Io {
            path: "--blobs".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg),
        }
    }

    /// Opens `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&skip_signature=true]`; credentials come from
    /// the `AWS_*` environment variables.
    #[cfg(feature = "s3")]
    pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>, MediaError> {
        use object_store::aws::AmazonS3Builder;
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            bad(format!(
                "{url}: expected s3://BUCKET[/PREFIX][?endpoint=URL]"
            ))
        })?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(bad(format!("{url}: no bucket")));
        }
        // reqwest builds a rustls client, and two rustls providers are linked in: pick one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let mut region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into());
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("endpoint", v)) => {
                    b = b.with_endpoint(v).with_allow_http(v.starts_with("http://"));
                }
                Some(("region", v)) => region = v.to_owned(),
                // Unsigned requests (a public bucket, or a local S3 stand-in in tests).
                Some(("skip_signature", "true")) => b = b.with_skip_signature(true),
                _ => return Err(bad(format!("{url}: unknown parameter {kv:?}"))),
            }
        }
        let store: Arc<dyn ObjectStore> = Arc::new(b.with_region(region).build()?);
        let prefix = prefix.trim_matches('/');
        Ok(if prefix.is_empty() {
            store
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        })
    }

    /// Without the `s3` feature there is no S3 store.
    #[cfg(not(feature = "s3"))]
    pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>, MediaError> {
        Err(bad(format!(
            "{url}: this natterd was built without the s3 feature"
        )))
    }
}

#[cfg(test)]
mod tests;
