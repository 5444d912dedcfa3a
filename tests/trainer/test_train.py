"""The built-in trainer: real torchrun training, sharding rules, resume."""
import os
import re
import subprocess
import sys

import pytest
import torch

from lepton_trainer import modelio, models, data
from lepton_trainer.checkpoint import CheckpointManager
from lepton_trainer.rendezvous import WORKER_ENV
from lepton_trainer.train import global_batch_indices, rank_slice
from torchrun_procs import Proc, free_port, kill_tree, procs, rdzv_endpoint, start_agent  # noqa: F401 (fixtures)

pytestmark = pytest.mark.trainer


def test_two_process_torchrun_mlp_reaches_accuracy(tmp_path, procs, rdzv_endpoint):
    out = tmp_path / "model"
    agent = start_agent(procs, tmp_path, "agent", rdzv_endpoint, "acc", (1, 1), nproc=2, script=[
        "-m", "lepton_trainer", "train", "--model", "mlp", "--steps", "300",
        "--global-batch-size", "64", "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--output-dir", str(out), "--metrics-port", "0"])
    assert agent.wait() == 0, agent.text()[-3000:]
    log = agent.text()
    assert "rank=1/2 event=start" in log and "rank=0/2 event=start" in log
    meta = modelio.read_meta(out)
    assert meta["arch"] == "mlp" and meta["dataset"] == "digits"
    assert meta["input_shape"] == [64] and meta["dtype"] == "float32"
    assert meta["metrics"]["accuracy"] >= 0.9
    model, _ = modelio.load_model(out)
    split = data.load("digits")
    assert models.accuracy(model, split.x_test, split.y_test) == pytest.approx(
        meta["metrics"]["accuracy"])
    assert CheckpointManager(tmp_path / "ckpt").steps()[-1] == 300


def test_global_batch_does_not_depend_on_world_size():
    n, g = 1437, 64
    steps = [global_batch_indices(s, g, n, seed=0) for s in range(60)]
    stream = torch.cat(steps)
    # one epoch is a permutation of the split, the next one a different permutation
    assert sorted(stream[:n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:2 * n])
    for world in (1, 2, 3, 5):
        shards = [steps[7][rank_slice(g, world, r)] for r in range(world)]
        assert torch.equal(torch.cat(shards), steps[7])


@pytest.mark.parametrize("g,world,sizes", [(64, 2, [32, 32]), (64, 3, [22, 21, 21]),
                                           (10, 4, [3, 3, 2, 2]), (3, 3, [1, 1, 1])])
def test_remainder_goes_to_the_first_ranks(g, world, sizes):
    assert [len(range(g)[rank_slice(g, world, r)]) for r in range(world)] == sizes


def test_global_batch_smaller_than_world_is_an_error():
    with pytest.raises(ValueError, match="smaller than the world size"):
        rank_slice(2, 3, 0)


def test_corrupt_newest_checkpoint_resumes_from_previous(tmp_path, procs):
    ckpt = tmp_path / "ckpt"
    train = [sys.executable, "-m", "lepton_trainer.train", "--checkpoint-dir", str(ckpt),
             "--checkpoint-every", "50", "--metrics-port", "0", "--log-every", "10"]
    first = Proc([*train, "--steps", "100"], tmp_path / "first.log")
    procs.append(first)
    assert first.wait() == 0, first.text()[-3000:]
    manager = CheckpointManager(ckpt)
    assert manager.steps() == [50, 100]
    newest = manager.path_for(100)
    newest.write_bytes(newest.read_bytes()[:1000])       # a partial file

    second = Proc([*train, "--steps", "120"], tmp_path / "second.log")
    procs.append(second)
    assert second.wait() == 0, second.text()[-3000:]
    log = second.text()
    assert "skipping invalid checkpoint" in log and newest.name in log
    assert "event=resume step=50 " in log
    steps = [int(s) for s in re.findall(r"event=step step=(\d+)", log)]
    assert steps[0] == 60 and steps[-1] == 120          # from 50 onwards, never from 0
    assert manager.load_latest()["step"] == 120


def test_bad_flags_are_rejected(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lepton_trainer.train", "--model", "resnet"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice: 'resnet'" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lepton_trainer.train", "--steps", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--steps must be >= 1" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lepton_trainer.train", "--fault-tolerance", "perStep"],
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                              if k != "TORCHFT_LIGHTHOUSE"})
    assert res.returncode == 2 and "perStep needs --min-replicas >= 1 and $TORCHFT_LIGHTHOUSE" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lepton_trainer.train", "--fault-tolerance", "perStep"],
                         capture_output=True, text=True, env={**os.environ, "TORCHFT_LIGHTHOUSE": "http://x:1"})
    assert res.returncode == 1 and "perStep runs under torchrun" in res.stderr


