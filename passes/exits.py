"""Early-exit heads: small classifiers that end inference on the tier that computes them.

BranchyNet / Edgent / SPINN put an internal classifier at the split so a confident input never pays
for the network or the cloud. Here, per exit point:

1. features: the activation at the exit point on every calibration sample (the backbone runs once;
   it is frozen by construction, since only the head's parameters are trained);
2. a head fitted to it: feature maps (N, C, H, W) -> average pool (global, or to a 2x2 grid, whichever
   does better on held-out data) -> linear; token sequences
   (N, T, D) -> first token or mean over tokens (whichever does better on held-out data) -> layer
   norm -> linear; vectors (N, D) -> linear;
3. a confidence threshold (softmax maximum) per head, calibrated on held-out samples in graph order:
   each head takes the lowest threshold at which the cascade's accuracy drop against the final
   classifier, plus one standard error, stays within `max_drop_points` — for that threshold and
   every higher one — given the thresholds of the heads before it;
4. heads that answer nothing at their threshold are not inserted (they would only cost time);
5. the kept heads are emitted as core-ATen nodes right after their exit point, their logits as extra
   graph outputs tagged EXIT (an output that never crosses a cut).

Labels come with the calibration data; without them the heads learn the final classifier's own
answers (self-distillation) and the accuracy budget is agreement with it. Graph in, graph out.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from splitc.frontend.annotate import annotate
from splitc.passes.contract import CompileOptions, PassContext, PassOutput
from splitc.passes.cuts import Cut, CutAnalysis
from splitc.passes.quantize import add_constant, emit
from torch import fx

from splitc.core.errors import CutError, InputError, UnsupportedOperatorError
from splitc.core.graph import EXIT, ModelGraph, returning
from splitc.core.training import fit, holdout_split

aten = torch.ops.aten

HELD_OUT_SHARE = 0.5     # calibration samples kept aside to set thresholds and measure exit rates
MIN_SAMPLES = 20         # fewer cannot calibrate a threshold meaningfully
TRAIN_EPOCHS = 60


@dataclass(frozen=True)
class ExitHead:
    index: int
    at: str                  # the node whose output the head reads
    output: str              # the head's logits node: an extra graph output
    kind: str                # pool-linear | pool2x2-linear | first-token-norm-linear | mean-token-norm-linear | linear
    threshold: float | None  # softmax confidence at which the head answers; None: it never does
    exit_rate: float         # share of held-out inputs it answered (given the heads before it)
    accuracy: float          # its own top-1 accuracy on all held-out inputs
    params: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ExitPlan:
    heads: list[ExitHead]
    report: dict[str, Any] = field(default_factory=dict)
    cut_renames: dict[str, str] = field(default_factory=dict)  # exit point -> last node of its head


def classifier_output(graph: ModelGraph) -> int:
    """Index of the output exits stand in for: the model's single output, class logits (1, C)."""
    if len(graph.outputs) != 1:
        names = ", ".join(t.name for t in graph.outputs)
        raise UnsupportedOperatorError(
            f"exit heads need a model with one output (class logits); {graph.name} returns {len(graph.outputs)} ({names})")
    spec = graph.outputs[0]
    if len(spec.shape) != 2 or spec.shape[0] != 1 or spec.shape[1] < 2 or not spec.dtype.startswith("float"):
        raise UnsupportedOperatorError(
            f"exit heads need class logits of shape (1, C) as the output; {graph.name} returns {spec.dtype}{list(spec.shape)}")
    return 0


