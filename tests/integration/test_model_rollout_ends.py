"""Every LeptonModel rollout ends, and its status never contradicts itself.

On the real control plane with a real Prometheus; the analysis series come from a real
exporter process that Prometheus scrapes, and pods are kwok's (their compression
results come from the kwok.lepton.ai annotations). Each case names the verdict, the
bound within which it comes (the wait's timeout), its Event and the final phase and
conditions. The pods run nothing, so "serving" here is the Deployment's readiness;
tests/real shows real servers.
"""
import json
import subprocess

import pytest

from test_model_rollout import cond, deployments, model, mstatus, wait_phase

pytestmark = pytest.mark.integration


def canary_spec(query, **rollout):
    return dict(serving={"replicas": 2}, compression={"method": "none"},
                rollout={"steps": [{"weight": 50}], "analysis": [{"name": "err", "query": query, "max": 0.1,
                                                                  "intervalSeconds": 1, **rollout.pop("check", {})}],
                         **rollout})


def start_canary(k, name, spec):
    """Deploy a first revision, then change the serving image: the second is the canary."""
    k.pvc("models")
    k.apply(model(k, name, **spec))
    first = wait_phase(k, name, "Ready")["revisions"]["stable"]
    k.apply(model(k, name, **{**spec, "serving": {**spec["serving"], "image": "lepton-trainer:canary"}}))
    second = k.wait_for("canary", lambda: mstatus(k, name).get("revisions", {}).get("canary"))
    return first, second


def events(k, name, reason):
    return [e for e in k.events(name) if e["reason"] == reason]


def columns(cluster, namespace, plural, name):
    """The printer columns of one object, as the API server renders them for kubectl get."""
    api = cluster.api_client()
    method, url, headers, body, _ = api.param_serialize(
        method="GET", resource_path=f"/apis/lepton.ai/v1alpha1/namespaces/{namespace}/{plural}/{name}",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}, auth_settings=["BearerToken"])
    table = json.loads(api.call_api(method, url, header_params=headers).read())
    return dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"]))


def test_promql_syntax_error_is_an_invalid_spec_before_any_canary(k, operator):
    k.pvc("models")
    k.apply(model(k, "badq", **canary_spec("sum(rate(foo[1m]")))
    ready = k.wait_for("InvalidSpec", lambda: (c := cond(k, "badq", "Ready")).get("reason") == "InvalidSpec" and c,
                       timeout=30)
    assert "rollout.analysis[0].query: 'sum(rate(foo[1m]' is not valid PromQL: unclosed left parenthesis" \
        in ready["message"]
    assert cond(k, "badq", "Stalled")["status"] == "True"
    assert not deployments(k, "badq") and not mstatus(k, "badq").get("revisions")
    assert events(k, "badq", "InvalidSpec")[0]["type"] == "Warning"
    assert "InvalidSpec" in operator.log() and "is not valid PromQL" in operator.log()


def test_a_serving_deployment_the_api_server_refuses_is_invalid_spec(k, operator):
    """``serving.env`` goes to the Deployment as written (core/v1 EnvVar). One the API
    server refuses (a valueFrom that names no source) makes the model InvalidSpec with the
    server's message, naming the field, instead of a create retried forever; fixing the
    spec rolls the model out."""
    k.pvc("models")
    spec = dict(serving={"replicas": 1, "env": [{"name": "TOKEN", "valueFrom": {}}]}, compression={"method": "none"})
    k.apply(model(k, "badenv", **spec))
    ready = k.wait_for("InvalidSpec", lambda: (c := cond(k, "badenv", "Ready")).get("reason") == "InvalidSpec" and c,
                       timeout=60)
    assert "the API server refuses Deployment" in ready["message"] and "valueFrom" in ready["message"], ready
    assert cond(k, "badenv", "Stalled")["status"] == "True" and not deployments(k, "badenv")
    assert events(k, "badenv", "InvalidSpec")[0]["type"] == "Warning"
    k.apply(model(k, "badenv", **{**spec, "serving": {"replicas": 1, "env": [{"name": "TOKEN", "value": "t"}]}}))
    wait_phase(k, "badenv", "Ready")
    assert cond(k, "badenv", "Stalled")["status"] == "False"


