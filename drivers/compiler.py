"""The compile driver: model -> annotated graph -> cuts -> partitions -> artifacts -> bundle.

Each stage hands the next an explicit object. Every check that can fail on user input (targets,
cuts, operator support) runs before the first backend compiles anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import splitc
from splitc.backends.base import check_support, get_backend
from splitc.core.bundle import record_artifact, staged_directory, write_manifest
from splitc.core.errors import CutError, InputError, PlanError, SplitcError
from splitc.core.graph import ModelGraph
from splitc.passes.cuts import Cut, CutAnalysis, auto_cuts, estimate, resolve_cuts
from splitc.passes.exits import ExitPlan, classifier_output, plan_exits
from splitc.passes.noise import DEFAULT_MAX_LEAKAGE, add_noise, choose_sigma, noise_trial
from splitc.passes.partition import Partition, assign_tiers, extract_partitions
from splitc.passes.quantize import agreement, quantize_cuts
from splitc.core.manifest import (
    REFERENCE_NAME,
    ExitSpec,
    Manifest,
    PartitionSpec,
    sha256_file,
)
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


def plan_cuts(graph: ModelGraph, targets: Sequence[Target], cut: Sequence[str] | str, link: Link) -> tuple[CutAnalysis, list[Cut], str]:
    analysis = CutAnalysis(graph)
    if len(targets) == 1:
        if cut and cut != "auto":
            raise CutError("one target needs no cut; drop --cut or add targets")
        return analysis, [], "single"
    if cut in ("auto", ["auto"], ("auto",), None, ""):
        return analysis, auto_cuts(analysis, targets, link), "auto"
    names = [c.strip() for c in cut.split(",")] if isinstance(cut, str) else list(cut)
    return analysis, resolve_cuts(analysis, names, targets), "manual"


def plan_partitions(graph: ModelGraph, targets: Sequence[Target], cut: Sequence[str] | str, link: Link) -> list[Partition]:
    """The partitions of a plain compile (no exits, quantizers or noise) of `graph` over `targets`:
    what `splitc tune` tunes and builds."""
    analysis, cuts, _ = plan_cuts(graph, targets, cut, link)
    assign_tiers(analysis, cuts)
    return extract_partitions(graph, analysis, targets)


def sample_inputs(graph: ModelGraph, count: int, examples: Sequence[torch.Tensor] | None = None, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Reference inputs: the user's example first, then seeded random ones.

    Integer inputs that feed an embedding are drawn below that table's size (token ids); other
    integer inputs are drawn from {0, 1} (masks, segment ids).
    """
    generator = torch.Generator().manual_seed(seed)
    bounds = _integer_input_bounds(graph)
    samples = []
    if examples is not None:
        samples.append(tuple(examples))
    while len(samples) < count:
        sample = []
        for spec in graph.inputs:
            dtype = getattr(torch, spec.dtype) if spec.dtype != "bool" else torch.bool
            if dtype.is_floating_point:
                sample.append(torch.randn(spec.shape, generator=generator).to(dtype))
            else:
                sample.append(torch.randint(0, bounds.get(spec.name, 2), spec.shape, generator=generator).to(dtype))
        samples.append(tuple(sample))
    return samples


def _integer_input_bounds(graph: ModelGraph) -> dict[str, int]:
    bounds = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_function" and "embedding" in str(node.target) and len(node.args) > 1:
            weight, indices = node.args[0], node.args[1]
            if indices.op == "placeholder" and hasattr(weight, "meta") and "val" in weight.meta:
                bounds[indices.name] = int(weight.meta["val"].shape[0])
    return bounds


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


def exit_points(exits: Sequence[str] | str, cuts: Sequence[Cut]) -> list[str]:
    """`--exits auto`: one head at every cut (on the tier before it); else the named points."""
    names = [e.strip() for e in exits.split(",")] if isinstance(exits, str) else list(exits)
    if names == ["auto"]:
        if not cuts:
            raise CutError("--exits auto puts a head at each cut, and this compile has none; name exit points or add a target")
        return [c.after for c in cuts]
    if "auto" in names:
        raise CutError("--exits takes 'auto' or node names / module paths, not both")
    return names


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


