"""`splitc inspect`, `plan`, `profile` and `targets`: where to cut, and what each choice costs."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from splitc.cli.common import (LINK_HELP, calib_option, console, import_source, json_flag_option, link_option, mb, model_options,
                               targets_option)
from splitc.core.errors import InputError


@click.command()
@click.argument("source")
@targets_option("Also estimate per-cut latency for this two-tier chain, e.g. rpi4,a100.")
@link_option(f"Link for the estimate: {LINK_HELP}.")
@click.option("--limit", default=0, type=int, help="Show at most this many candidate cuts (0: all).")
@json_flag_option()
@model_options
def inspect(source, targets, link, limit, as_json, input_shapes, example_input, trust_pickle):
    """Summarise SOURCE's graph and list candidate cuts in order with the bytes that would cross."""
    from splitc.passes.cuts import CutAnalysis, estimate
    from splitc.targets import load_link, load_targets

    _, graph = import_source(source, input_shapes, example_input, trust_pickle)
    analysis = CutAnalysis(graph)
    candidates = analysis.candidates()
    chain = load_targets(targets) if targets else None
    link_obj = load_link(link)
    if chain is not None and len(chain) != 2:
        raise InputError("inspect --targets estimates one cut: give exactly two targets")
    rows = []
    for cut in candidates[: limit or None]:
        node = analysis.order[cut.position]
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        row = {"position": cut.position, "after": cut.after, "module": stack[-1][0] if stack else "",
               "tensors": len(cut.crossing), "bytes": cut.nbytes}
        if chain is not None:
            row["estimated_ms"] = round(estimate(analysis, [cut], chain, link_obj).total_ms, 3)
        rows.append(row)
    summary = {"model": graph.name, "nodes": len(graph.value_nodes()), "gflops": graph.total_flops / 1e9,
               "param_bytes": graph.param_bytes, "inputs": [t.to_json() for t in graph.inputs],
               "outputs": [t.to_json() for t in graph.outputs], "candidate_cuts": len(candidates)}
    if as_json:
        click.echo(json.dumps({**summary, "cuts": rows}, indent=2))
        return
    console.print(f"[bold]{graph.name}[/bold]: {summary['nodes']} nodes, {summary['gflops']:.3f} GFLOP, "
                  f"{mb(graph.param_bytes)} of parameters, {len(candidates)} candidate cuts")
    for t in graph.inputs:
        console.print(f"  input  {t.name}: {t.dtype}{list(t.shape)}")
    for t in graph.outputs:
        console.print(f"  output {t.name}: {t.dtype}{list(t.shape)}")
    table = Table(title="candidate cuts (in graph order)")
    columns = ["#", "after node", "module", "tensors", "bytes crossing"] + (["est. ms"] if chain else [])
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["position"]), row["after"], row["module"], str(row["tensors"]), mb(row["bytes"]),
                      *([f"{row['estimated_ms']:.2f}"] if chain else []))
    console.print(table)


@click.command()
@click.argument("source")
@targets_option("Tier chain, device first: rpi4,edge-server,a100.", required=True)
@link_option(f"Device uplink: {LINK_HELP}; several, comma-separated, give one front each; a link that changes as "
             "states joined by '+' (wifi+4g+3g+wifi: equal shares, wifi*2+3g: weighted), planned for over its states.")
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), help="With a '+' link: plan for this percentile of "
              "latency over its states (e.g. 95) instead of the mean.")
