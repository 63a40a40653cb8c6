//! `philotes demo` end to end: it must start its own PostgreSQL, stream, stop cleanly and
//! leave tables an independent reader can open.

mod common;

use std::process::Command;

use common::*;

#[test]
fn demo_runs_and_leaves_readable_tables() {
    let work = Workdir::new();
    let (code, out) = run_cmd(Command::new(philotes_bin()).current_dir(work.path()).args([
        "demo",
        "--duration",
        "6s",
        "--rate",
        "300",
        "--listen",
        "127.0.0.1:0",
    ]));
    assert_eq!(code, 0, "demo failed: {out}");
    assert!(out.contains("/metrics"), "prints the metrics URL: {out}");
    assert!(
        out.contains("SqlCatalog('philotes'"),
        "prints the PyIceberg line: {out}"
    );
    assert!(
        out.contains("iceberg_scan('"),
        "prints the DuckDB line: {out}"
    );
    let dir = work.path().join("philotes-demo");
    let v = {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/verify.py");
        let out = Command::new(python())
            .arg(script)
            .arg("--catalog-db")
            .arg(dir.join("catalog.db"))
            .arg("--warehouse")
            .arg(dir.join("warehouse"))
            .args(["--table", "shop.orders", "--duckdb"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert!(v["rows"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["unique"], true);
    assert_eq!(v["duckdb_equal"], true);
}
