//! Source behaviour against a real PostgreSQL: schema changes mid-stream, unchanged TOAST
//! values, idle slots that must still advance, and two isolated pipelines.

use std::fmt::Write as _;
use std::time::Duration;

use crate::common::*;
use philotes::demo::postgres::LocalPgOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_drop_column_mid_stream() {
    let (pg, db, work, agent) = running(
        "CREATE TABLE s (id int PRIMARY KEY, a text, b int)",
        &["s"],
        "",
    )
    .await
    .parts();
    db.batch_execute("INSERT INTO s SELECT g, 'a' || g, g FROM generate_series(1, 50) g")
        .await
        .unwrap();
    db.batch_execute(
        "ALTER TABLE s ADD COLUMN c numeric(12,2);
         INSERT INTO s SELECT g, 'a' || g, g, g / 4.0 FROM generate_series(51, 100) g;
         UPDATE s SET c = 1.5 WHERE id = 1;
         ALTER TABLE s DROP COLUMN b;
         INSERT INTO s SELECT g, 'a' || g, g FROM generate_series(101, 150) g;",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.s", 151, 60).await;
    let v = verify_source(&work, "ns.s", &pg, "SELECT id, a, c FROM s", &["--rows"]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let rows = v["all_rows"].as_array().unwrap();
    let row = |id: i64| rows.iter().rev().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(
        row(10)["c"],
        serde_json::Value::Null,
        "before ADD COLUMN: null"
    );
    assert_eq!(row(60)["c"], "15.00", "after ADD COLUMN: the value");
    assert_eq!(
        row(60)["b"],
        60,
        "the dropped column kept its values before the drop"
    );
    assert_eq!(
        row(120)["b"],
        serde_json::Value::Null,
        "after DROP COLUMN: null"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_listed_not_silently_null() {
    let (_pg, db, work, agent) = running(
        "CREATE TABLE doc (id int PRIMARY KEY, body text, n int);
         ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;",
        &["doc"],
        "",
    )
    .await
    .parts();
    db.batch_execute(
        "INSERT INTO doc VALUES (1, repeat('0123456789abcdef', 65536), 0);
         UPDATE doc SET n = 1 WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.doc", 2, 60).await;
    let v = verify(&work, "ns.doc", &["--rows"]);
    let rows = v["all_rows"].as_array().unwrap();
    assert_eq!(
        rows[0]["body"].as_str().unwrap().len(),
        1 << 20,
        "the insert carries 1 MB"
    );
    assert_eq!(rows[1]["_cdc_op"], "U");
    assert_eq!(rows[1]["body"], serde_json::Value::Null);
    assert_eq!(
        rows[1]["_cdc_unchanged"],
        serde_json::json!(["body"]),
        "{}",
        rows[1]
    );
    assert_eq!(rows[1]["n"], 1);
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_publication_still_advances_its_slot() {
    let (pg, db, _work, agent) = running(
        "CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id int PRIMARY KEY, s text)",
        &["quiet"],
        "heartbeat_interval = \"1s\"",
    )
    .await
    .parts();
    let start = pg.confirmed_lsn("app", "philotes_p").await;
    for i in 0..20 {
        db.batch_execute(&format!(
            "INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series({}, {}) g",
            i * 1000,
            i * 1000 + 999
        ))
        .await
        .unwrap();
    }
    let after_writes = {
        let c = pg.client("app").await;
        let r = c
            .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
            .await
            .unwrap();
        r.get::<_, i64>(0) as u64
    };
    let advanced = wait_for(
        Duration::from_secs(30),
        "confirmed_flush_lsn to pass the other table's writes",
        || async {
            let c = pg.confirmed_lsn("app", "philotes_p").await;
            (c >= after_writes).then_some(c)
        },
    )
    .await;
    assert!(advanced > start);
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_pipeline_does_not_stop_the_other() {
    let pg1 = TestPg::start();
    let mut pg2 = TestPg::start();
    let db1 = pg1.create_db("one").await;
    let db2 = pg2.create_db("two").await;
    for db in [&db1, &db2] {
        db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
            .await
            .unwrap();
    }
    let work = Workdir::new();
    let cfg = work.config(&pg1.url("one"), &["t"], "", "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[[pipelines]]\nname = \"q\"\nsource = \"{}\"\ntables = [\"t\"]\nnamespace = \"ns2\"\nflush_interval = \"300ms\"\nsnapshot = \"never\"\n",
        pg2.url("two")
    ));
    std::fs::write(&cfg, text).unwrap();
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    agent.wait_state("q", "streaming", 60).await;
    db2.batch_execute("INSERT INTO t SELECT g, 'two' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    wait_rows(&work, "ns2.t", 100, 60).await;
    drop(db2);
    pg2.pg.stop();
    insert_batches(
        &db1,
        "t",
        "g, 'one'",
        0,
        10,
        100,
        Duration::from_millis(300),
    )
    .await;
    wait_rows(&work, "ns.t", 1000, 60).await;
    // A retrying pipeline looks like one: its state, the attempt count and the next attempt.
    let q = agent
        .wait_pipeline("q", 60, "q retrying twice", |v| {
            v["state"] == "retrying" && v["retry"]["attempt"].as_u64().unwrap_or(0) >= 2
        })
        .await;
    assert!(q["last_error"].is_string(), "{q}");
    assert_eq!(q["retry"]["error_type"], "connection", "{q}");
    let next =
        chrono::DateTime::parse_from_rfc3339(q["retry"]["next_attempt_at"].as_str().unwrap())
            .expect("next_attempt_at is RFC 3339");
    let ahead = next.signed_duration_since(chrono::Utc::now());
    assert!(
        ahead <= chrono::Duration::seconds(31) && ahead >= chrono::Duration::seconds(-30),
        "next attempt within the backoff ceiling: {q}"
    );
    let summary = agent.api_json("/api/v1/pipelines").await.unwrap();
    let q_summary = summary["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "q")
        .cloned()
        .unwrap();
    assert_eq!(q_summary["state"], "retrying", "{summary}");
    assert!(
        q_summary["retry"]["attempt"].as_u64().unwrap() >= 2,
        "{summary}"
    );
    let p = agent.api_json("/api/v1/pipelines/p").await.unwrap();
    assert_eq!(p["state"], "streaming");
    assert!(p["retry"].is_null(), "{p}");
    // The database comes back: q recovers by itself and catches up.
    pg2.pg.start_again().unwrap();
    let db2 = pg2.client("two").await;
    db2.batch_execute("INSERT INTO t SELECT g, 'two' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    wait_rows(&work, "ns2.t", 200, 90).await;
    assert_eq!(verify(&work, "ns2.t", &[])["unique"], true);
    let q = agent.api_json("/api/v1/pipelines/q").await.unwrap();
    assert_eq!(q["state"], "streaming", "{q}");
    assert!(q["retry"].is_null(), "recovered: {q}");
    // The log: one ERROR at the first failure, WARN lines with the attempt count, INFO on
    // recovery; the other pipeline logs no failure at all.
    let log = agent.log_text();
    let q_lines: Vec<&str> = log.lines().filter(|l| l.contains("pipeline=q")).collect();
    let level = |lvl: &str, what: &str| {
        q_lines
            .iter()
            .filter(|l| l.contains(lvl) && l.contains(what))
            .count()
    };
    assert_eq!(
        level("ERROR", "pipeline failed"),
        1,
        "{}",
        q_lines.join("\n")
    );
    assert!(
        level("WARN", "still failing (attempt ") >= 1,
        "{}",
        q_lines.join("\n")
    );
    assert_eq!(
        q_lines.iter().filter(|l| l.contains("ERROR")).count(),
        1,
        "{}",
        q_lines.join("\n")
    );
    assert_eq!(
        level("INFO", "recovered after"),
        1,
        "{}",
        q_lines.join("\n")
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("pipeline=p")
                && (l.contains("ERROR") || l.contains("still failing"))),
        "{log}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// A table added to the publication while the agent streams is picked up. With
/// `snapshot = "initial"` the stream restarts, the table is copied (R rows) and its changes
/// continue from the copy's consistent point: folded, it equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_publication_is_snapshotted_and_streamed() {
    let (pg, db, work, agent) = running(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO b SELECT g, 'old' FROM generate_series(1, 500) g;
         CREATE TABLE \"Odd \"\"Name\"\" 's\" (\"Id\" int PRIMARY KEY, \"a \"\"b\"\"\" text);
         INSERT INTO \"Odd \"\"Name\"\" 's\" VALUES (1, 'x'), (2, 'y');",
        &["a"],
        "snapshot = \"initial\"",
    )
    .await
    .parts();
    db.batch_execute("INSERT INTO a VALUES (1, 'x')")
        .await
        .unwrap();
    wait_rows(&work, "ns.a", 1, 60).await;
    db.batch_execute(
        "ALTER PUBLICATION philotes_p ADD TABLE b, \"Odd \"\"Name\"\" 's\";
         BEGIN;
         INSERT INTO b VALUES (1001, 'new');
         UPDATE b SET v = 'changed' WHERE id <= 10;
         DELETE FROM b WHERE id > 490;
         INSERT INTO a VALUES (2, 'y');
         COMMIT;
         INSERT INTO b VALUES (1002, 'later');
         UPDATE b SET v = 'again' WHERE id = 20;
         INSERT INTO \"Odd \"\"Name\"\" 's\" VALUES (3, 'z');",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.a", 2, 60).await;
    let v = wait_source_equal(&work, "ns.b", &pg, "SELECT id, v FROM b", &[], 90).await;
    assert!(
        v["ops"]["R"].as_i64().unwrap_or(0) >= 490,
        "existing rows copied: {v}"
    );
    // Any name can join through the publication: quoted everywhere it is used.
    wait_rows(&work, "ns.Odd \"Name\" 's", 3, 60).await;
    assert_eq!(v["snapshot_duplicate_keys"], 0);
    assert_eq!(v["unique"], true);
    let log = agent.log_text();
    assert!(log.contains("table joined the publication"), "{log}");
    assert!(
        !log.contains("pipeline failed"),
        "a new table is not a failure: {log}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// Without a snapshot, a table added to the publication streams its changes from then on;
/// with `follow_publication = false` it is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_publication_streams_unless_told_not_to() {
    for follow in [true, false] {
        let (_pg, db, work, agent) = running(
            "CREATE TABLE a (id int PRIMARY KEY);
             CREATE TABLE c (id int PRIMARY KEY);
             INSERT INTO c SELECT generate_series(1, 50);",
            &["a"],
            &format!("follow_publication = {follow}"),
        )
        .await
        .parts();
        db.batch_execute(
            "ALTER PUBLICATION philotes_p ADD TABLE c;
             INSERT INTO c VALUES (100), (101);
             DELETE FROM c WHERE id = 1;
             INSERT INTO a VALUES (1);",
        )
        .await
        .unwrap();
        wait_rows(&work, "ns.a", 1, 60).await;
        if follow {
            wait_rows(&work, "ns.c", 3, 60).await;
        } else {
            assert_eq!(iceberg_rows(&work, "ns.c"), None, "c is not followed");
        }
        assert_eq!(agent.terminate(), Some(0));
    }
}

/// A table that joins the publication and leaves it again before the agent reads that far is
/// not copied (it is no longer in the publication), and the restart does not loop: the
/// changes it published while it was in stream without a copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_joined_and_left_streams_without_looping() {
    let (_pg, db, work, agent) = running(
        "CREATE TABLE a (id int PRIMARY KEY);
         CREATE TABLE d (id int PRIMARY KEY);
         INSERT INTO d VALUES (1), (2);",
        &["a"],
        "snapshot = \"initial\"",
    )
    .await
    .parts();
    let api = format!("http://{}/api/v1/pipelines/p", agent.api_addr().unwrap());
    let http = reqwest::Client::new();
    http.post(format!("{api}/pause"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    agent.wait_state("p", "paused", 30).await;
    // While the agent reads nothing: d joins, publishes one row, and leaves.
    execute_each(
        &db,
        &[
            "ALTER PUBLICATION philotes_p ADD TABLE d",
            "INSERT INTO d VALUES (3)",
            "ALTER PUBLICATION philotes_p DROP TABLE d",
            "INSERT INTO d VALUES (4)",
            "INSERT INTO a VALUES (1)",
        ],
    )
    .await;
    http.post(format!("{api}/resume"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    wait_rows(&work, "ns.a", 1, 60).await;
    wait_rows(&work, "ns.d", 1, 60).await;
    let v = verify(&work, "ns.d", &["--rows"]);
    assert_eq!(
        v["all_rows"][0]["id"], 3,
        "the row published while d was in: {v}"
    );
    let log = agent.log_text();
    assert!(log.contains("left it again"), "{log}");
    assert_eq!(
        log.matches("taking its initial snapshot").count(),
        1,
        "one restart, no loop: {log}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// Server options under which a transaction is streamed while in progress once it has 64 kB
/// of decoded changes (the smallest `logical_decoding_work_mem`), so that tests need only
/// a few thousand rows to take the streamed path.
fn streams_in_progress() -> LocalPgOptions {
    let mut opts = LocalPgOptions::default();
    opts.settings
        .push(("logical_decoding_work_mem".into(), "64kB".into()));
    opts
}

/// A server that streams transactions in progress after 64 kB of decoded changes, with table
/// `big` (id, v, pad) and a config for it.
async fn prepare_streamed_big() -> Prepared {
    let opts = streams_in_progress();
    prepare_with(
        opts,
        "CREATE TABLE big (id int PRIMARY KEY, v text, pad text)",
        &["big"],
        "",
        "",
    )
    .await
}

/// Streamed transactions the server has sent for `slot` (`pg_stat_replication_slots`).
async fn stream_txns(pg: &TestPg, slot: &str) -> i64 {
    pg.client("app")
        .await
        .query_opt(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

/// A large transaction of every mapped type, streamed while in progress: its rows are
/// Parquet-encoded as they arrive (an early file, finished at the commit), read back alike by
/// PyIceberg and DuckDB, and every data file's Iceberg statistics are what pyarrow finds in
/// the file (a wrong bound would make engines skip rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_of_every_type_is_encoded_early_with_exact_statistics() {
    let opts = streams_in_progress();
    let (pg, db, work, agent) = prepare_with(
        opts,
        ALL_TYPES,
        &["public.all_types"],
        "batch_rows = 400",
        "[telemetry]\nlog_level = \"debug\"\n",
    )
    .await
    .streaming()
    .await
    .parts();
    // 3,000 rows in one transaction (every seventh all NULL), NaN and infinities among the
    // floats, then updates and deletes inside it; then small transactions the usual way.
    let mut sql = String::from("BEGIN;");
    for chunk in (1..=3000i64).collect::<Vec<_>>().chunks(500) {
        let rows: Vec<String> = chunk.iter().map(|&i| all_types_values(i)).collect();
        write!(sql, "INSERT INTO all_types VALUES {};", rows.join(",")).unwrap();
    }
    sql.push_str(
        "UPDATE all_types SET c_float8 = 'NaN', c_float4 = '-Infinity' WHERE id % 100 = 1;\
         UPDATE all_types SET c_text = 'in txn' WHERE id BETWEEN 10 AND 20;\
         DELETE FROM all_types WHERE id % 250 = 0; COMMIT;",
    );
    db.batch_execute(&sql).await.expect("the large transaction");
    for i in 3001..=3010i64 {
        db.batch_execute(&format!(
            "INSERT INTO all_types VALUES {}",
            all_types_values(i)
        ))
        .await
        .unwrap();
    }
    // I 3,000 + 10; U 30 + 11; D 12.
    let want = 3_000 + 30 + 11 + 12 + 10;
    wait_rows(&work, "ns.all_types", want, 120).await;
    let text = agent.log_text();
    let encoded = encoded_early(&text);
    assert!(
        encoded >= 3_000,
        "the streamed transaction's rows were encoded while it streamed: {encoded}\n{text}"
    );
    let v = verify_all_types(&work, &pg.conninfo("app"), "");
    assert_eq!(v["rows"], want, "{v}");
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["duckdb_rows"], want, "{v}");
    assert_eq!(v["duckdb_equal"], true, "{}", v["duckdb_diff"]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let s = file_stats(&work, "ns.all_types");
    assert_eq!(s["mismatches"], serde_json::json!([]), "{s}");
    assert!(s["files"].as_u64().unwrap() >= 2, "{s}");
    assert!(
        s["bounds_checked"].as_u64().unwrap() >= 40,
        "bounds of most columns present: {s}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_transactions_stream_with_savepoints_rollbacks_and_crashes() {
    // 64 kB of decoded changes and PostgreSQL streams the transaction before it commits.
    let Prepared {
        pg, db, work, cfg, ..
    } = prepare_streamed_big().await;
    let log = work.path().join("agent.log");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    let ins = |a: i64, b: i64| {
        format!("INSERT INTO big SELECT g, 'v' || g, repeat('p', 100) FROM generate_series({a}, {b}) g;")
    };
    // Savepoints: one rolled back, one kept, a nested one released.
    db.batch_execute(&format!(
        "BEGIN; {} SAVEPOINT s1; {} ROLLBACK TO s1; SAVEPOINT s2; \
         UPDATE big SET v = 'upd' WHERE id <= 1000; SAVEPOINT s3; DELETE FROM big WHERE id > 19000; \
         RELEASE s3; COMMIT;",
        ins(1, 20_000),
        ins(20_001, 25_000)
    ))
    .await
    .unwrap();
    // A streamed transaction that rolls back leaves nothing.
    db.batch_execute(&format!("BEGIN; {} ROLLBACK;", ins(30_001, 40_000)))
        .await
        .unwrap();
    // Two streamed transactions interleaved, committed in the other order.
    let other = pg.client("app").await;
    db.batch_execute(&format!("BEGIN; {}", ins(50_001, 60_000)))
        .await
        .unwrap();
    other
        .batch_execute(&format!("BEGIN; {}", ins(60_001, 70_000)))
        .await
        .unwrap();
    db.batch_execute(&format!(
        "{} UPDATE big SET v = 'a-late' WHERE id = 50001;",
        ins(70_001, 75_000)
    ))
    .await
    .unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    db.batch_execute(&ins(80_001, 80_010)).await.unwrap();
    // I: 20,000 + 15,000 + 10,000 + 10; U: 1,000 + 1; D: 1,000.
    wait_rows(&work, "ns.big", 47_011, 120).await;
    let streamed = wait_for(
        Duration::from_secs(30),
        "the server to report streamed transactions",
        || async {
            let n = stream_txns(&pg, "philotes_p").await;
            (n >= 4).then_some(n)
        },
    )
    .await;
    assert!(
        streamed >= 4,
        "T1, the rollback and both interleaved ones streamed"
    );
    let check = |what: &str| {
        let v = verify_state(&work, "ns.big", &pg, "SELECT id, v, pad FROM big");
        assert_eq!(v["state_equal"], true, "{what}: {}", v["state_diff"]);
        assert_eq!(v["duplicates"], 0, "{what}");
        v
    };
    let v = check("streamed");
    assert_eq!(v["ops"]["I"], 45_010, "{v}");
    assert_eq!(v["ops"]["U"], 1_001, "{v}");
    assert_eq!(v["ops"]["D"], 1_000, "{v}");

    // SIGKILL while a streamed transaction is spooled but not committed: after the restart
    // the server streams it again from its start; it lands once.
    let open = pg.client("app").await;
    let before = stream_txns(&pg, "philotes_p").await;
    open.batch_execute(&format!("BEGIN; {}", ins(90_001, 100_000)))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the open transaction to be streamed",
        || async { (stream_txns(&pg, "philotes_p").await > before).then_some(()) },
    )
    .await;
    // The API shows the spooled transaction while it is open. The server streams it in
    // blocks, so the bytes grow until the whole insert has arrived: wait for more than the
    // first block (a single sample raced the later blocks).
    let spooled = wait_for(
        Duration::from_secs(30),
        "the API to show 10,000 rows spooled (over 100,000 bytes)",
        || async {
            let v = agent.api_json("/api/v1/pipelines/p").await?;
            let bytes = v["spooled_bytes"].as_u64()?;
            (v["spooled_transactions"].as_u64()? >= 1 && bytes > 100_000).then_some(bytes)
        },
    )
    .await;
    assert!(spooled > 100_000, "10,000 rows spooled: {spooled} bytes");
    let gauge = metric_value(
        &agent.api_addr().unwrap(),
        "philotes_buffer_spool_bytes",
        "source=\"p\"",
    )
    .await;
    assert!(gauge > 100_000.0, "philotes_buffer_spool_bytes = {gauge}");
    agent.kill9();
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    open.batch_execute(&format!("{} COMMIT;", ins(100_001, 101_000)))
        .await
        .unwrap();
    wait_rows(&work, "ns.big", 58_011, 120).await;
    check("after a crash mid-stream");
    let v = agent.api_json("/api/v1/pipelines/p").await.unwrap();
    assert_eq!(
        v["spooled_transactions"], 0,
        "spool released at the commit: {v}"
    );
    assert_eq!(v["spooled_bytes"], 0, "{v}");
    assert!(
        !agent.log_text().contains("pipeline failed"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.terminate(), Some(0));

    // With streaming off the server spools instead; the result is the same.
    let cfg = work.config(&pg.url("app"), &["big"], "stream_in_progress = false", "");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    let before = stream_txns(&pg, "philotes_p").await;
    db.batch_execute(&format!(
        "BEGIN; {} SAVEPOINT s; {} ROLLBACK TO s; COMMIT;",
        ins(110_001, 120_000),
        ins(120_001, 125_000)
    ))
    .await
    .unwrap();
    wait_rows(&work, "ns.big", 68_011, 120).await;
    check("protocol 1");
    assert_eq!(
        stream_txns(&pg, "philotes_p").await,
        before,
        "nothing streamed with stream_in_progress = false"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_land_at_commit_prepared_once_and_rolled_back_ones_never() {
    // Two-phase commit (PREPARE TRANSACTION, as XA transaction managers use it): with the
    // slot's two_phase off the server decodes a prepared transaction at COMMIT PREPARED, and a
    // large one is streamed in progress before that; ROLLBACK PREPARED aborts it.
    let mut opts = streams_in_progress();
    opts.settings
        .push(("max_prepared_transactions".into(), "4".into()));
    let Prepared {
        pg, db, work, cfg, ..
    } = prepare_with(
        opts,
        "CREATE TABLE big (id int PRIMARY KEY, v text, pad text)",
        &["big"],
        "",
        "",
    )
    .await;
    let log = work.path().join("agent.log");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    let ins = |a: i64, b: i64| {
        format!("INSERT INTO big SELECT g, 'v' || g, repeat('p', 100) FROM generate_series({a}, {b}) g;")
    };
    db.batch_execute(&ins(1, 100)).await.unwrap();
    wait_rows(&work, "ns.big", 100, 60).await;
    // p1: large (streamed before its PREPARE), a savepoint rolled back, rows updated and
    // deleted; prepared, and then left open across a SIGKILL of the agent.
    let before = stream_txns(&pg, "philotes_p").await;
    db.batch_execute(&format!(
        "BEGIN; {} SAVEPOINT s; {} ROLLBACK TO s; UPDATE big SET v = 'p1' WHERE id <= 50; \
         DELETE FROM big WHERE id > 90 AND id <= 100; PREPARE TRANSACTION 'p1';",
        ins(1_001, 11_000),
        ins(11_001, 15_000)
    ))
    .await
    .unwrap();
    // p2: large and prepared too, then rolled back.
    db.batch_execute(&format!(
        "BEGIN; {} PREPARE TRANSACTION 'p2';",
        ins(20_001, 30_000)
    ))
    .await
    .unwrap();
    db.batch_execute("ROLLBACK PREPARED 'p2'").await.unwrap();
    // A small plain transaction after them lands while p1 is still only prepared.
    db.batch_execute(&ins(40_001, 40_010)).await.unwrap();
    wait_rows(&work, "ns.big", 110, 60).await;
    let streamed = wait_for(
        Duration::from_secs(30),
        "the server to stream the prepared transactions in progress",
        || async {
            let n = stream_txns(&pg, "philotes_p").await;
            (n >= before + 2).then_some(n)
        },
    )
    .await;
    assert!(streamed >= before + 2);
    let v = verify_state(&work, "ns.big", &pg, "SELECT id, v, pad FROM big");
    assert_eq!(v["state_equal"], true, "prepared only: {}", v["state_diff"]);
    agent.kill9();
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    db.batch_execute("COMMIT PREPARED 'p1'").await.unwrap();
    db.batch_execute(&ins(40_011, 40_020)).await.unwrap();
    // 100 + 10,000 (p1) + 20 plain rows inserted, 50 updated, 10 deleted.
    wait_rows(&work, "ns.big", 10_180, 120).await;
    let v = verify_state(&work, "ns.big", &pg, "SELECT id, v, pad FROM big");
    assert_eq!(v["state_equal"], true, "committed: {}", v["state_diff"]);
    assert_eq!(v["duplicates"], 0, "{v}");
    assert_eq!(v["ops"]["I"], 10_120, "{v}");
    assert_eq!(v["ops"]["U"], 50, "{v}");
    assert_eq!(v["ops"]["D"], 10, "{v}");
    assert!(
        !agent.log_text().contains("pipeline failed"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// The converted-ahead gauge of pipeline `p`.
async fn converted_bytes(agent: &AgentProc) -> f64 {
    metric_value(
        &agent.api_addr().unwrap(),
        "philotes_buffer_streamed_converted_bytes",
        "source=\"p\"",
    )
    .await
}

/// A transaction streamed in progress is converted as it arrives (it is held in memory, and the
/// gauge shows it, before the commit); at the commit its rows get the commit's LSN and time, and
/// what could not be converted early — a value for the dead-letter table, a column added inside
/// the transaction — is replayed from the spool under the same `_cdc_seq` count. DDL of a
/// streamed transaction that rolls back never reaches the Iceberg schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_convert_as_they_arrive_and_replay_the_rest() {
    let opts = streams_in_progress();
    let p = prepare_with(
        opts,
        "CREATE TABLE big (id int PRIMARY KEY, v text, amount numeric(8,2))",
        &["big"],
        "",
        "",
    )
    .await;
    let log = p.log();
    let (pg, db, work, cfg) = p.parts();
    let agent = AgentProc::start_streaming(&cfg, &log).await;

    // The table's first change of this connection is inside a streamed transaction.
    db.batch_execute(
        "BEGIN; INSERT INTO big SELECT g, 'v' || g, g / 100.0 FROM generate_series(1, 20000) g;",
    )
    .await
    .unwrap();
    let held = wait_for(
        Duration::from_secs(30),
        "the open transaction's rows converted ahead of its commit",
        || async {
            let b = converted_bytes(&agent).await;
            (b > 100_000.0).then_some(b)
        },
    )
    .await;
    assert!(held > 100_000.0, "{held}");
    // Key changes (a delete and an insert each), then a value the table cannot hold: the rest
    // of the transaction is replayed from the spool at the commit.
    db.batch_execute(
        "UPDATE big SET id = id + 100000 WHERE id <= 100;
         INSERT INTO big VALUES (30000, 'poison', 'NaN');
         INSERT INTO big SELECT g, 'w' || g, 1 FROM generate_series(30001, 40000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    // 20,000 + 100 deletes + 100 updates + 10,000.
    wait_rows(&work, "ns.big", 30_200, 120).await;
    wait_rows(&work, "ns._philotes_dlq", 1, 60).await;
    let not_poison = "SELECT id, v, amount FROM big WHERE id <> 30000";
    let v = verify_source(&work, "ns.big", &pg, not_poison, &["--rows"]);
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let rows = v["all_rows"].as_array().unwrap();
    let lsn = rows[0]["_cdc_lsn"].clone();
    let ts = rows[0]["_cdc_ts"].clone();
    assert!(
        rows.iter()
            .all(|r| r["_cdc_lsn"] == lsn && r["_cdc_ts"] == ts),
        "one transaction: one commit LSN and time on every row"
    );
    let dlq = verify_dlq(&work);
    let dead = &dlq["all_rows"][0];
    assert_eq!(dead["_cdc_lsn"], lsn, "{dead}");
    let mut seqs: Vec<i64> = rows
        .iter()
        .map(|r| r["_cdc_seq"].as_i64().unwrap())
        .chain([dead["_cdc_seq"].as_i64().unwrap()])
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..30_201).collect::<Vec<i64>>(),
        "converted and replayed changes count on from each other"
    );
    assert_eq!(
        dead["_cdc_seq"], 20_200,
        "the poison row comes after the key changes"
    );
    let after = wait_for(
        Duration::from_secs(30),
        "the gauge back at zero",
        || async {
            let b = converted_bytes(&agent).await;
            (b == 0.0).then_some(b)
        },
    )
    .await;
    assert_eq!(after, 0.0);

    // A column added inside a streamed transaction: the rows after it are replayed, with it.
    db.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT g, 'x' || g, 2 FROM generate_series(50001, 60000) g;
         ALTER TABLE big ADD COLUMN extra int;
         INSERT INTO big SELECT g, 'y' || g, 3, g FROM generate_series(60001, 70000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.big", 50_200, 120).await;
    let with_extra = "SELECT id, v, amount, extra FROM big WHERE id <> 30000";
    let v = verify_source(&work, "ns.big", &pg, with_extra, &["--rows"]);
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);

    // DDL in a streamed transaction that rolls back: the column never appears.
    db.batch_execute(
        "BEGIN;
         ALTER TABLE big ADD COLUMN ghost int;
         INSERT INTO big SELECT g, 'z' || g, 4, g, 1 FROM generate_series(80001, 90000) g;
         ROLLBACK;
         INSERT INTO big VALUES (90001, 'after', 5, 5);",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.big", 50_201, 120).await;
    let v = verify_source(&work, "ns.big", &pg, with_extra, &["--rows"]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let last = v["all_rows"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["id"], 90001, "{last}");
    assert!(
        last.get("ghost").is_none(),
        "a rolled-back column is not in the Iceberg table: {last}"
    );

    // A rename inside a streamed transaction that rolls back is not followed: the table keeps
    // its name, in the agent and in the Iceberg table's records.
    db.batch_execute(
        "BEGIN;
         ALTER TABLE big RENAME TO big2;
         INSERT INTO big2 SELECT g, 'r' || g, 6, g FROM generate_series(200001, 210000) g;
         ROLLBACK;
         INSERT INTO big VALUES (210001, 'still', 7, 7);",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.big", 50_202, 120).await;
    let v = verify_source(&work, "ns.big", &pg, with_extra, &[]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    assert_eq!(
        schema_changes(&agent, "rename_table").await,
        0.0,
        "a rolled-back rename is never followed"
    );
    assert!(
        !agent.log_text().contains("pipeline failed"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// A large transaction converted ahead of its commit reaches a mirror in order: key changes,
/// updates of rows inserted earlier in the same transaction and deletes fold to the source.
/// The changelog beside the mirror takes the same rows encoded while they stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_converted_early_folds_into_the_mirror() {
    let opts = streams_in_progress();
    let p = prepare_with(
        opts,
        "CREATE TABLE big (id int PRIMARY KEY, v text, pad text);
         INSERT INTO big SELECT g, 'seed', 'p' FROM generate_series(1, 100) g;",
        &["big"],
        // Batches of 2,000 rows: the transaction fills several before its commit.
        "mode = \"both\"\nsnapshot = \"initial\"\nbatch_rows = 2000",
        "[telemetry]\nlog_level = \"debug\"\n",
    )
    .await;
    let log = p.log();
    let (pg, db, work, cfg) = p.parts();
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    wait_rows(&work, "ns.big", 100, 120).await;
    db.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT g, 'v' || g, repeat('p', 50) FROM generate_series(101, 20000) g;",
    )
    .await
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the open transaction's rows converted ahead of its commit",
        || async { (converted_bytes(&agent).await > 100_000.0).then_some(()) },
    )
    .await;
    db.batch_execute(
        "UPDATE big SET v = 'changed' WHERE id % 7 = 0;
         DELETE FROM big WHERE id % 11 = 0;
         UPDATE big SET id = id + 100000 WHERE id % 13 = 0;
         COMMIT;",
    )
    .await
    .unwrap();
    let query = "SELECT id, v, pad FROM big";
    let expected: i64 = pg
        .client("app")
        .await
        .query_one("SELECT count(*) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    let v = crate::mirror::wait_mirrored_with(&work, "ns.big", &pg, query, "id", &[]).await;
    assert_eq!(v["rows"], expected, "{v}");
    let changelog = verify_source(&work, "ns.big_changelog", &pg, query, &[]);
    assert_eq!(changelog["unique"], true, "{changelog}");
    assert_eq!(
        changelog["state_equal"], true,
        "{}",
        changelog["state_diff"]
    );
    // 19,900 inserts, then ~2,700 updates, ~1,800 deletes and ~1,500 key moves.
    let encoded = encoded_early(&agent.log_text());
    assert!(
        encoded >= 18_000,
        "the changelog's rows were encoded while the transaction streamed: {encoded}"
    );
    let s = file_stats(&work, "ns.big_changelog");
    assert_eq!(s["mismatches"], serde_json::json!([]), "{s}");
    assert!(
        !agent.log_text().contains("pipeline failed"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// Long strings in files of several row groups: every file's bounds hold every row. Parquet
/// truncated long minimums and maximums in its row-group statistics, and a file's bounds were
/// built from the exact ones alone, so a file whose smallest value was long and sat in another
/// row group than a short one got a lower bound above that value (engines skip such a file
/// for `s = <that value>`). Rows arrive in the transaction's order, so the long smallest value
/// (row 1) lands in the first row group and the short one (`00000002`) in the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_strings_across_row_groups_keep_bounds_that_hold_every_row() {
    let opts = streams_in_progress();
    let (pg, db, work, agent) = prepare_with(
        opts,
        "CREATE TABLE ls (id int PRIMARY KEY, s text)",
        &["ls"],
        "mode = \"both\"\nmax_buffer_bytes = \"1GiB\"",
        "[telemetry]\nlog_level = \"debug\"\n",
    )
    .await
    .streaming()
    .await
    .parts();
    // ~960 hex characters per row (~0.5 kB compressed): 80,000 rows pass the 32 MiB a row
    // group holds.
    db.batch_execute(
        "BEGIN;
         INSERT INTO ls SELECT g, lpad(g::text, 8, '0') ||
           (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 30) i)
         FROM generate_series(1, 80000) g;
         INSERT INTO ls VALUES (0, '00000002');
         COMMIT;",
    )
    .await
    .unwrap();
    let query = "SELECT id, s FROM ls";
    let v = crate::mirror::wait_mirrored_with(&work, "ns.ls", &pg, query, "id", &[]).await;
    assert_eq!(v["rows"], 80_001, "{v}");
    wait_rows(&work, "ns.ls_changelog", 80_001, 120).await;
    assert!(
        encoded_early(&agent.log_text()) > 0,
        "the changelog's file was encoded while the transaction streamed"
    );
    for table in ["ns.ls", "ns.ls_changelog"] {
        let s = file_stats(&work, table);
        assert_eq!(s["mismatches"], serde_json::json!([]), "{table}: {s}");
        assert!(s["bounds_checked"].as_u64().unwrap() >= 4, "{table}: {s}");
        // A data file holds more than one row group (else this test shows nothing).
        assert!(s["row_groups_max"].as_u64().unwrap() >= 2, "{table}: {s}");
    }
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_source_tables_with_one_iceberg_name_are_refused_not_mixed() {
    // `a.b` and `public.a__b` both map to Iceberg `ns.a__b`; the second joins through the
    // publication, so the config check cannot see it.
    let (_pg, db, work, agent) = running(
        "CREATE SCHEMA a; CREATE TABLE a.b (id int PRIMARY KEY); CREATE TABLE a__b (id int PRIMARY KEY);
         CREATE PUBLICATION philotes_p FOR TABLE a.b, a__b;",
        &["a.b"],
        "",
    )
    .await
    .parts();
    db.batch_execute("INSERT INTO a.b VALUES (1)")
        .await
        .unwrap();
    wait_rows(&work, "ns.a__b", 1, 60).await;
    db.batch_execute("INSERT INTO a__b VALUES (2)")
        .await
        .unwrap();
    let v = agent
        .wait_pipeline("p", 60, "the pipeline to report the clash", |v| {
            v["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("same Iceberg table"))
        })
        .await;
    let error = v["last_error"].as_str().unwrap();
    assert!(error.contains("a.b") && error.contains("a__b"), "{error}");
    assert_eq!(
        iceberg_rows(&work, "ns.a__b"),
        Some(1),
        "public.a__b's row never lands in a.b's table"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// A spool that cannot be written (its directory is gone) fails the attempt: every failed
/// attempt is one `error_type="spool"` and one retry (it used to be counted twice), and once the
/// directory exists again the transaction lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_error_is_counted_once_per_attempt_and_recovers() {
    let Prepared { pg, db, work, .. } = prepare_streamed_big().await;
    let spool = work.path().join("spool");
    let cfg = work.config(
        &pg.url("app"),
        &["big"],
        &format!("spool_dir = \"{}\"", spool.display()),
        "",
    );
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    // Large enough that the server streams it while it is still open.
    db.batch_execute(
        "INSERT INTO big SELECT g, 'v' || g, repeat('p', 100) FROM generate_series(1, 5000) g",
    )
    .await
    .unwrap();
    let addr = agent.api_addr().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = agent
            .api_json("/api/v1/pipelines/p")
            .await
            .unwrap_or_default();
        if v["retry"]["attempt"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no two failed attempts: {v}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    std::fs::create_dir_all(&spool).unwrap();
    wait_rows(&work, "ns.big", 5000, 90).await;
    let errors = metric_value(&addr, "philotes_cdc_errors_total", "error_type=\"spool\"").await;
    let retries = metric_value(&addr, "philotes_cdc_retries_total", "source=\"p\"").await;
    assert!(errors >= 2.0, "spool errors counted: {errors}");
    assert_eq!(errors, retries, "one error per failed attempt");
    assert_eq!(verify(&work, "ns.big", &[])["unique"], true);
    assert_eq!(agent.terminate(), Some(0));
}

/// A source reached through a Unix-domain socket is read by a paced thread of its own
/// (`source/postgres/wire/paced.rs`), not the TCP path. Every path of that reader, against a
/// real server: small transactions, one streamed while in progress (64 kB decoding memory),
/// the apply loop falling behind (a 30k-row transaction), a SIGKILL mid-stream, a clean stop
/// (final report and CopyDone) and progress reported while nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_source_streams_exactly_once_across_kill_and_stop() {
    let opts = streams_in_progress();
    let pg = TestPg::start_with(opts);
    let db = pg.create_db("app").await;
    db.batch_execute(
        "CREATE TABLE e (id bigint PRIMARY KEY, v int NOT NULL, s text); \
         CREATE TABLE other (id int PRIMARY KEY)",
    )
    .await
    .unwrap();
    let work = Workdir::new();
    let url = format!(
        "postgres://philotes@localhost:{}/app?host={}",
        pg.pg.port,
        pg.pg.data_dir.display()
    );
    let cfg = work.config(&url, &["e"], "batch_rows = 5000", "");
    let log = work.path().join("agent.log");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    // Every walsender session of the agent is local (no client address), so the stream is
    // read through the socket, not TCP.
    let (sessions, tcp): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(*), count(client_addr) FROM pg_stat_replication",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        sessions >= 1 && tcp == 0,
        "{sessions} sessions, {tcp} over TCP"
    );

    // 400 transactions of 50 inserts, 5 updates and 2 deletes, one of 30k rows in the middle.
    let gen_db = pg.client("app").await;
    let gen = tokio::spawn(async move {
        let mut next = 0i64;
        for t in 0..400 {
            let n = if t == 200 { 30_000 } else { 50 };
            let lo = (next - 200).max(0);
            gen_db
                .batch_execute(&format!(
                    "BEGIN; \
                     INSERT INTO e SELECT g, 0, repeat('u', 30) FROM generate_series({next}, {}) g; \
                     UPDATE e SET v = v + 1 WHERE id IN (SELECT id FROM e WHERE id >= {lo} ORDER BY id LIMIT 5); \
                     DELETE FROM e WHERE id IN (SELECT id FROM e WHERE id >= {lo} ORDER BY id LIMIT 2); \
                     COMMIT;",
                    next + n - 1
                ))
                .await
                .expect("workload");
            next += n;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    wait_rows_at_least(&work, "ns.e", 3_000, 60).await;
    agent.kill9();
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    gen.await.unwrap();
    assert!(
        stream_txns(&pg, "philotes_p").await >= 1,
        "the large transaction was streamed while in progress"
    );
    let q = "SELECT id, v, s FROM e";
    let synced = || async {
        let v = verify_source(&work, "ns.e", &pg, q, &[]);
        (v["state_equal"] == true).then_some(v)
    };
    let v = wait_for(
        Duration::from_secs(120),
        "Iceberg equal to the source",
        synced,
    )
    .await;
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);

    // Nothing changes in `e`: the reader still reports progress past other tables' writes.
    db.batch_execute("INSERT INTO other SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let wal_end = {
        let r = db
            .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
            .await
            .unwrap();
        r.get::<_, i64>(0) as u64
    };
    wait_for(
        Duration::from_secs(30),
        "confirmed_flush_lsn past the other table's writes",
        || async { (pg.confirmed_lsn("app", "philotes_p").await >= wal_end).then_some(()) },
    )
    .await;

    // A clean stop, more changes while stopped, and a restart: still exactly once.
    assert_eq!(agent.terminate(), Some(0), "clean shutdown exits 0");
    db.batch_execute("INSERT INTO e SELECT g, 7, 'after' FROM generate_series(1000000, 1000999) g")
        .await
        .unwrap();
    let late_updates = db
        .execute("UPDATE e SET s = 'changed' WHERE id < 1000", &[])
        .await
        .unwrap();
    assert!(late_updates > 0);
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    let v = wait_for(
        Duration::from_secs(120),
        "Iceberg equal after the restart",
        synced,
    )
    .await;
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);
    // Every change exactly once, not only the final state.
    assert_eq!(v["ops"]["I"], 399 * 50 + 30_000 + 1_000, "{}", v["ops"]);
    assert_eq!(v["ops"]["U"], 400 * 5 + late_updates, "{}", v["ops"]);
    assert_eq!(v["ops"]["D"], 400 * 2, "{}", v["ops"]);
    assert_eq!(agent.terminate(), Some(0));
}

/// A partitioned table (two levels of partitions) is copied partition by partition and
/// streamed under its own name: the agent creates its publication with
/// `publish_via_partition_root`, no Iceberg table appears for a partition, rows moved across
/// partitions follow, and folded the table equals the source. A table with an inheriting child
/// is copied without the child's rows (`FROM ONLY`): those are the child's own table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_copied_and_streamed_under_its_own_name() {
    let (pg, db, work, agent) = running(
        "CREATE TABLE m (id int, at date NOT NULL, v text, PRIMARY KEY (id, at))
           PARTITION BY RANGE (at);
         CREATE TABLE m_a PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2024-07-01');
         CREATE TABLE m_b PARTITION OF m FOR VALUES FROM ('2024-07-01') TO ('2025-01-01')
           PARTITION BY RANGE (at);
         CREATE TABLE m_b1 PARTITION OF m_b FOR VALUES FROM ('2024-07-01') TO ('2024-10-01');
         CREATE TABLE m_b2 PARTITION OF m_b FOR VALUES FROM ('2024-10-01') TO ('2025-01-01');
         INSERT INTO m SELECT g, date '2024-01-01' + (g % 366), 'v' || g
           FROM generate_series(1, 30000) g;
         CREATE TABLE p (id int PRIMARY KEY, v text);
         CREATE TABLE c () INHERITS (p);
         INSERT INTO p SELECT g, 'parent' FROM generate_series(1, 100) g;
         INSERT INTO c SELECT g, 'child' FROM generate_series(1, 50) g;",
        &["m", "p"],
        "snapshot = \"initial\"\nsnapshot_readers = 2",
    )
    .await
    .parts();
    db.batch_execute(
        "INSERT INTO m VALUES (30001, '2024-03-01', 'new'), (30002, '2024-11-11', 'new');
         UPDATE m SET v = 'changed' WHERE id <= 20;
         DELETE FROM m WHERE id BETWEEN 100 AND 110;
         UPDATE m SET at = '2024-12-24' WHERE id = 31;
         UPDATE m SET at = '2024-02-02', v = 'back' WHERE id = 200;
         INSERT INTO p VALUES (101, 'parent');",
    )
    .await
    .unwrap();
    let v = wait_source_equal(&work, "ns.m", &pg, "SELECT id, at, v FROM m", &[], 120).await;
    assert!(
        v["ops"]["R"].as_i64().unwrap_or(0) == 30000,
        "every partition copied once: {v}"
    );
    assert_eq!(v["snapshot_duplicate_keys"], 0);
    let v = wait_source_equal(&work, "ns.p", &pg, "SELECT id, v FROM ONLY p", &[], 60).await;
    assert_eq!(
        v["ops"]["R"], 100,
        "the child's rows are not the parent's: {v}"
    );
    let pub_via_root = db
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'philotes_p'",
            &[],
        )
        .await
        .unwrap();
    assert!(pub_via_root.get::<_, bool>(0));
    let (rc, out) = pyiceberg(&work, "print(sorted(t for _, t in c.list_tables('ns')))");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("'m'") && out.contains("'p'"), "{out}");
    for part in ["m_a", "m_b", "m_b1", "m_b2"] {
        assert!(
            !out.contains(&format!("'{part}'")),
            "no table for a partition: {out}"
        );
    }
    let log = agent.log_text();
    assert!(!log.contains("pipeline failed"), "{log}");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_with_mixed_case_spaces_and_dots_in_their_names_are_streamed() {
    // Names as ORMs make them ("Orders", "OrderId"), with a space, and with a dot (in quotes
    // in the config; an underscore in the Iceberg name, where a dot would read as a namespace).
    let (pg, db, work, agent) = prepare(
        "CREATE TABLE \"Orders\" (\"OrderId\" bigint PRIMARY KEY, \"CustomerName\" text);
         CREATE TABLE \"Order Items\" (\"Id\" int PRIMARY KEY, \"Qty Ordered\" int);
         CREATE SCHEMA \"Sales\";
         CREATE TABLE \"Sales\".\"Line.Items\" (id int PRIMARY KEY, v text);
         INSERT INTO \"Orders\" SELECT g, 'c' || g FROM generate_series(1, 50) g;
         INSERT INTO \"Order Items\" VALUES (1, 2), (2, 3);
         INSERT INTO \"Sales\".\"Line.Items\" VALUES (1, 'a');",
        &[
            "Orders",
            "public.Order Items",
            "\\\"Sales\\\".\\\"Line.Items\\\"",
        ],
        "snapshot = \"initial\"\nmode = \"both\"",
        "",
    )
    .await
    .started()
    .parts();
    wait_rows(&work, "ns.Orders_changelog", 50, 60).await;
    db.batch_execute(
        "UPDATE \"Orders\" SET \"CustomerName\" = 'upd' WHERE \"OrderId\" % 10 = 0;
         ALTER TABLE \"Orders\" ADD COLUMN \"Total Amount\" numeric(10,2);
         UPDATE \"Orders\" SET \"Total Amount\" = 9.5 WHERE \"OrderId\" < 5;
         INSERT INTO \"Order Items\" VALUES (3, 4);
         DELETE FROM \"Sales\".\"Line.Items\";",
    )
    .await
    .unwrap();
    wait_rows(&work, "ns.Orders_changelog", 59, 60).await;
    wait_rows(&work, "ns.Order Items_changelog", 3, 60).await;
    wait_rows(&work, "ns.Sales__Line_Items_changelog", 2, 60).await;
    for (table, query, pk) in [
        (
            "ns.Orders_changelog",
            "SELECT \"OrderId\", \"CustomerName\", \"Total Amount\" FROM \"Orders\"",
            "OrderId",
        ),
        (
            "ns.Order Items_changelog",
            "SELECT \"Id\", \"Qty Ordered\" FROM \"Order Items\"",
            "Id",
        ),
    ] {
        let v = verify_source(&work, table, &pg, query, &["--pk", pk]);
        assert_eq!(v["unique"], true, "{table}: {v}");
        assert_eq!(v["state_equal"], true, "{table}: {}", v["state_diff"]);
    }
    let (code, out) = pyiceberg(
        &work,
        "print([c.load_table(t).scan().to_arrow().num_rows for t in ['ns.Orders', 'ns.Order Items', 'ns.Sales__Line_Items']])",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "[50, 3, 0]", "mirror rows: {out}");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_and_recreated_table_is_copied_again_and_a_dropped_one_reported() {
    // DROP TABLE sends nothing down the stream, and the table created again under the same
    // name is another relation, outside the publication: its rows were silently not
    // streamed. The slot monitor notices within seconds: a table created again is copied
    // again behind a truncate marker (also when it happened while the agent was stopped: its
    // Iceberg table records the relation's OID); a table only dropped is reported (WARN,
    // errors_total{config}) and keeps its rows; the other table goes on.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE d (id int PRIMARY KEY, v text);
         INSERT INTO d SELECT g, 'old' FROM generate_series(1, 10) g;
         CREATE TABLE g (id int PRIMARY KEY);
         INSERT INTO g VALUES (1), (2);
         CREATE TABLE k (id int PRIMARY KEY);",
        &["d", "g", "k"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    const D: &str = "SELECT id, v FROM d";
    crate::mirror::wait_mirrored_with(&work, "ns.d", &pg, D, "id", &[]).await;
    crate::mirror::wait_mirrored_with(&work, "ns.g", &pg, "SELECT id FROM g", "id", &[]).await;
    db.batch_execute(
        "DROP TABLE d;
         CREATE TABLE d (id int PRIMARY KEY, v text);
         INSERT INTO d SELECT g, 'new' FROM generate_series(5, 7) g;
         DROP TABLE g;
         INSERT INTO k VALUES (1), (2);",
    )
    .await
    .expect("drop and create again");
    wait_log_line(&work.path().join("agent.log"), "the drop reported", |l| {
        l.contains("no longer published") && l.contains("public.g")
    })
    .await;
    let v = crate::mirror::wait_mirrored_with(&work, "ns.d", &pg, D, "id", &[]).await;
    assert_eq!(v["rows"], 3, "{v}");
    db.batch_execute("UPDATE d SET v = 'newer' WHERE id = 6; INSERT INTO d VALUES (8, 'x')")
        .await
        .expect("update");
    crate::mirror::wait_mirrored_with(&work, "ns.d", &pg, D, "id", &[]).await;
    crate::mirror::wait_mirrored_with(&work, "ns.k", &pg, "SELECT id FROM k", "id", &[]).await;
    let log = agent.log_text();
    assert!(
        log.contains("the table was dropped and created again") && log.contains("public.d"),
        "the re-creation is logged"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("no longer published") && l.contains("public.d")),
        "a table created again is not reported as gone"
    );
    let text = scrape(&agent.api_addr().expect("API address")).await;
    assert!(
        sample_sum(&text, "philotes_cdc_errors_total", "error_type=\"config\"") >= 1.0,
        "{text}"
    );
    // The dropped table's Iceberg tables keep what it had.
    let v =
        crate::mirror::verify_mirror(&work, "ns.g", &pg, "SELECT 1 AS id WHERE false", "id", &[]);
    assert_eq!(v["rows"], 2, "{v}");

    // Created again while the agent is stopped, with another column (the dropped table
    // leaves the configuration: a configured table that does not exist stops the start).
    assert_eq!(agent.terminate(), Some(0));
    edit_config(&cfg, "\"d\", \"g\", \"k\"", "\"d\", \"k\"");
    db.batch_execute(
        "DROP TABLE d;
         CREATE TABLE d (id int, v text, w int PRIMARY KEY);
         INSERT INTO d SELECT g % 2, 'third', g FROM generate_series(20, 24) g;",
    )
    .await
    .expect("drop and create again");
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    db.batch_execute("UPDATE d SET v = 'updated' WHERE w = 21; DELETE FROM d WHERE w = 22")
        .await
        .expect("update");
    const D3: &str = "SELECT id, v, w FROM d";
    let v = crate::mirror::wait_mirrored_with(&work, "ns.d", &pg, D3, "w", &[]).await;
    assert_eq!(v["rows"], 4, "{v}");
    // Its key is another column now: `id` (with repeated values) is no longer the mirror's
    // identifier; `w`, added as an optional field, cannot become one.
    assert_eq!(v["identifier_fields"], serde_json::json!([]), "{v}");
    let c = wait_source_equal(
        &work,
        "ns.d_changelog",
        &pg,
        D3,
        &["--pk", "w", "--duckdb"],
        60,
    )
    .await;
    assert_eq!(c["unique"], true, "{c}");
    assert_eq!(
        c["ops"]["T"], 2,
        "a truncate marker per re-creation: {}",
        c["ops"]
    );
    assert!(agent
        .log_text()
        .contains("the table was dropped and created again"));
    assert_eq!(agent.terminate(), Some(0));
}

/// `ATTACH PARTITION` of a table that has rows, and `DETACH PARTITION`, move rows in or out of
/// a partitioned table without publishing them. The slot monitor reports each (WARN naming the
/// partition, `philotes_cdc_schema_changes_total{kind="partition"}`); a partition created empty
/// is not reported. Copying the table again (the API) then brings its Iceberg tables back to
/// the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_attached_with_rows_or_detached_are_reported_and_a_copy_repairs_them() {
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = running(
        "CREATE TABLE pp (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE pp1 PARTITION OF pp FOR VALUES FROM (1) TO (101);
         INSERT INTO pp SELECT g, 'a' FROM generate_series(1, 100) g;",
        &["pp"],
        "mode = \"both\"\nsnapshot = \"initial\"",
    )
    .await;
    const PP: &str = "SELECT id, v FROM pp";
    crate::mirror::wait_mirrored_with(&work, "ns.pp", &pg, PP, "id", &[]).await;
    let log = work.path().join("agent.log");
    // Let the monitor see the partitions first.
    tokio::time::sleep(Duration::from_secs(6)).await;
    execute_each(
        &db,
        &[
            "CREATE TABLE pp2 PARTITION OF pp FOR VALUES FROM (101) TO (201)",
            "INSERT INTO pp SELECT g, 'b' FROM generate_series(101, 110) g",
            "CREATE TABLE pp3 (id int NOT NULL, v text)",
            "INSERT INTO pp3 SELECT g, 'c' FROM generate_series(201, 250) g",
            "ALTER TABLE pp ATTACH PARTITION pp3 FOR VALUES FROM (201) TO (301)",
            "ALTER TABLE pp DETACH PARTITION pp1",
            "UPDATE pp SET v = 'c2' WHERE id = 205",
        ],
    )
    .await;
    wait_log_line(&log, "the attach reported", |l| {
        l.contains("a partition with rows was attached") && l.contains("pp3")
    })
    .await;
    wait_log_line(&log, "the detach reported", |l| {
        l.contains("a partition was detached or dropped") && l.contains("pp1")
    })
    .await;
    let text = agent.log_text();
    assert!(
        !text
            .lines()
            .any(|l| l.contains("attached") && l.contains("pp2")),
        "a partition created empty is not reported"
    );
    let addr = agent.api_addr().expect("API address");
    let metrics = scrape(&addr).await;
    assert_eq!(
        sample_sum(
            &metrics,
            "philotes_cdc_schema_changes_total",
            "kind=\"partition\""
        ),
        2.0,
        "{metrics}"
    );
    // Iceberg: the 100 detached rows still there, 49 of the 50 attached ones missing.
    let v = crate::mirror::verify_mirror(&work, "ns.pp", &pg, PP, "id", &[]);
    assert_eq!(v["equal"], false, "{v}");
    let r = reqwest::Client::new()
        .post(format!(
            "http://{addr}/api/v1/pipelines/p/tables/public.pp/snapshot"
        ))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let v = crate::mirror::wait_mirrored_with(&work, "ns.pp", &pg, PP, "id", &[]).await;
    assert_eq!(v["rows"], 60, "{v}");
    db.batch_execute("DELETE FROM pp WHERE id = 250; INSERT INTO pp VALUES (111, 'later')")
        .await
        .expect("later changes");
    crate::mirror::wait_mirrored_with(&work, "ns.pp", &pg, PP, "id", &[]).await;
    let c = wait_source_equal(&work, "ns.pp_changelog", &pg, PP, &["--duckdb"], 60).await;
    assert_eq!(c["ops"]["T"], 1, "{}", c["ops"]);
    // Recording the partitions (a property-only commit) after a copy is not taken for
    // another writer's commit by the next data commit.
    assert!(
        !agent.log_text().contains("another writer committed first"),
        "no commit conflict"
    );
    assert_eq!(agent.terminate(), Some(0));

    // Moved while the agent is stopped: the next start compares the partitions with those
    // its last attempt recorded, and reports them the same way.
    execute_each(
        &db,
        &[
            "CREATE TABLE pp4 (id int NOT NULL, v text)",
            "INSERT INTO pp4 SELECT g, 'd' FROM generate_series(301, 320) g",
            "ALTER TABLE pp ATTACH PARTITION pp4 FOR VALUES FROM (301) TO (401)",
            "ALTER TABLE pp DETACH PARTITION pp2",
        ],
    )
    .await;
    let log2 = work.path().join("agent2.log");
    let agent = AgentProc::start(&cfg, &log2);
    agent.wait_streaming().await;
    wait_log_line(&log2, "the attach while stopped reported", |l| {
        l.contains("a partition with rows was attached") && l.contains("pp4")
    })
    .await;
    wait_log_line(&log2, "the detach while stopped reported", |l| {
        l.contains("a partition was detached or dropped") && l.contains("pp2")
    })
    .await;
    let metrics = scrape(&agent.api_addr().expect("API address")).await;
    assert_eq!(
        sample_sum(
            &metrics,
            "philotes_cdc_schema_changes_total",
            "kind=\"partition\""
        ),
        2.0,
        "{metrics}"
    );
    let text = agent.log_text();
    assert!(
        !text.contains("pp3"),
        "a partition the last run already saw is not reported again"
    );
    assert_eq!(agent.terminate(), Some(0));
}
