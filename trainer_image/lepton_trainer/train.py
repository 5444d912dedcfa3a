"""Built-in elastic trainers: ``torchrun ... -m lepton_trainer.train --model mlp``.

Runs under torchrun (gloo on CPU, NCCL when CUDA is present) or as one plain process.

Elastic rules:

* **Data order is a function of the step, not of the world size.** The training split
  is one endless stream: epoch ``e`` is a permutation seeded by ``(seed, e)``, and step
  ``s`` takes the ``global_batch_size`` positions starting at ``s * global_batch_size``.
  After a re-rendezvous the same global batch is cut into the new number of shards.
* **The global batch is constant.** Rank ``r`` of ``W`` takes ``G // W`` examples, and the
  first ``G % W`` ranks take one more. Each rank's loss is its summed loss times ``W / G``,
  so DDP's gradient average is exactly the mean over the whole global batch, whatever
  ``W`` is. ``G`` must be at least ``W``.
* **Steps never go back past the last checkpoint.** Every (re)start resumes from the
  newest valid checkpoint; only global rank 0 writes them; every rank loads, and ranks
  that see different checkpoints stop with an error (the directory must be shared).

Fault tolerance (``--fault-tolerance``, from ``spec.faultTolerance``):

* ``restart`` (default): a lost rank ends every worker process; torchrun's agents re-form
  the group and the new processes resume from the newest checkpoint.
* ``perStep``: each node (pod) is one torchft replica group; the groups agree on a quorum
  through the job's Lighthouse before every step and commit the step only when every
  member's gradient all-reduce succeeded. A lost group costs the step in flight: the
  survivors' processes keep running, re-form without it and redo that step with the
  global batch cut into fewer shards. A new group joins at a step boundary and takes the
  model and optimizer state from a live peer, not from a checkpoint. Checkpoints are still
  written, for a restart of the whole job.

Flags fall back to the environment the operator sets (``contract.ENV_*``). The pieces a
user script may want on its own are :func:`init_distributed`,
:func:`global_batch_indices`, :func:`rank_slice`,
:class:`~lepton_trainer.checkpoint.CheckpointManager` and
:class:`~lepton_trainer.metrics.TrainingMetrics`; a user's own script needs none of them.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import contract, data, modelio, models
from .checkpoint import CheckpointManager
from .metrics import TrainingMetrics

log = logging.getLogger("lepton_trainer.train")

DEFAULT_CONFIGS = {
    "mlp": {"hidden": 256, "layers": 2},
    "transformer": {"token_dim": 8, "d_model": 64, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    restart_count: int
    device: torch.device
    distributed: bool


def init_distributed() -> DistEnv:
    """Join the process group torchrun describes in the environment (if any).

    NCCL when CUDA is available, gloo otherwise. Without torchrun's variables the
    process trains alone and no process group is created.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistEnv(
        rank=dist.get_rank() if distributed else 0,
        world_size=dist.get_world_size() if distributed else 1,
        local_rank=local_rank,
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        device=device,
        distributed=distributed,
    )


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def global_batch_indices(step: int, global_batch: int, n: int, seed: int) -> torch.Tensor:
    """Indices into the training split of the global batch of ``step`` (world-size free)."""
    positions = torch.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = positions // n, positions % n
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        out[mask] = _epoch_permutation(n, seed, epoch)[offsets[mask]]
    return out


