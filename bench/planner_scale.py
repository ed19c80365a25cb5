"""Benchmark: the planner's full Pareto front for a 2,000-node graph over 3 tiers.

    python bench/planner_scale.py [--nodes 2000] [--tiers rpi4,edge-server,a100]

The graph is synthetic (built directly as an fx graph with FakeTensor metadata, no export): a
residual chain of convolution-sized elementwise ops with random skip connections, so many cut
positions are valid and crossing sets vary. Prints the time of CutAnalysis and of the planner
separately, the number of plans scored and the size of the front. Asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from splitc.frontend.annotate import annotate
from splitc.core.graph import ModelGraph, tensor_spec
from splitc.passes.cuts import CutAnalysis
from splitc.passes.money import Workload
from splitc.passes.planner import plan_placements
from splitc.targets import load_link, load_targets

aten = torch.ops.aten


def synthetic_graph(nodes: int, seed: int = 0) -> ModelGraph:
    rng = random.Random(seed)
    graph = fx.Graph()
    x = graph.placeholder("x")
    values = [x]
    shape_changes = 0
    count = 0
    while count + len(values) <= nodes:
        a = values[-1]
        r = rng.random()
        if r < 0.4:
            values.append(graph.call_function(aten.relu.default, (a,)))
        elif r < 0.8:
            values.append(graph.call_function(aten.add.Tensor, (a, rng.choice(values[-12:]))))
        elif r < 0.97 or shape_changes > 3:
            values.append(graph.call_function(aten.mul.Tensor, (a, 0.5)))
        else:  # a downsampling step keeps later cuts cheaper than early ones
            shape_changes += 1
            pooled = graph.call_function(aten.avg_pool2d.default, (a, [2, 2]))
            count += len(values)
            values = [pooled]  # skips never reach across a shape change
    graph.output((values[-1],))
    module = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(module).propagate(torch.randn(1, 32, 64, 64))
    annotate(module)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return ModelGraph("synthetic", module, tuple(tensor_spec(n) for n in placeholders), (tensor_spec(values[-1]),), "0" * 64, "synthetic")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--tiers", default="rpi4,edge-server,a100")
    parser.add_argument("--link", default="4g")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    graph = synthetic_graph(args.nodes)
    targets, link = load_targets(args.tiers), load_link(args.link)
    tick = time.perf_counter()
    analysis = CutAnalysis(graph)
    analysis_s = time.perf_counter() - tick
    leakage = np.linspace(1.0, 0.2, len(analysis.order))  # stands in for a measured profile
    runs = []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        result = plan_placements(analysis, targets, link, Workload(50), leakage=leakage, objective="cost")
        runs.append(time.perf_counter() - tick)
    print(f"graph: {len(analysis.order)} placed nodes, {len(analysis.valid_positions())} valid cut positions, tiers {args.tiers}")
    print(f"cut analysis: {analysis_s * 1e3:.1f} ms")
    print(f"planner: {result.evaluated} plans scored, front of {len(result.plans)}; "
          f"median {np.median(runs) * 1e3:.1f} ms over {args.repeats} runs (min {min(runs) * 1e3:.1f} ms)")
    for warning in result.warnings:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
