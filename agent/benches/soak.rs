//! Soak benchmark: a steady trickle of one-row transactions, one Iceberg commit each
//! `flush_interval`, for 20,000 commits with the agent's own maintenance on. Every 1,000
//! commits it prints the mean commit time of those commits (from the agent's
//! `philotes_iceberg_commit_duration_seconds`), the current metadata.json size, the metadata
//! files on disk, the data files on disk and in the current snapshot, and the agent's RSS;
//! at the end the ratios against the targets of the table-health issue. It never asserts.
//!
//! `cargo bench --bench soak` runs 20,000 commits (`-- --commits=N` for another count);
//! `-- --mirror` soaks a mirror table instead (`mode = "mirror"`): the trickle then updates,
//! deletes and re-inserts rows of a fixed key set, so every commit adds position deletes,
//! and the mirror's delete files and key index are printed too. `cargo test --benches` runs
//! a few hundred to check the harness.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use philotes::demo::postgres::{free_port, LocalPgOptions, LocalPostgres};

fn psql(pg: &LocalPostgres, sql: &str) {
    let st = Command::new("psql")
        .arg(pg.conninfo("soak"))
        .args(["-q", "-X", "-c", sql])
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(st.success(), "psql: {sql}");
}

/// Sum of the samples of `name` in a scrape.
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn scrape(port: u16) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    })
}

fn streaming(port: u16) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}/api/v1/pipelines/soak");
        match reqwest::get(url).await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v["state"] == "streaming"),
            Err(_) => false,
        }
    })
}

/// A field of `/proc/<pid>/status` in MB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS")
}

/// (bytes of the newest metadata.json, metadata files on disk, Parquet files on disk, Avro
/// files (manifests and manifest lists) on disk).
fn table_files(table_dir: &Path) -> (u64, usize, usize, usize) {
    let meta = table_dir.join("metadata");
    let mut newest: Option<(u64, u64)> = None;
    let mut count = 0;
    let mut avro = 0;
    for e in std::fs::read_dir(&meta).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".avro") {
            avro += 1;
        }
        if let Some(stem) = name.strip_suffix(".metadata.json") {
            count += 1;
            let v: u64 = stem
                .split('-')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            if newest.is_none_or(|(nv, _)| v > nv) {
                newest = Some((v, size));
            }
        }
    }
    let mut parquet = 0;
    let mut dirs = vec![table_dir.join("data")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else if e.path().extension().is_some_and(|x| x == "parquet") {
                parquet += 1;
            }
        }
    }
    (newest.map(|(_, s)| s).unwrap_or(0), count, parquet, avro)
}

/// Cumulative counts of the commit-duration histogram by upper bound (seconds).
fn commit_buckets(scrape: &str) -> Vec<(f64, f64)> {
    let name = "philotes_iceberg_commit_duration_seconds_bucket{";
    let mut out: Vec<(f64, f64)> = Vec::new();
    for l in scrape.lines().filter(|l| l.starts_with(name)) {
        let le = l
            .split(",le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(|v| {
                if v == "+Inf" {
                    f64::INFINITY
                } else {
                    v.parse().unwrap_or(f64::NAN)
                }
            });
        let n = l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok());
        if let (Some(le), Some(n)) = (le, n) {
            match out.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += n,
                None => out.push((le, n)),
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The bucket bound holding the 99th percentile of the commits between two scrapes.
fn p99_ms(before: &[(f64, f64)], now: &[(f64, f64)]) -> f64 {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, n)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
            (*le, n - b)
        })
        .collect();
    let total = delta.last().map_or(0.0, |x| x.1);
    delta
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

struct Row {
    commits: u64,
    mean_ms: f64,
    p99_ms: f64,
    metadata_kb: f64,
    metadata_files: usize,
    live_files: f64,
    files_on_disk: usize,
    avro: usize,
    snapshots: f64,
    delete_files: f64,
    index_keys: f64,
    rss: f64,
}

