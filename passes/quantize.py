"""Activation quantizers at the cut: fewer bytes on the wire.

For every floating-point tensor that crosses a cut, a quantize chain is inserted on the sending
side, right after the cut, and the matching dequantize chain on the receiving side; the readers
after the cut are rewired to the dequantized tensor. The boundary then carries integers: uint8
for int8, and for int4 two values packed per byte.

The quantizers are plain ops (div, round, add, clamp, casts; int4 packing with integer arithmetic)
because TVM's importer has no quantize ops and bit shifts fail in both TVM and the ONNX export
(../shared/TOOLCHAIN.md); this form compiles bit-exactly through both. Affine, per tensor or per
channel (scales and zero points then travel as constants in both partitions), with ranges
calibrated on data. Graph in, graph out: the input ModelGraph is not modified.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from splitc.core.errors import CutError
from splitc.frontend.annotate import annotate
from splitc.core.graph import ModelGraph, returning, tensor_spec
from splitc.passes.contract import CompileOptions, PassContext, PassOutput
from splitc.passes.cuts import Cut, CutAnalysis

aten = torch.ops.aten
BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class TensorQuantizer:
    tensor: str           # the float tensor that no longer crosses
    sent: str             # the integer tensor that crosses instead
    received: str         # the dequantized tensor the later tier reads
    bits: int
    scale: float | tuple[float, ...]        # one per tensor, or one per channel along `axis`
    zero_point: int | tuple[int, ...]
    shape: tuple[int, ...]
    axis: int | None = None                 # the channel axis of per-channel parameters

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape),
                "scale": list(self.scale) if isinstance(self.scale, tuple) else self.scale,
                "zero_point": list(self.zero_point) if isinstance(self.zero_point, tuple) else self.zero_point}


@dataclass(frozen=True)
class Observed:
    lo: float
    hi: float
    std: float


def observe(graph: ModelGraph, names: Sequence[str], samples: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, Observed]:
    """Range and standard deviation of each named node's value over all samples."""
    wanted = set(names)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in wanted and isinstance(value, torch.Tensor):
                seen[node.name].append(value.detach().double().reshape(-1))
            return value

    recorder = Recorder(graph.module)
    with torch.no_grad():
        for sample in samples:
            recorder.run(*sample)
    result = {}
    for name, values in seen.items():
        if values:
            flat = torch.cat(values)
            result[name] = Observed(float(flat.min()), float(flat.max()), float(flat.std()) if flat.numel() > 1 else 0.0)
    return result


def channel_axis(shape: Sequence[int]) -> int:
    """The channel axis of an activation: 1 for feature maps (N, C, H, W), the last otherwise
    (hidden size of (N, T, D) token sequences, features of (N, D))."""
    return 1 if len(shape) == 4 else len(shape) - 1


