//! What one image is: the one validated value a scene's request becomes.
//!
//! A request arrives with optional fields, character names and a prompt in parts; the
//! settings add a default model, a prompt limit and the characters' reference images. They
//! are resolved here once, into an [`ImageSpec`] that every later step borrows: planning
//! and pricing it (`provider::ImageProvider::plan`), calling the provider
//! (`provider::ImageRequest`), hashing it for the cache key (`cache::request_hash`) and
//! recording it in the output (`schema::GenerationParams`). Nothing downstream re-reads the
//! request's options or re-applies a default, so they cannot disagree.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{Result, Stage3Error};
use crate::prompt::compose;
use crate::schema::{GenerationRequest, ImageQuality, ImageSize, MAX_REFERENCE_IMAGES};

/// Who draws: an image provider (`STAGE3_PROVIDER`, or the `PROVIDER:` of a model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProviderKind {
    OpenRouter,
    /// Volcengine Ark (Doubao Seedream), reachable from mainland China.
    Ark,
    /// Alibaba Model Studio (Qwen-Image), reachable from mainland China.
    DashScope,
    /// Offline, free, deterministic images for development and downstream testing.
    Placeholder,
}

impl ProviderKind {
    pub(crate) const ALL: [ProviderKind; 4] = [
        ProviderKind::OpenRouter,
        ProviderKind::Ark,
        ProviderKind::DashScope,
        ProviderKind::Placeholder,
    ];

    /// The name used in `STAGE3_PROVIDER`, in `PROVIDER:MODEL` and in
    /// `generation_params.provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenRouter => "openrouter",
            ProviderKind::Ark => "ark",
            ProviderKind::DashScope => "dashscope",
            ProviderKind::Placeholder => "placeholder",
        }
    }

    /// Whether the provider takes the negative prompt in a field of its own; the others
    /// get it folded into the text (see [`crate::prompt`]).
    pub(crate) fn takes_negative_prompt(self) -> bool {
        self == ProviderKind::DashScope
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ProviderKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown provider {s:?}; expected openrouter, ark, dashscope or placeholder"
                )
            })
    }
}

/// A model of a provider: what `PROVIDER:MODEL` (or a bare `MODEL`, of the default
/// provider) names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub provider: ProviderKind,
    /// The model as the provider names it (`google/gemini-3.1-flash-image`,
    /// `doubao-seedream-4-5-251128`, `qwen-image-plus`).
    pub model: String,
}

impl ModelRef {
    /// Reads `PROVIDER:MODEL` or `MODEL`; a bare model belongs to `default`. Only a known
    /// provider name before the first colon qualifies, so OpenRouter slugs keep their own
    /// colons (`vendor/model:free`). Never fails: the model's spelling is checked where it
    /// is used ([`crate::schema::validate_model`], and the provider's own check).
    pub(crate) fn resolve(text: &str, default: ProviderKind) -> ModelRef {
        let qualified = text
            .split_once(':')
            .and_then(|(prefix, model)| Some((prefix.parse().ok()?, model)));
        match qualified {
            Some((provider, model)) => ModelRef {
                provider,
                model: model.to_string(),
            },
            None => ModelRef {
                provider: default,
                model: text.to_string(),
            },
        }
    }

    /// The model as written for someone whose default provider is `default`: bare when it
    /// is that provider's, `PROVIDER:MODEL` otherwise.
    pub(crate) fn written_for(&self, default: ProviderKind) -> String {
        if self.provider == default {
            self.model.clone()
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.provider, self.model)
    }
}

/// One image to make, fully resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The model asked for (the request's, else `STAGE3_MODEL`), with its provider; a
    /// fallback may serve it.
    pub model: ModelRef,
    /// The whole prompt in one text: the scene's text, its style tags and what to avoid.
    pub prompt: String,
    /// The scene's text and style tags without what to avoid, for a provider that takes
    /// the negative prompt apart (`ImageSpec::prompt_for`).
    pub positive_prompt: String,
    /// What to avoid, as written (trimmed); empty when nothing.
    pub negative_prompt: String,
    pub size: ImageSize,
    pub quality: ImageQuality,
    /// Asks the model for the same image again; models that take no seed refuse it.
    pub seed: Option<i64>,
    /// The request's reference images, then those of its characters, without repeats.
    pub references: Vec<String>,
}

