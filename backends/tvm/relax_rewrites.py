"""Graph rewrites on Relax functions, call by call, and the ones splitc runs before tuning.

`rewrite_calls` replaces calls to named operators in one pass of a Relax mutator. It does what
`relax.dpl.rewrite_call` does for patterns rooted at one operator, without its cost: that spent
~15 ms per replaced call re-checking the function (0.3 s to fold ResNet-18's 20 batch norms, the
same again to re-lay its weights), where one mutator pass takes about a millisecond.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# A rewrite gets the call (its operands already rewritten) and `value_of`, which looks through a
# variable to the value bound to it (a rewrite matching conv2d(pad(x)) asks for its operand's
# producer); it returns the replacement, or the call itself to leave it.
Rewrite = Callable[[Any, Callable[[Any], Any]], Any]


def rewrite_calls(func, rewrites: Mapping[str, Rewrite]):
    """`func` with each call to an operator named in `rewrites` (e.g. "relax.nn.conv2d") replaced
    by what its rewrite returns, and the bindings nothing uses any more removed."""
    from tvm import ir, relax

    def value_of(expr):
        bound = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return expr if bound is None else bound

    @relax.expr_functor.mutator
    class CallRewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.builder_.normalize(super().visit_call_(call))  # its type known even where operands changed
            rewrite = rewrites.get(call.op.name) if isinstance(call.op, ir.Op) else None
            return call if rewrite is None else rewrite(call, value_of)

    mutator = CallRewriter()
    return relax.analysis.remove_all_unused(mutator.visit_expr(func))


def rewrite_functions(name: str, rewrites: Mapping[str, Rewrite]):
    """Module pass: `rewrite_calls` on every Relax function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def rewrite_module(mod, _ctx):
        mod = mod.clone()  # assigning into the module handed in would change the caller's
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = rewrite_calls(func, rewrites)
        return mod

    return rewrite_module


# ------------------------------------------------------------------------------- before tuning


def pre_tuning_rewrites():
    """Module pass: padding and batch norm folded into convolutions, clip as max/min (NCHW, before
    the layout conversion)."""
    return rewrite_functions("splitc.PreTuningRewrites", {
        "relax.nn.conv2d": _lenient(fold_conv_pad), "relax.nn.batch_norm": _lenient(fold_conv_batch_norm),
        "relax.clip": _lenient(clip_to_min_max)})


def constant_permute_folding():
    """Module pass: permute_dims of a constant (the layout conversion's weight transposes) folded."""
    return rewrite_functions("splitc.FoldConstantPermutes", {"relax.permute_dims": _lenient(fold_constant_permute)})


def _lenient(rewrite: Rewrite) -> Rewrite:
    """`rewrite`, leaving a call it does not expect (its attributes raise) as it is: these rewrites
    are optimisations, and the same graph is left the same way every time."""

    def apply(call, value_of):
        try:
            return rewrite(call, value_of)
        except Exception:  # noqa: BLE001 - tvm raises its own error types for missing or odd attributes
            return call

    return apply


def ints(values) -> list[int]:
    return [int(v) for v in values]


def conv2d_like(call, data, weight, **changes):
    """relax.nn.conv2d with `call`'s attributes, new operands and some attributes changed."""
    from tvm import relax

    a = call.attrs
    kwargs = {"strides": ints(a.strides), "padding": ints(a.padding), "dilation": ints(a.dilation), "groups": int(a.groups),
              "data_layout": str(a.data_layout), "kernel_layout": str(a.kernel_layout), "out_layout": str(a.out_layout),
              "out_dtype": str(a.out_dtype) or None}
    kwargs.update(changes)
    return relax.op.nn.conv2d(data, weight, **kwargs)


def _call_to(expr, op_name: str) -> bool:
    from tvm import ir, relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op) and expr.op.name == op_name


def constant_array(constant):
    """A Relax constant's value as a read-only numpy array sharing its memory: the rewrites read
    every weight of the model (ResNet-18: 45 MB), and `.numpy()` would copy each one first. Types
    DLPack cannot hand to numpy (bfloat16) are copied."""
    import numpy as np

    try:
        array = np.from_dlpack(constant.value)
    except (BufferError, TypeError, RuntimeError):
        return constant.value.numpy()
    array.flags.writeable = False
    return array


