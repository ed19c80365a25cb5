"""Measured profiles: the timing routine, segment choice, compiled-and-timed segments on this host
(TVM for x86, ONNX Runtime for cloud-cpu) and over TVM RPC against a local server, the refusals, and
the profile file."""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitc.core.errors import BackendError, InputError, TargetError
from splitc.core.graph import TIER
from splitc.passes.cost_model import compute_ms
from splitc.passes.cuts import CutAnalysis
from splitc.drivers.profile import Profile, SegmentTiming, check_profilable, profile_target, segment_bounds
from splitc.runtime.executors import tensorrt_usable
from splitc.targets import load_target
from splitc.core.timing import Timing, time_callable

# Short timing runs: these tests check structure and plumbing, not the figures themselves.
FAST = dict(warmup=2, repeats=10, min_seconds=0.03, max_seconds=5.0)


def _tiers(graph):
    return {n.name: n.meta.get(TIER, "absent") for n in graph.module.graph.nodes}


def _check_profile(profile: Profile, graph, target_name: str) -> None:
    analysis = CutAnalysis(graph)
    n = len(analysis.order)
    covered = [p for seg in profile.segments for p in range(seg.start_position, seg.end_position + 1)]
    assert covered == list(range(n)), "segments must cover every position exactly once, in order"
    valid = set(analysis.valid_positions().tolist())
    assert all(seg.end_position in valid for seg in profile.segments[:-1]), "every boundary must be a valid cut"
    assert 2 <= len(profile.segments) <= 8
    assert profile.target == target_name and profile.model_sha256 == graph.source_sha256
    target = load_target(target_name)
    analytic = compute_ms(analysis.order, target)
    per_node = profile.node_ms(analysis)
    assert per_node.shape == (n,) and np.all(per_node >= 0)
    for seg in profile.segments:
        m = seg.measured
        assert m.median_ms > 0 and m.min_ms > 0 and m.repeats >= FAST["repeats"]
        assert m.min_ms <= m.p10_ms <= m.median_ms <= m.p90_ms
        span = slice(seg.start_position, seg.end_position + 1)
        np.testing.assert_allclose(per_node[span].sum(), m.median_ms, rtol=1e-9)
        np.testing.assert_allclose(seg.estimated_ms, analytic[span].sum(), rtol=1e-12)
        # within a segment the analytic shape is kept: one scale factor per segment
        nonzero = analytic[span] > 0
        scale = per_node[span][nonzero] / analytic[span][nonzero]
        np.testing.assert_allclose(scale, scale[0], rtol=1e-9)
    np.testing.assert_allclose(per_node.sum(), profile.total_ms, rtol=1e-9)
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


# ----------------------------------------------------------------------------------------- timing


def test_time_callable_sleep_median_and_exact_repeats():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.005)

    timing = time_callable(fn, warmup=2, repeats=12, min_seconds=0.0)
    assert timing.repeats == 12 and timing.warmup == 2 and len(calls) == 14
    assert 4.9 <= timing.median_ms <= 25.0  # sleep never returns early; a loaded CI host may be late
    assert timing.min_ms <= timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert timing.mean_ms >= timing.min_ms
    assert Timing.from_json(json.loads(json.dumps(timing.to_json()))) == timing


def test_time_callable_min_and_max_seconds():
    # A fast function keeps going until min_seconds has passed, beyond `repeats`.
    fast = time_callable(lambda: None, warmup=0, repeats=5, min_seconds=0.02)
    assert fast.repeats > 5
    # max_seconds bounds a run that could not reach `repeats`.
    tick = time.perf_counter()
    slow = time_callable(lambda: time.sleep(0.005), warmup=0, repeats=10_000, min_seconds=0.0, max_seconds=0.05)
    assert 1 <= slow.repeats < 50 and time.perf_counter() - tick < 1.0
    with pytest.raises(ValueError):
        time_callable(lambda: None, repeats=0)


# ----------------------------------------------------------------------------------------- segments


