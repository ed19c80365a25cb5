"""Link estimation for the adaptive session: bandwidth and round-trip time from timed exchanges.

`LinkEstimator` keeps the estimate (a median of the last three samples, folded into an
exponentially weighted moving average; a change confirmed by two samples replaces it outright).
`UploadProbe` times the link with a fixed-size upload to the server's health endpoint, on a
connection of its own, for when the running variant sends nothing to learn from. `Ewma` is the
plain moving average the session keeps compute estimates with.

The stdlib only.
"""

from __future__ import annotations

import collections
import http.client
import math
import statistics
import threading
import time
from urllib.parse import urlsplit

from splitc.core.errors import InputError, RemoteError, SplitcError

# What a link sample told (LinkEstimator.observe_*): it confirmed a change, or it is a surprise
# not yet confirmed.
CHANGED = "changed"
SURPRISE = "surprise"

# Bytes an exchange puts on the link beyond the tensors: HTTP request and response heads, the JSON
# tensor headers. Counted the same way when timing a transfer and when predicting one.
HTTP_OVERHEAD_BYTES = 400


class LinkEstimator:
    """Uplink bandwidth (Mbit/s) and round-trip time (ms) from timed exchanges.

    The model is the planner's: an exchange carrying `b` bytes takes rtt + 8 b / bandwidth. Probes
    and exchanges of at most `small_bytes` measure the RTT; larger exchanges measure the bandwidth,
    given the RTT (so the RTT must come from probes: the session times one every second). Each
    estimate is an exponentially weighted moving average of the median of the last three samples:
    the median ignores a single outlier (one slow request is not a slower link), and a median more
    than `surprise`x away from the estimate is weighted `fast_alpha` instead of `alpha`. Such a
    median takes two samples of the last three agreeing on a link `surprise`x off: a changed link,
    not noise, so by default (fast_alpha 1) it replaces the estimate outright; the estimate then
    follows a new link after two samples instead of a few dozen.

    `observe_rtt` and `observe_transfer` say what a sample told: CHANGED when it confirmed a change
    (the median moved the estimate by more than `surprise`x), SURPRISE when it is `surprise`x away
    from the estimate even after it was taken in (a change not yet confirmed: a caller may measure
    again soon rather than wait), None otherwise.
    """

    def __init__(self, bandwidth_mbit: float = 10.0, rtt_ms: float = 50.0, *, alpha: float = 0.3,
                 fast_alpha: float = 1.0, surprise: float = 2.0, small_bytes: int = 4096, clock=time.monotonic):
        if bandwidth_mbit <= 0 or rtt_ms < 0 or not 0 < alpha <= 1 or not 0 < fast_alpha <= 1 or surprise <= 1:
            raise InputError("LinkEstimator needs bandwidth > 0, rtt >= 0, 0 < alpha, fast_alpha <= 1 and surprise > 1")
        self.bandwidth_mbit = float(bandwidth_mbit)
        self.rtt_ms = float(rtt_ms)
        self.alpha, self.fast_alpha, self.surprise, self.small_bytes = alpha, fast_alpha, surprise, int(small_bytes)
        self.clock = clock
        self.rtt_at = -math.inf          # clock time of the last RTT sample
        self.bandwidth_at = -math.inf    # clock time of the last bandwidth sample
        self.rtt_samples = 0
        self.bandwidth_samples = 0
        self._rtt_window: collections.deque[float] = collections.deque(maxlen=3)
        self._per_byte_window: collections.deque[float] = collections.deque(maxlen=3)

    def predict_ms(self, nbytes: float) -> float:
        return self.rtt_ms + self.transfer_ms(nbytes)

    def transfer_ms(self, nbytes: float) -> float:
        return float(nbytes) * 8.0 / (self.bandwidth_mbit * 1e3)

    def _far(self, sample: float, current: float) -> bool:
        ratio = max(sample, 1e-9) / max(current, 1e-9)
        return ratio > self.surprise or ratio < 1.0 / self.surprise

    def _weight(self, sample: float, current: float, samples: int) -> float:
        if samples == 0:
            return 1.0  # the first sample replaces the prior outright
        return self.fast_alpha if self._far(sample, current) else self.alpha

    def _verdict(self, raw: float, sample: float, before: float, after: float, slack: float = 0.0) -> str | None:
        # `slack`: an absolute difference below it is never a surprise (round trips of a millisecond
        # or two differ by 2x on scheduling noise alone).
        if abs(sample - before) > slack and self._far(sample, before):
            return CHANGED
        if abs(raw - after) > slack and self._far(raw, after):
            return SURPRISE
        return None

    def observe_rtt(self, ms: float) -> str | None:
        """A round trip carrying (next to) no payload: a probe. Returns CHANGED, SURPRISE or None."""
        ms = max(float(ms), 0.0)
        self._rtt_window.append(ms)
        sample = statistics.median(self._rtt_window)
        before, first = self.rtt_ms, self.rtt_samples == 0
        self.rtt_ms += self._weight(sample, self.rtt_ms, self.rtt_samples) * (sample - self.rtt_ms)
        self.rtt_samples += 1
        self.rtt_at = self.clock()
        return None if first else self._verdict(ms, sample, before, self.rtt_ms, slack=2.0)

    def observe_transfer(self, nbytes: float, ms: float) -> str | None:
        """An exchange that put `nbytes` on the link in `ms` (the server's compute excluded).
        Returns CHANGED, SURPRISE or None (see the class doc)."""
        ms = max(float(ms), 0.0)
        if nbytes <= self.small_bytes:
            # As small as a probe: a round-trip sample. Larger exchanges are always bandwidth samples,
            # never round-trip ones: deciding by the predicted share of bytes would let a stale,
            # too-high bandwidth estimate send every slow transfer into the RTT, where it stays.
            return self.observe_rtt(max(ms - self.transfer_ms(nbytes), 0.0))
        # What the bytes took, given the RTT; floored so a sample faster than the RTT estimate (the
        # RTT fell) raises the bandwidth a bounded amount instead of to infinity.
        transfer = max(ms - self.rtt_ms, 0.25 * ms, 1e-3)
        # Averaged as milliseconds per byte: latency is linear in it, so one slow sample cannot
        # drive the bandwidth to zero the way averaging Mbit/s would.
        raw = transfer / max(float(nbytes), 1.0)
        self._per_byte_window.append(raw)
        sample = statistics.median(self._per_byte_window)
        current, first = 8.0 / (self.bandwidth_mbit * 1e3), self.bandwidth_samples == 0
        per_byte = current + self._weight(sample, current, self.bandwidth_samples) * (sample - current)
        self.bandwidth_mbit = 8.0 / (per_byte * 1e3)
        self.bandwidth_samples += 1
        self.bandwidth_at = self.clock()
        return None if first else self._verdict(raw, sample, current, per_byte)

    def to_json(self) -> dict[str, float]:
        return {"bandwidth_mbit": round(self.bandwidth_mbit, 4), "rtt_ms": round(self.rtt_ms, 4)}


