"""Training builders: golden YAML for a full job, table-driven checks for the rules."""
import pathlib

import pytest
import yaml
from golden_files import check_golden

from lepton_operator.job import objects as training
from lepton_operator.constants import GPU_RESOURCE, LABEL_KUEUE_QUEUE
from lepton_operator.core.objects import GPU_TOLERATION
from lepton_operator.job.spec import InvalidSpec, parse_job
from lepton_trainer import contract

pytestmark = pytest.mark.unit
OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
         "metadata": {"name": "mnist", "namespace": "team-a", "uid": "0b5e-uid"}}
FULL_SPEC = {
    "image": "registry.example/train:2", "module": "lepton_trainer.train", "args": ["--model", "mlp"],
    "env": [{"name": "EPOCHS", "value": "3"}],
    "workers": {"min": 2, "max": 4, "replicas": 3},
    "resources": {"gpus": 2, "cpu": "4", "memory": "16Gi"},
    "elastic": {"maxRestarts": 5, "joinTimeoutSeconds": 300, "lastCallTimeoutSeconds": 1},
    "nodeSelector": {"gpu": "a100"}, "priorityClassName": "high", "schedulerName": "volcano",
    "queueName": "team-a-queue",
    "checkpoint": {"claimName": "ckpt", "path": "/ckpt", "subPath": "mnist"},
}


def built(spec=FULL_SPEC):
    job = parse_job("mnist", spec, "trainer:default")
    return [training.worker_pod(OWNER, job, 0), *training.rendezvous_objects(OWNER, job, "trainer:default"),
            training.workers_service(OWNER)]


def test_golden_full_job():
    check_golden("job_full.yaml", built())


def test_worker_command_is_elastic_torchrun_against_dedicated_store():
    cmd = built()[0]["spec"]["containers"][0]["command"]
    assert cmd[0] == "torchrun"
    assert "--nnodes=2:4" in cmd and "--nproc-per-node=2" in cmd and "--max-restarts=5" in cmd
    assert f"--rdzv-endpoint=mnist-rdzv:{contract.RDZV_PORT}" in cmd
    assert "--rdzv-id=0b5e-uid" in cmd and "--local-addr=$(POD_IP)" in cmd
    conf = next(a for a in cmd if a.startswith("--rdzv-conf="))
    assert "is_host=false" in conf and "join_timeout=300" in conf and "last_call_timeout=1" in conf
    assert "keep_alive_interval=3" in conf and "keep_alive_max_attempt=3" in conf   # 9 s, not torch's 15 s
    assert cmd[-4:] == ["-m", "lepton_trainer.train", "--model", "mlp"]


def test_user_script_runs_unchanged():
    cmd = built({"image": "registry.example/own:1", "command": ["/app/train.py"],
                 "args": ["--lr", "0.1"]})[0]["spec"]["containers"][0]["command"]
    assert cmd[0] == "torchrun" and cmd[-3:] == ["/app/train.py", "--lr", "0.1"] and "-m" not in cmd


@pytest.mark.parametrize("image,launcher,first", [
    (None, None, ["python", "-m", "lepton_trainer.launch"]),            # the trainer image: auto -> lepton
    ("trainer:default", "auto", ["python", "-m", "lepton_trainer.launch"]),
    ("registry.example/own:1", None, ["torchrun"]),                    # any other image: auto -> torchrun
    ("registry.example/own:1", "lepton", ["python", "-m", "lepton_trainer.launch"]),
    (None, "torchrun", ["torchrun"]),
])
def test_the_launcher_follows_the_image_unless_the_spec_names_one(image, launcher, first):
    spec = {"command": ["/app/train.py"], "args": ["--lr", "0.1"],
            **({"image": image} if image else {}),
            **({"elastic": {"launcher": launcher}} if launcher else {})}
    cmd = built(spec)[0]["spec"]["containers"][0]["command"]
    assert cmd[:len(first)] == first and cmd[len(first)].startswith("--nnodes=")
    assert cmd[-3:] == ["/app/train.py", "--lr", "0.1"]       # torchrun's own arguments, either way
    assert training.worker_command(OWNER, parse_job("mnist", spec, "trainer:default"))[len(first):] == \
        training.worker_command(OWNER, parse_job("mnist", {**spec, "elastic": {"launcher": "torchrun"}},
                                                 "trainer:default"))[1:]


