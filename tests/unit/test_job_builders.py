"""Training builders: golden YAML for a full job, table-driven checks for the rules."""
import os
import pathlib

import pytest
import yaml

from lepton_operator.job import objects as training
from lepton_operator.constants import GPU_RESOURCE, LABEL_KUEUE_QUEUE
from lepton_operator.core.objects import GPU_TOLERATION
from lepton_operator.job.spec import InvalidSpec, parse_job
from lepton_trainer import contract

pytestmark = pytest.mark.unit
GOLDEN = pathlib.Path(__file__).parent / "golden"
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
    text = yaml.safe_dump_all(built(), sort_keys=True)
    path = GOLDEN / "job_full.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), "run with UPDATE_GOLDEN=1 and review the diff"


def test_worker_command_is_elastic_torchrun_against_dedicated_store():
    cmd = built()[0]["spec"]["containers"][0]["command"]
    assert cmd[0] == "torchrun"
    assert "--nnodes=2:4" in cmd and "--nproc-per-node=2" in cmd and "--max-restarts=5" in cmd
    assert f"--rdzv-endpoint=mnist-rdzv:{contract.RDZV_PORT}" in cmd
    assert "--rdzv-id=0b5e-uid" in cmd and "--local-addr=$(POD_IP)" in cmd
    conf = next(a for a in cmd if a.startswith("--rdzv-conf="))
    assert "is_host=false" in conf and "join_timeout=300" in conf and "last_call_timeout=1" in conf
    assert cmd[-4:] == ["-m", "lepton_trainer.train", "--model", "mlp"]


def test_user_script_runs_unchanged():
    cmd = built({"command": ["/app/train.py"], "args": ["--lr", "0.1"]})[0]["spec"]["containers"][0]["command"]
    assert cmd[-3:] == ["/app/train.py", "--lr", "0.1"] and "-m" not in cmd


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
        "python", "-m", "lepton_trainer.rendezvous", "--port", str(contract.RDZV_PORT)]
    assert rdzv_pod["spec"]["containers"][0]["image"] == "trainer:default"   # not the user's image
    assert GPU_RESOURCE not in str(rdzv_pod["spec"]["containers"][0]["resources"])
    assert rdzv_svc["spec"]["ports"][0]["port"] == contract.RDZV_PORT
    assert workers["spec"]["clusterIP"] == "None"
    assert workers["spec"]["ports"][0]["port"] == contract.METRICS_PORT


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
        assert tmp == {"name": "tmp", "emptyDir": {}}
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HOME"] == env["TMPDIR"] == "/tmp"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True


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
