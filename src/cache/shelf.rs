//! The shelf: where the cache puts a published image, and finds the source of one to
//! relabel. Every call runs within the deadline and is tried again while its failure is
//! transient.
//!
//! Images live under content addresses (`{scene_id}-{hash}.png`, see [`super::image_key`]),
//! written with `put_new` so a CDN never sees one change; beside a visibly marked image
//! lies its unlabelled source (`sources/…`), so it can be labelled again later without a
//! provider call.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::deadline::Deadline;
use crate::error::Result;
use crate::labels::{self, Published};
use crate::retry::RetryPolicy;
use crate::schema::{AppliedLabels, GenerationParams};
use crate::storage::{self, Created, Fetched, ObjectMeta, ObjectStore};

/// A published image, stored.
pub(crate) struct StoredImage {
    pub image_key: String,
    pub published: Published,
    pub etag: Option<String>,
}

/// The store as the cache writes it, for one scene's calls.
pub(crate) struct Shelf<'a> {
    pub store: &'a dyn ObjectStore,
    pub retry: &'a RetryPolicy,
    pub deadline: Deadline,
}

impl Shelf<'_> {
    /// One storage call (`what`, for messages), within the deadline and
    /// [`storage::CALL_TIMEOUT`], tried again while transient.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, mut operation: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = self.deadline;
        self.retry
            .run(deadline, what, || {
                deadline.run(storage::CALL_TIMEOUT, what, operation())
            })
            .await
    }

    /// Stores a published image under its content address (and, when a mark was drawn on
    /// it, its unlabelled source beside it, so it can be relabelled later).
    pub(crate) async fn store_image(
        &self,
        scene_id: &str,
        published: &Published,
        source: Option<&Bytes>,
    ) -> Result<StoredImage> {
        if let Some(source) = source.filter(|_| published.applied.visible) {
            let key = labels::source_key(scene_id, &published.applied.source_sha256);
            let created = self
                .call("storing the unlabelled source", || {
                    self.store.put_new(&key, source.clone(), ObjectMeta::SOURCE)
                })
                .await?;
            if created == Created::AlreadyExists {
                self.republish(&key, source, ObjectMeta::SOURCE).await?;
            }
        }
        let image_key = super::image_key(scene_id, &published.sha256);
        let png = &published.png;
        let created = self
            .call("storing the image", || {
                self.store.put_new(&image_key, png.clone(), ObjectMeta::PNG)
            })
            .await?;
        let etag = match created {
            Created::Created(info) => info.etag,
            Created::AlreadyExists => self.republish(&image_key, png, ObjectMeta::PNG).await?,
        };
        Ok(StoredImage {
            image_key,
            published: published.clone(),
            etag,
        })
    }

    /// A content address is taken: normally by these very bytes (generated before, or by a
    /// worker that raced us), which a CDN may serve and must not change. An object there
    /// that is not these bytes was damaged or planted, and is replaced. Returns the entity
    /// tag for the record.
    async fn republish(
        &self,
        key: &str,
        bytes: &Bytes,
        meta: ObjectMeta,
    ) -> Result<Option<String>> {
        let limit = bytes.len() as u64;
        let stored = self
            .call("checking the stored image", || self.store.get(key, limit))
            .await?;
        if stored == Fetched::Found(bytes.clone()) {
            let info = self
                .call("checking the stored image", || self.store.head(key))
                .await?;
            return Ok(info.and_then(|info| info.etag));
        }
        tracing::warn!(key, "replacing a damaged object at a content address");
        let info = self
            .call("storing the image", || {
                self.store.put(key, bytes.clone(), meta)
            })
            .await?;
        Ok(info.etag)
    }

    /// The unlabelled source of the stored result `params` describes (its image at
    /// `image_key`), checked against its record, with the labels it was published under.
    /// `None` when it cannot be had: then the scene is generated again.
    pub(crate) async fn source_to_relabel(
        &self,
        scene_id: &str,
        image_key: &str,
        params: &GenerationParams,
        max_image_bytes: u64,
    ) -> Result<Option<(Bytes, AppliedLabels)>> {
        // Results from before labels were recorded carry none: their image is the source.
        let applied = params.aigc_label.clone().unwrap_or(AppliedLabels {
            implicit: false,
            implicit_form: None,
            visible: false,
            producer: String::new(),
            propagator: String::new(),
            source_sha256: params.content_sha256.clone(),
        });
        let (key, limit) = if applied.visible {
            (
                labels::source_key(scene_id, &applied.source_sha256),
                max_image_bytes,
            )
        } else {
            (image_key.to_string(), params.bytes)
        };
        let fetched = self
            .call("reading the image to relabel", || {
                self.store.get(&key, limit)
            })
            .await?;
        let Fetched::Found(bytes) = fetched else {
            tracing::warn!(key, "the unlabelled source is gone; generating again");
            return Ok(None);
        };
        let source = if applied.visible {
            (hex::encode(Sha256::digest(&bytes)) == applied.source_sha256).then_some(bytes)
        } else {
            labels::source_of_unmarked(&bytes, &applied).ok()
        };
        let Some(source) = source else {
            tracing::warn!(
                key,
                "the stored source does not match its record; generating again"
            );
            return Ok(None);
        };
        Ok(Some((source, applied)))
    }
}
