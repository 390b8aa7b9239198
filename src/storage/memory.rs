//! An in-memory store: the library's own fake, for tests and for embedding Stage 3 where
//! results need not outlive the process. It keeps the same promises as the real stores —
//! whole objects, `put_new` that never replaces, capped reads — so code tested against it
//! behaves the same on disk and in a bucket. Listings give each object's insertion time,
//! as a filesystem gives a file's modification time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Created, Fetched, Listed, ObjectInfo, ObjectMeta, ObjectStore};
use crate::error::Result;

/// A stored object: its bytes and when it was stored. Its metadata (content type, cache
/// control) is an HTTP server's business, and nothing serves this store.
#[derive(Debug)]
struct Object {
    bytes: Bytes,
    stored_at: SystemTime,
}

impl Object {
    fn new(bytes: Bytes) -> Self {
        Object {
            bytes,
            stored_at: SystemTime::now(),
        }
    }
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Object>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Object>> {
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
    async fn put(&self, key: &str, bytes: Bytes, _meta: ObjectMeta) -> Result<ObjectInfo> {
        let stored = info(&bytes);
        self.lock().insert(key.to_string(), Object::new(bytes));
        Ok(stored)
    }

    async fn put_new(&self, key: &str, bytes: Bytes, _meta: ObjectMeta) -> Result<Created> {
        let mut objects = self.lock();
        if objects.contains_key(key) {
            return Ok(Created::AlreadyExists);
        }
        let stored = info(&bytes);
        objects.insert(key.to_string(), Object::new(bytes));
        Ok(Created::Created(stored))
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
        Ok(match self.lock().get(key) {
            Some(object) if object.bytes.len() as u64 > limit => Fetched::TooLarge {
                size: object.bytes.len() as u64,
            },
            Some(object) => Fetched::Found(object.bytes.clone()),
            None => Fetched::Missing,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        Ok(self.lock().get(key).map(|object| info(&object.bytes)))
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

    async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>> {
        Ok(self
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, object)| Listed {
                key: key.clone(),
                last_modified: object.stored_at,
                size: object.bytes.len() as u64,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listings_give_keys_in_order_with_their_insertion_time() {
        let store = MemoryStore::new();
        let before = SystemTime::now();
        for key in ["a/2", "a/1", "ab", "b"] {
            store
                .put(key, Bytes::from_static(b"xyz"), ObjectMeta::RECORD)
                .await
                .unwrap();
        }
        let listed = store.list_objects("a/").await.unwrap();
        let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        assert!(listed
            .iter()
            .all(|l| l.size == 3 && l.last_modified >= before));
        assert_eq!(store.list("").await.unwrap().len(), 4);
    }
}
