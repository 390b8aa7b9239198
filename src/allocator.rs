//! The memory allocator's arenas.
//!
//! glibc's `malloc` gives threads that allocate at the same moment arenas of their own, up
//! to eight per core, and an arena keeps the memory freed into it. A batch's images pass
//! through every worker thread, so each arena ends up holding a share of the batch's peak:
//! measured with the `stage3` CLI on 16 scenes of 1792x1024 at concurrency 8, two arenas
//! held the peak resident set at 115 MiB where the default took 135 MiB, and the 8000x5000
//! JPEG case at 43 MiB instead of 68 MiB (`cargo bench --bench pipeline`, section 3).

/// Caps glibc at two arenas. Called first thing in `main`, before the async runtime starts
/// its threads; does nothing where the C library is not glibc.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes the allocator's tuning; M_ARENA_MAX takes any
        // positive count, and arenas already made are kept and used.
        let changed = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        if changed != 1 {
            tracing::debug!("the allocator kept its arena limit");
        }
    }
}
