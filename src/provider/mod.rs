//! Image providers: something that turns a prompt into image bytes.
//!
//! The service talks to a provider only through [`ImageProvider`], one call per image. A
//! provider does not retry, validate or store anything: the service owns the retry budget,
//! the shared back-pressure and the deadline, so every provider gets them for free.

mod openrouter;
mod placeholder;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use openrouter::{ModelListing, OpenRouterProvider};
pub use placeholder::PlaceholderProvider;

use crate::config::{OpenRouterSettings, ProviderKind};
use crate::error::Result;
use crate::schema::{ImageQuality, ImageSize};

/// One image to generate, fully resolved: the composed prompt and every option.
#[derive(Debug, Clone)]
pub struct ImageRequest<'a> {
    pub scene_id: &'a str,
    pub prompt: &'a str,
    pub model: &'a str,
    pub size: ImageSize,
    pub quality: ImageQuality,
    pub seed: Option<i64>,
    /// Reference images (`https://` or `data:image/…` URLs) for character consistency.
    pub references: &'a [String],
    /// The whole budget for this call, connect to last byte; the service shortens it when
    /// a deadline is near.
    pub timeout: Duration,
}

/// What one scene asks of the provider, known before any call: enough to check it against
/// what the model can do and to estimate its price.
#[derive(Debug, Clone, Copy)]
pub struct SceneSpec<'a> {
    pub scene_id: &'a str,
    /// The model asked for.
    pub model: &'a str,
    /// Models to try, in order, when the asked-for one cannot serve (`STAGE3_MODEL_FALLBACKS`).
    pub fallbacks: &'a [String],
    pub size: ImageSize,
    pub quality: ImageQuality,
    pub seed: Option<i64>,
    pub references: &'a [String],
}

/// How a scene will be generated, decided before any call.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The models to try, in order: the asked-for one unless it is known to be gone, then
    /// the fallbacks that can serve the request. Never empty.
    pub models: Vec<PlannedModel>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedModel {
    pub model: String,
    /// The expected price of one image in USD, when the provider knows it.
    pub estimate_usd: Option<f64>,
}

impl Plan {
    /// Every model in order, unchecked and unpriced.
    pub fn unchecked(spec: &SceneSpec<'_>, estimate_usd: Option<f64>) -> Plan {
        let mut models: Vec<PlannedModel> = Vec::new();
        for model in std::iter::once(spec.model).chain(spec.fallbacks.iter().map(String::as_str)) {
            if !models.iter().any(|m| m.model == model) {
                models.push(PlannedModel {
                    model: model.to_string(),
                    estimate_usd,
                });
            }
        }
        Plan { models }
    }

    /// The estimate of the first model, the one expected to serve.
    pub fn estimate_usd(&self) -> Option<f64> {
        self.models.first().and_then(|m| m.estimate_usd)
    }
}

/// The provider's answer: image bytes whose format is not yet trusted.
#[derive(Debug, Clone)]
pub struct ProviderImage {
    pub bytes: Bytes,
    /// The media type the provider claimed, if any. Informational only: formats lie.
    pub claimed_media_type: Option<String>,
    /// What the provider billed for this call, in USD, when it said.
    pub cost: Option<f64>,
}

#[async_trait]
pub trait ImageProvider: Send + Sync {
    /// `openrouter`, `placeholder`: recorded as `generation_params.provider`.
    fn name(&self) -> &'static str;

    /// The endpoint flavour (`images`, `chat`), when the provider has more than one.
    fn api(&self) -> Option<&'static str>;

    /// Generates one image. Errors carry the provider's status and message, classified into
    /// the stable error types; the caller decides whether to retry.
    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage>;

    /// Checks a scene before any call and says which models to try and what it should
    /// cost. An `invalid_request` means the asked-for model cannot serve it; a
    /// `model_unavailable` that no model of the chain can. Costs nothing (a provider may
    /// read and cache its catalogue). The default checks nothing and knows no price.
    async fn plan(&self, spec: &SceneSpec<'_>) -> Result<Plan> {
        Ok(Plan::unchecked(spec, None))
    }
}

/// Builds the provider `kind` names (`STAGE3_PROVIDER`). Called once at start-up: the HTTP
/// client and its connection pool live as long as the provider.
pub fn from_settings(
    kind: ProviderKind,
    openrouter: &OpenRouterSettings,
) -> Result<Arc<dyn ImageProvider>> {
    Ok(match kind {
        ProviderKind::OpenRouter => Arc::new(OpenRouterProvider::new(openrouter)?),
        ProviderKind::Placeholder => Arc::new(PlaceholderProvider::new()),
    })
}
