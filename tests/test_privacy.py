"""Privacy statistic per cut: distance correlation, calibration loading, and the leakage profile.

distance_correlation is checked against a direct transcription of Székely's definition; the profile's
add/subtract sweep over n x n matrices against a brute force that materialises every crossing tensor
per sample; and the statistic on real data (scikit-learn's 8x8 digits) through a small trained CNN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from splitc.passes.cuts import CutAnalysis
from splitc.passes.privacy import (
    Calibration,
    dimension_reduced,
    distance_correlation,
    leakage_profile,
    load_calibration,
)
from torch import fx

from splitc.core.errors import InputError
from splitc.core.graph import is_tensor_node
from tests.models import save_pt2

# --------------------------------------------------------------------------------------- reference dCor


def reference_dcor(x: np.ndarray, z: np.ndarray) -> float:
    """Székely, Rizzo & Bakirov (2007), eqs. 2.8-2.10, written out with explicit pairwise differences."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)

    def centred(v):
        d = np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=-1))
        return d - d.mean(axis=0)[None, :] - d.mean(axis=1)[:, None] + d.mean()

    a, b = centred(x), centred(z)
    dcov2, dvar_x, dvar_z = (a * b).mean(), (a * a).mean(), (b * b).mean()
    if dvar_x * dvar_z == 0:
        return 0.0
    return float(np.sqrt(dcov2 / np.sqrt(dvar_x * dvar_z)))


@pytest.mark.parametrize("n,p,q", [(10, 1, 1), (17, 3, 2), (40, 5, 7)])
def test_dcor_matches_reference(n, p, q):
    rng = np.random.default_rng(n * 100 + p * 10 + q)
    x = rng.standard_normal((n, p))
    z = np.tanh(x[:, :1] * rng.standard_normal((1, q))) + 0.5 * rng.standard_normal((n, q))  # dependent
    w = rng.standard_normal((n, q)) * 3.0 + 10.0                                               # independent
    for other in (z, w):
        expected = reference_dcor(x, other)
        assert 0.0 < expected < 1.0
        assert distance_correlation(x, other) == pytest.approx(expected, abs=1e-10)
        assert distance_correlation(other, x) == pytest.approx(expected, abs=1e-10)


def test_dcor_of_isometric_and_scaled_copies_is_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4))
    assert distance_correlation(x, x) == pytest.approx(1.0, abs=1e-12)
    for a in (-3.0, 0.25, 7.0):
        b = rng.standard_normal(4) * 100.0  # a large offset: the Gram form must not lose it to cancellation
        assert distance_correlation(x, a * x + b) == pytest.approx(1.0, abs=1e-10)


def test_dcor_of_independent_samples_is_small():
    rng = np.random.default_rng(2)
    for _ in range(3):
        x, z = rng.standard_normal((500, 1)), rng.standard_normal((500, 1))
        assert distance_correlation(x, z) < 0.15


def test_dcor_sees_nonlinear_dependence_that_pearson_misses():
    x = np.linspace(-1.0, 1.0, 201)  # symmetric: x and x**2 are uncorrelated but fully dependent
    pearson = np.corrcoef(x, x**2)[0, 1]
    assert abs(pearson) < 1e-10
    assert distance_correlation(x[:, None], (x**2)[:, None]) > 0.3


def test_dcor_is_in_unit_interval_and_zero_for_constants():
    rng = np.random.default_rng(3)
    for n in (2, 3, 8, 30):
        for _ in range(20):
            x, z = rng.standard_normal((n, 2)), rng.standard_normal((n, 3))
            assert 0.0 <= distance_correlation(x, z) <= 1.0
    x = rng.standard_normal((20, 3))
    constant = np.full((20, 2), 0.1)  # 0.1 has no exact binary form: its mean is not exactly 0.1
    assert distance_correlation(x, constant) == 0.0
    assert distance_correlation(constant, x) == 0.0
    assert distance_correlation(constant, constant) == 0.0
    # Constant columns next to varying ones change nothing.
    assert distance_correlation(np.hstack([x, constant]), x) == pytest.approx(1.0, abs=1e-12)


def test_dcor_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="paired"):
        distance_correlation(np.zeros((5, 2)), np.zeros((6, 2)))


# --------------------------------------------------------------------------------------- leakage profile


def _random_calibration(graph, n: int, seed: int) -> Calibration:
    rng = np.random.default_rng(seed)
    return Calibration(tuple(rng.standard_normal((n, *spec.shape)).astype(spec.dtype) for spec in graph.inputs))


