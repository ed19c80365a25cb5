"""The one training utility every loop that trains uses: exit heads (passes/exits.py), the audit's
attack decoders (drivers/audit.py, drivers/audit_text.py) and the defence (passes/defend.py).

What they share, so a compile, an audit and a defence are reproducible and comparable:

* `holdout_split`: the deterministic train/held-out split of n samples (a seeded permutation; the
  first part trains, the rest is held out; both sorted);
* `fit`: seeded minibatch epochs, early stopping on the held-out loss (patience in epochs; the
  parameters of the best epoch are restored), and a progress bar (rich) only when asked for or when
  stderr is a terminal.

A loop hands `fit` either a loss (`loss_of(idx)`, one optimiser step per minibatch) or a whole
step (`step(idx)`, for loops such as the adversarial defence that update two models per minibatch).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def holdout_split(n: int, held_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held) indices of n samples: a seeded permutation, the first floor(n x (1 - share)) train."""
    if not 0.0 <= held_share < 1.0:
        raise ValueError(f"held_share {held_share} must be in [0, 1)")
    permutation = np.random.default_rng(seed).permutation(n)
    n_train = int(n * (1.0 - held_share)) if held_share > 0 else n
    return np.sort(permutation[:n_train]), np.sort(permutation[n_train:])


@dataclass(frozen=True)
class FitResult:
    epochs: int                 # epochs run
    best_epoch: int             # the epoch whose parameters were kept (1-based; = epochs without early stopping)
    train_loss: float           # mean minibatch loss of the last epoch
    held_loss: float | None     # held-out loss of the kept epoch (None: nothing held out)
    seconds: float

    def to_json(self) -> dict:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "train_loss": _round(self.train_loss),
                "held_loss": _round(self.held_loss), "seconds": round(self.seconds, 3)}


def fit(modules: torch.nn.Module | Sequence[torch.nn.Module], n: int, *, epochs: int, batch: int, seed: int,
        optimizer: torch.optim.Optimizer | None = None, loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
        step: Callable[[torch.Tensor], float] | None = None, held_loss: Callable[[torch.Tensor], float] | None = None,
        held_share: float = 0.0, patience: int = 10, progress: bool | None = None, description: str = "training") -> FitResult:
    """Train `modules` for up to `epochs` shuffled passes over the samples 0..n-1 in minibatches of `batch`.

    Each minibatch is handed to `step(idx)` (which runs its own optimiser steps and returns the loss),
    or, given `optimizer` and `loss_of(idx)` instead, one zero_grad/backward/step on that loss.
    With `held_share` > 0 the samples are split with `holdout_split(n, held_share, seed)`; after every
    epoch the held-out loss (`held_loss(idx)`, default `loss_of` without gradients) is measured, the
    modules' parameters of the best epoch kept, and training stops after `patience` epochs without
    improvement. `progress`: a rich progress bar (None: only when stderr is a terminal).
    """
    if (step is None) == (loss_of is None) or (loss_of is not None and optimizer is None):
        raise ValueError("fit takes either step, or optimizer and loss_of")
    if step is None:
        def step(idx: torch.Tensor) -> float:
            optimizer.zero_grad()
            loss = loss_of(idx)
            loss.backward()
            optimizer.step()
            return float(loss.detach())
    modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    train, held = holdout_split(n, held_share, seed) if held_share > 0 and n >= 2 else (np.arange(n), np.arange(0))
    if len(held) and held_loss is None:
        if loss_of is None:
            raise ValueError("fit with step and held_share > 0 needs held_loss")
        def held_loss(idx: torch.Tensor) -> float:
            return float(loss_of(idx))
    train_t, held_t = torch.from_numpy(train), torch.from_numpy(held)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    best, best_epoch, best_state, last_loss, epoch = math.inf, 0, None, math.nan, 0
    with _progress(progress, description, epochs) as advance:
        for epoch in range(1, epochs + 1):
            for module in modules:
                module.train()
            losses = [step(train_t[idx]) for idx in torch.randperm(len(train_t), generator=generator).split(batch)]
            last_loss = float(np.mean(losses)) if losses else math.nan
            current = None
            if len(held_t):
                for module in modules:
                    module.eval()
                with torch.no_grad():
                    current = float(np.mean([held_loss(chunk) for chunk in held_t.split(max(batch, 256))]))
                if current < best:
                    best, best_epoch, best_state = current, epoch, [copy.deepcopy(m.state_dict()) for m in modules]
            advance(last_loss, current)
            if len(held_t) and epoch - best_epoch >= patience:
                break
    if best_state is not None:
        for module, state in zip(modules, best_state):
            module.load_state_dict(state)
    for module in modules:
        module.eval()
    return FitResult(epoch, best_epoch or epoch, last_loss, None if best_state is None else best, time.perf_counter() - started)


class _progress:
    """A rich progress bar over epochs (loss and held-out loss in the label), or nothing."""

    def __init__(self, enabled: bool | None, description: str, total: int):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.description, self.total = description, total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda loss, held: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)

        def advance(loss: float, held: float | None) -> None:
            label = f"{self.description} loss {loss:.4g}" + ("" if held is None else f" held-out {held:.4g}")
            self.bar.update(task, advance=1, description=label)

        return advance

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _round(value):
    return None if value is None or not math.isfinite(value) else round(float(value), 6)
