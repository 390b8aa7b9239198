//! The story manifest: every scene of a story, in order, with its latest outcome.
//!
//! Batches of one story can run at the same time (two Lambda invocations, a CLI run beside
//! a queue), and the stores we target have no conditional writes (Garage and Qiniu ignore
//! `If-None-Match`, docs/design.md §3), so no batch may read-modify-write `manifest.json`.
//! Instead each batch writes its own **fragment** under a key no other batch can pick, and
//! `manifest.json` is only ever a pure function of the set of fragments ([`merge`]): scenes
//! in order of first appearance, fragment by fragment (fragment keys sort by time), and a
//! later fragment's entry replaces an earlier one for the same scene. The protocol that
//! makes the last manifest written include every fragment lives in [`super::publish_story`].

use serde::{Deserialize, Serialize};

use crate::schema::Stage3Output;

/// The format of `manifest.json` and of fragments; bumped on an incompatible change.
pub const MANIFEST_FORMAT: u32 = 1;

/// `stories/{story_id}/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default = "default_format")]
    pub format: u32,
    pub story_id: String,
    /// The time of the newest batch merged (RFC 3339 UTC).
    pub updated_at: String,
    pub totals: StoryTotals,
    /// Batch fragments merged into this manifest.
    #[serde(default)]
    pub batches: usize,
    pub scenes: Vec<ManifestEntry>,
}

fn default_format() -> u32 {
    MANIFEST_FORMAT
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

/// One scene's latest outcome.
///
/// Keys (`image_key`, `thumbnail_key`) are relative to the store's root (under the S3
/// prefix), which is where the storyboard's relative links point. `image_url` is kept only
/// when it does not expire: a presigned or signed URL in a long-lived file would be a
/// broken link by tomorrow.
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
    /// When the batch that reported this outcome published it (RFC 3339 UTC).
    #[serde(default)]
    pub updated_at: String,
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
    pub fn succeeded(scene: &StoryScene, output: &Stage3Output) -> Self {
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
            image_url: output.image_url.clone().filter(|url| is_lasting_url(url)),
            thumbnail_key,
            thumbnail_path: output.thumbnail_path.clone(),
            thumbnail_url: output
                .thumbnail_url
                .clone()
                .filter(|url| is_lasting_url(url)),
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
}

/// The object key at the end of an `image_path`: the service's keys are flat
/// (`{scene_id}-{hash}.png`), so it is the last `/`-separated part of a filesystem path or
/// an `s3://bucket/prefix/key` location.
fn key_of_location(location: &str) -> String {
    let last = location.rsplit(['/', '\\']).next().unwrap_or(location);
    last.to_string()
}

/// Whether `url` can be kept in a file read for months: a plain CDN URL can; a presigned S3
/// URL or a signed CDN URL (both carry their signature in the query) cannot.
pub fn is_lasting_url(url: &str) -> bool {
    !url.contains('?')
}

/// One batch's contribution: `stories/{story_id}/batches/{time}-{random}.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fragment {
    #[serde(default = "default_format")]
    pub format: u32,
    pub story_id: String,
    /// When the batch published (RFC 3339 UTC); also each entry's `updated_at`.
    pub written_at: String,
    pub scenes: Vec<ManifestEntry>,
}

