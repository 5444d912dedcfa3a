"""False positives of the rendezvous keep-alive under CPU load: nodes dropped that were alive.

A tighter keep-alive finds a silent node sooner, but a node whose agent is starved of CPU
misses heartbeats too, and dropping it restarts every worker of the job for nothing. This
runs an elastic job of ``--workers`` agents (the operator's torchrun arguments, the
built-in trainer, gloo, a dedicated store: bench/recovery.py's harness) while
``--load`` busy processes per core compete for the CPU, for ``--seconds`` per setting,
and counts the group's restarts: nothing dies, so every one is a false positive. The
settings are keep-alive interval x attempts: torch's 5 s x 3, the operator's default
3 s x 3, and a tighter 1 s x 2. With ``--stall S``, one whole agent (agent, forkserver
and worker) is also stopped for S seconds every ``--stall-every`` seconds (SIGSTOP, then
SIGCONT), as a node that freezes for a moment (swapping, a long I/O wait) would be.

    .venv/bin/python bench/keepalive.py [--seconds 180] [--load 4] [--workers 2] [--stall 4]

Writes bench/results/keepalive.json, under ``load_only`` or ``stall_<S>s``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery  # noqa: E402  (its job harness: a store and torchrun agents)
from recovery import Job, steps_after  # noqa: E402
from torchrun_procs import process_tree  # noqa: E402

from lepton_trainer.rendezvous import torchrun_args  # noqa: E402

SETTINGS = {"torch 5 s x 3": (5, 3), "ours 3 s x 3": (3, 3), "tight 1 s x 2": (1, 2)}
BUSY = "while True: pass"


def run_setting(root: Path, name: str, interval: int, attempts: int, workers: int, seconds: float,
                load: int, stall: float, stall_every: float) -> dict:
    workdir = root / re.sub(r"\W+", "-", name)
    workdir.mkdir()
    job = Job(workdir, workers, "tuned")
    job.args = torchrun_args(endpoint=f"127.0.0.1:{job.port}", run_id=job.run_id, min_nodes=1,
                             max_nodes=workers, local_addr="127.0.0.1", max_restarts=100,
                             keep_alive_interval=interval, keep_alive_max_attempt=attempts)
    job.launcher = "lepton_trainer.launch"
    busy: list[subprocess.Popen] = []
    try:
        for _ in range(workers):
            job.start_agent()
        job.wait("step with all workers", lambda ts: True if steps_after(ts, [0] * len(ts), workers) else None)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load * (os.cpu_count() or 1))]
        marks = [len(t) for t in job.logs()]
        end, stalls = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            if stall:
                time.sleep(max(0.0, min(stall_every - stall, end - time.monotonic())))
                if time.monotonic() >= end:
                    break
                pids = process_tree(job.agents[0][0].pid)
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                time.sleep(stall)
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
                stalls += 1
            else:
                time.sleep(end - time.monotonic())
        texts = job.logs()
        restarts = sum(len(re.findall(r"event=start pid=\d+ world=\d+ local_rank=\d+ restart=[1-9]", t[m:]))
                       for t, m in zip(texts, marks))
        steps = [s for s in steps_after(texts, marks, workers)]
        alive = all(proc.poll() is None for proc, _ in job.agents)
    finally:
        for p in busy:
            p.kill()
        job.stop()
    return {"setting": name, "keep_alive_interval_s": interval, "keep_alive_max_attempts": attempts,
            "dropped_after_s": interval * attempts, "seconds_under_load": seconds,
            "stall_s": stall, "stalls": stalls,
            "worker_restarts": restarts, "agents_alive_at_end": alive,
            "steps_at_full_world_under_load": len(steps) * recovery.LOG_EVERY}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="under load, per setting")
    parser.add_argument("--load", type=int, default=4, help="busy processes per core")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stall", type=float, default=0.0, help="seconds one agent is stopped (0: none)")
    parser.add_argument("--stall-every", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=recovery.RESULTS)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="keepalive-"))
    rows = []
    for name, (interval, attempts) in SETTINGS.items():
        rows.append(run_setting(root, name, interval, attempts, args.workers, args.seconds, args.load,
                                args.stall, args.stall_every))
        print(json.dumps(rows[-1]), flush=True)
    out = {"benchmark": "false positives of the rendezvous keep-alive: worker restarts of a job in which "
                        "nothing dies, while busy processes compete for the CPU",
           "setup": {"workers": args.workers, "busy_processes": args.load * (os.cpu_count() or 1),
                     "cpus": os.cpu_count(), "launcher": "lepton_trainer.launch", "model": "mlp",
                     "backend": "gloo", "python": platform.python_version(), "torch": torch.__version__},
           "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "keepalive.json"
    whole = json.loads(path.read_text()) if path.exists() else {}
    whole[f"stall_{args.stall:g}s" if args.stall else "load_only"] = out
    path.write_text(json.dumps(whole, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
