//! The HTTP plumbing every API provider shares: one client for the API and one for image
//! URLs, bounded reads, and the conversions of transport failures, error answers and
//! inline images into [`Stage3Error`]s and [`ProviderImage`]s.
//!
//! Each provider speaks its own JSON; what is the same for all of them lives here, so a
//! fix to how a body is capped or a timeout is named reaches every provider at once:
//!
//! - The API client follows no redirect (one could carry the key's request elsewhere) and
//!   sends the key only in an `Authorization` header marked sensitive.
//! - Image URLs in answers go through a separate client that never sends the key and
//!   cannot reach private addresses ([`super::fetch`]).
//! - Every body is read chunk by chunk against `STAGE3_MAX_RESPONSE_BYTES`, so an oversized
//!   answer is refused as soon as it crosses the line rather than after it filled memory.
//! - One [`CallBudget`] covers a call's every step: the POST, then any image download.
//! - Whatever a provider writes is shortened where it is read, and scrubbed of the key: an
//!   error body, a message or a slug can be megabytes long and must never reach a log line
//!   or an answer whole.

use std::borrow::Cow;
use std::error::Error as _;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, Response};
use serde::{Deserialize, Serialize};

use super::fetch::{self, AddressPolicy};
use super::HttpSettings;
use super::{ImageRequest, ProviderImage};
use crate::deadline::CallBudget;
use crate::error::{ProviderFailure, Result, Stage3Error};
use crate::secret::Secret;

/// An error answer is only read for its message; more than this is not worth holding.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Provider messages are for people and logs; a page of HTML or a model's essay is not.
pub(super) const MAX_MESSAGE_CHARS: usize = 300;
/// A model slug is at most 200 characters (`schema::validate_model`); one from the provider
/// is only shown, so it is cut at the same length.
const MAX_SLUG_CHARS: usize = 200;

/// Providers pad inconsistently, so padding is optional; the alphabet is the standard one.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);
const BASE64_URL_SAFE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A provider's two HTTP clients and what every call to its API needs: the base URL, the
/// headers (the key among them), the answer cap. Build it once; it holds the connection
/// pools.
pub(super) struct ApiClient {
    /// The provider's name, for messages.
    provider: &'static str,
    client: Client,
    /// For image URLs only: filtered addresses, no `Referer`, never the key. Built by the
    /// first image URL (most answers carry the image inline): a client loads the system's
    /// root certificates, which is a good part of a Lambda function's start-up.
    image_client: std::sync::OnceLock<Client>,
    connect_timeout: std::time::Duration,
    address_policy: AddressPolicy,
    base_url: String,
    /// `Authorization` (marked sensitive), `Content-Type` and any provider headers; sent on
    /// API calls only.
    headers: HeaderMap,
    /// The variable the key comes from, to name it when it is missing.
    key_variable: &'static str,
    /// Kept only to scrub it from anything the provider echoes back.
    key: Option<Secret>,
    max_response_bytes: usize,
}

/// A non-2xx answer, for the provider to classify.
pub(super) struct ErrorAnswer {
    pub status: u16,
    /// `Retry-After`, when the provider sent one.
    pub retry_after: Option<Duration>,
    /// The body, or why it could not be read (the status alone still classifies).
    pub body: std::result::Result<Bytes, String>,
}

