//! Generating from mainland China: the real Volcengine Ark and DashScope clients against
//! stand-ins answering exactly as their APIs document (`support::scripted_china`), through
//! the whole service.
//!
//! Every error code the providers document is table-tested for the `error_type` it becomes
//! and the number of calls it costs: a refusal, a bad key, an empty account, a bad
//! parameter or an unknown model is one call and no retry; throttling and server errors are
//! retried. A chain that crosses providers (DashScope, then Ark, then OpenRouter) moves on
//! when one provider's account or model fails, and says who drew the image.
//!
//! Answers that name the image by `https` URL are fetched through the image client, which
//! only trusts the stand-in's certificate in a process of its own: those runs are in
//! `tests/cli.rs`.

use std::sync::Arc;

use image::ImageFormat;
use serde_json::Value;

use crate::suite::support::config::TestConfig;
use crate::suite::support::scripted_china::{
    ark_base_url, ark_error, ark_image, dashscope_base_url, dashscope_error, requested_size,
};
use crate::suite::support::scripted_openrouter::{noisy_image, Reply, ScriptedOpenRouter};
use stage3::storage::MemoryStore;
use stage3::ErrorType;
use stage3::{BatchAnswer, GenerationRequest, Stage2Output};
use stage3::{RunOptions, Stage3Service};

const ARK_KEY: &str = "ark-test-secret-0123456789";
const DASHSCOPE_KEY: &str = "sk-dashscope-test-secret-0123";
const OPENROUTER_KEY: &str = "sk-or-v1-china-suite-secret";

fn request(scene_id: &str) -> GenerationRequest {
    Stage2Output {
        scene_id: scene_id.to_string(),
        image_prompt: format!("[{scene_id}] a red-crowned crane over a misty lake"),
        negative_prompt: "text, watermark".into(),
        style_tags: vec!["ink wash".into()],
        characters_in_scene: vec![],
    }
    .into()
}

/// Runs `scene_ids` as one batch through `config`'s service, one call at a time (so the
/// call counts do not depend on which scene wins a race).
async fn run(config: TestConfig, scene_ids: &[&str]) -> BatchAnswer {
    let service: Stage3Service = config
        .set("STAGE3_CONCURRENCY", "1")
        .set("STAGE3_MAX_RETRIES", "2")
        .service_with_store(Arc::new(MemoryStore::new()));
    let scenes = service
        .prepare_all(scene_ids.iter().map(|id| request(id)).collect())
        .unwrap();
    service
        .run_batch(scenes, &RunOptions::default(), &|_, _| {})
        .await
}

/// What every call of one error code should become, and what it should cost.
struct Expectation {
    status: u16,
    code: &'static str,
    error_type: ErrorType,
    /// Calls for a batch of two scenes, one at a time, with two retries.
    calls: usize,
}

const fn expect(
    status: u16,
    code: &'static str,
    error_type: ErrorType,
    calls: usize,
) -> Expectation {
    Expectation {
        status,
        code,
        error_type,
        calls,
    }
}

/// Two scenes meet `expectation` in turn; the answer and the calls made are checked.
async fn check(
    provider: &str,
    expectation: &Expectation,
    reply: fn(u16, &str) -> Reply,
    config: fn(&ScriptedOpenRouter) -> TestConfig,
) {
    let (status, code) = (expectation.status, expectation.code);
    let server = ScriptedOpenRouter::start(move |_, _| reply(status, code)).await;
    let answer = run(config(&server), &["s1", "s2"]).await;
    let context = format!("{provider} {status} {code}");
    assert!(answer.results.is_empty(), "{context}");
    assert_eq!(answer.failures.len(), 2, "{context}");
    for failure in &answer.failures {
        assert_eq!(
            failure.error_type, expectation.error_type,
            "{context}: {failure:?}"
        );
        for secret in [ARK_KEY, DASHSCOPE_KEY] {
            assert!(
                !failure.message.contains(secret),
                "{context}: {}",
                failure.message
            );
        }
    }
    assert_eq!(server.total_calls(), expectation.calls, "{context}: calls");
}

fn ark_config(server: &ScriptedOpenRouter) -> TestConfig {
    TestConfig::new().ark(&ark_base_url(&server.origin()), ARK_KEY)
}

fn dashscope_config(server: &ScriptedOpenRouter) -> TestConfig {
    TestConfig::new().dashscope(&dashscope_base_url(&server.origin()), DASHSCOPE_KEY)
}

