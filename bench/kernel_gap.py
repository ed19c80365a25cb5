"""Benchmark: where a compiled TVM partition loses time to ONNX Runtime, kernel by kernel.

    python bench/kernel_gap.py model.splitc --model model.pt2 [--partition 0] [--calls 60]

Times the partition's TVM deploy library on this host call by call, with each kernel timed inside
the whole model (Relax VM instrument: the weights and activations are as warm as in a real run),
and ONNX Runtime on the same partition with its profiler. Prints both kernel lists in execution
order with per-kernel medians, the sums, and whole-call medians measured in alternating bursts, so
a gap in the whole call can be told apart from overhead between kernels. Names differ between the
two runtimes (TVM fuses conv+bias+add+relu into one task, ORT into one NCHWc Conv node); read the
two lists side by side. Prints figures; asserts nothing.
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


def tvm_kernels(library: Path, inputs: list[np.ndarray], threads: int, calls: int) -> list[tuple[str, float]]:
    import tvm
    from tvm import relax

    from splitc.runtime.executors import use_tvm_threads

    use_tvm_threads(threads)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in inputs]
    main = vm["main"]
    for _ in range(10):
        main(*args)
    spans: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    state = {"index": 0, "start": 0.0}

    def instrument(_func, name, before, _ret, *_args):
        if before:
            state["start"] = time.perf_counter()
        else:
            spans[(state["index"], str(name))].append(time.perf_counter() - state["start"])
            state["index"] += 1
        return 0

    vm.set_instrument(instrument)
    for _ in range(calls):
        state["index"] = 0
        main(*args)
    return [(name, statistics.median(times) * 1e3) for (_, name), times in sorted(spans.items())
            if not name.startswith("vm.builtin.")]


def ort_kernels(onnx_path: Path, inputs: list[np.ndarray], threads: int, calls: int, workdir: Path) -> list[tuple[str, float]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "ort-profile")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    for _ in range(10 + calls):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    spans: dict[str, list[float]] = collections.defaultdict(list)
    order: dict[str, int] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = f"{event['args'].get('op_name', '?')} {event['name'].removesuffix('_kernel_time')}"
            order.setdefault(key, len(order))
            spans[key].append(event["dur"] / 1e3)
    return [(key, statistics.median(spans[key][-calls:])) for key in sorted(spans, key=order.get)]


def whole_calls(runs: dict, bursts: int = 8, per_burst: int = 30) -> dict[str, float]:
    """Median of burst medians, the runtimes alternating burst by burst."""
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
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()

    import tvm
    from tvm import relax

    from splitc.backends.onnx import export_onnx
    from splitc.bench import _ort_runner, _rebuild_partition, default_threads
    from splitc.runtime import Bundle
    from splitc.runtime.manifest import ROLE_DEPLOY, RUNTIME_TVM

    bundle = Bundle.open(args.bundle)
    spec = next(p for p in bundle.manifest.partitions if p.index == args.partition)
    artifact = next(a for a in spec.artifacts if a.role == ROLE_DEPLOY and a.runtime == RUNTIME_TVM)
    threads = int(default_threads(spec))
    reference = bundle.reference()
    inputs = [reference[f"s0/{t.name}"] for t in spec.inputs]
    with tempfile.TemporaryDirectory(prefix="splitc-kernel-gap-") as tmp:
        onnx_path = export_onnx(_rebuild_partition(args.model, bundle.manifest, args.partition), Path(tmp) / "partition.onnx")
        tvm_rows = tvm_kernels(bundle.file(artifact), inputs, threads, args.calls)
        ort_rows = ort_kernels(onnx_path, inputs, threads, args.calls, Path(tmp))

        vm = relax.VirtualMachine(tvm.runtime.load_module(str(bundle.file(artifact))), tvm.cpu())
        tvm_args = [tvm.runtime.tensor(x) for x in inputs]
        run_ort = _ort_runner(onnx_path, threads)  # configured as `splitc bench` runs ONNX Runtime
        whole = whole_calls({"tvm": lambda: vm["main"](*tvm_args), "onnxruntime": lambda: run_ort(inputs)})

    for title, rows in (("TVM (in-model, VM instrument)", tvm_rows), ("ONNX Runtime (profiler)", ort_rows)):
        print(f"{title}: {len(rows)} kernels, sum of medians {sum(ms for _, ms in rows):.3f} ms")
        for name, ms in rows:
            print(f"  {ms:8.3f} ms  {name}")
    print(f"whole call ({threads} threads, alternating bursts): TVM {whole['tvm']:.3f} ms, ONNX Runtime {whole['onnxruntime']:.3f} ms, "
          f"ratio {whole['tvm'] / whole['onnxruntime']:.3f}")


if __name__ == "__main__":
    main()
