//! The AWS Lambda adapter: event shapes in, answers out.
//!
//! One function accepts three kinds of event, told apart explicitly from the JSON so a
//! rejected payload always says why:
//!
//! - **SQS** (`{"Records": [{"eventSource": "aws:sqs", "body": ..}]}`): each body is one
//!   request or a batch. The answer is `{"batchItemFailures": [..], "summary": {..}}` naming exactly the
//!   records to redeliver — bad bodies, failed scenes, scenes the deadline left no time
//!   for; with a dead-letter queue configured, records that failed only for good go there
//!   instead of being redelivered. Succeeded scenes are already stored with their records, so a redelivery finds
//!   them in the cache and pays nothing for them again.
//! - **EventBridge** (`{"detail-type": .., "detail": ..}`): `detail` is handled as direct.
//! - **Direct**: what [`parse_submission`] accepts. One request answers a `Stage3Output` or
//!   fails with the stable `error_type`; a batch answers a `BatchAnswer`, and an invalid
//!   batch is rejected whole before anything is spent.
//!
//! After the work, [`Outlets`] publish events for what happened, send SQS messages that
//! failed for good to the dead-letter queue (see [`crate::events`]), and write the
//! invocation's metric lines to stdout in CloudWatch's Embedded Metric Format (see
//! [`crate::metrics`]): one batch, one set of lines.
//!
//! The adapter only routes: every scene of an invocation goes through one
//! [`Stage3Service::run_batch`] call, so concurrency and rate-limit back-pressure are shared.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_runtime::{Diagnostic, LambdaEvent};
use serde::Serialize;
use serde_json::Value;

use crate::batch::BatchOptions;
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::schema::{parse_submission, Submission};
use crate::service::{RunOptions, Stage3Service};

pub(crate) mod answer_size;
mod outlets;
mod sqs;

pub use outlets::{metrics_sink, LazyOutlets, Outlets};

/// Kept back from the invocation deadline for serialising the answer and handing it to
/// the runtime: an answer that misses the deadline is lost and the whole event retried.
pub(crate) const DEADLINE_SAFETY_MARGIN: Duration = Duration::from_secs(2);

/// The SQS `eventSource` of queue messages.
const SQS_EVENT_SOURCE: &str = "aws:sqs";

/// What kind of event a payload is, decided by [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Sqs,
    EventBridge,
    Direct,
}

