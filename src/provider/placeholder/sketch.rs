//! The placeholder's picture: a gradient, a few translucent shapes and lettering, all a
//! pure function of the request.
//!
//! Colours and shapes come from a hash of the request, so different scenes look different
//! at a glance. The scene id is written across the middle in large letters with the prompt
//! beneath it, what was asked for (size, quality, seed) at the top and the model that was
//! requested — but not called — at the bottom. Text goes through [`crate::text`], so
//! Chinese prompts draw as Chinese.
//!
//! Only integer and basic floating-point arithmetic is used (no trigonometry, whose last
//! bits vary between math libraries), and the text renderer is integer-only, so the bytes
//! are the same on every machine.

use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use sha2::{Digest, Sha256};

use super::failure;
use crate::error::Result;
use crate::image_spec::ImageSpec;
use crate::provider::ImageRequest;
use crate::text::{self, Surface};

/// Everything the picture depends on, owned so it can move to a blocking thread.
pub(super) struct Sketch {
    width: u32,
    height: u32,
    digest: [u8; 32],
    title: String,
    caption: String,
    prompt: String,
    footer: String,
    /// The reference images sent, as URLs: an inline one is drawn small in the top right
    /// corner, an `https://` one (which this offline provider never fetches) as a labelled
    /// box — so a person can see which picture each page was shown.
    references: Vec<String>,
}

/// Lettering colours: white for the title and small print, a pale grey for the prompt.
const WHITE: [u8; 3] = [255, 255, 255];
const PALE: [u8; 3] = [228, 228, 228];

impl Sketch {
    pub(super) fn for_request(request: &ImageRequest<'_>) -> Self {
        Sketch::new(request.scene_id, request.spec, request.model)
    }

