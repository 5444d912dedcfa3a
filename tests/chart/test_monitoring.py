"""Monitoring that ships with the chart: ServiceMonitor, PodMonitors, the PrometheusRule
(checked and unit-tested by promtool), the Grafana dashboard and the `helm test` pod.

The PodMonitors are matched against pods built by the operator's own builders, and every
metric the alerts and the dashboard use is checked against the metrics the operator
(lepton_operator.metrics) and the trainer image (lepton_trainer.contract) really export.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from test_chart import CHART, ROOT, by_kind, helm, render

pytestmark = pytest.mark.unit
RULES = CHART / "files" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "tests" / "chart" / "promtool" / "prometheus-rules.test.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
OPERATOR_JOB = "lepton-operator"     # the job label the ServiceMonitor gives the operator
ALL_ON = ["metrics.serviceMonitor.enabled=true", "metrics.podMonitors.workers.enabled=true",
          "metrics.podMonitors.serving.enabled=true", "metrics.prometheusRule.enabled=true",
          "metrics.grafanaDashboard.enabled=true"]


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian package prometheus; hack/install-system-deps.sh installs it)")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT)


def rule_file() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerts() -> list[dict]:
    return [r for g in rule_file()["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[str]:
    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))
    return [t["expr"] for p in panels(json.loads(DASHBOARD.read_text())["panels"]) for t in p.get("targets", [])]


# --- switches -------------------------------------------------------------------------------

MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


def test_monitoring_is_off_by_default():
    docs = render()
    assert not [d for d in docs if d["kind"] in MONITORING_KINDS]
    assert not [d for d in by_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"].get("labels", {})]


@pytest.mark.parametrize("switch, kind, count", [
    ("metrics.serviceMonitor.enabled=true", "ServiceMonitor", 1),
    ("metrics.podMonitors.workers.enabled=true", "PodMonitor", 1),
    ("metrics.podMonitors.serving.enabled=true", "PodMonitor", 1),
    ("metrics.prometheusRule.enabled=true", "PrometheusRule", 1),
    ("metrics.grafanaDashboard.enabled=true", "ConfigMap", 1),
])
def test_each_switch_renders_its_object_alone(switch, kind, count):
    docs = render(switch)
    assert len(by_kind(docs, kind)) == count
    others = [d["kind"] for d in docs if d["kind"] in MONITORING_KINDS + ("ConfigMap",) and d["kind"] != kind]
    assert not others, others


@pytest.mark.parametrize("typo", ["metrics.prometheusRule.enable=true", "metrics.podMonitors.worker.enabled=true",
                                  "metrics.grafanaDashboard.label.x=y", "tests.enable=false",
                                  "metrics.podMonitors.interval=15"])
def test_the_schema_rejects_typos_in_the_switches(typo):
    out = helm("template", "lepton", str(CHART), "--set", typo, check=False)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, out.stderr


def test_helm_lint_strict_with_every_switch_on():
    args = [a for s in ALL_ON + ["watchNamespaces={team-a}"] for a in ("--set", s)]
    out = helm("lint", "--strict", str(CHART), *args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metrics_port_zero_renders_no_service_and_no_scrape_target():
    docs = render("metrics.port=0", *ALL_ON)
    assert not by_kind(docs, "Service") and not by_kind(docs, "ServiceMonitor")
    assert len(by_kind(docs, "PodMonitor")) == 2      # the workloads' metrics do not depend on the operator's


# --- scrape targets ---------------------------------------------------------------------------

def test_service_monitor_scrapes_the_operator_as_the_job_the_alerts_name():
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=kps")
    (sm,), (svc,) = by_kind(docs, "ServiceMonitor"), by_kind(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == OPERATOR_JOB
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in svc["spec"]["ports"]]
    assert endpoint["honorLabels"] is True, "the operator's per-object namespace label must stay `namespace`"
    down = next(a for a in alerts() if a["alert"] == "LeptonOperatorDown")
    assert f'up{{job="{OPERATOR_JOB}"}}' in down["expr"]


def built_pods() -> dict[str, dict]:
    """Pod templates of everything the operator makes for the quickstart job and model."""
    from lepton_operator.job import objects as jobj
    from lepton_operator.job.spec import parse_job
    from lepton_operator.model import objects as mobj
    from lepton_operator.model.spec import PvcPath, parse_model
    examples = {d["kind"]: d for f in ("quickstart-leptonjob.yaml", "quickstart-leptonmodel.yaml")
                for d in yaml.safe_load_all((ROOT / "examples" / f).read_text()) if d}
    out = {}
    for kind, parse in (("LeptonJob", parse_job), ("LeptonModel", parse_model)):
        ex = examples[kind]
        owner = {"apiVersion": ex["apiVersion"], "kind": kind, "spec": ex["spec"],
                 "metadata": {"name": ex["metadata"]["name"], "namespace": "team-a", "uid": "uid-1", "generation": 1}}
        spec = parse(ex["metadata"]["name"], ex["spec"], "trainer:1")
        if kind == "LeptonJob":
            out["worker"] = jobj.worker_pod(owner, spec, 0)
            out["rendezvous"] = jobj.rendezvous_objects(owner, spec, "trainer:1")[0]
        else:
            src, art = PvcPath("mnist-checkpoints", "out"), PvcPath("mnist-checkpoints", "art")
            out["serving"] = mobj.deployment(owner, spec, "r1", art, 2)["spec"]["template"]
            out["compression"] = mobj.compression_job(owner, spec, "r1", src, art)["spec"]["template"]
    return out


@pytest.mark.parametrize("namespaced", [False, True])
def test_pod_monitors_select_exactly_the_pods_that_serve_those_metrics(namespaced):
    from lepton_trainer import contract
    sets = ["metrics.podMonitors.workers.enabled=true", "metrics.podMonitors.serving.enabled=true",
            "metrics.podMonitors.interval=30s", "metrics.podMonitors.labels.release=kps"]
    if namespaced:
        sets.append("watchNamespaces={team-a,team-b}")
    monitors = {m["metadata"]["name"].rsplit("-", 1)[1]: m for m in by_kind(render(*sets), "PodMonitor")}
    assert set(monitors) == {"worker", "serving"}
    pods = built_pods()
    ports = {"worker": contract.METRICS_PORT, "serving": contract.SERVE_PORT}
    for role, pm in monitors.items():
        spec = pm["spec"]
        assert pm["metadata"]["labels"]["release"] == "kps"
        assert spec["namespaceSelector"] == ({"matchNames": ["team-a", "team-b"]} if namespaced else {"any": True})
        selector = spec["selector"]["matchLabels"]
        selected = [name for name, pod in pods.items() if selector.items() <= pod["metadata"]["labels"].items()]
        assert selected == [role], f"the {role} PodMonitor selects {selected}"
        pod = pods[role]
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["interval"] == "30s" and endpoint["path"] == contract.METRICS_PATH
        declared = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert declared.get(endpoint["port"]) == ports[role], (endpoint, declared)
        assert set(spec["podTargetLabels"]) <= set(pod["metadata"]["labels"])


# --- alerts -------------------------------------------------------------------------------------

def test_rendered_prometheus_rule_holds_the_groups_of_the_rule_file():
    docs = render("metrics.prometheusRule.enabled=true", "metrics.prometheusRule.labels.release=kps")
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"]["groups"] == rule_file()["groups"]


def test_the_issue_asks_for_these_alerts():
    assert {a["alert"] for a in alerts()} == {
        "LeptonOperatorDown", "LeptonJobFailed", "LeptonJobRestartBudgetNearlySpent", "LeptonCanaryRolledBack",
        "LeptonMetricsUnavailable", "LeptonCanaryAnalysisErrors"}
    for a in alerts():
        assert a["labels"]["severity"] in ("warning", "critical") and a["annotations"]["summary"], a["alert"]


def test_promtool_checks_the_rules():
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout, out.stdout


def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_unit_tests_see_every_alert_fire_and_stay_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert [RULE_TESTS.parent / f for f in tests["rule_files"]][0].resolve() == RULES.resolve()
    cases = [c for group in tests["tests"] for c in group["alert_rule_test"]]
    for name in (a["alert"] for a in alerts()):
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name} is never seen firing"
        assert any(not c["exp_alerts"] for c in mine), f"{name} is never seen quiet"


# --- metric names -----------------------------------------------------------------------------

def exported_metrics() -> set[str]:
    """Every series name the operator and the trainer image export."""
    from prometheus_client.metrics import MetricWrapperBase

    from lepton_operator import metrics
    from lepton_trainer import contract
    from lepton_trainer.metrics import TrainingMetrics
    names = {"up"}                    # set by Prometheus on every target
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + s for s in suffixes[family.type]}
    names |= {sample.name for fam in TrainingMetrics(job="j").registry.collect() for sample in fam.samples}
    # The inference server (lepton_trainer.serve needs torch): a counter, two histograms, a gauge.
    names |= {contract.METRIC_SERVE_REQUESTS, contract.METRIC_SERVE_INFLIGHT}
    names |= {h + s for h in (contract.METRIC_SERVE_LATENCY, contract.METRIC_SERVE_BATCH_SIZE)
              for s in suffixes["histogram"]}
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: the identifiers left once strings, label
    matchers, ranges, label lists, numbers, durations, keywords and function calls are gone."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)                # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)                         # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"(?<![a-zA-Z_:])[0-9][0-9.]*([eE][+-]?[0-9]+|[smhdwy]+)?", "0", expr)   # numbers, durations
    return {m.group(0) for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?![a-zA-Z0-9_:])(?!\s*\()", expr)
            if m.group(0).lower() not in PROMQL_WORDS}


def test_metric_name_extraction():
    assert metric_names('sum by (kind) (rate(a_total{x="b c"}[5m])) / ignoring(le) group_left b') == {"a_total", "b"}
    assert metric_names("absent(up{job=\"x\"} == 1) and on (kind) histogram_quantile(0.9, c_bucket)") == {
        "up", "c_bucket"}
    assert metric_names("d offset 5m > 1e3 or sum without (x) (e) * 2.5") == {"d", "e"}


def test_alerts_and_dashboard_use_only_metrics_that_exist():
    known = exported_metrics()
    assert "lepton_operator_reconciles_total" in known and "lepton_train_restarts" in known
    used = {name: where for where, exprs in (("rules", [a["expr"] for a in alerts()]),
                                             ("dashboard", dashboard_exprs()))
            for e in exprs for name in metric_names(e)}
    assert used, "no metric found in the rules and the dashboard"
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"metrics nobody exports: {unknown}"


# --- dashboard -------------------------------------------------------------------------------

def test_dashboard_configmap_holds_the_dashboard_for_grafanas_sidecar():
    docs = render("metrics.grafanaDashboard.enabled=true", "metrics.grafanaDashboard.namespace=monitoring",
                  "metrics.grafanaDashboard.annotations.grafana_folder=Lepton")
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Lepton"}
    (key, text), = cm["data"].items()
    assert key.endswith(".json") and json.loads(text) == json.loads(DASHBOARD.read_text())


def test_dashboard_is_valid_grafana_json():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"] for p in d["panels"] if p["type"] == "row")
    for row in ("Operator", "LeptonJobs", "LeptonModels", "Scaling decisions", "Canary analysis"):
        assert row in titles
    datasources = {v["name"] for v in d["templating"]["list"] if v["type"] == "datasource"}
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"].strip("${}") in datasources, p["title"]
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_every_dashboard_query_parses(tmp_path):
    """promtool parses each query (as a recording rule), Grafana's variables filled in."""
    exprs = dashboard_exprs()
    filled = [re.sub(r"\$__(rate_interval|interval|range)", "5m", e) for e in exprs]
    assert not [e for e in filled if "$" in e], "a query uses a Grafana variable this test does not fill"
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout


