//! Fault injection: the real service and OpenRouter client against a scripted stand-in
//! on loopback that fails in every way docs/design.md §3 lists.
//!
//! For each fault: how many provider calls were made, the final outcome and `error_type`,
//! that the other scenes of the same batch still succeed, and that the output directory
//! holds nothing partial and no record without its image.
//!
//! The scheduling that follows a fault (slots, 429 pauses, a stopped batch) is timed at the
//! end of the file, on a paused clock, with an in-process provider instead of the socket.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::suite::support::config::TestConfig;
use crate::suite::support::gated_store::GatedStore;
use crate::suite::support::scripted_openrouter::{
    blank_png, noisy_image, Reply, ScriptedOpenRouter,
};
use crate::suite::support::scripted_provider::{
    insufficient_credits, rate_limited, Answer, ScriptedProvider,
};
use bytes::Bytes;
use image::ImageFormat;
use sha2::Digest;
use stage3::storage::MemoryStore;
use stage3::Stage3Service;
use stage3::{GenerationRequest, Stage2Output};
use tokio::time::Instant;

const KEY: &str = "sk-or-v1-fault-suite-secret";

/// The real service and OpenRouter client against `server`, storing in `out`, with eight
/// calls in flight (the figure the load test below states).
fn config(server: &ScriptedOpenRouter, out: &Path) -> TestConfig {
    TestConfig::new()
        .openrouter(&server.base_url, KEY)
        .out(out)
        .set("STAGE3_CONCURRENCY", "8")
}

fn request(scene_id: &str) -> GenerationRequest {
    Stage2Output {
        scene_id: scene_id.to_string(),
        image_prompt: format!("[{scene_id}] a lighthouse on a cliff at dusk"),
        negative_prompt: String::new(),
        style_tags: vec![],
        characters_in_scene: vec![],
    }
    .into()
}

fn good_png() -> Vec<u8> {
    noisy_image(256, 256, ImageFormat::Png)
}

/// Each scene's script, by the marker in its prompt: what the n-th call gets.
fn script(scene: &str, nth: usize) -> Reply {
    let png = good_png();
    let first = nth == 0;
    let ok = Reply::image(&png, "image/png");
    match scene {
        "ok" => ok,
        "s400" => Reply::error(400, "bad request"),
        "s403" => Reply::error(403, "guardrail"),
        "s413" => Reply::error(413, "payload too large"),
        "s408" | "s500" | "s502" | "s503" | "s504" | "s524" | "s529" if first => {
            Reply::error(scene[1..].parse().unwrap(), "transient")
        }
        "s429" if first => Reply::error(429, "slow down"),
        "s429-retry-after" if first => {
            Reply::error(429, "slow down").with_header("Retry-After", "1")
        }
        "s429-http-date" if first => {
            let when =
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(1));
            Reply::error(429, "slow down").with_header("Retry-After", &when)
        }
        "always503" => Reply::error(503, "down"),
        "always429" => Reply::error(429, "slow down"),
        "drop" if first => Reply::Drop,
        "not-json" if first => Reply::raw(200, b"<html>gateway hiccup</html>"),
        "empty-data" if first => Reply::json(200, serde_json::json!({"created": 1, "data": []})),
        "bad-base64" if first => Reply::json(
            200,
            serde_json::json!({"created": 1, "data": [{"b64_json": "iVBORw0KGgo@@@", "media_type": "image/png"}]}),
        ),
        "truncated-png" if first => Reply::image(&png[..png.len() / 2], "image/png"),
        "always-truncated" => Reply::image(&png[..png.len() / 2], "image/png"),
        "blank" if first => Reply::image(&blank_png(256, 256), "image/png"),
        "wrong-aspect" if first => {
            Reply::image(&noisy_image(512, 128, ImageFormat::Png), "image/png")
        }
        "jpeg-labelled-png" => Reply::image(&noisy_image(256, 256, ImageFormat::Jpeg), "image/png"),
        _ => ok,
    }
}

