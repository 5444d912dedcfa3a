"""Pod discovery for the local Prometheus: what ``kubernetes_sd_configs`` (role ``pod``)
with the usual ``prometheus.io/*`` annotation relabelling does in most installations.

Debian's ``prometheus`` package is built without Kubernetes service discovery, so this
process lists the running pods every second and writes those annotated
``prometheus.io/scrape: "true"`` as a file_sd target file (``<podIP>:<prometheus.io/port>``,
``__metrics_path__`` from ``prometheus.io/path``, labels ``namespace`` and ``pod``).
Prometheus re-reads the file within a second.

    python3 hack/podsd.py --server URL --ca CA --cert CRT --key KEY --out FILE

Started and stopped with the local cluster's real node; only the standard library is used.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.request
from pathlib import Path

ANNOTATION = "prometheus.io/"


def targets(pods: list[dict]) -> list[dict]:
    out = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status", {})
        ann = meta.get("annotations") or {}
        if ann.get(ANNOTATION + "scrape") != "true" or not status.get("podIP") or meta.get("deletionTimestamp"):
            continue
        port = ann.get(ANNOTATION + "port")
        if not port:
            continue
        out.append({"targets": [f"{status['podIP']}:{port}"],
                    "labels": {"__metrics_path__": ann.get(ANNOTATION + "path", "/metrics"),
                               "namespace": meta["namespace"], "pod": meta["name"]}})
    return sorted(out, key=lambda t: t["targets"][0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    url = f"{args.server}/api/v1/pods?fieldSelector=status.phase%3DRunning"
    last = None
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                found = targets(json.load(resp)["items"])
        except (OSError, ValueError) as exc:
            print(f"[podsd] listing pods failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(args.interval)
            continue
        if found != last:
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(found, indent=1))
            os.replace(tmp, args.out)
            last = found
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
