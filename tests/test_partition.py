"""Partitioning: expected partitions as node-name sets, self-contained modules, and numerical
equivalence of the chained partitions with the whole graph."""

from __future__ import annotations

import pytest
import torch

from splitc.core.graph import TIER
from splitc.passes.cuts import CutAnalysis, auto_cuts, resolve_cuts
from splitc.passes.partition import assign_tiers, extract_partitions
from splitc.targets import Link, load_target
from tests.models import multi_io, rel_err

TWO = [load_target("rpi4"), load_target("a100")]
THREE = [load_target("rpi4"), load_target("cloud-cpu"), load_target("a100")]
LINK = Link("4g", 5.85, 50.0)


def _split(graph, targets, cut_names=None, link=LINK):
    analysis = CutAnalysis(graph)
    cuts = resolve_cuts(analysis, cut_names, targets) if cut_names is not None else auto_cuts(analysis, targets, link)
    assign_tiers(analysis, cuts)
    return analysis, cuts, extract_partitions(graph, analysis, targets)


def _chain(graph, cuts, partitions, inputs):
    """Run the partitions as the runtime does: after partition k only boundary k's tensors survive."""
    env = {spec.name: t for spec, t in zip(graph.inputs, inputs)}
    with torch.no_grad():
        for k, partition in enumerate(partitions):
            produced = partition.module(*(env[t.name] for t in partition.inputs))
            assert len(produced) == len(partition.outputs)
            for spec, value in zip(partition.outputs, produced):
                assert tuple(value.shape) == spec.shape, spec.name
                env[spec.name] = value
            if k < len(cuts):
                env = {t.name: env[t.name] for t in cuts[k].crossing}
    return [env[spec.name] for spec in graph.outputs]


