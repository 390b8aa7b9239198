//! The Lambda adapter, driven directly: every event shape and every sample in `events/`,
//! against a real filesystem store and a provider that hands back real PNG bytes.
//!
//! The provider is the tests' scripted one, so the tests can count calls (idempotency) and
//! refuse chosen prompts (partial failures); everything after it — normalisation, storage,
//! the cache — is the real service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};

use crate::suite::support::config::TestConfig;
use crate::suite::support::scripted_provider::{content_refused, Answer, ScriptedProvider};
use crate::suite::support::sqs::{sqs_event, sqs_record};
use stage3::lambda::{self, EventKind};
use stage3::storage::FsStore;
use stage3::Deadline;
use stage3::ErrorType;
use stage3::{BatchAnswer, Stage3Output};
use stage3::{Stage3Error, Stage3Service};

/// Prompts containing this word are refused as a provider's moderation would (403).
const REFUSED_WORD: &str = "forbidden";

/// What each image is billed at, so the summary's cost can be checked.
const IMAGE_COST_USD: f64 = 0.039;

/// Draws every prompt at a price, except those containing [`REFUSED_WORD`], and notes
/// every call.
fn provider() -> ScriptedProvider {
    ScriptedProvider::by_prompt(|prompt| {
        if prompt.contains(REFUSED_WORD) {
            Answer::error(content_refused())
        } else {
            Answer::image().costing(IMAGE_COST_USD)
        }
    })
}

struct Harness {
    dir: tempfile::TempDir,
    provider: Arc<ScriptedProvider>,
    service: Stage3Service,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let provider = Arc::new(provider());
        let store = Arc::new(FsStore::new(dir.path()).unwrap());
        let service = TestConfig::new()
            .out(dir.path())
            .service_with(provider.clone(), store);
        Harness {
            dir,
            provider,
            service,
        }
    }

    /// A generous deadline, as a fresh 15-minute invocation would have.
    async fn handle(&self, payload: Value) -> std::result::Result<Value, Stage3Error> {
        let deadline = Deadline::after(Duration::from_secs(600));
        lambda::handle(&self.service, payload, deadline).await
    }

    /// Files the store holds, sorted: what an invocation left behind.
    fn stored_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .collect();
        names.sort();
        names
    }
}

fn sample(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("events")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn sample_names() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("events");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    names
}

fn scene(id: &str, prompt: &str) -> Value {
    json!({"scene_id": id, "image_prompt": prompt, "style_tags": ["watercolor"]})
}

fn failed_ids(answer: &Value) -> Vec<String> {
    let failures = answer["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("not an SQS batch response: {answer}"));
    failures
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
        .collect()
}

fn expect_error(result: std::result::Result<Value, Stage3Error>, kind: ErrorType) -> String {
    match result {
        Err(e) => {
            assert_eq!(e.error_type(), kind, "{e}");
            e.to_string()
        }
        Ok(answer) => panic!("expected {kind}, got an answer: {answer}"),
    }
}

fn assert_png_on_disk(output: &Stage3Output) {
    let bytes = std::fs::read(PathBuf::from(&output.image_path)).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        output.image_path
    );
}

// ---------------------------------------------------------------------------------------
// Event shapes and rejections: these never reach image decoding.
// ---------------------------------------------------------------------------------------

#[test]
fn every_sample_is_classified_as_its_shape() {
    let expected = [
        ("batch-array.json", EventKind::Direct),
        ("batch-scenes.json", EventKind::Direct),
        ("eventbridge.json", EventKind::EventBridge),
        ("single.json", EventKind::Direct),
        ("sqs.json", EventKind::Sqs),
    ];
    let names = sample_names();
    assert_eq!(
        names,
        expected
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<Vec<_>>(),
        "events/ changed: classify the new sample here"
    );
    for (name, kind) in expected {
        assert_eq!(lambda::classify(&sample(name)).unwrap(), kind, "{name}");
    }
}

