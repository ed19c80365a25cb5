"""The placement planner: the Pareto front of latency, money, privacy and energy over every way of
placing a graph on a chain of tiers (device -> edge server -> cloud).

A pure function of (cut analysis, targets, link, workload, per-node times, leakage profile):
it compiles and runs nothing. Measured profiles and measured leakage enter as arrays.

A plan is one cut position per boundary, non-decreasing: tier k runs the nodes after cut k-1 up to
and including cut k. Positions include "after the inputs" (nothing before the cut computes: the
raw input is sent) and "after the last node" (nothing after it runs), so device-only, cloud-only
and plans that skip a middle tier are all candidates. Data flows along the tiers that run
something: the device (which always holds the inputs) sends to the first active tier, that one to
the next, each over the link leaving the sender.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from splitc.core.errors import PlanError, TargetError
from splitc.passes.cost_model import compute_ms, transfer_ms
from splitc.passes.cuts import CutAnalysis
from splitc.passes.money import (
    Workload,
    cold_fraction,
    faas_usd_per_million,
    has_price,
    iaas_usd_per_million,
    indifference_rate,
)
from splitc.targets import Link, LinkMix, Target

OBJECTIVES = ("latency", "cost", "privacy", "energy")


@dataclass(frozen=True)
class Constraints:
    max_latency_ms: float | None = None
    max_cost_usd_per_million: float | None = None
    max_leakage: float | None = None
    max_energy_j: float | None = None


@dataclass(frozen=True)
class TierCost:
    target: str
    nodes: int
    compute_ms: float
    pricing: str | None              # "iaas" | "faas" | None (owned hardware, or unpriced)
    iaas_usd_per_million: float | None
    faas_usd_per_million: float | None
    indifference_rate_per_s: float | None  # above it a reserved VM is cheaper than serverless
    cold_start_ms: float = 0.0       # expected cold-start delay per request when serverless


@dataclass(frozen=True)
class Plan:
    positions: tuple[int, ...]
    cuts: tuple[str, ...]            # node name after which each boundary falls
    placement: tuple[str | None, ...]  # per tier: the target that runs something there, or None
    latency_ms: float
    cost_usd_per_million: float
    leakage: float | None
    energy_j: float | None
    tiers: tuple[TierCost, ...]
    transfers: tuple[dict[str, Any], ...]
    accuracy: float = 1.0            # relative to the unsplit model (no accuracy-changing pass planned)
    state_latency_ms: tuple[float, ...] | None = None  # per state of a LinkMix (latency_ms aggregates them)

    def to_json(self) -> dict[str, Any]:
        return {
            "cuts": [[c] for c in self.cuts],
            "positions": list(self.positions),
            "placement": list(self.placement),
            "latency_ms": round(self.latency_ms, 4),
            "cost_usd_per_million": round(self.cost_usd_per_million, 6),
            "leakage": None if self.leakage is None else round(self.leakage, 6),
            "accuracy": self.accuracy,
            "energy_j": None if self.energy_j is None else round(self.energy_j, 6),
            "tiers": [t.__dict__ for t in self.tiers],
            "transfers": list(self.transfers),
            **({"state_latency_ms": [round(v, 4) for v in self.state_latency_ms]} if self.state_latency_ms is not None else {}),
        }


@dataclass
class PlanSet:
    link: Link | LinkMix
    objective: str
    plans: list[Plan]                # the Pareto front, fastest first
    chosen: int
    evaluated: int                   # plans scored before the Pareto filter
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "link": link_json(self.link),
            "objective": self.objective,
            "evaluated": self.evaluated,
            "chosen": self.chosen,
            "warnings": self.warnings,
            "plans": [p.to_json() for p in self.plans],
        }


def link_json(link: Link | LinkMix) -> dict[str, Any]:
    out = {"name": link.name, "mbit_s": link.mbit_s, "rtt_ms": link.rtt_ms}
    if isinstance(link, LinkMix):
        out["states"] = [{"name": s.name, "mbit_s": s.mbit_s, "rtt_ms": s.rtt_ms, "weight": w} for s, w in zip(link.states, link.weights)]
        out["aggregate"] = "mean" if link.percentile is None else f"p{link.percentile:g}"
    return out


def active_tiers(placement: Sequence[str | None], cuts: Sequence[str]) -> tuple[list[int], list[str]]:
    """The tiers a plan gives work to, and the cut names between consecutive ones: what the
    compiler needs (an empty tier gets no partition; each active tier after the first starts at
    the cut in front of it)."""
    active = [k for k, name in enumerate(placement) if name is not None]
    return active, [cuts[k - 1] for k in active[1:]]


def allowed_positions(analysis: CutAnalysis) -> np.ndarray:
    """Valid cuts plus 'after the inputs' (send the raw input) and 'after the last node'."""
    inputs_end = _inputs_end(analysis)
    return np.unique(np.concatenate([[inputs_end], analysis.valid_positions(), [len(analysis.order) - 1]])).astype(np.int64)


def _inputs_end(analysis: CutAnalysis) -> int:
    placeholders = [i for i, n in enumerate(analysis.order) if n.op == "placeholder"]
    return max(placeholders) if placeholders else -1


def _combinations(positions: np.ndarray, boundaries: int, strict: bool, limit: int, crossing: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """All non-decreasing (strictly increasing if `strict`) choices of `boundaries` positions,
    thinned to the positions with the fewest crossing bytes when there would be more than `limit`."""
    warnings = []
    count = lambda v: math.comb(v, boundaries) if strict else math.comb(v + boundaries - 1, boundaries)  # noqa: E731
    if count(len(positions)) > limit:
        ends = positions[[0, -1]]
        inner = positions[1:-1]
        keep = len(inner)
        while keep > 1 and count(keep + 2) > limit:
            keep = int(keep * 0.9)
        inner = np.sort(inner[np.argsort(crossing[inner], kind="stable")[:keep]])
        warnings.append(f"{len(positions)} candidate cuts per boundary make too many plans; kept the {keep} with the fewest bytes crossing")
        positions = np.unique(np.concatenate([ends, inner]))
    v = len(positions)
    if boundaries == 1:
        index = np.arange(v)[:, None]
    elif boundaries == 2:
        i, j = np.triu_indices(v, k=1 if strict else 0)
        index = np.stack([i, j], axis=1)
    else:
        combos = itertools.combinations if strict else itertools.combinations_with_replacement
        index = np.array(list(combos(range(v), boundaries)), dtype=np.int64).reshape(-1, boundaries)
    return positions[index], warnings


def plan_placements(
    analysis: CutAnalysis,
    targets: Sequence[Target],
    link: Link | LinkMix,
    workload: Workload,
    *,
    node_ms: Sequence[np.ndarray] | None = None,
    leakage: np.ndarray | None = None,
    objective: str = "latency",
    constraints: Constraints = Constraints(),
    require_all_tiers: bool = False,
    quantize_bits: int | None = None,
    max_plans: int = 3_000_000,
) -> PlanSet:
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if len(targets) < 2:
        raise PlanError("planning needs at least two tiers (--targets device,cloud)")
    if objective == "cost" or constraints.max_cost_usd_per_million is not None:
        unpriced = [t.name for t in targets[1:] if t.tier == "cloud" and not has_price(t)]
        if unpriced:
            raise TargetError(f"target {unpriced[0]} has no [price] section, and money is an objective here; add vm_usd_per_hour or faas_* prices to its TOML")
    if (objective == "privacy" or constraints.max_leakage is not None) and leakage is None:
        raise PlanError("privacy needs a measured leakage profile: pass --calib data.npz")
    if (objective == "energy" or constraints.max_energy_j is not None) and targets[0].active_power_w is None:
        raise PlanError(f"energy needs an [energy] active_power_w figure for {targets[0].name}")

    n = len(analysis.order)
    times = [np.asarray(t, dtype=np.float64) for t in node_ms] if node_ms is not None else [compute_ms(analysis.order, t) for t in targets]
    crossing = analysis.crossing_bytes(quantize_bits)  # what is sent: quantized when the plan quantizes
    if quantize_bits is not None and _inputs_end(analysis) >= 0:
        # Sending the raw input (a tier running the whole model remotely) is no cut the quantizer
        # pass touches: it goes at its own size.
        crossing[_inputs_end(analysis)] = analysis.crossing_bytes()[_inputs_end(analysis)]
    positions = allowed_positions(analysis)
    if require_all_tiers:
        positions = positions[(positions > _inputs_end(analysis)) & (positions < n - 1)]
    combos, warnings = _combinations(positions, len(targets) - 1, require_all_tiers, max_plans, crossing)
    if len(combos) == 0:
        raise PlanError(f"the graph has too few cut positions for {len(targets)} tiers")
    states = link.states if isinstance(link, LinkMix) else (link,)
    scored = [_score(analysis, targets, state, workload, times, crossing, leakage, combos) for state in states]
    metrics = scored[0]
    if isinstance(link, LinkMix):  # money, leakage and energy do not depend on the link; latency does
        metrics["states"] = np.stack([m["latency"] for m in scored])
        metrics["latency"] = link.aggregate(metrics["states"])

    columns = [metrics["latency"], metrics["cost"]]
    if leakage is not None:
        columns.append(metrics["leakage"])
    if targets[0].active_power_w is not None:
        columns.append(metrics["energy"])
    front = pareto_front(np.stack(columns, axis=1), group=combos[:, 0])
    front = front[np.lexsort((metrics["cost"][front], metrics["latency"][front]))]
    plans = _plans(analysis, targets, link, workload, times, crossing, combos[front],
                   {k: (v[:, front] if k == "states" else v[front]) for k, v in metrics.items()})
    chosen = _choose(plans, objective, constraints, link)
    picked = plans[chosen]
    if picked.placement[0] is not None and any(picked.placement[1:]) and crossing[picked.positions[0]] >= crossing[_inputs_end(analysis)]:
        warnings.append(f"the chosen plan's device part (up to {picked.cuts[0]}) has no dimension-reducing layer: it sends "
                        f"{int(crossing[picked.positions[0]])} bytes, no fewer than the raw input's {int(crossing[_inputs_end(analysis)])}")
    return PlanSet(link, objective, plans, chosen, len(combos), warnings)


def _score(analysis, targets, link, workload, times, crossing, leakage, combos) -> dict[str, np.ndarray]:
    n = len(analysis.order)
    count = len(combos)
    start = _inputs_end(analysis)
    bounds = np.concatenate([np.full((count, 1), start), combos, np.full((count, 1), n - 1)], axis=1)
    latency = np.zeros(count)
    cost = np.zeros(count)
    sender = np.zeros(count, dtype=np.int64)  # the device holds the inputs
    for k, target in enumerate(targets):
        prefix = np.concatenate([[0.0], np.cumsum(times[k])])
        tier_ms = prefix[bounds[:, k + 1] + 1] - prefix[bounds[:, k] + 1]
        active = bounds[:, k + 1] > bounds[:, k]
        latency += tier_ms
        if k > 0:
            sent = crossing[bounds[:, k]]
            # Each sender's link, selected per plan; a chain usually has one or two distinct links.
            transfer = np.zeros(count)
            for s in range(k):
                uplink = targets[s].uplink or link
                transfer = np.where(sender == s, transfer_ms(sent, uplink), transfer)
            latency += np.where(active, transfer, 0.0)
            sender = np.where(active, k, sender)
        if has_price(target) and target.tier == "cloud":
            iaas = iaas_usd_per_million(target, tier_ms, workload.rate_per_s, workload.utilisation)
            faas = faas_usd_per_million(target, tier_ms)
            use_faas = faas < iaas
            cost += np.where(active, np.minimum(iaas, faas), 0.0)
            cold = cold_fraction(target, workload.rate_per_s) * float(target.price.get("faas_cold_start_ms", 0.0))
            latency += np.where(active & use_faas, cold, 0.0)
    device_ms = np.concatenate([[0.0], np.cumsum(times[0])])[bounds[:, 1] + 1] - np.concatenate([[0.0], np.cumsum(times[0])])[start + 1]
    sends = bounds[:, 1] < n - 1
    metrics = {"latency": latency, "cost": cost}
    if leakage is not None:
        metrics["leakage"] = np.where(sends, np.nan_to_num(np.asarray(leakage)[bounds[:, 1]], nan=1.0), 0.0)
    if targets[0].active_power_w is not None:
        metrics["energy"] = targets[0].active_power_w * device_ms / 1e3
    return metrics


def pareto_front(points: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """Indices of the non-dominated rows of `points` (minimise every column; duplicates kept).

    `group` labels rows whose columns other than the first two are equal (the planner groups by
    the first cut: leakage and device energy depend on it alone). Within a group dominance is 2-D,
    so a sort and a running minimum discard most rows before the exact filter over what is left.
    """
    count = len(points)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.arange(count)
    if group is not None and points.shape[1] >= 2:
        candidates = _prefilter_2d(points[:, 0], points[:, 1], np.asarray(group))
    subset = points[candidates]
    order = np.lexsort(subset.T[::-1])          # by first column, then the next ones
    kept = np.empty(len(order), dtype=np.int64)
    kept_points = np.empty((len(order), points.shape[1]))
    size = 0
    for i in order:
        p = subset[i]
        front = kept_points[:size]
        if size and np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1)):
            continue
        kept[size], kept_points[size] = i, p
        size += 1
    return np.sort(candidates[kept[:size]])


def _prefilter_2d(first: np.ndarray, second: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Rows not dominated within their group on (first, second)."""
    _, group_id = np.unique(group, return_inverse=True)
    _, second_rank = np.unique(second, return_inverse=True)
    order = np.lexsort((second, first, group_id))
    # Keys fall by a whole rank range per group, so a running minimum never carries a value from an
    # earlier group into a later one: it resets at every group boundary.
    key = second_rank[order].astype(np.int64) - group_id[order].astype(np.int64) * (len(second) + 1)
    running = np.minimum.accumulate(key)
    before = np.concatenate([[np.iinfo(np.int64).max], running[:-1]])
    before[np.r_[True, group_id[order][1:] != group_id[order][:-1]]] = np.iinfo(np.int64).max
    # An earlier row of the group with a smaller second value dominates; one with an equal second
    # value dominates only if its first value is strictly smaller (exact duplicates both stay).
    _, first_at, which = np.unique(key, return_index=True, return_inverse=True)
    sorted_first = first[order]
    dominated = (before < key) | ((before == key) & (sorted_first[first_at][which] < sorted_first))
    return np.sort(order[~dominated])


