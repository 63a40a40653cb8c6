//! Mirror tables (`mode = "mirror"` / `"both"`): the current state of each source table with
//! position deletes, read back by PyIceberg and DuckDB and compared with `SELECT *` of the
//! source, column for column; through an initial snapshot, key changes, a TRUNCATE and a
//! SIGKILL of the agent.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// `verify_mirror.py` on `table` against `query` on the source database `app`.
pub fn verify_mirror(
    work: &Workdir,
    table: &str,
    pg: &TestPg,
    query: &str,
    pk: &str,
    extra: &[&str],
) -> Value {
    let catalog = sql_catalog_args(&work.catalog_db(), &work.warehouse());
    verify_mirror_via(&catalog, table, pg, query, pk, extra)
}

/// [`verify_mirror`] through any catalog (`catalog`: the scripts' catalog arguments).
pub fn verify_mirror_via(
    catalog: &[String],
    table: &str,
    pg: &TestPg,
    query: &str,
    pk: &str,
    extra: &[&str],
) -> Value {
    let conninfo = pg.conninfo("app");
    let mut args = vec![
        "--pk",
        pk,
        "--duckdb",
        "--pg-conninfo",
        &conninfo,
        "--pg-query",
        query,
    ];
    args.extend_from_slice(extra);
    read_table_via("verify_mirror.py", catalog, table, &args)
}

/// Wait until the mirror `table` equals `query` for PyIceberg and DuckDB alike; returns the
/// last check.
async fn wait_mirrored(work: &Workdir, table: &str, pg: &TestPg, query: &str, pk: &str) -> Value {
    wait_mirrored_with(work, table, pg, query, pk, &[]).await
}

