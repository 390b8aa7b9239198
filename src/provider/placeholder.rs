//! The offline provider: deterministic PNGs drawn locally, no key, no network, no cost.

use async_trait::async_trait;

use super::{ImageProvider, ImageRequest, ProviderImage};
use crate::error::Result;

#[derive(Debug, Default)]
pub struct PlaceholderProvider;

impl PlaceholderProvider {
    pub fn new() -> Self {
        PlaceholderProvider
    }
}

#[async_trait]
impl ImageProvider for PlaceholderProvider {
    fn name(&self) -> &'static str {
        "placeholder"
    }

    fn api(&self) -> Option<&'static str> {
        None
    }

    async fn generate(&self, _request: &ImageRequest<'_>) -> Result<ProviderImage> {
        todo!("placeholder provider")
    }
}
