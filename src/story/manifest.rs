//! The story manifest: every scene of a story, in order, with its latest outcome; and the
//! checks every entry passes before it reaches the manifest or the page.
//!
//! Batches of one story can run at the same time (two Lambda invocations, a CLI run beside
//! a queue), and the stores we target have no conditional writes (Garage and Qiniu ignore
//! `If-None-Match`, docs/design.md §3), so no batch may simply read-modify-write
//! `manifest.json`. Instead each batch writes its own **fragment** under a key no other batch
//! can pick, and the manifest is rebuilt from the previous manifest and the fragments
//! ([`Merge`]): for each scene, the entry of the fragment the **store** wrote last (its
//! modification time, then its key) wins — never a time a writer put in a name or a body,
//! which a writer whose clock runs ahead, or a planted file, could choose. The protocol
//! around it lives in [`super::publish_story_with`].
//!
//! Fragments and manifests are read from a store other tenants may write to, so nothing in
//! them is trusted: each document is parsed entry by entry ([`read_document`]), never whole,
//! and each entry is checked ([`check_entry`]) — its keys must be this service's own flat
//! layout, its cost a sane amount, its times not in the future, its text bounded — or it is
//! skipped with a warning. URLs are never taken from a document: links are rebuilt from keys.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::schema::{validate_scene_id, ImageSize, Stage3Output};

/// The format of `manifest.json`: 2 records, per entry, the fragment and store time it came
/// from, which is what lets a manifest stand in for fragments that were deleted.
pub(crate) const MANIFEST_FORMAT: u32 = 2;
/// The format of batch fragments (unchanged since the first version).
pub(crate) const FRAGMENT_FORMAT: u32 = 1;

/// The longest prompt an entry may carry, in characters (the default prompt limit).
pub(crate) const MAX_PROMPT_CHARS: usize = crate::prompt::DEFAULT_MAX_PROMPT_CHARS;
/// The longest failure message, in characters (as in batch answers).
pub(crate) const MAX_MESSAGE_CHARS: usize = crate::schema::MAX_FAILURE_MESSAGE_CHARS;
/// The longest model name, in characters.
pub(crate) const MAX_MODEL_CHARS: usize = 200;
const MAX_ERROR_TYPE_CHARS: usize = 64;
/// The most one image may have cost: real images cost cents; a larger figure is forged or
/// broken, and would make the story's total meaningless (or infinite).
pub(crate) const MAX_SCENE_COST_USD: f64 = 1_000.0;
/// The largest width or height an entry may claim.
const MAX_IMAGE_SIDE: u32 = 16_384;
/// The most entries read from one fragment; a batch's own fragments never hold more.
pub(crate) const MAX_FRAGMENT_ENTRIES: usize = 1_000;
/// The most scenes a story holds; entries for further scenes are skipped.
pub const MAX_STORY_SCENES: usize = 10_000;
/// The most bytes of entries (as compact JSON) a story holds, so that a manifest this code
/// writes always stays under the size it reads back (`super::MAX_MANIFEST_BYTES`).
pub(crate) const MAX_STORY_BYTES: usize = 24 * 1024 * 1024;
/// The most fragment names a manifest's `fragments` list is read with.
const MAX_FRAGMENT_NAMES: usize = 10_000;

/// `stories/{story_id}/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default = "default_manifest_format")]
    pub format: u32,
    pub story_id: String,
    /// The store's time of the newest fragment merged (RFC 3339 UTC).
    pub updated_at: String,
    pub totals: StoryTotals,
    /// Batch fragments merged into this manifest, ever (deleted ones included).
    #[serde(default)]
    pub batches: usize,
    /// The names of the fragments merged that were still stored when this manifest was
    /// written, so that a later merge does not count them twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fragments: Vec<String>,
    /// The story's cast: its characters' sheets (`sheet` mode), from `cast.json`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cast: Vec<super::CastMember>,
    pub scenes: Vec<SceneEntry>,
}

fn default_manifest_format() -> u32 {
    1
}

/// The story at a glance, over the scenes' current entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoryTotals {
    pub scenes: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// What the images now in the story cost to generate, in USD (as billed when made).
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SceneStatus {
    Succeeded,
    Failed,
}

