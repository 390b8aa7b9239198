//! The JSON contracts: what upstream stages send us and what we hand downstream.
//!
//! Shapes follow the seed's pydantic models (snake_case, defaults for optional fields,
//! unknown fields ignored) plus the options docs/design.md §2 adds. Parsing never trusts its
//! input: [`parse_submission`] turns any accepted JSON shape into validated
//! [`GenerationRequest`]s or an `invalid_request` error that names the offending field.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ErrorType, Result, Stage3Error};

/// The longest `scene_id` we accept; it becomes part of a file name and an object key.
pub(crate) const MAX_SCENE_ID_CHARS: usize = 128;

/// One scene's prompt, as stage 2 emits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage2Output {
    pub scene_id: String,
    pub image_prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default)]
    pub style_tags: Vec<String>,
    #[serde(default)]
    pub characters_in_scene: Vec<String>,
}

/// The seed's image sizes. Current models take an aspect ratio, so each size maps to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ImageSize {
    #[default]
    #[serde(rename = "1024x1024")]
    Square,
    #[serde(rename = "1792x1024")]
    Landscape,
    #[serde(rename = "1024x1792")]
    Portrait,
}

impl ImageSize {
    pub(crate) const ALL: [ImageSize; 3] =
        [ImageSize::Square, ImageSize::Landscape, ImageSize::Portrait];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ImageSize::Square => "1024x1024",
            ImageSize::Landscape => "1792x1024",
            ImageSize::Portrait => "1024x1792",
        }
    }

    /// The aspect ratio OpenRouter's models take in place of a pixel size (docs/design.md §3).
    pub(crate) fn aspect_ratio(self) -> &'static str {
        match self {
            ImageSize::Square => "1:1",
            ImageSize::Landscape => "16:9",
            ImageSize::Portrait => "9:16",
        }
    }

    /// The nominal pixel size, used by the placeholder provider and aspect validation.
    pub(crate) fn dimensions(self) -> (u32, u32) {
        match self {
            ImageSize::Square => (1024, 1024),
            ImageSize::Landscape => (1792, 1024),
            ImageSize::Portrait => (1024, 1792),
        }
    }
}

impl fmt::Display for ImageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageSize {
    type Err = Stage3Error;

    fn from_str(s: &str) -> Result<Self> {
        ImageSize::ALL
            .into_iter()
            .find(|size| size.as_str() == s)
            .ok_or_else(|| {
                Stage3Error::invalid_request(format!(
                    "size: unknown size {s:?}; expected one of 1024x1024, 1792x1024, 1024x1792"
                ))
            })
    }
}

/// The seed's quality levels, mapped onto the output resolution of current models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageQuality {
    #[default]
    Standard,
    Hd,
}

impl ImageQuality {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ImageQuality::Standard => "standard",
            ImageQuality::Hd => "hd",
        }
    }

    /// OpenRouter's `resolution` / `image_size` value (docs/design.md §3).
    pub(crate) fn resolution(self) -> &'static str {
        match self {
            ImageQuality::Standard => "1K",
            ImageQuality::Hd => "2K",
        }
    }
}

impl fmt::Display for ImageQuality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageQuality {
    type Err = Stage3Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(ImageQuality::Standard),
            "hd" => Ok(ImageQuality::Hd),
            other => Err(Stage3Error::invalid_request(format!(
                "quality: unknown quality {other:?}; expected standard or hd"
            ))),
        }
    }
}

/// A request to illustrate one scene: a [`Stage2Output`] plus generation options.
/// Options left out fall back to the batch's, then to the service configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub scene_id: String,
    pub image_prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default)]
    pub style_tags: Vec<String>,
    #[serde(default)]
    pub characters_in_scene: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ImageSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<ImageQuality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Reference images for character and style consistency (`https://` or `data:image/…`
    /// URLs), sent to models that take image inputs. Characters with a registered reference
    /// (`STAGE3_CHARACTER_REFERENCES`) get theirs added automatically.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_images: Vec<String>,
}

impl From<Stage2Output> for GenerationRequest {
    fn from(scene: Stage2Output) -> Self {
        GenerationRequest {
            scene_id: scene.scene_id,
            image_prompt: scene.image_prompt,
            negative_prompt: scene.negative_prompt,
            style_tags: scene.style_tags,
            characters_in_scene: scene.characters_in_scene,
            size: None,
            quality: None,
            seed: None,
            model: None,
            reference_images: Vec::new(),
        }
    }
}

impl GenerationRequest {
    /// The request with every text it brings cleaned ([`clean_text`]): done once, before the
    /// request is validated, so nothing downstream sees a control or bidi override character.
    pub(crate) fn cleaned(mut self) -> Self {
        let clean = |text: &mut String| {
            if let std::borrow::Cow::Owned(cleaned) = clean_text(text) {
                *text = cleaned;
            }
        };
        clean(&mut self.image_prompt);
        clean(&mut self.negative_prompt);
        self.style_tags.iter_mut().for_each(clean);
        self.characters_in_scene.iter_mut().for_each(clean);
        self
    }