    /// The picture of `spec` for `scene_id`, as if `model` had been asked to draw it.
    fn new(scene_id: &str, spec: &ImageSpec, model: &str) -> Self {
        let (width, height) = spec.size.dimensions();
        let seed = spec
            .seed
            .map_or_else(|| "none".to_owned(), |s| s.to_string());
        let mut hasher = Sha256::new();
        // Length-prefixed, so no two different requests can hash the same bytes.
        for field in [
            scene_id,
            &spec.prompt,
            model,
            spec.size.as_str(),
            spec.quality.as_str(),
            &seed,
        ] {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
        let mut seed_note = spec
            .seed
            .map(|s| format!(" · seed {s}"))
            .unwrap_or_default();
        match spec.references.len() {
            0 => {}
            1 => seed_note.push_str(" · 1 reference"),
            n => seed_note.push_str(&format!(" · {n} references")),
        }
        Sketch {
            width,
            height,
            digest: hasher.finalize().into(),
            title: scene_id.to_owned(),
            caption: format!(
                "offline placeholder · {} · {}{seed_note}",
                spec.size, spec.quality
            ),
            prompt: spec.prompt.clone(),
            // No model drew this picture: say so, and keep the one asked for visible.
            footer: format!("requested model (not called): {model}"),
            references: spec.references.clone(),
        }
    }

    pub(super) fn render(&self) -> Result<Bytes> {
        let mut canvas = Canvas::new(self.width, self.height);
        let mut rng = SplitMix64::from_digest(&self.digest);

        // A light and a dark colour, hues far apart: the gradient alone already varies by
        // far more than the normaliser's blank threshold.
        let hue = rng.unit();
        let light = hsv(hue, 0.45 + 0.2 * rng.unit(), 0.92);
        let dark = hsv(hue + 0.33 + 0.34 * rng.unit(), 0.65, 0.32);
        canvas.gradient(light, dark, 0.2 + 0.6 * rng.unit());

        for _ in 0..3 + rng.below(4) {
            let colour = hsv(rng.unit(), 0.5, 0.55 + 0.4 * rng.unit());
            let alpha = 60 + rng.below(60) as u8;
            let side = self.width.min(self.height);
            let (x, y) = (rng.below(self.width), rng.below(self.height));
            if rng.below(2) == 0 {
                let radius = side / 12 + rng.below(side / 5);
                canvas.circle(x, y, radius, colour, alpha);
            } else {
                let (w, h) = (
                    side / 8 + rng.below(side / 3),
                    side / 8 + rng.below(side / 3),
                );
                canvas.rect(
                    x.saturating_sub(w / 2),
                    y.saturating_sub(h / 2),
                    w,
                    h,
                    colour,
                    alpha,
                );
            }
        }

        self.lettering(&mut canvas);
        self.insets(&mut canvas);
        canvas.encode_png()
    }

    /// The references, right to left along the top, each a fifth of the short side, framed
    /// and numbered in the order they were sent.
    fn insets(&self, canvas: &mut Canvas) {
        let short = self.width.min(self.height);
        let side = short / 5;
        let margin = (self.width - self.width * 88 / 100) / 2;
        let small_px = (short / 42).max(text::MIN_PX);
        let top = margin / 2 + small_px * 2;
        let frame = (side / 40).max(2);
        for (index, url) in self.references.iter().enumerate() {
            let slot = index as u32 + 1;
            let Some(x) = self
                .width
                .checked_sub(margin + slot * (side + margin / 2))
                .filter(|x| *x > margin)
            else {
                break;
            };
            canvas.rect(
                x - frame,
                top - frame,
                side + 2 * frame,
                side + 2 * frame,
                WHITE,
                255,
            );
            match decode_inline(url, side) {
                Some(picture) => {
                    let dx = x + (side - picture.width()) / 2;
                    let dy = top + (side - picture.height()) / 2;
                    canvas.rect(x, top, side, side, [40, 40, 40], 255);
                    canvas.blit(&picture, dx, dy);
                }
                None => canvas.rect(x, top, side, side, [70, 70, 90], 255),
            }
            let label = if url.starts_with("data:") {
                format!("ref {slot}")
            } else {
                format!("ref {slot}: URL")
            };
            if let Some(mut surface) = canvas.surface() {
                surface.text(
                    &label,
                    x.into(),
                    (top + side + frame * 2).into(),
                    small_px,
                    WHITE,
                );
            }
        }
    }

    /// Where each line of lettering goes and how large it is.
    fn layout(&self) -> Layout {
        let (width, height) = (self.width, self.height);
        let short = width.min(height);
        let usable = width * 88 / 100;

        // The scene id as large as fits on one line (at most a sixth of the short side);
        // a long id wraps onto up to three lines, at the largest size where it fits in
        // three (at least a twenty-fourth of the short side, cut with "…" below that).
        let title_max = (short / 6).max(text::MIN_PX);
        let title_min = (short / 24).max(text::MIN_PX);
        let (title_px, title) = match text::fitting_px(&self.title, usable, title_max) {
            Some(px) if px >= title_min => (px, vec![self.title.clone()]),
            _ => {
                // Three lines hold at most three widths' worth: start there, step down.
                let units = u64::from(text::advance_units(&self.title).max(1));
                let start = (3 * u64::from(usable) * u64::from(text::EM) / units)
                    .clamp(u64::from(title_min), u64::from(title_max))
                    as u32;
                let mut px = start;
                while px > title_min && !fits_in_lines(&self.title, px, usable, 3) {
                    px -= (px / 16).max(1);
                }
                let px = px.max(title_min);
                (px, text::wrap(&self.title, px, usable, 3))
            }
        };
        let prompt_px = (short / 28).max(text::MIN_PX);
        let prompt = text::wrap(&self.prompt, prompt_px, usable, 4);
        let small_px = (short / 42).max(text::MIN_PX);
        let caption = text::wrap(&self.caption, small_px, usable, 1);
        let footer = text::wrap(&self.footer, small_px, usable, 1);
        Layout {
            title_px,
            title,
            prompt_px,
            prompt,
            small_px,
            caption,
            footer,
        }
    }

    /// The scene id large on a dark band across the middle, the prompt beneath it, what
    /// was asked for at the top and the requested model at the bottom.
    fn lettering(&self, canvas: &mut Canvas) {
        let (width, height) = (self.width, self.height);
        let layout = self.layout();
        let margin = (width - width * 88 / 100) / 2;
        let title_line = layout.title_px * 21 / 20;
        let prompt_line = layout.prompt_px * 5 / 4;

        let title_height = layout.title.len() as u32 * title_line;
        let prompt_height = layout.prompt.len() as u32 * prompt_line;
        let gap = layout.prompt_px / 2;
        let block = title_height + gap + prompt_height;
        let padding = layout.prompt_px / 2;
        let band_top = (height.saturating_sub(block) / 2).saturating_sub(padding);
        canvas.rect(0, band_top, width, block + 2 * padding, [0, 0, 0], 115);

        let Some(mut surface) = canvas.surface() else {
            return;
        };
        let mut y = band_top + padding;
        for line in &layout.title {
            let x = width.saturating_sub(text::measure(line, layout.title_px)) / 2;
            surface.text(line, x.into(), y.into(), layout.title_px, WHITE);
            y += title_line;
        }
        y += gap;
        for line in &layout.prompt {
            let x = width.saturating_sub(text::measure(line, layout.prompt_px)) / 2;
            // Prompt lines sit in the middle of their taller line box.
            let top = y + (prompt_line - layout.prompt_px) / 2;
            surface.text(line, x.into(), top.into(), layout.prompt_px, PALE);
            y += prompt_line;
        }

        if let Some(line) = layout.caption.first() {
            surface.text(
                line,
                margin.into(),
                (margin / 2).into(),
                layout.small_px,
                WHITE,
            );
        }
        if let Some(line) = layout.footer.first() {
            let y = height.saturating_sub(margin / 2 + layout.small_px);
            surface.text(line, margin.into(), y.into(), layout.small_px, WHITE);
        }
    }
}

/// Whether `text` wraps into at most `lines` lines of `width` pixels at `px` without a cut.
fn fits_in_lines(text: &str, px: u32, width: u32, lines: usize) -> bool {
    let wrapped = text::wrap(text, px, width, lines + 1);
    wrapped.len() <= lines
}

/// The lettering of one picture: sizes in pixels per em, and the wrapped lines.
struct Layout {
    title_px: u32,
    title: Vec<String>,
    prompt_px: u32,
    prompt: Vec<String>,
    small_px: u32,
    caption: Vec<String>,
    footer: Vec<String>,
}
struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![0; width as usize * height as usize * 3],
        }
    }

    /// A linear blend from `from` (top left) to `to` (bottom right); `tilt` in 0..1 moves
    /// the direction between vertical and horizontal.
    fn gradient(&mut self, from: [u8; 3], to: [u8; 3], tilt: f32) {
        let (w, h) = (self.width as f32, self.height as f32);
        let row_len = self.width as usize * 3;
        for (y, row) in self.pixels.chunks_exact_mut(row_len).enumerate() {
            let row_part = (1.0 - tilt) * y as f32 / h;
            for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
                // 0..=256 in fixed point: integer mixing keeps the loop cheap.
                let t = ((tilt * x as f32 / w + row_part) * 256.0) as u32;
                for c in 0..3 {
                    let mixed = (u32::from(from[c]) * (256 - t) + u32::from(to[c]) * t) >> 8;
                    pixel[c] = mixed as u8;
                }
            }
        }
    }

    /// Paints `colour` over the pixels at `x` in `columns` of `row`, with `alpha` of 255.
    fn blend_span(&mut self, row: u32, columns: std::ops::Range<u32>, colour: [u8; 3], alpha: u8) {
        let start = (row as usize * self.width as usize + columns.start as usize) * 3;
        let end = start + (columns.end - columns.start) as usize * 3;
        let alpha = u32::from(alpha);
        for pixel in self.pixels[start..end].chunks_exact_mut(3) {
            for c in 0..3 {
                let old = u32::from(pixel[c]);
                pixel[c] = ((old * (255 - alpha) + u32::from(colour[c]) * alpha) / 255) as u8;
            }
        }
    }

    fn rect(&mut self, x: u32, y: u32, w: u32, h: u32, colour: [u8; 3], alpha: u8) {
        let x_end = x.saturating_add(w).min(self.width);
        let y_end = y.saturating_add(h).min(self.height);
        if x >= x_end {
            return;
        }
        for row in y..y_end {
            self.blend_span(row, x..x_end, colour, alpha);
        }
    }

    fn circle(&mut self, cx: u32, cy: u32, radius: u32, colour: [u8; 3], alpha: u8) {
        let r = i64::from(radius);
        for dy in -r..=r {
            let Ok(row) = u32::try_from(i64::from(cy) + dy) else {
                continue;
            };
            if row >= self.height {
                continue;
            }
            // Half the chord at this height. IEEE square roots are exactly rounded, so this
            // is the same everywhere.
            let half = (((r * r - dy * dy) as f64).sqrt()) as i64;
            let left = (i64::from(cx) - half).clamp(0, i64::from(self.width)) as u32;
            let right = (i64::from(cx) + half + 1).clamp(0, i64::from(self.width)) as u32;
            if left < right {
                self.blend_span(row, left..right, colour, alpha);
            }
        }
    }

    /// Copies `picture` with its top left corner at `x`, `y`, clipped to the canvas.
    fn blit(&mut self, picture: &image::RgbImage, x: u32, y: u32) {
        for (px, py, pixel) in picture.enumerate_pixels() {
            let (cx, cy) = (x + px, y + py);
            if cx >= self.width || cy >= self.height {
                continue;
            }
            let at = (cy as usize * self.width as usize + cx as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&pixel.0);
        }
    }

    /// The pixels as a surface for [`crate::text`] to draw on (always `Some`: the canvas
    /// holds width × height RGB pixels).
    fn surface(&mut self) -> Option<Surface<'_>> {
        Surface::new(&mut self.pixels, self.width, self.height, 3)
    }

    /// Fast compression: this is the offline default, so speed beats a few kilobytes.
    fn encode_png(self) -> Result<Bytes> {
        let mut out = Vec::with_capacity(self.pixels.len() / 4);
        PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
            .write_image(
                &self.pixels,
                self.width,
                self.height,
                ExtendedColorType::Rgb8,
            )
            .map_err(|e| failure(format!("placeholder PNG encoding failed: {e}")))?;
        Ok(Bytes::from(out))
    }
}