def test_a_named_launcher_rolls_the_workers_and_an_unknown_one_is_refused():
    plain = training.template_hash(parse_job("mnist", FULL_SPEC, "t"))
    named = training.template_hash(parse_job("mnist", {**FULL_SPEC, "elastic": {**FULL_SPEC["elastic"],
                                                                            "launcher": "lepton"}}, "t"))
    assert plain == "87b86e51fcdf" and named != plain
    # The operator's trainer image changing (an upgrade) changes the image, which is hashed.
    assert training.template_hash(parse_job("mnist", {}, "trainer:1")) != \
        training.template_hash(parse_job("mnist", {}, "trainer:2"))
    with pytest.raises(InvalidSpec, match="elastic.launcher must be one of auto, lepton, torchrun; got 'mpirun'"):
        parse_job("mnist", {"elastic": {"launcher": "mpirun"}}, "t")


def test_per_step_runs_a_lighthouse_and_one_standalone_replica_group_per_pod():
    spec = {**FULL_SPEC, "faultTolerance": "perStep"}
    job = parse_job("mnist", spec, "trainer:default")
    worker, store, service, _ = built(spec)
    c = worker["spec"]["containers"][0]
    # Each pod's agent is standalone: its processes are one replica group; no c10d rendezvous.
    assert c["command"] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=5",
                            "-m", "lepton_trainer.train", "--model", "mlp"]
    env = {v["name"]: v.get("value") for v in c["env"]}
    assert env[contract.ENV_FAULT_TOLERANCE] == "perStep" and env[contract.ENV_REPLICA_ID] == "mnist-worker-0"
    assert env[contract.ENV_MIN_REPLICAS] == "2"
    assert env[contract.ENV_LIGHTHOUSE] == f"http://mnist-rdzv:{contract.RDZV_PORT}"
    assert env[contract.ENV_FT_QUORUM_TIMEOUT] == "300"       # elastic.joinTimeoutSeconds: waiting for workers.min
    # a failed quorum request (a Lighthouse gone or replaced) is asked again every 300/301 s
    assert env[contract.ENV_FT_QUORUM_RETRIES] == "300"
    assert env[contract.ENV_FT_TIMEOUT] == str(training.FT_TIMEOUT_SECONDS)
    # one reconnection to a replaced Lighthouse waits 10 s at most, not torchft's 60 s
    assert env[contract.ENV_FT_CONNECT_TIMEOUT] == "10" == str(training.FT_CONNECT_TIMEOUT_SECONDS)
    assert "POD_IP" in env                                     # the address the manager advertises
    # The rendezvous pod runs the Lighthouse on the store's port, in the operator's image.
    sc = store["spec"]["containers"][0]
    assert sc["image"] == "trainer:default"
    assert sc["command"] == ["python", "-m", "lepton_trainer.lighthouse", "--port", str(contract.RDZV_PORT),
                             "--min-replicas", "2", "--join-timeout-ms", "1000",
                             "--heartbeat-timeout-ms", str(training.LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS)]
    assert [p["name"] for p in sc["ports"]] == ["rdzv"] and sc["readinessProbe"]["tcpSocket"]["port"] == "rdzv"
    assert [p["port"] for p in service["spec"]["ports"]] == [contract.RDZV_PORT]   # no report port
    # The default stays torchrun's model, with the same template hash as before the field existed.
    assert training.template_hash(parse_job("mnist", {**FULL_SPEC, "faultTolerance": "restart"}, "t")) == \
        "87b86e51fcdf" != training.template_hash(parse_job("mnist", spec, "t"))
    assert training.worker_command(OWNER, parse_job("mnist", FULL_SPEC, "t"))[1].startswith("--nnodes=2:4")
    # The lepton launcher takes the same standalone options.
    lepton = training.worker_command(OWNER, parse_job("mnist", {**spec, "image": None}, "trainer:default"))
    assert lepton[:3] == ["python", "-m", "lepton_trainer.launch"] and lepton[3:] == c["command"][1:]
    with pytest.raises(InvalidSpec, match="faultTolerance must be one of restart, perStep; got 'perEpoch'"):
        parse_job("mnist", {"faultTolerance": "perEpoch"}, "t")
    with pytest.raises(InvalidSpec, match="TORCHFT_LIGHTHOUSE is set by the operator"):
        parse_job("mnist", {"env": [{"name": "TORCHFT_LIGHTHOUSE", "value": "http://x"}]}, "t")


