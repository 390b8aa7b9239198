//! A store wrapper whose chosen writes wait until the test opens a gate, as a slow disk or
//! a far bucket would make them wait: tests use it to fix the order of events in a batch
//! without timing anything.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use stage3::error::Result;
use stage3::storage::{Created, Fetched, ObjectInfo, ObjectMeta, ObjectStore};
use tokio::sync::watch;

pub struct GatedStore {
    inner: Arc<dyn ObjectStore>,
    gate: watch::Receiver<bool>,
    gated: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl GatedStore {
    /// `put`s of keys for which `gated` is true wait until `true` is sent on the gate's
    /// channel; everything else passes straight through to `inner`.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        gate: watch::Receiver<bool>,
        gated: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        GatedStore {
            inner,
            gate,
            gated: Box::new(gated),
        }
    }
}

impl GatedStore {
    async fn wait_if_gated(&self, key: &str) {
        if (self.gated)(key) {
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open)
                .await
                .expect("the test keeps the gate's sender");
        }
    }
}

#[async_trait]
impl ObjectStore for GatedStore {
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<ObjectInfo> {
        self.wait_if_gated(key).await;
        self.inner.put(key, bytes, meta).await
    }

    async fn put_new(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<Created> {
        self.wait_if_gated(key).await;
        self.inner.put_new(key, bytes, meta).await
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
        self.inner.get(key, limit).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
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
}
