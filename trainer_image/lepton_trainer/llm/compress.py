"""Compression of a causal language model behind the perplexity gate (``--task text-generation``).

``python -m lepton_trainer compress`` hands over here when ``LEPTON_TASK`` (or ``--task``) is
``text-generation``. The source is what :func:`lepton_trainer.llm.loader.load` reads: a Hugging
Face directory, a ``.gguf`` file or a directory holding one. A GGUF source is dequantized by
transformers while loading, so every artifact, ``none`` included, is written in the Hugging
Face format (``config.json``, tokenizer, safetensors).

Methods (``contract.LLM_COMPRESSION_METHODS``):
  int8-weight   torchao weight-only int8 (``Int8WeightOnlyConfig``, one scale per output row)
                on every Linear layer but the output head; activations keep the model's dtype
  int4-weight   torchao weight-only int4 (``Int4WeightOnlyConfig``, groups of 128), probed
                first on one small layer on CPU: with torchao 0.18 its kernels are CUDA's
                only (mslk, tinygemm), so it is unavailable, with the library's own reason
  bf16, fp16    parameters cast to bfloat16 / float16
  none          the model unchanged (re-saved in the Hugging Face format)
  auto          tries ``params.candidates`` (default: int4-weight, int8-weight, bf16, fp16);
                one that cannot apply is listed as unavailable with its reason, one that
                fails while it runs as failed with the error; keeps the smallest
                (``params.objective: size``) or the fastest in output tokens/s at batch 1
                (``latency``) that passes the gate. Under ``size``, a candidate larger than
                one that already passed is not gated (``skipped``) unless
                ``params.measureAll``. The whole table goes into the result.

Every candidate is applied through transformers (``from_pretrained`` with a
``TorchAoConfig`` or a dtype), saved, and loaded back from the saved directory with
:func:`loader.load`: that reloaded model is the one gated and timed, and the saved files
are what the artifact directory receives, byte for byte. Speed is output tokens per second
of greedy decoding (``DECODE_TOKENS`` tokens at batch 1 and at batch 4), within
``--latency-budget`` seconds per model.

The gate is :mod:`lepton_trainer.llm.gate`. The result (``result.json`` in the artifact
directory and the compact termination message, written by ``lepton_trainer.compress``'s
writers) holds ``passed``, ``reason``, ``method``, ``gate`` and, for auto, ``candidates``;
``result.json`` also keeps each prompt with both models' greedy answers (``gate_samples``).
Exit status: 0 passed, 3 gate failed (no artifact), 1 nothing could be done.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import compress as base
from .. import contract, modelio
from . import gate as llm_gate
from . import loader

log = logging.getLogger("lepton_trainer.llm.compress")

METHODS = contract.LLM_COMPRESSION_METHODS
AUTO_CANDIDATES = ("int4-weight", "int8-weight", "bf16", "fp16")   # likely smallest first
PARAMS = ("candidates", "objective", "measureAll")
DECODE_TOKENS = 32           # tokens decoded per timed pass
DECODE_BATCHES = (1, 4)
INT4_GROUP_SIZE = 128
SAMPLES_KEY = "gate_samples"  # result.json only: prompts with both models' answers
Step, progress = base.Step, base.progress


# --- methods -------------------------------------------------------------------------------

def _int4_config() -> Any:
    """torchao's int4 weight-only config, if it runs here; else MethodUnavailable with the
    library's reason (probed on one small Linear layer)."""
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    probe = torch.nn.Sequential(torch.nn.Linear(256, 256, dtype=torch.bfloat16))
    try:
        quantize_(probe, config)
        probe(torch.zeros(1, 256, dtype=torch.bfloat16))
    except (ImportError, NotImplementedError, RuntimeError, AssertionError) as e:
        raise base.MethodUnavailable(
            f"torchao {torchao.__version__} Int4WeightOnlyConfig cannot run on CPU, where compression "
            f"runs: {type(e).__name__}: {str(e)[:200]} (its int4 kernels are CUDA's)") from None
    return config


def load_kwargs(method: str) -> dict[str, Any]:
    """What ``from_pretrained`` applies for ``method``: a dtype, a torchao quantization config."""
    from transformers import TorchAoConfig

    if method in ("bf16", "fp16"):
        return {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16}[method]}
    if method == "int8-weight":
        from torchao.quantization import Int8WeightOnlyConfig
        return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    if method == "int4-weight":
        return {"dtype": torch.bfloat16, "quantization_config": TorchAoConfig(_int4_config())}
    if method == "none":
        return {}
    raise ValueError(f"unknown method {method!r}; known: {[m for m in METHODS if m != 'auto']}")