def test_per_step_network_policy_opens_only_the_lighthouse_port_and_only_to_the_workers():
    job = parse_job("mnist", {**FULL_SPEC, "faultTolerance": "perStep"}, "t")   # policies by default
    store_policy = training.network_policies(OWNER, job, "lepton-system", OPERATOR_LABELS)[0]
    assert store_policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"lepton.ai/job": "mnist", "lepton.ai/role": "worker"}}}],
         "ports": [{"port": contract.RDZV_PORT, "protocol": "TCP"}]}]    # the Lighthouse: workers only


def test_security_context_and_gpu_defaults():
    pod = built()[0]
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    uid = contract.IMAGE_UID
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"],
            spec["securityContext"]["fsGroup"]) == (uid, uid, uid)
    assert c["resources"]["limits"][GPU_RESOURCE] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert pod["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "team-a-queue"
    assert (spec["schedulerName"], spec["priorityClassName"], spec["nodeSelector"]) == ("volcano", "high", {"gpu": "a100"})
    assert spec["restartPolicy"] == "Never"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "0b5e-uid"


@pytest.mark.parametrize("spec, tolerated", [
    ({}, False),                                                       # no GPUs: no GPU toleration
    ({"resources": {"gpus": 1}}, True),
    ({"resources": {"gpus": 1}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal",
                                                 "value": "x", "effect": "NoExecute"}]}, False),  # user's wins
])
def test_gpu_toleration_only_when_needed(spec, tolerated):
    tol = built(spec)[0]["spec"].get("tolerations", [])
    assert (GPU_TOLERATION in tol) is tolerated


def test_pod_security_context_override_and_env_and_volumes():
    pod = built({"podSecurityContext": {"runAsUser": 2000},
                 "checkpoint": {"claimName": "ckpt"}, "output": {"claimName": "models", "path": "/models"}})[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == 2000
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_CHECKPOINT_DIR] == "/checkpoints" and env[contract.ENV_OUTPUT_DIR] == "/models"
    assert env[contract.ENV_JOB_UID] == "0b5e-uid"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["ckpt", "models"]


def test_rendezvous_pod_and_services_declare_fixed_ports():
    _, rdzv_pod, rdzv_svc, workers = built()
    assert rdzv_pod["spec"]["containers"][0]["command"] == [
        "python", "-m", "lepton_trainer.rendezvous", "--port", str(contract.RDZV_PORT),
        "--control-port", str(contract.RDZV_CONTROL_PORT), "--run-id", "0b5e-uid"]   # the job's run only
    assert rdzv_pod["spec"]["containers"][0]["image"] == "trainer:default"   # not the user's image
    assert GPU_RESOURCE not in str(rdzv_pod["spec"]["containers"][0]["resources"])
    assert [(p["name"], p["port"], p["targetPort"]) for p in rdzv_svc["spec"]["ports"]] == [
        ("rdzv", contract.RDZV_PORT, "rdzv"), ("control", contract.RDZV_CONTROL_PORT, "control")]
    assert {p["name"]: p["containerPort"] for p in rdzv_pod["spec"]["containers"][0]["ports"]} == {
        "rdzv": contract.RDZV_PORT, "control": contract.RDZV_CONTROL_PORT}
    assert workers["spec"]["clusterIP"] == "None"
    assert workers["spec"]["ports"][0]["port"] == contract.METRICS_PORT


