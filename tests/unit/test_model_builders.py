"""LeptonModel builders: golden YAML for the compression Job, Deployment, Service, HPA and
KEDA ScaledObject; table-driven checks for the rules (replica split, replicas ownership)."""

import json
import pathlib

import pytest
import yaml
from golden_files import check_golden

from lepton_operator.model import objects, state
from lepton_operator.model.spec import InvalidSpec, PvcPath, artifact_path, parse_model, parse_uri

pytestmark = pytest.mark.unit

GOLDEN = pathlib.Path(__file__).parent / "golden" / "model"
OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
         "metadata": {"name": "digits", "namespace": "ml", "uid": "u-123"}}
SPEC = {
    "source": {"uri": "pvc://models/runs/digits"},
    "compression": {"method": "prune", "params": {"sparsity": 0.5}, "maxAccuracyDrop": 0.02,
                    "podAnnotations": {"kwok.lepton.ai/termination-message": "{}"}},
    "serving": {"replicas": 4, "resources": {"cpu": "500m", "memory": "1Gi"},
                "batching": {"maxBatchSize": 16, "maxBatchDelayMs": 3}},
    "rollout": {"steps": [{"weight": 25, "pauseSeconds": 10}, {"weight": 50}],
                "analysis": [{"name": "errors", "query": "sum(x)", "max": 0.05}]},
    "autoscaling": {"metric": "rps", "target": 20, "minReplicas": 2, "maxReplicas": 8},
}


def spec(**over):
    return parse_model("digits", {**SPEC, **over}, "trainer:1")




def test_golden_compression_job():
    s = spec()
    rev = s.revision()
    src = PvcPath("models", "runs/digits")
    job = objects.compression_job(OWNER, s, rev, src, artifact_path(src, "digits", rev))
    check_golden("model/compression_job.yaml", [job])
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LEPTON_MODEL_DIR"] == "/models/runs/digits"
    assert env["LEPTON_ARTIFACT_DIR"] == f"/models/lepton-models/digits/{rev}"
    assert env["LEPTON_COMPRESSION_PARAMS"] == '{"sparsity": 0.5}'
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_compression_job_reads_its_source_read_only_and_writes_only_its_artifacts():
    """The claim is read-only to the program but for the model's artifact directory, the
    parent of every revision's artifact (where it stages one before renaming it); the Job
    ends at the spec's deadline, 2 hours when it names none."""
    src = PvcPath("models", "runs/digits")
    for s, deadline in ((spec(), 7200), (spec(compression={**SPEC["compression"], "activeDeadlineSeconds": 600}),
                                         600)):
        rev = s.revision()
        job = objects.compression_job(OWNER, s, rev, src, artifact_path(src, "digits", rev))
        pod = job["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        claim = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert claim == [{"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "models", "mountPath": "/models/lepton-models/digits",
                          "subPath": "lepton-models/digits"}]
        assert pathlib.PurePosixPath(env["LEPTON_ARTIFACT_DIR"]).parent == pathlib.PurePosixPath(claim[1]["mountPath"])
        assert not pathlib.PurePosixPath(env["LEPTON_MODEL_DIR"]).is_relative_to(claim[1]["mountPath"])
        assert job["spec"]["activeDeadlineSeconds"] == deadline


def test_golden_serving_objects():
    s = spec()
    rev = s.revision()
    objs = [objects.deployment(OWNER, s, rev, PvcPath("models", f"lepton-models/digits/{rev}"), 3),
            objects.service(OWNER)]
    check_golden("model/serving.yaml", objs)
    dep, svc = objs
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The Service selects every revision; the Deployment selects only its own.
    assert set(svc["spec"]["selector"].items()) <= set(dep["spec"]["template"]["metadata"]["labels"].items())
    assert "lepton.ai/revision" not in svc["spec"]["selector"]
    assert dep["spec"]["selector"]["matchLabels"]["lepton.ai/revision"] == rev


