//! Stories end to end: the manifest and storyboard page a batch with a `story_id`
//! publishes, on the filesystem and on a real S3 server, with concurrent batches, through
//! the real `stage3` binary against an OpenRouter stand-in, and in a real browser.
//!
//! The browser is Debian's `chromium`, run headless. Without it these tests say so and
//! pass only outside CI: with `CI` set, a missing browser is a failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::suite::support::config::TestConfig;
use crate::suite::support::gated_store::GatedStore;
use crate::suite::support::s3_server::S3Target;
use crate::suite::support::scripted_openrouter::{Reply, ScriptedOpenRouter};
use crate::suite::support::slow_store::SlowStore;
use crate::suite::support::sqs::{sqs_event, sqs_record};
use crate::suite::support::stage3_command;
use bytes::Bytes;
use serde_json::{json, Value};
use stage3::provider::{ImageProvider, ImageRequest, PlaceholderProvider};
use stage3::storage::{FsStore, ObjectMeta, ObjectStore};
use stage3::story::{self, Manifest, ManifestEntry, PublishSettings, SceneStatus, StoryScene};
use stage3::UrlPolicy;
use stage3::{CallBudget, Deadline};
use stage3::{ImageQuality, ImageSize};
use stage3::{ImageSpec, ModelRef, ProviderKind};
use tokio::sync::watch;

const KEY: &str = "sk-or-v1-story-test-secret-0123456789";

// ---------------------------------------------------------------------------------------
// The `stage3` binary against an OpenRouter stand-in serving placeholder drawings.

/// One scene of a test story: its request, and whether the stand-in refuses its first call.
struct Scene {
    id: &'static str,
    prompt: &'static str,
    size: ImageSize,
    refused_first: bool,
}

const STORY: &[Scene] = &[
    Scene {
        id: "scene_001",
        prompt: "A red fox wakes in a snowy forest at dawn",
        size: ImageSize::Landscape,
        refused_first: false,
    },
    Scene {
        id: "scene_002",
        prompt: "小狐狸在结冰的河边遇见一只猫头鹰",
        size: ImageSize::Square,
        refused_first: false,
    },
    Scene {
        id: "scene_003",
        prompt: "A storm breaks over the frozen lake, lightning everywhere",
        size: ImageSize::Square,
        refused_first: true,
    },
    Scene {
        id: "scene_004",
        prompt: "The owl guides the fox through a tall pine wood",
        size: ImageSize::Portrait,
        refused_first: false,
    },
    Scene {
        id: "scene_005",
        prompt: "Fox and owl share berries by a warm campfire",
        size: ImageSize::Square,
        refused_first: false,
    },
    Scene {
        id: "scene_006",
        prompt: "Morning light over the valley; the fox sets off home",
        size: ImageSize::Landscape,
        refused_first: false,
    },
];

/// The placeholder's drawing of each scene, encoded once: the stand-in serves these bytes
/// as the Image API's base64 answer, so the pictures look like the offline provider's.
async fn drawings(scenes: &[&Scene]) -> Vec<(&'static str, Vec<u8>)> {
    let provider = PlaceholderProvider::new();
    let mut out = Vec::new();
    for scene in scenes {
        let spec = ImageSpec {
            prompt: scene.prompt.into(),
            ..ImageSpec::plain(
                ModelRef::resolve("google/gemini-3.1-flash-image", ProviderKind::OpenRouter),
                scene.size,
                ImageQuality::Standard,
            )
        };
        let image = provider
            .generate(&ImageRequest {
                scene_id: scene.id,
                spec: &spec,
                model: &spec.model.model,
                budget: CallBudget::new(Duration::from_secs(30)),
                gate: None,
            })
            .await
            .unwrap();
        out.push((scene.prompt, image.bytes.to_vec()));
    }
    out
}

/// An Image API stand-in: each scene's drawing, except a scene marked `refused_first`,
/// whose first call gets OpenRouter's documented 400 `content_policy_violation`.
async fn stand_in(scenes: &[&Scene]) -> ScriptedOpenRouter {
    let drawings = drawings(scenes).await;
    let refused: Vec<&'static str> = scenes
        .iter()
        .filter(|s| s.refused_first)
        .map(|s| s.prompt)
        .collect();
    ScriptedOpenRouter::start(move |request, nth| {
        let prompt = request.prompt();
        if nth == 0 && refused.iter().any(|p| prompt.contains(p)) {
            return Reply::json(
                400,
                json!({"error": {"code": 400, "message": "Your request was flagged by the image safety filter",
                    "metadata": {"error_type": "content_policy_violation"}}}),
            );
        }
        match drawings.iter().find(|(p, _)| prompt.contains(p)) {
            Some((_, png)) => Reply::image(png, "image/png"),
            None => Reply::json(400, json!({"error": {"code": 400, "message": "unknown prompt"}})),
        }
    })
    .await
}

fn input(story_id: &str, scenes: &[&Scene]) -> Value {
    let scenes: Vec<Value> = scenes
        .iter()
        .map(|s| json!({"scene_id": s.id, "image_prompt": s.prompt, "size": s.size.as_str()}))
        .collect();
    json!({"story_id": story_id, "scenes": scenes})
}

