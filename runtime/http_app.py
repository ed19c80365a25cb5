"""The KServe v2 REST routes of `splitc serve`, as a Starlette app (served by uvicorn).

    GET  /v2/health/live, /v2/health/ready            no token
    GET  /v2                                           server metadata, no token
    GET  /v2/models/{name}[/versions/1]                model metadata (token), parameters carry
                                                       model_sha256 and the partitions served
    GET  /v2/models/{name}[/versions/1]/ready          no token
    GET  /v2/models/{name}[/versions/1]/config         Triton-style config JSON (token)
    POST /v2/models/{name}[/versions/1]/infer          JSON tensors or the binary extension (token)
    POST /v2/models/{name}/sessions[/{id}/step|verify]  a decoder's sessions (token; runtime/decoder_sessions.py)
    DELETE /v2/models/{name}/sessions/{id}             close one
    GET  /metrics                                      Prometheus text format (token)

Why Starlette and not FastAPI on top of it: the bodies are the v2 binary extension (raw tensor
bytes after a JSON header), which FastAPI's pydantic validation and OpenAPI schemas cannot
describe, so the routes take the raw request either way; FastAPI would only add its
dependency-resolution step to every request.

Every refusal is a 4xx with `{"error": "..."}`: unknown paths and methods too. The body limit is
checked from Content-Length before reading; an oversized body is read and dropped (up to 16 MiB
or 2 s) so the client, still sending, reads the 413 instead of a broken pipe. A full queue answers
503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from splitc.core.errors import InputError, SplitcError
from splitc.runtime.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from splitc.runtime.scheduler import Overloaded
from splitc.runtime.server import PartitionServer, ServedModels, is_session_model
from splitc.runtime.v2protocol import EXTENSIONS, HEADER_LENGTH, JSON_CONTENT_TYPE, ProtocolError, encode_error

log = logging.getLogger("splitc.server")

PROTOCOL = "http"
RETRY_AFTER_S = 1
LINGER_BYTES, LINGER_S = 16 << 20, 2.0


def route(path: str) -> tuple[str, str | None]:
    """(kind, model name) of a request path."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["v2", "health"] and len(parts) == 3:
        return "health:" + parts[2], None
    if parts == ["v2"]:
        return "server", None
    if parts == ["metrics"]:
        return "metrics", None
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
        if rest[0] == "sessions":
            return "sessions", name
    return "unknown", None


