"""Measured latency profiles: the analytic cost model, calibrated by timing compiled segments.

`profile_target` cuts a graph into a few consecutive segments, compiles each with every candidate
backend compile would weigh for the target (drivers/backend_choice.py; the target's own backend
only over RPC or with SPLITC_BACKEND_CHOICE=preferred), keeps the fastest, runs it where the target's code really runs (this host, or a device over TVM RPC) and times
it. `Profile.node_ms` then spreads each segment's measured median over its nodes in proportion to
the analytic model (`passes.cost_model.compute_ms`), so the planner keeps per-node resolution and
every segment sums exactly to what was measured.

What a profile measures:
  - on this host: one call of the loaded executor (`runtime.executors.load_executor`) on numpy
    inputs, as `splitc run` would make it: input/output copies between numpy and the backend
    included, timed with `splitc.core.timing.time_callable`;
  - over RPC (TVM targets): the VM's `main` on tensors already on the device, timed on the device by
    TVM's `time_evaluator` (no network, no copies).
Each segment's figure includes one call's fixed overhead, so a partition made of k segments is
charged k overheads; with 8 segments of a small model that is visible (see tests/test_profile.py).

Refused rather than guessed: a TensorRT target without TensorRT and a GPU here, and a target whose
ISA differs from this host's unless --rpc names a real device. Emulated timings are never reported.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from splitc.backends.tvm.rpc import parse_rpc_address
from splitc.core.errors import BackendError, InputError, SplitcError, TargetError, ToolchainError, first_line
from splitc.core.graph import TIER, ModelGraph
from splitc.passes.cost_model import compute_ms
from splitc.passes.cuts import CutAnalysis
from splitc.runtime.executors import can_run_here, host_arch, load_executor
from splitc.core.manifest import ROLE_DEPLOY, Artifact, TensorSpec, sha256_file
from splitc.targets import Target, load_target
from splitc.core.timing import Timing, time_callable

FORMAT = "splitc-profile"
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SegmentTiming:
    start_position: int   # first position in CutAnalysis.order (inclusive)
    end_position: int     # last position (inclusive); the segment boundary falls after it
    first_node: str       # name of the node at start_position
    last_node: str        # name of the node at end_position
    measured: Timing
    estimated_ms: float   # analytic model's figure for the same positions
    backend: str = ""     # the backend `measured` is of: the fastest candidate, as compile would choose
    candidates: dict[str, float] = field(default_factory=dict)  # every candidate backend's median ms

    def to_json(self) -> dict[str, Any]:
        return {
            "start_position": self.start_position,
            "end_position": self.end_position,
            "first_node": self.first_node,
            "last_node": self.last_node,
            "measured": self.measured.to_json(),
            "estimated_ms": self.estimated_ms,
            **({"backend": self.backend, "candidates": self.candidates} if self.backend else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentTiming:
        return cls(
            start_position=int(data["start_position"]),
            end_position=int(data["end_position"]),
            first_node=str(data["first_node"]),
            last_node=str(data["last_node"]),
            measured=Timing.from_json(data["measured"]),
            estimated_ms=float(data["estimated_ms"]),
            backend=str(data.get("backend") or ""),
            candidates={str(k): float(v) for k, v in (data.get("candidates") or {}).items()},
        )

    @property
    def ratio(self) -> float:
        """Measured median over the analytic estimate (inf when the model says 0)."""
        return self.measured.median_ms / self.estimated_ms if self.estimated_ms > 0 else math.inf


@dataclass
class Profile:
    target: str
    measured_on: str      # "host x86_64 NAME (...)" or "rpc HOST:PORT"
    model_sha256: str
    segments: list[SegmentTiming] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return float(sum(s.measured.median_ms for s in self.segments))

    @property
    def positions(self) -> int:
        """How many positions (CutAnalysis.order entries) the profile covers."""
        return self.segments[-1].end_position + 1 if self.segments else 0

    def node_ms(self, analysis: CutAnalysis, target: Target | None = None) -> np.ndarray:
        """Per-position milliseconds for `analysis.order`: the analytic figures of each segment
        scaled so that the segment sums to its measured median.

        `target` gives the analytic per-node shape; by default the builtin target of this profile's
        name (pass the Target when the profile came from a target file)."""
        if target is None:
            target = load_target(self.target)
        elif target.name != self.target:
            raise InputError(f"this profile was measured for target {self.target}, not {target.name}; profile {target.name} or pass its profile")
        self._check_matches(analysis)
        analytic = compute_ms(analysis.order, target)
        result = np.zeros(len(analysis.order), dtype=np.float64)
        for seg in self.segments:
            span = slice(seg.start_position, seg.end_position + 1)
            weights = analytic[span]
            if weights.sum() <= 0:  # the model gives nothing to go by: spread over the operators
                weights = analysis.is_op[span].astype(np.float64)
                if weights.sum() <= 0:
                    weights = np.ones(seg.end_position - seg.start_position + 1)
            result[span] = weights * (seg.measured.median_ms / weights.sum())
        return result

    def _check_matches(self, analysis: CutAnalysis) -> None:
        n = len(analysis.order)
        stale = f"re-run `splitc profile` for {analysis.graph.name}"
        if self.positions != n:
            raise InputError(f"profile covers {self.positions} graph positions, {analysis.graph.name} has {n}; {stale}")
        for seg in self.segments:
            names = (analysis.order[seg.start_position].name, analysis.order[seg.end_position].name)
            if names != (seg.first_node, seg.last_node):
                raise InputError(
                    f"profile segment {seg.first_node}..{seg.last_node} does not match {analysis.graph.name} "
                    f"({names[0]}..{names[1]} at those positions); {stale}"
                )

    # ---- serialisation

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "target": self.target,
            "measured_on": self.measured_on,
            "model_sha256": self.model_sha256,
            "segments": [s.to_json() for s in self.segments],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{source} is not a splitc profile (no \"format\": \"{FORMAT}\"); create one with `splitc profile`")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(
                f"{source} has profile schema version {data.get('schema_version')!r}, this splitc reads {SCHEMA_VERSION}; re-run `splitc profile`"
            )
        try:
            profile = cls(
                target=str(data["target"]),
                measured_on=str(data["measured_on"]),
                model_sha256=str(data["model_sha256"]),
                segments=[SegmentTiming.from_json(s) for s in data["segments"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{source} is a malformed profile ({type(exc).__name__}: {exc}); re-run `splitc profile`") from exc
        profile._check_contiguous(source)
        return profile

    def _check_contiguous(self, source: str) -> None:
        expected = 0
        for seg in self.segments:
            if seg.start_position != expected or seg.end_position < seg.start_position:
                raise InputError(f"{source} is a malformed profile (segments do not cover consecutive positions); re-run `splitc profile`")
            if not (seg.measured.median_ms >= 0 and math.isfinite(seg.measured.median_ms)):
                raise InputError(f"{source} is a malformed profile (segment median {seg.measured.median_ms}); re-run `splitc profile`")
            expected = seg.end_position + 1
        if not self.segments:
            raise InputError(f"{source} is a malformed profile (no segments); re-run `splitc profile`")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, model_sha256: str | None = None) -> Profile:
        """Read a profile; with `model_sha256`, refuse one measured on another model file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"profile {path} does not exist; create it with `splitc profile MODEL --target TARGET -o {path}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"profile {path} is not readable JSON ({str(exc).splitlines()[0]}); re-run `splitc profile`") from exc
        profile = cls.from_json(data, source=f"profile {path}")
        if model_sha256 is not None and profile.model_sha256 != model_sha256:
            raise InputError(
                f"profile {path} was measured on model sha256 {profile.model_sha256[:12]}..., this model is {model_sha256[:12]}...; "
                "re-run `splitc profile` on this model"
            )
        return profile


