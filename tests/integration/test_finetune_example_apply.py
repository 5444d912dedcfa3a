"""examples/finetune-smollm2 on the real control plane: ``kubectl apply`` of the example as it
is (the PVC, the fine-tuning LeptonJob, the LeptonModel of its output). The model waits for
the job; once the job's workers succeed, the model compresses the job's output directory as a
language model behind its perplexity gate and serves it with the built-in runtime.

Pods are kwok's (hack/kwok.yaml): the workers are made to exit 0, and the compression pod's
result comes from the kwok.lepton.ai annotations set through spec.compression.podAnnotations.
tests/trainer/test_finetune_example.py runs the script itself.
"""
import json
import pathlib

import pytest
import yaml

from lepton_trainer import contract

pytestmark = pytest.mark.integration

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "finetune-smollm2" / "finetune-and-serve.yaml"
GATE = {"type": "perplexity", "before": {"perplexity": 9.1}, "after": {"perplexity": 9.2},
        "agreement": 0.95, "passed": True}
RESULT = {"passed": True, "reason": "int8-weight passes the gate", "method": "int8-weight", "gate": GATE,
          "bytes_before": 538090408, "bytes_after": 220500000}


def model_status(k, name):
    return (k.get("leptonmodel", name) or {}).get("status") or {}


def ready(k, name):
    return next((c for c in model_status(k, name).get("conditions") or [] if c["type"] == "Ready"), {})


def test_the_model_waits_for_the_fine_tuning_job_then_compresses_and_serves_its_output(k):
    docs = {d["kind"]: d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d}
    job, lm = docs["LeptonJob"], docs["LeptonModel"]
    k.pvc(docs["PersistentVolumeClaim"]["metadata"]["name"])   # bound to a hostPath volume
    lm["spec"]["compression"]["podAnnotations"] = {"kwok.lepton.ai/exit-code": "0",
                                                   "kwok.lepton.ai/termination-message": json.dumps(RESULT)}
    for obj in (job, lm):
        obj["metadata"]["namespace"] = k.ns
    k.apply(job, lm)
    job_name, name = job["metadata"]["name"], lm["metadata"]["name"]

    workers = k.wait_workers(job_name, job["spec"]["workers"]["replicas"])
    command = workers[0]["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun" and command[-len(job["spec"]["args"]) - 1:] == [*job["spec"]["command"],
                                                                                   *job["spec"]["args"]]
    waiting = k.wait_for("the model waiting for its job",
                         lambda: (c := ready(k, name)).get("reason") == "WaitingForSource" and c, timeout=60)
    assert f"waiting for LeptonJob {job_name!r} to succeed" in waiting["message"]
    assert model_status(k, name).get("phase") == "Pending" and not k.list("jobs")

    for pod in workers:
        k.kwok_exit(pod["metadata"]["name"], 0)
    done = k.wait_phase(job_name, "Succeeded")
    claim = job["spec"]["output"]["claimName"]
    assert done["outputURI"] == f"pvc://{claim}/{job['spec']['output']['subPath']}"

    status = k.wait_for("the model Ready", lambda: (s := model_status(k, name)).get("phase") == "Ready" and s,
                        timeout=120)
    assert status["compression"]["gate"] == GATE and status["revisions"]["stableMethod"] == "int8-weight"
    rev = status["revisions"]["stable"]
    pod_spec = k.get("job", f"{name}-compress-{rev}")["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[contract.ENV_TASK] == "text-generation" and env[contract.ENV_MODEL_FORMAT] == "huggingface"
    assert env[contract.ENV_COMPRESSION_METHOD] == "int8-weight"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"]
              if "persistentVolumeClaim" in v}
    (root,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims and "subPath" not in m]
    assert set(claims.values()) == {claim}           # the job's claim, read at its output directory
    assert env[contract.ENV_MODEL_DIR] == f"{root}/{job['spec']['output']['subPath']}"
    served = k.get("deployment", f"{name}-{rev}")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in served["env"]}[contract.ENV_TASK] == "text-generation"
