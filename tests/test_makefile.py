"""The Makefile's `venv-path` names the venv that `make venv` builds: under ~/.cache/gmot, keyed by the hash
of the dependency pins (pyproject.toml then constraints.txt), so the docs'
`source "$(make -s venv-path)/bin/activate"` finds this clone's venv even when older ones lie beside it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_venv_path_is_keyed_by_the_hash_of_the_pins(tmp_path: Path) -> None:
    pins = (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
    expected = tmp_path / ".cache" / "gmot" / f"venv-{hashlib.sha256(pins).hexdigest()[:16]}"
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "MAKEFLAGS")} | {"HOME": str(tmp_path)}
    command = ["make", "-s", "-C", str(ROOT), "venv-path"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
    assert not expected.exists(), "venv-path must only print, not build"
