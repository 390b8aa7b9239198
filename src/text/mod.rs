//! Text on images: measuring, wrapping and drawing lines of Chinese, Latin and mixed text.
//!
//! Both the offline placeholder (scene id, prompt, captions) and the visible "AI生成" mark
//! draw through here, so they share one face ([`font`]), one line breaker and one
//! rasteriser. Everything is integer arithmetic on the embedded bitmaps, so a given text
//! at a given size gives the same pixels on every machine.
//!
//! Sizes are in pixels per em (`px`): a line is `px` pixels tall, a CJK character `px`
//! wide, a Latin letter half that. Glyphs are scaled from their 16-pixel bitmaps with
//! smoothed edges (see [`Mask::line`]), so large text does not look like stacked bricks.

mod font;
mod visible_label;

pub(crate) use font::{font, Glyph};
pub(crate) use font::{is_wide, EM};
pub(crate) use visible_label::{stamp_visible_label, stamp_visible_label_rgb};

/// The smallest size text is drawn at, in pixels per em: the bitmaps' own size.
pub(crate) const MIN_PX: u32 = EM;
/// The largest size, in pixels per em; larger requests are drawn at this size.
pub(crate) const MAX_PX: u32 = 1024;
/// The widest line [`Mask::line`] draws, in pixels.
pub(crate) const MAX_LINE_WIDTH: u32 = 16_384;

/// Width of `text` in font units (1/16 em).
pub(crate) fn advance_units(text: &str) -> u32 {
    let font = font();
    text.chars().map(|ch| font.glyph_or_box(ch).width).sum()
}

/// Width of `text` in pixels at `px` pixels per em.
pub(crate) fn measure(text: &str, px: u32) -> u32 {
    units_to_px(advance_units(text), clamp_px(px))
}

fn units_to_px(units: u32, px: u32) -> u32 {
    (u64::from(units) * u64::from(px)).div_ceil(u64::from(EM)) as u32
}

fn clamp_px(px: u32) -> u32 {
    px.clamp(MIN_PX, MAX_PX)
}

/// The largest size, at most `max_px`, at which `text` fits in `width` pixels on one line;
/// `None` when it does not fit even at [`MIN_PX`].
pub(crate) fn fitting_px(text: &str, width: u32, max_px: u32) -> Option<u32> {
    let units = advance_units(text).max(1);
    let px = (u64::from(width) * u64::from(EM) / u64::from(units)).min(u64::from(max_px)) as u32;
    (px >= MIN_PX).then_some(px.min(MAX_PX))
}

/// Characters that must not begin a line (closing punctuation), after the usual CJK rules.
fn no_line_start(ch: char) -> bool {
    matches!(
        ch,
        '，' | '。'
            | '、'
            | '！'
            | '？'
            | '：'
            | '；'
            | '）'
            | '」'
            | '』'
            | '】'
            | '》'
            | '〉'
            | '”'
            | '’'
            | '…'
            | '‥'
            | '・'
            | 'ー'
            | '々'
            | '〕'
            | '］'
            | '｝'
            | ','
            | '.'
            | '!'
            | '?'
            | ':'
            | ';'
            | ')'
            | ']'
            | '}'
    )
}

/// Characters that must not end a line (opening punctuation).
fn no_line_end(ch: char) -> bool {
    matches!(
        ch,
        '（' | '「'
            | '『'
            | '【'
            | '《'
            | '〈'
            | '“'
            | '‘'
            | '〔'
            | '［'
            | '｛'
            | '('
            | '['
            | '{'
    )
}

/// Whether a line may break between `before` and `after` (neither a space): between
/// ideographs and next to them, since CJK text has no spaces, but never before closing
/// or after opening punctuation; and after a hyphen, underscore or slash inside a word
/// (scene ids such as "chapter-02_scene-07").
fn may_break_between(before: char, after: char) -> bool {
    let cjk = (is_wide(before) || is_wide(after)) && !no_line_start(after) && !no_line_end(before);
    cjk || (matches!(before, '-' | '_' | '/') && after.is_alphanumeric())
}