    /// Checks what can be checked without the configuration: a safe `scene_id`, a prompt
    /// with words in it, a sensible model override. The composed prompt's length is checked
    /// by the service, which knows the configured limit.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_scene_id(&self.scene_id)?;
        if self.image_prompt.trim().is_empty() {
            return Err(Stage3Error::invalid_request(
                "image_prompt: must not be empty or only whitespace",
            ));
        }
        if let Some(model) = &self.model {
            validate_model(model)
                .map_err(|e| Stage3Error::invalid_request(format!("model: {e}")))?;
        }
        if self.reference_images.len() > MAX_REFERENCE_IMAGES {
            return Err(Stage3Error::invalid_request(format!(
                "reference_images: at most {MAX_REFERENCE_IMAGES} images, got {}",
                self.reference_images.len()
            )));
        }
        for (index, url) in self.reference_images.iter().enumerate() {
            validate_reference_url(url).map_err(|e| {
                Stage3Error::invalid_request(format!("reference_images[{index}]: {e}"))
            })?;
        }
        Ok(())
    }
}

/// Models take a handful of reference images at most; more is a mistake upstream.
pub(crate) const MAX_REFERENCE_IMAGES: usize = 8;
/// A `data:` reference is sent inline with every request; keep it to a few megabytes.
const MAX_DATA_URL_BYTES: usize = 8 * 1024 * 1024;

/// A reference image must be fetchable by the provider without our credentials (`https://`)
/// or travel inline (`data:image/png|jpeg|webp;base64,…`); nothing else leaves this service.
pub(crate) fn validate_reference_url(url: &str) -> std::result::Result<(), String> {
    if let Some(rest) = url.strip_prefix("https://") {
        if rest.is_empty() || url.len() > 2048 || url.chars().any(char::is_whitespace) {
            return Err("not a usable https URL (at most 2048 characters, no spaces)".into());
        }
        return Ok(());
    }
    if url.starts_with("data:") {
        let is_image = [
            "data:image/png;base64,",
            "data:image/jpeg;base64,",
            "data:image/webp;base64,",
        ]
        .iter()
        .any(|prefix| url.starts_with(prefix));
        if !is_image {
            return Err("a data URL must be data:image/png|jpeg|webp;base64,…".into());
        }
        if url.len() > MAX_DATA_URL_BYTES {
            return Err(format!(
                "a data URL may be at most {MAX_DATA_URL_BYTES} bytes"
            ));
        }
        return Ok(());
    }
    Err(format!(
        "expected an https:// or data:image/… URL, got {:?}",
        truncate_for_message(url, 40)
    ))
}

/// `scene_id` becomes part of a file name and an S3 key, so only a conservative alphabet
/// passes: letters, digits, `-`, `_`, `.`, never a leading `.` (no `..`, no hidden files).
pub(crate) fn validate_scene_id(scene_id: &str) -> Result<()> {
    let fail = |why: &str| {
        Err(Stage3Error::invalid_request(format!(
            "scene_id: {why} (got {:?})",
            truncate_for_message(scene_id, 40)
        )))
    };
    if scene_id.is_empty() {
        return fail("must not be empty");
    }
    if scene_id.chars().count() > MAX_SCENE_ID_CHARS {
        return fail("must be at most 128 characters");
    }
    if scene_id.starts_with('.') {
        return fail("must not start with '.'");
    }
    if !scene_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return fail("may contain only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Model slugs look like `vendor/name:variant`; anything else is a typo or an injection.
pub(crate) fn validate_model(model: &str) -> std::result::Result<(), String> {
    if model.is_empty() || model.len() > 200 {
        return Err("must be 1 to 200 characters".into());
    }
    if !model
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '@'))
    {
        return Err(format!(
            "{:?} is not a model slug (letters, digits and -_./:@)",
            truncate_for_message(model, 60)
        ));
    }
    // A slug ends up in a catalogue URL's path: no empty, `.` or `..` segment may walk it.
    let walks = model
        .split(['/', ':'])
        .any(|segment| segment.is_empty() || segment.chars().all(|c| c == '.'));
    if walks {
        return Err(format!(
            "{:?} is not a model slug (an empty, `.` or `..` part)",
            truncate_for_message(model, 60)
        ));
    }
    Ok(())
}

/// Text a request brings, with what must never reach a provider, a page or a log line
/// removed: control characters other than newline and tab (NUL, ESC and the like), and the
/// bidirectional overrides, embeddings and isolates that make text display other than it
/// reads (U+202A–U+202E, U+2066–U+2069). Borrowed when there is nothing to remove, so the
/// prompts of existing requests — and their cache keys — are unchanged.
pub(crate) fn clean_text(text: &str) -> std::borrow::Cow<'_, str> {
    let unwanted = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    };
    if text.chars().any(unwanted) {
        std::borrow::Cow::Owned(text.chars().filter(|&c| !unwanted(c)).collect())
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

fn truncate_for_message(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let head: String = text.chars().take(max_chars).collect();
        format!("{head}…")
    }
}

