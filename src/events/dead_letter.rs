//! The dead-letter queue for SQS messages that failed for good
//! (`STAGE3_DEAD_LETTER_QUEUE_URL`).
//!
//! Without it, a message whose scene the provider refused (content policy, no credits) or
//! whose body is malformed goes back to the queue and is tried again up to the queue's
//! `maxReceiveCount`, calling the provider — and maybe paying — every time, for an answer
//! that cannot change. With it, the Lambda adapter sends such a message here at once:
//! the body unchanged, so it can be redriven after a fix, and the cause as message
//! attributes (`error_type`, `error_message`, `scene_id`; docs/design.md §2). Only when
//! that send succeeds is the message left out of `batchItemFailures`; if it fails, the
//! message is redelivered as before, so nothing is ever lost.
//!
//! The client comes from the standard AWS configuration: endpoint from
//! `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL`, credentials from the usual chain (the
//! Lambda role). Building it makes no network call.

use std::fmt;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::MessageAttributeValue;
use aws_sdk_sqs::Client;

use super::shorten;
use crate::aws::AwsConfig;
use crate::error::ErrorType;

/// Longest an `error_message` attribute gets: the whole story is in the logs.
pub(crate) const MAX_ERROR_MESSAGE_BYTES: usize = 500;
/// Longest a `scene_id` attribute gets (a record may carry a batch of failed scenes).
pub(crate) const MAX_SCENE_IDS_BYTES: usize = 1000;

/// Why a message is dead: what its attributes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    pub error_type: ErrorType,
    pub error_message: String,
    /// The failed scenes, comma-separated; empty when the body named none.
    pub scene_ids: Vec<String>,
}

/// A client for one dead-letter queue.
#[derive(Clone)]
pub struct DeadLetterQueue {
    client: Client,
    queue_url: String,
}

impl fmt::Debug for DeadLetterQueue {
    // The client's configuration holds the credentials provider: leave it out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("queue_url", &self.queue_url)
            .finish_non_exhaustive()
    }
}

impl DeadLetterQueue {
    /// The one SQS operation this outlet calls, with the IAM action AWS checks for it (on the
    /// queue); infra/template.yaml grants it, and tests/infra.rs checks both.
    pub const IAM_ACTIONS: &[(&str, &str)] = &[("SendMessage", "sqs:SendMessage")];

    /// Builds the SQS client for `queue_url` on the shared AWS configuration
    /// ([`AwsConfig::sqs_client`]). Call once, at start-up.
    pub(crate) async fn from_aws(queue_url: &str, aws: &AwsConfig) -> Self {
        DeadLetterQueue::new(aws.sqs_client(queue_url).await, queue_url)
    }

    /// A queue over an existing client (and the tests' endpoint).
    pub(crate) fn new(client: Client, queue_url: &str) -> Self {
        DeadLetterQueue {
            client,
            queue_url: queue_url.to_string(),
        }
    }

    pub(crate) fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// Sends `body` unchanged, with `letter` as message attributes. `message_id` is the
    /// original message's id (a FIFO queue's deduplication id). The error names the
    /// operation and queue, never credentials.
    pub(crate) async fn send(
        &self,
        message_id: &str,
        body: &str,
        letter: &DeadLetter,
    ) -> Result<(), String> {
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .message_attributes("error_type", string_attribute(letter.error_type.as_str())?)
            .message_attributes(
                "error_message",
                string_attribute(&shorten(&letter.error_message, MAX_ERROR_MESSAGE_BYTES))?,
            );
        // SQS refuses empty attribute values: a body that named no scene has none.
        let scene_ids = shorten(&letter.scene_ids.join(","), MAX_SCENE_IDS_BYTES);
        if !scene_ids.is_empty() {
            request = request.message_attributes("scene_id", string_attribute(&scene_ids)?);
        }
        if self.queue_url.ends_with(".fifo") {
            // A FIFO queue's dead-letter queue is FIFO too, and wants these.
            request = request
                .message_group_id("stage3-dead-letters")
                .message_deduplication_id(message_id);
        }
        request.send().await.map(|_| ()).map_err(|e| {
            format!(
                "SendMessage to {}: {}",
                self.queue_url,
                DisplayErrorContext(&e)
            )
        })
    }
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue, String> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| format!("message attribute: {e}"))
}

/// Whether `error` will fail the same way however often the message is redelivered: not
/// transient, and not a matter of the invocation's time (`deadline_exceeded`) or of an
/// interrupted run (`cancelled`). Invalid bodies count: a malformed body never gets better.
pub(crate) fn is_permanent(error: &crate::error::Stage3Error) -> bool {
    !error.is_transient()
        && !matches!(
            error.error_type(),
            ErrorType::DeadlineExceeded | ErrorType::Cancelled
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ProviderFailure, Stage3Error};

    #[test]
    fn only_failures_that_cannot_change_are_permanent() {
        let refusal = ProviderFailure::new(Some(403), "flagged");
        for permanent in [
            Stage3Error::invalid_request("malformed JSON"),
            Stage3Error::ContentPolicy(refusal.clone()),
            Stage3Error::InsufficientCredits(ProviderFailure::new(Some(402), "no credits")),
            Stage3Error::ProviderError(ProviderFailure::new(Some(400), "bad request")),
            Stage3Error::storage("AccessDenied", false),
        ] {
            assert!(is_permanent(&permanent), "{permanent}");
        }
        for transient in [
            Stage3Error::ProviderUnavailable(ProviderFailure::new(Some(503), "overloaded")),
            Stage3Error::RateLimited(ProviderFailure::new(Some(429), "slow down")),
            Stage3Error::Timeout("180 s".into()),
            Stage3Error::storage("SlowDown", true),
            Stage3Error::DeadlineExceeded("no time left".into()),
            Stage3Error::Cancelled("Ctrl-C".into()),
        ] {
            assert!(!is_permanent(&transient), "{transient}");
        }
    }
}