/// An unbreakable piece of text and whether a space separated it from the one before.
struct Piece {
    text: String,
    spaced: bool,
}

fn pieces(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut spaced = false;
    let mut previous: Option<char> = None;
    for ch in text.chars() {
        if ch.is_whitespace() {
            if !current.is_empty() {
                pieces.push(Piece {
                    text: std::mem::take(&mut current),
                    spaced,
                });
            }
            spaced = true;
            previous = None;
            continue;
        }
        if let Some(before) = previous {
            if may_break_between(before, ch) {
                pieces.push(Piece {
                    text: std::mem::take(&mut current),
                    spaced,
                });
                spaced = false;
            }
        }
        current.push(ch);
        previous = Some(ch);
    }
    if !current.is_empty() {
        pieces.push(Piece {
            text: current,
            spaced,
        });
    }
    pieces
}

/// Breaks `text` into at most `max_lines` lines no wider than `max_width` pixels at `px`:
/// at spaces, between CJK characters (keeping closing punctuation off a line's start and
/// opening punctuation off its end) and, for a word longer than a line, anywhere. What does
/// not fit ends in "…". Whitespace runs (newlines too) count as one space.
pub(crate) fn wrap(text: &str, px: u32, max_width: u32, max_lines: usize) -> Vec<String> {
    let px = clamp_px(px);
    // Room for at least two full-width characters, so every line makes progress.
    let room = (u64::from(max_width) * u64::from(EM) / u64::from(px)).max(2 * 16) as u32;
    let space = advance_units(" ");
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut used = 0u32;
    let mut cut = false;

    'pieces: for piece in pieces(text) {
        let mut chars: Vec<char> = piece.text.chars().collect();
        let mut spaced = piece.spaced;
        loop {
            let gap = if spaced && !current.is_empty() {
                space
            } else {
                0
            };
            let width = advance_units(&chars.iter().collect::<String>());
            if used + gap + width <= room {
                if gap > 0 {
                    current.push(' ');
                }
                current.extend(chars.iter());
                used += gap + width;
                break;
            }
            if current.is_empty() {
                // Longer than a line on its own: break it where the line is full.
                let mut taken = 0;
                let mut fill = 0;
                for &ch in &chars {
                    let w = font().glyph_or_box(ch).width;
                    if fill + w > room {
                        break;
                    }
                    fill += w;
                    taken += 1;
                }
                current.extend(chars.drain(..taken.max(1)));
            }
            lines.push(std::mem::take(&mut current));
            used = 0;
            spaced = false;
            if lines.len() == max_lines {
                cut = !chars.is_empty();
                break 'pieces;
            }
            if chars.is_empty() {
                break;
            }
        }
    }
    if !current.is_empty() {
        if lines.len() < max_lines {
            lines.push(current);
        } else {
            cut = true;
        }
    }
    if cut {
        if let Some(last) = lines.last_mut() {
            let ellipsis = advance_units("…");
            let mut kept: Vec<char> = last.chars().collect();
            while !kept.is_empty()
                && advance_units(&kept.iter().collect::<String>()) + ellipsis > room
            {
                kept.pop();
            }
            let kept: String = kept.into_iter().collect();
            *last = format!("{}…", kept.trim_end());
        }
    }
    lines
}

/// Coverage of drawn text: `alpha[y * width + x]`, 0 (none) to 255 (full ink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mask {
    pub width: u32,
    pub height: u32,
    pub alpha: Vec<u8>,
}

