"""Tiny models saved the ways people save them (tests/test_model_files.py); importable as
`tests.file_models:tiny_cnn` for the factory + --weights path."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TinyCNN(nn.Module):
    """conv -> relu -> max_pool2d -> conv -> mean -> linear: an op (max_pool2d) whose export reads
    a tuple, and enough layers for a cut."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class DictInput(nn.Module):
    """forward(d) with d = {"img": ..., "bias": ...}; returns a dict holding a tuple."""

    def __init__(self):
        super().__init__()
        self.body = TinyCNN(1)

    def forward(self, d):
        logits = self.body(d["img"]) + d["bias"]
        return {"logits": logits, "extra": (logits.softmax(-1), d["img"].mean((1, 2, 3)))}


class KeywordInput(nn.Module):
    """A keyword-only input next to a positional one."""

    def __init__(self):
        super().__init__()
        self.body = TinyCNN(2)

    def forward(self, x, *, extra):
        return self.body(x) * extra


def tiny_cnn() -> nn.Module:
    return TinyCNN().eval()


def image(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
