//! A provider's models as a table in the code, for providers without a catalogue API
//! (Volcengine Ark, DashScope).
//!
//! Each row says what one model draws for each of our request sizes (the seed's
//! `1024x1024`, `1792x1024`, `1024x1792`, at `standard` and `hd`), whether it takes a seed
//! and reference images, its prompt limits, and its price per image with the date it was
//! checked. A scene is checked against its row before any call, exactly as OpenRouter
//! models are checked against the catalogue: an unknown model is `model_unavailable`, a
//! seed or reference the model cannot take is `invalid_request`, both for free.
//! `STAGE3_PRICES` overrides a row's price; `stage3 models --provider …` prints the table.

use std::collections::HashMap;

use super::{ModelCheck, ModelListing};
use crate::error::{Result, Stage3Error};
use crate::image_spec::{ImageSpec, ProviderKind};
use crate::schema::{ImageQuality, ImageSize};

/// Pixel sizes, as `(width, height)`, for `[square, landscape, portrait]`.
pub(super) type SizeTier = [(u32, u32); 3];

/// One model of a provider's table.
#[derive(Debug, Clone, Copy)]
pub(super) struct TabledModel {
    pub id: &'static str,
    pub name: &'static str,
    /// What `standard` asks for.
    pub standard: SizeTier,
    /// What `hd` asks for: the model's larger tier, or `standard` again where it has none.
    pub hd: SizeTier,
    pub takes_seed: bool,
    /// The most reference images it takes; 0 for a text-to-image model.
    pub max_references: usize,
    /// The longest prompt (and negative prompt) it takes, in characters, when it has a
    /// hard limit.
    pub max_prompt_chars: Option<usize>,
    pub max_negative_chars: Option<usize>,
    /// The price of one image in USD, and in the provider's own currency as listed.
    pub usd_per_image: f64,
    pub listed_price: &'static str,
    /// When the price was checked.
    pub price_checked: &'static str,
}

impl TabledModel {
    /// The pixel size drawn for `size` at `quality`.
    pub(super) fn pixels(&self, size: ImageSize, quality: ImageQuality) -> (u32, u32) {
        let tier = match quality {
            ImageQuality::Standard => &self.standard,
            ImageQuality::Hd => &self.hd,
        };
        match size {
            ImageSize::Square => tier[0],
            ImageSize::Landscape => tier[1],
            ImageSize::Portrait => tier[2],
        }
    }
}

/// One provider's table, with the prices `STAGE3_PRICES` sets over it.
#[derive(Debug, Clone)]
pub(super) struct ModelTable {
    provider: ProviderKind,
    /// How the provider is named in messages (`Volcengine Ark`).
    provider_name: &'static str,
    models: &'static [TabledModel],
    /// A model the table does not list by name but that stands for one it knows (Ark's
    /// `ep-…` endpoint ids): the row it is checked against.
    alias: Option<(&'static str, TabledModel)>,
    prices: HashMap<String, f64>,
}

impl ModelTable {
    pub(super) fn new(
        provider: ProviderKind,
        provider_name: &'static str,
        models: &'static [TabledModel],
        prices: HashMap<String, f64>,
    ) -> Self {
        ModelTable {
            provider,
            provider_name,
            models,
            alias: None,
            prices,
        }
    }

    /// Models whose id starts with `prefix` are checked against `row` (with its id).
    pub(crate) fn with_alias(mut self, prefix: &'static str, row: TabledModel) -> Self {
        self.alias = Some((prefix, row));
        self
    }

    /// The row of `model`, if the table knows it.
    pub(super) fn find(&self, model: &str) -> Option<TabledModel> {
        if let Some(row) = self.models.iter().find(|row| row.id == model) {
            return Some(*row);
        }
        match self.alias {
            Some((prefix, row)) if is_alias_of(model, prefix) => Some(row),
            _ => None,
        }
    }

    /// The price of one image of `model`: `STAGE3_PRICES`, else the table's. An alias has
    /// no price of its own (an endpoint may run any model).
    pub(super) fn price(&self, model: &str) -> Option<f64> {
        if let Some(price) = self.prices.get(model) {
            return Some(*price);
        }
        self.models
            .iter()
            .find(|row| row.id == model)
            .map(|row| row.usd_per_image)
    }

    /// Checks that `model` can draw `spec` (see the module documentation).
    pub(super) fn check(&self, spec: &ImageSpec, model: &str) -> Result<ModelCheck> {
        let Some(row) = self.find(model) else {
            let known: Vec<&str> = self.models.iter().map(|row| row.id).collect();
            return Err(Stage3Error::ModelUnavailable(format!(
                "{} is not a {} image model this service knows; known: {} (see `stage3 \
                 models --provider {}`)",
                super::http::shorten_slug(model),
                self.provider_name,
                known.join(", "),
                self.provider
            )));
        };
        if spec.seed.is_some() && !row.takes_seed {
            return Err(Stage3Error::invalid_request(format!(
                "{model} does not take a seed; leave `seed` out"
            )));
        }
        if spec.references.len() > row.max_references {
            return Err(Stage3Error::invalid_request(if row.max_references == 0 {
                format!("{model} takes no reference images")
            } else {
                format!(
                    "{model} takes at most {} reference images, not {}",
                    row.max_references,
                    spec.references.len()
                )
            }));
        }
        let sent = spec.prompt_for(self.provider);
        for (what, text, limit) in [
            ("image_prompt", Some(sent.prompt), row.max_prompt_chars),
            (
                "negative_prompt",
                sent.negative_prompt,
                row.max_negative_chars,
            ),
        ] {
            let (Some(text), Some(limit)) = (text, limit) else {
                continue;
            };
            let length = text.chars().count();
            if length > limit {
                return Err(Stage3Error::invalid_request(format!(
                    "{what}: {model} takes at most {limit} characters, the prompt sent would \
                     be {length}"
                )));
            }
        }
        Ok(ModelCheck {
            estimate_usd: self.price(model),
            takes_references: Some(row.max_references > 0),
        })
    }

