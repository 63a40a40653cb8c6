//! SCRAM password authentication and `sslmode` against a real server with a self-signed
//! certificate made in the test.

use std::process::Command;

use crate::common::*;
use philotes::demo::postgres::LocalPgOptions;

/// Turn on TLS with a fresh self-signed certificate and restart the server.
fn enable_tls(pg: &TestPg) {
    let dir = &pg.pg.data_dir;
    let (code, out) = run_cmd(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(dir.join("server.key"))
            .arg("-out")
            .arg(dir.join("server.crt")),
    );
    assert_eq!(code, 0, "openssl: {out}");
    use_server_cert(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_sslmodes_connect_and_stream() {
    let pw = "s3cr3t-Pässword";
    let pg = TestPg::start_with(LocalPgOptions {
        password: Some(pw.into()),
        ..LocalPgOptions::default()
    });
    enable_tls(&pg);
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
        .await
        .unwrap();
    let work = Workdir::new();
    let encoded = "s3cr3t-P%C3%A4ssword";
    let base = format!("postgres://philotes:{encoded}@127.0.0.1:{}/app", pg.pg.port);

    let check = |url: &str| run_philotes(&["check"], &work.config(url, &["t"], "", ""));
    for mode in ["disable", "prefer", "require"] {
        let (code, out) = check(&format!("{base}?sslmode={mode}"));
        assert_eq!(code, 0, "sslmode={mode}: {out}");
    }
    // SCRAM bound to the TLS channel (tls-server-end-point): a wrong certificate hash would
    // fail authentication, so success proves the binding.
    let (code, out) = check(&format!("{base}?sslmode=require&channel_binding=require"));
    assert_eq!(code, 0, "channel_binding=require over TLS: {out}");
    let (code, out) = check(&format!("{base}?sslmode=disable&channel_binding=require"));
    assert_eq!(
        code, 2,
        "channel_binding=require without TLS must fail: {out}"
    );
    assert!(out.contains("channel_binding"), "{out}");
    // A Unix-domain socket, named by its directory as libpq does (local connections trust).
    let (code, out) = check(&format!(
        "postgres://philotes@localhost:{}/app?host={}",
        pg.pg.port,
        pg.pg.data_dir.display()
    ));
    assert_eq!(code, 0, "unix socket: {out}");

    let (code, out) = check(&format!(
        "postgres://philotes:nope-wrong@127.0.0.1:{}/app?sslmode=require",
        pg.pg.port
    ));
    assert_eq!(code, 2, "{out}");
    assert!(!out.contains("nope-wrong"), "password leaked: {out}");
    assert!(
        out.to_lowercase().contains("auth") || out.contains("password"),
        "{out}"
    );

    // Stream over TLS with SCRAM.
    let cfg = work.config(&format!("{base}?sslmode=require"), &["t"], "", "");
    let agent = AgentProc::start_streaming(&cfg, &work.path().join("agent.log")).await;
    db.batch_execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    wait_rows(&work, "ns.t", 500, 60).await;
    let log = agent.log_text();
    assert!(
        !log.contains(pw) && !log.contains(encoded),
        "password in the log"
    );
    // The stream and the slot monitor are both walsender sessions: every one must use TLS.
    let row = pg
        .client("app")
        .await
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s \
             JOIN pg_stat_replication r ON r.pid = s.pid",
            &[],
        )
        .await
        .unwrap();
    let (sessions, all_tls): (i64, bool) = (row.get(0), row.get(1));
    assert!(sessions >= 1, "a replication session exists");
    assert!(all_tls, "every replication session uses TLS");
    assert_eq!(agent.terminate(), Some(0));
}
