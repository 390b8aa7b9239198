//! Service configuration: the docs/design.md §2 environment variables, read once at start-up.
//!
//! Every value is parsed and checked here, so a typo fails the CLI or the Lambda's init with
//! a message that names the variable, instead of failing the first scene. Secrets are kept
//! in [`Secret`], whose `Debug` never shows them.
//!
//! [`Config`] is composed of one settings struct per component — [`OpenRouterSettings`],
//! [`StorageSettings`] (with [`S3Settings`]), [`EventSettings`], and the retry policy from
//! [`Config::retry_policy`] — and each component is built from its own settings alone, so
//! it can be built, tested and read without knowing the rest. The AWS clients among them
//! also share [`AwsConfig`], the SDK's own configuration, loaded once. The orchestrator
//! ([`crate::service`]) keeps the whole `Config`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::aws::AwsConfig;
use crate::error::{Result, Stage3Error};
use crate::events::{self, EventSettings, WebhookSettings};
use crate::image_spec::ModelRef;
use crate::image_spec::ProviderKind;
use crate::labels::{LabelSettings, DEFAULT_PRODUCER};
use crate::metrics::{MetricsFormat, METRICS_VARIABLE};
use crate::prompt::DEFAULT_MAX_PROMPT_CHARS;
use crate::provider::{
    ApiSettings, ChatModalities, HttpSettings, OpenRouterApi, OpenRouterSettings, ProviderSettings,
};
use crate::retry::RetryPolicy;
use crate::schema::{validate_model, validate_reference_url, CharacterMode};
use crate::secret::Secret;
use crate::storage::{S3Credentials, S3Settings, StorageKind, StorageSettings};
use crate::urls::CdnSigning;

pub(crate) const DEFAULT_BASE_URL: &str = "https://openrouter.ai/api/v1";
/// Volcengine Ark's Beijing region (docs/design.md §3).
pub(crate) const DEFAULT_ARK_BASE_URL: &str = "https://ark.cn-beijing.volces.com/api/v3";
/// DashScope's Beijing region; Singapore is `https://dashscope-intl.aliyuncs.com/api/v1`
/// (keys are per region).
pub(crate) const DEFAULT_DASHSCOPE_BASE_URL: &str = "https://dashscope.aliyuncs.com/api/v1";
/// OpenRouter's image guide calls it "a strong default" (docs/design.md §3); the catalogue
/// is checked before the first call, so a retirement is an error naming alternatives (and
/// `STAGE3_MODEL_FALLBACKS` serve), never a batch of paid failures.
pub const DEFAULT_MODEL: &str = "google/gemini-3.1-flash-image";
/// Ark's default: Seedream 4.5, the current model of its table (`stage3 models --provider ark`).
pub(crate) const DEFAULT_ARK_MODEL: &str = "doubao-seedream-4-5-251128";
/// DashScope's default: Qwen-Image Plus, the middle of its three models in price.
pub(crate) const DEFAULT_DASHSCOPE_MODEL: &str = "qwen-image-plus";
/// S3 presigned URLs cannot outlive seven days (SigV4's limit).
pub(crate) const MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone)]
pub struct Config {
    /// `STAGE3_PROVIDER`: the provider of every model written without `PROVIDER:`.
    pub provider: ProviderKind,
    /// `STAGE3_MODEL` as written; unset means the provider's default (`Config::model`).
    pub model: Option<String>,
    pub providers: ProviderSettings,
    pub storage: StorageSettings,
    /// CDN origin without a trailing `/`; `image_url` = base + `/` + key.
    pub public_base_url: Option<String>,
    /// Signing of CDN URLs (`STAGE3_CDN_SIGN=qiniu`), when the domain has anti-leech on.
    pub(crate) cdn_signing: Option<CdnSigning>,
    /// The GB 45438 labels every published image carries.
    pub(crate) labels: LabelSettings,
    pub concurrency: usize,
    /// Per provider request, connect to last byte.
    pub request_timeout: Duration,
    /// Retries of a transient failure; with the two delays, see `Config::retry_policy`.
    pub max_retries: u32,
    /// The first backoff step; later ones double, with full jitter.
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    pub force: bool,
    pub max_prompt_chars: usize,
    pub max_batch: usize,
    /// Largest image (width × height) we decode; a bigger one is a decompression bomb.
    pub max_image_pixels: u64,
    /// Reference images by character id (`STAGE3_CHARACTER_REFERENCES`, a JSON file): a
    /// scene's `characters_in_scene` pulls theirs in, so a character looks the same in
    /// every scene.
    pub character_references: HashMap<String, String>,
    /// `STAGE3_CHARACTER_MODE`: how a batch keeps characters the same from page to page,
    /// unless its envelope or `--character-mode` says otherwise (see `crate::cast`).
    pub character_mode: CharacterMode,
    /// Models tried in order when the asked-for one is unavailable or its transient retries
    /// are spent (`STAGE3_MODEL_FALLBACKS`, comma-separated; `--fallback-model`), each
    /// `MODEL` or `PROVIDER:MODEL` as written: see `Config::fallbacks`.
    pub model_fallbacks: Vec<String>,
    /// `STAGE3_FALLBACK_ON_REFUSAL=1`: a refusal (`content_policy`) also moves on to the next
    /// model. Off by default: a refused prompt is usually refused everywhere, and each try
    /// may be billed.
    pub fallback_on_refusal: bool,
    /// `STAGE3_MAX_COST_USD` / `--max-cost`: a batch estimated above it is refused before any
    /// call, and no call starts once spent + the next scene's estimate would pass it.
    pub max_cost_usd: Option<f64>,
    /// Where outcomes are announced besides the answer: EventBridge, a webhook, and the
    /// dead-letter queue for SQS messages that failed for good (see `crate::events`).
    pub events: EventSettings,
    /// The AWS SDK's own configuration, shared by the S3, EventBridge and SQS clients and
    /// loaded when the first of them is built.
    pub aws: AwsConfig,
    /// `STAGE3_METRICS` (`emf` or `off`), when set: the Lambda function writes metric lines
    /// unless it says `off`, the CLI only when it says `emf` (see `crate::metrics`).
    pub metrics: Option<MetricsFormat>,
}

