"""`--defend`: fine-tune the model so what crosses the cut resists inversion, within an accuracy budget.

Noise alone cannot make the first layers' activations private at an acceptable accuracy (the audit
shows it: σ=3 at the digits CNN's first conv brings re-identification to 0.07 for -51 points).
The published defences train instead; three are here, each fine-tuning the model on calibration
data (the device part learns what to send, the cloud part learns to read it):

* `nopeek` (Vepakomma et al., 2020): task loss + α · dCor(input, what crosses), the distance
  correlation taken on each minibatch (NoPeek's loss);
* `adversarial` (a jointly trained inverter, as in Li et al.'s ResSFL / Xiao et al.): per minibatch
  an inverter (a decoder from what crosses to the input: image pixels, or the token at each
  position) takes a step on its reconstruction loss, then the model one on task loss + λ ·
  max(0, floor - the inverter's loss), where the floor is the loss of the best guess made without the
  activation (the data mean; the token frequencies). Pushing the inverter only to the floor rather
  than maximising its loss keeps the model from learning a confidently wrong code that a fresh
  attacker would read as well as a right one;
* `noise-aware`: task loss with Gaussian noise of σ x each sample's std added to what crosses (as
  the runtime will, `--noise`), σ ramped in over the first epochs; the cloud part learns to read
  the noisy activations (the device part stays put: trained too, it diverged at the digits CNN's
  conv2). The defended model is compiled with that σ.

The strength (α, λ, or σ) is swept on a grid in increasing order, each from the original weights;
the strongest whose accuracy drop on held-out calibration samples stays within
`max_accuracy_drop` points is kept (the sweep stops at the first that costs more). Leakage of each
trial is the bias-corrected dCor between the inputs (one-hot ids for token inputs) and what crosses,
on the held-out samples. A `max_leakage` target that no trial within the budget meets is refused
with the figures (PlanError), as `--noise auto` refuses. Samples: a seeded split
(core/training.holdout_split), 30 % held out; the model's own answers stand in for missing labels.

The defended graph is the same fx graph with new weights: a re-export (torch.export of the tuned
GraphModule) would rename every node's module path, and the cut the user named (`conv1`,
`encoder.encoder.layer.0`) would no longer resolve; copying the tuned tensors into a copy of the
graph keeps every later pass unchanged. The manifest record holds the method, strength, accuracy
and dCor before/after, the sweep and the training time. The attacks themselves are not the defence's
business: `splitc audit --defend` trains fresh attackers on the defended model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from splitc.core.errors import CutError, InputError, PlanError, UnsupportedOperatorError
from splitc.core.graph import ModelGraph, returning
from splitc.core.training import FitResult, fit, holdout_split
from splitc.passes.contract import CompileOptions, PassContext, PassOutput
from splitc.passes.cuts import CutAnalysis
from splitc.passes.noise import data_carrying
from splitc.passes.privacy import distance_correlation

METHODS = ("nopeek", "adversarial", "noise-aware")
# Increasing strengths per method: α of the dCor term, λ of the inverter term, σ (x std) of the noise.
STRENGTHS = {
    "nopeek": (0.25, 0.5, 1.0, 2.0, 4.0),
    "adversarial": (0.25, 0.5, 1.0, 2.0, 4.0),
    "noise-aware": (0.5, 1.0, 2.0, 3.0, 5.0, 8.0),
}
HELD_OUT_SHARE = 0.3     # calibration samples that measure the accuracy budget and stop training early
MIN_SAMPLES = 40
EPOCHS = 60
PATIENCE = 10
RAMP_EPOCHS = 10
BATCH = 64


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class DefenceTrial:
    strength: float
    accuracy: float          # held-out top-1 of the defended model (with the noise, for noise-aware)
    drop_points: float       # against the undefended model without noise, in percentage points
    dcor: float              # bias-corrected dCor(input, what crosses) on the held-out samples
    fit: FitResult

    def to_json(self) -> dict[str, Any]:
        return {"strength": self.strength, "accuracy": round(self.accuracy, 6), "drop_points": round(self.drop_points, 4),
                "dcor": round(self.dcor, 6), "training": self.fit.to_json()}


@dataclass
class Defence:
    graph: ModelGraph
    record: dict[str, Any]
    trials: list[DefenceTrial] = field(default_factory=list)
    graphs: dict[float, ModelGraph] = field(default_factory=dict)   # every trial's model, when asked to keep them


# ------------------------------------------------------------------------------------------ the cut tap


class _Tap:
    """Inserted after each tensor that crosses the cut (training copy only): adds the noise of the
    noise-aware defence, σ x each sample's own std, drawn fresh on every call."""

    __name__ = "defence_tap"      # fx names a call_function node and its generated code after this

    def __init__(self):
        self.sigma = 0.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.sigma:
            return t
        return t + torch.randn_like(t) * (self.sigma * t.detach().std())


