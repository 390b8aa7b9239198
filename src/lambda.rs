//! The AWS Lambda adapter: event shapes in, answers out.
//!
//! One function accepts three kinds of event, told apart explicitly from the JSON so a
//! rejected payload always says why:
//!
//! - **SQS** (`{"Records": [{"eventSource": "aws:sqs", "body": ..}]}`): each body is one
//!   request or a batch. The answer is `{"batchItemFailures": [..], "summary": {..}}` naming exactly the
//!   records to redeliver — bad bodies, failed scenes, scenes the deadline left no time
//!   for. Succeeded scenes are already stored with their records, so a redelivery finds
//!   them in the cache and pays nothing for them again.
//! - **EventBridge** (`{"detail-type": .., "detail": ..}`): `detail` is handled as direct.
//! - **Direct**: what [`parse_submission`] accepts. One request answers a `Stage3Output` or
//!   fails with the stable `error_type`; a batch answers a [`BatchAnswer`], and an invalid
//!   batch is rejected whole before anything is spent.
//!
//! The adapter only routes: every scene of an invocation goes through one
//! [`Stage3Service::run_batch`] call, so concurrency and rate-limit back-pressure are shared.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::schema::{
    parse_submission, parse_submission_bytes, BatchAnswer, BatchSummary, SceneFailure,
    Stage3Output, Submission,
};
use crate::service::{PreparedScene, RunOptions, Stage3Service};

/// Kept back from the invocation deadline for serialising the answer and handing it to
/// the runtime: an answer that misses the deadline is lost and the whole event retried.
pub const DEADLINE_SAFETY_MARGIN: Duration = Duration::from_secs(2);

/// The SQS `eventSource` of queue messages.
const SQS_EVENT_SOURCE: &str = "aws:sqs";

/// What kind of event a payload is, decided by [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Sqs,
    EventBridge,
    Direct,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Sqs => "sqs",
            EventKind::EventBridge => "eventbridge",
            EventKind::Direct => "direct",
        }
    }
}

/// Tells the event kinds apart. A `Records` array is a queue or notification event; only
/// SQS records are accepted, and anything else (S3, SNS, DynamoDB streams) is refused by
/// name instead of being misread as a request with unknown fields.
pub fn classify(payload: &Value) -> Result<EventKind> {
    let Value::Object(map) = payload else {
        return Ok(EventKind::Direct);
    };
    if let Some(records) = map.get("Records") {
        let Value::Array(records) = records else {
            return Err(Stage3Error::invalid_request(
                "Records: expected an array of SQS records",
            ));
        };
        if records.is_empty() {
            return Err(Stage3Error::invalid_request(
                "Records: the event has no records",
            ));
        }
        for (index, record) in records.iter().enumerate() {
            let source = record.get("eventSource").and_then(Value::as_str);
            if source != Some(SQS_EVENT_SOURCE) {
                return Err(Stage3Error::invalid_request(format!(
                    "Records[{index}].eventSource: expected \"aws:sqs\", got {}; this \
                     function accepts SQS, EventBridge and direct requests",
                    source.map_or_else(|| "nothing".to_string(), |s| format!("{s:?}"))
                )));
            }
        }
        return Ok(EventKind::Sqs);
    }
    if map.contains_key("detail-type") && map.contains_key("detail") {
        return Ok(EventKind::EventBridge);
    }
    Ok(EventKind::Direct)
}

/// Runtime deadlines below this are not epoch times (it is September 2001): `cargo lambda
/// watch` sends a constant `Lambda-Runtime-Deadline-Ms: 600000`, meaning ten minutes from
/// now. Read literally it lies in 1970 and no scene would ever start locally.
const EARLIEST_EPOCH_DEADLINE_MS: u64 = 1_000_000_000_000;