def test_golden_hpa_and_keda():
    s = spec()
    a = s.autoscaling
    check_golden("model/hpa_rps.yaml", [objects.hpa(OWNER, a, "digits-abc")])
    check_golden("model/keda_rps.yaml", [objects.scaled_object(OWNER, a, "digits-abc", "http://prom:9090")])
    lat = spec(autoscaling={"engine": "hpa", "metric": "p95latency", "target": 0.25, "maxReplicas": 5})
    h = objects.hpa(OWNER, lat.autoscaling, "digits-abc")
    check_golden("model/hpa_p95.yaml", [h])
    assert h["spec"]["metrics"][0]["external"]["target"] == {"type": "Value", "value": "250m"}
    q = spec(autoscaling={"engine": "keda", "metric": "query", "target": 3,
                          "query": 'sum(my_queue{ns="${namespace}",app="${model}"})'})
    k = objects.scaled_object(OWNER, q.autoscaling, "digits-abc", "http://prom:9090")
    check_golden("model/keda_query.yaml", [k])
    # KEDA carries the query confined to the model's namespace
    assert k["spec"]["triggers"][0]["metadata"]["query"] == 'sum(my_queue{app="digits",namespace="ml",ns="ml"})'
    assert k["spec"]["triggers"][0]["metadata"]["ignoreNullValues"] == "false"


def test_replicas_left_out_when_an_autoscaler_owns_them():
    s = spec()
    dep = objects.deployment(OWNER, s, "r1", PvcPath("models", "x"), None)
    assert "replicas" not in dep["spec"]
    assert objects.deployment(OWNER, s, "r1", PvcPath("models", "x"), 0)["spec"]["replicas"] == 0


@pytest.mark.parametrize("total,weight,expected", [
    (10, 0, (10, 0)), (10, 10, (9, 1)), (10, 25, (8, 2)), (10, 50, (5, 5)), (10, 100, (0, 10)),
    (4, 25, (3, 1)), (1, 10, (1, 1)), (2, 50, (1, 1)), (1, 100, (0, 1)), (3, 90, (1, 3)),
    (0, 50, (1, 1)),
])
def test_split(total, weight, expected):
    assert objects.split(total, weight) == expected


def test_split_rejects_bad_weight():
    with pytest.raises(ValueError, match="within 0..100"):
        objects.split(3, 101)


@pytest.mark.parametrize("metric,query", [
    ("rps", 'sum(irate(lepton_serve_requests_total{lepton_model="digits",lepton_namespace="ml",namespace="ml"}[1m]))'),
    ("inflight", 'sum(lepton_serve_inflight_requests{lepton_model="digits",lepton_namespace="ml",namespace="ml"})'),
    ("p95latency", 'histogram_quantile(0.95, sum by (le) (rate(lepton_serve_request_duration_seconds_bucket'
                   '{lepton_model="digits",lepton_namespace="ml",namespace="ml"}[1m])))'),
])
def test_metric_queries(metric, query):
    a = spec(autoscaling={"metric": metric, "target": 1}).autoscaling
    assert objects.metric_query(a, "ml", "digits") == query


@pytest.mark.parametrize("pod,expected", [
    ({"status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}}, ("running", None)),
    ({"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": 0, "message": '{"ratio": 3.9}'}}}]}}, ("succeeded", {"ratio": 3.9})),
    ({"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": 3, "message": "accuracy gate failed"}}}]}}, ("gate-failed", {"message": "accuracy gate failed"})),
    ({"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": 1, "message": '{"passed": false, "reason": "OSError"}'}}}]}},
     ("failed", {"passed": False, "reason": "OSError"})),
    ({"status": {"phase": "Failed"}}, ("failed", None)),
])
def test_read_result(pod, expected):
    assert state.read_result(pod) == expected