def _brute_force(graph, analysis: CutAnalysis, calibration: Calibration, positions) -> dict[int, float]:
    """dCor at `positions`, materialising every node's value for every sample (an ordinary Interpreter)."""

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            self.values[n] = out = super().run_node(n)
            return out

    x = np.concatenate([a.reshape(len(a), -1) for a in calibration.inputs], axis=1)
    per_sample = []
    with torch.no_grad():
        for s in range(len(calibration)):
            recorder = Recorder(graph.module, garbage_collect_values=False)
            recorder.values = {}
            recorder.run(*(torch.from_numpy(a[s]) for a in calibration.inputs))
            per_sample.append(recorder.values)
    result = {}
    for p in positions:
        crossing = analysis.crossing_nodes(p)
        assert crossing and all(is_tensor_node(c) for c in crossing)
        z = np.stack([np.concatenate([values[c].double().reshape(-1).numpy() for c in crossing]) for values in per_sample])
        result[p] = distance_correlation(x, z, bias_corrected=True)
    return result


@pytest.fixture(scope="module")
def resnet_case(resnet_graph):
    analysis = CutAnalysis(resnet_graph)
    calibration = _random_calibration(resnet_graph, 32, seed=10)
    return resnet_graph, analysis, calibration, leakage_profile(resnet_graph, analysis, calibration)


def test_profile_matches_brute_force(resnet_case):
    graph, analysis, calibration, profile = resnet_case
    assert profile.shape == (len(analysis.order),) and profile.dtype == np.float64
    valid = analysis.valid_positions()
    multi = [int(p) for p in valid if len(analysis.crossing_nodes(int(p))) >= 2]
    assert multi, "resnet_like should have a cut crossed by a skip connection"
    # A cut crossed by a skip connection (two tensors), one in the middle, the last operator (the logits).
    positions = sorted({multi[len(multi) // 2], int(valid[len(valid) // 3]), analysis.last_op})
    assert len(positions) == 3
    expected = _brute_force(graph, analysis, calibration, positions)
    for p in positions:
        assert profile[p] == pytest.approx(expected[p], abs=1e-8), f"position {p} ({analysis.order[p].name})"
    # Values must differ between positions, or the comparison above says little.
    assert np.ptp([expected[p] for p in positions]) > 1e-3


def test_profile_against_eager_module_output(resnet_case):
    """The logits position, recomputed by calling the GraphModule directly (no fx.Interpreter)."""
    graph, analysis, calibration, profile = resnet_case
    with torch.no_grad():
        logits = np.stack([graph.module(torch.from_numpy(s))[0].reshape(-1).double().numpy() for s in calibration.inputs[0]])
    x = calibration.inputs[0].reshape(len(calibration), -1)
    assert [n.name for n in analysis.crossing_nodes(analysis.last_op)] == [graph.outputs[0].name]
    assert profile[analysis.last_op] == pytest.approx(distance_correlation(x, logits, bias_corrected=True), abs=1e-8)


def test_profile_nan_exactly_where_a_non_tensor_crosses(resnet_case):
    graph, analysis, calibration, profile = resnet_case
    non_tensor = np.array([any(not is_tensor_node(c) for c in analysis.crossing_nodes(p)) for p in range(len(analysis.order))])
    assert non_tensor.any(), "resnet_like's batch norms return tuples; some positions must be NaN"
    np.testing.assert_array_equal(np.isnan(profile), non_tensor)
    finite = profile[~non_tensor]
    assert ((finite >= 0.0) & (finite <= 1.0)).all()


def test_profile_is_one_where_the_input_itself_crosses(resnet_case, multi_io_graph):
    graph, analysis, calibration, profile = resnet_case
    assert analysis.order[0].op == "placeholder"
    assert profile[0] == pytest.approx(1.0, abs=1e-12)
    assert profile[1] < 1.0  # a conv of the input is no isometry

    # Two inputs: after the first placeholder only `image` crosses; after the second, both do.
    analysis = CutAnalysis(multi_io_graph)
    assert [n.op for n in analysis.order[:2]] == ["placeholder", "placeholder"]
    profile = leakage_profile(multi_io_graph, analysis, _random_calibration(multi_io_graph, 16, seed=11))
    assert profile[1] == pytest.approx(1.0, abs=1e-12)
    assert profile[0] < 1.0 - 1e-6
    assert np.isfinite(profile).all()


def test_profile_subsamples_to_max_samples(resnet_graph):
    analysis = CutAnalysis(resnet_graph)
    full = _random_calibration(resnet_graph, 20, seed=12)
    picked = np.unique(np.linspace(0, 19, 10).round().astype(int))
    sub = Calibration((full.inputs[0][picked],))
    np.testing.assert_allclose(
        leakage_profile(resnet_graph, analysis, full, max_samples=10),
        leakage_profile(resnet_graph, analysis, sub),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="at least 8"):
        leakage_profile(resnet_graph, analysis, full, max_samples=4)


def test_dimension_reduced(resnet_case):
    graph, analysis, _, _ = resnet_case
    input_bytes = graph.inputs[0].nbytes
    crossing = analysis.crossing_bytes()
    assert not dimension_reduced(analysis, 0)              # the input itself
    assert not dimension_reduced(analysis, 1)              # stem conv: 8 channels at 32x32 > 3 channels
    assert dimension_reduced(analysis, analysis.last_op)   # the logits
    for p in range(len(analysis.order)):
        assert dimension_reduced(analysis, p) == (crossing[p] < input_bytes)
    with pytest.raises(IndexError):
        dimension_reduced(analysis, len(analysis.order))


# --------------------------------------------------------------------------------------- real data


def test_digits_leakage_falls_from_first_conv_to_logits(tmp_path):
    pytest.importorskip("sklearn.datasets")
    from examples.digits import DigitsCNN, load_digits_arrays, train_classifier

    images, labels = load_digits_arrays()  # (1797, 1, 8, 8)
    train, held = slice(0, 1200), slice(1200, None)
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), images[train], labels[train], steps=40)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(images[held])).argmax(1).numpy() == labels[held]).mean()
    assert accuracy > 0.8, f"the digits CNN did not train (held-out accuracy {accuracy:.2f})"

    from splitc.frontend import import_model

    _, graph = import_model(save_pt2(model, (torch.from_numpy(images[:1]),), tmp_path / "digits.pt2"))
    assert graph.inputs[0].shape == (1, 1, 8, 8)
    np.savez(tmp_path / "digits.npz", x=images[held].astype(np.float64), y=labels[held])  # float64 is cast
    calibration = load_calibration(tmp_path / "digits.npz", graph)
    assert calibration.inputs[0].shape == (597, 1, 1, 8, 8) and calibration.labels.shape == (597,)

    analysis = CutAnalysis(graph)
    profile = leakage_profile(graph, analysis, calibration)
    first_conv = next(i for i, n in enumerate(analysis.order) if n.target is torch.ops.aten.convolution.default)
    logits = analysis.last_op
    assert [n.name for n in analysis.crossing_nodes(logits)] == [graph.outputs[0].name]
    assert profile[0] == pytest.approx(1.0, abs=1e-12)
    assert profile[logits] < profile[first_conv]
    assert dimension_reduced(analysis, logits) and not dimension_reduced(analysis, first_conv)


