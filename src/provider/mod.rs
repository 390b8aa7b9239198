//! Image providers: something that turns a prompt into image bytes.
//!
//! The service talks to a provider only through [`ImageProvider`], one call per image. A
//! provider does not retry, validate or store anything: the service owns the retry budget,
//! the shared back-pressure and the deadline, so every provider gets them for free.
//!
//! - `openrouter`: OpenRouter's Image API and chat path, checked against its catalogue.
//! - `ark`: Volcengine Ark (Doubao Seedream), for mainland China.
//! - `dashscope`: Alibaba Model Studio (Qwen-Image), for mainland China.
//! - `placeholder`: offline, free, deterministic drawings.
//! - [`Providers`]: the providers one service may call, each built when a chain first
//!   reaches it; a model is `PROVIDER:MODEL`, so one chain can cross providers.
//!
//! What the API providers share — the HTTP clients, bounded reads, safe image fetches —
//! is `http` and `fetch`; what Ark and DashScope share, a model table in place of a
//! catalogue, is `table`.

mod ark;
mod dashscope;
mod fetch;
mod gate;
mod http;
mod listing;
mod openrouter;
mod placeholder;
mod registry;
mod settings;
mod table;

use async_trait::async_trait;
use bytes::Bytes;

pub use ark::ArkProvider;
pub use dashscope::DashScopeProvider;
pub use gate::AnswerGate;
pub use listing::ModelListing;
pub use openrouter::OpenRouterProvider;
pub use placeholder::PlaceholderProvider;
pub use registry::Providers;
pub use settings::{
    ApiSettings, ChatModalities, HttpSettings, OpenRouterApi, OpenRouterSettings, ProviderSettings,
};

use crate::deadline::CallBudget;
use crate::error::Result;
use crate::image_spec::{ImageSpec, ModelRef, ProviderKind};

/// One call to make: a scene's image spec, with the model of its plan to ask and the time
/// the call may take.
#[derive(Debug, Clone, Copy)]
pub struct ImageRequest<'a> {
    pub scene_id: &'a str,
    /// What to draw.
    pub spec: &'a ImageSpec,
    /// The model to call, as this provider names it: the spec's, or a fallback its plan
    /// moved on to.
    pub model: &'a str,
    /// The whole budget for this call, connect to last byte of every step; the service
    /// shortens it when a deadline is near, and running out of it says which ended it.
    pub budget: CallBudget,
    /// Where the answer waits for room before its body is read (see [`AnswerGate`]); `None`
    /// outside a batch.
    pub gate: Option<&'a AnswerGate>,
}

impl ImageRequest<'_> {
    /// The full prompt, negatives folded in: what a provider without a negative-prompt
    /// field sends (see `ImageSpec::prompt_for`).
    pub fn prompt(&self) -> &str {
        &self.spec.prompt
    }

    /// Says the provider answered with the image, before its body is read: see
    /// [`AnswerGate::answered`].
    pub async fn answered(&self) {
        if let Some(gate) = self.gate {
            gate.answered().await;
        }
    }
}

/// How a scene will be generated, decided before any call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    /// The models to try, in order: the asked-for one unless it is known to be gone, then
    /// the fallbacks that can serve the request, whichever provider each belongs to.
    /// Never empty.
    pub models: Vec<PlannedModel>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlannedModel {
    pub model: ModelRef,
    /// The expected price of one image in USD, when the provider knows it.
    pub estimate_usd: Option<f64>,
}

impl Plan {
    /// The estimate of the first model, the one expected to serve.
    pub(crate) fn estimate_usd(&self) -> Option<f64> {
        self.models.first().and_then(|m| m.estimate_usd)
    }
}

/// What a provider's check of one model for one spec found (see [`ImageProvider::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelCheck {
    /// The expected price of one image in USD, when known.
    pub estimate_usd: Option<f64>,
    /// Whether the model takes reference images, when known.
    pub takes_references: Option<bool>,
}

/// Who draws an image: the provider and, for a provider with several ways of drawing,
/// which one it uses (OpenRouter: its `images` or `chat` API). Both shape the image, so
/// both go into the request hash, and both are recorded (`generation_params.provider`,
/// `generation_params.api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderIdentity {
    pub kind: ProviderKind,
    pub variant: Option<&'static str>,
}

impl ProviderIdentity {
    /// The provider's name: `openrouter`, `ark`, `dashscope` or `placeholder`.
    pub(crate) fn name(&self) -> &'static str {
        self.kind.as_str()
    }
}

/// The provider's answer: image bytes whose format is not yet trusted.
#[derive(Debug, Clone)]
pub struct ProviderImage {
    pub bytes: Bytes,
    /// The media type the provider claimed, if any. Informational only: formats lie.
    pub claimed_media_type: Option<String>,
    /// What the provider billed for this call, in USD, when it said (or, for a provider
    /// that bills a fixed price per image, that price).
    pub cost: Option<f64>,
}

#[async_trait]
pub trait ImageProvider: Send + Sync {
    /// Who draws: see [`ProviderIdentity`].
    fn identity(&self) -> ProviderIdentity;

    /// Generates one image. Errors carry the provider's status and message, classified into
    /// the stable error types; the caller decides whether to retry.
    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage>;

    /// Checks that `model` can draw `spec` and prices it, before any call: an
    /// `invalid_request` says the model cannot serve this spec, a `model_unavailable` that
    /// the model is unknown or gone. Costs nothing (a provider may read and cache its
    /// catalogue). The service assembles a scene's chain from these checks. The default
    /// checks nothing and knows no price.
    async fn check(&self, _spec: &ImageSpec, _model: &str) -> Result<ModelCheck> {
        Ok(ModelCheck::default())
    }

    /// The models this provider can draw with, as `stage3 models` lists them.
    async fn list_models(&self) -> Result<Vec<ModelListing>> {
        Ok(Vec::new())
    }
}