/// What a provider is sent as the prompt: see [`ImageSpec::prompt_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SentPrompt<'a> {
    pub prompt: &'a str,
    /// Present only for a provider with a negative-prompt field, and only when there is
    /// something to avoid.
    pub negative_prompt: Option<&'a str>,
}

/// The settings a request is resolved against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpecSettings<'a> {
    /// `STAGE3_PROVIDER`: the provider of a model written without one.
    pub default_provider: ProviderKind,
    /// `STAGE3_MODEL`: the model of a request that names none.
    pub default_model: &'a str,
    /// `STAGE3_MAX_PROMPT_CHARS`: the longest composed prompt accepted.
    pub max_prompt_chars: usize,
    /// `STAGE3_CHARACTER_REFERENCES`: a character's reference image, by character id.
    pub character_references: &'a HashMap<String, String>,
}

impl ImageSpec {
    /// Validates `request` and resolves it against `settings`. The only place a request is
    /// validated: an `invalid_request` from here has cost nothing.
    pub(crate) fn new(
        request: &GenerationRequest,
        settings: &SpecSettings<'_>,
    ) -> Result<ImageSpec> {
        request.validate()?;
        let composed = compose(request, settings.max_prompt_chars)?;
        let mut references = request.reference_images.clone();
        for character in &request.characters_in_scene {
            if let Some(url) = settings.character_references.get(character) {
                if !references.contains(url) {
                    references.push(url.clone());
                }
            }
        }
        if references.len() > MAX_REFERENCE_IMAGES {
            return Err(Stage3Error::invalid_request(format!(
                "reference_images: {} with the characters' references; at most {MAX_REFERENCE_IMAGES}",
                references.len()
            )));
        }
        let model = request.model.as_deref().unwrap_or(settings.default_model);
        Ok(ImageSpec {
            model: ModelRef::resolve(model, settings.default_provider),
            prompt: composed.folded,
            positive_prompt: composed.positive,
            negative_prompt: composed.negative,
            size: request.size.unwrap_or_default(),
            quality: request.quality.unwrap_or_default(),
            seed: request.seed,
            references,
        })
    }

    /// A spec of a fixed prompt for `model` at `size` and `quality`: no seed, nothing to
    /// avoid, no references. What a price list or a probe asks for.
    pub(crate) fn plain(model: ModelRef, size: ImageSize, quality: ImageQuality) -> ImageSpec {
        let prompt = "A fox.".to_string();
        ImageSpec {
            model,
            positive_prompt: prompt.clone(),
            prompt,
            negative_prompt: String::new(),
            size,
            quality,
            seed: None,
            references: Vec::new(),
        }
    }

