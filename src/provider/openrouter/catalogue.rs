//! OpenRouter's image-model catalogue: which models exist, which parameters each takes,
//! and what an image costs (docs/design.md §3, "Model catalogue").
//!
//! Models churn — DALL-E 3, the Gemini previews and `gemini-2.5-flash-image` all died within
//! a year — so a model slug is checked against the catalogue before any paid call: a retired
//! model becomes a clear error naming alternatives, a request the model cannot serve (`hd`
//! on a 1K-only model, a seed it ignores) is refused for free, and only the parameters the
//! model takes are sent. Endpoint pricing gives the per-scene estimate the budget needs.
//!
//! The catalogue is read lazily, on the first scene that needs it, never at start-up (a
//! Lambda init must not wait on it), and kept for the process's lifetime with a refresh
//! after [`FRESH_FOR`]. It never blocks work: when it cannot be read, generation proceeds
//! unchecked after one warning, and the failure is remembered for [`RETRY_AFTER_FAILURE`]
//! so a batch does not ask again for every scene.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::image_spec::ImageSpec;
use crate::provider::http::{shorten, shorten_slug};
use crate::schema::{ImageQuality, ImageSize};

/// How long a catalogue read is trusted.
pub(super) const FRESH_FOR: Duration = Duration::from_secs(3600);
/// How long a failed read is remembered before the next try.
pub(super) const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);
/// Most endpoint price lists kept (one per model asked about).
const MAX_PRICED_MODELS: usize = 256;

/// One image model, as the catalogue describes it.
#[derive(Debug, Clone)]
pub(super) struct CatalogueModel {
    pub id: String,
    pub name: String,
    pub created: i64,
    pub input_modalities: Vec<String>,
    /// `supported_parameters`: an absent key means the model does not take it.
    pub params: HashMap<String, ParamSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum ParamSpec {
    Enum(Vec<String>),
    /// A range or a boolean: any value of ours is taken.
    Open,
}

impl CatalogueModel {
    /// Whether the model takes reference images (`input_references`, or image input).
    pub(crate) fn takes_references(&self) -> bool {
        self.takes("input_references") || self.input_modalities.iter().any(|m| m == "image")
    }

    fn values(&self, param: &str) -> Option<&[String]> {
        match self.params.get(param)? {
            ParamSpec::Enum(values) => Some(values),
            ParamSpec::Open => None,
        }
    }

    fn takes(&self, param: &str) -> bool {
        self.params.contains_key(param)
    }

    fn offers(&self, param: &str, value: &str) -> bool {
        match self.params.get(param) {
            Some(ParamSpec::Enum(values)) => values.iter().any(|v| v.eq_ignore_ascii_case(value)),
            Some(ParamSpec::Open) => true,
            None => false,
        }
    }

    /// The values of an enum parameter, for messages and `stage3 models`.
    pub(super) fn listed(&self, param: &str) -> Vec<String> {
        self.values(param)
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    }
}

pub(super) type Models = HashMap<String, CatalogueModel>;

/// One price line of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Price {
    pub billable: String,
    pub unit: String,
    pub cost_usd: f64,
    pub variant: Option<String>,
}

/// The price lists of a model's endpoints (providers).
pub(super) type Pricing = Vec<Vec<Price>>;

struct Fetched<T> {
    /// `None` when the read failed.
    value: Option<T>,
    at: Instant,
}

impl<T> Fetched<T> {
    fn is_fresh(&self) -> bool {
        let ttl = if self.value.is_some() {
            FRESH_FOR
        } else {
            RETRY_AFTER_FAILURE
        };
        self.at.elapsed() < ttl
    }
}

/// The cached catalogue. Reads are single-flight: scenes asking at once wait for one read.
#[derive(Default)]
pub(super) struct Catalogue {
    models: Mutex<Option<Fetched<Arc<Models>>>>,
    pricing: Mutex<HashMap<String, Fetched<Arc<Pricing>>>>,
    /// The last good model list, readable without waiting (for building request bodies).
    snapshot: RwLock<Option<Arc<Models>>>,
}