@click.option("--rate", default="10/s", show_default=True, help="Request rate: 50/s, 3000/min, 1e6/day.")
@click.option("--utilisation", default=0.7, show_default=True, type=click.FloatRange(0.05, 1.0), help="Target utilisation of a reserved VM replica.")
@click.option("--objective", type=click.Choice(["latency", "cost", "privacy", "energy"]), default="latency", show_default=True)
@click.option("--max-latency", help="Constraint, e.g. 120ms.")
@click.option("--max-cost", type=float, help="Constraint in USD per million requests.")
@click.option("--max-leakage", type=float, help="Constraint on leakage (distance correlation, 0..1); needs --calib.")
@click.option("--max-energy", type=float, help="Constraint on device joules per request.")
@calib_option("Calibration inputs (.npz) to measure leakage per cut.")
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), help="Measured profile from `splitc profile` (repeat per target).")
@click.option("--all-tiers", is_flag=True, help="Only plans that give every target some work.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Price transfers as if the tensors at each cut were quantized (compile with the same --quantize).")
@json_flag_option("Print the plan document as JSON (for `compile --plan`).")
@click.option("--png", type=click.Path(dir_okay=False), help="Write a PNG of the front(s).")
@model_options
def plan(source, targets, link, percentile, rate, utilisation, objective, max_latency, max_cost, max_leakage, max_energy, calib, profiles,
         all_tiers, quantize, as_json, png, input_shapes, example_input, trust_pickle):
    """Plan where to cut SOURCE over TARGETS: the Pareto front of latency, money, privacy, energy."""
    from splitc.passes.cost_model import compute_ms
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.money import Workload
    from splitc.passes.planner import Constraints, plan_placements
    from splitc.drivers.plan_file import parse_duration_ms, parse_rate, plan_document
    from splitc.targets import load_link, load_link_mix, load_targets

    chain = load_targets(targets)
    names = [name.strip() for name in link.split(",") if name.strip()]
    if percentile is not None and not any("+" in n for n in names):
        raise InputError("--percentile is taken over the states of a changing link: give --link as states joined by '+', e.g. wifi+4g+3g+wifi")
    links = [load_link_mix(n, percentile) if "+" in n else load_link(n) for n in names]
    workload = Workload(parse_rate(rate), utilisation)
    constraints = Constraints(parse_duration_ms(max_latency, "--max-latency") if max_latency else None, max_cost, max_leakage, max_energy)
    _, graph = import_source(source, input_shapes, example_input, trust_pickle)
    analysis = CutAnalysis(graph)
    times = [compute_ms(analysis.order, t) for t in chain]
    sources: dict = {"latency": {t.name: "analytic" for t in chain}, "leakage": None, "quantize": quantize}
    for path in profiles:
        from splitc.drivers.profile import Profile

        measured = Profile.load(path, model_sha256=graph.source_sha256)
        matches = [k for k, t in enumerate(chain) if t.name == measured.target]
        if not matches:
            raise InputError(f"profile {path} is for target {measured.target}, which is not in --targets {targets}")
        for k in matches:
            times[k] = measured.node_ms(analysis, chain[k])
            sources["latency"][chain[k].name] = f"measured ({measured.measured_on})"
    leakage = None
    if calib:
        from splitc.passes.privacy import leakage_profile, load_calibration

        with console.status("measuring leakage per cut on the calibration data"):
            leakage = leakage_profile(graph, analysis, load_calibration(calib, graph))
        sources["leakage"] = f"distance correlation on {calib}"
    fronts = [plan_placements(analysis, chain, l, workload, node_ms=times, leakage=leakage, objective=objective,
                              constraints=constraints, require_all_tiers=all_tiers,
                              quantize_bits={"int8": 8, "int4": 4}.get(quantize)) for l in links]
    document = plan_document(graph, [s.strip() for s in targets.split(",")], workload, constraints, fronts, sources)
    if png:
        from splitc.drivers.plot import plot_fronts

        plot_fronts(fronts, png)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    for front in fronts:
        _print_front(front, graph.name)
    if png:
        console.print(f"wrote {png}")


