//! The OpenRouter client: the Image API (`POST /images`) and the chat path
//! (`POST /chat/completions` with image modalities), checked against OpenRouter's image
//! catalogue before any paid call.
//!
//! - [`errors`]: OpenRouter's typed error answers, classified into [`Stage3Error`]s.
//! - [`catalogue`]: the image-model catalogue and endpoint prices, read lazily and cached;
//!   which parameters to send a model and what an image costs.
//! - [`fetch`]: fetching image URLs without reaching private networks.
//!
//! One `reqwest::Client` per purpose (the API, image URLs), so every scene reuses the same
//! connection pools. Each call spends one `ImageRequest::budget`, connect to last byte
//! of every step (the POST, then any image download). Answers are read chunk by chunk against `max_response_bytes`, so an
//! oversized body is refused as soon as it crosses the line rather than after it has filled
//! memory. Image data stays borrowed from the body buffer until it is decoded, once, into
//! `Bytes`.
//!
//! The API key is sent only in the `Authorization` header of generation calls, which is
//! marked sensitive, and is scrubbed from any text the provider sends back. The catalogue
//! needs no key (OpenRouter's OpenAPI description puts no security on it) and gets none.

mod catalogue;
mod errors;
mod fetch;

use std::borrow::Cow;
use std::error::Error as _;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, Response};
use serde::{Deserialize, Serialize};

use super::{ImageProvider, ImageRequest, Plan, PlannedModel, ProviderIdentity, ProviderImage};
use crate::config::{ChatModalities, OpenRouterApi, OpenRouterSettings, Secret};
use crate::deadline::CallBudget;
use crate::error::{ProviderFailure, Result, Stage3Error};
use crate::image_spec::ImageSpec;
use crate::schema::{ImageQuality, ImageSize};
use catalogue::{Catalogue, CatalogueModel, Models, WireParams};
use errors::{classify, parse_error_body, parse_error_object, shorten, shorten_slug, ErrorDetails};
use fetch::AddressPolicy;

/// An error answer is only read for its message; more than this is not worth holding.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// The catalogue is a few hundred models; more than this is not a catalogue.
const MAX_CATALOGUE_BYTES: usize = 4 * 1024 * 1024;
/// A catalogue read may not hold up the first scene for long.
const CATALOGUE_TIMEOUT: Duration = Duration::from_secs(15);

/// `native_finish_reason`s with which a model says it will not draw this (Gemini's and
/// others' safety stops). Any of these, or `finish_reason: content_filter`, with no image
/// is a refusal: retrying pays for the same refusal again.
const REFUSAL_REASONS: &[&str] = &[
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "IMAGE_OTHER",
    "NO_IMAGE",
    "SAFETY",
    "RECITATION",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "CONTENT_FILTER",
];

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

/// Generates images through OpenRouter. Build it once; it holds the connection pools and
/// the catalogue cache.
pub struct OpenRouterProvider {
    client: Client,
    /// For image URLs only: filtered addresses, no `Referer`, never the key.
    image_client: Client,
    address_policy: AddressPolicy,
    base_url: String,
    api: OpenRouterApi,
    chat_modalities: ChatModalities,
    /// `Authorization` (marked sensitive) and the optional attribution headers, sent on
    /// generation calls only — never on fetches of image URLs, which may be on someone
    /// else's host, nor on the catalogue, which needs no key.
    api_headers: HeaderMap,
    /// Kept only to scrub it from anything the provider echoes back.
    api_key: Option<Secret>,
    max_response_bytes: usize,
    catalogue: Catalogue,
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

/// One image model as `stage3 models` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelListing {
    pub id: String,
    pub name: String,
    /// `resolution` values (`1K`, `2K`, …); empty when the model takes none.
    pub resolutions: Vec<String>,
    /// `aspect_ratio` values; empty when the model takes none.
    pub aspect_ratios: Vec<String>,
    /// `quality` values (gpt-image models); empty when the model takes none.
    pub qualities: Vec<String>,
    pub takes_seed: bool,
    /// The price of one standard 1024x1024 image, in USD, when the endpoints say.
    pub price_per_image_usd: Option<f64>,
    /// The price of one hd image, when the model makes them and the endpoints say.
    pub hd_price_per_image_usd: Option<f64>,
}

