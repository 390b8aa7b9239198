//! Small PNG thumbnails of each stored image (`thumbnails/{image key}`), so a storyboard of fifty 2K scenes loads
//! a few megabytes instead of a few hundred.
//!
//! The thumbnail is an area average of the source (every source pixel counts once, so fine
//! detail turns to its average colour rather than to aliasing), computed while the PNG is
//! decoded row by row: memory is one output row of sums and the thumbnail itself, not the
//! full frame, which at `STAGE3_MAX_IMAGE_PIXELS` would be 160 MB. Only interlaced PNGs,
//! whose rows arrive out of order, are decoded whole first (within the same bound).
//!
//! A thumbnail is the same picture, so it carries the same implicit AI-generated label: the
//! source's XMP packet with the TC260 label (GB 45438-2025, docs/design.md §2) is copied
//! over, once.

use std::io::Cursor;

use bytes::Bytes;

use crate::error::{Result, Stage3Error};
use crate::storage::{ObjectMeta, ObjectStore};

/// The longest side of a stored thumbnail, in pixels: sharp in a grid card of ~300 CSS px.
pub(crate) const THUMBNAIL_MAX_SIDE: u32 = 320;

/// The keyword of the `iTXt` chunk carrying the implicit label, in XMP (docs/design.md §2).
const AIGC_KEYWORD: &str = "XML:com.adobe.xmp";

/// The largest source decoded, width × height: the service's default image bound.
const MAX_SOURCE_PIXELS: u64 = 40_000_000;

/// Where the thumbnails live: a folder of their own beside the images, under the image's
/// own name, so whatever lists or globs the images (`*.png` in the output directory, the
/// record/image pairing checks) never takes a thumbnail for an image.
pub(crate) const THUMBNAIL_FOLDER: &str = "thumbnails/";

/// The key of the thumbnail of the image stored under `image_key`:
/// `scene_001-9c1e4f0a2b7d3e55.png` → `thumbnails/scene_001-9c1e4f0a2b7d3e55.png`. Image
/// keys are content-addressed and never overwritten, so neither is the thumbnail.
pub fn thumbnail_key(image_key: &str) -> String {
    format!("{THUMBNAIL_FOLDER}{image_key}")
}

/// Makes the thumbnail of the image already stored under `image_key` from its PNG bytes and
/// stores it beside it; returns the thumbnail's key. Decoding is CPU work, so it runs on a
/// blocking thread, once; a transient storage failure of the upload is tried again.
pub(crate) async fn store_thumbnail(
    store: &dyn ObjectStore,
    image_key: &str,
    png: Bytes,
) -> Result<String> {
    let thumbnail = tokio::task::spawn_blocking(move || make_thumbnail(&png, THUMBNAIL_MAX_SIDE))
        .await
        .map_err(|e| Stage3Error::InvalidImage(format!("thumbnail task failed: {e}")))??;
    put_thumbnail(store, image_key, thumbnail).await
}

/// Stores a thumbnail already made ([`make_thumbnail`]) beside the image stored under
/// `image_key`; returns the thumbnail's key.
pub(crate) async fn put_thumbnail(
    store: &dyn ObjectStore,
    image_key: &str,
    thumbnail: Bytes,
) -> Result<String> {
    let key = thumbnail_key(image_key);
    super::retrying(|| store.put(&key, thumbnail.clone(), ObjectMeta::PNG)).await?;
    Ok(key)
}

/// The size of the thumbnail of a `width` × `height` image: the longest side at most
/// `max_side`, the aspect kept, never enlarged, never zero.
pub(crate) fn thumbnail_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let max_side = max_side.max(1);
    let longest = width.max(height);
    if longest <= max_side {
        return (width.max(1), height.max(1));
    }
    let scale = |side: u32| {
        let scaled =
            (u64::from(side) * u64::from(max_side) + u64::from(longest) / 2) / u64::from(longest);
        u32::try_from(scaled).unwrap_or(max_side).clamp(1, max_side)
    };
    (scale(width), scale(height))
}

