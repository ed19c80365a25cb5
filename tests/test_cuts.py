"""Cut analysis: what crosses a cut, which cuts are valid, name resolution, and auto placement."""

from __future__ import annotations

import dataclasses
import operator

import numpy as np
import pytest

from splitc.core.errors import CutError
from splitc.core.graph import OUTPUT_BYTES
from splitc.passes.cuts import CutAnalysis, auto_cuts, estimate, resolve_cuts
from splitc.targets import Link, Target, load_target

SLOW = Link("slow", 0.001, 1000.0)     # 1 kbit/s: every byte costs 8 ms
FAST = Link("fast", 1e6, 0.0)          # 1 Tbit/s, no round trip


def _target(name: str, gflops: float, bandwidth_gbs: float) -> Target:
    return Target(name=name, description=name, tier="edge", arch="x86_64", sustained_gflops=gflops,
                  memory_bandwidth_gbs=bandwidth_gbs, memory_gb=1.0, backend="onnxruntime")


EDGE = _target("edge", 1.0, 1.0)
CLOUD = _target("cloud", 1e6, 1e6)


@pytest.fixture(scope="module")
def analysis(resnet_graph) -> CutAnalysis:
    return CutAnalysis(resnet_graph)


def _module_nodes(analysis: CutAnalysis, path: str) -> list:
    """Placed nodes that belong to module `path` (by nn_module_stack), in graph order."""
    def owned(node):
        return any(fqn == path or fqn.startswith(path + ".") for fqn, _ in (node.meta.get("nn_module_stack") or {}).values())
    return [n for n in analysis.order if owned(n)]


def _last_tensor_node(nodes):
    return [n for n in nodes if n.meta.get("val") is not None and hasattr(n.meta["val"], "shape")][-1]


# ------------------------------------------------------------------------------------ crossing sets


def test_cut_inside_residual_block_has_skip_and_branch(analysis):
    block = _module_nodes(analysis, "layer1")
    conv1 = _module_nodes(analysis, "layer1.conv1")
    assert block and conv1
    # After layer1's first convolution: its output (branch) and the block input (skip) are both live.
    cut = analysis.cut(analysis.index[conv1[-1]])
    assert cut.valid, cut.reason
    assert len(cut.crossing) == 2
    block_input = analysis.order[analysis.index[block[0]] - 1]  # the stem's ReLU
    assert {t.name for t in cut.crossing} == {block_input.name, conv1[-1].name}
    assert cut.nbytes == block_input.meta[OUTPUT_BYTES] + conv1[-1].meta[OUTPUT_BYTES]


def test_cut_inside_downsampling_block_has_two_tensors(analysis):
    shortcut = _module_nodes(analysis, "layer2.downsample")
    assert shortcut
    last = _last_tensor_node(shortcut)
    cut = analysis.cut(analysis.index[last])
    assert cut.valid, cut.reason
    assert len(cut.crossing) == 2  # the shortcut's result and the block input the main branch still needs
    assert last.name in {t.name for t in cut.crossing}


def test_cut_at_block_boundary_has_one_tensor(analysis):
    for path in ("stem", "layer1", "layer2"):
        position = analysis.resolve(path)
        cut = analysis.cut(position)
        assert cut.valid, cut.reason
        assert [t.name for t in cut.crossing] == [cut.after], path
        assert cut.nbytes == analysis.order[position].meta[OUTPUT_BYTES]


def test_crossing_bytes_match_cuts_at_every_valid_position(zoo, zoo_name):
    analysis = CutAnalysis(zoo.graph(zoo_name))
    sweep = analysis.crossing_bytes()
    valid = analysis.valid_positions()
    assert len(sweep) == len(analysis.order)
    assert len(valid) >= 3
    for p in valid:
        cut = analysis.cut(int(p))
        assert cut.valid, (p, cut.reason)
        assert sweep[p] == cut.nbytes, f"{zoo_name}: position {p} ({cut.after})"
        # Brute force: every node at or before p that has a reader after p (or is a model output).
        live = [n for n in analysis.order[: p + 1]
                if any(u.op == "output" or analysis.index.get(u, -1) > p for u in n.users)]
        assert [t.name for t in cut.crossing] == [n.name for n in live]


def test_valid_positions_agree_with_cut(zoo, zoo_name):
    analysis = CutAnalysis(zoo.graph(zoo_name))
    valid = set(int(p) for p in analysis.valid_positions())
    for p in range(len(analysis.order)):
        assert analysis.cut(p).valid == (p in valid), f"{zoo_name}: position {p} ({analysis.order[p].name})"


def test_cut_after_tuple_producing_op_is_invalid(analysis):
    batch_norms = [n for n in analysis.order if "_native_batch_norm_legit_no_training" in str(n.target)]
    assert len(batch_norms) == 6
    for node in batch_norms:
        cut = analysis.cut(analysis.index[node])
        assert not cut.valid
        assert node.name in cut.reason and "getitem" in cut.reason
        assert analysis.index[node] not in analysis.valid_positions()
        # ...while the getitem reading it is a fine place to cut.
        (reader,) = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        assert analysis.cut(analysis.index[reader]).valid


def test_cut_after_input_or_last_op_is_invalid(analysis):
    first = analysis.cut(0)
    assert analysis.order[0].op == "placeholder"
    assert not first.valid and "model input" in first.reason
    last = analysis.cut(analysis.last_op)
    assert not last.valid and "last operator" in last.reason


# ------------------------------------------------------------------------------------ resolution


def test_resolve_node_name(analysis):
    for position in (1, 7, len(analysis.order) - 1):
        assert analysis.resolve(analysis.order[position].name) == position


