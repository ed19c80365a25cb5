"""A real Triton Inference Server (the tritonserver nvidia-pytriton bundles, with its Python
backend) loads the repository `splitc export-triton --format python` writes, and `splitc run
--remote` gets the local chain's answer from it, unchanged. Slow: Triton takes ~20 s to start.
Needs the Python environment scripts/setup_triton.sh makes (setup.sh runs it)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from splitc.core.errors import ToolchainError
from splitc.drivers.triton import export_triton
from splitc.drivers.triton_server import find_tritonserver, start_tritonserver, stop_tritonserver, wait_until_ready
from splitc.runtime import Bundle, SplitSession

from tests.serving import TOKEN, build_bundle, free_port
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def install():
    try:
        return find_tritonserver()
    except ToolchainError as exc:
        pytest.skip(f"Triton cannot start here: {exc}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return Bundle.open(build_bundle(tmp_path_factory.mktemp("triton-real")))  # x86 TVM -> cloud-cpu ONNX Runtime


@pytest.fixture(scope="module")
def triton(install, bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("tritonserver")
    export_triton(bundle.path, work / "repo", fmt="python")
    http_port, grpc_port = free_port(), free_port()
    proc = start_tritonserver(work / "repo", install, http_port=http_port, grpc_port=grpc_port, workdir=work / "run", token=TOKEN)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until_ready(proc, url, timeout=180)
    except ToolchainError:
        stop_tritonserver(proc)
        raise AssertionError("tritonserver did not load the exported model:\n" + (work / "run" / "tritonserver.log").read_text()[-3000:]) from None
    yield url
    assert stop_tritonserver(proc) == 0


def _get(url: str, token: str | None = TOKEN):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def test_triton_serves_the_exported_partition_with_its_sha256_behind_the_token(triton, bundle):
    name = bundle.manifest.model["name"]
    config = _get(f"{triton}/v2/models/{name}/config")
    assert config["backend"] == "python"
    assert config["parameters"]["model_sha256"]["string_value"] == bundle.manifest.model["sha256"]
    meta = _get(f"{triton}/v2/models/{name}")
    assert [i["name"] for i in meta["inputs"]] == [t.name for t in bundle.manifest.boundaries[0]]
    for token in (None, "x" * 32):
        with pytest.raises(urllib.request.HTTPError, match="403"):
            _get(f"{triton}/v2/models/{name}", token)


def test_splitc_run_remote_gets_the_local_chains_answer_from_triton(triton, bundle, tmp_path, capsys):
    x = np.load(bundle.path.parent / "x.npy")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "secret").write_text(TOKEN)
    code, out, err = run_cli("run", bundle.path, "--input", tmp_path / "x.npy", "--remote", triton, "--no-fallback",
                             "--token-file", tmp_path / "secret", "-o", tmp_path / "y.npz", capsys=capsys)
    assert code == 0, err
    assert "answer from remote" in out
    expected = SplitSession(bundle).run([x])
    with np.load(tmp_path / "y.npz") as got:
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
