//! Process health instruments (the dashboard's "system health" row), read from `/proc/self`.

use opentelemetry::metrics::Meter;

/// Clock ticks per second used by `/proc/self/stat` (USER_HZ is 100 on every Linux ABI).
const CLOCK_TICKS: f64 = 100.0;

fn read_stat() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime/stime are fields 14/15, threads 20.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let threads: u64 = f.get(17)?.parse().ok()?;
    Some(((utime + stime) / CLOCK_TICKS, threads))
}

/// Resident set size in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// Register the observable process instruments; callbacks run at each collection.
pub fn register(meter: &Meter) {
    // process_cpu_seconds_total
    let _ = meter
        .f64_observable_counter("process.cpu")
        .with_unit("s")
        .with_description("User and system CPU time")
        .with_callback(|o| {
            if let Some((cpu, _)) = read_stat() {
                o.observe(cpu, &[]);
            }
        })
        .build();
    // process_resident_memory_bytes
    let _ = meter
        .u64_observable_gauge("process.resident_memory")
        .with_unit("By")
        .with_description("Resident set size")
        .with_callback(|o| {
            if let Some(rss) = resident_bytes() {
                o.observe(rss, &[]);
            }
        })
        .build();
    // process_open_fds
    let _ = meter
        .u64_observable_gauge("process.open_fds")
        .with_description("Open file descriptors")
        .with_callback(|o| {
            if let Some(n) = open_fds() {
                o.observe(n, &[]);
            }
        })
        .build();
    // process_threads
    let _ = meter
        .u64_observable_gauge("process.threads")
        .with_description("OS threads")
        .with_callback(|o| {
            if let Some((_, t)) = read_stat() {
                o.observe(t, &[]);
            }
        })
        .build();
    // philotes_runtime_tasks: captured now, because callbacks run on exporter threads.
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let _ = meter
            .u64_observable_gauge("philotes.runtime.tasks")
            .with_description("Alive tokio tasks")
            .with_callback(move |o| {
                o.observe(handle.metrics().num_alive_tasks() as u64, &[]);
            })
            .build();
    }
}
