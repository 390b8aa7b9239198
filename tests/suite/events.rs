//! Completion events and the dead-letter queue against real parts:
//!
//! - EventBridge → rule → SQS on a moto server (see `crate::suite::support::moto`): the events a batch
//!   publishes are received from the queue a `source: ["stage3"]` rule routes them to;
//! - the dead-letter path of the Lambda adapter against moto's SQS, with the real
//!   OpenRouter client talking to a scripted stand-in that refuses or fails chosen prompts;
//! - the webhook against a loopback HTTP server (wiremock) that records every POST, so
//!   signatures, retries and timeouts are checked on the wire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::suite::support::config::TestConfig;
use crate::suite::support::moto::{self, create_queue, receive_all, unique_name, Moto};
use crate::suite::support::scripted_openrouter::{noisy_image, Reply, ScriptedOpenRouter};
use crate::suite::support::sqs::{sqs_event, sqs_record};
use crate::suite::support::stage3_command;
use stage3::events::dead_letter::DeadLetterQueue;
use stage3::events::WebhookSettings;
use stage3::events::{
    EventBridgeSink, WebhookSink, REPLAY_WINDOW, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use stage3::events::{EventPublisher, EventSink, StoryRef};
use stage3::lambda::{self, Outlets};
use stage3::retry::RetryPolicy;
use stage3::BatchAnswer;
use stage3::Deadline;
use stage3::Secret;
use stage3::{GenerationRequest, Stage3Service};

/// Prompts containing this are refused by the stand-in as OpenRouter's moderation does.
const REFUSED: &str = "forbidden";
/// Prompts containing this meet an overloaded provider, every time.
const OVERLOADED: &str = "overloaded";

/// Three attempts, quickly: what the sinks retry, without the production waits.
const FAST: RetryPolicy = RetryPolicy {
    max_retries: 2,
    base_delay: Duration::from_millis(10),
    max_delay: Duration::from_millis(40),
};

/// An OpenRouter stand-in: an image for every prompt, except refused and overloaded ones.
async fn provider() -> ScriptedOpenRouter {
    ScriptedOpenRouter::start(|request, _| {
        let prompt = request.prompt();
        if prompt.contains(REFUSED) {
            Reply::json(
                403,
                json!({"error": {"code": 403, "message": "Input was flagged",
                    "metadata": {"error_type": "content_policy_violation", "reasons": ["violence"]}}}),
            )
        } else if prompt.contains(OVERLOADED) {
            Reply::error(503, "provider overloaded")
        } else {
            Reply::image(&noisy_image(256, 256, image::ImageFormat::Png), "image/png")
        }
    })
    .await
}

/// The real service and OpenRouter client against `provider`, storing in `out`. No
/// retries: a refused or overloaded prompt fails on its first call, so the events and
/// dead letters it causes are counted exactly.
async fn service_for(provider: &ScriptedOpenRouter, out: &std::path::Path) -> Stage3Service {
    TestConfig::new()
        .openrouter(&provider.base_url, "sk-or-v1-events-test")
        .out(out)
        .set("STAGE3_MAX_RETRIES", "0")
        .service()
        .await
}

fn request(scene_id: &str, prompt: &str) -> GenerationRequest {
    serde_json::from_value(json!({"scene_id": scene_id, "image_prompt": prompt})).unwrap()
}

/// A bus whose rule routes every `stage3` event to a fresh queue: (bus, queue URL).
async fn routed_bus(moto: &Moto) -> (String, String) {
    let (sqs, events) = (moto.sqs().await, moto.eventbridge().await);
    let bus = unique_name("stage3-bus");
    let (queue_url, queue_arn) = create_queue(&sqs, &unique_name("stage4-events")).await;
    events
        .create_event_bus()
        .name(&bus)
        .send()
        .await
        .expect("CreateEventBus");
    events
        .put_rule()
        .name("stage3-to-queue")
        .event_bus_name(&bus)
        .event_pattern(json!({"source": ["stage3"]}).to_string())
        .send()
        .await
        .expect("PutRule");
    events
        .put_targets()
        .rule("stage3-to-queue")
        .event_bus_name(&bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("queue")
                .arn(queue_arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("PutTargets");
    (bus, queue_url)
}

async fn eventbridge_sink(moto: &Moto, bus: &str) -> EventBridgeSink {
    let shared = moto.sdk_config().await;
    let config = EventBridgeSink::configure(aws_sdk_eventbridge::config::Builder::from(&shared));
    EventBridgeSink::new(aws_sdk_eventbridge::Client::from_conf(config.build()), bus)
        .with_retry(FAST)
}

/// The EventBridge envelopes a queue received, parsed.
async fn received_events(moto: &Moto, queue_url: &str, expected: usize) -> Vec<Value> {
    let messages = receive_all(
        &moto.sqs().await,
        queue_url,
        expected,
        Duration::from_secs(20),
    )
    .await;
    messages
        .iter()
        .map(|m| serde_json::from_str(m.body().unwrap()).unwrap())
        .collect()
}

fn of_type<'a>(events: &'a [Value], detail_type: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["detail-type"] == detail_type)
        .collect()
}

// ---------------------------------------------------------------------------------------
// EventBridge → SQS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_batch_publishes_ready_failed_and_done_through_an_eventbridge_rule() {
    let Some(moto) = moto::moto() else { return };
    let (bus, queue_url) = routed_bus(moto).await;
    let provider = provider().await;
    let work = tempfile::tempdir().unwrap();
    let service = service_for(&provider, work.path()).await;

    // 12 stored scenes, one refused and one invalid: 15 events, two PutEvents calls.
    let mut requests: Vec<GenerationRequest> = (0..12)
        .map(|i| request(&format!("scene_{i:03}"), &format!("a lighthouse, view {i}")))
        .collect();
    requests.push(request("scene_refused", &format!("something {REFUSED}")));
    requests.push(request("scene_blank", "   "));
    let answer = service.generate_all_images(requests).await;
    assert_eq!((answer.results.len(), answer.failures.len()), (12, 2));

    let publisher = EventPublisher::new(vec![Arc::new(eventbridge_sink(moto, &bus).await)]);
    let story = StoryRef {
        story_id: "fox_tale".into(),
        manifest_url: Some("stories/fox_tale/manifest.json".into()),
        gallery_url: None,
    };
    let report = publisher
        .publish_batch(&answer, Some(&story), Deadline::NONE)
        .await;
    assert_eq!((report.delivered, report.lost), (15, 0), "{report:?}");

    let events = received_events(moto, &queue_url, 15).await;
    assert_eq!(events.len(), 15, "{events:#?}");
    for event in &events {
        assert_eq!(event["source"], "stage3");
    }

    let ready = of_type(&events, "Stage3 Scene Ready");
    assert_eq!(ready.len(), 12);
    for event in ready {
        let scene_id = event["detail"]["scene_id"].as_str().unwrap();
        let result = answer
            .results
            .iter()
            .find(|r| r.scene_id == scene_id)
            .unwrap();
        assert_eq!(event["detail"], serde_json::to_value(result).unwrap());
    }

    let mut failed: Vec<Value> = of_type(&events, "Stage3 Scene Failed")
        .into_iter()
        .map(|e| e["detail"].clone())
        .collect();
    failed.sort_by_key(|d| d["scene_id"].as_str().unwrap().to_string());
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0]["scene_id"], "scene_blank");
    assert_eq!(failed[0]["error_type"], "invalid_request");
    assert_eq!(failed[1]["scene_id"], "scene_refused");
    assert_eq!(failed[1]["error_type"], "content_policy");
    assert!(failed[1]["message"].as_str().unwrap().contains("flagged"));

    let done = of_type(&events, "Stage3 Batch Done");
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0]["detail"],
        json!({
            "summary": {"scenes": 14, "succeeded": 12, "failed": 2, "from_cache": 0,
                        "cost_usd": answer.summary.cost_usd,
                        "estimated_cost_usd": answer.summary.estimated_cost_usd},
            "story_id": "fox_tale",
            "manifest": "stories/fox_tale/manifest.json",
        })
    );
}

