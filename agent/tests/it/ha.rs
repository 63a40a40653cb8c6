//! Hot standby (`[ha]`): two agents on one configuration against a real PostgreSQL. The leader
//! is SIGKILLed under load, its walsender is terminated, and it is stalled (SIGSTOP) until the
//! standby deposes it; every time the Iceberg table equals the source exactly, no
//! `(_cdc_lsn, _cdc_seq)` twice, the stalled leader's late commit is fenced and counted, and
//! the second agent never exits.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::reliability::{mixed_txn, Rng, MIXED_DDL};

/// Agents `a` (the leader: started first) and `b` (standby) on one config.
struct Pair {
    pg: TestPg,
    db: tokio_postgres::Client,
    work: Workdir,
    a: AgentProc,
    b: AgentProc,
}

/// PostgreSQL with `ddl`, one config with `[ha]` (`takeover` timeout) and `flush`, agent `a`
/// streaming and agent `b` standing by.
async fn pair(ddl: &str, takeover: &str, flush: &str) -> Pair {
    let (pg, db, work, cfg) = prepare(
        ddl,
        &["m"],
        "",
        &format!("[ha]\nenabled = true\ntakeover_timeout = \"{takeover}\""),
    )
    .await
    .parts();
    edit_config(
        &cfg,
        "flush_interval = \"300ms\"",
        &format!("flush_interval = \"{flush}\""),
    );
    let a = AgentProc::start(&cfg, &work.path().join("a.log"));
    a.wait_streaming().await;
    let b = AgentProc::start(&cfg, &work.path().join("b.log"));
    let v = b.wait_state("p", "standby", 60).await;
    assert_eq!(v["state"], "standby");
    // Live but not ready while another agent leads.
    let ready = reqwest::get(format!("http://{}/health/ready", b.api_addr().unwrap()))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let live = reqwest::get(format!("http://{}/health/live", b.api_addr().unwrap()))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    Pair { pg, db, work, a, b }
}

/// `txns` transactions of the mixed workload (80 inserts, 15 updates, 5 deletes each),
/// paced; returns the insert/update/delete counts.
fn load(pg: &TestPg, txns: usize) -> tokio::task::JoinHandle<[u64; 3]> {
    let url = pg.url("app");
    tokio::spawn(async move {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("load connection");
        tokio::spawn(conn);
        let mut rng = Rng(0x4a11_0c8e);
        let (mut next, mut live, mut ops) = (0i64, Vec::new(), [0u64; 3]);
        for t in 0..txns {
            let sql = mixed_txn(&mut rng, &mut next, &mut live, &mut ops);
            db.batch_execute(&sql).await.expect("workload");
            if t % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        ops
    })
}

/// The table holds every change exactly once and folds to the source.
async fn assert_exact(work: &Workdir, pg: &TestPg, ops: [u64; 3]) {
    let total = ops.iter().sum::<u64>();
    wait_rows_at_least(work, "ns.m", total, 180).await;
    let v = wait_source_equal(work, "ns.m", pg, "SELECT id, v, h FROM m", &[], 60).await;
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);
    assert_eq!(v["rows"].as_u64(), Some(total), "{v}");
    assert_eq!(v["ops"]["I"], ops[0]);
    assert_eq!(v["ops"]["U"], ops[1]);
    assert_eq!(v["ops"]["D"], ops[2]);
}

/// Whether the agent process is still running.
fn alive(agent: &mut AgentProc) -> bool {
    matches!(agent.child.try_wait(), Ok(None))
}