/// One scene's outcome as a batch reports it, in memory: the answer's local paths and
/// URLs included. Only [`SceneEntry`], which has neither, is ever written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub scene_id: String,
    pub status: SceneStatus,
    /// The scene's `image_prompt`, as stage 2 wrote it.
    pub prompt: String,
    /// The requested size (`1024x1024`…); `width`/`height` are the stored pixels.
    pub size: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// The stored PNG's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// What the image cost to generate, in USD, when the provider said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// For a failure: the stable `error_type` and the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Not used: an entry's time is the store's time of the fragment that holds it.
    #[serde(default)]
    pub updated_at: String,
}

/// One scene's latest outcome, as fragments and `manifest.json` hold it.
///
/// Keys (`image_key`, `thumbnail_key`) are relative to the store's root (under the S3
/// prefix), which is where the storyboard's relative links point. There are no local paths
/// (`/home/…`, `s3://bucket/…`): the manifest is public. `image_url`/`thumbnail_url` are
/// only written into the manifest, rebuilt from the keys when it is published, and only
/// when they do not expire (a CDN without signing); they are never read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneEntry {
    pub scene_id: String,
    pub status: SceneStatus,
    pub prompt: String,
    pub size: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The store's time of the fragment this entry came from (RFC 3339 UTC); empty in a
    /// fragment, whose own store time is the entries' time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub updated_at: String,
    /// The name of that fragment under `batches/`; empty in a fragment.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fragment: String,
}

/// What a scene was asked to be, known before it runs: the part of an entry a failure has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryScene {
    pub scene_id: String,
    pub prompt: String,
    pub size: String,
    pub model: String,
}

impl ManifestEntry {
    /// The entry of a stored image.
    pub(crate) fn succeeded(scene: &StoryScene, output: &Stage3Output) -> Self {
        let image_key = key_of_location(&output.image_path);
        let thumbnail_key = output
            .thumbnail_path
            .as_ref()
            .map(|_| super::thumbnail::thumbnail_key(&image_key));
        ManifestEntry {
            scene_id: scene.scene_id.clone(),
            status: SceneStatus::Succeeded,
            prompt: scene.prompt.clone(),
            size: output.generation_params.size.as_str().to_string(),
            model: output.generation_params.model.clone(),
            image_key: Some(image_key),
            image_path: Some(output.image_path.clone()),
            image_url: output.image_url.clone(),
            thumbnail_key,
            thumbnail_path: output.thumbnail_path.clone(),
            thumbnail_url: output.thumbnail_url.clone(),
            width: Some(output.width),
            height: Some(output.height),
            bytes: Some(output.generation_params.bytes),
            cost: output.generation_params.cost,
            error_type: None,
            message: None,
            updated_at: String::new(),
        }
    }

    /// The entry of a scene that failed.
    pub fn failed(scene: &StoryScene, error_type: &str, message: &str) -> Self {
        ManifestEntry {
            scene_id: scene.scene_id.clone(),
            status: SceneStatus::Failed,
            prompt: scene.prompt.clone(),
            size: scene.size.clone(),
            model: scene.model.clone(),
            image_key: None,
            image_path: None,
            image_url: None,
            thumbnail_key: None,
            thumbnail_path: None,
            thumbnail_url: None,
            width: None,
            height: None,
            bytes: None,
            cost: None,
            error_type: Some(error_type.to_string()),
            message: Some(message.to_string()),
            updated_at: String::new(),
        }
    }

    /// What a fragment holds of this entry: no local paths and no URLs (the manifest is
    /// public, and links are rebuilt from keys), text cut to the bounds every reader
    /// checks, and a cost no reader would accept left out — so that the batch's own
    /// entries always pass [`check_entry`].
    pub(crate) fn to_scene_entry(&self) -> SceneEntry {
        SceneEntry {
            scene_id: self.scene_id.clone(),
            status: self.status,
            prompt: cut(&self.prompt, MAX_PROMPT_CHARS),
            size: self.size.clone(),
            model: cut(&self.model, MAX_MODEL_CHARS),
            image_key: self.image_key.clone(),
            image_url: None,
            thumbnail_key: self.thumbnail_key.clone(),
            thumbnail_url: None,
            width: self.width,
            height: self.height,
            bytes: self.bytes,
            cost: self.cost.filter(|cost| is_sane_cost(*cost)),
            error_type: self
                .error_type
                .as_deref()
                .map(|e| cut(e, MAX_ERROR_TYPE_CHARS)),
            message: self.message.as_deref().map(|m| cut(m, MAX_MESSAGE_CHARS)),
            updated_at: String::new(),
            fragment: String::new(),
        }
    }
}

