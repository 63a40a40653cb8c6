//! Throughput benchmark: the agent against PostgreSQL's own decoding speed, in one run.
//!
//! For each workload the changes are made once; then, alternating, `pg_recvlogical` (the
//! baseline: what the walsender can stream) and the agent (until every change is committed in
//! Iceberg and confirmed to its slot) each consume them from a fresh slot created before the
//! changes. Medians, min/max, rows/s and the ratio agent/baseline are printed, with the agent's
//! peak RSS and CPU seconds, and the telemetry overhead (all on ÷ `OTEL_SDK_DISABLED`).
//!
//! `cargo bench --bench throughput` runs the full set (1M rows); `-- --quick` or running it as
//! a test (`cargo test --benches`) uses small workloads and only checks that the harness works.
//! It never asserts timings.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use philotes::demo::postgres::{free_port, LocalPgOptions, LocalPostgres};

struct Workload {
    name: &'static str,
    rows: u64,
    setup: String,
    changes: Vec<String>,
    table: &'static str,
}

fn workloads(scale: u64) -> Vec<Workload> {
    let five = "CREATE TABLE {t} (id bigint PRIMARY KEY, n int, s text, at timestamptz, d double precision)";
    let txns = 1000.min(scale);
    let per = scale / txns;
    let wide_cols: String = (0..30)
        .map(|i| match i % 5 {
            0 => format!("c{i} bigint"),
            1 => format!("c{i} text"),
            2 => format!("c{i} double precision"),
            3 => format!("c{i} timestamptz"),
            _ => format!("c{i} numeric(12,2)"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let wide_vals: String = (0..30)
        .map(|i| match i % 5 {
            0 => "g".to_string(),
            1 => "md5(g::text)".to_string(),
            2 => "g * 1.5".to_string(),
            3 => "now()".to_string(),
            _ => "(g % 100000) / 100.0".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let row = |from: String, to: String| {
        format!(
            "INSERT INTO {{t}} SELECT g, g % 1000, repeat(chr(97 + (g % 26)::int), 40), now(), g * 0.5 FROM generate_series({from}, {to}) g"
        )
    };
    vec![
        Workload {
            name: "1M rows / 1,000 txns",
            rows: txns * per,
            setup: five.into(),
            changes: (0..txns)
                .map(|i| row((i * per + 1).to_string(), ((i + 1) * per).to_string()))
                .collect(),
            table: "many_txns",
        },
        Workload {
            name: "1M rows / 1 txn",
            rows: scale,
            setup: five.into(),
            changes: vec![row("1".into(), scale.to_string())],
            table: "one_txn",
        },
        Workload {
            name: "UPDATE 1M rows",
            rows: scale,
            setup: format!("{five}; {}", row("1".into(), scale.to_string())),
            changes: vec!["UPDATE {t} SET n = n + 1, d = d * 2".into()],
            table: "updates",
        },
        Workload {
            name: "wide (30 cols) 200k rows",
            rows: scale / 5,
            setup: format!("CREATE TABLE {{t}} (id bigint PRIMARY KEY, {wide_cols})"),
            changes: vec![format!(
                "INSERT INTO {{t}} SELECT g, {wide_vals} FROM generate_series(1, {}) g",
                scale / 5
            )],
            table: "wide",
        },
    ]
}

fn psql(pg: &LocalPostgres, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .arg(pg.conninfo("bench"))
        .args(["-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn lsn_num(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn confirmed(pg: &LocalPostgres, slot: &str) -> u64 {
    let v = psql(
        pg,
        &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    );
    if v.is_empty() {
        0
    } else {
        lsn_num(&v)
    }
}

/// Accept and answer 200 to anything: an OTLP/HTTP sink so "telemetry on" exports for real.
fn otlp_sink() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                // Read one request (headers + declared body), answer, close.
                let mut data = Vec::new();
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    data.extend_from_slice(&buf[..n]);
                    if let Some(h) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&data[..h]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if data.len() >= h + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    port
}

struct Run {
    secs: f64,
    rss_mb: f64,
    cpu_s: f64,
}

fn proc_stats(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cpu = stat
        .rfind(')')
        .map(|i| {
            let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
            let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let s: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (u + s) / 100.0
        })
        .unwrap_or(0.0);
    (rss_kb / 1024.0, cpu)
}

/// `--unix`: the streaming workloads connect through the server's Unix-domain socket (both
/// `pg_recvlogical` and the agent), as a client on the database host can.
static UNIX_SOCKET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn over_unix() -> bool {
    UNIX_SOCKET.get().copied().unwrap_or(false)
}

/// The streaming workloads' conninfo for `pg_recvlogical`.
fn stream_conninfo(pg: &LocalPostgres) -> String {
    if over_unix() {
        format!(
            "host={} port={} user={} dbname=bench",
            pg.data_dir.display(),
            pg.port,
            pg.user
        )
    } else {
        pg.conninfo("bench")
    }
}

/// The streaming workloads' source URL for the agent.
fn stream_url(pg: &LocalPostgres) -> String {
    if over_unix() {
        format!(
            "postgres://{}@localhost:{}/bench?host={}",
            pg.user,
            pg.port,
            pg.data_dir.display()
        )
    } else {
        pg.url("bench", None)
    }
}

fn run_baseline(pg: &LocalPostgres, slot: &str, end: u64) -> Run {
    let t = Instant::now();
    let status = Command::new("pg_recvlogical")
        .arg("-d")
        .arg(stream_conninfo(pg))
        .args([
            "--slot",
            slot,
            "--start",
            // The protocol the agent uses: large transactions arrive while still running.
            "-o",
            "proto_version=2",
            "-o",
            "streaming=on",
            "-o",
            "publication_names=bench",
            // Every bench table has types the agent streams in binary (`binary = true`).
            "-o",
            "binary=true",
        ])
        .arg("--endpos")
        .arg(format!("{:X}/{:X}", end >> 32, end & 0xffff_ffff))
        .args(["--no-loop", "-f", "/dev/null"])
        .stderr(Stdio::null())
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    Run {
        secs: t.elapsed().as_secs_f64(),
        rss_mb: 0.0,
        cpu_s: 0.0,
    }
}

/// What every agent run shares.
struct Env<'a> {
    bin: &'a Path,
    pg: &'a LocalPostgres,
    dir: &'a Path,
    otlp_port: u16,
}

/// The streaming runs' log level (`--traces` sets `info`: spans on; default `warn`).
static STREAM_LOG_LEVEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn run_agent(env: &Env<'_>, slot: &str, table: &str, end: u64, telemetry: bool) -> Run {
    run_agent_mode(env, slot, table, end, telemetry, "changelog", false)
}

/// [`run_agent`] in table `mode`, keeping the warehouse when `keep` (to start again on it).
fn run_agent_mode(
    env: &Env<'_>,
    slot: &str,
    table: &str,
    end: u64,
    telemetry: bool,
    mode: &str,
    keep: bool,
) -> Run {
    let Env {
        bin,
        pg,
        dir,
        otlp_port,
    } = *env;
    let wh = dir.join(slot);
    let _ = std::fs::remove_dir_all(&wh);
    std::fs::create_dir_all(&wh).unwrap();
    // `--traces`: info level in both runs, so the on run records and exports spans as well.
    let level = STREAM_LOG_LEVEL.get().map_or("warn", String::as_str);
    let tele = if telemetry {
        format!(
            "[telemetry]\nprometheus = true\notlp_endpoint = \"http://127.0.0.1:{otlp_port}\"\nexport_interval = \"1s\"\nlog_level = \"{level}\"\n"
        )
    } else {
        format!("[telemetry]\nprometheus = false\nlog_level = \"{level}\"\n")
    };
    let cfg = format!(
        "{tele}[api]\nlisten = \"127.0.0.1:{}\"\n[iceberg]\nuri = \"sqlite://{}/catalog.db\"\nwarehouse = \"{}/warehouse\"\n\
         [[pipelines]]\nname = \"bench\"\nsource = \"{}\"\nslot = \"{slot}\"\npublication = \"bench\"\ntables = [\"{table}\"]\nflush_interval = \"1s\"\nsnapshot = \"never\"\nmode = \"{mode}\"\n",
        free_port().unwrap(),
        wh.display(),
        wh.display(),
        stream_url(pg),
    );
    let cfg_path = wh.join("philotes.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let t = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(wh.join("agent.log")).unwrap());
    if !telemetry {
        cmd.env("OTEL_SDK_DISABLED", "true");
    }
    let mut child = cmd.spawn().expect("spawn philotes");
    // PHILOTES_BENCH_PROFILE=DIR: the first telemetry-on run of each workload is recorded
    // (`perf record -g -p`, DIR/perf-<table>.data), as the snapshot's first run is.
    let perf = std::env::var_os("PHILOTES_BENCH_PROFILE")
        .filter(|_| telemetry && slot.starts_with("a_") && slot.ends_with("_0"))
        .map(|dir| {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            // PHILOTES_BENCH_PERF_ARGS replaces `record -g -F 999`, e.g. `stat -e
            // syscalls:sys_enter_recvfrom` to count the agent's system calls.
            let args = std::env::var("PHILOTES_BENCH_PERF_ARGS")
                .unwrap_or_else(|_| "record -g -F 999".into());
            Command::new("perf")
                .args(args.split_whitespace())
                .args(["-p", &child.id().to_string(), "-o"])
                .arg(dir.join(format!("perf-{table}.data")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf")
        });
    let deadline = Instant::now() + Duration::from_secs(900);
    while confirmed(pg, slot) < end {
        assert!(
            Instant::now() < deadline,
            "agent did not finish; see {}",
            wh.display()
        );
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "agent exited early ({st}); see {}",
                wh.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t.elapsed().as_secs_f64();
    let (rss_mb, cpu_s) = proc_stats(child.id());
    if let Some(mut p) = perf {
        // SIGINT: perf writes its data out and exits.
        unsafe {
            libc::kill(p.id() as i32, libc::SIGINT);
        }
        let _ = p.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
    if !keep {
        let _ = std::fs::remove_dir_all(wh.join("warehouse"));
    }
    Run {
        secs,
        rss_mb,
        cpu_s,
    }
}

/// Start the agent again on the warehouse of `slot`'s run and read how its mirror key index
/// was rebuilt from the table: (keys, bytes, milliseconds).
fn index_rebuild(env: &Env<'_>, slot: &str) -> (u64, u64, u64) {
    let wh = env.dir.join(slot);
    let cfg_path = wh.join("philotes.toml");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("log_level = \"warn\"", "log_level = \"info\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = wh.join("rebuild.log");
    let mut child = Command::new(env.bin)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn philotes");
    // A table is opened (and its index rebuilt) when its first change arrives.
    psql(env.pg, "UPDATE mir SET n = n WHERE id = 1");
    let deadline = Instant::now() + Duration::from_secs(900);
    let line = loop {
        assert!(
            Instant::now() < deadline,
            "no index rebuild in {}",
            log.display()
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("mirror key index built")) {
            break l.to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(wh.join("warehouse"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or(0)
    };
    (field("keys="), field("index_bytes="), field("build_ms="))
}

/// Mirror ÷ changelog on the same changes: `rows` inserted (100 transactions), then every row
/// updated in one transaction. Then the mirror's key index: bytes per key, rebuild time.
fn mirror_phase(env: &Env<'_>, rows: u64, reps: usize, compare: bool) {
    let pg = env.pg;
    psql(pg, "CREATE TABLE mir (id bigint PRIMARY KEY, n int, s text, at timestamptz, d double precision)");
    psql(pg, "DROP PUBLICATION IF EXISTS bench");
    psql(pg, "CREATE PUBLICATION bench FOR TABLE mir");
    for i in 0..reps {
        for m in ["c", "m"] {
            psql(
                pg,
                &format!("SELECT pg_create_logical_replication_slot('{m}_mir_{i}', 'pgoutput')"),
            );
        }
    }
    let per = rows / 100;
    for t in 0..100 {
        psql(pg, &format!(
            "INSERT INTO mir SELECT g, g % 1000, repeat(chr(97 + (g % 26)::int), 40), now(), g * 0.5 FROM generate_series({}, {}) g",
            t * per + 1, (t + 1) * per
        ));
    }
    psql(pg, "UPDATE mir SET n = n + 1, d = d * 2");
    let end = lsn_num(&psql(pg, "SELECT pg_current_wal_insert_lsn()"));
    let (mut changelog, mut mirror, mut rss) = (Vec::new(), Vec::new(), 0f64);
    let mut index = (0, 0, 0);
    for i in 0..reps {
        if compare {
            let c = run_agent_mode(
                env,
                &format!("c_mir_{i}"),
                "mir",
                end,
                true,
                "changelog",
                false,
            );
            changelog.push(c.secs);
        }
        let m = run_agent_mode(env, &format!("m_mir_{i}"), "mir", end, true, "mirror", true);
        rss = rss.max(m.rss_mb);
        mirror.push(m.secs);
        index = index_rebuild(env, &format!("m_mir_{i}"));
    }
    for i in 0..reps {
        for m in ["c", "m"] {
            psql(
                pg,
                &format!("SELECT pg_drop_replication_slot('{m}_mir_{i}')"),
            );
        }
    }
    let m = median(&mut mirror);
    let events = rows * 2;
    if compare {
        let c = median(&mut changelog);
        println!(
            "mirror: INSERT {}k + UPDATE {}k rows: changelog {c:.2}s ({:.0} rows/s), mirror {m:.2}s ({:.0} rows/s), mirror ÷ changelog throughput {:.2}, mirror peak RSS {rss:.0} MB",
            rows / 1000,
            rows / 1000,
            events as f64 / c,
            events as f64 / m,
            c / m
        );
    } else {
        println!(
            "mirror: INSERT {}k + UPDATE {}k rows: mirror {m:.2}s ({:.0} rows/s), peak RSS {rss:.0} MB",
            rows / 1000,
            rows / 1000,
            events as f64 / m
        );
    }
    let (keys, bytes, ms) = index;
    println!(
        "mirror key index at restart: {keys} keys, {bytes} bytes ({:.1} bytes per key), rebuilt from the table in {ms} ms",
        bytes as f64 / keys.max(1) as f64
    );
    psql(pg, "DROP TABLE mir");
}

/// The Python with PyIceberg and DuckDB (the test venv), if there is one.
fn bench_python() -> Option<PathBuf> {
    let p = std::env::var("PHILOTES_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-test/bin/python"));
    p.exists().then_some(p)
}

/// Start the agent on `slot` (warehouse `dir/slot`, kept if it exists) with `top` above the
/// sections and `pipeline` in the pipeline; returns it and its warehouse directory.
fn spawn_agent(
    env: &Env<'_>,
    slot: &str,
    tables: &str,
    top: &str,
    pipeline: &str,
) -> (std::process::Child, PathBuf) {
    let wh = env.dir.join(slot);
    std::fs::create_dir_all(&wh).unwrap();
    let cfg = format!(
        "{top}[telemetry]\nprometheus = false\nlog_level = \"info\"\n[api]\nlisten = \"127.0.0.1:{}\"\n\
         [iceberg]\nuri = \"sqlite://{}/catalog.db\"\nwarehouse = \"{}/warehouse\"\n\
         [[pipelines]]\nname = \"bench\"\nsource = \"{}\"\nslot = \"{slot}\"\npublication = \"bench\"\n\
         tables = [{tables}]\nsnapshot = \"never\"\n{pipeline}",
        free_port().unwrap(),
        wh.display(),
        wh.display(),
        env.pg.url("bench", None),
    );
    let cfg_path = wh.join("philotes.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(wh.join("agent.log"))
        .unwrap();
    let child = Command::new(env.bin)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("OTEL_SDK_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn philotes");
    (child, wh)
}

/// Wait until `slot` confirmed the WAL written so far, then stop `agent`.
fn drain_and_stop(env: &Env<'_>, slot: &str, mut agent: std::process::Child, wh: &Path) {
    let end = lsn_num(&psql(env.pg, "SELECT pg_current_wal_insert_lsn()"));
    let deadline = Instant::now() + Duration::from_secs(900);
    while confirmed(env.pg, slot) < end {
        assert!(
            Instant::now() < deadline,
            "agent did not finish; see {}",
            wh.display()
        );
        if let Ok(Some(st)) = agent.try_wait() {
            panic!(
                "agent exited early ({st}); see {}",
                wh.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// One `scan_mirror.py` run: its JSON.
fn scan(python: &Path, wh: &Path, table: &str) -> serde_json::Value {
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/py/scan_mirror.py"))
        .arg("--catalog-db")
        .arg(wh.join("catalog.db"))
        .arg("--warehouse")
        .arg(wh.join("warehouse"))
        .args(["--table", table])
        .output()
        .expect("scan_mirror.py");
    assert!(
        out.status.success(),
        "scan_mirror.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scan_mirror.py JSON")
}

/// Full scans of a mirror by PyIceberg and DuckDB after 10 rounds of 10 % random updates (each
/// round in 5 flushes): with maintenance off (the delete debt as it piles up), after the
/// agent's compaction, and of a fresh mirror of the same rows (inserts only).
fn mirror_scan_phase(env: &Env<'_>, rows: u64) {
    let Some(python) = bench_python() else {
        println!(
            "mirror scan: skipped (no Python with PyIceberg and DuckDB; set PHILOTES_TEST_PYTHON)"
        );
        return;
    };
    let pg = env.pg;
    psql(
        pg,
        "CREATE TABLE scan_t (id bigint PRIMARY KEY, n int, s text, d double precision)",
    );
    psql(pg, "CREATE TABLE scan_f (LIKE scan_t INCLUDING ALL)");
    psql(pg, "DROP PUBLICATION IF EXISTS bench");
    psql(pg, "CREATE PUBLICATION bench FOR TABLE scan_t, scan_f");
    for slot in ["scan_dirty", "scan_fresh"] {
        psql(
            pg,
            &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        );
    }
    let per = rows / 10;
    for t in 0..10 {
        psql(pg, &format!(
            "INSERT INTO scan_t SELECT g, g % 1000, repeat(chr(97 + (g % 26)::int), 40), g * 0.5 FROM generate_series({}, {}) g",
            t * per + 1, (t + 1) * per
        ));
    }
    let mirror = "flush_interval = \"200ms\"\nmode = \"mirror\"\n";
    let (agent, wh) = spawn_agent(
        env,
        "scan_dirty",
        "\"public.scan_t\"",
        "[maintenance]\nenabled = false\n",
        mirror,
    );
    for _round in 0..10 {
        for _part in 0..5 {
            psql(
                pg,
                "UPDATE scan_t SET n = n + 1, d = d + 1 WHERE random() < 0.02",
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    drain_and_stop(env, "scan_dirty", agent, &wh);
    let before = scan(&python, &wh, "bench.scan_t");
    // With maintenance on, each commit runs a compaction step: a few one-row commits let it
    // pay the debt (a step reads at most 2 × target_file_size). Inserts, so that the last
    // commits add no delete of their own (the fresh copy below has these rows too).
    let (agent, wh) = spawn_agent(env, "scan_dirty", "\"public.scan_t\"", "", mirror);
    for k in 1..=10 {
        psql(
            pg,
            &format!("INSERT INTO scan_t VALUES ({}, 0, 'x', 0)", rows + k),
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    drain_and_stop(env, "scan_dirty", agent, &wh);
    let after = scan(&python, &wh, "bench.scan_t");
    let compactions = std::fs::read_to_string(wh.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("maintenance: mirror"))
        .count();
    // The same rows, inserted once into a mirror of their own.
    let (agent, fresh_wh) = spawn_agent(env, "scan_fresh", "\"public.scan_f\"", "", mirror);
    for t in 0..10 {
        psql(
            pg,
            &format!(
                "INSERT INTO scan_f SELECT * FROM scan_t WHERE id > {} AND id <= {}",
                t * per,
                (t + 1) * per
            ),
        );
    }
    psql(
        pg,
        &format!(
            "INSERT INTO scan_f SELECT * FROM scan_t WHERE id > {}",
            rows
        ),
    );
    drain_and_stop(env, "scan_fresh", agent, &fresh_wh);
    let fresh = scan(&python, &fresh_wh, "bench.scan_f");
    for slot in ["scan_dirty", "scan_fresh"] {
        psql(pg, &format!("SELECT pg_drop_replication_slot('{slot}')"));
    }
    psql(pg, "DROP TABLE scan_t, scan_f");
    for (v, what) in [(&before, "before"), (&after, "after"), (&fresh, "fresh")] {
        assert_eq!(v["rows"], v["duckdb_rows"], "{what}: readers disagree: {v}");
    }
    assert_eq!(
        before["rows"].as_u64().map(|n| n + 10),
        fresh["rows"].as_u64(),
        "before (10 rows fewer) vs fresh: {before} {fresh}"
    );
    assert_eq!(
        after["rows"], fresh["rows"],
        "after vs fresh: {after} {fresh}"
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    for (v, what) in [
        (&before, "10 rounds of 10 % updates, no compaction"),
        (&after, "the same after compaction"),
        (&fresh, "a fresh mirror of the same rows"),
    ] {
        println!(
            "mirror scan, {what}: {} rows, {} data + {} delete files; PyIceberg {:.3}s, DuckDB {:.3}s",
            v["rows"], v["data_files"], v["delete_files"], f(v, "pyiceberg_s"), f(v, "duckdb_s")
        );
    }
    println!(
        "mirror scan time ÷ fresh mirror: PyIceberg before {:.2}, after {:.2}; DuckDB before {:.2}, after {:.2} ({compactions} compaction steps)",
        f(&before, "pyiceberg_s") / f(&fresh, "pyiceberg_s"),
        f(&after, "pyiceberg_s") / f(&fresh, "pyiceberg_s"),
        f(&before, "duckdb_s") / f(&fresh, "duckdb_s"),
        f(&after, "duckdb_s") / f(&fresh, "duckdb_s"),
    );
}

/// Freshness under steady load: 5k rows/s in 50 transactions/s; for each transaction, the time
/// from its COMMIT returning to the agent confirming (right after its Iceberg commit) a position
/// at or past the WAL insert position read right after it: an upper bound on "visible in
/// Iceberg". Returns sorted latencies (s).
/// How a freshness phase runs.
struct FreshnessRun<'a> {
    seconds: u64,
    flush_interval: &'a str,
    /// Extra config sections (maintenance on, at a pace that makes it work during the run).
    extra: &'a str,
    /// Also read the agent's freshness histogram from `/metrics` once a minute.
    per_minute: bool,
}

/// What a freshness phase measured: per-transaction latency (probe) with its send time in
/// seconds from the start, and the agent's histogram buckets at the end of each minute.
struct Freshness {
    probes: Vec<(f64, f64)>,
    minutes: Vec<std::collections::BTreeMap<u64, (f64, f64)>>,
}

fn freshness(env: &Env<'_>, run: FreshnessRun<'_>) -> Freshness {
    let seconds = run.seconds;
    let pg = env.pg;
    psql(pg, "DROP TABLE IF EXISTS fresh");
    psql(
        pg,
        "CREATE TABLE fresh (id bigint PRIMARY KEY, n int, s text, at timestamptz DEFAULT now())",
    );
    psql(pg, "DROP PUBLICATION IF EXISTS bench");
    psql(pg, "CREATE PUBLICATION bench FOR TABLE fresh");
    let port = free_port().unwrap();
    let wh = env.dir.join(format!("fresh-{}", run.flush_interval));
    let _ = std::fs::remove_dir_all(&wh);
    std::fs::create_dir_all(&wh).unwrap();
    let slot = format!(
        "fresh_{}",
        run.flush_interval
            .replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    let cfg = format!(
        "{extra}[api]\nlisten = \"127.0.0.1:{port}\"\n[telemetry]\nlog_level = \"warn\"\n[iceberg]\nuri = \"sqlite://{w}/catalog.db\"\nwarehouse = \"{w}/warehouse\"\n\
         [[pipelines]]\nname = \"bench\"\nsource = \"{}\"\nslot = \"{slot}\"\npublication = \"bench\"\ntables = [\"fresh\"]\nflush_interval = \"{flush}\"\nsnapshot = \"never\"\n",
        pg.url("bench", None),
        w = wh.display(),
        extra = run.extra,
        flush = run.flush_interval,
    );
    std::fs::write(wh.join("philotes.toml"), cfg).unwrap();
    let mut child = spawn_in(Command::new(env.bin), &wh);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let conninfo = pg.conninfo("bench");
    let lat = rt.block_on(async move {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/api/v1/pipelines/bench");
        let committed = || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let v: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                // The confirmed position moves right after each Iceberg commit (to the end of
                // the last committed transaction), and to the server position when idle.
                Some((lsn_num(v["confirmed_lsn"].as_str()?), v["state"] == "streaming"))
            }
        };
        // Wait until streaming.
        loop {
            if let Some((_, true)) = committed().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let probes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
        let gen_probes = probes.clone();
        let gen = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let start = Instant::now();
            let mut id = 0i64;
            while start.elapsed() < Duration::from_secs(seconds) {
                tick.tick().await;
                client
                    .batch_execute(&format!(
                        "INSERT INTO fresh (id, n, s) SELECT g, g % 100, 'x' FROM generate_series({}, {}) g",
                        id,
                        id + 99
                    ))
                    .await
                    .expect("insert");
                let done = Instant::now();
                id += 100;
                let row = client
                    .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                    .await
                    .expect("lsn");
                gen_probes.lock().unwrap().push((done, lsn_num(row.get::<_, &str>(0))));
            }
        });
        let mut latencies = Vec::new();
        let mut minutes = Vec::new();
        let started = Instant::now();
        let metrics_url = format!("http://127.0.0.1:{port}/metrics");
        let mut next = 0usize;
        let deadline = Instant::now() + Duration::from_secs(seconds + 60);
        while Instant::now() < deadline {
            let finished = gen.is_finished();
            if run.per_minute && started.elapsed().as_secs() >= 60 * (minutes.len() as u64 + 1) {
                if let Ok(r) = http.get(&metrics_url).send().await {
                    if let Ok(text) = r.text().await {
                        minutes.push(philotes::demo::figures::freshness_buckets(&text));
                    }
                }
            }
            if let Some((c, _)) = committed().await {
                let now = Instant::now();
                let p = probes.lock().unwrap();
                while next < p.len() && p[next].1 <= c {
                    latencies.push((
                        p[next].0.duration_since(started).as_secs_f64(),
                        now.duration_since(p[next].0).as_secs_f64(),
                    ));
                    next += 1;
                }
                if finished && next >= p.len() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Freshness {
            probes: latencies,
            minutes,
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    // Its slot would hold WAL for the rest of the run (left alone if the walsender lingers).
    std::thread::sleep(Duration::from_millis(500));
    psql(
        pg,
        &format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"),
    );
    lat
}

/// `cmd` (the agent binary, or a profiler in front of it) running `wh/philotes.toml`, its log
/// in `wh/agent.log`.
fn spawn_in(mut cmd: Command, wh: &Path) -> std::process::Child {
    cmd.args(["run", "--config"])
        .arg(wh.join("philotes.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(wh.join("agent.log")).unwrap())
        .spawn()
        .expect("spawn philotes")
}

/// `p` quantile of sorted `v` (nearest rank).
fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Freshness over time at a short flush interval with maintenance working beside the stream:
/// per minute, the agent's own histogram (p50/p99, interpolated in its buckets) and the probe's
/// per-transaction latency (p50/p99/max, an upper bound: it includes the 20 ms poll).
fn freshness_over_time(env: &Env<'_>, seconds: u64) {
    let f = freshness(
        env,
        FreshnessRun {
            seconds,
            flush_interval: "250ms",
            // Maintenance on, at a pace that makes every action happen inside the run.
            extra: "[maintenance]\ninterval = \"15s\"\nsnapshot_retention = \"2m\"\n",
            per_minute: true,
        },
    );
    println!(
        "freshness over time: 5k rows/s, flush_interval = 250ms, maintenance every 15s (retention 2m), {seconds}s"
    );
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "minute", "txns", "metric p50", "metric p99", "probe p50", "probe p99", "probe max"
    );
    let mut prev = std::collections::BTreeMap::new();
    let (mut worst50, mut worst99) = (0f64, 0f64);
    for (m, cum) in f.minutes.iter().enumerate() {
        let delta: std::collections::BTreeMap<u64, (f64, f64)> = cum
            .iter()
            .map(|(k, (le, c))| (*k, (*le, c - prev.get(k).map_or(0.0, |p: &(f64, f64)| p.1))))
            .collect();
        prev = cum.clone();
        let q = |p| philotes::demo::figures::quantile(p, &delta).unwrap_or(f64::NAN);
        let (lo, hi) = (m as f64 * 60.0, (m + 1) as f64 * 60.0);
        let mut lat: Vec<f64> = f
            .probes
            .iter()
            .filter(|(at, _)| *at >= lo && *at < hi)
            .map(|(_, l)| *l)
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let txns = delta.values().last().map_or(0.0, |v| v.1);
        let (p50, p99) = (q(0.5), q(0.99));
        worst50 = worst50.max(p50);
        worst99 = worst99.max(p99);
        if lat.is_empty() {
            continue;
        }
        println!(
            "{:>6} {:>8.0} {:>11.3}s {:>11.3}s {:>9.3}s {:>9.3}s {:>9.3}s",
            m + 1,
            txns,
            p50,
            p99,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }
    println!(
        "freshness over time: worst minute p50 {worst50:.3}s (target ≤ 0.4), p99 {worst99:.3}s (target ≤ 0.8)"
    );
}

/// One transaction of `rows` rows streamed once by the agent: the memory bound for large
/// transactions (pgoutput v1 sends a transaction only after its commit; the agent hands rows to
/// its data-file writer every `batch_rows`, so its memory must not grow with the transaction).
fn large_txn_phase(env: &Env<'_>, rows: u64) {
    let pg = env.pg;
    psql(pg, "CREATE TABLE huge (id bigint PRIMARY KEY, n int, s text, at timestamptz, d double precision)");
    psql(pg, "DROP PUBLICATION IF EXISTS bench");
    psql(pg, "CREATE PUBLICATION bench FOR TABLE huge");
    psql(
        pg,
        "SELECT pg_create_logical_replication_slot('l_huge', 'pgoutput')",
    );
    psql(
        pg,
        &format!("INSERT INTO huge SELECT g, g % 1000, repeat(chr(97 + (g % 26)::int), 40), now(), g * 0.5 FROM generate_series(1, {rows}) g"),
    );
    let end = lsn_num(&psql(pg, "SELECT pg_current_wal_insert_lsn()"));
    let r = run_agent(env, "l_huge", "huge", end, true);
    println!(
        "{:<26} {:>10} {:>12} {:>10} {:>12.0} {:>7} {:>8.0} {:>7.1}",
        format!("{}M rows / 1 txn", rows as f64 / 1e6),
        "-",
        "-",
        format!("{:.2}", r.secs),
        rows as f64 / r.secs,
        "-",
        r.rss_mb,
        r.cpu_s
    );
    println!("  (agent only: peak RSS for one transaction of {rows} rows; target <= 300 MB)");
    psql(pg, "SELECT pg_drop_replication_slot('l_huge')");
    psql(pg, "DROP TABLE huge");
}

/// The initial snapshot of `rows` rows against `COPY ... TO STDOUT` through psql.
/// The initial snapshot against `COPY`; with `against` (`--against=PATH`) each repetition
/// also runs that build, for a before/after ratio from the same run.
fn snapshot_phase(env: &Env<'_>, against: Option<&Env<'_>>, rows: u64, reps: usize) {
    let pg = env.pg;
    psql(pg, "CREATE TABLE snap (id bigint PRIMARY KEY, n int, s text, at timestamptz, d double precision)");
    psql(
        pg,
        &format!("INSERT INTO snap SELECT g, g % 1000, repeat(chr(97 + (g % 26)::int), 40), now(), g * 0.5 FROM generate_series(1, {rows}) g"),
    );
    psql(pg, "VACUUM ANALYZE snap");
    let (mut copy, mut agent, mut rss) = (Vec::new(), Vec::new(), 0f64);
    let (mut other_runs, mut cpu) = (Vec::new(), Vec::new());
    for i in 0..reps {
        let t = Instant::now();
        let out = Command::new("psql")
            .args(["-X", "-q"])
            .arg(pg.conninfo("bench"))
            .args(["-c", "COPY snap TO STDOUT"])
            .stdout(Stdio::null())
            .status()
            .expect("psql COPY");
        assert!(out.success());
        copy.push(t.elapsed().as_secs_f64());
        // Taking turns going first, as the streaming pairs do.
        if let Some(other) = against.filter(|_| i % 2 == 1) {
            other_runs.push(snapshot_once(other, "snap", rows, &format!("snapo_{i}"), false).0);
        }
        let (secs, peak, cpu_s) = snapshot_once(env, "snap", rows, &format!("snap_{i}"), i == 0);
        agent.push(secs);
        cpu.push(cpu_s);
        rss = rss.max(peak);
        if let Some(other) = against.filter(|_| i % 2 == 0) {
            other_runs.push(snapshot_once(other, "snap", rows, &format!("snapo_{i}"), false).0);
        }
    }
    let c = median(&mut copy);
    let a = median(&mut agent);
    println!(
        "{:<26} {:>10} {:>12.0} {:>10} {:>12.0} {:>7.2} {:>8.0} {:>7.1}",
        format!("snapshot {}k rows", rows / 1000),
        format!("{c:.2}"),
        rows as f64 / c,
        format!("{a:.2}"),
        rows as f64 / a,
        c / a,
        rss,
        median(&mut cpu),
    );
    println!("  (baseline for the snapshot row: psql COPY snap TO STDOUT > /dev/null)");
    if !other_runs.is_empty() {
        let o = median(&mut other_runs);
        println!(
            "  --against build: {o:.2} s; this build ÷ that one (throughput) {:.3}",
            o / a
        );
    }
    psql(pg, "DROP TABLE snap");
}

/// One agent copying `table` (`rows` rows) with `snapshot = "initial"` under slot `slot`: its
/// time until every row is committed and its peak RSS (MB). `first` with
/// PHILOTES_BENCH_PROFILE=DIR records that run with `perf record -g` (DIR/perf.data) and
/// keeps each run's info-level log there: the profiling route of docs/performance.md.
fn snapshot_once(
    env: &Env<'_>,
    table: &str,
    rows: u64,
    slot: &str,
    first: bool,
) -> (f64, f64, f64) {
    let pg = env.pg;
    psql(pg, &format!("DROP PUBLICATION IF EXISTS {slot}"));
    psql(pg, &format!("CREATE PUBLICATION {slot} FOR TABLE {table}"));
    let port = free_port().unwrap();
    let wh = env.dir.join(slot);
    std::fs::create_dir_all(&wh).unwrap();
    let cfg = format!(
        "[api]\nlisten = \"127.0.0.1:{port}\"\n[telemetry]\nlog_level = \"warn\"\n[iceberg]\nuri = \"sqlite://{w}/catalog.db\"\nwarehouse = \"{w}/warehouse\"\n\
         [[pipelines]]\nname = \"bench\"\nsource = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\ntables = [\"{table}\"]\nsnapshot = \"initial\"\n",
        pg.url("bench", None),
        w = wh.display(),
    );
    let profile = std::env::var_os("PHILOTES_BENCH_PROFILE").map(PathBuf::from);
    let cfg = match &profile {
        Some(_) => cfg.replace("log_level = \"warn\"", "log_level = \"info\""),
        None => cfg,
    };
    std::fs::write(wh.join("philotes.toml"), cfg).unwrap();
    let t = Instant::now();
    let cmd = match (&profile, first) {
        (Some(dir), true) => {
            std::fs::create_dir_all(dir).unwrap();
            let mut c = Command::new("perf");
            let args = std::env::var("PHILOTES_BENCH_PERF_ARGS")
                .unwrap_or_else(|_| "record -g -F 999".into());
            c.args(args.split_whitespace())
                .arg("-o")
                .arg(dir.join("perf.data"))
                .arg("--")
                .arg(env.bin);
            c
        }
        _ => Command::new(env.bin),
    };
    let mut child = spawn_in(cmd, &wh);
    let url = format!("http://127.0.0.1:{port}/api/v1/pipelines/bench");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        assert!(Instant::now() < deadline, "snapshot did not finish");
        let done = Command::new("curl")
            .args(["-fsS", &url])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["tables"][format!("public.{table}")]["committed_rows"].as_u64())
            .is_some_and(|n| n >= rows);
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t.elapsed().as_secs_f64();
    let (peak, cpu) = proc_stats(child.id());
    match &profile {
        Some(dir) => {
            // perf writes its file on SIGINT; the agent under it gets the same signal.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
            let _ = std::fs::copy(wh.join("agent.log"), dir.join(format!("{slot}.log")));
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let _ = std::fs::remove_dir_all(&wh);
    std::thread::sleep(Duration::from_millis(500));
    psql(
        pg,
        &format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"),
    );
    psql(pg, &format!("DROP PUBLICATION {slot}"));
    (secs, peak, cpu)
}

/// How cost grows with the work: the same table shape at each size, streamed (transactions of
/// 1,000 rows, so only the volume grows) and then copied by an initial snapshot, `reps` agent
/// runs of each (one slot per streamed run); the median rows/s and peak RSS per size, and the
/// largest size's ÷ the smallest's. With one run per size the ratios moved by ±10 % (stream
/// rows/s 0.880 in session 36's full run, 0.947 in session 38's, 1.100 as a median of three).
fn growth_phase(env: &Env<'_>, sizes: &[u64], reps: usize) {
    let pg = env.pg;
    let reps = reps.max(1);
    println!(
        "growth: streamed (transactions of 1,000 rows) and snapshotted, median of {reps} run(s) per size"
    );
    println!(
        "{:>10} {:>10} {:>12} {:>8} {:>10} {:>12} {:>8}",
        "rows", "stream s", "rows/s", "RSS MB", "snap s", "rows/s", "RSS MB"
    );
    let mut seen = Vec::new();
    for &rows in sizes {
        let t = format!("grow_{}", rows);
        psql(pg, &format!("CREATE TABLE {t} (id bigint PRIMARY KEY, n int, s text, at timestamptz, d double precision)"));
        psql(pg, "DROP PUBLICATION IF EXISTS bench");
        psql(pg, &format!("CREATE PUBLICATION bench FOR TABLE {t}"));
        // Slots first: a logical slot only sees changes made after it exists.
        let slots: Vec<String> = (0..reps).map(|i| format!("g_{rows}_{i}")).collect();
        for slot in &slots {
            psql(
                pg,
                &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
            );
        }
        // Transactions of a fixed size (1,000 rows), so that only the volume grows.
        let per = 1000.min(rows);
        let script = env.dir.join(format!("{t}.sql"));
        let mut sql = String::new();
        for i in 0..rows / per {
            sql.push_str(&format!(
                "INSERT INTO {t} SELECT g, g % 1000, repeat(chr(97 + (g % 26)::int), 40), now(), g * 0.5 FROM generate_series({}, {}) g;\n",
                i * per + 1,
                (i + 1) * per
            ));
        }
        std::fs::write(&script, sql).unwrap();
        let ok = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(pg.conninfo("bench"))
            .arg("-f")
            .arg(&script)
            .stdout(Stdio::null())
            .status()
            .expect("psql -f");
        assert!(ok.success(), "loading {t}");
        let _ = std::fs::remove_file(&script);
        let end = lsn_num(&psql(pg, "SELECT pg_current_wal_insert_lsn()"));
        psql(pg, &format!("VACUUM (ANALYZE) {t}"));
        psql(pg, "CHECKPOINT");
        let (mut st_s, mut st_rss) = (Vec::new(), Vec::new());
        for slot in &slots {
            let st = run_agent(env, slot, &t, end, true);
            psql(pg, &format!("SELECT pg_drop_replication_slot('{slot}')"));
            st_s.push(st.secs);
            st_rss.push(st.rss_mb);
        }
        let (mut sn_s, mut sn_rss) = (Vec::new(), Vec::new());
        for i in 0..reps {
            let (s, rss, _) = snapshot_once(env, &t, rows, &format!("gs_{rows}_{i}"), false);
            sn_s.push(s);
            sn_rss.push(rss);
        }
        let (stream_s, stream_rss) = (median(&mut st_s), median(&mut st_rss));
        let (snap_s, snap_rss) = (median(&mut sn_s), median(&mut sn_rss));
        println!(
            "{:>10} {:>10.2} {:>12.0} {:>8.0} {:>10.2} {:>12.0} {:>8.0}",
            rows,
            stream_s,
            rows as f64 / stream_s,
            stream_rss,
            snap_s,
            rows as f64 / snap_s,
            snap_rss
        );
        if reps > 1 {
            println!(
                "{:>10} runs: stream s [{:.2}-{:.2}], RSS [{:.0}-{:.0}]; snapshot s [{:.2}-{:.2}], RSS [{:.0}-{:.0}]",
                "",
                st_s[0],
                st_s[reps - 1],
                st_rss[0],
                st_rss[reps - 1],
                sn_s[0],
                sn_s[reps - 1],
                sn_rss[0],
                sn_rss[reps - 1],
            );
        }
        seen.push((
            rows as f64 / stream_s,
            stream_rss,
            rows as f64 / snap_s,
            snap_rss,
        ));
        psql(pg, &format!("DROP TABLE {t}"));
    }
    if let (Some(a), Some(b)) = (seen.first(), seen.last()) {
        println!(
            "growth, largest ÷ smallest: stream rows/s {:.3} (target ≥ 0.95), peak RSS {:.3} (target ≤ 1.10); snapshot rows/s {:.3}, peak RSS {:.3}",
            b.0 / a.0,
            b.1 / a.1,
            b.2 / a.2,
            b.3 / a.3
        );
    }
}

/// The middle value; of an even count, the mean of the two middle ones (the upper one alone
/// leaned every even-count median upwards).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n.is_multiple_of(2) => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        _ => v[n / 2],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not: then it is a smoke test.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let (scale, reps) = if quick { (20_000, 1) } else { (1_000_000, 3) };
    if args.iter().any(|a| a == "--traces") {
        let _ = STREAM_LOG_LEVEL.set("info".to_string());
    }
    let _ = UNIX_SOCKET.set(args.iter().any(|a| a == "--unix"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_philotes"));
    let tmp = tempfile::Builder::new()
        .prefix("philotes-bench")
        .tempdir()
        .unwrap();
    let mut opts = LocalPgOptions::default();
    opts.settings.extend([
        ("max_wal_size".to_string(), "20GB".to_string()),
        ("checkpoint_timeout".to_string(), "1h".to_string()),
        ("shared_buffers".to_string(), "512MB".to_string()),
        ("max_replication_slots".to_string(), "64".to_string()),
    ]);
    let pg = LocalPostgres::start(&tmp.path().join("pg"), &opts).expect("start PostgreSQL");
    Command::new("psql")
        .arg(pg.conninfo("postgres"))
        .args(["-q", "-c", "CREATE DATABASE bench"])
        .status()
        .unwrap();
    let otlp_port = otlp_sink();
    println!(
        "philotes throughput benchmark ({} mode): {} rows per workload, {} repetitions, machine: {} cores",
        if quick { "quick" } else { "full" },
        scale,
        reps,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    // `--pairs=N`: telemetry on/off pairs per streaming workload (default: the repetitions).
    let asked: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("--pairs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(reps);
    // On and off take turns going first: with an odd number of pairs one of them goes first
    // once more, and an order effect then leans the median its way (the wide workload's
    // three-pair medians of 0.93 in sessions 20 and 38 had telemetry on first in two pairs).
    let fixed_order = args.iter().any(|a| a == "--fixed-order");
    let pairs = if fixed_order || asked <= 1 || asked.is_multiple_of(2) {
        asked
    } else {
        asked + 1
    };
    if pairs != asked {
        println!("--pairs={asked}: {pairs} pairs, so that each arm goes first equally often");
    }
    if over_unix() {
        println!(
            "--unix: the streaming workloads (baseline and agent) connect through the Unix socket"
        );
    }
    println!(
        "{:<26} {:>10} {:>12} {:>10} {:>12} {:>7} {:>8} {:>7}",
        "workload", "pg s", "pg rows/s", "agent s", "agent rows/s", "ratio", "RSS MB", "CPU s"
    );
    let env = Env {
        bin: &bin,
        pg: &pg,
        dir: tmp.path(),
        otlp_port,
    };
    // `--against=PATH`: the "off" arm runs another build of the agent (PATH) with telemetry
    // on, so the pairs compare two builds (a change's before/after) instead of on and off.
    let against = args
        .iter()
        .find_map(|a| a.strip_prefix("--against="))
        .map(PathBuf::from);
    let env_off = Env {
        bin: against.as_deref().unwrap_or(&bin),
        pg: &pg,
        dir: tmp.path(),
        otlp_port,
    };
    if let Some(path) = &against {
        println!(
            "--against: \"off\" below is {} with telemetry on; ratios read this build ÷ that one",
            path.display()
        );
    }
    let mut overhead: Vec<(f64, f64)> = Vec::new();
    let mut pair_medians: Vec<(&str, f64)> = Vec::new();
    let only_snapshot = args.iter().any(|a| a == "--snapshot-only");
    let mirror_only = args
        .iter()
        .any(|a| a == "--mirror" || a == "--mirror-index" || a == "--mirror-scan");
    // `--only=TEXT`: just the streaming workloads whose name contains TEXT.
    let only = args.iter().find_map(|a| a.strip_prefix("--only="));
    for w in workloads(scale)
        .into_iter()
        .filter(|w| !only_snapshot && !mirror_only && only.is_none_or(|o| w.name.contains(o)))
    {
        let t = w.table;
        for stmt in w.setup.split(';').filter(|s| !s.trim().is_empty()) {
            psql(&pg, &stmt.replace("{t}", t));
        }
        psql(&pg, "DROP PUBLICATION IF EXISTS bench");
        psql(&pg, &format!("CREATE PUBLICATION bench FOR TABLE {t}"));
        // Slots first: a logical slot only sees changes made after it exists.
        let slots: Vec<(String, &str)> = (0..reps)
            .map(|i| (format!("b_{t}_{i}"), "baseline"))
            .chain((0..pairs).flat_map(|i| {
                [
                    (format!("a_{t}_{i}"), "agent"),
                    (format!("o_{t}_{i}"), "agent-notel"),
                ]
            }))
            .collect();
        for (s, _) in &slots {
            psql(
                &pg,
                &format!("SELECT pg_create_logical_replication_slot('{s}', 'pgoutput')"),
            );
        }
        for c in &w.changes {
            psql(&pg, &c.replace("{t}", t));
        }
        let end = lsn_num(&psql(&pg, "SELECT pg_current_wal_insert_lsn()"));
        let (mut base, mut agent, mut notel) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rss, mut cpu, mut notel_cpu) = (0f64, Vec::new(), Vec::new());
        // The changes left dead tuples (1M after the UPDATE): without this, autovacuum ran
        // beside the first repetitions and slowed whichever run came first.
        if !args.iter().any(|a| a == "--no-vacuum") {
            psql(&pg, &format!("VACUUM (ANALYZE) {t}"));
            psql(&pg, "CHECKPOINT");
        }
        let alternate = !fixed_order;
        let mut paired: Vec<(f64, f64)> = Vec::new();
        // Throughput on ÷ off of the pairs where on went first, and of those where off did.
        let (mut on_first_tp, mut off_first_tp) = (Vec::new(), Vec::new());
        for i in 0..reps.max(pairs) {
            if i < reps {
                base.push(run_baseline(&pg, &format!("b_{t}_{i}"), end).secs);
            }
            if i >= pairs {
                continue;
            }
            // Telemetry on and off take turns going first, so neither always gets the colder
            // or the busier moment.
            let on_first = !alternate || i % 2 == 0;
            let mut off_run = None;
            if !on_first {
                off_run = Some(run_agent(
                    &env_off,
                    &format!("o_{t}_{i}"),
                    t,
                    end,
                    against.is_some(),
                ));
            }
            let a = run_agent(&env, &format!("a_{t}_{i}"), t, end, true);
            rss = rss.max(a.rss_mb);
            cpu.push(a.cpu_s);
            agent.push(a.secs);
            let o = match off_run {
                Some(o) => o,
                None => run_agent(&env_off, &format!("o_{t}_{i}"), t, end, against.is_some()),
            };
            notel.push(o.secs);
            notel_cpu.push(o.cpu_s);
            // Each pair ran back to back: its ratio cancels the host's slower drift.
            paired.push((o.secs / a.secs, o.cpu_s / a.cpu_s));
            if on_first {
                on_first_tp.push(o.secs / a.secs);
            } else {
                off_first_tp.push(o.secs / a.secs);
            }
        }
        for (s, _) in &slots {
            psql(&pg, &format!("SELECT pg_drop_replication_slot('{s}')"));
        }
        let (bmin, bmax) = (
            base.iter().cloned().fold(f64::MAX, f64::min),
            base.iter().cloned().fold(0.0, f64::max),
        );
        let (amin, amax) = (
            agent.iter().cloned().fold(f64::MAX, f64::min),
            agent.iter().cloned().fold(0.0, f64::max),
        );
        let b = median(&mut base);
        let a = median(&mut agent);
        let o = median(&mut notel);
        overhead.push((a, o));
        println!(
            "{:<26} {:>10} {:>12.0} {:>10} {:>12.0} {:>7.2} {:>8.0} {:>7.1}",
            w.name,
            format!("{b:.2}"),
            w.rows as f64 / b,
            format!("{a:.2}"),
            w.rows as f64 / a,
            b / a,
            rss,
            median(&mut cpu),
        );
        println!(
            "{:<26} {:>10} {:>12} {:>10} {:>12}",
            "",
            format!("[{bmin:.2}-{bmax:.2}]"),
            "",
            format!("[{amin:.2}-{amax:.2}]"),
            format!("notel {o:.2}s"),
        );
        // Per workload, so that a cost confined to one path (the UPDATE one used to be) shows:
        // throughput from the medians and from the best runs (wall time here moves ±10 % with
        // the shared host), and the agent's CPU seconds, which is what telemetry costs.
        let best = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
        let (c_on, c_off) = (median(&mut cpu), median(&mut notel_cpu));
        println!(
            "{:<26} telemetry on ÷ off: throughput {:.3} (best runs {:.3}), CPU {:.3} ({c_on:.2}s ÷ {c_off:.2}s)",
            "",
            o / a,
            best(&notel) / best(&agent),
            c_on / c_off
        );
        // The figure the overhead target is read from: the median of the back-to-back pairs'
        // ratios (throughput on ÷ off, and CPU off ÷ on, so both read "≥ 1 is free").
        let (mut tp, mut cp): (Vec<f64>, Vec<f64>) = paired.iter().cloned().unzip();
        println!(
            "{:<26} paired median over {} pairs: throughput on ÷ off {:.3} [{:.3}-{:.3}], CPU off ÷ on {:.3}",
            "",
            paired.len(),
            median(&mut tp),
            tp.first().copied().unwrap_or(0.0),
            tp.last().copied().unwrap_or(0.0),
            median(&mut cp),
        );
        if !on_first_tp.is_empty() && !off_first_tp.is_empty() {
            println!(
                "{:<26} by order: on first {:.3} ({} pairs), off first {:.3} ({} pairs)",
                "",
                median(&mut on_first_tp),
                on_first_tp.len(),
                median(&mut off_first_tp),
                off_first_tp.len(),
            );
        }
        pair_medians.push((w.name, median(&mut tp)));
        psql(&pg, &format!("DROP TABLE {t}"));
    }
    if only.is_none() && !mirror_only {
        snapshot_phase(
            &env,
            against.as_ref().map(|_| &env_off),
            if quick { 20_000 } else { 2_000_000 },
            reps,
        );
    }
    // `--mirror`: only this phase (plus `--mirror-rows=N` for the index at other sizes).
    if (!only_snapshot && only.is_none()) || mirror_only {
        let rows = args
            .iter()
            .find_map(|a| a.strip_prefix("--mirror-rows="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 20_000 } else { scale });
        // `--mirror-index`: the mirror alone, once (for the index at a large `--mirror-rows`).
        if args.iter().any(|a| a == "--mirror-index") {
            mirror_phase(&env, rows, 1, false);
        } else if !args.iter().any(|a| a == "--mirror-scan") {
            mirror_phase(&env, rows, reps, true);
        }
        if !args.iter().any(|a| a == "--mirror-index") {
            mirror_scan_phase(&env, rows);
        }
    }
    if (!only_snapshot && !mirror_only && only.is_none()) || args.iter().any(|a| a == "--large-txn")
    {
        large_txn_phase(&env, if quick { 50_000 } else { 5_000_000 });
    }
    let mut lat: Vec<f64> = if only.is_none() && !mirror_only {
        freshness(
            &env,
            FreshnessRun {
                seconds: if quick { 3 } else { 20 },
                flush_interval: "1s",
                extra: "",
                per_minute: false,
            },
        )
        .probes
        .into_iter()
        .map(|(_, l)| l)
        .collect()
    } else {
        Vec::new()
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    // `--growth[=N,N,…]`: 1M / 5M / 10M rows streamed and snapshotted (quick: 10k / 50k).
    if let Some(arg) = args.iter().find(|a| a.starts_with("--growth")) {
        let sizes: Vec<u64> = arg
            .strip_prefix("--growth=")
            .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_else(|| {
                if quick {
                    vec![10_000, 50_000]
                } else {
                    vec![1_000_000, 5_000_000, 10_000_000]
                }
            });
        growth_phase(&env, &sizes, reps);
    }
    // `--freshness-long[=SECONDS]`: the 10-minute phase at a 250 ms flush (quick: 65 s, so the
    // harness reads one minute).
    if let Some(arg) = args.iter().find(|a| a.starts_with("--freshness-long")) {
        let secs = arg
            .strip_prefix("--freshness-long=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 65 } else { 600 });
        freshness_over_time(&env, secs);
    }
    if !lat.is_empty() {
        let pct = |q: f64| pct(&lat, q);
        println!(
            "freshness at flush_interval=1s, 5k rows/s (commit in PG -> committed in Iceberg, upper bound): p50 {:.2}s p99 {:.2}s over {} transactions",
            pct(0.5),
            pct(0.99),
            lat.len()
        );
    }
    let on: f64 = overhead.iter().map(|(a, _)| a).sum();
    let off: f64 = overhead.iter().map(|(_, o)| o).sum();
    if !overhead.is_empty() {
        println!(
            "telemetry overhead: throughput on / off = {:.3} (total agent time on {on:.2}s, off {off:.2}s)",
            off / on
        );
        let worst =
            pair_medians
                .iter()
                .cloned()
                .fold(("", f64::MAX), |w, p| if p.1 < w.1 { p } else { w });
        println!(
            "telemetry overhead, paired medians: lowest workload {:.3} ({})",
            worst.1, worst.0
        );
    }
    println!("ratio = agent rows/s ÷ pg_recvlogical rows/s (same changes, same run)");
    if quick {
        println!("quick mode: harness checked, timings not meaningful");
    }
}