def test_training_is_the_same_for_any_world_size(tmp_path, procs, rdzv_endpoint):
    """Constant global batch, remainder to the first ranks: 1 and 3 ranks take the same
    steps (64 examples over 3 ranks: 22, 21, 21)."""
    common = ["--steps", "20", "--checkpoint-every", "20", "--metrics-port", "0"]
    alone = Proc([sys.executable, "-m", "lepton_trainer.train", *common,
                  "--checkpoint-dir", str(tmp_path / "w1")], tmp_path / "w1.log")
    procs.append(alone)
    assert alone.wait() == 0, alone.text()[-3000:]
    three = start_agent(procs, tmp_path, "w3", rdzv_endpoint, "w3", (1, 1), nproc=3, script=[
        "-m", "lepton_trainer.train", *common, "--checkpoint-dir", str(tmp_path / "w3")])
    assert three.wait() == 0, three.text()[-3000:]
    one, many = (CheckpointManager(tmp_path / d).load_latest() for d in ("w1", "w3"))
    assert (one["world_size"], many["world_size"]) == (1, 3)
    for name, tensor in one["model"].items():
        torch.testing.assert_close(many["model"][name], tensor, rtol=1e-4, atol=1e-5)


def start_lighthouse(procs: list, tmp_path, port: int, name: str = "lighthouse") -> Proc:
    """A Lighthouse for two replica groups on ``port``, once it serves."""
    procs.append(p := Proc([sys.executable, "-m", "lepton_trainer.lighthouse", "--host", "127.0.0.1",
                            "--port", str(port), "--min-replicas", "2"], tmp_path / f"{name}.log"))
    p.wait_for("lighthouse ready")
    return p


def group_env(port: int, i: int, **extra: str) -> dict:
    """The environment of perStep replica group ``i`` of two, on the Lighthouse at ``port``."""
    return {**WORKER_ENV, "TORCHFT_LIGHTHOUSE": f"http://127.0.0.1:{port}", "POD_IP": "127.0.0.1",
            "LEPTON_REPLICA_ID": f"group-{i}", "LEPTON_MIN_REPLICAS": "2", "LEPTON_FAULT_TOLERANCE": "perStep", **extra}


def test_per_step_replica_groups_train_exactly_as_one_process(tmp_path, procs):
    """Two perStep replica groups of 2 ranks each (the gradient is averaged inside each
    group, then across the groups through torchft) take the same steps as one process."""
    common = ["--steps", "20", "--checkpoint-every", "20", "--metrics-port", "0"]
    alone = Proc([sys.executable, "-m", "lepton_trainer.train", *common,
                  "--checkpoint-dir", str(tmp_path / "alone")], tmp_path / "alone.log")
    procs.append(alone)
    port = free_port()
    start_lighthouse(procs, tmp_path, port)
    groups = []
    for i in range(2):
        groups.append(Proc([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                            "--nproc-per-node=2", "-m", "lepton_trainer.train", *common,
                            "--checkpoint-dir", str(tmp_path / "groups")], tmp_path / f"group-{i}.log",
                           group_env(port, i)))
        procs.append(groups[-1])
    for proc in (alone, *groups):
        assert proc.wait() == 0, proc.text()[-3000:]
    assert "event=quorum replicas=2 world=4 rank=0 step=0" in groups[0].text() + groups[1].text()
    one, four = (CheckpointManager(tmp_path / d).load_latest() for d in ("alone", "groups"))
    assert (one["world_size"], four["world_size"], four["torchft"]["step"]) == (1, 4, 20)
    for name, tensor in one["model"].items():
        torch.testing.assert_close(four["model"][name], tensor, rtol=1e-4, atol=1e-5)