/// `text`, or its first `max_chars` characters.
fn cut(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => text.get(..end).unwrap_or_default().to_string(),
        None => text.to_string(),
    }
}

/// The object key at the end of an `image_path`: the service's keys are flat
/// (`{scene_id}-{hash}.png`), so it is the last `/`-separated part of a filesystem path or
/// an `s3://bucket/prefix/key` location.
fn key_of_location(location: &str) -> String {
    let last = location.rsplit(['/', '\\']).next().unwrap_or(location);
    last.to_string()
}

/// One batch's contribution, as written: `stories/{story_id}/batches/{time}-{random}.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Fragment<'a> {
    pub format: u32,
    pub story_id: &'a str,
    /// When the batch published, by its own clock: informational only, never an order.
    pub written_at: &'a str,
    pub scenes: &'a [SceneEntry],
}

/// Whether `name` is a fragment's name as this service writes them:
/// `{13 digits}-{16 lowercase hex digits}.json`.
pub(crate) fn is_fragment_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    let Some((millis, random)) = stem.split_once('-') else {
        return false;
    };
    millis.len() == 13 && millis.bytes().all(|b| b.is_ascii_digit()) && is_lower_hex(random, 16)
}

fn is_lower_hex(text: &str, digits: usize) -> bool {
    text.len() == digits && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `key` is the image key this service gives a scene: `{scene_id}-{16 hex}.png`,
/// flat at the store's root — so nothing with `/`, `..`, `\` or a scheme.
pub(crate) fn is_image_key_of(scene_id: &str, key: &str) -> bool {
    key.strip_prefix(scene_id)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.strip_suffix(".png"))
        .is_some_and(|hash| is_lower_hex(hash, 16))
}

fn is_sane_cost(cost: f64) -> bool {
    cost.is_finite() && (0.0..=MAX_SCENE_COST_USD).contains(&cost)
}

// ---------------------------------------------------------------------------------------
// Times.

/// Milliseconds since the Unix epoch (0 before it): the precision manifests record, so a
/// time read back from one compares equal to the store's time it was made from.
pub(super) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// RFC 3339 UTC with milliseconds (`updated_at`).
pub(crate) fn format_millis(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub(crate) fn parse_millis(text: &str) -> Option<u64> {
    humantime::parse_rfc3339(text).ok().map(millis)
}

// ---------------------------------------------------------------------------------------
// Checking entries.

/// How an entry gets its time and origin.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stamp<'a> {
    /// From a fragment: the fragment's name and store time; what the entry says is ignored.
    Fragment { name: &'a str, at_ms: u64 },
    /// From a manifest used as a base: the entry must name its fragment and store time,
    /// and the time must not be after `not_after_ms`.
    Recorded { not_after_ms: u64 },
    /// From a manifest read for its page alone (`stage3 gallery`), which may predate
    /// recorded origins: a time and fragment are checked when present.
    Loose { not_after_ms: u64 },
}

/// An entry that passed [`check_entry`], with the store time it is ordered by.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Checked {
    pub entry: SceneEntry,
    pub at_ms: u64,
}

/// The fields an entry is read with; anything else it carries (local paths, URLs) is
/// ignored.
#[derive(Deserialize)]
struct RawEntry {
    scene_id: String,
    status: SceneStatus,
    prompt: String,
    size: String,
    model: String,
    #[serde(default)]
    image_key: Option<String>,
    #[serde(default)]
    thumbnail_key: Option<String>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    bytes: Option<u64>,
    #[serde(default)]
    cost: Option<f64>,
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    updated_at: Option<String>,
    #[serde(default)]
    fragment: Option<String>,
}

