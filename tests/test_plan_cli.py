"""`splitc plan` and `splitc compile --plan` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splitc.core.manifest import read_manifest
from tests.test_cli import run_cli


def plan_json(capsys, *args) -> dict:
    code, out, err = run_cli("plan", *args, "--json", capsys=capsys)
    assert code == 0, err
    return json.loads(out)


def test_plan_json_has_the_documented_fields(model_files, capsys):
    doc = plan_json(capsys, model_files["pt2"], "--targets", "rpi4,edge-server,a100", "--link", "3g,wifi", "--rate", "50/s", "--objective", "cost")
    assert [f["link"]["name"] for f in doc["fronts"]] == ["3g", "wifi"]
    assert doc["plans"] == doc["fronts"][0]["plans"] and doc["chosen"] == doc["fronts"][0]["chosen"]
    for plan in doc["plans"]:
        assert set(plan) >= {"cuts", "placement", "latency_ms", "cost_usd_per_million", "leakage", "accuracy", "tiers"}
        assert len(plan["cuts"]) == 2 and len(plan["placement"]) == 3
        for tier in plan["tiers"]:
            if tier["pricing"]:
                assert tier["pricing"] in ("iaas", "faas")
    chosen = doc["plans"][doc["chosen"]]
    assert chosen["cost_usd_per_million"] == min(p["cost_usd_per_million"] for p in doc["plans"])
    # Device-only and cloud-only plans are candidates: the cheapest here keeps everything local.
    assert chosen["placement"] == ["rpi4", None, None]
    assert doc["model"]["sha256"] and doc["workload"]["rate_per_s"] == 50


def test_compile_plan_round_trip_and_verify(model_files, tmp_path, capsys):
    doc = plan_json(capsys, model_files["pt2"], "--targets", "rpi4,a100", "--link", "wifi", "--all-tiers")
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    out = tmp_path / "planned.splitc"
    code, _, err = run_cli("compile", model_files["pt2"], "--plan", tmp_path / "plan.json", "-o", out, capsys=capsys)
    assert code == 0, err
    manifest = read_manifest(out)
    chosen = doc["plans"][doc["chosen"]]
    assert manifest.plan["method"] == "planner"
    assert [c["after"] for c in manifest.plan["cuts"]] == [c[0] for c in chosen["cuts"]]
    assert run_cli("verify", out, "--no-emulation", capsys=capsys)[0] == 0


def test_privacy_objective_with_calibration_data(model_files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, 3, 64, 64)).astype(np.float32))
    doc = plan_json(capsys, model_files["pt2"], "--targets", "rpi4,a100", "--calib", tmp_path / "calib.npz", "--objective", "privacy",
                    "--png", tmp_path / "front.png")
    leaks = [p["leakage"] for p in doc["plans"]]
    assert all(0.0 <= v <= 1.0 for v in leaks)
    assert doc["plans"][doc["chosen"]]["leakage"] == min(leaks)
    cloud_only = [p for p in doc["plans"] if p["placement"][0] is None]
    assert all(p["leakage"] == pytest.approx(1.0) for p in cloud_only)  # the raw input leaves the device
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_bad_input(model_files, tmp_path, capsys):
    text = (Path(__file__).parents[1] / "targets" / "x86.toml").read_text()
    (tmp_path / "unpriced.toml").write_text(text.replace('name = "x86"', 'name = "unpriced"').replace('tier = "edge"', 'tier = "cloud"'))
    cases = [
        (["--targets", "rpi4,a100", "--link", "5g"], 4, ["5g", "wifi"]),
        (["--targets", f"rpi4,{tmp_path / 'unpriced.toml'}", "--objective", "cost"], 4, ["unpriced", "[price]"]),
        (["--targets", "rpi4,a100", "--rate", "fast"], 7, ["--rate", "50/s"]),
        (["--targets", "rpi4,a100", "--objective", "privacy"], 12, ["--calib"]),
        (["--targets", "rpi4,a100", "--max-latency", "0.001ms"], 12, ["--max-latency", "fastest plan takes"]),
    ]
    for args, code, words in cases:
        got, _, err = run_cli("plan", model_files["pt2"], *args, capsys=capsys)
        message = " ".join(err.split())
        assert got == code and all(w in message for w in words), (args, message)


def test_plan_for_another_model_is_refused(model_files, tmp_path, capsys):
    doc = plan_json(capsys, model_files["pt2"], "--targets", "rpi4,a100")
    doc["model"]["sha256"] = "0" * 64
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    code, _, err = run_cli("compile", model_files["pt2"], "--plan", tmp_path / "plan.json", "-o", tmp_path / "o.splitc", capsys=capsys)
    assert code == 7 and "re-run `splitc plan`" in " ".join(err.split())
    assert not (tmp_path / "o.splitc").exists()