/// Decodes `png`, shrinks it so its longest side is at most `max_side` (area average), and
/// encodes the result as an 8-bit PNG of the same colour type, with the source's `AIGC`
/// label chunk. An image already small enough is re-encoded at its own size.
pub(crate) fn make_thumbnail(png: &[u8], max_side: u32) -> Result<Bytes> {
    let invalid = |e: png::DecodingError| Stage3Error::InvalidImage(format!("thumbnail: {e}"));
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(png),
        png::Limits {
            bytes: usize::try_from(MAX_SOURCE_PIXELS * 4 * 2).unwrap_or(usize::MAX),
        },
    );
    // 8 bits a sample, palettes expanded: Gray, GrayAlpha, Rgb or Rgba out.
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let header = decoder.read_header_info().map_err(invalid)?;
    let (width, height, interlaced) = (header.width, header.height, header.interlaced);
    if u64::from(width) * u64::from(height) > MAX_SOURCE_PIXELS {
        return Err(Stage3Error::InvalidImage(format!(
            "thumbnail: a {width}x{height} image is larger than {MAX_SOURCE_PIXELS} pixels"
        )));
    }
    let mut reader = decoder.read_info().map_err(invalid)?;
    let (color, _) = reader.output_color_type();
    let channels = color.samples();
    let (out_width, out_height) = thumbnail_size(width, height, max_side);
    let mut shrinker = Shrinker::new(width, height, out_width, out_height, channels);

    if interlaced {
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| Stage3Error::InvalidImage("thumbnail: image too large".into()))?;
        let mut frame = vec![0; size];
        let info = reader.next_frame(&mut frame).map_err(invalid)?;
        for row in frame.chunks_exact(info.line_size).take(height as usize) {
            shrinker.add_row(row);
        }
    } else {
        while let Some(row) = reader.next_row().map_err(invalid)? {
            shrinker.add_row(row.data());
        }
    }
    // On to IEND: a label chunk may follow the image data.
    reader.finish().map_err(invalid)?;
    // One label per file: the first, should a source ever carry more.
    let labels: Vec<String> = reader
        .info()
        .utf8_text
        .iter()
        .filter(|chunk| chunk.keyword == AIGC_KEYWORD)
        .filter_map(|chunk| chunk.get_text().ok())
        .take(1)
        .collect();
    let pixels = shrinker.finish()?;

    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, out_width, out_height);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    for label in labels {
        encoder
            .add_itxt_chunk(AIGC_KEYWORD.to_string(), label)
            .map_err(|e| Stage3Error::InvalidImage(format!("thumbnail label: {e}")))?;
    }
    let encoded = encoder.write_header().and_then(|mut writer| {
        writer.write_image_data(&pixels)?;
        writer.finish()
    });
    encoded.map_err(|e| Stage3Error::InvalidImage(format!("thumbnail encoding: {e}")))?;
    Ok(Bytes::from(out))
}

/// Area-averages rows arriving top to bottom into an `out_width` × `out_height` image.
///
/// Source column `x` falls in output column `x * out_width / width` (and rows likewise), so
/// every source pixel lands in exactly one output pixel; each output pixel is the mean of
/// its block. Sums are `u32`: a block holds at most 40 M pixels × 255, well within range.
struct Shrinker {
    width: u32,
    height: u32,
    out_width: u32,
    out_height: u32,
    channels: usize,
    /// Output column of every source column.
    column_of: Vec<u32>,
    /// Source columns per output column.
    column_counts: Vec<u32>,
    /// Sums of the output row being gathered, `out_width * channels`.
    sums: Vec<u32>,
    rows_in_sums: u32,
    /// The output row `sums` belongs to.
    current_out_row: u32,
    next_source_row: u32,
    pixels: Vec<u8>,
}

impl Shrinker {
    fn new(width: u32, height: u32, out_width: u32, out_height: u32, channels: usize) -> Self {
        let column_of: Vec<u32> = (0..width)
            .map(|x| (u64::from(x) * u64::from(out_width) / u64::from(width)) as u32)
            .collect();
        let mut column_counts = vec![0u32; out_width as usize];
        for &column in &column_of {
            column_counts[column as usize] += 1;
        }
        Shrinker {
            width,
            height,
            out_width,
            out_height,
            channels,
            column_of,
            column_counts,
            sums: vec![0; out_width as usize * channels],
            rows_in_sums: 0,
            current_out_row: 0,
            next_source_row: 0,
            pixels: Vec::with_capacity(out_width as usize * out_height as usize * channels),
        }
    }