/// The parameters that produced an image: enough to reproduce it and audit what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// The model that made the image (the seed's key), as `provider` names it: a
    /// fallback's when one served.
    pub model: String,
    /// The model the request asked for, present only when a fallback made the image
    /// (`STAGE3_MODEL_FALLBACKS`): `PROVIDER:MODEL` when it was another provider's. The
    /// cache key stays that of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    /// The requested size (the seed's key); the stored pixel size is `width`×`height`.
    pub size: ImageSize,
    /// The requested quality (the seed's key).
    pub quality: ImageQuality,
    /// Exactly the prompt text that was sent (the seed's key). Left out of a Lambda answer
    /// that had to be trimmed under the 6 MB limit (the record keeps it).
    #[serde(default)]
    pub prompt: String,
    /// The negative prompt, for a provider that was sent it apart (DashScope); the others
    /// get it folded into `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Who drew the image: `openrouter`, `ark`, `dashscope` or `placeholder`.
    pub provider: String,
    /// `images` or `chat` for OpenRouter; absent for the placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    pub aspect_ratio: String,
    pub resolution: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// The reference images sent, as URLs; a `data:` reference is recorded by its SHA-256
    /// (`data:image/png;sha256,…`) so records stay small.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_images: Vec<String>,
    /// With a character mode (`STAGE3_CHARACTER_MODE`): each character's reference this
    /// scene was sent, and where it came from (see [`ReferenceUsed`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<ReferenceUsed>,
    /// What the provider billed, in USD, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The SHA-256 of the generation request (model, prompt, options): the cache key.
    pub request_hash: String,
    /// The SHA-256 of the stored PNG bytes.
    pub content_sha256: String,
    /// The stored PNG's size in bytes.
    pub bytes: u64,
    /// The store's entity tag for the PNG (S3), which a cache hit checks with one HEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The GB 45438 labels the published PNG carries, and the hash of the unlabelled image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aigc_label: Option<AppliedLabels>,
    /// The format the provider actually sent (`png`, `jpeg`, `webp`), sniffed from its bytes.
    pub source_format: String,
    /// Provider calls made for this image (1 unless something was retried).
    pub attempts: u32,
    /// RFC 3339 UTC times of the first provider call and of the stored result.
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
}

/// A character's reference image as a scene was sent it (`generation_params.references`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceUsed {
    /// The character's id, as in `characters_in_scene`.
    pub character: String,
    /// The SHA-256 of the reference image: of the stored PNG for a generated one, of the
    /// decoded bytes for a registered `data:` URL; null for a registered `https://` URL,
    /// whose bytes this service never sees.
    pub sha256: Option<String>,
    /// `registered` (`STAGE3_CHARACTER_REFERENCES` or the envelope's `reference_images`),
    /// `sheet` (the character's sheet) or `scene:<scene_id>` (its first appearance).
    pub source: String,
}

/// How a batch keeps its characters the same from page to page (`STAGE3_CHARACTER_MODE`,
/// the envelope's `character_mode`, `--character-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CharacterMode {
    /// Only registered references are sent (the behaviour before character modes).
    #[default]
    Off,
    /// A character's first stored scene is the reference of its later scenes.
    FirstAppearance,
    /// A character sheet is drawn from the character's description first, and sent with
    /// every scene that shows the character.
    Sheet,
}

impl CharacterMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CharacterMode::Off => "off",
            CharacterMode::FirstAppearance => "first-appearance",
            CharacterMode::Sheet => "sheet",
        }
    }
}

impl fmt::Display for CharacterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CharacterMode {
    type Err = Stage3Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(CharacterMode::Off),
            "first-appearance" => Ok(CharacterMode::FirstAppearance),
            "sheet" => Ok(CharacterMode::Sheet),
            other => Err(Stage3Error::invalid_request(format!(
                "character_mode: expected off, first-appearance or sheet, got {:?}",
                truncate_for_message(other, 40)
            ))),
        }
    }
}

/// One character of a batch's cast (`"characters": {"char_001": {...}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Character {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the character looks like: the prompt of its sheet in `sheet` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The character's own reference images: they win over any generated one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_images: Vec<String>,
}

/// A batch's cast: the character mode it asks for and the characters it describes, by the
/// ids its scenes' `characters_in_scene` use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cast {
    /// The envelope's `character_mode` (or `--character-mode`); `None` leaves it to
    /// `STAGE3_CHARACTER_MODE`.
    pub mode: Option<CharacterMode>,
    pub characters: BTreeMap<String, Character>,
}

/// The longest character description accepted (it becomes a sheet's prompt).
pub(crate) const MAX_CHARACTER_DESCRIPTION_CHARS: usize = 2000;