impl ApiClient {
    /// The clients for `provider`'s API at `base_url`. Without a key the client can still
    /// read what needs none (a catalogue); [`ApiClient::post_json`] then fails with a
    /// configuration error naming `key_variable`.
    pub(super) fn new(
        provider: &'static str,
        base_url: &str,
        key: Option<Secret>,
        key_variable: &'static str,
        mut headers: HeaderMap,
        http: &HttpSettings,
    ) -> Result<Self> {
        let key = key.filter(|key| !key.expose().trim().is_empty());
        if let Some(key) = &key {
            let mut authorization =
                HeaderValue::from_str(&format!("Bearer {}", key.expose().trim())).map_err(
                    |_| {
                        Stage3Error::config(format!(
                            "{key_variable} contains characters not allowed in an HTTP header"
                        ))
                    },
                )?;
            authorization.set_sensitive(true);
            headers.insert(AUTHORIZATION, authorization);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let build_error = |e: reqwest::Error| {
            Stage3Error::config(format!("cannot build the HTTP client: {}", error_chain(&e)))
        };
        let client = Client::builder()
            .tls_backend_rustls()
            .connect_timeout(http.connect_timeout)
            .user_agent(concat!("stage3/", env!("CARGO_PKG_VERSION")))
            .redirect(fetch::api_redirects())
            .referer(false)
            .build()
            .map_err(build_error)?;
        let address_policy = AddressPolicy {
            allow_loopback: http.allow_loopback_image_urls,
        };
        Ok(ApiClient {
            provider,
            client,
            image_client: std::sync::OnceLock::new(),
            connect_timeout: http.connect_timeout,
            address_policy,
            base_url: base_url.trim_end_matches('/').to_string(),
            headers,
            key_variable,
            key,
            max_response_bytes: http.max_response_bytes,
        })
    }

    pub(crate) fn has_key(&self) -> bool {
        self.key.is_some()
    }

    pub(super) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// POSTs `body` to `{base}{path}` within the call's budget: the 2xx answer's body, read
    /// within the cap once there is room for it (see [`ImageRequest::answered`]), or the
    /// error answer for the provider to classify.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        body: &impl Serialize,
        request: &ImageRequest<'_>,
    ) -> Result<std::result::Result<Bytes, ErrorAnswer>> {
        let budget = &request.budget;
        if self.key.is_none() {
            return Err(Stage3Error::config(format!(
                "{} is not set",
                self.key_variable
            )));
        }
        let endpoint = format!("POST {path}");
        let left = budget.remaining(&endpoint)?;
        let started = Instant::now();
        let mut response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .headers(self.headers.clone())
            .json(body)
            .timeout(left)
            .send()
            .await
            .map_err(|e| transport_error(e, &endpoint, budget))?;
        let status = response.status();
        tracing::debug!(
            provider = self.provider,
            endpoint = %endpoint,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "provider answered"
        );
        if !status.is_success() {
            return Ok(Err(self.error_answer(&mut response).await));
        }
        request.answered().await;
        match read_body(&mut response, self.max_response_bytes).await {
            Ok(bytes) => Ok(Ok(bytes)),
            Err(BodyError::TooLarge) => Err(too_large(status.as_u16(), self.max_response_bytes)),
            Err(BodyError::Transport(e)) => Err(transport_error(e, &endpoint, budget)),
        }
    }

