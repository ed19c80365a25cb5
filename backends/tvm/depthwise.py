"""Depthwise convolutions for CPU targets, scheduled by splitc instead of searched.

A depthwise 3x3 convolution does 9 multiply-adds per output and reads each input once per output
row it touches: it is bound by memory, and its good schedules are few and known. Per output row,
in parallel: tiles of a few output pixels by two vectors of channels, the 3x3 window unrolled,
the zero padding inlined into the loads, and the fused epilogue (bias, ReLU6, ...) applied to each
tile while it is in registers. Timed interleaved with the tuned records of a 30-minute MobileNetV2
database on a 2-core AVX2 host (cold weights and outputs, as tuning times them), this schedule ran
56x56x144 in 398 us against 645, 7x7x960 in 62 against 104, 112x112x32 in 201 against 232, the
stride-2 112->56 layer in 330 against 374, 28x28x192 within noise; and each depthwise function it
takes is a task the search no longer spends trials on (10 of MobileNetV2's 34).

`schedule_depthwise_functions` runs after fusion in `tuning.prepare`: a fused TIR function whose
only reduction is a depthwise NHWC convolution, followed only by elementwise blocks, is scheduled
and marked scheduled (no tuning task; MetaSchedule's database leaves it alone). Any other
function, or one where a schedule step does not apply, is left to MetaSchedule unchanged.
"""

from __future__ import annotations

from splitc.backends.tvm.cpu_schedule import epilogue_per_tile, float32_lanes, fused_conv2d, widest_dividing

PIXELS_PER_TILE = 2      # output pixels along the row per tile (4 won on two layers, 2 on one, the rest even)
VECTORS_PER_TILE = 2     # channel vectors per tile: 2 x 2 accumulators, plus the 9 weights, fit 16 registers


def schedule_depthwise(func, vector_bits: int | None):
    """`func` scheduled as the module docstring says, or None when it is not a fused depthwise
    convolution (or a step does not apply to it)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        found = fused_conv2d(sch, lambda ry, rx, rc: rc == 1)    # one input channel per output: depthwise
        if found is None:
            return None
        conv, epilogue = found
        n, y, x, c, ry, rx, rc = sch.get_loops(conv)
        x_outer, x_inner = sch.split(x, [None, PIXELS_PER_TILE])
        channels_per_tile = widest_dividing(float32_lanes(vector_bits) * VECTORS_PER_TILE, int(sch.get(c).extent))
        c_outer, c_inner = sch.split(c, [None, channels_per_tile])
        sch.reorder(n, y, x_outer, c_outer, ry, rx, rc, x_inner, c_inner)
        sch.parallel(sch.fuse(n, y))
        if epilogue is not None:
            epilogue_per_tile(sch, epilogue, c_outer)
        for loop in (ry, rx, rc, x_inner):
            sch.unroll(loop)
        sch.vectorize(c_inner)
        sch.decompose_reduction(conv, ry)       # after vectorize: the update block is no longer a reduction
    except Exception:  # noqa: BLE001 - tvm raises ScheduleError subclasses; the search handles this function instead
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_depthwise_functions(vector_bits: int | None):
    """Module pass: every fused depthwise function of the module scheduled (module docstring)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="splitc.ScheduleDepthwise")
    def apply(mod, _context):
        mod = mod.clone()  # assigning into the module handed in would change the caller's
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
                continue
            scheduled = schedule_depthwise(func, vector_bits)
            if scheduled is not None:
                mod[gvar] = scheduled
        return mod

    return apply
