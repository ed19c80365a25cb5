"""Apache TVM backend: Relax import from torch.export, build for the target's LLVM triple.

A target whose ISA differs from the build host (rpi4: aarch64) is cross-compiled with the target's
cross compiler, and the same partition is also built for the host ISA (the "host twin") so checks
can run here when the artifact itself cannot be executed or emulated.

Tuning (backends/tuning.py): when the tuning database of the deploy target holds records for some of
the partition's TIR functions, the deploy build applies them (with weight pre-packing if the records
were tuned that way). On a target this host can run, both the tuned and the untuned build are timed
here and the faster one is kept; a cross target gets the tuned build unmeasured. The artifact's
options say how many tasks had a record and what was chosen. `SPLITC_TUNING=0` skips the database.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

from splitc.backends import tuning
from splitc.backends.base import CompiledArtifact, CompiledPartition, op_name
from splitc.passes.partition import Partition
from splitc.runtime.executors import host_arch
from splitc.runtime.manifest import ROLE_DEPLOY, ROLE_HOST_TWIN, RUNTIME_TVM
from torch import fx

from splitc.errors import BackendError, ToolchainError, first_line

_HOST_TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}


@functools.cache
def _convert_map_keys() -> frozenset[str]:
    from tvm.relax.frontend.torch.exported_program_translator import (
        ExportedProgramImporter,
    )

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
            raise BackendError(f"TVM could not import partition {partition.index} for {target.name}: {first_line(exc)}") from exc

        workdir.mkdir(parents=True, exist_ok=True)
        target_json = tuning.resolve_target(target_json)
        deploy_mod, tuning_info, notes = self._tuned(mod, target_json, target.arch, partition)
        deploy = self._build(deploy_mod, target_json, target.arch, options.get("cross_compiler"), workdir / f"model.{target.arch}.so", ROLE_DEPLOY)
        deploy.options["tuning"] = tuning_info
        artifacts = [deploy]
        if target.arch != host_arch():
            twin = {"kind": "llvm", "mtriple": _HOST_TRIPLES.get(host_arch(), f"{host_arch()}-linux-gnu")}
            artifacts.append(self._build(mod, twin, host_arch(), None, workdir / f"model.{host_arch()}.so", ROLE_HOST_TWIN))
        return CompiledPartition(artifacts, notes=notes)

    def _tuned(self, mod, target_json: dict, arch: str, partition: Partition):
        """The module to build for the deploy target, the tuning summary for its options, notes."""

        directory = tuning.database_dir(target_json)
        info: dict[str, Any] = {"database": tuning.target_key(target_json), "tasks": None, "tasks_with_record": 0, "chosen": "untuned"}
        if os.environ.get("SPLITC_TUNING", "1") == "0":
            info["chosen"] = "untuned (SPLITC_TUNING=0)"
            return mod, info, []
        try:
            prepared, cov = tuning.best_variant(mod, target_json, directory)
        except Exception as exc:
            raise BackendError(f"TVM could not prepare partition {partition.index} for tuning records: {first_line(exc)}") from exc
        info.update(tasks=cov.tasks, tasks_with_record=cov.with_record, prepack=cov.prepack)
        where = f"partition {partition.index} ({partition.target.name})"
        if cov.with_record == 0:
            hint = "run `splitc tune` to tune" if arch == host_arch() else f"tuning for {arch} needs the device, not supported yet"
            return mod, info, [f"{where}: 0/{cov.tasks} TVM tasks had a tuning record; built untuned ({hint})"]
        tuned = tuning.apply_database(prepared, target_json, directory, cov.prepack)
        if arch != host_arch():
            info["chosen"] = "tuned (not measured: cross target)"
            return tuned, info, [f"{where}: {cov.with_record}/{cov.tasks} TVM tasks had a tuning record; applied them (cross target, not timed here)"]
        timings = {}
        for name, candidate in (("tuned", tuned), ("untuned", mod)):
            timings[name] = _time_module(candidate, target_json, partition)
        chosen = min(timings, key=timings.get)
        info.update(chosen=chosen, tuned_ms=round(timings["tuned"], 4), untuned_ms=round(timings["untuned"], 4))
        note = (f"{where}: {cov.with_record}/{cov.tasks} TVM tasks had a tuning record; "
                f"tuned {timings['tuned']:.3f} ms vs untuned {timings['untuned']:.3f} ms on this host, kept {chosen}")
        return (tuned if chosen == "tuned" else mod), info, [note]

    def _build(self, mod, target_json: dict, arch: str, cross_compiler: str | None, path: Path, role: str) -> CompiledArtifact:
        import tvm

        try:
            executable = tvm.compile(mod, target=tvm.target.Target(target_json))
        except Exception as exc:
            raise BackendError(f"TVM failed to build for {target_json}: {first_line(exc)}") from exc
        if arch != host_arch():
            compiler = cross_compiler or f"{arch}-linux-gnu-gcc"
            if shutil.which(compiler) is None:
                raise ToolchainError(f"cross compiler {compiler} not found; install it (Debian: apt-get install gcc-{arch}-linux-gnu)")
            executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(compiler))
        else:
            executable.export_library(str(path))
        return CompiledArtifact(path, RUNTIME_TVM, role, arch, {"target": target_json})


def _time_module(mod, target_json: dict, partition: Partition) -> float:
    """Median ms of one call of `mod` built for `target_json`, on this host, on seeded inputs."""
    import numpy as np
    import tvm
    from tvm import relax

    from splitc.timing import time_callable

    try:
        executable = tvm.compile(mod, target=tvm.target.Target(target_json))
    except Exception as exc:
        raise BackendError(f"TVM failed to build partition {partition.index} with its tuning records: {first_line(exc)}") from exc
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(t.shape).astype(t.dtype) if np.dtype(t.dtype).kind == "f"
                               else np.zeros(t.shape, dtype=t.dtype)) for t in partition.inputs]
    main = vm["main"]
    return time_callable(lambda: main(*args), warmup=2, repeats=10, min_seconds=0.2, max_seconds=5.0).median_ms
