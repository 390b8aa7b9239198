//! The OpenRouter client: the Image API (`POST /images`) and the chat path
//! (`POST /chat/completions` with image modalities).
//!
//! One `reqwest::Client` per provider, so every scene reuses the same connection pool. Each
//! call gets the whole `ImageRequest::timeout` as its total budget, connect to last byte.
//! Answers are read chunk by chunk against `max_response_bytes`, so an oversized body is
//! refused as soon as it crosses the line rather than after it has filled memory. Image
//! data stays borrowed from the body buffer until it is decoded, once, into `Bytes`.
//!
//! Every failure is classified into a [`Stage3Error`] by HTTP status (docs/design.md §3), keeping
//! the status, OpenRouter's own error type and a short message. The API key is sent only in
//! the `Authorization` header, which is marked sensitive, and is scrubbed from any text the
//! provider sends back.

use std::borrow::Cow;
use std::error::Error as _;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{redirect, Client, Response};
use serde::{Deserialize, Serialize};

use super::{ImageProvider, ImageRequest, ProviderImage};
use crate::config::{ChatModalities, Config, OpenRouterApi, Secret};
use crate::error::{ProviderFailure, Result, Stage3Error};

/// Provider messages are for people and logs; a page of HTML or a model's essay is not.
const MAX_MESSAGE_CHARS: usize = 300;
/// An error answer is only read for its message; more than this is not worth holding.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Redirects are not part of the API; a few are tolerated for image URLs behind a CDN.
const MAX_REDIRECTS: usize = 5;

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

/// Generates images through OpenRouter. Build it once; it holds the connection pool.
pub struct OpenRouterProvider {
    client: Client,
    base_url: String,
    api: OpenRouterApi,
    chat_modalities: ChatModalities,
    /// `Authorization` (marked sensitive) and the optional attribution headers, sent on API
    /// calls only — never on fetches of image URLs, which may be on someone else's host.
    api_headers: HeaderMap,
    /// Kept only to scrub it from anything the provider echoes back.
    api_key: Secret,
    max_response_bytes: usize,
}

