"""A model too big for one protobuf: 4 x Linear 8192<->16384 (2.15 GB of float32 weights),
exported, then compiled for rpi4,a100 by the CLI in a fresh process. Prints the weights' size,
the compile's wall time and the peak RSS of loading alone (`splitc inspect`) and of the whole
compile, as multiples of the weights. The goal is a peak RSS of at most 2x the weights.

    python bench/big_model.py                       # the 2.15 GB model
    python bench/big_model.py --scale 0.25          # 16x fewer weights, for a quick look

Each measurement runs in its own process (ru_maxrss of that child alone). Figures from a loaded
2-core machine say little about absolute speed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def build(width: int, hidden: int) -> nn.Module:
    """4 linears, width -> hidden -> width -> hidden -> width, seeded, scaled to keep O(1) outputs."""
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in ((width, hidden), (hidden, width), (width, hidden), (hidden, width)):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.normal_(0.0, fan_in ** -0.5)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def measured(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in bytes) of one child process running `argv`, and its exit code."""
    probe = ("import resource, subprocess, sys, time\n"
             "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:])\n"
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    seconds, rss, rc = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss), int(rc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply both widths by this (1.0: 8192 and 16384).")
    parser.add_argument("--targets", default="rpi4,a100")
    parser.add_argument("--keep", help="Keep the model and bundle in this directory.")
    args = parser.parse_args()
    width, hidden = int(8192 * args.scale), int(16384 * args.scale)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="splitc-big-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = build(width, hidden)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        tick = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(model, (torch.randn(1, width),))
        torch.export.save(program, work / "big.pt2")
        print(f"model: 4 x Linear {width}<->{hidden}, {weights / 1e9:.2f} GB of weights; exported and saved in "
              f"{time.perf_counter() - tick:.1f} s ({(work / 'big.pt2').stat().st_size / 1e9:.2f} GB archive)")
        del model, program
        splitc = [sys.executable, "-c", "import sys; from splitc.cli import main; main(sys.argv[1:])"]
        seconds, rss, rc = measured([*splitc, "inspect", str(work / "big.pt2"), "--json"])
        print(f"load + graph (splitc inspect): {seconds:.1f} s, peak RSS {rss / 1e9:.2f} GB = {rss / weights:.2f}x the weights"
              + ("" if rc == 0 else f" (exit {rc})"))
        seconds, rss, rc = measured([*splitc, "compile", str(work / "big.pt2"), "--targets", args.targets, "-o", str(work / "big.splitc")])
        print(f"compile for {args.targets}: {seconds:.1f} s, peak RSS {rss / 1e9:.2f} GB = {rss / weights:.2f}x the weights"
              + ("" if rc == 0 else f" (exit {rc})"))
        bundle = work / "big.splitc"
        if bundle.is_dir():
            files = sorted(p for p in bundle.rglob("*") if p.is_file())
            big = ", ".join(f"{p.relative_to(bundle)} {p.stat().st_size / 1e9:.2f} GB" for p in files if p.stat().st_size > 1e8)
            print(f"bundle: {sum(p.stat().st_size for p in files) / 1e9:.2f} GB in {len(files)} files ({big})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
