"""A user's PromQL reads only its own namespace: on the real control plane, with a real
Prometheus scraping two exporters, one per namespace, that export the same series."""
import pytest

from conftest import free_port, lepton_job
from exporter import Exporter

pytestmark = pytest.mark.integration

SERIES = "tenant_queue_depth"


def model(k, name, autoscaling, **spec):
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
            "metadata": {"name": name, "namespace": k.ns},
            "spec": {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "none"},
                     "serving": {"replicas": 1}, "autoscaling": autoscaling, **spec}}


def condition(obj, type_):
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def replicas(k, name):
    deps = k.list("deployments", f"lepton.ai/model={name}")
    return sum(d["spec"].get("replicas", 0) for d in deps) if deps else None


@pytest.fixture
def neighbour(cluster, k):
    """Another namespace, with an exporter of its own (its series carry namespace=<it>)."""
    name = f"{k.ns}-nb"
    cluster.create_namespace(name)
    other = Exporter(cluster, f"exp-{name}", free_port(), namespace=name)
    try:
        yield name, other
    finally:
        other.stop()
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_a_query_without_a_namespace_reads_only_its_own(k, exporter, neighbour):
    _, other = neighbour
    exporter.set(SERIES, 3.0, queue="jobs")
    other.set(SERIES, 40.0, queue="jobs")
    # Prometheus holds both namespaces' series: read as written, the query gives 43.
    k.wait_for("both namespaces scraped", lambda: exporter.prometheus_value(f"sum({SERIES})") == 43.0, timeout=60)
    k.pvc("models")
    k.apply(model(k, "scoped", {"metric": "query", "query": f'sum({SERIES}{{queue="jobs"}})', "target": 1,
                                "minReplicas": 1, "maxReplicas": 60, "stableWindowSeconds": 6,
                                "panicWindowSeconds": 2, "intervalSeconds": 1}))
    k.wait_for("3 replicas: 3 in the own namespace, 1 per replica", lambda: replicas(k, "scoped") == 3, timeout=90)
    got = k.get("leptonmodel", "scoped")
    assert got["status"]["autoscaling"]["value"] == 3.0
    # The status shows the query the operator evaluated.
    assert condition(got, "MetricsAvailable")["message"] == f'sum({SERIES}{{namespace="{k.ns}",queue="jobs"}}) = 3'


def test_a_query_naming_another_namespace_is_an_invalid_spec(k, neighbour):
    other_ns, _ = neighbour
    k.apply(model(k, "peek", {"metric": "query", "query": f'sum({SERIES}{{namespace="{other_ns}"}})', "target": 1},
                  rollout={"analysis": [{"name": "all", "query": f'max({SERIES}{{namespace!="{k.ns}"}})',
                                         "max": 1}]}))
    got = k.wait_for("model InvalidSpec", lambda: condition(m := k.get("leptonmodel", "peek"), "Ready")
                     .get("reason") == "InvalidSpec" and m)
    message = condition(got, "Ready")["message"]
    assert (f'autoscaling.query: selects namespace "{other_ns}"; queries are evaluated in namespace "{k.ns}" only'
            in message)
    assert f'rollout.analysis[0].query: selects namespace!="{k.ns}"' in message
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in k.events("peek"))
    assert not k.list("deployments", "lepton.ai/model=peek")

    k.apply(lepton_job("peekjob", k.ns, autoscaling={"query": f'sum({SERIES}{{namespace=~".+"}})'}))
    k.wait_for("job InvalidSpec", lambda: k.condition("peekjob", "Ready").get("reason") == "InvalidSpec")
    assert ('autoscaling.query: selects namespace=~".+"; queries are evaluated in namespace '
            f'"{k.ns}" only') in k.condition("peekjob", "Ready")["message"]


def test_a_canarys_analysis_without_a_namespace_is_judged_on_its_own_series(k, exporter, neighbour):
    """The analysis query names no namespace, and the neighbour exports the same series
    for the same revision with a failing value: the canary is judged on its own value
    only, and promoted (read across namespaces, the 0.9 would roll it back)."""
    _, other = neighbour
    k.pvc("models")
    analysis = [{"name": "errors", "query": 'max(tenant_error_ratio{rev="${revision}"})', "max": 0.1,
                 "intervalSeconds": 2, "inconclusiveLimit": 1000}]
    manifest = model(k, "judged", None, serving={"replicas": 2},
                     rollout={"steps": [{"weight": 50, "pauseSeconds": 1}], "analysis": analysis})
    del manifest["spec"]["autoscaling"]

    def status():
        return (k.get("leptonmodel", "judged") or {}).get("status") or {}
    k.apply(manifest)
    first = k.wait_for("first revision stable", lambda: status().get("phase") == "Ready"
                       and status()["revisions"]["stable"], timeout=90)
    manifest["spec"]["serving"]["env"] = [{"name": "REVISION", "value": "2"}]
    k.apply(manifest)
    second = k.wait_for("canary", lambda: (status().get("revisions") or {}).get("canary"))
    assert second != first
    other.set("tenant_error_ratio", 0.9, rev=second)
    k.wait_for("the neighbour's value in Prometheus",
               lambda: exporter.prometheus_value(f'max(tenant_error_ratio{{rev="{second}"}})') == 0.9, timeout=60)
    exporter.set("tenant_error_ratio", 0.01, rev=second)

    decided = k.wait_for("promotion or rollback", lambda: s if (s := status()).get("revisions", {}).get("stable")
                         == second or s.get("phase") == "Degraded" else None, timeout=120)
    assert decided["revisions"]["stable"] == second, decided
    assert decided["analysis"][0]["value"] == 0.01 and decided["analysis"][0]["passed"], decided["analysis"]
