"""Contract test: the pods the operator builds really form an elastic torchrun job.

The worker and rendezvous pod specs come from the operator's builders. Their commands run
as local processes with their env, changed only where a pod's own network namespace and
volumes do not exist on one machine:

- Service host names -> 127.0.0.1, ``$(POD_IP)`` -> 127.0.0.1;
- the declared ports (store, metrics) -> free local ports, since all processes share one host;
- volume mount paths -> a temporary directory (the "PVC"), shared by all workers;
- ``torchrun`` -> ``python -m torch.distributed.run`` of this interpreter, ``python`` -> this
  interpreter (the ``lepton`` launcher: ``python -m lepton_trainer.launch``).

They must train; after one worker is killed (its whole process group, as when a pod is lost)
the survivor re-forms the group and continues from the checkpoint, with the loss where it
was; a replacement worker built by the operator for the same index joins again.

The lost node leaves the rendezvous in one of two ways: its keep-alive expires (the spec's
default, 3 s x 3), or, with a keep-alive of 10 minutes, the report the operator sends
when it sees the pod go (``POST /v1/forget`` on the store's control port). Here the test
sends that report itself, as the operator's pod watch would: this harness has no API
server. tests/unit/test_lost_workers.py covers which pods the operator reports, and
tests/real deletes a worker pod with the operator running in the cluster.

Each way runs under both launchers (``elastic.launcher``): ``torchrun`` and ``lepton``, whose
survivor's new worker process is forked from the forkserver that started the first one
(the same parent, not the agent), with torch already imported.

``faultTolerance: perStep`` runs the rendezvous pod's command (the torchft Lighthouse) and
standalone workers, one replica group each: the survivor's worker process keeps its PID
and its step through the loss, and the replacement takes the weights of the live peer.
The harness cannot show the pod network (the managers advertise the pod IP, here
127.0.0.1): tests/real runs the same scenario in real containers.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from lepton_operator.job import objects as training
from lepton_operator.job.spec import parse_job
from lepton_trainer import contract, rendezvous

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from torchrun_procs import Proc, free_port, kill_tree, process_tree  # noqa: E402  (shared real-process helper)

pytestmark = pytest.mark.e2e

OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
         "metadata": {"name": "contract", "namespace": "e2e", "uid": "4f1c9a2e-contract"}}
SPEC = {
    "module": "lepton_trainer.train",
    "args": ["--model", "mlp", "--global-batch-size", "60", "--steps", "1000000",
             "--checkpoint-every", "50", "--log-every", "50", "--keep", "3"],
    "workers": {"min": 1, "max": 2, "replicas": 2},
    "elastic": {"maxRestarts": 3, "lastCallTimeoutSeconds": 2, "joinTimeoutSeconds": 120},
    "checkpoint": {"claimName": "ckpt", "path": "/checkpoints"},
}


def local_command(container: dict, env: dict[str, str], rdzv_port: int) -> list[str]:
    """The container's command with $(VAR) expanded as the kubelet does and hosts mapped."""
    def expand(arg: str) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
        return re.sub(r"^--rdzv-endpoint=[^:]+:\d+$", f"--rdzv-endpoint=127.0.0.1:{rdzv_port}", arg)
    cmd = [expand(a) for a in container["command"]]
    if cmd[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    elif cmd[0] == "python":
        cmd[0] = sys.executable
    return cmd


def local_env(pod: dict, volume_root: Path) -> dict[str, str]:
    """The container's env: literal values, the pod IP, mount paths moved under ``volume_root``."""
    c = pod["spec"]["containers"][0]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
              if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: volume_root / claims[m["name"]] / m.get("subPath", "")
              for m in c.get("volumeMounts", []) if m["name"] in claims}
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            value = var["value"]
            for path, local in mounts.items():
                if value == path or value.startswith(path + "/"):
                    local.mkdir(parents=True, exist_ok=True)
                    value = str(local) + value[len(path):]
            env[var["name"]] = value
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[var["name"]] = "127.0.0.1"
    env[contract.ENV_METRICS_PORT] = str(free_port())
    return env


# The reported mode's keep-alive (10 minutes) is far beyond its wait for the resume.
REPORTED_KEEP_ALIVE = {"keepAliveIntervalSeconds": 60, "keepAliveMaxAttempts": 10}
RESUME_WAIT = 120.0


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"event=step step=\d+ loss=(\S+)", text)]