    /// GETs `{base}{path}` without the key (a discovery path: a catalogue), within
    /// `timeout` and `limit`; a failure is described, not classified.
    pub(crate) async fn get_unauthenticated(
        &self,
        path: &str,
        timeout: Duration,
        limit: usize,
    ) -> std::result::Result<Bytes, String> {
        let mut response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| error_chain(&e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "GET {} answered HTTP {}",
                shorten(path),
                status.as_u16()
            ));
        }
        match read_body(&mut response, limit).await {
            Ok(body) => Ok(body),
            Err(BodyError::TooLarge) => Err(format!("GET {} answered too much", shorten(path))),
            Err(BodyError::Transport(e)) => Err(error_chain(&e.without_url())),
        }
    }

    async fn error_answer(&self, response: &mut Response) -> ErrorAnswer {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        let body = match read_body(response, MAX_ERROR_BODY_BYTES).await {
            Ok(body) => Ok(body),
            Err(BodyError::TooLarge) => Err("(error body too large to show)".to_string()),
            Err(BodyError::Transport(e)) => {
                Err(format!("(error body unreadable: {})", error_chain(&e)))
            }
        };
        ErrorAnswer {
            status,
            retry_after,
            body,
        }
    }

    /// Provider text made safe to show: the key scrubbed, one line, at most a few hundred
    /// characters.
    pub(crate) fn provider_text(&self, text: &str) -> String {
        let key = self.key.as_ref().map(|k| k.expose().trim()).unwrap_or("");
        let scrubbed = if !key.is_empty() && text.contains(key) {
            Cow::Owned(text.replace(key, "[redacted]"))
        } else {
            Cow::Borrowed(text)
        };
        shorten(&scrubbed)
    }

    /// Parses a 2xx body as `T`, or says where it is not what was expected (a malformed
    /// answer, worth one more try).
    pub(crate) fn parse_answer<'a, T: Deserialize<'a>>(&self, body: &'a [u8]) -> Result<T> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = shorten(&e.path().to_string());
            // serde_json quotes the offending value, which could be a multi-MB string.
            let cause = self.provider_text(&e.into_inner().to_string());
            malformed(format!(
                "the answer is not the expected JSON (at `{path}`: {cause})"
            ))
        })
    }

    /// A provider failure built from what its error answer said: the provider's message
    /// (scrubbed and shortened), else the status's reason phrase.
    pub(super) fn failure(
        &self,
        status: Option<u16>,
        provider_error_type: Option<&str>,
        message: Option<&str>,
    ) -> ProviderFailure {
        let message = match message {
            Some(message) if !message.trim().is_empty() => self.provider_text(message),
            _ => status
                .and_then(|s| reqwest::StatusCode::from_u16(s).ok())
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no message")
                .to_string(),
        };
        ProviderFailure {
            status,
            provider_error_type: provider_error_type.map(|t| self.provider_text(t)),
            message,
            retry_after: None,
            cost: None,
        }
    }

    /// The image `found` in `answer`: decoded (into the answer's own buffer when it can
    /// be, see [`decode_inline_image_apart`]), or fetched within `budget`.
    pub(super) async fn image_of(
        &self,
        found: AnswerImage,
        answer: Bytes,
        budget: &CallBudget,
    ) -> Result<ProviderImage> {
        match found {
            AnswerImage::Inline(text) => decode_inline_image_apart(text, answer).await,
            AnswerImage::Url(url) => self.fetch_image_url(&url, budget).await,
        }
    }

    /// An image given by URL: a `data:` URL is decoded; an `https` URL is fetched with the
    /// image client (public addresses only), the same cap and the remaining budget; plain
    /// `http` is refused (anyone on the path could swap the picture).
    pub(crate) async fn fetch_image_url(
        &self,
        url: &str,
        budget: &CallBudget,
    ) -> Result<ProviderImage> {
        let scheme = url.split_once(':').map(|(scheme, _)| scheme).unwrap_or("");
        if scheme.eq_ignore_ascii_case("data") {
            return decode_inline_image(url);
        }
        if !scheme.eq_ignore_ascii_case("https") {
            return Err(Stage3Error::ProviderError(ProviderFailure::new(
                None,
                format!(
                    "the provider returned an image URL with scheme {:?}; only data: and \
                     https: URLs are accepted",
                    shorten(scheme)
                ),
            )));
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| {
            Stage3Error::ProviderError(ProviderFailure::new(
                None,
                "the provider returned an image URL that does not parse",
            ))
        })?;
        // The URL itself may be signed; name only its host in messages.
        let host = shorten(parsed.host_str().unwrap_or("no host"));
        let what = format!("GET image from {host}");
        if let Err(why) = self.address_policy.check_url(&parsed) {
            return Err(Stage3Error::ProviderError(ProviderFailure::new(
                None,
                format!("{what}: {why}"),
            )));
        }
        let left = budget.remaining(&what)?;
        let image_client = match self.image_client.get() {
            Some(client) => client,
            None => {
                let client = fetch::image_client(self.address_policy, self.connect_timeout)
                    .map_err(|e| {
                        Stage3Error::config(format!(
                            "cannot build the HTTP client for image URLs: {}",
                            error_chain(&e)
                        ))
                    })?;
                self.image_client.get_or_init(|| client)
            }
        };
        let mut response = image_client
            .get(parsed)
            .timeout(left)
            .send()
            .await
            .map_err(|e| transport_error(e, &what, budget))?;
        let status = response.status();
        if !status.is_success() {
            let message = format!("{what} answered HTTP {}", status.as_u16());
            return Err(if status.is_server_error() {
                Stage3Error::ProviderUnavailable(ProviderFailure::new(None, message))
            } else {
                // Not the API's status, so not its classification: a new generation will
                // likely give a new URL, so this stays retryable.
                Stage3Error::ProviderError(ProviderFailure::new(None, message))
            });
        }
        let claimed = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(shorten);
        let bytes = match read_body(&mut response, self.max_response_bytes).await {
            Ok(bytes) => bytes,
            Err(BodyError::TooLarge) => return Err(too_large(200, self.max_response_bytes)),
            Err(BodyError::Transport(e)) => return Err(transport_error(e, &what, budget)),
        };
        if bytes.is_empty() {
            return Err(malformed(format!("{what} returned an empty body")));
        }
        Ok(ProviderImage {
            bytes,
            claimed_media_type: claimed,
            cost: None,
        })
    }
}

