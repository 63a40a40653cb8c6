//! The management API against a running agent and a real PostgreSQL: every route, auth,
//! JSON errors, pause/resume without loss, label cardinality, and schemathesis.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use reqwest::StatusCode;
use serde_json::Value;

const TOKEN: &str = "t0ken-Sup3r-secret";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// POST `body` as `content_type` with the token (for requests `call` cannot make).
    async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("request");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

async fn start() -> (TestPg, tokio_postgres::Client, Workdir, AgentProc, Api) {
    let (running, addr) = running_numeric_t_on_a_fixed_port(
        "",
        "token = \"${TEST_API_TOKEN}\"",
        &[("TEST_API_TOKEN", TOKEN)],
    )
    .await;
    let (pg, db, work, agent) = running.parts();
    let api = Api {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
    };
    (pg, db, work, agent, api)
}

fn snapshots(work: &Workdir) -> u64 {
    verify(work, "ns.t", &[])["snapshots"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_and_pause_resume_loses_nothing() {
    let (pg, db, work, agent, api) = start().await;
    db.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g; INSERT INTO t VALUES (1000, 'NaN')")
        .await
        .unwrap();
    wait_rows(&work, "ns.t", 100, 60).await;

    // Open routes.
    let (s, v) = api.call("GET", "/health/live", None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, _) = api.call("GET", "/health/ready", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.call("GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("philotes_cdc_events_total"));
    let (s, v) = api.call("GET", "/api/v1/version", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let (s, v) = api.call("GET", "/api/v1/pipelines", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["pipelines"][0]["name"], "p");
    let (s, v) = api.call("GET", "/api/v1/pipelines/p", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "streaming");
    for k in [
        "received_lsn",
        "committed_lsn",
        "confirmed_lsn",
        "lag_seconds",
        "slot_lag_bytes",
        "last_error",
    ] {
        assert!(v.get(k).is_some(), "pipeline detail lacks {k}: {v}");
    }
    assert_eq!(v["tables"]["public.t"]["inserts"], 101);
    let (s, v) = api.call("GET", "/api/v1/pipelines/p/tables", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["tables"][0]["iceberg_table"], "ns.t");
    let (s, v) = api.call("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let documented: BTreeSet<String> = v["paths"].as_object().unwrap().keys().cloned().collect();
    let routes: BTreeSet<String> = [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/api/v1/version",
        "/api/v1/config",
        "/api/v1/openapi.json",
        "/api/v1/pipelines",
        "/api/v1/pipelines/{name}",
        "/api/v1/pipelines/{name}/tables",
        "/api/v1/pipelines/{name}/pause",
        "/api/v1/pipelines/{name}/resume",
        "/api/v1/pipelines/{name}/tables/{table}/snapshot",
        "/api/v1/pipelines/{name}/dlq",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        documented, routes,
        "openapi.json must describe exactly the routes"
    );

    // Protected routes with the token.
    let (s, v) = api.call("GET", "/api/v1/config", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.to_string();
    assert!(!text.contains(TOKEN), "token leaked in /api/v1/config");
    assert_eq!(v["api"]["token"], "***");
    wait_for(Duration::from_secs(30), "dead letter committed", || async {
        let (_, v) = api
            .call("GET", "/api/v1/pipelines/p/dlq?limit=5", Some(TOKEN))
            .await;
        (v["entries"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    let (_, v) = api
        .call("GET", "/api/v1/pipelines/p/dlq?limit=5", Some(TOKEN))
        .await;
    assert!(v["entries"][0]["error"].as_str().unwrap().contains("NaN"));

    // JSON errors.
    for (method, path, want) in [
        ("GET", "/api/v1/pipelines/nope", StatusCode::NOT_FOUND),
        (
            "POST",
            "/api/v1/pipelines/nope/pause",
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/api/v1/pipelines/p/tables/public.nope/snapshot",
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/api/v1/pipelines/nope/tables/public.t/snapshot",
            StatusCode::NOT_FOUND,
        ),
        (
            "DELETE",
            "/api/v1/pipelines/p",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        ("GET", "/no/such/route", StatusCode::NOT_FOUND),
        (
            "GET",
            "/api/v1/pipelines/p/dlq?limit=abc",
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/v1/pipelines/p/dlq?limit=0",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = api.call(method, path, Some(TOKEN)).await;
        assert_eq!(s, want, "{method} {path}");
        assert!(
            v["error"].is_string(),
            "{method} {path}: JSON error, got {v}"
        );
    }
    let big = api
        .post_raw(
            "/api/v1/pipelines/p/pause",
            "application/json",
            vec![b' '; 200 * 1024],
        )
        .await;
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let text = api
        .post_raw("/api/v1/pipelines/p/pause", "text/plain", "pause please")
        .await;
    assert_eq!(text.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let bad_json = api
        .post_raw(
            "/api/v1/pipelines/p/resume",
            "application/json",
            "{\"not\": json",
        )
        .await;
    assert_eq!(bad_json.status(), StatusCode::BAD_REQUEST);
    assert!(bad_json.json::<Value>().await.unwrap()["error"].is_string());
    assert!(text.json::<Value>().await.unwrap()["error"].is_string());

    // Pause: buffered work is flushed, then no commits while changes pile up in PostgreSQL.
    let (s, v) = api
        .call("POST", "/api/v1/pipelines/p/pause", Some(TOKEN))
        .await;
    assert_eq!(
        (s, v["requested"].as_str()),
        (StatusCode::OK, Some("paused"))
    );
    wait_for(Duration::from_secs(30), "paused", || async {
        let (_, v) = api.call("GET", "/api/v1/pipelines/p", None).await;
        (v["state"] == "paused").then_some(())
    })
    .await;
    let (s, v) = api.call("GET", "/health/ready", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "not ready while paused");
    assert!(v["reasons"][0].as_str().unwrap().contains("paused"));
    let before = snapshots(&work);
    let rows_before = iceberg_rows(&work, "ns.t").unwrap();
    insert_batches(&db, "t", "g, g", 2000, 20, 100, Duration::ZERO).await;
    db.batch_execute("UPDATE t SET n = n + 1 WHERE id <= 10; DELETE FROM t WHERE id = 50")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(snapshots(&work), before, "no Iceberg commit while paused");
    assert_eq!(iceberg_rows(&work, "ns.t"), Some(rows_before));
    let slot_active: bool = pg
        .client("app")
        .await
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'philotes_p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(slot_active, "the slot is kept while paused");

    let (s, _) = api
        .call("POST", "/api/v1/pipelines/p/resume", Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::OK);
    let want = rows_before + 2000 + 10 + 1;
    wait_rows(&work, "ns.t", want, 60).await;
    verify_state(&work, "ns.t", &pg, "SELECT id, n FROM t WHERE id <> 1000");
    assert!(!agent.log_text().contains(TOKEN), "token in the log");
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_routes_need_the_bearer_token() {
    let (_pg, _db, _work, agent, api) = start().await;
    let protected = [
        ("GET", "/api/v1/config"),
        ("POST", "/api/v1/pipelines/p/pause"),
        ("POST", "/api/v1/pipelines/p/resume"),
        ("POST", "/api/v1/pipelines/p/tables/public.t/snapshot"),
        ("GET", "/api/v1/pipelines/p/dlq"),
    ];
    for (m, p) in protected {
        for bad in [None, Some("wrong"), Some("t0ken-Sup3r-secreT"), Some("")] {
            let (s, v) = api.call(m, p, bad).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {p} with {bad:?}");
            assert!(v["error"].is_string());
        }
        let (s, _) = api.call(m, p, Some(TOKEN)).await;
        assert!(s.is_success(), "{m} {p} with the token: {s}");
    }
    // Probes and /metrics stay open.
    for p in ["/health/live", "/metrics", "/api/v1/pipelines"] {
        assert_eq!(api.call("GET", p, None).await.0, StatusCode::OK, "{p}");
    }
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_add_at_most_one_endpoint_label() {
    let (_pg, _db, _work, agent, api) = start().await;
    let endpoints = |text: &str| -> BTreeSet<String> {
        text.lines()
            .filter(|l| l.starts_with("philotes_api_requests_total{"))
            .filter_map(|l| l.split("endpoint=\"").nth(1))
            .filter_map(|r| r.split('"').next())
            .map(String::from)
            .collect()
    };
    let (_, v) = api.call("GET", "/metrics", None).await;
    let before = endpoints(v.as_str().unwrap());
    for i in 0..1000 {
        let (s, _) = api
            .call("GET", &format!("/random/{i}/path-{}", i * 7), None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    let (_, v) = api.call("GET", "/metrics", None).await;
    let after = endpoints(v.as_str().unwrap());
    let new: Vec<_> = after.difference(&before).collect();
    assert!(new.len() <= 2, "new endpoint labels: {new:?}"); // "unmatched" (+ "/metrics" itself)
    assert!(
        new.iter().all(|e| *e == "unmatched" || *e == "/metrics"),
        "{new:?}"
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_or_schema_violation() {
    let (_pg, db, _work, agent, api) = start().await;
    db.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(1, 50) g")
        .await
        .unwrap();
    let bin = python().parent().unwrap().join("schemathesis");
    let report = tempfile::tempdir().unwrap();
    let junit = report.path().join("junit.xml");
    let out = Command::new(bin)
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", api.base))
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "60", "--seed", "42", "--workers", "1", "--no-color"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache (`.schemathesis/`) goes to the temp dir, not into the source tree.
        .current_dir(report.path())
        .output()
        .expect("schemathesis (pip install schemathesis)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Count generated cases from the summary line, e.g. "Test cases: 612 generated, 612 passed".
    let cases: u64 = stdout
        .lines()
        .find(|l| l.contains("generated"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
        .unwrap_or(0);
    assert!(cases >= 300, "only {cases} cases generated:\n{stdout}");
    eprintln!("schemathesis: {cases} cases");
    assert_eq!(agent.terminate(), Some(0));
}