#[tokio::test]
async fn every_ark_error_code_gives_its_error_type_at_its_cost() {
    use ErrorType::*;
    // Two scenes each: a permanent failure costs one call per scene; an account failure
    // stops the batch's calls to Ark after the first; a transient one is retried twice.
    for expectation in [
        expect(400, "InputTextSensitiveContentDetected", ContentPolicy, 2),
        expect(400, "InputImageSensitiveContentDetected", ContentPolicy, 2),
        expect(400, "OutputImageSensitiveContentDetected", ContentPolicy, 2),
        expect(401, "AuthenticationError", Auth, 1),
        expect(403, "AccountOverdueError", InsufficientCredits, 1),
        expect(429, "RateLimitExceeded.EndpointRPMExceeded", RateLimited, 6),
        expect(429, "RateLimitExceeded.EndpointIPMExceeded", RateLimited, 6),
        expect(400, "InvalidParameter", InvalidRequest, 2),
        // A model that does not exist or is not enabled: learnt once for the batch.
        expect(404, "InvalidEndpointOrModel.NotFound", ModelUnavailable, 1),
        expect(404, "ModelNotOpen", ModelUnavailable, 1),
        expect(500, "InternalServiceError", ProviderUnavailable, 6),
        // Codes nobody documented go by their status.
        expect(503, "SomethingNew", ProviderUnavailable, 6),
        expect(400, "SomethingNew", ProviderError, 2),
    ] {
        check("ark", &expectation, ark_error, ark_config).await;
    }
}

#[tokio::test]
async fn every_dashscope_error_code_gives_its_error_type_at_its_cost() {
    use ErrorType::*;
    for expectation in [
        expect(400, "DataInspectionFailed", ContentPolicy, 2),
        expect(401, "InvalidApiKey", Auth, 1),
        expect(400, "Arrearage", InsufficientCredits, 1),
        expect(429, "Throttling", RateLimited, 6),
        expect(429, "Throttling.RateQuota", RateLimited, 6),
        expect(429, "Throttling.AllocationQuota", RateLimited, 6),
        expect(400, "InvalidParameter", InvalidRequest, 2),
        expect(404, "ModelNotFound", ModelUnavailable, 1),
        expect(500, "InternalError", ProviderUnavailable, 6),
        expect(418, "SomethingNew", ProviderError, 2),
    ] {
        check("dashscope", &expectation, dashscope_error, dashscope_config).await;
    }
}

#[tokio::test]
async fn a_batch_on_ark_sends_the_models_sizes_with_the_watermark_off() {
    let server = ScriptedOpenRouter::start(|request, _| {
        let size = requested_size(request);
        // Seedream answers JPEG; a smaller picture of the same shape keeps the test fast.
        ark_image(
            &noisy_image(size.0 / 8, size.1 / 8, ImageFormat::Jpeg),
            size,
        )
    })
    .await;
    let service = ark_config(&server).service_with_store(Arc::new(MemoryStore::new()));
    let mut portrait = request("s2");
    portrait.size = Some("1024x1792".parse().unwrap());
    portrait.quality = Some("hd".parse().unwrap());
    let scenes = service.prepare_all(vec![request("s1"), portrait]).unwrap();
    let answer = service
        .run_batch(scenes, &RunOptions::default(), &|_, _| {})
        .await;
    assert_eq!(answer.failures, [], "{answer:?}");

    let mut bodies: Vec<Value> = server.requests().into_iter().map(|r| r.body).collect();
    bodies.sort_by_key(|body| body["prompt"].as_str().unwrap().to_string());
    for body in &bodies {
        assert_eq!(body["model"], "doubao-seedream-4-5-251128");
        assert_eq!(body["watermark"], false);
        assert_eq!(body["response_format"], "b64_json");
        assert_eq!(body["sequential_image_generation"], "disabled");
        assert!(body.get("seed").is_none() && body.get("negative_prompt").is_none());
        let prompt = body["prompt"].as_str().unwrap();
        assert!(prompt.ends_with("Avoid: text, watermark."), "{prompt}");
    }
    // Seedream 4.5 draws at least 3,686,400 pixels: 2K square, 4K portrait for hd.
    assert_eq!(bodies[0]["size"], "2048x2048");
    assert_eq!(bodies[1]["size"], "3040x5504");
    let requests = server.requests();
    assert_eq!(requests[0].path, "/api/v3/images/generations");
    assert_eq!(
        requests[0].headers["authorization"],
        format!("Bearer {ARK_KEY}")
    );

    for result in &answer.results {
        let params = &result.generation_params;
        assert_eq!(params.provider, "ark");
        assert_eq!(params.model, "doubao-seedream-4-5-251128");
        assert_eq!(params.source_format, "jpeg");
        assert_eq!(params.cost, Some(0.04), "Seedream 4.5's tabled price");
        assert_eq!(params.negative_prompt, None);
    }
    assert_eq!(answer.summary.cost_usd, 0.08);
    assert_eq!(answer.summary.estimated_cost_usd, Some(0.08));
}

