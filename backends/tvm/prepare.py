"""Preparation: the rewrites a partition goes through before its tasks are tuned or looked up.

What is tuned is the partition after splitc's pre-tuning rewrites (backends/tvm/relax_rewrites.py):
batch norm folded into the preceding convolution's weights and bias, zero padding folded into the
convolution, clip written as max/min, and, on CPU targets, 2-D convolutions converted to NHWC
(channels innermost, so the output-channel loop vectorizes for any spatial size), weight
transposes folded in numpy, and 3x3 stride-1 convolutions rewritten as Winograd
(backends/tvm/winograd.py; SPLITC_WINOGRAD=0: not). Then TVM's zero pipeline (legalize, fuse) and,
by default, weight pre-packing (`cpu_weight_prepack`: layout-free weight buffers whose layout each
schedule chooses, rewritten once at compile time by constant folding, since splitc binds weights as
constants: backends/tvm/apply_records.py).

`prepare` is deterministic for a given module, target and variant, so tune and compile extract the
same tasks (TIR functions) and so the same database workloads.
"""

from __future__ import annotations

import os
from typing import Any

from splitc.backends.tvm.target_keys import vector_bits


def winograd_enabled() -> bool:
    """Whether 3x3 convolutions become Winograd on CPU targets (backends/tvm/winograd.py): yes, unless
    SPLITC_WINOGRAD=0 (direct convolutions only: results closer to PyTorch's, and the workloads
    of databases tuned before Winograd existed)."""
    return os.environ.get("SPLITC_WINOGRAD", "1") != "0"


def prepare(mod, target_json: dict[str, Any], prepack: bool, winograd: bool | None = None):
    """The pre-tuning passes: what tasks are extracted from and what the database is applied to.
    Deterministic for a given module, target and variant, so tune and compile see the same
    workloads. `winograd` None: `winograd_enabled()`."""
    import tvm
    from tvm import relax

    from splitc.backends.tvm.relax_rewrites import constant_permute_folding, pre_tuning_rewrites

    transform = relax.transform
    head = [pre_tuning_rewrites(), transform.CanonicalizeBindings(), transform.DecomposeOpsForInference(),
            transform.CanonicalizeBindings()]
    nhwc = [transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}), transform.Normalize(),
            constant_permute_folding(), transform.CanonicalizeBindings()]
    if winograd_enabled() if winograd is None else winograd:
        from splitc.backends.tvm.winograd import rewrite_winograd

        nhwc += [rewrite_winograd(vector_bits(target_json))]
    tail = [relax.get_pipeline("zero")] + ([transform.AttachAttrLayoutFreeBuffers()] if prepack else [])
    cpu = str(target_json.get("kind", "llvm")) == "llvm"
    if cpu:
        from splitc.backends.tvm.depthwise import schedule_depthwise_functions

        tail += [schedule_depthwise_functions(vector_bits(target_json))]
    with tvm.target.Target(target_json):
        mod = tvm.transform.Sequential(head)(mod)
        if cpu:
            try:
                mod = tvm.transform.Sequential(nhwc)(mod)
            except Exception:  # noqa: BLE001, S110 - an operator ConvertLayout cannot handle: tune the NCHW graph (same choice every time)
                pass
        return tvm.transform.Sequential(tail)(mod)


def extract_tasks(prepared, target_json: dict[str, Any]):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    # A function scheduled by splitc itself (backends/tvm/winograd.py) says so on the function, not the module.
    return [t for t in ms.relax_integration.extract_tasks(prepared, tvm.target.Target(target_json))
            if not t.mod.attrs.get("tirx.is_scheduled", False) and not t.mod["main"].attrs.get("tirx.is_scheduled", False)]


def uses_winograd(prepared) -> bool:
    """Whether `prepare` rewrote any convolution of this module as Winograd."""
    return any("winograd" in gvar.name_hint for gvar in prepared.functions)
