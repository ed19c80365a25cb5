"""Target descriptions: devices, GPUs and cloud offers, each a TOML file.

A name (`rpi4`) finds a file shipped beside this module; a path (`./my-board.toml`) is read as is,
so a user describes their own hardware without touching splitc. Everything target-specific that is
not backend code lives in these files.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from splitc.core.errors import TargetError

_NOT_TARGETS = {"links"}


@dataclass(frozen=True)
class Link:
    name: str
    mbit_s: float
    rtt_ms: float


@dataclass(frozen=True)
class LinkMix:
    """A link that changes: the states it takes and the share of requests each sees (a trace of
    phases, or percentiles of a measured distribution). The planner scores a plan on every state
    and plans for the mean latency over them, or for a percentile of it, never for the mean link:
    a plan made for the average of Wi-Fi and 3G is made for a link that never exists."""

    name: str
    states: tuple[Link, ...]
    weights: tuple[float, ...]
    percentile: float | None = None  # plan for this percentile of latency over the states; None: the mean

    @property
    def mbit_s(self) -> float:
        return float(sum(w * s.mbit_s for s, w in zip(self.states, self.weights)))

    @property
    def rtt_ms(self) -> float:
        return float(sum(w * s.rtt_ms for s, w in zip(self.states, self.weights)))

    def aggregate(self, per_state):
        """Latency over the states (rows) for each plan (columns): the weighted mean, or the
        weighted percentile (the least latency that at least `percentile`% of requests meet)."""
        import numpy as np

        values = np.asarray(per_state, dtype=np.float64)
        weights = np.asarray(self.weights, dtype=np.float64)
        if self.percentile is None:
            return weights @ values
        order = np.argsort(values, axis=0, kind="stable")
        covered = np.cumsum(weights[order], axis=0)
        first = np.argmax(covered >= self.percentile / 100.0 - 1e-12, axis=0)
        return np.take_along_axis(values, order, axis=0)[first, np.arange(values.shape[1])]


def load_link_mix(spec: str, percentile: float | None = None) -> LinkMix:
    """`wifi+4g+3g+wifi` (a trace of equal phases) or `wifi*2+4g+3g` (weights): each term a preset
    or BANDWIDTHmbit:RTTms."""
    terms = [t.strip() for t in spec.split("+") if t.strip()]
    counts: dict[str, float] = {}
    for term in terms:
        name, _, weight = term.partition("*")
        try:
            share = float(weight) if weight else 1.0
        except ValueError:
            share = -1.0
        if not share > 0:
            raise TargetError(f"link mix term {term!r}: the weight after '*' must be a positive number, e.g. wifi*2+3g")
        counts[name.strip()] = counts.get(name.strip(), 0.0) + share
    if not counts:
        raise TargetError(f"link mix {spec!r} names no link; write states joined by '+', e.g. wifi+4g+3g+wifi")
    if percentile is not None and not 0 < percentile <= 100:
        raise TargetError(f"percentile {percentile:g} must be in (0, 100]")
    total = sum(counts.values())
    states = tuple(load_link(name) for name in counts)
    return LinkMix(spec, states, tuple(c / total for c in counts.values()), percentile)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    tier: str                      # "edge" | "cloud"
    arch: str                      # ISA of the host that runs the artifact
    sustained_gflops: float
    memory_bandwidth_gbs: float
    memory_gb: float
    backend: str
    backend_options: dict[str, Any] = field(default_factory=dict)
    other_backends: dict[str, dict[str, Any]] = field(default_factory=dict)  # [backends.<id>]: options of other candidates
    verify: dict[str, float] = field(default_factory=dict)
    peak_gflops: float | None = None
    source: str = ""               # the file it came from
    price: dict[str, Any] = field(default_factory=dict)    # [price]: vm_usd_per_hour, faas_* (see cloud-cpu.toml)
    active_power_w: float | None = None                    # [energy]: joules per request = power x time
    uplink: Link | None = None     # [network]: the link leaving this tier (else the plan's --link)

    @property
    def rtol(self) -> float:
        return float(self.verify.get("rtol", 1e-4))

    @property
    def min_top1(self) -> float:
        return float(self.verify.get("min_top1", 1.0))

    def options_for(self, backend: str) -> dict[str, Any]:
        """The options of `backend` on this target: the [backend] table for the preferred backend,
        its [backends.<id>] table for another candidate (e.g. rpi4's ONNX Runtime threads)."""
        if backend == self.backend:
            return dict(self.backend_options)
        return dict(self.other_backends.get(backend) or {})

    def summary(self) -> dict[str, Any]:
        """What a bundle manifest records about the target."""
        return {
            "name": self.name,
            "description": self.description,
            "tier": self.tier,
            "arch": self.arch,
            "backend": self.backend,
            "backend_options": self.backend_options,
            "verify": self.verify,
        }


def _builtin_dir():
    return resources.files(__name__)


def builtin_target_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in _builtin_dir().iterdir()
        if p.name.endswith(".toml") and p.name.removesuffix(".toml") not in _NOT_TARGETS
    )