def test_the_stores_token_is_a_secret_owned_by_the_job_and_mounted_only_into_the_store():
    secret = training.rendezvous_secret(OWNER, "t0ken")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "mnist-rdzv"
    assert secret["metadata"]["namespace"] == "team-a" and secret["immutable"] is True
    assert secret["stringData"] == {contract.RDZV_TOKEN_KEY: "t0ken"}
    owner_ref = secret["metadata"]["ownerReferences"][0]        # deleted with the job
    assert (owner_ref["kind"], owner_ref["uid"], owner_ref["controller"]) == ("LeptonJob", "0b5e-uid", True)
    assert training.secret_token({"data": {contract.RDZV_TOKEN_KEY: "dDBrZW4="}}) == "t0ken"
    assert training.secret_token({"data": {}}) == "" == training.secret_token({"data": {"token": "%%"}})

    worker, rdzv_pod, _, _ = built()
    store = rdzv_pod["spec"]["containers"][0]
    volume = next(v for v in rdzv_pod["spec"]["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "mnist-rdzv"
    assert volume["secret"]["items"] == [{"key": contract.RDZV_TOKEN_KEY, "path": contract.RDZV_TOKEN_KEY}]
    # read-only, readable by the pod's fsGroup (the image's user) and nobody else
    assert volume["secret"]["defaultMode"] == 0o440 and rdzv_pod["spec"]["securityContext"]["fsGroup"] == \
        contract.IMAGE_UID
    mount = next(m for m in store["volumeMounts"] if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": contract.RDZV_TOKEN_DIR, "readOnly": True}
    assert contract.RDZV_TOKEN_FILE == f"{contract.RDZV_TOKEN_DIR}/{contract.RDZV_TOKEN_KEY}"
    # never in env or args, and never in a worker
    assert "mnist-rdzv" not in str(store.get("env")) and "secret" not in str(worker["spec"]["volumes"])
    assert not any("secretKeyRef" in str(c.get("env")) for c in (store, worker["spec"]["containers"][0]))


def test_a_lighthouse_needs_no_token():
    spec = parse_job("mnist", {**FULL_SPEC, "faultTolerance": "perStep"}, "trainer:default")
    pod = training.rendezvous_objects(OWNER, spec, "trainer:default")[0]
    assert "secret" not in str(pod["spec"]["volumes"]) and "--run-id" not in pod["spec"]["containers"][0]["command"]


def test_template_hash_ignores_worker_index():
    job = parse_job("mnist", FULL_SPEC, "t")
    a, b = training.worker_pod(OWNER, job, 0), training.worker_pod(OWNER, job, 3)
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]
    assert (a["spec"]["hostname"], b["spec"]["hostname"]) == ("mnist-worker-0", "mnist-worker-3")


def test_read_only_root_with_a_writable_home_and_tmp_in_every_pod():
    """The root filesystem is read-only, so HOME and TMPDIR must point at the /tmp emptyDir
    (torchrun writes /tmp/torchelastic_*, torch.compile /tmp/torchinductor_<user>)."""
    for pod in built()[:2]:                       # a worker and the rendezvous store
        spec, c = pod["spec"], pod["spec"]["containers"][0]
        tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")
        assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HOME"] == env["TMPDIR"] == "/tmp"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_every_empty_dir_has_a_size_limit():
    """An emptyDir without sizeLimit can fill a node's disk (or, as memory, its RAM):
    /dev/shm holds at most the worker's memory, or 1Gi when the spec sets none."""
    for spec, shm in ((FULL_SPEC, "16Gi"), ({k: v for k, v in FULL_SPEC.items() if k != "resources"}, "1Gi")):
        pods = built(spec)
        dirs = [v for p in pods if p.get("kind") == "Pod" for v in p["spec"]["volumes"] if "emptyDir" in v]
        assert dirs and all(v["emptyDir"].get("sizeLimit") for v in dirs)
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}} in dirs


