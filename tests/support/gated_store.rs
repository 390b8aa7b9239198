//! A store wrapper whose chosen writes wait until the test opens a gate, as a slow disk or
//! a far bucket would make them wait: tests use it to fix the order of events in a batch
//! without timing anything.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use stage3::error::Result;
use stage3::storage::{ObjectMeta, ObjectStore};
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

#[async_trait]
impl ObjectStore for GatedStore {
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<()> {
        if (self.gated)(key) {
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open)
                .await
                .expect("the test keeps the gate's sender");
        }
        self.inner.put(key, bytes, meta).await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(key).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key).await
    }

    fn location(&self, key: &str) -> String {
        self.inner.location(key)
    }

    fn public_key(&self, key: &str) -> String {
        self.inner.public_key(key)
    }

    async fn signed_url(&self, key: &str) -> Result<Option<String>> {
        self.inner.signed_url(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix).await
    }
}