class _Refused(Exception):
    """Answer `status` with a JSON error (and close the connection when `close`)."""

    def __init__(self, status: int, message: str, *, close: bool = False, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.close, self.headers = status, close, headers or {}


def create_app(served: ServedModels) -> Starlette:
    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        app = served.app
        kind, name = route(request.url.path)
        try:
            if kind == "sessions" and request.method in ("POST", "DELETE"):
                app, status, body, headers = await _sessions(served, request, name)
            elif request.method in ("GET", "HEAD"):
                app, status, body, headers = _get(served, request, kind, name)
            elif request.method == "POST":
                app, status, body, headers = await _post(served, request, kind, name, started)
            else:
                raise _Refused(405, f"method {request.method[:20]} is not served; use GET or POST")
        except _Refused as exc:
            status, body = exc.status, encode_error(str(exc))
            headers = {"Content-Type": JSON_CONTENT_TYPE, **exc.headers}
            if exc.close:
                headers["Connection"] = "close"
            app = served.apps.get(name, served.app) if name else served.app
        except Exception as exc:  # noqa: BLE001 - answered, logged, and the server keeps serving
            log.exception("%s %s failed", request.method, request.url.path[:80])
            status, body, headers = 500, encode_error(f"internal error: {type(exc).__name__}"), {"Content-Type": JSON_CONTENT_TYPE}
        _account(served, app, kind, status, started)
        if served.draining.is_set():
            headers["Connection"] = "close"
        return Response(body, status_code=status, headers=headers)

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


def _account(served: ServedModels, app: PartitionServer, kind: str, status: int, started: float) -> None:
    # Counted before the response leaves: a client that has its answer must see it in the stats.
    app.count("requests")
    if 400 <= status < 500:
        app.count("errors_4xx")
    elif status >= 500 and status != 503:
        app.count("errors_5xx")
    elif status == 200 and kind == "infer":
        app.count("infer")
    served.metrics.answered(app.name, PROTOCOL, status, time.perf_counter() - started if kind == "infer" and status == 200 else None)


def _json(status: int, payload: Any) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(payload).encode(), {"Content-Type": JSON_CONTENT_TYPE}


def _model(served: ServedModels, name: str | None) -> PartitionServer:
    app = served.apps.get(name) if name is not None else None
    if app is None:
        listed = ", ".join(repr(n) for n in served.apps)
        raise _Refused(404, f"model {str(name)[:80]!r} is not served here (this server serves {listed})")
    return app


def _check_token(app: PartitionServer, request: Request, close: bool = False) -> None:
    if not app.authorized(request.headers.get("authorization")):
        raise _Refused(401, "missing or wrong token: send 'Authorization: Bearer <token>' with the server's shared secret", close=close)


def _get(served: ServedModels, request: Request, kind: str, name: str | None):
    app = served.app
    ready = not served.draining.is_set()
    if kind == "health:live":
        return (app, *_json(200, {"live": True}))
    if kind == "health:ready":
        return (app, *_json(200 if ready else 503, {"ready": ready}))
    if kind == "server":
        return (app, *_json(200, {"name": "splitc", "version": app.manifest.splitc_version, "extensions": list(EXTENSIONS)}))
    if kind == "metrics":
        _check_token(app, request)
        return app, 200, served.metrics.exposition(), {"Content-Type": METRICS_CONTENT_TYPE}
    if kind == "bad-version":
        raise _Refused(404, "only version 1 of the model is served")
    if kind == "ready":
        app = _model(served, name)
        return (app, *_json(200 if ready else 503, {"name": app.name, "ready": ready}))
    if kind in ("model", "config"):
        app = _model(served, name)
        _check_token(app, request)
        return (app, *_json(200, app.metadata() if kind == "model" else app.config()))
    if kind == "infer":
        raise _Refused(405, "infer takes POST")
    raise _Refused(404, f"no such endpoint {request.url.path[:80]!r}; see /v2/health/ready, /v2/models/{app.name}")


async def _post(served: ServedModels, request: Request, kind: str, name: str | None, started: float):
    app = served.app
    if kind != "infer":
        await _read_body(request, app.max_body)  # keeps a keep-alive connection in sync
        raise _Refused(404 if kind in ("unknown", "bad-version") else 405, f"POST is only for /v2/models/{app.name}/infer")
    try:
        app = _model(served, name)
    except _Refused as exc:
        exc.close = True
        raise
    _check_token(app, request, close=True)
    body = await _read_body(request, app.max_body)
    try:
        decoded = app.decode(body, request.headers.get(HEADER_LENGTH))
    except ProtocolError as exc:
        raise _Refused(exc.status, str(exc)) from None
    tick = time.perf_counter()
    try:
        if served.inline[app.name]:  # cheaper than a hand-off to a worker thread and back
            computed = app.compute(decoded.arrays)
        else:
            computed = await asyncio.wrap_future(served.submit(app, decoded.arrays))
    except Overloaded as exc:
        raise _Refused(503, f"the server is at capacity ({exc}); retry after {RETRY_AFTER_S} s",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except InputError as exc:
        raise _Refused(400, str(exc)) from None
    except SplitcError as exc:
        log.error("inference failed: %s", exc)
        return (app, 500, encode_error(f"inference failed on the server: {exc}"), {"Content-Type": JSON_CONTENT_TYPE})
    payload, headers = app.answer(decoded, computed, (time.perf_counter() - tick) * 1e3)
    return app, 200, payload, headers


async def _sessions(served: ServedModels, request: Request, name: str | None):
    """A decoder's sessions: create (prefill), step, verify, close, answered by the model's `handle`."""
    app = _model(served, name)
    _check_token(app, request, close=True)
    body = await _read_body(request, app.max_body) if request.method == "POST" else b""
    if not is_session_model(app):
        raise _Refused(404, f"model {app.name!r} is not a decoder; it has no sessions")
    parts = [p for p in request.url.path.split("/") if p]
    parts = parts[parts.index("sessions") + 1:]
    try:  # a step computes: off the event loop
        status, payload = await asyncio.to_thread(app.handle, request.method, parts, body, request.headers.get("authorization"))
    except ProtocolError as exc:
        raise _Refused(exc.status, str(exc)) from None
    except InputError as exc:
        raise _Refused(400, str(exc)) from None
    return (app, *_json(status, payload))


async def _read_body(request: Request, limit: int) -> bytes:
    raw = request.headers.get("content-length")
    if raw is not None and int(raw) > limit:  # the HTTP parser has checked that it is a number
        await _linger(request, int(raw))
        raise _Refused(413, f"body of {raw} bytes exceeds the server's limit of {limit} bytes (--max-body-mb)", close=True)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"body exceeds the server's limit of {limit} bytes (--max-body-mb)", close=True)
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Refused(400, "the client closed the connection before the body ended", close=True) from None
    return b"".join(chunks)


async def _linger(request: Request, length: int) -> None:
    """Read and drop (part of) an unwanted body, as a web server's lingering close does."""
    left = min(length, LINGER_BYTES)
    try:
        async with asyncio.timeout(LINGER_S):
            async for chunk in request.stream():
                left -= len(chunk)
                if left <= 0:
                    return
    except (ClientDisconnect, TimeoutError):
        return
