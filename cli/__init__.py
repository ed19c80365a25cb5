"""The `splitc` command line. Every failure a user can cause is a SplitcError: printed as one line
and mapped to that error's exit code (see core/errors.py); a failed verification exits 10."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from rich.markup import escape
from rich.table import Table

from splitc.cli.audit import audit
from splitc.cli.serve import export_triton_command, remote_options, run_remote, serve
from splitc.cli.tune import bench, tune, tuning_group
from splitc.cli.variants import variants_option
from splitc.cli.common import _import, _mb, _model_options, console, err_console, run_command
from splitc.core.errors import InputError, VerificationFailed

class NoiseLevel(click.ParamType):
    """`--noise`: a positive float, or 'auto'."""

    name = "SIGMA|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            sigma = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)
        if not sigma > 0:
            self.fail(f"{value!r} must be > 0 (a multiple of each tensor's std)", param, ctx)
        return sigma


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="splitc")
def cli() -> None:
    """splitc: compile a PyTorch model into verified artifacts split across edge and cloud targets."""


@cli.command()
@click.argument("source")
@click.option("--targets", "-t", help="Comma-separated target chain, first tier first: rpi4,a100 (names or .toml paths).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Compile the chosen plan of a `splitc plan --json` file.")
@click.option("--plan-link", help="With --plan: take the front for this link (default: the first).")
@click.option("--cut", default="auto", show_default=True, help="'auto', or one node name / module path per boundary: layer2,layer4.")
@click.option("--link", default="4g", show_default=True, help="Link for --cut auto: a preset (cat1, 3g, 4g, wifi) or 20mbit:30ms.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Bundle directory (default: <model>.splitc).")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(1, 64), help="Reference samples stored for verify.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Quantize the tensors crossing each cut (affine; int4 packs two per byte).")
@click.option("--per-channel", is_flag=True, help="With --quantize: one scale and zero point per channel instead of per tensor.")
@click.option("--noise", type=NoiseLevel(), help="Gaussian noise on what leaves the device: σ as a multiple of each tensor's std, "
              "or 'auto' (least σ meeting --max-leakage; needs --calib).")
@click.option("--max-leakage", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --noise auto: distance correlation (bias-corrected) allowed between the input and what is sent.")
@click.option("--calib", help="Calibration data: an .npz (inputs, labels as y) or package.module:callable; for exit heads, quantizer ranges and noise scale.")
@click.option("--exits", help="Early-exit heads: 'auto' (one at each cut) or node names / module paths; trained on --calib.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Exit thresholds keep accuracy within this many points of the final classifier (on held-out --calib data).")
@variants_option
@_model_options
def compile(source, targets, plan_path, plan_link, cut, link, output, samples, quantize, per_channel, noise, max_leakage, calib, exits,
            max_accuracy_drop, input_shapes, example_input, trust_pickle):
    """Split SOURCE across TARGETS and compile every partition into a bundle."""
    from splitc.drivers.compiler import compile_model
    from splitc.drivers.plan_file import read_plan
    from splitc.targets import load_link, load_targets

    if not targets and not plan_path:
        raise InputError("compile needs --targets (e.g. rpi4,a100) or --plan plan.json")
    target_list = load_targets(targets) if targets else None
    link_obj = load_link(link)
    loaded, graph = _import(source, input_shapes, example_input, trust_pickle)
    record = None
    if plan_path:
        chosen = read_plan(plan_path, graph, plan_link)
        if targets and [t.name for t in target_list] != [t.name for t in load_targets(chosen.targets)]:
            raise InputError(f"--targets {targets} differs from the plan's active targets {','.join(chosen.targets)}; drop --targets")
        target_list, cut, record = load_targets(chosen.targets), (chosen.cuts or "auto"), chosen.record
    calibration, labels = _calibration_samples(calib, graph) if calib else (None, None)
    out = Path(output or f"{graph.name}.splitc")
    result = compile_model(graph, target_list, out, cut=cut, link=link_obj, samples=samples, examples=loaded.example_inputs,
                           plan_record=record, quantize=quantize, per_channel=per_channel, noise=noise, calibration=calibration, labels=labels,
                           exits=exits, max_accuracy_drop=max_accuracy_drop, max_leakage=max_leakage,
                           log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    manifest = result.manifest
    table = Table(title=f"{out} — {len(graph.value_nodes())} nodes, {graph.total_flops / 1e9:.3f} GFLOP, cut: {manifest.plan['method']}")
    for column in ("partition", "target", "backend", "nodes", "GFLOP", "receives", "artifacts", "compile s"):
        table.add_column(column)
    for p in manifest.partitions:
        received = sum(t.nbytes for t in p.inputs)
        table.add_row(str(p.index), p.target, p.backend, str(len(p.nodes)), f"{p.flops / 1e9:.3f}", _mb(received),
                      ", ".join(f"{a.path} [{a.role}]" for a in p.artifacts), f"{result.seconds[f'p{p.index}:{p.target}']:.1f}")
    console.print(table)
    for cut_info in manifest.plan["cuts"]:
        console.print(f"cut after [bold]{cut_info['after']}[/bold]: {len(cut_info['crossing'])} tensor(s), {_mb(cut_info['bytes'])} cross")
    quantization = manifest.plan.get("quantization")
    if quantization:
        sizes = ", ".join(f"{_mb(a)} → {_mb(b)}" for a, b in zip(quantization["bytes_float"], quantization["bytes_sent"]))
        console.print(f"{quantization['scheme']} at the cut: {sizes} per request; top-1 agreement with float "
                      f"{quantization['top1_agreement']:.4f}, max relative error {quantization['max_rel_err']:.2e}")
    exits_info = manifest.plan.get("exits")
    if exits_info:
        for head in manifest.exits:
            console.print(f"exit {head.index} after [bold]{escape(head.at)}[/bold] ({head.kind}) on partition {head.partition}: "
                          f"answers {head.exit_rate:.1%} of held-out inputs at confidence ≥ {head.threshold:.3f}")
        console.print(f"accuracy on {exits_info['held_out']} held-out samples: {exits_info['final_accuracy']:.2%} without exits, "
                      f"{exits_info['accuracy_with_exits']:.2%} with them (allowed drop {exits_info['max_accuracy_drop_points']:g} points; "
                      f"labels: {exits_info['labels']})")
    noise_info = manifest.plan.get("noise")
    if noise_info and "auto" in noise_info:
        chosen = noise_info["auto"]["chosen"]
        console.print(f"noise auto: σ={chosen['sigma']:g} is the least on the grid with leakage {chosen['leakage']:.3f} ≤ "
                      f"{noise_info['auto']['max_leakage']:g}; accuracy {chosen['accuracy']:.2%} ({chosen['drop_points']:.1f} points lost)")
    if noise_info:
        console.print(f"noise σ={noise_info['sigma']:g}×std on {len(noise_info['layers'])} tensor(s) leaving the device (drawn by the runtime); "
                      f"top-1 agreement with the clean model {noise_info['top1_agreement']:.4f}")
    if manifest.plan.get("estimate"):
        console.print(f"estimated latency on {link_obj.name}: {manifest.plan['estimate']['total_ms']:.2f} ms (analytic model)")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(f"wrote {out} in {result.seconds['total']:.1f} s")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON ('-' for stdout).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write the report as JUnit XML.")
@click.option("--no-emulation", is_flag=True, help="Check the host twin of aarch64 artifacts instead of emulating them.")
def verify(bundle, json_path, junit_path, no_emulation):
    """Run every artifact of BUNDLE and compare with the torch reference; exit 10 on any mismatch."""
    from splitc.runtime.adaptive import is_variant_dir
    from splitc.drivers.variants import verify_variants
    from splitc.drivers.verify import verify_bundle

    check_all = verify_variants if is_variant_dir(bundle) else verify_bundle  # a variant directory: every variant
    report = check_all(bundle, emulate=not no_emulation, log=lambda m: err_console.print(f"[dim]{escape(m)}[/dim]"))
    table = Table(title=f"verify {bundle}")
    for column in ("check", "artifact", "mode", "rel err", "rtol", "top-1", "status"):
        table.add_column(column)
    colours = {"pass": "green", "fail": "red", "skip": "yellow"}
    for c in report.checks:
        table.add_row(c.name, c.artifact or "-", c.mode, f"{c.max_rel_err:.2e}", f"{c.rtol:g}",
                      "-" if c.top1 is None else f"{c.top1:.3f}", f"[{colours[c.status]}]{c.status}[/]")
    (err_console if json_path == "-" else console).print(table)
    for c in report.checks:
        if c.note:
            (err_console if json_path == "-" else console).print(f"[dim]{escape(c.name)}: {escape(c.note)}[/dim]")
    if json_path == "-":
        click.echo(json.dumps(report.to_json(), indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if junit_path:
        Path(junit_path).write_text(report.to_junit() + "\n")
    if not report.ok:
        names = ", ".join(c.name for c in report.failures)
        raise VerificationFailed(f"verification failed for {names}; see the table above for errors and tolerances")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--input", "-i", "inputs", multiple=True, required=True, metavar="[NAME=]FILE",
              help="Input .npy (repeat, in order or as name=file) or one .npz holding all inputs.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Save outputs to this .npz.")
@remote_options
def run(bundle, inputs, output, remote, token_file, model_name, remote_timeout, retries, no_fallback):
    """Run BUNDLE's partitions chained on this host, or the device part here and the rest on --remote."""
    from splitc.runtime import Bundle, SplitSession
    from splitc.runtime.adaptive import local_bundle_path, read_any_manifest

    if remote:  # a variant directory runs adaptively (splitc.runtime.adaptive), a bundle as it is split
        feed = _read_inputs(inputs, [t.name for t in read_any_manifest(bundle).inputs])
        outputs = run_remote(bundle, feed, remote, token_file=token_file, model_name=model_name, remote_timeout=remote_timeout,
                             retries=retries, no_fallback=no_fallback, echo=lambda m: console.print(escape(m))).outputs
    else:
        session = SplitSession(Bundle.open(local_bundle_path(bundle)))  # a variant directory: its variant 0
        feed = _read_inputs(inputs, [t.name for t in session.manifest.inputs])
        answer = session.infer(feed)
        outputs = answer.outputs
        for index, artifact in session.artifacts.items():
            ran = "" if index < answer.partitions_run else ", not run"
            console.print(f"[dim]partition {index}: {artifact.path} ({artifact.role}{ran})[/dim]")
        if answer.exit is not None:
            console.print(f"answered by exit {answer.exit} after partition {answer.partitions_run - 1} (confidence {answer.confidence:.3f})")
    for name, value in outputs.items():
        line = f"{name}: {value.dtype}{list(value.shape)}"
        if value.ndim >= 2 and value.shape[-1] > 1 and np.issubdtype(value.dtype, np.floating):
            line += f"  top-1 {np.argmax(value, axis=-1).ravel().tolist()[:8]}"
        console.print(line)
    if output:
        np.savez(output, **outputs)
        console.print(f"wrote {output}")