    /// The prompt `provider` is sent: the folded text, or for a provider with a
    /// negative-prompt field the text without negatives and the negatives apart. What is
    /// sent is what the request hash and `generation_params.prompt` say.
    pub(crate) fn prompt_for(&self, provider: ProviderKind) -> SentPrompt<'_> {
        if provider.takes_negative_prompt() {
            SentPrompt {
                prompt: &self.positive_prompt,
                negative_prompt: Some(self.negative_prompt.as_str()).filter(|n| !n.is_empty()),
            }
        } else {
            SentPrompt {
                prompt: &self.prompt,
                negative_prompt: None,
            }
        }
    }

    /// The references as recorded in an output: an https URL as is, an inline image by its
    /// hash, so a record never carries megabytes of base64.
    pub(crate) fn recorded_references(&self) -> Vec<String> {
        self.references
            .iter()
            .map(|url| match url.split_once(";base64,") {
                Some((media, payload)) if url.starts_with("data:") => format!(
                    "{media};sha256,{}",
                    hex::encode(Sha256::digest(payload.as_bytes()))
                ),
                _ => url.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> GenerationRequest {
        serde_json::from_value(json).unwrap()
    }

    fn settings(references: &HashMap<String, String>) -> SpecSettings<'_> {
        SpecSettings {
            default_provider: ProviderKind::OpenRouter,
            default_model: "acme/default",
            max_prompt_chars: 4000,
            character_references: references,
        }
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let none = HashMap::new();
        let spec = ImageSpec::new(
            &request(serde_json::json!({"scene_id": "s1", "image_prompt": "a fox"})),
            &settings(&none),
        )
        .unwrap();
        assert_eq!(
            spec.model,
            ModelRef::resolve("acme/default", ProviderKind::OpenRouter)
        );
        assert_eq!(spec.size, ImageSize::Square);
        assert_eq!(spec.quality, ImageQuality::Standard);
        assert_eq!(spec.seed, None);
        assert!(spec.prompt.starts_with("A fox") || spec.prompt.starts_with("a fox"));
    }

    #[test]
    fn characters_add_their_references_once_and_within_the_limit() {
        let mut known = HashMap::new();
        known.insert(
            "fox".to_string(),
            "https://cdn.example.com/fox.png".to_string(),
        );
        let spec = ImageSpec::new(
            &request(
                serde_json::json!({"scene_id": "s1", "image_prompt": "a fox",
                "characters_in_scene": ["fox", "owl"],
                "reference_images": ["https://cdn.example.com/fox.png"]}),
            ),
            &settings(&known),
        )
        .unwrap();
        assert_eq!(spec.references, ["https://cdn.example.com/fox.png"]);

        let many: Vec<String> = (0..MAX_REFERENCE_IMAGES)
            .map(|i| format!("https://cdn.example.com/{i}.png"))
            .collect();
        let err = ImageSpec::new(
            &request(
                serde_json::json!({"scene_id": "s1", "image_prompt": "a fox",
                "characters_in_scene": ["fox"], "reference_images": many}),
            ),
            &settings(&known),
        )
        .unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn an_invalid_request_is_refused() {
        let none = HashMap::new();
        let err = ImageSpec::new(
            &request(serde_json::json!({"scene_id": "../etc", "image_prompt": "a fox"})),
            &settings(&none),
        )
        .unwrap_err();
        assert_eq!(err.error_type(), crate::error::ErrorType::InvalidRequest);
    }

    #[test]
    fn only_a_known_provider_before_the_first_colon_qualifies_a_model() {
        let resolve = |text| ModelRef::resolve(text, ProviderKind::DashScope);
        assert_eq!(
            resolve("ark:doubao-seedream-4-5-251128"),
            ModelRef {
                provider: ProviderKind::Ark,
                model: "doubao-seedream-4-5-251128".into()
            }
        );
        assert_eq!(resolve("qwen-image-plus").provider, ProviderKind::DashScope);
        let free = resolve("openrouter:vendor/model:free");
        assert_eq!(free.provider, ProviderKind::OpenRouter);
        assert_eq!(free.model, "vendor/model:free");
        // Not a provider: the colon is the slug's own.
        let slug = ModelRef::resolve("vendor/model:free", ProviderKind::OpenRouter);
        assert_eq!(slug.model, "vendor/model:free");
        assert_eq!(
            resolve("ark:x").written_for(ProviderKind::DashScope),
            "ark:x"
        );
        assert_eq!(resolve("ark:x").written_for(ProviderKind::Ark), "x");
    }

    #[test]
    fn a_provider_with_a_negative_field_gets_the_negatives_apart() {
        let none = HashMap::new();
        let spec = ImageSpec::new(
            &request(
                serde_json::json!({"scene_id": "s1", "image_prompt": "a fox",
                "negative_prompt": "text"}),
            ),
            &settings(&none),
        )
        .unwrap();
        let folded = spec.prompt_for(ProviderKind::Ark);
        assert_eq!(folded.prompt, "a fox.\n\nAvoid: text.");
        assert_eq!(folded.negative_prompt, None);
        let apart = spec.prompt_for(ProviderKind::DashScope);
        assert_eq!(apart.prompt, "a fox.");
        assert_eq!(apart.negative_prompt, Some("text"));
    }

    #[test]
    fn inline_references_are_recorded_by_hash() {
        let spec = ImageSpec {
            model: ModelRef::resolve("m/x", ProviderKind::OpenRouter),
            prompt: "p".into(),
            positive_prompt: "p".into(),
            negative_prompt: String::new(),
            size: ImageSize::Square,
            quality: ImageQuality::Standard,
            seed: None,
            references: vec![
                "https://cdn.example.com/a.png".into(),
                "data:image/png;base64,AAAA".into(),
            ],
        };
        let recorded = spec.recorded_references();
        assert_eq!(recorded[0], "https://cdn.example.com/a.png");
        assert_eq!(
            recorded[1],
            format!(
                "data:image/png;sha256,{}",
                hex::encode(Sha256::digest(b"AAAA"))
            )
        );
    }
}
