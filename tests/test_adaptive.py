"""Adaptive split (splitc.drivers.variants + splitc.runtime.adaptive) on real compiled bundles and a real
server on 127.0.0.1.

The variant directory is the example small ResNet compiled by `splitc compile --variants 2` for a
"slow" device (this host's CPU through untuned TVM, rated at 0.5 GFLOP/s so offloading can win)
and cloud-cpu (ONNX Runtime): v0 runs everything on the device, v1 sends the raw input to the
server. On loopback v1 is the faster one by far; a TCP relay that delays every chunk makes the
link slow, and the session must notice, switch to v0, log why, and switch back when the delay goes.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from splitc.runtime import Bundle
from splitc.runtime.adaptive import AdaptiveSession
from splitc.runtime.link_estimate import CHANGED, SURPRISE, LinkEstimator
from splitc.runtime.variant_index import VARIANTS_NAME, read_variants
from splitc.runtime.server import make_http_server, serve_in_thread, variant_servers
from splitc.targets import Link, load_link, load_target

from splitc.core.errors import BundleError, InputError, SplitcError
from tests.serving import TOKEN, request
from tests.test_cli import run_cli

SLOW_DEVICE = """
name = "slow-x86"
description = "test device: this host's CPU through untuned TVM, rated slow so that offloading can win"
tier = "edge"
arch = "x86_64"
[compute]
sustained_gflops = 0.5
memory_bandwidth_gbs = 1.0
memory_gb = 1.0
[backend]
name = "tvm"
target = { kind = "llvm", mtriple = "x86_64-linux-gnu" }
[verify]
rtol = 1e-4
"""


class DelayRelay:
    """A TCP relay on 127.0.0.1 that holds every chunk `delay_s` before forwarding it: a slower
    link between the client and a real server, changeable while connections are open."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.up_bytes = 0  # client -> server bytes forwarded so far
        self._sockets: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(s)
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while chunk := src.recv(1 << 20):
                if up:  # counted before it is forwarded: once the server answers, all of it is counted
                    self.up_bytes += len(chunk)
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Refuse new connections and cut the open ones: the server is unreachable now."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="module")
def slow_device(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("targets") / "slow-x86.toml"
    path.write_text(SLOW_DEVICE)
    return path


@pytest.fixture(scope="module")
def variant_dir(model_files, slow_device, tmp_path_factory):
    """Compiled through the CLI: `splitc compile --variants 2` (which calls compile_variants)."""
    from splitc.cli import main

    out = tmp_path_factory.mktemp("variants") / "m.variants"
    try:
        main(["compile", str(model_files["pt2"]), "--targets", f"{slow_device},cloud-cpu", "--variants", "2",
              "--link", "wifi", "--samples", "1", "-o", str(out)])
    except SystemExit as exc:
        assert not exc.code, f"compile --variants exited {exc.code}"
    return out


@pytest.fixture(scope="module")
def server(variant_dir):
    httpd = make_http_server(variant_servers(variant_dir, token=TOKEN), "127.0.0.1", 0)
    serve_in_thread(httpd)
    yield httpd
    httpd.drain(5)


@pytest.fixture()
def relay(server):
    relay = DelayRelay(server.port)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def x(model_files) -> np.ndarray:
    return np.load(model_files["x"])


@pytest.fixture(scope="module")
def expected(model_files) -> np.ndarray:
    return np.load(model_files["y"])


def _close_to(result, expected) -> None:
    (value,) = result.outputs.values()
    assert np.linalg.norm(value - expected) / np.linalg.norm(expected) < 1e-4


# ----------------------------------------------------------------------------- choosing variants


def test_variant_choice_covers_low_and_high_bandwidth(zoo, slow_device):
    from splitc.drivers.variants import choose_variants, plan_latency

    graph = zoo.graph("resnet_like")
    targets = [load_target(str(slow_device)), load_target("cloud-cpu")]
    slow, fast = Link("slow", 0.2, 100.0), Link("fast", 200.0, 5.0)
    choice = choose_variants(graph, targets, 3, default_link=load_link("4g"))
    placements = [p.placement for p in choice.plans]
    assert len({p.positions for p in choice.plans}) == len(choice.plans) >= 2
    assert choice.regret == pytest.approx(0.0, abs=1e-9)  # every link's best placement is in the set
    best_at = {link.name: choice.plans[int(np.argmin([plan_latency(p, link, targets) for p in choice.plans]))] for link in (slow, fast)}
    assert best_at["slow"].placement == ("slow-x86", None)          # device-only when the link is slow
    assert best_at["fast"].placement[1] == "cloud-cpu" and best_at["fast"].transfers  # offloads when it is fast
    assert placements[0] == ("slow-x86", None)  # fewest bytes first: v0 is device-only
    # Re-pricing a plan on its own link gives the planner's figure.
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.money import Workload
    from splitc.passes.planner import plan_placements

    front = plan_placements(CutAnalysis(graph), targets, fast, Workload(10.0))
    assert plan_latency(front.plans[front.chosen], fast, targets) == pytest.approx(front.plans[front.chosen].latency_ms)
    # K = 1 keeps the single placement with the least regret over the sweep.
    (only,) = choose_variants(graph, targets, 1).plans
    assert only.placement == ("slow-x86", None)


def test_bad_variant_requests_are_one_line_errors(zoo, slow_device, tmp_path, model_files, capsys):
    from splitc.drivers.variants import choose_variants, compile_variants
    from splitc.passes.contract import CompileOptions

    graph = zoo.graph("resnet_like")
    targets = [load_target(str(slow_device)), load_target("cloud-cpu")]
    for k in (0, -2, 1.5):
        with pytest.raises(InputError) as info:
            choose_variants(graph, targets, k)
        assert "--variants" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SplitcError, match="two targets"):
        choose_variants(graph, targets[:1], 2)
    with pytest.raises(InputError, match="drop --cut"):
        compile_variants(graph, CompileOptions(targets, load_link("4g"), cut="layer1"), tmp_path / "o", 2)
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("compile", model_files["pt2"], "--targets", "x86,cloud-cpu", "--variants", "0", capsys=capsys)
    assert code == 7 and "--variants" in err and len(err.strip().splitlines()) == 1
    # A directory that is not a variant directory: one line naming what it is.
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "empty", "not a splitc output"),):
        with pytest.raises(BundleError, match=words):
            read_variants(path)
        with pytest.raises(BundleError, match="--variants"):
            AdaptiveSession(path, "http://127.0.0.1:9")


