"""Winograd convolution for CPU targets: 3x3, stride-1 convolutions as F(m x m, 3 x 3).

A direct 3x3 convolution spends 9 multiply-adds per output and input-channel pair. Winograd's
minimal filtering computes an m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2
multiplies per channel pair instead of 9 m^2 (F(4x4, 3x3): 36 instead of 144), moving the rest into
input and output transforms whose cost grows with the channel count, not with its square. Direct
3x3 convolutions are where hand-written libraries (ONNX Runtime's MLAS, oneDNN) lead a 15-minute
MetaSchedule search; a batched matrix product is what MetaSchedule tunes well.

`rewrite_winograd` works on the NHWC graph `tuning.prepare` builds. Each eligible `relax.nn.conv2d`
(constant 3x3 HWIO float32 weight, stride 1, dilation 1, one group, enough tiles) becomes

    V = input_transform(x)      (alpha^2, tiles, CI)  call_tir, scheduled here (below)
    M = matmul(V, U)            (alpha^2, tiles, CO)  relax matmul: a task MetaSchedule tunes, with pre-packing
    y = output_transform(M)     NHWC                  call_tir, out-elementwise-fusable: bias, residual
                                                      add and ReLU fuse into it; MetaSchedule tunes it

with U = G W G^T (alpha^2, CI, CO) computed once here in float64. The input transform is scheduled
by hand (per tile and vector of channels, the alpha x alpha intermediate in registers, every
coefficient a constant once its loops are unrolled) and marked scheduled, so tuning spends no trials
on it: MetaSchedule's design space for an injective function this shape is a handful of points, the
best of which (everything inlined: alpha^2 terms per output instead of 2 alpha) ran 3x slower.

Where it applies: F(4x4, 3x3) when that gives at least MIN_TILES tiles, else F(2x2, 3x3) when that
does, else the convolution stays direct. Few tiles make the products skinny matrices and the
transformed weight, (alpha/3)^2 times the original (4x for F(4x4)), is then read for little work:
ResNet-18's 7x7 stage stays direct, its 14x14 stage takes F(2x2), the larger ones F(4x4).

Precision: the transforms hold fractions (1/4, 1/6, 1/24 ...), so results differ from a direct
convolution by a few float32 ulps of the output's scale per layer (max 5e-6 on outputs of scale 2
in the tests), inside `splitc verify`'s float32 tolerance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from splitc.backends.tvm.cpu_schedule import float32_lanes, widest_dividing

TILES = (4, 2)          # output tile sizes tried, largest first: F(4x4, 3x3), F(2x2, 3x3)
MIN_TILES = 49          # a batched product of fewer rows than this does not pay for the transforms
MIN_CHANNELS = 8        # nor does one with fewer input or output channels
_OUT_EWISE_FUSABLE = 4  # relax OpPatternKind: elementwise consumers fuse into the function
_OPAQUE = 8             # relax OpPatternKind: nothing fuses with the function


@functools.cache
def transform_matrices(tile: int, kernel: int = 3):
    """Cook-Toom matrices (A, B, G) in float64, from TVM's own interpolation points; read-only.
    Cached: TVM derives them through numpy polynomials (4-8 ms a call), and ResNet-18's rewrite
    asks 16 times for two tile sizes."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    matrices = _cook_toom_convolution(_interpolation_points(tile + kernel - 2), tile, kernel)
    for matrix in matrices:
        matrix.setflags(write=False)
    return matrices


def transform_weight(weight_hwio, tile: int):
    """HWIO 3x3 weight -> U (alpha^2, CI, CO), U[e*alpha + n] = G W G^T [e, n], in float64 then cast."""
    import numpy as np

    _, _, g = transform_matrices(tile)
    alpha = tile + 2
    packed = np.einsum("ek,klio,nl->enio", g, weight_hwio.astype(np.float64), g)
    return np.ascontiguousarray(packed.reshape(alpha * alpha, *packed.shape[2:]).astype(weight_hwio.dtype))


