"""The Typer application: registers each subcommand module and handles --version.

Each subcommand lives in its own module and exposes `register(app)`; a module is listed here only once
its command works.
"""

from __future__ import annotations

import importlib

import typer

from gmot_cli import __version__
from gmot_cli.common import EXIT_CODES_HELP

app = typer.Typer(
    name="gmot",
    help="Train CTC speech recognisers that learn from a pretrained language model through "
    "Graph Matching Optimal Transport (GM-OT).",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Subcommand modules, in the order a user meets them.
COMMAND_MODULES: list[str] = ["prepare", "pretrain", "distill", "decode", "score", "plot_alignment", "export"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"gmot_cli.{_name}").register(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gmot {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """gmot: GM-OT knowledge transfer for CTC speech recognition."""


def main() -> None:
    """Entry point of the `gmot` console script."""
    app()
