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
//!   fails with the stable `error_type`; a batch answers a [`BatchAnswer`], and an invalid
//!   batch is rejected whole before anything is spent.
//!
//! After the work, [`Outlets`] publish events for what happened and send SQS messages
//! that failed for good to the dead-letter queue (see [`crate::events`]).
//!
//! The adapter only routes: every scene of an invocation goes through one
//! [`Stage3Service::run_batch`] call, so concurrency and rate-limit back-pressure are shared.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde::Serialize;
use serde_json::Value;

use crate::aws::AwsConfig;
use crate::batch::BatchOptions;
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::events::dead_letter::{self, DeadLetter, DeadLetterQueue};
use crate::events::EventSettings;
use crate::events::{self, Event, EventPublisher};
use crate::schema::{
    parse_submission, parse_submission_bytes, BatchAnswer, BatchSummary, SceneFailure, Submission,
};
use crate::service::{RunOptions, Stage3Service};

pub mod answer_size;

/// Kept back from the invocation deadline for serialising the answer and handing it to
/// the runtime: an answer that misses the deadline is lost and the whole event retried.
pub const DEADLINE_SAFETY_MARGIN: Duration = Duration::from_secs(2);

/// The SQS `eventSource` of queue messages.
const SQS_EVENT_SOURCE: &str = "aws:sqs";

/// Where an invocation reports besides its answer: events for its outcomes
/// ([`EventPublisher`]) and the dead-letter queue for SQS messages that failed for good.
/// The default has neither, which is how the function behaved before either existed.
#[derive(Debug, Default, Clone)]
pub struct Outlets {
    pub events: EventPublisher,
    pub dead_letter: Option<DeadLetterQueue>,
}

impl Outlets {
    /// Builds what `settings` names (clients only, no network call): once, at start-up.
    /// The AWS clients start from `aws`, loaded once for all of them.
    pub async fn from_settings(settings: &EventSettings, aws: &AwsConfig) -> Result<Self> {
        let dead_letter = match &settings.dead_letter_queue_url {
            Some(url) => Some(DeadLetterQueue::from_aws(url, aws).await),
            None => None,
        };
        Ok(Outlets {
            events: EventPublisher::from_settings(settings, aws).await?,
            dead_letter,
        })
    }
}

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
pub fn invocation_deadline(deadline_ms: u64, now: SystemTime) -> Deadline {
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
    handle_invocation_with(service, &Outlets::default(), event).await
}

/// [`handle_invocation`] with events and the dead-letter queue: what `stage3-lambda` runs.
pub async fn handle_invocation_with(
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
pub async fn handle(service: &Stage3Service, payload: Value, deadline: Deadline) -> Result<Value> {
    handle_with(service, &Outlets::default(), payload, deadline).await
}

/// [`handle`], also publishing events and dead-lettering through `outlets`.
pub async fn handle_with(
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
            &handle_sqs(service, outlets, payload, options).await?,
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
        submission => {
            let run = service.run(submission, &options, &()).await?;
            Ok(to_json(&run.answer))
        }
    }
}

