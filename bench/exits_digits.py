"""Benchmark: early exits on scikit-learn's digits. Prints figures; asserts nothing.

    python bench/exits_digits.py [--drops 0.5,1,2,5]

A digits CNN is trained on 900 images; 600 more (shuffled from the rest) calibrate the exit heads,
and the last 297 are never seen by the compiler. For each accuracy budget the bundle is compiled
(TVM on the device, ONNX Runtime in the cloud, cut after the second convolution, a head at each
of the two convolutions) and run with the splitc runtime on the unseen images: the share answered
on the device, and the accuracy against running every input to the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", default="0.5,1,2,5", help="--max-accuracy-drop values (points)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
    from examples.digits import DigitsCNN, load_digits_arrays, train_classifier
    from splitc.drivers.compiler import compile_model
    from splitc.passes.contract import CompileData, CompileOptions
    from splitc.frontend import import_model
    from splitc.runtime import Bundle, SplitSession
    from splitc.targets import load_link, load_targets
    from tests.models import save_pt2

    images, labels = load_digits_arrays()
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(width=8), images[:900], labels[:900], steps=120)
    pool = 900 + np.random.default_rng(0).permutation(len(images) - 900)
    calib, test = pool[:600], pool[600:]
    samples = [(torch.from_numpy(images[i:i + 1]),) for i in calib]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, graph = import_model(save_pt2(model, (torch.from_numpy(images[:1]),), Path(tmp) / "digits.pt2"))
        for drop in (float(d) for d in args.drops.split(",")):
            tick = time.perf_counter()
            result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut="relu_1", link=load_link("4g"), exits="relu,relu_1", max_accuracy_drop=drop), Path(tmp) / f"d{drop}.splitc", data=CompileData(calibration=samples, labels=labels[calib]))
            seconds = time.perf_counter() - tick
            session = SplitSession(Bundle.open(result.bundle))
            name = session.manifest.outputs[0].name
            answers = [session.infer([images[i:i + 1]]) for i in test]
            full = [session.run([images[i:i + 1]], exits=False)[name].argmax() for i in test]
            accuracy = np.mean([a.outputs[name].argmax() == labels[i] for a, i in zip(answers, test)])
            accuracy_full = np.mean([f == labels[i] for f, i in zip(full, test)])
            per_head = {h.index: sum(a.exit == h.index for a in answers) / len(test) for h in session.manifest.exits}
            heads = ", ".join(f"{h.at}: t={h.threshold:.3f} {per_head[h.index]:.1%}" for h in session.manifest.exits) or "none kept"
            rows.append((drop, len(session.manifest.exits), sum(per_head.values()), accuracy_full, accuracy, heads, seconds))
    print(f"digits CNN; {len(calib)} calibration images (heads trained on half, thresholds set on the other), {len(test)} unseen")
    print(f"{'budget':>7} {'heads':>5} {'on device':>9} {'acc. full':>9} {'acc. exits':>10} {'change':>7}  {'compile s':>9}  per head")
    for drop, kept, rate, full, acc, heads, seconds in rows:
        print(f"{drop:>6g}p {kept:>5} {rate:>9.1%} {full:>9.2%} {acc:>10.2%} {100 * (acc - full):>+6.1f}p  {seconds:>9.1f}  {heads}")


if __name__ == "__main__":
    main()