#[tokio::test]
async fn records_from_other_event_sources_are_refused_by_name() {
    let harness = Harness::new();
    let s3_event = json!({"Records": [{"eventSource": "aws:s3", "s3": {"bucket": {"name": "b"}}}]});
    let message = expect_error(harness.handle(s3_event).await, ErrorType::InvalidRequest);
    assert!(message.contains("\"aws:s3\""), "{message}");

    let mixed = sqs_event(vec![
        sqs_record("m1", &scene("s1", "a harbour").to_string()),
        json!({"eventSource": "aws:sns", "Sns": {}}),
    ]);
    let message = expect_error(harness.handle(mixed).await, ErrorType::InvalidRequest);
    assert!(message.contains("Records[1].eventSource"), "{message}");

    for broken in [json!({"Records": []}), json!({"Records": {"a": 1}})] {
        let message = expect_error(harness.handle(broken).await, ErrorType::InvalidRequest);
        assert!(message.contains("Records"), "{message}");
    }
    assert_eq!(harness.provider.calls(), 0);
}

#[tokio::test]
async fn payloads_that_are_no_request_are_invalid_requests() {
    let harness = Harness::new();
    for payload in [json!("draw a cat"), json!(42), json!(null), json!({})] {
        expect_error(harness.handle(payload).await, ErrorType::InvalidRequest);
    }
    let message = expect_error(
        harness
            .handle(json!({"scene_id": "../../etc/passwd", "image_prompt": "x"}))
            .await,
        ErrorType::InvalidRequest,
    );
    assert!(message.contains("scene_id"), "{message}");
    assert_eq!(harness.provider.calls(), 0);
    assert!(harness.stored_files().is_empty());
}

#[tokio::test]
async fn an_invalid_batch_is_rejected_whole_and_nothing_is_spent() {
    let harness = Harness::new();
    let batch = json!([
        scene("good_001", "a lighthouse at dawn"),
        {"scene_id": "bad_002", "image_prompt": "a storm", "size": "512x512"},
    ]);
    let message = expect_error(harness.handle(batch).await, ErrorType::InvalidRequest);
    assert!(message.contains("scenes[1]"), "{message}");
    assert!(message.contains("size"), "{message}");

    let envelope = json!({"scenes": [scene("good_001", "a lighthouse")], "quality": "ultra"});
    expect_error(harness.handle(envelope).await, ErrorType::InvalidRequest);

    assert_eq!(harness.provider.calls(), 0, "nothing may be spent");
    assert!(harness.stored_files().is_empty());
}

#[tokio::test]
async fn an_invalid_eventbridge_detail_names_the_detail() {
    let harness = Harness::new();
    let mut event = sample("eventbridge.json");
    event["detail"] = json!({"scene_id": "lighthouse_008"});
    let message = expect_error(harness.handle(event).await, ErrorType::InvalidRequest);
    assert!(message.contains("detail: "), "{message}");
    assert!(message.contains("image_prompt"), "{message}");

    let mut event = sample("eventbridge.json");
    event["detail"] = json!("not a request");
    expect_error(harness.handle(event).await, ErrorType::InvalidRequest);
    assert_eq!(harness.provider.calls(), 0);
}

#[tokio::test]
async fn sqs_records_with_bad_bodies_are_exactly_the_batch_item_failures() {
    let harness = Harness::new();
    let mut no_body = sqs_record("no-body", "");
    no_body["body"] = Value::Null;
    let event = sqs_event(vec![
        sqs_record("not-json", "{\"scene_id\": \"s1\", \"image_prompt\": "),
        sqs_record("no-prompt", &json!({"scene_id": "s2"}).to_string()),
        sqs_record("unsafe-id", &scene("../s3", "a boat").to_string()),
        sqs_record("empty-batch", "[]"),
        no_body,
    ]);
    let answer = harness.handle(event).await.unwrap();
    assert_eq!(
        failed_ids(&answer),
        [
            "not-json",
            "no-prompt",
            "unsafe-id",
            "empty-batch",
            "no-body"
        ]
    );
    assert_eq!(harness.provider.calls(), 0);
    assert!(harness.stored_files().is_empty());
}

#[tokio::test]
async fn an_sqs_record_without_a_message_id_fails_the_whole_invocation() {
    let harness = Harness::new();
    let mut anonymous = sqs_record("x", &scene("s1", "a boat").to_string());
    anonymous.as_object_mut().unwrap().remove("messageId");
    let event = sqs_event(vec![
        sqs_record("named", &scene("s0", "a gull").to_string()),
        anonymous,
    ]);
    let message = expect_error(harness.handle(event).await, ErrorType::InvalidRequest);
    assert!(message.contains("Records[1].messageId"), "{message}");
    assert_eq!(
        harness.provider.calls(),
        0,
        "nothing runs when a record is unnameable"
    );
}

