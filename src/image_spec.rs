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

use sha2::{Digest, Sha256};

use crate::error::{Result, Stage3Error};
use crate::prompt::compose_prompt;
use crate::schema::{GenerationRequest, ImageQuality, ImageSize, MAX_REFERENCE_IMAGES};

/// One image to make, fully resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The model asked for (the request's, else `STAGE3_MODEL`); a fallback may serve it.
    pub model: String,
    /// The whole prompt sent: the scene's text, its style tags and what to avoid.
    pub prompt: String,
    pub size: ImageSize,
    pub quality: ImageQuality,
    /// Asks the model for the same image again; models that take no seed refuse it.
    pub seed: Option<i64>,
    /// The request's reference images, then those of its characters, without repeats.
    pub references: Vec<String>,
}

/// The settings a request is resolved against.
#[derive(Debug, Clone, Copy)]
pub struct SpecSettings<'a> {
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
    pub fn new(request: &GenerationRequest, settings: &SpecSettings<'_>) -> Result<ImageSpec> {
        request.validate()?;
        let prompt = compose_prompt(request, settings.max_prompt_chars)?;
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
        Ok(ImageSpec {
            model: request
                .model
                .clone()
                .unwrap_or_else(|| settings.default_model.to_string()),
            prompt,
            size: request.size.unwrap_or_default(),
            quality: request.quality.unwrap_or_default(),
            seed: request.seed,
            references,
        })
    }

    /// The references as recorded in an output: an https URL as is, an inline image by its
    /// hash, so a record never carries megabytes of base64.
    pub fn recorded_references(&self) -> Vec<String> {
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
        assert_eq!(spec.model, "acme/default");
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
    fn inline_references_are_recorded_by_hash() {
        let spec = ImageSpec {
            model: "m/x".into(),
            prompt: "p".into(),
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
