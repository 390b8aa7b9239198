//! Events to an Amazon EventBridge bus (`STAGE3_EVENT_BUS`), with `PutEvents`.
//!
//! EventBridge takes at most 10 entries and 256 KB per `PutEvents` call, and may accept a
//! call while refusing some of its entries (`FailedEntryCount`, an `ErrorCode` per entry).
//! So events go in chunks that respect both limits, and the entries refused for a passing
//! reason (throttling, an internal failure) are sent again with backoff, as are whole
//! calls that failed in transit. Whatever is still refused after that is logged and
//! counted as lost; nothing here can fail a scene.
//!
//! The client is built once at start-up from the standard AWS configuration, so the
//! endpoint comes from `AWS_ENDPOINT_URL_EVENTBRIDGE` / `AWS_ENDPOINT_URL` (a local
//! EventBridge such as moto in the tests) and credentials from the usual chain (the
//! Lambda role). Building it makes no network call.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_eventbridge::config::retry::RetryConfig;
use aws_sdk_eventbridge::config::timeout::TimeoutConfig;
use aws_sdk_eventbridge::config::Region;
use aws_sdk_eventbridge::error::DisplayErrorContext;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;

use super::{Event, EventSink, EVENT_SOURCE};
use crate::aws::{is_transient, retryable_code, AwsConfig};
use crate::deadline::Deadline;
use crate::retry::RetryPolicy;

/// Entries per `PutEvents` call (EventBridge's limit).
pub(crate) const MAX_ENTRIES_PER_CALL: usize = 10;
/// Bytes of entries per `PutEvents` call: EventBridge's 256 KB, less a little for safety.
pub(crate) const MAX_BYTES_PER_CALL: usize = 256 * 1024 - 1024;
/// Longest wait for a TCP (and TLS) connection to EventBridge.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one `PutEvents` call may take.
pub(crate) const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// An `EventSink` over one EventBridge bus.
#[derive(Clone)]
pub struct EventBridgeSink {
    client: Client,
    /// A bus name or ARN, as `PutEvents` takes it.
    bus: String,
    retry: RetryPolicy,
}

impl fmt::Debug for EventBridgeSink {
    // The client's configuration holds the credentials provider: leave it out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBridgeSink")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl EventBridgeSink {
    /// The one EventBridge operation this sink calls, with the IAM action AWS checks for it (on
    /// the bus); infra/template.yaml grants it, and tests/infra.rs checks both.
    pub const IAM_ACTIONS: &[(&str, &str)] = &[("PutEvents", "events:PutEvents")];

    /// Builds the client for `bus` on the shared AWS configuration, in the region
    /// [`AwsConfig::region_for`] chooses. Call once, at start-up.
    pub(crate) async fn from_aws(bus: &str, aws: &AwsConfig) -> Self {
        let config = Self::configure(aws_sdk_eventbridge::config::Builder::from(
            aws.sdk_config().await,
        ))
        .region(Region::new(aws.region_for(Some(bus))));
        EventBridgeSink::new(Client::from_conf(config.build()), bus)
    }

    /// Applies the Stage 3 client settings: short timeouts and a single SDK attempt (this
    /// sink retries itself, entry by entry). The tests, which bring their own endpoint and
    /// credentials, apply it too, so they get the production behaviour.
    pub(crate) fn configure(
        builder: aws_sdk_eventbridge::config::Builder,
    ) -> aws_sdk_eventbridge::config::Builder {
        builder
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(1))
    }

    /// A sink over an existing client (and the tests' endpoint).
    pub(crate) fn new(client: Client, bus: &str) -> Self {
        EventBridgeSink {
            client,
            bus: bus.to_string(),
            retry: RetryPolicy::EVENTS,
        }
    }

    fn entry(&self, event: &Event) -> PutEventsRequestEntry {
        PutEventsRequestEntry::builder()
            .event_bus_name(&self.bus)
            .source(EVENT_SOURCE)
            .detail_type(event.kind.detail_type())
            .detail(&event.data)
            .build()
    }

    /// Sends one chunk, retrying what may succeed later; answers how many were lost.
    async fn put_chunk(&self, chunk: &[Event], deadline: Deadline) -> usize {
        let mut pending: Vec<&Event> = chunk.iter().collect();
        let mut attempt = 1;
        loop {
            let entries = pending.iter().map(|event| self.entry(event)).collect();
            let call = self.client.put_events().set_entries(Some(entries)).send();
            let Some(outcome) = deadline.within(call).await else {
                tracing::warn!(
                    bus = %self.bus,
                    lost = pending.len(),
                    "PutEvents: the deadline came first"
                );
                return pending.len();
            };
            let mut lost = 0;
            match outcome {
                Ok(output) => {
                    let results = output.entries();
                    let mut again = Vec::new();
                    for (index, event) in pending.into_iter().enumerate() {
                        // An entry without a result cannot be known as delivered: send it
                        // again rather than count it (EventBridge answers one per entry).
                        let Some(result) = results.get(index) else {
                            again.push(event);
                            continue;
                        };
                        let Some(code) = result.error_code() else {
                            continue;
                        };
                        // EventBridge's PutEvents reference names throttling and internal
                        // failures as the entry errors worth another try.
                        if retryable_code(code) {
                            again.push(event);
                        } else {
                            tracing::warn!(
                                bus = %self.bus,
                                detail_type = event.kind.detail_type(),
                                error_code = code,
                                error = result.error_message().unwrap_or_default(),
                                "PutEvents refused an event; it is lost"
                            );
                            lost += 1;
                        }
                    }
                    pending = again;
                }
                Err(error) if is_transient(&error) => {
                    tracing::debug!(
                        bus = %self.bus,
                        error = %DisplayErrorContext(&error),
                        "PutEvents failed; retrying"
                    );
                }
                Err(error) => {
                    tracing::warn!(
                        bus = %self.bus,
                        lost = pending.len(),
                        error = %DisplayErrorContext(&error),
                        "PutEvents failed for good; its events are lost"
                    );
                    return lost + pending.len();
                }
            }
            if pending.is_empty() {
                return lost;
            }
            if !self.retry.wait_to_retry(attempt, deadline).await {
                tracing::warn!(
                    bus = %self.bus,
                    lost = pending.len(),
                    attempts = attempt,
                    "PutEvents: events still refused after every retry; they are lost"
                );
                return lost + pending.len();
            }
            attempt += 1;
        }
    }
}

