//! Image normalisation: sniff the real format, decode safely, validate, hand back a PNG.
//!
//! Providers send PNG, JPEG or WEBP, and their labels lie (docs/design.md §3), so the format is
//! read from the magic bytes. A PNG keeps its image data byte for byte, but only the chunks
//! we check travel with it ([`chunks`]: critical chunks and a short allowlist; animation is
//! flattened); anything else is converted. Validation rejects what a reader would call a
//! broken picture. [`aigc`] writes the GB 45438-2025 label into the stored PNG afterwards.
//!
//! Every rejection is [`Stage3Error::InvalidImage`], which the service retries as transient:
//! this module is the seed's "quality validation → automatic regeneration" hook. The checks
//! run cheapest first — magic bytes, container structure (truncation), header dimensions
//! (decompression bombs, aspect ratio) — so most bad images are refused before a single
//! pixel is decoded, and the blank-image test samples a grid instead of walking every pixel.

mod aigc;
mod chunks;
mod shrink;
#[cfg(test)]
pub(crate) mod test_png;

use std::io::Cursor;

use bytes::Bytes;
use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPDecoder;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageEncoder};
use sha2::{Digest, Sha256};

use crate::error::{Result, Stage3Error};
use crate::schema::ImageSize;

pub(crate) use aigc::insert_aigc_label_owned;
pub use aigc::{
    count_aigc_labels, insert_aigc_label, read_aigc_label, strip_aigc_label, AigcLabel,
};
pub(crate) use chunks::{MAX_ICC_PROFILE_BYTES, PNG_SIGNATURE};
pub(crate) use shrink::{thumbnail_size, Shrinker, Shrunk};

/// The default `STAGE3_MAX_IMAGE_PIXELS`: 4096 x 4096, the largest image any provider we
/// call draws (Seedream's 4K tier for `hd`, 16.7 MP; OpenRouter's largest ask is "2K",
/// about 4.2 MP). A 40 MP photo is still refused from its header: decoding one took
/// ~440 MB and a 120 MB PNG, where a 16.7 MP RGBA frame is at most 67 MB.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 4096 * 4096;
const _: () = assert!(
    2752 * 1536 <= DEFAULT_MAX_IMAGE_PIXELS // OpenRouter 2K 16:9 (and 9:16)
        && 5504 * 3040 <= DEFAULT_MAX_IMAGE_PIXELS // Seedream 4K 16:9
        && 4096 * 4096 <= DEFAULT_MAX_IMAGE_PIXELS // Seedream 4K 1:1
        && 8000 * 5000 > DEFAULT_MAX_IMAGE_PIXELS // a 40 MP photo
);

/// How far an image's width/height ratio may stray from the requested one (relative).
/// Models return 16:9 (1.778) for `1792x1024` (1.75); 15% leaves room for such rounding
/// and refuses a square answer to a landscape request.
pub(crate) const MAX_ASPECT_DEVIATION: f64 = 0.15;

/// Below this standard deviation of luminance (on 0–255) an image counts as blank: a
/// failed generation that came back as one flat colour.
pub(crate) const MIN_LUMA_STDDEV: f64 = 2.0;

/// The shortest side we accept. Anything smaller is a thumbnail or an error page, not an
/// illustration, and it could not hold the sampling grid either.
pub(crate) const MIN_SIDE: u32 = 64;

/// The blank test reads a grid of this many rows × columns (8192 pixels): enough to see
/// any real picture, few enough to cost nothing next to decoding.
const SAMPLE_ROWS: u32 = 64;
const SAMPLE_COLUMNS: u32 = 128;

/// The formats a provider may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Png,
    Jpeg,
    Webp,
}

impl SourceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Png => "png",
            SourceFormat::Jpeg => "jpeg",
            SourceFormat::Webp => "webp",
        }
    }

    /// The name people know the format by, for messages.
    fn label(self) -> &'static str {
        match self {
            SourceFormat::Png => "PNG",
            SourceFormat::Jpeg => "JPEG",
            SourceFormat::Webp => "WEBP",
        }
    }
}

/// Bounds on what we agree to decode, so a hostile image cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest width × height accepted.
    pub max_pixels: u64,
}

impl ImageLimits {
    /// What a decoder may allocate: the decoded frame at up to 4 bytes a pixel, twice over
    /// for the decoder's own working buffers.
    pub fn max_alloc_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(4 * 2)
    }

    /// The longest side that can pass at all: the widest accepted shape is the landscape
    /// ratio stretched by the aspect tolerance (about 2:1), at `max_pixels`.
    fn max_side(&self) -> u32 {
        let widest = 1792.0 / 1024.0 * (1.0 + MAX_ASPECT_DEVIATION);
        let side = (self.max_pixels as f64 * widest).sqrt().ceil();
        if side >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            side as u32
        }
    }

    /// The same bounds in the `image` crate's terms.
    fn for_image_crate(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(self.max_side());
        limits.max_image_height = Some(self.max_side());
        limits.max_alloc = Some(self.max_alloc_bytes());
        limits
    }

    /// The same bounds in the `png` crate's terms.
    fn for_png_crate(&self) -> png::Limits {
        png::Limits {
            bytes: usize::try_from(self.max_alloc_bytes()).unwrap_or(usize::MAX),
        }
    }
}

/// A validated PNG, ready to store.
#[derive(Debug, Clone)]
pub struct NormalizedImage {
    pub png: Bytes,
    pub width: u32,
    pub height: u32,
    pub source_format: SourceFormat,
    /// Lowercase hex SHA-256 of `png`.
    pub content_sha256: String,
}

impl NormalizedImage {
    /// The same image with `label` as its AIGC implicit label (see [`aigc`]), its hash
    /// recomputed over the labelled bytes. The pixels and every other chunk are unchanged.
    pub fn with_aigc_label(self, label: &AigcLabel) -> Result<NormalizedImage> {
        let png = insert_aigc_label(&self.png, label)?;
        let content_sha256 = hex::encode(Sha256::digest(&png));
        Ok(NormalizedImage {
            png,
            content_sha256,
            ..self
        })
    }
}

/// The most bytes a PNG of `width` × `height` pixels at `bits_per_pixel` can honestly
/// need: its raw scanlines (a filter byte a row, more rows when interlaced), an eighth more
/// for deflate's worst case (fixed-Huffman literals take up to 9 bits a byte), and room for
/// the allowed ancillary chunks (the colour profile bound, plus 64 KiB). A bigger file is
/// padding — empty deflate blocks, or many empty chunks — that every reader would have to
/// chew through and the store would keep. Since pixels are bounded by
/// `STAGE3_MAX_IMAGE_PIXELS`, so is this.
pub(crate) fn max_png_bytes(width: u32, height: u32, bits_per_pixel: u32) -> u64 {
    let row = (u64::from(width) * u64::from(bits_per_pixel)).div_ceil(8);
    // Adam7 splits each row across up to 4 passes' scanlines, each with its filter byte
    // and a partly filled last byte.
    let raw = u64::from(height) * (row + 8);
    raw + raw / 8 + MAX_ICC_PROFILE_BYTES as u64 + 64 * 1024
}

