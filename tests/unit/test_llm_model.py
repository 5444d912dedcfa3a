"""LeptonModel of a language model (spec.task text-generation): the parser's rules and
defaults, golden YAML of its children for the built-in, vLLM and custom runtimes, and the
PromQL of its canary checks and autoscaling metrics."""

import json

import pytest
import yaml
from golden_files import check_golden

from lepton_trainer import contract
from lepton_operator.model import objects
from lepton_operator.model import state as ms
from lepton_operator.model.spec import InvalidSpec, PvcPath, artifact_path, parse_model, scoped_query
from lepton_operator.scaling import promql
from planning import plan_model

pytestmark = pytest.mark.unit

OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
         "metadata": {"name": "smol", "namespace": "ml", "uid": "u-456"}}
SOURCE = PvcPath("models", "smollm2")
BUILTIN = {
    "source": {"uri": "pvc://models/smollm2", "format": "gguf"},
    "compression": {"method": "int8-weight", "evaluation": {"maxPerplexityIncrease": 0.2, "prompts": "prompts.txt"}},
    "serving": {"generation": {"maxPromptTokens": 1024, "maxOutputTokens": 256, "maxSequences": 4},
                "resources": {"cpu": "2", "memory": "4Gi"}},
    "rollout": {"steps": [{"weight": 50, "pauseSeconds": 30}],
                "analysis": [{"check": "timeToFirstTokenP95", "max": 0.5}, {"check": "errorRate", "max": 0.01}],
                "minRequests": 20},
    "autoscaling": {"metric": "waiting", "target": 4, "maxReplicas": 3},
}
VLLM = {"task": "text-generation", "source": {"uri": "pvc://models/smollm2-hf", "format": "huggingface"},
        "compression": {"method": "bf16"}, "serving": {"runtime": "vllm"},
        "autoscaling": {"engine": "keda", "metric": "kvCache", "target": 0.7}}
CUSTOM = {"task": "text-generation", "source": {"uri": "pvc://models/smollm2-hf"},
          "serving": {"runtime": "custom", "image": "ghcr.io/example/llama-server:1", "port": 9000,
                      "healthPath": "/healthz", "metrics": {"timeToFirstToken": "llm_ttft_seconds",
                                                            "requests": "llm_requests_total"}},
          "rollout": {"analysis": [{"check": "timeToFirstTokenP95", "max": 1}]},
          "autoscaling": {"engine": "hpa", "metric": "waiting", "target": 2}}


def parse(raw, name="smol"):
    return parse_model(name, raw, "trainer:1", vllm_image="vllm/vllm-openai:v0.11.0")


def problems(raw) -> str:
    with pytest.raises(InvalidSpec) as exc:
        parse(raw)
    return str(exc.value)




def children(raw):
    s = parse(raw)
    rev = s.revision()
    art = artifact_path(SOURCE, "smol", rev)
    owner = {**OWNER, "metadata": {**OWNER["metadata"], "name": "smol"}}
    job = objects.compression_job(owner, s, rev, SOURCE, art) if s.compression.runs_job else None
    dep = objects.deployment(owner, s, rev, art if job else SOURCE, 2)
    return s, rev, job, dep, objects.service(owner, s)


def env_of(container):
    return {e["name"]: e.get("value") for e in container["env"]}