fn scene_of(prompt: &str) -> String {
    prompt
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .map(|(scene, _)| scene.to_string())
        .unwrap_or_default()
}

/// Every `.json` record names a `.png` that is there and matches it, every image belongs
/// to a record, no claim or temporary file is left, and the images on disk are exactly
/// those of `succeeded`.
fn assert_store_consistent(out: &Path, succeeded: &[&str]) {
    let mut pngs = Vec::new();
    let mut referenced = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "temporary file left behind: {name}");
        assert!(!name.ends_with(".claim"), "claim left behind: {name}");
        if name.ends_with(".json") {
            let record: stage3::Stage3Output =
                serde_json::from_slice(&std::fs::read(out.join(&name)).unwrap()).unwrap();
            let image = std::fs::read(&record.image_path)
                .unwrap_or_else(|e| panic!("record {name} without its image: {e}"));
            assert_eq!(
                hex::encode(sha2::Sha256::digest(&image)),
                record.generation_params.content_sha256,
                "record {name} disagrees with its image"
            );
            referenced.push(
                Path::new(&record.image_path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        if name.ends_with(".png") {
            pngs.push(name);
        }
    }
    for png in &pngs {
        assert!(referenced.contains(png), "image without record: {png}");
    }
    let mut scenes: Vec<String> = pngs
        .iter()
        .map(|name| name.rsplit_once('-').unwrap().0.to_string())
        .collect();
    scenes.sort();
    let mut expected: Vec<String> = succeeded.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(scenes, expected);
}

#[tokio::test]
async fn every_provider_fault_has_its_outcome_and_spares_the_rest_of_the_batch() {
    let server =
        ScriptedOpenRouter::start(|request, nth| script(&scene_of(request.prompt()), nth)).await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path()).service().await;

    // (scene, expected provider calls, expected error_type or None for success)
    let cases: &[(&str, usize, Option<&str>)] = &[
        ("ok", 1, None),
        ("s400", 1, Some("provider_error")),
        // 401 and 402 stop the whole batch: see `a_402_stops_the_batch_*`.
        ("s403", 1, Some("permission_denied")),
        ("s413", 1, Some("provider_error")),
        ("s408", 2, None),
        ("s429", 2, None),
        ("s429-retry-after", 2, None),
        ("s429-http-date", 2, None),
        ("s500", 2, None),
        ("s502", 2, None),
        ("s503", 2, None),
        ("s504", 2, None),
        ("s524", 2, None),
        ("s529", 2, None),
        ("always503", 4, Some("provider_unavailable")),
        ("always429", 4, Some("rate_limited")),
        ("drop", 2, None),
        ("not-json", 2, None),
        ("empty-data", 2, None),
        ("bad-base64", 2, None),
        ("truncated-png", 2, None),
        ("always-truncated", 4, Some("invalid_image")),
        ("blank", 2, None),
        ("wrong-aspect", 2, None),
        ("jpeg-labelled-png", 1, None),
    ];
    let requests: Vec<GenerationRequest> = cases.iter().map(|(scene, ..)| request(scene)).collect();
    let answer = service.generate_all_images(requests).await;

    for (scene, calls, expected) in cases {
        assert_eq!(
            server.calls_for(&format!("[{scene}]")),
            *calls,
            "provider calls for {scene}"
        );
        match expected {
            None => {
                let result = answer
                    .results
                    .iter()
                    .find(|r| r.scene_id == *scene)
                    .unwrap_or_else(|| {
                        panic!("{scene} should succeed; failures: {:?}", answer.failures)
                    });
                assert_eq!(
                    result.generation_params.attempts as usize, *calls,
                    "{scene}"
                );
                let stored = std::fs::read(&result.image_path).unwrap();
                assert!(
                    stored.starts_with(b"\x89PNG\r\n\x1a\n"),
                    "{scene} stored a PNG"
                );
            }
            Some(error_type) => {
                let failure = answer
                    .failures
                    .iter()
                    .find(|f| f.scene_id == *scene)
                    .unwrap_or_else(|| panic!("{scene} should fail"));
                assert_eq!(
                    failure.error_type.as_str(),
                    *error_type,
                    "{scene}: {}",
                    failure.message
                );
                assert!(!failure.message.contains(KEY));
            }
        }
    }
    let jpeg = answer
        .results
        .iter()
        .find(|r| r.scene_id == "jpeg-labelled-png")
        .unwrap();
    assert_eq!(jpeg.generation_params.source_format, "jpeg");

    let succeeded: Vec<&str> = cases
        .iter()
        .filter(|c| c.2.is_none())
        .map(|c| c.0)
        .collect();
    assert_eq!(answer.results.len(), succeeded.len());
    assert_store_consistent(out.path(), &succeeded);
    assert!(server
        .requests()
        .iter()
        .all(|r| r.headers["authorization"] == format!("Bearer {KEY}")));
}

