"""Register-tiled schedules for pointwise (1x1) convolutions on CPU targets, offered to the search.

In NHWC a 1x1 convolution is a matrix product: pixels by input channels times input by output
channels. Tiles of a few pixels by a few vectors of output channels held in registers, the
input-channel loop outside them (unrolled by 4), each pixel's input value broadcast against a
vector of weights; the fused epilogue (bias, residual add, ReLU6) applied per tile. Two loop
orders: pixel tiles outer (in parallel; each tile reads all the weights) or channel tiles outer
(in parallel; each channel tile's weights read once, the activations once per channel tile).

MobileNetV2's projections to few channels are where the search does worst: timed against a
15-minute database's records (AMD EPYC, AVX2, cold weights as tuning times them), 112x112 32->16
ran in 153 us against 384, 56x56 96->24 in 199 against 368. Its expansions to many channels were
where these schedules lost, 1.3-2x (Xeon, AVX-512: 7x7 320->1280, 960->320, 14x14 576->96): read
as HWIO, each input channel's row of weights sits C values from the next, and the search's records
pack theirs. So with pre-packing the weights are laid out in the order the tiles read them
(MetaSchedule's own layout rewrite, run once over the constant weights at compile time); then
those layers run within 0-7 % of the search's records, the 28x28 projections and 14x14 576->96
beat them, and 14x14 96->576 and 28x28 32->192 still lose by ~15 %.

Which tile is best depends on the shape and the CPU (how many vector registers; 24 channels are
three 8-lane vectors: a tile of one re-reads the inputs three times, a tile of three holds fewer
pixels), so `pointwise_schedules` gives a few tile shapes (`TILES`) and none is imposed like
backends/tvm/depthwise.py: `_measure_baselines` in backends/tvm/search.py times them beside each task's
untuned code and stores them as records; the search and the final re-timing then keep whichever is
fastest. Those timings flush the weights and output from the caches first, and that is what
predicts the whole model here: forcing splitc's records where the search's had won made the
MobileNetV2 call 12 % slower, forcing the search's where splitc's had won 7 % slower; warm-cache
timings of the same kernels had ranked several of them the other way.

A second family, column strips (`_strip`), wins where the image is large: a tile of up to 8 pixels
down one column by 1-3 vectors, accumulated in the output buffer itself rather than a local copy,
each parallel task a block of 2x2 strips that runs every channel tile over its pixels. Against the
best of the row tiles and of a 15-minute database's records (Xeon, AVX-512, cold weights):
112x112 32->16 96 us against 121, 14x14 64->384 57 against 69, 28x28 32->192 54 against 64, 14x14
96->576 121 against 134; 112x112 16->96 and 56x56 24->144 ran within 5 % of the search's best
(357 and 147 us against 360 and 140, where the row tiles took 641 and 231). On 7x7 layers and most projections the row tiles
or the search stay ahead, so both families are offered. With 16 registers (the same host built for
AVX2) only one vector per strip pays: three spilled and ran 4-5x slower.
"""

from __future__ import annotations

from splitc.backends.tvm.cpu_schedule import epilogue_per_tile, float32_lanes, fused_conv2d, widest_dividing

# Tile shapes offered, by the size of the vector register file: output-channel vectors per tile ->
# most pixels per tile; the accumulators, a vector of weights per output vector and the broadcast
# input must fit. With 16 registers (AVX2; 8-lane vectors, MobileNetV2's 1x1 layers on an AMD EPYC):
# one vector by 8 pixels won most layers (re-reading the few input values per output vector from L1
# costs less than fewer accumulators), three vectors by 4 pixels won the 24-channel ones. With 32
# (AVX-512; Emerald Rapids, timed with cold weights as tuning times them): 7 pixels by 2-3 vectors
# won the 14x14 and 7x7 layers by 10-40 % over the search's records (576->96: 167 vs 288 us), and
# 8 by 3 8-lane vectors the 24-channel ones.
TILES = {16: {1: 8, 2: 4, 3: 4}, 32: {1: 8, 2: 8, 3: 8}}
INPUT_UNROLL = 4           # input channels per unrolled step of the reduction
# Column strips: output-channel vectors per strip by the size of the vector register file, and the
# most pixels per strip (8 ran 0-3 % faster than 7 where both divide the height).
STRIP_VECTORS = {16: (1,), 32: (1, 2, 3)}
STRIP_ROWS = 8


