"""The job's rendezvous store, and the torchrun arguments that point workers at it.

``python -m lepton_trainer.rendezvous --port 29400`` hosts a c10d ``TCPStore`` and serves
until SIGTERM or SIGINT. It runs in its own pod, so the rendezvous state outlives any
worker. Workers join it with ``torchrun_args(...)`` (see trainer_image/README.md for
why each setting is what it is).

Importing this module does not import torch: the operator's builders import
:func:`torchrun_args` and the constants.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Mapping

from .contract import RDZV_PORT

# torch's own defaults for the c10d rendezvous (dynamic_rendezvous.create_handler).
DEFAULT_RDZV_CONF: Mapping[str, object] = {
    "join_timeout": 600, "last_call_timeout": 30, "close_timeout": 30,
}
# What the operator uses. The store lives in its own pod, so no worker may host it
# (is_host=false). last_call_timeout is the wait after min_nodes have joined for
# stragglers; once max_nodes have joined the round completes at once whatever it is.
TUNED_RDZV_CONF: Mapping[str, object] = {
    "is_host": "false", "join_timeout": 600, "last_call_timeout": 2, "close_timeout": 10,
}

# Environment for every worker container. With torch's default (the agent of group rank
# 0 hosts the process-group store and keeps it across worker-group restarts), a restart
# in which that agent survives re-initialises the process group on a store that still
# holds the previous incarnation's keys, and init_process_group hangs. With sharing off,
# rank 0's worker process hosts a fresh store on a free port for every incarnation.
WORKER_ENV: Mapping[str, str] = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def rdzv_conf(tuned: bool = True, **overrides: object) -> str:
    """The ``--rdzv-conf`` value: ``key=value`` pairs joined by commas."""
    conf = {**(TUNED_RDZV_CONF if tuned else {"is_host": "false", **DEFAULT_RDZV_CONF}),
            **overrides}
    for key, value in conf.items():
        if key.endswith("_timeout") and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be a non-negative integer (seconds), got {value!r}")
    return ",".join(f"{k}={v}" for k, v in conf.items())


def torchrun_args(*, endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
                  nproc_per_node: int | str = 1, max_restarts: int = 3,
                  local_addr: str | None = None, tuned: bool = True,
                  **conf_overrides: object) -> list[str]:
    """torchrun options (without the program and the script) for one node agent.

    ``endpoint`` is ``host:port`` of the rendezvous store, ``run_id`` a value unique to
    the job (its uid). ``local_addr`` is the address peers use to reach this node (the
    pod IP): the process-group store and the collectives are served from it.
    """
    if min_nodes < 1 or max_nodes < min_nodes:
        raise ValueError(f"need 1 <= min_nodes <= max_nodes, got {min_nodes}:{max_nodes}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if isinstance(nproc_per_node, int) and nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if not run_id:
        raise ValueError("run_id must not be empty")
    if ":" not in endpoint:
        raise ValueError(f"endpoint must be host:port, got {endpoint!r}")
    args = [
        f"--nnodes={min_nodes}:{max_nodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf={rdzv_conf(tuned, **conf_overrides)}",
        f"--max-restarts={max_restarts}",
    ]
    if local_addr:
        args.append(f"--local-addr={local_addr}")
    return args


def serve(port: int = RDZV_PORT, host: str = "0.0.0.0") -> None:
    """Host the store on ``port`` until SIGTERM or SIGINT."""
    import torch.distributed as dist

    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    logging.info("rendezvous store listening on %s:%d", host, store.port)
    print(f"rendezvous store ready on port {store.port}", flush=True)
    received = signal.sigwait(signals)
    logging.info("rendezvous store stopping on %s", signal.Signals(received).name)
    del store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lepton_trainer.rendezvous",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=RDZV_PORT)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    serve(args.port, args.host)


if __name__ == "__main__":
    main()
