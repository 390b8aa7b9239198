//! Keeps an answer under Lambda's response limit.
//!
//! AWS fails a whole invocation whose answer passes 6 MB (synchronous invoke), and an
//! SQS or EventBridge trigger then delivers the event again — forever, since the same
//! batch answers the same size. The images themselves are stored by then, with their
//! records; what would be lost is only the answer. So an answer that is too big is
//! trimmed, largest echo first, and says what it left out in `trimmed`:
//!
//! 1. `generation_params.prompt`, `negative_prompt` and `reference_images` — an echo of
//!    the request (4,000 characters of CJK is 12 KB a scene); the stored record keeps them;
//! 2. thumbnails' paths and URLs — each is `thumbnails/` before the image's key;
//! 3. for a story, the images' URLs — `manifest.json` holds every one;
//! 4. last, the lists themselves: the summary and the story links remain, and a rerun of
//!    the same batch answers every stored scene from the cache at no cost.

use serde_json::{Map, Value};

/// The size an answer is trimmed to: Lambda's limit for a synchronous answer (6 MiB) less
/// room for the runtime's envelope.
pub(crate) const ANSWER_BUDGET: usize = 5_500_000;

/// The request echoes a result can do without, under `generation_params`.
const ECHOED_PARAMS: [&str; 3] = ["prompt", "negative_prompt", "reference_images"];
const THUMBNAIL_FIELDS: [&str; 2] = ["thumbnail_path", "thumbnail_url"];
const IMAGE_FIELDS: [&str; 1] = ["image_url"];

/// One way to shrink an answer; `true` when it removed anything.
type TrimStep = fn(&mut Map<String, Value>) -> bool;