/// What the CLI's flags set over the environment: each one given wins over its variable.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--out` over `STAGE3_OUTPUT_DIR`.
    pub output_dir: Option<PathBuf>,
    /// `--concurrency` over `STAGE3_CONCURRENCY`.
    pub concurrency: Option<usize>,
    /// `--provider` over `STAGE3_PROVIDER`.
    pub provider: Option<ProviderKind>,
    /// `--force` sets `STAGE3_FORCE`.
    pub force: bool,
    /// `--fallback-model`, repeated, replaces `STAGE3_MODEL_FALLBACKS`.
    pub fallback_models: Vec<String>,
    /// `--max-cost` over `STAGE3_MAX_COST_USD`, as written.
    pub max_cost: Option<String>,
}

impl Config {
    /// Applies the CLI's flags, checked as their variables are: a bad flag is a `config`
    /// error naming it.
    pub fn override_with(&mut self, overrides: Overrides) -> Result<()> {
        if let Some(dir) = overrides.output_dir {
            self.storage.output_dir = dir;
        }
        if let Some(concurrency) = overrides.concurrency {
            self.concurrency = concurrency;
        }
        if let Some(provider) = overrides.provider {
            self.provider = provider;
        }
        self.force |= overrides.force;
        if !overrides.fallback_models.is_empty() {
            self.model_fallbacks =
                parse_fallbacks("--fallback-model", &overrides.fallback_models.join(","))?;
        }
        if let Some(max_cost) = &overrides.max_cost {
            self.max_cost_usd = Some(parse_cost("--max-cost", max_cost)?);
        }
        Ok(())
    }

    /// The largest image worth reading back from the store: nothing stored came from an
    /// answer over `STAGE3_MAX_RESPONSE_BYTES` (`openrouter.max_response_bytes`).
    pub(crate) fn max_stored_image_bytes(&self) -> u64 {
        self.providers.openrouter.http.max_response_bytes as u64
    }

    /// The model of a request that names none: `STAGE3_MODEL`, else the provider's default.
    pub(crate) fn model(&self) -> &str {
        self.model
            .as_deref()
            .unwrap_or_else(|| default_model(self.provider))
    }

    /// The fallback chain, each model with its provider.
    pub(crate) fn fallbacks(&self) -> Vec<ModelRef> {
        self.model_fallbacks
            .iter()
            .map(|model| ModelRef::resolve(model, self.provider))
            .collect()
    }

