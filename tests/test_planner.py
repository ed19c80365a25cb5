"""The placement planner: exactly the non-dominated set (checked against exhaustive enumeration
scored by an independent loop implementation), sensible movement with bandwidth, money, and
one-line errors for infeasible constraints and missing inputs."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from splitc.core.errors import TargetError
from splitc.frontend.annotate import annotate
from splitc.core.graph import ModelGraph, tensor_spec
from splitc.passes.cost_model import transfer_ms
from splitc.passes.cuts import CutAnalysis, auto_cuts
from splitc.passes.money import Workload, cold_fraction, faas_usd_per_million, iaas_usd_per_million, indifference_rate
from splitc.passes.planner import Constraints, PlanError, allowed_positions, pareto_front, plan_placements
from splitc.targets import Link, load_target, load_targets

aten = torch.ops.aten


def random_dag(seed: int, nodes: int = 14) -> ModelGraph:
    """A random DAG of elementwise/reduction ops on a (1, 8, 6, 6) input: every node reads one or
    two random earlier nodes, so skip connections and several readers are common."""
    rng = random.Random(seed)
    graph = fx.Graph()
    x = graph.placeholder("x")
    values = [x]
    for _ in range(nodes):
        a = rng.choice(values[-4:])
        kind = rng.random()
        if kind < 0.35:
            values.append(graph.call_function(aten.relu.default, (a,)))
        elif kind < 0.7:
            values.append(graph.call_function(aten.add.Tensor, (a, rng.choice(values))))
        elif kind < 0.85:
            values.append(graph.call_function(aten.mul.Tensor, (a, 0.5)))
        else:
            values.append(graph.call_function(aten.avg_pool2d.default, (a, [1, 1])))
    outputs = [values[-1]] + ([values[len(values) // 2]] if rng.random() < 0.5 else [])
    graph.output(tuple(outputs))
    module = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(module).propagate(torch.randn(1, 8, 6, 6))
    annotate(module)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return ModelGraph(f"dag{seed}", module, tuple(tensor_spec(n) for n in placeholders),
                      tuple(tensor_spec(n) for n in outputs), "0" * 64, "random")


def brute_force(analysis, targets, link, workload, times, leakage):
    """Every plan scored by plain loops, independent of the planner's vectorised code."""
    n = len(analysis.order)
    start = max(i for i, node in enumerate(analysis.order) if node.op == "placeholder")
    positions = sorted(int(p) for p in allowed_positions(analysis))
    rows = []
    for combo in itertools.combinations_with_replacement(positions, len(targets) - 1):
        bounds = [start, *combo, n - 1]
        latency = cost = 0.0
        sender = 0
        for k, target in enumerate(targets):
            tier_ms = sum(times[k][i] for i in range(bounds[k] + 1, bounds[k + 1] + 1))
            active = bounds[k + 1] > bounds[k]
            latency += tier_ms
            if k and active:
                nbytes = sum(t.nbytes for t in analysis.cut(bounds[k]).crossing) if bounds[k] > start else sum(
                    t.nbytes for t in analysis.graph.inputs)
                latency += float(transfer_ms(nbytes, targets[sender].uplink or link))
                sender = k
            if active and target.tier == "cloud" and target.price:
                iaas = float(iaas_usd_per_million(target, np.array([tier_ms]), workload.rate_per_s, workload.utilisation)[0])
                faas = float(faas_usd_per_million(target, np.array([tier_ms]))[0])
                cost += min(iaas, faas)
                if faas < iaas:
                    latency += cold_fraction(target, workload.rate_per_s) * target.price.get("faas_cold_start_ms", 0.0)
        sends = combo[0] < n - 1
        device_ms = sum(times[0][i] for i in range(start + 1, bounds[1] + 1))
        energy = targets[0].active_power_w * device_ms / 1e3
        rows.append((combo, latency, cost, float(leakage[combo[0]]) if sends else 0.0, energy))
    return rows


def dominated(a, b):
    return all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("chain", ["rpi4,cloud-cpu", "rpi4,edge-server,cloud-cpu"])
