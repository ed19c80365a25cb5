"""A partition as the ExportedProgram a backend imports, keeping its dynamic dimensions where the
re-export allows it and fixing them, with the reason, where it does not."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitc.core.errors import BackendError, first_line
from splitc.passes.partition import Partition


@dataclass
class PartitionProgram:
    program: torch.export.ExportedProgram
    fixed: dict[str, int] = field(default_factory=dict)  # symbol -> the size it was fixed at
    notes: list[str] = field(default_factory=list)


def export_partition(partition: Partition, backend: str, *, dynamic: bool = True, why_static: str = "") -> PartitionProgram:
    """Export `partition`, symbolic axes kept when `dynamic`. When they cannot be kept (or the
    backend asks for static shapes, giving `why_static`), the example's sizes are compiled and the
    note names each symbol and the size it was fixed at."""
    symbols = partition.dynamic_symbols
    reason = why_static
    if symbols and dynamic:
        try:
            return PartitionProgram(partition.export(dynamic=True))
        except Exception as exc:  # noqa: BLE001 - any export failure: fall back to the example's sizes, and say why
            reason = f"torch.export could not keep them symbolic ({first_line(exc, 160)})"
    try:
        program = partition.export(dynamic=False)
    except Exception as exc:
        raise BackendError(f"re-exporting partition {partition.index} for {partition.target.name} failed: {first_line(exc)}") from exc
    if not symbols:
        return PartitionProgram(program)
    sizes = ", ".join(f"{name}={size}" for name, size in symbols.items())
    note = (f"partition {partition.index} ({partition.target.name}, {backend}): dynamic dimension(s) fixed at {sizes}"
            f"{': ' + reason if reason else ''}; the bundle runs at that size only")
    return PartitionProgram(program, dict(symbols), [note])