def test_golden_gateway_route():
    objs = [objects.revision_service(OWNER, "r2"), objects.http_route(OWNER, [("r1", 75), ("r2", 25)])]
    check_golden("model/httproute.yaml", objs)
    route = objs[1]
    assert route["spec"]["parentRefs"] == [{"group": "", "kind": "Service", "name": "digits", "port": 8080}]
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == \
        [("digits-r1", 75), ("digits-r2", 25)]
    assert objs[0]["spec"]["selector"] == {"lepton.ai/model": "digits", "lepton.ai/revision": "r2"}


def test_compression_and_serving_pods_take_their_own_security_overrides():
    s = spec(compression={**SPEC["compression"], "securityContext": {"readOnlyRootFilesystem": False},
                          "podSecurityContext": {"runAsUser": 4242}},
             serving={**SPEC["serving"], "podSecurityContext": {"fsGroup": 7}})
    rev = s.revision()
    src = PvcPath("models", "runs/digits")
    job = objects.compression_job(OWNER, s, rev, src, artifact_path(src, "digits", rev))
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
    assert pod["securityContext"]["runAsUser"] == 4242 and pod["securityContext"]["runAsNonRoot"] is True
    dep = objects.deployment(OWNER, s, rev, PvcPath("models", "x"), 1)["spec"]["template"]["spec"]
    assert dep["securityContext"]["fsGroup"] == 7 and dep["securityContext"]["runAsUser"] == 10001
    assert dep["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    for p in (pod, dep):
        assert {"name": "tmp", "mountPath": "/tmp"} in p["containers"][0]["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}} in p["volumes"]
        env = {e["name"]: e.get("value") for e in p["containers"][0]["env"]}
        assert env["HOME"] == env["TMPDIR"] == "/tmp"
    # Overrides change what is served, so they make a new revision; none set leaves it as it was.
    assert s.revision() != spec().revision()


def test_serving_pods_have_a_memory_limit_and_admission_settings():
    """The server sheds load from its memory limit: a pod always has one (2Gi when the spec
    sets none), passed to it through the downward API with the admission settings."""
    unset = spec(serving={"batching": {"maxBatchSize": 8}})
    set_ = spec(serving={"resources": {"memory": "3Gi"}, "admission": {
        "maxConcurrentRequests": 10, "maxQueuedRequests": 4, "queueTimeoutMs": 250}})
    want = {"LEPTON_MAX_CONCURRENT_REQUESTS": "10", "LEPTON_MAX_QUEUED_REQUESTS": "4", "LEPTON_QUEUE_TIMEOUT_MS": "250"}
    for s, memory, env_want in ((unset, "2Gi", {"LEPTON_MAX_CONCURRENT_REQUESTS": "64"}), (set_, "3Gi", want)):
        pod = objects.deployment(OWNER, s, s.revision(), PvcPath("models", "x"), 1)["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == memory
        env = {e["name"]: e for e in c["env"]}
        assert {k: env[k]["value"] for k in env_want} == env_want
        assert env["LEPTON_MEMORY_LIMIT_BYTES"]["valueFrom"] == {
            "resourceFieldRef": {"containerName": c["name"], "resource": "limits.memory"}}
        assert all(v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v)
    # the admission defaults keep the revision a spec without them had; a setting makes a new one
    assert spec(serving={**SPEC["serving"], "admission": {"queueTimeoutMs": 5000}}).revision() == spec().revision()
    assert set_.revision() != spec(serving={"resources": {"memory": "3Gi"}}).revision()


@pytest.mark.parametrize("admission,message", [
    ({"maxConcurrentRequests": 0}, "serving.admission.maxConcurrentRequests must be between 1 and 10000"),
    ({"maxQueuedRequests": "8"}, "serving.admission.maxQueuedRequests must be an integer"),
    ({"queueTimeoutMs": 600001}, "serving.admission.queueTimeoutMs must be between 1 and 600000"),
])
def test_bad_admission_settings_are_invalid(admission, message):
    with pytest.raises(InvalidSpec, match=message):
        spec(serving={"admission": admission})


def test_format_evaluation_and_auto_reach_the_compression_job():
    s = parse_model("digits", {"source": {"uri": "pvc://models/minilm", "format": "huggingface"},
                               "compression": {"method": "auto", "params": {"objective": "latency"},
                                               "evaluation": {"type": "fidelity", "metric": "cosine",
                                                              "threshold": 0.98, "path": "eval/samples.jsonl"}}},
                    "trainer:1")
    rev = s.revision()
    src = PvcPath("models", "minilm")
    job = objects.compression_job(OWNER, s, rev, src, artifact_path(src, "digits", rev))
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LEPTON_MODEL_FORMAT"] == "huggingface" and env["LEPTON_COMPRESSION_METHOD"] == "auto"
    assert json.loads(env["LEPTON_COMPRESSION_EVALUATION"]) == {
        "type": "fidelity", "metric": "cosine", "threshold": 0.98, "path": "/models/eval/samples.jsonl"}
    assert json.loads(env["LEPTON_COMPRESSION_PARAMS"]) == {"objective": "latency"}
    # Distillation's student directory and training data lie on the source claim as well.
    d = parse_model("digits", {"source": {"uri": "pvc://models/minilm"},
                               "compression": {"method": "distill", "params": {
                                   "student": {"path": "students/small"}, "data": "distill.jsonl", "epochs": 2}}},
                    "trainer:1")
    job = objects.compression_job(OWNER, d, d.revision(), src, artifact_path(src, "digits", d.revision()))
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["LEPTON_COMPRESSION_PARAMS"]) == {
        "student": {"path": "/models/students/small"}, "data": "/models/distill.jsonl", "epochs": 2}
    assert d.compression.params["student"] == {"path": "students/small"}     # the spec itself is unchanged
    # Served straight from the source (no compression), the format reaches the server.
    plain = parse_model("digits", {"source": {"uri": "pvc://models/m.pt2", "format": "torch.export"}}, "trainer:1")
    dep = objects.deployment(OWNER, plain, "r1", PvcPath("models", "m.pt2"), 1)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "LEPTON_MODEL_FORMAT", "value": "torch.export"} in c["env"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "grpc": 8081}
    # An unset format and gate leave a revision's hash as it was.
    assert spec().revision() == parse_model("digits", {**SPEC, "source": {**SPEC["source"]}}, "trainer:1").revision()


# --- digests ------------------------------------------------------------------------

def test_images_pinned_by_digest_pass_unchanged():
    serving = "registry.example/ml/serve@sha256:" + "ab" * 32
    compress = "registry.example/ml/compress@sha256:" + "cd" * 32
    s = spec(serving={**SPEC["serving"], "image": serving}, compression={**SPEC["compression"], "image": compress})
    assert (s.serving.image, s.compression_image) == (serving, compress)
    rev, src = s.revision(), PvcPath("models", "runs/digits")
    dep = objects.deployment(OWNER, s, rev, src, 1)
    job = objects.compression_job(OWNER, s, rev, src, artifact_path(src, "digits", rev))
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == serving
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == compress
    trainer = "registry.example/ml/lepton-trainer@sha256:" + "ef" * 32
    assert parse_model("digits", SPEC, trainer).serving.image == trainer


# --- NetworkPolicies ----------------------------------------------------------------

PEERS = [{"podSelector": {"matchLabels": {"role": "client"}}},
         {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
         {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]
SERVING_PORTS = [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]


def test_no_network_policy_unless_enabled():
    assert objects.network_policies(OWNER, spec()) == []
    assert objects.network_policies(OWNER, spec(networkPolicy={"enabled": False, "ingressFrom": PEERS})) == []


def test_serving_pods_accept_only_the_serving_ports_and_compression_pods_nothing():
    serving, compression = objects.network_policies(OWNER, spec(networkPolicy={"enabled": True}))
    assert serving["kind"] == "NetworkPolicy" and serving["metadata"]["name"] == "digits-serving"
    assert serving["metadata"]["ownerReferences"][0]["uid"] == "u-123"
    assert serving["spec"] == {
        "podSelector": {"matchLabels": {"lepton.ai/model": "digits", "lepton.ai/role": "serving"}},
        "policyTypes": ["Ingress"], "ingress": [{"ports": SERVING_PORTS}]}
    assert compression["metadata"]["name"] == "digits-compression"
    assert compression["spec"] == {
        "podSelector": {"matchLabels": {"lepton.ai/model": "digits", "lepton.ai/role": "compression"}},
        "policyTypes": ["Ingress"], "ingress": []}
    # The policies select the pods the builders make.
    rev = spec().revision()
    pod_labels = objects.deployment(OWNER, spec(), rev, PvcPath("m", ""), 1)["spec"]["template"]["metadata"]["labels"]
    assert serving["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    job = objects.compression_job(OWNER, spec(), rev, PvcPath("m", ""), PvcPath("m", "a"))
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert compression["spec"]["podSelector"]["matchLabels"].items() <= job_labels.items()


def test_ingress_from_names_who_may_reach_the_serving_ports():
    serving, _ = objects.network_policies(OWNER, spec(networkPolicy={"enabled": True, "ingressFrom": PEERS}))
    assert serving["spec"]["ingress"] == [{"from": PEERS, "ports": SERVING_PORTS}]


def test_network_policy_is_not_part_of_a_revision():
    """Turning policies on never rolls out a new revision."""
    assert spec(networkPolicy={"enabled": True, "ingressFrom": PEERS}).revision() == spec().revision()


def test_bad_network_policy_is_an_invalid_spec():
    from lepton_operator.model.spec import InvalidSpec
    with pytest.raises(InvalidSpec, match=r"networkPolicy.ingressFrom\[0\] must set podSelector"):
        spec(networkPolicy={"enabled": True, "ingressFrom": [{}]})


def test_serving_and_compression_pods_are_placed_and_stay_off_gpu_nodes_without_gpus():
    avoid = {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}
    s = spec()
    rev = s.revision("pvc://models/runs/digits")
    src = parse_uri("pvc://models/runs/digits")
    for pod in (objects.deployment(OWNER, s, rev, src, 1)["spec"]["template"]["spec"],
                objects.compression_job(OWNER, s, rev, src, src)["spec"]["template"]["spec"]):
        assert "tolerations" not in pod
        assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"][0]["matchExpressions"] == [avoid]
    placed = {"nodeSelector": {"pool": "infer"}, "priorityClassName": "serving",
              "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}
    g = spec(serving={**SPEC.get("serving", {}), **placed, "resources": {"gpus": 1}},
             compression={**SPEC.get("compression", {}), "nodeSelector": {"pool": "batch"}})
    pod = objects.deployment(OWNER, g, rev, src, 1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "infer"} and pod["priorityClassName"] == "serving"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "affinity" not in pod                                  # asks for a GPU: GPU nodes are its place
    assert objects.compression_job(OWNER, g, rev, src, src)["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "batch"}
    assert g.revision("pvc://models/runs/digits") == spec(serving={**SPEC.get("serving", {}), "resources": {
        "gpus": 1}}).revision("pvc://models/runs/digits")       # where pods run is no new revision


def test_the_compression_pods_default_resources_are_the_ones_the_crd_states():
    """A spec that sets no compression resources gets what ``kubectl explain`` says it gets."""
    s = spec()
    src = PvcPath("models", "runs/digits")
    job = objects.compression_job(OWNER, s, s.revision(), src, artifact_path(src, "digits", s.revision()))
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"] and set(res["requests"]) == {"cpu", "memory"}
    crd = yaml.safe_load((GOLDEN.parents[2].parent / "crds" / "leptonmodel.yaml").read_text())
    compression = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "compression"]["properties"]
    stated = compression["resources"]["description"]
    assert f"cpu {res['requests']['cpu']}, memory {res['requests']['memory']}" in stated, stated