impl OpenRouterProvider {
    /// The generating client: needs `OPENROUTER_API_KEY`.
    pub fn new(settings: &OpenRouterSettings) -> Result<Self> {
        let api_key = settings
            .api_key
            .clone()
            .filter(|key| !key.expose().trim().is_empty())
            .ok_or_else(|| Stage3Error::config("OPENROUTER_API_KEY is not set"))?;
        Self::build(settings, Some(api_key))
    }

    /// A client for the catalogue alone (`stage3 models`, `stage3 validate`): no key needed.
    /// [`ImageProvider::generate`] on it fails with a configuration error.
    pub fn for_catalogue(settings: &OpenRouterSettings) -> Result<Self> {
        let key = settings
            .api_key
            .clone()
            .filter(|key| !key.expose().trim().is_empty());
        Self::build(settings, key)
    }

    fn build(settings: &OpenRouterSettings, api_key: Option<Secret>) -> Result<Self> {
        let mut api_headers = HeaderMap::new();
        if let Some(key) = &api_key {
            let mut authorization =
                HeaderValue::from_str(&format!("Bearer {}", key.expose().trim())).map_err(
                    |_| {
                        Stage3Error::config(
                            "OPENROUTER_API_KEY contains characters not allowed in an HTTP header",
                        )
                    },
                )?;
            authorization.set_sensitive(true);
            api_headers.insert(AUTHORIZATION, authorization);
        }
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

        let build_error = |e: reqwest::Error| {
            Stage3Error::config(format!("cannot build the HTTP client: {}", error_chain(&e)))
        };
        let client = Client::builder()
            .tls_backend_rustls()
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("stage3/", env!("CARGO_PKG_VERSION")))
            .redirect(fetch::api_redirects())
            .referer(false)
            .build()
            .map_err(build_error)?;
        let address_policy = AddressPolicy {
            allow_loopback: settings.allow_loopback_image_urls,
        };
        let image_client =
            fetch::image_client(address_policy, settings.connect_timeout).map_err(build_error)?;

