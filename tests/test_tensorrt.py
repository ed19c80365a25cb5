"""The TensorRT backend. The engine build needs `tensorrt`, cuda-python and an NVIDIA GPU, none of
which these machines have (../shared/TOOLCHAIN.md); those tests skip, never fake. Everything
around the engine runs here: the TensorRT-ready ONNX, the deferred state, the refusal to build."""

from __future__ import annotations

import onnx
import pytest

from splitc.backends.tensorrt import build_engine
from splitc.drivers.compiler import compile_model
from splitc.passes.contract import CompileOptions
from splitc.core.errors import ToolchainError
from splitc.runtime import Bundle
from splitc.runtime.executors import tensorrt_usable
from splitc.targets import load_link, load_targets
from splitc.drivers.verify import verify_bundle

needs_tensorrt = pytest.mark.skipif(not tensorrt_usable(), reason="needs tensorrt + cuda-python + an NVIDIA GPU")


@pytest.fixture(scope="module")
def bundle(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "b.splitc"
    return compile_model(zoo.graph("resnet_like"), CompileOptions(load_targets("x86,a100"), cut="auto", link=load_link("4g"), samples=2), out).bundle


def test_tensorrt_ready_onnx_has_static_named_io(bundle):
    manifest = Bundle.open(bundle).manifest
    partition = manifest.partitions[1]
    model = onnx.load(bundle / partition.artifact("portable").path)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == [t.name for t in partition.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in partition.outputs]
    for value, spec in zip(model.graph.input, partition.inputs):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == list(spec.shape)  # static: no optimisation profile needed


@pytest.mark.skipif(tensorrt_usable(), reason="TensorRT is usable here: the engine is built, not deferred")
def test_engine_is_deferred_and_reported_skipped(bundle):
    manifest = Bundle.open(bundle).manifest
    partition = manifest.partitions[1]
    assert partition.engine["status"] == "deferred" and partition.artifact("deploy") is None
    assert partition.engine["options"]["precision"] == "fp16"
    report = verify_bundle(bundle)
    engine_checks = [c for c in report.checks if "engine" in c.name]
    assert [c.status for c in engine_checks] == ["skip"]
    assert report.ok


@pytest.mark.skipif(tensorrt_usable(), reason="TensorRT is usable here")
def test_build_engine_refuses_without_tensorrt(bundle):
    partition = Bundle.open(bundle).manifest.partitions[1]
    with pytest.raises(ToolchainError):
        build_engine(bundle / partition.artifact("portable").path, partition.engine["options"])


@pytest.mark.tensorrt
@needs_tensorrt
def test_engine_builds_and_verifies(bundle, tmp_path):
    import shutil

    from splitc.backends.tensorrt import build_deferred_engines

    copy = tmp_path / "b.splitc"
    shutil.copytree(bundle, copy)
    assert build_deferred_engines(copy) == [1]
    partition = Bundle.open(copy).manifest.partitions[1]
    assert partition.artifact("deploy").runtime == "tensorrt"
    report = verify_bundle(copy)
    assert report.ok and report.checks[1].mode == "native"