#[tokio::test]
async fn events_for_a_missing_bus_are_counted_lost_and_nothing_fails() {
    let Some(moto) = moto::moto() else { return };
    let sink = eventbridge_sink(moto, &unique_name("no-such-bus")).await;
    let mut answer = BatchAnswer::default();
    answer.summarize();
    let publisher = EventPublisher::new(vec![Arc::new(sink)]);
    let report = publisher.publish_batch(&answer, None, Deadline::NONE).await;
    assert_eq!((report.delivered, report.lost), (0, 1), "{report:?}");
    assert_eq!(publisher.lost_total(), 1);
}

#[tokio::test]
async fn an_unreachable_eventbridge_is_retried_then_counted_lost() {
    // A port nobody listens on: every call is refused at connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_eventbridge::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_eventbridge::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .load()
        .await;
    let config = EventBridgeSink::configure(aws_sdk_eventbridge::config::Builder::from(&shared));
    let sink = EventBridgeSink::new(
        aws_sdk_eventbridge::Client::from_conf(config.build()),
        "bus",
    )
    .with_retry(FAST);
    let events = stage3::events::batch_events(&BatchAnswer::default(), None);
    let started = Instant::now();
    assert_eq!(sink.deliver(&events, Deadline::NONE).await, 1);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn the_cli_publishes_to_the_bus_its_environment_names() {
    let Some(moto) = moto::moto() else { return };
    let (bus, queue_url) = routed_bus(moto).await;
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("input.json");
    std::fs::write(
        &input,
        json!({"scenes": [
            {"scene_id": "cli_001", "image_prompt": "a fox"},
            {"scene_id": "cli_002", "image_prompt": "an owl"}
        ]})
        .to_string(),
    )
    .unwrap();
    let dir = work.path().to_path_buf();
    let env = moto.child_env();
    let url = moto.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        stage3_command(&dir)
            .envs(env)
            // Only the EventBridge endpoint: the service-specific variable is honoured.
            .env_remove("AWS_ENDPOINT_URL")
            .env("AWS_ENDPOINT_URL_EVENTBRIDGE", url)
            .env("STAGE3_EVENT_BUS", bus)
            .args([
                "generate",
                "input.json",
                "--provider",
                "placeholder",
                "--out",
                "images",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("events: 3 delivered, 0 lost"), "{stderr}");

    let events = received_events(moto, &queue_url, 3).await;
    assert_eq!(
        of_type(&events, "Stage3 Scene Ready").len(),
        2,
        "{events:#?}"
    );
    let done = of_type(&events, "Stage3 Batch Done");
    assert_eq!(done[0]["detail"]["summary"]["succeeded"], 2);
}

// ---------------------------------------------------------------------------------------
// The dead-letter queue (Lambda, SQS)
// ---------------------------------------------------------------------------------------

fn scene_body(scene_id: &str, prompt: &str) -> String {
    json!({"scene_id": scene_id, "image_prompt": prompt}).to_string()
}

fn batch_item_failures(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("not an SQS batch response: {answer}"))
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn attribute(message: &aws_sdk_sqs::types::Message, name: &str) -> String {
    message
        .message_attributes()
        .and_then(|attributes| attributes.get(name))
        .and_then(|value| value.string_value())
        .unwrap_or_else(|| panic!("no attribute {name}: {message:?}"))
        .to_string()
}

struct SqsHarness {
    _work: tempfile::TempDir,
    provider: ScriptedOpenRouter,
    service: Stage3Service,
}

impl SqsHarness {
    async fn new() -> SqsHarness {
        let work = tempfile::tempdir().unwrap();
        let provider = provider().await;
        let service = service_for(&provider, work.path()).await;
        SqsHarness {
            _work: work,
            provider,
            service,
        }
    }

    async fn handle(&self, outlets: &Outlets, records: Vec<Value>) -> Value {
        let deadline = Deadline::after(Duration::from_secs(600));
        lambda::handle_with(&self.service, outlets, sqs_event(records), deadline)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn permanent_failures_go_to_the_dead_letter_queue_at_once() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let (dlq_url, _) = create_queue(&sqs, &unique_name("stage3-dlq")).await;
    let (bus, events_queue) = routed_bus(moto).await;
    let outlets = Outlets {
        events: EventPublisher::new(vec![Arc::new(eventbridge_sink(moto, &bus).await)]),
        dead_letter: Some(DeadLetterQueue::new(sqs.clone(), &dlq_url)),
        ..Outlets::default()
    };
    let harness = SqsHarness::new().await;

    let refused_body = scene_body("scene_refused", &format!("a {REFUSED} thing"));
    let malformed_body = "{\"scene_id\": \"scene_broken\", \"image_prompt\": ";
    let answer = harness
        .handle(
            &outlets,
            vec![
                sqs_record("m-good", &scene_body("scene_good", "a lighthouse at dawn")),
                sqs_record("m-refused", &refused_body),
                sqs_record("m-malformed", malformed_body),
            ],
        )
        .await;
    assert_eq!(
        batch_item_failures(&answer),
        Vec::<String>::new(),
        "{answer}"
    );
    assert_eq!(
        harness.provider.calls_for(REFUSED),
        1,
        "asked once, never again"
    );

    let mut letters = receive_all(&sqs, &dlq_url, 2, Duration::from_secs(10)).await;
    letters.sort_by_key(|m| attribute(m, "error_type"));
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(attribute(&letters[0], "error_type"), "content_policy");
    assert_eq!(
        letters[0].body(),
        Some(refused_body.as_str()),
        "body unchanged"
    );
    assert_eq!(attribute(&letters[0], "scene_id"), "scene_refused");
    assert!(attribute(&letters[0], "error_message").contains("flagged"));
    assert_eq!(attribute(&letters[1], "error_type"), "invalid_request");
    assert_eq!(letters[1].body(), Some(malformed_body), "body unchanged");
    assert!(attribute(&letters[1], "error_message").starts_with("malformed JSON"));

    // Reported: a Scene Failed per dead letter, a Scene Ready, a Batch Done per record.
    let events = received_events(moto, &events_queue, 6).await;
    assert_eq!(
        of_type(&events, "Stage3 Scene Ready").len(),
        1,
        "{events:#?}"
    );
    assert_eq!(
        of_type(&events, "Stage3 Scene Failed").len(),
        2,
        "{events:#?}"
    );
    assert_eq!(
        of_type(&events, "Stage3 Batch Done").len(),
        3,
        "{events:#?}"
    );
}

#[tokio::test]
async fn transient_failures_are_still_redelivered_and_never_dead_lettered() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let (dlq_url, _) = create_queue(&sqs, &unique_name("stage3-dlq")).await;
    let (bus, events_queue) = routed_bus(moto).await;
    let outlets = Outlets {
        events: EventPublisher::new(vec![Arc::new(eventbridge_sink(moto, &bus).await)]),
        dead_letter: Some(DeadLetterQueue::new(sqs.clone(), &dlq_url)),
        ..Outlets::default()
    };
    let harness = SqsHarness::new().await;

    // A record with a refused scene *and* an overloaded one goes back whole: the
    // overloaded scene may work next time (its stored sibling then comes from the cache).
    let mixed = json!([
        {"scene_id": "mixed_refused", "image_prompt": format!("a {REFUSED} scene")},
        {"scene_id": "mixed_overloaded", "image_prompt": format!("an {OVERLOADED} scene")},
        {"scene_id": "mixed_good", "image_prompt": "a quiet harbour"},
    ])
    .to_string();
    let answer = harness
        .handle(
            &outlets,
            vec![
                sqs_record(
                    "m-overloaded",
                    &scene_body("s_over", &format!("{OVERLOADED} sky")),
                ),
                sqs_record("m-mixed", &mixed),
            ],
        )
        .await;
    assert_eq!(batch_item_failures(&answer), ["m-mixed", "m-overloaded"]);
    assert!(receive_all(&sqs, &dlq_url, 1, Duration::from_secs(2))
        .await
        .is_empty());

    // The stored scene is announced at once; nothing is announced as failed or done
    // while its message is still to be retried.
    let events = received_events(moto, &events_queue, 1).await;
    let ready = of_type(&events, "Stage3 Scene Ready");
    assert_eq!(ready.len(), 1, "{events:#?}");
    assert_eq!(ready[0]["detail"]["scene_id"], "mixed_good");
    assert!(
        receive_all(&moto.sqs().await, &events_queue, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_failing_dead_letter_send_redelivers_the_message() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let missing = format!(
        "{}/{}/{}",
        moto.url,
        moto::ACCOUNT,
        unique_name("no-such-dlq")
    );
    let outlets = Outlets {
        events: EventPublisher::disabled(),
        dead_letter: Some(DeadLetterQueue::new(sqs, &missing)),
        ..Outlets::default()
    };
    let harness = SqsHarness::new().await;
    let answer = harness
        .handle(
            &outlets,
            vec![
                sqs_record(
                    "m-refused",
                    &scene_body("s_refused", &format!("{REFUSED} art")),
                ),
                sqs_record("m-good", &scene_body("s_good", "a calm sea")),
            ],
        )
        .await;
    assert_eq!(batch_item_failures(&answer), ["m-refused"], "nothing lost");
}

#[tokio::test]
async fn without_a_dead_letter_queue_permanent_failures_are_redelivered_as_before() {
    let harness = SqsHarness::new().await;
    let answer = harness
        .handle(
            &Outlets::default(),
            vec![
                sqs_record(
                    "m-refused",
                    &scene_body("s_refused", &format!("{REFUSED} art")),
                ),
                sqs_record("m-malformed", "not json"),
            ],
        )
        .await;
    assert_eq!(batch_item_failures(&answer), ["m-malformed", "m-refused"]);
}

/// The function's start-up builds no event client: the outlets are built by the first
/// invocation that asks for them, once, and shared by every later one.
#[tokio::test]
async fn the_outlets_are_built_on_first_use_and_kept() {
    let lazy = lambda::LazyOutlets::new(
        stage3::events::EventSettings {
            webhook: Some(WebhookSettings {
                url: "https://hooks.example/stage3".into(),
                secret: Secret::new(WEBHOOK_SECRET),
            }),
            ..Default::default()
        },
        stage3::AwsConfig::default(),
    );
    assert!(!lazy.is_built());
    let first = lazy.get().await.unwrap();
    assert!(first.events.is_enabled() && lazy.is_built());
    assert!(std::ptr::eq(first, lazy.get().await.unwrap()));
}

// ---------------------------------------------------------------------------------------
// The webhook
// ---------------------------------------------------------------------------------------

const WEBHOOK_SECRET: &str = "whsec-events-test-very-secret-0123";

fn webhook(server: &MockServer, path: &str) -> WebhookSink {
    WebhookSink::new(&WebhookSettings {
        url: format!("{}{path}", server.uri()),
        secret: Secret::new(WEBHOOK_SECRET),
    })
    .unwrap()
    .with_retry(FAST)
}

/// Now, in Unix seconds, as a receiver's clock reads it.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What a receiver does (docs/events.md): refuse a timestamp more than five minutes from
/// its clock `now`, then check the HMAC-SHA256 of `"{timestamp}.{raw body}"` with the
/// shared secret, in constant time.
fn receiver_accepts(timestamp: &str, body: &[u8], signature: &str, now: u64) -> bool {
    let Ok(sent_at) = timestamp.parse::<u64>() else {
        return false;
    };
    if now.abs_diff(sent_at) > 300 {
        return false;
    }
    let Some(hex_digest) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// A received POST's header `name`, which must be there.
fn header<'a>(request: &'a wiremock::Request, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn answer_with_two_scenes() -> (BatchAnswer, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let service = TestConfig::new().out(work.path()).service().await;
    let answer = service
        .generate_all_images(vec![request("hook_001", "a fox"), request("hook_002", " ")])
        .await;
    (answer, work)
}

#[tokio::test]
async fn webhook_posts_are_signed_over_their_timestamp_and_raw_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let (answer, _work) = answer_with_two_scenes().await;
    let publisher = EventPublisher::new(vec![Arc::new(webhook(&server, "/hooks/stage3"))]);
    let report = publisher.publish_batch(&answer, None, Deadline::NONE).await;
    assert_eq!((report.delivered, report.lost), (3, 0));

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 3);
    let mut types = Vec::new();
    let now = unix_now();
    for request in &received {
        assert_eq!(request.url.path(), "/hooks/stage3");
        let signature = header(request, SIGNATURE_HEADER);
        let timestamp = header(request, TIMESTAMP_HEADER);
        let sent_at: u64 = timestamp.parse().unwrap();
        assert!(now.abs_diff(sent_at) <= 5, "signed at {sent_at}, now {now}");
        assert!(
            receiver_accepts(timestamp, &request.body, signature, now),
            "{timestamp} {signature}"
        );
        let mut tampered = request.body.clone();
        tampered.push(b' ');
        assert!(!receiver_accepts(timestamp, &tampered, signature, now));
        // The timestamp is signed: moving it, to pass an old POST off as new, breaks the
        // signature.
        let moved = (sent_at + 60).to_string();
        assert!(!receiver_accepts(&moved, &request.body, signature, now));
        assert_eq!(
            request.headers.get("content-type").unwrap(),
            "application/json"
        );
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(
            request
                .headers
                .get("x-stage3-event")
                .unwrap()
                .to_str()
                .unwrap(),
            body["type"].as_str().unwrap()
        );
        types.push(body["type"].as_str().unwrap().to_string());
        match body["type"].as_str().unwrap() {
            "scene.ready" => assert_eq!(
                body["data"],
                serde_json::to_value(&answer.results[0]).unwrap()
            ),
            "scene.failed" => {
                assert_eq!(body["data"]["scene_id"], "hook_002");
                assert_eq!(body["data"]["error_type"], "invalid_request");
            }
            "batch.done" => assert_eq!(body["data"]["summary"]["scenes"], 2),
            other => panic!("unexpected type {other}"),
        }
    }
    assert_eq!(types.last().unwrap(), "batch.done", "batch.done comes last");
}

#[tokio::test]
async fn a_replayed_webhook_post_is_refused_once_its_timestamp_is_old() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let events = stage3::events::batch_events(&BatchAnswer::default(), None);
    assert_eq!(
        webhook(&server, "/").deliver(&events, Deadline::NONE).await,
        0
    );
    let received = server.received_requests().await.unwrap();
    let request = &received[0];
    let (timestamp, signature) = (
        header(request, TIMESTAMP_HEADER),
        header(request, SIGNATURE_HEADER),
    );
    let sent_at: u64 = timestamp.parse().unwrap();
    assert_eq!(
        REPLAY_WINDOW,
        Duration::from_secs(300),
        "docs/events.md says so"
    );
    // Within the window the POST is good, whoever sends it; past it, the same bytes are
    // refused, and they cannot be signed anew without the secret.
    let window = REPLAY_WINDOW.as_secs();
    assert!(receiver_accepts(
        timestamp,
        &request.body,
        signature,
        sent_at
    ));
    assert!(receiver_accepts(
        timestamp,
        &request.body,
        signature,
        sent_at + window
    ));
    assert!(!receiver_accepts(
        timestamp,
        &request.body,
        signature,
        sent_at + window + 1
    ));
    assert!(!receiver_accepts(
        timestamp,
        &request.body,
        signature,
        sent_at + 86_400
    ));
}

#[tokio::test]
async fn a_webhook_answering_5xx_is_retried_until_it_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let events = stage3::events::batch_events(&BatchAnswer::default(), None);
    assert_eq!(
        webhook(&server, "/").deliver(&events, Deadline::NONE).await,
        0
    );
    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 3, "two 503s, then delivered");
    assert!(received.windows(2).all(|pair| pair[0].body == pair[1].body));
    // Each attempt is signed when it is sent, so a late retry is not refused as stale.
    let now = unix_now();
    for request in &received {
        let (timestamp, signature) = (
            header(request, TIMESTAMP_HEADER),
            header(request, SIGNATURE_HEADER),
        );
        assert!(receiver_accepts(timestamp, &request.body, signature, now));
    }
}