@dataclass
class _Trainee:
    """A training copy of the graph: returns (its outputs, *what crosses, after the tap)."""

    module: fx.GraphModule
    tap: _Tap
    sent: list[str]              # crossing tensors the defence acts on (data-carrying, floating)
    device_params: set[str]      # parameters only the device part reads
    vmap_ok: bool | None = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Batched (leading sample dim) forward: vmap over the batch-1 graph, a loop where vmap fails."""
        if self.vmap_ok is not False:
            try:
                out = torch.func.vmap(self.module, randomness="different")(*inputs)
                self.vmap_ok = True
                return tuple(out)
            except Exception:  # noqa: BLE001 - vmap refuses some ops with assorted errors; the loop is exact
                if self.vmap_ok:
                    raise
                self.vmap_ok = False
        outs = [self.module(*(x[i] for x in inputs)) for i in range(len(inputs[0]))]
        return tuple(torch.stack([o[k] for o in outs]) for k in range(len(outs[0])))


def _trainee(graph: ModelGraph, cut_after: str) -> _Trainee:
    module = copy.deepcopy(graph.module)
    analysis = CutAnalysis(ModelGraph(graph.name, module, graph.inputs, graph.outputs, graph.source_sha256, graph.source))
    position = analysis.resolve(cut_after, "--defend")
    carrying = data_carrying(module)
    crossing = [n for n in analysis.crossing_nodes(position) if n in carrying and n.meta["val"].is_floating_point()]
    if not crossing:
        raise CutError(f"nothing floating-point computed from the data crosses the cut after {cut_after}; there is nothing to defend")
    later = set(analysis.order[position + 1:]) | {n for n in module.graph.nodes if n.op == "output"}
    device_params = {n.target for n in module.graph.nodes
                     if n.op == "get_attr" and n.users and all(analysis.index.get(u, position + 1) <= position for u in n.users)}
    tap, tapped = _Tap(), []
    for node in crossing:
        with module.graph.inserting_after(node):
            sent = module.graph.call_function(tap, (node,))
        sent.name = f"{node.name}_sent"
        for user in list(node.users):
            if user in later:
                user.replace_input_with(node, sent)
        tapped.append(sent.name)
    module.recompile()
    module = returning(module, tapped)
    tap = next(n.target for n in module.graph.nodes if isinstance(n.target, _Tap))   # the copy's own tap
    return _Trainee(module, tap, tapped, device_params)


# ------------------------------------------------------------------------------------------ data


@dataclass
class _Data:
    inputs: list[torch.Tensor]       # (n, *spec.shape) per model input
    labels: torch.Tensor             # (n,) the task's labels, or the undefended model's answers
    attacked: int                    # index of the input an attacker wants: the image, or the token ids
    tokens: bool
    real: torch.Tensor | None        # (n, T) bool, real (unpadded) positions of token inputs
    vocab: torch.Tensor | None       # sorted token ids seen in the calibration data
    features: np.ndarray             # (n, d) the attacked input as dCor sees it (one-hot ids for tokens)


def _data(graph: ModelGraph, calibration, labels) -> _Data:
    inputs = _input_tensors(graph, calibration)
    floating = [k for k, s in enumerate(graph.inputs) if s.dtype.startswith("float") or s.dtype == "bfloat16"]
    integer = [k for k, s in enumerate(graph.inputs) if s.dtype in ("int64", "int32")]
    n = len(inputs[0])
    if floating:
        attacked, tokens, real, vocab = floating[0], False, None, None
        features = inputs[attacked].reshape(n, -1).double().numpy()
    elif integer:
        attacked, tokens = integer[0], True
        ids = inputs[attacked].reshape(n, -1)
        masks = [k for k in integer[1:] if inputs[k].shape == inputs[attacked].shape and bool(((inputs[k] == 0) | (inputs[k] == 1)).all())]
        real = inputs[masks[0]].reshape(n, -1).bool() if masks else torch.ones_like(ids, dtype=torch.bool)
        vocab = torch.unique(ids[real])
        features = _one_hot(ids, vocab)
    else:
        raise InputError(f"--defend needs a floating-point or token-id model input to protect; {graph.name} takes "
                         + ", ".join(f"{s.name} {s.dtype}" for s in graph.inputs))
    y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return _Data(inputs, y, attacked, tokens, real, vocab, features)


def _input_tensors(graph: ModelGraph, calibration) -> list[torch.Tensor]:
    """Calibration as one (n, *spec.shape) tensor per model input: from a privacy.Calibration (arrays)
    or a list of per-sample tuples (what compile passes around)."""
    arrays = getattr(calibration, "inputs", None)
    if arrays is not None:
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    return [torch.stack([sample[k] for sample in calibration]) for k in range(len(graph.inputs))]


def _one_hot(ids: torch.Tensor, vocab: torch.Tensor) -> np.ndarray:
    codes = torch.searchsorted(vocab, ids).clamp(max=len(vocab) - 1)
    codes = torch.where(vocab[codes] == ids, codes, len(vocab))   # one slot for ids outside the vocabulary (padding)
    return F.one_hot(codes, len(vocab) + 1).reshape(len(ids), -1).double().numpy()


# ------------------------------------------------------------------------------------------ losses


def _dcor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance correlation (V-statistic, NoPeek's form) of two (m, d) batches; differentiable."""
    def centred(x):
        d = torch.cdist(x, x) if x.shape[0] > 1 else x.new_zeros(1, 1)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    A, B = centred(a.double()), centred(b.double())
    dcov_ab, dcov_aa, dcov_bb = (A * B).mean(), (A * A).mean(), (B * B).mean()
    return (dcov_ab / (dcov_aa.sqrt() * dcov_bb.sqrt()).clamp_min(1e-12)).clamp_min(0).sqrt()