    /// Reads the process environment, and nothing else: no file is opened. The Lambda
    /// function configures itself this way; the CLI first calls `load_dotenv` (feature
    /// `cli`).
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds a configuration from any variable source (the environment, a test's map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let vars = Vars(&lookup);
        let storage = storage_settings(&vars)?;
        let model = vars.get("STAGE3_MODEL");
        if let Some(model) = &model {
            validate_model(model).map_err(|e| Stage3Error::config(format!("STAGE3_MODEL: {e}")))?;
        }
        let providers = provider_settings(&vars)?;

        let config = Config {
            provider: vars.parse("STAGE3_PROVIDER", ProviderKind::OpenRouter)?,
            model,
            providers,
            storage,
            public_base_url: vars
                .get("STAGE3_PUBLIC_BASE_URL")
                .map(|url| url.trim_end_matches('/').to_string()),
            cdn_signing: cdn_signing(&vars)?,
            labels: LabelSettings {
                implicit: vars.flag("STAGE3_AIGC_LABEL", true)?,
                producer: vars
                    .get("STAGE3_AIGC_PRODUCER")
                    .unwrap_or_else(|| DEFAULT_PRODUCER.into()),
                propagator: vars.get("STAGE3_AIGC_PROPAGATOR").unwrap_or_default(),
                visible: vars.flag("STAGE3_VISIBLE_LABEL", false)?,
            },
            concurrency: vars.parse_in("STAGE3_CONCURRENCY", 4, 1..=256)?,
            request_timeout: Duration::from_secs(vars.parse_in(
                "STAGE3_TIMEOUT_SECS",
                180,
                1..=3600,
            )?),
            max_retries: vars.parse_in("STAGE3_MAX_RETRIES", 3, 0..=20)?,
            retry_base_delay: Duration::from_millis(vars.parse_in(
                "STAGE3_RETRY_BASE_MS",
                1000,
                0..=600_000,
            )?),
            retry_max_delay: Duration::from_millis(vars.parse_in(
                "STAGE3_RETRY_MAX_MS",
                60_000,
                0..=3_600_000,
            )?),
            force: vars.flag("STAGE3_FORCE", false)?,
            max_prompt_chars: vars.parse_in(
                "STAGE3_MAX_PROMPT_CHARS",
                DEFAULT_MAX_PROMPT_CHARS,
                1..=1_000_000,
            )?,
            max_batch: vars.parse_in("STAGE3_MAX_BATCH", 500, 1..=100_000)?,
            max_image_pixels: vars.parse_in(
                "STAGE3_MAX_IMAGE_PIXELS",
                crate::normalize::DEFAULT_MAX_IMAGE_PIXELS,
                1..=1_000_000_000,
            )?,
            character_references: match vars.get("STAGE3_CHARACTER_REFERENCES") {
                Some(path) => load_character_references(&path)?,
                None => HashMap::new(),
            },
            character_mode: match vars.get("STAGE3_CHARACTER_MODE") {
                Some(raw) => raw.parse().map_err(|_| {
                    Stage3Error::config(format!(
                        "STAGE3_CHARACTER_MODE: expected off, first-appearance or sheet, got {raw:?}"
                    ))
                })?,
                None => CharacterMode::Off,
            },
            events: event_settings(&vars)?,
            aws: AwsConfig::new(
                vars.get("AWS_REGION")
                    .or_else(|| vars.get("AWS_DEFAULT_REGION")),
            ),
            model_fallbacks: parse_fallbacks(
                "STAGE3_MODEL_FALLBACKS",
                &vars.get("STAGE3_MODEL_FALLBACKS").unwrap_or_default(),
            )?,
            fallback_on_refusal: vars.flag("STAGE3_FALLBACK_ON_REFUSAL", false)?,
            max_cost_usd: match vars.get("STAGE3_MAX_COST_USD") {
                Some(raw) => Some(parse_cost("STAGE3_MAX_COST_USD", &raw)?),
                None => None,
            },
            metrics: match vars.get(METRICS_VARIABLE) {
                Some(raw) => Some(raw.parse()?),
                None => None,
            },
        };
        if let Some(base) = &config.public_base_url {
            check_url("STAGE3_PUBLIC_BASE_URL", base)?;
        }
        if config.cdn_signing.is_some() && config.public_base_url.is_none() {
            return Err(Stage3Error::config(
                "STAGE3_CDN_SIGN needs STAGE3_PUBLIC_BASE_URL: only CDN URLs can be signed",
            ));
        }
        for (name, base_url) in [
            ("OPENROUTER_BASE_URL", &config.providers.openrouter.base_url),
            ("ARK_BASE_URL", &config.providers.ark.base_url),
            ("DASHSCOPE_BASE_URL", &config.providers.dashscope.base_url),
        ] {
            check_url(name, base_url)?;
            check_key_travels_encrypted(name, base_url)?;
        }
        Ok(config)
    }

    /// The retry policy for provider calls (`STAGE3_MAX_RETRIES`, `STAGE3_RETRY_BASE_MS`,
    /// `STAGE3_RETRY_MAX_MS`). Derived rather than stored: the service also reads
    /// `max_retries` to size a scene's time budget.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            base_delay: self.retry_base_delay,
            max_delay: self.retry_max_delay,
        }
    }

    /// Cross-field checks, run after command-line overrides: what the chosen provider and
    /// storage need must be present.
    pub(crate) fn validate(&self) -> Result<()> {
        // The provider of the default model must be usable; a fallback's may be left
        // without a key (that link is skipped, with a warning).
        let first = ModelRef::resolve(self.model(), self.provider);
        if let Some((variable, false)) = self.providers.key_of(first.provider) {
            let hint = if first.provider == self.provider {
                "; set it, or use the offline provider with STAGE3_PROVIDER=placeholder \
                 (--provider placeholder)"
            } else {
                ""
            };
            return Err(Stage3Error::config(format!(
                "{variable} is not set{hint}; the model {} needs it",
                first.written_for(self.provider)
            )));
        }
        if self.storage.kind == StorageKind::S3 && self.storage.s3.is_none() {
            return Err(Stage3Error::config("STAGE3_S3_BUCKET is not set"));
        }
        Ok(())
    }
}

/// Every provider's variables, and the HTTP settings they share.
fn provider_settings(vars: &Vars<'_>) -> Result<ProviderSettings> {
    let http = HttpSettings {
        allow_loopback_image_urls: vars.flag("STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS", false)?,
        connect_timeout: Duration::from_secs(vars.parse_in(
            "STAGE3_CONNECT_TIMEOUT_SECS",
            10,
            1..=600,
        )?),
        max_response_bytes: vars.parse_in(
            "STAGE3_MAX_RESPONSE_BYTES",
            64 * 1024 * 1024,
            1024..=1024 * 1024 * 1024,
        )?,
    };
    let mut prices = parse_prices(&vars.get("STAGE3_PRICES").unwrap_or_default())?;
    let mut prices_of = |kind: ProviderKind| -> HashMap<String, f64> {
        let mine: Vec<ModelRef> = prices
            .keys()
            .filter(|m| m.provider == kind)
            .cloned()
            .collect();
        mine.into_iter()
            .filter_map(|model| prices.remove_entry(&model))
            .map(|(model, usd)| (model.model, usd))
            .collect()
    };
    let base_url = |name: &str, default: &str| {
        vars.get(name)
            .unwrap_or_else(|| default.into())
            .trim_end_matches('/')
            .to_string()
    };
    Ok(ProviderSettings {
        openrouter: OpenRouterSettings {
            api_key: vars.get("OPENROUTER_API_KEY").map(Secret::new),
            base_url: base_url("OPENROUTER_BASE_URL", DEFAULT_BASE_URL),
            api: vars.parse("STAGE3_OPENROUTER_API", OpenRouterApi::Images)?,
            referer: vars.get("STAGE3_HTTP_REFERER"),
            title: vars.get("STAGE3_APP_TITLE"),
            chat_modalities: vars.parse("STAGE3_CHAT_MODALITIES", ChatModalities::ImageAndText)?,
            http,
            prices: prices_of(ProviderKind::OpenRouter),
        },
        ark: ApiSettings {
            api_key: vars.get("ARK_API_KEY").map(Secret::new),
            base_url: base_url("ARK_BASE_URL", DEFAULT_ARK_BASE_URL),
            http,
            prices: prices_of(ProviderKind::Ark),
        },
        dashscope: ApiSettings {
            api_key: vars.get("DASHSCOPE_API_KEY").map(Secret::new),
            base_url: base_url("DASHSCOPE_BASE_URL", DEFAULT_DASHSCOPE_BASE_URL),
            http,
            prices: prices_of(ProviderKind::DashScope),
        },
    })
}

