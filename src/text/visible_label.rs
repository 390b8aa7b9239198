//! The visible AIGC mark: "AI生成" in the bottom-right corner of a picture.
//!
//! GB 45438-2025 asks pictures shown to the public to carry an explicit label as well as
//! the metadata one: visible text in a corner no smaller than 5% of the short side
//! (docs/design.md §3). `STAGE3_VISIBLE_LABEL=1` turns it on (docs/design.md §2).
//!
//! "Text height" here is the height of the inked pixels of "AI生成" (coverage ≥ ½), top of
//! the tallest stroke to the bottom of the lowest, which for this text is the ideographs'
//! height. It is made at least 6% of the short side, a margin above the 5% asked for. The
//! text is white on a dark translucent plate, with a soft dark halo: white-on-dark reads on
//! white pictures, and on black pictures the white text still stands out.

use image::{RgbImage, RgbaImage};

use super::{Mask, Surface, MAX_PX, MIN_PX};

/// The mark's text.
pub(crate) const VISIBLE_LABEL_TEXT: &str = "AI生成";
/// Least ink height of the text, in percent of the image's short side.
const HEIGHT_PERCENT: u32 = 6;
/// Distance from the image's edges to the plate, in percent of the short side.
const MARGIN_PERCENT: u32 = 2;
const PLATE_OPACITY: u8 = 190;
const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];

/// Where the mark went, in pixels of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LabelPlacement {
    /// The plate: left, top, width, height.
    pub plate: (u32, u32, u32, u32),
    /// The text's size in pixels per em.
    pub px: u32,
    /// Height of the text's ink (see the module comment), in pixels.
    pub ink_height: u32,
}

/// Draws the mark on an RGBA picture (transparent parts become opaque under the plate).
/// Returns `None`, drawing nothing, for an empty picture.
pub(crate) fn stamp_visible_label(image: &mut RgbaImage) -> Option<LabelPlacement> {
    let (width, height) = image.dimensions();
    let mut surface = Surface::new(image, width, height, 4)?;
    stamp(&mut surface)
}

/// Draws the mark on an RGB picture; see [`stamp_visible_label`].
pub(crate) fn stamp_visible_label_rgb(image: &mut RgbImage) -> Option<LabelPlacement> {
    let (width, height) = image.dimensions();
    let mut surface = Surface::new(image, width, height, 3)?;
    stamp(&mut surface)
}

