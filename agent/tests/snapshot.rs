//! Initial snapshot: consistent with the stream (no gap, no overlap) under concurrent writes,
//! and safe to crash in.

mod common;

use std::time::Duration;

use common::*;

const ROWS: i64 = 200_000;

async fn setup() -> (TestPg, tokio_postgres::Client, Workdir, std::path::PathBuf) {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute(&format!(
        "CREATE TABLE big (id bigint PRIMARY KEY, v int NOT NULL, h text);
         INSERT INTO big SELECT g, 0, md5(g::text) FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    let work = Workdir::new();
    let cfg = work.config(&pg.url("app"), &["big"], "snapshot = \"initial\"", "");
    (pg, db, work, cfg)
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
    let v = verify(
        work,
        "ns.big",
        &[
            "--pg-conninfo",
            &pg.conninfo("app"),
            "--pg-query",
            "SELECT id, v, h FROM big",
        ],
    );
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);
    assert_eq!(v["state_equal"], true, "{}", v["state_diff"]);
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
            let v = verify(
                work,
                "ns.big",
                &[
                    "--pg-conninfo",
                    &pg.conninfo("app"),
                    "--pg-query",
                    "SELECT id FROM big",
                ],
            );
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
    let metrics = reqwest::get(format!("http://{}/metrics", agent.api_addr().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("philotes_cdc_events_total{operation=\"snapshot\"")
                && l.ends_with(&format!(" {r}"))
        ),
        "philotes_cdc_events_total{{operation=\"snapshot\"}} = {r}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_snapshot_restarts_it_without_duplicates() {
    let (pg, _db, work, cfg) = setup().await;
    let log = work.path().join("agent.log");
    let agent = AgentProc::start(&cfg, &log);
    let writer = churn(pg.client("app").await);
    wait_for(Duration::from_secs(60), "snapshot under way", || async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("initial snapshot: copying"))
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = std::fs::read_to_string(&log).unwrap_or_default();
    agent.kill9();
    assert!(
        !before_kill.contains("initial snapshot: committed"),
        "the kill must land during the copy"
    );
    assert_eq!(
        iceberg_rows(&work, "ns.big").unwrap_or(0),
        0,
        "nothing of an unfinished snapshot is committed"
    );
    let agent = AgentProc::start(&cfg, &log);
    writer.await.unwrap();
    settled(&pg, &work).await;
    let v = folded_equals_source(&pg, &work);
    assert_eq!(
        v["snapshot_duplicate_keys"], 0,
        "no duplicate R rows after the crash"
    );
    let r = v["ops"]["R"].as_i64().unwrap();
    assert!(r > ROWS * 9 / 10, "R rows: {r}");
    assert_eq!(agent.terminate(), Some(0));
}
