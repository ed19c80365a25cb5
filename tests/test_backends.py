"""Every test model compiled for real targets, verified, and run through the torch-free runtime.

Compared twice: by `verify` against the reference stored at compile time, and here directly
against the eager nn.Module, so a bug in the reference pipeline cannot hide a wrong artifact.
"""

from __future__ import annotations

import numpy as np
import pytest

from splitc.backends.emulation import find_aarch64_toolchain
from splitc.drivers.compiler import compile_model
from splitc.passes.contract import CompileData, CompileOptions
from splitc.passes.cuts import CutAnalysis
from splitc.runtime import Bundle, SplitSession
from splitc.targets import load_link, load_targets
from splitc.drivers.verify import verify_bundle
from tests.models import rel_err

import torch


def mid_cut(graph) -> str:
    """The valid cut closest to the middle of the graph: both partitions get real work."""
    analysis = CutAnalysis(graph)
    positions = analysis.valid_positions()
    return analysis.order[int(positions[len(positions) // 2])].name


def eager_outputs(zoo, name):
    with torch.no_grad():
        out = zoo.module(name)(*zoo.inputs(name))
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("chain, cut", [("rpi4,a100", "mid"), ("x86,cloud-cpu", "auto")])
def test_zoo_model_compiles_verifies_and_runs(zoo, zoo_name, chain, cut, tmp_path):
    graph = zoo.graph(zoo_name)
    targets = load_targets(chain)
    cut_arg = mid_cut(graph) if cut == "mid" else "auto"
    result = compile_model(graph, CompileOptions(targets, cut=cut_arg, link=load_link("4g"), samples=3), tmp_path / "b.splitc", data=CompileData(examples=zoo.inputs(zoo_name)))
    manifest = result.manifest
    assert [p.target for p in manifest.partitions] == [t.name for t in targets]
    assert all(p.nodes for p in manifest.partitions)

    report = verify_bundle(result.bundle)
    assert report.ok, [(c.name, c.status, c.max_rel_err, c.note) for c in report.checks]
    ran = [c for c in report.checks if c.status == "pass"]
    assert len(ran) == len(manifest.partitions) + 1  # every partition and the chain really ran
    if chain.startswith("rpi4") and find_aarch64_toolchain() is not None:
        assert report.checks[0].mode == "emulated"

    session = SplitSession(Bundle.open(result.bundle))
    got = session.run([t.numpy() for t in zoo.inputs(zoo_name)])
    for spec, expected in zip(manifest.outputs, eager_outputs(zoo, zoo_name)):
        value = torch.from_numpy(got[spec.name])
        assert rel_err(value, expected) < 1e-4
        if expected.ndim >= 2 and expected.shape[-1] > 1:
            assert torch.equal(value.argmax(-1), expected.argmax(-1))


def test_cut_inside_residual_block_sends_skip_tensor(zoo, tmp_path):
    graph = zoo.graph("resnet_like")
    analysis = CutAnalysis(graph)
    inside = next(c for c in analysis.candidates() if len(c.crossing) == 2)
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut=inside.after, link=load_link("4g"), samples=2), tmp_path / "b.splitc")
    boundary = result.manifest.boundaries[0]
    assert len(boundary) == 2
    assert [t.name for t in result.manifest.partitions[1].inputs] == [t.name for t in boundary]
    assert verify_bundle(result.bundle).ok


def test_model_input_used_late_crosses_the_cut(zoo, tmp_path):
    graph = zoo.graph("multi_io")
    late_input = graph.inputs[1].name
    analysis = CutAnalysis(graph)
    cut = next(c for c in analysis.candidates() if late_input in {t.name for t in c.crossing})
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut=cut.after, link=load_link("4g"), samples=2), tmp_path / "b.splitc")
    assert late_input in {t.name for t in result.manifest.boundaries[0]}
    assert late_input in {t.name for t in result.manifest.partitions[1].inputs}
    assert verify_bundle(result.bundle).ok


def test_session_refuses_missing_and_unknown_inputs(zoo, tmp_path):
    from splitc.core.errors import InputError

    graph = zoo.graph("multi_io")
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut="auto", link=load_link("4g"), samples=1), tmp_path / "b.splitc")
    session = SplitSession(Bundle.open(result.bundle))
    first, second = (t.numpy() for t in zoo.inputs("multi_io"))
    with pytest.raises(InputError, match="missing"):
        session.run({graph.inputs[0].name: first})
    with pytest.raises(InputError, match="unknown"):
        session.run({graph.inputs[0].name: first, graph.inputs[1].name: second, "extra": second})
    with pytest.raises(InputError, match="takes 2 input"):
        session.run([first])
    assert np.isfinite(next(iter(session.run([first, second]).values()))).all()


def _tvm_threads_used():
    """A TVM kernel whose parallel loop records which OS thread ran each iteration: TVM splits a
    parallel loop statically across its pool, so the distinct IDs are the calling thread's pool size."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def who(out: T.Buffer((64,), "uint64")):
        for i in T.parallel(64):
            out[i] = T.call_extern("uint64", "pthread_self")

    kernel = tvm.compile(who, target={"kind": "llvm"})

    def count() -> int:
        out = tvm.runtime.tensor(np.zeros(64, dtype="uint64"))
        kernel(out)
        return len(set(out.numpy().tolist()))

    return count


def test_tvm_partition_runs_with_its_targets_thread_count(zoo, tmp_path):
    """TVM's own default on x86 is half the hardware threads (one on a 2-vCPU host); the runtime
    must run a partition with its target's `num-cores` instead, in whatever thread calls it."""
    import threading

    import tvm

    from splitc.runtime.executors import available_cpus, tvm_threads
    from splitc.core.manifest import ROLE_DEPLOY

    graph = zoo.graph("multi_io")
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), cut="auto", link=load_link("4g"), samples=1), tmp_path / "b.splitc")
    artifact = result.manifest.partitions[0].artifact(ROLE_DEPLOY)
    expected = tvm_threads(artifact)
    assert expected == min(int(artifact.options["target"]["num-cores"]), available_cpus()) >= 1
    session = SplitSession(Bundle.open(result.bundle))
    inputs = [t.numpy() for t in zoo.inputs("multi_io")]
    threads_used = _tvm_threads_used()
    seen: dict[str, int] = {}

    def caller():
        # This thread's pool first set to another count, which the session must replace.
        other = 2 if expected == 1 else 1
        tvm.get_global_func("runtime.config_threadpool")(-3, other, [str(c) for c in range(available_cpus())])
        seen["before"] = threads_used()
        session.run(inputs)
        seen["after"] = threads_used()

    worker = threading.Thread(target=caller)
    worker.start()
    worker.join()
    assert seen["before"] != expected
    assert seen["after"] == expected
