"""Dynamic dimensions: the export's symbolic sizes (a batch, a sequence length) kept through
partitioning into each artifact, or fixed where a backend cannot keep them.

A dimension is a symbol with a range (core/manifest.py DynamicDim) on some axes of some tensors;
`shape` keeps the example's size. Each partition is re-exported with one torch.export Dim per
symbol on the axes its inputs carry it. A backend that cannot keep a symbol dynamic compiles at the
example size and says so in its artifact's options (`fixed_dims`); the compiler then fixes that
symbol in the whole bundle (`fix_symbols`) so the runtime refuses other sizes up front instead of
failing inside an artifact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch

from splitc.core.manifest import DynamicDim, TensorSpec

FIXED_DIMS = "fixed_dims"  # artifact option: symbol -> size the backend compiled it at


def symbols(specs: Iterable[TensorSpec]) -> dict[str, DynamicDim]:
    """Symbol name -> one of its DynamicDims (they share the range), over `specs`."""
    found: dict[str, DynamicDim] = {}
    for spec in specs:
        for dim in spec.dynamic:
            found.setdefault(dim.name, dim)
    return found


def example_sizes(specs: Iterable[TensorSpec]) -> dict[str, int]:
    return {d.name: spec.shape[d.axis] for spec in specs for d in spec.dynamic}


def second_sizes(specs: Sequence[TensorSpec]) -> dict[str, int]:
    """Per symbol, a size other than the example's for the reference samples `verify` checks: the
    least the range allows (batch 1 is the common deployment size), else one more than the example."""
    sizes = {}
    example = example_sizes(specs)
    for name, dim in symbols(specs).items():
        low = max(dim.min, 1)
        other = low if low != example[name] else example[name] + 1
        if dim.allows(other) and other != example[name]:
            sizes[name] = other
    return sizes


def shape_at(spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    shape = list(spec.shape)
    for dim in spec.dynamic:
        shape[dim.axis] = sizes.get(dim.name, shape[dim.axis])
    return tuple(shape)


def export_dynamic_shapes(specs: Sequence[TensorSpec]) -> tuple[dict[int, torch.export.Dim] | None, ...] | None:
    """torch.export's `dynamic_shapes` for a module taking `specs` positionally: one Dim per symbol,
    shared by every axis that carries it; None when nothing is dynamic."""
    if not any(spec.dynamic for spec in specs):
        return None
    dims = {name: torch.export.Dim(_identifier(name), min=dim.min, max=dim.max if dim.max is not None else torch.utils._sympy.numbers.int_oo)
            for name, dim in symbols(specs).items()}
    return tuple({d.axis: dims[d.name] for d in spec.dynamic} or None for spec in specs)


def _identifier(name: str) -> str:
    return name if name.isidentifier() else "d_" + "".join(c if c.isalnum() else "_" for c in name)


def fix_symbols(specs: Sequence[TensorSpec], fixed: Iterable[str]) -> tuple[TensorSpec, ...]:
    """`specs` with the symbols in `fixed` no longer dynamic (their example size stays in `shape`)."""
    fixed = set(fixed)
    return tuple(replace(s, dynamic=tuple(d for d in s.dynamic if d.name not in fixed)) if s.dynamic else s for s in specs)


def fixed_by(artifacts: Iterable) -> dict[str, int]:
    """Symbols the backends compiled at a fixed size, from their artifacts' options."""
    fixed: dict[str, int] = {}
    for artifact in artifacts:
        fixed.update({str(k): int(v) for k, v in (artifact.options.get(FIXED_DIMS) or {}).items()})
    return fixed


def samples_at_fixed_sizes(reference: Mapping[str, object], count: int, inputs: Sequence[TensorSpec],
                           fixed: Mapping[str, int]) -> tuple[dict[str, object], int]:
    """The reference samples (keys `s<i>/<tensor>`) whose inputs have the fixed symbols at their
    fixed sizes, renumbered from 0; and how many there are."""
    kept = [i for i in range(count)
            if all(reference[f"s{i}/{spec.name}"].shape[d.axis] == fixed[d.name]
                   for spec in inputs for d in spec.dynamic if d.name in fixed)]
    renumbered = {}
    for new, old in enumerate(kept):
        prefix = f"s{old}/"
        renumbered.update({f"s{new}/{key[len(prefix):]}": value for key, value in reference.items() if key.startswith(prefix)})
    return renumbered, len(kept)


# The largest size a TensorRT optimisation profile takes for a symbol without an upper bound, as a
# multiple of the example's size: the engine's buffers are sized for it.
UNBOUNDED_PROFILE_FACTOR = 16


def profile_shapes(specs: Sequence[TensorSpec]) -> dict[str, list[list[int]]]:
    """A TensorRT optimisation profile for inputs `specs`: name -> [min, opt, max] shapes, the
    example's size as the optimum; only inputs with a dynamic axis are listed."""
    profile = {}
    for spec in specs:
        if not spec.dynamic:
            continue
        low, high = list(spec.shape), list(spec.shape)
        for dim in spec.dynamic:
            low[dim.axis] = max(dim.min, 1)
            high[dim.axis] = dim.max if dim.max is not None else spec.shape[dim.axis] * UNBOUNDED_PROFILE_FACTOR
        profile[spec.name] = [low, list(spec.shape), high]
    return profile
