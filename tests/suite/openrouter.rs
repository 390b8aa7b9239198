//! The OpenRouter client against real HTTP servers on loopback: wiremock standing in for
//! OpenRouter, plus a hand-written HTTP/1.1 server where wiremock cannot misbehave enough
//! (a body that never ends, counting connections).

use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::suite::support::config::TestConfig;
use crate::suite::support::scripted_openrouter::chat_answer;
use base64::Engine as _;
use image::{DynamicImage, ImageFormat};
use serde_json::{json, Value};
use stage3::provider::{ImageProvider, ImageRequest, OpenRouterProvider};
use stage3::CallBudget;
use stage3::ProviderFailure;
use stage3::{Config, ErrorType, Stage3Error};
use stage3::{ImageQuality, ImageSize};
use stage3::{ImageSpec, ModelRef, ProviderKind};
use wiremock::matchers::{bearer_token, body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-or-v1-test-0123456789abcdef-secret";
const MODEL: &str = "google/gemini-2.5-flash-image";
const PROMPT: &str = "A lighthouse at dawn, watercolour. Avoid: text, watermark";

fn config(base_url: &str, extra: &[(&str, &str)]) -> Config {
    TestConfig::new()
        .openrouter(base_url, KEY)
        .set("STAGE3_MODEL", MODEL)
        .set_all(extra)
        .build()
}

fn provider(base_url: &str, extra: &[(&str, &str)]) -> OpenRouterProvider {
    OpenRouterProvider::new(&config(base_url, extra).providers.openrouter).unwrap()
}

fn chat_provider(base_url: &str) -> OpenRouterProvider {
    provider(base_url, &[("STAGE3_OPENROUTER_API", "chat")])
}

/// One provider call, owned: the image spec and the call's time budget.
struct Call {
    spec: ImageSpec,
    timeout: Duration,
}

impl Call {
    fn request(&self) -> ImageRequest<'_> {
        ImageRequest {
            scene_id: "scene-1",
            spec: &self.spec,
            model: &self.spec.model.model,
            budget: CallBudget::new(self.timeout),
            gate: None,
        }
    }
}

fn call(timeout: Duration) -> Call {
    Call {
        spec: ImageSpec {
            prompt: PROMPT.into(),
            seed: Some(42),
            ..ImageSpec::plain(
                ModelRef::resolve(MODEL, ProviderKind::OpenRouter),
                ImageSize::Landscape,
                ImageQuality::Hd,
            )
        },
        timeout,
    }
}

fn normal_request() -> Call {
    call(Duration::from_secs(20))
}

fn encoded_image(format: ImageFormat) -> Vec<u8> {
    let pixels = image::RgbImage::from_fn(16, 9, |x, y| {
        image::Rgb([(x * 15) as u8, (y * 28) as u8, ((x + y) * 7) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(pixels)
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn images_answer(bytes: &[u8], media_type: &str) -> Value {
    json!({
        "created": 1_764_000_000,
        "data": [{"b64_json": b64(bytes), "media_type": media_type}],
        "usage": {"cost": 0.039, "prompt_tokens": 12}
    })
}

fn openrouter_error(code: u16, error_type: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message,
                     "metadata": {"error_type": error_type, "provider_name": "Google"}}})
}

fn failure_of(error: &Stage3Error) -> &ProviderFailure {
    match error {
        Stage3Error::Auth(f)
        | Stage3Error::InsufficientCredits(f)
        | Stage3Error::ContentPolicy(f)
        | Stage3Error::RateLimited(f)
        | Stage3Error::ProviderUnavailable(f)
        | Stage3Error::ProviderError(f)
        | Stage3Error::PermissionDenied(f) => f,
        other => panic!("no provider failure in {other:?}"),
    }
}

async fn mount_images(server: &MockServer, answer: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path("/images"))
        .respond_with(answer)
        .mount(server)
        .await;
}

async fn generate_error(provider: &OpenRouterProvider) -> Stage3Error {
    provider
        .generate(&normal_request().request())
        .await
        .unwrap_err()
}

// ---- Image API ------------------------------------------------------------------------

#[tokio::test]
async fn images_api_sends_the_documented_request_and_returns_the_png_unchanged() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    Mock::given(method("POST"))
        .and(path("/images"))
        .and(bearer_token(KEY))
        .and(header("content-type", "application/json"))
        .and(header("http-referer", "https://stories.example.com"))
        .and(header("x-openrouter-title", "Story Pipeline"))
        .and(body_json(json!({
            "model": MODEL,
            "prompt": PROMPT,
            "n": 1,
            "aspect_ratio": "16:9",
            "resolution": "2K",
            "output_format": "png",
            "seed": 42
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(images_answer(&png, "image/png")))
        .expect(1)
        .mount(&server)
        .await;
    let provider = provider(
        &server.uri(),
        &[
            ("STAGE3_HTTP_REFERER", "https://stories.example.com"),
            ("STAGE3_APP_TITLE", "Story Pipeline"),
        ],
    );

    let image = provider
        .generate(&normal_request().request())
        .await
        .unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
    assert_eq!(image.cost, Some(0.039));
    assert_eq!(provider.identity().name(), "openrouter");
    assert_eq!(provider.identity().variant, Some("images"));
}

#[tokio::test]
async fn images_api_omits_an_unset_seed_and_maps_square_standard() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    Mock::given(method("POST"))
        .and(path("/images"))
        .and(body_json(json!({
            "model": "openai/gpt-image-1",
            "prompt": "p",
            "n": 1,
            "aspect_ratio": "1:1",
            "resolution": "1K",
            "output_format": "png"
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "created": 1, "data": [{"b64_json": b64(&png), "media_type": "image/png"}]
        })))
        .expect(1)
        .mount(&server)
        .await;
    let provider = provider(&server.uri(), &[]);
    let mut call = normal_request();
    call.spec = ImageSpec {
        prompt: "p".into(),
        ..ImageSpec::plain(
            ModelRef::resolve("openai/gpt-image-1", ProviderKind::OpenRouter),
            ImageSize::Square,
            ImageQuality::Standard,
        )
    };
    let request = call.request();

    let image = provider.generate(&request).await.unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
    assert_eq!(image.cost, None, "no usage, no cost");
    // Nothing but the documented headers: no attribution when none is configured.
    let received = server.received_requests().await.unwrap();
    assert!(received[0].headers.get("http-referer").is_none());
    assert!(received[0].headers.get("x-openrouter-title").is_none());
}

#[tokio::test]
async fn a_jpeg_labelled_png_comes_back_as_the_jpeg_bytes() {
    let server = MockServer::start().await;
    let jpeg = encoded_image(ImageFormat::Jpeg);
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_json(images_answer(&jpeg, "image/png")),
    )
    .await;

    let image = provider(&server.uri(), &[])
        .generate(&normal_request().request())
        .await
        .unwrap();

    assert_eq!(image.bytes.as_ref(), jpeg.as_slice());
    assert_eq!(
        &image.bytes[..3],
        b"\xFF\xD8\xFF",
        "still a JPEG: converting is not ours"
    );
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
}

#[tokio::test]
async fn a_data_url_where_raw_base64_was_promised_is_tolerated() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_json(json!({
            "created": 1,
            "data": [{"b64_json": format!("data:image/png;base64,{}", b64(&png))}]
        })),
    )
    .await;

    let image = provider(&server.uri(), &[])
        .generate(&normal_request().request())
        .await
        .unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
}

