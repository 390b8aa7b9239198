//! The one error type of Stage 3, and the stable `error_type` identifiers that callers see.
//!
//! Every failure the service can report — in the CLI's batch answer, in a Lambda error, in
//! logs — is a [`Stage3Error`]. Its [`ErrorType`] is a contract (docs/design.md §2): scripts and
//! downstream stages branch on it, so the strings never change once published. Messages are
//! for people and never contain secrets: nothing here formats a key, a token or a signed URL.
//!
//! A message is the detail alone (`image_prompt: must not be empty or only whitespace`),
//! never prefixed by its category: everywhere a failure is shown its `error_type` travels
//! beside it — the CLI's `error[invalid_request]: …`, a batch answer's `failures[]`, the
//! Lambda error, the dead-letter attributes, the `error_type` field of log lines — and a
//! prefix would say it twice. So every message must read well on its own: say what and
//! where, not a fragment.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The stable identifier of a failure's cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request itself is wrong; nothing was generated, nothing was spent.
    InvalidRequest,
    /// The service is misconfigured (a missing or malformed variable).
    Config,
    /// The provider refused the API key (401).
    Auth,
    /// The provider account has no credits left (402).
    InsufficientCredits,
    /// A content filter or the model refused the prompt or the image (OpenRouter's 400
    /// `content_policy_violation`/`refusal`, or a chat answer that finished on a safety
    /// filter). Never retried: the same prompt is refused again, and may be billed again.
    ContentPolicy,
    /// The provider throttled us (429) and the retry budget ran out.
    RateLimited,
    /// The provider was down, overloaded or unreachable (5xx, 529, connect errors).
    ProviderUnavailable,
    /// The provider answered something we cannot use (400, 404, 413, a malformed body, a
    /// reference image it could not use).
    ProviderError,
    /// A request took longer than `STAGE3_TIMEOUT_SECS`.
    Timeout,
    /// The provider's image does not decode or fails validation.
    InvalidImage,
    /// The image or its record could not be written or read.
    Storage,
    /// The Lambda invocation's deadline left no time to finish the scene.
    DeadlineExceeded,
    /// The key may not do this: a missing permission, a guardrail, a geo-gated model (403).
    PermissionDenied,
    /// The model and every fallback are unknown, retired or without endpoints.
    ModelUnavailable,
    /// The batch's cost estimate, or what it has spent, would pass `STAGE3_MAX_COST_USD`.
    BudgetExceeded,
    /// The run was interrupted (Ctrl-C) before the scene started.
    Cancelled,
    /// A bug in this service (a panic) while handling the scene. Only that scene fails;
    /// the batch's other scenes are unaffected. Not retried: it would happen again.
    Internal,
}

impl ErrorType {
    /// Every identifier, in documentation order.
    #[cfg(test)]
    pub(crate) const ALL: [ErrorType; 17] = [
        ErrorType::InvalidRequest,
        ErrorType::Config,
        ErrorType::Auth,
        ErrorType::InsufficientCredits,
        ErrorType::ContentPolicy,
        ErrorType::RateLimited,
        ErrorType::ProviderUnavailable,
        ErrorType::ProviderError,
        ErrorType::Timeout,
        ErrorType::InvalidImage,
        ErrorType::Storage,
        ErrorType::DeadlineExceeded,
        ErrorType::PermissionDenied,
        ErrorType::ModelUnavailable,
        ErrorType::BudgetExceeded,
        ErrorType::Cancelled,
        ErrorType::Internal,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request",
            ErrorType::Config => "config",
            ErrorType::Auth => "auth",
            ErrorType::InsufficientCredits => "insufficient_credits",
            ErrorType::ContentPolicy => "content_policy",
            ErrorType::RateLimited => "rate_limited",
            ErrorType::ProviderUnavailable => "provider_unavailable",
            ErrorType::ProviderError => "provider_error",
            ErrorType::Timeout => "timeout",
            ErrorType::InvalidImage => "invalid_image",
            ErrorType::Storage => "storage",
            ErrorType::DeadlineExceeded => "deadline_exceeded",
            ErrorType::PermissionDenied => "permission_denied",
            ErrorType::ModelUnavailable => "model_unavailable",
            ErrorType::BudgetExceeded => "budget_exceeded",
            ErrorType::Cancelled => "cancelled",
            ErrorType::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong when talking to the image provider, as the provider told it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderFailure {
    /// The HTTP status, when an answer arrived.
    pub status: Option<u16>,
    /// OpenRouter's own `error.metadata.error_type` (or `error.code` text), when given.
    pub provider_error_type: Option<String>,
    /// The provider's message, or ours when the provider gave none.
    pub message: String,
    /// How long the provider asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// What the provider billed for the failed call, in USD, when it said (a refusal on
    /// the chat path may still bill the prompt).
    pub cost: Option<f64>,
}

impl ProviderFailure {
    pub fn new(status: Option<u16>, message: impl Into<String>) -> Self {
        ProviderFailure {
            status,
            provider_error_type: None,
            message: message.into(),
            retry_after: None,
            cost: None,
        }
    }
}

impl fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(status) = self.status {
            write!(f, "HTTP {status}")?;
            if let Some(kind) = &self.provider_error_type {
                write!(f, " ({kind})")?;
            }
            write!(f, ": ")?;
        }
        f.write_str(&self.message)
    }
}