/// The invocation's batch: its events, and its story published with half the safety
/// margin at most (the answer still needs the rest).
fn batch_options(outlets: &Outlets, options: &RunOptions) -> BatchOptions {
    BatchOptions {
        run: options.clone(),
        events: outlets.events.clone(),
        story_deadline: options.deadline.later_by(DEADLINE_SAFETY_MARGIN / 2),
        events_deadline: options.deadline,
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
///
/// A record whose failures are all permanent ([`dead_letter::is_permanent`]) goes
/// straight to the dead-letter queue when one is configured, and is redelivered only if
/// that send fails. Events: every stored scene is announced at once; a record's failures
/// and its `Batch Done` only once the record is settled (not going back to the queue),
/// so a scene about to be retried is never announced as failed.
async fn handle_sqs(
    service: &Stage3Service,
    outlets: &Outlets,
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

    let mut records: Vec<SqsRecord> = Vec::with_capacity(event.records.len());
    let mut submissions = Vec::with_capacity(event.records.len());
    for (record, message_id) in event.records.into_iter().zip(message_ids) {
        let body = record.body.unwrap_or_default();
        submissions.push(parse_submission_bytes(
            body.as_bytes(),
            service.config().max_batch,
        ));
        records.push(SqsRecord {
            message_id,
            body,
            answer: BatchAnswer::default(),
            first_error: None,
            retry: false,
        });
    }

    let run = service
        .run_queued(submissions, &batch_options(outlets, options))
        .await;
    // The summary counts scenes that ran; a body that was no request is reported per record.
    let mut total = BatchAnswer::default();
    for (record, outcome) in records.iter_mut().zip(run.submissions) {
        let scenes = match outcome {
            Ok(scenes) => scenes,
            Err(error) => {
                // A malformed body never gets better: permanent. Without a dead-letter
                // queue it is redelivered until the queue's maxReceiveCount moves it
                // there; this line tells whoever looks there why.
                tracing::warn!(
                    message_id = %record.message_id,
                    error_type = %error.error_type(),
                    error = %error,
                    "SQS record rejected"
                );
                let scene_id = body_scene_id(&record.body);
                record.fail(&scene_id, &error);
                continue;
            }
        };
        for (scene_id, outcome) in scenes {
            match outcome {
                Ok(output) => {
                    total.results.push(output.clone());
                    record.answer.results.push(output);
                }
                Err(error) => {
                    tracing::warn!(
                        message_id = %record.message_id,
                        scene_id = %scene_id,
                        error_type = %error.error_type(),
                        permanent = dead_letter::is_permanent(&error),
                        error = %error,
                        "scene failed"
                    );
                    total.failures.push(SceneFailure::new(&scene_id, &error));
                    record.fail(&scene_id, &error);
                }
            }
        }
    }

    // Records that failed only for good go to the dead-letter queue, all at once.
    let dead_lettered: Vec<bool> = match &outlets.dead_letter {
        Some(queue) => {
            futures::future::join_all(
                records
                    .iter()
                    .map(|record| record.dead_letter(queue, options.deadline)),
            )
            .await
        }
        None => vec![false; records.len()],
    };

    let mut response = SqsBatchResponse::default();
    let mut announcements = Vec::new();
    for (mut record, dead_lettered) in records.into_iter().zip(dead_lettered) {
        record.answer.summarize();
        let redeliver = record.first_error.is_some() && !dead_lettered;
        if redeliver {
            tracing::warn!(
                message_id = %record.message_id,
                failed = record.answer.failures.len(),
                "SQS message will be redelivered"
            );
            let mut item = BatchItemFailure::default();
            item.item_identifier = record.message_id;
            response.batch_item_failures.push(item);
            if outlets.events.is_enabled() {
                announcements.extend(record.answer.results.iter().map(Event::scene_ready));
            }
        } else if outlets.events.is_enabled() {
            announcements.extend(events::batch_events(&record.answer, None));
        }
    }
    outlets
        .events
        .publish(&announcements, options.deadline)
        .await;
    total.summarize();
    total.summary.estimated_cost_usd = run.estimated_cost_usd;
    Ok(SqsAnswer {
        response,
        summary: total.summary,
    })
}

/// One SQS record's part of the invocation.
struct SqsRecord {
    message_id: String,
    /// The body exactly as it arrived: what the dead-letter queue gets.
    body: String,
    answer: BatchAnswer,
    /// The first failure, which names the cause in the dead-letter attributes.
    first_error: Option<Stage3Error>,
    /// Some failure may go away on another try: the record must be redelivered.
    retry: bool,
}

impl SqsRecord {
    fn fail(&mut self, scene_id: &str, error: &Stage3Error) {
        self.answer
            .failures
            .push(SceneFailure::new(scene_id, error));
        self.retry |= !dead_letter::is_permanent(error);
        if self.first_error.is_none() {
            self.first_error = Some(error.clone());
        }
    }

    /// Sends the record to `queue` when every failure in it is permanent; answers whether
    /// it is now there (and so must not be redelivered). A send the invocation's deadline
    /// cuts short counts as failed: the message is redelivered rather than risk the
    /// whole answer missing the deadline.
    async fn dead_letter(&self, queue: &DeadLetterQueue, deadline: Deadline) -> bool {
        let Some(error) = self.first_error.as_ref().filter(|_| !self.retry) else {
            return false;
        };
        let letter = DeadLetter {
            error_type: error.error_type(),
            error_message: error.to_string(),
            scene_ids: self
                .answer
                .failures
                .iter()
                .map(|f| f.scene_id.clone())
                .filter(|id| !id.is_empty())
                .collect(),
        };
        let send = queue.send(&self.message_id, &self.body, &letter);
        let sent = deadline
            .within(send)
            .await
            .unwrap_or_else(|| Err("the invocation's deadline came first".to_string()));
        match sent {
            Ok(()) => {
                tracing::warn!(
                    message_id = %self.message_id,
                    error_type = %letter.error_type,
                    scene_ids = %letter.scene_ids.join(","),
                    queue = queue.queue_url(),
                    "SQS message failed for good; sent to the dead-letter queue"
                );
                true
            }
            Err(send_error) => {
                tracing::warn!(
                    message_id = %self.message_id,
                    error = %send_error,
                    "dead-letter queue unreachable; the message will be redelivered instead"
                );
                false
            }
        }
    }
}

/// The `scene_id` a rejected body names at its top level, if any, for its failure report.
fn body_scene_id(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| value.get("scene_id")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // Our answers are plain structs with string keys: serialising them cannot fail.
    serde_json::to_value(value).expect("answers serialise to JSON")
}
