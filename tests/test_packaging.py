"""What `pip install .` puts in the wheel: every package of the source tree (a sub-package left out of
pyproject.toml would install a gmot that fails on import, while the editable install of the tests works).
setuptools ships the packages whose dotted names match `[tool.setuptools.packages.find] include`
(fnmatch patterns); this checks those patterns against the tree."""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def include_patterns() -> list[str]:
    """The `include` list of pyproject.toml's [tool.setuptools.packages.find] table."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = text.split("[tool.setuptools.packages.find]", 1)[1].split("\n[", 1)[0]
    found = re.search(r"^include\s*=\s*(\[.*?\])", table, re.M | re.S)
    assert found, "pyproject.toml: [tool.setuptools.packages.find] has no include list"
    return list(ast.literal_eval(found.group(1)))


def test_the_wheel_takes_every_package_of_the_source_tree() -> None:
    patterns = include_patterns()
    in_tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("gmot_cli", "models", "data")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert {"models.ot", "models.nn", "models.engine", "models.tasks"} <= in_tree
    shipped = {name for name in in_tree if any(fnmatchcase(name, p) for p in patterns)}
    assert in_tree - shipped == set(), f"packages missing from the wheel: {sorted(in_tree - shipped)}"
    others = {".".join(i.parent.relative_to(ROOT).parts) for i in ROOT.glob("*/__init__.py")} - in_tree
    assert not {n for n in others if any(fnmatchcase(n, p) for p in patterns)}, (
        "tests/ or benchmarks/ shipped"
    )
