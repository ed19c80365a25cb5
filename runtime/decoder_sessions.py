"""The cloud half of a split decoder as a service with sessions, independent of any HTTP stack.

A session is one generation's cloud-side KV state and sampling settings:

    create  hidden rows of the whole prompt (prefill)  -> session id, first token
    step    one hidden row                             -> next token
    close

`DecoderService.handle(method, path_parts, body, authorization)` answers with (status, JSON-able
payload); runtime/server.py mounts it under /v2/models/{name}/sessions, and any other stack can too.

Sessions are bounded: at most `max_sessions`, and their state at most `max_state_bytes` (least
recently used evicted first); idle ones expire after `ttl_s`. Ids are 192 random bits, and a session
answers only to the bearer token that created it (an id presented with another token is unknown).
A step names the position it continues from, so a retried or stale step cannot corrupt the state: a
mismatch is a 409, and the client re-creates the session from its transcript.
"""

from __future__ import annotations

import base64
import hashlib
import hmac  # session owners are compared in constant time
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitc.core.errors import InputError
from splitc.runtime import cut_codec
from splitc.runtime.executors import Executor, load_executor
from splitc.runtime.generation import KVState, Sampling, decoder_spec
from splitc.runtime.session import Bundle, host_artifact
from splitc.runtime.server import ServedModel
from splitc.runtime.v2protocol import ProtocolError, model_name_for

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_SESSIONS = 64


