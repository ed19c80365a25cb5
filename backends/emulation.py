"""Run aarch64 (Raspberry Pi class) TVM artifacts on an x86 host through qemu user-mode emulation.

The edge half of a split model is cross-compiled for aarch64. To check it without a board we run
it in the *aarch64* TVM runtime, which needs an aarch64 CPython plus aarch64 wheels. This module
provisions that once into a cache folder:

- ``sysroot/``: Debian arm64 packages (CPython 3.11, glibc, libstdc++, ...) unpacked with
  ``dpkg-deb -x``. ``qemu-aarch64 -L sysroot`` resolves the guest's dynamic loader and shared
  libraries there.
- ``site-packages/``: the aarch64 wheels of TVM and its runtime dependencies, unzipped.
- ``toolchain.json``: a stamp written last, so its presence (with matching versions) means the
  folder is complete.

Device runtimes other than TVM's (ONNX Runtime) are layers beside it, ``toolchains/aarch64-<runtime>/``,
each with its own wheels, stamp and lock: adding or upgrading one never rebuilds nor invalidates the
base folder, which other checkouts share. A layer's ``prefix/`` is what ``qemu-aarch64 -L`` sees:
the base sysroot through relative symlinks, plus a ``/proc/cpuinfo`` describing the emulated CPU
(qemu-user 7.2 passes the host's through, and the x86 text crashes the cpuinfo library that ONNX
Runtime initialises on import; qemu looks paths up under ``-L`` first).

Only the standard library is used: this module is imported on hosts that may lack torch and TVM.
Emulated timings say nothing about a real board; use emulation for correctness only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from splitc.core.errors import ToolchainError  # re-exported: callers catch it from here too
from splitc.core.manifest import RUNTIME_ONNXRUNTIME, RUNTIME_TVM, Artifact

__all__ = [
    "Aarch64Toolchain",
    "ToolchainError",
    "cache_subdir",
    "default_cache_dir",
    "find_aarch64_toolchain",
    "provision_aarch64",
    "RUNTIME_LAYERS",
]

# Bump when the folder layout or the provisioning recipe changes: a stamp with another format
# (or other package lists) makes find_aarch64_toolchain() report "not provisioned".
TOOLCHAIN_FORMAT = 1

# Debian 12 (bookworm) arm64 packages: the interpreter and every shared library it, numpy and
# libtvm_runtime load. Names are release-specific (python3.11, libssl3, libffi8).
DEBIAN_PACKAGES: tuple[str, ...] = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libssl3",
    "libstdc++6",
    "libgcc-s1",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libuuid1",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libdb5.3",
    "libgdbm6",
    "libcrypt1",
    "libnsl2",
    "libtirpc3",
    "libzstd1",
    "libgomp1",
)

# Pinned so that the emulated runtime matches the host compiler exactly. apache-tvm-ffi 0.1.15.x
# is known to crash (see TOOLCHAIN.md); numpy/ml_dtypes/typing_extensions match the host install.
WHEELS: tuple[str, ...] = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
)

# bookworm ships glibc 2.36, so any manylinux tag up to 2_36 runs in the sysroot.
_WHEEL_PLATFORMS: tuple[str, ...] = (
    "manylinux_2_36_aarch64",
    "manylinux_2_34_aarch64",
    "manylinux_2_31_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
)

PYTHON_VERSION = "3.11"


@dataclass(frozen=True)
class RuntimeLayer:
    """A device runtime installed beside the base toolchain: its pinned aarch64 wheels and the
    module whose import (and `__version__`) proves it runs under emulation."""

    name: str
    wheels: tuple[str, ...]
    module: str

    @property
    def version(self) -> str:
        return self.wheels[0].split("==")[1]


# ONNX Runtime's import needs only numpy (in the base); flatbuffers/protobuf/packaging serve its
# training and conversion tools (checked: InferenceSession runs without them).
RUNTIME_LAYERS: dict[str, RuntimeLayer] = {
    "onnxruntime": RuntimeLayer("onnxruntime", ("onnxruntime==1.32.0",), "onnxruntime"),
}
# The base folder's own runtime: TVM's, in the base site-packages.
BASE_RUNTIME = "tvm"

# Emulating the Pi 4's core (instead of qemu's default "max" CPU) makes code that uses
# instructions a Cortex-A72 lacks (SVE, newer extensions) fail here as it would on the board.
DEFAULT_QEMU_CPU = "cortex-a72"

_STAMP_NAME = "toolchain.json"
_LAYER_STAMP_NAME = "layer.json"
_LAYER_FORMAT = 1
_TOOLCHAIN_SUBDIR = Path("toolchains") / "aarch64"
_SMOKE_TIMEOUT_S = 900.0
_DOWNLOAD_TIMEOUT_S = 1800.0

# Host variables that must not reach the emulated interpreter: PYTHON* would point it at the host
# stdlib or site-packages, LD_* would make the guest loader try to load x86 libraries, and QEMU_*
# would override the options we pass explicitly.
_SCRUBBED_ENV_PREFIXES: tuple[str, ...] = ("PYTHON", "LD_", "QEMU_")


@dataclass(frozen=True)
class Aarch64Toolchain:
    """A provisioned aarch64 CPython + TVM runtime, runnable through qemu-aarch64."""

    root: Path
    sysroot: Path
    site_packages: Path
    python: Path
    qemu: Path
    cpu: str = DEFAULT_QEMU_CPU
    extra_site_packages: tuple[Path, ...] = ()  # runtime layers, after the base on sys.path

    def python_argv(self, *python_args: str) -> list[str]:
        """argv that runs the emulated interpreter with ``python_args`` (e.g. ``-c CODE``)."""
        return [
            str(self.qemu),
            "-L",
            str(self.sysroot),
            "-cpu",
            self.cpu,
            str(self.python),
            *python_args,
        ]

    def command(self, script: Path, *args: str) -> list[str]:
        """argv that runs ``python script args`` under emulation; pair it with environment()."""
        return self.python_argv(str(script), *args)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for command(): ``base`` (default os.environ) without host Python/loader
        settings, plus what the emulated interpreter needs."""
        source = os.environ if base is None else base
        env = {
            key: value
            for key, value in source.items()
            if not key.startswith(_SCRUBBED_ENV_PREFIXES)
        }
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(str(p) for p in (self.site_packages, *self.extra_site_packages)),
                # A host ~/.local/lib/python3.11 would hold x86 extension modules.
                "PYTHONNOUSERSITE": "1",
                # The sysroot is precompiled at provisioning time; never write into the shared
                # cache from concurrent runs.
                "PYTHONDONTWRITEBYTECODE": "1",
                # The sysroot has no locale data; force UTF-8 I/O regardless of the host's LANG.
                "PYTHONUTF8": "1",
                # Skip loading the 250 MB compiler library: a device only needs libtvm_runtime,
                # and loading the compiler under emulation costs several seconds per process.
                "TVM_USE_RUNTIME_LIB": "1",
            }
        )
        return env


