//! SQS events: each record's body is one request or a batch; the answer names exactly the
//! records to redeliver. Running and settling the messages is the library's
//! ([`Stage3Service::run_messages`]); this is the event's shape in and the answer's out.

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use serde::Serialize;
use serde_json::Value;

use super::{batch_options, Outlets};
use crate::batch::QueueMessage;
use crate::error::{Result, Stage3Error};
use crate::schema::BatchSummary;
use crate::service::{RunOptions, Stage3Service};

/// The SQS answer: the records to redeliver, and what the invocation did.
#[derive(Debug, Serialize)]
pub(crate) struct SqsAnswer {
    #[serde(flatten)]
    pub response: SqsBatchResponse,
    pub summary: BatchSummary,
}

/// Runs the event's records as one batch and names the records to redeliver; records
/// that failed only for good go to the outlets' dead-letter queue, when there is one.
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
    let mut messages = Vec::with_capacity(event.records.len());
    for (index, record) in event.records.into_iter().enumerate() {
        let Some(id) = record.message_id.filter(|id| !id.is_empty()) else {
            return Err(Stage3Error::invalid_request(format!(
                "Records[{index}].messageId: missing; partial failures cannot be reported"
            )));
        };
        messages.push(QueueMessage {
            id,
            body: record.body.unwrap_or_default(),
        });
    }

    let run = service
        .run_messages(
            messages,
            &batch_options(outlets, options),
            outlets.dead_letter.as_ref(),
        )
        .await;
    let mut response = SqsBatchResponse::default();
    for id in run.redeliver {
        let mut item = BatchItemFailure::default();
        item.item_identifier = id;
        response.batch_item_failures.push(item);
    }
    Ok(SqsAnswer {
        response,
        summary: run.summary,
    })
}
