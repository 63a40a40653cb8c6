"""Structural checks of rendered Kubernetes manifests (`kubectl kustomize` output) that the
schema validators cannot make: the pieces refer to each other correctly and the agent is run as
the issue asks (2 replicas with [ha], probes, secrets only by reference, a writable spool,
non-root with a read-only root filesystem, OTLP, scraping).

Usage: check_k8s.py RENDERED.yaml... ; prints one JSON line per file with the agent config
and the container environment (secret values replaced by placeholders) for the Rust test to
parse with the agent's own config loader; exits 1 with every problem listed otherwise.
"""

import json
import re
import sys
import tomllib

import yaml


def check(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def need(cond, msg):
        if not cond:
            problems.append(f"{path}: {msg}")
        return cond

    deps = by_kind.get("Deployment", [])
    if not need(len(deps) == 1, f"one Deployment, found {len(deps)}"):
        return problems, None
    dep = deps[0]
    spec = dep["spec"]
    need(spec.get("replicas") == 2, "replicas: 2 (a leader and a standby)")
    pod = spec["template"]
    labels = pod["metadata"].get("labels", {})
    ann = pod["metadata"].get("annotations", {})
    need(ann.get("prometheus.io/scrape") == "true", "prometheus.io/scrape annotation")
    need(ann.get("prometheus.io/path") == "/metrics", "prometheus.io/path annotation")
    psec = pod["spec"].get("securityContext", {})
    need(psec.get("runAsNonRoot") is True, "pod runAsNonRoot")
    containers = pod["spec"]["containers"]
    c = containers[0]
    csec = c.get("securityContext", {})
    need(csec.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    need(csec.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    need("ALL" in csec.get("capabilities", {}).get("drop", []), "capabilities drop ALL")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    need(ann.get("prometheus.io/port") == str(ports.get("http")), "scrape port = the http port")
    need(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/health/live", "liveness /health/live")
    need(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/health/ready", "readiness /health/ready")
    res = c.get("resources", {})
    need(res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), "memory request and limit")
    env = {}
    for e in c.get("env", []):
        name = e["name"]
        if "value" in e:
            secretish = re.search(r"PASSWORD|TOKEN|SECRET", name)
            need(not secretish, f"env {name} holds a secret literally: use a secretKeyRef")
            env[name] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[name] = f"secret-{name.lower()}"
        else:
            env[name] = f"field-{name.lower()}"
    need("OTEL_EXPORTER_OTLP_ENDPOINT" in env, "OTEL_EXPORTER_OTLP_ENDPOINT points at a collector")
    for key in ("POSTGRES_PASSWORD", "PHILOTES_API_TOKEN"):
        need(key in env and env[key].startswith("secret-"), f"{key} from a Secret")

    vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    cm_names = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    config_mount = mounts.get("/etc/philotes")
    config = None
    if need(config_mount is not None, "config mounted at /etc/philotes"):
        vol = vols.get(config_mount["name"], {})
        cm = cm_names.get(vol.get("configMap", {}).get("name"))
        if need(cm is not None, "the config volume refers to a rendered ConfigMap"):
            config = cm["data"].get("philotes.toml")
            need(config is not None, "the ConfigMap holds philotes.toml")
    if config:
        cfg = tomllib.loads(config)
        need(cfg.get("ha", {}).get("enabled") is True, "[ha] enabled in the config")
        listen = cfg.get("api", {}).get("listen", "")
        need(listen.endswith(f":{ports.get('http')}"), f"api.listen {listen} on the http port")
        for var in re.findall(r"\$\{([A-Za-z0-9_]+)\}", json.dumps(cfg)):
            need(var in env, f"${{{var}}} in the config is set in the container's env")
        for p in cfg.get("pipelines", []):
            spool = p.get("spool_dir", env.get("TMPDIR"))
            m = mounts.get(spool)
            ok = m is not None and "emptyDir" in vols.get(m["name"], {}) and not m.get("readOnly")
            need(ok, f"pipeline {p.get('name')}: spool_dir {spool} is a writable volume")

    def selects(sel, what):
        match = sel.get("matchLabels", {})
        need(match and all(labels.get(k) == v for k, v in match.items()), f"{what} selects the agent's pods")

    for pm in by_kind.get("PodMonitor", []):
        selects(pm["spec"]["selector"], "PodMonitor")
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            need(ep.get("port") in ports, f"PodMonitor port {ep.get('port')} is a container port")
            need(ep.get("path", "/metrics") == "/metrics", "PodMonitor path /metrics")
    need(by_kind.get("PodMonitor"), "a PodMonitor")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if need(pdbs, "a PodDisruptionBudget"):
        selects(pdbs[0]["spec"]["selector"], "PodDisruptionBudget")
    for svc in by_kind.get("Service", []):
        sel = svc["spec"].get("selector", {})
        need(all(labels.get(k) == v for k, v in sel.items()), "the Service selects the agent's pods")
    return problems, {"file": path, "config": config, "env": env}


def main():
    problems, out = [], []
    for path in sys.argv[1:]:
        p, o = check(path)
        problems += p
        if o:
            out.append(o)
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
