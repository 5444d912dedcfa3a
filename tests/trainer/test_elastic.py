"""Elastic training with the dedicated rendezvous store: a worker dies, a node joins."""
import os
import re
import signal

import pytest
import torch

from lepton_trainer import contract
from lepton_trainer.checkpoint import CheckpointManager
from test_metrics import scrape
from torchrun_procs import free_port, procs, rdzv_endpoint, start_agent  # noqa: F401

pytestmark = pytest.mark.trainer

# Runs until the test stops it: the assertions are about what happens mid-training.
ENDLESS = ["--steps", "1000000", "--checkpoint-every", "100", "--log-every", "100", "--keep", "3"]


def _train(ckpt, job):
    return ["-m", "lepton_trainer.train", "--model", "mlp", "--global-batch-size", "60",
            "--checkpoint-dir", str(ckpt), "--job-name", job, *ENDLESS]


def _checkpoint_step(agent, at_least, after=0):
    while True:
        match = agent.wait_for(r"event=checkpoint step=(\d+)", after=after)
        if int(match.group(1)) >= at_least:
            return int(match.group(1)), match.end()
        after = match.end()


def test_killed_worker_resumes_from_checkpoint_not_step_zero(tmp_path, procs, rdzv_endpoint):
    ckpt, ports = tmp_path / "ckpt", (free_port(), free_port())
    a, b = (start_agent(procs, tmp_path, name, rdzv_endpoint, "kill", (2, 2),
                        script=_train(ckpt, "kill-job"),
                        env={contract.ENV_METRICS_PORT: str(port)})
            for name, port in zip("ab", ports))
    victim = int(b.wait_for(r"event=start pid=(\d+) .*restart=0").group(1))
    before, pos = _checkpoint_step(a, at_least=200)

    os.kill(victim, signal.SIGKILL)

    restarted = b.wait_for(r"event=start pid=(\d+) world=2 .*restart=1")
    assert int(restarted.group(1)) != victim
    resumed = b.wait_for(r"event=resume step=(\d+) from_world=2 world=2", after=restarted.end())
    step = int(resumed.group(1))
    assert step >= before                               # not step 0, not before the checkpoint
    first = int(b.wait_for(r"event=step step=(\d+)", after=resumed.end()).group(1))
    assert first > step
    after, _ = _checkpoint_step(a, at_least=step + 100, after=pos)
    assert CheckpointManager(ckpt).load_latest()["step"] >= after

    labels = tuple(sorted({contract.METRICS_JOB_LABEL: "kill-job",
                           contract.METRICS_NAMESPACE_LABEL: ""}.items()))
    metrics_b = scrape(ports[1])
    assert metrics_b[(contract.METRIC_RESTARTS, labels)] == 1
    assert metrics_b[(contract.METRIC_WORLD_SIZE, labels)] == 2
    assert metrics_b[(contract.METRIC_STEP, labels)] > step
    assert metrics_b[(contract.METRIC_CHECKPOINT_STEP, labels)] >= step
    # Agent a restarts its worker too: either for the membership change (not counted) or
    # because its collective failed when the peer died (counted). Its metric must match
    # the count torchrun gave its current worker, whichever happened.
    a_restarts = int(re.findall(r"event=start pid=\d+ .*restart=(\d+)", a.text())[-1])
    assert a_restarts in (0, 1)
    assert scrape(ports[0])[(contract.METRIC_RESTARTS, labels)] == a_restarts


def test_third_node_joins_running_job(tmp_path, procs, rdzv_endpoint):
    ckpt = tmp_path / "ckpt"
    env = {contract.ENV_METRICS_PORT: "0"}
    a, b = (start_agent(procs, tmp_path, name, rdzv_endpoint, "grow", (2, 3),
                        script=_train(ckpt, "grow"), env=env) for name in "ab")
    a.wait_for(r"event=start pid=\d+ world=2 ")
    before, _ = _checkpoint_step(a, at_least=200)

    c = start_agent(procs, tmp_path, "c", rdzv_endpoint, "grow", (2, 3),
                    script=_train(ckpt, "grow"), env=env)
    c.wait_for(r"event=start pid=\d+ world=3 ")
    resumed = c.wait_for(r"event=resume step=(\d+) from_world=2 world=3")
    step = int(resumed.group(1))
    assert step >= before
    assert re.search(r"event=start pid=\d+ world=3 ", a.text())
    grown, _ = _checkpoint_step(a, at_least=step + 100, after=a.text().index("world=3"))
    state = torch.load(CheckpointManager(ckpt).path_for(grown), weights_only=True)
    assert state["world_size"] == 3 and state["global_batch_size"] == 60
