"""The one minibatch training loop the compiler's small learned pieces share: exit heads
(passes/exits.py) and the audit's attack decoders (drivers/audit.py, drivers/audit_text.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fit_minibatches(optimizer: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, *,
                    epochs: int, batch: int, seed: int) -> None:
    """`epochs` passes over `n` samples in shuffled minibatches of `batch` (the order seeded, so a
    compile or an audit is reproducible); `loss_of(indices)` returns the minibatch's scalar loss."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch):
            optimizer.zero_grad()
            loss_of(idx).backward()
            optimizer.step()
