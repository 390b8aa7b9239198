//! Prompt composition: one text from a scene's prompt, style tags and negative prompt.
//!
//! OpenRouter's APIs and Volcengine Ark have no negative-prompt field (docs/design.md §3), so
//! for them what the scene must not show is folded into the text as an "Avoid:" sentence;
//! DashScope takes it in a field of its own. [`compose`] makes both forms, and each provider
//! sends the one it takes: that text is what `generation_params.prompt` records.
//!
//! Punctuation follows the script. Each part ends with a full stop unless it already ends
//! with one: "。" after Chinese or Japanese text (its last character an ideograph, kana or
//! CJK punctuation), "." after anything else. A prompt written in Chinese — more CJK
//! characters than Latin letters — also gets Chinese labels and separators
//! ("风格：水彩、动漫。", "避免：模糊、文字。") instead of "Style: …" and "Avoid: …". Prompts
//! without CJK text compose exactly as before, so their cache keys are unchanged.

use crate::error::{Result, Stage3Error};
use crate::schema::GenerationRequest;

/// The seed's prompt limit, in characters; configurable through `STAGE3_MAX_PROMPT_CHARS`.
pub(crate) const DEFAULT_MAX_PROMPT_CHARS: usize = 4000;

/// The words around the style tags and negatives, in the prompt's language.
struct Labels {
    style: &'static str,
    avoid: &'static str,
    tag_separator: &'static str,
}

const ENGLISH: Labels = Labels {
    style: "\n\nStyle: ",
    avoid: "\n\nAvoid: ",
    tag_separator: ", ",
};

const CHINESE: Labels = Labels {
    style: "\n\n风格：",
    avoid: "\n\n避免：",
    tag_separator: "、",
};

/// A scene's prompt in the two forms providers take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ComposedPrompt {
    /// The scene's text, its style tags and, as an "Avoid:" sentence, what it must not
    /// show: what a provider without a negative-prompt field receives.
    pub folded: String,
    /// The scene's text and style tags alone, for a provider that takes the negative
    /// prompt in a field of its own (DashScope).
    pub positive: String,
    /// The negative prompt as written, trimmed; empty when there is none.
    pub negative: String,
}

/// Composes both forms of the prompt for `request`; the folded one, the longest, is checked
/// against `max_chars`.
pub(crate) fn compose(request: &GenerationRequest, max_chars: usize) -> Result<ComposedPrompt> {
    let image_prompt = request.image_prompt.trim();
    let labels = if is_chinese(image_prompt) {
        &CHINESE
    } else {
        &ENGLISH
    };
    let mut prompt = sentence(image_prompt);

    let tags: Vec<&str> = request
        .style_tags
        .iter()
        .map(|tag| tag.trim())
        .filter(|tag| !tag.is_empty())
        .collect();
    if !tags.is_empty() {
        prompt.push_str(labels.style);
        prompt.push_str(&sentence(&tags.join(labels.tag_separator)));
    }
    let positive = prompt.clone();

    let negative = request.negative_prompt.trim();
    if !negative.is_empty() {
        prompt.push_str(labels.avoid);
        prompt.push_str(&sentence(negative));
    }

    let length = prompt.chars().count();
    if length > max_chars {
        return Err(Stage3Error::invalid_request(format!(
            "image_prompt: the composed prompt is {length} characters; the limit is {max_chars} \
             (STAGE3_MAX_PROMPT_CHARS)"
        )));
    }
    Ok(ComposedPrompt {
        folded: prompt,
        positive,
        negative: negative.to_string(),
    })
}

/// Ends `text` with a full stop that fits its script unless it already ends with one
/// (possibly inside closing quotes or brackets, as in "她说：「好！」"). The script is that of
/// the last character before any closing marks and ellipses; a trailing Chinese comma,
/// enumeration comma, semicolon or colon becomes the full stop.
fn sentence(text: &str) -> String {
    const CLOSERS: [char; 7] = ['」', '』', '”', '’', '）', '》', '】'];
    let mut owned = text.to_string();
    let script = owned
        .chars()
        .rev()
        .find(|&c| !CLOSERS.contains(&c) && c != '…');
    if script.is_some_and(is_cjk) {
        let core = owned.trim_end_matches(CLOSERS);
        if core.len() == owned.len() && owned.ends_with(['，', '、', '；', '：']) {
            owned.pop();
            owned.push('。');
        } else if !core.ends_with(['。', '！', '？', '…', '.', '!', '?']) {
            owned.push('。');
        }
    } else if !owned.ends_with(['.', '!', '?', '。', '！', '？']) {
        owned.push('.');
    }
    owned
}

/// Chinese or Japanese: ideographs, kana, CJK and fullwidth punctuation.
fn is_cjk(ch: char) -> bool {
    matches!(u32::from(ch),
        0x3000..=0x30FF      // CJK punctuation, hiragana, katakana
        | 0x3400..=0x4DBF    // Extension A
        | 0x4E00..=0x9FFF    // CJK Unified Ideographs
        | 0xF900..=0xFAFF    // compatibility ideographs
        | 0xFF01..=0xFF65    // fullwidth punctuation and forms
        | 0x20000..=0x3FFFF) // Extensions B and later
}

