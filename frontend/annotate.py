"""Annotate every node with shape, dtype, output bytes, FLOPs, parameter bytes and bytes moved.

FLOPs come from torch's own formulas (`torch.utils.flop_counter.flop_registry`: convolutions, mm,
addmm, bmm, baddbmm, the attention kernels) where it has one; attention ops it lacks are counted
here; layout-only ops cost nothing and every other op counts one FLOP per element it reads or writes.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from splitc.core.graph import DTYPE, FLOPS, MEMORY_BYTES, OUTPUT_BYTES, PARAM_BYTES, SHAPE, concrete_shape, numpy_dtype, size_hint

# Ops that only reinterpret or move data: no arithmetic.
_LAYOUT_OPS = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze",
    "slice", "select", "alias", "clone", "contiguous", "cat", "stack", "split", "split_with_sizes",
    "unbind", "flatten", "index_select", "embedding", "_to_copy", "detach", "lift_fresh_copy",
    "full", "zeros", "ones", "arange", "scalar_tensor", "empty", "sym_size", "chunk",
}


def annotate(module: fx.GraphModule) -> fx.GraphModule:
    """Write splitc's metadata keys on every node, in place, and return the module."""
    position = {node: i for i, node in enumerate(module.graph.nodes)}
    # A parameter's bytes are charged to the first node that reads it, so per-node figures add up
    # to the model's size; the weights themselves travel with the partition, never across a cut.
    param_bytes: dict[fx.Node, int] = {}
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = _fetch_attr(module, node.target)
        node.meta.update({SHAPE: tuple(tensor.shape), DTYPE: numpy_dtype(tensor.dtype),
                          OUTPUT_BYTES: 0, FLOPS: 0, PARAM_BYTES: 0, MEMORY_BYTES: 0})
        if node.users:
            reader = min(node.users, key=position.__getitem__)
            param_bytes[reader] = param_bytes.get(reader, 0) + _nbytes(tensor)

    for node in module.graph.nodes:
        if node.op not in ("placeholder", "call_function"):
            continue
        val = node.meta.get("val")
        tensor = val if isinstance(val, torch.Tensor) else None
        node.meta[SHAPE] = concrete_shape(tensor) if tensor is not None else None
        node.meta[DTYPE] = numpy_dtype(tensor.dtype) if tensor is not None else None
        node.meta[OUTPUT_BYTES] = _value_bytes(val)
        node.meta[PARAM_BYTES] = param_bytes.get(node, 0)
        node.meta[FLOPS] = node_flops(node) if node.op == "call_function" else 0
        inputs = sum(_value_bytes(a.meta.get("val")) for a in node.all_input_nodes if a.op != "get_attr")
        node.meta[MEMORY_BYTES] = inputs + node.meta[OUTPUT_BYTES] + node.meta[PARAM_BYTES]
    return module


def node_flops(node: fx.Node) -> int:
    target = node.target
    if target is operator.getitem:
        return 0
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", str(target))
    if packet in flop_registry:
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: _concrete(n.meta.get("val")))
        try:
            return int(flop_registry[packet](*args, **kwargs, out_val=_concrete(node.meta.get("val"))))
        except Exception:
            pass  # a formula that cannot read these arguments falls through to the generic estimate
    if "scaled_dot_product" in name:
        return _attention_flops(node)
    if name in _LAYOUT_OPS:
        return 0
    # One FLOP per element touched: elementwise ops count their output, reductions their input.
    first_input = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    return max(_numel(node.meta.get("val")), _numel(first_input))


def _attention_flops(node: fx.Node) -> int:
    """Q·Kᵀ and P·V: 2 x 2·B·H·L·S·E (softmax ignored, as torch's formulas do)."""
    q, k = (_concrete(a.meta.get("val")) for a in node.args[:2])
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return 0
    *batch, length, embed = q.shape
    source_length = k.shape[-2]
    return int(4 * math.prod(batch) * length * source_length * embed)


def _concrete(val):
    """`val` with the example's sizes in place of symbolic ones (a meta tensor): figures for a
    dynamic axis are taken at the example's size, and the symbol is never specialised by them."""
    if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
        return torch.empty(concrete_shape(val), dtype=val.dtype, device="meta")
    if isinstance(val, (tuple, list)):
        return type(val)(_concrete(v) for v in val)
    if isinstance(val, torch.SymInt):
        return size_hint(val)
    return val


def _numel(val) -> int:
    if isinstance(val, torch.Tensor):
        return math.prod(concrete_shape(val))
    if isinstance(val, (tuple, list)):
        return sum(_numel(v) for v in val)
    return 0


def _value_bytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return _nbytes(val)
    if isinstance(val, (tuple, list)):
        return sum(_value_bytes(v) for v in val)
    return 0


def _nbytes(tensor: torch.Tensor) -> int:
    return math.prod(concrete_shape(tensor)) * tensor.element_size()


def _fetch_attr(module: torch.nn.Module, target: str) -> torch.Tensor:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
