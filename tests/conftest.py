"""Shared fixtures: the test-model zoo exported once per session.

Exporting is the slow part of these tests, so every model is exported to a `.pt2` and imported
through `splitc.frontend.import_model` at most once per session, lazily (a test run that needs only
one model pays for one). Tests must not modify the graphs they get beyond the TIER tags that
`assign_tiers` rewrites in full every time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import models

# Most tests are about one backend (TVM's builds, tuning, ONNX export...): they compile with each
# target's preferred backend instead of compiling and timing every candidate, which would double
# their compile time; tests/test_backend_choice.py covers the measured choice.
os.environ.setdefault("SPLITC_BACKEND_CHOICE", "preferred")


class Zoo:
    """Lazily exported and imported test models, keyed by factory name (see tests.models.ZOO)."""

    names = tuple(models.ZOO)

    def __init__(self, directory: Path):
        self.directory = directory
        self._modules: dict[str, torch.nn.Module] = {}
        self._paths: dict[str, Path] = {}
        self._imported: dict[str, tuple] = {}

    def module(self, name: str) -> torch.nn.Module:
        if name not in self._modules:
            self._modules[name] = models.ZOO[name]()
        return self._modules[name]

    def inputs(self, name: str) -> tuple[torch.Tensor, ...]:
        return models.ZOO[name].example_inputs()

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = models.save_pt2(self.module(name), self.inputs(name), self.directory / f"{name}.pt2")
        return self._paths[name]

    def loaded(self, name: str):
        return self._import(name)[0]

    def graph(self, name: str):
        return self._import(name)[1]

    def _import(self, name: str):
        if name not in self._imported:
            from splitc.frontend import import_model

            self._imported[name] = import_model(self.path(name))
        return self._imported[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def resnet_graph(zoo):
    return zoo.graph("resnet_like")


@pytest.fixture(scope="session")
def multi_io_graph(zoo):
    return zoo.graph("multi_io")


@pytest.fixture(params=Zoo.names)
def zoo_name(request) -> str:
    """Parametrises a test over every model of the zoo."""
    return request.param



@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """The example small ResNet as a .pt2, with an input and torch's output for it."""
    from examples.small_resnet import build as build_small_resnet

    root = tmp_path_factory.mktemp("model")
    model = build_small_resnet()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.export.save(torch.export.export(model, (x,)), root / "m.pt2")
    np.save(root / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(root / "y.npy", model(x).numpy())
    return {"pt2": root / "m.pt2", "x": root / "x.npy", "y": root / "y.npy", "root": root}


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory):
    """A digits CNN trained on 900 images, as a .pt2 and a graph; 600 calibration images (calib.npz,
    `samples`, `labels`) and 297 unseen test images drawn from the same shuffled pool."""
    pytest.importorskip("sklearn.datasets")
    from examples.digits import DigitsCNN, load_digits_arrays, train_classifier
    from tests.models import save_pt2

    images, labels = load_digits_arrays()
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(width=8), images[:900], labels[:900], steps=120)
    from splitc.frontend import import_model

    root = tmp_path_factory.mktemp("exits")
    pt2 = save_pt2(model, (torch.from_numpy(images[:1]),), root / "digits.pt2")
    _, graph = import_model(pt2)
    # The compiler sees `calib`; `test` is unseen. Both are drawn from the same shuffled pool: a
    # threshold calibrated on one distribution promises nothing on another (the digits file is
    # ordered by writer group, so contiguous slices differ).
    pool = 900 + np.random.default_rng(0).permutation(len(images) - 900)
    calib, test = pool[:600], pool[600:]
    np.savez(root / "calib.npz", x=images[calib], y=labels[calib])
    samples = [(torch.from_numpy(images[i:i + 1]),) for i in calib]
    return {"graph": graph, "pt2": pt2, "root": root, "samples": samples, "labels": labels[calib],
            "test_x": images[test], "test_y": labels[test]}


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory):
    """A TVM RPC server on loopback, in its own process group (it forks a worker), stopped after;
    yields HOST:PORT. For profiling and tuning over RPC without a device."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("rpc") / "rpc_server.log"
    with open(log, "w") as stream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
            stdout=stream, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while f"bind to 127.0.0.1:{port}" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TVM RPC server did not start: {log.read_text()[-500:]}")
            time.sleep(0.1)
        time.sleep(0.2)  # bind is logged just before listen()
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test created: the server and its worker
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
