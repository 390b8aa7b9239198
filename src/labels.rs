//! AIGC labels (GB 45438-2025) on the images we publish, and relabelling without regenerating.
//!
//! A checked image from the provider (the *source*) becomes the *published* image by
//! applying the configured labels: the implicit label, a TC260 XMP packet spliced in without
//! touching the pixels (docs/design.md §2, [`crate::normalize::aigc`]), and, with `STAGE3_VISIBLE_LABEL=1`, the visible
//! "AI生成" mark drawn in a corner. The record notes which labels were applied and the
//! source's hash ([`AppliedLabels`]), so when the settings change a stored result is
//! relabelled from its source — never paid for again. The source is recoverable from the
//! published PNG by dropping the label chunk, except when a mark was drawn over its pixels;
//! then the source is kept beside the image, under [`source_key`].

use bytes::Bytes;
use image::DynamicImage;
use sha2::{Digest, Sha256};

use crate::error::{Result, Stage3Error};
use crate::normalize::{
    encode_png, insert_aigc_label_owned, max_png_bytes, strip_aigc_label, AigcLabel,
};
use crate::schema::AppliedLabels;
use crate::text::{stamp_visible_label, stamp_visible_label_rgb};

/// What labels to apply (`STAGE3_AIGC_LABEL`, `STAGE3_AIGC_PRODUCER`,
/// `STAGE3_AIGC_PROPAGATOR`, `STAGE3_VISIBLE_LABEL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LabelSettings {
    /// The implicit label, unless `STAGE3_AIGC_LABEL=off`.
    pub implicit: bool,
    pub producer: String,
    pub propagator: String,
    pub visible: bool,
}

impl Default for LabelSettings {
    fn default() -> Self {
        LabelSettings {
            implicit: true,
            producer: DEFAULT_PRODUCER.into(),
            propagator: String::new(),
            visible: false,
        }
    }
}

/// `ContentProducer` when none is configured: this service, by name. Operators publishing
/// in China set their own (the standard expects the producer's identity).
pub(crate) const DEFAULT_PRODUCER: &str = "stage3";

/// The form the implicit label is written in today: the TC260 XMP packet. Records from
/// before it carry no form; their PNGs hold the earlier bare `AIGC` text chunk, which
/// detection tools do not read, so they are relabelled (from their source, without a call).
pub(crate) const IMPLICIT_FORM: &str = "tc260-xmp";

// The contract type lives in `schema`; what it means for a label setting lives here.
impl AppliedLabels {
    /// Whether these are the labels `settings` asks for.
    pub(crate) fn matches(&self, settings: &LabelSettings) -> bool {
        self.implicit == settings.implicit
            && self.visible == settings.visible
            && (!settings.implicit
                || (self.producer == settings.producer
                    && self.propagator == settings.propagator
                    && self.implicit_form.as_deref() == Some(IMPLICIT_FORM)))
    }
}

/// Where the unlabelled source of a visibly marked image is kept.
pub(crate) fn source_key(scene_id: &str, source_sha256: &str) -> String {
    // Never sliced: a hash read from an edited record may be short (records are checked,
    // but a key must not be able to panic).
    let short = source_sha256.get(..16).unwrap_or(source_sha256);
    format!("sources/{scene_id}-{short}.png")
}

/// The published image and what it carries.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub png: Bytes,
    pub sha256: String,
    pub applied: AppliedLabels,
    /// The XMP packet of the implicit label, which the image's thumbnail carries too.
    pub xmp_packet: Option<String>,
}

/// Applies `settings` to the checked `source` PNG. `propagate_id` identifies the
/// publication (the image's key stem). CPU work when a mark is drawn: run it off the async
/// workers. The source is handed over: a caller that keeps no other handle to its buffer
/// gets the label spliced in there, not into a copy.
pub(crate) fn publish(
    source: Bytes,
    source_sha256: &str,
    settings: &LabelSettings,
    propagate_id: &str,
) -> Result<Published> {
    let mut png = source;
    if settings.visible {
        png = draw_visible_mark(&png)?;
    }
    let mut xmp_packet = None;
    if settings.implicit {
        let propagate_id = if settings.propagator.is_empty() {
            ""
        } else {
            propagate_id
        };
        let label = AigcLabel::new(
            settings.producer.clone(),
            source_sha256,
            settings.propagator.clone(),
            propagate_id,
        );
        png = insert_aigc_label_owned(png, &label)?;
        xmp_packet = Some(label.to_xmp());
    }
    let sha256 = hex::encode(Sha256::digest(&png));
    Ok(Published {
        png,
        sha256,
        xmp_packet,
        applied: AppliedLabels {
            implicit: settings.implicit,
            implicit_form: settings.implicit.then(|| IMPLICIT_FORM.to_string()),
            visible: settings.visible,
            producer: if settings.implicit {
                settings.producer.clone()
            } else {
                String::new()
            },
            propagator: if settings.implicit {
                settings.propagator.clone()
            } else {
                String::new()
            },
            source_sha256: source_sha256.to_string(),
        },
    })
}