# ----------------------------------------------------------------------------------------- segments


def segment_bounds(analysis: CutAnalysis, target: Target, segments: int = 8) -> list[tuple[int, int]]:
    """Up to `segments` consecutive (start, end) position ranges covering the whole order.

    Boundaries are valid cut positions near k/segments of the cumulative analytic time; within each
    window (±half a segment around that point) the position with the fewest crossing bytes wins, so
    segments pass small boundary tensors. Fewer segments come back when windows hold no valid cut.
    """
    if segments < 1:
        raise ValueError("segments must be at least 1")
    n = len(analysis.order)
    valid = analysis.valid_positions()
    ms = compute_ms(analysis.order, target)
    cumulative = np.cumsum(ms)
    if cumulative[-1] <= 0:  # no analytic time at all: spread by position instead
        cumulative = np.arange(1, n + 1, dtype=np.float64)
    total = float(cumulative[-1])
    crossing = analysis.crossing_bytes()
    chosen: list[int] = []
    for k in range(1, segments):
        aim = k * total / segments
        lo, hi = aim - 0.5 * total / segments, aim + 0.5 * total / segments
        window = valid[(cumulative[valid] >= lo) & (cumulative[valid] < hi)]
        if len(window) == 0:
            continue
        # fewest bytes first, then closest to the aim
        best = min(window, key=lambda p: (int(crossing[p]), abs(float(cumulative[p]) - aim)))
        if not chosen or best > chosen[-1]:
            chosen.append(int(best))
    starts = [0] + [b + 1 for b in chosen]
    ends = chosen + [n - 1]
    return list(zip(starts, ends))


