"""`splitc compile`, `verify`, `run`, `build-engine` and `toolchain`: from a model to a checked bundle."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from rich.markup import escape
from rich.table import Table

from splitc.cli.common import (calib_option, calibration_samples, console, cut_option, err_console, import_source,
                               json_report_option, link_option, mb, model_options, read_inputs, targets_option)
from splitc.cli.serve import remote_options, run_remote
from splitc.cli.variants import check_variant_request, compile_variants_command
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


@click.command()
@click.argument("source")
@targets_option()
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Compile the chosen plan of a `splitc plan --json` file.")
@click.option("--plan-link", help="With --plan: take the front for this link (default: the first).")
@cut_option()
@link_option()
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Bundle directory (default: <model>.splitc).")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(1, 64), help="Reference samples stored for verify.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Quantize the tensors crossing each cut (affine; int4 packs two per byte).")
@click.option("--per-channel", is_flag=True, help="With --quantize: one scale and zero point per channel instead of per tensor.")
@click.option("--noise", type=NoiseLevel(), help="Gaussian noise on what leaves the device: σ as a multiple of each tensor's std, "
              "or 'auto' (least σ meeting --max-leakage; needs --calib).")
@click.option("--max-leakage", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --noise auto: distance correlation (bias-corrected) allowed between the input and what is sent.")
@calib_option("Calibration data: an .npz (inputs, labels as y) or package.module:callable; for exit heads, quantizer ranges and noise scale.")
@click.option("--exits", help="Early-exit heads: 'auto' (one at each cut) or node names / module paths; trained on --calib.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Exit thresholds keep accuracy within this many points of the final classifier (on held-out --calib data).")
@click.option("--defend", type=click.Choice(["nopeek", "adversarial", "noise-aware"]),
              help="Fine-tune the model so what crosses the first cut resists inversion, within --max-accuracy-drop (needs --calib).")
@click.option("--backend", "backend_overrides", multiple=True, metavar="TARGET=BACKEND",
              help="Run TARGET's partitions on BACKEND (e.g. rpi4=tvm) instead of the fastest measured here; repeatable.")
@click.option("--variants", "variant_count", type=int, metavar="K",
              help="Compile the K placements that win across link conditions (device-only and cloud-only included) "
                   "into one directory, for the adaptive runtime (`splitc run --remote` switches between them).")
@model_options
@click.option("--max-len", default=256, show_default=True, type=click.IntRange(2), help="Decoders: KV-cache positions (prompt + generated).")
@click.option("--draft", default="off", show_default=True, help="Decoders: 'off', or N/auto to also compile the drafting graphs "
              "(an exit LM head on the device, n-row verification in the cloud).")
def compile(source, targets, plan_path, plan_link, cut, link, output, samples, quantize, per_channel, noise, max_leakage, calib, exits,
            max_accuracy_drop, defend, backend_overrides, variant_count, input_shapes, example_input, trust_pickle, max_len, draft):
    """Split SOURCE across TARGETS and compile every partition into a bundle.

    A decoder LM (`--task causal-lm`; without --task, a .gguf, a Hugging Face folder, or a factory
    given without --input-shape or --weights) is split after the named layer into two stateful
    halves with their KV caches (see `splitc generate`)."""
    from splitc.cli.common import model_option
    from splitc.cli.decoder import compile_decoder_command
    from splitc.drivers.backend_choice import describe as describe_choice
    from splitc.frontend.decoder import is_decoder_source

    task = model_option("task")
    if task == "causal-lm" or (task is None and not model_option("weights")
                               and is_decoder_source(source, has_input_shapes=bool(input_shapes or example_input))):
        return compile_decoder_command(source, targets, cut, output, max_len, draft)
    from splitc.drivers.compiler import compile_model
    from splitc.drivers.plan_file import read_plan
    from splitc.passes.contract import CompileData, CompileOptions
    from splitc.targets import load_link, load_targets

    if variant_count is not None:
        check_variant_request(variant_count, targets=targets, plan_path=plan_path, cut=cut, exits=exits)  # before the export's seconds
    if not targets and not plan_path:
        raise InputError("compile needs --targets (e.g. rpi4,a100) or --plan plan.json")
    if defend and not calib:
        raise InputError(f"--defend {defend} fine-tunes the model on data: pass --calib data.npz (inputs, labels as y)")
    if defend and variant_count is not None:
        raise InputError("--variants does not take --defend yet; compile the defended model without --variants, or drop --defend")
    target_list = load_targets(targets) if targets else None
    link_obj = load_link(link)
    loaded, graph = import_source(source, input_shapes, example_input, trust_pickle)
    record = None
    if plan_path:
        chosen = read_plan(plan_path, graph, plan_link)
        if targets and [t.name for t in target_list] != [t.name for t in load_targets(chosen.targets)]:
            raise InputError(f"--targets {targets} differs from the plan's active targets {','.join(chosen.targets)}; drop --targets")
        target_list, cut, record = load_targets(chosen.targets), (chosen.cuts or "auto"), chosen.record
    calibration, labels = calibration_samples(calib, graph) if calib else (None, None)
    # The one place a compile's options are built: the variants path gets the very same object.
    options = CompileOptions(target_list, link_obj, cut=cut, samples=samples, quantize=quantize, per_channel=per_channel, noise=noise,
                             max_leakage=max_leakage, exits=exits, max_accuracy_drop=max_accuracy_drop, plan_record=record,
                             defend=defend, backends=backend_overrides)
    data = CompileData(examples=loaded.example_inputs, calibration=calibration, labels=labels)
    log = lambda m: console.print(f"[dim]{escape(m)}[/dim]")  # noqa: E731
    if variant_count is not None:
        return compile_variants_command(graph, options, data, variant_count, Path(output or f"{graph.name}.variants"), log)
    out = Path(output or f"{graph.name}.splitc")
    result = compile_model(graph, options, out, data=data, log=log)
    manifest = result.manifest
    table = Table(title=f"{out} — {len(graph.value_nodes())} nodes, {graph.total_flops / 1e9:.3f} GFLOP, cut: {manifest.plan['method']}")
    for column in ("partition", "target", "backend", "chosen by", "nodes", "GFLOP", "receives", "artifacts", "compile s"):
        table.add_column(column)
    for p in manifest.partitions:
        received = sum(t.nbytes for t in p.inputs)
        table.add_row(str(p.index), p.target, p.backend, describe_choice(p.choice), str(len(p.nodes)), f"{p.flops / 1e9:.3f}", mb(received),
                      ", ".join(f"{a.path} [{a.role}]" for a in p.artifacts), f"{result.seconds[f'p{p.index}:{p.target}']:.1f}")
    console.print(table)
    for cut_info in manifest.plan["cuts"]:
        console.print(f"cut after [bold]{cut_info['after']}[/bold]: {len(cut_info['crossing'])} tensor(s), {mb(cut_info['bytes'])} cross")
    quantization = manifest.plan.get("quantization")
    if quantization:
        sizes = ", ".join(f"{mb(a)} → {mb(b)}" for a, b in zip(quantization["bytes_float"], quantization["bytes_sent"]))
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
    defence = manifest.plan.get("defence")
    if defence:
        console.print(f"defence {defence['method']} {defence['strength']:g} at {defence['cut']}: held-out accuracy "
                      f"{defence['accuracy_before']:.2%} → {defence['accuracy_after']:.2%}, dCor {defence['dcor_before']:.3f} → "
                      f"{defence['dcor_after']:.3f}, trained {defence['training_seconds']:.0f} s (`splitc audit --defend` attacks it)")
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


@click.command()
@click.argument("bundle", type=click.Path())
@json_report_option()
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write the report as JUnit XML.")
@click.option("--no-emulation", is_flag=True, help="Check the host twin of aarch64 artifacts instead of emulating them.")
def verify(bundle, json_path, junit_path, no_emulation):
    """Run every artifact of BUNDLE and compare with the torch reference; exit 10 on any mismatch."""
    from splitc.runtime.variant_index import is_variant_dir
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


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--input", "-i", "inputs", multiple=True, required=True, metavar="[NAME=]FILE",
              help="Input .npy (repeat, in order or as name=file) or one .npz holding all inputs.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Save outputs to this .npz.")
@remote_options
def run(bundle, inputs, output, remote, token_file, model_name, remote_timeout, retries, no_fallback):
    """Run BUNDLE's partitions chained on this host, or the device part here and the rest on --remote."""
    from splitc.runtime import Bundle, SplitSession
    from splitc.runtime.variant_index import local_bundle_path, read_any_manifest

    if remote:  # a variant directory runs adaptively (splitc.runtime.adaptive), a bundle as it is split
        specs = read_any_manifest(bundle).inputs
        feed = read_inputs(inputs, [t.name for t in specs], [t.path for t in specs if t.path])
        outputs = run_remote(bundle, feed, remote, token_file=token_file, model_name=model_name, remote_timeout=remote_timeout,
                             retries=retries, no_fallback=no_fallback, echo=lambda m: console.print(escape(m))).outputs
    else:
        session = SplitSession(Bundle.open(local_bundle_path(bundle)))  # a variant directory: its variant 0
        feed = read_inputs(inputs, [t.name for t in session.manifest.inputs], [t.path for t in session.manifest.inputs if t.path])
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


@click.command("build-engine")
@click.argument("bundle", type=click.Path())
def build_engine(bundle):
    """Build the TensorRT engines BUNDLE marks deferred (run on the GPU host)."""
    from splitc.backends.tensorrt import build_deferred_engines

    built = build_deferred_engines(Path(bundle), log=console.print)
    console.print(f"built engines for partitions {built}" if built else "no deferred engines in this bundle")


@click.command()
@click.argument("arch", type=click.Choice(["aarch64"]))
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where to keep it (default: $SPLITC_CACHE or ~/.cache/splitc).")
def toolchain(arch, cache_dir):
    """Provision an emulated ARCH Python with TVM's and ONNX Runtime's runtimes so verify runs the device artifact itself."""
    from splitc.backends.emulation import RUNTIME_LAYERS, provision_aarch64

    found = provision_aarch64(Path(cache_dir) if cache_dir else None, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    console.print(f"{arch} toolchain ready at {found.root} (runtimes: tvm, {', '.join(RUNTIME_LAYERS)})")


