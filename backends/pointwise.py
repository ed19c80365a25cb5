"""A register-tiled schedule for pointwise (1x1) convolutions on CPU targets, offered to the search.

In NHWC a 1x1 convolution is a matrix product: pixels by input channels times input by output
channels. Per output row, in parallel: tiles of a few pixels by one or two vectors of output
channels held in registers, the input-channel loop outside them (unrolled by 4), each pixel's input
value broadcast against a vector of weights; the fused epilogue (bias, residual add, ReLU6)
applied per tile. MobileNetV2's projections to few channels are where the search does worst: timed
against the 15-minute database's records (cold weights, as tuning times them), 112x112 32->16 ran
in 153 us against 384, 56x56 96->24 in 199 against 368, 56x56 144->24 with the residual in 339
against 449; with many output channels (96->576, 960->320) this schedule loses to the search.

So it is not imposed like backends/depthwise.py: `_measure_baselines` in backends/tuning.py times it
beside each task's untuned code and stores it as a record; the search and the final re-timing then
keep whichever is fastest.
"""

from __future__ import annotations

from splitc.backends.lanes import float32_lanes, widest_dividing

MAX_VECTORS = 2       # output-channel vectors per tile
INPUT_UNROLL = 4      # input channels per unrolled step of the reduction


def schedule_pointwise(func, vector_bits: int | None):
    """A `tvm.s_tir.Schedule` of `func` (its trace is the record), or None when `func` is not a 1x1
    NHWC convolution followed only by elementwise blocks, or a step does not apply."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no root block: not a function this knows
        return None
    convs = [i for i, b in enumerate(blocks) if _is_pointwise(sch, b)]
    if len(convs) != 1:
        return None
    position = convs[0]
    before, conv, after = blocks[:position], blocks[position], blocks[position + 1:]
    if any(not sch.get(b).name_hint.startswith("pad") for b in before):
        return None
    if any(int(iv.iter_type) != 0 for b in after for iv in sch.get(b).iter_vars):
        return None
    try:
        for block in before:
            sch.compute_inline(block)           # a 1x1 convolution's "padding" is a copy
        for block in after[:-1]:
            sch.compute_inline(block)
        n, y, x, c, ry, rx, rc = sch.get_loops(conv)
        lanes = float32_lanes(vector_bits)
        channels = int(sch.get(c).extent)
        if channels % lanes:
            return None
        tile = widest_dividing(lanes * MAX_VECTORS, channels)
        pixels = 8 if tile == lanes else 4      # about 8 accumulators, and room for the weights
        x_outer, x_inner = sch.split(x, [None, pixels])
        c_outer, c_vectors, c_inner = sch.split(c, [None, tile // lanes, lanes])
        rc_outer, rc_inner = sch.split(rc, [None, INPUT_UNROLL])
        sch.reorder(n, y, x_outer, c_outer, ry, rx, rc_outer, rc_inner, x_inner, c_vectors, c_inner)
        sch.parallel(sch.fuse(n, y))
        if after:
            sch.reverse_compute_at(after[-1], c_outer)
            pixel, channel = sch.get_loops(after[-1])[-2:]
            sch.unroll(pixel)
            sch.vectorize(channel)
        for loop in (rc_inner, x_inner, c_vectors):
            sch.unroll(loop)
        sch.vectorize(c_inner)
        sch.decompose_reduction(conv, ry)
    except Exception:  # noqa: BLE001 - tvm raises ScheduleError subclasses; the search has the task anyway
        return None
    return sch


def _is_pointwise(sch, block) -> bool:
    """A reduction block over (n, y, x, c; ry, rx, rc) with a 1x1 window."""
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if kinds != [0, 0, 0, 0, 2, 2, 2] or "conv2d" not in stmt.name_hint:
        return False
    return int(stmt.iter_vars[4].dom.extent) == 1 and int(stmt.iter_vars[5].dom.extent) == 1
