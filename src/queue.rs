//! Putting a story on the request queue (`stage3 submit`): the story cut into message
//! bodies the Lambda function accepts, sent with `SendMessageBatch`.
//!
//! A story longer than one invocation can finish (15 minutes) runs as many invocations fed
//! by the queue, in parallel up to the function's reserved concurrency. Each message body is
//! a story batch, `{"story_id": ID, "scenes": [request, ...]}` — the shape
//! [`crate::schema::parse_submission`] reads as [`crate::schema::Submission::Story`] — so
//! every invocation publishes its scenes into the one story, and the story's manifest merges
//! them whatever the order ([`crate::story`]).
//!
//! Limits are SQS's: a message is at most 256 KiB, a `SendMessageBatch` call at most 10
//! entries and 256 KiB in all. A group of scenes too large for one message is split; a scene
//! too large alone is refused before anything is sent. Entries a call reports failed are sent
//! again under `RetryPolicy::QUEUE_SEND` when SQS says the fault was not the sender's
//! (`SenderFault: false`); a sender's fault cannot succeed on another try, and is reported
//! at once. So is whatever is still unsent when the retries are spent.

use std::collections::HashSet;
use std::fmt;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use serde::Serialize;

use crate::aws::{is_transient, plan_batches, AwsConfig};
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::retry::RetryPolicy;
use crate::schema::{json_len, GenerationRequest};

/// The largest message body sent: SQS's limit for a queue's messages as every queue has
/// allowed it (newer queues allow 1 MiB; older ones keep 256 KiB).
pub(crate) const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Entries per `SendMessageBatch` call.
pub(crate) const MAX_BATCH_ENTRIES: usize = 10;
/// Bytes of all the bodies of one `SendMessageBatch` call.
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One message of a story: its scenes, and the body as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoryMessage {
    pub scene_ids: Vec<String>,
    pub body: String,
}

/// A message body: a story batch.
#[derive(Serialize)]
struct Body<'a> {
    story_id: &'a str,
    scenes: &'a [&'a GenerationRequest],
}

/// Cuts a story into message bodies of at most `scenes_per_message` scenes and
/// [`MAX_MESSAGE_BYTES`] bytes each, in story order. A scene given twice (identically: the
/// parser refuses two different requests for one scene) is sent once. Refuses, before
/// anything is sent, a scene that cannot fit in a message alone.
pub(crate) fn story_messages(
    story_id: &str,
    requests: &[GenerationRequest],
    scenes_per_message: usize,
) -> Result<Vec<StoryMessage>> {
    let per_message = scenes_per_message.max(1);
    let mut seen = HashSet::new();
    let requests: Vec<&GenerationRequest> = requests
        .iter()
        .filter(|request| seen.insert(request.scene_id.as_str()))
        .collect();
    // `{"story_id":"…","scenes":[]}`, to which each scene adds itself and a comma.
    let envelope = json_len(&Body {
        story_id,
        scenes: &[],
    });
    let mut messages = Vec::new();
    let mut group: Vec<&GenerationRequest> = Vec::new();
    let mut bytes = envelope;
    for request in requests {
        let size = json_len(request);
        if envelope + size > MAX_MESSAGE_BYTES {
            return Err(Stage3Error::invalid_request(format!(
                "scene {:?} is {} bytes as a queue message; SQS takes at most {MAX_MESSAGE_BYTES} \
                 (reference images sent inline as data: URLs are the usual cause: give them \
                 as https:// URLs)",
                request.scene_id,
                envelope + size
            )));
        }
        let comma = usize::from(!group.is_empty());
        if !group.is_empty()
            && (group.len() == per_message || bytes + comma + size > MAX_MESSAGE_BYTES)
        {
            messages.push(message(story_id, &group)?);
            group.clear();
            bytes = envelope;
        }
        bytes += usize::from(!group.is_empty()) + size;
        group.push(request);
    }
    if !group.is_empty() {
        messages.push(message(story_id, &group)?);
    }
    Ok(messages)
}

fn message(story_id: &str, group: &[&GenerationRequest]) -> Result<StoryMessage> {
    let body = serde_json::to_string(&Body {
        story_id,
        scenes: group,
    })
    .map_err(|e| Stage3Error::Internal(format!("a message body cannot be written: {e}")))?;
    debug_assert!(body.len() <= MAX_MESSAGE_BYTES, "{} bytes", body.len());
    Ok(StoryMessage {
        scene_ids: group.iter().map(|r| r.scene_id.clone()).collect(),
        body,
    })
}

/// A message that could not be sent, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unsent {
    pub scene_ids: Vec<String>,
    /// SQS's error code and message, or the failed call's error.
    pub error: String,
    /// SQS said the fault was the sender's: sending it again would fail the same way.
    pub sender_fault: bool,
}

