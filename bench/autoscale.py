"""Builtin autoscaler reaction time, against the HPA and KEDA defaults.

Starts the local control plane (real Prometheus scraping every second), the operator,
and a test exporter whose in-flight gauge the benchmark sets. A LeptonModel autoscales
on ``metric: inflight`` with target 1. Each run holds the load at 1 (one replica), then
raises it to 4 and measures:

- **crossing -> replicas**: from the first moment Prometheus answers the new value
  (polled every 50 ms) to the moment the serving Deployment asks for more replicas,
  and to the moment the new pods exist (both polled every 50 ms);
- **set -> replicas**: from the exporter change, which adds up to one scrape interval.

The goal is at most one scrape interval + 2 s from crossing to new replicas. For
comparison, the HPA re-evaluates every 15 s (``--horizontal-pod-autoscaler-sync-period``)
and KEDA polls every 30 s (``pollingInterval``) by default; their expected delay from a
crossing is about half a period plus the metric pipeline's own scrape, computed here
from those defaults (neither runs in the local cluster).

    .venv/bin/python bench/autoscale.py [--runs 7]

Writes bench/results/autoscale.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from harness import ROOT, Bench, poll

NS = "bench-autoscale"
MODEL = "react"
INTERVAL = 0.5          # the builtin autoscaler's query interval (seconds)
HPA_SYNC_S, KEDA_POLL_S = 15.0, 30.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with Bench(NS) as b:
        cluster, exporter = b.cluster, b.exporter
        scrape_s = float(cluster.scrape_interval.rstrip("s"))
        labels = {"lepton_model": MODEL, "lepton_namespace": NS}
        exporter.set("lepton_serve_inflight_requests", 1.0, **labels)
        b.apply([
            {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": MODEL, "namespace": NS},
             "spec": {"source": {"uri": "pvc://models/m"}, "compression": {"method": "none"},
                      "serving": {"replicas": 1},
                      "autoscaling": {"metric": "inflight", "target": 1, "maxReplicas": 8,
                                      "stableWindowSeconds": 6, "panicWindowSeconds": 1, "panicThreshold": 2,
                                      "scaleDownDelaySeconds": 0, "intervalSeconds": INTERVAL}}}])
        apps, core = b.apps, b.core

        def dep_replicas():
            deps = apps.list_namespaced_deployment(NS, label_selector=f"lepton.ai/model={MODEL}").items
            return sum(d.spec.replicas or 0 for d in deps) if deps else 0

        def pods():
            return len([p for p in core.list_namespaced_pod(NS, label_selector=f"lepton.ai/model={MODEL}").items
                        if not p.metadata.deletion_timestamp])

        query = f'sum(lepton_serve_inflight_requests{{lepton_model="{MODEL}",lepton_namespace="{NS}"}})'
        runs = []
        for i in range(args.runs):
            exporter.set("lepton_serve_inflight_requests", 1.0, **labels)
            poll(lambda: dep_replicas() == 1 and pods() == 1, timeout=120)
            poll(lambda: exporter.prometheus_value(query) == 1.0)
            time.sleep(2 * INTERVAL)        # a few quiet samples in the panic window
            t_set = time.monotonic()
            exporter.set("lepton_serve_inflight_requests", 4.0, **labels)
            t_cross, _ = poll(lambda: (exporter.prometheus_value(query) or 0) > 1.0)
            t_decided, n = poll(lambda: (r := dep_replicas()) > 1 and r)
            t_pods, _ = poll(lambda: pods() > 1)
            runs.append({"set_to_crossing_s": round(t_cross - t_set, 3),
                         "crossing_to_decision_s": round(t_decided - t_cross, 3),
                         "crossing_to_new_pods_s": round(t_pods - t_cross, 3),
                         "set_to_new_pods_s": round(t_pods - t_set, 3), "replicas": n})
            print(f"run {i + 1}: {runs[-1]}", flush=True)

        def med(key):
            return round(statistics.median(r[key] for r in runs), 3)

        result = {
            "benchmark": "builtin autoscaler reaction time (LeptonModel, metric inflight, target 1, load 1 -> 4)",
            "machine": b.machine(),
            "prometheus_scrape_interval_s": scrape_s,
            "autoscaler_interval_s": INTERVAL,
            "runs": len(runs),
            "median": {k: med(k) for k in runs[0] if k != "replicas"},
            "max_crossing_to_new_pods_s": max(r["crossing_to_new_pods_s"] for r in runs),
            "goal_crossing_to_new_pods_s": scrape_s + 2,
            "goal_met": max(r["crossing_to_new_pods_s"] for r in runs) <= scrape_s + 2,
            "comparison_defaults": {
                "hpa_sync_period_s": HPA_SYNC_S, "keda_polling_interval_s": KEDA_POLL_S,
                "hpa_expected_crossing_to_decision_s": HPA_SYNC_S / 2,
                "keda_expected_crossing_to_decision_s": KEDA_POLL_S / 2 + HPA_SYNC_S / 2,
                "note": "computed from the defaults (mean wait = half a period; KEDA's metric then goes "
                        "through the HPA's own sync); not measured here",
            },
            "per_run": runs,
        }
        out = ROOT / "bench" / "results" / "autoscale.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("median", "goal_met", "prometheus_scrape_interval_s")}))
        return 0


if __name__ == "__main__":
    sys.exit(main())