    /// The table as `stage3 models` lists it.
    pub(super) fn listings(&self) -> Vec<ModelListing> {
        self.models
            .iter()
            .map(|row| {
                let sizes = ImageSize::ALL
                    .iter()
                    .map(|&size| {
                        let standard = row.pixels(size, ImageQuality::Standard);
                        let hd = row.pixels(size, ImageQuality::Hd);
                        format!("{size} → {}x{}, {}x{}", standard.0, standard.1, hd.0, hd.1)
                    })
                    .collect();
                let overridden = self.prices.contains_key(row.id);
                ModelListing {
                    id: row.id.to_string(),
                    name: row.name.to_string(),
                    sizes,
                    takes_seed: row.takes_seed,
                    takes_references: row.max_references > 0,
                    price_per_image_usd: self.price(row.id),
                    hd_price_per_image_usd: self.price(row.id),
                    price_source: Some(if overridden {
                        "STAGE3_PRICES".to_string()
                    } else {
                        format!("{}, checked {}", row.listed_price, row.price_checked)
                    }),
                    ..ModelListing::default()
                }
            })
            .collect()
    }
}

/// `model` is `prefix` followed by a non-empty run of lower-case letters, digits and `-`.
fn is_alias_of(model: &str, prefix: &str) -> bool {
    model.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_spec::ModelRef;

    const ROWS: &[TabledModel] = &[TabledModel {
        id: "m-1",
        name: "Model One",
        standard: [(1024, 1024), (1280, 720), (720, 1280)],
        hd: [(2048, 2048), (2560, 1440), (1440, 2560)],
        takes_seed: false,
        max_references: 2,
        max_prompt_chars: Some(20),
        max_negative_chars: None,
        usd_per_image: 0.03,
        listed_price: "0.20 CNY",
        price_checked: "2026-12",
    }];

    fn table() -> ModelTable {
        ModelTable::new(ProviderKind::Ark, "Test", ROWS, HashMap::new()).with_alias("ep-", ROWS[0])
    }

    fn spec(model: &str) -> ImageSpec {
        ImageSpec::plain(
            ModelRef::resolve(model, ProviderKind::Ark),
            ImageSize::Landscape,
            ImageQuality::Hd,
        )
    }

    #[test]
    fn a_known_model_is_priced_and_sized() {
        let check = table().check(&spec("m-1"), "m-1").unwrap();
        assert_eq!(check.estimate_usd, Some(0.03));
        assert_eq!(
            ROWS[0].pixels(ImageSize::Landscape, ImageQuality::Hd),
            (2560, 1440)
        );
        let overridden = ModelTable::new(
            ProviderKind::Ark,
            "Test",
            ROWS,
            HashMap::from([("m-1".to_string(), 0.5)]),
        );
        assert_eq!(
            overridden.check(&spec("m-1"), "m-1").unwrap().estimate_usd,
            Some(0.5)
        );
    }

    #[test]
    fn what_the_model_cannot_take_is_refused_before_any_call() {
        let mut seeded = spec("m-1");
        seeded.seed = Some(1);
        assert!(table()
            .check(&seeded, "m-1")
            .unwrap_err()
            .to_string()
            .contains("seed"));
        let mut referenced = spec("m-1");
        referenced.references = vec!["https://a.example/1.png".into(); 3];
        assert!(table()
            .check(&referenced, "m-1")
            .unwrap_err()
            .to_string()
            .contains("at most 2"));
        let mut long = spec("m-1");
        long.prompt = "x".repeat(21);
        let err = table().check(&long, "m-1").unwrap_err();
        assert!(err.to_string().contains("at most 20"), "{err}");
    }

    #[test]
    fn unknown_models_are_unavailable_and_endpoint_ids_stand_for_their_row() {
        let err = table().check(&spec("m-2"), "m-2").unwrap_err();
        assert_eq!(err.error_type(), crate::error::ErrorType::ModelUnavailable);
        assert!(err.to_string().contains("m-1"), "{err}");
        let endpoint = table().check(&spec("ep-2024-abc"), "ep-2024-abc").unwrap();
        assert_eq!(endpoint.estimate_usd, None);
        for bad in ["ep-", "ep-../../x", "ep-A"] {
            assert!(table().check(&spec(bad), bad).is_err(), "{bad}");
        }
    }
}