#[tokio::test]
async fn an_escaped_slash_in_the_base64_still_decodes() {
    // Some JSON encoders write `/` as `\/`; the string can no longer be borrowed but must
    // decode the same.
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    let body = format!(
        r#"{{"created":1,"data":[{{"b64_json":"{}","media_type":"image/png"}}]}}"#,
        b64(&png).replace('/', "\\/")
    );
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_raw(body, "application/json"),
    )
    .await;

    let image = provider(&server.uri(), &[])
        .generate(&normal_request().request())
        .await
        .unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
}

#[tokio::test]
async fn an_empty_data_list_is_a_retryable_provider_error() {
    let server = MockServer::start().await;
    mount_images(
        &server,
        ResponseTemplate::new(200)
            .set_body_json(json!({"created": 1, "data": [], "usage": {"cost": 0}})),
    )
    .await;

    let err = generate_error(&provider(&server.uri(), &[])).await;

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert_eq!(failure_of(&err).status, Some(200));
    assert!(err.is_transient());
    assert!(err.to_string().contains("no image"), "{err}");
}

#[tokio::test]
async fn images_api_sends_reference_images_as_input_references() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    Mock::given(method("POST"))
        .and(path("/images"))
        .and(body_json(json!({
            "model": MODEL,
            "prompt": PROMPT,
            "n": 1,
            "aspect_ratio": "16:9",
            "resolution": "2K",
            "output_format": "png",
            "seed": 42,
            "input_references": [
                {"type": "image_url", "image_url": {"url": "https://cdn.example.com/fox.png"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
            ]
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(images_answer(&png, "image/png")))
        .expect(1)
        .mount(&server)
        .await;
    let references = [
        "https://cdn.example.com/fox.png".to_string(),
        "data:image/png;base64,iVBORw0KGgo=".to_string(),
    ];
    let mut call = normal_request();
    call.spec.references = references.to_vec();
    let request = call.request();
    let image = provider(&server.uri(), &[])
        .generate(&request)
        .await
        .unwrap();
    assert_eq!(image.bytes.as_ref(), png.as_slice());
}

// ---- Chat path ------------------------------------------------------------------------

#[tokio::test]
async fn chat_path_sends_references_as_content_parts_and_honours_image_only_models() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .and(body_json(json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image_url", "image_url": {"url": "https://cdn.example.com/fox.png"}}
            ]}],
            "modalities": ["image"],
            "image_config": {"aspect_ratio": "16:9", "image_size": "2K"},
            "seed": 42
        })))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(chat_answer(&format!("data:image/png;base64,{}", b64(&png)))),
        )
        .expect(1)
        .mount(&server)
        .await;
    let provider = provider(
        &server.uri(),
        &[
            ("STAGE3_OPENROUTER_API", "chat"),
            ("STAGE3_CHAT_MODALITIES", "image"),
        ],
    );
    let references = ["https://cdn.example.com/fox.png".to_string()];
    let mut call = normal_request();
    call.spec.references = references.to_vec();
    let request = call.request();
    let image = provider.generate(&request).await.unwrap();
    assert_eq!(image.bytes.as_ref(), png.as_slice());
}

#[tokio::test]
async fn chat_path_sends_the_documented_request_and_decodes_the_data_url() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .and(bearer_token(KEY))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "modalities": ["image", "text"],
            "image_config": {"aspect_ratio": "16:9", "image_size": "2K"},
            "seed": 42
        })))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(chat_answer(&format!("data:image/png;base64,{}", b64(&png)))),
        )
        .expect(1)
        .mount(&server)
        .await;
    let provider = chat_provider(&server.uri());

    let image = provider
        .generate(&normal_request().request())
        .await
        .unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
    assert_eq!(image.cost, Some(0.0387));
    assert_eq!(provider.identity().variant, Some("chat"));
}

#[tokio::test]
async fn chat_path_returns_a_jpeg_data_url_as_jpeg_bytes() {
    let server = MockServer::start().await;
    let jpeg = encoded_image(ImageFormat::Jpeg);
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(chat_answer(&format!(
                "data:image/jpeg;base64,{}",
                b64(&jpeg)
            ))),
        )
        .mount(&server)
        .await;

    let image = chat_provider(&server.uri())
        .generate(&normal_request().request())
        .await
        .unwrap();

    assert_eq!(image.bytes.as_ref(), jpeg.as_slice());
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/jpeg"));
}