impl Mask {
    /// One line of `text` at `px` pixels per em: `px` tall (baseline [`DESCENT`]/16 em above
    /// the bottom), as wide as its advances.
    ///
    /// The 16-pixel bitmaps are enlarged in two steps: Scale2x (EPX), which turns each
    /// staircase into a finer one by looking at the four neighbours of every pixel, then a
    /// bilinear sample of that doubled bitmap whose value is pushed through a ramp one
    /// output pixel wide around one half. The result has smooth diagonals, slightly
    /// rounded corners and antialiased edges; all of it is integer arithmetic, so the
    /// pixels are the same on every machine.
    pub(crate) fn line(text: &str, px: u32) -> Mask {
        let px = clamp_px(px);
        let font = font();
        // A line is meant to be wrapped first; past MAX_LINE_WIDTH pixels the rest is
        // dropped, so no text can ask for an unbounded mask.
        let mut units = 0u32;
        let glyphs: Vec<Glyph> = text
            .chars()
            .map(|ch| font.glyph_or_box(ch))
            .take_while(|glyph| {
                units += glyph.width;
                units_to_px(units, px) <= MAX_LINE_WIDTH
            })
            .collect();
        let units: u32 = glyphs.iter().map(|g| g.width).sum();

        // The line as one bitmap in font units, so glyphs join without seams.
        let (bw, bh) = (units as usize, EM as usize);
        let mut bits = vec![0u8; bw * bh];
        let mut pen = 0usize;
        for glyph in &glyphs {
            for y in 0..EM {
                for x in 0..glyph.width {
                    if glyph.ink(x, y) {
                        bits[y as usize * bw + pen + x as usize] = 1;
                    }
                }
            }
            pen += glyph.width as usize;
        }
        let (doubled, dw, dh) = scale2x(&bits, bw, bh);

        let width = units_to_px(units, px);
        let height = px;
        let mut alpha = vec![0u8; width as usize * height as usize];
        // Output pixel centre (o + ½) maps to doubled-bitmap coordinate
        // (o + ½)·S/px − ½, S = 32; in units of 1/(2·px) that is (2o + 1)·S − px.
        const S: i64 = 2 * EM as i64;
        let px64 = i64::from(px);
        let d = 2 * px64;
        let d2 = d * d;
        // Ramp steepness: one output pixel wide when enlarging; plain bilinear otherwise.
        let steep = px64.max(S);
        let sample = |x: i64, y: i64| -> i64 {
            if x < 0 || y < 0 || x >= dw as i64 || y >= dh as i64 {
                0
            } else {
                i64::from(doubled[y as usize * dw + x as usize])
            }
        };
        let axis = |o: u32| {
            let u = (2 * i64::from(o) + 1) * S - px64;
            (u.div_euclid(d), u.rem_euclid(d))
        };
        let columns: Vec<(i64, i64)> = (0..width).map(axis).collect();
        for oy in 0..height {
            let (j, fy) = axis(oy);
            let row = &mut alpha[oy as usize * width as usize..][..width as usize];
            for (out, &(i, fx)) in row.iter_mut().zip(&columns) {
                let b = (d - fx) * (d - fy) * sample(i, j)
                    + fx * (d - fy) * sample(i + 1, j)
                    + (d - fx) * fy * sample(i, j + 1)
                    + fx * fy * sample(i + 1, j + 1);
                // ((b/d² − ½)·steep/S + ½), scaled to 0..=255.
                let num = (2 * b - d2) * steep + S * d2;
                let den = 2 * S * d2;
                *out = (num.clamp(0, den) * 255 / den) as u8;
            }
        }
        Mask {
            width,
            height,
            alpha,
        }
    }

    /// The smallest rectangle `(left, top, right, bottom)` (exclusive ends) holding every
    /// pixel whose coverage is at least `threshold`.
    pub(crate) fn ink_bounds(&self, threshold: u8) -> Option<(u32, u32, u32, u32)> {
        let mut bounds: Option<(u32, u32, u32, u32)> = None;
        for y in 0..self.height {
            for x in 0..self.width {
                if self.alpha[(y * self.width + x) as usize] >= threshold {
                    let b = bounds.get_or_insert((x, y, x + 1, y + 1));
                    b.0 = b.0.min(x);
                    b.1 = b.1.min(y);
                    b.2 = b.2.max(x + 1);
                    b.3 = b.3.max(y + 1);
                }
            }
        }
        bounds
    }