/// Keys the mirror soak's trickle changes (copied first, then updated, deleted, inserted).
const MIRROR_KEYS: u64 = 5_000;

/// The trickle's `i`-th statement: an insert (changelog), or a change of a key of a fixed set
/// (mirror): mostly updates, some deletes and upserts, keys drawn by a fixed LCG.
fn statement(mirror: bool, i: u64) -> String {
    if !mirror {
        return format!("INSERT INTO trickle (n, s) VALUES ({i}, 'row {i}');");
    }
    let r = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        >> 33;
    let k = r % MIRROR_KEYS + 1;
    match (r / MIRROR_KEYS) % 20 {
        0..=13 => format!("UPDATE trickle SET n = n + 1, s = 'row {i}' WHERE id = {k};"),
        14..=16 => format!("DELETE FROM trickle WHERE id = {k};"),
        _ => format!(
            "INSERT INTO trickle (id, n, s) VALUES ({k}, {i}, 'row {i}') \
             ON CONFLICT (id) DO UPDATE SET n = excluded.n, s = excluded.s;"
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let commits: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--commits="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 300 } else { 20_000 });
    let every = if quick { 100 } else { 1_000 };
    let metadata_versions = 10;
    // `--no-maintenance`: the same trickle with `[maintenance] enabled = false`, for an A/B
    // of what maintenance costs (and what growth is the stream's own).
    let maintenance = !args.iter().any(|a| a == "--no-maintenance");
    let mirror = args.iter().any(|a| a == "--mirror");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_philotes"));
    let tmp = tempfile::Builder::new()
        .prefix("philotes-soak")
        .tempdir()
        .unwrap();
    // Synchronous commit (cheap with fsync off): the walsender sends only flushed WAL, so with
    // asynchronous commit the stream arrives in wal_writer_delay bursts and the trickle made
    // ~1.5 commits/s instead of one per flush_interval.
    let mut opts = LocalPgOptions::default();
    opts.settings
        .push(("synchronous_commit".into(), "on".into()));
    let pg = LocalPostgres::start(&tmp.path().join("pg"), &opts).expect("start PostgreSQL");
    Command::new("psql")
        .arg(pg.conninfo("postgres"))
        .args(["-q", "-c", "CREATE DATABASE soak"])
        .status()
        .unwrap();
    psql(
        &pg,
        "CREATE TABLE trickle (id bigserial PRIMARY KEY, n int, s text)",
    );
    if mirror {
        psql(
            &pg,
            &format!(
                "INSERT INTO trickle (id, n, s) SELECT g, 0, 'row 0' FROM generate_series(1, {MIRROR_KEYS}) g"
            ),
        );
    }
    let (mode, snapshot) = if mirror {
        ("mirror", "initial")
    } else {
        ("changelog", "never")
    };
    let port = free_port().unwrap();
    let wh = tmp.path().join("wh");
    std::fs::create_dir_all(&wh).unwrap();
    // A commit every 20 ms (as fast as commits go): 20,000 commits in minutes, not hours.
    // Retention scaled to that pace: 30 s of snapshots here is ~750, what 1 h holds at one
    // commit every ~5 s.
    let cfg = format!(
        "[api]\nlisten = \"127.0.0.1:{port}\"\n[telemetry]\nlog_level = \"warn\"\n\
         [iceberg]\nuri = \"sqlite://{w}/catalog.db\"\nwarehouse = \"{w}/warehouse\"\n\
         [maintenance]\nenabled = {maintenance}\ninterval = \"5s\"\nsnapshot_retention = \"30s\"\nretain_last = 10\nmetadata_versions = {metadata_versions}\n\
         [[pipelines]]\nname = \"soak\"\nsource = \"{}\"\ntables = [\"trickle\"]\nnamespace = \"soak\"\nflush_interval = \"20ms\"\nmode = \"{mode}\"\nsnapshot = \"{snapshot}\"\n",
        pg.url("soak", None),
        w = wh.display(),
    );
    std::fs::write(wh.join("philotes.toml"), cfg).unwrap();
    // `PHILOTES_SOAK_WRAP="heaptrack -o /tmp/soak"` runs the agent under a profiler. The bench
    // then kills the wrapper, not the agent: stop `philotes run` yourself afterwards.
    let wrap: Vec<String> = std::env::var("PHILOTES_SOAK_WRAP")
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let mut child = cmd
        .args(["run", "--config"])
        .arg(wh.join("philotes.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(wh.join("agent.log")).unwrap())
        .spawn()
        .expect("spawn philotes");
    let pid = child.id();
    // Wait for the API, then for streaming.
    let started = Instant::now();
    while !streaming(port) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "agent did not start streaming"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The trickle: one-row transactions, a few per flush.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let conninfo = pg.conninfo("soak");
        std::thread::spawn(move || {
            let mut psql = Command::new("psql")
                .arg(conninfo)
                .args(["-q", "-X"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("psql");
            let mut stdin = psql.stdin.take().unwrap();
            use std::io::Write;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if writeln!(stdin, "{}", statement(mirror, i)).is_err() {
                    break;
                }
                let _ = stdin.flush();
                std::thread::sleep(Duration::from_millis(4));
            }
            drop(stdin);
            let _ = psql.wait();
        })
    };
    let table_dir = wh.join("warehouse/soak/trickle");
    println!(
        "philotes soak benchmark ({} mode, {mode} table): {commits} commits, flush_interval 20ms, {}",
        if quick { "quick" } else { "full" },
        if maintenance {
            format!("maintenance every 5s (retention 30s, retain_last 10, metadata_versions {metadata_versions})")
        } else {
            "maintenance off".to_string()
        }
    );
    println!(
        "{:>8} {:>12} {:>10} {:>14} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "commits",
        "mean ms",
        "p99 ≤ ms",
        "metadata kB",
        "md files",
        "live files",
        "files disk",
        "avro disk",
        "snapshots",
        "del files",
        "index keys",
        "RSS MB"
    );
    let mut rows: Vec<Row> = Vec::new();
    let (mut last_sum, mut last_count) = (0.0, 0.0);
    let mut last_buckets: Vec<(f64, f64)> = Vec::new();
    let mut next = every;
    let deadline = Instant::now() + Duration::from_secs(if quick { 300 } else { 4 * 3600 });
    let mut rss_start = 0.0;
    // RSS is anonymous memory (the heap) plus the pages of the binary and libraries in use:
    // code that first runs later (maintenance reads Parquet and Avro) adds file pages that are
    // not memory the agent allocated.
    let (mut anon_start, mut file_start) = (0.0, 0.0);
    let (mut anon_end, mut file_end) = (0.0, 0.0);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = scrape(port);
        let count = metric(&s, "philotes_iceberg_commit_duration_seconds_count");
        if rss_start == 0.0 && count >= 1.0 {
            rss_start = rss_mb(pid);
            anon_start = status_mb(pid, "RssAnon");
            file_start = status_mb(pid, "RssFile");
        }
        if count < next as f64 {
            if Instant::now() > deadline {
                println!("stopped at the deadline after {count} commits");
                break;
            }
            continue;
        }
        let sum = metric(&s, "philotes_iceberg_commit_duration_seconds_sum");
        let buckets = commit_buckets(&s);
        let (md_bytes, md_files, on_disk, avro) = table_files(&table_dir);
        let row = Row {
            commits: count as u64,
            mean_ms: (sum - last_sum) / (count - last_count).max(1.0) * 1000.0,
            p99_ms: p99_ms(&last_buckets, &buckets),
            metadata_kb: md_bytes as f64 / 1024.0,
            metadata_files: md_files,
            live_files: metric(&s, "philotes_iceberg_table_data_files"),
            files_on_disk: on_disk,
            avro,
            snapshots: metric(&s, "philotes_iceberg_table_snapshots"),
            delete_files: metric(&s, "philotes_iceberg_table_delete_files"),
            index_keys: metric(&s, "philotes_mirror_index_keys"),
            rss: rss_mb(pid),
        };
        (anon_end, file_end) = (status_mb(pid, "RssAnon"), status_mb(pid, "RssFile"));
        println!(
            "{:>8} {:>12.2} {:>10} {:>14.1} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8.1}",
            row.commits,
            row.mean_ms,
            row.p99_ms,
            row.metadata_kb,
            row.metadata_files,
            row.live_files,
            row.files_on_disk,
            row.avro,
            row.snapshots,
            row.delete_files,
            row.index_keys,
            row.rss
        );
        last_sum = sum;
        last_count = count;
        last_buckets = buckets;
        rows.push(row);
        next += every;
        if count >= commits as f64 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let _ = child.kill();
    let _ = child.wait();
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let max_md = rows.iter().map(|r| r.metadata_kb).fold(0.0, f64::max);
        let max_files = rows.iter().map(|r| r.metadata_files).max().unwrap_or(0);
        let max_live = rows
            .iter()
            .skip(1)
            .map(|r| r.live_files)
            .fold(0.0, f64::max);
        println!(
            "mean commit time, last {every} ÷ first {every}: {:.2} (target ≤ 1.5)",
            last.mean_ms / first.mean_ms.max(0.001)
        );
        // The first thousand fills the table up to its retained snapshots; the trend after it
        // shows whether commit time still grows with history (the ratio alone is noisy on a
        // shared machine).
        let steady: Vec<(f64, f64)> = rows
            .iter()
            .skip(1)
            .map(|r| (r.commits as f64 / 1000.0, r.mean_ms))
            .collect();
        if steady.len() >= 3 {
            let n = steady.len() as f64;
            let (mx, my) = (
                steady.iter().map(|p| p.0).sum::<f64>() / n,
                steady.iter().map(|p| p.1).sum::<f64>() / n,
            );
            let cov: f64 = steady.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
            let var: f64 = steady.iter().map(|p| (p.0 - mx).powi(2)).sum();
            println!(
                "mean commit time after the first {every}: {my:.2} ms on average, trend {:+.3} ms per 1,000 commits",
                cov / var.max(f64::EPSILON)
            );
            let (lo, hi) = rows.iter().skip(1).fold((f64::MAX, 0.0f64), |(lo, hi), r| {
                (lo.min(r.rss), hi.max(r.rss))
            });
            println!("RSS after the first {every}: {lo:.1} to {hi:.1} MB");
        }
        println!("largest metadata.json: {max_md:.0} kB (target ≤ 1024)");
        println!(
            "most metadata files on disk: {max_files} (target ≤ metadata_versions + 5 = {})",
            metadata_versions + 5
        );
        println!(
            "most data files in the current snapshot after the first interval: {max_live:.0} (one partition; target ≤ 50)"
        );
        if mirror {
            let max_deletes = rows
                .iter()
                .skip(1)
                .map(|r| r.delete_files)
                .fold(0.0, f64::max);
            println!(
                "most delete files in the current snapshot after the first interval: {max_deletes:.0}; index keys {:.0} → {:.0} ({MIRROR_KEYS} keys changed)",
                first.index_keys, last.index_keys
            );
        }
        println!(
            "RSS growth: {:.1} MB ({:.1} → {:.1}; target ≤ 20)",
            last.rss - rss_start,
            rss_start,
            last.rss
        );
        println!(
            "of which anonymous memory {anon_start:.1} → {anon_end:.1} MB ({:+.1}), file-backed pages (code, libraries) {file_start:.1} → {file_end:.1} MB ({:+.1})",
            anon_end - anon_start,
            file_end - file_start
        );
    }
    if quick {
        println!("quick mode: harness checked, figures not meaningful");
    }
}
