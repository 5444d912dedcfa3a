"""Helpers for the compression and serving tests: a quickly trained model directory,
subprocess environments and a free loopback port."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

from lepton_trainer import data, modelio, models

ROOT = Path(__file__).resolve().parents[2]


def train_mlp(directory: Path, hidden: int = 256, steps: int = 300, seed: int = 0) -> Path:
    """Train an MLP on digits for ``steps`` Adam steps and save it as a model directory."""
    torch.manual_seed(seed)
    split = data.load_digits()
    config = {"in_features": split.num_features, "hidden": hidden, "layers": 2,
              "num_classes": split.num_classes}
    model = models.fit(models.build("mlp", **config), split.x_train, split.y_train, steps, seed=seed)
    acc = models.accuracy(model, split.x_test, split.y_test)
    assert acc > 0.9, f"the fixture model only reached {acc:.3f}"
    return modelio.save_model(directory, model, {
        "arch": "mlp", "config": config, "dataset": "digits",
        "input_shape": [split.num_features], "dtype": "float32", "metrics": {"accuracy": acc}})


def env() -> dict[str, str]:
    """Environment for a trainer subprocess: one torch thread, the package importable."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "trainer_image"), e.get("PYTHONPATH")) if p)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PYTHON = sys.executable
