"""Loaders that turn one artifact into a callable on numpy arrays, keyed by runtime id.

Each backend runtime is one `RuntimeRecord` in `RUNTIMES`: how to load an artifact, whether this
host has the runtime, whether it needs torch or a GPU. A backend (backends/registry.py) names the
runtime its artifacts run on; nothing else compares runtime ids. Each runtime is imported only when
an artifact of its kind is loaded, so a device ships just the one it uses (TVM's runtime, ONNX
Runtime, or TensorRT). Set TVM_USE_RUNTIME_LIB=1 on a device to make `import tvm` load the 3 MB
runtime library instead of the compiler.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from splitc.core.errors import BackendError, ToolchainError
from splitc.core.manifest import RUNTIME_ONNXRUNTIME, RUNTIME_TENSORRT, RUNTIME_TVM, Artifact

Executor = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
Loader = Callable[[Path, Artifact, int], Executor]

_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def _always() -> bool:
    return True


@dataclass(frozen=True)
class RuntimeRecord:
    """One backend runtime, as a device sees it."""

    id: str
    load: Loader                            # (artifact file, its manifest entry, threads) -> executor
    usable: Callable[[], bool] = _always    # whether this host has the runtime (and the device it needs)
    needs_torch: bool = False               # shipping it puts torch on the device
    gpu: bool = False                       # its artifacts run on a GPU
    triton_platform: str | None = None      # the Triton Inference Server platform that serves its artifacts


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def runtime_record(runtime: str, path: str = "") -> RuntimeRecord:
    if runtime not in RUNTIMES:
        raise BackendError(
            f"artifact {path or '?'} needs runtime {runtime!r}, which this splitc does not know "
            f"(known: {', '.join(sorted(RUNTIMES))}); upgrade splitc"
        )
    return RUNTIMES[runtime]


@contextmanager
def registered_runtime(record: RuntimeRecord) -> Iterator[RuntimeRecord]:
    """Make `record` loadable for the duration of a `with` block (an embedding app's own runtime, or a test's)."""
    if record.id in RUNTIMES:
        raise BackendError(f"runtime {record.id!r} is already registered")
    RUNTIMES[record.id] = record
    try:
        yield record
    finally:
        del RUNTIMES[record.id]


def can_run_here(artifact: Artifact) -> bool:
    """Whether this host can execute the artifact natively (ISA and runtime library present)."""
    if artifact.arch is not None and artifact.arch != host_arch():
        return False
    return artifact.runtime in RUNTIMES and RUNTIMES[artifact.runtime].usable()


def load_executor(artifact: Artifact, path: Path, threads: int = 0) -> Executor:
    """Load the artifact file at `path` (already hash-checked by the caller). `threads`: run with
    this many threads instead of the target's figure (TVM and ONNX Runtime)."""
    record = runtime_record(artifact.runtime, artifact.path)
    if artifact.arch is not None and artifact.arch != host_arch():
        raise BackendError(
            f"artifact {artifact.path} is {artifact.arch} code and this host is {host_arch()}; "
            "run it on its target, or use `splitc verify`, which emulates it"
        )
    return record.load(path, artifact, threads)


def target_threads(target_json: dict) -> int:
    """Threads TVM code for this target runs with: its `num-cores`, never more than the CPUs this
    process may use; 0 when the target names none (TVM's own default then)."""
    cores = int(target_json.get("num-cores") or 0)
    return min(cores, available_cpus()) if cores else 0


def tvm_threads(artifact: Artifact) -> int:
    return target_threads(artifact.options.get("target") or {})


def _allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def available_cpus() -> int:
    return len(_allowed_cpus())


# TVM's thread pool is per calling thread, and so is the record of how it was configured.
_tvm_pool = threading.local()


def use_tvm_threads(threads: int) -> None:
    """Make the calling thread's TVM pool run `threads` workers, sharing every CPU this process may
    use. TVM's default on x86 is half the hardware threads (it assumes hyper-threading): one thread
    on a 2-vCPU machine, which halves a tuned model's speed. Reconfigures only on a change."""
    if threads <= 0 or getattr(_tvm_pool, "threads", None) == threads:
        return
    import tvm

    # Mode -3 (kSpecifyThreadShareAllCore): `threads` workers, none pinned to one core.
    tvm.get_global_func("runtime.config_threadpool")(-3, int(threads), [str(c) for c in _allowed_cpus()])
    _tvm_pool.threads = threads


