"""Weight layout rewrites run by numpy (backends/tvm/weight_layout.py): the same arrays as the compiled
TIR, padding included; anything else (arithmetic, overlapping digits, a permuted read, several
values to one place, a copy through an intermediate buffer) left to TIR."""
from __future__ import annotations

import numpy as np
import pytest
from splitc.backends.tvm.relax_rewrites import tensor_of
from splitc.backends.tvm.weight_layout import layout_copy
from tvm.script import tirx as T


# The shapes of ResNet-18's classifier and layer-4 rewrites, smaller: 1000 classes as 16 x 64 (the
# last tile padded) and as 50 x 2 x 10; a 3x3 kernel's output channels in three digits.
@T.prim_func(s_tir=True)
def dense_prepack(bias: T.Buffer((1000,), "float32"), weight: T.Buffer((64, 1000), "float32"),
                  bias_packed: T.Buffer((16, 64), "float32"), weight_packed: T.Buffer((50, 2, 2, 32, 10), "float32")):
    for ax0 in range(1000):
        with T.sblock("bias_packed"):
            v0 = T.axis.spatial(1000, ax0)
            bias_packed[v0 // 64, v0 % 64] = bias[v0]
    for ax0, ax1 in T.grid(64, 1000):
        with T.sblock("weight_packed"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            weight_packed[v1 // 20, v0 // 32, v1 % 20 // 10, v0 % 32, v1 % 10] = weight[v0, v1]


@T.prim_func(s_tir=True)
def conv_prepack(weight: T.Buffer((3, 3, 8, 256), "float32"), weight_packed: T.Buffer((2, 4, 8, 3, 3, 32), "float32")):
    for ax0, ax1, ax2, ax3 in T.grid(3, 3, 8, 256):
        with T.sblock("weight_packed"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [ax0, ax1, ax2, ax3])
            weight_packed[v3 // 128, v3 % 128 // 32, v2, v0, v1, v3 % 32] = weight[v0, v1, v2, v3]


@T.prim_func(s_tir=True)
def bias_prepack(bias: T.Buffer((1, 1, 1, 64), "float32"), bias_packed: T.Buffer((64,), "float32")):
    for ax0, ax1, ax2, ax3 in T.grid(1, 1, 1, 64):
        with T.sblock("bias_packed"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [ax0, ax1, ax2, ax3])
            bias_packed[v3] = bias[v0, v1, v2, v3]


@pytest.mark.parametrize("func", [dense_prepack, conv_prepack, bias_prepack], ids=["dense", "conv", "bias"])
def test_numpy_copy_equals_the_compiled_rewrite(func):
    import tvm

    buffers = list(func.params)
    outputs = 2 if func is dense_prepack else 1
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal([int(d) for d in b.shape]).astype("float32") for b in buffers[:-outputs]]
    compiled = [tvm.runtime.tensor(np.zeros([int(d) for d in b.shape], "float32")) for b in buffers[-outputs:]]
    tvm.tirx.build(func.with_attr("global_symbol", "main"), target="llvm")["main"](
        *[tvm.runtime.tensor(a) for a in inputs], *compiled)

    copy = layout_copy(func)
    assert copy is not None
    results = copy(inputs)
    assert len(results) == outputs
    for result, expected in zip(results, compiled):
        np.testing.assert_array_equal(tensor_of(result).numpy(), expected.numpy())  # a view, as the fold stores it
    if func is dense_prepack:
        assert not results[0][15, 1000 - 15 * 64:].any()  # the padded end of the last tile is zeros


@T.prim_func(s_tir=True)
def scaled(weight: T.Buffer((4, 64), "float32"), packed: T.Buffer((2, 4, 32), "float32")):
    for ax0, ax1 in T.grid(4, 64):
        with T.sblock("packed"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            packed[v1 // 32, v0, v1 % 32] = weight[v0, v1] * T.float32(2)


@T.prim_func(s_tir=True)
def overlapping(weight: T.Buffer((4, 64), "float32"), packed: T.Buffer((2, 4, 64), "float32")):
    for ax0, ax1 in T.grid(4, 64):
        with T.sblock("packed"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            packed[v1 // 32, v0, v1 % 64] = weight[v0, v1]


@T.prim_func(s_tir=True)
def transposed_read(weight: T.Buffer((64, 64), "float32"), packed: T.Buffer((64, 64), "float32")):
    for ax0, ax1 in T.grid(64, 64):
        with T.sblock("packed"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            packed[v0, v1] = weight[v1, v0]


@T.prim_func(s_tir=True)
def dropped_axis(weight: T.Buffer((4, 64), "float32"), packed: T.Buffer((64,), "float32")):
    for ax0, ax1 in T.grid(4, 64):
        with T.sblock("packed"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            packed[v1] = weight[v0, v1]


@T.prim_func(s_tir=True)
def staged(weight: T.Buffer((4, 64), "float32"), packed: T.Buffer((2, 4, 32), "float32")):
    temp = T.alloc_buffer((4, 64), "float32")
    for ax0, ax1 in T.grid(4, 64):
        with T.sblock("temp"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            temp[v0, v1] = weight[v0, v1]
    for ax0, ax1 in T.grid(4, 64):
        with T.sblock("packed"):
            v0, v1 = T.axis.remap("SS", [ax0, ax1])
            packed[v1 // 32, v0, v1 % 32] = temp[v0, v1]


@pytest.mark.parametrize("func", [scaled, overlapping, transposed_read, dropped_axis, staged],
                         ids=["arithmetic", "overlapping-digits", "permuted-load", "many-to-one", "through-a-buffer"])
def test_what_the_numpy_copy_does_not_cover_is_left_to_tir(func):
    assert layout_copy(func) is None


def test_weight_prepack_folding_runs_copies_in_numpy_and_compiles_the_rest():
    """The fold in apply_records.apply_database: a digit copy (numpy) and a rewrite with arithmetic
    (compiled by TVM) of constant weights both become constants holding the rewritten weights."""
    import tvm
    from splitc.backends.tvm import apply_records
    from tvm import relax

    rng = np.random.default_rng(0)
    weight, bias, dense = (rng.standard_normal(shape).astype("float32") for shape in ((4, 64), (1000,), (64, 1000)))
    builder = relax.BlockBuilder()
    with builder.function("main", []):
        scale = builder.add_func(scaled, "scaled_weight_prepack")
        pack = builder.add_func(dense_prepack, "dense_weight_prepack")
        scaled_out = builder.emit(relax.call_tir(scale, relax.Tuple([relax.const(weight)]), relax.TensorType((2, 4, 32), "float32")))
        packed_out = builder.emit(relax.call_tir(pack, relax.Tuple([relax.const(bias), relax.const(dense)]),
                                                 [relax.TensorType((16, 64), "float32"), relax.TensorType((50, 2, 2, 32, 10), "float32")]))
        builder.emit_func_output(relax.Tuple([scaled_out, packed_out]))
    folded = apply_records.fold_weight_prepack()(builder.get())

    values = [binding.value for binding in folded["main"].body.blocks[0].bindings]
    assert isinstance(values[0], tvm.ir.expr.Constant) and isinstance(values[1], tvm.ir.expr.Tuple)
    np.testing.assert_array_equal(values[0].value.numpy(), 2 * weight.reshape(4, 2, 32).transpose(1, 0, 2))
    packed_bias, packed_dense = (field.value.numpy() for field in values[1].fields)
    np.testing.assert_array_equal(packed_bias.reshape(-1)[:1000], bias)
    assert not packed_bias.reshape(-1)[1000:].any()
    np.testing.assert_array_equal(packed_dense, dense.reshape(2, 32, 50, 2, 10).transpose(2, 0, 3, 1, 4))