/// The file the CLI reads variables from: `.env` in the working directory.
#[cfg(feature = "cli")]
pub(crate) const DOTENV_FILE: &str = ".env";

/// Loads `./.env` of the working directory into the process environment, values already
/// in the environment winning; a missing file is no error. Only this one file: a search
/// upward (`dotenvy::dotenv()`) let a `.env` in some parent directory, which nobody running
/// the CLI had looked at, point `OPENROUTER_BASE_URL` elsewhere and send the key there.
/// Only the CLI calls this, and before it starts any thread (it sets variables); the
/// Lambda function's configuration is its environment alone. Answers whether a file was
/// read. Only in builds with the `cli` feature: the Lambda build has no `.env` reader at
/// all, so nothing in it can start reading one.
#[cfg(feature = "cli")]
pub fn load_dotenv() -> Result<bool> {
    match dotenvy::from_path(DOTENV_FILE) {
        Ok(()) => Ok(true),
        Err(e) if e.not_found() => Ok(false),
        // The parser's own message quotes the line, which may hold a key: say where only.
        Err(dotenvy::Error::LineParse(_, at)) => Err(Stage3Error::config(format!(
            "{DOTENV_FILE}: a line cannot be parsed (at character {at} of the line)"
        ))),
        Err(e) => Err(Stage3Error::config(format!("{DOTENV_FILE}: {e}"))),
    }
}

/// The model a provider draws with when neither the request nor `STAGE3_MODEL` names one.
pub(crate) fn default_model(provider: ProviderKind) -> &'static str {
    match provider {
        ProviderKind::OpenRouter | ProviderKind::Placeholder => DEFAULT_MODEL,
        ProviderKind::Ark => DEFAULT_ARK_MODEL,
        ProviderKind::DashScope => DEFAULT_DASHSCOPE_MODEL,
    }
}

/// `STAGE3_PRICES`: `provider:model=usd` pairs, comma-separated. Every entry names its
/// provider: a price is a fact about one provider's model, whatever `STAGE3_PROVIDER` is.
fn parse_prices(raw: &str) -> Result<HashMap<ModelRef, f64>> {
    const NAME: &str = "STAGE3_PRICES";
    let mut prices = HashMap::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (model, usd) = entry.rsplit_once('=').ok_or_else(|| {
            Stage3Error::config(format!(
                "{NAME}: expected provider:model=usd, got {:?}",
                entry.chars().take(80).collect::<String>()
            ))
        })?;
        let (provider, name) = model.trim().split_once(':').unwrap_or(("", model));
        let Ok(provider) = provider.parse::<ProviderKind>() else {
            return Err(Stage3Error::config(format!(
                "{NAME}: {:?} does not start with a provider (openrouter:, ark:, dashscope:)",
                model.chars().take(80).collect::<String>()
            )));
        };
        validate_model(name).map_err(|e| Stage3Error::config(format!("{NAME}: {e}")))?;
        let usd = parse_cost(NAME, usd)?;
        prices.insert(
            ModelRef {
                provider,
                model: name.to_string(),
            },
            usd,
        );
    }
    Ok(prices)
}

/// The storage backend and its variables; the S3 ones only when S3 is chosen.
fn storage_settings(vars: &Vars<'_>) -> Result<StorageSettings> {
    let kind = vars.parse("STAGE3_STORAGE", StorageKind::Fs)?;
    let s3 = match kind {
        StorageKind::S3 => Some(S3Settings {
            bucket: vars.required("STAGE3_S3_BUCKET")?,
            endpoint: vars.get("STAGE3_S3_ENDPOINT"),
            region: vars
                .get("STAGE3_S3_REGION")
                .or_else(|| vars.get("AWS_REGION"))
                .unwrap_or_else(|| "us-east-1".to_string()),
            prefix: normalize_prefix(&vars.get("STAGE3_S3_PREFIX").unwrap_or_default()),
            force_path_style: vars.flag("STAGE3_S3_FORCE_PATH_STYLE", true)?,
            presign_expiry: Duration::from_secs(vars.parse_in(
                "STAGE3_S3_PRESIGN_SECS",
                3600,
                1..=MAX_PRESIGN_SECS,
            )?),
            credentials: s3_credentials(vars)?,
        }),
        StorageKind::Fs => None,
    };
    Ok(StorageSettings {
        kind,
        output_dir: PathBuf::from(
            vars.get("STAGE3_OUTPUT_DIR")
                .unwrap_or_else(|| "./output/images".into()),
        ),
        s3,
    })
}

