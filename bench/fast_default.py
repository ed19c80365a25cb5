"""Benchmark: is what `splitc compile` ships by default (no tuning records) as fast as the best runtime
for each device partition? Per model and partition, on this host (the x86 twin is the device's
proxy): the time of each candidate (TVM untuned, ONNX Runtime; ExecuTorch XNNPACK when installed),
torch eager, the backend compile's measured choice picks, and the ratio of the chosen one to the
fastest of all. Prints figures; asserts nothing.

    python bench/fast_default.py [--models demo,resnet18,...] [--targets rpi4] [--image 112] [--runs 30] [--json out.json]

Each model is split as compile splits it (`--targets`, `--cut auto` on 4g; the default `rpi4` makes
the whole model the device partition, `rpi4,a100` the default split) and every partition on rpi4
is measured. The choice is made exactly as compile makes it
(drivers/backend_choice.py: compile each candidate, a quick profile of each, the fastest within
tolerance ships), with an empty tuning database. Then every candidate's artifact (TVM's host twin,
the ONNX model) and the torch partition are timed side by side in this one run: `--runs` calls each,
in three rounds of a third with a pause before each block so no runtime's spinning worker threads
take a core from the next; the median of all calls counts. Same threads (every CPU of this
process), same input (the partition's reference input). Models come from transformers configs with
random init and small sizes (`--image` pixels square, 64 tokens, fewer layers for the transformers;
each row says), so the whole table fits in one run on a 2-core host. Other processes on a shared
host add noise; the load average is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ------------------------------------------------------------------------------------------ models


def _bn_trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with trained-like statistics, so activations stay O(1) (TOOLCHAIN.md)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.3, 0.8)
    return model.eval()


class Logits(torch.nn.Module):
    """A transformers model returning one tensor (logits, or the last hidden state)."""

    def __init__(self, inner, field: str = "logits"):
        super().__init__()
        self.inner, self.field = inner, field

    def forward(self, *args):
        return getattr(self.inner(*args), self.field)


def _image(size: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(length: int = 64, vocab: int = 1000) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)),)


def demo(_size):
    from examples.small_resnet import build

    return build(), (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),), "examples/small_resnet.py, 64 px (as scripts/demo.sh)"


def resnet18(size):
    from hf_models import resnet18 as build

    return build(), _image(size), f"HF ResNet-18, {size} px"


def resnet50(size):
    from hf_models import resnet50 as build

    return build(), _image(size), f"HF ResNet-50, {size} px"


def mobilenet_v2(size):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    return (_bn_trained_like(Logits(MobileNetV2ForImageClassification(MobileNetV2Config(image_size=size)))), _image(size),
            f"HF MobileNetV2, {size} px")


def efficientnet_b0(size):
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    torch.manual_seed(0)
    return (_bn_trained_like(Logits(EfficientNetForImageClassification(EfficientNetConfig(image_size=size)))), _image(size),
            f"HF EfficientNet-B0, {size} px")


def convnext_t(size):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], image_size=size)
    return Logits(ConvNextForImageClassification(config)).eval(), _image(size), f"HF ConvNeXt-T, {size} px"


def vit(size):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=16, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                       intermediate_size=1536, num_labels=1000)
    return Logits(ViTForImageClassification(config)).eval(), _image(size), f"HF ViT-S/16 (6 layers), {size} px"


def bert(_size):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072)
    return Logits(BertForSequenceClassification(config)).eval(), _tokens(), "HF BERT-base width (4 layers), 64 tokens"


def gpt2_blocks(_size):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, n_positions=64, n_embd=768, n_layer=4, n_head=12, use_cache=False)
    return Logits(GPT2Model(config), "last_hidden_state").eval(), _tokens(), "HF GPT-2 blocks (4 x 768), 64 tokens"


def minilm(_size):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return Logits(BertModel(config), "last_hidden_state").eval(), _tokens(), "MiniLM-L6 shape (6 x 384), 64 tokens"


MODELS: dict[str, Callable] = {"demo": demo, "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
                               "efficientnet_b0": efficientnet_b0, "convnext_t": convnext_t, "vit": vit, "bert": bert,
                               "gpt2_blocks": gpt2_blocks, "minilm": minilm}


# ---------------------------------------------------------------------------------------- measuring


def side_by_side(runners: dict[str, Callable[[], object]], runs: int, rounds: int = 3) -> dict[str, float]:
    """Median ms per call of each runner: `runs` calls each, in `rounds` blocks per runner taken in
    turn, after warm-up; a pause before each block lets the previous runtime's threads go idle."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        for _ in range(2):
            fn()
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            gc.collect()
            time.sleep(0.3)
            for _ in range(per_round):
                start = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: float(np.median(values)) for name, values in samples.items()}


