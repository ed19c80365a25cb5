"""The threaded TVM build (backends/tvm/build.py): how it estimates a function's cost, how it deals
functions out to workers, and that the library it links computes what `tvm.compile` +
`export_library` compute."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from splitc.backends.tvm.build import (UNROLLED_STATEMENTS, build_library, cap_unrolling, cap_unrolling_in, codegen_target, deal,
                                      unrolled_size)
from torch import nn

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


def _matmul(n: int, inner: int, max_step: int | None):
    """An n x n matmul whose innermost `inner` x `inner` output tile sits under a
    `pragma_auto_unroll_max_step` of `max_step` (None: no pragma)."""
    import tvm
    from tvm import te

    a, b = te.placeholder((n, n), name="A"), te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, c]))
    i, j, kk = sch.get_loops(sch.get_sblock("C"))
    i_outer, i_inner = sch.split(i, [None, inner])
    j_outer, j_inner = sch.split(j, [None, inner])
    sch.reorder(i_outer, j_outer, kk, i_inner, j_inner)
    if max_step is not None:
        sch.annotate(i_outer, "pragma_auto_unroll_max_step", max_step)
    return sch.mod["main"]


def test_unrolled_size_counts_the_loops_the_pragma_unrolls():
    plain = unrolled_size(_matmul(64, 4, None))
    # A 4 x 4 output tile is 32 steps beneath `kk` (each output: its init, then its update); they
    # fit a 32-step pragma, so the tile's statements count 16 times. The `kk` loop itself
    # (64 x 32 steps) does not fit and stays a loop.
    unrolled = unrolled_size(_matmul(64, 4, 32))
    assert unrolled >= plain + 15 * 3
    # One step short: only the inner loop of the tile (4 x 2 steps) unrolls; a pragma smaller than
    # that unrolls nothing.
    assert plain < unrolled_size(_matmul(64, 4, 31)) < unrolled
    assert unrolled_size(_matmul(64, 4, 7)) == plain
    # An 8 x 8 tile under a 128-step pragma: four times as many statements as the 4 x 4 one.
    assert unrolled_size(_matmul(64, 8, 128)) - plain > 3.5 * (unrolled - plain)


def test_codegen_target_selects_instructions_fast_on_x86_64_only():
    x86 = codegen_target({**X86, "cl-opt": ["-unroll-threshold:int=100"]})
    assert x86["cl-opt"] == ["-unroll-threshold:int=100", "-fast-isel"] and codegen_target(x86) == x86
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert codegen_target(arm) == arm and "cl-opt" not in codegen_target(X86 | {"kind": "c"})


def test_deal_gives_the_costly_function_a_worker_of_its_own():
    functions = {"big": _matmul(64, 8, 128), **{f"small{i}": _matmul(64, 4, None) for i in range(5)}}
    groups = deal(functions, 2)
    assert len(groups) == 2
    alone = [g for g in groups if "big" in g]
    assert alone and list(alone[0]) == ["big"]
    assert sorted(name for g in groups for name in g) == sorted(functions)
    # Never more groups than functions, never an empty one.
    assert [len(g) for g in deal({"one": functions["big"]}, 4)] == [1]
    # Costliest group first (the workers take them in this order): four small tiles outweigh the big one.
    tiles = {"big": _matmul(64, 8, 512), **{f"small{i}": _matmul(64, 4, 512) for i in range(4)}}
    assert unrolled_size(tiles["big"]) < 4 * unrolled_size(tiles["small0"])
    assert [sorted(g) for g in deal(tiles, 2)] == [[f"small{i}" for i in range(4)], ["big"]]


def _run(func, target=X86):
    """`func`'s output for fixed random inputs, built for this host."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target(target))
    shapes = [[int(d) for d in arg.shape] for arg in ArgInfo.from_prim_func(func)]
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(shape).astype("float32")) for shape in shapes]
    lib["main"](*args)
    return args[-1].numpy()


def test_cap_unrolling_lowers_the_step_until_the_kernel_fits():
    big = _matmul(64, 8, 512)                       # the 8 x 8 tile (128 steps) unrolled
    at_64, plain = unrolled_size(_matmul(64, 8, 64)), unrolled_size(_matmul(64, 8, None))
    assert unrolled_size(big) > at_64 > plain
    capped, step = cap_unrolling(big, most_statements=at_64)
    assert step == 64 and unrolled_size(capped) == at_64
    np.testing.assert_allclose(_run(capped), _run(big), rtol=1e-5)
    # Even 64 steps too many: down to none; a kernel that fits is returned as it is.
    assert cap_unrolling(big, most_statements=plain)[1] == 0
    same, none = cap_unrolling(big, most_statements=unrolled_size(big))
    assert none is None and same.same_as(big)