def _load_tvm(path: Path, artifact: Artifact, threads: int = 0) -> Executor:
    try:
        import tvm
        from tvm.runtime.vm import VirtualMachine
    except ImportError as exc:
        raise ToolchainError(f"cannot import TVM's runtime ({exc}); pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1") from exc
    try:
        vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    except Exception as exc:  # TVM raises its own error types from C++
        raise BackendError(f"TVM cannot load {path.name}: {exc}".splitlines()[0]) from exc
    main = vm["main"]
    threads = threads or tvm_threads(artifact)

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        use_tvm_threads(threads)
        result = main(*(tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs))
        return _flatten_tvm(result)

    return run


def _flatten_tvm(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    flat: list[np.ndarray] = []
    for item in value:
        flat.extend(_flatten_tvm(item))
    return flat


def _load_onnxruntime(path: Path, artifact: Artifact, threads: int = 0) -> Executor:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ToolchainError(f"cannot import onnxruntime ({exc}); pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise to a user
    threads = threads or int(artifact.options.get("intra_op_threads", 0))
    if threads:  # the target's figure, but never more threads than this process has CPUs
        options.intra_op_num_threads = min(threads, available_cpus())
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, dict(zip(names, inputs))))

    return run


def tensorrt_usable() -> bool:
    """TensorRT and cuda-python import, and a CUDA device is visible."""
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart  # noqa: F401
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def _load_tensorrt(path: Path, artifact: Artifact, threads: int = 0) -> Executor:
    """Run a serialized TensorRT engine with the v3 execution API (named tensors, explicit stream).

    Written against TensorRT 10's documented Python API; needs `tensorrt` and `cuda-python`, which a
    GPU host provides. Not exercised on machines without them (see tests/test_tensorrt.py).
    """
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise ToolchainError(
            f"cannot import TensorRT ({exc}); install tensorrt and cuda-python on the GPU host, "
            "or run the partition's ONNX artifact with ONNX Runtime"
        ) from exc

    def check(result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendError(f"CUDA call failed with {err}")
        return rest[0] if len(rest) == 1 else rest

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BackendError(f"TensorRT cannot deserialize {path.name}: built for another TensorRT version or GPU; rebuild it with `splitc build-engine`")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    stream = check(cudart.cudaStreamCreate())
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    # Device buffers are allocated once, for the largest shapes: a static engine's own, or a dynamic
    # one's at its profile maximum (inputs set to their maxima give the outputs' maxima). A call
    # then costs copies and the kernels, not allocations.
    dynamic = any(-1 in tuple(engine.get_tensor_shape(n)) for n in input_names)
    if dynamic:
        for name in input_names:
            context.set_input_shape(name, tuple(engine.get_tensor_profile_shape(name, 0)[2]))
    device: dict[str, int] = {}
    for name in names:
        shape = tuple(context.get_tensor_shape(name))
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        device[name] = check(cudart.cudaMalloc(nbytes))
        context.set_tensor_address(name, device[name])
    out_dtypes = {name: trt.nptype(engine.get_tensor_dtype(name)) for name in output_names}

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        for name, array in zip(input_names, inputs):
            array = np.ascontiguousarray(array)
            if dynamic:
                context.set_input_shape(name, tuple(array.shape))
            check(cudart.cudaMemcpyAsync(device[name], array.ctypes.data, array.nbytes, h2d, stream))
        if not context.execute_async_v3(stream):
            raise BackendError(f"TensorRT execution of {path.name} failed")
        outputs = [np.empty(tuple(context.get_tensor_shape(name)), dtype=out_dtypes[name]) for name in output_names]
        for name, host in zip(output_names, outputs):
            check(cudart.cudaMemcpyAsync(host.ctypes.data, device[name], host.nbytes, d2h, stream))
        check(cudart.cudaStreamSynchronize(stream))
        return outputs

    return run


# The runtimes this splitc can load. A new runtime is one loader plus one record here.
RUNTIMES: dict[str, RuntimeRecord] = {
    RUNTIME_TVM: RuntimeRecord(RUNTIME_TVM, _load_tvm),
    RUNTIME_ONNXRUNTIME: RuntimeRecord(RUNTIME_ONNXRUNTIME, _load_onnxruntime, triton_platform="onnxruntime_onnx"),
    RUNTIME_TENSORRT: RuntimeRecord(RUNTIME_TENSORRT, _load_tensorrt, usable=tensorrt_usable, gpu=True, triton_platform="tensorrt_plan"),
}
