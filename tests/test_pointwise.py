"""splitc's own schedules for 1x1 convolutions (backends/tvm/pointwise.py): which functions they take,
which tile shapes, that the scheduled code computes what the untuned code computes, and that a tuning
run offers them to the search as records that compile applies."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from splitc.backends.tvm import apply_records, coverage, database, driver, prepare, target_keys
from torch import nn

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "host"}


class Pointwise(nn.Module):
    """An inverted-residual-like stack on a 15x15 image: 1x1 expansion with ReLU6 (16 -> 32
    channels: four 8-lane vectors on AVX2), a 3x3 depthwise layer (not pointwise), a 1x1
    projection to 24 channels (three vectors) and a 1x1 skip to 24 without bias, added, a 1x1
    stride-2 convolution to 16 (an 8x8 output), and a 1x1 convolution to 10 channels (not a
    multiple of the vector or half of it: left alone)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 24, 1)
        self.skip = nn.Conv2d(16, 24, 1, bias=False)
        self.down = nn.Conv2d(24, 16, 1, stride=2)
        self.narrow = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        y = self.project(self.dw(torch.clamp(self.expand(x), 0, 6))) + self.skip(x)
        return self.narrow(self.down(y))


def _prepared(model, x):
    from tvm.relax.frontend.torch import from_exported_program

    program = torch.export.export(model, (x,))
    return prepare.prepare(from_exported_program(program, keep_params_as_input=False), target_keys.resolve_target(X86), True)


def test_tile_shapes_divide_rows_and_keep_enough_accumulators():
    from splitc.backends.tvm.pointwise import tile_shapes

    assert tile_shapes(112, 112, 2) == [(8, 1), (4, 2)]
    assert tile_shapes(56, 56, 3) == [(8, 1), (4, 3)]
    assert tile_shapes(28, 28, 6) == [(7, 1), (4, 2), (4, 3)]    # 7 divides a 28-pixel row, 8 does not
    assert tile_shapes(14, 14, 12) == [(7, 1)]                   # 2 pixels x 2 or 3 vectors: too few accumulators
    assert tile_shapes(15, 15, 2) == [(5, 1)]
    assert tile_shapes(1, 3, 3) == [(3, 1), (3, 3)]              # a row of 3: whole rows only
    assert tile_shapes(4, 1, 1) == [(4, 1)]                      # one-pixel rows: 4 rows per tile
    # 32 registers (AVX-512): up to 8 pixels by 2 or 3 vectors
    assert tile_shapes(14, 14, 6, registers=32) == [(7, 1), (7, 2), (7, 3)]
    assert tile_shapes(56, 56, 3, registers=32) == [(8, 1), (8, 3)]


def test_strip_shapes_stack_two_strips_or_more():
    from splitc.backends.tvm.pointwise import strip_shapes

    assert strip_shapes(112, 6) == [(8, 1)]                    # 16 registers: one vector per strip
    assert strip_shapes(56, 6, registers=32) == [(8, 1), (8, 2), (8, 3)]
    assert strip_shapes(28, 4, registers=32) == [(7, 1), (7, 2)]
    assert strip_shapes(15, 3, registers=32) == [(5, 1), (5, 3)]
    assert strip_shapes(8, 1) == [(4, 1)]                      # 8 rows: two strips of 4
    assert strip_shapes(7, 3, registers=32) == []              # one strip would fill the image
    assert strip_shapes(11, 1) == []                           # no divisor from 4 to 8


# Schedules per 1x1 task (expansion, projection, skip, stride-2 down) by vector width. 256 bits (16
# registers): the 15x15 image allows row tiles of 5 pixels x 1 vector, and 3 x 3 for 24 channels;
# the 8x8 output after the stride 8 x 1 and 4 x 2; each twice (pixel tiles outer, and channel tiles
# outer); and a column strip of 5 (4 after the stride) by 1 vector. 512 bits (32 registers): row
# tiles 5 x 1 and 5 x 2 for 32 channels, 5 x 1 and 5 x 3 for 24 (three 8-lane vectors, half of a
# 16-lane one), 8 x 1 for 16 channels, twice each; column strips of as many vectors.
SCHEDULES_PER_TASK = {256: [3, 5, 5, 5], 512: [3, 6, 6, 6]}