/// What [`RequestQueue::send_all`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SendReport {
    /// Messages the queue accepted.
    pub sent: usize,
    /// Their scenes.
    pub sent_scenes: usize,
    /// `SendMessageBatch` calls made, retries included.
    pub calls: usize,
    pub unsent: Vec<Unsent>,
}

/// The queue a story is submitted to.
#[derive(Clone)]
pub struct RequestQueue {
    client: Client,
    queue_url: String,
    retry: RetryPolicy,
}

impl fmt::Debug for RequestQueue {
    // The client's configuration holds the credentials provider: leave it out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestQueue")
            .field("queue_url", &self.queue_url)
            .finish_non_exhaustive()
    }
}

impl RequestQueue {
    /// The one SQS operation a submission calls, with the IAM action AWS checks for it (on
    /// the queue): the submitter needs it, the function does not.
    pub const IAM_ACTIONS: &[(&str, &str)] = &[("SendMessageBatch", "sqs:SendMessage")];

    /// A client for `queue_url` on the shared AWS configuration ([`AwsConfig::sqs_client`]:
    /// the endpoint from `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL`). Refuses what is no
    /// standard queue's URL.
    pub(crate) async fn from_aws(queue_url: &str, aws: &AwsConfig) -> Result<Self> {
        check_queue_url(queue_url)?;
        Ok(RequestQueue::new(
            aws.sqs_client(queue_url).await,
            queue_url,
        ))
    }

    /// A queue over an existing client (and the tests' endpoint).
    pub(crate) fn new(client: Client, queue_url: &str) -> Self {
        RequestQueue {
            client,
            queue_url: queue_url.to_string(),
            retry: RetryPolicy::QUEUE_SEND,
        }
    }

    /// Sends every message, [`MAX_BATCH_ENTRIES`] and [`MAX_BATCH_BYTES`] to a call, in
    /// order; reports what was sent and what was not.
    pub(crate) async fn send_all(
        &self,
        messages: &[StoryMessage],
        deadline: Deadline,
    ) -> SendReport {
        let sizes: Vec<usize> = messages.iter().map(|m| m.body.len()).collect();
        let mut report = SendReport::default();
        for range in plan_batches(&sizes, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES) {
            let start = range.start;
            self.send_batch(&messages[range], start, deadline, &mut report)
                .await;
        }
        report
    }

    /// One call's messages (numbered from `first` in the story), retried as the module
    /// notes say.
    async fn send_batch(
        &self,
        batch: &[StoryMessage],
        first: usize,
        deadline: Deadline,
        report: &mut SendReport,
    ) {
        let mut pending: Vec<(usize, &StoryMessage)> = batch
            .iter()
            .enumerate()
            .map(|(index, message)| (first + index, message))
            .collect();
        let mut attempt = 1;
        loop {
            let entries: Vec<SendMessageBatchRequestEntry> = pending
                .iter()
                .map(|(number, message)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(entry_id(*number))
                        .message_body(&message.body)
                        .build()
                        .expect("an entry with an id and a body")
                })
                .collect();
            report.calls += 1;
            let call = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send();
            let outcome = deadline.within(call).await;
            let mut again: Vec<(usize, &StoryMessage)> = Vec::new();
            let mut last_error = String::new();
            match outcome {
                None => {
                    last_error = "the submission's deadline came first".into();
                    again = pending;
                }
                Some(Ok(output)) => {
                    let succeeded: HashSet<&str> =
                        output.successful().iter().map(|entry| entry.id()).collect();
                    for (number, message) in pending {
                        let id = entry_id(number);
                        if succeeded.contains(id.as_str()) {
                            report.sent += 1;
                            report.sent_scenes += message.scene_ids.len();
                            continue;
                        }
                        match output.failed().iter().find(|entry| entry.id() == id) {
                            Some(failed) if failed.sender_fault() => {
                                tracing::warn!(
                                    queue = %self.queue_url,
                                    code = failed.code(),
                                    error = failed.message().unwrap_or_default(),
                                    "SendMessageBatch refused a message (sender's fault); not retried"
                                );
                                report.unsent.push(Unsent {
                                    scene_ids: message.scene_ids.clone(),
                                    error: entry_error(failed.code(), failed.message()),
                                    sender_fault: true,
                                });
                            }
                            Some(failed) => {
                                last_error = entry_error(failed.code(), failed.message());
                                again.push((number, message));
                            }
                            // No result for an entry: it cannot be known as sent.
                            None => {
                                last_error = "SendMessageBatch answered nothing for it".into();
                                again.push((number, message));
                            }
                        }
                    }
                }
                Some(Err(error)) => {
                    let why = format!(
                        "SendMessageBatch to {}: {}",
                        self.queue_url,
                        DisplayErrorContext(&error)
                    );
                    if !is_transient(&error) {
                        tracing::warn!(error = %why, "the queue refused the call; not retried");
                        report
                            .unsent
                            .extend(pending.iter().map(|(_, message)| Unsent {
                                scene_ids: message.scene_ids.clone(),
                                error: why.clone(),
                                sender_fault: true,
                            }));
                        return;
                    }
                    last_error = why;
                    again = pending;
                }
            }
            if again.is_empty() {
                return;
            }
            tracing::warn!(
                queue = %self.queue_url,
                messages = again.len(),
                attempt,
                error = %last_error,
                "messages not sent; retrying"
            );
            if !self.retry.wait_to_retry(attempt, deadline).await {
                report
                    .unsent
                    .extend(again.iter().map(|(_, message)| Unsent {
                        scene_ids: message.scene_ids.clone(),
                        error: last_error.clone(),
                        sender_fault: false,
                    }));
                return;
            }
            pending = again;
            attempt += 1;
        }
    }
}

