//! The `stage3` binary end to end: real process, real files, real HTTP on loopback.

mod support;

use image::ImageFormat;
use serde_json::{json, Value};
use support::scripted_openrouter::{noisy_image, Reply, ScriptedOpenRouter};
use support::stage3_command as stage3;
use support::tls::TestCa;

const KEY: &str = "sk-or-v1-cli-test-secret-0123456789";

fn write_input(dir: &std::path::Path, value: &Value) -> std::path::PathBuf {
    let path = dir.join("input.json");
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

/// An OpenRouter stand-in answering every request with a noisy image of the requested
/// aspect (portrait or square, all `scenes()` uses), encoded as `format`.
async fn stand_in_answering(format: ImageFormat, media_type: &'static str) -> ScriptedOpenRouter {
    ScriptedOpenRouter::start(move |request, _| {
        let (w, h) = if request.body["aspect_ratio"] == "9:16" {
            (288, 512)
        } else {
            (384, 384)
        };
        Reply::image(&noisy_image(w, h, format), media_type)
    })
    .await
}

fn scenes() -> Value {
    json!({
        "scenes": [
            {"scene_id": "scene_001", "image_prompt": "A fox in a snowy forest", "style_tags": ["watercolor"]},
            {"scene_id": "scene_002", "image_prompt": "The fox meets an owl", "negative_prompt": "blurry", "size": "1024x1792"}
        ],
        "quality": "hd"
    })
}

#[tokio::test]
async fn generate_against_an_openrouter_stand_in_stores_valid_pngs() {
    let server = stand_in_answering(ImageFormat::Jpeg, "image/jpeg").await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    let out = work.path().join("images");

    let output = run_stage3(
        &server,
        work.path(),
        &[
            "generate",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(answer["failures"], json!([]));
    for result in results {
        let path = result["image_path"].as_str().unwrap();
        let decoded = image::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(decoded.width() as u64, result["width"].as_u64().unwrap());
        assert_eq!(decoded.height() as u64, result["height"].as_u64().unwrap());
        assert!(std::fs::read(path).unwrap().starts_with(b"\x89PNG"));
        let params = &result["generation_params"];
        for key in ["model", "size", "quality", "prompt"] {
            assert!(params.get(key).is_some(), "generation_params.{key}");
        }
        assert_eq!(params["quality"], "hd");
        assert_eq!(params["model"], stage3::DEFAULT_MODEL);
        assert!(
            params.get("requested_model").is_none(),
            "no fallback served"
        );
        assert_eq!(result["image_url"], Value::Null);
    }
    assert_eq!(results[1]["generation_params"]["size"], "1024x1792");
    assert_eq!(results[1]["height"], 512);

    // What was sent is exactly what was recorded.
    let sent: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.prompt().to_string())
        .collect();
    for result in results {
        assert!(sent.contains(
            &result["generation_params"]["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        ));
    }
    let second = server
        .requests()
        .into_iter()
        .find(|r| r.prompt().contains("owl"))
        .unwrap();
    assert_eq!(second.body["resolution"], "2K");
    assert_eq!(second.body["aspect_ratio"], "9:16");
    assert!(second.prompt().contains("Avoid: blurry."));
}

#[tokio::test]
async fn invalid_input_exits_2_and_calls_nobody() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::error(500, "must not be called")).await;
    let work = tempfile::tempdir().unwrap();
    let cases = [
        (
            json!({"scene_id": "../etc/passwd", "image_prompt": "x"}),
            "scene_id",
        ),
        (
            json!({"scene_id": "s1", "image_prompt": "   "}),
            "image_prompt",
        ),
        (
            json!({"scene_id": "s1", "image_prompt": "x", "size": "512x512"}),
            "size",
        ),
        (
            json!([{"scene_id": "ok", "image_prompt": "x"}, {"scene_id": "s/2", "image_prompt": "x"}]),
            "scenes[1]",
        ),
    ];
    for (input, field) in cases {
        let path = write_input(work.path(), &input);
        let output = run_stage3(
            &server,
            work.path(),
            &["generate", path.to_str().unwrap(), "--out", "images"],
            &[],
        )
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{input}: {stderr}");
        // The detail follows the type at once: the category is not said twice.
        assert!(
            stderr.contains(&format!("error[invalid_request]: {field}")),
            "{input}: {stderr}"
        );
    }
    assert_eq!(server.total_calls(), 0);
    assert!(
        !work.path().join("images").exists()
            || std::fs::read_dir(work.path().join("images"))
                .unwrap()
                .count()
                == 0
    );
}

#[test]
fn malformed_json_and_missing_files_exit_2() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("broken.json"), b"{\"scene_id\": ").unwrap();
    stage3(work.path())
        .args(["generate", "broken.json", "--provider", "placeholder"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("malformed JSON"));
    stage3(work.path())
        .args(["generate", "missing.json", "--provider", "placeholder"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("missing.json"));
}

#[test]
fn a_missing_api_key_is_a_config_error_naming_the_variable() {
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    stage3(work.path())
        .args(["generate", input.to_str().unwrap()])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("OPENROUTER_API_KEY"));
}

#[test]
fn placeholder_runs_offline_from_stdin_and_caches_the_second_run() {
    let work = tempfile::tempdir().unwrap();
    let input = serde_json::to_vec(&scenes()).unwrap();
    let run = |extra: &[&str]| {
        let output = stage3(work.path())
            .env("STAGE3_PROVIDER", "placeholder")
            .args(["generate", "-"])
            .args(extra)
            .write_stdin(input.clone())
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let first = run(&[]);
    let mut second = run(&[]);
    let scenes = first["results"].as_array().unwrap().len();
    assert_eq!(second["summary"]["from_cache"], scenes, "{second}");
    assert_eq!(first["summary"]["from_cache"], 0);
    for result in second["results"].as_array_mut().unwrap() {
        assert_eq!(result["from_cache"], true, "a cache hit says so");
        result.as_object_mut().unwrap().remove("from_cache");
    }
    assert_eq!(
        first["results"], second["results"],
        "an identical run returns the stored results"
    );
    let forced = run(&["--force"]);
    assert_ne!(
        first["results"][0]["generation_params"]["finished_at"],
        forced["results"][0]["generation_params"]["finished_at"]
    );
    let result = &first["results"][0];
    assert_eq!(result["generation_params"]["provider"], "placeholder");
    assert!(
        work.path().join("output/images").is_dir(),
        "default STAGE3_OUTPUT_DIR"
    );
    let image = image::open(work.path().join(result["image_path"].as_str().unwrap())).unwrap();
    assert_eq!((image.width(), image.height()), (1024, 1024));
}

#[tokio::test]
async fn a_trace_level_log_contains_no_secret() {
    // The request goes out with its Authorization header, the provider refuses it, and
    // nothing logged at any level may show the key.
    let server =
        ScriptedOpenRouter::start(|_, _| Reply::error(401, "No auth credentials found")).await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &json!({"scene_id": "s1", "image_prompt": "x"}));
    let output = run_stage3(
        &server,
        work.path(),
        &["generate", input.to_str().unwrap()],
        &[("RUST_LOG", "trace")],
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(server.total_calls(), 1, "401 is permanent: no retry");
    assert_eq!(
        server.requests()[0].headers["authorization"],
        format!("Bearer {KEY}")
    );
    let everything = [output.stdout, output.stderr].concat();
    let text = String::from_utf8_lossy(&everything);
    assert!(text.contains("\"auth\""), "{text}");
    assert!(
        text.contains("TRACE") || text.lines().count() > 5,
        "trace logging was on: {text}"
    );
    assert!(!text.contains("cli-test-secret"), "the key leaked: {text}");
}

#[tokio::test]
async fn generate_into_s3_serves_cdn_urls_and_a_second_run_costs_nothing() {
    let s3 = support::s3_server::S3Target::start().await;
    let server = stand_in_answering(ImageFormat::Png, "image/png").await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    let mut env: Vec<(String, String)> = s3.env_vars();
    env.extend([
        ("STAGE3_S3_ACCESS_KEY_ID".to_string(), s3.access_key.clone()),
        (
            "STAGE3_S3_SECRET_ACCESS_KEY".to_string(),
            s3.secret_key().to_string(),
        ),
        (
            "STAGE3_PUBLIC_BASE_URL".to_string(),
            "https://img.example.com".to_string(),
        ),
        ("OPENROUTER_API_KEY".to_string(), KEY.to_string()),
        ("OPENROUTER_BASE_URL".to_string(), server.base_url.clone()),
        ("RUST_LOG".to_string(), "trace".to_string()),
    ]);
    let run = || {
        let (dir, input, env) = (work.path().to_path_buf(), input.clone(), env.clone());
        tokio::task::spawn_blocking(move || {
            stage3(&dir)
                .envs(env)
                .args(["generate", input.to_str().unwrap()])
                .output()
                .unwrap()
        })
    };

    let first = run().await.unwrap();
    let logs = String::from_utf8_lossy(&first.stderr).to_string();
    assert_eq!(first.status.code(), Some(0), "{logs}");
    assert!(
        !logs.contains(s3.secret_key()),
        "the S3 secret leaked into the trace log"
    );
    assert!(
        !logs.contains("cli-test-secret"),
        "the API key leaked into the trace log"
    );
    let answer: Value = serde_json::from_slice(&first.stdout).unwrap();
    let client = s3.client();
    for result in answer["results"].as_array().unwrap() {
        let url = result["image_url"].as_str().unwrap();
        let key = url.strip_prefix("https://img.example.com/").unwrap();
        assert!(key.starts_with(&s3.prefix), "{key}");
        assert_eq!(result["image_path"], format!("s3://{}/{key}", s3.bucket));
        let head = client
            .head_object()
            .bucket(&s3.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_type(), Some("image/png"));
        let object = client
            .get_object()
            .bucket(&s3.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        let bytes = object.body.collect().await.unwrap().into_bytes();
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!(
            u64::from(decoded.width()),
            result["width"].as_u64().unwrap()
        );
    }
    assert_eq!(server.total_calls(), 2);

    let second = run().await.unwrap();
    assert_eq!(second.status.code(), Some(0));
    let again: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(
        server.total_calls(),
        2,
        "the second run made no provider request"
    );
    let urls = |answer: &Value| -> Vec<String> {
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["image_url"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(urls(&answer), urls(&again));
}

/// The chat API and an image host, both behind HTTPS with certificates from `ca`; the
/// answer points at a signed image URL on the host.
async fn https_chat_stand_ins(ca: &TestCa) -> (ScriptedOpenRouter, ScriptedOpenRouter) {
    let jpeg = bytes::Bytes::from(noisy_image(384, 384, ImageFormat::Jpeg));
    let image_host = ScriptedOpenRouter::start_tls(ca, move |_, _| Reply::Http {
        status: 200,
        headers: vec![("Content-Type".into(), "image/jpeg".into())],
        body: jpeg.clone(),
    })
    .await;
    let origin = image_host.base_url.trim_end_matches("/api/v1");
    let image_url = format!("{origin}/files/scene_001.jpg?X-Signature={URL_SIGNATURE}");
    let api = ScriptedOpenRouter::start_tls(ca, move |_, _| Reply::chat_image(&image_url)).await;
    (api, image_host)
}

const URL_SIGNATURE: &str = "sig-0f9e8d7c6b5a";

/// Runs `stage3 generate` for one square scene against the chat API at `api`.
async fn generate_over_chat(
    api: &ScriptedOpenRouter,
    extra_env: &[(&str, &str)],
) -> (std::process::Output, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let input = write_input(
        work.path(),
        &json!({"scene_id": "scene_001", "image_prompt": "A lighthouse at dusk"}),
    );
    let mut env = vec![
        ("STAGE3_OPENROUTER_API", "chat"),
        ("STAGE3_MAX_RETRIES", "0"),
        // The image host is a loopback stand-in, which image fetches otherwise refuse.
        ("STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS", "1"),
    ];
    env.extend_from_slice(extra_env);
    let output = run_stage3(
        api,
        work.path(),
        &["generate", input.to_str().unwrap()],
        &env,
    )
    .await;
    (output, work)
}

#[tokio::test]
async fn the_chat_api_over_https_fetches_a_signed_image_url_and_stores_a_png() {
    let ca = TestCa::new();
    let (api, image_host) = https_chat_stand_ins(&ca).await;

    let (output, work) =
        generate_over_chat(&api, &[("SSL_CERT_FILE", ca.ca_pem.to_str().unwrap())]).await;
    let everything =
        String::from_utf8_lossy(&[&output.stdout[..], &output.stderr[..]].concat()).to_string();
    assert_eq!(output.status.code(), Some(0), "{everything}");

    assert_eq!(api.total_calls(), 1);
    assert_eq!(api.requests()[0].path, "/api/v1/chat/completions");
    let downloads = image_host.requests();
    assert_eq!(downloads.len(), 1);
    assert_eq!(
        downloads[0].path,
        format!("/files/scene_001.jpg?X-Signature={URL_SIGNATURE}"),
        "the signed URL is fetched exactly as given"
    );
    assert!(
        !downloads[0].headers.contains_key("authorization"),
        "the API key is for OpenRouter only, never for an image host"
    );

    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let result = &answer["results"][0];
    let stored = std::fs::read(work.path().join(result["image_path"].as_str().unwrap())).unwrap();
    assert!(stored.starts_with(b"\x89PNG"), "the JPEG was stored as PNG");
    let decoded = image::load_from_memory(&stored).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (384, 384));
    assert!(
        !everything.contains(URL_SIGNATURE),
        "a URL signature is a credential and stays out of output: {everything}"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_before_anything_is_sent() {
    let ca = TestCa::new();
    let (api, _image_host) = https_chat_stand_ins(&ca).await;

    // No SSL_CERT_FILE: only the system's roots, which never issued the stand-in's
    // certificate. The handshake fails, so neither the key nor the prompt leaves.
    let (output, _work) = generate_over_chat(&api, &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert_eq!(
        api.total_calls(),
        0,
        "no request may cross an untrusted TLS session"
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let failure = &answer["failures"][0];
    assert_eq!(failure["error_type"], "provider_unavailable", "{failure}");
    let message = failure["message"].as_str().unwrap().to_lowercase();
    assert!(
        message.contains("certificate"),
        "the cause is named: {message}"
    );
}

// ---- Catalogue, budget and address checks ---------------------------------------------

/// Runs `stage3 ARGS` against `server` with the key set, off the async runtime.
async fn run_stage3(
    server: &ScriptedOpenRouter,
    dir: &std::path::Path,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> std::process::Output {
    let mut command = stage3(dir);
    command
        .env("OPENROUTER_API_KEY", KEY)
        .env("OPENROUTER_BASE_URL", &server.base_url)
        .envs(extra_env.iter().copied())
        .args(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn stage3_models_lists_resolutions_aspect_ratios_and_prices() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::error(500, "must not be called")).await;
    let work = tempfile::tempdir().unwrap();
    let output = run_stage3(&server, work.path(), &["models"], &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |model: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(model))
            .unwrap_or_else(|| panic!("{model} missing: {stdout}"))
            .to_string()
    };
    let gemini = line("google/gemini-3.1-flash-image");
    for part in ["1K,2K,4K", "16:9", "$0.0400", "$0.0800"] {
        assert!(gemini.contains(part), "{part:?} in {gemini}");
    }
    let flux = line("black-forest-labs/flux.2-pro");
    // 1K only: no hd price; per megapixel: $0.03 × 1.048576 MP.
    assert!(
        flux.contains("$0.0315") && flux.trim_end().ends_with('-'),
        "{flux}"
    );
    assert!(line("openai/gpt-image-1").contains("auto,low,medium,high"));
    assert_eq!(server.total_calls(), 0, "listing models costs nothing");

    let json = run_stage3(&server, work.path(), &["models", "--json"], &[]).await;
    let models: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(models.as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn validate_prints_the_estimate_and_checks_the_budget() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::error(500, "must not be called")).await;
    let work = tempfile::tempdir().unwrap();
    // Two hd scenes on the default model: 2 × $0.08 (the `2k` variant).
    let input = write_input(work.path(), &scenes());
    let path = input.to_str().unwrap();
    let output = run_stage3(&server, work.path(), &["validate", path], &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("estimated cost: $0.1600"), "{stderr}");

    let output = run_stage3(
        &server,
        work.path(),
        &["validate", path, "--max-cost", "0.10"],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("budget_exceeded"), "{stderr}");
    assert_eq!(server.total_calls(), 0);
}

#[tokio::test]
async fn an_over_budget_generate_exits_2_and_calls_nobody() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::error(500, "must not be called")).await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    let output = run_stage3(
        &server,
        work.path(),
        &["generate", input.to_str().unwrap(), "--out", "images"],
        &[("STAGE3_MAX_COST_USD", "0.10")],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error[budget_exceeded]"), "{stderr}");
    assert!(stderr.contains("0.16"), "the estimate is named: {stderr}");
    assert_eq!(server.total_calls(), 0);
}

#[tokio::test]
async fn hd_on_a_1k_only_model_exits_2_naming_what_it_supports() {
    let server = ScriptedOpenRouter::start(|_, _| Reply::error(500, "must not be called")).await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    let output = run_stage3(
        &server,
        work.path(),
        &[
            "generate",
            input.to_str().unwrap(),
            "--model",
            "black-forest-labs/flux.2-pro",
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid_request") && stderr.contains("1K"),
        "{stderr}"
    );
    assert_eq!(server.total_calls(), 0);
}

#[tokio::test]
async fn a_fallback_model_flag_serves_a_retired_model_and_says_so() {
    let retired = "google/gemini-2.5-flash-image";
    let server = stand_in_answering(ImageFormat::Png, "image/png").await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    let output = run_stage3(
        &server,
        work.path(),
        &[
            "generate",
            input.to_str().unwrap(),
            "--model",
            retired,
            "--fallback-model",
            "bytedance-seed/seedream-4.5",
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("using the fallback"),
        "a warning is logged: {stderr}"
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    for result in answer["results"].as_array().unwrap() {
        assert_eq!(
            result["generation_params"]["model"],
            "bytedance-seed/seedream-4.5"
        );
        assert_eq!(result["generation_params"]["requested_model"], retired);
    }
    assert_eq!(answer["summary"]["succeeded"], 2);
}

#[tokio::test]
async fn an_image_url_on_loopback_is_refused_without_the_test_switch() {
    let ca = TestCa::new();
    let (api, image_host) = https_chat_stand_ins(&ca).await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(
        work.path(),
        &json!({"scene_id": "scene_001", "image_prompt": "A lighthouse at dusk"}),
    );
    let output = run_stage3(
        &api,
        work.path(),
        &["generate", input.to_str().unwrap()],
        &[
            ("SSL_CERT_FILE", ca.ca_pem.to_str().unwrap()),
            ("STAGE3_OPENROUTER_API", "chat"),
            ("STAGE3_MAX_RETRIES", "0"),
        ],
    )
    .await;
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let failure = &answer["failures"][0];
    assert_eq!(failure["error_type"], "provider_error", "{failure}");
    assert!(
        failure["message"].as_str().unwrap().contains("non-public"),
        "{failure}"
    );
    assert_eq!(
        image_host.total_calls(),
        0,
        "the loopback host was never contacted"
    );
}

#[test]
fn plain_http_to_a_remote_openrouter_is_a_config_error() {
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    stage3(work.path())
        .env("OPENROUTER_API_KEY", KEY)
        .env(
            "OPENROUTER_BASE_URL",
            "http://openrouter.example.com/api/v1",
        )
        .args(["generate", input.to_str().unwrap()])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("clear text"));
}

/// The image host redirects once, then once more to a private address: the first hop is
/// followed without a `Referer` (which would leak the signed URL), the second refused.
#[tokio::test]
async fn image_redirects_send_no_referer_and_never_reach_private_addresses() {
    let ca = TestCa::new();
    let jpeg = bytes::Bytes::from(noisy_image(384, 384, ImageFormat::Jpeg));
    let image_host = ScriptedOpenRouter::start_tls(&ca, move |request, _| {
        if request.path.starts_with("/files/first") {
            Reply::Http {
                status: 302,
                headers: vec![("Location".into(), "/files/second.jpg".into())],
                body: bytes::Bytes::new(),
            }
        } else if request.path.starts_with("/files/private") {
            Reply::Http {
                status: 302,
                headers: vec![(
                    "Location".into(),
                    "https://169.254.169.254/latest/meta-data".into(),
                )],
                body: bytes::Bytes::new(),
            }
        } else {
            Reply::Http {
                status: 200,
                headers: vec![("Content-Type".into(), "image/jpeg".into())],
                body: jpeg.clone(),
            }
        }
    })
    .await;
    let origin = image_host.base_url.trim_end_matches("/api/v1").to_string();
    let api = ScriptedOpenRouter::start_tls(&ca, move |request, _| {
        let file = if request.body.to_string().contains("metadata") {
            "private.jpg"
        } else {
            "first.jpg"
        };
        Reply::chat_image(&format!(
            "{origin}/files/{file}?X-Signature={URL_SIGNATURE}"
        ))
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(
        work.path(),
        &json!([
            {"scene_id": "followed", "image_prompt": "A lighthouse at dusk"},
            {"scene_id": "refused", "image_prompt": "A lighthouse with metadata"}
        ]),
    );
    let output = run_stage3(
        &api,
        work.path(),
        &["generate", input.to_str().unwrap()],
        &[
            ("SSL_CERT_FILE", ca.ca_pem.to_str().unwrap()),
            ("STAGE3_OPENROUTER_API", "chat"),
            ("STAGE3_MAX_RETRIES", "0"),
            ("STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS", "1"),
        ],
    )
    .await;
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["results"][0]["scene_id"], "followed", "{answer}");
    let failure = &answer["failures"][0];
    assert_eq!(failure["scene_id"], "refused", "{answer}");
    assert!(
        failure["message"].as_str().unwrap().contains("redirect"),
        "{failure}"
    );

    let second = image_host
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/files/second"))
        .expect("the first redirect was followed");
    assert!(
        !second.headers.contains_key("referer"),
        "no Referer: {:?}",
        second.headers
    );
    let everything =
        String::from_utf8_lossy(&[&output.stdout[..], &output.stderr[..]].concat()).to_string();
    assert!(!everything.contains(URL_SIGNATURE), "{everything}");
}

/// The first Ctrl-C lets the call in flight finish and be stored, starts nothing new,
/// prints the answer so far with the unstarted scenes `cancelled`, and exits 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_finishes_the_calls_in_flight_and_prints_the_answer_so_far() {
    let (arrived, mut first_call) = tokio::sync::mpsc::unbounded_channel();
    let server = ScriptedOpenRouter::start(move |request, _| {
        let _ = arrived.send(());
        let (w, h) = if request.body["aspect_ratio"] == "9:16" {
            (288, 512)
        } else {
            (384, 384)
        };
        Reply::image(&noisy_image(w, h, ImageFormat::Png), "image/png")
            .after(std::time::Duration::from_millis(1500))
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(
        work.path(),
        &json!([
            {"scene_id": "first", "image_prompt": "A fox in a snowy forest"},
            {"scene_id": "second", "image_prompt": "The fox meets an owl"},
            {"scene_id": "third", "image_prompt": "The owl flies home"}
        ]),
    );
    let out = work.path().join("images");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stage3"))
        .current_dir(work.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPENROUTER_API_KEY", KEY)
        .env("OPENROUTER_BASE_URL", &server.base_url)
        .args(["generate", input.to_str().unwrap(), "--concurrency", "1"])
        .args(["--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), first_call.recv())
        .await
        .expect("the first scene reached the provider");
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let output = tokio::task::spawn_blocking(move || {
        let mut stdout = String::new();
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (child.wait().unwrap(), stdout, stderr)
    })
    .await
    .unwrap();
    let (status, stdout, stderr) = output;
    assert_eq!(status.code(), Some(130), "{stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    // Which scene took the one provider slot first is up to the scheduler.
    assert_eq!(answer["results"].as_array().unwrap().len(), 1, "{answer}");
    let stored = answer["results"][0]["image_path"].as_str().unwrap();
    assert!(
        std::path::Path::new(stored).is_file(),
        "the paid image was stored"
    );
    let failures = answer["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{answer}");
    for failure in failures {
        assert_eq!(failure["error_type"], "cancelled", "{failure}");
    }
    let generations = server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/images"))
        .count();
    assert_eq!(generations, 1, "nothing new started after Ctrl-C");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with('.') || name.ends_with(".claim"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ---- Generating from mainland China ---------------------------------------------------

const ARK_KEY: &str = "ark-cli-test-secret-0123456789";
const DASHSCOPE_KEY: &str = "sk-dashscope-cli-secret-0123";

/// An image host over HTTPS serving each path's JPEG, as the providers' OSS and TOS
/// buckets do: `/{w}x{h}.jpg` is a picture of that shape (an eighth of the size, to keep
/// the test quick).
async fn image_host(ca: &TestCa) -> ScriptedOpenRouter {
    ScriptedOpenRouter::start_tls(ca, |request, _| {
        let name = request.path.trim_start_matches('/');
        let size = name.split(['.', '?']).next().unwrap_or("");
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
        Reply::Http {
            status: 200,
            headers: vec![("Content-Type".into(), "image/jpeg".into())],
            body: bytes::Bytes::from(noisy_image(w / 8, h / 8, ImageFormat::Jpeg)),
        }
    })
    .await
}

/// Runs `stage3 generate` on `input` with a clean environment plus `env`, trusting `ca`.
async fn generate_with(
    work: &std::path::Path,
    input: &Value,
    ca: &TestCa,
    env: &[(&str, &str)],
) -> (std::process::Output, Value) {
    let input = write_input(work, input);
    let mut command = stage3(work);
    command
        .env("SSL_CERT_FILE", ca.ca_pem.to_str().unwrap())
        .env("STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS", "1")
        .env("STAGE3_MAX_RETRIES", "0")
        .envs(env.iter().copied())
        .args(["generate", input.to_str().unwrap(), "--out", "out"]);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let answer = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, answer)
}

fn china_scenes() -> Value {
    json!({
        "scenes": [
            {"scene_id": "crane_001", "image_prompt": "A red-crowned crane over a misty lake",
             "negative_prompt": "text", "style_tags": ["ink wash"]},
            {"scene_id": "crane_002", "image_prompt": "The crane lands by a pavilion",
             "size": "1792x1024"}
        ]
    })
}

/// Every stored PNG of an answer — images and thumbnails — carries one TC260 label that
/// Pillow and exiftool read.
fn assert_answer_labelled(work: &std::path::Path, answer: &Value) {
    let mut paths = Vec::new();
    for result in answer["results"].as_array().unwrap() {
        for key in ["image_path", "thumbnail_path"] {
            paths.push(work.join(result[key].as_str().unwrap()));
        }
    }
    let paths: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
    let ids = support::label_readers::assert_labelled(&paths);
    for (result, id) in answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ids.iter().step_by(2))
    {
        assert_eq!(
            result["generation_params"]["aigc_label"]["source_sha256"],
            id.as_str()
        );
    }
}

/// Ark answers one scene inline and the other by URL (a gateway that ignores
/// `response_format`); both are stored as labelled PNGs at Seedream's sizes.
#[tokio::test]
async fn generate_on_ark_stores_labelled_pngs_at_seedreams_sizes() {
    let ca = TestCa::new();
    let host = image_host(&ca).await;
    let origin = host.origin();
    let ark = ScriptedOpenRouter::start(move |request, _| {
        let size = support::scripted_china::requested_size(request);
        if request.prompt().contains("pavilion") {
            let url = format!("{origin}/{}x{}.jpg?X-Tos-Signature=abc", size.0, size.1);
            support::scripted_china::ark_image_url(&url, size)
        } else {
            let jpeg = noisy_image(size.0 / 8, size.1 / 8, ImageFormat::Jpeg);
            support::scripted_china::ark_image(&jpeg, size)
        }
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let base = support::scripted_china::ark_base_url(&ark.origin());
    let (output, answer) = generate_with(
        work.path(),
        &china_scenes(),
        &ca,
        &[
            ("STAGE3_PROVIDER", "ark"),
            ("ARK_API_KEY", ARK_KEY),
            ("ARK_BASE_URL", &base),
        ],
    )
    .await;
    let everything =
        String::from_utf8_lossy(&[&output.stdout[..], &output.stderr[..]].concat()).to_string();
    assert_eq!(output.status.code(), Some(0), "{everything}");
    assert!(!everything.contains(ARK_KEY));

    let mut sizes: Vec<String> = ark
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.body["watermark"], false);
            assert_eq!(r.body["response_format"], "b64_json");
            r.body["size"].as_str().unwrap().to_string()
        })
        .collect();
    sizes.sort();
    assert_eq!(sizes, ["2048x2048", "2560x1440"]);
    assert_eq!(host.total_calls(), 1, "the URL answer was fetched once");
    for result in answer["results"].as_array().unwrap() {
        assert_eq!(result["generation_params"]["provider"], "ark");
        assert_eq!(result["generation_params"]["source_format"], "jpeg");
        let stored =
            std::fs::read(work.path().join(result["image_path"].as_str().unwrap())).unwrap();
        assert!(stored.starts_with(b"\x89PNG"));
    }
    assert_answer_labelled(work.path(), &answer);
}

/// DashScope names its image by an OSS URL, fetched at once; it is sent the negatives in
/// their own field and our prompt unrewritten, at Qwen-Image's fixed sizes.
#[tokio::test]
async fn generate_on_dashscope_fetches_the_oss_url_and_stores_labelled_pngs() {
    let ca = TestCa::new();
    let host = image_host(&ca).await;
    let origin = host.origin();
    let dashscope = ScriptedOpenRouter::start(move |request, _| {
        let size = support::scripted_china::requested_size(request);
        let url = format!(
            "{origin}/{}x{}.jpg?Expires=1764086400&OSSAccessKeyId=LTAI&Signature=xyz",
            size.0, size.1
        );
        support::scripted_china::dashscope_image_url(&url, size)
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let base = support::scripted_china::dashscope_base_url(&dashscope.origin());
    let (output, answer) = generate_with(
        work.path(),
        &china_scenes(),
        &ca,
        &[
            ("STAGE3_PROVIDER", "dashscope"),
            ("DASHSCOPE_API_KEY", DASHSCOPE_KEY),
            ("DASHSCOPE_BASE_URL", &base),
        ],
    )
    .await;
    let everything =
        String::from_utf8_lossy(&[&output.stdout[..], &output.stderr[..]].concat()).to_string();
    assert_eq!(output.status.code(), Some(0), "{everything}");
    assert!(!everything.contains(DASHSCOPE_KEY));
    assert!(
        !everything.contains("Signature=xyz"),
        "a signed URL stays out of output"
    );

    let requests = dashscope.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(
            request.path,
            "/api/v1/services/aigc/multimodal-generation/generation"
        );
        let parameters = &request.body["parameters"];
        assert_eq!(parameters["watermark"], false);
        assert_eq!(parameters["prompt_extend"], false);
        let expected = if request.prompt().contains("pavilion") {
            "1664*928"
        } else {
            "1328*1328"
        };
        assert_eq!(parameters["size"], expected);
    }
    assert_eq!(host.total_calls(), 2);
    let results = answer["results"].as_array().unwrap();
    let crane = results
        .iter()
        .find(|r| r["scene_id"] == "crane_001")
        .unwrap();
    let params = &crane["generation_params"];
    assert_eq!(params["provider"], "dashscope");
    assert_eq!(params["model"], "qwen-image-plus");
    assert_eq!(params["negative_prompt"], "text");
    assert_eq!(
        params["prompt"],
        "A red-crowned crane over a misty lake.\n\nStyle: ink wash."
    );
    assert_answer_labelled(work.path(), &answer);
}

#[tokio::test]
async fn stage3_models_lists_ark_and_dashscope_from_their_tables() {
    let work = tempfile::tempdir().unwrap();
    for (provider, expected) in [
        ("ark", "doubao-seedream-4-5-251128"),
        ("dashscope", "qwen-image-plus"),
    ] {
        let output = stage3(work.path())
            .env("STAGE3_PRICES", "dashscope:qwen-image-plus=0.05")
            .args(["models", "--provider", provider, "--json"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0));
        let models: Value = serde_json::from_slice(&output.stdout).unwrap();
        let model = models
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == expected)
            .unwrap_or_else(|| panic!("{provider}: {models}"));
        assert!(model["price_per_image_usd"].as_f64().unwrap() > 0.0);
        assert!(!model["sizes"].as_array().unwrap().is_empty());
    }
    let output = stage3(work.path())
        .env("STAGE3_PRICES", "dashscope:qwen-image-plus=0.05")
        .args(["models", "--provider", "dashscope"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("qwen-image-plus"))
        .unwrap();
    assert!(
        line.contains("$0.0500") && line.contains("STAGE3_PRICES"),
        "{line}"
    );
    assert!(table.contains("1792x1024 → 1664x928"), "{table}");
}

// ---- What the binaries read and leave behind -------------------------------------------

/// A `.env` at `path` holding `lines`.
fn write_dotenv(path: &std::path::Path, lines: &[&str]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn a_dotenv_in_a_parent_directory_is_not_read() {
    // The planted file sends the key to a stand-in: it must hear nothing, and the run must
    // fail for want of a key, as it does with no `.env` at all.
    let planted =
        ScriptedOpenRouter::start(|_, _| Reply::error(500, "a planted .env was read")).await;
    let work = tempfile::tempdir().unwrap();
    write_dotenv(
        &work.path().join(".env"),
        &[
            "STAGE3_PROVIDER=openrouter",
            &format!("OPENROUTER_BASE_URL={}", planted.base_url),
            "OPENROUTER_API_KEY=sk-or-v1-planted-0123456789",
        ],
    );
    let cwd = work.path().join("projects/story");
    std::fs::create_dir_all(&cwd).unwrap();
    write_input(&cwd, &json!({"scene_id": "s1", "image_prompt": "a fox"}));
    let output = stage3(&cwd)
        .args(["generate", "input.json", "--out", "images"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("OPENROUTER_API_KEY"), "{stderr}");
    assert_eq!(planted.total_calls(), 0, "the parent's .env was read");

    // Nor one that makes every command fail.
    write_dotenv(
        &work.path().join(".env"),
        &["STAGE3_PROVIDER=not-a-provider"],
    );
    let output = stage3(&cwd)
        .args(["generate", "input.json", "--provider", "placeholder"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_working_directorys_own_dotenv_is_read_and_the_environment_wins() {
    let work = tempfile::tempdir().unwrap();
    write_dotenv(
        &work.path().join(".env"),
        &[
            "STAGE3_PROVIDER=placeholder",
            "STAGE3_OUTPUT_DIR=from-dotenv",
            "STAGE3_CONCURRENCY=not-a-number",
        ],
    );
    write_input(
        work.path(),
        &json!({"scene_id": "s1", "image_prompt": "a fox"}),
    );
    let output = stage3(work.path())
        .env("STAGE3_CONCURRENCY", "2")
        .args(["generate", "input.json"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let path = answer["results"][0]["image_path"].as_str().unwrap();
    assert!(
        path.starts_with(
            work.path()
                .join("from-dotenv")
                .canonicalize()
                .unwrap()
                .to_str()
                .unwrap()
        ),
        "{path}"
    );

    // A line the parser cannot read is a configuration error that does not quote it (it
    // may hold a key).
    std::fs::write(
        work.path().join(".env"),
        "OPENROUTER_API_KEY=\"sk-or-v1-unterminated-secret\n",
    )
    .unwrap();
    let output = stage3(work.path())
        .args(["validate", "input.json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error[config]: .env"), "{stderr}");
    assert!(!stderr.contains("unterminated-secret"), "{stderr}");
}

#[tokio::test]
async fn the_lambda_function_reads_no_dotenv() {
    // A `.env` that would fail the start, where the function starts: it must not matter.
    // Started past its configuration, the function polls the Runtime API, standing in here.
    let work = tempfile::tempdir().unwrap();
    write_dotenv(
        &work.path().join(".env"),
        &["STAGE3_CONCURRENCY=not-a-number"],
    );
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stage3-lambda"))
        .current_dir(work.path())
        .env_clear()
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            api.local_addr().unwrap().to_string(),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "stage3")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("STAGE3_PROVIDER", "placeholder")
        .env("STAGE3_OUTPUT_DIR", "images")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let polled = tokio::select! {
        accepted = api.accept() => accepted.is_ok(),
        _ = child.wait() => false,
        _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => false,
    };
    child.start_kill().ok();
    let output = child.wait_with_output().await.unwrap();
    assert!(
        polled,
        "the function did not start: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every file and directory under `root`: its path, permission bits and whether it is a
/// directory, sorted by path.
#[cfg(unix)]
fn modes_under(root: &std::path::Path) -> Vec<(String, u32, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            }
            let relative = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string();
            found.push((relative, meta.permissions().mode() & 0o7777, meta.is_dir()));
        }
    }
    found.sort();
    found
}

#[cfg(unix)]
#[test]
fn validate_writes_and_deletes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let tmp = work.path().join("tmp");
    // Old enough to pass for a dead process's leftovers, and named as the store names its
    // own temporaries: nothing may touch them, nor anything else.
    let planted = [
        ".stage3-important.part",
        "deep/.stage3-important.part",
        ".stage3-a1B2c3.part",
        "sources/.stage3-a1B2c3.part",
    ];
    for relative in planted {
        let path = tmp.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"someone's work").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(86_400))
            .unwrap();
    }
    write_input(work.path(), &scenes());
    let before = modes_under(work.path());
    stage3(work.path())
        .env("TMPDIR", &tmp)
        .env("STAGE3_PROVIDER", "placeholder")
        .args(["validate", "input.json"])
        .assert()
        .code(0);
    assert_eq!(
        modes_under(work.path()),
        before,
        "validate changed the files"
    );
}

/// Runs `stage3 generate` on a one-scene story under `umask`, with the placeholder and the
/// visible label (so the unlabelled source is stored too), and answers the output
/// directory's modes.
#[cfg(unix)]
fn stored_modes_under_umask(umask: &str) -> Vec<(String, u32, bool)> {
    let work = tempfile::tempdir().unwrap();
    write_input(
        work.path(),
        &json!({"story_id": "umask_tale", "scenes": [{"scene_id": "s1", "image_prompt": "a fox"}]}),
    );
    let output = std::process::Command::new("sh")
        .current_dir(work.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STAGE3_PROVIDER", "placeholder")
        .env("STAGE3_VISIBLE_LABEL", "1")
        .args(["-c", "umask \"$0\" && exec \"$@\"", umask])
        .args([
            env!("CARGO_BIN_EXE_stage3"),
            "generate",
            "input.json",
            "--out",
            "out",
        ])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let modes = modes_under(&work.path().join("out"));
    let names: Vec<&str> = modes.iter().map(|(name, ..)| name.as_str()).collect();
    for expected in ["sources", "stories/umask_tale/manifest.json", "thumbnails"] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    for kind in [".png", ".json"] {
        assert!(
            names.iter().any(|n| !n.contains('/') && n.ends_with(kind)),
            "no {kind} at the root: {names:?}"
        );
    }
    assert!(names.iter().any(|n| n.starts_with("sources/")), "{names:?}");
    modes
}

#[cfg(unix)]
#[test]
fn stored_files_honour_the_umask() {
    for (umask, file_mode, dir_mode) in [("077", 0o600, 0o700), ("022", 0o644, 0o755)] {
        for (name, mode, is_dir) in stored_modes_under_umask(umask) {
            let expected = if is_dir { dir_mode } else { file_mode };
            assert_eq!(
                mode, expected,
                "umask {umask}: {name} is {mode:o}, not {expected:o}"
            );
        }
    }
}

/// Every stored record with a `generation_params` object, under `dir`.
fn records_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(records_under(&path));
        } else if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read(&path).unwrap();
            let is_record = serde_json::from_slice::<Value>(&text)
                .is_ok_and(|v| v.get("generation_params").is_some());
            if is_record {
                found.push(path);
            }
        }
    }
    found
}

/// A neighbour shortens a record's label hash to two digits, which once sliced past the
/// end of the string: the rerun treats it as a miss, exits 0 and answers every scene.
#[test]
fn an_edited_record_is_redrawn_not_a_crash() {
    let work = tempfile::tempdir().unwrap();
    let input = serde_json::to_vec(&scenes()).unwrap();
    let run = || {
        stage3(work.path())
            .env("STAGE3_PROVIDER", "placeholder")
            .env("STAGE3_VISIBLE_LABEL", "1")
            .args(["generate", "-"])
            .write_stdin(input.clone())
            .output()
            .unwrap()
    };
    assert_eq!(run().status.code(), Some(0));
    let records = records_under(&work.path().join("output"));
    assert_eq!(records.len(), 2, "{records:?}");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&records[0]).unwrap()).unwrap();
    record["generation_params"]["aigc_label"] =
        json!({"implicit": true, "visible": true, "source_sha256": "ab"});
    std::fs::write(&records[0], serde_json::to_vec(&record).unwrap()).unwrap();

    let rerun = run();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert_eq!(rerun.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let answer: Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(answer["summary"]["succeeded"], 2, "{answer}");
    assert_eq!(
        answer["summary"]["from_cache"], 1,
        "only the edited record missed"
    );
}

/// A scene served from the store says so in the progress lines and the closing line.
#[test]
fn cache_hits_show_in_the_progress() {
    let work = tempfile::tempdir().unwrap();
    let input = serde_json::to_vec(&scenes()).unwrap();
    let run = || {
        let output = stage3(work.path())
            .env("STAGE3_PROVIDER", "placeholder")
            .args(["generate", "-"])
            .write_stdin(input.clone())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0));
        String::from_utf8(output.stderr).unwrap()
    };
    let first = run();
    assert!(!first.contains("cached"), "{first}");
    assert!(
        first.contains("done: 2 succeeded (0 from the cache), 0 failed"),
        "{first}"
    );
    let second = run();
    assert!(second.contains("[1/2] scene_00"), "{second}");
    assert!(second.contains(": cached → "), "{second}");
    assert!(
        second.contains("done: 2 succeeded (2 from the cache), 0 failed"),
        "{second}"
    );
}

/// A rerun whose every scene is stored asks the provider nothing: no catalogue read, no
/// image call — the store is looked up before anything is planned.
#[tokio::test]
async fn a_fully_cached_rerun_makes_no_provider_request() {
    let server = stand_in_answering(ImageFormat::Png, "image/png").await;
    let work = tempfile::tempdir().unwrap();
    let input = write_input(work.path(), &scenes());
    let args = ["generate", input.to_str().unwrap()];
    let first = run_stage3(&server, work.path(), &args, &[]).await;
    assert_eq!(first.status.code(), Some(0));
    let (calls, catalogue) = (server.total_calls(), server.catalogue_requests().len());
    assert_eq!(calls, 2);
    assert!(
        catalogue > 0,
        "the first run checks its model in the catalogue"
    );

    let second = run_stage3(&server, work.path(), &args, &[]).await;
    assert_eq!(second.status.code(), Some(0));
    let answer: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(answer["summary"]["from_cache"], 2, "{answer}");
    assert_eq!(server.total_calls(), calls, "no image call");
    assert_eq!(
        server.catalogue_requests().len(),
        catalogue,
        "no catalogue read"
    );
}