impl Catalogue {
    /// The model list, read with `fetch` when there is none or it is stale. `None` when it
    /// cannot be read (warned about once per failed read).
    pub(super) async fn models<F, Fut>(&self, fetch: F) -> Option<Arc<Models>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Models, String>>,
    {
        let mut slot = self.models.lock().await;
        if let Some(fetched) = slot.as_ref().filter(|f| f.is_fresh()) {
            return fetched.value.clone();
        }
        let value = match fetch().await {
            Ok(models) => Some(Arc::new(models)),
            Err(why) => {
                tracing::warn!(
                    error = %why,
                    "OpenRouter's image catalogue cannot be read; generating without checking \
                     models, parameters or prices"
                );
                // A stale list is better than none.
                slot.as_ref().and_then(|f| f.value.clone())
            }
        };
        if let Some(models) = &value {
            if let Ok(mut snapshot) = self.snapshot.write() {
                *snapshot = Some(models.clone());
            }
        }
        *slot = Some(Fetched {
            value: value.clone(),
            at: Instant::now(),
        });
        value
    }

    /// The model's description from the last good read, without any I/O.
    pub(crate) fn cached_model(&self, id: &str) -> Option<CatalogueModel> {
        self.snapshot
            .read()
            .ok()
            .and_then(|s| s.as_ref().and_then(|m| m.get(id).cloned()))
    }

    /// The model's endpoint prices, read with `fetch` when not known or stale.
    pub(super) async fn pricing<F, Fut>(&self, model: &str, fetch: F) -> Option<Arc<Pricing>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Pricing, String>>,
    {
        let mut cache = self.pricing.lock().await;
        if let Some(fetched) = cache.get(model).filter(|f| f.is_fresh()) {
            return fetched.value.clone();
        }
        let value = match fetch().await {
            Ok(pricing) => Some(Arc::new(pricing)),
            Err(why) => {
                tracing::warn!(
                    model = %shorten_slug(model),
                    error = %why,
                    "the model's prices cannot be read; its cost is not estimated"
                );
                None
            }
        };
        if cache.len() >= MAX_PRICED_MODELS {
            cache.clear();
        }
        cache.insert(
            model.to_string(),
            Fetched {
                value: value.clone(),
                at: Instant::now(),
            },
        );
        value
    }
}

// ---- Wire shapes of the catalogue ----------------------------------------------------

#[derive(Deserialize)]
struct ModelsAnswer {
    data: Vec<Value>,
}

/// Parses `GET /images/models`. A model entry we cannot read is skipped, not fatal.
pub(super) fn parse_models(body: &[u8]) -> Result<Models, String> {
    let answer: ModelsAnswer = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the model list is not the expected JSON: {}",
            shorten(&e.to_string())
        )
    })?;
    let mut models = Models::new();
    for entry in answer.data {
        let Some(id) = entry.get("id").and_then(Value::as_str) else {
            continue;
        };
        let params = entry
            .get("supported_parameters")
            .and_then(Value::as_object)
            .map(|params| {
                params
                    .iter()
                    .map(|(name, spec)| (name.clone(), parse_param(spec)))
                    .collect()
            })
            .unwrap_or_default();
        let input_modalities = entry
            .pointer("/architecture/input_modalities")
            .and_then(Value::as_array)
            .map(|m| {
                m.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        models.insert(
            id.to_string(),
            CatalogueModel {
                id: shorten_slug(id),
                name: entry
                    .get("name")
                    .and_then(Value::as_str)
                    .map(shorten)
                    .unwrap_or_default(),
                created: entry.get("created").and_then(Value::as_i64).unwrap_or(0),
                input_modalities,
                params,
            },
        );
    }
    if models.is_empty() {
        return Err("the model list is empty".into());
    }
    Ok(models)
}

fn parse_param(spec: &Value) -> ParamSpec {
    match (spec.get("type").and_then(Value::as_str), spec.get("values")) {
        (Some("enum"), Some(Value::Array(values))) => ParamSpec::Enum(
            values
                .iter()
                .map(|v| match v {
                    Value::String(s) => shorten(s),
                    other => shorten(&other.to_string()),
                })
                .collect(),
        ),
        _ => ParamSpec::Open,
    }
}

/// Parses `GET /images/models/{id}/endpoints` into each endpoint's price lines.
pub(super) fn parse_pricing(body: &[u8]) -> Result<Pricing, String> {
    let answer: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the endpoint list is not JSON: {}", shorten(&e.to_string())))?;
    let endpoints = answer
        .get("endpoints")
        .and_then(Value::as_array)
        .ok_or("the endpoint list has no `endpoints`")?;
    Ok(endpoints
        .iter()
        .map(|endpoint| {
            endpoint
                .get("pricing")
                .and_then(Value::as_array)
                .map(|lines| lines.iter().filter_map(parse_price).collect())
                .unwrap_or_default()
        })
        .collect())
}

fn parse_price(line: &Value) -> Option<Price> {
    let cost_usd = match line.get("cost_usd")? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (cost_usd.is_finite() && cost_usd >= 0.0).then(|| Price {
        billable: shorten(line.get("billable").and_then(Value::as_str).unwrap_or("")),
        unit: shorten(line.get("unit").and_then(Value::as_str).unwrap_or("")),
        cost_usd,
        variant: line.get("variant").and_then(Value::as_str).map(shorten),
    })
}

// ---- What to send, and what it costs --------------------------------------------------

/// The image parameters sent for one request to one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct WireParams {
    pub aspect_ratio: Option<&'static str>,
    pub resolution: Option<&'static str>,
    pub quality: Option<&'static str>,
    pub size: Option<String>,
    pub seed: Option<i64>,
}