    /// A soft shadow of this mask: grown by `radius` on every side, box-blurred twice with
    /// that radius, and strengthened so the halo is dense right next to the strokes.
    pub(crate) fn shadow(&self, radius: u32) -> Mask {
        let r = radius as usize;
        let (w, h) = (self.width as usize + 2 * r, self.height as usize + 2 * r);
        let mut grown = vec![0u32; w * h];
        for y in 0..self.height as usize {
            for x in 0..self.width as usize {
                grown[(y + r) * w + x + r] = u32::from(self.alpha[y * self.width as usize + x]);
            }
        }
        for _ in 0..2 {
            grown = box_blur(&grown, w, h, r, true);
            grown = box_blur(&grown, w, h, r, false);
        }
        Mask {
            width: w as u32,
            height: h as u32,
            alpha: grown.into_iter().map(|v| (v * 2).min(255) as u8).collect(),
        }
    }
}

/// One pass of a box blur of radius `r` along rows (`horizontal`) or columns.
fn box_blur(values: &[u32], w: usize, h: usize, r: usize, horizontal: bool) -> Vec<u32> {
    let mut out = vec![0u32; values.len()];
    let span = (2 * r + 1) as u32;
    let (lines, length) = if horizontal { (h, w) } else { (w, h) };
    let at = |line: usize, i: usize| {
        if horizontal {
            line * w + i
        } else {
            i * w + line
        }
    };
    for line in 0..lines {
        let mut sum: u32 = (0..=r.min(length - 1)).map(|i| values[at(line, i)]).sum();
        for i in 0..length {
            out[at(line, i)] = sum / span;
            if i + r + 1 < length {
                sum += values[at(line, i + r + 1)];
            }
            if i >= r {
                sum -= values[at(line, i - r)];
            }
        }
    }
    out
}

/// Scale2x (EPX) restricted to filling: doubles a 0/1 bitmap, and where a blank pixel sits
/// in the elbow of a one-pixel staircase (its two neighbours on one corner inked, the
/// other two blank, and the diagonal pixel beyond that corner blank) fills that corner.
/// Plain Scale2x also fills the inner corners of crossings and trims stroke ends, which
/// at large sizes shows as blobs on every "十"; the guard keeps strokes as drawn.
fn scale2x(bits: &[u8], w: usize, h: usize) -> (Vec<u8>, usize, usize) {
    let (dw, dh) = (2 * w, 2 * h);
    let mut out = vec![0u8; dw * dh];
    let at = |x: isize, y: isize| -> bool {
        x >= 0
            && y >= 0
            && x < w as isize
            && y < h as isize
            && bits[y as usize * w + x as usize] != 0
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let (ox, oy) = (2 * x as usize, 2 * y as usize);
            if at(x, y) {
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    out[(oy + dy) * dw + ox + dx] = 1;
                }
                continue;
            }
            let (up, right, left, down) = (at(x, y - 1), at(x + 1, y), at(x - 1, y), at(x, y + 1));
            // (vertical neighbour, horizontal neighbour, the opposite two, diagonal, corner)
            let corners = [
                (up, left, right || down, at(x - 1, y - 1), (0, 0)),
                (up, right, left || down, at(x + 1, y - 1), (1, 0)),
                (down, left, right || up, at(x - 1, y + 1), (0, 1)),
                (down, right, left || up, at(x + 1, y + 1), (1, 1)),
            ];
            for (vertical, horizontal, opposite, diagonal, (dx, dy)) in corners {
                if vertical && horizontal && !opposite && !diagonal {
                    out[(oy + dy) * dw + ox + dx] = 1;
                }
            }
        }
    }
    (out, dw, dh)
}

/// A mutable view of 8-bit RGB or RGBA pixels, row by row, to draw on.
pub(crate) struct Surface<'a> {
    pixels: &'a mut [u8],
    width: u32,
    height: u32,
    channels: usize,
}

impl<'a> Surface<'a> {
    /// `pixels` holds `width × height` pixels of `channels` (3: RGB, 4: RGBA) bytes;
    /// `None` when the sizes disagree.
    pub(crate) fn new(
        pixels: &'a mut [u8],
        width: u32,
        height: u32,
        channels: usize,
    ) -> Option<Self> {
        let expected = (width as usize)
            .checked_mul(height as usize)?
            .checked_mul(channels)?;
        (matches!(channels, 3 | 4) && pixels.len() == expected).then_some(Surface {
            pixels,
            width,
            height,
            channels,
        })
    }