def test_cap_unrolling_in_a_module_names_what_it_lowered_and_leaves_the_input_alone():
    import tvm

    big, small = _matmul(64, 32, 2048), _matmul(64, 16, 512)   # a 32 x 32 tile unrolled; a 16 x 16 one
    assert unrolled_size(big) > UNROLLED_STATEMENTS >= unrolled_size(small)
    mod = tvm.IRModule({"big": big, "small": small})
    capped, names = cap_unrolling_in(mod)
    assert names == {"big": 64}
    assert unrolled_size(capped["big"]) <= UNROLLED_STATEMENTS and capped["small"].same_as(small)
    assert mod["big"].same_as(big)                  # the caller's module is not changed
    assert cap_unrolling_in(tvm.IRModule({"small": small}))[1] == {}


def test_tuning_builds_candidates_with_the_unrolling_compile_builds():
    # The tuning builder caps unrolling and sets LLVM's options as compile does, so a record is timed
    # as it will be built (the IR names the target it was built for, options included).
    import tvm
    from splitc.backends.tvm.search import fast_build
    from tvm.driver import build as tvm_driver_build

    big = _matmul(64, 32, 2048).with_attr("global_symbol", "main")
    assert unrolled_size(big) > UNROLLED_STATEMENTS
    target = tvm.target.Target(X86)
    uncapped = tvm_driver_build(tvm.IRModule({"main": big}), target=target).inspect_source("ll")
    candidate = fast_build(tvm.IRModule({"main": big}), target, None).inspect_source("ll")
    built_for = tvm.target.Target(codegen_target(X86))
    capped = tvm_driver_build(tvm.IRModule({"main": cap_unrolling(big)[0]}), target=built_for).inspect_source("ll")
    assert candidate == capped and len(candidate) < len(uncapped) / 2


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1)).softmax(-1)


@pytest.mark.parametrize("workers", [1, 3])
def test_threaded_build_computes_what_tvm_compile_computes(workers, tmp_path):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(1, 3, 12, 12)
    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    functions = {gv: f for gv, f in relax.get_pipeline("default")(mod).functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(deal(functions, workers)) == min(workers, len(functions)) and len(functions) >= 3

    tvm.compile(mod, target=tvm.target.Target(X86)).export_library(str(tmp_path / "reference.so"))
    build_library(mod, X86, tmp_path / "threaded.so", workers=workers)
    outputs = []
    for name in ("reference", "threaded"):
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / f"{name}.so")), tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy())
    np.testing.assert_array_equal(outputs[1], outputs[0])
    np.testing.assert_allclose(outputs[1], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_kept_kernel_objects_are_linked_instead_of_built_again(tmp_path):
    """A group of TIR functions built once is linked from the cache the next time, by its content:
    the same module reuses every group; a model whose classifier differs reuses the groups it
    shares and builds the others; both libraries compute what `tvm.compile` builds."""
    import tvm
    from splitc.backends.tvm.build_cache import KernelObjects
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    first, other = Stack().eval(), Stack().eval()
    other.fc = nn.Linear(8, 7)
    mods = [from_exported_program(torch.export.export(m, (x,)), keep_params_as_input=False) for m in (first, other)]
    objects = KernelObjects(X86, tmp_path / "cache")
    workers = 16  # one function per group

    groups, reused = build_library(mods[0], X86, tmp_path / "a.so", workers=workers, objects=objects)
    assert groups >= 3 and reused == 0
    assert len(list((tmp_path / "cache" / "builds").glob("*.o"))) == groups
    assert build_library(mods[0], X86, tmp_path / "again.so", workers=workers, objects=objects) == (groups, groups)
    other_groups, other_reused = build_library(mods[1], X86, tmp_path / "other.so", workers=workers, objects=objects)
    assert 0 < other_reused < other_groups  # the convolution's groups kept; the classifier's built

    for model, mod, name in ((first, mods[0], "again"), (other, mods[1], "other")):
        tvm.compile(mod, target=tvm.target.Target(X86)).export_library(str(tmp_path / f"{name}.reference.so"))
        outputs = []
        for library in (f"{name}.reference.so", f"{name}.so"):
            vm = relax_vm(tmp_path / library)
            outputs.append(vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy())
        np.testing.assert_array_equal(outputs[1], outputs[0])
        np.testing.assert_allclose(outputs[1], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)

    # What the objects are built under is part of their key.
    group = tvm.IRModule({"f": _matmul(64, 4, None)})
    with tvm.transform.PassContext(opt_level=3) as plain:
        key = objects.key(group, plain)
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_vectorize": True}) as scalar:
        assert objects.key(group, scalar) != key
    assert KernelObjects({**X86, "mcpu": "skylake"}).key(group, plain) != key


def relax_vm(path):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
