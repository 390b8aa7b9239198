//! The tests' one way to configure Stage 3: variables fed to `Config::from_lookup`, as the
//! environment would feed them, but per test (tests run in parallel, so the process
//! environment is off limits).
//!
//! What every test shares is said once, in [`TestConfig::new`]; a test states only what its
//! assertions depend on, with [`TestConfig::set`] or one of the named steps.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use stage3::provider::{ImageProvider, Providers};
use stage3::storage::ObjectStore;
use stage3::{Config, Stage3Service};

use super::s3_server::S3Target;

#[derive(Debug, Clone)]
pub struct TestConfig {
    vars: HashMap<String, String>,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig::new()
    }
}

impl TestConfig {
    /// The offline placeholder provider, with retries that wait milliseconds instead of the
    /// production seconds: a test meeting a transient fault should not sit out a real
    /// backoff. Tests that time a pause set the delays they measure themselves.
    pub fn new() -> Self {
        TestConfig {
            vars: HashMap::new(),
        }
        .set("STAGE3_PROVIDER", "placeholder")
        .set("STAGE3_RETRY_BASE_MS", "5")
        .set("STAGE3_RETRY_MAX_MS", "50")
    }

    /// The real OpenRouter client, talking to a stand-in at `base_url` with `key` (each
    /// suite has its own key, to check it never leaks into what the suite sees).
    pub fn openrouter(self, base_url: &str, key: &str) -> Self {
        self.set("STAGE3_PROVIDER", "openrouter")
            .set("OPENROUTER_BASE_URL", base_url)
            .set("OPENROUTER_API_KEY", key)
    }

    /// The real Volcengine Ark client, talking to a stand-in at `base_url` with `key`.
    pub fn ark(self, base_url: &str, key: &str) -> Self {
        self.set("STAGE3_PROVIDER", "ark")
            .set("ARK_BASE_URL", base_url)
            .set("ARK_API_KEY", key)
    }

    /// The real DashScope client, talking to a stand-in at `base_url` with `key`.
    pub fn dashscope(self, base_url: &str, key: &str) -> Self {
        self.set("STAGE3_PROVIDER", "dashscope")
            .set("DASHSCOPE_BASE_URL", base_url)
            .set("DASHSCOPE_API_KEY", key)
    }

    /// Images and records go to `dir` (the filesystem store).
    pub fn out(self, dir: &Path) -> Self {
        self.set(
            "STAGE3_OUTPUT_DIR",
            dir.to_str().expect("a UTF-8 temporary path"),
        )
    }

    /// Images and records go to `target`'s bucket.
    pub fn s3(mut self, target: &S3Target) -> Self {
        self.vars.extend(target.env_vars());
        self
    }

    /// Image URLs on loopback may be fetched: a stand-in image host is on loopback, and the
    /// client refuses such addresses otherwise (they would reach the machine's own services).
    pub fn loopback_image_urls(self) -> Self {
        self.set("STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS", "1")
    }

    /// Sets one variable; a later setting wins.
    pub fn set(mut self, name: &str, value: impl Into<String>) -> Self {
        self.vars.insert(name.to_string(), value.into());
        self
    }

    /// Sets each `(name, value)` in turn.
    pub fn set_all(self, vars: &[(&str, &str)]) -> Self {
        vars.iter()
            .fold(self, |config, (name, value)| config.set(name, *value))
    }

    pub fn build(&self) -> Config {
        Config::from_lookup(|name| self.vars.get(name).cloned())
            .expect("a test configuration is valid")
    }

    /// The service as the binaries build it: provider and store from the configuration.
    pub async fn service(&self) -> Stage3Service {
        Stage3Service::from_config(self.build())
            .await
            .expect("the test configuration builds a service")
    }

    /// The service over a test's own provider and store.
    pub fn service_with(
        &self,
        provider: Arc<dyn ImageProvider>,
        store: Arc<dyn ObjectStore>,
    ) -> Stage3Service {
        Stage3Service::new(self.build(), provider, store)
    }

    /// The configured providers over a test's own store.
    pub fn service_with_store(&self, store: Arc<dyn ObjectStore>) -> Stage3Service {
        let config = self.build();
        let providers = Providers::new(config.provider, config.providers.clone());
        Stage3Service::with_providers(config, providers, store)
    }
}
