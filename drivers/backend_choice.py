"""Backend choice per partition, by measurement.

A target names its preferred backend (`[backend] name` in its TOML); the candidates for one of its
partitions are every backend that can deploy to the target's ISA (the backend registry says which),
preferred first. For each partition:

1. Coverage, before anything compiles: a candidate whose converter lacks one of the partition's
   operators is dropped with a note; none left is the typed error a user sees (`plan_candidates`).
2. Choice, while compiling (`compile_chosen`): each remaining candidate is compiled and its
   artifact timed on this host on the partition's reference inputs: the deploy artifact when this
   host runs it, else its host twin (same partition, this host's ISA, untuned) as the proxy of the
   device. A candidate that fails to compile, or answers outside the target's tolerance, is
   dropped with a note; the fastest of the rest ships. The record (every candidate's figure, what
   was timed, why one was dropped) goes into the manifest.

A backend whose device runtime needs torch is never chosen by measurement (flagged instead); a
user may still ask for it with an override, which skips the measurement altogether. A GPU target
cannot be timed here: its candidates are taken in order, the first that compiles ships.
`SPLITC_BACKEND_CHOICE=preferred` does the same for every target (no measurement: the preferred
backend unless it lacks an operator), for quick compiles and for tests about one backend.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from splitc.backends.base import Backend, CompiledPartition, op_name
from splitc.backends.registry import backend_record, backend_records, target_backend
from splitc.core.errors import BackendError, InputError, UnsupportedOperatorError, first_line
from splitc.core.manifest import ROLE_DEPLOY, ROLE_HOST_TWIN
from splitc.core.timing import time_callable
from splitc.passes.partition import Partition
from splitc.runtime.executors import available_cpus, can_run_here, host_arch, load_executor
from splitc.targets import Target

# A quick profile: enough calls for a stable median of a millisecond-scale partition, bounded for
# slow candidates (untuned TVM can be 100x slower than the best).
_WARMUP, _REPEATS, _MIN_S, _MAX_S = 2, 10, 0.3, 4.0
_QUIET_S = 0.2  # let the previous runtime's worker threads stop spinning (2-core hosts)


@dataclass
class CandidateResult:
    backend: str
    status: str                  # chosen | measured | skipped | flagged | not measured
    median_ms: float | None = None
    rel_err: float | None = None
    timed: str = ""              # which artifact the figure is of
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in {"backend": self.backend, "status": self.status,
                                  "median_ms": None if self.median_ms is None else round(self.median_ms, 4),
                                  "rel_err": self.rel_err, "timed": self.timed, "note": self.note}.items() if v not in ("", None)}


@dataclass
class BackendChoice:
    """What a partition ships with and why; recorded in its manifest entry as `choice`."""

    backend: str
    how: str                     # measured | override | only candidate | preferred, not timeable here | fallback
    candidates: list[CandidateResult] = field(default_factory=list)
    host: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "how": self.how, "host": self.host, "candidates": [c.to_json() for c in self.candidates]}

    def notes(self, partition: Partition) -> list[str]:
        where = f"partition {partition.index} ({partition.target.name})"
        return [f"{where}: {c.backend} {c.status}: {c.note}" for c in self.candidates if c.status in ("skipped", "flagged") and c.note]


@dataclass
class CandidatePlan:
    """The backends that cover a partition, in the order they are tried, and the result rows of
    those dropped for coverage (reported with the choice)."""

    partition: Partition
    backends: list[Backend]
    override: bool
    dropped: list[CandidateResult]
    measure: bool = True


def candidate_ids(target: Target) -> list[str]:
    """Backends that can deploy to `target`, its preferred one first. A CPU target takes every CPU
    backend that builds for its ISA; a GPU target keeps its own and falls back to a portable CPU
    backend (ONNX Runtime) only for coverage."""
    preferred = target_backend(target)
    others = [r for r in backend_records() if r.id != preferred.id and target.arch in r.deploy_isas and not r.runtime_record.gpu]
    if preferred.runtime_record.gpu:
        others = [r for r in others if r.portable]
    return [preferred.id] + [r.id for r in others]


def parse_overrides(specs: Sequence[str] | Mapping[str, str] | None, targets: Sequence[Target]) -> dict[str, str]:
    """`--backend rpi4=tvm` (repeatable) as {target name: backend id}, checked against the chain."""
    if not specs:
        return {}
    pairs = dict(specs) if isinstance(specs, Mapping) else dict(_split_override(s) for s in specs)
    names = {t.name for t in targets}
    for name, backend in pairs.items():
        if name not in names:
            raise InputError(f"--backend {name}={backend}: {name} is not one of the targets ({', '.join(sorted(names))})")
        backend_record(backend)  # refuses an unknown backend by name
    return pairs


def _split_override(spec: str) -> tuple[str, str]:
    name, sep, backend = spec.partition("=")
    if not sep or not name.strip() or not backend.strip():
        raise InputError(f"--backend {spec!r}: write TARGET=BACKEND, e.g. rpi4=tvm")
    return name.strip(), backend.strip()


def first_gap(partition: Partition, backend: Backend) -> str | None:
    """The first operator of the partition the backend has no converter for, described, or None."""
    for node in partition.module.graph.nodes:
        if node.op == "call_function" and not backend.supports(node):
            return f"node {node.name} ({op_name(node)})"
    return None


def plan_candidates(partition: Partition, override: str | None) -> CandidatePlan:
    """The covering candidates of a partition; raises UnsupportedOperatorError when none covers."""
    target = partition.target
    ids = [override] if override else candidate_ids(target)
    covering, dropped = [], []
    for backend_id in ids:
        backend = backend_record(backend_id).create()
        gap = first_gap(partition, backend)
        if gap is None:
            covering.append(backend)
        else:
            dropped.append(CandidateResult(backend_id, "skipped", note=f"no converter for {gap}"))
    if not covering:
        reasons = "; ".join(f"{d.backend}: {d.note}" for d in dropped)
        hint = "drop --backend to let another backend take it" if override else "move the cut so it lands on another target"
        raise UnsupportedOperatorError(f"partition {partition.index} cannot run on target {target.name}: {reasons}; {hint}")
    measure = os.environ.get("SPLITC_BACKEND_CHOICE", "measure") != "preferred"
    return CandidatePlan(partition, covering, bool(override), dropped, measure)


def compile_chosen(plan: CandidatePlan, workdir: Path, inputs: Sequence[np.ndarray], expected: Sequence[np.ndarray],
                   log: Callable[[str], None] = lambda _: None) -> tuple[str, CompiledPartition, BackendChoice]:
    """Compile the plan's candidates and keep one in `workdir`: the fastest measured here when
    more than one can be timed, else the first that compiles. Returns (backend id, its compiled
    partition with paths in `workdir`, the choice)."""
    partition = plan.partition
    host = f"{host_arch()}, {available_cpus()} CPUs"
    results = list(plan.dropped)
    measurable = [b for b in plan.backends if _measurable(b, partition.target)]
    if plan.override or len(measurable) < 2 or not plan.measure:
        for index, backend in enumerate(plan.backends):
            how = ("override" if plan.override else "only candidate" if len(plan.backends) == 1
                   else "fallback" if index > 0 else "preferred" if not plan.measure else "preferred, not timeable here")
            try:
                compiled = backend.compile(partition, workdir)
            except BackendError as exc:
                if index == len(plan.backends) - 1:
                    raise
                shutil.rmtree(workdir, ignore_errors=True)
                results.append(CandidateResult(backend.id, "skipped", note=f"failed to compile: {first_line(exc)}"))
                continue
            results.append(CandidateResult(backend.id, "chosen", note="not measured"))
            return backend.id, compiled, BackendChoice(backend.id, how, results, host)

    built: dict[str, tuple[Path, CompiledPartition]] = {}
    for backend in plan.backends:
        record = backend_record(backend.id)
        if record.runtime_needs_torch:
            results.append(CandidateResult(backend.id, "flagged", note="its device runtime imports torch; ask for it with --backend"))
            continue
        scratch = workdir.with_name(f".{workdir.name}.{backend.id}")
        log(f"partition {partition.index} ({partition.target.name}): compiling and timing the {backend.id} candidate")
        try:
            compiled = backend.compile(partition, scratch)
            result = _time_candidate(backend.id, compiled, partition, inputs, expected)
        except BackendError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            results.append(CandidateResult(backend.id, "skipped", note=f"failed to compile: {first_line(exc)}"))
            continue
        results.append(result)
        if result.status == "measured":
            built[backend.id] = (scratch, compiled)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if not built:
        raise BackendError(f"no backend could compile partition {partition.index} for {partition.target.name}: "
                           + "; ".join(f"{r.backend}: {r.note}" for r in results if r.note))
    timed = [r for r in results if r.status == "measured"]
    winner = min(timed, key=lambda r: r.median_ms)
    winner.status = "chosen"
    for backend_id, (scratch, _) in built.items():
        if backend_id != winner.backend:
            shutil.rmtree(scratch, ignore_errors=True)
    scratch, compiled = built[winner.backend]
    os.replace(scratch, workdir)
    moved = [replace(a, path=workdir / Path(a.path).relative_to(scratch)) for a in compiled.artifacts]
    return winner.backend, replace(compiled, artifacts=moved), BackendChoice(winner.backend, "measured", results, host)


def _measurable(backend: Backend, target: Target) -> bool:
    """Whether this host can time the backend's artifact for `target` (itself or a host twin)."""
    record = backend_record(backend.id)
    return (record.profiles and not record.runtime_record.gpu and host_arch() in record.deploy_isas
            and target.arch in record.deploy_isas)


