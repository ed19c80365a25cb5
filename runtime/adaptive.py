"""Adaptive split: run whichever of a bundle's compiled variants the link favours right now.

    from splitc.runtime.adaptive import AdaptiveSession

    session = AdaptiveSession("model.variants", "http://cloud:8000", token=secret)
    result = session.infer({"x": x})    # result.outputs, .variant, .source, .timings, .bytes_sent
    session.switches                     # every switch: when, from, to, the estimate behind it
    session.close()

A variant directory (`splitc compile --variants K`) holds K ordinary bundles v0/ … v{K-1}/, each
the same model split at another place (device-only and cloud-only included), and `variants.json`
indexing them. `splitc serve` on the directory serves each variant's cloud part as model
`<model>-v<k>` on one server.

The session keeps a LinkEstimator (bandwidth and round-trip time, from the timing of its own
requests, light GET probes and, while nothing is sent, an occasional upload of a variant's
boundary), measures each variant's device compute (a short start-up profile, then the running
variant's times), takes the server's compute time from its responses, and predicts every
variant's latency = device compute + bytes / bandwidth + RTT + server compute. It switches to
another variant only when that one is predicted at least `margin` faster for `patience`
evaluations in a row (hysteresis: noise does not make it flap), at once when the server cannot be
reached. Every switch is logged (logger "splitc.adaptive") and kept in `switches`.

Numpy and the stdlib only (plus the backend runtime of the partitions run here).
"""

from __future__ import annotations

import collections
import hashlib
import json
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
from splitc.runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec, read_manifest
from splitc.runtime.remote import (
    SOURCE_FALLBACK,
    SOURCE_REMOTE,
    RemoteResult,
    RemoteSession,
)
from splitc.runtime.session import Bundle, SplitSession
from splitc.runtime.v2protocol import model_name_for

from splitc.errors import BundleError, InputError, RemoteError, SplitcError

log = logging.getLogger("splitc.adaptive")

FORMAT = "splitc-variants"
SCHEMA_VERSION = 1
VARIANTS_NAME = "variants.json"
SOURCE_LOCAL = "local"   # a device-only variant answered: nothing was sent

# Bytes an exchange puts on the link beyond the tensors: HTTP request and response heads, the JSON
# tensor headers. Counted the same way when timing a transfer and when predicting one.
HTTP_OVERHEAD_BYTES = 400


# ----------------------------------------------------------------------------- the index file


@dataclass(frozen=True)
class Variant:
    index: int
    directory: str                      # relative to the variant directory
    model_name: str                     # the name its cloud part is served under
    cuts: tuple[str, ...]               # node names between consecutive active tiers
    placement: tuple[str | None, ...]   # per tier of the chain: the target running something, or None
    first_remote: int | None            # first partition the server runs; None: device-only
    bytes_up: int                       # tensors sent per request (0 when device-only)
    bytes_down: int                     # tensors received per request
    device_ms: float                    # the planner's prediction (analytic or profiled)
    remote_ms: float
    wins: dict[str, Any]                # where in the compile-time sweep it is the best variant
    manifest_sha256: str

    @property
    def device_only(self) -> bool:
        return self.first_remote is None


@dataclass(frozen=True)
class VariantIndex:
    path: Path
    model: dict[str, Any]
    link: dict[str, Any]                # the link the compile assumed: the estimator's prior
    default: int                        # the best variant on that link
    variants: tuple[Variant, ...]
    document: dict[str, Any] = field(repr=False, default_factory=dict)

    def bundle_path(self, index: int) -> Path:
        return self.path / self.variants[index].directory