/// Trims `answer` until it serialises to at most `budget` bytes, recording each step in
/// a top-level `trimmed` list. An answer already within the budget is left untouched.
pub(crate) fn fit(answer: &mut Value, budget: usize) {
    let mut trimmed: Vec<&'static str> = Vec::new();
    let steps: [(&'static str, TrimStep); 4] = [
        ("generation_params.prompt", drop_echoes),
        ("thumbnails", drop_thumbnails),
        ("image_urls", drop_image_links_held_by_manifest),
        ("results", drop_lists),
    ];
    for (name, step) in steps {
        if serialized_len(answer) <= budget {
            break;
        }
        let Value::Object(map) = answer else {
            return;
        };
        if step(map) {
            trimmed.push(name);
        }
    }
    if trimmed.is_empty() {
        return;
    }
    tracing::warn!(
        trimmed = ?trimmed,
        bytes = serialized_len(answer),
        "answer trimmed to fit Lambda's response limit"
    );
    if let Value::Object(map) = answer {
        map.insert(
            "trimmed".to_owned(),
            Value::from(trimmed.into_iter().map(Value::from).collect::<Vec<_>>()),
        );
    }
}

/// The length of `value` as JSON, without building the text.
pub(crate) fn serialized_len(value: &Value) -> usize {
    crate::schema::json_len(value)
}

/// Every result object: the entries of a batch's `results`, or a single answer itself.
fn each_result(answer: &mut Map<String, Value>, mut visit: impl FnMut(&mut Map<String, Value>)) {
    if answer.contains_key("generation_params") {
        visit(answer);
    } else if let Some(Value::Array(results)) = answer.get_mut("results") {
        results
            .iter_mut()
            .filter_map(Value::as_object_mut)
            .for_each(visit);
    }
}

fn remove_all(object: &mut Map<String, Value>, fields: &[&str]) -> bool {
    let mut removed = false;
    for field in fields {
        removed |= object.remove(*field).is_some();
    }
    removed
}

fn drop_echoes(answer: &mut Map<String, Value>) -> bool {
    let mut removed = false;
    each_result(answer, |result| {
        if let Some(Value::Object(params)) = result.get_mut("generation_params") {
            removed |= remove_all(params, &ECHOED_PARAMS);
        }
    });
    removed
}

fn drop_thumbnails(answer: &mut Map<String, Value>) -> bool {
    let mut removed = false;
    each_result(answer, |result| {
        removed |= remove_all(result, &THUMBNAIL_FIELDS)
    });
    removed
}

/// Only a story's answer: its manifest lists every image's path and URL.
fn drop_image_links_held_by_manifest(answer: &mut Map<String, Value>) -> bool {
    let has_manifest = ["manifest_url", "manifest_path"]
        .iter()
        .any(|key| answer.get(*key).is_some_and(|value| !value.is_null()));
    if !has_manifest {
        return false;
    }
    let mut removed = false;
    each_result(answer, |result| {
        removed |= remove_all(result, &IMAGE_FIELDS)
    });
    removed
}

/// The last step: the summary (and the story's links) say what happened.
fn drop_lists(answer: &mut Map<String, Value>) -> bool {
    let mut removed = false;
    for list in ["results", "failures"] {
        if let Some(Value::Array(items)) = answer.get_mut(list) {
            removed |= !items.is_empty();
            items.clear();
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lambda's limit for a synchronous answer, in bytes.
    const LAMBDA_RESPONSE_LIMIT: usize = 6 * 1024 * 1024;
    use serde_json::json;

    fn result(scene: &str, prompt_chars: usize) -> Value {
        json!({
            "scene_id": scene,
            "image_path": format!("s3://bucket/images/{scene}.png"),
            "image_url": format!("https://cdn.example/images/{scene}.png"),
            "thumbnail_path": format!("s3://bucket/thumbnails/images/{scene}.png"),
            "thumbnail_url": format!("https://cdn.example/thumbnails/images/{scene}.png"),
            "width": 1024, "height": 1024,
            "generation_params": {
                "model": "m", "prompt": "画".repeat(prompt_chars),
                "negative_prompt": "模糊", "request_hash": "0".repeat(64),
            },
        })
    }

    fn batch(scenes: usize, prompt_chars: usize) -> Value {
        let results: Vec<Value> = (0..scenes)
            .map(|i| result(&format!("s{i}"), prompt_chars))
            .collect();
        json!({"results": results, "failures": [], "summary": {"scenes": scenes}})
    }

    #[test]
    fn an_answer_within_the_budget_is_untouched() {
        let mut answer = batch(3, 100);
        let before = answer.clone();
        fit(&mut answer, ANSWER_BUDGET);
        assert_eq!(answer, before);
    }

    #[test]
    fn the_prompt_echo_goes_first_and_the_answer_says_so() {
        // 600 scenes × 4,000 CJK characters is 7.2 MB of echo alone.
        let mut answer = batch(600, 4000);
        assert!(serialized_len(&answer) > LAMBDA_RESPONSE_LIMIT);
        fit(&mut answer, ANSWER_BUDGET);
        assert!(serialized_len(&answer) <= ANSWER_BUDGET);
        assert_eq!(answer["trimmed"], json!(["generation_params.prompt"]));
        let first = &answer["results"][0];
        assert!(first["generation_params"].get("prompt").is_none());
        assert!(first["generation_params"].get("negative_prompt").is_none());
        assert_eq!(first["image_url"], "https://cdn.example/images/s0.png");
        assert_eq!(
            first["thumbnail_url"],
            "https://cdn.example/thumbnails/images/s0.png"
        );
        assert_eq!(answer["results"].as_array().map(Vec::len), Some(600));
    }

    #[test]
    fn image_links_go_only_when_a_manifest_holds_them() {
        let mut plain = batch(40, 10);
        fit(&mut plain, 2_000);
        // No manifest: the links stay until the lists themselves must go.
        assert_eq!(
            plain["trimmed"],
            json!(["generation_params.prompt", "thumbnails", "results"])
        );
        assert!(serialized_len(&plain) <= 2_000);
        assert_eq!(plain["summary"]["scenes"], 40);

        let mut story = batch(40, 10);
        story["manifest_url"] = json!("https://cdn.example/stories/s/manifest.json");
        let budget = serialized_len(&story) / 2;
        fit(&mut story, budget);
        assert_eq!(
            story["trimmed"],
            json!(["generation_params.prompt", "thumbnails", "image_urls"])
        );
        assert_eq!(story["results"][0]["scene_id"], "s0");
        assert!(story["results"][0].get("image_url").is_none());
    }

    #[test]
    fn a_single_answer_is_trimmed_in_place() {
        let mut single = result("only", 4000);
        fit(&mut single, 1_000);
        assert!(single["generation_params"].get("prompt").is_none());
        assert_eq!(single["trimmed"][0], "generation_params.prompt");
    }

    #[test]
    fn the_counter_measures_what_serde_writes() {
        let answer = batch(7, 33);
        assert_eq!(
            serialized_len(&answer),
            serde_json::to_vec(&answer).map(|v| v.len()).unwrap_or(0)
        );
    }
}
