"""`splitc compile --variants K`: what the compile command runs instead when K is given, with the
same CompileOptions it built."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from splitc.cli.common import console, mb
from splitc.core.errors import InputError


def check_variant_request(k, *, targets, plan_path, cut, exits) -> None:
    """Refuse what --variants cannot take, before the model is exported."""
    from splitc.drivers.variants import check_count

    check_count(k)
    if plan_path:
        raise InputError("--variants chooses its own placements; drop --plan (or drop --variants)")
    if cut not in (None, "auto"):
        raise InputError("--variants chooses the cuts itself; drop --cut")
    if not targets:
        raise InputError("compile --variants needs --targets (e.g. rpi4,a100)")
    if exits:
        # Exit heads sit at cuts, and device-only and cloud-only variants have none.
        raise InputError("--variants does not take --exits yet; compile the variants without exit heads, or drop --variants")


def compile_variants_command(graph, options, data, k: int, out: Path, log) -> None:
    """Compile and print K variants with the compile command's own options (every one of them)."""
    from splitc.drivers.variants import compile_variants, describe

    link_obj = options.link
    choice, results = compile_variants(graph, options, out, k, data=data, log=log)
    table = Table(title=f"{out} — {len(results)} variant(s) of {graph.name}; the runtime starts with v{choice.default} (best on {link_obj.name})")
    for column in ("variant", "placement", "cuts after", "sends", "planned ms on " + link_obj.name, "best on"):
        table.add_column(column)
    for i, (plan, result) in enumerate(zip(choice.plans, results)):
        wins = choice.wins[i]
        parts = " → ".join(f"{p.target}" for p in result.manifest.partitions)
        sent = plan.transfers[0]["bytes"] if plan.transfers else 0
        on_link = choice.latency[i][choice.links.index(link_obj)] if link_obj in choice.links else float("nan")
        table.add_row(f"v{i}", parts, ", ".join(result.manifest.plan["cuts"][j]["after"] for j in range(len(result.manifest.plan["cuts"]))) or "-",
                      mb(sent) if sent else "nothing", f"{on_link:.2f}",
                      f"{wins['share']:.0%} of links" + (f" ({', '.join(wins['links'])})" if wins["links"] else ""))
    console.print(table)
    for line in describe(choice)[len(choice.plans):]:
        console.print(line)
    notes = sorted({n for r in results for n in r.notes})
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(f"wrote {out} ({len(results)} bundles + variants.json)")