def bench_model(name: str, size: int, runs: int, workdir: Path, chain: str = "rpi4") -> list[dict]:
    from splitc.backends.registry import backend_record
    from splitc.core.errors import SplitcError
    from splitc.drivers.backend_choice import compile_chosen, plan_candidates
    from splitc.core.graph import sample_inputs
    from splitc.drivers.compiler import plan_partitions, reference_data
    from splitc.frontend import import_model
    from splitc.runtime.executors import available_cpus, can_run_here, load_executor
    from splitc.targets import load_link, load_targets
    from tests.models import save_pt2

    module, inputs, label = MODELS[name](size)
    pt2 = save_pt2(module, inputs, workdir / f"{name}.pt2")
    _, graph = import_model(pt2)
    targets = load_targets(chain)
    partitions = plan_partitions(graph, targets, "auto", load_link("4g"))
    reference = reference_data(graph, partitions, sample_inputs(graph, 1, inputs))
    threads = available_cpus()
    torch.set_num_threads(threads)
    rows = []
    for partition in partitions:
        if partition.target.name != "rpi4":
            continue  # a GPU partition cannot be timed here
        x = [reference[f"s0/{t.name}"] for t in partition.inputs]
        want = [reference[f"s0/{t.name}"] for t in partition.outputs]
        plan = plan_candidates(partition, None)
        started = time.perf_counter()
        chosen, _, choice = compile_chosen(plan, workdir / f"{name}-p{partition.index}", x, want)
        choose_s = time.perf_counter() - started
        runners: dict[str, Callable] = {}
        notes = [f"{c.backend} {c.status}: {c.note}" for c in choice.candidates if c.status in ("skipped", "flagged")]
        for backend in plan.backends:
            try:
                compiled = backend_record(backend.id).create().compile(partition, workdir / f"{name}-p{partition.index}-{backend.id}")
            except SplitcError as exc:  # compile skipped it too (see the choice's notes)
                notes.append(f"{backend.id} failed to build: {str(exc)[:160]}")
                continue
            artifact = next(a for a in compiled.artifacts if can_run_here(a))
            run = load_executor(artifact, Path(artifact.path), threads)
            runners[backend.id] = (lambda run=run: run(x))
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in x]
        eager = partition.module

        def run_eager():
            with torch.no_grad():
                return eager(*tensors)

        runners["torch eager"] = run_eager
        if _executorch_available():
            notes.append("executorch installed but not wired in this benchmark")
        else:
            notes.append("executorch not installed: not measured")
        medians = side_by_side(runners, runs)
        fastest = min(medians, key=medians.get)
        rows.append({"model": name, "label": label, "partition": partition.index, "nodes": len(partition.nodes),
                     "gflop": partition.flops / 1e9, "medians_ms": medians, "chosen": chosen, "fastest": fastest,
                     "ratio_to_fastest": medians[chosen] / medians[fastest], "choice_s": choose_s,
                     "choice_figures": {c.backend: c.median_ms for c in choice.candidates if c.median_ms is not None}, "notes": notes})
        for directory in workdir.glob(f"{name}-p{partition.index}*"):
            shutil.rmtree(directory, ignore_errors=True)
    return rows


def _executorch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("executorch") is not None


def print_row(row: dict) -> None:
    figures = "  ".join(f"{k} {v:8.3f}" + ("*" if k == row["chosen"] else " ") for k, v in row["medians_ms"].items())
    print(f"{row['model']:<16} p{row['partition']} {row['gflop']:7.3f} GFLOP  {figures}   chosen {row['chosen']:<12} "
          f"x{row['ratio_to_fastest']:.2f} of fastest ({row['fastest']})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--image", type=int, default=112, help="image side in pixels for the vision models (demo: 64, as scripts/demo.sh)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--targets", default="rpi4", help="target chain; partitions on rpi4 are measured")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("SPLITC_CACHE", tempfile.mkdtemp(prefix="splitc-fast-default-"))  # no tuning records
    os.environ["SPLITC_BACKEND_CHOICE"] = "measure"
    print(f"targets {args.targets}, vision models at {args.image} px; host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of {args.runs} runs, ms per call; "
          "* = compile's choice (TVM = untuned host twin)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="splitc-fast-default-") as tmp:
        for name in args.models.split(","):
            try:
                for row in bench_model(name, args.image, args.runs, Path(tmp), args.targets):
                    print_row(row)
                    for note in row["notes"]:
                        print(f"{'':<16}    note: {note}", flush=True)
                    rows.append(row)
            except Exception as exc:  # noqa: BLE001 - a model that fails is reported, the table goes on
                print(f"{name:<16} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                rows.append({"model": name, "error": str(exc).splitlines()[0]})
    ratios = [r["ratio_to_fastest"] for r in rows if "ratio_to_fastest" in r]
    if ratios:
        print(f"worst chosen/fastest: x{max(ratios):.2f} over {len(ratios)} partitions; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
