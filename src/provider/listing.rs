//! What `stage3 models` shows of a provider's image models, as JSON or as a table.

use serde::Serialize;

use crate::image_spec::ProviderKind;

/// One image model as `stage3 models` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelListing {
    pub id: String,
    pub name: String,
    /// `resolution` values (`1K`, `2K`, …); empty when the model takes none.
    pub resolutions: Vec<String>,
    /// `aspect_ratio` values; empty when the model takes none.
    pub aspect_ratios: Vec<String>,
    /// `quality` values (gpt-image models); empty when the model takes none.
    pub qualities: Vec<String>,
    /// The pixel sizes drawn for each request size, standard then hd (`1024x1024 →
    /// 2048x2048, 2048x2048`), for providers with fixed sizes; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sizes: Vec<String>,
    pub takes_seed: bool,
    pub takes_references: bool,
    /// The price of one standard 1024x1024 image, in USD, when known.
    pub price_per_image_usd: Option<f64>,
    /// The price of one hd image, when the model makes them and the price is known.
    pub hd_price_per_image_usd: Option<f64>,
    /// Where a tabled price comes from and when it was checked (`0.25 CNY, 2026-12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_source: Option<String>,
}

impl ModelListing {
    /// `kind`'s models as the text table `stage3 models` prints, and the line that
    /// explains it (printed apart, on stderr, so the table alone can be piped).
    pub fn table(kind: ProviderKind, models: &[ModelListing]) -> (String, String) {
        match kind {
            ProviderKind::OpenRouter => catalogue_table(models),
            ProviderKind::Placeholder => (
                String::new(),
                "the placeholder draws any model, offline, for free".to_string(),
            ),
            ProviderKind::Ark | ProviderKind::DashScope => fixed_size_table(kind, models),
        }
    }
}

fn price(price: Option<f64>) -> String {
    price.map_or_else(|| "-".to_string(), |p| format!("${p:.4}"))
}

/// OpenRouter's catalogue: what each model takes, and its price at standard and hd.
fn catalogue_table(models: &[ModelListing]) -> (String, String) {
    let list = |values: &[String]| {
        if values.is_empty() {
            "-".to_string()
        } else {
            values.join(",")
        }
    };
    let mut table = format!(
        "{:<40} {:<14} {:<36} {:<20} {:>9} {:>9}\n",
        "MODEL", "RESOLUTIONS", "ASPECT RATIOS", "QUALITY", "STANDARD", "HD"
    );
    for model in models {
        table.push_str(&format!(
            "{:<40} {:<14} {:<36} {:<20} {:>9} {:>9}\n",
            model.id,
            list(&model.resolutions),
            list(&model.aspect_ratios),
            list(&model.qualities),
            price(model.price_per_image_usd),
            price(model.hd_price_per_image_usd),
        ));
    }
    let note = format!(
        "{} image model(s); prices are per image at 1024x1024 (standard) and for hd, from \
         the dearest provider",
        models.len()
    );
    (table, note)
}

/// A provider's own table: the pixel sizes drawn for each request size, and the price.
fn fixed_size_table(kind: ProviderKind, models: &[ModelListing]) -> (String, String) {
    let mut table = format!(
        "{:<32} {:<28} {:<5} {:<10} {:>9}  PRICE SOURCE\n",
        "MODEL", "NAME", "SEED", "REFERENCES", "PRICE"
    );
    let yes_no = |yes: bool| if yes { "yes" } else { "no" };
    for model in models {
        table.push_str(&format!(
            "{:<32} {:<28} {:<5} {:<10} {:>9}  {}\n",
            model.id,
            model.name,
            yes_no(model.takes_seed),
            yes_no(model.takes_references),
            price(model.price_per_image_usd),
            model.price_source.as_deref().unwrap_or("-"),
        ));
        for size in &model.sizes {
            table.push_str(&format!("    {size}\n"));
        }
    }
    let note = format!(
        "{} {kind} model(s); sizes are request size → pixels at standard, hd; prices per \
         image in USD (STAGE3_PRICES=provider:model=usd overrides)",
        models.len()
    );
    (table, note)
}
