//! Hostile provider answers, shared by `tests/image_memory.rs` and `benches/pipeline.rs`:
//! a PNG whose colour-profile chunk is a zlib bomb, and a very large JPEG. Both are valid
//! files a provider could send; what they cost us is what the tests measure.

use miniz_oxide::deflate::core::CompressorOxide;
use miniz_oxide::deflate::stream::deflate;
use miniz_oxide::{DataFormat, MZFlush, MZStatus};

/// A zlib stream of `n` zero bytes, made without ever holding them: at the best level
/// deflate packs about 1,000 zeros a byte, so 1 GiB becomes about 1 MB.
pub fn zlib_of_zeros(n: usize) -> Vec<u8> {
    let mut compressor = Box::<CompressorOxide>::default();
    compressor.set_format_and_level(DataFormat::Zlib, 9);
    let zeros = vec![0u8; 1 << 20];
    let mut buffer = vec![0u8; 1 << 16];
    let mut out = Vec::new();
    let mut remaining = n;
    loop {
        let take = remaining.min(zeros.len());
        remaining -= take;
        let flush = if remaining == 0 {
            MZFlush::Finish
        } else {
            MZFlush::None
        };
        let mut input = &zeros[..take];
        loop {
            let result = deflate(&mut compressor, input, &mut buffer, flush);
            out.extend_from_slice(&buffer[..result.bytes_written]);
            input = &input[result.bytes_consumed..];
            match result.status {
                Ok(MZStatus::StreamEnd) => return out,
                Ok(_) => {}
                Err(e) => panic!("deflate failed: {e:?}"),
            }
            if flush == MZFlush::None && input.is_empty() && result.bytes_written < buffer.len() {
                break;
            }
        }
    }
}

/// `png` with a chunk of `kind` holding `data` inserted right after `IHDR`.
pub fn with_chunk_after_ihdr(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let ihdr_end = 8 + 25;
    let mut out = png[..ihdr_end].to_vec();
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out.extend_from_slice(&png[ihdr_end..]);
    out
}

/// `png` with an `iCCP` chunk whose profile inflates to `inflated` bytes.
pub fn png_with_icc_bomb(png: &[u8], inflated: usize) -> Vec<u8> {
    let mut data = b"ICC Profile\0\0".to_vec();
    data.extend(zlib_of_zeros(inflated));
    with_chunk_after_ihdr(png, b"iCCP", &data)
}

/// A real baseline JPEG of `width` × `height`, smooth shapes under light grain (so it is a
/// few MB, like a photo, rather than incompressible noise).
pub fn large_photo_jpeg(width: u16, height: u16) -> Vec<u8> {
    let (w, h) = (usize::from(width), usize::from(height));
    let mut pixels = Vec::with_capacity(w * h * 3);
    let mut state = 0x9e37_79b9_u32;
    for y in 0..h {
        for x in 0..w {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let grain = (state & 7) as u8;
            pixels.extend_from_slice(&[
                ((x * 255 / w) as u8).wrapping_add(grain),
                ((y * 255 / h) as u8).wrapping_add(grain),
                (((x + y) * 255 / (w + h)) as u8).wrapping_add(grain),
            ]);
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 80)
        .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
        .expect("encode the JPEG");
    out
}
