"""benchmarks/bench_side_by_side.sh refuses what it cannot time, with a message and exit status 2."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_side_by_side.sh"


def _run(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False)


def test_usage_and_an_unprepared_folder_are_refused(tmp_path: Path) -> None:
    result = _run()
    assert result.returncode != 0 and "usage: bench_side_by_side.sh DATA_DIR" in result.stderr
    result = _run(str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path}/train/manifest.jsonl not found" in result.stderr


def test_gmot_missing_from_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.jsonl").write_text("", encoding="utf-8")
    result = _run(str(tmp_path), path="/usr/bin:/bin")  # no venv: no gmot
    assert result.returncode == 2 and "gmot is not on PATH" in result.stderr
