//! SQS events: each record's body is one request or a batch; the answer names exactly the
//! records to redeliver, and records that failed only for good go to the dead-letter queue.

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use serde::Serialize;
use serde_json::Value;

use super::{batch_options, record_metrics, Outlets};
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::events::dead_letter::{self, DeadLetter, DeadLetterQueue};
use crate::events::{self, Event};
use crate::schema::{parse_submission_bytes, BatchAnswer, BatchSummary, SceneFailure};
use crate::service::{RunOptions, Stage3Service};

/// The SQS answer: the records to redeliver, and what the invocation did.
#[derive(Debug, Serialize)]
pub(crate) struct SqsAnswer {
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
pub(super) async fn handle_sqs(
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
    record_metrics(service, outlets, &total.results, &total.failures);
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
