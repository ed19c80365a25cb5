"""`splitc bench`: one partition of a bundle timed on this host beside ONNX Runtime and PyTorch eager.

Design (the simplest honest one): the bundle already stores what each partition receives (the
boundary tensors of `reference.npz`, sample 0), and its compiled artifact. Both baselines need the
partition as a torch program, which a bundle does not carry (it is torch-free by design). So bench
rebuilds it from the model the bundle was compiled from, given as `--model model.pt2`: the model's
sha256 must equal the one in the manifest, the partitions are re-extracted with the manifest's
recorded cuts and targets, and partition K's node list must equal the manifest's. ONNX Runtime runs
the bundle's own ONNX artifact of partition K when it has one, else an ONNX export of the rebuilt
partition (the same exporter the ONNX backend uses). Without --model, only the compiled artifact
(and a bundled ONNX artifact) is timed.

All three run on this host, with the same thread count, on the same input, each timed per call with
`splitc.core.timing.time_callable` (numpy in, numpy out for the compiled artifact and ORT; torch tensors
for eager). Every output is also checked against the torch reference, so a fast wrong result shows.
An artifact for another ISA is never timed: the host twin (same partition, this host's ISA) is
timed instead and labelled so; it says nothing about the device.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitc.core.errors import BundleError, InputError, ToolchainError
from splitc.runtime.executors import available_cpus, can_run_here, host_arch, load_executor, tvm_threads
from splitc.core.manifest import (
    ROLE_DEPLOY,
    ROLE_HOST_TWIN,
    ROLE_PORTABLE,
    RUNTIME_ONNXRUNTIME,
    PartitionSpec,
)
from splitc.core.timing import Timing, time_callable

_QUIET_S = 0.5  # pause before timing each runtime (see bench_partition)


@dataclass
class BenchRow:
    runtime: str          # "compiled (tvm)", "onnxruntime", "torch eager"
    source: str           # which file / how it was obtained
    timing: Timing | None
    rel_err: float | None = None
    note: str = ""
    chosen: bool = False  # the backend the bundle ships (compile's choice)

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "source": self.source, "timing": self.timing.to_json() if self.timing else None,
                "rel_err": self.rel_err, "note": self.note, "chosen": self.chosen}


@dataclass
class BenchReport:
    bundle: str
    partition: int
    target: str
    threads: int
    host: str
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        """Each runtime's median over the compiled artifact's median (>1: the compiled one is faster)."""
        base = self.rows[0].timing
        return {r.runtime: r.timing.median_ms / base.median_ms for r in self.rows[1:] if r.timing and base}

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "partition": self.partition, "target": self.target, "threads": self.threads,
                "host": self.host, "rows": [r.to_json() for r in self.rows], "ratios": self.ratios(), "notes": self.notes}


def _rel_err(got: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    worst = 0.0
    for g, e in zip(got, expected):
        g, e = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
        worst = max(worst, float(np.linalg.norm(g - e) / (np.linalg.norm(e) or 1.0)))
    return worst


def default_threads(spec: PartitionSpec) -> int:
    """The threads the partition's TVM artifact runs with when it is this host's ISA, else the
    CPUs this process may use."""
    for artifact in spec.artifacts:
        if artifact.arch == host_arch() and tvm_threads(artifact):
            return tvm_threads(artifact)
    return available_cpus()


def bench_partition(
    bundle_path: str | Path,
    index: int,
    *,
    model: str | Path | None = None,
    threads: int | None = None,
    repeats: int = 30,
    min_seconds: float = 1.0,
    log: Callable[[str], None] = lambda _: None,
) -> BenchReport:
    from splitc.runtime import Bundle

    bundle = Bundle.open(bundle_path)
    manifest = bundle.manifest
    specs = {p.index: p for p in manifest.partitions}
    if index not in specs:
        raise InputError(f"bundle {bundle_path} has partitions {sorted(specs)}; --partition {index} is not one of them")
    spec = specs[index]
    threads = int(threads or default_threads(spec))
    report = BenchReport(str(bundle_path), index, spec.target, threads, f"{host_arch()}, {os.cpu_count()} logical CPUs")

    reference = bundle.reference()
    inputs = [reference[f"s0/{t.name}"] for t in spec.inputs]
    expected = [reference[f"s0/{t.name}"] for t in spec.outputs]

    def timed(fn: Callable[[], Any]) -> Timing:
        # Let the previous runtime's worker threads stop spinning first: on a 2-core host a pool
        # still spinning takes a core from the runtime being timed.
        gc.collect()
        time.sleep(_QUIET_S)
        return time_callable(fn, warmup=5, repeats=repeats, min_seconds=min_seconds, max_seconds=60.0)

    # 1. The compiled artifact (deploy if this host runs it, else its host twin).
    compiled = next((a for a in spec.artifacts if a.role == ROLE_DEPLOY and can_run_here(a)), None)
    label = "deploy"
    if compiled is None:
        compiled = next((a for a in spec.artifacts if a.role == ROLE_HOST_TWIN and can_run_here(a)), None)
        label = "host twin"
        if compiled is not None:
            report.notes.append(f"the deploy artifact is {spec.artifact(ROLE_DEPLOY).arch} code; timed its {host_arch()} host twin "
                                "(same partition, untuned, this host's ISA): says nothing about the device")
    if compiled is None:
        raise BundleError(f"partition {index} ({spec.target}) has no compiled artifact this host can run "
                          f"({', '.join(a.path for a in spec.artifacts)}); bench runs on the host only")
    run = load_executor(compiled, bundle.file(compiled), threads)
    log(f"timing {compiled.path} ({label})")
    got = run(inputs)
    tuning = compiled.options.get("tuning") or {}
    note = ""
    if tuning.get("tasks") is not None:
        note = (f"{tuning.get('tasks_with_record', 0)}/{tuning['tasks']} tasks with a tuning record, {tuning.get('chosen', '?')}"
                f"; schedules: {tuning.get('schedules', '?')}")
    decided = {c["backend"]: c for c in spec.choice.get("candidates", [])}
    if spec.choice:
        figure = decided.get(spec.backend, {}).get("median_ms")
        note = "; ".join(filter(None, [note, f"compile's choice ({spec.choice['how']}"
                                                + (f", {figure:.3g} ms then)" if figure is not None else ")")]))
    report.rows.append(BenchRow(f"compiled ({compiled.runtime})", f"{compiled.path} [{label}]", timed(lambda: run(inputs)),
                                _rel_err(got, expected), note, chosen=True))

    # The torch partition, rebuilt from the model (needed by torch eager, and by ORT without a bundled ONNX).
    partition = rebuild_partition(model, manifest, index) if model else None

    # 2. ONNX Runtime.
    onnx_artifact = next((a for a in spec.artifacts if a.runtime == RUNTIME_ONNXRUNTIME and a.role in (ROLE_DEPLOY, ROLE_PORTABLE)), None)
    with tempfile.TemporaryDirectory(prefix="splitc-bench-") as tmp:
        if compiled.runtime == RUNTIME_ONNXRUNTIME:
            onnx_path, source = None, ""  # the compiled artifact is ONNX Runtime itself: row 1 is that row
        elif onnx_artifact is not None:
            onnx_path, source = bundle.file(onnx_artifact), f"{onnx_artifact.path} [bundled]"
        elif partition is not None:
            from splitc.backends.onnx import export_onnx

            log("exporting the partition to ONNX for ONNX Runtime")
            onnx_path, source = export_onnx(partition, Path(tmp) / "partition.onnx"), "exported from --model"
        else:
            onnx_path, source = None, ""
            report.rows.append(BenchRow("onnxruntime", "-", None, None, "skipped: pass --model model.pt2 to export this partition"))
        if onnx_path is not None:
            run_ort = ort_runner(onnx_path, threads)
            got = run_ort(inputs)
            report.rows.append(BenchRow("onnxruntime", source, timed(lambda: run_ort(inputs)), _rel_err(got, expected)))
            del run_ort  # its thread pool goes with the session

    # 3. The other candidates compile weighed for this target (TVM when ONNX Runtime ships), built from the model.
    for backend_id in _other_candidates(manifest, spec):
        if partition is None:
            report.rows.append(BenchRow(backend_id, "-", None, None, "skipped: pass --model model.pt2 to build this candidate"))
            continue
        row = _candidate_row(backend_id, partition, inputs, expected, threads, timed, log)
        if backend_id in decided:
            row.note = "; ".join(filter(None, [row.note, f"compile: {decided[backend_id]['status']}"
                                                          + (f", {decided[backend_id]['median_ms']:.3g} ms" if "median_ms" in decided[backend_id] else "")
                                                          + (f" ({decided[backend_id]['note']})" if decided[backend_id].get("note") else "")]))
        report.rows.append(row)

    # 4. PyTorch eager on the same partition.
    if partition is None:
        report.rows.append(BenchRow("torch eager", "-", None, None, "skipped: pass --model model.pt2 (a bundle carries no torch program)"))
    else:
        import torch

        torch.set_num_threads(threads)
        tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        module = partition.module

        def run_torch():
            with torch.no_grad():
                return module(*tensors)

        got = [t.numpy() for t in run_torch()]
        report.rows.append(BenchRow("torch eager", "partition rebuilt from --model", timed(run_torch), _rel_err(got, expected)))
    return report


def _other_candidates(manifest, spec: PartitionSpec) -> list[str]:
    """The candidates for the partition's target other than the shipped backend and ONNX Runtime
    (which has its own row)."""
    from splitc.drivers.backend_choice import candidate_ids
    from splitc.targets import load_target

    summary = next(t for t in manifest.targets if t["name"] == spec.target)
    try:
        target = load_target(summary["name"])
    except Exception:  # noqa: BLE001 - a target file of another machine: its candidates are unknown here
        return []
    return [b for b in candidate_ids(target) if b not in (spec.backend, "onnxruntime")
            and (target.arch == host_arch() or b != "tensorrt")]


def _candidate_row(backend_id: str, partition, inputs, expected, threads: int, timed, log) -> BenchRow:
    """Build one candidate backend for the partition here (untuned: an empty-handed compile) and
    time what this host runs of it."""
    from splitc.backends.registry import backend_record
    from splitc.core.errors import SplitcError

    with tempfile.TemporaryDirectory(prefix="splitc-bench-") as tmp:
        log(f"building the {backend_id} candidate from the model")
        try:
            compiled = backend_record(backend_id).create().compile(partition, Path(tmp))
        except SplitcError as exc:
            return BenchRow(backend_id, "built from --model", None, None, f"could not build: {exc}")
        artifact = next((a for a in compiled.artifacts if can_run_here(a)), None)
        if artifact is None:
            return BenchRow(backend_id, "built from --model", None, None, "no artifact this host can run")
        run = load_executor(artifact, Path(artifact.path), threads)
        got = run(inputs)
        return BenchRow(backend_id, f"built from --model [{artifact.role}]", timed(lambda: run(inputs)), _rel_err(got, expected))


def ort_runner(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ToolchainError(f"cannot import onnxruntime ({exc}); pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: session.run(None, dict(zip(names, inputs)))


def rebuild_partition(model: str | Path, manifest, index: int):
    """Partition `index` re-extracted from the model with the bundle's own cuts and targets."""
    from splitc.core.errors import SplitcError
    from splitc.frontend import import_model
    from splitc.passes.cuts import CutAnalysis, resolve_cuts
    from splitc.passes.partition import assign_tiers, extract_partitions
    from splitc.targets import load_target

    _, graph = import_model(model)
    if graph.source_sha256 != manifest.model.get("sha256"):
        raise InputError(f"{model} is not the model this bundle was compiled from (sha256 differs); pass the same model file")
    try:
        targets = [load_target(t["name"]) for t in manifest.targets]
    except SplitcError as exc:
        raise InputError(f"cannot rebuild the partitions: {exc}") from exc
    analysis = CutAnalysis(graph)
    names = [c["after"] for c in manifest.plan.get("cuts", [])]
    cuts = resolve_cuts(analysis, names, targets) if names else []
    assign_tiers(analysis, cuts)
    partition = extract_partitions(graph, analysis, targets)[index]
    recorded = next(p for p in manifest.partitions if p.index == index)
    if tuple(partition.nodes) != tuple(recorded.nodes):
        raise InputError(f"partition {index} rebuilt from {model} differs from the bundle's; recompile the bundle with this splitc")
    return partition