# ----------------------------------------------------------------------------------------- profiling


def host_description() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown CPU"
    return f"host {host_arch()} {socket.gethostname()} ({cpu}, {os.cpu_count()} CPUs)"


def check_profilable(target: Target, rpc: str | None) -> None:
    """Refuse, with what to do instead, a target whose timings this host cannot produce."""
    from splitc.backends.registry import backend_records, target_backend

    backend = target_backend(target)
    if rpc and not backend.rpc:
        remote = ", ".join(r.display_name for r in backend_records() if r.rpc)
        raise TargetError(f"--rpc times {remote} modules only; target {target.name} uses {backend.id}: "
                          f"run `splitc profile` on a host of that target instead")
    if not rpc and not backend.usable_here():
        raise TargetError(
            f"target {target.name} runs {backend.runtime} artifacts ({backend.description}), which cannot be built or run on this host; "
            + ("profile it on the GPU host" if backend.runtime_record.gpu else "profile it on a host that has that runtime")
        )
    if rpc:
        parse_rpc_address(rpc)
        return
    if target.arch != host_arch():
        if backend.rpc:
            raise TargetError(
                f"target {target.name} is {target.arch} and this host is {host_arch()}: timings on this host or under emulation say nothing "
                f"about a {target.description or target.name}; pass --rpc HOST:PORT of a device running `python -m tvm.exec.rpc_server`"
            )
        raise TargetError(f"target {target.name} is {target.arch} and this host is {host_arch()}; run `splitc profile` on a {target.arch} host of that target")


