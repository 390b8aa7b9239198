//! Hand-built PNGs for the tests: chunk by chunk, so a test can make exactly the file a
//! hostile or sloppy provider would send (bombs, animations, junk chunks, bad CRCs).

use bytes::Bytes;
use image::codecs::png::PngEncoder;
use image::{ImageEncoder, RgbImage};

/// A plain bitwise CRC-32, independent of the one the code under test uses.
pub(crate) fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub(crate) fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    out
}

/// `(type, data)` of every chunk, in order, up to the end of the bytes.
pub(crate) fn parts(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    let mut out = Vec::new();
    let mut offset = 8;
    while offset < png.len() {
        let length = u32::from_be_bytes(png[offset..offset + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = png[offset + 4..offset + 8].try_into().unwrap();
        out.push((kind, png[offset + 8..offset + 8 + length].to_vec()));
        offset += 12 + length;
    }
    out
}

pub(crate) fn assemble(chunks: &[([u8; 4], Vec<u8>)]) -> Bytes {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in chunks {
        out.extend(chunk(kind, data));
    }
    Bytes::from(out)
}

pub(crate) fn ihdr(width: u32, height: u32, color_type: u8, interlace: u8) -> Vec<u8> {
    let mut data = width.to_be_bytes().to_vec();
    data.extend_from_slice(&height.to_be_bytes());
    data.extend_from_slice(&[8, color_type, 0, 0, interlace]);
    data
}

/// A zlib stream of stored (uncompressed) blocks: enough to hand-build any PNG.
pub(crate) fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = data.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let length = block.len() as u16;
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(!length).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for byte in data {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// An Adam7-interlaced RGB PNG, which the `png` encoder cannot write: each pass's
/// scanlines with filter type 0, in stored zlib blocks.
pub(crate) fn adam7_png(image: &RgbImage) -> Bytes {
    const PASSES: [(u32, u32, u32, u32); 7] = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ];
    let mut raw = Vec::new();
    for (x0, y0, dx, dy) in PASSES {
        // A pass that no column of a narrow image falls in has no scanlines at all, not
        // empty ones with a filter byte each.
        if x0 >= image.width() {
            continue;
        }
        for y in (y0..image.height()).step_by(dy as usize) {
            raw.push(0); // filter: none
            for x in (x0..image.width()).step_by(dx as usize) {
                raw.extend_from_slice(&image.get_pixel(x, y).0);
            }
        }
    }
    assemble(&[
        (*b"IHDR", ihdr(image.width(), image.height(), 2, 1)),
        (*b"IDAT", zlib_stored(&raw)),
        (*b"IEND", Vec::new()),
    ])
}

/// A picture with real content: a gradient under per-pixel noise.
pub(crate) fn noisy_rgb(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = fastrand::Rng::with_seed(seed);
    RgbImage::from_fn(width, height, |x, y| {
        let base = ((x + y) * 255 / (width + height)) as u8;
        image::Rgb([base.wrapping_add(rng.u8(0..40)), rng.u8(..), 255 - base])
    })
}

pub(crate) fn png_of(image: &RgbImage) -> Bytes {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    Bytes::from(out)
}

pub(crate) fn noisy_png(width: u32, height: u32) -> Bytes {
    png_of(&noisy_rgb(width, height, 7))
}

/// An `iCCP` chunk's data: profile name, NUL, method 0, the profile deflated.
pub(crate) fn iccp(name: &[u8], profile: &[u8]) -> Vec<u8> {
    let mut data = name.to_vec();
    data.extend_from_slice(&[0, 0]);
    data.extend(miniz_oxide::deflate::compress_to_vec_zlib(profile, 9));
    data
}

/// An `iCCP` chunk's data whose profile inflates to `inflated` bytes of zeros.
pub(crate) fn iccp_bomb(inflated: usize) -> Vec<u8> {
    iccp(b"ICC Profile", &vec![0; inflated])
}

/// An `fcTL` chunk's data: a full-size frame at the origin.
fn fctl(sequence: u32, width: u32, height: u32) -> Vec<u8> {
    let mut data = sequence.to_be_bytes().to_vec();
    data.extend_from_slice(&width.to_be_bytes());
    data.extend_from_slice(&height.to_be_bytes());
    data.extend_from_slice(&[0; 8]); // x, y offsets
    data.extend_from_slice(&[0, 1, 0, 10, 0, 0]); // 1/10 s, dispose none, blend source
    data
}

/// A two-frame APNG whose first frame is the default image (a noisy 256x256 picture) and
/// whose second frame is one flat colour, and the still PNG that is its first frame.
pub(crate) fn apng_with_second_frame() -> (Bytes, Bytes) {
    let (width, height) = (256, 256);
    let still = noisy_png(width, height);
    let still_parts = parts(&still);
    let flat = png_of(&RgbImage::from_pixel(width, height, image::Rgb([0, 0, 0])));
    let mut second_frame = 2u32.to_be_bytes().to_vec();
    for (kind, data) in parts(&flat) {
        if &kind == b"IDAT" {
            second_frame.extend(data);
        }
    }
    let mut apng = vec![still_parts[0].clone()];
    let mut actl = 2u32.to_be_bytes().to_vec(); // frames
    actl.extend_from_slice(&0u32.to_be_bytes()); // loop forever
    apng.push((*b"acTL", actl));
    apng.push((*b"fcTL", fctl(0, width, height)));
    for part in &still_parts[1..still_parts.len() - 1] {
        apng.push(part.clone());
    }
    apng.push((*b"fcTL", fctl(1, width, height)));
    apng.push((*b"fdAT", second_frame));
    apng.push((*b"IEND", Vec::new()));
    (assemble(&apng), still)
}

/// Runs `script` in Python with Pillow on `png` (saved to a file whose path is
/// `sys.argv[1]`) and returns what it printed, or `None` when python3 with Pillow is not
/// installed (`.ci/run` installs it). A script that fails fails the test.
pub(crate) fn with_pillow(png: &[u8], script: &str) -> Option<String> {
    let has_pillow = std::process::Command::new("python3")
        .args(["-c", "import PIL, defusedxml"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_pillow {
        missing_tool("python3 with Pillow and defusedxml");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.png");
    std::fs::write(&path, png).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Pillow failed on the PNG: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// exiftool's reading of `png`: every tag as `{"GROUP:Tag": value}` (`exiftool -j -G1`), or
/// `None` when exiftool is not installed (`.ci/run` installs it).
pub(crate) fn with_exiftool(png: &[u8]) -> Option<serde_json::Value> {
    let installed = std::process::Command::new("exiftool")
        .arg("-ver")
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        missing_tool("exiftool");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.png");
    std::fs::write(&path, png).unwrap();
    let out = std::process::Command::new("exiftool")
        .args(["-j", "-G1", "-a", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exiftool failed on the PNG: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    Some(files.remove(0))
}

/// A check's outside reader is not installed: skipped on a developer's machine, a failure
/// in CI (where `.ci/run` installs it), so a missing install step cannot pass unnoticed.
fn missing_tool(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is not installed; .ci/run installs it"
    );
    eprintln!("SKIPPED a check: {what} is not installed");
}
