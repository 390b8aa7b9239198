//! The result cache: request hashes, object keys, verified records, and claims.
//!
//! A generation is identified by everything that shapes the image — provider, endpoint,
//! model, the exact prompt, size, quality, seed, references — hashed with SHA-256: the
//! request hash. It names the scene's *record* (`{scene}-{hash16}.json`), the JSON of its
//! `Stage3Output`, which is replaced when the scene is generated again. The image itself is
//! published under a *content-addressed* key (`{scene}-{sha256 of the PNG, 16}.png`) and never
//! changes: a CDN that cached it for a year is never wrong, and two runs that raced each left
//! a record pointing at the image it wrote.
//!
//! A record is not believed blindly. On a hit, everything that can be derived from the request
//! is derived again (scene id, paths, URLs, options), and the stored image is checked against
//! the record — its size and SHA-256, or on S3 its length and entity tag from one HEAD — so an
//! edited record or a swapped image is a miss, not an answer.
//!
//! Claims ([`claims`]) make concurrent workers given the same scene (SQS delivers at least
//! once) pay once: one worker generates, the others wait for its record.

mod claims;
mod shelf;

pub(crate) use claims::{ClaimTiming, Turn};
pub(crate) use shelf::{Shelf, StoredImage};

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::image_spec::ImageSpec;
use crate::normalize::{MAX_ASPECT_DEVIATION, MIN_SIDE};
use crate::provider::ProviderIdentity;
use crate::schema::{ImageQuality, ImageSize, Stage3Output};
use crate::storage::{Fetched, ObjectInfo, ObjectMeta, ObjectStore};

/// Bumped when the meaning of a stored result changes, so old records stop matching.
const KEY_SCHEME: &str = "stage3/v1";
/// Hex digits of a hash used in keys: 64 bits, plenty per scene.
const KEY_HASH_CHARS: usize = 16;
/// Records are a few kilobytes; anything bigger was not written by us.
pub(crate) const MAX_RECORD_BYTES: u64 = 1024 * 1024;
/// A label's producer or propagator is an id or a name, never a page of text.
const MAX_LABEL_FIELD_CHARS: usize = 256;

/// The request hash: everything that determines the generated image — who draws it
/// (`provider`, the provider of the spec's model) and what is drawn (`spec`, with the
/// prompt exactly as that provider is sent it) — hashed with SHA-256, in lowercase hex.
pub(crate) fn request_hash(provider: ProviderIdentity, spec: &ImageSpec) -> String {
    request_hash_with_characters(provider, spec, &[])
}

/// [`request_hash`] for a scene also sent its characters' generated references (see
/// `crate::cast`): `spec` without them, and their images' SHA-256s. They are hashed by
/// content, not by the URL that carries them (a presigned URL changes on every run), so
/// a new sheet means a new scene and an unchanged cast a cache hit. Without any, the hash
/// is [`request_hash`]'s, as before character modes.
pub(crate) fn request_hash_with_characters(
    provider: ProviderIdentity,
    spec: &ImageSpec,
    character_sha256s: &[String],
) -> String {
    /// The hashed encoding. Its field order and spelling are the key scheme: changing them
    /// re-keys every stored result, so do it only with a new `KEY_SCHEME`.
    #[derive(Serialize)]
    struct Identity<'a> {
        provider: &'a str,
        api: Option<&'a str>,
        model: &'a str,
        prompt: &'a str,
        /// Only for a provider that takes it apart (DashScope); absent otherwise, which
        /// keeps every other provider's keys what they were.
        #[serde(skip_serializing_if = "Option::is_none")]
        negative_prompt: Option<&'a str>,
        size: ImageSize,
        quality: ImageQuality,
        seed: Option<i64>,
        references: &'a [String],
        /// Absent without generated character references, which keeps every earlier key.
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        character_references: &'a [String],
    }
    let sent = spec.prompt_for(provider.kind);
    let identity = Identity {
        provider: provider.name(),
        api: provider.variant,
        model: &spec.model.model,
        prompt: sent.prompt,
        negative_prompt: sent.negative_prompt,
        size: spec.size,
        quality: spec.quality,
        seed: spec.seed,
        references: &spec.references,
        character_references: character_sha256s,
    };
    let mut hasher = Sha256::new();
    hasher.update(KEY_SCHEME.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(&identity).expect("identity serializes"));
    hex::encode(hasher.finalize())
}

