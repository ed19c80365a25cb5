"""`splitc tune` and `splitc bench` (registered on the main group with `cli.add_command`).

    splitc tune model.pt2 --target x86 --budget 10m        # MetaSchedule into the tuning database
    splitc compile model.pt2 --targets x86 -o m.splitc      # applies every record that matches
    splitc bench m.splitc --partition 0 --model model.pt2   # compiled vs ONNX Runtime vs torch, this host
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from splitc.cli_common import _import, _model_options, console, err_console
from splitc.errors import InputError

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


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
@click.option("--cut", default="auto", show_default=True, help="As for compile: 'auto' or one node per boundary.")
@click.option("--link", default="4g", show_default=True, help="Link for --cut auto.")
@click.option("--budget", help="Wall-clock budget for tuning: 10m, 90s, 1h. Ctrl-C stops early and keeps finished records.")
@click.option("--trials", type=click.IntRange(1), help="Trial budget (MetaSchedule measurements), alone or with --budget.")
@click.option("--trials-per-task", default=64, show_default=True, type=click.IntRange(1))
@click.option("--no-prepack", is_flag=True, help="Tune without weight pre-packing (cpu_weight_prepack).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache root (default $SPLITC_CACHE or ~/.cache/splitc).")
@_model_options
def tune(source, targets, cut, link, budget, trials, trials_per_task, no_prepack, cache_dir, input_shapes, example_input, trust_pickle):
    """Tune SOURCE's TVM partitions for TARGET with MetaSchedule on this host; records go to a
    tuning database that every later compile reuses."""
    from splitc.backends import tuning
    from splitc.backends.base import get_backend
    from splitc.compiler import plan_cuts
    from splitc.passes.partition import assign_tiers, extract_partitions
    from splitc.runtime.executors import host_arch
    from splitc.targets import load_link, load_targets

    if not budget and not trials:
        raise InputError("give a tuning budget: --budget 10m (wall clock) and/or --trials N")
    seconds = parse_budget(budget) if budget else None
    chain = load_targets(targets)
    _, graph = _import(source, input_shapes, example_input, trust_pickle)
    analysis, cuts, _ = plan_cuts(graph, chain, cut, load_link(link))
    assign_tiers(analysis, cuts)
    partitions = extract_partitions(graph, analysis, chain)
    tunable = []
    for p in partitions:
        if p.target.backend != "tvm":
            console.print(f"[dim]partition {p.index} ({p.target.name}): {p.target.backend} backend, nothing to tune[/dim]")
        elif p.target.arch != host_arch():
            console.print(f"[yellow]partition {p.index} ({p.target.name}): {p.target.arch} target; tuning measures on this "
                          f"{host_arch()} host and on-device tuning (RPC) is not supported yet: skipped[/yellow]")
        elif not p.nodes:
            console.print(f"[dim]partition {p.index} ({p.target.name}): empty[/dim]")
        else:
            tunable.append(p)
    if not tunable:
        raise InputError(f"no partition of {source} over {targets} is a TVM partition for this host's ISA ({host_arch()}); nothing to tune")
    total_flops = sum(max(p.flops, 1) for p in tunable)
    interrupted = False
    for p in tunable:
        share = max(p.flops, 1) / total_flops
        from tvm.relax.frontend.torch import from_exported_program

        get_backend(p.target)  # the backend exists (and TVM imports)
        mod = from_exported_program(p.export(), keep_params_as_input=False)
        target_json = dict(p.target.backend_options.get("target") or {"kind": "llvm", "mtriple": f"{host_arch()}-linux-gnu"})
        report = tuning.tune_module(
            mod, target_json, seconds=None if seconds is None else seconds * share,
            trials=None if trials is None else max(1, int(trials * share)), trials_per_task=trials_per_task,
            prepack=not no_prepack, cache_dir=Path(cache_dir) if cache_dir else None,
            log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
        cov = report.coverage
        console.print(
            f"partition {p.index} ({p.target.name}): {report.tasks} task(s), {report.new_records} new record(s) in "
            f"{report.seconds:.0f} s ({report.stopped}); {cov.with_record if cov else '?'}/{report.tasks} tasks now have a record; "
            f"database {report.directory} ({report.records_after} records)")
        if report.dropped_lines:
            console.print(f"[yellow]dropped {report.dropped_lines} incomplete database line(s) left by a stopped run[/yellow]")
        if report.stopped == "interrupted":
            interrupted = True
            break
    if interrupted:
        console.print("tuning interrupted; finished records are kept. Run the same command again to continue.")
        sys.exit(130)
    console.print("next: `splitc compile` applies these records (it prints how many tasks had one)")


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--partition", "-p", "index", default=0, show_default=True, type=int, help="Partition index to time.")
@click.option("--model", type=click.Path(dir_okay=False), help="The model the bundle was compiled from (.pt2), for the ORT and torch baselines.")
@click.option("--threads", type=click.IntRange(1), help="Threads for every runtime (default: the TVM target's num-cores, else this host's CPUs).")
@click.option("--repeats", default=30, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON ('-' for stdout).")
def bench(bundle, index, model, threads, repeats, json_path):
    """Time partition K of BUNDLE on this host beside ONNX Runtime and PyTorch eager running the
    same partition on the same input; print ratios."""
    from splitc.bench import bench_partition

    report = bench_partition(bundle, index, model=model, threads=threads, repeats=repeats,
                             log=lambda m: err_console.print(f"[dim]{escape(m)}[/dim]"))
    out = err_console if json_path == "-" else console
    table = Table(title=f"bench {bundle} partition {index} ({report.target}) on this host: {report.host}, {report.threads} thread(s)")
    for column in ("runtime", "source", "median ms", "p10", "p90", "n", "x compiled", "rel err", "note"):
        table.add_column(column)
    base = report.rows[0].timing
    for row in report.rows:
        t = row.timing
        table.add_row(row.runtime, row.source, f"{t.median_ms:.3f}" if t else "-", f"{t.p10_ms:.3f}" if t else "-",
                      f"{t.p90_ms:.3f}" if t else "-", str(t.repeats) if t else "-",
                      f"{t.median_ms / base.median_ms:.2f}" if t else "-", "-" if row.rel_err is None else f"{row.rel_err:.1e}",
                      escape(row.note))
    out.print(table)
    for name, ratio in report.ratios().items():
        faster = "compiled is faster" if ratio > 1 else "compiled is slower"
        out.print(f"{name} / compiled = {ratio:.2f} ({faster})")
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    if json_path == "-":
        click.echo(json.dumps(report.to_json(), indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
