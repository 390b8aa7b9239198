//! The S3 backend through `ObjectStore`, against a real S3 wire-protocol server.
//!
//! By default each test starts `s3s-fs` in-process on loopback; with `STAGE3_TEST_S3_*`
//! set they run against that endpoint instead (see `support/s3_server.rs`). Answers no
//! healthy server gives on demand (503 SlowDown, 500) come from a loopback HTTP server
//! that speaks S3's error documents.

use std::time::Duration;

use crate::suite::support::config::TestConfig;
use crate::suite::support::noisy_png;
use crate::suite::support::s3_server::S3Target;
use aws_sdk_s3::config::{BehaviorVersion, Credentials};
use bytes::Bytes;
use stage3::storage::S3Settings;
use stage3::storage::{ObjectMeta, ObjectStore, S3Store};
use stage3::ErrorType;
use stage3::Stage3Error;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The `transient` flag and message of a storage error; anything else fails the test.
fn storage_failure(error: Stage3Error) -> (bool, String) {
    assert_eq!(error.error_type(), ErrorType::Storage, "{error}");
    println!("{error}");
    match error {
        Stage3Error::Storage { message, transient } => (transient, message),
        other => panic!("expected a storage error, got {other:?}"),
    }
}

#[tokio::test]
async fn put_then_get_returns_the_same_bytes_with_png_headers() {
    let target = S3Target::start().await;
    let store = target.store();
    let png = noisy_png(64, 36, 1);

    store
        .put("scene_001-abc.png", png.clone(), ObjectMeta::PNG)
        .await
        .unwrap();

    assert_eq!(
        store
            .get("scene_001-abc.png", 1 << 20)
            .await
            .unwrap()
            .into_bytes("", 1 << 20)
            .unwrap(),
        Some(png)
    );
    let head = target
        .client()
        .head_object()
        .bucket(&target.bucket)
        .key(target.object_key("scene_001-abc.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/png"));
    assert_eq!(head.cache_control(), Some(ObjectMeta::PNG.cache_control));
}