def _plans(analysis, targets, link, workload, times, crossing, combos, metrics) -> list[Plan]:
    """Plan objects for the (few) front rows: per-tier figures recomputed vectorised over them."""
    n = len(analysis.order)
    count = len(combos)
    start = _inputs_end(analysis)
    bounds = np.concatenate([np.full((count, 1), start), combos, np.full((count, 1), n - 1)], axis=1)
    ops = np.concatenate([[0], np.cumsum(analysis.is_op)])
    names = [node.name for node in analysis.order]
    columns: list[dict[str, Any]] = []
    sender = np.zeros(count, dtype=np.int64)
    transfers: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for k, target in enumerate(targets):
        prefix = np.concatenate([[0.0], np.cumsum(times[k])])
        tier_ms = prefix[bounds[:, k + 1] + 1] - prefix[bounds[:, k] + 1]
        active = bounds[:, k + 1] > bounds[:, k]
        column = {"ms": tier_ms, "active": active, "nodes": ops[bounds[:, k + 1] + 1] - ops[bounds[:, k] + 1]}
        if k > 0:
            nbytes = crossing[bounds[:, k]]
            for row in np.flatnonzero(active):
                uplink = targets[sender[row]].uplink or link
                transfers[row].append({"from": targets[sender[row]].name, "to": target.name, "after": names[bounds[row, k]],
                                       "bytes": int(nbytes[row]), "ms": round(float(transfer_ms(int(nbytes[row]), uplink)), 4), "link": uplink.name})
            sender = np.where(active, k, sender)
        if target.tier == "cloud" and has_price(target):
            column["iaas"] = iaas_usd_per_million(target, tier_ms, workload.rate_per_s, workload.utilisation)
            column["faas"] = faas_usd_per_million(target, tier_ms)
            column["cold"] = cold_fraction(target, workload.rate_per_s) * float(target.price.get("faas_cold_start_ms", 0.0))
        columns.append(column)

    plans = []
    for row in range(count):
        tiers = []
        for target, column in zip(targets, columns):
            ms, active = float(column["ms"][row]), bool(column["active"][row])
            pricing = iaas = faas = rate = None
            cold = 0.0
            if active and "iaas" in column:
                iaas_v, faas_v = float(column["iaas"][row]), float(column["faas"][row])
                iaas, faas = (None if math.isinf(iaas_v) else iaas_v), (None if math.isinf(faas_v) else faas_v)
                pricing = "faas" if faas_v < iaas_v else "iaas"
                rate = indifference_rate(target, ms, workload.utilisation)
                cold = column["cold"] if pricing == "faas" else 0.0
            tiers.append(TierCost(target.name, int(column["nodes"][row]), ms, pricing, iaas, faas, rate, cold))
        positions = tuple(int(p) for p in combos[row])
        plans.append(Plan(
            positions=positions,
            cuts=tuple(names[p] for p in positions),
            placement=tuple(t.name if bool(c["active"][row]) else None for t, c in zip(targets, columns)),
            latency_ms=float(metrics["latency"][row]),
            cost_usd_per_million=float(metrics["cost"][row]),
            leakage=float(metrics["leakage"][row]) if "leakage" in metrics else None,
            energy_j=float(metrics["energy"][row]) if "energy" in metrics else None,
            tiers=tuple(tiers),
            transfers=tuple(transfers[row]),
            state_latency_ms=tuple(float(v) for v in metrics["states"][:, row]) if "states" in metrics else None,
        ))
    return plans