#[tokio::test]
async fn a_hung_provider_is_cut_off_by_the_timeout_and_retried() {
    let server =
        ScriptedOpenRouter::start(|request, nth| match scene_of(request.prompt()).as_str() {
            "hang-once" if nth == 0 => Reply::Hang(Duration::from_secs(5)),
            "hang-always" => Reply::Hang(Duration::from_secs(5)),
            _ => Reply::image(&good_png(), "image/png"),
        })
        .await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path())
        .set("STAGE3_TIMEOUT_SECS", "1")
        .set("STAGE3_MAX_RETRIES", "1")
        .service()
        .await;

    let answer = service
        .generate_all_images(vec![
            request("hang-once"),
            request("hang-always"),
            request("fine"),
        ])
        .await;
    assert_eq!(server.calls_for("[hang-once]"), 2);
    assert_eq!(server.calls_for("[hang-always]"), 2);
    assert_eq!(server.calls_for("[fine]"), 1);
    let ids: Vec<&str> = answer.results.iter().map(|r| r.scene_id.as_str()).collect();
    assert_eq!(ids, vec!["hang-once", "fine"]);
    assert_eq!(answer.failures.len(), 1);
    assert_eq!(answer.failures[0].scene_id, "hang-always");
    assert_eq!(answer.failures[0].error_type.as_str(), "timeout");
    assert_store_consistent(out.path(), &["hang-once", "fine"]);
}

/// The pause a 429 asks for is read off the wire: `Retry-After: 1` holds back both the
/// retry and the next scene for at least that second. (What the pause does to a batch is
/// timed exactly on a paused clock, below.)
#[tokio::test]
async fn a_retry_after_from_the_wire_holds_back_every_call() {
    // One slot, so the next scene is queued behind the throttled call, not beside it.
    let throttled = AtomicBool::new(false);
    let server = ScriptedOpenRouter::start(move |_, _| {
        if !throttled.swap(true, Ordering::SeqCst) {
            Reply::error(429, "slow down").with_header("Retry-After", "1")
        } else {
            Reply::image(&good_png(), "image/png")
        }
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path())
        .set("STAGE3_CONCURRENCY", "1")
        // Above the second asked for, which would otherwise be capped.
        .set("STAGE3_RETRY_MAX_MS", "5000")
        .service()
        .await;
    let answer = service
        .generate_all_images(vec![request("first"), request("second")])
        .await;
    assert_eq!(answer.results.len(), 2, "{:?}", answer.failures);

    let mut arrivals: Vec<std::time::Instant> = server.requests().iter().map(|r| r.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 3, "2 scenes + 1 retry");
    // A floor only, which real time cannot undercut: the pause starts after the 429 arrived.
    let after: Vec<Duration> = arrivals[1..]
        .iter()
        .map(|at| at.duration_since(arrivals[0]))
        .collect();
    assert!(
        after.iter().all(|d| *d >= Duration::from_secs(1)),
        "calls started during the pause: {after:?}"
    );
}

#[tokio::test]
async fn invalid_requests_reach_no_provider() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::image(&good_png(), "image/png")).await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path()).service().await;
    let mut blank = request("blank-prompt");
    blank.image_prompt = "   ".into();
    let mut long = request("long-prompt");
    long.image_prompt = "x".repeat(5000);
    let unsafe_id = request("../escape");
    for bad in [blank, long, unsafe_id] {
        let err = service.generate_scene_image(bad).await.unwrap_err();
        assert_eq!(err.error_type().as_str(), "invalid_request", "{err}");
    }
    assert!(service
        .prepare_all(vec![request("good"), request("../bad")])
        .is_err());
    assert_eq!(server.total_calls(), 0);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

