"""The compile contract: the options a compile takes, built once, and the protocol of a pass that
changes what crosses a cut.

`CompileOptions` holds every choice (targets, cuts, link, quantizer, noise, exits, budgets); the CLI
and the Python API build it once and it travels unchanged to every stage. `CompileData` holds what
the user gave to measure on (example inputs, calibration samples and labels). A `CutPass` takes
(graph, cuts, options, context) and returns (graph, cuts, manifest record): graph in, graph out,
with the cuts named by the node they fall after, so a pass that renames or moves what crosses a
cut says so in its output rather than by side effect. The passes and their order are
passes/pipeline.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch

from splitc.core.errors import InputError
from splitc.core.graph import ModelGraph, sample_inputs
from splitc.passes.cuts import Cut, CutAnalysis
from splitc.targets import Link, Target

DEFAULT_MAX_LEAKAGE = 0.5  # distance correlation allowed between the input and what is sent (--noise auto)

Sample = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CompileOptions:
    """Every choice of one compile. Frozen: a stage that needs another value makes a copy with
    `dataclasses.replace`, so what a later stage reads is what the user asked for."""

    targets: tuple[Target, ...]
    link: Link
    cut: str | tuple[str, ...] = "auto"        # "auto", or one node name / module path per boundary
    samples: int = 4                           # reference samples stored for verify
    quantize: str | None = None                # None | "int8" | "int4" at every cut
    per_channel: bool = False
    noise: float | str | None = None           # sigma, or "auto" (least sigma meeting max_leakage)
    max_leakage: float = DEFAULT_MAX_LEAKAGE
    exits: str | tuple[str, ...] | None = None  # "auto" or exit points
    max_accuracy_drop: float = 1.0              # points, for exits, noise and defences
    defend: str | None = None                   # None | "nopeek" | "adversarial" | "noise-aware" (passes/defend.py)
    plan_record: dict[str, Any] | None = None   # the planner's choice this compile realises
    backends: tuple[str, ...] = ()              # "TARGET=BACKEND" overrides of the measured backend choice
    pipeline: tuple[CutPass, ...] | None = None  # None: passes/pipeline.py's DEFAULT_PIPELINE

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise InputError("no targets given; pass --targets with a comma-separated chain such as rpi4,a100")
        if isinstance(self.cut, str):
            names = [c.strip() for c in self.cut.split(",")] if self.cut.strip() else ["auto"]
            object.__setattr__(self, "cut", "auto" if names == ["auto"] else tuple(names))
        else:
            object.__setattr__(self, "cut", tuple(self.cut) or "auto")
        object.__setattr__(self, "backends", tuple(self.backends.split(",")) if isinstance(self.backends, str)
                           else tuple(f"{k}={v}" for k, v in self.backends.items()) if isinstance(self.backends, dict)
                           else tuple(self.backends))
        if self.quantize == "none":
            object.__setattr__(self, "quantize", None)
        if isinstance(self.exits, str) and self.exits != "auto":
            object.__setattr__(self, "exits", tuple(e.strip() for e in self.exits.split(",")))
        if not self.samples >= 1:
            raise InputError(f"samples={self.samples}: store at least one reference sample")
        if self.max_accuracy_drop < 0:
            raise InputError(f"--max-accuracy-drop {self.max_accuracy_drop} must be >= 0 (percentage points)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class CompileData:
    """What the user gave to measure on: example inputs, calibration samples and their labels."""

    examples: Sample | None = None
    calibration: list[Sample] | None = None
    labels: np.ndarray | None = None


@dataclass
class PassContext:
    """What passes share besides the graph: the data, a log, notes for the user, and one cut
    analysis per graph (every pass that changes the graph invalidates it; none rebuilds it twice)."""

    data: CompileData
    log: Callable[[str], None] = lambda _: None
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # each pass's own result object, by pass name
    statistics_count: int = 8  # random samples drawn for statistics when there is no calibration data
    _analysis: tuple[ModelGraph, CutAnalysis] | None = None
    _statistics: list[Sample] | None = None

    def statistics(self, graph: ModelGraph) -> list[Sample]:
        """Samples to measure activation statistics on (quantizer ranges, noise scale, agreement):
        the calibration data, else seeded random inputs, drawn once; a pass that adds graph inputs
        replaces them through its output."""
        if self._statistics is None:
            if not self.data.calibration:
                self.notes.append("noise and quantizer statistics measured on random inputs; pass --calib data.npz to measure them on real data")
            self._statistics = list(self.data.calibration or sample_inputs(graph, self.statistics_count, self.data.examples, seed=1))
        return self._statistics

    def take(self, output: PassOutput) -> None:
        """Adopt what a pass replaced besides the graph: example inputs and statistics samples."""
        if output.examples is not None:
            self.data.examples = output.examples
        if output.statistics is not None:
            self._statistics = output.statistics

    def analysis(self, graph: ModelGraph) -> CutAnalysis:
        if self._analysis is None or self._analysis[0] is not graph:
            self._analysis = (graph, CutAnalysis(graph))
        return self._analysis[1]

    def cuts(self, graph: ModelGraph, after: Sequence[str]) -> list[Cut]:
        """The cuts of `graph` after the named nodes: names a pass returned, already resolved, so
        this is a lookup, not a second resolution of what the user wrote."""
        analysis = self.analysis(graph)
        return [analysis.cut(analysis.position_of(name)) for name in after]


@dataclass
class PassOutput:
    graph: ModelGraph
    cuts: list[str]                         # the node each cut now falls after
    record: dict[str, Any] | None = None    # what the manifest's plan records under the pass's `record_key`
    result: Any = None                      # the pass's own object for later stages (exit heads, ...)
    examples: Sample | None = None          # replaced example inputs when the pass added graph inputs
    statistics: list[Sample] | None = None  # replaced statistics samples, likewise


class CutPass(Protocol):
    """A pass that changes what crosses a cut (exit heads, defences, noise, quantizers)."""

    name: str          # shown by --verbose, and the key of its result in PassContext.results
    record_key: str    # where its record goes in the manifest's plan

    def applies(self, options: CompileOptions) -> bool:
        """Whether the options ask for this pass at all."""

    def run(self, graph: ModelGraph, cuts: list[Cut], options: CompileOptions, context: PassContext) -> PassOutput:
        """Transform `graph` (never in place) and say where the cuts fall in the result."""