        Ok(OpenRouterProvider {
            client,
            image_client,
            address_policy,
            base_url: settings.base_url.trim_end_matches('/').to_string(),
            api: settings.api,
            chat_modalities: settings.chat_modalities,
            api_headers,
            api_key,
            max_response_bytes: settings.max_response_bytes,
            catalogue: Catalogue::default(),
        })
    }

    /// The image models of the catalogue with what `--model` users need to choose: sizes,
    /// qualities and the price of one image. Fails when the catalogue cannot be read.
    pub async fn image_models(&self) -> Result<Vec<ModelListing>> {
        let models = self.fetch_models().await.map_err(|why| {
            Stage3Error::ProviderUnavailable(ProviderFailure::new(
                None,
                format!("cannot read OpenRouter's image catalogue: {why}"),
            ))
        })?;
        let mut listings = Vec::with_capacity(models.len());
        let mut ids: Vec<&String> = models.keys().collect();
        ids.sort();
        for id in ids {
            let model = &models[id];
            let pricing = self.catalogue.pricing(id, || self.fetch_pricing(id)).await;
            // The listed prices are for a plain 1024x1024 image.
            let price = |quality| {
                let plain = ImageSpec {
                    model: model.id.clone(),
                    prompt: String::new(),
                    size: ImageSize::Square,
                    quality,
                    seed: None,
                    references: Vec::new(),
                };
                let params = catalogue::wire_params(Some(model), &plain).ok()?;
                catalogue::estimate(pricing.as_deref()?, &params, &plain)
            };
            listings.push(ModelListing {
                id: model.id.clone(),
                name: model.name.clone(),
                resolutions: model.listed("resolution"),
                aspect_ratios: model.listed("aspect_ratio"),
                qualities: model.listed("quality"),
                takes_seed: model.params.contains_key("seed"),
                price_per_image_usd: price(ImageQuality::Standard),
                hd_price_per_image_usd: price(ImageQuality::Hd),
            });
        }
        Ok(listings)
    }

    /// The catalogue's models: cached, read when first needed; `None` when unreadable.
    async fn models(&self) -> Option<std::sync::Arc<Models>> {
        self.catalogue.models(|| self.fetch_models()).await
    }

    async fn fetch_models(&self) -> std::result::Result<Models, String> {
        let body = self.get_catalogue("/images/models").await?;
        catalogue::parse_models(&body)
    }

    async fn fetch_pricing(&self, model: &str) -> std::result::Result<catalogue::Pricing, String> {
        let body = self
            .get_catalogue(&format!("/images/models/{model}/endpoints"))
            .await?;
        catalogue::parse_pricing(&body)
    }

    /// GETs a discovery path: no key, a short budget, a small cap.
    async fn get_catalogue(&self, path: &str) -> std::result::Result<Bytes, String> {
        let mut response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .timeout(CATALOGUE_TIMEOUT)
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
        match read_body(&mut response, MAX_CATALOGUE_BYTES).await {
            Ok(body) => Ok(body),
            Err(BodyError::TooLarge) => Err(format!("GET {} answered too much", shorten(path))),
            Err(BodyError::Transport(e)) => Err(error_chain(&e.without_url())),
        }
    }

    /// The parameters to send for `request`: checked against the catalogue when it has been
    /// read (never read here: no I/O on the call path), the default mapping otherwise.
    fn wire_params(&self, request: &ImageRequest<'_>) -> Result<WireParams> {
        let model = self.catalogue.cached_model(request.model);
        catalogue::wire_params(model.as_ref(), request.spec).map_err(Stage3Error::invalid_request)
    }

    async fn generate_with_images_api(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let params = self.wire_params(request)?;
        let body = ImagesRequestBody {
            model: request.model,
            prompt: request.prompt(),
            n: 1,
            aspect_ratio: params.aspect_ratio,
            resolution: params.resolution,
            quality: params.quality,
            size: params.size.as_deref(),
            output_format: "png",
            seed: params.seed,
            input_references: request
                .spec
                .references
                .iter()
                .map(|url| ImageUrlPart::new(url))
                .collect(),
        };
        let answer = self.post_json("/images", &body, request).await?;
        let parsed: ImagesAnswer<'_> = self.parse_answer(&answer)?;
        let cost = parsed.usage.as_ref().and_then(cost_of);
        if let Some(error) = &parsed.error {
            return Err(with_cost(self.error_in_success(error, request.model), cost));
        }
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
        let claimed = datum.media_type.map(|t| shorten(&t.0));
        let mut image = match (datum.b64_json, datum.url) {
            (Some(b64), _) => decode_inline_image(&b64.0)?,
            (None, Some(url)) => self.fetch_image_url(&url.0, request).await?,
            (None, None) => return Err(malformed("the image entry has no `b64_json`")),
        };
        image.claimed_media_type = claimed.or(image.claimed_media_type);
        image.cost = cost;
        Ok(image)
    }

    async fn generate_with_chat(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let params = self.wire_params(request)?;
        let body = ChatRequestBody {
            model: request.model,
            messages: [ChatMessageIn {
                role: "user",
                content: chat_content(request),
            }],
            modalities: self.chat_modalities.as_slice(),
            image_config: ImageConfig {
                aspect_ratio: params.aspect_ratio,
                image_size: params.resolution,
            },
            seed: params.seed,
        };
        let answer = self.post_json("/chat/completions", &body, request).await?;
        let parsed: ChatAnswer<'_> = self.parse_answer(&answer)?;
        let cost = parsed.usage.as_ref().and_then(cost_of);
        if let Some(error) = &parsed.error {
            return Err(with_cost(self.error_in_success(error, request.model), cost));
        }
        let choice = parsed
            .choices
            .and_then(|choices| choices.into_iter().next())
            .ok_or_else(|| malformed("the answer has no `choices`"))?;
        // "Skin-specific error formats": a provider error inside the choice.
        if let Some(error) = &choice.error {
            return Err(with_cost(self.error_in_success(error, request.model), cost));
        }
        let images = choice
            .message
            .as_ref()
            .map(|m| m.images.as_slice())
            .unwrap_or_default();
        let Some(image) = images.first() else {
            return Err(self.no_image(request.model, &choice, cost));
        };
        let mut image = self
            .fetch_image_url(&image.image_url.url.0, request)
            .await?;
        image.cost = cost;
        Ok(image)
    }

    /// A chat answer without an image: a refusal when a safety filter says so (never
    /// retried, the prompt may be billed), otherwise a malformed answer worth one more try.
    fn no_image(&self, model: &str, choice: &ChatChoice<'_>, cost: Option<f64>) -> Stage3Error {
        let finish = choice
            .finish_reason
            .as_deref()
            .map(|r| self.provider_text(r));
        let native = choice
            .native_finish_reason
            .as_deref()
            .map(|r| self.provider_text(r));
        let said = match choice.message.as_ref().and_then(|m| m.content.as_ref()) {
            Some(serde_json::Value::String(text)) if !text.trim().is_empty() => {
                format!("; it said: {}", self.provider_text(text))
            }
            _ => String::new(),
        };
        let reasons = [
            ("finish_reason", &finish),
            ("native_finish_reason", &native),
        ]
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name} {v:?}")))
        .collect::<Vec<_>>()
        .join(", ");
        let reasons = if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({reasons})")
        };
        let refused = finish.as_deref() == Some("content_filter")
            || native
                .as_deref()
                .is_some_and(|n| REFUSAL_REASONS.iter().any(|r| n.eq_ignore_ascii_case(r)));
        let model = shorten_slug(model);
        if refused {
            let mut failure = ProviderFailure::new(
                Some(200),
                format!("{model} refused to draw this prompt{reasons}{said}"),
            );
            failure.provider_error_type = Some("refusal".into());
            failure.cost = cost;
            Stage3Error::ContentPolicy(failure)
        } else {
            malformed(format!("{model} returned no image{reasons}{said}"))
        }
    }

    /// POSTs `body` to `{base}{path}` and returns the 2xx answer's body, read within the cap.
    async fn post_json(
        &self,
        path: &str,
        body: &impl Serialize,
        request: &ImageRequest<'_>,
    ) -> Result<Bytes> {
        if self.api_key.is_none() {
            return Err(Stage3Error::config("OPENROUTER_API_KEY is not set"));
        }
        let model = request.model;
        let endpoint = format!("POST {path}");
        let budget = request.budget;
        let left = budget.remaining(&endpoint)?;
        let started = Instant::now();
        let mut response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .headers(self.api_headers.clone())
            .json(body)
            .timeout(left)
            .send()
            .await
            .map_err(|e| transport_error(e, &endpoint, &budget))?;
        let status = response.status();
        tracing::debug!(
            endpoint = %endpoint,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "openrouter answered"
        );
        if !status.is_success() {
            return Err(self.error_answer(&mut response, model).await);
        }
        match read_body(&mut response, self.max_response_bytes).await {
            Ok(bytes) => Ok(bytes),
            Err(BodyError::TooLarge) => Err(too_large(status.as_u16(), self.max_response_bytes)),
            Err(BodyError::Transport(e)) => Err(transport_error(e, &endpoint, &budget)),
        }
    }

    /// Turns a non-2xx answer into a classified error (see [`errors::classify`]).
    async fn error_answer(&self, response: &mut Response, model: &str) -> Stage3Error {
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
        let availability = details.availability.clone();
        let mut failure = self.failure(Some(status), details);
        failure.retry_after = retry_after;
        classify(status, failure, availability.as_ref(), model)
    }

    /// OpenRouter sometimes reports a failure inside a 200 answer; its `code` is the status
    /// it would have had.
    fn error_in_success(&self, error: &serde_json::Value, model: &str) -> Stage3Error {
        let details = parse_error_object(error);
        let availability = details.availability.clone();
        match details.code {
            Some(code) if code >= 400 => {
                let mut failure = self.failure(Some(code), details);
                failure.message = format!("{} (reported inside a 200 answer)", failure.message);
                classify(code, failure, availability.as_ref(), model)
            }
            _ if details.error_type.is_some() || availability.is_some() => {
                let failure = self.failure(Some(200), details);
                classify(200, failure, availability.as_ref(), model)
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
            cost: None,
        }
    }

    /// Provider text made safe to show: the key scrubbed, one line, at most a few hundred
    /// characters.
    fn provider_text(&self, text: &str) -> String {
        let key = self
            .api_key
            .as_ref()
            .map(|k| k.expose().trim())
            .unwrap_or("");
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
            let path = shorten(&e.path().to_string());
            // serde_json quotes the offending value, which could be a multi-MB string.
            let cause = self.provider_text(&e.into_inner().to_string());
            malformed(format!(
                "the answer is not the expected JSON (at `{path}`: {cause})"
            ))
        })
    }

    /// An image given by URL: a `data:` URL is decoded; an `https` URL is fetched with the
    /// image client (public addresses only), the same cap and the remaining budget; plain
    /// `http` is refused (anyone on the path could swap the picture).
    async fn fetch_image_url(
        &self,
        url: &str,
        request: &ImageRequest<'_>,
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
        let budget = request.budget;
        let left = budget.remaining(&what)?;
        let mut response = self
            .image_client
            .get(parsed)
            .timeout(left)
            .send()
            .await
            .map_err(|e| transport_error(e, &what, &budget))?;
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
            Err(BodyError::Transport(e)) => return Err(transport_error(e, &what, &budget)),
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

    /// The plan for one model of the chain: its parameters checked and its price estimated,
    /// or why it cannot serve (`Err`), or `None` when the catalogue says it does not exist.
    async fn plan_model(
        &self,
        models: Option<&Models>,
        model: &str,
        spec: &ImageSpec,
    ) -> Option<std::result::Result<PlannedModel, String>> {
        let Some(models) = models else {
            // Unchecked: no catalogue, no prices.
            return Some(Ok(PlannedModel {
                model: model.to_string(),
                estimate_usd: None,
            }));
        };
        let entry: &CatalogueModel = models.get(model)?;
        let params = match catalogue::wire_params(Some(entry), spec) {
            Ok(params) => params,
            Err(why) => return Some(Err(why)),
        };
        let pricing = self
            .catalogue
            .pricing(model, || self.fetch_pricing(model))
            .await;
        let estimate_usd = pricing
            .as_deref()
            .and_then(|p| catalogue::estimate(p, &params, spec));
        Some(Ok(PlannedModel {
            model: model.to_string(),
            estimate_usd,
        }))
    }
}