/// `STAGE3_CDN_SIGN=qiniu` with its key and lifetime, or no signing.
fn cdn_signing(vars: &Vars<'_>) -> Result<Option<CdnSigning>> {
    match vars.get("STAGE3_CDN_SIGN").as_deref() {
        None | Some("none" | "off") => Ok(None),
        Some("qiniu") => Ok(Some(CdnSigning {
            key: Secret::new(vars.required("STAGE3_CDN_SIGN_KEY")?),
            ttl: Duration::from_secs(vars.parse_in(
                "STAGE3_CDN_URL_TTL_SECS",
                3600,
                1..=366 * 24 * 3600,
            )?),
        })),
        Some(other) => Err(Stage3Error::config(format!(
            "STAGE3_CDN_SIGN: unknown scheme {other:?}; expected qiniu or none"
        ))),
    }
}

/// Both halves of a static key pair, or neither.
fn s3_credentials(vars: &Vars<'_>) -> Result<Option<S3Credentials>> {
    const ID: &str = "STAGE3_S3_ACCESS_KEY_ID";
    const SECRET: &str = "STAGE3_S3_SECRET_ACCESS_KEY";
    match (vars.get(ID), vars.get(SECRET)) {
        (Some(access_key_id), Some(secret)) => Ok(Some(S3Credentials {
            access_key_id,
            secret_access_key: Secret::new(secret),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(Stage3Error::config(format!(
            "{ID} is set but {SECRET} is not; set both or neither"
        ))),
        (None, Some(_)) => Err(Stage3Error::config(format!(
            "{SECRET} is set but {ID} is not; set both or neither"
        ))),
    }
}

/// The event outlets; the webhook's URL and secret come both or neither.
fn event_settings(vars: &Vars<'_>) -> Result<EventSettings> {
    const URL: &str = "STAGE3_WEBHOOK_URL";
    const SECRET: &str = "STAGE3_WEBHOOK_SECRET";
    let event_bus = vars.get("STAGE3_EVENT_BUS");
    if let Some(bus) = &event_bus {
        // A name (`[A-Za-z0-9._/-]`, at most 256) or an ARN; whitespace or quotes mean a
        // copy-paste accident that EventBridge would refuse on every call.
        if bus.len() > 1600 || bus.chars().any(|c| c.is_whitespace() || c == '"') {
            return Err(Stage3Error::config(format!(
                "STAGE3_EVENT_BUS: expected an event bus name or ARN, got {bus:?}"
            )));
        }
    }
    let webhook = match (vars.get(URL), vars.get(SECRET)) {
        (Some(url), Some(secret)) => {
            check_url(URL, &url)?;
            Some(WebhookSettings {
                url,
                secret: Secret::new(secret),
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(Stage3Error::config(format!(
                "{URL} is set but {SECRET} is not; every webhook event is signed, set both"
            )))
        }
        (None, Some(_)) => {
            return Err(Stage3Error::config(format!(
                "{SECRET} is set but {URL} is not; set both or neither"
            )))
        }
    };
    let dead_letter_queue_url = vars.get("STAGE3_DEAD_LETTER_QUEUE_URL");
    if let Some(url) = &dead_letter_queue_url {
        check_url("STAGE3_DEAD_LETTER_QUEUE_URL", url)?;
    }
    Ok(EventSettings {
        event_bus,
        webhook,
        dead_letter_queue_url,
        cli_budget: events::cli_budget(|name| vars.get(name))?,
    })
}

/// Reads `{"character_id": "https://…" | "data:image/…", …}` and checks every URL.
fn load_character_references(path: &str) -> Result<HashMap<String, String>> {
    let name = "STAGE3_CHARACTER_REFERENCES";
    let text = std::fs::read_to_string(path)
        .map_err(|e| Stage3Error::config(format!("{name}: cannot read {path}: {e}")))?;
    let map: HashMap<String, String> = serde_json::from_str(&text).map_err(|e| {
        Stage3Error::config(format!(
            "{name}: {path} must be a JSON object of character id to image URL: {e}"
        ))
    })?;
    for (character, url) in &map {
        validate_reference_url(url)
            .map_err(|e| Stage3Error::config(format!("{name}: {character}: {e}")))?;
    }
    Ok(map)
}

/// `images/` from `images`, `` from `/` or ``: keys are `prefix + name`.
fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

fn check_url(name: &str, url: &str) -> Result<()> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(Stage3Error::config(format!(
            "{name}: expected an http:// or https:// URL, got {url:?}"
        )))
    }
}

/// Comma-separated model slugs, each checked like `STAGE3_MODEL`; blanks skipped.
fn parse_fallbacks(name: &str, raw: &str) -> Result<Vec<String>> {
    let mut models: Vec<String> = Vec::new();
    for model in raw.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        validate_model(model).map_err(|e| Stage3Error::config(format!("{name}: {e}")))?;
        if !models.iter().any(|m| m == model) {
            models.push(model.to_string());
        }
    }
    Ok(models)
}

/// A budget in USD: a finite, non-negative number.
fn parse_cost(name: &str, raw: &str) -> Result<f64> {
    raw.trim()
        .trim_start_matches('$')
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| {
            Stage3Error::config(format!(
                "{name}: expected an amount in USD such as 2.50, got {:?}",
                raw.chars().take(40).collect::<String>()
            ))
        })
}

/// An API key travels with every call to a provider's base URL (`name`): plain `http` is
/// allowed only to this machine (a local stand-in), where nobody is on the path.
fn check_key_travels_encrypted(name: &str, base_url: &str) -> Result<()> {
    let Some(rest) = base_url.strip_prefix("http://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => host,
        None => authority,
    };
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(Stage3Error::config(format!(
            "{name}: plain http to {host:?} would send the API key in clear text; \
             use https (http is accepted for loopback only)"
        )))
    }
}

