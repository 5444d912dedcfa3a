"""Small real datasets that ship with installed packages (no download at run time).

``digits`` is scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
Features are scaled to [0, 1]. The split is deterministic, so every worker, the
compression Job and the benchmarks agree on what is held out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(torch.max(torch.cat([self.y_train, self.y_test])).item()) + 1


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Digits as float32 features in [0, 1] and int64 labels, split by a fixed seed."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr),
                 torch.from_numpy(x_te), torch.from_numpy(y_te))


DATASETS = {"digits": load_digits}


def load(name: str) -> Split:
    try:
        return DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
