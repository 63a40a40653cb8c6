//! Faults survived and nothing lost: a crash loop, PostgreSQL restarts, a locked catalog, a
//! second agent on the same slot, verify-full TLS, and secrets kept out of every output.
//! Every test is bounded in time and uses a fixed seed; each prints one line of figures
//! (`fault | runs | lost | duplicated | recovery`) for docs/reliability.md.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use philotes::demo::postgres::LocalPgOptions;

/// A small deterministic generator (xorshift), so every run makes the same workload.
pub struct Rng(pub u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One transaction of the mixed workload: `inserts` new rows, updates and deletes of live rows.
pub fn mixed_txn(rng: &mut Rng, next: &mut i64, live: &mut Vec<i64>, ops: &mut [u64; 3]) -> String {
    let mut sql = String::from("BEGIN;");
    let inserts = 80;
    sql.push_str(&format!(
        "INSERT INTO m SELECT g, 0, md5(g::text) FROM generate_series({}, {}) g;",
        *next,
        *next + inserts - 1
    ));
    live.extend(*next..*next + inserts);
    *next += inserts;
    ops[0] += inserts as u64;
    let mut touched = BTreeSet::new();
    for _ in 0..15 {
        touched.insert(live[rng.below(live.len() as u64) as usize]);
    }
    sql.push_str(&format!(
        "UPDATE m SET v = v + 1 WHERE id IN ({});",
        id_list(&touched)
    ));
    ops[1] += touched.len() as u64;
    let mut gone = BTreeSet::new();
    for _ in 0..5 {
        let i = rng.below(live.len() as u64) as usize;
        gone.insert(live.swap_remove(i));
    }
    sql.push_str(&format!("DELETE FROM m WHERE id IN ({});", id_list(&gone)));
    ops[2] += gone.len() as u64;
    sql.push_str("COMMIT;");
    sql
}

/// `1,2,3` for an `IN (...)` list.
fn id_list(ids: &BTreeSet<i64>) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

pub const MIXED_DDL: &str = "CREATE TABLE m (id bigint PRIMARY KEY, v int NOT NULL, h text)";

fn figures(fault: &str, runs: usize, lost: i64, dup: i64, recovery: Duration) {
    eprintln!(
        "RELIABILITY | {fault} | {runs} | {lost} | {dup} | {:.1}s",
        recovery.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_five_sigkills_every_change_exactly_once() {
    let (pg, _db, work, cfg) = prepare(MIXED_DDL, &["m"], "batch_rows = 5000", "")
        .await
        .parts();
    let log = work.path().join("agent.log");
    let mut agent = AgentProc::start_streaming(&cfg, &log).await;

    // 2,000 transactions of 100 changes (200k), paced over about 20 s.
    let gen_db = pg.client("app").await;
    let gen = tokio::spawn(async move {
        let mut rng = Rng(0x5eed_1234_abcd);
        let (mut next, mut live, mut ops) = (0i64, Vec::new(), [0u64; 3]);
        for t in 0..2000 {
            let sql = mixed_txn(&mut rng, &mut next, &mut live, &mut ops);
            gen_db.batch_execute(&sql).await.expect("workload");
            if t % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        ops
    });
    let mut rng = Rng(0xc0ffee);
    let mut recoveries = Vec::new();
    let mut kills: Vec<(u64, BTreeSet<u64>)> = Vec::new();
    for k in 0..5usize {
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(2000))).await;
        agent.kill9();
        let confirmed = pg.confirmed_lsn("app", "philotes_p").await;
        let held: BTreeSet<u64> = match iceberg_rows(&work, "ns.m") {
            Some(_) => lsn_set(&verify(&work, "ns.m", &[])),
            None => BTreeSet::new(),
        };
        let restarted = Instant::now();
        agent = AgentProc::start_streaming(&cfg, &log).await;
        recoveries.push(restarted.elapsed());
        kills.push((confirmed, held));
        let _ = k;
    }
    let ops = gen.await.unwrap();
    let total = ops.iter().sum::<u64>();
    assert!(total > 190_000, "about 200k changes: {total}");
    wait_rows_at_least(&work, "ns.m", total, 240).await;
    let v = verify_state(&work, "ns.m", &pg, "SELECT id, v, h FROM m");
    let rows = v["rows"].as_u64().unwrap() as i64;
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);
    assert_eq!(v["ops"]["I"], ops[0]);
    assert_eq!(v["ops"]["U"], ops[1]);
    assert_eq!(v["ops"]["D"], ops[2]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    // At every kill, each transaction Iceberg did not hold yet has a commit LSN at or after the
    // position the slot had confirmed: the slot never confirmed what Iceberg did not hold.
    let all = lsn_set(&v);
    for (i, (confirmed, held)) in kills.iter().enumerate() {
        if let Some(first_missing) = all.difference(held).next() {
            assert!(
                first_missing >= confirmed,
                "kill {i}: slot confirmed {confirmed} past uncommitted transaction {first_missing}"
            );
        }
    }
    let worst = recoveries.iter().max().copied().unwrap_or_default();
    figures(
        "SIGKILL x5 during a 200k-change stream",
        5,
        total as i64 - rows,
        v["duplicates"].as_i64().unwrap(),
        worst,
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate_lose_nothing() {
    let mut opts = LocalPgOptions::default();
    // Committed means durable here: with synchronous_commit=off an immediate shutdown may drop
    // the last acknowledged transactions at the source itself, which is not what is tested.
    opts.settings.retain(|(k, _)| k != "synchronous_commit");
    let p = prepare_with(opts, MIXED_DDL, &["m"], "", "").await;
    let mut agent = p.start_agent();
    let (pg, _db, work, _) = p.parts();
    agent.api = None;
    agent.wait_streaming().await;
    let addr = agent.api_addr().unwrap();
    agent.api = Some(addr.clone());
    let mut rng = Rng(42);
    let (mut next, mut live, mut ops) = (0i64, Vec::new(), [0u64; 3]);
    let mut worst = Duration::ZERO;
    for mode in ["fast", "immediate"] {
        for _ in 0..50 {
            let sql = mixed_txn(&mut rng, &mut next, &mut live, &mut ops);
            pg.client("app").await.batch_execute(&sql).await.unwrap();
        }
        pg.pg.pg_ctl_mode("restart", mode).expect("pg_ctl restart");
        let t = Instant::now();
        for _ in 0..50 {
            let sql = mixed_txn(&mut rng, &mut next, &mut live, &mut ops);
            pg.client("app").await.batch_execute(&sql).await.unwrap();
        }
        agent.wait_streaming().await;
        worst = worst.max(t.elapsed());
    }
    let total = ops.iter().sum::<u64>();
    wait_rows_at_least(&work, "ns.m", total, 120).await;
    let v = verify_state(&work, "ns.m", &pg, "SELECT id, v, h FROM m");
    assert_eq!(v["rows"], total);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let retries = metric_value(&addr, "philotes_cdc_retries_total", "").await;
    assert!(retries >= 2.0, "philotes_cdc_retries_total rose: {retries}");
    figures("pg_ctl restart -m fast and -m immediate", 2, 0, 0, worst);
    assert_eq!(agent.terminate(), Some(0));
}

/// Another process holding an exclusive lock on the SQLite catalog for `secs` seconds,
/// returned once it holds it.
fn lock_catalog(work: &Workdir, secs: u32) -> std::process::Child {
    let code = format!(
        "import sqlite3, time\nc = sqlite3.connect('{}', isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep({secs})\nc.execute('COMMIT')\n",
        work.catalog_db().display()
    );
    let mut locker = Command::new(python())
        .arg("-c")
        .arg(code)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(locker.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
    }
    locker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_catalog_delays_but_loses_nothing() {
    let (_pg, db, work, agent) = running(MIXED_DDL, &["m"], "").await.parts();
    db.batch_execute("INSERT INTO m SELECT g, 0, 'a' FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.m", 1000, 60).await;
    // Another process holds an exclusive lock on the catalog for 20 s.
    let mut locker = lock_catalog(&work, 20);
    let locked_at = Instant::now();
    insert_batches(
        &db,
        "m",
        "g, 0, 'b'",
        2000,
        10,
        100,
        Duration::from_millis(500),
    )
    .await;
    let _ = locker.wait();
    let rss_during = agent.peak_rss();
    wait_rows(&work, "ns.m", 2000, 120).await;
    let recovery = locked_at.elapsed().saturating_sub(Duration::from_secs(20));
    let v = verify(&work, "ns.m", &[]);
    assert_eq!(v["unique"], true);
    assert!(
        rss_during < 300 << 20,
        "RSS bounded while blocked: {} MB",
        rss_during >> 20
    );
    figures(
        "SQLite catalog locked by another process for 20 s",
        1,
        0,
        v["duplicates"].as_i64().unwrap(),
        recovery,
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_while_a_stop_drains_a_blocked_commit() {
    let (_pg, db, work, mut agent) = running(MIXED_DDL, &["m"], "").await.parts();
    let addr = agent.api_addr().expect("api address");
    db.batch_execute("INSERT INTO m SELECT g, 0, 'a' FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.m", 1000, 60).await;
    // Another process holds the catalog for 6 s: the next commit waits for it, so the stop
    // below drains for that long (the pipeline flushes before it stops).
    let mut locker = lock_catalog(&work, 6);
    db.batch_execute("INSERT INTO m SELECT g, 0, 'b' FROM generate_series(1001, 1100) g")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    unsafe {
        libc::kill(agent.pid(), libc::SIGTERM);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Liveness and /metrics stay up while the pipeline drains.
    let http = reqwest::Client::new();
    for path in ["/health/live", "/metrics"] {
        let r = http
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} during the drain: {e}"));
        assert!(
            r.status().is_success(),
            "{path} during the drain: {}",
            r.status()
        );
    }
    // Alive but no longer ready: the agent is on its way out.
    let r = http
        .get(format!("http://{addr}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["reasons"].to_string().contains("shutting down"),
        "readiness during the drain: {v}"
    );
    // A change asked for now would be lost with the process: refused.
    let r = http
        .post(format!("http://{addr}/api/v1/pipelines/p/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "the agent is shutting down");
    assert_eq!(agent.child.try_wait().unwrap(), None, "still draining");
    let _ = locker.wait();
    let status = wait_for(Duration::from_secs(30), "the agent to exit", || {
        let st = agent.child.try_wait().unwrap();
        async move { st }
    })
    .await;
    assert_eq!(status.code(), Some(0), "clean exit after the drain");
    // The drain committed what it held before the exit, and then the API was gone.
    assert_eq!(iceberg_rows(&work, "ns.m"), Some(1100));
    assert!(http
        .get(format!("http://{addr}/health/live"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_slot_fails_fast() {
    let Running {
        pg: _pg,
        db,
        work,
        cfg,
        agent: first,
    } = running(MIXED_DDL, &["m"], "").await;
    db.batch_execute("INSERT INTO m SELECT g, 0, 'a' FROM generate_series(1, 500) g")
        .await
        .unwrap();
    // The same config again: same slot, same catalog and warehouse.
    let t = Instant::now();
    let (code, out) = run_philotes(&["run"], &cfg);
    let took = t.elapsed();
    assert_eq!(code, 2, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("philotes:")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("in use by another consumer"),
        "{}",
        lines[0]
    );
    assert!(took < Duration::from_secs(30), "fails fast: {took:?}");
    db.batch_execute("INSERT INTO m SELECT g, 0, 'b' FROM generate_series(501, 1000) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.m", 1000, 60).await;
    assert_eq!(verify(&work, "ns.m", &[])["unique"], true);
    figures("second agent on the same slot", 1, 0, 0, Duration::ZERO);
    assert_eq!(first.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_tls_and_secrets_never_leak() {
    let pw = "pg-Secret-7731";
    let token = "api-Token-5518";
    let pg = TestPg::start_with(LocalPgOptions {
        password: Some(pw.into()),
        ..LocalPgOptions::default()
    });
    // A CA and a server certificate for 127.0.0.1/localhost signed by it.
    let dir = pg.pg.data_dir.clone();
    let sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=philotes-test-ca -keyout ca.key -out ca.crt 2>/dev/null; \
         openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null; \
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext; \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext -out server.crt 2>/dev/null; \
         openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=other-ca -keyout other.key -out other.crt 2>/dev/null; \
         chmod 600 server.key; cp ca.crt other.crt /tmp/ 2>/dev/null || true",
        d = dir.display()
    );
    let (rc, out) = run_cmd(Command::new("sh").arg("-c").arg(sh));
    assert_eq!(rc, 0, "{out}");
    use_server_cert(&pg);
    let db = pg.create_db("app").await;
    db.batch_execute(MIXED_DDL).await.unwrap();
    let work = Workdir::new();
    let ca = dir.join("ca.crt");
    let other = dir.join("other.crt");
    let url = |root: &std::path::Path| {
        format!(
            // verify-full checks the host name: connect as localhost (the certificate's DNS name).
            "postgres://philotes:{pw}@localhost:{}/app?sslmode=verify-full&sslrootcert={}",
            pg.pg.port,
            root.display()
        )
    };
    let good = work.config(
        &url(&ca),
        &["m"],
        "",
        "[telemetry]\nlog_level = \"trace\"\n",
    );
    let good_text = std::fs::read_to_string(&good).unwrap().replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:0\"\ntoken = \"{token}\""),
        1,
    );
    std::fs::write(&good, &good_text).unwrap();
    let (rc, out) = run_philotes(&["check"], &good);
    assert_eq!(rc, 0, "verify-full with the right CA: {out}");
    let bad = work.path().join("bad.toml");
    std::fs::write(
        &bad,
        good_text.replace(&ca.display().to_string(), &other.display().to_string()),
    )
    .unwrap();
    let (rc, bad_out) = run_philotes(&["check"], &bad);
    assert_eq!(rc, 2, "verify-full with the wrong CA must fail: {bad_out}");
    assert!(
        bad_out.to_lowercase().contains("tls") || bad_out.contains("certificate"),
        "{bad_out}"
    );

    // Stream at trace level with every secret configured; then grep every output.
    let mut agent = AgentProc::start_env(
        &good,
        &work.path().join("agent.log"),
        &[("RUST_LOG", "trace")],
    );
    agent.api = None;
    let addr = wait_for(Duration::from_secs(30), "api address", || async {
        agent.api_addr()
    })
    .await;
    agent.api = Some(addr.clone());
    agent.wait_streaming().await;
    db.batch_execute("INSERT INTO m SELECT g, 0, 'x' FROM generate_series(1, 200) g; INSERT INTO m VALUES (-1, 0, 'y')")
        .await
        .unwrap();
    wait_rows(&work, "ns.m", 201, 60).await;
    let http = reqwest::Client::new();
    let body = |req: reqwest::RequestBuilder| async move {
        req.send().await.unwrap().text().await.unwrap()
    };
    let config = body(
        http.get(format!("http://{addr}/api/v1/config"))
            .bearer_auth(token),
    )
    .await;
    let unauthorized = body(
        http.post(format!("http://{addr}/api/v1/pipelines/p/pause"))
            .bearer_auth("wrong"),
    )
    .await;
    let log = agent.log_text();
    assert_eq!(agent.terminate(), Some(0));
    for (what, text) in [
        ("log", &log),
        ("/api/v1/config", &config),
        ("401 body", &unauthorized),
        ("check output", &bad_out),
    ] {
        for secret in [pw, token] {
            assert!(!text.contains(secret), "{secret} appears in the {what}");
        }
    }
    assert!(log.len() > 10_000, "trace logging really ran");
}

/// A tmpfs mounted on a directory for the test, unmounted on drop (needs root, as CI has).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (rc, out) = run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        );
        assert_eq!(
            rc, 0,
            "mount tmpfs (the storage-fault test needs root): {out}"
        );
        Self(dir.to_path_buf())
    }

    fn remount(&self, opts: &str) {
        let (rc, out) = run_cmd(
            Command::new("mount")
                .args(["-o", &format!("remount,{opts}")])
                .arg(&self.0),
        );
        assert_eq!(rc, 0, "remount {opts}: {out}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// 3,000 rows, every hundredth a NaN (a dead letter).
const PAY: &str = "CREATE TABLE pay (id int PRIMARY KEY, amount numeric(12,2));
     INSERT INTO pay SELECT g, CASE WHEN g % 100 = 0 THEN 'NaN'::numeric ELSE g END
       FROM generate_series(1, 3000) g;";

/// The dead-letter table, and the distinct rows it holds.
fn dead_letters(work: &Workdir) -> (serde_json::Value, BTreeSet<String>) {
    let dlq = verify_dlq(work);
    let ids = dlq["all_rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["row_json"].as_str().unwrap_or_default().to_string())
        .collect();
    (dlq, ids)
}

/// A copy whose chunk cannot be committed after its dead letters landed (the table's data
/// files cannot be written, the dead-letter table's can): every retry used to start another
/// copy, at another point, and append the same dead letters again (one set per attempt).
/// The copy now records its start first and is resumed; each dead letter is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_failing_after_its_dead_letters_stores_each_once() {
    let p = prepare(PAY, &["pay"], "snapshot = \"initial\"", "").await;
    let fs = Tmpfs::mount(&p.work.warehouse().join("ns/pay/data"), "16m");
    fs.remount("ro");
    let (_pg, _db, work, agent) = p.started().parts();
    wait_log_line(&agent.log, "three failed attempts", |l| {
        l.contains("pipeline still failing (attempt 3)")
    })
    .await;
    fs.remount("rw");
    wait_rows(&work, "ns.pay", 2970, 120).await;
    let (dlq, ids) = dead_letters(&work);
    assert_eq!(dlq["rows"], 30, "each NaN row once: {}", dlq["ops"]);
    assert_eq!(ids.len(), 30, "{ids:?}");
    drop(agent);
}

/// The same for a copy taken again (asked through the API), whose truncate marker lands with
/// its first chunk: it is recorded before its dead letters too, marker pending, and resumed
/// with its marker. Mode `both`: the mirror replaces its rows from the recorded point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_taken_again_failing_after_its_dead_letters_stores_each_once() {
    let mut p = prepare(PAY, &["pay"], "mode = \"both\"\nsnapshot = \"initial\"", "").await;
    let port = philotes::demo::postgres::free_port().expect("free port");
    let addr = p.listen_on(port, "");
    let mounts: Vec<Tmpfs> = ["pay", "pay_changelog"]
        .iter()
        .map(|t| Tmpfs::mount(&p.work.warehouse().join(format!("ns/{t}/data")), "16m"))
        .collect();
    let (pg, db, work, agent) = p.started().parts();
    const STATE: &str = "SELECT id, amount FROM pay WHERE amount <> 'NaN'";
    crate::mirror::wait_mirrored_with(&work, "ns.pay", &pg, STATE, "id", &[]).await;
    db.batch_execute("UPDATE pay SET amount = amount + 1 WHERE id % 7 = 0 AND amount <> 'NaN'")
        .await
        .expect("update");
    crate::mirror::wait_mirrored_with(&work, "ns.pay", &pg, STATE, "id", &[]).await;

    for m in &mounts {
        m.remount("ro");
    }
    let r = reqwest::Client::new()
        .post(format!(
            "http://{addr}/api/v1/pipelines/p/tables/public.pay/snapshot"
        ))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    wait_log_line(&agent.log, "three failed attempts", |l| {
        l.contains("pipeline still failing (attempt 3)")
    })
    .await;
    for m in &mounts {
        m.remount("rw");
    }
    wait_for(Duration::from_secs(120), "the copy taken again", || async {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        (log.matches("initial snapshot: committed").count() == 2).then_some(())
    })
    .await;
    let (dlq, ids) = dead_letters(&work);
    assert_eq!(
        dlq["rows"], 60,
        "each NaN row once per copy: {}",
        dlq["ops"]
    );
    assert_eq!(ids.len(), 30, "{ids:?}");
    // The resumed copy kept its marker: the changelog holds it once, then the copy's rows.
    let log = verify(&work, "ns.pay_changelog", &["--pk", "id"]);
    assert_eq!(log["ops"]["T"], 1, "{log}");
    assert_eq!(log["ops"]["R"], 2 * 2970, "{log}");
    let v = crate::mirror::wait_mirrored_with(&work, "ns.pay", &pg, STATE, "id", &[]).await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_full_warehouse_recover_without_loss() {
    let p = prepare(MIXED_DDL, &["m"], "", "").await;
    let fs = Tmpfs::mount(&p.work.warehouse(), "64m");
    let (pg, db, work, agent) = p.streaming().await.parts();
    let mut next = 0i64;
    let mut insert = |n: i64| {
        let sql = format!(
            "INSERT INTO m SELECT g, 0, md5(g::text) || md5((g+1)::text) FROM generate_series({}, {}) g",
            next,
            next + n - 1
        );
        next += n;
        sql
    };
    db.batch_execute(&insert(1000)).await.unwrap();
    wait_rows(&work, "ns.m", 1000, 60).await;

    // Read-only for 20 s while changes keep arriving.
    fs.remount("ro");
    let t = Instant::now();
    for _ in 0..10 {
        db.batch_execute(&insert(200)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    fs.remount("rw");
    let ro_done = Instant::now();
    wait_rows(&work, "ns.m", 3000, 120).await;
    let ro_recovery = ro_done.elapsed();
    assert!(t.elapsed() >= Duration::from_secs(20));

    // Disk full: leave almost no space, stream, then free it.
    let filler = work.warehouse().join("filler.bin");
    let (rc, out) = run_cmd(Command::new("sh").arg("-c").arg(format!(
        "dd if=/dev/zero of={} bs=1M count=64 2>/dev/null; true",
        filler.display()
    )));
    assert_eq!(rc, 0, "{out}");
    for _ in 0..10 {
        db.batch_execute(&insert(2000)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let during = agent.api_json("/api/v1/pipelines/p").await.unwrap();
    // The pipeline fails and retries (so its state alternates); the reason is reported.
    assert!(
        during["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("space"),
        "a full disk shows as the last error: {during}"
    );
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    wait_rows(&work, "ns.m", 23_000, 120).await;
    let full_recovery = freed.elapsed();
    verify_state(&work, "ns.m", &pg, "SELECT id, v, h FROM m");
    let rss = agent.peak_rss();
    assert!(
        rss < 300 << 20,
        "RSS bounded through the faults: {} MB",
        rss >> 20
    );
    let addr = agent.api_addr().unwrap();
    let retried = metric_value(&addr, "philotes_buffer_batches_total", "status=\"retried\"").await;
    assert!(
        retried >= 1.0,
        "batches committed after a failure count as retried: {retried}"
    );
    figures("warehouse read-only for 20 s", 1, 0, 0, ro_recovery);
    figures("warehouse disk full for 20 s", 1, 0, 0, full_recovery);
    assert_eq!(agent.terminate(), Some(0));
    drop(fs);
}

/// Tables of the randomised run: a keyed table with a TOAST column, a composite key, and a
/// `REPLICA IDENTITY FULL` table without a key.
pub const RANDOM_DDL: &str = "
CREATE TABLE a (id bigint PRIMARY KEY, v int, s text, big text);
ALTER TABLE a ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE b (k1 int, k2 text, v float8, PRIMARY KEY (k1, k2));
CREATE TABLE c (x int, y text);
ALTER TABLE c REPLICA IDENTITY FULL;
INSERT INTO a SELECT g, g, 'seed', NULL FROM generate_series(1, 2000) g;";

/// Server settings of the randomised run: large transactions stream while in progress (a
/// small decoding memory) and two-phase transactions are allowed.
pub fn random_pg_options() -> LocalPgOptions {
    let mut opts = LocalPgOptions::default();
    opts.settings.extend([
        ("logical_decoding_work_mem".into(), "64kB".into()),
        ("max_prepared_transactions".into(), "4".into()),
    ]);
    opts
}

/// The randomised run's pipeline: both table modes, a chunked initial copy, small buffers.
pub const RANDOM_PIPELINE: &str = "mode = \"both\"\nsnapshot = \"initial\"\nsnapshot_chunk_rows = 700\nmax_buffer_bytes = \"1MiB\"\nbatch_rows = 500";

/// Maintenance every second beside the randomised run.
pub const RANDOM_MAINTENANCE: &str = "[maintenance]\ninterval = \"1s\"\nmin_input_files = 2\nretain_last = 2\nsnapshot_retention = \"1s\"\nmetadata_versions = 2\ntarget_file_size = \"1MiB\"\ndelete_ratio = 0.2";

/// One random statement of the randomised run.
fn random_statement(rng: &mut Rng, next: &mut i64, s: &str) -> String {
    let id = |rng: &mut Rng, next: i64| 1 + rng.below(next as u64) as i64;
    match rng.below(100) {
        0..=29 => {
            let n = 1 + rng.below(5) as i64;
            let big = if rng.below(10) == 0 { "repeat(md5(g::text), 80)" } else { "NULL" };
            let sql = format!(
                "INSERT INTO a (id, v, {s}, big) SELECT g, g % 100, 'i' || g, {big} FROM generate_series({}, {}) g;",
                *next,
                *next + n - 1
            );
            *next += n;
            sql
        }
        30..=49 => {
            let lo = id(rng, *next);
            format!("UPDATE a SET v = v + 1, {s} = 'u' WHERE id BETWEEN {lo} AND {};", lo + rng.below(5) as i64)
        }
        50..=54 => format!("UPDATE a SET big = repeat(md5(random()::text), 80) WHERE id = {};", id(rng, *next)),
        55..=58 => {
            let sql = format!("UPDATE a SET id = {} WHERE id = {};", *next, id(rng, *next));
            *next += 1;
            sql
        }
        59..=66 => {
            let lo = id(rng, *next);
            format!("DELETE FROM a WHERE id BETWEEN {lo} AND {};", lo + rng.below(3) as i64)
        }
        67..=76 => format!(
            "INSERT INTO b VALUES ({}, '{}', {}) ON CONFLICT (k1, k2) DO UPDATE SET v = EXCLUDED.v;",
            rng.below(200),
            ["p", "q", "r"][rng.below(3) as usize],
            rng.below(1000) as f64 / 7.0
        ),
        77..=80 => format!("DELETE FROM b WHERE k1 = {};", rng.below(200)),
        81..=90 => format!("INSERT INTO c VALUES ({}, 'm'), ({}, 'n');", rng.below(6), rng.below(6)),
        91..=95 => format!(
            "UPDATE c SET x = x + 10 WHERE ctid = (SELECT ctid FROM c WHERE y = '{}' LIMIT 1);",
            ["m", "n"][rng.below(2) as usize]
        ),
        _ => format!(
            "DELETE FROM c WHERE ctid = (SELECT ctid FROM c WHERE x = {} LIMIT 1);",
            rng.below(16)
        ),
    }
}

/// The randomised workload, one transaction per [`RandomWorkload::step`]: savepoints rolled
/// back and released, rolled-back and two-phase transactions (committed and rolled back),
/// large transactions streamed while in progress, TOAST values left unchanged, key changes,
/// `ALTER TABLE` (add, drop, rename) and `TRUNCATE`.
pub struct RandomWorkload {
    /// Seeded randomness, also for the caller's faults.
    pub rng: Rng,
    next: i64,
    s: &'static str,
    added: Vec<String>,
    n: u32,
    /// Transactions run (committed or not).
    pub txns: u32,
    /// Large transactions among them.
    pub streamed: u32,
}

impl RandomWorkload {
    /// A workload on [`RANDOM_DDL`]'s tables.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            next: 2001,
            s: "s",
            added: Vec::new(),
            n: 0,
            txns: 0,
            streamed: 0,
        }
    }

    /// Run one random transaction (or DDL statement) on `db`, then pause up to 30 ms.
    pub async fn step(&mut self, db: &tokio_postgres::Client) {
        self.n += 1;
        let n = self.n;
        let rng = &mut self.rng;
        let roll = rng.below(1000);
        let sql = if roll < 8 {
            // DDL in a transaction of its own.
            match rng.below(3) {
                0 => {
                    self.added.push(format!("c{n}"));
                    format!("ALTER TABLE a ADD COLUMN c{n} int;")
                }
                1 if !self.added.is_empty() => {
                    let i = rng.below(self.added.len() as u64) as usize;
                    format!("ALTER TABLE a DROP COLUMN {};", self.added.swap_remove(i))
                }
                _ => {
                    let to = if self.s == "s" { "s2" } else { "s" };
                    let sql = format!("ALTER TABLE a RENAME COLUMN {} TO {to};", self.s);
                    self.s = to;
                    sql
                }
            }
        } else if roll < 12 {
            "TRUNCATE c;".to_string()
        } else {
            let large = roll < 40;
            self.streamed += u32::from(large);
            let count = if large {
                150 + rng.below(150)
            } else {
                1 + rng.below(8)
            };
            let mut sql = String::from("BEGIN;");
            let mut savepoint = false;
            for _ in 0..count {
                if !savepoint && rng.below(10) == 0 {
                    sql.push_str("SAVEPOINT sp;");
                    savepoint = true;
                }
                sql.push_str(&random_statement(rng, &mut self.next, self.s));
                if savepoint && rng.below(5) == 0 {
                    sql.push_str(if rng.below(2) == 0 {
                        "ROLLBACK TO SAVEPOINT sp;"
                    } else {
                        "RELEASE SAVEPOINT sp;"
                    });
                    savepoint = false;
                }
            }
            match rng.below(100) {
                0..=7 => sql.push_str("ROLLBACK;"),
                8..=12 => {
                    let gid = format!("g{n}");
                    db.batch_execute(&format!("{sql}PREPARE TRANSACTION '{gid}';"))
                        .await
                        .expect("prepare");
                    let end = if rng.below(3) == 0 {
                        "ROLLBACK"
                    } else {
                        "COMMIT"
                    };
                    sql = format!("{end} PREPARED '{gid}';");
                }
                _ => sql.push_str("COMMIT;"),
            }
            sql
        };
        db.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("workload: {e}: {sql}"));
        self.txns += 1;
        let pause = self.rng.below(30);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Make a last change and wait until the agent's slot confirmed it (all of the run is in).
pub async fn wait_confirmed_end(pg: &TestPg, db: &tokio_postgres::Client) {
    db.batch_execute("INSERT INTO b VALUES (-1, 'end', 0)")
        .await
        .expect("last change");
    let end = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .expect("wal position")
        .get::<_, i64>(0) as u64;
    wait_for(
        Duration::from_secs(300),
        "the agent to confirm the last change",
        || async { (pg.confirmed_lsn("app", "philotes_p").await >= end).then_some(()) },
    )
    .await;
}

/// Judge a randomised run through `catalog` (the reader scripts' catalog arguments):
/// `verify_witness.py` on the three changelogs against the `witness` slot, transaction by
/// transaction, and the three mirrors against the tables (PyIceberg and DuckDB).
pub fn assert_run_judged(catalog: &[String], pg: &TestPg, what: &str) {
    let conninfo = pg.conninfo("app");
    let v = read_table_via(
        "verify_witness.py",
        catalog,
        "a=ns.a_changelog,b=ns.b_changelog,c=ns.c_changelog",
        &["--slot", "witness", "--pg-conninfo", &conninfo],
    );
    eprintln!("{what}: {v}");
    assert_eq!(v["duplicate_positions"], 0, "{v}");
    assert_eq!(v["copied_rows"], 2000, "{v}");
    assert_eq!(v["witness_txns"], v["changelog_txns"], "{v}");
    assert_eq!(v["mismatched"], 0, "{v}");
    for (table, key, extra) in RANDOM_MIRRORS {
        let m = crate::mirror::verify_mirror_via(
            catalog,
            &format!("ns.{table}"),
            pg,
            &format!("SELECT * FROM {table}"),
            key,
            extra,
        );
        assert!(
            m["equal"] == true && m["duckdb_equal"] == true,
            "mirror {table}: {m}"
        );
    }
}

/// The three mirrors' keys and `verify_mirror.py` arguments: (table, key, extra).
const RANDOM_MIRRORS: [(&str, &str, &[&str]); 3] = [
    ("a", "id", &[]),
    ("b", "k1,k2", &[]),
    ("c", "x", &["--multiset"]),
];

/// Random transactions while the agent is killed (mostly SIGKILL, sometimes SIGTERM) and
/// restarted every few seconds ([`RandomWorkload`]), with maintenance compacting and expiring
/// beside it. The judge is PostgreSQL's own decoding: a `test_decoding` slot created before
/// the agent's lists each committed transaction's changes, and every changelog must hold
/// exactly those, transaction by transaction (`verify_witness.py`); the mirrors must equal the
/// tables (PyIceberg and DuckDB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_transactions_through_kills_match_postgres_own_decoding() {
    let p = prepare_with(
        random_pg_options(),
        RANDOM_DDL,
        &["a", "b", "c"],
        RANDOM_PIPELINE,
        RANDOM_MAINTENANCE,
    )
    .await;
    p.db.batch_execute("SELECT pg_create_logical_replication_slot('witness', 'test_decoding')")
        .await
        .expect("witness slot");
    let log = p.log();
    let mut agent = p.start_agent();
    let (pg, db, work, cfg) = p.parts();
    agent.wait_streaming().await;

    let mut w = RandomWorkload::new(0x7e57_da7a_5eed);
    let mut kills = 0u32;
    let mut next_kill = Instant::now() + Duration::from_millis(2000 + w.rng.below(4000));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(40) {
        if Instant::now() >= next_kill {
            if w.rng.below(5) == 0 {
                agent.terminate();
            } else {
                agent.kill9();
            }
            tokio::time::sleep(Duration::from_millis(100 + w.rng.below(900))).await;
            agent = AgentProc::start(&cfg, &log);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(2000 + w.rng.below(4000));
        }
        w.step(&db).await;
    }
    if agent.child.try_wait().ok().flatten().is_some() {
        agent = AgentProc::start(&cfg, &log);
    }
    wait_confirmed_end(&pg, &db).await;
    assert_eq!(agent.terminate(), Some(0));

    let catalog = sql_catalog_args(&work.catalog_db(), &work.warehouse());
    let what = format!(
        "random run: {} transactions ({} large), {kills} kills",
        w.txns, w.streamed
    );
    assert!(
        kills >= 5 && w.streamed >= 10,
        "the run did what it is for: {what}"
    );
    assert_run_judged(&catalog, &pg, &what);
    figures(
        "random transactions, SIGKILL/SIGTERM every 2-6 s",
        kills as usize,
        0,
        0,
        Duration::ZERO,
    );
}