impl Cast {
    /// Checks the characters: ids safe in object keys (the `scene_id` rules), a bounded
    /// description, usable reference images.
    fn validate(&self) -> Result<()> {
        for (id, character) in &self.characters {
            validate_scene_id(id).map_err(|e| match e {
                Stage3Error::InvalidRequest(message) => Stage3Error::InvalidRequest(format!(
                    "characters: {}",
                    message.replacen("scene_id:", "character id:", 1)
                )),
                other => other,
            })?;
            let at = |what: &str| format!("characters.{id}.{what}");
            if let Some(description) = &character.description {
                if description.trim().is_empty() {
                    return Err(Stage3Error::invalid_request(format!(
                        "{}: must not be empty",
                        at("description")
                    )));
                }
                if description.chars().count() > MAX_CHARACTER_DESCRIPTION_CHARS {
                    return Err(Stage3Error::invalid_request(format!(
                        "{}: at most {MAX_CHARACTER_DESCRIPTION_CHARS} characters",
                        at("description")
                    )));
                }
            }
            if character.reference_images.len() > MAX_REFERENCE_IMAGES {
                return Err(Stage3Error::invalid_request(format!(
                    "{}: at most {MAX_REFERENCE_IMAGES} images",
                    at("reference_images")
                )));
            }
            for (index, url) in character.reference_images.iter().enumerate() {
                validate_reference_url(url).map_err(|e| {
                    Stage3Error::invalid_request(format!(
                        "{}[{index}]: {e}",
                        at("reference_images")
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// The character's own reference images, if the cast gives it any.
    pub(crate) fn references_of(&self, character: &str) -> &[String] {
        self.characters
            .get(character)
            .map_or(&[], |c| c.reference_images.as_slice())
    }
}

/// One generated, stored image: the seed's `Stage3Output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage3Output {
    pub scene_id: String,
    /// A local path (filesystem backend) or `s3://bucket/key`.
    pub image_path: String,
    /// The public CDN URL, a presigned URL, or null when there is none.
    pub image_url: Option<String>,
    pub width: u32,
    pub height: u32,
    pub generation_params: GenerationParams,
    /// The small PNG stored for galleries (`thumbnails/{image key}`), as a path like
    /// `image_path` and a URL like `image_url`; absent when none was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
    /// True when this answer was served from a stored result: no provider call, no cost.
    /// Never stored in a record (a record describes the generation itself).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_cache: bool,
}

/// What was applied to a published image: `generation_params.aigc_label`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLabels {
    pub implicit: bool,
    /// The implicit label's form (`crate::labels::IMPLICIT_FORM`); absent for the earlier form, or when
    /// there is no implicit label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit_form: Option<String>,
    pub visible: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub producer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub propagator: String,
    /// SHA-256 of the unlabelled image: the `ProduceID` of the implicit label, and how a
    /// relabelling checks it starts from the right pixels.
    pub source_sha256: String,
}

/// A scene that could not be illustrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneFailure {
    pub scene_id: String,
    pub error_type: ErrorType,
    pub message: String,
}

/// The longest failure message kept. Provider text is shortened where it is read; this is
/// the last line of defence, so no answer can outgrow Lambda's 6 MB response limit because
/// of messages (500 scenes × 2 KB is 1 MB).
pub(crate) const MAX_FAILURE_MESSAGE_CHARS: usize = 2000;

impl SceneFailure {
    pub(crate) fn new(scene_id: impl Into<String>, error: &Stage3Error) -> Self {
        SceneFailure {
            scene_id: scene_id.into(),
            error_type: error.error_type(),
            message: truncate_for_message(&error.to_string(), MAX_FAILURE_MESSAGE_CHARS),
        }
    }
}

/// `story_id` becomes part of object keys: the same rules as `scene_id`.
pub(crate) fn validate_story_id(story_id: &str) -> Result<()> {
    validate_scene_id(story_id).map_err(|e| match e {
        Stage3Error::InvalidRequest(message) => {
            Stage3Error::InvalidRequest(message.replacen("scene_id:", "story_id:", 1))
        }
        other => other,
    })
}

/// What a batch answer says about its story (flattened into [`BatchAnswer`]): where the
/// manifest and the page are, or why they could not be published. Paths are filesystem
/// paths or `s3://` locations; URLs exist where the store has them (a CDN base, or a
/// presigned GET).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoryLinks {
    pub story_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_path: Option<String>,
    /// Set when publishing failed; the batch's scenes are stored all the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub story_error: Option<StoryError>,
}

/// Why a story's manifest or page could not be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoryError {
    pub error_type: ErrorType,
    pub message: String,
}

/// The answer to a batch: every scene is in exactly one of the two lists.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    pub results: Vec<Stage3Output>,
    pub failures: Vec<SceneFailure>,
    /// In `sheet` mode: the character sheets drawn (or served from the store) for this
    /// batch, the story's cast. A sheet that failed is in `failures`, under its
    /// `characters/...` id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub characters: Vec<Stage3Output>,
    /// Counts and money, derived from the two lists (see `BatchAnswer::summarize`).
    #[serde(default)]
    pub summary: BatchSummary,
    /// With a `story_id`: `story_id`, `manifest_url`/`manifest_path`,
    /// `gallery_url`/`gallery_path`, or `story_error` (see [`crate::story`]).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub story: Option<StoryLinks>,
}

/// What a batch did, in one object a script can read without walking the lists.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub scenes: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Results served from a stored result, at no cost.
    pub from_cache: usize,
    /// What the provider billed for this batch's calls, in USD (cache hits cost nothing).
    pub cost_usd: f64,
    /// The estimate made before the batch started, when prices were known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<f64>,
}

