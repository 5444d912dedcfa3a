"""Fine-tune a causal language model on a text file: a plain torchrun script (torch and
transformers only) that a LeptonJob runs, and whose output a LeptonModel serves.

    torchrun --standalone --nproc-per-node=2 finetune.py \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --data train.txt --steps 200

--model is a Hugging Face directory (config.json, tokenizer, safetensors), a .gguf file, or
a directory holding one .gguf file (transformers dequantizes it while loading). The text is
cut into blocks of --seq-len tokens; each step trains on --global-batch-size blocks, shared
out among the ranks; at the end global rank 0 writes the model as a Hugging Face directory
(config.json, tokenizer, model.safetensors): what a LeptonModel with ``source.jobRef``
compresses and serves.

Elastic: torchrun may restart the workers with another world size (a node lost or added).
The data of a step depends on the step alone and the global batch stays the same for any
world size, so a restart resumes from the newest checkpoint and goes on as if nothing had
happened. Where the operator runs it, these come from the environment:

    LEPTON_CHECKPOINT_DIR  checkpoints, shared by every worker (the job's spec.checkpoint)
    LEPTON_OUTPUT_DIR      the fine-tuned model (the job's spec.output; the model's source)
    LEPTON_METRICS_PORT    step, loss and samples/s for Prometheus (prometheus-client)
"""
import argparse
import functools
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer

CHECKPOINT = re.compile(r"^ckpt-(\d+)\.pt$")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face directory, .gguf file, or a directory with one")
    p.add_argument("--data", required=True, help="a UTF-8 text file to train on")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in all")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training block")
    p.add_argument("--global-batch-size", type=int, default=8, help="blocks per step over all ranks")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--checkpoint-dir", default=os.environ.get("LEPTON_CHECKPOINT_DIR", "checkpoints"))
    p.add_argument("--output-dir", default=os.environ.get("LEPTON_OUTPUT_DIR", "output"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load(path):
    """(model, tokenizer) from a Hugging Face directory or a GGUF file."""
    path, extra = Path(path), {}
    if path.is_dir() and not (path / "config.json").exists():
        path = next(path.glob("*.gguf"))
    if path.suffix == ".gguf":
        path, extra = path.parent, {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    if getattr(model, "hf_quantizer", None) is not None:   # GGUF: its weights are plain tensors now
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def blocks(tokenizer, text_file, seq_len):
    """The text as one token stream cut into [n, seq_len] blocks (the tail is dropped)."""
    ids = tokenizer(Path(text_file).read_text(encoding="utf-8"))["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise SystemExit(f"{text_file} holds {len(ids)} tokens, fewer than --seq-len {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def global_batch(step, n, size, seed):
    """Block indices of a step: positions step*size.. of an endless stream of shuffled
    epochs, the same for every world size and every restart."""
    return [epoch_order(n, seed, p // n)[p % n] for p in range(step * size, (step + 1) * size)]


def latest_checkpoint(directory):
    found = [(int(m.group(1)), p) for p in Path(directory).glob("ckpt-*.pt") if (m := CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(directory, step, model, optimizer):
    """Written to a temporary file and renamed: a reader sees the whole file or none. Only
    the newest is kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final, tmp = directory / f"ckpt-{step}.pt", directory / f".ckpt-{step}.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, final)
    for old in directory.glob("ckpt-*.pt"):
        if old != final:
            old.unlink(missing_ok=True)


def metrics():
    """Gauges for the operator's stall detection and autoscaler, when it gives a port
    (names and labels: lepton_trainer/contract.py)."""
    port = os.environ.get("LEPTON_METRICS_PORT")
    if not port or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    import prometheus_client
    labels = {"lepton_job": os.environ.get("LEPTON_JOB_NAME", ""),
              "lepton_namespace": os.environ.get("LEPTON_JOB_NAMESPACE", "")}
    prometheus_client.start_http_server(int(port))
    return {name: prometheus_client.Gauge(name, doc, list(labels)).labels(**labels)
            for name, doc in (("lepton_train_step", "optimizer steps completed"),
                              ("lepton_train_loss", "training loss of the last step"),
                              ("lepton_train_samples_per_second", "blocks per second, whole job"))}


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.global_batch_size < world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is below the world size {world}")

    model, tokenizer = load(args.model)
    data = blocks(tokenizer, args.data, args.seq_len)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step, checkpoint = 0, latest_checkpoint(args.checkpoint_dir)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, mmap=True, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    print(f"event={'resume' if checkpoint else 'start'} rank={rank} world={world} step={step} "
          f"blocks={len(data)}", flush=True)
    ddp, gauges = DistributedDataParallel(model), metrics()

    while step < args.steps:
        started = time.monotonic()
        mine = global_batch(step, len(data), args.global_batch_size, args.seed)[rank::world]
        batch = data[mine].to(device)
        # The mean over this rank's blocks, weighted so that DDP's average of the ranks'
        # gradients is the gradient of the mean over the whole global batch.
        loss = ddp(input_ids=batch, labels=batch).loss
        (loss * len(mine) * world / args.global_batch_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.monotonic() - started
        if gauges:
            gauges["lepton_train_step"].set(step)
            gauges["lepton_train_loss"].set(loss.item())
            gauges["lepton_train_samples_per_second"].set(args.global_batch_size / seconds)
        if rank == 0:
            print(f"event=step step={step} loss={loss.item():.4f} seconds={seconds:.2f}", flush=True)
            if step % args.checkpoint_every == 0 or step == args.steps:
                save_checkpoint(args.checkpoint_dir, step, model, optimizer)
                print(f"event=checkpoint step={step}", flush=True)

    if rank == 0:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"event=done step={step} output={args.output_dir}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