    pub(crate) fn width(&self) -> u32 {
        self.width
    }

    pub(crate) fn height(&self) -> u32 {
        self.height
    }

    /// Paints `colour` at `opacity` (0–255) over the pixel at (`x`, `y`), times `coverage`.
    fn blend(&mut self, x: u32, y: u32, colour: [u8; 3], opacity: u8, coverage: u8) {
        let a = u32::from(opacity) * u32::from(coverage);
        if a == 0 {
            return;
        }
        let at = (y as usize * self.width as usize + x as usize) * self.channels;
        let pixel = &mut self.pixels[at..at + self.channels];
        const FULL: u32 = 255 * 255;
        if self.channels == 4 {
            // Source over destination, with the destination's own alpha; all in units of
            // 255 × 255.
            let dst_a = u64::from(pixel[3]) * 255;
            let (a, full) = (u64::from(a), u64::from(FULL));
            let out_a = a + dst_a * (full - a) / full;
            if out_a == 0 {
                return;
            }
            for c in 0..3 {
                let src = u64::from(colour[c]) * a;
                let dst = u64::from(pixel[c]) * dst_a * (full - a) / full;
                pixel[c] = ((src + dst) / out_a).min(255) as u8;
            }
            pixel[3] = (out_a / 255).min(255) as u8;
        } else {
            for c in 0..3 {
                let old = u32::from(pixel[c]);
                pixel[c] = ((old * (FULL - a) + u32::from(colour[c]) * a) / FULL) as u8;
            }
        }
    }

    /// Paints `mask` with its top-left corner at (`x`, `y`) (which may be off the surface)
    /// in `colour` at `opacity`.
    pub(crate) fn paint(&mut self, mask: &Mask, x: i64, y: i64, colour: [u8; 3], opacity: u8) {
        for my in 0..mask.height {
            let ty = y + i64::from(my);
            if ty < 0 || ty >= i64::from(self.height) {
                continue;
            }
            for mx in 0..mask.width {
                let tx = x + i64::from(mx);
                if tx < 0 || tx >= i64::from(self.width) {
                    continue;
                }
                let coverage = mask.alpha[(my * mask.width + mx) as usize];
                self.blend(tx as u32, ty as u32, colour, opacity, coverage);
            }
        }
    }

    /// Fills a rectangle (clipped to the surface) with `colour` at `opacity`.
    pub(crate) fn fill_rect(
        &mut self,
        x: u32,
        y: u32,
        w: u32,
        h: u32,
        colour: [u8; 3],
        opacity: u8,
    ) {
        let x_end = x.saturating_add(w).min(self.width);
        let y_end = y.saturating_add(h).min(self.height);
        for ty in y.min(y_end)..y_end {
            for tx in x.min(x_end)..x_end {
                self.blend(tx, ty, colour, opacity, 255);
            }
        }
    }

    /// Draws one line of `text` at `px` pixels per em with its top-left corner at
    /// (`x`, `y`), over a soft dark shadow so it reads on light and dark parts alike.
    /// Returns the line's width in pixels.
    pub(crate) fn text(&mut self, text: &str, x: i64, y: i64, px: u32, colour: [u8; 3]) -> u32 {
        let mask = Mask::line(text, px);
        let radius = (clamp_px(px) / 16).max(1);
        let shadow = mask.shadow(radius);
        let offset = i64::from((clamp_px(px) / 24).max(1));
        let r = i64::from(radius);
        self.paint(&shadow, x - r + offset, y - r + offset, [0, 0, 0], 170);
        self.paint(&mask, x, y, colour, 255);
        mask.width
    }
}

#[cfg(test)]
mod tests {
    use super::font::Font;
    use super::*;

