"""recipes/transfer_study/rerun_report.py: one arm and seed from two ablation folders, paired per seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study_scripts import load_study_script

rerun = load_study_script("rerun_report")


def _folder(path: Path, arms: dict[str, dict[int, tuple[float, float]]], cpu: str) -> Path:
    """An ablation folder whose summary holds, per arm, {seed: (dev CER, test CER)}."""
    summary = []
    for arm, per_seed in arms.items():
        seeds = sorted(per_seed)
        summary.append({
            "run": arm, "seeds": seeds,
            "dev_cer_per_seed": [per_seed[s][0] for s in seeds],
            "test_cer_per_seed": [per_seed[s][1] for s in seeds],
        })  # fmt: skip
    path.mkdir(parents=True)
    data = {"command": f"ablation.py DATA {path}", "date": "2026-12-04", "machine": {"cpu": cpu},
            "summary": summary}  # fmt: skip
    (path / "ablation.json").write_text(json.dumps(data), encoding="utf-8")
    return path


def test_pairs_each_common_arm_and_seed(tmp_path: Path) -> None:
    old = _folder(tmp_path / "old", {
        "baseline": {1: (0.30, 0.31)},
        "fgw": {1: (0.20, 0.21), 2: (0.22, 0.23), 3: (0.24, 0.25)},
    }, "Old CPU")  # fmt: skip
    new = _folder(tmp_path / "new", {
        "fgw": {1: (0.21, 0.21), 2: (0.22, 0.22), 3: (0.23, 0.27), 4: (0.5, 0.5)},
        "fgw-fade": {1: (0.2, 0.2)},
    }, "New CPU")  # fmt: skip
    before, after = rerun.load(old), rerun.load(new)
    assert rerun.common_arms(before, after, None) == ["fgw"]
    text = rerun.report(before, after, ["fgw"], "Rerun")
    assert "| fgw | 3 | 24.00 | 23.00 | 25.00 | 27.00 |" in text
    assert "| fgw | 4 |" not in text  # seed 4 ran only after
    # dev d = before - after: -1, 0, +1 points: mean 0; test d: 0, +1, -2: largest |d| 2 points
    assert "| fgw | 3 | +0.00 [" in text and text.rstrip().endswith("| 2.00 |")
    assert "cpu Old CPU" in text and "cpu New CPU" in text


def test_arms_missing_from_a_folder_are_errors(tmp_path: Path) -> None:
    old = rerun.load(_folder(tmp_path / "old", {"baseline": {1: (0.3, 0.3)}}, "A"))
    new = rerun.load(_folder(tmp_path / "new", {"fgw": {1: (0.2, 0.2)}}, "B"))
    with pytest.raises(SystemExit, match="share no arm"):
        rerun.common_arms(old, new, None)
    with pytest.raises(SystemExit, match="--arms fgw: not run in both"):
        rerun.common_arms(old, new, ["fgw"])


def test_main_writes_the_file_or_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _folder(tmp_path / "old", {"fgw": {1: (0.2, 0.2), 2: (0.3, 0.3)}}, "A")
    new = _folder(tmp_path / "new", {"fgw": {1: (0.2, 0.2), 2: (0.3, 0.3)}}, "B")
    out = tmp_path / "out" / "rerun.md"
    assert rerun.main(["--before", str(old), "--after", str(new), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("# The same runs, run again")
    assert rerun.main(["--before", str(old), "--after", str(new), "--arms", "fgw"]) == 0
    assert "| fgw | 2 | +0.00 [+0.00, +0.00] p 1.000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rerun.main(["--before", str(tmp_path / "none"), "--after", str(new)])
