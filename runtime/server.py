"""Serve a bundle's partitions K..end over the KServe v2 / Open Inference Protocol (HTTP/REST).

    server = PartitionServer(Bundle.open("model.splitc"), first_partition=1, token="...")
    httpd = make_http_server(server, "127.0.0.1", 8000)
    serve_until_signalled(httpd)        # SIGTERM/SIGINT: stop accepting, finish in-flight, exit

Endpoints (Triton-compatible, so the same client works against either):

    GET  /v2/health/live, /v2/health/ready            no token
    GET  /v2                                           server metadata, no token
    GET  /v2/models/{name}[/versions/1]                model metadata (token), parameters carry
                                                       model_sha256 and the partitions served
    GET  /v2/models/{name}[/versions/1]/ready          no token
    GET  /v2/models/{name}[/versions/1]/config         Triton-style config JSON (token)
    POST /v2/models/{name}[/versions/1]/infer          JSON tensors or the binary extension (token)

One server may serve several models (the variants of an adaptive bundle, `variant_servers`): each
is its own PartitionServer under its own name; server-level endpoints answer for all of them.
Infer responses carry `parameters.compute_ms`: the time from the decoded request to its outputs
(waiting for the backend included), which a client subtracts to time the link alone.

Every client error is a 4xx with `{"error": "..."}`; the server keeps serving. stdlib + numpy only
(ThreadingHTTPServer: one thread per connection; the backend call itself is serialised by a lock,
since TVM's VM and TensorRT contexts are not thread-safe).
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from splitc.runtime.executors import Executor, load_executor
from splitc.core.manifest import TensorSpec
from splitc.runtime.session import Bundle, SplitSession, confident_exit, exit_answer, host_artifact
from splitc.runtime.v2protocol import (
    COMPUTE_PARAMETER,
    EXIT_PARAMETER,
    SHA_PARAMETER,
    EXTENSIONS,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    ProtocolError,
    decode_request,
    encode_error,
    encode_response,
    model_name_for,
    v2_datatype,
    wanted_outputs,
)

from splitc.core.errors import BundleError, InputError, SplitcError

log = logging.getLogger("splitc.server")

DEFAULT_MAX_BODY = 64 << 20


def served_inputs(bundle: Bundle, first: int) -> tuple[TensorSpec, ...]:
    """What a server running partitions first..end receives: the boundary before `first`."""
    return bundle.manifest.inputs if first == 0 else bundle.manifest.boundaries[first - 1]


def _not_here(index: int) -> Executor:
    def run(_inputs):
        raise BundleError(f"partition {index} runs on the device, not on this server")

    return run


class PartitionServer:
    """The inference logic, independent of HTTP: check, run partitions K..end, answer."""

    def __init__(self, bundle: Bundle, first_partition: int = 1, *, token: str | None = None,
                 model_name: str | None = None, max_body: int = DEFAULT_MAX_BODY):
        count = len(bundle.manifest.partitions)
        if not 0 <= first_partition < count:
            raise InputError(f"--partition {first_partition} is out of range: the bundle has partitions 0..{count - 1}")
        if token is not None and not token.strip():
            raise InputError("the token is empty; put a long random secret in the token file (e.g. `openssl rand -hex 32`)")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.first = first_partition
        self.token = token.strip().encode() if token else None
        self.max_body = int(max_body)
        self.name = model_name_for(model_name or str(self.manifest.model.get("name") or "model"))
        self.inputs = served_inputs(bundle, first_partition)
        self.outputs = self.manifest.outputs
        self.input_specs = {t.name: t for t in self.inputs}
        executors = {i: _not_here(i) for i in range(first_partition)}
        for p in self.manifest.partitions[first_partition:]:
            artifact = host_artifact(p)
            executors[p.index] = load_executor(artifact, bundle.file(artifact))
        self.session = SplitSession(bundle, executors)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "errors_4xx": 0, "errors_5xx": 0, "infer": 0}
        self._stats_lock = threading.Lock()

    # -------------------------------------------------------------------------- protocol pieces

    @property
    def sha256(self) -> str:
        return str(self.manifest.model.get("sha256", ""))

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token)

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

    def infer(self, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        arrays, header = decode_request(body, header_length, self.input_specs)
        wanted = wanted_outputs(header, [t.name for t in self.outputs])
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise ProtocolError("'id' must be a string")
        env: Mapping[str, np.ndarray] = arrays
        tick = time.perf_counter()
        taken = None
        with self._lock:
            for p in self.manifest.partitions[self.first:]:
                produced = self.session.execute(p.index, env)
                # A middle tier with an exit head answers from it when confident, as the device does.
                taken = confident_exit(self.manifest, p.index, produced)
                if taken is not None:
                    env = exit_answer(self.manifest, taken, produced, p.index + 1).outputs
                    break
                env = self.session.boundary(p.index, produced)
        compute_ms = (time.perf_counter() - tick) * 1e3
        outputs = {name: env[name] for name in wanted}
        parameters = {SHA_PARAMETER: self.sha256, COMPUTE_PARAMETER: round(compute_ms, 4)}
        if taken is not None:
            parameters[EXIT_PARAMETER] = taken[0].index
        return encode_response(self.name, outputs, binary=wanted, request_id=request_id, parameters=parameters)

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1


class _Headers(dict):
    """Request headers by lower-case name (the first of a repeated one, as the email package's
    Message.get answers); `get` takes any case."""

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)


class _HeaderError(Exception):
    pass


_MAX_HEADER_LINE = 65536
_MAX_HEADERS = 100


def _read_headers(rfile) -> _Headers:
    headers, last = _Headers(), None
    for _ in range(_MAX_HEADERS + 1):
        line = rfile.readline(_MAX_HEADER_LINE + 1)
        if len(line) > _MAX_HEADER_LINE:
            raise _HeaderError("Line too long")
        if line in (b"\r\n", b"\n", b""):
            return headers
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t"):  # a folded continuation of the previous header
            if last is not None:
                dict.__setitem__(headers, last, dict.get(headers, last) + " " + text.strip())
            continue
        name, _, value = text.partition(":")
        last = name.strip().lower()
        headers.setdefault(last, value.strip())
    raise _HeaderError("Too many headers")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "splitc"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out promptly (no 40 ms delayed-ACK stall)
    timeout = 30  # an idle keep-alive connection is closed after this many seconds
    server: SplitcHTTPServer

    def log_message(self, fmt: str, *args) -> None:  # quiet by default; `splitc serve -v` logs
        if log.isEnabledFor(logging.DEBUG):  # formatted only when someone reads it
            log.debug("%s - %s", self.address_string(), fmt % args)

    def parse_request(self) -> bool:
        """BaseHTTPRequestHandler.parse_request with the header lines split here: the stdlib hands
        them to the email package, which takes ~40 us a request, the largest share of this
        server's own time per request. The same checks and the same error answers otherwise."""
        self.command = None
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            try:
                if not version.startswith("HTTP/"):
                    raise ValueError
                base = version.split("/", 1)[1]
                numbers = base.split(".")
                if len(numbers) != 2 or not all(n.isdigit() and len(n) <= 10 for n in numbers):
                    raise ValueError
                number = int(numbers[0]), int(numbers[1])
            except (ValueError, IndexError):
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            if number >= (1, 1) and self.protocol_version >= "HTTP/1.1":
                self.close_connection = False
            if number >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({base})")
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = _read_headers(self.rfile)
        except _HeaderError as exc:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, str(exc))
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        if (self.headers.get("Expect", "").lower() == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    # ------------------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {"Content-Type": JSON_CONTENT_TYPE})
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection or self.server.draining.is_set():
            self.close_connection = True
            self.send_header("Connection", "close")
        # Counted before the response leaves: a client that has its answer must see it in the stats.
        # Requests to a model count for that model, the others for the first model served.
        app = self.__dict__.get("app") or self.server.app
        app.count("requests")
        if 400 <= status < 500:
            app.count("errors_4xx")
        elif status >= 500:
            app.count("errors_5xx")
        if self.command != "HEAD":
            # Head and body in one write: one syscall and one segment instead of two.
            self._headers_buffer.append(b"\r\n" + body)
            self.flush_headers()
        else:
            self.end_headers()

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error(self, status: int, message: str) -> None:
        self._send(status, encode_error(message))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # BaseHTTPRequestHandler's own errors (bad request line, oversized headers): JSON, and close.
        self.close_connection = True
        self.app = None
        try:
            self._error(code, message or HTTPStatus(code).phrase)
        except OSError:
            pass

    def _route(self) -> tuple[str, str | None]:
        path = self.path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["v2", "health"] and len(parts) == 3:
            return "health:" + parts[2], None
        if parts == ["v2"]:
            return "server", None
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            name, rest = parts[2], parts[3:]
            if len(rest) >= 2 and rest[0] == "versions":
                if rest[1] != "1":
                    return "bad-version", name
                rest = rest[2:]
            if not rest:
                return "model", name
            if len(rest) == 1 and rest[0] in ("ready", "infer", "config"):
                return rest[0], name
            if rest[0] == "sessions":  # a decoder's sessions (runtime/decoder_sessions.py)
                self.session_path = rest[1:]
                return "sessions", name
        return "unknown", None

    def _check_model(self, name: str | None) -> bool:
        """Find the model a request names; it becomes `self.app` for the rest of the request."""
        app = self.server.apps.get(name) if name is not None else None
        if app is None:
            served = ", ".join(repr(n) for n in self.server.apps)
            self._error(404, f"model {str(name)[:80]!r} is not served here (this server serves {served})")
            return False
        self.app = app
        return True

    def _check_token(self) -> bool:
        if (self.app or self.server.app).authorized(self.headers.get("Authorization")):
            return True
        self._error(401, "missing or wrong token: send 'Authorization: Bearer <token>' with the server's shared secret")
        return False

    def _track(self, delta: int) -> None:
        with self.server.inflight_cond:
            self.server.inflight += delta
            self.server.inflight_cond.notify_all()

    # ------------------------------------------------------------------------------ handlers

    def handle(self) -> None:
        self.server.register(self.connection)
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.server.unregister(self.connection)

    def do_GET(self) -> None:
        self.app = None  # set by _check_model; a kept-alive connection may name another model next
        self._track(1)
        try:
            self._get()
        except Exception as exc:  # never let a handler thread die silently
            log.exception("GET %s failed", self.path)
            self._error(500, f"internal error: {type(exc).__name__}")
        finally:
            self._track(-1)

    do_HEAD = do_GET

    def _get(self) -> None:
        app = self.server.app
        kind, name = self._route()
        ready = not self.server.draining.is_set()
        if kind == "health:live":
            self._json(200, {"live": True})
        elif kind == "health:ready":
            self._json(200 if ready else 503, {"ready": ready})
        elif kind == "server":
            self._json(200, {"name": "splitc", "version": app.manifest.splitc_version, "extensions": list(EXTENSIONS)})
        elif kind == "bad-version":
            self._error(404, "only version 1 of the model is served")
        elif kind == "ready":
            if self._check_model(name):
                self._json(200 if ready else 503, {"name": self.app.name, "ready": ready})
        elif kind in ("model", "config"):
            if self._check_model(name) and self._check_token():
                self._json(200, self.app.metadata() if kind == "model" else self.app.config())
        elif kind == "infer":
            self._error(405, "infer takes POST")
        else:
            self._error(404, f"no such endpoint {self.path[:80]!r}; see /v2/health/ready, /v2/models/{app.name}")

    def do_POST(self) -> None:
        self.app = None
        self._track(1)
        try:
            self._post()
        except Exception as exc:
            log.exception("POST %s failed", self.path)
            self._error(500, f"internal error: {type(exc).__name__}")
        finally:
            self._track(-1)

    def _read_body(self) -> bytes | None:
        app = self.server.app
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "chunked bodies are not accepted; send Content-Length")
            return None
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -2
        if length < 0:
            self.close_connection = True
            self._error(411 if length == -1 else 400, "a POST needs a valid Content-Length header")
            return None
        if length > app.max_body:
            self.close_connection = True  # the body is not read; the connection cannot be reused
            self._error(413, f"body of {length} bytes exceeds the server's limit of {app.max_body} bytes (--max-body-mb)")
            self._linger(length)
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _linger(self, length: int, cap: int = 16 << 20, seconds: float = 2.0) -> None:
        """Read and drop (part of) an unwanted body so the client, still sending, gets to read the
        refusal instead of a broken pipe (as a web server's lingering close does)."""
        deadline = time.monotonic() + seconds
        left = min(length, cap)
        try:
            self.connection.settimeout(0.5)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16)) if hasattr(self.rfile, "read1") else self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def do_DELETE(self) -> None:
        self.app = None
        self._track(1)
        try:
            if self._route()[0] == "sessions":
                self._sessions(self._route()[1])
            else:
                self._error(405, "DELETE is only for /v2/models/<name>/sessions/<id>")
        except Exception as exc:
            log.exception("DELETE %s failed", self.path)
            self._error(500, f"internal error: {type(exc).__name__}")
        finally:
            self._track(-1)

    def _sessions(self, name: str | None) -> None:
        """Hand a sessions request to the model's `handle` (a DecoderService)."""
        if not self._check_model(name) or not self._check_token():
            self.close_connection = True
            return
        body = self._read_body() if self.command == "POST" else b""
        if body is None:
            return
        if not hasattr(self.app, "handle"):
            self._error(404, f"model {self.app.name!r} is not a decoder; it has no sessions")
            return
        try:
            status, payload = self.app.handle(self.command, self.session_path, body, self.headers.get("Authorization"))
        except ProtocolError as exc:
            self._error(exc.status, str(exc))
            return
        except InputError as exc:
            self._error(400, str(exc))
            return
        self._json(status, payload)

    def _post(self) -> None:
        app = self.server.app
        kind, name = self._route()
        if kind == "sessions":
            self._sessions(name)
            return
        if kind != "infer":
            # Drain what the client sent so a keep-alive connection stays in sync, then refuse.
            if self._read_body() is None:
                return
            self._error(404 if kind in ("unknown", "bad-version") else 405, f"POST is only for /v2/models/{app.name}/infer")
            return
        if not self._check_model(name) or not self._check_token():
            self.close_connection = True
            return
        body = self._read_body()
        if body is None:
            return
        app = self.app
        try:
            payload, headers = app.infer(body, self.headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            self._error(exc.status, str(exc))
            return
        except InputError as exc:
            self._error(400, str(exc))
            return
        except SplitcError as exc:
            log.error("inference failed: %s", exc)
            self._error(500, f"inference failed on the server: {exc}")
            return
        app.count("infer")
        self._send(200, payload, headers)


class SplitcHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: PartitionServer | Sequence[PartitionServer]):
        apps = list(app) if isinstance(app, Sequence) else [app]
        if not apps:
            raise InputError("a server needs at least one model to serve")
        self.apps = {a.name: a for a in apps}
        if len(self.apps) != len(apps):
            raise InputError("two models served under the same name; give each its own --name")
        super().__init__(address, _Handler)
        self.app = apps[0]  # answers the server-level endpoints
        self.draining = threading.Event()
        self.inflight = 0
        self.inflight_cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def register(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def unregister(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def drain(self, timeout: float = 30.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to `timeout` s), close idle connections.
        Call from a thread other than the one in serve_forever. True if everything finished."""
        self.draining.set()
        self.shutdown()  # stops the accept loop; returns once serve_forever has exited
        self.socket.close()  # new connections are refused now, not left waiting in the backlog
        deadline = time.monotonic() + timeout
        done = True
        with self.inflight_cond:
            while self.inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    done = False
                    break
                self.inflight_cond.wait(left)
        # Connections now idle in keep-alive wait for a next request that will not be served.
        with self._conns_lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.server_close()
        return done


def make_http_server(app: PartitionServer | Sequence[PartitionServer], host: str = "127.0.0.1", port: int = 8000) -> SplitcHTTPServer:
    try:
        return SplitcHTTPServer((host, port), app)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") from exc


def serve_in_thread(httpd: SplitcHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="splitc-serve", daemon=True)
    thread.start()
    return thread


def serve_until_signalled(httpd: SplitcHTTPServer, drain_timeout: float = 30.0, on_ready=None) -> bool:
    """Serve until SIGTERM or SIGINT, then drain gracefully. Main thread only."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve_in_thread(httpd)
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            pass
        return httpd.drain(drain_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def variant_servers(variant_dir: str | Path, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> list[PartitionServer]:
    """One PartitionServer per variant of an adaptive bundle that sends something (device-only
    variants need no server), each serving its partitions from the first one off the device,
    named `<model>-v<k>` (what AdaptiveSession asks for)."""
    from splitc.runtime.adaptive import read_variants

    index = read_variants(variant_dir)
    apps = []
    for variant in index.variants:
        if variant.first_remote is None:
            continue
        bundle = Bundle.open(Path(variant_dir) / variant.directory)
        apps.append(PartitionServer(bundle, variant.first_remote, token=token, max_body=max_body, model_name=variant.model_name))
    if not apps:
        raise InputError(f"every variant in {variant_dir} runs on the device alone; there is nothing to serve")
    return apps
