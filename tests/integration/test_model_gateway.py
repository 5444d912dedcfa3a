"""Where the Gateway API is installed, a canary's weight is exact: an HTTPRoute on the model's
Service weights a Service per revision. The real HTTPRoute CRD comes from the
sigs.k8s.io/gateway-api Go module (the same module proxy that builds the control plane)."""
import json
import subprocess
from pathlib import Path

import pytest

from conftest import free_port
from exporter import Exporter
from test_model_rollout import deployments, model, mstatus, result_annotations, GOOD

pytestmark = pytest.mark.integration
GATEWAY_API = "sigs.k8s.io/gateway-api@v1.2.1"


@pytest.fixture(scope="module")
def gateway_api(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("gwapi")
    proc = subprocess.run(["go", "mod", "download", "-json", GATEWAY_API], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot fetch {GATEWAY_API} from the Go module proxy: {proc.stderr}"
    crd = Path(json.loads(proc.stdout)["Dir"]) / "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.wait_established("crd/httproutes.gateway.networking.k8s.io")


def test_canary_weights_through_an_httproute(k, cluster, gateway_api):
    k.pvc("models")
    exporter = Exporter(cluster, f"exp-{k.ns}", free_port(), namespace=k.ns)
    try:
        spec = dict(serving={"replicas": 3},
                    rollout={"steps": [{"weight": 20}],
                             "analysis": [{"name": "err", "query": 'max(gw_err{rev="${revision}"})', "max": 0.1}]})
        k.apply(model(k, "gw", **spec))
        s = k.wait_for("Ready via HTTPRoute", lambda: (s := mstatus(k, "gw")).get("phase") == "Ready"
                       and s.get("trafficRouting") == "HTTPRoute" and s, timeout=90)
        first = s["revisions"]["stable"]
        route = k.get("httproute", "gw")
        assert route["spec"]["parentRefs"][0] == {"group": "", "kind": "Service", "name": "gw", "port": 8080}
        assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [(f"gw-{first}", 100)]
        assert k.get("service", f"gw-{first}")["spec"]["selector"]["lepton.ai/revision"] == first

        k.apply(model(k, "gw", **{**spec, "compression": {"method": "fp16",
                                                          "podAnnotations": result_annotations(GOOD)}}))
        second = k.wait_for("canary", lambda: mstatus(k, "gw").get("revisions", {}).get("canary"))

        def backends():
            r = k.get("httproute", "gw")
            return [(b["name"], b["weight"]) for b in r["spec"]["rules"][0]["backendRefs"]]
        k.wait_for("80/20 route", lambda: backends() == [(f"gw-{first}", 80), (f"gw-{second}", 20)])
        exporter.set("gw_err", 0.0, rev=second)
        k.wait_for("promoted", lambda: mstatus(k, "gw").get("revisions", {}).get("stable") == second)
        k.wait_for("route to the new stable", lambda: backends() == [(f"gw-{second}", 100)])
        k.wait_for("old revision and its Service removed",
                   lambda: list(deployments(k, "gw")) == [second] and not k.get("service", f"gw-{first}"))
    finally:
        exporter.stop()
