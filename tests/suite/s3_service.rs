//! The whole service over S3: URLs, the result cache and failures, against a real S3 server.
//!
//! The scripted provider stands in for OpenRouter, counting calls and returning a real,
//! noisy PNG of the requested size, so what is measured is the service's use of the bucket: which keys it
//! writes, what `image_url` it returns, and that a stored result is never paid for twice.
//! By default the bucket is an in-process `s3s-fs`; see `support/s3_server.rs` for running
//! against a real MinIO, Qiniu or Garage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::suite::support::config::TestConfig;
use crate::suite::support::gated_store::GatedStore;
use crate::suite::support::noisy_png;
use crate::suite::support::s3_server::S3Target;
use crate::suite::support::scripted_provider::{Answer, ScriptedProvider};
use stage3::storage::ObjectStore;
use stage3::ErrorType;
use stage3::{GenerationRequest, RunOptions};
use tokio::sync::{watch, Mutex};

const PUBLIC_BASE: &str = "https://img.example.com";

/// The stand-in provider: a noisy PNG (as large as a real picture), different at every
/// call, of the one size every request here asks for, the default 1024×1024.
fn provider() -> Arc<ScriptedProvider> {
    let drawn = AtomicU64::new(0);
    Arc::new(ScriptedProvider::new(move |_, _| {
        Answer::png(noisy_png(1024, 1024, drawn.fetch_add(1, Ordering::SeqCst)))
    }))
}

/// The service's configuration for `target`: one scene at a time, and quick storage
/// retries so failures end fast.
fn config_for(target: &S3Target, public_base: Option<&str>) -> TestConfig {
    let config = TestConfig::new()
        .s3(target)
        .set("STAGE3_CONCURRENCY", "1")
        .set("STAGE3_MAX_RETRIES", "2");
    match public_base {
        Some(base) => config.set("STAGE3_PUBLIC_BASE_URL", base),
        None => config,
    }
}

fn request(scene_id: &str, prompt: &str) -> GenerationRequest {
    serde_json::from_value(serde_json::json!({
        "scene_id": scene_id,
        "image_prompt": prompt,
        "style_tags": ["watercolor"],
    }))
    .unwrap()
}

/// The object key of a stored image, from its `image_path` (`s3://bucket/key`).
fn object_key_of(target: &S3Target, image_path: &str) -> String {
    image_path
        .strip_prefix(&format!("s3://{}/", target.bucket))
        .unwrap_or_else(|| panic!("{image_path} is not in the bucket"))
        .to_string()
}