def rank_slice(global_batch: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s part of a global batch: ``G // W`` each, the first ``G % W`` one more."""
    if global_batch < world_size:
        raise ValueError(f"global batch size {global_batch} is smaller than the world size "
                         f"{world_size}: every rank needs at least one example")
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.train",
                                description="Elastic built-in trainer (run it under torchrun).")
    p.add_argument("--model", choices=sorted(models.ARCHITECTURES), default="mlp")
    p.add_argument("--model-config", type=json.loads, default={},
                   help="JSON object of architecture keyword arguments")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default="digits")
    p.add_argument("--steps", type=int, default=500, help="total optimizer steps")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=env(contract.ENV_CHECKPOINT_DIR),
                   help=f"default ${contract.ENV_CHECKPOINT_DIR}; none: no checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps; 0: only at the end")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--checkpoint-async", action=argparse.BooleanOptionalAction, default=True,
                   help="write periodic checkpoints in the background (the last one is always "
                        "waited for)")
    p.add_argument("--output-dir", default=env(contract.ENV_OUTPUT_DIR),
                   help=f"final model directory, default ${contract.ENV_OUTPUT_DIR}")
    p.add_argument("--metrics-port", type=int,
                   default=int(env(contract.ENV_METRICS_PORT, contract.METRICS_PORT)),
                   help="served by local rank 0; 0 disables")
    p.add_argument("--job-name", default=env(contract.ENV_JOB_NAME, "local"))
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--fault-tolerance", choices=contract.FAULT_TOLERANCE_MODES,
                   default=env(contract.ENV_FAULT_TOLERANCE, "restart"),
                   help=f"default ${contract.ENV_FAULT_TOLERANCE} or restart; perStep needs "
                        f"${contract.ENV_LIGHTHOUSE}")
    p.add_argument("--min-replicas", type=int, default=int(env(contract.ENV_MIN_REPLICAS, "1")),
                   help=f"perStep: fewest replica groups that commit a step (${contract.ENV_MIN_REPLICAS})")
    p.add_argument("--replica-id", default=env(contract.ENV_REPLICA_ID, ""),
                   help=f"perStep: this replica group's name (${contract.ENV_REPLICA_ID}, "
                        "else a random id)")
    args = p.parse_args(argv)
    for name in ("steps", "global_batch_size", "keep", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.checkpoint_every < 0 or not 0 <= args.metrics_port < 65536:
        p.error("--checkpoint-every must be >= 0 and --metrics-port in 0..65535")
    if not isinstance(args.model_config, dict):
        p.error("--model-config must be a JSON object")
    if args.fault_tolerance == "perStep" and (args.min_replicas < 1 or not env(contract.ENV_LIGHTHOUSE)):
        p.error(f"--fault-tolerance perStep needs --min-replicas >= 1 and ${contract.ENV_LIGHTHOUSE}")
    return args


def _resume(ckpts: CheckpointManager | None, model, optimizer, args, env: DistEnv,
            manager=None) -> int:
    """Load the newest checkpoint (if any) and return its step. Under torchrun's group every
    rank must have found the same one; a torchft ``manager`` instead takes the checkpoint's
    step, and a replica group that is behind the others heals from a live peer."""
    state = ckpts.load_latest() if ckpts else None
    step = 0
    if state is not None:
        expected = {"arch": args.model, "dataset": args.dataset,
                    "global_batch_size": args.global_batch_size}
        for key, mine in expected.items():
            if state.get(key) != mine:
                raise ValueError(f"checkpoint step {state['step']} has {key}={state.get(key)!r}, "
                                 f"this run has {mine!r}; use another --checkpoint-dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    if manager is not None:
        manager.load_state_dict(state.get("torchft", {"step": step, "batches_committed": 0})
                                if state is not None else {"step": 0, "batches_committed": 0})
    elif env.distributed:
        seen = [None] * env.world_size
        dist.all_gather_object(seen, step)
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks resumed from different checkpoint steps {seen}: "
                               "the checkpoint directory must be shared by all nodes")
    if state is not None:
        log.info("event=resume step=%d from_world=%s world=%d", step,
                 state.get("world_size"), env.world_size)
    return step


def _checkpointed(metrics: TrainingMetrics, step: int, path) -> None:
    """A checkpoint file is in place (on the writer thread for a background save)."""
    log.info("event=checkpoint step=%d path=%s", step, path)
    metrics.set(contract.METRIC_CHECKPOINT_STEP, step)


def _setup(args: argparse.Namespace, env: DistEnv):
    split = data.load(args.dataset)
    config = {"in_features": split.num_features, "num_classes": split.num_classes,
              **DEFAULT_CONFIGS[args.model], **args.model_config}
    torch.manual_seed(args.seed)
    model = models.build(args.model, **config).to(env.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpts = (CheckpointManager(args.checkpoint_dir, every=args.checkpoint_every, keep=args.keep)
             if args.checkpoint_dir else None)
    metrics = TrainingMetrics(args.job_name, os.environ.get(contract.ENV_JOB_NAMESPACE, ""),
                              port=args.metrics_port if env.local_rank == 0 and args.metrics_port
                              else None)
    metrics.set(contract.METRIC_RESTARTS, env.restart_count)
    return split, config, model, optimizer, ckpts, metrics


def _batch_loss(model, x, y, step: int, args, world: int, rank: int) -> tuple[torch.Tensor, int]:
    """Rank ``rank`` of ``world``'s loss on its shard of step ``step``'s global batch, scaled
    so that the average over the ranks of its gradient is the global batch's mean."""
    idx = global_batch_indices(step, args.global_batch_size, len(x), args.seed)
    idx = idx[rank_slice(args.global_batch_size, world, rank)]
    scale = world / args.global_batch_size
    return F.cross_entropy(model(x[idx]), y[idx], reduction="sum") * scale, len(idx)


def _maybe_checkpoint(ckpts, done: int, writer: bool, model, optimizer, args, config, world: int,
                      metrics: TrainingMetrics, extra: dict | None = None) -> None:
    if not ckpts or not (ckpts.due(done) or done == args.steps):
        return
    if not writer:
        metrics.set(contract.METRIC_CHECKPOINT_STEP, done)
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "arch": args.model, "config": config, "dataset": args.dataset,
             "seed": args.seed, "global_batch_size": args.global_batch_size,
             "world_size": world, **(extra or {})}
    saved = functools.partial(_checkpointed, metrics, done)
    if args.checkpoint_async and done != args.steps:
        ckpts.save_async(done, state, saved)
    else:
        ckpts.wait()
        saved(ckpts.save(done, state))


def _finish(model, split, args, config, env: DistEnv) -> dict:
    acc = models.accuracy(model, split.x_test.to(env.device), split.y_test.to(env.device))
    result = {"accuracy": acc, "step": args.steps}
    log.info("event=done step=%d accuracy=%.4f", args.steps, acc)
    if args.output_dir:
        modelio.save_model(args.output_dir, model.cpu(), {
            "arch": args.model, "config": config, "dataset": args.dataset,
            "input_shape": [split.num_features], "dtype": "float32", "metrics": result})
        log.info("event=output dir=%s", args.output_dir)
    return result


def _log_format(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"%(asctime)s rank={env.rank}/{env.world_size} %(message)s")
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logging.getLogger(name).setLevel(logging.WARNING)   # our event= lines say what matters


def train(args: argparse.Namespace) -> dict:
    """Train (resuming if a checkpoint exists); returns the final metrics on rank 0."""
    if args.fault_tolerance == "perStep":
        return train_per_step(args)
    env = init_distributed()
    _log_format(env)
    log.info("event=start pid=%d world=%d local_rank=%d restart=%d device=%s", os.getpid(),
             env.world_size, env.local_rank, env.restart_count, env.device)
    split, config, model, optimizer, ckpts, metrics = _setup(args, env)
    start = _resume(ckpts, model, optimizer, args, env)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if env.distributed else model
    metrics.set(contract.METRIC_WORLD_SIZE, env.world_size)
    metrics.set(contract.METRIC_STEP, start)
    if start:
        metrics.set(contract.METRIC_CHECKPOINT_STEP, start)

    x, y = split.x_train.to(env.device), split.y_train.to(env.device)
    scale = env.world_size / args.global_batch_size
    ddp.train()
    for step in range(start, args.steps):
        loss, n = _batch_loss(ddp, x, y, step, args, env.world_size, env.rank)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        metrics.step(done, loss.item() / scale / n, args.global_batch_size)
        if done % args.log_every == 0 or done == args.steps:
            total = loss.detach().clone()
            if env.distributed:
                dist.all_reduce(total)
            log.info("event=step step=%d loss=%.4f world=%d", done,
                     total.item() / args.global_batch_size / scale, env.world_size)
        _maybe_checkpoint(ckpts, done, env.rank == 0, model, optimizer, args, config,
                          env.world_size, metrics)

    result = _finish(model, split, args, config, env) if env.rank == 0 else {}
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    metrics.close()
    return result


def _ft_manager(args, env: DistEnv, model, optimizer):
    """A torchft Manager for this replica group: group rank 0 serves the manager and talks
    to the Lighthouse (``$TORCHFT_LIGHTHOUSE``); its peers find it through the group's
    store. Every address it advertises (manager, store, state for healing) is the pod's
    IP, which the other pods can reach; the pod's bare host name does not resolve there."""
    os.environ.setdefault("RUST_LOG", "warn")   # torchft's own log: several info lines per step
    from torchft import Manager, ProcessGroupBabyNCCL, ProcessGroupGloo
    from torchft.checkpointing.http_transport import HTTPTransport

    class PodTransport(HTTPTransport):
        """torchft's HTTP transport of a healing group's state, advertised at ``host``: it
        names itself by the host name, which other pods cannot resolve."""

        def address(self) -> str:
            return super().address().replace(f"//{socket.gethostname()}:", f"//{url_host}:", 1)

    timeout = timedelta(seconds=float(os.environ.get(contract.ENV_FT_TIMEOUT, "30")))
    # torchft hands its Manager's connect_timeout argument, not the environment's value, to
    # the server that talks to the Lighthouse: it is passed here. A reconnection after the
    # Lighthouse was replaced may first reach its old address (a SYN nobody answers until
    # the Service's rules catch up); each try waits at most this long, where torchft's 60 s
    # default kept a group's heartbeats, and so the group, out of the new quorums a minute.
    connect_timeout = timedelta(seconds=float(os.environ.get(contract.ENV_FT_CONNECT_TIMEOUT, "60")))
    pg = _fresh_prefixes(ProcessGroupBabyNCCL if env.device.type == "cuda" else ProcessGroupGloo)(timeout=timeout)

    def load(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def save() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    host = os.environ.get("POD_IP") or os.environ["MASTER_ADDR"]
    url_host = f"[{host}]" if ":" in host else host
    manager = Manager(pg=pg, load_state_dict=load, state_dict=save, min_replica_size=args.min_replicas,
                      use_async_quorum=False, timeout=timeout, connect_timeout=connect_timeout, replica_id=args.replica_id or None,
                      rank=env.rank, world_size=env.world_size, store_addr=host,
                      store_port=int(os.environ["MASTER_PORT"]), hostname=host,
                      checkpoint_transport=PodTransport(timeout=timeout, num_chunks=0))
    _QuorumStep.watch(manager, pg)
    return manager


def _fresh_prefixes(pg_class: type) -> type:
    """``pg_class`` whose every configuration gets a store prefix no earlier quorum used.

    torchft configures the replica groups' process group under
    ``<primary's store>/torchft/<quorum id>/<group rank>`` and needs each prefix to be new.
    A replaced Lighthouse numbers its quorums from 1 again, while the groups that rejoin it
    in place keep their stores, which still hold the keys of the old Lighthouse's quorums
    of the same numbers: a group could read a peer's stale address. The step the quorum
    starts at (the same for every member, never lower than any earlier quorum's) makes the
    prefix new again."""
    class FreshPrefixes(pg_class):
        quorum_step: int | None = None      # the step of the quorum being configured (_QuorumStep)

        def configure(self, store_addr: str, *args, **kwargs):
            if self.quorum_step is not None:
                store_addr = f"{store_addr}/step{self.quorum_step}"
            return super().configure(store_addr, *args, **kwargs)

    FreshPrefixes.__name__ = FreshPrefixes.__qualname__ = f"FreshPrefixes{pg_class.__name__}"
    return FreshPrefixes


class _QuorumStep:
    """The manager's client to its manager server, which also notes each quorum's step on
    the process group before the manager configures it (see :func:`_fresh_prefixes`)."""

    def __init__(self, client, pg) -> None:
        self._client, self._pg = client, pg

    @classmethod
    def watch(cls, manager, pg) -> None:
        client = getattr(manager, "_client", None)
        if client is None or not hasattr(client, "_quorum"):
            log.warning("this torchft's Manager has no quorum client to watch: the process group's store "
                        "prefixes are torchft's own (a replaced Lighthouse may reuse one)")
            return
        manager._client = cls(client, pg)

    def _quorum(self, *args, **kwargs):
        quorum = self._client._quorum(*args, **kwargs)
        self._pg.quorum_step = quorum.max_step
        return quorum

    def __getattr__(self, name: str):
        return getattr(self._client, name)


def train_per_step(args: argparse.Namespace) -> dict:
    """``--fault-tolerance perStep``: the loop of :func:`train` under a torchft Manager.

    Every step: a quorum (blocking, so the world is known before the batch is cut); the
    forward and backward pass on this rank's shard; one flat gradient all-reduce (the
    loss rides along in its last element), first inside the replica group, then across
    the groups through the manager; the optimizer steps only if every group committed.
    A failed step is redone with the next quorum's world: the data of a step is a
    function of the step alone.
    """
    if not ("RANK" in os.environ and "MASTER_PORT" in os.environ):
        raise SystemExit("--fault-tolerance perStep runs under torchrun (torchrun --standalone for "
                         "one replica group), as the operator's workers do")
    env = init_distributed()   # the replica group; it creates the TCPStore the manager joins
    _log_format(env)
    log.info("event=start pid=%d world=%d local_rank=%d restart=%d device=%s fault_tolerance=perStep "
             "replica=%s", os.getpid(), env.world_size, env.local_rank, env.restart_count, env.device,
             args.replica_id or "-")
    split, config, model, optimizer, ckpts, metrics = _setup(args, env)
    manager = _ft_manager(args, env, model, optimizer)
    start = _resume(ckpts, model, optimizer, args, env, manager)
    metrics.set(contract.METRIC_STEP, start)
    if start:
        metrics.set(contract.METRIC_CHECKPOINT_STEP, start)

    x, y = split.x_train.to(env.device), split.y_train.to(env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    quorum = None
    model.train()
    while manager.current_step() < args.steps:
        before = manager.current_step()
        manager.start_quorum()    # blocks until the quorum is in and a lagging group healed
        step = manager.current_step()
        if step != before:
            log.info("event=heal step=%d from_step=%d", step, before)
            metrics.set(contract.METRIC_STEP, step)
            if step >= args.steps:
                break
        # Every replica group has as many ranks as this one (the operator's pods all run
        # nprocPerNode processes), so the global world and rank follow from the quorum.
        replicas, replica_rank = manager.num_participants(), manager.participating_rank()
        world, rank = replicas * env.world_size, replica_rank * env.world_size + env.rank
        if quorum != (world, rank):
            quorum = (world, rank)
            log.info("event=quorum replicas=%d world=%d rank=%d step=%d", replicas, world, rank, step)
            metrics.set(contract.METRIC_WORLD_SIZE, world)
        optimizer.zero_grad(set_to_none=False)
        loss, n = _batch_loss(model, x, y, step, args, world, rank)
        loss.backward()
        flat = torch.cat([*(p.grad.reshape(-1) for p in params), loss.detach().reshape(1)])
        if env.world_size > 1:    # inside the replica group: average its ranks
            dist.all_reduce(flat)
            flat /= env.world_size
        manager.allreduce(flat).wait()   # across the groups: averages the replicas
        if not manager.should_commit():
            log.info("event=step_failed step=%d world=%d", step, world)
            continue
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()
        done = step + 1
        scale = world / args.global_batch_size
        metrics.step(done, loss.item() / scale / n, args.global_batch_size)
        if done % args.log_every == 0 or done == args.steps:
            log.info("event=step step=%d loss=%.4f world=%d", done, flat[-1].item(), world)
        _maybe_checkpoint(ckpts, done, rank == 0, model, optimizer, args, config, world, metrics,
                          {"torchft": manager.state_dict()})

    result = _finish(model, split, args, config, env) if manager.participating_rank() == 0 and env.rank == 0 else {}
    if ckpts:
        ckpts.wait()
    manager.shutdown(wait=False)
    dist.destroy_process_group()
    metrics.close()
    return result


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_args(argv))
    except Exception as exc:
        write_termination_message(exc)
        raise


def write_termination_message(exc: BaseException, path: str | None = None) -> None:
    """The exception that ended training, for the pod's status (and so the job's failure
    message): its type and text, the tail when long. Best effort: outside a pod the path
    may not be writable."""
    text = f"{type(exc).__name__}: {exc}"
    try:
        with open(path or contract.TERMINATION_MESSAGE_PATH, "w") as f:
            f.write(text[-2000:])
    except OSError:
        pass


if __name__ == "__main__":
    main()