impl BatchAnswer {
    /// Every scene stored, and the story (if the batch names one) published.
    pub fn is_complete(&self) -> bool {
        self.failures.is_empty()
            && self
                .story
                .as_ref()
                .is_none_or(|story| story.story_error.is_none())
    }

    /// Recomputes [`BatchAnswer::summary`] from the lists, keeping the estimate.
    pub(crate) fn summarize(&mut self) {
        let from_cache = self.results.iter().filter(|r| r.from_cache).count();
        // A sheet's cost is the batch's too, though it is not a scene.
        let cost_usd = self
            .results
            .iter()
            .chain(&self.characters)
            .filter(|r| !r.from_cache)
            .filter_map(|r| r.generation_params.cost)
            // Not `sum()`: an empty float sum is -0.0, which prints as "-0.0".
            .fold(0.0, |total, cost| total + cost);
        self.summary = BatchSummary {
            scenes: self.results.len() + self.failures.len(),
            succeeded: self.results.len(),
            failed: self.failures.len(),
            from_cache,
            cost_usd,
            estimated_cost_usd: self.summary.estimated_cost_usd,
        };
    }
}

/// What a caller submitted: one request, or a batch of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submission {
    Single(GenerationRequest),
    /// A batch, with the cast its envelope describes (empty for a bare array).
    Batch(Vec<GenerationRequest>, Cast),
    /// A `{"scenes": [...], "story_id": ..}` batch: its store also gets the story's
    /// manifest and storyboard page (see [`crate::story`]).
    Story {
        story_id: String,
        requests: Vec<GenerationRequest>,
        cast: Cast,
    },
}

impl Submission {
    /// Sets `overrides` on every request, over their own fields (the CLI's `--size`,
    /// `--quality`, `--model`).
    pub fn override_with(&mut self, overrides: &RequestOptions) {
        let requests = match self {
            Submission::Single(request) => std::slice::from_mut(request),
            Submission::Batch(requests, _) | Submission::Story { requests, .. } => requests,
        };
        for request in requests {
            overrides.impose(request);
        }
    }

    /// Sets the character mode over the envelope's (`--character-mode`); `None` changes
    /// nothing. A single request has no cast, and keeps none.
    pub fn override_character_mode(&mut self, mode: Option<CharacterMode>) {
        if let (Some(mode), Some(cast)) = (mode, self.cast_mut()) {
            cast.mode = Some(mode);
        }
    }

    /// The batch's cast; a single request has none.
    pub(crate) fn cast(&self) -> Option<&Cast> {
        match self {
            Submission::Single(_) => None,
            Submission::Batch(_, cast) | Submission::Story { cast, .. } => Some(cast),
        }
    }

    fn cast_mut(&mut self) -> Option<&mut Cast> {
        match self {
            Submission::Single(_) => None,
            Submission::Batch(_, cast) | Submission::Story { cast, .. } => Some(cast),
        }
    }

    pub(crate) fn into_requests(self) -> Vec<GenerationRequest> {
        match self {
            Submission::Single(request) => vec![request],
            Submission::Batch(requests, _) | Submission::Story { requests, .. } => requests,
        }
    }

    /// The `story_id` of a story batch.
    pub(crate) fn story_id(&self) -> Option<&str> {
        match self {
            Submission::Story { story_id, .. } => Some(story_id),
            _ => None,
        }
    }
}

/// Options given once for a whole batch (`{"scenes": [...], "size": ..}`) or on the command
/// line; a scene's own option wins over the batch's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct BatchEnvelope {
    scenes: Value,
    #[serde(default)]
    size: Option<ImageSize>,
    #[serde(default)]
    quality: Option<ImageQuality>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    story_id: Option<String>,
    #[serde(default)]
    character_mode: Option<CharacterMode>,
    #[serde(default)]
    characters: BTreeMap<String, Character>,
}