class SessionError(ProtocolError):
    """A request the session service refuses; `status` is its HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message, status)


@dataclass
class CloudSession:
    owner: str
    state: KVState
    sampling: Sampling
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    """Sessions by id, with TTL expiry, a count bound and LRU eviction under a state-memory cap."""

    def __init__(self, make_state: Callable[[], KVState], *, ttl_s: float = DEFAULT_TTL_S, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_state_bytes: int | None = None, clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1 or ttl_s <= 0:
            raise InputError("the session store needs max_sessions >= 1 and a positive TTL")
        self.make_state, self.ttl_s, self.max_sessions, self.clock = make_state, float(ttl_s), int(max_sessions), clock
        self.max_state_bytes = max_state_bytes
        self._sessions: OrderedDict[str, CloudSession] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, owner: str, sampling: Sampling) -> tuple[str, CloudSession]:
        state = self.make_state()
        if self.max_state_bytes is not None and state.nbytes > self.max_state_bytes:
            raise SessionError(507, f"one session's state ({state.nbytes} bytes) exceeds the server's cap of {self.max_state_bytes}")
        session_id = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            while self._sessions and (len(self._sessions) >= self.max_sessions or self._over_memory(state.nbytes)):
                self._sessions.popitem(last=False)
                self.evicted += 1
            session = CloudSession(owner, state, sampling, self.clock())
            self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str, owner: str) -> CloudSession:
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            if session is None or not hmac.compare_digest(session.owner, owner):
                raise SessionError(404, "unknown or expired session: it was closed, evicted or the server restarted; "
                                        "create a new one from the transcript")
            session.last_used = self.clock()
            self._sessions.move_to_end(session_id)
            return session

    def close(self, session_id: str, owner: str) -> None:
        self.get(session_id, owner)
        with self._lock:
            self._sessions.pop(session_id, None)

    def _over_memory(self, extra: int) -> bool:
        if self.max_state_bytes is None:
            return False
        return sum(s.state.nbytes for s in self._sessions.values()) + extra > self.max_state_bytes

    def _expire(self) -> None:
        now = self.clock()
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl_s]
        for sid in stale:
            del self._sessions[sid]
        self.expired += len(stale)


def owner_of(authorization: str | None) -> str:
    """What binds a session to its client: a digest of the bearer token it was created with."""
    return hashlib.sha256((authorization or "").encode()).hexdigest()


class DecoderService(ServedModel):
    """Partition 1 of a decoder bundle behind sessions. Thread-safe: steps of different sessions
    run concurrently (ONNX Runtime's run is), steps of one session one after another."""

    def __init__(self, bundle: Bundle, *, token: str | None = None, model_name: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, max_state_bytes: int | None = None, max_body: int = 64 << 20,
                 executor: Executor | None = None, clock: Callable[[], float] = time.monotonic):
        if token is not None and not token.strip():
            raise InputError("the token is empty; put a long random secret in the token file (e.g. `openssl rand -hex 32`)")
        self.bundle, self.manifest = bundle, bundle.manifest
        self.spec = decoder_spec(bundle)
        self.token = token.strip().encode() if token else None
        self.max_body = int(max_body)
        self.name = model_name_for(model_name or str(self.manifest.model.get("name") or "model"))
        if executor is None:
            artifact = host_artifact(self.manifest.partitions[1])
            executor = load_executor(artifact, bundle.file(artifact))
        self.executor = executor
        # The verify graph (all rows' logits), when the bundle was compiled for drafting.
        verify = next((a for a in self.manifest.partitions[1].artifacts if a.options.get("entry") == "verify"), None)
        self.verify_executor = load_executor(verify, bundle.file(verify)) if verify is not None else None
        states = self.spec.state[1]
        self.store = SessionStore(lambda: KVState(states), ttl_s=ttl_s, max_sessions=max_sessions,
                                  max_state_bytes=max_state_bytes, clock=clock)
        self.stats = {"requests": 0, "errors_4xx": 0, "errors_5xx": 0, "infer": 0, "steps": 0, "sessions_created": 0}
        self._stats_lock = threading.Lock()

    # ---------------------------------------------------- what the serving front ends ask of a model
    # (sha256, authorized and count come from ServedModel)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": ["1"], "platform": "splitc-decoder",
                "inputs": [{"name": "hidden", "datatype": "FP32", "shape": [1, -1, self.spec.hidden]}],
                "outputs": [{"name": "token", "datatype": "INT64", "shape": [1]}],
                "parameters": {"model_sha256": self.sha256, "max_len": self.spec.max_len, "vocab": self.spec.vocab,
                               "device_layers": self.spec.device_layers, "sessions": len(self.store),
                               "encodings": list(cut_codec.SCHEMES), "splitc_version": self.manifest.splitc_version}}

    def config(self) -> dict[str, Any]:
        return self.metadata()

    def infer(self, body: bytes, header_length: str | None):
        raise SessionError(405, f"a decoder is served through sessions: POST /v2/models/{self.name}/sessions")

    # --------------------------------------------------------------------------- the sessions

    def handle(self, method: str, parts: Sequence[str], body: bytes, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """`parts`: the path after /sessions ([] or [id] or [id, "step"])."""
        owner = owner_of(authorization)
        if method == "POST" and not parts:
            return 200, self.create(owner, _json_body(body))
        if method == "POST" and len(parts) == 2 and parts[1] == "step":
            return 200, self.step(parts[0], owner, _json_body(body))
        if method == "POST" and len(parts) == 2 and parts[1] == "verify":
            return 200, self.verify(parts[0], owner, _json_body(body))
        if method == "DELETE" and len(parts) == 1:
            self.store.close(parts[0], owner)
            return 200, {"closed": True}
        raise SessionError(404 if method in ("POST", "DELETE") else 405,
                           "sessions take POST .../sessions, POST .../sessions/<id>/step and DELETE .../sessions/<id>")

    def create(self, owner: str, request: dict[str, Any]) -> dict[str, Any]:
        sampling = Sampling.from_json(request.get("sampling"))
        hidden = self._hidden(request)
        session_id, session = self.store.create(owner, sampling)
        self.count("sessions_created")
        with session.lock:
            answer = self._advance(session, hidden)
        return {"session": session_id, **answer}

    def step(self, session_id: str, owner: str, request: dict[str, Any]) -> dict[str, Any]:
        session = self.store.get(session_id, owner)
        hidden = self._hidden(request)
        with session.lock:
            position = request.get("position")
            if position is not None and int(position) != session.state.length:
                raise SessionError(409, f"the step continues from position {position}, the session holds "
                                        f"{session.state.length}; re-create the session from the transcript")
            answer = self._advance(session, hidden)
        self.count("steps")
        return answer

    def verify(self, session_id: str, owner: str, request: dict[str, Any]) -> dict[str, Any]:
        """n drafted tokens and the n rows that produced them: run the rows in one call, keep the
        accepted prefix (and the row after it), answer the emitted tokens (runtime/drafting.py)."""
        from splitc.runtime.drafting import accept_drafts

        if self.verify_executor is None:
            raise SessionError(404, "this bundle has no verify graph; recompile the decoder with --draft")
        session = self.store.get(session_id, owner)
        hidden = self._hidden(request)
        drafts = request.get("drafts")
        if not isinstance(drafts, list) or len(drafts) != hidden.shape[1] or not all(isinstance(d, int) for d in drafts):
            raise SessionError(400, f"verify needs 'drafts': one token id per hidden row ({hidden.shape[1]})")
        with session.lock:
            state = session.state
            position = request.get("position")
            if position is not None and int(position) != state.length:
                raise SessionError(409, f"the verify continues from position {position}, the session holds {state.length}; "
                                        "re-create the session from the transcript")
            if state.length + hidden.shape[1] > state.max_len:
                raise SessionError(400, f"{state.length + hidden.shape[1]} positions exceed the compiled cache of {state.max_len}")
            base = state.length
            logits, *rows = self.verify_executor([hidden, *state.prefix()])
            state.append(rows)
            emitted, accepted = accept_drafts(logits[0].argmax(axis=-1), drafts)
            state.truncate(base + len(emitted))
        self.count("steps")
        return {"tokens": emitted, "accepted": accepted, "position": state.length}

    def _hidden(self, request: dict[str, Any]) -> np.ndarray:
        try:
            rows, encoding = int(request["rows"]), str(request.get("encoding", "fp32"))
            data = base64.b64decode(request["hidden"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise SessionError(400, f"a session request needs 'hidden' (base64), 'rows' and optionally 'encoding' ({exc})") from exc
        if not 1 <= rows <= self.spec.max_len:
            raise SessionError(400, f"rows {rows} is outside 1..{self.spec.max_len}")
        try:
            return cut_codec.decode(data, rows, self.spec.hidden, encoding)[None]
        except InputError as exc:
            raise SessionError(400, str(exc)) from exc

    def _advance(self, session: CloudSession, hidden: np.ndarray) -> dict[str, Any]:
        started = time.perf_counter()
        state = session.state
        if state.length + hidden.shape[1] > state.max_len:
            raise SessionError(400, f"{state.length + hidden.shape[1]} positions exceed the compiled cache of {state.max_len}")
        logits, *rows = self.executor([hidden, *state.prefix()])
        state.append(rows)
        token = session.sampling.choose(logits[0, -1], state.length)
        return {"token": token, "position": state.length, "compute_ms": (time.perf_counter() - started) * 1e3}


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionError(400, f"the request body is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise SessionError(400, "the request body must be a JSON object")
    return value


def encode_request(rows: np.ndarray, encoding: str, **extra: Any) -> bytes:
    """A create/step body for hidden rows [T, H] (the client's side of `_hidden`)."""
    payload = {"hidden": base64.b64encode(cut_codec.encode(rows, encoding)).decode(), "rows": int(rows.shape[0]),
               "encoding": encoding, **extra}
    return json.dumps(payload).encode()