# ----------------------------------------------------------------------------- the variant directory


def test_variant_directory_holds_verified_bundles(variant_dir, tmp_path, capsys):
    index = json.loads((variant_dir / VARIANTS_NAME).read_text())
    assert index["format"] == "splitc-variants" and index["schema_version"] == 1
    v0, v1 = index["variants"]
    assert v0["device_only"] and v0["first_remote"] is None and v0["bytes_up"] == 0 and v0["cuts"] == []
    assert not v1["device_only"] and v1["first_remote"] == 0 and v1["bytes_up"] == 1 * 3 * 64 * 64 * 4
    for entry in (v0, v1):
        assert {"directory", "model_name", "placement", "tiers", "predicted_ms", "wins", "manifest_sha256", "bytes_down"} <= set(entry)
        assert entry["wins"]["share"] > 0
        bundle = Bundle.open(variant_dir / entry["directory"])  # each is a normal bundle
        assert bundle.manifest.plan["method"] == "planner"
    assert v0["predicted_ms"]["device"] > 0 and v1["predicted_ms"]["remote"] > 0
    assert "3g" in v0["wins"]["links"] and "wifi" in v1["wins"]["links"]  # where each wins, by preset
    assert index["default"] == 1 and index["link"]["name"] == "wifi"  # the compile link's best
    assert not list(variant_dir.parent.glob(".*staging"))
    # splitc verify checks every variant; splitc run locally runs variant 0.
    code, out, err = run_cli("verify", variant_dir, "--json", tmp_path / "r.json", capsys=capsys)
    assert code == 0, out + err
    names = [c["name"] for c in json.loads((tmp_path / "r.json").read_text())["checks"]]
    assert any(n.startswith("v0: ") for n in names) and any(n.startswith("v1: ") for n in names)
    # A tampered variant manifest is refused before anything runs.
    copy = tmp_path / "tampered.variants"
    shutil.copytree(variant_dir, copy)
    manifest = json.loads((copy / "v1" / "manifest.json").read_text())
    manifest["model"]["name"] = "other"
    (copy / "v1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="refusing"):
        read_variants(copy)
    code, _, err = run_cli("verify", copy, capsys=capsys)
    assert code == 8 and "refusing" in err


def test_one_server_serves_every_networked_variant(variant_dir, server, x, expected, tmp_path, capsys):
    names = [a.name for a in server.apps.values()]
    assert names == ["m-v1"]  # v0 runs on the device alone: nothing to serve
    status, _, data = request(server.port, "GET", "/v2/models/m-v0")
    assert status == 404 and "m-v1" in json.loads(data)["error"]
    (tmp_path / "secret").write_text(TOKEN)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli("run", variant_dir, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz", capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli("run", variant_dir, "--input", tmp_path / "x.npy", "--remote", f"http://127.0.0.1:{server.port}",
                             "--token-file", tmp_path / "secret", "-o", tmp_path / "z.npz", capsys=capsys)
    assert code == 0, err
    assert "answer from variant v" in out and "link estimate" in out
    for name in ("y.npz", "z.npz"):
        with np.load(tmp_path / name) as got:
            (value,) = [got[k] for k in got.files]
        assert np.linalg.norm(value - expected) / np.linalg.norm(expected) < 1e-4


# ----------------------------------------------------------------------------- the link estimator


def test_estimator_converges_and_follows_a_change():
    rng = np.random.default_rng(0)
    estimator = LinkEstimator(bandwidth_mbit=50.0, rtt_ms=5.0)
    for rtt, mbit in ((40.0, 5.0), (100.0, 1.0), (10.0, 20.0)):
        for _ in range(12):
            estimator.observe_rtt(rtt * rng.uniform(0.9, 1.1))
            nbytes = 60_000
            estimator.observe_transfer(nbytes, (rtt + nbytes * 8 / (mbit * 1e3)) * rng.uniform(0.9, 1.1))
        assert estimator.rtt_ms == pytest.approx(rtt, rel=0.15)
        assert estimator.bandwidth_mbit == pytest.approx(mbit, rel=0.15)
    # A small exchange is a round-trip sample, not a bandwidth one.
    before = estimator.bandwidth_mbit
    estimator.observe_transfer(300, 10.2)
    assert estimator.bandwidth_mbit == before


def test_estimator_ignores_a_single_outlier():
    estimator = LinkEstimator(bandwidth_mbit=10.0, rtt_ms=20.0)
    for _ in range(5):
        estimator.observe_rtt(20.0)
        estimator.observe_transfer(100_000, 20.0 + 80.0)
    estimator.observe_rtt(2000.0)              # one lost-and-retransmitted probe
    estimator.observe_transfer(100_000, 5000.0)  # one stalled request
    assert estimator.rtt_ms == pytest.approx(20.0, rel=0.01)
    assert estimator.bandwidth_mbit == pytest.approx(10.0, rel=0.01)


def test_estimator_says_when_a_change_is_confirmed():
    estimator = LinkEstimator(bandwidth_mbit=10.0, rtt_ms=20.0)
    for _ in range(3):
        assert estimator.observe_rtt(20.0) is None
        assert estimator.observe_transfer(100_000, 20.0 + 80.0) is None  # 10 Mbit/s, as estimated
    # One sample at a tenth of the bandwidth: a surprise, not yet a change (the estimate stays).
    assert estimator.observe_transfer(100_000, 20.0 + 800.0) == SURPRISE
    assert estimator.bandwidth_mbit == pytest.approx(10.0)
    # A second one agrees: a confirmed change replaces the estimate outright.
    assert estimator.observe_transfer(100_000, 20.0 + 800.0) == CHANGED
    assert estimator.bandwidth_mbit == pytest.approx(1.0)
    assert estimator.observe_transfer(100_000, 20.0 + 800.0) is None
    # The same for the round trip; a millisecond of jitter on a sub-millisecond one is no surprise.
    assert estimator.observe_rtt(100.0) == SURPRISE and estimator.rtt_ms == pytest.approx(20.0)
    assert estimator.observe_rtt(100.0) == CHANGED and estimator.rtt_ms == pytest.approx(100.0)
    fast = LinkEstimator(rtt_ms=0.5)
    for ms in (0.4, 0.5, 1.6, 0.3, 1.9):
        assert fast.observe_rtt(ms) is None


# ----------------------------------------------------------------------------- the adaptive session


def test_switches_when_the_link_slows_and_back_when_it_recovers(variant_dir, relay, x, expected, caplog):
    caplog.set_level(logging.INFO, logger="splitc.adaptive")
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{relay.port}", token=TOKEN, initial=1, background=False)
    try:
        assert session.estimator.rtt_samples == 1  # the start-up probe
        assert all(ms > 0 for ms in session.device_profile_ms[:1]) and session.device_profile_ms[1] == 0.0
        for _ in range(5):  # fast link: the offloading variant stays
            result = session.infer([x])
            assert result.variant == 1 and result.source == "remote" and result.bytes_sent > 49_152
            assert "server_ms" in result.timings
            _close_to(result, expected)
        assert session.switches == []
        relay.delay_s = 0.06  # every chunk held 60 ms each way: a slow link
        session.probe()
        for _ in range(8):
            result = session.infer([x])
            if session.current == 0:
                break
        assert session.current == 0, session.predict()
        switch = session.switches[-1]
        assert (switch["from"], switch["to"]) == (1, 0)
        assert switch["rtt_ms"] > 40 and switch["predicted_ms"][1] > switch["predicted_ms"][0]
        assert {"time", "bandwidth_mbit", "reason", "request"} <= set(switch)
        assert any("switch v1 -> v0" in r.getMessage() for r in caplog.records)
        result = session.infer([x])
        assert result.variant == 0 and result.source == "local" and result.bytes_sent == 0
        _close_to(result, expected)
        relay.delay_s = 0.0  # the link recovers: probes and an upload of v1's size notice it
        for _ in range(10):
            session.probe()
            session.explore()
            if session.current == 1:
                break
        assert session.current == 1, session.predict()
        assert [(s["from"], s["to"]) for s in session.switches] == [(1, 0), (0, 1)]
        assert session.switches[-1]["reason"] in ("probe", "explore")
        assert session.infer([x]).variant == 1
    finally:
        session.close()


def test_hysteresis_keeps_a_variant_when_the_other_is_barely_better(variant_dir, server, x):
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{server.port}", token=TOKEN, initial=1, background=False,
                              margin=0.15, patience=3)
    try:
        for _ in range(3):
            session.infer([x])
        device = session.device_ms(0)
        base = session.predict()[1] - session.estimator.rtt_ms
        best = []
        for i in range(30):  # v1's prediction oscillates +-8% around v0's: the best flips, nothing switches
            session.estimator.observe_rtt((1.08 if i % 2 else 0.92) * device - base)
            session.evaluate()
            predicted = session.predict()
            best.append(int(np.argmin(predicted)))
        assert session.switches == [] and session.current == 1
        assert sum(a != b for a, b in itertools.pairwise(best)) >= 5, best
        for _ in range(6):  # a lasting change beyond the margin does switch, once
            session.estimator.observe_rtt(3 * device)
            session.evaluate()
        assert [(s["from"], s["to"]) for s in session.switches] == [(1, 0)]
    finally:
        session.close()


