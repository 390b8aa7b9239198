//! Hostile answers cost bounded memory: the heap's high-water mark around one
//! `normalize_image` call, measured by a counting allocator. This file holds one test, so
//! nothing else allocates while it measures.
//!
//! The old code inflated a colour-profile bomb up to its 320 MB allocation limit, and
//! decoded a 40 MP JPEG (a 120 MB frame, then a PNG as large); see `docs/performance.md`.

#[allow(dead_code)]
#[path = "support/hostile_images.rs"]
mod hostile_images;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use stage3::normalize::{normalize_image, ImageLimits, DEFAULT_MAX_IMAGE_PIXELS};
use stage3::schema::ImageSize;
use stage3::Stage3Error;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `work` and returns its result and the most heap it held at once beyond what was
/// allocated before it started.
fn peak_heap_of<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = work();
    (result, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

const MIB: usize = 1024 * 1024;

fn photo_png(width: u32, height: u32) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(3);
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 255 / width) as u8 ^ rng.u8(0..32),
            (y * 255 / height) as u8,
            rng.u8(..),
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode");
    out.into_inner()
}

#[test]
fn hostile_answers_are_checked_in_bounded_memory() {
    let limits = ImageLimits {
        max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
    };

    // What a clean 1024x1024 PNG costs, for scale: the decoder's rows and buffers.
    let clean = Bytes::from(photo_png(1024, 1024));
    let (result, clean_peak) =
        peak_heap_of(|| normalize_image(clean.clone(), ImageSize::Square, &limits));
    result.expect("the clean PNG passes");

    // The same picture with a ~256 KB profile chunk that inflates to 256 MiB.
    let bomb = Bytes::from(hostile_images::png_with_icc_bomb(&clean, 256 * MIB));
    assert!(bomb.len() < clean.len() + MIB, "{} bytes", bomb.len());
    let (result, bomb_peak) = peak_heap_of(|| normalize_image(bomb, ImageSize::Square, &limits));
    let stored = result.expect("the picture is fine; only the profile is dropped");
    assert_eq!(stored.png, clean, "stored without the bomb");
    // Copying the kept chunks costs one file; the profile check a 32 KiB window.
    assert!(
        bomb_peak <= clean_peak + clean.len() + MIB,
        "the bomb cost {bomb_peak} bytes of heap, a clean PNG {clean_peak}"
    );

    // A JPEG whose header says 8000x5000 (40 MP) is refused before anything is decoded.
    let mut jpeg = hostile_images::large_photo_jpeg(320, 200);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    jpeg[sof + 5..sof + 7].copy_from_slice(&5_000u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&8_000u16.to_be_bytes());
    let (result, jpeg_peak) =
        peak_heap_of(|| normalize_image(Bytes::from(jpeg), ImageSize::Landscape, &limits));
    match result {
        Err(Stage3Error::InvalidImage(message)) => {
            assert!(message.contains("8000x5000"), "{message}")
        }
        other => panic!("expected invalid_image, got {other:?}"),
    }
    assert!(
        jpeg_peak < MIB,
        "refusing the 40 MP JPEG cost {jpeg_peak} bytes of heap"
    );
    println!(
        "peak heap: clean 1024x1024 PNG {:.1} MiB, with a 256 MiB profile bomb {:.1} MiB, \
         40 MP JPEG header {:.3} MiB",
        clean_peak as f64 / MIB as f64,
        bomb_peak as f64 / MIB as f64,
        jpeg_peak as f64 / MIB as f64
    );
}
