//! The bundled stack, checked without a Docker engine: compose and Prometheus configs by their
//! own tools, the collector config's pipelines, the Dockerfile, and every metric the Grafana
//! dashboard queries against a real scrape of an agent that exercised every path.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use philotes::config::{ApiConfig, Config, IcebergConfig, TelemetryConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `PHILOTES_<SECTION>_<KEY>` name that overrides a real key.
fn valid_env_names() -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |prefix: &str, v: serde_json::Value| {
        for k in v.as_object().unwrap().keys() {
            names.push(format!("PHILOTES_{prefix}{}", k.to_uppercase()));
        }
    };
    add("API_", serde_json::to_value(ApiConfig::default()).unwrap());
    add(
        "TELEMETRY_",
        serde_json::to_value(TelemetryConfig::default()).unwrap(),
    );
    let ice = serde_json::to_value(IcebergConfig::default()).unwrap();
    add("ICEBERG_S3_", ice["s3"].clone());
    add("ICEBERG_", ice);
    add(
        "MAINTENANCE_",
        serde_json::to_value(philotes::config::MaintenanceConfig::default()).unwrap(),
    );
    add(
        "HA_",
        serde_json::to_value(philotes::config::HaConfig::default()).unwrap(),
    );
    names
}

#[test]
fn compose_prometheus_and_agent_configs_are_valid() {
    let root = root();
    let (rc, out) = run_cmd(
        Command::new("docker-compose")
            .args(["-f", "compose.yaml", "config", "-q"])
            .current_dir(&root),
    );
    assert_eq!(rc, 0, "docker-compose config: {out}");
    let (rc, out) = run_cmd(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(root.join("prometheus/prometheus.yml")),
    );
    assert_eq!(rc, 0, "promtool check config: {out}");
    // The example alerts: valid, and each fires (or not) on the synthetic series of its test.
    let (rc, out) = run_cmd(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(root.join("prometheus/alerts.yml")),
    );
    assert_eq!(rc, 0, "promtool check rules: {out}");
    let (rc, out) = run_cmd(
        Command::new("promtool")
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(root.join("prometheus")),
    );
    assert_eq!(rc, 0, "promtool test rules: {out}");
    // docs/operations.md shows exactly the rules the stack loads.
    let ops = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let rules = std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap();
    let start = ops
        .find("```yaml\n# Example alerting rules")
        .expect("docs/operations.md shows the alert rules");
    let block = &ops[start + "```yaml\n".len()..];
    let block = &block[..block.find("```").unwrap()];
    assert_eq!(
        block, rules,
        "docs/operations.md's alert rules != prometheus/alerts.yml"
    );
    // The agent config the stack mounts is valid for this agent, with only the defaults set.
    let text = std::fs::read_to_string(root.join("deploy/philotes.toml")).unwrap();
    let cfg = Config::parse(&text, &[]).unwrap_or_else(|e| panic!("deploy/philotes.toml: {e}"));
    assert_eq!(
        cfg.api.listen, "0.0.0.0:8080",
        "the port the Dockerfile exposes"
    );
    assert!(
        cfg.api.token.is_some(),
        "a non-loopback listener needs a token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_collector_and_dockerfile_match_the_agent() {
    // Maintenance at work too, for the "Table health" row.
    // Mirror and changelog, so that the "Mirror tables" row has its series too.
    let (running, addr) = running_numeric_t_with(
        "mode = \"both\"",
        "[maintenance]\ninterval = \"1s\"\nsnapshot_retention = \"1s\"\nretain_last = 1\nmin_input_files = 2\n",
        "",
        &[],
    )
    .await;
    let (_pg, db, work, agent) = running.parts();
    // CDC (every operation), buffer, Iceberg, DLQ and API paths.
    db.batch_execute(
        "INSERT INTO t SELECT g, g FROM generate_series(1, 200) g;
         UPDATE t SET n = n + 1 WHERE id < 20; DELETE FROM t WHERE id > 190;
         INSERT INTO t VALUES (999, 'NaN'); TRUNCATE t; INSERT INTO t VALUES (1, 1);
         ALTER TABLE t ADD COLUMN note text; INSERT INTO t VALUES (2, 2, 'schema changed');",
    )
    .await
    .unwrap();
    agent
        .wait_pipeline("p", 60, "dead letter committed", |v| {
            v["dlq_rows"] == 1
                && v["buffered_events"] == 0
                && v["tables"]["public.t"]["inserts"] == 203
        })
        .await;
    for i in 0..3 {
        db.batch_execute(&format!("INSERT INTO t VALUES ({}, 1)", 2000 + i))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for(Duration::from_secs(60), "maintenance metrics", || async {
        let text = try_scrape(&addr).await?;
        (text.contains("philotes_iceberg_files_removed_total")
            && text.contains("philotes_iceberg_compacted_bytes_total")
            && text.contains("philotes_iceberg_maintenance_duration_seconds_bucket"))
        .then_some(())
    })
    .await;
    for p in ["/api/v1/pipelines", "/api/v1/pipelines/p/tables", "/nope"] {
        let _ = agent.api_json(p).await;
    }
    let scrape_path = work.path().join("scrape.txt");
    std::fs::write(&scrape_path, scrape(&addr).await).unwrap();

    let v = python_json(
        Command::new(python())
            .arg(py_script("check_stack.py"))
            .arg("--root")
            .arg(root())
            .arg("--scrape")
            .arg(&scrape_path)
            .arg("--valid-env")
            .arg(valid_env_names().join(","))
            .arg("--otlp-only")
            .arg(philotes::telemetry::OTLP_ONLY.join(",")),
        "check_stack.py",
    );
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    let checked = v["checked"]["dashboard_metrics"].as_array().unwrap();
    assert!(
        checked.len() >= 15,
        "dashboard queries only {} metrics: {v}",
        checked.len()
    );
    assert!(v["checked"]["services"].as_u64().unwrap() >= 8);
    assert_eq!(agent.terminate(), Some(0));
}

/// `deploy/kubernetes`: the base and the example overlay render with `kubectl kustomize`,
/// pass `kubernetes-validate --strict` (the Kubernetes schemas) and `yamllint`, hang together
/// (`check_k8s.py`), and their agent config is valid for this agent with the Deployment's
/// environment.
#[test]
fn kubernetes_manifests_render_validate_and_configure_the_agent() {
    let root = root();
    let k8s = root.join("deploy/kubernetes");
    let bin = python().parent().unwrap().to_path_buf();
    let (rc, out) = run_cmd(
        Command::new(bin.join("yamllint"))
            .args(["-c", ".yamllint.yaml", "."])
            .current_dir(&k8s),
    );
    assert_eq!(rc, 0, "yamllint: {out}");
    let work = Workdir::new();
    let mut rendered = Vec::new();
    for dir in ["base", "overlays/example"] {
        let out = Command::new("kubectl")
            .args(["kustomize"])
            .arg(k8s.join(dir))
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = work.path().join(format!("{}.yaml", dir.replace('/', "_")));
        std::fs::write(&file, &out.stdout).unwrap();
        let (rc, text) = run_cmd(
            Command::new(bin.join("kubernetes-validate"))
                .args(["--strict", "-k", "1.31.0"])
                .arg(&file),
        );
        assert_eq!(rc, 0, "kubernetes-validate {dir}: {text}");
        // Every kind but the Prometheus Operator's CRD is checked against a schema.
        for kind in ["deployment", "configmap", "service", "poddisruptionbudget"] {
            assert!(
                text.contains(&format!("passed for resource {kind}/")),
                "{dir}: {kind} validated: {text}"
            );
        }
        rendered.push(file);
    }
    let (rc, out) = run_cmd(
        Command::new(python())
            .arg(py_script("check_k8s.py"))
            .args(&rendered),
    );
    assert_eq!(rc, 0, "check_k8s.py: {out}");
    let mut configs = 0;
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let env: Vec<(String, String)> = v["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let cfg = Config::parse(v["config"].as_str().unwrap(), &env)
            .unwrap_or_else(|e| panic!("{}: agent config: {e}", v["file"]));
        assert!(cfg.ha.enabled, "{}", v["file"]);
        assert!(
            cfg.api.token.is_some(),
            "a non-loopback listener needs a token"
        );
        configs += 1;
    }
    assert_eq!(configs, 2, "{out}");
}
