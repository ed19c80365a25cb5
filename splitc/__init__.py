"""splitc: a split compiler for deep-learning inference across the edge-cloud continuum.

The public Python API, for embedding apps and CI scripts:

    import splitc
    result = splitc.compile("model.pt2", ["rpi4", "a100"], "model.splitc", cut="layer2", quantize="int8")
    report = splitc.verify("model.splitc")            # report.ok, report.to_json(), report.to_junit()
    front = splitc.plan("model.pt2", ["rpi4", "a100"], link="4g")
    audit = splitc.audit("model.pt2", "layer1", calibration)  # what an attacker recovers at a cut

    from splitc.runtime import Bundle, SplitSession   # on the device: numpy + a backend runtime
    outputs = SplitSession(Bundle.open("model.splitc")).run({"x": x})

Kept free of imports on purpose: `splitc.runtime` must load on a device that has neither torch nor
the compiler, and importing it imports this package first. Each function imports its stage when
called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "audit", "compile", "load", "plan", "verify"]


def load(source: Any, *, input_shapes=(), example_input=None, trust_pickle: bool = False, weights=None, task=None):
    """The annotated graph of a model: a model file (told by its content: torch.export archive,
    TorchScript, GGUF, Hugging Face folder), `package.module:factory` (with `weights`, a state_dict
    file), or a graph already loaded."""
    from splitc.core.graph import ModelGraph
    from splitc.frontend import import_model

    if isinstance(source, ModelGraph):
        return source
    return import_model(source, input_shapes=input_shapes, example_input=example_input, trust_pickle=trust_pickle,
                        weights=weights, task=task)[1]


def compile(model: Any, targets, out, *, calibration=None, labels=None, examples=None, log=lambda _: None,
            input_shapes=(), trust_pickle: bool = False, **options):
    """Split `model` over `targets` (names, TOML paths or Target objects) and write the bundle `out`.

    `options` are `CompileOptions` fields (cut, link, samples, quantize, per_channel, noise,
    max_leakage, exits, max_accuracy_drop, ...); an unknown one is a TypeError, never ignored.
    Returns the CompileResult (bundle path, manifest, seconds per stage, notes)."""
    from pathlib import Path

    from splitc.drivers.compiler import compile_model
    from splitc.passes.contract import CompileData, CompileOptions
    from splitc.targets import Target, load_link, load_target

    unknown = sorted(set(options) - set(CompileOptions.names()))
    if unknown:
        raise TypeError(f"splitc.compile() got unknown option(s) {', '.join(unknown)}; known: {', '.join(CompileOptions.names())}")
    graph = load(model, input_shapes=input_shapes, trust_pickle=trust_pickle)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    chain = [t if isinstance(t, Target) else load_target(str(t)) for t in targets]
    link = options.pop("link", "4g")
    options = CompileOptions(chain, load_link(link) if isinstance(link, str) else link, **options)
    data = CompileData(examples=examples, calibration=calibration, labels=labels)
    return compile_model(graph, options, Path(out), data=data, log=log)


def verify(bundle, *, emulate: bool = True, log=lambda _: None):
    """Run every artifact of a bundle (or variant directory) against the torch reference."""
    from splitc.drivers.variants import verify_variants
    from splitc.drivers.verify import verify_bundle
    from splitc.runtime.variant_index import is_variant_dir

    check = verify_variants if is_variant_dir(bundle) else verify_bundle
    return check(bundle, emulate=emulate, log=log)


def plan(model: Any, targets, *, link="4g", rate: float = 10.0, objective: str = "latency", **planner_options):
    """The planner's Pareto set of placements of `model` over `targets` on one link (a pure function:
    nothing is compiled or run). `planner_options` go to passes.planner.plan_placements."""
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.money import Workload
    from splitc.passes.planner import plan_placements
    from splitc.targets import load_link, load_targets

    graph = load(model)
    chain = load_targets(targets)
    return plan_placements(CutAnalysis(graph), chain, load_link(link) if isinstance(link, str) else link,
                           Workload(rate_per_s=rate), objective=objective, **planner_options)


def audit(model: Any, cut: str, calibration, **audit_options):
    """Attack what a device sends at `cut` (inverse network, white-box, re-identification, dCor,
    dFIL); `calibration` as drivers.audit.audit_cut takes it."""
    from splitc.drivers.audit import audit_cut

    return audit_cut(load(model), cut, calibration, **audit_options)