#[tokio::test]
async fn a_webhook_refusing_with_4xx_is_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&server)
        .await;
    let events = stage3::events::batch_events(&BatchAnswer::default(), None);
    assert_eq!(
        webhook(&server, "/").deliver(&events, Deadline::NONE).await,
        1
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_lambda_function_publishes_direct_and_eventbridge_invocations() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let work = tempfile::tempdir().unwrap();
    let service = TestConfig::new().out(work.path()).service().await;
    let outlets = Outlets {
        events: EventPublisher::new(vec![Arc::new(webhook(&server, "/"))]),
        dead_letter: None,
        ..Outlets::default()
    };
    let deadline = Deadline::after(Duration::from_secs(600));
    let types = |requests: &[wiremock::Request]| -> Vec<String> {
        requests
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["type"].to_string())
            .collect()
    };

    // One request: its scene's event only.
    let single = json!({"scene_id": "direct_001", "image_prompt": "a fox"});
    lambda::handle_with(&service, &outlets, single, deadline)
        .await
        .unwrap();
    assert_eq!(
        types(&server.received_requests().await.unwrap()),
        ["\"scene.ready\""]
    );

    // A batch inside an EventBridge event: its scenes' events, then batch.done.
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let event = json!({"detail-type": "Stage2 Scenes Ready", "source": "stage2",
        "detail": {"scenes": [{"scene_id": "eb_001", "image_prompt": "an owl"},
                              {"scene_id": "eb_002", "image_prompt": "a hare"}]}});
    lambda::handle_with(&service, &outlets, event, deadline)
        .await
        .unwrap();
    let received = types(&server.received_requests().await.unwrap());
    assert_eq!(received.len(), 3, "{received:?}");
    assert_eq!(received[2], "\"batch.done\"");
}