fn stamp(surface: &mut Surface<'_>) -> Option<LabelPlacement> {
    let (width, height) = (surface.width(), surface.height());
    let short = width.min(height);
    if short == 0 {
        return None;
    }
    let target = (short * HEIGHT_PERCENT).div_ceil(100);

    // The smallest size whose ink is tall enough: start from the bitmaps' proportions and
    // measure the real mask, since edge smoothing shaves a little off.
    let ink_rows = |mask: &Mask| {
        mask.ink_bounds(128)
            .map_or(0, |(_, top, _, bottom)| bottom - top)
    };
    let mut px = (target * 16 / 15).clamp(MIN_PX, MAX_PX);
    let mut mask = Mask::line(VISIBLE_LABEL_TEXT, px);
    while ink_rows(&mask) < target && px < MAX_PX {
        px += 1;
        mask = Mask::line(VISIBLE_LABEL_TEXT, px);
    }
    let (left, top, right, bottom) = mask.ink_bounds(128)?;

    // The plate hugs the ink with padding of a quarter of the text height.
    let pad = ((bottom - top) / 4).max(2);
    let plate_w = (right - left) + 2 * pad;
    let plate_h = (bottom - top) + 2 * pad;
    let margin = (short * MARGIN_PERCENT / 100).max(1);
    let plate_x = width.saturating_sub(plate_w + margin);
    let plate_y = height.saturating_sub(plate_h + margin);
    surface.fill_rect(plate_x, plate_y, plate_w, plate_h, BLACK, PLATE_OPACITY);

    let text_x = i64::from(plate_x + pad) - i64::from(left);
    let text_y = i64::from(plate_y + pad) - i64::from(top);
    let radius = (px / 16).max(1);
    let shadow = mask.shadow(radius);
    let r = i64::from(radius);
    surface.paint(&shadow, text_x - r, text_y - r, BLACK, 200);
    surface.paint(&mask, text_x, text_y, WHITE, 255);

    Some(LabelPlacement {
        plate: (plate_x, plate_y, plate_w, plate_h),
        px,
        ink_height: bottom - top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgba;

    fn luminance(p: &Rgba<u8>) -> f64 {
        0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2])
    }

    /// Compares the stamped picture with the original: which pixels changed, where the
    /// text's ink is (bright pixels inside the changed area) and how it contrasts.
    fn check(width: u32, height: u32, background: [u8; 4]) {
        let original = RgbaImage::from_pixel(width, height, Rgba(background));
        let mut image = original.clone();
        let placement = stamp_visible_label(&mut image).expect("stamped");
        let short = width.min(height);

        // Everything that changed lies in the bottom-right corner region.
        let (mut cx0, mut cy0, mut cx1, mut cy1) = (u32::MAX, u32::MAX, 0, 0);
        for (x, y, p) in image.enumerate_pixels() {
            if p != original.get_pixel(x, y) {
                cx0 = cx0.min(x);
                cy0 = cy0.min(y);
                cx1 = cx1.max(x + 1);
                cy1 = cy1.max(y + 1);
            }
        }
        assert!(cx1 > cx0, "nothing was drawn");
        assert!(
            cx0 > width / 2 && cy0 > height / 2,
            "mark not in the corner"
        );
        assert!(
            width - cx1 <= short * 5 / 100,
            "too far from the right edge"
        );
        assert!(
            height - cy1 <= short * 5 / 100,
            "too far from the bottom edge"
        );

        // The plate: the darkest common colour in the changed area; the ink: pixels far
        // brighter than the plate.
        let (px, py, pw, ph) = placement.plate;
        let plate_lum = luminance(image.get_pixel(px + 1, py + 1));
        let mut ink = Vec::new();
        let (mut iy0, mut iy1) = (u32::MAX, 0);
        for y in py..py + ph {
            for x in px..px + pw {
                let l = luminance(image.get_pixel(x, y));
                if l > plate_lum + 100.0 {
                    ink.push(l);
                    iy0 = iy0.min(y);
                    iy1 = iy1.max(y + 1);
                }
            }
        }
        assert!(!ink.is_empty(), "no text ink on the plate");
        let ink_height = iy1 - iy0;
        assert!(
            ink_height * 100 >= short * 5,
            "{width}x{height}: ink {ink_height} px < 5% of {short}"
        );
        let ink_lum = ink.iter().sum::<f64>() / ink.len() as f64;
        assert!(
            ink_lum - plate_lum >= 150.0,
            "{width}x{height} on {background:?}: ink {ink_lum:.0} vs plate {plate_lum:.0}"
        );
        // The plate differs from the picture around it, on white; on black the text
        // alone carries the contrast.
        let around = luminance(original.get_pixel(0, 0));
        if around > 128.0 {
            assert!(
                around - plate_lum >= 150.0,
                "plate {plate_lum:.0} on {around:.0}"
            );
        }
    }

    #[test]
    fn the_mark_is_in_the_corner_tall_enough_and_contrasting() {
        for (w, h) in [(1024, 1024), (1792, 1024), (1024, 1792)] {
            for bg in [[255, 255, 255, 255], [0, 0, 0, 255], [128, 128, 128, 255]] {
                check(w, h, bg);
            }
        }
    }

    #[test]
    fn the_mark_on_small_and_odd_pictures_never_panics() {
        for (w, h) in [(1, 1), (3, 200), (200, 3), (64, 64), (17, 33)] {
            let mut image = RgbaImage::from_pixel(w, h, Rgba([10, 200, 30, 255]));
            let placement = stamp_visible_label(&mut image).unwrap();
            assert!(placement.px >= MIN_PX);
        }
        assert_eq!(stamp_visible_label(&mut RgbaImage::new(0, 10)), None);
    }

    #[test]
    fn the_mark_on_transparent_pictures_is_opaque_enough_to_read() {
        let mut image = RgbaImage::from_pixel(512, 512, Rgba([0, 0, 0, 0]));
        let placement = stamp_visible_label(&mut image).unwrap();
        let (x, y, _, _) = placement.plate;
        assert!(image.get_pixel(x + 1, y + 1)[3] >= PLATE_OPACITY);
        assert!(image.pixels().any(|p| p[0] > 240 && p[3] > 240));
    }

    #[test]
    fn the_rgb_stamp_draws_the_same_as_the_rgba_one() {
        let mut rgb = RgbImage::from_pixel(300, 200, image::Rgb([200, 120, 40]));
        let mut rgba = RgbaImage::from_pixel(300, 200, Rgba([200, 120, 40, 255]));
        stamp_visible_label_rgb(&mut rgb);
        stamp_visible_label(&mut rgba);
        for (a, b) in rgb.pixels().zip(rgba.pixels()) {
            for c in 0..3 {
                assert!(a[c].abs_diff(b[c]) <= 1, "{a:?} vs {b:?}");
            }
        }
    }

    /// Writes the mark on white, black and a busy picture to /tmp, to look at:
    /// `cargo test --lib visible_label -- --ignored`
    #[test]
    #[ignore = "writes samples to /tmp"]
    fn samples() {
        for (name, w, h, bg) in [
            ("white", 1024, 1024, [255, 255, 255, 255]),
            ("black", 1792, 1024, [0, 0, 0, 255]),
        ] {
            let mut image = RgbaImage::from_pixel(w, h, Rgba(bg));
            stamp_visible_label(&mut image).unwrap();
            image
                .save(format!("/tmp/visible-label-{name}.png"))
                .unwrap();
        }
        let mut stripes = RgbaImage::from_fn(1024, 1792, |x, y| {
            let v = if (x / 7 + y / 11) % 2 == 0 { 250 } else { 20 };
            Rgba([v, v, 255 - v / 2, 255])
        });
        stamp_visible_label(&mut stripes).unwrap();
        stripes.save("/tmp/visible-label-stripes.png").unwrap();
    }
}