def plan_exits(graph: ModelGraph, points: Sequence[str], samples: Sequence[tuple[torch.Tensor, ...]],
               labels: np.ndarray | None, max_drop_points: float, *, seed: int = 0,
               analysis: CutAnalysis | None = None) -> tuple[ModelGraph, ExitPlan]:
    """Train, calibrate and insert one exit head per point (node names or module paths)."""
    classifier_output(graph)
    if not points:
        raise CutError("--exits names no exit point; give node names or module paths, or 'auto'")
    if max_drop_points < 0:
        raise InputError(f"--max-accuracy-drop {max_drop_points} must be >= 0 (percentage points)")
    n = len(samples)
    if n < MIN_SAMPLES:
        raise InputError(f"exit heads need at least {MIN_SAMPLES} calibration samples to train and calibrate, got {n}; pass a larger --calib")
    if labels is not None and len(labels) != n:
        raise InputError(f"calibration has {n} samples but {len(labels)} labels; give one label per sample")

    analysis = analysis or CutAnalysis(graph)
    nodes = [analysis.order[analysis.resolve(p, "--exits")] for p in points]
    for point, node in zip(points, nodes):
        if node.op != "call_function" or not node.meta["val"].is_floating_point():
            raise CutError(f"--exits {point!r} is not a floating-point activation; name an operator node (`splitc inspect` lists them)")
    if len({node.name for node in nodes}) != len(nodes):
        raise CutError(f"--exits {','.join(points)} names the same node twice")
    nodes.sort(key=analysis.index.__getitem__)

    features, final = _features(graph, nodes, samples)
    classes = final.shape[1]
    final_pred = final.argmax(1)
    source = "labels"
    if labels is None:
        labels, source = final_pred.copy(), "final classifier (no labels given: self-distillation)"
    elif labels.min() < 0 or labels.max() >= classes:
        raise InputError(f"calibration labels span {labels.min()}..{labels.max()} but {graph.name} has {classes} classes; labels must be 0..{classes - 1}")

    train, held = holdout_split(n, HELD_OUT_SHARE, seed)
    fitted = [_fit_head(features[node.name], labels, train, held, classes, seed) for node in nodes]
    probabilities = [_softmax(f.logits[held]) for f in fitted]
    thresholds, rates = calibrate_thresholds(probabilities, final_pred[held], labels[held], max_drop_points)
    cascade = cascade_predictions(probabilities, final_pred[held], thresholds)

    heads, module = [], copy.deepcopy(graph.module)
    current = replace(graph, module=module)
    renames = {}
    for node, head_fit, threshold, rate in zip(nodes, fitted, thresholds, rates):
        index = len(heads)
        head = ExitHead(index=index, at=node.name, output=f"exit{index}_logits", kind=head_fit.kind,
                        threshold=None if threshold is None else float(threshold), exit_rate=float(rate),
                        accuracy=float((head_fit.logits[held].argmax(1) == labels[held]).mean()), params=head_fit.params)
        if threshold is None:
            continue
        renames[node.name] = _insert_head(module, node.name, head_fit, head.output, index)
        heads.append(head)
    module.graph.lint()
    module.recompile()
    annotate(module)
    final_acc = float((final_pred[held] == labels[held]).mean())
    report = {
        "labels": source,
        "held_out": len(held),
        "trained_on": len(train),
        "max_accuracy_drop_points": float(max_drop_points),
        "final_accuracy": final_acc,
        "accuracy_with_exits": float((cascade == labels[held]).mean()),
        "exit_rate": float(sum(rates)),
        "candidates": [
            {"at": node.name, "kind": head_fit.kind, "accuracy": float((head_fit.logits[held].argmax(1) == labels[held]).mean()),
             "threshold": None if t is None else float(t), "exit_rate": float(r)}
            for node, head_fit, t, r in zip(nodes, fitted, thresholds, rates)
        ],
    }
    return current, ExitPlan(heads, report, renames)


# ------------------------------------------------------------------------------------ thresholds


