//! Events as signed HTTP POSTs to a webhook (`STAGE3_WEBHOOK_URL` + `STAGE3_WEBHOOK_SECRET`).
//!
//! One POST per event, body `{"type": "scene.ready" | "scene.failed" | "batch.done",
//! "data": …}`, with `X-Stage3-Timestamp: <unix seconds>` and `X-Stage3-Signature:
//! sha256=<hex HMAC-SHA256(secret, "{timestamp}.{raw body}")>` so the receiver can tell our
//! events from anyone else's (docs/events.md). The timestamp is signed with the body
//! because a signature over the body alone stays valid forever: whoever saw one POST could
//! send it again at any time. A receiver computes the HMAC over the bytes it received,
//! before parsing them, and refuses a timestamp more than [`REPLAY_WINDOW`] away from its
//! clock. Each attempt is signed afresh, so a retry is never older than the window.
//!
//! A POST answered 5xx or 429, or that could not connect or timed out, is tried again with
//! backoff; any other 4xx is the receiver refusing that event, and trying again would
//! only repeat it. Scene events go out a few at a time; `batch.done` goes last, after
//! every scene event of its batch has been answered.
//!
//! The secret is used only to sign: it is never logged, and neither is the URL beyond its
//! origin, since webhook URLs often carry a token of their own.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use hmac::{KeyInit, Mac};
use reqwest::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};

use super::WebhookSettings;
use super::{Event, EventKind, EventSink};
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::retry::RetryPolicy;
use crate::secret::Secret;

/// The header carrying the signature of the timestamp and the body.
pub const SIGNATURE_HEADER: &str = "X-Stage3-Signature";
/// The header carrying when the POST was signed, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "X-Stage3-Timestamp";
/// How far a receiver should let a signed timestamp be from its own clock (docs/events.md):
/// wide enough for clock skew and a slow network, narrow enough that a captured POST is
/// soon worthless.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);
/// The header naming the event's type, so a receiver can route before parsing.
pub(crate) const EVENT_HEADER: &str = "X-Stage3-Event";
/// Longest one POST may take, connect to last byte.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// POSTs in flight at once.
const CONCURRENCY: usize = 8;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`, the value of
/// [`SIGNATURE_HEADER`] for a POST whose [`TIMESTAMP_HEADER`] is `timestamp`.
pub(super) fn signature(secret: &Secret, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Now in Unix seconds, for [`TIMESTAMP_HEADER`]. A clock set before 1970 signs 0, which
/// every receiver refuses: the event is lost and logged, never sent unsigned.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The webhook body of `event`: `{"type": …, "data": …}`.
pub(super) fn body(event: &Event) -> String {
    // `type` is one of our fixed names and `data` is already JSON: no escaping needed.
    format!(
        "{{\"type\":\"{}\",\"data\":{}}}",
        event.kind.webhook_type(),
        event.data
    )
}

/// An [`EventSink`] POSTing to one URL.
#[derive(Clone)]
pub(crate) struct WebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Secret,
    retry: RetryPolicy,
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSink")
            .field("origin", &self.origin())
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// Builds the HTTP client. Makes no network call.
    pub(crate) fn new(settings: &WebhookSettings) -> Result<Self> {
        Self::with_timeouts(settings, REQUEST_TIMEOUT, CONNECT_TIMEOUT)
    }

    /// The same with other timeouts (tests).
    pub(crate) fn with_timeouts(
        settings: &WebhookSettings,
        request_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let url = reqwest::Url::parse(&settings.url).map_err(|e| {
            Stage3Error::config(format!("STAGE3_WEBHOOK_URL: not a valid URL: {e}"))
        })?;
        let client = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(connect_timeout)
            // A redirect would re-send the signed body somewhere the operator never named.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Stage3Error::config(format!("webhook HTTP client: {e}")))?;
        Ok(WebhookSink {
            client,
            url,
            secret: settings.secret.clone(),
            retry: RetryPolicy::EVENTS,
        })
    }

    /// `scheme://host:port` of the URL: what logs may show of it.
    fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// POSTs one event with retries; answers whether it was delivered.
    async fn post(&self, event: &Event, deadline: Deadline) -> bool {
        let body = body(event);
        let mut attempt = 1;
        loop {
            let timestamp = unix_now();
            let signature = signature(&self.secret, timestamp, body.as_bytes());
            let request = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .header(USER_AGENT, concat!("stage3/", env!("CARGO_PKG_VERSION")))
                .header(EVENT_HEADER, event.kind.webhook_type())
                .header(TIMESTAMP_HEADER, timestamp)
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send();
            let Some(outcome) = deadline.within(request).await else {
                self.lost(event, "the deadline came first");
                return false;
            };
            let why = match outcome {
                Ok(response) if response.status().is_success() => return true,
                Ok(response) => {
                    let status = response.status();
                    if status.is_server_error() || status.as_u16() == 429 {
                        format!("HTTP {status}")
                    } else {
                        self.lost(event, &format!("HTTP {status}; not retried"));
                        return false;
                    }
                }
                // Without the URL: it may carry a token.
                Err(error) => format!("{}", error.without_url()),
            };
            if !self.retry.wait_to_retry(attempt, deadline).await {
                self.lost(event, &format!("{why} after {attempt} attempt(s)"));
                return false;
            }
            tracing::debug!(origin = %self.origin(), error = %why, retry = attempt, "webhook POST failed; retrying");
            attempt += 1;
        }
    }

    fn lost(&self, event: &Event, why: &str) {
        tracing::warn!(
            origin = %self.origin(),
            event = event.kind.webhook_type(),
            error = why,
            "webhook event lost"
        );
    }
}

