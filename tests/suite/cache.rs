//! The result cache under attack and under load: edited records, swapped images, forced
//! regenerations, two workers given the same scene, a store that hangs past the deadline.
//! Everything runs the real service over the real filesystem store or a real S3 server.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::suite::support::config::TestConfig;
use crate::suite::support::gated_store::GatedStore;
use crate::suite::support::s3_server::S3Target;
use crate::suite::support::scripted_provider::{Answer, ScriptedProvider};
use serde_json::Value;
use stage3::cache::ClaimTiming;
use stage3::storage::{FsStore, ObjectStore};
use stage3::Deadline;
use stage3::ErrorType;
use stage3::{GenerationRequest, Stage2Output};
use stage3::{RunOptions, Stage3Service};

fn request(scene_id: &str) -> GenerationRequest {
    Stage2Output {
        scene_id: scene_id.into(),
        image_prompt: "A lighthouse on a cliff at dusk".into(),
        negative_prompt: String::new(),
        style_tags: vec![],
        characters_in_scene: vec![],
    }
    .into()
}

fn fs_service(out: &Path, provider: Arc<ScriptedProvider>) -> Stage3Service {
    TestConfig::new()
        .out(out)
        .service_with(provider, Arc::new(FsStore::new(out).unwrap()))
}

fn record_path(out: &Path) -> std::path::PathBuf {
    let records: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    records[0].clone()
}

fn edit_record(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut record: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut record);
    std::fs::write(path, serde_json::to_vec(&record).unwrap()).unwrap();
}

#[tokio::test]
async fn an_edited_record_cannot_change_the_answer() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let service = fs_service(out.path(), provider.clone());
    let first = service.generate_scene_image(request("s1")).await.unwrap();
    let record = record_path(out.path());

    // Paths, scene ids and options are derived from the request, never from the record.
    edit_record(&record, |r| {
        r["scene_id"] = "someone_else".into();
        r["image_path"] = "/etc/shadow".into();
        r["image_url"] = "https://evil.example.com/x.png".into();
        r["generation_params"]["prompt"] = "something else".into();
    });
    let hit = service.generate_scene_image(request("s1")).await.unwrap();
    assert_eq!(provider.calls(), 1, "still a hit");
    assert!(hit.from_cache);
    assert_eq!(hit.scene_id, "s1");
    assert_eq!(hit.image_path, first.image_path);
    assert_eq!(hit.image_url, None);
    assert_eq!(hit.generation_params.prompt, first.generation_params.prompt);

    // What cannot be derived is checked against the image: a wrong size is a miss.
    edit_record(&record, |r| r["width"] = 1.into());
    let regenerated = service.generate_scene_image(request("s1")).await.unwrap();
    assert_eq!(provider.calls(), 2, "an implausible record is a miss");
    assert!(!regenerated.from_cache);
    assert_eq!(regenerated.width, first.width);
}

#[tokio::test]
async fn a_swapped_image_is_a_miss_and_is_never_served() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let service = fs_service(out.path(), provider.clone());
    let first = service.generate_scene_image(request("s1")).await.unwrap();

    std::fs::write(&first.image_path, b"<html>not a picture</html>").unwrap();
    let again = service.generate_scene_image(request("s1")).await.unwrap();
    assert_eq!(provider.calls(), 2, "the swapped image was not believed");
    let stored = std::fs::read(&again.image_path).unwrap();
    assert!(stored.starts_with(b"\x89PNG"));

    // A symbolic link where the image was is refused as well, not followed.
    #[cfg(unix)]
    {
        let secret = out.path().join("secret.txt");
        std::fs::write(&secret, b"top secret").unwrap();
        std::fs::remove_file(&again.image_path).unwrap();
        std::os::unix::fs::symlink(&secret, &again.image_path).unwrap();
        let result = service.generate_scene_image(request("s1")).await;
        assert!(result.is_err() || provider.calls() == 3, "{result:?}");
        assert_eq!(std::fs::read(&secret).unwrap(), b"top secret");
    }
}