/// The service's deadline for an invocation whose runtime deadline is `deadline_ms`
/// (`Lambda-Runtime-Deadline-Ms`: epoch milliseconds on AWS, a duration from some local
/// emulators), less [`DEADLINE_SAFETY_MARGIN`]. Zero means the runtime gave none.
pub fn invocation_deadline(deadline_ms: u64, now: SystemTime) -> Option<Instant> {
    let left = match deadline_ms {
        0 => return None,
        relative if relative < EARLIEST_EPOCH_DEADLINE_MS => Duration::from_millis(relative),
        epoch => (UNIX_EPOCH + Duration::from_millis(epoch))
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(Instant::now() + left.saturating_sub(DEADLINE_SAFETY_MARGIN))
}

/// The Lambda error for a failure: its type is the stable `error_type`.
pub fn diagnostic(error: &Stage3Error) -> Diagnostic {
    Diagnostic {
        error_type: error.error_type().as_str().to_string(),
        error_message: error.to_string(),
    }
}

/// The runtime's entry point: turns the runtime's deadline into the service's and a
/// failure into a Lambda error.
///
/// No span is opened here: `lambda_runtime::run` already wraps every invocation in a
/// `Lambda runtime invoke` span carrying `requestId` (and `xrayTraceId`), so every log line
/// of the invocation — the service's `scene` lines included — names its request.
pub async fn handle_invocation(
    service: &Stage3Service,
    event: LambdaEvent<Value>,
) -> std::result::Result<Value, Diagnostic> {
    let LambdaEvent { payload, context } = event;
    let deadline = invocation_deadline(context.deadline, SystemTime::now());
    handle(service, payload, deadline).await.map_err(|error| {
        tracing::warn!(error_type = %error.error_type(), error = %error, "invocation failed");
        diagnostic(&error)
    })
}

/// Answers one event. `deadline` is when the answer must be ready (see
/// [`invocation_deadline`]); scenes that cannot start before it are reported as
/// `deadline_exceeded`.
pub async fn handle(
    service: &Stage3Service,
    payload: Value,
    deadline: Option<Instant>,
) -> Result<Value> {
    let options = RunOptions {
        deadline: deadline.map_or(Deadline::NONE, Deadline::at),
        ..RunOptions::default()
    };
    let kind = classify(&payload)?;
    tracing::info!(
        event = kind.as_str(),
        time_left_ms =
            deadline.map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
        "event received"
    );
    match kind {
        EventKind::Sqs => Ok(to_json(&handle_sqs(service, payload, &options).await?)),
        EventKind::EventBridge => {
            let detail = match payload {
                Value::Object(mut map) => map.remove("detail").unwrap_or(Value::Null),
                _ => Value::Null,
            };
            handle_direct(service, detail, &options)
                .await
                .map_err(|e| match e {
                    Stage3Error::InvalidRequest(message) => {
                        Stage3Error::InvalidRequest(format!("detail: {message}"))
                    }
                    other => other,
                })
        }
        EventKind::Direct => handle_direct(service, payload, &options).await,
    }
}

/// One request → its `Stage3Output` or its error; a batch → the batch answer.
async fn handle_direct(
    service: &Stage3Service,
    payload: Value,
    options: &RunOptions,
) -> Result<Value> {
    match parse_submission(payload, service.config().max_batch)? {
        Submission::Single(request) => {
            let scene = service.prepare(request)?;
            service.check_batch(std::slice::from_ref(&scene)).await?;
            let output: Stage3Output = service.run_scene(&scene, options).await?;
            Ok(to_json(&output))
        }
        Submission::Batch(requests) => {
            let scenes = service.prepare_all(requests)?;
            // A scene its model cannot serve, or an estimate over the budget, refuses the
            // batch whole before anything is spent.
            service.check_batch(&scenes).await?;
            let answer = service.run_batch(scenes, options, &|_, _| {}).await;
            Ok(to_json(&answer))
        }
    }
}

/// The SQS answer: the records to redeliver, and what the invocation did.
#[derive(Debug, Serialize)]
pub struct SqsAnswer {
    #[serde(flatten)]
    pub response: SqsBatchResponse,
    pub summary: BatchSummary,
}

/// Runs every valid record's scenes in one batch and names the records to redeliver.
async fn handle_sqs(
    service: &Stage3Service,
    payload: Value,
    options: &RunOptions,
) -> Result<SqsAnswer> {
    let event: SqsEvent = serde_json::from_value(payload)
        .map_err(|e| Stage3Error::invalid_request(format!("SQS event: {e}")))?;

    // Every record must be nameable before anything runs: a failure we could not report
    // would be silently deleted from the queue. Failing the invocation redelivers them all.
    let mut message_ids = Vec::with_capacity(event.records.len());
    for (index, record) in event.records.iter().enumerate() {
        match record.message_id.as_deref().filter(|id| !id.is_empty()) {
            Some(id) => message_ids.push(id.to_string()),
            None => {
                return Err(Stage3Error::invalid_request(format!(
                    "Records[{index}].messageId: missing; partial failures cannot be reported"
                )))
            }
        }
    }

    let mut failed = vec![false; event.records.len()];
    let mut scenes: Vec<PreparedScene> = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    for (index, record) in event.records.into_iter().enumerate() {
        let body = record.body.unwrap_or_default();
        let prepared = parse_submission_bytes(body.as_bytes(), service.config().max_batch)
            .and_then(|submission| service.prepare_all(submission.into_requests()));
        match prepared {
            Ok(record_scenes) => {
                owners.extend(std::iter::repeat_n(index, record_scenes.len()));
                scenes.extend(record_scenes);
            }
            Err(error) => {
                // Redelivered until the queue's maxReceiveCount moves it to the dead-letter
                // queue; this line tells whoever looks there why.
                tracing::warn!(
                    message_id = %message_ids[index],
                    error_type = %error.error_type(),
                    error = %error,
                    "SQS record rejected"
                );
                failed[index] = true;
            }
        }
    }

    let plan = service.plan_batch(&scenes).await;
    let outcomes = match service.check_budget(&plan) {
        Ok(()) => service.run_scenes(&scenes, options, &|_, _| {}).await,
        Err(refusal) => scenes.iter().map(|_| Err(refusal.clone())).collect(),
    };
    let mut summary = BatchAnswer::default();
    summary.summary.estimated_cost_usd = plan.estimated_cost_usd;
    for ((owner, scene), outcome) in owners.into_iter().zip(&scenes).zip(outcomes) {
        match &outcome {
            Ok(output) => summary.results.push(output.clone()),
            Err(error) => summary
                .failures
                .push(SceneFailure::new(scene.scene_id(), error)),
        }
        if let Err(error) = outcome {
            failed[owner] = true;
            tracing::warn!(
                message_id = %message_ids[owner],
                scene_id = %scene.scene_id(),
                error_type = %error.error_type(),
                error = %error,
                "scene failed; its SQS message will be redelivered"
            );
        }
    }

    let mut response = SqsBatchResponse::default();
    for (message_id, _) in message_ids.into_iter().zip(failed).filter(|(_, f)| *f) {
        let mut item = BatchItemFailure::default();
        item.item_identifier = message_id;
        response.batch_item_failures.push(item);
    }
    summary.summarize();
    Ok(SqsAnswer {
        response,
        summary: summary.summary,
    })
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // Our answers are plain structs with string keys: serialising them cannot fail.
    serde_json::to_value(value).expect("answers serialise to JSON")
}
