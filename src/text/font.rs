//! The embedded face: a subset of GNU Unifont, 16-pixel bitmaps for Latin, Greek, Cyrillic,
//! punctuation, kana and every CJK Unified Ideograph of the basic block.
//!
//! Why a bitmap font: the pictures must be the same bytes on every machine (x86_64 and
//! arm64 alike), and a bitmap scaled with integer arithmetic is deterministic by
//! construction, where a vector rasteriser's results hang on floating-point details. Why
//! Unifont: it is the one freely licensed face that covers all of the CJK ideographs at a
//! size that stays small — 22,000 glyphs in 386 kB compressed — and its Latin letters have
//! real descenders. Licence and provenance: `assets/fonts/README.md`.
//!
//! The data is one zlib stream (format in `assets/fonts/make_unifont_subset.py`), inflated
//! once on first use into about 700 kB of bitmaps that every thread then shares.

use std::sync::OnceLock;

/// Height of every glyph and of a line, in font units (pixels of the bitmaps).
pub(crate) const EM: u32 = 16;
/// Font units below the baseline: Unifont's descenders (g, p, y) reach rows 14 and 15.
#[cfg(test)]
pub(crate) const DESCENT: u32 = 2;

const DATA: &[u8] = include_bytes!("../../assets/fonts/unifont-subset.bin.z");
const MAGIC: &[u8; 8] = b"UNIFSUB1";
/// The inflated subset is about 700 kB; anything much larger is not our file.
const MAX_INFLATED: usize = 4 << 20;

/// One glyph: `width` columns (8 or 16) of 16 rows; bit 15 of a row is its leftmost pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Glyph {
    pub width: u32,
    pub rows: [u16; EM as usize],
}

impl Glyph {
    /// Whether the pixel at column `x`, row `y` is inked.
    pub(crate) fn ink(&self, x: u32, y: u32) -> bool {
        x < self.width && y < EM && self.rows[y as usize] & (0x8000 >> x) != 0
    }

    const EMPTY: Glyph = Glyph {
        width: 0,
        rows: [0; EM as usize],
    };

    /// What a character outside the font draws: a hollow box, as fonts do, full width for
    /// characters of the East Asian scripts and half width for the others.
    fn replacement(wide: bool) -> Glyph {
        let (width, inner): (u32, u16) = if wide {
            (16, 0b0100_0000_0000_0010)
        } else {
            (8, 0b0100_0010_0000_0000)
        };
        let edge: u16 = if wide {
            0b0111_1111_1111_1110
        } else {
            0b0111_1110_0000_0000
        };
        let mut rows = [0u16; EM as usize];
        for (y, row) in rows.iter_mut().enumerate() {
            *row = match y {
                2 | 13 => edge,
                3..=12 => inner,
                _ => 0,
            };
        }
        Glyph { width, rows }
    }
}

/// A run of consecutive code points of one width, and where its bitmaps start.
#[derive(Debug)]
struct Run {
    first: u32,
    last: u32,
    width: u32,
    offset: usize,
}

/// The embedded face, ready for look-ups.
#[derive(Debug)]
pub(crate) struct Font {
    runs: Vec<Run>,
    bitmaps: Vec<u8>,
}

/// The embedded face, inflated on first use. Should the data ever fail to parse (a test
/// guards it), every character draws the replacement box: text degrades, nothing panics.
pub(crate) fn font() -> &'static Font {
    static FONT: OnceLock<Font> = OnceLock::new();
    FONT.get_or_init(|| {
        Font::parse(DATA).unwrap_or(Font {
            runs: Vec::new(),
            bitmaps: Vec::new(),
        })
    })
}

