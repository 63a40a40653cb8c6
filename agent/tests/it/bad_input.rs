//! Bad configuration and unusable sources: exit status 2 and one line naming the problem.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use philotes::demo::postgres::LocalPgOptions;

fn write(work: &Workdir, name: &str, text: &str) -> std::path::PathBuf {
    let p = work.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD_PIPELINE: &str = r#"
[[pipelines]]
name = "p"
source = "postgres://u@127.0.0.1:1/db"
tables = ["t"]
"#;

/// Problem lines (stderr lines starting with `philotes:`), asserting there is no backtrace.
fn problem_lines(out: &str) -> Vec<String> {
    assert!(!out.contains("panicked"), "panic: {out}");
    assert!(!out.contains("stack backtrace"), "backtrace: {out}");
    out.lines()
        .filter(|l| l.starts_with("philotes:"))
        .map(String::from)
        .collect()
}

/// `GOOD_PIPELINE` with `from` replaced by `to`.
fn with(from: &str, to: &str) -> String {
    assert!(GOOD_PIPELINE.contains(from), "{from}");
    GOOD_PIPELINE.replace(from, to)
}

/// `GOOD_PIPELINE` with an extra pipeline key.
fn plus(line: &str) -> String {
    with("tables = [\"t\"]", &format!("tables = [\"t\"]\n{line}"))
}

#[test]
fn bad_configs_exit_2_naming_the_key() {
    let work = Workdir::new();
    let src = "source = \"postgres://u@127.0.0.1:1/db\"\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown top-level key",
            format!("bogus = 1\n{GOOD_PIPELINE}"),
            "bogus",
        ),
        (
            "unknown [api] key",
            format!("[api]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n{GOOD_PIPELINE}"),
            "bogus",
        ),
        ("unknown pipeline key", plus("colour = \"blue\""), "colour"),
        (
            "two tables, one Iceberg name",
            with("tables = [\"t\"]", "tables = [\"a.b\", \"a__b\"]"),
            "pipelines[0].tables[1]",
        ),
        (
            "wrong type",
            plus("batch_rows = \"many\""),
            "pipelines[0].batch_rows",
        ),
        (
            "tables not a list",
            with("tables = [\"t\"]", "tables = \"t\""),
            "pipelines[0].tables",
        ),
        ("missing source", with(src, ""), "source"),
        ("missing name", with("name = \"p\"\n", ""), "name"),
        ("missing tables", with("tables = [\"t\"]\n", ""), "tables"),
        (
            "empty tables",
            with("tables = [\"t\"]", "tables = []"),
            "pipelines[0].tables",
        ),
        (
            "bad duration",
            plus("flush_interval = \"fast\""),
            "pipelines[0].flush_interval",
        ),
        (
            "zero duration",
            format!("[telemetry]\nexport_interval = \"0s\"\n{GOOD_PIPELINE}"),
            "telemetry.export_interval",
        ),
        (
            "bad size",
            plus("max_buffer_bytes = \"lots\""),
            "pipelines[0].max_buffer_bytes",
        ),
        (
            "size too small",
            plus("max_buffer_bytes = \"1KiB\""),
            "pipelines[0].max_buffer_bytes",
        ),
        (
            "bad source URL",
            with("postgres://u@127.0.0.1:1/db", "mysql://u@h/db"),
            "pipelines[0].source",
        ),
        (
            "bad sslmode",
            with(
                "postgres://u@127.0.0.1:1/db",
                "postgres://u@127.0.0.1:1/db?sslmode=maybe",
            ),
            "pipelines[0].source",
        ),
        (
            "bad OTLP URL",
            format!("[telemetry]\notlp_endpoint = \"not a url\"\n{GOOD_PIPELINE}"),
            "telemetry.otlp_endpoint",
        ),
        (
            "bad OTLP protocol",
            format!("[telemetry]\notlp_protocol = \"udp\"\n{GOOD_PIPELINE}"),
            "telemetry.otlp_protocol",
        ),
        (
            "bad log format",
            format!("[telemetry]\nlog_format = \"xml\"\n{GOOD_PIPELINE}"),
            "telemetry.log_format",
        ),
        (
            "bad catalog",
            format!("[iceberg]\ncatalog = \"hive\"\n{GOOD_PIPELINE}"),
            "iceberg.catalog",
        ),
        (
            "bad listen address",
            format!("[api]\nlisten = \"nowhere\"\n{GOOD_PIPELINE}"),
            "api.listen",
        ),
        (
            "open listener without token",
            format!("[api]\nlisten = \"0.0.0.0:8080\"\n{GOOD_PIPELINE}"),
            "api.listen",
        ),
        (
            "duplicate pipeline",
            format!("{GOOD_PIPELINE}{GOOD_PIPELINE}"),
            "pipelines[1].name",
        ),
        (
            "bad table name",
            with("tables = [\"t\"]", "tables = [\"a.b.c\"]"),
            "pipelines[0].tables[0]",
        ),
        (
            "bad snapshot mode",
            plus("snapshot = \"sometimes\""),
            "pipelines[0].snapshot",
        ),
        (
            "unset variable",
            with(
                "postgres://u@127.0.0.1:1/db",
                "postgres://u:${NO_SUCH_VAR_FOR_TEST}@h/db",
            ),
            "pipelines[0].source",
        ),
        ("TOML syntax", "[[pipelines]\nname=".to_string(), "line"),
        (
            "maintenance: retain nothing",
            format!("[maintenance]\nretain_last = 0\n{GOOD_PIPELINE}"),
            "maintenance.retain_last",
        ),
        (
            "maintenance: bad interval",
            format!("[maintenance]\ninterval = \"often\"\n{GOOD_PIPELINE}"),
            "maintenance.interval",
        ),
        (
            "maintenance: tiny target",
            format!("[maintenance]\ntarget_file_size = \"1KiB\"\n{GOOD_PIPELINE}"),
            "maintenance.target_file_size",
        ),
        (
            "maintenance: orphan age too short",
            format!("[maintenance]\norphan_age = \"1m\"\n{GOOD_PIPELINE}"),
            "maintenance.orphan_age",
        ),
        (
            "ha: takeover timeout too short",
            format!("[ha]\nenabled = true\ntakeover_timeout = \"500ms\"\n{GOOD_PIPELINE}"),
            "ha.takeover_timeout",
        ),
        (
            "ha: unknown key",
            format!("[ha]\nenable = true\n{GOOD_PIPELINE}"),
            "ha",
        ),
        (
            "maintenance: delete ratio above 1",
            format!("[maintenance]\ndelete_ratio = 1.5\n{GOOD_PIPELINE}"),
            "maintenance.delete_ratio",
        ),
        (
            "table mode for a table not streamed",
            format!(
                "{GOOD_PIPELINE}follow_publication = false\ntable_modes = {{ \"public.nope\" = \"mirror\" }}\n"
            ),
            "pipelines[0].table_modes.\"public.nope\"",
        ),
        (
            "maintenance: unknown key",
            format!("[maintenance]\nevery = \"1m\"\n{GOOD_PIPELINE}"),
            "maintenance.every",
        ),
        (
            "missing source",
            GOOD_PIPELINE.replace("source = \"postgres://u@127.0.0.1:1/db\"\n", ""),
            "pipelines[0].source",
        ),
        (
            "no pipelines",
            "[api]\nlisten = \"127.0.0.1:0\"\n".to_string(),
            "pipelines",
        ),
    ];
    assert!(cases.len() >= 20);
    for (what, text, key) in cases {
        let (code, out) = run_philotes(&["run"], &write(&work, "bad.toml", &text));
        assert_eq!(code, 2, "{what}: exit code, output: {out}");
        let lines = problem_lines(&out);
        assert_eq!(lines.len(), 1, "{what}: one line, got {out}");
        assert!(
            lines[0].contains(key),
            "{what}: {:?} should name {key}",
            lines[0]
        );
        // The shape: `philotes: config: <key>: <message>`, the key named once, no trailing
        // white space.
        let line = &lines[0];
        assert_eq!(
            line.trim_end(),
            line,
            "{what}: trailing white space in {line:?}"
        );
        let rest = line
            .strip_prefix("philotes: config: ")
            .unwrap_or_else(|| panic!("{what}: {line:?} is not `philotes: config: <key>: ...`"));
        let (named, message) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("{what}: no message in {line:?}"));
        assert!(named.contains(key), "{what}: key {named:?} should be {key}");
        assert!(!message.is_empty(), "{what}: empty message in {line:?}");
        let last = named.rsplit('.').next().unwrap_or(named);
        if !named.starts_with("line ") {
            assert!(
                !message.contains(&format!("`{last}`"))
                    && !message.contains(&format!("in {named}"))
                    && !message.contains(&format!("{named}:")),
                "{what}: the key is named twice in {line:?}"
            );
        }
    }
    // An unreadable file is a config problem too.
    let (code, out) = run_cmd(Command::new(philotes_bin()).args([
        "run",
        "--config",
        "/nonexistent/philotes.toml",
    ]));
    assert_eq!(code, 2, "{out}");
    assert_eq!(problem_lines(&out).len(), 1, "{out}");
    assert!(out.contains("cannot read"), "{out}");
}