    /// The ink of `text` drawn alone at 16 px: the exact bitmap, for comparisons.
    fn ink(text: &str) -> Vec<u8> {
        Mask::line(text, 16)
            .alpha
            .iter()
            .map(|&a| u8::from(a >= 128))
            .collect()
    }

    #[test]
    fn at_the_bitmap_size_the_mask_is_the_bitmap() {
        let glyph = font().glyph('生').unwrap();
        let mask = Mask::line("生", 16);
        assert_eq!((mask.width, mask.height), (16, 16));
        for y in 0..16 {
            for x in 0..16 {
                let a = mask.alpha[(y * 16 + x) as usize];
                assert_eq!(a >= 128, glyph.ink(x, y), "({x}, {y}) = {a}");
            }
        }
    }

    #[test]
    fn each_character_of_a_chinese_prompt_draws_its_own_glyph() {
        let replacement_wide: Vec<u8> = {
            let glyph = Font::replacement_box(true);
            (0..16)
                .flat_map(|y| (0..16).map(move |x| u8::from(glyph.ink(x, y))))
                .collect()
        };
        let text = "清晨的城市天际线，一只小狐狸";
        let distinct: std::collections::BTreeSet<char> = text.chars().collect();
        let mut seen = std::collections::HashMap::new();
        for ch in distinct {
            let bitmap = ink(&ch.to_string());
            assert!(bitmap.contains(&1), "{ch} draws nothing");
            assert_ne!(bitmap, replacement_wide, "{ch} is the replacement box");
            if let Some(other) = seen.insert(bitmap, ch) {
                panic!("{ch} and {other} draw the same ink");
            }
        }
    }

    #[test]
    fn ascii_and_common_cjk_punctuation_have_glyphs() {
        let font = font();
        let mut seen = std::collections::HashMap::new();
        for ch in (' '..='~').chain("，。！？、：；「」（）《》“”…—·".chars())
        {
            let glyph = font
                .glyph(ch)
                .unwrap_or_else(|| panic!("{ch:?} is missing"));
            if ch != ' ' {
                if let Some(other) = seen.insert(glyph, ch) {
                    panic!("{ch:?} and {other:?} share a glyph");
                }
            }
        }
    }

    #[test]
    fn widths_come_from_real_advances() {
        assert_eq!(advance_units("google"), 6 * 8);
        assert_eq!(advance_units("小狐狸"), 3 * 16);
        assert_eq!(advance_units("AI生成"), 2 * 8 + 2 * 16);
        assert_eq!(measure("AI生成", 64), 48 * 4);
        assert_eq!(Mask::line("AI生成", 64).width, 48 * 4);
        assert_eq!(Mask::line("AI生成", 64).height, 64);
        assert_eq!(Mask::line("", 64).width, 0);
    }

    #[test]
    fn chinese_wraps_between_characters_and_keeps_punctuation_attached() {
        // Eight full-width characters per line at 16 px: "，" would start line two, so
        // "线" goes down with it.
        let lines = wrap("清晨的城市天际线，一只小狐狸在屋顶上。", 16, 8 * 16, 5);
        assert_eq!(lines, ["清晨的城市天际", "线，一只小狐狸在", "屋顶上。"]);
        // An opening bracket stays with what it opens.
        let lines = wrap("一二三四五六七「八九」", 16, 8 * 16, 5);
        assert_eq!(lines, ["一二三四五六七", "「八九」"]);
        for line in &lines {
            assert!(measure(line, 16) <= 8 * 16, "{line}");
            assert!(!line.starts_with(['，', '。']), "{line}");
        }
    }

    #[test]
    fn mixed_text_wraps_at_spaces_and_ideographs() {
        let text = "A fox named Lili 在屋顶上 watches the sunrise over Shanghai";
        let lines = wrap(text, 32, 300, 10);
        assert!(lines.len() > 2, "{lines:?}");
        for line in &lines {
            assert!(measure(line, 32) <= 300, "{line} is too wide");
        }
        // No word was split: joined back, the words are all there.
        let joined = lines.join(" ");
        for word in ["fox", "named", "Lili", "watches", "sunrise", "Shanghai"] {
            assert!(joined.contains(word), "{word} was split: {lines:?}");
        }
    }