/// Checks one entry of a fragment or manifest, as read from the store; the reason when it
/// must be skipped.
pub(crate) fn check_entry(value: Value, stamp: Stamp<'_>) -> Result<Checked, String> {
    let raw: RawEntry = serde_json::from_value(value).map_err(|e| format!("not an entry: {e}"))?;
    validate_scene_id(&raw.scene_id).map_err(|e| e.to_string())?;
    let scene_id = raw.scene_id;
    let chars = |text: &str| text.chars().count();
    if chars(&raw.prompt) > MAX_PROMPT_CHARS {
        return Err(format!(
            "{scene_id}: a prompt over {MAX_PROMPT_CHARS} characters"
        ));
    }
    if !ImageSize::ALL.iter().any(|size| size.as_str() == raw.size) {
        return Err(format!("{scene_id}: an unknown size"));
    }
    if raw.model.is_empty()
        || chars(&raw.model) > MAX_MODEL_CHARS
        || raw.model.chars().any(char::is_control)
    {
        return Err(format!(
            "{scene_id}: a model name that is empty, too long or not text"
        ));
    }
    if let Some(key) = &raw.image_key {
        if !is_image_key_of(&scene_id, key) {
            return Err(format!("{scene_id}: an image key that is not this scene's"));
        }
    }
    if let Some(key) = &raw.thumbnail_key {
        let expected = raw
            .image_key
            .as_deref()
            .map(super::thumbnail::thumbnail_key);
        if expected.as_deref() != Some(key.as_str()) {
            return Err(format!(
                "{scene_id}: a thumbnail key that is not its image's"
            ));
        }
    }
    for side in [raw.width, raw.height].into_iter().flatten() {
        if side == 0 || side > MAX_IMAGE_SIDE {
            return Err(format!("{scene_id}: an image side of {side} pixels"));
        }
    }
    if let Some(cost) = raw.cost {
        if !is_sane_cost(cost) {
            return Err(format!(
                "{scene_id}: a cost that is not between 0 and {MAX_SCENE_COST_USD} USD"
            ));
        }
    }
    if let Some(error_type) = &raw.error_type {
        if error_type.is_empty()
            || error_type.len() > MAX_ERROR_TYPE_CHARS
            || !error_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(format!(
                "{scene_id}: an error_type that is not an identifier"
            ));
        }
    }
    if raw
        .message
        .as_deref()
        .is_some_and(|m| chars(m) > MAX_MESSAGE_CHARS)
    {
        return Err(format!(
            "{scene_id}: a message over {MAX_MESSAGE_CHARS} characters"
        ));
    }

    let recorded_time = |not_after_ms: u64, required: bool| -> Result<u64, String> {
        match raw.updated_at.as_deref().filter(|t| !t.is_empty()) {
            None if !required => Ok(0),
            None => Err(format!("{scene_id}: no updated_at")),
            Some(text) => match parse_millis(text) {
                Some(ms) if ms <= not_after_ms => Ok(ms),
                Some(_) => Err(format!("{scene_id}: an updated_at in the future")),
                None => Err(format!("{scene_id}: an updated_at that is not RFC 3339")),
            },
        }
    };
    let recorded_fragment = |required: bool| -> Result<String, String> {
        match raw.fragment.as_deref().filter(|f| !f.is_empty()) {
            None if !required => Ok(String::new()),
            Some(name) if is_fragment_name(name) => Ok(name.to_string()),
            _ => Err(format!("{scene_id}: no valid fragment name")),
        }
    };
    let (at_ms, fragment) = match stamp {
        Stamp::Fragment { name, at_ms } => (at_ms, name.to_string()),
        Stamp::Recorded { not_after_ms } => {
            (recorded_time(not_after_ms, true)?, recorded_fragment(true)?)
        }
        Stamp::Loose { not_after_ms } => (
            recorded_time(not_after_ms, false)?,
            recorded_fragment(false)?,
        ),
    };
    Ok(Checked {
        entry: SceneEntry {
            scene_id,
            status: raw.status,
            prompt: raw.prompt,
            size: raw.size,
            model: raw.model,
            image_key: raw.image_key,
            image_url: None,
            thumbnail_key: raw.thumbnail_key,
            thumbnail_url: None,
            width: raw.width,
            height: raw.height,
            bytes: raw.bytes,
            cost: raw.cost,
            error_type: raw.error_type,
            message: raw.message,
            updated_at: if at_ms > 0 {
                format_millis(at_ms)
            } else {
                String::new()
            },
            fragment,
        },
        at_ms,
    })
}