def _time_candidate(backend_id: str, compiled: CompiledPartition, partition: Partition, inputs: Sequence[np.ndarray],
                    expected: Sequence[np.ndarray]) -> CandidateResult:
    artifact, label = _timeable(compiled)
    if artifact is None:
        return CandidateResult(backend_id, "not measured", note="no artifact this host can run")
    run = load_executor(artifact, Path(artifact.path), available_cpus())
    got = run(list(inputs))
    rel = max((_rel_err(g, e) for g, e in zip(got, expected)), default=0.0)
    if rel > partition.target.rtol:
        return CandidateResult(backend_id, "skipped", rel_err=rel, timed=label,
                               note=f"answers differ from torch by {rel:.2g} (tolerance {partition.target.rtol:g})")
    gc.collect()
    time.sleep(_QUIET_S)
    timing = time_callable(lambda: run(list(inputs)), warmup=_WARMUP, repeats=_REPEATS, min_seconds=_MIN_S, max_seconds=_MAX_S)
    return CandidateResult(backend_id, "measured", timing.median_ms, rel, label)


def _timeable(compiled: CompiledPartition):
    """The artifact to time and how to label it: the deploy artifact when this host runs it,
    else its host twin."""
    for role, label in ((ROLE_DEPLOY, "deploy"), (ROLE_HOST_TWIN, "host twin")):
        artifact = next((a for a in compiled.artifacts if a.role == role), None)
        if artifact is not None and can_run_here(artifact):
            tuning = (artifact.options.get("tuning") or {}).get("chosen")
            return artifact, f"{label} on {host_arch()}" + (f", {tuning}" if tuning else ", untuned" if role == ROLE_HOST_TWIN else "")
    return None, ""


def _rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = float(np.linalg.norm(expected))
    return float(np.linalg.norm(got - expected)) / (scale or 1.0)


def describe(choice: dict[str, Any]) -> str:
    """One cell for compile's table: the chosen backend and the figures that decided it."""
    if not choice:
        return ""
    figures = [f"{c['backend']} {c['median_ms']:.3g} ms" + (" ✓" if c["status"] == "chosen" else "")
               for c in choice.get("candidates", []) if c.get("median_ms") is not None]
    return f"{choice['how']}" + (f": {', '.join(figures)}" if figures else "")


__all__ = ["BackendChoice", "CandidatePlan", "CandidateResult", "candidate_ids", "compile_chosen", "describe", "first_gap",
           "parse_overrides", "plan_candidates"]