def resolve_noise(graph: ModelGraph, cut_after: str, noise: float | str, calibration, labels, *, max_leakage: float,
                  max_accuracy_drop: float, log: Callable[[str], None]) -> tuple[float, dict | None]:
    """σ for the noise layers: `auto` searches for the least noise meeting `max_leakage`; a given σ
    is checked against the accuracy budget when there is real data to measure it on."""
    if noise == "auto":
        if not calibration:
            raise InputError("--noise auto measures leakage and accuracy on data: pass --calib data.npz (inputs, labels as y)")
        log(f"choosing noise: least σ with leakage (dCor) ≤ {max_leakage:g} on {len(calibration)} calibration samples")
        chosen, trials = choose_sigma(graph, cut_after, calibration, labels, max_leakage=max_leakage, max_drop_points=max_accuracy_drop)
        return chosen.sigma, {"auto": {"max_leakage": max_leakage, "chosen": chosen.to_json(), "trials": [t.to_json() for t in trials]}}
    sigma = float(noise)
    if not calibration:
        return sigma, None
    trial = noise_trial(graph, cut_after, sigma, calibration, labels)
    if trial.drop_points > max_accuracy_drop:
        raise PlanError(f"--noise {sigma:g} costs {trial.drop_points:.1f} accuracy points on the calibration data "
                        f"({100 * (trial.accuracy + trial.drop_points / 100):.1f}% → {100 * trial.accuracy:.1f}%), more than "
                        f"--max-accuracy-drop {max_accuracy_drop:g}; lower σ, cut deeper, or raise the allowed drop")
    return sigma, {"measured": trial.to_json()}


def transform_cuts(graph: ModelGraph, cuts: Sequence[Cut], targets: Sequence[Target], *, noise: float | None,
                   quantize: str | None, examples, samples: list[tuple[torch.Tensor, ...]], per_channel: bool = False):
    """The passes that change what crosses a cut, in order: noise on what leaves the device, then
    quantizers at every cut. Returns the new graph, its analysis and cuts, the example inputs
    (extended with zero noise), and a record of each pass for the manifest."""
    noise_record = quantization = None
    analysis = CutAnalysis(graph)
    if noise:
        clean_graph = graph
        graph, first_cut, layers = add_noise(graph, cuts[0].after, noise, samples)
        analysis = CutAnalysis(graph)
        cuts = resolve_cuts(analysis, [first_cut] + [c.after for c in cuts[1:]], targets)
        # From here on every sample carries noise inputs too: seeded, so references are reproducible.
        generator = torch.Generator().manual_seed(2)
        samples = [sample + tuple(torch.randn(layer.shape, generator=generator) for layer in layers) for sample in samples]
        if examples is not None:
            examples = tuple(examples) + tuple(torch.zeros(layer.shape) for layer in layers)
        noise_record = {"sigma": noise, "layers": [layer.to_json() for layer in layers],
                        **agreement(clean_graph, graph, samples, extra_inputs=len(layers))}
    if quantize not in (None, "none"):
        float_graph, float_bytes = graph, [c.nbytes for c in cuts]
        graph, cut_names, quantizers = quantize_cuts(graph, [c.after for c in cuts], quantize, samples, per_channel=per_channel)
        analysis = CutAnalysis(graph)
        cuts = resolve_cuts(analysis, cut_names, targets)
        quantization = {
            "scheme": quantize,
            "granularity": "channel" if per_channel else "tensor",
            "tensors": [q.to_json() for q in quantizers],
            "bytes_float": float_bytes,
            "bytes_sent": [c.nbytes for c in cuts],
            **agreement(float_graph, graph, samples),
        }
    return graph, analysis, cuts, examples, noise_record, quantization


