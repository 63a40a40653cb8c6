//! Test harness: a private PostgreSQL per test, the real `philotes` binary as a child process,
//! and the independent Python readers (PyIceberg, DuckDB) from the test venv.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use philotes::demo::postgres::{LocalPgOptions, LocalPostgres};
use serde_json::Value;

/// A private cluster in a temp dir, with a tokio-postgres client factory.
pub struct TestPg {
    pub pg: LocalPostgres,
    pub password: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestPg {
    pub fn start() -> Self {
        Self::start_with(LocalPgOptions::default())
    }

    pub fn start_with(opts: LocalPgOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("philotes-test-pg")
            .tempdir()
            .expect("tempdir");
        let pg = LocalPostgres::start(&dir.path().join("data"), &opts)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
        Self {
            pg,
            password: opts.password.clone(),
            _dir: dir,
        }
    }

    /// URL the agent uses.
    pub fn url(&self, db: &str) -> String {
        self.pg.url(db, self.password.as_deref())
    }

    /// libpq conninfo (psycopg, tokio-postgres).
    pub fn conninfo(&self, db: &str) -> String {
        match &self.password {
            Some(pw) => format!("{} password={pw}", self.pg.conninfo(db)),
            None => self.pg.conninfo(db),
        }
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(db), tokio_postgres::NoTls)
            .await
            .expect("connect to test PostgreSQL");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    pub async fn create_db(&self, db: &str) -> tokio_postgres::Client {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        self.client(db).await
    }

    /// `confirmed_flush_lsn` of `slot` as a number (0 if unknown).
    pub async fn confirmed_lsn(&self, db: &str, slot: &str) -> u64 {
        let c = self.client(db).await;
        let row = c
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query slot");
        row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0) as u64
    }
}

