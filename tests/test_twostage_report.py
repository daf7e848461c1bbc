"""recipes/transfer_study/twostage_report.py: runs continued from trained starts, pooled over one folder per
seed; the starts' CERs, the paired gains, the disturbance rule, the report and the figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study_scripts import load_study_script

twostage = load_study_script("twostage_report")

STARTS = {1: (0.20, 0.22), 2: (0.21, 0.23), 3: (0.19, 0.20)}  # seed: the start's (dev, test) CER


def _write_starts(folder: Path) -> Path:
    for seed, (dev, test) in STARTS.items():
        run = folder / "runs" / f"baseline-seed{seed}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"dev_cer": dev, "test_cer": test}), encoding="utf-8")
    return folder


def _write_stage(folder: Path, seed: int, start_dir: Path, arms: dict[str, list[float]]) -> Path:
    """One seed's two-stage folder: per arm, the dev CER of each epoch (the last is the run's dev CER; test
    = dev + 0.01), continued from START_DIR/runs/baseline-seedSEED/avg.pt."""
    runs = []
    for arm, curve in arms.items():
        runs.append({
            "run": arm, "seed": seed, "steps": 30 * len(curve), "train_seconds": 120.0,
            "dev_cer": curve[-1], "test_cer": curve[-1] + 0.01,
            "init_checkpoint": str(start_dir / "runs" / f"baseline-seed{seed}" / "avg.pt"),
        })  # fmt: skip
        run_dir = folder / "runs" / f"{arm}-seed{seed}"
        run_dir.mkdir(parents=True)
        lines = [json.dumps({"event": "epoch", "step": 30 * (e + 1), "epoch": e + 1, "dev_cer": c})
                 for e, c in enumerate(curve)]  # fmt: skip
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = {
        "command": f"ablation.py DATA {folder} --init-from X --seeds {seed}",
        "machine": {"cpu": "Test CPU"},
    }
    (folder / "ablation.json").write_text(json.dumps({**data, "runs": runs}), encoding="utf-8")
    return folder


def _three_seeds(tmp_path: Path, starts: Path) -> list[Path]:
    # fgw ends 0.5-1.0 point below the continued baseline on every seed; seed 2's fgw rises 1.5 points
    # after its first epoch (disturbed), the baseline's 2 points on seed 3 (a control is never "disturbed")
    return [
        _write_stage(tmp_path / "s1", 1, starts, {"baseline": [0.205, 0.195], "fgw": [0.20, 0.19]}),
        _write_stage(tmp_path / "s2", 2, starts, {"baseline": [0.215, 0.200], "fgw": [0.225, 0.190]}),
        _write_stage(tmp_path / "s3", 3, starts, {"baseline": [0.210, 0.185], "fgw": [0.195, 0.178]}),
    ]


def test_pooled_seeds_starts_and_gains(tmp_path: Path) -> None:
    starts = _write_starts(tmp_path / "u6000")
    stage = twostage.read_stage(_three_seeds(tmp_path, starts), None)
    assert stage.arms() == ["baseline", "fgw"]
    start = stage.row(twostage.START)
    assert start["seeds"] == [1, 2, 3] and start["dev_cer_per_seed"] == [0.20, 0.21, 0.19]
    fgw, base = stage.row("fgw"), stage.row("baseline")
    gain = twostage.paired(fgw, base, "dev_cer")
    assert gain is not None and gain.n == 3
    assert gain.mean == pytest.approx((0.005 + 0.010 + 0.007) / 3)
    text = twostage.report(stage, "notes here", "Two-stage")
    assert text.index("notes here") < text.index("## CER")
    assert "| fgw | baseline | 3 | +0.73 [" in text  # the paired dev gain in points
    assert "| fgw | start | 3 |" in text and "| baseline | start | 3 |" in text
    assert "| 2 | baseline-seed2 | 21.00 / 23.00 | 20.00 / 21.00 | 19.00 / 20.00 |" in text


def test_disturbance_rule_counts_transfer_arms_only(tmp_path: Path) -> None:
    starts = _write_starts(tmp_path / "u6000")
    stage = twostage.read_stage(_three_seeds(tmp_path, starts), None)
    rows, disturbed = twostage.disturbance_rows(stage)
    assert disturbed is True
    assert "| fgw | 2 | 21.00 | 22.50 | +1.50 | +1.00 | **yes** |" in rows  # the baseline rose 0.50
    assert "| fgw | 1 | 20.00 | 20.00 | +0.00 | -0.50 | no |" in rows
    assert "| baseline | 3 | 19.00 | 21.00 | +2.00 |  | (control) |" in rows
    assert "| fgw | 3 | 19.00 | 19.50 | +0.50 | -1.50 | no |" in rows
    calm = _write_stage(tmp_path / "calm", 1, starts, {"baseline": [0.25, 0.2], "fgw": [0.209, 0.19]})
    assert twostage.disturbance_rows(twostage.read_stage([calm], None))[1] is False  # +0.9: within the rule
    alone = _write_stage(tmp_path / "alone", 1, starts, {"fgw": [0.22, 0.19]})  # no control run for seed 1
    assert (
        "| fgw | 1 | 20.00 | 22.00 | +2.00 | n/a | **yes** |"
        in twostage.disturbance_rows(twostage.read_stage([alone], None))[0]
    )
    rows, _ = twostage.disturbance_rows(stage, control="fgw")  # --control names the arm without the transfer
    assert "| fgw | 2 | 21.00 | 22.50 | +1.50 |  | (control) |" in rows
    assert "| baseline | 2 | 21.00 | 21.50 | +0.50 | -1.00 | no |" in rows


def test_starts_from_an_archive_and_bad_folders(tmp_path: Path) -> None:
    gone = tmp_path / "gone"  # where the runs were trained: no longer there
    folders = _three_seeds(tmp_path, gone)
    with pytest.raises(SystemExit, match=r"gone/runs/baseline-seed1/result\.json not found"):
        twostage.read_stage(folders, None)
    archive = _write_starts(tmp_path / "archive")
    stage = twostage.read_stage(folders, archive)  # looked up by the start's run-folder name
    assert stage.row(twostage.START)["test_cer_per_seed"] == [0.22, 0.23, 0.20]
    with pytest.raises(SystemExit, match="baseline seed 1 is in both"):
        twostage.read_stage([folders[0], folders[0]], archive)
    scratch = tmp_path / "scratch"
    _write_stage(scratch, 1, archive, {"fgw": [0.3]})
    data = json.loads((scratch / "ablation.json").read_text())
    data["runs"][0]["init_checkpoint"] = None
    (scratch / "ablation.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="trained from scratch"):
        twostage.read_stage([scratch], archive)


def test_main_writes_the_report_and_the_figure(tmp_path: Path) -> None:
    starts = _write_starts(tmp_path / "u6000")
    folders = _three_seeds(tmp_path, starts)
    notes = tmp_path / "notes.md"
    notes.write_text("Planned before the runs.", encoding="utf-8")
    out, png = tmp_path / "out" / "twostage.md", tmp_path / "fig" / "twostage.png"
    argv = [x for f in folders for x in ("--stage", str(f))]
    assert twostage.main([*argv, "--notes", str(notes), "--out", str(out), "--plot", str(png)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# The two-stage schedule") and "Planned before the runs." in text
    assert "At least one run did." in text and "Machine: cpu Test CPU." in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob("*.tmp.png"))


def test_control_no_folder_ran_warns_and_compares_only_the_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    starts = _write_starts(tmp_path / "u6000")
    folders = _three_seeds(tmp_path, starts)
    out = tmp_path / "twostage.md"
    argv = [x for f in folders for x in ("--stage", str(f))]
    assert twostage.main([*argv, "--control", "fgw-ramp", "--out", str(out)]) == 0
    assert "warning: --control fgw-ramp: no folder ran it" in capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    # no pair without its control
    assert "| fgw | baseline |" not in text and "| fgw | fgw-ramp |" not in text
    assert "| fgw | start | 3 |" in text and "| baseline | start | 3 |" in text
