//! `philotes demo`: a private PostgreSQL, generated changes, one pipeline into a local
//! warehouse, `/metrics` live, progress on the terminal and the query lines at the end.

pub mod figures;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::agent::{shutdown_signal, Agent};
use crate::config::Config;
use crate::pipeline::status;
use crate::telemetry::PipelineState;
use crate::telemetry::Telemetry;
use postgres::{LocalPgOptions, LocalPostgres};

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Output directory (catalog + warehouse).
    pub dir: PathBuf,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Changes per second to generate.
    pub rate: u32,
    /// API / metrics listen address.
    pub listen: String,
}

/// A demo failure.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// PostgreSQL could not start.
    #[error(transparent)]
    Postgres(#[from] postgres::LocalPgError),
    /// A SQL statement failed.
    #[error("demo database: {0}")]
    Sql(String),
    /// The agent could not start.
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    /// Config problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// I/O.
    #[error("demo: {0}")]
    Io(String),
    /// Iceberg does not hold exactly the changes that were generated.
    #[error("demo: generated {generated} changes but Iceberg holds {committed} rows")]
    Mismatch {
        /// Changes the generator made.
        generated: u64,
        /// Rows read back from the changelog tables.
        committed: u64,
    },
}

const SCHEMA_SQL: &str = "
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email varchar(200),
    vip boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL,
    status order_status NOT NULL DEFAULT 'new',
    amount numeric(12,2) NOT NULL,
    items int4[] NOT NULL DEFAULT '{}',
    note jsonb,
    ordered_on date NOT NULL DEFAULT current_date,
    updated_at timestamptz NOT NULL DEFAULT now()
);
";

