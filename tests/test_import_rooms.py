"""The import arrows of docs/design.md hold: tasks and engine -> nn -> ot, everything may import `data` and
the version in `models/__init__.py`, `data` imports nothing of `models` or `gmot_cli`, and nothing under
`models` imports `gmot_cli`. Imports inside
functions count too (a lazy import is still an arrow)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# room -> the gmot rooms its modules may import (besides their own room and third-party packages)
ALLOWED: dict[str, set[str]] = {
    "data": set(),
    "models.ot": {"models"},
    "models.nn": {"models", "models.ot", "data"},
    "models.engine": {"models", "models.nn", "models.ot", "data"},
    "models.tasks": {"models", "models.engine", "models.nn", "models.ot", "data"},
    "models": {"models.ot", "models.nn", "models.engine", "models.tasks", "data"},
    "gmot_cli": {"models", "models.ot", "models.nn", "models.engine", "models.tasks", "data"},
}
ROOMS = sorted(ALLOWED, key=len, reverse=True)
ROOM_NAMES = {"ot", "nn", "engine", "tasks"}  # the sub-packages of models


def room_of(module: str) -> str | None:
    """The room of a dotted module name ('models.ot.transport' -> 'models.ot'), None for a third-party one."""
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return None


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the module named `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            # `from models import nn` imports the room models.nn; `from models.ot import graphs` the module
            # models.ot.graphs, whose room is its package's
            found += [
                (
                    node.lineno,
                    f"{base}.{alias.name}" if base == "models" and alias.name in ROOM_NAMES else base,
                )
                for alias in node.names
            ]
    return found


def violations(source: str, module: str) -> list[str]:
    """The imports of `source` (module `module`) that go against ALLOWED, as 'module:line -> imported'."""
    own = room_of(module)
    if own is None:
        return []
    bad = []
    for line, name in imported_modules(source, module):
        target = room_of(name)
        if target is None or target == own or target in ALLOWED[own]:
            continue
        bad.append(f"{module}:{line} -> {name}")
    return bad


def test_no_import_runs_against_the_arrows():
    bad = []
    for package in ("data", "models", "gmot_cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            bad += violations(path.read_text(encoding="utf-8"), module)
    assert not bad, "imports against the rooms' arrows (docs/design.md):\n" + "\n".join(bad)


def test_the_checker_sees_a_wrong_arrow_even_inside_a_function():
    lazy = "def f():\n    from models.engine.training import Trainer\n"
    assert violations(lazy, "models.nn.encoder") == ["models.nn.encoder:2 -> models.engine.training"]
    assert violations("from models.tasks import decoding\n", "models.engine.training") == [
        "models.engine.training:1 -> models.tasks"
    ]
    assert violations("import gmot_cli\n", "models.tasks.export") == ["models.tasks.export:1 -> gmot_cli"]
    assert violations("from models.ot import transport\n", "data.loader") == ["data.loader:1 -> models.ot"]
    assert violations("from ..ot import graphs\n", "models.nn.transfer_loss") == []
    assert violations("import torch\nfrom data.store import x\n", "models.ot.transport") == [
        "models.ot.transport:2 -> data.store"
    ]