def test_resolve_module_path_cuts_after_its_last_node(analysis):
    layer1 = _module_nodes(analysis, "layer1")
    assert analysis.resolve("layer1") == analysis.index[layer1[-1]]
    assert analysis.resolve("layer2.downsample") == analysis.index[_module_nodes(analysis, "layer2.downsample")[-1]]
    # A path is a prefix by component: "layer1" must not also take "layer10...", and "layer" names nothing.
    with pytest.raises(CutError):
        analysis.resolve("layer")


def test_resolve_unknown_name(analysis):
    with pytest.raises(CutError, match="no_such_node"):
        analysis.resolve("no_such_node")


def test_resolve_cuts_validates(analysis):
    two = [load_target("rpi4"), load_target("a100")]
    three = [load_target("rpi4"), load_target("cloud-cpu"), load_target("a100")]
    (cut,) = resolve_cuts(analysis, ["layer1"], two)
    assert cut.position == analysis.resolve("layer1")
    with pytest.raises(CutError, match="need 1 cut"):
        resolve_cuts(analysis, ["stem", "layer1"], two)
    with pytest.raises(CutError, match="need 2 cut"):
        resolve_cuts(analysis, ["layer1"], three)
    with pytest.raises(CutError, match="graph order"):
        resolve_cuts(analysis, ["layer2", "layer1"], three)
    with pytest.raises(CutError, match="graph order"):
        resolve_cuts(analysis, ["layer1", "layer1"], three)
    # A tuple-valued op named as a cut means its tensor output: the getitem of its first element.
    batch_norm = next(n for n in analysis.order if "batch_norm" in str(n.target))
    (cut,) = resolve_cuts(analysis, [batch_norm.name], two)
    reader = analysis.order[cut.position]
    assert reader.args == (batch_norm, 0) and [t.name for t in cut.crossing] == [reader.name]
    cuts = resolve_cuts(analysis, ["stem", "layer1"], three)
    assert [c.position for c in cuts] == [analysis.resolve("stem"), analysis.resolve("layer1")]


# ------------------------------------------------------------------------------------ auto cuts


def test_auto_cut_on_slow_link_minimises_bytes(analysis):
    (cut,) = auto_cuts(analysis, [EDGE, CLOUD], SLOW)
    valid = analysis.valid_positions()
    sweep = analysis.crossing_bytes()
    assert cut.valid
    assert cut.nbytes == sweep[valid].min()
    # The smallest cut is far from the largest: the choice is not a tie the test cannot see.
    assert sweep[valid].max() > 10 * cut.nbytes


def test_auto_cut_on_fast_link_with_fast_cloud_is_early(analysis):
    (fast,) = auto_cuts(analysis, [EDGE, CLOUD], FAST)
    (slow,) = auto_cuts(analysis, [EDGE, CLOUD], SLOW)
    valid = analysis.valid_positions()
    assert fast.valid
    assert fast.position == valid[0]
    assert fast.position < slow.position
    assert fast.nbytes > slow.nbytes


def test_auto_cut_is_the_cheapest_estimate(analysis):
    targets = [load_target("rpi4"), load_target("a100")]
    link = Link("4g", 5.85, 50.0)
    (best,) = auto_cuts(analysis, targets, link)
    best_ms = estimate(analysis, [best], targets, link).total_ms
    every = [estimate(analysis, [c], targets, link).total_ms for c in analysis.candidates()]
    assert best_ms == pytest.approx(min(every), rel=1e-9)


def test_three_targets_give_two_increasing_cuts(zoo, zoo_name):
    analysis = CutAnalysis(zoo.graph(zoo_name))
    mid = _target("mid", 30.0, 30.0)
    cuts = auto_cuts(analysis, [EDGE, mid, CLOUD], Link("lan", 100.0, 1.0))
    assert len(cuts) == 2
    assert all(c.valid for c in cuts)
    assert cuts[0].position < cuts[1].position
    # The chosen pair is the cheapest pair (brute force over all ordered pairs of candidates).
    candidates = analysis.candidates()
    targets, link = [EDGE, mid, CLOUD], Link("lan", 100.0, 1.0)
    best = min(
        estimate(analysis, [a, b], targets, link).total_ms
        for i, a in enumerate(candidates) for b in candidates[i + 1:]
    )
    assert estimate(analysis, cuts, targets, link).total_ms == pytest.approx(best, rel=1e-9)


def test_one_target_needs_no_cut(analysis):
    assert auto_cuts(analysis, [EDGE], SLOW) == []


def test_too_many_targets_for_the_graph(tmp_path):
    import torch

    from splitc.frontend import import_model
    from tests.models import save_pt2

    tiny = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    _, graph = import_model(save_pt2(tiny, (torch.randn(1, 4),), tmp_path / "tiny.pt2"))
    analysis = CutAnalysis(graph)
    valid = len(analysis.valid_positions())
    with pytest.raises(CutError, match="valid cut position"):
        auto_cuts(analysis, [dataclasses.replace(EDGE, name=f"t{i}") for i in range(valid + 2)], SLOW)


def test_estimate_adds_compute_and_transfer(analysis):
    cut = analysis.cut(analysis.resolve("layer1"))
    est = estimate(analysis, [cut], [EDGE, CLOUD], SLOW)
    assert est.transfer_ms == (pytest.approx(SLOW.rtt_ms + cut.nbytes * 8 / (SLOW.mbit_s * 1e6) * 1e3),)
    assert est.total_ms == pytest.approx(sum(est.tier_ms) + sum(est.transfer_ms))
    assert np.all(np.array(est.tier_ms) > 0)
