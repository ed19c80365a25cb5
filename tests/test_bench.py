"""`splitc bench`: a compiled partition timed beside ONNX Runtime and torch eager on this host."""

from __future__ import annotations

import pytest

from splitc.drivers.bench import bench_partition
from splitc.core.errors import InputError


@pytest.fixture(scope="module")
def bundle(zoo, tmp_path_factory):
    from splitc.targets import load_link, load_targets

    from splitc.drivers.compiler import compile_model

    from splitc.passes.contract import CompileOptions

    patch = pytest.MonkeyPatch()
    patch.setenv("SPLITC_CACHE", str(tmp_path_factory.mktemp("cache")))  # no user tuning records
    out = tmp_path_factory.mktemp("bench") / "resnet_like.splitc"
    try:
        compile_model(zoo.graph("resnet_like"), CompileOptions(load_targets("x86,cloud-cpu"), cut="layer1", link=load_link("4g"), samples=1), out)
    finally:
        patch.undo()
    return out


def test_bench_compiled_vs_ort_vs_torch(bundle, zoo):
    report = bench_partition(bundle, 0, model=zoo.path("resnet_like"), repeats=5, min_seconds=0.05)
    rows = {r.runtime: r for r in report.rows}
    assert set(rows) == {"compiled (tvm)", "onnxruntime", "torch eager"}
    for row in report.rows:
        assert row.timing is not None and row.timing.median_ms > 0 and row.timing.repeats >= 5
        assert row.rel_err is not None and row.rel_err < 1e-4, (row.runtime, row.rel_err)
    assert rows["onnxruntime"].source == "exported from --model"  # the TVM partition has no ONNX in the bundle
    assert set(report.ratios()) == {"onnxruntime", "torch eager"}
    assert report.to_json()["threads"] == report.threads >= 1


def test_bench_onnx_partition_and_no_model(bundle):
    # Partition 1 (cloud-cpu) is ONNX Runtime itself: timed without --model; torch needs the model.
    report = bench_partition(bundle, 1, repeats=3, min_seconds=0.01)
    assert report.rows[0].runtime == "compiled (onnxruntime)" and report.rows[0].timing is not None
    assert report.rows[-1].runtime == "torch eager" and report.rows[-1].timing is None and "--model" in report.rows[-1].note
    # cloud-cpu's other candidate, TVM, is listed; building it needs the model.
    assert [(r.runtime, r.chosen) for r in report.rows] == [("compiled (onnxruntime)", True), ("tvm", False), ("torch eager", False)]
    assert "--model" in report.rows[1].note


def test_bench_refuses_a_wrong_partition_or_model(bundle, zoo):
    with pytest.raises(InputError, match="partition"):
        bench_partition(bundle, 7)
    with pytest.raises(InputError, match="not the model"):
        bench_partition(bundle, 0, model=zoo.path("depthwise_bn"), repeats=1, min_seconds=0.0)
