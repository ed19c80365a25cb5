"""Compile-time side of the adaptive split: choose K placements that together stay close to the
best one over a sweep of link conditions, and compile each into one variant directory.

    choice = choose_variants(graph, targets, 3, default_link=load_link("4g"))
    compile_variants(graph, CompileOptions(targets, load_link("4g")), Path("m.variants"), 3)

The sweep crosses log-spaced uplink bandwidths with a few round-trip times, plus the presets of
targets/links.toml. At each link the planner (passes/planner.py) gives its Pareto front; every plan
on any front is a candidate (device-only and cloud-only included), and every candidate's latency is
re-evaluated at every link. The chosen set is greedy: start empty, add the candidate that most
lowers the mean relative regret (latency of the set's best at a link / the best of all candidates
there, minus one) until K are chosen or the regret is zero, so K larger than the number of
distinct winners gives fewer variants. The runtime side is splitc.runtime.adaptive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import splitc
from splitc.core.bundle import staged_directory
from splitc.core.errors import InputError, PlanError
from splitc.core.graph import ModelGraph
from splitc.passes.cost_model import compute_ms, transfer_ms
from splitc.passes.contract import CompileData, CompileOptions
from splitc.passes.cuts import CutAnalysis
from splitc.passes.money import Workload
from splitc.passes.planner import Plan, active_tiers, plan_placements
from splitc.runtime.variant_index import (
    FORMAT,
    SCHEMA_VERSION,
    VARIANTS_NAME,
    served_bytes,
    variant_model_name,
)
from splitc.core.manifest import MANIFEST_NAME, sha256_file
from splitc.targets import Link, Target, load_links

SWEEP_MBIT = (0.1, 200.0)       # uplink range swept: below cellular Cat-1 to fast Wi-Fi
SWEEP_POINTS = 16               # log-spaced bandwidths across it
SWEEP_RTT_MS = (5.0, 20.0, 50.0, 100.0, 200.0)
MAX_VARIANTS = 16
# Latency does not depend on the request rate (cold starts aside); the planner needs one anyway.
DEFAULT_WORKLOAD = Workload(10.0)


def sweep_links(mbit: tuple[float, float] = SWEEP_MBIT, points: int = SWEEP_POINTS,
                rtts: Sequence[float] = SWEEP_RTT_MS, presets: bool = True) -> list[Link]:
    grid = [Link(f"{b:.3g}mbit:{r:g}ms", float(b), float(r)) for r in rtts for b in np.geomspace(mbit[0], mbit[1], points)]
    return (list(load_links().values()) if presets else []) + grid


@dataclass
class VariantChoice:
    plans: list[Plan]                 # the chosen placements, fewest bytes sent first
    links: list[Link]                 # the sweep
    latency: np.ndarray               # chosen x links, ms
    best_ms: np.ndarray               # per link: the best over every candidate
    regret: float                     # mean relative regret of the chosen set over the sweep
    candidates: int
    wins: list[dict[str, Any]]        # per chosen plan: where in the sweep it is the set's best
    default: int                      # the set's best on the default link


def plan_latency(plan: Plan, link: Link, targets: Sequence[Target]) -> float:
    """A plan's latency on another link: its per-tier compute (and cold starts) as planned, each
    transfer re-priced on the sender's own uplink or else on `link` (as the planner prices them)."""
    uplinks = {t.name: t.uplink for t in targets}
    total = sum(t.compute_ms + t.cold_start_ms for t in plan.tiers)
    for transfer in plan.transfers:
        total += float(transfer_ms(transfer["bytes"], uplinks.get(transfer["from"]) or link))
    return total


def _sent_bytes(plan: Plan) -> int:
    return int(plan.transfers[0]["bytes"]) if plan.transfers else 0


