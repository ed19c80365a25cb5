"""Does each partition fit its target's memory (`memory_gb` in targets/*.toml)?

A partition needs its weights (each partition holds its own) plus its activations at their peak:
the bytes of every tensor alive, in graph order, at the node where that sum is largest (inputs
included). Weights dominate for large models; the activation figure is what a batch-1 executor
keeps alive at once, ignoring the in-place reuse a backend's memory planner finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from splitc.core.errors import PlanError
from splitc.core.graph import OUTPUT_BYTES
from splitc.passes.partition import Partition


@dataclass(frozen=True)
class MemoryNeed:
    weight_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activation_bytes


def memory_need(partition: Partition) -> MemoryNeed:
    module = partition.module
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return MemoryNeed(int(weights), _peak_live_bytes(module.graph))


def _peak_live_bytes(graph: fx.Graph) -> int:
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    live = peak = 0
    ending: dict[int, int] = {}
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "call_function"):
            size = int(node.meta.get(OUTPUT_BYTES) or _bytes(node))
            live += size
            ending[last_use[node]] = ending.get(last_use[node], 0) + size
        peak = max(peak, live)
        live -= ending.pop(i, 0)
    return peak


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        from splitc.core.graph import concrete_shape

        shape = concrete_shape(val)
        count = 1
        for d in shape:
            count *= d
        return count * val.element_size()
    return 0


def check_memory(partitions: Sequence[Partition]) -> list[MemoryNeed]:
    """Refuse, with the figures, a partition that needs more than its target's memory."""
    needs = [memory_need(p) for p in partitions]
    for partition, need in zip(partitions, needs):
        limit = partition.target.memory_gb * 1e9
        if need.total > limit:
            raise PlanError(
                f"partition {partition.index} needs {need.total / 1e9:.2f} GB ({need.weight_bytes / 1e9:.2f} GB weights + "
                f"{need.activation_bytes / 1e6:.1f} MB activations), more than {partition.target.name}'s {partition.target.memory_gb:g} GB "
                "(memory_gb in its target file); move the cut so less of the model lands there, or use a target with more memory"
            )
    return needs