/// Typed access to variables, with errors that name them. Blank values count as unset.
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<String> {
        self.get(name)
            .ok_or_else(|| Stage3Error::config(format!("{name} is required but not set")))
    }

    fn parse<T: FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|e| {
                // "invalid digit found in string" alone does not say what was read.
                Stage3Error::config(format!("{name}: cannot use {raw:?}: {e}"))
            }),
        }
    }

    fn parse_in<T>(&self, name: &str, default: T, range: std::ops::RangeInclusive<T>) -> Result<T>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
        T::Err: fmt::Display,
    {
        let value: T = match self.get(name) {
            None => default,
            Some(raw) => raw.parse().map_err(|_| {
                Stage3Error::config(format!(
                    "{name}: expected a number from {} to {}, got {raw:?}",
                    range.start(),
                    range.end()
                ))
            })?,
        };
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(Stage3Error::config(format!(
                "{name}: {value} is out of range {}..={}",
                range.start(),
                range.end()
            )))
        }
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(other) => Err(Stage3Error::config(format!(
                "{name}: expected 1/0 or true/false, got {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = config(&[]).unwrap();
        assert_eq!(c.provider, ProviderKind::OpenRouter);
        assert_eq!(c.model(), DEFAULT_MODEL);
        assert_eq!(c.providers.openrouter.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.providers.openrouter.api, OpenRouterApi::Images);
        assert_eq!(c.storage.kind, StorageKind::Fs);
        assert_eq!(c.storage.output_dir, PathBuf::from("./output/images"));
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.request_timeout, Duration::from_secs(180));
        assert_eq!(c.max_retries, 3);
        assert!(!c.force);
        assert_eq!(c.max_prompt_chars, 4000);
    }

    #[test]
    fn openrouter_without_a_key_fails_validation_and_names_the_variable() {
        let err = config(&[]).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("OPENROUTER_API_KEY"));
        config(&[("STAGE3_PROVIDER", "placeholder")])
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("STAGE3_CONCURRENCY", "0"),
            ("STAGE3_CONCURRENCY", "many"),
            ("STAGE3_PROVIDER", "dalle"),
            ("STAGE3_STORAGE", "ftp"),
            ("STAGE3_FORCE", "maybe"),
            ("STAGE3_PUBLIC_BASE_URL", "img.example.com"),
            ("STAGE3_OPENROUTER_API", "rest"),
        ] {
            let err = config(&[(name, value)]).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        let err = config(&[("STAGE3_STORAGE", "s3")]).unwrap_err();
        assert!(err.to_string().contains("STAGE3_S3_BUCKET"));
    }

    #[test]
    fn s3_settings_are_normalised() {
        let c = config(&[
            ("STAGE3_STORAGE", "s3"),
            ("STAGE3_S3_BUCKET", "pictures"),
            ("STAGE3_S3_PREFIX", "/stories/"),
            ("STAGE3_PUBLIC_BASE_URL", "https://img.example.com/"),
        ])
        .unwrap();
        let s3 = c.storage.s3.unwrap();
        assert_eq!(s3.prefix, "stories/");
        assert!(s3.force_path_style);
        assert_eq!(
            c.public_base_url.as_deref(),
            Some("https://img.example.com")
        );
    }

    #[test]
    fn s3_keys_come_in_pairs_and_stay_secret() {
        let base = [("STAGE3_STORAGE", "s3"), ("STAGE3_S3_BUCKET", "pictures")];
        assert!(config(&base)
            .unwrap()
            .storage
            .s3
            .unwrap()
            .credentials
            .is_none());

        let mut with_keys = base.to_vec();
        with_keys.push(("STAGE3_S3_ACCESS_KEY_ID", "AKQINIU"));
        with_keys.push(("STAGE3_S3_SECRET_ACCESS_KEY", "qiniu-very-secret"));
        let c = config(&with_keys).unwrap();
        let keys = c.storage.s3.as_ref().unwrap().credentials.as_ref().unwrap();
        assert_eq!(keys.access_key_id, "AKQINIU");
        assert_eq!(keys.secret_access_key.expose(), "qiniu-very-secret");
        assert!(!format!("{c:?}").contains("very-secret"));

        for half in [
            ("STAGE3_S3_ACCESS_KEY_ID", "AKQINIU"),
            ("STAGE3_S3_SECRET_ACCESS_KEY", "qiniu-very-secret"),
        ] {
            let mut vars = base.to_vec();
            vars.push(half);
            let err = config(&vars).unwrap_err();
            assert!(
                err.to_string().contains("STAGE3_S3_SECRET_ACCESS_KEY"),
                "{err}"
            );
            assert!(!err.to_string().contains("very-secret"), "{err}");
        }
    }

    #[test]
    fn character_references_load_from_a_json_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("refs.json");
        std::fs::write(&good, r#"{"char_001": "https://cdn.example.com/fox.png"}"#).unwrap();
        let c = config(&[("STAGE3_CHARACTER_REFERENCES", good.to_str().unwrap())]).unwrap();
        assert_eq!(
            c.character_references["char_001"],
            "https://cdn.example.com/fox.png"
        );

        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            r#"{"char_001": "http://insecure.example.com/fox.png"}"#,
        )
        .unwrap();
        for path in [bad, dir.path().join("missing.json")] {
            let err =
                config(&[("STAGE3_CHARACTER_REFERENCES", path.to_str().unwrap())]).unwrap_err();
            assert!(
                err.to_string().contains("STAGE3_CHARACTER_REFERENCES"),
                "{err}"
            );
        }
    }

    #[test]
    fn chat_modalities_take_image_only_models_into_account() {
        assert_eq!(
            config(&[])
                .unwrap()
                .providers
                .openrouter
                .chat_modalities
                .as_slice(),
            ["image", "text"]
        );
        let c = config(&[("STAGE3_CHAT_MODALITIES", "image")]).unwrap();
        assert_eq!(c.providers.openrouter.chat_modalities.as_slice(), ["image"]);
        assert!(config(&[("STAGE3_CHAT_MODALITIES", "audio")]).is_err());
    }

    #[test]
    fn events_are_off_unless_configured() {
        let c = config(&[]).unwrap();
        assert!(c.events.event_bus.is_none());
        assert!(c.events.webhook.is_none());
        assert!(c.events.dead_letter_queue_url.is_none());
    }

    #[test]
    fn the_webhook_needs_its_secret_and_never_shows_it() {
        let url = ("STAGE3_WEBHOOK_URL", "https://hooks.example.com/stage3");
        let secret = ("STAGE3_WEBHOOK_SECRET", "whsec-very-secret");
        let c = config(&[url, secret]).unwrap();
        let webhook = c.events.webhook.as_ref().unwrap();
        assert_eq!(webhook.url, "https://hooks.example.com/stage3");
        assert_eq!(webhook.secret.expose(), "whsec-very-secret");
        assert!(!format!("{c:?}").contains("very-secret"));

        for half in [url, secret] {
            let err = config(&[half]).unwrap_err();
            assert!(err.to_string().contains("STAGE3_WEBHOOK_SECRET"), "{err}");
            assert!(!err.to_string().contains("very-secret"), "{err}");
        }
        let err = config(&[("STAGE3_WEBHOOK_URL", "hooks.example.com"), secret]).unwrap_err();
        assert!(err.to_string().contains("STAGE3_WEBHOOK_URL"), "{err}");
    }

    #[test]
    fn bad_event_targets_name_their_variable() {
        for (name, value) in [
            ("STAGE3_EVENT_BUS", "my bus"),
            ("STAGE3_DEAD_LETTER_QUEUE_URL", "stage3-dlq"),
        ] {
            let err = config(&[(name, value)]).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn the_aws_region_comes_from_either_variable() {
        assert_eq!(config(&[]).unwrap().aws.region(), None);
        let c = config(&[("AWS_DEFAULT_REGION", "eu-west-1")]).unwrap();
        assert_eq!(c.aws.region(), Some("eu-west-1"));
        let c = config(&[
            ("AWS_REGION", "cn-north-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ])
        .unwrap();
        assert_eq!(c.aws.region(), Some("cn-north-1"));
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let c = config(&[("OPENROUTER_API_KEY", "sk-or-v1-very-secret")]).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert!(debug.contains("redacted"));
    }

    #[test]
    fn qiniu_signing_needs_its_key_and_a_cdn_base_and_hides_the_key() {
        let c = config(&[
            ("STAGE3_PUBLIC_BASE_URL", "https://img.example.com"),
            ("STAGE3_CDN_SIGN", "qiniu"),
            ("STAGE3_CDN_SIGN_KEY", "very-secret-sign-key"),
        ])
        .unwrap();
        let signing = c.cdn_signing.as_ref().unwrap();
        assert_eq!(signing.ttl, Duration::from_secs(3600));
        assert!(!format!("{c:?}").contains("very-secret-sign-key"));

        let err = config(&[
            ("STAGE3_PUBLIC_BASE_URL", "https://img.example.com"),
            ("STAGE3_CDN_SIGN", "qiniu"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("STAGE3_CDN_SIGN_KEY"), "{err}");
        let err =
            config(&[("STAGE3_CDN_SIGN", "qiniu"), ("STAGE3_CDN_SIGN_KEY", "k")]).unwrap_err();
        assert!(err.to_string().contains("STAGE3_PUBLIC_BASE_URL"), "{err}");
        assert!(config(&[("STAGE3_CDN_SIGN", "akamai")]).is_err());
    }

    #[test]
    fn the_key_never_travels_in_clear_text_beyond_loopback() {
        for ok in [
            "https://openrouter.ai/api/v1",
            "http://127.0.0.1:8080/api/v1",
            "http://localhost:9/api/v1",
            "http://[::1]:9/api/v1",
        ] {
            config(&[("OPENROUTER_BASE_URL", ok)]).unwrap();
        }
        for bad in [
            "http://openrouter.ai/api/v1",
            "http://10.0.0.5/api/v1",
            "http://127.0.0.1.evil.example/api/v1",
            "http://user@evil.example/api/v1",
        ] {
            let err = config(&[("OPENROUTER_BASE_URL", bad)]).unwrap_err();
            assert!(err.to_string().contains("clear text"), "{bad}: {err}");
        }
    }

    #[test]
    fn fallbacks_and_budget_are_read_and_checked() {
        let c = config(&[
            (
                "STAGE3_MODEL_FALLBACKS",
                " openai/gpt-image-1, ,bytedance-seed/seedream-4.5,openai/gpt-image-1",
            ),
            ("STAGE3_MAX_COST_USD", "2.50"),
        ])
        .unwrap();
        assert_eq!(
            c.model_fallbacks,
            ["openai/gpt-image-1", "bytedance-seed/seedream-4.5"]
        );
        assert_eq!(c.max_cost_usd, Some(2.5));
        assert!(config(&[("STAGE3_MODEL_FALLBACKS", "bad model")]).is_err());
        for bad in ["-1", "lots", "NaN", "inf"] {
            let err = config(&[("STAGE3_MAX_COST_USD", bad)]).unwrap_err();
            assert!(err.to_string().contains("STAGE3_MAX_COST_USD"), "{err}");
        }
        let defaults = config(&[]).unwrap();
        assert!(defaults.model_fallbacks.is_empty());
        assert_eq!(defaults.max_cost_usd, None);
        assert!(!defaults.fallback_on_refusal);
    }

    #[test]
    fn each_provider_has_its_default_model_and_its_key_is_needed_first_hand() {
        let ark = config(&[("STAGE3_PROVIDER", "ark")]).unwrap();
        assert_eq!(ark.model(), DEFAULT_ARK_MODEL);
        assert_eq!(ark.providers.ark.base_url, DEFAULT_ARK_BASE_URL);
        let err = ark.validate().unwrap_err();
        assert!(err.to_string().contains("ARK_API_KEY"), "{err}");
        let dashscope = config(&[("STAGE3_PROVIDER", "dashscope")]).unwrap();
        assert_eq!(dashscope.model(), DEFAULT_DASHSCOPE_MODEL);
        assert!(dashscope
            .validate()
            .unwrap_err()
            .to_string()
            .contains("DASHSCOPE_API_KEY"));
        // A qualified default model needs its own provider's key, whatever STAGE3_PROVIDER.
        let crossed = config(&[
            ("STAGE3_PROVIDER", "placeholder"),
            ("STAGE3_MODEL", "dashscope:qwen-image"),
        ])
        .unwrap();
        assert!(crossed
            .validate()
            .unwrap_err()
            .to_string()
            .contains("DASHSCOPE_API_KEY"));
        // A fallback's provider may lack its key: that link is skipped, not the start-up.
        config(&[
            ("STAGE3_PROVIDER", "dashscope"),
            ("DASHSCOPE_API_KEY", "sk-dash"),
            (
                "STAGE3_MODEL_FALLBACKS",
                "ark:doubao-seedream-4-5-251128,openrouter:google/x:free",
            ),
        ])
        .unwrap()
        .validate()
        .unwrap();
    }

    #[test]
    fn fallbacks_resolve_against_the_configured_provider() {
        let c = config(&[
            ("STAGE3_PROVIDER", "dashscope"),
            (
                "STAGE3_MODEL_FALLBACKS",
                "qwen-image,ark:doubao-seedream-4-0-250828,openrouter:acme/img:free",
            ),
        ])
        .unwrap();
        let fallbacks: Vec<String> = c.fallbacks().iter().map(ToString::to_string).collect();
        assert_eq!(
            fallbacks,
            [
                "dashscope:qwen-image",
                "ark:doubao-seedream-4-0-250828",
                "openrouter:acme/img:free"
            ]
        );
    }

    #[test]
    fn prices_name_their_provider_and_go_to_it() {
        let c = config(&[(
            "STAGE3_PRICES",
            "ark:doubao-seedream-4-5-251128=0.05, dashscope:qwen-image=0.03,openrouter:acme/img:free=0",
        )])
        .unwrap();
        assert_eq!(c.providers.ark.prices["doubao-seedream-4-5-251128"], 0.05);
        assert_eq!(c.providers.dashscope.prices["qwen-image"], 0.03);
        assert_eq!(c.providers.openrouter.prices["acme/img:free"], 0.0);
        for bad in ["qwen-image=0.03", "ark:x=cheap", "ark:x=-1", "ark:x"] {
            let err = config(&[("STAGE3_PRICES", bad)]).unwrap_err();
            assert!(err.to_string().contains("STAGE3_PRICES"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_base_url_keeps_its_key_encrypted() {
        let err = config(&[("ARK_BASE_URL", "http://ark.example.com/api/v3")]).unwrap_err();
        assert!(err.to_string().contains("ARK_BASE_URL"), "{err}");
        let err = config(&[("DASHSCOPE_BASE_URL", "dashscope.example.com")]).unwrap_err();
        assert!(err.to_string().contains("DASHSCOPE_BASE_URL"), "{err}");
    }

    #[test]
    fn a_bad_number_says_what_was_read_and_what_is_expected() {
        let err = config(&[("STAGE3_CONCURRENCY", "four")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "STAGE3_CONCURRENCY: expected a number from 1 to 256, got \"four\""
        );
    }
}
