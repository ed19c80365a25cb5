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

Numpy and the stdlib only (plus the backend runtime of the local partitions, loaded lazily).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
from splitc.runtime.executors import Executor, load_executor
from splitc.runtime.manifest import TensorSpec
from splitc.runtime.session import Bundle, SplitSession, host_artifact
from splitc.runtime.v2protocol import (
    HEADER_LENGTH,
    ProtocolError,
    RemoteError,
    decode_response,
    encode_request,
    model_name_for,
)

from splitc.errors import BundleError, InputError, SplitcError

SOURCE_REMOTE = "remote"
SOURCE_FALLBACK = "local-fallback"
SHA_PARAMETER = "model_sha256"


@dataclass
class RemoteResult:
    outputs: dict[str, np.ndarray]
    source: str                                   # "remote" | "local-fallback"
    timings: dict[str, float] = field(default_factory=dict)  # ms: local, remote, fallback, total
    bytes_sent: int = 0                           # request bodies put on the wire (all attempts)
    bytes_received: int = 0
    attempts: int = 0                             # HTTP infer attempts made
    error: str | None = None                      # why the answer is a local fallback


class _Transient(Exception):
    """A failure worth retrying (network, timeout, 5xx)."""


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
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
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
        self._tls = threading.local()
        self._session: SplitSession | None = None
        self._session_loaded: frozenset[int] = frozenset()

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

    def _run_local(self, first: int, last: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run partitions first..last-1 here (raises BundleError when one cannot run here)."""
        with self._local_lock:
            for index in range(first, last):
                if self._executor(index) is None:
                    raise BundleError(f"partition {index} cannot run on this host: {self._unloadable[index]}")
            if self._session is None or self._session_loaded != frozenset(self._executors):
                self._session_loaded = frozenset(self._executors)
                placeholders = {i: self._executors.get(i, _missing(i)) for i in range(len(self.manifest.partitions))}
                self._session = SplitSession(self.bundle, placeholders)
            for index in range(first, last):
                env = self._session.run_partition(index, env)
        return dict(env)

    def can_fall_back(self) -> bool:
        with self._local_lock:
            return all(self._executor(p.index) is not None for p in self.manifest.partitions)

    def bind_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        from splitc.runtime.session import bind_model_inputs

        return bind_model_inputs(self.manifest, inputs)

    # ---------------------------------------------------------------------------- HTTP plumbing

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._tls, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=timeout)
            self._tls.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._tls, "conn", None)
        if conn is not None:
            conn.close()
            self._tls.conn = None

    def close(self) -> None:
        self._drop_connection()

    def _request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str], timeout: float):
        """One HTTP exchange -> (status, headers, body). Network trouble raises _Transient."""
        all_headers = dict(headers)
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection(max(timeout, 0.001))
        try:
            conn.request(method, self._prefix + path, body=body, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            kind = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else f"{type(exc).__name__}: {exc}"
            raise _Transient(f"{method} {self.url}{path} failed ({kind})") from exc
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        return response.status, response, data

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

    # ------------------------------------------------------------------------------- inference

    def infer(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> RemoteResult:
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        env = self.bind_inputs(inputs)
        timings: dict[str, float] = {}
        result = RemoteResult({}, SOURCE_REMOTE, timings)
        reason = None
        try:
            self._retry(lambda: self._check_server(deadline), deadline)
        except _Transient as exc:
            reason = str(exc)
        if reason is None:
            tick = time.perf_counter()
            env = self._run_local(0, self.split, env)
            timings["local_ms"] = (time.perf_counter() - tick) * 1e3
            boundary = [t.name for t in _served_inputs(self.bundle, self.split)]
            body, headers = encode_request({n: env[n] for n in boundary}, [t.name for t in self.manifest.outputs],
                                           request_id=uuid.uuid4().hex[:16])
            tick = time.perf_counter()
            try:
                result.outputs = self._retry(lambda: self._post_once(body, headers, deadline, result), deadline)
                timings["remote_ms"] = (time.perf_counter() - tick) * 1e3
                timings["total_ms"] = (time.perf_counter() - started) * 1e3
                return result
            except _Transient as exc:
                reason = str(exc)
                timings["remote_ms"] = (time.perf_counter() - tick) * 1e3
        return self._fall_back(env, reason, result, started)

    def _fall_back(self, env: dict[str, np.ndarray], reason: str, result: RemoteResult, started: float) -> RemoteResult:
        first = self.split if self.split is not None and "local_ms" in result.timings else 0
        if not self.fallback:
            raise RemoteError(f"{reason}; no answer after {result.attempts} attempt(s) within {self.timeout:g} s (fallback disabled)")
        if not self.can_fall_back():
            why = "; ".join(self._unloadable.values())
            raise RemoteError(f"{reason}; cannot fall back to running the model here ({why[:200]})")
        tick = time.perf_counter()
        env = self._run_local(first, len(self.manifest.partitions), env)
        result.timings["fallback_ms"] = (time.perf_counter() - tick) * 1e3
        result.outputs = {t.name: env[t.name] for t in self.manifest.outputs}
        result.source = SOURCE_FALLBACK
        result.error = reason
        result.timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return result

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
            pause = min(self.backoff * (2 ** attempt), deadline - time.monotonic())
            if attempt < self.retries and pause > 0:
                time.sleep(pause)
        raise _Transient(last)

    def _post_once(self, body: bytes, headers: dict[str, str], deadline: float, result: RemoteResult) -> dict[str, np.ndarray]:
        result.attempts += 1
        result.bytes_sent += len(body)
        status, response, data = self._request("POST", self._model_path("/infer"), body, headers, deadline - time.monotonic())
        result.bytes_received += len(data)
        if status == 200:
            return self._decode(response, data)
        if status >= 500 or status == 429:
            raise _Transient(f"server answered {status}: {self._error_text(data)}")
        if status == 401:
            raise RemoteError(f"server {self.url} refused the token ({self._error_text(data)}); pass the server's --token-file")
        raise RemoteError(f"server {self.url} refused the request ({status}): {self._error_text(data)}")

    def _decode(self, response, data: bytes) -> dict[str, np.ndarray]:
        try:
            arrays, _ = decode_response(data, response.getheader(HEADER_LENGTH))
        except ProtocolError as exc:
            raise RemoteError(f"server {self.url} answered a malformed response ({exc})") from exc
        outputs = {}
        for spec in self.manifest.outputs:
            array = arrays.get(spec.name)
            if array is None or tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
                got = "nothing" if array is None else f"{array.dtype}{list(array.shape)}"
                raise RemoteError(f"server {self.url} answered {got} for output {spec.name!r}, expected {spec.dtype}{list(spec.shape)}")
            outputs[spec.name] = array
        return outputs


def _missing(index: int) -> Executor:
    def run(_inputs):
        raise BundleError(f"partition {index} is not loaded on this host")

    return run
