"""Applying a tuning database: each task of a prepared module replaced by its best record's
schedule, and, with weight pre-packing, the weight layout rewrites folded into the constants."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any


def apply_database(prepared, target_json: dict[str, Any], prepack: bool, database):
    """Replace every TIR function that has a record in `database` (from `best_variant`) with its best
    schedule; with pre-packing, the weight layout rewrites are split out and folded into the
    (constant) weights."""
    import tvm
    from tvm import relax

    transform = relax.transform
    with tvm.target.Target(target_json), database:
        passes = [transform.MetaScheduleApplyDatabase()]
        if prepack:
            passes += [transform.SplitLayoutRewritePreproc(), transform.LiftTransformParams(), fold_weight_prepack(),
                       transform.CanonicalizeBindings(), transform.FoldConstant(), transform.DeadCodeElimination()]
        return tvm.transform.Sequential(passes)(prepared)


def fold_weight_prepack():
    """Run every `*_weight_prepack` layout rewrite of constant weights once, here, and bind the
    results as constants: what FoldConstant does, without building a library per function (~1.5 s
    of a ResNet-18 compile): tile copies as numpy reshapes, any other rewrite built for this host.
    Pure data movement, so running them here gives the device's layout too (cross targets).
    ResNet-18: 0.43 s with every rewrite compiled, 0.09 s with numpy (all 16 are tile copies)."""
    import numpy as np
    import tvm
    from tvm import relax
    from splitc.backends.tvm.relax_rewrites import constant_array, rewrite_calls, tensor_of
    from splitc.backends.tvm.build import deal
    from splitc.backends.tvm.weight_layout import layout_copy
    from splitc.runtime.executors import available_cpus

    def foldable(mod, call) -> bool:
        if not isinstance(call, relax.Call) or len(call.args) < 2:
            return False
        callee, args = call.args[0], call.args[1]
        return (isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint.endswith("_weight_prepack")
                and isinstance(mod[callee], tvm.tirx.PrimFunc) and isinstance(args, tvm.ir.expr.Tuple)
                and all(isinstance(a, tvm.ir.expr.Constant) for a in args.fields))

    def key(call):  # constants compare by identity: the same weights through the same rewrite
        return call.args[0].name_hint, tuple(call.args[1].fields)

    @tvm.transform.module_pass(opt_level=0, name="splitc.FoldWeightPrepack")
    def fold(mod, _ctx):
        calls: dict[Any, Any] = {}
        functions = [(gvar, func) for gvar, func in mod.functions.items() if isinstance(func, relax.Function)]
        for _, func in functions:
            for block in getattr(func.body, "blocks", []):
                for binding in block.bindings:
                    if foldable(mod, binding.value):
                        calls[key(binding.value)] = binding.value
        if not calls:
            return mod
        found = {call.args[0].name_hint: mod[call.args[0]] for call in calls.values()}
        copies = {name: copy for name, func in found.items() if (copy := layout_copy(func)) is not None}

        def outputs(call):
            out = call.ty
            return list(out.fields) if isinstance(out, relax.TupleType) else [out]

        def run(library, call):
            # Zeroed, not empty: a layout with padded tiles (1000 classes packed as 16 x 64) leaves
            # the padding unwritten, and garbage there would make every compile's constants, the
            # bundle's bytes and the build cache's key differ.
            results = [tvm.runtime.tensor(np.zeros([int(d) for d in t.shape], str(t.dtype))) for t in outputs(call)]
            library[call.args[0].name_hint](*[a.value for a in call.args[1].fields], *results)
            return results

        def build_and_run(group):
            library = tvm.tirx.build(tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in group.items()}),
                                     # -O0: code that runs once over the weights is not worth LLVM's optimisation time
                                     target=tvm.target.Target({"kind": "llvm", "opt-level": 0}))
            return {k: run(library, call) for k, call in calls.items() if call.args[0].name_hint in group}

        # Rewrites that are plain tile copies run as numpy reshapes (backends/tvm/weight_layout.py);
        # the others are compiled, one library per thread (TVM releases the GIL): most of their
        # cost is LLVM compiling the library at its first call.
        computed: dict[Any, Any] = {k: [tensor_of(a) for a in copies[call.args[0].name_hint]([constant_array(c) for c in k[1]])]
                                    for k, call in calls.items() if call.args[0].name_hint in copies}
        compiled = {name: func for name, func in found.items() if name not in copies}
        if compiled:
            with ThreadPoolExecutor(available_cpus()) as pool:
                for part in pool.map(build_and_run, deal(compiled, available_cpus())):
                    computed.update(part)

        def evaluate(call, _value_of):
            results = computed.get(key(call)) if foldable(mod, call) else None
            if results is None:  # not a weight rewrite, or one the scan above did not reach: FoldConstant's
                return call
            consts = [relax.const(r) for r in results]
            return relax.Tuple(consts) if isinstance(call.ty, relax.TupleType) else consts[0]

        mod = mod.clone()  # assigning into the module handed in would change the caller's
        for gvar, func in functions:
            mod[gvar] = rewrite_calls(func, {"relax.call_tir": evaluate})
        return mod

    return fold
