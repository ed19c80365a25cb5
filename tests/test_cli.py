"""End-to-end through the command line: compile → verify → run, and every bad-input path
(one-line error, the documented exit code, nothing half-written)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.small_resnet import build as build_small_resnet
from splitc.cli import main
from splitc.core.manifest import read_manifest


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bundle(model_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "m.splitc"
    try:
        main(["compile", str(model_files["pt2"]), "--targets", "rpi4,a100", "--cut", "layer2", "-o", str(out)])
    except SystemExit as exc:
        assert not exc.code, f"compile exited {exc.code}"
    return out


def test_compile_writes_a_complete_bundle(bundle):
    manifest = read_manifest(bundle)
    assert [p.target for p in manifest.partitions] == ["rpi4", "a100"]
    p0, p1 = manifest.partitions
    assert {a.role for a in p0.artifacts} == {"deploy", "host-twin"}
    assert {a.arch for a in p0.artifacts} == {"aarch64", "x86_64"}
    assert (bundle / p0.artifact("deploy").path).read_bytes()[:4] == b"\x7fELF"
    assert p1.engine["status"] == "deferred" and p1.artifact("portable").path.endswith(".onnx")
    # The cut after layer2 sends exactly what layer3 reads: one tensor, named in both places.
    assert manifest.plan["cuts"][0]["crossing"] == [t.name for t in manifest.boundaries[0]]
    assert [t.name for t in p1.inputs] == [t.name for t in manifest.boundaries[0]]
    assert manifest.reference["samples"] == 4
    assert not list(bundle.parent.glob(".*staging"))


def test_verify_passes_and_writes_reports(bundle, tmp_path, capsys):
    code, out, _ = run_cli("verify", bundle, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml", capsys=capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is True
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["end-to-end (chained artifacts vs torch)"] == "pass"
    assert "skip" in statuses.values()  # the deferred TensorRT engine is reported, not passed
    end = next(c for c in report["checks"] if c["partition"] is None)
    assert end["top1"] == 1.0 and 0 < end["max_rel_err"] < 1e-4
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == len(report["checks"]) and suite.get("failures") == "0"


def test_run_matches_torch(bundle, model_files, tmp_path, capsys):
    code, out, _ = run_cli("run", bundle, "--input", model_files["x"], "-o", tmp_path / "y.npz", capsys=capsys)
    assert code == 0, out
    with np.load(tmp_path / "y.npz") as got:
        (value,) = [got[k] for k in got.files]
    expected = np.load(model_files["y"])
    assert np.linalg.norm(value - expected) / np.linalg.norm(expected) < 1e-4
    assert np.argmax(value) == np.argmax(expected)


def test_verify_fails_beyond_tolerance(model_files, tmp_path, capsys):
    strict = tmp_path / "strict.toml"
    text = (Path(__file__).parents[1] / "targets" / "x86.toml").read_text()
    strict.write_text(text.replace('name = "x86"', 'name = "x86-strict"').replace("rtol = 1e-4", "rtol = 1e-15"))
    out = tmp_path / "strict.splitc"
    assert run_cli("compile", model_files["pt2"], "--targets", f"{strict},cloud-cpu", "-o", out, capsys=capsys)[0] == 0
    code, _, err = run_cli("verify", out, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml", capsys=capsys)
    assert code == 10
    assert "verification failed" in err and "x86-strict" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False
    assert ET.parse(tmp_path / "r.xml").getroot().find("testsuite").get("failures") != "0"


def test_tampered_artifact_is_refused(bundle, tmp_path, capsys):
    copy = tmp_path / "tampered.splitc"
    shutil.copytree(bundle, copy)
    artifact = copy / read_manifest(copy).partitions[0].artifact("host-twin").path
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    for command in ("verify", "run"):
        args = [command, copy] + (["--input", str(bundle)] if command == "run" else [])
        code, _, err = run_cli(*args, capsys=capsys)
        assert code == 8, (command, err)
        assert "sha256" in err and "refusing" in err


def test_build_engine_without_tensorrt_changes_nothing(bundle, tmp_path, capsys):
    from splitc.runtime.executors import tensorrt_usable

    if tensorrt_usable():
        pytest.skip("TensorRT is usable here; tests/test_tensorrt.py covers the build")
    copy = tmp_path / "engine.splitc"
    shutil.copytree(bundle, copy)
    before = (copy / "manifest.json").read_bytes()
    code, _, err = run_cli("build-engine", copy, capsys=capsys)
    assert code == 11 and "GPU host" in err
    assert (copy / "manifest.json").read_bytes() == before


def test_three_tiers_with_cuts_by_module(model_files, tmp_path, capsys):
    out = tmp_path / "three.splitc"
    code, text, err = run_cli("compile", model_files["pt2"], "--targets", "rpi4,x86,cloud-cpu", "--cut", "layer1,layer2", "-o", out, capsys=capsys)
    assert code == 0, err
    manifest = read_manifest(out)
    assert [p.backend for p in manifest.partitions] == ["tvm", "tvm", "onnxruntime"]
    assert len(manifest.boundaries) == 2
    code, text, err = run_cli("verify", out, "--no-emulation", capsys=capsys)
    assert code == 0, text


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["compile", "{missing}", "--targets", "rpi4,a100"], 3, ["does not exist"]),
        (["compile", "{corrupt}", "--targets", "rpi4,a100"], 3, ["torch.export"]),
        (["compile", "{pickle}", "--targets", "rpi4,a100", "--input-shape", "1,3,64,64"], 3, ["--trust-pickle"]),
        (["compile", "{pt2}", "--targets", "rpi4,tpu9"], 4, ["tpu9", "rpi4"]),
        (["compile", "{pt2}", "--targets", "rpi4,a100", "--cut", "layer9"], 6, ["layer9", "splitc inspect"]),
        (["compile", "{pt2}", "--targets", "rpi4,a100", "--cut", "layer1,layer2"], 6, ["2 targets need 1 cut"]),
        (["compile", "{pt2}", "--targets", "rpi4,a100", "--link", "5g"], 4, ["5g", "4g"]),
        (["compile", "examples.small_resnet:build", "--targets", "rpi4,a100"], 7, ["--input-shape"]),
        (["compile", "examples.small_resnet:nothing", "--targets", "rpi4,a100", "--input-shape", "1,3,64,64"], 3, ["nothing"]),
        (["compile", "examples.small_resnet:build", "--targets", "rpi4", "--input-shape", "1,3,x"], 7, ["1,3,x"]),
    ],
)
def test_bad_input_gets_one_line_and_exit_code(args, code, words, model_files, tmp_path, capsys):
    (tmp_path / "corrupt.pt2").write_bytes(b"not a model")
    torch.save(build_small_resnet(), tmp_path / "model.pt")
    paths = {"missing": tmp_path / "nope.pt2", "corrupt": tmp_path / "corrupt.pt2", "pickle": tmp_path / "model.pt", "pt2": model_files["pt2"]}
    out = tmp_path / "out.splitc"
    argv = [a.format(**paths) for a in args] + ["-o", str(out)]
    got, _, err = run_cli(*argv, capsys=capsys)
    assert got == code, err
    message = " ".join(err.split())
    assert message.startswith("splitc: error:") and all(w in message for w in words), message
    assert not out.exists() and not list(tmp_path.glob(".out.splitc*"))


def test_pickle_loads_with_trust(model_files, tmp_path, capsys):
    torch.save(build_small_resnet(), tmp_path / "model.pt")
    code, _, err = run_cli("inspect", tmp_path / "model.pt", "--trust-pickle", "--input-shape", "1,3,64,64", "--json", capsys=capsys)
    assert code == 0, err


def test_unsupported_operator_names_node_op_and_target(tmp_path, capsys):
    class Special(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(torch.logcumsumexp(torch.tanh(self.fc1(x)) * 0.5, dim=1))

    x = torch.randn(2, 8)
    torch.export.save(torch.export.export(Special().eval(), (x,)), tmp_path / "special.pt2")
    out = tmp_path / "special.splitc"
    code, _, err = run_cli("compile", tmp_path / "special.pt2", "--targets", "rpi4,cloud-cpu", "--cut", "logcumsumexp",
                           "--backend", "rpi4=tvm", "-o", out, capsys=capsys)
    message = " ".join(err.split())
    assert code == 5, message
    assert "node logcumsumexp" in message and "logcumsumexp.default" in message and "rpi4" in message
    assert not out.exists() and not list(tmp_path.glob(".special.splitc*"))
    # Without the override the gap fails nothing: rpi4's next candidate, ONNX Runtime, takes the partition.
    code, text, err = run_cli("compile", tmp_path / "special.pt2", "--targets", "rpi4,cloud-cpu", "--cut", "logcumsumexp", "-o", out,
                              capsys=capsys)
    assert code == 0, err
    assert "tvm skipped: no converter for node logcumsumexp" in " ".join(text.split())
    assert run_cli("verify", out, capsys=capsys)[0] == 0


def test_run_refuses_wrong_input_shape_and_dtype(bundle, tmp_path, capsys):
    np.save(tmp_path / "bad_shape.npy", np.zeros((1, 3, 32, 32), np.float32))
    np.save(tmp_path / "bad_dtype.npy", np.zeros((1, 3, 64, 64), np.float64))
    for name, words in (("bad_shape", ["[1, 3, 32, 32]", "[1, 3, 64, 64]"]), ("bad_dtype", ["float64", "float32"])):
        code, _, err = run_cli("run", bundle, "--input", tmp_path / f"{name}.npy", capsys=capsys)
        message = " ".join(err.split())
        assert code == 7 and all(w in message for w in words), message


def test_output_path_that_is_not_a_bundle_is_refused(model_files, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = run_cli("compile", model_files["pt2"], "--targets", "x86,cloud-cpu", "-o", precious, capsys=capsys)
    assert code == 8 and "not a splitc bundle" in err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_inspect_lists_cuts_in_order_with_bytes(model_files, capsys):
    code, out, _ = run_cli("inspect", model_files["pt2"], "--targets", "rpi4,a100", "--json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    positions = [c["position"] for c in report["cuts"]]
    assert positions == sorted(positions) and len(positions) == report["candidate_cuts"] > 10
    assert all(c["bytes"] > 0 and c["tensors"] >= 1 and c["estimated_ms"] > 0 for c in report["cuts"])
    # Inside a residual block both the branch and the skip tensor cross.
    assert any(c["tensors"] == 2 for c in report["cuts"]) and any(c["tensors"] == 1 for c in report["cuts"])


def test_targets_lists_every_builtin(capsys):
    code, out, _ = run_cli("targets", capsys=capsys)
    assert code == 0
    for name in ("rpi4", "a100", "h100", "x86", "cloud-cpu", "4g"):
        assert name in out
