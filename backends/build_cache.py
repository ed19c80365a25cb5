"""A content-addressed cache of built TVM libraries, so recompiling an unchanged partition skips LLVM.

With a warm tuning database most of a recompile is code generation: the tuned kernels are unrolled
and vectorised, and LLVM spends seconds on them (ResNet-18 on a 2-core host: 36-44 s against 9 s
untuned; from this cache, 6.6 s). The module
handed to `tvm.compile` is a pure function of the model, the pre-tuning passes and the records
applied, so its structural hash (which covers the constants' bytes) plus the target, the TVM version
and the linker names the library exactly — the same idea as ccache, or TorchInductor's FX graph
cache. A cached library is only ever a copy of what the same inputs built before.

    $SPLITC_CACHE/builds/<key>.so       # one exported library per key, written atomically

`SPLITC_BUILD_CACHE=0` turns it off; the cache keeps at most `SPLITC_BUILD_CACHE_MB` (default 2048)
megabytes, dropping the least recently used libraries first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from splitc.errors import InputError

BUILDS_SUBDIR = "builds"
_FORMAT = 1  # bump when what goes into a key changes
_DEFAULT_LIMIT_MB = 2048


def enabled() -> bool:
    """False with SPLITC_BUILD_CACHE=0; checks SPLITC_BUILD_CACHE_MB before anything is built."""
    if os.environ.get("SPLITC_BUILD_CACHE", "1") == "0":
        return False
    _limit_bytes()
    return True


def _limit_bytes() -> int:
    value = os.environ.get("SPLITC_BUILD_CACHE_MB", str(_DEFAULT_LIMIT_MB))
    try:
        megabytes = int(value)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise InputError(f"SPLITC_BUILD_CACHE_MB={value!r} is not a size in megabytes; set a whole number "
                         "(0 keeps nothing) or unset it")
    return megabytes << 20


def _root(cache_dir: Path | None) -> Path:
    from splitc.backends.emulation import cache_subdir

    return cache_subdir(BUILDS_SUBDIR, cache_dir)


def build_key(mod, target_json: dict[str, Any], linker: str | None) -> str:
    """The key of the library `tvm.compile(mod, target_json)` exports with `linker` (None: this
    host's default compiler)."""
    import tvm
    from tvm.support.cc import get_cc
    from tvm_ffi import structural_hash

    linker_path = (shutil.which(linker) or linker) if linker else get_cc()
    identity = {"format": _FORMAT, "tvm": tvm.__version__, "target": target_json, "linker": linker_path,
                "module": structural_hash(mod)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fetch(key: str, dest: Path, cache_dir: Path | None = None) -> bool:
    """Copy the library cached under `key` to `dest`; False when there is none."""
    cached = _root(cache_dir) / f"{key}.so"
    try:
        shutil.copyfile(cached, dest)
    except FileNotFoundError:
        return False
    try:
        os.utime(cached)  # most recently used: evicted last
    except OSError:  # a read-only shared cache still serves hits
        pass
    return True


def store(key: str, built: Path, cache_dir: Path | None = None) -> None:
    """Keep a copy of the library at `built` under `key` (best effort: a full or read-only cache
    costs a rebuild next time, never a failed compile)."""
    root = _root(cache_dir)
    staging: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=root)
        os.close(fd)
        staging = Path(name)
        shutil.copyfile(built, staging)
        os.replace(staging, root / f"{key}.so")  # readers see the whole library or none
        staging = None
        _evict(root, _limit_bytes())
    except OSError:
        pass
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)


def _evict(root: Path, limit_bytes: int) -> None:
    entries = []
    for path in root.glob("*.so"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # another compile evicted it
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
