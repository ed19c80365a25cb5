"""The `splitc` command line: one module per command group, registered here. Every failure a user
can cause is a SplitcError: printed as one line and mapped to that error's exit code (see
core/errors.py); a failed verification exits 10."""

from __future__ import annotations

import click

from splitc.cli.audit import audit
from splitc.cli.common import run_command
from splitc.cli.compile import build_engine, compile, run, toolchain, verify
from splitc.cli.decoder import generate
from splitc.cli.plan import inspect, plan, profile, targets
from splitc.cli.serve import export_triton_command, serve
from splitc.cli.tune import bench, tune, tuning_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="splitc")
def cli() -> None:
    """splitc: compile a PyTorch model into verified artifacts split across edge and cloud targets."""


COMMANDS = (inspect, plan, profile, compile, verify, run, targets, build_engine, toolchain, serve, export_triton_command,
            audit, tune, bench, tuning_group, generate)
for command in COMMANDS:
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    run_command(cli, argv, "splitc")


if __name__ == "__main__":
    main()
