//! Stories: a batch that names a `story_id` also publishes the story's manifest and
//! storyboard page beside its images (docs/design.md §2).
//!
//! - [`manifest`]: the manifest format, and the merge of batch fragments into it.
//! - [`gallery`]: the storyboard page (`index.html`), self-contained static HTML.
//! - [`thumbnail`]: the small PNG stored for every image, which keeps the page light.
//!
//! ## Why concurrent batches lose nothing
//!
//! The stores have plain PUT, GET and LIST, and no conditional write that every server
//! honours, so [`publish_story`] never edits `manifest.json` in place:
//!
//! 1. The batch PUTs its entries as a new fragment, `stories/{id}/batches/{ms}-{random}.json`
//!    (a key no other batch picks).
//! 2. It LISTs the fragments, GETs them, [`manifest::merge`]s them, and PUTs the manifest,
//!    then the page. The merge depends only on the set of fragments.
//! 3. It LISTs again. If a fragment appeared that it did not merge, it goes back to 2.
//!
//! Take the manifest PUT that the store applied last, by batch Z, and any fragment F.
//! If F's PUT finished before Z's final LIST began, that LIST shows F (S3 and the
//! filesystem list what was written before), so Z saw nothing new only because its
//! manifest already held F. Otherwise F finished after that LIST began, which is after
//! Z's last manifest PUT finished; F's batch then PUTs a manifest after F, so later still,
//! and Z's would not be the last. So the surviving manifest holds every fragment whose
//! batch completed step 1, whatever the interleaving. The page is covered by the same
//! argument, since each round writes it before its final LIST. A batch that dies after
//! step 1 leaves a fragment that the next batch of the story merges.

pub mod gallery;
pub mod manifest;
pub mod thumbnail;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub use manifest::{Fragment, Manifest, ManifestEntry, SceneStatus, StoryScene, StoryTotals};
pub use thumbnail::{make_thumbnail, store_thumbnail, thumbnail_key, THUMBNAIL_MAX_SIDE};

use crate::deadline::Deadline;
use crate::error::{ErrorType, Result, Stage3Error};
use crate::schema::{validate_scene_id, BatchAnswer, Stage3Output};
use crate::service::{PreparedScene, Stage3Service};
use crate::storage::{ObjectMeta, ObjectStore};
use crate::urls::UrlPolicy;

/// The storyboard page: read by browsers straight from the bucket or CDN, and rewritten by
/// every batch, so never cached for long.
pub const GALLERY_META: ObjectMeta = ObjectMeta {
    content_type: "text/html; charset=utf-8",
    cache_control: "no-cache",
};

/// Rounds of merge-and-check before giving up; each extra round needs another batch of
/// the same story to have published in between.
const MAX_ROUNDS: usize = 8;
/// A story with more batches than this is refused rather than read whole on every batch.
pub const MAX_FRAGMENTS: usize = 1_000;
/// Fragments fetched at once.
const FETCH_CONCURRENCY: usize = 8;
/// Tries of one store call that failed transiently.
const STORE_ATTEMPTS: u32 = 3;
/// The largest manifest `stage3 gallery` reads.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// `stories/{story_id}/manifest.json`.
pub fn manifest_key(story_id: &str) -> String {
    format!("stories/{story_id}/manifest.json")
}

/// `stories/{story_id}/index.html`.
pub fn gallery_key(story_id: &str) -> String {
    format!("stories/{story_id}/index.html")
}

/// Where a story's batch fragments live.
pub fn fragments_prefix(story_id: &str) -> String {
    format!("stories/{story_id}/batches/")
}

