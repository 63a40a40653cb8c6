//! Initial snapshot: consistent with the stream (no gap, no overlap) under concurrent writes,
//! and safe to crash in.

use std::time::Duration;

use crate::common::*;

const ROWS: i64 = 200_000;

/// SIGKILL `agent` as soon as its copy has committed a chunk (`log` is its log file), and
/// check that the kill landed during the copy.
async fn kill_after_a_chunk(agent: AgentProc, log: &std::path::Path) {
    wait_log_line(log, "a chunk commit", |l| {
        l.contains("initial snapshot: chunk committed")
    })
    .await;
    agent.kill9();
    let before_kill = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !before_kill.contains("initial snapshot: committed"),
        "the kill must land during the copy"
    );
}

async fn setup() -> (TestPg, tokio_postgres::Client, Workdir, std::path::PathBuf) {
    prepare(
        &format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, v int NOT NULL, h text);
             INSERT INTO big SELECT g, 0, md5(g::text) FROM generate_series(1, {ROWS}) g;"
        ),
        &["big"],
        "snapshot = \"initial\"",
        "",
    )
    .await
    .parts()
}

/// PostgreSQL with `ddl` and an agent, not waited for, that copies `tables` before it streams.
async fn copying(ddl: &str, tables: &[&str]) -> Running {
    prepare(ddl, tables, "snapshot = \"initial\"", "")
        .await
        .started()
}

