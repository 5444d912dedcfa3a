"""Built-in model architectures, selected by name and rebuilt from a plain config dict."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A feed-forward classifier: Linear -> ReLU blocks -> Linear."""

    def __init__(self, in_features: int = 64, hidden: int = 256, layers: int = 2,
                 num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        blocks.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyTransformer(nn.Module):
    """A small encoder-only transformer over a flat feature vector cut into tokens.

    The 64 digit pixels become ``in_features // token_dim`` tokens of ``token_dim``
    values each (8 rows of 8 pixels by default), plus a learned position embedding.
    """

    def __init__(self, in_features: int = 64, token_dim: int = 8, d_model: int = 64,
                 heads: int = 4, layers: int = 2, num_classes: int = 10):
        super().__init__()
        if in_features % token_dim:
            raise ValueError("in_features must be a multiple of token_dim")
        self.tokens = in_features // token_dim
        self.token_dim = token_dim
        self.embed = nn.Linear(token_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.token_dim)) + self.pos
        return self.head(self.encoder(h).mean(dim=1))


ARCHITECTURES = {"mlp": MLP, "transformer": TinyTransformer}


def build(arch: str, **config) -> nn.Module:
    """Build a model by architecture name with keyword config (the same config is
    stored in a model directory's meta.json, so the model can be rebuilt)."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    return cls(**config)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 64,
        lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Fit ``model`` on (x, y) with ``steps`` Adam steps on random mini-batches, in one
    process: a reference model for compression and serving, not distributed training."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode, in the model's dtype."""
    model.eval()
    dtype = param_dtype(model)
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch].to(dtype))
        correct += int((logits.argmax(dim=1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))
