//! Alibaba Model Studio (DashScope) Qwen-Image: image generation reachable from mainland
//! China.
//!
//! The synchronous `POST {DASHSCOPE_BASE_URL}/services/aigc/multimodal-generation/generation`
//! with `Authorization: Bearer $DASHSCOPE_API_KEY` (docs/design.md §3), for `qwen-image`,
//! `qwen-image-plus` and `qwen-image-max`. The models draw a fixed list of sizes, so our
//! three map onto the nearest (`1024x1024`→`1328*1328`, `1792x1024`→`1664*928`,
//! `1024x1792`→`928*1664`); none has a larger tier, so `hd` draws the same size.
//!
//! DashScope takes the negative prompt in a field of its own: it gets the scene's text
//! without the "Avoid:" sentence, and the negatives apart (see
//! [`ImageSpec::prompt_for`](crate::image_spec::ImageSpec::prompt_for); the request hash
//! and the record say exactly what was sent). `prompt_extend: false` keeps the prompt ours
//! rather than rewritten by a language model, and `watermark: false` leaves the visible
//! mark to us (`STAGE3_VISIBLE_LABEL`).
//!
//! The answer names the image by an OSS URL that lives 24 hours: it is fetched at once
//! through the safe image client. Errors are `{"request_id", "code", "message"}`, and
//! some gateways put one in a 200 answer; [`classify`] maps the codes.

use std::collections::HashMap;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{classify_status, malformed, shorten_slug, with_cost, ApiClient, ErrorAnswer};
use super::table::{ModelTable, SizeTier, TabledModel};
use super::ApiSettings;
use super::{
    ImageProvider, ImageRequest, ModelCheck, ModelListing, ProviderIdentity, ProviderImage,
};
use crate::error::{ProviderFailure, Result, Stage3Error};
use crate::image_spec::{ImageSpec, ProviderKind};

/// Qwen-Image's sizes for square, 16:9 and 9:16.
const QWEN_SIZES: SizeTier = [(1328, 1328), (1664, 928), (928, 1664)];

/// Prices checked 2026-12 on Model Studio's price list (Beijing region, per image, in CNY;
/// USD at about 7.2 CNY to the dollar).
const CHECKED: &str = "2026-12";

/// Qwen-Image's documented limits: 800 characters of prompt, 500 of negative prompt.
const QWEN_MAX_PROMPT: Option<usize> = Some(800);
const QWEN_MAX_NEGATIVE: Option<usize> = Some(500);

/// The Qwen-Image models this service knows (`stage3 models --provider dashscope`).
const MODELS: &[TabledModel] = &[
    TabledModel {
        id: "qwen-image-max",
        name: "Qwen-Image Max",
        standard: QWEN_SIZES,
        hd: QWEN_SIZES,
        takes_seed: true,
        max_references: 0,
        max_prompt_chars: QWEN_MAX_PROMPT,
        max_negative_chars: QWEN_MAX_NEGATIVE,
        usd_per_image: 0.07,
        listed_price: "0.50 CNY",
        price_checked: CHECKED,
    },
    TabledModel {
        id: "qwen-image-plus",
        name: "Qwen-Image Plus",
        standard: QWEN_SIZES,
        hd: QWEN_SIZES,
        takes_seed: true,
        max_references: 0,
        max_prompt_chars: QWEN_MAX_PROMPT,
        max_negative_chars: QWEN_MAX_NEGATIVE,
        usd_per_image: 0.028,
        listed_price: "0.20 CNY",
        price_checked: CHECKED,
    },
    TabledModel {
        id: "qwen-image",
        name: "Qwen-Image",
        standard: QWEN_SIZES,
        hd: QWEN_SIZES,
        takes_seed: true,
        max_references: 0,
        max_prompt_chars: QWEN_MAX_PROMPT,
        max_negative_chars: QWEN_MAX_NEGATIVE,
        usd_per_image: 0.035,
        listed_price: "0.25 CNY",
        price_checked: CHECKED,
    },
];

const GENERATION_PATH: &str = "/services/aigc/multimodal-generation/generation";

/// Generates images through DashScope. Build it once; it holds the connection pools.
pub struct DashScopeProvider {
    http: ApiClient,
    table: ModelTable,
}

impl std::fmt::Debug for DashScopeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashScopeProvider")
            .field("base_url", &self.http.base_url())
            .field("has_key", &self.http.has_key())
            .finish_non_exhaustive()
    }
}

