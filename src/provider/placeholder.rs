//! The offline provider: deterministic PNGs drawn locally, no key, no network, no cost.
//!
//! `--provider placeholder` runs the whole pipeline — batching, storage, CDN URLs, Lambda —
//! without an OpenRouter account, for demos, layout work and tests. Each picture is a pure
//! function of the request: the same request gives the same bytes (so caching and
//! idempotency behave as with a real model), and different scenes look different at a
//! glance: colours and shapes come from a hash of the request, and the scene id is written
//! across the middle in large letters with the first words of the prompt beneath.
//!
//! Only integer and basic floating-point arithmetic is used (no trigonometry, whose last
//! bits vary between math libraries), so the bytes are the same on every machine.

use async_trait::async_trait;
use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use sha2::{Digest, Sha256};

use super::{ImageProvider, ImageRequest, Plan, ProviderImage, SceneSpec};
use crate::error::{ProviderFailure, Result, Stage3Error};

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

    /// Offline and free: every model "serves", at no cost.
    async fn plan(&self, spec: &SceneSpec<'_>) -> Result<Plan> {
        Ok(Plan::unchecked(spec, Some(0.0)))
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        let sketch = Sketch::for_request(request);
        // Drawing and encoding take milliseconds of CPU: keep them off the async workers.
        let png = tokio::task::spawn_blocking(move || sketch.render())
            .await
            .map_err(|e| failure(format!("placeholder drawing did not finish: {e}")))??;
        Ok(ProviderImage {
            bytes: png,
            claimed_media_type: Some("image/png".to_owned()),
            cost: Some(0.0),
        })
    }
}

fn failure(message: String) -> Stage3Error {
    Stage3Error::ProviderError(ProviderFailure::new(None, message))
}

/// Everything the picture depends on, owned so it can move to a blocking thread.
struct Sketch {
    width: u32,
    height: u32,
    digest: [u8; 32],
    title: String,
    caption: String,
    prompt: String,
    footer: String,
}

