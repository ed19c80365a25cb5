"""The runtime must load on a device that has neither torch nor the compiler (DESIGN: a runtime
that pulls in the compiler is an anti-pattern). Checked in a fresh interpreter, since this test
process has imported torch long before."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "onnx", "onnxruntime", "tvm", "splitc.frontend", "splitc.passes", "splitc.backends", "splitc.drivers.compiler")

_PROBE = """
import json, sys
import splitc.runtime
from splitc.runtime import Bundle, SplitSession, Manifest, TensorSpec
import splitc.runtime.session, splitc.core.manifest, splitc.runtime.executors
import splitc.runtime.adaptive  # the adaptive split runs on the device too
from splitc.runtime.adaptive import AdaptiveSession
from splitc.runtime.link_estimate import LinkEstimator
from splitc.runtime.variant_index import read_variants
import splitc.core.errors
import splitc.runtime.generation, splitc.runtime.decoder_sessions, splitc.runtime.decoder_client  # split decoders
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(code: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _offending(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_runtime_imports_no_compiler_or_torch():
    modules = _modules_after(_PROBE)
    assert "splitc.runtime" in modules and "splitc.runtime.session" in modules and "splitc.runtime.adaptive" in modules
    assert "splitc.runtime.link_estimate" in modules and "splitc.runtime.variant_index" in modules
    assert _offending(modules) == []


def test_probe_detects_a_heavy_import():
    # Guards against a silent pass: the same probe does see torch when something imports it.
    modules = _modules_after("import json, sys, splitc.runtime, splitc.frontend; print(json.dumps(sorted(sys.modules)))")
    offending = _offending(modules)
    assert "torch" in offending and "splitc.frontend" in offending
