"""Canary rollout timing: a bad canary's rollback and a good canary's promotion.

Starts the local control plane (a real Prometheus scraping every second), the operator
and a test exporter (harness.py). A LeptonModel rolls out a new revision in two steps
(50 % then 100 %) judged by ``max(test_error_ratio{rev="${revision}"}) <= 0.1``, measured
once per step (``count: 1``) every second. Each run measures:

- **bad canary**: from the first moment Prometheus answers a bad value for the canary
  (polled every 50 ms) to the moment the canary's Deployment is scaled to zero;
- **good canary**: from the new spec's apply to the promotion (two steps, no pauses).

Argo Rollouts' analysis defaults are recorded beside: ``consecutiveErrorLimit`` 4 and a
single measurement when no ``interval`` is set; Argo is not run here.

    .venv/bin/python bench/rollout.py [--runs 5]

Writes bench/results/rollout.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from harness import ROOT, Bench, poll

NS = "bench-rollout"
MODEL = "roll"
QUERY = 'max(test_error_ratio{rev="${revision}"})'


def model(image: str) -> dict:
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": MODEL, "namespace": NS},
            "spec": {"source": {"uri": "pvc://models/m"}, "compression": {"method": "none"},
                     "serving": {"replicas": 2, "image": image},
                     "rollout": {"steps": [{"weight": 50}, {"weight": 100}],
                                 "analysis": [{"name": "errors", "query": QUERY, "max": 0.1, "intervalSeconds": 1,
                                               "inconclusiveLimit": 100}]}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with Bench(NS) as b:
        scrape_s = float(b.cluster.scrape_interval.rstrip("s"))

        def revs():
            return b.model_status(MODEL).get("revisions") or {}

        def canary_replicas(rev):
            deps = b.apps.list_namespaced_deployment(NS, label_selector=f"lepton.ai/revision={rev}").items
            return deps[0].spec.replicas if deps else None

        b.apply([model("img:0")])
        poll(lambda: b.model_status(MODEL).get("phase") == "Ready", timeout=120)
        image, bad, good = 0, [], []
        for i in range(args.runs):
            # A good canary: its error ratio is set before it starts.
            image += 1
            t0 = time.monotonic()
            b.apply([model(f"img:{image}")])
            _, rev = poll(lambda: revs().get("canary"), timeout=60)
            b.exporter.set("test_error_ratio", 0.01, rev=rev)
            t_done, _ = poll(lambda: revs().get("stable") == rev and b.model_status(MODEL).get("phase") == "Ready",
                             timeout=120)
            good.append(round(t_done - t0, 3))
            # A bad canary: waits without data, then its first bad sample.
            image += 1
            b.apply([model(f"img:{image}")])
            _, rev = poll(lambda: revs().get("canary"), timeout=60)
            poll(lambda: canary_replicas(rev), timeout=60)
            b.exporter.set("test_error_ratio", 0.5, rev=rev)
            t_bad, _ = poll(lambda: (b.exporter.prometheus_value(
                f'max(test_error_ratio{{rev="{rev}"}})') or 0) > 0.1, timeout=30)
            t_back, _ = poll(lambda: canary_replicas(rev) == 0, timeout=60)
            bad.append(round(t_back - t_bad, 3))
            print(f"run {i + 1}: good canary promoted in {good[-1]}s, bad canary rolled back "
                  f"{bad[-1]}s after its first bad sample", flush=True)
            # Back to a known stable revision for the next run.
            poll(lambda: b.model_status(MODEL).get("phase") in ("Degraded", "RollingBack"), timeout=60)
        result = {
            "benchmark": "canary rollout: bad canary's first bad sample -> rolled back; good canary apply -> promoted",
            "machine": b.machine(),
            "prometheus_scrape_interval_s": scrape_s,
            "analysis": {"count": 1, "intervalSeconds": 1, "steps": [50, 100]},
            "runs": args.runs,
            "median_bad_sample_to_rollback_s": round(statistics.median(bad), 3),
            "median_good_apply_to_promoted_s": round(statistics.median(good), 3),
            "per_run": {"bad_sample_to_rollback_s": bad, "good_apply_to_promoted_s": good},
            "argo_rollouts_defaults": {"consecutiveErrorLimit": 4, "failureLimit": 0, "inconclusiveLimit": 0,
                                       "measurements_without_interval": 1,
                                       "note": "Argo's documented defaults, for comparison; Argo is not run here"},
            "lepton_defaults": {"count": 1, "intervalSeconds": 10, "failureLimit": 0, "inconclusiveLimit": 5,
                                "consecutiveErrorLimit": 4, "onInconclusive": "rollback"},
        }
        out = ROOT / "bench" / "results" / "rollout.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k.startswith("median")}))
        return 0


if __name__ == "__main__":
    sys.exit(main())