#[tokio::test]
async fn a_429_is_retried_and_a_silent_webhook_times_out() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429))
        .mount(&server)
        .await;
    let events = stage3::events::batch_events(&BatchAnswer::default(), None);
    assert_eq!(
        webhook(&server, "/").deliver(&events, Deadline::NONE).await,
        1
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 3);

    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&slow)
        .await;
    let sink = WebhookSink::with_timeouts(
        &WebhookSettings {
            url: slow.uri(),
            secret: Secret::new(WEBHOOK_SECRET),
        },
        Duration::from_millis(200),
        Duration::from_millis(200),
    )
    .unwrap()
    .with_retry(FAST);
    let started = Instant::now();
    assert_eq!(sink.deliver(&events, Deadline::NONE).await, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.received_requests().await.unwrap().len(), 3);
}

#[tokio::test]
async fn the_webhook_secret_and_url_token_never_reach_a_trace_log() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("input.json"),
        json!({"scene_id": "log_001", "image_prompt": "a fox"}).to_string(),
    )
    .unwrap();
    let dir = work.path().to_path_buf();
    let url = format!("{}/hook/very-private-token", server.uri());
    let output = tokio::task::spawn_blocking(move || {
        stage3_command(&dir)
            .env("RUST_LOG", "trace")
            .env("STAGE3_WEBHOOK_URL", url)
            .env("STAGE3_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .args([
                "generate",
                "input.json",
                "--provider",
                "placeholder",
                "--out",
                "images",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "a lost event fails nothing: {stderr}"
    );
    assert!(stderr.contains("webhook event lost"), "{stderr}");
    assert!(stderr.contains("events: 0 delivered, 2 lost"), "{stderr}");
    assert!(
        !stderr.contains(WEBHOOK_SECRET),
        "the secret leaked: {stderr}"
    );
    assert!(
        !stderr.contains("very-private-token"),
        "the URL token leaked"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains(WEBHOOK_SECRET));
    // Retried: every event was tried once and RetryPolicy::EVENTS.max_retries times more.
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        2 * (RetryPolicy::EVENTS.max_retries as usize + 1)
    );
}