def choose_variants(graph: ModelGraph, targets: Sequence[Target], k: int, *, links: Sequence[Link] | None = None,
                    default_link: Link | None = None, workload: Workload = DEFAULT_WORKLOAD,
                    node_ms: Sequence[np.ndarray] | None = None, quantize_bits: int | None = None,
                    device_first: bool = False) -> VariantChoice:
    """`device_first`: only placements where the device computes something before anything is
    sent (with --noise: a placement sending the raw input would bypass the noise)."""
    check_count(k)
    if len(targets) < 2:
        raise PlanError("--variants chooses among placements over a chain: give at least two targets (device,cloud)")
    links = list(links) if links is not None else sweep_links()
    if default_link is not None and all(l != default_link for l in links):
        links.append(default_link)
    analysis = CutAnalysis(graph)
    times = list(node_ms) if node_ms is not None else [compute_ms(analysis.order, t) for t in targets]
    candidates: dict[tuple[int, ...], Plan] = {}
    for link in links:
        front = plan_placements(analysis, targets, link, workload, node_ms=times, quantize_bits=quantize_bits)
        for plan in front.plans:
            if not (device_first and plan.placement[0] is None):
                candidates.setdefault(plan.positions, plan)
    plans = list(candidates.values())
    if not plans:
        raise PlanError("no placement computes on the device first; drop --noise or give the device some work")
    latency = np.array([[plan_latency(p, l, targets) for l in links] for p in plans])
    best = latency.min(axis=0)
    relative = latency / np.maximum(best, 1e-9)  # candidates x links, >= 1

    chosen: list[int] = []
    covered = np.full(len(links), np.inf)
    while len(chosen) < k:
        regrets = np.minimum(covered, relative).mean(axis=1) - 1.0
        regrets[chosen] = np.inf
        # Ties (say two plans both best everywhere they are best) go to the one sending fewer bytes.
        pick = min(range(len(plans)), key=lambda i: (round(float(regrets[i]), 12), _sent_bytes(plans[i]), plans[i].positions))
        if chosen and regrets[pick] >= float(covered.mean()) - 1.0 - 1e-12:
            break  # nothing left lowers the regret: fewer than k placements ever win
        chosen.append(pick)
        covered = np.minimum(covered, relative[pick])
    chosen.sort(key=lambda i: (_sent_bytes(plans[i]), plans[i].positions))
    set_latency = latency[chosen]
    winner = set_latency.argmin(axis=0)
    wins = [_wins(links, winner == j) for j in range(len(chosen))]
    default_index = links.index(default_link) if default_link is not None else None
    default = int(winner[default_index]) if default_index is not None else int(np.bincount(winner, minlength=len(chosen)).argmax())
    regret = float((set_latency.min(axis=0) / np.maximum(best, 1e-9)).mean() - 1.0)
    return VariantChoice([plans[i] for i in chosen], links, set_latency, best, regret, len(plans), wins, default)


def _wins(links: Sequence[Link], mask: np.ndarray) -> dict[str, Any]:
    """Where a variant is the set's best: its share of the sweep, the named presets, and per
    round-trip time the bandwidth interval (Mbit/s) it wins in."""
    won = [l for l, m in zip(links, mask) if m]
    by_rtt: dict[str, list[float]] = {}
    for rtt in sorted({l.rtt_ms for l in won}):
        mbit = [l.mbit_s for l in won if l.rtt_ms == rtt]
        by_rtt[f"{rtt:g}"] = [round(min(mbit), 4), round(max(mbit), 4)]
    return {"share": round(len(won) / len(links), 4), "links": [l.name for l in won if "mbit:" not in l.name],
            "mbit_s_by_rtt_ms": by_rtt}


def check_count(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"--variants {k!r} must be a whole number of at least 1 (e.g. --variants 3)")
    if k > MAX_VARIANTS:
        raise InputError(f"--variants {k} compiles {k} copies of the model; use at most {MAX_VARIANTS}")
    return int(k)