@pytest.mark.parametrize("count", [1, 3, 8])
def test_segment_bounds_cover_graph_and_cut_at_valid_positions(resnet_graph, multi_io_graph, count):
    target = load_target("x86")
    for graph in (resnet_graph, multi_io_graph):
        analysis = CutAnalysis(graph)
        bounds = segment_bounds(analysis, target, count)
        assert 1 <= len(bounds) <= count
        assert bounds[0][0] == 0 and bounds[-1][1] == len(analysis.order) - 1
        assert all(b[0] == a[1] + 1 for a, b in zip(bounds, bounds[1:]))
        assert set(end for _, end in bounds[:-1]) <= set(analysis.valid_positions().tolist())


def test_segment_bounds_spread_over_analytic_time(resnet_graph):
    analysis = CutAnalysis(resnet_graph)
    target = load_target("x86")
    bounds = segment_bounds(analysis, target, 4)
    ms = compute_ms(analysis.order, target)
    shares = [ms[s : e + 1].sum() / ms.sum() for s, e in bounds]
    assert len(bounds) >= 3 and max(shares) < 0.6, shares


# ----------------------------------------------------------------------------------------- host profiles


@pytest.fixture(scope="module")
def x86_profile(resnet_graph):
    before = _tiers(resnet_graph)
    profile = profile_target(resnet_graph, "x86", log=lambda _: None, **FAST)
    assert _tiers(resnet_graph) == before, "profiling must leave the graph's TIER tags as it found them"
    return profile


def test_profile_x86_tvm_on_host(x86_profile, resnet_graph):
    _check_profile(x86_profile, resnet_graph, "x86")
    assert x86_profile.measured_on.startswith("host x86_64 ")


def test_profile_cloud_cpu_onnxruntime_on_host(resnet_graph, tmp_path):
    workdir = tmp_path / "work"
    profile = profile_target(resnet_graph, load_target("cloud-cpu"), segments=4, workdir=workdir, log=lambda _: None, **FAST)
    _check_profile(profile, resnet_graph, "cloud-cpu")
    assert sorted(p.name for p in workdir.iterdir()) == [f"s{i}" for i in range(len(profile.segments))]
    assert all((workdir / f"s{i}" / "model.onnx").is_file() for i in range(len(profile.segments)))


def test_profile_save_load_round_trip(x86_profile, resnet_graph, tmp_path):
    path = x86_profile.save(tmp_path / "x86.profile.json")
    loaded = Profile.load(path, model_sha256=resnet_graph.source_sha256)
    assert loaded == x86_profile
    np.testing.assert_array_equal(loaded.node_ms(CutAnalysis(resnet_graph)), x86_profile.node_ms(CutAnalysis(resnet_graph)))


def test_temporary_workdir_is_removed(resnet_graph, monkeypatch):
    import tempfile

    made = []

    class Recording(tempfile.TemporaryDirectory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(Path(self.name))

    monkeypatch.setattr("splitc.drivers.profile.tempfile.TemporaryDirectory", Recording)
    profile_target(resnet_graph, "cloud-cpu", segments=1, log=lambda _: None, **FAST)
    assert len(made) == 1 and not made[0].exists()


# ----------------------------------------------------------------------------------------- refusals


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.skipif(tensorrt_usable(), reason="this host can build and run TensorRT engines")
def test_refuses_tensorrt_target_without_gpu(resnet_graph):
    with pytest.raises(TargetError) as exc:
        profile_target(resnet_graph, "a100", log=lambda _: None)
    assert "GPU host" in _one_line(exc)


def test_refuses_aarch64_tvm_target_without_rpc(resnet_graph):
    with pytest.raises(TargetError) as exc:
        profile_target(resnet_graph, "rpi4", log=lambda _: None)
    text = _one_line(exc)
    assert "--rpc HOST:PORT" in text and "emulation" in text and "tvm.exec.rpc_server" in text


def test_refuses_rpc_for_other_backends_and_bad_addresses():
    with pytest.raises(TargetError, match="TVM modules only"):
        check_profilable(load_target("cloud-cpu"), "127.0.0.1:9090")
    with pytest.raises(TargetError, match="TVM modules only"):
        check_profilable(load_target("a100"), "127.0.0.1:9090")
    for bad in ("localhost", "host:port", ":9090", "h:70000"):
        with pytest.raises(TargetError, match="HOST:PORT"):
            check_profilable(load_target("rpi4"), bad)
    check_profilable(load_target("rpi4"), "192.168.1.20:9090")  # accepted: the device does the timing


def test_unreachable_rpc_server_is_a_target_error(resnet_graph):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TargetError, match="cannot reach the TVM RPC server"):
        profile_target(resnet_graph, "x86", rpc=f"127.0.0.1:{port}", log=lambda _: None)


