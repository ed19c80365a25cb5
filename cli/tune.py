"""`splitc tune` and `splitc bench` (registered on the main group with `cli.add_command`).

    splitc tune model.pt2 --target x86 --budget 10m        # MetaSchedule into the tuning database
    splitc tune model.pt2 --target rpi4 --rpc pi:9090 --budget 30m   # measured on the device over TVM RPC
    splitc tune model.pt2 --target rpi4 --from-host --budget 10m     # tuned here, applied to the aarch64 build (labelled)
    splitc compile model.pt2 --targets x86 -o m.splitc      # applies every record that matches
    splitc bench m.splitc --partition 0 --model model.pt2   # compiled vs ONNX Runtime vs torch, this host
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from splitc.cli.common import console, cut_option, err_console, import_source, json_flag_option, json_report_option, link_option, model_options
from splitc.core.errors import InputError

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_CACHE_DIR = click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache root (default $SPLITC_CACHE or ~/.cache/splitc).")


def parse_budget(text: str) -> float:
    """'10m', '90s', '1h', '1.5m' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--budget {text!r} is not a duration; write e.g. 10m, 90s or 1h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@click.command()
@click.argument("source")
@click.option("--target", "--targets", "-t", "targets", required=True,
              help="Target, or the chain the bundle will use (rpi4,a100): tunes the TVM partitions of that plan.")
@cut_option("As for compile: 'auto' or one node per boundary.")
@link_option()
@click.option("--budget", help="Wall-clock budget for tuning: 10m, 90s, 1h. Ctrl-C stops early and keeps finished records.")
@click.option("--trials", type=click.IntRange(1), help="Trial budget (MetaSchedule measurements), alone or with --budget.")
@click.option("--trials-per-task", default=256, show_default=True, type=click.IntRange(1))
@click.option("--no-prepack", is_flag=True, help="Tune without weight pre-packing (cpu_weight_prepack).")
@click.option("--rpc", help="HOST:PORT of `python -m tvm.exec.rpc_server` on the device: measure candidates there (tuning for its ISA).")
@click.option("--rpc-key", help="With --rpc: HOST:PORT is an RPC tracker; request a device registered with this key.")
@click.option("--from-host", is_flag=True,
              help="For a target of another ISA (rpi4): apply schedules tuned on this host (tuning here first with --budget/--trials), "
                   "labelled host-tuned: vector width differs and no timing is the device's.")
@click.option("--no-build", is_flag=True,
              help="Skip the closing build of each partition tuned here (its latency with the records, kept for the next compile).")
