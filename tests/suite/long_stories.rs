//! A story bigger than one invocation: `stage3 submit` puts it on a real SQS queue (moto on
//! loopback), the Lambda handler drains the messages received from it, and `stage3 status`
//! reads the story as the storyboard does. The CLI runs as its real binary; the handler is
//! the real `lambda::handle_with`, on the messages moto hands out. Failed entries come from
//! a real HTTP stand-in in front of moto (`crate::suite::support::sqs_stand_in`), since moto fails
//! none of its own accord.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::suite::support::config::TestConfig;
use crate::suite::support::moto::{self, create_queue, receive_all, unique_name, Moto};
use crate::suite::support::scripted_provider::{Answer, ScriptedProvider};
use crate::suite::support::sqs::{sqs_event, sqs_record};
use crate::suite::support::sqs_stand_in::{Fault, SqsStandIn};
use crate::suite::support::stage3_command;
use stage3::lambda::{self, Outlets};
use stage3::metrics::MetricsSink;
use stage3::storage::FsStore;
use stage3::Deadline;
use stage3::Stage3Service;
use stage3::{parse_submission, Submission};

/// What each image is billed at.
const IMAGE_COST_USD: f64 = 0.039;

/// A story of `count` scenes, `s1` … `sN`.
fn story(count: usize) -> Value {
    let scenes: Vec<Value> = (1..=count)
        .map(|i| json!({"scene_id": format!("s{i}"), "image_prompt": format!("a fox, scene {i}")}))
        .collect();
    json!({ "scenes": scenes })
}

/// A work directory with `input.json`; the store is `out/` inside it.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new(input: &Value) -> Work {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("input.json"), input.to_string()).unwrap();
        Work { dir }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Runs `stage3 ARGS` here against moto (or `sqs_endpoint` for SQS alone), with the
    /// placeholder provider and the store in `out/`.
    async fn stage3(&self, moto: &Moto, sqs_endpoint: Option<&str>, args: &[&str]) -> Output {
        let dir = self.dir.path().to_path_buf();
        let env = moto.child_env();
        let sqs = sqs_endpoint.map(str::to_string);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let mut command = stage3_command(&dir);
            command
                .envs(env)
                .env("STAGE3_PROVIDER", "placeholder")
                .env("STAGE3_OUTPUT_DIR", dir.join("out"));
            if let Some(url) = sqs {
                // The service's own variable beats AWS_ENDPOINT_URL.
                command.env("AWS_ENDPOINT_URL_SQS", url);
            }
            command.args(&args).output().unwrap()
        })
        .await
        .unwrap()
    }

    async fn submit(&self, moto: &Moto, sqs: Option<&str>, queue: &str, extra: &[&str]) -> Output {
        let mut args = vec!["submit", "input.json", "--queue-url", queue];
        args.extend_from_slice(extra);
        self.stage3(moto, sqs, &args).await
    }

    /// `stage3 status ID --json`: its exit code and answer.
    async fn status(&self, moto: &Moto, story_id: &str) -> (i32, Value) {
        let output = self
            .stage3(moto, None, &["status", story_id, "--json"])
            .await;
        let code = output.status.code().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let answer = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "status printed no JSON ({e}): {text}\nstderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (code, answer)
    }
}

fn answer_of(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON answer ({e}); stderr: {stderr}"))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Each message's story id and scene ids, parsed as the function parses a body.
fn bodies(messages: &[aws_sdk_sqs::types::Message]) -> Vec<(String, Vec<String>)> {
    messages
        .iter()
        .map(|m| {
            match parse_submission(serde_json::from_str(m.body().unwrap()).unwrap(), 500).unwrap() {
                Submission::Story {
                    story_id, requests, ..
                } => (story_id, requests.into_iter().map(|r| r.scene_id).collect()),
                other => panic!("not a story batch: {other:?}"),
            }
        })
        .collect()
}

/// Every scene id the messages carry, sorted, and the story ids they name.
fn scenes_of(messages: &[aws_sdk_sqs::types::Message]) -> (Vec<String>, Vec<String>) {
    let mut scenes = Vec::new();
    let mut stories = Vec::new();
    for (story_id, ids) in bodies(messages) {
        stories.push(story_id);
        scenes.extend(ids);
    }
    scenes.sort_by_key(|id| id[1..].parse::<usize>().unwrap_or(0));
    stories.dedup();
    (scenes, stories)
}

fn ids(count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("s{i}")).collect()
}

/// The function as `stage3-lambda` runs it, over the store the CLI reads: the real handler,
/// a provider that bills every image, and metric lines kept in memory.
struct Function {
    service: Stage3Service,
    outlets: Outlets,
}

