"""engine: hpa and keda on the real control plane: the operator renders the autoscaler for the
stable Deployment and leaves that Deployment's replicas alone."""
import pytest

pytestmark = pytest.mark.integration


def model(k, name, engine):
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
            "metadata": {"name": name, "namespace": k.ns},
            "spec": {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "none"},
                     "serving": {"replicas": 1},
                     "autoscaling": {"engine": engine, "metric": "rps", "target": 20,
                                     "minReplicas": 1, "maxReplicas": 5}}}


def test_hpa_engine_owns_the_stable_replicas(k):
    k.pvc("models")
    k.apply(model(k, "viahpa", "hpa"))
    stable = k.wait_for("stable revision", lambda: (k.get("leptonmodel", "viahpa").get("status") or {})
                        .get("revisions", {}).get("stable"))
    hpa = k.wait_for("HPA", lambda: k.get("hpa", "viahpa"))
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"viahpa-{stable}"}
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["metric"]["name"] == "lepton_serve_requests_per_second"
    assert metric["metric"]["selector"]["matchLabels"] == {"lepton_model": "viahpa", "lepton_namespace": k.ns,
                                                           "namespace": k.ns}
    assert metric["target"] == {"type": "AverageValue", "averageValue": "20"}
    # Another owner of replicas (the HPA) sets 3: the operator follows instead of resetting it.
    k.kubectl("scale", f"deployment/viahpa-{stable}", "--replicas=3")
    k.wait_for("status follows the HPA's size",
               lambda: k.get("leptonmodel", "viahpa")["status"].get("desiredReplicas") == 3
               and k.get("leptonmodel", "viahpa")["status"].get("phase") == "Ready")
    assert k.get("deployment", f"viahpa-{stable}")["spec"]["replicas"] == 3


def test_keda_engine_without_keda_installed_says_so(k):
    k.pvc("models")
    k.apply(model(k, "viakeda", "keda"))
    ev = k.wait_for("warning event", lambda: [e for e in k.events("viakeda") if e["reason"] == "AutoscalerAPIMissing"])
    assert "ScaledObject (keda.sh/v1alpha1)" in ev[0]["message"] and ev[0]["type"] == "Warning"
    k.wait_for("still serving", lambda: k.get("leptonmodel", "viakeda")["status"].get("phase") == "Ready")
