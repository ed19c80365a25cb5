"""`splitc export-triton`: the repository it writes is parsed back (a hand parser for the protobuf
text-format subset Triton configs use) and checked against the bundle: inputs are the boundary
tensors, outputs the model outputs, the model file is the bundle's own, the sha256 is carried."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from splitc.runtime import Bundle
from splitc.core.manifest import RUNTIME_TENSORRT, read_manifest, sha256_file

from splitc.core.bundle import record_artifact, write_manifest
from splitc.core.errors import BundleError, InputError
from splitc.drivers.triton import export_triton
from tests.serving import build_bundle

# ------------------------------------------------------------------ protobuf text-format subset

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][A-Za-z0-9_]*)|(-?\d+(?:\.\d+)?)|([{}\[\]:,]))')


def _tokens(text: str) -> list[tuple[str, object]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unexpected character at {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        comment, string, ident, number, punct = m.groups()
        if comment:
            continue
        if string:
            out.append(("str", json.loads(string)))
        elif ident:
            out.append(("ident", ident))
        elif number:
            out.append(("num", float(number) if "." in number else int(number)))
        else:
            out.append(("punct", punct))
    return out


def parse_pbtxt(text: str) -> dict:
    """Fields -> list of values (every field may repeat); messages are dicts; enums are strings."""
    tokens = _tokens(text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else ("eof", None)

    def take(kind=None, value=None):
        nonlocal pos
        tok = peek()
        if (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value or kind}, got {tok}")
        pos += 1
        return tok

    def scalar_or_message():
        tok = peek()
        if tok == ("punct", "{"):
            take()
            msg = fields(end="}")
            take("punct", "}")
            return msg
        if tok[0] in ("str", "num", "ident"):
            take()
            return tok[1]
        raise ValueError(f"expected a value, got {tok}")

    def value():
        if peek() == ("punct", "["):
            take()
            items = []
            while peek() != ("punct", "]"):
                items.append(scalar_or_message())
                if peek() == ("punct", ","):
                    take()
                elif peek() != ("punct", "]"):
                    raise ValueError(f"expected , or ], got {peek()}")
            take("punct", "]")
            return items
        return scalar_or_message()

    def fields(end=None):
        msg: dict = {}
        while peek()[0] != "eof" and peek() != ("punct", end):
            _, name = take("ident")
            if peek() == ("punct", ":"):
                take()
            elif peek() not in (("punct", "{"), ("punct", "[")):  # message fields may omit the colon
                raise ValueError(f"field {name}: expected ':', '{{' or '[', got {peek()}")
            v = value()
            msg.setdefault(name, []).extend(v if isinstance(v, list) else [v])
        return msg

    parsed = fields()
    if peek()[0] != "eof":
        raise ValueError(f"trailing tokens from {peek()}")
    return parsed


def test_the_parser_refuses_malformed_text():
    assert parse_pbtxt('a: 1 b { c: "x\\"y" } d: [1, 2] # note\n') == {"a": [1], "b": [{"c": ['x"y']}], "d": [1, 2]}
    for bad in ("a: ", "a 1", "a: [1 2]", "a { b: 1", 'a: "open', "a: 1 }", "a: @"):
        with pytest.raises(ValueError):
            parse_pbtxt(bad)


# ------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    # a100: the cloud partition is TensorRT-ready ONNX with a deferred engine (no GPU here).
    return Bundle.open(build_bundle(tmp_path_factory.mktemp("triton"), targets="x86,a100"))


def _config(model_dir: Path) -> dict:
    return parse_pbtxt((model_dir / "config.pbtxt").read_text())


def test_export_writes_a_valid_onnx_repository(bundle, tmp_path):
    model_dir = export_triton(bundle.path, tmp_path / "repo")
    manifest = bundle.manifest
    config = _config(model_dir)
    assert model_dir.name == config["name"][0] == manifest.model["name"]
    assert config["platform"] == ["onnxruntime_onnx"] and config["max_batch_size"] == [0]
    boundary = manifest.boundaries[0]
    assert [(i["name"][0], i["data_type"][0], i["dims"]) for i in config["input"]] == [
        (t.name, "TYPE_FP32", list(t.shape)) for t in boundary]
    assert [(o["name"][0], o["data_type"][0], o["dims"]) for o in config["output"]] == [
        (t.name, "TYPE_FP32", list(t.shape)) for t in manifest.outputs]
    assert config["instance_group"] == [{"count": [1], "kind": ["KIND_GPU"]}]  # a100: ONNX Runtime on the GPU
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in config["parameters"]}
    assert params["model_sha256"] == manifest.model["sha256"] and params["splitc_partition"] == "1"
    onnx_artifact = manifest.partitions[1].artifact("portable")
    assert sha256_file(model_dir / "1" / "model.onnx") == onnx_artifact.sha256
    assert sorted(p.name for p in model_dir.rglob("*")) == ["1", "config.pbtxt", "model.onnx"]
    # Exporting again replaces the model directory and leaves no staging behind.
    export_triton(bundle.path, tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [model_dir.name]


def test_onnx_graph_names_match_the_config(bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    model_dir = export_triton(bundle.path, tmp_path / "repo", name="cloud")
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    config = _config(model_dir)
    assert config["name"] == ["cloud"]
    initializers = {i.name for i in graph.initializer}
    assert [i.name for i in graph.input if i.name not in initializers] == [i["name"][0] for i in config["input"]]
    assert [o.name for o in graph.output] == [o["name"][0] for o in config["output"]]


def test_a_built_engine_is_exported_as_a_tensorrt_plan(bundle, tmp_path):
    copy = tmp_path / "engine.splitc"
    shutil.copytree(bundle.path, copy)
    manifest = read_manifest(copy)
    plan = copy / "p1" / "model.plan"
    plan.write_bytes(b"not really an engine, but hashed like one")
    engine = record_artifact(copy, plan, runtime=RUNTIME_TENSORRT, role="deploy", arch="x86_64", options={"precision": "fp16"})
    p1 = replace(manifest.partitions[1], artifacts=manifest.partitions[1].artifacts + (engine,), engine={"status": "built"})
    write_manifest(copy, replace(manifest, partitions=(manifest.partitions[0], p1)))
    model_dir = export_triton(copy, tmp_path / "repo")
    config = _config(model_dir)
    assert config["platform"] == ["tensorrt_plan"] and config["instance_group"][0]["kind"] == ["KIND_GPU"]
    assert (model_dir / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert not (model_dir / "1" / "model.onnx").exists()
    onnx_dir = export_triton(copy, tmp_path / "repo2", fmt="onnx")
    assert _config(onnx_dir)["platform"] == ["onnxruntime_onnx"]
    with pytest.raises(BundleError, match="build-engine"):
        export_triton(bundle.path, tmp_path / "repo3", fmt="plan")


def test_refusals_are_one_line_with_what_to_do(bundle, tmp_path):
    with pytest.raises(InputError, match="not the last one"):
        export_triton(bundle.path, tmp_path / "r", partition=0)
    with pytest.raises(InputError, match="out of range"):
        export_triton(bundle.path, tmp_path / "r", partition=9)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        export_triton(bundle.path, tmp_path / "file")
    (tmp_path / "r2" / bundle.manifest.model["name"]).mkdir(parents=True)
    (tmp_path / "r2" / bundle.manifest.model["name"] / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="not a Triton model directory"):
        export_triton(bundle.path, tmp_path / "r2")
    assert (tmp_path / "r2" / bundle.manifest.model["name"] / "mine.txt").read_text() == "keep"


def test_tvm_only_cloud_partition_is_refused(tmp_path_factory):
    # Both tiers TVM: nothing Triton can load.
    path = build_bundle(tmp_path_factory.mktemp("tvm"), targets="x86,x86")
    with pytest.raises(BundleError, match="no ONNX or TensorRT artifact"):
        export_triton(path, tmp_path_factory.mktemp("out"))


def test_cli_command(bundle, tmp_path):
    from splitc.cli.serve import export_triton_command

    result = CliRunner().invoke(export_triton_command, [str(bundle.path), "-o", str(tmp_path / "repo"), "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert "tritonserver --model-repository" in result.output
    config = _config(tmp_path / "repo" / bundle.manifest.model["name"])
    assert config["instance_group"][0]["count"] == [2]


def test_python_backend_export_carries_the_bundle_and_any_partition_range(bundle, tmp_path):
    model_dir = export_triton(bundle.path, tmp_path / "repo", fmt="python")
    config = _config(model_dir)
    assert config["backend"] == ["python"] and "platform" not in config
    assert [i["name"][0] for i in config["input"]] == [t.name for t in bundle.manifest.boundaries[0]]
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in config["parameters"]}
    assert params["model_sha256"] == bundle.manifest.model["sha256"]
    assert "FIRST_PARTITION = 1" in (model_dir / "1" / "model.py").read_text()
    copied = Bundle.open(model_dir / "1" / "bundle")  # every artifact there, hashes intact
    assert copied.manifest.model["sha256"] == bundle.manifest.model["sha256"]
    # The Python backend runs any range, as `splitc serve` does: the whole model from partition 0.
    whole = export_triton(bundle.path, tmp_path / "repo0", fmt="python", partition=0, name="whole")
    assert [i["name"][0] for i in _config(whole)["input"]] == [t.name for t in bundle.manifest.inputs]
    with pytest.raises(InputError, match="out of range"):
        export_triton(bundle.path, tmp_path / "bad", fmt="python", partition=5)