/// An entry's id in its call: unique within it, `[A-Za-z0-9_-]{1,80}`.
fn entry_id(number: usize) -> String {
    format!("m{number}")
}

fn entry_error(code: &str, message: Option<&str>) -> String {
    match message {
        Some(message) if !message.is_empty() => format!("{code}: {message}"),
        _ => code.to_string(),
    }
}

/// A queue URL `submit` sends to: `http(s)://…`, and not a FIFO queue (whose message groups
/// would run a story one message at a time).
fn check_queue_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest) if !rest.is_empty() && !url.chars().any(char::is_whitespace) => {}
        _ => {
            return Err(Stage3Error::invalid_request(format!(
                "--queue-url: expected the queue's https:// URL, got {url:?}"
            )))
        }
    }
    if url.trim_end_matches('/').ends_with(".fifo") {
        return Err(Stage3Error::invalid_request(
            "--queue-url: a FIFO queue would run the story's messages one after another; \
             submit to the standard request queue",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::parse_submission_bytes;
    use crate::schema::Submission;

    fn request(id: &str, prompt: &str) -> GenerationRequest {
        serde_json::from_value(serde_json::json!({"scene_id": id, "image_prompt": prompt})).unwrap()
    }

    #[test]
    fn scenes_are_grouped_in_order_and_every_body_is_a_story_batch() {
        let requests: Vec<GenerationRequest> = (1..=7)
            .map(|i| request(&format!("s{i}"), "a fox"))
            .collect();
        let messages = story_messages("fox", &requests, 3).unwrap();
        let groups: Vec<Vec<String>> = messages.iter().map(|m| m.scene_ids.clone()).collect();
        assert_eq!(
            groups,
            [vec!["s1", "s2", "s3"], vec!["s4", "s5", "s6"], vec!["s7"]]
        );
        for message in &messages {
            match parse_submission_bytes(message.body.as_bytes(), 100).unwrap() {
                Submission::Story {
                    story_id, requests, ..
                } => {
                    assert_eq!(story_id, "fox");
                    let ids: Vec<String> = requests.into_iter().map(|r| r.scene_id).collect();
                    assert_eq!(ids, message.scene_ids);
                }
                other => panic!("not a story batch: {other:?}"),
            }
        }
        // An identical repeat is sent once.
        let mut twice = requests.clone();
        twice.push(requests[0].clone());
        assert_eq!(
            story_messages("fox", &twice, 100).unwrap()[0]
                .scene_ids
                .len(),
            7
        );
    }

    #[test]
    fn a_group_over_the_message_limit_is_split_and_a_scene_over_it_refused() {
        let big = "x".repeat(100 * 1024);
        let requests: Vec<GenerationRequest> =
            (0..5).map(|i| request(&format!("s{i}"), &big)).collect();
        let messages = story_messages("fox", &requests, 10).unwrap();
        let sizes: Vec<usize> = messages.iter().map(|m| m.scene_ids.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert!(messages.iter().all(|m| m.body.len() <= MAX_MESSAGE_BYTES));

        // Exactly at the limit fits; one byte more does not.
        let envelope = json_len(&Body {
            story_id: "fox",
            scenes: &[],
        });
        let bare = json_len(&request("s", ""));
        let exact = request("s", &"y".repeat(MAX_MESSAGE_BYTES - envelope - bare));
        let message = &story_messages("fox", std::slice::from_ref(&exact), 1).unwrap()[0];
        assert_eq!(message.body.len(), MAX_MESSAGE_BYTES);
        let mut over = exact;
        over.image_prompt.push('y');
        let err = story_messages("fox", &[over], 1).unwrap_err();
        assert!(err.to_string().contains("at most 262144"), "{err}");
    }

    #[test]
    fn only_standard_queue_urls_are_taken() {
        check_queue_url("https://sqs.eu-west-1.amazonaws.com/123456789012/stage3-requests")
            .unwrap();
        check_queue_url("http://127.0.0.1:5000/123456789012/q").unwrap();
        for bad in [
            "",
            "sqs://q",
            "https://",
            "https://a b",
            "https://sqs.x/1/q.fifo",
        ] {
            assert!(check_queue_url(bad).is_err(), "{bad}");
        }
    }
}