/// The parameters to send `model` for `wanted`, or why the model cannot serve it. Without
/// a catalogue entry, the design's default mapping is sent unchecked (docs/design.md §3).
pub(super) fn wire_params(
    model: Option<&CatalogueModel>,
    wanted: &ImageSpec,
) -> Result<WireParams, String> {
    let ratio = wanted.size.aspect_ratio();
    let resolution = wanted.quality.resolution();
    let Some(model) = model else {
        return Ok(WireParams {
            aspect_ratio: Some(ratio),
            resolution: Some(resolution),
            seed: wanted.seed,
            ..WireParams::default()
        });
    };
    let id = &model.id;
    let mut params = WireParams::default();

    if model.takes("aspect_ratio") {
        if !model.offers("aspect_ratio", ratio) {
            return Err(format!(
                "{id} cannot draw {} (aspect {ratio}); its aspect ratios are {}",
                wanted.size,
                model.listed("aspect_ratio").join(", ")
            ));
        }
        params.aspect_ratio = Some(ratio);
    } else if let Some(size) = closest_size(model, wanted.size) {
        params.size = Some(size);
    } else if wanted.size != ImageSize::Square {
        return Err(format!(
            "{id} takes no aspect ratio or size, so it cannot draw {}",
            wanted.size
        ));
    }

    let hd = wanted.quality == ImageQuality::Hd;
    if model.takes("resolution") && model.offers("resolution", resolution) {
        params.resolution = Some(resolution);
    } else if hd && model.offers("quality", "high") {
        params.quality = Some("high");
    } else if hd {
        let offered = if model.takes("resolution") {
            format!(
                "its resolutions are {}",
                model.listed("resolution").join(", ")
            )
        } else {
            "it offers no resolution or quality setting".to_string()
        };
        return Err(format!(
            "{id} cannot make hd ({resolution}) images: {offered}; use quality standard or \
             another model"
        ));
    }

    if let Some(seed) = wanted.seed {
        if !model.takes("seed") {
            return Err(format!("{id} does not take a seed; leave `seed` out"));
        }
        params.seed = Some(seed);
    }
    if !wanted.references.is_empty() && !model.takes_references() {
        return Err(format!("{id} takes no reference images"));
    }
    Ok(params)
}