/// Runs `stage3 generate` on `input` into `out`; returns the exit code and the answer.
async fn generate(
    server: &ScriptedOpenRouter,
    work: &Path,
    out: &Path,
    input: &Value,
) -> (i32, Value) {
    let path = work.join("input.json");
    std::fs::write(&path, serde_json::to_vec(input).unwrap()).unwrap();
    let (base_url, work, out) = (
        server.base_url.clone(),
        work.to_path_buf(),
        out.to_path_buf(),
    );
    let output = tokio::task::spawn_blocking(move || {
        stage3_command(&work)
            .env("OPENROUTER_API_KEY", KEY)
            .env("OPENROUTER_BASE_URL", base_url)
            .env("STAGE3_MODEL", "google/gemini-3.1-flash-image")
            .args([
                "generate",
                path.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains(KEY), "the key leaked: {stderr}");
    let answer =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}; stderr: {stderr}"));
    (output.status.code().unwrap_or(-1), answer)
}

fn read_manifest(path: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(manifest: &Manifest) -> Vec<&str> {
    manifest
        .scenes
        .iter()
        .map(|e| e.scene_id.as_str())
        .collect()
}

#[tokio::test]
async fn the_cli_publishes_the_story_and_later_batches_update_it() {
    let scenes: Vec<&Scene> = STORY.iter().take(4).collect();
    let server = stand_in(&scenes).await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("images");

    // Batch 1: scenes 1-3; the stand-in refuses scene 3.
    let (code, answer) = generate(&server, work.path(), &out, &input("fox", &scenes[..3])).await;
    assert_eq!(code, 1, "a refused scene makes the batch partial: {answer}");
    let manifest_path = PathBuf::from(answer["manifest_path"].as_str().unwrap());
    let gallery_path = PathBuf::from(answer["gallery_path"].as_str().unwrap());
    assert_eq!(manifest_path, out.join("stories/fox/manifest.json"));
    assert_eq!(gallery_path, out.join("stories/fox/index.html"));
    assert_eq!(answer["story_id"], "fox");
    assert!(
        answer.get("manifest_url").is_none(),
        "no URL on the filesystem store"
    );
    assert!(answer.get("story_error").is_none());

    let manifest = read_manifest(&manifest_path);
    assert_eq!(ids(&manifest), ["scene_001", "scene_002", "scene_003"]);
    assert_eq!(manifest.totals.scenes, 3);
    assert_eq!(manifest.totals.failed, 1);
    assert!(
        (manifest.totals.cost_usd - 0.08).abs() < 1e-9,
        "{}",
        manifest.totals.cost_usd
    );
    let refused = &manifest.scenes[2];
    assert_eq!(refused.status, SceneStatus::Failed);
    // The same cause as the answer's failure (how a 400 `content_policy_violation` is
    // classified is the OpenRouter client's business, not the story's).
    assert_eq!(answer["failures"][0]["scene_id"], "scene_003");
    assert_eq!(
        refused.error_type.as_deref(),
        answer["failures"][0]["error_type"].as_str()
    );
    assert!(refused
        .message
        .as_deref()
        .unwrap()
        .contains("image safety filter"));
    assert_eq!(refused.prompt, STORY[2].prompt);
    assert_eq!(refused.size, "1024x1024");
    assert_eq!(refused.model, "google/gemini-3.1-flash-image");
    let fox = &manifest.scenes[0];
    assert_eq!(fox.status, SceneStatus::Succeeded);
    assert_eq!(
        (fox.width, fox.height, fox.size.as_str()),
        (Some(1792), Some(1024), "1792x1024")
    );
    assert_eq!(fox.cost, Some(0.04));
    assert_eq!(fox.model, "google/gemini-3.1-flash-image");
    let answered_path = answer["results"][0]["image_path"].as_str().unwrap();
    assert_eq!(
        fox.image_key.as_deref(),
        Path::new(answered_path).file_name().unwrap().to_str(),
        "the manifest names the image by its key"
    );
    // The manifest and the page are public: no local path of the machine that wrote them.
    let published = [
        std::fs::read_to_string(&manifest_path).unwrap(),
        std::fs::read_to_string(&gallery_path).unwrap(),
    ];
    for text in &published {
        assert!(!text.contains("image_path") && !text.contains("thumbnail_path"));
        assert!(!text.contains(out.to_str().unwrap()), "a local path leaked");
        assert!(!text.contains(work.path().to_str().unwrap()));
    }
    assert_eq!(
        manifest.scenes[1].prompt, STORY[1].prompt,
        "Chinese text survives"
    );

    // Every stored image has a small thumbnail in `thumbnails/`, named in the answer.
    for result in answer["results"].as_array().unwrap() {
        let image = result["image_path"].as_str().unwrap();
        let thumbnail = result["thumbnail_path"].as_str().unwrap();
        let name = Path::new(image).file_name().unwrap();
        assert_eq!(Path::new(thumbnail), out.join("thumbnails").join(name));
        let decoded = image::open(thumbnail).unwrap();
        assert_eq!(decoded.width().max(decoded.height()), 320, "{thumbnail}");
        assert!(
            std::fs::metadata(thumbnail).unwrap().len() * 4
                < std::fs::metadata(image).unwrap().len()
        );
    }
    let page = std::fs::read_to_string(&gallery_path).unwrap();
    assert!(page.contains(STORY[1].prompt));
    assert!(page.contains(r#"<article class="card failed" id="scene-scene_003">"#));

    // Batch 2: scene 3 again (now drawn) and a new scene 4.
    let (code, answer) = generate(
        &server,
        work.path(),
        &out,
        &input("fox", &[scenes[2], scenes[3]]),
    )
    .await;
    assert_eq!(code, 0, "{answer}");
    let manifest = read_manifest(&manifest_path);
    assert_eq!(
        ids(&manifest),
        ["scene_001", "scene_002", "scene_003", "scene_004"]
    );
    assert_eq!(
        manifest.scenes[2].status,
        SceneStatus::Succeeded,
        "the regenerated scene replaced its failure"
    );
    assert_eq!(manifest.totals.failed, 0);
    assert_eq!(manifest.batches, 2);
    assert!((manifest.totals.cost_usd - 0.16).abs() < 1e-9);

    // `stage3 gallery` rebuilds the same page from the manifest alone.
    let published = std::fs::read(&gallery_path).unwrap();
    std::fs::remove_file(&gallery_path).unwrap();
    let story_dir = out.join("stories/fox");
    let output = stage3_command(work.path())
        .args(["gallery", story_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        gallery_path.to_str().unwrap()
    );
    assert_eq!(std::fs::read(&gallery_path).unwrap(), published);

    // A story_id that is no safe key is refused before anything is spent.
    let calls = server.total_calls();
    let (code, _) = generate_invalid(work.path(), &input("../escape", &scenes[..1])).await;
    assert_eq!(code, 2);
    assert_eq!(server.total_calls(), calls);
}

async fn generate_invalid(work: &Path, input: &Value) -> (i32, String) {
    let path = work.join("invalid.json");
    std::fs::write(&path, serde_json::to_vec(input).unwrap()).unwrap();
    let work = work.to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        stage3_command(&work)
            .env("STAGE3_PROVIDER", "placeholder")
            .args(["generate", path.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(stderr.contains("story_id"), "{stderr}");
    (output.status.code().unwrap_or(-1), stderr)
}

// ---------------------------------------------------------------------------------------
// Concurrent batches of one story, on both stores.

fn entry(scene_id: &str) -> ManifestEntry {
    let scene = StoryScene {
        scene_id: scene_id.to_string(),
        prompt: format!("the prompt of {scene_id}"),
        size: "1024x1024".into(),
        model: "test/model".into(),
    };
    let mut entry = ManifestEntry::failed(&scene, "timeout", "placeholder");
    entry.status = SceneStatus::Succeeded;
    entry.error_type = None;
    entry.message = None;
    entry.image_key = Some(format!("{scene_id}-0123456789abcdef.png"));
    entry.width = Some(1024);
    entry.height = Some(1024);
    entry.cost = Some(0.01);
    entry
}

async fn stored_manifest(store: &dyn ObjectStore, story_id: &str) -> Manifest {
    let bytes = store
        .get(&story::manifest_key(story_id), 1 << 24)
        .await
        .unwrap()
        .into_bytes("manifest", 1 << 24)
        .unwrap()
        .expect("a manifest");
    serde_json::from_slice(&bytes).unwrap()
}

/// Batch A merges while alone, then stalls before writing; batch B publishes in full;
/// A's stale manifest lands over B's. A must notice B's fragment and merge again.
async fn a_stale_writer_merges_again(store: Arc<dyn ObjectStore>) {
    // A's manifest writes wait at the gate: A is frozen between merging and writing, as a
    // slow network or a descheduled Lambda freezes it.
    let (release_tx, release_rx) = watch::channel(false);
    let slow = Arc::new(GatedStore::new(store.clone(), release_rx, |key| {
        key.ends_with("manifest.json")
    }));
    let slow_batch = {
        let slow = slow.clone();
        tokio::spawn(async move {
            story::publish_story(
                slow.as_ref(),
                &UrlPolicy::Store,
                "tale",
                vec![entry("a1"), entry("a2")],
            )
            .await
        })
    };
    // Batch A reaches its manifest write.
    slow.until_arrived(1).await;

    story::publish_story(
        store.as_ref(),
        &UrlPolicy::Store,
        "tale",
        vec![entry("b1"), entry("a2")],
    )
    .await
    .unwrap();
    assert_eq!(
        ids(&stored_manifest(store.as_ref(), "tale").await),
        ["a1", "a2", "b1"]
    );

    release_tx.send(true).unwrap();
    slow_batch.await.unwrap().unwrap();
    assert_eq!(
        slow.gated_writes(),
        2,
        "A wrote a manifest without B, saw B's fragment, and wrote again"
    );
    let manifest = stored_manifest(store.as_ref(), "tale").await;
    assert_eq!(ids(&manifest), ["a1", "a2", "b1"]);
    assert_eq!(manifest.batches, 2);
    let page = store
        .get(&story::gallery_key("tale"), 1 << 24)
        .await
        .unwrap()
        .into_bytes("page", 1 << 24)
        .unwrap()
        .unwrap();
    let page = String::from_utf8(page.to_vec()).unwrap();
    for id in ["a1", "a2", "b1"] {
        assert!(
            page.contains(&format!(r#"id="scene-{id}""#)),
            "{id} on the page"
        );
    }
}

/// Eight batches publish at once; every one's scenes end up in the manifest, each batch's
/// in its own order.
async fn many_batches_at_once_lose_nothing(store: Arc<dyn ObjectStore>) {
    const WRITERS: usize = 8;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let entries = (0..3)
                    .map(|s| entry(&format!("w{w}-s{s}")))
                    .chain([entry("shared")])
                    .collect();
                story::publish_story(store.as_ref(), &UrlPolicy::Store, "crowd", entries).await
            })
        })
        .collect();
    for task in tasks {
        let links = task.await.unwrap().unwrap();
        assert!(links.story_error.is_none());
    }
    let manifest = stored_manifest(store.as_ref(), "crowd").await;
    assert_eq!(manifest.batches, WRITERS);
    assert_eq!(manifest.totals.scenes, WRITERS * 3 + 1);
    let order = ids(&manifest);
    for w in 0..WRITERS {
        let at = |s: usize| {
            order
                .iter()
                .position(|id| *id == format!("w{w}-s{s}"))
                .unwrap_or_else(|| panic!("w{w}-s{s} missing from {order:?}"))
        };
        assert!(at(0) < at(1) && at(1) < at(2), "{order:?}");
    }
    assert_eq!(order.iter().filter(|id| **id == "shared").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_writer_merges_again_on_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    a_stale_writer_merges_again(Arc::new(FsStore::new(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_lose_nothing_on_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    many_batches_at_once_lose_nothing(Arc::new(FsStore::new(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_writer_merges_again_on_s3() {
    let target = S3Target::start().await;
    a_stale_writer_merges_again(Arc::new(target.store())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_lose_nothing_on_s3() {
    let target = S3Target::start().await;
    many_batches_at_once_lose_nothing(Arc::new(target.store())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_list_pages_through_more_than_a_thousand_keys() {
    use futures::stream::{self, StreamExt};
    let target = S3Target::start().await;
    let store = Arc::new(target.store());
    let keys: Vec<String> = (0..1_005).map(|i| format!("many/{i:05}.json")).collect();
    stream::iter(keys.clone())
        .for_each_concurrent(16, |key| {
            let store = store.clone();
            async move {
                store
                    .put(&key, Bytes::from_static(b"{}"), ObjectMeta::RECORD)
                    .await
                    .unwrap();
            }
        })
        .await;
    store
        .put(
            "other/x.json",
            Bytes::from_static(b"{}"),
            ObjectMeta::RECORD,
        )
        .await
        .unwrap();
    assert_eq!(
        store.list("many/").await.unwrap(),
        keys,
        "every key, no prefix, in order"
    );
    assert_eq!(store.list("other/").await.unwrap(), ["other/x.json"]);
    assert!(store.list("none/").await.unwrap().is_empty());

    // Each listed object carries the server's own `LastModified` and its size.
    let listed = store.list_objects("other/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].key.as_str(), listed[0].size),
        ("other/x.json", 2)
    );
    let age = std::time::SystemTime::now()
        .duration_since(listed[0].last_modified)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(300), "LastModified {age:?} ago");
    assert!(
        listed[0].last_modified > std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
        "a real time, not the fallback"
    );
}

#[tokio::test]
async fn s3_answers_name_the_manifest_and_page_by_url() {
    let target = S3Target::start().await;
    let store = target.store();
    let links = story::publish_story(
        &store,
        &UrlPolicy::Cdn {
            base: "https://img.example.com".into(),
            signer: None,
        },
        "fox",
        vec![entry("s1")],
    )
    .await
    .unwrap();
    let prefix = &target.prefix;
    assert_eq!(
        links.manifest_url.as_deref(),
        Some(format!("https://img.example.com/{prefix}stories/fox/manifest.json").as_str())
    );
    assert_eq!(
        links.gallery_url.as_deref(),
        Some(format!("https://img.example.com/{prefix}stories/fox/index.html").as_str())
    );
    assert_eq!(
        links.gallery_path.as_deref(),
        Some(format!("s3://{}/{prefix}stories/fox/index.html", target.bucket).as_str())
    );
    let head = target
        .client()
        .head_object()
        .bucket(&target.bucket)
        .key(format!("{prefix}stories/fox/index.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("text/html; charset=utf-8"));
    assert_eq!(head.cache_control(), Some("no-cache"));

    // Without a CDN base the answer carries presigned URLs; the manifest keeps none.
    let links = story::publish_story(&store, &UrlPolicy::Store, "fox", vec![entry("s2")])
        .await
        .unwrap();
    let url = links.manifest_url.unwrap();
    assert!(url.contains("X-Amz-Signature"), "{url}");
    let manifest = stored_manifest(&store, "fox").await;
    assert_eq!(ids(&manifest), ["s1", "s2"]);
}

// ---------------------------------------------------------------------------------------
// Hostile neighbours: planted fragments, clocks that run ahead (issue 22, item 2).

async fn stored_text(store: &dyn ObjectStore, key: &str) -> String {
    let bytes = store
        .get(key, 1 << 26)
        .await
        .unwrap()
        .into_bytes(key, 1 << 26)
        .unwrap()
        .unwrap_or_else(|| panic!("{key} is stored"));
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn fragment_keys(store: &dyn ObjectStore, story_id: &str) -> Vec<String> {
    store
        .list(&story::fragments_prefix(story_id))
        .await
        .unwrap()
}

/// How far `time` (RFC 3339) is from now, either way.
fn distance_from_now(time: &str) -> Duration {
    let time = humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("{time:?}: {e}"));
    let now = SystemTime::now();
    now.duration_since(time)
        .or_else(|_| time.duration_since(now))
        .unwrap()
}

/// The fragment another tenant of the bucket planted in issue 22: a name that sorts after
/// every real one, a key into another tenant's files, a cost that makes the total infinite,
/// an attacker's image, a date at the end of time, and a scene id that is markup.
fn planted_fragment(story_id: &str) -> Value {
    let far = "9999-12-31T23:59:59.999Z";
    json!({
        "format": 1, "story_id": story_id, "written_at": far,
        "scenes": [
            {"scene_id": "s1", "status": "succeeded", "prompt": "taken over", "size": "1024x1024",
             "model": "m", "image_key": "../../../../other-tenant/secret.png",
             "thumbnail_key": "../../../../other-tenant/secret.png", "updated_at": far},
            {"scene_id": "s2", "status": "succeeded", "prompt": "priceless", "size": "1024x1024",
             "model": "m", "image_key": "s2-0123456789abcdef.png", "cost": 1e308,
             "updated_at": far},
            {"scene_id": "planted", "status": "succeeded", "prompt": "an innocent scene",
             "size": "1024x1024", "model": "m",
             "image_url": "https://attacker.example/pixel.png",
             "thumbnail_url": "https://attacker.example/pixel.png",
             "image_path": "/home/victim/secret.png", "cost": null, "updated_at": far},
            {"scene_id": "<img src=\"https://attacker.example/x.png\">", "status": "succeeded",
             "prompt": "p", "size": "1024x1024", "model": "m"}
        ]
    })
}

/// Runs `stage3 gallery` on `story_dir`; returns its exit code and stderr.
fn gallery_command(workdir: &Path, story_dir: &Path) -> (i32, String) {
    let output = stage3_command(workdir)
        .args(["gallery", story_dir.to_str().unwrap()])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_planted_fragment_brings_no_foreign_link_cost_or_date_and_gallery_still_works() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("images");
    let store = FsStore::new(&out).unwrap();
    story::publish_story(
        &store,
        &UrlPolicy::Store,
        "fox",
        vec![entry("s1"), entry("s2")],
    )
    .await
    .unwrap();
    store
        .put(
            "stories/fox/batches/9999999999999-ffffffffffffffff.json",
            Bytes::from(planted_fragment("fox").to_string()),
            ObjectMeta::RECORD,
        )
        .await
        .unwrap();
    // Stories order by the store's time, and file times tick coarsely (a few ms): apart
    // by more than a tick, the planted fragment is surely the older one.
    tokio::time::sleep(Duration::from_millis(30)).await;
    story::publish_story(&store, &UrlPolicy::Store, "fox", vec![entry("s3")])
        .await
        .unwrap();

    let manifest_text = stored_text(&store, &story::manifest_key("fox")).await;
    let page = stored_text(&store, &story::gallery_key("fox")).await;
    for text in [&manifest_text, &page] {
        for planted in [
            "attacker.example",
            "other-tenant",
            "9999-12-31",
            "/home/victim",
            "taken over",
            "priceless",
        ] {
            assert!(!text.contains(planted), "{planted:?} got through:\n{text}");
        }
    }
    assert!(!page.contains("$inf") && !page.contains("NaN"));
    assert!(
        page.contains("img-src 'self';"),
        "images from the page's own origin only"
    );

    let manifest = stored_manifest(&store, "fox").await;
    // The one entry that passed every check is a scene like any other, without the URLs.
    assert_eq!(ids(&manifest), ["s1", "s2", "planted", "s3"]);
    assert_eq!(manifest.scenes[0].prompt, "the prompt of s1");
    assert_eq!(
        manifest.scenes[0].image_key.as_deref(),
        Some("s1-0123456789abcdef.png")
    );
    assert_eq!(manifest.scenes[1].cost, Some(0.01));
    let planted = &manifest.scenes[2];
    assert_eq!(
        (planted.image_key.as_ref(), planted.image_url.as_ref()),
        (None, None)
    );
    assert_eq!(planted.cost, None);
    assert!(distance_from_now(&planted.updated_at) < Duration::from_secs(600));
    assert!((manifest.totals.cost_usd - 0.03).abs() < 1e-9);
    assert!(distance_from_now(&manifest.updated_at) < Duration::from_secs(600));

    // `stage3 gallery` rebuilds the same page from the manifest.
    let story_dir = out.join("stories/fox");
    let (code, stderr) = gallery_command(work.path(), &story_dir);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(story_dir.join("index.html")).unwrap(),
        page
    );

    // A manifest as the old code left it after such a fragment: a `null` total (what JSON
    // makes of infinity), a `null` cost, a date at the end of time. The page still builds.
    let mut damaged: Value = serde_json::from_str(&manifest_text).unwrap();
    damaged["totals"]["cost_usd"] = Value::Null;
    damaged["scenes"][0]["cost"] = Value::Null;
    damaged["updated_at"] = json!("9999-12-31T23:59:59.999Z");
    std::fs::write(
        story_dir.join("manifest.json"),
        serde_json::to_vec(&damaged).unwrap(),
    )
    .unwrap();
    let (code, stderr) = gallery_command(work.path(), &story_dir);
    assert_eq!(code, 0, "{stderr}");
    let rebuilt = std::fs::read_to_string(story_dir.join("index.html")).unwrap();
    assert!(rebuilt.contains("total <b>$0.02</b>"), "{rebuilt}");
    assert!(!rebuilt.contains("9999"));
}

/// A writer whose clock runs ahead names its fragment (and dates its entries) in 2100; the
/// store wrote it before an honest batch's fragment, so the honest batch's entry wins.
async fn a_writer_whose_clock_runs_ahead_does_not_win(store: &dyn ObjectStore) {
    let ahead = "2100-01-01T00:00:00.000Z";
    let fast = json!({
        "format": 1, "story_id": "clock", "written_at": ahead,
        "scenes": [{"scene_id": "s1", "status": "succeeded", "size": "1024x1024",
                    "model": "test/model", "prompt": "from the clock that runs ahead",
                    "image_key": "s1-0123456789abcdef.png", "updated_at": ahead}]
    });
    store
        .put(
            "stories/clock/batches/4102444800000-0123456789abcdef.json",
            Bytes::from(fast.to_string()),
            ObjectMeta::RECORD,
        )
        .await
        .unwrap();
    // A store's clock may tick in whole seconds (S3 `LastModified`): let one pass.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut honest = entry("s1");
    honest.prompt = "from an honest clock".into();
    story::publish_story(store, &UrlPolicy::Store, "clock", vec![honest])
        .await
        .unwrap();

    let manifest = stored_manifest(store, "clock").await;
    assert_eq!(ids(&manifest), ["s1"]);
    assert_eq!(manifest.scenes[0].prompt, "from an honest clock");
    assert!(distance_from_now(&manifest.updated_at) < Duration::from_secs(600));
    assert!(!stored_text(store, &story::manifest_key("clock"))
        .await
        .contains("2100-"));
}

#[tokio::test]
async fn a_writer_whose_clock_runs_ahead_does_not_win_on_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::new(dir.path()).unwrap();
    a_writer_whose_clock_runs_ahead_does_not_win(&store).await;

    // Nor does a file whose modification time was set in the future: it is skipped.
    let key = "stories/clock/batches/1700000000000-00000000000000ff.json";
    let future = json!({
        "format": 1, "story_id": "clock", "written_at": "2023-11-14T22:13:20.000Z",
        "scenes": [{"scene_id": "s1", "status": "failed", "size": "1024x1024",
                    "model": "test/model", "prompt": "from the future",
                    "error_type": "timeout", "message": "m"}]
    });
    store
        .put(key, Bytes::from(future.to_string()), ObjectMeta::RECORD)
        .await
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.path().join(key))
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(86_400))
        .unwrap();
    story::publish_story(&store, &UrlPolicy::Store, "clock", vec![entry("s2")])
        .await
        .unwrap();
    let manifest = stored_manifest(&store, "clock").await;
    assert_eq!(ids(&manifest), ["s1", "s2"]);
    assert_eq!(manifest.scenes[0].prompt, "from an honest clock");
}

#[tokio::test]
async fn a_writer_whose_clock_runs_ahead_does_not_win_on_s3() {
    let target = S3Target::start().await;
    a_writer_whose_clock_runs_ahead_does_not_win(&target.store()).await;
}

// ---------------------------------------------------------------------------------------
// Compaction: merged fragments are deleted, safely (issue 22, item 3).

#[tokio::test]
async fn merged_fragments_are_deleted_once_old_and_every_scene_stays() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::new(dir.path()).unwrap();
    for batch in 0..30 {
        let mut shared = entry("shared");
        shared.cost = Some(f64::from(batch) / 100.0);
        story::publish_story(
            &store,
            &UrlPolicy::Store,
            "long",
            vec![entry(&format!("n{batch:02}")), shared],
        )
        .await
        .unwrap();
        let fragments = fragment_keys(&store, "long").await;
        assert_eq!(
            fragments.len(),
            1,
            "after batch {batch}, only its own fragment: {fragments:?}"
        );
        // An hour passes for what is stored: the fragment is now older than the grace.
        for key in fragments {
            let file = std::fs::File::options()
                .write(true)
                .open(dir.path().join(&key))
                .unwrap();
            let stored = file.metadata().unwrap().modified().unwrap();
            file.set_modified(stored - Duration::from_secs(3_600))
                .unwrap();
        }
    }
    let manifest = stored_manifest(&store, "long").await;
    let mut expected = vec!["n00".to_string(), "shared".to_string()];
    expected.extend((1..30).map(|batch| format!("n{batch:02}")));
    assert_eq!(ids(&manifest), expected);
    assert_eq!(
        manifest.batches, 30,
        "every fragment ever merged is counted"
    );
    let shared = manifest
        .scenes
        .iter()
        .find(|e| e.scene_id == "shared")
        .unwrap();
    assert_eq!(shared.cost, Some(0.29), "the last batch's entry");
    let page = stored_text(&store, &story::gallery_key("long")).await;
    assert_eq!(page.matches("<article ").count(), 31);
}

/// Two publishers of one story, ten batches each, with compaction timed short: nothing is
/// lost, and once the grace has passed one more batch leaves only its own fragment.
async fn two_publishers_compact_without_losing_a_scene(store: Arc<dyn ObjectStore>) {
    let settings = PublishSettings {
        round_limit: Duration::from_secs(1),
        grace: Duration::from_secs(3),
        ..PublishSettings::default()
    };
    let publishers: Vec<_> = (0..2)
        .map(|publisher| {
            let store = store.clone();
            tokio::spawn(async move {
                for batch in 0..10 {
                    let mut shared = entry("shared");
                    shared.cost = Some(f64::from(batch) / 100.0);
                    let entries = vec![entry(&format!("p{publisher}-b{batch}")), shared];
                    story::publish_story_with(
                        store.as_ref(),
                        &UrlPolicy::Store,
                        "pair",
                        entries,
                        &settings,
                    )
                    .await
                    .unwrap();
                    // Ten batches take longer than the grace, so some are compacted meanwhile.
                    tokio::time::sleep(Duration::from_millis(450)).await;
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let left = fragment_keys(store.as_ref(), "pair").await.len();
    assert!(
        left < 20,
        "compaction ran during the batches: {left} of 20 left"
    );

    tokio::time::sleep(settings.grace + Duration::from_millis(1_100)).await;
    story::publish_story_with(
        store.as_ref(),
        &UrlPolicy::Store,
        "pair",
        vec![entry("last")],
        &settings,
    )
    .await
    .unwrap();
    assert_eq!(
        fragment_keys(store.as_ref(), "pair").await.len(),
        1,
        "only the last batch's own fragment remains"
    );
    let manifest = stored_manifest(store.as_ref(), "pair").await;
    assert_eq!(manifest.totals.scenes, 22, "{:?}", ids(&manifest));
    assert_eq!(manifest.batches, 21);
    let order = ids(&manifest);
    for publisher in 0..2 {
        let places: Vec<usize> = (0..10)
            .map(|batch| {
                let id = format!("p{publisher}-b{batch}");
                order
                    .iter()
                    .position(|seen| *seen == id)
                    .unwrap_or_else(|| panic!("{id} is missing from {order:?}"))
            })
            .collect();
        assert!(places.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }
    assert_eq!(order.last(), Some(&"last"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_publishers_compact_without_losing_a_scene_on_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    two_publishers_compact_without_losing_a_scene(Arc::new(FsStore::new(dir.path()).unwrap()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_publishers_compact_without_losing_a_scene_on_s3() {
    let target = S3Target::start().await;
    two_publishers_compact_without_losing_a_scene(Arc::new(target.store())).await;
}

#[tokio::test]
async fn a_round_slower_than_its_limit_writes_nothing_and_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn ObjectStore> = Arc::new(FsStore::new(dir.path()).unwrap());
    // The first read of the manifest takes longer than a round may.
    let slow = SlowStore::new(fs.clone(), Duration::from_millis(400), 1, |key| {
        key.ends_with("manifest.json")
    });
    let settings = PublishSettings {
        round_limit: Duration::from_millis(200),
        ..PublishSettings::default()
    };
    story::publish_story_with(
        &slow,
        &UrlPolicy::Store,
        "slow",
        vec![entry("s1")],
        &settings,
    )
    .await
    .unwrap();
    let manifest_writes = slow
        .writes()
        .iter()
        .filter(|key| key.ends_with("manifest.json"))
        .count();
    assert_eq!(
        manifest_writes,
        1,
        "the slow round wrote nothing: {:?}",
        slow.writes()
    );
    assert_eq!(ids(&stored_manifest(fs.as_ref(), "slow").await), ["s1"]);
}

// ---------------------------------------------------------------------------------------
// Where the page's images may come from, and signed links (issue 22, items 2 and 11).

/// The `href` on `page` that starts with `start`, unescaped.
fn link_starting(page: &str, start: &str) -> String {
    let from = page
        .find(&format!("\"{start}"))
        .unwrap_or_else(|| panic!("no link starting {start:?} in {page}"));
    let rest = page.get(from + 1..).unwrap();
    rest.get(..rest.find('"').unwrap())
        .unwrap()
        .replace("&amp;", "&")
}

#[tokio::test]
async fn the_page_takes_images_only_from_its_store_or_cdn_and_signs_them_for_qiniu() {
    use md5::{Digest, Md5};
    use stage3::QiniuSigner;
    use stage3::Secret;

    let target = S3Target::start().await;
    let store = target.store();
    let prefix = &target.prefix;
    let image = "s1-0123456789abcdef.png";
    let mut drawn = entry("s1");
    drawn.thumbnail_key = Some(story::thumbnail_key(image));

    // No CDN: relative links, images from the page's own origin.
    story::publish_story(&store, &UrlPolicy::Store, "plain", vec![drawn.clone()])
        .await
        .unwrap();
    let page = stored_text(&store, &story::gallery_key("plain")).await;
    assert!(
        page.contains("img-src 'self'; script-src 'none';"),
        "{page}"
    );
    assert!(page.contains(&format!("href=\"../../{image}\"")));

    // A CDN without signing: still relative links; its origin allowed; lasting URLs in
    // the manifest.
    let cdn = UrlPolicy::Cdn {
        base: "https://img.example.com/assets".into(),
        signer: None,
    };
    story::publish_story(&store, &cdn, "open", vec![drawn.clone()])
        .await
        .unwrap();
    let page = stored_text(&store, &story::gallery_key("open")).await;
    assert!(
        page.contains("img-src 'self' https://img.example.com; script-src 'none';"),
        "{page}"
    );
    assert!(page.contains(&format!("href=\"../../{image}\"")));
    let manifest = stored_manifest(&store, "open").await;
    assert_eq!(
        manifest.scenes[0].image_url.as_deref(),
        Some(format!("https://img.example.com/assets/{prefix}{image}").as_str())
    );

    // Qiniu's timestamp anti-leech: every link on the page carries a signature.
    let signed = UrlPolicy::Cdn {
        base: "https://img.example.com".into(),
        signer: Some(QiniuSigner::new(
            Secret::new("qiniu-test-key"),
            Duration::from_secs(3_600),
        )),
    };
    story::publish_story(&store, &signed, "guarded", vec![drawn])
        .await
        .unwrap();
    let page = stored_text(&store, &story::gallery_key("guarded")).await;
    assert!(page.contains("img-src 'self' https://img.example.com;"));
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for key in [
        image.to_string(),
        story::thumbnail_key(image),
        story::manifest_key("guarded"),
    ] {
        let path = format!("/{prefix}{key}");
        let url = link_starting(&page, &format!("https://img.example.com{path}?sign="));
        let (_, query) = url.split_once('?').unwrap();
        let (sign, t) = query
            .strip_prefix("sign=")
            .and_then(|q| q.split_once("&t="))
            .unwrap_or_else(|| panic!("{url}"));
        let expires = u64::from_str_radix(t, 16).unwrap();
        assert!(
            expires.abs_diff(now + 3_600) < 120,
            "expires with STAGE3_CDN_URL_TTL_SECS: {url}"
        );
        // Qiniu's rule, computed here independently: md5(key + path + t).
        let expected = hex::encode(Md5::digest(format!("qiniu-test-key{path}{t}").as_bytes()));
        assert_eq!(sign, expected, "{url}");
    }
    assert!(
        !page.contains(&format!("\"../../{image}\"")),
        "no unsigned link"
    );
    let manifest_text = stored_text(&store, &story::manifest_key("guarded")).await;
    assert!(
        !manifest_text.contains("sign=") && !manifest_text.contains("image_url"),
        "the manifest keeps no expiring URL: {manifest_text}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn the_gallery_command_honours_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("images");
    let store = FsStore::new(&out).unwrap();
    story::publish_story(&store, &UrlPolicy::Store, "fox", vec![entry("s1")])
        .await
        .unwrap();
    let story_dir = out.join("stories/fox");
    let page = story_dir.join("index.html");
    for (umask, expected) in [("077", 0o600), ("022", 0o644)] {
        std::fs::remove_file(&page).unwrap();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" gallery \"$1\""))
            .arg(assert_cmd::cargo::cargo_bin("stage3"))
            .arg(&story_dir)
            .current_dir(work.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .status()
            .unwrap();
        assert!(status.success());
        let mode = std::fs::metadata(&page).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, expected, "umask {umask} gave {mode:o}");
    }
}

// ---------------------------------------------------------------------------------------
// The page in a real browser.

/// Debian's chromium, or `None` outside CI when it is not installed.
pub(crate) fn chromium(test: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var("STAGE3_CHROMIUM").ok(),
        Some("/usr/bin/chromium".into()),
    ];
    if let Some(found) = candidates
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .find(|p| p.exists())
    {
        return Some(found);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: chromium is not installed, and CI must run the browser tests (.ci/run installs it)");
    }
    println!(
        "{test}: SKIPPED — chromium is not installed (apt-get install chromium); CI runs this"
    );
    None
}

/// Runs headless chromium on `page` with `args` and a fresh profile; returns stdout.
pub(crate) async fn run_chromium(chromium: &Path, page: &Path, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("chromium finished within two minutes")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A test copy of `page` beside it, whose Content-Security-Policy allows inline scripts
/// but is otherwise the page's own (so images load only if the page's `img-src` lets them),
/// with a script that records, once every image has finished, how many there are and how
/// many decoded.
fn instrumented_copy(page: &Path) -> PathBuf {
    let html = std::fs::read_to_string(page).unwrap();
    assert!(
        html.contains("<meta http-equiv=\"Content-Security-Policy\""),
        "the page has a policy"
    );
    assert_eq!(
        html.matches("script-src 'none'").count(),
        1,
        "the page bans scripts"
    );
    let checker = r#"<script>
function stage3Check() {
  const images = Array.from(document.images);
  const done = images.filter(i => i.complete);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  if (done.length < images.length) setTimeout(stage3Check, 50);
  else document.body.dataset.settled = "yes";
}
window.addEventListener("load", stage3Check);
</script>
</body>"#;
    let instrumented = html
        .replace("script-src 'none'", "script-src 'unsafe-inline'")
        .replace("</body>", checker);
    let copy = page.with_file_name("instrumented-index.html");
    std::fs::write(&copy, instrumented).unwrap();
    copy
}

fn body_attribute(dom: &str, name: &str) -> Option<String> {
    let body = &dom[dom.find("<body")?..];
    let body = &body[..body.find('>')?];
    let start = body.find(&format!("{name}=\""))? + name.len() + 2;
    Some(body[start..start + body[start..].find('"')?].to_string())
}

#[tokio::test]
async fn the_storyboard_loads_every_image_in_headless_chromium() {
    let Some(chromium) = chromium("the_storyboard_loads_every_image_in_headless_chromium") else {
        return;
    };
    let scenes: Vec<&Scene> = STORY.iter().collect();
    let server = stand_in(&scenes).await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("images");
    let (code, answer) = generate(&server, work.path(), &out, &input("fox-and-owl", &scenes)).await;
    assert_eq!(code, 1, "one scene is refused: {answer}");
    let page = PathBuf::from(answer["gallery_path"].as_str().unwrap());

    let copy = instrumented_copy(&page);
    let dom = run_chromium(
        &chromium,
        &copy,
        &[
            "--virtual-time-budget=10000".into(),
            "--run-all-compositor-stages-before-draw".into(),
            "--window-size=1280,900".into(),
            "--dump-dom".into(),
        ],
    )
    .await;
    assert_eq!(
        body_attribute(&dom, "data-settled").as_deref(),
        Some("yes"),
        "{dom}"
    );
    assert_eq!(
        body_attribute(&dom, "data-images").as_deref(),
        Some("5"),
        "five drawn scenes"
    );
    assert_eq!(
        body_attribute(&dom, "data-loaded").as_deref(),
        Some("5"),
        "every thumbnail decoded"
    );
    assert!(dom.contains(STORY[1].prompt));

    // The page as published, for people to look at.
    let screenshot = work.path().join("storyboard.png");
    run_chromium(
        &chromium,
        &page,
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,900".into(),
            "--virtual-time-budget=10000".into(),
        ],
    )
    .await;
    let shot = image::open(&screenshot).unwrap();
    assert_eq!((shot.width(), shot.height()), (1280, 900));
    if let Ok(keep) = std::env::var("STAGE3_STORYBOARD_SCREENSHOT") {
        std::fs::copy(&screenshot, &keep).unwrap();
        println!("storyboard screenshot kept at {keep}");
    }
}

#[tokio::test]
async fn hostile_prompts_stay_text_in_headless_chromium() {
    let Some(chromium) = chromium("hostile_prompts_stay_text_in_headless_chromium") else {
        return;
    };
    let hostile = r#"<script>document.body.dataset.pwned = "script"</script><img src=x onerror="document.body.dataset.pwned = 'onerror'">"#;
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::new(dir.path()).unwrap();
    let mut drawn = entry("drawn");
    drawn.prompt = hostile.into();
    let mut failed = ManifestEntry::failed(
        &StoryScene {
            scene_id: "failed".into(),
            prompt: hostile.into(),
            size: "1024x1024".into(),
            model: "m".into(),
        },
        "content_policy",
        hostile,
    );
    failed.error_type = Some(hostile.into());
    let links = story::publish_story(&store, &UrlPolicy::Store, "hostile", vec![drawn, failed])
        .await
        .unwrap();
    let page = PathBuf::from(links.gallery_path.unwrap());
    // The instrumented copy allows scripts: only escaping stands between the prompt and the DOM.
    let copy = instrumented_copy(&page);
    let dom = run_chromium(
        &chromium,
        &copy,
        &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
    )
    .await;
    assert_eq!(
        body_attribute(&dom, "data-settled").as_deref(),
        Some("yes"),
        "the checker ran: {dom}"
    );
    assert_eq!(body_attribute(&dom, "data-pwned"), None, "{dom}");
    assert_eq!(
        body_attribute(&dom, "data-images").as_deref(),
        Some("1"),
        "only the scene's own image"
    );
    assert!(
        dom.contains("&lt;script&gt;document.body.dataset.pwned"),
        "shown as text"
    );
}

// ---------------------------------------------------------------------------------------
// The Lambda function: direct batches and SQS records of one story, at the same time.

fn lambda_service(target: &S3Target) -> stage3::Stage3Service {
    TestConfig::new().s3(target).service_with(
        Arc::new(PlaceholderProvider::new()),
        Arc::new(target.store()),
    )
}

fn lambda_scene(id: &str) -> Value {
    json!({"scene_id": id, "image_prompt": format!("{id}: a lantern in the fog")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_lambda_invocations_of_one_story_finishing_together_lose_nothing() {
    let target = S3Target::start().await;
    // Two invocations, as two Lambda sandboxes: each its own service and S3 client.
    let (first, second) = (lambda_service(&target), lambda_service(&target));
    let direct = json!({"story_id": "tale", "scenes": [lambda_scene("d1"), lambda_scene("d2")]});
    let one = json!({"story_id": "tale", "scenes": [lambda_scene("q1")]});
    let two = json!({"story_id": "tale", "scenes": [lambda_scene("q2"), lambda_scene("q3")]});
    let loose = json!({"scenes": [lambda_scene("loose")]});
    let queued = sqs_event(vec![
        sqs_record("m1", &one.to_string()),
        sqs_record("m2", &two.to_string()),
        sqs_record("m3", &loose.to_string()),
    ]);
    let (direct_answer, queue_answer) = tokio::join!(
        stage3::lambda::handle(&first, direct, Deadline::NONE),
        stage3::lambda::handle(&second, queued, Deadline::NONE)
    );
    let direct_answer = direct_answer.unwrap();
    assert_eq!(queue_answer.unwrap()["batchItemFailures"], json!([]));

    assert_eq!(direct_answer["story_id"], "tale");
    let prefix = &target.prefix;
    assert_eq!(
        direct_answer["gallery_path"],
        format!("s3://{}/{prefix}stories/tale/index.html", target.bucket)
    );
    let manifest_url = direct_answer["manifest_url"].as_str().unwrap();
    assert!(
        manifest_url.contains(&format!("{prefix}stories/tale/manifest.json")),
        "{manifest_url}"
    );
    assert!(direct_answer["gallery_url"]
        .as_str()
        .unwrap()
        .contains("index.html"));

    let store = target.store();
    let manifest = stored_manifest(&store, "tale").await;
    let mut scene_ids = ids(&manifest);
    scene_ids.sort();
    assert_eq!(
        scene_ids,
        ["d1", "d2", "q1", "q2", "q3"],
        "every invocation's scenes, no loose one"
    );
    assert_eq!(manifest.batches, 2, "one fragment per invocation");
    for entry in &manifest.scenes {
        assert_eq!(entry.status, SceneStatus::Succeeded);
        let thumbnail = entry.thumbnail_key.as_deref().expect("a thumbnail");
        let png = store
            .get(thumbnail, 1 << 24)
            .await
            .unwrap()
            .into_bytes("thumbnail", 1 << 24)
            .unwrap()
            .expect("the thumbnail is stored");
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 320));
        assert!(
            entry.image_url.is_none(),
            "presigned URLs expire: not kept in the manifest"
        );
    }
}