/// DashScope answers an account in arrears; Ark knows no such model for this account; then
/// OpenRouter draws. The second scene goes straight to OpenRouter: the first taught the
/// batch that DashScope's account refuses and Ark's model is not open.
#[tokio::test]
async fn a_chain_moves_from_dashscope_to_ark_to_openrouter() {
    let dashscope = ScriptedOpenRouter::start(|_, _| dashscope_error(400, "Arrearage")).await;
    let ark = ScriptedOpenRouter::start(|_, _| ark_error(404, "ModelNotOpen")).await;
    let openrouter = ScriptedOpenRouter::start(|request, _| {
        let (w, h) = if request.body["aspect_ratio"] == "16:9" {
            (340, 192)
        } else {
            (256, 256)
        };
        Reply::image(&noisy_image(w, h, ImageFormat::Png), "image/png")
    })
    .await;
    let config = TestConfig::new()
        .openrouter(&openrouter.base_url, OPENROUTER_KEY)
        .ark(&ark_base_url(&ark.origin()), ARK_KEY)
        .dashscope(&dashscope_base_url(&dashscope.origin()), DASHSCOPE_KEY)
        .set("STAGE3_MODEL", "qwen-image-plus")
        .set(
            "STAGE3_MODEL_FALLBACKS",
            "ark:doubao-seedream-4-5-251128,openrouter:google/gemini-3.1-flash-image",
        );
    let mut wide = request("s2");
    wide.size = Some("1792x1024".parse().unwrap());
    let service = config
        .set("STAGE3_CONCURRENCY", "1")
        .service_with_store(Arc::new(MemoryStore::new()));
    let scenes = service.prepare_all(vec![request("s1"), wide]).unwrap();
    let answer = service
        .run_batch(scenes, &RunOptions::default(), &|_, _| {})
        .await;
    assert_eq!(answer.failures, [], "{answer:?}");
    assert_eq!(dashscope.total_calls(), 1);
    assert_eq!(ark.total_calls(), 1);
    assert_eq!(openrouter.total_calls(), 2);
    for result in &answer.results {
        let params = &result.generation_params;
        assert_eq!(params.provider, "openrouter");
        assert_eq!(params.api.as_deref(), Some("images"));
        assert_eq!(params.model, "google/gemini-3.1-flash-image");
        assert_eq!(
            params.requested_model.as_deref(),
            Some("dashscope:qwen-image-plus")
        );
        // OpenRouter was sent the folded prompt; DashScope would have had the negatives
        // apart.
        assert!(params.prompt.contains("Avoid: text, watermark."));
        assert_eq!(params.negative_prompt, None);
    }
    // What DashScope was sent: the text without negatives, the negatives apart, our prompt
    // unrewritten, no watermark, its fixed size.
    let sent = &dashscope.requests()[0].body;
    assert_eq!(sent["model"], "qwen-image-plus");
    let text = sent.pointer("/input/messages/0/content/0/text").unwrap();
    assert_eq!(
        text,
        "[s1] a red-crowned crane over a misty lake.\n\nStyle: ink wash."
    );
    assert_eq!(sent["parameters"]["negative_prompt"], "text, watermark");
    assert_eq!(sent["parameters"]["prompt_extend"], false);
    assert_eq!(sent["parameters"]["watermark"], false);
    assert_eq!(sent["parameters"]["size"], "1328*1328");
    assert_eq!(sent["parameters"]["n"], 1);
    assert_eq!(
        dashscope.requests()[0].headers["authorization"],
        format!("Bearer {DASHSCOPE_KEY}")
    );
}

/// A fallback whose provider has no key is left out with a warning; the provider of the
/// first model must have one, or the batch is refused before any call.
#[tokio::test]
async fn a_missing_key_skips_a_fallback_and_refuses_a_first_model() {
    let openrouter = ScriptedOpenRouter::start(|_, _| {
        Reply::image(&noisy_image(256, 256, ImageFormat::Png), "image/png")
    })
    .await;
    let service = TestConfig::new()
        .openrouter(&openrouter.base_url, OPENROUTER_KEY)
        .set("STAGE3_MODEL_FALLBACKS", "ark:doubao-seedream-4-5-251128")
        .service_with_store(Arc::new(MemoryStore::new()));
    let scene = service.prepare(request("s1")).unwrap();
    let plan = service.plan_scene(&scene).await.unwrap();
    assert_eq!(plan.models.len(), 1, "the keyless Ark link is left out");

    let mut asks_ark = request("s2");
    asks_ark.model = Some("ark:doubao-seedream-4-5-251128".into());
    let scene = service.prepare(asks_ark).unwrap();
    let err = service
        .check_batch(std::slice::from_ref(&scene))
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), ErrorType::Config);
    assert!(err.to_string().contains("ARK_API_KEY"), "{err}");
    assert_eq!(openrouter.total_calls(), 0);
}