#[tokio::test]
async fn chat_path_refuses_a_plain_http_image_url_without_fetching_it() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    let image_url = format!("{}/generated/1.png", server.uri());
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(chat_answer(&image_url)))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/generated/1.png"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(png, "image/png"))
        .expect(0)
        .mount(&server)
        .await;

    let err = generate_error(&chat_provider(&server.uri())).await;

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert!(err.to_string().contains("http"), "{err}");
}

#[tokio::test]
async fn chat_path_without_an_image_reports_what_the_model_said() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "choices": [{"finish_reason": "stop",
                         "message": {"role": "assistant", "content": "I can only describe it."}}]
        })))
        .mount(&server)
        .await;

    let err = generate_error(&chat_provider(&server.uri())).await;

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert_eq!(failure_of(&err).status, Some(200));
    assert!(err.is_transient());
    assert!(err.to_string().contains("I can only describe it."), "{err}");
}

#[tokio::test]
async fn chat_path_classifies_errors_like_the_image_api() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .respond_with(ResponseTemplate::new(402).set_body_json(openrouter_error(
            402,
            "insufficient_credits",
            "Insufficient credits",
        )))
        .mount(&server)
        .await;

    let err = generate_error(&chat_provider(&server.uri())).await;

    assert_eq!(err.error_type(), ErrorType::InsufficientCredits, "{err}");
    assert_eq!(failure_of(&err).status, Some(402));
}

// ---- Error statuses -------------------------------------------------------------------

#[tokio::test]
async fn every_documented_error_status_maps_to_its_error_type() {
    let server = MockServer::start().await;
    let provider = provider(&server.uri(), &[]);
    let cases = [
        (400, ErrorType::ProviderError, false),
        (401, ErrorType::Auth, false),
        (402, ErrorType::InsufficientCredits, false),
        (403, ErrorType::PermissionDenied, false),
        (408, ErrorType::Timeout, true),
        (413, ErrorType::ProviderError, false),
        (429, ErrorType::RateLimited, true),
        (500, ErrorType::ProviderUnavailable, true),
        (502, ErrorType::ProviderUnavailable, true),
        (503, ErrorType::ProviderUnavailable, true),
        (504, ErrorType::ProviderUnavailable, true),
        (524, ErrorType::ProviderUnavailable, true),
        (529, ErrorType::ProviderUnavailable, true),
    ];
    for (status, expected, transient) in cases {
        server.reset().await;
        let kind = format!("kind_{status}");
        let message = format!("explanation {status}");
        mount_images(
            &server,
            ResponseTemplate::new(status).set_body_json(openrouter_error(status, &kind, &message)),
        )
        .await;

        let err = generate_error(&provider).await;

        assert_eq!(err.error_type(), expected, "{status}: {err}");
        assert_eq!(err.is_transient(), transient, "{status}: {err}");
        assert!(err.to_string().contains(&message), "{status}: {err}");
        assert!(err.to_string().contains(&status.to_string()), "{err}");
        if status != 408 {
            let failure = failure_of(&err);
            assert_eq!(failure.status, Some(status));
            assert_eq!(failure.provider_error_type.as_deref(), Some(kind.as_str()));
            assert_eq!(
                failure.message,
                format!("{MODEL}: {message}"),
                "names the model"
            );
            assert_eq!(failure.retry_after, None);
        }
    }
}

#[tokio::test]
async fn the_content_policy_error_type_is_kept() {
    let server = MockServer::start().await;
    mount_images(
        &server,
        ResponseTemplate::new(403).set_body_json(json!({"error": {
            "code": 403,
            "message": "Your input was flagged",
            "metadata": {"error_type": "content_policy_violation", "reasons": ["violence"],
                         "flagged_input": "…", "provider_name": null, "model_slug": MODEL}
        }})),
    )
    .await;

    let err = generate_error(&provider(&server.uri(), &[])).await;

    assert_eq!(err.error_type(), ErrorType::ContentPolicy);
    assert_eq!(
        failure_of(&err).provider_error_type.as_deref(),
        Some("content_policy_violation")
    );
}

#[tokio::test]
async fn retry_after_is_read_as_seconds_or_as_a_date() {
    let server = MockServer::start().await;
    let provider = provider(&server.uri(), &[]);
    let rate_limited =
        || ResponseTemplate::new(429).set_body_json(openrouter_error(429, "rate_limit", "slow"));

    mount_images(&server, rate_limited()).await;
    let err = generate_error(&provider).await;
    assert_eq!(err.error_type(), ErrorType::RateLimited);
    assert_eq!(err.retry_after(), None);

    server.reset().await;
    mount_images(&server, rate_limited().insert_header("retry-after", "17")).await;
    let err = generate_error(&provider).await;
    assert_eq!(err.error_type(), ErrorType::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(17)));
    assert_eq!(failure_of(&err).status, Some(429));

    server.reset().await;
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    mount_images(
        &server,
        rate_limited().insert_header("retry-after", date.as_str()),
    )
    .await;
    let err = generate_error(&provider).await;
    let wait = err.retry_after().expect("a date gives a delay");
    // The date has one-second resolution and the clock moves while the test runs.
    assert!(
        (Duration::from_secs(100)..=Duration::from_secs(120)).contains(&wait),
        "{wait:?}"
    );

    server.reset().await;
    mount_images(
        &server,
        ResponseTemplate::new(503)
            .insert_header("retry-after", "5")
            .set_body_json(openrouter_error(503, "unavailable", "no provider")),
    )
    .await;
    let err = generate_error(&provider).await;
    assert_eq!(err.error_type(), ErrorType::ProviderUnavailable);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
}