#[tokio::test]
async fn a_cli_run_against_a_silent_webhook_ends_within_its_events_budget() {
    // A receiver that accepts connections and never answers: without a budget each event
    // waited out every attempt's timeout, and a one-scene run took 82 s.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("input.json"),
        json!({"scene_id": "quiet_001", "image_prompt": "a fox"}).to_string(),
    )
    .unwrap();
    let dir = work.path().to_path_buf();
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        stage3_command(&dir)
            .env("STAGE3_WEBHOOK_URL", url)
            .env("STAGE3_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("STAGE3_EVENTS_TIMEOUT_SECS", "3")
            .args([
                "generate",
                "input.json",
                "--provider",
                "placeholder",
                "--out",
                "images",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    holder.abort();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "a lost event fails nothing: {stderr}"
    );
    assert!(stderr.contains("events: 0 delivered, 2 lost"), "{stderr}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["summary"]["succeeded"], 1, "{answer}");
    // The budget is 3 s; the rest is generous room for a slow machine, far below the 82 s
    // the same run took without one.
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
}

#[test]
fn a_nonsense_events_budget_is_a_config_error_before_anything_runs() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("input.json"),
        json!({"scene_id": "s1", "image_prompt": "a fox"}).to_string(),
    )
    .unwrap();
    let output = stage3_command(work.path())
        .env("STAGE3_EVENTS_TIMEOUT_SECS", "forever")
        .args([
            "generate",
            "input.json",
            "--provider",
            "placeholder",
            "--out",
            "images",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("STAGE3_EVENTS_TIMEOUT_SECS"), "{stderr}");
    assert!(
        !work.path().join("images").exists(),
        "nothing was generated"
    );
}