def load_target(spec: str) -> Target:
    """Load a target by builtin name or by path to a TOML file."""
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise TargetError(f"target file {spec} does not exist; pass a builtin name ({', '.join(builtin_target_names())}) or a TOML path")
        return _parse(path.read_text(), str(path))
    if spec not in builtin_target_names():
        raise TargetError(f"unknown target {spec!r}; known targets: {', '.join(builtin_target_names())} (or pass a path to a .toml file)")
    resource = _builtin_dir() / f"{spec}.toml"
    return _parse(resource.read_text(), f"splitc/targets/{spec}.toml")


def load_targets(specs: str | list[str]) -> list[Target]:
    names = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    names = [n for n in names if n]
    if not names:
        raise TargetError("no targets given; pass --targets with a comma-separated chain such as rpi4,a100")
    return [load_target(n) for n in names]


def _parse(text: str, source: str) -> Target:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target file {source} is not valid TOML ({exc}); fix the file") from exc
    try:
        compute = data["compute"]
        backend = dict(data["backend"])
        backend_name = backend.pop("name")
        target = Target(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            tier=str(data.get("tier", "edge")),
            arch=str(data.get("arch", "x86_64")),
            sustained_gflops=float(compute["sustained_gflops"]),
            memory_bandwidth_gbs=float(compute["memory_bandwidth_gbs"]),
            memory_gb=float(compute["memory_gb"]),
            peak_gflops=float(compute["peak_gflops"]) if "peak_gflops" in compute else None,
            backend=str(backend_name),
            backend_options=backend,
            other_backends={str(k): dict(v) for k, v in data.get("backends", {}).items()},
            verify={k: float(v) for k, v in data.get("verify", {}).items()},
            source=source,
            price=dict(data.get("price", {})),
            active_power_w=float(data["energy"]["active_power_w"]) if "energy" in data else None,
            uplink=(Link(f"{data['name']}-uplink", float(data["network"]["uplink_mbit_s"]), float(data["network"]["rtt_ms"]))
                    if "network" in data else None),
        )
    except KeyError as exc:
        raise TargetError(f"target file {source} lacks required key {exc.args[0]!r}; see splitc/targets/rpi4.toml for the format") from exc
    except (TypeError, ValueError) as exc:
        raise TargetError(f"target file {source} has a malformed value ({exc}); see splitc/targets/rpi4.toml for the format") from exc
    if target.sustained_gflops <= 0 or target.memory_bandwidth_gbs <= 0:
        raise TargetError(f"target {target.name}: sustained_gflops and memory_bandwidth_gbs must be positive")
    return target


def load_links() -> dict[str, Link]:
    data = tomllib.loads((_builtin_dir() / "links.toml").read_text())
    return {name: Link(name, float(v["mbit_s"]), float(v["rtt_ms"])) for name, v in data.items()}


def load_link(spec: str) -> Link:
    """A preset name (`4g`) or a custom `20mbit:30ms`."""
    presets = load_links()
    key = spec.strip().lower()
    if key in presets:
        return presets[key]
    if ":" in key and key.split(":")[0].endswith("mbit") and key.split(":")[1].endswith("ms"):
        bw, rtt = key.split(":")
        try:
            return Link(spec, float(bw.removesuffix("mbit")), float(rtt.removesuffix("ms")))
        except ValueError:
            pass
    raise TargetError(f"unknown link {spec!r}; use a preset ({', '.join(presets)}) or BANDWIDTHmbit:RTTms such as 20mbit:30ms")
