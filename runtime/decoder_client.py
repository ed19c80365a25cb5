"""The device's side of a remote decoder cloud half: a `CloudHalf` for GenerationSession that sends
hidden rows to a DecoderService (runtime/decoder_sessions.py) over HTTP.

It keeps the transcript of every row it has sent in this generation. When the server loses the
session (restart, TTL expiry, LRU eviction: a 404; a stale position: a 409; or the connection is
refused while the server comes back), it creates a new session from the whole transcript plus the
pending rows: the cloud's state is rebuilt at exactly the same positions, and token choice is keyed
by position, so the output is the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import urllib3

from splitc.core.errors import InputError, RemoteError
from splitc.runtime import cut_codec
from splitc.runtime.decoder_sessions import encode_request
from splitc.runtime.generation import Sampling

_LOST = (404, 409)  # the session is gone or out of step: re-create it from the transcript


class RemoteCloud:
    def __init__(self, url: str, model_name: str, *, token: str | None = None, cut_encoding: str = "fp32",
                 timeout_s: float = 30.0, reconnect_s: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"remote URL {url!r} is not http(s)://host[:port]")
        self.parts, self.model = parts, model_name
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.cut_encoding = cut_codec.check_scheme(cut_encoding)
        self.timeout_s, self.reconnect_s = timeout_s, reconnect_s
        self._pool: urllib3.HTTPConnectionPool | None = None
        self.session: str | None = None
        self.position = 0
        self.transcript: list[np.ndarray] = []
        self.sampling = Sampling()
        self.round_trips = 0
        self.recreated = 0
        self.bytes_sent = 0

    # ---------------------------------------------------------------------------- CloudHalf

    def begin(self, sampling: Sampling | None) -> None:
        self.end()
        self.sampling, self.transcript, self.position = sampling or Sampling(), [], 0

    def advance(self, hidden: np.ndarray) -> int:
        rows = np.ascontiguousarray(hidden[0], dtype=np.float32)
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                answer = self._step(rows) if self.session else self._create(rows)
                break
            except _SessionLost:
                self.session = None  # next try re-creates it from the transcript
            except (OSError, urllib3.exceptions.HTTPError) as exc:
                self._drop()  # keep the session: if the server lost it, the retried step gets a 404
                if time.monotonic() > deadline:
                    raise RemoteError(f"the decoder server at {self.parts.netloc} is unreachable ({exc}) "
                                      f"for {self.reconnect_s:g} s; the generation stopped") from exc
                time.sleep(0.2)
        self.transcript.append(rows)
        self.position = int(answer["position"])
        return int(answer["token"])

    def verify(self, rows: np.ndarray, drafts: list[int]) -> tuple[list[int], int]:
        """One drafting round in one round trip (runtime/drafting.py); a lost session is re-created
        from the transcript first. Only the kept rows join the transcript."""
        rows = np.ascontiguousarray(rows[0], dtype=np.float32)
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                if not self.session:
                    self._create_from_transcript()
                answer = self._request("POST", f"/sessions/{self.session}/verify",
                                       encode_request(rows, self.cut_encoding, position=self.position, drafts=[int(d) for d in drafts]))
                break
            except _SessionLost:
                self.session = None
            except (OSError, urllib3.exceptions.HTTPError) as exc:
                self._drop()
                if time.monotonic() > deadline:
                    raise RemoteError(f"the decoder server at {self.parts.netloc} is unreachable ({exc}) "
                                      f"for {self.reconnect_s:g} s; the generation stopped") from exc
                time.sleep(0.2)
        emitted = [int(t) for t in answer["tokens"]]
        self.transcript.append(rows[:len(emitted)])
        self.position = int(answer["position"])
        return emitted, int(answer["accepted"])

    def _create_from_transcript(self) -> None:
        everything = np.concatenate(self.transcript)
        self.recreated += 1
        answer = self._request("POST", "/sessions", encode_request(everything, self.cut_encoding, sampling=self.sampling.to_json()))
        self.session, self.position = str(answer["session"]), int(answer["position"])

    def end(self) -> None:
        if self.session:
            try:
                self._request("DELETE", f"/sessions/{self.session}", None)
            except (OSError, urllib3.exceptions.HTTPError, RemoteError, _SessionLost):
                pass  # the server forgets it on its own (TTL)
        self.session = None

    def close(self) -> None:
        self.end()
        self._drop()

    # --------------------------------------------------------------------------- requests

    def _create(self, rows: np.ndarray) -> dict[str, Any]:
        everything = np.concatenate(self.transcript + [rows]) if self.transcript else rows
        if self.transcript:
            self.recreated += 1
        answer = self._request("POST", "/sessions", encode_request(everything, self.cut_encoding, sampling=self.sampling.to_json()))
        self.session = str(answer["session"])
        return answer

    def _step(self, rows: np.ndarray) -> dict[str, Any]:
        return self._request("POST", f"/sessions/{self.session}/step", encode_request(rows, self.cut_encoding, position=self.position))

    def _request(self, method: str, suffix: str, body: bytes | None) -> dict[str, Any]:
        if self._pool is None:  # urllib3 keeps the connection alive between steps (runtime/remote.py says why urllib3)
            cls = urllib3.HTTPSConnectionPool if self.parts.scheme == "https" else urllib3.HTTPConnectionPool
            self._pool = cls(self.parts.hostname, self.parts.port, maxsize=1, timeout=urllib3.Timeout(self.timeout_s))
        path = f"{self.parts.path.rstrip('/')}/v2/models/{self.model}{suffix}"
        # No retries here: a lost connection is the caller's to retry, with the session it knows.
        response = self._pool.request(method, path, body=body, headers=self.headers, retries=False)
        data = response.data
        if body is not None:
            self.bytes_sent += len(body)
            self.round_trips += 1
        if response.status in _LOST:
            raise _SessionLost()
        if response.status != 200:
            raise RemoteError(f"the decoder server answered {response.status}: {_error_text(data)}")
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise RemoteError(f"the decoder server answered non-JSON ({exc})") from exc

    def _drop(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class _SessionLost(Exception):
    pass


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", ""))[:300]
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace")
