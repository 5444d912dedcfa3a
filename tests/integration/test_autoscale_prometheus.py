"""Autoscaling on the real control plane from a real Prometheus scraping a real exporter:
LeptonModel (scale up on load, down after the window, panic burst, Prometheus outage holds)
and LeptonJob (goodput: scale up while it holds, stop when it drops)."""
import pytest

from conftest import lepton_job

pytestmark = pytest.mark.integration

INFLIGHT = "lepton_serve_inflight_requests"


def model(k, name, autoscaling):
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
            "metadata": {"name": name, "namespace": k.ns},
            "spec": {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "none"},
                     "serving": {"replicas": 1}, "autoscaling": autoscaling}}


def replicas(k, name):
    deps = k.list("deployments", f"lepton.ai/model={name}")
    return sum(d["spec"].get("replicas", 0) for d in deps) if deps else None


def scaled(k, name):
    return [e["message"] for e in sorted(k.events(name), key=lambda e: e.get("firstTimestamp") or "")
            if e["reason"] == "Scaled"]


def decisions(operator, kind, reason):
    return operator.metric("lepton_operator_scale_decisions_total", kind=kind, reason=reason)


def test_model_scales_up_on_load_and_down_after_the_window(k, exporter):
    k.pvc("models")
    labels = {"lepton_model": "auto", "lepton_namespace": k.ns}
    exporter.set(INFLIGHT, 0.5, **labels)
    k.apply(model(k, "auto", {"metric": "inflight", "target": 2, "minReplicas": 1, "maxReplicas": 6,
                              "stableWindowSeconds": 6, "panicWindowSeconds": 3, "panicThreshold": 10,
                              "scaleDownDelaySeconds": 4, "intervalSeconds": 1}))
    k.wait_for("1 replica", lambda: replicas(k, "auto") == 1)
    exporter.set(INFLIGHT, 7.5, **labels)                # 7.5 in flight / 2 per replica -> 4
    k.wait_for("scale up to 4", lambda: replicas(k, "auto") == 4, timeout=60)
    assert any("1 -> " in m and "(Stable)" in m for m in scaled(k, "auto"))
    s = k.get("leptonmodel", "auto")["status"]
    assert s["desiredReplicas"] == 4
    assert next(c for c in s["conditions"] if c["type"] == "MetricsAvailable")["status"] == "True"
    exporter.set(INFLIGHT, 1.0, **labels)
    k.wait_for("scale down to 1", lambda: replicas(k, "auto") == 1, timeout=60)
    downs = [m for m in scaled(k, "auto") if "-> 1 replicas" in m]
    assert downs and "value=1.0" in downs[-1]
    k.wait_for("model Ready at 1 replica", lambda: k.get("leptonmodel", "auto")["status"].get("phase") == "Ready")


def test_model_panic_burst_scales_up_at_once(k, exporter):
    k.pvc("models")
    labels = {"lepton_model": "burst", "lepton_namespace": k.ns}
    exporter.set(INFLIGHT, 1.0, **labels)
    # A long stable window: only panic mode can react to the burst quickly.
    k.apply(model(k, "burst", {"metric": "inflight", "target": 1, "maxReplicas": 8, "stableWindowSeconds": 600,
                               "panicWindowSeconds": 2, "panicThreshold": 2, "intervalSeconds": 1}))
    k.wait_for("model up", lambda: replicas(k, "burst") == 1)
    k.wait_for("some quiet samples", lambda: k.get("leptonmodel", "burst")["status"].get("autoscaling", {})
               .get("value") == 1.0)
    exporter.set(INFLIGHT, 8.0, **labels)
    k.wait_for("panic scale-up to 8", lambda: replicas(k, "burst") == 8, timeout=60)
    assert any("(Panic)" in m for m in scaled(k, "burst"))
    exporter.set(INFLIGHT, 0.0, **labels)
    # Panic never scales down; wait for several more decisions and check the size held.
    seen = k.wait_for("panic decisions", lambda: len([e for e in k.events("burst")]) and
                      k.get("leptonmodel", "burst")["status"]["autoscaling"].get("value") == 0.0)
    assert seen and replicas(k, "burst") == 8
    assert k.get("leptonmodel", "burst")["status"]["autoscaling"]["reason"] == "Panic"


def test_prometheus_outage_holds_the_size(k, exporter, cluster, operator):
    k.pvc("models")
    labels = {"lepton_model": "hold", "lepton_namespace": k.ns}
    exporter.set(INFLIGHT, 3.0, **labels)
    k.apply(model(k, "hold", {"metric": "inflight", "target": 1, "maxReplicas": 5, "stableWindowSeconds": 6,
                              "panicWindowSeconds": 2, "scaleDownDelaySeconds": 0, "intervalSeconds": 1}))
    k.wait_for("3 replicas", lambda: replicas(k, "hold") == 3, timeout=60)
    before = decisions(operator, "LeptonModel", "NoMetricData")
    cluster.stop_prometheus()
    try:
        exporter.set(INFLIGHT, 0.0, **labels)     # would mean 1 replica, if anyone could see it
        k.wait_for("MetricsAvailable=False", lambda: next(
            (c for c in k.get("leptonmodel", "hold")["status"]["conditions"] if c["type"] == "MetricsAvailable"),
            {}).get("status") == "False", timeout=60)
        k.wait_for("5 no-data decisions", lambda: decisions(operator, "LeptonModel", "NoMetricData") >= before + 5,
                   timeout=60)
        assert replicas(k, "hold") == 3
        c = next(c for c in k.get("leptonmodel", "hold")["status"]["conditions"] if c["type"] == "MetricsAvailable")
        assert c["reason"] == "NoMetricData" and "holding 3 replicas" in c["message"]
    finally:
        cluster.start_prometheus()
    k.wait_for("scale down once data is back", lambda: replicas(k, "hold") == 1, timeout=90)


def test_job_scales_up_while_goodput_holds_and_stops_when_it_drops(k, exporter, operator):
    labels = {"lepton_job": "elastic", "lepton_namespace": k.ns}
    exporter.set("lepton_train_samples_per_second", 100.0, **labels)
    k.apply(lepton_job("elastic", k.ns, workers={"min": 1, "max": 4, "replicas": 1}, resources={"gpus": 1},
                       autoscaling={"efficiency": 0.8, "cooldownSeconds": 8, "intervalSeconds": 1}))

    def workers():
        return k.job("elastic")["spec"]["workers"]["replicas"]

    k.wait_for("2 workers", lambda: workers() == 2, timeout=90)
    exporter.set("lepton_train_samples_per_second", 190.0, **labels)   # 95/worker: 0.95 of 100
    k.wait_for("3 workers", lambda: workers() == 3, timeout=90)
    exporter.set("lepton_train_samples_per_second", 180.0, **labels)   # 60/worker: 0.6 of 100
    k.wait_for("goodput-dropped decisions",
               lambda: decisions(operator, "LeptonJob", "GoodputDropped") >= 3, timeout=90)
    assert workers() == 3
    msgs = [e["message"] for e in k.events("elastic") if e["reason"] == "Scaled"]
    assert any("1 -> 2 (GoodputHolds)" in m for m in msgs) and any("2 -> 3 (GoodputHolds)" in m for m in msgs)
    assert any(e["reason"] == "GoodputDropped" for e in k.events("elastic"))
    auto = k.status("elastic")["autoscaling"]
    assert auto["metricsAvailable"] is True and auto["baselineRate"] == 100.0
    assert auto["lastDecision"] == "GoodputDropped" and auto["desiredWorkers"] == 3
    k.wait_phase("elastic", "Running")
