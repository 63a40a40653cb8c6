//! `philotes demo`: a private PostgreSQL, generated changes, one pipeline into a local
//! warehouse, `/metrics` live, progress on the terminal and the query lines at the end.

pub mod postgres;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::agent::{shutdown_signal, Agent};
use crate::config::Config;
use crate::pipeline::status;
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
    let handle = agent.pipelines[0].clone();
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
    let generated = gen.await.unwrap_or(Ok(0)).unwrap_or(0);
    // Let the last transactions reach Iceberg, then drain (the pipeline flushes on stop).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let iceberg_cfg = agent_iceberg.clone();
    agent.stop().await;
    pg.stop();
    let _ = std::fs::remove_dir_all(&pg_dir);
    let st = status::snapshot(&handle.status);
    let committed: u64 = st.tables.values().map(|t| t.committed_rows).sum();
    println!(
        "\n✔ generated {generated} changes; {committed} rows committed to Iceberg in {}",
        dir.display()
    );
    let metadata = metadata_location(&iceberg_cfg, "shop", "orders").await;
    print_query_help(&dir, metadata.as_deref());
    Ok(())
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

fn print_query_help(dir: &Path, metadata: Option<&str>) {
    let d = dir.display();
    let m = metadata.unwrap_or("<warehouse>/shop/orders/metadata/<latest>.metadata.json");
    println!(
        r#"
Query the changelog tables:

  PyIceberg:
    python3 -c "from pyiceberg.catalog.sql import SqlCatalog; c = SqlCatalog('philotes', uri='sqlite:///{d}/catalog.db', warehouse='file://{d}/warehouse'); print(c.load_table('shop.orders').scan().to_arrow().to_pandas())"

  DuckDB (duckdb 1.5.5 with the iceberg extension):
    SELECT _cdc_op, count(*) FROM iceberg_scan('{m}') GROUP BY 1;
"#
    );
}

/// Insert, update and delete rows at about `rate` changes per second until told to stop.
async fn generate(
    db: tokio_postgres::Client,
    rate: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<u64, DemoError> {
    let mut n = 0u64;
    let per_tick = (rate / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut customers: i64 = 0;
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let mut sql = String::from("BEGIN;");
        let (new_customers, new_orders, updates, deletes) = {
            let mut rng = rand::rng();
            let c = rng.random_range(0..=1u32);
            let o = per_tick.saturating_sub(c).max(1);
            let u = rng.random_range(0..=per_tick / 4 + 1);
            let d = u32::from(rng.random_range(0..10) == 0);
            for i in 0..c {
                sql.push_str(&format!(
                    "INSERT INTO customers (name, email, vip) VALUES ('customer {}', 'c{}@example.com', {});",
                    customers + i as i64 + 1,
                    customers + i as i64 + 1,
                    rng.random_bool(0.1)
                ));
            }
            for _ in 0..o {
                sql.push_str(&format!(
                    "INSERT INTO orders (customer_id, amount, items, note) VALUES ({}, {:.2}, '{{{},{}}}', '{{\"channel\": \"web\"}}');",
                    rng.random_range(1..=customers.max(1)),
                    rng.random_range(1.0..500.0f64),
                    rng.random_range(1..100),
                    rng.random_range(1..100)
                ));
            }
            (c, o, u, d)
        };
        customers += new_customers as i64;
        sql.push_str(&format!(
            "UPDATE orders SET status = 'paid', updated_at = now() WHERE id IN (SELECT id FROM orders WHERE status = 'new' ORDER BY random() LIMIT {updates});"
        ));
        if deletes > 0 {
            sql.push_str(
                "DELETE FROM orders WHERE id = (SELECT min(id) FROM orders WHERE status = 'paid');",
            );
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql).await.map_err(sql_err)?;
        n += (new_customers + new_orders + updates + deletes) as u64;
    }
    Ok(n)
}