def vector_registers(vector_bits: int | None) -> int:
    """Vector registers to plan tiles for: 32 with AVX-512; 16 otherwise (AVX2 and SSE have 16;
    AArch64's 32 NEON registers are planned as 16, which only makes the tiles smaller)."""
    return 32 if vector_bits == 512 else 16


def tile_shapes(height: int, width: int, vectors: int, registers: int = 16) -> list[tuple[int, int]]:
    """(pixels, vectors) per tile for a convolution with a `height` x `width` output and `vectors`
    output-channel vectors: for each vector count in TILES[registers] that divides `vectors`, the
    most pixels up to its limit that are a divisor of a row or a whole number of rows (no remainder
    loop; a tile across a row's end gets a wrong epilogue from TVM 0.27's `reverse_compute_at`),
    when that leaves 8 accumulators or more (tiles of 4 and 6 never won where another was offered)."""
    fits = {d for d in range(1, width + 1) if width % d == 0} | {k * width for k in range(1, height + 1) if height % k == 0}
    shapes = []
    for per_tile, most in TILES[registers].items():
        pixels = max(d for d in fits if d <= most)
        if vectors % per_tile == 0 and (per_tile == 1 or pixels * per_tile >= 8):
            shapes.append((pixels, per_tile))
    return shapes


def strip_shapes(height: int, vectors: int, registers: int = 16) -> list[tuple[int, int]]:
    """(rows, vectors) per column strip for a convolution with a `height`-row output and `vectors`
    output-channel vectors: the most rows, 4 to STRIP_ROWS, that divide the height with at least two
    strips in it (a 7-row image gets none: the row tiles won every such layer), by each vector
    count in STRIP_VECTORS[registers] that divides `vectors`."""
    rows = [d for d in range(4, STRIP_ROWS + 1) if height % d == 0 and 2 * d <= height]
    if not rows:
        return []
    return [(rows[-1], per_strip) for per_strip in STRIP_VECTORS[registers] if vectors % per_strip == 0]


def _one_by_one(ry: int, rx: int, _rc: int) -> bool:
    """A 1x1 window (its "padding" block is a copy)."""
    return ry == rx == 1