/// The mutable objects of one request: its record, and the claim of a worker generating it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResultKeys {
    pub record: String,
    pub claim: String,
    /// Where images lived before keys were content-addressed; still read, never written.
    pub legacy_image: String,
}

impl ResultKeys {
    /// What the keys share (`{scene}-{hash16}`): the `PropagateID` a label carries.
    pub(crate) fn stem(&self) -> &str {
        self.record.trim_end_matches(".json")
    }

    pub(crate) fn new(scene_id: &str, request_hash: &str) -> Self {
        let stem = format!("{scene_id}-{}", short_hash(request_hash));
        ResultKeys {
            record: format!("{stem}.json"),
            claim: format!("{stem}.claim"),
            legacy_image: format!("{stem}.png"),
        }
    }
}

/// The published key of a PNG: the scene and the first hex digits of its SHA-256.
pub(crate) fn image_key(scene_id: &str, content_sha256: &str) -> String {
    format!("{scene_id}-{}.png", short_hash(content_sha256))
}

/// The first hex digits of a hash, as keys carry them. Hashes read from a record are
/// checked to be whole SHA-256s before any key is made of them ([`is_sha256`]); this never
/// slices, so a short one still cannot panic.
pub(crate) fn short_hash(hash: &str) -> &str {
    hash.get(..KEY_HASH_CHARS).unwrap_or(hash)
}

/// Whether `text` is a SHA-256 as this service writes one: 64 lowercase hex digits.
pub(crate) fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a hit must agree with: the request, and what an image of it can look like.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected<'a> {
    pub scene_id: &'a str,
    pub request_hash: &'a str,
    pub size: ImageSize,
    pub max_pixels: u64,
    /// The largest image worth reading back to verify it.
    pub max_image_bytes: u64,
}

/// A stored result that passed every check, with the key its image really lives under.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub record: Stage3Output,
    pub image_key: String,
}

/// Looks up a finished result and verifies it. Anything that does not check out is a miss
/// (logged), and the scene is generated again; only a store failure is an error.
pub(crate) async fn lookup(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    expected: &Expected<'_>,
) -> Result<Option<Verified>> {
    let bytes = match store.get(&keys.record, MAX_RECORD_BYTES).await? {
        Fetched::Missing => return Ok(None),
        Fetched::TooLarge { size } => {
            tracing::warn!(key = %keys.record, size, "ignoring an oversized result record");
            return Ok(None);
        }
        Fetched::Found(bytes) => bytes,
    };
    let Ok(record) = serde_json::from_slice::<Stage3Output>(&bytes) else {
        tracing::warn!(key = %keys.record, "ignoring an unreadable result record");
        return Ok(None);
    };
    if let Err(why) = plausible(&record, expected) {
        tracing::warn!(key = %keys.record, why, "ignoring a result record that does not fit its request");
        return Ok(None);
    }
    let content_key = image_key(expected.scene_id, &record.generation_params.content_sha256);
    for image_key in [content_key, keys.legacy_image.clone()] {
        match verify_image(store, &image_key, &record, expected).await? {
            ImageCheck::Matches => return Ok(Some(Verified { record, image_key })),
            ImageCheck::Missing => continue,
            ImageCheck::Differs(why) => {
                tracing::warn!(key = %image_key, why, "stored image does not match its record; regenerating");
                return Ok(None);
            }
        }
    }
    tracing::warn!(key = %keys.record, "result record without its image; regenerating");
    Ok(None)
}

