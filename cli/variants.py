"""`splitc compile --variants K`: the option and what it runs (registered on `compile` by
cli/__init__.py with the `variants_option` decorator, so the compile command itself is unchanged
when the option is absent)."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from splitc.cli.common import _import, _mb, console
from splitc.core.errors import InputError


def variants_option(func):
    """Adds --variants K to a compile command; with it, the command compiles K variants instead."""

    @functools.wraps(func)
    def wrapper(*args, variant_count=None, **kwargs):
        if variant_count is None:
            return func(*args, **kwargs)
        return compile_variants_command(variant_count, **kwargs)

    return click.option(
        "--variants", "variant_count", type=int, metavar="K",
        help="Compile the K placements that win across link conditions (device-only and cloud-only included) "
             "into one directory, for the adaptive runtime (`splitc run --remote` switches between them).")(wrapper)


def compile_variants_command(k, *, source, targets, plan_path=None, cut="auto", link="4g", output=None, samples=4,
                             quantize="none", noise=None, max_leakage=None, calib=None, exits=None, max_accuracy_drop=1.0,
                             input_shapes=(), example_input=None, trust_pickle=False, **_ignored):
    from splitc.targets import load_link, load_targets
    from splitc.drivers.variants import check_count, compile_variants, describe

    check_count(k)  # before the seconds an export takes
    if plan_path:
        raise InputError("--variants chooses its own placements; drop --plan (or drop --variants)")
    if cut not in (None, "auto"):
        raise InputError("--variants chooses the cuts itself; drop --cut")
    if not targets:
        raise InputError("compile --variants needs --targets (e.g. rpi4,a100)")
    if exits:
        # Exit heads sit at cuts, and device-only and cloud-only variants have none.
        raise InputError("--variants does not take --exits yet; compile the variants without exit heads, or drop --variants")
    target_list = load_targets(targets)
    link_obj = load_link(link)
    loaded, graph = _import(source, input_shapes, example_input, trust_pickle)
    options = {}
    if calib:
        from splitc.cli import _calibration_samples

        calibration, labels = _calibration_samples(calib, graph)
        options.update(calibration=calibration, labels=labels)
    if noise == "auto":
        options.update(max_leakage=max_leakage)
    out = Path(output or f"{graph.name}.variants")
    choice, results = compile_variants(graph, target_list, out, k, link=link_obj, samples=samples, examples=loaded.example_inputs,
                                       quantize=quantize, noise=noise, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"),
                                       **options)
    table = Table(title=f"{out} — {len(results)} variant(s) of {graph.name}; the runtime starts with v{choice.default} (best on {link_obj.name})")
    for column in ("variant", "placement", "cuts after", "sends", "planned ms on " + link_obj.name, "best on"):
        table.add_column(column)
    for i, (plan, result) in enumerate(zip(choice.plans, results)):
        wins = choice.wins[i]
        parts = " → ".join(f"{p.target}" for p in result.manifest.partitions)
        sent = plan.transfers[0]["bytes"] if plan.transfers else 0
        on_link = choice.latency[i][choice.links.index(link_obj)] if link_obj in choice.links else float("nan")
        table.add_row(f"v{i}", parts, ", ".join(result.manifest.plan["cuts"][j]["after"] for j in range(len(result.manifest.plan["cuts"]))) or "-",
                      _mb(sent) if sent else "nothing", f"{on_link:.2f}",
                      f"{wins['share']:.0%} of links" + (f" ({', '.join(wins['links'])})" if wins["links"] else ""))
    console.print(table)
    for line in describe(choice)[len(choice.plans):]:
        console.print(line)
    notes = sorted({n for r in results for n in r.notes})
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(f"wrote {out} ({len(results)} bundles + variants.json)")
