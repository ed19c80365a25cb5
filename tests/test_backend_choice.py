"""Backend choice per partition (drivers/backend_choice.py): measured, overridden, and coverage gaps
sent to the next candidate. Real TVM and ONNX Runtime builds and runs throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitc.core.errors import InputError, TargetError, UnsupportedOperatorError
from splitc.drivers.compiler import compile_model
from splitc.drivers.verify import choose_runner
from splitc.passes.contract import CompileOptions
from splitc.runtime import Bundle
from splitc.targets import load_link, load_targets
from tests.models import save_pt2


@pytest.fixture(autouse=True)
def measured(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SPLITC_BACKEND_CHOICE", "measure")  # conftest defaults other tests to the preferred backend
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path_factory.getbasetemp() / "choice-cache"))  # no user tuning records


def _compile(graph, chain, out, **kwargs):
    return compile_model(graph, CompileOptions(load_targets(chain), load_link("4g"), samples=2, **kwargs), out)


@pytest.fixture(scope="module")
def device_bundles(zoo, tmp_path_factory):
    """resnet_like cut after layer1 on rpi4,a100, its device partition on each backend by override."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SPLITC_CACHE", str(tmp_path_factory.mktemp("cache")))
    base = tmp_path_factory.mktemp("device")
    try:
        return {backend: _compile(zoo.graph("resnet_like"), "rpi4,a100", base / f"{backend}.splitc", cut="layer1",
                                  backends={"rpi4": backend})
                for backend in ("tvm", "onnxruntime")}
    finally:
        patch.undo()


def test_override_is_honoured(device_bundles):
    for backend, result in device_bundles.items():
        device = result.manifest.partitions[0]
        assert device.backend == backend
        assert device.choice["how"] == "override"
        assert [c["backend"] for c in device.choice["candidates"]] == [backend]  # nothing else compiled or timed
    runtimes = {b: {a.runtime for a in r.manifest.partitions[0].artifacts} for b, r in device_bundles.items()}
    assert runtimes == {"tvm": {"tvm"}, "onnxruntime": {"onnxruntime"}}
    # The cloud partition keeps its own candidates: TensorRT, preferred.
    assert all(r.manifest.partitions[1].backend == "tensorrt" for r in device_bundles.values())


def test_device_partition_gives_the_same_answers_on_onnxruntime_and_tvm(device_bundles):
    """Each device artifact runs as verify runs it (in the aarch64 runtime under qemu when the
    toolchain is provisioned), on the same boundary tensors; the answers agree."""
    answers, modes = {}, {}
    for backend, result in device_bundles.items():
        bundle = Bundle.open(result.bundle)
        spec = bundle.manifest.partitions[0]
        runner = choose_runner(bundle, spec)
        reference = bundle.reference()
        batch = [[reference[f"s{i}/{t.name}"] for t in spec.inputs] for i in range(2)]
        answers[backend], modes[backend] = runner.run(batch), runner.mode
    for tvm_sample, ort_sample in zip(answers["tvm"], answers["onnxruntime"]):
        assert len(tvm_sample) == len(ort_sample) >= 1
        for a, b in zip(tvm_sample, ort_sample):
            assert a.shape == b.shape and float(np.abs(a).max()) > 1e-3  # not vacuously close
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4
    assert modes["onnxruntime"] == modes["tvm"]  # both emulated, or both on this host's runtimes


def test_measured_choice_ships_the_fastest_and_records_why(zoo, tmp_path):
    result = _compile(zoo.graph("resnet_like"), "x86", tmp_path / "b.splitc", cut="auto")
    choice = result.manifest.partitions[0].choice
    timed = {c["backend"]: c for c in choice["candidates"] if "median_ms" in c}
    assert choice["how"] == "measured" and set(timed) == {"tvm", "onnxruntime"}
    fastest = min(timed, key=lambda b: timed[b]["median_ms"])
    assert choice["backend"] == result.manifest.partitions[0].backend == fastest
    assert timed[fastest]["status"] == "chosen" and all(c["rel_err"] < 1e-4 for c in timed.values())
    assert {a.runtime for a in result.manifest.partitions[0].artifacts} == {fastest}
    assert not any(p.name.startswith(".") for p in result.bundle.iterdir())  # the losers' builds are gone


