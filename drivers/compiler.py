"""The compile driver: model -> annotated graph -> cuts -> passes -> partitions -> artifacts -> bundle.

Each stage hands the next an explicit object: `CompileOptions` (built once by the CLI or the API)
in, the cut names resolved once, the pass list of passes/pipeline.py run in order, partitions
extracted, each compiled by its target's backend (backends/registry.py). Every check that can fail
on user input (targets, cuts, operator support) runs before the first backend compiles anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import splitc
from splitc.core.bundle import record_artifact, staged_directory, write_manifest
from splitc.core.errors import CutError, SplitcError
from splitc.core.graph import ModelGraph, sample_inputs
from splitc.core.manifest import REFERENCE_NAME, ExitSpec, Manifest, PartitionSpec, sha256_file
from splitc.drivers.backend_choice import compile_chosen, parse_overrides, plan_candidates
from splitc.frontend.signature import named_by_path
from splitc.passes.contract import CompileData, CompileOptions, PassContext
from splitc.passes.cuts import Cut, CutAnalysis, auto_cuts, estimate, resolve_cuts
from splitc.passes.dynamic import fix_symbols, fixed_by, samples_at_fixed_sizes, second_sizes
from splitc.passes.exits import ExitPlan, classifier_output
from splitc.passes.memory import check_memory
from splitc.passes.partition import Partition, assign_tiers, extract_partitions
from splitc.passes.pipeline import describe, run_pipeline
from splitc.targets import Link, Target

# Agreement between the torch graph and its torch partitions: they run the same kernels, so any
# difference beyond float reassociation means the split itself is wrong.
_SPLIT_SELF_CHECK_RTOL = 1e-5


@dataclass
class CompileResult:
    bundle: Path
    manifest: Manifest
    seconds: dict[str, float] = field(default_factory=dict)  # per stage and per partition
    notes: list[str] = field(default_factory=list)


def plan_cuts(analysis: CutAnalysis, targets: Sequence[Target], cut: Sequence[str] | str, link: Link) -> tuple[list[Cut], str]:
    """The cuts over `targets`, resolved once from what the user wrote: `auto` (the latency
    model's choice), or one node name / module path per boundary."""
    if len(targets) == 1:
        if cut and cut not in ("auto", ("auto",)):
            raise CutError("one target needs no cut; drop --cut or add targets")
        return [], "single"
    if cut in ("auto", ["auto"], ("auto",), None, ""):
        return auto_cuts(analysis, targets, link), "auto"
    names = [c.strip() for c in cut.split(",")] if isinstance(cut, str) else list(cut)
    return resolve_cuts(analysis, names, targets), "manual"


def plan_partitions(graph: ModelGraph, targets: Sequence[Target], cut: Sequence[str] | str, link: Link) -> list[Partition]:
    """The partitions of a plain compile (no exits, quantizers or noise) of `graph` over `targets`:
    what `splitc tune` tunes and builds."""
    analysis = CutAnalysis(graph)
    cuts, _ = plan_cuts(analysis, targets, cut, link)
    assign_tiers(analysis, cuts)
    return extract_partitions(graph, analysis, targets)


def reference_data(graph: ModelGraph, partitions: Sequence[Partition], samples: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, np.ndarray]:
    """Run torch on every sample: the whole graph, and the partitions chained, keeping every
    tensor that enters or leaves a partition. Refuses a split that changes the result."""
    reference: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, sample in enumerate(samples):
            whole = graph.module(*sample)
            whole = whole if isinstance(whole, (tuple, list)) else (whole,)
            env = {spec.name: t for spec, t in zip(graph.inputs, sample)}
            for partition in partitions:
                produced = partition.module(*(env[t.name] for t in partition.inputs))
                env.update({t.name: v for t, v in zip(partition.outputs, produced)})
            for spec, expected in zip(graph.outputs, whole):
                got = env[spec.name]
                scale = float(expected.float().norm()) or 1.0
                if float((got.float() - expected.float()).norm()) / scale > _SPLIT_SELF_CHECK_RTOL:
                    raise SplitcError(f"internal error: the split graph disagrees with the whole graph on {spec.name}; please report this model")
            for name, value in env.items():
                reference[f"s{i}/{name}"] = value.detach().cpu().numpy()
    return reference


def exit_plan_specs(plan: ExitPlan, graph: ModelGraph, partitions: Sequence[Partition]) -> tuple[ExitSpec, ...]:
    """Where each inserted head landed, for the runtime: the partition that computes its logits."""
    final = graph.outputs[classifier_output(graph)].name
    specs = []
    for head in plan.heads:
        partition = next(p for p in partitions if any(t.name == head.output for t in p.outputs))
        output = next(t for t in partition.outputs if t.name == head.output)
        specs.append(ExitSpec(index=head.index, partition=partition.index, output=output, replaces=final,
                              threshold=float(head.threshold), exit_rate=head.exit_rate, at=head.at, kind=head.kind))
    return tuple(specs)


def compile_model(graph: ModelGraph, options: CompileOptions, out: Path, *, data: CompileData | None = None,
                  log: Callable[[str], None] = lambda _: None) -> CompileResult:
    """Compile `graph` as `options` say into the bundle directory `out` (written atomically)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    targets, link, samples = options.targets, options.link, options.samples
    context = PassContext(data or CompileData(), log=log, statistics_count=max(samples, 8))
    cuts, method = plan_cuts(context.analysis(graph), targets, options.cut, link)
    log(f"pipeline: {describe(options)}")
    graph, cuts, records = run_pipeline(graph, cuts, options, context, log)
    notes = context.notes
    examples = context.data.examples
    analysis = context.analysis(graph)
    assign_tiers(analysis, cuts)
    partitions = extract_partitions(graph, analysis, targets)
    exit_plan: ExitPlan | None = context.results.get("exits")
    exit_specs = exit_plan_specs(exit_plan, graph, partitions) if exit_plan else ()
    overrides = parse_overrides(options.backends, targets)
    candidates = [plan_candidates(p, overrides.get(p.target.name)) for p in partitions]  # coverage, before compiling
    check_memory(partitions)
    reference = reference_data(graph, partitions, sample_inputs(graph, samples, examples, other_sizes=second_sizes(graph.inputs)))
    seconds["plan"] = time.perf_counter() - started

    out = Path(out)
    with staged_directory(out) as staging:
        specs = []
        for partition, plan in zip(partitions, candidates):
            tick = time.perf_counter()
            log(f"compiling partition {partition.index} ({len(partition.nodes)} nodes) for {partition.target.name}: "
                f"{', '.join(b.id for b in plan.backends)}")
            workdir = staging / f"p{partition.index}"
            backend_id, compiled, choice = compile_chosen(plan, workdir, [reference[f"s0/{t.name}"] for t in partition.inputs],
                                                          [reference[f"s0/{t.name}"] for t in partition.outputs], log)
            notes.extend(choice.notes(partition) + compiled.notes)
            artifacts = tuple(
                record_artifact(staging, a.path, runtime=a.runtime, role=a.role, arch=a.arch, options=a.options)
                for a in compiled.artifacts
            )
            specs.append(
                PartitionSpec(
                    index=partition.index,
                    target=partition.target.name,
                    backend=backend_id,
                    inputs=partition.inputs,
                    outputs=partition.outputs,
                    artifacts=artifacts,
                    nodes=partition.nodes,
                    flops=partition.flops,
                    engine=compiled.engine,
                    choice=choice.to_json(),
                )
            )
            seconds[f"p{partition.index}:{partition.target.name}"] = time.perf_counter() - tick

        fixed = fixed_by(a for p in specs for a in p.artifacts)
        if fixed:  # a backend compiled a dynamic dimension at one size: the whole bundle takes that size
            specs = [replace(p, inputs=fix_symbols(p.inputs, fixed), outputs=fix_symbols(p.outputs, fixed)) for p in specs]
            reference, samples = samples_at_fixed_sizes(reference, samples, graph.inputs, fixed)
        reference_path = staging / REFERENCE_NAME
        np.savez(reference_path, **reference)
        estimate_json = estimate(analysis, cuts, targets, link).to_json() if cuts else {}
        manifest = Manifest(
            model={"name": graph.name, "source": graph.source, "sha256": graph.source_sha256,
                   "flops": graph.total_flops, "param_bytes": graph.param_bytes,
                   **({"generated_inputs": {layer["noise_input"]: {"distribution": "normal", "mean": 0.0, "std": 1.0,
                                                                     "scaled_to": layer["scale"], "for": layer["tensor"]}
                                            for layer in records["noise"]["layers"]}} if "noise" in records else {}),
                   **({"signature": graph.signature} if graph.signature else {})},
            inputs=fix_symbols(named_by_path(graph.inputs, (graph.signature or {}).get("input_paths", ())), fixed),
            outputs=fix_symbols(named_by_path(graph.outputs, (graph.signature or {}).get("output_paths", ())), fixed),
            targets=tuple(t.summary() for t in targets),
            partitions=tuple(specs),
            boundaries=tuple(fix_symbols(c.crossing, fixed) for c in cuts),
            plan={
                "method": "planner" if options.plan_record else method,
                **({"planned": options.plan_record} if options.plan_record else {}),
                **records,
                "cuts": [{"after": c.after, "position": c.position, "bytes": c.nbytes, "crossing": [t.name for t in c.crossing]} for c in cuts],
                "estimate": estimate_json,
            },
            reference={"path": REFERENCE_NAME, "sha256": sha256_file(reference_path), "samples": samples},
            exits=exit_specs,
            splitc_version=splitc.__version__,
        )
        write_manifest(staging, manifest)
    seconds["total"] = time.perf_counter() - started
    return CompileResult(out, manifest, seconds, notes)
