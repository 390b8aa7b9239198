//! OpenRouter's error answers, read and classified into [`Stage3Error`]s.
//!
//! OpenRouter types its errors (docs/design.md §3): `error.metadata.error_type` says what
//! happened, and model-availability failures add `error.availability` with a stable `code`,
//! whether an identical retry may succeed, and suggested `fallback_models`. The typed field
//! comes first and the HTTP status only when it is absent, because the status alone lies in
//! the cases that cost money: a refusal is a 400 like a malformed request, and a 403 is a
//! key permission or a geo-gate rather than a content filter. The availability examples of
//! OpenRouter's error reference put `error_type` and `http_status` directly in `error`, so
//! both places are read.
//!
//! Everything the provider wrote is shortened where it is read: an error body, a message or
//! a slug can be megabytes long, and must never reach a log line or an answer whole.

use std::time::Duration;

use serde_json::Value;

use crate::error::{ProviderFailure, Stage3Error};
use crate::provider::http::{classify_status, shorten, shorten_slug};

/// Suggestions shown in a message.
const MAX_SUGGESTIONS: usize = 5;

/// What an error body said, shortened but not yet scrubbed of the key.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ErrorDetails {
    /// `error.code` or `error.http_status` when it is an HTTP-like status.
    pub code: Option<u16>,
    /// `error.metadata.error_type` (or `error.error_type`), else `error.code`'s text.
    pub error_type: Option<String>,
    pub message: Option<String>,
    pub availability: Option<Availability>,
}

impl ErrorDetails {
    pub(crate) fn described(message: impl Into<String>) -> Self {
        ErrorDetails {
            message: Some(shorten(&message.into())),
            ..ErrorDetails::default()
        }
    }
}

/// `error.availability`: why a model cannot be served.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Availability {
    pub code: Option<String>,
    pub retryable: Option<bool>,
    pub retry_after: Option<Duration>,
    pub fallback_models: Vec<String>,
}

impl Availability {
    /// OpenRouter says to trust `retryable` over the code; a missing flag falls back to the
    /// documented retryable codes.
    pub(crate) fn is_retryable(&self) -> bool {
        let documented = matches!(
            self.code.as_deref(),
            Some("capacity_exhausted" | "temporarily_unavailable")
        );
        self.retryable.unwrap_or(documented)
    }
}

/// Reads `{"error":{"code","message","metadata":{"error_type"},"availability"?}}`, or
/// whatever else came.
pub(super) fn parse_error_body(body: &[u8]) -> ErrorDetails {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => match value.get("error") {
            Some(error) => parse_error_object(error),
            None => match value.get("message").and_then(|m| m.as_str()) {
                Some(message) => ErrorDetails::described(message),
                None => ErrorDetails::described(format!("unexpected error body: {value}")),
            },
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                ErrorDetails::default()
            } else {
                ErrorDetails::described(format!("non-JSON error body: {}", shorten(text)))
            }
        }
    }
}