/// The unlabelled source recovered from a published image that has no drawn mark: the
/// same bytes minus the label chunk. Checked against the recorded hash.
pub(crate) fn source_of_unmarked(published: &[u8], applied: &AppliedLabels) -> Result<Bytes> {
    let source = strip_aigc_label(published)?;
    if hex::encode(Sha256::digest(&source)) != applied.source_sha256 {
        return Err(Stage3Error::InvalidImage(
            "the stored image without its label is not the recorded source".into(),
        ));
    }
    Ok(source)
}

/// The PNG with the "AI生成" mark drawn on it, re-encoded (fast compression).
fn draw_visible_mark(png: &[u8]) -> Result<Bytes> {
    let decoded = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map_err(|e| Stage3Error::InvalidImage(format!("cannot decode to draw the mark: {e}")))?;
    let marked = if decoded.color().has_alpha() {
        let mut rgba = decoded.into_rgba8();
        stamp_visible_label(&mut rgba);
        DynamicImage::ImageRgba8(rgba)
    } else {
        let mut rgb = decoded.into_rgb8();
        stamp_visible_label_rgb(&mut rgb);
        DynamicImage::ImageRgb8(rgb)
    };
    let bits = 8 * u32::from(marked.color().channel_count());
    let max = max_png_bytes(marked.width(), marked.height(), bits);
    encode_png(&marked, None, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::read_aigc_label;

    fn source() -> (Bytes, String) {
        let image = image::RgbImage::from_fn(256, 256, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        let png = Bytes::from(out.into_inner());
        let sha = hex::encode(Sha256::digest(&png));
        (png, sha)
    }

    fn pixels(png: &[u8]) -> Vec<u8> {
        image::load_from_memory(png)
            .unwrap()
            .into_rgba8()
            .into_raw()
    }

    #[test]
    fn the_implicit_label_names_the_source_and_keeps_every_pixel() {
        let (png, sha) = source();
        let settings = LabelSettings {
            producer: "ACME-123".into(),
            propagator: "story-cdn".into(),
            ..LabelSettings::default()
        };
        let published = publish(png.clone(), &sha, &settings, "s1-abcdef").unwrap();
        let label = read_aigc_label(&published.png).unwrap();
        assert_eq!(label.produce_id, sha);
        assert_eq!(label.content_producer, "ACME-123");
        assert_eq!(label.propagate_id, "s1-abcdef");
        assert_eq!(pixels(&published.png), pixels(&png));
        assert!(published.applied.matches(&settings));
        assert_eq!(
            source_of_unmarked(&published.png, &published.applied).unwrap(),
            png
        );
    }

    #[test]
    fn an_image_labelled_in_the_earlier_form_asks_to_be_relabelled() {
        let (png, sha) = source();
        let settings = LabelSettings::default();
        let published = publish(png.clone(), &sha, &settings, "s1").unwrap();
        let mut earlier = published.applied.clone();
        earlier.implicit_form = None;
        assert!(!earlier.matches(&settings));
        // Its source is recovered from the earlier chunk as from the new packet.
        let mut chunks = crate::normalize::test_png::parts(&png);
        let mut legacy = b"AIGC\0\0\0\0\0".to_vec();
        legacy.extend_from_slice(br#"{"Label":"1"}"#);
        chunks.insert(1, (*b"iTXt", legacy));
        let old = crate::normalize::test_png::assemble(&chunks);
        assert_eq!(source_of_unmarked(&old, &earlier).unwrap(), png);
        let relabelled = publish(
            source_of_unmarked(&old, &earlier).unwrap(),
            &sha,
            &settings,
            "s1",
        )
        .unwrap();
        assert_eq!(relabelled.png, published.png);
        assert_eq!(crate::normalize::count_aigc_labels(&relabelled.png), 1);
    }

    #[test]
    fn the_visible_mark_changes_pixels_and_off_means_the_source_itself() {
        let (png, sha) = source();
        let marked = publish(
            png.clone(),
            &sha,
            &LabelSettings {
                visible: true,
                ..LabelSettings::default()
            },
            "s1",
        )
        .unwrap();
        assert_ne!(pixels(&marked.png), pixels(&png));
        assert!(read_aigc_label(&marked.png).is_some());

        let off = LabelSettings {
            implicit: false,
            ..LabelSettings::default()
        };
        let plain = publish(png.clone(), &sha, &off, "s1").unwrap();
        assert_eq!(plain.png, png);
        assert_eq!(plain.sha256, sha);
        assert!(!marked.applied.matches(&off));
    }
}