/// The real format of `bytes`, from its magic numbers.
pub(crate) fn sniff_format(bytes: &[u8]) -> Option<SourceFormat> {
    if bytes.starts_with(chunks::PNG_SIGNATURE) {
        Some(SourceFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(SourceFormat::Jpeg)
    } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
        Some(SourceFormat::Webp)
    } else {
        None
    }
}

/// Decodes, validates against the requested size, and returns the PNG to store.
pub fn normalize_image(
    bytes: Bytes,
    requested: ImageSize,
    limits: &ImageLimits,
) -> Result<NormalizedImage> {
    normalize_and_shrink(bytes, requested, limits, None).map(|(image, _)| image)
}

/// [`normalize_image`], also shrinking the pixels it decodes to at most `thumbnail_side`
/// on the longest side, when asked: the thumbnail costs no second decode. `None` for an
/// interlaced PNG, whose rows arrive out of order (its thumbnail is made from the PNG).
pub(crate) fn normalize_and_shrink(
    bytes: Bytes,
    requested: ImageSize,
    limits: &ImageLimits,
    thumbnail_side: Option<u32>,
) -> Result<(NormalizedImage, Option<Shrunk>)> {
    let Some(source_format) = sniff_format(&bytes) else {
        return Err(invalid(format!(
            "not a PNG, JPEG or WEBP image ({} bytes starting {})",
            bytes.len(),
            hex::encode(&bytes[..bytes.len().min(8)])
        )));
    };
    let (png, width, height, shrunk) = match source_format {
        SourceFormat::Png => validate_png(bytes, requested, limits, thumbnail_side)?,
        SourceFormat::Jpeg => {
            jpeg_stream_end(&bytes)?;
            let decoder = JpegDecoder::new(Cursor::new(&bytes[..]))
                .map_err(|e| decode_error(source_format, e))?;
            convert_to_png(decoder, source_format, requested, limits, thumbnail_side)?
        }
        SourceFormat::Webp => {
            check_riff_length(&bytes)?;
            let decoder = WebPDecoder::new(Cursor::new(&bytes[..]))
                .map_err(|e| decode_error(source_format, e))?;
            convert_to_png(decoder, source_format, requested, limits, thumbnail_side)?
        }
    };
    let content_sha256 = hex::encode(Sha256::digest(&png));
    let image = NormalizedImage {
        png,
        width,
        height,
        source_format,
        content_sha256,
    };
    Ok((image, shrunk))
}

/// What a decoder pass hands back: the PNG to store, its size, and the shrunk pixels when
/// asked for and possible.
type Checked = (Bytes, u32, u32, Option<Shrunk>);

/// Keeps the chunks we check ([`chunks::keep_checked_chunks`]), then decodes that PNG
/// completely, row by row, and hands it back. Decoding row by row needs no frame buffer:
/// memory stays at a couple of rows whatever the image size.
fn validate_png(
    bytes: Bytes,
    requested: ImageSize,
    limits: &ImageLimits,
    thumbnail_side: Option<u32>,
) -> Result<Checked> {
    // Bytes after IEND (sometimes a whole second file), text, EXIF, animation frames and
    // unknown chunks are no part of the picture we check: they are not stored either.
    let (png, report) = chunks::keep_checked_chunks(bytes)?;
    if !report.dropped.is_empty() || report.trailing_bytes > 0 {
        tracing::debug!(
            dropped = %report.dropped_names(),
            flattened_animation = report.flattened_animation,
            trailing_bytes = report.trailing_bytes,
            "PNG chunks not kept"
        );
    }

    let mut options = png::DecodeOptions::default();
    // Browsers skip an ancillary chunk whose CRC fails, but Pillow refuses the whole file,
    // and we store these chunks unchanged for whoever reads them next: a damaged chunk of
    // any kind we keep sends the image back for another try.
    options.set_skip_ancillary_crc_failures(false);
    // The pixels are all we check, and the profile's size was bounded by the chunk pass:
    // the decoder has no reason to inflate it (or text, none of which is left), though it
    // still checks the chunk's CRC.
    options.set_ignore_iccp_chunk(true);
    options.set_ignore_text_chunk(true);
    let mut decoder = png::Decoder::new_with_options(Cursor::new(&png[..]), options);
    decoder.set_limits(limits.for_png_crate());
    // 8 bits a sample whatever the source depth: all the blank test needs.
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let header = decoder.read_header_info().map_err(png_error)?;
    let (width, height, interlaced) = (header.width, header.height, header.interlaced);
    check_geometry(width, height, requested, limits)?;
    let bits_per_pixel = header.color_type.samples() as u32 * header.bit_depth as u32;
    check_png_size(png.len(), width, height, bits_per_pixel)?;

    let mut reader = decoder.read_info().map_err(png_error)?;
    let channels = reader.output_color_type().0.samples();
    let full_row = width as usize * channels;
    // An interlaced image arrives in seven passes; only the last (every odd row) comes at
    // full width, so the grid is drawn from those rows.
    let full_rows = if interlaced { height / 2 } else { height };
    let mut sampler = LumaSampler::new(width, full_rows, channels);
    let mut shrinker = thumbnail_side
        .filter(|_| !interlaced)
        .map(|side| Shrinker::to_fit(width, height, side, channels));
    while let Some(row) = reader.next_row().map_err(png_error)? {
        let data = row.data();
        if data.len() == full_row {
            sampler.offer_row(data);
            if let Some(shrinker) = &mut shrinker {
                shrinker.add_row(data);
            }
        }
    }
    // Reads on to IEND so every chunk's CRC is checked, not just the image data's.
    reader.finish().map_err(png_error)?;
    check_not_blank(&sampler)?;
    let shrunk = shrinker.map(Shrinker::into_shrunk).transpose()?;
    Ok((png, width, height, shrunk))
}

/// Refuses a PNG larger than its pixels can need ([`max_png_bytes`]).
fn check_png_size(bytes: usize, width: u32, height: u32, bits_per_pixel: u32) -> Result<()> {
    let max = max_png_bytes(width, height, bits_per_pixel);
    if bytes as u64 > max {
        return Err(invalid(format!(
            "PNG is {bytes} bytes, more than a {width}x{height} image at {bits_per_pixel} bits \
             a pixel can need ({max}): padded or bloated"
        )));
    }
    Ok(())
}

