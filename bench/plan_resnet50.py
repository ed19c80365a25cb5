"""Benchmark: the planner on ResNet-50 (Hugging Face architecture, 224x224) at the 3G / 4G / Wi-Fi
presets, with both tiers timed on this host and the link modelled.

    python bench/plan_resnet50.py [--device x86] [--cloud cloud-cpu] [--links 3g,4g,wifi]

For each link it reports the latency-optimal plan chosen from (a) the analytic model and (b) the
measured profiles (`splitc profile` on both targets), then compiles the profiled plan, times each of
its partitions here, and adds the modelled transfers: the "measured" figure. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hf_models import resnet50  # bench/ is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="x86")
    parser.add_argument("--cloud", default="cloud-cpu")
    parser.add_argument("--links", default="3g,4g,wifi")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from splitc.drivers.compiler import compile_model

    from splitc.passes.contract import CompileOptions
    from splitc.frontend import import_model
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.money import Workload
    from splitc.passes.planner import active_tiers, plan_placements
    from splitc.drivers.profile import profile_target
    from splitc.runtime import Bundle, SplitSession
    from splitc.targets import load_link, load_targets
    from splitc.core.timing import time_callable

    work = Path(tempfile.mkdtemp(prefix="splitc-r50-"))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.export.save(torch.export.export(resnet50(), (x,)), work / "resnet50.pt2")
    _, graph = import_model(work / "resnet50.pt2")
    analysis = CutAnalysis(graph)
    chain = load_targets(f"{args.device},{args.cloud}")
    tick = time.perf_counter()
    profiles = [profile_target(graph, t, segments=args.segments, warmup=1, repeats=5, max_seconds=20, log=lambda m: None) for t in chain]
    profile_s = time.perf_counter() - tick
    measured_ms = [p.node_ms(analysis, t) for p, t in zip(profiles, chain)]
    rows = []
    for name in args.links.split(","):
        link = load_link(name)
        analytic = plan_placements(analysis, chain, link, Workload(10))
        profiled = plan_placements(analysis, chain, link, Workload(10), node_ms=measured_ms)
        plan = profiled.plans[profiled.chosen]
        active, cuts = active_tiers(plan.placement, plan.cuts)
        result = compile_model(graph, CompileOptions([chain[k] for k in active], cut=cuts or "auto", link=link, samples=1), work / f"{name}.splitc")
        session = SplitSession(Bundle.open(result.bundle))
        env = session.bind_inputs({graph.inputs[0].name: x.numpy()})
        partition_ms = []
        for spec in result.manifest.partitions:
            inputs = dict(env)
            partition_ms.append(time_callable(lambda: session.run_partition(spec.index, inputs), warmup=1, repeats=5, max_seconds=20).median_ms)
            env = session.run_partition(spec.index, env)
        transfer = sum(t["ms"] for t in plan.transfers)
        rows.append({
            "link": name,
            "analytic_choice": {"cuts": list(analytic.plans[analytic.chosen].cuts), "placement": list(analytic.plans[analytic.chosen].placement),
                                "estimated_ms": round(analytic.plans[analytic.chosen].latency_ms, 2)},
            "profiled_choice": {"cuts": list(plan.cuts), "placement": list(plan.placement), "estimated_ms": round(plan.latency_ms, 2),
                                "bytes_sent": sum(t["bytes"] for t in plan.transfers)},
            "measured_ms": round(sum(partition_ms) + transfer, 2),
            "measured_partition_ms": [round(v, 2) for v in partition_ms],
            "modelled_transfer_ms": round(transfer, 2),
        })
    report = {"model": "HF ResNet-50 1x3x224x224", "gflops": round(graph.total_flops / 1e9, 2), "tiers": [t.name for t in chain],
              "profiling_s": round(profile_s, 1),
              "profiles": {p.target: [{"segment": f"{s.first_node}..{s.last_node}", "measured_ms": round(s.measured.median_ms, 2),
                                       "analytic_ms": round(s.estimated_ms, 2)} for s in p.segments] for p in profiles},
              "links": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
