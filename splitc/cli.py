"""The `splitc` command line. Every failure a user can cause is a SplitcError: printed as one line
and mapped to that error's exit code (see splitc/errors.py); a failed verification exits 10."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from splitc.errors import InputError, SplitcError, VerificationFailed

# Wide enough for the tables when output goes to a CI log rather than a terminal.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f} MB" if nbytes >= 1e4 else f"{int(nbytes)} B"


def _model_options(func):
    func = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled nn.Module (.pt/.pth). Unpickling runs code.")(func)
    func = click.option("--example-input", type=click.Path(dir_okay=False), help="Inputs as .npy (one) or .npz (several, in order).")(func)
    func = click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE[:DTYPE]",
                        help="Input shape for a factory or pickle, e.g. 1,3,224,224 or 1,128:int64; repeat or use ';' for several.")(func)
    return func


def _import(source, input_shapes, example_input, trust_pickle):
    from splitc.frontend import import_model

    with console.status(f"exporting {source}"):
        return import_model(source, input_shapes=input_shapes, example_input=example_input, trust_pickle=trust_pickle)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="splitc")
def cli() -> None:
    """splitc: compile a PyTorch model into verified artifacts split across edge and cloud targets."""


@cli.command()
@click.argument("source")
@click.option("--targets", "-t", required=True, help="Comma-separated target chain, first tier first: rpi4,a100 (names or .toml paths).")
@click.option("--cut", default="auto", show_default=True, help="'auto', or one node name / module path per boundary: layer2,layer4.")
@click.option("--link", default="4g", show_default=True, help="Link for --cut auto: a preset (cat1, 3g, 4g, wifi) or 20mbit:30ms.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Bundle directory (default: <model>.splitc).")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(1, 64), help="Reference samples stored for verify.")
@_model_options
def compile(source, targets, cut, link, output, samples, input_shapes, example_input, trust_pickle):
    """Split SOURCE across TARGETS and compile every partition into a bundle."""
    from splitc.compiler import compile_model
    from splitc.targets import load_link, load_targets

    target_list = load_targets(targets)
    link_obj = load_link(link)
    loaded, graph = _import(source, input_shapes, example_input, trust_pickle)
    out = Path(output or f"{graph.name}.splitc")
    result = compile_model(graph, target_list, out, cut=cut, link=link_obj, samples=samples,
                           examples=loaded.example_inputs, log=lambda m: console.print(f"[dim]{m}[/dim]"))
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
    if manifest.plan.get("estimate"):
        console.print(f"estimated latency on {link_obj.name}: {manifest.plan['estimate']['total_ms']:.2f} ms (analytic model)")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"wrote {out} in {result.seconds['total']:.1f} s")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON ('-' for stdout).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write the report as JUnit XML.")
@click.option("--no-emulation", is_flag=True, help="Check the host twin of aarch64 artifacts instead of emulating them.")
def verify(bundle, json_path, junit_path, no_emulation):
    """Run every artifact of BUNDLE and compare with the torch reference; exit 10 on any mismatch."""
    from splitc.verify import verify_bundle

    report = verify_bundle(bundle, emulate=not no_emulation, log=lambda m: err_console.print(f"[dim]{m}[/dim]"))
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
            (err_console if json_path == "-" else console).print(f"[dim]{c.name}: {c.note}[/dim]")
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
def run(bundle, inputs, output):
    """Run BUNDLE's partitions chained on this host."""
    from splitc.runtime import Bundle, SplitSession

    session = SplitSession(Bundle.open(bundle))
    feed = _read_inputs(inputs, [t.name for t in session.manifest.inputs])
    outputs = session.run(feed)
    for index, artifact in session.artifacts.items():
        console.print(f"[dim]partition {index}: {artifact.path} ({artifact.role})[/dim]")
    for name, value in outputs.items():
        line = f"{name}: {value.dtype}{list(value.shape)}"
        if value.ndim >= 2 and value.shape[-1] > 1 and np.issubdtype(value.dtype, np.floating):
            line += f"  top-1 {np.argmax(value, axis=-1).ravel().tolist()[:8]}"
        console.print(line)
    if output:
        np.savez(output, **outputs)
        console.print(f"wrote {output}")


def _read_inputs(specs, names) -> dict[str, np.ndarray]:
    feed: dict[str, np.ndarray] = {}
    for position, spec in enumerate(specs):
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if not Path(path).is_file():
            raise InputError(f"input file {path} does not exist")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"cannot read {path} as .npy/.npz ({exc})") from exc
        if isinstance(loaded, np.ndarray):
            if not name:
                if position >= len(names):
                    raise InputError(f"got more inputs than the model's {len(names)} ({', '.join(names)})")
                name = names[position]
            feed[name] = loaded
        else:
            with loaded:
                keys = list(loaded.files)
                mapping = {k: loaded[k] for k in keys} if set(keys) <= set(names) else dict(zip(names, (loaded[k] for k in keys)))
                feed.update(mapping)
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

    found = provision_aarch64(Path(cache_dir) if cache_dir else None, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    console.print(f"{arch} toolchain ready at {found.root}")


def main(argv: list[str] | None = None) -> None:
    # torch.export's pytree deprecations are not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        cli.main(args=argv, prog_name="splitc", standalone_mode=False)
    except SplitcError as exc:
        err_console.print(f"[red]splitc: error:[/red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("splitc: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