/// 200 scenes at concurrency 8 against a stand-in with latency and a 10% transient fault
/// rate: every scene is delivered exactly once and no image is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_200_scenes_with_ten_percent_transient_faults() {
    let png = Arc::new(good_png());
    let server = ScriptedOpenRouter::start(move |request, nth| {
        let scene = scene_of(request.prompt());
        let number: usize = scene.trim_start_matches("load-").parse().unwrap_or(0);
        let latency = Duration::from_millis(20);
        // A fixed 10% of scenes fail their first call, with a mix of transient faults.
        if nth == 0 && number % 10 == 3 {
            let fault = match number % 4 {
                0 => Reply::error(503, "overloaded"),
                1 => Reply::error(429, "slow down"),
                2 => Reply::Drop,
                _ => Reply::error(502, "provider failed"),
            };
            return fault.after(latency);
        }
        Reply::image(&png, "image/png").after(latency)
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path()).service().await;
    let requests: Vec<GenerationRequest> =
        (0..200).map(|i| request(&format!("load-{i:03}"))).collect();
    let answer = service.generate_all_images(requests).await;

    assert_eq!(answer.results.len(), 200, "failures: {:?}", answer.failures);
    assert!(answer.failures.is_empty());
    let ids: Vec<String> = answer.results.iter().map(|r| r.scene_id.clone()).collect();
    let expected: Vec<String> = (0..200).map(|i| format!("load-{i:03}")).collect();
    assert_eq!(ids, expected, "results keep the input order");
    assert_eq!(server.total_calls(), 220, "200 first calls + 20 retries");
    let pngs = std::fs::read_dir(out.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".png")
        })
        .count();
    assert_eq!(pngs, 200, "one image per scene, none duplicated");
}

// ---- The batch stops spending ---------------------------------------------------------

