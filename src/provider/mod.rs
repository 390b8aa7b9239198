//! Image providers: something that turns a prompt into image bytes.
//!
//! The service talks to a provider only through [`ImageProvider`], one call per image. A
//! provider does not retry, validate or store anything: the service owns the retry budget,
//! the shared back-pressure and the deadline, so every provider gets them for free.

mod openrouter;
mod placeholder;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use openrouter::{ModelListing, OpenRouterProvider};
pub use placeholder::PlaceholderProvider;

use crate::config::{OpenRouterSettings, ProviderKind};
use crate::deadline::CallBudget;
use crate::error::Result;
use crate::image_spec::ImageSpec;

/// One call to make: a scene's image spec, with the model of its plan to ask and the time
/// the call may take.
#[derive(Debug, Clone, Copy)]
pub struct ImageRequest<'a> {
    pub scene_id: &'a str,
    /// What to draw.
    pub spec: &'a ImageSpec,
    /// The model to call: the spec's, or a fallback its plan moved on to.
    pub model: &'a str,
    /// The whole budget for this call, connect to last byte of every step; the service
    /// shortens it when a deadline is near, and running out of it says which ended it.
    pub budget: CallBudget,
}

impl ImageRequest<'_> {
    /// The full prompt to send.
    pub fn prompt(&self) -> &str {
        &self.spec.prompt
    }
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
    /// The spec's model then `fallbacks`, in order, unchecked.
    pub fn unchecked(spec: &ImageSpec, fallbacks: &[String], estimate_usd: Option<f64>) -> Plan {
        let mut models: Vec<PlannedModel> = Vec::new();
        for model in std::iter::once(&spec.model).chain(fallbacks) {
            if !models.iter().any(|m| m.model == *model) {
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

/// Who draws an image: the provider (`openrouter`, `placeholder`) and, for a provider with
/// several ways of drawing, which one it uses (OpenRouter: its `images` or `chat` API). Both
/// shape the image, so both go into the request hash, and both are recorded
/// (`generation_params.provider`, `generation_params.api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderIdentity {
    pub name: &'static str,
    pub variant: Option<&'static str>,
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
    /// Who draws: see [`ProviderIdentity`].
    fn identity(&self) -> ProviderIdentity;

    /// Generates one image. Errors carry the provider's status and message, classified into
    /// the stable error types; the caller decides whether to retry.
    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage>;

    /// Checks a scene's spec before any call and says which models to try — the spec's,
    /// then the `fallbacks` (`STAGE3_MODEL_FALLBACKS`) that can serve it — and what it
    /// should cost. An `invalid_request` means the asked-for model cannot serve it; a
    /// `model_unavailable` that no model of the chain can. Costs nothing (a provider may
    /// read and cache its catalogue). The default checks nothing and knows no price.
    async fn plan(&self, spec: &ImageSpec, fallbacks: &[String]) -> Result<Plan> {
        Ok(Plan::unchecked(spec, fallbacks, None))
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
