#!/usr/bin/env python3
"""Static checks of the bundled stack (no Docker engine, Grafana or Tempo exists here).

- compose.yaml: every service has a pinned image tag (or is built here) and a healthcheck;
  every PHILOTES_* variable given to the agent names a real config key.
- otel-collector/config.yaml: every pipeline references only defined components; the
  spanmetrics connector (exemplars on, dimensions source and table) is an exporter of a traces
  pipeline and a receiver of a metrics pipeline that ends in the OpenMetrics exporter.
- grafana: every metric in every PromQL expression appears in a real scrape of the agent, with
  the labels the expression filters on (or is a semantic-convention name the agent sends over
  OTLP only, or a metric the connector produces, filtered on labels it has and span names the
  agent emits); a panel asking for exemplars queries only the connector's metrics (the agent's
  own histograms carry none); every datasource uid a panel names is provisioned.
- Dockerfile: binary path, non-root user and exposed port match the agent and its config.
Prints one JSON object: {"problems": [...], "checked": {...}}.
"""
import argparse
import json
import re
import sys

import yaml


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def check_compose(root, problems, valid_env):
    c = load_yaml(f"{root}/compose.yaml")
    services = c.get("services", {})
    for name, svc in services.items():
        image = svc.get("image")
        if "build" not in svc:
            if not image or ":" not in image or image.endswith(":latest"):
                problems.append(f"compose: service {name} has no pinned image tag ({image})")
        if "healthcheck" not in svc:
            problems.append(f"compose: service {name} has no healthcheck")
    agent = services.get("philotes")
    if agent is None:
        problems.append("compose: no philotes service")
        return len(services)
    env = agent.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    for k in env:
        if k.startswith("PHILOTES_") and k not in valid_env:
            problems.append(f"compose: philotes env {k} matches no config key")
    return len(services)


def check_collector(root, problems):
    c = load_yaml(f"{root}/otel-collector/config.yaml")
    defined = {kind: set((c.get(kind) or {}).keys()) for kind in ("receivers", "processors", "exporters")}
    connectors = set((c.get("connectors") or {}).keys())
    # A connector is the exporter of one pipeline and the receiver of another.
    defined["receivers"] |= connectors
    defined["exporters"] |= connectors
    pipelines = c.get("service", {}).get("pipelines", {})
    if not pipelines:
        problems.append("collector: no pipelines")
    for pname, p in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []) or []:
                if comp not in defined[kind]:
                    problems.append(f"collector: pipeline {pname} uses undefined {kind[:-1]} {comp}")
    for need in ("metrics", "traces"):
        if not any(k == need or k.startswith(need + "/") for k in pipelines):
            problems.append(f"collector: no {need} pipeline")
    return sorted(pipelines)


def signal_of(pname):
    return pname.split("/")[0]


def check_spanmetrics(root, problems):
    """The connector's config and wiring; returns the metric names and labels it produces."""
    c = load_yaml(f"{root}/otel-collector/config.yaml")
    conns = c.get("connectors") or {}
    names = [n for n in conns if n == "spanmetrics" or n.startswith("spanmetrics/")]
    if not names:
        problems.append("collector: no spanmetrics connector")
        return {}, set()
    name = names[0]
    cfg = conns[name] or {}
    if not (cfg.get("exemplars") or {}).get("enabled"):
        problems.append(f"collector: {name} has exemplars off")
    dims = {d.get("name") for d in cfg.get("dimensions") or []}
    for need in ("source", "table"):
        if need not in dims:
            problems.append(f"collector: {name} lacks dimension {need}")
    pipelines = c.get("service", {}).get("pipelines", {})
    fed_by = [p for p, v in pipelines.items() if signal_of(p) == "traces" and name in (v.get("exporters") or [])]
    feeds = [p for p, v in pipelines.items() if signal_of(p) == "metrics" and name in (v.get("receivers") or [])]
    if not fed_by:
        problems.append(f"collector: no traces pipeline exports to {name}")
    if not feeds:
        problems.append(f"collector: no metrics pipeline receives from {name}")
    exporters = c.get("exporters") or {}
    for p in feeds:
        prom = [e for e in pipelines[p].get("exporters") or [] if e.split("/")[0] == "prometheus"]
        if not prom:
            problems.append(f"collector: pipeline {p} (span metrics) has no prometheus exporter")
        for e in prom:
            if not (exporters.get(e) or {}).get("enable_open_metrics"):
                problems.append(f"collector: exporter {e} does not serve OpenMetrics (exemplars are dropped)")
    ns = (cfg.get("namespace") or "traces.span.metrics").replace(".", "_")
    unit = ((cfg.get("histogram") or {}).get("unit") or "ms")
    unit_word = {"ms": "milliseconds", "s": "seconds"}[unit]
    duration = f"{ns}_duration_{unit_word}"
    produced = {
        f"{ns}_calls_total": "counter",
        f"{duration}_bucket": "histogram",
        f"{duration}_sum": "histogram",
        f"{duration}_count": "histogram",
    }
    labels = dims | {"service_name", "span_name", "span_kind", "status_code", "le", "job", "instance"}
    return produced, labels