def pointwise_schedules(func, vector_bits: int | None) -> list:
    """`tvm.s_tir.Schedule`s of `func`, one per row tile and column strip shape (their traces are
    the records); empty when `func` is not a 1x1 NHWC convolution followed only by elementwise
    blocks with output channels a multiple of the vector or of half of it."""
    from tvm import s_tir

    probe = s_tir.Schedule(func)
    try:
        found = fused_conv2d(probe, _one_by_one)
    except Exception:  # noqa: BLE001 - tvm raises ScheduleError subclasses; the search has the task anyway
        return []
    if found is None:
        return []
    n, y, x, c = (int(probe.get(loop).extent) for loop in probe.get_loops(found[0])[:4])
    lanes = float32_lanes(vector_bits)
    if c % lanes and lanes > 1 and c % (lanes // 2) == 0:
        lanes //= 2         # 24 channels with 16-lane vectors: three of 8 lanes
    if c % lanes:
        return []
    registers = vector_registers(vector_bits)
    candidates = [(_tile, (lanes, pixels, vectors, channels_outer))
                  for pixels, vectors in tile_shapes(n * y, x, c // lanes, registers)
                  for channels_outer in (False, True)]
    candidates += [(_strip, (lanes, rows, vectors)) for rows, vectors in strip_shapes(y, c // lanes, registers)]
    schedules = []
    for schedule_with, shape in candidates:
        sch = s_tir.Schedule(func)
        try:
            schedule_with(sch, *shape)
        except Exception:  # noqa: BLE001 - a step that does not apply to this function: offer the other shapes
            continue
        schedules.append(sch)
    return schedules


def _tile(sch, lanes: int, pixels: int, vectors: int, channels_outer: bool) -> None:
    """A row tile of `pixels` consecutive pixels by `vectors` output vectors, accumulated in a
    local buffer; pixel tiles outer or channel tiles outer, in parallel."""
    conv, epilogue = fused_conv2d(sch, _one_by_one)
    n, y, x, c, ry, rx, rc = sch.get_loops(conv)
    p_outer, p_inner = sch.split(sch.fuse(n, y, x), [None, pixels])
    c_outer, c_vectors, c_inner = sch.split(c, [None, vectors, lanes])
    rc_outer, rc_inner = sch.split(rc, [None, widest_dividing(INPUT_UNROLL, int(sch.get(rc).extent))])
    outer, tile_loop = (c_outer, p_outer) if channels_outer else (p_outer, c_outer)
    sch.reorder(outer, tile_loop, ry, rx, rc_outer, rc_inner, p_inner, c_vectors, c_inner)
    sch.parallel(outer)
    if vectors > 1:
        # Accumulate in a tile-sized local buffer that LLVM keeps in registers: accumulating
        # several vectors in the output buffer ran the 3-vector tiles 2-3x slower; with one
        # vector the direct form was 2-20 % faster.
        writeback = sch.cache_write(conv, 0, "local")
        if epilogue is not None:
            sch.compute_inline(writeback)       # the epilogue reads the accumulators directly
        else:
            sch.reverse_compute_at(writeback, tile_loop)
            sch.vectorize(sch.get_loops(writeback)[-1])
    if epilogue is not None:
        epilogue_per_tile(sch, epilogue, tile_loop)
    for loop in (rc_inner, p_inner, c_vectors):
        sch.unroll(loop)
    sch.vectorize(c_inner)
    sch.decompose_reduction(conv, ry)
    _pack_weights_per_tile(sch)


def _strip(sch, lanes: int, rows: int, vectors: int) -> None:
    """A column strip of `rows` pixels by `vectors` output vectors, accumulated in the output buffer
    (a local accumulator, which the row tiles need, ran these 3-15 % slower: 428 against 371 us on
    112x112 16->96); blocks of two strips by two, where the image allows, in parallel; in each
    block, every channel tile over the block's strips, the input-channel loop inside the vectors."""
    conv, epilogue = fused_conv2d(sch, _one_by_one)
    n, y, x, c, ry, rx, rc = sch.get_loops(conv)
    height, width = int(sch.get(y).extent), int(sch.get(x).extent)
    y_block, y_strip, y_row = sch.split(y, [None, 2 if height % (2 * rows) == 0 else 1, rows])
    x_block, x_strip = sch.split(x, [None, 2 if width % 2 == 0 else 1])
    c_outer, c_vectors, c_inner = sch.split(c, [None, vectors, lanes])
    rc_outer, rc_inner = sch.split(rc, [None, widest_dividing(INPUT_UNROLL, int(sch.get(rc).extent))])
    sch.reorder(n, y_block, x_block, y_strip, x_strip, c_outer, ry, rx, rc_outer, y_row, c_vectors, rc_inner, c_inner)
    sch.parallel(sch.fuse(n, y_block, x_block))
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, c_outer)
        sch.vectorize(sch.get_loops(epilogue)[-1])
    sch.vectorize(c_inner)
    sch.decompose_reduction(conv, ry)
    _pack_weights_per_tile(sch)


def _pack_weights_per_tile(sch) -> None:
    """With pre-packing (layout-free weights), the weights laid out in the order the tiles read
    them. As a postprocessing step, the way MetaSchedule's own records do it: the search replays
    a record without its postprocessing and applies its own, so a layout rewrite among the
    schedule's steps would be rewritten twice (and fail)."""
    from tvm.s_tir import meta_schedule as ms

    sch.enter_postproc()
    ms.postproc.RewriteLayout().apply(sch)
