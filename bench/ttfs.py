"""Time to first step of an elastic job: torch's default rendezvous settings vs ours.

For 1, 2 and 4 node agents on this machine (one worker each), all started at once
against one dedicated rendezvous store, with ``--nnodes=1:8`` (an elastic job running
below its maximum, the case where the last-call wait applies), it measures the seconds
from launching the agents to the first training step logged with all of them in the
world. Medians of a few runs; default and tuned runs alternate so load drifts hit both.

    .venv/bin/python bench/ttfs.py [--runs 3] [--workers 1 2 4]

Writes bench/results/ttfs.json and bench/results/ttfs.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lepton_trainer.rendezvous import (DEFAULT_RDZV_CONF, TUNED_RDZV_CONF, WORKER_ENV,
                                       torchrun_args)

RESULTS = Path(__file__).parent / "results"
MAX_NODES = 8
ENV = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def one_run(workdir: Path, endpoint: str, run_id: str, workers: int, tuned: bool,
            timeout: float = 300) -> dict:
    args = torchrun_args(endpoint=endpoint, run_id=run_id, min_nodes=1, max_nodes=MAX_NODES,
                         local_addr="127.0.0.1", tuned=tuned, max_restarts=3)
    script = ["-m", "lepton_trainer.train", "--steps", "1000000", "--log-every", "1",
              "--metrics-port", "0"]
    logs = [workdir / f"{run_id}-{i}.log" for i in range(workers)]
    t0 = time.monotonic()
    agents = [start([sys.executable, "-m", "torch.distributed.run", *args, *script], log)
              for log in logs]
    pattern = re.compile(rf"event=step step=\d+ loss=\S+ world={workers}\b")
    try:
        while time.monotonic() - t0 < timeout:
            if any(pattern.search(log.read_text(errors="replace")) for log in logs):
                elapsed = time.monotonic() - t0
                rounds = len(re.findall(r"event=start", logs[0].read_text(errors="replace")))
                return {"seconds": round(elapsed, 3), "worker_starts_on_agent0": rounds}
            if any(a.poll() is not None for a in agents):
                raise RuntimeError(f"an agent exited early; see {workdir}")
            time.sleep(0.05)
        raise TimeoutError(f"no step with world={workers} within {timeout}s; see {workdir}")
    finally:
        for agent in agents:
            stop(agent)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = sorted({r["workers"] for r in results})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, name in ((-0.2, "default"), (0.2, "tuned")):
        med = [next(r["median_s"] for r in results
                    if r["workers"] == w and r["settings"] == name) for w in workers]
        bars = ax.bar([i + offset for i in range(len(workers))], med, 0.4, label=name)
        ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(workers)), [f"{w} agent(s)" for w in workers])
    ax.set_ylabel("seconds to first step (median)")
    ax.set_title(f"torchrun --nnodes=1:{MAX_NODES}, c10d rendezvous")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    if args.runs < 1 or any(not 1 <= w <= MAX_NODES for w in args.workers):
        parser.error(f"--runs >= 1 and --workers in 1..{MAX_NODES}")

    workdir = Path(tempfile.mkdtemp(prefix="ttfs-"))
    port = free_port()
    store_log = workdir / "rdzv.log"
    store = start([sys.executable, "-m", "lepton_trainer.rendezvous", "--port", str(port),
                   "--control-port", "-1", "--host", "127.0.0.1"], store_log)
    try:
        while "ready" not in store_log.read_text():
            time.sleep(0.1)
        samples: dict[tuple[int, str], list[dict]] = {}
        for workers in args.workers:
            for rep in range(args.runs):
                for name, tuned in (("default", False), ("tuned", True)):
                    run = one_run(workdir, f"127.0.0.1:{port}", f"{name}-{workers}-{rep}",
                                  workers, tuned)
                    samples.setdefault((workers, name), []).append(run)
                    print(f"workers={workers} {name:7s} run={rep} {run}", flush=True)
    finally:
        stop(store)

    results = [{"workers": w, "settings": name,
                "median_s": statistics.median(r["seconds"] for r in runs),
                "runs_s": [r["seconds"] for r in runs],
                "worker_starts_on_agent0": [r["worker_starts_on_agent0"] for r in runs]}
               for (w, name), runs in samples.items()]
    for w in args.workers:
        d, t = (next(r["median_s"] for r in results if r["workers"] == w and r["settings"] == s)
                for s in ("default", "tuned"))
        print(f"workers={w}: default {d:.1f}s  tuned {t:.1f}s  saved {d - t:.1f}s")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "time to first step (launch of the node agents -> first step with all "
                     "of them in the world)",
        "setup": {"nnodes": f"1:{MAX_NODES}", "nproc_per_node": 1, "runs": args.runs,
                  "model": "mlp", "dataset": "digits", "backend": "gloo",
                  "rdzv_conf": {"default": {"is_host": "false", **DEFAULT_RDZV_CONF},
                                "tuned": dict(TUNED_RDZV_CONF)},
                  "worker_env": dict(WORKER_ENV),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "torch": torch.__version__}},
        "results": results,
    }
    (RESULTS / "ttfs.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "ttfs.png")
    print(f"wrote {RESULTS / 'ttfs.json'} and ttfs.png")


if __name__ == "__main__":
    main()
