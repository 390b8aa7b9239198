//! Image normalisation: sniff the real format, decode safely, validate, hand back a PNG.
//!
//! Providers send PNG, JPEG or WEBP, and their labels lie (DESIGN.md §3), so the format is
//! read from the magic bytes. A PNG that decodes cleanly is kept byte-for-byte; anything
//! else is converted. Validation rejects what a reader would call a broken picture.

use bytes::Bytes;

use crate::error::Result;
use crate::schema::ImageSize;

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
}

/// Bounds on what we agree to decode, so a hostile image cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest width × height accepted.
    pub max_pixels: u64,
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

/// The real format of `bytes`, from its magic numbers.
pub fn sniff_format(_bytes: &[u8]) -> Option<SourceFormat> {
    todo!("normalize: sniff_format")
}

/// Decodes, validates against the requested size, and returns the PNG to store.
pub fn normalize_image(
    _bytes: Bytes,
    _requested: ImageSize,
    _limits: &ImageLimits,
) -> Result<NormalizedImage> {
    todo!("normalize: normalize_image")
}
