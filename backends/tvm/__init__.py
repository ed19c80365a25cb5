"""Apache TVM backend: Relax import from torch.export, build for the target's LLVM triple.

A target whose ISA differs from the build host (rpi4: aarch64) is cross-compiled with the target's
cross compiler, and the same partition is also built for the host ISA (the "host twin") so checks
can run here when the artifact itself cannot be executed or emulated.

Tuning (backends/tvm/driver.py; records in database.py, chosen by coverage.py, applied by
apply_records.py): when the tuning database of the deploy target holds records for some of the
partition's TIR functions, the deploy build applies them (with weight pre-packing if the records
were tuned that way). Each task then runs its fastest measured code: a tuning run also records every
task's untuned code, so a task whose schedules all lost keeps its untuned code. On a target this host
can run, the tuned build is timed; when some task has no record at all, the untuned build is timed
too and the faster one kept. A cross target gets the tuned build unmeasured: its records come from
the device (tuned over RPC) or, labelled "host-tuned", from this host (`splitc tune --from-host`).
The artifact's options say how many tasks had a record, where the schedules came from ("schedules")
and what was chosen. `SPLITC_TUNING=0` skips the database.

Every build goes through the build cache (backends/tvm/build_cache.py): a module, target and TVM seen
before get their library copied back instead of rebuilt; the artifact's options say "hit" or "miss".
A library that is built is built on all of this host's cores (backends/tvm/build.py), linking the
kept object of every group of kernels built before (other weights, same kernels): the options'
"kernel_objects" says how many.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

from splitc.backends.tvm import apply_records, build_cache, coverage, database, target_keys
from splitc.backends.base import CompiledArtifact, CompiledPartition, op_name
from splitc.backends.export import export_partition
from splitc.passes.dynamic import FIXED_DIMS
from splitc.backends.tvm.build import UNROLLED_STATEMENTS, build_library, cap_unrolling_in, codegen_target
from splitc.passes.partition import Partition
from splitc.runtime.executors import available_cpus, host_arch, target_threads, use_tvm_threads
from splitc.core.manifest import ROLE_DEPLOY, ROLE_HOST_TWIN, RUNTIME_TVM
from torch import fx

from splitc.core.errors import BackendError, ToolchainError, first_line

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
        exported = export_partition(partition, self.id)
        try:
            mod = from_exported_program(exported.program, keep_params_as_input=False)
        except Exception as exc:
            if not partition.dynamic_symbols or exported.fixed:
                raise BackendError(f"TVM could not import partition {partition.index} for {target.name}: {first_line(exc)}") from exc
            # Relax keeps symbolic shapes, but an op whose converter needs static ones refuses them.
            exported = export_partition(partition, self.id, dynamic=False, why_static=f"TVM's importer refused them ({first_line(exc, 160)})")
            try:
                mod = from_exported_program(exported.program, keep_params_as_input=False)
            except Exception as exc:
                raise BackendError(f"TVM could not import partition {partition.index} for {target.name}: {first_line(exc)}") from exc

        workdir.mkdir(parents=True, exist_ok=True)
        target_json = target_keys.resolve_target(target_json)
        path = workdir / f"model.{target.arch}.so"
        candidates, info, notes = self._tuned(mod, target_json, target.arch, partition)
        if target.arch != host_arch() or len(candidates) == 1 and candidates[0][0] == "untuned":
            deploy = self._build(candidates[0][1], target_json, target.arch, options.get("cross_compiler"), path, ROLE_DEPLOY)
        else:
            deploy, timings = self._build_fastest(candidates, target_json, path, partition)
            info.update({f"{name}_ms": round(ms, 4) for name, ms in timings.items()})
            chosen = min(timings, key=timings.get)
            info["chosen"] = chosen
            if chosen == "untuned":
                info["schedules"] = "untuned"
            if len(timings) == 1:
                notes = [f"{notes[0]}; {timings['tuned']:.3f} ms on this host"]
            else:
                notes = [f"{notes[0]}; tuned {timings['tuned']:.3f} ms vs untuned {timings['untuned']:.3f} ms on this host, kept {chosen}"]
        deploy.options["tuning"] = info
        if deploy.options.get("build_cache") == "hit":
            notes = [*notes, f"partition {partition.index} ({target.name}): library reused from the build cache "
                             "(same module, target and TVM; SPLITC_BUILD_CACHE=0 rebuilds)"]
        elif (objects := deploy.options.get("kernel_objects")) and objects["reused"]:
            notes = [*notes, f"partition {partition.index} ({target.name}): {objects['reused']} of {objects['groups']} kernel "
                             "groups linked from the build cache (same kernels, target and TVM; SPLITC_BUILD_CACHE=0 rebuilds)"]
        artifacts = [deploy]
        if target.arch != host_arch():
            twin = {"kind": "llvm", "mtriple": _HOST_TRIPLES.get(host_arch(), f"{host_arch()}-linux-gnu")}
            artifacts.append(self._build(mod, twin, host_arch(), None, workdir / f"model.{host_arch()}.so", ROLE_HOST_TWIN))
        for artifact in artifacts if exported.fixed else ():
            artifact.options[FIXED_DIMS] = exported.fixed
        return CompiledPartition(artifacts, notes=[*exported.notes, *notes])

    def _tuned(self, mod, target_json: dict, arch: str, partition: Partition):
        """The candidate modules for the deploy build, first preferred, as (name, module); the tuning
        summary for the artifact's options; notes."""
        directory, label = _schedule_database(target_json, arch)
        info: dict[str, Any] = {"database": directory.name, "tasks": None, "tasks_with_record": 0, "chosen": "untuned",
                                "schedules": "untuned"}
        if os.environ.get("SPLITC_TUNING", "1") == "0":
            info["chosen"] = "untuned (SPLITC_TUNING=0)"
            return [("untuned", mod)], info, []
        where = f"partition {partition.index} ({partition.target.name})"
        try:
            variant = coverage.best_variant(mod, target_json, directory)
        except Exception as exc:  # noqa: BLE001 - the untuned build does not need these passes: build it and say why
            info["chosen"] = "untuned (tuning passes failed)"
            return [("untuned", mod)], info, [f"{where}: could not prepare it for tuning records ({first_line(exc)}); built untuned"]
        cov = variant.coverage
        info.update(tasks=cov.tasks, tasks_with_record=cov.with_record, tasks_untuned_best=cov.untuned_best, prepack=cov.prepack,
                    winograd=cov.winograd)
        if cov.with_record == 0:
            if arch == host_arch():
                hint = "run `splitc tune` to tune"
            else:
                hint = (f"tune on the device with `splitc tune --target {partition.target.name} --rpc HOST:PORT`, or apply schedules "
                        f"tuned on this host with `splitc tune --target {partition.target.name} --from-host`")
            return [("untuned", mod)], info, [f"{where}: 0/{cov.tasks} TVM tasks had a tuning record; built untuned ({hint})"]
        try:
            tuned = apply_records.apply_database(variant.prepared, target_json, cov.prepack, variant.database)
        except Exception as exc:
            raise BackendError(f"TVM could not apply the tuning records to partition {partition.index}: {first_line(exc)}") from exc
        # Kernels whose records unroll them past UNROLLED_STATEMENTS are built (and were timed, when
        # tuned by this version) with less unrolling: the same speed in a model, a fraction of the build.
        tuned, capped = cap_unrolling_in(tuned)
        info["schedules"] = label
        have = f"{cov.with_record}/{cov.tasks} TVM tasks had a tuning record ({label})"
        if capped:
            info["unrolling_capped"] = capped
            have += (f"; {len(capped)} kernel(s) unrolled at most {max(capped.values())} steps to stay within "
                     f"{UNROLLED_STATEMENTS} statements")
        if arch != host_arch():
            info["chosen"] = "tuned (not measured: cross target)"
            return [("tuned", tuned)], info, [f"{where}: {have}; applied them (cross target: no timing of this build here or on the device)"]
        if cov.complete:
            # Every task runs its fastest measured code: tuned, or untuned where the untuned baseline
            # record won. The whole untuned module need not be built and timed as well.
            note = f"{where}: {have}; per task the fastest measured code ({cov.with_record - cov.untuned_best} tuned, {cov.untuned_best} untuned)"
            return [("tuned", tuned)], info, [note]
        # Tasks without any record run untuned code in the tuned build's layout: time both builds.
        return [("tuned", tuned), ("untuned", mod)], info, [f"{where}: {have}"]

    def _build_fastest(self, candidates, target_json: dict, path: Path, partition: Partition):
        """Build and export each candidate (this host's ISA), time each from its exported library,
        keep the fastest at `path`. Timing the exported library, rather than the freshly built
        executable, saves a second link of the same code (~1 s for ResNet-18)."""
        timings: dict[str, float] = {}
        files: dict[str, Path] = {}
        built: dict[str, CompiledArtifact] = {}
        for index, (name, module) in enumerate(candidates):
            files[name] = path if index == 0 else path.with_name(f".{name}.{path.name}")
            built[name] = self._build(module, target_json, host_arch(), None, files[name], ROLE_DEPLOY)
            timings[name] = _time_library(files[name], partition, target_json, choosing=len(candidates) > 1)
        chosen = min(timings, key=timings.get)
        if files[chosen] != path:
            os.replace(files[chosen], path)
        for file in files.values():
            if file != path and file.exists():
                file.unlink()
        return CompiledArtifact(path, RUNTIME_TVM, ROLE_DEPLOY, host_arch(), built[chosen].options), timings

    def _build(self, mod, target_json: dict, arch: str, cross_compiler: str | None, path: Path, role: str) -> CompiledArtifact:
        import tvm

        linker = None
        if arch != host_arch():
            linker = cross_compiler or f"{arch}-linux-gnu-gcc"
            if shutil.which(linker) is None:
                raise ToolchainError(f"cross compiler {linker} not found; install it (Debian: apt-get install gcc-{arch}-linux-gnu)")
        options: dict[str, Any] = {"target": target_json}
        built_for = codegen_target(target_json)  # the target plus the LLVM options of splitc's builds
        if built_for.get("cl-opt"):
            options["llvm_options"] = list(built_for["cl-opt"])
        key = build_cache.build_key(mod, built_for, linker) if build_cache.enabled() else None
        if key is not None and build_cache.fetch(key, path):
            options["build_cache"] = "hit"
            return CompiledArtifact(path, RUNTIME_TVM, role, arch, options)
        fcompile = tvm.support.cc.cross_compiler(linker) if linker is not None else None
        objects = build_cache.KernelObjects(built_for) if key is not None else None
        try:
            groups, reused = build_library(mod, built_for, path, workers=available_cpus(), fcompile=fcompile, objects=objects)
        except Exception as exc:
            raise BackendError(f"TVM failed to build for {target_json}: {first_line(exc)}") from exc
        if key is not None:
            build_cache.store(key, path)
            options["build_cache"] = "miss"
            options["kernel_objects"] = {"groups": groups, "reused": reused}
        return CompiledArtifact(path, RUNTIME_TVM, role, arch, options)