def choose_tile(call) -> int | None:
    """The output tile size this conv2d gets (None: it stays a direct convolution)."""
    import tvm

    a = call.attrs
    data, weight = call.args
    if not isinstance(weight, tvm.ir.expr.Constant):
        return None
    kh, kw, ci, co = (int(d) for d in weight.value.shape)
    if not (str(a.data_layout) == "NHWC" and str(a.kernel_layout) == "HWIO" and str(a.out_layout) == "NHWC"
            and int(a.groups) == 1 and [int(s) for s in a.strides] == [1, 1] and [int(d) for d in a.dilation] == [1, 1]
            and (kh, kw) == (3, 3) and min(ci, co) >= MIN_CHANNELS and str(weight.value.dtype) == "float32"
            and str(data.ty.dtype) == "float32" and str(a.out_dtype) in ("", "float32")):
        return None
    try:
        n, h, w, _ = (int(d) for d in data.ty.shape)
    except (TypeError, ValueError):  # a symbolic shape
        return None
    padding = tuple(int(p) for p in a.padding)
    for tile in TILES:
        if Geometry(n, h, w, padding, tile).tiles >= MIN_TILES:
            return tile
    return None


def _i64(*dims):
    """int64 extents, as Relax's own legalized functions have: FuseTIR needs a buffer's shape to
    be the same type in the producer's and the consumer's function."""
    from tvm import tirx

    return [tirx.IntImm("int64", int(d)) for d in dims]


def _coefficient(matrix, row: int, column, dtype: str):
    """matrix[row, column] with `row` a Python int and `column` a loop variable: a Select over the
    column's few values, which folds to a constant wherever the loop is unrolled."""
    from tvm import tirx

    value = tirx.const(0.0, dtype)
    for c in range(matrix.shape[1]):
        if matrix[row][c] != 0:
            value = tirx.Select(column == c, tirx.const(float(matrix[row][c]), dtype), value)
    return value


def _weighted_sum(matrix, column, dtype: str, term):
    """sum over r of matrix[r, column] * term(r), written out term by term; rows that are zero in
    every column are left out."""
    total = None
    for r in range(matrix.shape[0]):
        if not any(matrix[r]):
            continue
        part = _coefficient(matrix, r, column, dtype) * term(r)
        total = part if total is None else total + part
    return total


