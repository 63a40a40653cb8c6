//! `philotes demo` end to end: it starts its own PostgreSQL, streams, stops cleanly, proves that
//! every generated change is in Iceberg, and the query snippets it prints (and those of the
//! README and docs/querying.md) run as printed against its output and agree with it.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Run the demo in `work` and return its output.
fn run_demo(work: &Workdir, duration: &str, rate: &str) -> String {
    let (code, out) = run_cmd(Command::new(philotes_bin()).current_dir(work.path()).args([
        "demo",
        "--duration",
        duration,
        "--rate",
        rate,
        "--listen",
        "127.0.0.1:0",
    ]));
    assert_eq!(code, 0, "demo failed: {out}");
    out
}

/// `(generated, in_iceberg, orders_in_iceberg)` from the demo's closing summary line.
fn summary(out: &str) -> (u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains(" generated ") && l.contains(" rows in Iceberg"))
        .unwrap_or_else(|| panic!("no summary line: {out}"));
    assert!(line.starts_with('✔'), "the demo proved nothing: {line}");
    let num_after = |what: &str| -> u64 {
        let i = line
            .find(what)
            .unwrap_or_else(|| panic!("{what:?} in {line}"))
            + what.len();
        line[i..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("number after {what:?} in {line}"))
    };
    let generated = num_after("generated ");
    let in_iceberg = num_after("; ");
    let orders = num_after("orders ");
    (generated, in_iceberg, orders)
}