#[tokio::test]
async fn image_url_is_the_public_base_and_the_prefixed_key() {
    let target = S3Target::start().await;
    let provider = provider();
    let service = config_for(&target, Some(PUBLIC_BASE))
        .service_with(provider.clone(), Arc::new(target.store()));

    let output = service
        .generate_scene_image(request("scene_001", "a lighthouse at dusk"))
        .await
        .unwrap();

    let key = object_key_of(&target, &output.image_path);
    assert!(key.starts_with(&target.prefix), "{key}");
    assert!(key.ends_with(".png"), "{key}");
    assert_eq!(output.image_url, Some(format!("{PUBLIC_BASE}/{key}")));
    assert_eq!((output.width, output.height), (1024, 1024));

    // Both the image and its record are really in the bucket.
    let client = target.client();
    let head = client
        .head_object()
        .bucket(&target.bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/png"));
    assert_eq!(
        head.content_length(),
        Some(output.generation_params.bytes as i64)
    );
    let record_key = format!(
        "{}scene_001-{}.json",
        target.prefix,
        &output.generation_params.request_hash[..16]
    );
    let record = client
        .get_object()
        .bucket(&target.bucket)
        .key(&record_key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let stored: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(stored["image_path"], output.image_path);
    assert_eq!(provider.calls(), 1);
}

#[tokio::test]
async fn without_a_public_base_image_url_is_a_working_presigned_url() {
    let target = S3Target::start().await;
    let store = Arc::new(target.store());
    let service = config_for(&target, None).service_with(provider(), store.clone());

    let output = service
        .generate_scene_image(request("scene_001", "a lighthouse at dusk"))
        .await
        .unwrap();

    let url = output.image_url.expect("a presigned URL");
    if target.path_style {
        assert!(url.starts_with(&target.endpoint), "{url}");
    }
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let served = response.bytes().await.unwrap();
    let key = object_key_of(&target, &output.image_path);
    let stored = store
        .get(key.strip_prefix(&target.prefix).unwrap(), 1 << 26)
        .await
        .unwrap();
    let stage3::storage::Fetched::Found(stored) = stored else {
        panic!("the image is not in the bucket: {stored:?}");
    };
    assert_eq!(served, stored);
    assert_eq!(served.len() as u64, output.generation_params.bytes);
    assert!(served.starts_with(b"\x89PNG\r\n\x1a\n"));
}

#[tokio::test]
async fn a_second_identical_run_is_a_cache_hit_without_provider_calls() {
    let target = S3Target::start().await;
    let provider = provider();
    let service = config_for(&target, Some(PUBLIC_BASE))
        .service_with(provider.clone(), Arc::new(target.store()));
    let batch = vec![
        request("scene_001", "a lighthouse at dusk"),
        request("scene_002", "a fox in the snow"),
    ];

    let first = service.generate_all_images(batch.clone()).await;
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    assert_eq!(provider.calls(), 2);

    // A fresh service, as a new Lambda sandbox would be: only the bucket remembers.
    let service = config_for(&target, Some(PUBLIC_BASE))
        .service_with(provider.clone(), Arc::new(target.store()));
    let second = service.generate_all_images(batch).await;

    assert!(second.failures.is_empty(), "{:?}", second.failures);
    assert_eq!(
        provider.calls(),
        2,
        "the cache hit must not call the provider"
    );
    assert_eq!(second.results.len(), 2);
    for (a, b) in first.results.iter().zip(&second.results) {
        assert_eq!(a.image_url, b.image_url);
        assert_eq!(a.image_path, b.image_path);
        assert_eq!(
            a.generation_params.content_sha256,
            b.generation_params.content_sha256
        );
    }
}

#[tokio::test]
async fn a_changed_prompt_gets_a_new_key_and_keeps_the_old_image() {
    let target = S3Target::start().await;
    let provider = provider();
    let store = Arc::new(target.store());
    let service =
        config_for(&target, Some(PUBLIC_BASE)).service_with(provider.clone(), store.clone());

    let before = service
        .generate_scene_image(request("scene_001", "a lighthouse at dusk"))
        .await
        .unwrap();
    let after = service
        .generate_scene_image(request("scene_001", "a lighthouse at dawn"))
        .await
        .unwrap();

    assert_eq!(provider.calls(), 2);
    assert_ne!(before.image_path, after.image_path);
    assert_ne!(before.image_url, after.image_url);
    for output in [&before, &after] {
        let key = object_key_of(&target, &output.image_path);
        let key = key.strip_prefix(&target.prefix).unwrap();
        assert!(key.starts_with("scene_001-"), "{key}");
        assert!(store.exists(key).await.unwrap(), "{key}");
    }
}

// Multi-threaded for `block_in_place` below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_going_away_mid_batch_fails_scenes_with_storage_and_no_dangling_records() {
    let target = Arc::new(Mutex::new(S3Target::start().await));
    if !target.lock().await.is_local() {
        println!(
            "the_server_going_away_mid_batch...: skipped, the S3 endpoint is remote and \
             cannot be stopped"
        );
        return;
    }
    let (config, store) = {
        let target = target.lock().await;
        (config_for(&target, Some(PUBLIC_BASE)), target.store())
    };
    // scene_002's image is made, but its write waits for the gate. When scene_001 is
    // done, the bucket goes away and the gate opens. The stop blocks this callback, and
    // with it the batch, so scene_003 only starts once the bucket is gone.
    let (bucket_gone, gone) = watch::channel(false);
    let store = GatedStore::new(Arc::new(store), gone, |key| {
        key.starts_with("scene_002-") && key.ends_with(".png")
    });
    let provider = provider();
    let service = config.service_with(provider.clone(), Arc::new(store));

    let stop_after_first = |scene_id: &str, _: std::result::Result<&_, &_>| {
        if scene_id == "scene_001" {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    target.lock().await.stop("server going away").await;
                })
            });
            bucket_gone.send_replace(true);
        }
    };
    let answer = service
        .run_batch(
            service
                .prepare_all(vec![
                    request("scene_001", "a lighthouse at dusk"),
                    request("scene_002", "a fox in the snow"),
                    request("scene_003", "a ship in a storm"),
                ])
                .unwrap(),
            &RunOptions::default(),
            &stop_after_first,
        )
        .await;

    assert_eq!(answer.results.len(), 1, "{:?}", answer.failures);
    assert_eq!(answer.results[0].scene_id, "scene_001");
    let failed: Vec<_> = answer
        .failures
        .iter()
        .map(|f| (f.scene_id.as_str(), f.error_type))
        .collect();
    assert_eq!(
        failed,
        [
            ("scene_002", ErrorType::Storage),
            ("scene_003", ErrorType::Storage)
        ]
    );
    // scene_003's cache lookup already failed, so nothing was generated (or paid) for it.
    assert_eq!(provider.calls(), 2);

    // Bring the bucket back and look: every record points at an image that exists, and
    // only the scene that succeeded has one.
    let mut target = target.lock().await;
    target.restart().await;
    let client = target.client();
    let listing = client
        .list_objects_v2()
        .bucket(&target.bucket)
        .prefix(&target.prefix)
        .send()
        .await
        .unwrap();
    let keys: Vec<String> = listing
        .contents()
        .iter()
        .filter_map(|object| object.key().map(str::to_string))
        .collect();
    let records: Vec<&String> = keys.iter().filter(|k| k.ends_with(".json")).collect();
    assert_eq!(records.len(), 1, "{keys:?}");
    assert!(records[0].contains("scene_001-"), "{keys:?}");
    for record in records {
        let body = client
            .get_object()
            .bucket(&target.bucket)
            .key(record)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        let output: stage3::Stage3Output = serde_json::from_slice(&body).unwrap();
        let image = object_key_of(&target, &output.image_path);
        assert!(keys.contains(&image), "{record} has no image in {keys:?}");
    }
    // The only other object may be scene_002's claim, which could not be released while
    // the bucket was gone; it lapses by itself. No image lacks its record.
    for key in &keys {
        assert!(
            key.ends_with(".json") || key.ends_with(".claim") || key.contains("scene_001-"),
            "{key} is left without a record in {keys:?}"
        );
    }
}
