"""`splitc audit --defend`: the audit of a defended model, before and after, with fresh attackers.

The defence (passes/defend.py) trains against its own inverter; judging it by that inverter would
flatter it. Here every attack of `splitc audit` is run again on the defended model by attackers
trained from scratch on what the defended device part sends (drivers/audit.py: inverse network,
white-box, re-identification, dCor, dFIL; drivers/audit_text.py: token recovery), next to the same
attacks on the undefended model and the floors an attacker gets without the activation.

The accuracy-leakage picture (PNG) puts two curves side by side, each point audited by a fresh
inverse network: noise alone at the cut (σ on a grid, the undefended model) and the defence (every
strength of its sweep); and, beside them, reconstructions before and after.

Noise-aware defences are audited with the noise they trained under (σ x each sample's std,
GaussianNoise(σ)): that is what the runtime sends once compiled with `--noise σ`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitc.core.graph import ModelGraph
from splitc.drivers.audit import CutAudit, GaussianNoise, audit_cut, audit_report_json
from splitc.drivers.audit_text import TokenAudit, token_inputs, token_recovery
from splitc.passes.defend import Defence, defend

SCHEMA = "splitc.drivers.defend_audit/1"
NOISE_CURVE = (0.5, 1.0, 2.0, 3.0, 5.0)   # σ x std for the noise-alone curve


@dataclass
class CurvePoint:
    setting: str          # "noise 2", "nopeek 1"
    strength: float
    accuracy: float | None
    leakage: float        # re-identification top-1 (images) or token recovery (text)
    ssim: float | None    # images only
    dcor: float

    def to_json(self) -> dict:
        return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in self.__dict__.items()}


@dataclass
class DefenceAudit:
    cut: str
    defence: Defence
    before: CutAudit | TokenAudit
    after: CutAudit | TokenAudit
    noise_curve: list[CurvePoint] = field(default_factory=list)
    defence_curve: list[CurvePoint] = field(default_factory=list)

    @property
    def text(self) -> bool:
        return isinstance(self.before, TokenAudit)


def _transform(defence_record: dict, seed: int):
    if defence_record["method"] == "noise-aware":
        return GaussianNoise(defence_record["strength"], seed=seed + 1)
    return None


def _attack(graph: ModelGraph, cut: str, calibration, transform, setting: str, seed: int, epochs: int | None, whitebox: bool,
            whitebox_steps: int):
    if token_inputs(graph):
        return token_recovery(graph, cut, calibration, transform=transform, setting=setting, seed=seed, epochs=epochs or 10)
    return audit_cut(graph, cut, calibration, transform=transform, setting=setting, seed=seed, epochs=epochs or 150,
                     whitebox=whitebox, whitebox_steps=max(whitebox_steps, 1))


def _point(audit, setting: str, strength: float) -> CurvePoint:
    if isinstance(audit, TokenAudit):
        return CurvePoint(setting, strength, audit.accuracy, audit.recovery, None, audit.dcor)
    return CurvePoint(setting, strength, audit.accuracy, audit.inverse.reid_top1, audit.inverse.ssim, audit.dcor)


def audit_defence(graph: ModelGraph, cut: str, method: str, calibration, *, max_accuracy_drop: float = 1.0,
                  strengths: Sequence[float] | None = None, defence_calibration=None, seed: int = 0, epochs: int | None = None,
                  whitebox_steps: int = 300, curves: bool = True, noise_curve: Sequence[float] = NOISE_CURVE,
                  defence_epochs: int | None = None, progress: bool | None = None, log=lambda _: None) -> DefenceAudit:
    """Defend `graph` at `cut` (on `defence_calibration`, default `calibration`), then attack the model before and
    after with fresh attackers on `calibration`, and (with `curves`) trace the accuracy-leakage curves."""
    log(f"defending {cut} ({method})")
    defence = defend(graph, cut, method, defence_calibration if defence_calibration is not None else calibration,
                     max_accuracy_drop=max_accuracy_drop, strengths=strengths, seed=seed, keep_graphs=curves, progress=progress,
                     **({"epochs": defence_epochs} if defence_epochs else {}))
    record = defence.record
    label = f"{method} {record['strength']:g}"
    log(f"attacking {cut}: undefended model")
    before = _attack(graph, cut, calibration, None, "plain", seed, epochs, True, whitebox_steps)
    log(f"attacking {cut}: defended model ({label}), fresh attackers")
    after = _attack(defence.graph, cut, calibration, _transform(record, seed), f"defended: {label}", seed, epochs, True, whitebox_steps)
    result = DefenceAudit(cut, defence, before, after)
    if curves:
        for sigma in noise_curve:
            log(f"noise-alone curve: σ={sigma:g}")
            audit = _attack(graph, cut, calibration, GaussianNoise(sigma, seed=seed + 1), f"noise {sigma:g}", seed, epochs, False, 0)
            result.noise_curve.append(_point(audit, f"noise {sigma:g}", sigma))
        for strength, trial_graph in defence.graphs.items():
            log(f"defence curve: {method} {strength:g}")
            trial_record = {"method": method, "strength": strength}
            audit = _attack(trial_graph, cut, calibration, _transform(trial_record, seed), f"{method} {strength:g}", seed, epochs, False, 0)
            result.defence_curve.append(_point(audit, f"{method} {strength:g}", strength))
    return result


# ------------------------------------------------------------------------------------------ outputs


def _audit_json(audit) -> dict:
    if isinstance(audit, TokenAudit):
        return audit.to_json()
    return audit_report_json([audit])["audits"][0]


def defence_report_json(results: Sequence[DefenceAudit]) -> dict:
    return {"schema": SCHEMA, "attackers": "fresh: trained from scratch on the defended model's sent tensors",
            "defences": [{"cut": r.cut, "defence": r.defence.record, "before": _audit_json(r.before), "after": _audit_json(r.after),
                          "curves": {"noise": [p.to_json() for p in r.noise_curve], "defence": [p.to_json() for p in r.defence_curve]}}
                         for r in results]}


def leakage_figures(audit) -> dict[str, float | None]:
    """The headline figures of one audit with their floors, for tables: images or text."""
    if isinstance(audit, TokenAudit):
        return {"token_recovery": audit.recovery, "floor_position_mode": audit.floors["position_mode"]["token"],
                "chance": audit.floors["chance"]["token"], "dcor": audit.dcor, "accuracy": audit.accuracy}
    return {"reid_inverse": audit.inverse.reid_top1, "reid_whitebox": audit.whitebox.reid_top1 if audit.whitebox else None,
            "reid_chance": audit.inverse.reid_chance, "ssim_inverse": audit.inverse.ssim,
            "ssim_whitebox": audit.whitebox.ssim if audit.whitebox else None,
            "floor_data_mean_ssim": audit.inverse.floors["data_mean"]["ssim"],
            "floor_class_mean_ssim": audit.inverse.floors.get("class_mean", {}).get("ssim"),
            "dcor": audit.dcor, "dfil": audit.dfil, "accuracy": audit.accuracy}


def print_defence_table(results: Sequence[DefenceAudit], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    for r in results:
        rec = r.defence.record
        table = Table(title=f"{r.cut}: {rec['method']} {rec['strength']:g} (fresh attackers; held-out accuracy "
                            f"{rec['accuracy_before']:.3f} -> {rec['accuracy_after']:.3f}, trained {rec['training_seconds']:.0f} s)")
        table.add_column("figure")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        before, after = leakage_figures(r.before), leakage_figures(r.after)
        for key in before:
            fmt = (lambda v: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}")
            table.add_row(key.replace("_", " "), fmt(before[key]), fmt(after[key]))
        console.print(table)


def write_defence_png(results: Sequence[DefenceAudit], path: str | Path) -> Path:
    """Per cut: accuracy vs leakage for noise alone and for the defence, side by side, and (images)
    reconstructions by the fresh inverse network before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = len(results)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.6 * rows), squeeze=False)
    for r, (ax_noise, ax_defence, ax_images) in zip(results, axes):
        what = "token recovery" if r.text else "re-identification top-1 (inverse net)"
        floor = (r.before.floors["position_mode"]["token"] if r.text else r.before.inverse.reid_chance)
        floor_name = "most-frequent-token floor" if r.text else "chance"
        for ax, curve, title in ((ax_noise, r.noise_curve, "noise alone"), (ax_defence, r.defence_curve, f"{r.defence.record['method']}")):
            points = [p for p in curve if p.accuracy is not None]
            ax.plot([p.leakage for p in points], [100 * p.accuracy for p in points], "o-")
            for p in points:
                ax.annotate(f"{p.strength:g}", (p.leakage, 100 * p.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axvline(floor, color="grey", ls=":", label=floor_name)
            ax.axvline(2 * floor, color="grey", ls="--", label=f"2x {floor_name}")
            if r.before.accuracy is not None:
                ax.axhline(100 * r.before.accuracy, color="green", ls=":", label="undefended accuracy")
                ax.axhline(100 * r.before.accuracy - 1, color="red", ls=":", label="-1 point")
            ax.set_xlabel(what)
            ax.set_ylabel("top-1 %")
            ax.set_title(f"{r.cut}: {title}", fontsize=9)
            ax.legend(fontsize=6)
        # The two curves on the same axes, so they compare at a glance.
        points = [p for p in r.noise_curve + r.defence_curve if p.accuracy is not None]
        if points:
            top = max(p.leakage for p in points + [CurvePoint("", 0, 0, floor * 2, None, 0)])
            low = min(100 * p.accuracy for p in points)
            high = max([100 * p.accuracy for p in points] + ([100 * r.before.accuracy] if r.before.accuracy is not None else []))
            for ax in (ax_noise, ax_defence):
                ax.set_xlim(-0.02 * top, 1.05 * top)
                ax.set_ylim(low - 2, high + 1)
        if r.text:
            ax_images.axis("off")
            lines = [f"before: {r.before.recovery:.3f} of tokens recovered", f"after: {r.after.recovery:.3f}",
                     f"floor (position mode): {r.before.floors['position_mode']['token']:.3f}"]
            ax_images.text(0, 0.5, "\n".join(lines), fontsize=9, va="center")
            continue
        k = min(6, r.before.examples.shape[1], r.after.examples.shape[1])
        strip = np.concatenate([np.concatenate(list(block[:k, 0]), axis=1) for block in
                                (r.before.examples[0], r.before.examples[1], r.after.examples[1])], axis=0)
        ax_images.imshow(strip, cmap="gray")
        ax_images.set_xticks([])
        h = r.before.examples.shape[-2]
        ax_images.set_yticks([h / 2, 1.5 * h, 2.5 * h])
        ax_images.set_yticklabels(["original", f"before\nSSIM {r.before.inverse.ssim:.2f}", f"after\nSSIM {r.after.inverse.ssim:.2f}"],
                                  fontsize=7)
        ax_images.set_title("fresh inverse network, held-out inputs", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