@_CACHE_DIR
@model_options
def tune(source, targets, cut, link, budget, trials, trials_per_task, no_prepack, rpc, rpc_key, from_host, no_build, cache_dir,
         input_shapes, example_input, trust_pickle):
    """Tune SOURCE's TVM partitions for TARGET with MetaSchedule, on this host or on the device
    (--rpc); records go to a tuning database that every later compile reuses."""
    from splitc.backends.registry import get_backend, target_backend
    from splitc.backends.tvm.database import database_dir
    from splitc.backends.tvm.driver import tune_module
    from splitc.backends.tvm.host_records import transfer_host_records
    from splitc.backends.tvm.rpc import parse_rpc
    from splitc.backends.tvm.target_keys import host_target_json
    from splitc.drivers.compiler import plan_partitions
    from splitc.runtime.executors import host_arch
    from splitc.targets import load_link, load_targets

    if rpc and from_host:
        raise InputError("--rpc tunes on the device and --from-host applies schedules tuned on this host: give one of them")
    if rpc_key and not rpc:
        raise InputError("--rpc-key needs --rpc HOST:PORT of the tracker")
    if not budget and not trials and not from_host:
        raise InputError("give a tuning budget: --budget 10m (wall clock) and/or --trials N")
    seconds = parse_budget(budget) if budget else None
    endpoint = parse_rpc(rpc, rpc_key) if rpc else None
    chain = load_targets(targets)
    _, graph = import_source(source, input_shapes, example_input, trust_pickle)
    partitions = plan_partitions(graph, chain, cut, load_link(link))
    jobs = []  # (partition, how): "here", "rpc" or "from-host"
    # --rpc names one device: it tunes the partitions of another ISA, or, when every TVM partition is
    # of this host's ISA, those (a remote machine like this one).
    tunable = {p.index: target_backend(p.target).tunable for p in partitions}
    foreign = any(tunable[p.index] and p.nodes and p.target.arch != host_arch() for p in partitions)
    for p in partitions:
        if not tunable[p.index]:
            console.print(f"[dim]partition {p.index} ({p.target.name}): {p.target.backend} backend, nothing to tune[/dim]")
        elif not p.nodes:
            console.print(f"[dim]partition {p.index} ({p.target.name}): empty[/dim]")
        elif endpoint is not None and (p.target.arch != host_arch() or not foreign):
            jobs.append((p, "rpc"))
        elif p.target.arch != host_arch():
            if from_host:
                jobs.append((p, "from-host"))
            else:
                console.print(f"[yellow]partition {p.index} ({p.target.name}): {p.target.arch} target and this host is {host_arch()}: "
                              "skipped. Tune on the device with --rpc HOST:PORT, or apply schedules tuned on this host "
                              "with --from-host (labelled host-tuned)[/yellow]")
        elif not budget and not trials:
            console.print(f"[dim]partition {p.index} ({p.target.name}): this host's ISA; --from-host alone does not tune it "
                          "(give --budget or --trials)[/dim]")
        else:
            jobs.append((p, "here"))
    if not jobs:
        raise InputError(f"no partition of {source} over {targets} can be tuned this way; see the lines above")
    total_flops = sum(max(p.flops, 1) for p, _ in jobs)
    interrupted = False
    log = lambda m: console.print(f"[dim]{escape(m)}[/dim]")
    cache = Path(cache_dir) if cache_dir else None
    for p, how in jobs:
        share = max(p.flops, 1) / total_flops
        from tvm.relax.frontend.torch import from_exported_program

        get_backend(p.target)  # the backend exists (and TVM imports)
        mod = from_exported_program(p.export(), keep_params_as_input=False)
        target_json = dict(p.target.backend_options.get("target") or {"kind": "llvm", "mtriple": f"{host_arch()}-linux-gnu"})
        report = None
        if budget or trials:
            tune_json = host_target_json() if how == "from-host" else target_json
            if how == "from-host":
                console.print(f"partition {p.index} ({p.target.name}): tuning on this {host_arch()} host for its own target first; "
                              f"the schedules then go to {p.target.name} labelled host-tuned")
            with _progress_bar(f"partition {p.index} ({p.target.name})") as progress:
                report = tune_module(
                    mod, tune_json, seconds=None if seconds is None else seconds * share,
                    trials=None if trials is None else max(1, int(trials * share)), trials_per_task=trials_per_task,
                    prepack=not no_prepack, rpc=endpoint if how == "rpc" else None,
                    cross_compiler=p.target.backend_options.get("cross_compiler"), cache_dir=cache, log=log, progress=progress)
            cov = report.coverage
            console.print(
                f"partition {p.index} ({p.target.name}): {report.tasks} task(s), {report.new_records} new record(s) in "
                f"{report.seconds:.0f} s ({report.stopped}), measured on {report.measured_on}; "
                f"{cov.with_record if cov else '?'}/{report.tasks} tasks now have a record"
                f"{f' ({cov.untuned_best} fastest untuned)' if cov and cov.untuned_best else ''}; "
                f"database {report.directory} ({report.records_after} records)")
            if report.dropped_lines:
                console.print(f"[yellow]dropped {report.dropped_lines} incomplete database line(s) left by a stopped run[/yellow]")
        if how == "from-host" and not (report and report.stopped == "interrupted"):
            moved = transfer_host_records(mod, target_json, prepack=not no_prepack, cache_dir=cache)
            console.print(
                f"partition {p.index} ({p.target.name}): {moved.label}: {moved.applied + moved.already}/{moved.tasks} task(s) have a "
                f"host-tuned schedule ({moved.applied} new); {moved.failed} did not apply or build for {p.target.arch} (skipped), "
                f"{moved.untuned_best} stay untuned (faster untuned on this host), {moved.missing} have no record on this host; "
                f"database {moved.directory}")
            for line in moved.errors[:5]:
                console.print(f"[dim]  skipped {escape(line)}[/dim]")
            console.print(f"[yellow]host-tuned: these schedules were chosen by timings on this {host_arch()} host, whose vector width "
                          f"differs from {p.target.name}'s; no timing of them on the device exists. Compile applies them and labels the "
                          "artifact so.[/yellow]")
        if report is not None and report.stopped == "interrupted":
            interrupted = True
            break
        if how == "here" and report is not None and not no_build:
            if database_dir(target_json, cache) == database_dir(target_json):
                build_tuned(p)
            else:
                console.print(f"[dim]partition {p.index} ({p.target.name}): not built: --cache-dir is not the cache "
                              "`splitc compile` reads ($SPLITC_CACHE or ~/.cache/splitc)[/dim]")
    if interrupted:
        console.print("tuning interrupted; finished records are kept. Run the same command again to continue.")
        sys.exit(130)
    console.print("next: `splitc compile` applies these records (it prints how many tasks had one)")