impl fmt::Debug for OpenRouterProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenRouterProvider")
            .field("base_url", &self.base_url)
            .field("api", &self.api)
            .field("api_key", &self.api_key)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl OpenRouterProvider {
    pub fn new(config: &Config) -> Result<Self> {
        let settings = &config.openrouter;
        let api_key = settings
            .api_key
            .clone()
            .filter(|key| !key.expose().trim().is_empty())
            .ok_or_else(|| Stage3Error::config("OPENROUTER_API_KEY is not set"))?;

        let mut api_headers = HeaderMap::new();
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {}", api_key.expose().trim())).map_err(
                |_| {
                    Stage3Error::config(
                        "OPENROUTER_API_KEY contains characters not allowed in an HTTP header",
                    )
                },
            )?;
        authorization.set_sensitive(true);
        api_headers.insert(AUTHORIZATION, authorization);
        api_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, variable, value) in [
            ("http-referer", "STAGE3_HTTP_REFERER", &settings.referer),
            ("x-openrouter-title", "STAGE3_APP_TITLE", &settings.title),
        ] {
            if let Some(value) = value {
                let value = HeaderValue::from_str(value).map_err(|_| {
                    Stage3Error::config(format!(
                        "{variable}: not allowed in an HTTP header (use ASCII text)"
                    ))
                })?;
                api_headers.insert(HeaderName::from_static(name), value);
            }
        }

        let client = Client::builder()
            .tls_backend_rustls()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("stage3/", env!("CARGO_PKG_VERSION")))
            .redirect(redirect::Policy::custom(refuse_downgrades))
            .build()
            .map_err(|e| {
                Stage3Error::config(format!("cannot build the HTTP client: {}", error_chain(&e)))
            })?;

        Ok(OpenRouterProvider {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_string(),
            api: settings.api,
            chat_modalities: settings.chat_modalities,
            api_headers,
            api_key,
            max_response_bytes: config.max_response_bytes,
        })
    }

    async fn generate_with_images_api(
        &self,
        request: &ImageRequest<'_>,
        deadline: Instant,
    ) -> Result<ProviderImage> {
        let body = ImagesRequestBody {
            model: request.model,
            prompt: request.prompt,
            n: 1,
            aspect_ratio: request.size.aspect_ratio(),
            resolution: request.quality.resolution(),
            output_format: "png",
            seed: request.seed,
            input_references: request
                .references
                .iter()
                .map(|url| ImageUrlPart::new(url))
                .collect(),
        };
        let answer = self.post_json("/images", &body, deadline).await?;
        let parsed: ImagesAnswer<'_> = self.parse_answer(&answer)?;
        if let Some(error) = &parsed.error {
            return Err(self.error_in_success(error));
        }
        let cost = parsed.usage.as_ref().and_then(cost_of);
        let data = parsed
            .data
            .ok_or_else(|| malformed("the answer has no `data` list"))?;
        let Some(datum) = data
            .into_iter()
            .find(|d| d.b64_json.is_some() || d.url.is_some())
        else {
            return Err(malformed(
                "the provider returned no image (`data` is empty)",
            ));
        };
        let claimed = datum.media_type.map(|t| t.0.into_owned());
        let mut image = match (datum.b64_json, datum.url) {
            (Some(b64), _) => decode_inline_image(&b64.0)?,
            (None, Some(url)) => self.fetch_image_url(&url.0, deadline).await?,
            (None, None) => return Err(malformed("the image entry has no `b64_json`")),
        };
        image.claimed_media_type = claimed.or(image.claimed_media_type);
        image.cost = cost;
        Ok(image)
    }

    async fn generate_with_chat(
        &self,
        request: &ImageRequest<'_>,
        deadline: Instant,
    ) -> Result<ProviderImage> {
        let body = ChatRequestBody {
            model: request.model,
            messages: [ChatMessageIn {
                role: "user",
                content: chat_content(request),
            }],
            modalities: self.chat_modalities.as_slice(),
            image_config: ImageConfig {
                aspect_ratio: request.size.aspect_ratio(),
                image_size: request.quality.resolution(),
            },
            seed: request.seed,
        };
        let answer = self.post_json("/chat/completions", &body, deadline).await?;
        let parsed: ChatAnswer<'_> = self.parse_answer(&answer)?;
        if let Some(error) = &parsed.error {
            return Err(self.error_in_success(error));
        }
        let cost = parsed.usage.as_ref().and_then(cost_of);
        let choice = parsed
            .choices
            .and_then(|choices| choices.into_iter().next())
            .ok_or_else(|| malformed("the answer has no `choices`"))?;
        let Some(message) = choice.message else {
            return Err(malformed("the first choice has no `message`"));
        };
        let Some(image) = message.images.into_iter().next() else {
            // Models sometimes answer in words instead (a refusal, a question); say what.
            let text = match &message.content {
                Some(serde_json::Value::String(text)) if !text.trim().is_empty() => {
                    format!("; it said: {}", self.provider_text(text))
                }
                _ => String::new(),
            };
            let finish = choice
                .finish_reason
                .map(|reason| format!(" (finish_reason {reason:?})"))
                .unwrap_or_default();
            return Err(malformed(format!(
                "the model returned no image{finish}{text}"
            )));
        };
        let mut image = self
            .fetch_image_url(&image.image_url.url.0, deadline)
            .await?;
        image.cost = cost;
        Ok(image)
    }

    /// POSTs `body` to `{base}{path}` and returns the 2xx answer's body, read within the cap.
    async fn post_json(
        &self,
        path: &str,
        body: &impl Serialize,
        deadline: Instant,
    ) -> Result<Bytes> {
        let endpoint = format!("POST {path}");
        let budget = remaining(deadline, &endpoint)?;
        let started = Instant::now();
        let mut response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .headers(self.api_headers.clone())
            .json(body)
            .timeout(budget)
            .send()
            .await
            .map_err(|e| transport_error(e, &endpoint, budget))?;
        let status = response.status();
        tracing::debug!(
            endpoint = %endpoint,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "openrouter answered"
        );
        if !status.is_success() {
            return Err(self.error_answer(&mut response).await);
        }
        match read_body(&mut response, self.max_response_bytes).await {
            Ok(bytes) => Ok(bytes),
            Err(BodyError::TooLarge) => Err(too_large(status.as_u16(), self.max_response_bytes)),
            Err(BodyError::Transport(e)) => Err(transport_error(e, &endpoint, budget)),
        }
    }

    /// Turns a non-2xx answer into an error classified by its status.
    async fn error_answer(&self, response: &mut Response) -> Stage3Error {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        // The status alone classifies the failure; a body that is too big or cut off only
        // costs us the provider's explanation.
        let details = match read_body(response, MAX_ERROR_BODY_BYTES).await {
            Ok(body) => parse_error_body(&body),
            Err(BodyError::TooLarge) => ErrorDetails::described("(error body too large to show)"),
            Err(BodyError::Transport(e)) => {
                ErrorDetails::described(format!("(error body unreadable: {})", error_chain(&e)))
            }
        };
        let mut failure = self.failure(Some(status), details);
        failure.retry_after = retry_after;
        classify(status, failure)
    }

    /// OpenRouter sometimes reports a failure inside a 200 answer; its `code` is the status
    /// it would have had.
    fn error_in_success(&self, error: &serde_json::Value) -> Stage3Error {
        let details = parse_error_object(error);
        match details.code {
            Some(code) if code >= 400 => {
                let mut failure = self.failure(Some(code), details);
                failure.message = format!("{} (reported inside a 200 answer)", failure.message);
                classify(code, failure)
            }
            _ => Stage3Error::ProviderError(self.failure(Some(200), details)),
        }
    }

    fn failure(&self, status: Option<u16>, details: ErrorDetails) -> ProviderFailure {
        let message = match details.message {
            Some(message) if !message.trim().is_empty() => self.provider_text(&message),
            _ => status
                .and_then(|s| reqwest::StatusCode::from_u16(s).ok())
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no message")
                .to_string(),
        };
        ProviderFailure {
            status,
            provider_error_type: details.error_type.map(|t| self.provider_text(&t)),
            message,
            retry_after: None,
        }
    }

    /// Provider text made safe to show: the key scrubbed, one line, at most a few hundred
    /// characters.
    fn provider_text(&self, text: &str) -> String {
        let key = self.api_key.expose().trim();
        let scrubbed = if !key.is_empty() && text.contains(key) {
            Cow::Owned(text.replace(key, "[redacted]"))
        } else {
            Cow::Borrowed(text)
        };
        shorten(&scrubbed)
    }

    fn parse_answer<'a, T: Deserialize<'a>>(&self, body: &'a [u8]) -> Result<T> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            // serde_json quotes the offending value, which could be a multi-MB string.
            let cause = self.provider_text(&e.into_inner().to_string());
            malformed(format!(
                "the answer is not the expected JSON (at `{path}`: {cause})"
            ))
        })
    }

    /// An image given by URL: a `data:` URL is decoded; an `https` URL is fetched with the
    /// same client, cap and remaining budget; plain `http` is refused (anyone on the path
    /// could swap the picture).
    async fn fetch_image_url(&self, url: &str, deadline: Instant) -> Result<ProviderImage> {
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
        // The URL itself may be signed; name only its host in messages.
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "an unparseable host".into());
        let what = format!("GET image from {host}");
        let budget = remaining(deadline, &what)?;
        let mut response = self
            .client
            .get(url)
            .timeout(budget)
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
            .map(str::to_string);
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