def _calibration_samples(path, graph):
    """Calibration data as per-sample input tuples (torch) and labels (or None), checked against the model."""
    import torch

    from splitc.passes.privacy import load_calibration

    data = load_calibration(path, graph)
    return [tuple(torch.from_numpy(np.ascontiguousarray(x[i])) for x in data.inputs) for i in range(len(data))], data.labels


def _read_inputs(specs, names) -> dict[str, np.ndarray]:
    """`--input` values: FILE (.npy in model-input order, or one .npz) or NAME=FILE."""
    from splitc.runtime.arrays import read_arrays

    feed: dict[str, np.ndarray] = {}
    for position, spec in enumerate(specs):
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        arrays = read_arrays(path)
        if arrays[0][0] is None:  # a .npy: one tensor
            if not name:
                if position >= len(names):
                    raise InputError(f"got more inputs than the model's {len(names)} ({', '.join(names)})")
                name = names[position]
            feed[name] = arrays[0][1]
        else:  # a .npz: by key when the keys are input names, else in stored order
            keys = [k for k, _ in arrays]
            feed.update(dict(arrays) if set(keys) <= set(names) else dict(zip(names, (a for _, a in arrays))))
    return feed


@cli.command()
@click.argument("source")
@click.option("--targets", "-t", help="Also estimate per-cut latency for this two-tier chain, e.g. rpi4,a100.")
@click.option("--link", default="4g", show_default=True, help="Link for the estimate.")
@click.option("--limit", default=0, type=int, help="Show at most this many candidate cuts (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_model_options
def inspect(source, targets, link, limit, as_json, input_shapes, example_input, trust_pickle):
    """Summarise SOURCE's graph and list candidate cuts in order with the bytes that would cross."""
    from splitc.passes.cuts import CutAnalysis, estimate
    from splitc.targets import load_link, load_targets

    _, graph = _import(source, input_shapes, example_input, trust_pickle)
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
                  f"{_mb(graph.param_bytes)} of parameters, {len(candidates)} candidate cuts")
    for t in graph.inputs:
        console.print(f"  input  {t.name}: {t.dtype}{list(t.shape)}")
    for t in graph.outputs:
        console.print(f"  output {t.name}: {t.dtype}{list(t.shape)}")
    table = Table(title="candidate cuts (in graph order)")
    columns = ["#", "after node", "module", "tensors", "bytes crossing"] + (["est. ms"] if chain else [])
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["position"]), row["after"], row["module"], str(row["tensors"]), _mb(row["bytes"]),
                      *([f"{row['estimated_ms']:.2f}"] if chain else []))
    console.print(table)