/// A JSON string borrowed from the body when it has no escapes (base64 never needs any,
/// though a JSON encoder may still write `\/`), owned otherwise.
///
/// A newtype because serde borrows a `Cow` only when the field is exactly `Cow<str>` with
/// `#[serde(borrow)]`; inside an `Option` it would silently copy every time.
#[derive(Deserialize)]
pub(super) struct JsonText<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// An image's base64 text (or `data:` URL) read from the answer as raw bytes: borrowed
/// like [`JsonText`], but found with a SIMD search for the closing quote and not checked as
/// UTF-8, which for a 4 MB payload was a tenth of each answer's CPU time. Nothing is lost:
/// the base64 decoder refuses every byte that is not base64.
#[derive(Deserialize)]
pub(super) struct JsonBytes<'a>(#[serde(borrow)] pub Cow<'a, [u8]>);

/// Records what a failed call was billed, when the answer said.
pub(super) fn with_cost(mut error: Stage3Error, cost: Option<f64>) -> Stage3Error {
    if let Some(failure) = error.provider_failure_mut() {
        failure.cost = failure.cost.or(cost);
    }
    error
}

/// Classifies a failure by its HTTP status alone: what every provider falls back on when
/// it says nothing more specific (an unknown code, an untyped body).
pub(super) fn classify_status(status: u16, failure: ProviderFailure) -> Stage3Error {
    match status {
        401 => Stage3Error::Auth(failure),
        402 => Stage3Error::InsufficientCredits(failure),
        403 => Stage3Error::PermissionDenied(failure),
        // `Timeout` carries text only, so the status travels in it.
        408 => Stage3Error::Timeout(format!("the provider gave up on the request: {failure}")),
        429 => Stage3Error::RateLimited(failure),
        500..=599 => Stage3Error::ProviderUnavailable(failure),
        // 400, 413, 404 (a wrong base URL or model), anything else: our request is wrong.
        _ => Stage3Error::ProviderError(failure),
    }
}

/// One line of at most [`MAX_MESSAGE_CHARS`] characters. Reads no further than it keeps,
/// so an 8 MB string costs no more than a short one.
pub(super) fn shorten(text: &str) -> String {
    shorten_to(text, MAX_MESSAGE_CHARS)
}

pub(super) fn shorten_slug(text: &str) -> String {
    shorten_to(text, MAX_SLUG_CHARS)
}

