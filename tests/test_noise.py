"""Noise layers: the noise is a model input the runtime draws (never baked into the artifact),
verify runs with the reference's seeded noise, and the graph pass inserts exactly what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitc.drivers.compiler import compile_model

from splitc.passes.contract import CompileOptions
from splitc.core.errors import CutError, InputError, PlanError
from splitc.passes.cuts import CutAnalysis
from splitc.passes.noise import add_noise, choose_sigma, noise_trial
from splitc.runtime import Bundle, SplitSession
from splitc.core.manifest import read_manifest
from splitc.runtime.session import secure_normal
from splitc.targets import load_link, load_targets
from splitc.drivers.verify import verify_bundle
from tests.test_cli import run_cli


def test_noise_pass_adds_an_input_and_sends_the_noisy_tensor(zoo):
    graph = zoo.graph("resnet_like")
    analysis = CutAnalysis(graph)
    cut = next(c for c in analysis.candidates() if len(c.crossing) == 2)
    samples = [zoo.inputs("resnet_like")] * 4
    noisy, new_cut, layers = add_noise(graph, cut.after, 0.5, samples)
    assert len(graph.inputs) == 1 and len(noisy.inputs) == 3  # graph in, graph out
    assert {layer.tensor for layer in layers} == {t.name for t in cut.crossing}
    assert [t.name for t in noisy.inputs[1:]] == [layer.noise_input for layer in layers]
    after = CutAnalysis(noisy)
    assert {t.name for t in after.cut(after.resolve(new_cut)).crossing} == {layer.noisy for layer in layers}
    x = zoo.inputs("resnet_like")[0]
    with torch.no_grad():
        clean = graph.module(x)[0]
        zeros = noisy.module(x, *(torch.zeros(layer.shape) for layer in layers))[0]
        noised = noisy.module(x, *(torch.randn(layer.shape) for layer in layers))[0]
    assert torch.allclose(zeros, clean, atol=1e-6)  # zero noise: the original model
    assert not torch.allclose(noised, clean, atol=1e-3)
    from splitc.passes.quantize import observe

    stds = observe(graph, [layer.tensor for layer in layers], samples)
    assert all(layer.scale == pytest.approx(0.5 * stds[layer.tensor].std) and layer.scale > 0 for layer in layers)


def test_runtime_draws_fresh_noise_and_verify_uses_the_seeded_reference(zoo, tmp_path):
    graph = zoo.graph("resnet_like")
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut="auto", link=load_link("4g"), samples=2, noise=1.0, quantize="int8"), tmp_path / "n.splitc")
    manifest = result.manifest
    generated = manifest.model["generated_inputs"]
    assert set(generated) == {layer["noise_input"] for layer in manifest.plan["noise"]["layers"]}
    assert verify_bundle(result.bundle).ok
    session = SplitSession(Bundle.open(result.bundle))
    x = zoo.inputs("resnet_like")[0].numpy()
    first, second = (session.run([x])[manifest.outputs[0].name] for _ in range(2))
    assert not np.array_equal(first, second)  # a fresh draw per request
    supplied = {name: np.zeros(spec.shape, np.float32) for name, spec in ((s.name, s) for s in manifest.inputs) if name in generated}
    quiet = [session.run({manifest.inputs[0].name: x, **supplied})[manifest.outputs[0].name] for _ in range(2)]
    assert np.array_equal(quiet[0], quiet[1])  # the artifact itself is deterministic


def test_secure_normal_is_standard_normal():
    draws = secure_normal((200_000,))
    assert draws.dtype == np.float32 and abs(float(draws.mean())) < 0.02 and abs(float(draws.std()) - 1) < 0.02
    assert not np.array_equal(secure_normal((8,)), secure_normal((8,)))


def test_noise_must_be_positive(zoo):
    graph = zoo.graph("resnet_like")
    cut = CutAnalysis(graph).candidates()[3].after
    with pytest.raises(CutError, match="positive"):
        add_noise(graph, cut, 0.0, [zoo.inputs("resnet_like")])


# ------------------------------------------------------------------------- choosing σ on real data


def test_noise_trial_trades_leakage_for_accuracy(digits_split):
    graph, samples, labels = digits_split["graph"], digits_split["samples"][:200], digits_split["labels"][:200]
    low, high = (noise_trial(graph, "relu", sigma, samples, labels) for sigma in (0.1, 4.0))
    assert high.leakage < low.leakage - 0.2  # more noise, less of the input in what is sent
    assert high.drop_points > low.drop_points + 10  # ... and less accuracy: the model was not trained with it
    assert 0.0 <= high.accuracy <= 1.0 and abs(low.drop_points) < 3


def test_noise_auto_picks_the_least_sigma_meeting_the_target(digits_split, tmp_path):
    graph, samples, labels = digits_split["graph"], digits_split["samples"][:200], digits_split["labels"][:200]
    chosen, trials = choose_sigma(graph, "relu", samples, labels, max_leakage=0.8, max_drop_points=100)
    assert chosen.leakage <= 0.8 and all(t.leakage > 0.8 for t in trials[:-1]) and trials[-1] == chosen
    with pytest.raises(PlanError, match=r"costs .* accuracy points"):
        choose_sigma(graph, "relu", samples, labels, max_leakage=0.8, max_drop_points=chosen.drop_points / 2)
    with pytest.raises(PlanError, match="even σ"):
        choose_sigma(graph, "relu", samples, labels, max_leakage=0.01, max_drop_points=100, grid=(0.1, 0.2))


def test_cli_refuses_noise_that_costs_too_much_accuracy(digits_split, tmp_path, capsys):
    common = ["compile", digits_split["pt2"], "--targets", "x86,cloud-cpu", "--cut", "relu", "--calib", digits_split["root"] / "calib.npz"]
    code, _, err = run_cli(*common, "--noise", "3", "-o", tmp_path / "a", capsys=capsys)
    assert code == PlanError.exit_code and "--noise 3 costs" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(*common, "--noise", "auto", "-o", tmp_path / "b", capsys=capsys)
    assert code == PlanError.exit_code and "--noise auto" in err and "accuracy points" in err, err
    code, _, err = run_cli("compile", digits_split["pt2"], "--targets", "x86,cloud-cpu", "--cut", "relu", "--noise", "auto",
                           "-o", tmp_path / "c", capsys=capsys)
    assert code == InputError.exit_code and "--calib" in err, err
    assert not any((tmp_path / name).exists() for name in "abc")
    code, out, err = run_cli(*common, "--noise", "auto", "--max-leakage", "0.9", "--max-accuracy-drop", "100", "-o", tmp_path / "d",
                             capsys=capsys)
    assert code == 0, err
    record = read_manifest(tmp_path / "d").plan["noise"]
    assert record["auto"]["chosen"]["leakage"] <= 0.9 and record["sigma"] == record["auto"]["chosen"]["sigma"]
    assert "noise auto: σ=" in out


def test_noise_leaves_attention_masks_alone(tmp_path):
    """A BERT layer sends its additive attention mask (0 / -3.4e38, built from the integer mask
    input) beside the hidden states: only the hidden states get noise, at a finite scale."""
    transformers = pytest.importorskip("transformers")
    from splitc.frontend import import_model

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(config).eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0, :4]

    ids = torch.randint(0, 100, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    torch.export.save(torch.export.export(Classifier(), (ids, mask)), tmp_path / "bert.pt2")
    _, graph = import_model(tmp_path / "bert.pt2")
    analysis = CutAnalysis(graph)
    cut = analysis.cut(analysis.resolve("bert.encoder.layer.0"))
    floats = {t.name for t in cut.crossing if t.dtype.startswith("float")}
    assert len(floats) >= 2, f"expected the hidden states and the float mask to cross, got {floats}"
    noisy, _, layers = add_noise(graph, cut.after, 1.0, [(ids, mask)])
    noised = {layer.tensor for layer in layers}
    assert noised and noised < floats
    assert all(np.isfinite(layer.scale) and 0 < layer.scale < 1e3 for layer in layers)
    with torch.no_grad():
        out = noisy.module(ids, mask, *(torch.randn(layer.shape) for layer in layers))
    assert torch.isfinite(out[0] if isinstance(out, (tuple, list)) else out).all()