// ---------------------------------------------------------------------------------------
// Reading documents entry by entry.

/// What a fragment or manifest says besides its scenes.
#[derive(Debug, Default)]
pub(super) struct Header {
    pub format: Option<u64>,
    pub story_id: Option<String>,
    pub updated_at: Option<String>,
    pub batches: Option<u64>,
    /// Valid fragment names from a manifest's `fragments`.
    pub fragments: Vec<String>,
    /// Entries past the cap, not read.
    pub over_cap: usize,
}

/// Reads a fragment or manifest from `deserializer` without building it whole: each element
/// of `scenes` is handed to `on_entry` as it is parsed (up to `max_entries`; the rest are
/// skipped unparsed and counted), and every other field but the few in [`Header`] is
/// skipped. Fields may come in any order, so what the header says is checked afterwards.
pub(crate) fn read_document<'de, D: Deserializer<'de>>(
    deserializer: D,
    max_entries: usize,
    on_entry: &mut dyn FnMut(Value),
) -> Result<Header, D::Error> {
    let mut header = Header::default();
    deserializer.deserialize_map(Document {
        header: &mut header,
        max_entries,
        on_entry,
    })?;
    Ok(header)
}

struct Document<'a> {
    header: &'a mut Header,
    max_entries: usize,
    on_entry: &'a mut dyn FnMut(Value),
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a story manifest or fragment (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut read = 0usize;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "format" => self.header.format = map.next_value()?,
                "story_id" => self.header.story_id = map.next_value()?,
                "updated_at" => self.header.updated_at = map.next_value()?,
                "batches" => self.header.batches = map.next_value()?,
                "fragments" => map.next_value_seed(Names {
                    names: &mut self.header.fragments,
                })?,
                "scenes" => map.next_value_seed(Entries {
                    read: &mut read,
                    max: self.max_entries,
                    over_cap: &mut self.header.over_cap,
                    on_entry: &mut *self.on_entry,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The `scenes` array, one element at a time.
struct Entries<'a> {
    read: &'a mut usize,
    max: usize,
    over_cap: &'a mut usize,
    on_entry: &'a mut dyn FnMut(Value),
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of scene entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            if *self.read < self.max {
                // One entry at a time: a `Value` as large as one entry, never the document.
                let Some(value) = seq.next_element::<Value>()? else {
                    return Ok(());
                };
                *self.read += 1;
                (self.on_entry)(value);
            } else {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
                *self.over_cap += 1;
            }
        }
    }
}

/// A manifest's `fragments`: valid names are kept, up to a cap; anything else is skipped.
struct Names<'a> {
    names: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Names<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Names<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of fragment names")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(value) = seq.next_element::<Value>()? {
            if let Value::String(name) = value {
                if self.names.len() < MAX_FRAGMENT_NAMES && is_fragment_name(&name) {
                    self.names.push(name);
                }
            }
        }
        Ok(())
    }
}

/// What a document's header says about its use: whether it is of this story and of a
/// format this code reads.
pub(crate) fn header_problem(
    header: &Header,
    story_id: &str,
    accepted_formats: std::ops::RangeInclusive<u64>,
    default_format: u64,
) -> Option<String> {
    let format = header.format.unwrap_or(default_format);
    if !accepted_formats.contains(&format) {
        return Some(format!("format {format}"));
    }
    match header.story_id.as_deref() {
        Some(id) if id == story_id => None,
        Some(_) => Some("another story's".into()),
        None => Some("no story_id".into()),
    }
}

// ---------------------------------------------------------------------------------------
// Merging.

/// The story being rebuilt: checked entries offered one at a time, the one the store wrote
/// last kept for each scene, scenes in order of first appearance, within the story's caps.
#[derive(Debug, Default)]
pub(super) struct Merge {
    scenes: Vec<Slot>,
    index: HashMap<String, usize>,
    bytes: usize,
    /// Fragments merged, ever.
    pub batches: usize,
    updated_ms: u64,
}

#[derive(Debug)]
struct Slot {
    entry: SceneEntry,
    at_ms: u64,
    size: usize,
}

impl Merge {
    pub(super) fn new() -> Self {
        Merge::default()
    }

