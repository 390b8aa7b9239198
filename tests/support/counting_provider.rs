//! A provider wrapper that counts calls and can take its time: the tests' one fake provider.
//! Wrapped around the real placeholder it draws real, distinct PNGs per request; `varying`
//! makes every call's bytes differ (a model never draws the same picture twice).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stage3::error::Result;
use stage3::provider::{ImageProvider, ImageRequest, PlaceholderProvider, ProviderImage};

pub struct CountingProvider {
    inner: Arc<dyn ImageProvider>,
    calls: AtomicUsize,
    latency: Duration,
    varying: bool,
}

impl CountingProvider {
    /// The placeholder, counted, answering after `latency`.
    pub fn placeholder(latency: Duration) -> Self {
        CountingProvider {
            inner: Arc::new(PlaceholderProvider::new()),
            calls: AtomicUsize::new(0),
            latency,
            varying: false,
        }
    }

    /// Every call draws different bytes (the call number goes into the seed).
    pub fn varying(mut self) -> Self {
        self.varying = true;
        self
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl ImageProvider for CountingProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn api(&self) -> Option<&'static str> {
        self.inner.api()
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        if self.varying {
            let mut spec = request.spec.clone();
            spec.seed = Some(spec.seed.unwrap_or(0).wrapping_add(1000 + call as i64));
            let varied = ImageRequest {
                spec: &spec,
                ..*request
            };
            return self.inner.generate(&varied).await;
        }
        self.inner.generate(request).await
    }
}
