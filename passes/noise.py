"""Noise layers at the cut: Gaussian noise on what leaves the device, against model inversion.

For every floating-point activation crossing the first cut, `x + scale * n` is inserted on the device
side, where `scale = sigma x std(x)` (std measured on calibration samples, so sigma is relative to
the activation's spread) and `n` is a new model input of the tensor's shape. The runtime draws `n`
from the OS's secure generator on every request; nothing random is baked into the artifact, so
the compiled graph stays deterministic and `verify` runs it with seeded noise from the reference.
Graph in, graph out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from splitc.core.errors import CutError, InputError, PlanError
from splitc.frontend.annotate import annotate
from splitc.core.graph import ModelGraph, returning, tensor_spec
from splitc.passes.contract import CompileOptions, PassContext, PassOutput
from splitc.passes.cuts import Cut, CutAnalysis
from splitc.passes.privacy import distance_correlation
from splitc.passes.quantize import agreement, emit, observe

aten = torch.ops.aten


@dataclass(frozen=True)
class NoiseLayer:
    tensor: str          # the clean tensor, which no longer leaves the device
    noisy: str           # what crosses instead
    noise_input: str     # the model input the runtime fills with standard normal samples
    sigma: float         # relative to the tensor's standard deviation
    scale: float         # absolute: sigma x std
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


def data_carrying(module) -> set:
    """Nodes computed from a floating-point model input or from the weights: the activations.

    Float tensors built from integer inputs and literals alone (a transformer's additive attention
    mask holds 0 and -3.4e38; position ids) are no activation: noise scaled to their spread would
    be ~1e38 and destroy the model, and what they reveal (which positions are padding) is not what
    the noise defends. They cross unchanged."""
    carrying = set()
    for node in module.graph.nodes:
        if node.op == "get_attr" or (node.op == "placeholder" and node.meta["val"].is_floating_point()):
            carrying.add(node)
        elif node.op == "call_function" and any(a in carrying for a in node.all_input_nodes):
            carrying.add(node)
    return carrying


def add_noise(graph: ModelGraph, cut_name: str, sigma: float, samples: Sequence[tuple[torch.Tensor, ...]]) -> tuple[ModelGraph, str, list[NoiseLayer]]:
    if not sigma > 0:
        raise CutError(f"--noise {sigma} must be a positive multiple of the activation's standard deviation")
    module = copy.deepcopy(graph.module)
    current = replace(graph, module=module)
    analysis = CutAnalysis(current)
    position = analysis.resolve(cut_name)
    floats = [n for n in analysis.crossing_nodes(position) if n.meta["val"].is_floating_point()]
    carries = data_carrying(module)
    crossing = [n for n in floats if n in carries]
    if not crossing:
        raise CutError(f"nothing floating-point computed from the data crosses the cut after {cut_name}; there is nothing to add noise to")
    stats = observe(current, [n.name for n in crossing], samples)
    later = set(analysis.order[position + 1:]) | {n for n in module.graph.nodes if n.op == "output"}
    first_op = next(n for n in module.graph.nodes if n.op not in ("placeholder", "get_attr"))
    anchor = analysis.order[position]
    layers, placeholders = [], []
    for node in crossing:
        value = node.meta["val"]
        with module.graph.inserting_before(first_op):
            noise = module.graph.placeholder(f"noise_{node.name}")
        with value.fake_mode:
            noise.meta["val"] = torch.empty(value.shape, dtype=value.dtype)
        scale = sigma * stats[node.name].std
        scaled = emit(module.graph, anchor, aten.mul.Tensor, noise, scale)
        noisy = emit(module.graph, scaled, aten.add.Tensor, node, scaled, name=f"{node.name}_noisy")
        anchor = noisy
        for user in list(node.users):
            if user in later:
                user.replace_input_with(node, noisy)
        layers.append(NoiseLayer(node.name, noisy.name, noise.name, sigma, scale, tuple(int(d) for d in value.shape)))
        placeholders.append(noise)
    module.graph.lint()
    module.recompile()
    annotate(module)
    inputs = graph.inputs + tuple(tensor_spec(p) for p in placeholders)
    return replace(graph, module=module, inputs=inputs), anchor.name, layers


# ------------------------------------------------------------------------------- choosing sigma

# σ candidates for `--noise auto`, relative to each tensor's std: fine steps where accuracy usually
# starts to fall (0.1-2), coarse beyond.
SIGMA_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
# `--noise auto`'s default target: bias-corrected dCor between the input and what is sent. NoPeek-style
# defences report useful privacy from about 0.5 down; 1 is an invertible copy of the input.
LEAKAGE_SAMPLES = 128   # dCor is O(n^2) in memory and time; 128 samples resolve it to ~0.02


@dataclass(frozen=True)
class NoiseTrial:
    sigma: float
    leakage: float        # bias-corrected dCor(model input, what crosses), noise included
    accuracy: float       # top-1 on the calibration samples (against labels, or the clean model's answers)
    drop_points: float    # accuracy lost against the clean model, in percentage points

    def to_json(self) -> dict[str, float]:
        return dict(self.__dict__)


def noise_trial(graph: ModelGraph, cut_name: str, sigma: float, samples: Sequence[tuple[torch.Tensor, ...]],
                labels: np.ndarray | None, *, seed: int = 0) -> NoiseTrial:
    """Leakage and accuracy of the model with noise σ at the cut, measured with seeded noise."""
    noisy, _, layers = add_noise(graph, cut_name, sigma, samples)
    sent = [layer.noisy for layer in layers]
    capture = returning(noisy.module, sent)
    generator = torch.Generator().manual_seed(seed)
    clean_pred, noisy_pred, inputs, crossing = [], [], [], []
    with torch.no_grad():
        for i, sample in enumerate(samples):
            clean_pred.append(int(_first(graph.module(*sample)).argmax()))
            draws = tuple(torch.randn(layer.shape, generator=generator) for layer in layers)
            values = capture(*sample, *draws)
            noisy_pred.append(int(values[0].argmax()))
            if i < LEAKAGE_SAMPLES:
                inputs.append(np.concatenate([t.float().reshape(-1).numpy() for t in sample]))
                crossing.append(np.concatenate([v.float().reshape(-1).numpy() for v in values[1:]]))
    truth = np.asarray(labels) if labels is not None else np.asarray(clean_pred)
    clean = float((np.asarray(clean_pred) == truth).mean())
    accuracy = float((np.asarray(noisy_pred) == truth).mean())
    leakage = distance_correlation(np.stack(inputs), np.stack(crossing), bias_corrected=True)
    return NoiseTrial(float(sigma), float(leakage), accuracy, 100.0 * (clean - accuracy))


def choose_sigma(graph: ModelGraph, cut_name: str, samples, labels, *, max_leakage: float, max_drop_points: float,
                 grid: Sequence[float] = SIGMA_GRID) -> tuple[NoiseTrial, list[NoiseTrial]]:
    """`--noise auto`: the smallest σ on the grid whose leakage meets `max_leakage`; refused, with
    the figures, when that σ costs more than `max_drop_points` of accuracy (or none meets it)."""
    trials = []
    for sigma in grid:
        trial = noise_trial(graph, cut_name, sigma, samples, labels)
        trials.append(trial)
        if trial.leakage <= max_leakage:
            if trial.drop_points > max_drop_points:
                raise PlanError(
                    f"--noise auto: σ={sigma:g} is the least noise that brings leakage to {trial.leakage:.3f} ≤ {max_leakage:g}, "
                    f"but it costs {trial.drop_points:.1f} accuracy points (> --max-accuracy-drop {max_drop_points:g}); "
                    "cut deeper, or relax --max-leakage or --max-accuracy-drop")
            return trial, trials
    last = trials[-1]
    raise PlanError(f"--noise auto: even σ={last.sigma:g} leaves leakage {last.leakage:.3f} > --max-leakage {max_leakage:g}; cut deeper or relax it")


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class NoisePass:
    """Gaussian noise on what leaves the device: σ given, or the least σ meeting --max-leakage
    (`auto`), checked against the accuracy budget whenever there is real data to measure it on.
    Adds one graph input per noised tensor: the runtime draws it per request."""

    name = "noise"
    record_key = "noise"

    def applies(self, options: CompileOptions) -> bool:
        # A noise-aware defence trained the model for noise at the cut: the runtime must add it.
        return bool(options.noise) or options.defend == "noise-aware"

    def run(self, graph: ModelGraph, cuts: list[Cut], options: CompileOptions, context: PassContext) -> PassOutput:
        if not cuts:
            raise CutError("--noise defends what leaves the device, and this compile has no cut; add a target or drop --noise")
        data = context.data
        if not options.noise:   # σ is the one the noise-aware defence chose (passes/defend.py)
            options = replace(options, noise=context.results["defend"].record["strength"])
        sigma, choice = resolve_sigma(graph, cuts[0].after, options, data.calibration, data.labels, context.log)
        samples = context.statistics(graph)
        noisy, first_cut, layers = add_noise(graph, cuts[0].after, sigma, samples)
        # From here on every sample carries noise inputs too: seeded, so references are reproducible.
        generator = torch.Generator().manual_seed(2)
        noisy_samples = [sample + tuple(torch.randn(layer.shape, generator=generator) for layer in layers) for sample in samples]
        examples = None
        if data.examples is not None:
            examples = tuple(data.examples) + tuple(torch.zeros(layer.shape) for layer in layers)
        record = {"sigma": sigma, "layers": [layer.to_json() for layer in layers],
                  **agreement(graph, noisy, noisy_samples, extra_inputs=len(layers)), **(choice or {})}
        return PassOutput(noisy, [first_cut] + [c.after for c in cuts[1:]], record, result=layers,
                          examples=examples, statistics=noisy_samples)


def resolve_sigma(graph: ModelGraph, cut_after: str, options: CompileOptions, calibration, labels,
                  log=lambda _: None) -> tuple[float, dict | None]:
    """σ for the noise layers: `auto` searches for the least noise meeting `max_leakage`; a given σ
    is checked against the accuracy budget when there is real data to measure it on."""
    max_leakage, max_drop = options.max_leakage, options.max_accuracy_drop
    if options.noise == "auto":
        if not calibration:
            raise InputError("--noise auto measures leakage and accuracy on data: pass --calib data.npz (inputs, labels as y)")
        log(f"choosing noise: least σ with leakage (dCor) ≤ {max_leakage:g} on {len(calibration)} calibration samples")
        chosen, trials = choose_sigma(graph, cut_after, calibration, labels, max_leakage=max_leakage, max_drop_points=max_drop)
        return chosen.sigma, {"auto": {"max_leakage": max_leakage, "chosen": chosen.to_json(), "trials": [t.to_json() for t in trials]}}
    sigma = float(options.noise)
    if not calibration:
        return sigma, None
    trial = noise_trial(graph, cut_after, sigma, calibration, labels)
    if trial.drop_points > max_drop:
        raise PlanError(f"--noise {sigma:g} costs {trial.drop_points:.1f} accuracy points on the calibration data "
                        f"({100 * (trial.accuracy + trial.drop_points / 100):.1f}% → {100 * trial.accuracy:.1f}%), more than "
                        f"--max-accuracy-drop {max_drop:g}; lower σ, cut deeper, or raise the allowed drop")
    return sigma, {"measured": trial.to_json()}
