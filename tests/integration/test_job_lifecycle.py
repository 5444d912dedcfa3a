"""LeptonJob on the real control plane: placement, contract, scaling, capacity and gang creation."""
import base64

import pytest

from lepton_trainer import contract

pytestmark = pytest.mark.integration


def test_apply_schedules_workers_on_gpu_nodes_with_the_contract(k, cluster):
    k.pvc("ckpt")
    k.apply(k.manifest("train", resources={"gpus": 2}, workers={"min": 2, "max": 3, "replicas": 2},
                       env=[{"name": "EPOCHS", "value": "3"}], args=["--model", "mlp"],
                       checkpoint={"claimName": "ckpt", "path": "/ckpt"}))
    status = k.wait_phase("train", "Running")
    uid = k.job("train")["metadata"]["uid"]
    pods = k.wait_workers("train", 2)
    for i, pod in enumerate(pods):
        spec, c = pod["spec"], pod["spec"]["containers"][0]
        assert spec["nodeName"] in cluster.gpu_nodes
        assert spec["hostname"] == f"train-worker-{i}" and spec["subdomain"] == "train-workers"
        cmd = c["command"]
        # The operator's trainer image (the default): torchrun's agent through the launcher.
        assert cmd[:3] == ["python", "-m", "lepton_trainer.launch"]
        assert "--nnodes=2:3" in cmd and "--nproc-per-node=2" in cmd
        assert f"--rdzv-endpoint=train-rdzv:{contract.RDZV_PORT}" in cmd and f"--rdzv-id={uid}" in cmd
        assert cmd[-4:] == ["-m", "lepton_trainer.train", "--model", "mlp"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[contract.ENV_JOB_UID] == uid and env[contract.ENV_CHECKPOINT_DIR] == "/ckpt"
        assert env["EPOCHS"] == "3"
        assert {"name": "metrics", "containerPort": contract.METRICS_PORT, "protocol": "TCP"} in c["ports"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert {"name": "ckpt", "mountPath": "/ckpt"} in [
            {"name": v["persistentVolumeClaim"]["claimName"], "mountPath": m["mountPath"]}
            for v in spec["volumes"] if "persistentVolumeClaim" in v
            for m in c["volumeMounts"] if m["name"] == v["name"]]
    rdzv = k.get("pod", "train-rdzv")
    assert rdzv["spec"]["containers"][0]["command"][-7:] == [
        "lepton_trainer.rendezvous", "--port", str(contract.RDZV_PORT),
        "--control-port", str(contract.RDZV_CONTROL_PORT), "--run-id", uid]
    # The store's token: a Secret of the job's own (deleted with it), mounted into the store only.
    secret = k.get("secret", "train-rdzv")
    assert [(o["kind"], o["uid"]) for o in secret["metadata"]["ownerReferences"]] == [("LeptonJob", uid)]
    assert len(base64.b64decode(secret["data"][contract.RDZV_TOKEN_KEY])) >= 32 and secret["immutable"] is True
    assert [v["secret"]["secretName"] for v in rdzv["spec"]["volumes"] if "secret" in v] == ["train-rdzv"]
    assert not any("secret" in v for v in pods[0]["spec"]["volumes"])
    assert [p["port"] for p in k.get("service", "train-rdzv")["spec"]["ports"]] == [
        contract.RDZV_PORT, contract.RDZV_CONTROL_PORT]
    assert k.get("service", "train-workers")["spec"]["clusterIP"] == "None"
    assert status["workers"] == {"desired": 2, "scheduled": 2, "running": 2, "ready": 2}
    assert k.condition("train", "Ready")["status"] == "True"
    assert k.condition("train", "Ready")["observedGeneration"] == k.job("train")["metadata"]["generation"]
    assert "2/2" in k.kubectl("get", "lj", "train")         # printer column READY
    assert any(e["reason"] == "Running" for e in k.events("train"))


def test_kubectl_scale_up_and_down(k):
    k.apply(k.manifest("scale", workers={"min": 1, "max": 4, "replicas": 1}))
    k.wait_workers("scale", 1)
    k.kubectl("scale", "lj/scale", "--replicas=4")
    pods = k.wait_workers("scale", 4)
    assert [p["metadata"]["name"] for p in pods] == [f"scale-worker-{i}" for i in range(4)]
    k.wait_phase("scale", "Running")
    k.kubectl("scale", "lj/scale", "--replicas=2")
    pods = k.wait_workers("scale", 2)
    assert [p["metadata"]["name"] for p in pods] == ["scale-worker-0", "scale-worker-1"]
    status = k.wait_for("status to settle at 2", lambda: (s := k.status("scale"))["workers"]["running"] == 2
                        and s.get("phase") == "Running" and s)
    assert status["replicas"] == 2
    scale = k.kubectl("get", "lj", "scale", "--subresource=scale", "-o", "jsonpath={.status.replicas}")
    assert scale == "2"
    result = k.run("scale", "lj/scale", "--replicas=9")
    assert result.returncode != 0 and "must be between workers.min and workers.max" in result.stderr


def test_scale_up_is_limited_by_gpu_capacity(k, cluster):
    k.wait_for("no GPUs held by earlier tests", lambda: k.bound_gpus() == 0)
    total = cluster.gpu_node_count * cluster.gpus_per_node
    per_worker = cluster.gpus_per_node // 2            # two workers per node fit
    fit = total // per_worker
    k.apply(k.manifest("big", resources={"gpus": per_worker},
                       workers={"min": 1, "max": fit + 2, "replicas": fit + 2}))
    k.wait_workers("big", fit)
    status = k.wait_for("status to show the capacity limit",
                        lambda: (s := k.status("big")).get("workers", {}).get("running") == fit and s)
    assert status["workers"]["desired"] == fit + 2
    assert "wait for capacity" in k.condition("big", "Ready")["message"]
    assert not [p for p in k.workers("big") if p["status"]["phase"] == "Pending"]   # nothing sits Pending


def test_gang_creation_waits_until_min_fits(k, cluster):
    k.wait_for("no GPUs held by earlier tests", lambda: k.bound_gpus() == 0)
    g = cluster.gpus_per_node
    nodes = cluster.gpu_node_count
    # "hog" leaves one node's worth of GPUs minus one free: the gang of two full-node workers cannot start.
    k.apply(k.manifest("hog", resources={"gpus": 1}, workers={"min": 1, "max": 99, "replicas": g + 1}))
    k.wait_workers("hog", g + 1)
    k.apply(k.manifest("gang", resources={"gpus": g}, workers={"min": nodes, "max": nodes}))
    k.wait_for("gang to wait for capacity",
               lambda: k.condition("gang", "Ready").get("reason") == "WaitingForCapacity")
    assert k.workers("gang") == []                      # all-or-nothing: no half-started gang
    assert k.status("gang")["phase"] == "Pending"
    k.kubectl("delete", "lj", "hog")
    pods = k.wait_workers("gang", nodes)
    assert len({p["spec"]["nodeName"] for p in pods}) == nodes
    k.wait_phase("gang", "Running")


def test_template_change_replaces_workers_and_scaling_does_not(k):
    k.apply(k.manifest("roll", workers={"min": 1, "max": 3, "replicas": 2},
                       env=[{"name": "LR", "value": "0.1"}]))
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in k.wait_workers("roll", 2)}
    k.wait_phase("roll", "Running")
    k.kubectl("scale", "lj/roll", "--replicas=3")
    scaled = {p["metadata"]["name"]: p["metadata"]["uid"] for p in k.wait_workers("roll", 3)}
    assert {n: scaled[n] for n in before} == before          # a scale keeps the workers it has

    k.kubectl("patch", "lj", "roll", "--type=merge", "-p",
              '{"spec": {"env": [{"name": "LR", "value": "0.05"}]}}')

    def replaced():
        pods = k.workers("roll")
        env = [{e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]} for p in pods]
        return (len(pods) == 3 and all(p["status"].get("phase") == "Running" for p in pods)
                and all(e["LR"] == "0.05" for e in env) and pods)
    pods = k.wait_for("3 running workers built from the new template", replaced)
    assert not {p["metadata"]["uid"] for p in pods} & set(scaled.values())
    assert len({p["metadata"]["annotations"]["lepton.ai/spec-hash"] for p in pods}) == 1
    status = k.wait_phase("roll", "Running")
    assert status["restarts"] == {"counted": 0, "uncounted": 0}    # a rollout is not a failure
    assert any(e["reason"] == "TemplateChanged" for e in k.events("roll"))
