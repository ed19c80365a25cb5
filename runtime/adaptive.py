"""Adaptive split: run whichever of a bundle's compiled variants the link favours right now.

    from splitc.runtime.adaptive import AdaptiveSession

    session = AdaptiveSession("model.variants", "http://cloud:8000", token=secret)
    result = session.infer({"x": x})    # result.outputs, .variant, .source, .timings, .bytes_sent
    session.switches                     # every switch: when, from, to, the estimate behind it
    session.close()

A variant directory (`splitc compile --variants K`) holds K ordinary bundles v0/ … v{K-1}/, each
the same model split at another place (device-only and cloud-only included), and `variants.json`
indexing them (runtime/variant_index.py). `splitc serve` on the directory serves each variant's
cloud part as model `<model>-v<k>` on one server.

The session keeps a LinkEstimator (runtime/link_estimate.py: bandwidth and round-trip time, from
the timing of its own requests, light GET probes and, while the running variant sends nothing, a
small timed upload), measures each variant's device compute (a short start-up profile, then the
running variant's times), takes the server's compute time from its responses, and predicts every
variant's latency = device compute + bytes / bandwidth + RTT + server compute. It switches to another variant only
when that one is predicted at least `margin` faster for `patience` evaluations in a row
(`fast_patience` when it is predicted `fast_gain` x faster or more: hysteresis, so noise does not
make it flap), at once when the server cannot be reached. Every switch is logged (logger
"splitc.adaptive") and kept in `switches`.

Numpy and the stdlib only (plus the backend runtime of the partitions run here).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
from splitc.core.errors import BundleError, InputError, RemoteError, SplitcError
from splitc.core.manifest import Manifest
from splitc.runtime.link_estimate import (
    CHANGED,
    HTTP_OVERHEAD_BYTES,
    SURPRISE,
    Ewma,
    LinkEstimator,
    ProbeRefused,
    UploadProbe,
)
from splitc.runtime.remote import (
    SOURCE_FALLBACK,
    SOURCE_REMOTE,
    RemoteResult,
    RemoteSession,
)
from splitc.runtime.session import Bundle, SplitSession
from splitc.runtime.variant_index import read_variants

log = logging.getLogger("splitc.adaptive")

SOURCE_LOCAL = "local"   # a device-only variant answered: nothing was sent


@dataclass
class AdaptiveResult:
    outputs: dict[str, np.ndarray]
    variant: int                                   # which variant answered
    source: str                                    # "remote" | "local-fallback" | "local" (device-only variant)
    timings: dict[str, float] = field(default_factory=dict)  # ms: local, remote, server, fallback, total
    bytes_sent: int = 0
    bytes_received: int = 0
    error: str | None = None                       # why a networked variant answered locally
    predicted_ms: float | None = None              # what the session predicted for this variant


class AdaptiveSession:
    """Runs the variant of `variant_dir` predicted fastest on the current link (see module doc).

    `margin` and `patience` are the hysteresis: switch when another variant is predicted at least
    `margin` (a fraction) faster for `patience` consecutive evaluations (one after every request and
    every probe), or for `fast_patience` (default patience - 1) when it is predicted at least
    `fast_gain` x faster: a change that large is not noise (the link estimate it rests on already
    took two agreeing samples to move), and every evaluation waited costs a request at the old
    speed. `probe_interval_s`: how often the background thread times a GET probe (right after a
    request of ours, when the link is quiet); a round trip `surprise`x off the estimate is
    re-probed after a quarter of that. `explore_interval_s`: how long without a bandwidth sample (a
    device-only variant sends nothing) before it explores: a GET and an upload of `probe_bytes`
    bytes (zeros) to the server's health endpoint, timed on a connection of its own (splitc serve
    reads a POST body on any path before answering; no model runs). The time an explore took
    bounds how often it runs (at most `EXPLORE_SHARE` of the time on the link). While the running
    variant sends nothing, a confirmed change of the round trip, or an explore whose bandwidth is
    `surprise`x off, is re-explored a quarter probe interval later (`MAX_RECHECKS` in a row at most)
    instead of an explore interval: that is what notices a faster link while running on the device.
    `probe_bytes=0` explores by uploading the boundary of the networked variant sending least as a
    real request instead (for a server that answers a POST before reading it). `background=False`
    runs no thread: call `probe()` / `explore()` yourself.
    """

    EXPLORE_SHARE = 0.1     # periodic explores take at most this share of the time
    MAX_RECHECKS = 2        # quick re-explores after a surprise, before the periodic interval again

    def __init__(self, variant_dir: str | Path, url: str, *, token: str | None = None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.05, fallback: bool = True, initial: int | None = None,
                 margin: float = 0.15, patience: int = 3, fast_patience: int | None = None, fast_gain: float = 2.0,
                 alpha: float = 0.3, probe_interval_s: float = 1.0, explore_interval_s: float = 3.0,
                 probe_bytes: int = 32768, profile_runs: int = 3, background: bool = True):
        fast_patience = max(1, patience - 1) if fast_patience is None else fast_patience
        if not 0 <= margin < 1 or patience < 1 or not 1 <= fast_patience <= patience or fast_gain <= 1 \
                or probe_interval_s <= 0 or explore_interval_s <= 0 or probe_bytes < 0 or profile_runs < 1:
            raise InputError("AdaptiveSession needs 0 <= margin < 1, 1 <= fast_patience <= patience, fast_gain > 1, "
                             "positive probe and explore intervals, probe_bytes >= 0, profile_runs >= 1")
        self.index = read_variants(variant_dir)
        self.variants = self.index.variants
        if initial is not None and not 0 <= initial < len(self.variants):
            raise InputError(f"initial variant {initial} is out of range: {variant_dir} has variants 0..{len(self.variants) - 1}")
        self.url = url
        self.margin, self.patience = float(margin), int(patience)
        self.fast_patience, self.fast_gain = int(fast_patience), float(fast_gain)
        self.probe_interval_s, self.explore_interval_s = float(probe_interval_s), float(explore_interval_s)
        self.probe_bytes = int(probe_bytes)
        self.bundles = [Bundle.open(self.index.bundle_path(v.index)) for v in self.variants]
        first = self.bundles[0].manifest
        for bundle in self.bundles[1:]:
            if [t.to_json() for t in bundle.manifest.inputs] != [t.to_json() for t in first.inputs]:
                raise BundleError(f"variants of {variant_dir} take different inputs; recompile with --variants")
        # One RemoteSession per networked variant (each its own model on the server), a plain
        # SplitSession per device-only one; created before anything is measured.
        self.sessions: list[RemoteSession | None] = [
            None if v.device_only else RemoteSession(b, url, token=token, model_name=v.model_name, split=v.first_remote,
                                                     timeout=timeout, retries=retries, backoff=backoff, fallback=fallback)
            for v, b in zip(self.variants, self.bundles)]
        self._local: dict[int, SplitSession] = {v.index: SplitSession(b) for v, b in zip(self.variants, self.bundles) if v.device_only}
        link = self.index.link
        self.estimator = LinkEstimator(float(link.get("mbit_s") or 10.0), float(link.get("rtt_ms") or 50.0), alpha=alpha)
        self.reachable = True
        self.switches: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.RLock()
        self._quiet = threading.Condition(threading.Lock())  # signalled when no networked request is in flight
        self._networked_in_flight = 0
        self._candidate: int | None = None
        self._streak = 0
        self._cloud_measured = [Ewma(alpha) for _ in self.variants]   # server compute per variant, when seen
        self._cloud_scale = Ewma(alpha)      # measured / planned server compute, for variants not yet seen
        self._device_scale = Ewma(alpha)     # measured / profiled device compute (load on the device)
        self._wake = threading.Event()        # the background thread has something to do sooner
        self._reprobe = False                 # a surprising round trip: probe again soon
        self._recheck = False                 # a change seen while nothing is sent: explore again soon
        self._rechecks = 0                    # quick re-explores in a row
        self._explore_end = -math.inf         # clock time the last explore ended
        self._explore_took = 0.0              # and the seconds it took
        self._upload_probe = UploadProbe(url, timeout) if any(s is not None for s in self.sessions) else None
        self.device_profile_ms = [self._profile(v.index, profile_runs) for v in self.variants]
        self._start_up(timeout)
        self.current = initial if initial is not None else self._best(self.predict())
        log.info("adaptive session on %s: %d variants, starting with v%d (%s)", url, len(self.variants), self.current,
                 self._describe_estimate())
        self._stop = threading.Event()
        self._thread = None
        if background and any(s is not None for s in self.sessions):
            self._thread = threading.Thread(target=self._background, name="splitc-adaptive-probe", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------ start-up

    def _profile(self, index: int, runs: int) -> float:
        """Median milliseconds of the variant's device partitions on a synthetic input (one warm-up
        run first: it loads the executors the requests will use)."""
        variant = self.variants[index]
        feed = _synthetic_inputs(self.bundles[index].manifest)
        if variant.device_only:
            session = self._local[index]
            run = lambda: session.run(feed)
        elif variant.first_remote == 0:
            return 0.0
        else:
            remote = self.sessions[index]
            env = remote.bind_inputs(feed)
            run = lambda: remote.run_local(0, variant.first_remote, env)
        run()
        times = []
        for _ in range(runs):
            tick = time.perf_counter()
            run()
            times.append((time.perf_counter() - tick) * 1e3)
        return statistics.median(times)

    def _start_up(self, timeout: float) -> None:
        """Time a first probe (the RTT prior) and check every networked variant is served; an
        unreachable server is not an error here (requests fall back, probes retry)."""
        networked = [s for s in self.sessions if s is not None]
        if not networked:
            return
        try:
            self.estimator.observe_rtt(networked[0].probe(min(timeout, 2.0)))
        except RemoteError as exc:
            self._mark_unreachable(str(exc))
            return
        for session in networked:
            if not session.check_server(min(timeout, 5.0)):
                self._mark_unreachable(f"server {self.url} did not answer the metadata request of {session.model_name}")
                return

    # ------------------------------------------------------------------------------ prediction

    def device_ms(self, index: int) -> float:
        return self.device_profile_ms[index] * (self._device_scale.value or 1.0)

    def cloud_ms(self, index: int) -> float:
        measured = self._cloud_measured[index].value
        if measured is not None:
            return measured
        return self.variants[index].remote_ms * (self._cloud_scale.value or 1.0)

    def predict(self) -> list[float]:
        """Predicted milliseconds per request of every variant on the link as now estimated."""
        predicted = []
        for v in self.variants:
            if v.device_only:
                predicted.append(self.device_ms(v.index))
            elif not self.reachable:
                predicted.append(math.inf)
            else:
                network = self.estimator.predict_ms(v.bytes_up + v.bytes_down + HTTP_OVERHEAD_BYTES)
                predicted.append(self.device_ms(v.index) + network + self.cloud_ms(v.index))
        return predicted

    @staticmethod
    def _best(predicted: Sequence[float]) -> int:
        return min(range(len(predicted)), key=lambda i: (predicted[i], i))

    def _describe_estimate(self) -> str:
        if not self.reachable:
            return "server unreachable"
        return f"{self.estimator.bandwidth_mbit:.3g} Mbit/s, RTT {self.estimator.rtt_ms:.3g} ms"

    def evaluate(self, reason: str = "estimate") -> int:
        """Compare the predictions and switch if the hysteresis allows; returns the current variant."""
        with self._lock:
            predicted = self.predict()
            best, current = self._best(predicted), self.current
            if best == current or math.isinf(predicted[best]):
                self._candidate, self._streak = None, 0
            elif math.isinf(predicted[current]):
                self._switch(best, predicted, "server unreachable")  # no patience when the link is down
            elif predicted[best] <= (1.0 - self.margin) * predicted[current]:
                self._streak = self._streak + 1 if best == self._candidate else 1
                self._candidate = best
                large = predicted[current] >= self.fast_gain * predicted[best]
                if self._streak >= (self.fast_patience if large else self.patience):
                    self._switch(best, predicted, reason)
            else:
                self._candidate, self._streak = None, 0
            return self.current

    def _switch(self, to: int, predicted: Sequence[float], reason: str) -> None:
        record = {
            "time": time.time(),
            "request": self.requests,
            "from": self.current,
            "to": to,
            "reason": reason,
            "bandwidth_mbit": round(self.estimator.bandwidth_mbit, 4),
            "rtt_ms": round(self.estimator.rtt_ms, 4),
            "reachable": self.reachable,
            "predicted_ms": [None if math.isinf(p) else round(p, 4) for p in predicted],
        }
        self.switches.append(record)
        log.info("switch v%d -> v%d (%s): %s; predicted %s ms", self.current, to, reason, self._describe_estimate(),
                 ", ".join(f"v{i} {p:.2f}" for i, p in enumerate(predicted)))
        self.current = to
        self._candidate, self._streak = None, 0

    def _mark_unreachable(self, why: str) -> None:
        with self._lock:
            if self.reachable:
                log.warning("server %s unreachable: %s", self.url, why)
            self.reachable = False

    # ------------------------------------------------------------------------------ inference

    def infer(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> AdaptiveResult:
        with self._lock:
            index = self.current
            predicted = self.predict()[index]
        session = self.sessions[index]
        if session is None:
            tick = time.perf_counter()
            outputs = self._local[index].run(inputs)
            elapsed = (time.perf_counter() - tick) * 1e3
            result = AdaptiveResult(outputs, index, SOURCE_LOCAL, {"local_ms": elapsed, "total_ms": elapsed}, predicted_ms=predicted)
            with self._lock:
                self._device_scale.update(elapsed / max(self.device_profile_ms[index], 1e-6))
        else:
            with self._quiet:
                self._networked_in_flight += 1
            try:
                answer = session.infer(inputs)
            finally:
                with self._quiet:
                    self._networked_in_flight -= 1
                    self._quiet.notify_all()
            result = AdaptiveResult(answer.outputs, index, answer.source, answer.timings, answer.bytes_sent,
                                    answer.bytes_received, answer.error, predicted)
            self._learn(index, answer)
        with self._lock:
            self.requests += 1
        self.evaluate()
        return result

    def _learn(self, index: int, answer: RemoteResult) -> None:
        """Update the estimates from one networked request."""
        variant = self.variants[index]
        timings = answer.timings
        with self._lock:
            if "local_ms" in timings and variant.first_remote and self.device_profile_ms[index] > 0:
                self._device_scale.update(timings["local_ms"] / self.device_profile_ms[index])
            if answer.source == SOURCE_FALLBACK:
                self._mark_unreachable(answer.error or "the request fell back to this host")
                return
            if answer.source != SOURCE_REMOTE:
                return
            self._observe_exchange(index, answer)

    def _observe_exchange(self, index: int, answer: RemoteResult) -> str | None:
        """Learn the server's compute and the link from one answered exchange; returns what the
        link sample told (LinkEstimator.observe_transfer), None when it gave none."""
        timings = answer.timings
        if not self.reachable:
            log.info("server %s reachable again", self.url)
        self.reachable = True
        server = timings.get("server_ms")
        if server is not None:
            self._cloud_measured[index].update(server)
            planned = self.variants[index].remote_ms
            if planned > 1e-6:
                self._cloud_scale.update(server / planned)
        if answer.attempts == 1 and "remote_ms" in timings:  # a retried exchange includes back-off pauses
            network = timings["remote_ms"] - (server or 0.0)
            return self.estimator.observe_transfer(answer.bytes_sent + answer.bytes_received + HTTP_OVERHEAD_BYTES, network)
        return None

    # ------------------------------------------------------------------------------ probing

    def probe(self) -> float | None:
        """Time one GET probe now (RTT sample); None when the server cannot be reached."""
        session = next((s for s in self.sessions if s is not None), None)
        if session is None:
            return None
        try:
            ms = session.probe(min(session.timeout, 2.0))
        except RemoteError as exc:
            self._mark_unreachable(str(exc))
            return None
        with self._lock:
            if not self.reachable:
                log.info("server %s reachable again (probe %.2f ms)", self.url, ms)
            self.reachable = True
            told = self.estimator.observe_rtt(ms)
            self._reprobe = told == SURPRISE  # one round trip far off: a second, soon, confirms or refutes it
            if told == CHANGED:
                self._request_recheck()       # the link changed: its bandwidth may have too
        if told is not None:
            self._wake.set()
        self.evaluate("probe")
        return ms

    def _sends_nothing(self) -> bool:
        """The running variant's requests give no bandwidth sample (device-only, or too small to time)."""
        variant = self.variants[self.current]
        return variant.device_only or variant.bytes_up + variant.bytes_down + HTTP_OVERHEAD_BYTES <= self.estimator.small_bytes

    def _request_recheck(self) -> None:
        """(Under the lock.) Explore again soon, while the running variant sends nothing to learn from."""
        if self._sends_nothing() and self._rechecks < self.MAX_RECHECKS:
            self._recheck = True

    def explore(self) -> float | None:
        """Time the link with a payload now: what keeps the bandwidth estimate alive while the
        running variant sends nothing (device-only) or too little to time. With `probe_bytes` > 0,
        a GET (a round trip) and a POST of `probe_bytes` zeros to the server's health endpoint on a
        connection of the session's own: no model runs, the same small upload whatever the model.
        With 0 (or when the server refuses such a POST), the boundary of the networked variant
        sending fewest bytes that still measure bandwidth, as a real request. Returns the upload's
        milliseconds, or None when the server cannot be reached."""
        with self._lock:
            if not self.reachable or self._upload_probe is None:
                return None
        if self.probe_bytes > 0:
            try:
                rtt_ms, upload_ms, nbytes = self._upload_probe.measure(self.probe_bytes)
            except ProbeRefused as exc:
                log.warning("%s; exploring with a variant's boundary instead", exc)
                self.probe_bytes = 0
            except RemoteError as exc:
                self._mark_unreachable(str(exc))
                return None
            else:
                with self._lock:
                    told_rtt = self.estimator.observe_rtt(rtt_ms)
                    told = self.estimator.observe_transfer(nbytes, upload_ms)
                    self._after_explore(told_rtt, told)
                self.evaluate("explore")
                return upload_ms
        return self._explore_boundary()

    def _explore_boundary(self) -> float | None:
        with self._lock:
            networked = [v for v in self.variants if not v.device_only]
            timed = [v for v in networked if v.bytes_up + v.bytes_down + HTTP_OVERHEAD_BYTES > self.estimator.small_bytes]
            index = min(timed or networked, key=lambda v: (v.bytes_up, v.index)).index
        session = self.sessions[index]
        served = self.bundles[index].manifest.inputs if self.variants[index].first_remote == 0 else \
            self.bundles[index].manifest.boundaries[self.variants[index].first_remote - 1]
        try:
            answer = session.send({t.name: np.zeros(t.shape, t.dtype) for t in served})
        except RemoteError as exc:
            self._mark_unreachable(str(exc))
            return None
        with self._lock:
            self._after_explore(None, self._observe_exchange(index, answer))
        self.evaluate("explore")
        return answer.timings.get("remote_ms")

    def _after_explore(self, told_rtt: str | None, told: str | None) -> None:
        """(Under the lock.) An unconfirmed bandwidth surprise, or a round trip that just changed, is
        explored again soon (while the running variant sends nothing); anything else ends a run of
        quick re-explores."""
        if told == SURPRISE or told_rtt == CHANGED:
            self._request_recheck()
        else:
            self._recheck, self._rechecks = False, 0

    def _explore_due(self, now: float) -> bool:
        """Whether the background thread explores now: never sooner than a quarter probe interval
        after the last explore; for a re-check, then; else once no bandwidth sample came for an
        explore interval and at most EXPLORE_SHARE of the time went to exploring."""
        if not self.reachable or self._upload_probe is None:
            return False
        since = now - self._explore_end
        if since < self.probe_interval_s / 4:
            return False
        if self._recheck:
            return True
        return (now - self.estimator.bandwidth_at >= self.explore_interval_s
                and since >= self._explore_took / self.EXPLORE_SHARE)

    def _timed_explore(self) -> None:
        with self._lock:
            if self._recheck:
                self._recheck = False
                self._rechecks += 1
        tick = self.estimator.clock()
        try:
            self.explore()
        finally:
            self._explore_end = self.estimator.clock()
            self._explore_took = self._explore_end - tick

    def _next_wake(self, now: float) -> float:
        """Seconds until the background thread has something to check."""
        soon = min(self.probe_interval_s, self.explore_interval_s) / 2
        if self._reprobe:
            soon = min(soon, max(0.0, self.estimator.rtt_at + self.probe_interval_s / 4 - now))
        if self._recheck:
            soon = min(soon, max(0.0, self._explore_end + self.probe_interval_s / 4 - now))
        return max(soon, 0.01)

    def _background(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._next_wake(self.estimator.clock()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                now = self.estimator.clock()
                interval = self.probe_interval_s / 4 if self._reprobe else self.probe_interval_s
                probe = now - self.estimator.rtt_at >= interval
                explore = self._explore_due(now)
                if probe or explore:
                    self._wait_for_quiet_link()
                if probe:
                    self.probe()
                if explore or self._explore_due(self.estimator.clock()):  # the probe may have asked for one
                    self._timed_explore()
            except SplitcError as exc:  # a refusal (token, model) is logged, never kills the thread
                log.warning("adaptive probe failed: %s", exc)
            except Exception:  # the prober must not die silently
                log.exception("adaptive probe failed")

    def _wait_for_quiet_link(self) -> None:
        """Wait (up to two probe intervals) until no request of ours is on the network: a probe
        queued behind our own upload would time the queue, not the round trip. Right after a
        request ends the next one is still computing its device part, so the link is quiet then."""
        with self._quiet:
            self._quiet.wait_for(lambda: self._networked_in_flight == 0 or self._stop.is_set(), timeout=2 * self.probe_interval_s)

    # ------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._quiet:
            self._quiet.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._upload_probe is not None:
            self._upload_probe.close()
        for session in self.sessions:
            if session is not None:
                session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _synthetic_inputs(manifest: Manifest) -> dict[str, np.ndarray]:
    """Inputs of the model's shapes for the start-up profile: seeded normals, zeros for integers
    (a valid token id and mask for any embedding)."""
    rng = np.random.default_rng(0)
    feed = {}
    for spec in manifest.inputs:
        dtype = np.dtype(spec.dtype)
        feed[spec.name] = rng.standard_normal(spec.shape).astype(dtype) if dtype.kind == "f" else np.zeros(spec.shape, dtype)
    return feed


__all__ = [
    "SOURCE_LOCAL",
    "AdaptiveResult",
    "AdaptiveSession",
]
