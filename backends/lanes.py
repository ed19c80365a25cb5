"""Vector widths for splitc's own CPU schedules (backends/winograd.py, backends/depthwise.py)."""

from __future__ import annotations


def float32_lanes(vector_bits: int | None) -> int:
    """float32 lanes of the target's natural vector; 128-bit when it is not known."""
    return max(1, (vector_bits or 128) // 32)


def widest_dividing(width: int, extent: int) -> int:
    """`width` halved until it divides `extent`, so a split by it leaves no remainder loop."""
    while width > 1 and extent % width:
        width //= 2
    return width