/// Decodes a JPEG or WEBP, validates it and encodes it as PNG.
fn convert_to_png(
    mut decoder: impl ImageDecoder,
    format: SourceFormat,
    requested: ImageSize,
    limits: &ImageLimits,
    thumbnail_side: Option<u32>,
) -> Result<Checked> {
    // Cameras and some encoders store the picture sideways plus an EXIF note to turn it;
    // a PNG has no such note, so the turn is applied and the aspect judged after it.
    let orientation = decoder.orientation().map_err(|e| decode_error(format, e))?;
    let (raw_width, raw_height) = decoder.dimensions();
    let (width, height) = if swaps_sides(orientation) {
        (raw_height, raw_width)
    } else {
        (raw_width, raw_height)
    };
    check_geometry(width, height, requested, limits)?;
    decoder
        .set_limits(limits.for_image_crate())
        .map_err(|e| decode_error(format, e))?;
    // A colour profile (Display P3 photos) must travel with the pixels or colours shift;
    // one beyond the bound the PNG chunk pass keeps would not survive a second look.
    let icc_profile = decoder
        .icc_profile()
        .map_err(|e| decode_error(format, e))?
        .filter(|profile| {
            let fits = profile.len() <= MAX_ICC_PROFILE_BYTES;
            if !fits {
                tracing::debug!(bytes = profile.len(), "colour profile too large; not kept");
            }
            fits
        });

    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    let image = match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => {
            image.apply_orientation(orientation);
            image
        }
        // JPEG and WEBP decode to 8 bits; anything else would be a new decoder feature.
        other => {
            let mut rgba = DynamicImage::ImageRgba8(other.into_rgba8());
            rgba.apply_orientation(orientation);
            rgba
        }
    };
    let channels = usize::from(image.color().channel_count());
    let mut sampler = LumaSampler::new(image.width(), image.height(), channels);
    let mut shrinker =
        thumbnail_side.map(|side| Shrinker::to_fit(image.width(), image.height(), side, channels));
    for row in image
        .as_bytes()
        .chunks_exact(image.width() as usize * channels)
    {
        sampler.offer_row(row);
        if let Some(shrinker) = &mut shrinker {
            shrinker.add_row(row);
        }
    }
    check_not_blank(&sampler)?;
    let shrunk = shrinker.map(Shrinker::into_shrunk).transpose()?;

    let bits_per_pixel = 8 * channels as u32;
    let max = max_png_bytes(image.width(), image.height(), bits_per_pixel);
    let png = encode_png(&image, icc_profile, max)?;
    Ok((png, image.width(), image.height(), shrunk))
}

/// Encodes for speed: the PNG is stored once and served from a CDN, so a few percent of
/// size matter less than the milliseconds of every conversion. The output may not pass
/// `max_bytes` ([`max_png_bytes`]): the encoder stops there rather than grow the buffer.
pub(crate) fn encode_png(
    image: &DynamicImage,
    icc_profile: Option<Vec<u8>>,
    max_bytes: u64,
) -> Result<Bytes> {
    let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    // A photo barely compresses at the fast level: room for the raw pixels and the filter
    // bytes up front means no doubling (a 5.5 MB frame grew the buffer to 11 MB), and the
    // spare room is handed back below, since the PNG is held until it is stored.
    let raw = image.as_bytes().len();
    let mut out = BoundedBuffer {
        bytes: Vec::with_capacity((raw + raw / 16 + 4096).min(max_bytes)),
        max: max_bytes,
        overflowed: false,
    };
    let mut encoder =
        PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive);
    if let Some(profile) = icc_profile.filter(|p| !p.is_empty()) {
        // The PNG encoder accepts any profile; were it to refuse one, the pixels are still
        // right in sRGB terms, which is no reason to throw the image away.
        if let Err(e) = encoder.set_icc_profile(profile) {
            tracing::debug!(error = %e, "colour profile not carried into the PNG");
        }
    }
    let written = encoder.write_image(
        image.as_bytes(),
        image.width(),
        image.height(),
        image.color().into(),
    );
    if out.overflowed {
        return Err(invalid(format!(
            "the converted PNG would pass {max_bytes} bytes, more than a {}x{} image can need",
            image.width(),
            image.height()
        )));
    }
    written.map_err(|e| invalid(format!("could not encode the image as PNG: {e}")))?;
    out.bytes.shrink_to_fit();
    Ok(Bytes::from(out.bytes))
}

/// A `Vec` writer that refuses to grow past `max` bytes.
struct BoundedBuffer {
    bytes: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl std::io::Write for BoundedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other("output bound reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn swaps_sides(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Refuses, from the header alone, an image too large to decode, too small to be an
/// illustration, or of the wrong shape for the request.
fn check_geometry(
    width: u32,
    height: u32,
    requested: ImageSize,
    limits: &ImageLimits,
) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(invalid(format!(
            "image claims {width}x{height} = {pixels} pixels, more than the {} allowed \
             (STAGE3_MAX_IMAGE_PIXELS)",
            limits.max_pixels
        )));
    }
    if width.min(height) < MIN_SIDE {
        return Err(invalid(format!(
            "image is only {width}x{height}; sides shorter than {MIN_SIDE} px are refused"
        )));
    }
    let (want_width, want_height) = requested.dimensions();
    let wanted = f64::from(want_width) / f64::from(want_height);
    let actual = f64::from(width) / f64::from(height);
    if (actual - wanted).abs() / wanted > MAX_ASPECT_DEVIATION {
        return Err(invalid(format!(
            "image is {width}x{height} (aspect {actual:.3}) but size {requested} asks for {} \
             (aspect {wanted:.3})",
            requested.aspect_ratio()
        )));
    }
    Ok(())
}

fn check_not_blank(sampler: &LumaSampler) -> Result<()> {
    let spread = sampler.standard_deviation();
    if spread < MIN_LUMA_STDDEV {
        return Err(invalid(format!(
            "image is blank: luminance varies by {spread:.2} (standard deviation over {} \
             sampled pixels, minimum {MIN_LUMA_STDDEV})",
            sampler.count
        )));
    }
    Ok(())
}

/// Luminance statistics over an even grid of pixels, fed one row at a time so it works
/// the same on a streamed PNG and on a decoded frame.
struct LumaSampler {
    channels: usize,
    /// Every `row_step`-th offered row is sampled…
    row_step: u32,
    /// …at every `column_step`-th pixel, starting half a step in.
    column_step: usize,
    first_column: usize,
    width: usize,
    rows_offered: u32,
    count: u64,
    sum: u64,
    sum_of_squares: u64,
}

impl LumaSampler {
    fn new(width: u32, rows: u32, channels: usize) -> Self {
        let row_step = (rows / SAMPLE_ROWS).max(1);
        let column_step = (width / SAMPLE_COLUMNS).max(1) as usize;
        LumaSampler {
            channels,
            row_step,
            column_step,
            first_column: column_step / 2,
            width: width as usize,
            // Start half a step in, so the grid does not hug the top edge.
            rows_offered: row_step - row_step / 2,
            count: 0,
            sum: 0,
            sum_of_squares: 0,
        }
    }

    fn offer_row(&mut self, row: &[u8]) {
        let take = self.rows_offered.is_multiple_of(self.row_step);
        self.rows_offered += 1;
        if !take {
            return;
        }
        for x in (self.first_column..self.width).step_by(self.column_step) {
            let Some(pixel) = row.get(x * self.channels..(x + 1) * self.channels) else {
                break;
            };
            let luma = u64::from(luminance(pixel));
            self.count += 1;
            self.sum += luma;
            self.sum_of_squares += luma * luma;
        }
    }

    fn standard_deviation(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let n = self.count as f64;
        let mean = self.sum as f64 / n;
        (self.sum_of_squares as f64 / n - mean * mean)
            .max(0.0)
            .sqrt()
    }
}

