"""A content-addressed cache of built TVM libraries, so recompiling an unchanged partition skips LLVM.

With a warm tuning database most of a recompile is code generation: the tuned kernels are unrolled
and vectorised, and LLVM spends seconds on them (ResNet-18 on a 2-core host: 36-44 s against 9 s
untuned; from this cache, 6.6 s). The module
handed to `tvm.compile` is a pure function of the model, the pre-tuning passes and the records
applied, so its structural hash (which covers the constants' bytes) plus the target, the TVM version
and the linker names the library exactly — the same idea as ccache, or TorchInductor's FX graph
cache. A cached library is only ever a copy of what the same inputs built before.

    $SPLITC_CACHE/builds/<key>.so       # one exported library per key, written atomically
    $SPLITC_CACHE/builds/<key>.o        # one group of a library's kernels, compiled (KernelObjects)

A library's key covers its constants, so new weights miss it; its kernels do not depend on the
weights, and the threaded build (backends/tvm/build.py) keeps the object of each group of kernels
it compiles under a key of the group's own: the same architecture with other weights, or a model
that shares a group, links those objects instead of running LLVM on them again.

`SPLITC_BUILD_CACHE=0` turns both off; the cache keeps at most `SPLITC_BUILD_CACHE_MB` (default
2048) megabytes, dropping the least recently used entries first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitc.core.errors import InputError

BUILDS_SUBDIR = "builds"
_FORMAT = 1  # bump when what goes into a key changes
_SUFFIXES = (".so", ".o")  # libraries, kernel objects
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


@dataclass(frozen=True)
class KernelObjects:
    """Where `build_library` keeps and finds the objects of the groups of TIR functions it builds
    for `target_json`."""

    target_json: dict[str, Any]
    cache_dir: Path | None = None

    def key(self, group, context) -> str:
        """The key of the object `tvm.tirx.build(group)` emits under the pass context `context`:
        the SHA-256 of the group's serialised IR (a 64-bit structural hash would be enough to tell
        libraries apart by their constants, but a kernel linked under another's key would be
        silently wrong), the target, the pass options and TVM's version (its LLVM with it)."""
        import tvm

        options = {str(k): str(v) for k, v in context.config.items()}
        identity = {"format": _FORMAT, "tvm": tvm.__version__, "target": self.target_json, "opt_level": int(context.opt_level),
                    "options": options, "group": hashlib.sha256(tvm.ir.save_json(group).encode()).hexdigest()}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def fetch(self, key: str, dest: Path) -> bool:
        return fetch(key, dest, self.cache_dir, suffix=".o")

    def store(self, key: str, built: Path) -> None:
        store(key, built, self.cache_dir, suffix=".o")


def fetch(key: str, dest: Path, cache_dir: Path | None = None, suffix: str = ".so") -> bool:
    """Copy the entry cached under `key` (a library; with `suffix` ".o", a kernel object) to `dest`;
    False when there is none."""
    cached = _root(cache_dir) / f"{key}{suffix}"
    try:
        shutil.copyfile(cached, dest)
    except FileNotFoundError:
        return False
    try:
        os.utime(cached)  # most recently used: evicted last
    except OSError:  # a read-only shared cache still serves hits
        pass
    return True


def store(key: str, built: Path, cache_dir: Path | None = None, suffix: str = ".so") -> None:
    """Keep a copy of the library (or with `suffix` ".o", kernel object) at `built` under `key` (best
    effort: a full or read-only cache costs a rebuild next time, never a failed compile)."""
    root = _root(cache_dir)
    staging: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=root)
        os.close(fd)
        staging = Path(name)
        shutil.copyfile(built, staging)
        os.replace(staging, root / f"{key}{suffix}")  # readers see the whole file or none
        staging = None
        _evict(root, _limit_bytes())
    except OSError:
        pass
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)


def _evict(root: Path, limit_bytes: int) -> None:
    entries = []
    for path in (p for suffix in _SUFFIXES for p in root.glob(f"*{suffix}")):
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