#[tokio::test]
async fn a_relative_output_directory_records_absolute_paths() {
    let out = tempfile::tempdir_in(".").unwrap();
    let relative = Path::new(".").join(out.path().file_name().unwrap());
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let service = fs_service(&relative, provider);
    let output = service.generate_scene_image(request("s1")).await.unwrap();
    assert!(
        Path::new(&output.image_path).is_absolute(),
        "{}",
        output.image_path
    );
    let record: Value =
        serde_json::from_slice(&std::fs::read(record_path(out.path())).unwrap()).unwrap();
    assert!(Path::new(record["image_path"].as_str().unwrap()).is_absolute());
}

#[tokio::test]
async fn forced_regeneration_publishes_new_bytes_under_a_new_key() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO).varying());
    let service = fs_service(out.path(), provider.clone());
    let first = service.generate_scene_image(request("s1")).await.unwrap();
    let first_bytes = std::fs::read(&first.image_path).unwrap();

    let forced = RunOptions {
        force: Some(true),
        ..RunOptions::default()
    };
    let scene = service.prepare(request("s1")).unwrap();
    let second = service.run_scene(&scene, &forced).await.unwrap();
    assert_eq!(provider.calls(), 2);
    assert_ne!(second.image_path, first.image_path, "new bytes, new key");
    assert_eq!(
        std::fs::read(&first.image_path).unwrap(),
        first_bytes,
        "a published image never changes"
    );
    // The record points at the current image, which matches it.
    let hit = service.generate_scene_image(request("s1")).await.unwrap();
    assert!(hit.from_cache);
    assert_eq!(hit.image_path, second.image_path);
    assert_eq!(
        hit.generation_params.content_sha256,
        second.generation_params.content_sha256
    );
}

/// Two workers (two services, as two Lambda sandboxes would be) given the same scene at
/// the same moment pay for it once, and both answer with the one result.
///
/// `stagger` starts the second worker a little later: s3s-fs checks `If-None-Match` before it
/// writes rather than atomically, so two creates in the same millisecond both pass there
/// (AWS S3 and the filesystem store decide atomically, and get no stagger).
async fn two_workers_pay_once(store: Arc<dyn ObjectStore>, out: &Path, stagger: Duration) {
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::from_millis(1500)));
    let config = TestConfig::new().out(out);
    let a = config.service_with(provider.clone(), store.clone());
    let b = config.service_with(provider.clone(), store.clone());
    let (left, right) = tokio::join!(a.generate_scene_image(request("s1")), async {
        tokio::time::sleep(stagger).await;
        b.generate_scene_image(request("s1")).await
    });
    let (left, right) = (left.unwrap(), right.unwrap());
    assert_eq!(
        provider.calls(),
        1,
        "the second worker waited for the first"
    );
    assert_eq!(left.image_path, right.image_path);
    assert_eq!(
        left.generation_params.content_sha256,
        right.generation_params.content_sha256
    );
    assert!(
        left.from_cache != right.from_cache,
        "one generated, one was served"
    );
}

// On a paused clock: the generation's 1.5 s and the waiting worker's polls take no real
// time (the filesystem's blocking calls hold the clock still while they run).
#[tokio::test(start_paused = true)]
async fn two_workers_on_the_filesystem_pay_once() {
    let out = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::new(out.path()).unwrap());
    two_workers_pay_once(store, out.path(), Duration::ZERO).await;
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".claim") || name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn two_workers_on_s3_pay_once_where_conditional_writes_are_honoured() {
    let target = S3Target::start().await;
    if !target.is_local() {
        // Garage and Qiniu ignore `If-None-Match`; there both workers pay (documented).
        eprintln!("skipped: conditional writes are only guaranteed on the in-process server");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    two_workers_pay_once(
        Arc::new(target.store()),
        out.path(),
        Duration::from_millis(300),
    )
    .await;
    let listed = target
        .client()
        .list_objects_v2()
        .bucket(&target.bucket)
        .send()
        .await
        .unwrap();
    let claims: Vec<_> = listed
        .contents()
        .iter()
        .filter_map(|object| object.key())
        .filter(|key| key.ends_with(".claim"))
        .collect();
    assert!(claims.is_empty(), "claims left behind: {claims:?}");
}

#[tokio::test(start_paused = true)]
async fn a_store_that_hangs_is_cut_off_at_the_deadline_and_nothing_is_paid() {
    let out = tempfile::tempdir().unwrap();
    let (_gate_open, gate) = tokio::sync::watch::channel(false);
    let store = Arc::new(GatedStore::new(
        Arc::new(FsStore::new(out.path()).unwrap()),
        gate,
        |key| key.ends_with(".claim"),
    ));
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let service = TestConfig::new()
        .out(out.path())
        .service_with(provider.clone(), store);
    let scene = service.prepare(request("s1")).unwrap();
    let options = RunOptions {
        deadline: Deadline::after(Duration::from_millis(800)),
        force: None,
        stop: None,
    };
    let started = tokio::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), service.run_scene(&scene, &options))
        .await
        .expect("the hung store call ended with the deadline")
        .unwrap_err();
    assert_eq!(err.error_type(), ErrorType::DeadlineExceeded, "{err}");
    // The paused clock moves only by timers: the hung call was cut at the deadline itself.
    assert_eq!(started.elapsed(), Duration::from_millis(800));
    assert_eq!(provider.calls(), 0);
}

