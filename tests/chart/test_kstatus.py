"""Flux health: the real kstatus library (sigs.k8s.io/cli-utils ``status.Compute``, what
Flux's kustomize-controller uses for ``wait`` and ``healthChecks``) on the same statuses
the Argo CD tests use (tests/chart/test_health.py: built by the operator's own planners
and status code, not hand-written).

The helper is hack/kstatus (a small Go program), built by ``hack/build-tools.sh kstatus``
into the tool cache under a hash of its sources (hack/kstatus_tool.py). When it is missing
the test builds it; when the build fails the test fails with the reason, never skips.

Where kstatus and the Argo CD scripts disagree in a way users notice, the case says so
here and in charts/lepton-operator/health/README.md ("Flux (kstatus)").
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_health import HEALTH, argo, job_statuses, model_statuses

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import kstatus_tool  # noqa: E402  (hack/ is not a package)

pytestmark = pytest.mark.unit
GENERATION = 2

# case -> (the README's words for it, Argo CD health, kstatus status)
EXPECTED = {
    "job-running": ("LeptonJob Running, Ready=True", "Healthy", "Current"),
    "job-succeeded": ("LeptonJob Succeeded, Ready=True", "Healthy", "Current"),
    "job-creating": ("LeptonJob Pending, creating workers (Reconciling=True)", "Progressing", "InProgress"),
    "job-waiting-for-capacity": ("LeptonJob Pending, waiting for nodes (Reconciling=True)", "Progressing",
                                 "InProgress"),
    "job-failed": ("LeptonJob Failed (Stalled=True)", "Degraded", "Failed"),
    "job-invalid": ("LeptonJob invalid spec (Stalled=True, reason InvalidSpec)", "Degraded", "Failed"),
    # A job suspended as its spec asks is as it should be: Ready=True, so a Flux wait ends
    # (kstatus has no "suspended"); Argo CD reads the phase and shows Suspended.
    "job-suspended": ("LeptonJob Suspended (Ready=True: suspended as asked)", "Suspended", "Current"),
    "job-stale-generation": ("LeptonJob Running, observedGeneration < generation", "Progressing", "InProgress"),
    # DISAGREES: before the operator writes any status, kstatus sees no observedGeneration to
    # compare and no conditions, and says Current; Argo CD says Progressing. A Flux wait
    # right after apply can pass before the operator has looked at the job.
    "job-no-status": ("LeptonJob with no status yet", "Progressing", "Current"),
    "model-serving": ("LeptonModel Ready, Ready=True", "Healthy", "Current"),
    "model-deploying": ("LeptonModel Deploying (Reconciling=True)", "Progressing", "InProgress"),
    "model-canary": ("LeptonModel Progressing, canary analysis (Reconciling=True)", "Progressing", "InProgress"),
    "model-source-failed": ("LeptonModel Failed, source job failed (Stalled=True)", "Degraded", "Failed"),
    "model-rolled-back": ("LeptonModel RollingBack (Stalled=True)", "Degraded", "Failed"),
    "model-restarting": ("LeptonModel Degraded, a serving pod restarting, within rollout.progressDeadlineSeconds "
                         "(Reconciling=True)", "Progressing", "InProgress"),
    "model-degraded": ("LeptonModel Degraded past rollout.progressDeadlineSeconds (Stalled=True)", "Degraded",
                       "Failed"),
    # DISAGREES: a rollout paused for a person is Ready=False and nothing in progress, the
    # same shape as a suspended job: kstatus InProgress, Argo CD Suspended.
    "model-paused": ("LeptonModel Paused, waiting for a person (Ready=False)", "Suspended", "InProgress"),
}


def objects() -> dict[str, dict]:
    """Each case as the object a GitOps tool reads: apiVersion, kind, metadata, status."""
    def obj(kind, name, status, generation=GENERATION):
        out = {"apiVersion": "lepton.ai/v1alpha1", "kind": kind,
               "metadata": {"name": name, "namespace": "ns", "generation": generation}}
        if status is not None:
            out["status"] = status
        return out

    out = {f"job-{case}": obj("LeptonJob", f"job-{case}", status) for case, (status, _) in job_statuses().items()}
    out["job-stale-generation"] = obj("LeptonJob", "job-stale-generation", job_statuses()["running"][0],
                                      generation=GENERATION + 1)
    out["job-no-status"] = obj("LeptonJob", "job-no-status", None)
    out.update({f"model-{case}": obj("LeptonModel", f"model-{case}", status)
                for case, (status, _) in model_statuses().items()})
    return out


def helper() -> Path:
    """The built helper; builds it (seconds once the Go module cache is warm) if missing."""
    exe = kstatus_tool.binary()
    if not exe.exists():
        build = subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "kstatus"],
                               capture_output=True, text=True)
        if build.returncode != 0 or not exe.exists():
            pytest.fail(f"the kstatus helper (hack/kstatus, sigs.k8s.io/cli-utils) did not build, so Flux's "
                        f"health verdicts cannot be checked: `bash hack/build-tools.sh kstatus` exited "
                        f"{build.returncode}:\n{build.stderr[-3000:]}", pytrace=False)
    return exe


@functools.lru_cache(maxsize=1)
def verdicts() -> dict[str, dict]:
    """kstatus's verdict for every case, from one run of the helper."""
    objs = objects()
    out = subprocess.run([str(helper())], input=json.dumps(list(objs.values())), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [v["name"] for v in lines] == list(objs)
    return {v["name"]: v for v in lines}


def test_every_case_has_an_expected_verdict():
    assert set(objects()) == set(EXPECTED)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_kstatus_verdict(case):
    verdict = verdicts()[case]
    assert verdict["status"] == EXPECTED[case][2], verdict["message"]


def test_failed_verdicts_carry_the_operators_message():
    assert "backoffLimit" in verdicts()["job-failed"]["message"]
    assert verdicts()["job-invalid"]["message"].startswith("invalid spec:")
    assert "generation is 3" in verdicts()["job-stale-generation"]["message"]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_argocd_column_is_what_the_lua_scripts_say(case):
    obj = objects()[case]
    assert argo(obj["kind"].lower(), obj) == EXPECTED[case][1]


def test_the_readme_table_is_this_table():
    readme = (HEALTH / "README.md").read_text()
    for words, argocd, kstatus in EXPECTED.values():
        assert f"| {words} | {argocd} | {kstatus} |" in readme


def test_the_helper_reads_pretty_printed_objects_as_kubectl_writes_them():
    objs = list(objects().values())[:3]
    text = "\n".join(json.dumps(o, indent=2) for o in objs)       # kubectl get -o json, one after another
    out = subprocess.run([str(helper())], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["name"] for line in out.stdout.splitlines()] == [o["metadata"]["name"] for o in objs]