def test_an_empty_result_ends_at_the_progress_deadline(k):
    spec = canary_spec('max(nothing_here{rev="${revision}"})', progressDeadlineSeconds=30,
                       check={"inconclusiveLimit": 1000})
    first, second = start_canary(k, "empty", spec)
    k.wait_for("no data", lambda: cond(k, "empty", "Ready").get("reason") == "AnalysisNoData", timeout=30)
    s = k.wait_for("rolled back at the deadline",
                   lambda: (s := mstatus(k, "empty")).get("revisions", {}).get("failed") == second and s, timeout=60)
    ready = cond(k, "empty", "Ready")
    assert ready["reason"] == "ProgressDeadlineExceeded" and "no verdict within progressDeadlineSeconds=30" in ready["message"]
    assert s["revisions"]["stable"] == first and s["phase"] in ("RollingBack", "Degraded")
    assert cond(k, "empty", "Stalled")["status"] == "True"
    assert any(e["type"] == "Warning" for e in events(k, "empty", "RolledBack"))
    k.wait_for("canary at zero", lambda: deployments(k, "empty")[second]["spec"]["replicas"] == 0)


@pytest.mark.parametrize("series, worst", [
    ({"a": float("inf")}, "+Inf"),                # histogram_quantile's +Inf for the slowest canaries
    ({"a": 0.01, "b": 0.5}, "0.5"),               # two pods: the bad one decides
])
def test_infinity_and_each_series_are_judged(k, exporter, series, worst):
    """The worst series decides, +Inf included. The exporter's series are set once the
    canary exists (its revision names them), and Prometheus finds a new exporter within
    seconds: the readings before that are empty, so the check tolerates any number of
    inconclusive ones (the default limit of 5 at one a second ended some runs as
    AnalysisInconclusive before the first scrape)."""
    spec = canary_spec('test_latency{rev="${revision}"}', check={"inconclusiveLimit": 1000})
    first, second = start_canary(k, "judge", spec)
    for pod, value in series.items():
        exporter.set("test_latency", value, rev=second, pod=pod)
    s = k.wait_for("rolled back", lambda: (s := mstatus(k, "judge")).get("revisions", {}).get("failed") == second
                   and s, timeout=60)
    ready = cond(k, "judge", "Ready")
    assert ready["reason"] == "AnalysisFailed" and f"'err' = {worst}, must be <= 0.1" in ready["message"]
    assert s["analysis"][0]["verdict"] == "Failed" and s["revisions"]["stable"] == first
    assert any(worst in e["message"] for e in events(k, "judge", "RolledBack"))


def test_paused_for_a_person_then_resumed_by_the_annotation(k, exporter, operator):
    spec = canary_spec('max(test_err{rev="${revision}"})', onInconclusive="pause", check={"inconclusiveLimit": 0})
    first, second = start_canary(k, "pause", spec)
    k.wait_for("paused", lambda: mstatus(k, "pause").get("phase") == "Paused", timeout=30)
    ready = cond(k, "pause", "Ready")
    command = f"kubectl annotate --overwrite lm/pause -n {k.ns} lepton.ai/resume={second}"
    assert ready["status"] == "False" and ready["reason"] == "AnalysisInconclusive" and command in ready["message"]
    assert cond(k, "pause", "Reconciling")["status"] == "False" and cond(k, "pause", "Stalled")["status"] == "False"
    assert events(k, "pause", "AnalysisInconclusive")[0]["type"] == "Warning"
    assert command in operator.log()
    k.kubectl("annotate", "--overwrite", "lm/pause", f"lepton.ai/resume={second}")
    k.wait_for("promoted", lambda: (s := mstatus(k, "pause")).get("revisions", {}).get("stable") == second
               and s.get("phase") == "Ready", timeout=30)
    assert events(k, "pause", "ResumedByPerson")