def test_per_step_replica_groups_rejoin_a_replaced_lighthouse_in_place(tmp_path, procs):
    """Two perStep replica groups; one is killed and started again (a second quorum), then
    the Lighthouse is stopped and a new one starts on its port, as the operator's rendezvous
    pod is replaced. The groups' managers ask again (TORCHFT_QUORUM_RETRIES, as the
    operator sets it) and both groups step on with the new Lighthouse in the same
    processes, without a checkpoint. Its first quorum has the number of the old one's
    first, with the same two members: the process group is configured under a store
    prefix of its own (``train._fresh_prefixes``), not the stale one of that quorum.
    (Without it, a group read a peer's stale address in about one run in three: "Gloo
    connectFullMesh failed ... Connection refused", and failed steps until the new
    Lighthouse's quorum numbers passed the old one's. A Lighthouse stopped between answering
    one group's quorum and the other's costs that step: torchft's collective timeout, set
    to 10 s here.)"""
    port = free_port()

    def lighthouse(name: str) -> Proc:
        return start_lighthouse(procs, tmp_path, port, name)

    def group(i: int, name: str) -> Proc:
        env = group_env(port, i, TORCHFT_QUORUM_TIMEOUT_SEC="60", TORCHFT_QUORUM_RETRIES="60", TORCHFT_TIMEOUT_SEC="10")
        procs.append(p := Proc([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                "--nproc-per-node=1", "-m", "lepton_trainer.train", "--steps", "100000",
                                "--checkpoint-every", "0", "--log-every", "10", "--metrics-port", "0",
                                "--checkpoint-dir", str(tmp_path / f"ckpt-{name}")], tmp_path / f"{name}.log", env))
        return p

    old = lighthouse("lighthouse-1")
    first, second = group(0, "group-0"), group(1, "group-1")
    first.wait_for(r"event=quorum replicas=2 world=2 ")
    first.wait_for(r"event=step step=50 ")
    kill_tree(second.popen.pid)                  # a second quorum: the same two groups, a new member
    again = group(1, "group-1b")
    again.wait_for(r"event=heal step=")
    mark = len(first.text())
    first.wait_for(r"event=step step=\d+ loss=\S+ world=2", after=mark)
    old.stop()
    marks = {g: len(g.text()) for g in (first, again)}
    lighthouse("lighthouse-2")
    for g in (first, again):                      # both step on, together
        g.wait_for(r"event=step step=\d+ loss=\S+ world=2", after=marks[g], timeout=60)
        g.wait_for(r"event=step step=\d+ loss=\S+ world=2", after=len(g.text()), timeout=60)
    for g in (first, again):
        assert g.popen.poll() is None, g.text()[-3000:]
        assert len(re.findall(r"event=start pid=", g.text())) == 1, g.text()[-3000:]
        assert "event=resume" not in g.text(), g.text()[-3000:]
        assert len(re.findall(r"event=step_failed", g.text()[marks[g]:])) <= 1, g.text()[-3000:]


def test_each_quorum_configures_its_process_group_under_a_prefix_of_its_step():
    """The mechanism of the test above, on its own: the manager's quorum client notes the
    quorum's step, and the process group's configuration adds it to torchft's prefix."""
    from lepton_trainer.train import _QuorumStep, _fresh_prefixes

    class PG:
        def __init__(self, timeout=None):
            self.configured = []

        def configure(self, store_addr, replica_id, rank, world_size, *rest):
            self.configured.append((store_addr, rank, world_size))

    class Quorum:
        max_step = 1234

    class Client:
        def _quorum(self, **kwargs):
            return Quorum()

        def should_commit(self, *args):
            return True

    class Manager:
        _client = Client()

    pg, manager = _fresh_prefixes(PG)(), Manager()
    pg.configure("10.0.0.1:29500/torchft/1/0", "r", 0, 2)      # before any quorum: torchft's own
    _QuorumStep.watch(manager, pg)
    assert manager._client._quorum(step=1234).max_step == 1234 and manager._client.should_commit() is True
    pg.configure("10.0.0.1:29500/torchft/1/0", "r", 0, 2)
    assert pg.configured == [("10.0.0.1:29500/torchft/1/0", 0, 2), ("10.0.0.1:29500/torchft/1/0/step1234", 0, 2)]


def test_checkpoint_from_another_configuration_is_refused(tmp_path, procs):
    train = [sys.executable, "-m", "lepton_trainer.train", "--checkpoint-dir",
             str(tmp_path / "ckpt"), "--steps", "10", "--metrics-port", "0"]
    first = Proc([*train, "--global-batch-size", "64"], tmp_path / "first.log")
    procs.append(first)
    assert first.wait() == 0
    second = Proc([*train, "--global-batch-size", "32"], tmp_path / "second.log")
    procs.append(second)
    assert second.wait() != 0
    assert "has global_batch_size=64, this run has 32" in second.text()


def test_training_that_fails_leaves_its_exception_as_the_termination_message(tmp_path, monkeypatch):
    from lepton_trainer import train as trainer
    path = tmp_path / "termination-log"
    monkeypatch.setattr(trainer.contract, "TERMINATION_MESSAGE_PATH", str(path))

    def broken(args):
        raise RuntimeError("the data set at /data is empty")
    monkeypatch.setattr(trainer, "train", broken)
    monkeypatch.setattr(trainer, "parse_args", lambda argv: argv)
    with pytest.raises(RuntimeError):
        trainer.main([])
    assert path.read_text() == "RuntimeError: the data set at /data is empty"
