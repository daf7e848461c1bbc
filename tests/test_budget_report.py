"""recipes/transfer_study/budget_report.py: budgets read from ablation folders, the stopping rule, the tables
and the figure."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from study_scripts import load_study_script

budget_report = load_study_script("budget_report")


def _write_budget(folder: Path, updates: int, arms: dict[str, list[list[float]]], epochs: int = 4) -> Path:
    """An ablation folder of one budget: per arm, per seed, the dev CER of each epoch (the last is the
    run's dev CER; its test CER is the dev CER + 0.01), with metrics.jsonl files as training writes them."""
    summary, runs = [], []
    for arm, curves in arms.items():
        seeds = list(range(1, len(curves) + 1))
        devs = [c[-1] for c in curves]
        tests = [d + 0.01 for d in devs]
        summary.append({
            "run": arm, "description": arm, "seeds": seeds, "steps": [updates],
            "dev_cer_mean": statistics.fmean(devs), "dev_cer_per_seed": devs,
            "test_cer_mean": statistics.fmean(tests), "test_cer_per_seed": tests,
        })  # fmt: skip
        for seed, curve in zip(seeds, curves, strict=True):
            runs.append({"run": arm, "seed": seed, "steps": updates, "train_seconds": 60.0 * seed})
            run_dir = folder / "runs" / f"{arm}-seed{seed}"
            run_dir.mkdir(parents=True)
            per_epoch = updates // len(curve)
            lines = [json.dumps({"event": "train", "step": 1, "ctc": 9.0})]
            lines += [
                json.dumps({"event": "epoch", "step": per_epoch * (e + 1), "epoch": e + 1, "dev_cer": c})
                for e, c in enumerate(curve)
            ]
            (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{broken", encoding="utf-8")
    data = {
        "command": f"python recipes/transfer_study/ablation.py DATA {folder} --epochs {epochs}",
        "machine": {"cpu": "Test CPU", "cores": 2},
        "data_dir": "DATA",
        "runs": runs,
        "summary": summary,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ablation.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def test_stopping_rule_compares_the_epoch_before_the_last_quarter_with_the_end() -> None:
    # 8 epochs: the last quarter is epochs 7-8, so the rule compares epoch 6 with epoch 8
    curve = [(k, c) for k, c in enumerate([0.9, 0.7, 0.5, 0.4, 0.35, 0.300, 0.298, 0.296], start=1)]
    s = budget_report.stopping(curve)
    assert s is not None and s.epochs == 8
    assert (s.before, s.end) == (0.300, 0.296)
    assert s.gain_points == pytest.approx(0.4) and s.stopped is True
    # 5 epochs: a quarter rounds up to 2 epochs, compared from epoch 3; 1 point is still improving
    s = budget_report.stopping([(k, c) for k, c in enumerate([0.9, 0.7, 0.50, 0.495, 0.49], start=1)])
    assert s is not None and s.before == 0.50 and s.gain_points == pytest.approx(1.0) and s.stopped is False
    assert budget_report.stopping([(1, 0.5)]) is None


def test_report_tables_gains_and_stopping_per_budget(tmp_path: Path) -> None:
    short = _write_budget(
        tmp_path / "short", 400,
        {"baseline": [[0.9, 0.6], [0.9, 0.62], [0.9, 0.58]], "fgw": [[0.9, 0.55], [0.9, 0.56], [0.9, 0.54]],
         "other": [[0.9, 0.5]]},
    )  # fmt: skip
    long = _write_budget(
        tmp_path / "long", 1200,
        {"baseline": [[0.6, 0.4, 0.3, 0.298], [0.6, 0.4, 0.31, 0.30], [0.6, 0.4, 0.33, 0.302]],
         "fgw": [[0.6, 0.4, 0.3, 0.297], [0.6, 0.4, 0.31, 0.305], [0.6, 0.4, 0.33, 0.30]]},
    )  # fmt: skip
    budgets = [budget_report.read_budget(f, ["baseline", "fgw"]) for f in (long, short)]
    assert [b.updates for b in budgets] == [1200, 400]
    assert list(budgets[1].rows()) == ["baseline", "fgw"]  # "other" left out by --arms
    text = budget_report.report(budgets, "notes here", "Budget")
    assert text.index("notes here") < text.index("## CER per budget")
    # sorted by budget; the 400-update gains are 5, 6 and 4 points: t(0.975, 2) = 4.30 SE each side
    assert text.index("| 400 | baseline | 3 |") < text.index("| 1200 | baseline | 3 |")
    assert "| 400 | fgw | 3 | +5.00 [+2.52, +7.48] p 0.013 | +5.00 [+2.52, +7.48] p 0.013 | **yes** |" in text
    gain_1200 = next(line for line in text.splitlines() if line.startswith("| 1200 | fgw | 3 | -0.07 ["))
    assert gain_1200.endswith("| no |")  # gains +0.1, -0.5, +0.2 points: no decision in favour
    # stopping rule per run: 4 epochs compare epoch 3 with epoch 4
    assert "| 1200 | baseline | 1 | 4 | 30.00 -> 29.80 | +0.20 | yes |" in text
    assert "| 1200 | baseline | 3 | 4 | 33.00 -> 30.20 | +2.80 | no |" in text
    assert "| 400 | baseline | 2 | 2 | 90.00 -> 62.00 | +28.00 | no |" in text
    # train minutes: seeds took 1, 2, 3 minutes
    assert "| 400 | baseline | 3 | 60.00 [55.03, 64.97] | 61.00 [56.03, 65.97] | 2 |" in text
    assert "Machine: cpu Test CPU, cores 2." in text


def test_pairs_compare_two_arms_in_each_budget_that_ran_both(tmp_path: Path, capsys) -> None:
    short = _write_budget(
        tmp_path / "short", 400,
        {"baseline": [[0.9, 0.6], [0.9, 0.62], [0.9, 0.58]], "fgw": [[0.9, 0.55], [0.9, 0.56], [0.9, 0.54]],
         "shuffle": [[0.9, 0.57], [0.9, 0.57], [0.9, 0.56]]},
    )  # fmt: skip
    long = _write_budget(
        tmp_path / "long", 1200, {"baseline": [[0.6, 0.3]] * 3, "fgw": [[0.6, 0.29]] * 3}
    )  # the long budget did not run the control: no row for it
    out = tmp_path / "budget.md"
    args = ["--budget", str(short), "--budget", str(long), "--out", str(out), "--pair", "fgw=shuffle"]
    assert budget_report.main(args) == 0
    text = out.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| 400 | fgw | shuffle |")]
    # gains 2, 1, 2 points: mean 1.67, sd 0.577, t(0.975, 2) 4.30 -> +-1.43
    assert rows == [
        "| 400 | fgw | shuffle | 3 | +1.67 [+0.23, +3.10] p 0.038 | +1.67 [+0.23, +3.10] p 0.038 | **yes** |"
    ]
    assert "| 1200 | fgw | shuffle |" not in text
    assert "warning" not in capsys.readouterr().err
    assert budget_report.main([*args[:-1], "fgw=shufle"]) == 0
    assert "--pair fgw=shufle: no --budget folder ran both arms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        budget_report.main([*args[:-1], "fgw"])


def test_mean_epoch_curve_averages_the_seeds_per_step(tmp_path: Path) -> None:
    folder = _write_budget(tmp_path / "b", 200, {"baseline": [[0.8, 0.6], [0.6, 0.4]]})
    b = budget_report.read_budget(folder, None)
    assert budget_report.mean_epoch_curve(b, "baseline") == [
        (100, pytest.approx(0.7)),
        (200, pytest.approx(0.5)),
    ]


def test_cli_writes_report_and_figure_and_refuses_bad_folders(tmp_path: Path) -> None:
    a = _write_budget(tmp_path / "a", 400, {"baseline": [[0.9, 0.6], [0.9, 0.62]], "fgw": [[0.9, 0.5]] * 2})
    b = _write_budget(tmp_path / "b", 800, {"baseline": [[0.6, 0.4], [0.6, 0.42]], "fgw": [[0.6, 0.41]] * 2})
    out, png = tmp_path / "r" / "budget.md", tmp_path / "fig" / "budget.png"
    assert (
        budget_report.main(["--budget", str(a), "--budget", str(b), "--out", str(out), "--plot", str(png)])
        == 0
    )
    assert out.read_text(encoding="utf-8").startswith("# Does it last?")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # two folders of one budget
        budget_report.main(["--budget", str(a), "--budget", str(a), "--out", str(out)])
    with pytest.raises(SystemExit, match="no finished run of nothing"):
        budget_report.main(["--budget", str(a), "--arms", "nothing", "--out", str(out)])
    mixed = json.loads((a / "ablation.json").read_text(encoding="utf-8"))
    mixed["summary"][1]["steps"] = [500]
    (a / "ablation.json").write_text(json.dumps(mixed), encoding="utf-8")
    with pytest.raises(SystemExit, match="mixes runs of"):
        budget_report.main(["--budget", str(a), "--out", str(out)])
    with pytest.raises(SystemExit, match=r"ablation\.json not found"):
        budget_report.main(["--budget", str(tmp_path / "none"), "--out", str(out)])


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_budget_reports_script_rebuilds_every_report_and_figure_from_the_archive(tmp_path: Path) -> None:
    """budget_reports.sh reads only what is committed: every budget, the two-stage seeds, the diagnostics.
    Written elsewhere (REPORTS, FIGURES), the committed files are left alone."""
    env = os.environ | {"REPORTS": str(tmp_path / "r"), "FIGURES": str(tmp_path / "f")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this interpreter as `python`
    script = ROOT / "recipes" / "transfer_study" / "budget_reports.sh"
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, text=True)
    report = (tmp_path / "r" / "budget.md").read_text(encoding="utf-8")
    for updates in ("656", "1968", "6068"):
        assert f"| {updates} | baseline |" in report, f"budget {updates} missing from budget.md"
    twostage = (tmp_path / "r" / "twostage.md").read_text(encoding="utf-8")
    seeds = sorted(p.name for p in (ROOT / "recipes/transfer_study/results/budget/twostage").glob("seed*"))
    assert seeds and all(f"| {s.removeprefix('seed')} | baseline-{s} |" in twostage for s in seeds)
    for figure in ("budget_curve", "twostage", "budget_diagnostics", "budget_diagnostics_u6000"):
        assert (tmp_path / "f" / f"{figure}.png").stat().st_size > 10_000, figure