def compile_variants(graph: ModelGraph, options: CompileOptions, out: Path, k: int, *, data: CompileData | None = None,
                     log: Callable[[str], None] = lambda _: None, links: Sequence[Link] | None = None,
                     workload: Workload = DEFAULT_WORKLOAD, node_ms: Sequence[np.ndarray] | None = None) -> tuple[VariantChoice, list]:
    """Choose up to `k` placements over `options.targets` (see choose_variants) and compile each,
    with the same options otherwise, as bundle v<i>/ of one directory written atomically, with
    variants.json indexing them. `options.link` is the link the runtime assumes before it has
    measured one (its best variant is the index's default). Returns the choice and one
    CompileResult per variant."""
    from splitc.drivers.compiler import compile_model

    if options.cut != "auto":
        raise InputError("--variants chooses the cuts itself; drop --cut")
    targets, link, quantize = options.targets, options.link, options.quantize
    choice = choose_variants(graph, targets, k, links=links, default_link=link, workload=workload, node_ms=node_ms,
                             quantize_bits={"int8": 8, "int4": 4}.get(quantize or ""),
                             device_first=bool(options.noise))
    if len(choice.plans) < k:
        log(f"only {len(choice.plans)} distinct placement(s) win anywhere in the sweep; compiling {len(choice.plans)}, not {k}")
    model = str(graph.name)
    out = Path(out)
    results = []
    entries = []
    # Each variant is a whole bundle: weights used by several variants are stored once per variant.
    # Accepted for now (variants are few and the device usually keeps one copy of each partition
    # it runs); sharing identical artifacts across variants would need a bundle format change.
    with staged_directory(out) as staging:
        for i, plan in enumerate(choice.plans):
            active, cuts = active_tiers(plan.placement, plan.cuts)
            chain = [targets[t] for t in active]
            where = " → ".join(f"{t.name}" for t in chain)
            log(f"variant v{i}: {where}" + (f", cut after {', '.join(cuts)}" if cuts else "") +
                f" (best on {choice.wins[i]['share']:.0%} of the sweep)")
            record = {"link": {"name": link.name, "mbit_s": link.mbit_s, "rtt_ms": link.rtt_ms}, **plan.to_json(), "variant": i}
            variant = replace(options, targets=tuple(chain), cut=cuts or "auto", plan_record=record)
            if not cuts:  # nothing leaves this tier: there is nothing to noise or quantize
                variant = replace(variant, noise=None, quantize=None)
            result = compile_model(graph, variant, staging / f"v{i}", data=data, log=log)
            results.append(result)
            manifest = result.manifest
            first_remote = _first_remote(plan, manifest)
            up, down = served_bytes(manifest, first_remote)
            device_tier = plan.tiers[0]
            entries.append({
                "index": i,
                "directory": f"v{i}",
                "model_name": variant_model_name(model, i),
                "cuts": list(cuts),
                "placement": list(plan.placement),
                "tiers": [{"target": t.target, "nodes": t.nodes, "compute_ms": round(t.compute_ms, 6)} for t in plan.tiers],
                "first_remote": first_remote,
                "device_only": first_remote is None,
                "bytes_up": up,
                "bytes_down": down,
                "predicted_ms": {"device": round(device_tier.compute_ms, 6),
                                 "remote": round(sum(t.compute_ms + t.cold_start_ms for t in plan.tiers[1:]), 6)},
                "wins": choice.wins[i],
                "manifest_sha256": sha256_file(staging / f"v{i}" / MANIFEST_NAME),
            })
        document = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "splitc_version": splitc.__version__,
            "model": {"name": model, "sha256": graph.source_sha256},
            "targets": [t.name for t in targets],
            "link": {"name": link.name, "mbit_s": link.mbit_s, "rtt_ms": link.rtt_ms},
            "default": choice.default,
            "sweep": {
                "links": len(choice.links),
                "mbit_s": [min(l.mbit_s for l in choice.links), max(l.mbit_s for l in choice.links)],
                "rtt_ms": sorted({l.rtt_ms for l in choice.links}),
                "candidates": choice.candidates,
                "mean_regret": round(choice.regret, 6),
            },
            "variants": entries,
        }
        (staging / VARIANTS_NAME).write_text(json.dumps(document, indent=2) + "\n")
    return choice, results


def _first_remote(plan: Plan, manifest) -> int | None:
    """The first partition off the device, or None when the device runs everything. The compiled
    bundle has one partition per active tier, in chain order; the device's comes first when it has one."""
    count = len(manifest.partitions)
    if plan.placement[0] is None:
        return 0
    return 1 if count > 1 else None


def verify_variants(path: str | Path, **options):
    """verify_bundle on every variant; one report whose checks are named `v<i>: <check>`."""
    from splitc.runtime.variant_index import read_variants
    from splitc.drivers.verify import VerifyReport, verify_bundle

    index = read_variants(path)
    combined = VerifyReport(str(path))
    for variant in index.variants:
        report = verify_bundle(index.bundle_path(variant.index), **options)
        for check in report.checks:
            check.name = f"{variant.directory}: {check.name}"
            combined.checks.append(check)
        combined.seconds += report.seconds
        failed = len(report.failures)
        options.get("log", lambda _: None)(f"{variant.directory}: {'pass' if not failed else f'{failed} check(s) failed'} "
                                           f"({len(report.checks)} checks)")
    return combined


def describe(choice: VariantChoice) -> list[str]:
    """One line per chosen variant, for the CLI."""
    lines = []
    for i, (plan, wins) in enumerate(zip(choice.plans, choice.wins)):
        active = [t.target for t in plan.tiers if t.nodes]
        cuts = active_tiers(plan.placement, plan.cuts)[1]
        presets = f" ({', '.join(wins['links'])})" if wins["links"] else ""
        lines.append(f"v{i}: {' → '.join(active)}" + (f", cut after {', '.join(cuts)}" if cuts else "") +
                     f"; {_sent_bytes(plan)} B sent; best on {wins['share']:.0%} of the links swept{presets}")
    if math.isfinite(choice.regret):
        lines.append(f"mean regret over {len(choice.links)} links: {choice.regret:.1%} above the best of {choice.candidates} placements")
    return lines