def test_golden_builtin_language_model():
    s, rev, job, dep, svc = children({**BUILTIN, "networkPolicy": {"enabled": True}})
    check_golden("model/llm_builtin.yaml", [job, dep, svc, *objects.network_policies(OWNER, s)])
    job_env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert job_env[contract.ENV_TASK] == "text-generation"
    assert job_env[contract.ENV_COMPRESSION_METHOD] == "int8-weight"
    assert json.loads(job_env[contract.ENV_COMPRESSION_EVALUATION]) == {
        "type": "perplexity", "maxPerplexityIncrease": 0.2, "minTokenAgreement": 0.8, "maxNewTokens": 16,
        "prompts": "/models/prompts.txt"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert env[contract.ENV_TASK] == "text-generation"
    assert (env[contract.ENV_MAX_PROMPT_TOKENS], env[contract.ENV_MAX_OUTPUT_TOKENS],
            env[contract.ENV_MAX_SEQUENCES]) == ("1024", "256", "4")
    assert [p["name"] for p in c["ports"]] == ["http"]                 # no gRPC for a language model
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    assert c["readinessProbe"]["httpGet"]["path"] == contract.HEALTH_READY_PATH
    assert c["command"][:3] == ["python", "-m", "lepton_trainer.serve"]


def test_golden_vllm_language_model():
    s, rev, job, dep, svc = children({**VLLM, "networkPolicy": {"enabled": True}})
    keda = objects.scaled_object(OWNER, s.autoscaling, f"smol-{rev}", "http://prom:9090", 1,
                                 s.serving.runtime_metrics)
    check_golden("model/llm_vllm.yaml", [dep, svc, keda, *objects.network_policies(OWNER, s)])
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "vllm/vllm-openai:v0.11.0"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"][:6] == ["--model", "/model", "--served-model-name", "smol", "--port", "8000"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])      # GPU placement
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} == {"/health"}
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    serving_policy = objects.network_policies(OWNER, s)[0]
    assert {p["port"] for p in serving_policy["spec"]["ingress"][0]["ports"]} == {8000, contract.SERVE_PORT}
    # the compression Job runs the operator's image (vLLM's cannot compress)
    assert s.compression_image == "trainer:1"
    trigger = keda["spec"]["triggers"][0]
    assert trigger["metricType"] == "Value"                 # mean KV cache use: proportional
    assert trigger["metadata"]["query"] == \
        'avg(vllm:kv_cache_usage_perc{namespace="ml",pod=~"smol-[0-9a-f]{10}-.+"})'


def test_golden_custom_runtime_language_model():
    s, rev, job, dep, svc = children(CUSTOM)
    hpa = objects.hpa(OWNER, s.autoscaling, f"smol-{rev}")
    check_golden("model/llm_custom.yaml", [dep, svc, hpa])
    assert job is None
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/example/llama-server:1" and "command" not in c and "args" not in c
    assert c["ports"][0]["containerPort"] == 9000
    assert c["readinessProbe"]["httpGet"] == {"port": "http", "path": "/healthz"}
    assert env_of(c)[contract.ENV_MODEL_DIR] == "/model"
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "lepton_llm_requests_waiting"


@pytest.mark.parametrize("raw, message", [
    ({"source": {"uri": "pvc://m/x"}, "compression": {"method": "int8-weight"}},
     "compression.method int8-weight is not for spec.task predict"),
    ({**VLLM, "compression": {"method": "int8"}, "serving": {}},
     "compression.method int8 is not for spec.task text-generation"),
    ({**VLLM, "compression": {"method": "int4-weight"}},
     "compression.method int4-weight cannot be served by serving.runtime vllm"),
    ({"task": "predict", "source": {"uri": "pvc://m/x", "format": "gguf"}},
     "source.format gguf needs spec.task text-generation"),
    ({"task": "text-generation", "source": {"uri": "pvc://m/x", "format": "onnx"}},
     "spec.task text-generation takes source.format huggingface or gguf"),
    ({"source": {"uri": "pvc://m/x"}, "serving": {"runtime": "vllm"}},
     "serving.runtime needs spec.task text-generation"),
    ({"source": {"uri": "pvc://m/x"}, "serving": {"generation": {"maxSequences": 2}}},
     "serving.generation needs spec.task text-generation"),
    ({**CUSTOM, "serving": {"runtime": "custom"}}, "serving.image is required with serving.runtime custom"),
    ({**VLLM, "serving": {"runtime": "vllm", "port": 9000}}, "serving.port is only for serving.runtime custom"),
    ({**VLLM, "compression": {"method": "none"}, "source": {"uri": "pvc://m/x", "format": "gguf"}},
     "serving.runtime vllm loads a Hugging Face directory"),
    ({"source": {"uri": "pvc://m/x"}, "autoscaling": {"metric": "waiting", "target": 1}},
     "autoscaling.metric waiting needs spec.task text-generation"),
    ({**VLLM, "autoscaling": {"metric": "rps", "target": 1}}, "autoscaling.metric rps reads the built-in server's"),
    ({"source": {"uri": "pvc://m/x"}, "rollout": {"analysis": [{"check": "errorRate", "max": 0.1}]}},
     "rollout.analysis[0].check errorRate needs spec.task text-generation"),
    ({**VLLM, "rollout": {"analysis": [{"check": "errorRate", "query": "up", "max": 0.1}]}},
     "rollout.analysis[0] sets both query and check"),
    ({**VLLM, "compression": {"method": "bf16", "evaluation": {"type": "fidelity"}}},
     "compression.evaluation.type fidelity is for spec.task predict"),
    ({**VLLM, "compression": {"method": "bf16", "evaluation": {"threshold": 0.9}}},
     "does not take"),
    ({"source": {"uri": "pvc://m/x"}, "compression": {"method": "int8", "evaluation": {"type": "perplexity"}}},
     "compression.evaluation.type perplexity needs spec.task text-generation"),
    ({**VLLM, "compression": {"method": "bf16", "evaluation": {"minTokenAgreement": 2}}},
     "compression.evaluation.minTokenAgreement must be >= 0 and <= 1"),
    ({**CUSTOM, "serving": {**CUSTOM["serving"], "metrics": {"requests": "not a name"}}},
     "serving.metrics.requests must be a Prometheus metric name"),
])
def test_pairs_with_no_implementation_are_refused_naming_the_fields(raw, message):
    assert message in problems(raw)