def build_tuned(partition) -> None:
    """Build `partition` with its records as `splitc compile` does (the same backend call), in a
    scratch directory, and say how fast it runs here. The library and its kernels' objects stay in
    the build cache: the next compile of this model for this target copies the library instead of
    running LLVM on the tuned kernels (ResNet-18: 0.8x an untuned compile, 1.8x without it)."""
    import tempfile
    import time

    from splitc.backends.tvm import build_cache
    from splitc.backends.registry import get_backend
    from splitc.core.errors import SplitcError

    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="splitc-tuned-build-") as scratch:
            compiled = get_backend(partition.target).compile(partition, Path(scratch))
    except SplitcError as exc:  # the records are kept; compile would stop at the same place
        console.print(f"[yellow]partition {partition.index} ({partition.target.name}): the build with these records failed "
                      f"({escape(str(exc))}); `splitc compile` will fail the same way[/yellow]")
        return
    info = compiled.artifacts[0].options.get("tuning", {})
    line = (f"partition {partition.index} ({partition.target.name}): built with {info.get('tasks_with_record', 0)}/"
            f"{info.get('tasks', '?')} tasks' records in {time.perf_counter() - start:.1f} s")
    timed = [f"{name} {info[name + '_ms']:.3f} ms" for name in ("tuned", "untuned") if name + "_ms" in info]
    if timed:
        line += f"; one run on this host: {', '.join(timed)} (kept {info.get('chosen')})"
    console.print(line + ("; kept in the build cache for `splitc compile`" if build_cache.enabled() else " (build cache off)"))


