"""Tests for the aarch64 emulation toolchain and the standalone TVM worker.

The emulation test needs a provisioned toolchain (``splitc.backends.emulation.provision_aarch64``),
qemu-user, gcc-aarch64-linux-gnu, torch and TVM on the host; it skips with the reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import splitc.backends.emulation as emulation
from splitc.backends.emulation import find_aarch64_toolchain

# The worker ships as a data file of the package (it is run, never imported).
WORKER = Path(emulation.__file__).resolve().parents[1] / "runtime" / "tvm_worker.py"

# qemu + TVM import take a few seconds; allow for a slow, loaded CI machine.
_WORKER_TIMEOUT_S = 300


def test_find_returns_none_for_empty_cache(tmp_path: Path) -> None:
    assert find_aarch64_toolchain(tmp_path) is None


def test_find_rejects_incomplete_toolchain(tmp_path: Path) -> None:
    # A folder without the stamp (e.g. copied by hand or from an older recipe) is not reused.
    root = tmp_path / "toolchains" / "aarch64"
    (root / "sysroot" / "usr" / "bin").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "toolchain.json").write_text('{"format": -1}', encoding="utf-8")
    assert find_aarch64_toolchain(tmp_path) is None


def test_environment_drops_host_python_settings() -> None:
    toolchain = emulation.Aarch64Toolchain(
        root=Path("/r"),
        sysroot=Path("/r/sysroot"),
        site_packages=Path("/r/site-packages"),
        python=Path("/r/sysroot/usr/bin/python3.11"),
        qemu=Path("/usr/bin/qemu-aarch64"),
    )
    env = toolchain.environment(
        {"PATH": "/usr/bin", "PYTHONHOME": "/host", "LD_PRELOAD": "x.so", "PYTHONPATH": "/h"}
    )
    assert env["PATH"] == "/usr/bin"
    assert "PYTHONHOME" not in env and "LD_PRELOAD" not in env
    assert env["PYTHONPATH"] == "/r/site-packages"
    argv = toolchain.command(Path("w.py"), "a")
    assert argv[:3] == ["/usr/bin/qemu-aarch64", "-L", "/r/sysroot"]
    assert argv[-3:] == ["/r/sysroot/usr/bin/python3.11", "w.py", "a"]


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    # Relative to the output's scale, so a near-zero output cannot pass vacuously.
    scale = max(float(np.abs(expected).max()), 1e-6)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


@pytest.mark.emulation
def test_cross_compiled_model_matches_torch_under_emulation(tmp_path: Path) -> None:
    toolchain = find_aarch64_toolchain()
    if toolchain is None:
        pytest.skip(
            "aarch64 emulation toolchain not provisioned (run "
            "splitc.backends.emulation.provision_aarch64(); needs qemu-user)"
        )
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64 cross compiler missing: apt-get install gcc-aarch64-linux-gnu")
    torch = pytest.importorskip("torch")
    tvm = pytest.importorskip("tvm")
    from tvm.relax.frontend.torch import from_exported_program

    class TwoInTwoOut(torch.nn.Module):
        """Two inputs and a tuple output, to exercise the worker's argument/output plumbing."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(16, 8)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h = torch.relu(self.hidden(x) + bias)
            return self.head(h), h

    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    samples = [(torch.randn(2, 16), torch.randn(2, 8)) for _ in range(2)]

    exported = torch.export.export(model, samples[0])
    module = from_exported_program(exported, keep_params_as_input=False)
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
    )
    library = tmp_path / "model.so"
    tvm.compile(module, target=target).export_library(
        str(library), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-gcc")
    )

    inputs = tmp_path / "inputs.npz"
    outputs = tmp_path / "outputs.npz"
    np.savez(
        inputs,
        **{
            f"s{i}__{j}": t.numpy()
            for i, sample in enumerate(samples)
            for j, t in enumerate(sample)
        },
    )
    result = subprocess.run(
        toolchain.command(WORKER, str(library), str(inputs), str(outputs)),
        env=toolchain.environment(),
        capture_output=True,
        text=True,
        timeout=_WORKER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    with torch.no_grad():
        expected = [tuple(t.numpy() for t in model(*sample)) for sample in samples]
    with np.load(outputs) as got:
        assert sorted(got.files) == sorted(
            f"s{i}__{k}" for i in range(len(samples)) for k in range(2)
        )
        for i, sample_expected in enumerate(expected):
            for k, want in enumerate(sample_expected):
                have = got[f"s{i}__{k}"]
                assert have.shape == want.shape and have.dtype == want.dtype
                assert _relative_error(have, want) < 1e-5, (i, k)


def test_worker_reports_errors_on_one_line(tmp_path: Path) -> None:
    # Runs the worker with the host interpreter: the argument checks need no TVM library.
    pytest.importorskip("tvm")
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "missing.so"), "in.npz", "out.npz"],
        capture_output=True,
        text=True,
        timeout=_WORKER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("tvm_worker: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.npz").exists()


def test_runtime_layer_needs_its_own_stamp(tmp_path: Path, monkeypatch) -> None:
    # A base toolchain alone does not make ONNX Runtime runnable: its layer must be complete too.
    root = tmp_path / "toolchains" / "aarch64"
    (root / "sysroot" / "usr" / "bin").mkdir(parents=True)
    (root / "sysroot" / "usr" / "bin" / "python3.11").touch()
    (root / "site-packages").mkdir()
    (root / "toolchain.json").write_text(__import__("json").dumps(emulation._expected_stamp()), encoding="utf-8")
    monkeypatch.setattr(emulation, "_which_qemu", lambda: Path("/usr/bin/qemu-aarch64"))
    assert find_aarch64_toolchain(tmp_path) is not None
    assert find_aarch64_toolchain(tmp_path, runtime="onnxruntime") is None
    with pytest.raises(emulation.ToolchainError, match="no aarch64 emulation for runtime"):
        find_aarch64_toolchain(tmp_path, runtime="nope")


def test_layered_toolchain_puts_both_site_packages_on_the_path() -> None:
    base = emulation.Aarch64Toolchain(root=Path("/c/aarch64"), sysroot=Path("/c/aarch64/sysroot"),
                                      site_packages=Path("/c/aarch64/site-packages"),
                                      python=Path("/c/aarch64/sysroot/usr/bin/python3.11"), qemu=Path("/usr/bin/qemu-aarch64"))
    layered = emulation._layered(base, Path("/c/aarch64-onnxruntime"))
    env = layered.environment({})
    assert env["PYTHONPATH"].split(":") == ["/c/aarch64/site-packages", "/c/aarch64-onnxruntime/site-packages"]
    assert layered.python_argv()[:3] == ["/usr/bin/qemu-aarch64", "-L", "/c/aarch64-onnxruntime/prefix"]
    # The emulated CPU's cpuinfo: Cortex-A72 (part 0xd08), one block per core.
    assert emulation._emulated_cpuinfo(4).count("CPU part\t: 0xd08") == 4