/// Whether `text` is written in Chinese: more CJK characters than Latin letters.
fn is_chinese(text: &str) -> bool {
    let (mut cjk, mut latin) = (0usize, 0usize);
    for ch in text.chars() {
        if is_cjk(ch) {
            cjk += 1;
        } else if ch.is_ascii_alphabetic() {
            latin += 1;
        }
    }
    cjk > latin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Stage2Output;

    /// The folded prompt, as most providers are sent it.
    fn compose_prompt(request: &GenerationRequest, max_chars: usize) -> Result<String> {
        compose(request, max_chars).map(|composed| composed.folded)
    }

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
    fn the_positive_form_leaves_the_negatives_to_their_own_field() {
        let composed = compose(
            &request("A quiet harbour", &["ink"], "  blurry, text "),
            4000,
        )
        .unwrap();
        assert_eq!(composed.positive, "A quiet harbour.\n\nStyle: ink.");
        assert_eq!(composed.negative, "blurry, text");
        assert_eq!(
            composed.folded,
            "A quiet harbour.\n\nStyle: ink.\n\nAvoid: blurry, text."
        );
    }

    #[test]
    fn the_limit_counts_characters_not_bytes() {
        let text = "晨".repeat(10);
        assert!(compose_prompt(&request(&text, &[], ""), 11).is_ok());
        let err = compose_prompt(&request(&text, &["anime"], ""), 11).unwrap_err();
        assert!(err.to_string().contains("limit is 11"), "{err}");
    }

    #[test]
    fn a_chinese_prompt_ends_with_a_chinese_full_stop() {
        let prompt = compose_prompt(
            &request("清晨的城市天际线，一只小狐狸蹲在屋顶上", &[], ""),
            4000,
        )
        .unwrap();
        assert_eq!(prompt, "清晨的城市天际线，一只小狐狸蹲在屋顶上。");
        // Already punctuated, also inside closing quotes: nothing is added.
        for done in [
            "屋顶上。",
            "屋顶上！",
            "真的吗？",
            "她说：「好！」",
            "然后……",
        ] {
            assert_eq!(compose_prompt(&request(done, &[], ""), 4000).unwrap(), done);
        }
        // A trailing comma becomes the full stop instead of standing before it.
        assert_eq!(
            compose_prompt(&request("小狐狸，", &[], ""), 4000).unwrap(),
            "小狐狸。"
        );
        // A quotation without its own stop gets one after the closing mark.
        assert_eq!(
            compose_prompt(&request("招牌上写着「茶馆」", &[], ""), 4000).unwrap(),
            "招牌上写着「茶馆」。"
        );
    }

    #[test]
    fn a_chinese_prompt_gets_chinese_labels_and_separators() {
        let prompt = compose_prompt(
            &request("一只小狐狸在屋顶上", &["水彩", "动漫"], "模糊，文字"),
            4000,
        )
        .unwrap();
        assert_eq!(
            prompt,
            "一只小狐狸在屋顶上。\n\n风格：水彩、动漫。\n\n避免：模糊，文字。"
        );
        // Latin tags keep the Latin stop, whatever the prompt's language.
        let prompt =
            compose_prompt(&request("一只小狐狸在屋顶上", &["anime"], "text"), 4000).unwrap();
        assert_eq!(
            prompt,
            "一只小狐狸在屋顶上。\n\n风格：anime.\n\n避免：text."
        );
    }

    #[test]
    fn mixed_prompts_take_the_stop_of_their_last_character() {
        // Mostly English, ending in Chinese: English labels, Chinese full stop.
        let prompt = compose_prompt(
            &request("A fox named Lili sits 在屋顶上", &["水彩"], ""),
            4000,
        )
        .unwrap();
        assert_eq!(prompt, "A fox named Lili sits 在屋顶上。\n\nStyle: 水彩。");
        // Mostly Chinese, ending in Latin: Chinese labels, Latin full stop.
        let prompt = compose_prompt(
            &request("一只小狐狸在上海的屋顶上看 Huangpu", &[], "blur"),
            4000,
        )
        .unwrap();
        assert_eq!(prompt, "一只小狐狸在上海的屋顶上看 Huangpu.\n\n避免：blur.");
    }

    #[test]
    fn english_prompts_compose_exactly_as_before() {
        // These strings are hashed into cache keys: they must not change.
        let cases = [
            ("A fox", vec![], "", "A fox."),
            ("A fox.", vec!["ink"], "", "A fox.\n\nStyle: ink."),
            (
                "He said \"hi\"",
                vec![],
                "rain",
                "He said \"hi\".\n\nAvoid: rain.",
            ),
            ("Wait…", vec![], "", "Wait…."),
            (
                "Ünïcödé café",
                vec!["a", "b"],
                "c!",
                "Ünïcödé café.\n\nStyle: a, b.\n\nAvoid: c!",
            ),
        ];
        for (text, tags, negative, expected) in cases {
            let prompt = compose_prompt(&request(text, &tags, negative), 4000).unwrap();
            assert_eq!(prompt, expected);
        }
    }
}