#[tokio::test]
async fn records_are_stored_as_uncached_json() {
    let target = S3Target::start().await;
    let store = target.store();
    let record = Bytes::from_static(br#"{"scene_id":"scene_001"}"#);

    store
        .put("scene_001-abc.json", record.clone(), ObjectMeta::RECORD)
        .await
        .unwrap();

    assert_eq!(
        store
            .get("scene_001-abc.json", 1 << 20)
            .await
            .unwrap()
            .into_bytes("", 1 << 20)
            .unwrap(),
        Some(record)
    );
    let head = target
        .client()
        .head_object()
        .bucket(&target.bucket)
        .key(target.object_key("scene_001-abc.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("application/json"));
    assert_eq!(head.cache_control(), Some("no-cache"));
}

#[tokio::test]
async fn a_second_put_replaces_the_object() {
    let target = S3Target::start().await;
    let store = target.store();
    let (first, second) = (noisy_png(16, 16, 1), noisy_png(16, 16, 2));
    assert_ne!(first, second);

    store.put("a.png", first, ObjectMeta::PNG).await.unwrap();
    store
        .put("a.png", second.clone(), ObjectMeta::PNG)
        .await
        .unwrap();

    assert_eq!(
        store
            .get("a.png", 1 << 20)
            .await
            .unwrap()
            .into_bytes("", 1 << 20)
            .unwrap(),
        Some(second)
    );
}

#[tokio::test]
async fn exists_tells_stored_from_missing() {
    let target = S3Target::start().await;
    let store = target.store();

    assert!(!store.exists("a.png").await.unwrap());
    store
        .put("a.png", noisy_png(8, 8, 3), ObjectMeta::PNG)
        .await
        .unwrap();
    assert!(store.exists("a.png").await.unwrap());
    assert!(!store.exists("b.png").await.unwrap());
}

#[tokio::test]
async fn get_of_a_missing_object_is_none() {
    let target = S3Target::start().await;
    assert_eq!(
        target.store().get("never-stored.png", 1024).await.unwrap(),
        stage3::storage::Fetched::Missing
    );
}

#[tokio::test]
async fn the_presigned_url_serves_the_object_without_credentials() {
    let target = S3Target::start().await;
    let store = target.store();
    let png = noisy_png(48, 27, 4);
    store
        .put("scene_002-def.png", png.clone(), ObjectMeta::PNG)
        .await
        .unwrap();

    let url = store
        .presigned_url("scene_002-def.png")
        .await
        .unwrap()
        .unwrap();

    if target.path_style {
        assert!(url.starts_with(&target.endpoint), "{url}");
    }
    assert!(url.contains("X-Amz-Expires=3600"), "{url}");
    assert!(!url.contains(target.secret_key()), "{url}");
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), png);

    // The signature covers the key: the same query on another key is refused.
    let forged = url.replace("scene_002-def.png", "scene_003-def.png");
    assert_ne!(forged, url);
    let response = reqwest::get(&forged).await.unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn location_and_public_key_include_the_prefix() {
    let target = S3Target::start().await;
    let store = target.store();
    assert!(target.prefix.ends_with('/'));

    assert_eq!(
        store.location("scene_001-abc.png"),
        format!("s3://{}/{}scene_001-abc.png", target.bucket, target.prefix)
    );
    assert_eq!(
        store.public_key("scene_001-abc.png"),
        format!("{}scene_001-abc.png", target.prefix)
    );
}

#[tokio::test]
async fn an_empty_prefix_leaves_keys_alone() {
    let target = S3Target::start().await;
    let store = S3Store::new(target.client(), &target.bucket, "", Duration::from_secs(60));
    assert_eq!(store.public_key("a.png"), "a.png");
    assert_eq!(
        store.location("a.png"),
        format!("s3://{}/a.png", target.bucket)
    );
}

#[tokio::test]
async fn from_settings_signs_with_the_configured_bucket_keys() {
    let target = S3Target::start().await;
    let config = TestConfig::new()
        .s3(&target)
        .set("STAGE3_S3_ACCESS_KEY_ID", &target.access_key)
        .set("STAGE3_S3_SECRET_ACCESS_KEY", target.secret_key())
        .build();
    let store = S3Store::from_settings(config.storage.s3.as_ref().unwrap(), &config.aws).await;
    let png = noisy_png(16, 9, 13);

    store
        .put("a.png", png.clone(), ObjectMeta::PNG)
        .await
        .unwrap();

    assert_eq!(
        store
            .get("a.png", 1 << 20)
            .await
            .unwrap()
            .into_bytes("", 1 << 20)
            .unwrap(),
        Some(png)
    );
    assert_eq!(
        store.location("a.png"),
        format!("s3://{}/{}a.png", target.bucket, target.prefix)
    );
    assert!(!format!("{store:?}").contains(target.secret_key()));
}

#[tokio::test]
async fn a_missing_bucket_is_a_permanent_storage_error() {
    let target = S3Target::start().await;
    let bucket = format!("stage3-missing-{}", fastrand::u64(..));
    let store = target.store_in_bucket(&bucket);

    let (transient, message) = storage_failure(
        store
            .put("a.png", noisy_png(8, 8, 5), ObjectMeta::PNG)
            .await
            .unwrap_err(),
    );
    assert!(!transient, "{message}");
    assert!(message.contains("PutObject"), "{message}");
    assert!(message.contains(&bucket), "{message}");
    assert!(message.contains("a.png"), "{message}");
    assert!(message.contains("NoSuchBucket"), "{message}");

    // A read must not mistake a missing bucket for a missing object.
    let (transient, message) = storage_failure(store.get("a.png", 1 << 20).await.unwrap_err());
    assert!(!transient, "{message}");
    assert!(message.contains("NoSuchBucket"), "{message}");
}

#[tokio::test]
async fn a_wrong_secret_key_is_permanent_and_never_shown() {
    let target = S3Target::start().await;
    let wrong_secret = "wrong-secret-0123456789abcdefghij";
    let store = target.store_with_secret(wrong_secret);

    let put = store
        .put("a.png", noisy_png(8, 8, 6), ObjectMeta::PNG)
        .await
        .unwrap_err();
    let get = store.get("a.png", 1 << 20).await.unwrap_err();
    let exists = store.exists("a.png").await.unwrap_err();

    for error in [put, get, exists] {
        let debug = format!("{error:?}");
        let (transient, message) = storage_failure(error);
        assert!(!transient, "{message}");
        assert!(message.contains("403"), "{message}");
        for text in [&message, &debug] {
            assert!(!text.contains(wrong_secret), "{text}");
            assert!(!text.contains(target.secret_key()), "{text}");
        }
    }
    assert!(!format!("{store:?}").contains(wrong_secret));
}

#[tokio::test]
async fn a_server_that_went_away_is_a_transient_storage_error() {
    let mut target = S3Target::start().await;
    let store = target.store();
    // A first call leaves a pooled keep-alive connection that the stop must cut too.
    store
        .put("a.png", noisy_png(8, 8, 7), ObjectMeta::PNG)
        .await
        .unwrap();
    if !target
        .stop("a_server_that_went_away_is_a_transient_storage_error")
        .await
    {
        return;
    }

    let put = store
        .put("b.png", noisy_png(8, 8, 8), ObjectMeta::PNG)
        .await
        .unwrap_err();
    let get = store.get("a.png", 1 << 20).await.unwrap_err();
    let exists = store.exists("a.png").await.unwrap_err();

    for (error, operation) in [
        (put, "PutObject"),
        (get, "GetObject"),
        (exists, "HeadObject"),
    ] {
        let (transient, message) = storage_failure(error);
        assert!(transient, "{message}");
        assert!(message.contains(operation), "{message}");
        assert!(message.contains(&target.bucket), "{message}");
    }
}

#[tokio::test]
async fn an_endpoint_that_never_answers_is_a_transient_timeout() {
    // Accepts connections and reads nothing: a hung server or a black-holing proxy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let s3 = test_config(endpoint);
    // The production 60 s operation timeout, shortened so the test ends quickly.
    let builder = S3Store::configure(test_builder(), &s3).timeout_config(
        aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .operation_timeout(Duration::from_millis(300))
            .build(),
    );
    let store = S3Store::new(
        aws_sdk_s3::Client::from_conf(builder.build()),
        &s3.bucket,
        &s3.prefix,
        s3.presign_expiry,
    );

    let error = store
        .put("a.png", noisy_png(8, 8, 12), ObjectMeta::PNG)
        .await
        .unwrap_err();

    let (transient, message) = storage_failure(error);
    assert!(transient, "{message}");
    assert!(message.contains("timeout"), "{message}");
    held.abort();
}

fn test_config(endpoint: String) -> S3Settings {
    S3Settings {
        bucket: "pictures".into(),
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        prefix: "stories/".into(),
        force_path_style: true,
        presign_expiry: Duration::from_secs(60),
        credentials: None,
    }
}

fn test_builder() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .credentials_provider(Credentials::new("AKID", "SECRET", None, None, "test"))
}

/// A store whose endpoint is `server`, a loopback HTTP server playing a troubled S3.
fn store_against(server: &MockServer) -> S3Store {
    let s3 = test_config(server.uri());
    let client = aws_sdk_s3::Client::from_conf(S3Store::configure(test_builder(), &s3).build());
    S3Store::new(client, &s3.bucket, &s3.prefix, s3.presign_expiry)
}

fn s3_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("content-type", "application/xml")
        .set_body_string(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <Error><Code>{code}</Code><Message>{message}</Message>\
             <RequestId>4442587FB7D0A2F9</RequestId></Error>"
        ))
}