def profile_target(
    graph: ModelGraph,
    target: Target | str,
    *,
    segments: int = 8,
    rpc: str | None = None,
    workdir: str | Path | None = None,
    log: Callable[[str], None] = print,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.2,
    max_seconds: float = 30.0,
) -> Profile:
    """Compile `graph` as up to `segments` consecutive partitions for `target`, time each, and
    return the profile. Uses a temporary work directory unless `workdir` is given (kept then)."""
    if isinstance(target, str):
        target = load_target(target)
    check_profilable(target, rpc)
    analysis = CutAnalysis(graph)  # private: its TIER tags are restored before returning
    bounds = segment_bounds(analysis, target, segments)
    partitions = _segment_partitions(graph, analysis, bounds, target)
    estimates = compute_ms(analysis.order, target)

    from splitc.backends.registry import backend_record
    from splitc.drivers.backend_choice import plan_candidates  # imports torch / the compiler lazily

    # Each segment is timed on every candidate backend compile would weigh for the target (over RPC:
    # those that time remotely; a target that cannot be timed here: its own), and keeps the fastest,
    # so plans price the code that ships. A candidate lacking an operator is skipped for that segment.
    plans = [plan_candidates(partition, None) for partition in partitions]
    for plan in plans:
        plan.backends = [b for b in plan.backends if (backend_record(b.id).rpc if rpc else backend_record(b.id).usable_here())]
        if not plan.measure or not plan.backends:
            plan.backends = plan.backends[:1] or [backend_record(target.backend).create()]

    timer_options = dict(warmup=warmup, repeats=repeats, min_seconds=min_seconds, max_seconds=max_seconds)
    measured_on = f"rpc {rpc.strip()}" if rpc else host_description()
    log(f"profiling {graph.name} on target {target.name} in {len(bounds)} segment(s), measured on {measured_on}")
    if not rpc and target.tier == "cloud":
        log(f"note: these are timings of this host; they stand for {target.name} ({target.description}) only if this host is one")
    with _workdir(workdir) as root:
        remote = _RemoteTVM(rpc) if rpc else None
        timings: list[SegmentTiming] = []
        for (start, end), partition, plan in zip(bounds, partitions, plans):
            seg_dir = root / f"s{partition.index}"  # one folder per candidate when there are several
            by_backend = {backend.id: _time_segment(backend, partition, target, seg_dir / backend.id if len(plan.backends) > 1 else seg_dir,
                                                    remote, timer_options) for backend in plan.backends}
            fastest = min(by_backend, key=lambda b: by_backend[b].median_ms)
            measured = by_backend[fastest]
            estimated = float(estimates[start : end + 1].sum())
            seg = SegmentTiming(start, end, analysis.order[start].name, analysis.order[end].name, measured, estimated, fastest,
                                {b: round(t.median_ms, 4) for b, t in by_backend.items()})
            timings.append(seg)
            others = ", ".join(f"{b} {t.median_ms:.4f} ms" for b, t in by_backend.items() if b != fastest)
            log(
                f"segment {partition.index}: positions {start}..{end} ({seg.first_node} .. {seg.last_node}, {len(partition.nodes)} ops): "
                f"{measured.median_ms:.4f} ms measured on {fastest} (p10 {measured.p10_ms:.4f}, p90 {measured.p90_ms:.4f}, "
                f"n={measured.repeats}{'; ' + others if others else ''}), {estimated:.4f} ms analytic"
            )
    return Profile(target.name, measured_on, graph.source_sha256, timings)


def _time_segment(backend, partition, target: Target, seg_dir: Path, remote, timer_options: dict) -> Timing:
    """Compile one segment with `backend` and time its deploy artifact here or on the RPC device."""
    compiled = backend.compile(partition, seg_dir)
    deploy = [a for a in compiled.artifacts if a.role == ROLE_DEPLOY]
    if len(deploy) != 1:
        raise BackendError(f"the {backend.id} backend gave no deploy artifact for segment {partition.index} of {target.name}; nothing to time")
    artifact = _manifest_artifact(deploy[0], seg_dir)
    inputs = _example_arrays(partition.inputs, seed=partition.index)
    if remote is not None:
        return remote.time(deploy[0].path, f"s{partition.index}_{deploy[0].path.name}", inputs, **timer_options)
    if not can_run_here(artifact):
        raise TargetError(f"segment {partition.index} of {target.name} ({artifact.runtime}, {artifact.arch}) cannot run on this host; profile on the target")
    run = load_executor(artifact, deploy[0].path)
    run(inputs)  # the first call loads lazily; a failure here should not look like a timing
    measured = time_callable(lambda: run(inputs), **timer_options)
    del run
    return measured


