"""``python -m lepton_trainer.lighthouse``: torchft's Lighthouse for a ``perStep`` job.

The operator runs it in the job's rendezvous pod, behind the rendezvous Service, on
``contract.RDZV_PORT``. Every replica group's manager heartbeats to it and asks it for a
quorum before each step. It issues a quorum once ``--min-replicas`` groups have asked and
every group that still heartbeats has asked too, waiting at most ``--join-timeout-ms`` for
stragglers; a group silent for ``--heartbeat-timeout-ms`` is left out. torchft's own
quorum log (two lines per step) is at its info level; ``RUST_LOG`` (default ``warn``)
chooses what is printed.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import logging
import os
import pathlib
import signal

from . import contract

log = logging.getLogger("lepton_trainer.lighthouse")


def native_lighthouse() -> type:
    """torchft's ``LighthouseServer`` from its native extension (``torchft._torchft``)
    alone. Importing it through the ``torchft`` package first imports torch, seconds of
    CPU the Lighthouse does not use, on the path of every replaced Lighthouse; the
    extension links no torch. Falls back to the package import where the extension is not
    a file beside the package."""
    spec = importlib.util.find_spec("torchft")           # locates the package, runs nothing
    for where in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(pathlib.Path(where).glob("_torchft.*")):
            if any(path.name.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
                ext = importlib.util.spec_from_file_location("torchft._torchft", path)
                module = importlib.util.module_from_spec(ext)
                ext.loader.exec_module(module)
                return module.LighthouseServer
    from torchft.coordination import LighthouseServer
    return LighthouseServer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.lighthouse", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=contract.RDZV_PORT)
    p.add_argument("--min-replicas", type=int, required=True)
    p.add_argument("--join-timeout-ms", type=int, default=2000)
    p.add_argument("--heartbeat-timeout-ms", type=int, default=2000)
    p.add_argument("--quorum-tick-ms", type=int, default=100)
    args = p.parse_args(argv)
    if args.min_replicas < 1 or args.heartbeat_timeout_ms < 1 or args.join_timeout_ms < 0 or args.quorum_tick_ms < 1:
        p.error("--min-replicas, --heartbeat-timeout-ms and --quorum-tick-ms must be >= 1, "
                "--join-timeout-ms >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("RUST_LOG", "warn")
    LighthouseServer = native_lighthouse()

    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    server = LighthouseServer(bind=f"{args.host}:{args.port}", min_replicas=args.min_replicas,
                              join_timeout_ms=args.join_timeout_ms, quorum_tick_ms=args.quorum_tick_ms,
                              heartbeat_timeout_ms=args.heartbeat_timeout_ms)
    log.info("lighthouse ready on port %d (min replicas %d, join timeout %d ms, heartbeat timeout %d ms)",
             args.port, args.min_replicas, args.join_timeout_ms, args.heartbeat_timeout_ms)
    signal.sigwait(stop)
    server.shutdown()
    log.info("lighthouse stopped")


if __name__ == "__main__":
    main()