#[async_trait]
impl ImageProvider for OpenRouterProvider {
    fn name(&self) -> &'static str {
        "openrouter"
    }

    fn api(&self) -> Option<&'static str> {
        Some(self.api.as_str())
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let deadline = Instant::now() + request.timeout;
        let image = match self.api {
            OpenRouterApi::Images => self.generate_with_images_api(request, deadline).await,
            OpenRouterApi::Chat => self.generate_with_chat(request, deadline).await,
        }?;
        tracing::debug!(
            scene_id = request.scene_id,
            bytes = image.bytes.len(),
            media_type = image.claimed_media_type.as_deref(),
            cost = image.cost,
            "openrouter image received"
        );
        Ok(image)
    }
}

// ---- Wire shapes ----------------------------------------------------------------------

#[derive(Serialize)]
struct ImagesRequestBody<'a> {
    model: &'a str,
    prompt: &'a str,
    n: u32,
    aspect_ratio: &'a str,
    resolution: &'a str,
    output_format: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    input_references: Vec<ImageUrlPart<'a>>,
}

/// `{"type": "image_url", "image_url": {"url": ..}}`: a reference image, in both APIs.
#[derive(Serialize)]
struct ImageUrlPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    image_url: UrlOnly<'a>,
}

#[derive(Serialize)]
struct UrlOnly<'a> {
    url: &'a str,
}

