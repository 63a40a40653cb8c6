//! Schema changes never stop the stream: RENAME COLUMN, type widenings Iceberg promotes, type
//! changes it cannot promote (the old column kept beside a new one), a renamed and moved table,
//! domains and arrays of enums. Each change is made mid-stream between writes; PyIceberg and
//! DuckDB must read every row as the source had it, before and after the change, in the
//! changelog and in the mirror, through a SIGKILL.

use serde_json::Value;

use crate::common::*;

/// Both readers agree, and the changelog folded equals `query` on the source.
async fn wait_changelog(work: &Workdir, table: &str, pg: &TestPg, query: &str) -> Value {
    wait_source_equal(work, table, pg, query, &["--duckdb", "--rows"], 60).await
}

/// The mirror `table` equals `query` for PyIceberg and DuckDB.
async fn wait_mirror(work: &Workdir, table: &str, pg: &TestPg, query: &str) -> Value {
    crate::mirror::wait_mirrored_with(work, table, pg, query, "id", &[]).await
}

/// The Iceberg type of each column of `table`, as PyIceberg prints it.
fn column_types(work: &Workdir, table: &str) -> Value {
    let (rc, out) = pyiceberg(
        work,
        &format!(
            "import json\nt = c.load_table('{table}')\n\
             print(json.dumps({{f.name: str(f.field_type) for f in t.schema().fields}}))\n"
        ),
    );
    assert_eq!(rc, 0, "{out}");
    serde_json::from_str(out.lines().last().unwrap_or("{}")).expect("types JSON")
}

/// No attempt failed: the pipeline never left `streaming`.
async fn never_left_streaming(agent: &AgentProc) {
    let v = agent.wait_state("p", "streaming", 30).await;
    let log = agent.log_text();
    assert!(!log.contains("pipeline failed"), "{log}");
    assert!(!log.contains("retrying in"), "{log}");
    let text = scrape(&agent.api_addr().expect("API address")).await;
    assert_eq!(
        sample_sum(&text, "philotes_cdc_retries_total", "source=\"p\""),
        0.0,
        "{v}"
    );
}

/// A table `(id int PRIMARY KEY, c int, v text)` of 10 rows, copied into a changelog and a
/// mirror and streaming; `extra` adds pipeline settings.
async fn streaming_c_and_v(table: &str, extra: &str) -> Running {
    let r = prepare(
        &format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, c int, v text);
             INSERT INTO {table} SELECT g, g * 10, 'a' FROM generate_series(1, 10) g;"
        ),
        &[table],
        &format!("mode = \"both\"\nsnapshot = \"initial\"\n{extra}"),
        "",
    )
    .await
    .streaming()
    .await;
    let q = format!("SELECT id, c, v FROM {table}");
    wait_mirror(&r.work, &format!("ns.{table}"), &r.pg, &q).await;
    r
}

/// The agent started again with rows held back (a 1 h flush: only schema updates commit).
async fn holding_rows(agent: AgentProc, cfg: &std::path::Path, log: &std::path::Path) -> AgentProc {
    agent.terminate();
    edit_config(cfg, "flush_interval = \"300ms\"", "flush_interval = \"1h\"");
    AgentProc::start_streaming(cfg, log).await
}