impl EventKind {
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) fn classify(payload: &Value) -> Result<EventKind> {
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
pub(crate) fn invocation_deadline(deadline_ms: u64, now: SystemTime) -> Deadline {
    let left = match deadline_ms {
        0 => return Deadline::NONE,
        relative if relative < EARLIEST_EPOCH_DEADLINE_MS => Duration::from_millis(relative),
        epoch => (UNIX_EPOCH + Duration::from_millis(epoch))
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Deadline::after(left.saturating_sub(DEADLINE_SAFETY_MARGIN))
}

/// The Lambda error for a failure: its type is the stable `error_type`.
pub(crate) fn diagnostic(error: &Stage3Error) -> Diagnostic {
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
#[cfg(test)]
pub(crate) async fn handle_invocation(
    service: &Stage3Service,
    event: LambdaEvent<Value>,
) -> std::result::Result<Value, Diagnostic> {
    handle_invocation_with(service, &Outlets::default(), event).await
}

/// `handle_invocation_with`, the outlets built on the first invocation: what
/// `stage3-lambda` runs.
pub async fn handle_invocation_lazily(
    service: &Stage3Service,
    outlets: &LazyOutlets,
    event: LambdaEvent<Value>,
) -> std::result::Result<Value, Diagnostic> {
    let outlets = outlets.get().await.map_err(|error| {
        tracing::error!(error = %error, "the event and dead-letter clients could not be built");
        diagnostic(&error)
    })?;
    handle_invocation_with(service, outlets, event).await
}

/// [`handle_invocation`] with events and the dead-letter queue.
pub(crate) async fn handle_invocation_with(
    service: &Stage3Service,
    outlets: &Outlets,
    event: LambdaEvent<Value>,
) -> std::result::Result<Value, Diagnostic> {
    let LambdaEvent { payload, context } = event;
    let deadline = invocation_deadline(context.deadline, SystemTime::now());
    handle_with(service, outlets, payload, deadline)
        .await
        .map_err(|error| {
            tracing::warn!(error_type = %error.error_type(), error = %error, "invocation failed");
            diagnostic(&error)
        })
}

/// Answers one event. `deadline` is when the answer must be ready (see
/// [`invocation_deadline`]); scenes that cannot start before it are reported as
/// `deadline_exceeded`.
#[cfg(test)]
pub(crate) async fn handle(
    service: &Stage3Service,
    payload: Value,
    deadline: Deadline,
) -> Result<Value> {
    handle_with(service, &Outlets::default(), payload, deadline).await
}

/// [`handle`], also publishing events and dead-lettering through `outlets`.
pub(crate) async fn handle_with(
    service: &Stage3Service,
    outlets: &Outlets,
    payload: Value,
    deadline: Deadline,
) -> Result<Value> {
    let options = RunOptions {
        deadline,
        ..RunOptions::default()
    };
    let kind = classify(&payload)?;
    let mut answer = route(service, outlets, kind, payload, &options).await?;
    answer_size::fit(&mut answer, answer_size::ANSWER_BUDGET);
    Ok(answer)
}

async fn route(
    service: &Stage3Service,
    outlets: &Outlets,
    kind: EventKind,
    payload: Value,
    options: &RunOptions,
) -> Result<Value> {
    let deadline = options.deadline;
    tracing::info!(
        event = kind.as_str(),
        time_left_ms = deadline.remaining().map(|left| left.as_millis() as u64),
        "event received"
    );
    match kind {
        EventKind::Sqs => Ok(to_json(
            &sqs::handle_sqs(service, outlets, payload, options).await?,
        )),
        EventKind::EventBridge => {
            let detail = match payload {
                Value::Object(mut map) => map.remove("detail").unwrap_or(Value::Null),
                _ => Value::Null,
            };
            handle_direct(service, outlets, detail, options)
                .await
                .map_err(|e| match e {
                    Stage3Error::InvalidRequest(message) => {
                        Stage3Error::InvalidRequest(format!("detail: {message}"))
                    }
                    other => other,
                })
        }
        EventKind::Direct => handle_direct(service, outlets, payload, options).await,
    }
}

/// One request → its `Stage3Output` or its error; a batch → the batch answer, through the
/// library's one batch path ([`Stage3Service::run`]). A single request publishes its
/// scene's event; a batch its scenes' events and `Batch Done`.
async fn handle_direct(
    service: &Stage3Service,
    outlets: &Outlets,
    payload: Value,
    options: &RunOptions,
) -> Result<Value> {
    let options = batch_options(outlets, options);
    match parse_submission(payload, service.config().max_batch)? {
        Submission::Single(request) => Ok(to_json(&service.run_one(request, &options).await?)),
        submission => Ok(to_json(
            &service.run(submission, &options, &()).await?.answer,
        )),
    }
}

/// The invocation's batch: its events and metric lines, and its story published with half
/// the safety margin at most (the answer still needs the rest).
pub(super) fn batch_options(outlets: &Outlets, options: &RunOptions) -> BatchOptions {
    BatchOptions {
        run: options.clone(),
        events: outlets.events.clone(),
        metrics: outlets.metrics.clone(),
        story_deadline: options.deadline.later_by(DEADLINE_SAFETY_MARGIN / 2),
        events_deadline: options.deadline,
    }
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // Our answers are plain structs with string keys: serialising them cannot fail.
    serde_json::to_value(value).expect("answers serialise to JSON")
}
