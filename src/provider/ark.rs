//! Volcengine Ark (Doubao Seedream): image generation reachable from mainland China.
//!
//! `POST {ARK_BASE_URL}/images/generations` with `Authorization: Bearer $ARK_API_KEY`
//! (docs/design.md §3). Each call asks for exactly one image — `sequential_image_generation:
//! "disabled"` where the model knows group generation — at a pixel size from the model's
//! table ([`MODELS`]), with Ark's own visible watermark off (`watermark: false`: the visible
//! mark is ours, `STAGE3_VISIBLE_LABEL`, the same whoever drew the image) and the image
//! inline (`response_format: "b64_json"`). A gateway that ignores the format and answers a
//! URL is handled too: the URL is fetched at once through the safe image client. Seedream
//! 4.x answers JPEG, stored as PNG like any other answer.
//!
//! Ark has no negative-prompt field, so the negatives are folded into the prompt, as for
//! OpenRouter. Its models take no seed except Seedream 3.0; a seed asked of the others is
//! refused before any call.
//!
//! Errors are `{"error": {"code", "message", "param", "type"}}`; [`classify`] maps the
//! codes onto our error types and falls back on the status for codes it does not know.

use std::collections::HashMap;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{
    classify_status, malformed, shorten_slug, with_cost, AnswerImage, ApiClient, ErrorAnswer,
    InlineText, JsonBytes, JsonText,
};
use super::table::{ModelTable, SizeTier, TabledModel};
use super::ApiSettings;
use super::{
    ImageProvider, ImageRequest, ModelCheck, ModelListing, ProviderIdentity, ProviderImage,
};
use crate::error::{ProviderFailure, Result, Stage3Error};
use crate::image_spec::{ImageSpec, ProviderKind};

/// Seedream's 1K tier (4.0 and 3.0): square, 16:9, 9:16.
const TIER_1K: SizeTier = [(1024, 1024), (1280, 720), (720, 1280)];
/// The 2K tier. 2560x1440 is Ark's recommended 2K 16:9 size and exactly the 3,686,400
/// pixels Seedream 4.5 needs at least.
const TIER_2K: SizeTier = [(2048, 2048), (2560, 1440), (1440, 2560)];
/// The 4K tier, as Ark's current size table maps it.
const TIER_4K: SizeTier = [(4096, 4096), (5504, 3040), (3040, 5504)];
/// Seedream 3.0 draws between 512x512 and 2048x2048.
const TIER_3_0_LARGE: SizeTier = [(2048, 2048), (2048, 1152), (1152, 2048)];

/// Prices checked 2026-12 against BytePlus's USD list and Volcengine's CNY list
/// (docs/design.md §3: about $0.03–0.04 an image).
const CHECKED: &str = "2026-12";

/// Seedream 4.x and 5.0 take up to 14 reference images.
const SEEDREAM_REFERENCES: usize = 14;

/// The Seedream models this service knows (`stage3 models --provider ark`).
const MODELS: &[TabledModel] = &[
    TabledModel {
        id: "doubao-seedream-5-0-260128",
        name: "Seedream 5.0 lite",
        standard: TIER_2K,
        hd: TIER_4K,
        takes_seed: false,
        max_references: SEEDREAM_REFERENCES,
        max_prompt_chars: None,
        max_negative_chars: None,
        usd_per_image: 0.035,
        listed_price: "0.22 CNY",
        price_checked: CHECKED,
    },
    TabledModel {
        id: "doubao-seedream-4-5-251128",
        name: "Seedream 4.5",
        standard: TIER_2K,
        hd: TIER_4K,
        takes_seed: false,
        max_references: SEEDREAM_REFERENCES,
        max_prompt_chars: None,
        max_negative_chars: None,
        usd_per_image: 0.04,
        listed_price: "0.25 CNY",
        price_checked: CHECKED,
    },
    TabledModel {
        id: "doubao-seedream-4-0-250828",
        name: "Seedream 4.0",
        standard: TIER_1K,
        hd: TIER_2K,
        takes_seed: false,
        max_references: SEEDREAM_REFERENCES,
        max_prompt_chars: None,
        max_negative_chars: None,
        usd_per_image: 0.03,
        listed_price: "0.20 CNY",
        price_checked: CHECKED,
    },
    TabledModel {
        id: "doubao-seedream-3-0-t2i-250415",
        name: "Seedream 3.0 (text to image)",
        standard: TIER_1K,
        hd: TIER_3_0_LARGE,
        takes_seed: true,
        max_references: 0,
        max_prompt_chars: None,
        max_negative_chars: None,
        usd_per_image: 0.03,
        listed_price: "0.259 CNY",
        price_checked: CHECKED,
    },
];

