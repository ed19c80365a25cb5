"""Apache TVM backend: Relax import from torch.export, build for the target's LLVM triple.

A target whose ISA differs from the build host (rpi4: aarch64) is cross-compiled with the target's
cross compiler, and the same partition is also built for the host ISA (the "host twin") so checks
can run here when the artifact itself cannot be executed or emulated.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import torch.fx as fx

from splitc.backends.base import CompiledArtifact, CompiledPartition, op_name
from splitc.errors import BackendError, ToolchainError
from splitc.passes.partition import Partition
from splitc.runtime.executors import host_arch
from splitc.runtime.manifest import ROLE_DEPLOY, ROLE_HOST_TWIN, RUNTIME_TVM

_HOST_TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}


@functools.cache
def _convert_map_keys() -> frozenset[str]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map())


class TVMBackend:
    id = "tvm"

    def supports(self, node: fx.Node) -> bool:
        name = op_name(node)
        return name == "getitem" or name in _convert_map_keys()

    def compile(self, partition: Partition, workdir: Path) -> CompiledPartition:
        from tvm.relax.frontend.torch import from_exported_program

        target = partition.target
        options = dict(target.backend_options)
        target_json: dict[str, Any] = dict(options.get("target") or {"kind": "llvm", "mtriple": _HOST_TRIPLES[host_arch()]})
        try:
            mod = from_exported_program(partition.export(), keep_params_as_input=False)
        except Exception as exc:
            raise BackendError(f"TVM could not import partition {partition.index} for {target.name}: {_first_line(exc)}") from exc

        workdir.mkdir(parents=True, exist_ok=True)
        artifacts = [
            self._build(mod, target_json, target.arch, options.get("cross_compiler"), workdir / f"model.{target.arch}.so", ROLE_DEPLOY)
        ]
        if target.arch != host_arch():
            twin = {"kind": "llvm", "mtriple": _HOST_TRIPLES.get(host_arch(), f"{host_arch()}-linux-gnu")}
            artifacts.append(self._build(mod, twin, host_arch(), None, workdir / f"model.{host_arch()}.so", ROLE_HOST_TWIN))
        return CompiledPartition(artifacts)

    def _build(self, mod, target_json: dict, arch: str, cross_compiler: str | None, path: Path, role: str) -> CompiledArtifact:
        import tvm

        try:
            executable = tvm.compile(mod, target=tvm.target.Target(target_json))
        except Exception as exc:
            raise BackendError(f"TVM failed to build for {target_json}: {_first_line(exc)}") from exc
        if arch != host_arch():
            compiler = cross_compiler or f"{arch}-linux-gnu-gcc"
            if shutil.which(compiler) is None:
                raise ToolchainError(f"cross compiler {compiler} not found; install it (Debian: apt-get install gcc-{arch}-linux-gnu)")
            executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(compiler))
        else:
            executable.export_library(str(path))
        return CompiledArtifact(path, RUNTIME_TVM, role, arch, {"target": target_json})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