def test_the_task_follows_the_format_and_each_task_has_its_defaults():
    assert parse({"source": {"uri": "pvc://m/x", "format": "gguf"}}).task == "text-generation"
    assert parse({"source": {"uri": "pvc://m/x", "format": "huggingface"}}).task == "predict"
    s = parse({"task": "text-generation", "source": {"uri": "pvc://m/x"}})
    assert s.serving.runtime == "builtin" and s.serving.http_port == contract.SERVE_PORT
    assert s.compression.method == "none" and s.compression.evaluation["type"] == "perplexity"


def test_a_predict_models_revision_ignores_the_language_model_fields():
    raw = {"source": {"uri": "pvc://m/x"}, "serving": {"replicas": 2}}
    assert parse(raw).revision() == parse({**raw, "serving": {"replicas": 2, "runtime": "builtin"}}).revision()
    llm = {"task": "text-generation", "source": {"uri": "pvc://m/x"}}
    assert parse(llm).revision() != parse({**llm, "serving": {"generation": {"maxSequences": 2}}}).revision()
    assert parse(llm).revision() != parse({"source": {"uri": "pvc://m/x"}}).revision()


@pytest.mark.parametrize("raw, name, scoped", [
    (BUILTIN, "timeToFirstTokenP95",
     'histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
     '{namespace="ml",pod=~"smol-0123456789-.+"}[1m])))'),
    (BUILTIN, "errorRate",
     '(sum(rate(lepton_serve_requests_total{code=~"5..",namespace="ml",pod=~"smol-0123456789-.+"}[1m])) '
     'or vector(0)) / sum(rate(lepton_serve_requests_total{namespace="ml",pod=~"smol-0123456789-.+"}[1m]))'),
    ({**VLLM, "rollout": {"analysis": [{"check": "interTokenLatencyP95", "max": 0.1}]}}, "interTokenLatencyP95",
     'histogram_quantile(0.95, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket'
     '{namespace="ml",pod=~"smol-0123456789-.+"}[1m])))'),
    ({**VLLM, "rollout": {"analysis": [{"check": "errorRate", "max": 0.1}]}}, "errorRate",
     '(sum(rate(http_requests_total{namespace="ml",pod=~"smol-0123456789-.+",status=~"5.."}[1m])) '
     'or vector(0)) / sum(rate(http_requests_total{namespace="ml",pod=~"smol-0123456789-.+"}[1m]))'),
    (CUSTOM, "timeToFirstTokenP95",
     'histogram_quantile(0.95, sum by (le) (rate(llm_ttft_seconds_bucket'
     '{namespace="ml",pod=~"smol-0123456789-.+"}[1m])))'),
])
def test_ready_made_checks_render_over_the_runtimes_metrics_in_the_namespace(raw, name, scoped):
    check = next(c for c in parse(raw).rollout.analysis if c.name == name)
    assert scoped_query(check.query, "ml", "smol", "0123456789") == scoped
    with pytest.raises(promql.ScopeError):          # like every query: its own namespace only
        scoped_query(check.query.replace("pod=~", 'namespace="other",pod=~'), "ml", "smol", "0123456789")


