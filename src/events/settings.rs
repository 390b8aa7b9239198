//! Where events go, read from the environment by [`crate::config`].

use crate::secret::Secret;

/// `STAGE3_EVENT_BUS`, `STAGE3_WEBHOOK_URL` + `STAGE3_WEBHOOK_SECRET` and
/// `STAGE3_DEAD_LETTER_QUEUE_URL` (docs/design.md §2). All unset: nothing is published and
/// SQS failures are redelivered as before.
#[derive(Debug, Clone, Default)]
pub struct EventSettings {
    /// An EventBridge bus name or ARN.
    pub event_bus: Option<String>,
    pub webhook: Option<WebhookSettings>,
    /// Where SQS messages that failed for good are sent at once.
    pub dead_letter_queue_url: Option<String>,
}

/// Where webhook events go and the key that signs them.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: Secret,
}