impl<'a> ImageUrlPart<'a> {
    fn new(url: &'a str) -> Self {
        ImageUrlPart {
            kind: "image_url",
            image_url: UrlOnly { url },
        }
    }
}

/// A chat message's content: the bare prompt, or text and reference images as parts.
#[derive(Serialize)]
#[serde(untagged)]
enum ChatContent<'a> {
    Text(&'a str),
    Parts(Vec<ChatPart<'a>>),
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatPart<'a> {
    Text {
        #[serde(rename = "type")]
        kind: &'static str,
        text: &'a str,
    },
    Image(ImageUrlPart<'a>),
}

fn chat_content<'a>(request: &ImageRequest<'a>) -> ChatContent<'a> {
    if request.references.is_empty() {
        return ChatContent::Text(request.prompt);
    }
    let mut parts = vec![ChatPart::Text {
        kind: "text",
        text: request.prompt,
    }];
    parts.extend(
        request
            .references
            .iter()
            .map(|url| ChatPart::Image(ImageUrlPart::new(url))),
    );
    ChatContent::Parts(parts)
}

#[derive(Serialize)]
struct ChatRequestBody<'a> {
    model: &'a str,
    messages: [ChatMessageIn<'a>; 1],
    modalities: &'static [&'static str],
    image_config: ImageConfig<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
}

#[derive(Serialize)]
struct ChatMessageIn<'a> {
    role: &'a str,
    content: ChatContent<'a>,
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    aspect_ratio: &'a str,
    image_size: &'a str,
}

/// A JSON string borrowed from the body when it has no escapes (base64 never needs any,
/// though a JSON encoder may still write `\/`), owned otherwise.
///
/// A newtype because serde borrows a `Cow` only when the field is exactly `Cow<str>` with
/// `#[serde(borrow)]`; inside an `Option` it would silently copy every time.
#[derive(Deserialize)]
struct JsonText<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct ImagesAnswer<'a> {
    #[serde(borrow, default)]
    data: Option<Vec<ImageDatum<'a>>>,
    #[serde(default)]
    usage: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ImageDatum<'a> {
    #[serde(borrow, default)]
    b64_json: Option<JsonText<'a>>,
    /// Not promised by the Image API, but handled like the chat path's URLs if it appears.
    #[serde(borrow, default)]
    url: Option<JsonText<'a>>,
    #[serde(borrow, default)]
    media_type: Option<JsonText<'a>>,
}

#[derive(Deserialize)]
struct ChatAnswer<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<ChatChoice<'a>>>,
    #[serde(default)]
    usage: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatChoice<'a> {
    #[serde(borrow, default)]
    message: Option<ChatMessageOut<'a>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessageOut<'a> {
    #[serde(borrow, default)]
    images: Vec<ChatImage<'a>>,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatImage<'a> {
    #[serde(borrow)]
    image_url: ChatImageUrl<'a>,
}

#[derive(Deserialize)]
struct ChatImageUrl<'a> {
    #[serde(borrow)]
    url: JsonText<'a>,
}

/// `usage.cost` in USD. Usage is bookkeeping: a shape we do not expect loses the cost, never
/// the image.
fn cost_of(usage: &serde_json::Value) -> Option<f64> {
    match usage.get("cost")? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|cost: &f64| cost.is_finite())
}

// ---- Errors ---------------------------------------------------------------------------

/// What an error body said, before scrubbing and shortening.
#[derive(Debug, Default, PartialEq)]
struct ErrorDetails {
    /// `error.code` when it is an HTTP-like status.
    code: Option<u16>,
    /// `error.metadata.error_type`, else `error.code`'s text.
    error_type: Option<String>,
    message: Option<String>,
}

impl ErrorDetails {
    fn described(message: impl Into<String>) -> Self {
        ErrorDetails {
            message: Some(message.into()),
            ..ErrorDetails::default()
        }
    }
}

/// Reads `{"error":{"code","message","metadata":{"error_type"}}}`, or whatever else came.
fn parse_error_body(body: &[u8]) -> ErrorDetails {
    match serde_json::from_slice::<serde_json::Value>(body) {
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
                ErrorDetails::described(format!("non-JSON error body: {text}"))
            }
        }
    }
}