#[async_trait]
impl EventSink for WebhookSink {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn deliver(&self, events: &[Event], deadline: Deadline) -> usize {
        let (last, scenes): (Vec<&Event>, Vec<&Event>) = events
            .iter()
            .partition(|event| event.kind == EventKind::BatchDone);
        // Futures built up front (they start only when polled): a closure over `&Event`
        // inside the stream would trip the `Send` check of `async_trait`.
        let posts: Vec<_> = scenes
            .into_iter()
            .map(|event| self.post(event, deadline))
            .collect();
        let delivered: Vec<bool> = stream::iter(posts)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut lost = delivered.iter().filter(|delivered| !**delivered).count();
        for event in last {
            if !self.post(event, deadline).await {
                lost += 1;
            }
        }
        lost
    }
}

#[cfg(test)]
impl WebhookSink {
    /// Retries timed by `retry` rather than [`RetryPolicy::EVENTS`] (tests). Which
    /// answers are retried stays this sink's own judgement.
    pub(crate) fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_a_dot_and_the_body() {
        // Python's hmac.new(b"Jefe", b"1700000000.what do ya want for nothing?",
        // hashlib.sha256).hexdigest(), an implementation independent of ours.
        let secret = Secret::new("Jefe");
        let body = b"what do ya want for nothing?";
        assert_eq!(
            signature(&secret, 1_700_000_000, body),
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        assert_ne!(
            signature(&secret, 1_700_000_001, body),
            signature(&secret, 1_700_000_000, body),
            "another time, another signature: an old one cannot be reused"
        );
    }

    #[test]
    fn the_body_wraps_the_data_with_its_type() {
        let event = Event {
            kind: EventKind::SceneFailed,
            data: r#"{"scene_id":"s1"}"#.into(),
        };
        let parsed: serde_json::Value = serde_json::from_str(&body(&event)).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"type": "scene.failed", "data": {"scene_id": "s1"}})
        );
    }

    #[test]
    fn debug_shows_only_the_origin() {
        let sink = WebhookSink::new(&WebhookSettings {
            url: "https://hooks.example.com/t/very-private-token".into(),
            secret: Secret::new("whsec-very-secret"),
        })
        .unwrap();
        let debug = format!("{sink:?}");
        assert!(debug.contains("https://hooks.example.com"), "{debug}");
        assert!(!debug.contains("very-private-token"), "{debug}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
