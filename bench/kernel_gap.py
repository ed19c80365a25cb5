"""Benchmark: where a compiled TVM partition loses time to ONNX Runtime, kernel by kernel.

    python bench/kernel_gap.py model.splitc --model model.pt2 [--partition 0] [--bursts 8] [--per-burst 30]

Times the partition's TVM deploy library on this host call by call, with each kernel timed inside
the whole model (Relax VM instrument: the weights and activations are as warm as in a real run),
and ONNX Runtime on the same partition with its profiler. Prints both kernel lists in execution
order with per-kernel medians, the sums, and whole-call medians, so a gap in the whole call can be
told apart from overhead between kernels. The four runners (TVM and ONNX Runtime, each plain and
instrumented) take turns burst by burst: on a noisy host, phases run one after another measured
the host's moods rather than the gap. Names differ between the two runtimes (TVM fuses
conv+bias+add+relu into one task, ORT into one NCHWc Conv node); read the two lists side by side.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class TvmKernelTimer:
    """The deploy library in a Relax VM whose instrument times every kernel call inside the model."""

    def __init__(self, library: Path, inputs: list[np.ndarray]):
        import tvm
        from tvm import relax

        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
        self.args = [tvm.runtime.tensor(x) for x in inputs]
        self.spans: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
        self._index, self._start = 0, 0.0
        self.vm.set_instrument(self._instrument)

    def _instrument(self, _func, name, before, _ret, *_args):
        if before:
            self._start = time.perf_counter()
        else:
            self.spans[(self._index, str(name))].append(time.perf_counter() - self._start)
            self._index += 1
        return 0

    def __call__(self) -> None:
        self._index = 0
        self.vm["main"](*self.args)

    def rows(self, calls: int) -> list[tuple[str, float]]:
        return [(name, statistics.median(times[-calls:]) * 1e3) for (_, name), times in sorted(self.spans.items())
                if not name.startswith("vm.builtin.")]


class OrtKernelTimer:
    """ONNX Runtime on the partition with its profiler on (one event per node per call)."""

    def __init__(self, onnx_path: Path, inputs: list[np.ndarray], threads: int, workdir: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(workdir / "ort-profile")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.feed = {i.name: x for i, x in zip(self.session.get_inputs(), inputs)}

    def __call__(self) -> None:
        self.session.run(None, self.feed)

    def rows(self, calls: int) -> list[tuple[str, float]]:
        events = json.loads(Path(self.session.end_profiling()).read_text())
        spans: dict[str, list[float]] = collections.defaultdict(list)
        order: dict[str, int] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = f"{event['args'].get('op_name', '?')} {event['name'].removesuffix('_kernel_time')}"
                order.setdefault(key, len(order))
                spans[key].append(event["dur"] / 1e3)
        return [(key, statistics.median(spans[key][-calls:])) for key in sorted(spans, key=order.get)]


def interleaved(runs: dict, bursts: int, per_burst: int, warmup: int = 10) -> dict[str, float]:
    """Run every runner in turn, burst by burst, so each sees the same host; returns, for each, the
    median of its burst medians (whole calls). Kernel timers collect their own spans meanwhile."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    medians: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(bursts):
        for name, run in runs.items():
            time.sleep(0.3)  # let the other runtime's pool stop spinning
            times = []
            for _ in range(per_burst):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(values) for name, values in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--model", required=True, help="the .pt2 the bundle was compiled from (to export the partition for ORT)")
    parser.add_argument("--bursts", type=int, default=8, help="rounds; each runs every runner once")
    parser.add_argument("--per-burst", type=int, default=30, help="calls per runner per round")
    parser.add_argument("--json", dest="json_path", help="also write the kernel lists and whole calls here")
    args = parser.parse_args()

    import tvm
    from tvm import relax

    from splitc.backends.onnx import export_onnx
    from splitc.drivers.bench import ort_runner, rebuild_partition, default_threads
    from splitc.runtime import Bundle
    from splitc.runtime.executors import use_tvm_threads
    from splitc.core.manifest import ROLE_DEPLOY, RUNTIME_TVM

    bundle = Bundle.open(args.bundle)
    spec = next(p for p in bundle.manifest.partitions if p.index == args.partition)
    artifact = next(a for a in spec.artifacts if a.role == ROLE_DEPLOY and a.runtime == RUNTIME_TVM)
    threads = int(default_threads(spec))
    reference = bundle.reference()
    inputs = [reference[f"s0/{t.name}"] for t in spec.inputs]
    use_tvm_threads(threads)
    calls = args.bursts * args.per_burst
    with tempfile.TemporaryDirectory(prefix="splitc-kernel-gap-") as tmp:
        onnx_path = export_onnx(rebuild_partition(args.model, bundle.manifest, args.partition), Path(tmp) / "partition.onnx")
        tvm_timer = TvmKernelTimer(bundle.file(artifact), inputs)
        ort_timer = OrtKernelTimer(onnx_path, inputs, threads, Path(tmp))
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(bundle.file(artifact))), tvm.cpu())
        tvm_args = [tvm.runtime.tensor(x) for x in inputs]
        run_ort = ort_runner(onnx_path, threads)  # configured as `splitc bench` runs ONNX Runtime
        whole = interleaved({"tvm": lambda: vm["main"](*tvm_args), "onnxruntime": lambda: run_ort(inputs),
                             "tvm-instrumented": tvm_timer, "onnxruntime-profiled": ort_timer},
                            args.bursts, args.per_burst)
        tvm_rows, ort_rows = tvm_timer.rows(calls), ort_timer.rows(calls)

    for title, rows in (("TVM (in-model, VM instrument)", tvm_rows), ("ONNX Runtime (profiler)", ort_rows)):
        print(f"{title}: {len(rows)} kernels, sum of medians {sum(ms for _, ms in rows):.3f} ms")
        for name, ms in rows:
            print(f"  {ms:8.3f} ms  {name}")
    print(f"whole call ({threads} threads, interleaved bursts): TVM {whole['tvm']:.3f} ms, ONNX Runtime {whole['onnxruntime']:.3f} ms, "
          f"ratio {whole['tvm'] / whole['onnxruntime']:.3f}; instrumented TVM {whole['tvm-instrumented']:.3f}, "
          f"profiled ONNX Runtime {whole['onnxruntime-profiled']:.3f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"tvm": tvm_rows, "onnxruntime": ort_rows, "whole_ms": whole}, indent=1))


if __name__ == "__main__":
    main()
