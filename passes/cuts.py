"""Where a graph can be cut, what crosses each cut, and which cut the cost model prefers.

A cut falls after a node in graph (topological) order: every node at or before it runs on the
earlier tier. What crosses is every tensor produced at or before the cut and read after it, so skip
connections, tensors with several readers, and model outputs produced early all cross; a tensor
produced on tier 0 and read on tier 2 crosses both cuts. N targets take N-1 cuts.

Nodes that depend on no model input (weights, and ops on weights only, such as a transposed
linear weight) are not placed by a cut at all: every partition that reads them gets its own copy,
so weights never travel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.fx as fx

from splitc.core.errors import CutError
from splitc.core.graph import EXIT, OUTPUT_BYTES, ModelGraph, is_tensor_node, tensor_spec
from splitc.passes.cost_model import compute_ms, transfer_ms
from splitc.core.manifest import TensorSpec
from splitc.targets import Link, Target


@dataclass(frozen=True)
class Cut:
    position: int                      # index in CutAnalysis.order; the cut falls after that node
    after: str                         # name of that node
    crossing: tuple[TensorSpec, ...]   # tensors that cross, in graph order
    valid: bool = True
    reason: str = ""                   # why not valid

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.crossing)


class CutAnalysis:
    """Positions, liveness and crossing sets of one graph, computed once."""

    def __init__(self, graph: ModelGraph):
        self.graph = graph
        self.order: list[fx.Node] = placed_nodes(graph.module)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.by_name = {n.name: i for i, n in enumerate(self.order)}
        n = len(self.order)
        # last_use[i]: position of the last reader of node i; model outputs are read "after the end".
        self.last_use = np.full(n, -1, dtype=np.int64)
        for i, node in enumerate(self.order):
            for user in node.users:
                if user.op == "output":
                    # An exit head's logits are answered on the tier that computes them: never sent on.
                    self.last_use[i] = max(self.last_use[i], i) if EXIT in node.meta else n
                elif user in self.index:
                    self.last_use[i] = max(self.last_use[i], self.index[user])
        self.is_op = np.array([node.op == "call_function" for node in self.order])
        self.is_tensor = np.array([is_tensor_node(node) for node in self.order])
        self.out_bytes = np.array([node.meta.get(OUTPUT_BYTES, 0) for node in self.order], dtype=np.int64)
        self.is_float = np.array([is_tensor_node(n) and n.meta["val"].is_floating_point() for n in self.order])
        ops = np.flatnonzero(self.is_op)
        self.last_op = int(ops[-1]) if len(ops) else -1

    def crossing_nodes(self, position: int) -> list[fx.Node]:
        return [node for i, node in enumerate(self.order[: position + 1]) if self.last_use[i] > position]

    def crossing_bytes(self, float_bits: int | None = None) -> np.ndarray:
        """Bytes crossing a cut after each position, for all positions at once (O(n) sweep).

        `float_bits`: what floating-point tensors would take per element once quantized at the cut
        (8 or 4); None keeps their own size."""
        n = len(self.order)
        sizes = self.out_bytes
        if float_bits is not None:
            elements = np.array([n.meta["val"].numel() if f else 0 for n, f in zip(self.order, self.is_float)], dtype=np.int64)
            sizes = np.where(self.is_float, -(-elements * float_bits // 8), self.out_bytes)
        delta = np.zeros(n + 1, dtype=np.int64)
        live = self.last_use > np.arange(n)
        starts = np.flatnonzero(live)
        np.add.at(delta, starts, sizes[starts])
        np.add.at(delta, self.last_use[starts], -sizes[starts])
        return np.cumsum(delta)[:n]

    def cut(self, position: int) -> Cut:
        node = self.order[position]
        crossing = self.crossing_nodes(position)
        reason = ""
        if not self.is_op[position]:
            reason = "falls after a model input, leaving the earlier tier nothing to compute"
        elif position >= self.last_op:
            reason = "falls after the last operator, leaving the later tier nothing to compute"
        else:
            bad = [c.name for c in crossing if not is_tensor_node(c)]
            if bad:
                reason = f"would send non-tensor value(s) {', '.join(bad)}; cut after their getitem readers instead"
        specs = tuple(tensor_spec(c) for c in crossing if is_tensor_node(c))
        return Cut(position, node.name, specs, valid=not reason, reason=reason)

    def valid_positions(self) -> np.ndarray:
        n = len(self.order)
        ok = self.is_op.copy()
        ok[self.last_op:] = False
        # A position is invalid if any live value there is not a tensor (a tuple from a multi-output op).
        bad_live = np.zeros(n + 1, dtype=np.int64)
        for i in np.flatnonzero(~self.is_tensor):
            if self.last_use[i] > i:
                bad_live[i] += 1
                bad_live[self.last_use[i]] -= 1
        ok &= np.cumsum(bad_live)[:n] == 0
        return np.flatnonzero(ok)

    def candidates(self) -> list[Cut]:
        return [self.cut(int(p)) for p in self.valid_positions()]

    def position_of(self, node_name: str) -> int:
        """Position of the node called `node_name` (an exact node name, as a pass returns it)."""
        if node_name not in self.by_name:
            raise CutError(f"no node {node_name!r} in {self.graph.name} to cut after")
        return self.by_name[node_name]

    def resolve(self, name: str, flag: str = "--cut") -> int:
        """Position of the cut named `name`: a node name, a module path (cut after its last node),
        or an op as the model called it (`max_pool2d`, `conv2d`) or as ATen names it, which cuts
        after that call's tensor output (a tuple-valued op: its first getitem). A name that matches
        several calls is refused with their node names. `flag` names the option, for the error."""
        if not name.strip():
            raise CutError(f"{flag} has an empty name; give node names or module paths, e.g. layer2,layer3")
        if name in self.by_name:
            return self.index[self._tensor_of(self.order[self.by_name[name]], name, flag)]
        owned = [i for i, node in enumerate(self.order) if _in_module(node, name)]
        if owned:
            return max(owned)
        calls = self._calls_of_op(name)
        if len(calls) == 1:
            return calls[0]
        if calls:
            listed = ", ".join(self.order[p].name for p in calls[:12]) + (" …" if len(calls) > 12 else "")
            raise CutError(f"{flag} {name!r} matches {len(calls)} calls in {self.graph.name}: {listed}; name one of these nodes instead")
        close = sorted({n.name for n in self.order if name in n.name})[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise CutError(f"{flag} {name!r} names no node, module or op of {self.graph.name}{hint}; `splitc inspect` lists the candidates")

    def _tensor_of(self, node: fx.Node, name: str, flag: str) -> fx.Node:
        """`node` itself when it is a tensor; for an op returning a tuple, the getitem of its first output."""
        if is_tensor_node(node):
            return node
        first = [u for u in node.users if u in self.index and u.target is operator.getitem and u.args[1] == 0]
        if not first:
            raise CutError(f"{flag} {name!r} returns no tensor a cut can send; cut after a node that reads it")
        return first[0]

    def _calls_of_op(self, op: str) -> list[int]:
        """Per call of `op` (by the torch function the model called, or the ATen op), the position of
        its last tensor node: what a cut after that call sends."""
        calls: dict[str, int] = {}
        for i, node in enumerate(self.order):
            call_id, function = node.meta.get("torch_fn") or (node.name, "")
            aten = getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
            if op in (function.rsplit(".", 1)[-1], aten):
                if self.is_tensor[i] and not (node.target is operator.getitem and node.args[1] != 0):
                    calls[call_id] = i
                else:
                    calls.setdefault(call_id, -1)
        return sorted(p for p in calls.values() if p >= 0)

def placed_nodes(module: fx.GraphModule) -> list[fx.Node]:
    """Placeholders and the operator nodes that depend on a model input, in graph order."""
    depends: set[fx.Node] = set()
    order = []
    for node in module.graph.nodes:
        if node.op == "placeholder" or (node.op == "call_function" and any(a in depends for a in node.all_input_nodes)):
            depends.add(node)
            order.append(node)
    return order


def _in_module(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(fqn == path or fqn.startswith(path + ".") for fqn, _ in stack.values())


def resolve_cuts(analysis: CutAnalysis, names: Sequence[str], targets: Sequence[Target]) -> list[Cut]:
    """Turn `--cut a,b` into validated cuts, one per boundary between consecutive targets."""
    if len(names) != len(targets) - 1:
        raise CutError(f"{len(targets)} targets need {len(targets) - 1} cut(s), --cut gave {len(names)}; pass one node name per boundary")
    cuts = [analysis.cut(analysis.resolve(name)) for name in names]
    for name, cut in zip(names, cuts):
        if not cut.valid:
            raise CutError(f"cut after {name!r} ({cut.after}) {cut.reason}")
    positions = [c.position for c in cuts]
    if positions != sorted(set(positions)):
        raise CutError(f"cuts {', '.join(names)} are not in graph order (or repeat); list them from the first tier to the last")
    return cuts


@dataclass(frozen=True)
class CutEstimate:
    cuts: tuple[Cut, ...]
    tier_ms: tuple[float, ...]       # compute per tier
    transfer_ms: tuple[float, ...]   # per boundary
    link: Link

    @property
    def total_ms(self) -> float:
        return sum(self.tier_ms) + sum(self.transfer_ms)

    def to_json(self) -> dict:
        return {
            "link": {"name": self.link.name, "mbit_s": self.link.mbit_s, "rtt_ms": self.link.rtt_ms},
            "tier_compute_ms": [round(t, 4) for t in self.tier_ms],
            "transfer_ms": [round(t, 4) for t in self.transfer_ms],
            "total_ms": round(self.total_ms, 4),
        }


def estimate(analysis: CutAnalysis, cuts: Sequence[Cut], targets: Sequence[Target], link: Link) -> CutEstimate:
    bounds = [-1, *(c.position for c in cuts), len(analysis.order) - 1]
    tier_ms = tuple(
        float(compute_ms(analysis.order[bounds[k] + 1 : bounds[k + 1] + 1], target).sum()) for k, target in enumerate(targets)
    )
    return CutEstimate(tuple(cuts), tier_ms, tuple(float(transfer_ms(c.nbytes, link)) for c in cuts), link)


def auto_cuts(analysis: CutAnalysis, targets: Sequence[Target], link: Link) -> list[Cut]:
    """The cuts with the lowest estimated end-to-end latency (compute per tier + transfer per cut).

    Dynamic programming over valid positions: best[k][p] is the cheapest way to run everything up
    to position p on tiers 0..k with the k-th cut at p. O(tiers x positions²), vectorised over the
    earlier cut. The multi-objective planner supersedes this; it stays as the latency-only baseline.
    """
    if len(targets) == 1:
        return []
    valid = analysis.valid_positions()
    if len(valid) < len(targets) - 1:
        raise CutError(f"{analysis.graph.name} has {len(valid)} valid cut position(s), {len(targets)} targets need {len(targets) - 1}")
    prefix = [np.concatenate([[0.0], np.cumsum(compute_ms(analysis.order, t))]) for t in targets]
    send = transfer_ms(analysis.crossing_bytes()[valid], link)

    def span(k: int, start: np.ndarray, end: np.ndarray) -> np.ndarray:  # tier k runs (start, end]
        return prefix[k][end + 1] - prefix[k][start + 1]

    best = span(0, np.full(len(valid), -1), valid) + send
    choice: list[np.ndarray] = []
    for k in range(1, len(targets) - 1):
        total = best[:, None] + span(k, valid[:, None], valid[None, :]) + send[None, :]
        total[np.tril_indices(len(valid))] = np.inf  # cuts must move forward
        choice.append(np.argmin(total, axis=0))
        best = total[choice[-1], np.arange(len(valid))]
    last = len(analysis.order) - 1
    best = best + span(len(targets) - 1, valid, np.full(len(valid), last))
    picks = [int(np.argmin(best))]
    for back in reversed(choice):
        picks.append(int(back[picks[-1]]))
    return [analysis.cut(int(valid[i])) for i in reversed(picks)]
