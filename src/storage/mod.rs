//! Storage backends: where images and their result records live.
//!
//! The service sees a flat key space (`scene_001-3f2a….png`) through [`ObjectStore`]; the
//! filesystem backend maps keys under its output directory, the S3 backend under its bucket
//! and prefix. Every `put` is all-or-nothing: a reader never sees a partial object.

mod fs;
mod memory;
mod s3;
mod settings;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use fs::FsStore;
pub use memory::MemoryStore;
pub use s3::S3Store;
pub use settings::{S3Credentials, S3Settings, StorageKind, StorageSettings};

use crate::aws::AwsConfig;
use crate::error::{Result, Stage3Error};

/// The longest one storage call may take, deadline permitting: a little over the S3
/// client's own operation timeout, so its clearer error wins when it fires first.
pub(crate) const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(65);
/// What to send along with an object's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectMeta {
    pub content_type: &'static str,
    /// `Cache-Control` for CDNs; content-addressed keys never change, so they can be immutable.
    pub cache_control: &'static str,
}

impl ObjectMeta {
    pub(crate) const PNG: ObjectMeta = ObjectMeta {
        content_type: "image/png",
        cache_control: "public, max-age=31536000, immutable",
    };
    pub(crate) const RECORD: ObjectMeta = ObjectMeta {
        content_type: "application/json",
        cache_control: "no-cache",
    };
    /// The unlabelled source of a visibly labelled image: kept for relabelling, never
    /// meant for the public.
    pub(crate) const SOURCE: ObjectMeta = ObjectMeta {
        content_type: "image/png",
        cache_control: "private, no-store",
    };
    /// A worker's claim on a scene it is generating; never worth caching anywhere.
    pub(crate) const CLAIM: ObjectMeta = ObjectMeta {
        content_type: "application/json",
        cache_control: "no-store",
    };
}

/// What a store knows about an object without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// The server's entity tag (S3), when it gives one: equal tags mean the same bytes.
    pub etag: Option<String>,
}

/// One object of a listing, as the store itself describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// In this store's key space (without the S3 prefix).
    pub key: String,
    /// When the store last wrote the object, by the store's own clock (a file's
    /// modification time, S3's `LastModified`, the memory store's insertion time). Ordering
    /// by it, rather than by a time a writer put in a name or a body, means a writer whose
    /// clock runs ahead gains nothing.
    pub last_modified: SystemTime,
    pub size: u64,
}

/// The outcome of a capped [`ObjectStore::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Missing,
    /// The object is larger than the read allowed; it was not read.
    TooLarge {
        size: u64,
    },
    Found(Bytes),
}

impl Fetched {
    /// The bytes, treating an object over the limit as an error naming `location`.
    pub(crate) fn into_bytes(self, location: &str, limit: u64) -> Result<Option<Bytes>> {
        match self {
            Fetched::Missing => Ok(None),
            Fetched::TooLarge { size } => Err(too_large(location, size, limit)),
            Fetched::Found(bytes) => Ok(Some(bytes)),
        }
    }
}

/// The outcome of [`ObjectStore::put_new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    Created(ObjectInfo),
    /// Something was already stored under the key; it was left as it was.
    AlreadyExists,
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Stores `bytes` under `key`, replacing what was there, atomically.
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<ObjectInfo>;

    /// Stores `bytes` under `key` only if nothing is there yet. Atomic where the store can
    /// do it (a filesystem link, S3 `If-None-Match: *`); servers that ignore the condition
    /// (Garage, Qiniu) overwrite, which is why published keys are content-addressed.
    async fn put_new(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<Created>;

    /// The object's bytes, if there is one of at most `limit` bytes. A larger one is not
    /// read: records and manifests are small, and a planted giant must not cost memory.
    async fn get(&self, key: &str, limit: u64) -> Result<Fetched>;

    /// The object's size and tag, or `None` when there is no such object.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// Whether an object exists under `key`.
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key).await?.is_some())
    }

    /// Removes the object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Where the object lives, for `image_path`: an absolute filesystem path or
    /// `s3://bucket/key`.
    fn location(&self, key: &str) -> String;

    /// The object's key as a CDN sees it (with any prefix), for `public base + / + key`.
    fn public_key(&self, key: &str) -> String;

    /// A URL that reads the object without credentials when no CDN is configured (a
    /// presigned GET on S3); `None` where there is no such thing (the filesystem).
    async fn presigned_url(&self, key: &str) -> Result<Option<String>>;

    /// The objects whose keys start with `prefix` (in this store's key space, without the
    /// S3 prefix), in key byte order, each with the store's own modification time and size.
    /// Objects being written are never listed half-done. Stores that cannot list keep this
    /// default, which says so.
    async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>> {
        Err(Stage3Error::storage(
            format!("this store cannot list keys (prefix {prefix:?})"),
            false,
        ))
    }

    /// The keys of [`ObjectStore::list_objects`], for callers that need nothing else.
    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_objects(prefix)
            .await?
            .into_iter()
            .map(|listed| listed.key)
            .collect())
    }
}

/// The error for an object over a read limit: not transient, it will not shrink.
fn too_large(location: &str, size: u64, limit: u64) -> Stage3Error {
    Stage3Error::storage(
        format!("{location} is {size} bytes, more than the {limit} this read allows"),
        false,
    )
}

/// Builds the store `settings.kind` names. Called once at start-up (the S3 client is built
/// here, on the shared AWS configuration).
pub(crate) async fn from_settings(
    settings: &StorageSettings,
    aws: &AwsConfig,
) -> Result<Arc<dyn ObjectStore>> {
    Ok(match settings.kind {
        StorageKind::Fs => Arc::new(FsStore::new(&settings.output_dir)?),
        StorageKind::S3 => {
            let s3 = settings
                .s3
                .as_ref()
                .ok_or_else(|| Stage3Error::config("STAGE3_S3_BUCKET is not set"))?;
            Arc::new(S3Store::from_settings(s3, aws).await)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;

    #[tokio::test]
    async fn s3_storage_without_its_settings_is_a_config_error() {
        let settings = StorageSettings {
            kind: StorageKind::S3,
            output_dir: "unused".into(),
            s3: None,
        };
        let err = from_settings(&settings, &AwsConfig::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.error_type(), ErrorType::Config);
    }
}