class _ImageInverter(nn.Module):
    """What crosses -> the image, standardised both ways (an MLP, as the audit's black-box attacker)."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, z):
        return self.net(z)


class _Adversary:
    """The inverter the adversarial defence trains against, its reconstruction loss and its floor."""

    def __init__(self, data: _Data, sent_dims: int, train: np.ndarray, seed: int):
        torch.manual_seed(seed)
        self.data = data
        if data.tokens:
            ids = data.inputs[data.attacked].reshape(len(data.inputs[0]), -1)
            self.classes = torch.searchsorted(data.vocab, ids).clamp(max=len(data.vocab) - 1)
            self.net = nn.Linear(sent_dims, len(data.vocab))
            counts = torch.bincount(self.classes[train][data.real[train]], minlength=len(data.vocab)).double()
            p = counts / counts.sum()
            self.floor = float(-(p[p > 0] * p[p > 0].log()).sum())          # cross-entropy of the token frequencies
        else:
            x = data.inputs[data.attacked].reshape(len(data.inputs[0]), -1).float()
            self.mean, self.scale = x[train].mean(0, keepdim=True), x[train].std().clamp_min(1e-6)
            self.target = (x - self.mean) / self.scale
            self.net = _ImageInverter(sent_dims, x.shape[1])
            self.floor = float(self.target[train].pow(2).mean())                # MSE of the data-mean image
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)

    def loss(self, sent: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.data.tokens:
            real = self.data.real[idx]
            per_token = sent.reshape(len(idx), real.shape[1], -1)[real]
            return F.cross_entropy(self.net(per_token), self.classes[idx][real])
        return F.mse_loss(self.net(sent.reshape(len(idx), -1)), self.target[idx])

    def step(self, sent: torch.Tensor, idx: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self.loss(sent.detach(), idx).backward()
        self.optimizer.step()


def _sent_flat(sent: Sequence[torch.Tensor], data: _Data, m: int) -> torch.Tensor:
    """What crosses, one row per sample; for token inputs one row per sample of (T x D)."""
    return torch.cat([t.reshape(m, -1).float() for t in sent], dim=1)


# ------------------------------------------------------------------------------------------ one trial


def _finetune(trainee: _Trainee, data: _Data, method: str, strength: float, train: np.ndarray, *, epochs: int, lr: float,
              seed: int, progress: bool | None) -> FitResult:
    module = trainee.module
    # Noise-aware trains the cloud part only: it learns to read the noisy activations of a device part that
    # stays put (with the device part training too, the noise moves under it and training diverged at conv2).
    frozen = trainee.device_params if method == "noise-aware" else set()
    params = [p for name, p in module.named_parameters() if p.is_floating_point() and name not in frozen]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    trainee.tap.sigma = strength if method == "noise-aware" else 0.0
    train_t = torch.from_numpy(train)
    adversary = None

    def forward(idx):
        out = trainee(*(x[idx] for x in data.inputs))
        logits = out[0].reshape(len(idx), -1)
        return F.cross_entropy(logits, data.labels[idx]), _sent_flat(out[1:], data, len(idx))

    def privacy(idx, sent):
        if method == "nopeek":
            x = torch.from_numpy(data.features[idx.numpy()])
            return strength * _dcor(x, sent).float()
        if method == "adversarial":
            return strength * F.relu(adversary.floor - adversary.loss(sent, idx))
        return sent.new_zeros(())

    def objective(local):
        idx = train_t[local]
        task, sent = forward(idx)
        return task + privacy(idx, sent)

    if method == "adversarial":
        with torch.no_grad():
            _, sent0 = forward(train_t[:2])
        adversary = _Adversary(data, sent0.shape[1] // (data.real.shape[1] if data.tokens else 1), train, seed)

    steps = {"done": 0, "ramp": RAMP_EPOCHS * math.ceil(len(train) * 0.8 / BATCH)}

    def step(local):
        idx = train_t[local]
        if method == "noise-aware":
            # σ ramps up over the first epochs: at full noise from the start the task loss jumps and
            # the first steps wreck what the model knew (the sweep's σ=2 at conv2 fell to 63 %).
            steps["done"] += 1
            trainee.tap.sigma = strength * min(1.0, steps["done"] / steps["ramp"])
        if adversary is not None:
            with torch.no_grad():
                _, sent = forward(idx)
            adversary.step(sent, idx)
        optimizer.zero_grad()
        task, sent = forward(idx)
        loss = task + privacy(idx, sent)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    torch.manual_seed(seed)
    modules = [module] + ([adversary.net] if adversary is not None else [])
    def held_loss(local):
        trainee.tap.sigma = strength if method == "noise-aware" else 0.0
        with torch.random.fork_rng():   # the same noise draws every epoch: epochs compare on equal terms
            torch.manual_seed(seed + 1)
            return float(objective(local))

    # The adversarial objective moves with its inverter (a stronger inverter raises it), so its held-out
    # value says nothing about which epoch is best: that method trains every epoch, the others stop early.
    held_share = 0.0 if method == "adversarial" else 0.2
    result = fit(modules, len(train), step=step, held_loss=held_loss, epochs=epochs, batch=BATCH,
                 seed=seed, held_share=held_share, patience=PATIENCE, progress=progress, description=f"defence {method} {strength:g}")
    for p in params:
        p.requires_grad_(False)
    return result


def _measure(trainee: _Trainee, data: _Data, held: np.ndarray, sigma: float, seed: int) -> tuple[float, float, np.ndarray]:
    """(held-out top-1, bias-corrected dCor of input vs what crosses, predictions), noise σ at the cut (seeded)."""
    trainee.tap.sigma = sigma
    torch.manual_seed(seed)
    idx = torch.from_numpy(held)
    with torch.no_grad():
        outs = [trainee(*(x[chunk] for x in data.inputs)) for chunk in idx.split(256)]
    logits = torch.cat([o[0].reshape(len(o[0]), -1) for o in outs])
    sent = torch.cat([_sent_flat(o[1:], data, len(o[0])) for o in outs])
    predictions = logits.argmax(1)
    accuracy = float((predictions == data.labels[idx]).double().mean())
    pick = held[: min(len(held), 256)]
    dcor = distance_correlation(data.features[pick], sent[: len(pick)].double().numpy(), bias_corrected=True)
    trainee.tap.sigma = 0.0
    return accuracy, float(dcor), predictions.numpy()


def _apply(graph: ModelGraph, trainee: _Trainee) -> ModelGraph:
    """A copy of `graph` carrying the trainee's weights (same nodes, so every name still resolves)."""
    module = copy.deepcopy(graph.module)
    tuned = dict(trainee.module.named_parameters())
    tuned.update(trainee.module.named_buffers())
    with torch.no_grad():
        for name, value in list(module.named_parameters()) + list(module.named_buffers()):
            if name in tuned:
                value.copy_(tuned[name])
    return ModelGraph(graph.name, module, graph.inputs, graph.outputs, graph.source_sha256, graph.source)