#[tokio::test]
async fn throttling_and_server_errors_are_transient() {
    for (status, code) in [
        (503, "SlowDown"),
        (500, "InternalError"),
        (502, "BadGateway"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(s3_error(status, code, "try again later"))
            .expect(1) // one attempt: the service, not the SDK, owns retries
            .mount(&server)
            .await;

        let error = store_against(&server)
            .put("a.png", noisy_png(8, 8, 9), ObjectMeta::PNG)
            .await
            .unwrap_err();

        let (transient, message) = storage_failure(error);
        assert!(transient, "{status}: {message}");
        assert!(message.contains(&status.to_string()), "{message}");
        assert!(message.contains(code), "{message}");
        assert!(message.contains("s3://pictures/stories/a.png"), "{message}");
        server.verify().await;
    }
}

#[tokio::test]
async fn access_denied_and_bad_requests_are_permanent() {
    for (status, code) in [
        (403, "AccessDenied"),
        (403, "InvalidAccessKeyId"),
        (400, "InvalidArgument"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(s3_error(status, code, "no"))
            .mount(&server)
            .await;

        let error = store_against(&server)
            .put("a.png", noisy_png(8, 8, 10), ObjectMeta::PNG)
            .await
            .unwrap_err();

        let (transient, message) = storage_failure(error);
        assert!(!transient, "{status} {code}: {message}");
        assert!(message.contains(code), "{message}");
        assert!(!message.contains("SECRET"), "{message}");
    }
}

#[tokio::test]
async fn uploads_are_plain_bodies_without_chunked_encoding_or_checksums() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let png = noisy_png(8, 8, 11);

    store_against(&server)
        .put("a.png", png.clone(), ObjectMeta::PNG)
        .await
        .unwrap();

    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let put = &requests[0];
    assert_eq!(
        put.url.path(),
        "/pictures/stories/a.png",
        "path-style addressing"
    );
    assert_eq!(
        put.body,
        png.to_vec(),
        "the body is the bytes, not aws-chunked frames"
    );
    let header = |name: &str| {
        put.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(header("content-length"), Some(png.len().to_string()));
    assert_eq!(header("content-type").as_deref(), Some("image/png"));
    assert_eq!(header("content-encoding"), None);
    assert_eq!(header("x-amz-decoded-content-length"), None);
    assert!(
        put.headers
            .keys()
            .all(|name| !name.as_str().starts_with("x-amz-checksum-")),
        "{:?}",
        put.headers
    );
}
