//! The PNG chunk pass: what we store is what we checked.
//!
//! A PNG is a list of chunks, and the decoder that validates it looks only at some of them.
//! Everything else — text, EXIF, unknown chunks, the later frames of an animation — used to
//! be stored byte for byte without anyone having looked at it, and some of it breaks other
//! readers (Pillow refuses a PNG whose text chunk inflates past its limit) or costs memory
//! to read (a 1 MB `iCCP` chunk can inflate to 1 GiB, and the `png` crate inflates it up to
//! its allocation limit). So before a PNG is decoded it goes through this pass, which keeps:
//!
//! - the critical chunks (`IHDR`, `PLTE`, `IDAT`, `IEND`; an unknown critical chunk is kept
//!   so the decoder refuses the file, as the PNG specification requires);
//! - a short allowlist of ancillary chunks that change how the pixels look, each with a
//!   size bound, before the first `IDAT`, first of its kind: see [`ALLOWED_ANCILLARY`].
//!   An `iCCP` profile is kept only if its compressed size is within [`MAX_ICC_PROFILE_BYTES`]
//!   and a streaming inflate, which stops at that bound, finds a whole profile within it.
//!
//! Everything else is dropped: `tEXt`/`zTXt`/`iTXt` (including any `AIGC` label a provider
//! sent: the label is ours to write, see [`super::aigc`]), `eXIf`, `tIME`, unknown chunks,
//! anything after `IEND`, and animation.
//!
//! **Animation (APNG) is flattened, not refused.** `acTL`, `fcTL` and `fdAT` are dropped,
//! which leaves the default image in `IDAT`: the picture every non-APNG reader shows, and
//! the one the decoder validates. Refusing would send the scene back to the provider, a paid
//! call, for an answer whose still image is complete and checked; keeping the chunks would
//! store frames nobody has decoded.
//!
//! The pass copies the kept chunks into a new buffer (cheap next to the decode that
//! follows), or, when it drops nothing, hands back the input itself.

use bytes::Bytes;
use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

use super::invalid;
use crate::error::Result;

/// The 8 bytes every PNG starts with.
pub(crate) const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// The largest colour profile kept, compressed in the chunk and inflated alike. Real
/// profiles are small (sRGB and Display P3 are 0.5–60 KB; large print profiles a few
/// hundred KB); a bigger one in a generated image is padding or a bomb, and costs memory
/// in every reader that opens the file.
pub(crate) const MAX_ICC_PROFILE_BYTES: usize = 1024 * 1024;

/// The ancillary chunks kept, each with the largest data it may carry: the ones that change
/// how the stored pixels are displayed (transparency, gamma, chromaticities, colour space,
/// profile, significant bits, background, pixel density). Sizes follow the PNG specification.
pub(crate) const ALLOWED_ANCILLARY: &[(&[u8; 4], usize)] = &[
    (b"tRNS", 256),
    (b"gAMA", 4),
    (b"cHRM", 32),
    (b"sRGB", 1),
    (b"cICP", 4),
    (b"iCCP", MAX_ICC_PROFILE_BYTES),
    (b"sBIT", 4),
    (b"bKGD", 6),
    (b"pHYs", 9),
];

/// One chunk of a PNG, borrowed from its bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk<'a> {
    /// The four-letter type, e.g. `*b"IDAT"`.
    pub kind: [u8; 4],
    /// The chunk's data, without length, type or CRC.
    pub data: &'a [u8],
    /// Where the chunk (its length field) starts in the file.
    pub start: usize,
    /// Just past its CRC.
    pub end: usize,
}

impl Chunk<'_> {
    /// The bytes of the whole chunk: length, type, data, CRC.
    pub(super) fn raw<'b>(&self, png: &'b [u8]) -> &'b [u8] {
        &png[self.start..self.end]
    }

    /// Critical chunks have an upper-case first letter; a reader must understand them.
    pub(crate) fn is_critical(&self) -> bool {
        self.kind[0].is_ascii_uppercase()
    }

    fn name(&self) -> String {
        String::from_utf8_lossy(&self.kind).into_owned()
    }
}

/// Every chunk from `IHDR` to `IEND`, in order, or — as the last item — why the file is cut
/// off or malformed. Bytes after `IEND` are not looked at. The signature is assumed (it was
/// sniffed). An iterator, not a list: a hostile file can hold millions of empty chunks.
pub(super) fn chunks(png: &[u8]) -> Chunks<'_> {
    Chunks {
        png,
        offset: PNG_SIGNATURE.len(),
        first: true,
        done: false,
    }
}

