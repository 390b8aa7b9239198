//! The OpenRouter client against real HTTP servers on loopback: wiremock standing in for
//! OpenRouter, plus a hand-written HTTP/1.1 server where wiremock cannot misbehave enough
//! (a body that never ends, counting connections).

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod support;

use base64::Engine as _;
use image::{DynamicImage, ImageFormat};
use serde_json::{json, Value};
use stage3::error::ProviderFailure;
use stage3::provider::{ImageProvider, ImageRequest, OpenRouterProvider};
use stage3::schema::{ImageQuality, ImageSize};
use stage3::{Config, ErrorType, Stage3Error};
use support::scripted_openrouter::chat_answer;
use wiremock::matchers::{bearer_token, body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-or-v1-test-0123456789abcdef-secret";
const MODEL: &str = "google/gemini-2.5-flash-image";
const PROMPT: &str = "A lighthouse at dawn, watercolour. Avoid: text, watermark";

fn config(base_url: &str, extra: &[(&str, &str)]) -> Config {
    let mut map: HashMap<String, String> = [
        ("OPENROUTER_API_KEY", KEY),
        ("OPENROUTER_BASE_URL", base_url),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    map.entry("STAGE3_MODEL".into()).or_insert(MODEL.into());
    Config::from_lookup(|k| map.get(k).cloned()).unwrap()
}

fn provider(base_url: &str, extra: &[(&str, &str)]) -> OpenRouterProvider {
    OpenRouterProvider::new(&config(base_url, extra)).unwrap()
}

fn chat_provider(base_url: &str) -> OpenRouterProvider {
    provider(base_url, &[("STAGE3_OPENROUTER_API", "chat")])
}

fn request(timeout: Duration) -> ImageRequest<'static> {
    ImageRequest {
        scene_id: "scene-1",
        prompt: PROMPT,
        model: MODEL,
        size: ImageSize::Landscape,
        quality: ImageQuality::Hd,
        seed: Some(42),
        references: &[],
        timeout,
    }
}

fn normal_request() -> ImageRequest<'static> {
    request(Duration::from_secs(20))
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
        | Stage3Error::ProviderError(f) => f,
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
    provider.generate(&normal_request()).await.unwrap_err()
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

    let image = provider.generate(&normal_request()).await.unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
    assert_eq!(image.cost, Some(0.039));
    assert_eq!(provider.name(), "openrouter");
    assert_eq!(provider.api(), Some("images"));
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
    let request = ImageRequest {
        prompt: "p",
        model: "openai/gpt-image-1",
        size: ImageSize::Square,
        quality: ImageQuality::Standard,
        seed: None,
        ..normal_request()
    };

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
        .generate(&normal_request())
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
        .generate(&normal_request())
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
        .generate(&normal_request())
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
    let request = ImageRequest {
        references: &references,
        ..normal_request()
    };
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
    let request = ImageRequest {
        references: &references,
        ..normal_request()
    };
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

    let image = provider.generate(&normal_request()).await.unwrap();

    assert_eq!(image.bytes.as_ref(), png.as_slice());
    assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
    assert_eq!(image.cost, Some(0.0387));
    assert_eq!(provider.api(), Some("chat"));
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
        .generate(&normal_request())
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
        (403, ErrorType::ContentPolicy, false),
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
            assert_eq!(failure.message, message);
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
        .generate(&request(Duration::from_secs(30)))
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
        .generate(&request(Duration::from_millis(300)))
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
        let image = provider.generate(&normal_request()).await.unwrap();
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
            .generate(&request(Duration::from_millis(200)))
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
    let map: HashMap<String, String> = HashMap::new();
    let config = Config::from_lookup(|k| map.get(k).cloned()).unwrap();
    let err = OpenRouterProvider::new(&config).unwrap_err();
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