# What the emulated toolchain can run: aarch64 artifacts of these runtimes.
EMULATED_ARCH = "aarch64"
# The standalone script (splitc/runtime/) that runs each emulated runtime's artifact in the guest.
EMULATION_WORKERS = {RUNTIME_TVM: "tvm_worker.py", RUNTIME_ONNXRUNTIME: "ort_worker.py"}
EMULATED_RUNTIMES = frozenset(EMULATION_WORKERS)


def can_emulate(artifact: Artifact, device_arch: str | None = None) -> bool:
    """Whether `splitc verify` can run this artifact under qemu-user with the emulated toolchain. An
    ISA-neutral artifact (an ONNX model) is the device's code: `device_arch` is its target's ISA."""
    return (artifact.arch or device_arch) == EMULATED_ARCH and artifact.runtime in EMULATED_RUNTIMES


def default_cache_dir() -> Path:
    """``$SPLITC_CACHE`` if set, else ``~/.cache/splitc``."""
    configured = os.environ.get("SPLITC_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "splitc"


def cache_subdir(name: str, cache_dir: Path | None = None) -> Path:
    """``name`` under ``cache_dir``, or under default_cache_dir() when None: where each of splitc's
    caches (toolchains, tuning databases, built libraries) lives."""
    return (default_cache_dir() if cache_dir is None else Path(cache_dir)) / name


def _toolchain_root(cache_dir: Path | None) -> Path:
    return cache_subdir(_TOOLCHAIN_SUBDIR, cache_dir)


def _expected_stamp() -> dict[str, object]:
    """The stamp fields that must match for an existing toolchain to be reused."""
    return {
        "format": TOOLCHAIN_FORMAT,
        "python": PYTHON_VERSION,
        "debian_packages": list(DEBIAN_PACKAGES),
        "wheels": list(WHEELS),
    }


def _layer_root(cache_dir: Path | None, layer: RuntimeLayer) -> Path:
    return _toolchain_root(cache_dir).with_name(f"{_TOOLCHAIN_SUBDIR.name}-{layer.name}")


def _expected_layer_stamp(layer: RuntimeLayer) -> dict[str, object]:
    return {"format": _LAYER_FORMAT, "python": PYTHON_VERSION, "wheels": list(layer.wheels), "cpu": DEFAULT_QEMU_CPU}


def _layered(base: Aarch64Toolchain, layer_root: Path) -> Aarch64Toolchain:
    """The base toolchain run through a layer: the layer's prefix for -L, its wheels on sys.path."""
    prefix = layer_root / "prefix"
    return Aarch64Toolchain(
        root=layer_root,
        sysroot=prefix,
        site_packages=base.site_packages,
        python=prefix / "usr" / "bin" / f"python{PYTHON_VERSION}",
        qemu=base.qemu,
        cpu=base.cpu,
        extra_site_packages=(layer_root / "site-packages",),
    )


def _toolchain_at(root: Path, qemu: Path) -> Aarch64Toolchain:
    sysroot = root / "sysroot"
    return Aarch64Toolchain(
        root=root,
        sysroot=sysroot,
        site_packages=root / "site-packages",
        python=sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}",
        qemu=qemu,
    )