@cli.command()
@click.argument("source")
@click.option("--targets", "-t", required=True, help="Tier chain, device first: rpi4,edge-server,a100.")
@click.option("--link", default="4g", show_default=True, help="Device uplink: presets (cat1, 3g, 4g, wifi) or 20mbit:30ms; several, comma-separated, give one front each.")
@click.option("--rate", default="10/s", show_default=True, help="Request rate: 50/s, 3000/min, 1e6/day.")
@click.option("--utilisation", default=0.7, show_default=True, type=click.FloatRange(0.05, 1.0), help="Target utilisation of a reserved VM replica.")
@click.option("--objective", type=click.Choice(["latency", "cost", "privacy", "energy"]), default="latency", show_default=True)
@click.option("--max-latency", help="Constraint, e.g. 120ms.")
@click.option("--max-cost", type=float, help="Constraint in USD per million requests.")
@click.option("--max-leakage", type=float, help="Constraint on leakage (distance correlation, 0..1); needs --calib.")
@click.option("--max-energy", type=float, help="Constraint on device joules per request.")
@click.option("--calib", type=click.Path(dir_okay=False), help="Calibration inputs (.npz) to measure leakage per cut.")
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), help="Measured profile from `splitc profile` (repeat per target).")
@click.option("--all-tiers", is_flag=True, help="Only plans that give every target some work.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Price transfers as if the tensors at each cut were quantized (compile with the same --quantize).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan document as JSON (for `compile --plan`).")
@click.option("--png", type=click.Path(dir_okay=False), help="Write a PNG of the front(s).")
@_model_options
def plan(source, targets, link, rate, utilisation, objective, max_latency, max_cost, max_leakage, max_energy, calib, profiles,
         all_tiers, quantize, as_json, png, input_shapes, example_input, trust_pickle):
    """Plan where to cut SOURCE over TARGETS: the Pareto front of latency, money, privacy, energy."""
    from splitc.passes.cost_model import compute_ms
    from splitc.passes.cuts import CutAnalysis
    from splitc.passes.money import Workload
    from splitc.passes.planner import Constraints, plan_placements
    from splitc.drivers.plan_file import parse_duration_ms, parse_rate, plan_document
    from splitc.targets import load_link, load_targets

    chain = load_targets(targets)
    links = [load_link(name) for name in link.split(",") if name.strip()]
    workload = Workload(parse_rate(rate), utilisation)
    constraints = Constraints(parse_duration_ms(max_latency, "--max-latency") if max_latency else None, max_cost, max_leakage, max_energy)
    _, graph = _import(source, input_shapes, example_input, trust_pickle)
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
    table = Table(title=f"{model_name} on {front.link.name} ({front.link.mbit_s:g} Mbit/s, {front.link.rtt_ms:g} ms): "
                        f"{len(front.plans)} Pareto-optimal of {front.evaluated} plans, objective {front.objective}")
    for column in ("", "cuts after", "placement", "latency ms", "$ / M req", "leakage", "device J", "remote tiers"):
        table.add_column(column)
    for i, p in enumerate(front.plans):
        remote = []
        for t in p.tiers:
            if t.pricing:
                remote.append(f"{t.target}: {'VM' if t.pricing == 'iaas' else 'serverless'}{_pricing_note(t)}")
        placement = " → ".join(f"{t.target}({t.nodes})" for t in p.tiers if t.nodes)
        table.add_row("★" if i == front.chosen else "", ", ".join(p.cuts), placement or "-", f"{p.latency_ms:.2f}",
                      f"{p.cost_usd_per_million:.4g}", "-" if p.leakage is None else f"{p.leakage:.3f}",
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


@cli.command()
@click.argument("source")
@click.option("--target", "-t", required=True, help="Target to measure (a name or .toml path).")
@click.option("--rpc", help="HOST:PORT of a device running `python -m tvm.exec.rpc_server`.")
@click.option("--segments", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Profile JSON (default: <model>.<target>.profile.json).")
@_model_options
def profile(source, target, rpc, segments, output, input_shapes, example_input, trust_pickle):
    """Measure SOURCE's segments on TARGET (this host, or a device over RPC) for the planner."""
    from splitc.drivers.profile import check_profilable, profile_target
    from splitc.targets import load_target

    target_obj = load_target(target)
    check_profilable(target_obj, rpc)  # refuse before spending seconds on the export
    _, graph = _import(source, input_shapes, example_input, trust_pickle)
    measured = profile_target(graph, target_obj, segments=segments, rpc=rpc, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    out = Path(output or f"{graph.name}.{target_obj.name}.profile.json")
    measured.save(out)
    table = Table(title=f"{graph.name} on {target_obj.name}, measured on {measured.measured_on}")
    for column in ("segment", "nodes", "measured ms (median)", "analytic ms", "measured / analytic"):
        table.add_column(column)
    for s in measured.segments:
        table.add_row(f"{s.first_node} … {s.last_node}", str(s.end_position - s.start_position + 1), f"{s.measured.median_ms:.3f}",
                      f"{s.estimated_ms:.3f}", f"{s.ratio:.2f}" if s.estimated_ms else "-")
    console.print(table)
    console.print(f"wrote {out}")


@cli.command()
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


@cli.command("build-engine")
@click.argument("bundle", type=click.Path())
def build_engine(bundle):
    """Build the TensorRT engines BUNDLE marks deferred (run on the GPU host)."""
    from splitc.backends.tensorrt import build_deferred_engines

    built = build_deferred_engines(Path(bundle), log=console.print)
    console.print(f"built engines for partitions {built}" if built else "no deferred engines in this bundle")


@cli.command()
@click.argument("arch", type=click.Choice(["aarch64"]))
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where to keep it (default: $SPLITC_CACHE or ~/.cache/splitc).")
def toolchain(arch, cache_dir):
    """Provision an emulated ARCH Python + TVM runtime so verify runs the device artifact itself."""
    from splitc.backends.emulation import provision_aarch64

    found = provision_aarch64(Path(cache_dir) if cache_dir else None, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    console.print(f"{arch} toolchain ready at {found.root}")


cli.add_command(serve)
cli.add_command(export_triton_command)
cli.add_command(audit)
cli.add_command(tune)
cli.add_command(bench)
cli.add_command(tuning_group)


def main(argv: list[str] | None = None) -> None:
    run_command(cli, argv, "splitc")


if __name__ == "__main__":
    main()
