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

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
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
    """A failure worth retrying (network, timeout, 5xx)."""


class _BadResponse(Exception):
    """The server's answer is not HTTP/1.x."""


class _Connection:
    """One kept-alive HTTP/1.1 connection, the little of HTTP this client needs.

    Why not http.client: it writes the request head and the body separately (with Nagle on, the
    body's last segment can then wait for the server's delayed ACK) and parses response headers
    with the email package, ~60 us a response, a fifth of this runtime's whole per-request budget.
    Here the head and body leave in one write with TCP_NODELAY set, and the response head is split
    by hand: status line, `Name: value` lines, a Content-Length or chunked body."""

    MAX_LINE = 65536
    MAX_HEADERS = 100

    def __init__(self, scheme: str, host: str, port: int, host_header: str, timeout: float):
        self.scheme, self.host, self.port, self.host_header = scheme, host, port, host_header
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._reader = None

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock, self._reader = sock, sock.makefile("rb")

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        if self.sock is not None:
            self.sock.settimeout(timeout)

    def close(self) -> None:
        for closable in (self._reader, self.sock):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass
        self.sock = self._reader = None

    def exchange(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        """Send one request, read its response: (status, headers with lower-case names, body)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        message = head + body if body else head
        reused = self.sock is not None
        if not reused:
            self.connect()
        try:
            self.sock.sendall(message)
            status, version, response_headers = self._read_head()
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            if not reused:
                raise
            # The server closed the kept-alive connection while it sat idle (splitc serve does
            # after 30 s): nothing of this request was answered, so it is sent again at once on a
            # new connection rather than counted as a failed attempt and backed off.
            self.close()
            self.connect()
            self.sock.sendall(message)
            status, version, response_headers = self._read_head()
        while 100 <= status < 200:  # interim answers (100 Continue) precede the real one
            status, version, response_headers = self._read_head()
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif response_headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._read_chunked()
        elif "content-length" in response_headers:
            try:
                length = int(response_headers["content-length"])
            except ValueError:
                raise _BadResponse(f"Content-Length {response_headers['content-length'][:40]!r}") from None
            data = self._read_exact(length)
        else:  # no framing: the body runs to the end of the connection
            data = self._reader.read()
            response_headers["connection"] = "close"
        if version == "HTTP/1.0" and response_headers.get("connection", "").lower() != "keep-alive":
            response_headers["connection"] = "close"
        return status, response_headers, data

    def _readline(self) -> bytes:
        line = self._reader.readline(self.MAX_LINE + 1)
        if len(line) > self.MAX_LINE:
            raise _BadResponse("a header line is too long")
        return line

    def _read_head(self) -> tuple[int, str, dict[str, str]]:
        line = self._readline()
        if not line:
            raise ConnectionResetError("the server closed the connection without answering")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadResponse(f"status line {line[:60]!r}")
        headers: dict[str, str] = {}
        last = None
        for _ in range(self.MAX_HEADERS + 1):
            line = self._readline()
            if line in (b"\r\n", b"\n", b""):
                return int(parts[1]), parts[0], headers
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and last is not None:  # a folded continuation line
                headers[last] += " " + text.strip()
                continue
            name, sep, value = text.partition(":")
            if not sep:
                raise _BadResponse(f"header line {text[:60]!r}")
            last = name.strip().lower()
            headers.setdefault(last, value.strip())  # the first of repeated headers, as http.client reads them
        raise _BadResponse(f"more than {self.MAX_HEADERS} headers")

    def _read_exact(self, length: int) -> bytes:
        data = self._reader.read(length)
        if len(data) != length:
            raise ConnectionResetError(f"the connection closed after {len(data)} of {length} body bytes")
        return data

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size_line = self._readline().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadResponse(f"chunk size {size_line[:20]!r}") from None
            if size == 0:
                while self._readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(self._read_exact(size))
            self._readline()


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
        self._host_header = parts.netloc.rpartition("@")[2]
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

    def _connection(self, timeout: float) -> _Connection:
        """This thread's connection to the server (kept alive between calls)."""
        conn = getattr(self._tls, "conn", None)
        if conn is None:
            conn = _Connection(self._scheme, self._host, self._port, self._host_header, timeout)
            self._tls.conn = conn
        conn.set_timeout(timeout)
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
            status, response_headers, data = conn.exchange(method, self._prefix + path, body, all_headers)
        except (OSError, _BadResponse) as exc:
            self._drop_connection()
            if isinstance(exc, (socket.timeout, TimeoutError)):
                kind = "timed out"
            elif isinstance(exc, _BadResponse):
                kind = f"the answer is not HTTP: {exc}"
            else:
                kind = f"{type(exc).__name__}: {exc}"
            raise _Transient(f"{method} {self.url}{path} failed ({kind})") from exc
        if response_headers.get("connection", "").lower() == "close":
            self._drop_connection()
        return status, response_headers, data

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
        conn = self._connection(timeout)
        try:
            if conn.sock is None:
                conn.connect()  # the TCP (and TLS) handshake is not part of the round trip measured
            tick = time.perf_counter()
            status, _, data = self._request("GET", "/v2/health/ready", None, {}, timeout)
        except (_Transient, OSError) as exc:
            self._drop_connection()
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
            pause = min(self.backoff * (2 ** attempt), deadline - time.monotonic())
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
            raise _Transient(f"server answered {status}: {self._error_text(data)}")
        if status == 401:
            raise RemoteError(f"server {self.url} refused the token ({self._error_text(data)}); pass the server's --token-file")
        raise RemoteError(f"server {self.url} refused the request ({status}): {self._error_text(data)}")

    def _decode(self, headers: Mapping[str, str], data: bytes, result: RemoteResult) -> dict[str, np.ndarray]:
        try:
            arrays, header = decode_response(data, headers.get(HEADER_LENGTH.lower()))
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
            if array is None or tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
                got = "nothing" if array is None else f"{array.dtype}{list(array.shape)}"
                raise RemoteError(f"server {self.url} answered {got} for output {spec.name!r}, expected {spec.dtype}{list(spec.shape)}")
            outputs[spec.name] = array
        return outputs


def _missing(index: int) -> Executor:
    def run(_inputs):
        raise BundleError(f"partition {index} is not loaded on this host")

    return run
