//! Table maintenance against real components: compaction and snapshot expiry while the stream
//! keeps committing, read back by PyIceberg and DuckDB; every referenced file exists; time
//! travel to retained snapshots; another writer appending meanwhile; SIGKILL during
//! maintenance; `philotes maintain --dry-run` changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

/// Aggressive maintenance: every second, compaction from 4 small files, snapshots older than
/// 2 s expire (the newest 3 stay), 3 previous metadata files.
const MAINTENANCE: &str = "[maintenance]\ninterval = \"1s\"\nsnapshot_retention = \"2s\"\nretain_last = 3\nmetadata_versions = 3\nmin_input_files = 4\n";

const DDL: &str = "CREATE TABLE t (id int PRIMARY KEY, s text, n bigint)";

/// PostgreSQL with table `t`, and an agent config for it with `maintenance` on top.
async fn setup(maintenance: &str) -> (TestPg, tokio_postgres::Client, Workdir, PathBuf) {
    prepare(DDL, &["t"], "", maintenance).await.parts()
}

/// [`setup`] with `flush_interval = "20ms"`, the agent streaming, and the test session on
/// synchronous commit: the walsender then sends each transaction at once, not in
/// `wal_writer_delay` bursts, so the agent commits about every flush interval. Returns the
/// agent's API address too.
async fn fast_stream(
    maintenance: &str,
) -> (TestPg, tokio_postgres::Client, Workdir, AgentProc, String) {
    let (pg, db, work, cfg) = setup(maintenance).await;
    edit_config(
        &cfg,
        "flush_interval = \"300ms\"",
        "flush_interval = \"20ms\"",
    );
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    db.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let addr = agent.api_addr().unwrap();
    (pg, db, work, agent, addr)
}

/// `tests/py/health.py` on `ns.<table>`. A reader that loaded the metadata just before an
/// expiry may find an expired snapshot's files gone (as any reader of an expired snapshot
/// would): it reads again, as a user would.
fn health(work: &Workdir, table: &str, time_travel: bool) -> Value {
    let mut last = String::new();
    for _ in 0..5 {
        match try_health(work, table, time_travel) {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("health.py: {last}");
}

fn try_health(work: &Workdir, table: &str, time_travel: bool) -> Result<Value, String> {
    let mut cmd = Command::new(python());
    cmd.arg(py_script("health.py"))
        .arg("--catalog-db")
        .arg(work.catalog_db())
        .arg("--warehouse")
        .arg(work.warehouse())
        .args(["--table", table]);
    if time_travel {
        cmd.arg("--time-travel");
    }
    let out = cmd.output().expect("health.py");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Every file under `dir` with its size (to prove a dry run touched nothing).
fn listing(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().display().to_string(), m.len());
            }
        }
    }
    out
}

