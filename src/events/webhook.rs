//! Events as signed HTTP POSTs to a webhook (`STAGE3_WEBHOOK_URL` + `STAGE3_WEBHOOK_SECRET`).
//!
//! One POST per event, body `{"type": "scene.ready" | "scene.failed" | "batch.done",
//! "data": …}`, with `X-Stage3-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>` so
//! the receiver can tell our events from anyone else's (docs/design.md §2). A receiver
//! should compute the HMAC over the bytes it received, before parsing them.
//!
//! A POST answered 5xx or 429, or that could not connect or timed out, is tried again with
//! backoff; any other 4xx is the receiver refusing that event, and trying again would
//! only repeat it. Scene events go out a few at a time; `batch.done` goes last, after
//! every scene event of its batch has been answered.
//!
//! The secret is used only to sign: it is never logged, and neither is the URL beyond its
//! origin, since webhook URLs often carry a token of their own.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use hmac::{KeyInit, Mac};
use reqwest::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};

use super::{Backoff, Event, EventKind, EventSink};
use crate::config::{Secret, WebhookSettings};
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Stage3-Signature";
/// The header naming the event's type, so a receiver can route before parsing.
pub const EVENT_HEADER: &str = "X-Stage3-Event";
/// Longest one POST may take, connect to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// POSTs in flight at once.
const CONCURRENCY: usize = 8;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the value of [`SIGNATURE_HEADER`].
pub fn signature(secret: &Secret, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The webhook body of `event`: `{"type": …, "data": …}`.
pub fn body(event: &Event) -> String {
    // `type` is one of our fixed names and `data` is already JSON: no escaping needed.
    format!(
        "{{\"type\":\"{}\",\"data\":{}}}",
        event.kind.webhook_type(),
        event.data
    )
}

/// An [`EventSink`] POSTing to one URL.
#[derive(Clone)]
pub struct WebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Secret,
    backoff: Backoff,
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
    pub fn new(settings: &WebhookSettings) -> Result<Self> {
        Self::with_timeouts(settings, REQUEST_TIMEOUT, CONNECT_TIMEOUT)
    }

    /// The same with other timeouts (tests).
    pub fn with_timeouts(
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
            backoff: Backoff::DEFAULT,
        })
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// `scheme://host:port` of the URL: what logs may show of it.
    fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// POSTs one event with retries; answers whether it was delivered.
    async fn post(&self, event: &Event, deadline: Deadline) -> bool {
        let body = body(event);
        let signature = signature(&self.secret, body.as_bytes());
        let mut retry = 0;
        loop {
            let request = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .header(USER_AGENT, concat!("stage3/", env!("CARGO_PKG_VERSION")))
                .header(EVENT_HEADER, event.kind.webhook_type())
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send();
            let Some(outcome) = deadline.within(request).await else {
                self.lost(event, "the invocation's deadline came first");
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
            retry += 1;
            if retry >= self.backoff.attempts || !self.backoff.wait(retry, deadline).await {
                self.lost(event, &format!("{why} after {retry} attempt(s)"));
                return false;
            }
            tracing::debug!(origin = %self.origin(), error = %why, retry, "webhook POST failed; retrying");
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
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let secret = Secret::new("Jefe");
        assert_eq!(
            signature(&secret, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
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