#[tokio::test]
async fn an_error_inside_a_200_is_classified_by_its_code() {
    let server = MockServer::start().await;
    let provider = provider(&server.uri(), &[]);

    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_json(openrouter_error(
            402,
            "insufficient_credits",
            "add credits",
        )),
    )
    .await;
    let err = generate_error(&provider).await;
    assert_eq!(err.error_type(), ErrorType::InsufficientCredits, "{err}");
    assert_eq!(failure_of(&err).status, Some(402));
    assert!(!err.is_transient());

    server.reset().await;
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_json(openrouter_error(502, "upstream", "boom")),
    )
    .await;
    let err = generate_error(&provider).await;
    assert_eq!(err.error_type(), ErrorType::ProviderUnavailable, "{err}");

    server.reset().await;
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_json(json!({"error": {"message": "odd"}})),
    )
    .await;
    let err = generate_error(&provider).await;
    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert_eq!(failure_of(&err).status, Some(200));
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_non_json_200_is_a_retryable_provider_error() {
    let server = MockServer::start().await;
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_raw("<html>maintenance</html>", "text/html"),
    )
    .await;

    let err = generate_error(&provider(&server.uri(), &[])).await;

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert_eq!(failure_of(&err).status, Some(200));
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_malformed_answer_does_not_put_the_body_in_the_message() {
    let server = MockServer::start().await;
    // `data` should be a list; serde would quote this whole string in its error.
    let huge = "A".repeat(200_000);
    mount_images(
        &server,
        ResponseTemplate::new(200).set_body_json(json!({"created": 1, "data": huge})),
    )
    .await;

    let err = generate_error(&provider(&server.uri(), &[])).await;

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert!(err.to_string().contains("data"), "names the field: {err}");
    assert!(
        err.to_string().len() < 1000,
        "{} chars",
        err.to_string().len()
    );
}

#[tokio::test]
async fn an_html_error_page_is_classified_by_status_with_a_short_message() {
    let server = MockServer::start().await;
    let page = format!("<html>{}</html>", "Bad gateway. ".repeat(5000));
    mount_images(
        &server,
        ResponseTemplate::new(502).set_body_raw(page, "text/html"),
    )
    .await;

    let err = generate_error(&provider(&server.uri(), &[])).await;

    assert_eq!(err.error_type(), ErrorType::ProviderUnavailable, "{err}");
    assert_eq!(failure_of(&err).status, Some(502));
    assert!(err.to_string().len() < 1000, "{err}");
}

// ---- Size cap, timeouts, connections ---------------------------------------------------

#[tokio::test]
async fn a_body_over_the_cap_is_refused() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    let mut answer = images_answer(&png, "image/png");
    answer["padding"] = json!("x".repeat(4096));
    mount_images(&server, ResponseTemplate::new(200).set_body_json(answer)).await;

    let err = generate_error(&provider(
        &server.uri(),
        &[("STAGE3_MAX_RESPONSE_BYTES", "2048")],
    ))
    .await;

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert!(
        err.to_string().contains("STAGE3_MAX_RESPONSE_BYTES"),
        "{err}"
    );
}

#[tokio::test]
async fn the_cap_is_enforced_while_reading_a_body_that_never_ends() {
    // Chunked, no Content-Length, and the server never finishes: only counting the bytes
    // as they arrive can stop this before the request's timeout.
    let server = RawServer::start(|stream, _request| {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        let _ = stream.write_all(head.as_bytes());
        let chunk = format!("{{\"data\":[{{\"b64_json\":\"{}", "A".repeat(4000));
        let _ = write!(stream, "{:x}\r\n{chunk}\r\n", chunk.len());
        let _ = stream.flush();
        std::thread::sleep(Duration::from_secs(60));
        false
    });
    let provider = provider(&server.url(), &[("STAGE3_MAX_RESPONSE_BYTES", "2048")]);

    let err = provider
        .generate(&call(Duration::from_secs(30)).request())
        .await
        .unwrap_err();

    assert_eq!(err.error_type(), ErrorType::ProviderError, "{err}");
    assert!(
        err.to_string().contains("STAGE3_MAX_RESPONSE_BYTES"),
        "{err}"
    );
}

#[tokio::test]
async fn a_provider_that_hangs_past_the_timeout_is_a_timeout() {
    let server = MockServer::start().await;
    let png = encoded_image(ImageFormat::Png);
    mount_images(
        &server,
        ResponseTemplate::new(200)
            .set_body_json(images_answer(&png, "image/png"))
            .set_delay(Duration::from_secs(30)),
    )
    .await;

    let err = provider(&server.uri(), &[])
        .generate(&call(Duration::from_millis(300)).request())
        .await
        .unwrap_err();

    assert_eq!(err.error_type(), ErrorType::Timeout, "{err}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_refused_connection_is_provider_unavailable() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let provider = provider(&format!("http://127.0.0.1:{port}"), &[]);

    let err = generate_error(&provider).await;

    assert_eq!(err.error_type(), ErrorType::ProviderUnavailable, "{err}");
    assert_eq!(failure_of(&err).status, None);
    assert!(err.is_transient());
}

#[tokio::test]
async fn one_connection_serves_consecutive_requests() {
    let png = encoded_image(ImageFormat::Png);
    let body = images_answer(&png, "image/png").to_string();
    let server = RawServer::start(move |stream, _request| {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).is_ok() && stream.write_all(body.as_bytes()).is_ok()
    });
    let provider = provider(&server.url(), &[]);

    for _ in 0..3 {
        let image = provider
            .generate(&normal_request().request())
            .await
            .unwrap();
        assert_eq!(image.bytes.as_ref(), png.as_slice());
    }

    assert_eq!(server.requests(), 3);
    assert_eq!(
        server.connections(),
        1,
        "the client should reuse its connection"
    );
}

// ---- Secrets ---------------------------------------------------------------------------