/// [`wait_mirrored`] with more `verify_mirror.py` arguments (also used by other modules).
pub async fn wait_mirrored_with(
    work: &Workdir,
    table: &str,
    pg: &TestPg,
    query: &str,
    pk: &str,
    extra: &[&str],
) -> Value {
    wait_created(work, table, 60).await;
    let mut last = Value::Null;
    for _ in 0..60 {
        last = verify_mirror(work, table, pg, query, pk, extra);
        if last["equal"] == true && last["duckdb_equal"] == true {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    panic!("mirror {table} never equalled the source: {last}");
}

const DDL: &str = "
CREATE TABLE m (id int PRIMARY KEY, s text, n numeric(10,2), tags text[]);
CREATE TABLE k (a int, b text, v bigint, PRIMARY KEY (a, b));
INSERT INTO m SELECT g, 'seed ' || g, g * 1.5, ARRAY['x', g::text] FROM generate_series(1, 300) g;
INSERT INTO k SELECT g % 7, 'b' || g, g FROM generate_series(1, 50) g;";

const M: &str = "SELECT id, s, n, tags FROM m";
const K: &str = "SELECT a, b, v FROM k";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_follow_every_change_through_a_kill() {
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        DDL,
        &["m", "k"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;

    // The initial copy lands in the mirror as the current state.
    let v = wait_mirrored(&work, "ns.m", &pg, M, "id").await;
    assert_eq!(v["rows"], 300, "{v}");
    assert_eq!(v["identifier_fields"], serde_json::json!(["id"]), "{v}");
    assert_eq!(
        v["columns"],
        serde_json::json!(["id", "s", "n", "tags", "_cdc_lsn", "_cdc_ts"]),
        "{v}"
    );

    // Updates, deletes, a key change, a key deleted and inserted again in one transaction,
    // the same key updated many times in one flush, composite keys.
    db.batch_execute(
        "UPDATE m SET s = 'updated', n = n + 1 WHERE id % 3 = 0;
         DELETE FROM m WHERE id % 10 = 1;
         UPDATE m SET id = id + 1000 WHERE id = 2;
         BEGIN; DELETE FROM m WHERE id = 4; INSERT INTO m VALUES (4, 'again', 4.4, NULL); COMMIT;
         UPDATE k SET v = -v WHERE a = 3;
         DELETE FROM k WHERE a = 5;
         UPDATE k SET b = b || '!' WHERE a = 6;",
    )
    .await
    .expect("changes");
    for i in 0..20 {
        db.batch_execute(&format!("UPDATE m SET n = {i} WHERE id = 5"))
            .await
            .expect("update");
    }
    let v = wait_mirrored(&work, "ns.m", &pg, M, "id").await;
    assert!(v["position_delete_files"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["equality_delete_files"], 0, "{v}");
    wait_mirrored(&work, "ns.k", &pg, K, "a,b").await;

    // SIGKILL in the middle of a stream of changes; the restarted agent rebuilds its index
    // from the table and goes on.
    let writer = {
        let conninfo = pg.conninfo("app");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            for i in 0..150 {
                c.batch_execute(&format!(
                    "BEGIN; UPDATE m SET s = 'round {i}' WHERE id % 7 = {}; \
                     INSERT INTO m VALUES ({}, 'new', {i}, ARRAY['n']); \
                     DELETE FROM m WHERE id = {}; COMMIT;",
                    i % 7,
                    5000 + i,
                    5000 + i / 2
                ))
                .await
                .expect("workload");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.kill9();
    writer.await.expect("workload task");
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    db.batch_execute("TRUNCATE k; INSERT INTO k VALUES (1, 'after', 1), (2, 'after', 2);")
        .await
        .expect("truncate");
    let v = wait_mirrored(&work, "ns.m", &pg, M, "id").await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    let v = wait_mirrored(&work, "ns.k", &pg, K, "a,b").await;
    assert_eq!(v["rows"], 2, "{v}");

    // The changelog beside it is still exact (folded, it equals the source too).
    verify_state(&work, "ns.m_changelog", &pg, M);
    let log = agent.log_text();
    assert!(
        log.contains("mirror key index built from the table"),
        "no index rebuild logged:\n{log}"
    );
    // The mirror's instruments: its index and the position deletes it wrote.
    let addr = agent.api_addr().expect("API address");
    let text = scrape(&addr).await;
    let keys = sample_sum(&text, "philotes_mirror_index_keys", "table=\"public.m\"");
    let live = pg_count(&db, "m").await;
    assert_eq!(keys as i64, live, "index keys vs rows of m:\n{text}");
    assert!(sample_sum(&text, "philotes_mirror_index_bytes", "table=\"public.m\"") > 0.0);
    assert!(
        sample_sum(
            &text,
            "philotes_iceberg_delete_files_written_total",
            "table=\"public.m\""
        ) > 0.0
    );
    assert!(
        sample_sum(
            &text,
            "philotes_iceberg_rows_deleted_total",
            "table=\"public.m\""
        ) > 0.0
    );
    drop(agent);
}

async fn pg_count(db: &tokio_postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_mirrors_through_pyiceberg_and_duckdb() {
    let (pg, db, work, agent) = running(ALL_TYPES, &["public.all_types"], "mode = \"both\"")
        .await
        .parts();
    let mut sql = String::from("BEGIN;");
    for i in 1..=60 {
        sql.push_str(&format!(
            "INSERT INTO all_types VALUES {};",
            all_types_values(i)
        ));
    }
    sql.push_str(
        "UPDATE all_types SET c_text = 'changed', c_int4arr = '{}', c_numeric = -2.25 WHERE id % 4 = 0;
         DELETE FROM all_types WHERE id % 9 = 0;
         UPDATE all_types SET id = id + 500 WHERE id = 10;
         COMMIT;",
    );
    db.batch_execute(&sql).await.expect("workload");
    let v = wait_mirrored(&work, "ns.all_types", &pg, ALL_TYPES_QUERY, "id").await;
    assert_eq!(v["equality_delete_files"], 0, "{v}");
    // The changelog beside it (it commits after the mirror) is exact too.
    let v = wait_source_equal(
        &work,
        "ns.all_types_changelog",
        &pg,
        ALL_TYPES_QUERY,
        &["--duckdb"],
        60,
    )
    .await;
    assert_eq!(v["unique"], true, "{v}");
    drop(agent);
}

/// `pgbench` of the server's installation.
fn pgbench() -> Command {
    let bin = philotes::demo::postgres::find_bindir()
        .expect("PostgreSQL binaries")
        .join("pgbench");
    Command::new(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_a_kill_mirrors_every_table_exactly() {
    const TABLES: [&str; 4] = [
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
    ];
    let p = prepare(
        "SELECT 1",
        &TABLES,
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await;
    let conninfo = p.pg.conninfo("app");
    let (code, out) = run_cmd(pgbench().args(["-i", "-s", "2", "-q", &conninfo]));
    assert_eq!(code, 0, "pgbench -i: {out}");
    let Running {
        pg,
        db: _db,
        work,
        cfg,
        agent,
    } = p.streaming().await;

    // The TPC-B-like load (pgbench_history has no key: it is mirrored as appends), with the
    // agent killed in the middle and started again.
    let mut load = pgbench()
        .args(["-c", "4", "-j", "2", "-T", "30", "-n", &conninfo])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    tokio::time::sleep(Duration::from_secs(12)).await;
    agent.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    let status = load.wait().expect("pgbench ran");
    assert!(status.success(), "pgbench -c 4 failed");
    agent.wait_streaming().await;

    for (table, query, pk) in [
        (
            "ns.pgbench_accounts",
            "SELECT aid, bid, abalance, filler FROM pgbench_accounts",
            "aid",
        ),
        (
            "ns.pgbench_branches",
            "SELECT bid, bbalance, filler FROM pgbench_branches",
            "bid",
        ),
        (
            "ns.pgbench_tellers",
            "SELECT tid, bid, tbalance, filler FROM pgbench_tellers",
            "tid",
        ),
        (
            "ns.pgbench_history",
            "SELECT tid, bid, aid, delta, mtime, filler FROM pgbench_history",
            "tid,bid,aid,delta,mtime",
        ),
    ] {
        let v = wait_mirrored(&work, table, &pg, query, pk).await;
        assert_eq!(v["duplicate_keys"], 0, "{table}: {v}");
        assert_eq!(v["equality_delete_files"], 0, "{table}: {v}");
    }
    // The changelog of the busiest table is exact too.
    let v = verify_source(
        &work,
        "ns.pgbench_accounts_changelog",
        &pg,
        "SELECT aid, bid, abalance, filler FROM pgbench_accounts",
        &["--pk", "aid"],
    );
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_keep_their_value() {
    // `big` is stored out of line (incompressible, ~10 kB): an UPDATE that does not touch it
    // sends it as "unchanged", and the mirror must keep the value it had.
    const BIG: &str = "(SELECT string_agg(md5(g::text || {i}), '') FROM generate_series(1, 300) g)";
    let big = |i: i32| BIG.replace("{i}", &i.to_string());
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE tt (id int PRIMARY KEY, n int, big text, note text)",
        &["tt"],
        "mode = \"both\"",
        "",
    )
    .await
    .streaming()
    .await;
    const Q: &str = "SELECT id, n, big, note FROM tt";
    for i in 1..=4 {
        db.batch_execute(&format!(
            "INSERT INTO tt VALUES ({i}, 0, {}, 'n{i}')",
            big(i)
        ))
        .await
        .expect("insert");
    }
    wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    // From a committed file; then again from the row the first update wrote.
    db.batch_execute("UPDATE tt SET n = 1 WHERE id <= 2")
        .await
        .expect("update");
    wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    db.batch_execute("UPDATE tt SET n = 2, note = 'again' WHERE id = 1")
        .await
        .expect("update");
    // Inserted and updated in one transaction (the value is in the same batch), and a key
    // updated twice in one transaction.
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO tt VALUES (5, 0, {}, 'n5'); UPDATE tt SET n = 5 WHERE id = 5;
         UPDATE tt SET n = 31 WHERE id = 3; UPDATE tt SET note = 'x' WHERE id = 3; COMMIT;",
        big(5)
    ))
    .await
    .expect("one transaction");
    wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    // The changelog says which values were not sent: the test is about them.
    let v = verify(&work, "ns.tt_changelog", &["--rows"]);
    let unchanged = v["all_rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["_cdc_unchanged"] == serde_json::json!(["big"]))
        .count();
    assert!(unchanged >= 5, "expected unchanged TOAST values: {v}");
    // After a restart the values come from the files the rebuilt index points at.
    agent.kill9();
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    db.batch_execute("UPDATE tt SET n = n + 100")
        .await
        .expect("update all");
    let v = wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    assert_eq!(v["rows"], 5, "{v}");
    // An update that changes the key does not send the unchanged value either: it is the
    // old key's (a D of the old key, then the U of the new one). From committed files; then
    // in one transaction from rows of the same batch, moved twice, after an unrelated delete.
    db.batch_execute("UPDATE tt SET id = id + 10 WHERE id <= 2")
        .await
        .expect("move keys");
    wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO tt VALUES (6, 0, {}, 'n6'); UPDATE tt SET id = 16 WHERE id = 6;
         UPDATE tt SET id = 26, n = 1 WHERE id = 16; DELETE FROM tt WHERE id = 4;
         UPDATE tt SET id = 33 WHERE id = 3; UPDATE tt SET n = 9 WHERE id = 33; COMMIT;",
        big(6)
    ))
    .await
    .expect("moves in one transaction");
    let v = wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    assert_eq!(v["rows"], 5, "{v}");
    // The changelog holds what a reader needs to fill the values in (docs/querying.md).
    let v = verify_source(&work, "ns.tt_changelog", &pg, Q, &["--fill-unchanged"]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_do_not_split_a_flush_into_small_files() {
    // A busy table with large values: its changes reach the mirror in batches of a few MB,
    // and UPDATEs that leave the large value alone arrive without it. Filling those in used
    // to finish the open data file at every such batch, a file of a few rows each; it is now
    // finished only when a value must be read back from it. Maintenance is off, so the files
    // stay as the flushes wrote them.
    let p = prepare(
        "CREATE TABLE tt (id int PRIMARY KEY, n int, big text);
         ALTER TABLE tt ALTER big SET STORAGE EXTERNAL;",
        &["tt"],
        "mode = \"mirror\"",
        "[maintenance]\nenabled = false",
    )
    .await;
    edit_config(
        &p.cfg,
        "flush_interval = \"300ms\"",
        "flush_interval = \"8s\"",
    );
    let (pg, db, work, agent) = p.streaming().await.parts();
    const Q: &str = "SELECT id, n, big FROM tt";
    // ~9.6 kB per row, out of line.
    let insert = |from: i32, to: i32| {
        format!(
            "INSERT INTO tt SELECT g, 0, (SELECT string_agg(md5(h::text || '-' || g::text), '')
             FROM generate_series(1, 300) h) FROM generate_series({from}, {to}) g"
        )
    };
    db.batch_execute(&insert(1, 300)).await.expect("first rows");
    let v = wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    assert_eq!(v["data_files"], 1, "{v}");
    // One flush: six transactions of ~2.4 MB of new rows, each also updating 20 of the
    // committed rows without touching their large value.
    for t in 0..6 {
        let from = 1000 + t * 250;
        db.batch_execute(&format!(
            "BEGIN; {}; UPDATE tt SET n = n + 1 WHERE id > {} AND id <= {}; COMMIT;",
            insert(from, from + 249),
            t * 20,
            t * 20 + 20
        ))
        .await
        .expect("insert and update");
    }
    let v = wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    assert_eq!(v["rows"], 1800, "{v}");
    assert_eq!(
        v["data_files"], 2,
        "one flush of 15 MB (target file size 128 MiB) wrote more than one data file: {v}"
    );
    // Rows written earlier in the same flush, then updated (one moved to a new key) without
    // their large value: that file is finished and the values are read back from it.
    db.batch_execute(&insert(3000, 3249))
        .await
        .expect("more rows");
    db.batch_execute(
        "BEGIN; UPDATE tt SET n = 7 WHERE id BETWEEN 3000 AND 3009;
         UPDATE tt SET id = id + 10000, n = 8 WHERE id BETWEEN 3010 AND 3014; COMMIT;",
    )
    .await
    .expect("update rows of this flush");
    let v = wait_mirrored(&work, "ns.tt", &pg, Q, "id").await;
    assert_eq!(v["rows"], 2050, "{v}");
    let log = agent.log_text();
    assert!(
        !log.contains("stored as null"),
        "a value was not found: {log}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_past_its_budget_is_a_clear_error() {
    // 60,000 integer keys need ~2 MB of index: more than a 1 MiB budget. The pipeline stops
    // with an error that names the table and the key, instead of growing until killed.
    let p = prepare(
        "CREATE TABLE big (id int PRIMARY KEY, s text);
         INSERT INTO big SELECT g, 'r' || g FROM generate_series(1, 60000) g;",
        &["big"],
        "mode = \"mirror\"\nsnapshot = \"initial\"\nmirror_index_memory = \"1MiB\"",
        "",
    )
    .await;
    let log = p.log();
    let running = p.started();
    wait_log_line(&log, "the index budget error", |l| {
        l.contains("key index of mirror table ns.big") && l.contains("mirror_index_memory")
    })
    .await;
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_dropped_columns_follow_in_the_mirror() {
    let (pg, db, work, agent) = running(
        "CREATE TABLE c (id int PRIMARY KEY, a text);
         INSERT INTO c VALUES (1, 'one'), (2, 'two');",
        &["c"],
        "mode = \"mirror\"\nsnapshot = \"initial\"",
    )
    .await
    .parts();
    wait_mirrored(&work, "ns.c", &pg, "SELECT id, a FROM c", "id").await;
    db.batch_execute(
        "ALTER TABLE c ADD COLUMN b int;
         UPDATE c SET b = id * 10 WHERE id = 1;
         INSERT INTO c VALUES (3, 'three', 30);",
    )
    .await
    .expect("add column");
    let v = wait_mirrored(&work, "ns.c", &pg, "SELECT id, a, b FROM c", "id").await;
    assert_eq!(v["identifier_fields"], serde_json::json!(["id"]), "{v}");
    db.batch_execute(
        "ALTER TABLE c DROP COLUMN a;
         UPDATE c SET b = b + 1 WHERE id = 3;
         DELETE FROM c WHERE id = 2;",
    )
    .await
    .expect("drop column");
    // A dropped column stays in Iceberg (null from then on); the rest equals the source.
    wait_mirrored(&work, "ns.c", &pg, "SELECT id, b FROM c", "id").await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_pays_the_delete_debt_and_the_mirror_stays_exact() {
    // Ten rounds of 10 % updates (and a few deletes and inserts), each in its own flushes:
    // every round leaves delete files and small data files behind. With aggressive rules the
    // writer compacts them away while the stream goes on; the mirror stays exact for both
    // readers, through a SIGKILL (the index is rebuilt from the compacted table) and for
    // unchanged TOAST values read back from the rewritten files.
    const BIG: &str =
        "(SELECT string_agg(md5(g::text || id::text), '') FROM generate_series(1, 300) g)";
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        &format!(
            "CREATE TABLE cm (id int PRIMARY KEY, n int, s text, big text);
             INSERT INTO cm SELECT g, 0, 'seed', NULL FROM generate_series(1, 3000) g;
             UPDATE cm SET big = {BIG} WHERE id % 100 = 0;"
        ),
        &["cm"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "[maintenance]\nmin_input_files = 2\ndelete_ratio = 0.2\ntarget_file_size = \"1MiB\"\n",
    )
    .await
    .streaming()
    .await;
    const Q: &str = "SELECT id, n, s, big FROM cm";
    wait_mirrored(&work, "ns.cm", &pg, Q, "id").await;
    for round in 1..=10 {
        for part in 0..3 {
            db.batch_execute(&format!(
                "UPDATE cm SET n = {round}, s = 'r{round}' WHERE id % 30 BETWEEN {} AND {};
                 DELETE FROM cm WHERE id = {};
                 INSERT INTO cm VALUES ({}, {round}, 'new', NULL);",
                part,
                part,
                round * 7 + part,
                10_000 + round * 3 + part
            ))
            .await
            .expect("round");
            // Past the flush interval (300 ms): each part is its own flush.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    let v = wait_mirrored(&work, "ns.cm", &pg, Q, "id").await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    assert_eq!(v["equality_delete_files"], 0, "{v}");
    // 30 flushes with deletes would leave ~30 delete files and ~30 small data files without
    // compaction; the merge rule keeps a logarithmic number of each.
    let deletes = v["position_delete_files"].as_u64().unwrap();
    let data = v["data_files"].as_u64().unwrap();
    assert!(deletes <= 8, "delete files left: {v}");
    assert!(data <= 10, "data files left: {v}");
    let addr = agent.api_addr().expect("API address");
    let text = scrape(&addr).await;
    let landed = sample_sum(
        &text,
        "philotes_iceberg_maintenance_total",
        "action=\"compact\",source=\"p\",status=\"ok\",table=\"ns.cm\"",
    );
    assert!(landed > 0.0, "no mirror compaction landed:\n{text}");
    println!("after 30 flushes: {data} data files, {deletes} delete files, {landed} compactions");
    let log = agent.log_text();
    assert!(
        log.contains("mirror: ") && log.contains("deleted rows left out"),
        "no mirror compaction logged:\n{log}"
    );

    // Unchanged TOAST values of rows that compaction moved, then a SIGKILL: the restarted
    // agent rebuilds the index from the compacted files and goes on exactly.
    db.batch_execute("UPDATE cm SET n = n + 1000 WHERE id % 100 = 0")
        .await
        .expect("toast update");
    wait_mirrored(&work, "ns.cm", &pg, Q, "id").await;
    agent.kill9();
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    db.batch_execute(
        "UPDATE cm SET n = n + 1 WHERE id % 100 = 0 OR id % 13 = 0;
         DELETE FROM cm WHERE id % 17 = 0;",
    )
    .await
    .expect("after restart");
    let v = wait_mirrored(&work, "ns.cm", &pg, Q, "id").await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    // The changelog commits after the mirror: wait for it too. (It stores an unchanged TOAST
    // value as null with `_cdc_unchanged`, so `big` stays out of its fold.)
    let v = wait_source_equal(
        &work,
        "ns.cm_changelog",
        &pg,
        "SELECT id, n, s FROM cm",
        &[],
        60,
    )
    .await;
    assert_eq!(v["unique"], true, "{v}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_with_and_without_a_key() {
    // REPLICA IDENTITY FULL sends the whole old row with every UPDATE and flags every column
    // as key. With a primary key, the mirror keys by it (a changed key still replaces the
    // row; unchanged TOAST values come from the old row); without one, the whole row is the
    // identity and equal rows may repeat: an UPDATE or DELETE of one copy leaves the others.
    const BIG: &str = "(SELECT string_agg(md5(g::text || 'v'), '') FROM generate_series(1, 300) g)";
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        &format!(
            "CREATE TABLE fp (id int PRIMARY KEY, s text, big text);
             ALTER TABLE fp REPLICA IDENTITY FULL;
             CREATE TABLE fw (a int, b text, c numeric);
             ALTER TABLE fw REPLICA IDENTITY FULL;
             INSERT INTO fp SELECT g, 's' || g, {BIG} FROM generate_series(1, 20) g;
             INSERT INTO fw VALUES (1, 'x', 1.5), (1, 'x', 1.5), (1, 'x', 1.5), (2, NULL, NULL),
                                   (3, 'y', NULL), (3, 'y', NULL);"
        ),
        &["fp", "fw"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "[maintenance]\nmin_input_files = 2\n",
    )
    .await
    .streaming()
    .await;
    const FP: &str = "SELECT id, s, big FROM fp";
    const FW: &str = "SELECT a, b, c FROM fw";
    let multiset = ["--multiset"];
    let v = wait_mirrored(&work, "ns.fp", &pg, FP, "id").await;
    assert_eq!(v["identifier_fields"], serde_json::json!(["id"]), "{v}");
    let v = wait_mirrored_with(&work, "ns.fw", &pg, FW, "a", &multiset).await;
    assert_eq!(v["rows"], 6, "{v}");
    assert_eq!(v["identifier_fields"], serde_json::json!([]), "{v}");

    let one = |table: &str, cond: &str| format!("(SELECT ctid FROM {table} WHERE {cond} LIMIT 1)");
    db.batch_execute(&format!(
        "UPDATE fp SET s = 'changed' WHERE id <= 5;
         UPDATE fp SET id = id + 100 WHERE id = 6;
         DELETE FROM fp WHERE id = 7;
         UPDATE fw SET c = 9 WHERE ctid = {};
         DELETE FROM fw WHERE ctid = {};
         UPDATE fw SET b = 'z' WHERE a = 2;
         INSERT INTO fw VALUES (1, 'x', 1.5), (4, NULL, 4);",
        one("fw", "a = 1"),
        one("fw", "a = 3")
    ))
    .await
    .expect("changes");
    wait_mirrored(&work, "ns.fp", &pg, FP, "id").await;
    wait_mirrored_with(&work, "ns.fw", &pg, FW, "a", &multiset).await;
    // With FULL the old row carries the TOAST value an UPDATE did not send: the changelog
    // holds it too, so its fold equals the source, `big` included.
    let v = wait_source_equal(&work, "ns.fp_changelog", &pg, FP, &[], 60).await;
    assert_eq!(v["unique"], true, "{v}");

    // A restart rebuilds the copies of equal rows from the table; compaction moves them.
    agent.kill9();
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    for i in 0..6 {
        db.batch_execute(&format!(
            "DELETE FROM fw WHERE ctid = {};
             INSERT INTO fw VALUES (1, 'x', 1.5);
             UPDATE fp SET s = 'round {i}' WHERE id % 3 = {};",
            one("fw", "a = 1 AND c = 1.5"),
            i % 3
        ))
        .await
        .expect("round");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let v = wait_mirrored_with(&work, "ns.fw", &pg, FW, "a", &multiset).await;
    assert_eq!(v["rows"], pg_count(&db, "fw").await, "{v}");
    wait_mirrored(&work, "ns.fp", &pg, FP, "id").await;
    let log = agent.log_text();
    assert!(
        log.contains("maintenance: mirror"),
        "no compaction ran:\n{log}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_mode_override_mirrors_one_table_beside_changelogs() {
    let (pg, db, work, agent) = running(
        "CREATE TABLE mo (id int PRIMARY KEY, s text); CREATE TABLE co (id int PRIMARY KEY, s text);",
        &["mo", "co"],
        "mode = \"changelog\"\ntable_modes = { \"mo\" = \"mirror\" }",
    )
    .await
    .parts();
    db.batch_execute(
        "INSERT INTO mo SELECT g, 'm' FROM generate_series(1, 20) g;
         INSERT INTO co SELECT g, 'c' FROM generate_series(1, 20) g;
         UPDATE mo SET s = 'changed' WHERE id <= 5; DELETE FROM mo WHERE id > 15;
         UPDATE co SET s = 'changed' WHERE id <= 5;",
    )
    .await
    .expect("changes");
    let v = wait_mirrored(&work, "ns.mo", &pg, "SELECT id, s FROM mo", "id").await;
    assert_eq!(v["rows"], 15, "{v}");
    wait_rows(&work, "ns.co", 25, 60).await;
    verify_state(&work, "ns.co", &pg, "SELECT id, s FROM co");
    assert_eq!(iceberg_rows(&work, "ns.mo_changelog"), None, "mirror only");
    assert_eq!(
        iceberg_rows(&work, "ns.co_changelog"),
        None,
        "changelog only"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_pause_resume_and_a_joining_table_work_in_a_mirror() {
    let (pg, db, work, agent) = running(
        "CREATE TABLE pay (id int PRIMARY KEY, amount numeric(12,2), note text)",
        &["pay"],
        "mode = \"mirror\"",
    )
    .await
    .parts();
    const Q: &str = "SELECT id, amount, note FROM pay";
    // A value the mirror cannot hold goes to the dead-letter table; its neighbours do not.
    db.batch_execute(
        "INSERT INTO pay SELECT g, g * 1.5, 'n' FROM generate_series(1, 20) g;
         INSERT INTO pay VALUES (21, 'NaN', 'poison');",
    )
    .await
    .expect("insert");
    wait_rows(&work, "ns._philotes_dlq", 1, 60).await;
    let v = wait_mirrored(&work, "ns.pay", &pg, &format!("{Q} WHERE id <> 21"), "id").await;
    assert_eq!(v["rows"], 20, "{v}");
    db.batch_execute("DELETE FROM pay WHERE id = 21")
        .await
        .expect("drop the poison row");

    // Pause: nothing is committed while changes pile up; resume: they all arrive.
    let addr = agent.api_addr().expect("API address");
    let http = reqwest::Client::new();
    let post = |path: &str| {
        http.post(format!("http://{addr}/api/v1/pipelines/p/{path}"))
            .send()
    };
    assert!(post("pause").await.expect("pause").status().is_success());
    agent.wait_state("p", "paused", 30).await;
    db.batch_execute(
        "UPDATE pay SET note = 'while paused' WHERE id <= 5;
         DELETE FROM pay WHERE id BETWEEN 6 AND 8;
         INSERT INTO pay VALUES (30, 3.0, 'new');",
    )
    .await
    .expect("changes while paused");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        iceberg_rows(&work, "ns.pay"),
        Some(20),
        "no commit while paused"
    );
    assert!(post("resume").await.expect("resume").status().is_success());
    agent.wait_state("p", "streaming", 30).await;
    wait_mirrored(&work, "ns.pay", &pg, Q, "id").await;

    // A table that joins the publication mid-stream gets its own mirror.
    db.batch_execute(
        "CREATE TABLE joined (id int PRIMARY KEY, s text);
         ALTER PUBLICATION philotes_p ADD TABLE joined;",
    )
    .await
    .expect("join");
    db.batch_execute(
        "INSERT INTO joined SELECT g, 'j' FROM generate_series(1, 10) g;
         UPDATE joined SET s = 'changed' WHERE id = 3; DELETE FROM joined WHERE id = 4;",
    )
    .await
    .expect("joined rows");
    let v = wait_mirrored(&work, "ns.joined", &pg, "SELECT id, s FROM joined", "id").await;
    assert_eq!(v["rows"], 9, "{v}");
    drop(agent);
}

/// Mirror `ns.fo` of rows 1–20 (one data file), then rows 1–5 deleted by PyIceberg, which
/// deletes by rewriting the data file (copy-on-write): the file the agent's index points into
/// is gone, its other rows live on in a new file.
async fn mirror_rewritten_by_pyiceberg() -> (TestPg, tokio_postgres::Client, Workdir, AgentProc) {
    let (pg, db, work, agent) = running(
        "CREATE TABLE fo (id int PRIMARY KEY, s text)",
        &["fo"],
        "mode = \"mirror\"",
    )
    .await
    .parts();
    db.batch_execute("INSERT INTO fo SELECT g, 'v' FROM generate_series(1, 20) g")
        .await
        .expect("insert");
    wait_mirrored(&work, "ns.fo", &pg, "SELECT id, s FROM fo", "id").await;
    let (rc, out) = pyiceberg(
        &work,
        "c.load_table('ns.fo').delete(delete_filter='id <= 5')\n",
    );
    assert_eq!(rc, 0, "PyIceberg delete: {out}");
    (pg, db, work, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_rewriting_a_mirror_file_is_noticed_not_duplicated() {
    let (pg, db, work, agent) = mirror_rewritten_by_pyiceberg().await;
    // Updates of rows that were in the rewritten file: position deletes on the old file would
    // leave the rewritten copies live (duplicate keys). The commit notices, the pipeline
    // reopens the table (index rebuilt from it) and replays the change.
    db.batch_execute("UPDATE fo SET s = 'after' WHERE id BETWEEN 6 AND 10")
        .await
        .expect("update");
    let v = wait_mirrored(
        &work,
        "ns.fo",
        &pg,
        "SELECT id, s FROM fo WHERE id > 5",
        "id",
    )
    .await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    assert_eq!(v["rows"], 15, "{v}");
    let log = agent.log_text();
    assert!(log.contains("another writer removed"), "{log}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writers_rewrite_before_an_insert_only_commit_is_not_missed() {
    // The rewrite lands first under a commit that deletes nothing (so nothing it requires is
    // gone): the commit takes the new table state as its view, and the key index must follow
    // it, or the next update's position deletes name the file that is no longer live and
    // the old rows stay (what a deposed leader's compaction step did to the new leader).
    let (pg, db, work, agent) = mirror_rewritten_by_pyiceberg().await;
    db.batch_execute("INSERT INTO fo VALUES (100, 'new')")
        .await
        .expect("insert only");
    let q = "SELECT id, s FROM fo WHERE id > 5";
    wait_mirrored(&work, "ns.fo", &pg, q, "id").await;
    db.batch_execute(
        "UPDATE fo SET s = 'after' WHERE id BETWEEN 6 AND 10; DELETE FROM fo WHERE id = 11",
    )
    .await
    .expect("update");
    let v = wait_mirrored(&work, "ns.fo", &pg, q, "id").await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    assert_eq!(v["rows"], 15, "{v}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_rekeys_the_mirror() {
    // A table without a key that gets a primary key (in the transaction that also inserts
    // rows before it), a primary key replaced by another column, a keyless table turned
    // REPLICA IDENTITY FULL: the changes after each identify rows by the new key only (a
    // DELETE carries just its columns), so the mirror must be keyed again, also across a
    // SIGKILL; before, it kept the old key and every later delete and update was lost. The
    // key column is renamed too, so the restart reads it from files under its old name (it
    // used to fail there for good: "key column missing").
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE nk (id int NOT NULL, v int);
         INSERT INTO nk SELECT g, g FROM generate_series(1, 200) g;
         CREATE TABLE pk2 (id int PRIMARY KEY, code text NOT NULL UNIQUE, v int);
         INSERT INTO pk2 SELECT g, 'c' || g, g FROM generate_series(1, 200) g;
         CREATE TABLE fk (id int, v int);
         INSERT INTO fk SELECT g, g FROM generate_series(1, 50) g;",
        &["nk", "pk2", "fk"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    const NK: &str = "SELECT id, v FROM nk";
    const PK2: &str = "SELECT id, code, v FROM pk2";
    const FK: &str = "SELECT id, v FROM fk";
    wait_mirrored(&work, "ns.nk", &pg, NK, "id").await;
    wait_mirrored(&work, "ns.pk2", &pg, PK2, "code").await;
    wait_mirrored(&work, "ns.fk", &pg, FK, "id").await;
    db.batch_execute(
        "BEGIN;
         INSERT INTO nk SELECT g, g FROM generate_series(201, 220) g;
         ALTER TABLE nk ADD PRIMARY KEY (id);
         UPDATE nk SET v = -v WHERE id <= 20 OR id > 215;
         DELETE FROM nk WHERE id BETWEEN 30 AND 39;
         COMMIT;
         UPDATE nk SET v = 0 WHERE id BETWEEN 40 AND 44;
         UPDATE pk2 SET v = v + 1 WHERE id <= 10;
         ALTER TABLE pk2 DROP CONSTRAINT pk2_pkey;
         ALTER TABLE pk2 ADD PRIMARY KEY (code);
         UPDATE pk2 SET v = v + 100 WHERE id BETWEEN 5 AND 15;
         DELETE FROM pk2 WHERE id BETWEEN 20 AND 25;
         UPDATE pk2 SET code = 'x' || id WHERE id BETWEEN 30 AND 32;
         UPDATE pk2 SET id = id + 1000 WHERE id BETWEEN 40 AND 42;
         UPDATE pk2 SET id = 1 WHERE id = 50;
         ALTER TABLE pk2 ALTER COLUMN id DROP NOT NULL;
         INSERT INTO pk2 VALUES (NULL, 'no id', 0);
         ALTER TABLE pk2 RENAME COLUMN code TO ref;
         UPDATE pk2 SET v = -1 WHERE ref = 'c2';
         ALTER TABLE fk REPLICA IDENTITY FULL;
         UPDATE fk SET v = -v WHERE id <= 10;
         DELETE FROM fk WHERE id BETWEEN 20 AND 24;",
    )
    .await
    .expect("key changes");
    wait_mirrored(&work, "ns.nk", &pg, NK, "id").await;
    // The key column renamed too: the restart below rebuilds the index from files that
    // hold it under its old name.
    const PK2_NOW: &str = "SELECT id, ref, v FROM pk2";
    let v = wait_mirrored(&work, "ns.pk2", &pg, PK2_NOW, "ref").await;
    // `code` was optional in Iceberg (Iceberg cannot make it required), so the mirror has
    // no identifier fields now; the old key column became optional (it holds a null).
    assert_eq!(v["identifier_fields"], serde_json::json!([]), "{v}");
    wait_mirrored(&work, "ns.fk", &pg, FK, "id").await;
    let log = agent.log_text();
    assert!(log.contains("mirror keyed again"), "{log}");
    let addr = agent.api_addr().expect("API address");
    let text = scrape(&addr).await;
    for t in ["public.nk", "public.pk2", "public.fk"] {
        let table = format!("table=\"{t}\"");
        let n: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("philotes_cdc_schema_changes_total{")
                    && l.contains("kind=\"key\"")
                    && l.contains(&table)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(n, 1.0, "{t}:\n{text}");
    }

    // A SIGKILL while changes by the new keys go on: the restarted agent replays from its
    // slot, through the key changes again, and ends equal to the source.
    let writer = {
        let conninfo = pg.conninfo("app");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            for i in 0..100 {
                c.batch_execute(&format!(
                    "UPDATE nk SET v = {i} WHERE id % 10 = {m}; DELETE FROM nk WHERE id = {d};
                     UPDATE pk2 SET v = {i} WHERE ref = 'c{c}'; DELETE FROM pk2 WHERE ref = 'c{e}';
                     UPDATE fk SET v = {i} WHERE id = {f}; DELETE FROM fk WHERE id = {g};",
                    m = i % 10,
                    d = 100 + i,
                    c = 60 + i,
                    e = 199 - i / 2,
                    f = 25 + i % 25,
                    g = 49 - i / 10,
                ))
                .await
                .expect("workload");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    agent.kill9();
    writer.await.expect("workload task");
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    let v = wait_mirrored(&work, "ns.nk", &pg, NK, "id").await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    let v = wait_mirrored(&work, "ns.pk2", &pg, PK2_NOW, "ref").await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    wait_mirrored(&work, "ns.fk", &pg, FK, "id").await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_a_key_value_are_called_out_and_copied_again() {
    // A key column changed to a type Iceberg cannot promote: PostgreSQL rewrote every row
    // without sending one, so in the mirror the old rows have no value in the new key column.
    // They used to collapse to one index entry, and compaction then dropped all but one of
    // them; then they were kept with a WARN to copy the table by hand. Now the table is
    // copied again by itself (behind a truncate marker), and the mirror equals the source.
    let Running {
        pg,
        db,
        work,
        agent,
        ..
    } = prepare(
        "CREATE TABLE kt (id int PRIMARY KEY, v text);
         INSERT INTO kt SELECT g, 'a' FROM generate_series(1, 20) g;",
        &["kt"],
        "mode = \"mirror\"\nsnapshot = \"initial\"",
        "[maintenance]\nmin_input_files = 2\ndelete_ratio = 0.2\ntarget_file_size = \"1MiB\"\n",
    )
    .await
    .streaming()
    .await;
    const KT: &str = "SELECT id, v FROM kt";
    wait_mirrored(&work, "ns.kt", &pg, KT, "id").await;
    db.batch_execute(
        "ALTER TABLE kt ALTER COLUMN id TYPE text;
         UPDATE kt SET v = 'b' WHERE id = '3';
         INSERT INTO kt VALUES ('x1', 'c');",
    )
    .await
    .expect("key type change");
    wait_log_line(&agent.log, "the table copied again", |l| {
        l.contains("rows of the mirror have no value in its key") && l.contains("copying")
    })
    .await;
    for i in 0..6 {
        db.batch_execute(&format!("INSERT INTO kt VALUES ('y{i}', 'd')"))
            .await
            .expect("insert");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // 20 rows under their new key, the UPDATE applied, and the 7 inserted; compaction on.
    let v = wait_mirrored(&work, "ns.kt", &pg, KT, "id").await;
    assert_eq!(v["rows"], 27, "{v}");
    db.batch_execute("UPDATE kt SET v = 'e' WHERE id = '5'; DELETE FROM kt WHERE id = '6'")
        .await
        .expect("changes by the new key");
    let v = wait_mirrored(&work, "ns.kt", &pg, KT, "id").await;
    assert_eq!(v["rows"], 26, "{v}");
    assert_eq!(
        agent
            .log_text()
            .matches("rows of the mirror have no value in its key")
            .count(),
        1,
        "copied once"
    );
    // The agent handles it by itself: no attempt fails (it used to fail one, counted as an
    // error, before the copy).
    let log = agent.log_text();
    assert!(
        !log.contains("pipeline failed") && !log.contains("still failing"),
        "no failed attempt"
    );
    assert!(
        log.contains("a mirror key column changed type"),
        "the reopening is logged"
    );
    drop(agent);
}

/// A key moved to a new column while the agent was stopped: the mirror could not open ("key
/// column "w" not in the mirror table", retried forever), since the column is added by the
/// schema change that follows the open. It now opens by the key its rows were written under,
/// then the replayed changes add the column and key it again; updates and deletes by the new
/// key land, and both readers see the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moved_to_a_new_column_while_stopped_is_followed_at_start() {
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE kw (id int PRIMARY KEY, v text);
         INSERT INTO kw SELECT g, 'a' FROM generate_series(1, 50) g;",
        &["kw"],
        "mode = \"mirror\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    wait_mirrored(&work, "ns.kw", &pg, "SELECT id, v FROM kw", "id").await;
    assert_eq!(agent.terminate(), Some(0));
    execute_each(
        &db,
        &[
            "ALTER TABLE kw ADD COLUMN w int",
            "UPDATE kw SET w = id + 1000",
            "ALTER TABLE kw ALTER COLUMN w SET NOT NULL",
            "ALTER TABLE kw DROP CONSTRAINT kw_pkey",
            "ALTER TABLE kw ADD PRIMARY KEY (w)",
            "UPDATE kw SET v = 'b' WHERE id < 5",
            "DELETE FROM kw WHERE id = 7",
            "INSERT INTO kw VALUES (7, 'c', 7)",
            "UPDATE kw SET id = 1 WHERE w = 1010",
        ],
    )
    .await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    const KW: &str = "SELECT id, v, w FROM kw";
    let v = wait_mirrored(&work, "ns.kw", &pg, KW, "w").await;
    assert_eq!(v["rows"], 50, "{v}");
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    assert!(
        !agent.log_text().contains("not in the mirror table"),
        "the mirror opens"
    );
    db.batch_execute("UPDATE kw SET v = 'later' WHERE w = 1020; DELETE FROM kw WHERE w = 7")
        .await
        .expect("later changes");
    wait_mirrored(&work, "ns.kw", &pg, KW, "w").await;
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_added_beside_a_mirror_with_a_moved_aside_column_streams() {
    // A mirror's batches are built in its changelog's schema and taken by name. After a type
    // change the mirror has `b__before_<lsn>`; a changelog added later (`mirror` → `both`)
    // has not, nor can a replay be relied on to name such columns alike in both tables (the
    // kill fuzz named one `…_2` in one table only, typed otherwise): the pipeline failed at
    // every write, "column … missing from the batch" or "column type Utf8 cannot be written
    // as Decimal128", and retried forever.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE mb (id int PRIMARY KEY, b int, g text);
         INSERT INTO mb SELECT i, i, 'seed' FROM generate_series(1, 40) i;",
        &["mb"],
        "mode = \"mirror\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    const Q: &str = "SELECT id, b, g FROM mb";
    wait_mirrored(&work, "ns.mb", &pg, Q, "id").await;
    db.batch_execute(
        "ALTER TABLE mb ALTER b TYPE text USING 't' || b;
         UPDATE mb SET g = 'after';",
    )
    .await
    .expect("type change");
    let v = wait_mirrored(&work, "ns.mb", &pg, Q, "id").await;
    let columns = v["columns"].to_string();
    assert!(columns.contains("b__before_"), "moved aside: {columns}");
    assert_eq!(agent.terminate(), Some(0));

    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("mode = \"mirror\"", "mode = \"both\"")).expect("config");
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    db.batch_execute(
        "UPDATE mb SET g = 'both', b = 'x' || id WHERE id > 30;
         DELETE FROM mb WHERE id BETWEEN 20 AND 24;
         INSERT INTO mb VALUES (100, 'new', 'new');",
    )
    .await
    .expect("changes");
    wait_mirrored(&work, "ns.mb", &pg, Q, "id").await;
    // The changelog was copied when it was added, then streamed.
    wait_rows_at_least(&work, "ns.mb_changelog", 40, 60).await;
    verify_state(&work, "ns.mb_changelog", &pg, Q);
    let log = agent.log_text();
    assert!(!log.contains("pipeline failed"), "no failed attempt: {log}");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_mirror_follows_a_dropped_and_a_retyped_column() {
    // A mirror without a key (`REPLICA IDENTITY FULL`) finds a row by its whole row. The
    // columns it matched by stayed those the table was made with, so after `DROP COLUMN b`
    // (or a type change that moves `c` aside) the new rows had no value there: every UPDATE
    // added a row beside the old one and every DELETE left it, silently.
    let Running {
        pg,
        db,
        work,
        agent,
        ..
    } = prepare(
        "CREATE TABLE fk (a int, b text, c int);
         ALTER TABLE fk REPLICA IDENTITY FULL;
         INSERT INTO fk SELECT g, 'b' || g, g FROM generate_series(1, 60) g;
         INSERT INTO fk SELECT g, 'b' || g, g FROM generate_series(1, 5) g;",
        &["fk"],
        "mode = \"mirror\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    let multiset = ["--multiset"];
    wait_mirrored_with(
        &work,
        "ns.fk",
        &pg,
        "SELECT a, b, c FROM fk",
        "a",
        &multiset,
    )
    .await;
    execute_each(
        &db,
        &[
            "ALTER TABLE fk DROP COLUMN b",
            "UPDATE fk SET c = c + 1000 WHERE a <= 10",
            "DELETE FROM fk WHERE a > 50",
        ],
    )
    .await;
    let v = wait_mirrored_with(&work, "ns.fk", &pg, "SELECT a, c FROM fk", "a", &multiset).await;
    assert_eq!(v["rows"], 55, "{v}");
    execute_each(
        &db,
        &[
            "ALTER TABLE fk ALTER c TYPE text USING c::text",
            "UPDATE fk SET c = c || '!' WHERE a BETWEEN 11 AND 20",
            "DELETE FROM fk WHERE a BETWEEN 41 AND 45",
            "UPDATE fk SET c = 'later' WHERE a = 30",
        ],
    )
    .await;
    // Rows untouched since the type change have no value in the new `c` (PostgreSQL rewrote
    // them without sending them): compare `c` where a change sent it.
    const SENT: &str = "SELECT a, CASE WHEN a BETWEEN 11 AND 20 OR a = 30 THEN c END AS c FROM fk";
    let v = wait_mirrored_with(&work, "ns.fk", &pg, SENT, "a", &multiset).await;
    assert_eq!(v["rows"], 50, "{v}");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_alone_follows_a_truncate_and_a_copy_taken_again() {
    // `mode = "mirror"` builds its batches in the mirror's shape, whose key columns are
    // required: a TRUNCATE's row (no values at all) stopped the pipeline, retried forever,
    // and so did the marker of a copy taken again. A keyed table and one without a key.
    let mut p = prepare(
        "CREATE TABLE mk (id int PRIMARY KEY, v text);
         CREATE TABLE mf (a int, b text);
         ALTER TABLE mf REPLICA IDENTITY FULL;
         INSERT INTO mk SELECT g, 'seed' FROM generate_series(1, 3000) g;
         INSERT INTO mf SELECT g % 10, 'x' FROM generate_series(1, 200) g;",
        &["mk", "mf"],
        "mode = \"mirror\"\nsnapshot = \"initial\"\nsnapshot_chunk_rows = 500",
        "",
    )
    .await;
    let port = philotes::demo::postgres::free_port().expect("free port");
    let addr = p.listen_on(port, "");
    let Running {
        pg,
        db,
        work,
        agent,
        ..
    } = p.streaming().await;
    const MK: &str = "SELECT id, v FROM mk";
    const MF: &str = "SELECT a, b FROM mf";
    wait_mirrored(&work, "ns.mk", &pg, MK, "id").await;
    db.batch_execute(
        "TRUNCATE mk, mf;
         INSERT INTO mk SELECT g, 'after' FROM generate_series(1, 2000) g;
         INSERT INTO mf SELECT g % 5, 'y' FROM generate_series(1, 100) g;",
    )
    .await
    .expect("truncate");
    wait_mirrored(&work, "ns.mk", &pg, MK, "id").await;
    wait_mirrored_with(&work, "ns.mf", &pg, MF, "a,b", &["--multiset"]).await;

    // Values given without being published (a volatile default fills every row when the
    // column is added), then both tables copied again through the API.
    db.batch_execute(
        "DELETE FROM mk WHERE id % 4 = 0;
         ALTER TABLE mk ADD COLUMN w int DEFAULT (random() * 1000)::int;
         ALTER TABLE mf ADD COLUMN w int DEFAULT (random() * 1000)::int;",
    )
    .await
    .expect("unpublished values");
    let http = reqwest::Client::new();
    for t in ["public.mk", "public.mf"] {
        let r = http
            .post(format!(
                "http://{addr}/api/v1/pipelines/p/tables/{t}/snapshot"
            ))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED, "{t}");
    }
    db.batch_execute("UPDATE mk SET v = 'later' WHERE id % 4 = 2; INSERT INTO mf VALUES (9, 'z');")
        .await
        .expect("later changes");
    const MKW: &str = "SELECT id, v, w FROM mk";
    const MFW: &str = "SELECT a, b, w FROM mf";
    let v = wait_mirrored(&work, "ns.mk", &pg, MKW, "id").await;
    assert_eq!(
        (v["rows"].as_i64(), v["duplicate_keys"].as_i64()),
        (Some(1500), Some(0)),
        "{v}"
    );
    wait_mirrored_with(&work, "ns.mf", &pg, MFW, "a,b", &["--multiset"]).await;
    assert!(
        !agent.log_text().contains("non-nullable"),
        "no attempt failed on the truncate's row"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_mirror_pays_its_compaction_debt() {
    // A mirror's compaction steps ran only after its commits: a mirror that stopped changing
    // kept its small files and delete files until its next change. Filled with maintenance
    // off (a small data file and a delete file per flush), then started again with it on and
    // left without a change, it must compact by itself and stay exact.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE im (id int PRIMARY KEY, n int, s text);
         INSERT INTO im SELECT g, 0, 'seed' FROM generate_series(1, 2000) g;",
        &["im"],
        "mode = \"mirror\"\nsnapshot = \"initial\"",
        "[maintenance]\nenabled = false\nmin_input_files = 2\ntarget_file_size = \"1MiB\"\n",
    )
    .await
    .streaming()
    .await;
    const Q: &str = "SELECT id, n, s FROM im";
    wait_mirrored(&work, "ns.im", &pg, Q, "id").await;
    for round in 1..=12 {
        db.batch_execute(&format!(
            "UPDATE im SET n = {round} WHERE id % 12 = {};
             DELETE FROM im WHERE id = {};
             INSERT INTO im VALUES ({}, {round}, 'new');",
            round % 12,
            round * 5,
            5000 + round
        ))
        .await
        .expect("round");
        // Past the flush interval (300 ms): each round is its own flush.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let before = wait_mirrored(&work, "ns.im", &pg, Q, "id").await;
    let files = |v: &Value| {
        (
            v["data_files"].as_u64().unwrap_or(0),
            v["position_delete_files"].as_u64().unwrap_or(0),
        )
    };
    let (data, deletes) = files(&before);
    assert!(data >= 10 && deletes >= 10, "{before}");
    assert_eq!(agent.terminate(), Some(0));
    edit_config(&cfg, "enabled = false", "enabled = true");
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent2.log")).await;
    // No change from here on.
    let mut now = before;
    for _ in 0..60 {
        now = wait_mirrored(&work, "ns.im", &pg, Q, "id").await;
        let (data, deletes) = files(&now);
        if data <= 3 && deletes <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (data, deletes) = files(&now);
    assert!(
        data <= 3 && deletes <= 1,
        "the idle mirror kept its debt: {now}"
    );
    assert_eq!(now["duplicate_keys"], 0, "{now}");
    let text = scrape(&agent.api_addr().expect("API address")).await;
    let landed = sample_sum(
        &text,
        "philotes_iceberg_maintenance_total",
        "action=\"compact\",source=\"p\",status=\"ok\",table=\"ns.im\"",
    );
    assert!(landed > 0.0, "{text}");
    assert!(agent.log_text().contains("deleted rows left out"));
    drop(agent);
}