class SignBit(torch.nn.Module):
    """A convolution then torch.signbit, which TVM's importer has no converter for."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.signbit(y - 0.1)


@pytest.fixture(scope="module")
def signbit_graph(tmp_path_factory):
    from splitc.frontend import import_model

    torch.manual_seed(0)
    path = save_pt2(SignBit().eval(), (torch.randn(1, 3, 8, 8),), tmp_path_factory.mktemp("signbit") / "m.pt2")
    return import_model(path)[1]


def test_an_operator_one_backend_lacks_goes_to_the_next_candidate(signbit_graph, tmp_path):
    result = _compile(signbit_graph, "x86", tmp_path / "b.splitc", cut="auto")
    device = result.manifest.partitions[0]
    assert device.backend == "onnxruntime"
    skipped = next(c for c in device.choice["candidates"] if c["backend"] == "tvm")
    assert skipped["status"] == "skipped" and "signbit" in skipped["note"]
    assert any("tvm skipped" in n and "signbit" in n for n in result.notes)
    # Asked for by name, the backend that lacks the operator is refused before anything compiles.
    with pytest.raises(UnsupportedOperatorError, match="tvm: no converter for node .*signbit"):
        _compile(signbit_graph, "x86", tmp_path / "c.splitc", cut="auto", backends={"x86": "tvm"})
    assert not (tmp_path / "c.splitc").exists()


def test_overrides_name_a_target_of_the_chain_and_a_known_backend(signbit_graph, tmp_path):
    with pytest.raises(InputError, match="rpi4 is not one of the targets"):
        _compile(signbit_graph, "x86", tmp_path / "b.splitc", backends=["rpi4=tvm"])
    with pytest.raises(InputError, match="TARGET=BACKEND"):
        _compile(signbit_graph, "x86", tmp_path / "b.splitc", backends=["x86"])
    with pytest.raises(TargetError, match="unknown backend 'tflite'"):
        _compile(signbit_graph, "x86", tmp_path / "b.splitc", backends=["x86=tflite"])


def test_tensorrt_takes_what_its_parser_takes():
    """squeeze.dims has no torchlib function, but the exporter decomposes it and TensorRT's parser
    takes Squeeze: a vision transformer's squeeze must not be refused."""
    from splitc.backends.tensorrt import TensorRTBackend

    class Squeeze(torch.nn.Module):
        def forward(self, x):
            return torch.squeeze(x, (0, 2))

    program = torch.export.export(Squeeze(), (torch.randn(1, 3, 1, 4),))
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in nodes] == ["aten.squeeze.dims"]
    assert TensorRTBackend().supports(nodes[0])


@pytest.mark.slow  # builds TVM again and times three runtimes
def test_bench_shows_every_candidate_with_the_shipped_one_marked(device_bundles, zoo):
    from splitc.drivers.bench import bench_partition

    report = bench_partition(device_bundles["onnxruntime"].bundle, 0, model=zoo.path("resnet_like"), repeats=3, min_seconds=0.01)
    rows = {r.runtime: r for r in report.rows}
    assert list(rows) == ["compiled (onnxruntime)", "tvm", "torch eager"]
    assert [r.chosen for r in report.rows] == [True, False, False]
    assert rows["tvm"].timing is not None and rows["tvm"].rel_err < 1e-4  # built here from the model, and timed


def test_without_emulation_an_onnx_device_artifact_runs_on_this_hosts_runtime(device_bundles):
    bundle = Bundle.open(device_bundles["onnxruntime"].bundle)
    runner = choose_runner(bundle, bundle.manifest.partitions[0], emulate=False)
    assert runner.mode == "host-twin" and runner.artifact.path == "p0/model.onnx"
    assert "not run on its device's runtime: emulation disabled" in runner.note


@pytest.mark.slow  # compiles and times two backends per segment
def test_profile_prices_each_segment_on_its_fastest_backend(resnet_graph, tmp_path):
    """Plans use the speed of the code that ships: every candidate is timed per segment, the
    fastest counts, and the profile says which and what the others took."""
    from splitc.drivers.profile import Profile, profile_target

    profile = profile_target(resnet_graph, "x86", segments=2, log=lambda _: None, repeats=3, min_seconds=0.01)
    assert len(profile.segments) == 2
    for segment in profile.segments:
        assert set(segment.candidates) == {"tvm", "onnxruntime"}
        assert segment.backend == min(segment.candidates, key=segment.candidates.get)
        assert segment.measured.median_ms == pytest.approx(segment.candidates[segment.backend], abs=1e-3)
    again = Profile.load(profile.save(tmp_path / "p.json"))
    assert [s.candidates for s in again.segments] == [s.candidates for s in profile.segments]
