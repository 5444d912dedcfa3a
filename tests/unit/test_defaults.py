"""Spec defaults: every ``default:`` of the CRDs equals what the parser gives for that field.

The defaults live once in Python, as the field defaults of the spec dataclasses, which the
parsers read. The API server fills the CRD's defaults in before the operator sees an
object, so where the two differed the operator would behave differently on a server that
applies the schema than on one (or in a test) that does not. Each CRD default is looked up
in a table of CRD path -> parsed attribute; a CRD default missing from the table fails,
so a new one cannot go unchecked.
"""
import dataclasses
import pathlib

import pytest
import yaml

from lepton_trainer import contract
from lepton_operator.core.fields import InvalidSpec, NetworkPolicySpec, Resources, default
from lepton_operator.job import spec as job_spec
from lepton_operator.job.spec import parse_job
from lepton_operator.model import spec as model_spec
from lepton_operator.model.spec import parse_model

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = "trainer:1"


def crd_defaults(file: str) -> dict[str, object]:
    """``{path: default}`` of every ``default:`` in every version's openAPIV3Schema; a path
    names properties with dots and an array's items with ``[]`` (``spec.rollout.steps[].x``)."""
    crd = yaml.safe_load((ROOT / "crds" / file).read_text())
    found: dict[str, object] = {}

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if "default" in node:
            found[path] = node["default"]
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key) or ():
                walk(sub, path)

    for version in crd["spec"]["versions"]:
        walk(version["schema"]["openAPIV3Schema"], "")
    return found