/// Rec. 601 luma of an 8-bit pixel, composited over black: a fully transparent image is
/// as blank as a black one, whatever colour its invisible pixels carry.
fn luminance(pixel: &[u8]) -> u32 {
    let weighted = |r: u8, g: u8, b: u8| {
        (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b) + 500) / 1000
    };
    let over_black = |luma: u32, alpha: u8| luma * u32::from(alpha) / 255;
    match *pixel {
        [l] => u32::from(l),
        [l, a] => over_black(u32::from(l), a),
        [r, g, b] => weighted(r, g, b),
        [r, g, b, a] => over_black(weighted(r, g, b), a),
        _ => 0,
    }
}

/// Walks the JPEG marker segments and returns the offset just past the end-of-image
/// marker. The JPEG decoder, like a browser, paints a cut-off image grey and carries on;
/// the walk is what refuses it. Inside entropy-coded data a 0xFF byte is always followed
/// by 0x00 or a restart marker, so the first other marker there is a real one.
fn jpeg_stream_end(bytes: &[u8]) -> Result<usize> {
    let truncated = || {
        invalid(format!(
            "JPEG is truncated: {} bytes and no end-of-image marker",
            bytes.len()
        ))
    };
    let mut offset = 2; // SOI, already sniffed
    loop {
        // Skip to the next marker; fill bytes (repeated 0xFF) are allowed before it.
        while bytes.get(offset).is_some_and(|&b| b != 0xFF) {
            offset += 1;
        }
        while bytes.get(offset) == Some(&0xFF) {
            offset += 1;
        }
        let Some(&marker) = bytes.get(offset) else {
            return Err(truncated());
        };
        offset += 1;
        match marker {
            0xD9 => return Ok(offset),
            // Stuffed zero, TEM and restart markers stand alone, without a length.
            0x00 | 0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(length) = bytes.get(offset..offset + 2) else {
                    return Err(truncated());
                };
                let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
                if length < 2 {
                    return Err(invalid(format!(
                        "JPEG is corrupt: segment 0xFF{marker:02X} at byte {offset} has \
                         length {length}"
                    )));
                }
                offset += length;
                if offset > bytes.len() {
                    return Err(truncated());
                }
            }
        }
    }
}

/// A RIFF file states its own length; fewer bytes than that is a cut-off download.
fn check_riff_length(bytes: &[u8]) -> Result<()> {
    let stated = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize + 8;
    if stated > bytes.len() {
        return Err(invalid(format!(
            "WEBP is truncated: the file says {stated} bytes, only {} arrived",
            bytes.len()
        )));
    }
    Ok(())
}

fn png_error(error: png::DecodingError) -> Stage3Error {
    match error {
        png::DecodingError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            invalid("PNG is truncated: its image data ends early")
        }
        png::DecodingError::LimitsExceeded => {
            invalid("PNG needs more memory to decode than the image limits allow")
        }
        other => invalid(format!("PNG does not decode: {other}")),
    }
}

