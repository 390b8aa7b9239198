//! The content-addressed result cache: request hashes, object keys and stored records.
//!
//! A generation is identified by everything that shapes the image — provider, endpoint,
//! model, the exact prompt, size, quality, seed — hashed with SHA-256. The hash is part of
//! the object key, so a changed prompt never overwrites an image a CDN may have cached, and
//! the same request always finds its earlier result. Beside each image lies a JSON record
//! (its `Stage3Output`), written *after* the image: a record always points at a complete
//! image, and an image without a record is simply not a result yet.

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::schema::{ImageQuality, ImageSize, Stage3Output};
use crate::storage::{ObjectMeta, ObjectStore};

/// Bumped when the meaning of a stored result changes, so old records stop matching.
const KEY_SCHEME: &str = "stage3/v1";
/// Hex digits of the request hash used in keys: 64 bits, plenty per scene.
const KEY_HASH_CHARS: usize = 16;

/// Everything that determines the generated image.
#[derive(Debug, Clone, Serialize)]
pub struct RequestIdentity<'a> {
    pub provider: &'a str,
    pub api: Option<&'a str>,
    pub model: &'a str,
    pub prompt: &'a str,
    pub size: ImageSize,
    pub quality: ImageQuality,
    pub seed: Option<i64>,
    pub references: &'a [String],
}

impl RequestIdentity<'_> {
    /// Lowercase hex SHA-256 over a canonical JSON encoding of the identity.
    pub fn hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(KEY_SCHEME.as_bytes());
        hasher.update([0]);
        // Field order is fixed by the struct, so the encoding is canonical.
        hasher.update(serde_json::to_vec(self).expect("identity serializes"));
        hex::encode(hasher.finalize())
    }
}

/// The two objects of one result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultKeys {
    pub image: String,
    pub record: String,
}

impl ResultKeys {
    pub fn new(scene_id: &str, request_hash: &str) -> Self {
        let stem = format!("{scene_id}-{}", &request_hash[..KEY_HASH_CHARS]);
        ResultKeys {
            image: format!("{stem}.png"),
            record: format!("{stem}.json"),
        }
    }
}

/// Looks up a finished result: its record must parse, belong to `request_hash`, and its
/// image must still exist. Anything less is a miss, and the scene is generated again.
pub async fn lookup(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    request_hash: &str,
) -> Result<Option<Stage3Output>> {
    let Some(record) = store.get(&keys.record).await? else {
        return Ok(None);
    };
    let Ok(output) = serde_json::from_slice::<Stage3Output>(&record) else {
        tracing::warn!(key = %keys.record, "ignoring an unreadable result record");
        return Ok(None);
    };
    if output.generation_params.request_hash != request_hash {
        return Ok(None);
    }
    if !store.exists(&keys.image).await? {
        tracing::warn!(key = %keys.image, "result record without its image; regenerating");
        return Ok(None);
    }
    Ok(Some(output))
}

/// Writes the record of a result whose image is already stored.
pub async fn save_record(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    output: &Stage3Output,
) -> Result<()> {
    let record = Stage3Output {
        from_cache: false,
        ..output.clone()
    };
    let json = serde_json::to_vec_pretty(&record).expect("Stage3Output serializes");
    store
        .put(&keys.record, Bytes::from(json), ObjectMeta::RECORD)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(prompt: &str) -> RequestIdentity<'_> {
        RequestIdentity {
            provider: "openrouter",
            api: Some("images"),
            model: "google/gemini-2.5-flash-image",
            prompt,
            size: ImageSize::Square,
            quality: ImageQuality::Standard,
            seed: None,
            references: &[],
        }
    }

    #[test]
    fn the_same_request_always_has_the_same_hash() {
        assert_eq!(identity("a").hash(), identity("a").hash());
        assert_eq!(identity("a").hash().len(), 64);
    }

    #[test]
    fn any_change_changes_the_hash() {
        let base = identity("a").hash();
        assert_ne!(base, identity("b").hash());
        let mut other = identity("a");
        other.seed = Some(7);
        assert_ne!(base, other.hash());
        let mut other = identity("a");
        other.size = ImageSize::Portrait;
        assert_ne!(base, other.hash());
        let mut other = identity("a");
        other.provider = "placeholder";
        assert_ne!(base, other.hash());
        let references = ["https://cdn.example.com/fox.png".to_string()];
        let mut other = identity("a");
        other.references = &references;
        assert_ne!(base, other.hash());
    }

    #[test]
    fn keys_carry_the_scene_and_the_hash() {
        let keys = ResultKeys::new("scene_001", &identity("a").hash());
        assert!(keys.image.starts_with("scene_001-"));
        assert!(keys.image.ends_with(".png"));
        assert_eq!(keys.record, keys.image.replace(".png", ".json"));
    }
}
