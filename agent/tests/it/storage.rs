//! Production storage against real servers from PyPI: moto's S3 with the SQL catalog, and
//! SeaweedFS (`weed mini`: S3 + Iceberg REST catalog); commit conflicts with a second writer;
//! an S3 outage; and bad credentials / buckets / catalogs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use philotes::demo::postgres::free_port;
use serde_json::{json, Value};

/// A server process in its own process group, killed with the group.
struct Server {
    child: Child,
}

impl Server {
    fn spawn(cmd: &mut Command, log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self { child }
    }

    fn stop(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn venv_bin(name: &str) -> PathBuf {
    python().parent().unwrap().join(name)
}

const KEY: &str = "philotes-test-key";
const SECRET: &str = "philotes-test-secret-9f8e";

fn s3_props(endpoint: &str) -> Value {
    json!({
        "s3.endpoint": endpoint,
        "s3.access-key-id": KEY,
        "s3.secret-access-key": SECRET,
        "s3.region": "us-east-1",
        "s3.path-style-access": "true",
    })
}

fn s3_section(endpoint: &str) -> String {
    format!(
        "[iceberg.s3]\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\naccess_key_id = \"{KEY}\"\nsecret_access_key = \"${{TEST_S3_SECRET}}\"\npath_style = true\n"
    )
}

struct Moto {
    /// Kept for its Drop (the server lives as long as this).
    _server: Server,
    endpoint: String,
}

async fn moto(dir: &Path, bucket: Option<&str>) -> Moto {
    let port = free_port().unwrap();
    let server = Server::spawn(
        Command::new(venv_bin("moto_server")).args(["-H", "127.0.0.1", "-p", &port.to_string()]),
        &dir.join("moto.log"),
    );
    wait_port(port, "moto_server", 60).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    if let Some(b) = bucket {
        let code = format!(
            "import boto3\nboto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{KEY}', \
             aws_secret_access_key='{SECRET}', region_name='us-east-1').create_bucket(Bucket='{b}')\n"
        );
        let (rc, out) = run_cmd(Command::new(python()).arg("-c").arg(code));
        assert_eq!(rc, 0, "create bucket: {out}");
    }
    Moto {
        _server: server,
        endpoint,
    }
}

struct Seaweed {
    server: Server,
    s3: u16,
    rest: u16,
    args: Vec<String>,
    log: PathBuf,
}

impl Seaweed {
    async fn start(dir: &Path, auth: bool) -> Self {
        let data = dir.join("weed");
        std::fs::create_dir_all(&data).unwrap();
        let (s3, rest) = (free_port().unwrap(), free_port().unwrap());
        let mut args = vec![
            "mini".to_string(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.port={s3}"),
            format!("-s3.port.iceberg={rest}"),
            "-s3.port.lance=0".into(),
            format!("-master.port={}", free_port().unwrap()),
            format!("-volume.port={}", free_port().unwrap()),
            format!("-filer.port={}", free_port().unwrap()),
            format!("-webdav.port={}", free_port().unwrap()),
            format!("-admin.port={}", free_port().unwrap()),
            "-admin.ui=false".into(),
            "-tableBucket=iceberg-tables".into(),
            "-bucket=plain".into(),
        ];
        if auth {
            let cfg = dir.join("s3.json");
            std::fs::write(
                &cfg,
                json!({"identities": [{"name": "admin",
                    "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
                .to_string(),
            )
            .unwrap();
            args.push(format!("-s3.config={}", cfg.display()));
        }
        let log = dir.join("weed.log");
        let server = Server::spawn(Command::new(venv_bin("weed")).args(&args), &log);
        let mut w = Self {
            server,
            s3,
            rest,
            args,
            log,
        };
        w.wait_ready().await;
        w
    }

    /// Wait until S3 and the REST catalog answer; respawn a server that died or never came up
    /// (a restart right after SIGKILL can lose a port race), and show its log when it gives up.
    async fn wait_ready(&mut self) {
        for attempt in 1..=3 {
            if self.ready_within(Duration::from_secs(60)).await {
                return;
            }
            eprintln!(
                "seaweed not ready (attempt {attempt}); its log ends with:\n{}",
                self.log_tail()
            );
            self.server.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.server = Server::spawn(Command::new(venv_bin("weed")).args(&self.args), &self.log);
        }
        panic!(
            "seaweed never became ready; its log ends with:\n{}",
            self.log_tail()
        );
    }

    /// True once S3 answers and the REST catalog serves its config; false on timeout or exit.
    async fn ready_within(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let config = format!("http://127.0.0.1:{}/v1/config", self.rest);
        let s3 = format!("http://127.0.0.1:{}/", self.s3);
        while std::time::Instant::now() < deadline {
            if matches!(self.server.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            // HTTP answers, not a bare connect: a connect to a port nobody listens on can
            // succeed against itself (TCP self-connect) and would count as ready.
            let s3_up = reqwest::get(&s3).await.is_ok();
            let rest_up = reqwest::get(&config)
                .await
                .is_ok_and(|r| r.status().is_success());
            if s3_up && rest_up {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// The last lines of the server's stdout and stderr.
    fn log_tail(&self) -> String {
        [self.log.clone(), self.log.with_extension("err")]
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n--- stderr ---\n")
    }

    fn stop(&mut self) {
        self.server.stop();
    }

    async fn restart(&mut self) {
        self.server = Server::spawn(Command::new(venv_bin("weed")).args(&self.args), &self.log);
        self.wait_ready().await;
    }

    /// `verify.py` arguments (table first) that read `ns.t` through the REST catalog.
    fn reader_args(&self) -> Vec<String> {
        let mut args = vec!["ns.t".to_string()];
        args.extend(self.catalog_args());
        args
    }

    /// The reader scripts' arguments that reach this server's REST catalog and S3.
    fn catalog_args(&self) -> Vec<String> {
        vec![
            "--rest-uri".into(),
            format!("http://127.0.0.1:{}", self.rest),
            "--catalog-props".into(),
            s3_props(&format!("http://127.0.0.1:{}", self.s3)).to_string(),
        ]
    }

    fn rest_top(&self) -> String {
        format!(
            "[iceberg]\ncatalog = \"rest\"\nuri = \"http://127.0.0.1:{}\"\nwarehouse = \"s3://iceberg-tables\"\n{}",
            self.rest,
            s3_section(&format!("http://127.0.0.1:{}", self.s3))
        )
    }
}

/// A config whose [iceberg] section is replaced by `iceberg` (text including [iceberg.s3]).
fn config_with(work: &Workdir, source: &str, tables: &[&str], iceberg: &str) -> PathBuf {
    config_with_extra(work, source, tables, "", "", iceberg)
}

/// [`config_with`] with extra pipeline keys and top-level sections.
fn config_with_extra(
    work: &Workdir,
    source: &str,
    tables: &[&str],
    pipeline_extra: &str,
    top_extra: &str,
    iceberg: &str,
) -> PathBuf {
    let cfg = work.config(source, tables, pipeline_extra, top_extra);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("[iceberg]").unwrap();
    let end = text.find("[[pipelines]]").unwrap();
    let text = format!("{}{}\n{}", &text[..start], iceberg, &text[end..]);
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// A private PostgreSQL with `ddl` in database `app`, and a work directory.
async fn source(ddl: &str) -> (TestPg, tokio_postgres::Client, Workdir) {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute(ddl).await.unwrap();
    (pg, db, Workdir::new())
}

fn start_agent(cfg: &Path, work: &Workdir) -> AgentProc {
    AgentProc::start_env(
        cfg,
        &work.path().join("agent.log"),
        &[("TEST_S3_SECRET", SECRET)],
    )
}

/// `philotes <args> --config <cfg>` with the S3 secret in its environment; (exit code, output).
fn run_with_secret(args: &[&str], cfg: &Path) -> (i32, String) {
    run_cmd(philotes_cmd(args, cfg).env("TEST_S3_SECRET", SECRET))
}

/// `verify.py` with `args` (the table first, then how to reach its catalog) and the folded
/// table checked against `query` on the source database `app`.
fn verify_against(args: &[String], pg: &TestPg, query: &str) -> Value {
    let conninfo = pg.conninfo("app");
    let mut full: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    full.extend(["--pg-conninfo", &conninfo, "--pg-query", query]);
    verify(&Workdir::new(), &args[0], &full)
}

/// Wait until `verify.py` with `args` (table first) reads `want` rows; returns its JSON.
async fn wait_read_rows(args: &[String], want: u64, secs: u64) -> Value {
    wait_for(Duration::from_secs(secs), "rows in the table", || async {
        let mut cmd = Command::new(python());
        cmd.arg(py_script("verify.py"))
            .args(["--table", &args[0]])
            .args(&args[1..]);
        let out = cmd.output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["rows"].as_u64() == Some(want)).then_some(v)
    })
    .await
}

/// A moto S3 server with bucket `lake`, a PostgreSQL with `ddl` in database `app`, and an
/// agent config on table `t` with a SQL catalog and the warehouse at `s3://lake/wh`, followed
/// by `extra` (more config sections).
async fn on_moto(
    work: &Workdir,
    ddl: &str,
    extra: &str,
) -> (Moto, TestPg, tokio_postgres::Client, PathBuf) {
    let m = moto(work.path(), Some("lake")).await;
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute(ddl).await.unwrap();
    let iceberg = format!(
        "[iceberg]\nuri = \"sqlite://{}\"\nwarehouse = \"s3://lake/wh\"\n{}\n{extra}",
        work.catalog_db().display(),
        s3_section(&m.endpoint)
    );
    let cfg = config_with(work, &pg.url("app"), &["t"], &iceberg);
    (m, pg, db, cfg)
}

/// `verify.py`'s arguments for table `ns.t` of [`on_moto`]'s warehouse.
fn moto_reader_args(work: &Workdir, m: &Moto) -> Vec<String> {
    vec![
        "ns.t".into(),
        "--catalog-db".into(),
        work.catalog_db().display().to_string(),
        "--warehouse".into(),
        "s3://lake/wh".into(),
        "--catalog-props".into(),
        s3_props(&m.endpoint).to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_catalog_with_moto_s3_warehouse() {
    let work = Workdir::new();
    let (m, pg, db, cfg) = on_moto(
        &work,
        "CREATE TABLE t (id int PRIMARY KEY, s text, n numeric(12,2))",
        "",
    )
    .await;
    // Past 64 kB a transaction streams while in progress: the one below is Parquet-encoded as
    // it arrives and its file uploaded to the store at the commit (`sink/iceberg/early.rs`).
    db.batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // Batches of 4,000 rows: the transaction's first one opens the early file (the default
    // 65,536-row batch would never fill, and its rows would be encoded at the commit).
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}batch_rows = 4000\n")).unwrap();
    let (rc, out) = run_with_secret(&["check"], &cfg);
    assert_eq!(rc, 0, "check: {out}");
    assert!(!out.contains(SECRET), "S3 secret in check output");
    // Trace level: every library's logging is on, and still no secret may appear.
    let agent = AgentProc::start_env(
        &cfg,
        &work.path().join("agent.log"),
        &[("TEST_S3_SECRET", SECRET), ("RUST_LOG", "trace")],
    );
    agent.wait_streaming().await;
    // One transaction (a multi-statement query): 20,000 inserts, 2,000 updates, 100 deletes.
    db.batch_execute(
        "INSERT INTO t SELECT g, 'row ' || g, g * 1.25 FROM generate_series(1, 20000) g;
         UPDATE t SET s = 'changed' WHERE id % 10 = 0; DELETE FROM t WHERE id > 19900;",
    )
    .await
    .unwrap();
    let args = moto_reader_args(&work, &m);
    wait_read_rows(&args, 22_100, 90).await;
    let v = verify_against(&args, &pg, "SELECT id, s, n FROM t");
    assert_eq!(v["unique"], true);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let encoded = encoded_early(&agent.log_text());
    assert!(encoded >= 16_000, "encoded while streaming: {encoded}");
    let lsns = v["lsn_properties"].as_array().unwrap();
    assert!(!lsns.is_empty(), "philotes.lsn in the snapshot summaries");
    let log = agent.log_text();
    assert!(log.len() > 10_000, "trace logging really ran");
    let leaks: Vec<String> = log
        .lines()
        .filter(|l| l.contains(SECRET))
        .map(|l| l.replace(SECRET, "<SECRET>").chars().take(300).collect())
        .collect();
    assert!(
        leaks.is_empty(),
        "S3 secret in the trace-level log: {leaks:#?}"
    );
    assert_eq!(agent.terminate(), Some(0));
    drop(m);
}

/// Compaction by copying row groups on an object store (moto, which like S3 refuses
/// multipart parts under 5 MiB but the last): the copy hands the store a column chunk at a
/// time, the output (over 6 MiB) is uploaded in parts, and reads back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_by_copying_row_groups_uploads_in_parts_to_s3() {
    let work = Workdir::new();
    let (m, pg, db, cfg) = on_moto(
        &work,
        "CREATE TABLE t (id int PRIMARY KEY, s text)",
        "[maintenance]\nenabled = false\nmin_input_files = 4\n",
    )
    .await;
    let agent = start_agent(&cfg, &work);
    agent.wait_streaming().await;
    let addr = agent.api_addr().unwrap();
    // Four transactions of 90,000 rows (~4 MB of Parquet each), one commit each.
    let per = 90_000;
    for i in 0..4 {
        db.batch_execute(&format!(
            "INSERT INTO t SELECT g, md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text) FROM generate_series({}, {}) g",
            i * per,
            (i + 1) * per - 1
        ))
        .await
        .unwrap();
        wait_for(
            Duration::from_secs(60),
            "the transaction's commit",
            || async {
                (metric_value(
                    &addr,
                    "philotes_iceberg_commits_total",
                    "table=\"public.t\"",
                )
                .await
                    >= (i + 1) as f64)
                    .then_some(())
            },
        )
        .await;
    }
    assert_eq!(agent.terminate(), Some(0));
    let (code, out) = run_with_secret(&["maintain", "--table", "ns.t"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("rewrote 4 small files into 1 (4 by copying their row groups)"),
        "{out}"
    );
    let args = moto_reader_args(&work, &m);
    let v = verify_against(&args, &pg, "SELECT id, s FROM t");
    assert_eq!(v["rows"], 4 * per, "{v}");
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    // The one output: larger than an upload part, its four row groups intact.
    let code = format!(
        "import json, pyarrow.parquet as pq\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         c = SqlCatalog('philotes', uri='sqlite:///{db}', warehouse='s3://lake/wh', **json.loads('{props}'))\n\
         t = c.load_table('ns.t')\n\
         f = t.inspect.files().to_pylist()\n\
         pf = pq.ParquetFile(t.io.new_input(f[0]['file_path']).open())\n\
         print(len(f), f[0]['file_size_in_bytes'], pf.metadata.num_row_groups, pf.metadata.num_rows)\n",
        db = work.catalog_db().display(),
        props = s3_props(&m.endpoint)
    );
    let (rc, out) = run_cmd(Command::new(python()).arg("-c").arg(code));
    assert_eq!(rc, 0, "{out}");
    let n: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(n.len(), 4, "{out}");
    assert_eq!(n[0], 1, "{out}");
    assert!(
        n[1] > 6 << 20,
        "the output spans more than one 5 MiB upload part: {out}"
    );
    assert_eq!(n[2], 4, "{out}");
    assert_eq!(n[3], 4 * per, "{out}");
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_catalog_on_postgres() {
    let (pg, db, work) = source("CREATE TABLE t (id int PRIMARY KEY, s text)").await;
    pg.create_db("catalog").await;
    let iceberg = format!(
        "[iceberg]\nuri = \"postgres://philotes@127.0.0.1:{}/catalog\"\nwarehouse = \"{}\"\n",
        pg.pg.port,
        work.warehouse().display()
    );
    let cfg = config_with(&work, &pg.url("app"), &["t"], &iceberg);
    let agent = start_agent(&cfg, &work);
    agent.wait_streaming().await;
    db.batch_execute("INSERT INTO t SELECT g, 'x' || g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    let sql_uri = format!(
        "postgresql+psycopg://philotes@127.0.0.1:{}/catalog",
        pg.pg.port
    );
    let wh = work.warehouse().display().to_string();
    let args = ["ns.t", "--sql-uri", &sql_uri, "--warehouse", &wh].map(String::from);
    let v = wait_read_rows(&args, 500, 60).await;
    assert_eq!(v["unique"], true);
    assert!(!v["lsn_properties"].as_array().unwrap().is_empty());
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_catalog_on_seaweedfs_survives_an_s3_outage() {
    let work = Workdir::new();
    let mut weed = Seaweed::start(work.path(), false).await;
    let (pg, db, _) = source("CREATE TABLE t (id int PRIMARY KEY, s text)").await;
    let cfg = config_with(&work, &pg.url("app"), &["t"], &weed.rest_top());
    let agent = start_agent(&cfg, &work);
    agent.wait_streaming().await;
    db.batch_execute("INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let args = weed.reader_args();
    wait_read_rows(&args, 1000, 90).await;

    // Outage: the object store and catalog vanish for 20 s while changes keep coming.
    weed.stop();
    insert_batches(
        &db,
        "t",
        "g, 'b' || g",
        2000,
        10,
        100,
        Duration::from_secs(2),
    )
    .await;
    let during = agent.api_json("/api/v1/pipelines/p").await.unwrap();
    assert_eq!(during["state"], "retrying", "the outage shows: {during}");
    assert!(
        during["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("iceberg"),
        "{during}"
    );
    weed.restart().await;
    let v = wait_read_rows(&args, 2000, 120).await;
    assert_eq!(v["unique"], true, "no duplicates after the outage");
    let v = verify_against(&args, &pg, "SELECT id, s FROM t");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    assert!(!v["lsn_properties"].as_array().unwrap().is_empty());
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_between_commits_is_a_resolved_conflict() {
    let (_pg, db, work, agent) = running("CREATE TABLE t (id int PRIMARY KEY, s text)", &["t"], "")
        .await
        .parts();
    db.batch_execute("INSERT INTO t SELECT g, 'agent' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.t", 100, 60).await;
    // PyIceberg appends one row to the same table: the agent's view is now stale.
    let (rc, out) = pyiceberg(&work, "append_other('ns.t')\n");
    assert_eq!(rc, 0, "PyIceberg append: {out}");
    db.batch_execute("INSERT INTO t SELECT g, 'agent' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.t", 201, 60).await;
    let v = verify(&work, "ns.t", &["--rows"]);
    let ids: std::collections::BTreeSet<i64> = v["all_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert!(ids.contains(&999_999) && ids.contains(&200) && ids.len() == 201);
    let metrics = scrape(&agent.api_addr().unwrap()).await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("philotes_cdc_errors_total{error_type=\"commit_conflict\"")
            && !l.ends_with(" 0")),
        "commit_conflict counted"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_storage_fails_check_with_one_line_and_run_keeps_retrying() {
    let work = Workdir::new();
    let m = moto(work.path(), Some("lake")).await;
    let weed_dir = work.path().join("auth");
    std::fs::create_dir_all(&weed_dir).unwrap();
    let weed = Seaweed::start(&weed_dir, true).await;
    let (pg, _db, _) = source("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dead = free_port().unwrap();
    let cases = [
        (
            "unknown bucket",
            format!(
                "[iceberg]\nuri = \"sqlite://{}\"\nwarehouse = \"s3://no-such-bucket/wh\"\n{}",
                work.catalog_db().display(),
                s3_section(&m.endpoint)
            ),
            "no-such-bucket",
        ),
        (
            "wrong credentials",
            format!(
                "[iceberg]\nuri = \"sqlite://{}\"\nwarehouse = \"s3://plain/wh\"\n{}",
                work.catalog_db().display(),
                s3_section(&format!("http://127.0.0.1:{}", weed.s3)).replace(KEY, "WRONGKEY")
            ),
            "not writable",
        ),
        (
            "unreachable catalog",
            format!("[iceberg]\ncatalog = \"rest\"\nuri = \"http://127.0.0.1:{dead}\"\nwarehouse = \"s3://x\"\n"),
            "catalog",
        ),
    ];
    for (what, iceberg, needle) in &cases {
        let cfg = config_with(&work, &pg.url("app"), &["t"], iceberg);
        let (rc, out) = run_with_secret(&["check"], &cfg);
        assert_eq!(rc, 2, "{what}: {out}");
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("philotes:")).collect();
        assert_eq!(lines.len(), 1, "{what}: one line: {out}");
        assert!(
            lines[0].contains(needle),
            "{what}: {:?} should mention {needle}",
            lines[0]
        );
        assert!(!out.contains(SECRET), "{what}: secret leaked");
    }
    // `run` with an unreachable catalog: the pipeline reports failed and keeps retrying.
    let cfg = config_with(&work, &pg.url("app"), &["t"], &cases[2].1);
    let agent = start_agent(&cfg, &work);
    let v = agent
        .wait_pipeline("p", 60, "failed state with a reason", |v| {
            v["state"] == "retrying" && v["last_error"].is_string()
        })
        .await;
    assert!(v["last_error"].as_str().unwrap().contains("catalog"), "{v}");
    let retries = |t: &str| -> f64 {
        t.lines()
            .find(|l| l.starts_with("philotes_cdc_retries_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let addr = agent.api_addr().unwrap();
    let first = retries(&scrape(&addr).await);
    wait_for(Duration::from_secs(60), "more retries", || async {
        (retries(&try_scrape(&addr).await?) > first).then_some(())
    })
    .await;
    assert_eq!(agent.terminate(), Some(0));
}

/// Maintenance through the REST catalog's commit endpoint and an S3 warehouse (SeaweedFS):
/// compaction and expiry while the stream commits, every row read back once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_through_the_rest_catalog_on_seaweedfs() {
    let work = Workdir::new();
    let weed = Seaweed::start(work.path(), false).await;
    let (pg, db, _) = source("CREATE TABLE t (id int PRIMARY KEY, s text)").await;
    let maintenance = "[maintenance]\ninterval = \"1s\"\nsnapshot_retention = \"2s\"\nretain_last = 2\nmin_input_files = 4\nmetadata_versions = 3\n";
    let cfg = config_with(
        &work,
        &pg.url("app"),
        &["t"],
        &format!("{}\n{maintenance}", weed.rest_top()),
    );
    let agent = start_agent(&cfg, &work);
    agent.wait_streaming().await;
    insert_batches(
        &db,
        "t",
        "g, 'r' || g",
        0,
        14,
        10,
        Duration::from_millis(400),
    )
    .await;
    // Schema changes between the batches: expiry removes the schemas no snapshot uses
    // through the REST catalog too.
    for (k, c) in ["a", "b", "c"].iter().enumerate() {
        db.batch_execute(&format!("ALTER TABLE t ADD COLUMN {c} int"))
            .await
            .expect("add column");
        insert_batches(
            &db,
            "t",
            "g, 'r' || g",
            140 + 20 * k as i64,
            2,
            10,
            Duration::from_millis(400),
        )
        .await;
    }
    let args = weed.reader_args();
    wait_read_rows(&args, 200, 90).await;
    wait_for(Duration::from_secs(60), "compaction and expiry", || async {
        let log = agent.log_text();
        (log.contains("maintenance: rewrote")
            && log.contains("maintenance: expired")
            && log.contains("unused schemas"))
        .then_some(())
    })
    .await;
    let log = agent.log_text();
    assert!(!log.contains("maintenance failed"), "{log}");
    assert!(
        !log.contains("unused schemas kept"),
        "the REST catalog takes remove-schemas: {log}"
    );
    let v = verify_against(&args, &pg, "SELECT id, s FROM t");
    assert_eq!(v["rows"], 200, "{v}");
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    assert_eq!(agent.terminate(), Some(0));
    // The one-off run through the same catalog: a dry run plans, changes nothing.
    let (code, out) = run_with_secret(&["maintain", "--dry-run"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ns.t\texpire\tok"), "{out}");
    // Listing the S3 prefix for orphans works (nothing is old enough to go).
    assert!(
        out.contains("ns.t\tremove_orphans\tok\twould delete 0 orphan files"),
        "{out}"
    );
}

/// The randomised run of `reliability` ([`RandomWorkload`]: savepoints, rollbacks, two-phase
/// and large streamed transactions, TOAST, key changes, DDL, TRUNCATE; both table modes, a
/// chunked copy, maintenance every second) on the REST catalog and S3 of SeaweedFS, while
/// faults come every 2-6 s: the agent SIGKILLed (or SIGTERMed) and restarted, or the object
/// store and catalog killed for 1-4 s with the workload going on. Killing the server while a
/// commit is in flight leaves its outcome unknown to the agent, which must find out from the
/// table; the judge is PostgreSQL's own decoding (a `test_decoding` witness slot), transaction
/// by transaction, and the mirrors must equal the tables for PyIceberg (through the REST
/// catalog) and DuckDB (`iceberg_scan` of the metadata the catalog names, over S3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_transactions_on_rest_and_s3_through_kills_and_outages_match_postgres_own_decoding()
{
    use crate::reliability::*;
    let work = Workdir::new();
    let mut weed = Seaweed::start(work.path(), false).await;
    let pg = TestPg::start_with(random_pg_options());
    let db = pg.create_db("app").await;
    db.batch_execute(RANDOM_DDL).await.expect("test schema");
    db.batch_execute("SELECT pg_create_logical_replication_slot('witness', 'test_decoding')")
        .await
        .expect("witness slot");
    let cfg = config_with_extra(
        &work,
        &pg.url("app"),
        &["a", "b", "c"],
        RANDOM_PIPELINE,
        RANDOM_MAINTENANCE,
        &weed.rest_top(),
    );
    let mut agent = start_agent(&cfg, &work);
    agent.wait_streaming().await;

    let mut w = RandomWorkload::new(0x5e4e_d5ee_d0f5);
    let (mut kills, mut outages) = (0u32, 0u32);
    let mut outage_until: Option<Instant> = None;
    let mut next_fault = Instant::now() + Duration::from_millis(2000 + w.rng.below(4000));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(45) {
        if outage_until.is_some_and(|t| Instant::now() >= t) {
            weed.restart().await;
            outage_until = None;
            next_fault = Instant::now() + Duration::from_millis(2000 + w.rng.below(4000));
        }
        if outage_until.is_none() && Instant::now() >= next_fault {
            // Every third fault an outage, the others agent kills.
            if (kills + outages) % 3 == 2 {
                weed.stop();
                outages += 1;
                outage_until =
                    Some(Instant::now() + Duration::from_millis(1000 + w.rng.below(3000)));
            } else {
                if w.rng.below(5) == 0 {
                    agent.terminate();
                } else {
                    agent.kill9();
                }
                tokio::time::sleep(Duration::from_millis(100 + w.rng.below(900))).await;
                agent = start_agent(&cfg, &work);
                kills += 1;
                next_fault = Instant::now() + Duration::from_millis(2000 + w.rng.below(4000));
            }
        }
        w.step(&db).await;
    }
    if outage_until.is_some() {
        weed.restart().await;
    }
    if agent.child.try_wait().ok().flatten().is_some() {
        agent = start_agent(&cfg, &work);
    }
    wait_confirmed_end(&pg, &db).await;
    assert_eq!(agent.terminate(), Some(0));

    let what = format!(
        "random run on REST + S3: {} transactions ({} large), {kills} kills, {outages} outages",
        w.txns, w.streamed
    );
    // The outages reached the agent: an object-store request was retried, or a catalog call
    // failed and the pipeline started again.
    let log = std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default();
    let (retried, failed) = (
        log.matches("will retry").count(),
        log.matches("pipeline failed, retrying").count(),
    );
    let what = format!("{what}, {retried} storage retries, {failed} pipeline failures");
    assert!(
        kills >= 3 && outages >= 2 && w.streamed >= 10 && retried + failed >= 1,
        "the run did what it is for: {what}"
    );
    let catalog = weed.catalog_args();
    assert_run_judged(&catalog, &pg, &what);
}