def test_front_is_exactly_the_non_dominated_set(seed, chain):
    graph = random_dag(seed)
    analysis = CutAnalysis(graph)
    targets = load_targets(chain)
    link = Link("test", 2.0, 20.0)
    workload = Workload(rate_per_s=0.01 + seed)  # low rates make serverless and cold starts matter
    rng = np.random.default_rng(seed)
    # Coarse per-node times and leakage create exact ties, the hard case for a Pareto filter.
    times = [np.round(rng.uniform(0, 3, len(analysis.order)) * (1 + 4 * (k == 0)), 1) for k in range(len(targets))]
    leakage = np.round(rng.uniform(0, 1, len(analysis.order)), 1)
    result = plan_placements(analysis, targets, link, workload, node_ms=times, leakage=leakage)
    rows = brute_force(analysis, targets, link, workload, times, leakage)
    assert result.evaluated == len(rows)
    expected = {r[0] for r in rows if not any(dominated(r[1:], o[1:]) for o in rows)}
    assert {p.positions for p in result.plans} == expected
    by_combo = {r[0]: r for r in rows}
    for plan in result.plans:
        _, latency, cost, leak, energy = by_combo[plan.positions]
        assert plan.latency_ms == pytest.approx(latency, rel=1e-9, abs=1e-9)
        assert plan.cost_usd_per_million == pytest.approx(cost, rel=1e-9, abs=1e-12)
        assert plan.leakage == pytest.approx(leak)
        assert plan.energy_j == pytest.approx(energy, rel=1e-9, abs=1e-12)


def test_pareto_front_matches_quadratic_filter_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        points = rng.integers(0, 5, size=(60, 3)).astype(float)
        group = points[:, 2].copy()
        got = set(pareto_front(points, group=group).tolist())
        expected = {i for i in range(len(points)) if not any(dominated(points[i], points[j]) for j in range(len(points)))}
        assert got == expected