def _print_front(front, model_name: str) -> None:
    where = (f"{len(front.link.states)} link states" if getattr(front.link, "states", None)
             else f"{front.link.mbit_s:g} Mbit/s, {front.link.rtt_ms:g} ms")
    table = Table(title=f"{model_name} on {front.link.name} ({where}): "
                        f"{len(front.plans)} Pareto-optimal of {front.evaluated} plans, objective {front.objective}")
    states = getattr(front.link, "states", ())  # a LinkMix: one column per state
    aggregate = "mean" if not states or front.link.percentile is None else f"p{front.link.percentile:g}"
    for column in ("", "cuts after", "placement", f"latency ms ({aggregate})" if states else "latency ms",
                   *(f"{s.name} ms" for s in states), "$ / M req", "leakage", "device J", "remote tiers"):
        table.add_column(column)
    for i, p in enumerate(front.plans):
        remote = []
        for t in p.tiers:
            if t.pricing:
                remote.append(f"{t.target}: {'VM' if t.pricing == 'iaas' else 'serverless'}{_pricing_note(t)}")
        placement = " → ".join(f"{t.target}({t.nodes})" for t in p.tiers if t.nodes)
        table.add_row("★" if i == front.chosen else "", ", ".join(p.cuts), placement or "-", f"{p.latency_ms:.2f}",
                      *(f"{v:.2f}" for v in (p.state_latency_ms or ())), f"{p.cost_usd_per_million:.4g}", "-" if p.leakage is None else f"{p.leakage:.3f}",
                      "-" if p.energy_j is None else f"{p.energy_j:.4f}", "; ".join(remote) or "-")
    console.print(table)
    for warning in front.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _pricing_note(tier) -> str:
    if tier.faas_usd_per_million is None:
        return " (no serverless offer)"
    if tier.iaas_usd_per_million is None:
        return " (no VM offer)"
    if tier.indifference_rate_per_s is None:
        return ", serverless cheaper at any rate"
    return f", VM cheaper above {tier.indifference_rate_per_s:.3g} req/s"


@click.command()
@click.argument("source")
@click.option("--target", "-t", required=True, help="Target to measure (a name or .toml path).")
@click.option("--rpc", help="HOST:PORT of a device running `python -m tvm.exec.rpc_server`.")
@click.option("--segments", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Profile JSON (default: <model>.<target>.profile.json).")
@model_options
def profile(source, target, rpc, segments, output, input_shapes, example_input, trust_pickle):
    """Measure SOURCE's segments on TARGET (this host, or a device over RPC) for the planner."""
    from splitc.drivers.profile import check_profilable, profile_target
    from splitc.targets import load_target

    target_obj = load_target(target)
    check_profilable(target_obj, rpc)  # refuse before spending seconds on the export
    _, graph = import_source(source, input_shapes, example_input, trust_pickle)
    measured = profile_target(graph, target_obj, segments=segments, rpc=rpc, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    out = Path(output or f"{graph.name}.{target_obj.name}.profile.json")
    measured.save(out)
    table = Table(title=f"{graph.name} on {target_obj.name}, measured on {measured.measured_on}")
    for column in ("segment", "nodes", "measured ms (median)", "backend", "candidates ms", "analytic ms", "measured / analytic"):
        table.add_column(column)
    for s in measured.segments:
        table.add_row(f"{s.first_node} … {s.last_node}", str(s.end_position - s.start_position + 1), f"{s.measured.median_ms:.3f}",
                      s.backend, ", ".join(f"{b} {ms:.3f}" for b, ms in s.candidates.items()),
                      f"{s.estimated_ms:.3f}", f"{s.ratio:.2f}" if s.estimated_ms else "-")
    console.print(table)
    console.print(f"wrote {out}")


@click.command()
def targets():
    """List the built-in targets and link presets with their figures."""
    from splitc.targets import builtin_target_names, load_links, load_target

    table = Table(title="targets (pass a .toml path for your own)")
    for column in ("name", "tier", "arch", "backend", "GFLOP/s sustained", "GB/s", "memory GB", "description"):
        table.add_column(column)
    for name in builtin_target_names():
        t = load_target(name)
        table.add_row(t.name, t.tier, t.arch, t.backend, f"{t.sustained_gflops:g}", f"{t.memory_bandwidth_gbs:g}", f"{t.memory_gb:g}", t.description)
    console.print(table)
    links = Table(title="link presets (uplink)")
    for column in ("name", "Mbit/s", "RTT ms"):
        links.add_column(column)
    for link in load_links().values():
        links.add_row(link.name, f"{link.mbit_s:g}", f"{link.rtt_ms:g}")
    console.print(links)


