"""A LeptonModel of a language model on the real control plane: ``kubectl apply`` refuses
the pairs of task, format, compression method and runtime that have no implementation,
naming the fields (the parser agrees), and the example manifest of SmolLM2 is accepted,
compressed behind its perplexity gate and served: its compression Job and serving
Deployment carry the language model's environment and ports.

Pods are kwok's: the compression pod's result comes from the kwok.lepton.ai annotations
(hack/kwok.yaml) set through spec.compression.podAnnotations.
"""
import copy
import json
import pathlib

import pytest
import yaml

from lepton_operator.core.fields import InvalidSpec
from lepton_operator.model.spec import parse_model
from lepton_trainer import contract

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "leptonmodel-smollm2.yaml"
GATE = {"type": "perplexity", "before": {"perplexity": 11.8}, "after": {"perplexity": 12.2},
        "agreement": 0.93, "passed": True}
RESULT = {"passed": True, "reason": "int8-weight passes the gate", "method": "int8-weight", "gate": GATE,
          "bytes_before": 105000000, "bytes_after": 140000000}


def model_status(k, name):
    return (k.get("leptonmodel", name) or {}).get("status") or {}


def model(name, **spec):
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": name},
            "spec": {"source": {"uri": "pvc://models/llm"}, **spec}}


REFUSED = [
    (model("int8w-predict", compression={"method": "int8-weight"}),
     "spec.compression.method int8-weight is not for spec.task predict"),
    (model("int8-llm", task="text-generation", compression={"method": "int8"}),
     "spec.compression.method int8 is not for spec.task text-generation"),
    (model("vllm-int4", task="text-generation", compression={"method": "int4-weight"}, serving={"runtime": "vllm"}),
     "spec.compression.method int4-weight cannot be served by spec.serving.runtime vllm"),
    (model("gguf-predict", task="predict", source={"uri": "pvc://models/llm", "format": "gguf"}),
     "spec.task predict cannot take spec.source.format gguf"),
    (model("relative-errors", task="text-generation",
           rollout={"analysis": [{"check": "errorRate", "max": 2, "relativeToStable": True}]}),
     "relativeToStable compares a latency check"),
]


@pytest.mark.parametrize("obj, message", REFUSED, ids=[o["metadata"]["name"] for o, _ in REFUSED])
def test_pairs_without_implementation_are_refused_at_apply_naming_the_fields(k, obj, message):
    proc = k.run("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(obj))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    with pytest.raises(InvalidSpec):                      # an API server without CEL: the parser says it
        parse_model(obj["metadata"]["name"], obj["spec"], "img")


def test_the_smollm2_example_is_compressed_behind_its_gate_and_served(k):
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    lm = copy.deepcopy(next(d for d in docs if d["kind"] == "LeptonModel"))
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    k.pvc(claim)                              # bound to a hostPath volume (the local cluster has no provisioner)
    lm["metadata"]["namespace"] = k.ns
    lm["spec"]["compression"]["podAnnotations"] = {"kwok.lepton.ai/exit-code": "0",
                                                   "kwok.lepton.ai/termination-message": json.dumps(RESULT)}
    k.apply(lm)
    name = lm["metadata"]["name"]
    status = k.wait_for("the model Ready", lambda: (s := model_status(k, name)).get("phase") == "Ready" and s,
                        timeout=120)
    rev = status["revisions"]["stable"]
    assert status["revisions"]["stableMethod"] == "int8-weight"
    assert status["compression"]["gate"] == GATE and status["compression"]["state"] == "Succeeded"

    job = k.get("job", f"{name}-compress-{rev}")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_TASK] == "text-generation" and env[contract.ENV_MODEL_FORMAT] == "gguf"
    assert env[contract.ENV_COMPRESSION_METHOD] == "int8-weight"
    assert json.loads(env[contract.ENV_COMPRESSION_EVALUATION]) == {
        "type": "perplexity", "maxPerplexityIncrease": 0.1, "minTokenAgreement": 0.8, "maxNewTokens": 16}

    dep = k.get("deployment", f"{name}-{rev}")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    served = {e["name"]: e.get("value") for e in c["env"]}
    assert served[contract.ENV_TASK] == "text-generation"
    assert (served[contract.ENV_MAX_PROMPT_TOKENS], served[contract.ENV_MAX_OUTPUT_TOKENS],
            served[contract.ENV_MAX_SEQUENCES]) == ("2048", "512", "8")
    assert [p["name"] for p in c["ports"]] == ["http"]                 # no gRPC port for a language model
    assert [p["name"] for p in k.get("service", name)["spec"]["ports"]] == ["http"]
    assert status["url"] == f"http://{name}.{k.ns}.svc:{contract.SERVE_PORT}"
