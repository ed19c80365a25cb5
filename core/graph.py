"""The compiler's graph: a torch.fx GraphModule from torch.export, annotated node by node.

Every stage after the frontend reads and writes this object. Metadata keys splitc owns are the
constants below and nothing else: passes never scatter string literals through `node.meta`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from splitc.core.manifest import DynamicDim, TensorSpec

# node.meta keys owned by splitc (torch's own "val" holds the FakeTensor every key is derived from).
SHAPE = "splitc_shape"                # tuple[int, ...] of the output tensor (None for non-tensors)
DTYPE = "splitc_dtype"                # numpy dtype name of the output tensor
OUTPUT_BYTES = "splitc_output_bytes"  # bytes of the output tensor(s)
FLOPS = "splitc_flops"                # floating-point operations of the node
PARAM_BYTES = "splitc_param_bytes"    # bytes of parameters/constants first read by this node
MEMORY_BYTES = "splitc_memory_bytes"  # bytes moved: inputs + outputs + parameters (roofline model)
TIER = "splitc_tier"                  # index of the target the node is placed on (set by partitioning)
EXIT = "splitc_exit"                  # on an exit head's logits: the head's index (an output that never crosses a cut)


@dataclass
class ModelGraph:
    """An exported model, decomposed to core ATen, as an unlifted GraphModule.

    Unlifted (`ExportedProgram.module()`) so parameters are `get_attr` nodes: a partition copies the
    ones it reads and becomes self-contained, instead of taking every weight as a run-time input.
    """

    name: str
    module: fx.GraphModule
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source_sha256: str
    source: str
    # The model's own input/output structure and each flat tensor's path (frontend/signature.py);
    # None when the structure has no JSON form.
    signature: dict | None = None

    def value_nodes(self) -> list[fx.Node]:
        """Placeholders and operator nodes in graph (topological) order: the nodes a cut can fall between."""
        return [n for n in self.module.graph.nodes if n.op in ("placeholder", "call_function")]

    def node(self, name: str) -> fx.Node | None:
        return next((n for n in self.module.graph.nodes if n.name == name), None)

    @property
    def total_flops(self) -> int:
        return sum(n.meta.get(FLOPS, 0) for n in self.module.graph.nodes)

    @property
    def param_bytes(self) -> int:
        return sum(n.meta.get(PARAM_BYTES, 0) for n in self.module.graph.nodes)


def numpy_dtype(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype) if dtype != torch.bfloat16 else "bfloat16"


def tensor_spec(node: fx.Node, name: str | None = None) -> TensorSpec:
    """The TensorSpec of a node whose value is a tensor: the example's sizes, and the axes whose
    size is one of the export's symbols (a dynamic batch, a sequence length)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"node {node.name} does not produce a tensor")
    return TensorSpec(name or node.name, concrete_shape(val), numpy_dtype(val.dtype), dynamic=dynamic_dims(val))


def size_hint(size) -> int:
    """The example's value of a size, without guarding on it: int() on a symbolic size would
    specialise the symbol to that value in the whole graph."""
    if isinstance(size, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(size))
    return int(size)


def concrete_shape(val: torch.Tensor) -> tuple[int, ...]:
    return tuple(size_hint(d) for d in val.shape)


def dynamic_dims(val: torch.Tensor) -> tuple[DynamicDim, ...]:
    """The axes of `val` whose size is one free symbol, with its range. A size that is an
    expression of symbols (2*s0) is left out: no backend takes a derived axis as an input, so a
    boundary carrying one is compiled at its example size."""
    import sympy

    dims = []
    for axis, size in enumerate(val.shape):
        if not isinstance(size, torch.SymInt):
            continue
        expr = size.node.expr
        if not isinstance(expr, sympy.Symbol):
            continue
        bounds = size.node.shape_env.var_to_range.get(expr)
        low = _finite(bounds.lower) if bounds is not None else None
        high = _finite(bounds.upper) if bounds is not None else None
        dims.append(DynamicDim(axis, str(expr), low or 0, high))
    return tuple(dims)


def _finite(bound) -> int | None:
    """A sympy range bound as an int; None for ±∞ (sympy's oo or torch's int_oo)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def is_tensor_node(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def returning(module: fx.GraphModule, names) -> fx.GraphModule:
    """A copy of `module` that returns (its first output, *the nodes named `names`): to read
    intermediate activations with the module's own generated code (fast) instead of an Interpreter."""
    import copy

    module = copy.deepcopy(module)
    output = next(n for n in module.graph.nodes if n.op == "output")
    by_name = {n.name: n for n in module.graph.nodes}
    returned = tuple(output.args[0]) if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (returned[:1] + tuple(by_name[n] for n in names),)
    module.recompile()
    return module


def sample_inputs(graph: ModelGraph, count: int, examples: Sequence[torch.Tensor] | None = None, seed: int = 0,
                  *, other_sizes: Mapping[str, int] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Reference inputs: the user's example first, then seeded random ones. With `other_sizes`
    (dynamic dimension -> a size), the later half take those sizes, so verify checks two.

    Integer inputs that feed an embedding are drawn below that table's size (token ids); other
    integer inputs are drawn from {0, 1} (masks, segment ids).
    """
    generator = torch.Generator().manual_seed(seed)
    bounds = integer_input_bounds(graph)
    samples = []
    if examples is not None:
        samples.append(tuple(examples))
    while len(samples) < count:
        sample = []
        sizes = (other_sizes or {}) if len(samples) >= (count + 1) // 2 else {}
        for spec in graph.inputs:
            dtype = getattr(torch, spec.dtype) if spec.dtype != "bool" else torch.bool
            shape = list(spec.shape)
            for dim in spec.dynamic:
                shape[dim.axis] = sizes.get(dim.name, shape[dim.axis])
            if dtype.is_floating_point:
                sample.append(torch.randn(shape, generator=generator).to(dtype))
            else:
                sample.append(torch.randint(0, bounds.get(spec.name, 2), shape, generator=generator).to(dtype))
        samples.append(tuple(sample))
    return samples


def integer_input_bounds(graph: ModelGraph) -> dict[str, int]:
    bounds = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_function" and "embedding" in str(node.target) and len(node.args) > 1:
            weight, indices = node.args[0], node.args[1]
            if indices.op == "placeholder" and hasattr(weight, "meta") and "val" in weight.meta:
                bounds[indices.name] = int(weight.meta["val"].shape[0])
    return bounds
