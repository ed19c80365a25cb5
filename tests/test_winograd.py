"""Winograd convolution (backends/tvm/winograd.py): the transforms' arithmetic, where the rewrite applies,
and that a compiled Winograd graph computes what torch computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from splitc.backends.tvm import coverage, database, driver, prepare, target_keys, winograd
from torch import nn

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "host"}


@pytest.mark.parametrize("tile", [2, 4])
def test_transforms_compute_a_3x3_correlation(tile):
    """Y = A^T [(G g G^T) * (B^T d B)] A is the valid 3x3 cross-correlation (what conv2d computes)
    of one (tile+2)^2 input tile with the filter, from the same matrices the TIR functions use."""
    a, b, g = winograd.transform_matrices(tile)
    rng = np.random.default_rng(tile)
    d = rng.standard_normal((tile + 2, tile + 2))
    f = rng.standard_normal((3, 3))
    y = a.T @ ((g @ f @ g.T) * (b.T @ d @ b)) @ a
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * f) for j in range(tile)] for i in range(tile)])
    np.testing.assert_allclose(y, direct, rtol=1e-9, atol=1e-9)
    # The weight as the rewrite stores it: (alpha^2, CI, CO), [e * alpha + n] = (G W G^T)[e, n].
    w = rng.standard_normal((3, 3, 2, 5)).astype(np.float32)
    u = winograd.transform_weight(w, tile)
    assert u.shape == ((tile + 2) ** 2, 2, 5) and u.dtype == np.float32
    np.testing.assert_allclose(u[:, 1, 3].reshape(tile + 2, tile + 2), g @ w[:, :, 1, 3].astype(np.float64) @ g.T, rtol=1e-6)


def _prepared(model: nn.Module, x: torch.Tensor, **options):
    """The model's Relax module after splitc's pre-tuning passes, and what torch computes."""
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        program = torch.export.export(model, (x,))
        expected = model(x).numpy()
    prepared = prepare.prepare(from_exported_program(program, keep_params_as_input=False), target_keys.resolve_target(X86), **options)
    return prepared, expected


def _run(prepared, x: torch.Tensor) -> np.ndarray:
    """`prepared` built untuned (the input transform keeps splitc's schedule) and run on x."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(prepared, target=tvm.target.Target(target_keys.resolve_target(X86))), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    return (got[0] if not hasattr(got, "numpy") else got).numpy()


class Stages(nn.Module):
    """A residual 3x3 block at 28x28 (F(4x4): 49 tiles), one at 14x14 (F(2x2): 49 tiles), a 3x3
    convolution at 7x7 (16 tiles of 2x2: stays direct) and one with 3 input channels (stays direct)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.small = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x) + x)
        x = torch.relu(self.b(torch.relu(self.down(x))))
        return self.small(nn.functional.max_pool2d(x, 2))


def test_rewrite_applies_where_it_pays_and_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 28, 28)
    prepared, expected = _prepared(Stages().eval(), x, prepack=True, winograd=True)
    names = [gv.name_hint for gv in prepared.functions if gv.name_hint != "main"]
    script = prepared["main"].script(show_meta=False)
    # 28x28 x 16 channels: F(4x4), 36 x 49 tiles; 14x14 x 32: F(2x2), 16 x 49 tiles.
    assert "R.Tensor((36, 49, 16)" in script and "R.Tensor((16, 49, 32)" in script, script
    assert sum(n.startswith("winograd_input") for n in names) == 2, names
    # The residual add and ReLU fused into the output transform, as they would into a convolution.
    assert any(n.startswith("fused_winograd_output") and n.count("add") == 2 and "relu" in n for n in names), names
    # The stem (3 input channels) and the 7x7 convolution stay direct, as does the strided one.
    assert sum("conv2d" in n for n in names) == 3, names
    # The input transforms are scheduled by splitc: not tuning tasks.
    tasks = [t.task_name for t in prepare.extract_tasks(prepared, target_keys.resolve_target(X86))]
    assert not any("winograd_input" in t for t in tasks) and any("matmul" in t for t in tasks), tasks

    got = _run(prepared, x)
    assert got.shape == expected.shape
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


class Padded(nn.Module):
    """Uneven zero padding (folded into the convolution: top 2, left 0, bottom 3, right 1; four
    different sides, so reading them in another order gives other results) and an odd output size
    (31 x 27: the last tiles partly outside)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 24, 3)

    def forward(self, x):
        return torch.relu(self.conv(nn.functional.pad(x, (0, 1, 2, 3))))


def test_uneven_padding_and_partial_tiles_match_torch():
    torch.manual_seed(1)
    x = torch.randn(1, 16, 28, 28)
    prepared, expected = _prepared(Padded().eval(), x, prepack=False, winograd=True)
    assert expected.shape == (1, 24, 31, 27)
    names = [gv.name_hint for gv in prepared.functions]
    assert any(n.startswith("winograd_input") for n in names) and not any("conv2d" in n for n in names), names
    assert "R.Tensor((36, 56, 16)" in prepared["main"].script(show_meta=False)  # F(4x4): 8 x 7 tiles
    np.testing.assert_allclose(_run(prepared, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_winograd_off_keeps_direct_convolutions(monkeypatch):
    monkeypatch.setenv("SPLITC_WINOGRAD", "0")
    assert not prepare.winograd_enabled()
    torch.manual_seed(0)
    prepared, _ = _prepared(Stages().eval(), torch.randn(1, 3, 28, 28), prepack=True)
    names = [gv.name_hint for gv in prepared.functions]
    assert not any("winograd" in n for n in names) and sum("conv2d" in n for n in names) == 5, names


def test_a_database_tuned_without_winograd_still_applies_in_full(tmp_path, monkeypatch):
    """Records tuned with SPLITC_WINOGRAD=0 (or before Winograd existed) cover the direct variant
    only: compile's best_variant picks that variant instead of a Winograd one without records."""
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        mod = from_exported_program(torch.export.export(Stages().eval(), (x,)), keep_params_as_input=False)
    target = target_keys.resolve_target(X86)
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPLITC_WINOGRAD", "0")
    report = driver.tune_module(mod, X86, trials=4, trials_per_task=1, population=16)
    assert report.coverage.complete and not report.coverage.winograd

    monkeypatch.delenv("SPLITC_WINOGRAD")
    directory = database.database_dir(target)
    variant = coverage.best_variant(mod, target, directory)
    prepared, cov = variant.prepared, variant.coverage
    assert cov.complete and not cov.winograd and cov.tasks == report.tasks, cov
    assert not any("winograd" in gv.name_hint for gv in prepared.functions)
    # With no records at all, the preferred variant: Winograd, pre-packed.
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "empty"))
    cov = coverage.best_variant(mod, target, database.database_dir(target)).coverage
    assert cov.winograd and cov.prepack and cov.with_record == 0