def test_a_large_predicted_gain_switches_after_fewer_evaluations(variant_dir, server, x):
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{server.port}", token=TOKEN, initial=1, background=False,
                              margin=0.15, patience=3, fast_patience=2, fast_gain=2.0)
    try:
        for _ in range(3):
            session.infer([x])
        device = session.device_ms(0)
        base = session.predict()[1] - session.estimator.rtt_ms

        def link_making_v1(ratio: float) -> None:  # a steady round trip that predicts v1 at ratio x v0
            for _ in range(40):
                session.estimator.observe_rtt(max(ratio * device - base, 0.0))

        def evaluations_to_switch() -> int:
            before = len(session.switches)
            for n in range(1, 10):
                session.evaluate()
                if len(session.switches) > before:
                    return n
            return 0

        link_making_v1(1.3)   # v0 predicted 1.3x faster: beyond the margin, below fast_gain
        assert evaluations_to_switch() == 3 and session.current == 0
        link_making_v1(0.0)   # the link recovers: v1 is predicted far faster than the device
        predicted = session.predict()
        assert predicted[0] >= 2.0 * predicted[1], predicted
        assert evaluations_to_switch() == 2 and session.current == 1
        link_making_v1(3.0)
        assert evaluations_to_switch() == 2 and session.current == 0
        assert [(s["from"], s["to"]) for s in session.switches] == [(1, 0), (0, 1), (1, 0)]
    finally:
        session.close()
    with pytest.raises(InputError, match="fast_patience"):
        AdaptiveSession(variant_dir, f"http://127.0.0.1:{server.port}", patience=2, fast_patience=3)