fn decode_error(format: SourceFormat, error: image::ImageError) -> Stage3Error {
    match error {
        image::ImageError::Limits(e) => invalid(format!(
            "{} is larger than the image limits allow: {e}",
            format.label()
        )),
        other => invalid(format!("{} does not decode: {other}", format.label())),
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> Stage3Error {
    Stage3Error::InvalidImage(message.into())
}

#[cfg(test)]
mod tests {
    use super::test_png::*;
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ImageFormat, RgbImage, RgbaImage};

    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
    };

    fn encode(image: &DynamicImage, format: ImageFormat) -> Bytes {
        let mut out = Vec::new();
        match format {
            ImageFormat::Png => PngEncoder::new(&mut out)
                .write_image(
                    image.as_bytes(),
                    image.width(),
                    image.height(),
                    image.color().into(),
                )
                .unwrap(),
            ImageFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, 85)
                .encode_image(image)
                .unwrap(),
            ImageFormat::WebP => WebPEncoder::new_lossless(&mut out)
                .encode(
                    image.as_bytes(),
                    image.width(),
                    image.height(),
                    image.color().into(),
                )
                .unwrap(),
            other => panic!("no test encoder for {other:?}"),
        }
        Bytes::from(out)
    }

    fn noisy(format: ImageFormat, width: u32, height: u32) -> Bytes {
        encode(
            &DynamicImage::ImageRgb8(noisy_rgb(width, height, 7)),
            format,
        )
    }

    fn error_message(result: Result<NormalizedImage>) -> String {
        match result {
            Err(Stage3Error::InvalidImage(message)) => message,
            Err(other) => panic!("expected invalid_image, got {other:?}"),
            Ok(image) => panic!(
                "expected a rejection, got a {}x{} image",
                image.width, image.height
            ),
        }
    }

    #[test]
    fn sniffs_each_format_from_its_magic_bytes() {
        assert_eq!(
            sniff_format(&noisy(ImageFormat::Png, 64, 64)),
            Some(SourceFormat::Png)
        );
        assert_eq!(
            sniff_format(&noisy(ImageFormat::Jpeg, 64, 64)),
            Some(SourceFormat::Jpeg)
        );
        assert_eq!(
            sniff_format(&noisy(ImageFormat::WebP, 64, 64)),
            Some(SourceFormat::Webp)
        );
        assert_eq!(sniff_format(b""), None);
        assert_eq!(sniff_format(b"\x89PNG\r\n"), None);
        assert_eq!(sniff_format(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(sniff_format(b"<!DOCTYPE html><html>"), None);
        assert_eq!(sniff_format(b"GIF89a\x01\0\x01\0"), None);
    }

    #[test]
    fn garbage_is_refused_with_its_first_bytes() {
        let message = error_message(normalize_image(
            Bytes::from_static(b"{\"error\":\"oops\"}"),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("not a PNG, JPEG or WEBP"), "{message}");
        assert!(message.contains("7b226572"), "{message}");
    }

    #[test]
    fn a_clean_png_is_kept_byte_for_byte_without_copying() {
        let input = noisy(ImageFormat::Png, 1024, 1024);
        let normalized = normalize_image(input.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, input);
        assert_eq!(
            normalized.png.as_ptr(),
            input.as_ptr(),
            "the bytes were copied"
        );
        assert_eq!((normalized.width, normalized.height), (1024, 1024));
        assert_eq!(normalized.source_format, SourceFormat::Png);
        assert_eq!(
            normalized.content_sha256,
            hex::encode(Sha256::digest(&input))
        );
        assert_eq!(normalized.content_sha256.len(), 64);
        assert!(normalized
            .content_sha256
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    }

    #[test]
    fn sixteen_bit_and_grey_pngs_are_validated_and_kept() {
        let rgb = noisy_rgb(320, 320, 3);
        let deep = DynamicImage::ImageRgb8(rgb.clone()).to_rgba16();
        let deep = encode(&DynamicImage::ImageRgba16(deep), ImageFormat::Png);
        let normalized = normalize_image(deep.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, deep);

        let grey = DynamicImage::ImageRgb8(rgb).to_luma8();
        let grey = encode(&DynamicImage::ImageLuma8(grey), ImageFormat::Png);
        let normalized = normalize_image(grey.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, grey);
    }

    #[test]
    fn an_interlaced_png_is_sampled_from_its_full_rows() {
        let png = adam7_png(&noisy_rgb(200, 200, 5));
        let normalized = normalize_image(png.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, png);

        let flat = RgbImage::from_pixel(200, 200, image::Rgb([90, 90, 90]));
        let message = error_message(normalize_image(
            adam7_png(&flat),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("blank"), "{message}");
    }

    fn assert_converted(format: ImageFormat, source: SourceFormat, size: ImageSize) {
        let (width, height) = size.dimensions();
        let input = noisy(format, width, height);
        let normalized = normalize_image(input, size, &LIMITS).unwrap();
        assert_eq!(normalized.source_format, source);
        assert_eq!((normalized.width, normalized.height), (width, height));
        assert_eq!(sniff_format(&normalized.png), Some(SourceFormat::Png));
        let decoded = image::load_from_memory_with_format(&normalized.png, ImageFormat::Png)
            .expect("the converted PNG decodes");
        assert_eq!((decoded.width(), decoded.height()), (width, height));
        assert_eq!(
            normalized.content_sha256,
            hex::encode(Sha256::digest(&normalized.png))
        );
        // The converted PNG is itself a clean PNG: normalising it again keeps it as is.
        let again = normalize_image(normalized.png.clone(), size, &LIMITS).unwrap();
        assert_eq!(again.png, normalized.png);
    }

    #[test]
    fn a_jpeg_is_converted_to_png() {
        assert_converted(ImageFormat::Jpeg, SourceFormat::Jpeg, ImageSize::Square);
        assert_converted(ImageFormat::Jpeg, SourceFormat::Jpeg, ImageSize::Landscape);
    }

    #[test]
    fn a_webp_is_converted_to_png() {
        assert_converted(ImageFormat::WebP, SourceFormat::Webp, ImageSize::Square);
        assert_converted(ImageFormat::WebP, SourceFormat::Webp, ImageSize::Portrait);
    }

    /// A JPEG written by `jpeg-encoder`, which (unlike `image`) can write progressive
    /// scans, EXIF and ICC segments as cameras and phones do.
    fn camera_jpeg(
        pixels: &RgbImage,
        progressive: bool,
        exif_orientation: Option<u16>,
        icc_profile: Option<&[u8]>,
    ) -> Bytes {
        let mut out = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut out, 90);
        encoder.set_progressive(progressive);
        if let Some(orientation) = exif_orientation {
            // A big-endian TIFF header and one IFD with one entry: Orientation (0x0112),
            // type SHORT, count 1, the value left-aligned in the 4-byte field.
            let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
            tiff.extend_from_slice(&orientation.to_be_bytes());
            tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            encoder.add_exif_metadata(&tiff).unwrap();
        }
        if let Some(profile) = icc_profile {
            encoder.add_icc_profile(profile).unwrap();
        }
        let (width, height) = (pixels.width() as u16, pixels.height() as u16);
        encoder
            .encode(pixels.as_raw(), width, height, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        Bytes::from(out)
    }

    #[test]
    fn a_sideways_camera_jpeg_is_turned_upright_before_its_shape_is_judged() {
        // Stored landscape, left half red and right half blue, with EXIF orientation 6
        // ("turn 90° clockwise to view"): upright it is a portrait, red on top.
        let mut rng = fastrand::Rng::with_seed(5);
        let stored = RgbImage::from_fn(512, 288, |x, _| {
            let noise = rng.u8(0..30);
            if x < 256 {
                image::Rgb([220 + noise / 2, noise, noise])
            } else {
                image::Rgb([noise, noise, 220 + noise / 2])
            }
        });
        let jpeg = camera_jpeg(&stored, false, Some(6), None);

        let normalized = normalize_image(jpeg.clone(), ImageSize::Portrait, &LIMITS).unwrap();
        assert_eq!((normalized.width, normalized.height), (288, 512));
        let upright = image::load_from_memory(&normalized.png).unwrap().to_rgb8();
        assert_eq!(upright.dimensions(), (288, 512));
        let top = upright.get_pixel(144, 64);
        let bottom = upright.get_pixel(144, 448);
        assert!(top[0] > 180 && top[2] < 60, "top should be red, is {top:?}");
        assert!(
            bottom[2] > 180 && bottom[0] < 60,
            "bottom should be blue, is {bottom:?}"
        );

        // Judged as stored, the same picture has the wrong shape for a landscape request.
        let message = error_message(normalize_image(jpeg, ImageSize::Landscape, &LIMITS));
        assert!(message.contains("288x512"), "{message}");
    }

    #[test]
    fn a_progressive_jpeg_keeps_its_pixels_and_colour_profile() {
        // Smooth gradients with light grain: what a photo looks like to a JPEG encoder
        // (full-range noise would be smeared by chroma subsampling whatever the decoder).
        let mut rng = fastrand::Rng::with_seed(13);
        let source = RgbImage::from_fn(384, 384, |x, y| {
            let grain = rng.u8(0..12);
            image::Rgb([(x / 2) as u8 + grain, (y / 2) as u8 + grain, 90 + grain])
        });
        // Not a real profile: the bytes only have to arrive unchanged.
        let profile: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
        let jpeg = camera_jpeg(&source, true, None, Some(&profile));
        assert!(
            jpeg.windows(2).any(|marker| marker == [0xff, 0xc2]),
            "the test image must really be progressive (SOF2)"
        );

        let normalized = normalize_image(jpeg, ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.source_format, SourceFormat::Jpeg);
        let mut reader = png::Decoder::new(std::io::Cursor::new(normalized.png.to_vec()))
            .read_info()
            .unwrap();
        assert_eq!(
            reader.info().icc_profile.as_deref(),
            Some(profile.as_slice()),
            "the ICC profile travels into the PNG"
        );
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((frame.width, frame.height), (384, 384));
        // Lossy in, so close rather than equal: a quality-90 JPEG of this stays within a
        // few levels on average; a mis-decoded scan would be tens of levels off.
        let channels = frame.color_type.samples();
        let total_error: u64 = pixels
            .chunks_exact(channels)
            .zip(source.pixels())
            .map(|(got, want)| {
                (0..3)
                    .map(|c| u64::from(got[c].abs_diff(want[c])))
                    .sum::<u64>()
            })
            .sum();
        let mean_error = total_error as f64 / (384.0 * 384.0 * 3.0);
        assert!(mean_error < 10.0, "mean error {mean_error:.1} levels");
    }

    #[test]
    fn converted_pixels_survive_the_trip() {
        let source = noisy_rgb(256, 256, 11);
        let webp = encode(&DynamicImage::ImageRgb8(source.clone()), ImageFormat::WebP);
        let normalized = normalize_image(webp, ImageSize::Square, &LIMITS).unwrap();
        let decoded = image::load_from_memory(&normalized.png).unwrap().to_rgb8();
        // Lossless WEBP in, PNG out: every pixel must be the same.
        assert_eq!(decoded, source);
    }

    #[test]
    fn a_jpeg_labelled_as_png_is_handled_as_jpeg() {
        let provider_answer = crate::provider::ProviderImage {
            bytes: noisy(ImageFormat::Jpeg, 512, 512),
            claimed_media_type: Some("image/png".into()),
            cost: None,
        };
        let normalized =
            normalize_image(provider_answer.bytes.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.source_format, SourceFormat::Jpeg);
        assert_ne!(normalized.png, provider_answer.bytes);
        assert_eq!(sniff_format(&normalized.png), Some(SourceFormat::Png));
    }

    #[test]
    fn a_truncated_png_is_refused() {
        let png = noisy(ImageFormat::Png, 256, 256);
        for keep in [33, 100, png.len() / 2, png.len() - 12, png.len() - 1] {
            let message = error_message(normalize_image(
                png.slice(..keep),
                ImageSize::Square,
                &LIMITS,
            ));
            assert!(message.contains("truncated"), "{keep}: {message}");
        }
    }

    #[test]
    fn a_png_whose_image_data_stops_early_is_refused() {
        // The chunk list is intact, so only decoding every row can tell the data is short.
        let png = noisy(ImageFormat::Png, 256, 256);
        let mut parts = parts(&png);
        let mut raw = Vec::new();
        for (kind, data) in &parts {
            if kind == b"IDAT" {
                raw.extend_from_slice(data);
            }
        }
        let inflated = {
            // Re-wrap the first 60% of the rows in a valid stream of stored blocks.
            let decoded = noisy_rgb(256, 256, 7);
            let mut rows = Vec::new();
            for row in decoded.rows().take(150) {
                rows.push(0);
                for pixel in row {
                    rows.extend_from_slice(&pixel.0);
                }
            }
            zlib_stored(&rows)
        };
        assert!(!raw.is_empty());
        parts.retain(|(kind, _)| kind != b"IDAT");
        parts.insert(parts.len() - 1, (*b"IDAT", inflated));
        let message = error_message(normalize_image(
            assemble(&parts),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("PNG"), "{message}");
    }

    #[test]
    fn a_png_with_a_bad_crc_is_refused() {
        let png = noisy(ImageFormat::Png, 256, 256);
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        let mut corrupt = png.to_vec();
        corrupt[idat + 10] ^= 0x01;
        let message = error_message(normalize_image(
            Bytes::from(corrupt),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("PNG does not decode"), "{message}");

        // A damaged chunk we keep is found wherever it is: before the image data, or
        // after it (the reader goes on to IEND).
        let mut with_gamma = parts(&png);
        with_gamma.insert(1, (*b"gAMA", 45_455u32.to_be_bytes().to_vec()));
        let mut with_gamma = assemble(&with_gamma).to_vec();
        with_gamma[33 + 8 + 4] ^= 0xFF; // the gAMA chunk's CRC, after the 33 bytes to IHDR's end
        let mut bad_iend = png.to_vec();
        let crc_at = bad_iend.len() - 4;
        bad_iend[crc_at] ^= 0xFF;
        for damaged in [with_gamma, bad_iend] {
            let message = error_message(normalize_image(
                Bytes::from(damaged),
                ImageSize::Square,
                &LIMITS,
            ));
            assert!(message.to_lowercase().contains("crc"), "{message}");
        }

        // A damaged chunk we drop anyway costs no new image: it is not stored.
        let mut with_text = parts(&png);
        with_text.insert(with_text.len() - 1, (*b"tEXt", b"Comment\0hello".to_vec()));
        let mut with_text = assemble(&with_text).to_vec();
        let crc_at = with_text.len() - 12 - 4;
        with_text[crc_at] ^= 0xFF;
        let normalized =
            normalize_image(Bytes::from(with_text), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, png);
    }

    #[test]
    fn bytes_after_iend_are_dropped() {
        let png = noisy(ImageFormat::Png, 256, 256);
        let mut padded = png.to_vec();
        padded.extend_from_slice(b"<script>trailing payload</script>");
        let normalized = normalize_image(Bytes::from(padded), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, png);
        assert_eq!(normalized.content_sha256, hex::encode(Sha256::digest(&png)));
    }

    #[test]
    fn a_truncated_jpeg_is_refused() {
        let jpeg = noisy(ImageFormat::Jpeg, 512, 512);
        for keep in [4, 40, jpeg.len() / 2, jpeg.len() - 2] {
            let message = error_message(normalize_image(
                jpeg.slice(..keep),
                ImageSize::Square,
                &LIMITS,
            ));
            assert!(message.contains("truncated"), "{keep}: {message}");
        }
    }

    #[test]
    fn a_truncated_webp_is_refused() {
        let webp = noisy(ImageFormat::WebP, 256, 256);
        let message = error_message(normalize_image(
            webp.slice(..webp.len() / 2),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("truncated"), "{message}");
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        // 100000 × 100000 RGBA would need 40 GB; the header alone must be enough to refuse.
        let bomb = assemble(&[
            (*b"IHDR", ihdr(100_000, 100_000, 6, 0)),
            (*b"IDAT", zlib_stored(&[0; 64])),
            (*b"IEND", Vec::new()),
        ]);
        let message = error_message(normalize_image(bomb, ImageSize::Square, &LIMITS));
        assert!(message.contains("100000x100000"), "{message}");
        assert!(
            message.contains("more than the 16777216 allowed"),
            "{message}"
        );
    }

    #[test]
    fn a_jpeg_bomb_is_refused_from_its_header() {
        let mut jpeg = noisy(ImageFormat::Jpeg, 256, 256).to_vec();
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        // SOF0: marker, length (2), precision (1), height (2), width (2)
        jpeg[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
        let message = error_message(normalize_image(
            Bytes::from(jpeg),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("60000x60000"), "{message}");
    }

    #[test]
    fn a_40_megapixel_jpeg_is_refused_from_its_header() {
        // Under the old 40 MP default this decoded: a 120 MB frame and a 120 MB PNG.
        let mut jpeg = noisy(ImageFormat::Jpeg, 256, 256).to_vec();
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 7].copy_from_slice(&5_000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&8_000u16.to_be_bytes());
        let message = error_message(normalize_image(
            Bytes::from(jpeg),
            ImageSize::Landscape,
            &LIMITS,
        ));
        assert!(message.contains("8000x5000"), "{message}");
        assert!(
            message.contains("more than the 16777216 allowed"),
            "{message}"
        );
    }

    /// Pillow opens the stored PNG as one still frame; prints its size and frame count.
    const PILLOW_FRAMES: &str = r#"
import sys
from PIL import Image
with Image.open(sys.argv[1]) as im:
    im.load()
    print(im.size[0], im.size[1], getattr(im, "n_frames", 1), sorted(im.info))
"#;

    #[test]
    fn an_icc_bomb_png_is_stored_without_the_bomb() {
        // A 64 KB profile chunk inflating to 64 MiB: the old code inflated it (up to its
        // 320 MB allocation limit) and stored it; Pillow refuses such a file.
        let png = noisy(ImageFormat::Png, 256, 256);
        let mut bombed = parts(&png);
        bombed.insert(1, (*b"iCCP", iccp_bomb(64 * 1024 * 1024)));
        let bombed = assemble(&bombed);
        assert!(bombed.len() < png.len() + 128 * 1024);
        let normalized = normalize_image(bombed, ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, png, "stored without the iCCP chunk");

        // A real-sized profile is kept, so colours stay right.
        let profile: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut with_profile = parts(&png);
        with_profile.insert(1, (*b"iCCP", iccp(b"Display P3", &profile)));
        let with_profile = assemble(&with_profile);
        let normalized = normalize_image(with_profile.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, with_profile);
        let reader = png::Decoder::new(Cursor::new(normalized.png.to_vec()))
            .read_info()
            .unwrap();
        assert_eq!(reader.info().icc_profile.as_deref(), Some(&profile[..]));
    }

    #[test]
    fn an_apng_is_stored_as_its_still_image() {
        // The second frame is black: the old code stored it unchecked.
        let (apng, still) = apng_with_second_frame();
        let normalized = normalize_image(apng, ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, still);
        let reader = png::Decoder::new(Cursor::new(normalized.png.to_vec()))
            .read_info()
            .unwrap();
        assert!(reader.info().animation_control.is_none());
        if let Some(printed) = with_pillow(&normalized.png, PILLOW_FRAMES) {
            assert_eq!(printed, "256 256 1 []");
        }
    }

    #[test]
    fn junk_chunks_are_not_stored() {
        let png = noisy(ImageFormat::Png, 256, 256);
        let mut junk = parts(&png);
        // A text chunk Pillow would refuse to read (over its 1 MB text limit), EXIF, a
        // private chunk, an unknown one after the image data, and a provider's AIGC label.
        junk.insert(
            1,
            (
                *b"tEXt",
                [b"Comment\0".as_slice(), &[b'x'; 2_000_000]].concat(),
            ),
        );
        junk.insert(1, (*b"eXIf", b"MM\0\x2a\0\0\0\x08\0\0".to_vec()));
        junk.insert(1, (*b"prVt", vec![0xAB; 1000]));
        junk.insert(
            1,
            (
                *b"iTXt",
                b"AIGC\0\0\0\0\0{\"Label\":\"0\",\"ContentProducer\":\"not us\"}".to_vec(),
            ),
        );
        let end = junk.len() - 1;
        junk.insert(end, (*b"zzZz", vec![1, 2, 3]));
        let normalized = normalize_image(assemble(&junk), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(normalized.png, png);
        assert_eq!(aigc::count_aigc_labels(&normalized.png), 0);
        assert_eq!(read_aigc_label(&normalized.png), None);
    }

    #[test]
    fn our_aigc_label_goes_on_after_the_allowlist_and_replaces_a_fake() {
        let png = noisy(ImageFormat::Png, 256, 256);
        let mut faked = parts(&png);
        faked.insert(1, (*b"iTXt", b"AIGC\0\0\0\0\0{\"Label\":\"0\"}".to_vec()));
        let normalized = normalize_image(assemble(&faked), ImageSize::Square, &LIMITS).unwrap();
        let label = AigcLabel::new("stage3", normalized.content_sha256.clone(), "us", "s-1");
        let labelled = normalized.clone().with_aigc_label(&label).unwrap();
        assert_eq!(read_aigc_label(&labelled.png), Some(label.clone()));
        assert_eq!(aigc::count_aigc_labels(&labelled.png), 1);
        assert_eq!(
            labelled.content_sha256,
            hex::encode(Sha256::digest(&labelled.png))
        );
        assert_ne!(labelled.content_sha256, normalized.content_sha256);
        assert_eq!(strip_aigc_label(&labelled.png).unwrap(), png);
        // The labelled PNG is itself valid; checked again, the label is dropped like any
        // text a provider might send, and labelling puts it back.
        let again = normalize_image(labelled.png.clone(), ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(again.png, png);
        let relabelled = again.with_aigc_label(&label).unwrap();
        assert_eq!(relabelled.png, labelled.png);
        // And a converted JPEG takes the label the same way.
        let converted = normalize_image(
            noisy(ImageFormat::Jpeg, 512, 512),
            ImageSize::Square,
            &LIMITS,
        )
        .unwrap()
        .with_aigc_label(&label)
        .unwrap();
        assert_eq!(read_aigc_label(&converted.png), Some(label));
        image::load_from_memory(&converted.png).unwrap();
    }

    #[test]
    fn a_padded_png_is_refused() {
        // 2 MiB of empty deflate blocks ahead of a 128x128 image's data: valid, decodes to
        // the right pixels, and far bigger than those pixels can need.
        let image = noisy_rgb(128, 128, 3);
        let mut raw = Vec::new();
        for row in image.rows() {
            raw.push(0);
            for pixel in row {
                raw.extend_from_slice(&pixel.0);
            }
        }
        let data = zlib_stored(&raw);
        let mut padded = data[..2].to_vec();
        for _ in 0..(2 * 1024 * 1024 / 5) {
            padded.extend_from_slice(&[0, 0, 0, 0xFF, 0xFF]);
        }
        padded.extend_from_slice(&data[2..]);
        let build = |idat: Vec<u8>| {
            assemble(&[
                (*b"IHDR", ihdr(128, 128, 2, 0)),
                (*b"IDAT", idat),
                (*b"IEND", Vec::new()),
            ])
        };
        // Unpadded, the same file is accepted.
        normalize_image(build(data), ImageSize::Square, &LIMITS).unwrap();
        let message = error_message(normalize_image(build(padded), ImageSize::Square, &LIMITS));
        assert!(message.contains("padded or bloated"), "{message}");
        assert!(message.contains("128x128"), "{message}");
    }

    #[test]
    fn the_converted_png_stops_at_its_bound() {
        let image = DynamicImage::ImageRgb8(noisy_rgb(256, 256, 4));
        let Err(Stage3Error::InvalidImage(message)) = encode_png(&image, None, 10_000) else {
            panic!("a 256x256 noisy PNG fits in 10000 bytes?");
        };
        assert!(message.contains("would pass 10000 bytes"), "{message}");
        // The bound a real conversion gets leaves room for incompressible pixels.
        let bound = max_png_bytes(256, 256, 24);
        let png = encode_png(&image, None, bound).unwrap();
        assert!((png.len() as u64) < bound);
        assert!(
            png.len() as u64 > 256 * 256 * 3 / 2,
            "noise does not compress"
        );
    }

    #[test]
    fn stored_pngs_open_in_pillow() {
        let png = noisy(ImageFormat::Png, 256, 256);
        let mut hostile = parts(&png);
        hostile.insert(1, (*b"iCCP", iccp_bomb(64 * 1024 * 1024)));
        hostile.insert(
            1,
            (
                *b"tEXt",
                [b"Comment\0".as_slice(), &[b'x'; 2_000_000]].concat(),
            ),
        );
        let hostile = assemble(&hostile);
        // Pillow refuses the provider's file as it came…
        let script = "import sys\nfrom PIL import Image\ntry:\n    Image.open(sys.argv[1]).load()\n    print('opened')\nexcept Exception as e:\n    print('refused')";
        let Some(printed) = with_pillow(&hostile, script) else {
            return;
        };
        assert_eq!(printed, "refused");
        // …and opens what we store.
        let normalized = normalize_image(hostile, ImageSize::Square, &LIMITS).unwrap();
        assert_eq!(
            with_pillow(&normalized.png, PILLOW_FRAMES).unwrap(),
            "256 256 1 []"
        );
    }

    #[test]
    fn the_pixel_limit_is_configurable() {
        let small = ImageLimits { max_pixels: 10_000 };
        let message = error_message(normalize_image(
            noisy(ImageFormat::Png, 128, 128),
            ImageSize::Square,
            &small,
        ));
        assert!(message.contains("more than the 10000 allowed"), "{message}");
    }

    #[test]
    fn the_wrong_shape_is_refused() {
        let square = noisy(ImageFormat::Png, 512, 512);
        for size in [ImageSize::Landscape, ImageSize::Portrait] {
            let message = error_message(normalize_image(square.clone(), size, &LIMITS));
            assert!(message.contains("aspect"), "{message}");
            assert!(message.contains(size.aspect_ratio()), "{message}");
        }
        let landscape = noisy(ImageFormat::Jpeg, 1792, 1024);
        let message = error_message(normalize_image(landscape, ImageSize::Square, &LIMITS));
        assert!(message.contains("1792x1024"), "{message}");
    }

    #[test]
    fn a_close_enough_shape_is_accepted() {
        // What 16:9 models actually return for the seed's 1792x1024.
        let wide = noisy(ImageFormat::Png, 1344, 768);
        let normalized = normalize_image(wide, ImageSize::Landscape, &LIMITS).unwrap();
        assert_eq!((normalized.width, normalized.height), (1344, 768));
        let tall = noisy(ImageFormat::Png, 576, 1024);
        normalize_image(tall, ImageSize::Portrait, &LIMITS).unwrap();
    }

    #[test]
    fn a_tiny_image_is_refused() {
        let message = error_message(normalize_image(
            noisy(ImageFormat::Png, 32, 32),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("32x32"), "{message}");
    }

    #[test]
    fn a_blank_image_is_refused() {
        let flat =
            DynamicImage::ImageRgb8(RgbImage::from_pixel(1024, 1024, image::Rgb([200, 180, 40])));
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let message = error_message(normalize_image(
                encode(&flat, format),
                ImageSize::Square,
                &LIMITS,
            ));
            assert!(message.contains("blank"), "{format:?}: {message}");
        }
    }

    #[test]
    fn a_transparent_image_is_blank_whatever_its_hidden_colours() {
        let noise = noisy_rgb(512, 512, 9);
        let invisible = RgbaImage::from_fn(512, 512, |x, y| {
            let [r, g, b] = noise.get_pixel(x, y).0;
            image::Rgba([r, g, b, 0])
        });
        let message = error_message(normalize_image(
            encode(&DynamicImage::ImageRgba8(invisible), ImageFormat::Png),
            ImageSize::Square,
            &LIMITS,
        ));
        assert!(message.contains("blank"), "{message}");
    }

    #[test]
    fn a_faint_but_real_picture_is_not_blank() {
        // A soft gradient from 100 to 140 has a spread of about 11: a picture, not a blank.
        let gradient = RgbImage::from_fn(1024, 1024, |x, _| {
            let v = 100 + (x * 40 / 1024) as u8;
            image::Rgb([v, v, v])
        });
        let png = encode(&DynamicImage::ImageRgb8(gradient), ImageFormat::Png);
        normalize_image(png, ImageSize::Square, &LIMITS).unwrap();
    }

    #[test]
    fn luminance_weights_and_alpha() {
        assert_eq!(luminance(&[255, 255, 255]), 255);
        assert_eq!(luminance(&[0, 0, 0]), 0);
        assert_eq!(luminance(&[255, 0, 0]), 76);
        assert_eq!(luminance(&[0, 255, 0]), 150);
        assert_eq!(luminance(&[200, 200, 200, 0]), 0);
        assert_eq!(luminance(&[200, 255]), 200);
    }

    /// A 1024x1024 picture that compresses like a photograph: smooth shapes, fine grain.
    fn photo_like(seed: u64) -> RgbImage {
        let mut rng = fastrand::Rng::with_seed(seed);
        RgbImage::from_fn(1024, 1024, |x, y| {
            let (fx, fy) = (x as f32 / 1024.0, y as f32 / 1024.0);
            let wave = ((fx * 9.0).sin() + (fy * 7.0).cos()) * 40.0;
            let mut channel = |base: f32| {
                let grain = rng.i32(-64..=64) as f32;
                (base + wave + grain).clamp(0.0, 255.0) as u8
            };
            image::Rgb([
                channel(60.0 + fx * 150.0),
                channel(120.0 + fy * 60.0),
                channel(200.0 - fx * 100.0),
            ])
        })
    }

    fn median_ms(mut samples: Vec<f64>) -> f64 {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    }

    /// Prints the per-image cost of normalisation. Run it optimised:
    /// `cargo test --release --lib normalize::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "prints timings; run with --release --ignored --nocapture"]
    fn timing() {
        let photo = DynamicImage::ImageRgb8(photo_like(1));
        let mut png = Vec::new();
        PngEncoder::new_with_quality(&mut png, CompressionType::Default, FilterType::Adaptive)
            .write_image(photo.as_bytes(), 1024, 1024, photo.color().into())
            .unwrap();
        let png = Bytes::from(png);
        let jpeg = encode(&photo, ImageFormat::Jpeg);
        let webp = encode(&photo, ImageFormat::WebP);

        let runs = 40;
        let time = |bytes: &Bytes| {
            let samples: Vec<f64> = (0..runs)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let normalized =
                        normalize_image(bytes.clone(), ImageSize::Square, &LIMITS).unwrap();
                    std::hint::black_box(normalized);
                    start.elapsed().as_secs_f64() * 1000.0
                })
                .collect();
            median_ms(samples)
        };
        let hash: Vec<f64> = (0..runs)
            .map(|_| {
                let start = std::time::Instant::now();
                std::hint::black_box(hex::encode(Sha256::digest(&png)));
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        println!(
            "PNG pass-through ({} bytes): p50 {:.2} ms (of which SHA-256 {:.2} ms)",
            png.len(),
            time(&png),
            median_ms(hash)
        );
        println!(
            "JPEG -> PNG ({} bytes): p50 {:.2} ms",
            jpeg.len(),
            time(&jpeg)
        );
        println!(
            "WEBP -> PNG ({} bytes): p50 {:.2} ms",
            webp.len(),
            time(&webp)
        );

        // The encoder settings `encode_png` could use, on the decoded JPEG.
        let decoded = image::load_from_memory(&jpeg).unwrap();
        for (compression, filter) in [
            (CompressionType::Fast, FilterType::Adaptive),
            (CompressionType::Fast, FilterType::Sub),
            (CompressionType::Fast, FilterType::Up),
            (CompressionType::Fast, FilterType::NoFilter),
            (CompressionType::Level(1), FilterType::Adaptive),
            (CompressionType::Default, FilterType::Adaptive),
        ] {
            let mut size = 0;
            let samples: Vec<f64> = (0..10)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let mut out = Vec::new();
                    PngEncoder::new_with_quality(&mut out, compression, filter)
                        .write_image(decoded.as_bytes(), 1024, 1024, decoded.color().into())
                        .unwrap();
                    size = out.len();
                    start.elapsed().as_secs_f64() * 1000.0
                })
                .collect();
            println!(
                "  encode {compression:?}/{filter:?}: p50 {:.2} ms, {size} bytes",
                median_ms(samples)
            );
        }
    }
}