/// A Stage 3 failure. [`Stage3Error::error_type`] is the stable cause; `Display` is the
/// detail alone (see the module documentation).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Stage3Error {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Auth(ProviderFailure),
    #[error("{0}")]
    InsufficientCredits(ProviderFailure),
    #[error("{0}")]
    ContentPolicy(ProviderFailure),
    #[error("{0}")]
    RateLimited(ProviderFailure),
    #[error("{0}")]
    ProviderUnavailable(ProviderFailure),
    #[error("{0}")]
    ProviderError(ProviderFailure),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{message}")]
    Storage {
        message: String,
        /// Whether trying again may succeed (a 5xx, throttling, a dropped connection).
        transient: bool,
    },
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    PermissionDenied(ProviderFailure),
    #[error("{0}")]
    ModelUnavailable(String),
    #[error("{0}")]
    BudgetExceeded(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Internal(String),
}

impl Stage3Error {
    pub fn error_type(&self) -> ErrorType {
        match self {
            Stage3Error::InvalidRequest(_) => ErrorType::InvalidRequest,
            Stage3Error::Config(_) => ErrorType::Config,
            Stage3Error::Auth(_) => ErrorType::Auth,
            Stage3Error::InsufficientCredits(_) => ErrorType::InsufficientCredits,
            Stage3Error::ContentPolicy(_) => ErrorType::ContentPolicy,
            Stage3Error::RateLimited(_) => ErrorType::RateLimited,
            Stage3Error::ProviderUnavailable(_) => ErrorType::ProviderUnavailable,
            Stage3Error::ProviderError(_) => ErrorType::ProviderError,
            Stage3Error::Timeout(_) => ErrorType::Timeout,
            Stage3Error::InvalidImage(_) => ErrorType::InvalidImage,
            Stage3Error::Storage { .. } => ErrorType::Storage,
            Stage3Error::DeadlineExceeded(_) => ErrorType::DeadlineExceeded,
            Stage3Error::PermissionDenied(_) => ErrorType::PermissionDenied,
            Stage3Error::ModelUnavailable(_) => ErrorType::ModelUnavailable,
            Stage3Error::BudgetExceeded(_) => ErrorType::BudgetExceeded,
            Stage3Error::Cancelled(_) => ErrorType::Cancelled,
            Stage3Error::Internal(_) => ErrorType::Internal,
        }
    }

