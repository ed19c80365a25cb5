"""Figures: the privacy audit of a small CNN trained on scikit-learn's 8x8 digits.

    python bench/audit_digits.py [--noise 1.0,3.0] [--cuts conv1,conv2,fc1,fc2] [--out audit_digits/]

Trains the CNN of tests/test_audit.py (examples.digits.DigitsCNN with a hidden layer) (1,000 training digits), exports it, and audits each cut plain
and with the Gaussian noise `compile --noise` adds for each --noise (σ x the sent tensor's std over the
calibration data) on the 797 other
digits (half train the attacker, half are attacked). Prints per cut/setting: audit time, re-
identification (inverse net / white-box, chance 1/N), SSIM and PSNR next to the floors, dCor, dFIL,
and top-1 accuracy with its change. Writes report.json and reconstructions.png. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.* for the model and save_pt2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="1.0,3.0")
    parser.add_argument("--cuts", default="conv1,conv2,fc1,fc2")
    parser.add_argument("--out", default="audit_digits")
    args = parser.parse_args()

    from examples.digits import DigitsCNN, load_digits_arrays, train_classifier
    from splitc.cli.audit import compiled_noise
    from splitc.frontend import import_model
    from splitc.passes.privacy import load_calibration
    from torch import nn

    from splitc.drivers.audit import (
        DeviceSplit,
        audit_cut,
        audit_report_json,
        write_reconstructions_png,
    )
    from tests.models import save_pt2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_arrays()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the audit tests' model: conv 8, conv 16, fc 32, fc 10, log-softmax
    model = train_classifier(DigitsCNN(hidden=32, log_softmax=True), images[:1000], labels[:1000], steps=60,
                             loss=nn.functional.nll_loss)
    model.eval()
    _, graph = import_model(save_pt2(model, (torch.from_numpy(images[:1]),), out / "digits.pt2"))
    np.savez(out / "digits.npz", x=images[1000:], y=labels[1000:])
    calibration = load_calibration(out / "digits.npz", graph)

    noises = [float(s) for s in args.noise.split(",") if s.strip()]
    audits = []
    header = (f"{'cut':6} {'setting':10} {'bytes':>6} {'time s':>7} {'reid inv':>8} {'reid wb':>8} {'chance':>7} "
              f"{'SSIM inv':>8} {'SSIM wb':>8} {'PSNR inv':>8} {'dCor':>6} {'dFIL':>9} {'top-1':>6} {'Δtop-1':>7}")
    print(header)
    for cut in args.cuts.split(","):
        split = DeviceSplit(graph, cut)
        for sigma in [None, *noises]:
            # The noise `compile --noise sigma` adds: sigma x the sent tensor's std over the calibration data.
            setting, make = ("plain", None) if sigma is None else compiled_noise(graph, cut, calibration, sigma, seed=0)
            a = audit_cut(graph, cut, calibration, transform=make() if make else None, setting=setting.split(" (")[0], split=split)
            audits.append(a)
            print(f"{a.cut:6} {a.setting:10} {a.bytes_sent:6d} {a.seconds:7.2f} {a.inverse.reid_top1:8.3f} {a.whitebox.reid_top1:8.3f} "
                  f"{a.inverse.reid_chance:7.4f} {a.inverse.ssim:8.3f} {a.whitebox.ssim:8.3f} {a.inverse.psnr:8.2f} {a.dcor:6.3f} "
                  f"{a.dfil:9.3g} {a.accuracy:6.3f} {a.accuracy - a.accuracy_plain:+7.3f}", flush=True)
    floors = audits[0].inverse.floors
    print("floors: " + ", ".join(f"{k}: SSIM {v['ssim']:.3f} PSNR {v['psnr']:.2f} MSE {v['mse']:.4f}" for k, v in floors.items())
          + " (class-mean uses labels an attacker may not have)")
    (out / "report.json").write_text(json.dumps(audit_report_json(audits), indent=2) + "\n")
    write_reconstructions_png(audits, out / "reconstructions.png")
    print(f"wrote {out / 'report.json'} and {out / 'reconstructions.png'}")


if __name__ == "__main__":
    main()