/// Records what a failed call was billed, when the answer said.
fn with_cost(mut error: Stage3Error, cost: Option<f64>) -> Stage3Error {
    if let Stage3Error::Auth(f)
    | Stage3Error::InsufficientCredits(f)
    | Stage3Error::ContentPolicy(f)
    | Stage3Error::RateLimited(f)
    | Stage3Error::ProviderUnavailable(f)
    | Stage3Error::ProviderError(f)
    | Stage3Error::PermissionDenied(f) = &mut error
    {
        f.cost = f.cost.or(cost);
    }
    error
}

#[async_trait]
impl ImageProvider for OpenRouterProvider {
    fn identity(&self) -> ProviderIdentity {
        ProviderIdentity {
            name: "openrouter",
            variant: Some(self.api.as_str()),
        }
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let image = match self.api {
            OpenRouterApi::Images => self.generate_with_images_api(request).await,
            OpenRouterApi::Chat => self.generate_with_chat(request).await,
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

    /// Checks the scene against the catalogue: the asked-for model must exist (else the
    /// fallbacks serve, or a `model_unavailable` names close alternatives) and be able to
    /// serve the request (else `invalid_request` naming what it supports); fallbacks that
    /// cannot serve it are left out. Without a catalogue, everything passes unchecked.
    async fn plan(&self, spec: &ImageSpec, fallbacks: &[String]) -> Result<Plan> {
        let models = self.models().await;
        let Some(primary) = self.plan_model(models.as_deref(), &spec.model, spec).await else {
            return self
                .plan_without_primary(spec, fallbacks, models.as_deref())
                .await;
        };
        let primary = primary.map_err(Stage3Error::invalid_request)?;
        let mut plan = Plan {
            models: vec![primary],
        };
        self.add_fallbacks(&mut plan, spec, fallbacks, models.as_deref())
            .await;
        Ok(plan)
    }
}

impl OpenRouterProvider {
    async fn add_fallbacks(
        &self,
        plan: &mut Plan,
        spec: &ImageSpec,
        fallbacks: &[String],
        models: Option<&Models>,
    ) -> Vec<String> {
        let mut skipped = Vec::new();
        for fallback in fallbacks {
            if plan.models.iter().any(|m| &m.model == fallback) || *fallback == spec.model {
                continue;
            }
            match self.plan_model(models, fallback, spec).await {
                Some(Ok(planned)) => plan.models.push(planned),
                Some(Err(why)) => skipped.push(why),
                None => skipped.push(format!(
                    "{} is not in the catalogue",
                    shorten_slug(fallback)
                )),
            }
        }
        if !skipped.is_empty() {
            tracing::warn!(
                skipped = %skipped.join("; "),
                "fallback models left out of the chain"
            );
        }
        skipped
    }

    /// The asked-for model is not in the catalogue: fallbacks serve, with a warning, or the
    /// scene fails naming close alternatives.
    async fn plan_without_primary(
        &self,
        spec: &ImageSpec,
        fallbacks: &[String],
        models: Option<&Models>,
    ) -> Result<Plan> {
        let mut plan = Plan { models: Vec::new() };
        let skipped = self.add_fallbacks(&mut plan, spec, fallbacks, models).await;
        let model = shorten_slug(&spec.model);
        if let Some(first) = plan.models.first() {
            tracing::warn!(
                requested_model = %model,
                model = %first.model,
                "the requested model is not in OpenRouter's image catalogue; using the fallback"
            );
            return Ok(plan);
        }
        let alternatives = models
            .map(|m| catalogue::alternatives(m, &spec.model))
            .unwrap_or_default();
        let mut message = format!(
            "{model} is not in OpenRouter's image catalogue (retired, renamed or misspelt)"
        );
        if !skipped.is_empty() {
            message.push_str(&format!("; fallbacks: {}", skipped.join("; ")));
        }
        if !alternatives.is_empty() {
            message.push_str(&format!(
                "; close alternatives: {} (see `stage3 models`)",
                alternatives.join(", ")
            ));
        }
        Err(Stage3Error::ModelUnavailable(message))
    }
}

// ---- Wire shapes ----------------------------------------------------------------------

#[derive(Serialize)]
struct ImagesRequestBody<'a> {
    model: &'a str,
    prompt: &'a str,
    n: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect_ratio: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolution: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<&'a str>,
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
    let spec = request.spec;
    if spec.references.is_empty() {
        return ChatContent::Text(&spec.prompt);
    }
    let mut parts = vec![ChatPart::Text {
        kind: "text",
        text: &spec.prompt,
    }];
    parts.extend(
        spec.references
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
    #[serde(skip_serializing_if = "Option::is_none")]
    aspect_ratio: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_size: Option<&'a str>,
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
    /// Read whole but only ever shown shortened: a provider once sent 8 MB here.
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    native_finish_reason: Option<String>,
    #[serde(default)]
    error: Option<serde_json::Value>,
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

fn transport_error(error: reqwest::Error, what: &str, budget: &CallBudget) -> Stage3Error {
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
    fn cost_is_read_leniently() {
        let cost = |v: serde_json::Value| cost_of(&v);
        assert_eq!(cost(serde_json::json!({"cost": 0.039})), Some(0.039));
        assert_eq!(cost(serde_json::json!({"cost": "0.5"})), Some(0.5));
        assert_eq!(cost(serde_json::json!({"cost": null})), None);
        assert_eq!(cost(serde_json::json!({"prompt_tokens": 3})), None);
    }
}