/// 402 at concurrency 1: the first scene's call is refused, and no other scene calls.
/// (At concurrency 3, with calls in flight, on a paused clock below.)
#[tokio::test]
async fn a_402_stops_the_batch_at_concurrency_1() {
    let server = ScriptedOpenRouter::start(|_, _| {
        Reply::typed_error(402, "payment_required", "Insufficient credits")
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path())
        .set("STAGE3_CONCURRENCY", "1")
        .service()
        .await;
    let requests = (0..6).map(|i| request(&format!("credit-{i}"))).collect();
    let answer = service.generate_all_images(requests).await;

    assert_eq!(server.total_calls(), 1, "exactly one paid call attempt");
    assert_eq!(answer.failures.len(), 6);
    for failure in &answer.failures {
        assert_eq!(
            failure.error_type.as_str(),
            "insufficient_credits",
            "{}",
            failure.message
        );
    }
    // Whichever scene took the one slot first was refused; the other five never started.
    let unstarted = answer
        .failures
        .iter()
        .filter(|f| f.message.contains("not started"))
        .count();
    assert_eq!(unstarted, 5, "{:?}", answer.failures);
    assert_store_consistent(out.path(), &[]);
}

#[tokio::test]
async fn a_401_stops_the_batch_too() {
    let server = ScriptedOpenRouter::start(|_, _| {
        Reply::typed_error(401, "authentication", "No auth credentials found")
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path())
        .set("STAGE3_CONCURRENCY", "1")
        .service()
        .await;
    let requests = (0..4).map(|i| request(&format!("key-{i}"))).collect();
    let answer = service.generate_all_images(requests).await;
    assert_eq!(server.total_calls(), 1);
    assert!(answer
        .failures
        .iter()
        .all(|f| f.error_type.as_str() == "auth"));
}

// ---- Money ----------------------------------------------------------------------------

/// The standard catalogue prices the default model at $0.04 an image: three scenes are
/// estimated at $0.12, over a $0.10 budget, so nothing is called at all.
#[tokio::test]
async fn an_over_budget_batch_spends_nothing() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::image(&good_png(), "image/png")).await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path())
        .set("STAGE3_MAX_COST_USD", "0.10")
        .service()
        .await;
    let requests: Vec<GenerationRequest> =
        (0..3).map(|i| request(&format!("budget-{i}"))).collect();

    let scenes = service.prepare_all(requests.clone()).unwrap();
    let err = service.check_batch(&scenes).await.unwrap_err();
    assert_eq!(err.error_type().as_str(), "budget_exceeded", "{err}");
    assert!(err.to_string().contains("0.12"), "{err}");

    let answer = service.generate_all_images(requests).await;
    assert_eq!(server.total_calls(), 0, "nothing spent");
    assert_eq!(answer.failures.len(), 3);
    assert!(answer
        .failures
        .iter()
        .all(|f| f.error_type.as_str() == "budget_exceeded"));
    let estimate = answer.summary.estimated_cost_usd.unwrap();
    assert!((estimate - 0.12).abs() < 1e-9, "{estimate}");
}

/// The estimate fits ($0.08 ≤ $0.10) but the provider bills $0.09 an image: once spent +
/// the next estimate would pass the budget, no call starts.
#[tokio::test]
async fn spending_stops_when_the_next_call_would_pass_the_budget() {
    let png = good_png();
    let server = ScriptedOpenRouter::start(move |_, _| {
        Reply::json(
            200,
            serde_json::json!({"created": 1, "data": [{"b64_json":
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png),
                "media_type": "image/png"}], "usage": {"cost": 0.09}}),
        )
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let service = config(&server, out.path())
        .set("STAGE3_MAX_COST_USD", "0.10")
        .set("STAGE3_CONCURRENCY", "1")
        .service()
        .await;
    let answer = service
        .generate_all_images(vec![request("spend-0"), request("spend-1")])
        .await;
    assert_eq!(server.total_calls(), 1);
    assert_eq!(answer.results.len(), 1);
    assert_eq!(answer.failures[0].error_type.as_str(), "budget_exceeded");
    assert!((answer.summary.cost_usd - 0.09).abs() < 1e-9);
}

/// A provider slot stands for an image being drawn: once the provider answers (its status
/// line), the next scene's call starts while the answer's body is still downloading. Under
/// a spending limit it waits for the whole answer, whose body says what the call cost.
#[tokio::test]
async fn the_next_call_starts_at_the_answer_unless_spending_is_limited() {
    let png = good_png();
    let slow_body = Duration::from_millis(600);
    let server = ScriptedOpenRouter::start(move |_, _| {
        Reply::image(&png, "image/png").body_after(slow_body)
    })
    .await;
    for limited in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let mut settings = config(&server, out.path()).set("STAGE3_CONCURRENCY", "1");
        if limited {
            settings = settings.set("STAGE3_MAX_COST_USD", "1.00");
        }
        let service = settings.service().await;
        let before = server.requests().len();
        let answer = service
            .generate_all_images(vec![
                request(&format!("slot-{limited}-0")),
                request(&format!("slot-{limited}-1")),
            ])
            .await;
        assert_eq!(answer.results.len(), 2, "{:?}", answer.failures);
        let spans = server.spans().split_off(before);
        let (first, first_answered) = (&spans[0].0, spans[0].1.expect("answered"));
        let second = &spans[1].0;
        if limited {
            assert!(
                second.at >= first_answered,
                "under a budget the second call waits for the first answer's body"
            );
        } else {
            assert!(
                second.at < first.at + slow_body / 2,
                "the second call starts at the first answer's status line, {:?} after the \
                 first call",
                second.at - first.at
            );
        }
    }
}