impl Sketch {
    fn for_request(request: &ImageRequest<'_>) -> Self {
        let (width, height) = request.size.dimensions();
        let seed = request
            .seed
            .map_or_else(|| "none".to_owned(), |s| s.to_string());
        let mut hasher = Sha256::new();
        // Length-prefixed, so no two different requests can hash the same bytes.
        for field in [
            request.scene_id,
            request.prompt,
            request.model,
            request.size.as_str(),
            request.quality.as_str(),
            &seed,
        ] {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
        let seed_note = request
            .seed
            .map(|s| format!(" - seed {s}"))
            .unwrap_or_default();
        Sketch {
            width,
            height,
            digest: hasher.finalize().into(),
            title: request.scene_id.to_owned(),
            caption: format!(
                "placeholder - {} - {}{seed_note}",
                request.size, request.quality
            ),
            prompt: request.prompt.to_owned(),
            footer: request.model.to_owned(),
        }
    }

    fn render(&self) -> Result<Bytes> {
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
        canvas.encode_png()
    }

    /// The scene id large on a dark band across the middle, the prompt's first words
    /// beneath it, what was asked for at the top and the model at the bottom.
    fn lettering(&self, canvas: &mut Canvas) {
        const WHITE: [u8; 3] = [255, 255, 255];
        const PALE: [u8; 3] = [225, 225, 225];
        let (width, height) = (self.width, self.height);
        let usable = width * 88 / 100;
        let margin = (width - usable) / 2;

        let title_scale = (usable / (font::ADVANCE * char_count(&self.title)))
            .min(height / 60)
            .max(3);
        let title_lines = wrap(
            &self.title,
            (usable / (font::ADVANCE * title_scale)) as usize,
            3,
        );
        let prompt_scale = (width.min(height) / 256).max(2);
        let prompt_lines = wrap(
            &self.prompt,
            (usable / (font::ADVANCE * prompt_scale)) as usize,
            3,
        );

        let title_height = title_lines.len() as u32 * font::LINE * title_scale;
        let prompt_height = prompt_lines.len() as u32 * font::LINE * prompt_scale;
        let gap = 3 * prompt_scale;
        let block = title_height + gap + prompt_height;
        let padding = 4 * prompt_scale;
        let band_top = (height.saturating_sub(block) / 2).saturating_sub(padding);
        canvas.rect(0, band_top, width, block + 2 * padding, [0, 0, 0], 115);

        let mut y = band_top + padding;
        for line in &title_lines {
            let x = centred(line, title_scale, width);
            canvas.text(line, x, y, title_scale, WHITE);
            y += font::LINE * title_scale;
        }
        y += gap;
        for line in &prompt_lines {
            let x = centred(line, prompt_scale, width);
            canvas.text(line, x, y, prompt_scale, PALE);
            y += font::LINE * prompt_scale;
        }

        let small = (width.min(height) / 340).max(2);
        let most = (usable / (font::ADVANCE * small)) as usize;
        let caption = wrap(&self.caption, most, 1);
        let footer = wrap(&self.footer, most, 1);
        if let Some(line) = caption.first() {
            canvas.text(line, margin, margin / 2, small, WHITE);
        }
        if let Some(line) = footer.first() {
            let y = height - margin / 2 - font::HEIGHT * small;
            canvas.text(line, margin, y, small, WHITE);
        }
    }
}

fn char_count(text: &str) -> u32 {
    (text.chars().count() as u32).max(1)
}

fn centred(line: &str, scale: u32, width: u32) -> u32 {
    let drawn = char_count(line) * font::ADVANCE * scale - scale;
    width.saturating_sub(drawn) / 2
}

/// Breaks `text` into at most `max_lines` lines of at most `max_chars`, at spaces where it
/// can; what does not fit ends in "...".
fn wrap(text: &str, max_chars: usize, max_lines: usize) -> Vec<String> {
    let max_chars = max_chars.max(4);
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut cut = false;
    'words: for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let room = max_chars
                .saturating_sub(current.chars().count())
                .saturating_sub(usize::from(!current.is_empty()));
            if word.len() <= room {
                if !current.is_empty() {
                    current.push(' ');
                }
                current.extend(word.iter());
                break;
            }
            if current.is_empty() {
                // A word longer than a line: break it.
                current.extend(word.drain(..max_chars));
            }
            lines.push(std::mem::take(&mut current));
            if lines.len() == max_lines {
                cut = true;
                break 'words;
            }
        }
    }
    if !current.is_empty() && lines.len() < max_lines {
        lines.push(current);
    }
    if cut {
        if let Some(last) = lines.last_mut() {
            let keep = max_chars - 3;
            let kept: String = last.chars().take(keep).collect();
            *last = format!("{}...", kept.trim_end());
        }
    }
    lines
}

