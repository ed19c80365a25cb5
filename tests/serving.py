"""Helpers shared by the serving tests (test_server, test_remote, test_triton): a small two-tier
bundle (TVM on this host's x86, ONNX Runtime in the cloud, cut after layer2) and a real
`splitc serve` server on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from splitc.runtime import Bundle
from splitc.runtime.server import PartitionServer, make_http_server, serve_in_thread

TOKEN = "test-token-0123456789abcdef"


def build_bundle(directory: Path, targets: str = "x86,cloud-cpu", cut: str = "layer2") -> Path:
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets

    from examples.small_resnet import build
    from splitc.drivers.compiler import compile_model
    from splitc.passes.contract import CompileOptions

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    pt2 = directory / "m.pt2"
    torch.export.save(torch.export.export(build(), (x,)), pt2)
    np.save(directory / "x.npy", x.numpy())
    _, graph = import_model(pt2)
    out = directory / "m.splitc"
    compile_model(graph, CompileOptions(load_targets(targets), cut=cut, link=load_link("4g"), samples=1), out)
    return out


@contextlib.contextmanager
def running_server(bundle: Bundle, first: int = 1, **kwargs) -> Iterator[tuple[PartitionServer, object, str]]:
    kwargs.setdefault("token", TOKEN)
    app = PartitionServer(bundle, first, **kwargs)
    httpd = make_http_server(app, "127.0.0.1", 0)
    serve_in_thread(httpd)
    try:
        yield app, httpd, f"http://127.0.0.1:{httpd.port}"
    finally:
        httpd.drain(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        if own:
            conn.close()


def auth(extra: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **(extra or {})}


def error_of(data: bytes) -> str:
    payload = json.loads(data)
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"], payload
    return payload["error"]