fn shorten_to(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4 + 3));
    for (count, c) in text.trim().chars().enumerate() {
        if count == max_chars {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// A success status with a body we cannot use; the 200 makes it retryable.
pub(super) fn malformed(message: impl Into<String>) -> Stage3Error {
    Stage3Error::ProviderError(ProviderFailure::new(Some(200), message))
}

pub(super) fn too_large(status: u16, limit: usize) -> Stage3Error {
    Stage3Error::ProviderError(ProviderFailure::new(
        Some(status),
        format!("the answer is larger than STAGE3_MAX_RESPONSE_BYTES ({limit} bytes)"),
    ))
}

pub(super) fn transport_error(
    error: reqwest::Error,
    what: &str,
    budget: &CallBudget,
) -> Stage3Error {
    // Without the URL: an image URL may carry a signature.
    let error = error.without_url();
    // Connect first: a connect timeout (STAGE3_CONNECT_TIMEOUT_SECS) means the provider is
    // unreachable, not that it is slow to draw.
    if error.is_connect() {
        Stage3Error::ProviderUnavailable(ProviderFailure::new(
            None,
            format!("cannot connect for {what}: {}", error_chain(&error)),
        ))
    } else if error.is_timeout() {
        budget.expired(what)
    } else {
        Stage3Error::ProviderUnavailable(ProviderFailure::new(
            None,
            format!("{what} failed: {}", error_chain(&error)),
        ))
    }
}

/// reqwest's own message is "error sending request"; the cause is further down the chain.
pub(super) fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    shorten(&text)
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the past
/// means "now".
pub(super) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Not RFC, but seen in the wild.
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::try_from_secs_f64(seconds).ok())
            .flatten();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

// ---- Bodies and images ----------------------------------------------------------------

pub(super) enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads the body chunk by chunk, stopping as soon as it passes `limit`.
pub(super) async fn read_body(response: &mut Response, limit: usize) -> Result<Bytes, BodyError> {
    let announced = response.content_length();
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let capacity = announced.map_or(64 * 1024, |length| length as usize);
    let mut body = BytesMut::with_capacity(capacity.min(limit));
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A `data:` URL split into its media type and its base64 payload.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct DataUrl<'a> {
    pub media_type: Option<&'a str>,
    pub base64: &'a [u8],
}

/// Parses `data:<media type>[;parameters];base64,<payload>` (RFC 2397). Only base64 payloads
/// are accepted: a percent-encoded image is not something any provider sends. Only the
/// short header need be text; the payload, megabytes, is left to the base64 decoder.
pub(super) fn parse_data_url(url: &[u8]) -> Result<DataUrl<'_>, &'static str> {
    let rest = url
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"data:"))
        .map(|_| &url[5..])
        .ok_or("not a data: URL")?;
    let comma = rest
        .iter()
        .position(|&b| b == b',')
        .ok_or("a data: URL without a comma")?;
    let header =
        std::str::from_utf8(&rest[..comma]).map_err(|_| "a data: URL whose header is not text")?;
    let mut parts = header.split(';');
    let media_type = parts.next().map(str::trim).filter(|t| !t.is_empty());
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err("a data: URL that is not base64-encoded");
    }
    Ok(DataUrl {
        media_type,
        base64: &rest[comma + 1..],
    })
}

/// Decodes raw base64, or a `data:` URL around it, into the image bytes.
pub(super) fn decode_inline_image(text: &str) -> Result<ProviderImage> {
    decode_inline_bytes(text.as_bytes())
}

/// [`decode_inline_image`] of bytes: the payload, megabytes, is read once, by the base64
/// decoder (no UTF-8 check or whitespace scan before it).
fn decode_inline_bytes(text: &[u8]) -> Result<ProviderImage> {
    let (claimed, payload) = inline_payload(text)?;
    let bytes = decode_base64(payload)
        .map_err(|why| malformed(format!("the image is not valid base64: {why}")))?;
    if bytes.is_empty() {
        return Err(malformed("the image data is empty"));
    }
    Ok(ProviderImage {
        bytes,
        claimed_media_type: claimed,
        cost: None,
    })
}

/// The media type an inline image claims (a `data:` URL's) and its base64 payload, trimmed.
fn inline_payload(text: &[u8]) -> Result<(Option<String>, &[u8])> {
    let text = text.trim_ascii();
    let is_data_url = text
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"data:"));
    if !is_data_url {
        return Ok((None, text));
    }
    let url =
        parse_data_url(text).map_err(|why| malformed(format!("cannot use the image: {why}")))?;
    Ok((url.media_type.map(str::to_string), url.base64.trim_ascii()))
}

