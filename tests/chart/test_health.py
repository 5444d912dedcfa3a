"""Argo CD health checks (charts/lepton-operator/health/*.lua) on the statuses the
operator writes, run by a real Lua 5.1 interpreter (Argo CD's gopher-lua speaks Lua 5.1).

The statuses come from the operator's own planners and status code (job.state,
model.state, core.status), not from hand-written YAML, so a change in what the
operator writes shows here.
"""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_operator.core import status as st
from lepton_operator.core.status import Outcome
from lepton_operator.job import state as js
from lepton_operator.job.spec import parse_job
from lepton_operator.model import state as ms
from lepton_operator.model.spec import parse_model
from lepton_operator.scaling.prometheus import no_data
from planning import plan_job, plan_model

pytestmark = pytest.mark.unit
HEALTH = Path(__file__).resolve().parents[2] / "charts" / "lepton-operator" / "health"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def lua(value) -> str:
    """A Python value as a Lua table literal."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua(k)}] = {lua(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def argo(kind: str, obj: dict) -> str:
    interpreter = shutil.which("lua5.1")
    if interpreter is None:
        pytest.fail("lua5.1 is not installed: run hack/install-system-deps.sh", pytrace=False)
    script = (HEALTH / f"{kind}.lua").read_text()
    program = f"obj = {lua(obj)}\nlocal function health()\n{script}\nend\nlocal hs = health()\nio.write(hs.status)\n"
    out = subprocess.run([interpreter, "-"], input=program, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


# --- LeptonJob --------------------------------------------------------------------------

META = {"name": "j", "namespace": "ns", "uid": "u", "generation": 2}


def job_spec(**kw):
    return parse_job("j", {"workers": {"min": 2, "max": 4, "replicas": 4}, "resources": {"gpus": 1}, **kw}, "img")


def pod(i, phase="Running", **kw):
    return js.PodView(name=f"j-worker-{i}", uid=f"uid-{i}", index=i, phase=phase,
                      node=None if phase == "Pending" else "n1", ready=phase == "Running", **kw)


def job(status, generation=2):
    return {"metadata": {"name": "j", "generation": generation}, "status": status}


def job_statuses():
    running = plan_job(META, job_spec(), {"phase": "Scaling"}, [pod(i) for i in range(4)], 0, NOW).status
    creating = plan_job(META, job_spec(), {}, [], 4, NOW).status
    done = plan_job(META, job_spec(), {"phase": "Running"},
                       [pod(i, "Succeeded") for i in range(4)], 0, NOW).status
    failed = plan_job(META, job_spec(backoffLimit=0), {"phase": "Running"},
                         [pod(0, "Failed", message="exit 1"), pod(1)], 0, NOW).status
    suspended = plan_job(META, job_spec(suspend=True), {"phase": "Running"}, [pod(0)], 0, NOW).status
    invalid = st.apply_outcome({}, Outcome("Pending", "InvalidSpec", "invalid spec: x", stalled=True), 2)
    zero = plan_job(META, job_spec(), {}, [], 0, NOW, no_node_fits=True).status
    return {"running": (running, "Healthy"), "creating": (creating, "Progressing"), "succeeded": (done, "Healthy"),
            "failed": (failed, "Degraded"), "suspended": (suspended, "Suspended"), "invalid": (invalid, "Degraded"),
            "waiting-for-capacity": (zero, "Progressing")}


@pytest.mark.parametrize("case", list(job_statuses()))
def test_leptonjob_health(case):
    status, expected = job_statuses()[case]
    assert status.get("phase") or case == "invalid"
    assert argo("leptonjob", job(status)) == expected


def test_a_spec_the_operator_has_not_seen_is_progressing():
    status, _ = job_statuses()["running"]
    assert argo("leptonjob", job(status, generation=3)) == "Progressing"
    assert argo("leptonjob", {"metadata": {"name": "j", "generation": 1}}) == "Progressing"   # no status yet


# --- LeptonModel ------------------------------------------------------------------------

def model_statuses():
    from test_model_state import SRC, T0, at_analysis, plan, ready, spec

    def applied(p):
        return st.apply_outcome(p.status, p.outcome, 2)

    s = spec()
    rev = s.revision(SRC.uri)
    deploying = plan(s, {}, {})
    serving = plan(s, deploying.status, {rev: ready(4)})
    failed_source = plan_model(s, "m", {}, ms.SourceState(None, "SourceFailed", "job failed", stalled=True),
                               None, None, 4, {}, T0)
    chk = [{"name": "e", "query": "q", "max": 0.1, "inconclusiveLimit": 0}]
    c, status, a, b = at_analysis(chk)
    analysing = plan(c, status, {a: ready(3), b: ready(1)}, now=T0 + 1)
    rolled_back = plan(c, status, {a: ready(3), b: ready(1)}, now=T0 + 1,
                       analysis=[(c.rollout.analysis[0], no_data("q", "empty"))])
    restarting = plan(s, serving.status, {rev: ms.DeploymentView(4, 3, 4, True)})     # a pod restarts
    deadline = s.rollout.progress_deadline_seconds
    degraded = plan(s, restarting.status, {rev: ms.DeploymentView(4, 3, 4, True)}, now=T0 + deadline + 1)
    c2, status2, a2, b2 = at_analysis(chk, onInconclusive="pause")
    paused = plan(c2, status2, {a2: ready(3), b2: ready(1)}, now=T0 + 1,
                  analysis=[(c2.rollout.analysis[0], no_data("q", "empty"))])
    return {"deploying": (applied(deploying), "Progressing"), "serving": (applied(serving), "Healthy"),
            "source-failed": (applied(failed_source), "Degraded"), "canary": (applied(analysing), "Progressing"),
            "rolled-back": (applied(rolled_back), "Degraded"), "paused": (applied(paused), "Suspended"),
            "restarting": (applied(restarting), "Progressing"), "degraded": (applied(degraded), "Degraded")}


@pytest.mark.parametrize("case", ["deploying", "serving", "source-failed", "canary", "rolled-back", "paused"])
def test_leptonmodel_health(case):
    status, expected = model_statuses()[case]
    assert argo("leptonmodel", {"metadata": {"name": "m", "generation": 2}, "status": status}) == expected


def test_the_argocd_snippet_ships_the_same_scripts():
    readme = (HEALTH / "README.md").read_text()
    for kind in ("leptonjob", "leptonmodel"):
        body = (HEALTH / f"{kind}.lua").read_text()
        assert "\n".join("    " + line if line else "" for line in body.splitlines()) in readme