/// Builds the manifest from fragments given in key order (oldest first): scenes in order of
/// first appearance, each with the entry of the last fragment that names it. The result
/// depends only on the fragments, so every batch merging the same set writes the same bytes.
pub fn merge(story_id: &str, fragments: &[Fragment]) -> Manifest {
    let mut order: Vec<String> = Vec::new();
    let mut latest: std::collections::HashMap<String, ManifestEntry> =
        std::collections::HashMap::new();
    for fragment in fragments {
        for entry in &fragment.scenes {
            if !latest.contains_key(&entry.scene_id) {
                order.push(entry.scene_id.clone());
            }
            latest.insert(entry.scene_id.clone(), entry.clone());
        }
    }
    let scenes: Vec<ManifestEntry> = order
        .iter()
        .filter_map(|scene_id| latest.remove(scene_id))
        .collect();
    let succeeded = scenes
        .iter()
        .filter(|e| e.status == SceneStatus::Succeeded)
        .count();
    let cost_usd = scenes.iter().filter_map(|e| e.cost).sum::<f64>();
    Manifest {
        format: MANIFEST_FORMAT,
        story_id: story_id.to_string(),
        updated_at: fragments
            .iter()
            .map(|f| f.written_at.as_str())
            .max()
            .unwrap_or_default()
            .to_string(),
        totals: StoryTotals {
            scenes: scenes.len(),
            succeeded,
            failed: scenes.len() - succeeded,
            // Sums of binary fractions drift (0.1 + 0.2); money reads better rounded.
            cost_usd: (cost_usd * 1e9).round() / 1e9,
        },
        batches: fragments.len(),
        scenes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(id: &str) -> StoryScene {
        StoryScene {
            scene_id: id.into(),
            prompt: format!("prompt of {id}"),
            size: "1024x1024".into(),
            model: "test/model".into(),
        }
    }

    fn ok(id: &str, cost: f64) -> ManifestEntry {
        let mut entry = ManifestEntry::failed(&scene(id), "x", "x");
        entry.status = SceneStatus::Succeeded;
        entry.error_type = None;
        entry.message = None;
        entry.cost = Some(cost);
        entry.image_key = Some(format!("{id}-0000.png"));
        entry
    }

    fn fragment(time: &str, entries: Vec<ManifestEntry>) -> Fragment {
        Fragment {
            format: MANIFEST_FORMAT,
            story_id: "story".into(),
            written_at: time.into(),
            scenes: entries,
        }
    }

    #[test]
    fn order_is_first_appearance_and_later_fragments_win() {
        let first = fragment(
            "2026-11-29T10:00:00.000Z",
            vec![
                ok("s1", 0.1),
                ManifestEntry::failed(&scene("s2"), "timeout", "slow"),
                ok("s3", 0.2),
            ],
        );
        let second = fragment(
            "2026-11-29T11:00:00.000Z",
            vec![ok("s4", 0.3), ok("s2", 0.4)],
        );
        let manifest = merge("story", &[first, second]);
        let ids: Vec<&str> = manifest
            .scenes
            .iter()
            .map(|e| e.scene_id.as_str())
            .collect();
        assert_eq!(ids, ["s1", "s2", "s3", "s4"]);
        assert_eq!(
            manifest.scenes[1].status,
            SceneStatus::Succeeded,
            "the regenerated s2 replaced the failure"
        );
        assert_eq!(manifest.scenes[1].cost, Some(0.4));
        assert_eq!(
            manifest.totals,
            StoryTotals {
                scenes: 4,
                succeeded: 4,
                failed: 0,
                cost_usd: 1.0
            }
        );
        assert_eq!(manifest.updated_at, "2026-11-29T11:00:00.000Z");
        assert_eq!(manifest.batches, 2);
    }

    #[test]
    fn the_same_fragments_give_the_same_manifest() {
        let fragments = [
            fragment("2026-11-29T10:00:00.000Z", vec![ok("a", 0.1), ok("b", 0.2)]),
            fragment("2026-11-29T10:00:00.001Z", vec![ok("b", 0.3)]),
        ];
        assert_eq!(
            serde_json::to_vec(&merge("story", &fragments)).unwrap(),
            serde_json::to_vec(&merge("story", &fragments.clone())).unwrap()
        );
    }

    #[test]
    fn signed_urls_are_not_kept() {
        assert!(is_lasting_url("https://img.example.com/a.png"));
        assert!(!is_lasting_url(
            "https://s3.example.com/b/a.png?X-Amz-Signature=abc"
        ));
        assert!(!is_lasting_url(
            "https://img.example.com/a.png?sign=abc&t=65f0"
        ));
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