/// Answers' images at least this long (as text) are decoded on a blocking thread.
const DECODE_APART_BYTES: usize = 64 * 1024;

/// Where an answer's inline image text is: a range of the answer itself (the usual case:
/// base64 needs no JSON escapes), or a copy, when escapes made the parser unescape it.
pub(super) enum InlineText {
    Within(std::ops::Range<usize>),
    Copied(Vec<u8>),
}

impl InlineText {
    /// Finds `text`, parsed out of `answer`, in `answer`.
    pub(super) fn locate(text: &[u8], answer: &Bytes) -> InlineText {
        let inside = answer.as_ref().as_ptr_range();
        let start = text.as_ptr() as usize;
        let end = start.wrapping_add(text.len());
        if inside.start as usize <= start && end <= inside.end as usize {
            let offset = start - inside.start as usize;
            InlineText::Within(offset..offset + text.len())
        } else {
            InlineText::Copied(text.to_vec())
        }
    }
}

/// Where an answer's image is: in the answer itself, or behind a URL to fetch.
pub(super) enum AnswerImage {
    Inline(InlineText),
    Url(String),
}

/// [`decode_inline_image`] of `text`, found in `answer`, on a blocking thread when it is
/// large. A batch's scenes are driven by one task, so decoding there took a wave's answers
/// one after another on one core (8 ms each for a 3 MB PNG): the next wave's calls and the
/// other answers waited behind them.
///
/// A large image is decoded in place, into the answer's own buffer (given up by the caller
/// for that): the bytes land in pages the answer's read has already touched, where a buffer
/// of their own cost a page fault every 4 KiB, and the image keeps the buffer's spare room
/// for the label the service splices in ([`crate::normalize::insert_aigc_label`]).
async fn decode_inline_image_apart(text: InlineText, answer: Bytes) -> Result<ProviderImage> {
    let buffer = match text {
        InlineText::Within(range) if range.len() < DECODE_APART_BYTES => {
            return decode_inline_bytes(&answer[range]);
        }
        InlineText::Copied(text) if text.len() < DECODE_APART_BYTES => {
            return decode_inline_bytes(&text);
        }
        InlineText::Within(range) => match answer.try_into_mut() {
            Ok(mut whole) => {
                // The text alone, keeping the room after it (the split shares the buffer
                // until `whole` is dropped).
                whole.truncate(range.end);
                whole.split_off(range.start)
            }
            // Shared after all: decode from it, into a buffer of the image's own.
            Err(shared) => BytesMut::from(&shared[range]),
        },
        // Ours alone: taken over as it is, not copied again.
        InlineText::Copied(text) => Bytes::from(text)
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..])),
    };
    tokio::task::spawn_blocking(move || decode_inline_in_place(buffer))
        .await
        .map_err(|e| Stage3Error::Internal(format!("decoding an answer's image failed: {e}")))?
}

/// [`decode_inline_bytes`] of `text`, writing the image over the text it is decoded from
/// when that is plain padded base64 (checked first: a refused in-place decode would leave
/// the text half overwritten, and the lenient decoder needs it whole).
fn decode_inline_in_place(mut text: BytesMut) -> Result<ProviderImage> {
    let (claimed, payload) = {
        let (claimed, payload) = inline_payload(&text)?;
        if payload.is_empty() || base64_simd::STANDARD.check(payload).is_err() {
            return decode_inline_bytes(&text);
        }
        let start = payload.as_ptr() as usize - text.as_ptr() as usize;
        (claimed, start..start + payload.len())
    };
    let decoded = base64_simd::STANDARD
        .decode_inplace(&mut text[payload.clone()])
        .map_err(|why| malformed(format!("the image is not valid base64: {why}")))?
        .len();
    let mut bytes = text.split_off(payload.start);
    drop(text);
    bytes.truncate(decoded);
    if bytes.is_empty() {
        return Err(malformed("the image data is empty"));
    }
    // A PNG is stored as it came, with its label spliced into the room after it. Any other
    // format is converted to a new PNG: it takes a buffer of its own now (a copy, small next
    // to the conversion) and gives back the base64's spare third, which it would otherwise
    // hold while it waits for a decoder.
    let bytes = match bytes.starts_with(crate::normalize::PNG_SIGNATURE) {
        true => bytes.freeze(),
        false => Bytes::copy_from_slice(&bytes),
    };
    Ok(ProviderImage {
        bytes,
        claimed_media_type: claimed,
        cost: None,
    })
}