/// A scratch directory with the agent's config, catalog and warehouse.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("philotes-test")
                .tempdir()
                .expect("tempdir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn catalog_db(&self) -> PathBuf {
        self.path().join("catalog.db")
    }
    pub fn warehouse(&self) -> PathBuf {
        self.path().join("warehouse")
    }

    /// A config with one pipeline `p` on `source` for `tables`, plus extra pipeline keys.
    pub fn config(
        &self,
        source: &str,
        tables: &[&str],
        pipeline_extra: &str,
        top_extra: &str,
    ) -> PathBuf {
        let tables = tables
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // The tests that copy existing rows say so; the others stream changes only.
        let snapshot = if pipeline_extra.contains("snapshot =") {
            ""
        } else {
            "snapshot = \"never\""
        };
        let text = format!(
            r#"{top_extra}
[api]
listen = "127.0.0.1:0"
[iceberg]
uri = "sqlite://{db}"
warehouse = "{wh}"
[[pipelines]]
name = "p"
source = "{source}"
tables = [{tables}]
namespace = "ns"
flush_interval = "300ms"
{snapshot}
{pipeline_extra}
"#,
            db = self.catalog_db().display(),
            wh = self.warehouse().display(),
        );
        let path = self.path().join("philotes.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// The agent binary under test.
pub fn philotes_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_philotes"))
}

/// A running `philotes run` child process.
pub struct AgentProc {
    pub child: Child,
    pub log: PathBuf,
    /// API address when the test chose it (else read from the log).
    pub api: Option<String>,
}

impl AgentProc {
    pub fn start(config: &Path, log: &Path) -> Self {
        Self::start_env(config, log, &[])
    }

    pub fn start_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(philotes_bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,philotes=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn philotes");
        Self {
            child,
            log: log.to_path_buf(),
            api: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Peak resident set size (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET an API path as JSON (None while the API is not up).
    pub async fn api_json(&self, path: &str) -> Option<Value> {
        let addr = self.api_addr()?;
        let r = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
        r.json().await.ok()
    }

    /// Start the agent and wait until pipeline `p` streams.
    pub async fn start_streaming(config: &Path, log: &Path) -> Self {
        let agent = Self::start(config, log);
        agent.wait_streaming().await;
        agent
    }

    /// Wait until pipeline `p` reports `streaming` (slot and publication exist from then on).
    pub async fn wait_streaming(&self) {
        self.wait_state("p", "streaming", 60).await;
    }

    /// Wait (up to `secs`) until pipeline `name` reports `state`; returns its detail.
    pub async fn wait_state(&self, name: &str, state: &str, secs: u64) -> Value {
        self.wait_pipeline(name, secs, &format!("pipeline {name} {state}"), |v| {
            v["state"] == state
        })
        .await
    }

    /// Wait (up to `secs`) until the detail of pipeline `name` (`/api/v1/pipelines/<name>`)
    /// satisfies `pred`; returns that detail.
    pub async fn wait_pipeline(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let path = format!("/api/v1/pipelines/{name}");
        wait_for(Duration::from_secs(secs), what, || async {
            let v = self.api_json(&path).await?;
            pred(&v).then_some(v)
        })
        .await
    }

    /// The API address the agent logged (it listens on port 0 in tests).
    pub fn api_addr(&self) -> Option<String> {
        if let Some(a) = &self.api {
            return Some(a.clone());
        }
        let log = self.log_text();
        let i = log.rfind("api=Some(")?;
        let rest = &log[i + 9..];
        Some(rest[..rest.find(')')?].to_string())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- agent log (last 80 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python of the test venv (created by `.ci/run` / scripts/test.sh).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("PHILOTES_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join(".venv-test/bin/python");
    assert!(
        p.exists(),
        "test venv missing: run scripts/test.sh (it creates .venv-test with PyIceberg and DuckDB)"
    );
    p
}

/// `verify.py` on `table` against `query` on the source database `app`: asserts that
/// `(_cdc_lsn, _cdc_seq)` is unique and that the folded table equals the source; returns the
/// JSON for further checks.
pub fn verify_state(work: &Workdir, table: &str, pg: &TestPg, query: &str) -> Value {
    let v = verify_source(work, table, pg, query, &[]);
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    v
}

/// A script of `tests/py/`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Run `cmd` (a Python script), assert it succeeded and parse its stdout as JSON.
pub fn python_json(cmd: &mut Command, what: &str) -> Value {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what} JSON: {e}"))
}

/// Run `tests/py/verify.py` against a table; returns its JSON.
pub fn verify(work: &Workdir, table: &str, extra: &[&str]) -> Value {
    verify_at(&work.catalog_db(), &work.warehouse(), table, extra)
}

/// [`verify`] on the SQL catalog `catalog_db` with its `warehouse`.
pub fn verify_at(catalog_db: &Path, warehouse: &Path, table: &str, extra: &[&str]) -> Value {
    read_table("verify.py", catalog_db, warehouse, table, extra)
}

/// Run the reader `tests/py/<script>` on `table` of the SQL catalog `catalog_db` with its
/// `warehouse`, with `extra` arguments; returns its JSON.
pub fn read_table(
    script: &str,
    catalog_db: &Path,
    warehouse: &Path,
    table: &str,
    extra: &[&str],
) -> Value {
    read_table_via(
        script,
        &sql_catalog_args(catalog_db, warehouse),
        table,
        extra,
    )
}

/// The reader scripts' arguments for the SQL catalog `catalog_db` with its `warehouse`.
pub fn sql_catalog_args(catalog_db: &Path, warehouse: &Path) -> Vec<String> {
    vec![
        "--catalog-db".into(),
        catalog_db.display().to_string(),
        "--warehouse".into(),
        warehouse.display().to_string(),
    ]
}

/// [`read_table`] through any catalog: `catalog` holds the scripts' catalog arguments
/// ([`sql_catalog_args`], or `--rest-uri …`).
pub fn read_table_via(script: &str, catalog: &[String], table: &str, extra: &[&str]) -> Value {
    python_json(
        Command::new(python())
            .arg(py_script(script))
            .args(catalog)
            .args(["--table", table])
            .args(extra),
        script,
    )
}

/// [`verify`] with `extra` arguments against `query` on the source database `app` (no
/// assertion: the caller checks what it needs).
pub fn verify_source(
    work: &Workdir,
    table: &str,
    pg: &TestPg,
    query: &str,
    extra: &[&str],
) -> Value {
    let conninfo = pg.conninfo("app");
    let mut args = extra.to_vec();
    args.extend(["--pg-conninfo", &conninfo, "--pg-query", query]);
    verify(work, table, &args)
}

/// Run each statement as its own transaction, in order.
pub async fn execute_each(db: &tokio_postgres::Client, statements: &[&str]) {
    for sql in statements {
        db.batch_execute(sql).await.expect(sql);
    }
}

/// Poll [`verify_source`] until the table's fold equals `query` (and, with `--duckdb` in
/// `extra`, DuckDB's read of it too), for at most `secs`; the last result on success.
pub async fn wait_source_equal(
    work: &Workdir,
    table: &str,
    pg: &TestPg,
    query: &str,
    extra: &[&str],
    secs: u64,
) -> Value {
    let duckdb = extra.contains(&"--duckdb");
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(secs);
    wait_created(work, table, secs).await;
    while Instant::now() < deadline {
        last = verify_source(work, table, pg, query, extra);
        if last["state_equal"] == true && (!duckdb || last["duckdb_equal"] == true) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    last["all_rows"] = Value::Null;
    panic!("{table} never equalled the source: {last}");
}

/// The commit LSNs (`lsns`) of a `verify.py` result.
pub fn lsn_set(v: &Value) -> std::collections::BTreeSet<u64> {
    v["lsns"]
        .as_array()
        .expect("lsns")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Every row of the dead-letter table `ns._philotes_dlq` (`verify.py --rows` on its key).
pub fn verify_dlq(work: &Workdir) -> Value {
    verify(
        work,
        "ns._philotes_dlq",
        &["--pk", "source_table,_cdc_lsn,_cdc_seq", "--rows"],
    )
}

/// Run Python `body` with `c` (the SQL catalog) and `append_other(table_name)` (appends one row
/// as another writer would: id 999999) defined; returns (exit code, output).
pub fn pyiceberg(work: &Workdir, body: &str) -> (i32, String) {
    let code = format!(
        "import pyarrow as pa, datetime\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         c = SqlCatalog('philotes', uri='sqlite:///{db}', warehouse='file://{wh}')\n\
         def append_other(name):\n\
         \x20   t = c.load_table(name)\n\
         \x20   row = {{'id': [999999], 's': ['other writer'], '_cdc_op': ['I'], '_cdc_lsn': [1], '_cdc_seq': [0],\n\
         \x20          '_cdc_ts': [datetime.datetime.now(datetime.timezone.utc)], '_cdc_unchanged': [[]]}}\n\
         \x20   t.append(pa.Table.from_pydict(row, schema=t.schema().as_arrow()))\n\
         {body}",
        db = work.catalog_db().display(),
        wh = work.warehouse().display()
    );
    run_cmd(Command::new(python()).arg("-c").arg(code))
}

/// Wait (polling every 2 ms, for up to 60 s) until a line of the log file `log` satisfies
/// `pred`: for acting at a precise moment of the agent's work.
pub async fn wait_log_line(log: &Path, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(&pred)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Poll `f` until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Wait until the SQLite catalog lists `table`: the agent creates a table when the stream
/// first names it, so a check waits for that instead of failing on a table about to be there.
pub async fn wait_created(work: &Workdir, table: &str, secs: u64) {
    wait_for(
        Duration::from_secs(secs),
        &format!("{table} created"),
        || async { catalog_lists(work, table).await.then_some(()) },
    )
    .await;
}

/// Whether the SQLite catalog lists `table` (`namespace.name`) yet.
pub async fn catalog_lists(work: &Workdir, table: &str) -> bool {
    use sqlx::Connection as _;
    let Some((ns, name)) = table.split_once('.') else {
        return false;
    };
    let url = format!("sqlite://{}?mode=ro", work.catalog_db().display());
    let Ok(mut db) = sqlx::SqliteConnection::connect(&url).await else {
        return false;
    };
    sqlx::query("SELECT 1 FROM iceberg_tables WHERE table_namespace = ? AND table_name = ?")
        .bind(ns)
        .bind(name)
        .fetch_optional(&mut db)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Number of rows in an Iceberg table via PyIceberg (None if the table does not exist yet).
pub fn iceberg_rows(work: &Workdir, table: &str) -> Option<u64> {
    if !work.catalog_db().exists() {
        return None;
    }
    // Paths and the table name travel as arguments: any table name is safe.
    let code = "import sys\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         c = SqlCatalog('philotes', uri='sqlite:///' + sys.argv[1], warehouse='file://' + sys.argv[2])\n\
         try:\n    t = c.load_table(sys.argv[3])\nexcept Exception:\n    print(-1); raise SystemExit\n\
         print(t.scan().to_arrow().num_rows)\n";
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .arg(work.catalog_db())
        .arg(work.warehouse())
        .arg(table)
        .output()
        .ok()?;
    let n: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (n >= 0).then_some(n as u64)
}

/// Run `cmd` with `input` on its stdin; its output (stdout and stderr captured).
pub fn output_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Run a command and return (exit code, stdout+stderr).
pub fn run_cmd(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("run command");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A private PostgreSQL with database `app` and the DDL applied, and an agent config for it;
/// no agent yet. Keep `pg` bound while the test runs: dropping it stops the server.
pub struct Prepared {
    pub pg: TestPg,
    pub db: tokio_postgres::Client,
    pub work: Workdir,
    pub cfg: PathBuf,
    /// The API address when [`Prepared::listen_on`] fixed it.
    api: Option<String>,
}

/// PostgreSQL with `ddl` in database `app` and a config with one pipeline `p` on `tables`.
pub async fn prepare(
    ddl: &str,
    tables: &[&str],
    pipeline_extra: &str,
    top_extra: &str,
) -> Prepared {
    prepare_with(
        LocalPgOptions::default(),
        ddl,
        tables,
        pipeline_extra,
        top_extra,
    )
    .await
}

/// [`prepare`] on a server started with `opts`.
pub async fn prepare_with(
    opts: LocalPgOptions,
    ddl: &str,
    tables: &[&str],
    pipeline_extra: &str,
    top_extra: &str,
) -> Prepared {
    let pg = TestPg::start_with(opts);
    let db = pg.create_db("app").await;
    db.batch_execute(ddl).await.expect("test schema");
    let work = Workdir::new();
    let cfg = work.config(&pg.url("app"), tables, pipeline_extra, top_extra);
    Prepared {
        pg,
        db,
        work,
        cfg,
        api: None,
    }
}

impl Prepared {
    /// The parts most tests use: server, client, work directory and config.
    pub fn parts(self) -> (TestPg, tokio_postgres::Client, Workdir, PathBuf) {
        (self.pg, self.db, self.work, self.cfg)
    }

    /// The agent's log file.
    pub fn log(&self) -> PathBuf {
        self.work.path().join("agent.log")
    }

    /// Put the API on the fixed `port` (known before the agent starts), with `api_extra`
    /// (more `[api]` keys) after it; returns the address.
    pub fn listen_on(&mut self, port: u16, api_extra: &str) -> String {
        let addr = format!("127.0.0.1:{port}");
        let extra = if api_extra.is_empty() {
            String::new()
        } else {
            format!("\n{api_extra}")
        };
        edit_config(
            &self.cfg,
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{addr}\"{extra}"),
        );
        self.api = Some(addr.clone());
        addr
    }

    /// Start `philotes run` on the config (not waiting for anything).
    pub fn start_agent(&self) -> AgentProc {
        self.start_agent_env(&[])
    }

    /// [`Prepared::start_agent`] with extra environment variables.
    pub fn start_agent_env(&self, env: &[(&str, &str)]) -> AgentProc {
        let mut agent = AgentProc::start_env(&self.cfg, &self.log(), env);
        agent.api.clone_from(&self.api);
        agent
    }

    /// Start the agent without waiting for it (a copy, say, runs before it streams).
    pub fn started(self) -> Running {
        let agent = self.start_agent();
        self.with_agent(agent)
    }

    fn with_agent(self, agent: AgentProc) -> Running {
        Running {
            pg: self.pg,
            db: self.db,
            work: self.work,
            cfg: self.cfg,
            agent,
        }
    }

    /// Start the agent and wait until the pipeline streams.
    pub async fn streaming(self) -> Running {
        self.streaming_env(&[]).await
    }

    /// [`Prepared::streaming`] with extra environment variables for the agent.
    pub async fn streaming_env(self, env: &[(&str, &str)]) -> Running {
        let agent = self.start_agent_env(env);
        agent.wait_streaming().await;
        self.with_agent(agent)
    }
}

/// Table `t (id int PRIMARY KEY, n numeric(12,2))` streamed by an agent whose API listens on
/// a fixed port, with `top_extra` config sections, `api_extra` keys in `[api]` and `env` for
/// the agent; returns the API address as well.
pub async fn running_numeric_t_on_a_fixed_port(
    top_extra: &str,
    api_extra: &str,
    env: &[(&str, &str)],
) -> (Running, String) {
    running_numeric_t_with("", top_extra, api_extra, env).await
}

/// [`running_numeric_t_on_a_fixed_port`] with `pipeline_extra` keys for the pipeline.
pub async fn running_numeric_t_with(
    pipeline_extra: &str,
    top_extra: &str,
    api_extra: &str,
    env: &[(&str, &str)],
) -> (Running, String) {
    let mut p = prepare(
        "CREATE TABLE t (id int PRIMARY KEY, n numeric(12,2))",
        &["t"],
        pipeline_extra,
        top_extra,
    )
    .await;
    let port = philotes::demo::postgres::free_port().expect("free port");
    let addr = p.listen_on(port, api_extra);
    (p.streaming_env(env).await, addr)
}

/// Replace `from` (which must occur) by `to` in the config file `cfg`.
pub fn edit_config(cfg: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(cfg).expect("read config");
    assert!(text.contains(from), "{from} not in {}", cfg.display());
    std::fs::write(cfg, text.replace(from, to)).expect("write config");
}

/// A private PostgreSQL with database `app`, the DDL applied, and a streaming agent on `tables`.
/// Keep `pg` bound while the test runs: dropping it stops the server.
pub struct Running {
    pub pg: TestPg,
    pub db: tokio_postgres::Client,
    pub work: Workdir,
    pub cfg: PathBuf,
    pub agent: AgentProc,
}

impl Running {
    /// The parts a typical test uses (the config path is rarely needed).
    pub fn parts(self) -> (TestPg, tokio_postgres::Client, Workdir, AgentProc) {
        (self.pg, self.db, self.work, self.agent)
    }
}

/// Start everything a typical test needs and wait until the pipeline streams.
pub async fn running(ddl: &str, tables: &[&str], pipeline_extra: &str) -> Running {
    running_with(ddl, tables, pipeline_extra, "").await
}

/// [`running`] with top-level config sections (`top_extra`) as well.
pub async fn running_with(
    ddl: &str,
    tables: &[&str],
    pipeline_extra: &str,
    top_extra: &str,
) -> Running {
    prepare(ddl, tables, pipeline_extra, top_extra)
        .await
        .streaming()
        .await
}

/// Wait until `table` holds exactly `rows` rows in Iceberg.
pub async fn wait_rows(work: &Workdir, table: &str, rows: u64, secs: u64) {
    wait_for(
        Duration::from_secs(secs),
        &format!("{rows} rows in {table}"),
        || async { (iceberg_rows(work, table) == Some(rows)).then_some(()) },
    )
    .await;
}

/// Wait until `table` holds at least `rows` rows in Iceberg; returns how many it holds.
pub async fn wait_rows_at_least(work: &Workdir, table: &str, rows: u64, secs: u64) -> u64 {
    wait_for(
        Duration::from_secs(secs),
        &format!("at least {rows} rows in {table}"),
        || async { iceberg_rows(work, table).filter(|n| *n >= rows) },
    )
    .await
}

/// `batches` transactions of `size` rows each, ids from `first` on:
/// `INSERT INTO <table> SELECT <select> FROM generate_series(lo, hi) g`, pausing `pause`
/// after each one (none when zero).
pub async fn insert_batches(
    db: &tokio_postgres::Client,
    table: &str,
    select: &str,
    first: i64,
    batches: i64,
    size: i64,
    pause: Duration,
) {
    for i in 0..batches {
        let lo = first + i * size;
        db.batch_execute(&format!(
            "INSERT INTO {table} SELECT {select} FROM generate_series({lo}, {}) g",
            lo + size - 1
        ))
        .await
        .expect("insert batch");
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Wait until something listens on 127.0.0.1:`port`.
pub async fn wait_port(port: u16, what: &str, secs: u64) {
    wait_for(Duration::from_secs(secs), what, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// The `/metrics` exposition of the agent at `addr` (None if it does not answer).
pub async fn try_scrape(addr: &str) -> Option<String> {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The `/metrics` exposition of the agent at `addr`.
pub async fn scrape(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("scrape body")
}

/// Sum of the samples of `name` whose label text contains `labels`, from a scrape of `addr`.
pub async fn metric_value(addr: &str, name: &str, labels: &str) -> f64 {
    sample_sum(&scrape(addr).await, name, labels)
}

/// Schema changes of `kind` the agent counted (`philotes_cdc_schema_changes_total`).
pub async fn schema_changes(agent: &AgentProc, kind: &str) -> f64 {
    let addr = agent.api_addr().expect("the agent logged its API address");
    let labels = format!("kind=\"{kind}\"");
    metric_value(&addr, "philotes_cdc_schema_changes_total", &labels).await
}

/// Sum of the samples of `name` whose label text contains `labels` in the exposition `text`.
pub fn sample_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `philotes <args> --config <cfg>`, ready to run.
pub fn philotes_cmd(args: &[&str], cfg: &Path) -> Command {
    let mut cmd = Command::new(philotes_bin());
    cmd.args(args).arg("--config").arg(cfg);
    cmd
}

/// Run `philotes <args> --config <cfg>`; returns (exit code, output).
pub fn run_philotes(args: &[&str], cfg: &Path) -> (i32, String) {
    run_cmd(&mut philotes_cmd(args, cfg))
}

/// Serve TLS with `server.crt` and `server.key` of the data directory (made by the caller):
/// key mode 600, both owned by the server's user, `ssl = on`, and a restart.
pub fn use_server_cert(pg: &TestPg) {
    let dir = &pg.pg.data_dir;
    let (key, crt) = (dir.join("server.key"), dir.join("server.crt"));
    let _ = Command::new("chmod").arg("600").arg(&key).status();
    if let Some(owner) = pg.pg.owner() {
        let _ = Command::new("chown")
            .arg(owner)
            .arg(&key)
            .arg(&crt)
            .status();
    }
    let mut conf = std::fs::read_to_string(dir.join("postgresql.conf")).unwrap();
    conf.push_str(&format!(
        "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
        crt.display(),
        key.display()
    ));
    std::fs::write(dir.join("postgresql.conf"), conf).unwrap();
    pg.pg.pg_ctl("restart").expect("restart with TLS");
}

/// A table with every mapped type (and an enum and a domain).
pub const ALL_TYPES: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE all_types (
    id int8 PRIMARY KEY,
    c_int2 int2, c_int4 int4, c_float4 float4, c_float8 float8,
    c_numeric numeric(12,2), c_bool bool, c_text text, c_varchar varchar(50),
    c_bytea bytea, c_date date, c_time time, c_ts timestamp, c_tstz timestamptz,
    c_uuid uuid, c_jsonb jsonb, c_int4arr int4[], c_textarr text[],
    c_enum mood, c_domain posint
);";

pub const ALL_TYPES_QUERY: &str =
    "SELECT id, c_int2, c_int4, c_float4, c_float8, c_numeric, c_bool, \
    c_text, c_varchar, c_bytea, c_date, c_time, c_ts, c_tstz, c_uuid, c_jsonb::text AS c_jsonb, \
    c_int4arr, c_textarr, c_enum::text AS c_enum, c_domain FROM all_types";

pub fn all_types_values(i: i64) -> String {
    if i % 7 == 3 {
        // Every column but the key NULL.
        return format!("({i}, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)");
    }
    let moods = ["sad", "ok", "happy"];
    format!(
        "({i}, {}, {}, {}, {}, {}.{:02}, {}, 'row ''{i}'' ✓ \"q\"', 'v{i}', '\\x{:04x}ff', \
         DATE '2024-01-01' + {i}, TIME '12:34:56.{:06}', TIMESTAMP '2024-03-04 05:06:07.123456' + interval '{i} hours', \
         TIMESTAMPTZ '2024-06-01 10:00:00.5+05:30' + interval '{i} minutes', md5('{i}')::uuid, \
         '{{\"i\": {i}, \"nested\": {{\"a\": [1, 2], \"s\": \"x y\"}}}}', '{{{i},NULL,-3}}', \
         '{{\"a b\",\"c,d\",NULL,\"q\\\"t\"}}', '{}', {})",
        (i % 30000) as i16 - 100,
        i * 1000 - 7,
        (i as f64) * 0.25 - 3.0,
        (i as f64) / 3.0,
        i * 7,
        i % 100,
        i % 2 == 0,
        i,
        i * 1001 % 1_000_000,
        moods[(i % 3) as usize],
        i + 1,
    )
}

/// Rows of streamed transactions the agent's log says were Parquet-encoded while they
/// streamed (`encoded_early=` of its debug line at each Stream Commit).
pub fn encoded_early(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("converted rows handed to the writers"))
        .filter_map(|l| l.rsplit("encoded_early=").next())
        .filter_map(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Every data file's Iceberg statistics of `table` against what pyarrow reads in the file
/// (`tests/py/file_stats.py`): `files`, `bounds_checked`, `mismatches`.
pub fn file_stats(work: &Workdir, table: &str) -> Value {
    read_table(
        "file_stats.py",
        &work.catalog_db(),
        &work.warehouse(),
        table,
        &[],
    )
}

/// `verify` of `ns.all_types` with DuckDB against `ALL_TYPES_QUERY` + `filter` in PostgreSQL.
pub fn verify_all_types(work: &Workdir, conninfo: &str, filter: &str) -> Value {
    verify(
        work,
        "ns.all_types",
        &[
            "--duckdb",
            "--pg-conninfo",
            conninfo,
            "--pg-query",
            &format!("{ALL_TYPES_QUERY}{filter}"),
        ],
    )
}