def test_latency_optimal_cut_moves_with_bandwidth(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    targets = load_targets("rpi4,a100")
    n = len(analysis.order)
    chosen = []
    for mbit in (0.001, 0.01, 0.1, 1, 10, 100, 1000, 100000):
        result = plan_placements(analysis, targets, Link(f"{mbit}", mbit, 0.01), Workload(10))
        chosen.append(result.plans[result.chosen].positions[0])
    assert chosen == sorted(chosen, reverse=True), chosen  # monotone: later cut as bandwidth falls
    assert chosen[0] == n - 1                               # starved link: everything on the device
    inputs_end = max(i for i, node in enumerate(analysis.order) if node.op == "placeholder")
    assert chosen[-1] == inputs_end                         # fat link: everything in the cloud


def test_all_tier_latency_plan_agrees_with_the_dp_baseline(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    targets = load_targets("rpi4,x86,cloud-cpu")
    link = Link("l", 5.0, 20.0)
    for target in targets:  # the DP knows nothing of money; keep serverless cold starts out of it
        assert not target.price or target.tier == "cloud"
    result = plan_placements(analysis, load_targets("rpi4,x86"), link, Workload(10), require_all_tiers=True)
    dp = auto_cuts(analysis, load_targets("rpi4,x86"), link)
    assert result.plans[result.chosen].positions == tuple(c.position for c in dp)


def test_money_prefers_serverless_at_low_rates_and_vm_at_high(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    cloud = load_target("cloud-cpu")
    # A VM replica serves one request at a time here, so it only beats Lambda's per-GB-second price
    # on short requests; 20 ms never pays for a VM, 1 ms does above the indifference rate.
    assert indifference_rate(cloud, 20.0, 0.7) is None
    tier_ms = 1.0
    rate = indifference_rate(cloud, tier_ms, 0.7)
    assert rate is not None and rate > 0
    low = float(iaas_usd_per_million(cloud, np.array([tier_ms]), rate / 10, 0.7)[0])
    high = float(iaas_usd_per_million(cloud, np.array([tier_ms]), rate * 10, 0.7)[0])
    faas = float(faas_usd_per_million(cloud, np.array([tier_ms]))[0])
    assert low > faas > high
    assert float(iaas_usd_per_million(cloud, np.array([tier_ms]), rate, 0.7)[0]) == pytest.approx(faas, rel=1e-9)
    for rps, expected in ((rate / 10, "faas"), (rate * 10, "iaas")):
        result = plan_placements(analysis, load_targets("rpi4,cloud-cpu"), Link("fat", 1e5, 1.0), Workload(rps))
        cloud_plan = next(p for p in result.plans if p.placement[0] is None)
        assert cloud_plan.tiers[1].pricing == expected


def test_infeasible_constraint_names_it_and_the_best_value(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    targets = load_targets("rpi4,a100")
    result = plan_placements(analysis, targets, Link("l", 5.0, 20.0), Workload(10))
    fastest = min(p.latency_ms for p in result.plans)
    with pytest.raises(PlanError, match=r"--max-latency .* the fastest plan takes " + f"{fastest:.2f}"):
        plan_placements(analysis, targets, Link("l", 5.0, 20.0), Workload(10), constraints=Constraints(max_latency_ms=fastest / 2))
    met = plan_placements(analysis, targets, Link("l", 5.0, 20.0), Workload(10), constraints=Constraints(max_latency_ms=fastest * 1.01))
    assert met.plans[met.chosen].latency_ms <= fastest * 1.01


def test_objective_picks_its_minimum_on_the_front(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    leakage = np.linspace(1.0, 0.1, len(analysis.order))
    for objective, key in (("latency", "latency_ms"), ("cost", "cost_usd_per_million"), ("privacy", "leakage"), ("energy", "energy_j")):
        result = plan_placements(analysis, load_targets("rpi4,cloud-cpu"), Link("l", 5.0, 20.0), Workload(5),
                                 leakage=leakage, objective=objective)
        values = [getattr(p, key) for p in result.plans]
        assert getattr(result.plans[result.chosen], key) == min(values)


def test_bad_planner_input(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    unpriced = load_targets("rpi4,x86")
    object.__setattr__(unpriced[1], "tier", "cloud")
    with pytest.raises(TargetError, match="no \\[price\\]"):
        plan_placements(analysis, unpriced, Link("l", 5.0, 20.0), Workload(5), objective="cost")
    with pytest.raises(PlanError, match="--calib"):
        plan_placements(analysis, load_targets("rpi4,a100"), Link("l", 5.0, 20.0), Workload(5), objective="privacy")
    with pytest.raises(PlanError, match="unknown objective"):
        plan_placements(analysis, load_targets("rpi4,a100"), Link("l", 5.0, 20.0), Workload(5), objective="speed")


def test_two_thousand_node_three_tier_front_is_fast_enough_to_report():
    """Not a timed test: the figure is printed by bench/planner_scale.py. Here only the size works."""
    assert math.comb(2001, 2) < 3_000_000


def test_quantized_transfers_shrink_bytes_and_move_the_cut_earlier(zoo):
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    float_bytes, int8_bytes, int4_bytes = (analysis.crossing_bytes(b) for b in (None, 8, 4))
    valid = analysis.valid_positions()
    assert np.all(int8_bytes[valid] * 4 == float_bytes[valid]) and np.all(int4_bytes[valid] * 8 == float_bytes[valid])
    targets = load_targets("rpi4,a100")
    chosen = {}
    for bits in (None, 8):
        plans = plan_placements(analysis, targets, Link("l", 0.5, 5.0), Workload(10), quantize_bits=bits, require_all_tiers=True)
        chosen[bits] = plans.plans[plans.chosen]
        assert sum(t["bytes"] for t in chosen[bits].transfers) == (float_bytes if bits is None else int8_bytes)[chosen[bits].positions[0]]
    assert chosen[8].latency_ms < chosen[None].latency_ms
    assert chosen[8].positions[0] <= chosen[None].positions[0]


def test_quantized_plans_price_the_raw_input_at_its_own_size(zoo):
    """Cloud-only sends the model input as it is (no quantizer pass applies there), so the planner
    must not price it quantized; otherwise cloud-only looks 4x cheaper on the wire than it is."""
    analysis = CutAnalysis(zoo.graph("resnet_like"))
    input_bytes = sum(t.nbytes for t in zoo.graph("resnet_like").inputs)
    plans = plan_placements(analysis, load_targets("rpi4,a100"), Link("l", 0.5, 5.0), Workload(10), quantize_bits=8)
    cloud_only = [p for p in plans.plans if p.placement[0] is None]
    assert cloud_only, "cloud-only must be among the candidates"
    assert all(sum(t["bytes"] for t in p.transfers) == input_bytes for p in cloud_only)


# ----------------------------------------------------------------------------- a link that changes

def _mix_case(zoo):
    """A graph, device and cloud per-node times, and the trace wifi, 4g, 3g, wifi. The device's time
    sits in its last operator; offloading saves it for the fewest bytes any cut sends. Its time is
    set between what sending those bytes costs on the mean link and what it costs on average over
    the states (1/bandwidth is convex: the mean of the transfer times exceeds the transfer time of
    the mean link), so the mean link says offload and the states say do not."""
    from splitc.targets import load_link_mix

    graph = zoo.graph("resnet_like")
    analysis = CutAnalysis(graph)
    trace = load_link_mix("wifi+4g+3g+wifi")
    mean_link = Link("trace-mean", trace.mbit_s, trace.rtt_ms)  # 11.18 Mbit/s, 42.5 ms: no phase has it
    n = len(analysis.order)
    fewest = int(analysis.crossing_bytes()[allowed_positions(analysis)[:-1]].min())
    on_mean = float(transfer_ms(fewest, mean_link))
    on_states = float(np.dot(trace.weights, [transfer_ms(fewest, s) for s in trace.states]))
    assert on_states > on_mean
    device = np.zeros(n)
    device[int(np.flatnonzero(analysis.is_op)[-1])] = (on_mean + on_states) / 2
    return analysis, load_targets("x86,cloud-cpu"), [device, np.zeros(n)], trace, mean_link


def _latency(analysis, times, position, link) -> float:
    """An independent oracle: device time up to the cut, then the transfer and the cloud's time."""
    n = len(analysis.order)
    device = float(times[0][: position + 1].sum())
    if position >= n - 1:
        return device
    return device + float(transfer_ms(int(analysis.crossing_bytes()[position]), link)) + float(times[1][position + 1:].sum())


BUSY = Workload(1000.0)  # reserved VMs: no serverless cold start in the latency


def test_a_changing_link_is_planned_over_its_states_not_its_mean(zoo):
    analysis, targets, times, trace, mean_link = _mix_case(zoo)
    assert trace.weights == (0.5, 0.25, 0.25) and [s.name for s in trace.states] == ["wifi", "4g", "3g"]
    over_mean = plan_placements(analysis, targets, mean_link, BUSY, node_ms=times)
    over_trace = plan_placements(analysis, targets, trace, BUSY, node_ms=times)
    for plan in over_trace.plans:  # per state: the placement scored on that state; overall: their weighted mean
        expected = [_latency(analysis, times, plan.positions[0], state) for state in trace.states]
        assert np.allclose(plan.state_latency_ms, expected)
        assert math.isclose(plan.latency_ms, float(np.dot(trace.weights, expected)))

    def over_states(position):
        return float(np.dot(trace.weights, [_latency(analysis, times, position, s) for s in trace.states]))

    n = len(analysis.order)
    ends = min(over_states(n - 1), over_states(int(allowed_positions(analysis)[0])))  # device only, cloud only
    best = min(over_states(int(p)) for p in allowed_positions(analysis))
    assert math.isclose(over_trace.plans[over_trace.chosen].latency_ms, best)
    assert best <= ends
    # The case is one where planning for the mean link goes wrong: its plan loses to an end over the trace.
    assert over_states(over_mean.plans[over_mean.chosen].positions[0]) > ends


def test_percentile_of_a_changing_link(zoo):
    from splitc.targets import load_link_mix

    analysis, targets, times, _, _ = _mix_case(zoo)
    worst = plan_placements(analysis, targets, load_link_mix("wifi+4g+3g+wifi", percentile=100), BUSY, node_ms=times)
    assert all(p.latency_ms == max(p.state_latency_ms) for p in worst.plans)
    # p50 with Wi-Fi holding half the requests: the Wi-Fi figure whenever Wi-Fi is the fastest state.
    median = plan_placements(analysis, targets, load_link_mix("wifi+4g+3g+wifi", percentile=50), BUSY, node_ms=times)
    for plan in median.plans:
        wifi = plan.state_latency_ms[0]
        if wifi == min(plan.state_latency_ms):
            assert plan.latency_ms == wifi
    with pytest.raises(TargetError, match="positive number"):
        load_link_mix("wifi*0+3g")
    with pytest.raises(TargetError, match="unknown link"):
        load_link_mix("wifi+5g")