def cascade_predictions(probabilities: Sequence[np.ndarray], final_pred: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """What the cascade answers per sample: the first head whose confidence reaches its threshold."""
    answer = final_pred.copy()
    open_ = np.ones(len(final_pred), dtype=bool)
    for probs, threshold in zip(probabilities, thresholds):
        if threshold is None:
            continue
        fires = open_ & (probs.max(1) >= threshold)
        answer[fires] = probs.argmax(1)[fires]
        open_ &= ~fires
    return answer


def calibrate_thresholds(probabilities: Sequence[np.ndarray], final_pred: np.ndarray, labels: np.ndarray,
                         max_drop_points: float) -> tuple[list[float | None], list[float]]:
    """Per head in graph order, the lowest confidence threshold that keeps the cascade's accuracy
    within the budget (earlier heads take the budget first: they save the most work). Returns the
    thresholds (None: the head never answers) and each head's exit rate on these samples."""
    budget = max_drop_points / 100.0
    final_correct = (final_pred == labels).astype(np.float64)
    thresholds: list[float | None] = []
    rates = []
    for k, probs in enumerate(probabilities):
        best = None
        # Candidates: every confidence seen, highest first. The drop is measured on a finite sample,
        # so two guards against picking a threshold that only looks good by luck: the drop plus one
        # standard error of it must stay within budget, and so must every higher threshold (the
        # scan stops at the first that fails instead of skipping to an isolated lucky one).
        for threshold in np.unique(probs.max(1))[::-1]:
            trial = thresholds + [float(threshold)]
            diff = final_correct - (cascade_predictions(probabilities[: k + 1], final_pred, trial) == labels)
            drop = diff.mean() + diff.std() / np.sqrt(len(diff))
            if drop > budget + 1e-12:
                break
            best = float(threshold)
        thresholds.append(best)
        answered_before = _answered(probabilities[:k], thresholds[:k], len(final_pred))
        rate = 0.0 if best is None else float((~answered_before & (probs.max(1) >= best)).mean())
        rates.append(rate)
    return thresholds, rates


def _answered(probabilities: Sequence[np.ndarray], thresholds: Sequence[float | None], n: int) -> np.ndarray:
    done = np.zeros(n, dtype=bool)
    for probs, threshold in zip(probabilities, thresholds):
        if threshold is not None:
            done |= probs.max(1) >= threshold
    return done


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------------- heads


@dataclass
class _Fitted:
    kind: str
    weights: dict[str, torch.Tensor]   # linear weight (C, D), bias (C,); norm weight, bias (D,)
    logits: np.ndarray                 # (n, C) on every calibration sample
    params: int


def _features(graph: ModelGraph, nodes: Sequence[fx.Node], samples) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Each exit point's activation and the final logits on every sample (batch 1, as exported)."""
    module = returning(graph.module, [n.name for n in nodes])
    collected: list[list[torch.Tensor]] = [[] for _ in range(len(nodes) + 1)]
    with torch.no_grad():
        for sample in samples:
            for bucket, value in zip(collected, module(*sample)):
                bucket.append(value.detach().float()[0])
    final = torch.stack(collected[0]).numpy()
    return {node.name: torch.stack(values) for node, values in zip(nodes, collected[1:])}, final


class _Head(torch.nn.Module):
    def __init__(self, kind: str, width: int, classes: int):
        super().__init__()
        self.kind = kind
        self.norm = torch.nn.LayerNorm(width) if "token" in kind else None
        self.linear = torch.nn.Linear(width, classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pool-linear":
            return x.mean(dim=(-2, -1))
        if self.kind == "pool2x2-linear":
            return torch.nn.functional.avg_pool2d(x, (x.shape[-2] // 2, x.shape[-1] // 2)).flatten(1)
        if self.kind == "first-token-norm-linear":
            return x[:, 0]
        if self.kind == "mean-token-norm-linear":
            return x.mean(dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pooled(x)
        return self.linear(self.norm(x) if self.norm is not None else x)


def _kinds(shape: torch.Size) -> list[str]:
    if len(shape) == 4:
        # Global pooling keeps only "what"; a 2x2 grid also keeps a coarse "where", which shallow
        # features need (their channels alone rarely separate the classes).
        return ["pool-linear"] + (["pool2x2-linear"] if shape[-2] % 2 == 0 and shape[-1] % 2 == 0 and shape[-2] >= 2 else [])
    if len(shape) == 3:
        return ["first-token-norm-linear", "mean-token-norm-linear"]
    if len(shape) == 2:
        return ["linear"]
    raise UnsupportedOperatorError(
        f"no exit head for an activation of shape (1, {', '.join(map(str, shape[1:]))}); exits take feature maps "
        "(1, C, H, W), token sequences (1, T, D) or vectors (1, D)")


def _fit_head(features: torch.Tensor, labels: np.ndarray, train: np.ndarray, held: np.ndarray, classes: int, seed: int) -> _Fitted:
    best = None
    target = torch.from_numpy(labels).long()
    for kind in _kinds(features.shape):
        width = {"pool-linear": features.shape[1], "pool2x2-linear": 4 * features.shape[1]}.get(kind, features.shape[-1])
        torch.manual_seed(seed)
        head = _Head(kind, width, classes)
        _train(head, features[train], target[train])
        with torch.no_grad():
            logits = head(features).numpy()
        accuracy = float((logits[held].argmax(1) == labels[held]).mean())
        if best is None or accuracy > best[0]:
            weights = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best = (accuracy, _Fitted(kind, weights, logits, sum(p.numel() for p in head.parameters())))
    return best[1]


def _train(head: _Head, x: torch.Tensor, y: torch.Tensor, epochs: int = TRAIN_EPOCHS, batch: int = 64) -> None:
    # Standardising the pooled features makes one learning rate work for every depth of the backbone;
    # the scaling is folded into the linear layer afterwards, so the emitted head has no extra ops.
    with torch.no_grad():
        pooled = head.pooled(x)
        mean = pooled.mean(0) if head.norm is None else torch.zeros(pooled.shape[1])
        std = pooled.std(0).clamp_min(1e-6) if head.norm is None else torch.ones(pooled.shape[1])
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        features = (head.pooled(x[idx]) - mean) / std
        logits = head.linear(head.norm(features) if head.norm is not None else features)
        return torch.nn.functional.cross_entropy(logits, y[idx])

    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    fit(head, len(x), optimizer=optimizer, loss_of=loss_of, epochs=epochs, batch=batch, seed=0, held_share=0.1, patience=10,
        description="exit head")
    with torch.no_grad():
        if head.norm is None:  # W((x - m) / s) + b == (W / s) x + (b - W (m / s))
            weight = head.linear.weight / std
            head.linear.bias -= weight @ mean
            head.linear.weight.copy_(weight)


def _insert_head(module: fx.GraphModule, at: str, fit: _Fitted, output_name: str, index: int) -> str:
    """Emit the fitted head as core-ATen nodes right after `at`; return its logits node's name."""
    graph = module.graph
    node = next(n for n in graph.nodes if n.name == at)

    def constant(name: str, value: torch.Tensor, anchor: fx.Node) -> fx.Node:
        return add_constant(module, f"exit{index}_{name}", value, anchor)

    x, anchor = node, node
    if fit.kind == "pool-linear":
        x = anchor = emit(graph, anchor, aten.mean.dim, x, [-1, -2])
    elif fit.kind == "pool2x2-linear":
        window = [int(d) // 2 for d in node.meta["val"].shape[-2:]]
        x = anchor = emit(graph, anchor, aten.avg_pool2d.default, x, window, window)
        x = anchor = emit(graph, anchor, aten.view.default, x, [1, -1])
    elif fit.kind == "first-token-norm-linear":
        x = anchor = emit(graph, anchor, aten.select.int, x, 1, 0)
    elif fit.kind == "mean-token-norm-linear":
        x = anchor = emit(graph, anchor, aten.mean.dim, x, [1])
    if "norm" in fit.kind:
        gamma = constant("norm_weight", fit.weights["norm.weight"], anchor)
        beta = constant("norm_bias", fit.weights["norm.bias"], gamma)
        width = int(fit.weights["norm.weight"].shape[0])
        normed = emit(graph, beta, aten.native_layer_norm.default, x, [width], gamma, beta, 1e-5)
        x = anchor = emit(graph, normed, operator.getitem, normed, 0)
    weight_t = constant("weight_t", fit.weights["linear.weight"].t(), anchor)
    bias = constant("bias", fit.weights["linear.bias"], weight_t)
    logits = emit(graph, bias, aten.addmm.default, bias, x, weight_t, name=output_name)
    logits.meta[EXIT] = index
    output = next(n for n in graph.nodes if n.op == "output")
    returned = tuple(output.args[0]) if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (returned + (logits,),)
    return logits.name


class ExitsPass:
    """Early-exit heads (`--exits`), trained and calibrated on the calibration data; the cut that
    falls at an exit point moves to the end of its head, so the head runs on the earlier tier."""

    name = "exits"
    record_key = "exits"

    def applies(self, options: CompileOptions) -> bool:
        return bool(options.exits)

    def run(self, graph: ModelGraph, cuts: list[Cut], options: CompileOptions, context: PassContext) -> PassOutput:
        data = context.data
        if not data.calibration:
            raise InputError("--exits trains exit heads on data: pass --calib data.npz with inputs and labels (y)")
        if data.labels is None:
            context.notes.append("the calibration data has no labels: exit heads learned the final classifier's answers, "
                                 "and the accuracy budget is agreement with it")
        points = exit_points(options.exits, cuts)
        context.log(f"training exit heads at {', '.join(points)} on {len(data.calibration)} calibration samples")
        headed, plan = plan_exits(graph, points, data.calibration, data.labels, options.max_accuracy_drop,
                                  analysis=context.analysis(graph))
        if not plan.heads:
            context.notes.append(f"no exit head answers any input within a {options.max_accuracy_drop:g}-point accuracy drop; none was inserted")
        return PassOutput(headed, [plan.cut_renames.get(c.after, c.after) for c in cuts], plan.report, result=plan)


def exit_points(exits: Sequence[str] | str, cuts: Sequence[Cut]) -> list[str]:
    """`--exits auto`: one head at every cut (on the tier before it); else the named points."""
    names = [exits] if isinstance(exits, str) else list(exits)
    if names == ["auto"]:
        if not cuts:
            raise CutError("--exits auto puts a head at each cut, and this compile has none; name exit points or add a target")
        return [c.after for c in cuts]
    if "auto" in names:
        raise CutError("--exits takes 'auto' or node names / module paths, not both")
    return names
