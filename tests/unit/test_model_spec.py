"""LeptonModel spec parsing: defaults, every bad input with a clear message, revisions."""

import pytest

from lepton_operator.model.spec import (InvalidSpec, PvcPath, artifact_path, parse_model, parse_uri,
                                        render_query)

pytestmark = pytest.mark.unit

BASE = {"source": {"uri": "pvc://models/digits"}}


def parse(extra=None, name="digits"):
    return parse_model(name, {**BASE, **(extra or {})}, "trainer:1")


def problems(extra, name="digits"):
    with pytest.raises(InvalidSpec) as exc:
        parse(extra, name)
    return " | ".join(exc.value.problems)


def test_defaults():
    s = parse()
    assert s.compression.method == "none" and not s.compression.runs_job
    assert s.serving.image == "trainer:1" and s.serving.replicas == 1
    assert s.rollout.strategy == "canary" and [x.weight for x in s.rollout.steps] == [20, 50]
    assert s.autoscaling is None and s.compression_image == "trainer:1"


def test_full_spec():
    s = parse({"source": {"jobRef": {"name": "train"}},
               "compression": {"method": "int8", "maxAccuracyDrop": 0.01, "params": {"backend": "fbgemm"}},
               "rollout": {"strategy": "canary", "steps": [{"weight": 10, "pauseSeconds": 5}, {"weight": 100}],
                           "analysis": [{"name": "err", "query": "sum(e)", "max": 0.1},
                                        {"query": "sum(ok)", "min": 1}]},
               "autoscaling": {"engine": "keda", "metric": "p95latency", "target": 0.2, "maxReplicas": 4}})
    assert s.source.job_name == "train" and s.source.uri is None
    assert s.compression.params == {"backend": "fbgemm"}
    assert [c.name for c in s.rollout.analysis] == ["err", "query-1"]
    assert s.rollout.analysis[0].failed(0.2) and not s.rollout.analysis[0].failed(0.1)
    assert s.rollout.analysis[1].failed(0.5) and s.rollout.analysis[1].bound_text() == ">= 1.0"
    assert not s.autoscaling.additive and s.autoscaling.panic_window_seconds == 6


@pytest.mark.parametrize("extra,message", [
    ({"compression": {"method": "int4"}},
     "compression.method must be one of int8, int8-static, fp16, bf16, prune, prune-structured, distill, none, auto; got 'int4'"),
    ({"rollout": {"steps": [{"weight": 50}, {"weight": 50}]}},
     "rollout.steps weights must strictly increase, got [50, 50]"),
    ({"rollout": {"steps": [{"weight": 0}]}}, "rollout.steps[0].weight must be between 1 and 100"),
    ({"source": {"jobRef": {}}}, "source.jobRef.name is required"),
    ({"source": {}}, "source must set exactly one of jobRef"),
    ({"source": {"uri": "pvc://m/x", "jobRef": {"name": "j"}}}, "source must set exactly one of jobRef"),
    ({"source": {"uri": "s3://bucket/x"}}, "scheme 's3' is not supported"),
    ({"source": {"uri": "pvc://m/x", "format": "pickle"}}, "source.format must be one of builtin, torch.export"),
    ({"compression": {"method": "int8", "evaluation": {"type": "data"}}},
     "compression.evaluation.path is required for type data"),
    ({"compression": {"method": "int8", "evaluation": {"type": "data", "path": "/etc/x.npz"}}},
     "compression.evaluation.path must be relative to the source claim"),
    ({"compression": {"method": "distill", "params": {"student": {"layers": 2, "path": "s"}}}},
     "compression.params.student must set exactly one of layers"),
    ({"compression": {"method": "distill", "params": {"student": {}}}},
     "compression.params.student must set exactly one of layers"),
    ({"compression": {"method": "distill", "params": {"student": {"layers": 0}}}},
     "compression.params.student.layers must be between 1 and 1000"),
    ({"compression": {"method": "distill", "params": {"student": {"path": "../other/s"}}}},
     "compression.params.student.path must be relative to the source claim"),
    ({"compression": {"method": "distill", "params": {"student": {"layers": 3}, "data": "/etc/d.jsonl"}}},
     "compression.params.data must be relative to the source claim"),
    ({"compression": {"method": "int8", "evaluation": {"type": "fidelity", "metric": "accuracy"}}},
     "compression.evaluation.metric (for type fidelity) must be one of top1_agreement, cosine"),
    ({"compression": {"method": "int8", "evaluation": {"typo": 1}}}, "compression.evaluation has unknown fields"),
    ({"rollout": {"onInconclusive": "wait"}}, "rollout.onInconclusive must be one of rollback, pause"),
    ({"rollout": {"analysis": [{"query": "up", "max": 1, "count": 0}]}}, "rollout.analysis[0].count must be between"),
    ({"rollout": {"analysis": [{"query": "  ", "max": 1}]}},
     "rollout.analysis[0].query must be a non-empty PromQL query"),
    ({"rollout": {"analysis": [{"query": "up"}]}}, "rollout.analysis[0] needs a threshold"),
    ({"autoscaling": {"metric": "query", "target": 1}},
     "autoscaling.query must be a non-empty PromQL query when metric is query"),
    ({"autoscaling": {"metric": "query", "query": "up", "target": 1, "engine": "hpa"}},
     "needs engine builtin or keda"),
    ({"autoscaling": {"target": 1, "minReplicas": 5, "maxReplicas": 2}},
     "autoscaling.maxReplicas (2) must be >= minReplicas (5)"),
    ({"autoscaling": {"metric": "rps"}}, "autoscaling.target is required"),
    ({"autoscaling": {"target": 0}}, "autoscaling.target must be > 0"),
    ({"compression": {"maxAccuracyDrop": 2}}, "compression.maxAccuracyDrop must be >= 0 and <= 1"),
    ({"serving": {"env": [{"name": "LEPTON_MODEL_DIR", "value": "/x"}]}}, "set by the operator"),
])
def test_bad_input_is_rejected_with_a_clear_message(extra, message):
    assert message in problems(extra)