/// An inline (`data:`) reference decoded and shrunk to fit `side` × `side`; `None` for a
/// URL or anything that does not decode (the placeholder draws a box instead).
fn decode_inline(url: &str, side: u32) -> Option<image::RgbImage> {
    use base64::Engine;
    let (_, payload) = url.strip_prefix("data:")?.split_once(";base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    let picture = image::load_from_memory(&bytes).ok()?.to_rgb8();
    Some(image::imageops::thumbnail(
        &picture,
        side.min(picture.width().max(1) * side / picture.height().max(1).max(picture.width())),
        side.min(picture.height().max(1) * side / picture.width().max(1).max(picture.height())),
    ))
}

/// A colour from hue (any real, wraps), saturation and value in 0..1.
fn hsv(hue: f32, saturation: f32, value: f32) -> [u8; 3] {
    let h = (hue - hue.floor()) * 6.0;
    let sector = h.floor();
    let f = h - sector;
    let (p, q, t) = (
        value * (1.0 - saturation),
        value * (1.0 - saturation * f),
        value * (1.0 - saturation * (1.0 - f)),
    );
    let (r, g, b) = match sector as u32 {
        0 => (value, t, p),
        1 => (q, value, p),
        2 => (p, value, t),
        3 => (p, q, value),
        4 => (t, p, value),
        _ => (value, p, q),
    };
    let byte = |v: f32| (v * 255.0).round().clamp(0.0, 255.0) as u8;
    [byte(r), byte(g), byte(b)]
}

/// SplitMix64: tiny, and fixed here so the pictures never change with a crate upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn from_digest(digest: &[u8; 32]) -> Self {
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest[..8]);
        SplitMix64(u64::from_le_bytes(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..1.
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in 0..bound (0 when bound is 0).
    fn below(&mut self, bound: u32) -> u32 {
        if bound == 0 {
            0
        } else {
            (self.next() % u64::from(bound)) as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::{normalize_image, ImageLimits, SourceFormat};
    use crate::schema::{ImageQuality, ImageSize};

    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: 40_000_000,
    };

    /// What a provider call hands the sketch, owned.
    #[derive(Debug, Clone)]
    struct Ask {
        scene_id: String,
        spec: ImageSpec,
        model: String,
    }

    impl Ask {
        fn sketch(&self) -> Sketch {
            Sketch::new(&self.scene_id, &self.spec, &self.model)
        }
    }

    fn request(scene_id: &str, prompt: &str, size: ImageSize) -> Ask {
        Ask {
            scene_id: scene_id.into(),
            spec: {
                let mut spec = ImageSpec::plain(
                    crate::image_spec::ModelRef::resolve(
                        "google/gemini-2.5-flash-image",
                        crate::image_spec::ProviderKind::Placeholder,
                    ),
                    size,
                    ImageQuality::Standard,
                );
                spec.prompt = prompt.into();
                spec
            },
            model: "google/gemini-2.5-flash-image".into(),
        }
    }

    fn draw(ask: &Ask) -> Bytes {
        ask.sketch().render().unwrap()
    }

    fn pixels(png: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8()
    }

    const FOX: &str = "清晨的城市天际线，一只小狐狸蹲在屋顶上。";

    #[test]
    fn the_same_request_draws_the_same_bytes() {
        for ask in [
            request("scene_001", "A lighthouse at dusk", ImageSize::Square),
            request("场景_01", FOX, ImageSize::Portrait),
        ] {
            assert_eq!(draw(&ask), draw(&ask));
        }
    }

    #[test]
    fn every_input_of_the_request_changes_the_picture() {
        let base = request("scene_001", "A lighthouse at dusk", ImageSize::Square);
        let reference = draw(&base);
        let variant = |change: &dyn Fn(&mut Ask)| {
            let mut ask = base.clone();
            change(&mut ask);
            ask
        };
        let variants = [
            variant(&|a| a.scene_id = "scene_002".into()),
            variant(&|a| a.spec.prompt = "A lighthouse at dawn".into()),
            variant(&|a| a.model = "openai/gpt-5-image".into()),
            variant(&|a| a.spec.quality = ImageQuality::Hd),
            variant(&|a| a.spec.seed = Some(42)),
        ];
        for variant in &variants {
            assert_ne!(draw(variant), reference, "{variant:?}");
        }
    }

    #[test]
    fn different_scenes_look_different() {
        let first = pixels(&draw(&request("scene_001", "A fox", ImageSize::Square)));
        let second = pixels(&draw(&request("scene_002", "A fox", ImageSize::Square)));
        let total: u64 = first
            .as_raw()
            .iter()
            .zip(second.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = total as f64 / first.as_raw().len() as f64;
        assert!(mean > 20.0, "mean channel difference only {mean:.1}");
    }

    #[test]
    fn every_size_has_its_dimensions_and_passes_validation() {
        for size in ImageSize::ALL {
            let png = draw(&request("ch1-scene_03.b", "Two children find a map", size));
            let normalized = normalize_image(png.clone(), size, &LIMITS).unwrap();
            assert_eq!((normalized.width, normalized.height), size.dimensions());
            assert_eq!(normalized.source_format, SourceFormat::Png);
            // A valid PNG passes through untouched.
            assert_eq!(normalized.png, png);
        }
    }

    #[test]
    fn many_different_requests_all_pass_validation() {
        let long_id = "x".repeat(128);
        let long_prompt = "word ".repeat(200);
        let long_chinese = FOX.repeat(40);
        let ids = ["a", "Z", "0", "scene_1", "scene-2", "s.3", long_id.as_str()];
        let prompts = [
            "",
            "Ünïcödé prompt 漢字 한국어 🦊",
            long_prompt.as_str(),
            long_chinese.as_str(),
            "dark",
        ];
        for (i, id) in ids.iter().enumerate() {
            for (j, prompt) in prompts.iter().enumerate() {
                let size = ImageSize::ALL[(i + j) % 3];
                let png = draw(&request(id, prompt, size));
                if let Err(e) = normalize_image(png, size, &LIMITS) {
                    panic!("{id:?} / {prompt:?} / {size}: {e}");
                }
            }
        }
    }

    #[test]
    fn every_line_of_lettering_fits_inside_the_picture() {
        let mixed = "黎明时分，a small fox named Lili 蹲在上海外滩的屋顶上, watching \
                     the ships on the Huangpu river 缓缓驶过。";
        let long_id = "chapter-12_scene-07_".repeat(6);
        for size in ImageSize::ALL {
            for (id, prompt) in [
                ("scene_001", mixed),
                (long_id.as_str(), FOX),
                ("s", "googling gypsy jQuery"),
            ] {
                let ask = request(id, prompt, size);
                let sketch = ask.sketch();
                let layout = sketch.layout();
                let (width, height) = size.dimensions();
                let usable = width * 88 / 100;
                let sized = [
                    (layout.title_px, &layout.title),
                    (layout.prompt_px, &layout.prompt),
                    (layout.small_px, &layout.caption),
                    (layout.small_px, &layout.footer),
                ];
                for (px, lines) in sized {
                    assert!(!lines.is_empty(), "{size}: nothing to draw for {id}");
                    for line in lines {
                        assert!(
                            text::measure(line, px) <= usable,
                            "{size}: {line:?} too wide"
                        );
                    }
                }
                assert!(layout.prompt.len() <= 4 && layout.title.len() <= 3);
                // The title is large: at least a twenty-fourth of the short side.
                assert!(layout.title_px >= width.min(height) / 24);
            }
        }
        // The mixed prompt needs more than one line and keeps its words whole.
        let layout = request("s", mixed, ImageSize::Square).sketch().layout();
        assert!(layout.prompt.len() > 1, "{:?}", layout.prompt);
        assert!(layout.prompt.iter().any(|line| line.contains("Huangpu")));
    }

    #[test]
    fn the_small_print_says_no_model_drew_the_picture() {
        let mut ask = request("scene_001", "A fox", ImageSize::Square);
        ask.spec.seed = Some(42);
        let sketch = ask.sketch();
        assert_eq!(
            sketch.caption,
            "offline placeholder · 1024x1024 · standard · seed 42"
        );
        assert_eq!(
            sketch.footer,
            "requested model (not called): google/gemini-2.5-flash-image"
        );
        assert_eq!(sketch.layout().footer, std::slice::from_ref(&sketch.footer));
    }

    /// Writes samples to /tmp to look at and prints how long drawing takes. Run it
    /// optimised: `cargo test --release --lib placeholder -- --ignored --nocapture`
    #[test]
    #[ignore = "writes samples and prints timings; run with --release --ignored --nocapture"]
    fn samples_and_timing() {
        let long_id = "chapter-02_scene.07-the-lighthouse-keeper-and-the-storm-that-came";
        let samples = [
            ("fox-square", "场景_01", FOX, ImageSize::Square),
            (
                "google-landscape",
                "chapter-02_scene.07",
                "A lighthouse keeper googles the typography of jQuery gadgets while gulls \
                 circle outside; pygmy yaks graze by the quay.",
                ImageSize::Landscape,
            ),
            (
                "long-id-portrait",
                long_id,
                "黎明时分，a small fox named Lili 蹲在上海外滩的屋顶上，watching the ships on \
                 the Huangpu river 缓缓驶过。「你好！」她说（轻声地）：今天会是好天气吗？",
                ImageSize::Portrait,
            ),
        ];
        for (name, id, prompt, size) in samples {
            let png = draw(&request(id, prompt, size));
            std::fs::write(format!("/tmp/placeholder-{name}.png"), &png).unwrap();
        }
        let ask = request("chapter-02_scene.07", FOX, ImageSize::Landscape);
        let mut times: Vec<f64> = (0..10)
            .map(|_| {
                let start = std::time::Instant::now();
                std::hint::black_box(draw(&ask));
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "placeholder 1792x1024: p50 {:.2} ms",
            times[times.len() / 2]
        );
    }
}