def test_explore_times_a_small_upload_without_running_the_model(variant_dir, server, relay, x):
    (app,) = server.apps.values()
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{relay.port}", token=TOKEN, initial=0, background=False,
                              probe_bytes=16384)
    try:
        infers, rtts = app.stats["infer"], session.estimator.rtt_samples
        relay.up_bytes = 0
        fast = session.explore()
        assert fast is not None and fast > 0
        assert session.estimator.bandwidth_samples == 1 and session.estimator.rtt_samples == rtts + 1  # a GET, then the upload
        assert app.stats["infer"] == infers  # nothing ran on the server
        assert 16384 <= relay.up_bytes < 16384 + 1024  # the probe and two request heads, no tensor
        relay.delay_s = 0.05  # each chunk held 50 ms each way
        slow = session.explore()
        assert slow is not None and slow >= 100 and slow > fast
        assert session.current == 0 and session.infer([x]).source == "local"
    finally:
        session.close()
    # probe_bytes=0: explore uploads the smallest networked boundary (v1's input) as a real request.
    relay.delay_s = 0.0
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{relay.port}", token=TOKEN, initial=0, background=False,
                              probe_bytes=0)
    try:
        infers, relay.up_bytes = app.stats["infer"], 0
        assert session.explore() is not None
        assert app.stats["infer"] == infers + 1 and relay.up_bytes > 1 * 3 * 64 * 64 * 4
        assert session.estimator.bandwidth_samples == 1
    finally:
        session.close()


