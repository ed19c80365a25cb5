"""Frontend: loading (.pt2, factory, pickle), --input-shape parsing, and node annotation."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from splitc.core.errors import InputError, ModelLoadError
from splitc.frontend import import_model, parse_input_shapes
from splitc.core.graph import DTYPE, FLOPS, OUTPUT_BYTES, PARAM_BYTES, SHAPE, numpy_dtype
from tests import models
from tests.models import rel_err, save_pt2


# ------------------------------------------------------------------------------------ loading


def test_load_pt2_matches_eager(zoo, zoo_name):
    graph = zoo.graph(zoo_name)
    inputs = zoo.inputs(zoo_name)
    assert graph.name == zoo_name
    assert [tuple(s.shape) for s in graph.inputs] == [tuple(t.shape) for t in inputs]
    assert [s.dtype for s in graph.inputs] == [numpy_dtype(t.dtype) for t in inputs]
    with torch.no_grad():
        expected = zoo.module(zoo_name)(*inputs)
        got = graph.module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert len(got) == len(expected) == len(graph.outputs)
    for spec, g, e in zip(graph.outputs, got, expected):
        assert spec.shape == tuple(e.shape)
        assert rel_err(g, e) < 1e-5


def test_load_pt2_records_source_and_hash(zoo):
    loaded = zoo.loaded("multi_io")
    graph = zoo.graph("multi_io")
    assert graph.source == str(zoo.path("multi_io"))
    assert len(graph.source_sha256) == 64
    import hashlib

    assert graph.source_sha256 == hashlib.sha256(zoo.path("multi_io").read_bytes()).hexdigest()
    assert loaded.example_inputs is None


def test_factory_with_input_shape():
    loaded, graph = import_model("tests.models:resnet_like", input_shapes=["1,3,32,32"])
    assert graph.name == "resnet_like"
    assert [s.shape for s in graph.inputs] == [(1, 3, 32, 32)]
    assert [s.shape for s in graph.outputs] == [(1, 10)]
    # Same weights as the factory's module: the exported graph computes the same function.
    x = models.resnet_like.example_inputs()
    with torch.no_grad():
        (logits,) = graph.module(*x)  # the compiler's graph returns a tuple of its outputs
        assert rel_err(logits, models.resnet_like()(*x)) < 1e-5


def test_factory_with_several_inputs_and_int_dtype():
    _, graph = import_model("tests.models:multi_io", input_shapes=["1,3,16,16;1,8"])
    assert [(s.shape, s.dtype) for s in graph.inputs] == [((1, 3, 16, 16), "float32"), ((1, 8), "float32")]
    assert [s.shape for s in graph.outputs] == [(1, 5), (1, 6)]
    _, graph = import_model("tests.models:transformer_block", input_shapes=["1,12:int64"])
    assert [(s.shape, s.dtype) for s in graph.inputs] == [((1, 12), "int64")]


def test_factory_without_input_shape_is_refused():
    with pytest.raises(InputError, match="--input-shape"):
        import_model("tests.models:resnet_like")


def test_unknown_factory_is_refused():
    with pytest.raises(ModelLoadError, match="no attribute"):
        import_model("tests.models:no_such_factory", input_shapes=["1,3,32,32"])
    with pytest.raises(ModelLoadError, match="cannot import"):
        import_model("tests.no_such_module:resnet_like", input_shapes=["1,3,32,32"])


@pytest.mark.parametrize(
    "specs, expected",
    [
        (["1,3,224,224"], [((1, 3, 224, 224), torch.float32)]),
        (["1x3x8x8"], [((1, 3, 8, 8), torch.float32)]),
        (["1,128:int64"], [((1, 128), torch.int64)]),
        (["1,4:f16"], [((1, 4), torch.float16)]),
        (["1,3,16,16;1,8"], [((1, 3, 16, 16), torch.float32), ((1, 8), torch.float32)]),
        (["1,3,16,16:float32; 1,8:i32"], [((1, 3, 16, 16), torch.float32), ((1, 8), torch.int32)]),
        (["1,3", "2,5:int64"], [((1, 3), torch.float32), ((2, 5), torch.int64)]),
        ([], []),
    ],
)
def test_parse_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec, message", [("1,3:float99", "dtype"), ("1,a,3", "integers"), ("1,0,3", "positive"), ("1,-2", "positive")])
def test_parse_input_shapes_rejects(spec, message):
    with pytest.raises(InputError, match=message):
        parse_input_shapes([spec])


def test_pickle_needs_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(models.multi_io(), path)
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        import_model(path, input_shapes=["1,3,16,16;1,8"])
    _, graph = import_model(path, input_shapes=["1,3,16,16;1,8"], trust_pickle=True)
    assert [s.shape for s in graph.inputs] == [(1, 3, 16, 16), (1, 8)]
    x = models.multi_io.example_inputs()
    with torch.no_grad():
        for got, expected in zip(graph.module(*x), models.multi_io()(*x)):
            assert rel_err(got, expected) < 1e-5


def test_state_dict_alone_is_refused_even_with_trust(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(models.multi_io().state_dict(), path)
    with pytest.raises(ModelLoadError, match="weights only.*--weights"):
        import_model(path, input_shapes=["1,3,16,16;1,8"], trust_pickle=True)


@pytest.mark.parametrize("name", ["missing.pt2", "missing.pt", "missing"])
def test_missing_file(tmp_path, name):
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_model(tmp_path / name, trust_pickle=True)


@pytest.mark.parametrize("content, words", [(b"not a zip archive at all", "torch.export"), (b"", "empty")])
def test_corrupt_pt2(tmp_path, content, words):
    path = tmp_path / "corrupt.pt2"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=words):
        import_model(path)


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ModelLoadError, match="cannot unpickle"):
        import_model(path, input_shapes=["1,3"], trust_pickle=True)


# ------------------------------------------------------------------------------------ annotation


def _single_op_graph(module: nn.Module, x: torch.Tensor, tmp_path):
    _, graph = import_model(save_pt2(module.eval(), (x,), tmp_path / "op.pt2"))
    return graph


def test_conv2d_flops_exact(tmp_path):
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    graph = _single_op_graph(conv, torch.randn(2, 3, 16, 16), tmp_path)
    ops = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in ops] == ["aten.convolution.default"]
    # 2 FLOPs per multiply-add: N * Hout * Wout * Cout * Cin * Kh * Kw * 2 (bias not counted, as torch does).
    expected = 2 * 16 * 16 * 8 * 3 * 3 * 3 * 2
    assert expected == 221184
    assert ops[0].meta[FLOPS] == expected
    assert graph.total_flops == expected
    assert ops[0].meta[OUTPUT_BYTES] == 2 * 8 * 16 * 16 * 4
    assert ops[0].meta[SHAPE] == (2, 8, 16, 16)
    assert ops[0].meta[PARAM_BYTES] == (8 * 3 * 3 * 3 + 8) * 4


def test_strided_grouped_conv_flops_exact(tmp_path):
    conv = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1, groups=2, bias=False)
    graph = _single_op_graph(conv, torch.randn(1, 4, 16, 16), tmp_path)
    # out 8x8; each output channel reads Cin/groups = 2 input channels.
    assert graph.total_flops == 1 * 8 * 8 * 8 * 2 * 3 * 3 * 2 == 18432


def test_linear_flops_exact(tmp_path):
    linear = nn.Linear(16, 4)
    graph = _single_op_graph(linear, torch.randn(3, 16), tmp_path)
    # M x K x N multiply-adds, 2 FLOPs each; the weight transpose is layout only.
    expected = 2 * 3 * 16 * 4
    assert expected == 384
    assert graph.total_flops == expected
    matmul = [n for n in graph.module.graph.nodes if n.op == "call_function" and "mm" in str(n.target)]
    assert len(matmul) == 1 and matmul[0].meta[FLOPS] == expected
    assert graph.param_bytes == (16 * 4 + 4) * 4


def test_param_bytes_equal_state_dict_bytes(zoo, zoo_name):
    state = zoo.module(zoo_name).state_dict()
    # BatchNorm's num_batches_tracked counter is never read in eval mode, so no node reads it.
    expected = sum(t.numel() * t.element_size() for k, t in state.items() if not k.endswith("num_batches_tracked"))
    assert expected > 0
    assert zoo.graph(zoo_name).param_bytes == expected


def test_param_bytes_are_charged_once(zoo):
    graph = zoo.graph("resnet_like")
    charged = [n for n in graph.module.graph.nodes if n.meta.get(PARAM_BYTES, 0) > 0]
    assert all(n.op == "call_function" for n in charged)
    # 6 convs, 6 batch norms, and the linear layer twice: its weight goes to the transpose that
    # core ATen inserts, its bias to the addmm.
    assert sorted(str(n.target) for n in charged) == sorted(
        ["aten.convolution.default"] * 6 + ["aten._native_batch_norm_legit_no_training.default"] * 6
        + ["aten.permute.default", "aten.addmm.default"]
    )
    # Each weight is charged to its first reader only, so the figures add up to the model's size.
    weights = {n.target for n in graph.module.graph.nodes if n.op == "get_attr" and n.users}
    state = graph.module.state_dict()
    assert len(weights) == 6 + 6 * 4 + 2
    assert sum(n.meta[PARAM_BYTES] for n in charged) == sum(state[t].numel() * state[t].element_size() for t in weights)


def test_every_value_node_is_annotated(zoo, zoo_name):
    graph = zoo.graph(zoo_name)
    nodes = graph.value_nodes()
    assert nodes
    for node in nodes:
        for key in (SHAPE, DTYPE, OUTPUT_BYTES, FLOPS, PARAM_BYTES):
            assert key in node.meta, f"{node.name} lacks {key}"
        val = node.meta["val"]
        if isinstance(val, torch.Tensor):
            assert node.meta[SHAPE] == tuple(val.shape)
            assert node.meta[DTYPE] == numpy_dtype(val.dtype)
            assert node.meta[OUTPUT_BYTES] == val.numel() * val.element_size()
        else:
            assert node.meta[SHAPE] is None
    assert graph.total_flops > 0