/// Parses any accepted input shape — one request, an array of requests, or
/// `{"scenes": [...], "size"?, "quality"?, "model"?, "story_id"?}` — and checks the batch
/// as a whole (its size, conflicting duplicates, the `story_id` by the `scene_id` rules).
/// Each request's own fields are validated once, when it is prepared
/// (`image_spec::ImageSpec::new`), after any command-line override.
///
/// `max_batch` caps the number of scenes. Duplicate `scene_id`s are accepted only when the
/// requests are identical (they are then generated once); two different requests for the
/// same scene would race for the same file, so they are rejected.
pub fn parse_submission(value: Value, max_batch: usize) -> Result<Submission> {
    let submission = match value {
        Value::Array(items) => Submission::Batch(
            parse_items(items, &RequestOptions::default())?,
            Cast::default(),
        ),
        Value::Object(ref map) if map.contains_key("scenes") => {
            let envelope: BatchEnvelope = deserialize_named(value, "batch")?;
            let Value::Array(items) = envelope.scenes else {
                return Err(Stage3Error::invalid_request("scenes: must be an array"));
            };
            let defaults = RequestOptions {
                size: envelope.size,
                quality: envelope.quality,
                model: envelope.model,
            };
            let mut requests = parse_items(items, &defaults)?;
            let cast = Cast {
                mode: envelope.character_mode,
                characters: envelope.characters,
            };
            cast.validate()?;
            // A character's own images are the scene's references, whatever the mode: like
            // `STAGE3_CHARACTER_REFERENCES`, they win over anything generated.
            for request in &mut requests {
                for character in &request.characters_in_scene {
                    for url in cast.references_of(character) {
                        if !request.reference_images.contains(url) {
                            request.reference_images.push(url.clone());
                        }
                    }
                }
            }
            match envelope.story_id {
                Some(story_id) => {
                    validate_story_id(&story_id)?;
                    Submission::Story {
                        story_id,
                        requests,
                        cast,
                    }
                }
                None => Submission::Batch(requests, cast),
            }
        }
        Value::Object(_) => {
            let request: GenerationRequest = deserialize_named(value, "request")?;
            Submission::Single(request)
        }
        other => {
            return Err(Stage3Error::invalid_request(format!(
                "expected a request object, an array of requests or {{\"scenes\": [...]}}, got {}",
                json_kind(&other)
            )))
        }
    };
    if let Submission::Batch(requests, _) | Submission::Story { requests, .. } = &submission {
        if requests.is_empty() {
            return Err(Stage3Error::invalid_request("the batch has no scenes"));
        }
        if requests.len() > max_batch {
            return Err(Stage3Error::invalid_request(format!(
                "the batch has {} scenes; the limit is {max_batch} (STAGE3_MAX_BATCH)",
                requests.len()
            )));
        }
        reject_conflicting_duplicates(requests)?;
    }
    Ok(submission)
}

/// The length of `value` as compact JSON, counted without building the text.
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Our contracts are plain fields with string keys: writing them to a counter cannot
    // fail, and if it did the count would stay a lower bound.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Reads a submission from a file, or from standard input when `path` is `-`.
pub fn read_submission(path: &std::path::Path, max_batch: usize) -> Result<Submission> {
    let bytes = if path.as_os_str() == "-" {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buffer)
            .map_err(|e| Stage3Error::invalid_request(format!("cannot read stdin: {e}")))?;
        buffer
    } else {
        std::fs::read(path).map_err(|e| {
            Stage3Error::invalid_request(format!("cannot read {}: {e}", path.display()))
        })?
    };
    parse_submission_bytes(&bytes, max_batch)
}

/// Parses bytes (a file, stdin, a queue message body) as a submission.
pub(crate) fn parse_submission_bytes(bytes: &[u8], max_batch: usize) -> Result<Submission> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Stage3Error::invalid_request(format!("malformed JSON: {e}")))?;
    parse_submission(value, max_batch)
}

/// Image options set for many requests at once: a batch envelope's defaults (which a
/// request's own fields beat) or the command line's overrides (which beat them). The
/// settings' defaults come last, when the request is prepared (`image_spec::ImageSpec`).
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    pub size: Option<ImageSize>,
    pub quality: Option<ImageQuality>,
    pub model: Option<String>,
}

impl RequestOptions {
    /// Fills what `request` leaves unset.
    fn fill(&self, request: &mut GenerationRequest) {
        request.size = request.size.or(self.size);
        request.quality = request.quality.or(self.quality);
        if request.model.is_none() {
            request.model.clone_from(&self.model);
        }
    }

    /// Replaces what these options set.
    fn impose(&self, request: &mut GenerationRequest) {
        request.size = self.size.or(request.size);
        request.quality = self.quality.or(request.quality);
        if self.model.is_some() {
            request.model.clone_from(&self.model);
        }
    }
}

fn parse_items(items: Vec<Value>, defaults: &RequestOptions) -> Result<Vec<GenerationRequest>> {
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let scene_id = item
                .get("scene_id")
                .and_then(Value::as_str)
                .map(str::to_string);
            let located = |e: Stage3Error| locate_in_batch(e, index, scene_id.as_deref());
            if !item.is_object() {
                return Err(located(Stage3Error::invalid_request(format!(
                    "expected a request object, got {}",
                    json_kind(&item)
                ))));
            }
            let mut request: GenerationRequest =
                deserialize_named(item, "request").map_err(located)?;
            defaults.fill(&mut request);
            Ok(request)
        })
        .collect()
}

/// Says where an invalid request sits in its batch: `scenes[2] (scene_id "x"): …`. Other
/// errors pass through unchanged.
pub(crate) fn locate_in_batch(
    error: Stage3Error,
    index: usize,
    scene_id: Option<&str>,
) -> Stage3Error {
    match error {
        Stage3Error::InvalidRequest(message) => {
            let hint = scene_id
                .map(|id| format!(" (scene_id {:?})", truncate_for_message(id, 40)))
                .unwrap_or_default();
            Stage3Error::InvalidRequest(format!("scenes[{index}]{hint}: {message}"))
        }
        other => other,
    }
}