def compile_model(
    graph: ModelGraph,
    targets: Sequence[Target],
    out: Path,
    *,
    cut: Sequence[str] | str = "auto",
    link: Link,
    samples: int = 4,
    examples: Sequence[torch.Tensor] | None = None,
    plan_record: dict | None = None,
    quantize: str | None = None,
    per_channel: bool = False,
    noise: float | str | None = None,
    calibration: Sequence[tuple[torch.Tensor, ...]] | None = None,
    labels: np.ndarray | None = None,
    exits: Sequence[str] | str | None = None,
    max_accuracy_drop: float = 1.0,
    max_leakage: float = DEFAULT_MAX_LEAKAGE,
    log: Callable[[str], None] = lambda _: None,
) -> CompileResult:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    notes: list[str] = []
    analysis, cuts, method = plan_cuts(graph, targets, cut, link)
    quantization = noise_record = exit_plan = None
    if exits:
        if not calibration:
            raise InputError("--exits trains exit heads on data: pass --calib data.npz with inputs and labels (y)")
        if labels is None:
            notes.append("the calibration data has no labels: exit heads learned the final classifier's answers, and the accuracy budget is agreement with it")
        points = exit_points(exits, cuts)
        log(f"training exit heads at {', '.join(points)} on {len(calibration)} calibration samples")
        graph, exit_plan = plan_exits(graph, points, calibration, labels, max_accuracy_drop)
        analysis = CutAnalysis(graph)
        cuts = resolve_cuts(analysis, [exit_plan.cut_renames.get(c.after, c.after) for c in cuts], targets)
        if not exit_plan.heads:
            notes.append(f"no exit head answers any input within a {max_accuracy_drop:g}-point accuracy drop; none was inserted")
    noise_choice = None
    if noise and cuts:
        noise, noise_choice = resolve_noise(graph, cuts[0].after, noise, calibration, labels,
                                            max_leakage=max_leakage, max_accuracy_drop=max_accuracy_drop, log=log)
    elif noise:
        raise CutError("--noise defends what leaves the device, and this compile has no cut; add a target or drop --noise")
    if cuts and (noise or quantize not in (None, "none")):
        if not calibration:
            notes.append("noise and quantizer statistics measured on random inputs; pass --calib data.npz to measure them on real data")
        graph, analysis, cuts, examples, noise_record, quantization = transform_cuts(
            graph, cuts, targets, noise=noise, quantize=quantize, examples=examples, per_channel=per_channel,
            samples=list(calibration or sample_inputs(graph, max(samples, 8), examples, seed=1)))
    assign_tiers(analysis, cuts)
    partitions = extract_partitions(graph, analysis, targets)
    exit_specs = exit_plan_specs(exit_plan, graph, partitions) if exit_plan else ()
    backends = [get_backend(p.target) for p in partitions]
    for partition, backend in zip(partitions, backends):
        check_support(partition, backend)
    reference = reference_data(graph, partitions, sample_inputs(graph, samples, examples))
    seconds["plan"] = time.perf_counter() - started

    out = Path(out)
    with staged_directory(out) as staging:
        specs = []
        for partition, backend in zip(partitions, backends):
            tick = time.perf_counter()
            log(f"compiling partition {partition.index} ({len(partition.nodes)} nodes) for {partition.target.name} with {backend.id}")
            workdir = staging / f"p{partition.index}"
            compiled = backend.compile(partition, workdir)
            notes.extend(compiled.notes)
            artifacts = tuple(
                record_artifact(staging, a.path, runtime=a.runtime, role=a.role, arch=a.arch, options=a.options)
                for a in compiled.artifacts
            )
            specs.append(
                PartitionSpec(
                    index=partition.index,
                    target=partition.target.name,
                    backend=backend.id,
                    inputs=partition.inputs,
                    outputs=partition.outputs,
                    artifacts=artifacts,
                    nodes=partition.nodes,
                    flops=partition.flops,
                    engine=compiled.engine,
                )
            )
            seconds[f"p{partition.index}:{partition.target.name}"] = time.perf_counter() - tick

        reference_path = staging / REFERENCE_NAME
        np.savez(reference_path, **reference)
        estimate_json = estimate(analysis, cuts, targets, link).to_json() if cuts else {}
        manifest = Manifest(
            model={"name": graph.name, "source": graph.source, "sha256": graph.source_sha256,
                   "flops": graph.total_flops, "param_bytes": graph.param_bytes,
                   **({"generated_inputs": {layer["noise_input"]: {"distribution": "normal", "mean": 0.0, "std": 1.0,
                                                                     "scaled_to": layer["scale"], "for": layer["tensor"]}
                                            for layer in noise_record["layers"]}} if noise_record else {})},
            inputs=graph.inputs,
            outputs=graph.outputs,
            targets=tuple(t.summary() for t in targets),
            partitions=tuple(specs),
            boundaries=tuple(c.crossing for c in cuts),
            plan={
                "method": "planner" if plan_record else method,
                **({"planned": plan_record} if plan_record else {}),
                **({"quantization": quantization} if quantization else {}),
                **({"noise": {**noise_record, **(noise_choice or {})}} if noise_record else {}),
                **({"exits": exit_plan.report} if exit_plan else {}),
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