#[tokio::test]
async fn the_key_never_appears_in_errors_or_debug_output() {
    let server = MockServer::start().await;
    let provider = provider(&server.uri(), &[]);
    let debug = format!("{provider:?}");
    assert!(!debug.contains(KEY), "{debug}");
    assert!(!debug.contains("0123456789abcdef"), "{debug}");

    let mut errors = Vec::new();
    // A provider that echoes the key back, in every place it could.
    for (status, body) in [
        (
            401,
            openrouter_error(401, KEY, &format!("Invalid key: Bearer {KEY}")).to_string(),
        ),
        (200, format!("<html>your key {KEY} is bad</html>")),
        (200, json!({"data": KEY}).to_string()),
        (500, format!("upstream said {KEY}")),
    ] {
        server.reset().await;
        mount_images(
            &server,
            ResponseTemplate::new(status).set_body_raw(body, "application/json"),
        )
        .await;
        errors.push(generate_error(&provider).await);
    }
    server.reset().await;
    mount_images(
        &server,
        ResponseTemplate::new(200).set_delay(Duration::from_secs(30)),
    )
    .await;
    errors.push(
        provider
            .generate(&call(Duration::from_millis(200)).request())
            .await
            .unwrap_err(),
    );
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    errors.push(generate_error(&self::provider(&format!("http://127.0.0.1:{port}"), &[])).await);

    assert_eq!(errors[0].error_type(), ErrorType::Auth);
    for err in &errors {
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains(KEY), "{text}");
            assert!(!text.contains("0123456789abcdef"), "{text}");
        }
    }
}

#[test]
fn a_missing_key_is_a_config_error() {
    let config = Config::from_lookup(|_| None).unwrap();
    let err = OpenRouterProvider::new(&config.providers.openrouter).unwrap_err();
    assert_eq!(err.error_type(), ErrorType::Config);
    assert!(err.to_string().contains("OPENROUTER_API_KEY"), "{err}");
}

// ---- A minimal HTTP/1.1 server ----------------------------------------------------------

/// Accepts connections on loopback and answers each request with `respond`, which writes
/// the whole response and says whether to keep the connection open.
struct RawServer {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl RawServer {
    fn start(respond: impl Fn(&mut TcpStream, &[u8]) -> bool + Send + Sync + 'static) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let respond = Arc::new(respond);
        let (connection_count, request_count) = (connections.clone(), requests.clone());
        // The threads outlive the test function; the test binary's exit ends them.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                connection_count.fetch_add(1, Ordering::SeqCst);
                let (respond, request_count) = (respond.clone(), request_count.clone());
                std::thread::spawn(move || {
                    while let Some(request) = read_request(&mut stream) {
                        request_count.fetch_add(1, Ordering::SeqCst);
                        if !respond(&mut stream, &request) {
                            return;
                        }
                    }
                });
            }
        });
        RawServer {
            address,
            connections,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request (head and `content-length` body); `None` when the peer hung up.
fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        request.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    request.extend_from_slice(&body);
    Some(request)
}

// ---- OpenRouter as it really is: typed errors through the service ---------------------
//
// Each row of the error mapping (docs/design.md §3 → our `error_type`s) against the real
// service, retries and catalogue, over a real HTTP stand-in that answers exactly as
// OpenRouter's error reference documents: how many calls each costs, and what it says.

mod real {
    use super::*;
    use crate::suite::support::scripted_openrouter::{
        noisy_image, Catalogue, CatalogueModel, Reply, ScriptedOpenRouter,
    };
    use stage3::Stage3Service;
    use stage3::{GenerationRequest, Stage2Output};

    pub const KEY: &str = "sk-or-v1-typed-errors-secret";

