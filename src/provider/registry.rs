//! The providers one service may call: the configured one, and any other a model's chain
//! reaches (`STAGE3_MODEL_FALLBACKS=ark:…,openrouter:…`, or a request's `PROVIDER:MODEL`).
//!
//! Each provider is built the first time a chain reaches it, once: its HTTP clients and
//! connection pools then live as long as the service. A provider whose key is not set is
//! still built — its checks (catalogue, model table) need no key — but cannot be called:
//! [`Providers::callable`] says so, and the service skips such a link of a chain with a
//! warning, or refuses a scene whose first model it is with a `config` error.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use super::ProviderSettings;
use super::{
    ArkProvider, DashScopeProvider, ImageProvider, OpenRouterProvider, PlaceholderProvider,
    ProviderIdentity,
};
use crate::error::{Result, Stage3Error};
use crate::image_spec::ProviderKind;

pub struct Providers {
    /// `STAGE3_PROVIDER`: the provider of a model written without one.
    default: ProviderKind,
    settings: ProviderSettings,
    built: HashMap<ProviderKind, OnceLock<Result<Arc<dyn ImageProvider>>>>,
    /// Providers handed in ready-made ([`Providers::with`]): callable whatever the keys.
    injected: Vec<ProviderKind>,
    /// Only checks will be made, never a call (`stage3 validate`): no key is needed.
    checks_only: bool,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl Providers {
    /// The providers `settings` describe, none built yet.
    pub fn new(default: ProviderKind, settings: ProviderSettings) -> Self {
        Providers {
            default,
            settings,
            built: ProviderKind::ALL
                .into_iter()
                .map(|kind| (kind, OnceLock::new()))
                .collect(),
            injected: Vec::new(),
            checks_only: false,
        }
    }

    /// Providers for checking and pricing requests only (`stage3 validate`): no key is
    /// needed, and none is sent, since nothing that bills is called.
    pub fn for_checking(default: ProviderKind, settings: ProviderSettings) -> Self {
        Providers {
            checks_only: true,
            ..Providers::new(default, settings)
        }
    }

    /// `provider` serves `kind` (a test's scripted provider, a program's own).
    pub(crate) fn with(self, kind: ProviderKind, provider: Arc<dyn ImageProvider>) -> Self {
        let slot = OnceLock::new();
        let _ = slot.set(Ok(provider));
        let mut providers = self;
        providers.built.insert(kind, slot);
        providers.injected.push(kind);
        providers
    }

    /// The provider of a model written without `PROVIDER:`.
    pub(crate) fn default_kind(&self) -> ProviderKind {
        self.default
    }

    /// `kind`'s provider, built on first use. Fails only when it cannot be built at all
    /// (a key with characters no header allows).
    pub fn get(&self, kind: ProviderKind) -> Result<Arc<dyn ImageProvider>> {
        self.built[&kind].get_or_init(|| self.build(kind)).clone()
    }

    /// Whether `kind` can be called: its key is set (or it needs none). `Err(config)`
    /// names the missing variable.
    pub(crate) fn callable(&self, kind: ProviderKind) -> Result<()> {
        match self.settings.key_of(kind) {
            Some((variable, false)) if !self.checks_only && !self.injected.contains(&kind) => {
                Err(Stage3Error::config(format!("{variable} is not set")))
            }
            _ => Ok(()),
        }
    }

    /// Who draws for `kind`, known without building it (the request hash needs it before
    /// any provider is built).
    pub(crate) fn identity(&self, kind: ProviderKind) -> ProviderIdentity {
        match self.built[&kind].get() {
            Some(Ok(provider)) => provider.identity(),
            _ => ProviderIdentity {
                kind,
                variant: match kind {
                    ProviderKind::OpenRouter => Some(self.settings.openrouter.api.as_str()),
                    _ => None,
                },
            },
        }
    }

    fn build(&self, kind: ProviderKind) -> Result<Arc<dyn ImageProvider>> {
        Ok(match kind {
            ProviderKind::OpenRouter => Arc::new(OpenRouterProvider::for_catalogue(
                &self.settings.openrouter,
            )?),
            ProviderKind::Ark => Arc::new(ArkProvider::new(&self.settings.ark)?),
            ProviderKind::DashScope => Arc::new(DashScopeProvider::new(&self.settings.dashscope)?),
            ProviderKind::Placeholder => Arc::new(PlaceholderProvider::new()),
        })
    }
}
