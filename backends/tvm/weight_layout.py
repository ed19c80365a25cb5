"""Weight layout rewrites run as numpy reshapes and transposes instead of compiled TIR.

Pre-packing (`AttachAttrLayoutFreeBuffers`, then `SplitLayoutRewritePreproc` once records are
applied) leaves each packed weight as a small TIR function that copies the weight into the tiles
its kernel reads: every index it stores at is one mixed-radix digit of one weight axis (`v // 32`,
`v % 128 // 32`, `v % 32`). Such a copy is a reshape of each axis into its digits and a transpose
into the stored order, with zeros where the top digit runs past the axis (1000 classes as 16 x 64).
Compiling the TIR for it costs LLVM ~15 ms a function at its first call, 0.23 s for ResNet-18's
16 rewrites; numpy needs no compiling. Anything that is not such a copy is left to TIR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitc.backends.tvm.build import child_statements


@dataclass(frozen=True)
class _Digit:
    axis: int       # the source axis this digit is of
    modulus: int    # 0 for the top digit (no `%`)
    place: int      # the divisor: the digit is (v % modulus) // place


def layout_copy(func) -> Callable[[list[Any]], list[Any]] | None:
    """A numpy function equal to `func` (a weight layout rewrite: inputs, then outputs, as in
    `call_tir`), taking the input arrays and returning the output arrays; None when `func` is not
    a set of pure digit copies, one per output (then it has to be compiled). The outputs may be
    views of the inputs (transposes): the caller copies them where they are to live."""
    import numpy as np

    try:
        buffers = list(func.params)  # buffer variables: shape and dtype their own
        copies = [_copy_of(realize) for realize in _block_realizes(func.body)]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not copies or any(c is None for c in copies):
        return None

    def position(buffer) -> int | None:
        return next((i for i, b in enumerate(buffers) if b.same_as(buffer)), None)

    writes = {position(target): (position(source), digits) for source, target, digits in copies}
    inputs = len(buffers) - len(writes)
    # One copy per output, the outputs last (call_tir's order), each reading an input.
    if len(writes) != len(copies) or None in writes or sorted(writes) != list(range(inputs, len(buffers))) or \
            any(source is None or source >= inputs for source, _ in writes.values()):
        return None
    plans = []
    for target in range(inputs, len(buffers)):
        source, digits = writes[target]
        plan = _plan(_shape(buffers[source]), digits, _shape(buffers[target]))
        if plan is None or str(buffers[source].dtype) != str(buffers[target].dtype):
            return None
        plans.append((source, *plan))

    def run(arrays: list[Any]) -> list[Any]:
        results = []
        for source, padding, split, order in plans:
            array = arrays[source]
            if any(after for _, after in padding):
                array = np.pad(array, padding)
            results.append(array.reshape(split).transpose(order))
        return results

    return run


def _shape(buffer) -> list[int]:
    return [int(d) for d in buffer.shape]


def _block_realizes(stmt) -> list[Any]:
    """The blocks under `stmt` with a body of their own (not the root block)."""
    from tvm import s_tir

    if isinstance(stmt, s_tir.SBlockRealize) and stmt.block.iter_vars:
        return [stmt]
    return [realize for child in child_statements(stmt) for realize in _block_realizes(child)]


def _copy_of(realize) -> tuple[Any, Any, list[_Digit]] | None:
    """(source buffer, target buffer, per stored index its digit) of a block that stores one
    load of the source at digits of the source's indices; None for any other block."""
    from tvm import ir, tirx

    block = realize.block
    store = block.body
    if any(int(iv.iter_type) != 0 for iv in block.iter_vars):  # a reduction, not a copy
        return None
    if block.init is not None or not isinstance(store, tirx.BufferStore) or not isinstance(store.value, ir.expr.TensorLoad):
        return None
    if not (isinstance(realize.predicate, tirx.IntImm) and int(realize.predicate) == 1):
        return None
    iters = [iv.var for iv in block.iter_vars]
    if any(int(iv.dom.min) != 0 for iv in block.iter_vars):
        return None
    load = store.value
    # The block reads the source at its own iteration variables, in order: source axis i is iters[i].
    if len(load.indices) != len(iters) or not all(index.same_as(var) for index, var in zip(load.indices, iters)):
        return None
    digits = [_digit(index, iters) for index in store.indices]
    if any(d is None for d in digits):
        return None
    extents = [int(iv.dom.extent) for iv in block.iter_vars]
    if [int(d) for d in load.source.shape] != extents:
        return None
    return load.source, store.buffer, digits


def _digit(index, iters) -> _Digit | None:
    """`index` as (v % modulus) // place of one iteration variable; None for anything else."""
    from tvm import tirx

    modulus, place = 0, 1
    if isinstance(index, tirx.FloorDiv) and isinstance(index.b, tirx.IntImm):
        index, place = index.a, int(index.b)
    if isinstance(index, tirx.FloorMod) and isinstance(index.b, tirx.IntImm):
        index, modulus = index.a, int(index.b)
    for axis, var in enumerate(iters):
        if index.same_as(var):
            return _Digit(axis, modulus, place)
    return None


def _plan(source_shape: list[int], digits: list[_Digit], target_shape: list[int]):
    """(padding per source axis, the shape that splits every axis into its digits, the transpose
    that puts the digits in stored order), or None when the digits do not exactly tile the axes."""
    if len(digits) != len(target_shape):
        return None
    padding, split, where = [], [], {}
    for axis, extent in enumerate(source_shape):
        mine = sorted((d for d in digits if d.axis == axis), key=lambda d: -d.place)
        if not mine:
            if extent != 1:  # every value of the axis would land on the same place
                return None
            padding.append((0, 0))  # an axis of 1 the reshape drops
            continue
        top = mine[0]
        if top.modulus or mine[-1].place != 1:
            return None
        radices = [-(-extent // top.place)]
        for upper, lower in zip(mine, mine[1:]):
            if lower.modulus != upper.place or lower.modulus % lower.place:
                return None
            radices.append(lower.modulus // lower.place)
        padding.append((0, radices[0] * top.place - extent))
        for digit, radix in zip(mine, radices):
            where[digit] = len(split)
            split.append(radix)
    if len(where) != len(digits) or len(set(digits)) != len(digits):
        return None
    order = [where[d] for d in digits]
    return (padding, split, order) if [split[i] for i in order] == target_shape else None