def apply(method: str, original: Path, out: Path) -> None:
    """Write ``method`` applied to the Hugging Face directory ``original`` into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": "auto", "local_files_only": True, "trust_remote_code": False, **load_kwargs(method)}
    model = AutoModelForCausalLM.from_pretrained(original, **kwargs)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(original, local_files_only=True).save_pretrained(out)


def describe_dtype(model: Any) -> dict[str, Any]:
    quant = getattr(model.config, "quantization_config", None)
    kind = None
    if quant is not None:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        kind = (quant.get("quant_type") or {}).get("default", {}).get("_type") or quant.get("quant_method")
    return {"dtype": str(model.dtype).removeprefix("torch."), "quantization": kind}


# --- measurement ---------------------------------------------------------------------------

@torch.inference_mode()
def decode_speed(model: Any, prompt_ids: list[int], batch: int, budget_s: float,
                 tokens: int = DECODE_TOKENS) -> dict[str, Any]:
    """Output tokens/s of greedy decoding of ``tokens`` tokens for ``batch`` copies of the
    prompt, over as many passes as fit in ``budget_s`` (one at least, after one warm-up)."""
    x = torch.tensor([prompt_ids] * batch)
    kwargs = {"attention_mask": torch.ones_like(x), "do_sample": False, "num_beams": 1,
              "max_new_tokens": tokens, "min_new_tokens": tokens}
    model.generate(x, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    passes, elapsed = 0, 0.0
    while passes == 0 or elapsed < budget_s:
        t0 = time.perf_counter()
        y = model.generate(x, **kwargs)
        elapsed += time.perf_counter() - t0
        passes += 1
    produced = (y.shape[1] - x.shape[1]) * batch * passes
    return {"tokens_per_second": round(produced / elapsed, 2), "passes": passes}


def speeds(model: Any, evaluator: llm_gate.Evaluator, budget_s: float, step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in DECODE_BATCHES:
        progress(f"measuring output tokens/s of greedy decoding at batch {b} "
                 f"({budget_s / len(DECODE_BATCHES):.3g} s)", step)
        s = decode_speed(model, evaluator.prompt_ids[0], b, budget_s / len(DECODE_BATCHES))
        out[f"tokens_per_second_batch{b}"] = s["tokens_per_second"]
        out[f"decode_passes_batch{b}"] = s["passes"]
    return out


# --- candidates ----------------------------------------------------------------------------

class Run:
    """What every candidate of one compression shares."""

    def __init__(self, evaluator: llm_gate.Evaluator, work: Path, budget_s: float, params: dict):
        self.evaluator, self.work, self.budget_s, self.params = evaluator, work, budget_s, params
        self.original = work / "original"
        self.samples: dict[str, list] = {}


def _beaten(row: dict[str, Any], rows: list[dict[str, Any]], run: Run) -> str | None:
    """Under ``objective: size``, the candidate that already passed and is no larger."""
    if run.params.get("objective", "size") != "size" or run.params.get("measureAll"):
        return None
    better = [r for r in rows if r.get("gate", {}).get("passed") and r["bytes"] <= row["bytes"]]
    if not better:
        return None
    return f"skipped: {row['bytes']} bytes, no smaller than {better[0]['method']} ({better[0]['bytes']} bytes), which passed"


def measure(method: str, run: Run, step: Step, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply, save, reload from the saved directory, gate and time one candidate."""
    t0 = time.perf_counter()
    out = run.work / method
    progress(f"applying {method} and saving it", step)
    apply(method, run.original, out)
    row: dict[str, Any] = {"method": method, "bytes": modelio.size_bytes(out)}
    skipped = _beaten(row, rows, run)
    if skipped:
        row["skipped"] = skipped
        progress(skipped, step)
        return row
    progress("reloading the saved model and computing the gate", step)
    model, _ = loader.load(out)
    row.update(describe_dtype(model))
    verdict, run.samples[method] = run.evaluator.score(model)
    row["gate"] = verdict
    progress(f"gate {'passed' if verdict['passed'] else 'failed'}: {llm_gate.describe(verdict)}", step)
    row.update(speeds(model, run.evaluator, run.budget_s, step))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def measure_all(candidates: list[str], run: Run) -> list[dict[str, Any]]:
    """One row per candidate; one that cannot apply is unavailable with its reason, one that
    raises while it runs failed with the error."""
    rows: list[dict[str, Any]] = []
    for k, method in enumerate(candidates, 1):
        step = Step(k, len(candidates), method)
        try:
            row = measure(method, run, step, rows)
        except base.MethodUnavailable as e:
            row = {"method": method, "error": f"unavailable: {e}", "unavailable": True}
        except (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError, ImportError) as e:
            row = {"method": method, "error": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        if "error" in row:
            progress(row["error"], step)
        log.info("candidate: %s", json.dumps(row, sort_keys=True))
        rows.append(row)
    return rows


def choose(rows: list[dict[str, Any]], objective: str) -> tuple[dict[str, Any] | None, str]:
    """The best row that passed the gate: the smallest (ties: the faster), or the fastest in
    output tokens/s at batch 1 (ties: the smaller). Marks why each other row was rejected."""
    ok = []
    for r in rows:
        if r.get("error") or r.get("skipped"):
            r["rejected"] = r.get("error") or r["skipped"]
        elif not r["gate"]["passed"]:
            r["rejected"] = "gate failed"
        else:
            ok.append(r)
    if not ok:
        return None, "no candidate passed the gate"
    if objective == "size":
        best = min(ok, key=lambda r: (r["bytes"], -r["tokens_per_second_batch1"]))
        why = f"smallest passing candidate ({best['bytes']} bytes)"
    else:
        best = max(ok, key=lambda r: (r["tokens_per_second_batch1"], -r["bytes"]))
        why = f"fastest passing candidate ({best['tokens_per_second_batch1']} output tokens/s at batch 1)"
    for r in rows:
        r["chosen"] = r is best
    return best, f"auto chose {best['method']}: {why}"


# --- the command ---------------------------------------------------------------------------

def validate(method: str, params: dict, budget_s: float) -> list[str]:
    """The candidates to run; ValueError for a bad method, parameter or budget."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for a text-generation model; known: {list(METHODS)}")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"parameters {unknown} do not apply to a text-generation model; it takes {list(PARAMS)}")
    if params.get("objective", "size") not in contract.AUTO_OBJECTIVES:
        raise ValueError(f"objective must be one of {list(contract.AUTO_OBJECTIVES)}, got {params['objective']!r}")
    if not budget_s > 0:
        raise ValueError(f"the latency budget must be > 0 seconds, got {budget_s}")
    if method != "auto":
        return [method]
    candidates = list(params.get("candidates") or AUTO_CANDIDATES)
    bad = [c for c in candidates if c not in METHODS or c == "auto"]
    if bad:
        raise ValueError(f"unknown auto candidates {bad}; known: {[m for m in METHODS if m != 'auto']}")
    return candidates


def compress(source: Path, artifact_dir: Path, method: str, evaluation: Any = None,
             params: dict | None = None,
             latency_budget_s: float = contract.COMPRESSION_LATENCY_BUDGET_SECONDS) -> dict[str, Any]:
    """Run one compression (or ``auto``); returns the result or raises ``compress.GateFailed``
    (``base.MethodUnavailable`` when no candidate could run at all)."""
    params = dict(params or {})
    candidates = validate(method, params, latency_budget_s)
    gate = llm_gate.parse(evaluation)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lepton-compress-llm-") as work:
        result = _compress(Path(source), Path(artifact_dir), method, candidates, gate, params,
                           latency_budget_s, Path(work), started)
    progress(f"done in {time.perf_counter() - started:.1f} s: {result['reason']}")
    return result


def _reference(source: Path, gate: llm_gate.Gate, run_dir: Path, budget_s: float,
               of: int) -> tuple[llm_gate.Evaluator, dict[str, Any]]:
    """Load the original, measure the gate's reference and its speed, and save it in the
    Hugging Face format (what every candidate starts from)."""
    progress(f"loading {source}")
    model, tokenizer = loader.load(source)
    model = loader.plain(model)
    progress("computing the perplexity gate's reference on the original model")
    evaluator = llm_gate.Evaluator(gate, model, tokenizer)
    before = speeds(model, evaluator, budget_s, Step(0, of, "none"))
    progress("saving the original in the Hugging Face format")
    model.save_pretrained(run_dir / "original")
    tokenizer.save_pretrained(run_dir / "original")
    return evaluator, before


def _compress(source: Path, artifact_dir: Path, method: str, candidates: list[str], gate: llm_gate.Gate,
              params: dict, budget_s: float, work: Path, started: float) -> dict[str, Any]:
    evaluator, before = _reference(source, gate, work, budget_s, len(candidates))
    run = Run(evaluator, work, budget_s, params)
    rows = measure_all(candidates, run)
    if all("error" in r for r in rows):
        raise base.MethodUnavailable("no compression candidate could run on this model: " + "; ".join(
            f"{r['method']}: {r['error']}" for r in rows))
    objective = params.get("objective", "size")
    best, why = choose(rows, objective)
    row = best or (rows[0] if method != "auto" else {})
    verdict = row.get("gate")
    result: dict[str, Any] = {
        "task": contract.TASK_TEXT_GENERATION, "method": row.get("method", method), "requested_method": method,
        "format": contract.MODEL_FORMAT_GGUF if loader.is_gguf(source) else "huggingface",
        "passed": best is not None, "bytes_before": modelio.size_bytes(source),
        "bytes_original_hf": modelio.size_bytes(run.original), "bytes_after": row.get("bytes"),
        "dtype": row.get("dtype"), "quantization": row.get("quantization"),
        "gate": verdict or gate.to_json(),
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": row.get(k) for k in before},
    }
    if row.get("bytes"):
        result["ratio"] = round(result["bytes_before"] / row["bytes"], 3)
    if method == "auto":
        result.update(candidates=rows, objective=objective)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if best is None:
        lead = why if method == "auto" else f"perplexity gate failed: {method}: {llm_gate.describe(verdict)}"
        result.update(passed=False, reason=f"{lead}; no artifact written")
        raise base.GateFailed(result, gate_failed=any(r.get("gate", {}).get("passed") is False for r in rows))
    result["reason"] = (f"{why}; " if method == "auto" else "") + f"gate passed: {llm_gate.describe(verdict)}"
    base.save(("copy",), run.work / best["method"], artifact_dir)
    result[contract.RESULT_ARTIFACT] = str(artifact_dir)
    result[SAMPLES_KEY] = run.samples[best["method"]]
    modelio.write_json_atomic(artifact_dir / contract.RESULT_FILE, result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer compress --task text-generation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--task", default=env(contract.ENV_TASK) or contract.TASK_TEXT_GENERATION,
                   choices=[contract.TASK_TEXT_GENERATION])
    p.add_argument("--model-dir", default=env(contract.ENV_MODEL_DIR),
                   help="the language model: a Hugging Face directory, a .gguf file or a directory holding one")
    p.add_argument("--model-format", default=env(contract.ENV_MODEL_FORMAT) or None, choices=contract.LLM_MODEL_FORMATS,
                   help="default: detected")
    p.add_argument("--artifact-dir", default=env(contract.ENV_ARTIFACT_DIR), help="output model directory")
    p.add_argument("--method", default=env(contract.ENV_COMPRESSION_METHOD, "none"), choices=METHODS)
    p.add_argument("--evaluation", default=env(contract.ENV_COMPRESSION_EVALUATION) or None,
                   help="the perplexity gate as a JSON object (see llm/gate.py)")
    p.add_argument("--params", default=env(contract.ENV_COMPRESSION_PARAMS, "{}"),
                   help="auto's parameters as a JSON object: candidates, objective, measureAll")
    p.add_argument("--objective", choices=contract.AUTO_OBJECTIVES, help="auto: keep the smallest or the fastest")
    p.add_argument("--latency-budget", type=float,
                   default=float(env(contract.ENV_COMPRESSION_LATENCY_BUDGET) or
                                 contract.COMPRESSION_LATENCY_BUDGET_SECONDS),
                   help="seconds of decoding measurement per model measured (both batch sizes)")
    p.add_argument("--termination-message-path",
                   default=env(base.ENV_TERMINATION_MESSAGE_PATH, contract.TERMINATION_MESSAGE_PATH))
    args = p.parse_args(argv)
    if not args.model_dir or not args.artifact_dir:
        p.error(f"--model-dir and --artifact-dir (or {contract.ENV_MODEL_DIR} and "
                f"{contract.ENV_ARTIFACT_DIR}) are required")
    try:
        args.params = json.loads(args.params)
        if not isinstance(args.params, dict):
            raise ValueError("not an object")
        llm_gate.parse(args.evaluation)
    except llm_gate.GateError as e:
        p.error(f"--evaluation / {contract.ENV_COMPRESSION_EVALUATION}: {e}")
    except ValueError as e:
        p.error(f"--params / {contract.ENV_COMPRESSION_PARAMS} must be a JSON object: {e}")
    if args.objective:
        args.params["objective"] = args.objective
    if args.model_format == contract.MODEL_FORMAT_GGUF and not loader.is_gguf(args.model_dir):
        p.error(f"--model-format gguf: {args.model_dir} is neither a .gguf file nor a directory holding one")
    return args


def _message(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != SAMPLES_KEY}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        result = compress(Path(args.model_dir), Path(args.artifact_dir), args.method, args.evaluation,
                          args.params, args.latency_budget)
    except base.GateFailed as e:
        log.error("%s", e)
        base.write_termination_message(args.termination_message_path, _message(e.result))
        return base.GATE_FAILED_EXIT if e.gate_failed else contract.COMPRESS_EXIT_FAILED
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        log.error("compression failed: %s", e)
        base.write_termination_message(args.termination_message_path,
                                       {"method": args.method, "passed": False, "reason": str(e)[:2000]})
        return contract.COMPRESS_EXIT_FAILED
    base.write_termination_message(args.termination_message_path, _message(result))
    print(json.dumps(_message(result), separators=(",", ":"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
