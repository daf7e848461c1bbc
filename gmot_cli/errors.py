"""How every command reports a user error: one red line on stderr, no traceback, a meaningful exit code."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape


def error_exit(console: Console, message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` (markup in `message` is not interpreted) and return the Exit to raise.

    Exit codes: 2 for unusable input or options, 1 for a failure while working.
    """
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
