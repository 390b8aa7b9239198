//! An in-memory store: the library's own fake, for tests and for embedding Stage 3 where
//! results need not outlive the process. It keeps the same promises as the real stores —
//! whole objects, `put_new` that never replaces, capped reads — so code tested against it
//! behaves the same on disk and in a bucket.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Created, Fetched, ObjectInfo, ObjectMeta, ObjectStore};
use crate::error::Result;

#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, (Bytes, ObjectMeta)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Every key stored, in order (for tests that check what a run left behind).
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The metadata an object was stored with.
    pub fn meta(&self, key: &str) -> Option<ObjectMeta> {
        self.lock().get(key).map(|(_, meta)| *meta)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, ObjectMeta)>> {
        // A panic while holding the lock cannot leave a half-written map: every update is
        // one insert or remove.
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn info(bytes: &Bytes) -> ObjectInfo {
    ObjectInfo {
        size: bytes.len() as u64,
        etag: None,
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<ObjectInfo> {
        let stored = info(&bytes);
        self.lock().insert(key.to_string(), (bytes, meta));
        Ok(stored)
    }

    async fn put_new(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<Created> {
        let mut objects = self.lock();
        if objects.contains_key(key) {
            return Ok(Created::AlreadyExists);
        }
        let stored = info(&bytes);
        objects.insert(key.to_string(), (bytes, meta));
        Ok(Created::Created(stored))
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
        Ok(match self.lock().get(key) {
            Some((bytes, _)) if bytes.len() as u64 > limit => Fetched::TooLarge {
                size: bytes.len() as u64,
            },
            Some((bytes, _)) => Fetched::Found(bytes.clone()),
            None => Fetched::Missing,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        Ok(self.lock().get(key).map(|(bytes, _)| info(bytes)))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
        Ok(())
    }

    fn location(&self, key: &str) -> String {
        format!("memory://{key}")
    }

    fn public_key(&self, key: &str) -> String {
        key.to_string()
    }

    async fn presigned_url(&self, _key: &str) -> Result<Option<String>> {
        Ok(None)
    }
}