/// The iterator of [`chunks`].
pub(super) struct Chunks<'a> {
    png: &'a [u8],
    offset: usize,
    first: bool,
    done: bool,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Result<Chunk<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let result = self.read_chunk();
        self.done = match &result {
            Ok(chunk) => &chunk.kind == b"IEND",
            Err(_) => true,
        };
        Some(result)
    }
}

impl<'a> Chunks<'a> {
    fn read_chunk(&mut self) -> Result<Chunk<'a>> {
        let (png, offset) = (self.png, self.offset);
        let Some(header) = png.get(offset..offset + 8) else {
            return Err(invalid(format!(
                "PNG is truncated: {} bytes and no IEND chunk",
                png.len()
            )));
        };
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let kind = [header[4], header[5], header[6], header[7]];
        if length > 0x7FFF_FFFF {
            return Err(invalid(format!(
                "PNG is corrupt: chunk at byte {offset} claims {length} bytes"
            )));
        }
        if self.first && &kind != b"IHDR" {
            return Err(invalid("PNG is corrupt: it does not start with IHDR"));
        }
        self.first = false;
        let data_start = offset + 8;
        let end = data_start + length as usize + 4;
        if end > png.len() {
            return Err(invalid(format!(
                "PNG is truncated: chunk {} at byte {offset} needs {} bytes, only {} remain",
                String::from_utf8_lossy(&kind),
                12 + length as usize,
                png.len() - offset
            )));
        }
        self.offset = end;
        Ok(Chunk {
            kind,
            data: &png[data_start..end - 4],
            start: offset,
            end,
        })
    }
}

/// At most this many dropped chunk types are listed in a [`ChunkReport`].
const REPORTED_DROPS: usize = 32;

/// What [`keep_checked_chunks`] did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChunkReport {
    /// The type of each dropped chunk, in file order, one entry a chunk (the first 32).
    pub dropped: Vec<[u8; 4]>,
    /// How many chunks were dropped in all.
    pub dropped_chunks: usize,
    /// Whether animation chunks were among them: the APNG was flattened to its still image.
    pub flattened_animation: bool,
    /// Bytes after `IEND` that were cut off.
    pub trailing_bytes: usize,
}

impl ChunkReport {
    /// The dropped chunk types, comma-separated, for a log line.
    pub(crate) fn dropped_names(&self) -> String {
        let mut names: Vec<String> = self
            .dropped
            .iter()
            .map(|kind| String::from_utf8_lossy(kind).into_owned())
            .collect();
        if self.dropped_chunks > self.dropped.len() {
            names.push(format!("… ({} in all)", self.dropped_chunks));
        }
        names.join(",")
    }

    fn record_drop(&mut self, kind: [u8; 4]) {
        if matches!(&kind, b"acTL" | b"fcTL" | b"fdAT") {
            self.flattened_animation = true;
        }
        if self.dropped.len() < REPORTED_DROPS {
            self.dropped.push(kind);
        }
        self.dropped_chunks += 1;
    }
}

/// The PNG to validate and store: the critical chunks and the allowed ancillary ones, from
/// the signature to `IEND`. Returns `png` itself (a zero-copy slice) when nothing is dropped;
/// otherwise one pass copies the kept chunks into a buffer no larger than the input.
pub(crate) fn keep_checked_chunks(png: Bytes) -> Result<(Bytes, ChunkReport)> {
    let mut report = ChunkReport::default();
    // Filled from the first dropped chunk on; until then, the kept chunks are a prefix.
    let mut copy: Option<Vec<u8>> = None;
    let mut seen_idat = false;
    let mut seen_ancillary: Vec<[u8; 4]> = Vec::new();
    let mut end = PNG_SIGNATURE.len();
    for chunk in chunks(&png) {
        let chunk = chunk?;
        end = chunk.end;
        let keep = chunk.is_critical()
            || (!seen_idat && !seen_ancillary.contains(&chunk.kind) && ancillary_allowed(&chunk));
        if &chunk.kind == b"IDAT" {
            seen_idat = true;
        }
        match (keep, &mut copy) {
            (true, Some(out)) => out.extend_from_slice(chunk.raw(&png)),
            (true, None) => {}
            (false, Some(_)) => report.record_drop(chunk.kind),
            (false, None) => {
                let mut out = Vec::with_capacity(png.len());
                out.extend_from_slice(&png[..chunk.start]);
                copy = Some(out);
                report.record_drop(chunk.kind);
            }
        }
        if keep && !chunk.is_critical() {
            seen_ancillary.push(chunk.kind);
        }
    }
    report.trailing_bytes = png.len() - end;
    let kept = match copy {
        None => png.slice(..end),
        Some(mut out) => {
            out.shrink_to_fit();
            Bytes::from(out)
        }
    };
    Ok((kept, report))
}

