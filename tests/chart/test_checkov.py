"""checkov on what the project puts into a cluster: the chart rendered with its default
values, and the children the operator's own builders make for the quickstart LeptonJob
(with its defaults: NetworkPolicies on, the store's token Secret, a capacity request),
the same job in ``faultTolerance: perStep`` (a Lighthouse instead of the store), and the
quickstart LeptonModel (with ``spec.networkPolicy`` on, which is opt-in for models; its
compression Job, Deployment, Services, HTTPRoute and an ``engine: hpa`` autoscaler).

Every failed check must be on the allowlist below, each entry with its reason; the same
entries are explained in the chart README under "Scanner findings". An entry that no
longer matches a finding fails the test too, so the list only shrinks. The scan's
summary (checks passed, failed without a reason, and each finding that stays with its
reason) goes to the ``checkov`` section of bench/results/security.json.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lepton-operator"
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "bench"))
import localcluster  # noqa: E402
import security  # noqa: E402

pytestmark = pytest.mark.unit
NAMESPACE = "team-a"

# Training workers: their pods, and the PodTemplate of a capacity request for them.
WORKERS = r"Pod\.team-a\.mnist-(mlp|ft)-worker-\d+|PodTemplate\.team-a\.mnist-mlp-capacity"
# (check id, regular expression matched against checkov's resource "Kind.namespace.name")
# -> why the finding stays. Keep it short: fix a finding rather than list it.
ALLOWLIST: dict[tuple[str, str], str] = {
    ("CKV_K8S_43", r".*"):
        "images are tags by default; pin them with image.digest (chart) or repo@sha256:... in trainerImage "
        "and in a spec, which pass unchanged",
    ("CKV_K8S_15", r".*"):
        "pull policy IfNotPresent by default (a pinned image never changes); image.pullPolicy, "
        "trainerImagePullPolicy and a spec's imagePullPolicy set Always where wanted",
    ("CKV_K8S_38", r"Deployment\.lepton-system\.lepton-lepton-operator"):
        "the operator talks to the API server with its ServiceAccount token",
    ("CKV2_K8S_6", r"Pod\.lepton-system\.lepton-lepton-operator(\..*)?"):
        "the chart ships no NetworkPolicy for the operator: its ingress is /metrics and /healthz only",
    ("CKV2_K8S_6", r"Pod\.lepton-system\.lepton-lepton-operator-test-metrics"):
        "the helm test pod runs once and accepts no connections",
    ("CKV_K8S_8", r"Pod\.lepton-system\.lepton-lepton-operator-test-metrics"):
        "the helm test pod runs once: nothing to probe",
    ("CKV_K8S_9", r"Pod\.lepton-system\.lepton-lepton-operator-test-metrics"):
        "the helm test pod runs once: nothing to probe",
    ("CKV_K8S_8", WORKERS):
        "no safe liveness probe: torchrun is the main process (a dead agent ends the pod), and a liveness "
        "kill of a restartPolicy Never worker waiting in rendezvous would count as a failure",
    ("CKV_K8S_9", WORKERS):
        "nothing routes traffic to workers by readiness; their one port (metrics) is up only while the "
        "process group trains",
}


def checkov_bin() -> str:
    """checkov from its own virtualenv (hack/setup-python.sh makes .venv/checkov), else from PATH."""
    beside = Path(__file__).resolve().parents[2] / ".venv" / "checkov" / "bin" / "checkov"
    found = str(beside) if beside.exists() else shutil.which("checkov")
    if not found:
        pytest.fail("checkov is not installed: run hack/setup-python.sh (it installs checkov into .venv/checkov)", pytrace=False)
    return found


DIGEST = "sha256:" + "0123456789abcdef" * 4
TRAINER = "ghcr.io/lepton-operator/lepton-trainer:0.1.0"


def chart_documents(*sets: str) -> list[dict]:
    """``helm template`` with the default values and ``sets``, as a user runs it (no other flags)."""
    helm = localcluster.tool_path("helm")
    if not helm.exists():
        pytest.fail(f"helm is not built: run hack/build-tools.sh ({helm} missing)", pytrace=False)
    args = [str(helm), "template", "lepton", str(CHART), "-n", "lepton-system"]
    for setting in sets:
        args += ["--set", setting]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def example(name: str, kind: str) -> dict:
    return next(d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d and d["kind"] == kind)


OPERATOR_LABELS = [("app.kubernetes.io/name", "lepton-operator"), ("app.kubernetes.io/instance", "lepton")]


def job_documents(name: str, spec: dict, trainer: str) -> list[dict]:
    """A LeptonJob's children as the operator makes them for ``spec`` (its defaults unless
    ``spec`` says otherwise), in namespace NAMESPACE with the chart's operator identity."""
    from lepton_operator.job import objects as job_objects
    from lepton_operator.job.spec import parse_job

    lj = example("quickstart-leptonjob.yaml", "LeptonJob")
    owner = {"apiVersion": lj["apiVersion"], "kind": lj["kind"],
             "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "generation": 1}}
    job = parse_job(name, spec, trainer, namespace=NAMESPACE)
    assert job.network_policy.enabled, "a job is isolated by default"
    docs = [job_objects.worker_pod(owner, job, 0), *job_objects.rendezvous_objects(owner, job, trainer),
            job_objects.workers_service(owner), *job_objects.network_policies(owner, job, "lepton-system",
                                                                              OPERATOR_LABELS)]
    if not job.per_step:
        docs += [job_objects.rendezvous_secret(owner, "token"), *job_objects.capacity_request(owner, job, 2)]
    return docs


def child_documents(trainer: str = TRAINER) -> list[dict]:
    """The quickstart job's (also in perStep mode) and model's children, built with
    ``trainer`` as the operator's trainer image."""
    from lepton_operator.model import objects as model_objects
    from lepton_operator.model.spec import artifact_path, parse_model, parse_uri

    lj = example("quickstart-leptonjob.yaml", "LeptonJob")
    docs = [*job_documents(lj["metadata"]["name"], lj["spec"], trainer),
            *job_documents("mnist-ft", {**lj["spec"], "faultTolerance": "perStep"}, trainer)]

    lm = example("quickstart-leptonmodel.yaml", "LeptonModel")
    owner = {"apiVersion": lm["apiVersion"], "kind": lm["kind"],
             "metadata": {"name": lm["metadata"]["name"], "namespace": NAMESPACE, "uid": "uid-model"}}
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    model = parse_model(lm["metadata"]["name"],
                        {**lm["spec"], "networkPolicy": {"enabled": True, "ingressFrom": peers},
                         "autoscaling": {**lm["spec"]["autoscaling"], "engine": "hpa"}}, trainer, namespace=NAMESPACE)
    source = parse_uri("pvc://mnist-checkpoints/mnist-mlp/output")
    revision = model.revision(source.uri)
    artifact = artifact_path(source, lm["metadata"]["name"], revision)
    deployment = model_objects.deployment(owner, model, revision, artifact, 2)
    docs += [model_objects.compression_job(owner, model, revision, source, artifact), deployment,
             model_objects.service(owner), *model_objects.network_policies(owner, model),
             model_objects.revision_service(owner, revision), model_objects.http_route(owner, [(revision, 100)]),
             model_objects.hpa(owner, model.autoscaling, deployment["metadata"]["name"])]
    return docs


def checkov_report(directory: Path) -> tuple[list[dict], dict]:
    """checkov's failed checks for the manifests in ``directory``, and its summary
    (``passed`` summed over its reports, ``checkov_version``)."""
    # Offline: no policy download, no guideline mapping, no update check.
    proc = subprocess.run([checkov_bin(), "-d", str(directory), "--framework", "kubernetes", "-o", "json",
                           "--compact", "--quiet", "--skip-download"], capture_output=True, text=True,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE"})
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in (r.get("results") or {}).get("failed_checks", [])]
    assert reports and (failed or any(r.get("summary", {}).get("passed") for r in reports)), \
        f"checkov scanned nothing: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    summaries = [r.get("summary") or {} for r in reports]
    return failed, {"passed": sum(s.get("passed", 0) for s in summaries),
                    "checkov_version": next((s["checkov_version"] for s in summaries if "checkov_version" in s), "")}


def allowed(check: dict) -> tuple[str, str] | None:
    return next((key for key in ALLOWLIST
                 if key[0] == check["check_id"] and re.fullmatch(key[1], check["resource"])), None)


def scan(directory: Path, chart: list[dict], children: list[dict]) -> tuple[list[dict], dict]:
    (directory / "chart.yaml").write_text(yaml.safe_dump_all(chart, sort_keys=False))
    (directory / "children.yaml").write_text(yaml.safe_dump_all(children, sort_keys=False))
    return checkov_report(directory)


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> list[dict]:
    """The scan of the defaults; its summary is written to bench/results/security.json
    (the same content for the same findings, so a clean run changes nothing there)."""
    failed, summary = scan(tmp_path_factory.mktemp("checkov"), chart_documents(), child_documents())
    security.update({"checkov": security.checkov(
        version=summary["checkov_version"], passed=summary["passed"],
        findings=[(c["check_id"], c["check_name"], c["resource"], ALLOWLIST.get(allowed(c))) for c in failed])})
    return failed


def test_checkov_finds_nothing_beyond_the_allowlist(findings):
    unexplained = sorted({f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in findings if not allowed(c)})
    assert unexplained == [], "fix these, or add them to ALLOWLIST and the chart README with a reason"


def test_every_allowlist_entry_still_matches_a_finding(findings):
    used = {allowed(c) for c in findings}
    assert [key for key in ALLOWLIST if key not in used] == [], "drop the entries that no longer match"


def test_the_chart_readme_explains_every_allowlist_entry():
    readme = (CHART / "README.md").read_text()
    assert "## Scanner findings" in readme
    section = readme.split("## Scanner findings", 1)[1].split("\n## ", 1)[0]
    missing = sorted({check for check, _ in ALLOWLIST if f"`{check}`" not in section})
    assert missing == [], f"explain {missing} under 'Scanner findings' in {CHART / 'README.md'}"


def test_pinned_images_pass_the_digest_check(tmp_path):
    """The CKV_K8S_43 entry holds only for tags: a digest in the chart's image.digest and in
    the trainer image reaches every container unchanged."""
    trainer = f"ghcr.io/lepton-operator/lepton-trainer@{DIGEST}"
    found, _ = scan(tmp_path, chart_documents(f"image.digest={DIGEST}", f"trainerImage={trainer}"),
                    child_documents(trainer))
    assert [c["resource"] for c in found if c["check_id"] == "CKV_K8S_43"] == []
