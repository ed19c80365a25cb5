"""Extending splitc the way the house rules promise: a backend is one module plus one registration,
a pass is one object plus one entry in the pipeline. Both are defined inside these tests, and both
go through the real compile, verify and runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from splitc.backends.base import CompiledArtifact, CompiledPartition
from splitc.backends.registry import BackendRecord, backend_record, registered_backend
from splitc.core.errors import TargetError
from splitc.core.graph import ModelGraph, tensor_spec
from splitc.core.manifest import ROLE_DEPLOY
from splitc.drivers.compiler import compile_model
from splitc.drivers.verify import verify_bundle
from splitc.frontend.annotate import annotate
from splitc.passes.contract import CompileOptions, PassContext, PassOutput
from splitc.passes.cuts import Cut
from splitc.passes.pipeline import DEFAULT_PIPELINE
from splitc.passes.quantize import emit
from splitc.runtime import Bundle, SplitSession
from splitc.runtime.executors import RuntimeRecord, registered_runtime
from splitc.targets import load_link, load_target, load_targets
from tests.models import rel_err

aten = torch.ops.aten

TOY_TARGET = """
name = "toy-device"
description = "a device that runs torch.export programs (a toy backend for tests)"
tier = "edge"
arch = "x86_64"
[compute]
sustained_gflops = 5.0
memory_bandwidth_gbs = 4.0
memory_gb = 2.0
[backend]
name = "torch-export"
"""


# --------------------------------------------------------------------------- a toy backend

class TorchExportBackend:
    """Deploys a partition as a torch.export archive, run by torch: one module, one record."""

    id = "torch-export"

    def supports(self, node) -> bool:
        return True

    def compile(self, partition, workdir: Path) -> CompiledPartition:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "partition.pt2"
        torch.export.save(partition.export(), path)
        return CompiledPartition([CompiledArtifact(path, runtime="torch-export", role=ROLE_DEPLOY)])


def load_torch_export(path: Path, artifact, threads: int):
    module = torch.export.load(path).module()

    def run(inputs):
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [t.numpy() for t in out]

    return run


TOY_RUNTIME = RuntimeRecord("torch-export", load_torch_export, needs_torch=True)
TOY_BACKEND = BackendRecord("torch-export", TorchExportBackend, runtime="torch-export", deploy_isas=("x86_64",),
                            description="torch.export archive run by torch")


@pytest.fixture
def toy_target(tmp_path):
    path = tmp_path / "toy-device.toml"
    path.write_text(TOY_TARGET)
    return load_target(str(path))


def test_a_backend_defined_here_compiles_verifies_and_runs(zoo, toy_target, tmp_path):
    graph = zoo.graph("resnet_like")
    with registered_runtime(TOY_RUNTIME), registered_backend(TOY_BACKEND):
        assert backend_record("torch-export").runtime_needs_torch  # the capability comes from its runtime
        result = compile_model(graph, CompileOptions([toy_target, load_target("cloud-cpu")], load_link("4g"), cut="layer1", samples=2),
                               tmp_path / "toy.splitc")
        device, cloud = result.manifest.partitions
        assert (device.backend, [a.runtime for a in device.artifacts]) == ("torch-export", ["torch-export"])
        assert cloud.backend == "onnxruntime"
        report = verify_bundle(result.bundle)
        assert report.ok and report.checks[0].mode == "native", [(c.name, c.status, c.note) for c in report.checks]
        session = SplitSession(Bundle.open(result.bundle))
        got = session.run([t.numpy() for t in zoo.inputs("resnet_like")])
    with torch.no_grad():
        expected = zoo.module("resnet_like")(*zoo.inputs("resnet_like"))
    assert rel_err(torch.from_numpy(got[result.manifest.outputs[0].name]), expected) < 1e-5
    # Registration lasts for the block only: outside it the id is unknown again, and says which are known.
    with pytest.raises(TargetError, match="supported backends: tvm, onnxruntime, tensorrt"):
        compile_model(graph, CompileOptions([toy_target, load_target("cloud-cpu")], load_link("4g"), cut="layer1"), tmp_path / "gone.splitc")
    assert not (tmp_path / "gone.splitc").exists()


# --------------------------------------------------------------------------- a toy pass

class HalfPrecisionPass:
    """Sends float tensors across the first cut as float16: a cast before the cut, one back after it."""

    name = "half"
    record_key = "half_precision"

    def applies(self, options: CompileOptions) -> bool:
        return True

    def run(self, graph: ModelGraph, cuts: list[Cut], options: CompileOptions, context: PassContext) -> PassOutput:
        module = copy.deepcopy(graph.module)
        analysis = context.analysis(graph)
        first = cuts[0]
        order = {n.name: i for i, n in enumerate(module.graph.nodes)}
        anchor = next(n for n in module.graph.nodes if n.name == first.after)
        crossing = [n for n in module.graph.nodes if n.name in {t.name for t in first.crossing}]
        later = {n for n in module.graph.nodes if n.op == "output" or
                 (n.name in analysis.by_name and analysis.by_name[n.name] > first.position)}
        halves = []
        for node in crossing:
            anchor = emit(module.graph, anchor, aten._to_copy.default, node, dtype=torch.float16, name=f"{node.name}_f16")
            halves.append((node, anchor))
        cut_after = anchor
        for node, half in halves:
            anchor = back = emit(module.graph, anchor, aten._to_copy.default, half, dtype=torch.float32)
            for user in list(node.users):
                if user in later and user is not half:
                    user.replace_input_with(node, back)
        assert order  # the original graph is untouched: we worked on a copy
        module.graph.lint()
        module.recompile()
        annotate(module)
        output = next(n for n in module.graph.nodes if n.op == "output")
        outputs = tuple(tensor_spec(n, spec.name) for n, spec in zip(output.args[0], graph.outputs))
        changed = ModelGraph(graph.name, module, graph.inputs, outputs, graph.source_sha256, graph.source)
        return PassOutput(changed, [cut_after.name] + [c.after for c in cuts[1:]], {"bytes_before": first.nbytes})


def test_a_pass_defined_here_runs_in_the_pipeline(zoo, tmp_path):
    graph = zoo.graph("resnet_like")
    chain = load_targets("x86,cloud-cpu")
    plain = compile_model(graph, CompileOptions(chain, load_link("4g"), cut="layer1", samples=2), tmp_path / "plain.splitc")
    options = CompileOptions(chain, load_link("4g"), cut="layer1", samples=2, pipeline=(*DEFAULT_PIPELINE, HalfPrecisionPass()))
    half = compile_model(graph, options, tmp_path / "half.splitc")
    sent_plain, sent_half = plain.manifest.boundaries[0], half.manifest.boundaries[0]
    assert {t.dtype for t in sent_plain} == {"float32"} and {t.dtype for t in sent_half} == {"float16"}
    assert sum(t.nbytes for t in sent_half) * 2 == sum(t.nbytes for t in sent_plain)
    assert half.manifest.plan["half_precision"] == {"bytes_before": sum(t.nbytes for t in sent_plain)}
    assert verify_bundle(half.bundle).ok
    x = [t.numpy() for t in zoo.inputs("resnet_like")]
    a = SplitSession(Bundle.open(plain.bundle)).run(x)
    b = SplitSession(Bundle.open(half.bundle)).run(x)
    name = plain.manifest.outputs[0].name
    assert 0 < rel_err(torch.from_numpy(b[name]), torch.from_numpy(a[name])) < 1e-2  # float16 on the wire: close, not equal


# --------------------------------------------------------------------------- the --variants path

def split_favoured(graph, targets) -> list[np.ndarray]:
    """Per-node times that make splitting at the middle the best placement on every link: the
    device is fast on the first half and slow on the second, the cloud the other way round."""
    from splitc.passes.cuts import CutAnalysis

    n = len(CutAnalysis(graph).order)
    first = np.arange(n) < n // 2
    return [np.where(first, 1e-3, 50.0), np.where(first, 50.0, 1e-3)][: len(targets)]


def test_variants_forward_every_compile_option(zoo, tmp_path):
    """`compile --variants` once dropped --per-channel into **_ignored: every variant now compiles
    with the one CompileOptions the command built."""
    from splitc.drivers.variants import compile_variants
    from splitc.runtime.variant_index import read_variants

    graph = zoo.graph("resnet_like")
    options = CompileOptions(load_targets("x86,cloud-cpu"), load_link("4g"), quantize="int8", per_channel=True, samples=1)
    compile_variants(graph, options, tmp_path / "m.variants", 2, node_ms=split_favoured(graph, options.targets))
    index = read_variants(tmp_path / "m.variants")
    plans = [Bundle.open(index.bundle_path(v.index)).manifest.plan for v in index.variants]
    split = [p for p in plans if p["cuts"]]
    assert split, "the per-node times make a split variant win"
    assert all(p["quantization"]["granularity"] == "channel" for p in split)


def test_variants_keep_the_accuracy_budget(digits_split, tmp_path):
    """--max-accuracy-drop reached no variant before: a σ that costs more than the budget is now
    refused under --variants as it is without, with nothing left on disk."""
    from splitc.core.errors import PlanError
    from splitc.drivers.variants import compile_variants
    from splitc.passes.contract import CompileData

    graph = digits_split["graph"]
    data = CompileData(calibration=digits_split["samples"], labels=digits_split["labels"])
    strict = CompileOptions(load_targets("x86,cloud-cpu"), load_link("4g"), noise=3.0, max_accuracy_drop=0.0, samples=1)
    with pytest.raises(PlanError, match="--max-accuracy-drop 0"):
        compile_variants(graph, strict, tmp_path / "strict", 2, data=data, node_ms=split_favoured(graph, strict.targets))
    assert not (tmp_path / "strict").exists()