def is_variant_dir(path: str | Path) -> bool:
    return (Path(path) / VARIANTS_NAME).is_file()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_variants(path: str | Path) -> VariantIndex:
    """Read and check `variants.json`: format, schema version, and every variant's manifest against
    its recorded sha256 (each bundle's own artifacts are checked when it is opened)."""
    root = Path(path)
    index_path = root / VARIANTS_NAME
    if not index_path.is_file():
        what = "a single bundle" if (root / MANIFEST_NAME).is_file() else "not a splitc output"
        raise BundleError(f"{root} has no {VARIANTS_NAME} ({what}); compile one with `splitc compile ... --variants K -o {root}`")
    try:
        document = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{index_path} cannot be read as JSON ({type(exc).__name__}); recompile with --variants") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{index_path} is not a splitc variant index; recompile with `splitc compile --variants K`")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"variant index schema version {document.get('schema_version')!r} is not supported "
                          f"(this runtime reads {SCHEMA_VERSION}); recompile with a matching splitc")
    try:
        variants = tuple(_variant(i, entry) for i, entry in enumerate(document["variants"]))
        model, link, default = dict(document["model"]), dict(document.get("link") or {}), int(document.get("default", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{index_path} is malformed ({type(exc).__name__}: {exc}); recompile with --variants") from None
    if not variants or not 0 <= default < len(variants):
        raise BundleError(f"{index_path} lists no variants or a default outside them; recompile with --variants")
    for variant in variants:
        manifest = root / variant.directory / MANIFEST_NAME
        if not manifest.is_file():
            raise BundleError(f"variant {variant.index} ({variant.directory}/{MANIFEST_NAME}) is missing; recompile with --variants")
        if _sha256(manifest) != variant.manifest_sha256:
            raise BundleError(f"{variant.directory}/{MANIFEST_NAME} differs from the sha256 in {VARIANTS_NAME}; "
                              "it was modified after compilation, refusing to use it")
    return VariantIndex(root, model, link, default, variants, document)


def _variant(position: int, entry: Mapping[str, Any]) -> Variant:
    index = int(entry["index"])
    if index != position:
        raise ValueError(f"variant {position} is numbered {index}")
    directory = str(entry["directory"])
    if "/" in directory or "\\" in directory or directory in ("", ".", ".."):
        raise ValueError(f"variant directory {directory!r} is not a plain name")
    first = entry.get("first_remote")
    predicted = entry.get("predicted_ms") or {}
    return Variant(
        index=index, directory=directory, model_name=str(entry["model_name"]),
        cuts=tuple(entry.get("cuts") or ()), placement=tuple(entry.get("placement") or ()),
        first_remote=None if first is None else int(first),
        bytes_up=int(entry.get("bytes_up") or 0), bytes_down=int(entry.get("bytes_down") or 0),
        device_ms=float(predicted.get("device", 0.0)), remote_ms=float(predicted.get("remote", 0.0)),
        wins=dict(entry.get("wins") or {}), manifest_sha256=str(entry["manifest_sha256"]),
    )


def variant_model_name(model: str, index: int) -> str:
    return f"{model_name_for(model)}-v{index}"


def served_bytes(manifest: Manifest, first_remote: int | None) -> tuple[int, int]:
    """Tensor bytes sent and received per request by a variant whose server starts at `first_remote`."""
    if first_remote is None:
        return 0, 0
    sent: Sequence[TensorSpec] = manifest.inputs if first_remote == 0 else manifest.boundaries[first_remote - 1]
    return sum(t.nbytes for t in sent), sum(t.nbytes for t in manifest.outputs)


# ----------------------------------------------------------------------------- link estimation


class LinkEstimator:
    """Uplink bandwidth (Mbit/s) and round-trip time (ms) from timed exchanges.

    The model is the planner's: an exchange carrying `b` bytes takes rtt + 8 b / bandwidth. Probes
    and exchanges of at most `small_bytes` measure the RTT; larger exchanges measure the bandwidth,
    given the RTT (so the RTT must come from probes: the session times one every second). Each
    estimate is an exponentially weighted moving average of the median of the last three samples:
    the median ignores a single outlier (one slow request is not a slower link), and a median more
    than `surprise`x away from the estimate (the link changed) is weighted `fast_alpha` instead of
    `alpha`, so the estimate follows a new link within a few samples instead of a few dozen.
    """

    def __init__(self, bandwidth_mbit: float = 10.0, rtt_ms: float = 50.0, *, alpha: float = 0.3,
                 fast_alpha: float = 0.7, surprise: float = 2.0, small_bytes: int = 4096, clock=time.monotonic):
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

    def _weight(self, sample: float, current: float, samples: int) -> float:
        if samples == 0:
            return 1.0  # the first sample replaces the prior outright
        ratio = max(sample, 1e-9) / max(current, 1e-9)
        return self.fast_alpha if ratio > self.surprise or ratio < 1.0 / self.surprise else self.alpha

    def observe_rtt(self, ms: float) -> None:
        """A round trip carrying (next to) no payload: a probe."""
        self._rtt_window.append(max(float(ms), 0.0))
        sample = statistics.median(self._rtt_window)
        self.rtt_ms += self._weight(sample, self.rtt_ms, self.rtt_samples) * (sample - self.rtt_ms)
        self.rtt_samples += 1
        self.rtt_at = self.clock()

    def observe_transfer(self, nbytes: float, ms: float) -> None:
        """An exchange that put `nbytes` on the link in `ms` (the server's compute excluded)."""
        ms = max(float(ms), 0.0)
        if nbytes <= self.small_bytes:
            # As small as a probe: a round-trip sample. Larger exchanges are always bandwidth samples,
            # never round-trip ones: deciding by the predicted share of bytes would let a stale,
            # too-high bandwidth estimate send every slow transfer into the RTT, where it stays.
            self.observe_rtt(max(ms - self.transfer_ms(nbytes), 0.0))
            return
        # What the bytes took, given the RTT; floored so a sample faster than the RTT estimate (the
        # RTT fell) raises the bandwidth a bounded amount instead of to infinity.
        transfer = max(ms - self.rtt_ms, 0.25 * ms, 1e-3)
        # Averaged as milliseconds per byte: latency is linear in it, so one slow sample cannot
        # drive the bandwidth to zero the way averaging Mbit/s would.
        self._per_byte_window.append(transfer / max(float(nbytes), 1.0))
        sample = statistics.median(self._per_byte_window)
        current = 8.0 / (self.bandwidth_mbit * 1e3)
        per_byte = current + self._weight(sample, current, self.bandwidth_samples) * (sample - current)
        self.bandwidth_mbit = 8.0 / (per_byte * 1e3)
        self.bandwidth_samples += 1
        self.bandwidth_at = self.clock()

    def to_json(self) -> dict[str, float]:
        return {"bandwidth_mbit": round(self.bandwidth_mbit, 4), "rtt_ms": round(self.rtt_ms, 4)}


# ----------------------------------------------------------------------------- the session


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


class _Ewma:
    def __init__(self, alpha: float):
        self.alpha, self.value = alpha, None

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        return self.value


class AdaptiveSession:
    """Runs the variant of `variant_dir` predicted fastest on the current link (see module doc).

    `margin` and `patience` are the hysteresis: switch when another variant is predicted at least
    `margin` (a fraction) faster for `patience` consecutive evaluations (one after every request and
    every probe). `probe_interval_s`: how often the background thread times a GET probe (right
    after a request of ours, when the link is quiet); `explore_interval_s`: how long without a
    bandwidth sample (a device-only variant sends nothing) before it uploads the boundary of the
    networked variant sending least, to time the link with a real payload. `background=False` runs
    no thread: call `probe()` / `explore()` yourself.
    """

    def __init__(self, variant_dir: str | Path, url: str, *, token: str | None = None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.05, fallback: bool = True, initial: int | None = None,
                 margin: float = 0.15, patience: int = 3, alpha: float = 0.3, probe_interval_s: float = 1.0,
                 explore_interval_s: float = 3.0, profile_runs: int = 3, background: bool = True):
        if not 0 <= margin < 1 or patience < 1 or probe_interval_s <= 0 or explore_interval_s <= 0 or profile_runs < 1:
            raise InputError("AdaptiveSession needs 0 <= margin < 1, patience >= 1, positive probe and explore intervals, profile_runs >= 1")
        self.index = read_variants(variant_dir)
        self.variants = self.index.variants
        if initial is not None and not 0 <= initial < len(self.variants):
            raise InputError(f"initial variant {initial} is out of range: {variant_dir} has variants 0..{len(self.variants) - 1}")
        self.url = url
        self.margin, self.patience = float(margin), int(patience)
        self.probe_interval_s, self.explore_interval_s = float(probe_interval_s), float(explore_interval_s)
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
        self._cloud_measured = [_Ewma(alpha) for _ in self.variants]   # server compute per variant, when seen
        self._cloud_scale = _Ewma(alpha)      # measured / planned server compute, for variants not yet seen
        self._device_scale = _Ewma(alpha)     # measured / profiled device compute (load on the device)
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
                if self._streak >= self.patience:
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

    def _observe_exchange(self, index: int, answer: RemoteResult) -> None:
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
            self.estimator.observe_transfer(answer.bytes_sent + answer.bytes_received + HTTP_OVERHEAD_BYTES, network)

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
            self.estimator.observe_rtt(ms)
        self.evaluate("probe")
        return ms

    def explore(self) -> int | None:
        """Upload the boundary of a networked variant (zeros, its real size) and learn from the
        timing: what keeps the bandwidth estimate alive while the running variant sends nothing
        (device-only) or too little to time. The variant is the one sending the fewest bytes that
        still measure bandwidth (more than the estimator's `small_bytes`): exploring then takes
        the least of the link. Returns the variant explored, or None."""
        with self._lock:
            if not self.reachable:
                return None
            networked = [v for v in self.variants if not v.device_only]
            timed = [v for v in networked if v.bytes_up + v.bytes_down + HTTP_OVERHEAD_BYTES > self.estimator.small_bytes]
            pool = timed or networked
            if not pool:
                return None
            index = min(pool, key=lambda v: (v.bytes_up, v.index)).index
        session = self.sessions[index]
        served = self.bundles[index].manifest.inputs if self.variants[index].first_remote == 0 else \
            self.bundles[index].manifest.boundaries[self.variants[index].first_remote - 1]
        try:
            answer = session.send({t.name: np.zeros(t.shape, t.dtype) for t in served})
        except RemoteError as exc:
            self._mark_unreachable(str(exc))
            return None
        with self._lock:
            self._observe_exchange(index, answer)
        self.evaluate("explore")
        return index

    def _background(self) -> None:
        tick = min(self.probe_interval_s, self.explore_interval_s) / 2
        while not self._stop.wait(tick):
            try:
                now = self.estimator.clock()
                probe = now - self.estimator.rtt_at >= self.probe_interval_s
                explore = self.reachable and now - self.estimator.bandwidth_at >= self.explore_interval_s
                if probe or explore:
                    self._wait_for_quiet_link()
                if probe:
                    self.probe()
                if explore:
                    self.explore()
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
        with self._quiet:
            self._quiet.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
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


def local_bundle_path(path: str | Path) -> Path:
    """What runs on one host for `path`: the bundle itself, or a variant directory's variant 0
    (every variant computes the same model; v0 sends the least, so it is the local one)."""
    return read_variants(path).bundle_path(0) if is_variant_dir(path) else Path(path)


def read_any_manifest(path: str | Path) -> Manifest:
    """The manifest of a bundle, or of a variant directory's variant 0 (all take the same inputs)."""
    return read_manifest(local_bundle_path(path))


__all__ = [
    "VARIANTS_NAME",
    "AdaptiveResult",
    "AdaptiveSession",
    "LinkEstimator",
    "Variant",
    "VariantIndex",
    "is_variant_dir",
    "local_bundle_path",
    "read_any_manifest",
    "read_variants",
    "served_bytes",
    "variant_model_name",
]