    /// Takes `checked` if it is newer than the scene's current entry — by store time, then
    /// fragment name (an entry of the same fragment replaces an earlier one of it). `false`
    /// when a cap refused it: a new scene past [`MAX_STORY_SCENES`], or an entry that would
    /// take the story past [`MAX_STORY_BYTES`].
    pub(crate) fn offer(&mut self, checked: Checked) -> bool {
        let Checked { entry, at_ms } = checked;
        self.saw(at_ms);
        let size = json_size(&entry);
        match self.index.get(&entry.scene_id).copied() {
            Some(at) => {
                let Some(slot) = self.scenes.get_mut(at) else {
                    return false;
                };
                if (at_ms, entry.fragment.as_str()) < (slot.at_ms, slot.entry.fragment.as_str()) {
                    return true;
                }
                let bytes = self.bytes - slot.size + size;
                if bytes > MAX_STORY_BYTES {
                    return false;
                }
                self.bytes = bytes;
                *slot = Slot { entry, at_ms, size };
                true
            }
            None => {
                if self.scenes.len() >= MAX_STORY_SCENES || self.bytes + size > MAX_STORY_BYTES {
                    return false;
                }
                self.bytes += size;
                self.index.insert(entry.scene_id.clone(), self.scenes.len());
                self.scenes.push(Slot { entry, at_ms, size });
                true
            }
        }
    }

    /// Notes a store time merged, for the manifest's `updated_at`.
    pub(super) fn saw(&mut self, at_ms: u64) {
        self.updated_ms = self.updated_ms.max(at_ms);
    }

    /// The manifest of everything offered. `fragments` names the merged fragments still
    /// stored.
    pub(super) fn finish(self, story_id: &str, fragments: Vec<String>) -> Manifest {
        let scenes: Vec<SceneEntry> = self.scenes.into_iter().map(|slot| slot.entry).collect();
        let succeeded = scenes
            .iter()
            .filter(|e| e.status == SceneStatus::Succeeded)
            .count();
        // Every cost is checked to be at most MAX_SCENE_COST_USD, so the sum is finite.
        let cost_usd = scenes.iter().filter_map(|e| e.cost).sum::<f64>();
        Manifest {
            format: MANIFEST_FORMAT,
            story_id: story_id.to_string(),
            updated_at: if self.updated_ms > 0 {
                format_millis(self.updated_ms)
            } else {
                String::new()
            },
            totals: StoryTotals {
                scenes: scenes.len(),
                succeeded,
                failed: scenes.len() - succeeded,
                // Sums of binary fractions drift (0.1 + 0.2); money reads better rounded.
                cost_usd: (cost_usd * 1e9).round() / 1e9,
            },
            batches: self.batches,
            fragments,
            cast: Vec::new(),
            scenes,
        }
    }
}

