"""`splitc audit`: attack what a device sends at one or more cuts (registered by cli/__init__.py):

    from splitc.cli.audit import audit
    cli.add_command(audit)

    splitc audit model.pt2 --cut layer2,layer3 --calib digits.npz [--noise 0.5] [--report audit/]

writes audit/report.json (splitc.drivers.audit.audit_report_json) and audit/reconstructions.png, and prints a
table. A model whose input is token ids feeding an embedding gets the token-recovery audit instead
(splitc.drivers.audit_text: report.json in its own schema, no PNG); its --calib holds the inputs by name
(input_ids, attention_mask) and optional labels y. With --defend METHOD each cut is defended first
(splitc.passes.defend) and attacked before and after by fresh attackers (splitc.drivers.defend_audit):
report.json in that module's schema and defence.png (accuracy-leakage curves of noise alone and of the
defence, reconstructions). `python -m splitc.cli.audit ...` runs the command on
its own, with the same error handling.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from splitc.core.errors import InputError


@click.command("audit")
@click.argument("source")
@click.option("--cut", "cuts", required=True, help="Cut(s) to audit, comma-separated node names or module paths: layer2,layer3.")
@click.option("--calib", required=True, type=click.Path(dir_okay=False),
              help="Calibration .npz: inputs (key x or the input's name; token models: input_ids, attention_mask) and "
                   "optional labels (y); a few hundred samples.")
@click.option("--noise", type=float, help="Also audit with Gaussian noise of std NOISE x the sent tensor's std added before sending.")
@click.option("--report", "report_dir", default="audit", show_default=True, type=click.Path(file_okay=False),
              help="Directory for report.json and reconstructions.png.")
@click.option("--epochs", type=click.IntRange(1, 10000),
              help="Epochs of the inverse-network attacker [default: 150 for images, 10 for token inputs].")
@click.option("--whitebox-steps", default=300, show_default=True, type=click.IntRange(0, 100000),
              help="Optimisation steps of the white-box attack (0: skip it; image inputs only).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the attacker/held-out split, the attacks and the noise.")
@click.option("--defend", type=click.Choice(["nopeek", "adversarial", "noise-aware"]),
              help="Defend each cut (fine-tune on --calib, splitc.passes.defend), then attack the model before and after with "
                   "fresh attackers; writes report.json and defence.png (accuracy-leakage curves of noise alone and the defence).")
@click.option("--max-accuracy-drop", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="With --defend: accuracy points the defence may cost on held-out --calib data.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled nn.Module (.pt/.pth). Unpickling runs code.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE[:DTYPE]", help="Input shape for a factory or pickle, e.g. 1,1,8,8.")
def audit(source, cuts, calib, noise, report_dir, epochs, whitebox_steps, seed, defend, max_accuracy_drop, trust_pickle, input_shapes):
    """Measure what an attacker recovers from the tensors SOURCE's device part sends at each --cut.

    A model whose input is token ids feeding an embedding gets the token-recovery audit (exact tokens
    read back from the sent hidden states) instead of the image attacks."""
    from rich.console import Console

    from splitc.drivers.audit import (
        DeviceSplit,
        GaussianNoise,
        audit_cut,
        audit_report_json,
        print_audit_table,
        write_reconstructions_png,
    )
    from splitc.drivers.audit_text import token_inputs
    from splitc.frontend import import_model
    from splitc.passes.privacy import load_calibration

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    names = [c.strip() for c in cuts.split(",")]
    if noise is not None and not (math.isfinite(noise) and noise > 0):
        raise InputError(f"--noise {noise} must be a positive number: the noise std relative to each sent tensor's std (e.g. 0.5)")
    if len(set(names)) != len(names):
        raise InputError(f"--cut {cuts} names a cut twice; list each once")
    report = Path(report_dir)
    if report.exists() and not report.is_dir():
        raise InputError(f"--report {report} is a file; give a directory")
    with console.status(f"exporting {source}"):
        _, graph = import_model(source, input_shapes=input_shapes, trust_pickle=trust_pickle)
    calibration = load_calibration(calib, graph)
    splits = [DeviceSplit(graph, name) for name in names]  # every cut checked before any attack runs
    if defend:
        _audit_defended(graph, names, calibration, defend, max_accuracy_drop, noise, seed, epochs, whitebox_steps, report, console)
        return
    if token_inputs(graph):
        settings = [("plain", None)] + ([(f"noise {noise:g}", lambda: GaussianNoise(noise, seed=seed))] if noise is not None else [])
        _audit_tokens(graph, names, splits, calibration, settings, seed, epochs or 10, report, console)
        return
    audits = []
    for name, split in zip(names, splits):
        settings = [("plain", None)] + ([compiled_noise(graph, name, calibration, noise, seed)] if noise is not None else [])
        for label, make in settings:
            with console.status(f"auditing {name} ({label})"):
                audits.append(audit_cut(graph, name, calibration, transform=make() if make else None, setting=label, seed=seed,
                                        epochs=epochs or 150, whitebox=whitebox_steps > 0, whitebox_steps=max(whitebox_steps, 1),
                                        split=split))
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps(audit_report_json(audits), indent=2) + "\n")
    write_reconstructions_png(audits, report / "reconstructions.png")
    print_audit_table(audits, console)
    console.print(f"wrote {report / 'report.json'} and {report / 'reconstructions.png'}")


def compiled_noise(graph, cut: str, calibration, sigma: float, seed: int):
    """The noise `splitc compile --noise SIGMA` would put at this cut: std = σ x the sent tensor's
    std over the calibration samples (passes/noise.py), the same for every request. A cut that sends
    several activations falls back to σ x each sample's own std, and the label says so."""
    import torch

    from splitc.drivers.audit import GaussianNoise
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.noise import data_carrying
    from splitc.passes.quantize import observe

    analysis = CutAnalysis(graph)
    carrying = data_carrying(graph.module)
    sent = [n for n in analysis.crossing_nodes(analysis.resolve(cut)) if n.meta["val"].is_floating_point() and n in carrying]
    if len(sent) != 1:
        return f"noise {sigma:g} (x each sample's std)", lambda: GaussianNoise(sigma, seed=seed)
    count = min(len(calibration), 256)
    samples = [tuple(torch.from_numpy(x[i]) for x in calibration.inputs) for i in range(count)]
    scale = sigma * observe(graph, [sent[0].name], samples)[sent[0].name].std
    return f"noise {sigma:g} (as compiled: std {scale:.3g})", lambda: GaussianNoise(scale, relative=False, seed=seed)