/// An `ep-…` endpoint id may run any Seedream model: it is checked as a Seedream 4.x/5.0
/// endpoint (the 2K and 4K tiers fit all of them), with no price of its own unless
/// `STAGE3_PRICES` gives one.
const ENDPOINT: TabledModel = TabledModel {
    id: "ep-…",
    name: "an Ark endpoint (Seedream 4.x or 5.0)",
    standard: TIER_2K,
    hd: TIER_4K,
    takes_seed: false,
    max_references: SEEDREAM_REFERENCES,
    max_prompt_chars: None,
    max_negative_chars: None,
    usd_per_image: 0.0,
    listed_price: "",
    price_checked: CHECKED,
};

/// Generates images through Volcengine Ark. Build it once; it holds the connection pools.
pub struct ArkProvider {
    http: ApiClient,
    table: ModelTable,
}

impl std::fmt::Debug for ArkProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArkProvider")
            .field("base_url", &self.http.base_url())
            .field("has_key", &self.http.has_key())
            .finish_non_exhaustive()
    }
}

impl ArkProvider {
    /// The client for `settings`. Without `ARK_API_KEY` it can still check and list models;
    /// a call fails with a configuration error.
    pub fn new(settings: &ApiSettings) -> Result<Self> {
        Ok(ArkProvider {
            http: ApiClient::new(
                "ark",
                &settings.base_url,
                settings.api_key.clone(),
                "ARK_API_KEY",
                HeaderMap::new(),
                &settings.http,
            )?,
            table: table(settings.prices.clone()),
        })
    }
}

fn table(prices: HashMap<String, f64>) -> ModelTable {
    ModelTable::new(ProviderKind::Ark, "Volcengine Ark", MODELS, prices).with_alias("ep-", ENDPOINT)
}