def test_container_security_fields_override_one_by_one():
    pod = built({**FULL_SPEC, "securityContext": {"readOnlyRootFilesystem": False}})[0]
    c = pod["spec"]["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}      # the rest stays hardened
    with pytest.raises(InvalidSpec, match="HOME is set by the operator"):
        parse_job("mnist", {"env": [{"name": "HOME", "value": "/root"}]}, "t")


def test_the_image_user_is_the_pods_user():
    """trainer_image/Dockerfile creates the user the builders run pods as."""
    dockerfile = (pathlib.Path(__file__).parents[2] / "trainer_image" / "Dockerfile").read_text()
    uid = contract.IMAGE_UID
    assert f"--uid {uid}" in dockerfile and f"USER {uid}:{uid}" in dockerfile


# --- probes and limits of the rendezvous store; workers' probes ----------------------

def test_the_rendezvous_store_has_startup_readiness_and_liveness_probes_and_limits():
    c = built()[1]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "rdzv"}, probe
    # Liveness restarts the store (losing the rendezvous state) only after a minute without
    # an accepted connection; startup leaves minutes for the interpreter and torch to load.
    live, start = c["livenessProbe"], c["startupProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60 and live["timeoutSeconds"] >= 5
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["resources"]["requests"]["cpu"] == "100m"


def test_workers_carry_no_probe_that_could_kill_or_hold_them():
    """A liveness kill ends a restartPolicy Never worker as a failure, and the metrics port
    is down while a worker waits in rendezvous (charts/lepton-operator/README.md,
    "Scanner findings")."""
    c = built()[0]["spec"]["containers"][0]
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c)


# --- digests ------------------------------------------------------------------------

DIGEST_IMAGE = "registry.example/ml/train@sha256:" + "ab" * 32


def test_images_pinned_by_digest_pass_unchanged():
    job = parse_job("mnist", {"image": DIGEST_IMAGE}, "trainer:default")
    assert job.image == DIGEST_IMAGE
    assert training.worker_pod(OWNER, job, 0)["spec"]["containers"][0]["image"] == DIGEST_IMAGE
    trainer = "registry.example/ml/lepton-trainer@sha256:" + "cd" * 32
    default = parse_job("mnist", {}, trainer)
    rdzv = training.rendezvous_objects(OWNER, default, trainer)[0]
    assert default.image == trainer and rdzv["spec"]["containers"][0]["image"] == trainer


# --- NetworkPolicies ----------------------------------------------------------------

PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def policies(network_policy):
    return training.network_policies(OWNER, parse_job("mnist", {**FULL_SPEC, "networkPolicy": network_policy}, "t"))


OPERATOR_LABELS = (("app.kubernetes.io/name", "lepton-operator"), ("app.kubernetes.io/instance", "lepton"))


def test_network_policies_are_made_by_default_and_none_when_opted_out():
    made = training.network_policies(OWNER, parse_job("mnist", FULL_SPEC, "t"))
    assert [p["metadata"]["name"] for p in made] == ["mnist-rdzv", "mnist-workers"]
    assert made == policies({}) == policies({"enabled": True})
    assert policies({"enabled": False, "ingressFrom": PEERS}) == []


def test_golden_job_network_policies():
    """Both modes, with the operator's namespace and pod labels as the chart gives them."""
    docs = [p for mode in ("restart", "perStep")
            for p in training.network_policies(OWNER, parse_job("mnist", {**FULL_SPEC, "faultTolerance": mode}, "t"),
                                               "lepton-system", OPERATOR_LABELS)]
    check_golden("job_network_policies.yaml", docs)


def test_the_store_accepts_only_the_jobs_workers_on_its_port():
    rdzv, _ = policies({"enabled": True})
    assert rdzv["apiVersion"] == "networking.k8s.io/v1" and rdzv["kind"] == "NetworkPolicy"
    assert rdzv["metadata"]["name"] == "mnist-rdzv" and rdzv["metadata"]["namespace"] == "team-a"
    assert rdzv["metadata"]["ownerReferences"][0]["uid"] == "0b5e-uid"
    assert rdzv["metadata"]["labels"]["lepton.ai/job"] == "mnist"
    spec = rdzv["spec"]
    assert spec["podSelector"] == {"matchLabels": {"lepton.ai/job": "mnist", "lepton.ai/role": "rendezvous"}}
    assert spec["policyTypes"] == ["Ingress"]                    # egress stays open
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"lepton.ai/job": "mnist",
                                                                           "lepton.ai/role": "worker"}}}],
                                "ports": [{"port": contract.RDZV_PORT, "protocol": "TCP"}]}]