#[tokio::test]
async fn no_provider_call_starts_when_the_deadline_leaves_no_time() {
    let harness = Harness::new();
    let almost_over = Deadline::after(Duration::from_secs(1));

    let single = lambda::handle(&harness.service, sample("single.json"), almost_over).await;
    expect_error(single, ErrorType::DeadlineExceeded);

    let batch = lambda::handle(&harness.service, sample("batch-scenes.json"), almost_over)
        .await
        .unwrap();
    let batch: BatchAnswer = serde_json::from_value(batch).unwrap();
    assert!(batch.results.is_empty());
    assert_eq!(batch.failures.len(), 3);
    assert!(batch
        .failures
        .iter()
        .all(|f| f.error_type == ErrorType::DeadlineExceeded));

    // SQS: the good records are redelivered with the bad one, to run with a fresh deadline.
    let sqs = sample("sqs.json");
    let all_ids: Vec<String> = sqs["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["messageId"].as_str().unwrap().to_string())
        .collect();
    let answer = lambda::handle(&harness.service, sqs, almost_over)
        .await
        .unwrap();
    assert_eq!(failed_ids(&answer), all_ids);

    assert_eq!(harness.provider.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_the_runtimes_less_the_safety_margin() {
    let now = SystemTime::now();
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap();
    let epoch_ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;

    let in_a_minute = epoch_ms(now + Duration::from_secs(60));
    let deadline = lambda::invocation_deadline(in_a_minute, now);
    let expected =
        Duration::from_millis(in_a_minute) - since_epoch - lambda::DEADLINE_SAFETY_MARGIN;
    assert_eq!(deadline.remaining(), Some(expected));

    let past = epoch_ms(now - Duration::from_secs(5));
    assert_eq!(
        lambda::invocation_deadline(past, now).remaining(),
        Some(Duration::ZERO)
    );
    assert_eq!(lambda::invocation_deadline(0, now), Deadline::NONE);

    // `cargo lambda watch` sends a duration (600000 ms), not an epoch time.
    let emulated = lambda::invocation_deadline(600_000, now);
    assert_eq!(
        emulated.remaining(),
        Some(Duration::from_secs(600) - lambda::DEADLINE_SAFETY_MARGIN)
    );
}

#[tokio::test]
async fn an_invocation_fails_with_the_stable_error_type() {
    let harness = Harness::new();
    let in_ten_minutes = SystemTime::now() + Duration::from_secs(600);
    let mut context = Context::default();
    context.request_id = "8476a536-e9f4-11e8-9739-2dfe598c3fcd".into();
    context.deadline = in_ten_minutes
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    let invalid = LambdaEvent::new(json!({"scene_id": "s"}), context.clone());
    let diagnostic = lambda::handle_invocation(&harness.service, invalid)
        .await
        .unwrap_err();
    assert_eq!(diagnostic.error_type, "invalid_request");
    assert!(diagnostic.error_message.contains("image_prompt"));

    // A context whose deadline has already passed: the scene is not started.
    context.deadline = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let late = LambdaEvent::new(sample("single.json"), context);
    let diagnostic = lambda::handle_invocation(&harness.service, late)
        .await
        .unwrap_err();
    assert_eq!(diagnostic.error_type, "deadline_exceeded");
    assert_eq!(harness.provider.calls(), 0);

    let storage = Stage3Error::storage("disk full", false);
    let diagnostic = lambda::diagnostic(&storage);
    assert_eq!(diagnostic.error_type, "storage");
    assert_eq!(
        diagnostic.error_message, "disk full",
        "the type is not repeated"
    );
}

// ---------------------------------------------------------------------------------------
// Generation: these decode and store real PNGs (they need `normalize_image`).
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_single_request_answers_its_stage3_output() {
    let harness = Harness::new();
    let answer = harness.handle(sample("single.json")).await.unwrap();
    let output: Stage3Output = serde_json::from_value(answer.clone()).unwrap();
    assert_eq!(output.scene_id, "lighthouse_001");
    assert_eq!((output.width, output.height), (1024, 1024));
    assert!(
        answer["image_url"].is_null(),
        "fs storage has no URL: {answer}"
    );
    assert!(output.generation_params.prompt.contains("orange cat"));
    assert_png_on_disk(&output);
    assert_eq!(harness.provider.calls(), 1);
}

#[tokio::test]
async fn a_refused_single_request_fails_with_its_error_type() {
    let harness = Harness::new();
    let refused = scene("lighthouse_009", "a forbidden picture of the lighthouse");
    expect_error(harness.handle(refused).await, ErrorType::ContentPolicy);
    assert_eq!(harness.provider.calls(), 1, "a 403 is permanent: no retry");
}

#[tokio::test]
async fn batches_answer_results_and_failures() {
    let harness = Harness::new();
    let answer = harness.handle(sample("batch-array.json")).await.unwrap();
    let answer: BatchAnswer = serde_json::from_value(answer).unwrap();
    assert_eq!(answer.results.len(), 2);
    assert!(answer.failures.is_empty());

    let answer = harness.handle(sample("batch-scenes.json")).await.unwrap();
    let answer: BatchAnswer = serde_json::from_value(answer).unwrap();
    let sizes: Vec<(u32, u32, &str)> = answer
        .results
        .iter()
        .map(|r| (r.width, r.height, r.generation_params.quality.as_str()))
        .collect();
    assert_eq!(
        sizes,
        [
            (1792, 1024, "hd"),
            (1792, 1024, "hd"),
            (1024, 1792, "standard")
        ],
        "envelope options apply; a scene's own options win"
    );
    for output in &answer.results {
        assert_png_on_disk(output);
    }

    let mixed = json!([
        scene("ok_001", "a lighthouse"),
        scene("no_002", "a forbidden lighthouse")
    ]);
    let answer: BatchAnswer = serde_json::from_value(harness.handle(mixed).await.unwrap()).unwrap();
    assert_eq!(answer.results.len(), 1);
    assert_eq!(answer.failures.len(), 1);
    assert_eq!(answer.failures[0].scene_id, "no_002");
    assert_eq!(answer.failures[0].error_type, ErrorType::ContentPolicy);
}

#[tokio::test]
async fn an_eventbridge_detail_is_handled_as_a_direct_request() {
    let harness = Harness::new();
    let answer = harness.handle(sample("eventbridge.json")).await.unwrap();
    let output: Stage3Output = serde_json::from_value(answer).unwrap();
    assert_eq!(output.scene_id, "lighthouse_008");
    assert_png_on_disk(&output);

    let mut batch_event = sample("eventbridge.json");
    batch_event["detail"] = sample("batch-array.json");
    let answer: BatchAnswer =
        serde_json::from_value(harness.handle(batch_event).await.unwrap()).unwrap();
    assert_eq!(answer.results.len(), 2);
}

#[tokio::test]
async fn the_sqs_sample_fails_only_its_bad_record_and_persists_the_rest() {
    let harness = Harness::new();
    let answer = harness.handle(sample("sqs.json")).await.unwrap();
    assert_eq!(
        failed_ids(&answer),
        ["9f1c4e52-0c7e-4a0b-9a57-1d2e3f4a5b03"]
    );
    assert_eq!(harness.provider.calls(), 3);
    // Each result lies beside its image: nothing is lost though SQS returns no results.
    let files = harness.stored_files();
    for scene_id in ["lighthouse_001", "lighthouse_002", "lighthouse_003"] {
        for extension in [".png", ".json"] {
            assert!(
                files
                    .iter()
                    .any(|f| f.starts_with(scene_id) && f.ends_with(extension)),
                "{scene_id}{extension} missing from {files:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_sqs_redelivery_is_served_from_the_cache() {
    let harness = Harness::new();
    let event = sample("sqs.json");
    let first = harness.handle(event.clone()).await.unwrap();
    assert_eq!(harness.provider.calls(), 3);
    let stored = harness.stored_files();

    let second = harness.handle(event).await.unwrap();
    assert_eq!(failed_ids(&second), failed_ids(&first));
    assert_eq!(
        harness.provider.calls(),
        3,
        "a redelivery must not pay again"
    );
    assert_eq!(harness.stored_files(), stored);
}

#[tokio::test]
async fn a_record_fails_when_any_of_its_scenes_fails_and_only_that_scene_reruns() {
    let harness = Harness::new();
    let event = sqs_event(vec![
        sqs_record(
            "story-a",
            &json!([
                scene("a_001", "a quiet harbour"),
                scene("a_002", "a forbidden cove")
            ])
            .to_string(),
        ),
        sqs_record("story-b", &scene("b_001", "a quiet harbour").to_string()),
        // The same scene id as story-a's failure, but another request: it stands alone.
        sqs_record("story-c", &scene("a_002", "a sunny cove").to_string()),
    ]);
    let answer = harness.handle(event.clone()).await.unwrap();
    assert_eq!(failed_ids(&answer), ["story-a"]);
    assert_eq!(harness.provider.calls(), 4);

    // The queue redelivers story-a alone: its good scene comes from the cache.
    let redelivery = sqs_event(vec![event["Records"][0].clone()]);
    let answer = harness.handle(redelivery).await.unwrap();
    assert_eq!(failed_ids(&answer), ["story-a"]);
    assert_eq!(harness.provider.calls(), 5);
    let last_call = harness.provider.started().pop().unwrap();
    assert!(last_call.prompt.contains(REFUSED_WORD));
}

#[tokio::test]
async fn identical_scenes_in_two_records_are_generated_once() {
    let harness = Harness::new();
    let body = scene("shared_001", "a lighthouse at dusk").to_string();
    let event = sqs_event(vec![
        sqs_record("first", &body),
        sqs_record("second", &body),
    ]);
    let answer = harness.handle(event).await.unwrap();
    assert!(failed_ids(&answer).is_empty());
    assert_eq!(harness.provider.calls(), 1);
}

#[tokio::test]
async fn every_sample_event_is_answered() {
    let harness = Harness::new();
    for name in sample_names() {
        let answer = harness.handle(sample(&name)).await;
        assert!(answer.is_ok(), "{name}: {answer:?}");
    }
}

#[tokio::test]
async fn sqs_and_batch_answers_carry_the_summary() {
    let harness = Harness::new();
    let answer = harness.handle(sample("sqs.json")).await.unwrap();
    let summary = &answer["summary"];
    assert_eq!(summary["scenes"], 3, "{answer}");
    assert_eq!(summary["succeeded"], 3, "{answer}");
    assert_eq!(summary["failed"], 0);
    let cost = summary["cost_usd"].as_f64().unwrap();
    assert!((cost - 3.0 * IMAGE_COST_USD).abs() < 1e-9, "{summary}");
    assert!(
        summary.get("estimated_cost_usd").is_none(),
        "this provider knows no prices: {summary}"
    );

    let mixed = serde_json::json!([
        scene("ok_001", "a lighthouse"),
        scene("no_002", "a forbidden lighthouse")
    ]);
    let answer = harness.handle(mixed).await.unwrap();
    assert_eq!(answer["summary"]["scenes"], 2, "{answer}");
    assert_eq!(answer["summary"]["failed"], 1);
}

/// A record a neighbour edited (its label's source hash two digits long) must not bring
/// the invocation down: the SQS batch answers for every record, the healthy one included.
#[tokio::test]
async fn an_edited_record_in_a_mixed_sqs_batch_loses_no_scene() {
    let harness = Harness::new();
    let first = sqs_event(vec![sqs_record(
        "m1",
        &scene("edited", "a lantern in the fog").to_string(),
    )]);
    harness.handle(first).await.unwrap();
    let record = std::fs::read_dir(harness.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let mut edited: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    edited["generation_params"]["aigc_label"] =
        json!({"implicit": true, "visible": true, "source_sha256": "ab"});
    std::fs::write(&record, serde_json::to_vec(&edited).unwrap()).unwrap();

    let mixed = sqs_event(vec![
        sqs_record("m2", &scene("edited", "a lantern in the fog").to_string()),
        sqs_record("m3", &scene("healthy", "a kite over the dunes").to_string()),
    ]);
    let answer = harness.handle(mixed).await.unwrap();
    assert!(failed_ids(&answer).is_empty(), "{answer}");
    assert_eq!(answer["summary"]["succeeded"], 2, "{answer}");
}

/// 30 scenes with 70,000-character prompts: 6.3 MB of prompt echo, past Lambda's 6 MB
/// response limit. The answer drops the echo, says so, and keeps every scene's image.
#[tokio::test]
async fn an_answer_past_six_megabytes_drops_the_prompt_echo_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(provider());
    let store = Arc::new(FsStore::new(dir.path()).unwrap());
    let service = TestConfig::new()
        .out(dir.path())
        .set("STAGE3_MAX_PROMPT_CHARS", "80000")
        .service_with(provider.clone(), store);
    // Identical prompts would be generated once; each scene's differs in its first word.
    let scenes: Vec<Value> = (0..30)
        .map(|i| {
            scene(
                &format!("scene_{i:03}"),
                &format!("{i} {}", "灯".repeat(70_000)),
            )
        })
        .collect();
    let deadline = Deadline::after(Duration::from_secs(600));
    let answer = lambda::handle(&service, Value::Array(scenes), deadline)
        .await
        .unwrap();

    let size = serde_json::to_vec(&answer).unwrap().len();
    assert!(
        size <= lambda::answer_size::ANSWER_BUDGET,
        "answer is {size} bytes"
    );
    assert_eq!(answer["trimmed"], json!(["generation_params.prompt"]));
    let answer: BatchAnswer = serde_json::from_value(answer).unwrap_or_else(|e| {
        panic!("a trimmed answer still parses as a BatchAnswer: {e}");
    });
    assert_eq!(answer.results.len(), 30);
    assert_eq!(answer.summary.succeeded, 30);
    for output in &answer.results {
        assert!(output.generation_params.prompt.is_empty());
        assert_png_on_disk(output);
    }
    assert_eq!(provider.calls(), 30);
}

/// The story of `tests/suite/characters.rs` in `sheet` mode, as the Lambda function gets it.
fn cast_story() -> Value {
    let page = |id: &str, cast: &[&str]| json!({"scene_id": id, "image_prompt": format!("{id} in the snow"), "characters_in_scene": cast});
    json!({
        "story_id": "snow",
        "character_mode": "sheet",
        "characters": {
            "fox": {"name": "Rufus", "description": "a small red fox"},
            "owl": {"description": "a grey owl"},
        },
        "scenes": [page("p1", &["fox"]), page("p2", &["owl"]), page("p3", &["fox"]), page("p4", &["fox", "owl"])],
    })
}

#[tokio::test]
async fn character_modes_work_through_a_direct_invocation_and_sqs() {
    let harness = Harness::new();
    let answer: BatchAnswer =
        serde_json::from_value(harness.handle(cast_story()).await.unwrap()).unwrap();
    assert!(answer.failures.is_empty(), "{:#?}", answer.failures);
    assert_eq!(harness.provider.calls(), 6, "two sheets and four pages");
    assert_eq!(answer.characters.len(), 2);
    assert_eq!(answer.results[3].generation_params.references.len(), 2);
    assert!(harness.dir.path().join("stories/snow/cast.json").is_file());

    // The same story from a queue: sheets and pages from the store, nothing paid again.
    let event = sqs_event(vec![sqs_record("m-1", &cast_story().to_string())]);
    let queued = harness.handle(event).await.unwrap();
    assert!(failed_ids(&queued).is_empty(), "{queued}");
    assert_eq!(harness.provider.calls(), 6);

    // First appearances through the queue: pages only, none paid twice.
    let mut first = cast_story();
    first["character_mode"] = json!("first-appearance");
    first["story_id"] = json!("snow-2");
    for scene in first["scenes"].as_array_mut().unwrap() {
        scene["scene_id"] = json!(format!("{}b", scene["scene_id"].as_str().unwrap()));
    }
    let event = sqs_event(vec![sqs_record("m-2", &first.to_string())]);
    harness.handle(event.clone()).await.unwrap();
    assert_eq!(harness.provider.calls(), 6 + 4);
    harness.handle(event).await.unwrap();
    assert_eq!(harness.provider.calls(), 6 + 4, "a redelivery pays nothing");
}