#[async_trait]
impl ImageProvider for ArkProvider {
    fn identity(&self) -> ProviderIdentity {
        ProviderIdentity {
            kind: ProviderKind::Ark,
            variant: None,
        }
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let model = request.model;
        let row = self.table.find(model).ok_or_else(|| {
            Stage3Error::ModelUnavailable(format!(
                "{} is not a Volcengine Ark image model this service knows",
                shorten_slug(model)
            ))
        })?;
        let (width, height) = row.pixels(request.spec.size, request.spec.quality);
        let size = format!("{width}x{height}");
        let references = &request.spec.references;
        let body = GenerationBody {
            model,
            prompt: request.spec.prompt_for(ProviderKind::Ark).prompt,
            size: &size,
            response_format: "b64_json",
            watermark: false,
            // Group generation came with reference images, in Seedream 4.0: the models
            // that take references take this field, and 3.0 knows neither.
            sequential_image_generation: (row.max_references > 0).then_some("disabled"),
            seed: request.spec.seed.filter(|_| row.takes_seed),
            image: match references.len() {
                0 => None,
                1 => Some(References::One(&references[0])),
                _ => Some(References::Many(references)),
            },
        };
        let answer = match self
            .http
            .post_json("/images/generations", &body, request)
            .await?
        {
            Ok(answer) => answer,
            Err(answer) => return Err(self.error_answer(answer, model)),
        };
        // What the image is, found in the parsed answer; the answer's buffer is then given
        // up to the decoder, which writes the image into it.
        let (source, cost) = {
            let parsed: GenerationAnswer<'_> = self.http.parse_answer(&answer)?;
            let generated = parsed
                .usage
                .as_ref()
                .and_then(|usage| usage.get("generated_images"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            // Ark bills per image it made, at the model's price.
            let cost = self
                .table
                .price(model)
                .map(|price| price * generated as f64)
                .filter(|_| generated > 0);
            if let Some(error) = &parsed.error {
                return Err(with_cost(self.error_object(200, error, model), cost));
            }
            let datum = parsed
                .data
                .unwrap_or_default()
                .into_iter()
                .next()
                .ok_or_else(|| malformed("the answer has no image (`data` is empty)"))?;
            if let Some(error) = &datum.error {
                return Err(with_cost(self.error_object(200, error, model), cost));
            }
            let source = match (datum.b64_json, datum.url) {
                (Some(b64), _) => AnswerImage::Inline(InlineText::locate(&b64.0, &answer)),
                (None, Some(url)) => AnswerImage::Url(url.0.into_owned()),
                (None, None) => {
                    return Err(malformed(
                        "the image entry has neither `b64_json` nor `url`",
                    ))
                }
            };
            (source, cost)
        };
        let mut image = self.http.image_of(source, answer, &request.budget).await?;
        image.cost = cost.or_else(|| self.table.price(model));
        tracing::debug!(
            scene_id = request.scene_id,
            bytes = image.bytes.len(),
            size = %size,
            "ark image received"
        );
        Ok(image)
    }

    async fn check(&self, spec: &ImageSpec, model: &str) -> Result<ModelCheck> {
        self.table.check(spec, model)
    }

    async fn list_models(&self) -> Result<Vec<ModelListing>> {
        Ok(self.table.listings())
    }
}

impl ArkProvider {
    fn error_answer(&self, answer: ErrorAnswer, model: &str) -> Stage3Error {
        let error = match &answer.body {
            Ok(body) => serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|value| value.get("error").cloned()),
            Err(_) => None,
        };
        let mut classified = match &error {
            Some(error) => self.error_object(answer.status, error, model),
            None => {
                let message = answer.body.as_ref().err().map(String::as_str);
                classify(
                    answer.status,
                    None,
                    self.http.failure(Some(answer.status), None, message),
                    model,
                )
            }
        };
        if let Some(failure) = classified.provider_failure_mut() {
            failure.retry_after = answer.retry_after;
        }
        classified
    }

    /// `{"code", "message", "param", "type"}` as the error it is.
    fn error_object(&self, status: u16, error: &Value, model: &str) -> Stage3Error {
        let code = error.get("code").and_then(Value::as_str);
        let message = error.get("message").and_then(Value::as_str);
        let failure = self.http.failure(Some(status), code, message);
        classify(status, code, failure, model)
    }
}

/// Maps Ark's error codes onto our error types (docs/design.md §3): a content filter is
/// `content_policy` (never retried), a bad key `auth` and an overdue account
/// `insufficient_credits` (both stop further calls to Ark), throttling `rate_limited`
/// (the shared pause), a bad parameter `invalid_request`, a model that does not exist or
/// is not enabled for the account `model_unavailable` (the next model of the chain
/// serves). Codes it does not know go by the status.
fn classify(
    status: u16,
    code: Option<&str>,
    mut failure: ProviderFailure,
    model: &str,
) -> Stage3Error {
    let model = shorten_slug(model);
    failure.message = format!("{model}: {}", failure.message);
    let Some(code) = code else {
        return classify_status(status, failure);
    };
    let family = |prefix: &str| code == prefix || code.starts_with(&format!("{prefix}."));
    if family("InputTextSensitiveContentDetected")
        || family("InputImageSensitiveContentDetected")
        || family("OutputImageSensitiveContentDetected")
        || family("SensitiveContentDetected")
    {
        Stage3Error::ContentPolicy(failure)
    } else if code == "AuthenticationError" {
        Stage3Error::Auth(failure)
    } else if code == "AccountOverdueError" || code == "OperationDenied.ServiceOverdue" {
        Stage3Error::InsufficientCredits(failure)
    } else if family("RateLimitExceeded")
        || code.ends_with("RateLimitExceeded")
        || matches!(
            code,
            "ServerOverloaded" | "RequestBurstTooFast" | "InflightBatchsizeExceeded"
        )
    {
        Stage3Error::RateLimited(failure)
    } else if family("InvalidParameter") || family("MissingParameter") {
        Stage3Error::InvalidRequest(failure.to_string())
    } else if family("InvalidEndpointOrModel")
        || family("InvalidEndpoint")
        || code == "ModelNotOpen"
    {
        Stage3Error::ModelUnavailable(failure.to_string())
    } else if code == "InternalServiceError" {
        Stage3Error::ProviderUnavailable(failure)
    } else {
        classify_status(status, failure)
    }
}

// ---- Wire shapes ----------------------------------------------------------------------

#[derive(Serialize)]
struct GenerationBody<'a> {
    model: &'a str,
    prompt: &'a str,
    size: &'a str,
    response_format: &'static str,
    watermark: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequential_image_generation: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    /// Reference images: one URL, or a list.
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<References<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum References<'a> {
    One(&'a str),
    Many(&'a [String]),
}

#[derive(Deserialize)]
struct GenerationAnswer<'a> {
    #[serde(borrow, default)]
    data: Option<Vec<Datum<'a>>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// One image of the answer, or why it failed (a group answer's element may be an error).
#[derive(Deserialize)]
struct Datum<'a> {
    #[serde(borrow, default)]
    b64_json: Option<JsonBytes<'a>>,
    #[serde(borrow, default)]
    url: Option<JsonText<'a>>,
    #[serde(default)]
    error: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;
    use crate::image_spec::ModelRef;
    use crate::schema::{ImageQuality, ImageSize};