def test_the_operators_namespace_may_reach_only_the_stores_report_port():
    job = parse_job("mnist", {**FULL_SPEC, "networkPolicy": {"enabled": True}}, "t")
    rdzv, workers = training.network_policies(OWNER, job, operator_namespace="lepton-system")
    from_workers, from_operator = rdzv["spec"]["ingress"]
    assert from_workers["ports"] == [{"port": contract.RDZV_PORT, "protocol": "TCP"}]
    assert from_operator == {"from": [{"namespaceSelector": {"matchLabels": {
                                 "kubernetes.io/metadata.name": "lepton-system"}}}],
                             "ports": [{"port": contract.RDZV_CONTROL_PORT, "protocol": "TCP"}]}
    assert "lepton-system" not in str(workers)                  # the workers' policy is unchanged


def test_only_the_operators_own_pods_may_reach_the_report_port_when_their_labels_are_known():
    rdzv, workers = training.network_policies(OWNER, parse_job("mnist", FULL_SPEC, "t"), "lepton-system",
                                              OPERATOR_LABELS)
    _, from_operator = rdzv["spec"]["ingress"]
    # One peer with both selectors: pods with these labels in that namespace (two peers
    # would let in every pod of the namespace, and pods with these labels anywhere).
    assert from_operator == {"from": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "lepton-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "lepton-operator",
                                        "app.kubernetes.io/instance": "lepton"}}}],
        "ports": [{"port": contract.RDZV_CONTROL_PORT, "protocol": "TCP"}]}
    assert "lepton-system" not in str(workers["spec"])
    # Without the operator's namespace nobody but the workers reaches the rendezvous pod.
    alone, _ = training.network_policies(OWNER, parse_job("mnist", FULL_SPEC, "t"), "", OPERATOR_LABELS)
    assert [rule["ports"] for rule in alone["spec"]["ingress"]] == [[{"port": contract.RDZV_PORT, "protocol": "TCP"}]]


def test_keep_alive_comes_from_the_spec_and_old_jobs_keep_their_template_hash():
    custom = {**FULL_SPEC, "elastic": {**FULL_SPEC["elastic"], "keepAliveIntervalSeconds": 10,
                                       "keepAliveMaxAttempts": 6}}
    cmd = built(custom)[0]["spec"]["containers"][0]["command"]
    conf = next(a for a in cmd if a.startswith("--rdzv-conf="))
    assert "keep_alive_interval=10" in conf and "keep_alive_max_attempt=6" in conf
    default, changed = (training.template_hash(parse_job("mnist", s, "t")) for s in (FULL_SPEC, custom))
    assert default != changed                       # a changed keep-alive rolls the workers
    # A spec that does not set them keeps the hash it had before the fields existed, so an
    # operator upgrade does not replace running workers.
    assert default == "87b86e51fcdf"


def test_workers_accept_each_other_on_every_port_and_the_metrics_port_from_ingress_from():
    workers_only = {"podSelector": {"matchLabels": {"lepton.ai/job": "mnist", "lepton.ai/role": "worker"}}}
    _, open_metrics = policies({"enabled": True})
    assert open_metrics["metadata"]["name"] == "mnist-workers"
    spec = open_metrics["spec"]
    assert spec["podSelector"] == {"matchLabels": {"lepton.ai/job": "mnist", "lepton.ai/role": "worker"}}
    assert spec["policyTypes"] == ["Ingress"]
    metrics = [{"port": contract.METRICS_PORT, "protocol": "TCP"}]
    assert spec["ingress"] == [{"from": [workers_only]}, {"ports": metrics}]     # any source, metrics only
    _, restricted = policies({"enabled": True, "ingressFrom": PEERS})
    assert restricted["spec"]["ingress"] == [{"from": [workers_only]}, {"from": PEERS, "ports": metrics}]


def test_a_policy_carries_the_hash_of_its_spec():
    from lepton_operator.constants import ANNOTATION_SPEC_HASH
    from lepton_operator.core.objects import spec_hash
    _, a = policies({"enabled": True})
    _, b = policies({"enabled": True, "ingressFrom": PEERS})
    assert a["metadata"]["annotations"][ANNOTATION_SPEC_HASH] == spec_hash(a)
    assert a["metadata"]["annotations"][ANNOTATION_SPEC_HASH] != b["metadata"]["annotations"][ANNOTATION_SPEC_HASH]