/// `n` small transactions (insert two, update one, delete one every third), each its own
/// commit; returns the changelog rows they make.
async fn trickle(db: &tokio_postgres::Client, from: i32, n: i32) -> u64 {
    let mut rows = 0;
    for i in from..from + n {
        let mut sql = format!(
            "BEGIN; INSERT INTO t VALUES ({a}, 'a', {a}), ({b}, 'b', {b}); UPDATE t SET n = n + 1 WHERE id = {a};",
            a = 2 * i,
            b = 2 * i + 1
        );
        rows += 3;
        if i % 3 == 0 {
            sql.push_str(&format!("DELETE FROM t WHERE id = {};", 2 * i + 1));
            rows += 1;
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    rows
}

fn state_query() -> &'static str {
    "SELECT id, s, n FROM t"
}

fn check_exact(work: &Workdir, pg: &TestPg, rows: u64) {
    let v = verify_source(work, "ns.t", pg, state_query(), &["--duckdb"]);
    assert_eq!(v["rows"], rows, "{v}");
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["duckdb_equal"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_removes_the_schemas_no_snapshot_uses() {
    // Every schema change added a schema to metadata.json for good: a table whose column
    // types changed a few hundred times carried 280 schemas (3.3 MB) in every commit.
    let (pg, db, work, cfg) = setup(MAINTENANCE).await;
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    let mut rows = trickle(&db, 0, 2).await;
    for i in 0..12 {
        // A type change Iceberg cannot promote (a new field each time) and a rename.
        let to = if i % 2 == 0 { "text" } else { "bigint" };
        db.batch_execute(&format!(
            "ALTER TABLE t ADD COLUMN c{i} int; ALTER TABLE t ALTER c{i} TYPE {to} USING c{i}::{to};
             ALTER TABLE t RENAME c{i} TO d{i};"
        ))
        .await
        .expect("schema change");
        rows += trickle(&db, 2 + 2 * i, 2).await;
        wait_rows(&work, "ns.t", rows, 60).await;
    }
    // Quiet: snapshots past their retention go, and with them the schemas they were written
    // with; every retained snapshot keeps its schema (time travel reads them all).
    let h = wait_for(
        Duration::from_secs(60),
        "unused schemas removed",
        || async {
            let h = health(&work, "ns.t", true);
            (h["schemas"].as_u64()? <= 4).then_some(h)
        },
    )
    .await;
    assert_eq!(h["snapshots_without_schema"], serde_json::json!([]), "{h}");
    assert_eq!(
        h["missing"],
        serde_json::json!([]),
        "dangling references: {h}"
    );
    let text = agent.log_text();
    // Removed as their snapshots expired, pass by pass (about one per schema change).
    let removed: u64 = text
        .lines()
        .filter_map(|l| {
            l.split(", removed ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(removed >= 10, "{removed} schemas removed: {text}");
    assert!(!text.contains("maintenance failed"), "{text}");
    check_exact(&work, &pg, rows);
    // The stream goes on after its old schemas are gone, through another change.
    db.batch_execute("ALTER TABLE t ADD COLUMN z text")
        .await
        .expect("add z");
    rows += trickle(&db, 100, 3).await;
    wait_rows(&work, "ns.t", rows, 60).await;
    check_exact(&work, &pg, rows);
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_expiry_keep_every_row_and_bound_the_table() {
    let (pg, db, work, cfg) = setup(MAINTENANCE).await;
    let log = work.path().join("agent.log");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    let rows = trickle(&db, 0, 40).await;
    wait_rows(&work, "ns.t", rows, 60).await;
    // The debt is paid off while the table is quiet: few files, few snapshots.
    let h = wait_for(
        Duration::from_secs(60),
        "a compacted, expired table",
        || async {
            let h = health(&work, "ns.t", false);
            (h["data_files"].as_u64()? <= 4 && h["snapshots"].as_u64()? <= 4).then_some(h)
        },
    )
    .await;
    assert_eq!(
        h["missing"],
        serde_json::json!([]),
        "dangling references: {h}"
    );
    assert!(
        h["metadata_files_on_disk"].as_u64().unwrap() <= 3 + 2,
        "metadata files bounded by metadata_versions: {h}"
    );
    let text = agent.log_text();
    assert!(
        text.contains("maintenance: rewrote"),
        "compaction ran: {text}"
    );
    assert!(text.contains("maintenance: expired"), "expiry ran: {text}");
    check_exact(&work, &pg, rows);
    // Time travel to every retained snapshot works, the newest reads the whole table.
    let h = health(&work, "ns.t", true);
    let tt = h["time_travel_rows"].as_object().unwrap();
    assert!(!tt.is_empty());
    assert!(
        tt.values().any(|n| n.as_u64() == Some(rows)),
        "the current snapshot by time travel: {h}"
    );
    // The contract's table-health series, scraped.
    let addr = agent.api_addr().unwrap();
    assert!(
        metric_value(
            &addr,
            "philotes_iceberg_maintenance_total",
            "action=\"compact\",source=\"p\",status=\"ok\""
        )
        .await
            >= 1.0
    );
    assert!(
        metric_value(
            &addr,
            "philotes_iceberg_files_removed_total",
            "table=\"ns.t\""
        )
        .await
            >= 1.0
    );
    // What compaction wrote: the table's rows once at least, in bytes.
    assert!(
        metric_value(
            &addr,
            "philotes_iceberg_compacted_bytes_total",
            "table=\"ns.t\""
        )
        .await
            >= 1000.0
    );
    assert!(
        metric_value(&addr, "philotes_iceberg_table_data_files", "table=\"ns.t\"").await >= 1.0
    );
    assert!(metric_value(&addr, "philotes_iceberg_table_snapshots", "table=\"ns.t\"").await >= 1.0);
    assert!(
        metric_value(
            &addr,
            "philotes_iceberg_table_metadata_bytes",
            "table=\"ns.t\""
        )
        .await
            > 100.0
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// At a short flush interval the stream commits many times while a compaction rewrites: the
/// rewrite must still land (it used to lose every race to the agent's own stream and stay in
/// conflict for as long as the stream was busy), and no row may be lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_lands_while_the_stream_commits_every_few_milliseconds() {
    let (pg, db, work, agent, addr) = fast_stream(MAINTENANCE).await;
    let compactions = || async {
        metric_value(
            &addr,
            "philotes_iceberg_maintenance_total",
            "action=\"compact\",source=\"p\",status=\"ok\"",
        )
        .await
    };
    let started = std::time::Instant::now();
    let mut rows = 0u64;
    let mut i = 0;
    // One-row transactions until two compactions landed while they streamed (or 60 s).
    while compactions().await < 2.0 && started.elapsed() < Duration::from_secs(60) {
        for _ in 0..20 {
            db.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'fast', {i})"))
                .await
                .unwrap();
            i += 1;
            rows += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let landed = compactions().await;
    let commits = metric_value(
        &addr,
        "philotes_iceberg_commits_total",
        "table=\"public.t\"",
    )
    .await;
    let conflicts = metric_value(
        &addr,
        "philotes_iceberg_maintenance_total",
        "status=\"conflict\"",
    )
    .await;
    println!("{rows} rows, {commits} stream commits, {landed} compactions, {conflicts} maintenance conflicts");
    assert!(
        landed >= 2.0,
        "compaction landed while the stream committed ({commits} commits, {conflicts} conflicts)"
    );
    assert_eq!(
        conflicts, 0.0,
        "the agent's own commits never put its maintenance in conflict"
    );
    wait_rows(&work, "ns.t", rows, 60).await;
    // Stopped first: with 2 s retention, maintenance still expiring snapshots would delete
    // files under a reader that loaded the metadata a moment before (a reader's race, not a
    // dangling reference in the table).
    assert_eq!(agent.terminate(), Some(0));
    check_exact(&work, &pg, rows);
    let h = health(&work, "ns.t", false);
    assert_eq!(
        h["missing"],
        serde_json::json!([]),
        "dangling references: {h}"
    );
}

/// Maintenance runs when a table needs it, not only on its timer: with `interval = "1h"` (the
/// timer fires once, at start) a table that gains small files quickly is compacted anyway,
/// woken by the files the stream commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_file_debt_wakes_maintenance_before_its_interval() {
    let (pg, db, work, agent, addr) =
        fast_stream(&MAINTENANCE.replace("interval = \"1s\"", "interval = \"1h\"")).await;
    let mut rows = 0u64;
    for i in 0..120 {
        db.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'debt', {i})"))
            .await
            .unwrap();
        rows += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_for(
        Duration::from_secs(60),
        "a compaction woken by debt",
        || async {
            (metric_value(
                &addr,
                "philotes_iceberg_maintenance_total",
                "action=\"compact\",source=\"p\",status=\"ok\"",
            )
            .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    wait_rows(&work, "ns.t", rows, 60).await;
    check_exact(&work, &pg, rows);
    let commits = metric_value(
        &addr,
        "philotes_iceberg_commits_total",
        "table=\"public.t\"",
    )
    .await;
    let files = health(&work, "ns.t", false)["data_files"].as_u64().unwrap();
    println!("{commits} commits, {files} data files after debt-woken maintenance");
    assert!(
        files < 40,
        "the table holds {files} files after {commits} commits"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_appending_while_the_agent_compacts_keeps_both_writers_rows() {
    let (_pg, db, work, cfg) = setup(MAINTENANCE).await;
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    let first = trickle(&db, 0, 12).await;
    wait_rows(&work, "ns.t", first, 60).await;
    let compactions_before = agent.log_text().matches("maintenance: rewrote").count();
    // PyIceberg appends as another writer would, retrying its own conflicts, while the
    // agent streams and compacts.
    let other = tokio::task::spawn_blocking({
        let catalog_db = work.catalog_db();
        let warehouse = work.warehouse();
        move || {
            let code = format!(
                "import pyarrow as pa, datetime, time\n\
                 from pyiceberg.catalog.sql import SqlCatalog\n\
                 c = SqlCatalog('philotes', uri='sqlite:///{db}', warehouse='file://{wh}')\n\
                 done = 0\n\
                 for i in range(8):\n\
                 \x20   for attempt in range(20):\n\
                 \x20       try:\n\
                 \x20           t = c.load_table('ns.t')\n\
                 \x20           row = {{'id': [900000 + i], 's': ['other writer'], 'n': [i], '_cdc_op': ['I'], '_cdc_lsn': [1], '_cdc_seq': [i],\n\
                 \x20                  '_cdc_ts': [datetime.datetime.now(datetime.timezone.utc)], '_cdc_unchanged': [[]]}}\n\
                 \x20           t.append(pa.Table.from_pydict(row, schema=t.schema().as_arrow()))\n\
                 \x20           done += 1\n\
                 \x20           break\n\
                 \x20       except Exception as e:\n\
                 \x20           time.sleep(0.2)\n\
                 \x20   time.sleep(0.5)\n\
                 print(done)\n",
                db = catalog_db.display(),
                wh = warehouse.display()
            );
            run_cmd(Command::new(python()).arg("-c").arg(code))
        }
    });
    let second = trickle(&db, 100, 16).await;
    let (code, out) = other.await.unwrap();
    assert_eq!(code, 0, "{out}");
    // (PyIceberg also deletes metadata files dropped from the log; when the agent was first
    // it warns on stderr that the file is gone.)
    assert_eq!(
        out.lines().next().map(str::trim),
        Some("8"),
        "the other writer appended every row: {out}"
    );
    wait_rows(&work, "ns.t", first + second + 8, 60).await;
    // Let maintenance run over both writers' files, then read everything back.
    // Compaction ran while both wrote (the other writer's rows sort before the agent's, so
    // its files may wait for a later run: no file count is promised here).
    let compactions = agent.log_text().matches("maintenance: rewrote").count();
    assert!(
        compactions > compactions_before,
        "compaction ran while the other writer appended"
    );
    // Quiet: no snapshot left to expire, so the read below races no expiry.
    wait_for(Duration::from_secs(60), "expiry settles", || async {
        (health(&work, "ns.t", false)["snapshots"].as_u64()? <= 3).then_some(())
    })
    .await;
    let (code, out) = pyiceberg(
        &work,
        "t = c.load_table('ns.t').scan().to_arrow().to_pylist()\n\
         others = [r for r in t if r['s'] == 'other writer']\n\
         ours = [(r['_cdc_lsn'], r['_cdc_seq']) for r in t if r['s'] != 'other writer']\n\
         print(len(t), len(others), len(set(r['id'] for r in others)), len(ours), len(set(ours)))\n",
    );
    assert_eq!(code, 0, "{out}");
    let n: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(
        n,
        vec![first + second + 8, 8, 8, first + second, first + second],
        "{out}"
    );
    let h = health(&work, "ns.t", false);
    assert_eq!(h["missing"], serde_json::json!([]), "{h}");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_maintenance_loses_and_duplicates_nothing() {
    let (pg, db, work, cfg) = setup(MAINTENANCE).await;
    let log = work.path().join("agent.log");
    let mut rows = 0;
    // Each round: stream a burst of small commits, then kill the agent while maintenance is
    // busy with them (compaction starts at 4 small files, expiry after 2 s).
    for round in 0..4 {
        let agent = AgentProc::start_streaming(&cfg, &log).await;
        rows += trickle(&db, round * 100, 10).await;
        let before = agent.log_text().matches("maintenance:").count();
        wait_for(Duration::from_secs(30), "maintenance at work", || async {
            (agent.log_text().matches("maintenance:").count() > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(150 + 300 * round as u64)).await;
        agent.kill9();
    }
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    wait_rows(&work, "ns.t", rows, 90).await;
    let h = wait_for(Duration::from_secs(60), "maintenance settles", || async {
        let h = health(&work, "ns.t", false);
        (h["data_files"].as_u64()? <= 4).then_some(h)
    })
    .await;
    assert_eq!(
        h["missing"],
        serde_json::json!([]),
        "dangling references: {h}"
    );
    check_exact(&work, &pg, rows);
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_dry_run_changes_nothing_and_maintain_does_the_work() {
    // The agent leaves maintenance to the operator.
    let (pg, db, work, cfg) = setup(
        "[maintenance]\nenabled = false\nsnapshot_retention = \"1s\"\nretain_last = 1\nmin_input_files = 4\nmetadata_versions = 3\n",
    )
    .await;
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    let rows = trickle(&db, 0, 12).await;
    wait_rows(&work, "ns.t", rows, 60).await;
    assert_eq!(agent.terminate(), Some(0));
    let before = health(&work, "ns.t", false);
    assert!(before["data_files"].as_u64().unwrap() >= 8, "{before}");
    // Hygiene still applies on every commit with maintenance off: old metadata files go.
    assert!(
        before["metadata_files_on_disk"].as_u64().unwrap() <= 3 + 2,
        "{before}"
    );
    // The writer chose plain pages for the source key and the commit positions, as compaction's
    // re-encoding must (it learns that from its inputs, `maintain` runs without the stream).
    assert_eq!(dictionary_columns(&work), ["_cdc_op", "n", "s"]);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let files = listing(&work.warehouse());
    let catalog = std::fs::read(work.catalog_db()).unwrap();
    let (code, out) = run_philotes(&["maintain", "--dry-run"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ns.t\tcompact\tok\twould rewrite"), "{out}");
    assert!(out.contains("ns.t\texpire\tok\twould expire"), "{out}");
    assert_eq!(
        listing(&work.warehouse()),
        files,
        "a dry run wrote or deleted files"
    );
    assert_eq!(
        std::fs::read(work.catalog_db()).unwrap(),
        catalog,
        "a dry run committed"
    );

    let (code, out) = run_philotes(&["maintain", "--table", "ns.t"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ns.t\tcompact\tok\trewrote"), "{out}");
    assert!(out.contains("ns.t\texpire\tok\texpired"), "{out}");
    let after = health(&work, "ns.t", true);
    assert!(
        after["data_files"].as_u64().unwrap() < before["data_files"].as_u64().unwrap(),
        "{after}"
    );
    assert_eq!(after["snapshots"], 1, "{after}");
    assert_eq!(after["missing"], serde_json::json!([]), "{after}");
    assert_eq!(dictionary_columns(&work), ["_cdc_op", "n", "s"]);
    assert!(
        listing(&work.warehouse()).len() < files.len(),
        "replaced files and expired manifests were deleted"
    );
    check_exact(&work, &pg, rows);

    // Unknown names are usage errors.
    let (code, out) = run_philotes(&["maintain", "--pipeline", "nope"], &cfg);
    assert_eq!(code, 2, "{out}");
}

/// The top-level primitive columns that have a dictionary page in every live data file of
/// `ns.t` (pyarrow's reading of the files' footers); a column with one in some files only
/// fails the test.
fn dictionary_columns(work: &Workdir) -> Vec<String> {
    let (code, out) = pyiceberg(
        work,
        "import pyarrow.parquet as pq, json\n\
         t = c.load_table('ns.t')\n\
         seen = {}\n\
         for f in t.inspect.files().to_pylist():\n\
         \x20   md = pq.ParquetFile(f['file_path'].removeprefix('file://')).metadata\n\
         \x20   for g in range(md.num_row_groups):\n\
         \x20       for i in range(md.num_columns):\n\
         \x20           col = md.row_group(g).column(i)\n\
         \x20           if '.' in col.path_in_schema: continue\n\
         \x20           seen.setdefault(col.path_in_schema, set()).add(col.has_dictionary_page)\n\
         print(json.dumps({k: sorted(v) for k, v in seen.items()}))\n",
    );
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect(&out);
    let mut names = Vec::new();
    for (name, kinds) in v.as_object().expect("an object") {
        match kinds.as_array().map(Vec::as_slice) {
            Some([Value::Bool(true)]) => names.push(name.clone()),
            Some([Value::Bool(false)]) => {}
            _ => panic!("{name}: a dictionary in some files only: {v}"),
        }
    }
    names.sort();
    names
}

/// Files whose row groups are already large are compacted by copying their column chunks
/// into one file (no decoding): the output must read back exactly (PyIceberg and DuckDB
/// against PostgreSQL), keep every input row group, and carry statistics that match what is
/// in it (checked by reading the file with pyarrow), so that a filtered scan prunes right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_row_groups_are_compacted_by_copying_and_read_back_exactly() {
    let (pg, db, work, cfg) =
        setup("[maintenance]\nenabled = false\nsnapshot_retention = \"1h\"\nmin_input_files = 4\n")
            .await;
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    // Four transactions of 60,000 rows, each in its own flush (and so its own file with
    // one row group), with updates and deletes of earlier rows among them.
    let per = 60_000;
    let mut rows = 0u64;
    for i in 0..4 {
        let (lo, hi) = (i * per, (i + 1) * per - 1);
        let mut sql = format!(
            "BEGIN; INSERT INTO t SELECT g, md5(g::text), g * 3 FROM generate_series({lo}, {hi}) g;"
        );
        if i > 0 {
            sql.push_str(&format!(
                "UPDATE t SET s = 'updated', n = NULL WHERE id BETWEEN {a} AND {b}; DELETE FROM t WHERE id BETWEEN {c} AND {d};",
                a = lo - per,
                b = lo - per + 99,
                c = lo - per + 100,
                d = lo - per + 149
            ));
            rows += 150;
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql).await.unwrap();
        rows += per as u64;
        wait_rows(&work, "ns.t", rows, 60).await;
    }
    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(health(&work, "ns.t", false)["data_files"].as_u64(), Some(4));

    let (code, out) = run_philotes(&["maintain", "--table", "ns.t"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "ns.t\tcompact\tok\trewrote 4 small files into 1 (4 by copying their row groups)"
        ),
        "{out}"
    );
    check_exact(&work, &pg, rows);

    // The output, read independently: its row groups are the inputs', and the manifest's
    // statistics are what the file holds.
    let (code, out) = pyiceberg(
        &work,
        "import pyarrow.parquet as pq, pyarrow.compute as pc, os, json\n\
         t = c.load_table('ns.t')\n\
         files = t.inspect.files().to_pylist()\n\
         assert len(files) == 1, files\n\
         f = files[0]\n\
         path = f['file_path'].removeprefix('file://')\n\
         pf = pq.ParquetFile(path)\n\
         data = pf.read()\n\
         m = f['readable_metrics']\n\
         def col(name):\n\
         \x20   v = data.column(name)\n\
         \x20   mm = pc.min_max(v)\n\
         \x20   return {'min': mm['min'].as_py(), 'max': mm['max'].as_py(), 'nulls': v.null_count,\n\
         \x20           'lower': m[name]['lower_bound'], 'upper': m[name]['upper_bound'],\n\
         \x20           'values': m[name]['value_count'], 'null_count': m[name]['null_value_count']}\n\
         out = {'row_groups': pf.metadata.num_row_groups, 'rows': data.num_rows,\n\
         \x20      'record_count': f['record_count'], 'size': os.path.getsize(path),\n\
         \x20      'file_size_in_bytes': f['file_size_in_bytes'],\n\
         \x20      'split_offsets': f['split_offsets'],\n\
         \x20      'row_group_offsets': [pf.metadata.row_group(i).column(0).dictionary_page_offset or pf.metadata.row_group(i).column(0).data_page_offset for i in range(pf.metadata.num_row_groups)],\n\
         \x20      'id': col('id'), 'n': col('n'), 's': col('s'), '_cdc_lsn': col('_cdc_lsn')}\n\
         out['pruned'] = len(t.scan(row_filter='id >= 130000 and id < 130010').to_arrow())\n\
         out['outside'] = len(t.scan(row_filter='id > 10000000').to_arrow())\n\
         print(json.dumps(out, default=str))\n",
    );
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect(&out);
    assert_eq!(v["row_groups"], 4, "one row group per input, copied: {v}");
    assert_eq!(v["rows"], rows, "{v}");
    assert_eq!(v["record_count"], rows, "{v}");
    assert_eq!(v["size"], v["file_size_in_bytes"], "{v}");
    assert_eq!(v["split_offsets"], v["row_group_offsets"], "{v}");
    // A string bound keeps its first 16 characters (Iceberg's default `truncate(16)`), an
    // upper one rounded up past the maximum.
    let cut = |m: &Value| match m.as_str() {
        Some(t) if t.chars().count() > 16 => Value::from(t.chars().take(16).collect::<String>()),
        _ => m.clone(),
    };
    for name in ["id", "n", "s", "_cdc_lsn"] {
        let c = &v[name];
        assert_eq!(c["lower"], cut(&c["min"]), "{name}: {v}");
        match (c["upper"].as_str(), c["max"].as_str()) {
            (Some(u), Some(m)) if m.chars().count() > 16 => assert!(u > m, "{name}: {v}"),
            _ => assert_eq!(c["upper"], c["max"], "{name}: {v}"),
        }
        assert_eq!(c["values"], rows, "{name}: {v}");
        assert_eq!(c["null_count"], c["nulls"], "{name}: {v}");
    }
    // NULL `n` in the 300 updated rows; deletes carry the key only (150 rows, `s` and `n`).
    assert_eq!(v["n"]["null_count"], 450, "{v}");
    assert_eq!(v["s"]["null_count"], 150, "{v}");
    assert_eq!(v["pruned"], 10, "{v}");
    assert_eq!(v["outside"], 0, "{v}");
}

/// A schema update is committed when its Relation message arrives, its rows at the next
/// flush: in between the current schema is newer than the last snapshot's. Compaction read
/// the files in the snapshot's schema and wrote them in the current one, and failed
/// ("field id not found") at every run until the next append; the rewritten files must
/// read back under the new schema with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_between_a_schema_change_and_its_rows_keeps_every_row() {
    let (pg, db, work, cfg) =
        setup("[maintenance]\nenabled = false\nsnapshot_retention = \"1h\"\nmin_input_files = 4\n")
            .await;
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    let rows = trickle(&db, 0, 8).await;
    wait_rows(&work, "ns.t", rows, 60).await;
    assert_eq!(agent.terminate(), Some(0));
    // The row after the change waits for a flush that does not come before the kill.
    edit_config(
        &cfg,
        "flush_interval = \"300ms\"",
        "flush_interval = \"1h\"",
    );
    let log = work.path().join("agent2.log");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    db.batch_execute(
        "ALTER TABLE t RENAME COLUMN s TO label;
         ALTER TABLE t ADD COLUMN extra int;
         INSERT INTO t VALUES (100000, 'x', 1, 7);",
    )
    .await
    .unwrap();
    wait_log_line(&log, "the schema update", |l| {
        l.contains("schema change followed") && l.contains("add extra")
    })
    .await;
    agent.kill9();

    let (code, out) = run_philotes(&["maintain", "--table", "ns.t"], &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ns.t\tcompact\tok\trewrote"), "{out}");
    assert_eq!(
        health(&work, "ns.t", false)["missing"],
        serde_json::json!([])
    );

    // The restarted agent streams the row; every row reads back (its label under the new
    // name), old rows with no extra.
    edit_config(
        &cfg,
        "flush_interval = \"1h\"",
        "flush_interval = \"300ms\"",
    );
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent3.log")).await;
    let v = wait_source_equal(
        &work,
        "ns.t",
        &pg,
        "SELECT id, label, n, extra FROM t",
        &["--duckdb"],
        60,
    )
    .await;
    assert_eq!(v["rows"], rows + 1, "{v}");
    drop(agent);
}

/// Sizes of `table`'s current data files, as PyIceberg lists them.
fn file_sizes(work: &Workdir, table: &str) -> Vec<u64> {
    let (code, out) = pyiceberg(
        work,
        &format!(
            "import json\n\
             files = c.load_table('{table}').inspect.files().to_pylist()\n\
             print(json.dumps(sorted(f['file_size_in_bytes'] for f in files)))\n"
        ),
    );
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(out.lines().last().unwrap_or("")).expect(&out)
}

/// Compaction's outputs must not be "small" again, or every run rewrites them into as many
/// files, for ever. Both paths: files with small row groups are re-encoded (the writer's
/// rollover, measured before compression, made files of what the target compresses to),
/// files with large ones are concatenated (inputs of 0.6 × the target went one per output).
/// The second run finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_outputs_are_not_compacted_again() {
    let (pg, db, work, cfg) = prepare(
        "CREATE TABLE t (id int PRIMARY KEY, s text, n bigint);
         CREATE TABLE u (id int PRIMARY KEY, s text, n bigint);",
        &["t", "u"],
        "",
        "[maintenance]\nenabled = false\nsnapshot_retention = \"1h\"\nmin_input_files = 4\ntarget_file_size = \"1MiB\"\n",
    )
    .await
    .parts();
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    // `t`: eight transactions of 30,000 rows (row groups too small to copy); `u`: four of
    // 60,000 (copied). Each in its own flush, so its own file.
    let load = |table: &'static str, s: &'static str, n: i64, per: i64| {
        let (db, work) = (&db, &work);
        async move {
            for i in 0..n {
                let (lo, hi) = (i * per, (i + 1) * per - 1);
                db.batch_execute(&format!(
                    "INSERT INTO {table} SELECT g, {s}, g * 3 FROM generate_series({lo}, {hi}) g"
                ))
                .await
                .unwrap();
                wait_rows(work, &format!("ns.{table}"), ((i + 1) * per) as u64, 60).await;
            }
            (n * per) as u64
        }
    };
    let rows = (
        load("t", "md5(g::text) || md5((g * 7)::text)", 8, 30_000).await,
        load("u", "md5(g::text)", 4, 60_000).await,
    );
    assert_eq!(agent.terminate(), Some(0));

    // The target: `u`'s files are 0.6 of it, `t`'s several times it in all.
    let u = file_sizes(&work, "ns.u");
    assert_eq!(u.len(), 4, "{u:?}");
    let target = u.iter().sum::<u64>() / 4 * 5 / 3;
    assert!(file_sizes(&work, "ns.t").iter().sum::<u64>() > 3 * target);
    edit_config(
        &cfg,
        "target_file_size = \"1MiB\"",
        &format!("target_file_size = \"{target}\""),
    );
    for (table, copied) in [("ns.t", false), ("ns.u", true)] {
        let (code, out) = run_philotes(&["maintain", "--table", table], &cfg);
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!("{table}\tcompact\tok\trewrote")),
            "{out}"
        );
        assert_eq!(
            out.contains("by copying their row groups)") && !out.contains("(0 by copying"),
            copied,
            "{out}"
        );
        let sizes = file_sizes(&work, table);
        let small = sizes.iter().filter(|s| **s < target * 3 / 4).count();
        assert!(
            small <= 1,
            "{table}: outputs under 3/4 of {target}: {sizes:?} ({out})"
        );
        assert!(
            sizes.iter().all(|s| *s <= target * 3 / 2),
            "{table}: {sizes:?}"
        );
        let (code, out) = run_philotes(&["maintain", "--table", table], &cfg);
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!(
                "{table}\tcompact\tok\tno partition has enough small files"
            )),
            "{table}: compacted again: {out}"
        );
    }
    let v = verify_source(&work, "ns.t", &pg, "SELECT id, s, n FROM t", &["--duckdb"]);
    assert_eq!(
        (v["rows"].as_u64(), v["state_equal"].as_bool()),
        (Some(rows.0), Some(true)),
        "{v}"
    );
    let v = verify_source(&work, "ns.u", &pg, "SELECT id, s, n FROM u", &["--duckdb"]);
    assert_eq!(
        (v["rows"].as_u64(), v["state_equal"].as_bool()),
        (Some(rows.1), Some(true)),
        "{v}"
    );
}

/// Live rows a mirror's compaction steps kept (rewrote) in `log` text.
fn mirror_rows_rewritten(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("maintenance: mirror: ").nth(1)?;
            let kept = rest.split(" live rows kept").next()?;
            kept.rsplit('(').next()?.trim().parse::<u64>().ok()
        })
        .sum()
}

/// The same for a mirror, whose writer compacts after its commits: outputs rolled by the
/// writer's count came out small, and every later commit's step merged them again (a step
/// rewriting ~2 × the target after each tiny commit, for ever). Once the load is merged, the
/// steps after tiny commits rewrite only the tiny files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_compaction_outputs_are_not_merged_again() {
    let Running {
        pg,
        db,
        work,
        agent,
        ..
    } = prepare(
        "CREATE TABLE mc (id int PRIMARY KEY, s text, n bigint)",
        &["mc"],
        "mode = \"mirror\"",
        "[maintenance]\nmin_input_files = 2\ndelete_ratio = 0.9\ntarget_file_size = \"1MiB\"\n",
    )
    .await
    .streaming()
    .await;
    const Q: &str = "SELECT id, s, n FROM mc";
    // Eight loads of 12,000 rows, each its own flush: files of about half the target.
    for i in 0..8i64 {
        let (lo, hi) = (i * 12_000, (i + 1) * 12_000 - 1);
        db.batch_execute(&format!(
            "INSERT INTO mc SELECT g, md5(g::text) || md5((g * 7)::text), g FROM generate_series({lo}, {hi}) g"
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let tiny = |id: i64| format!("INSERT INTO mc VALUES ({id}, 'tiny', {id})");
    // Commits that let the steps finish merging the load.
    for id in 0..4 {
        db.batch_execute(&tiny(1_000_000 + id)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    crate::mirror::wait_mirrored_with(&work, "ns.mc", &pg, Q, "id", &[]).await;
    let before = mirror_rows_rewritten(&agent.log_text());
    assert!(before > 0, "the load was compacted: {}", agent.log_text());
    for id in 0..6 {
        db.batch_execute(&tiny(2_000_000 + id)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let v = crate::mirror::wait_mirrored_with(&work, "ns.mc", &pg, Q, "id", &[]).await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    let addr = agent.api_addr().expect("API address");
    let bytes = metric_value(
        &addr,
        "philotes_iceberg_compacted_bytes_total",
        "table=\"ns.mc\"",
    )
    .await;
    assert!(bytes > 1_000_000.0, "the steps' bytes are counted: {bytes}");
    let after = mirror_rows_rewritten(&agent.log_text()) - before;
    assert!(
        after < 1_000,
        "six one-row commits made the mirror rewrite {after} rows (the load's outputs again): {v}"
    );
    drop(agent);
}