def parent(pid: int) -> int:
    return int(re.search(r"^PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


class Harness:
    """Runs operator-built pods as local processes (see the module docstring); the
    coordinator pod (the store or the Lighthouse) listens on free local ports."""

    def __init__(self, tmp_path: Path, coordinator: dict):
        self.tmp_path, self.coordinator = tmp_path, coordinator
        self.port, self.control_port = free_port(), free_port()
        self.started: list[Proc] = []

    def start(self, pod: dict, name: str) -> Proc:
        env = local_env(pod, self.tmp_path / "volumes")
        cmd = local_command(pod["spec"]["containers"][0], env, self.port)
        if pod is self.coordinator:
            cmd[cmd.index("--port") + 1] = str(self.port)
            if "--control-port" in cmd:
                cmd[cmd.index("--control-port") + 1] = str(self.control_port)
            cmd += ["--host", "127.0.0.1"]
        elif contract.ENV_LIGHTHOUSE in env:
            env[contract.ENV_LIGHTHOUSE] = f"http://127.0.0.1:{self.port}"
        proc = Proc(cmd, self.tmp_path / f"{name}.log", env)
        self.started.append(proc)
        return proc

    def start_job(self, spec, ready: str) -> tuple[Proc, Proc, Proc]:
        """The coordinator, once it logs ``ready``; then workers 0 and 1."""
        coordinator = self.start(self.coordinator, "coordinator")
        coordinator.wait_for(ready)
        return (coordinator, self.start(training.worker_pod(OWNER, spec, 0), "worker-0"),
                self.start(training.worker_pod(OWNER, spec, 1), "worker-1"))

    def stop(self) -> None:
        for proc in reversed(self.started):
            survivors = process_tree(proc.popen.pid)[1:]
            proc.stop()
            for pid in survivors:
                kill_tree(pid)


@pytest.mark.parametrize("launcher", ["torchrun", "lepton"])
@pytest.mark.parametrize("mode", ["keep-alive", "reported"])
def test_operator_built_pods_form_an_elastic_job_that_survives_a_lost_worker(tmp_path, mode, launcher):
    elastic = {**SPEC["elastic"], "launcher": launcher, **(REPORTED_KEEP_ALIVE if mode == "reported" else {})}
    spec = parse_job("contract", {**SPEC, "elastic": elastic}, "lepton-trainer:test")
    worker_cmd = training.worker_pod(OWNER, spec, 0)["spec"]["containers"][0]["command"]
    assert worker_cmd[:3 if launcher == "lepton" else 1] == training.LAUNCHER_COMMANDS[launcher]
    rdzv_pod, _service = training.rendezvous_objects(OWNER, spec, "lepton-trainer:test")
    harness = Harness(tmp_path, rdzv_pod)
    start, control_port = harness.start, harness.control_port
    try:
        store, w0, w1 = harness.start_job(spec, r"rendezvous store ready on port")
        first = int(w0.wait_for(r"event=start pid=(\d+) world=2 ").group(1))
        first_parent = parent(first)
        trained = int(w0.wait_for(r"event=checkpoint step=(\d+)").group(1))
        assert trained > 0

        # Lose worker 1 the way a pod is lost: agent and its worker die at once.
        mark = len(w0.text())
        before = losses(w0.text())
        kill_tree(w1.popen.pid)
        w1.popen.wait(30)
        if mode == "reported":   # what the operator sends when it sees the pod go
            answer = rendezvous.forget(f"http://127.0.0.1:{control_port}", OWNER["metadata"]["uid"],
                                       ["127.0.0.1"], spec.workers.min, pids=[w1.popen.pid])
            assert answer["forgotten"] == [f"127.0.0.1_{w1.popen.pid}_0"]
        resumed = w0.wait_for(r"event=resume step=(\d+) from_world=2 world=1", after=mark,
                              timeout=RESUME_WAIT)
        assert int(resumed.group(1)) >= trained            # continues from the checkpoint, not step 0
        again = int(w0.wait_for(r"event=start pid=(\d+) world=1 ", after=mark).group(1))
        if launcher == "lepton":   # forked by the forkserver that forked the first worker
            assert parent(again) == first_parent != w0.popen.pid
        else:                      # a new interpreter, started by the agent itself
            assert parent(again) == first_parent == w0.popen.pid
        step_after = int(w0.wait_for(r"event=step step=(\d+) loss=\S+ world=1", after=resumed.end()).group(1))
        assert step_after > int(resumed.group(1))
        # The loss continues where it was, not from an untrained model's: within twice the
        # highest of the last five logged (one batch's loss is noisy).
        after = losses(w0.text()[resumed.end():])[0]
        assert after < 2 * max(*before[-5:], 0.05), (before, after)

        # The operator's replacement for index 1 joins the running job.
        mark = len(w0.text())
        start(training.worker_pod(OWNER, spec, 1), "worker-1b")
        regrown = w0.wait_for(r"event=resume step=(\d+) from_world=1 world=2", after=mark)
        assert int(regrown.group(1)) >= step_after - 50
        w0.wait_for(r"event=step step=\d+ loss=\S+ world=2", after=regrown.end())
        assert store.popen.poll() is None                  # the store outlived the lost worker
    finally:
        harness.stop()


@pytest.mark.parametrize("launcher", ["torchrun", "lepton"])
def test_per_step_survivors_keep_their_processes_through_a_lost_worker_and_a_replaced_lighthouse(tmp_path, launcher):
    """The keep-alive is 10 minutes, far beyond the waits here: the group re-forms on the
    Lighthouse's heartbeat timeout, and no report is sent (perStep has no report port).
    Then the Lighthouse is replaced, and both groups rejoin the new one in place."""
    elastic = {**SPEC["elastic"], "launcher": launcher, **REPORTED_KEEP_ALIVE}
    spec = parse_job("contract", {**SPEC, "elastic": elastic, "faultTolerance": "perStep"}, "lepton-trainer:test")
    lighthouse_pod, _service = training.rendezvous_objects(OWNER, spec, "lepton-trainer:test")
    worker_env = {v["name"]: v.get("value") for v in training.worker_pod(OWNER, spec, 0)["spec"]["containers"][0]["env"]}
    assert worker_env[contract.ENV_LIGHTHOUSE] == f"http://contract-rdzv:{contract.RDZV_PORT}"
    harness = Harness(tmp_path, lighthouse_pod)
    start = harness.start

    def step_losses(text: str) -> dict[int, str]:
        return dict((int(a), b) for a, b in re.findall(r"event=step step=(\d+) loss=(\S+)", text))

    try:
        lighthouse, w0, w1 = harness.start_job(spec, r"lighthouse ready on port")
        pid = int(w0.wait_for(r"event=start pid=(\d+) .*fault_tolerance=perStep replica=contract-worker-0").group(1))
        w0.wait_for(r"event=quorum replicas=2 world=2 ")
        trained = int(w0.wait_for(r"event=checkpoint step=(\d+)").group(1))
        assert trained > 0

        # Lose worker 1 the way a pod is lost: agent and its worker die at once.
        mark = len(w0.text())
        before = losses(w0.text())
        last = max(step_losses(w0.text()))
        kill_tree(w1.popen.pid)
        w1.popen.wait(30)
        reformed = w0.wait_for(r"event=quorum replicas=1 world=1 rank=0 step=(\d+)", after=mark,
                               timeout=RESUME_WAIT)
        # The survivor goes on from the step in flight, not from the checkpoint ...
        assert int(reformed.group(1)) >= last >= trained
        after_step = int(w0.wait_for(r"event=step step=(\d+) loss=\S+ world=1", after=reformed.end()).group(1))
        assert after_step > int(reformed.group(1))
        # ... in the same process: no new worker process, no restart of the agent's group.
        assert re.findall(r"event=start pid=(\d+)", w0.text()) == [str(pid)]
        assert process_tree(w0.popen.pid)[1:] and pid in process_tree(w0.popen.pid)
        assert "event=resume" not in w0.text()[mark:]
        # The loss continues where it was, not from an untrained model's: within twice the
        # highest of the last five logged (one batch's loss is noisy).
        first_after = losses(w0.text()[reformed.end():])[0]
        assert first_after < 2 * max(*before[-5:], 0.05), (before, first_after)

        # The operator's replacement for index 1 joins at a step boundary with the live weights.
        mark = len(w0.text())
        w1b = start(training.worker_pod(OWNER, spec, 1), "worker-1b")
        healed = int(w1b.wait_for(r"event=heal step=(\d+) from_step=\d+").group(1))
        assert healed > after_step
        regrown = w0.wait_for(r"event=quorum replicas=2 world=2 rank=0 step=(\d+)", after=mark)
        assert int(regrown.group(1)) == healed
        w1b.wait_for(r"event=step step=\d+ loss=\S+ world=2")
        w0.wait_for(r"event=step step=\d+ loss=\S+ world=2", after=regrown.end())
        # Both groups log the global loss: the same value at the same step once they share weights.
        common = sorted(set(step_losses(w1b.text())) & set(step_losses(w0.text()[regrown.end():])))
        assert common and all(step_losses(w0.text())[s] == step_losses(w1b.text())[s] for s in common)
        assert re.findall(r"event=start pid=(\d+)", w0.text()) == [str(pid)]
        assert lighthouse.popen.poll() is None

        # The Lighthouse is replaced (the operator's new rendezvous pod, on the same port): the
        # groups ask again (TORCHFT_QUORUM_RETRIES, from the pods' env) and both step on with
        # it in the same processes, from no checkpoint. Its first quorum has the number and
        # members of the old one's first. (A Lighthouse stopped between answering one group's
        # quorum and the other's costs that step: torchft's collective timeout, 30 s.)
        marks = {w: len(w.text()) for w in (w0, w1b)}
        lighthouse.stop()
        start(lighthouse_pod, "coordinator-2").wait_for(r"lighthouse ready on port")
        for w in (w0, w1b):
            w.wait_for(r"event=step step=\d+ loss=\S+ world=2", after=marks[w], timeout=RESUME_WAIT)
            assert "event=resume" not in w.text()[marks[w]:], w.text()[-3000:]
        assert re.findall(r"event=start pid=(\d+)", w0.text()) == [str(pid)]
        assert len(re.findall(r"event=start pid=", w1b.text())) == 1
    finally:
        harness.stop()