/// A `size` value of the model's with the request's orientation, nearest in aspect.
fn closest_size(model: &CatalogueModel, wanted: ImageSize) -> Option<String> {
    let (w, h) = wanted.dimensions();
    let target = f64::from(w) / f64::from(h);
    model
        .values("size")?
        .iter()
        .filter_map(|value| {
            let (vw, vh) = value.split_once('x')?;
            let (vw, vh): (f64, f64) = (vw.trim().parse().ok()?, vh.trim().parse().ok()?);
            (vw > 0.0 && vh > 0.0).then_some((value, vw / vh))
        })
        .filter(|(_, ratio)| (ratio - 1.0).signum() == (target - 1.0).signum() || *ratio == target)
        .min_by(|a, b| (a.1 - target).abs().total_cmp(&(b.1 - target).abs()))
        .map(|(value, _)| value.clone())
}

/// The estimated price of one image: the dearest endpoint's output price (per image, or
/// per megapixel of the nominal pixel size), with the `2k`/`4k` variant matching the
/// resolution sent, plus its price per reference image. `None` when no endpoint prices
/// output images in a unit we can count.
pub(super) fn estimate(pricing: &Pricing, params: &WireParams, wanted: &ImageSpec) -> Option<f64> {
    let (scale, variant) = match params.resolution {
        Some("2K") => (2.0, Some("2k")),
        Some("4K") => (4.0, Some("4k")),
        _ => (1.0, None),
    };
    let (w, h) = wanted.size.dimensions();
    let megapixels = f64::from(w) * scale * f64::from(h) * scale / 1_000_000.0;
    let references = wanted.references.len() as f64;
    let line_cost = |price: &Price, count: f64| match price.unit.as_str() {
        "image" => Some(price.cost_usd * count),
        "megapixel" => Some(price.cost_usd * megapixels * count),
        _ => None,
    };
    pricing
        .iter()
        .filter_map(|lines| {
            let output: Vec<&Price> = lines
                .iter()
                .filter(|p| p.billable == "output_image")
                .collect();
            let chosen = output
                .iter()
                .find(|p| variant.is_some() && p.variant.as_deref() == variant)
                .or_else(|| output.iter().find(|p| p.variant.is_none()))?;
            let mut cost = line_cost(chosen, 1.0)?;
            if references > 0.0 {
                cost += lines
                    .iter()
                    .filter(|p| matches!(p.billable.as_str(), "input_reference" | "input_image"))
                    .filter(|p| p.variant.is_none())
                    .filter_map(|p| line_cost(p, references))
                    .fold(0.0, f64::max);
            }
            Some(cost)
        })
        .reduce(f64::max)
}