def _schedule_database(target_json: dict, arch: str) -> tuple[Path, str]:
    """The tuning database a build for `target_json` applies, and how its schedules were obtained.
    For this host's ISA: the target's own database (tuned here). For another ISA: the target's own
    database when it has records (tuned on the device over RPC), else the schedules tuned on this
    host and re-keyed for it by `splitc tune --from-host`, labelled as such."""
    own = database.database_dir(target_json)
    if arch == host_arch():
        return own, database.schedules_label(own, "tuned on this host")
    if database.database_stats(own)["records"]:
        return own, database.schedules_label(own, "tuned on the device over RPC")
    host_tuned = database.host_tuned_dir(target_json)
    if database.database_stats(host_tuned)["records"]:
        return host_tuned, database.schedules_label(host_tuned, "host-tuned (vector width differs; not timed on the device)")
    return own, "untuned"


def _time_library(path: Path, partition: Partition, target_json: dict, *, choosing: bool) -> float:
    """Median ms of one call of an exported library on this host, on seeded inputs, with the
    target's thread count. Fewer calls when the figure decides nothing (`choosing` False: it is
    only reported)."""
    import numpy as np
    import tvm
    from tvm import relax

    from splitc.core.timing import time_callable

    use_tvm_threads(target_threads(target_json) or available_cpus())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(t.shape).astype(t.dtype) if np.dtype(t.dtype).kind == "f"
                               else np.zeros(t.shape, dtype=t.dtype)) for t in partition.inputs]
    main = vm["main"]
    return time_callable(lambda: main(*args), warmup=1, repeats=5 if choosing else 3, min_seconds=0.1 if choosing else 0.02,
                         max_seconds=3.0).median_ms
