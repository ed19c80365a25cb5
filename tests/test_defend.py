"""`--defend` (passes/defend.py): the defence lowers leakage at the cut and keeps accuracy.

The model is the digits CNN of tests/conftest.py (trained on 900 digits); the defence fine-tunes on
the 600 calibration digits and is judged on the 297 unseen ones, by figures this test measures itself
(not the defence's own record): bias-corrected dCor between the input and what crosses the cut, and
top-1 accuracy. Both can fail: a defence that does nothing keeps dCor, one that wrecks the model
loses accuracy.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from splitc.core.errors import InputError, PlanError
from splitc.core.graph import returning
from splitc.passes.contract import CompileData, CompileOptions, PassContext
from splitc.passes.cuts import CutAnalysis
from splitc.passes.pipeline import describe
from splitc.targets import load_link, load_targets
from splitc.passes.defend import DefendPass, defend
from splitc.passes.privacy import distance_correlation
from tests.test_cli import run_cli

CUT = "conv2"
BUDGET = 2.0   # points; 297 unseen digits resolve a third of a point


def _figures(graph, x: np.ndarray, y: np.ndarray, cut: str = CUT) -> tuple[float, float]:
    """(top-1, bias-corrected dCor(input, what crosses)) on unseen digits, with the graph's own code."""
    analysis = CutAnalysis(graph)
    sent = [n.name for n in analysis.crossing_nodes(analysis.resolve(cut))]
    module = returning(graph.module, sent)
    with torch.no_grad():
        # Fresh row-major strides: numpy's stride of a size-1 channel dim can read as channels-last to the conv.
        xs = torch.from_numpy(x).clone(memory_format=torch.contiguous_format)
        outs = [module(xs[i:i + 1]) for i in range(len(x))]
    accuracy = float(np.mean([int(o[0].argmax()) == t for o, t in zip(outs, y)]))
    features = np.stack([torch.cat([t.reshape(-1) for t in o[1:]]).numpy() for o in outs])
    return accuracy, distance_correlation(x.reshape(len(x), -1), features[:, :], bias_corrected=True)