def test_network_policy_is_not_part_of_the_worker_template():
    """Turning policies on or off never replaces running workers (TemplateChanged)."""
    plain = parse_job("mnist", FULL_SPEC, "t")
    fenced = parse_job("mnist", {**FULL_SPEC, "networkPolicy": {"enabled": True, "ingressFrom": PEERS}}, "t")
    assert training.template_hash(plain) == training.template_hash(fenced)


@pytest.mark.parametrize("network_policy, message", [
    ({"enabled": "yes"}, "networkPolicy.enabled must be true or false"),
    ({"ingressFrom": {"podSelector": {}}}, "networkPolicy.ingressFrom must be a list"),
    ({"ingressFrom": [{}]}, r"ingressFrom\[0\] must set podSelector, namespaceSelector or ipBlock"),
    ({"ingressFrom": [{"podSelecter": {}}]}, r"ingressFrom\[0\] has unknown fields \['podSelecter'\]"),
    ({"ingressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}, "ipBlock cannot be combined"),
    ({"ingressFrom": [{"ipBlock": {}}]}, r"ingressFrom\[0\]\.ipBlock\.cidr is required"),
    ("on", "networkPolicy must be an object"),
])
def test_bad_network_policy_is_an_invalid_spec(network_policy, message):
    with pytest.raises(InvalidSpec, match=message):
        parse_job("mnist", {**FULL_SPEC, "networkPolicy": network_policy}, "t")


AVOID = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}]}]}}}


def test_pods_that_ask_for_no_gpu_stay_off_gpu_nodes_unless_placed():
    """The rendezvous pod asks for no GPU: no GPU toleration, off GPU nodes. So do workers
    with gpus: 0. spec.rendezvous places the store apart from the workers; its priority is
    the workers' unless it names one."""
    worker, rdzv, *_ = built({"resources": {"gpus": 1}, "priorityClassName": "high", "tolerations": [
        {"key": "pool", "operator": "Exists"}]})
    assert GPU_TOLERATION in worker["spec"]["tolerations"] and "affinity" not in worker["spec"]
    assert "tolerations" not in rdzv["spec"] and rdzv["spec"]["affinity"] == AVOID
    assert rdzv["spec"]["priorityClassName"] == "high"
    cpu_worker = built({"resources": {"gpus": 0}})[0]
    assert "tolerations" not in cpu_worker["spec"] and cpu_worker["spec"]["affinity"] == AVOID
    placed = {"nodeSelector": {"pool": "system"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
              "affinity": {"podAffinity": {}}, "priorityClassName": "store"}
    rdzv = built({"resources": {"gpus": 1}, "rendezvous": placed})[1]
    assert (rdzv["spec"]["nodeSelector"], rdzv["spec"]["tolerations"], rdzv["spec"]["affinity"],
            rdzv["spec"]["priorityClassName"]) == ({"pool": "system"}, placed["tolerations"], {"podAffinity": {}}, "store")


@pytest.mark.parametrize("rendezvous", [
    {"nodeSelector": {"nvidia.com/gpu.present": "true"}},
    {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    {"tolerations": [{"operator": "Exists"}]},
], ids=["selects-gpu-nodes", "tolerates-the-gpu-taint", "tolerates-every-taint"])
def test_a_placement_that_chooses_gpu_nodes_is_not_contradicted_by_the_default(rendezvous):
    """Asking for the GPU nodes by their label, or tolerating their taint, is the user's
    choice: the default that keeps GPU-less pods off them would make a selector on their
    label unschedulable."""
    rdzv = built({"resources": {"gpus": 0}, "rendezvous": rendezvous})[1]
    assert "affinity" not in rdzv["spec"], rdzv["spec"]


def test_the_rendezvous_placement_is_no_change_of_the_worker_template():
    base = parse_job("mnist", {"resources": {"gpus": 1}}, "img")
    placed = parse_job("mnist", {"resources": {"gpus": 1}, "rendezvous": {"nodeSelector": {"pool": "system"}}}, "img")
    assert training.template_hash(base) == training.template_hash(placed)


def test_a_rendezvous_placement_the_pod_api_would_refuse_is_an_invalid_spec():
    with pytest.raises(InvalidSpec) as err:
        parse_job("mnist", {"rendezvous": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}}, "img")
    assert "rendezvous.tolerations[0].value must be empty when operator is Exists" in str(err.value)