/// Run a Python snippet with the test venv's interpreter (it has the readers the snippets'
/// `pip install` lines name) in `cwd`; its stdout.
fn run_python(body: &str, cwd: &Path, what: &str) -> String {
    let out = output_with_stdin(Command::new(python()).arg("-").current_dir(cwd), body);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed:\n{body}\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `N` from a line `<table>: N rows ...` printed by a snippet.
fn rows_of(out: &str, table: &str) -> u64 {
    let prefix = format!("{table}: ");
    let line = out
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {table} line in {out}"));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}

/// The heredoc bodies (`python3 - <<'EOF'` … `EOF`) the demo printed.
fn printed_snippets(out: &str) -> Vec<String> {
    let mut snippets = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in out.lines() {
        match &mut cur {
            None if line.trim() == "python3 - <<'EOF'" => cur = Some(Vec::new()),
            Some(body) if line.trim() == "EOF" => {
                snippets.push(body.join("\n") + "\n");
                cur = None;
            }
            Some(body) => body.push(line),
            None => {}
        }
    }
    snippets
}

/// The ```python blocks of a Markdown file's section `heading` (to the next `## `).
fn markdown_python(file: &str, heading: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("{heading} in {file}"));
    let rest = &text[start + heading.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    section
        .split("```python\n")
        .skip(1)
        .map(|b| b[..b.find("```").expect("closed block")].to_string())
        .collect()
}

#[test]
fn a_short_demo_commits_every_generated_change() {
    let work = Workdir::new();
    let out = run_demo(&work, "4s", "200");
    assert!(out.contains("/metrics"), "prints the metrics URL: {out}");
    let (generated, in_iceberg, _) = summary(&out);
    assert!(generated > 0, "{out}");
    assert_eq!(generated, in_iceberg, "{out}");
    // The closing figures come from its own /metrics and agree with the tables it read back.
    let line = out
        .lines()
        .find(|l| l.contains("/metrics:") && l.contains("rows committed"))
        .unwrap_or_else(|| panic!("no figures from /metrics: {out}"));
    let rows: u64 = line
        .split(": ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(rows, in_iceberg, "{line}");
    for part in [
        "commits;",
        "freshness p50 ",
        " p99 ",
        "transactions;",
        "slot lag ",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(!line.contains("p50 –"), "freshness observed: {line}");
}

#[test]
fn a_longer_demo_commits_every_generated_change_and_its_snippets_agree() {
    let work = Workdir::new();
    let out = run_demo(&work, "20s", "1500");
    let (generated, in_iceberg, orders) = summary(&out);
    assert!(generated > 5_000, "{out}");
    assert_eq!(generated, in_iceberg, "{out}");
    let dir = work.path().join("philotes-demo");

    // The demo's own closing snippets, exactly as printed.
    let snippets = printed_snippets(&out);
    assert_eq!(snippets.len(), 2, "a PyIceberg and a DuckDB block: {out}");
    assert!(
        !snippets.iter().any(|s| s.contains("pandas")),
        "no pandas needed"
    );
    let py = run_python(&snippets[0], work.path(), "the demo's PyIceberg snippet");
    assert_eq!(
        rows_of(&py, "shop.customers") + rows_of(&py, "shop.orders"),
        in_iceberg,
        "{py}"
    );
    assert_eq!(rows_of(&py, "shop.orders"), orders, "{py}");
    let duck = run_python(&snippets[1], work.path(), "the demo's DuckDB snippet");
    assert_eq!(rows_of(&duck, "shop.orders"), orders, "{duck}");

    // The README's snippets, run where the demo ran.
    let readme = markdown_python("README.md", "## Reading the tables");
    assert_eq!(readme.len(), 2, "README: a PyIceberg and a DuckDB block");
    let py = run_python(&readme[0], work.path(), "README's PyIceberg snippet");
    assert_eq!(
        rows_of(&py, "shop.customers") + rows_of(&py, "shop.orders"),
        in_iceberg,
        "{py}"
    );
    let duck = run_python(&readme[1], work.path(), "README's DuckDB snippet");
    assert_eq!(rows_of(&duck, "shop.orders"), orders, "{duck}");

    // docs/querying.md, with its example location pointed at the demo's output.
    let at_demo = |s: &str| s.replace("/var/lib/philotes/data", &dir.display().to_string());
    let py = markdown_python("docs/querying.md", "## PyIceberg");
    let first = run_python(
        &at_demo(&py[0]),
        work.path(),
        "querying.md PyIceberg snippet",
    );
    let n: u64 = first
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{first}"));
    assert_eq!(n, orders, "{first}");
    let duck = markdown_python("docs/querying.md", "## DuckDB");
    let printed = run_python(
        &at_demo(&duck[0]),
        work.path(),
        "querying.md DuckDB snippet",
    );
    // `[('D', 12), ('I', 3400), ...]`
    let total: u64 = printed
        .split("), (")
        .filter_map(|pair| {
            pair.rsplit(", ")
                .next()?
                .trim_end_matches([')', ']', '\n'])
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(total, orders, "{printed}");

    // And the independent check of the whole table.
    let v = verify_at(
        &dir.join("catalog.db"),
        &dir.join("warehouse"),
        "shop.orders",
        &["--duckdb"],
    );
    assert_eq!(v["rows"].as_u64().unwrap(), orders, "{v}");
    assert_eq!(v["unique"], true);
    assert_eq!(v["duckdb_equal"], true);
}

/// The README's ```toml blocks of "Running it".
fn readme_configs() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("## Running it").expect("Running it");
    let rest = &text[start..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3)];
    section
        .split("```toml\n")
        .skip(1)
        .map(|b| b[..b.find("```").expect("closed block")].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_configs_work_as_given() {
    let configs = readme_configs();
    assert_eq!(configs.len(), 2, "a minimal and a fuller config");
    // The fuller one parses with the token variable unset: the token is optional.
    let env = vec![("PGPASSWORD".to_string(), "secret".to_string())];
    let full = philotes::config::Config::parse(&configs[1], &env)
        .unwrap_or_else(|e| panic!("README config: {e}"));
    assert!(
        full.api.token.is_none(),
        "no token without PHILOTES_API_TOKEN"
    );
    let with_token = philotes::config::Config::parse(
        &configs[1],
        &[
            env[0].clone(),
            ("PHILOTES_API_TOKEN".to_string(), "t0ken".to_string()),
        ],
    )
    .unwrap();
    assert_eq!(
        with_token.api.token.as_ref().map(|t| t.expose()),
        Some("t0ken")
    );

    // The minimal one passes `philotes check` against a real PostgreSQL, as printed but for
    // the server's address.
    let pg = TestPg::start();
    let db = pg.create_db("shop").await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE customers (id int PRIMARY KEY)",
    )
    .await
    .unwrap();
    let minimal = &configs[0];
    let printed = "postgres://philotes@127.0.0.1:5432/shop";
    assert!(minimal.contains(printed), "{minimal}");
    let work = Workdir::new();
    let cfg = work.path().join("philotes.toml");
    std::fs::write(&cfg, minimal.replace(printed, &pg.url("shop"))).unwrap();
    let (code, out) = run_cmd(
        Command::new(philotes_bin())
            .current_dir(work.path())
            .args(["check", "--config"])
            .arg(&cfg),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok:"), "{out}");
}
