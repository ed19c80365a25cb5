"""The one timing routine splitc uses (profiles, and later `splitc bench`).

`time_callable` calls a function a few times to warm it up, then times each call on its own with
`time.perf_counter_ns` until it has at least `repeats` samples *and* has spent at least `min_seconds`,
stopping early only at `max_seconds`. Every figure of a `Timing` is in milliseconds per call.

Stdlib and numpy only: a device measuring itself imports this without torch or the compiler.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int   # timed calls (samples)
    warmup: int    # untimed calls before them

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], warmup: int) -> Timing:
        """Summarise per-call samples (milliseconds)."""
        s = np.asarray(samples_ms, dtype=np.float64)
        if s.size == 0:
            raise ValueError("no timing samples")
        p10, p50, p90 = np.percentile(s, [10, 50, 90])
        return cls(float(p50), float(s.mean()), float(p10), float(p90), float(s.min()), int(s.size), int(warmup))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timing:
        return cls(
            median_ms=float(data["median_ms"]),
            mean_ms=float(data["mean_ms"]),
            p10_ms=float(data["p10_ms"]),
            p90_ms=float(data["p90_ms"]),
            min_ms=float(data["min_ms"]),
            repeats=int(data["repeats"]),
            warmup=int(data["warmup"]),
        )

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, n={self.repeats})"


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.2,
    max_seconds: float = 30.0,
) -> Timing:
    """Time `fn()` per call: `warmup` untimed calls, then timed calls until both `repeats` samples and
    `min_seconds` of timed calls are reached, or `max_seconds` has passed (at least one sample)."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if warmup < 0 or min_seconds < 0 or max_seconds <= 0:
        raise ValueError("warmup and min_seconds must be >= 0 and max_seconds > 0")
    clock = time.perf_counter_ns
    for _ in range(warmup):
        fn()
    min_ns, max_ns = int(min_seconds * 1e9), int(max_seconds * 1e9)
    samples: list[int] = []
    began = clock()
    while True:
        start = clock()
        fn()
        end = clock()
        samples.append(end - start)
        spent = end - began  # wall time of the timed phase
        if (len(samples) >= repeats and spent >= min_ns) or spent >= max_ns:
            break
    return Timing.from_samples(np.asarray(samples, dtype=np.float64) / 1e6, warmup)