fn ancillary_allowed(chunk: &Chunk<'_>) -> bool {
    let Some(&(_, max)) = ALLOWED_ANCILLARY
        .iter()
        .find(|(kind, _)| **kind == chunk.kind)
    else {
        return false;
    };
    if chunk.data.len() > max {
        tracing::debug!(
            chunk = %chunk.name(),
            bytes = chunk.data.len(),
            "ancillary chunk larger than allowed; dropped"
        );
        return false;
    }
    if &chunk.kind == b"iCCP" {
        return icc_profile_within_bound(chunk.data);
    }
    true
}

/// Whether an `iCCP` chunk's data (name, NUL, method 0, zlib stream) holds a whole profile
/// of at most [`MAX_ICC_PROFILE_BYTES`]. The inflate streams through a fixed 32 KiB window
/// and stops at the bound, so a bomb costs that window and a moment, never its claimed size.
pub(crate) fn icc_profile_within_bound(data: &[u8]) -> bool {
    let Some(nul) = data.iter().position(|&b| b == 0) else {
        return false;
    };
    // A name of 1–79 bytes, then compression method 0 (deflate).
    if nul == 0 || nul > 79 || data.get(nul + 1) != Some(&0) {
        return false;
    }
    inflated_size_within(&data[nul + 2..], MAX_ICC_PROFILE_BYTES).is_some()
}

/// The inflated size of a complete zlib stream, if it is at most `max` bytes; `None` for a
/// larger, truncated or corrupt stream. Memory: the inflater's state and a 32 KiB buffer.
pub(crate) fn inflated_size_within(zlib: &[u8], max: usize) -> Option<usize> {
    let mut state = InflateState::new_boxed(DataFormat::Zlib);
    let mut window = vec![0u8; 32 * 1024];
    let mut input = zlib;
    let mut total = 0usize;
    loop {
        let result = inflate(&mut state, input, &mut window, MZFlush::None);
        input = &input[result.bytes_consumed..];
        total += result.bytes_written;
        if total > max {
            return None;
        }
        match result.status {
            Ok(MZStatus::StreamEnd) => return Some(total),
            Ok(_) if result.bytes_consumed > 0 || result.bytes_written > 0 => {}
            // No progress: the stream ends early, or is corrupt.
            Ok(_) | Err(MZError::Buf) | Err(_) => return None,
        }
    }
}

/// The CRC-32 a chunk carries: over its type and data.
pub(crate) fn chunk_crc(kind: &[u8; 4], data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(kind);
    hasher.update(data);
    hasher.finalize()
}

