"""Split a tagged graph into self-contained partitions, one per target.

Two steps, as torch.fx and ExecuTorch do it: `assign_tiers` only tags nodes (node.meta[TIER]);
`extract_partitions` reads the tags and builds one GraphModule per tier. The input graph is never
modified beyond its tags. Each partition owns copies of the weights it reads, declares the tensors it
takes and gives by name, and can be re-exported with torch.export for a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from splitc.core.graph import FLOPS, TIER, ModelGraph, tensor_spec
from splitc.passes.cuts import Cut, CutAnalysis
from splitc.passes.dynamic import example_sizes, export_dynamic_shapes
from splitc.core.manifest import TensorSpec
from splitc.targets import Target


@dataclass
class Partition:
    index: int
    target: Target
    module: fx.GraphModule            # self-contained: its own weights, placeholders named by tensor
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    nodes: tuple[str, ...]            # names of the graph nodes placed here
    flops: int

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(t.shape, dtype=_torch_dtype(t.dtype)) for t in self.inputs)

    @property
    def dynamic_symbols(self) -> dict[str, int]:
        """The symbolic sizes its inputs carry, with the example's size of each."""
        return example_sizes(self.inputs)

    def export(self, dynamic: bool = True) -> torch.export.ExportedProgram:
        """This partition as an ExportedProgram (what the TVM and ONNX importers take); with
        `dynamic`, the inputs' symbolic axes stay symbolic (passes/dynamic.py)."""
        shapes = export_dynamic_shapes(self.inputs) if dynamic else None
        with torch.no_grad():
            return torch.export.export(self.module, self.example_inputs(), dynamic_shapes=shapes)


def assign_tiers(analysis: CutAnalysis, cuts: Sequence[Cut]) -> dict[str, int]:
    """Tag every placed node with the tier that runs it; return name -> tier."""
    positions = [c.position for c in cuts]
    tiers = {}
    for i, node in enumerate(analysis.order):
        tier = sum(1 for p in positions if i > p)
        node.meta[TIER] = tier
        tiers[node.name] = tier
    return tiers


def boundaries(analysis: CutAnalysis, cuts: Sequence[Cut]) -> list[tuple[TensorSpec, ...]]:
    return [cut.crossing for cut in cuts]


def extract_partitions(graph: ModelGraph, analysis: CutAnalysis, targets: Sequence[Target]) -> list[Partition]:
    """One Partition per target from the TIER tags `assign_tiers` wrote."""
    source = graph.module
    tier_of = {node: node.meta[TIER] for node in analysis.order}
    output_node = next(n for n in source.graph.nodes if n.op == "output")
    model_outputs = {n for n in output_node.all_input_nodes}
    partitions = []
    for k, target in enumerate(targets):
        placed = [n for n in analysis.order if tier_of[n] == k and n.op == "call_function"]
        placed_here = set(placed)
        # Model inputs and tensors from earlier tiers; both arrive as placeholders.
        needed_from_earlier = sorted(
            {a for n in placed for a in n.all_input_nodes if a in tier_of and a not in placed_here}, key=analysis.index.__getitem__
        )
        given = [
            n for n in placed
            if n in model_outputs or any(u in tier_of and tier_of[u] > k for u in n.users)
        ]
        module = _build_module(source, placed, needed_from_earlier, given)
        partitions.append(
            Partition(
                index=k,
                target=target,
                module=module,
                inputs=tuple(tensor_spec(n) for n in needed_from_earlier),
                outputs=tuple(tensor_spec(n) for n in given),
                nodes=tuple(n.name for n in placed),
                flops=int(sum(n.meta.get(FLOPS, 0) for n in placed)),
            )
        )
    return partitions


def _build_module(source: fx.GraphModule, placed: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            # Not placed anywhere: a weight, or an op on weights only. Copy it (and what it reads) here.
            env[node] = _copy_constant(node, source, graph, root, lookup)
        return env[node]

    for node in placed:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(root, graph)
    module.graph.lint()
    return module


def _copy_constant(node: fx.Node, source: fx.GraphModule, graph: fx.Graph, root: torch.nn.Module, lookup) -> fx.Node:
    if node.op == "get_attr":
        value = source
        for part in node.target.split("."):
            value = getattr(value, part)
        name = node.name  # unique within the source graph, and a valid attribute name
        # The partition shares the weight's storage (detach, no clone): nothing writes weights at
        # inference, and a copy per partition would double a large model's memory.
        if isinstance(value, torch.nn.Parameter):
            root.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=False))
        else:
            root.register_buffer(name, value.detach())
        copied = graph.get_attr(name)
        copied.meta = dict(node.meta)
        return copied
    if node.op == "call_function":
        return graph.node_copy(node, lookup)
    raise AssertionError(f"{node.name} ({node.op}) is neither placed nor constant")


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16}.get(name) or getattr(torch, name)
