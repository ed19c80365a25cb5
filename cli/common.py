"""What the splitc commands share: consoles, model options and model import."""

from __future__ import annotations

import sys
import warnings

import click
import numpy as np
from rich.console import Console
from rich.markup import escape

from splitc.core.errors import InputError, SplitcError

# Wide enough for the tables when output goes to a CI log rather than a terminal.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f} MB" if nbytes >= 1e4 else f"{int(nbytes)} B"


# Model-file options every model-taking command accepts without naming them in its signature: they
# are kept in the click context and read by `import_source`.
_MODEL_META = "splitc.model_options"


def _remember(ctx: click.Context, param: click.Parameter, value):
    ctx.meta.setdefault(_MODEL_META, {})[param.name] = value
    return value


def model_options(func):
    func = click.option("--verbose", is_flag=True, expose_value=False, callback=_remember,
                        help="Show the warnings and log records of torch and transformers while the model loads.")(func)
    func = click.option("--task", type=click.Choice(["image-classification", "text-classification", "causal-lm"]), expose_value=False,
                        callback=_remember, help="For a Hugging Face folder or GGUF file: the model head to load.")(func)
    func = click.option("--weights", type=click.Path(dir_okay=False), expose_value=False, callback=_remember,
                        help="A state_dict (torch.save or safetensors) to load into the module of a package.module:Net factory.")(func)
    func = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled nn.Module. Unpickling runs code.")(func)
    func = click.option("--example-input", type=click.Path(dir_okay=False), help="Inputs as .npy (one) or .npz (several, in order).")(func)
    func = click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE[:DTYPE]",
                        help="Input shape for a factory or pickle, e.g. 1,3,224,224 or 1,128:int64; repeat or use ';' for several.")(func)
    return func


def model_option(name: str):
    """The value of a model option kept in the click context (--task, --weights, --verbose), or None."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_MODEL_META, {}).get(name) if ctx is not None else None


def import_source(source, input_shapes, example_input, trust_pickle):
    from splitc.frontend import import_model

    ctx = click.get_current_context(silent=True)
    extra = dict(ctx.meta.get(_MODEL_META, {})) if ctx is not None else {}
    with console.status(f"exporting {source}"):
        return import_model(source, input_shapes=input_shapes, example_input=example_input, trust_pickle=trust_pickle,
                            weights=extra.get("weights"), task=extra.get("task"), verbose=bool(extra.get("verbose")))


def run_command(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """Run a click command the CI-grade way: a SplitcError is one line on stderr and its own exit
    code, Ctrl-C exits 130, usage errors exit 2."""
    # torch.export's pytree deprecations are not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except SplitcError as exc:
        err_console.print(f"[red]splitc: error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("splitc: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


def calibration_samples(path, graph):
    """Calibration data as per-sample input tuples (torch) and labels (or None), checked against the model."""
    import torch

    from splitc.passes.privacy import load_calibration

    data = load_calibration(path, graph)
    return [tuple(torch.from_numpy(np.ascontiguousarray(x[i])) for x in data.inputs) for i in range(len(data))], data.labels


def read_inputs(specs, names, paths=()) -> dict[str, np.ndarray]:
    """`--input` values: FILE (.npy in model-input order, or one .npz) or NAME=FILE; a name may be
    an input's path in the model's structure (`d.img`), which the runtime maps to its tensor."""
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
            feed.update(dict(arrays) if set(keys) <= set(names) | set(paths) else dict(zip(names, (a for _, a in arrays))))
    return feed




# The options several commands share, defined once: the same name, short flag, default and parsing
# everywhere; each command says in its own help what the option means there.
LINK_HELP = "a preset (cat1, 3g, 4g, wifi) or BANDWIDTHmbit:RTTms such as 20mbit:30ms"


def targets_option(help: str = "Comma-separated target chain, first tier first: rpi4,a100 (names or .toml paths).",
                   required: bool = False):
    return click.option("--targets", "-t", required=required, help=help)


def link_option(help: str = f"Link for --cut auto: {LINK_HELP}."):
    return click.option("--link", default="4g", show_default=True, help=help)


def cut_option(help: str = "'auto', or one node name / module path per boundary: layer2,layer4."):
    return click.option("--cut", default="auto", show_default=True, help=help)


def calib_option(help: str = "Calibration data: an .npz (inputs, labels as y) or package.module:callable.", required: bool = False):
    return click.option("--calib", required=required, help=help)


def json_report_option(help: str = "Write the report as JSON ('-' for stdout)."):
    return click.option("--json", "json_path", type=click.Path(dir_okay=False), help=help)


def json_flag_option(help: str = "Print JSON instead of tables."):
    return click.option("--json", "as_json", is_flag=True, help=help)