    fn add_row(&mut self, row: &[u8]) {
        if self.next_source_row >= self.height {
            return;
        }
        let out_row = (u64::from(self.next_source_row) * u64::from(self.out_height)
            / u64::from(self.height)) as u32;
        self.next_source_row += 1;
        if out_row != self.current_out_row {
            self.flush();
            self.current_out_row = out_row;
        }
        let channels = self.channels;
        for (x, pixel) in row
            .chunks_exact(channels)
            .take(self.width as usize)
            .enumerate()
        {
            let base = self.column_of[x] as usize * channels;
            for (sum, &sample) in self.sums[base..base + channels].iter_mut().zip(pixel) {
                *sum += u32::from(sample);
            }
        }
        self.rows_in_sums += 1;
    }

    /// Emits the gathered output row as the rounded mean of each block.
    fn flush(&mut self) {
        if self.rows_in_sums == 0 {
            return;
        }
        let channels = self.channels;
        for (column, sums) in self.sums.chunks_exact_mut(channels).enumerate() {
            let count = self.column_counts[column] * self.rows_in_sums;
            for sum in sums {
                self.pixels.push(((*sum + count / 2) / count.max(1)) as u8);
                *sum = 0;
            }
        }
        self.rows_in_sums = 0;
    }

    fn finish(mut self) -> Result<Vec<u8>> {
        self.flush();
        let expected = self.out_width as usize * self.out_height as usize * self.channels;
        if self.next_source_row != self.height || self.pixels.len() != expected {
            return Err(Stage3Error::InvalidImage(format!(
                "thumbnail: the image ended after {} of {} rows",
                self.next_source_row, self.height
            )));
        }
        Ok(self.pixels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::test_png::adam7_png;

    fn encode(
        width: u32,
        height: u32,
        color: png::ColorType,
        data: &[u8],
        label: Option<(&str, bool)>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some((text, before_data)) = label {
            if before_data {
                encoder
                    .add_itxt_chunk(AIGC_KEYWORD.into(), text.into())
                    .unwrap();
            }
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(data).unwrap();
            if !before_data {
                let chunk = png::text_metadata::ITXtChunk::new(AIGC_KEYWORD, text);
                writer.write_text_chunk(&chunk).unwrap();
            }
            writer.finish().unwrap();
        } else {
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(data).unwrap();
            writer.finish().unwrap();
        }
        out
    }

    fn decode(png_bytes: &[u8]) -> (png::OutputInfo, Vec<u8>, Vec<String>) {
        let mut reader = png::Decoder::new(Cursor::new(png_bytes))
            .read_info()
            .unwrap();
        let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buffer).unwrap();
        reader.finish().unwrap();
        let labels = reader
            .info()
            .utf8_text
            .iter()
            .map(|c| format!("{}={}", c.keyword, c.get_text().unwrap()))
            .collect();
        buffer.truncate(info.buffer_size());
        (info, buffer, labels)
    }

    #[test]
    fn sizes_keep_the_aspect_and_never_enlarge() {
        assert_eq!(thumbnail_size(1024, 1024, 320), (320, 320));
        assert_eq!(thumbnail_size(1792, 1024, 320), (320, 183));
        assert_eq!(thumbnail_size(1024, 1792, 320), (183, 320));
        assert_eq!(thumbnail_size(1344, 768, 320), (320, 183));
        assert_eq!(thumbnail_size(200, 100, 320), (200, 100));
        assert_eq!(thumbnail_size(10_000, 1, 320), (320, 1));
    }

    #[test]
    fn keys_sit_in_their_own_folder_under_the_image_name() {
        assert_eq!(
            thumbnail_key("scene_001-9c1e4f0a2b7d3e55.png"),
            "thumbnails/scene_001-9c1e4f0a2b7d3e55.png"
        );
    }

    #[test]
    fn each_output_pixel_is_the_mean_of_its_block() {
        // 4x2 RGB: left half black/white columns averaging to 128, right half solid red.
        let mut data = Vec::new();
        for _ in 0..2 {
            data.extend_from_slice(&[0, 0, 0, 255, 255, 255, 200, 0, 0, 200, 0, 0]);
        }
        let source = encode(4, 2, png::ColorType::Rgb, &data, None);
        let thumbnail = make_thumbnail(&source, 2).unwrap();
        let (info, pixels, _) = decode(&thumbnail);
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(pixels, vec![128, 128, 128, 200, 0, 0]);
    }

    #[test]
    fn a_real_picture_shrinks_to_the_bound_with_its_colours() {
        // A 1792x1024 picture: left half blue, right half orange, as a provider might send.
        let (width, height) = (1792u32, 1024u32);
        let data: Vec<u8> = (0..height)
            .flat_map(|_| {
                (0..width).flat_map(|x| {
                    if x < width / 2 {
                        [20, 60, 200]
                    } else {
                        [240, 140, 20]
                    }
                })
            })
            .collect();
        let source = encode(width, height, png::ColorType::Rgb, &data, None);
        let thumbnail = make_thumbnail(&source, THUMBNAIL_MAX_SIDE).unwrap();
        assert!(thumbnail.len() < source.len());
        let (info, pixels, _) = decode(&thumbnail);
        assert_eq!((info.width, info.height), (320, 183));
        let at = |x: usize, y: usize| &pixels[(y * 320 + x) * 3..(y * 320 + x) * 3 + 3];
        assert_eq!(at(10, 100), [20, 60, 200]);
        assert_eq!(at(310, 5), [240, 140, 20]);
    }

    #[test]
    fn alpha_and_grey_keep_their_colour_type() {
        let rgba = encode(8, 8, png::ColorType::Rgba, &[7; 8 * 8 * 4], None);
        let (info, pixels, _) = decode(&make_thumbnail(&rgba, 4).unwrap());
        assert_eq!(
            (info.width, info.height, info.color_type),
            (4, 4, png::ColorType::Rgba)
        );
        assert!(pixels.iter().all(|&p| p == 7));

        let grey = encode(8, 8, png::ColorType::Grayscale, &[90; 64], None);
        let (info, _, _) = decode(&make_thumbnail(&grey, 4).unwrap());
        assert_eq!(info.color_type, png::ColorType::Grayscale);
    }

    #[test]
    fn the_aigc_label_is_carried_over_wherever_it_sat() {
        let label =
            r#"<x:xmpmeta><TC260:AIGC>{&quot;Label&quot;:&quot;1&quot;}</TC260:AIGC></x:xmpmeta>"#;
        for before_data in [true, false] {
            let source = encode(
                8,
                8,
                png::ColorType::Rgb,
                &[1; 8 * 8 * 3],
                Some((label, before_data)),
            );
            let (_, _, labels) = decode(&make_thumbnail(&source, 4).unwrap());
            assert_eq!(
                labels,
                vec![format!("XML:com.adobe.xmp={label}")],
                "label before IDAT: {before_data}"
            );
        }
    }

    #[test]
    fn interlaced_sources_shrink_to_the_same_thumbnail() {
        let (width, height) = (40u32, 24u32);
        let rgb: Vec<u8> = (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let plain = encode(width, height, png::ColorType::Rgb, &rgb, None);
        let interlaced = adam7_png(&image::RgbImage::from_raw(width, height, rgb).unwrap());
        assert_eq!(
            decode(&make_thumbnail(&interlaced, 10).unwrap()).1,
            decode(&make_thumbnail(&plain, 10).unwrap()).1
        );
    }

    #[test]
    fn garbage_and_truncated_files_are_invalid_images() {
        let err = make_thumbnail(b"not a png", 320).unwrap_err();
        assert_eq!(err.error_type(), crate::error::ErrorType::InvalidImage);
        let whole = encode(64, 64, png::ColorType::Rgb, &[5; 64 * 64 * 3], None);
        let err = make_thumbnail(&whole[..whole.len() / 2], 320).unwrap_err();
        assert_eq!(err.error_type(), crate::error::ErrorType::InvalidImage);
    }
}
