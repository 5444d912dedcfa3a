#!/usr/bin/env python3
"""Local control plane costs: cold build time, cached start time, and memory.

    python3 bench/cluster.py            # cached start (median of --runs) + RSS
    python3 bench/cluster.py --cold     # also a cold build into empty caches (slow)

The cold build uses an empty tool cache and an empty Go build cache; the Go module
download cache is kept, so the number is compile time, not network time.
Writes bench/results/cluster.json (merging with earlier results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

RESULT = ROOT / "bench" / "results" / "cluster.json"


def cold_build() -> float:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as gocache:
        env = {**os.environ, "LEPTON_CACHE": cache, "GOCACHE": gocache}
        t0 = time.monotonic()
        subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "all"], env=env, check=True)
        return time.monotonic() - t0


def cached_start(runs: int) -> tuple[list[float], list[int], dict[str, int]]:
    starts, rss, per_process = [], [], {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            c = localcluster.Cluster(Path(d))
            t0 = time.monotonic()
            c.start()
            starts.append(time.monotonic() - t0)
            time.sleep(10)  # let every component settle before reading memory
            rss.append(c.rss_bytes())
            per_process = {name: localcluster.Cluster(c.state_dir, pids={name: pid}).rss_bytes()
                           for name, pid in c.pids.items()}
            c.stop()
    return starts, rss, per_process


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", action="store_true", help="also measure a cold build (minutes)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    result["versions"] = localcluster.versions()
    if args.cold:
        secs = cold_build()
        result["cold_build_seconds"] = round(secs, 1)
        print(f"cold build: {secs:.0f} s")
    starts, rss, per_process = cached_start(args.runs)
    result["cached_start_seconds"] = {"median": round(statistics.median(starts), 2),
                                      "runs": [round(s, 2) for s in starts]}
    result["control_plane_rss_mib"] = {"median": round(statistics.median(rss) / 2**20, 1),
                                       "per_process_last_run": {k: round(v / 2**20, 1)
                                                                for k, v in per_process.items()}}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached start: median {result['cached_start_seconds']['median']} s over {args.runs} runs")
    print(f"control plane RSS: median {result['control_plane_rss_mib']['median']} MiB")
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