/// SIGKILL `agent` (its rows uncommitted) and start it again, flushing as usual.
async fn killed_and_restarted(
    agent: AgentProc,
    cfg: &std::path::Path,
    log: &std::path::Path,
) -> AgentProc {
    agent.kill9();
    edit_config(cfg, "flush_interval = \"1h\"", "flush_interval = \"300ms\"");
    let agent = AgentProc::start(cfg, log);
    agent.wait_streaming().await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_changes_are_followed_without_a_stop() {
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE sc (id int PRIMARY KEY, a text, n int, amt numeric(10,2), v varchar(10),
                          k int, f real);
         INSERT INTO sc SELECT g, 'a' || g, g, g * 1.25, 'v' || g, g, g * 0.5
           FROM generate_series(1, 5) g;",
        &["sc"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    // Each statement is its own transaction: the change, then rows of the new shape.
    execute_each(
        &db,
        &[
            "INSERT INTO sc SELECT g, 'a' || g, g, g * 1.25, 'v' || g, g, g * 0.5 FROM generate_series(6, 10) g",
            "ALTER TABLE sc RENAME COLUMN a TO b",
            "INSERT INTO sc SELECT g, 'b' || g, g, g * 1.25, 'v' || g, g, g * 0.5 FROM generate_series(11, 15) g",
            "UPDATE sc SET b = b || '!' WHERE id IN (1, 12)",
            "ALTER TABLE sc ALTER COLUMN n TYPE bigint",
            "INSERT INTO sc SELECT g, 'b' || g, 5000000000 + g, g, 'v', g, g FROM generate_series(16, 20) g",
            "ALTER TABLE sc ALTER COLUMN amt TYPE numeric(14,2)",
            "INSERT INTO sc VALUES (21, 'b', 21, 123456789012.34, 'v', 21, 21)",
        ],
    )
    .await;
    const BEFORE: &str = "SELECT id, b, n, amt, v, k, f FROM sc";
    wait_changelog(&work, "ns.sc_changelog", &pg, BEFORE).await;
    never_left_streaming(&agent).await;
    // SIGKILL, then more changes while the agent is down and after it is back.
    agent.kill9();
    execute_each(
        &db,
        &[
            "ALTER TABLE sc ALTER COLUMN v TYPE text",
            "INSERT INTO sc VALUES (22, 'b', 22, 22, repeat('long ', 10), 22, 22)",
        ],
    )
    .await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    execute_each(
        &db,
        &[
            "ALTER TABLE sc ALTER COLUMN k TYPE text USING 'k' || k",
            "INSERT INTO sc SELECT g, 'b' || g, g, g, 'v', 'kk' || g, g * 0.25 FROM generate_series(23, 27) g",
            "ALTER TABLE sc ALTER COLUMN f TYPE double precision",
            "INSERT INTO sc VALUES (28, 'b', 28, 28, 'v', 'kk28', 0.1)",
            "UPDATE sc SET v = v || '+' WHERE id IN (2, 22)",
        ],
    )
    .await;
    // Every column but the replaced one equals the source in the changelog and the mirror.
    const AFTER: &str = "SELECT id, b, n, amt, v, f FROM sc";
    let v = wait_changelog(&work, "ns.sc_changelog", &pg, AFTER).await;
    let m = wait_mirror(&work, "ns.sc", &pg, AFTER).await;
    assert!(
        m["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_str().unwrap_or("").starts_with("k__before_")),
        "{m}"
    );
    never_left_streaming(&agent).await;

    // k became text: rows written before keep their int in `k__before_<lsn>`, rows after
    // have the text in `k`.
    let types = column_types(&work, "ns.sc_changelog");
    let before = types
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.starts_with("k__before_"))
        .unwrap_or_else(|| panic!("no k__before_ column: {types}"))
        .clone();
    assert_eq!(types[&before], "int", "{types}");
    assert_eq!(types["k"], "string", "{types}");
    assert_eq!(types["n"], "long", "{types}");
    assert_eq!(types["amt"], "decimal(14, 2)", "{types}");
    assert_eq!(types["f"], "double", "{types}");
    assert!(types.get("a").is_none(), "renamed, not added: {types}");
    let rows = v["all_rows"].as_array().unwrap();
    let last = |id: i64| rows.iter().rev().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(last(3)[&before], 3, "{}", last(3));
    assert_eq!(last(3)["k"], Value::Null);
    assert_eq!(last(25)["k"], "kk25", "{}", last(25));
    assert_eq!(last(25)[&before], Value::Null);
    // The first row's value, written under `a`, reads under `b`.
    assert_eq!(last(5)["b"], "a5");

    let log = std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default()
        + &agent.log_text();
    for kind in ["rename", "widen", "replace"] {
        assert!(
            log.contains(&format!("kind=\"{kind}\"")) || log.contains(&format!("kind={kind}")),
            "no {kind} logged:\n{log}"
        );
    }
    assert!(schema_changes(&agent, "replace").await >= 1.0);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_and_moved_table_keeps_streaming_into_its_iceberg_table() {
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE rt (id int PRIMARY KEY, s text)",
        &["rt"],
        "",
        "",
    )
    .await
    .streaming()
    .await;
    execute_each(
        &db,
        &[
            "INSERT INTO rt SELECT g, 'one' FROM generate_series(1, 5) g",
            "ALTER TABLE rt RENAME TO rt2",
            "INSERT INTO rt2 SELECT g, 'two' FROM generate_series(6, 10) g",
            "CREATE SCHEMA other",
            "ALTER TABLE rt2 SET SCHEMA other",
            "INSERT INTO other.rt2 SELECT g, 'three' FROM generate_series(11, 15) g",
            "UPDATE other.rt2 SET s = 'changed' WHERE id = 1",
        ],
    )
    .await;
    wait_rows_at_least(&work, "ns.rt", 16, 60).await;
    wait_changelog(&work, "ns.rt", &pg, "SELECT id, s FROM other.rt2").await;
    never_left_streaming(&agent).await;
    assert_eq!(schema_changes(&agent, "rename_table").await, 2.0);
    // A restart finds the table under its new name (recorded in the Iceberg table).
    agent.kill9();
    db.batch_execute("INSERT INTO other.rt2 SELECT g, 'four' FROM generate_series(16, 20) g")
        .await
        .expect("insert while down");
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    db.batch_execute("INSERT INTO other.rt2 VALUES (21, 'five')")
        .await
        .expect("insert after restart");
    let v = wait_changelog(&work, "ns.rt", &pg, "SELECT id, s FROM other.rt2").await;
    assert_eq!(v["pg_rows"], 21, "{v}");
    assert_eq!(iceberg_rows(&work, "ns.rt2"), None, "no second table");
    drop(agent);
}

/// Renamed right after the agent started, before any change of it was streamed (its first
/// Relation message then carries the new name): still the same table, also with the
/// publication not followed, where it used to be dropped as an unconfigured one (its changes
/// acknowledged and lost), and with it followed, where it used to become a new table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_renamed_before_its_first_change_is_streamed_is_still_followed() {
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE rf (id int PRIMARY KEY, s text);
         INSERT INTO rf VALUES (1, 'one'), (2, 'two');",
        &["rf"],
        "mode = \"both\"\nsnapshot = \"initial\"\nfollow_publication = false",
        "",
    )
    .await
    .streaming()
    .await;
    execute_each(
        &db,
        &[
            "ALTER TABLE rf RENAME TO rf_new",
            "INSERT INTO rf_new VALUES (3, 'after')",
            "UPDATE rf_new SET s = 'changed' WHERE id = 1",
            "DELETE FROM rf_new WHERE id = 2",
        ],
    )
    .await;
    const Q: &str = "SELECT id, s FROM rf_new";
    wait_changelog(&work, "ns.rf_changelog", &pg, Q).await;
    wait_mirror(&work, "ns.rf", &pg, Q).await;
    never_left_streaming(&agent).await;
    assert_eq!(schema_changes(&agent, "rename_table").await, 1.0);
    assert_eq!(iceberg_rows(&work, "ns.rf_new"), None, "no second table");
    // The rename is recorded: a restart finds the table under its new name.
    drop(agent);
    db.batch_execute("INSERT INTO rf_new VALUES (4, 'while down')")
        .await
        .expect("insert while down");
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    wait_mirror(&work, "ns.rf", &pg, Q).await;
    let v = wait_changelog(&work, "ns.rf_changelog", &pg, Q).await;
    assert_eq!(v["pg_rows"], 3, "{v}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_and_arrays_of_enums_take_their_base_type() {
    let Running {
        pg,
        db,
        work,
        agent,
        ..
    } = prepare(
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE DOMAIN price AS numeric(12,2);
         CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE dm (id int PRIMARY KEY, p posint, m price, one mood, moods mood[],
                          ps posint[]);
         INSERT INTO dm VALUES (1, 5, 10.50, 'ok', '{sad,happy}', '{1,2}');",
        &["dm"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    db.batch_execute(
        "INSERT INTO dm VALUES (2, 7, 99.99, 'happy', '{ok}', '{3}'), (3, NULL, NULL, NULL, NULL, NULL);
         UPDATE dm SET moods = '{happy,happy,sad}', p = 8 WHERE id = 1;",
    )
    .await
    .expect("changes");
    const Q: &str = "SELECT id, p, m, one::text, moods::text[], ps::int[] FROM dm";
    wait_changelog(&work, "ns.dm_changelog", &pg, Q).await;
    wait_mirror(&work, "ns.dm", &pg, Q).await;
    for table in ["ns.dm", "ns.dm_changelog"] {
        let t = column_types(&work, table);
        assert_eq!(t["p"], "int", "{table}: {t}");
        assert_eq!(t["m"], "decimal(12, 2)", "{table}: {t}");
        assert_eq!(t["one"], "string", "{table}: {t}");
        assert!(
            t["moods"].as_str().unwrap_or("").contains("string"),
            "{table}: {t}"
        );
        assert!(
            t["moods"].as_str().unwrap_or("").starts_with("list"),
            "{table}: {t}"
        );
        assert!(
            t["ps"].as_str().unwrap_or("").contains("int"),
            "{table}: {t}"
        );
        assert!(
            t["ps"].as_str().unwrap_or("").starts_with("list"),
            "{table}: {t}"
        );
    }
    never_left_streaming(&agent).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_schema_update_and_the_first_row_loses_nothing() {
    let p = prepare(
        "CREATE TABLE kt (id int PRIMARY KEY, a text, n int)",
        &["kt"],
        "mode = \"both\"",
        "",
    )
    .await;
    let log = p.log();
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = p.streaming().await;
    db.batch_execute("INSERT INTO kt SELECT g, 'a', g FROM generate_series(1, 10) g")
        .await
        .expect("insert");
    wait_rows(&work, "ns.kt_changelog", 10, 60).await;
    // The rename and a type change, then rows of the new shape in the same transaction: the
    // schema update commits at once, the rows wait for the flush. SIGKILL in between.
    db.batch_execute(
        "BEGIN;
         ALTER TABLE kt RENAME COLUMN a TO b;
         ALTER TABLE kt ALTER COLUMN n TYPE bigint;
         INSERT INTO kt SELECT g, 'b', 5000000000 + g FROM generate_series(11, 20) g;
         UPDATE kt SET b = 'changed' WHERE id = 1;
         COMMIT;",
    )
    .await
    .expect("change");
    wait_log_line(&log, "the schema update", |l| {
        l.contains("schema change followed") && l.contains("widen")
    })
    .await;
    agent.kill9();
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    const Q: &str = "SELECT id, b, n FROM kt";
    let v = wait_changelog(&work, "ns.kt_changelog", &pg, Q).await;
    assert_eq!(v["unique"], true, "{v}");
    wait_mirror(&work, "ns.kt", &pg, Q).await;
    let types = column_types(&work, "ns.kt_changelog");
    assert!(types.get("a").is_none(), "{types}");
    assert_eq!(types["n"], "long", "{types}");
    never_left_streaming(&agent).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_gives_old_rows_unsent_values_is_called_out() {
    // A column added with a default, or a type change that rewrites the rows, gives the rows
    // already written values no change carries: the operator is told, once per such change;
    // a plain ADD COLUMN (old rows are null in PostgreSQL too) says nothing.
    let (_pg, db, work, agent) =
        running("CREATE TABLE od (id int PRIMARY KEY, a int);", &["od"], "")
            .await
            .parts();
    let stale = |agent: &AgentProc| {
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("values no change carries") && l.contains("public.od"))
            .count()
    };
    execute_each(
        &db,
        &[
            "INSERT INTO od VALUES (1, 1)",
            "ALTER TABLE od ADD COLUMN plain int",
            "INSERT INTO od VALUES (2, 2, 2)",
        ],
    )
    .await;
    wait_rows(&work, "ns.od", 2, 60).await;
    assert_eq!(stale(&agent), 0, "{}", agent.log_text());
    execute_each(
        &db,
        &[
            "ALTER TABLE od ADD COLUMN status text NOT NULL DEFAULT 'new'",
            "INSERT INTO od VALUES (3, 3, 3, 'x')",
        ],
    )
    .await;
    wait_rows(&work, "ns.od", 3, 60).await;
    assert_eq!(stale(&agent), 1, "{}", agent.log_text());
    execute_each(
        &db,
        &[
            "ALTER TABLE od ALTER COLUMN a TYPE text USING 'a' || a",
            "INSERT INTO od VALUES (4, 'a4', 4, 'y')",
        ],
    )
    .await;
    wait_rows(&work, "ns.od", 4, 60).await;
    assert_eq!(stale(&agent), 2, "{}", agent.log_text());
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_in_the_transaction_of_another_change_keeps_the_field() {
    // The catalog is read when a Relation message arrives, after the whole transaction: a
    // column renamed later in the same transaction is not in it under the relation's name.
    // Its field must keep its source column number, or the rename reads as a drop and an add
    // (values split over two columns; a renamed mirror key then stopped the stream).
    let Running {
        pg,
        db,
        work,
        agent,
        ..
    } = prepare(
        "CREATE TABLE rt (id int PRIMARY KEY, a text);
         INSERT INTO rt VALUES (1, 'one');",
        &["rt"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    db.batch_execute(
        "BEGIN;
         ALTER TABLE rt ADD COLUMN x int;
         INSERT INTO rt VALUES (2, 'two', 2);
         ALTER TABLE rt RENAME COLUMN a TO b;
         INSERT INTO rt VALUES (3, 'three', 3);
         COMMIT;",
    )
    .await
    .expect("one transaction");
    const Q: &str = "SELECT id, b, x FROM rt";
    wait_changelog(&work, "ns.rt_changelog", &pg, Q).await;
    wait_mirror(&work, "ns.rt", &pg, Q).await;
    for t in ["ns.rt_changelog", "ns.rt"] {
        let types = column_types(&work, t);
        assert!(
            types.get("a").is_none(),
            "{t}: renamed, not dropped and added: {types}"
        );
        assert_eq!(types["b"], "string", "{t}: {types}");
    }
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_and_added_again_is_a_new_column() {
    // A migration that drops a column and adds one of the same name (a common way to change a
    // column): in PostgreSQL every row's new column is null (or its default); in Iceberg the
    // old field kept its values under the old name, silently stale. The new column is now a
    // new field (the old one kept as `c__before_<lsn>`), without a WARN when it has no default.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = running(
        "CREATE TABLE da (id int PRIMARY KEY, c int, v text);
         INSERT INTO da SELECT g, g * 10, 'a' FROM generate_series(1, 20) g;",
        &["da"],
        "mode = \"both\"\nsnapshot = \"initial\"",
    )
    .await;
    const DA: &str = "SELECT id, c, v FROM da";
    wait_mirror(&work, "ns.da", &pg, DA).await;
    execute_each(
        &db,
        &[
            "UPDATE da SET v = 'b' WHERE id = 1",
            "ALTER TABLE da DROP COLUMN c",
            "ALTER TABLE da ADD COLUMN c int",
            "INSERT INTO da VALUES (21, 'n', 5)",
            "UPDATE da SET v = 'c' WHERE id = 2",
        ],
    )
    .await;
    let v = wait_mirror(&work, "ns.da", &pg, DA).await;
    assert_eq!(v["rows"], 21, "{v}");
    wait_changelog(&work, "ns.da_changelog", &pg, DA).await;
    let stale = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("values no change carries"))
        .count();
    assert_eq!(
        stale, 0,
        "a column added again without a default is null on both sides"
    );
    // Again while the agent is down, the column now last (the Relation message after the
    // change looks like the one before), with a change before it still to be streamed: the
    // restarted agent replays that change into the old field, then follows the drop and add.
    agent.kill9();
    execute_each(
        &db,
        &[
            "UPDATE da SET c = 99, v = 'd' WHERE id = 3",
            "ALTER TABLE da DROP COLUMN c",
            "ALTER TABLE da ADD COLUMN c int",
            "UPDATE da SET v = 'e' WHERE id = 4",
        ],
    )
    .await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    let v = wait_mirror(&work, "ns.da", &pg, DA).await;
    assert_eq!(v["rows"], 21, "{v}");
    wait_changelog(&work, "ns.da_changelog", &pg, DA).await;
    // With a default, PostgreSQL fills it in without publishing: called out like an ADD.
    execute_each(
        &db,
        &[
            "ALTER TABLE da DROP COLUMN c",
            "ALTER TABLE da ADD COLUMN c int DEFAULT 7",
            "INSERT INTO da VALUES (22, 'm', 8)",
        ],
    )
    .await;
    wait_rows(&work, "ns.da_changelog", 26, 60).await;
    wait_log_line(&agent.log, "the default called out", |l| {
        l.contains("values no change carries")
    })
    .await;
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_follow_their_numbers_when_names_move() {
    // Names that move between columns: renamed and a new column under the old name (the
    // usual way to change a column's type by hand), two names swapped, a column renamed onto
    // a dropped one's name. Each column's values must stay with it (its `attnum`), not with
    // its name; the mirror showed the old column's values under the new one's name, and the
    // other column empty. Then the same while the agent is stopped, with changes from before
    // the rename still to stream: they were written to a new column under the old name.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = running(
        "CREATE TABLE na (id int PRIMARY KEY, price int, v text);
         CREATE TABLE nb (id int PRIMARY KEY, a int, b int);
         CREATE TABLE nc (id int PRIMARY KEY, c int, d int, v text);
         CREATE TABLE nd (id int PRIMARY KEY, price int, v text);
         CREATE TABLE ne (id int PRIMARY KEY, a int, b int);
         CREATE TABLE nf (id int PRIMARY KEY, price int, v text);
         CREATE TABLE ng (id int PRIMARY KEY, x int, a int, b int);
         CREATE TABLE nh (a int, b text, c int, v text, PRIMARY KEY (c, a, b));
         ALTER TABLE ng DROP COLUMN x;
         INSERT INTO na SELECT g, g * 10, 'a' FROM generate_series(1, 10) g;
         INSERT INTO nb SELECT g, g, -g FROM generate_series(1, 10) g;
         INSERT INTO nc SELECT g, g, 100 + g, 'a' FROM generate_series(1, 10) g;
         INSERT INTO nd SELECT g, g * 10, 'a' FROM generate_series(1, 10) g;
         INSERT INTO ne SELECT g, g, -g FROM generate_series(1, 10) g;
         INSERT INTO nf SELECT g, g * 10, 'a' FROM generate_series(1, 10) g;
         INSERT INTO ng SELECT g, g, -g FROM generate_series(1, 10) g;
         INSERT INTO nh SELECT g, 'b' || g, -g, 'v' FROM generate_series(1, 10) g;",
        &["na", "nb", "nc", "nd", "ne", "nf", "ng", "nh"],
        "mode = \"both\"\nsnapshot = \"initial\"",
    )
    .await;
    const NA: &str = "SELECT id, price_old, price, v FROM na";
    const NB: &str = "SELECT id, a, b FROM nb";
    const NC: &str = "SELECT id, c, v FROM nc";
    wait_mirror(&work, "ns.nf", &pg, "SELECT id, price, v FROM nf").await;
    execute_each(
        &db,
        &[
            "UPDATE na SET v = 'b' WHERE id = 1",
            "ALTER TABLE na RENAME COLUMN price TO price_old",
            "ALTER TABLE na ADD COLUMN price numeric(10,2)",
            "INSERT INTO na VALUES (11, 110, 'n', 5.5)",
            "UPDATE na SET v = 'c' WHERE id = 2",
            "UPDATE nb SET a = a WHERE id = 1",
            "ALTER TABLE nb RENAME COLUMN a TO tmp",
            "ALTER TABLE nb RENAME COLUMN b TO a",
            "ALTER TABLE nb RENAME COLUMN tmp TO b",
            "INSERT INTO nb VALUES (11, 111, -111)",
            "UPDATE nb SET a = a WHERE id = 3",
            "UPDATE nc SET v = 'b' WHERE id = 1",
            "ALTER TABLE nc DROP COLUMN c",
            "ALTER TABLE nc RENAME COLUMN d TO c",
            "INSERT INTO nc VALUES (11, 111, 'n')",
            "UPDATE nc SET v = 'c' WHERE id = 2",
            "ALTER TABLE nh RENAME COLUMN v TO w",
            "UPDATE nh SET w = 'x' WHERE a = 1",
        ],
    )
    .await;
    const NH: &str = "SELECT a, b, c, w FROM nh";
    crate::mirror::wait_mirrored_with(&work, "ns.nh", &pg, NH, "a,b,c", &[]).await;
    for (t, q) in [("na", NA), ("nb", NB), ("nc", NC)] {
        wait_mirror(&work, &format!("ns.{t}"), &pg, q).await;
        wait_changelog(&work, &format!("ns.{t}_changelog"), &pg, q).await;
    }
    never_left_streaming(&agent).await;
    // A composite key whose identifier fields come out of a hash set in another order is the
    // same key: no mirror keyed again at a schema change.
    assert_eq!(schema_changes(&agent, "key").await, 0.0);
    // The old values stay in the renamed column's field; the dropped column's field keeps
    // its values under a name of its own.
    let types = column_types(&work, "ns.na");
    assert_eq!(types["price_old"], "int", "{types}");
    assert_eq!(types["price"], "decimal(10, 2)", "{types}");
    let types = column_types(&work, "ns.nc");
    assert!(
        types
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("c__before_")),
        "{types}"
    );

    agent.kill9();
    execute_each(
        &db,
        &[
            "UPDATE nd SET price = price + 1, v = 'pre' WHERE id <= 3",
            "ALTER TABLE nd RENAME COLUMN price TO cost",
            "UPDATE nd SET v = 'post' WHERE id = 9",
            "UPDATE ne SET a = a + 1000 WHERE id <= 2",
            "ALTER TABLE ne RENAME COLUMN a TO tmp",
            "ALTER TABLE ne RENAME COLUMN b TO a",
            "ALTER TABLE ne RENAME COLUMN tmp TO b",
            "UPDATE ne SET a = a WHERE id = 9",
            "UPDATE nf SET price = price + 1 WHERE id <= 2",
            "ALTER TABLE nf RENAME COLUMN price TO price_old",
            "ALTER TABLE nf ADD COLUMN price int",
            "UPDATE nf SET price = 7 WHERE id = 9",
            // Created again with other column numbers (b is 2 now, 4 before): copied
            // again, its fields must be recorded with the new numbers.
            "DROP TABLE ng",
            "CREATE TABLE ng (id int PRIMARY KEY, b int, a int)",
            "INSERT INTO ng SELECT g, -2 * g, 2 * g FROM generate_series(1, 10) g",
            "UPDATE nh SET w = 'y' WHERE a = 2",
        ],
    )
    .await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    for (t, q) in [
        ("nd", "SELECT id, cost, v FROM nd"),
        ("ne", "SELECT id, a, b FROM ne"),
        ("nf", "SELECT id, price_old, price, v FROM nf"),
    ] {
        wait_mirror(&work, &format!("ns.{t}"), &pg, q).await;
        wait_changelog(&work, &format!("ns.{t}_changelog"), &pg, q).await;
    }
    const NG: &str = "SELECT id, a, b, z FROM ng";
    wait_mirror(&work, "ns.ng", &pg, "SELECT id, a, b FROM ng").await;
    execute_each(
        &db,
        &[
            "ALTER TABLE ng ADD COLUMN z int",
            "UPDATE ng SET z = 1 WHERE id = 1",
        ],
    )
    .await;
    wait_mirror(&work, "ns.ng", &pg, NG).await;
    wait_changelog(&work, "ns.ng_changelog", &pg, NG).await;
    // The rows changed before the rename were written under the renamed field, not a new one.
    for t in ["ns.nd", "ns.nd_changelog"] {
        let types = column_types(&work, t);
        assert!(types.get("price").is_none(), "{t}: {types}");
    }
    crate::mirror::wait_mirrored_with(&work, "ns.nh", &pg, NH, "a,b,c", &[]).await;
    assert_eq!(schema_changes(&agent, "key").await, 0.0);
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_after_a_schema_change_replays_the_rows_before_it_in_their_place() {
    // A schema update commits when its Relation message arrives, the rows before it at the
    // next flush. Killed in between, the agent replayed those rows with their old Relation
    // message against the new schema: after `DROP c; ADD c` (the names as they were) a row
    // changed before went to the new `c` (the mirror showed a value PostgreSQL no longer has).
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = streaming_c_and_v("dk", "").await;
    let log = work.path().join("agent2.log");
    const DK: &str = "SELECT id, c, v FROM dk";
    // Rows wait for a flush that does not come before the kill.
    let agent = holding_rows(agent, &cfg, &log).await;
    execute_each(
        &db,
        &[
            "UPDATE dk SET c = 99, v = 'b' WHERE id = 1",
            "ALTER TABLE dk DROP COLUMN c",
            "ALTER TABLE dk ADD COLUMN c int",
            "UPDATE dk SET v = 'c' WHERE id = 2",
        ],
    )
    .await;
    wait_log_line(&log, "the schema update", |l| {
        l.contains("schema change followed") && l.contains("replace c")
    })
    .await;
    let agent = killed_and_restarted(agent, &cfg, &work.path().join("agent3.log")).await;
    let v = wait_mirror(&work, "ns.dk", &pg, DK).await;
    assert_eq!(v["rows"], 10, "{v}");
    wait_changelog(&work, "ns.dk_changelog", &pg, DK).await;
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_places_rows_through_the_schema_of_their_time() {
    // Schema updates commit at their Relation message, rows at the next flush. Killed in
    // between, the replay meets the older Relation messages of those transactions again,
    // after the changes are in the tables. They were followed as changes once more: a row
    // changed before `DROP c; ADD c` in its transaction went to the new `c` (a value
    // PostgreSQL no longer has), and a type change moved the current column aside a second
    // time (`v__before_<lsn>_2`). Each table records where its schema changed; a replayed
    // message older than a change is placed through the schema of its time.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = streaming_c_and_v("rp", "").await;
    let log = work.path().join("agent2.log");
    // Rows wait for a flush that does not come before the kill.
    let agent = holding_rows(agent, &cfg, &log).await;
    // Each change followed before the next is made: the catalog, read when a message
    // arrives, then tells what the message means (a later change would hide it).
    db.batch_execute(
        "BEGIN;
         UPDATE rp SET c = 99, v = 'b' WHERE id = 1;
         ALTER TABLE rp DROP COLUMN c;
         ALTER TABLE rp ADD COLUMN c int;
         UPDATE rp SET v = 'c' WHERE id = 2;
         COMMIT;",
    )
    .await
    .expect("drop and add");
    wait_log_line(&log, "the column added again", |l| {
        l.contains("schema change followed") && l.contains("replace c")
    })
    .await;
    db.batch_execute(
        "BEGIN;
         UPDATE rp SET v = 'xyz', c = 5 WHERE id = 5;
         ALTER TABLE rp ALTER COLUMN v TYPE int USING length(v);
         UPDATE rp SET v = 7, c = 3 WHERE id = 3;
         COMMIT;",
    )
    .await
    .expect("type change");
    wait_log_line(&log, "the type change", |l| {
        l.contains("schema change followed") && l.contains("replace v")
    })
    .await;
    let agent = killed_and_restarted(agent, &cfg, &work.path().join("agent3.log")).await;
    // The type change rewrote every row with a value the stream does not carry: only the
    // row changed after it has one in `v`.
    const RP: &str = "SELECT id, c, CASE WHEN id = 3 THEN v END AS v FROM rp";
    let v = wait_mirror(&work, "ns.rp", &pg, RP).await;
    assert_eq!(v["rows"], 10, "{v}");
    wait_changelog(&work, "ns.rp_changelog", &pg, RP).await;
    for t in ["ns.rp_changelog", "ns.rp"] {
        let types = column_types(&work, t);
        let aside: Vec<&String> = types
            .as_object()
            .map(|o| o.keys().filter(|k| k.contains("__before_")).collect())
            .unwrap_or_default();
        // One column moved aside by each change, none by the replay.
        assert_eq!(aside.len(), 2, "{t}: {types}");
        assert_eq!(types["v"], "int", "{t}: {types}");
    }
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_change_after_a_drop_and_add_does_not_hide_it() {
    // The catalog is read when a Relation message is processed, and may be ahead of it by
    // more than one DDL. `DROP c; ADD c` then, in a later transaction, a type change of `v`:
    // the message after the drop and add no longer matched the catalog (`v`'s type), names
    // placed it, and the new `c` took the old one's field until the next message (a value of
    // the new `c` landed in the column moved aside). The agent is stopped meanwhile, so that
    // both transactions are committed before it reads the catalog. Without DDL messages: the
    // catalog alone places the message.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = streaming_c_and_v("nt", "ddl_messages = false").await;
    agent.terminate();
    execute_each(
        &db,
        &[
            "BEGIN;
             UPDATE nt SET c = 99, v = 'b' WHERE id = 1;
             ALTER TABLE nt DROP COLUMN c;
             ALTER TABLE nt ADD COLUMN c int;
             UPDATE nt SET v = 'c' WHERE id = 2;
             COMMIT;",
            "BEGIN;
             UPDATE nt SET v = 'xyz', c = 5 WHERE id = 5;
             ALTER TABLE nt ALTER COLUMN v TYPE int USING length(v);
             UPDATE nt SET v = 7, c = 3 WHERE id = 3;
             COMMIT;",
        ],
    )
    .await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    // The type change rewrote every row with a value the stream does not carry.
    const NT: &str = "SELECT id, c, CASE WHEN id = 3 THEN v END AS v FROM nt";
    wait_mirror(&work, "ns.nt", &pg, NT).await;
    wait_changelog(&work, "ns.nt_changelog", &pg, NT).await;
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_is_followed_when_the_catalog_is_already_past_it() {
    // Two names swapped, then (a later transaction) one of them renamed again and a new column
    // under its name, all before the agent reads the catalog: the catalog no longer describes
    // the message after the swap, names placed it, and the rows changed in between landed in
    // each other's fields. The DDL event trigger writes the table's columns into the stream
    // at each ALTER TABLE, so that message is placed by the numbers of its time.
    let Running {
        pg,
        db,
        work,
        cfg,
        agent,
    } = prepare(
        "CREATE TABLE sw (id int PRIMARY KEY, x int, y int);
         INSERT INTO sw SELECT g, g * 10, g * 100 FROM generate_series(1, 10) g;",
        &["sw"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    wait_mirror(&work, "ns.sw", &pg, "SELECT id, x, y FROM sw").await;
    let log = agent.log_text();
    assert!(
        log.contains("schema changes placed by the DDL messages in the stream"),
        "{log}"
    );
    let v = agent.wait_state("p", "streaming", 30).await;
    assert_eq!(v["ddl_messages"], true, "{v}");
    assert_eq!(v["in_progress"], true, "{v}");
    agent.terminate();
    execute_each(
        &db,
        &[
            "UPDATE sw SET x = x + 1000 WHERE id = 1",
            "BEGIN;
             ALTER TABLE sw RENAME x TO tmp;
             ALTER TABLE sw RENAME y TO x;
             ALTER TABLE sw RENAME tmp TO y;
             UPDATE sw SET x = -2, y = -3 WHERE id = 2;
             COMMIT;",
            "BEGIN;
             ALTER TABLE sw RENAME x TO x_o;
             ALTER TABLE sw ADD COLUMN x text;
             UPDATE sw SET x = 'new', y = -4 WHERE id = 3;
             COMMIT;",
        ],
    )
    .await;
    let agent = AgentProc::start(&cfg, &work.path().join("agent2.log"));
    agent.wait_streaming().await;
    const SW: &str = "SELECT id, y, x_o, x FROM sw";
    wait_mirror(&work, "ns.sw", &pg, SW).await;
    wait_changelog(&work, "ns.sw_changelog", &pg, SW).await;
    never_left_streaming(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_widened_in_a_flush_with_changes_never_leaves_streaming() {
    // `ALTER COLUMN id TYPE bigint` on a busy table: the mirror's index holds keys in the old
    // encoding, and changes of the same flush (before and after the ALTER, in one transaction
    // here) are pending. It used to end the attempt as a failure ("changed type with changes
    // pending", ERROR, a retry counted) and replay; the keys are now rebuilt in place.
    let Running {
        pg,
        db,
        work,
        cfg: _cfg,
        agent,
    } = prepare(
        "CREATE TABLE kw (id int PRIMARY KEY, v text);
         INSERT INTO kw SELECT g, 'a' FROM generate_series(1, 200) g;
         CREATE TABLE kc (a int, b int, v text, PRIMARY KEY (a, b));
         INSERT INTO kc SELECT g / 10, g % 10, 'a' FROM generate_series(1, 200) g;
         CREATE TABLE kf (a int, v text);
         ALTER TABLE kf REPLICA IDENTITY FULL;
         INSERT INTO kf SELECT g % 50, 'a' FROM generate_series(1, 200) g;",
        &["kw", "kc", "kf"],
        "mode = \"both\"\nsnapshot = \"initial\"",
        "",
    )
    .await
    .streaming()
    .await;
    const Q: &str = "SELECT id, v FROM kw";
    wait_mirror(&work, "ns.kw", &pg, Q).await;
    db.batch_execute(
        "BEGIN;
         UPDATE kw SET v = 'before' WHERE id <= 20;
         DELETE FROM kw WHERE id BETWEEN 21 AND 30;
         INSERT INTO kw SELECT g, 'new' FROM generate_series(201, 220) g;
         UPDATE kw SET id = id + 1000 WHERE id BETWEEN 50 AND 52;
         ALTER TABLE kw ALTER COLUMN id TYPE bigint;
         UPDATE kw SET v = 'after' WHERE id <= 5 OR id BETWEEN 201 AND 205 OR id = 1050;
         DELETE FROM kw WHERE id BETWEEN 206 AND 210 OR id BETWEEN 31 AND 35 OR id = 1051;
         INSERT INTO kw VALUES (5000000000, 'big');
         UPDATE kw SET id = id + 4000000000 WHERE id BETWEEN 60 AND 62 OR id = 211;
         COMMIT;
         UPDATE kw SET v = 'later' WHERE id IN (1, 4000000060, 5000000000, 212);
         DELETE FROM kw WHERE id IN (2, 4000000211);
         BEGIN;
         UPDATE kc SET v = 'before' WHERE b = 1;
         DELETE FROM kc WHERE b = 2;
         INSERT INTO kc VALUES (100, 1, 'new'), (100, 2, 'new');
         ALTER TABLE kc ALTER COLUMN b TYPE bigint;
         UPDATE kc SET v = 'after' WHERE b = 3 OR a = 100;
         DELETE FROM kc WHERE b = 4 OR (a = 100 AND b = 2);
         INSERT INTO kc VALUES (100, 5000000000, 'wide');
         UPDATE kf SET v = 'before' WHERE a < 5;
         DELETE FROM kf WHERE a BETWEEN 5 AND 7;
         INSERT INTO kf VALUES (1, 'a'), (1000, 'new');
         ALTER TABLE kf ALTER COLUMN a TYPE bigint;
         UPDATE kf SET v = 'after' WHERE a IN (1, 10, 1000);
         DELETE FROM kf WHERE a IN (2, 11);
         INSERT INTO kf VALUES (5000000000, 'wide');
         COMMIT;",
    )
    .await
    .expect("widen the key");
    let v = wait_mirror(&work, "ns.kw", &pg, Q).await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    let v = wait_changelog(&work, "ns.kw_changelog", &pg, Q).await;
    assert_eq!(v["unique"], true, "{v}");
    assert_eq!(column_types(&work, "ns.kw")["id"], "long");
    const QC: &str = "SELECT a, b, v FROM kc";
    let v = crate::mirror::wait_mirrored_with(&work, "ns.kc", &pg, QC, "a,b", &[]).await;
    assert_eq!(v["duplicate_keys"], 0, "{v}");
    assert_eq!(column_types(&work, "ns.kc")["b"], "long");
    // No key: the whole row finds a row, repeated rows counted apart.
    let v = crate::mirror::wait_mirrored_with(
        &work,
        "ns.kf",
        &pg,
        "SELECT a, v FROM kf",
        "a",
        &["--multiset"],
    )
    .await;
    assert_eq!(v["rows"], 183, "{v}");
    assert_eq!(column_types(&work, "ns.kf")["a"], "long");
    let log = agent.log_text();
    for t in ["ns.kw", "ns.kc", "ns.kf"] {
        assert!(
            log.lines().any(
                |l| l.contains("mirror key index rebuilt with the flush's changes")
                    && l.contains(&format!("table={t} "))
            ),
            "{t}: {log}"
        );
    }
    never_left_streaming(&agent).await;
    drop(agent);
}
