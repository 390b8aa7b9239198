//! A store wrapper whose chosen writes wait until the test opens a gate, as a slow disk or
//! a far bucket would make them wait: tests use it to fix the order of events in a batch
//! without timing anything. It also tells the test when a write has reached the gate, so
//! the test can act while the writer is frozen there.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use stage3::storage::{Created, Fetched, Listed, ObjectInfo, ObjectMeta, ObjectStore};
use stage3::Result;
use tokio::sync::watch;

pub struct GatedStore {
    inner: Arc<dyn ObjectStore>,
    gate: watch::Receiver<bool>,
    gated: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// How many gated writes have reached the gate (waiting or let through).
    arrived: watch::Sender<usize>,
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
            arrived: watch::Sender::new(0),
        }
    }

    /// How many gated writes have been made so far.
    pub fn gated_writes(&self) -> usize {
        *self.arrived.borrow()
    }

    /// Waits until `count` gated writes have reached the gate.
    pub async fn until_arrived(&self, count: usize) {
        self.arrived
            .subscribe()
            .wait_for(|arrived| *arrived >= count)
            .await
            .expect("the store keeps the sender");
    }

    async fn wait_if_gated(&self, key: &str) {
        if (self.gated)(key) {
            self.arrived.send_modify(|arrived| *arrived += 1);
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

    async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>> {
        self.inner.list_objects(prefix).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix).await
    }
}
