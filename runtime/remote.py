"""Edge side of a split deployment: run the device partitions here, send the boundary tensors to a
KServe v2 server (`splitc serve`, or Triton with `splitc export-triton`), return its answer.

    from splitc.runtime import Bundle
    from splitc.runtime.remote import RemoteSession

    remote = RemoteSession(Bundle.open("model.splitc"), "http://cloud:8000", token=open("secret").read())
    result = remote.infer({"x": x})          # result.outputs, result.source, result.timings, result.bytes_sent

Before anything is sent, the inputs are checked (InputError) and the server's model sha256 is
compared with the bundle's (BundleError). Network failures and 5xx answers are retried with
exponential backoff within `timeout` seconds; after that, if every partition can run on this host,
the rest of the model runs here and the result says `source == "local-fallback"` (and why). A 4xx
answer (wrong token, a request the server refuses) is a RemoteError, never silently hidden.

Numpy, urllib3 and the stdlib (plus the backend runtime of the local partitions, loaded lazily).
Why urllib3 for HTTP: it is pure Python with no dependencies of its own (a device's runtime stays
small; httpx would bring httpcore, anyio, h11 and more), it keeps a thread-safe pool of kept-alive
connections with TCP_NODELAY set, and detects a connection the server closed while it sat idle
before reusing it.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import urllib3
from splitc.runtime.executors import Executor, load_executor
from splitc.core.manifest import TensorSpec
from splitc.runtime.session import Answer, Bundle, SplitSession, confident_exit, exit_answer, host_artifact, softmax_max
from splitc.runtime.v2protocol import (
    COMPUTE_PARAMETER,
    EXIT_PARAMETER,
    SHA_PARAMETER,
    HEADER_LENGTH,
    ProtocolError,
    RemoteError,
    decode_response,
    encode_request,
    model_name_for,
)

from splitc.core.errors import BundleError, InputError, SplitcError, first_line

SOURCE_REMOTE = "remote"
SOURCE_FALLBACK = "local-fallback"
SOURCE_EXIT = "early-exit"             # an exit head on this host was confident: nothing was sent
SOURCE_EXIT_FALLBACK = "exit-fallback"  # the server was unreachable: the deepest local exit head answered


@dataclass
class RemoteResult:
    outputs: dict[str, np.ndarray]
    source: str                                   # "remote" | "local-fallback"
    timings: dict[str, float] = field(default_factory=dict)  # ms: local, remote, server (when reported), fallback, total
    bytes_sent: int = 0                           # request bodies put on the wire (all attempts)
    bytes_received: int = 0
    attempts: int = 0                             # HTTP infer attempts made
    error: str | None = None                      # why the answer is a local fallback
    exit: int | None = None                       # the exit head that answered (early-exit, exit-fallback)
    confidence: float | None = None               # its softmax maximum


class _Transient(Exception):
    """A failure worth retrying (network, timeout, 5xx). `retry_after`: seconds the server asked
    the client to wait (a 503 from admission control), if it said."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# The pool retries a request once, at once, when its connection fails before an answer (the
# server closed a kept-alive connection as the request left): infer is idempotent. Other
# failures, and 5xx answers, are the session's to retry with backoff within its timeout.
_RESEND_ONCE = urllib3.Retry(total=1, connect=0, read=1, status=0, other=0, redirect=0, allowed_methods=None,
                             raise_on_status=False)


def _served_inputs(bundle: Bundle, first: int) -> tuple[TensorSpec, ...]:
    return bundle.manifest.inputs if first == 0 else bundle.manifest.boundaries[first - 1]