// ---- Scheduling, on a paused clock ----------------------------------------------------
//
// Who waits for whom: slots, back-pressure pauses, the batch stopping. The real service runs
// over the in-process scripted provider and the in-memory store, with no socket, so tokio's
// paused clock stands still while the service works and jumps only when every task waits
// for time. Latencies and pauses then cost no real time, and every call starts at an exact
// instant: the tests compare instants, with no wall-clock tolerance.

/// The offline configuration, `concurrency` calls at once.
fn scheduled(concurrency: usize) -> TestConfig {
    TestConfig::new().set("STAGE3_CONCURRENCY", concurrency.to_string())
}

/// The real service over `provider` and the in-memory store.
fn over(config: TestConfig, provider: &Arc<ScriptedProvider>) -> Stage3Service {
    config.service_with(provider.clone(), Arc::new(MemoryStore::new()))
}

/// Each call's scene and start, counted from `start`, in the order the calls started.
fn starts(provider: &ScriptedProvider, start: Instant) -> Vec<(String, Duration)> {
    provider
        .started()
        .into_iter()
        .map(|call| (call.scene_id, call.at - start))
        .collect()
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// A small PNG that is quick to check: these tests look at when calls happen, not at
/// what they draw.
fn small_png() -> Bytes {
    Bytes::from(good_png())
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_pauses_the_whole_batch() {
    // Two slots. The first call is told 429 with Retry-After: 1 s after 100 ms, when the
    // second call is in flight beside it; every other call takes 300 ms. The call in flight
    // may finish, but no call may start inside the pause: not the next queued scene (which
    // gets the freed slot), not the retry. Both start the moment it ends, at 1.1 s.
    let throttled = AtomicBool::new(false);
    let png = small_png();
    let provider = Arc::new(ScriptedProvider::new(move |_, _| {
        if !throttled.swap(true, Ordering::SeqCst) {
            Answer::error(rate_limited(Duration::from_secs(1))).after(ms(100))
        } else {
            Answer::png(png.clone()).after(ms(300))
        }
    }));
    // Above the second asked for, which would otherwise be capped.
    let config = scheduled(2).set("STAGE3_RETRY_MAX_MS", "5000");
    let service = over(config, &provider);
    let start = Instant::now();
    let answer = service
        .generate_all_images(vec![request("first"), request("second"), request("third")])
        .await;
    assert_eq!(answer.results.len(), 3, "{:?}", answer.failures);

    let calls = starts(&provider, start);
    let at: Vec<Duration> = calls.iter().map(|(_, at)| *at).collect();
    assert_eq!(at, [ms(0), ms(0), ms(1100), ms(1100)], "{calls:?}");
    let throttled_scene = &calls[0].0;
    assert_eq!(
        provider.calls_for(throttled_scene),
        2,
        "{throttled_scene} was retried after the pause: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_scene_does_not_hold_up_the_free_slots() {
    // Two slots: "slow" takes 2 s; "a", "b" and "c" must flow through the other slot
    // meanwhile, each the moment the one before it is answered, not wait for "slow".
    let png = small_png();
    let provider = Arc::new(ScriptedProvider::new(move |scene, _| {
        let latency = if scene == "slow" { 2000 } else { 50 };
        Answer::png(png.clone()).after(ms(latency))
    }));
    let service = over(scheduled(2), &provider);
    let start = Instant::now();
    let answer = service
        .generate_all_images(vec![
            request("slow"),
            request("a"),
            request("b"),
            request("c"),
        ])
        .await;
    let ids: Vec<&str> = answer.results.iter().map(|r| r.scene_id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["slow", "a", "b", "c"],
        "results keep the input order"
    );
    assert_eq!(
        starts(&provider, start),
        [
            ("slow".to_string(), ms(0)),
            ("a".to_string(), ms(0)),
            ("b".to_string(), ms(50)),
            ("c".to_string(), ms(100)),
        ]
    );
    assert_eq!(start.elapsed(), ms(2000), "the batch took as long as slow");
}

#[tokio::test(start_paused = true)]
async fn never_more_provider_calls_than_the_concurrency_allows() {
    // Twelve 100 ms calls through three slots: four full waves, back to back.
    let png = small_png();
    let provider = Arc::new(ScriptedProvider::new(move |_, _| {
        Answer::png(png.clone()).after(ms(100))
    }));
    let service = over(scheduled(3), &provider);
    let start = Instant::now();
    let requests = (0..12).map(|i| request(&format!("limit-{i:02}"))).collect();
    let answer = service.generate_all_images(requests).await;
    assert_eq!(answer.results.len(), 12, "failures: {:?}", answer.failures);
    assert_eq!(
        provider.max_in_flight(),
        3,
        "the limit is used, and never exceeded"
    );
    let at: Vec<Duration> = starts(&provider, start)
        .into_iter()
        .map(|(_, at)| at)
        .collect();
    let waves: Vec<Duration> = (0..12).map(|i| ms(100 * (i / 3))).collect();
    assert_eq!(at, waves, "a freed slot is taken at once");
    assert_eq!(start.elapsed(), ms(400));
}

#[tokio::test(start_paused = true)]
async fn the_next_call_starts_while_an_answered_scene_is_still_being_stored() {
    // One slot. "first"'s image cannot be stored until "second"'s request has reached the
    // provider: if a scene kept its slot until stored, this batch could never finish (and
    // the paused clock would jump straight to the timeout below).
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let png = small_png();
    let provider = Arc::new(ScriptedProvider::new(move |scene, _| {
        if scene == "second" {
            open_gate.send_replace(true);
        }
        Answer::png(png.clone())
    }));
    let store = Arc::new(GatedStore::new(Arc::new(MemoryStore::new()), gate, |key| {
        key.ends_with(".png")
    }));
    let service = scheduled(1).service_with(provider.clone(), store);

    let batch = service.generate_all_images(vec![request("first"), request("second")]);
    let answer = tokio::time::timeout(Duration::from_secs(30), batch)
        .await
        .expect("the second call waited for the first scene's storage");
    assert_eq!(answer.results.len(), 2, "failures: {:?}", answer.failures);
    assert_eq!(provider.max_in_flight(), 1);
}

/// 402 at concurrency 3: the calls already in flight when it arrives finish, and none
/// starts after it.
#[tokio::test(start_paused = true)]
async fn a_402_stops_the_batch_at_concurrency_3() {
    // The first wave all starts before the first 402 is answered (300 ms); the 402 frees a
    // slot that the next scene must not use.
    let provider = Arc::new(ScriptedProvider::new(|scene, _| {
        let latency = if scene == "credit-0" { 300 } else { 600 };
        Answer::error(insufficient_credits()).after(ms(latency))
    }));
    let service = over(scheduled(3), &provider);
    let start = Instant::now();
    let requests = (0..10).map(|i| request(&format!("credit-{i}"))).collect();
    let answer = service.generate_all_images(requests).await;

    let calls = starts(&provider, start);
    let at: Vec<Duration> = calls.iter().map(|(_, at)| *at).collect();
    assert_eq!(
        at,
        [ms(0); 3],
        "the first wave only: nothing starts after the 402: {calls:?}"
    );
    assert_eq!(start.elapsed(), ms(600), "the calls in flight finished");
    assert_eq!(answer.failures.len(), 10);
    assert!(answer
        .failures
        .iter()
        .all(|f| f.error_type.as_str() == "insufficient_credits"));
}