@pytest.mark.parametrize("bits", sorted(SCHEDULES_PER_TASK))
def test_pointwise_schedules_take_1x1_convolutions_and_match_the_untuned_code(bits):
    import tvm
    from splitc.backends.tvm.pointwise import pointwise_schedules
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    torch.manual_seed(0)
    prepared = _prepared(Pointwise().eval(), torch.randn(1, 16, 15, 15))
    target = tvm.target.Target(target_keys.resolve_target(X86))     # 16-lane vectors build for AVX2 too (as two halves)
    taken, left, packed = {}, [], 0
    rng = np.random.default_rng(0)
    for gvar, func in prepared.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
            continue
        schedules = pointwise_schedules(func, bits)
        if not schedules:
            left.append(gvar.name_hint)
            continue
        taken[gvar.name_hint] = len(schedules)
        shapes = [[int(d) for d in arg.shape] for arg in ArgInfo.from_prim_func(func)]
        inputs = [rng.standard_normal(shape).astype("float32") for shape in shapes[:-1]]

        def run(lib, shapes=shapes, inputs=inputs):
            args = [tvm.runtime.tensor(a) for a in inputs] + [tvm.runtime.tensor(np.zeros(shapes[-1], "float32"))]
            lib["main"](*args)
            return args[-1].numpy()

        expected = run(tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target))
        packed += sum("layout_rewrite_preproc" in schedule.mod.script() for schedule in schedules)
        for schedule in schedules:
            own = tvm.tirx.build(tvm.IRModule({"main": schedule.mod["main"].with_attr("global_symbol", "main")}), target=target)
            np.testing.assert_allclose(run(own), expected, rtol=1e-5, atol=1e-5)
    # expansion (+ReLU6), projection (+bias +residual), skip, stride-2 down; not the depthwise, not the 10-channel one
    assert len(taken) == 4 and all("conv2d" in name for name in taken), taken
    assert any("conv2d" in name for name in left), left
    assert sorted(taken.values()) == SCHEDULES_PER_TASK[bits], taken
    # The weights are laid out per tile (a layout rewrite the build hoists) wherever a task has
    # more output channels than one tile holds: the 1-vector tiles of the 24-channel tasks at least.
    assert packed >= 4, packed


def test_tuning_offers_the_pointwise_schedule_and_compile_applies_it(tmp_path, monkeypatch):
    import tvm
    from tvm import relax

    torch.manual_seed(0)
    model, x = Pointwise().eval(), torch.randn(1, 16, 15, 15)
    with torch.no_grad():
        expected = model(x).numpy()
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    report = driver.tune_module(mod, X86, trials=0)
    own = 0
    for line in (report.directory / database.RECORD_FILE).read_text().splitlines():
        trace = json.loads(line)[1][0]
        own += any(inst[0] == "Vectorize" for inst in trace[0]) and not any(inst[0].startswith("Sample") for inst in trace[0])
    # splitc's schedules for the four 1x1 tasks (trials=0: nothing searched), as many as the test above takes
    bits = target_keys.vector_bits(target_keys.resolve_target(X86))
    assert own == sum(SCHEDULES_PER_TASK[bits]) if bits in SCHEDULES_PER_TASK else own >= 4, own

    target = target_keys.resolve_target(X86)
    variant = coverage.best_variant(mod, target, report.directory)
    applied = apply_records.apply_database(variant.prepared, target, variant.coverage.prepack, variant.database)
    assert variant.coverage.with_record == variant.coverage.tasks
    vm = relax.VirtualMachine(tvm.compile(applied, target=tvm.target.Target(target)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_search_starts_from_splitcs_packed_records(tmp_path, monkeypatch):
    # The search seeds its population with the database's best records, replayed without their
    # postprocessing and postprocessed again (the weight layout rewrite among them): splitc's
    # records must survive that (a layout rewrite among the schedule steps made it fail).
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model, x = Pointwise().eval(), torch.randn(1, 16, 15, 15)
    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    report = driver.tune_module(mod, X86, trials=32)
    searched = 0
    for line in (report.directory / database.RECORD_FILE).read_text().splitlines():
        searched += any(inst[0].startswith("Sample") for inst in json.loads(line)[1][0][0])
    assert searched > 0, "the search measured nothing"