@dataclass(frozen=True)
class Geometry:
    """Where an F(m x m, 3 x 3) convolution's tiles lie in its (padded) NHWC input."""

    batch: int
    height: int
    width: int
    padding: tuple[int, int, int, int]    # top, left, bottom, right
    tile: int

    @property
    def alpha(self) -> int:
        return self.tile + 2

    @property
    def out_height(self) -> int:
        return self.height + self.padding[0] + self.padding[2] - 2

    @property
    def out_width(self) -> int:
        return self.width + self.padding[1] + self.padding[3] - 2

    @property
    def tiles_h(self) -> int:
        return -(-self.out_height // self.tile)

    @property
    def tiles_w(self) -> int:
        return -(-self.out_width // self.tile)

    @property
    def tiles(self) -> int:
        return self.batch * self.tiles_h * self.tiles_w


def input_transform(data, geometry: Geometry):
    """NHWC input -> V (alpha*alpha, tiles, C): V[e*alpha + n, p, c] = (B^T d_p B)[e, n] for the
    alpha x alpha input tile d_p of tile p, computed separably (2 x alpha terms, not alpha^2)."""
    from tvm import te, topi

    g, m, alpha = geometry, geometry.tile, geometry.alpha
    dtype = str(data.dtype)
    channels = int(data.shape[3])
    _, b_mat, _ = transform_matrices(m)
    top, left, bottom, right = g.padding
    extra_h = (g.tiles_h - 1) * m + alpha - (g.height + top + bottom)
    extra_w = (g.tiles_w - 1) * m + alpha - (g.width + left + right)
    padded = topi.nn.pad(data, (0, top, left, 0), (0, bottom + extra_h, right + extra_w, 0), name="data_pad")
    per_image = g.tiles_h * g.tiles_w

    def tile_at(a, b, p, c):
        return padded[p // per_image, (p % per_image) // g.tiles_w * m + a, p % g.tiles_w * m + b, c]

    rows = te.compute(_i64(alpha, alpha, g.tiles, channels),   # d_p B
                      lambda a, n, p, c: _weighted_sum(b_mat, n, dtype, lambda b: tile_at(a, b, p, c)), name="winograd_rows")
    return te.compute(_i64(alpha * alpha, g.tiles, channels),  # B^T (d_p B)
                      lambda k, p, c: _weighted_sum(b_mat, k // alpha, dtype, lambda a: rows[a, k % alpha, p, c]),
                      name="winograd_input")


def output_transform(products, geometry: Geometry):
    """M (alpha*alpha, tiles, CO) -> NHWC output: Y_p = A^T M_p A, cropped to the output size.
    M_p A is kept a block of its own (not inlined, where MetaSchedule decides where it is computed):
    inlined, every output sums alpha^2 products whose coefficients depend on y % m and x % m, which
    no loop makes constant; kept, alpha. On a 56x56x64 layer that took the tuned transform (with its
    fused bias and ReLU) from 0.34 to 0.24 ms."""
    from tvm import te

    g, m, alpha = geometry, geometry.tile, geometry.alpha
    dtype = str(products.dtype)
    channels = int(products.shape[2])
    a_mat, _, _ = transform_matrices(m)
    cols = te.compute(_i64(alpha, m, g.tiles, channels),      # M_p A
                      lambda a, j, p, o: _weighted_sum(a_mat, j, dtype, lambda b: products[a * alpha + b, p, o]),
                      name="winograd_cols", attrs={"meta_schedule.inline_rule": "disable"})
    per_image = g.tiles_h * g.tiles_w

    def tile_of(n, y, x):
        return n * per_image + y // m * g.tiles_w + x // m

    return te.compute(_i64(g.batch, g.out_height, g.out_width, channels),  # A^T (M_p A)
                      lambda n, y, x, o: _weighted_sum(a_mat, y % m, dtype, lambda a: cols[a, x % m, tile_of(n, y, x), o]),
                      name="winograd_output")


def schedule_input_transform(func, lanes: int):
    """Per (tile, vector of `lanes` channels), in parallel: the alpha x alpha rows d_p B into a
    small buffer, then B^T (d_p B), both with their alpha-sized loops unrolled (so the coefficients
    fold to constants) and the channel loop vectorized."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("data_pad"))
    out, rows = sch.get_sblock("winograd_input"), sch.get_sblock("winograd_rows")
    k, p, c = sch.get_loops(out)
    c_outer, c_inner = sch.split(c, [None, lanes])
    sch.reorder(p, c_outer, k, c_inner)
    outer = sch.fuse(p, c_outer)
    sch.parallel(outer)
    sch.compute_at(rows, outer)
    sch.unroll(k)
    sch.vectorize(c_inner)
    a, n, c_rows = sch.get_loops(rows)[-3:]
    sch.unroll(a)
    sch.unroll(n)
    sch.vectorize(c_rows)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _prim_func(compute, input_shape, dtype: str, pattern: int):
    """A private TIR function of one input (no global symbol, like the ones LegalizeOps makes:
    FuseTIR drops it once fused, dead-code elimination once unused)."""
    from tvm import te

    source = te.placeholder(_i64(*input_shape), dtype, name="x")
    return te.create_prim_func([source, compute(source)]).without_attr("global_symbol").with_attr("op_pattern", pattern)


def rewrite_winograd(vector_bits: int | None):
    """Module pass: every eligible NHWC 3x3 convolution of the Relax functions -> Winograd (module
    docstring). `vector_bits`: the target's natural vector width (the input transform's lanes)."""
    import tvm
    from tvm import relax
    from splitc.backends.tvm.relax_rewrites import constant_array, rewrite_calls

    @tvm.transform.module_pass(opt_level=0, name="splitc.WinogradConv2d")
    def rewrite_module(mod, _ctx):
        builder = relax.BlockBuilder(mod)
        functions: dict[Any, Any] = {}  # one TIR function per transform and shape

        def function(key, name: str, make):
            if key not in functions:
                functions[key] = builder.add_func(make(), name)
            return functions[key]

        def rewrite(call, _value_of):
            tile = choose_tile(call)
            if tile is None:
                return call
            data, weight = call.args
            n, h, w, ci = (int(d) for d in data.ty.shape)
            co = int(weight.value.shape[3])
            g = Geometry(n, h, w, tuple(int(p) for p in call.attrs.padding), tile)
            transform_in = function(("input", g, ci), "winograd_input", lambda: schedule_input_transform(
                _prim_func(lambda x: input_transform(x, g), (n, h, w, ci), "float32", _OPAQUE),
                widest_dividing(float32_lanes(vector_bits), ci)))
            transform_out = function(("output", g, co), "winograd_output", lambda: _prim_func(
                lambda m: output_transform(m, g), (g.alpha**2, g.tiles, co), "float32", _OUT_EWISE_FUSABLE))
            transformed = relax.call_tir(transform_in, (data,), relax.TensorType((g.alpha**2, g.tiles, ci), "float32"))
            products = relax.op.matmul(transformed, relax.const(transform_weight(constant_array(weight), tile)))
            return relax.call_tir(transform_out, (products,), call.ty)

        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                builder.update_func(gvar, rewrite_calls(func, {"relax.nn.conv2d": rewrite}))
        return builder.get()

    return rewrite_module
