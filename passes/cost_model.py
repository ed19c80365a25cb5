"""The analytic latency model: a roofline per node and per target, plus a link model.

time(node, target) = max(FLOPs / sustained FLOP/s, bytes moved / memory bandwidth).
Deliberately small and explicit; measured profiles replace it where the planner has them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch.fx as fx

from splitc.core.graph import FLOPS, MEMORY_BYTES
from splitc.targets import Link, Target


def node_ms(node: fx.Node, target: Target) -> float:
    compute = node.meta.get(FLOPS, 0) / (target.sustained_gflops * 1e9)
    memory = node.meta.get(MEMORY_BYTES, 0) / (target.memory_bandwidth_gbs * 1e9)
    return max(compute, memory) * 1e3


def compute_ms(nodes: Sequence[fx.Node], target: Target) -> np.ndarray:
    """Per-node milliseconds on `target`, as an array aligned with `nodes`."""
    return np.array([node_ms(n, target) for n in nodes], dtype=np.float64)


def transfer_ms(nbytes: int | np.ndarray, link: Link) -> float | np.ndarray:
    return link.rtt_ms + np.asarray(nbytes, dtype=np.float64) * 8.0 / (link.mbit_s * 1e6) * 1e3
