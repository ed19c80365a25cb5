"""Benchmark: untuned vs MetaSchedule-tuned TVM vs ONNX Runtime vs PyTorch eager, whole model on this
host, for HF ResNet-18 and MobileNetV2 at 1x3x224x224 (random init, O(1) activations).

    python bench/tuned_vs_ort.py [--models resnet18,mobilenet_v2] [--budget 15m] [--json out.json]

For each model: compile for target x86 with tuning off (SPLITC_TUNING=0), tune with `--budget` of
wall clock into the tuning database ($SPLITC_CACHE), compile again (applies the records, keeps the
faster of tuned/untuned), then `splitc bench` each bundle's partition 0 with ORT and torch beside it.
Prints figures; asserts nothing. The tuning budget is printed with every tuned figure: a short budget
is a short budget, not what TVM reaches with a full search.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_resnet18 import resnet18


def mobilenet_v2() -> torch.nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000)).eval()
    with torch.no_grad():
        for module in model.modules():  # trained-like statistics keep activations O(1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.8, 1.2)
            elif isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).logits

    return Logits(model).eval()


MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--budget", default="15m", help="tuning wall clock per model (e.g. 15m, 3m)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from splitc.backends import tuning
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets
    from tvm.relax.frontend.torch import from_exported_program

    from splitc.bench import bench_partition
    from splitc.cli_tune import parse_budget
    from splitc.compiler import compile_model
    from splitc.verify import verify_bundle

    seconds = parse_budget(args.budget)
    work = Path(tempfile.mkdtemp(prefix="splitc-tuned-vs-ort-"))
    results = {"host": f"{os.cpu_count()} logical CPUs", "tuning_budget_s_per_model": seconds,
               "cache": str(tuning.tuning_root()), "models": {}}
    try:
        for name in args.models.split(","):
            figures: dict = {}
            model = MODELS[name]()
            x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            pt2 = work / f"{name}.pt2"
            with torch.no_grad():
                program = torch.export.export(model, (x,))
            torch.export.save(program, pt2)
            _, graph = import_model(pt2)
            target = load_targets("x86")

            os.environ["SPLITC_TUNING"] = "0"
            untuned = compile_model(graph, target, work / f"{name}.untuned.splitc", link=load_link("4g"), samples=1)
            os.environ.pop("SPLITC_TUNING")

            tick = time.perf_counter()
            mod = from_exported_program(program, keep_params_as_input=False)
            report = tuning.tune_module(mod, dict(target[0].backend_options["target"]), seconds=seconds,
                                        log=lambda m: print(m, file=sys.stderr))
            figures["tuning"] = {"wall_s": round(time.perf_counter() - tick, 1), "tasks": report.tasks,
                                 "tasks_with_record": report.coverage.with_record, "new_records": report.new_records,
                                 "stopped": report.stopped}
            tuned = compile_model(graph, target, work / f"{name}.tuned.splitc", link=load_link("4g"), samples=1)
            figures["tuned_compile"] = tuned.manifest.partitions[0].artifacts[0].options["tuning"]
            figures["tuned_verify_ok"] = verify_bundle(tuned.bundle).ok

            for label, bundle in (("untuned", untuned.bundle), ("tuned", tuned.bundle)):
                bench = bench_partition(bundle, 0, model=pt2, repeats=args.repeats)
                figures[label] = {r.runtime: r.timing.median_ms for r in bench.rows if r.timing}
                figures["threads"] = bench.threads
            tvm_u, tvm_t = figures["untuned"]["compiled (tvm)"], figures["tuned"]["compiled (tvm)"]
            ort, eager = figures["tuned"]["onnxruntime"], figures["tuned"]["torch eager"]
            figures["ms"] = {"tvm_untuned": tvm_u, "tvm_tuned": tvm_t, "onnxruntime": ort, "torch_eager": eager}
            figures["ratios"] = {"untuned/tuned": tvm_u / tvm_t, "tuned/ort": tvm_t / ort, "tuned/torch": tvm_t / eager}
            results["models"][name] = figures
            print(f"{name}: TVM untuned {tvm_u:.2f} ms, TVM tuned ({args.budget} budget, "
                  f"{figures['tuning']['tasks_with_record']}/{report.tasks} tasks with a record) {tvm_t:.2f} ms, "
                  f"ONNX Runtime {ort:.2f} ms, torch eager {eager:.2f} ms; tuned is {tvm_t / ort:.1f}x ORT, "
                  f"{tvm_t / eager:.1f}x torch, {tvm_u / tvm_t:.1f}x faster than untuned", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