class RemoteSession:
    """Runs partitions [0, split) here and [split, end) on a v2 inference server.

    `split` is the first partition the server runs; by default the server says (its metadata), or
    it is found by matching the server's input names with the bundle's boundaries (Triton).
    `timeout` bounds the time spent on the network per call (metadata + all attempts)."""

    def __init__(self, bundle: Bundle, url: str, *, token: str | None = None, model_name: str | None = None,
                 split: int | None = None, timeout: float = 10.0, retries: int = 3, backoff: float = 0.05,
                 fallback: bool = True):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--remote {url!r} is not an http(s)://host:port URL")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise InputError("timeout must be > 0, retries and backoff >= 0")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.url = url
        port = parts.port or (443 if parts.scheme == "https" else 80)
        pool = urllib3.HTTPSConnectionPool if parts.scheme == "https" else urllib3.HTTPConnectionPool
        # Non-blocking: a thread finding every kept connection busy opens one more (kept up to 8).
        self._pool = pool(parts.hostname, port, maxsize=8, block=False, retries=_RESEND_ONCE)
        self._prefix = parts.path.rstrip("/")
        self.token = token.strip() if token else None
        self.model_name = model_name or model_name_for(str(self.manifest.model.get("name") or "model"))
        self.timeout, self.retries, self.backoff, self.fallback = float(timeout), int(retries), float(backoff), fallback
        count = len(self.manifest.partitions)
        if split is not None and not 0 <= split < count:
            raise InputError(f"split {split} is out of range: the bundle has partitions 0..{count - 1}")
        self.split = split
        self.server_metadata: dict[str, Any] | None = None
        self._executors: dict[int, Executor] = {}
        self._unloadable: dict[int, str] = {}
        self._local_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._session: SplitSession | None = None
        self._session_loaded: frozenset[int] = frozenset()
        # Request ids: unique per session without a uuid4 (an os.urandom call) per request.
        self._ids = (f"{os.urandom(4).hex()}-{n}" for n in itertools.count())

    # ----------------------------------------------------------------------------- local side

    def _executor(self, index: int) -> Executor | None:
        if index in self._executors:
            return self._executors[index]
        if index in self._unloadable:
            return None
        partition = self.manifest.partitions[index]
        try:
            artifact = host_artifact(partition)
            self._executors[index] = load_executor(artifact, self.bundle.file(artifact))
        except SplitcError as exc:
            self._unloadable[index] = str(exc)
            return None
        return self._executors[index]

    def run_local(self, first: int, last: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run partitions first..last-1 here (raises BundleError when one cannot run here)."""
        with self._local_lock:
            session = self._local_session(first, last)
            for index in range(first, last):
                env = session.run_partition(index, env)
        return dict(env)

    def run_device(self, first: int, last: int, env: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Answer | None, dict[str, np.ndarray]]:
        """Run partitions first..last-1 here, stopping at the first confident exit head.

        Returns the tensors after the last partition run (its boundary), the exit's answer when one
        was confident (None otherwise), and every exit head's logits computed on the way (what a
        fallback answers from when the rest cannot run)."""
        with self._local_lock:
            session = self._local_session(first, last)
            heads: dict[str, np.ndarray] = {}
            for index in range(first, last):
                produced = session.execute(index, env)
                heads.update({spec.output.name: produced[spec.output.name] for spec in self.manifest.exits if spec.output.name in produced})
                taken = confident_exit(self.manifest, index, produced)
                if taken is not None:
                    return dict(produced), exit_answer(self.manifest, taken, produced, index + 1), heads
                env = session.boundary(index, produced)
        return dict(env), None, heads

    def _local_session(self, first: int, last: int) -> SplitSession:
        for index in range(first, last):
            if index not in self._executors and self._executor(index) is None:
                raise BundleError(f"partition {index} cannot run on this host: {self._unloadable[index]}")
        if self._session is None or self._session_loaded != frozenset(self._executors):
            self._session_loaded = frozenset(self._executors)
            placeholders = {i: self._executors.get(i, _missing(i)) for i in range(len(self.manifest.partitions))}
            self._session = SplitSession(self.bundle, placeholders)
        return self._session

    def can_fall_back(self) -> bool:
        with self._local_lock:
            return all(self._executor(p.index) is not None for p in self.manifest.partitions)

    def bind_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        from splitc.runtime.session import bind_model_inputs

        return bind_model_inputs(self.manifest, inputs)

    # ---------------------------------------------------------------------------- HTTP plumbing

    def close(self) -> None:
        self._pool.close()

    def _request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str], timeout: float):
        """One HTTP exchange -> (status, headers, body). Network trouble raises _Transient."""
        all_headers = dict(headers)
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        timeout = max(timeout, 0.001)
        try:
            response = self._pool.urlopen(method, self._prefix + path, body=body, headers=all_headers,
                                          timeout=urllib3.Timeout(connect=timeout, read=timeout))
        except urllib3.exceptions.HTTPError as exc:
            reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
            # urllib3's NewConnectionError (refused, unreachable) derives from its TimeoutError.
            timed_out = isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError))
            kind = "timed out" if timed_out and not isinstance(reason, urllib3.exceptions.NewConnectionError) else f"{type(reason).__name__}: {reason}"
            raise _Transient(f"{method} {self.url}{path} failed ({kind})") from exc
        return response.status, response.headers, response.data

    def _model_path(self, suffix: str = "") -> str:
        return f"/v2/models/{quote(self.model_name, safe='')}{suffix}"

    @staticmethod
    def _error_text(data: bytes) -> str:
        try:
            return str(json.loads(data).get("error"))[:300]
        except (ValueError, AttributeError):
            return data[:200].decode("utf-8", "replace")

    def _get_json(self, suffix: str, deadline: float) -> tuple[int, Any]:
        status, _, data = self._request("GET", self._model_path(suffix), None, {}, deadline - time.monotonic())
        if status >= 500:
            raise _Transient(f"server answered {status} to GET {suffix or 'metadata'}: {self._error_text(data)}")
        if status == 401:
            raise RemoteError(f"server {self.url} refused the token ({self._error_text(data)}); pass the server's --token-file")
        if status == 404:
            raise RemoteError(f"server {self.url} does not serve model {self.model_name!r} ({self._error_text(data)}); check --remote and the model name")
        if status != 200:
            raise RemoteError(f"server {self.url} answered {status}: {self._error_text(data)}")
        try:
            return status, json.loads(data)
        except ValueError as exc:
            raise RemoteError(f"server {self.url} answered metadata that is not JSON ({exc})") from exc

    def _check_server(self, deadline: float) -> None:
        """Fetch metadata once; refuse a server whose model is not this bundle's model."""
        if self.server_metadata is not None:
            return
        with self._meta_lock:
            if self.server_metadata is not None:
                return
            _, meta = self._get_json("", deadline)
            if not isinstance(meta, dict):
                raise RemoteError(f"server {self.url} answered malformed metadata")
            params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
            sha = params.get(SHA_PARAMETER)
            if sha is None:  # Triton: the exported config.pbtxt carries it as a model parameter
                _, config = self._get_json("/config", deadline)
                sha = ((config or {}).get("parameters") or {}).get(SHA_PARAMETER, {}).get("string_value")
            ours = str(self.manifest.model.get("sha256", ""))
            if not sha:
                raise BundleError(f"server {self.url} does not report the model sha256 of {self.model_name!r}; serve it with `splitc serve` or `splitc export-triton`")
            if sha != ours:
                raise BundleError(
                    f"server {self.url} serves model sha256 {str(sha)[:12]}…, this bundle is {ours[:12]}…; deploy the same bundle on both sides"
                )
            names = [i.get("name") for i in meta.get("inputs") or [] if isinstance(i, dict)]
            candidates = [k for k in range(len(self.manifest.partitions)) if [t.name for t in _served_inputs(self.bundle, k)] == names]
            announced = params.get("first_partition")
            split = self.split if self.split is not None else (announced if isinstance(announced, int) else None)
            if split is None:
                if not candidates:
                    raise BundleError(f"server {self.url} takes inputs {names}, which match no boundary of this bundle; deploy the same bundle on both sides")
                split = candidates[-1]
            if split not in candidates:
                raise BundleError(f"server {self.url} takes inputs {names}, not the tensors before partition {split}; check --partition on both sides")
            self.split = split
            self.server_metadata = meta

    def check_server(self, timeout: float | None = None) -> bool:
        """Fetch and check the server's metadata now (it is otherwise fetched by the first call).
        False when the server cannot be reached within `timeout`; raises when it answers but
        refuses (token, model not served, another model's sha256)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self._retry(lambda: self._check_server(deadline), deadline)
        except _Transient:
            return False
        return True

    # ------------------------------------------------------------------------------- inference

    def infer(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> RemoteResult:
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        env = self.bind_inputs(inputs)
        timings: dict[str, float] = {}
        result = RemoteResult({}, SOURCE_REMOTE, timings)
        reason, ran, heads = None, 0, {}
        try:
            self._retry(lambda: self._check_server(deadline), deadline)  # once: the server says where it starts
        except _Transient as exc:
            reason = str(exc)
        if reason is None:
            tick = time.perf_counter()
            env, answer, heads = self.run_device(0, self.split, env)
            timings["local_ms"] = (time.perf_counter() - tick) * 1e3
            if answer is not None:  # an exit head is confident: nothing goes on the wire
                return self._exit_result(answer, result, SOURCE_EXIT, started)
            ran = self.split
            try:
                self._exchange(env, deadline, result)
                timings["total_ms"] = (time.perf_counter() - started) * 1e3
                return result
            except _Transient as exc:
                reason = str(exc)
        return self._fall_back(env, reason, result, started, ran, heads)

    def _exit_result(self, answer: Answer, result: RemoteResult, source: str, started: float, reason: str | None = None) -> RemoteResult:
        result.outputs, result.source, result.error = answer.outputs, source, reason
        result.exit, result.confidence = answer.exit, answer.confidence
        result.timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return result

    def send(self, tensors: Mapping[str, np.ndarray]) -> RemoteResult:
        """Send the tensors the server takes (the boundary before `split`) as they are, without
        running anything here; no fallback. What a link estimator uses to time an upload of this
        variant's size (and the server's compute) when it has no real request to time."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        result = RemoteResult({}, SOURCE_REMOTE, {})
        try:
            self._retry(lambda: self._check_server(deadline), deadline)
            self._exchange(tensors, deadline, result)
        except _Transient as exc:
            raise RemoteError(f"{exc}; no answer within {self.timeout:g} s") from None
        result.timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return result

    def probe(self, timeout: float | None = None) -> float:
        """Milliseconds of one GET /v2/health/ready on a kept-alive connection: a few hundred bytes
        each way, so close to one round trip. Raises RemoteError when the server cannot be reached."""
        timeout = self.timeout if timeout is None else timeout
        try:
            if self._pool.num_connections == 0:  # the TCP (and TLS) handshake is not part of the round trip
                self._request("GET", "/v2/health/live", None, {}, timeout)
            tick = time.perf_counter()
            status, _, data = self._request("GET", "/v2/health/ready", None, {}, timeout)
        except _Transient as exc:
            raise RemoteError(f"probe of {self.url} failed ({first_line(exc)})") from None
        elapsed = (time.perf_counter() - tick) * 1e3
        if status >= 500:
            raise RemoteError(f"server {self.url} is not ready ({status}: {self._error_text(data)})")
        return elapsed

    def _exchange(self, env: Mapping[str, np.ndarray], deadline: float, result: RemoteResult) -> None:
        """POST the served boundary from `env` (with retries); fill result's outputs and timings."""
        boundary = [t.name for t in _served_inputs(self.bundle, self.split)]
        body, headers = encode_request({n: env[n] for n in boundary}, [t.name for t in self.manifest.outputs],
                                       request_id=next(self._ids))
        tick = time.perf_counter()
        try:
            result.outputs = self._retry(lambda: self._post_once(body, headers, deadline, result), deadline)
        finally:
            result.timings["remote_ms"] = (time.perf_counter() - tick) * 1e3

    def _fall_back(self, env: dict[str, np.ndarray], reason: str, result: RemoteResult, started: float,
                   first: int, heads: dict[str, np.ndarray]) -> RemoteResult:
        """The server cannot answer: run the rest here if every partition can run here (exit heads
        still apply); otherwise run what can, and answer from the deepest exit head computed."""
        if not self.fallback:
            raise RemoteError(f"{reason}; no answer after {result.attempts} attempt(s) within {self.timeout:g} s (fallback disabled)")
        count = len(self.manifest.partitions)
        with self._local_lock:
            runnable = first
            while runnable < count and self._executor(runnable) is not None:
                runnable += 1
        tick = time.perf_counter()
        env, answer, more = self.run_device(first, runnable, env) if runnable > first else (env, None, {})
        heads = {**heads, **more}
        result.timings["fallback_ms"] = (time.perf_counter() - tick) * 1e3
        if answer is not None:
            return self._exit_result(answer, result, SOURCE_FALLBACK, started, reason)
        if runnable == count:
            result.outputs = {t.name: env[t.name] for t in self.manifest.outputs}
            result.source, result.error = SOURCE_FALLBACK, reason
            result.timings["total_ms"] = (time.perf_counter() - started) * 1e3
            return result
        computed = [spec for spec in self.manifest.exits if spec.output.name in heads]
        if computed:  # the deepest head this host computed answers, whatever its confidence
            deepest = computed[-1]
            answer = exit_answer(self.manifest, (deepest, softmax_max(heads[deepest.output.name])), heads, runnable)
            return self._exit_result(answer, result, SOURCE_EXIT_FALLBACK, started, reason)
        why = "; ".join(self._unloadable.values())
        raise RemoteError(f"{reason}; cannot fall back to running the model here ({why[:200]}) and the bundle has no exit head on this host")

    def _retry(self, action, deadline: float):
        """Call action() until it succeeds, retrying _Transient failures with exponential backoff
        while the deadline allows; then raise the last failure."""
        last = "no attempt made within the timeout"
        for attempt in range(self.retries + 1):
            if deadline - time.monotonic() <= 0:
                break
            try:
                return action()
            except _Transient as exc:
                last = str(exc)
                asked = exc.retry_after or 0.0
            pause = min(max(self.backoff * (2 ** attempt), asked), deadline - time.monotonic())
            if attempt < self.retries and pause > 0:
                time.sleep(pause)
        raise _Transient(last)

    def _post_once(self, body: bytes, headers: dict[str, str], deadline: float, result: RemoteResult) -> dict[str, np.ndarray]:
        result.attempts += 1
        result.bytes_sent += len(body)
        status, response_headers, data = self._request("POST", self._model_path("/infer"), body, headers, deadline - time.monotonic())
        result.bytes_received += len(data)
        if status == 200:
            return self._decode(response_headers, data, result)
        if status >= 500 or status == 429:
            raise _Transient(f"server answered {status}: {self._error_text(data)}", _retry_after(response_headers))
        if status == 401:
            raise RemoteError(f"server {self.url} refused the token ({self._error_text(data)}); pass the server's --token-file")
        raise RemoteError(f"server {self.url} refused the request ({status}): {self._error_text(data)}")

    def _decode(self, headers: Mapping[str, str], data: bytes, result: RemoteResult) -> dict[str, np.ndarray]:
        try:
            arrays, header = decode_response(data, headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            raise RemoteError(f"server {self.url} answered a malformed response ({exc})") from exc
        params = header.get("parameters")
        server_ms = params.get(COMPUTE_PARAMETER) if isinstance(params, dict) else None
        if isinstance(server_ms, (int, float)) and server_ms >= 0:  # Triton reports none: then unknown
            result.timings["server_ms"] = float(server_ms)
        server_exit = params.get(EXIT_PARAMETER) if isinstance(params, dict) else None
        if isinstance(server_exit, int):
            result.exit = server_exit
        outputs = {}
        for spec in self.manifest.outputs:
            array = arrays.get(spec.name)
            if array is None or not spec.fits(tuple(array.shape)) or array.dtype != np.dtype(spec.dtype):
                got = "nothing" if array is None else f"{array.dtype}{list(array.shape)}"
                raise RemoteError(f"server {self.url} answered {got} for output {spec.name!r}, expected {spec.described()}")
            outputs[spec.name] = array
        return outputs


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (the delay form; an HTTP date is not worth parsing here)."""
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


def _missing(index: int) -> Executor:
    def run(_inputs):
        raise BundleError(f"partition {index} is not loaded on this host")

    return run