# --- helm test --------------------------------------------------------------------------------

def hook_pod(docs: list[dict]) -> dict | None:
    pods = [d for d in by_kind(docs, "Pod") if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(pods) <= 1
    return pods[0] if pods else None


def test_helm_test_pod_checks_the_metrics_service_with_the_operators_image_and_hardening():
    docs = render("metrics.port=9102", "image.tag=1.2.3", "podSecurityContext.runAsUser=70000")
    pod, (dep,), (svc,) = hook_pod(docs), by_kind(docs, "Deployment"), by_kind(docs, "Service")
    assert pod is not None, "helm test has no pod"
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    operator_pod = dep["spec"]["template"]["spec"]
    (op,), (c,) = operator_pod["containers"], pod["spec"]["containers"]
    assert c["image"] == op["image"] == "ghcr.io/lepton-operator/lepton-operator:1.2.3"
    assert c["imagePullPolicy"] == op["imagePullPolicy"]
    assert pod["spec"]["securityContext"] == operator_pod["securityContext"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 70000
    assert c["securityContext"] == op["securityContext"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"][:2] == ["python", "-c"] and pod["spec"]["restartPolicy"] == "Never"
    assert c["resources"]["limits"]["memory"]
    url = {e["name"]: e["value"] for e in c["env"]}["METRICS_URL"]
    assert url == f"http://{svc['metadata']['name']}.lepton-system.svc:{svc['spec']['ports'][0]['port']}/metrics"


@pytest.mark.parametrize("sets", [["tests.enabled=false"], ["metrics.port=0"]])
def test_helm_test_pod_can_be_left_out(sets):
    assert hook_pod(render(*sets)) is None


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("serves_operator_metrics", [True, False])
def test_helm_test_script_passes_on_the_operators_metrics_only(serves_operator_metrics):
    """The pod's Python program, run here against the operator's real /metrics text (a
    fresh operator, before any reconcile) and against some other exporter."""
    from prometheus_client import REGISTRY, generate_latest

    import lepton_operator.metrics  # noqa: F401  (registers the operator's metrics)
    handler = type("H", (_Metrics,), {"body": generate_latest(REGISTRY) if serves_operator_metrics
                                      else b"# HELP other_total x\n# TYPE other_total counter\nother_total 1\n"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (c,) = hook_pod(render())["spec"]["containers"]
        env = {**os.environ, "METRICS_URL": f"http://127.0.0.1:{server.server_address[1]}/metrics", "ATTEMPTS": "2"}
        out = subprocess.run([sys.executable, *c["command"][1:]], env=env, capture_output=True, text=True,
                             timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert (out.returncode == 0) is serves_operator_metrics, out.stdout + out.stderr
    assert ("OK:" in out.stdout) is serves_operator_metrics
