"""The plan document: what `splitc plan --json` writes and `splitc compile --plan` reads.

It names the model (sha256, node count) so a plan is never applied to another model, the targets
as the user gave them, the workload, and one Pareto front per link with the chosen plan marked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from splitc.core.errors import InputError
from splitc.core.graph import ModelGraph
from splitc.passes.money import Workload
from splitc.passes.planner import Constraints, PlanSet, active_tiers

FORMAT = "splitc-plan"
SCHEMA_VERSION = 1

_RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "day": 86400.0}


def parse_rate(text: str) -> float:
    """`50/s`, `3000/min`, `1e6/day` or a bare number (per second)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(?:/\s*([a-z]+))?\s*", text.lower())
    if not match or (match.group(2) and match.group(2) not in _RATE_UNITS):
        raise InputError(f"--rate {text!r} is not a request rate; write it as 50/s, 3000/min, 1e6/day or 50")
    rate = float(match.group(1)) / _RATE_UNITS[match.group(2) or "s"]
    if rate <= 0:
        raise InputError(f"--rate {text!r} must be positive")
    return rate


def parse_duration_ms(text: str, flag: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text.lower())
    if not match:
        raise InputError(f"{flag} {text!r} is not a duration; write it as 120ms or 0.12s")
    return float(match.group(1)) * (1000.0 if match.group(2) == "s" else 1.0)


def plan_document(graph: ModelGraph, target_specs: Sequence[str], workload: Workload, constraints: Constraints,
                  fronts: Sequence[PlanSet], sources: dict[str, Any]) -> dict[str, Any]:
    first = fronts[0]
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": {"name": graph.name, "sha256": graph.source_sha256, "nodes": len(graph.value_nodes())},
        "targets": list(target_specs),
        "workload": {"rate_per_s": workload.rate_per_s, "utilisation": workload.utilisation},
        "constraints": {k: v for k, v in constraints.__dict__.items() if v is not None},
        "sources": sources,  # where latency and leakage figures came from
        "objective": first.objective,
        "plans": [p.to_json() for p in first.plans],
        "chosen": first.chosen,
        "fronts": [f.to_json() for f in fronts],
    }


@dataclass(frozen=True)
class ChosenPlan:
    targets: list[str]      # the targets that run something, in chain order
    cuts: list[str]         # node names between consecutive active targets
    record: dict[str, Any]  # the plan as planned, for the manifest


def read_plan(path: str | Path, graph: ModelGraph, link: str | None = None) -> ChosenPlan:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plan file {path} does not exist; write one with `splitc plan ... --json > {path}`")
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"plan file {path} is not JSON ({exc}); write it with `splitc plan --json`") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(f"{path} is not a splitc plan; write one with `splitc plan --json`")
    model = document.get("model", {})
    if model.get("sha256") != graph.source_sha256 or model.get("nodes") != len(graph.value_nodes()):
        raise InputError(f"plan {path} was made for model {model.get('name')!r} (sha256 {str(model.get('sha256'))[:12]}…), "
                         f"not for {graph.source}; re-run `splitc plan` on this model")
    fronts = document["fronts"]
    if link is not None:
        matching = [f for f in fronts if f["link"]["name"] == link]
        if not matching:
            raise InputError(f"plan {path} has no front for link {link!r}; it has {', '.join(f['link']['name'] for f in fronts)}")
        front = matching[0]
    else:
        front = fronts[0]
    plan = front["plans"][front["chosen"]]
    names = {n.name for n in graph.value_nodes()}
    cut_names = [c[0] for c in plan["cuts"]]
    unknown = [c for c in cut_names if c not in names]
    if unknown:
        raise InputError(f"plan {path} cuts after {unknown[0]!r}, which is not a node of {graph.name}; re-run `splitc plan`")
    active, cuts = active_tiers(plan["placement"], cut_names)
    return ChosenPlan([document["targets"][k] for k in active], cuts, {"link": front["link"], **plan})
