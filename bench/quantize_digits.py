"""Benchmark: bytes at the cut, float32 vs int8 vs int4, with top-1 agreement and accuracy, for a
small CNN trained on scikit-learn's digits (real data). Prints figures; asserts nothing.

    python bench/quantize_digits.py [--cut conv2d_1]

The quantizer ranges are calibrated on the training images; agreement and accuracy are measured on
the 597 held-out images, running the quantized graph in torch (the compiled artifacts reproduce it
bit-exactly, which the test suite verifies).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuts", default="conv1,conv2", help="module paths or node names to cut after, one at a time")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
    from splitc.frontend import import_model
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.quantize import agreement, quantize_cuts

    from examples.digits import DigitsCNN, load_digits_arrays, train_classifier

    images, labels = load_digits_arrays()
    train, held = slice(0, 1200), slice(1200, None)
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), images[train], labels[train], steps=60)
    work = Path(tempfile.mkdtemp(prefix="splitc-digits-"))
    torch.export.save(torch.export.export(model, (torch.from_numpy(images[:1]),)), work / "digits.pt2")
    _, graph = import_model(work / "digits.pt2")
    calibrate = [(torch.from_numpy(images[i : i + 1]),) for i in range(0, 1200, 4)]
    evaluate = [(torch.from_numpy(images[i : i + 1]),) for i in range(1200, len(images))]

    def accuracy(g) -> float:
        with torch.no_grad():
            predictions = [int(g.module(*s)[0].argmax()) for s in evaluate]
        return float(np.mean(np.array(predictions) == labels[held]))

    rows = []
    analysis = CutAnalysis(graph)
    base_accuracy = accuracy(graph)
    for name in args.cuts.split(","):
        cut = analysis.cut(analysis.resolve(name))
        row = {"cut": f"{name} ({cut.after})", "float32_bytes": cut.nbytes, "float32_accuracy": round(base_accuracy, 4)}
        for scheme in ("int8", "int4"):
            for per_channel in (False, True):
                key = scheme + ("_per_channel" if per_channel else "")
                quantized, (new_cut,), _ = quantize_cuts(graph, [cut.after], scheme, calibrate, per_channel=per_channel)
                q_analysis = CutAnalysis(quantized)
                row[f"{key}_bytes"] = q_analysis.cut(q_analysis.resolve(new_cut)).nbytes
                row[f"{key}_top1_agreement"] = round(agreement(graph, quantized, evaluate)["top1_agreement"], 4)
                row[f"{key}_accuracy"] = round(accuracy(quantized), 4)
        rows.append(row)
    print(json.dumps({"model": "DigitsCNN trained on 1200 sklearn digits, evaluated on 597 held out", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