def test_a_server_refusing_the_probe_upload_is_explored_with_a_boundary(variant_dir, x):
    # Bodies over 56,000 bytes are refused (413): the 60,000-byte probe is, v1's 49,152-byte input is not.
    httpd = make_http_server(variant_servers(variant_dir, token=TOKEN, max_body=56_000), "127.0.0.1", 0)
    serve_in_thread(httpd)
    (app,) = httpd.apps.values()
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{httpd.port}", token=TOKEN, initial=0, background=False,
                              probe_bytes=60_000)
    try:
        assert session.explore() is not None
        assert session.probe_bytes == 0 and session.reachable  # refused: from now on, boundaries
        assert app.stats["infer"] == 1 and session.estimator.bandwidth_samples == 1
        assert session.explore() is not None and app.stats["infer"] == 2
    finally:
        session.close()
        httpd.drain(5)


def test_background_notices_a_faster_link_while_on_the_device(variant_dir, relay, x):
    """Running device-only sends nothing; with periodic explores a minute apart, what brings the
    session back to v1 within seconds is the round-trip probes seeing the change (a surprising
    round trip is probed again at once) and asking for re-check explores, then two evaluations
    of a > 2x gain."""
    relay.delay_s = 0.06
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{relay.port}", token=TOKEN, initial=0,
                              probe_interval_s=0.2, explore_interval_s=60.0)
    try:
        deadline = time.monotonic() + 10
        while (session.estimator.bandwidth_samples < 1 or session.estimator.rtt_samples < 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.estimator.bandwidth_samples >= 1 and session.current == 0, session.predict()
        relay.delay_s = 0.0
        tick = time.monotonic()
        while session.current != 1 and time.monotonic() - tick < 10:
            time.sleep(0.02)
        took = time.monotonic() - tick
        assert session.current == 1, (session.predict(), session.estimator.to_json())
        assert took < 4.0, took  # the periodic explore is a minute away: probes and re-checks did it
        assert session.switches[-1]["reason"] in ("probe", "explore")
        assert session.infer([x]).variant == 1
    finally:
        session.close()


def test_unreachable_server_answers_locally_and_switches_at_once(variant_dir, relay, x, expected):
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{relay.port}", token=TOKEN, initial=1, background=False,
                              timeout=1.0, retries=2)
    try:
        assert session.infer([x]).source == "remote"
        relay.close()
        result = session.infer([x])
        assert result.variant == 1 and result.source == "local-fallback" and result.error
        _close_to(result, expected)
        assert session.current == 0 and session.switches[-1]["reason"] == "server unreachable"
        assert session.switches[-1]["reachable"] is False
        assert session.probe() is None and session.explore() is None  # still down: nothing changes
        assert session.infer([x]).source == "local"
    finally:
        session.close()


def test_background_prober_keeps_estimates_fresh(variant_dir, server, x):
    session = AdaptiveSession(variant_dir, f"http://127.0.0.1:{server.port}", token=TOKEN, initial=0,
                              probe_interval_s=0.05, explore_interval_s=0.1, patience=10**6)
    try:
        deadline = time.monotonic() + 5
        while (session.estimator.rtt_samples < 3 or session.estimator.bandwidth_samples < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.estimator.rtt_samples >= 3 and session.estimator.bandwidth_samples >= 1
        assert session.infer([x]).variant == 0  # patience this large never switches
    finally:
        session.close()
    assert not session._thread.is_alive()
