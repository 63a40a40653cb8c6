//! The process allocator's settings: glibc's defaults make a long-running agent's RSS creep
//! (an arena per core-multiple of threads, freed memory kept in them, large buffers moved from
//! mmap into the arenas after the first one is freed), which the soak bench measured
//! (docs/performance.md, "What changed the RSS").

use std::time::Duration;

/// Allocations at least this large are mapped on their own and unmapped when freed. glibc's
/// default threshold starts at 128 KiB but rises to the size of every mapped block freed, so
/// after the first 2 MiB object-store read buffer or ~600 kB metadata.json all of them land in
/// the arenas and leave holes there; a fixed threshold stops that adjustment.
const MMAP_THRESHOLD: i32 = 1 << 20;

/// How often the allocator's free pages go back to the system.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Malloc arenas: two. One arena made an initial snapshot's peak RSS 10–20 MB lower and flat
/// in the table's size, but every commit of the soak bench took ~20 % longer (threads
/// contending for its lock while a commit parses and writes metadata; session 19), so not.
const ARENAS: i32 = 2;

/// Limit glibc to [`ARENAS`] malloc arenas and fix its mmap threshold, unless
/// `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` say otherwise. Call before any other thread
/// starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Tune glibc's malloc (nothing to do with other allocators).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Give the free memory a burst of work left in the allocator back to the system. Commits and
/// maintenance read and write whole files now and then; without this, glibc keeps the freed
/// pages in its arenas and the agent's RSS stays at the level of its largest burst. It walks
/// the heap (a few milliseconds), so it runs on a blocking thread, never per row.
pub async fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only returns free pages of the allocator's arenas.
            unsafe {
                libc::malloc_trim(0);
            }
        })
        .await;
    }
}

/// Return free pages every [`TRIM_INTERVAL`] until shutdown, so that RSS follows the live heap
/// and not the high-water mark of whatever ran since the last maintenance pass.
pub async fn trim_loop(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => release_free().await,
            _ = shutdown.changed() => return,
        }
    }
}