# ------------------------------------------------------------------------------------------ the defence


def defend(graph: ModelGraph, cut_after: str, method: str, calibration, labels=None, max_accuracy_drop: float = 1.0, *,
           max_leakage: float | None = None, strengths: Sequence[float] | None = None, epochs: int = EPOCHS,
           lr: float | None = None, seed: int = 0, keep_graphs: bool = False, progress: bool | None = None) -> Defence:
    """Fine-tune `graph` against inversion at the cut after `cut_after`; see the module docstring.

    `calibration`: a passes.privacy.Calibration, or a list of per-sample input tuples with `labels`
    ((n,) ints, or None: the model's own answers). Returns a Defence: the defended graph, the
    manifest record, every trial (and, with `keep_graphs`, every trial's graph, for accuracy-leakage
    curves). InputError on bad data, PlanError when no strength meets the budget or `max_leakage`.
    """
    if method not in METHODS:
        raise InputError(f"--defend {method!r} is not a defence; choose one of {', '.join(METHODS)}")
    if calibration is None or len(calibration) == 0:
        raise InputError(f"--defend {method} fine-tunes the model on data: pass --calib data.npz (inputs, labels as y)")
    if not (isinstance(max_accuracy_drop, (int, float)) and max_accuracy_drop >= 0):
        raise InputError(f"--max-accuracy-drop {max_accuracy_drop} must be >= 0 (percentage points)")
    if len(graph.outputs) != 1 or len(graph.outputs[0].shape) != 2 or graph.outputs[0].shape[0] != 1 or graph.outputs[0].shape[1] < 2:
        raise UnsupportedOperatorError(f"--defend keeps a classifier's accuracy: it needs one output of class scores (1, C); "
                                       f"{graph.name} returns " + ", ".join(f"{t.name} {list(t.shape)}" for t in graph.outputs))
    if labels is None and hasattr(calibration, "labels"):
        labels = calibration.labels
    started = time.perf_counter()
    trainee = _trainee(graph, cut_after)
    data = _data(graph, calibration, labels)
    n = len(data.inputs[0])
    if n < MIN_SAMPLES:
        raise InputError(f"--defend needs at least {MIN_SAMPLES} calibration samples (30% are held out to check accuracy), got {n}")
    train, held = holdout_split(n, HELD_OUT_SHARE, seed)
    original = copy.deepcopy(trainee.module.state_dict())
    label_source = "labels"
    if data.labels is None:
        data.labels = torch.zeros(n, dtype=torch.long)
        data.labels = torch.from_numpy(_measure(trainee, data, np.arange(n), 0.0, seed)[2])
        label_source = "the undefended model's answers (no labels given)"
    classes = graph.outputs[0].shape[1]
    if int(data.labels.min()) < 0 or int(data.labels.max()) >= classes:
        raise InputError(f"calibration labels span {int(data.labels.min())}..{int(data.labels.max())} but {graph.name} has {classes} classes")
    accuracy_before, dcor_before, _ = _measure(trainee, data, held, 0.0, seed)
    if lr is None:
        # Pretrained transformers drift away from what they know at the small CNNs' rate.
        lr = 1e-3 if sum(p.numel() for p in trainee.module.parameters()) < 2_000_000 else 3e-5

    trials: list[DefenceTrial] = []
    graphs: dict[float, ModelGraph] = {}
    chosen = None
    for strength in (strengths or STRENGTHS[method]):
        trainee.module.load_state_dict(original)
        result = _finetune(trainee, data, method, float(strength), train, epochs=epochs, lr=lr, seed=seed, progress=progress)
        sigma = float(strength) if method == "noise-aware" else 0.0
        accuracy, dcor, _ = _measure(trainee, data, held, sigma, seed)
        trial = DefenceTrial(float(strength), accuracy, 100.0 * (accuracy_before - accuracy), dcor, result)
        trials.append(trial)
        if keep_graphs:
            graphs[trial.strength] = _apply(graph, trainee)
        if trial.drop_points > max_accuracy_drop:
            break
        chosen = (trial, copy.deepcopy(trainee.module.state_dict()))
    seconds = time.perf_counter() - started
    figures = "; ".join(f"{method} {t.strength:g}: dCor {t.dcor:.3f}, -{t.drop_points:.1f} points" for t in trials)
    if chosen is None:
        first = trials[0]
        raise PlanError(f"--defend {method}: even the weakest strength {first.strength:g} costs {first.drop_points:.1f} accuracy points "
                        f"(> --max-accuracy-drop {max_accuracy_drop:g}) on {len(held)} held-out samples; relax the budget or cut deeper")
    within = [t for t in trials if t.drop_points <= max_accuracy_drop]
    if max_leakage is not None and not any(t.dcor <= max_leakage for t in within):
        best = min(within, key=lambda t: t.dcor)
        raise PlanError(f"--defend {method}: no strength brings leakage (dCor) to {max_leakage:g} within {max_accuracy_drop:g} accuracy "
                        f"points; best found {method} {best.strength:g}: dCor {best.dcor:.3f} for -{best.drop_points:.1f} points "
                        f"(dCor {dcor_before:.3f} undefended; tried {figures}); cut deeper, or relax --max-leakage or --max-accuracy-drop")
    trial, state = chosen
    trainee.module.load_state_dict(state)
    defended = _apply(graph, trainee)
    record = {
        "method": method, "strength": trial.strength,
        "strength_meaning": {"nopeek": "alpha: weight of dCor(input, sent)", "adversarial": "lambda: weight of the inverter term",
                             "noise-aware": "sigma: noise std / sent tensor std"}[method],
        "cut": cut_after, "accuracy_before": round(accuracy_before, 6), "accuracy_after": round(trial.accuracy, 6),
        "drop_points": round(trial.drop_points, 4), "max_accuracy_drop": max_accuracy_drop,
        "dcor_before": round(dcor_before, 6), "dcor_after": round(trial.dcor, 6),
        **({"max_leakage": max_leakage} if max_leakage is not None else {}),
        "labels": label_source, "train_samples": int(len(train)), "held_out_samples": int(len(held)),
        "learning_rate": lr, "training_seconds": round(seconds, 3), "trials": [t.to_json() for t in trials],
    }
    return Defence(defended, record, trials, graphs)