/// Checks a record's own claims against the request, before any image is read.
fn plausible(record: &Stage3Output, expected: &Expected<'_>) -> std::result::Result<(), String> {
    let params = &record.generation_params;
    if params.request_hash != expected.request_hash {
        return Err("its request hash is another request's".into());
    }
    if crate::schema::validate_model(&params.model).is_err() {
        return Err("its model is not a model slug".into());
    }
    if params
        .provider
        .parse::<crate::image_spec::ProviderKind>()
        .is_err()
    {
        return Err("its provider is not one this service knows".into());
    }
    if !is_sha256(&params.content_sha256) {
        return Err("its content hash is not a SHA-256".into());
    }
    if let Some(label) = &params.aigc_label {
        // Its source hash names the unlabelled image's key and is checked against its
        // bytes: it must be a whole hash before anything is built from it.
        if !is_sha256(&label.source_sha256) {
            return Err("its label's source hash is not a SHA-256".into());
        }
        if label.producer.chars().count() > MAX_LABEL_FIELD_CHARS
            || label.propagator.chars().count() > MAX_LABEL_FIELD_CHARS
        {
            return Err("its label names an implausibly long producer or propagator".into());
        }
    }
    let (width, height) = (record.width, record.height);
    if width.min(height) < MIN_SIDE || u64::from(width) * u64::from(height) > expected.max_pixels {
        return Err(format!("it claims an impossible size {width}x{height}"));
    }
    let (want_width, want_height) = expected.size.dimensions();
    let wanted = f64::from(want_width) / f64::from(want_height);
    let actual = f64::from(width) / f64::from(height);
    if (actual - wanted).abs() / wanted > MAX_ASPECT_DEVIATION {
        return Err(format!(
            "it claims {width}x{height} for size {}",
            expected.size
        ));
    }
    Ok(())
}

enum ImageCheck {
    Matches,
    Missing,
    Differs(String),
}

/// Compares the stored image with what the record says about it: length and entity tag
/// from one HEAD where the store keeps tags, otherwise the bytes themselves.
async fn verify_image(
    store: &dyn ObjectStore,
    key: &str,
    record: &Stage3Output,
    expected: &Expected<'_>,
) -> Result<ImageCheck> {
    let params = &record.generation_params;
    let Some(info) = store.head(key).await? else {
        return Ok(ImageCheck::Missing);
    };
    if info.size != params.bytes {
        return Ok(ImageCheck::Differs(format!(
            "{} bytes stored, {} recorded",
            info.size, params.bytes
        )));
    }
    if let (Some(stored), Some(recorded)) = (&info.etag, &params.etag) {
        return Ok(if stored == recorded {
            ImageCheck::Matches
        } else {
            ImageCheck::Differs("its entity tag changed".into())
        });
    }
    let bytes = match store.get(key, expected.max_image_bytes).await? {
        Fetched::Found(bytes) => bytes,
        Fetched::Missing => return Ok(ImageCheck::Missing),
        Fetched::TooLarge { size } => {
            return Ok(ImageCheck::Differs(format!(
                "{size} bytes, too large to check"
            )))
        }
    };
    if hex::encode(Sha256::digest(&bytes)) != params.content_sha256 {
        return Ok(ImageCheck::Differs(
            "its SHA-256 differs from the record's".into(),
        ));
    }
    if png_dimensions(&bytes) != Some((record.width, record.height)) {
        return Ok(ImageCheck::Differs(
            "its pixel size differs from the record's".into(),
        ));
    }
    Ok(ImageCheck::Matches)
}

/// Width and height from a PNG's IHDR chunk, which must come first.
fn png_dimensions(png: &[u8]) -> Option<(u32, u32)> {
    if png.get(..8)? != b"\x89PNG\r\n\x1a\n" || png.get(12..16)? != b"IHDR" {
        return None;
    }
    let word = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    Some((word(16)?, word(20)?))
}

