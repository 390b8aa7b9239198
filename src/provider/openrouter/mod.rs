//! The OpenRouter client: the Image API (`POST /images`) and the chat path
//! (`POST /chat/completions` with image modalities), checked against OpenRouter's image
//! catalogue before any paid call.
//!
//! - [`errors`]: OpenRouter's typed error answers, classified into [`Stage3Error`]s.
//! - [`catalogue`]: the image-model catalogue and endpoint prices, read lazily and cached;
//!   which parameters to send a model and what an image costs.
//!
//! The HTTP side — the key's header, bounded reads, the call budget, safe image fetches —
//! is [`super::http`], shared with the other providers. Image data stays borrowed from the
//! body buffer until it is decoded, once, into `Bytes`. The catalogue needs no key
//! (OpenRouter's OpenAPI description puts no security on it) and gets none.

mod catalogue;
mod errors;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::http::{
    malformed, shorten, shorten_slug, with_cost, AnswerImage, ApiClient, ErrorAnswer, InlineText,
    JsonBytes, JsonText,
};
use super::{
    ImageProvider, ImageRequest, ModelCheck, ModelListing, ProviderIdentity, ProviderImage,
};
use crate::error::{ProviderFailure, Result, Stage3Error};
use crate::image_spec::{ImageSpec, ProviderKind};
use crate::provider::{ChatModalities, OpenRouterApi, OpenRouterSettings};
use crate::schema::{ImageQuality, ImageSize};
use catalogue::{Catalogue, Models, WireParams};
use errors::{classify, parse_error_body, parse_error_object, ErrorDetails};

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

/// Generates images through OpenRouter. Build it once; it holds the connection pools and
/// the catalogue cache.
pub struct OpenRouterProvider {
    http: ApiClient,
    api: OpenRouterApi,
    chat_modalities: ChatModalities,
    /// `STAGE3_PRICES` entries, over the catalogue's prices.
    prices: std::collections::HashMap<String, f64>,
    catalogue: Catalogue,
}

impl fmt::Debug for OpenRouterProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenRouterProvider")
            .field("base_url", &self.http.base_url())
            .field("api", &self.api)
            .field("has_key", &self.http.has_key())
            .finish_non_exhaustive()
    }
}

impl OpenRouterProvider {
    /// The generating client: needs `OPENROUTER_API_KEY`.
    pub fn new(settings: &OpenRouterSettings) -> Result<Self> {
        if settings
            .api_key
            .as_ref()
            .is_none_or(|key| key.expose().trim().is_empty())
        {
            return Err(Stage3Error::config("OPENROUTER_API_KEY is not set"));
        }
        Self::for_catalogue(settings)
    }

    /// A client for the catalogue alone (`stage3 models`, `stage3 validate`) when no key is
    /// set: [`ImageProvider::generate`] on it fails with a configuration error.
    pub(crate) fn for_catalogue(settings: &OpenRouterSettings) -> Result<Self> {
        let mut headers = HeaderMap::new();
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
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        Ok(OpenRouterProvider {
            http: ApiClient::new(
                "openrouter",
                &settings.base_url,
                settings.api_key.clone(),
                "OPENROUTER_API_KEY",
                headers,
                &settings.http,
            )?,
            api: settings.api,
            chat_modalities: settings.chat_modalities,
            prices: settings.prices.clone(),
            catalogue: Catalogue::default(),
        })
    }

