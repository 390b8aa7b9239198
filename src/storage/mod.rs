//! Storage backends: where images and their result records live.
//!
//! The service sees a flat key space (`scene_001-3f2a….png`) through [`ObjectStore`]; the
//! filesystem backend maps keys under its output directory, the S3 backend under its bucket
//! and prefix. Every `put` is all-or-nothing: a reader never sees a partial object.

mod fs;
mod s3;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use fs::FsStore;
pub use s3::S3Store;

use crate::config::{Config, StorageKind};
use crate::error::Result;

/// What to send along with an object's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectMeta {
    pub content_type: &'static str,
    /// `Cache-Control` for CDNs; content-addressed keys never change, so they can be immutable.
    pub cache_control: &'static str,
}

impl ObjectMeta {
    pub const PNG: ObjectMeta = ObjectMeta {
        content_type: "image/png",
        cache_control: "public, max-age=31536000, immutable",
    };
    pub const RECORD: ObjectMeta = ObjectMeta {
        content_type: "application/json",
        cache_control: "no-cache",
    };
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Stores `bytes` under `key`, replacing what was there, atomically.
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<()>;

    /// The object's bytes, or `None` when there is no such object.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Whether an object exists under `key`.
    async fn exists(&self, key: &str) -> Result<bool>;

    /// Where the object lives, for `image_path`: a filesystem path or `s3://bucket/key`.
    fn location(&self, key: &str) -> String;

    /// The object's key as a CDN sees it (with any prefix), for `public base + / + key`.
    fn public_key(&self, key: &str) -> String;

    /// A URL that reads the object without credentials when no public base URL is set
    /// (a presigned GET on S3); `None` where there is no such thing (the filesystem).
    async fn signed_url(&self, key: &str) -> Result<Option<String>>;

    /// The keys that start with `prefix` (in this store's key space, without the S3
    /// prefix), in byte order. Objects being written are never listed half-done. Stores
    /// that cannot list keep this default, which says so.
    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Err(crate::error::Stage3Error::storage(
            format!("this store cannot list keys (prefix {prefix:?})"),
            false,
        ))
    }
}

/// Builds the configured store. Called once at start-up (the S3 client is built here).
pub async fn from_config(config: &Config) -> Result<Arc<dyn ObjectStore>> {
    Ok(match config.storage {
        StorageKind::Fs => Arc::new(FsStore::new(&config.output_dir)?),
        StorageKind::S3 => Arc::new(S3Store::from_config(config).await?),
    })
}