class ProbeRefused(SplitcError):
    """The server answered the probe upload in a way that does not time it (413, 5xx)."""


class UploadProbe:
    """Times the link with a payload of a fixed size, on a kept-alive connection of its own: a GET
    of /v2/health/ready (one round trip), then a POST of `nbytes` zeros to the same path. splitc
    serve reads the body of a POST to any path before it answers (405: only infer takes a POST),
    so the POST takes one round trip plus the upload of `nbytes`; no model runs and no token is
    sent. The TCP (and TLS) handshake is never part of a timing."""

    PATH = "/v2/health/ready"

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/") + self.PATH
        self._timeout = min(float(timeout), 10.0)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _timed(self, method: str, body: bytes | None) -> tuple[float, int, int]:
        """(ms, status, response body bytes) of one exchange; a kept-alive connection the server
        closed while idle is replaced once, outside the timing."""
        for attempt in (0, 1):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._conn = cls(self._host, self._port, timeout=self._timeout)
            reused = self._conn.sock is not None
            if not reused:
                self._conn.connect()  # sets TCP_NODELAY
            tick = time.perf_counter()
            try:
                headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
                self._conn.request(method, self._path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            ms = (time.perf_counter() - tick) * 1e3
            if response.will_close:
                self.close()
            return ms, response.status, len(data)
        raise AssertionError("unreachable")

    def measure(self, nbytes: int) -> tuple[float, float, int]:
        """(round-trip ms, upload ms, bytes the upload put on the link both ways, heads included)."""
        with self._lock:
            try:
                rtt, status, _ = self._timed("GET", None)
                if status >= 500:
                    raise RemoteError(f"server {self.url} is not ready ({status})")
                upload, status, received = self._timed("POST", bytes(nbytes))
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise RemoteError(f"link probe of {self.url} failed ({type(exc).__name__}: {exc})") from None
            if status == 413 or status >= 500:
                self.close()
                raise ProbeRefused(f"server {self.url} answered {status} to a {nbytes}-byte probe upload")
            return rtt, upload, nbytes + received + HTTP_OVERHEAD_BYTES

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Ewma:
    """An exponentially weighted moving average; None until the first sample."""

    def __init__(self, alpha: float):
        self.alpha, self.value = alpha, None

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        return self.value


__all__ = [
    "CHANGED",
    "HTTP_OVERHEAD_BYTES",
    "SURPRISE",
    "Ewma",
    "LinkEstimator",
    "ProbeRefused",
    "UploadProbe",
]
