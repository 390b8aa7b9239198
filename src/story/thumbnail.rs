//! Small PNG thumbnails of each stored image (`thumbnails/{image key}`), so a storyboard of fifty 2K scenes loads
//! a few megabytes instead of a few hundred.
//!
//! The thumbnail is an area average of the source ([`crate::normalize`]'s shrink), made
//! from the rows the service's checks decode anyway; an image those checks did not decode
//! row by row is decoded here, row by row too: memory is one output row of sums and the
//! thumbnail itself, not the full frame, which at `STAGE3_MAX_IMAGE_PIXELS` would be
//! 160 MB. Only interlaced PNGs, whose rows arrive out of order, are decoded whole first
//! (within the same bound).
//!
//! A thumbnail is the same picture, so it carries the same implicit AI-generated label: the
//! source's XMP packet with the TC260 label (GB 45438-2025, docs/design.md §2) is copied
//! over, once.

use std::io::Cursor;

use bytes::Bytes;

use crate::error::{Result, Stage3Error};
use crate::normalize::{Shrinker, Shrunk};
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

/// Decodes `png`, shrinks it so its longest side is at most `max_side` (area average), and
/// encodes the result as an 8-bit PNG of the same colour type, with the source's XMP label
/// packet. An image already small enough is re-encoded at its own size. The service makes
/// its thumbnails from the rows it checks instead ([`encode_thumbnail`]); this is for
/// images it did not decode: interlaced PNGs, visibly marked ones, relabelled results.
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
    let channels = reader.output_color_type().0.samples();
    let mut shrinker = Shrinker::to_fit(width, height, max_side, channels);

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
    let label = reader
        .info()
        .utf8_text
        .iter()
        .filter(|chunk| chunk.keyword == AIGC_KEYWORD)
        .find_map(|chunk| chunk.get_text().ok());
    encode_thumbnail(&shrinker.into_shrunk()?, label.as_deref())
}

/// Encodes shrunk pixels as the thumbnail PNG, carrying `xmp_label` (the full image's XMP
/// packet) when it has one. At the fast compression level: made for every image, a 320 px
/// thumbnail of a photo took 7 ms to encode at the balanced level, a quarter of the image's
/// whole pass, to save a few kilobytes the storyboard loads once.
pub(crate) fn encode_thumbnail(shrunk: &Shrunk, xmp_label: Option<&str>) -> Result<Bytes> {
    let color = match shrunk.channels {
        1 => png::ColorType::Grayscale,
        2 => png::ColorType::GrayscaleAlpha,
        3 => png::ColorType::Rgb,
        _ => png::ColorType::Rgba,
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, shrunk.width, shrunk.height);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    if let Some(label) = xmp_label {
        encoder
            .add_itxt_chunk(AIGC_KEYWORD.to_string(), label.to_string())
            .map_err(|e| Stage3Error::InvalidImage(format!("thumbnail label: {e}")))?;
    }
    let encoded = encoder.write_header().and_then(|mut writer| {
        writer.write_image_data(&shrunk.pixels)?;
        writer.finish()
    });
    encoded.map_err(|e| Stage3Error::InvalidImage(format!("thumbnail encoding: {e}")))?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::test_png::{adam7_png, noisy_rgb, png_of};
    use crate::normalize::{
        insert_aigc_label, normalize_and_shrink, thumbnail_size, AigcLabel, ImageLimits,
        DEFAULT_MAX_IMAGE_PIXELS,
    };
    use crate::schema::ImageSize;

    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
    };

    /// The service's one pass makes the thumbnail from the rows it checks; it must be the
    /// very thumbnail a second decode of the published PNG gives, byte for byte.
    #[test]
    fn the_thumbnail_of_the_checked_rows_is_the_published_pngs() {
        let image = noisy_rgb(1792, 1024, 7);
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(image.clone())
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        let rgba = image::DynamicImage::ImageRgb8(image.clone()).to_rgba8();
        let mut rgba_png = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut rgba_png), image::ImageFormat::Png)
            .unwrap();
        let label = AigcLabel::new("stage3", "ab".repeat(32), "", "");
        for (name, source) in [
            ("png", png_of(&image)),
            ("rgba png", Bytes::from(rgba_png)),
            ("jpeg", Bytes::from(jpeg)),
        ] {
            let (checked, shrunk) = normalize_and_shrink(
                source,
                ImageSize::Landscape,
                &LIMITS,
                Some(THUMBNAIL_MAX_SIDE),
            )
            .unwrap();
            let published = insert_aigc_label(&checked.png, &label).unwrap();
            let one_pass = encode_thumbnail(&shrunk.unwrap(), Some(&label.to_xmp())).unwrap();
            assert_eq!(
                one_pass,
                make_thumbnail(&published, THUMBNAIL_MAX_SIDE).unwrap(),
                "{name}"
            );
        }
        // Rows of an interlaced PNG arrive out of order: no shrink, the PNG is decoded.
        let (_, shrunk) = normalize_and_shrink(
            adam7_png(&image),
            ImageSize::Landscape,
            &LIMITS,
            Some(THUMBNAIL_MAX_SIDE),
        )
        .unwrap();
        assert!(shrunk.is_none());
    }

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
