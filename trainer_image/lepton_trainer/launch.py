"""``python -m lepton_trainer.launch``: torchrun, with worker processes that start warm.

The arguments are torchrun's own (``[options] (-m module | script) [args]``), and the
node agent is torchrun's (``torch.distributed.run``: the same rendezvous, restarts,
monitoring and exit codes). Only the start of a worker process differs. torchrun runs a
fresh interpreter for every worker on every (re)start of the group, and that
interpreter imports torch again, then ``torch._dynamo`` (the first optimizer imports
it): seconds on every survivor each time a peer is lost. Here the agent forks each
worker from a multiprocessing forkserver that imported those modules once, when the
first group started, and runs the program in it with :mod:`runpy`, as ``python -m`` or
``python script`` would. The agent itself imports ``torch._dynamo`` as it starts: torch's
log formatter would import it on the first failure it logs (seconds, in the middle of
a recovery).

Imported in the forkserver: torch, ``torch.distributed``, ``torch._dynamo``, and for the
built-in trainer (``-m lepton_trainer.train``, or ``-m lepton_trainer train``) the trainer's
modules and its data loader's
scikit-learn modules; more with ``LEPTON_PRELOAD`` (comma-separated module names). A
user's own program is not imported there: it runs only in the worker. Nothing touches
CUDA before the fork; every worker initialises its own devices and process group.

What a program sees is what torchrun gives it (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``TORCHELASTIC_RESTART_COUNT``...), ``sys.argv``, and ``__name__ ==
"__main__"``. Its exit status is the worker's: ``sys.exit(n)`` ends the worker with
``n``, and an exception with 1 and torchrun's error file. ``--no-python`` and
``--run-path`` are torchrun's; they need no launcher and are refused here.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import runpy
import sys
import threading
import uuid

PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "torch.nn.parallel")
# the built-in trainer's imports (not the module itself: runpy runs it afresh as __main__)
_TRAINER_IMPORTS = ("lepton_trainer.checkpoint", "lepton_trainer.data", "lepton_trainer.metrics",
                    "lepton_trainer.modelio", "lepton_trainer.models", "sklearn.datasets",
                    "sklearn.model_selection")
PROGRAM_PRELOAD = {"lepton_trainer.train": _TRAINER_IMPORTS, "lepton_trainer": _TRAINER_IMPORTS}
ENV_PRELOAD = "LEPTON_PRELOAD"


def preload_modules(program: str, module: bool, extra: str = "") -> list[str]:
    """The modules the forkserver imports before it forks any worker."""
    names = [*PRELOAD, *(PROGRAM_PRELOAD.get(program, ()) if module else ())]
    names += [m.strip() for m in extra.split(",") if m.strip()]
    return list(dict.fromkeys(names))


def run_program(program: str, module: bool, argv: list[str]) -> None:
    """One worker: ``program`` as ``__main__`` with ``argv``, in a process forked from the
    forkserver (torchrun's elastic wrapper has set the worker's environment)."""
    sys.argv = [program, *argv]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    if module:
        runpy.run_module(program, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
        runpy.run_path(program, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.launcher.api import elastic_launch

    # By its importable name: workers unpickle the entry point in the forkserver.
    from lepton_trainer.launch import run_program as entry

    # torch's log formatter imports torch._dynamo when the agent first logs an exception,
    # which is a worker's failure: seconds, in the middle of a recovery. Imported now,
    # beside the agent's start, it costs the recovery nothing.
    threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True,
                     name="preload-dynamo").start()
    args = torchrun.parse_args(argv)
    if args.no_python or args.run_path:
        sys.exit("lepton_trainer.launch runs Python programs: use torchrun itself for --no-python or --run-path")
    # As torchrun's own run(): --standalone, and a single-node static job, get a c10d store
    # on this host; the master port is used by the static backend only.
    if args.standalone or (args.rdzv_backend == "static" and not args.rdzv_endpoint
                           and args.master_port is None and torchrun.parse_min_max_nnodes(args.nnodes)[1] == 1):
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    config, _, cmd_args = torchrun.config_from_args(args)
    config.start_method = "forkserver"
    # the program's arguments as torchrun passes them: after "-u [-m] program"
    program_args = cmd_args[3 if args.module else 2:]
    multiprocessing.set_forkserver_preload(
        preload_modules(args.training_script, args.module, os.environ.get(ENV_PRELOAD, "")))
    record(elastic_launch(config=config, entrypoint=entry))(args.training_script, args.module, program_args)


if __name__ == "__main__":
    main()