def _which_qemu() -> Path | None:
    found = shutil.which("qemu-aarch64")
    return Path(found) if found else None


def find_aarch64_toolchain(cache_dir: Path | None = None, runtime: str = BASE_RUNTIME) -> Aarch64Toolchain | None:
    """The provisioned toolchain under ``cache_dir`` (default: default_cache_dir()) that runs
    `runtime` (TVM's, or a name in RUNTIME_LAYERS), or None when it is absent, incomplete, from
    another recipe version, or qemu-aarch64 is not installed.

    Cheap: reads one or two small files and looks up qemu-aarch64 on PATH; starts no process.
    """
    base = _find_base(cache_dir)
    if base is None or runtime == BASE_RUNTIME:
        return base
    if runtime not in RUNTIME_LAYERS:
        raise ToolchainError(f"no aarch64 emulation for runtime {runtime!r}; known: {BASE_RUNTIME}, {', '.join(RUNTIME_LAYERS)}")
    layer = RUNTIME_LAYERS[runtime]
    root = _layer_root(cache_dir, layer)
    try:
        stamp = json.loads((root / _LAYER_STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or any(stamp.get(k) != v for k, v in _expected_layer_stamp(layer).items()):
        return None
    toolchain = _layered(base, root)
    return toolchain if toolchain.python.is_file() else None


def _find_base(cache_dir: Path | None) -> Aarch64Toolchain | None:
    root = _toolchain_root(cache_dir)
    try:
        stamp = json.loads((root / _STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return None
    if any(stamp.get(key) != value for key, value in _expected_stamp().items()):
        return None
    qemu = _which_qemu()
    if qemu is None:
        return None
    toolchain = _toolchain_at(root, qemu)
    if not (toolchain.python.is_file() and toolchain.site_packages.is_dir()):
        return None
    return toolchain


def provision_aarch64(
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    runtimes: Sequence[str] = tuple(RUNTIME_LAYERS),
) -> Aarch64Toolchain:
    """Make sure the aarch64 toolchain, and a layer for each of `runtimes`, exist under
    ``cache_dir``; return the base toolchain (TVM's runtime).

    Idempotent: returns at once when everything is present. Otherwise it downloads Debian arm64
    packages (without touching the host's apt state) and aarch64 wheels, builds each folder in a
    temporary sibling, smoke-tests the runtime's import under emulation and only then renames the
    folder into place, so an interrupted run leaves nothing half-made. Concurrent callers are
    serialised with one lock file per folder. Raises ToolchainError on failure.
    """
    unknown = [r for r in runtimes if r not in RUNTIME_LAYERS]
    if unknown:
        raise ToolchainError(f"no aarch64 emulation for runtime {unknown[0]!r}; known: {', '.join(RUNTIME_LAYERS)}")
    qemu = _which_qemu()
    if qemu is None:
        raise ToolchainError(
            "qemu-aarch64 not found on PATH: install qemu-user: apt-get install qemu-user"
        )
    if find_aarch64_toolchain(cache_dir) is None:
        for tool, package in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
            if shutil.which(tool) is None:
                raise ToolchainError(
                    f"{tool} not found: provisioning the aarch64 sysroot needs a Debian 12 host "
                    f"with the {package} package"
                )
    base = _provision_folder(_toolchain_root(cache_dir), lambda: find_aarch64_toolchain(cache_dir),
                             lambda staging: _build(staging, qemu, log), "aarch64 toolchain", log)
    for runtime in runtimes:
        layer = RUNTIME_LAYERS[runtime]
        _provision_folder(_layer_root(cache_dir, layer), lambda: find_aarch64_toolchain(cache_dir, runtime),
                          lambda staging: _build_layer(staging, base, layer, log), f"aarch64 {runtime} layer", log)
    return base


def _provision_folder(root: Path, find: Callable[[], Aarch64Toolchain | None], build: Callable[[Path], None],
                      what: str, log: Callable[[str], None]) -> Aarch64Toolchain:
    """`find()` if it finds the folder complete; else build it in a staging sibling under `root`'s
    lock and rename it into place."""
    existing = find()
    if existing is not None:
        return existing
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolchainError(f"cannot create cache folder {parent}: {exc}") from exc

    with _exclusive_lock(parent / f".{root.name}.lock", log):
        # Another process may have finished the job while we waited for the lock.
        existing = find()
        if existing is not None:
            return existing
        _remove_leftovers(parent, root.name)
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=parent))
        try:
            # mkdtemp makes the folder private (0700); the finished toolchain is plain read-only
            # data that other users of a shared cache may run.
            staging.chmod(0o755)
            build(staging)
            _move_into_place(staging, root)
        except BaseException:
            # Covers KeyboardInterrupt too; a SIGKILL leaves the .tmp- folder, which the next
            # run removes under the lock (_remove_leftovers).
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(f"{what} ready at {root} ({time.monotonic() - started:.0f} s)")

    found = find()
    if found is None:  # pragma: no cover - only if the folder is changed under us
        raise ToolchainError(f"{what} at {root} vanished right after provisioning")
    return found


# --------------------------------------------------------------------------------------------
# Provisioning steps


def _build(staging: Path, qemu: Path, log: Callable[[str], None]) -> None:
    """Fill ``staging`` with a complete toolchain (stamp last). Downloads go to a scratch folder
    inside it that is deleted before the smoke check, so the final folder holds no archives."""
    scratch = staging / ".download"
    toolchain = _toolchain_at(staging, qemu)

    log(f"downloading {len(DEBIAN_PACKAGES)} Debian arm64 packages")
    debs = _download_debs(scratch / "apt")
    log(f"unpacking {len(debs)} packages into the sysroot")
    toolchain.sysroot.mkdir()
    for deb in debs:
        _run(
            ["dpkg-deb", "-x", str(deb), str(toolchain.sysroot)],
            what=f"unpacking {deb.name}",
            hint="the download may be corrupt; run provisioning again",
        )
    if not toolchain.python.is_file():
        raise ToolchainError(
            f"the arm64 packages did not provide {toolchain.python.relative_to(staging)}; "
            "the host's apt sources must point at Debian 12 (bookworm)"
        )

    log(f"downloading aarch64 wheels: {' '.join(WHEELS)}")
    wheels = _download_wheels(scratch / "wheels", WHEELS)
    toolchain.site_packages.mkdir()
    for wheel in wheels:
        _unpack_wheel(wheel, toolchain.site_packages)
    shutil.rmtree(scratch)

    log("precompiling Python bytecode")
    _precompile(toolchain, [toolchain.sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}", toolchain.site_packages])

    log("smoke check: import tvm, numpy under qemu-aarch64 (slow: everything is emulated)")
    versions = _smoke_check(toolchain)

    stamp = {**_expected_stamp(), "installed": versions, "cpu": toolchain.cpu}
    (staging / _STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def _build_layer(staging: Path, base: Aarch64Toolchain, layer: RuntimeLayer, log: Callable[[str], None]) -> None:
    """Fill ``staging`` with a runtime layer over `base` (stamp last): its prefix, wheels, and a
    smoke check that the runtime imports under emulation with both site-packages on the path."""
    prefix = staging / "prefix"
    prefix.mkdir()
    # Relative links: the layer keeps working when the base is re-provisioned in place.
    for entry in sorted(base.sysroot.iterdir()):
        (prefix / entry.name).symlink_to(os.path.relpath(entry, prefix))
    (prefix / "proc").mkdir()
    (prefix / "proc" / "cpuinfo").write_text(_emulated_cpuinfo(), encoding="utf-8")

    log(f"downloading aarch64 wheels: {' '.join(layer.wheels)}")
    scratch = staging / ".download"
    site_packages = staging / "site-packages"
    site_packages.mkdir()
    for wheel in _download_wheels(scratch, layer.wheels):
        _unpack_wheel(wheel, site_packages)
    shutil.rmtree(scratch)
    _precompile(_layered(base, staging), [site_packages])

    log(f"smoke check: import {layer.module} under qemu-aarch64")
    toolchain = _layered(base, staging)
    code = (f"import json, sys, {layer.module} as m\n"
            "print(json.dumps({'version': m.__version__, 'path': sys.path}))")
    report = _smoke_report(toolchain, code, f"smoke check `import {layer.module}` under qemu-aarch64")
    if report.get("version") != layer.version:
        raise ToolchainError(f"smoke check imported {layer.module} {report.get('version')}, expected {layer.version}; "
                             "run provisioning again")
    _refuse_host_paths(report, (str(staging), str(base.root)))
    stamp = {**_expected_layer_stamp(layer), "installed": report["version"], "base": str(base.root)}
    (staging / _LAYER_STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


# Cortex-A72 (ARM part 0xd08), the core DEFAULT_QEMU_CPU emulates, four of them as on a Pi 4.
_CPUINFO_CORE = """processor\t: {index}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

"""


def _emulated_cpuinfo(cores: int = 4) -> str:
    return "".join(_CPUINFO_CORE.format(index=i) for i in range(cores))


def _apt_options(state: Path) -> list[str]:
    """apt-get options that resolve arm64 packages against private state folders.

    The host's package lists, caches, dpkg status and lock files are never read or written: apt
    sees only the host's sources (and keyrings), so the host installation stays as it was.
    """
    lists = state / "lists"
    cache = state / "cache"
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    status = state / "status"
    status.touch()
    options = [
        "-q",
        "-oAPT::Architecture=arm64",
        "-oAPT::Architectures=arm64",
        f"-oDir::State={state}",
        f"-oDir::State::Lists={lists}",
        f"-oDir::State::status={status}",
        f"-oDir::Cache={cache}",
        "-oDir::Cache::pkgcache=",
        "-oDir::Cache::srcpkgcache=",
        "-oAcquire::Languages=none",
    ]
    if os.geteuid() == 0:
        # As root apt hands downloads to the unprivileged _apt user, which cannot write into our
        # 0700 temporary folders; it would warn and fall back anyway, so skip the dance.
        options.append("-oAPT::Sandbox::User=root")
    return options


def _download_debs(state: Path) -> list[Path]:
    options = _apt_options(state)
    _run(
        ["apt-get", *options, "update"],
        what="apt-get update (arm64 package lists)",
        hint="check network access to the Debian mirrors in /etc/apt/sources.list.d",
        timeout=_DOWNLOAD_TIMEOUT_S,
    )
    debs_dir = state / "debs"
    debs_dir.mkdir()
    # `apt-get download` saves into the working directory; it resolves exactly these packages
    # (no dependencies), which is what we want for a minimal sysroot.
    _run(
        ["apt-get", *options, "download", *DEBIAN_PACKAGES],
        what="apt-get download (arm64 packages)",
        hint="check network access to the Debian mirrors and that the host runs Debian 12",
        cwd=debs_dir,
        timeout=_DOWNLOAD_TIMEOUT_S,
    )
    debs = sorted(debs_dir.glob("*.deb"))
    if len(debs) != len(DEBIAN_PACKAGES):
        raise ToolchainError(
            f"apt-get download produced {len(debs)} of {len(DEBIAN_PACKAGES)} packages; "
            "run provisioning again"
        )
    return debs


def _download_wheels(dest: Path, pins: Sequence[str] = WHEELS) -> list[Path]:
    dest.mkdir(parents=True)
    platforms = [arg for platform in _WHEEL_PLATFORMS for arg in ("--platform", platform)]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            PYTHON_VERSION,
            "--implementation",
            "cp",
            *platforms,
            "--dest",
            str(dest),
            "--disable-pip-version-check",
            "--no-input",
            *pins,
        ],
        what="pip download (aarch64 wheels)",
        hint="check access to the Python package index (pip config / PIP_INDEX_URL)",
        timeout=_DOWNLOAD_TIMEOUT_S,
    )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(pins):
        raise ToolchainError(
            f"pip download produced {len(wheels)} of {len(pins)} wheels; run provisioning again"
        )
    return wheels


def _unpack_wheel(wheel: Path, site_packages: Path) -> None:
    """Install a wheel by unzipping it, as pip would for a target folder.

    Files under ``<dist>.data/purelib`` and ``platlib`` belong in site-packages; scripts, headers
    and data are of no use to the emulated runtime and are dropped.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site_packages)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ToolchainError(f"cannot unpack {wheel.name}: {exc}; run provisioning again") from exc
    for data_dir in site_packages.glob("*.data"):
        for scheme in ("purelib", "platlib"):
            scheme_dir = data_dir / scheme
            if scheme_dir.is_dir():
                shutil.copytree(scheme_dir, site_packages, dirs_exist_ok=True)
        shutil.rmtree(data_dir)


def _precompile(toolchain: Aarch64Toolchain, folders: Sequence[Path]) -> None:
    """Write .pyc files for `folders` (the stdlib and the wheels).

    Debian packages ship no bytecode (postinst generates it), so without this every emulated run
    would recompile the stdlib under emulation. The .pyc format depends only on the Python minor
    version, so a 3.11 host compiles natively in seconds; other hosts compile under emulation.
    Best effort: a file that fails to compile is simply compiled at import time.
    """
    compile_args = ("-m", "compileall", "-q", "-j", "0", *(str(f) for f in folders))
    if f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON_VERSION:
        argv, env = [sys.executable, "-I", *compile_args], None
    else:
        argv, env = toolchain.python_argv(*compile_args), toolchain.environment()
    try:
        subprocess.run(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_SMOKE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


# Also checks the compiler-free import path the worker uses and that no host folder leaked onto
# sys.path (qemu -L falls back to host paths for files missing from the sysroot).
_SMOKE_CODE = """\
import json, sys
import numpy, tvm
from tvm.runtime.vm import VirtualMachine
print(json.dumps({"python": sys.version.split()[0], "numpy": numpy.__version__,
                  "tvm": tvm.__version__, "path": sys.path}))
"""


def _smoke_check(toolchain: Aarch64Toolchain) -> dict[str, str]:
    report = _smoke_report(toolchain, _SMOKE_CODE, "smoke check `import tvm, numpy` under qemu-aarch64")
    expected_tvm = next(w.split("==")[1] for w in WHEELS if w.startswith("apache-tvm=="))
    if report.get("tvm") != expected_tvm:
        raise ToolchainError(
            f"smoke check imported TVM {report.get('tvm')}, expected {expected_tvm}; "
            "run provisioning again"
        )
    _refuse_host_paths(report, (str(toolchain.root),))
    return {key: str(report[key]) for key in ("python", "numpy", "tvm")}


def _smoke_report(toolchain: Aarch64Toolchain, code: str, what: str) -> dict:
    """Run `code` under emulation; the JSON object its last printed line holds."""
    stdout = _run(
        toolchain.python_argv("-c", code),
        what=what,
        hint="the toolchain is unusable; see the message above and run provisioning again",
        env=toolchain.environment(),
        timeout=_SMOKE_TIMEOUT_S,
    )
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise ToolchainError(f"smoke check printed no version report: {stdout!r:.200}") from exc
    return report


def _refuse_host_paths(report: dict, roots: Sequence[str]) -> None:
    leaked = [entry for entry in report.get("path", []) if entry and not entry.startswith(tuple(roots))]
    if leaked:
        raise ToolchainError(f"emulated Python sees host folders on sys.path: {leaked}")


def _move_into_place(staging: Path, root: Path) -> None:
    """Rename the finished staging folder to ``root``. An outdated or broken ``root`` is first
    renamed aside (both renames stay on one file system, so each is atomic)."""
    if root.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, retired / root.name)
        os.replace(staging, root)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, root)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete staging/retired folders of runs that were killed. Caller holds the lock."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for leftover in parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process provisioning into {path.parent}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(
    argv: Sequence[str],
    *,
    what: str,
    hint: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run a provisioning command; on failure raise ToolchainError with one line: what failed,
    the tool's last error line, and what to do."""
    try:
        result = subprocess.run(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolchainError(f"{what} timed out after {timeout:.0f} s; {hint}") from exc
    except OSError as exc:
        raise ToolchainError(f"{what} could not start: {exc}; {hint}") from exc
    if result.returncode != 0:
        detail = _last_error_line(result.stderr) or _last_error_line(result.stdout)
        raise ToolchainError(f"{what} failed (exit {result.returncode}): {detail}; {hint}")
    return result.stdout


def _last_error_line(text: str) -> str:
    """The most telling line of a tool's output: apt's last ``E:`` line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("E:", "ERROR:", "error:"))]
    return (errors or lines or ["no output"])[-1]