def _audit_tokens(graph, names, splits, calibration, settings, seed, epochs, report, console) -> None:
    """The token-recovery audit of every cut and setting; report.json, a table, no PNG."""
    from splitc.drivers.audit_text import (
        per_token_tensors,
        print_token_table,
        sent_tensors,
        token_recovery,
        token_report_json,
    )

    for split in splits:  # every cut checked before any attack runs
        per_token_tensors(split)
    audits = []
    for name, split in zip(names, splits):
        with console.status(f"running the device part to {name}"):
            clean = sent_tensors(split, calibration)
        for label, make in settings:
            with console.status(f"auditing {name} ({label})"):
                audits.append(token_recovery(graph, name, calibration, transform=make() if make else None, setting=label,
                                             seed=seed, epochs=epochs, split=split, clean=clean))
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps(token_report_json(audits), indent=2) + "\n")
    print_token_table(audits, console)
    console.print(f"wrote {report / 'report.json'}; reconstructions.png not applicable to token inputs "
                  f"(report.json lists recovered token ids)")


def _audit_defended(graph, names, calibration, method, max_accuracy_drop, noise, seed, epochs, whitebox_steps, report, console) -> None:
    """--defend: defend each cut, attack before and after with fresh attackers; report.json, defence.png, a table."""
    from splitc.drivers.defend_audit import audit_defence, defence_report_json, print_defence_table, write_defence_png

    if noise is not None and method != "noise-aware":
        raise InputError(f"--noise with --defend {method}: only --defend noise-aware trains under noise; drop --noise or use noise-aware")
    strengths = [noise] if noise is not None else None
    results = [audit_defence(graph, name, method, calibration, max_accuracy_drop=max_accuracy_drop, strengths=strengths, seed=seed,
                             epochs=epochs, whitebox_steps=whitebox_steps, log=lambda m: console.print(f"[dim]{m}[/dim]"))
               for name in names]
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps(defence_report_json(results), indent=2) + "\n")
    write_defence_png(results, report / "defence.png")
    print_defence_table(results, console)
    console.print(f"wrote {report / 'report.json'} and {report / 'defence.png'}")


def main(argv: list[str] | None = None) -> None:
    """Run `audit` alone, with the same error handling as `splitc`."""
    from splitc.cli.common import run_command

    run_command(audit, argv, "splitc audit")


if __name__ == "__main__":
    main()