def test_every_problem_is_reported_at_once():
    text = problems({"compression": {"method": "zip"}, "rollout": {"steps": [{"weight": 9}, {"weight": 3}]}},
                    name="a" * 50)
    assert "compression.method" in text and "strictly increase" in text and "at most 43" in text


def test_revision_tracks_served_bits_only():
    a = parse({"compression": {"method": "int8"}})
    assert a.revision() == parse({"compression": {"method": "int8"}, "serving": {"replicas": 9},
                                  "rollout": {"strategy": "replace"},
                                  "autoscaling": {"target": 3}}).revision()
    assert a.revision() != parse({"compression": {"method": "fp16"}}).revision()
    assert a.revision() != parse({"compression": {"method": "int8"}, "serving": {"image": "other"}}).revision()
    assert a.revision() != parse({"compression": {"method": "int8"},
                                  "source": {"uri": "pvc://models/other"}}).revision()
    assert a.revision("pvc://a/x") != a.revision("pvc://a/y")
    assert a.revision() == parse({"compression": {"method": "int8", "podAnnotations": {"a": "b"}},
                                  "serving": {"podAnnotations": {"c": "d"}}}).revision()
    assert len(a.revision()) == 10


def test_uris_paths_and_queries():
    assert parse_uri("pvc://models/runs/digits/") == PvcPath("models", "runs/digits")
    assert parse_uri("pvc://models").uri == "pvc://models"
    with pytest.raises(ValueError, match="must not contain"):
        parse_uri("pvc://m/../etc")
    assert artifact_path(PvcPath("m", "a"), "digits", "r1") == PvcPath("m", "lepton-models/digits/r1")
    assert render_query('rate(x{rev="${revision}",m="$model"}[1m]) > ${other}', "ns", "digits", "r1") == \
        'rate(x{rev="r1",m="digits"}[1m]) > ${other}'


def test_examples_parse():
    import pathlib

    import yaml
    root = pathlib.Path(__file__).resolve().parents[2] / "examples"
    docs = [d for f in sorted(root.glob("*leptonmodel*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if d and d.get("kind") == "LeptonModel"]
    assert docs
    for d in docs:
        s = parse_model(d["metadata"]["name"], d["spec"], "img")
        assert s.rollout.analysis and s.autoscaling


IMPLEMENTED = {"torch.export": {"int8", "int8-static", "fp16", "bf16", "none", "auto"},
               "onnx": {"int8", "int8-static", "fp16", "none", "auto"},
               "torchscript": {"fp16", "bf16", "none", "auto"}}


@pytest.mark.parametrize("fmt", ["torch.export", "torchscript", "onnx", "builtin", "huggingface"])
def test_a_format_and_method_pair_without_implementation_is_refused_naming_both_fields(fmt):
    methods = ("int8", "int8-static", "fp16", "bf16", "prune", "prune-structured", "distill", "none", "auto")
    for method in methods:
        spec = {"source": {"uri": "pvc://c/p", "format": fmt}, "compression": {"method": method}}
        implemented = method in IMPLEMENTED[fmt] if fmt in IMPLEMENTED else method != "int8-static"
        if implemented:
            assert parse_model("m", spec, "img").compression.method == method
        else:
            with pytest.raises(InvalidSpec) as err:
                parse_model("m", spec, "img")
            assert f"compression.method {method} has no implementation for source.format {fmt}" in str(err.value)


def test_int8_static_without_a_format_is_left_to_the_program_and_the_latency_budget_is_bounded():
    spec = parse_model("m", {"source": {"uri": "pvc://c/p"}, "compression": {"method": "int8-static",
                                                                            "latencyBudgetSeconds": 30}}, "img")
    assert spec.compression.latency_budget_seconds == 30
    with pytest.raises(InvalidSpec, match="latencyBudgetSeconds"):
        parse_model("m", {"source": {"uri": "pvc://c/p"}, "compression": {"latencyBudgetSeconds": 0}}, "img")
