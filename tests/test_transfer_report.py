"""benchmarks/transfer_report.py: the decision rule, the report tables and the learning-curve plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "transfer_report", ROOT / "benchmarks" / "transfer_report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _load()


def _row(run: str, devs: list[float], tests: list[float], **diag: float) -> dict:
    import statistics

    return {
        "run": run,
        "description": run,
        "seeds": list(range(len(devs))),
        "steps": [100],
        "dev_cer_mean": statistics.fmean(devs),
        "dev_cer_std": statistics.stdev(devs) if len(devs) > 1 else None,
        "dev_cer_per_seed": devs,
        "test_cer_mean": statistics.fmean(tests),
        "test_cer_std": statistics.stdev(tests) if len(tests) > 1 else None,
        "test_cer_per_seed": tests,
        **diag,
    }


def test_decision_rule_needs_two_standard_errors_on_dev_and_a_test_gain() -> None:
    base = _row("baseline", [0.50, 0.51, 0.49], [0.50, 0.50, 0.50])
    clear = _row("a", [0.45, 0.46, 0.44], [0.46, 0.46, 0.47])
    assert report.beats_baseline(clear, base)[0] is True
    close = _row("b", [0.49, 0.50, 0.505], [0.48, 0.48, 0.48])
    ok, why = report.beats_baseline(close, base)
    assert ok is False and "paired" in why and "unpaired" in why
    no_test = _row("c", [0.45, 0.46, 0.44], [0.52, 0.52, 0.52])
    assert report.beats_baseline(no_test, base)[0] is False
    one_seed = _row("d", [0.30], [0.30])
    assert report.beats_baseline(one_seed, base) == (False, "fewer than 2 common seeds: no decision")
    # paired: a small but consistent gain per seed passes although the seeds spread widely
    spread = _row("baseline", [0.50, 0.60, 0.55], [0.50, 0.60, 0.55])
    steady = _row("e", [0.48, 0.58, 0.53], [0.49, 0.59, 0.54])
    assert report.beats_baseline(steady, spread)[0] is True


def test_report_and_curve_from_ablation_folders(tmp_path: Path) -> None:
    for size, gain in ((500, 0.05), (1000, 0.02)):
        folder = tmp_path / f"d{size}"
        folder.mkdir()
        summary = [
            _row("baseline", [0.60, 0.61, 0.59], [0.60, 0.61, 0.62]),
            _row(
                "fgw-centred-tot",
                [0.60 - gain, 0.61 - gain, 0.59 - gain],
                [0.55, 0.56, 0.57],
                align_lift=2.1,
                align_order=0.8,
                align_entropy=0.8,
                grad_ratio=0.01,
            ),
        ]
        data = {
            "command": f"python benchmarks/ablation.py d{size} ...",
            "machine": {"cores": 2},
            "summary": summary,
        }
        (folder / "ablation.json").write_text(json.dumps(data), encoding="utf-8")
    notes = tmp_path / "notes.md"
    notes.write_text("Decision: written by hand.\n", encoding="utf-8")
    out, plot = tmp_path / "study.md", tmp_path / "curve.png"
    argv = [
        "--curve",
        f"500={tmp_path / 'd500'}",
        "--curve",
        f"1000={tmp_path / 'd1000'}",
        "--notes",
        str(notes),
        "--out",
        str(out),
        "--plot",
        str(plot),
    ]
    assert report.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert text.index("Decision: written by hand.") < text.index("## 500 train sentences")
    assert "## 1000 train sentences" in text and "python benchmarks/ablation.py d1000 ..." in text
    assert "| 2.10 | +0.80 | 0.80 | 0.010 |" in text
    assert "**yes**" in text  # the 5-point dev gain at 500 sentences is far beyond two standard errors
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        report.main(["--curve", f"2000={tmp_path / 'missing'}", "--out", str(out)])