/// Appends a whole chunk — length, type, data, CRC — to `out`.
pub(crate) fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) -> Result<()> {
    let length = u32::try_from(data.len())
        .ok()
        .filter(|&n| n <= 0x7FFF_FFFF)
        .ok_or_else(|| invalid(format!("a {} byte PNG chunk is too long", data.len())))?;
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&chunk_crc(kind, data).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_png::*;
    use super::*;

    fn kinds(png: &[u8]) -> Vec<[u8; 4]> {
        chunks(png).map(|c| c.unwrap().kind).collect()
    }

    #[test]
    fn a_clean_png_passes_untouched_and_uncopied() {
        let png = noisy_png(128, 128);
        let (kept, report) = keep_checked_chunks(png.clone()).unwrap();
        assert_eq!(kept, png);
        assert_eq!(kept.as_ptr(), png.as_ptr(), "the bytes were copied");
        assert_eq!(report, ChunkReport::default());
    }

    #[test]
    fn the_allowlist_keeps_colour_chunks_and_drops_the_rest() {
        let png = noisy_png(128, 128);
        let mut parts = parts(&png);
        let extra: Vec<([u8; 4], Vec<u8>)> = vec![
            (*b"gAMA", 45_455u32.to_be_bytes().to_vec()),
            (*b"sRGB", vec![0]),
            (*b"pHYs", vec![0, 0, 11, 19, 0, 0, 11, 19, 1]),
            (*b"tEXt", b"Comment\0hello".to_vec()),
            (*b"eXIf", b"MM\0\x2a\0\0\0\x08\0\0".to_vec()),
            (*b"tIME", vec![7, 234, 11, 29, 12, 0, 0]),
            (*b"prVt", vec![1, 2, 3]),
            // Twice the same allowed kind: only the first is kept.
            (*b"gAMA", 100_000u32.to_be_bytes().to_vec()),
            // Larger than its kind can be.
            (*b"sBIT", vec![8; 40]),
        ];
        for (i, part) in extra.into_iter().enumerate() {
            parts.insert(1 + i, part);
        }
        // An allowed kind after the image data is out of place, and dropped.
        parts.insert(parts.len() - 1, (*b"bKGD", vec![0, 0, 0, 0, 0, 0]));
        let (kept, report) = keep_checked_chunks(assemble(&parts)).unwrap();
        assert_eq!(
            kinds(&kept),
            [b"IHDR", b"gAMA", b"sRGB", b"pHYs", b"IDAT", b"IEND"].map(|k| *k)
        );
        assert_eq!(report.dropped_names(), "tEXt,eXIf,tIME,prVt,gAMA,sBIT,bKGD");
        assert!(!report.flattened_animation);
        // The first gAMA is the one kept.
        let gama = chunks(&kept).nth(1).unwrap().unwrap().data.to_vec();
        assert_eq!(gama, 45_455u32.to_be_bytes());
    }

    #[test]
    fn an_unknown_critical_chunk_is_kept_for_the_decoder_to_refuse() {
        let png = noisy_png(64, 64);
        let mut parts = parts(&png);
        parts.insert(1, (*b"XYZW", vec![0; 4]));
        let (kept, report) = keep_checked_chunks(assemble(&parts)).unwrap();
        assert!(kinds(&kept).contains(b"XYZW"));
        assert!(report.dropped.is_empty());
    }

    #[test]
    fn a_small_real_colour_profile_is_kept() {
        let profile: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let png = noisy_png(64, 64);
        let mut parts = parts(&png);
        parts.insert(1, (*b"iCCP", iccp(b"Display P3", &profile)));
        let (kept, report) = keep_checked_chunks(assemble(&parts)).unwrap();
        assert!(kinds(&kept).contains(b"iCCP"), "{report:?}");
    }

    #[test]
    fn an_icc_bomb_is_dropped_without_being_inflated() {
        // 8 MiB of zeros behind a ~8 KB chunk; the inflate must stop at the bound.
        let bomb = iccp_bomb(8 * 1024 * 1024);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert!(!icc_profile_within_bound(&bomb));
        let png = noisy_png(64, 64);
        let mut parts = parts(&png);
        parts.insert(1, (*b"iCCP", bomb));
        let (kept, report) = keep_checked_chunks(assemble(&parts)).unwrap();
        assert!(!kinds(&kept).contains(b"iCCP"));
        assert_eq!(report.dropped_names(), "iCCP");
    }

    #[test]
    fn a_profile_just_under_and_just_over_the_bound() {
        let under = vec![7u8; MAX_ICC_PROFILE_BYTES];
        assert!(icc_profile_within_bound(&iccp(b"p", &under)));
        let over = vec![7u8; MAX_ICC_PROFILE_BYTES + 1];
        assert!(!icc_profile_within_bound(&iccp(b"p", &over)));
    }

    #[test]
    fn a_broken_profile_is_dropped() {
        let good = iccp(b"sRGB", &[1; 500]);
        // Cut off, wrong method, no name, no NUL.
        assert!(!icc_profile_within_bound(&good[..good.len() - 3]));
        let mut method = good.clone();
        method[5] = 1;
        assert!(!icc_profile_within_bound(&method));
        assert!(!icc_profile_within_bound(&good[4..]));
        assert!(!icc_profile_within_bound(b"no terminator"));
        assert!(icc_profile_within_bound(&good));
    }

    #[test]
    fn an_apng_is_flattened_to_its_default_image() {
        let (apng, still) = apng_with_second_frame();
        let (kept, report) = keep_checked_chunks(apng).unwrap();
        assert!(report.flattened_animation);
        assert_eq!(report.dropped_names(), "acTL,fcTL,fcTL,fdAT");
        assert_eq!(kept, still);
    }

    #[test]
    fn truncation_is_reported_where_it_happens() {
        let png = noisy_png(64, 64);
        for keep in [20, png.len() / 2, png.len() - 1] {
            let Err(e) = keep_checked_chunks(png.slice(..keep)) else {
                panic!("{keep}: accepted a cut-off PNG");
            };
            assert!(e.to_string().contains("truncated"), "{keep}: {e}");
        }
    }

    #[test]
    fn written_chunks_carry_the_right_crc() {
        let mut out = Vec::new();
        write_chunk(&mut out, b"IEND", &[]).unwrap();
        // The CRC every PNG's IEND carries.
        assert_eq!(out, b"\0\0\0\0IEND\xae\x42\x60\x82");
        assert_eq!(chunk_crc(b"tEXt", b"a"), crc32(&[b"tEXt", b"a"]));
    }
}
