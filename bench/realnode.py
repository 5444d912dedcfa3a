"""The real node's numbers: image builds and sizes, node start, and the product's times on
real containers, measured by running the real-node suite (tests/real) once.

    .venv/bin/python bench/realnode.py [--ci-seconds S]

* Image build times: every build hack/images.py ran on this machine (it records them in
  ``~/.cache/lepton-operator/image-builds.json``); the first of each is the cold build.
  The cached build is timed here: the same ``build`` with everything present.
* Sizes: buildah's.
* The rest comes from the suite, which records when asked (``LEPTON_REALNODE_TIMINGS``):
  real node start, helm install, apply to first training step, worker and rendezvous pod
  deleted to training resumed (seconds, steps lost), compression Job duration, model
  applied to first correct prediction.
* ``--ci-seconds``: the wall time of a whole ``bash .ci/run``, measured by the caller.

Writes bench/results/realnode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
import images  # noqa: E402
import realnode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci-seconds", type=float, help="wall time of `bash .ci/run`, measured by the caller")
    args = parser.parse_args()
    reason = realnode.unsupported_reason()
    if reason:
        print(f"no real node on this machine: {reason}")
        return 1
    refs = images.build_all()
    t0 = time.monotonic()
    images.build_all()
    cached = time.monotonic() - t0
    builds = json.loads(images.BUILDS.read_text()) if images.BUILDS.exists() else {}
    out: dict = {
        "images": {
            name: {"ref": refs[name], "size_mb": round(images.size_bytes(refs[name]) / 1e6),
                   "cold_build_seconds": builds.get(name, [{}])[0].get("seconds"),
                   "builds_seconds": [b["seconds"] for b in builds.get(name, [])]}
            for name in ("base", "operator", "trainer")},
        "cached_build_all_seconds": round(cached, 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "real", "tests/real", "-q", "-p", "no:cacheprovider",
             "--basetemp", str(Path(tmp) / "t")],
            cwd=ROOT, env={**os.environ, "LEPTON_REALNODE_TIMINGS": str(timings)})
        out["suite"] = json.loads(timings.read_text()) if timings.exists() else {}
        out["suite_passed"] = proc.returncode == 0
    if args.ci_seconds:
        out["ci_run_wall_seconds"] = args.ci_seconds
    out["machine"] = {"cpus": os.cpu_count(), "note": "one run; the suite's steps happen once each"}
    dest = ROOT / "bench" / "results" / "realnode.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if out["suite_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