    #[test]
    fn wrapping_marks_what_was_cut_and_breaks_long_words() {
        assert_eq!(wrap("a quiet harbour", 16, 200, 3), ["a quiet harbour"]);
        assert_eq!(
            wrap("a quiet harbour", 16, 8 * 8, 3),
            ["a quiet", "harbour"]
        );
        assert_eq!(wrap("abcdefghij", 16, 4 * 8, 3), ["abcd", "efgh", "ij"]);
        assert_eq!(
            wrap("chapter-02_scene-07", 16, 12 * 8, 3),
            ["chapter-02_", "scene-07"]
        );
        assert_eq!(
            wrap("one two three four five", 16, 9 * 8, 2),
            ["one two", "three…"]
        );
        assert_eq!(
            wrap("一二三四五六七八九十", 16, 4 * 16, 2),
            ["一二三四", "五六七…"]
        );
        assert!(wrap("", 16, 100, 2).is_empty());
        assert!(wrap("   \n ", 16, 100, 2).is_empty());
    }

    #[test]
    fn hostile_text_is_bounded_and_never_panics() {
        let long = "狐".repeat(100_000);
        let lines = wrap(&long, 16, 160, 3);
        assert_eq!(lines.len(), 3);
        let mask = Mask::line(&long, 256);
        assert!(mask.width <= MAX_LINE_WIDTH && mask.width > MAX_LINE_WIDTH - 256);
        for odd in ["\u{0}\u{301}\u{200B}", "한국어", "🦊🦊", "\u{FFFF}", "\t\n"] {
            let _ = Mask::line(odd, 40);
            let _ = wrap(odd, 40, 10, 2);
        }
    }

    #[test]
    fn enlarging_keeps_strokes_and_gaps() {
        // At 4× every font pixel is a 4×4 block; its middle 2×2 is inked exactly when the
        // font pixel is (smoothing only touches the block's edges and staircase elbows).
        for ch in ['g', '狐', '，', 'W', '生', '成'] {
            let glyph = font().glyph(ch).unwrap();
            let mask = Mask::line(&ch.to_string(), 64);
            for y in 0..16 {
                for x in 0..glyph.width {
                    let mean: u32 = [(1, 1), (2, 1), (1, 2), (2, 2)]
                        .iter()
                        .map(|(dx, dy)| {
                            u32::from(mask.alpha[((4 * y + dy) * mask.width + 4 * x + dx) as usize])
                        })
                        .sum::<u32>()
                        / 4;
                    assert_eq!(mean >= 128, glyph.ink(x, y), "{ch} ({x}, {y}): {mean}");
                }
            }
        }
    }

    #[test]
    fn drawing_on_rgba_keeps_the_picture_opaque_and_covers_text() {
        let mut pixels = vec![255u8; 64 * 32 * 4];
        let mut surface = Surface::new(&mut pixels, 64, 32, 4).unwrap();
        surface.text("AI", 2, 2, 24, [0, 0, 0]);
        assert!(pixels.chunks_exact(4).all(|p| p[3] == 255));
        assert!(pixels.chunks_exact(4).any(|p| p[0] < 50));
        assert!(Surface::new(&mut [0u8; 10], 2, 2, 3).is_none());
    }

    /// The pixels of a line are pinned: any machine (x86_64, arm64) and any later build
    /// must draw exactly these, or cached placeholder images would change under their keys.
    #[test]
    fn rendering_is_pinned_across_machines() {
        use sha2::{Digest, Sha256};
        let mask = Mask::line("清晨的城市天际线，一只小狐狸 googles «jQuery»", 40);
        let shadow = mask.shadow(3);
        let mut hasher = Sha256::new();
        hasher.update(&mask.alpha);
        hasher.update(&shadow.alpha);
        assert_eq!(
            hex::encode(hasher.finalize()),
            "a2df2b0a5bc62df6202ddbdba9f8696e10d3a34b17e24c0d76b2c905a7dc38f3"
        );
    }
}