fn pixels(path: &str) -> Vec<u8> {
    image::open(path).unwrap().into_rgba8().into_raw()
}

#[tokio::test]
async fn label_changes_relabel_the_stored_image_and_never_pay_again() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let store: Arc<dyn ObjectStore> = Arc::new(FsStore::new(out.path()).unwrap());
    let service = |extra: &[(&str, &str)]| {
        TestConfig::new()
            .out(out.path())
            .set_all(extra)
            .service_with(provider.clone(), store.clone())
    };

    // The implicit label is on by default, names the unlabelled image, keeps its pixels.
    let labelled = service(&[("STAGE3_AIGC_PRODUCER", "ACME-91310000")])
        .generate_scene_image(request("s1"))
        .await
        .unwrap();
    let applied = labelled.generation_params.aigc_label.clone().unwrap();
    assert!(applied.implicit && !applied.visible);
    let stored = std::fs::read(&labelled.image_path).unwrap();
    let label = stage3::read_aigc_label(&stored).unwrap();
    assert_eq!(label.label, "1");
    assert_eq!(label.content_producer, "ACME-91310000");
    assert_eq!(label.produce_id, applied.source_sha256);
    let source = stage3::strip_aigc_label(&stored).unwrap();
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&source)),
        applied.source_sha256
    );
    let original_pixels = pixels(&labelled.image_path);

    // Turning the visible mark on relabels the stored result: no call, new bytes, new key.
    let marked = service(&[
        ("STAGE3_AIGC_PRODUCER", "ACME-91310000"),
        ("STAGE3_VISIBLE_LABEL", "1"),
    ])
    .generate_scene_image(request("s1"))
    .await
    .unwrap();
    assert_eq!(provider.calls(), 1, "relabelled, not regenerated");
    assert!(marked.from_cache);
    assert!(
        marked
            .generation_params
            .aigc_label
            .as_ref()
            .unwrap()
            .visible
    );
    assert_ne!(marked.image_path, labelled.image_path);
    assert_ne!(pixels(&marked.image_path), original_pixels);
    assert_eq!(
        pixels(&labelled.image_path),
        original_pixels,
        "the earlier image is never changed"
    );

    // And off again, from the kept source: the original pixels, still no call.
    let unmarked = service(&[("STAGE3_AIGC_LABEL", "off")])
        .generate_scene_image(request("s1"))
        .await
        .unwrap();
    assert_eq!(provider.calls(), 1);
    assert_eq!(pixels(&unmarked.image_path), original_pixels);
    let bytes = std::fs::read(&unmarked.image_path).unwrap();
    assert!(stage3::read_aigc_label(&bytes).is_none());
    let again = service(&[("STAGE3_AIGC_LABEL", "off")])
        .generate_scene_image(request("s1"))
        .await
        .unwrap();
    assert_eq!(
        again.image_path, unmarked.image_path,
        "settled: a plain hit"
    );
    assert_eq!(provider.calls(), 1);
}

/// A PNG chunk: length, type, data, CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&crc.finalize().to_be_bytes());
    chunk
}

