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

pub use openrouter::OpenRouterProvider;
pub use placeholder::PlaceholderProvider;

use crate::config::{Config, ProviderKind};
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
}

/// Builds the configured provider. Called once at start-up: the HTTP client and its
/// connection pool live as long as the provider.
pub fn from_config(config: &Config) -> Result<Arc<dyn ImageProvider>> {
    Ok(match config.provider {
        ProviderKind::OpenRouter => Arc::new(OpenRouterProvider::new(config)?),
        ProviderKind::Placeholder => Arc::new(PlaceholderProvider::new()),
    })
}