class DefendPass:
    """The defence as a compile pass (passes/pipeline.py, after exit heads, before noise): `--defend METHOD`
    fine-tunes the graph on --calib; the cuts are unchanged (same nodes); the record goes to the manifest's
    plan under "defence". noise-aware trains at a given --noise σ, or sweeps σ and leaves it to the noise pass."""

    name = "defend"
    record_key = "defence"

    def applies(self, options: CompileOptions) -> bool:
        return bool(options.defend)

    def run(self, graph: ModelGraph, cuts, options: CompileOptions, context: PassContext) -> PassOutput:
        if not cuts:
            raise CutError("--defend protects what leaves the device, and this compile has no cut; add a target or drop --defend")
        data = context.data
        if not data.calibration:
            raise InputError(f"--defend {options.defend} fine-tunes the model on data: pass --calib data.npz (inputs, labels as y)")
        context.log(f"defending the cut after {cuts[0].after} ({options.defend}) on {len(data.calibration)} calibration samples")
        result = defend(graph, cuts[0].after, options.defend, data.calibration, data.labels, options.max_accuracy_drop,
                        strengths=_given_sigma(options))
        return PassOutput(result.graph, [c.after for c in cuts], result.record, result=result)


def _given_sigma(options: CompileOptions) -> list[float] | None:
    """noise-aware with a given --noise σ trains at that σ only (pairs with the noise the runtime adds)."""
    if options.defend == "noise-aware" and options.noise not in (None, "auto"):
        return [float(options.noise)]
    return None
