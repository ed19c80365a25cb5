"""Noise layers: the noise is a model input the runtime draws (never baked into the artifact),
verify runs with the reference's seeded noise, and the graph pass inserts exactly what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitc.compiler import compile_model
from splitc.errors import CutError
from splitc.passes.cuts import CutAnalysis
from splitc.passes.noise import add_noise
from splitc.runtime import Bundle, SplitSession
from splitc.runtime.session import secure_normal
from splitc.targets import load_link, load_targets
from splitc.verify import verify_bundle


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
    result = compile_model(graph, load_targets("x86,cloud-cpu"), tmp_path / "n.splitc", cut="auto", link=load_link("4g"),
                           samples=2, noise=1.0, quantize="int8")
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
