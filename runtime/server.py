"""Serve a bundle's partitions K..end over the KServe v2 / Open Inference Protocol, HTTP/REST and
gRPC (Triton-compatible, so the same client works against either).

    server = PartitionServer(Bundle.open("model.splitc"), first_partition=1, token="...")
    stack = make_http_server(server, "127.0.0.1", 8000, grpc_port=8001)
    serve_until_signalled(stack)        # SIGTERM/SIGINT: stop accepting, finish in-flight, exit

The pieces, each in its own module:

    PartitionServer (here)      the inference logic: check, run partitions K..end, answer; thread-safe
    runtime/scheduler.py        admission (a bounded queue: 503 + Retry-After when full), a worker
                                pool sized to the cores, the optional dynamic batcher
    runtime/http_app.py         the v2 REST routes, a Starlette app served by uvicorn
    runtime/grpc_service.py     the v2 gRPC service (Triton's GRPCInferenceService) on grpcio
    runtime/metrics.py          Prometheus metrics (GET /metrics)
    ServingStack (here)         binds the ports, runs uvicorn and grpcio, drains on shutdown

One server may serve several models (the variants of an adaptive bundle, `variant_servers`): each
is its own PartitionServer under its own name; server-level endpoints answer for all of them.
Infer responses carry `parameters.compute_ms`: the time from the decoded request to its outputs
(queueing for a worker included), which a client subtracts to time the link alone.

Every client error is a 4xx with `{"error": "..."}`; the server keeps serving. The serving
libraries (the `serve` extra) are imported by this module only: a device never imports it.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from splitc.runtime.executors import Executor, available_cpus, load_executor
from splitc.core.manifest import RUNTIME_ONNXRUNTIME, Manifest, TensorSpec
from splitc.runtime.scheduler import Scheduler
from splitc.runtime.session import Bundle, SplitSession, confident_exit, exit_answer, host_artifact
from splitc.runtime.v2protocol import (
    COMPUTE_PARAMETER,
    EXIT_PARAMETER,
    SHA_PARAMETER,
    ProtocolError,
    bearer_authorized,
    decode_request,
    encode_response,
    model_name_for,
    v2_datatype,
    wanted_outputs,
)

from splitc.core.errors import BundleError, InputError

log = logging.getLogger("splitc.server")

DEFAULT_MAX_BODY = 64 << 20


def served_inputs(bundle: Bundle, first: int) -> tuple[TensorSpec, ...]:
    """What a server running partitions first..end receives: the boundary before `first`."""
    return bundle.manifest.inputs if first == 0 else bundle.manifest.boundaries[first - 1]


def _not_here(index: int) -> Executor:
    def run(_inputs):
        raise BundleError(f"partition {index} runs on the device, not on this server")

    return run


# Runtimes whose loaded model may be run from several threads at once (ONNX Runtime's
# InferenceSession.run is documented thread-safe). TVM's VM and TensorRT's execution contexts are
# not: those get one loaded copy per worker.
THREAD_SAFE_RUNTIMES = frozenset({RUNTIME_ONNXRUNTIME})


def _pooled(copies: list[Executor]) -> Executor:
    """One executor over several loaded copies of a partition: each call borrows a free copy."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for copy in copies:
        free.put(copy)

    def run(inputs):
        executor = free.get()
        try:
            return executor(inputs)
        finally:
            free.put(executor)

    return run


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: the input arrays, and what the answer must carry."""

    arrays: dict[str, np.ndarray]
    wanted: dict[str, bool]          # output name -> as binary data?
    request_id: str | None


@dataclass(frozen=True)
class Computed:
    outputs: dict[str, np.ndarray]   # every model output
    exit: int | None                 # the exit head that answered on this server, if one did


class ServedModel:
    """What every model a server serves shares, whatever it computes: its bundle's sha256, the
    bearer-token check and the request counters the front ends keep (`stats`, under `_stats_lock`)."""

    manifest: Manifest
    token: bytes | None
    stats: dict[str, int]
    _stats_lock: threading.Lock

    @property
    def sha256(self) -> str:
        return str(self.manifest.model.get("sha256", ""))

    def authorized(self, header: str | None) -> bool:
        return bearer_authorized(header, self.token)

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + 1


class PartitionServer(ServedModel):
    """The inference logic, independent of any protocol: check, run partitions K..end, answer.

    `compute` may be called from `workers` threads at once: a thread-safe runtime's model is shared,
    any other is loaded once per worker. `threads`: each run's intra-op threads (0: the cores
    divided among the workers, so that concurrent runs do not oversubscribe the CPU)."""

    def __init__(self, bundle: Bundle, first_partition: int = 1, *, token: str | None = None,
                 model_name: str | None = None, max_body: int = DEFAULT_MAX_BODY, workers: int = 1, threads: int = 0):
        count = len(bundle.manifest.partitions)
        if not 0 <= first_partition < count:
            raise InputError(f"--partition {first_partition} is out of range: the bundle has partitions 0..{count - 1}")
        if token is not None and not token.strip():
            raise InputError("the token is empty; put a long random secret in the token file (e.g. `openssl rand -hex 32`)")
        if workers < 1 or threads < 0:
            raise InputError("--workers must be at least 1 and --threads at least 0")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.first = first_partition
        self.token = token.strip().encode() if token else None
        self.max_body = int(max_body)
        self.workers = int(workers)
        self.name = model_name_for(model_name or str(self.manifest.model.get("name") or "model"))
        self.inputs = served_inputs(bundle, first_partition)
        self.outputs = self.manifest.outputs
        self.input_specs = {t.name: t for t in self.inputs}
        threads = threads or max(1, available_cpus() // self.workers)
        executors = {i: _not_here(i) for i in range(first_partition)}
        self._raw: dict[int, Executor] = {}
        for p in self.manifest.partitions[first_partition:]:
            artifact = host_artifact(p)
            copies = 1 if artifact.runtime in THREAD_SAFE_RUNTIMES else self.workers
            loaded = [load_executor(artifact, bundle.file(artifact), threads) for _ in range(copies)]
            self._raw[p.index] = loaded[0] if copies == 1 else _pooled(loaded)
            executors[p.index] = self._raw[p.index]
        self.session = SplitSession(bundle, executors)
        self.stats = {"requests": 0, "errors_4xx": 0, "errors_5xx": 0, "infer": 0}
        self._stats_lock = threading.Lock()

    # -------------------------------------------------------------------------- protocol pieces


    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "splitc",
            "inputs": [{"name": t.name, "datatype": v2_datatype(t.dtype), "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "datatype": v2_datatype(t.dtype), "shape": list(t.shape)} for t in self.outputs],
            "parameters": {
                SHA_PARAMETER: self.sha256,
                "model": str(self.manifest.model.get("name", "")),
                "first_partition": self.first,
                "partitions": [p.index for p in self.manifest.partitions[self.first:]],
                "splitc_version": self.manifest.splitc_version,
            },
        }

    def config(self) -> dict[str, Any]:
        """The subset of Triton's model-config JSON a client needs (sha256 in parameters, as Triton has it)."""
        def io(t: TensorSpec) -> dict[str, Any]:
            return {"name": t.name, "data_type": "TYPE_" + v2_datatype(t.dtype), "dims": [str(d) for d in t.shape]}

        return {"name": self.name, "platform": "splitc", "max_batch_size": 0,
                "input": [io(t) for t in self.inputs], "output": [io(t) for t in self.outputs],
                "parameters": {SHA_PARAMETER: {"string_value": self.sha256}}}

    # ------------------------------------------------------------------------------- inference

    def decode(self, body: bytes, header_length: str | None) -> InferRequest:
        """Check and decode a REST infer body (ProtocolError, a 4xx, when it is wrong)."""
        arrays, header = decode_request(body, header_length, self.input_specs)
        wanted = wanted_outputs(header, [t.name for t in self.outputs])
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise ProtocolError("'id' must be a string")
        return InferRequest(arrays, wanted, request_id)

    def compute(self, arrays: Mapping[str, np.ndarray]) -> Computed:
        """Run partitions first..end on one request's checked inputs. Thread-safe."""
        env: Mapping[str, np.ndarray] = arrays
        for p in self.manifest.partitions[self.first:]:
            produced = self.session.execute(p.index, env)
            # A middle tier with an exit head answers from it when confident, as the device does.
            taken = confident_exit(self.manifest, p.index, produced)
            if taken is not None:
                return Computed(exit_answer(self.manifest, taken, produced, p.index + 1).outputs, taken[0].index)
            env = self.session.boundary(p.index, produced)
        return Computed({t.name: env[t.name] for t in self.outputs}, None)

    def compute_batch(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[Computed]:
        """Run several requests as one batch along axis 0 (only when `batchable`)."""
        env: dict[str, np.ndarray] = {name: np.concatenate([r[name] for r in requests]) for name in self.input_specs}
        for p in self.manifest.partitions[self.first:]:
            produced = self._raw[p.index]([env[t.name] for t in p.inputs])
            env.update({spec.name: array for spec, array in zip(p.outputs, produced, strict=True)})
        sizes = np.cumsum([len(next(iter(r.values()))) for r in requests])[:-1]
        split = {t.name: np.split(env[t.name], sizes) for t in self.outputs}
        return [Computed({name: parts[i] for name, parts in split.items()}, None) for i in range(len(requests))]

    def batchable(self) -> bool:
        """Whether the served partitions take a batch dimension: every input has a leading axis,
        no exit head decides per request on this server, and a batch of two runs and answers two
        rows per output (tried once, on zeros). A fixed-shape partition is run per request."""
        if any(e.partition >= self.first for e in self.manifest.exits) or not all(t.shape for t in self.inputs):
            return False
        zeros = {t.name: np.zeros(t.shape, t.dtype) for t in self.inputs}
        try:
            answers = self.compute_batch([zeros, zeros])
        except Exception:  # noqa: BLE001 - any refusal of the batch shape means: no batch dimension
            return False
        return all(tuple(a.outputs[t.name].shape) == tuple(t.shape) for a in answers for t in self.outputs)

    def time_compute(self, runs: int = 5) -> float:
        """Median milliseconds of one request here, on zeros (the first run, warm-up, not counted)."""
        zeros = {t.name: np.zeros(t.shape, t.dtype) for t in self.inputs}
        times = []
        for _ in range(runs + 1):
            tick = time.perf_counter()
            self.compute(zeros)
            times.append((time.perf_counter() - tick) * 1e3)
        return float(np.median(times[1:]))

    def answer(self, request: InferRequest, computed: Computed, compute_ms: float) -> tuple[bytes, dict[str, str]]:
        parameters = {SHA_PARAMETER: self.sha256, COMPUTE_PARAMETER: round(compute_ms, 4)}
        if computed.exit is not None:
            parameters[EXIT_PARAMETER] = computed.exit
        outputs = {name: computed.outputs[name] for name in request.wanted}
        return encode_response(self.name, outputs, binary=request.wanted, request_id=request.request_id, parameters=parameters)

    def infer(self, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """Decode, compute and answer in the calling thread (no queue)."""
        request = self.decode(body, header_length)
        tick = time.perf_counter()
        computed = self.compute(request.arrays)
        return self.answer(request, computed, (time.perf_counter() - tick) * 1e3)



# A partition computing in less than this runs on the thread that decoded its request: handing it
# to a worker and back costs two thread wake-ups (measured here: 0.2 ms at one client, much more
# under load), more than it can gain by overlapping with other requests: the ResNet-18 classifier
# head alone served 210 requests/s at one client through a worker, 2,900 on the protocol thread.
INLINE_BELOW_MS = 0.5


def is_session_model(app) -> bool:
    """A model served through sessions (runtime/decoder_sessions.DecoderService): it answers
    /v2/models/<name>/sessions[/<id>[/step|/verify]] with `handle(method, parts, body, authorization)`."""
    return callable(getattr(app, "handle", None))


class ServedModels:
    """What the protocol front ends share: the models by name, one scheduler per model (admission,
    workers, batching), the metrics, and whether the server is draining.

    A model whose partitions compute in under `inline_below_ms` (timed at start) skips the queue:
    its requests run where they were decoded, and admission control does not apply to it."""

    def __init__(self, apps: PartitionServer | Sequence[PartitionServer], *, max_queue: int = 64, max_batch: int = 1,
                 max_delay_ms: float = 2.0, inline_below_ms: float = INLINE_BELOW_MS):
        from splitc.runtime.metrics import Metrics

        apps = list(apps) if isinstance(apps, Sequence) else [apps]
        if not apps:
            raise InputError("a server needs at least one model to serve")
        self.apps = {a.name: a for a in apps}
        if len(self.apps) != len(apps):
            raise InputError("two models served under the same name; give each its own --name")
        if max_queue < 1 or max_batch < 1 or max_delay_ms < 0:
            raise InputError("--max-queue and --max-batch must be at least 1, --max-delay-ms at least 0")
        self.app = apps[0]  # answers the server-level endpoints
        self.metrics = Metrics()
        self.draining = threading.Event()
        self.batching: dict[str, bool] = {}
        self.inline: dict[str, bool] = {}
        self.schedulers: dict[str, Scheduler] = {}
        for app in apps:
            if is_session_model(app):  # a decoder's sessions: answered by its own `handle`, not the scheduler
                self.inline[app.name], self.batching[app.name] = True, False
                continue
            batch = max_batch > 1 and app.batchable()
            compute_ms = app.time_compute()
            self.inline[app.name] = not batch and compute_ms < inline_below_ms
            log.debug("%s: %.3f ms a request here; %s", app.name, compute_ms,
                     "computed on the protocol thread" if self.inline[app.name] else f"{app.workers} worker(s)")
            if max_batch > 1 and not batch:
                log.info("%s: the partition has no batch dimension; requests run one by one", app.name)
            self.batching[app.name] = batch
            self.schedulers[app.name] = Scheduler(app.compute, workers=app.workers, max_queue=max_queue,
                                                  run_batch=app.compute_batch if batch else None, max_batch=max_batch,
                                                  max_delay_ms=max_delay_ms, on_batch=self.metrics.batch_observer(app.name),
                                                  name=f"splitc-{app.name}")

    def submit(self, app: PartitionServer, arrays: Mapping[str, np.ndarray]) -> Future:
        """Queue one request's compute; raises Overloaded when the model's queue is full."""
        return self.schedulers[app.name].submit(arrays)

    def close(self, timeout: float | None = None) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close(timeout)


class ServingStack:
    """The REST port (uvicorn) and, with `grpc_port`, the gRPC port of one serving process.

    The REST socket is bound here, so port 0 picks a free port and a busy one is an InputError."""

    def __init__(self, served: ServedModels, host: str = "127.0.0.1", port: int = 8000, *, grpc_port: int | None = None):
        import uvicorn

        from splitc.runtime.http_app import create_app

        self.served = served
        self._sock = _listen(host, port)
        config = uvicorn.Config(create_app(served), log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=30, timeout_graceful_shutdown=30)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._grpc = None
        self.grpc_port: int | None = None
        if grpc_port is not None:
            from splitc.runtime.grpc_service import make_grpc_server

            self._grpc, self.grpc_port = make_grpc_server(served, host, grpc_port)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def app(self) -> PartitionServer:
        return self.served.app

    @property
    def apps(self) -> dict[str, PartitionServer]:
        return self.served.apps

    def start(self, timeout: float = 30.0) -> None:
        """Serve in background threads; returns once both ports accept requests."""
        if self._grpc is not None:
            self._grpc.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._sock]}, name="splitc-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise InputError(f"the server on port {self.port} did not start; see the log above")
            time.sleep(0.01)

    def drain(self, timeout: float = 30.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to `timeout` s), close idle
        connections, stop the workers. True if everything finished in time."""
        self.served.draining.set()
        done = True
        if self._thread is not None:
            self._uvicorn.config.timeout_graceful_shutdown = max(int(round(timeout)), 1)
            self._uvicorn.should_exit = True
            self._thread.join(timeout + 5)
            done = not self._thread.is_alive() and not self._uvicorn.server_state.connections
        self._sock.close()
        if self._grpc is not None:
            self._grpc.stop(grace=timeout).wait(timeout + 1)
        self.served.close(timeout)
        return done


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") from exc
    sock.setblocking(False)
    return sock


def make_http_server(app: PartitionServer | Sequence[PartitionServer], host: str = "127.0.0.1", port: int = 8000, *,
                     grpc_port: int | None = None, max_queue: int = 64, max_batch: int = 1, max_delay_ms: float = 2.0,
                     inline_below_ms: float = INLINE_BELOW_MS) -> ServingStack:
    served = ServedModels(app, max_queue=max_queue, max_batch=max_batch, max_delay_ms=max_delay_ms, inline_below_ms=inline_below_ms)
    return ServingStack(served, host, port, grpc_port=grpc_port)


def serve_in_thread(stack: ServingStack) -> threading.Thread:
    stack.start()
    return stack._thread


def serve_until_signalled(stack: ServingStack, drain_timeout: float = 30.0, on_ready=None) -> bool:
    """Serve until SIGTERM or SIGINT, then drain gracefully. Main thread only."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stack.start()
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            pass
        return stack.drain(drain_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def variant_servers(variant_dir: str | Path, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY, workers: int = 1,
                    threads: int = 0) -> list[PartitionServer]:
    """One PartitionServer per variant of an adaptive bundle that sends something (device-only
    variants need no server), each serving its partitions from the first one off the device,
    named `<model>-v<k>` (what AdaptiveSession asks for)."""
    from splitc.runtime.variant_index import read_variants

    index = read_variants(variant_dir)
    apps = []
    for variant in index.variants:
        if variant.first_remote is None:
            continue
        bundle = Bundle.open(Path(variant_dir) / variant.directory)
        apps.append(PartitionServer(bundle, variant.first_remote, token=token, max_body=max_body, model_name=variant.model_name,
                                    workers=workers, threads=threads))
    if not apps:
        raise InputError(f"every variant in {variant_dir} runs on the device alone; there is nothing to serve")
    return apps
