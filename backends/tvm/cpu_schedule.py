"""Pieces shared by splitc's own CPU schedules (backends/tvm/winograd.py, depthwise.py, pointwise.py)."""

from __future__ import annotations

from collections.abc import Callable


def float32_lanes(vector_bits: int | None) -> int:
    """float32 lanes of the target's natural vector; 128-bit when it is not known."""
    return max(1, (vector_bits or 128) // 32)


def widest_dividing(width: int, extent: int) -> int:
    """`width` halved until it divides `extent`, so a split by it leaves no remainder loop."""
    while width > 1 and extent % width:
        width //= 2
    return width


def fused_conv2d(sch, window: Callable[[int, int, int], bool]):
    """The (convolution, epilogue) blocks of a fused NHWC convolution function, with its padding
    inlined into the convolution and its elementwise blocks inlined into the last one (the epilogue,
    None when there is none). None when the function is not one convolution block over
    (n, y, x, c; ry, rx, rc) whose reduction extents pass `window`, preceded only by padding and
    followed only by elementwise blocks. Raises tvm's schedule errors where inlining does not apply."""
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no root block: not a function splitc schedules
        return None
    convs = [i for i, block in enumerate(blocks) if _is_conv2d(sch.get(block), window)]
    if len(convs) != 1:
        return None
    before, conv, after = blocks[:convs[0]], blocks[convs[0]], blocks[convs[0] + 1:]
    if any(not sch.get(block).name_hint.startswith("pad") for block in before):
        return None
    if any(int(iv.iter_type) != 0 for block in after for iv in sch.get(block).iter_vars):
        return None
    for block in before:
        sch.compute_inline(block)           # the padding becomes a condition on the loads
    for block in after[:-1]:
        sch.compute_inline(block)           # bias, residual, max, min ... into the last elementwise block
    return conv, (after[-1] if after else None)


def epilogue_per_tile(sch, epilogue, tile_loop) -> None:
    """Compute the epilogue for each tile of `tile_loop` while the tile is in registers: its pixel
    loop unrolled, its channel loop vectorized."""
    sch.reverse_compute_at(epilogue, tile_loop)
    pixel, channel = sch.get_loops(epilogue)[-2:]
    sch.unroll(pixel)
    sch.vectorize(channel)


def _is_conv2d(stmt, window: Callable[[int, int, int], bool]) -> bool:
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if kinds != [0, 0, 0, 0, 2, 2, 2] or "conv2d" not in stmt.name_hint:  # 0: data parallel, 2: reduction
        return False
    return window(*(int(iv.dom.extent) for iv in stmt.iter_vars[4:]))
