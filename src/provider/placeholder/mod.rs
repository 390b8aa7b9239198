//! The offline provider: deterministic PNGs drawn locally, no key, no network, no cost.
//!
//! `--provider placeholder` runs the whole pipeline — batching, storage, CDN URLs, Lambda —
//! without an OpenRouter account, for demos, layout work and tests. Each picture is a pure
//! function of the request: the same request gives the same bytes (so caching and
//! idempotency behave as with a real model), and different scenes look different at a
//! glance. What the picture looks like, and why it is the same on every machine, is in
//! [`sketch`].

mod sketch;

use async_trait::async_trait;

use super::{ImageProvider, ImageRequest, ModelCheck, ProviderIdentity, ProviderImage};
use crate::error::{ProviderFailure, Result, Stage3Error};
use crate::image_spec::{ImageSpec, ProviderKind};
use sketch::Sketch;

#[derive(Debug, Default)]
pub struct PlaceholderProvider;

impl PlaceholderProvider {
    pub fn new() -> Self {
        PlaceholderProvider
    }
}

#[async_trait]
impl ImageProvider for PlaceholderProvider {
    fn identity(&self) -> ProviderIdentity {
        ProviderIdentity {
            kind: ProviderKind::Placeholder,
            variant: None,
        }
    }

    /// Offline and free: every model "serves", at no cost, references and all.
    async fn check(&self, _spec: &ImageSpec, _model: &str) -> Result<ModelCheck> {
        Ok(ModelCheck {
            estimate_usd: Some(0.0),
            takes_references: Some(true),
        })
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let sketch = Sketch::for_request(request);
        // Drawing and encoding take milliseconds of CPU: keep them off the async workers.
        let png = tokio::task::spawn_blocking(move || sketch.render())
            .await
            .map_err(|e| failure(format!("placeholder drawing did not finish: {e}")))??;
        Ok(ProviderImage {
            bytes: png,
            claimed_media_type: Some("image/png".to_owned()),
            cost: Some(0.0),
        })
    }
}

fn failure(message: String) -> Stage3Error {
    Stage3Error::ProviderError(ProviderFailure::new(None, message))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::deadline::CallBudget;
    use crate::schema::{ImageQuality, ImageSize};

    #[tokio::test]
    async fn generate_answers_like_a_free_png_provider() {
        let provider = PlaceholderProvider::new();
        assert_eq!(provider.identity().name(), "placeholder");
        assert_eq!(provider.identity().variant, None);
        let mut spec = ImageSpec::plain(
            crate::image_spec::ModelRef::resolve(
                "google/gemini-2.5-flash-image",
                ProviderKind::Placeholder,
            ),
            ImageSize::Landscape,
            ImageQuality::Standard,
        );
        spec.prompt = "A quiet harbour".into();
        let ask = ImageRequest {
            scene_id: "scene_009",
            spec: &spec,
            model: &spec.model.model,
            budget: CallBudget::new(Duration::from_secs(180)),
            gate: None,
        };
        let image = provider.generate(&ask).await.unwrap();
        assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
        assert_eq!(image.cost, Some(0.0));
        assert_eq!(image.bytes, Sketch::for_request(&ask).render().unwrap());
    }
}