/// The `error` member, which is normally an object but is a bare string in some proxies.
pub(super) fn parse_error_object(error: &Value) -> ErrorDetails {
    if let Some(message) = error.as_str() {
        return ErrorDetails::described(message);
    }
    let code_text = match error.get("code") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(shorten(s)),
        _ => None,
    };
    let as_status = |text: &str| {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    let http_status = error
        .get("http_status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|c| (100..=599).contains(c));
    let code = code_text.as_deref().and_then(as_status).or(http_status);
    let error_type = error
        .get("metadata")
        .and_then(|m| m.get("error_type"))
        .or_else(|| error.get("error_type"))
        .and_then(Value::as_str)
        .map(shorten)
        .or(code_text);
    let message = error.get("message").and_then(Value::as_str).map(shorten);
    let availability = error
        .get("availability")
        .filter(|a| a.is_object())
        .map(parse_availability);
    ErrorDetails {
        code,
        error_type,
        message,
        availability,
    }
}

fn parse_availability(value: &Value) -> Availability {
    let retry_after = match value.get("retry_after") {
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok()),
        _ => None,
    };
    Availability {
        code: value.get("code").and_then(Value::as_str).map(shorten),
        retryable: value.get("retryable").and_then(Value::as_bool),
        retry_after,
        fallback_models: value
            .get("fallback_models")
            .and_then(Value::as_array)
            .map(|models| {
                models
                    .iter()
                    .filter_map(Value::as_str)
                    .take(MAX_SUGGESTIONS)
                    .map(shorten_slug)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Classifies a failure of `model`: the availability object first, then OpenRouter's typed
/// `error_type`, then the HTTP `status` (docs/design.md §3).
pub(super) fn classify(
    status: u16,
    mut failure: ProviderFailure,
    availability: Option<&Availability>,
    model: &str,
) -> Stage3Error {
    let model = shorten_slug(model);
    if let Some(availability) = availability {
        if failure.retry_after.is_none() {
            failure.retry_after = availability.retry_after;
        }
        let code = availability.code.as_deref().unwrap_or("unavailable");
        if availability.is_retryable() {
            failure.message = format!("{model} ({code}): {}", failure.message);
            return if status == 429 {
                Stage3Error::RateLimited(failure)
            } else {
                Stage3Error::ProviderUnavailable(failure)
            };
        }
        if code == "region_restricted" || status == 403 {
            failure.message = format!("{model} ({code}): {}", failure.message);
            return Stage3Error::PermissionDenied(failure);
        }
        let suggestions = if availability.fallback_models.is_empty() {
            String::new()
        } else {
            format!(
                "; OpenRouter suggests: {}",
                availability.fallback_models.join(", ")
            )
        };
        return Stage3Error::ModelUnavailable(format!(
            "{model} cannot be served ({code}): {}{suggestions}",
            failure.message
        ));
    }

    failure.message = format!("{model}: {}", failure.message);
    match failure.provider_error_type.as_deref() {
        Some("authentication") => return Stage3Error::Auth(failure),
        Some("payment_required") => return Stage3Error::InsufficientCredits(failure),
        Some("permission_denied") => return Stage3Error::PermissionDenied(failure),
        Some("content_policy_violation" | "refusal") => return Stage3Error::ContentPolicy(failure),
        Some("rate_limit_exceeded") => return Stage3Error::RateLimited(failure),
        Some("provider_unavailable" | "provider_overloaded" | "server" | "unmapped") => {
            return Stage3Error::ProviderUnavailable(failure)
        }
        Some("timeout") => {
            return Stage3Error::Timeout(format!("the provider gave up on the request: {failure}"))
        }
        // Our request is wrong and will be wrong again: permanent, whatever the status says.
        Some("invalid_request" | "invalid_prompt" | "not_found" | "payload_too_large") => {
            failure.status = Some(failure.status.filter(|s| *s >= 400).unwrap_or(400));
            return Stage3Error::ProviderError(failure);
        }
        // These concern the reference images we sent, not the provider's image.
        Some(kind) if kind.contains("image") => {
            failure.status = Some(failure.status.filter(|s| *s >= 400).unwrap_or(400));
            failure.message = format!("a reference image was refused: {}", failure.message);
            return Stage3Error::ProviderError(failure);
        }
        _ => {}
    }
    classify_status(status, failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;

    fn classify_body(status: u16, body: Value) -> Stage3Error {
        let details = parse_error_body(body.to_string().as_bytes());
        let failure = ProviderFailure {
            provider_error_type: details.error_type.clone(),
            ..ProviderFailure::new(Some(status), details.message.clone().unwrap_or_default())
        };
        classify(status, failure, details.availability.as_ref(), "acme/model")
    }

    #[test]
    fn openrouter_error_bodies_give_code_type_and_message() {
        let body = br#"{"error":{"code":400,"message":"Input was flagged","metadata":{"error_type":"content_policy_violation","reasons":["violence"]}}}"#;
        assert_eq!(
            parse_error_body(body),
            ErrorDetails {
                code: Some(400),
                error_type: Some("content_policy_violation".into()),
                message: Some("Input was flagged".into()),
                availability: None,
            }
        );
    }

    #[test]
    fn the_code_stands_in_for_a_missing_error_type() {
        let details = parse_error_body(br#"{"error":{"code":"429","message":"slow down"}}"#);
        assert_eq!(details.code, Some(429));
        assert_eq!(details.error_type.as_deref(), Some("429"));

        let details = parse_error_body(br#"{"error":{"code":"server_error","message":"x"}}"#);
        assert_eq!(details.code, None);
        assert_eq!(details.error_type.as_deref(), Some("server_error"));
    }

    #[test]
    fn odd_error_bodies_still_give_a_message() {
        assert_eq!(
            parse_error_body(br#"{"error":"plain text"}"#)
                .message
                .as_deref(),
            Some("plain text")
        );
        let html = parse_error_body(b"<html><body>502 Bad Gateway</body></html>");
        assert!(html.message.unwrap().contains("502 Bad Gateway"));
        assert_eq!(parse_error_body(b""), ErrorDetails::default());
    }

    #[test]
    fn statuses_are_classified_as_designed_when_untyped() {
        let kind = |status| {
            classify(status, ProviderFailure::new(Some(status), "m"), None, "m").error_type()
        };
        use ErrorType::*;
        for (status, expected) in [
            (400, ProviderError),
            (401, Auth),
            (402, InsufficientCredits),
            (403, PermissionDenied),
            (404, ProviderError),
            (408, Timeout),
            (413, ProviderError),
            (429, RateLimited),
            (500, ProviderUnavailable),
            (502, ProviderUnavailable),
            (524, ProviderUnavailable),
            (529, ProviderUnavailable),
        ] {
            assert_eq!(kind(status), expected, "{status}");
        }
    }

    #[test]
    fn the_typed_error_wins_over_the_status() {
        let typed = |status: u16, kind: &str| {
            classify_body(
                status,
                serde_json::json!({"error": {"code": status, "message": "m",
                    "metadata": {"error_type": kind}}}),
            )
        };
        assert_eq!(
            typed(400, "content_policy_violation").error_type(),
            ErrorType::ContentPolicy
        );
        assert_eq!(typed(400, "refusal").error_type(), ErrorType::ContentPolicy);
        assert_eq!(
            typed(403, "permission_denied").error_type(),
            ErrorType::PermissionDenied
        );
        let invalid = typed(400, "invalid_prompt");
        assert_eq!(invalid.error_type(), ErrorType::ProviderError);
        assert!(!invalid.is_transient());
        let image = typed(400, "image_download_failed");
        assert!(image.to_string().contains("reference image"), "{image}");
        assert!(!image.is_transient());
        assert_eq!(typed(504, "timeout").error_type(), ErrorType::Timeout);
    }

    #[test]
    fn availability_decides_before_the_type() {
        // The documented shape: error_type and http_status inside `error`.
        let deprecated = classify_body(
            404,
            serde_json::json!({"error": {"message": "gone", "error_type": "not_found",
                "http_status": 404, "availability": {"code": "model_deprecated",
                "retryable": false, "requested_models": ["acme/model"],
                "fallback_models": ["acme/model-2"], "docs_url": "x"}}}),
        );
        assert_eq!(deprecated.error_type(), ErrorType::ModelUnavailable);
        let message = deprecated.to_string();
        assert!(message.contains("acme/model") && message.contains("model_deprecated"));
        assert!(message.contains("acme/model-2"), "{message}");

        let capacity = classify_body(
            429,
            serde_json::json!({"error": {"message": "full", "error_type": "rate_limit_exceeded",
                "availability": {"code": "capacity_exhausted", "retryable": true,
                "retry_after": 40}}}),
        );
        assert_eq!(capacity.error_type(), ErrorType::RateLimited);
        assert_eq!(capacity.retry_after(), Some(Duration::from_secs(40)));

        // `retryable` is trusted over the code, and an unknown code falls back to it.
        let odd = classify_body(
            404,
            serde_json::json!({"error": {"message": "m", "availability":
                {"code": "no_endpoints", "retryable": true}}}),
        );
        assert!(odd.is_transient(), "{odd}");
        let region = classify_body(
            403,
            serde_json::json!({"error": {"message": "m", "availability":
                {"code": "region_restricted", "retryable": false}}}),
        );
        assert_eq!(region.error_type(), ErrorType::PermissionDenied);
    }
}