/// The length of `entry` as compact JSON.
pub(crate) fn json_size(entry: &SceneEntry) -> usize {
    crate::schema::json_len(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_790_000_000_000;

    fn scene(id: &str) -> StoryScene {
        StoryScene {
            scene_id: id.into(),
            prompt: format!("prompt of {id}"),
            size: "1024x1024".into(),
            model: "test/model".into(),
        }
    }

    fn ok(id: &str, cost: f64) -> Value {
        json!({
            "scene_id": id, "status": "succeeded", "prompt": format!("prompt of {id}"),
            "size": "1024x1024", "model": "test/model",
            "image_key": format!("{id}-0123456789abcdef.png"),
            "thumbnail_key": format!("thumbnails/{id}-0123456789abcdef.png"),
            "width": 1024, "height": 1024, "cost": cost
        })
    }

    fn from(name: &str, at_ms: u64, value: Value) -> Checked {
        check_entry(value, Stamp::Fragment { name, at_ms }).unwrap()
    }

    const F1: &str = "1790000000000-0000000000000001.json";
    const F2: &str = "1790000000000-0000000000000002.json";

    #[test]
    fn scenes_keep_their_first_place_and_the_store_s_latest_entry_wins() {
        let mut merge = Merge::new();
        for value in [
            ok("s1", 0.1),
            json!({"scene_id": "s2", "status": "failed", "prompt": "p", "size": "1024x1024",
                   "model": "m", "error_type": "timeout", "message": "slow"}),
            ok("s3", 0.2),
        ] {
            assert!(merge.offer(from(F2, NOW - 5_000, value)));
        }
        // Stored later, though its name sorts earlier: it wins.
        for value in [ok("s4", 0.3), ok("s2", 0.4)] {
            assert!(merge.offer(from(F1, NOW, value)));
        }
        // Stored earlier, though its name sorts later: it loses.
        assert!(merge.offer(from(
            "9999999999999-ffffffffffffffff.json",
            NOW - 9_000,
            ok("s4", 0.9)
        )));
        merge.batches = 3;
        let manifest = merge.finish("story", Vec::new());
        let ids: Vec<&str> = manifest
            .scenes
            .iter()
            .map(|e| e.scene_id.as_str())
            .collect();
        assert_eq!(ids, ["s1", "s2", "s3", "s4"]);
        assert_eq!(manifest.scenes[1].status, SceneStatus::Succeeded);
        assert_eq!(manifest.scenes[1].fragment, F1);
        assert_eq!(manifest.scenes[3].cost, Some(0.3));
        assert_eq!(
            manifest.totals,
            StoryTotals {
                scenes: 4,
                succeeded: 4,
                failed: 0,
                cost_usd: 1.0
            }
        );
        assert_eq!(manifest.updated_at, format_millis(NOW));
        assert_eq!(manifest.scenes[0].updated_at, format_millis(NOW - 5_000));
        assert_eq!(manifest.batches, 3);
    }

    #[test]
    fn equal_store_times_fall_back_to_the_fragment_name() {
        let mut merge = Merge::new();
        merge.offer(from(F2, NOW, ok("s", 0.2)));
        merge.offer(from(F1, NOW, ok("s", 0.1)));
        assert_eq!(merge.finish("x", vec![]).scenes[0].cost, Some(0.2));
    }

    #[test]
    fn hostile_entries_are_refused_one_by_one() {
        let stamp = Stamp::Fragment {
            name: F1,
            at_ms: NOW,
        };
        let refused = |change: Value| {
            let mut value = ok("s1", 0.1);
            for (k, v) in change.as_object().unwrap() {
                value[k] = v.clone();
            }
            check_entry(value, stamp).unwrap_err()
        };
        refused(json!({"scene_id": "../x"}));
        refused(json!({"image_key": "../../../../other-tenant/secret.png"}));
        refused(json!({"image_key": "s2-0123456789abcdef.png"}));
        refused(json!({"image_key": "s1-0123456789ABCDEF.png"}));
        refused(json!({"image_key": "https://attacker.example/s1-0123456789abcdef.png"}));
        refused(json!({"thumbnail_key": "thumbnails/../s1-0123456789abcdef.png"}));
        refused(json!({"cost": 1e308}));
        refused(json!({"cost": -0.5}));
        refused(json!({"size": "4096x4096"}));
        refused(json!({"prompt": "x".repeat(MAX_PROMPT_CHARS + 1)}));
        refused(json!({"model": "m".repeat(201)}));
        refused(json!({"width": 0}));
        refused(json!({"error_type": "<b>x</b>"}));
        refused(json!({"message": "m".repeat(MAX_MESSAGE_CHARS + 1)}));
        refused(json!({"cost": "free"}));

        // What is not read cannot do harm: URLs and paths are dropped, not refused.
        let mut value = ok("s1", 0.1);
        value["image_url"] = json!("https://attacker.example/x.png");
        value["image_path"] = json!("/home/someone/x.png");
        value["updated_at"] = json!("9999-12-31T00:00:00Z");
        value["cost"] = Value::Null;
        let checked = check_entry(value, stamp).unwrap();
        assert_eq!(checked.entry.image_url, None);
        assert_eq!(checked.entry.cost, None);
        assert_eq!(checked.at_ms, NOW, "the store's time, not the writer's");
    }

    #[test]
    fn a_recorded_entry_needs_its_origin_and_no_future() {
        let mut value = ok("s1", 0.1);
        let recorded = Stamp::Recorded { not_after_ms: NOW };
        assert!(check_entry(value.clone(), recorded).is_err(), "no origin");
        value["updated_at"] = json!(format_millis(NOW - 1));
        value["fragment"] = json!(F1);
        let checked = check_entry(value.clone(), recorded).unwrap();
        assert_eq!(
            (checked.at_ms, checked.entry.fragment.as_str()),
            (NOW - 1, F1)
        );
        value["updated_at"] = json!("9999-12-31T00:00:00Z");
        assert!(check_entry(value.clone(), recorded).is_err());
        assert!(check_entry(value, Stamp::Loose { not_after_ms: NOW }).is_err());
        assert_eq!(
            check_entry(ok("s1", 0.1), Stamp::Loose { not_after_ms: NOW })
                .unwrap()
                .at_ms,
            0
        );
    }

    #[test]
    fn documents_are_read_entry_by_entry_up_to_a_cap() {
        let entries: Vec<Value> = (0..5).map(|i| ok(&format!("s{i}"), 0.1)).collect();
        let document = json!({"scenes": entries, "extra": {"deep": [1, 2]},
                              "story_id": "fox", "format": 1, "totals": {"cost_usd": null}});
        let mut seen = Vec::new();
        let header = read_document(
            &mut serde_json::Deserializer::from_slice(document.to_string().as_bytes()),
            3,
            &mut |value| seen.push(value["scene_id"].as_str().unwrap().to_string()),
        )
        .unwrap();
        assert_eq!(seen, ["s0", "s1", "s2"]);
        assert_eq!(header.over_cap, 2);
        assert_eq!(header_problem(&header, "fox", 1..=1, 1), None);
        assert!(header_problem(&header, "owl", 1..=1, 1).is_some());
        assert!(header_problem(&header, "fox", 2..=2, 2).is_some());
        assert!(read_document(
            &mut serde_json::Deserializer::from_slice(b"[1]"),
            3,
            &mut |_| {}
        )
        .is_err());
    }

    #[test]
    fn caps_refuse_scenes_past_the_story_s_limit() {
        let mut merge = Merge::new();
        for i in 0..MAX_STORY_SCENES {
            assert!(merge.offer(from(F1, NOW, ok(&format!("s{i}"), 0.0))));
        }
        assert!(!merge.offer(from(F1, NOW, ok("one-more", 0.0))));
        assert!(
            merge.offer(from(F2, NOW, ok("s0", 0.5))),
            "replacing is fine"
        );
        assert_eq!(merge.finish("x", vec![]).totals.scenes, MAX_STORY_SCENES);
    }

    #[test]
    fn fragment_entries_drop_paths_and_urls_and_fit_the_bounds() {
        let mut entry = ManifestEntry::failed(&scene("s1"), "timeout", &"m".repeat(5000));
        entry.prompt = "p".repeat(10_000);
        entry.image_path = Some("/home/someone/out/s1-0123456789abcdef.png".into());
        entry.image_url = Some("https://img.example.com/s1.png?sign=1".into());
        entry.cost = Some(f64::NAN);
        let written = entry.to_scene_entry();
        let json = serde_json::to_value(&written).unwrap();
        assert!(json.get("image_path").is_none() && json.get("image_url").is_none());
        assert_eq!(written.prompt.chars().count(), MAX_PROMPT_CHARS);
        assert_eq!(written.cost, None);
        check_entry(
            json,
            Stamp::Fragment {
                name: F1,
                at_ms: NOW,
            },
        )
        .unwrap();
    }

    #[test]
    fn names_and_keys_follow_the_service_s_own_layout() {
        assert!(is_fragment_name("1790000000000-0123456789abcdef.json"));
        assert!(!is_fragment_name(
            "1790000000000-0123456789abcdef.json.part"
        ));
        assert!(!is_fragment_name("../1790000000000-0123456789abcdef.json"));
        assert!(!is_fragment_name("179000000000-0123456789abcdef.json"));
        assert!(is_image_key_of("s1", "s1-9c1e4f0a2b7d3e55.png"));
        assert!(!is_image_key_of("s1", "s1-9c1e4f0a2b7d3e5.png"));
        assert!(!is_image_key_of("s1", "s1/-9c1e4f0a2b7d3e55.png"));
        assert_eq!(cut("一二三", 2), "一二");
    }

    #[test]
    fn keys_come_from_the_end_of_a_location() {
        assert_eq!(
            key_of_location("./output/images/s1-abcd.png"),
            "s1-abcd.png"
        );
        assert_eq!(
            key_of_location("s3://bucket/prefix/s1-abcd.png"),
            "s1-abcd.png"
        );
    }
}
