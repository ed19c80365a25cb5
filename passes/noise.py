"""Noise layers at the cut: Gaussian noise on what leaves the device, against model inversion.

For every floating-point tensor crossing the first cut, `x + scale * n` is inserted on the device
side, where `scale = sigma x std(x)` (std measured on calibration samples, so sigma is relative to
the activation's spread) and `n` is a new model input of the tensor's shape. The runtime draws `n`
from the OS's secure generator on every request; nothing random is baked into the artifact, so
the compiled graph stays deterministic and `verify` runs it with seeded noise from the reference.
Graph in, graph out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from splitc.errors import CutError
from splitc.frontend.annotate import annotate
from splitc.graph import ModelGraph, tensor_spec
from splitc.passes.cuts import CutAnalysis
from splitc.passes.quantize import emit, observe

aten = torch.ops.aten


@dataclass(frozen=True)
class NoiseLayer:
    tensor: str          # the clean tensor, which no longer leaves the device
    noisy: str           # what crosses instead
    noise_input: str     # the model input the runtime fills with standard normal samples
    sigma: float         # relative to the tensor's standard deviation
    scale: float         # absolute: sigma x std
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


def add_noise(graph: ModelGraph, cut_name: str, sigma: float, samples: Sequence[tuple[torch.Tensor, ...]]) -> tuple[ModelGraph, str, list[NoiseLayer]]:
    if not sigma > 0:
        raise CutError(f"--noise {sigma} must be a positive multiple of the activation's standard deviation")
    module = copy.deepcopy(graph.module)
    current = ModelGraph(graph.name, module, graph.inputs, graph.outputs, graph.source_sha256, graph.source)
    analysis = CutAnalysis(current)
    position = analysis.resolve(cut_name)
    crossing = [n for n in analysis.crossing_nodes(position) if n.meta["val"].is_floating_point()]
    if not crossing:
        raise CutError(f"nothing floating-point crosses the cut after {cut_name}; there is nothing to add noise to")
    stats = observe(current, [n.name for n in crossing], samples)
    later = set(analysis.order[position + 1:]) | {n for n in module.graph.nodes if n.op == "output"}
    first_op = next(n for n in module.graph.nodes if n.op not in ("placeholder", "get_attr"))
    anchor = analysis.order[position]
    layers, placeholders = [], []
    for node in crossing:
        value = node.meta["val"]
        with module.graph.inserting_before(first_op):
            noise = module.graph.placeholder(f"noise_{node.name}")
        with value.fake_mode:
            noise.meta["val"] = torch.empty(value.shape, dtype=value.dtype)
        scale = sigma * stats[node.name].std
        scaled = emit(module.graph, anchor, aten.mul.Tensor, noise, scale)
        noisy = emit(module.graph, scaled, aten.add.Tensor, node, scaled, name=f"{node.name}_noisy")
        anchor = noisy
        for user in list(node.users):
            if user in later:
                user.replace_input_with(node, noisy)
        layers.append(NoiseLayer(node.name, noisy.name, noise.name, sigma, scale, tuple(int(d) for d in value.shape)))
        placeholders.append(noise)
    module.graph.lint()
    module.recompile()
    annotate(module)
    inputs = graph.inputs + tuple(tensor_spec(p) for p in placeholders)
    return ModelGraph(graph.name, module, inputs, graph.outputs, graph.source_sha256, graph.source), anchor.name, layers
