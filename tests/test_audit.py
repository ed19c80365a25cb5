"""The attack-based privacy audit (splitc.drivers.audit, `splitc audit`).

A small CNN is trained on scikit-learn's 8x8 digits inside the test (as in tests/test_privacy.py) and
audited at a shallow cut (the first conv: 8x8x8 floats) and a deep one (the logits before the final
log-softmax: 10 floats). The assertions are relationships the literature reports and a broken audit
would not show: re-identification far above chance at the shallow cut and lower at the deep one,
reconstructions beating the data-mean floor, noise lowering re-identification at an accuracy cost,
dFIL positive and larger at the shallow cut. The metrics themselves are checked against direct
transcriptions (SSIM) and closed forms (dFIL of a linear device part).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from splitc.passes.privacy import Calibration, load_calibration
from torch import nn

from examples.digits import DigitsCNN, load_digits_arrays, train_classifier
from splitc.drivers.audit import (
    DEFAULT_DFIL_SIGMA,
    DeviceSplit,
    GaussianNoise,
    audit_cut,
    audit_report_json,
    image_metrics,
    reidentification,
    ssim,
    write_reconstructions_png,
)
from splitc.core.errors import CutError, InputError
from tests.models import save_pt2


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn.datasets")
    images, labels = load_digits_arrays()
    train, held = slice(0, 1000), slice(1000, None)
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(hidden=32, log_softmax=True), images[train], labels[train], steps=60, loss=nn.functional.nll_loss)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(images[held])).argmax(1).numpy() == labels[held]).mean()
    assert accuracy > 0.8, f"the digits CNN did not train (held-out accuracy {accuracy:.2f})"

    from splitc.frontend import import_model

    root = tmp_path_factory.mktemp("audit")
    pt2 = save_pt2(model, (torch.from_numpy(images[:1]),), root / "digits.pt2")
    _, graph = import_model(pt2)
    np.savez(root / "digits.npz", x=images[held], y=labels[held])
    calibration = load_calibration(root / "digits.npz", graph)
    return {"graph": graph, "calibration": calibration, "pt2": pt2, "npz": root / "digits.npz", "root": root, "accuracy": accuracy}


@pytest.fixture(scope="module")
def audits(digits):
    g, cal = digits["graph"], digits["calibration"]
    return {
        "shallow": audit_cut(g, "conv1", cal),
        "deep": audit_cut(g, "fc2", cal),
        "noisy": audit_cut(g, "conv1", cal, transform=GaussianNoise(3.0, seed=1), setting="noise 3"),
    }


def test_shallow_cut_leaks_more_than_deep_cut(audits):
    shallow, deep = audits["shallow"], audits["deep"]
    assert shallow.bytes_sent == 8 * 8 * 8 * 4 and deep.bytes_sent == 10 * 4
    chance = shallow.inverse.reid_chance
    assert chance == pytest.approx(1.0 / shallow.n_held) and shallow.n_held + shallow.n_aux == 797
    # Re-identification: near certain at the first conv, well above chance but lower at the logits.
    assert shallow.inverse.reid_top1 > 0.9
    assert shallow.whitebox.reid_top1 > 0.9
    assert deep.inverse.reid_top1 > 20 * chance
    assert shallow.inverse.reid_top1 > deep.inverse.reid_top1 + 0.15
    assert shallow.reid_top1 > deep.reid_top1
    # Reconstructions beat both floors at the shallow cut; the class-mean floor is above the data-mean one.
    floors = shallow.inverse.floors
    assert floors["class_mean"]["ssim"] > floors["data_mean"]["ssim"]
    assert floors["class_mean"]["mse"] < floors["data_mean"]["mse"]
    for report in (shallow.inverse, shallow.whitebox):
        assert report.ssim > floors["class_mean"]["ssim"] + 0.1
        assert report.psnr > floors["data_mean"]["psnr"] + 6
        assert report.mse < floors["class_mean"]["mse"] / 4
    assert shallow.inverse.ssim > deep.inverse.ssim and shallow.inverse.psnr > deep.inverse.psnr
    # dFIL: positive everywhere, larger where more of the input survives.
    assert deep.dfil > 0 and shallow.dfil > 10 * deep.dfil
    assert shallow.dfil_sigma_source == "assumed" and shallow.dfil_sigma == DEFAULT_DFIL_SIGMA
    assert any("dFIL assumes" in note for note in shallow.notes)
    # Sent as is: the model's accuracy is unchanged, and it is the trained model's.
    assert shallow.accuracy == shallow.accuracy_plain == deep.accuracy > 0.8
    assert 0.0 <= deep.dcor <= shallow.dcor <= 1.0


def test_noise_lowers_reidentification_at_an_accuracy_cost(audits):
    plain, noisy = audits["shallow"], audits["noisy"]
    assert noisy.setting == "noise 3" and noisy.bytes_sent == plain.bytes_sent
    assert noisy.inverse.reid_top1 < plain.inverse.reid_top1 - 0.5
    assert noisy.reid_top1 < plain.reid_top1
    assert noisy.inverse.ssim < plain.inverse.ssim and noisy.inverse.psnr < plain.inverse.psnr
    assert noisy.accuracy < noisy.accuracy_plain == plain.accuracy
    assert noisy.dcor < plain.dcor
    # dFIL uses the transform's own noise (3 x std) instead of the assumed 0.1 x std: 900x lower.
    assert noisy.dfil_sigma_source == "transform" and noisy.dfil_sigma == 3.0
    assert noisy.dfil == pytest.approx(plain.dfil * (DEFAULT_DFIL_SIGMA / 3.0) ** 2, rel=0.02)


def test_report_json_and_png(audits, tmp_path):
    entries = [audits["shallow"], audits["deep"], audits["noisy"]]
    report = json.loads(json.dumps(audit_report_json(entries)))  # plain JSON, no NaN/inf
    assert report["schema"] == "splitc.drivers.audit/1" and "labels" in report["class_mean_note"]
    rows = report["audits"]
    assert [(r["cut"], r["setting"]) for r in rows] == [("conv1", "plain"), ("fc2", "plain"), ("conv1", "noise 3")]
    for row, audit in zip(rows, entries):
        for key in ("cut", "setting", "reid_top1", "ssim", "dcor", "dfil", "bytes_sent", "accuracy", "inverse", "whitebox"):
            assert key in row
        assert row["reid_top1"] == pytest.approx(max(audit.inverse.reid_top1, audit.whitebox.reid_top1), abs=1e-6)
        assert row["ssim"] == pytest.approx(max(audit.inverse.ssim, audit.whitebox.ssim), abs=1e-6)
        assert row["dfil"] == pytest.approx(audit.dfil, rel=1e-5) and row["dcor"] == pytest.approx(audit.dcor, abs=1e-6)
        assert set(row["inverse"]["floors"]) == {"data_mean", "class_mean"}
    assert rows[0]["after"].startswith("convolution")

    shallow = audits["shallow"]
    assert shallow.examples.shape == (3, 8, 1, 8, 8)
    # Row 0 holds originals; at the shallow cut the reconstructions are close to them.
    assert np.abs(shallow.examples[1] - shallow.examples[0]).mean() < 0.1
    png = write_reconstructions_png(entries, tmp_path / "deep" / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_non_noise_transform_and_refusals(digits, multi_io_graph):
    g, cal = digits["graph"], digits["calibration"]
    split = DeviceSplit(g, "conv1")
    quantised = audit_cut(g, "conv1", cal, transform=lambda t: torch.round(t * 2) / 2, setting="q", epochs=10,
                          whitebox=False, split=split)
    assert quantised.whitebox is None and quantised.dfil_sigma_source == "assumed"
    assert quantised.examples.shape == (2, 8, 1, 8, 8)
    assert audit_report_json([quantised])["audits"][0]["whitebox"] is None
    with pytest.raises(InputError, match="at least 20"):
        audit_cut(g, "conv1", Calibration((cal.inputs[0][:12],), cal.labels[:12]))
    with pytest.raises(CutError, match="names no node"):
        audit_cut(g, "layer9", cal)
    with pytest.raises(CutError, match="after the last operator"):
        audit_cut(g, g.outputs[0].name, cal)
    rng = np.random.default_rng(0)
    two = Calibration(tuple(rng.standard_normal((24, *s.shape)).astype(s.dtype) for s in multi_io_graph.inputs))
    with pytest.raises(InputError, match="one floating-point model input"):
        audit_cut(multi_io_graph, multi_io_graph.value_nodes()[-3].name, two)
    with pytest.raises(InputError):
        GaussianNoise(float("nan"))


# --------------------------------------------------------------------------------------- metrics


def _reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float, win: int = 7) -> float:
    """Wang et al. (2004) with skimage's defaults, one window position at a time (one 2-D image)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            x, y = a[i:i + win, j:j + win].ravel(), b[i:i + win, j:j + win].ravel()
            vx, vy = x.var(ddof=1), y.var(ddof=1)
            cov = ((x - x.mean()) * (y - y.mean())).sum() / (x.size - 1)
            values.append((2 * x.mean() * y.mean() + c1) * (2 * cov + c2) / ((x.mean() ** 2 + y.mean() ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_direct_definition():
    rng = np.random.default_rng(3)
    a = rng.random((4, 2, 10, 9))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    got = ssim(a, b, data_range=1.0)
    expected = [np.mean([_reference_ssim(a[n, c], b[n, c], 1.0) for c in range(2)]) for n in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_allclose(ssim(a, a, 1.0), 1.0)
    small = rng.random((2, 1, 5, 5))  # the window shrinks to 5 x 5
    np.testing.assert_allclose(ssim(small, small[::-1], 1.0), [_reference_ssim(small[0, 0], small[1, 0], 1.0, 5)] * 2, rtol=1e-10)
    assert np.isnan(ssim(rng.random((2, 1, 1, 8)), rng.random((2, 1, 1, 8)), 1.0)).all()
    metrics = image_metrics(a, a, 1.0)
    assert metrics["mse"] == 0 and metrics["psnr"] == 100.0 and metrics["ssim"] == pytest.approx(1.0)


def test_ssim_agrees_with_skimage_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(4)
    a, b = rng.random((1, 1, 8, 8)), rng.random((1, 1, 8, 8))
    assert ssim(a, b, 1.0)[0] == pytest.approx(metrics.structural_similarity(a[0, 0], b[0, 0], data_range=1.0), rel=1e-9)


def test_reidentification():
    rng = np.random.default_rng(5)
    orig = rng.standard_normal((50, 1, 4, 4))
    assert reidentification(orig, orig + 0.01 * rng.standard_normal(orig.shape)) == 1.0
    assert reidentification(orig, orig[np.r_[1:50, 0]]) == 0.0
    assert reidentification(orig, orig[np.r_[0:25, 26:50, 25]]) == pytest.approx(25 / 50)


class _Linear2(nn.Module):
    def __init__(self, d_in: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(d_in, 24, bias=False)
        self.b = nn.Linear(24, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("d_in", [16, 300])  # exact Jacobian, and Hutchinson's estimator above 256 inputs
def test_dfil_of_a_linear_device_part(tmp_path, d_in):
    """f(x) = W x: dFIL = ||W||_F² / (σ² d_in), σ = relative sigma x std(W x) per sample."""
    from splitc.frontend import import_model

    from splitc.drivers.audit import mean_dfil

    model = _Linear2(d_in, seed=d_in)
    _, graph = import_model(save_pt2(model, (torch.randn(1, d_in),), tmp_path / "lin.pt2"))
    split = DeviceSplit(graph, "a")
    assert [tuple(s.shape) for s in split.crossing] == [(1, 24)]
    xs = torch.randn(6, 1, d_in, generator=torch.Generator().manual_seed(0))
    noise = GaussianNoise(0.5)
    w2 = float(model.a.weight.detach().double().pow(2).sum())
    with torch.no_grad():
        expected = np.mean([w2 / (0.5 * float((x @ model.a.weight.T).double().std())) ** 2 / d_in for x in xs])
    got = mean_dfil(split, xs, noise.noise_std, probes=64, seed=0)
    assert got == pytest.approx(expected, rel=1e-4 if d_in <= 256 else 0.15)


# --------------------------------------------------------------------------------------- CLI


def _cli(argv, capsys):
    from splitc.cli.audit import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_writes_report_and_png(digits, tmp_path, capsys):
    out = tmp_path / "audit"
    code, stdout, err = _cli([digits["pt2"], "--cut", "conv1,fc2", "--calib", digits["npz"], "--noise", "1.5",
                              "--report", out, "--epochs", "20", "--whitebox-steps", "30"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    # Noise as `compile --noise 1.5` would add it: 1.5 x the sent tensor's std over the calibration data.
    assert [(r["cut"], r["setting"].split(" (")[0]) for r in report["audits"]] == [
        ("conv1", "plain"), ("conv1", "noise 1.5"), ("fc2", "plain"), ("fc2", "noise 1.5")]
    assert all("as compiled" in r["setting"] for r in report["audits"] if r["setting"] != "plain")
    noisy = report["audits"][1]
    assert noisy["dfil_sigma_source"] == "transform" and noisy["accuracy"] <= noisy["accuracy_plain"]
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    assert "reid top-1" in stdout and "floor: class-mean" in stdout


@pytest.mark.parametrize("extra, code, words", [
    (["--cut", "layer9"], 6, "names no node"),
    (["--cut", "x"], 6, "falls after a model input"),
    (["--cut", "conv1,conv1"], 7, "twice"),
    (["--cut", "conv1", "--noise", "0"], 7, "--noise"),
    (["--cut", "conv1", "--few"], 7, "at least 20"),
    (["--cut", "conv1", "--nolabels-missing"], 7, "does not exist"),
])
def test_cli_errors_are_one_line(digits, tmp_path, capsys, extra, code, words):
    calib = digits["npz"]
    if "--few" in extra:
        data = np.load(calib)
        calib = tmp_path / "few.npz"
        np.savez(calib, x=data["x"][:12], y=data["y"][:12])
        extra = [e for e in extra if e != "--few"]
    if "--nolabels-missing" in extra:
        calib = tmp_path / "missing.npz"
        extra = [e for e in extra if e != "--nolabels-missing"]
    got, _, err = _cli([digits["pt2"], "--calib", calib, "--report", tmp_path / "r", *extra], capsys)
    assert got == code, err
    assert words in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()
