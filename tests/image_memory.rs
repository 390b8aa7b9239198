//! Hostile inputs cost bounded memory: the heap's high-water mark around one
//! `normalize_image` call, and around publishing a story beside planted giant fragments,
//! measured by a counting allocator. The tests take turns (`measuring`), so nothing else
//! allocates while one measures.
//!
//! The old code inflated a colour-profile bomb up to its 320 MB allocation limit, and
//! decoded a 40 MP JPEG (a 120 MB frame, then a PNG as large); see `docs/performance.md`.
//! It also parsed and cloned every story fragment whole: one planted 16 MB fragment cost
//! 527 MB and wrote an 87 MB page (issue 22).

#[allow(dead_code)]
#[path = "support/hostile_images.rs"]
mod hostile_images;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use stage3::storage::FsStore;
use stage3::story::{self, Manifest, ManifestEntry, SceneStatus, StoryScene};
use stage3::ImageSize;
use stage3::Stage3Error;
use stage3::UrlPolicy;
use stage3::{normalize_image, ImageLimits, DEFAULT_MAX_IMAGE_PIXELS};

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

/// Held by each test for its whole run: the allocator counts every thread, so only one
/// test may run at a time.
fn measuring() -> MutexGuard<'static, ()> {
    static MEASURING: Mutex<()> = Mutex::new(());
    MEASURING.lock().unwrap_or_else(PoisonError::into_inner)
}

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
    let _alone = measuring();
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

/// A scene of a long story as a batch reports it: a prompt of a few hundred characters,
/// Chinese and Latin, a stored image and its thumbnail.
fn story_entry(number: usize) -> ManifestEntry {
    let scene = StoryScene {
        scene_id: format!("scene_{number:04}"),
        prompt: format!(
            "Scene {number}: 小狐狸在雪中醒来，远处的松林里有一只猫头鹰。 {}",
            "The fox looks over the frozen valley at dawn, breath in the cold air. ".repeat(6)
        ),
        size: "1792x1024".into(),
        model: "google/gemini-3.1-flash-image".into(),
    };
    let mut entry = ManifestEntry::failed(&scene, "timeout", "unused");
    let key = format!("scene_{number:04}-{number:016x}.png");
    entry.status = SceneStatus::Succeeded;
    entry.error_type = None;
    entry.message = None;
    entry.thumbnail_key = Some(story::thumbnail_key(&key));
    entry.image_path = Some(format!("/srv/stage3/output/{key}"));
    entry.image_key = Some(key);
    entry.width = Some(1792);
    entry.height = Some(1024);
    entry.bytes = Some(1_800_000);
    entry.cost = Some(0.04);
    entry
}

/// A planted fragment of `story_id` of at least `size` bytes: entries that each pass every
/// check (`valid`), or that each fail one (a key into another tenant's files).
fn planted_fragment(story_id: &str, size: usize, tag: &str, valid: bool) -> Vec<u8> {
    let mut out = format!(
        r#"{{"format":1,"story_id":"{story_id}","written_at":"9999-12-31T23:59:59.999Z","scenes":["#
    )
    .into_bytes();
    let prompt = "A planted scene that repeats and repeats. ".repeat(30);
    let mut number = 0usize;
    while out.len() < size {
        if number > 0 {
            out.push(b',');
        }
        let id = format!("{tag}-{number}");
        let key = if valid {
            format!("{id}-{number:016x}.png")
        } else {
            "../../../../other-tenant/secret.png".to_string()
        };
        out.extend_from_slice(
            format!(
                r#"{{"scene_id":"{id}","status":"succeeded","prompt":"{prompt}","size":"1024x1024","model":"m","image_key":"{key}","image_url":"https://attacker.example/{id}.png","cost":0.01}}"#
            )
            .as_bytes(),
        );
        number += 1;
    }
    out.extend_from_slice(b"]}");
    out
}

#[test]
fn a_thousand_scene_story_beside_planted_giants_publishes_in_bounded_memory() {
    let _alone = measuring();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::new(dir.path()).unwrap();
    let batches = dir.path().join("stories/epic/batches");
    std::fs::create_dir_all(&batches).unwrap();
    // Three 16 MB fragments of valid-looking scenes (30,000 of them), and one just under the
    // size a fragment may have, of entries that each fail a check.
    for n in 0..3 {
        std::fs::write(
            batches.join(format!("9999999999999-fffffffffffff{n:03x}.json")),
            planted_fragment("epic", 16_000_000, &format!("giant{n}"), true),
        )
        .unwrap();
    }
    std::fs::write(
        batches.join("9999999999999-eeeeeeeeeeeeeeee.json"),
        planted_fragment("epic", 4 * MIB - 64 * 1024, "bad", false),
    )
    .unwrap();

    // The story: four batches of 250 scenes.
    let mut peaks = Vec::new();
    for batch in 0..4 {
        let entries: Vec<ManifestEntry> =
            (batch * 250..(batch + 1) * 250).map(story_entry).collect();
        let (links, peak) = peak_heap_of(|| {
            runtime.block_on(story::publish_story(
                &store,
                &UrlPolicy::Store,
                "epic",
                entries,
            ))
        });
        links.expect("the story is published");
        peaks.push(peak);
    }

    let worst = peaks.iter().copied().max().unwrap_or_default();
    assert!(
        worst < 64 * MIB,
        "publishing cost {worst} bytes of heap at its peak"
    );
    let manifest_bytes = std::fs::read(dir.path().join("stories/epic/manifest.json")).unwrap();
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(
        manifest.totals.scenes, 1_000,
        "the story's scenes and no planted one"
    );
    assert!(manifest
        .scenes
        .iter()
        .all(|e| e.scene_id.starts_with("scene_")));
    let page = std::fs::read_to_string(dir.path().join("stories/epic/index.html")).unwrap();
    assert_eq!(page.matches("<article ").count(), 1_000);
    assert!(
        page.len() < 2 * MIB,
        "a page of normal size: {} bytes",
        page.len()
    );
    assert!(!page.contains("attacker.example") && !page.contains("other-tenant"));
    println!(
        "peak heap publishing 250-scene batches of a story growing to 1,000 scenes beside \
         three planted 16 MB fragments: {} MiB; manifest {:.1} MiB, page {:.1} MiB",
        peaks
            .iter()
            .map(|p| format!("{:.1}", *p as f64 / MIB as f64))
            .collect::<Vec<_>>()
            .join(" / "),
        manifest_bytes.len() as f64 / MIB as f64,
        page.len() as f64 / MIB as f64
    );
}