    /// Whether the same call may succeed if tried again (docs/design.md §3: 408/429/5xx, connect
    /// errors, timeouts, malformed answers and images that fail validation are transient;
    /// 400/401/402/403/413 and invalid requests are not).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Stage3Error::RateLimited(_)
            | Stage3Error::ProviderUnavailable(_)
            | Stage3Error::Timeout(_)
            | Stage3Error::InvalidImage(_) => true,
            Stage3Error::Storage { transient, .. } => *transient,
            // A 200 whose body is not what the API promised is worth another try; a 400 or
            // 413 is our request's fault and will fail the same way again.
            Stage3Error::ProviderError(failure) => failure.status.is_none_or(|s| s < 400),
            Stage3Error::InvalidRequest(_)
            | Stage3Error::Config(_)
            | Stage3Error::Auth(_)
            | Stage3Error::InsufficientCredits(_)
            | Stage3Error::ContentPolicy(_)
            | Stage3Error::DeadlineExceeded(_)
            | Stage3Error::PermissionDenied(_)
            | Stage3Error::ModelUnavailable(_)
            | Stage3Error::BudgetExceeded(_)
            | Stage3Error::Cancelled(_)
            | Stage3Error::Internal(_) => false,
        }
    }

    /// The delay the provider asked for, if any.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Stage3Error::RateLimited(f)
            | Stage3Error::ProviderUnavailable(f)
            | Stage3Error::ProviderError(f) => f.retry_after,
            _ => None,
        }
    }

    /// What the provider billed for the failed call, when it said.
    pub(crate) fn cost(&self) -> Option<f64> {
        self.provider_failure().and_then(|f| f.cost)
    }

    /// What the provider said, for the failures that carry it.
    pub(crate) fn provider_failure(&self) -> Option<&ProviderFailure> {
        match self {
            Stage3Error::Auth(f)
            | Stage3Error::InsufficientCredits(f)
            | Stage3Error::ContentPolicy(f)
            | Stage3Error::RateLimited(f)
            | Stage3Error::ProviderUnavailable(f)
            | Stage3Error::ProviderError(f)
            | Stage3Error::PermissionDenied(f) => Some(f),
            _ => None,
        }
    }

    /// [`Stage3Error::provider_failure`], to add what the caller knows (a `Retry-After`, a
    /// billed cost).
    pub(crate) fn provider_failure_mut(&mut self) -> Option<&mut ProviderFailure> {
        match self {
            Stage3Error::Auth(f)
            | Stage3Error::InsufficientCredits(f)
            | Stage3Error::ContentPolicy(f)
            | Stage3Error::RateLimited(f)
            | Stage3Error::ProviderUnavailable(f)
            | Stage3Error::ProviderError(f)
            | Stage3Error::PermissionDenied(f) => Some(f),
            _ => None,
        }
    }

    /// The same cause, told to a scene that never called: a batch stopped by `self` (a 401,
    /// a 402, the budget, Ctrl-C) fails its remaining scenes with the same `error_type`.
    pub(crate) fn for_unstarted_scene(&self) -> Stage3Error {
        const NOT_STARTED: &str = "not started: the batch stopped calling the provider after";
        let retold = |f: &ProviderFailure| ProviderFailure {
            message: format!("{NOT_STARTED} {}", f.message),
            retry_after: None,
            cost: None,
            ..f.clone()
        };
        match self {
            Stage3Error::Auth(f) => Stage3Error::Auth(retold(f)),
            Stage3Error::InsufficientCredits(f) => Stage3Error::InsufficientCredits(retold(f)),
            Stage3Error::PermissionDenied(f) => Stage3Error::PermissionDenied(retold(f)),
            Stage3Error::BudgetExceeded(m) => {
                Stage3Error::BudgetExceeded(format!("not started: {m}"))
            }
            Stage3Error::Cancelled(m) => Stage3Error::Cancelled(format!("not started: {m}")),
            other => other.clone(),
        }
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Stage3Error::InvalidRequest(message.into())
    }

    pub fn config(message: impl Into<String>) -> Self {
        Stage3Error::Config(message.into())
    }

    pub(crate) fn storage(message: impl Into<String>, transient: bool) -> Self {
        Stage3Error::Storage {
            message: message.into(),
            transient,
        }
    }
}

pub type Result<T, E = Stage3Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_type_strings_match_serde_names() {
        for kind in ErrorType::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
    }

    #[test]
    fn the_message_is_the_detail_without_its_category() {
        let refused = ProviderFailure {
            provider_error_type: Some("content_policy_violation".into()),
            ..ProviderFailure::new(Some(400), "Input was flagged")
        };
        for (error, message) in [
            (
                Stage3Error::invalid_request("image_prompt: must not be empty"),
                "image_prompt: must not be empty",
            ),
            (
                Stage3Error::ContentPolicy(refused),
                "HTTP 400 (content_policy_violation): Input was flagged",
            ),
            (
                Stage3Error::storage("cannot write out/a.png: disk full", false),
                "cannot write out/a.png: disk full",
            ),
        ] {
            assert_eq!(error.to_string(), message, "{:?}", error.error_type());
        }
    }

    #[test]
    fn permanent_provider_statuses_are_not_transient() {
        for status in [400, 413] {
            let err = Stage3Error::ProviderError(ProviderFailure::new(Some(status), "x"));
            assert!(!err.is_transient(), "{status}");
        }
        let malformed = Stage3Error::ProviderError(ProviderFailure::new(Some(200), "not json"));
        assert!(malformed.is_transient());
    }
}