/// Writes the record of a result whose image is already stored. URLs are left out: they are
/// computed for each answer (a presigned or signed URL expires), never stored.
pub(crate) async fn save_record(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    output: &Stage3Output,
) -> Result<ObjectInfo> {
    let record = Stage3Output {
        image_url: None,
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

    use crate::image_spec::{ModelRef, ProviderKind};

    pub(super) fn spec(prompt: &str) -> ImageSpec {
        let mut spec = ImageSpec::plain(
            ModelRef::resolve("google/gemini-2.5-flash-image", ProviderKind::OpenRouter),
            ImageSize::Square,
            ImageQuality::Standard,
        );
        spec.prompt = prompt.into();
        spec
    }

    fn by(kind: ProviderKind, variant: Option<&'static str>) -> ProviderIdentity {
        ProviderIdentity { kind, variant }
    }

    pub(super) fn hash(spec: &ImageSpec) -> String {
        request_hash(by(ProviderKind::OpenRouter, Some("images")), spec)
    }

    #[test]
    fn the_same_request_always_has_the_same_hash() {
        assert_eq!(hash(&spec("a")), hash(&spec("a")));
        assert_eq!(hash(&spec("a")).len(), 64);
    }

    #[test]
    fn any_change_changes_the_hash() {
        let base = hash(&spec("a"));
        assert_ne!(base, hash(&spec("b")));
        let mut other = spec("a");
        other.seed = Some(7);
        assert_ne!(base, hash(&other));
        let mut other = spec("a");
        other.size = ImageSize::Portrait;
        assert_ne!(base, hash(&other));
        assert_ne!(
            base,
            request_hash(by(ProviderKind::Placeholder, Some("images")), &spec("a"))
        );
        assert_ne!(
            base,
            request_hash(by(ProviderKind::OpenRouter, Some("chat")), &spec("a"))
        );
        let mut other = spec("a");
        other.references = vec!["https://cdn.example.com/fox.png".to_string()];
        assert_ne!(base, hash(&other));
    }

    /// Stored results are found by these hashes: a change here orphans every cached image
    /// (and pays for it again). The expected values were computed outside Rust, from the
    /// documented encoding: SHA-256 of `stage3/v1`, a NUL, then the compact JSON identity.
    #[test]
    fn the_key_scheme_is_stable() {
        assert_eq!(
            hash(&spec("a fox, watercolor. Avoid: text")),
            "268a217c72ed7900c8066c46d28beb94fb6ac115bf497192255c5d9b7570f615"
        );
        let mut spec = ImageSpec::plain(
            ModelRef::resolve("m/x", ProviderKind::Placeholder),
            ImageSize::Landscape,
            ImageQuality::Hd,
        );
        spec.prompt = "雪中的狐狸".into();
        spec.seed = Some(42);
        spec.references = vec!["https://cdn.example.com/fox.png".into()];
        assert_eq!(
            request_hash(by(ProviderKind::Placeholder, None), &spec),
            "6f9c3305ace3c5a92946dd2f07986b5473ef85e3bddcf59c8139620af8c67a54"
        );
    }

    /// DashScope is sent the negatives apart, and its hash says so; for everyone else the
    /// folded prompt is what is sent and hashed.
    #[test]
    fn the_hash_follows_the_prompt_as_sent() {
        let mut spec = spec("a fox.\n\nAvoid: text.");
        spec.positive_prompt = "a fox.".into();
        spec.negative_prompt = "text".into();
        spec.model = ModelRef::resolve("qwen-image", ProviderKind::DashScope);
        let dashscope = request_hash(by(ProviderKind::DashScope, None), &spec);
        let mut without_negatives = spec.clone();
        without_negatives.negative_prompt = String::new();
        assert_ne!(
            dashscope,
            request_hash(by(ProviderKind::DashScope, None), &without_negatives)
        );
        // Ark folds them in: the negative field is not part of its identity.
        assert_eq!(
            request_hash(by(ProviderKind::Ark, None), &spec),
            request_hash(by(ProviderKind::Ark, None), &{
                let mut folded = spec.clone();
                folded.positive_prompt = "changed".into();
                folded.negative_prompt = "changed".into();
                folded
            })
        );
    }

    #[test]
    fn keys_carry_the_scene_and_the_hash() {
        let hash = hash(&spec("a"));
        let keys = ResultKeys::new("scene_001", &hash);
        assert_eq!(keys.record, format!("scene_001-{}.json", &hash[..16]));
        assert_eq!(keys.claim, keys.record.replace(".json", ".claim"));
        let content = hex::encode(Sha256::digest(b"png bytes"));
        assert_eq!(
            image_key("scene_001", &content),
            format!("scene_001-{}.png", &content[..16])
        );
    }

    #[test]
    fn png_dimensions_come_from_the_header() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&1792u32.to_be_bytes());
        png.extend_from_slice(&1024u32.to_be_bytes());
        assert_eq!(png_dimensions(&png), Some((1792, 1024)));
        assert_eq!(png_dimensions(b"<html>"), None);
    }
}
