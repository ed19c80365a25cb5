"""Target keys: which tuning database a TVM target's records belong to.

Records are keyed by target (one database directory per key, backends/tvm/database.py): the key is
a readable prefix (kind, ISA, CPU, core count) and a hash of the resolved target JSON and of
FORMAT, so records measured for one CPU model, core count and record format are never applied to
another. Also the facts about a target that tuning and splitc's own schedules need: its ISA and
the width of its vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

FORMAT = 3  # bump when the key, the pre-tuning passes or the measurement change (old records would not match or compare)


def host_arch_name() -> str:
    from splitc.runtime.executors import host_arch

    return host_arch()


def host_target_json() -> dict[str, Any]:
    """This build host's own CPU target (what the builtin x86 target resolves to on an x86 host)."""
    return {"kind": "llvm", "mtriple": f"{host_arch_name()}-linux-gnu", "mcpu": "host"}


def target_arch(target_json: dict[str, Any]) -> str:
    triple = str(target_json.get("mtriple") or "")
    return triple.split("-")[0] if triple else host_arch_name()


def resolve_target(target_json: dict[str, Any]) -> dict[str, Any]:
    """The target JSON with `mcpu = "host"` replaced by this machine's CPU name (LLVM's), and
    `num-cores` filled in with this host's core count when the target is this host's ISA."""
    resolved = dict(target_json)
    if resolved.get("mcpu") == "host":
        from tvm.target.codegen import llvm_get_system_cpu

        resolved["mcpu"] = str(llvm_get_system_cpu())
        resolved.setdefault("num-cores", _physical_cores())
    return resolved


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def target_key(target_json: dict[str, Any]) -> str:
    """A directory name for a target: readable prefix + hash of the canonical JSON."""
    canon = json.dumps({"format": FORMAT, **target_json}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canon.encode()).hexdigest()[:10]
    parts = [str(target_json.get("kind", "llvm")), str(target_json.get("mtriple", "")).split("-")[0],
             str(target_json.get("mcpu", "generic")), f"{target_json.get('num-cores', 'n')}c"]
    return "-".join(p for p in parts if p) + "-" + digest



def vector_bits(target_json: dict[str, Any]) -> int | None:
    """The width in bits of the widest vectors the target's CPU runs, from its features: 512 with
    AVX-512, 256 with AVX, 128 with SSE2 or NEON (SVE: its minimum); None when unknown. What
    splitc's own schedules vectorize by. LLVM's preference for 256-bit vectors on Intel's AVX-512
    CPUs (`prefer-256-bit`) only steers its auto-vectorizer: the explicit 16-lane vectors of a TIR
    schedule still become 512-bit instructions, as MetaSchedule's records already do there, and on an
    Emerald Rapids host 16 lanes ran MobileNetV2's 1x1 convolutions 1.5-2x faster than 8 (depthwise
    layers, bound by memory, the same). TVM's `llvm_get_vector_width` is not used: it answers 512
    for every x86 CPU, AVX2-only ones included."""
    if target_json.get("kind") != "llvm":
        return None
    try:
        import tvm
        from tvm.target.codegen import llvm_get_cpu_features

        features = set(llvm_get_cpu_features(tvm.target.Target(target_json)))
    except Exception:  # noqa: BLE001 - an LLVM without the target's backend, or an older TVM: width unknown
        return None
    if "avx512f" in features:
        return 512
    if "avx" in features:
        return 256
    if features & {"sse2", "neon", "sve"}:
        return 128
    return None