    fn kind(status: u16, code: &str) -> ErrorType {
        classify(
            status,
            Some(code),
            ProviderFailure::new(Some(status), "m"),
            "doubao-x",
        )
        .error_type()
    }

    #[test]
    fn ark_codes_map_onto_our_error_types() {
        use ErrorType::*;
        for (status, code, expected) in [
            (400, "InputTextSensitiveContentDetected", ContentPolicy),
            (400, "InputImageSensitiveContentDetected", ContentPolicy),
            (400, "OutputImageSensitiveContentDetected", ContentPolicy),
            (
                400,
                "OutputImageSensitiveContentDetected.DeepFake",
                ContentPolicy,
            ),
            (401, "AuthenticationError", Auth),
            (403, "AccountOverdueError", InsufficientCredits),
            (429, "RateLimitExceeded.EndpointRPMExceeded", RateLimited),
            (429, "ModelAccountIpmRateLimitExceeded", RateLimited),
            (429, "ServerOverloaded", RateLimited),
            (400, "InvalidParameter", InvalidRequest),
            (400, "InvalidParameter.Size", InvalidRequest),
            (404, "InvalidEndpointOrModel.NotFound", ModelUnavailable),
            (404, "ModelNotOpen", ModelUnavailable),
            (500, "InternalServiceError", ProviderUnavailable),
            (503, "SomethingNew", ProviderUnavailable),
            (403, "AccessDenied", PermissionDenied),
            (400, "SomethingNew", ProviderError),
        ] {
            assert_eq!(kind(status, code), expected, "{status} {code}");
        }
    }

    #[test]
    fn sizes_meet_each_models_bounds() {
        // Seedream 4.5 and 5.0 need at least 3,686,400 pixels; 4.0 at least 921,600; all
        // at most 16,777,216; 3.0 draws within 512..=2048 a side.
        for row in MODELS {
            for size in ImageSize::ALL {
                for quality in [ImageQuality::Standard, ImageQuality::Hd] {
                    let (w, h) = row.pixels(size, quality);
                    let pixels = u64::from(w) * u64::from(h);
                    let min = match row.id {
                        "doubao-seedream-4-0-250828" => 921_600,
                        "doubao-seedream-3-0-t2i-250415" => 512 * 512,
                        _ => 3_686_400,
                    };
                    assert!(pixels >= min && pixels <= 16_777_216, "{} {w}x{h}", row.id);
                    if row.id.contains("-3-0-") {
                        assert!(w <= 2048 && h <= 2048, "{w}x{h}");
                    }
                }
            }
        }
        let table = table(HashMap::new());
        let seedream = table.find("doubao-seedream-4-5-251128").unwrap();
        assert_eq!(
            seedream.pixels(ImageSize::Landscape, ImageQuality::Standard),
            (2560, 1440)
        );
    }

    #[test]
    fn a_seed_is_refused_where_the_model_takes_none() {
        let table = table(HashMap::new());
        let mut spec = ImageSpec::plain(
            ModelRef::resolve("doubao-seedream-4-5-251128", ProviderKind::Ark),
            ImageSize::Square,
            ImageQuality::Standard,
        );
        spec.seed = Some(7);
        assert!(table.check(&spec, "doubao-seedream-4-5-251128").is_err());
        assert!(table.check(&spec, "doubao-seedream-3-0-t2i-250415").is_ok());
    }
}
