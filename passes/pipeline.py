"""The compile pipeline: the passes that change what crosses a cut, in the order they run.

Order matters: exit heads first (a head sits at a cut, and the cut moves to its end), then the
defence (it fine-tunes the weights the later passes measure on), then noise on what leaves the
device, then quantizers on every crossing tensor (noise is added before rounding, so what is sent
is the quantized noisy tensor). A new pass is one module with a `CutPass` object
(passes/contract.py) and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from splitc.core.errors import SplitcError
from splitc.core.graph import ModelGraph
from splitc.passes.contract import CompileOptions, CutPass, PassContext
from splitc.passes.cuts import Cut
from splitc.passes.defend import DefendPass
from splitc.passes.exits import ExitsPass
from splitc.passes.noise import NoisePass
from splitc.passes.quantize import QuantizePass

DEFAULT_PIPELINE: tuple[CutPass, ...] = (ExitsPass(), DefendPass(), NoisePass(), QuantizePass())


def pipeline_of(options: CompileOptions) -> tuple[CutPass, ...]:
    return DEFAULT_PIPELINE if options.pipeline is None else options.pipeline


def describe(options: CompileOptions) -> str:
    """The pipeline as `--verbose` prints it: every pass, run or skipped."""
    steps = [f"{p.name}{'' if p.applies(options) else ' (off)'}" for p in pipeline_of(options)]
    return " → ".join(["cuts", *steps, "partition", "compile"])


def run_pipeline(graph: ModelGraph, cuts: Sequence[Cut], options: CompileOptions, context: PassContext,
                 log: Callable[[str], None] = lambda _: None) -> tuple[ModelGraph, list[Cut], dict]:
    """Run every pass that applies; returns the final graph, its cuts and the passes' manifest records
    (by record key). A failure that is not the user's names the pass and the ones that ran before it."""
    records: dict = {}
    cuts = list(cuts)
    ran: list[str] = []
    for step in pipeline_of(options):
        if not step.applies(options):
            continue
        log(f"pass {step.name}")
        try:
            output = step.run(graph, cuts, options, context)
        except SplitcError:
            raise
        except Exception as exc:
            raise SplitcError(f"internal error in pass {step.name} (after {', '.join(ran) or 'no other pass'}): "
                              f"{type(exc).__name__}: {exc}; please report this model".splitlines()[0]) from exc
        ran.append(step.name)
        if output.graph is not graph or [c.after for c in cuts] != output.cuts:
            graph, cuts = output.graph, context.cuts(output.graph, output.cuts)
        context.take(output)
        context.results[step.name] = output.result
        if output.record is not None:
            records[step.record_key] = output.record
    return graph, cuts, records