@contextlib.contextmanager
def _progress_bar(label: str):
    """A rich progress bar over the tuning budget (time or trials, whichever ends the run first)
    with the records measured so far; yields the callback for tune_module."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[measured]} measured"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"tuning {label}", total=1.0, measured=0)
        yield lambda state: bar.update(task, completed=state.fraction, measured=state.measured)


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--partition", "-p", "index", default=0, show_default=True, type=int, help="Partition index to time.")
@click.option("--model", type=click.Path(dir_okay=False), help="The model the bundle was compiled from (.pt2), for the ORT and torch baselines.")
@click.option("--threads", type=click.IntRange(1), help="Threads for every runtime (default: the TVM target's num-cores, else this host's CPUs).")
@click.option("--repeats", default=30, show_default=True, type=click.IntRange(1))
@json_report_option()
def bench(bundle, index, model, threads, repeats, json_path):
    """Time partition K of BUNDLE on this host beside ONNX Runtime and PyTorch eager running the
    same partition on the same input; print ratios."""
    from splitc.drivers.bench import bench_partition

    report = bench_partition(bundle, index, model=model, threads=threads, repeats=repeats,
                             log=lambda m: err_console.print(f"[dim]{escape(m)}[/dim]"))
    out = err_console if json_path == "-" else console
    table = Table(title=f"bench {bundle} partition {index} ({report.target}) on this host: {report.host}, {report.threads} thread(s)")
    for column in ("runtime", "source", "median ms", "p10", "p90", "n", "x compiled", "rel err", "note"):
        table.add_column(column)
    base = report.rows[0].timing
    for row in report.rows:
        t = row.timing
        table.add_row(f"{row.runtime} ✓" if row.chosen else row.runtime, escape(row.source), f"{t.median_ms:.3f}" if t else "-", f"{t.p10_ms:.3f}" if t else "-",
                      f"{t.p90_ms:.3f}" if t else "-", str(t.repeats) if t else "-",
                      f"{t.median_ms / base.median_ms:.2f}" if t else "-", "-" if row.rel_err is None else f"{row.rel_err:.1e}",
                      escape(row.note))
    out.print(table)
    for name, ratio in report.ratios().items():
        faster = "compiled is faster" if ratio > 1 else "compiled is slower"
        out.print(f"{name} / compiled = {ratio:.2f} ({faster})")
    out.print("✓ = the backend compile chose for this partition (what the bundle ships)")
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    if json_path == "-":
        click.echo(json.dumps(report.to_json(), indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")


@click.group("tuning")
def tuning_group():
    """The tuning databases in the cache: list them, export them to an archive, import one
    (records tuned on one machine serve every machine with the same target key)."""


@tuning_group.command("list")
@_CACHE_DIR
@json_flag_option("Print the list as JSON.")
def tuning_list(cache_dir, as_json):
    """The tuning databases in the cache: target key, where measured, workloads, records."""
    from splitc.backends.tvm.database import tuning_root
    from splitc.backends.tvm.records_io import list_databases

    cache = Path(cache_dir) if cache_dir else None
    found = list_databases(cache)
    if as_json:
        click.echo(json.dumps([info.to_json() for info in found], indent=2))
        return
    if not found:
        console.print(f"no tuning database in {tuning_root(cache)}")
        return
    table = Table(title=f"tuning databases in {tuning_root(cache)}")
    for column in ("key", "measured", "workloads", "records"):
        table.add_column(column)
    for info in found:
        table.add_row(info.key, escape(_origin_words(info.origin)), str(info.workloads), str(info.records))
    console.print(table)


def _origin_words(origin: dict) -> str:
    """Where the records were measured; the machine's name when the origin records it."""
    where = str(origin.get("measured_on") or "unknown origin")
    return where.replace("this host", f"host {origin['host']}") if origin.get("host") else where


@tuning_group.command("export")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Archive to write (.tar.gz).")
@click.option("--key", "keys", multiple=True, help="Export only this database (a key from `splitc tuning list`); repeatable.")
@click.option("--all-records", is_flag=True, help="Every measured record, not only each workload's fastest (for resuming a search elsewhere).")
@_CACHE_DIR
def tuning_export(output, keys, all_records, cache_dir):
    """Write the cache's tuning databases to an archive another machine can import."""
    from splitc.backends.tvm.records_io import export_databases

    exported = export_databases(Path(output), list(keys) or None, Path(cache_dir) if cache_dir else None,
                                best=None if all_records else 1)
    for info in exported:
        console.print(f"{info.key}: {info.workloads} workload(s), {info.records} record(s) ({escape(_origin_words(info.origin))})")
    console.print(f"wrote {output}; on another machine: `splitc tuning import {output}`")


@tuning_group.command("import")
@click.argument("archive", type=click.Path(dir_okay=False))
@_CACHE_DIR
def tuning_import(archive, cache_dir):
    """Merge the databases of ARCHIVE (from `splitc tuning export`) into this cache."""
    from splitc.backends.tvm.records_io import import_databases

    for result in import_databases(Path(archive), Path(cache_dir) if cache_dir else None):
        console.print(f"{result.key}: {result.new_records} new record(s), {result.known_records} already here, "
                      f"{result.new_workloads} new workload(s) (measured: {escape(_origin_words(result.origin))})")
    console.print("next: `splitc compile` applies them where the target key matches (it prints how many tasks had a record)")