async fn metric(agent: &AgentProc, name: &str, labels: &str) -> f64 {
    sample_sum(&scrape(&agent.api_addr().unwrap()).await, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_the_standby_takes_over_within_the_timeout_exactly() {
    let Pair {
        pg,
        db: _db,
        work,
        a,
        mut b,
    } = pair(MIXED_DDL, "5s", "300ms").await;
    let gen = load(&pg, 600);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.kill9();
    let killed = Instant::now();
    b.wait_state("p", "streaming", 30).await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the standby streams within ha.takeover_timeout: {took:?}"
    );
    let ops = gen.await.unwrap();
    assert_exact(&work, &pg, ops).await;
    assert_eq!(
        metric(&b, "philotes_ha_takeovers_total", "source=\"p\"").await,
        1.0
    );
    assert!(alive(&mut b));
    eprintln!(
        "HA | SIGKILL of the leader under load | takeover {:.1}s",
        took.as_secs_f64()
    );
    assert_eq!(b.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_leaders_walsender_loses_and_duplicates_nothing() {
    let Pair {
        pg,
        db,
        work,
        mut a,
        mut b,
    } = pair(MIXED_DDL, "3s", "300ms").await;
    let gen = load(&pg, 500);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        db.batch_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'philotes_p' AND active",
        )
        .await
        .unwrap();
    }
    let ops = gen.await.unwrap();
    assert_exact(&work, &pg, ops).await;
    // Leadership may have moved; exactly one agent streams, the other stands by.
    let states = [
        a.api_json("/api/v1/pipelines/p").await.unwrap()["state"].clone(),
        b.api_json("/api/v1/pipelines/p").await.unwrap()["state"].clone(),
    ];
    assert!(
        states.contains(&"streaming".into()) && states.contains(&"standby".into()),
        "{states:?}"
    );
    assert!(alive(&mut a) && alive(&mut b));
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_is_deposed_and_its_late_commit_is_fenced() {
    let Pair {
        pg,
        db,
        work,
        mut a,
        mut b,
    } = pair(
        "CREATE TABLE m (id int PRIMARY KEY, s text)",
        "3s",
        // Long enough that the leader still holds the batch when it is stopped.
        "8s",
    )
    .await;
    db.batch_execute("INSERT INTO m SELECT g, 'first' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    // The leader has the batch in memory, not yet committed: stall it there (a frozen VM, a
    // network partition: its sessions stay open, it says nothing).
    wait_for(Duration::from_secs(30), "the leader buffers", || async {
        (metric(&a, "philotes_buffer_depth", "source=\"p\"").await > 0.0).then_some(())
    })
    .await;
    assert!(iceberg_rows(&work, "ns.m").unwrap_or(0) == 0);
    unsafe {
        libc::kill(a.pid(), libc::SIGSTOP);
    }
    let stalled = Instant::now();
    // The standby finds the leader silent, terminates its sessions and streams the batch.
    b.wait_state("p", "streaming", 30).await;
    let took = stalled.elapsed();
    wait_rows(&work, "ns.m", 100, 60).await;
    assert_eq!(
        metric(&b, "philotes_ha_leaders_deposed_total", "source=\"p\"").await,
        1.0
    );
    // The old leader wakes with its batch due: its commit must be refused, not duplicate.
    unsafe {
        libc::kill(a.pid(), libc::SIGCONT);
    }
    wait_for(
        Duration::from_secs(60),
        "the late commit fenced",
        || async {
            let t = scrape(&a.api_addr()?).await;
            (sample_sum(&t, "philotes_ha_fenced_commits_total", "table=\"ns.m\"") >= 1.0
                && sample_sum(&t, "philotes_cdc_errors_total", "error_type=\"fenced\"") >= 1.0)
                .then_some(())
        },
    )
    .await;
    a.wait_state("p", "standby", 60).await;
    db.batch_execute("INSERT INTO m SELECT g, 'second' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.m", 200, 60).await;
    let v = wait_source_equal(&work, "ns.m", &pg, "SELECT id, s FROM m", &[], 60).await;
    assert_eq!(v["unique"], true, "duplicates: {}", v["duplicates"]);
    assert_eq!(v["rows"].as_u64(), Some(200), "{v}");
    assert!(a.log_text().contains("commit fenced"), "{}", a.log_text());
    assert!(alive(&mut a) && alive(&mut b));
    eprintln!(
        "HA | leader stalled (SIGSTOP) | takeover {:.1}s | late commit fenced",
        took.as_secs_f64()
    );
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
}
