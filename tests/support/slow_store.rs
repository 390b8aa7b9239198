//! A store wrapper that makes chosen reads slow, as a far bucket or a descheduled Lambda
//! makes them, and records the writes and deletes that reach the store: tests use it to see
//! what a batch did when one of its steps took too long.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use stage3::storage::{Created, Fetched, Listed, ObjectInfo, ObjectMeta, ObjectStore};
use stage3::Result;

pub struct SlowStore {
    inner: Arc<dyn ObjectStore>,
    slow: Box<dyn Fn(&str) -> bool + Send + Sync>,
    delay: Duration,
    /// How many more reads of a matching key are slowed.
    slow_reads_left: AtomicUsize,
    writes: Mutex<Vec<String>>,
    deletes: Mutex<Vec<String>>,
}

impl SlowStore {
    /// The first `times` `get`s of keys for which `slow` is true wait `delay` first;
    /// everything else passes straight through to `inner`.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        delay: Duration,
        times: usize,
        slow: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        SlowStore {
            inner,
            slow: Box::new(slow),
            delay,
            slow_reads_left: AtomicUsize::new(times),
            writes: Mutex::new(Vec::new()),
            deletes: Mutex::new(Vec::new()),
        }
    }

    /// The keys written (`put` and `put_new`), in order.
    pub fn writes(&self) -> Vec<String> {
        self.writes.lock().unwrap().clone()
    }

    /// The keys deleted, in order.
    pub fn deletes(&self) -> Vec<String> {
        self.deletes.lock().unwrap().clone()
    }
}

#[async_trait]
impl ObjectStore for SlowStore {
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<ObjectInfo> {
        self.writes.lock().unwrap().push(key.to_string());
        self.inner.put(key, bytes, meta).await
    }

    async fn put_new(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<Created> {
        self.writes.lock().unwrap().push(key.to_string());
        self.inner.put_new(key, bytes, meta).await
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
        let slowed = (self.slow)(key)
            && self
                .slow_reads_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
        if slowed {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.get(key, limit).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.deletes.lock().unwrap().push(key.to_string());
        self.inner.delete(key).await
    }

    fn location(&self, key: &str) -> String {
        self.inner.location(key)
    }

    fn public_key(&self, key: &str) -> String {
        self.inner.public_key(key)
    }

    async fn presigned_url(&self, key: &str) -> Result<Option<String>> {
        self.inner.presigned_url(key).await
    }

    async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>> {
        self.inner.list_objects(prefix).await
    }
}