def test_a_deleted_source_job_leaves_the_model_ready_and_a_new_run_rolls_out(k, cluster):
    k.pvc("ckpt")

    def train():
        k.apply(k.manifest("train", checkpoint={"claimName": "ckpt"}))
        for pod in k.wait_workers("train", 2):
            k.kwok_exit(pod["metadata"]["name"], 0)
        return k.wait_phase("train", "Succeeded")

    train()
    k.apply(model(k, "fromjob", source={"jobRef": {"name": "train"}}, compression={"method": "none"},
                  rollout={"strategy": "replace"}))
    first = wait_phase(k, "fromjob", "Ready")["revisions"]["stable"]
    assert cond(k, "fromjob", "SourceAvailable")["status"] == "True"
    k.kubectl("delete", "lj", "train")       # what ttlSecondsAfterFinished does
    k.wait_for("SourceAvailable=False", lambda: cond(k, "fromjob", "SourceAvailable").get("status") == "False",
               timeout=30)
    s = mstatus(k, "fromjob")
    assert s["phase"] == "Ready" and cond(k, "fromjob", "Ready")["status"] == "True"
    assert "keeps serving" in cond(k, "fromjob", "SourceAvailable")["message"]
    out = subprocess.run([f"{cluster.bin_dir}/kubectl", "wait", "--for=condition=Ready", "lm/fromjob", "-n", k.ns,
                          "--timeout=10s"], env=cluster.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert events(k, "fromjob", "SourceNotFound")[0]["type"] == "Warning"
    train()                                  # retraining: a new run of the same-named job
    s = k.wait_for("the new run rolled out", lambda: (s := mstatus(k, "fromjob")).get("revisions", {})
                   .get("stable") not in (None, first) and s.get("phase") == "Ready" and s, timeout=60)
    assert cond(k, "fromjob", "SourceAvailable")["status"] == "True"


def test_a_failed_source_job_passes_its_reason_on(k, cluster):
    k.pvc("ckpt")
    k.apply(k.manifest("broken", backoffLimit=0, checkpoint={"claimName": "ckpt"}))
    pods = k.wait_workers("broken", 2)
    k.kwok_exit(pods[0]["metadata"]["name"], 1)
    k.wait_phase("broken", "Failed")
    k.apply(model(k, "waits", source={"jobRef": {"name": "broken"}}, compression={"method": "none"}))
    ready = k.wait_for("SourceFailed", lambda: (c := cond(k, "waits", "Ready")).get("reason") == "SourceFailed" and c,
                       timeout=30)
    assert "BackoffLimitExceeded" in ready["message"] and mstatus(k, "waits")["phase"] == "Failed"
    # The failed job's columns: READY is not "0/2", RESTARTS counts no restart that never happened.
    cols = columns(cluster, k.ns, "leptonjobs", "broken")
    assert (cols["Phase"], cols["Ready"], cols["Restarts"], cols["Failures"]) == ("Failed", "-", 0, 1), cols


def test_kubectl_scale_raises_the_autoscalers_floor(k, exporter):
    k.pvc("models")
    exporter.set("lepton_serve_inflight_requests", 0.0, lepton_model="floor", lepton_namespace=k.ns)
    k.apply(model(k, "floor", compression={"method": "none"}, rollout={"strategy": "replace"},
                  autoscaling={"metric": "inflight", "target": 1, "maxReplicas": 5, "intervalSeconds": 1}))
    wait_phase(k, "floor", "Ready")
    out = k.kubectl("scale", "lm/floor", "--replicas=3")
    assert "scaled" in out
    s = k.wait_for("floor 3", lambda: (s := mstatus(k, "floor")).get("autoscaling", {}).get("floor") == 3 and s,
                   timeout=30)
    assert s["autoscaling"]["floorFrom"] == "spec.serving.replicas"
    k.wait_for("3 replicas despite no load",
               lambda: sum(d["spec"]["replicas"] for d in deployments(k, "floor").values()) == 3, timeout=30)


def test_printer_columns_tell_the_stable_method_and_the_reason(k, cluster):
    k.pvc("models")
    k.apply(model(k, "cols", rollout={"strategy": "replace"}))           # int8, passing the gate
    wait_phase(k, "cols", "Ready")
    # fp16 is on its way: its compression pod runs (and never ends here).
    k.apply(model(k, "cols", rollout={"strategy": "replace"}, compression={"method": "fp16"}))
    k.wait_for("compressing", lambda: mstatus(k, "cols").get("phase") == "Compressing", timeout=30)
    cols = columns(cluster, k.ns, "leptonmodels", "cols")
    assert cols["Method"] == "int8"            # the stable revision's method while fp16 is on its way
    assert cols["Reason"] == "Compressing"
    assert json.loads(k.kubectl("get", "lm", "cols", "-o", "json"))["status"]["revisions"]["stableMethod"] == "int8"
