"""A lepton inference server at one and ten times what it admits: what it sheds, what it keeps.

One ``python -m lepton_trainer.serve`` process (the MLP of bench/serving.py, one torch
thread, REST) with ``--max-concurrent-requests C``. Closed-loop clients send one-row JSON
requests back to back for ``--seconds``: first C of them (1x: everything is admitted),
then 10 C (10x) that retry at once, then 10 C that wait the Retry-After the server
answers before they retry (10x_retry_after; the load generator shares the machine, so
clients that never wait take CPU from the server they overload). Per level: requests
offered, admitted (answered 200), refused (503 with Retry-After, by the server's
reason), throughput and latency of the admitted, the server's peak resident set (VmHWM)
and whether its health endpoint answered 200 all along.

    .venv/bin/python bench/overload.py [--concurrency 16] [--seconds 10]

Writes bench/results/overload.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402  (its server process and model)
from serving import ROOT, lepton, train  # noqa: E402

RESULT = ROOT / "bench" / "results" / "overload.json"


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


async def refused(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return {s.labels["reason"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "lepton_serve_refused_requests_total"}


async def _client(session, url: str, body: bytes, until: float, out: dict, backoff: bool) -> None:
    while time.monotonic() < until:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            out["codes"][r.status] = out["codes"].get(r.status, 0) + 1
            if r.status == 200:
                out["latency"].append(time.perf_counter() - t0)
            elif r.status == 503 and r.headers.get("Retry-After") is None:
                out["missing_retry_after"] += 1
            elif r.status == 503 and backoff:
                await asyncio.sleep(float(r.headers["Retry-After"]))


async def _health(session, port: int, until: float, out: dict) -> None:
    while time.monotonic() < until:
        async with session.get(f"http://127.0.0.1:{port}/v2/health/live") as r:
            out["health"].append(r.status)
        await asyncio.sleep(0.1)


async def level(srv, clients: int, seconds: float, body: bytes, backoff: bool = False) -> dict:
    out = {"codes": {}, "latency": [], "health": [], "missing_retry_after": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        before = await refused(session, srv.port)
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(session, srv.url, body, until, out, backoff) for _ in range(clients)),
                             _health(session, srv.port, until, out))
        after = await refused(session, srv.port)
    lat = np.array(out["latency"]) * 1000
    offered = sum(out["codes"].values())
    return {"clients": clients, "seconds": seconds, "clients_honour_retry_after": backoff,
            "offered": offered, "admitted": out["codes"].get(200, 0),
            "refused": offered - out["codes"].get(200, 0),
            "refused_by_reason": {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)},
            "codes": {str(k): v for k, v in sorted(out["codes"].items())},
            "admitted_per_second": round(out["codes"].get(200, 0) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "peak_rss_bytes": peak_rss(srv.proc.pid), "health_all_200": set(out["health"]) == {200},
            "health_probes": len(out["health"]), "503_without_retry_after": out["missing_retry_after"],
            "server_alive": srv.proc.poll() is None}


async def bench(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = train(work / "model")
        srv = lepton("overload", model_dir, work, "--grpc-port", "0", "--max-concurrent-requests",
                     str(args.concurrency), "--max-queued-requests", str(args.concurrency))
        try:
            await srv.wait_ready()
            body = serving._json_body("mlp", np.full(64, 0.25, np.float32))
            return {"1x": await level(srv, args.concurrency, args.seconds, body),
                    "10x": await level(srv, 10 * args.concurrency, args.seconds, body),
                    "10x_retry_after": await level(srv, 10 * args.concurrency, args.seconds, body, True)}
        finally:
            srv.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=16, help="the server's --max-concurrent-requests")
    p.add_argument("--seconds", type=float, default=10.0, help="per load level")
    args = p.parse_args()
    results = asyncio.run(bench(args))
    results["settings"] = {"max_concurrent_requests": args.concurrency, "max_queued_requests": args.concurrency,
                           "model": "built-in MLP 64-512-512-10", "torch_threads": 1,
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
