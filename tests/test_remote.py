"""The edge runtime (splitc.runtime.remote) against a real `splitc serve` server on 127.0.0.1: the
answer equals the in-process chain, inputs and the server's model are checked before anything is
sent, retries reach a server that comes up late, and an unreachable server means a local fallback
that says so."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from splitc.runtime import Bundle, SplitSession
from splitc.runtime.remote import RemoteSession
from splitc.runtime.server import PartitionServer, make_http_server, serve_in_thread
from splitc.runtime.v2protocol import RemoteError

from splitc.core.errors import BundleError, InputError
from tests.serving import TOKEN, build_bundle, free_port, running_server


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return Bundle.open(build_bundle(tmp_path_factory.mktemp("remote")))


@pytest.fixture(scope="module")
def x(bundle) -> np.ndarray:
    return np.load(bundle.path.parent / "x.npy")


@pytest.fixture(scope="module")
def expected(bundle, x) -> dict[str, np.ndarray]:
    return SplitSession(bundle).run([x])


@pytest.fixture(scope="module")
def server(bundle):
    with running_server(bundle, 1) as running:
        yield running


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_allclose(value, b[name], rtol=1e-5, atol=1e-6)


def test_remote_answer_equals_the_local_chain(bundle, server, x, expected):
    _, _, url = server
    remote = RemoteSession(bundle, url, token=TOKEN)
    result = remote.infer({bundle.manifest.inputs[0].name: x})
    assert result.source == "remote" and result.error is None and result.attempts == 1
    _close(result.outputs, expected)
    boundary_bytes = sum(t.nbytes for t in bundle.manifest.boundaries[0])
    assert boundary_bytes < result.bytes_sent < boundary_bytes + 1024  # binary extension: raw bytes + a small header
    assert result.timings["total_ms"] >= result.timings["remote_ms"] > 0 and "local_ms" in result.timings
    assert remote.split == 1
    # Overhead of the remote path beyond computing: the round trip minus what the server computed.
    results = [remote.infer([x]) for _ in range(20)]
    network = sorted(r.timings["remote_ms"] for r in results)
    print(f"\nremote: median round trip {network[10]:.2f} ms for {result.bytes_sent} B over loopback")
    remote.close()


def test_inputs_are_checked_before_anything_is_sent(bundle, server, x):
    app, _, url = server
    remote = RemoteSession(bundle, url, token=TOKEN)
    before = dict(app.stats)
    with pytest.raises(InputError, match=r"\[1, 3, 32, 32\]"):
        remote.infer([np.zeros((1, 3, 32, 32), np.float32)])
    with pytest.raises(InputError, match="float64"):
        remote.infer([x.astype(np.float64)])
    with pytest.raises(InputError, match="unknown input"):
        remote.infer({"nope": x})
    assert app.stats == before


def test_a_server_with_another_model_is_refused_before_sending(bundle, x, tmp_path):
    other = tmp_path / "other.splitc"
    shutil.copytree(bundle.path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with running_server(Bundle.open(other), 1) as (app, _, url):
        remote = RemoteSession(bundle, url, token=TOKEN)
        with pytest.raises(BundleError) as info:
            remote.infer([x])
        message = str(info.value)
        assert "sha256 000000000000" in message and "same bundle" in message and "\n" not in message
        assert app.stats["infer"] == 0


def test_wrong_token_is_an_error_not_a_fallback(bundle, server, x):
    _, _, url = server
    with pytest.raises(RemoteError, match="refused the token"):
        RemoteSession(bundle, url, token="wrong-token-wrong-token").infer([x])
    with pytest.raises(RemoteError, match="refused the token"):
        RemoteSession(bundle, url).infer([x])


def test_unreachable_server_falls_back_within_the_timeout(bundle, x, expected):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    remote = RemoteSession(bundle, url, token=TOKEN, timeout=0.5, retries=3, backoff=0.05)
    started = time.perf_counter()
    result = remote.infer([x])
    elapsed = time.perf_counter() - started
    assert result.source == "local-fallback" and "Connection refused" in result.error
    _close(result.outputs, expected)
    assert elapsed < 0.5 + 5.0  # the network budget, plus running the model here (TVM load included)
    assert result.timings["fallback_ms"] > 0
    with pytest.raises(RemoteError, match="fallback disabled"):
        RemoteSession(bundle, url, token=TOKEN, timeout=0.3, fallback=False).infer([x])


def test_blackholed_server_times_out_then_falls_back(bundle, x, expected):
    # A listener that accepts connections and never answers: the timeout, not the OS, ends the wait.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(16)
    try:
        remote = RemoteSession(bundle, f"http://127.0.0.1:{sink.getsockname()[1]}", token=TOKEN, timeout=0.6, retries=2)
        started = time.perf_counter()
        result = remote.infer([x])
        assert result.source == "local-fallback" and "timed out" in result.error
        assert time.perf_counter() - started < 0.6 + 5.0
        _close(result.outputs, expected)
    finally:
        sink.close()


def test_retries_reach_a_server_that_comes_up_late(bundle, x, expected):
    port = free_port()
    app = PartitionServer(bundle, 1, token=TOKEN)
    holder = {}

    def start_later():
        time.sleep(0.4)
        holder["httpd"] = make_http_server(app, "127.0.0.1", port)
        serve_in_thread(holder["httpd"])

    threading.Thread(target=start_later).start()
    remote = RemoteSession(bundle, f"http://127.0.0.1:{port}", token=TOKEN, timeout=5.0, retries=8, backoff=0.05, split=1)
    try:
        result = remote.infer([x])
        assert result.source == "remote", result.error
        _close(result.outputs, expected)
    finally:
        time.sleep(0.5)  # the starter thread has certainly run by now
        if "httpd" in holder:
            holder["httpd"].drain(5)


def test_run_remote_helper_for_the_cli(bundle, server, x, tmp_path, expected):
    from splitc.cli.serve import run_remote

    (tmp_path / "secret").write_text(TOKEN)
    lines = []
    result = run_remote(bundle.path, {bundle.manifest.inputs[0].name: x}, server[2], token_file=str(tmp_path / "secret"), echo=lines.append)
    assert result.source == "remote" and lines and lines[0].startswith("answer from remote")
    _close(result.outputs, expected)


def test_serving_modules_stay_light():
    code = ("import json, sys; import splitc.runtime.remote, splitc.runtime.server, splitc.runtime.v2protocol; "
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = ("torch", "onnx", "onnxruntime", "tvm", "click", "splitc.frontend", "splitc.passes", "splitc.backends", "splitc.drivers.compiler")
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)] == []


def test_splitc_run_remote_command(bundle, server, x, tmp_path, expected, capsys):
    """`splitc run --remote` end to end through the CLI: the answer comes from the server."""
    from tests.test_cli import run_cli

    (tmp_path / "secret").write_text(TOKEN)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli("run", bundle.path, "--input", tmp_path / "x.npy", "--remote", server[2],
                             "--token-file", tmp_path / "secret", "-o", tmp_path / "y.npz", capsys=capsys)
    assert code == 0, err
    assert "answer from remote" in out
    with np.load(tmp_path / "y.npz") as got:
        _close({k: got[k] for k in got.files}, expected)
    (tmp_path / "wrong").write_text("x" * 32)
    code, _, err = run_cli("run", bundle.path, "--input", tmp_path / "x.npy", "--remote", server[2],
                           "--token-file", tmp_path / "wrong", "--no-fallback", capsys=capsys)
    assert code == 13 and "token" in err.lower()