/// The `error` member, which is normally an object but is a bare string in some proxies.
fn parse_error_object(error: &serde_json::Value) -> ErrorDetails {
    if let Some(message) = error.as_str() {
        return ErrorDetails::described(message);
    }
    let code_text = match error.get("code") {
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let code = code_text
        .as_deref()
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|c| (100..=599).contains(c));
    let error_type = error
        .get("metadata")
        .and_then(|m| m.get("error_type"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .or(code_text);
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    ErrorDetails {
        code,
        error_type,
        message,
    }
}

/// The docs/design.md §3 classification of an HTTP status.
fn classify(status: u16, failure: ProviderFailure) -> Stage3Error {
    match status {
        401 => Stage3Error::Auth(failure),
        402 => Stage3Error::InsufficientCredits(failure),
        403 => Stage3Error::ContentPolicy(failure),
        // `Timeout` carries text only, so the status travels in it.
        408 => Stage3Error::Timeout(format!("the provider gave up on the request: {failure}")),
        429 => Stage3Error::RateLimited(failure),
        500..=599 => Stage3Error::ProviderUnavailable(failure),
        // 400, 413, 404 (a wrong base URL or model), anything else: our request is wrong.
        _ => Stage3Error::ProviderError(failure),
    }
}

/// A success status with a body we cannot use; the 200 makes it retryable.
fn malformed(message: impl Into<String>) -> Stage3Error {
    Stage3Error::ProviderError(ProviderFailure::new(Some(200), message))
}

fn too_large(status: u16, limit: usize) -> Stage3Error {
    Stage3Error::ProviderError(ProviderFailure::new(
        Some(status),
        format!("the answer is larger than STAGE3_MAX_RESPONSE_BYTES ({limit} bytes)"),
    ))
}

fn transport_error(error: reqwest::Error, what: &str, budget: Duration) -> Stage3Error {
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
        Stage3Error::Timeout(format!(
            "{what} did not finish within {}",
            humantime::format_duration(budget)
        ))
    } else {
        Stage3Error::ProviderUnavailable(ProviderFailure::new(
            None,
            format!("{what} failed: {}", error_chain(&error)),
        ))
    }
}

/// The time left before `deadline`, or a timeout if there is none.
fn remaining(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Stage3Error::Timeout(format!(
            "no time left to start {what}"
        )))
    } else {
        Ok(left)
    }
}

/// reqwest's own message is "error sending request"; the cause is further down the chain.
fn error_chain(error: &reqwest::Error) -> String {
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

/// One line of at most [`MAX_MESSAGE_CHARS`] characters.
fn shorten(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE_CHARS + 3));
    for (count, c) in text.trim().chars().enumerate() {
        if count == MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the past
/// means "now".
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
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

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads the body chunk by chunk, stopping as soon as it passes `limit`.
async fn read_body(response: &mut Response, limit: usize) -> Result<Bytes, BodyError> {
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
struct DataUrl<'a> {
    media_type: Option<&'a str>,
    base64: &'a str,
}

/// Parses `data:<media type>[;parameters];base64,<payload>` (RFC 2397). Only base64 payloads
/// are accepted: a percent-encoded image is not something any provider sends.
fn parse_data_url(url: &str) -> Result<DataUrl<'_>, &'static str> {
    let rest = url
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case("data:"))
        .map(|_| &url[5..])
        .ok_or("not a data: URL")?;
    let (header, payload) = rest.split_once(',').ok_or("a data: URL without a comma")?;
    let mut parts = header.split(';');
    let media_type = parts.next().map(str::trim).filter(|t| !t.is_empty());
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err("a data: URL that is not base64-encoded");
    }
    Ok(DataUrl {
        media_type,
        base64: payload,
    })
}