PROMQL_WORDS = {
    "sum", "rate", "increase", "max", "min", "avg", "count", "by", "without", "histogram_quantile",
    "irate", "topk", "bottomk", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "clamp_min", "clamp_max", "abs", "delta", "deriv", "le", "vector", "scalar",
    "time", "label_values", "offset", "bool", "quantile", "stddev", "absent", "changes",
    "resets", "sort", "sort_desc", "round", "ceil", "floor", "max_over_time", "min_over_time",
    "avg_over_time", "sum_over_time", "count_over_time", "last_over_time", "idelta",
}


def parse_scrape(path):
    series = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', line.split(" ")[0]))
            series.setdefault(name, set()).update(labels)
    return series


def exprs_of(dashboard):
    out = []

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((p.get("title"), t["expr"]))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if isinstance(q, str) and ("(" in q or "{" in q):
            out.append((f"variable {v.get('name')}", q))
    return out


def agent_span_names(root):
    import glob

    names = set()
    for path in glob.glob(f"{root}/agent/src/**/*.rs", recursive=True):
        text = open(path).read()
        names.update(re.findall(r'info_span!\(\s*(?:parent:\s*None,\s*)?"([a-z_.]+)"', text))
    return names


def check_dashboards(root, scrape, problems, otlp_only, span_metrics, span_labels):
    import glob

    series = parse_scrape(scrape)
    spans = agent_span_names(root)
    ds = load_yaml(f"{root}/grafana/provisioning/datasources/datasources.yaml")
    uids = {d.get("uid") for d in ds.get("datasources", [])}
    checked = set()
    for path in glob.glob(f"{root}/grafana/dashboards/*.json"):
        with open(path) as f:
            d = json.load(f)

        def walk(panels):
            for p in panels:
                yield p
                yield from walk(p.get("panels", []))

        for p in walk(d.get("panels", [])):
            for holder in [p] + p.get("targets", []):
                src = holder.get("datasource")
                if isinstance(src, dict) and src.get("uid") and not src["uid"].startswith("$"):
                    if src["uid"] not in uids:
                        problems.append(f"{path}: panel {p.get('title')} names datasource {src['uid']} that is not provisioned")
        for p in walk(d.get("panels", [])):
            for t in p.get("targets", []):
                if (t.get("exemplar") or t.get("exemplars")) and t.get("expr"):
                    used = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", t["expr"]))
                    if not used or not used <= set(span_metrics):
                        problems.append(f"{path}: panel {p.get('title')!r} asks for exemplars of {sorted(used)}, which carry none (only the connector's metrics do)")
        for title, expr in exprs_of(d):
            for m in re.finditer(r'span_name\s*=~?\s*"([^"]*)"', expr):
                if m.group(1) not in spans:
                    problems.append(f"{path}: panel {title!r} filters on span {m.group(1)}, which the agent never emits")
            # Drop label matchers' values and durations, then find identifiers before { ( [ or end.
            stripped = re.sub(r'"[^"]*"', '""', expr)
            for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", stripped):
                name, sel = m.group(1), m.group(2)
                if name in span_metrics:
                    checked.add(name)
                    for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*[=!~]", sel or ""):
                        if label not in span_labels:
                            problems.append(f"{path}: panel {title!r} filters {name} on label {label}, which the connector does not produce")
                    continue
                if name in PROMQL_WORDS or not re.match(r"(philotes|process)_", name):
                    continue
                if name in otlp_only:
                    checked.add(name)
                    continue
                checked.add(name)
                if name not in series:
                    problems.append(f"{path}: panel {title!r} queries {name}, absent from a real scrape")
                    continue
                for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*[=!~]", sel or ""):
                    if label != "job" and label not in series[name]:
                        problems.append(f"{path}: panel {title!r} filters {name} on label {label}, which it does not have")
    return sorted(checked)


def check_dockerfile(root, problems, listen_port):
    text = open(f"{root}/Dockerfile").read()
    if "/usr/local/bin/philotes" not in text:
        problems.append("Dockerfile: binary is not installed at /usr/local/bin/philotes")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1] in ("root", "0"):
        problems.append("Dockerfile: final stage does not run as a non-root user")
    exposed = re.findall(r"^EXPOSE\s+(\d+)", text, re.M)
    if str(listen_port) not in exposed:
        problems.append(f"Dockerfile: EXPOSE {exposed} does not include the api port {listen_port}")
    if not re.search(r"cargo build --release --locked --bin philotes", text):
        problems.append("Dockerfile: build step is not `cargo build --release --locked --bin philotes`")
    if "/health/ready" not in text:
        problems.append("Dockerfile: no healthcheck on /health/ready")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--scrape", required=True)
    ap.add_argument("--valid-env", required=True, help="comma-separated PHILOTES_* names")
    ap.add_argument("--api-port", type=int, default=8080)
    ap.add_argument("--otlp-only", default="", help="comma-separated families only OTLP carries")
    a = ap.parse_args()
    problems = []
    span_metrics, span_labels = check_spanmetrics(a.root, problems)
    otlp_only = set(filter(None, a.otlp_only.split(",")))
    checked = {
        "services": check_compose(a.root, problems, set(a.valid_env.split(","))),
        "collector_pipelines": check_collector(a.root, problems),
        "span_metrics": sorted(span_metrics),
        "dashboard_metrics": check_dashboards(a.root, a.scrape, problems, otlp_only, span_metrics, span_labels),
    }
    check_dockerfile(a.root, problems, a.api_port)
    json.dump({"problems": problems, "checked": checked}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