#[async_trait]
impl EventSink for EventBridgeSink {
    fn name(&self) -> &'static str {
        "eventbridge"
    }

    async fn deliver(&self, events: &[Event], deadline: Deadline) -> usize {
        let sizes: Vec<usize> = events.iter().map(entry_size).collect();
        let mut lost = 0;
        for (event, size) in events.iter().zip(&sizes) {
            if *size > MAX_BYTES_PER_CALL {
                tracing::warn!(
                    bus = %self.bus,
                    detail_type = event.kind.detail_type(),
                    bytes = size,
                    "event larger than PutEvents takes; it is lost"
                );
                lost += 1;
            }
        }
        let sendable: Vec<Event> = events
            .iter()
            .zip(&sizes)
            .filter(|(_, size)| **size <= MAX_BYTES_PER_CALL)
            .map(|(event, _)| event.clone())
            .collect();
        let sendable_sizes: Vec<usize> = sendable.iter().map(entry_size).collect();
        for range in plan_chunks(&sendable_sizes) {
            lost += self.put_chunk(&sendable[range], deadline).await;
        }
        lost
    }
}

/// An entry's size as EventBridge counts it against the 256 KB limit: source, detail-type
/// and detail in UTF-8 bytes (no `Time` or `Resources` are sent).
pub(crate) fn entry_size(event: &Event) -> usize {
    EVENT_SOURCE.len() + event.kind.detail_type().len() + event.data.len()
}

/// Splits entries of the given sizes into consecutive calls of at most
/// [`MAX_ENTRIES_PER_CALL`] entries and [`MAX_BYTES_PER_CALL`] bytes, in order. Every
/// size must be at most [`MAX_BYTES_PER_CALL`].
pub(crate) fn plan_chunks(sizes: &[usize]) -> Vec<Range<usize>> {
    crate::aws::plan_batches(sizes, MAX_ENTRIES_PER_CALL, MAX_BYTES_PER_CALL)
}

#[cfg(test)]
impl EventBridgeSink {
    /// Retries timed by `retry` rather than [`RetryPolicy::EVENTS`] (tests). Which
    /// failures are retried stays this sink's own judgement.
    pub(crate) fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    #[test]
    fn chunks_hold_at_most_ten_entries() {
        let chunks = plan_chunks(&[100; 25]);
        assert_eq!(chunks, [0..10, 10..20, 20..25]);
        assert_eq!(plan_chunks(&[100; 10]), vec![Range { start: 0, end: 10 }]);
        assert!(plan_chunks(&[]).is_empty());
    }

    #[test]
    fn chunks_stay_under_the_request_size_limit() {
        let big = 100 * 1024;
        assert_eq!(plan_chunks(&[big, big, big, 10]), [0..2, 2..4]);
        assert_eq!(
            plan_chunks(&[MAX_BYTES_PER_CALL, 1, MAX_BYTES_PER_CALL]),
            [0..1, 1..2, 2..3]
        );
        for chunk in plan_chunks(&[60 * 1024; 30]) {
            assert!(chunk.len() * 60 * 1024 <= MAX_BYTES_PER_CALL, "{chunk:?}");
        }
    }

    #[test]
    fn entry_size_counts_what_eventbridge_counts() {
        let event = Event {
            kind: EventKind::BatchDone,
            data: "{}".into(),
        };
        assert_eq!(
            entry_size(&event),
            "stage3".len() + "Stage3 Batch Done".len() + 2
        );
    }

    #[test]
    fn only_passing_entry_errors_are_retried() {
        for code in [
            "ThrottlingException",
            "InternalFailure",
            "InternalException",
        ] {
            assert!(retryable_code(code), "{code}");
        }
        for code in [
            "MalformedDetail",
            "InvalidArgument",
            "AccessDeniedException",
            "NotAuthorizedForSourceException",
        ] {
            assert!(!retryable_code(code), "{code}");
        }
    }
}