def observe_channels(graph: ModelGraph, names: Sequence[str], samples: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel minimum and maximum (along channel_axis) of each named node over all samples."""
    capture = returning(graph.module, list(names))
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for sample in samples:
            for name, value in zip(names, capture(*sample)[1:]):
                axis = channel_axis(value.shape)
                flat = value.detach().double().movedim(axis, 0).reshape(value.shape[axis], -1)
                lo[name] = torch.minimum(lo[name], flat.min(1).values) if name in lo else flat.min(1).values
                hi[name] = torch.maximum(hi[name], flat.max(1).values) if name in hi else flat.max(1).values
    return {name: (lo[name].numpy(), hi[name].numpy()) for name in lo}


def affine_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point mapping [lo, hi] (widened to include 0) onto [0, 2^bits - 1]."""
    levels = (1 << bits) - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero_point = int(min(max(round(-lo / scale), 0), levels))
    return scale, zero_point


def quantize_cuts(graph: ModelGraph, cut_names: Sequence[str], scheme: str, samples: Sequence[tuple[torch.Tensor, ...]], *,
                  per_channel: bool = False) -> tuple[ModelGraph, list[str], list[TensorQuantizer]]:
    """Insert quantizers at each cut; return the new graph, the new cut names, and what was inserted.
    `per_channel`: one scale and zero point per channel (channel_axis) instead of per tensor."""
    if scheme not in BITS:
        raise CutError(f"--quantize {scheme!r} is not supported; use one of {', '.join(BITS)} or none")
    bits = BITS[scheme]
    module = copy.deepcopy(graph.module)
    current = replace(graph, module=module)
    analysis = CutAnalysis(current)
    crossing_names = {t.name for name in cut_names for t in analysis.cut(analysis.resolve(name)).crossing}
    observed = observe(current, sorted(crossing_names), samples)
    channels = observe_channels(current, sorted(crossing_names), samples) if per_channel else {}

    new_cuts, quantizers = [], []
    for name in cut_names:
        analysis = CutAnalysis(current)
        position = analysis.resolve(name)
        anchor = analysis.order[position]
        crossing = [node for node in analysis.crossing_nodes(position) if node.meta["val"].is_floating_point()]
        later = {n for n in analysis.order[position + 1:]} | {n for n in module.graph.nodes if n.op == "output"}
        received = {}
        for node in crossing:  # quantize, in order, right after the cut node
            if bits == 4 and node.meta["val"].numel() % 2:
                raise CutError(f"int4 packs two values per byte, but {node.name} crossing the cut after {name} has "
                               f"{node.meta['val'].numel()} elements; use --quantize int8 or cut elsewhere")
            shape = tuple(int(d) for d in node.meta["val"].shape)
            if node.name in channels:
                axis = channel_axis(shape)
                pairs = [affine_params(float(a), float(b), bits) for a, b in zip(*channels[node.name])]
                scale, zero_point = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
                view = [1] * len(shape)
                view[axis] = shape[axis]
                scale_arg = add_constant(module, f"{node.name}_qscale", torch.tensor(scale, dtype=node.meta["val"].dtype).reshape(view), anchor)
                zero_arg = add_constant(module, f"{node.name}_qzero", torch.tensor(zero_point, dtype=node.meta["val"].dtype).reshape(view), scale_arg)
                anchor = zero_arg
            else:
                seen = observed.get(node.name)
                axis = None
                scale, zero_point = affine_params(seen.lo if seen else 0.0, seen.hi if seen else 0.0, bits)
                scale_arg, zero_arg = scale, float(zero_point)
            sent, anchor = _quantize_chain(module.graph, anchor, node, scale_arg, zero_arg, bits)
            received[node] = (sent, scale, zero_point, scale_arg, zero_arg, shape, axis)
        cut_after = anchor
        for node, (sent, scale, zero_point, scale_arg, zero_arg, shape, axis) in received.items():  # dequantize right after the new cut
            restored, anchor = _dequantize_chain(module.graph, anchor, sent, node, scale_arg, zero_arg, bits)
            for user in list(node.users):
                if user in later:
                    user.replace_input_with(node, restored)
            quantizers.append(TensorQuantizer(node.name, sent.name, restored.name, bits, scale, zero_point, shape, axis))
        module.graph.lint()
        module.recompile()
        annotate(module)
        outputs = tuple(tensor_spec(n, spec.name) for n, spec in zip(_returned(module), graph.outputs))
        current = replace(graph, module=module, outputs=outputs)
        new_cuts.append(cut_after.name)
    return current, new_cuts, quantizers


def _returned(module: fx.GraphModule) -> list[fx.Node]:
    output = next(n for n in module.graph.nodes if n.op == "output")
    return [a for a in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(a, fx.Node)]


def emit(graph: fx.Graph, anchor: fx.Node, target, *args, name: str | None = None, **kwargs) -> fx.Node:
    """Insert `target(*args, **kwargs)` after `anchor`, deriving its FakeTensor the way export
    would: by running the op on the inputs' FakeTensors under their fake mode."""
    with graph.inserting_after(anchor):
        node = graph.create_node("call_function", target, args, kwargs, name=name)
    fake_args, fake_kwargs = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
    leaves = torch.utils._pytree.tree_leaves([a.meta["val"] for a in node.all_input_nodes])  # a tuple for getitem
    fake = next(v for v in leaves if isinstance(v, torch.Tensor))
    with fake.fake_mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def add_constant(module: fx.GraphModule, name: str, value: torch.Tensor, anchor: fx.Node) -> fx.Node:
    """Register `value` as a buffer of `module` and read it with a get_attr node after `anchor`
    (with the FakeTensor export would give it). Partitions that read it get their own copy."""
    module.register_buffer(name, value.detach().clone().contiguous())
    with module.graph.inserting_after(anchor):
        node = module.graph.get_attr(name)
    fake = next(v for v in torch.utils._pytree.tree_leaves(anchor.meta["val"]) if isinstance(v, torch.Tensor))
    node.meta["val"] = fake.fake_mode.from_tensor(getattr(module, name), static_shapes=True)
    return node


def _quantize_chain(graph, anchor, x, scale, zero_point, bits):
    """`scale` and `zero_point`: Python numbers (per tensor) or get_attr nodes (per channel)."""
    levels = (1 << bits) - 1
    q = emit(graph, anchor, aten.div.Tensor, x, scale)
    q = emit(graph, q, aten.round.default, q)
    q = emit(graph, q, aten.add.Tensor, q, zero_point)
    q = emit(graph, q, aten.clamp.default, q, 0.0, float(levels))
    if bits == 8:
        q = emit(graph, q, aten._to_copy.default, q, dtype=torch.uint8, name=f"{x.name}_q8")
        return q, q
    q = emit(graph, q, aten._to_copy.default, q, dtype=torch.int32)
    pairs = emit(graph, q, aten.reshape.default, q, [-1, 2])  # reshape: the tensor may be a non-contiguous view
    hi = emit(graph, pairs, aten.select.int, pairs, 1, 0)
    lo = emit(graph, hi, aten.select.int, pairs, 1, 1)
    packed = emit(graph, lo, aten.mul.Tensor, hi, 16)
    packed = emit(graph, packed, aten.add.Tensor, packed, lo)
    packed = emit(graph, packed, aten._to_copy.default, packed, dtype=torch.uint8, name=f"{x.name}_q4")
    return packed, packed


def _dequantize_chain(graph, anchor, sent, original, scale, zero_point, bits):
    dtype = original.meta["val"].dtype
    if bits == 8:
        x = emit(graph, anchor, aten._to_copy.default, sent, dtype=dtype)
    else:
        p = emit(graph, anchor, aten._to_copy.default, sent, dtype=torch.int32)
        hi = emit(graph, p, aten.div.Tensor_mode, p, 16, rounding_mode="floor")
        lo = emit(graph, hi, aten.mul.Tensor, hi, 16)
        lo = emit(graph, lo, aten.sub.Tensor, p, lo)
        pairs = emit(graph, lo, aten.stack.default, [hi, lo], 1)
        shape = [int(d) for d in original.meta["val"].shape]
        x = emit(graph, pairs, aten.view.default, pairs, shape)
        x = emit(graph, x, aten._to_copy.default, x, dtype=dtype)
    x = emit(graph, x, aten.sub.Tensor, x, zero_point)
    x = emit(graph, x, aten.mul.Tensor, x, scale, name=f"{original.name}_dq")
    return x, x


def agreement(graph: ModelGraph, changed: ModelGraph, samples: Sequence[tuple[torch.Tensor, ...]], extra_inputs: int = 0) -> dict[str, float]:
    """Top-1 agreement and worst relative error of a transformed graph against the original.
    `extra_inputs`: trailing inputs only the transformed graph takes (noise)."""
    agree, total, worst = 0, 0, 0.0
    with torch.no_grad():
        for sample in samples:
            a, b = graph.module(*sample[: len(sample) - extra_inputs]), changed.module(*sample)
            # The model's own outputs only: exit heads' logits are extra graph outputs past them.
            kept = len(graph.outputs)
            for x, y in zip(torch.utils._pytree.tree_leaves(a)[:kept], torch.utils._pytree.tree_leaves(b)[:kept]):
                if x.is_floating_point():
                    worst = max(worst, float((x - y).norm() / (x.norm() or 1.0)))
                    if x.ndim >= 2 and x.shape[-1] > 1:
                        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
                        total += math.prod(x.shape[:-1])
    return {"top1_agreement": agree / total if total else float("nan"), "max_rel_err": worst}


class QuantizePass:
    """Affine int8/int4 quantizers on every tensor crossing every cut: fewer bytes on the wire."""

    name = "quantize"
    record_key = "quantization"

    def applies(self, options: CompileOptions) -> bool:
        return options.quantize is not None

    def run(self, graph: ModelGraph, cuts: list[Cut], options: CompileOptions, context: PassContext) -> PassOutput:
        if not cuts:
            return PassOutput(graph, [])  # nothing crosses: nothing to quantize
        samples = context.statistics(graph)
        quantized, cut_names, quantizers = quantize_cuts(graph, [c.after for c in cuts], options.quantize, samples,
                                                         per_channel=options.per_channel)
        record = {
            "scheme": options.quantize,
            "granularity": "channel" if options.per_channel else "tensor",
            "tensors": [q.to_json() for q in quantizers],
            "bytes_float": [c.nbytes for c in cuts],
            "bytes_sent": [c.nbytes for c in context.cuts(quantized, cut_names)],
            **agreement(graph, quantized, samples),
        }
        return PassOutput(quantized, list(cut_names), record, result=quantizers)