    /// The image models of the catalogue with what `--model` users need to choose: sizes,
    /// qualities and the price of one image. Fails when the catalogue cannot be read.
    pub(crate) async fn image_models(&self) -> Result<Vec<ModelListing>> {
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
                if let Some(price) = self.prices.get(id) {
                    return Some(*price);
                }
                let plain = ImageSpec::plain(
                    crate::image_spec::ModelRef {
                        provider: ProviderKind::OpenRouter,
                        model: model.id.clone(),
                    },
                    ImageSize::Square,
                    quality,
                );
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
                takes_references: model.takes_references(),
                price_per_image_usd: price(ImageQuality::Standard),
                hd_price_per_image_usd: price(ImageQuality::Hd),
                ..ModelListing::default()
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
        self.http
            .get_unauthenticated(path, CATALOGUE_TIMEOUT, MAX_CATALOGUE_BYTES)
            .await
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
        // What the image is, found in the parsed answer; the answer's buffer is then given
        // up to the decoder, which writes the image into it.
        let (source, claimed, cost) = {
            let parsed: ImagesAnswer<'_> = self.http.parse_answer(&answer)?;
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
            let source = match (datum.b64_json, datum.url) {
                (Some(b64), _) => AnswerImage::Inline(InlineText::locate(&b64.0, &answer)),
                (None, Some(url)) => AnswerImage::Url(url.0.into_owned()),
                (None, None) => return Err(malformed("the image entry has no `b64_json`")),
            };
            (source, claimed, cost)
        };
        let mut image = self.http.image_of(source, answer, &request.budget).await?;
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
        // As in `generate_with_images_api`: found in the parsed answer, then decoded into
        // the answer's own buffer.
        let (source, cost) = {
            let parsed: ChatAnswer<'_> = self.http.parse_answer(&answer)?;
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
            let url = &image.image_url.url.0;
            let source = if url
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"data:"))
            {
                AnswerImage::Inline(InlineText::locate(url, &answer))
            } else {
                AnswerImage::Url(
                    std::str::from_utf8(url)
                        .map_err(|_| malformed("the image URL is not valid UTF-8"))?
                        .to_string(),
                )
            };
            (source, cost)
        };
        let mut image = self.http.image_of(source, answer, &request.budget).await?;
        image.cost = cost;
        Ok(image)
    }

    /// A chat answer without an image: a refusal when a safety filter says so (never
    /// retried, the prompt may be billed), otherwise a malformed answer worth one more try.
    fn no_image(&self, model: &str, choice: &ChatChoice<'_>, cost: Option<f64>) -> Stage3Error {
        let finish = choice
            .finish_reason
            .as_deref()
            .map(|r| self.http.provider_text(r));
        let native = choice
            .native_finish_reason
            .as_deref()
            .map(|r| self.http.provider_text(r));
        let said = match choice.message.as_ref().and_then(|m| m.content.as_ref()) {
            Some(serde_json::Value::String(text)) if !text.trim().is_empty() => {
                format!("; it said: {}", self.http.provider_text(text))
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

    /// POSTs `body` to `{base}{path}` and returns the 2xx answer's body; an error answer
    /// is classified (see [`errors::classify`]).
    async fn post_json(
        &self,
        path: &str,
        body: &impl Serialize,
        request: &ImageRequest<'_>,
    ) -> Result<Bytes> {
        match self.http.post_json(path, body, request).await? {
            Ok(bytes) => Ok(bytes),
            Err(answer) => Err(self.error_answer(answer, request.model)),
        }
    }

    /// Turns a non-2xx answer into a classified error. The status alone classifies the
    /// failure; a body that is too big or cut off only costs us the provider's explanation.
    fn error_answer(&self, answer: ErrorAnswer, model: &str) -> Stage3Error {
        let details = match &answer.body {
            Ok(body) => parse_error_body(body),
            Err(why) => ErrorDetails::described(why.clone()),
        };
        let availability = details.availability.clone();
        let mut failure = self.failure(Some(answer.status), details);
        failure.retry_after = answer.retry_after;
        classify(answer.status, failure, availability.as_ref(), model)
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
        self.http.failure(
            status,
            details.error_type.as_deref(),
            details.message.as_deref(),
        )
    }
}

#[async_trait]
impl ImageProvider for OpenRouterProvider {
    fn identity(&self) -> ProviderIdentity {
        ProviderIdentity {
            kind: ProviderKind::OpenRouter,
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

    /// Checks `model` against the catalogue: it must exist (else `model_unavailable`
    /// naming close alternatives) and be able to serve the spec (else `invalid_request`
    /// naming what it supports); the price comes from its endpoints, or `STAGE3_PRICES`.
    /// Without a catalogue, everything passes unchecked and unpriced.
    async fn check(&self, spec: &ImageSpec, model: &str) -> Result<ModelCheck> {
        if !is_slug(model) {
            return Err(Stage3Error::invalid_request(format!(
                "{} is not an OpenRouter model slug (vendor/name, or vendor/name:variant)",
                shorten_slug(model)
            )));
        }
        let override_price = self.prices.get(model).copied();
        let Some(models) = self.models().await else {
            return Ok(ModelCheck {
                estimate_usd: override_price,
                takes_references: None,
            });
        };
        let Some(entry) = models.get(model) else {
            let alternatives = catalogue::alternatives(&models, model);
            let mut message = format!(
                "{} is not in OpenRouter's image catalogue (retired, renamed or misspelt)",
                shorten_slug(model)
            );
            if !alternatives.is_empty() {
                message.push_str(&format!(
                    "; close alternatives: {} (see `stage3 models`)",
                    alternatives.join(", ")
                ));
            }
            return Err(Stage3Error::ModelUnavailable(message));
        };
        let params =
            catalogue::wire_params(Some(entry), spec).map_err(Stage3Error::invalid_request)?;
        let estimate_usd = match override_price {
            Some(price) => Some(price),
            None => {
                let pricing = self
                    .catalogue
                    .pricing(model, || self.fetch_pricing(model))
                    .await;
                pricing
                    .as_deref()
                    .and_then(|p| catalogue::estimate(p, &params, spec))
            }
        };
        Ok(ModelCheck {
            estimate_usd,
            takes_references: Some(entry.takes_references()),
        })
    }

    async fn list_models(&self) -> Result<Vec<ModelListing>> {
        self.image_models().await
    }
}

/// OpenRouter's slugs are `vendor/name`, optionally `:variant`: one `/`, both parts
/// starting with a letter or digit. The slug goes into a catalogue URL's path, so nothing
/// else is let near it.
fn is_slug(model: &str) -> bool {
    let part = |text: &str| {
        text.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
    };
    match model.split_once('/') {
        Some((vendor, name)) => !vendor.contains(':') && part(vendor) && part(name),
        None => false,
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
    b64_json: Option<JsonBytes<'a>>,
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
    /// A `data:` URL of megabytes, usually: read as bytes (see [`JsonBytes`]).
    #[serde(borrow)]
    url: JsonBytes<'a>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn unescaped_image_strings_are_borrowed_from_the_body() {
        let body = br#"{"data":[{"b64_json":"QUJD","media_type":"image/png"}]}"#;
        let answer: ImagesAnswer<'_> = serde_json::from_slice(body).unwrap();
        let datum = &answer.data.unwrap()[0];
        assert!(matches!(
            datum.b64_json.as_ref().unwrap().0,
            Cow::Borrowed(b"QUJD")
        ));

        // An escaped `/` cannot be borrowed, but must still be read.
        let body = br#"{"data":[{"b64_json":"QU\/D"}]}"#;
        let answer: ImagesAnswer<'_> = serde_json::from_slice(body).unwrap();
        let datum = &answer.data.unwrap()[0];
        assert_eq!(&datum.b64_json.as_ref().unwrap().0[..], b"QU/D");
    }

    #[test]
    fn only_vendor_slash_name_slugs_are_openrouters() {
        for good in [
            "google/gemini-3.1-flash-image",
            "acme/img:free",
            "black-forest-labs/flux.2-pro",
        ] {
            assert!(is_slug(good), "{good}");
        }
        for bad in [
            "../../etc",
            "gemini",
            "a/b/c",
            "/x",
            "a/",
            "a/../b",
            "a:b/c",
        ] {
            assert!(!is_slug(bad), "{bad}");
        }
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