/// Results stored before the label followed the TC260 guide carry a bare `AIGC` text chunk
/// that detection tools do not read. A rerun relabels them to the XMP form from their
/// source: no provider call, a new content address, and the earlier key keeps its bytes.
#[tokio::test]
async fn images_labelled_in_the_earlier_form_are_relabelled_without_a_call() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let store: Arc<dyn ObjectStore> = Arc::new(FsStore::new(out.path()).unwrap());
    let service = |extra: &[(&str, &str)]| {
        TestConfig::new()
            .out(out.path())
            .set_all(extra)
            .service_with(provider.clone(), store.clone())
    };
    // The unlabelled source, as the provider drew it.
    let plain = service(&[("STAGE3_AIGC_LABEL", "off")])
        .generate_scene_image(request("s1"))
        .await
        .unwrap();
    let source = std::fs::read(&plain.image_path).unwrap();
    let source_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&source));

    // What this service stored before: the source with an `AIGC` iTXt chunk after IHDR,
    // and a record whose label names no form.
    let mut legacy_text = b"AIGC\0\0\0\0\0".to_vec();
    legacy_text.extend_from_slice(
        format!(r#"{{"Label":"1","ContentProducer":"stage3","ProduceID":"{source_sha}","ReservedCode1":"","ContentPropagator":"","PropagateID":"","ReservedCode2":""}}"#)
            .as_bytes(),
    );
    let mut legacy = source[..33].to_vec();
    legacy.extend_from_slice(&png_chunk(b"iTXt", &legacy_text));
    legacy.extend_from_slice(&source[33..]);
    let legacy_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&legacy));
    let legacy_path = out.path().join(format!("s1-{}.png", &legacy_sha[..16]));
    std::fs::write(&legacy_path, &legacy).unwrap();
    let record_file = record_path(out.path());
    let mut record: Value = serde_json::from_slice(&std::fs::read(&record_file).unwrap()).unwrap();
    record["image_path"] = legacy_path.to_str().unwrap().into();
    record["generation_params"]["content_sha256"] = legacy_sha.clone().into();
    record["generation_params"]["bytes"] = legacy.len().into();
    record["generation_params"]["aigc_label"] = serde_json::json!({
        "implicit": true, "visible": false, "producer": "stage3", "source_sha256": source_sha
    });
    std::fs::write(&record_file, serde_json::to_vec(&record).unwrap()).unwrap();

    let relabelled = service(&[])
        .generate_scene_image(request("s1"))
        .await
        .unwrap();
    assert_eq!(provider.calls(), 1, "relabelled, never paid for again");
    assert!(relabelled.from_cache);
    assert_ne!(relabelled.image_path, legacy_path.to_str().unwrap());
    let published = std::fs::read(&relabelled.image_path).unwrap();
    let label = stage3::read_aigc_label(&published).expect("the TC260 XMP label");
    assert_eq!(label.produce_id, source_sha);
    assert_eq!(stage3::count_aigc_labels(&published), 1);
    assert!(
        !published.windows(5).any(|w| w == b"AIGC\0"),
        "no AIGC text chunk remains"
    );
    assert_eq!(
        std::fs::read(&legacy_path).unwrap(),
        legacy,
        "the earlier key keeps its bytes"
    );
    let applied = relabelled.generation_params.aigc_label.unwrap();
    assert_eq!(applied.implicit_form.as_deref(), Some("tc260-xmp"));
    // Settled: the next run is a plain hit.
    let again = service(&[])
        .generate_scene_image(request("s1"))
        .await
        .unwrap();
    assert_eq!(again.image_path, relabelled.image_path);
    assert_eq!(provider.calls(), 1);
}