fn sql_err(e: tokio_postgres::Error) -> DemoError {
    DemoError::Sql(e.to_string())
}

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, DemoError> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .map_err(sql_err)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn clean(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Run the demo until Ctrl-C or `duration`.
pub async fn run(opts: DemoOptions) -> Result<(), DemoError> {
    let dir = clean(&absolute(&opts.dir));
    // A fresh cluster starts at low LSNs: old tables would make every change look replayed.
    for sub in ["catalog.db", "warehouse"] {
        let p = dir.join(sub);
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Io(e.to_string()))?;
    let pg_dir = std::env::temp_dir().join(format!("philotes-demo-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pg_dir);
    println!(
        "▶ starting a private PostgreSQL (wal_level=logical) in {}",
        pg_dir.display()
    );
    let mut pg = LocalPostgres::start(&pg_dir, &LocalPgOptions::default())?;
    let admin = connect(&pg.conninfo("postgres")).await?;
    admin
        .batch_execute("CREATE DATABASE shop")
        .await
        .map_err(sql_err)?;
    let db = connect(&pg.conninfo("shop")).await?;
    db.batch_execute(SCHEMA_SQL).await.map_err(sql_err)?;
    println!(
        "▶ database shop on 127.0.0.1:{} with tables customers, orders",
        pg.port
    );

    let cfg_text = format!(
        r#"
[api]
listen = "{listen}"
[telemetry]
log_level = "warn"
[iceberg]
catalog_name = "philotes"
uri = "sqlite://{dir}/catalog.db"
warehouse = "{dir}/warehouse"
[[pipelines]]
name = "shop"
source = "{source}"
tables = ["public.customers", "public.orders"]
namespace = "shop"
flush_interval = "1s"
"#,
        listen = opts.listen,
        dir = dir.display(),
        source = pg.url("shop", None),
    );
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = Config::parse(&cfg_text, &env)?;
    let telemetry = Telemetry::init(&cfg.telemetry).map_err(crate::agent::AgentError::from)?;
    telemetry.init_logging(&cfg.telemetry, cfg.secrets());
    let agent_iceberg = cfg.iceberg.clone();
    let agent = Agent::start(cfg, telemetry).await?;
    if let Some(addr) = agent.api_addr {
        println!("▶ metrics: http://{addr}/metrics   status: http://{addr}/api/v1/pipelines/shop");
    }
    // Changes made before the slot exists would never reach Iceberg: generate only once the
    // pipeline streams (with `snapshot = "initial"` rows that exist already are copied too).
    let handle = agent.pipelines[0].clone();
    let ready = Instant::now();
    println!("▶ waiting for the pipeline to stream (replication slot, publication, tables)");
    while status::snapshot(&handle.status).state != PipelineState::Streaming {
        if ready.elapsed() > Duration::from_secs(120) {
            let st = status::snapshot(&handle.status);
            agent.stop().await;
            pg.stop();
            return Err(DemoError::Io(format!(
                "the pipeline did not start streaming within 2 minutes (state {:?}, last error: {})",
                st.state,
                st.last_error.unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "▶ generating ~{} changes/s{} — Ctrl-C to stop\n",
        opts.rate,
        opts.duration
            .map(|d| format!(" for {}", humantime::format_duration(d)))
            .unwrap_or_default()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gen = tokio::spawn(generate(db, opts.rate, stop_rx));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tick.tick() => {
                let st = status::snapshot(&handle.status);
                let (ev, rows): (u64, u64) = st.tables.values().fold((0, 0), |(e, r), t| {
                    (e + t.inserts + t.updates + t.deletes + t.truncates, r + t.committed_rows)
                });
                println!(
                    "  {:>4}s  state={:<9} events={:<7} committed={:<7} lag={:.1}s confirmed={}",
                    started.elapsed().as_secs(),
                    format!("{:?}", st.state).to_lowercase(),
                    ev,
                    rows,
                    st.lag_seconds,
                    st.confirmed_lsn
                );
                if let Some(e) = &st.last_error {
                    println!("        last error: {e}");
                }
                if opts.duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let generated = match gen.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            agent.stop().await;
            pg.stop();
            return Err(e);
        }
        Err(e) => {
            agent.stop().await;
            pg.stop();
            return Err(DemoError::Io(format!("the change generator stopped: {e}")));
        }
    };
    // Give the last transactions time to reach Iceberg (bounded), then drain: the pipeline
    // flushes on stop. The proof below reads the tables back; it does not trust counters.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(30) {
        let st = status::snapshot(&handle.status);
        let committed: u64 = st.tables.values().map(|t| t.committed_rows).sum();
        if committed >= generated.total() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What the agent's telemetry says about the run, read as any scraper would.
    if let Some(addr) = agent.api_addr {
        let url = format!("http://{addr}/metrics");
        // The flush's counters are recorded just after its tables' commits: wait a moment
        // for the last one.
        let mut last = None;
        for _ in 0..20 {
            last = Some(fetch_text(&url).await.map(|t| figures::read(&t)));
            if let Some(Ok(f)) = &last {
                if f.rows >= generated.total() as f64 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match last {
            Some(Ok(f)) => println!("\n▶ {url}: {f}"),
            Some(Err(e)) => println!("\n▶ {url} did not answer: {e}"),
            None => {}
        }
    }
    agent.stop().await;
    pg.stop();
    let _ = std::fs::remove_dir_all(&pg_dir);
    let mut in_iceberg = Counts::default();
    let mut per_table = Vec::new();
    for table in ["customers", "orders"] {
        let c = count_changes(&agent_iceberg, "shop", table).await?;
        per_table.push(format!("{table} {}", c.total()));
        in_iceberg.add(&c);
    }
    println!(
        "\n{} generated {} changes ({}); {} rows in Iceberg ({}; {}) in {}",
        if generated == in_iceberg {
            "✔"
        } else {
            "✘"
        },
        generated.total(),
        generated.describe(),
        in_iceberg.total(),
        per_table.join(", "),
        in_iceberg.describe(),
        dir.display()
    );
    if generated != in_iceberg {
        return Err(DemoError::Mismatch {
            generated: generated.total(),
            committed: in_iceberg.total(),
        });
    }
    let metadata = metadata_location(&agent_iceberg, "shop", "orders").await;
    print_query_help(&dir, metadata.as_deref());
    Ok(())
}

async fn fetch_text(url: &str) -> Result<String, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

/// Changes by kind: what the generator made, or what the changelog tables hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows inserted (`_cdc_op = 'I'`).
    pub inserts: u64,
    /// Rows updated (`U`).
    pub updates: u64,
    /// Rows deleted (`D`).
    pub deletes: u64,
    /// Any other row (snapshot reads `R`, truncates `T`); the demo makes none.
    pub other: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.inserts + self.updates + self.deletes + self.other
    }

    fn add(&mut self, o: &Counts) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
        self.other += o.other;
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{} inserts, {} updates, {} deletes",
            self.inserts, self.updates, self.deletes
        );
        if self.other > 0 {
            s.push_str(&format!(", {} other", self.other));
        }
        s
    }
}

/// Count the rows of a changelog table by `_cdc_op`, read back from Iceberg.
async fn count_changes(
    cfg: &crate::config::IcebergConfig,
    ns: &str,
    table: &str,
) -> Result<Counts, DemoError> {
    use arrow_array::cast::AsArray;
    use futures::TryStreamExt;
    let err = |e: iceberg::Error| DemoError::Io(format!("reading {ns}.{table} back: {e}"));
    let cat = crate::sink::iceberg::open_catalog(cfg)
        .await
        .map_err(|e| DemoError::Io(e.to_string()))?;
    let ident = iceberg::TableIdent::new(iceberg::NamespaceIdent::new(ns.into()), table.into());
    let mut counts = Counts::default();
    if !cat.table_exists(&ident).await.map_err(err)? {
        return Ok(counts);
    }
    let t = cat.load_table(&ident).await.map_err(err)?;
    if t.metadata().current_snapshot().is_none() {
        return Ok(counts);
    }
    let batches: Vec<arrow_array::RecordBatch> = t
        .scan()
        .select(["_cdc_op"])
        .build()
        .map_err(err)?
        .to_arrow()
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)?;
    for b in &batches {
        let Some(ops) = b.column(0).as_string_opt::<i32>() else {
            return Err(DemoError::Io(format!(
                "{ns}.{table}: _cdc_op is not a string"
            )));
        };
        for op in ops.iter() {
            match op {
                Some("I") => counts.inserts += 1,
                Some("U") => counts.updates += 1,
                Some("D") => counts.deletes += 1,
                _ => counts.other += 1,
            }
        }
    }
    Ok(counts)
}

async fn metadata_location(
    cfg: &crate::config::IcebergConfig,
    ns: &str,
    table: &str,
) -> Option<String> {
    let cat = crate::sink::iceberg::open_catalog(cfg).await.ok()?;
    let ident = iceberg::TableIdent::new(iceberg::NamespaceIdent::new(ns.into()), table.into());
    let t = cat.load_table(&ident).await.ok()?;
    t.metadata_location().map(str::to_string)
}

/// The query blocks printed at the end. Each runs as printed in a shell, offline, after the
/// one `pip install` line above it; the test suite runs them against the demo's output.
fn print_query_help(dir: &Path, metadata: Option<&str>) {
    let d = dir.display();
    let m = metadata.unwrap_or("<warehouse>/shop/orders/metadata/<latest>.metadata.json");
    println!(
        r#"
Query the changelog tables (one row per change; see docs/querying.md):

  PyIceberg — pip install 'pyiceberg[sql-sqlite,pyarrow]'

python3 - <<'EOF'
from collections import Counter
from pyiceberg.catalog.sql import SqlCatalog
cat = SqlCatalog("philotes", uri="sqlite:///{d}/catalog.db", warehouse="file://{d}/warehouse")
for name in ("shop.customers", "shop.orders"):
    rows = cat.load_table(name).scan().to_arrow()
    print(f"{{name}}: {{rows.num_rows}} rows", dict(sorted(Counter(rows["_cdc_op"].to_pylist()).items())))
EOF

  DuckDB — pip install duckdb==1.5.5 duckdb-extension-avro duckdb-extension-iceberg

python3 - <<'EOF'
import glob, duckdb, duckdb_extension_avro, duckdb_extension_iceberg
con = duckdb.connect(config={{"autoinstall_known_extensions": False, "autoload_known_extensions": False}})
for ext, name in ((duckdb_extension_avro, "avro"), (duckdb_extension_iceberg, "iceberg")):
    con.load_extension(glob.glob(f"{{ext.__path__[0]}}/extensions/*/{{name}}.duckdb_extension")[0])
rows = con.sql("SELECT _cdc_op, count(*) FROM iceberg_scan('{m}') GROUP BY 1 ORDER BY 1").fetchall()
print(f"shop.orders: {{sum(n for _, n in rows)}} rows", dict(rows))
EOF
"#
    );
}

/// Insert, update and delete rows at about `rate` changes per second until told to stop;
/// returns what the statements really changed (an UPDATE or DELETE may find fewer rows than
/// asked for).
async fn generate(
    mut db: tokio_postgres::Client,
    rate: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Counts, DemoError> {
    let mut counts = Counts::default();
    let per_tick = (rate / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let (new_customers, new_orders, updates, delete) = {
            let mut rng = rand::rng();
            let c = rng.random_range(0..=1i32);
            let o = (per_tick as i32 - c).max(1);
            let u = rng.random_range(0..=per_tick as i32 / 4 + 1);
            (c, o, u, rng.random_range(0..10) == 0)
        };
        let tx = db.transaction().await.map_err(sql_err)?;
        let mut tick_counts = Counts::default();
        tick_counts.inserts += tx
            .execute(
                "INSERT INTO customers (name, email, vip)
                 SELECT 'customer ' || g, 'c' || g || '@example.com', random() < 0.1
                 FROM generate_series(1, $1::int) g",
                &[&new_customers],
            )
            .await
            .map_err(sql_err)?;
        tick_counts.inserts += tx
            .execute(
                "INSERT INTO orders (customer_id, amount, items, note)
                 SELECT 1 + floor(random() * greatest((SELECT max(id) FROM customers), 1))::bigint,
                        round((1 + random() * 499)::numeric, 2),
                        ARRAY[1 + floor(random() * 99)::int, 1 + floor(random() * 99)::int],
                        '{\"channel\": \"web\"}'
                 FROM generate_series(1, $1::int)",
                &[&new_orders],
            )
            .await
            .map_err(sql_err)?;
        tick_counts.updates += tx
            .execute(
                "UPDATE orders SET status = 'paid', updated_at = now()
                 WHERE id IN (SELECT id FROM orders WHERE status = 'new'
                              ORDER BY random() LIMIT $1::int)",
                &[&updates],
            )
            .await
            .map_err(sql_err)?;
        if delete {
            tick_counts.deletes += tx
                .execute(
                    "DELETE FROM orders WHERE id =
                     (SELECT min(id) FROM orders WHERE status = 'paid')",
                    &[],
                )
                .await
                .map_err(sql_err)?;
        }
        tx.commit().await.map_err(sql_err)?;
        counts.add(&tick_counts);
    }
    Ok(counts)
}