/// `story_id` becomes part of object keys: the same rules as `scene_id`.
pub fn validate_story_id(story_id: &str) -> Result<()> {
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

impl From<&PreparedScene> for StoryScene {
    fn from(scene: &PreparedScene) -> Self {
        StoryScene {
            scene_id: scene.scene_id().to_string(),
            prompt: scene.request.image_prompt.clone(),
            size: scene.spec.size.as_str().to_string(),
            model: scene.spec.model.model.clone(),
        }
    }
}

/// The story scenes of prepared scenes, in input order (an identical repeat once).
pub fn story_scenes(scenes: &[PreparedScene]) -> Vec<StoryScene> {
    let mut seen = HashSet::new();
    scenes
        .iter()
        .filter(|scene| seen.insert(scene.scene_id().to_string()))
        .map(StoryScene::from)
        .collect()
}

/// The manifest entries of a batch answer, in the order of `scenes`.
pub fn entries_from_answer(scenes: &[StoryScene], answer: &BatchAnswer) -> Vec<ManifestEntry> {
    scenes
        .iter()
        .filter_map(|scene| {
            if let Some(output) = answer.results.iter().find(|r| r.scene_id == scene.scene_id) {
                return Some(ManifestEntry::succeeded(scene, output));
            }
            answer
                .failures
                .iter()
                .find(|f| f.scene_id == scene.scene_id)
                .map(|f| ManifestEntry::failed(scene, f.error_type.as_str(), &f.message))
        })
        .collect()
}

/// The manifest entries of scenes and their outcomes, as [`crate::service::Stage3Service::run_scenes`]
/// returns them (one outcome per scene, same order).
pub fn entries_from_outcomes(
    scenes: &[StoryScene],
    outcomes: &[std::result::Result<Stage3Output, Stage3Error>],
) -> Vec<ManifestEntry> {
    let mut seen = HashSet::new();
    scenes
        .iter()
        .zip(outcomes)
        .filter(|(scene, _)| seen.insert(scene.scene_id.clone()))
        .map(|(scene, outcome)| match outcome {
            Ok(output) => ManifestEntry::succeeded(scene, output),
            Err(e) => ManifestEntry::failed(scene, e.error_type().as_str(), &e.to_string()),
        })
        .collect()
}

/// Publishes a batch's story into its answer, in the service's store: the answer names the
/// manifest and the page, or carries `story_error` when they could not be written by
/// `deadline` (logged too). Never fails the batch: its scenes are stored whatever happens.
pub async fn publish_into_answer(
    service: &Stage3Service,
    story_id: &str,
    scenes: &[StoryScene],
    answer: &mut BatchAnswer,
    deadline: Deadline,
) {
    let entries = entries_from_answer(scenes, answer);
    answer.story = Some(publish_or_report(service, story_id, entries, deadline).await);
}

/// [`publish_story`] in the service's store, with a failure (or running past `deadline`)
/// turned into [`StoryLinks::story_error`] and logged.
pub async fn publish_or_report(
    service: &Stage3Service,
    story_id: &str,
    entries: Vec<ManifestEntry>,
    deadline: Deadline,
) -> StoryLinks {
    let publishing = publish_story(service.store(), service.urls(), story_id, entries);
    let outcome = deadline.within(publishing).await.unwrap_or_else(|| {
        Err(Stage3Error::DeadlineExceeded(
            "the invocation deadline came before the story was published; the next batch \
             of the story merges this one"
                .into(),
        ))
    });
    match outcome {
        Ok(links) => links,
        Err(error) => {
            tracing::warn!(
                story_id,
                error_type = %error.error_type(),
                error = %error,
                "the story's manifest and page could not be published; the scenes are stored"
            );
            StoryLinks {
                story_id: story_id.to_string(),
                story_error: Some(StoryError {
                    error_type: error.error_type(),
                    message: error.to_string(),
                }),
                ..StoryLinks::default()
            }
        }
    }
}

/// Adds `entries` to the story's manifest and rewrites the manifest and the storyboard page,
/// safely beside any other batch of the same story doing the same (see the module notes).
/// Returns where both are.
pub async fn publish_story(
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
    story_id: &str,
    entries: Vec<ManifestEntry>,
) -> Result<StoryLinks> {
    validate_story_id(story_id)?;
    let now = SystemTime::now();
    let written_at = humantime::format_rfc3339_millis(now).to_string();
    let millis = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let own_key = format!(
        "{}{millis:013}-{:016x}.json",
        fragments_prefix(story_id),
        fastrand::u64(..)
    );
    let fragment = Fragment {
        format: manifest::MANIFEST_FORMAT,
        story_id: story_id.to_string(),
        written_at: written_at.clone(),
        scenes: entries
            .into_iter()
            .map(|entry| ManifestEntry {
                updated_at: written_at.clone(),
                ..entry
            })
            .collect(),
    };
    let bytes = Bytes::from(serde_json::to_vec_pretty(&fragment).expect("fragments serialize"));
    retrying(|| store.put(&own_key, bytes.clone(), ObjectMeta::RECORD)).await?;

    // Fragments never change once written, so each is fetched once across rounds.
    let mut fetched: BTreeMap<String, Option<Fragment>> = BTreeMap::new();
    for round in 0..MAX_ROUNDS {
        let listed = list_fragments(store, story_id).await?;
        if !listed.contains(&own_key) {
            // Not listed yet: a store whose listings lag behind writes. Wait and look again.
            tracing::info!(
                story_id,
                round,
                "own fragment not listed yet; listing again"
            );
            tokio::time::sleep(Duration::from_millis(100 << round.min(4))).await;
            continue;
        }
        let missing: Vec<String> = listed
            .iter()
            .filter(|key| !fetched.contains_key(*key))
            .cloned()
            .collect();
        let loaded: Vec<(String, Option<Fragment>)> = stream::iter(missing)
            .map(|key| async move {
                let bytes = retrying(|| async {
                    let fetched = store.get(&key, MAX_FRAGMENT_BYTES).await?;
                    fetched.into_bytes(&store.location(&key), MAX_FRAGMENT_BYTES)
                })
                .await?;
                Ok::<_, Stage3Error>((key.clone(), read_fragment(story_id, &key, bytes)))
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        fetched.extend(loaded);
        let fragments: Vec<Fragment> = listed
            .iter()
            .filter_map(|key| fetched.get(key).cloned().flatten())
            .collect();

        let manifest = manifest::merge(story_id, &fragments);
        let manifest_json =
            Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifests serialize"));
        let page = Bytes::from(gallery::render(&manifest));
        let (manifest_at, page_at) = (manifest_key(story_id), gallery_key(story_id));
        retrying(|| store.put(&manifest_at, manifest_json.clone(), ObjectMeta::RECORD)).await?;
        retrying(|| store.put(&page_at, page.clone(), GALLERY_META)).await?;

        let after = list_fragments(store, story_id).await?;
        let merged: HashSet<&String> = listed.iter().collect();
        if after.iter().all(|key| merged.contains(key)) {
            tracing::info!(
                story_id,
                scenes = manifest.totals.scenes,
                batches = manifest.batches,
                "story manifest and page published"
            );
            return links(store, urls, story_id).await;
        }
        tracing::info!(
            story_id,
            round,
            "another batch of the story published meanwhile; merging again"
        );
    }
    Err(Stage3Error::storage(
        format!(
            "story {story_id:?}: other batches kept publishing through {MAX_ROUNDS} rounds; \
             this batch's fragment is stored and the next batch of the story will merge it"
        ),
        true,
    ))
}

/// The story's fragment keys, oldest first.
async fn list_fragments(store: &dyn ObjectStore, story_id: &str) -> Result<Vec<String>> {
    let prefix = fragments_prefix(story_id);
    let mut keys: Vec<String> = retrying(|| store.list(&prefix))
        .await?
        .into_iter()
        .filter(|key| key.ends_with(".json"))
        .collect();
    if keys.len() > MAX_FRAGMENTS {
        return Err(Stage3Error::storage(
            format!(
                "story {story_id:?} has {} batch fragments; at most {MAX_FRAGMENTS} are merged",
                keys.len()
            ),
            false,
        ));
    }
    keys.sort();
    Ok(keys)
}

/// A fragment's contents, or `None` (logged) when it cannot be used: a damaged fragment must
/// not stop the story from ever being published again.
fn read_fragment(story_id: &str, key: &str, bytes: Option<Bytes>) -> Option<Fragment> {
    let Some(bytes) = bytes else {
        tracing::warn!(key, "a listed fragment could not be read; skipping it");
        return None;
    };
    match serde_json::from_slice::<Fragment>(&bytes) {
        Ok(fragment) if fragment.story_id == story_id => Some(fragment),
        Ok(_) => {
            tracing::warn!(key, "a fragment of another story; skipping it");
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "an unreadable fragment; skipping it");
            None
        }
    }
}

async fn links(store: &dyn ObjectStore, urls: &UrlPolicy, story_id: &str) -> Result<StoryLinks> {
    // Signed and presigned URLs are made fresh for each answer, like the images' own.
    let url = |key: String| async move { urls.url(store, &key).await };
    Ok(StoryLinks {
        story_id: story_id.to_string(),
        manifest_url: url(manifest_key(story_id)).await?,
        manifest_path: Some(store.location(&manifest_key(story_id))),
        gallery_url: url(gallery_key(story_id)).await?,
        gallery_path: Some(store.location(&gallery_key(story_id))),
        story_error: None,
    })
}

/// Runs a store call, trying a transient failure again after a short pause.
pub(crate) async fn retrying<T, F, Fut>(mut operation: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match operation().await {
            Err(error) if error.is_transient() && attempt < STORE_ATTEMPTS => {
                tracing::warn!(attempt, error = %error, "story storage failure; retrying");
                tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(attempt - 1))).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// A batch's fragment lists its scenes; anything far bigger was not written by us.
const MAX_FRAGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// `stage3 gallery`: rewrites `index.html` beside a manifest on the filesystem from the
/// manifest alone. `path` is the manifest file or the story's directory. Returns the page.
pub fn rebuild_gallery(path: &Path) -> Result<PathBuf> {
    let manifest_path = if path.is_dir() {
        path.join("manifest.json")
    } else {
        path.to_path_buf()
    };
    let unreadable = |e: &dyn std::fmt::Display| {
        Stage3Error::invalid_request(format!("{}: {e}", manifest_path.display()))
    };
    let file = std::fs::File::open(&manifest_path).map_err(|e| unreadable(&e))?;
    let size = file.metadata().map_err(|e| unreadable(&e))?.len();
    if size > MAX_MANIFEST_BYTES {
        return Err(unreadable(&format!(
            "{size} bytes; a manifest may be at most {MAX_MANIFEST_BYTES}"
        )));
    }
    let manifest: Manifest = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| unreadable(&format!("not a story manifest: {e}")))?;
    validate_story_id(&manifest.story_id)?;
    let dir = manifest_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let page_path = dir.join("index.html");
    let write_error = |e: &dyn std::fmt::Display| {
        Stage3Error::storage(format!("cannot write {}: {e}", page_path.display()), false)
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".stage3-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| write_error(&e))?;
    std::io::Write::write_all(&mut temp, gallery::render(&manifest).as_bytes())
        .map_err(|e| write_error(&e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| write_error(&e))?;
    }
    temp.persist(&page_path)
        .map_err(|e| write_error(&e.error))?;
    Ok(page_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_names_its_story_at_the_top_level_or_not_at_all() {
        let mut answer = BatchAnswer::default();
        let plain = serde_json::to_value(&answer).unwrap();
        assert!(plain.get("story_id").is_none(), "{plain}");
        assert_eq!(
            serde_json::from_value::<BatchAnswer>(plain).unwrap(),
            answer
        );

        answer.story = Some(StoryLinks {
            story_id: "fox".into(),
            manifest_path: Some("out/stories/fox/manifest.json".into()),
            gallery_path: Some("out/stories/fox/index.html".into()),
            ..StoryLinks::default()
        });
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["story_id"], "fox");
        assert_eq!(json["manifest_path"], "out/stories/fox/manifest.json");
        assert_eq!(json["gallery_path"], "out/stories/fox/index.html");
        assert!(json.get("manifest_url").is_none() && json.get("story_error").is_none());
        assert_eq!(serde_json::from_value::<BatchAnswer>(json).unwrap(), answer);
    }

    #[test]
    fn story_ids_follow_the_scene_id_rules_and_say_so() {
        validate_story_id("fox-and-owl_2.v1").unwrap();
        let err = validate_story_id("../up").unwrap_err();
        assert!(err.to_string().contains("story_id:"), "{err}");
    }

    #[tokio::test]
    async fn publishing_refuses_an_unsafe_story_id_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::FsStore::new(dir.path()).unwrap();
        let err = publish_story(&store, &UrlPolicy::Store, "a/b", Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_store_that_cannot_list_fails_the_story_not_the_batch() {
        /// A store with no `list`: the trait's default.
        struct NoList(crate::storage::FsStore);
        #[async_trait::async_trait]
        impl ObjectStore for NoList {
            async fn put(
                &self,
                key: &str,
                bytes: Bytes,
                meta: ObjectMeta,
            ) -> Result<crate::storage::ObjectInfo> {
                self.0.put(key, bytes, meta).await
            }
            async fn put_new(
                &self,
                key: &str,
                bytes: Bytes,
                meta: ObjectMeta,
            ) -> Result<crate::storage::Created> {
                self.0.put_new(key, bytes, meta).await
            }
            async fn get(&self, key: &str, limit: u64) -> Result<crate::storage::Fetched> {
                self.0.get(key, limit).await
            }
            async fn head(&self, key: &str) -> Result<Option<crate::storage::ObjectInfo>> {
                self.0.head(key).await
            }
            async fn delete(&self, key: &str) -> Result<()> {
                self.0.delete(key).await
            }
            fn location(&self, key: &str) -> String {
                self.0.location(key)
            }
            fn public_key(&self, key: &str) -> String {
                self.0.public_key(key)
            }
            async fn presigned_url(&self, key: &str) -> Result<Option<String>> {
                self.0.presigned_url(key).await
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = NoList(crate::storage::FsStore::new(dir.path()).unwrap());
        let err = publish_story(&store, &UrlPolicy::Store, "fox", Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), ErrorType::Storage);
        assert!(err.to_string().contains("cannot list"), "{err}");
    }

    #[test]
    fn the_gallery_command_rewrites_the_page_from_a_manifest_file_or_directory() {
        let dir = tempfile::tempdir().unwrap();
        let story_dir = dir.path().join("stories/fox");
        std::fs::create_dir_all(&story_dir).unwrap();
        let manifest = manifest::merge("fox", &[]);
        std::fs::write(
            story_dir.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let page = rebuild_gallery(&story_dir).unwrap();
        assert_eq!(page, story_dir.join("index.html"));
        assert_eq!(
            std::fs::read_to_string(&page).unwrap(),
            gallery::render(&manifest)
        );
        assert_eq!(
            rebuild_gallery(&story_dir.join("manifest.json")).unwrap(),
            page
        );

        std::fs::write(
            story_dir.join("manifest.json"),
            b"{\"not\": \"a manifest\"}",
        )
        .unwrap();
        let err = rebuild_gallery(&story_dir).unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
        assert!(err.to_string().contains("not a story manifest"), "{err}");
        let err = rebuild_gallery(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
    }
}