def new_tensor(shape, dtype: str, write):
    """A TVM tensor of `shape` and `dtype` whose value `write(out)` puts into the numpy array `out`.
    The rewrites make a new copy of every weight, each fresh memory the kernel faults in page by
    page (on this VM, tvm's copy into a new tensor ran at ~0.5 GB/s): `out` is the tensor's own
    memory, so the value is written once, where a numpy result handed to `relax.const` would be
    written and then copied."""
    import numpy as np
    import tvm

    tensor = tvm.runtime.empty(shape, dtype)
    try:
        out = np.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError):  # a type numpy cannot view (bfloat16): write, then copy
        out = np.empty(shape, dtype)
        write(out)
        return tvm.runtime.tensor(out)
    write(out)
    return tensor


def tensor_of(array):
    """`new_tensor` holding `array`, which may be a view (a transpose): copied once."""
    import numpy as np

    return new_tensor(array.shape, str(array.dtype), lambda out: np.copyto(out, array))


def _is_constant(expr) -> bool:
    from tvm import ir

    return isinstance(expr, ir.expr.Constant)


def fold_conv_pad(call, value_of):
    """conv2d(pad(x, zeros on H/W)) -> conv2d(x) with that padding (Hugging Face's TF-style padding)."""
    pad = value_of(call.args[0])
    if not _call_to(pad, "relax.nn.pad") or str(call.attrs.data_layout) != "NCHW":
        return call
    width = ints(pad.attrs.pad_width)
    if str(pad.attrs.pad_mode) != "constant" or float(pad.attrs.pad_value) != 0.0 or len(width) != 8 or any(width[:4]):
        return call
    top, bottom, left, right = width[4:]
    p = ints(call.attrs.padding)
    return conv2d_like(call, pad.args[0], call.args[1], padding=[p[0] + top, p[1] + left, p[2] + bottom, p[3] + right])


def fold_conv_batch_norm(call, value_of):
    """batch_norm(conv2d(x, W)) with constant weights and statistics -> conv2d(x, W * s) + b."""
    import numpy as np
    from tvm import relax

    conv = value_of(call.args[0])
    if (not _call_to(conv, "relax.nn.conv2d") or not _is_constant(conv.args[1]) or not all(map(_is_constant, call.args[1:5]))
            or int(call.attrs.axis) != 1 or str(conv.attrs.data_layout) != "NCHW" or str(conv.attrs.kernel_layout) != "OIHW"
            or str(conv.attrs.out_layout) != "NCHW"):
        return call
    w = constant_array(conv.args[1])
    if w.dtype.kind != "f":
        return call
    g, b, mu, v = (constant_array(c).astype(np.float64) for c in call.args[1:5])
    if not call.attrs.scale:
        g = np.ones_like(g)
    if not call.attrs.center:
        b = np.zeros_like(b)
    s = g / np.sqrt(v + float(call.attrs.epsilon))
    # The scale in float64, the product in the weights' own type, as torch's fuse_conv_bn_weights
    # does: within an ulp of a float64 product, at a quarter of the cost (ResNet-18: 0.18 -> 0.05 s).
    folded = relax.const(new_tensor(w.shape, str(w.dtype), lambda out: np.multiply(w, s.astype(w.dtype).reshape(-1, 1, 1, 1), out=out)))
    bias = (b - mu * s).astype(w.dtype).reshape(1, -1, 1, 1)
    out = relax.op.add(conv2d_like(conv, conv.args[0], folded), relax.const(bias))
    return relax.Tuple([out, call.args[3], call.args[4]])  # batch_norm's (out, mean, var); only [0] is read


def clip_to_min_max(call, _value_of):
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): elementwise ops keep the NHWC layout, clip does not."""
    from tvm import relax

    try:
        dtype = str(call.ty.dtype)
        lo, hi = (float(v.value) for v in call.args[1:3])
    except (AttributeError, TypeError, ValueError):
        return call
    return relax.op.minimum(relax.op.maximum(call.args[0], relax.const(lo, dtype)), relax.const(hi, dtype))


def fold_constant_permute(call, _value_of):
    """permute_dims(constant) -> the permuted constant, in numpy (FoldConstant would compile a TIR
    function per weight shape, which made preparing MobileNetV2 take 30 s)."""
    import numpy as np
    from tvm import relax

    if not _is_constant(call.args[0]):
        return call
    value = constant_array(call.args[0])
    axes = None if call.attrs.axes is None else ints(call.attrs.axes)
    return relax.const(tensor_of(np.transpose(value, axes)))
