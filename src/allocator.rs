//! The memory allocator's tuning, for the binaries.
//!
//! glibc's `malloc` gives threads that allocate at the same moment arenas of their own, up
//! to eight per core, and an arena keeps the memory freed into it. A batch's images pass
//! through every worker thread, so each arena ends up holding a share of the batch's peak:
//! measured with the `stage3` CLI on 16 scenes of 1792x1024 at concurrency 8, two arenas
//! held the peak resident set at 115 MiB where the default took 135 MiB, and the 8000x5000
//! JPEG case at 43 MiB instead of 68 MiB (`cargo bench --bench pipeline`, section 3).
//!
//! Big buffers are the other half. glibc maps a block of more than 128 KiB on its own and
//! unmaps it when freed — but each such free raises that threshold to the block's size (up
//! to 32 MiB), so after the first image every later image's buffers (its answer, pixels,
//! PNG, labelled copy: megabytes each) come from the arenas, whose pages stay resident
//! after the image is done. A fixed threshold keeps them mapped and returned: the resident
//! set follows the images in flight instead of the largest moment so far. Measured the same
//! way, the 16-scene batch peaked at 64–71 MiB instead of 106–126 MiB, and the hostile
//! colour-profile case at 79–91 MiB instead of 97–109 MiB.

/// Blocks from this size up are mapped on their own and given back to the system when
/// freed: an image's buffers, megabytes each, but not the HTTP and JSON buffers that come
/// and go by the thousand. Each mapping is paid for in page faults when it is filled, so
/// the line is drawn high: at 256 KiB the 10-image run of `cargo bench` (section 1b) took
/// 14 ms longer, at 1 MiB 5 ms, for the same resident set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MAP_FROM_BYTES: libc::c_int = 1024 * 1024;

/// Caps glibc at two arenas and fixes its mapping threshold. Called first thing in `main`,
/// before the async runtime starts its threads; does nothing where the C library is not
/// glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes the allocator's tuning. M_ARENA_MAX takes any
        // positive count (arenas already made are kept and used); M_MMAP_THRESHOLD any
        // size up to 32 MiB, and setting it turns off glibc's raising of it.
        let arenas = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        let threshold = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_FROM_BYTES) };
        if arenas != 1 || threshold != 1 {
            tracing::debug!("the allocator kept some of its tuning");
        }
    }
}