# ----------------------------------------------------------------------------------------- RPC


def test_profile_over_rpc_against_local_server(rpc_server, resnet_graph, x86_profile):
    profile = profile_target(resnet_graph, "x86", segments=3, rpc=rpc_server, log=lambda _: None, **FAST)
    assert profile.measured_on == f"rpc {rpc_server}"
    _check_profile(profile, resnet_graph, "x86")
    # Same machine, same code: the device-side timing (no numpy copies) cannot be far off the host's.
    ratio = profile.total_ms / x86_profile.total_ms
    assert 0.2 < ratio < 3.0, (profile.total_ms, x86_profile.total_ms)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs the aarch64 cross compiler")
def test_rpc_device_of_another_isa_is_refused_not_emulated(rpc_server, resnet_graph):
    # rpi4 code sent to this x86 server must fail to load: no timing may come back from the wrong ISA.
    with pytest.raises(BackendError, match="cannot load model.aarch64.so") as exc:
        profile_target(resnet_graph, "rpi4", segments=1, rpc=rpc_server, log=lambda _: None, **FAST)
    _one_line(exc)


# ----------------------------------------------------------------------------------------- profile file


def test_profile_load_errors(x86_profile, tmp_path):
    with pytest.raises(InputError, match="does not exist") as exc:
        Profile.load(tmp_path / "missing.json")
    _one_line(exc)

    garbled = tmp_path / "garbled.json"
    garbled.write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON") as exc:
        Profile.load(garbled)
    _one_line(exc)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "splitc-bundle"}))
    with pytest.raises(InputError, match="not a splitc profile"):
        Profile.load(other)

    data = x86_profile.to_json()
    for name, broken in {
        "version": {**data, "schema_version": 99},
        "missing-key": {k: v for k, v in data.items() if k != "measured_on"},
        "bad-timing": {**data, "segments": [{**data["segments"][0], "measured": {"median_ms": "fast"}}]},
        "gap": {**data, "segments": data["segments"][1:]},
        "empty": {**data, "segments": []},
    }.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(InputError) as exc:
            Profile.load(path)
        assert "re-run `splitc profile`" in _one_line(exc), name

    good = x86_profile.save(tmp_path / "good.json")
    with pytest.raises(InputError, match="measured on model sha256") as exc:
        Profile.load(good, model_sha256="0" * 64)
    _one_line(exc)


def test_node_ms_refuses_another_graph_or_target(x86_profile, multi_io_graph):
    with pytest.raises(InputError, match="re-run `splitc profile`"):
        x86_profile.node_ms(CutAnalysis(multi_io_graph))
    with pytest.raises(InputError, match="measured for target x86"):
        x86_profile.node_ms(CutAnalysis(multi_io_graph), load_target("cloud-cpu"))


def test_node_ms_spreads_a_segment_the_model_prices_at_zero(resnet_graph):
    analysis = CutAnalysis(resnet_graph)
    n = len(analysis.order)
    timing = Timing(2.0, 2.0, 2.0, 2.0, 2.0, 1, 0)
    zero_target = replace(load_target("x86"), sustained_gflops=float("inf"), memory_bandwidth_gbs=float("inf"))
    profile = Profile("x86", "test", resnet_graph.source_sha256, [
        SegmentTiming(0, n - 1, analysis.order[0].name, analysis.order[-1].name, timing, 0.0),
    ])
    per_node = profile.node_ms(analysis, zero_target)
    assert per_node.sum() == pytest.approx(2.0, rel=1e-12)
    assert np.all(per_node[~analysis.is_op] == 0) and np.all(per_node[analysis.is_op] > 0)
