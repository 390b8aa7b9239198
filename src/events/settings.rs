//! Where events go, read from the environment by [`crate::config`].

use std::time::Duration;

use crate::secret::Secret;

/// `STAGE3_EVENT_BUS`, `STAGE3_WEBHOOK_URL` + `STAGE3_WEBHOOK_SECRET` and
/// `STAGE3_DEAD_LETTER_QUEUE_URL` (docs/design.md §2). All unset: nothing is published and
/// SQS failures are redelivered as before.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// An EventBridge bus name or ARN.
    pub event_bus: Option<String>,
    pub webhook: Option<WebhookSettings>,
    /// Where SQS messages that failed for good are sent at once.
    pub dead_letter_queue_url: Option<String>,
    /// The CLI's one time budget for a batch's events (`STAGE3_EVENTS_TIMEOUT_SECS`), spent
    /// by every sink and retry. The Lambda function's invocation deadline bounds its own.
    pub cli_budget: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            event_bus: None,
            webhook: None,
            dead_letter_queue_url: None,
            cli_budget: super::DEFAULT_CLI_BUDGET,
        }
    }
}

/// Where webhook events go and the key that signs them.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: Secret,
}