# --------------------------------------------------------------------------------------- load_calibration


def _npz(tmp_path, name="cal.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _images(n, shape=(1, 3, 32, 32), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(dtype)


@pytest.mark.parametrize("key", ["x", "inputs", "arr_0"])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 32, 32)])
def test_load_calibration_layouts(tmp_path, resnet_graph, key, shape):
    data = _images(9, shape, np.float64)
    path = tmp_path / "cal.npz"
    if key == "arr_0":
        np.savez(path, data)  # positional: numpy names it arr_0
    else:
        np.savez(path, **{key: data})
    calibration = load_calibration(str(path), resnet_graph)
    assert len(calibration) == 9 and calibration.labels is None
    (inputs,) = calibration.inputs
    assert inputs.shape == (9, 1, 3, 32, 32) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs.reshape(9, -1), data.astype(np.float32).reshape(9, -1))


@pytest.mark.parametrize("key", ["y", "labels"])
def test_load_calibration_labels(tmp_path, resnet_graph, key):
    labels = np.arange(10, dtype=np.int32) % 3
    calibration = load_calibration(_npz(tmp_path, x=_images(10), **{key: labels}), resnet_graph)
    assert calibration.labels.dtype == np.int64
    np.testing.assert_array_equal(calibration.labels, labels)


def test_load_calibration_input_name_wins(tmp_path, resnet_graph):
    """resnet_like's input is named `x`: that key is taken even next to a fallback key."""
    calibration = load_calibration(_npz(tmp_path, x=_images(9, seed=1), inputs=_images(9, seed=2)), resnet_graph)
    np.testing.assert_array_equal(calibration.inputs[0], _images(9, seed=1))


