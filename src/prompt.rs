//! Prompt composition: one text from a scene's prompt, style tags and negative prompt.
//!
//! No current image API has a negative-prompt field (docs/design.md §3), so what the scene must
//! not show is folded into the text as an "Avoid:" sentence. The composed text is exactly
//! what the provider receives and what `generation_params.prompt` records.

use crate::error::{Result, Stage3Error};
use crate::schema::GenerationRequest;

/// The seed's prompt limit, in characters; configurable through `STAGE3_MAX_PROMPT_CHARS`.
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 4000;

/// Composes the prompt for `request` and checks it against `max_chars`.
pub fn compose_prompt(request: &GenerationRequest, max_chars: usize) -> Result<String> {
    let mut prompt = sentence(request.image_prompt.trim());

    let tags: Vec<&str> = request
        .style_tags
        .iter()
        .map(|tag| tag.trim())
        .filter(|tag| !tag.is_empty())
        .collect();
    if !tags.is_empty() {
        prompt.push_str("\n\nStyle: ");
        prompt.push_str(&sentence(&tags.join(", ")));
    }

    let negative = request.negative_prompt.trim();
    if !negative.is_empty() {
        prompt.push_str("\n\nAvoid: ");
        prompt.push_str(&sentence(negative));
    }

    let length = prompt.chars().count();
    if length > max_chars {
        return Err(Stage3Error::invalid_request(format!(
            "image_prompt: the composed prompt is {length} characters; the limit is {max_chars} \
             (STAGE3_MAX_PROMPT_CHARS)"
        )));
    }
    Ok(prompt)
}

/// Ends `text` with a full stop unless it already ends with punctuation.
fn sentence(text: &str) -> String {
    let mut owned = text.to_string();
    if !owned.ends_with(['.', '!', '?', '。', '！', '？']) {
        owned.push('.');
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Stage2Output;

    fn request(prompt: &str, tags: &[&str], negative: &str) -> GenerationRequest {
        Stage2Output {
            scene_id: "s".into(),
            image_prompt: prompt.into(),
            negative_prompt: negative.into(),
            style_tags: tags.iter().map(|t| t.to_string()).collect(),
            characters_in_scene: vec![],
        }
        .into()
    }

    #[test]
    fn a_bare_prompt_is_sent_as_a_sentence() {
        let prompt = compose_prompt(&request("  A quiet harbour at dawn ", &[], ""), 4000).unwrap();
        assert_eq!(prompt, "A quiet harbour at dawn.");
    }

    #[test]
    fn style_tags_and_negatives_are_folded_into_the_text() {
        let prompt = compose_prompt(
            &request(
                "A quiet harbour at dawn!",
                &["anime", " ", "watercolor"],
                "blurry, text",
            ),
            4000,
        )
        .unwrap();
        assert_eq!(
            prompt,
            "A quiet harbour at dawn!\n\nStyle: anime, watercolor.\n\nAvoid: blurry, text."
        );
    }

    #[test]
    fn the_limit_counts_characters_not_bytes() {
        let text = "晨".repeat(10);
        assert!(compose_prompt(&request(&text, &[], ""), 11).is_ok());
        let err = compose_prompt(&request(&text, &["anime"], ""), 11).unwrap_err();
        assert!(err.to_string().contains("limit is 11"), "{err}");
    }
}
