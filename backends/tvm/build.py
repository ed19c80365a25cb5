"""Build a Relax module into a shared library on all of this host's cores.

`tvm.compile` lowers and code-generates every TIR function of a module one after another into one
LLVM module; `export_library` then emits that module's object file and packs the VM executable
(bytecode and constants) into another, again one after another. TVM's FFI releases the GIL, so the
same steps run in threads here: the TIR functions are dealt out to twice as many LLVM modules as
there are workers, by their size after unrolling (one tuned kernel can cost nearly half the build:
ResNet-18's layer-4 3x3 convolution, unrolled 512 steps, took 1.3 s of 2.9), and the workers take
them largest first, each built and emitted in a worker thread while this thread links the
executable and packs it. The size is only an estimate (LLVM's own unrolling and vectorizing are not
in it: a stride-2 3x3 convolution estimated at 47 statements took 0.47 s), so a worker that finishes
early takes the next module instead of waiting for a fixed share: one group per worker had left one
thread 2.1 s of work and the other 0.7 s (ResNet-18, a fresh database: the build 2.5 s), four
groups on two threads 1.9-2.0 s. The library holds the same functions and constants, linked into one shared object.

Only TVM's own steps are used (`relax.build`'s, taken apart at its joints: pipeline, VM code
generation, TIR build, link), so the result is what `tvm.compile(...).export_library(...)` gives.

Each group's object file can be kept in a cache keyed by the group's content (`KernelObjects`,
backends/tvm/build_cache.py): a module that shares them with one built before links the kept objects
instead of lowering and code-generating again. The functions of a model do not depend on its
weights (those are constants of the Relax module), so new weights for the same architecture and
records rebuild no kernel: only the executable, which holds the constants, is linked again.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from splitc.backends.tvm.build_cache import KernelObjects


UNROLL_PRAGMA = "pragma_auto_unroll_max_step"   # MetaSchedule's loop annotation that TVM's UnrollLoop reads


def unrolled_size(func) -> int:
    """Statements of `func` once its loops are unrolled the way TVM's UnrollLoop will (a loop
    unrolls when the steps beneath it, extents multiplied, fit the `pragma_auto_unroll_max_step`
    above it, or when it is marked unrolled): a cheap estimate of what lowering and LLVM will cost."""
    return _steps_and_size(func.body, 0)[1]


def _steps_and_size(stmt, max_step: int) -> tuple[int, int]:
    """(steps as UnrollLoop counts them, statements after unrolling) of `stmt`, under a pragma of
    `max_step` (0: none)."""
    import tvm

    tirx = tvm.tirx
    if isinstance(stmt, tirx.For):
        annotations = stmt.annotations or {}
        if UNROLL_PRAGMA in annotations:
            max_step = int(annotations[UNROLL_PRAGMA])
        steps, size = _steps_and_size(stmt.body, max_step)
        if stmt.kind == tirx.ForKind.VECTORIZED:  # one vector statement per body statement
            return steps, size
        extent = int(stmt.extent) if isinstance(stmt.extent, tirx.IntImm) else 1
        if stmt.kind == tirx.ForKind.UNROLLED or 0 < extent * steps <= max_step:
            return extent * steps, extent * size
        return extent * steps, size + 1
    parts = [_steps_and_size(child, max_step) for child in child_statements(stmt)]
    if isinstance(stmt, tirx.SeqStmt):
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    # Any other statement: itself, plus whatever statements it holds (blocks, branches, lets).
    return (sum(p[0] for p in parts) if parts else 1), 1 + sum(p[1] for p in parts)


# The most statements one kernel may have once unrolled. Build time grows with them (~0.35 ms each
# here); past this, the unrolling bought nothing measurable in a model. ResNet-18's layer-4 3x3
# convolution, unrolled 512 steps, is 3406 statements and 1.2 s of TIR passes and LLVM, more than the
# whole untuned model; at 64 steps it is 362 statements and 0.09 s, and the model ran as fast (paired
# rounds: medians 0.97-0.99 of the 512-step build's time, 1 and 2 threads), although that kernel
# alone, timed with cold caches, took 878 us against 712. Below it, unrolling still paid: capping
# MobileNetV2's 14x14 64->384 expansion (1434 statements at 512 steps; 284 at 256 or fewer) made the
# model 3-5 % slower in every one of 8 paired rounds.
UNROLLED_STATEMENTS = 2048
UNROLL_STEPS = (64, 16, 0)      # MetaSchedule's own smaller choices of UNROLL_PRAGMA


def cap_unrolling(func, most_statements: int = UNROLLED_STATEMENTS) -> tuple[Any, int | None]:
    """`func` with its explicit unrolling lowered to the largest of UNROLL_STEPS that keeps it within
    `most_statements` once unrolled, and that step; (`func`, None) when it fits as it is."""
    if unrolled_size(func) <= most_statements:
        return func, None
    from tvm import s_tir

    for step in UNROLL_STEPS:
        sch = s_tir.Schedule(func)
        for loop in _loops(sch):
            annotations = sch.get(loop).annotations or {}
            if UNROLL_PRAGMA in annotations and int(annotations[UNROLL_PRAGMA]) > step:
                sch.unannotate(loop, UNROLL_PRAGMA)
                sch.annotate(loop, UNROLL_PRAGMA, step)
        capped = sch.mod["main"]
        if unrolled_size(capped) <= most_statements:
            break
    return capped, step


def cap_unrolling_in(mod, most_statements: int = UNROLLED_STATEMENTS):
    """`mod` (Relax or TIR) with `cap_unrolling` applied to each TIR function, and the names of those
    it lowered with their new step; `mod` itself when none needed it (never changed in place)."""
    import tvm

    capped = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            new, step = cap_unrolling(func, most_statements)
            if step is not None:
                capped[gvar] = (new, step)
    if not capped:
        return mod, {}
    mod = mod.clone()
    for gvar, (func, _) in capped.items():
        mod[gvar] = func
    return mod, {gvar.name_hint: step for gvar, (_, step) in capped.items()}


def _loops(sch) -> list[Any]:
    """Every loop of a scheduled function, once."""
    seen, loops = set(), []
    pending = list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block = pending.pop()
        pending += sch.get_child_blocks(block)
        for loop in sch.get_loops(block):
            node = sch.get(loop)
            if node not in seen:
                seen.add(node)
                loops.append(loop)
    return loops


def child_statements(stmt) -> list[Any]:
    """The statements directly inside a TIR statement: a sequence's, a block's (its init and body),
    a loop's, a branch's, a let's or an attribute's body."""
    import tvm

    if isinstance(stmt, tvm.tirx.SeqStmt):
        return list(stmt.seq)
    children = (getattr(stmt, field, None) for field in ("block", "init", "body", "then_case", "else_case"))
    return [child for child in children if isinstance(child, tvm.tirx.Stmt)]


# x86-64 code is built with LLVM's FastISel selecting instructions (`-fast-isel`; it hands what it
# cannot select, the vector arithmetic among it, to SelectionDAG as usual). SelectionDAG spent most
# of the build of the large basic blocks tuned kernels have: ResNet-18's stride-2 3x3 convolution
# took 0.49 s to build, 0.16 s so. Tuned ResNet-18 built in 1.77 s instead of 2.16 and tuned
# MobileNetV2 in 1.18 instead of 1.19-1.28 (2 threads); the untuned models about as before. Outputs
# were bit-identical and run times the same (paired rounds, medians of 0.99-1.00 of the default
# build's, both models tuned and untuned). Other ISAs keep LLVM's default: not measured on a device.
FAST_ISEL_ARCHES = ("x86_64",)


def codegen_target(target_json: dict[str, Any]) -> dict[str, Any]:
    """`target_json` with the LLVM options splitc's builds add for it (FAST_ISEL_ARCHES)."""
    arch = str(target_json.get("mtriple", "")).split("-")[0]
    options = list(target_json.get("cl-opt", []))
    if target_json.get("kind") != "llvm" or arch not in FAST_ISEL_ARCHES or "-fast-isel" in options:
        return target_json
    return {**target_json, "cl-opt": [*options, "-fast-isel"]}