fn reject_conflicting_duplicates(requests: &[GenerationRequest]) -> Result<()> {
    let mut seen: HashMap<&str, &GenerationRequest> = HashMap::with_capacity(requests.len());
    for request in requests {
        if let Some(previous) = seen.insert(&request.scene_id, request) {
            if previous != request {
                return Err(Stage3Error::invalid_request(format!(
                    "scene_id: {:?} appears twice with different requests",
                    request.scene_id
                )));
            }
        }
    }
    Ok(())
}

/// Deserializes with the path of the offending field in the message ("size: unknown
/// variant ..."), which serde alone does not give.
fn deserialize_named<T: serde::de::DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Stage3Error::invalid_request(format!("{what}: {inner}"))
        } else {
            Stage3Error::invalid_request(format!("{path}: {inner}"))
        }
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_override_characters_are_removed_and_clean_text_borrowed() {
        assert_eq!(
            clean_text("a\u{0}b\u{1b}[31mc\u{202e}d\u{2066}e\nf\tg\u{85}"),
            "ab[31mcde\nf\tg"
        );
        assert!(matches!(
            clean_text("雪中的狐狸\nA fox."),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn model_slugs_cannot_walk_a_path() {
        for bad in ["../../etc", "a/./b", "a//b", "/a", "a/", "..", "a:"] {
            assert!(validate_model(bad).is_err(), "{bad}");
        }
        for good in [
            "google/gemini-3.1-flash-image",
            "acme/img:free",
            "qwen-image",
            "ark:ep-2024",
        ] {
            validate_model(good).unwrap();
        }
    }
    use serde_json::json;

    fn scene(id: &str) -> Value {
        json!({"scene_id": id, "image_prompt": "a lighthouse at dawn"})
    }

    /// Why `value` is refused: by its shape, or by a request's own validation, located in
    /// the batch as `service::prepare_all` locates it.
    fn rejection(value: Value) -> String {
        let outcome = parse_submission(value, 100).and_then(|submission| {
            let single = matches!(submission, Submission::Single(_));
            for (index, request) in submission.into_requests().iter().enumerate() {
                request.validate().map_err(|e| match single {
                    true => e,
                    false => locate_in_batch(e, index, Some(&request.scene_id)),
                })?;
            }
            Ok(())
        });
        match outcome {
            Err(Stage3Error::InvalidRequest(message)) => message,
            other => panic!("expected invalid_request, got {other:?}"),
        }
    }

    #[test]
    fn stage2_output_defaults_match_the_seed() {
        let parsed: Stage2Output =
            serde_json::from_value(json!({"scene_id": "s1", "image_prompt": "p", "extra": 1}))
                .unwrap();
        assert_eq!(parsed.negative_prompt, "");
        assert!(parsed.style_tags.is_empty());
        assert!(parsed.characters_in_scene.is_empty());
    }

    #[test]
    fn a_single_object_is_a_single_request() {
        let submission = parse_submission(scene("scene_001"), 100).unwrap();
        assert!(matches!(submission, Submission::Single(r) if r.scene_id == "scene_001"));
    }

    #[test]
    fn an_array_and_a_scenes_envelope_are_batches() {
        let array = parse_submission(json!([scene("a"), scene("b")]), 100).unwrap();
        assert!(matches!(array, Submission::Batch(ref r, _) if r.len() == 2));

        let mut portrait = scene("b");
        portrait["size"] = json!("1024x1792");
        let envelope = parse_submission(
            json!({"scenes": [scene("a"), portrait], "size": "1792x1024", "quality": "hd"}),
            100,
        )
        .unwrap()
        .into_requests();
        assert_eq!(envelope[0].size, Some(ImageSize::Landscape));
        assert_eq!(envelope[0].quality, Some(ImageQuality::Hd));
        assert_eq!(
            envelope[1].size,
            Some(ImageSize::Portrait),
            "the scene's own size wins"
        );
    }

    #[test]
    fn overrides_beat_the_request_and_the_envelope() {
        let mut own = scene("a");
        own["size"] = json!("1024x1792");
        let mut submission = parse_submission(
            json!({"scenes": [own, scene("b")], "model": "acme/envelope"}),
            100,
        )
        .unwrap();
        submission.override_with(&RequestOptions {
            size: Some(ImageSize::Landscape),
            quality: None,
            model: None,
        });
        let requests = submission.into_requests();
        assert!(requests
            .iter()
            .all(|r| r.size == Some(ImageSize::Landscape)));
        assert!(requests.iter().all(|r| r.quality.is_none()));
        assert!(requests
            .iter()
            .all(|r| r.model.as_deref() == Some("acme/envelope")));
    }

    #[test]
    fn unsafe_scene_ids_are_rejected() {
        for bad in [
            "",
            "../etc",
            "a/b",
            ".hidden",
            "a\0b",
            "a b",
            "ü",
            &"x".repeat(129),
        ] {
            let message = rejection(scene(bad));
            assert!(message.starts_with("scene_id:"), "{bad:?}: {message}");
        }
        for good in ["scene_001", "Scene-1.v2", "a", &"x".repeat(128)] {
            parse_submission(scene(good), 100).unwrap();
        }
    }

    #[test]
    fn a_story_id_makes_a_story_batch_under_the_scene_id_rules() {
        let submission = parse_submission(
            json!({"story_id": "fox-1", "scenes": [scene("a"), scene("b")]}),
            100,
        )
        .unwrap();
        assert_eq!(submission.story_id(), Some("fox-1"));
        assert_eq!(submission.into_requests().len(), 2);
        for bad in ["", "../x", "a/b", ".hidden", "ü", &"x".repeat(129)] {
            let message = rejection(json!({"story_id": bad, "scenes": [scene("a")]}));
            assert!(message.starts_with("story_id:"), "{bad:?}: {message}");
        }
        assert!(rejection(json!({"story_id": 7, "scenes": [scene("a")]})).starts_with("story_id:"));
        assert!(rejection(json!({"story_id": "s", "scenes": []})).contains("no scenes"));
        let plain = parse_submission(json!({"scenes": [scene("a")]}), 100).unwrap();
        assert_eq!(plain.story_id(), None);
    }

    #[test]
    fn blank_prompts_are_rejected() {
        let message = rejection(json!({"scene_id": "s", "image_prompt": " \n\t"}));
        assert!(message.starts_with("image_prompt:"), "{message}");
    }

    #[test]
    fn unknown_size_and_quality_name_the_field() {
        let mut bad_size = scene("s");
        bad_size["size"] = json!("512x512");
        assert!(rejection(bad_size).starts_with("size:"));

        let mut bad_quality = scene("s");
        bad_quality["quality"] = json!("ultra");
        assert!(rejection(bad_quality).starts_with("quality:"));
    }

    #[test]
    fn missing_fields_and_wrong_types_name_the_field() {
        assert!(rejection(json!({"scene_id": "s"})).contains("image_prompt"));
        let message = rejection(json!([scene("a"), {"scene_id": "b", "image_prompt": 3}]));
        assert!(
            message.starts_with("scenes[1] (scene_id \"b\"): image_prompt"),
            "{message}"
        );
        assert!(rejection(json!("text")).contains("a string"));
        assert!(rejection(json!([1])).contains("scenes[0]"));
    }

    #[test]
    fn batch_limits_are_enforced() {
        assert!(rejection(json!([])).contains("no scenes"));
        let many: Vec<Value> = (0..101).map(|i| scene(&format!("s{i}"))).collect();
        assert!(rejection(Value::Array(many)).contains("limit is 100"));
    }

    #[test]
    fn duplicate_scene_ids_must_be_identical() {
        parse_submission(json!([scene("a"), scene("a")]), 100).unwrap();
        let mut other = scene("a");
        other["image_prompt"] = json!("something else");
        assert!(rejection(json!([scene("a"), other])).contains("appears twice"));
    }

    #[test]
    fn reference_images_must_be_https_or_inline_images() {
        let mut ok = scene("s");
        ok["reference_images"] = json!([
            "https://cdn.example.com/fox.png",
            "data:image/png;base64,iVBORw0KGgo="
        ]);
        parse_submission(ok, 100).unwrap();
        for bad in [
            "http://cdn.example.com/fox.png",
            "file:///etc/passwd",
            "data:text/html;base64,PGI+",
            "https://",
        ] {
            let mut request = scene("s");
            request["reference_images"] = json!([bad]);
            assert!(
                rejection(request).starts_with("reference_images[0]:"),
                "{bad}"
            );
        }
        let mut many = scene("s");
        many["reference_images"] = json!(vec!["https://a.example/x.png"; 9]);
        assert!(rejection(many).contains("at most 8"));
    }

    #[test]
    fn failure_messages_are_bounded() {
        let huge = Stage3Error::invalid_request("x".repeat(8 * 1024 * 1024));
        let failure = SceneFailure::new("s", &huge);
        assert!(failure.message.chars().count() <= MAX_FAILURE_MESSAGE_CHARS + 1);
    }

    #[test]
    fn malformed_json_is_an_invalid_request() {
        let err = parse_submission_bytes(b"{\"scene_id\": ", 10).unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
        assert!(err.to_string().contains("malformed JSON"));
    }

    #[test]
    fn sizes_map_to_aspect_ratios_and_qualities_to_resolutions() {
        assert_eq!(ImageSize::Square.aspect_ratio(), "1:1");
        assert_eq!(ImageSize::Landscape.aspect_ratio(), "16:9");
        assert_eq!(ImageSize::Portrait.aspect_ratio(), "9:16");
        assert_eq!(ImageQuality::Standard.resolution(), "1K");
        assert_eq!(ImageQuality::Hd.resolution(), "2K");
        assert_eq!(
            "1792x1024".parse::<ImageSize>().unwrap(),
            ImageSize::Landscape
        );
        assert!("2048x2048".parse::<ImageSize>().is_err());
    }
}
