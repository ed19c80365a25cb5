"""Activation quantizers at the cut: structure (what is inserted where), numerics against the
float graph, and the compiled artifacts verified bit-for-bit against torch with the same Q/DQ."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from splitc.drivers.compiler import compile_model

from splitc.passes.contract import CompileOptions
from splitc.core.errors import CutError
from splitc.passes.cuts import CutAnalysis
from splitc.core.graph import returning
from splitc.passes.quantize import affine_params, agreement, quantize_cuts
from splitc.targets import load_link, load_targets
from splitc.drivers.verify import verify_bundle


def samples_for(zoo, name, count=8):
    generator = torch.Generator().manual_seed(0)
    base = zoo.inputs(name)
    return [tuple(torch.randn(t.shape, generator=generator) if t.is_floating_point() else t for t in base) for _ in range(count)]


def skip_cut(graph):
    analysis = CutAnalysis(graph)
    return next(c for c in analysis.candidates() if len(c.crossing) == 2)


@pytest.mark.parametrize("scheme, bits", [("int8", 8), ("int4", 4)])
def test_quantizers_replace_every_float_tensor_at_the_cut(zoo, scheme, bits):
    graph = zoo.graph("resnet_like")
    cut = skip_cut(graph)  # inside a residual block: the branch and the skip tensor both cross
    nodes_before = len(graph.module.graph.nodes)
    quantized, (new_cut,), inserted = quantize_cuts(graph, [cut.after], scheme, samples_for(zoo, "resnet_like"))
    assert len(graph.module.graph.nodes) == nodes_before  # graph in, graph out
    assert {q.tensor for q in inserted} == {t.name for t in cut.crossing}
    analysis = CutAnalysis(quantized)
    crossing = analysis.cut(analysis.resolve(new_cut)).crossing
    assert {t.name for t in crossing} == {f"{t.name}_q{bits}" for t in cut.crossing}
    assert all(t.dtype == "uint8" for t in crossing)
    assert sum(t.nbytes for t in crossing) * (32 // bits) == cut.nbytes
    code = quantized.module.code
    for q in inserted:
        assert f"{q.tensor}_dq" in code
        # Past the cut nothing reads the float tensor any more: only its quantizer does.
        readers = {u.name for u in next(n for n in quantized.module.graph.nodes if n.name == q.tensor).users}
        positions = {n.name: i for i, n in enumerate(analysis.order)}
        assert all(positions.get(r, -1) <= positions[new_cut] for r in readers)


def test_dequantized_values_are_within_half_a_step(zoo):
    graph = zoo.graph("depthwise_bn")
    analysis = CutAnalysis(graph)
    cut = analysis.candidates()[len(analysis.candidates()) // 2]
    samples = samples_for(zoo, "depthwise_bn")
    quantized, _, inserted = quantize_cuts(graph, [cut.after], "int8", samples)
    seen: dict[str, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            seen[node.name] = value
            return value

    with torch.no_grad():
        Capture(quantized.module).run(*samples[0])
    for q in inserted:
        error = (seen[q.received] - seen[q.tensor]).abs().max()
        assert float(error) <= q.scale / 2 * 1.001


@pytest.mark.parametrize("name", ["resnet_like", "depthwise_bn", "transformer_block", "hf_resnet"])
def test_int8_keeps_top1_and_int4_stays_close(zoo, name):
    graph = zoo.graph(name)
    analysis = CutAnalysis(graph)
    cut = analysis.candidates()[len(analysis.candidates()) // 2]
    samples = samples_for(zoo, name, 16)
    int8 = agreement(graph, quantize_cuts(graph, [cut.after], "int8", samples)[0], samples)
    int4 = agreement(graph, quantize_cuts(graph, [cut.after], "int4", samples)[0], samples)
    assert int8["top1_agreement"] >= 0.99 and int8["max_rel_err"] < 0.05
    assert int4["max_rel_err"] > int8["max_rel_err"]  # fewer levels, larger error: the pass is really quantizing
    assert int4["max_rel_err"] < 0.5


def test_int4_refuses_an_odd_tensor():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 7), torch.nn.Linear(7, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    from splitc.frontend import build_graph
    from splitc.frontend.loader import LoadedModel

    x = torch.randn(1, 4)
    graph = build_graph(LoadedModel(torch.export.export(Odd().eval(), (x,)), "odd", "odd", "0" * 64, None))
    with pytest.raises(CutError, match="int4 packs two values per byte.*7 elements"):
        quantize_cuts(graph, ["relu"], "int4", [(x,)])


def test_affine_params_cover_the_range_and_zero():
    scale, zero_point = affine_params(-1.0, 3.0, 8)
    assert scale == pytest.approx(4.0 / 255) and zero_point == round(1.0 / scale)
    assert affine_params(0.5, 2.0, 8)[1] == 0  # the range is widened to include 0: ReLU outputs
    assert affine_params(0.0, 0.0, 4) == (1.0, 0)


@pytest.mark.parametrize("scheme, chain", [("int8", "rpi4,a100"), ("int4", "x86,cloud-cpu")])
def test_quantized_bundle_verifies_and_sends_fewer_bytes(zoo, tmp_path, scheme, chain):
    graph = zoo.graph("resnet_like")
    cut = skip_cut(graph)
    result = compile_model(graph, CompileOptions(load_targets(chain), cut=cut.after, link=load_link("4g"), samples=3, quantize=scheme), tmp_path / "q.splitc")
    record = result.manifest.plan["quantization"]
    assert record["bytes_sent"][0] * (32 // int(scheme[3:])) == record["bytes_float"][0] == cut.nbytes
    assert all(t.dtype == "uint8" for t in result.manifest.boundaries[0])
    report = verify_bundle(result.bundle)
    assert report.ok, [(c.name, c.status, c.max_rel_err, c.note) for c in report.checks]


def test_per_channel_steps_follow_each_channel_and_beat_per_tensor(zoo):
    """Channels of very different ranges: per-channel parameters give each its own step, so the
    error of every channel stays within half of its own step, and the total error falls."""
    graph = zoo.graph("depthwise_bn")
    analysis = CutAnalysis(graph)
    cut = next(c for c in analysis.candidates() if len(c.crossing) == 1 and len(c.crossing[0].shape) == 4)
    samples = samples_for(zoo, "depthwise_bn")
    errors = {}
    for per_channel in (False, True):
        quantized, _, (q,) = quantize_cuts(graph, [cut.after], "int4", samples, per_channel=per_channel)
        capture = returning(quantized.module, [q.tensor, q.received])
        with torch.no_grad():
            _, clean, restored = capture(*samples[0])
        errors[per_channel] = float((restored - clean).norm() / clean.norm())
        if per_channel:
            assert q.axis == 1 and len(q.scale) == q.shape[1] == len(q.zero_point)
            step = torch.tensor(q.scale).reshape(1, -1, 1, 1)
            assert bool(((restored - clean).abs() <= step / 2 * 1.001).all())
            assert len(set(q.scale)) > 1  # the channels really got different steps
    assert errors[True] < errors[False]


def test_per_channel_bundle_verifies_bit_exactly(zoo, tmp_path):
    graph = zoo.graph("resnet_like")
    cut = skip_cut(graph)
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut=cut.after, link=load_link("4g"), samples=3, quantize="int8", per_channel=True), tmp_path / "qc.splitc")
    record = result.manifest.plan["quantization"]
    assert record["granularity"] == "channel" and all(isinstance(t["scale"], list) for t in record["tensors"])
    report = verify_bundle(result.bundle, emulate=False)
    assert report.ok, [(c.name, c.status, c.max_rel_err, c.note) for c in report.checks]