#[test]
fn unreachable_source_fails_check_with_one_line() {
    let work = Workdir::new();
    let port = philotes::demo::postgres::free_port().unwrap();
    let cfg = write(
        &work,
        "c.toml",
        &format!(
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp}\"\n[iceberg]\nuri = \"sqlite://{}/data/c.db\"\nwarehouse = \"{}/data/wh\"\n[[pipelines]]\nname = \"p\"\nsource = \"postgres://u:hunter2@127.0.0.1:{port}/db?connect_timeout=3\"\ntables = [\"t\"]\n",
            work.path().display(),
            work.path().display(),
            otlp = philotes::demo::postgres::free_port().unwrap(),
        ),
    );
    let (code, out) = run_philotes(&["check"], &cfg);
    assert_eq!(code, 2, "{out}");
    let lines = problem_lines(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("pipeline p") && lines[0].contains("connect"),
        "{}",
        lines[0]
    );
    assert!(!out.contains("hunter2"), "password leaked: {out}");
    // A failed check leaves nothing behind: no catalog file, no warehouse, no directory.
    assert!(
        !work.path().join("data").exists(),
        "check created {:?}",
        std::fs::read_dir(work.path().join("data"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    // And it warns that the OTLP endpoint does not answer (pushes would be lost).
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no OTLP warning: {out}"));
    assert!(
        warning.contains("telemetry.otlp_endpoint") && warning.contains("not reachable"),
        "{warning}"
    );
}

/// `check` and `run` with `cfg` both exit 2 with one problem line holding every `needle`.
fn refused_by_check_and_run(cfg: &std::path::Path, needles: &[&str]) {
    for cmd in ["check", "run"] {
        let (code, out) = run_philotes(&[cmd], cfg);
        assert_eq!(code, 2, "{cmd}: {out}");
        let lines = problem_lines(&out);
        assert_eq!(lines.len(), 1, "{cmd}: {out}");
        assert!(
            needles.iter().all(|n| lines[0].contains(n)),
            "{cmd}: {}",
            lines[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused() {
    let mut opts = LocalPgOptions::default();
    opts.settings.retain(|(k, _)| k != "wal_level");
    opts.settings.push(("wal_level".into(), "replica".into()));
    let p = prepare_with(opts, "CREATE TABLE t (id int PRIMARY KEY)", &["t"], "", "").await;
    refused_by_check_and_run(&p.cfg, &["wal_level"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_refused() {
    let pg = TestPg::start();
    pg.create_db("app").await;
    let work = Workdir::new();
    let cfg = work.config(&pg.url("app"), &["public.nope"], "", "");
    let (code, out) = run_philotes(&["check"], &cfg);
    assert_eq!(code, 2, "{out}");
    let lines = problem_lines(&out);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("public.nope"), "{}", lines[0]);
}

/// A view, a materialized view or an UNLOGGED table cannot be streamed: refused at start with
/// what it is (it used to read "does not exist", or fail at CREATE PUBLICATION).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_or_an_unlogged_table_is_refused_as_what_it_is() {
    let pg = TestPg::start();
    pg.create_db("app")
        .await
        .batch_execute(
            "CREATE TABLE base (id int PRIMARY KEY);
             CREATE VIEW v AS SELECT id FROM base;
             CREATE MATERIALIZED VIEW mv AS SELECT id FROM base;
             CREATE UNLOGGED TABLE u (id int PRIMARY KEY);",
        )
        .await
        .expect("schema");
    for (table, what) in [
        ("public.v", "it is a view"),
        ("public.mv", "it is a materialized view"),
        ("public.u", "it is UNLOGGED"),
    ] {
        let work = Workdir::new();
        let cfg = work.config(&pg.url("app"), &["public.base", table], "", "");
        refused_by_check_and_run(&cfg, &[table, what]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_leaving_out_deletes_is_refused() {
    // A publication made by hand `WITH (publish = 'insert, update')` streamed without a word:
    // no delete ever reached Iceberg, and the mirror kept every deleted row.
    let p = prepare(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE PUBLICATION philotes_p FOR TABLE t WITH (publish = 'insert, update');",
        &["t"],
        "mode = \"both\"",
        "",
    )
    .await;
    refused_by_check_and_run(
        &p.cfg,
        &[
            "does not publish delete, truncate",
            "SET (publish = 'insert, update, delete, truncate')",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_stops_publishing_deletes_while_streaming_is_reported() {
    // PostgreSQL decodes no delete made while the publication leaves deletes out, even after
    // it is fixed: the loss cannot be undone, only told (once) and counted.
    let (_pg, db, _work, agent) =
        running("CREATE TABLE t (id int PRIMARY KEY, v text)", &["t"], "")
            .await
            .parts();
    db.batch_execute("ALTER PUBLICATION philotes_p SET (publish = 'insert, update')")
        .await
        .expect("alter publication");
    wait_for(
        Duration::from_secs(30),
        "the publication leaving deletes out",
        || async {
            agent
                .log_text()
                .lines()
                .any(|l| {
                    l.contains("WARN")
                    && l.contains(
                        "no longer publishes every operation (it does not publish delete, truncate",
                    )
                })
                .then_some(())
        },
    )
    .await;
    let addr = agent.api_addr().expect("API address");
    assert!(
        metric_value(
            &addr,
            "philotes_cdc_errors_total",
            "error_type=\"config\",source=\"p\""
        )
        .await
            >= 1.0
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let warned = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("no longer publishes every operation"))
        .count();
    assert_eq!(warned, 1, "told once, not at every check");
    drop(agent);
}

/// A publication that sends a partitioned table's changes under its partitions' names would
/// leave them out (the partitions are not configured): refused, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_leaving_out_a_partitioned_table_is_refused() {
    let p = prepare(
        "CREATE TABLE m (id int, at date NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE m_a PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE PUBLICATION philotes_p FOR TABLE m;",
        &["m"],
        "",
        "",
    )
    .await;
    refused_by_check_and_run(&p.cfg, &["public.m", "publish_via_partition_root = true"]);
}
