//! The OpenRouter client: the Image API (`POST /images`) and the chat path.

use async_trait::async_trait;

use super::{ImageProvider, ImageRequest, ProviderImage};
use crate::config::Config;
use crate::error::Result;

#[derive(Debug)]
pub struct OpenRouterProvider {
    api: &'static str,
}

impl OpenRouterProvider {
    pub fn new(config: &Config) -> Result<Self> {
        Ok(OpenRouterProvider {
            api: config.openrouter.api.as_str(),
        })
    }
}

#[async_trait]
impl ImageProvider for OpenRouterProvider {
    fn name(&self) -> &'static str {
        "openrouter"
    }

    fn api(&self) -> Option<&'static str> {
        Some(self.api)
    }

    async fn generate(&self, _request: &ImageRequest<'_>) -> Result<ProviderImage> {
        todo!("openrouter provider")
    }
}
