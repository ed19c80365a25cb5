"""Attack-based privacy audit of what a device sends at a cut (`splitc audit`).

The planner's attack-free score (dCor, passes/privacy.py) is a weak proxy on its own (../shared/
DESIGN.md, "Privacy audit"): this module measures what an attacker actually recovers from the tensors
that cross a cut, on calibration data, next to the floors an attacker gets without them.

Per cut and setting (the sent tensors as they are, or after a caller's `transform`: noise, quantise):

* Learned inverse network (He et al., ACSAC 2019, black-box): the calibration set is split (seeded,
  50/50) into the attacker's auxiliary set and a held-out set; a small decoder (an MLP, or an
  upsampling conv decoder for large spatial activations of image inputs) is trained on the auxiliary
  set to map sent tensors to inputs, and evaluated on the held-out set: MSE, PSNR, SSIM, and top-1
  re-identification (is the held-out original nearest to a reconstruction the true one; chance 1/N).
  Each next to floors: the data-mean image, and the class-mean image (this one uses labels an attacker
  may not have; it is the stronger floor).
* White-box optimisation (regularised MLE with total variation): with the device part public, find x
  minimising ||f(x) - sent||² / ||sent||² + λ·TV(x) from the data-mean image (Adam, bounded steps,
  box-constrained to the data range), on a subset of held-out inputs; same metrics.
* dFIL (Maeng et al. 2022): tr(Jᵀ J / σ²) / d_in for Gaussian noise of std σ on each sent tensor,
  averaged over samples; exact Jacobian for small inputs, Hutchinson (jvp with Gaussian probes)
  otherwise. σ comes from the transform when it declares one (`noise_std(t)`, as GaussianNoise does);
  otherwise DEFAULT_DFIL_SIGMA x the tensor's std is assumed and the report says so.
* dCor (bias-corrected) between inputs and sent tensors; top-1 accuracy of the whole model with the
  transform applied at the cut, next to the plain accuracy (with labels).

The device part is the first of two partitions of the graph (assign_tiers + extract_partitions), so
the audit attacks exactly the function a device artifact computes. Exported graphs are specialised to
their batch size: samples are batched with torch.func.vmap (checked against a direct call on the
first sample; a per-sample loop is the fallback).

Limits: one floating-point model input (what is reconstructed); images are (..., H, W) with the leading
dims taken as channels; SSIM needs H, W >= 3. Token-id inputs: drivers/audit_text.py (token recovery).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitc.core.errors import CutError, InputError
from splitc.core.graph import ModelGraph
from splitc.passes.cuts import Cut, CutAnalysis
from splitc.passes.partition import assign_tiers, extract_partitions
from splitc.passes.privacy import (
    Calibration,
    check_calibration,
    distance_correlation,
    sample_indices,
)
from splitc.core.manifest import TensorSpec
from splitc.core.training import fit, holdout_split
from splitc.targets import Target

SCHEMA = "splitc.drivers.audit/1"
MIN_AUDIT_SAMPLES = 20          # 10 auxiliary + 10 held-out at least; meaningful figures need hundreds
DEFAULT_DFIL_SIGMA = 0.1        # assumed noise std, relative to the sent tensor's std, when none is known
# The attacker early-stops on a tenth of its auxiliary set (core/training.py), as a careful one would.
INVERSE_HELD_SHARE = 0.1
INVERSE_PATIENCE = 15
CLASS_MEAN_NOTE = "class-mean floor uses labels an attacker may not have"

Transform = Callable[[torch.Tensor], torch.Tensor]

# Partitions need a Target; the audit runs both in torch on this host, so nothing of it is used.
_AUDIT_HOST = Target(name="audit-host", description="torch on the auditing host", tier="edge", arch="host",
                     sustained_gflops=1.0, memory_bandwidth_gbs=1.0, memory_gb=1.0, backend="torch")


# --------------------------------------------------------------------------------------- transforms


class GaussianNoise:
    """A transform adding N(0, s²) noise, s = sigma x std(tensor) (relative) or sigma (absolute).

    Applied per sample (per request), so relative noise follows each sent tensor's own scale. Seeded:
    the same instance gives the same draws in the same order. Exposes `noise_std(t)` for dFIL.
    passes/noise.py (the compiled noise layer) scales by the std over calibration samples instead; to
    audit exactly that layer pass GaussianNoise(layer.scale, relative=False) per cut.
    """

    def __init__(self, sigma: float, *, relative: bool = True, seed: int = 0):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise InputError(f"noise sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.relative = relative
        self.generator = torch.Generator().manual_seed(seed)

    def noise_std(self, t: torch.Tensor) -> float:
        return self.sigma * float(t.detach().double().std()) if self.relative else self.sigma

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return t + torch.randn(t.shape, generator=self.generator, dtype=torch.float64).to(t.dtype) * self.noise_std(t)

    def __repr__(self) -> str:
        return f"GaussianNoise({self.sigma:g}{' x std' if self.relative else ''})"


# --------------------------------------------------------------------------------------- results


@dataclass
class AttackReport:
    mse: float
    psnr: float
    ssim: float
    floors: dict[str, dict[str, float]]   # "data_mean" and, with labels, "class_mean": {mse, psnr, ssim}
    reid_top1: float
    reid_chance: float
    seconds: float
    samples: int = 0                      # held-out inputs attacked

    def to_json(self) -> dict:
        return {
            "mse": json_number(self.mse), "psnr": json_number(self.psnr), "ssim": json_number(self.ssim),
            "reid_top1": json_number(self.reid_top1), "reid_chance": json_number(self.reid_chance),
            "floors": {k: {m: json_number(v) for m, v in f.items()} for k, f in self.floors.items()},
            "samples": self.samples, "seconds": round(self.seconds, 3),
        }


@dataclass
class CutAudit:
    cut: str                              # as the caller named it
    setting: str                          # "plain", or the caller's label for the transform
    bytes_sent: int
    dcor: float                           # bias-corrected, inputs vs sent tensors
    dfil: float                           # Fisher-information leakage; lower = less leakage
    inverse: AttackReport
    whitebox: AttackReport | None
    accuracy: float | None                # top-1 with the transform applied at the cut (with labels)
    examples: np.ndarray                  # (rows, k, C, H, W): originals, inverse, [white-box]
    after: str = ""                       # the node the cut falls after
    accuracy_plain: float | None = None   # top-1 of the unmodified model on the same samples
    dfil_sigma: float = DEFAULT_DFIL_SIGMA
    dfil_sigma_source: str = "assumed"    # "transform" or "assumed" (DEFAULT_DFIL_SIGMA x tensor std)
    n_aux: int = 0
    n_held: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def attacks(self) -> list[tuple[str, AttackReport]]:
        return [("inverse", self.inverse)] + ([("whitebox", self.whitebox)] if self.whitebox else [])

    @property
    def reid_top1(self) -> float:
        """Worst case over the attacks run."""
        return max(a.reid_top1 for _, a in self.attacks)

    @property
    def ssim(self) -> float:
        values = [a.ssim for _, a in self.attacks if not math.isnan(a.ssim)]
        return max(values) if values else float("nan")


# --------------------------------------------------------------------------------------- the split


class DeviceSplit:
    """A two-tier split of `graph` at one cut: `send` runs the device part, `finish` the rest."""

    def __init__(self, graph: ModelGraph, cut_name: str):
        self.graph = graph
        analysis = CutAnalysis(graph)
        cut: Cut = analysis.cut(analysis.resolve(cut_name))
        if not cut.valid:
            raise CutError(f"cut after {cut_name!r} ({cut.after}) {cut.reason}")
        if not cut.crossing:
            raise CutError(f"nothing crosses the cut after {cut_name!r} ({cut.after}); pick a cut the data flows through")
        self.cut = cut
        assign_tiers(analysis, [cut])
        host = _AUDIT_HOST
        device, server = extract_partitions(graph, analysis, [host, host])
        self.device_module, self.server_module = device.module, server.module
        self.device_in = [s.name for s in device.inputs]
        self.device_out = [s.name for s in device.outputs]
        self.server_in = [s.name for s in server.inputs]
        self.server_out = [s.name for s in server.outputs]
        self.input_names = [s.name for s in graph.inputs]
        self.crossing: tuple[TensorSpec, ...] = cut.crossing
        # Model inputs the server part reads directly are not "sent" by the device, but they cross.
        self._vmap_ok: bool | None = None

    # per-sample functions (unbatched shapes, as exported)
    def device_fn(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, inputs))
        outs = self.device_module(*(env[n] for n in self.device_in))
        env.update(zip(self.device_out, outs))
        return tuple(env[s.name] for s in self.crossing)

    def server_fn(self, inputs: Sequence[torch.Tensor], sent: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, inputs))
        env.update((s.name, t) for s, t in zip(self.crossing, sent))
        return tuple(self.server_module(*(env[n] for n in self.server_in)))

    def batched(self, fn: Callable, *args: torch.Tensor, chunk: int = 256):
        """fn over the leading (sample) dim of every arg: vmap in chunks, else a loop."""
        n = args[0].shape[0]
        if self._vmap_ok is not False:
            try:
                parts = [torch.func.vmap(fn)(*(a[i:i + chunk] for a in args)) for i in range(0, n, chunk)]
                out = tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))
                if self._vmap_ok is None:
                    direct = fn(*(a[0] for a in args))
                    self._vmap_ok = all(_batched_close(o[0], d) for o, d in zip(out, direct))
                if self._vmap_ok:
                    return out
            except Exception:  # noqa: BLE001 - vmap refuses unsupported ops with assorted types; the loop is exact
                self._vmap_ok = False
        results = [fn(*(a[i] for a in args)) for i in range(n)]
        return tuple(torch.stack([r[k] for r in results]) for k in range(len(results[0])))

    def send(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The crossing tensors for a batch of samples of every model input (in graph order)."""
        with torch.no_grad():
            return self.batched(self.device_fn, *inputs)

    def finish(self, x: torch.Tensor | Sequence[torch.Tensor], sent: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The model outputs from the model inputs (one tensor, or one per input) and what was sent."""
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        k = len(inputs)
        with torch.no_grad():
            return self.batched(lambda *a: self.server_fn(a[:k], a[k:]), *inputs, *sent)


def _batched_close(batched: torch.Tensor, direct: torch.Tensor) -> bool:
    """Whether vmap's value for one sample is the direct call's: exact for integers; for floats within 1e-4 of
    the tensor's largest finite magnitude (batched kernels accumulate in another order, and after six
    transformer layers that moves small entries by ~1e-4 absolute; a wrong batching rule moves them by O(1))."""
    if batched.shape != direct.shape or batched.dtype != direct.dtype:
        return False
    if not direct.is_floating_point():
        return torch.equal(batched, direct)
    finite = direct[torch.isfinite(direct)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.allclose(batched, direct, rtol=0.0, atol=1e-4 * scale + 1e-5, equal_nan=True)


@contextmanager
def audit_threads(graph: ModelGraph, threads: int | None = None):
    """torch intra-op threads while auditing `graph` (restored after): `threads`, or by default 1 for small
    inputs (<= 4,096 values a sample: 8x8 images, token ids), where the attacks run many small ops and extra
    threads only spin (10-20x slower on a loaded 2-core host), and torch's setting otherwise."""
    if threads is None and graph.inputs and int(np.prod(graph.inputs[0].shape, dtype=np.int64)) <= 4096:
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------- metrics


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float, win_size: int = 7) -> np.ndarray:
    """Per-image SSIM of (N, C, H, W) batches, as skimage.metrics.structural_similarity's defaults.

    Uniform win_size x win_size window (shrunk to the largest odd size that fits), K1 = 0.01,
    K2 = 0.03, sample covariances, the mean over valid window positions and channels (skimage filters
    the full image and crops (win-1)/2 from each side: the same positions). float64. NaN where the
    image is smaller than 3 x 3.
    """
    a = torch.tensor(np.ascontiguousarray(a), dtype=torch.float64)
    b = torch.tensor(np.ascontiguousarray(b), dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim takes two (N, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    win = min(win_size, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2
    if win < 3:
        return np.full(a.shape[0], np.nan)
    n, c, h, w = a.shape
    a, b = a.reshape(n * c, 1, h, w), b.reshape(n * c, 1, h, w)

    def pool(t):
        return F.avg_pool2d(t, win, stride=1)

    ux, uy = pool(a), pool(b)
    cov = win * win / (win * win - 1)
    vx = cov * (pool(a * a) - ux * ux)
    vy = cov * (pool(b * b) - uy * uy)
    vxy = cov * (pool(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(n, c, -1).mean(dim=(1, 2)).numpy()


def image_metrics(orig: np.ndarray, recon: np.ndarray, data_range: float) -> dict[str, float]:
    """Means over images of MSE, PSNR (dB, per image, capped at 100) and SSIM; (N, C, H, W) arrays."""
    o = orig.reshape(len(orig), -1).astype(np.float64)
    r = recon.reshape(len(recon), -1).astype(np.float64)
    mse = ((o - r) ** 2).mean(axis=1)
    psnr = np.where(mse > 0, 10 * np.log10(data_range ** 2 / np.maximum(mse, 1e-300)), 100.0)
    return {"mse": float(mse.mean()), "psnr": float(np.minimum(psnr, 100.0).mean()), "ssim": float(np.mean(ssim(orig, recon, data_range)))}


def reidentification(orig: np.ndarray, recon: np.ndarray) -> float:
    """Share of reconstructions whose nearest original (L2, among `orig`) is their own."""
    o = torch.as_tensor(orig.reshape(len(orig), -1), dtype=torch.float64)
    r = torch.as_tensor(recon.reshape(len(recon), -1), dtype=torch.float64)
    nearest = torch.cdist(r, o).argmin(dim=1).numpy()
    return float((nearest == np.arange(len(orig))).mean())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image of (N, C, H, W): mean absolute difference of neighbours."""
    tv = x.new_zeros(x.shape[0])
    if x.shape[-1] > 1:
        tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    if x.shape[-2] > 1:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return tv


# --------------------------------------------------------------------------------------- attacks


def _features(sent: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1).float() for t in sent], dim=1)


class _ConvDecoder(nn.Module):
    """Upsampling decoder for one (N, c, h, w) activation of an image input (C, H, W)."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int], width: int = 64):
        super().__init__()
        self.size = size
        self.head = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(width, c_out, 3, padding=1))

    def forward(self, z):
        return self.body(F.interpolate(self.head(z), size=self.size, mode="bilinear", align_corners=False))


def _train_inverse(sent_aux: Sequence[torch.Tensor], x_aux: torch.Tensor, image_shape, epochs: int, seed: int):
    """A decoder sent -> image (standardised both ways), trained with Adam on the auxiliary set."""
    torch.manual_seed(seed)
    c, h, w = image_shape
    conv = len(sent_aux) == 1 and sent_aux[0].dim() >= 4 and min(h, w) >= 16 and min(sent_aux[0].shape[-2:]) >= 2
    if conv:
        z = sent_aux[0].reshape(len(x_aux), -1, *sent_aux[0].shape[-2:]).float()
        z_mean, z_std = z.mean(dim=(0, 2, 3), keepdim=True), z.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        decoder = _ConvDecoder(z.shape[1], c, (h, w))
    else:
        z = _features(sent_aux)
        z_mean, z_std = z.mean(0, keepdim=True), z.std(0, keepdim=True).clamp_min(1e-6)
        hidden = 512 if z.shape[1] * c * h * w > 2 ** 16 else 256
        decoder = nn.Sequential(nn.Linear(z.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, c * h * w))
    x = x_aux.reshape(len(x_aux), c, h, w).float()
    x_mean, x_scale = x.mean(0, keepdim=True), x.std().clamp_min(1e-6)
    target = (x - x_mean) / x_scale
    zn = (z - z_mean) / z_std
    optimiser = torch.optim.Adam(decoder.parameters(), lr=1e-3, weight_decay=1e-5)
    fit(decoder, len(zn), optimizer=optimiser, loss_of=lambda idx: F.mse_loss(decoder(zn[idx]).reshape(len(idx), c, h, w), target[idx]),
        epochs=epochs, batch=64, seed=seed, held_share=INVERSE_HELD_SHARE, patience=INVERSE_PATIENCE, description="inverse network")

    def reconstruct(sent: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            zz = sent[0].reshape(len(sent[0]), *z.shape[1:]).float() if conv else _features(sent)
            out = decoder((zz - z_mean) / z_std).reshape(-1, c, h, w)
            return out * x_scale + x_mean

    return reconstruct


def _whitebox(split: DeviceSplit, spec_shape, image_shape, start: torch.Tensor, targets: Sequence[torch.Tensor],
              lo: float, hi: float, steps: int, tv_weight: float) -> torch.Tensor:
    """argmin_x sum_k ||f_k(x) - t_k||² / ||t_k||² + tv_weight · TV(x), x in [lo, hi], from `start`."""
    n = targets[0].shape[0]
    floating = [k for k, t in enumerate(targets) if t.is_floating_point()]
    targets = [targets[k].detach().double() for k in floating]
    energy = [t.reshape(n, -1).pow(2).sum(1).clamp_min(1e-12) for t in targets]
    x = start.reshape(1, *image_shape).repeat(n, 1, 1, 1).double().clone().requires_grad_(True)
    dtype = next((p.dtype for p in split.device_module.parameters()), torch.float32)
    optimiser = torch.optim.Adam([x], lr=0.05 * (hi - lo))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)

    def fn(xi):
        return split.device_fn(xi.reshape(spec_shape).to(dtype))

    vfn = torch.func.vmap(fn)
    for _ in range(steps):
        optimiser.zero_grad()
        try:
            if split._vmap_ok is False:
                raise RuntimeError("vmap unsupported")
            outs = vfn(x)
        except Exception:  # noqa: BLE001 - as in DeviceSplit.batched
            split._vmap_ok = False
            outs = tuple(torch.stack(r) for r in zip(*(fn(xi) for xi in x)))
        fit = sum((outs[k].double() - t).reshape(n, -1).pow(2).sum(1) / e for k, t, e in zip(floating, targets, energy))
        loss = (fit + tv_weight * total_variation(x)).sum()
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return x.detach().float()


def mean_dfil(split: DeviceSplit, xs: torch.Tensor, sigma_of: Callable[[torch.Tensor], float], probes: int, seed: int) -> float:
    """mean over samples of sum_k ||J_k||_F² / σ_k² / d_in; exact for d_in <= 256, Hutchinson above."""
    d_in = int(np.prod(xs.shape[1:]))
    generator = torch.Generator().manual_seed(seed)
    dtype = xs.dtype
    values = []
    for x in xs:
        x = x.double()

        def fn(xi):
            return tuple(o.double() for o in split.device_fn(xi.to(dtype)))

        with torch.no_grad():
            clean = fn(x)
        sigmas = [max(sigma_of(o), 1e-12) if o.is_floating_point() else None for o in clean]
        if d_in <= 256:
            jac = torch.func.jacfwd(fn)(x)
            sq = [j.pow(2).sum() for j in jac]
        else:
            v = torch.randn((probes, *x.shape), generator=generator, dtype=torch.float64)
            tangents = torch.func.vmap(lambda vi, x=x, fn=fn: torch.func.jvp(fn, (x,), (vi,))[1])(v)
            sq = [t.reshape(probes, -1).pow(2).sum(1).mean() for t in tangents]
        values.append(sum(float(s) / sg ** 2 for s, sg in zip(sq, sigmas) if sg is not None) / d_in)
    return float(np.mean(values))


# --------------------------------------------------------------------------------------- audit


def _image_shape(spec: TensorSpec) -> tuple[int, int, int]:
    shape = tuple(spec.shape)
    if len(shape) >= 2:
        return int(np.prod(shape[:-2], dtype=np.int64)), int(shape[-2]), int(shape[-1])
    return 1, 1, int(np.prod(shape, dtype=np.int64))


def _floors(orig: np.ndarray, aux: np.ndarray, aux_labels, held_labels, data_range: float) -> dict[str, dict[str, float]]:
    floors = {"data_mean": image_metrics(orig, np.broadcast_to(aux.mean(0), orig.shape), data_range)}
    if aux_labels is not None:
        means = {int(k): aux[aux_labels == k].mean(0) for k in np.unique(aux_labels)}
        fallback = aux.mean(0)
        guess = np.stack([means.get(int(k), fallback) for k in held_labels])
        floors["class_mean"] = image_metrics(orig, guess, data_range)
    return floors


def audit_cut(graph: ModelGraph, cut_name: str, calibration: Calibration, *, transform: Transform | None = None,
              setting: str = "plain", seed: int = 0, epochs: int = 150, whitebox: bool = True,
              whitebox_samples: int = 64, whitebox_steps: int = 300, tv_weight: float = 0.02,
              dfil_samples: int = 16, dfil_probes: int = 16, dcor_samples: int = 256, n_examples: int = 8,
              split: DeviceSplit | None = None, threads: int | None = None) -> CutAudit:
    """Attack what the device sends at `cut_name` (a node name or module path); see the module docstring.

    `transform` is applied per sample to every sent tensor before it is "sent" (None: sent as is).
    `split` lets callers auditing several settings of one cut build the DeviceSplit once.
    `threads`: torch intra-op threads during the audit (restored after). Default: 1 for small inputs
    (<= 4,096 values a sample), where the attacks run many tiny ops and extra threads only spin (10-20x
    slower on a loaded 2-core host); torch's setting otherwise.
    """
    with audit_threads(graph, threads):
        return _audit_cut(graph, cut_name, calibration, transform, setting, seed, epochs, whitebox, whitebox_samples,
                          whitebox_steps, tv_weight, dfil_samples, dfil_probes, dcor_samples, n_examples, split)


def _audit_cut(graph, cut_name, calibration, transform, setting, seed, epochs, whitebox, whitebox_samples, whitebox_steps,
               tv_weight, dfil_samples, dfil_probes, dcor_samples, n_examples, split) -> CutAudit:
    started = time.perf_counter()
    check_calibration(graph, calibration)
    floating = [s for s in graph.inputs if s.dtype.startswith("float") or s.dtype == "bfloat16"]
    if len(graph.inputs) != 1 or not floating:
        kinds = ", ".join(f"{s.name} {s.dtype}" for s in graph.inputs)
        raise InputError(f"audit reconstructs one floating-point model input; {graph.name} takes {kinds}")
    n = len(calibration)
    if n < MIN_AUDIT_SAMPLES:
        raise InputError(f"calibration holds {n} sample(s); the audit needs at least {MIN_AUDIT_SAMPLES} "
                         f"(half train the attacker, half are attacked; a few hundred give stable figures)")
    split = split or DeviceSplit(graph, cut_name)
    spec = graph.inputs[0]
    image_shape = _image_shape(spec)
    notes: list[str] = []

    x_all = torch.from_numpy(calibration.inputs[0])
    clean = split.send(x_all)
    if transform is None:
        sent = clean
    else:
        with torch.no_grad():
            per = [tuple(transform(t[i]) for t in clean) for i in range(n)]
        sent = tuple(torch.stack([p[k] for p in per]) for k in range(len(clean)))

    aux_idx, held_idx = holdout_split(n, 0.5, seed)
    images = calibration.inputs[0].reshape(n, *image_shape).astype(np.float64)
    lo, hi = float(images[aux_idx].min()), float(images[aux_idx].max())
    data_range = hi - lo if hi > lo else 1.0
    orig = images[held_idx]
    labels = calibration.labels
    floors = _floors(orig, images[aux_idx], None if labels is None else labels[aux_idx],
                     None if labels is None else labels[held_idx], data_range)

    # Learned inverse network (black-box).
    tick = time.perf_counter()
    reconstruct = _train_inverse([t[aux_idx] for t in sent], torch.from_numpy(images[aux_idx]), image_shape, epochs, seed)
    recon = reconstruct([t[held_idx] for t in sent]).double().clamp(lo, hi).numpy()
    inverse = AttackReport(**image_metrics(orig, recon, data_range), floors=floors, reid_top1=reidentification(orig, recon),
                           reid_chance=1.0 / len(held_idx), seconds=time.perf_counter() - tick, samples=len(held_idx))

    # White-box optimisation against the device function.
    white = None
    wb_recon = None
    if whitebox:
        tick = time.perf_counter()
        k = min(whitebox_samples, len(held_idx))
        pick = held_idx[sample_indices(len(held_idx), k)]
        start = torch.from_numpy(images[aux_idx].mean(0))
        try:
            wb = _whitebox(split, spec.shape, image_shape, start, [t[pick] for t in sent], lo, hi, whitebox_steps, tv_weight)
            wb_recon = wb.double().numpy()
            wb_orig = images[pick]
            sub_floors = _floors(wb_orig, images[aux_idx], None if labels is None else labels[aux_idx],
                                 None if labels is None else labels[pick], data_range)
            white = AttackReport(**image_metrics(wb_orig, wb_recon, data_range), floors=sub_floors,
                                 reid_top1=reidentification(wb_orig, wb_recon), reid_chance=1.0 / k,
                                 seconds=time.perf_counter() - tick, samples=k)
        except RuntimeError as exc:  # a device part autograd cannot differentiate
            notes.append(f"white-box attack skipped: {str(exc).splitlines()[0][:200]}")

    # dFIL.
    if transform is not None and callable(getattr(transform, "noise_std", None)) and float(getattr(transform, "sigma", 1.0)) > 0:
        sigma_of, sigma_source = transform.noise_std, "transform"
        dfil_sigma = float(getattr(transform, "sigma", float("nan")))
    else:
        def sigma_of(t):
            return DEFAULT_DFIL_SIGMA * float(t.std())
        sigma_source, dfil_sigma = "assumed", DEFAULT_DFIL_SIGMA
        notes.append(f"dFIL assumes Gaussian noise of {DEFAULT_DFIL_SIGMA:g} x each sent tensor's std (no noise transform given)")
    dfil_idx = held_idx[sample_indices(len(held_idx), dfil_samples)]
    dfil = mean_dfil(split, x_all[dfil_idx], sigma_of, dfil_probes, seed)

    # dCor (bias-corrected) between inputs and what is sent.
    dcor_idx = sample_indices(n, dcor_samples)
    dcor = distance_correlation(images[dcor_idx].reshape(len(dcor_idx), -1), _features([t[dcor_idx] for t in sent]).double().numpy(),
                                bias_corrected=True)

    # Accuracy with and without the transform.
    accuracy = accuracy_plain = None
    if labels is not None:
        out = split.finish(x_all, sent)[0]
        if out.is_floating_point() and out.shape[-1] > 1 and out[0].numel() == out.shape[-1]:
            accuracy = float((out.reshape(n, -1).argmax(1).numpy() == labels).mean())
            plain = out if transform is None else split.finish(x_all, clean)[0]
            accuracy_plain = float((plain.reshape(n, -1).argmax(1).numpy() == labels).mean())
        else:
            notes.append("accuracy not measured: the model's first output is not one row of class scores")

    k = min(n_examples, len(held_idx))
    rows = [orig[:k], recon[:k]]
    if wb_recon is not None:
        where = {int(j): i for i, j in enumerate(pick)}
        shown = [where[int(j)] for j in held_idx[:k] if int(j) in where]
        if len(shown) < k:  # examples from the white-box subset, both rows aligned on it
            sel = sample_indices(len(pick), k)
            rows = [images[pick[sel]], reconstruct([t[pick[sel]] for t in sent]).double().clamp(lo, hi).numpy()]
            shown = list(sel)
        rows.append(wb_recon[shown])
    examples = np.stack(rows).astype(np.float32)

    return CutAudit(cut=cut_name, setting=setting, bytes_sent=int(split.cut.nbytes), dcor=dcor, dfil=dfil, inverse=inverse,
                    whitebox=white, accuracy=accuracy, examples=examples, after=split.cut.after, accuracy_plain=accuracy_plain,
                    dfil_sigma=dfil_sigma, dfil_sigma_source=sigma_source, n_aux=len(aux_idx), n_held=len(held_idx),
                    seconds=time.perf_counter() - started, notes=notes)


# --------------------------------------------------------------------------------------- outputs


def json_number(value):
    """A figure as the audit's JSON writes it: rounded to 6 places; None when missing or not finite."""
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def audit_report_json(audits: Sequence[CutAudit]) -> dict:
    """The audit as JSON. Per entry, the planner's privacy slot reads "cut", "setting", "reid_top1",
    "ssim" (worst case over the attacks run), "dcor" and "dfil"; the attacks' details follow."""
    entries = []
    for a in audits:
        worst = max(a.attacks, key=lambda kv: kv[1].reid_top1)[0]
        entries.append({
            "cut": a.cut, "after": a.after, "setting": a.setting, "bytes_sent": a.bytes_sent,
            "reid_top1": json_number(a.reid_top1), "reid_chance": json_number(a.inverse.reid_chance), "ssim": json_number(a.ssim),
            "dcor": json_number(a.dcor), "dfil": json_number(a.dfil),
            "dfil_sigma": json_number(a.dfil_sigma), "dfil_sigma_source": a.dfil_sigma_source, "worst_attack": worst,
            "accuracy": json_number(a.accuracy), "accuracy_plain": json_number(a.accuracy_plain),
            "inverse": a.inverse.to_json(), "whitebox": a.whitebox.to_json() if a.whitebox else None,
            "n_aux": a.n_aux, "n_held": a.n_held, "seconds": round(a.seconds, 3), "notes": list(a.notes),
        })
    return {"schema": SCHEMA, "class_mean_note": CLASS_MEAN_NOTE, "audits": entries}


def print_audit_table(audits: Sequence[CutAudit], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title="privacy audit: what an attacker recovers from the sent tensors (held-out inputs)")
    for column in ("cut", "setting", "sent", "attack", "reid top-1", "SSIM", "PSNR dB", "MSE", "dCor", "dFIL", "top-1"):
        table.add_column(column, justify="left" if column in ("cut", "setting", "attack") else "right")
    for a in audits:
        accuracy = "" if a.accuracy is None else f"{a.accuracy:.3f}" + (
            f" ({a.accuracy - a.accuracy_plain:+.3f})" if a.accuracy_plain is not None and a.setting != "plain" else "")
        for i, (name, r) in enumerate(a.attacks):
            first = i == 0
            table.add_row(a.cut if first else "", a.setting if first else "", f"{a.bytes_sent} B" if first else "", name,
                          f"{r.reid_top1:.3f} (chance {r.reid_chance:.3f})", f"{r.ssim:.3f}", f"{r.psnr:.2f}", f"{r.mse:.4f}",
                          f"{a.dcor:.3f}" if first else "", f"{a.dfil:.3g}" if first else "", accuracy if first else "")
        for floor, m in a.inverse.floors.items():
            table.add_row("", "", "", f"[dim]floor: {floor.replace('_', '-')}[/dim]", "", f"[dim]{m['ssim']:.3f}[/dim]",
                          f"[dim]{m['psnr']:.2f}[/dim]", f"[dim]{m['mse']:.4f}[/dim]", "", "", "")
        table.add_section()
    console.print(table)
    notes = sorted({note for a in audits for note in a.notes})
    for note in [CLASS_MEAN_NOTE, *notes]:
        console.print(f"[dim]note: {note}[/dim]")


def write_reconstructions_png(audits: Sequence[CutAudit], path: str | Path) -> Path:
    """Originals beside reconstructions, one block of rows per audited cut/setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = ["original", "inverse net", "white-box"]
    rows = [(a, r) for a in audits for r in range(a.examples.shape[0])]
    cols = max(a.examples.shape[1] for a in audits)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 1.6, 1.1 * len(rows) + 0.4), squeeze=False)
    for (a, r), row_axes in zip(rows, axes):
        for j, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= a.examples.shape[1]:
                ax.axis("off")
                continue
            img = a.examples[r, j]
            lo, hi = float(a.examples[0].min()), float(a.examples[0].max())
            if img.shape[0] == 3:
                ax.imshow(np.clip((np.transpose(img, (1, 2, 0)) - lo) / max(hi - lo, 1e-12), 0, 1))
            else:
                ax.imshow(img[0], cmap="gray", vmin=lo, vmax=hi)
        title = labels[r]
        if r == 0:
            title = f"{a.cut}\n{a.setting}\n{title}"
        else:
            report = a.inverse if r == 1 else a.whitebox
            title += f"\nSSIM {report.ssim:.2f}\nreid {report.reid_top1:.2f}"
        row_axes[0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
