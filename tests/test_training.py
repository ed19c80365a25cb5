"""core/training.py: the split, early stopping and the seed every training loop shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitc.core.training import fit, holdout_split


def test_holdout_split_is_deterministic_disjoint_and_sized():
    train, held = holdout_split(797, 0.5, seed=0)
    assert len(train) == 398 and len(held) == 399
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(797))
    again = holdout_split(797, 0.5, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])
    assert not np.array_equal(train, holdout_split(797, 0.5, seed=1)[0])
    assert np.array_equal(train, np.sort(train))
    # The audit's attacker/held-out split, as it was before the shared utility.
    permutation = np.random.default_rng(0).permutation(797)
    assert np.array_equal(train, np.sort(permutation[:398]))
    with pytest.raises(ValueError):
        holdout_split(10, 1.0, seed=0)


def _regression(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(200, generator=generator)
    return x, y


def test_fit_converges_and_is_reproducible():
    x, y = _regression()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        result = fit(model, len(x), optimizer=optimizer, loss_of=lambda idx: ((model(x[idx])[:, 0] - y[idx]) ** 2).mean(),
                     epochs=40, batch=32, seed=3, progress=False)
        weights.append(model.weight.detach().clone())
    assert result.epochs == 40 and result.held_loss is None
    assert torch.equal(weights[0], weights[1])
    assert torch.allclose(weights[0], torch.tensor([[1.0, -2.0, 0.5]]), atol=0.1)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    """A held-out loss that is best at epoch 3 and worse after: training stops at 3 + patience and the
    parameters of epoch 3 come back."""
    model = torch.nn.Linear(1, 1, bias=False)
    seen = []

    def step(idx):
        with torch.no_grad():
            model.weight += 1.0   # epoch k ends with weight k (one minibatch per epoch)
        return 0.0

    def held_loss(idx):
        w = float(model.weight)
        seen.append(w)
        return abs(w - 3.0)

    with torch.no_grad():
        model.weight.zero_()
    result = fit(model, 10, step=step, held_loss=held_loss, epochs=50, batch=10, seed=0, held_share=0.2, patience=4, progress=False)
    assert result.best_epoch == 3 and result.epochs == 3 + 4
    assert float(model.weight) == 3.0
    assert result.held_loss == 0.0


def test_fit_refuses_ambiguous_arguments():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError):
        fit(model, 4, epochs=1, batch=2, seed=0)
    with pytest.raises(ValueError):
        fit(model, 4, step=lambda idx: 0.0, epochs=1, batch=2, seed=0, held_share=0.5)