_KEYS = {"latency": "latency_ms", "cost": "cost_usd_per_million", "privacy": "leakage", "energy": "energy_j"}
_LIMITS = (
    ("max_latency_ms", "latency_ms", "--max-latency", "the fastest plan takes {:.2f} ms"),
    ("max_cost_usd_per_million", "cost_usd_per_million", "--max-cost", "the cheapest plan costs ${:.4f} per million requests"),
    ("max_leakage", "leakage", "--max-leakage", "the most private plan leaks {:.4f} (dCor)"),
    ("max_energy_j", "energy_j", "--max-energy", "the most frugal plan takes {:.4f} J on the device"),
)


def _choose(plans: list[Plan], objective: str, constraints: Constraints, link: Link) -> int:
    feasible = list(range(len(plans)))
    for attr, key, flag, best in _LIMITS:
        limit = getattr(constraints, attr)
        if limit is None:
            continue
        alone = [i for i in range(len(plans)) if getattr(plans[i], key) <= limit]
        if not alone:
            achievable = min(getattr(p, key) for p in plans)
            raise PlanError(f"no plan meets {flag} {limit:g} on link {link.name}: " + best.format(achievable))
        remaining = [i for i in feasible if i in alone]
        if not remaining:
            others = [f for a, _, f, _ in _LIMITS if getattr(constraints, a) is not None and f != flag]
            raise PlanError(f"no plan meets {flag} {limit:g} together with {', '.join(others)} on link {link.name}; "
                            f"each alone is achievable, relax one of them")
        feasible = remaining
    key = _KEYS[objective]
    return min(feasible, key=lambda i: (getattr(plans[i], key), plans[i].latency_ms, plans[i].cost_usd_per_million))
