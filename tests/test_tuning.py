"""MetaSchedule tuning and the tuning database (backends/tuning.py).

The tuning test really tunes (no mocks): a 2-conv CNN at 1x3x16x16, 2 tasks, a small trial budget
and a small search population, about 1-2 minutes on 2 cores. Then two compiles must both apply the
records without tuning, agree bit for bit, and pass verify.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from splitc.backends import tuning
from torch import nn

from splitc.cli_tune import parse_budget
from splitc.errors import InputError

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "host"}


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = TwoConv().eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(path))
    return path


def test_parse_budget():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1h") == 3600 and parse_budget("2.5") == 2.5
    with pytest.raises(InputError):
        parse_budget("soon")


def test_target_key_is_per_target_and_resolves_host():
    resolved = tuning.resolve_target(X86)
    assert resolved["mcpu"] != "host" and resolved["num-cores"] >= 1
    other = dict(resolved, **{"num-cores": resolved["num-cores"] + 1})
    assert tuning.target_key(resolved) != tuning.target_key(other)
    assert tuning.target_key(resolved) == tuning.target_key(dict(reversed(list(resolved.items()))))


def test_repair_drops_a_cut_line_and_keeps_whole_ones(tmp_path):
    (tmp_path / tuning.WORKLOAD_FILE).write_text('["h1", "mod1"]\n["h2", "mod2"]\n["h3", "mo')
    (tmp_path / tuning.RECORD_FILE).write_text('[0, ["trace"]]\n[1, ["trace"]]\n[2, ["trace"]]\n[1, ["tr')
    assert tuning.repair_database(tmp_path) == 3  # the cut workload, the record pointing at it, the cut record
    assert tuning.database_stats(tmp_path) == {"workloads": 2, "records": 2}
    assert tuning.repair_database(tmp_path) == 0
    for name in (tuning.WORKLOAD_FILE, tuning.RECORD_FILE):
        for line in (tmp_path / name).read_text().splitlines():
            json.loads(line)


def _compile(pt2: Path, out: Path):
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets

    from splitc.compiler import compile_model

    _, graph = import_model(pt2)
    return compile_model(graph, load_targets("x86"), out, link=load_link("4g"), samples=2)


def _run(bundle: Path, x: np.ndarray) -> np.ndarray:
    from splitc.runtime import Bundle, SplitSession

    session = SplitSession(Bundle.open(bundle))
    return next(iter(session.run({session.manifest.inputs[0].name: x}).values()))


def test_tune_then_compile_reuses_records(cnn_pt2, tmp_path, monkeypatch):
    from splitc.frontend import import_model
    from tvm.relax.frontend.torch import from_exported_program

    from splitc.verify import verify_bundle

    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    untuned = _compile(cnn_pt2, tmp_path / "untuned.splitc")
    info = untuned.manifest.partitions[0].artifacts[0].options["tuning"]
    assert info["tasks"] == 2 and info["tasks_with_record"] == 0 and info["chosen"] == "untuned"

    _, graph = import_model(cnn_pt2)
    mod = from_exported_program(torch.export.load(str(cnn_pt2)), keep_params_as_input=False)
    report = tuning.tune_module(mod, X86, trials=32, trials_per_task=16, population=64)
    assert report.stopped == "finished" and report.tasks == 2
    assert report.new_records > 0 and report.coverage.with_record == 2
    records = tuning.database_stats(report.directory)["records"]
    record_file = report.directory / tuning.RECORD_FILE
    stamp = record_file.stat().st_mtime_ns

    first = _compile(cnn_pt2, tmp_path / "a.splitc")
    second = _compile(cnn_pt2, tmp_path / "b.splitc")
    for result in (first, second):
        info = result.manifest.partitions[0].artifacts[0].options["tuning"]
        assert info["tasks"] == 2 and info["tasks_with_record"] == 2, info
        assert info["chosen"] in ("tuned", "untuned") and info["tuned_ms"] > 0
        assert any("2/2 TVM tasks had a tuning record" in n for n in result.notes)
    # Compiling ran no tuning: the database is untouched.
    assert tuning.database_stats(report.directory)["records"] == records and record_file.stat().st_mtime_ns == stamp

    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    a, b = _run(first.bundle, x), _run(second.bundle, x)
    np.testing.assert_array_equal(a, b)
    for bundle in (first.bundle, second.bundle):
        assert verify_bundle(bundle).ok
    # The tuned build computes what torch computes.
    expected = graph.module(torch.from_numpy(x))
    expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).detach().numpy()
    assert np.linalg.norm(a - expected) / np.linalg.norm(expected) < 1e-5


def test_compile_with_tuning_disabled(cnn_pt2, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPLITC_TUNING", "0")
    result = _compile(cnn_pt2, tmp_path / "off.splitc")
    assert result.manifest.partitions[0].artifacts[0].options["tuning"]["chosen"].startswith("untuned")


@pytest.mark.slow
def test_ctrl_c_keeps_finished_records(cnn_pt2, tmp_path):
    """`splitc tune` interrupted with SIGINT once records exist: exit 130, readable database, records kept."""
    env = dict(os.environ, SPLITC_CACHE=str(tmp_path / "cache"))
    script = "from splitc.cli import cli, main\nfrom splitc.cli_tune import tune\ncli.add_command(tune)\nmain()\n"
    proc = subprocess.Popen([sys.executable, "-c", script, "tune", str(cnn_pt2), "--target", "x86", "--budget", "30m"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = tmp_path / "cache" / "tuning"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        files = list(root.glob(f"*/{tuning.RECORD_FILE}"))
        if files and files[0].stat().st_size > 0:
            break
        time.sleep(2)
    else:
        proc.kill()
        pytest.fail("no tuning record within 400 s")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    directory = files[0].parent
    assert tuning.repair_database(directory) == 0  # the run already left whole lines only
    assert tuning.database_stats(directory)["records"] > 0
    tuning.open_database(directory)  # MetaSchedule itself reads it