impl Function {
    fn new(out: &Path) -> Function {
        std::fs::create_dir_all(out).unwrap();
        let provider = Arc::new(ScriptedProvider::by_prompt(|_| {
            Answer::image().costing(IMAGE_COST_USD)
        }));
        let store = Arc::new(FsStore::new(out).unwrap());
        let service = TestConfig::new().out(out).service_with(provider, store);
        Function {
            service,
            outlets: Outlets {
                metrics: MetricsSink::memory(),
                ..Outlets::default()
            },
        }
    }

    /// Hands `messages` to the handler as one SQS event; answers the handler's answer.
    async fn drain(&self, messages: &[aws_sdk_sqs::types::Message]) -> Value {
        let records = messages
            .iter()
            .map(|m| sqs_record(m.message_id().unwrap(), m.body().unwrap()))
            .collect();
        let deadline = Deadline::after(Duration::from_secs(600));
        lambda::handle_with(&self.service, &self.outlets, sqs_event(records), deadline)
            .await
            .unwrap()
    }

    fn metric_lines(&self) -> Vec<Value> {
        self.outlets
            .metrics
            .lines()
            .iter()
            .map(|line| serde_json::from_str(line).expect("an EMF line is JSON"))
            .collect()
    }
}

async fn delete_all(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    messages: &[aws_sdk_sqs::types::Message],
) {
    for message in messages {
        sqs.delete_message()
            .queue_url(queue)
            .receipt_handle(message.receipt_handle().unwrap())
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_submitted_story_is_drained_by_the_function_and_status_follows_it() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let work = Work::new(&story(7));

    let output = work
        .submit(
            moto,
            None,
            &queue,
            &["--scenes-per-message", "3", "--story-id", "fox-e2e"],
        )
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let answer = answer_of(&output);
    assert_eq!(answer["story_id"], "fox-e2e");
    assert_eq!(answer["queue_url"], queue.as_str());
    assert_eq!(answer["messages"], 3);
    assert_eq!(answer["scenes"], 7);
    let plan: Value = serde_json::from_slice(
        &std::fs::read(work.out().join("stories/fox-e2e/plan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(plan["scenes"], 7);
    assert_eq!(plan["scene_ids"], json!(ids(7)));

    let (code, status) = work.status(moto, "fox-e2e").await;
    assert_eq!(code, 3, "{status}");
    assert_eq!(
        (status["total"].clone(), status["pending"].clone()),
        (json!(7), json!(7))
    );

    let messages = receive_all(&sqs, &queue, 3, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 3);
    let (scenes, stories) = scenes_of(&messages);
    assert_eq!(scenes, ids(7), "every scene exactly once");
    assert_eq!(stories, ["fox-e2e"]);

    // The function takes the first message, then the other two in one invocation.
    let function = Function::new(&work.out());
    let mut messages = messages;
    messages.sort_by_key(|m| bodies(std::slice::from_ref(m))[0].1[0].clone());
    let first = function.drain(&messages[..1]).await;
    assert_eq!(first["batchItemFailures"], json!([]), "{first}");
    let (code, status) = work.status(moto, "fox-e2e").await;
    assert_eq!(code, 3, "{status}");
    assert_eq!(status["succeeded"], 3);
    assert_eq!(status["pending"], 4);
    assert_eq!(status["pending_scene_ids"], json!(["s4", "s5", "s6", "s7"]));
    let page = std::fs::read_to_string(work.out().join("stories/fox-e2e/index.html")).unwrap();
    assert_eq!(
        page.matches(r#"<article class="card pending""#).count(),
        4,
        "{page}"
    );
    assert!(page.contains(r#"<span class="waiting"><b>4</b> pending</span>"#));

    let rest = function.drain(&messages[1..]).await;
    assert_eq!(rest["batchItemFailures"], json!([]), "{rest}");
    delete_all(&sqs, &queue, &messages).await;
    assert!(receive_all(&sqs, &queue, 1, Duration::from_secs(1))
        .await
        .is_empty());

    let (code, status) = work.status(moto, "fox-e2e").await;
    assert_eq!(code, 0, "{status}");
    assert_eq!(
        (
            status["total"].clone(),
            status["succeeded"].clone(),
            status["pending"].clone()
        ),
        (json!(7), json!(7), json!(0))
    );
    let batch_cost = first["summary"]["cost_usd"].as_f64().unwrap()
        + rest["summary"]["cost_usd"].as_f64().unwrap();
    assert!(
        (status["cost_usd"].as_f64().unwrap() - batch_cost).abs() < 1e-9,
        "{status}"
    );
    let page = std::fs::read_to_string(work.out().join("stories/fox-e2e/index.html")).unwrap();
    assert!(!page.contains(r#"<article class="card pending""#));

    // The human form says the same, and `--wait` returns at once when nothing is pending.
    let output = work
        .stage3(
            moto,
            None,
            &["status", "fox-e2e", "--wait", "--timeout", "5"],
        )
        .await;
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("7 succeeded, 0 failed, 0 pending"), "{text}");

    // One EMF line per invocation (nothing failed), adding up to the answers' summaries.
    let lines = function.metric_lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let sum = |name: &str| lines.iter().map(|l| l[name].as_f64().unwrap()).sum::<f64>();
    assert_eq!(sum("ImagesGenerated"), 7.0);
    assert_eq!(sum("Failures"), 0.0);
    assert!((sum("CostUSD") - batch_cost).abs() < 1e-9);
    assert!((batch_cost - 7.0 * IMAGE_COST_USD).abs() < 1e-9);
    let latencies: usize = lines
        .iter()
        .map(|l| l["ImageLatencyMs"].as_array().unwrap().len())
        .sum();
    assert_eq!(latencies, 7);
    for line in &lines {
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "Stage3");
        assert_eq!(line["Provider"], "placeholder");
    }
    assert_eq!(lines[0]["ImagesGenerated"], first["summary"]["succeeded"]);
}

#[tokio::test]
async fn an_invalid_story_sends_nothing_and_stores_no_plan() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let mut input = story(3);
    input["scenes"][2]["scene_id"] = json!("../escape");
    let work = Work::new(&input);
    let output = work
        .submit(moto, None, &queue, &["--story-id", "bad"])
        .await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("scene_id"), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
    assert!(receive_all(&sqs, &queue, 1, Duration::from_secs(2))
        .await
        .is_empty());
    assert!(!work.out().join("stories/bad/plan.json").exists());

    // No story by that name: status says so (exit 2), it does not report an empty story.
    let output = work.stage3(moto, None, &["status", "bad"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[tokio::test]
async fn calls_hold_ten_entries_and_oversized_groups_are_split_under_256_kib() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let stand_in = SqsStandIn::start(&moto.url, Vec::new()).await;

    // 25 small scenes, one a message: three calls of 10, 10 and 5.
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let work = Work::new(&story(25));
    let output = work.submit(moto, Some(&stand_in.url), &queue, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let answer = answer_of(&output);
    assert_eq!(answer["messages"], 25);
    let story_id = answer["story_id"].as_str().unwrap().to_string();
    assert!(
        story_id.starts_with("story-"),
        "a story id is made: {story_id}"
    );
    let entries: Vec<usize> = stand_in.calls().iter().map(|c| c.entries).collect();
    assert_eq!(entries, [10, 10, 5]);
    let messages = receive_all(&sqs, &queue, 25, Duration::from_secs(10)).await;
    let (scenes, stories) = scenes_of(&messages);
    assert_eq!(scenes, ids(25));
    assert_eq!(stories, [story_id]);

    // Six scenes of ~100 KB each (inline reference images), ten asked per message: two fit
    // in a message, and one message in a call.
    let big = format!("data:image/png;base64,{}", "A".repeat(100_000));
    let mut input = story(6);
    for scene in input["scenes"].as_array_mut().unwrap() {
        scene["reference_images"] = json!([big]);
    }
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let work = Work::new(&input);
    let before = stand_in.calls().len();
    let output = work
        .submit(
            moto,
            Some(&stand_in.url),
            &queue,
            &["--scenes-per-message", "10"],
        )
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(answer_of(&output)["messages"], 3);
    let calls = stand_in.calls()[before..].to_vec();
    assert_eq!(calls.len(), 3, "{calls:?}");
    for call in &calls {
        assert!(
            call.entries <= 10 && call.body_bytes <= 256 * 1024,
            "{call:?}"
        );
    }
    let messages = receive_all(&sqs, &queue, 3, Duration::from_secs(10)).await;
    assert!(messages
        .iter()
        .all(|m| m.body().unwrap().len() <= 256 * 1024));
    assert_eq!(scenes_of(&messages).0, ids(6));

    // A scene too large for any message is refused before anything is sent.
    let mut input = story(2);
    input["scenes"][1]["reference_images"] = json!([big, big, big]);
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let work = Work::new(&input);
    let output = work.submit(moto, Some(&stand_in.url), &queue, &[]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("\"s2\""), "{}", stderr(&output));
    assert!(receive_all(&sqs, &queue, 1, Duration::from_secs(1))
        .await
        .is_empty());
}

#[tokio::test]
async fn a_failed_entry_is_sent_again_and_arrives_once() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let stand_in =
        SqsStandIn::start(&moto.url, vec![Fault::Once(r#""scene_id":"s5""#.into())]).await;
    let work = Work::new(&story(7));
    let output = work
        .submit(
            moto,
            Some(&stand_in.url),
            &queue,
            &["--scenes-per-message", "3"],
        )
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(answer_of(&output)["messages"], 3);
    let calls = stand_in.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!((calls[0].entries, calls[0].failed), (3, 1));
    assert_eq!((calls[1].entries, calls[1].failed), (1, 0));
    let messages = receive_all(&sqs, &queue, 3, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 3);
    assert_eq!(scenes_of(&messages).0, ids(7));
    assert!(receive_all(&sqs, &queue, 1, Duration::from_secs(1))
        .await
        .is_empty());
}

#[tokio::test]
async fn a_sender_fault_is_not_retried_and_is_reported_with_exit_1() {
    let Some(moto) = moto::moto() else { return };
    let sqs = moto.sqs().await;
    let (queue, _) = create_queue(&sqs, &unique_name("stage3-requests")).await;
    let stand_in = SqsStandIn::start(
        &moto.url,
        vec![Fault::SenderFault(r#""scene_id":"s5""#.into())],
    )
    .await;
    let work = Work::new(&story(7));
    let output = work
        .submit(
            moto,
            Some(&stand_in.url),
            &queue,
            &["--scenes-per-message", "3"],
        )
        .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let answer = answer_of(&output);
    assert_eq!(
        (answer["messages"].clone(), answer["scenes"].clone()),
        (json!(2), json!(4))
    );
    assert_eq!(answer["unsent"][0]["scene_ids"], json!(["s4", "s5", "s6"]));
    assert_eq!(answer["unsent"][0]["sender_fault"], true);
    assert!(answer["unsent"][0]["error"]
        .as_str()
        .unwrap()
        .starts_with("InvalidMessageContents"));
    assert_eq!(stand_in.calls().len(), 1, "not sent again");
    let messages = receive_all(&sqs, &queue, 2, Duration::from_secs(10)).await;
    assert_eq!(scenes_of(&messages).0, ["s1", "s2", "s3", "s7"]);
    // Status counts the unsent scenes as pending: the plan names them.
    let story_id = answer["story_id"].as_str().unwrap().to_string();
    let (code, status) = work.status(moto, &story_id).await;
    assert_eq!((code, status["pending"].clone()), (3, json!(7)));
    let by_type: BTreeMap<String, usize> =
        serde_json::from_value(status["error_types"].clone()).unwrap();
    assert!(by_type.is_empty());
}

#[tokio::test]
async fn the_cli_writes_the_same_metric_lines_on_stderr_when_asked() {
    let work = Work::new(&story(3));
    let dir = work.dir.path().to_path_buf();
    let run = |metrics: Option<&'static str>| {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = stage3_command(&dir);
            command.env("STAGE3_PROVIDER", "placeholder");
            if let Some(value) = metrics {
                command.env("STAGE3_METRICS", value);
            }
            command
                .args(["generate", "input.json", "--out", "out"])
                .output()
                .unwrap()
        })
    };
    let output = run(Some("emf")).await.unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // Stdout stays the batch answer alone.
    let answer = answer_of(&output);
    let lines: Vec<Value> = stderr(&output)
        .lines()
        .filter(|line| line.starts_with('{') && line.contains("\"_aws\""))
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", stderr(&output));
    assert_eq!(lines[0]["Provider"], "placeholder");
    assert_eq!(lines[0]["ImagesGenerated"], answer["summary"]["succeeded"]);
    assert_eq!(lines[0]["CacheHits"], 0);
    assert_eq!(
        lines[0]["CostUSD"].as_f64(),
        answer["summary"]["cost_usd"].as_f64()
    );

    // Again: every scene from the cache. Without the variable, no line at all.
    let output = run(Some("emf")).await.unwrap();
    let line = stderr(&output)
        .lines()
        .find(|line| line.starts_with('{') && line.contains("\"_aws\""))
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .unwrap();
    assert_eq!(
        (line["ImagesGenerated"].clone(), line["CacheHits"].clone()),
        (json!(0), json!(3))
    );
    let output = run(None).await.unwrap();
    assert!(!stderr(&output).contains("_aws"), "{}", stderr(&output));
}