def test_a_relative_latency_check_divides_the_canarys_p95_by_the_stable_revisions_in_the_same_window():
    raw = {**BUILTIN, "rollout": {"analysis": [{"check": "timeToFirstTokenP95", "max": 1.5, "relativeToStable": True}]}}
    check = parse(raw).rollout.analysis[0]
    quantile = ('histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
                '{{namespace="ml",pod=~"smol-{}-.+"}}[1m])))')
    assert scoped_query(check.query, "ml", "smol", "0123456789", "abcdefabcd") == \
        f'{quantile.format("0123456789")} / {quantile.format("abcdefabcd")}'
    assert check.relative_to_stable and check.failed(1.6) and not check.failed(1.4)      # max is a ratio


@pytest.mark.parametrize("analysis, message", [
    ({"check": "errorRate", "max": 2, "relativeToStable": True}, "errorRate has no relative form"),
    ({"query": "sum(up)", "max": 2, "relativeToStable": True}, "a query compares with ${stable} itself"),
    ({"check": "timeToFirstTokenP95", "max": 2, "relativeToStable": "yes"}, "must be true or false"),
])
def test_relative_to_stable_is_refused_where_it_has_no_meaning(analysis, message):
    assert message in problems({**BUILTIN, "rollout": {"analysis": [analysis]}})


def test_a_query_names_the_stable_revision_with_its_placeholder():
    raw = {**BUILTIN, "rollout": {"analysis": [{"query": 'sum(up{pod=~"${model}-${stable}-.+"})', "max": 1}]}}
    query = parse(raw).rollout.analysis[0].query
    assert scoped_query(query, "ml", "smol", "0123456789", "abcdefabcd") == \
        'sum(up{namespace="ml",pod=~"smol-abcdefabcd-.+"})'


def test_autoscaling_and_the_traffic_guard_read_the_runtimes_metrics():
    s = parse(BUILTIN)
    assert s.autoscaling.additive                                   # waiting: a total over replicas
    assert objects.metric_query(s.autoscaling, "ml", "smol", s.serving.runtime_metrics) == \
        'sum(vllm:num_requests_waiting{namespace="ml",pod=~"smol-[0-9a-f]{10}-.+"})'
    assert objects.traffic_query("ml", "smol", "0123456789", 60, s) == \
        'sum(increase(lepton_serve_requests_total{namespace="ml",pod=~"smol-0123456789-.+"}[60s]))'
    custom = parse(CUSTOM)
    assert objects.traffic_query("ml", "smol", "0123456789", 60, custom) == \
        'sum(increase(llm_requests_total{namespace="ml",pod=~"smol-0123456789-.+"}[60s]))'
    assert not parse(VLLM).autoscaling.additive                    # kvCache: a mean, proportional


def test_the_perplexity_gate_and_the_method_auto_chose_show_in_status():
    src = ms.SourceState(uri="pvc://models/smollm2")
    s = parse({"source": {"uri": "pvc://models/smollm2", "format": "gguf"}, "compression": {"method": "auto"}})
    rev = s.revision(src.uri)
    result = {"passed": True, "reason": "int4-weight is the smallest that passes", "method": "int4-weight",
              "artifact": f"/models/lepton-models/smol/{rev}",
              "gate": {"type": "perplexity", "before": {"perplexity": 12.1}, "after": {"perplexity": 12.9},
                       "agreement": 0.91, "passed": True},
              "candidates": [{"method": "int8-weight", "passed": True, "size_bytes": 180},
                             {"method": "int4-weight", "passed": True, "size_bytes": 110}]}
    p = plan_model(s, "smol", {}, src, rev, ms.CompressionState("Succeeded", result), 1, {}, 1_800_000_000.0)
    shown = p.status["compression"]
    assert shown["gate"] == result["gate"] and shown["candidates"] == result["candidates"]
    assert shown["state"] == "Succeeded" and p.status["revisions"]["stableMethod"] == "int4-weight"
    assert any("int4-weight: perplexity 12.1 -> 12.9, token agreement 0.91" in e[2] for e in p.events)