def _whole(graph, inputs):
    with torch.no_grad():
        out = graph.module(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _names(specs):
    return {t.name for t in specs}


# ------------------------------------------------------------------------------------ expected partitions


def test_multi_io_manual_cut_early(multi_io_graph):
    # image -> conv -> relu | conv2 -> relu -> pool -> flatten -> classifier ; vector -> vec_proj -> tanh -> cat -> embed
    analysis, cuts, (p0, p1) = _split(multi_io_graph, TWO, ["relu"])
    assert set(p0.nodes) == {"convolution", "relu"}
    assert set(p1.nodes) == {"convolution_1", "relu_1", "mean", "view", "addmm", "addmm_1", "tanh", "cat", "addmm_2"}
    assert _names(p0.inputs) == {"image"}
    assert _names(p0.outputs) == {"relu"}
    # `vector` is read only after the cut: it crosses the boundary and enters the later partition.
    assert _names(cuts[0].crossing) == {"relu", "vector"}
    assert _names(p1.inputs) == {"relu", "vector"}
    assert [t.name for t in p1.outputs] == ["addmm", "addmm_2"]
    assert [t.name for t in multi_io_graph.outputs] == ["addmm", "addmm_2"]


def test_multi_io_manual_cut_after_early_output(multi_io_graph):
    # Cut after the classifier (a module path): the logits are produced before the cut.
    analysis, cuts, (p0, p1) = _split(multi_io_graph, TWO, ["classifier"])
    assert cuts[0].after == "addmm"
    assert set(p0.nodes) == {"convolution", "relu", "convolution_1", "relu_1", "mean", "view", "addmm"}
    assert set(p1.nodes) == {"addmm_1", "tanh", "cat", "addmm_2"}
    assert _names(p0.inputs) == {"image"}
    assert _names(p0.outputs) == {"view", "addmm"}       # features for the embedding, and the logits
    assert _names(cuts[0].crossing) == {"vector", "view", "addmm"}
    assert _names(p1.inputs) == {"vector", "view"}
    assert _names(p1.outputs) == {"addmm_2"}
    # The early model output reaches the final outputs through the boundary.
    x = multi_io.example_inputs()
    for got, expected in zip(_chain(multi_io_graph, cuts, [p0, p1], x), _whole(multi_io_graph, x)):
        assert rel_err(got, expected) < 1e-6


def test_early_output_crosses_every_later_cut(multi_io_graph):
    analysis, cuts, parts = _split(multi_io_graph, THREE, ["classifier", "tanh"])
    assert [set(p.nodes) for p in parts] == [
        {"convolution", "relu", "convolution_1", "relu_1", "mean", "view", "addmm"},
        {"addmm_1", "tanh"},
        {"cat", "addmm_2"},
    ]
    # The logits leave tier 0 and are read by no one before the end: they cross both cuts.
    assert "addmm" in _names(cuts[0].crossing) and "addmm" in _names(cuts[1].crossing)
    assert _names(cuts[1].crossing) == {"view", "tanh", "addmm"}
    assert _names(parts[1].inputs) == {"vector"}
    assert _names(parts[2].inputs) == {"view", "tanh"}
    x = multi_io.example_inputs()
    for got, expected in zip(_chain(multi_io_graph, cuts, parts, x), _whole(multi_io_graph, x)):
        assert rel_err(got, expected) < 1e-6


def test_residual_cut_sends_skip_and_branch(resnet_graph):
    analysis, cuts, (p0, p1) = _split(resnet_graph, TWO, ["layer1.conv1"])
    assert len(p1.inputs) == 2
    assert _names(p1.inputs) == _names(cuts[0].crossing) == {"relu", "convolution_1"}
    assert set(p0.nodes) == {"convolution", "_native_batch_norm_legit_no_training", "getitem", "relu", "convolution_1"}


# ------------------------------------------------------------------------------------ structure


def test_tiers_are_tagged_in_order(resnet_graph):
    analysis, cuts, parts = _split(resnet_graph, THREE, ["stem", "layer1"])
    tiers = [n.meta[TIER] for n in analysis.order]
    assert tiers == sorted(tiers)
    assert set(tiers) == {0, 1, 2}
    for k, p in enumerate(parts):
        assert all(resnet_graph.node(name).meta[TIER] == k for name in p.nodes)


def test_partitions_cover_every_placed_op_once(zoo, zoo_name):
    graph = zoo.graph(zoo_name)
    analysis, cuts, parts = _split(graph, THREE)
    placed = [n.name for n in analysis.order if n.op == "call_function"]
    together = [name for p in parts for name in p.nodes]
    assert sorted(together) == sorted(placed)
    assert len(set(together)) == len(together)
    assert all(p.nodes for p in parts)
    assert sum(p.flops for p in parts) <= graph.total_flops


def test_partition_modules_are_self_contained(zoo, zoo_name):
    graph = zoo.graph(zoo_name)
    analysis = CutAnalysis(graph)
    valid = analysis.valid_positions()
    cut = analysis.cut(int(valid[len(valid) // 2]))
    assign_tiers(analysis, [cut])
    source_storage = {t.untyped_storage().data_ptr() for t in graph.module.state_dict().values()}
    for p in extract_partitions(graph, analysis, TWO):
        nodes = list(p.module.graph.nodes)
        # Run-time inputs are exactly the declared tensors; weights are attributes, never placeholders.
        assert [n.name for n in nodes if n.op == "placeholder"] == [t.name for t in p.inputs]
        assert {n.op for n in nodes} <= {"placeholder", "get_attr", "call_function", "output"}
        attrs = [n for n in nodes if n.op == "get_attr"]
        state = p.module.state_dict()
        for node in attrs:
            assert node.target in state, f"{node.target} is not owned by partition {p.index}"
        assert set(state) == {n.target for n in attrs}  # no weight copied that nothing reads
        # Shared, not copied: weights are read-only at inference, and a copy per partition would
        # double a large model's memory (bench/big_model.py).
        assert {t.untyped_storage().data_ptr() for t in state.values()} <= source_storage
        # Every operator it runs is one placed on it, or a constant op on weights (a transpose).
        placed = set(p.nodes)
        for node in nodes:
            if node.op == "call_function" and node.name not in placed:
                assert all(a.op in ("get_attr", "call_function") and a.name not in placed for a in node.all_input_nodes)
                assert all(a.op != "placeholder" for a in node.all_input_nodes)


def test_partition_reexports(multi_io_graph):
    _, _, parts = _split(multi_io_graph, TWO, ["relu"])
    for p in parts:
        program = p.export()
        user_inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        assert len(user_inputs) == len(p.inputs)


def test_partitioning_does_not_modify_the_graph(zoo):
    graph = zoo.graph("resnet_like")
    code = graph.module.code
    names = [n.name for n in graph.module.graph.nodes]
    state = {k: v.clone() for k, v in graph.module.state_dict().items()}
    _split(graph, THREE, ["stem", "layer1"])
    assert graph.module.code == code
    assert [n.name for n in graph.module.graph.nodes] == names
    after = graph.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("where", ["auto", "mid"])
def test_chained_partitions_reproduce_the_model(zoo, zoo_name, where):
    graph = zoo.graph(zoo_name)
    analysis = CutAnalysis(graph)
    if where == "auto":
        cuts = auto_cuts(analysis, TWO, LINK)
    else:
        valid = analysis.valid_positions()
        cuts = [analysis.cut(int(valid[len(valid) // 2]))]
    assert all(c.valid for c in cuts)
    assign_tiers(analysis, cuts)
    parts = extract_partitions(graph, analysis, TWO)
    assert all(p.nodes for p in parts)
    inputs = zoo.inputs(zoo_name)
    expected = _whole(graph, inputs)
    got = _chain(graph, cuts, parts, inputs)
    assert len(got) == len(expected) == len(graph.outputs)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-6
    # ...and the whole graph is the eager model (so the reference itself is meaningful).
    with torch.no_grad():
        eager = zoo.module(zoo_name)(*inputs)
    eager = list(eager) if isinstance(eager, tuple) else [eager]
    for g, e in zip(got, eager):
        assert rel_err(g, e) < 1e-5


def test_three_way_chain_reproduces_the_model(zoo, zoo_name):
    graph = zoo.graph(zoo_name)
    analysis, cuts, parts = _split(graph, THREE)
    assert len(cuts) == 2
    inputs = zoo.inputs(zoo_name)
    for g, e in zip(_chain(graph, cuts, parts, inputs), _whole(graph, inputs)):
        assert rel_err(g, e) < 1e-6
