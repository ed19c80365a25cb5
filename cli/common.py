"""What the splitc commands share: consoles, model options and model import."""

from __future__ import annotations

import sys
import warnings

import click
from rich.console import Console
from rich.markup import escape

from splitc.core.errors import SplitcError

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