/// What a model cannot take is refused for free, before any call: a seed on Seedream 4.5,
/// a prompt over Qwen-Image's limit, a model the table does not know.
#[tokio::test]
async fn what_a_tabled_model_cannot_take_is_refused_before_any_call() {
    let server = ScriptedOpenRouter::start(|_, _| ark_error(500, "InternalServiceError")).await;
    let service = ark_config(&server).service_with_store(Arc::new(MemoryStore::new()));
    let mut seeded = request("s1");
    seeded.seed = Some(42);
    let mut unknown = request("s2");
    unknown.model = Some("doubao-seedream-9-9".into());
    let mut long = request("s3");
    long.model = Some("dashscope:qwen-image".into());
    long.image_prompt = "鹤".repeat(900);
    for (scene, expected, says) in [
        (seeded, ErrorType::InvalidRequest, "seed"),
        (
            unknown,
            ErrorType::ModelUnavailable,
            "doubao-seedream-4-5-251128",
        ),
    ] {
        let prepared = service.prepare(scene).unwrap();
        let err = service.plan_scene(&prepared).await.unwrap_err();
        assert_eq!(err.error_type(), expected, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    let dashscope = TestConfig::new()
        .dashscope(&dashscope_base_url(&server.origin()), DASHSCOPE_KEY)
        .service_with_store(Arc::new(MemoryStore::new()));
    let prepared = dashscope.prepare(long).unwrap();
    let err = dashscope.plan_scene(&prepared).await.unwrap_err();
    assert_eq!(err.error_type(), ErrorType::InvalidRequest);
    assert!(err.to_string().contains("800"), "{err}");
    assert_eq!(server.total_calls(), 0);
}

/// NUL, ESC and a right-to-left override in a prompt never reach the provider, the record
/// or the answer; a model slug that walks a path is refused before any request.
#[tokio::test]
async fn hostile_text_and_slugs_stop_at_the_door() {
    let server = ScriptedOpenRouter::start(|request, _| {
        let size = requested_size(request);
        ark_image(
            &noisy_image(size.0 / 8, size.1 / 8, ImageFormat::Jpeg),
            size,
        )
    })
    .await;
    let service = ark_config(&server).service_with_store(Arc::new(MemoryStore::new()));
    let mut hostile = request("s1");
    hostile.image_prompt = "a crane\u{0} over\u{1b}[2J a lake \u{202e}gnp.exe".into();
    hostile.style_tags = vec!["ink\u{2066} wash".into()];
    let scenes = service.prepare_all(vec![hostile]).unwrap();
    let answer = service
        .run_batch(scenes, &RunOptions::default(), &|_, _| {})
        .await;
    assert_eq!(answer.failures, [], "{answer:?}");
    let sent = server.requests()[0].prompt().to_string();
    assert!(
        sent.starts_with("a crane over[2J a lake gnp.exe."),
        "{sent}"
    );
    assert!(sent.contains("Style: ink wash."), "{sent}");
    for text in [&sent, &answer.results[0].generation_params.prompt] {
        assert!(
            !text.contains(['\u{0}', '\u{1b}', '\u{202e}', '\u{2066}']),
            "{text:?}"
        );
    }

    let openrouter = TestConfig::new()
        .openrouter(&server.base_url, OPENROUTER_KEY)
        .service_with_store(Arc::new(MemoryStore::new()));
    for slug in ["../../etc", "google/../../etc", "gemini"] {
        let mut walking = request("s2");
        walking.model = Some(slug.into());
        let refused = match openrouter.prepare(walking) {
            Err(e) => e,
            Ok(scene) => openrouter
                .check_batch(std::slice::from_ref(&scene))
                .await
                .unwrap_err(),
        };
        assert_eq!(
            refused.error_type(),
            ErrorType::InvalidRequest,
            "{slug}: {refused}"
        );
    }
    assert_eq!(
        server.catalogue_requests().len(),
        0,
        "no catalogue path was built from a slug"
    );
}