/// Decodes raw base64, or a `data:` URL around it, into the image bytes.
fn decode_inline_image(text: &str) -> Result<ProviderImage> {
    let text = text.trim();
    let is_data_url = text
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"));
    let (claimed, payload) = if is_data_url {
        let url = parse_data_url(text)
            .map_err(|why| malformed(format!("cannot use the image: {why}")))?;
        (url.media_type.map(str::to_string), url.base64)
    } else {
        (None, text)
    };
    let bytes = decode_base64(payload.trim())
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

fn decode_base64(payload: &str) -> Result<Bytes, base64::DecodeError> {
    // Line-wrapped base64 (MIME style) needs its whitespace gone; the common case has none
    // and is decoded in place, without a copy.
    let unwrapped: Cow<'_, str> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(payload.split_ascii_whitespace().collect())
    } else {
        Cow::Borrowed(payload)
    };
    match BASE64.decode(unwrapped.as_bytes()) {
        Ok(bytes) => Ok(Bytes::from(bytes)),
        Err(standard_error) if unwrapped.contains(['-', '_']) => BASE64_URL_SAFE
            .decode(unwrapped.as_bytes())
            .map(Bytes::from)
            .map_err(|_| standard_error),
        Err(error) => Err(error),
    }
}

/// Follows a few redirects, but never from `https` down to `http`.
fn refuse_downgrades(attempt: redirect::Attempt<'_>) -> redirect::Action {
    let downgrade = attempt.url().scheme() == "http"
        && attempt
            .previous()
            .iter()
            .any(|previous| previous.scheme() == "https");
    if downgrade {
        attempt.error("refusing a redirect from https to http")
    } else if attempt.previous().len() > MAX_REDIRECTS {
        attempt.error("too many redirects")
    } else {
        attempt.follow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openrouter_error_bodies_give_code_type_and_message() {
        let body = br#"{"error":{"code":403,"message":"Input was flagged","metadata":{"error_type":"content_policy_violation","reasons":["violence"]}}}"#;
        assert_eq!(
            parse_error_body(body),
            ErrorDetails {
                code: Some(403),
                error_type: Some("content_policy_violation".into()),
                message: Some("Input was flagged".into()),
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
    fn statuses_are_classified_as_designed() {
        let kind = |status| classify(status, ProviderFailure::new(Some(status), "m")).error_type();
        use crate::error::ErrorType::*;
        for (status, expected) in [
            (400, ProviderError),
            (401, Auth),
            (402, InsufficientCredits),
            (403, ContentPolicy),
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
            parse_data_url("data:image/png;base64,iVBORw0KGgo="),
            Ok(DataUrl {
                media_type: Some("image/png"),
                base64: "iVBORw0KGgo="
            })
        );
        assert_eq!(
            parse_data_url("DATA:image/jpeg;name=x.jpg;BASE64,/9j/"),
            Ok(DataUrl {
                media_type: Some("image/jpeg"),
                base64: "/9j/"
            })
        );
        assert_eq!(
            parse_data_url("data:;base64,AAAA"),
            Ok(DataUrl {
                media_type: None,
                base64: "AAAA"
            })
        );
        assert!(parse_data_url("data:image/png,%89PNG").is_err());
        assert!(parse_data_url("data:image/png;base64").is_err());
        assert!(parse_data_url("https://example.com/x.png").is_err());
        assert!(parse_data_url("dat").is_err());
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

    #[test]
    fn unescaped_image_strings_are_borrowed_from_the_body() {
        let body = br#"{"data":[{"b64_json":"QUJD","media_type":"image/png"}]}"#;
        let answer: ImagesAnswer<'_> = serde_json::from_slice(body).unwrap();
        let datum = &answer.data.unwrap()[0];
        assert!(matches!(
            datum.b64_json.as_ref().unwrap().0,
            Cow::Borrowed("QUJD")
        ));

        // An escaped `/` cannot be borrowed, but must still be read.
        let body = br#"{"data":[{"b64_json":"QU\/D"}]}"#;
        let answer: ImagesAnswer<'_> = serde_json::from_slice(body).unwrap();
        let datum = &answer.data.unwrap()[0];
        assert_eq!(datum.b64_json.as_ref().unwrap().0, "QU/D");
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

    #[test]
    fn cost_is_read_leniently() {
        let cost = |v: serde_json::Value| cost_of(&v);
        assert_eq!(cost(serde_json::json!({"cost": 0.039})), Some(0.039));
        assert_eq!(cost(serde_json::json!({"cost": "0.5"})), Some(0.5));
        assert_eq!(cost(serde_json::json!({"cost": null})), None);
        assert_eq!(cost(serde_json::json!({"prompt_tokens": 3})), None);
    }
}