def test_load_calibration_by_input_name(tmp_path, multi_io_graph):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path, image=rng.standard_normal((8, 3, 16, 16)).astype(np.float32),
                vector=rng.standard_normal((8, 1, 8)).astype(np.float32))
    calibration = load_calibration(path, multi_io_graph)
    assert [a.shape for a in calibration.inputs] == [(8, 1, 3, 16, 16), (8, 1, 8)]
    # A multi-input model takes no positional fallback names.
    with pytest.raises(InputError, match=r"'vector'.*\(n, 1, 8\)"):
        load_calibration(_npz(tmp_path, "b.npz", image=rng.standard_normal((8, 3, 16, 16)), x=np.zeros((8, 8))), multi_io_graph)
    with pytest.raises(InputError, match="different sample counts"):
        load_calibration(_npz(tmp_path, "c.npz", image=rng.standard_normal((9, 3, 16, 16)).astype(np.float32),
                              vector=rng.standard_normal((8, 8)).astype(np.float32)), multi_io_graph)


def _refused(path, graph, *fragments):
    with pytest.raises(InputError) as info:
        load_calibration(path, graph)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_load_calibration_refusals(tmp_path, resnet_graph):
    g = resnet_graph
    expected = "(n, 1, 3, 32, 32)"
    _refused(tmp_path / "missing.npz", g, "missing.npz", "does not exist")
    text = tmp_path / "text.npz"
    text.write_text("not a zip\n")
    _refused(text, g, "text.npz", "not an .npz")
    np.save(tmp_path / "single.npy", _images(9))
    _refused(tmp_path / "single.npy", g, "single.npy", "not an .npz")
    _refused(_npz(tmp_path, "nokey.npz", images=_images(9)), g, "nokey.npz", "'x'", expected, "'images'")
    _refused(_npz(tmp_path, "shape.npz", x=_images(9, (3, 16, 16))), g, "'x'", "(9, 3, 16, 16)", expected)
    _refused(_npz(tmp_path, "flat.npz", x=_images(9, (3 * 32 * 32,))), g, "'x'", expected)
    _refused(_npz(tmp_path, "dtype.npz", x=_images(9).astype(np.int64)), g, "'x'", "int64", expected, "float32")
    _refused(_npz(tmp_path, "half.npz", x=_images(9).astype(np.float16)), g, "'x'", "float16", expected)
    _refused(_npz(tmp_path, "few.npz", x=_images(7)), g, "'x'", expected, "dCor needs at least 8 samples")
    _refused(_npz(tmp_path, "count.npz", x=_images(9), y=np.arange(8)), g, "'y'", "(8,)", "(9,)")
    _refused(_npz(tmp_path, "2d.npz", x=_images(9), labels=np.zeros((9, 1), np.int64)), g, "'labels'", "(9, 1)")
    _refused(_npz(tmp_path, "float.npz", x=_images(9), y=np.arange(9.0)), g, "'y'", "float64", "integers")
    _refused(_npz(tmp_path, "both.npz", inputs=_images(9), arr_0=_images(9)), g, "'inputs'", "'arr_0'", expected)
    nan = _images(9)
    nan[3, 0, 0, 0, 0] = np.nan
    _refused(_npz(tmp_path, "nan.npz", x=nan), g, "'x'", "NaN")


def test_profile_refuses_mismatched_calibration(resnet_graph, multi_io_graph):
    analysis = CutAnalysis(resnet_graph)
    wrong_shape = Calibration((np.zeros((9, 1, 3, 16, 16), np.float32),))
    with pytest.raises(InputError, match=r"'x'.*\(n, 1, 3, 32, 32\) float32"):
        leakage_profile(resnet_graph, analysis, wrong_shape)
    with pytest.raises(InputError, match="at least 8 samples"):
        leakage_profile(resnet_graph, analysis, _random_calibration(resnet_graph, 5, seed=0))
    with pytest.raises(ValueError, match="different ModelGraph"):
        leakage_profile(multi_io_graph, analysis, _random_calibration(multi_io_graph, 9, seed=0))


def test_bias_corrected_dcor_has_no_high_dimensional_floor():
    """The V-statistic reports ~0.7 for unrelated 3,072- vs 10-dimensional samples at n = 128; the
    bias-corrected estimator the planner uses stays near 0 there and still gives 1 for x vs x."""
    rng = np.random.default_rng(5)
    x, z = rng.standard_normal((128, 3072)), rng.standard_normal((128, 10))
    assert distance_correlation(x, z) > 0.5
    assert distance_correlation(x, z, bias_corrected=True) < 0.2
    assert distance_correlation(x, x, bias_corrected=True) == pytest.approx(1.0, abs=1e-9)
    assert distance_correlation(x, 3 * x + 1, bias_corrected=True) == pytest.approx(1.0, abs=1e-9)
    dependent = x[:, :10] + 0.5 * rng.standard_normal((128, 10))  # 10 of 3,072 input dimensions, noisy
    assert distance_correlation(x, dependent, bias_corrected=True) > 0.15 + distance_correlation(x, z, bias_corrected=True)
    assert distance_correlation(x[:, :10], dependent, bias_corrected=True) > 0.8
