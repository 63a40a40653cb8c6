//! The process allocator's settings: glibc's defaults make a long-running agent's RSS creep
//! (an arena per core-multiple of threads, freed memory kept in them), which the soak bench
//! measured (docs/performance.md, "What changed the RSS").

/// Limit glibc to two malloc arenas unless `MALLOC_ARENA_MAX` says otherwise. Call before any
/// other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Limit glibc's malloc arenas (nothing to do with other allocators).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}

/// Give the free memory a burst of work left in the allocator back to the system. Maintenance
/// reads and writes whole files now and then; without this, glibc keeps the freed pages in its
/// arenas and the agent's RSS stays at the level of its largest burst. It walks the heap
/// (a few milliseconds), so it runs on a blocking thread, after maintenance, never per row.
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
