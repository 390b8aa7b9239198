//! What the providers are built from: read from the environment by [`crate::config`],
//! one settings struct per provider, so each client is built from its own settings alone.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use crate::image_spec::ProviderKind;
use crate::secret::Secret;

/// Which OpenRouter endpoint generates images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRouterApi {
    /// `POST {base}/images`, the Image API.
    Images,
    /// `POST {base}/chat/completions` with image modalities.
    Chat,
}

impl OpenRouterApi {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OpenRouterApi::Images => "images",
            OpenRouterApi::Chat => "chat",
        }
    }
}

impl FromStr for OpenRouterApi {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "images" => Ok(OpenRouterApi::Images),
            "chat" => Ok(OpenRouterApi::Chat),
            other => Err(format!("unknown API {other:?}; expected images or chat")),
        }
    }
}

/// What every provider's HTTP clients share (`STAGE3_CONNECT_TIMEOUT_SECS`,
/// `STAGE3_MAX_RESPONSE_BYTES`, `STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS`).
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// The longest wait for a connection, to the API and to image URLs alike.
    pub connect_timeout: Duration,
    /// The largest answer or image download read, enforced while reading.
    pub max_response_bytes: usize,
    /// Image URLs on loopback may be fetched (test stand-ins). Private and link-local
    /// addresses are refused regardless.
    pub allow_loopback_image_urls: bool,
}

/// What the OpenRouter client is built from.
#[derive(Debug, Clone)]
pub struct OpenRouterSettings {
    pub api_key: Option<Secret>,
    pub base_url: String,
    pub api: OpenRouterApi,
    /// Sent as `HTTP-Referer` for OpenRouter's app attribution, when set.
    pub referer: Option<String>,
    /// Sent as `X-OpenRouter-Title`, when set.
    pub title: Option<String>,
    /// The chat path's `modalities`: image-only models refuse `["image", "text"]`.
    pub chat_modalities: ChatModalities,
    pub http: HttpSettings,
    /// `STAGE3_PRICES` entries for OpenRouter models: used instead of the catalogue's.
    pub prices: HashMap<String, f64>,
}

/// What the Volcengine Ark or DashScope client is built from: a key, a region's base URL,
/// and the price overrides of its models (`STAGE3_PRICES`).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub api_key: Option<Secret>,
    pub base_url: String,
    pub http: HttpSettings,
    /// Model → USD per image, over the provider's own table.
    pub prices: HashMap<String, f64>,
}

/// Every provider's settings: the service builds a provider when a model's chain first
/// reaches it.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub openrouter: OpenRouterSettings,
    pub ark: ApiSettings,
    pub dashscope: ApiSettings,
}

impl ProviderSettings {
    /// The variable holding `kind`'s key, and whether it is set; `None` for a provider
    /// that needs none.
    pub(crate) fn key_of(&self, kind: ProviderKind) -> Option<(&'static str, bool)> {
        let set =
            |key: &Option<Secret>| key.as_ref().is_some_and(|k| !k.expose().trim().is_empty());
        match kind {
            ProviderKind::OpenRouter => Some(("OPENROUTER_API_KEY", set(&self.openrouter.api_key))),
            ProviderKind::Ark => Some(("ARK_API_KEY", set(&self.ark.api_key))),
            ProviderKind::DashScope => Some(("DASHSCOPE_API_KEY", set(&self.dashscope.api_key))),
            ProviderKind::Placeholder => None,
        }
    }
}

/// What the chat path asks the model to answer with (`STAGE3_CHAT_MODALITIES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatModalities {
    /// `["image", "text"]`, for models that answer in both (Gemini image models).
    ImageAndText,
    /// `["image"]`, for image-only models (FLUX, Seedream and the like).
    ImageOnly,
}

impl ChatModalities {
    pub(crate) fn as_slice(self) -> &'static [&'static str] {
        match self {
            ChatModalities::ImageAndText => &["image", "text"],
            ChatModalities::ImageOnly => &["image"],
        }
    }
}

impl FromStr for ChatModalities {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.replace(' ', "").as_str() {
            "image,text" | "text,image" => Ok(ChatModalities::ImageAndText),
            "image" => Ok(ChatModalities::ImageOnly),
            other => Err(format!("expected image,text or image, got {other:?}")),
        }
    }
}