GROUPS_PER_WORKER = 2          # groups dealt per build thread: an early finisher takes the next (module docstring)


def deal(functions: dict[Any, Any], workers: int) -> list[dict[Any, Any]]:
    """`functions` (name -> PrimFunc) dealt into at most `workers` groups of about equal estimated
    cost: largest first, each to the group with the least so far. The groups come costliest first."""
    costs: list[int] = [0] * max(1, workers)
    groups: list[dict[Any, Any]] = [{} for _ in costs]
    # Ties broken by name: the same functions are dealt into the same groups in every process, so
    # their objects can be found again by their content.
    ranked = sorted(((unrolled_size(f), n, f) for n, f in functions.items()), key=lambda x: (-x[0], str(getattr(x[1], "name_hint", x[1]))))
    for size, name, func in ranked:
        index = costs.index(min(costs))
        groups[index][name] = func
        costs[index] += size
    return [group for _, group in sorted(zip(costs, groups), key=lambda pair: -pair[0]) if group]


def build_library(mod, target_json: dict[str, Any], path: Path, *, workers: int,
                  fcompile: Callable[..., Any] | None = None, objects: KernelObjects | None = None) -> tuple[int, int]:
    """Build `mod` (Relax, for an LLVM target) and export it as the shared library `path`, linked by
    `fcompile` (default: this host's C compiler), with `workers` threads. With `objects`, each group
    of TIR functions whose object is kept there is linked from it, and each one built is kept.
    Returns (groups of TIR functions, groups whose object came from `objects`)."""
    import tvm
    from tvm import relax
    from tvm.relax import vm_build
    from tvm.runtime import _ffi_api as runtime_api
    from tvm.support import cc

    target = tvm.target.Target(target_json)
    with target:
        mod = relax.get_pipeline("default")(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    external, params = list(attrs.get("external_mods", [])), dict(attrs.get("const_name_to_constant", {}))
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    if tir_mod is None:  # nothing to build in threads
        executable = vm_build._vmlink(builder, target, None, ext_libs=external, params=params)
        executable.export_library(str(path), fcompile=fcompile)
        return 0, 0
    tir_mod = vm_build._auto_attach_system_lib_prefix(tir_mod, target, None)
    groups = [tvm.IRModule(group, attrs=tir_mod.attrs)
              for group in deal(dict(tir_mod.functions.items()), GROUPS_PER_WORKER * workers)]
    # A worker thread starts with TVM's default pass context: hand it the caller's.
    context = tvm.transform.PassContext.current()
    keys = [objects.key(group, context) for group in groups] if objects is not None else [None] * len(groups)

    def build_and_emit(group, key, file):
        with context:
            tvm.tirx.build(group, target=target).write_to_file(file)
        if key is not None:
            objects.store(key, Path(file))

    with tempfile.TemporaryDirectory(prefix="splitc-build-") as workspace, ThreadPoolExecutor(min(workers, len(groups))) as pool:
        files = [os.path.join(workspace, f"lib{index}.o") for index in range(len(groups))]
        kept = [key is not None and objects.fetch(key, Path(file)) for key, file in zip(keys, files)]
        built = [pool.submit(build_and_emit, group, key, file)
                 for group, key, file, hit in zip(groups, keys, files, kept) if not hit]
        # The executable imports one library module, which loading the shared object replaces by
        # the shared object itself (every function linked into it): an empty one stands in for the
        # groups, built or kept alike.
        with context:
            stand_in = tvm.tirx.build(tvm.IRModule({}, attrs=tir_mod.attrs), target=target)
        if stand_in.get_function("__tvm_is_system_module")():
            raise ValueError("build_library makes shared libraries; this target asks for a system library")
        executable = vm_build.VMExecutable(relax._ffi_api.VMLink(builder, target, stand_in, external, params))
        packed = os.path.join(workspace, "devc.o")
        runtime_api.ModulePackImportsToLLVM(executable.mod, False, stand_in.get_function("_get_target_string")(), "") \
            .write_to_file(packed)
        for done in built:
            done.result()
        (fcompile or cc.create_shared)(str(path), [*files, packed])
    return len(groups), sum(kept)