/// A neighbour sharing the bucket edits a record so its label names a two-digit "hash". The
/// next run must treat the record as a miss and draw again, never panic on it.
#[tokio::test]
async fn a_record_with_an_edited_label_hash_is_a_miss_not_a_panic() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let service = TestConfig::new()
        .out(out.path())
        .set("STAGE3_VISIBLE_LABEL", "1")
        .service_with(
            provider.clone(),
            Arc::new(FsStore::new(out.path()).unwrap()),
        );
    service.generate_scene_image(request("s1")).await.unwrap();
    let record_file = record_path(out.path());
    let mut record: Value = serde_json::from_slice(&std::fs::read(&record_file).unwrap()).unwrap();
    record["generation_params"]["aigc_label"] = serde_json::json!({
        "implicit": true, "visible": true, "source_sha256": "ab"
    });
    std::fs::write(&record_file, serde_json::to_vec(&record).unwrap()).unwrap();

    let answer = service
        .generate_all_images(vec![request("s1"), request("s2")])
        .await;
    assert_eq!(answer.failures, [], "{answer:?}");
    assert_eq!(
        provider.calls_for("s1"),
        2,
        "the edited record is a miss: drawn again"
    );
    assert_eq!(provider.calls_for("s2"), 1);
}

/// A bug that panics on one scene fails that scene, `internal`, and only that scene.
#[tokio::test]
async fn a_panic_on_one_scene_fails_it_alone() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::new(|scene, _| {
        if scene == "s2" {
            Answer::panic("index out of range")
        } else {
            Answer::image()
        }
    }));
    let service = fs_service(out.path(), provider.clone());
    let answer = service
        .generate_all_images(vec![request("s1"), request("s2"), request("s3")])
        .await;
    assert_eq!(answer.results.len(), 2, "{answer:?}");
    assert_eq!(answer.failures.len(), 1);
    assert_eq!(answer.failures[0].scene_id, "s2");
    assert_eq!(answer.failures[0].error_type, ErrorType::Internal);
    assert!(answer.failures[0].message.contains("index out of range"));
    assert_eq!(provider.calls_for("s2"), 1, "a bug is not retried");
}

/// A claim renewed while its holder works keeps a second worker waiting however long the
/// generation takes — here three times the lease — and the second worker pays nothing.
#[tokio::test]
async fn a_claim_outlives_its_lease_while_its_holder_works() {
    let out = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(FsStore::new(out.path()).unwrap());
    // Real time, with margins for a loaded machine: each renewal has 900 ms to land.
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::from_millis(3000)));
    let timing = ClaimTiming {
        ttl: Duration::from_millis(1000),
        renew_every: Duration::from_millis(100),
    };
    let config = TestConfig::new().out(out.path());
    let a = config
        .service_with(provider.clone(), store.clone())
        .with_claim_timing(timing);
    let b = config
        .service_with(provider.clone(), store.clone())
        .with_claim_timing(timing);
    let (left, right) = tokio::join!(a.generate_scene_image(request("s1")), async {
        // Past the first lease: without renewals the claim would have lapsed by now.
        tokio::time::sleep(Duration::from_millis(1800)).await;
        b.generate_scene_image(request("s1")).await
    });
    assert!(!left.unwrap().from_cache);
    assert!(right.unwrap().from_cache, "the second worker waited");
    assert_eq!(provider.calls(), 1);
    let claims: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".claim"))
        .collect();
    assert!(claims.is_empty(), "released: {claims:?}");
}

/// A claim planted with an expiry in the year 3000 would block its scene for good; it is
/// garbage, and the scene is generated at once instead of waiting out the deadline.
#[tokio::test]
async fn a_claim_expiring_in_the_far_future_blocks_nothing() {
    let out = tempfile::tempdir().unwrap();
    let provider = Arc::new(ScriptedProvider::placeholder(Duration::ZERO));
    let service = fs_service(out.path(), provider.clone());
    let scene = service.prepare(request("s1")).unwrap();
    let planted = serde_json::json!({"owner": "squatter", "expires_at_ms": 32_503_680_000_000u64});
    std::fs::write(
        out.path().join(&scene.keys.claim),
        serde_json::to_vec(&planted).unwrap(),
    )
    .unwrap();
    let options = RunOptions {
        deadline: Deadline::after(Duration::from_secs(30)),
        ..RunOptions::default()
    };
    let output = service.run_scene(&scene, &options).await.unwrap();
    assert!(!output.from_cache);
    assert_eq!(provider.calls(), 1);
    assert!(!out.path().join(&scene.keys.claim).exists(), "released");
}
