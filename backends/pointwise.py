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

from splitc.backends.cpu_schedule import epilogue_per_tile, float32_lanes, fused_conv2d, widest_dividing

MAX_VECTORS = 2       # output-channel vectors per tile
INPUT_UNROLL = 4      # input channels per unrolled step of the reduction


def schedule_pointwise(func, vector_bits: int | None):
    """A `tvm.s_tir.Schedule` of `func` (its trace is the record), or None when `func` is not a 1x1
    NHWC convolution followed only by elementwise blocks, or a step does not apply."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        found = fused_conv2d(sch, lambda ry, rx, rc: ry == rx == 1)    # a 1x1 window; its "padding" is a copy
        if found is None:
            return None
        conv, epilogue = found
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
        if epilogue is not None:
            epilogue_per_tile(sch, epilogue, c_outer)
        for loop in (rc_inner, x_inner, c_vectors):
            sch.unroll(loop)
        sch.vectorize(c_inner)
        sch.decompose_reduction(conv, ry)
    except Exception:  # noqa: BLE001 - tvm raises ScheduleError subclasses; the search has the task anyway
        return None
    return sch