pub(super) fn decode_base64(payload: &[u8]) -> Result<Bytes, base64::DecodeError> {
    // The common case, one unbroken line of padded standard base64, is decoded straight
    // from the answer with no scan before it, by a SIMD decoder (a 4 MB payload in a
    // fraction of a millisecond, against about 3 ms). Anything it refuses goes through the
    // lenient decoder: missing padding, stray trailing bits, line-wrapped base64 (MIME
    // style), the URL-safe alphabet.
    if let Ok(bytes) = base64_simd::STANDARD.decode_to_vec(payload) {
        return Ok(Bytes::from(bytes));
    }
    let first_error = match BASE64.decode(payload) {
        Ok(bytes) => return Ok(Bytes::from(bytes)),
        Err(error) => error,
    };
    let (unwrapped, standard_error): (Cow<'_, [u8]>, _) =
        if payload.iter().any(u8::is_ascii_whitespace) {
            let unwrapped: Vec<u8> = payload
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            match BASE64.decode(&unwrapped) {
                Ok(bytes) => return Ok(Bytes::from(bytes)),
                Err(error) => (Cow::Owned(unwrapped), error),
            }
        } else {
            (Cow::Borrowed(payload), first_error)
        };
    if unwrapped.iter().any(|&b| b == b'-' || b == b'_') {
        return BASE64_URL_SAFE
            .decode(&unwrapped)
            .map(Bytes::from)
            .map_err(|_| standard_error);
    }
    Err(standard_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(42))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn data_urls_are_split_into_type_and_payload() {
        assert_eq!(
            parse_data_url(b"data:image/png;base64,iVBORw0KGgo="),
            Ok(DataUrl {
                media_type: Some("image/png"),
                base64: b"iVBORw0KGgo="
            })
        );
        assert_eq!(
            parse_data_url(b"DATA:image/jpeg;name=x.jpg;BASE64,/9j/"),
            Ok(DataUrl {
                media_type: Some("image/jpeg"),
                base64: b"/9j/"
            })
        );
        assert_eq!(
            parse_data_url(b"data:;base64,AAAA"),
            Ok(DataUrl {
                media_type: None,
                base64: b"AAAA"
            })
        );
        assert!(parse_data_url(b"data:image/png,%89PNG").is_err());
        assert!(parse_data_url(b"data:image/png;base64").is_err());
        assert!(parse_data_url(b"https://example.com/x.png").is_err());
        assert!(parse_data_url(b"dat").is_err());
    }

    #[test]
    fn inline_images_decode_with_or_without_a_data_prefix() {
        let bytes = b"\x89PNG\r\n\x1a\nrest";
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        let raw = decode_inline_image(&encoded).unwrap();
        assert_eq!(&raw.bytes[..], bytes);
        assert_eq!(raw.claimed_media_type, None);

        let prefixed = decode_inline_image(&format!("data:image/png;base64,{encoded}")).unwrap();
        assert_eq!(&prefixed.bytes[..], bytes);
        assert_eq!(prefixed.claimed_media_type.as_deref(), Some("image/png"));

        let wrapped = format!("{}\n{}", &encoded[..8], &encoded[8..]);
        assert_eq!(&decode_inline_image(&wrapped).unwrap().bytes[..], bytes);
        let unpadded = encoded.trim_end_matches('=');
        assert_eq!(&decode_inline_image(unpadded).unwrap().bytes[..], bytes);

        let err = decode_inline_image("not base64 at all!").unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(decode_inline_image("").is_err());
    }

    /// A large image is decoded on a blocking thread, into the answer's own buffer when the
    /// text lies inside it and the buffer is not shared, from a copy otherwise; the bytes
    /// are the same every way, and what the fast decoder refuses still goes to the lenient one.
    #[tokio::test]
    async fn a_large_image_is_decoded_apart_and_in_place() {
        let mut bytes = crate::normalize::PNG_SIGNATURE.to_vec();
        bytes.extend((0..200_000u32).map(|i| (i * 7 % 251) as u8));
        let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let answer = Bytes::from(format!(r#"{{"b64_json":"{encoded}"}}"#));
        let inside = &answer[13..13 + encoded.len()];
        assert_eq!(inside, encoded.as_bytes());
        let located = InlineText::locate(inside, &answer);
        assert!(matches!(&located, InlineText::Within(range) if range.start == 13));
        let buffer = answer.as_ptr_range();
        let in_place = decode_inline_image_apart(located, answer).await.unwrap();
        assert_eq!(&in_place.bytes[..], &bytes[..]);
        assert!(
            buffer.contains(&in_place.bytes.as_ptr()),
            "decoded into the answer's own buffer"
        );

        // Not a PNG (to be converted): decoded in place, then moved to a buffer of its own.
        let jpeg = [&[0xFF, 0xD8, 0xFF][..], &bytes[8..]].concat();
        let jpeg_encoded = base64::engine::general_purpose::STANDARD.encode(&jpeg);
        let answer = Bytes::from(format!(r#"{{"b64_json":"{jpeg_encoded}"}}"#));
        let text = InlineText::locate(&answer[13..13 + jpeg_encoded.len()], &answer);
        let buffer = answer.as_ptr_range();
        let converted = decode_inline_image_apart(text, answer).await.unwrap();
        assert_eq!(&converted.bytes[..], &jpeg[..]);
        assert!(!buffer.contains(&converted.bytes.as_ptr()));

        let answer = Bytes::from(format!(r#"{{"b64_json":"{encoded}"}}"#));
        let kept = answer.clone();
        let text = InlineText::locate(&answer[13..13 + encoded.len()], &answer);
        let shared = decode_inline_image_apart(text, answer).await.unwrap();
        assert_eq!(&shared.bytes[..], &bytes[..]);
        assert!(
            kept.starts_with(b"{\"b64_json\":\""),
            "a shared answer is left as it was"
        );

        let copied = InlineText::locate(encoded.as_bytes(), &kept);
        assert!(matches!(copied, InlineText::Copied(_)));
        let copied = decode_inline_image_apart(copied, kept.clone())
            .await
            .unwrap();
        assert_eq!(&copied.bytes[..], &bytes[..]);

        let data_url = format!("data:image/png;base64,{encoded}");
        let text = InlineText::Copied(data_url.into_bytes());
        let image = decode_inline_image_apart(text, Bytes::new()).await.unwrap();
        assert_eq!(&image.bytes[..], &bytes[..]);
        assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));

        let wrapped: String = encoded
            .as_bytes()
            .chunks(76)
            .map(|line| format!("{}\r\n", std::str::from_utf8(line).unwrap()))
            .collect();
        let text = InlineText::Copied(wrapped.trim_end_matches('=').as_bytes().to_vec());
        let lenient = decode_inline_image_apart(text, Bytes::new()).await.unwrap();
        assert_eq!(&lenient.bytes[..], &bytes[..]);

        let broken = format!("{}!{}", &encoded[..100], &encoded[101..]);
        let text = InlineText::Copied(broken.into_bytes());
        let refused = decode_inline_image_apart(text, Bytes::new()).await;
        assert!(refused.is_err(), "a broken payload is still refused");
    }

    #[test]
    fn messages_are_one_short_line() {
        let long = "x".repeat(1000);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(short.ends_with('…'));
        assert_eq!(shorten("two\nlines"), "two lines");
        assert_eq!(shorten("ünïcödé"), "ünïcödé");
    }
}
