"""The backend registry: one record per backend, the only place backend ids are listed.

A record says how to get the backend's compiler (imported lazily: each pulls in TVM, onnx or
TensorRT only when used), which runtime loads what it deploys (splitc.runtime.executors), and what
it can do. Targets name a backend by id; compile, verify, profile, tune, bench and export read the
record instead of comparing names. A new backend is one module plus one record in `BACKENDS`
(or `registered_backend(...)` for an embedding app's own, or a test's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from splitc.backends.base import Backend
from splitc.core.errors import TargetError
from splitc.core.manifest import RUNTIME_ONNXRUNTIME, RUNTIME_TENSORRT, RUNTIME_TVM
from splitc.runtime.executors import RuntimeRecord, runtime_record
from splitc.targets import Target


@dataclass(frozen=True)
class BackendRecord:
    id: str
    create: Callable[[], Backend]   # the compiler side, imported on first use
    runtime: str                    # the runtime id of the artifact the target runs
    deploy_isas: tuple[str, ...]    # ISAs it can build deployable code for
    profiles: bool = True           # `splitc profile` can time its partitions on a host of the target
    tunable: bool = False           # `splitc tune` searches schedules for it
    rpc: bool = False               # it can time and tune on a remote device over RPC
    portable: bool = False          # its artifact runs on any CPU of its ISAs: a GPU target's fallback
    name: str = ""                  # what users call it, in messages ("TVM"); the id when empty
    description: str = ""

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def runtime_record(self) -> RuntimeRecord:
        return runtime_record(self.runtime)

    @property
    def runtime_needs_torch(self) -> bool:
        return self.runtime_record.needs_torch

    def usable_here(self) -> bool:
        """Whether this host can build and run what the backend deploys (TensorRT needs a GPU)."""
        return self.runtime_record.usable()


def _tvm() -> Backend:
    from splitc.backends.tvm import TVMBackend
    return TVMBackend()


def _onnxruntime() -> Backend:
    from splitc.backends.onnx import OnnxRuntimeBackend
    return OnnxRuntimeBackend()


def _tensorrt() -> Backend:
    from splitc.backends.tensorrt import TensorRTBackend
    return TensorRTBackend()


BACKENDS: dict[str, BackendRecord] = {
    record.id: record
    for record in (
        BackendRecord("tvm", _tvm, RUNTIME_TVM, deploy_isas=("x86_64", "aarch64"), tunable=True, rpc=True, name="TVM",
                      description="Apache TVM (Relax), cross-compiled per LLVM target"),
        BackendRecord("onnxruntime", _onnxruntime, RUNTIME_ONNXRUNTIME, deploy_isas=("x86_64", "aarch64"), portable=True, name="ONNX Runtime",
                      description="ONNX Runtime, CPU execution provider"),
        BackendRecord("tensorrt", _tensorrt, RUNTIME_TENSORRT, deploy_isas=("x86_64", "aarch64"), name="TensorRT",
                      description="TensorRT engine from the partition's ONNX (built on the GPU host)"),
    )
}


def backend_records() -> list[BackendRecord]:
    return list(BACKENDS.values())


def backend_record(backend_id: str, *, target: str | None = None) -> BackendRecord:
    if backend_id not in BACKENDS:
        who = f"target {target} asks for" if target else "unknown"
        raise TargetError(f"{who} backend {backend_id!r}; supported backends: {', '.join(BACKENDS)}")
    return BACKENDS[backend_id]


def target_backend(target: Target) -> BackendRecord:
    """The record of the backend `target` compiles with, refusing an ISA the backend cannot build for."""
    record = backend_record(target.backend, target=target.name)
    if target.arch not in record.deploy_isas:
        raise TargetError(f"target {target.name} is {target.arch}, and the {record.id} backend builds for {', '.join(record.deploy_isas)} only")
    return record


def get_backend(target: Target) -> Backend:
    return target_backend(target).create()


@contextmanager
def registered_backend(record: BackendRecord) -> Iterator[BackendRecord]:
    """Make `record` a backend targets can name for the duration of a `with` block."""
    if record.id in BACKENDS:
        raise TargetError(f"backend {record.id!r} is already registered")
    BACKENDS[record.id] = record
    try:
        yield record
    finally:
        del BACKENDS[record.id]