@pytest.fixture(scope="module")
def defended(digits_split):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = defend(digits_split["graph"], CUT, "nopeek", digits_split["samples"], digits_split["labels"], BUDGET,
                        strengths=[4.0], epochs=25, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    return result


def test_nopeek_lowers_leakage_and_keeps_accuracy_on_unseen_digits(digits_split, defended):
    x, y = digits_split["test_x"], digits_split["test_y"]
    accuracy_before, dcor_before = _figures(digits_split["graph"], x, y)
    accuracy_after, dcor_after = _figures(defended.graph, x, y)
    assert dcor_after < dcor_before - 0.1, f"dCor {dcor_before:.3f} -> {dcor_after:.3f}"
    assert 100 * (accuracy_before - accuracy_after) <= BUDGET + 1.0, f"top-1 {accuracy_before:.3f} -> {accuracy_after:.3f}"
    record = defended.record
    assert record["method"] == "nopeek" and record["strength"] == 4.0
    assert record["dcor_after"] < record["dcor_before"] and record["drop_points"] <= BUDGET
    assert record["trials"][0]["training"]["epochs"] >= 1 and record["training_seconds"] > 0


def test_defended_graph_keeps_every_node_and_changes_only_weights(digits_split, defended):
    before, after = digits_split["graph"], defended.graph
    assert [n.name for n in before.module.graph.nodes] == [n.name for n in after.module.graph.nodes]
    assert after.inputs == before.inputs and after.outputs == before.outputs
    old, new = dict(before.module.named_parameters()), dict(after.module.named_parameters())
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    # The original graph is untouched (graph in, graph out).
    assert all(not p.requires_grad or p.grad is None for p in old.values())
    CutAnalysis(after).resolve(CUT)   # the cut the user named still resolves


def test_unmeetable_budgets_are_refused_with_the_best_found(digits_split):
    graph, samples, labels = digits_split["graph"], digits_split["samples"], digits_split["labels"]
    with pytest.raises(PlanError, match=r"best found nopeek 0\.5: dCor 0\.\d+ for -\d"):
        defend(graph, CUT, "nopeek", samples, labels, 5.0, max_leakage=0.01, strengths=[0.5], epochs=2)
    with pytest.raises(PlanError, match=r"even the weakest strength 8 costs \d+\.\d accuracy points"):
        defend(graph, "conv1", "noise-aware", samples, labels, 0.0, strengths=[8.0], epochs=1)


def test_bad_requests_are_input_errors(digits_split):
    graph = digits_split["graph"]
    with pytest.raises(InputError, match="pass --calib"):
        defend(graph, CUT, "nopeek", None)
    with pytest.raises(InputError, match="choose one of nopeek, adversarial, noise-aware"):
        defend(graph, CUT, "dropout", digits_split["samples"])
    options = CompileOptions(load_targets("x86,x86"), load_link("4g"), cut=CUT, defend="nopeek")
    analysis = CutAnalysis(graph)
    with pytest.raises(InputError, match="pass --calib"):
        DefendPass().run(graph, [analysis.cut(analysis.resolve(CUT))], options, PassContext(CompileData()))
    assert DefendPass().applies(options) and not DefendPass().applies(replace(options, defend=None))
    assert "defend" in describe(options) and "defend (off)" in describe(replace(options, defend=None))


def test_cli_defend_without_calibration_is_one_line(digits_split, tmp_path, capsys):
    code, _, err = run_cli("compile", digits_split["pt2"], "--targets", "rpi4,a100", "--cut", CUT, "--defend", "nopeek",
                           "-o", tmp_path / "b.splitc", capsys=capsys)
    err = err.strip()
    assert code == 7 and "--defend nopeek fine-tunes the model on data: pass --calib" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.splitc").exists()


@pytest.mark.slow
def test_compile_with_defence_records_it_and_verifies(digits_split, tmp_path, capsys):
    from splitc.core.manifest import read_manifest
    from splitc.drivers.verify import verify_bundle

    out = tmp_path / "defended.splitc"
    code, _, err = run_cli("compile", digits_split["pt2"], "--targets", "x86,x86", "--cut", CUT, "--calib",
                           digits_split["root"] / "calib.npz", "--defend", "noise-aware", "--max-accuracy-drop", "8", "-o", out, capsys=capsys)
    assert code == 0, err
    manifest = read_manifest(out)
    record = manifest.plan["defence"]
    assert record["method"] == "noise-aware" and record["drop_points"] <= 8
    assert manifest.plan["noise"]["sigma"] == record["strength"]    # the runtime adds the noise it trained under
    json.dumps(manifest.plan)
    assert verify_bundle(out, emulate=False).ok


@pytest.mark.slow
def test_audit_defend_attacks_the_defended_model_with_fresh_attackers(digits_split, tmp_path, capsys):
    """`splitc audit --defend`: report.json holds before/after figures from attackers trained on each model,
    the curves of noise alone and of the defence, and defence.png is written."""
    report = tmp_path / "audit"
    code, out, err = run_cli("audit", digits_split["pt2"], "--cut", CUT, "--calib", digits_split["root"] / "calib.npz",
                             "--defend", "noise-aware", "--max-accuracy-drop", "5", "--epochs", "40", "--whitebox-steps", "50",
                             "--report", report, capsys=capsys)
    assert code == 0, err
    data = json.loads((report / "report.json").read_text())
    assert data["schema"] == "splitc.drivers.defend_audit/1" and "fresh" in data["attackers"]
    entry = data["defences"][0]
    assert entry["defence"]["method"] == "noise-aware" and entry["before"]["setting"] == "plain"
    assert entry["after"]["setting"].startswith("defended: noise-aware")
    # Noise σ >= 0.5 at the cut, read by a fresh inverse network: re-identification falls.
    assert entry["after"]["inverse"]["reid_top1"] < entry["before"]["inverse"]["reid_top1"]
    assert entry["before"]["inverse"]["floors"]["data_mean"]["ssim"] > 0
    assert len(entry["curves"]["noise"]) >= 3 and len(entry["curves"]["defence"]) >= 1
    assert (report / "defence.png").stat().st_size > 10_000
    assert "wrote" in out
