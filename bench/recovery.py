"""Recovery from a lost worker: seconds and steps, by how the lost node leaves the rendezvous.

An elastic job (``--nnodes=1:N``, one worker per node agent, the built-in trainer on
digits, gloo) runs with the operator's torchrun arguments against a dedicated store
(``python -m lepton_trainer.rendezvous``), all on this machine. Each cycle kills one whole
agent (agent and worker at once, as when a pod is lost), waits until the survivors train
again, then starts a replacement and waits until a step includes it. The modes:

- ``default``: torchrun's own settings (keep-alive 5 s x 3, last call 30 s);
- ``tuned``: the operator's defaults (keep-alive 3 s x 3, last call 2 s);
- ``reported``: the operator's defaults with a 10-minute keep-alive, and the report the
  operator sends when it sees the pod go (``POST /v1/forget``), sent right after the kill:
  only the report can end the wait;
- ``preloaded``: ``reported``, with the agents started by ``python -m
  lepton_trainer.launch`` (the operator's launcher for its trainer image): survivors'
  worker processes fork from a process that has imported torch, instead of starting a
  fresh interpreter.
- ``perStep``: ``faultTolerance: perStep``. torchft's Lighthouse
  (``python -m lepton_trainer.lighthouse``, the operator's settings) instead of the store,
  and standalone agents through the launcher, one replica group each: the survivors'
  processes keep running and go on from the step in flight, and the replacement heals from
  a live peer. Nothing is reported: the Lighthouse drops the lost group when its
  heartbeat stops (2 s).

For each cycle: worker lost -> first step after the loss; steps lost (the last step
logged before the loss minus the step training resumed from); replacement started ->
first step that includes it. Medians over the cycles.

    .venv/bin/python bench/recovery.py [--runs 5] [--workers 2 4] [--parallel]

``--parallel`` runs every (workers, mode) job at once, for machines with cores to spare.
``--from-log FILE`` summarises the cycles a run printed (one that was cut off, say)
instead of running. ``--section NAME`` keeps the file's main results and stores the run
under ``sections.NAME`` (a comparison on another machine, say), plotted in
``recovery-NAME.png``. Writes bench/results/recovery.json and bench/results/recovery.png.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lepton_operator.job.objects import LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS
from lepton_trainer import contract, rendezvous
from lepton_trainer.rendezvous import DEFAULT_RDZV_CONF, TUNED_RDZV_CONF, torchrun_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trainer"))
from torchrun_procs import kill_tree  # noqa: E402  (the tests' process-tree kill)
from waiting import wait_for  # noqa: E402
import ttfs  # noqa: E402
from ttfs import free_port, start, stop  # noqa: E402

# Workers train on the CPU with gloo, as on the contract harness: one machine's GPU cannot
# hold several NCCL ranks, and the numbers are about the rendezvous, not the kernels.
ttfs.ENV["CUDA_VISIBLE_DEVICES"] = ""

RESULTS = Path(__file__).parent / "results"
MODES = ("default", "tuned", "reported", "preloaded", "perStep")
REPORTED_KEEP_ALIVE = {"keep_alive_interval": 60, "keep_alive_max_attempt": 10}
CHECKPOINT_EVERY = 50
LOG_EVERY = 5
STEP = re.compile(r"event=step step=(\d+) loss=\S+ world=(\d+)")


class Job:
    """One store and its agents, with their logs in ``workdir``."""

    def __init__(self, workdir: Path, workers: int, mode: str):
        self.workdir, self.workers, self.mode = workdir, workers, mode
        self.port, self.control = free_port(), free_port()
        self.run_id = f"recovery-{mode}-{workers}"
        self.agents: list = []
        self.started = 0
        self.launcher = "lepton_trainer.launch" if mode in ("preloaded", "perStep") else "torch.distributed.run"
        if mode == "perStep":
            self.store = start([sys.executable, "-m", "lepton_trainer.lighthouse", "--port", str(self.port),
                                "--host", "127.0.0.1", "--min-replicas", "1", "--join-timeout-ms", "2000",
                                "--heartbeat-timeout-ms", str(LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS)],
                               workdir / "lighthouse.log")
            self.args = ["--standalone", "--nnodes=1", "--nproc-per-node=1", "--max-restarts=100"]
            return
        self.store = start([sys.executable, "-m", "lepton_trainer.rendezvous", "--port", str(self.port),
                            "--control-port", str(self.control), "--host", "127.0.0.1"],
                           workdir / "rdzv.log")
        conf = dict(REPORTED_KEEP_ALIVE) if mode in ("reported", "preloaded") else {}
        self.args = torchrun_args(endpoint=f"127.0.0.1:{self.port}", run_id=self.run_id, min_nodes=1,
                                  max_nodes=workers, local_addr="127.0.0.1", tuned=mode != "default",
                                  max_restarts=100, **conf)

    def start_agent(self) -> None:
        script = ["-m", "lepton_trainer.train", "--steps", "100000000", "--log-every", str(LOG_EVERY),
                  "--checkpoint-every", str(CHECKPOINT_EVERY), "--checkpoint-dir", str(self.workdir / "ckpt"),
                  "--keep", "2", "--metrics-port", "0"]
        log = self.workdir / f"agent-{self.started}.log"
        env = []
        if self.mode == "perStep":   # what the operator sets on a perStep worker pod
            script += ["--fault-tolerance", "perStep"]
            env = ["env", f"{contract.ENV_LIGHTHOUSE}=http://127.0.0.1:{self.port}", "POD_IP=127.0.0.1",
                   f"{contract.ENV_REPLICA_ID}=agent-{self.started}", f"{contract.ENV_MIN_REPLICAS}=1"]
        self.started += 1
        self.agents.append((start([*env, sys.executable, "-m", self.launcher, *self.args, *script], log), log))

    def logs(self) -> list[str]:
        return [log.read_text(errors="replace") for _, log in self.agents]

    def wait(self, what: str, found, timeout: float = 300.0):
        """The first value of ``found(logs)`` that is not None (polled every 20 ms)."""
        return wait_for(f"{self.mode}/{self.workers}: {what} (logs in {self.workdir})",
                        lambda: (v,) if (v := found(self.logs())) is not None else None,
                        timeout, interval=0.02)[0]

    def tails(self, lines: int = 15) -> str:
        """The end of each log, for a run that did not finish."""
        out = []
        for log in sorted(self.workdir.glob("*.log")):
            kept = [l for l in log.read_text(errors="replace").splitlines() if not l.startswith(("[W", "[E", "frame #"))]
            out.append(f"--- {log.name}\n" + "\n".join(kept[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        for proc, _ in self.agents:
            kill_tree(proc.pid)
        stop(self.store)


def steps_after(texts: list[str], marks: list[int], world: int) -> list[int]:
    return [int(m.group(1)) for text, mark in zip(texts, marks)
            for m in STEP.finditer(text, mark) if int(m.group(2)) == world]


def cycle(job: Job) -> dict:
    n = job.workers
    marks = [len(t) for t in job.logs()]
    # A checkpoint of the whole group, then half an interval more: the loss lands mid-interval.
    def checkpointed(ts):
        found = [int(m.group(1)) for t, mk in zip(ts, marks) for m in re.finditer(r"event=checkpoint step=(\d+)", t[mk:])]
        return found[0] if found else None
    ckpt = job.wait("checkpoint with all workers", checkpointed)
    job.wait("half a checkpoint interval", lambda ts: True if any(
        s >= ckpt + CHECKPOINT_EVERY // 2 for s in steps_after(ts, marks, n)) else None)
    texts = job.logs()
    last = max(int(m.group(1)) for t in texts for m in STEP.finditer(t))
    victim, _ = job.agents.pop()
    t_lost = time.monotonic()
    kill_tree(victim.pid)
    if job.mode in ("reported", "preloaded"):
        rendezvous.forget(f"http://127.0.0.1:{job.control}", job.run_id, ["127.0.0.1"], 1, pids=[victim.pid])
    victim.wait()
    marks = [len(t) for t in job.logs()]

    # Where the survivors went on from: a checkpoint (resume), or the step in flight (perStep's quorum).
    went_on = (r"event=quorum replicas=\d+ world=(?P<world>\d+) rank=\d+ step=(?P<step>\d+)" if job.mode == "perStep"
               else r"event=resume step=(?P<step>\d+) from_world=\d+ world=(?P<world>\d+)")

    def resumed(ts):
        found = [int(m.group("step")) for t, mk in zip(ts, marks)
                 for m in re.finditer(went_on, t[mk:]) if int(m.group("world")) == n - 1]
        return found[0] if found and steps_after(ts, marks, n - 1) else None
    resume_step = job.wait("step after the loss", resumed)
    t_resumed = time.monotonic()

    marks = [len(t) for t in job.logs()] + [0]
    t_join = time.monotonic()
    job.start_agent()
    job.wait("step with the replacement", lambda ts: True if steps_after(ts, marks, n) else None)
    t_joined = time.monotonic()
    return {"lost_to_first_step_s": round(t_resumed - t_lost, 3), "steps_lost": max(0, last - resume_step),
            "joined_to_first_step_s": round(t_joined - t_join, 3), "last_step": last, "resumed_from": resume_step}


STAMPED_STEP = re.compile(r"^(\S+ \S+) rank=0/\d+ event=step step=(\d+) loss=\S+ world=(\d+)", re.M)


def steps_per_second(texts: list[str], world: int) -> float | None:
    """Median training speed with the whole group (steps per second between consecutive
    step lines of rank 0 at ``world``): the price of a mode when nothing fails."""
    rates = []
    for text in texts:
        points = [(time.mktime(time.strptime(t[:19], "%Y-%m-%d %H:%M:%S")) + int(t[20:]) / 1000, int(step))
                  for t, step, w in STAMPED_STEP.findall(text) if int(w) == world]
        rates += [(s1 - s0) / (t1 - t0) for (t0, s0), (t1, s1) in zip(points, points[1:])
                  if s1 - s0 == LOG_EVERY and t1 > t0]
    return round(statistics.median(rates), 1) if rates else None


def run_job(workers: int, mode: str, runs: int, root: Path, out: dict) -> None:
    workdir = root / f"{mode}-{workers}"
    workdir.mkdir()
    job = Job(workdir, workers, mode)
    try:
        for _ in range(workers):
            job.start_agent()
        job.wait("step with all workers", lambda ts: True if steps_after(ts, [0] * len(ts), workers) else None)
        samples = []
        for rep in range(runs):
            samples.append(cycle(job))
            print(f"workers={workers} {mode:8s} run={rep} {samples[-1]}", flush=True)
        out[(workers, mode)] = samples
        out[(workers, mode, "steps_per_second")] = steps_per_second(job.logs(), workers)
    except AssertionError:   # a wait timed out
        print(job.tails(), flush=True)
        raise
    finally:
        job.stop()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["workers"] for r in results})
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "lost_to_first_step_median_s", "worker lost -> first step after"),
                           (axes[1], "joined_to_first_step_median_s", "replacement started -> first step with it")):
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            offset = (j - (len(modes) - 1) / 2) * width
            values = [next(r[key] for r in results if r["workers"] == w and r["mode"] == mode) for w in sizes]
            bars = ax.bar([i + offset for i in range(len(sizes))], values, width, label=mode)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(sizes)), [f"{w} workers" for w in sizes])
        ax.set_ylabel("seconds (median)")
        ax.set_title(title, fontsize=10)
    axes[1].legend(title="mode", fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--parallel", action="store_true", help="(with --from-log: the run was parallel)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-log", type=Path, help="the printed output of a run to summarise")
    parser.add_argument("--machine", help="with --from-log: the machine it ran on, in words")
    parser.add_argument("--section", help="store this run under this key of the existing recovery.json, "
                                          "keeping the rest of the file (and its plot)")
    args = parser.parse_args()
    if args.runs < 1 or any(w < 2 for w in args.workers):
        parser.error("--runs >= 1 and --workers >= 2")
    root = Path(tempfile.mkdtemp(prefix="recovery-"))
    samples: dict = {}
    jobs = [(w, mode) for w in args.workers for mode in args.modes]
    if args.from_log:
        for m in re.finditer(r"^workers=(\d+) (\w+)\s+run=\d+ (\{.*\})$", args.from_log.read_text(), re.M):
            samples.setdefault((int(m.group(1)), m.group(2)), []).append(ast.literal_eval(m.group(3)))
        jobs = sorted(samples)
    elif args.parallel:
        threads = [threading.Thread(target=run_job, args=(w, mode, args.runs, root, samples)) for w, mode in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for w, mode in jobs:
            run_job(w, mode, args.runs, root, samples)
    speeds = {key[:2]: samples.pop(key) for key in list(samples) if len(key) == 3}
    missing = [job for job in jobs if job not in samples]
    if missing:
        sys.exit(f"no result for {missing}; logs in {root}")

    results = []
    for (w, mode), runs in sorted(samples.items()):
        results.append({
            "workers": w, "mode": mode,
            "lost_to_first_step_median_s": statistics.median(r["lost_to_first_step_s"] for r in runs),
            "steps_lost_median": statistics.median(r["steps_lost"] for r in runs),
            "joined_to_first_step_median_s": statistics.median(r["joined_to_first_step_s"] for r in runs),
            "steps_per_second_median": speeds.get((w, mode)),
            "n": len(runs), "runs": runs})
        print(f"workers={w} {mode:8s} lost->step {results[-1]['lost_to_first_step_median_s']:.1f}s  "
              f"steps lost {results[-1]['steps_lost_median']}  "
              f"joined->step {results[-1]['joined_to_first_step_median_s']:.1f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "recovery from a lost worker (agent and worker killed at once): seconds from the loss "
                     "to the first step after it, steps lost, seconds from starting a replacement to the "
                     "first step that includes it; medians over the runs",
        "setup": {"nnodes": "1:N", "nproc_per_node": 1, "runs": args.runs, "parallel": args.parallel,
                  "model": "mlp", "dataset": "digits", "backend": "gloo",
                  "checkpoint_every": CHECKPOINT_EVERY, "log_every": LOG_EVERY,
                  "rdzv_conf": {"default": {"is_host": "false", **DEFAULT_RDZV_CONF},
                                "tuned": dict(TUNED_RDZV_CONF),
                                "reported": {**TUNED_RDZV_CONF, **REPORTED_KEEP_ALIVE},
                                "preloaded": {**TUNED_RDZV_CONF, **REPORTED_KEEP_ALIVE},
                                "perStep": {"lighthouse_heartbeat_timeout_ms": LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS,
                                            "join_timeout_ms": 2000}},
                  "device": "cpu (CUDA_VISIBLE_DEVICES empty)",
                  "machine": ({"summarised_from_log": args.from_log.name, "machine": args.machine}
                              if args.from_log else
                              {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "torch": torch.__version__})},
        "results": results,
    }
    path = args.out / "recovery.json"
    if args.section:
        whole = json.loads(path.read_text()) if path.exists() else {}
        whole.setdefault("sections", {})[args.section] = out
        path.write_text(json.dumps(whole, indent=2) + "\n")
        plot(results, args.out / f"recovery-{args.section}.png")
        print(f"wrote section {args.section!r} of {path} and recovery-{args.section}.png")
        return
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out / "recovery.png")
    print(f"wrote {path} and recovery.png")


if __name__ == "__main__":
    main()