/// Inserts, updates and deletes while the snapshot runs (in the background).
fn churn(db: tokio_postgres::Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..60i64 {
            let sql = format!(
                "INSERT INTO big SELECT g, 1, 'new' FROM generate_series({a}, {b}) g;
                 UPDATE big SET v = v + 1 WHERE id % 997 = {m};
                 DELETE FROM big WHERE id % 1009 = {m};",
                a = ROWS + 1 + i * 100,
                b = ROWS + 100 + i * 100,
                m = i,
            );
            db.batch_execute(&sql).await.expect("churn");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn folded_equals_source(pg: &TestPg, work: &Workdir) -> serde_json::Value {
    let v = verify_state(work, "ns.big", pg, "SELECT id, v, h FROM big");
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);
    v
}

async fn settled(pg: &TestPg, work: &Workdir) {
    // Done when Iceberg, folded, holds as many live rows as the source.
    let c = pg.client("app").await;
    let want: i64 = c
        .query_one("SELECT count(*) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        Duration::from_secs(240),
        "snapshot + stream settled",
        || async {
            let v = verify_source(work, "ns.big", pg, "SELECT id FROM big", &[]);
            (v["state_rows"].as_i64() == Some(want) && v["state_equal"] == true).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_writes_matches_the_source() {
    let (pg, db, work, cfg) = setup().await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent.log"));
    let writer = churn(pg.client("app").await);
    writer.await.unwrap();
    drop(db);
    settled(&pg, &work).await;
    let v = folded_equals_source(&pg, &work);
    // The snapshot holds the rows that existed when it was taken (the churn deletes some first).
    let r = v["ops"]["R"].as_i64().unwrap();
    assert!(r > ROWS * 9 / 10 && r <= ROWS + 6000, "R rows: {r}");
    assert_eq!(
        v["snapshot_duplicate_keys"], 0,
        "every row at most once as R"
    );
    let log = agent.log_text();
    assert!(
        log.contains("initial snapshot: committed"),
        "progress is reported"
    );
    assert!(
        log.lines().any(|l| l.contains("pipeline.snapshot{")
            && l.contains("table=public.big")
            && l.contains("initial snapshot: committed")),
        "the copy runs in its own span (its trace id is on the line)"
    );
    let metrics = scrape(&agent.api_addr().unwrap()).await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("philotes_cdc_events_total{operation=\"snapshot\"")
                && l.ends_with(&format!(" {r}"))
        ),
        "philotes_cdc_events_total{{operation=\"snapshot\"}} = {r}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// A SIGKILL after the copy committed a chunk: the restart resumes after that chunk (in a new
/// exported snapshot) instead of copying again. Rows updated between the crash and the
/// restart move to blocks not yet copied; they must not be copied a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_snapshot_resumes_it_without_duplicates() {
    let (pg, db, work, _) = setup().await;
    let cfg = work.config(
        &pg.url("app"),
        &["big"],
        "snapshot = \"initial\"\nbatch_rows = 5000\nsnapshot_chunk_rows = 20000\nsnapshot_readers = 2",
        "",
    );
    let log = work.path().join("agent.log");
    let agent = AgentProc::start(&cfg, &log);
    let writer = churn(pg.client("app").await);
    kill_after_a_chunk(agent, &log).await;
    let partial = iceberg_rows(&work, "ns.big").unwrap_or(0);
    assert!(
        partial >= 20_000 && partial < ROWS as u64,
        "a chunk, not the table, is committed: {partial}"
    );
    // Rows everywhere in the table change while the agent is down; full pages send their new
    // versions to the end of the table, which is not copied yet. (Not rows the churn locks:
    // two updates taking the same rows in another order could deadlock.)
    db.batch_execute(&format!(
        "UPDATE big SET h = h || '+moved' WHERE id % 50 = 0 AND id <= {ROWS} \
         AND id % 997 >= 60 AND id % 1009 >= 60"
    ))
    .await
    .unwrap();
    let agent = AgentProc::start(&cfg, &log);
    writer.await.unwrap();
    settled(&pg, &work).await;
    let v = folded_equals_source(&pg, &work);
    assert_eq!(
        v["snapshot_duplicate_keys"], 0,
        "no row copied twice across the crash"
    );
    let r = v["ops"]["R"].as_i64().unwrap();
    assert!(r > ROWS * 8 / 10 && r <= ROWS + 6000, "R rows: {r}");
    let log_text = agent.log_text();
    assert!(
        log_text.contains("resuming after the last committed chunk"),
        "the copy resumed"
    );
    // Every commit of the copy's chunks is measured like a flush's (they used to record no
    // duration): the histogram counts as many commits as the counter.
    let addr = agent.api_addr().unwrap();
    let commits = metric_value(
        &addr,
        "philotes_iceberg_commits_total",
        "table=\"public.big\"",
    )
    .await;
    let timed = metric_value(
        &addr,
        "philotes_iceberg_commit_duration_seconds_count",
        "table=\"public.big\"",
    )
    .await;
    assert!(commits >= 5.0, "chunk commits counted: {commits}");
    assert_eq!(timed, commits, "every commit has its duration");
    assert_eq!(agent.terminate(), Some(0));
}

/// Every mapped type through the snapshot path (binary for fixed-width types, output-function
/// text for the rest, two readers over block ranges) lands exactly as streaming would write
/// it; values Iceberg cannot hold go to the dead-letter table with their reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_snapshots_like_it_streams() {
    let Prepared {
        pg, db, work, cfg, ..
    } = prepare(
        ALL_TYPES,
        &["all_types"],
        "snapshot = \"initial\"\nsnapshot_readers = 2",
        "",
    )
    .await;
    for chunk in (1..=3000i64).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk.iter().map(|&i| all_types_values(i)).collect();
        db.batch_execute(&format!(
            "INSERT INTO all_types VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("rows");
    }
    // Edges of the binary forms: extreme integers, floats, dates and times around the epochs.
    db.batch_execute(
        "INSERT INTO all_types (id, c_int2, c_int4, c_float4, c_float8, c_bool, c_date, c_ts, c_tstz) VALUES
           (10001, -32768, -2147483648, -0.5, -1e300, false, DATE '0001-01-01',
            TIMESTAMP '0001-01-01 00:00:00', TIMESTAMPTZ '1969-12-31 23:59:59.999999+00'),
           (10002, 32767, 2147483647, 16777216, 1.5e-300, true, DATE '9999-12-31',
            TIMESTAMP '9999-12-31 23:59:59.999999', TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           (10003, 0, 0, 0, 0, true, DATE '1999-12-31', TIMESTAMP '1970-01-01 00:00:00',
            TIMESTAMPTZ '1999-12-31 23:59:59.999999-01');
         INSERT INTO all_types (id, c_tstz) VALUES (20001, 'infinity');
         INSERT INTO all_types (id, c_date) VALUES (20002, '-infinity');",
    )
    .await
    .expect("edge rows");
    db.batch_execute("VACUUM ANALYZE all_types").await.unwrap();
    let blocks: i64 = db
        .query_one(
            "SELECT pg_relation_size('all_types') / current_setting('block_size')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(blocks >= 64, "two readers need >= 64 blocks, have {blocks}");
    let agent = AgentProc::start(&cfg, &work.path().join("agent.log"));
    wait_rows(&work, "ns.all_types", 3003, 120).await;
    wait_rows(&work, "ns._philotes_dlq", 2, 60).await;
    let v = verify_all_types(&work, &pg.conninfo("app"), " WHERE id < 20000");
    assert_eq!(v["ops"]["R"], 3003, "{v}");
    assert_eq!(v["snapshot_duplicate_keys"], 0);
    assert_eq!(v["duckdb_equal"], true, "{}", v["duckdb_diff"]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
    let dlq = verify_dlq(&work);
    let rows = dlq["all_rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{dlq}");
    for r in rows {
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("infinity"), "reason names the value: {r}");
        assert!(
            error.contains("c_tstz") || error.contains("c_date"),
            "reason names the column: {r}"
        );
        assert_eq!(r["_cdc_op"], "R");
    }
    assert_eq!(agent.terminate(), Some(0));
}

/// A maintenance job (here PyIceberg) expires every old snapshot while another writer's
/// snapshot is the current one: the summaries that said "copy done" and "committed up to LSN
/// x" are gone. The table properties still say so; a restart neither copies the table again
/// nor writes a change twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_state_survives_expired_snapshots() {
    let Running {
        pg: _pg,
        db,
        work,
        cfg,
        agent,
    } = copying(
        "CREATE TABLE small (id int PRIMARY KEY, s text);
         INSERT INTO small SELECT g, 'r' || g FROM generate_series(1, 1000) g;",
        &["small"],
    )
    .await;
    let log = agent.log.clone();
    wait_rows(&work, "ns.small", 1000, 120).await;
    db.batch_execute("INSERT INTO small SELECT g, 's' || g FROM generate_series(1001, 1100) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.small", 1100, 60).await;
    assert_eq!(agent.terminate(), Some(0));
    let (rc, out) = pyiceberg(
        &work,
        "append_other('ns.small')\n\
         t = c.load_table('ns.small')\n\
         t.maintenance.expire_snapshots().older_than(datetime.datetime.now(datetime.timezone.utc)).commit()\n\
         t = c.load_table('ns.small')\n\
         print('snapshots', len(t.snapshots()), 'done', t.properties.get('philotes.snapshot'))\n",
    );
    assert_eq!(rc, 0, "PyIceberg append + expire: {out}");
    assert!(out.contains("snapshots 1 done done"), "{out}");
    let agent = AgentProc::start_streaming(&cfg, &log).await;
    db.batch_execute("INSERT INTO small SELECT g, 't' || g FROM generate_series(1101, 1150) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.small", 1151, 60).await;
    // Give a wrongly restarted copy time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = verify(&work, "ns.small", &[]);
    assert_eq!(v["rows"], 1151, "{v}");
    assert_eq!(v["ops"]["R"], 1000, "the copy did not run again: {v}");
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(
        agent
            .log_text()
            .matches("initial snapshot: copying")
            .count(),
        1,
        "one copy, before the restart only (both runs log to one file)"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// Dead letters are deduplicated per source table: table `b`'s copy commits a dead letter at
/// its own (later) snapshot point; a bad value written to `a` while `a` was being copied is
/// streamed afterwards with a lower LSN and must still reach the dead-letter table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_one_table_are_not_dropped_below_another_tables_snapshot() {
    let (_pg, db, work, agent) = copying(
        "CREATE TABLE a (id int PRIMARY KEY, t timestamptz);
         CREATE TABLE b (id int PRIMARY KEY, t timestamptz);
         INSERT INTO a SELECT g, now() FROM generate_series(1, 200000) g;
         INSERT INTO b VALUES (1, now()), (2, 'infinity');",
        &["a", "b"],
    )
    .await
    .parts();
    let log = agent.log.clone();
    // While `a` is copied (after its snapshot point, before `b`'s).
    wait_log_line(&log, "the copy of a", |l| {
        l.contains("initial snapshot: copying") && l.contains("table=public.a")
    })
    .await;
    db.batch_execute("INSERT INTO a VALUES (300001, 'infinity')")
        .await
        .unwrap();
    wait_rows(&work, "ns._philotes_dlq", 2, 120).await;
    let dlq = verify_dlq(&work);
    let tables: Vec<&str> = dlq["all_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source_table"].as_str().unwrap())
        .collect();
    assert!(
        tables.contains(&"public.a") && tables.contains(&"public.b"),
        "{tables:?}"
    );
    wait_rows(&work, "ns.a", 200_000, 60).await;
    // Both dead letters are logged alike: the copied row of b (op R) and the streamed one of a.
    let text = agent.log_text();
    let logged = |table: &str, op: &str| {
        text.lines().any(|l| {
            l.contains("WARN")
                && l.contains("dead letter:")
                && l.contains(&format!("table=\"{table}\""))
                && l.contains(&format!("op=\"{op}\""))
        })
    };
    assert!(
        logged("public.b", "R"),
        "the copy's dead letter is logged: {text}"
    );
    assert!(
        logged("public.a", "I"),
        "the stream's dead letter is logged: {text}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// A partitioned table's copy killed after a chunk resumes partition by partition: each
/// range's recorded progress names its partition, and no row is copied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_tables_copy_resumes_after_a_sigkill_without_duplicates() {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute(
        "CREATE TABLE pk (id bigint, at date NOT NULL, v text, PRIMARY KEY (id, at))
           PARTITION BY RANGE (at);
         CREATE TABLE pk_a PARTITION OF pk FOR VALUES FROM ('2024-01-01') TO ('2024-05-01');
         CREATE TABLE pk_b PARTITION OF pk FOR VALUES FROM ('2024-05-01') TO ('2024-09-01');
         CREATE TABLE pk_c PARTITION OF pk FOR VALUES FROM ('2024-09-01') TO ('2025-01-01');
         INSERT INTO pk SELECT g, date '2024-01-01' + (g % 365), 'v' || g
           FROM generate_series(1, 600000) g;",
    )
    .await
    .unwrap();
    let work = Workdir::new();
    let cfg = work.config(
        &pg.url("app"),
        &["pk"],
        "snapshot = \"initial\"\nsnapshot_chunk_rows = 20000\nsnapshot_readers = 2",
        "",
    );
    let log = work.path().join("agent.log");
    kill_after_a_chunk(AgentProc::start(&cfg, &log), &log).await;
    db.batch_execute(
        "UPDATE pk SET v = 'after' WHERE id <= 10;
         INSERT INTO pk VALUES (600001, '2024-06-06', 'new');",
    )
    .await
    .unwrap();
    let agent = AgentProc::start(&cfg, &log);
    let v = wait_source_equal(&work, "ns.pk", &pg, "SELECT id, at, v FROM pk", &[], 180).await;
    assert_eq!(
        v["snapshot_duplicate_keys"], 0,
        "no row copied twice across the crash"
    );
    assert!(
        agent
            .log_text()
            .contains("resuming after the last committed chunk"),
        "the copy resumed"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_dimensional_array_column_is_kept_as_its_text() {
    // Iceberg has no list of lists: a column declared `int4[][]` is a string holding
    // PostgreSQL's text form, copied and streamed, rather than a dead letter per row.
    let (pg, db, work, agent) = copying(
        "CREATE TABLE grid (id int PRIMARY KEY, m int4[][], v int4[]);
         INSERT INTO grid SELECT g, ARRAY[[g, 2], [3, NULL]], ARRAY[g, NULL]
           FROM generate_series(1, 20) g;",
        &["grid"],
    )
    .await
    .parts();
    wait_rows(&work, "ns.grid", 20, 60).await;
    db.batch_execute(
        "INSERT INTO grid SELECT g, ARRAY[[g], [-g]], ARRAY[g] FROM generate_series(21, 40) g;
         UPDATE grid SET m = '{{7,8,9},{1,2,3}}' WHERE id % 4 = 0;
         UPDATE grid SET m = NULL WHERE id = 1;",
    )
    .await
    .unwrap();
    // 20 copied, 20 inserted, 10 + 1 updated: none of them a dead letter.
    wait_rows(&work, "ns.grid", 51, 60).await;
    verify_state(
        &work,
        "ns.grid",
        &pg,
        "SELECT id, m::text AS m, v FROM grid",
    );
    let (code, out) = pyiceberg(
        &work,
        "s = c.load_table('ns.grid').schema()\n\
         print(s.find_field('m').field_type, s.find_field('v').field_type)",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "string list<int>", "{out}");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_columns_named_like_cdc_columns_are_kept_under_a_prefix() {
    // A table fed by another CDC tool may have a `_cdc_op` of its own: an Iceberg schema
    // cannot hold two, so the source's is `source__cdc_op`, copied, streamed, in the mirror
    // too, and a `_cdc_ts` added while streaming does not stop the stream.
    let (pg, db, work, agent) = prepare(
        "CREATE TABLE feed (id int PRIMARY KEY, _cdc_op text, _cdc_lsn bigint);
         INSERT INTO feed SELECT g, 'I', g * 10 FROM generate_series(1, 20) g;",
        &["feed"],
        "snapshot = \"initial\"\nmode = \"both\"",
        "",
    )
    .await
    .started()
    .parts();
    wait_rows(&work, "ns.feed_changelog", 20, 60).await;
    db.batch_execute(
        "INSERT INTO feed SELECT g, 'U', g * 10 FROM generate_series(21, 30) g;
         ALTER TABLE feed ADD COLUMN _cdc_ts text;
         UPDATE feed SET _cdc_ts = 'later', _cdc_op = 'D' WHERE id % 5 = 0;
         DELETE FROM feed WHERE id = 3;",
    )
    .await
    .unwrap();
    // 20 copied, 10 inserted, 6 updated, 1 deleted.
    wait_rows(&work, "ns.feed_changelog", 37, 60).await;
    let q = "SELECT id, _cdc_op AS source__cdc_op, _cdc_lsn AS source__cdc_lsn, \
             _cdc_ts AS source__cdc_ts FROM feed";
    verify_state(&work, "ns.feed_changelog", &pg, q);
    let (code, out) = pyiceberg(
        &work,
        "m = c.load_table('ns.feed').scan().to_arrow().sort_by('id')\n\
         r = [x for x in m.to_pylist() if x['id'] == 5][0]\n\
         print(m.num_rows, r['source__cdc_op'], r['source__cdc_ts'])\n\
         print([f.name for f in c.load_table('ns.feed_changelog').schema().fields])",
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    // Mirror: 29 rows; id 5 was updated.
    assert_eq!(lines[0], "29 D later", "{out}");
    assert_eq!(
        lines[1],
        "['id', 'source__cdc_op', 'source__cdc_lsn', '_cdc_op', '_cdc_lsn', '_cdc_seq', '_cdc_ts', '_cdc_unchanged', 'source__cdc_ts']",
        "{out}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_takes_only_the_publications_columns_and_rows() {
    // A publication with a column list and a row filter (PostgreSQL 15+): the copy, like the
    // stream, leaves out the unpublished column (it never reaches Iceberg) and the rows the
    // filter rejects.
    let (pg, db, work, agent) = copying(
        "CREATE TABLE pf (id int PRIMARY KEY, email text, n int);
         INSERT INTO pf SELECT g, 'secret' || g, g FROM generate_series(1, 100) g;
         CREATE PUBLICATION philotes_p FOR TABLE pf (id, n) WHERE (id > 50);",
        &["pf"],
    )
    .await
    .parts();
    wait_rows(&work, "ns.pf", 50, 60).await;
    db.batch_execute(
        "INSERT INTO pf VALUES (-5, 'secret', 5), (500, 'secret', 500);
         UPDATE pf SET n = -n WHERE id IN (10, 60);
         UPDATE pf SET id = -70 WHERE id = 70;
         DELETE FROM pf WHERE id = 80;",
    )
    .await
    .unwrap();
    // 50 copied, 1 insert, 1 update, 2 deletes (70 left the filter, 80).
    wait_rows(&work, "ns.pf", 54, 60).await;
    verify_state(&work, "ns.pf", &pg, "SELECT id, n FROM pf WHERE id > 50");
    let (code, out) = pyiceberg(
        &work,
        "t = c.load_table('ns.pf')\n\
         print([f.name for f in t.schema().fields if not f.name.startswith('_cdc')])\n\
         print(min(t.scan().to_arrow().column('id').to_pylist()))",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["['id', 'n']", "51"],
        "{out}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

/// A partition truncated by itself is not published through its root (PostgreSQL sends
/// nothing), so the Iceberg tables keep its rows. Asking for a copy (`POST …/tables/{table}/
/// snapshot`, bearer token) ends the streaming attempt, writes a truncate marker and copies
/// the table again under concurrent writes; a SIGKILL after a chunk resumes that copy (it is
/// recorded in the table, not only in memory). The mirror (PyIceberg and DuckDB) and the
/// folded changelog then equal the source, and the changelog keeps the rows from before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_copied_again_on_request_resumes_after_a_kill_and_keeps_its_history() {
    const TOKEN: &str = "copy-Again-t0ken";
    let mut p = prepare(
        &format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, v int NOT NULL, h text) PARTITION BY RANGE (id);
             CREATE TABLE big_a PARTITION OF big FOR VALUES FROM (MINVALUE) TO (20001);
             CREATE TABLE big_b PARTITION OF big FOR VALUES FROM (20001) TO (MAXVALUE);
             INSERT INTO big SELECT g, 0, md5(g::text) FROM generate_series(1, {ROWS}) g;"
        ),
        &["big"],
        "mode = \"both\"\nsnapshot = \"initial\"\nsnapshot_chunk_rows = 20000",
        "",
    )
    .await;
    let port = philotes::demo::postgres::free_port().expect("free port");
    let addr = p.listen_on(port, &format!("token = \"{TOKEN}\""));
    let log = p.log();
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = p.streaming().await;
    const STATE: &str = "SELECT id, v, h FROM big";
    crate::mirror::wait_mirrored_with(&work, "ns.big", &pg, STATE, "id", &[]).await;
    db.batch_execute("TRUNCATE big_a").await.expect("truncate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = crate::mirror::verify_mirror(&work, "ns.big", &pg, STATE, "id", &[]);
    assert_eq!(
        (v["equal"].as_bool(), v["rows"].as_i64()),
        (Some(false), Some(ROWS)),
        "the partition's TRUNCATE is not streamed: {v}"
    );

    let http = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/pipelines/p/tables/public.big/snapshot");
    let r = http.post(&url).send().await.expect("post");
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let chunks = |text: &str| text.matches("initial snapshot: chunk committed").count();
    let before = chunks(&std::fs::read_to_string(&log).unwrap_or_default());
    let writer = churn(pg.client("app").await);
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["table"], "public.big", "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while chunks(&std::fs::read_to_string(&log).unwrap_or_default()) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no chunk of the new copy"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    agent.kill9();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("copying the table again, as requested"),
        "the request is logged"
    );
    assert_eq!(
        text.matches("initial snapshot: committed").count(),
        1,
        "the kill lands during the second copy"
    );
    // The copy replaces the mirror's rows where they are: stopped in its middle, the mirror
    // still holds every row it had (the truncated partition's too) beside the copied ones,
    // each key once, for both readers; an emptied mirror would hold only the copied chunks.
    let mid = crate::mirror::verify_mirror(&work, "ns.big", &pg, STATE, "id", &[]);
    assert_eq!(mid["duplicate_keys"], 0, "{mid}");
    for n in ["rows", "duckdb_rows"] {
        let rows = mid[n].as_i64().unwrap_or(0);
        assert!(
            rows >= ROWS - ROWS / 10,
            "{n}: the mirror is not emptied by a copy taken again: {rows} rows"
        );
    }
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    writer.await.unwrap();
    drop(db);
    let m = crate::mirror::wait_mirrored_with(&work, "ns.big", &pg, STATE, "id", &[]).await;
    assert_eq!(m["duplicate_keys"], 0, "{m}");
    let v = wait_source_equal(&work, "ns.big_changelog", &pg, STATE, &["--duckdb"], 120).await;
    assert_eq!(v["unique"], true, "{}", v["duplicates"]);
    assert_eq!(v["ops"]["T"], 1, "one truncate marker: {}", v["ops"]);
    let r = v["ops"]["R"].as_i64().unwrap();
    assert!(
        r > ROWS + ROWS * 7 / 10,
        "the first copy's rows stay in the history, the second copy's are there: R = {r}"
    );
    assert!(
        agent
            .log_text()
            .contains("resuming after the last committed chunk"),
        "the copy asked for resumed after the kill"
    );
    assert_eq!(agent.terminate(), Some(0));
}