def _segment_partitions(graph: ModelGraph, analysis: CutAnalysis, bounds: list[tuple[int, int]], target: Target):
    """One self-contained partition per segment, leaving the graph's TIER tags as they were."""
    from splitc.passes.partition import assign_tiers, extract_partitions

    missing = object()
    saved = {node: node.meta.get(TIER, missing) for node in analysis.order}
    try:
        cuts = [analysis.cut(end) for _, end in bounds[:-1]]
        assign_tiers(analysis, cuts)
        return extract_partitions(graph, analysis, [target] * len(bounds))
    finally:
        for node, value in saved.items():
            if value is missing:
                node.meta.pop(TIER, None)
            else:
                node.meta[TIER] = value


def _manifest_artifact(compiled, root: Path) -> Artifact:
    path = Path(compiled.path)
    return Artifact(
        path=str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
        sha256=sha256_file(path),
        size=path.stat().st_size,
        runtime=compiled.runtime,
        role=compiled.role,
        arch=compiled.arch,
        options=dict(compiled.options),
    )


def _example_arrays(specs: tuple[TensorSpec, ...], seed: int) -> list[np.ndarray]:
    """Standard-normal floats, zeros for integers and booleans (always valid indices and masks)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        if spec.dtype == "bfloat16":
            try:
                import ml_dtypes
            except ImportError as exc:
                raise ToolchainError("a bfloat16 segment input needs ml_dtypes; pip install ml_dtypes") from exc
            arrays.append(rng.standard_normal(spec.shape).astype(ml_dtypes.bfloat16))
        elif np.issubdtype(np.dtype(spec.dtype), np.floating):
            arrays.append(rng.standard_normal(spec.shape).astype(spec.dtype))
        else:
            arrays.append(np.zeros(spec.shape, dtype=spec.dtype))
    return arrays


class _workdir:
    """The caller's directory (kept), or a temporary one (removed)."""

    def __init__(self, path: str | Path | None):
        self._path = Path(path) if path is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)
            return self._path
        self._tmp = tempfile.TemporaryDirectory(prefix="splitc-profile-")
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class _RemoteTVM:
    """One RPC session to `python -m tvm.exec.rpc_server`; times TVM modules on its CPU."""

    def __init__(self, rpc: str):
        host, port = parse_rpc_address(rpc)
        self.address = f"{host}:{port}"
        try:
            from tvm import rpc as tvm_rpc
        except ImportError as exc:
            raise ToolchainError(f"cannot import TVM ({exc}); pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1") from exc
        try:
            self.session = tvm_rpc.connect(host, port)
        except Exception as exc:  # TVM raises its own error types
            raise TargetError(
                f"cannot reach the TVM RPC server at {self.address} ({first_line(exc)}); start `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}` on the device"
            ) from exc

    def time(self, path: Path, name: str, inputs: list[np.ndarray], *, warmup: int, repeats: int, min_seconds: float, max_seconds: float) -> Timing:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        try:
            self.session.upload(str(path), target=name)
            module = self.session.load_module(name)
        except Exception as exc:
            raise BackendError(f"the device at {self.address} cannot load {path.name} ({first_line(exc)}); is it the target's ISA, with a matching TVM runtime?") from exc
        try:
            device = self.session.cpu()
            vm = VirtualMachine(module, device)
            vm.set_input("main", *(tvm.runtime.tensor(np.ascontiguousarray(x), device=device) for x in inputs))
            # number=1: one sample per call, as time_callable takes them. The evaluator runs on the
            # device and discards one call of its own before timing.
            first = vm.time_evaluator("invoke_stateful", device, number=1, repeat=max(warmup, 1))("main").results
            estimate_s = max(float(np.median(first)), 1e-7)
            count = max(repeats, math.ceil(min_seconds / estimate_s))
            count = max(1, min(count, int(max_seconds / estimate_s), 100_000))
            samples = vm.time_evaluator("invoke_stateful", device, number=1, repeat=count)("main").results
        except SplitcError:
            raise
        except Exception as exc:
            raise BackendError(f"timing {path.name} on {self.address} failed: {first_line(exc)}") from exc
        finally:
            try:
                self.session.remove(name)
            except Exception:
                pass
        return Timing.from_samples(np.asarray(samples, dtype=np.float64) * 1e3, warmup)