    pub async fn service(
        server: &ScriptedOpenRouter,
        out: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Stage3Service {
        TestConfig::new()
            .openrouter(&server.base_url, KEY)
            .out(out)
            .loopback_image_urls()
            .set("STAGE3_MAX_RETRIES", "1")
            .set_all(extra)
            .service()
            .await
    }

    pub fn scene(id: &str) -> GenerationRequest {
        Stage2Output {
            scene_id: id.to_string(),
            image_prompt: format!("[{id}] a lighthouse on a cliff at dusk"),
            negative_prompt: String::new(),
            style_tags: vec![],
            characters_in_scene: vec![],
        }
        .into()
    }

    pub fn square_png() -> Vec<u8> {
        noisy_image(256, 256, ImageFormat::Png)
    }

    /// One scene whose every call gets `reply`: its outcome's `error_type`, message and
    /// the number of generation calls it cost.
    pub async fn outcome_of(reply: Reply, extra: &[(&str, &str)]) -> (String, String, usize) {
        let server = ScriptedOpenRouter::start(move |_, _| reply.clone()).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), extra).await;
        let answer = service.generate_all_images(vec![scene("row")]).await;
        let failure = answer
            .failures
            .first()
            .unwrap_or_else(|| panic!("the scene should fail: {answer:?}"));
        assert!(!failure.message.contains(KEY));
        (
            failure.error_type.as_str().to_string(),
            failure.message.clone(),
            server.total_calls(),
        )
    }

    /// One test per row: the reply, the `error_type` it must give, the calls it may cost
    /// (1 = never retried; 2 = retried once, `STAGE3_MAX_RETRIES=1`), and what the message
    /// must name.
    macro_rules! mapping_row {
        ($name:ident, $reply:expr, $error_type:expr, $calls:expr, $names:expr) => {
            mapping_row!($name, $reply, $error_type, $calls, $names, &[]);
        };
        ($name:ident, $reply:expr, $error_type:expr, $calls:expr, $names:expr, $extra:expr) => {
            #[tokio::test]
            async fn $name() {
                let (error_type, message, calls) = outcome_of($reply, $extra).await;
                assert_eq!(error_type, $error_type, "{message}");
                assert_eq!(calls, $calls, "provider calls: {message}");
                for name in $names {
                    assert!(message.contains(name), "{name:?} missing from {message}");
                }
            }
        };
    }

    const DEFAULT: &str = stage3::DEFAULT_MODEL;
    const CHAT: &[(&str, &str)] = &[("STAGE3_OPENROUTER_API", "chat")];

    mapping_row!(
        a_400_content_policy_violation_is_content_policy_after_one_call,
        Reply::typed_error(400, "content_policy_violation", "Input was flagged"),
        "content_policy",
        1,
        [DEFAULT, "Input was flagged"]
    );
    mapping_row!(
        a_400_refusal_is_content_policy_after_one_call,
        Reply::typed_error(400, "refusal", "The model declined"),
        "content_policy",
        1,
        [DEFAULT, "The model declined"]
    );
    mapping_row!(
        a_403_permission_denied_is_permission_denied_not_content_policy,
        Reply::typed_error(403, "permission_denied", "Guardrail blocked this model"),
        "permission_denied",
        1,
        ["Guardrail blocked this model"]
    );
    mapping_row!(
        a_401_authentication_is_auth,
        Reply::typed_error(401, "authentication", "No auth credentials found"),
        "auth",
        1,
        ["No auth credentials found"]
    );
    mapping_row!(
        a_402_payment_required_is_insufficient_credits,
        Reply::typed_error(402, "payment_required", "Insufficient credits"),
        "insufficient_credits",
        1,
        ["Insufficient credits"]
    );
    mapping_row!(
        a_400_invalid_request_is_a_permanent_provider_error,
        Reply::typed_error(400, "invalid_request", "aspect_ratio is invalid"),
        "provider_error",
        1,
        ["aspect_ratio is invalid"]
    );
    mapping_row!(
        a_400_invalid_prompt_is_a_permanent_provider_error,
        Reply::typed_error(400, "invalid_prompt", "prompt is empty"),
        "provider_error",
        1,
        ["prompt is empty"]
    );
    mapping_row!(
        a_400_image_download_failed_names_the_reference_image,
        Reply::typed_error(
            400,
            "image_download_failed",
            "could not fetch input_references[0]"
        ),
        "provider_error",
        1,
        ["reference image", "input_references[0]"]
    );
    mapping_row!(
        a_404_not_found_is_a_permanent_provider_error,
        Reply::typed_error(404, "not_found", "no such route"),
        "provider_error",
        1,
        ["no such route"]
    );
    mapping_row!(
        a_413_payload_too_large_is_a_permanent_provider_error,
        Reply::typed_error(413, "payload_too_large", "body too big"),
        "provider_error",
        1,
        ["body too big"]
    );
    mapping_row!(
        a_429_rate_limit_exceeded_is_rate_limited_after_its_retries,
        Reply::typed_error(429, "rate_limit_exceeded", "slow down"),
        "rate_limited",
        2,
        ["slow down"]
    );
    mapping_row!(
        a_502_provider_unavailable_is_provider_unavailable_after_its_retries,
        Reply::typed_error(502, "provider_unavailable", "upstream gave nothing"),
        "provider_unavailable",
        2,
        ["upstream gave nothing"]
    );
    mapping_row!(
        a_503_provider_overloaded_is_provider_unavailable_after_its_retries,
        Reply::typed_error(503, "provider_overloaded", "overloaded"),
        "provider_unavailable",
        2,
        ["overloaded"]
    );
    mapping_row!(
        a_500_server_is_provider_unavailable_after_its_retries,
        Reply::typed_error(500, "server", "Internal Server Error"),
        "provider_unavailable",
        2,
        ["Internal Server Error"]
    );
    mapping_row!(
        a_504_timeout_is_timeout_after_its_retries,
        Reply::typed_error(504, "timeout", "upstream timed out"),
        "timeout",
        2,
        ["upstream timed out"]
    );
    mapping_row!(
        a_deprecated_model_without_fallbacks_is_model_unavailable_after_one_call,
        Reply::availability(
            404,
            "not_found",
            "model_deprecated",
            false,
            DEFAULT,
            &["google/gemini-3.5-flash-image"]
        ),
        "model_unavailable",
        1,
        [DEFAULT, "model_deprecated", "google/gemini-3.5-flash-image"]
    );
    mapping_row!(
        an_unknown_model_400_is_model_unavailable_after_one_call,
        Reply::availability(
            400,
            "invalid_request",
            "model_not_found",
            false,
            DEFAULT,
            &[]
        ),
        "model_unavailable",
        1,
        [DEFAULT, "model_not_found"]
    );
    mapping_row!(
        a_model_without_endpoints_is_model_unavailable,
        Reply::availability(404, "not_found", "no_endpoints", false, DEFAULT, &[]),
        "model_unavailable",
        1,
        ["no_endpoints"]
    );
    mapping_row!(
        a_region_restricted_model_is_permission_denied,
        Reply::availability(
            403,
            "permission_denied",
            "region_restricted",
            false,
            DEFAULT,
            &[]
        ),
        "permission_denied",
        1,
        ["region_restricted"]
    );
    mapping_row!(
        capacity_exhausted_is_retried_then_rate_limited,
        Reply::availability(
            429,
            "rate_limit_exceeded",
            "capacity_exhausted",
            true,
            DEFAULT,
            &[]
        ),
        "rate_limited",
        2,
        ["capacity_exhausted"]
    );
    mapping_row!(
        temporarily_unavailable_is_retried_then_provider_unavailable,
        Reply::availability(
            503,
            "provider_overloaded",
            "temporarily_unavailable",
            true,
            DEFAULT,
            &[]
        ),
        "provider_unavailable",
        2,
        ["temporarily_unavailable"]
    );
    mapping_row!(
        availability_retryable_is_trusted_over_the_code,
        Reply::availability(404, "not_found", "no_endpoints", true, DEFAULT, &[]),
        "provider_unavailable",
        2,
        ["no_endpoints"]
    );
    mapping_row!(
        a_chat_content_filter_is_content_policy_after_exactly_one_call,
        Reply::chat_refusal("content_filter", "IMAGE_SAFETY"),
        "content_policy",
        1,
        [DEFAULT, "IMAGE_SAFETY", "I can't create that image."],
        CHAT
    );
    mapping_row!(
        a_chat_image_prohibited_content_stop_is_content_policy_after_one_call,
        Reply::chat_refusal("stop", "IMAGE_PROHIBITED_CONTENT"),
        "content_policy",
        1,
        ["IMAGE_PROHIBITED_CONTENT"],
        CHAT
    );
    mapping_row!(
        a_chat_no_image_is_content_policy_after_one_call,
        Reply::chat_refusal("stop", "NO_IMAGE"),
        "content_policy",
        1,
        ["NO_IMAGE"],
        CHAT
    );
    mapping_row!(
        a_chat_answer_without_an_image_or_a_refusal_is_retried,
        Reply::chat_refusal("stop", "STOP"),
        "provider_error",
        2,
        ["returned no image"],
        CHAT
    );
    mapping_row!(
        a_chat_choice_error_is_classified_like_an_error_answer,
        Reply::json(
            200,
            json!({"choices": [{"finish_reason": "error",
            "message": {"role": "assistant", "content": "partial"},
            "error": {"code": 502, "message": "Provider disconnected mid-stream",
                      "metadata": {"error_type": "provider_unavailable"}}}]})
        ),
        "provider_unavailable",
        2,
        ["Provider disconnected mid-stream"],
        CHAT
    );

    #[tokio::test]
    async fn a_chat_refusal_records_what_the_prompt_cost() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::chat_refusal("content_filter", "SAFETY")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), CHAT).await;
        let scene = service.prepare(scene("refused")).unwrap();
        let stop = stage3::BatchStop::new();
        let options = stage3::RunOptions {
            stop: Some(stop.clone()),
            ..Default::default()
        };
        let outcome = service.run_scenes(&[scene], &options, &|_, _| {}).await;
        let err = outcome[0].as_ref().unwrap_err();
        assert_eq!(err.error_type(), ErrorType::ContentPolicy, "{err}");
        assert_eq!(err.cost(), Some(0.0002));
        assert_eq!(
            stop.spent_usd(),
            0.0002,
            "the billed refusal counts against the budget"
        );
        assert_eq!(server.total_calls(), 1);
    }

    #[tokio::test]
    async fn an_8_mb_finish_reason_leaves_the_answer_small() {
        let flood = "A".repeat(8 * 1024 * 1024);
        let body = json!({"choices": [{"finish_reason": flood, "native_finish_reason": flood,
            "message": {"role": "assistant", "content": flood}}]});
        let server = ScriptedOpenRouter::start(move |_, _| Reply::json(200, body.clone())).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(
            &server,
            out.path(),
            &[
                ("STAGE3_OPENROUTER_API", "chat"),
                ("STAGE3_MAX_RETRIES", "0"),
            ],
        )
        .await;
        let answer = service.generate_all_images(vec![scene("flood")]).await;
        assert_eq!(answer.failures.len(), 1);
        let message = &answer.failures[0].message;
        assert!(message.len() < 4096, "{} bytes", message.len());
        let json = serde_json::to_vec(&answer).unwrap();
        assert!(json.len() < 8192, "the answer is {} bytes", json.len());
    }

    // ---- The catalogue -----------------------------------------------------------------

    #[tokio::test]
    async fn hd_on_a_1k_only_model_is_refused_before_any_call() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[]).await;
        let mut request = scene("hd");
        request.quality = Some(stage3::ImageQuality::Hd);
        request.model = Some("black-forest-labs/flux.2-pro".into());
        let scenes = service
            .prepare_all(vec![scene("fine"), request.clone()])
            .unwrap();

        let err = service.check_batch(&scenes).await.unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest, "{err}");
        let message = err.to_string();
        for part in ["scenes[1]", "black-forest-labs/flux.2-pro", "hd", "1K"] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
        let answer = service.generate_all_images(vec![request]).await;
        assert_eq!(answer.failures[0].error_type, ErrorType::InvalidRequest);
        assert_eq!(server.total_calls(), 0, "nothing was called");
        assert_eq!(server.catalogue_requests()[0].path, "/api/v1/images/models");
    }

    #[tokio::test]
    async fn a_seed_the_model_does_not_take_is_refused_before_any_call() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[]).await;
        let mut request = scene("seeded");
        request.seed = Some(7);
        request.model = Some("openai/gpt-image-1".into());
        let answer = service.generate_all_images(vec![request]).await;
        assert_eq!(answer.failures[0].error_type, ErrorType::InvalidRequest);
        assert!(answer.failures[0].message.contains("seed"));
        assert_eq!(server.total_calls(), 0);
    }

    #[tokio::test]
    async fn hd_sends_quality_high_to_a_model_that_takes_quality() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[]).await;
        let mut request = scene("gpt");
        request.quality = Some(stage3::ImageQuality::Hd);
        request.model = Some("openai/gpt-image-1".into());
        let answer = service.generate_all_images(vec![request]).await;
        assert_eq!(answer.results.len(), 1, "{:?}", answer.failures);
        let sent = &server.requests()[0].body;
        assert_eq!(sent["quality"], "high");
        assert_eq!(sent["size"], "1024x1024");
        assert!(sent.get("resolution").is_none(), "{sent}");
        assert!(sent.get("aspect_ratio").is_none(), "{sent}");
        assert_eq!(answer.summary.estimated_cost_usd, Some(0.167));
    }

    #[tokio::test]
    async fn the_catalogue_is_read_once_and_prices_the_batch() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[]).await;
        assert!(
            server.catalogue_requests().is_empty(),
            "nothing is read at start-up"
        );
        let requests = (0..4).map(|i| scene(&format!("c{i}"))).collect();
        let answer = service.generate_all_images(requests).await;
        assert_eq!(answer.results.len(), 4, "{:?}", answer.failures);
        let paths: Vec<String> = server
            .catalogue_requests()
            .iter()
            .map(|r| r.path.clone())
            .collect();
        assert_eq!(
            paths,
            [
                "/api/v1/images/models".to_string(),
                format!("/api/v1/images/models/{DEFAULT}/endpoints")
            ]
        );
        assert!(
            server
                .catalogue_requests()
                .iter()
                .all(|r| !r.headers.contains_key("authorization")),
            "the catalogue needs no key and gets none"
        );
        let estimate = answer.summary.estimated_cost_usd.unwrap();
        assert!((estimate - 0.16).abs() < 1e-9, "4 × $0.04: {estimate}");
        assert!((answer.summary.cost_usd - 0.16).abs() < 1e-9);
        let sent = &server.requests()[0].body;
        assert_eq!(sent["resolution"], "1K");
        assert_eq!(sent["aspect_ratio"], "1:1");
    }

    #[tokio::test]
    async fn an_unreachable_catalogue_never_blocks_work() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        server.set_catalogue(Catalogue::Status(503));
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[]).await;
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let requests = (0..3).map(|i| scene(&format!("u{i}"))).collect();
        let answer = service.generate_all_images(requests).await;

        assert_eq!(answer.results.len(), 3, "{:?}", answer.failures);
        assert_eq!(server.total_calls(), 3);
        assert_eq!(
            server.catalogue_requests().len(),
            1,
            "asked once, not per scene"
        );
        assert_eq!(
            answer.summary.estimated_cost_usd, None,
            "no prices, no estimate"
        );
        let text = logs.text();
        assert_eq!(
            text.matches("image catalogue cannot be read").count(),
            1,
            "one warning: {text}"
        );
        // Unchecked, the design's default mapping is sent.
        assert_eq!(server.requests()[0].body["resolution"], "1K");
    }

    #[tokio::test]
    async fn a_model_missing_from_the_catalogue_names_close_alternatives() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[]).await;
        let mut request = scene("retired");
        request.model = Some("google/gemini-2.5-flash-image".into());
        let answer = service.generate_all_images(vec![request]).await;
        let failure = &answer.failures[0];
        assert_eq!(failure.error_type, ErrorType::ModelUnavailable);
        assert!(failure.message.contains("google/gemini-2.5-flash-image"));
        assert!(
            failure.message.contains("google/gemini-3.1-flash-image"),
            "{}",
            failure.message
        );
        assert_eq!(server.total_calls(), 0);
    }

    // ---- Fallbacks ---------------------------------------------------------------------

    const RETIRED: &str = "google/gemini-2.5-flash-image";
    const FALLBACK: &str = "bytedance-seed/seedream-4.5";

    /// The retired model is still listed (the catalogue lags), but the API answers 404
    /// `model_deprecated`: the first scene pays one call to learn it, every scene is
    /// delivered by the fallback, and each says which model made it.
    #[tokio::test]
    async fn a_retired_default_with_a_fallback_delivers_every_scene() {
        let server = ScriptedOpenRouter::start(|request, _| {
            if request.body["model"] == RETIRED {
                Reply::availability(
                    404,
                    "not_found",
                    "model_deprecated",
                    false,
                    RETIRED,
                    &[FALLBACK],
                )
            } else {
                Reply::image(&square_png(), "image/png")
            }
        })
        .await;
        server.set_catalogue(Catalogue::with(CatalogueModel::new(
            RETIRED,
            json!({"resolution": {"type": "enum", "values": ["1K", "2K"]},
                   "aspect_ratio": {"type": "enum", "values": ["1:1", "16:9", "9:16"]}}),
            json!([{"billable": "output_image", "unit": "image", "cost_usd": 0.039}]),
        )));
        let out = tempfile::tempdir().unwrap();
        let service = service(
            &server,
            out.path(),
            &[
                ("STAGE3_MODEL", RETIRED),
                ("STAGE3_MODEL_FALLBACKS", FALLBACK),
                ("STAGE3_CONCURRENCY", "1"),
            ],
        )
        .await;
        let requests: Vec<_> = (0..3).map(|i| scene(&format!("f{i}"))).collect();
        let answer = service.generate_all_images(requests.clone()).await;

        assert_eq!(answer.results.len(), 3, "{:?}", answer.failures);
        for result in &answer.results {
            assert_eq!(result.generation_params.model, FALLBACK);
            assert_eq!(
                result.generation_params.requested_model.as_deref(),
                Some(RETIRED)
            );
        }
        let models: Vec<String> = server
            .requests()
            .iter()
            .map(|r| r.body["model"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(models, [RETIRED, FALLBACK, FALLBACK, FALLBACK]);

        // The cache key is the request's: the same request finds the fallback's result.
        let again = service.generate_all_images(requests).await;
        assert_eq!(again.summary.from_cache, 3);
        assert_eq!(server.total_calls(), 4);
    }

    #[tokio::test]
    async fn a_model_the_catalogue_no_longer_lists_goes_straight_to_the_fallback() {
        let server =
            ScriptedOpenRouter::start(|_, _| Reply::image(&square_png(), "image/png")).await;
        let out = tempfile::tempdir().unwrap();
        let service = service(
            &server,
            out.path(),
            &[
                ("STAGE3_MODEL", RETIRED),
                ("STAGE3_MODEL_FALLBACKS", FALLBACK),
            ],
        )
        .await;
        let answer = service.generate_all_images(vec![scene("gone")]).await;
        assert_eq!(answer.results.len(), 1, "{:?}", answer.failures);
        assert_eq!(answer.results[0].generation_params.model, FALLBACK);
        assert_eq!(server.total_calls(), 1, "no call to the retired model");
        assert_eq!(server.requests()[0].body["model"], FALLBACK);
    }

    #[tokio::test]
    async fn spent_transient_retries_fall_back_but_a_refusal_does_not() {
        let server = ScriptedOpenRouter::start(|request, _| {
            match (
                request.body["model"].as_str(),
                request.prompt().contains("[refused]"),
            ) {
                (_, true) => Reply::typed_error(400, "refusal", "declined"),
                (Some(DEFAULT), false) => Reply::typed_error(503, "provider_overloaded", "busy"),
                _ => Reply::image(&square_png(), "image/png"),
            }
        })
        .await;
        let out = tempfile::tempdir().unwrap();
        let service = service(&server, out.path(), &[("STAGE3_MODEL_FALLBACKS", FALLBACK)]).await;
        let answer = service
            .generate_all_images(vec![scene("busy"), scene("refused")])
            .await;
        assert_eq!(answer.results.len(), 1);
        assert_eq!(answer.results[0].generation_params.model, FALLBACK);
        assert_eq!(
            answer.results[0].generation_params.attempts, 3,
            "2 tries + the fallback"
        );
        assert_eq!(answer.failures[0].error_type, ErrorType::ContentPolicy);
        assert_eq!(
            server.calls_for("[refused]"),
            1,
            "a refusal costs exactly one call"
        );
    }

    /// Log lines captured from a `tracing` subscriber.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }
}