/// Up to three catalogue models close to `wanted`: the same maker first, then shared words
/// in the name, newest first.
pub(super) fn alternatives(models: &Models, wanted: &str) -> Vec<String> {
    let maker = wanted.split('/').next().unwrap_or("");
    let words: Vec<&str> = wanted
        .split(['/', '-', '.', ':', '_'])
        .filter(|w| w.len() > 1)
        .collect();
    let mut scored: Vec<(usize, i64, &str)> = models
        .values()
        .map(|m| {
            let same_maker = usize::from(m.id.split('/').next() == Some(maker)) * 10;
            let shared = words.iter().filter(|w| m.id.contains(**w)).count();
            (same_maker + shared, m.created, m.id.as_str())
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    scored
        .into_iter()
        .take(3)
        .map(|(_, _, id)| id.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(params: Value) -> CatalogueModel {
        let body = json!({"data": [{"id": "acme/img", "name": "Img", "created": 1,
            "architecture": {"input_modalities": ["text"], "output_modalities": ["image"]},
            "supported_parameters": params}]});
        parse_models(body.to_string().as_bytes()).unwrap()["acme/img"].clone()
    }

    fn wanted(size: ImageSize, quality: ImageQuality) -> ImageSpec {
        let model = crate::image_spec::ModelRef::resolve(
            "acme/img",
            crate::image_spec::ProviderKind::OpenRouter,
        );
        ImageSpec::plain(model, size, quality)
    }

    #[test]
    fn hd_on_a_1k_only_model_is_refused_and_names_what_it_supports() {
        let m = model(json!({"resolution": {"type": "enum", "values": ["1K"]},
            "aspect_ratio": {"type": "enum", "values": ["1:1", "16:9"]}}));
        let why = wire_params(Some(&m), &wanted(ImageSize::Square, ImageQuality::Hd)).unwrap_err();
        assert!(why.contains("1K") && why.contains("acme/img"), "{why}");
        let standard = wire_params(
            Some(&m),
            &wanted(ImageSize::Landscape, ImageQuality::Standard),
        );
        assert_eq!(
            standard.unwrap(),
            WireParams {
                aspect_ratio: Some("16:9"),
                resolution: Some("1K"),
                ..WireParams::default()
            }
        );
        let portrait = wire_params(
            Some(&m),
            &wanted(ImageSize::Portrait, ImageQuality::Standard),
        );
        assert!(portrait.unwrap_err().contains("9:16"));
    }

    #[test]
    fn quality_models_get_quality_high_for_hd_and_a_matching_size() {
        let m = model(
            json!({"quality": {"type": "enum", "values": ["auto", "low", "medium", "high"]},
            "size": {"type": "enum", "values": ["1024x1024", "1536x1024", "1024x1536"]}}),
        );
        let params =
            wire_params(Some(&m), &wanted(ImageSize::Landscape, ImageQuality::Hd)).unwrap();
        assert_eq!(params.quality, Some("high"));
        assert_eq!(params.resolution, None);
        assert_eq!(params.aspect_ratio, None);
        assert_eq!(params.size.as_deref(), Some("1536x1024"));
    }

    #[test]
    fn a_seed_is_sent_only_to_models_that_take_one() {
        let m = model(json!({"resolution": {"type": "enum", "values": ["1K"]}}));
        let mut w = wanted(ImageSize::Square, ImageQuality::Standard);
        w.seed = Some(7);
        assert!(wire_params(Some(&m), &w).unwrap_err().contains("seed"));
        let m = model(json!({"seed": {"type": "range", "min": 0, "max": 4294967295u64}}));
        assert_eq!(wire_params(Some(&m), &w).unwrap().seed, Some(7));
    }

    #[test]
    fn estimates_follow_unit_and_variant_and_take_the_dearest_endpoint() {
        let pricing = parse_pricing(
            json!({"id": "acme/img", "endpoints": [
                {"provider_slug": "a", "pricing": [
                    {"billable": "output_image", "unit": "image", "cost_usd": 0.04},
                    {"billable": "output_image", "unit": "image", "cost_usd": 0.12, "variant": "2k"}]},
                {"provider_slug": "b", "pricing": [
                    {"billable": "output_image", "unit": "megapixel", "cost_usd": 0.03}]}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let standard = WireParams {
            resolution: Some("1K"),
            ..WireParams::default()
        };
        let square = wanted(ImageSize::Square, ImageQuality::Standard);
        // 0.04 per image vs 0.03 × 1.048576 MP: the dearer is the per-image endpoint.
        assert_eq!(estimate(&pricing, &standard, &square), Some(0.04));
        let hd = WireParams {
            resolution: Some("2K"),
            ..WireParams::default()
        };
        // At 2K the per-megapixel endpoint (0.03 × 2048² px) outprices the `2k` variant.
        let hd_cost = estimate(&pricing, &hd, &square).unwrap();
        assert!((hd_cost - 0.03 * 4.194304).abs() < 1e-12, "{hd_cost}");
        let one_endpoint = vec![pricing[0].clone()];
        assert_eq!(estimate(&one_endpoint, &hd, &square), Some(0.12));
        assert_eq!(estimate(&Vec::new(), &hd, &square), None);
    }

    #[test]
    fn alternatives_prefer_the_same_maker() {
        let body = json!({"data": [
            {"id": "google/gemini-3.1-flash-image", "created": 3},
            {"id": "openai/gpt-image-1", "created": 2},
            {"id": "black-forest-labs/flux.2-pro", "created": 1}]});
        let models = parse_models(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            alternatives(&models, "google/gemini-2.5-flash-image")[0],
            "google/gemini-3.1-flash-image"
        );
    }
}