impl Font {
    fn parse(compressed: &[u8]) -> Result<Font, String> {
        let data = fdeflate::decompress_to_vec_bounded(compressed, MAX_INFLATED)
            .map_err(|_| "font data does not inflate".to_owned())?;
        let word = |at: usize| -> Result<u32, String> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| "font data is truncated".to_owned())
        };
        if data.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err("font data has the wrong magic".to_owned());
        }
        let count = word(8)? as usize;
        let mut offset = 12 + count * 12;
        let mut runs = Vec::with_capacity(count);
        for i in 0..count {
            let at = 12 + i * 12;
            let (first, last, width) = (word(at)?, word(at + 4)?, word(at + 8)?);
            if last < first || !(width == 8 || width == 16) {
                return Err(format!("font run {i} is malformed"));
            }
            if runs.last().is_some_and(|r: &Run| r.last >= first) {
                return Err(format!("font run {i} is out of order"));
            }
            runs.push(Run {
                first,
                last,
                width,
                offset,
            });
            offset += (last - first + 1) as usize * width as usize * 2;
        }
        if offset != data.len() {
            return Err("font data has the wrong length".to_owned());
        }
        Ok(Font {
            runs,
            bitmaps: data,
        })
    }

    /// The glyph for `ch` if the font has one.
    pub(crate) fn glyph(&self, ch: char) -> Option<Glyph> {
        let code = u32::from(ch);
        let index = self
            .runs
            .binary_search_by(|run| {
                if run.last < code {
                    std::cmp::Ordering::Less
                } else if run.first > code {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .ok()?;
        let run = &self.runs[index];
        let bytes_per_row = run.width as usize / 8;
        let start = run.offset + (code - run.first) as usize * bytes_per_row * EM as usize;
        let bitmap = self
            .bitmaps
            .get(start..start + bytes_per_row * EM as usize)?;
        let mut rows = [0u16; EM as usize];
        for (row, bytes) in rows.iter_mut().zip(bitmap.chunks_exact(bytes_per_row)) {
            *row = u16::from(bytes[0]) << 8 | bytes.get(1).map_or(0, |&b| u16::from(b));
        }
        Some(Glyph {
            width: run.width,
            rows,
        })
    }

    /// What `ch` draws: its glyph, nothing for invisible characters (controls, combining
    /// marks, zero-width joiners, variation selectors), or the replacement box.
    pub(crate) fn glyph_or_box(&self, ch: char) -> Glyph {
        if is_invisible(ch) {
            return Glyph::EMPTY;
        }
        self.glyph(ch)
            .unwrap_or_else(|| Glyph::replacement(is_wide(ch)))
    }

    /// The box drawn for characters the font lacks.
    #[cfg(test)]
    pub(crate) fn replacement_box(wide: bool) -> Glyph {
        Glyph::replacement(wide)
    }

    /// How many glyphs the font has.
    #[cfg(test)]
    pub(crate) fn glyph_count(&self) -> usize {
        self.runs
            .iter()
            .map(|run| (run.last - run.first + 1) as usize)
            .sum()
    }
}

/// Characters that take no room and draw nothing.
fn is_invisible(ch: char) -> bool {
    ch.is_control()
        || matches!(u32::from(ch),
            0x0300..=0x036F      // combining diacritical marks
            | 0x200B..=0x200F    // zero-width space, joiners, direction marks
            | 0x2028..=0x202E    // line and paragraph separators, embeddings
            | 0x2060..=0x206F    // word joiner, invisible operators
            | 0xFE00..=0xFE0F    // variation selectors
            | 0xFEFF             // byte-order mark
            | 0xE0100..=0xE01EF) // variation selectors supplement
}

/// Whether `ch` is full width: the East Asian scripts, fullwidth forms and emoji.
pub(crate) fn is_wide(ch: char) -> bool {
    matches!(u32::from(ch),
        0x1100..=0x115F
        | 0x2E80..=0x303E
        | 0x3041..=0x33FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xA000..=0xA4CF
        | 0xAC00..=0xD7A3
        | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F
        | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6
        | 0x1F300..=0x1F64F
        | 0x1F900..=0x1F9FF
        | 0x20000..=0x3FFFD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_data_parses_and_holds_the_cjk_block() {
        let font = Font::parse(DATA).expect("embedded font parses");
        assert!(font.glyph_count() > 21_000, "{}", font.glyph_count());
        for code in 0x4E00..=0x9FFF {
            let ch = char::from_u32(code).unwrap();
            let glyph = font.glyph(ch).unwrap_or_else(|| panic!("U+{code:04X}"));
            assert_eq!(glyph.width, 16, "U+{code:04X}");
        }
    }

    #[test]
    fn latin_is_half_width_and_cjk_full_width() {
        let font = font();
        assert_eq!(font.glyph('g').unwrap().width, 8);
        assert_eq!(font.glyph('生').unwrap().width, 16);
        assert_eq!(font.glyph('，').unwrap().width, 16);
        assert_eq!(font.glyph_or_box('\u{301}').width, 0);
        assert_eq!(font.glyph_or_box('\n').width, 0);
    }

    #[test]
    fn descenders_reach_below_the_baseline() {
        let font = font();
        let lowest = |ch: char| {
            let glyph = font.glyph(ch).unwrap();
            (0..EM)
                .rev()
                .find(|&y| glyph.rows[y as usize] != 0)
                .unwrap()
        };
        let baseline_row = EM - DESCENT - 1;
        for ch in ['o', 'l', 'e', 'A'] {
            assert_eq!(lowest(ch), baseline_row, "{ch}");
        }
        for ch in ['g', 'p', 'y', 'q', 'j'] {
            assert!(lowest(ch) > baseline_row, "{ch} has no descender");
        }
    }

    #[test]
    fn unknown_characters_draw_a_box_of_their_width() {
        let font = font();
        // Hangul and an ideograph of Extension B are outside the subset.
        let hangul = font.glyph_or_box('한');
        let ext_b = font.glyph_or_box('\u{20000}');
        let symbol = font.glyph_or_box('\u{2603}');
        assert_eq!(hangul, Font::replacement_box(true));
        assert_eq!(ext_b, Font::replacement_box(true));
        assert_eq!(symbol, Font::replacement_box(false));
        assert!(font.glyph('\u{2603}').is_none());
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        assert!(Font::parse(b"").is_err());
        assert!(Font::parse(&DATA[..DATA.len() / 2]).is_err());
        let mut flipped = DATA.to_vec();
        flipped[100] ^= 0xFF;
        let _ = Font::parse(&flipped);
    }
}
