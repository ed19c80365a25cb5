"""Benchmark: compile, verify and run a ResNet-18 (Hugging Face architecture, 224x224) split
rpi4 -> a100. Prints figures; asserts nothing (speed targets are not tests).

    python bench/compile_resnet18.py [--cut resnet.encoder.stages.1] [--samples 2] [--json out.json]

Reports: export time, compile time per partition/target (the rpi4 figure includes the aarch64
cross build and its x86 host twin), verify time (the aarch64 library under qemu when provisioned),
bundle size, the chained output's max relative error against torch, and peak resident memory of
this process through compile (ru_maxrss; verify's emulated runs are separate processes).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from hf_models import resnet18  # bench/ is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cut", default="auto")
    parser.add_argument("--targets", default="rpi4,a100")
    parser.add_argument("--link", default="4g")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from splitc.drivers.compiler import compile_model

    from splitc.passes.contract import CompileOptions
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets
    from splitc.drivers.verify import verify_bundle

    work = Path(tempfile.mkdtemp(prefix="splitc-bench-"))
    figures: dict = {"model": "HF ResNet-18 (random init, BN stats set), 1x3x224x224", "targets": args.targets}
    try:
        tick = time.perf_counter()
        model = resnet18()
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        torch.export.save(torch.export.export(model, (x,)), work / "resnet18.pt2")
        _, graph = import_model(work / "resnet18.pt2")
        figures["export_and_annotate_s"] = round(time.perf_counter() - tick, 2)
        figures["gflops"] = round(graph.total_flops / 1e9, 3)
        figures["param_mb"] = round(graph.param_bytes / 1e6, 2)

        result = compile_model(graph, CompileOptions(load_targets(args.targets), cut=args.cut, link=load_link(args.link), samples=args.samples), work / "resnet18.splitc", log=lambda m: print(m, file=sys.stderr))
        figures["peak_rss_mb_through_compile"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        figures["compile_s"] = {k: round(v, 2) for k, v in result.seconds.items()}
        figures["cut"] = [c["after"] for c in result.manifest.plan["cuts"]]
        figures["bytes_crossing"] = [c["bytes"] for c in result.manifest.plan["cuts"]]
        figures["bundle_mb"] = round(sum(f.stat().st_size for f in result.bundle.rglob("*") if f.is_file()) / 1e6, 2)
        figures["artifacts_mb"] = {a.path: round(a.size / 1e6, 2) for p in result.manifest.partitions for a in p.artifacts}

        tick = time.perf_counter()
        report = verify_bundle(result.bundle, log=lambda m: print(m, file=sys.stderr))
        figures["verify_s"] = round(time.perf_counter() - tick, 2)
        figures["verify_ok"] = report.ok
        figures["verify"] = [
            {"check": c.name, "mode": c.mode, "status": c.status, "max_rel_err": c.max_rel_err, "top1": c.top1, "seconds": round(c.seconds, 2)}
            for c in report.checks
        ]
        end = report.checks[-1]
        figures["chained_max_rel_err_vs_torch"] = end.max_rel_err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
