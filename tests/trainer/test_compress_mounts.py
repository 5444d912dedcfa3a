"""The compression program inside the compression Job's own mounts: the operator's
builder (``model.objects.compression_job``) gives the mounts and the paths, and they are
reproduced with bind mounts in a mount namespace of its own (``unshare``), read-only
where the Job's are. The program compresses, writes its artifact through the one
read-write mount, and leaves every other file of the claim as it was.

What this cannot show: the kubelet and the container runtime making those mounts (the
real-node suite runs the Job); here the test creates the artifact directory on the
claim, as the kubelet does for a missing subPath.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lepton_operator.model import objects
from lepton_operator.model.spec import artifact_path, parse_model, parse_uri
from lepton_trainer import contract, modelio
from _models import PYTHON, env, train_mlp

pytestmark = pytest.mark.trainer

OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
         "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1"}}


def namespaces_unavailable() -> str | None:
    if not shutil.which("unshare"):
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"no mount namespace here: {probe.stderr.strip()}"


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every file and directory under ``root`` but ``skip``, with its content's hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p != skip and skip not in p.parents}


def in_the_jobs_mounts(job: dict, claim: Path, root: Path, command: list[str]) -> str:
    """A shell script that mounts ``claim`` as ``job``'s container sees it, under ``root``
    (parents first, as container runtimes do), then runs ``command``."""
    steps = []
    for m in sorted((m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                     if m["name"] == "models"), key=lambda m: m["mountPath"].count("/")):
        source, target = claim / m.get("subPath", ""), root / m["mountPath"].lstrip("/")
        steps.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}")
        if m.get("readOnly"):
            steps.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
    return " && ".join([*steps, shlex.join(command)])


@pytest.mark.parametrize("method", ["auto", "distill"])
def test_the_program_writes_only_its_artifact_through_the_jobs_mounts(tmp_path, method):
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    claim, root = tmp_path / "claim", tmp_path / "root"
    train_mlp(claim / "runs" / "digits", hidden=64)
    (claim / "runs" / "notes.txt").write_text("another run's file\n")
    spec = parse_model("digits", {"source": {"uri": "pvc://models/runs/digits"},
                                  "compression": {"method": method, "maxAccuracyDrop": 0.1}}, "img")
    source = parse_uri(spec.source.uri)
    rev = spec.revision(source.uri)
    artifact = artifact_path(source, "digits", rev)
    job = objects.compression_job(OWNER, spec, rev, source, artifact)
    variables = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    (root / "models").mkdir(parents=True)
    (claim / artifact.path).parent.mkdir(parents=True)             # the kubelet's part for a subPath
    before = snapshot(claim, claim / artifact.path)

    paths = (contract.ENV_MODEL_DIR, contract.ENV_ARTIFACT_DIR, "HOME", "TMPDIR")   # given here, not there

    def inside(path: str) -> str:
        return str(root / path.lstrip("/"))
    command = [PYTHON, "-m", "lepton_trainer.compress", "--model-dir", inside(variables[contract.ENV_MODEL_DIR]),
               "--artifact-dir", inside(variables[contract.ENV_ARTIFACT_DIR]),
               "--termination-message-path", str(tmp_path / "termination-log"), "--latency-iters", "5"]
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           in_the_jobs_mounts(job, claim, root, command)],
                          env={**env(), **{k: v for k, v in variables.items() if k not in paths}},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "termination-log").read_text())
    assert result["passed"] and result[contract.RESULT_ARTIFACT] == inside(variables[contract.ENV_ARTIFACT_DIR])
    modelio.load_model(claim / artifact.path)                      # on the claim, where serving reads it
    assert snapshot(claim, claim / artifact.path) == before        # nothing else written, no staging left
    assert [p.name for p in (claim / artifact.path).parent.iterdir()] == [rev]