/// An RGB pixel buffer with the few drawing operations the placeholder needs.
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

    /// Draws `text` with its top-left corner at (`x`, `y`), each font dot `scale` pixels
    /// square, over a soft shadow so it reads on light and dark parts alike.
    fn text(&mut self, text: &str, x: u32, y: u32, scale: u32, colour: [u8; 3]) {
        let shadow = (scale / 3).max(1);
        self.glyphs(text, x + shadow, y + shadow, scale, [0, 0, 0], 150);
        self.glyphs(text, x, y, scale, colour, 255);
    }

    fn glyphs(&mut self, text: &str, x: u32, y: u32, scale: u32, colour: [u8; 3], alpha: u8) {
        let mut left = x;
        for ch in text.chars() {
            let rows = font::glyph(ch);
            for (row, bits) in rows.iter().enumerate() {
                for column in 0..font::WIDTH {
                    if bits & (1 << (font::WIDTH - 1 - column)) != 0 {
                        let px = left + column * scale;
                        let py = y + row as u32 * scale;
                        self.rect(px, py, scale, scale, colour, alpha);
                    }
                }
            }
            left += font::ADVANCE * scale;
        }
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

/// A 5×7 bitmap font: letters, digits and the punctuation of scene ids, prompts and model
/// slugs. Each glyph is seven rows, top first; bit 4 is the leftmost dot.
mod font {
    pub const WIDTH: u32 = 5;
    pub const HEIGHT: u32 = 7;
    /// Horizontal distance between glyph origins, in dots: one dot of spacing.
    pub const ADVANCE: u32 = 6;
    /// Vertical distance between lines, in dots.
    pub const LINE: u32 = 10;

    /// What a character outside the font draws: an empty box, as fonts do.
    const MISSING: [u8; 7] = [
        0b11111, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11111,
    ];

    pub fn glyph(ch: char) -> [u8; 7] {
        match ch {
            'A' => [
                0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
            ],
            'B' => [
                0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110,
            ],
            'C' => [
                0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110,
            ],
            'D' => [
                0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100,
            ],
            'E' => [
                0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111,
            ],
            'F' => [
                0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000,
            ],
            'G' => [
                0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111,
            ],
            'H' => [
                0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
            ],
            'I' => [
                0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
            ],
            'J' => [
                0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100,
            ],
            'K' => [
                0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001,
            ],
            'L' => [
                0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111,
            ],
            'M' => [
                0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001,
            ],
            'N' => [
                0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001,
            ],
            'O' => [
                0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
            ],
            'P' => [
                0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000,
            ],
            'Q' => [
                0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101,
            ],
            'R' => [
                0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001,
            ],
            'S' => [
                0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110,
            ],
            'T' => [
                0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100,
            ],
            'U' => [
                0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
            ],
            'V' => [
                0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
            ],
            'W' => [
                0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010,
            ],
            'X' => [
                0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001,
            ],
            'Y' => [
                0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100,
            ],
            'Z' => [
                0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111,
            ],
            'a' => [
                0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111,
            ],
            'b' => [
                0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110,
            ],
            'c' => [
                0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110,
            ],
            'd' => [
                0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111,
            ],
            'e' => [
                0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110,
            ],
            'f' => [
                0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000,
            ],
            'g' => [
                0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110,
            ],
            'h' => [
                0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001,
            ],
            'i' => [
                0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110,
            ],
            'j' => [
                0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100,
            ],
            'k' => [
                0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010,
            ],
            'l' => [
                0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
            ],
            'm' => [
                0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001,
            ],
            'n' => [
                0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001,
            ],
            'o' => [
                0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110,
            ],
            'p' => [
                0b00000, 0b00000, 0b11110, 0b10001, 0b11110, 0b10000, 0b10000,
            ],
            'q' => [
                0b00000, 0b00000, 0b01101, 0b10011, 0b01111, 0b00001, 0b00001,
            ],
            'r' => [
                0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000,
            ],
            's' => [
                0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110,
            ],
            't' => [
                0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110,
            ],
            'u' => [
                0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101,
            ],
            'v' => [
                0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
            ],
            'w' => [
                0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010,
            ],
            'x' => [
                0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001,
            ],
            'y' => [
                0b00000, 0b00000, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110,
            ],
            'z' => [
                0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111,
            ],
            '0' => [
                0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
            ],
            '1' => [
                0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
            ],
            '2' => [
                0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
            ],
            '3' => [
                0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110,
            ],
            '4' => [
                0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
            ],
            '5' => [
                0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
            ],
            '6' => [
                0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
            ],
            '7' => [
                0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
            ],
            '8' => [
                0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
            ],
            '9' => [
                0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
            ],
            ' ' => [0; 7],
            '-' => [
                0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000,
            ],
            '_' => [
                0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111,
            ],
            '.' => [
                0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100,
            ],
            ',' => [
                0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000,
            ],
            ':' => [
                0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000,
            ],
            ';' => [
                0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b00100, 0b01000,
            ],
            '!' => [
                0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100,
            ],
            '?' => [
                0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100,
            ],
            '\'' => [
                0b01100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000,
            ],
            '"' => [
                0b01010, 0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000,
            ],
            '/' => [
                0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000,
            ],
            '(' => [
                0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010,
            ],
            ')' => [
                0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000,
            ],
            _ => MISSING,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::normalize::{normalize_image, ImageLimits, SourceFormat};
    use crate::schema::{ImageQuality, ImageSize};

    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: 40_000_000,
    };

    fn request<'a>(scene_id: &'a str, prompt: &'a str, size: ImageSize) -> ImageRequest<'a> {
        ImageRequest {
            scene_id,
            prompt,
            model: "google/gemini-2.5-flash-image",
            size,
            quality: ImageQuality::Standard,
            seed: None,
            references: &[],
            timeout: Duration::from_secs(180),
        }
    }

    fn draw(request: &ImageRequest<'_>) -> Bytes {
        Sketch::for_request(request).render().unwrap()
    }

    fn pixels(png: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8()
    }

    #[test]
    fn the_same_request_draws_the_same_bytes() {
        let ask = request("scene_001", "A lighthouse at dusk", ImageSize::Square);
        assert_eq!(draw(&ask), draw(&ask));
    }

    #[test]
    fn every_input_of_the_request_changes_the_picture() {
        let base = request("scene_001", "A lighthouse at dusk", ImageSize::Square);
        let reference = draw(&base);
        let variants = [
            ImageRequest {
                scene_id: "scene_002",
                ..base.clone()
            },
            ImageRequest {
                prompt: "A lighthouse at dawn",
                ..base.clone()
            },
            ImageRequest {
                model: "openai/gpt-5-image",
                ..base.clone()
            },
            ImageRequest {
                quality: ImageQuality::Hd,
                ..base.clone()
            },
            ImageRequest {
                seed: Some(42),
                ..base.clone()
            },
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
        let ids = ["a", "Z", "0", "scene_1", "scene-2", "s.3", long_id.as_str()];
        let prompts = ["", "Ünïcödé prompt 漢字", long_prompt.as_str(), "dark"];
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

    #[tokio::test]
    async fn generate_answers_like_a_free_png_provider() {
        let provider = PlaceholderProvider::new();
        assert_eq!(provider.name(), "placeholder");
        assert_eq!(provider.api(), None);
        let ask = request("scene_009", "A quiet harbour", ImageSize::Landscape);
        let image = provider.generate(&ask).await.unwrap();
        assert_eq!(image.claimed_media_type.as_deref(), Some("image/png"));
        assert_eq!(image.cost, Some(0.0));
        assert_eq!(image.bytes, draw(&ask));
    }

    #[test]
    fn the_scene_id_alphabet_is_in_the_font_and_no_glyph_is_a_copy() {
        let alphabet = ('A'..='Z')
            .chain('a'..='z')
            .chain('0'..='9')
            .chain(['-', '_', '.', ',']);
        let mut seen = std::collections::HashMap::new();
        for ch in alphabet {
            let glyph = font::glyph(ch);
            assert_ne!(glyph, font::glyph('\u{2603}'), "{ch} is missing");
            assert!(
                glyph.iter().all(|row| row >> font::WIDTH == 0),
                "{ch} too wide"
            );
            if let Some(other) = seen.insert(glyph, ch) {
                panic!("{ch} and {other} share a glyph");
            }
        }
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_marks_what_was_cut() {
        assert_eq!(wrap("a quiet harbour", 20, 3), ["a quiet harbour"]);
        assert_eq!(wrap("a quiet harbour", 8, 3), ["a quiet", "harbour"]);
        assert_eq!(wrap("abcdefghij", 4, 3), ["abcd", "efgh", "ij"]);
        assert_eq!(
            wrap("one two three four five", 9, 2),
            ["one two", "three..."]
        );
        assert_eq!(wrap("", 10, 2), Vec::<String>::new());
    }

    /// Writes a sample to look at and prints how long drawing takes. Run it optimised:
    /// `cargo test --release --lib placeholder::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "prints timings; run with --release --ignored --nocapture"]
    fn timing() {
        let ask = request(
            "chapter-02_scene.07",
            "A lighthouse keeper climbs the spiral stairs at dusk while gulls circle outside",
            ImageSize::Landscape,
        );
        let mut samples: Vec<f64> = (0..30)
            .map(|_| {
                let start = std::time::Instant::now();
                std::hint::black_box(draw(&ask));
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        let png = draw(&ask);
        std::fs::write("/tmp/placeholder-sample.png", &png).unwrap();
        println!(
            "placeholder 1792x1024: p50 {:.2} ms, {} bytes",
            samples[samples.len() / 2],
            png.len()
        );
    }
}
