//! Process and runtime instruments, read from `/proc/self` and the tokio runtime.
//!
//! Two sets of process metrics describe the same process: OpenTelemetry's semantic conventions
//! (`process.cpu.time`, `process.memory.usage`, …) for OTLP consumers, and the Prometheus client
//! names (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …) that the dashboard
//! and users' alerts query on `/metrics`. Each goes only where it is expected:
//! [`register_semconv`] on the meter of both readers with its families left out of `/metrics`
//! ([`OTLP_ONLY`]), [`register_prometheus`] on a meter whose only reader is the Prometheus one.

use std::time::Instant;

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

/// Clock ticks per second used by `/proc/self/stat` (USER_HZ is 100 on every Linux ABI).
const CLOCK_TICKS: f64 = 100.0;
/// Page size for `/proc/self/stat`'s rss field (4 KiB on the platforms we build for).
const PAGE: u64 = 4096;

/// Prometheus families of the semantic-convention instruments, dropped from `/metrics` (which
/// carries the Prometheus client names for the same values).
pub const OTLP_ONLY: &[&str] = &[
    "process_cpu_time_seconds_total",
    "process_memory_usage_bytes",
    "process_memory_virtual_bytes",
    "process_thread_count",
    "process_unix_file_descriptor_count",
    "process_uptime_seconds",
];

/// What `/proc/self/stat` says about the process.
struct Stat {
    user_s: f64,
    system_s: f64,
    threads: u64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

fn read_stat() -> Option<Stat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name (which may hold spaces): utime/stime are
    // fields 14/15, threads 20, vsize 23, rss 24 (pages).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        user_s: num(11)? as f64 / CLOCK_TICKS,
        system_s: num(12)? as f64 / CLOCK_TICKS,
        threads: num(17)?,
        virtual_bytes: num(20)?,
        resident_bytes: num(21)? * PAGE,
    })
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The Prometheus client names the dashboard's "system health" row queries; `/metrics` only.
pub fn register_prometheus(meter: &Meter) {
    // process_cpu_seconds_total
    let _ = meter
        .f64_observable_counter("process.cpu")
        .with_unit("s")
        .with_description("User and system CPU time")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.user_s + s.system_s, &[]);
            }
        })
        .build();
    // process_resident_memory_bytes
    let _ = meter
        .u64_observable_gauge("process.resident_memory")
        .with_unit("By")
        .with_description("Resident set size")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.resident_bytes, &[]);
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
            if let Some(s) = read_stat() {
                o.observe(s.threads, &[]);
            }
        })
        .build();
}

/// OpenTelemetry's process semantic conventions (OTLP; left out of `/metrics`).
pub fn register_semconv(meter: &Meter) {
    let started = Instant::now();
    let _ = meter
        .f64_observable_counter("process.cpu.time")
        .with_unit("s")
        .with_description("Total CPU seconds broken down by mode")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.user_s, &[KeyValue::new("cpu.mode", "user")]);
                o.observe(s.system_s, &[KeyValue::new("cpu.mode", "system")]);
            }
        })
        .build();
    let stat_gauge =
        |name: &'static str, unit: &'static str, desc: &'static str, f: fn(&Stat) -> u64| {
            let _ = meter
                .i64_observable_up_down_counter(name)
                .with_unit(unit)
                .with_description(desc)
                .with_callback(move |o| {
                    if let Some(s) = read_stat() {
                        o.observe(f(&s) as i64, &[]);
                    }
                })
                .build();
        };
    stat_gauge(
        "process.memory.usage",
        "By",
        "The amount of physical memory in use",
        |s| s.resident_bytes,
    );
    stat_gauge(
        "process.memory.virtual",
        "By",
        "The amount of committed virtual memory",
        |s| s.virtual_bytes,
    );
    stat_gauge(
        "process.thread.count",
        "{thread}",
        "Process threads count",
        |s| s.threads,
    );
    let _ = meter
        .i64_observable_up_down_counter("process.unix.file_descriptor.count")
        .with_unit("{file_descriptor}")
        .with_description("Number of unix file descriptors in use by the process")
        .with_callback(|o| {
            if let Some(n) = open_fds() {
                o.observe(n as i64, &[]);
            }
        })
        .build();
    let _ = meter
        .f64_observable_gauge("process.uptime")
        .with_unit("s")
        .with_description("The time the process has been running")
        .with_callback(move |o| o.observe(started.elapsed().as_secs_f64(), &[]))
        .build();
}

/// The tokio runtime's stable metrics (`philotes_runtime_*`), on both readers. The handle is
/// captured now, because callbacks run on exporter threads outside the runtime.
pub fn register_runtime(meter: &Meter) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let h = handle.clone();
    let _ = meter
        .u64_observable_gauge("philotes.runtime.tasks")
        .with_description("Alive tokio tasks")
        .with_callback(move |o| o.observe(h.metrics().num_alive_tasks() as u64, &[]))
        .build();
    let h = handle.clone();
    let _ = meter
        .u64_observable_gauge("philotes.runtime.workers")
        .with_description("Worker threads of the tokio runtime")
        .with_callback(move |o| o.observe(h.metrics().num_workers() as u64, &[]))
        .build();
    let h = handle.clone();
    let _ = meter
        .u64_observable_gauge("philotes.runtime.global_queue_depth")
        .with_description("Tasks waiting in the runtime's global (injection) queue")
        .with_callback(move |o| o.observe(h.metrics().global_queue_depth() as u64, &[]))
        .build();
    let _ = meter
        .f64_observable_counter("philotes.runtime.busy")
        .with_unit("s")
        .with_description("Time the runtime's workers spent polling tasks, summed over workers")
        .with_callback(move |o| {
            let m = handle.metrics();
            let busy: f64 = (0..m.num_workers())
                .map(|w| m.worker_total_busy_duration(w).as_secs_f64())
                .sum();
            o.observe(busy, &[]);
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat() {
        let s = read_stat().expect("/proc/self/stat parses");
        assert!(s.threads >= 1);
        assert!(s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes);
    }
}