impl DashScopeProvider {
    /// The client for `settings`. Without `DASHSCOPE_API_KEY` it can still check and list
    /// models; a call fails with a configuration error.
    pub fn new(settings: &ApiSettings) -> Result<Self> {
        Ok(DashScopeProvider {
            http: ApiClient::new(
                "dashscope",
                &settings.base_url,
                settings.api_key.clone(),
                "DASHSCOPE_API_KEY",
                HeaderMap::new(),
                &settings.http,
            )?,
            table: table(settings.prices.clone()),
        })
    }
}

fn table(prices: HashMap<String, f64>) -> ModelTable {
    ModelTable::new(ProviderKind::DashScope, "DashScope", MODELS, prices)
}

#[async_trait]
impl ImageProvider for DashScopeProvider {
    fn identity(&self) -> ProviderIdentity {
        ProviderIdentity {
            kind: ProviderKind::DashScope,
            variant: None,
        }
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let model = request.model;
        let row = self.table.find(model).ok_or_else(|| {
            Stage3Error::ModelUnavailable(format!(
                "{} is not a DashScope image model this service knows",
                shorten_slug(model)
            ))
        })?;
        let (width, height) = row.pixels(request.spec.size, request.spec.quality);
        let size = format!("{width}*{height}");
        let sent = request.spec.prompt_for(ProviderKind::DashScope);
        let body = GenerationBody {
            model,
            input: Input {
                messages: [Message {
                    role: "user",
                    content: [Text { text: sent.prompt }],
                }],
            },
            parameters: Parameters {
                negative_prompt: sent.negative_prompt,
                prompt_extend: false,
                watermark: false,
                size: &size,
                n: 1,
                seed: request.spec.seed,
            },
        };
        let answer = match self.http.post_json(GENERATION_PATH, &body, request).await? {
            Ok(answer) => answer,
            Err(answer) => return Err(self.error_answer(answer, model)),
        };
        let parsed: GenerationAnswer = self.http.parse_answer(&answer)?;
        let made = parsed
            .usage
            .as_ref()
            .and_then(|usage| usage.get("image_count"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let cost = self
            .table
            .price(model)
            .map(|price| price * made as f64)
            .filter(|_| made > 0);
        if let Some(code) = parsed.code.as_deref().filter(|code| !code.is_empty()) {
            let failure = self
                .http
                .failure(Some(200), Some(code), parsed.message.as_deref());
            return Err(with_cost(classify(200, Some(code), failure, model), cost));
        }
        let url = parsed
            .output
            .and_then(|output| output.choices.into_iter().next())
            .and_then(|choice| choice.message)
            .and_then(|message| message.content.into_iter().find_map(|part| part.image))
            .ok_or_else(|| malformed("the answer has no image URL (`output.choices[0]`)"))?;
        let mut image = self.http.fetch_image_url(&url, &request.budget).await?;
        image.cost = cost.or_else(|| self.table.price(model));
        tracing::debug!(
            scene_id = request.scene_id,
            bytes = image.bytes.len(),
            size = %size,
            "dashscope image received"
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

impl DashScopeProvider {
    fn error_answer(&self, answer: ErrorAnswer, model: &str) -> Stage3Error {
        let (code, message) = match &answer.body {
            Ok(body) => match serde_json::from_slice::<Value>(body) {
                Ok(value) => (
                    value
                        .get("code")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    value
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                ),
                Err(_) => (None, Some(String::from_utf8_lossy(body).into_owned())),
            },
            Err(why) => (None, Some(why.clone())),
        };
        let failure = self
            .http
            .failure(Some(answer.status), code.as_deref(), message.as_deref());
        let mut classified = classify(answer.status, code.as_deref(), failure, model);
        if let Some(failure) = classified.provider_failure_mut() {
            failure.retry_after = answer.retry_after;
        }
        classified
    }
}

/// Maps DashScope's error codes onto our error types (docs/design.md §3): the content
/// filter is `content_policy`, a bad key `auth`, an account in arrears
/// `insufficient_credits` (both stop further calls to DashScope), throttling
/// `rate_limited`, a bad parameter `invalid_request`, a model that does not exist or is
/// not open to the account `model_unavailable`. Codes it does not know go by the status.
fn classify(
    status: u16,
    code: Option<&str>,
    mut failure: ProviderFailure,
    model: &str,
) -> Stage3Error {
    failure.message = format!("{}: {}", shorten_slug(model), failure.message);
    let Some(code) = code else {
        return classify_status(status, failure);
    };
    let family = |prefix: &str| code == prefix || code.starts_with(&format!("{prefix}."));
    if family("DataInspectionFailed") || code.ends_with("DataInspectionFailed") {
        Stage3Error::ContentPolicy(failure)
    } else if code == "InvalidApiKey" {
        Stage3Error::Auth(failure)
    } else if matches!(
        code,
        "Arrearage" | "PrepaidBillOverdue" | "PostpaidBillOverdue" | "AllocationQuota.FreeTierOnly"
    ) {
        Stage3Error::InsufficientCredits(failure)
    } else if family("Throttling") || code == "LimitRequests" {
        Stage3Error::RateLimited(failure)
    } else if family("InvalidParameter") || family("BadRequest") || code == "InvalidURL" {
        Stage3Error::InvalidRequest(failure.to_string())
    } else if code == "ModelNotFound" || code == "Model.AccessDenied" {
        Stage3Error::ModelUnavailable(failure.to_string())
    } else if family("AccessDenied") || code == "Workspace.AccessDenied" {
        Stage3Error::PermissionDenied(failure)
    } else if family("InternalError")
        || matches!(
            code,
            "SystemError" | "ModelServiceFailed" | "ModelUnavailable"
        )
    {
        Stage3Error::ProviderUnavailable(failure)
    } else {
        classify_status(status, failure)
    }
}

// ---- Wire shapes ----------------------------------------------------------------------

#[derive(Serialize)]
struct GenerationBody<'a> {
    model: &'a str,
    input: Input<'a>,
    parameters: Parameters<'a>,
}

#[derive(Serialize)]
struct Input<'a> {
    messages: [Message<'a>; 1],
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: [Text<'a>; 1],
}

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

#[derive(Serialize)]
struct Parameters<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    negative_prompt: Option<&'a str>,
    prompt_extend: bool,
    watermark: bool,
    size: &'a str,
    n: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
}

#[derive(Deserialize)]
struct GenerationAnswer {
    #[serde(default)]
    output: Option<Output>,
    #[serde(default)]
    usage: Option<Value>,
    /// Set, with `message`, when the call failed (some gateways answer 200 with it).
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Output {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Vec<ContentPart>,
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    image: Option<String>,
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
            "qwen-image",
        )
        .error_type()
    }

    #[test]
    fn dashscope_codes_map_onto_our_error_types() {
        use ErrorType::*;
        for (status, code, expected) in [
            (400, "DataInspectionFailed", ContentPolicy),
            (400, "Output.DataInspectionFailed", ContentPolicy),
            (401, "InvalidApiKey", Auth),
            (400, "Arrearage", InsufficientCredits),
            (429, "Throttling", RateLimited),
            (429, "Throttling.RateQuota", RateLimited),
            (429, "Throttling.AllocationQuota", RateLimited),
            (400, "InvalidParameter", InvalidRequest),
            (404, "ModelNotFound", ModelUnavailable),
            (403, "Model.AccessDenied", ModelUnavailable),
            (500, "InternalError", ProviderUnavailable),
            (502, "SomethingNew", ProviderUnavailable),
            (400, "SomethingNew", ProviderError),
        ] {
            assert_eq!(kind(status, code), expected, "{status} {code}");
        }
    }

    #[test]
    fn sizes_are_from_the_models_fixed_list() {
        let table = table(HashMap::new());
        let row = table.find("qwen-image-plus").unwrap();
        for (size, expected) in [
            (ImageSize::Square, (1328, 1328)),
            (ImageSize::Landscape, (1664, 928)),
            (ImageSize::Portrait, (928, 1664)),
        ] {
            assert_eq!(row.pixels(size, ImageQuality::Standard), expected);
            assert_eq!(row.pixels(size, ImageQuality::Hd), expected);
        }
    }

    #[test]
    fn prompt_limits_count_what_is_sent() {
        let table = table(HashMap::new());
        let mut spec = ImageSpec::plain(
            ModelRef::resolve("qwen-image", ProviderKind::DashScope),
            ImageSize::Square,
            ImageQuality::Standard,
        );
        // The folded prompt is longer than 800 characters, but the negatives travel apart.
        spec.positive_prompt = "x".repeat(700);
        spec.negative_prompt = "y".repeat(400);
        spec.prompt = format!(
            "{}\n\nAvoid: {}.",
            spec.positive_prompt, spec.negative_prompt
        );
        assert!(table.check(&spec, "qwen-image").is_ok());
        spec.negative_prompt = "y".repeat(501);
        let err = table.check(&spec, "qwen-image").unwrap_err();
        assert!(err.to_string().contains("negative_prompt"), "{err}");
    }
}