def attribute(obj, path: str):
    """``obj.a.b`` for ``path`` ``"a.b"``; a number indexes a tuple (``"steps.0.x"``)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def dataclass_default(obj, path: str):
    """The field default of the dataclass that holds ``path``'s last attribute, or MISSING."""
    head, _, name = path.rpartition(".")
    holder = attribute(obj, head) if head else obj
    if not dataclasses.is_dataclass(holder):
        return dataclasses.MISSING
    field = {f.name: f for f in dataclasses.fields(holder)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


# CRD path -> (the smallest spec that makes the parser produce the field, parsed attribute).
JOB = {
    "spec.workers.min": ({}, "workers.min"),
    "spec.elastic.maxRestarts": ({}, "elastic.max_restarts"),
    "spec.elastic.joinTimeoutSeconds": ({}, "elastic.join_timeout"),
    "spec.elastic.lastCallTimeoutSeconds": ({}, "elastic.last_call_timeout"),
    "spec.elastic.closeTimeoutSeconds": ({}, "elastic.close_timeout"),
    "spec.elastic.keepAliveIntervalSeconds": ({}, "elastic.keep_alive_interval"),
    "spec.elastic.keepAliveMaxAttempts": ({}, "elastic.keep_alive_max_attempts"),
    "spec.backoffLimit": ({}, "backoff_limit"),
    "spec.suspend": ({}, "suspend"),
    "spec.capacity.mode": ({}, "capacity.mode"),
    "spec.capacity.timeoutSeconds": ({}, "capacity.timeout_seconds"),
    "spec.capacity.onTimeout": ({}, "capacity.on_timeout"),
    "spec.checkpoint.path": ({"checkpoint": {"claimName": "data"}}, "checkpoint.path"),
    "spec.output.path": ({"output": {"claimName": "data"}}, "output.path"),
    "spec.networkPolicy.enabled": ({"networkPolicy": {}}, "network_policy.enabled"),
    "spec.autoscaling.efficiency": ({"autoscaling": {}}, "autoscaling.efficiency"),
    "spec.autoscaling.cooldownSeconds": ({"autoscaling": {}}, "autoscaling.cooldown_seconds"),
    "spec.autoscaling.step": ({"autoscaling": {}}, "autoscaling.step"),
    "spec.autoscaling.intervalSeconds": ({"autoscaling": {}}, "autoscaling.interval_seconds"),
}

MODEL_BASE = {"source": {"uri": "pvc://models/digits"}}
STEP = {"rollout": {"steps": [{"weight": 50}]}}
CHECK = {"rollout": {"analysis": [{"query": "sum(errors)", "max": 1}]}}
AUTOSCALING = {"autoscaling": {"target": 5}}
LLM = {"task": "text-generation"}
# compression.evaluation is passed on as written, so its type default shows in which
# metrics the parser accepts without a type (see evaluation_type below). It depends on
# spec.task, so the CRD gives none (test_the_gate_type_defaults_by_task).
EVALUATION = "evaluation type"
MODEL = {
    "spec.compression.method": ({}, "compression.method"),
    "spec.compression.backoffLimit": ({}, "compression.backoff_limit"),
    "spec.compression.activeDeadlineSeconds": ({}, "compression.active_deadline_seconds"),
    "spec.compression.latencyBudgetSeconds": ({}, "compression.latency_budget_seconds"),
    "spec.serving.replicas": ({}, "serving.replicas"),
    "spec.serving.runtime": ({}, "serving.runtime"),
    "spec.serving.generation.maxPromptTokens": (LLM, "serving.generation.max_prompt_tokens"),
    "spec.serving.generation.maxOutputTokens": (LLM, "serving.generation.max_output_tokens"),
    "spec.serving.generation.maxSequences": (LLM, "serving.generation.max_sequences"),
    "spec.serving.batching.maxBatchSize": ({}, "serving.max_batch_size"),
    "spec.serving.batching.maxBatchDelayMs": ({}, "serving.max_batch_delay_ms"),
    "spec.serving.admission.maxConcurrentRequests": ({}, "serving.admission.max_concurrent_requests"),
    "spec.serving.admission.maxQueuedRequests": ({}, "serving.admission.max_queued_requests"),
    "spec.serving.admission.queueTimeoutMs": ({}, "serving.admission.queue_timeout_ms"),
    "spec.networkPolicy.enabled": ({"networkPolicy": {}}, "network_policy.enabled"),
    "spec.rollout.strategy": ({}, "rollout.strategy"),
    "spec.rollout.steps[].pauseSeconds": (STEP, "rollout.steps.0.pause_seconds"),
    "spec.rollout.analysis[].count": (CHECK, "rollout.analysis.0.count"),
    "spec.rollout.analysis[].intervalSeconds": (CHECK, "rollout.analysis.0.interval_seconds"),
    "spec.rollout.analysis[].failureLimit": (CHECK, "rollout.analysis.0.failure_limit"),
    "spec.rollout.analysis[].inconclusiveLimit": (CHECK, "rollout.analysis.0.inconclusive_limit"),
    "spec.rollout.analysis[].consecutiveErrorLimit": (CHECK, "rollout.analysis.0.consecutive_error_limit"),
    "spec.rollout.analysis[].relativeToStable": (CHECK, "rollout.analysis.0.relative_to_stable"),
    "spec.rollout.progressDeadlineSeconds": ({}, "rollout.progress_deadline_seconds"),
    "spec.rollout.onInconclusive": ({}, "rollout.on_inconclusive"),
    "spec.rollout.minRequests": ({}, "rollout.min_requests"),
    "spec.autoscaling.engine": (AUTOSCALING, "autoscaling.engine"),
    "spec.autoscaling.metric": (AUTOSCALING, "autoscaling.metric"),
    "spec.autoscaling.minReplicas": (AUTOSCALING, "autoscaling.min_replicas"),
    "spec.autoscaling.stableWindowSeconds": (AUTOSCALING, "autoscaling.stable_window_seconds"),
    "spec.autoscaling.panicThreshold": (AUTOSCALING, "autoscaling.panic_threshold"),
    "spec.autoscaling.scaleDownDelaySeconds": (AUTOSCALING, "autoscaling.scale_down_delay_seconds"),
    "spec.autoscaling.intervalSeconds": (AUTOSCALING, "autoscaling.interval_seconds"),
}


def parse_job_spec(extra):
    return parse_job("train", extra, IMAGE)


def parse_model_spec(extra):
    return parse_model("digits", {**MODEL_BASE, **extra}, IMAGE)


def evaluation_type():
    """The evaluation type the model parser assumes when a gate names none: the one whose
    metrics (and only those) it accepts without a type."""
    accepted = []
    for kind, metrics in contract.EVALUATION_METRICS.items():
        ok = []
        for metric in metrics:
            try:
                parse_model_spec({"compression": {"method": "int8",
                                                  "evaluation": {"metric": metric, "path": "eval.npz"}}})
                ok.append(True)
            except InvalidSpec:
                ok.append(False)
        if all(ok):
            accepted.append(kind)
        else:
            assert not any(ok), f"the parser accepts only some metrics of type {kind} without a type"
    assert len(accepted) == 1, accepted
    return accepted[0]


CASES = [(f"leptonjob:{path}", "leptonjob.yaml", path, parse_job_spec, JOB) for path in JOB] + \
        [(f"leptonmodel:{path}", "leptonmodel.yaml", path, parse_model_spec, MODEL) for path in MODEL]


@pytest.mark.parametrize("file, table", [("leptonjob.yaml", JOB), ("leptonmodel.yaml", MODEL)])
def test_every_crd_default_is_in_the_table(file, table):
    defaults = crd_defaults(file)
    assert defaults, f"no defaults found in {file}"
    unmatched, stale = sorted(set(defaults) - set(table)), sorted(set(table) - set(defaults))
    assert not unmatched, f"CRD defaults of {file} missing from the table of test_defaults.py: {unmatched}"
    assert not stale, f"table entries with no default in {file}: {stale}"


@pytest.mark.parametrize("file, path, parse, table", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_crd_default_equals_the_parsed_default(file, path, parse, table):
    crd_default = crd_defaults(file)[path]
    extra, attr = table[path]
    parsed = parse(extra)
    value = evaluation_type() if attr == EVALUATION else attribute(parsed, attr)
    assert value == crd_default and isinstance(value, bool) == isinstance(crd_default, bool), \
        f"{file} {path}: the CRD defaults to {crd_default!r}, the parser to {value!r}"
    if attr != EVALUATION:
        declared = dataclass_default(parsed, attr)
        assert declared is dataclasses.MISSING or declared == crd_default, \
            f"{file} {path}: the CRD defaults to {crd_default!r}, the dataclass field to {declared!r}"


def test_the_parsers_give_the_dataclass_defaults_for_an_empty_spec():
    job = parse_job_spec({"autoscaling": {}, "networkPolicy": {}})
    assert job.workers == job_spec.Workers()
    assert job.elastic == job_spec.Elastic()
    assert job.capacity == job_spec.Capacity()
    assert job.autoscaling == job_spec.Autoscaling()
    assert job.network_policy == job_spec.JobNetworkPolicy() and job.network_policy.enabled
    assert job.resources == Resources()
    empty = parse_job_spec({})
    for field in dataclasses.fields(job_spec.JobSpec):
        if field.name == "default_image":          # follows from the image, not from the spec
            continue
        if field.default_factory is not dataclasses.MISSING:
            assert getattr(empty, field.name) == field.default_factory(), field.name
        elif field.default is not dataclasses.MISSING:
            assert getattr(empty, field.name) == field.default, field.name

    model = parse_model_spec({"networkPolicy": {}, **STEP, **AUTOSCALING})
    assert model.compression == model_spec.Compression()
    assert model.serving == model_spec.Serving(image=IMAGE)
    assert model.rollout == dataclasses.replace(model_spec.Rollout(), steps=(model_spec.Step(50),))
    assert parse_model_spec({}).rollout == model_spec.Rollout()
    assert model.autoscaling == dataclasses.replace(model_spec.Autoscaling(), target=5.0)
    assert model.network_policy == NetworkPolicySpec()
    check = parse_model_spec(CHECK).rollout.analysis[0]
    assert check == model_spec.Check("query-0", "sum(errors)", max=1.0)


def test_mount_paths_default_to_the_crds_and_output_lies_next_to_the_checkpoints():
    job = parse_job_spec({"checkpoint": {"claimName": "data", "subPath": "run"}})
    assert job.checkpoint == job_spec.Mount("data", job_spec.CHECKPOINT_PATH, "run")
    assert job.output == job_spec.Mount("data", job_spec.OUTPUT_PATH, "run/output")


def test_default_reads_a_field_default_and_refuses_a_field_without_one():
    assert default(job_spec.Elastic, "join_timeout") == 600
    first, second = default(job_spec.JobSpec, "security_context"), default(job_spec.JobSpec, "security_context")
    assert first == {} and first is not second          # a default_factory gives a fresh value
    with pytest.raises(LookupError, match="no default"):
        default(job_spec.Mount, "claim_name")
    with pytest.raises(LookupError, match="no field"):
        default(job_spec.Mount, "claim")


def test_the_gate_type_defaults_by_task():
    """The CRD cannot default compression.evaluation.type (it depends on spec.task): a
    predict model is gated by fidelity, a language model by perplexity with its bounds."""
    assert "spec.compression.evaluation.type" not in crd_defaults("leptonmodel.yaml")
    assert evaluation_type() == "fidelity"
    assert parse_model_spec({"compression": {"evaluation": {"threshold": 0.9}}}).compression.evaluation == \
        {"type": "fidelity", "threshold": 0.9}
    gate = parse_model_spec({**LLM, "compression": {"method": "int8-weight"}}).compression.evaluation
    assert gate == {"type": contract.EVALUATION_PERPLEXITY, "maxPerplexityIncrease": 0.10,
                    "minTokenAgreement": 0.80, "maxNewTokens": 16}
